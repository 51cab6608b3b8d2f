"""Backbone presets build offline, learn, and round-trip through save_pretrained/from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.chat_template import chat_prompt
from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from pipeline.errors import UserError
from pipeline.models.hub import count_parameters, resolve_pretrained
from pipeline.models.presets.tiny import build_tiny_llava
from pipeline.models.vit import build_tiny_vit, build_vit, save_vit
from pipeline.schema_model import ModelConfig, TinyPreset

WORDS = "a an the red blue green yellow circle square triangle small large left right of is there how many shapes".split()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(ModelConfig(preset="tiny").tiny, WORDS, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])


def _images(n: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(processor, n: int = 4):
    texts = [chat_prompt(processor, CAPTION_PROMPT) + " a red circle left of a blue square" for _ in range(n)]
    return processor(images=_images(n), text=texts, return_tensors="pt", padding=True)


def test_tiny_llava_is_small_and_has_the_llava_module_names(tiny):
    model, processor = tiny
    assert 1_000_000 <= count_parameters(model) <= 5_000_000
    names = dict(model.named_modules())
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in names
    assert "model.language_model.layers.0.self_attn.v_proj" in names
    assert "model.multi_modal_projector.linear_1" in names
    assert model.config.vision_feature_layer == -2


def test_processor_expands_image_token_to_the_feature_count(tiny):
    model, processor = tiny
    batch = _batch(processor, 2)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == [64, 64]  # (64 / 8)^2, CLS dropped
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch.input_ids.shape


def test_tiny_llava_loss_decreases_on_a_fixed_batch(tiny):
    model, processor = tiny
    model = type(model)(model.config)  # a fresh copy: the module fixture stays untouched
    batch = _batch(processor)
    labels = batch.input_ids.masked_fill(batch.input_ids == model.config.image_token_index, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


def test_tiny_llava_save_and_reload_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from pipeline.models.door import open_model

    again, proc2 = open_model(ModelConfig(name_or_path=str(tmp_path), vision_feature_layer=-2), source=tmp_path)
    batch = _batch(processor, 2)
    batch2 = _batch(proc2, 2)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert torch.equal(batch.pixel_values, batch2.pixel_values)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again.eval()(**batch2).logits)
    assert proc2.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}],
        add_generation_prompt=True,
    ) == f"USER: <image>\n{CAPTION_PROMPT} ASSISTANT:"


def test_tiny_llava_generates(tiny):
    model, processor = tiny
    inputs = processor(images=_images(1), text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 4 or out[0, -1] == processor.tokenizer.eos_token_id


@pytest.mark.parametrize("impl", ["transformers", "timm"])
def test_tiny_vit_learns_and_round_trips(impl, tmp_path):
    model = build_vit(ModelConfig(arch="vit", preset="tiny", vit_impl=impl), num_labels=5)
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8) % 5

    def logits(m):
        out = m(pixel_values=x) if impl == "transformers" else m(x)
        return out.logits if hasattr(out, "logits") else out

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(logits(model), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    save_vit(model, tmp_path)
    again = build_vit(ModelConfig(arch="vit", name_or_path=str(tmp_path), vit_impl=impl)).eval()
    with torch.no_grad():
        assert torch.equal(logits(model), logits(again))


def test_same_seed_same_weights():
    a = build_tiny_vit(TinyPreset(), seed=3)
    b = build_tiny_vit(TinyPreset(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        resolve_pretrained("llava-hf/llava-1.5-7b-hf")
    msg = str(err.value)
    assert "cannot load 'llava-hf/llava-1.5-7b-hf'" in msg and "local directory" in msg and "\n" not in msg


def test_hub_id_unreachable_fails_fast(monkeypatch):
    """With HF_HUB_OFFLINE unset, the quick metadata probe fails (no network here) instead of retrying."""
    import time

    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot load 'llava-hf/llava-1.5-7b-hf'.*local directory"):
        resolve_pretrained("llava-hf/llava-1.5-7b-hf", probe_timeout=2.0)
    assert time.monotonic() - start < 30


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        resolve_pretrained(str(tmp_path / "nowhere"))
