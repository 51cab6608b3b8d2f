"""The eval stage: the adapted model (and its base) scored by ``eval.harness``.

Generation and scoring are apart (lmms-eval style): every rank writes a shard of
predictions, rank 0 merges them into `eval/{model}/{task}_predictions.json` (the official
results formats) and scores the file's contents against references read from the test shards
(faithful copies of the official records). Both the adapted and the base model are scored, so
the report shows what adaptation bought. ``structlora eval`` (pipeline/eval_command.py) runs
the same harness on any models.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.context import StageContext


def load_split(root: Path, task: str, split: str, max_samples: int | None = None, allow_remote: bool = False,
               verify: bool = True, on_damaged: str = "error") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(every example of `root/task/split`, capped at `max_samples`; its account: what the split holds,
    what was read, what was lost and why). The same on every rank: each reads the whole split.

    Every shard is checked against the manifest first (`verify`: sha256 too); a damaged one stops here
    with its name (`on_damaged="error"`) or is left out and counted (`"skip"`)."""
    from data.accounting import eval_account
    from data.errors import DataError
    from data.stream import EvalStream, ShardSource, without_markers
    from pipeline.errors import UserError

    path = Path(root) / task / split
    if not path.is_dir():
        raise UserError(f"no '{split}' shards for task '{task}' under {root} (expected {path}/)")
    source = ShardSource.from_dir(path, name=task, verify=verify, on_damaged=on_damaged)
    if source.excluded and not source.urls:
        raise DataError(f"{path}: {source.empty_reason}: nothing left to evaluate; prepare the split again")
    if not source.urls:
        raise UserError(f"{path}: the '{split}' split of task '{task}' holds no records (a small conversation file's "
                        "hash split can leave one empty: raise --test-fraction / --val-fraction, or give the split "
                        "its own file with --test / --val)")
    stream = EvalStream(source, rank=0, world_size=1, allow_remote=allow_remote)
    examples = without_markers(itertools.islice(stream, max_samples) if max_samples else stream)
    return examples, eval_account(task, split, source, stream.stats, len(examples), max_samples)


def load_examples(root: Path, task: str, split: str, max_samples: int | None = None,
                  allow_remote: bool = False, verify: bool = True, on_damaged: str = "error") -> list[dict[str, Any]]:
    """The examples of ``load_split`` alone (filler pools and other reads that are not scored)."""
    return load_split(root, task, split, max_samples, allow_remote, verify, on_damaged)[0]


def load_eval_examples(ctx: StageContext, task: str, split: str, max_samples: int | None,
                       accounts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``load_split`` on the run's shards, with the config's shard checks; the account goes into `accounts`."""
    from pipeline.stages.common import shards_root

    data = ctx.cfg.data
    examples, account = load_split(shards_root(ctx), task, split, max_samples, data.allow_remote,
                                   data.verify_shards, data.damaged_shards)
    if accounts is not None:
        accounts[task] = account
    return examples


def caption_filler_pool(examples: list[dict[str, Any]], exclude: list[Any]) -> list[str]:
    """Reference captions of images not in `exclude` (the long-context filler of DESIGN.md)."""
    from eval.long_context import filler_pool

    return filler_pool({e["image_id"]: list(e["captions"]) for e in examples}, exclude=exclude)


def classification_scores(model, processor, ctx: StageContext, device,
                          accounts: dict[str, Any] | None = None, split: str | None = None) -> dict[str, Any]:
    """Top-1 / top-5 accuracy on the eval split's (or `split`'s) classification shards."""
    from data.collate import ClassificationCollator
    from eval.classification import evaluate_classifier

    cfg = ctx.cfg
    examples = load_eval_examples(ctx, "classification", split or cfg.eval.split, cfg.eval.max_samples, accounts)
    collate, size = ClassificationCollator(processor), cfg.eval.batch_size
    batches = ({k: v.to(device) for k, v in collate(examples[i:i + size]).items()}
               for i in range(0, len(examples), size))
    return evaluate_classifier(model, batches, ks=(1, 5))


def stage_eval(ctx: StageContext, models: tuple[str, ...] | None = None, folder: str = "eval",
               split: str | None = None) -> dict[str, Any]:
    """Score the adapted model (and the base with `eval.compare_base`) on `eval.split` into run_dir/eval/.

    `structlora compare` also asks for other `models` ("adapted", "base"), another `split` (forgetting: the
    split the base model learned from) and another `folder` of the run directory."""
    from accelerate import Accelerator

    from eval.harness import (
        GENERATION_TASKS,
        LongContextSettings,
        ModelEntry,
        evaluate_models,
        sample_counts,
        write_outputs,
    )
    from eval.long_context import CAPTION_FILLER, NEUTRAL_FILLER
    from eval.plots import plot_diagnostics
    from eval.report import headline
    from pipeline.stages.common import load_adapted, load_base

    cfg, out = ctx.cfg, ctx.stage_dir(folder)
    split = split or cfg.eval.split
    acc = Accelerator(cpu=not torch.cuda.is_available())
    tasks = [t for t in cfg.eval.tasks if t in (*GENERATION_TASKS, "long_context", "test_loss")]
    accounts: dict[str, Any] = {}  # task -> what its split holds, what was scored, what was lost and why
    # test_loss alone (no generation, e.g. `structlora compare` on the loss): the answers of every trained task
    scored = [t for t in tasks if t in GENERATION_TASKS] or (
        [t for t, w in cfg.data.tasks.items() if w > 0 and t in GENERATION_TASKS] if "test_loss" in tasks else [])
    examples = {t: load_eval_examples(ctx, t, split, cfg.eval.max_samples, accounts) for t in scored}
    long_context = None
    if "long_context" in tasks:
        if "caption" not in examples:
            examples["caption"] = load_eval_examples(ctx, "caption", split, cfg.eval.max_samples, accounts)
        chosen = examples["caption"][: cfg.eval.long_context_samples]
        kinds = {"captions": ["captions"], "neutral": ["neutral"], "both": ["captions", "neutral"]}
        long_context = []
        for n, kind in enumerate(kinds[cfg.eval.long_context_filler]):
            if kind == "neutral":
                from data.long_context import neutral_filler

                pool, filler = neutral_filler(), NEUTRAL_FILLER
            else:
                pool = caption_filler_pool(load_eval_examples(ctx, "caption", "val", 200),
                                           [e["image_id"] for e in chosen])
                filler = CAPTION_FILLER
            long_context.append(LongContextSettings(
                samples=cfg.eval.long_context_samples, lengths=cfg.eval.long_context_lengths, pool=pool, scale=True,
                filler=filler, key="long_context" if n == 0 else f"long_context_{kind}"))
    plots: dict[str, Path] = {}

    def extra(model, processor, folder: Path) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if "classification" in cfg.eval.tasks and acc.is_main_process:
            with torch.no_grad():
                found["classification"] = classification_scores(model, processor, ctx, acc.device, accounts, split)
        diagnostics = getattr(model, "structlora_diagnostics", None)
        if callable(diagnostics) and acc.is_main_process:
            diag = diagnostics()
            plots.update(plot_diagnostics(diag, out, max_rank=cfg.adapter.rank))
            (out / "diagnostics.json").write_text(json.dumps(_jsonable(diag), indent=1, sort_keys=True))
        return found

    # one model on the device at a time: the adapted one, then (freed first) the base
    entries = {"adapted": ModelEntry("adapted", lambda: load_adapted(ctx), f"{ctx.run_dir}/train/final", extra),
               "base": ModelEntry("base", lambda: load_base(ctx), cfg.model.name_or_path or f"{ctx.run_dir}/base",
                                  extra)}
    names = models or (("adapted", "base") if cfg.eval.compare_base else ("adapted",))
    models = [entries[name] for name in names]
    results = evaluate_models(models, tasks, examples, out, acc, cfg.eval.batch_size, long_context,
                              conversation_metric=cfg.eval.conversation_metric, loss_max_length=cfg.data.max_length,
                              max_new_tokens=cfg.eval.max_new_tokens, answers_dir=answers_split(ctx, tasks))
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return {}
    paths = write_outputs(results, out, f"{Path(ctx.run_dir).name}: {cfg.adapter.method} on {cfg.data.source}",
                          reference="base" if len(models) > 1 and "base" in names else None, plots=plots,
                          samples={**sample_counts(tasks, examples, cfg.eval.long_context_samples),
                                   **{s.key: min(s.samples, len(examples["caption"])) for s in long_context or []}},
                          data={"eval": accounts, **_training_data(ctx)})
    acc.wait_for_everyone()
    return {"metrics": str(paths["metrics"]), "report": str(paths["report"]), "headline": headline(results.scores)}


def answers_split(ctx: StageContext, tasks: list[str] | None = None) -> Path | None:
    """The prepared training split of the conversations when `eval.max_new_tokens.conversations` is auto (and
    the conversations are evaluated, when `tasks` is given): its answers set the budget. None otherwise."""
    from pipeline.errors import UserError
    from pipeline.stages.common import shards_root

    if ctx.cfg.eval.max_new_tokens.get("conversations") != "auto" or (tasks is not None and "conversations" not in tasks):
        return None
    path = shards_root(ctx) / "conversations" / "train"
    if not (path / "manifest.json").is_file():
        raise UserError(f"eval.max_new_tokens.conversations: auto measures the training answers, and there is no "
                        f"prepared training split of the conversations ({path}/manifest.json); give a number")
    return path


def _training_data(ctx: StageContext) -> dict[str, Any]:
    """The base and train stages' data accounts (their summaries), for the run's report."""
    found = {}
    for stage, path in (("base", ctx.run_dir / "base" / "summary.json"),
                        ("train", ctx.run_dir / "train" / "final" / "summary.json")):
        if path.is_file():
            data = json.loads(path.read_text()).get("data")
            if data:
                found[stage] = data
    card = ctx.run_dir / "train" / "data_card.json"
    if card.is_file():
        found["card"] = json.loads(card.read_text())
    return found


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
