"""The train stage: adapt the base model with the configured method on the training mix and keep the final state
(trainable weights, the method's own state, a summary with the data accounting)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from typing import Any

from data.accounting import TrainAccount
from pipeline.context import StageContext
from pipeline.stages.batches import batch_iterator, data_summary, validation_batches
from pipeline.stages.common import (
    _dist,
    attach,
    final_dir,
    load_base,
    run_recipe,
    shards_root,
    sources,
)

log = logging.getLogger("structlora.stages")


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
    if rank == 0:
        conversation_card(ctx, model, processor)
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
        from pipeline.models.plan import vlm_image_budget

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


def conversation_card(ctx: StageContext, model, processor) -> dict[str, Any] | None:
    """The data card of the conversations in the training mix, for this model (data.data_card): written to the
    train stage's folder (data_card.json / .md / .png), carried by the run's report, one line printed."""
    root = shards_root(ctx) / "conversations"
    if ctx.cfg.data.tasks.get("conversations", 0) <= 0 or ctx.cfg.model.arch == "vit" or not root.is_dir():
        return None
    from data.data_card import token_card, write_card
    from eval.long_context import context_length_of

    card = token_card(root, processor, ctx.cfg.data.max_length, context_length_of(model))
    write_card(card, ctx.stage_dir("train"))
    train = card["splits"].get("train")
    if train:
        hint = card.get("suggested", {})
        print(f"[train] data card: train samples p50 {train['tokens']['p50']:g} / p95 {train['tokens']['p95']:g} / "
              f"max {train['tokens']['max']:g} tokens ({train['measured']} of {train['records']} measured), "
              f"{train['over_max_length']} over data.max_length={ctx.cfg.data.max_length} ({train['split_into_rows']} "
              f"split, {train['dropped']} dropped); suggested max_length {hint.get('max_length')}, max_new_tokens "
              f"{hint.get('max_new_tokens')} ({ctx.stage_dir('train') / 'data_card.md'})")
    return card
