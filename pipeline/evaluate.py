"""The eval stage: generate predictions (official results format), score them, plot, report.

Generation and scoring are apart (lmms-eval style): every rank writes a shard of
predictions, rank 0 merges them into `eval/{model}/{task}_predictions.json` and scores the
file's contents against references read from the test shards (faithful copies of the
official records). Both the adapted and the base model are scored, so the report shows
what adaptation bought.
"""

from __future__ import annotations

import gc
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.runner import StageContext

QUESTION_TASKS = ("vqav2", "gqa")


def load_eval_examples(ctx: StageContext, task: str, split: str, max_samples: int | None) -> list[dict[str, Any]]:
    """Every example of a task's split (the same list on every rank), capped at `max_samples`."""
    from data.stream import EvalStream
    from pipeline.stages import sources

    (source,) = sources(ctx, split, {task: 1.0})
    stream = EvalStream(source, rank=0, world_size=1, allow_remote=ctx.cfg.data.allow_remote)
    return list(itertools.islice(stream, max_samples)) if max_samples else list(stream)


def _samples_and_references(task: str, examples: list[dict[str, Any]]):
    from eval.generate import EvalSample

    if task == "caption":
        samples = [EvalSample(e["image_id"], e["image"]) for e in examples]
        refs = {e["image_id"]: list(e["captions"]) for e in examples}
        return samples, refs
    samples = [EvalSample(e["question_id"], e["image"], e["question"]) for e in examples]
    if task == "vqav2":
        refs = [{k: e[k] for k in ("question_id", "answers", "question_type", "answer_type")} for e in examples]
    else:
        refs = {str(e["question_id"]): {k: e[k] for k in ("answer", "isBalanced", "types", "question")}
                for e in examples}
    return samples, refs


def _score(task: str, refs: Any, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    if task == "caption":
        from eval.caption_metrics import score_captions

        return score_captions(refs, {p["image_id"]: p["caption"] for p in predictions})
    if task == "vqav2":
        from eval.vqa_eval import score_vqa

        return score_vqa(refs, {p["question_id"]: p["answer"] for p in predictions})
    from eval.gqa_eval import score_gqa

    return score_gqa(refs, {p["questionId"]: p["prediction"] for p in predictions})


def generate_and_score(model, processor, task: str, examples: list[dict[str, Any]], out_dir: Path,
                       batch_size: int, accelerator) -> dict[str, Any] | None:
    """Generate this rank's share, merge on rank 0, score. Returns the scores on rank 0, else None."""
    from eval.generate import merge_prediction_shards, run_generation

    samples, refs = _samples_and_references(task, examples)
    shards = out_dir / f"{task}_shards"
    run_generation(model, processor, samples, task, shards, rank=accelerator.process_index,
                   world_size=accelerator.num_processes, batch_size=batch_size,
                   progress=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    predictions = merge_prediction_shards(shards, task, out_dir / f"{task}_predictions.json",
                                          world_size=accelerator.num_processes)
    return _score(task, refs, predictions)


def long_context_scores(model, processor, ctx: StageContext, examples: list[dict[str, Any]], batch_size: int,
                        accelerator) -> dict[str, Any] | None:
    """CIDEr per context-length bucket: every rank captions its share, rank 0 gathers and scores."""
    from eval.generate import EvalSample, shard_samples
    from eval.long_context import filler_pool, long_context_generations, scale_buckets, score_long_context

    cfg = ctx.cfg
    train_refs = {e["image_id"]: list(e["captions"]) for e in load_eval_examples(ctx, "caption", "val", 200)}
    samples = [EvalSample(e["image_id"], e["image"]) for e in examples]
    refs = {e["image_id"]: list(e["captions"]) for e in examples}
    pool = filler_pool(train_refs, exclude=list(refs))
    context = getattr(model.config, "text_config", model.config).max_position_embeddings
    buckets = scale_buckets(cfg.eval.long_context_lengths, context, min_length=1)
    mine = shard_samples(samples, accelerator.process_index, accelerator.num_processes)
    generations = long_context_generations(model, processor, mine, pool, buckets=buckets, batch_size=batch_size,
                                           meter_image=samples[0].image, progress=accelerator.is_main_process)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([generations])
    else:
        parts = [generations]
    if not accelerator.is_main_process:
        return None
    return score_long_context(parts, refs, context)


def classification_scores(model, processor, ctx: StageContext, device) -> dict[str, Any]:
    """Top-1 / top-5 accuracy on the eval split's classification shards."""
    from data.collate import ClassificationCollator
    from eval.classification import evaluate_classifier

    cfg = ctx.cfg
    examples = load_eval_examples(ctx, "classification", cfg.eval.split, cfg.eval.max_samples)
    collate, size = ClassificationCollator(processor), cfg.eval.batch_size
    batches = ({k: v.to(device) for k, v in collate(examples[i:i + size]).items()}
               for i in range(0, len(examples), size))
    return evaluate_classifier(model, batches, ks=(1, 5))


def stage_eval(ctx: StageContext) -> dict[str, Any]:
    from accelerate import Accelerator

    from eval.long_context import long_context_table, plot_long_context
    from eval.plots import plot_diagnostics
    from eval.report import write_report
    from pipeline.stages import load_adapted, load_base

    cfg, out = ctx.cfg, ctx.stage_dir("eval")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    gen_tasks = [t for t in cfg.eval.tasks if t in ("caption", *QUESTION_TASKS)]
    examples = {t: load_eval_examples(ctx, t, cfg.eval.split, cfg.eval.max_samples) for t in gen_tasks}
    if "long_context" in cfg.eval.tasks and "caption" not in examples:
        examples["caption"] = load_eval_examples(ctx, "caption", cfg.eval.split, cfg.eval.max_samples)

    # one model on the device at a time: the adapted one, then (freed first) the base
    loaders = {"adapted": load_adapted, **({"base": load_base} if cfg.eval.compare_base else {})}
    scores: dict[str, dict[str, Any]] = {name: {} for name in loaders}
    long_context: dict[str, dict[int, float]] = {}
    plots: dict[str, Path] = {}
    for name, loader in loaders.items():
        model, processor = loader(ctx)
        model.to(acc.device).eval()
        for task in gen_tasks:
            result = generate_and_score(model, processor, task, examples[task], out / name, cfg.eval.batch_size, acc)
            if result is not None:
                scores[name][task] = result
        if "classification" in cfg.eval.tasks and acc.is_main_process:
            with torch.no_grad():
                scores[name]["classification"] = classification_scores(model, processor, ctx, acc.device)
        if "long_context" in cfg.eval.tasks:
            lc = long_context_scores(model, processor, ctx, examples["caption"][: cfg.eval.long_context_samples],
                                     cfg.eval.batch_size, acc)
            if lc is not None:
                scores[name]["long_context"] = lc
                long_context[name] = {int(k): v["CIDEr"] for k, v in lc["buckets"].items()}
        diagnostics = getattr(model, "structlora_diagnostics", None)
        if callable(diagnostics) and acc.is_main_process:
            diag = diagnostics()
            plots.update(plot_diagnostics(diag, out, max_rank=cfg.adapter.rank))
            (out / "diagnostics.json").write_text(json.dumps(_jsonable(diag), indent=1, sort_keys=True))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        acc.wait_for_everyone()
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return {}
    if long_context:
        plots["long_context"] = plot_long_context(long_context, out / "long_context_cider.png")
        (out / "long_context.md").write_text(long_context_table(long_context) + "\n")
    paths = write_report(out, scores["adapted"], base=scores.get("base"), plots=plots,
                         title=f"{Path(ctx.run_dir).name}: {cfg.adapter.method} on {cfg.data.source}")
    acc.wait_for_everyone()
    return {"metrics": str(paths["metrics"]), "report": str(paths["report"]), "headline": headline(scores)}


def headline(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The few numbers a person looks at first, per model: CIDEr, VQA and GQA accuracy."""
    out: dict[str, dict[str, float]] = {}
    for name, tasks in scores.items():
        row: dict[str, float] = {}
        if "caption" in tasks:
            row["CIDEr"] = round(float(tasks["caption"]["metrics"]["CIDEr"]), 4)
        if "vqav2" in tasks:
            row["VQA"] = float(tasks["vqav2"]["overall"])
        if "gqa" in tasks:
            row["GQA"] = float(tasks["gqa"]["accuracy"])
        if "classification" in tasks:
            row["top1"] = float(tasks["classification"]["top1"])
        out[name] = row
    return out


def headline_from_file(path: Path) -> dict[str, dict[str, float]] | None:
    """`headline` of a metrics.json written by the eval stage, or None if there is none."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return headline({"adapted": data.get("metrics", {}), "base": data.get("base") or {}})


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
