"""The llava15-7b-skeleton preset: LLaVA-1.5-7B's real widths with a few layers and random weights.

The fast test checks every width against llava-hf/llava-1.5-7b-hf's config on the meta device
(no memory). The slow one (`pytest -m slow tests/test_skeleton.py`, ~10 minutes on 2 cores) takes
the preset through prepare -> train -> merge with the CLI, and checks that the merged model and
the exported PEFT adapter on the rebuilt base reproduce the adapted model's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_skeleton_has_the_real_7b_shapes():
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.presets.skeletons import skeleton_llava_config

    config = skeleton_llava_config(3, 2, image_token_id=5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    vision = "model.vision_tower.vision_model.encoder.layers.0" if any(
        "vision_model" in n for n in shapes) else "model.vision_tower.encoder.layers.0"
    assert shapes[f"{vision}.self_attn.q_proj.weight"] == (1024, 1024)
    assert shapes[f"{vision}.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["model.multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert shapes["model.multi_modal_projector.linear_2.weight"] == (4096, 4096)
    assert shapes["model.language_model.layers.0.self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes["model.language_model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    assert shapes["lm_head.weight"] == (32064, 4096)
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.image_seq_length == 576 and config.text_config.num_attention_heads == 32
    assert config.vision_config.num_attention_heads == 16 and config.vision_feature_layer == -2
    assert config.text_config.max_position_embeddings == 4096
    total = sum(p.numel() for p in model.parameters())
    assert 0.7e9 < total < 0.75e9


@pytest.mark.slow
def test_skeleton_train_merge_export(tmp_path):
    run = tmp_path / "skeleton"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "llava15_7b_skeleton.yaml"),
           "--run-dir", str(run), "--stages", "prepare,train,merge", "--set", "train.max_steps=2",
           "--set", "train.grad_accum=1", "--set", "train.save_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"], check

    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages.common import load_base
    from pipeline.stages.merge import _check_batches, _logits

    ctx = StageContext(cfg=load_config(RunConfig, run / "config.yaml"), run_dir=run)
    base, processor = load_base(ctx)
    batches = _check_batches(ctx, processor, n=1)
    merged = LlavaForConditionalGeneration.from_pretrained(run / "merge" / "model")
    expected = _logits(merged, batches)
    del merged
    adapter = PeftModel.from_pretrained(base, run / "merge" / "peft_adapter")
    got = _logits(adapter, batches)
    worst = max(float((a - b).abs().max()) for a, b in zip(expected, got))
    assert worst <= check["tolerance"], f"PEFT adapter on the base differs from the merged model by {worst}"
