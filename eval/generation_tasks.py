"""One generation task on one model, as the harness (``eval.harness``) runs it for every model.

For caption, vqav2, gqa and conversations: the samples and the references in the official
scorer's format from decoded examples (`samples_and_references`), this rank's share generated
and the shards merged on rank 0 (`generate_and_score`), the merged results file validated
against its official schema (`results_file_check`, also applied to long-context results) and
scored by the task's official scorer (`score_predictions`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.generate import EvalSample
from eval.ranks import on_main, timing_record


def samples_and_references(task: str, examples: Sequence[Mapping[str, Any]]):
    """(EvalSamples, references in the scorer's format) of decoded eval examples. A conversation is asked its
    last answer, the earlier turns as context; its prompt is rendered by `eval.generate.sample_prompt` with the
    model's processor (the one renderer, as in training)."""
    if task == "caption":
        samples = [EvalSample(e["image_id"], e["image"]) for e in examples]
        refs = {e["image_id"]: list(e["captions"]) for e in examples}
        return samples, refs
    if task == "conversations":
        samples, refs = [], {}
        for e in examples:
            samples.append(EvalSample(str(e["id"]), list(e.get("images") or []),
                                      messages=tuple(e["messages"][:-1])))
            refs[str(e["id"])] = e["messages"][-1]["content"]
        return samples, refs
    samples = [EvalSample(e["question_id"], e["image"], e["question"]) for e in examples]
    if task == "vqav2":
        refs = [{k: e[k] for k in ("question_id", "answers", "question_type", "answer_type")} for e in examples]
    else:
        refs = {str(e["question_id"]): {k: e[k] for k in ("answer", "isBalanced", "types", "question")}
                for e in examples}
    return samples, refs


def score_predictions(task: str, refs: Any, predictions: Sequence[Mapping[str, Any]],
                      conversation_metric: str = "auto") -> dict[str, Any]:
    """The official scorer of `task` on official-format prediction records."""
    if task == "caption":
        from eval.caption_metrics import score_captions

        return score_captions(refs, {p["image_id"]: p["caption"] for p in predictions})
    if task == "vqav2":
        from eval.vqa_eval import score_vqa

        return score_vqa(refs, {p["question_id"]: p["answer"] for p in predictions})
    if task == "conversations":
        from eval.conversation_metrics import score_conversations

        return score_conversations(refs, {p["id"]: p["prediction"] for p in predictions}, conversation_metric)
    from eval.gqa_eval import score_gqa

    return score_gqa(refs, {p["questionId"]: p["prediction"] for p in predictions})


def generate_and_score(model, processor, task: str, examples: Sequence[Mapping[str, Any]], out_dir: Path,
                       batch_size: int, accelerator, label: str = "",
                       timing: dict[str, Any] | None = None, notes: list[str] | None = None,
                       conversation_metric: str = "auto", budget: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Generate this rank's share, merge and validate on rank 0, score. Returns the scores on rank 0, else None.

    `timing`, when given, receives the generation's wall time over all ranks (up to the barrier);
    `notes` (main process) receives why a results file is not in its official format, if it is not.
    `budget` is the task's generation budget (``eval.budget.resolve_budget``; default: the task's own); the
    scores' ``budget`` block says it and how many answers hit it.
    """
    from eval.budget import budget_block, resolve_budget
    from eval.generate import merge_prediction_shards, run_generation, sample_prompt, shard_budget_hits

    budget = dict(budget or resolve_budget(task, None, processor))
    samples, refs = samples_and_references(task, examples)
    shards = out_dir / f"{task}_shards"
    start = time.perf_counter()
    run_generation(model, processor, samples, task, shards, rank=accelerator.process_index,
                   world_size=accelerator.num_processes, batch_size=batch_size,
                   max_new_tokens=budget["max_new_tokens"], progress=accelerator.is_main_process,
                   desc=f"{label}{task}")
    accelerator.wait_for_everyone()
    if timing is not None:
        timing.update(timing_record(len(samples), time.perf_counter() - start))

    def merge_and_score() -> dict[str, Any]:
        path = out_dir / f"{task}_predictions.json"
        predictions = merge_prediction_shards(shards, task, path, world_size=accelerator.num_processes)
        hits = shard_budget_hits(shards, task, world_size=accelerator.num_processes)
        check = results_file_check(predictions, task, path, notes)
        scores = {**score_predictions(task, refs, predictions, conversation_metric), "results_file": check,
                  "budget": budget_block(budget, hits, [str(s.sample_id) for s in samples])}
        if task == "conversations":  # per sample: what was asked, what was expected, what came, how it scored
            from eval.predictions import write_jsonl_atomic

            answers = {str(p["id"]): p["prediction"] for p in predictions}
            write_jsonl_atomic(({"id": s.sample_id, "prompt": sample_prompt(task, s, processor), "reference": refs[str(s.sample_id)],
                                 "prediction": answers.get(str(s.sample_id), ""),
                                 "hit_budget": hits.get(str(s.sample_id), False),
                                 "scores": scores["per_sample"][str(s.sample_id)]} for s in samples),
                               out_dir / f"{task}_samples.jsonl")
        return scores

    return on_main(accelerator, merge_and_score)


def results_file_check(records: Sequence[Mapping[str, Any]], task: str, path: Path,
                       notes: list[str] | None = None) -> dict[str, Any]:
    """Validate a results file we wrote against its official schema (``eval.schemas``).

    A file that fails is still scored (our scorers match ids as strings, so e.g. string image ids of
    a user's own COCO-style data score fine) but marked: ``{"valid": false, "reason"}`` joins the task's
    scores, the report's table shows its scores as "(invalid file)", and `notes` says why."""
    from eval.errors import EvalInputError
    from eval.schemas import validate_results

    try:
        validate_results(records, task, source=str(path))
    except EvalInputError as err:
        if notes is not None:
            notes.append(f"{err} (scored, and marked invalid in the table: an official server would refuse it)")
        return {"file": Path(path).name, "valid": False, "reason": str(err)}
    return {"file": Path(path).name, "valid": True}
