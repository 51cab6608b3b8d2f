"""Statistics of `structlora compare`: paired t intervals and tests, Holm's correction, the minimum detectable
difference of a paired t-test, and the cells' scores as flat metric keys.

Every comparison is paired by seed: an arm and its reference trained with the same seed (same data order,
same initialisation of what both share) give one difference; the seeds are the sample. The interval is the
paired t-test's own (Student t, n - 1 degrees of freedom), so it covers at its nominal level at any number of
seeds when the differences are roughly normal (tests/test_compare_stats.py simulates 3, 5 and 10 seeds), and
it excludes 0 exactly when the unadjusted p is below 1 - level. The percentile bootstrap of the mean used
before (issue 42) covers about 74% at 3 seeds and 84% at 5 for a nominal 95%."""

from __future__ import annotations

import math
import statistics
from typing import Any

INTERVAL = "95% t interval"  # how the reports name the interval


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `diffs`: mean -/+ t(1 - (1 - level) / 2, n - 1) * sd / sqrt(n)."""
    from scipy.stats import t

    n = len(diffs)
    if n < 2:
        return (math.nan, math.nan)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired_p(diffs: list[float]) -> float:
    """Two-sided p of a paired t-test (one-sample t on the differences); nan when undefined."""
    from scipy.stats import ttest_1samp

    if len(diffs) < 2 or statistics.pstdev(diffs) == 0:
        return math.nan
    return float(ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan entries stay nan and do not count)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def min_detectable(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a paired two-sided t-test at level `alpha` over n pairs detects with
    `power` (the reports pass a family's Holm level for its smallest p, alpha / m)."""
    from scipy.stats import t

    if n < 2 or not math.isfinite(sd) or sd == 0:
        return math.nan
    return (t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * sd / math.sqrt(n)


def paired_diffs(arm: dict[int, float], ref: dict[int, float]) -> dict[int, float]:
    """{seed: arm - reference} over the seeds where both are finite."""
    seeds = sorted(s for s in set(arm) & set(ref) if math.isfinite(arm[s]) and math.isfinite(ref[s]))
    return {s: arm[s] - ref[s] for s in seeds}


def summarize(diffs: list[float], alpha: float = 0.05) -> dict[str, float]:
    """The paired differences' count, mean, sd, t interval, paired-t p and minimum detectable difference."""
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    lo, hi = t_interval(diffs)
    return {"n": len(diffs), "diff": statistics.fmean(diffs) if diffs else math.nan, "sd": sd, "lo": lo, "hi": hi,
            "p": paired_p(diffs), "mdd": min_detectable(sd, len(diffs), alpha), "alpha": alpha}


def compare(arm: dict[int, float], ref: dict[int, float]) -> dict[str, Any]:
    """{seed: value} of an arm against its reference's: `summarize` of the paired differences (seeds where
    either is missing are left out), with the seeds they came from."""
    diffs = paired_diffs(arm, ref)
    return {**summarize(list(diffs.values())), "seeds": list(diffs)}


# --- the cells' scores ---------------------------------------------------------------------------

# Bookkeeping fields of a task's metrics, not scores.
NOT_SCORES = {"missing", "coverage", "ignored_unbalanced", "context_length", "tokens", "dropped", "headline_value"}
# The score names of the first study v2 cells (bench/study_cell.py), as the flat keys of today's.
LEGACY = {"CIDEr": "caption.CIDEr", "VQA": "vqav2.overall", "GQA": "gqa.accuracy", "loss_mean": "test_loss"}


def flatten_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """Every numeric score of an eval stage's `metrics` as `task.name` (a task's `metrics` block is
    flattened into it: `caption.CIDEr`); the test loss is `test_loss` (the mean over tasks of each task's
    token-weighted loss) and `test_loss.<task>`. Long-context buckets are kept apart (long_context_cider)."""
    out: dict[str, float] = {}
    for task, block in metrics.items():
        if not isinstance(block, dict) or task.startswith("long_context"):
            continue
        if task == "test_loss":
            out["test_loss"] = float(block["mean"])
            out.update({f"test_loss.{t}": float(v["loss"]) for t, v in block.items() if isinstance(v, dict)})
            continue
        flat = {**{k: v for k, v in block.items() if k != "metrics"}, **(block.get("metrics") or {})}
        for key, value in flat.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or key in NOT_SCORES \
                    or key.startswith("num_") or not math.isfinite(float(value)):
                continue
            out[f"{task}.{key}"] = float(value)
    return out


def long_context_cider(metrics: dict[str, Any], key: str = "long_context") -> dict[str, float]:
    """{bucket length: CIDEr} of long-context captioning (`key`: long_context_neutral for that filler), when it ran."""
    buckets = (metrics.get(key) or {}).get("buckets") or {}
    return {str(k): float(v["CIDEr"]) for k, v in buckets.items() if isinstance(v, dict) and "CIDEr" in v}


def normalized_scores(result: dict[str, Any]) -> dict[str, float]:
    """A result's scores under today's keys (the first study v2 cells used CIDEr, VQA, GQA, loss_*)."""
    out = {}
    for key, value in (result.get("scores") or {}).items():
        if key in LEGACY:
            key = LEGACY[key]
        elif key.startswith("loss_"):
            key = "test_loss." + key[len("loss_"):]
        out[key] = value
    return out
