"""StructLoRA through the pipeline's training recipe: it learns, and a killed run resumes exactly
(gates' temperature, EMA gradient sketches and semantic edges included)."""

from __future__ import annotations

import itertools

import torch
from PIL import Image

from pipeline.models.plan import plan_for
from pipeline.schema import AdapterConfig, TrainConfig
from pipeline.schema_model import TinyPreset
from pipeline.stages.methods import attach_method
from pipeline.stages.recipe import TrainRecipe
from structlora import PAPER_GATE

WORDS = "a red blue green circle square".split()
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
PRESET = TinyPreset(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, vision_heads=2,
                    text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64, max_position=128)


def _setup(tmp_path, max_steps: int):
    from data.chat_collate import ChatCollator
    from pipeline.models.presets.tiny import build_tiny_llava

    model, processor = build_tiny_llava(PRESET, WORDS)
    # sampled gates (as first built): a resume must also restore the random state of the gate draws
    adapter = AdapterConfig(rank=4, alpha=8, structlora={"gate": dict(PAPER_GATE),
                                                         "coordinator": {"refresh_every": 3, "theta_init_std": 0.01}})
    found = plan_for(model, processor, adapter, max_steps)
    adapted = attach_method(model, adapter, found.target_names, [], max_steps, structlora_config=found.structlora_config)
    collate = ChatCollator(processor, max_length=64)
    batches = [collate([{"image": Image.new("RGB", (32, 32), rgb), "task": "caption", "captions": [f"a {c} square"]}
                        for c, rgb in COLOURS.items()]) for _ in range(2)]
    cfg = TrainConfig(max_steps=max_steps, batch_size=3, lr=5e-3, eval_every=max_steps, save_every=4, log_every=2,
                      warmup_ratio=0.0)
    return TrainRecipe(adapted, cfg, tmp_path, lambda: itertools.cycle(batches), batches[:1])


def test_structlora_trains_and_resumes_exactly(tmp_path):
    full = _setup(tmp_path / "full", max_steps=10)
    full.setup()
    before = full.validate()
    result = full.train()
    assert result.val_losses[-1][1] < before
    reference, handle = full.adapted.trainable_state_dict(), full.adapted.handle

    part = _setup(tmp_path / "part", max_steps=10)
    part.setup()
    part.train(until=6)  # killed at step 6: the newest checkpoint is step 4
    resumed = _setup(tmp_path / "part", max_steps=10)
    resumed.setup()
    assert resumed.resumed_from == 4
    resumed.train()
    for name, value in resumed.adapted.trainable_state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-5), name
    other = resumed.adapted.handle
    assert other.graph.edges == handle.graph.edges and other.graph.edges["semantic"]
    assert torch.allclose(other.coordinator.ema_sketch, handle.coordinator.ema_sketch, atol=1e-5)
    assert other.temperature == handle.temperature
