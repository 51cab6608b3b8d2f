"""The door (`pipeline.models.door.open_model`): every command opens a model through it, and every check happens
there once, at start, in one line: a processor without a chat template is refused by `structlora eval`, the
demo and a run alike, and `model.chat_template` / `--chat-template` supply one; the vision feature layer and the
image fit are checked; `model.arch: llava` is the llava family on the one path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.door import open_model
from pipeline.schema import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_template(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen2.5-VL saved with a processor that has no chat template (as PaliGemma's hub checkpoints ship),
    and its template as a Jinja file beside it."""
    from pipeline.models.presets.processors import tiny_processor
    from pipeline.models.presets.tiny import build_tiny

    root = tmp_path_factory.mktemp("door")
    processor = tiny_processor("qwen2_5_vl")
    template = root / "chat_template.jinja"
    template.write_text(processor.chat_template)
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    build_tiny("qwen2_5_vl").save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", template


def test_a_processor_without_a_chat_template_is_refused_by_a_run_and_model_chat_template_supplies_one(no_template):
    model_dir, template = no_template
    with pytest.raises(UserError, match="no chat template.*model.chat_template=FILE"):
        open_model(ModelConfig(arch="vlm", name_or_path=str(model_dir)))
    model, processor = open_model(ModelConfig(arch="vlm", name_or_path=str(model_dir), chat_template=str(template)))
    assert "<|im_start|>assistant" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], add_generation_prompt=True, tokenize=False)
    with pytest.raises(UserError, match="model.chat_template: .*not a file"):
        open_model(ModelConfig(arch="vlm", name_or_path=str(model_dir), chat_template=str(template) + ".missing"))


def test_structlora_eval_refuses_it_in_one_line_before_loading_and_takes_chat_template(no_template, tmp_path):
    model_dir, template = no_template
    command = [sys.executable, "-m", "pipeline.cli", "eval", str(model_dir), "--data", str(tmp_path / "none"),
               "--tasks", "caption"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "no chat template" in proc.stderr and "--chat-template FILE" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    from pipeline.eval_models import load_model

    model, processor = load_model(str(model_dir), torch.float32, chat_template=str(template))
    assert processor.chat_template == template.read_text()


def test_the_demo_refuses_it_at_start_in_one_line_and_takes_chat_template(no_template):
    from app.errors import DemoError
    from app.inference import LoadedModel

    model_dir, template = no_template
    with pytest.raises(DemoError, match="no chat template.*--chat-template FILE") as err:
        LoadedModel(model_dir, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
    loaded = LoadedModel(model_dir, device=torch.device("cpu"), chat_template=str(template))
    assert "<|im_start|>assistant" in loaded.processor.chat_template


def test_a_llava_processor_saved_without_a_template_gets_llava_15s(tmp_path):
    """llava-hf's LLaVA-1.5 checkpoints: a processor without a template (or with llava-hf's, which writes no
    '</s>' after a reply) gets LLaVA-1.5's training conversation, so labels end every reply with '</s>'."""
    from data.chat_template import LLAVA15_CHAT_TEMPLATE, end_of_turn_ids

    model, processor = open_model(ModelConfig(preset="tiny", vision_feature_layer=-2))
    processor.chat_template = None
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, loaded = open_model(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.chat_template == LLAVA15_CHAT_TEMPLATE
    assert end_of_turn_ids(loaded) == [loaded.tokenizer.eos_token_id]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"], ids=lambda f: f"generation_stops-{f}")
def test_generation_stops_at_the_end_of_turn_token(family):
    """The door adds the token the template ends a reply with to the generation config's eos ids."""
    from data.chat_template import end_of_turn_ids

    model, processor = open_model(ModelConfig(arch="vlm", preset=f"tiny-{family}"))
    eos = model.generation_config.eos_token_id
    assert end_of_turn_ids(processor)[0] in (eos if isinstance(eos, list) else [eos])


def test_the_vision_feature_layer_and_the_image_fit_are_checked_at_the_door(tmp_path):
    model, processor = open_model(ModelConfig(preset="tiny", vision_feature_layer=-2))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="vision_feature_layer=-1 but .* was trained with -2"):
        open_model(ModelConfig(name_or_path=str(tmp_path), vision_feature_layer=-1))
    _, padded = open_model(ModelConfig(name_or_path=str(tmp_path)), image_fit="pad_to_square")
    assert padded.image_processor.do_pad  # LLaVA-1.5's expand2square
    with pytest.raises(UserError, match="image_fit=pad_to_square: the qwen2_5_vl family"):
        open_model(ModelConfig(arch="vlm", preset="tiny-qwen2_5_vl"), image_fit="pad_to_square")
    with pytest.raises(UserError, match="has no vision_feature_layer"):
        open_model(ModelConfig(arch="vlm", preset="tiny-qwen2_5_vl", vision_feature_layer=-2))


def test_arch_llava_and_arch_vlm_are_one_path():
    """`model.arch: llava` is a spelling of the llava family: the same door, the same tower table and plan."""
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    cfg = from_dict(RunConfig, {"model": {"arch": "llava", "preset": "tiny-llava"}})
    assert cfg.model.arch == "llava"
    a, _ = open_model(ModelConfig(arch="llava", preset="tiny-llava"))
    b, _ = open_model(ModelConfig(arch="vlm", preset="tiny-llava"))
    assert type(a) is type(b) and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                           b.state_dict().values()))


def test_processor_kwargs_reach_the_processor_and_travel_with_it(tmp_path):
    """`model.processor_kwargs` (Qwen-VL's min_pixels / max_pixels) go to AutoProcessor.from_pretrained: the image
    costs what they say, and the processor saved with the model (so every later command) keeps them."""
    from PIL import Image

    from data.chat_collate import ChatCollator

    model, processor = open_model(ModelConfig(arch="vlm", preset="tiny-qwen2_5_vl"))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    image = Image.new("RGB", (64, 64))
    assert ChatCollator(processor).image_tokens(image) == 4  # the preset: one 16 x 16 image's worth of pixels
    loaded, wider = open_model(ModelConfig(arch="vlm", name_or_path=str(tmp_path / "base"),
                                           processor_kwargs={"min_pixels": 256, "max_pixels": 1024}))
    assert ChatCollator(wider).image_tokens(image) == 16
    loaded.save_pretrained(tmp_path / "saved")
    wider.save_pretrained(tmp_path / "saved")
    _, again = open_model(ModelConfig(arch="vlm", name_or_path=str(tmp_path / "saved")))
    assert ChatCollator(again).image_tokens(image) == 16


def test_structlora_demo_passes_chat_template_to_the_demo(monkeypatch):
    import app.demo
    from pipeline.cli import main

    seen = {}
    monkeypatch.setattr(app.demo, "launch", lambda **kwargs: seen.update(kwargs))
    assert main(["demo", "some/model", "--chat-template", "t.jinja"]) == 0
    assert seen["chat_template"] == "t.jinja" and str(seen["model_dir"]) == "some/model"


def test_models_loaded_in_threads_at_once_leave_weight_tying_working(tmp_path):
    """transformers swaps PreTrainedModel.tie_weights for a no-op on the class while a checkpoint loads; two loads at
    once in threads (the demo's handlers, a test beside a served demo) left it swapped for the rest of the process,
    and a Gemma 3 built later had its lm_head untied (CI, 2026-12-07). Every load through the door and the demo
    holds data.loading.LOADING."""
    import threading

    from transformers.modeling_utils import PreTrainedModel

    from app.inference import LoadedModel
    from pipeline.models.presets.tiny import build_tiny

    original = PreTrainedModel.tie_weights
    model, processor = open_model(ModelConfig(arch="vlm", preset="tiny-qwen2_5_vl"))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    errors = []

    def load(door: bool) -> None:
        try:
            for _ in range(4):
                if door:
                    open_model(ModelConfig(arch="vlm", name_or_path=str(tmp_path)))
                else:
                    LoadedModel(tmp_path)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=load, args=(k % 2 == 0,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and PreTrainedModel.tie_weights is original
    gemma = build_tiny("gemma3")
    assert gemma.get_output_embeddings().weight is gemma.get_input_embeddings().weight
