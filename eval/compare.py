"""Paired comparisons of models scored on the same samples: differences with bootstrap intervals.

Every headline score here is a mean of per-item scores, so a difference between two models
is the mean of per-item differences over the items both were scored on:

- captions: CIDEr-D per image (pycocoevalcap's corpus CIDEr is the mean of its per-image
  scores; its document frequencies come from the references alone, so they are the same for
  every model scored on the same images);
- VQAv2: the official per-question accuracy (percent);
- GQA: exact match per balanced question (0 / 100);
- long-context captioning: CIDEr-D per image, per context-length bucket;
- conversations: the headline's per-answer score (exact match, token F1, ANLS, CIDEr-D: the corpus CIDEr is
  their mean), except corpus BLEU-4, which is not a mean of per-answer scores: its difference is of the two
  corpus values, and each bootstrap resample recomputes both from the resampled answers' n-gram counts
  (clipped matches and totals per n, hypothesis and closest reference lengths: what pycocoevalcap sums).

The interval is a paired percentile bootstrap over items (the same resampled items for both
models), with a fixed seed so that a report is reproducible. It treats the items as the
sample and the references (and, for CIDEr, the document frequencies) as fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000


def item_scores(task: str, block: Mapping[str, Any]) -> dict[str, float]:
    """Per-item scores (str id -> value, on the headline's scale) of a task's score block."""
    if task == "caption":
        return {str(k): float(v["CIDEr"]) for k, v in block.get("per_image", {}).items() if "CIDEr" in v}
    if task == "vqav2":
        return {str(k): float(v) for k, v in block.get("perQuestion", {}).items()}
    if task == "gqa":
        return {str(k): 100.0 * float(v) for k, v in block.get("perQuestion", {}).items()}
    if task == "conversations":  # the block's headline metric, per sample (bleu4: the sentence BLEU-4)
        from eval.conversation_metrics import PER_SAMPLE

        name = PER_SAMPLE.get(block["headline"], block["headline"])
        return {str(k): float(v[name]) for k, v in block.get("per_sample", {}).items()}
    if task == "test_loss":  # each example's mean token loss, over every task scored ("task/id")
        return {f"{t}/{k}": float(v) for t, b in block.items() if isinstance(b, Mapping)
                for k, v in b.get("per_item", {}).items()}
    raise ValueError(f"no per-item scores for task {task!r}")


def paired_bootstrap(reference: Mapping[str, float], other: Mapping[str, float],
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean of other - reference over the items both have, with a paired percentile bootstrap interval.

    Returns ``{"difference", "low", "high", "items", "level", "resamples"}``; with no common
    item the difference and interval are None.
    """
    common = sorted(set(reference) & set(other))
    out: dict[str, Any] = {"items": len(common), "level": level, "resamples": resamples}
    if not common:
        return {**out, "difference": None, "low": None, "high": None}
    diffs = np.array([other[k] - reference[k] for k in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(diffs))  # bounded memory for large test sets
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(diffs), size=(stop - start, len(diffs)))
        means[start:stop] = diffs[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {**out, "difference": float(diffs.mean()), "low": float(low), "high": float(high)}


def paired_bootstrap_bleu4(reference: Mapping[str, Sequence[int]], other: Mapping[str, Sequence[int]],
                           resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Corpus BLEU-4 (x100) of other - reference over the items both have (id -> `eval.bleu_corpus` counts),
    with a paired percentile bootstrap interval: each resample draws items (the same for both models) and
    recomputes both corpus values from the drawn items' summed counts. Same keys as `paired_bootstrap`, and
    ``statistic``: "corpus"."""
    from eval.bleu_corpus import corpus_bleu4

    common = sorted(set(reference) & set(other))
    out: dict[str, Any] = {"items": len(common), "level": level, "resamples": resamples, "statistic": "corpus"}
    if not common:
        return {**out, "difference": None, "low": None, "high": None}
    ours = np.array([other[k] for k in common], dtype=np.float64)
    theirs = np.array([reference[k] for k in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, 200_000 // len(common))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(common), size=(stop - start, len(common)))
        diffs[start:stop] = 100.0 * (corpus_bleu4(ours[idx].sum(axis=1)) - corpus_bleu4(theirs[idx].sum(axis=1)))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    difference = 100.0 * float(corpus_bleu4(ours.sum(axis=0)) - corpus_bleu4(theirs.sum(axis=0)))
    return {**out, "difference": difference, "low": float(low), "high": float(high)}


HEADLINE = {"caption": "CIDEr", "vqav2": "VQA accuracy", "gqa": "GQA accuracy"}


def compare_to_reference(scores: Mapping[str, Mapping[str, Any]], reference: str,
                         resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Paired differences of every model against `reference`, per task and per long-context bucket.

    Args:
        scores: model name -> task -> score block (what the scorers return, per-item tables kept).
    Returns:
        model name -> comparison key ("caption.CIDEr", "vqav2.overall", "gqa.accuracy",
        "long_context.<tokens>.CIDEr", "long_context_<kind>.<tokens>.CIDEr") -> ``paired_bootstrap`` result.
    """
    if reference not in scores:
        raise ValueError(f"reference model {reference!r} was not scored (models: {', '.join(scores)})")
    keys = {"caption": "caption.CIDEr", "vqav2": "vqav2.overall", "gqa": "gqa.accuracy"}
    base = scores[reference]
    out: dict[str, dict[str, Any]] = {}
    for name, tasks in scores.items():
        if name == reference:
            continue
        rows: dict[str, Any] = {}
        for task, key in keys.items():
            if task in tasks and task in base:
                rows[key] = paired_bootstrap(item_scores(task, base[task]), item_scores(task, tasks[task]),
                                             resamples, seed)
        if "conversations" in tasks and "conversations" in base:
            theirs, ours = base["conversations"], tasks["conversations"]
            if theirs["headline"] == "bleu4" and "bleu_counts" in theirs and "bleu_counts" in ours:
                rows["conversations.bleu4"] = paired_bootstrap_bleu4(theirs["bleu_counts"], ours["bleu_counts"],
                                                                     resamples, seed)
            else:
                rows[f"conversations.{theirs['headline']}"] = paired_bootstrap(
                    item_scores("conversations", theirs),
                    item_scores("conversations", {**ours, "headline": theirs["headline"]}), resamples, seed)
        if "test_loss" in tasks and "test_loss" in base:  # lower is better: a negative difference is a gain
            rows["test_loss.item_mean"] = paired_bootstrap(item_scores("test_loss", base["test_loss"]),
                                                           item_scores("test_loss", tasks["test_loss"]), resamples, seed)
        for lc in (k for k in tasks if k.startswith("long_context") and k in base):  # each filler kind
            theirs, ours = base[lc]["buckets"], tasks[lc]["buckets"]
            for bucket in sorted(set(theirs) & set(ours), key=int):
                rows[f"{lc}.{bucket}.CIDEr"] = paired_bootstrap(
                    item_scores("caption", theirs[bucket]), item_scores("caption", ours[bucket]), resamples, seed)
        out[name] = rows
    return out


def format_difference(row: Mapping[str, Any], digits: int = 3) -> str:
    """'+0.123 [-0.010, +0.250]' (empty when there is nothing to compare)."""
    if row.get("difference") is None:
        return ""
    return f"{row['difference']:+.{digits}f} [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"
