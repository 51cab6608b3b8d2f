"""Every method of the recipe, on shapes shards streamed from disk: validation loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import apply_overrides, from_dict, read_yaml
from pipeline.context import StageContext
from pipeline.schema import RunConfig
from pipeline.stages.batches import batch_iterator, validation_batches
from pipeline.stages.common import attach, load_base, sources
from pipeline.stages.prepare import stage_prepare
from pipeline.stages.recipe import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.shapes.images=120", "data.shard_size=20", "base.enabled=false", "model.tiny.vision_layers=2",
             "model.tiny.text_layers=2", "adapter.rank=4", "adapter.alpha=8", "adapter.vera_rank=64",
             "train.batch_size=8", "train.max_steps=30", "train.lr=5e-3", "train.warmup_ratio=0.0",
             "train.eval_every=1000", "train.save_every=1000", "train.log_every=10"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = apply_overrides(read_yaml(ROOT / "configs" / "smoke.yaml"), OVERRIDES, RunConfig)
    cfg = from_dict(RunConfig, raw, source="smoke.yaml")
    ctx = StageContext(cfg=cfg, run_dir=tmp_path_factory.mktemp("run"))
    stage_prepare(ctx)
    return ctx


@pytest.mark.parametrize("method", ["structlora", "lora", "dora", "adalora", "vera"])
def test_validation_loss_falls(method, prepared, tmp_path):
    ctx = prepared
    ctx.cfg.adapter.method = method
    model, processor = load_base(ctx)
    adapted = attach(ctx, model, processor)
    train_src = sources(ctx, "train", ctx.cfg.data.tasks)
    val = validation_batches(ctx.cfg, sources(ctx, "val", ctx.cfg.data.tasks), processor, 8, max_batches=2)
    recipe = TrainRecipe(adapted, ctx.cfg.train, tmp_path,
                         lambda: batch_iterator(ctx.cfg, train_src, processor, 8, 0, 0, 1, 8 * 40), val)
    recipe.setup()
    before = recipe.validate()
    recipe.train()
    after = recipe.validate()
    recipe.cleanup()
    assert after < 0.98 * before, (method, before, after)  # VeRA and AdaLoRA learn slowest: ~3-4% here
