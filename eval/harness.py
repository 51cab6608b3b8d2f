"""Score one or more models on exactly the same samples: the one implementation behind the
pipeline's eval stage and ``structlora eval``.

For each model in turn (one on the device at a time: loaded, scored, freed), every rank
generates its strided share of each task's samples with batched, left-padded, KV-cached greedy
decoding and writes a shard; rank 0 merges the shards into the task's official results file,
validates it against the official schema and scores it with the official scorers (one task on
one model: ``eval.generation_tasks``). The long-context captioning task captions the same
images at growing prompt lengths, every rank its share, and rank 0 scores CIDEr per bucket. Rank 0 then compares every model with a
reference model (paired bootstrap over items), plots CIDEr against context length with one
line per model and writes ``metrics.json`` and ``report.md``.

Output layout (``out``)::

    {model}/caption_predictions.json        COCO caption results  [{"image_id", "caption"}]
    {model}/vqav2_predictions.json          VQA results (EvalAI)  [{"question_id", "answer"}]
    {model}/gqa_predictions.json            GQA eval.py           [{"questionId", "prediction"}]
    {model}/long_context_{tokens}_predictions.json   COCO caption results per bucket
    long_context_cider.png, long_context.md, metrics.json, report.md
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.budget import check_budgets, resolve_budget
from eval.generate import EvalSample
from eval.generation_tasks import generate_and_score, results_file_check
from eval.long_context import context_length_of, plan_for_model
from eval.ranks import on_main, timing_record  # noqa: F401 - on_main is also the stages' (pipeline.stages.runner)

log = logging.getLogger("structlora.eval")

GENERATION_TASKS = ("caption", "vqav2", "gqa", "conversations")
TASKS = (*GENERATION_TASKS, "long_context", "test_loss")


@dataclass
class ModelEntry:
    """A model to score.

    Attributes:
        name: its column in the report and its folder under ``out``.
        load: returns ``(model, processor)``; called on every rank, once.
        source: where it came from (a hub id, a folder, a run), for the report.
        extra: optional per-model work after generation (classification, diagnostics): called
            on every rank with ``(model, processor, folder)``; the blocks it returns (on the main
            process) join the model's scores.
    """

    name: str
    load: Callable[[], tuple[Any, Any]]
    source: str = ""
    extra: Callable[[Any, Any, Path], dict[str, Any]] | None = None


@dataclass
class LongContextSettings:
    """Long-context captioning: which images, which lengths, what fills the context.

    Attributes:
        samples: how many of the caption samples are captioned at every length.
        lengths: target prompt lengths in tokens (image tokens included).
        scale: scale `lengths` down to the first model's context when they do not fit it
            (the pipeline's tiny preset); otherwise a bucket that does not fit is skipped.
        pool: filler texts, one per line in the prompt (never the evaluated images' captions).
        filler: what the pool is, for the report.
        key: where the scores go (the task's block in metrics, the predictions' file names): `long_context`, or
            `long_context_<kind>` for a second filler kind scored beside it (e.g. `long_context_neutral`).
    """

    samples: int
    lengths: Sequence[int]
    pool: Sequence[str]
    scale: bool = True
    filler: str = ""
    key: str = "long_context"

    @property
    def kind(self) -> str:
        """'' for `long_context`, else what follows `long_context_` (a label for plots and tables)."""
        return self.key.removeprefix("long_context").lstrip("_")


def _settings_list(long_context) -> list[LongContextSettings]:
    if long_context is None:
        return []
    return [long_context] if isinstance(long_context, LongContextSettings) else list(long_context)


@dataclass
class EvalResults:
    """What ``evaluate_models`` found (filled on the main process; empty elsewhere)."""

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    long_context: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # model -> task -> {"samples", "seconds", "samples_per_second"}: generation on all ranks, scoring excluded
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def long_context_scores(model, processor, examples: Sequence[Mapping[str, Any]], settings: LongContextSettings,
                        buckets: Sequence[int], skipped: Mapping[int, str], batch_size: int, accelerator,
                        out_dir: Path, label: str = "", timing: dict[str, Any] | None = None,
                        notes: list[str] | None = None) -> dict[str, Any] | None:
    """CIDEr per bucket: every rank captions its share of `examples` at each of `buckets`, rank 0
    gathers, writes a results file per bucket and scores. Returns the scores on rank 0, else None."""
    from eval.generate import shard_samples
    from eval.long_context import long_context_generations, score_long_context
    from eval.predictions import write_json_atomic

    samples = [EvalSample(e["image_id"], e["image"]) for e in examples]
    refs = {e["image_id"]: list(e["captions"]) for e in examples}
    mine = shard_samples(samples, accelerator.process_index, accelerator.num_processes)
    start = time.perf_counter()
    generations = long_context_generations(model, processor, mine, settings.pool, buckets=buckets,
                                           batch_size=batch_size, meter_image=samples[0].image,
                                           progress=accelerator.is_main_process, label=label) if buckets else {}
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([generations])
    else:
        parts = [generations]
    if timing is not None:
        timing.update(timing_record(len(samples) * len(buckets), time.perf_counter() - start))

    def write_and_score() -> dict[str, Any]:
        checks = {}
        for target in sorted({t for g in parts for t in g}):
            records = sorted((r for g in parts for r in g.get(target, {}).get("records", [])),
                             key=lambda r: (0, r["image_id"]) if isinstance(r["image_id"], int)
                             else (1, str(r["image_id"])))
            path = write_json_atomic(records, out_dir / f"{settings.key}_{target}_predictions.json")
            checks[target] = results_file_check(records, "caption", path, notes)  # COCO caption results, per bucket
        scores = score_long_context(parts, refs, context_length_of(model), skipped=skipped,
                                    filler=settings.filler or "filler texts")
        for target, check in checks.items():
            scores["buckets"][target]["results_file"] = check
        return scores

    return on_main(accelerator, write_and_score)


def sample_counts(tasks: Sequence[str], examples: Mapping[str, Sequence[Any]], long_context_samples: int) -> dict[str, int]:
    """Samples per requested task (long_context: images, each captioned at every length)."""
    counts = {t: len(examples[t]) for t in tasks if t in examples}
    if "long_context" in tasks:
        counts["long_context"] = min(long_context_samples, len(examples.get("caption", [])))
    return counts


def loss_tasks(tasks: Sequence[str], examples: Mapping[str, Sequence[Any]]) -> list[str]:
    """Whose answers `test_loss` scores: the generation tasks asked for, else (test_loss alone: a loss-only
    evaluation, no generation) every task whose samples were loaded."""
    return [t for t in tasks if t in GENERATION_TASKS] or [t for t in examples if t in GENERATION_TASKS and examples[t]]


def check_inputs(tasks: Sequence[str], examples: Mapping[str, Sequence[Any]],
                 long_context: LongContextSettings | Sequence[LongContextSettings] | None) -> None:
    """Refuse, before any model is loaded, what could only fail after generating: a task without samples, long-context captioning without images, filler or lengths."""
    from eval.errors import EvalInputError

    for task in tasks:
        if task in GENERATION_TASKS and not examples.get(task):
            raise EvalInputError(f"task '{task}' has no samples to evaluate")
    if "test_loss" in tasks and not loss_tasks(tasks, examples):
        raise EvalInputError("task 'test_loss' scores the answers of other tasks: ask for at least one of "
                             f"{', '.join(GENERATION_TASKS)} too, or load their samples")
    if "long_context" in tasks:
        if not _settings_list(long_context):
            raise EvalInputError("task 'long_context' needs its settings (images, lengths, filler)")
        for settings in _settings_list(long_context):
            if settings.samples < 1 or not examples.get("caption"):
                raise EvalInputError(f"task '{settings.key}' has no images to caption (caption samples and "
                                     "long-context samples must both be at least 1)")
            if not settings.pool:
                raise EvalInputError(f"task '{settings.key}' has no filler texts")


def evaluate_models(models: Sequence[ModelEntry], tasks: Sequence[str],
                    examples: Mapping[str, Sequence[Mapping[str, Any]]], out: Path, accelerator,
                    batch_size: int = 8,
                    long_context: LongContextSettings | Sequence[LongContextSettings] | None = None,
                    say: Callable[[str], None] = print, conversation_metric: str = "auto",
                    loss_max_length: int = 4096, max_new_tokens: Mapping[str, int | str] | None = None,
                    answers_dir: Path | None = None) -> EvalResults:
    """Score every model of `models` on the same `examples` (the same list on every rank).

    Args:
        tasks: any of caption, vqav2, gqa, conversations, long_context (long_context captions
            ``examples["caption"]``, once per `long_context` settings: several filler kinds side by side).
        conversation_metric: the conversations task's headline (``eval.conversation_metrics``).
        loss_max_length: the token limit of the rows `test_loss` scores (the training collator's rule).
        max_new_tokens: generation budget per task (``eval.budget``: tokens, or `auto` for conversations; a task
            not named keeps data.prompts' budget); `auto` is measured per model, in its own tokens, on the
            training answers of `answers_dir` (a prepared conversations split).
        examples: task -> decoded examples (``load_eval_examples``).
        say: where the main process prints what a user should see (skipped buckets).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {names}")
    check_inputs(tasks, examples, long_context)
    max_new_tokens = check_budgets(max_new_tokens or {}, "max_new_tokens")
    if "conversations" in tasks and max_new_tokens.get("conversations") == "auto" and answers_dir is None:
        from eval.errors import EvalInputError

        raise EvalInputError("max_new_tokens conversations=auto: no training split of the conversations to measure "
                             "its answers on")
    main = accelerator.is_main_process
    results = EvalResults(sources={m.name: m.source for m in models})
    plans: dict[str, tuple[list[int], dict[int, str]]] = {}  # settings key -> the first model's buckets, skips
    for entry in models:
        model, processor = entry.load()
        model.to(accelerator.device).eval()
        folder = Path(out) / entry.name
        label = f"{entry.name}: " if len(models) > 1 else ""
        scores: dict[str, Any] = {}
        timings = results.timings.setdefault(entry.name, {}) if main else {}
        for task in (t for t in tasks if t in GENERATION_TASKS):
            budget = resolve_budget(task, max_new_tokens, processor, model, answers_dir)
            result = generate_and_score(model, processor, task, examples[task], folder, batch_size, accelerator,
                                        label, timings.setdefault(task, {}), results.notes if main else None,
                                        conversation_metric, budget)
            if result is not None:
                scores[task] = result
                if task == "conversations" and entry.name == models[0].name:
                    results.notes.append(f"conversations: the headline is {result['headline']} "
                                         f"({result['headline_reason']}); every metric is in the table")
        if "test_loss" in tasks:
            from eval.test_loss import test_loss_scores

            block = test_loss_scores(model, processor, {t: examples[t] for t in loss_tasks(tasks, examples)},
                                     batch_size, accelerator, loss_max_length, timings.setdefault("test_loss", {}))
            if block is not None:
                scores["test_loss"] = block
        for n, settings in enumerate(_settings_list(long_context) if "long_context" in tasks else []):
            # buckets and their notes are said once, for the first filler kind (the others use the same lengths)
            lc = _long_context_for(entry, models[0].name, model, processor, examples, settings, plans, batch_size,
                                   accelerator, folder, label, timings, results, main and n == 0, say)
            if lc is not None:
                scores[settings.key] = lc
                line = entry.name if not settings.kind else f"{entry.name} ({settings.kind})"
                results.long_context[line] = {int(k): v["CIDEr"] for k, v in lc["buckets"].items()}
        if entry.extra is not None:
            scores.update(entry.extra(model, processor, folder) or {})
        if main:
            results.scores[entry.name] = scores
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        accelerator.wait_for_everyone()
    return results


def _long_context_for(entry: ModelEntry, first: str, model, processor, examples, settings: LongContextSettings,
                      plans: dict[str, tuple[list[int], dict[int, str]]], batch_size: int, accelerator, folder: Path,
                      label: str, timings: dict, results: EvalResults, announce: bool,
                      say: Callable[[str], None]) -> dict[str, Any] | None:
    """One model's long-context captioning with one filler kind: buckets planned on the first model, then kept."""
    chosen = list(examples["caption"][: settings.samples])
    fixed, planned = plans.get(settings.key, (None, {}))
    buckets, skipped = plan_for_model(model, processor, chosen[0]["image"], settings.lengths, settings.scale, fixed)
    if fixed is None:  # the first model fixes the buckets every model is scored at
        planned = {b: f"{r} (for every model: buckets are planned on {entry.name})" for b, r in skipped.items()}
        plans[settings.key] = (buckets, planned)
        asked = sorted(int(n) for n in settings.lengths)
        if announce and settings.scale and buckets and buckets != [n for n in asked if n not in skipped]:
            note = (f"long-context lengths {asked} scaled to {buckets} to fit the "
                    f"{context_length_of(model)}-position context of {entry.name}")
            say(f"[eval] {note}")
            results.notes.append(note)
        skipped = dict(planned)
    else:
        skipped = {**planned, **skipped}
    if announce:
        for bucket, reason in skipped.items():
            if entry.name == first or bucket not in planned:
                note = f"{entry.name}: long-context bucket {bucket} skipped: {reason}"
                say(f"[eval] {note}")
                results.notes.append(note)
    return long_context_scores(model, processor, chosen, settings, buckets, skipped, batch_size, accelerator,
                               folder, label, timings.setdefault(settings.key, {}),
                               results.notes if accelerator.is_main_process else None)


def write_outputs(results: EvalResults, out: Path, title: str, reference: str | None,
                  plots: Mapping[str, Path] | None = None, samples: Mapping[str, int] | None = None,
                  compare: bool = True, data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """On the main process: the long-context plot and table, differences against `reference`,
    ``metrics.json`` and ``report.md``. Returns the paths written.

    `data`: what the scored splits (``{"eval": {task: account}}``, ``data.accounting.eval_account``) and,
    for a run, the training streams (``{"train": ..., "base": ...}``) read and lost; a loss is said in the
    report's first lines."""
    from eval.compare import compare_to_reference
    from eval.long_context import long_context_table, plot_long_context
    from eval.report import write_comparison

    out = Path(out)
    plots = dict(plots or {})
    if results.long_context:
        plots["long_context"] = plot_long_context(results.long_context, out / "long_context_cider.png")
        (out / "long_context.md").write_text(long_context_table(results.long_context) + "\n")
    differences = compare_to_reference(results.scores, reference) \
        if compare and reference is not None and len(results.scores) > 1 else {}
    return write_comparison(out, results.scores, reference, plots, title, differences, results.sources,
                            samples, results.notes, timings=results.timings, data=data)
