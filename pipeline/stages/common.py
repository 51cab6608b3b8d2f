"""What the stages share: where the shards are, the models they open (the base model through the door, the ViT,
the adapted model), attaching the method, running a training recipe.

Each stage (one module each in this package: prepare, base, train, evaluate, merge, publish; `runner` runs them)
reads what earlier stages wrote in the run directory and returns a JSON-able dict of its outputs for the manifest:

    prepare/  world/ (shapes only) and shards/{task}/{split}/
    base/     model/ (tiny preset only: a pretrained base model with its processor)
    train/    checkpoints/, final/, metrics.jsonl, tensorboard/
    eval/     predictions, scores, plots, metrics.json, report.md
    merge/    model/ (merged transformers model), peft_adapter/
    publish/  registry entry
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.schema import RunConfig, TrainConfig
from pipeline.schema_model import ModelConfig

log = logging.getLogger("structlora.stages")


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
    from pipeline.models.quantize import compute_dtype, preset_key, saved_preset

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

    from pipeline.models.hub import resolve_pretrained
    from pipeline.models.vit import TimmClassifier, build_vit, load_vit, vit_for_pipeline

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
    from pipeline.stages.recipe import TrainRecipe

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


# --- train ------------------------------------------------------------------------------------


def final_dir(ctx: StageContext) -> Path:
    return ctx.run_dir / "train" / "final"


def planned_targets(ctx: StageContext, model, processor):
    """(target module names, full modules, frozen modules, StructLoRA config or None, notes) of the config's adapter
    on `model`: a VLM's from its own tower table (`pipeline.models.plan.plan_for`, which probes with the processor);
    a ViT's from `pipeline.models.vit_targets`."""
    cfg = ctx.cfg
    if cfg.model.arch != "vit":
        from pipeline.models.plan import plan_for

        plan = plan_for(model, processor, cfg.adapter, cfg.train.max_steps)
        return plan.target_names, plan.full_modules, plan.frozen_modules, plan.structlora_config, plan.notes
    from pipeline.models.vit_targets import full_module_names, structlora_config_for, target_module_names

    structlora_cfg = structlora_config_for(model, cfg.adapter, cfg.train.max_steps) \
        if cfg.adapter.method == "structlora" else None
    return target_module_names(model, cfg.adapter), full_module_names(model, cfg.adapter), [], structlora_cfg, []


def attach(ctx: StageContext, model, processor):
    """The config's method attached to `model` on its planned targets (`planned_targets`)."""
    from pipeline.stages.methods import attach_method

    cfg = ctx.cfg
    targets, full, frozen, structlora_cfg, notes = planned_targets(ctx, model, processor)
    adapted = attach_method(model, cfg.adapter, targets, full, cfg.train.max_steps, structlora_config=structlora_cfg,
                            seed=cfg.train.seed, frozen_modules=frozen)
    if notes:
        adapted.notes = notes  # what the tower table found: in the train summary
    return adapted


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
