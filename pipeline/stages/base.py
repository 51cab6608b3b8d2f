"""The base stage: pretrain the tiny preset (all weights) on the world's base split, so that adaptation starts from
a pretrained model, as in real use (real configs load a pretrained model and skip it)."""

from __future__ import annotations

import json
import shutil
from typing import Any

from data.accounting import TrainAccount
from pipeline.context import StageContext
from pipeline.schema import AdapterConfig, TrainConfig
from pipeline.stages.batches import batch_iterator, data_summary, validation_batches
from pipeline.stages.common import (
    _dist,
    base_model_dir,
    num_classes,
    run_recipe,
    sources,
    vit_image_processor,
)


def stage_base(ctx: StageContext) -> dict[str, Any]:
    """Pretrain the tiny preset (all weights) on the world's base split, then save it."""
    from pipeline.models.hub import count_parameters
    from pipeline.stages.methods import attach_method

    cfg = ctx.cfg
    if not cfg.base.enabled:
        return {"skipped": "base.enabled is false"}
    tasks = cfg.base.tasks
    if cfg.model.arch == "vit":
        from pipeline.models.vit import build_vit, vit_for_pipeline

        model = build_vit(cfg.model, num_classes(ctx), seed=cfg.seed)
        model, processor = vit_for_pipeline(model) if cfg.model.vit_impl == "timm" else (model, vit_image_processor(cfg))
        tasks = {"classification": 1.0}
        frozen = []
    else:
        from pipeline.models.door import open_model
        from pipeline.models.plan import plan_for

        model, processor = open_model(cfg.model, seed=cfg.seed)
        frozen = plan_for(model, processor, AdapterConfig(method="full"), cfg.base.max_steps).frozen_modules
    adapted = attach_method(model, AdapterConfig(method="full"), [], [], cfg.base.max_steps, seed=cfg.seed,
                            frozen_modules=frozen)
    train_cfg = TrainConfig(max_steps=cfg.base.max_steps, batch_size=cfg.base.batch_size, lr=cfg.base.lr,
                            save_every=max(1, cfg.base.max_steps // 2), eval_every=cfg.base.max_steps,
                            log_every=20, seed=cfg.seed, keep_last=1)
    rank, world = _dist()
    train_src = sources(ctx, "base", tasks)
    val_lost: list = []
    val_src = sources(ctx, "val", {t: 1.0 for t in tasks}, val_lost)
    out = ctx.stage_dir("base")
    accounts = TrainAccount("base", train_src), TrainAccount("val", val_src + val_lost)
    recipe, result = run_recipe(
        adapted, train_cfg, out,
        lambda: batch_iterator(cfg, train_src, processor, train_cfg.batch_size, cfg.seed, rank, world, 4096,
                               account=accounts[0]),
        validation_batches(cfg, val_src, processor, cfg.train.batch_size, cfg.train.val_batches, accounts[1]))
    data = data_summary(recipe.accelerator, *accounts)
    if recipe.accelerator.is_main_process:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        recipe.accelerator.unwrap_model(recipe.model).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(base_model_dir(ctx), ignore_errors=True)
        tmp.rename(base_model_dir(ctx))
    recipe.accelerator.wait_for_everyone()
    summary = {"model": str(base_model_dir(ctx)), "parameters": count_parameters(model), "steps": result.steps,
               "final_train_loss": result.final_train_loss, "val_losses": result.val_losses,
               "seconds": round(result.seconds, 1), "data": data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
