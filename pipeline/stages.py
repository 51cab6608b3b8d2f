"""The stages of a run. Each reads what earlier stages wrote in the run directory and returns
a JSON-able dict of its outputs for the manifest. Base and train live here, with the loaders the others share;
prepare, eval, merge and publish have their own modules (prepare_stage, evaluate, merge, publish_stage).

    prepare/  world/ (shapes only) and shards/{task}/{split}/
    base/     model/ (tiny preset only: a pretrained base model with its processor)
    train/    checkpoints/, final/, metrics.jsonl, tensorboard/
    eval/     predictions, scores, plots, metrics.json, report.md
    merge/    model/ (merged transformers model), peft_adapter/
    publish/  registry entry
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from data.accounting import TrainAccount
from pipeline.batches import batch_iterator, data_summary, validation_batches  # noqa: F401 - the stages' names
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.prepare_stage import SPLIT_KEYS, stage_prepare  # noqa: F401 - the stages' names
from pipeline.schema import AdapterConfig, ModelConfig, RunConfig, TrainConfig

log = logging.getLogger("structlora.stages")



# --- prepare: pipeline/prepare_stage.py ------------------------------------------------------


def shards_root(ctx: StageContext) -> Path:
    if ctx.cfg.data.source == "shards":
        return Path(ctx.cfg.data.paths["root"])
    return ctx.run_dir / "prepare" / "shards"


def sources(ctx: StageContext, split: str, tasks: dict[str, float], left_out: list | None = None):
    """ShardSources of `split` for the tasks with a positive weight; a missing split says which. A source
    with no shard to read (an empty split of a small file, or every shard left out as damaged under
    `damaged_shards: skip`) is refused for training and left out of other splits, appended to `left_out`
    so that its damaged shards are still accounted."""
    from data.stream import ShardSource

    root = shards_root(ctx)
    out = []
    for task, weight in sorted(tasks.items()):
        if weight <= 0:
            continue
        path = root / task / split
        if not path.is_dir():
            raise UserError(f"no '{split}' shards for task '{task}' under {root}: run the prepare stage, "
                            "or remove the task from the config")
        source = ShardSource.from_dir(path, weight=weight, name=task, verify=ctx.cfg.data.verify_shards,
                                      on_damaged=ctx.cfg.data.damaged_shards)
        why = source.empty_reason  # e.g. a small conversation file whose hash split left no record for val
        if why:
            if split in ("train", "base"):
                raise UserError(f"{path}: no '{split}' shards to read for task '{task}': {why}")
            log.warning("'%s' split of task '%s' (%s): %s: left out", split, task, path, why)
            print(f"warning: the '{split}' split of task '{task}' is left out: {why}")
            if left_out is not None:
                left_out.append(source)
            continue
        out.append(source)
    return out


# --- models -----------------------------------------------------------------------------------


def base_model_dir(ctx: StageContext) -> Path:
    return ctx.run_dir / "base" / "model"


def load_base(ctx: StageContext):
    """(model, processor) the adaptation starts from, through the door (`pipeline.models.door.open_model`): the
    base stage's model, the preset (saved first when it is to load quantized), or the config's."""
    from pipeline.models.door import open_model
    from pipeline.quantize import compute_dtype, preset_key, saved_preset

    cfg = ctx.cfg
    if cfg.model.arch == "vit":
        return load_vit_base(ctx)
    fit = cfg.data.image_fit
    if cfg.model.preset is not None and (cfg.base.enabled or cfg.model.quantization != "none"):
        path = base_model_dir(ctx)
        if not cfg.base.enabled:  # the preset saved, to load quantized like any checkpoint
            saved_preset(path, lambda: open_model(cfg.model, seed=cfg.seed), preset_key(cfg))
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: base model missing: run the base stage first (--stages base)")
        return open_model(cfg.model, source=path, compute_dtype=compute_dtype(cfg), image_fit=fit)
    return open_model(cfg.model, compute_dtype=compute_dtype(cfg), seed=cfg.seed, image_fit=fit)


def num_classes(ctx: StageContext) -> int:
    """Class count of the classification shards (their manifest lists the class names)."""
    manifest = shards_root(ctx) / "classification" / "train" / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{manifest}: no classification shards: run the prepare stage first")
    return len(json.loads(manifest.read_text())["classes"])


def vit_image_processor(cfg: RunConfig):
    from transformers import ViTImageProcessor

    size = cfg.model.tiny.image_size
    return ViTImageProcessor(size={"height": size, "width": size}, do_resize=True)


def load_vit_base(ctx: StageContext):
    """(classifier, image processor): the base stage's tiny ViT, a preset, or a loaded checkpoint;
    transformers' ViTForImageClassification, or a timm ViT (`model.vit_impl: timm`) wrapped in
    TimmClassifier with timm's own preprocessing."""
    from transformers import AutoImageProcessor

    from pipeline.backbones import TimmClassifier, build_vit, load_vit, resolve_pretrained, vit_for_pipeline

    cfg = ctx.cfg
    timm = cfg.model.vit_impl == "timm"
    if cfg.model.preset is None:
        model = load_vit(cfg.model, num_classes(ctx))
        if timm:
            return vit_for_pipeline(model)
        return model, AutoImageProcessor.from_pretrained(resolve_pretrained(cfg.model.name_or_path,
                                                                            cfg.model.revision))
    path = base_model_dir(ctx)
    if cfg.base.enabled:
        if not any((path / name).is_file() for name in ("config.json", "model.safetensors")):
            raise UserError(f"{path}: base model missing: run the base stage first (--stages base)")
        if timm:
            return vit_for_pipeline(TimmClassifier.from_pretrained(path))
        return load_vit(ModelConfig(arch="vit", name_or_path=str(path))), AutoImageProcessor.from_pretrained(path)
    model = build_vit(cfg.model, num_classes(ctx), seed=cfg.seed)
    return vit_for_pipeline(model) if timm else (model, vit_image_processor(cfg))


# --- batches: pipeline/batches.py (the streams, their skip accounting) ------------------------


def run_recipe(adapted, train_cfg: TrainConfig, out_dir: Path, make_batches, val_batches):
    from pipeline.train import TrainRecipe

    recipe = TrainRecipe(adapted, train_cfg, out_dir, make_batches, val_batches)
    recipe.setup()
    try:
        result = recipe.train()
    finally:
        recipe.cleanup()
    return recipe, result


def _dist() -> tuple[int, int]:
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


# --- base -------------------------------------------------------------------------------------


def stage_base(ctx: StageContext) -> dict[str, Any]:
    """Pretrain the tiny preset (all weights) on the world's base split, then save it."""
    from pipeline.backbones import count_parameters
    from pipeline.methods import attach_method

    cfg = ctx.cfg
    if not cfg.base.enabled:
        return {"skipped": "base.enabled is false"}
    tasks = cfg.base.tasks
    if cfg.model.arch == "vit":
        from pipeline.backbones import build_vit, vit_for_pipeline

        model = build_vit(cfg.model, num_classes(ctx), seed=cfg.seed)
        model, processor = vit_for_pipeline(model) if cfg.model.vit_impl == "timm" else (model, vit_image_processor(cfg))
        tasks = {"classification": 1.0}
        from pipeline.towers import unused_modules

        frozen = unused_modules(model)
    else:
        from pipeline.models.door import open_model
        from pipeline.vlm import plan_for

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


# --- train ------------------------------------------------------------------------------------


def final_dir(ctx: StageContext) -> Path:
    return ctx.run_dir / "train" / "final"


def attach(ctx: StageContext, model, processor=None):
    """The config's method attached to `model` on the targets the towers describe (a VLM: the tower table of the
    model itself, `pipeline.vlm.plan_for`, which needs the processor for its probe; a ViT: pipeline.towers)."""
    from pipeline.methods import attach_method
    from pipeline.towers import full_module_names, structlora_config_for, target_module_names, unused_modules

    cfg = ctx.cfg
    if cfg.model.arch != "vit":
        from pipeline.vlm import plan_for

        plan = plan_for(model, processor, cfg.adapter, cfg.train.max_steps)
        adapted = attach_method(model, cfg.adapter, plan.target_names, plan.full_modules, cfg.train.max_steps,
                                structlora_config=plan.structlora_config, seed=cfg.train.seed,
                                frozen_modules=plan.frozen_modules)
        adapted.notes = plan.notes  # what the tower table found: in the train summary
        return adapted
    targets = target_module_names(model, cfg.model, cfg.adapter)
    structlora_cfg = structlora_config_for(model, cfg.model, cfg.adapter, cfg.train.max_steps) \
        if cfg.adapter.method == "structlora" else None
    return attach_method(model, cfg.adapter, targets, full_module_names(model, cfg.adapter), cfg.train.max_steps,
                         structlora_config=structlora_cfg, seed=cfg.train.seed, frozen_modules=unused_modules(model))


def stage_train(ctx: StageContext) -> dict[str, Any]:
    """Adapt the base model with the configured method on the training mix; keep the final state."""
    from safetensors.torch import save_file

    cfg = ctx.cfg
    model, processor = load_base(ctx)
    adapted = attach(ctx, model, processor)
    rank, world = _dist()
    train_src = sources(ctx, "train", cfg.data.tasks)
    val_lost: list = []
    val_src = sources(ctx, "val", cfg.data.tasks, val_lost)
    image_tokens = check_image_budget(ctx, processor)
    # auto: text-only conversation rows can leave the vision adapters without gradients on a rank
    unused = cfg.train.find_unused_parameters
    train_cfg = dataclasses.replace(cfg.train, find_unused_parameters=cfg.data.tasks.get("conversations", 0) > 0
                                    if unused is None else unused)
    out = ctx.stage_dir("train")
    epoch_length = cfg.train.batch_size * cfg.train.grad_accum * max(50, cfg.train.max_steps // 4)
    accounts = TrainAccount("train", train_src), TrainAccount("val", val_src + val_lost)
    recipe, result = run_recipe(
        adapted, train_cfg, out,
        lambda: batch_iterator(cfg, train_src, processor, cfg.train.batch_size, cfg.train.seed, rank, world,
                               epoch_length, log_partition=out / f"shards.rank{rank}.json",
                               fraction=cfg.train.data_fraction, account=accounts[0], long_context=True),
        validation_batches(cfg, val_src, processor, cfg.train.batch_size, cfg.train.val_batches, accounts[1]))
    data = data_summary(recipe.accelerator, *accounts)
    trainable = recipe._gathered_trainable_state()
    checksums = recipe.rank_checksums()  # a collective: every rank takes part
    if recipe.accelerator.is_main_process:
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if adapted.method == "structlora":
            adapted.handle.save_training_state(tmp / "method_state")
        summary = {"method": adapted.method, "trainable_parameters": result.trainable_parameters,
                   "steps": result.steps, "final_train_loss": result.final_train_loss,
                   "val_losses": result.val_losses, "seconds": round(result.seconds, 1),
                   "resumed_from": result.resumed_from, "world_size": world,
                   "rank_checksums": checksums, "data": data}
        if getattr(adapted, "notes", None):
            summary["adapter_notes"] = adapted.notes
        if image_tokens:
            summary["image_tokens"] = image_tokens  # per task: its first image, as the processor expands it
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(final_dir(ctx), ignore_errors=True)
        tmp.rename(final_dir(ctx))
    recipe.accelerator.wait_for_everyone()
    return json.loads((final_dir(ctx) / "summary.json").read_text())


def check_image_budget(ctx: StageContext, processor) -> dict[str, int]:
    """Before training: do the conversation samples with the most images fit `data.max_length`? Their image
    tokens alone are never cut, so a sample that cannot fit is dropped (and counted); say so now. For a VLM, also
    each task's first image as the family's processor expands it (returned)."""
    counts: dict[str, int] = {}
    if ctx.cfg.model.arch != "vit":
        from pipeline.vlm import vlm_image_budget

        counts = vlm_image_budget(ctx, processor, sources(ctx, "train", ctx.cfg.data.tasks))
    manifest = shards_root(ctx) / "conversations" / "train" / "manifest.json"
    if ctx.cfg.data.tasks.get("conversations", 0) <= 0 or not manifest.is_file() or ctx.cfg.model.arch == "vit":
        return counts
    most = int(json.loads(manifest.read_text()).get("max_images", 0))
    if most == 0:
        return counts
    from data.chat_collate import make_collator

    # a real image of the data where one was measured (any-res / dynamic resolution: larger images, more tokens)
    per_image = counts.get("conversations") or make_collator(processor, max_length=ctx.cfg.data.max_length).image_tokens()
    if most * per_image >= ctx.cfg.data.max_length:
        line = (f"conversations: a training sample has {most} images = {most * per_image} image tokens, not below "
                f"data.max_length={ctx.cfg.data.max_length}: such samples cannot fit and will be dropped (counted "
                "as over-long examples); raise data.max_length")
        log.warning(line)
        print(f"warning: {line}")
    return counts


def load_adapted_handle(ctx: StageContext):
    """(AdaptedModel, processor): the base model with the trained method state loaded, in eval mode."""
    from safetensors.torch import load_file

    path = final_dir(ctx)
    if not (path / "trainable.safetensors").is_file():
        raise UserError(f"{path}: no trained adapter: run the train stage first (--stages train)")
    model, processor = load_base(ctx)
    adapted = attach(ctx, model, processor)
    adapted.load_trainable_state_dict(load_file(str(path / "trainable.safetensors")))
    if adapted.method == "structlora" and (path / "method_state").is_dir():
        adapted.handle.load_training_state(path / "method_state", load_parameters=False)
    adapted.model.eval()
    return adapted, processor


def load_adapted(ctx: StageContext):
    """(model, processor) of the adapted model for generation; StructLoRA diagnostics ride along."""
    adapted, processor = load_adapted_handle(ctx)
    model = adapted.model
    if adapted.method == "structlora":
        model.structlora_diagnostics = adapted.handle.diagnostics
    return model, processor


# --- publish: pipeline/publish_stage.py --------------------------------------------------------
