"""Statistics of the method studies: paired bootstrap intervals, paired t-tests, Holm's correction and
the minimum detectable difference of a paired t-test (bench/study_v2_report.py reports with them)."""

from __future__ import annotations

import math
import random
import statistics


def bootstrap_ci(diffs: list[float], reps: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs`, resampling them with replacement."""
    if len(diffs) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi


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
    """Smallest true mean difference a paired two-sided t-test over n pairs detects with `power`."""
    from scipy.stats import t

    if n < 2 or not math.isfinite(sd) or sd == 0:
        return math.nan
    return (t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * sd / math.sqrt(n)


# --- helpers ------------------------------------------------------------------------------------
