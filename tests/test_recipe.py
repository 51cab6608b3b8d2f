"""The training recipe on in-memory batches: every method learns; resume continues exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from data.chat_collate import ChatCollator
from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from pipeline.models.presets.tiny import build_tiny_llava
from pipeline.schema import AdapterConfig, TrainConfig
from pipeline.schema_model import ModelConfig
from pipeline.stages.methods import attach_method, regex_targets
from pipeline.stages.optimization import cosine_with_warmup
from pipeline.stages.recipe import TrainRecipe

WORDS = "a red blue green circle square triangle left right".split()
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
TARGETS = [r"vision_tower\.encoder\.layers\.[0-2]\.self_attn\.(q_proj|v_proj)$",
           r"language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)$", r"multi_modal_projector\.linear_[12]$"]


def _samples(n: int, seed: int):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        colour = list(COLOURS)[rng.randint(3)]
        out.append({"image": Image.new("RGB", (64, 64), COLOURS[colour]), "task": "caption",
                    "captions": [f"a {colour} square"]})
    return out


def _setup(method: str, tmp_path, max_steps: int = 24, **train_kw):
    model, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, WORDS, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
    adapter = AdapterConfig(method=method, rank=4, alpha=8, vera_rank=64)
    adapted = attach_method(model, adapter, regex_targets(model, TARGETS), [], max_steps)
    collate = ChatCollator(processor, max_length=120)
    train = [collate(_samples(8, seed)) for seed in range(4)]
    val = [collate(_samples(8, 100))]
    cfg = TrainConfig(max_steps=max_steps, batch_size=8, lr=5e-3, eval_every=max_steps, save_every=8,
                      log_every=4, warmup_ratio=0.0, **train_kw)
    return TrainRecipe(adapted, cfg, tmp_path, lambda: itertools.cycle(train), val)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "vera"])
def test_every_peft_method_lowers_validation_loss(method, tmp_path):
    recipe = _setup(method, tmp_path)
    recipe.setup()
    before = recipe.validate()
    result = recipe.train()
    recipe.cleanup()
    after = result.val_losses[-1][1]
    assert after < before - 0.1, (method, before, after)
    assert (tmp_path / "checkpoints" / "step-0000024" / "COMPLETE").is_file()
    assert (tmp_path / "metrics.jsonl").is_file()


def test_only_adapter_parameters_train(tmp_path):
    recipe = _setup("lora", tmp_path)
    names = [n for n, p in recipe.adapted.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_resume_continues_exactly(tmp_path):
    full = _setup("lora", tmp_path / "full", max_steps=16)
    full.setup()
    full.train()
    reference = full.adapted.trainable_state_dict()

    part = _setup("lora", tmp_path / "part", max_steps=16)
    part.setup()
    part.train(until=10)  # "killed" at step 10: the newest checkpoint is step 8
    resumed = _setup("lora", tmp_path / "part", max_steps=16)
    resumed.setup()
    assert resumed.resumed_from == 8 and resumed.step == 8
    resumed.train()
    for name, value in resumed.adapted.trainable_state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name


def test_cosine_schedule_shape():
    f = cosine_with_warmup(100, 0.06)
    assert f(0) < f(5) <= 1.0 and f(6) == pytest.approx(1.0) and f(99) < 0.01


def test_divergence_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    recipe = _setup("lora", tmp_path, max_steps=16)
    recipe.setup()
    recipe.train(until=8)  # a good checkpoint at step 8
    before = recipe.adapted.trainable_state_dict()
    real = recipe.loss_step

    def diverging(batch, num_items=None):
        terms = real(batch, num_items)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    recipe.loss_step = diverging
    with pytest.raises(FloatingPointError, match="training diverged at step 9"):
        recipe.train()
    after = recipe.adapted.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN step was taken
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000008"]


def test_optimizer_state_written_by_every_rank_resumes_exactly(tmp_path, monkeypatch):
    """The DeepSpeed path of the checkpoint (every rank writes its optimizer partition through
    accelerate's save_state, the checkpoint carries it, resume loads it), run here on one process:
    DeepSpeed itself needs GPUs. Also with grad_accum 2 through accelerate's accumulate."""
    from pipeline.stages import recipe as train_module
    from pipeline.stages.train_state import ACCELERATE_STATE

    full = _setup("lora", tmp_path / "full", max_steps=12, grad_accum=2)
    full.setup()
    full.train()
    reference = full.adapted.trainable_state_dict()

    original = train_module.TrainRecipe.setup

    def setup_by_every_rank(self):
        original(self)
        self.state_by_every_rank = True

    monkeypatch.setattr(train_module.TrainRecipe, "setup", setup_by_every_rank)
    part = _setup("lora", tmp_path / "part", max_steps=12, grad_accum=2)
    part.setup()
    part.train(until=10)  # the newest checkpoint is step 8
    saved = tmp_path / "part" / "checkpoints" / "step-0000008"
    assert (saved / ACCELERATE_STATE).is_dir()
    assert torch.load(saved / "training_state.pt", weights_only=False)["optimizer"] is None
    resumed = _setup("lora", tmp_path / "part", max_steps=12, grad_accum=2)
    resumed.setup()
    assert resumed.resumed_from == 8
    resumed.train()
    for name, value in resumed.adapted.trainable_state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name
