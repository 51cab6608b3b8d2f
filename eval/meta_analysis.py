"""Random-effects meta-analysis of paired differences (`structlora compare --pool`).

Each comparison i (one study's arm pair at one rank, on one base and data) gives a mean paired difference
d_i over its seeds with sampling variance v_i = sd_i^2 / n_i. The model: d_i = mu + u_i + e_i, with
u_i ~ N(0, tau^2) the true difference's spread between comparisons (bases, data, ranks) and e_i ~ N(0, v_i).

- tau^2: REML (the default; Viechtbauer 2005's fixed-point iteration, started at DerSimonian-Laird) or
  DerSimonian-Laird's moment estimator;
- heterogeneity: Cochran's Q and its p (chi-square, k - 1 df), I^2 = (Q - (k - 1)) / Q, tau;
- the pooled mu: the inverse-variance mean with weights 1 / (v_i + tau^2);
- its interval and p: Hartung-Knapp-Sidik-Jonkman (t with k - 1 df on a rescaled variance, never below the
  model-based one), which keeps its level with few comparisons where the normal (Wald) interval does not
  (IntHout et al. 2014); the Wald interval is reported beside it;
- the 95% prediction interval for the difference in a new comparison (Higgins et al. 2009; k >= 3);
- power: the smallest pooled difference this evidence detects with 80% power at two-sided 0.05.
"""

from __future__ import annotations

import math
from typing import Any


def tau2_dl(d: list[float], v: list[float]) -> float:
    """DerSimonian-Laird: max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w)), w = 1 / v."""
    w = [1 / x for x in v]
    mu = sum(wi * di for wi, di in zip(w, d)) / sum(w)
    q = sum(wi * (di - mu) ** 2 for wi, di in zip(w, d))
    c = sum(w) - sum(wi * wi for wi in w) / sum(w)
    return max(0.0, (q - (len(d) - 1)) / c) if c > 0 else 0.0


def tau2_reml(d: list[float], v: list[float], tol: float = 1e-12, iterations: int = 1000) -> float:
    """Restricted maximum likelihood, by the fixed-point iteration
    tau^2 <- sum w^2 ((d - mu)^2 - v) / sum w^2 + 1 / sum w, w = 1 / (v + tau^2), truncated at 0."""
    tau2 = tau2_dl(d, v)
    for _ in range(iterations):
        w = [1 / (x + tau2) for x in v]
        mu = sum(wi * di for wi, di in zip(w, d)) / sum(w)
        new = sum(wi * wi * ((di - mu) ** 2 - vi) for wi, di, vi in zip(w, d, v)) / sum(wi * wi for wi in w) \
            + 1 / sum(w)
        new = max(0.0, new)
        if abs(new - tau2) < tol:
            return new
        tau2 = new
    return tau2


def random_effects(d: list[float], v: list[float], method: str = "reml", level: float = 0.95,
                   power: float = 0.8) -> dict[str, Any]:
    """The pooled difference of comparisons with means `d` and sampling variances `v` (see the module)."""
    from scipy.stats import chi2, norm, t

    k = len(d)
    if k < 2 or len(v) != k or any(not (x > 0 and math.isfinite(x)) for x in v):
        raise ValueError(f"random_effects: need 2 or more comparisons with positive variances (got {k})")
    w_fixed = [1 / x for x in v]
    mu_fixed = sum(wi * di for wi, di in zip(w_fixed, d)) / sum(w_fixed)
    q = sum(wi * (di - mu_fixed) ** 2 for wi, di in zip(w_fixed, d))
    tau2 = {"reml": tau2_reml, "dl": tau2_dl}[method](d, v)
    w = [1 / (x + tau2) for x in v]
    mu = sum(wi * di for wi, di in zip(w, d)) / sum(w)
    se = math.sqrt(1 / sum(w))
    q_hk = sum(wi * (di - mu) ** 2 for wi, di in zip(w, d)) / (k - 1)
    se_hk = se * math.sqrt(max(1.0, q_hk))  # HKSJ, not narrower than the model-based variance
    tq = float(t.ppf(0.5 + level / 2, k - 1))
    zq = float(norm.ppf(0.5 + level / 2))
    pred = (mu - float(t.ppf(0.5 + level / 2, k - 2)) * math.sqrt(tau2 + se_hk ** 2),
            mu + float(t.ppf(0.5 + level / 2, k - 2)) * math.sqrt(tau2 + se_hk ** 2)) if k >= 3 else (math.nan,) * 2
    return {"k": k, "method": method, "mu": mu, "se": se_hk, "se_model": se, "lo": mu - tq * se_hk,
            "hi": mu + tq * se_hk, "p": float(2 * t.sf(abs(mu) / se_hk, k - 1)) if se_hk > 0 else math.nan,
            "wald_lo": mu - zq * se, "wald_hi": mu + zq * se, "tau2": tau2, "tau": math.sqrt(tau2), "Q": q,
            "Q_df": k - 1, "Q_p": float(chi2.sf(q, k - 1)), "I2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0,
            "pred_lo": pred[0], "pred_hi": pred[1], "weights": [wi / sum(w) for wi in w],
            "mdd": (tq + float(t.ppf(power, k - 1))) * se_hk, "fixed_mu": mu_fixed,
            "fixed_se": math.sqrt(1 / sum(w_fixed))}
