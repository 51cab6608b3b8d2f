"""The tests of a `structlora compare` report and the families they are corrected in.

A test is one paired comparison (eval.compare_stats.compare): an arm against the arm it is compared with
(`against`), at a rank, on one metric, in one group: `grid` (the test split, against the reference),
`lowdata`, `ablation` (the paper variant and the ablations against StructLoRA itself), `forgetting` (the split
the base learned from) and `long_context` (CIDEr per context length, per pair of arms).

Families are declared before the data: the plan's `families` (a plan file), or the defaults below, which
depend on the plan alone (its arms, reference, primary metric, `--primary-arms`), never on results. Each test
belongs to the first family whose selector it matches; Holm's correction runs within each family, and the
minimum detectable difference is computed at the family's Holm level for its smallest p (alpha / m, m the
family's size). A test no declared family selects is exploratory: its p is shown, not corrected.
"""

from __future__ import annotations

import math
from typing import Any

from eval.compare_stats import compare, holm, min_detectable
from eval.compare_tables import Metric, by_seed, cells_of

ALPHA = 0.05
GROUPS = ("grid", "lowdata", "ablation", "forgetting", "long_context")
SELECTORS = ("group", "arms", "against", "metrics", "ranks", "fractions")


def comparisons(arms: list[str], reference: str, results, group: str, metrics: list[Metric]) -> list[dict[str, Any]]:
    """Every arm against the reference, per rank (a rank-free arm, full fine-tuning, at the largest rank)."""
    out = []
    ranks = sorted({r["rank"] for r in results if r["rank"]})
    for arm in arms:
        if arm == reference:
            continue
        for rank in ranks:
            arm_rows = cells_of(results, name=arm, rank=rank) or (cells_of(results, name=arm, rank=0)
                                                                  if rank == ranks[-1] else [])
            # a rank-free reference (full fine-tuning) is every rank's
            ref_rows = cells_of(results, name=reference, rank=rank) or cells_of(results, name=reference, rank=0)
            if not arm_rows or not ref_rows:
                continue
            for m in metrics:
                c = compare(by_seed(arm_rows, m.key, m.scale), by_seed(ref_rows, m.key, m.scale))
                if c["n"]:
                    out.append({"group": group, "arm": arm, "against": reference, "rank": rank, "metric": m.label,
                                "key": m.key, "lower_better": m.lower_better, "digits": m.digits, **c})
    return out


def ablation_comparisons(plan, grid, metrics: list[Metric]) -> list[dict[str, Any]]:
    """What each part of StructLoRA does: the paper variant and the ablations against StructLoRA itself (the
    tests against the reference cannot say this), per rank where both ran."""
    arms = [a for a in ("structlora_paper", *plan.get("ablation_arms", [])) if a in plan["arms"]]
    if "structlora" not in plan["arms"] or not arms:
        return []
    return [{**c, "reference": "structlora"} for c in comparisons(arms, "structlora", grid, "ablation", metrics)]


def long_context_comparisons(arms: list[str], reference: str, grid, pairs=None) -> list[dict[str, Any]]:
    """CIDEr x100 per context length, each [arm, against] of `pairs` (the plan's `long_context_pairs`; default:
    every arm with long-context scores against the reference), per rank, paired by seed."""
    out = []
    for a, b in pairs or [(x, reference) for x in arms if x != reference]:
        if not any(r.get("long_context_cider") for r in cells_of(grid, name=a)):
            continue
        for rank in sorted({r["rank"] for r in grid if r["rank"]}):
            ra, rb = cells_of(grid, name=a, rank=rank), cells_of(grid, name=b, rank=rank)
            for k in sorted({k for r in ra + rb for k in r.get("long_context_cider", {})}, key=int):
                va = {r["seed"]: 100 * r["long_context_cider"][k] for r in ra if k in r.get("long_context_cider", {})}
                vb = {r["seed"]: 100 * r["long_context_cider"][k] for r in rb if k in r.get("long_context_cider", {})}
                out.append({"group": "long_context", "arm": a, "against": b, "rank": rank, "bucket": k,
                            "metric": f"long-context CIDEr x100 at {k} tokens", "key": f"long_context.{k}.CIDEr",
                            "lower_better": False, "digits": 1, "arm_values": list(va.values()),
                            "against_values": list(vb.values()), **compare(va, vb)})
    return out


# --- families ----------------------------------------------------------------------------------------


def default_families(plan) -> list[dict[str, Any]]:
    """The families a plan gets when it declares none: the primary metric of every arm (the ablations aside, or
    `primary_arms`) against the reference at each rank; every other test on the test split; then one family per
    other group."""
    ablation = set(plan.get("ablation_arms") or [])
    primary = plan.get("primary_arms") or [a for a in plan["arms"] if a != plan["reference"] and a not in ablation]
    return [{"name": "primary", "group": "grid", "metrics": [plan.get("metric", "test_loss")], "arms": list(primary)},
            {"name": "secondary", "group": "grid"}, {"name": "ablations", "group": "ablation"},
            {"name": "long_context", "group": "long_context"}, {"name": "forgetting", "group": "forgetting"},
            {"name": "lowdata", "group": "lowdata"}]


def declared_families(spec: Any, source: str) -> list[dict[str, Any]] | None:
    """A plan's `families` ({name: selector}, in order; a family named `primary` first) as a list, checked;
    None when the plan declares none."""
    from eval.errors import EvalInputError

    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec or next(iter(spec)) != "primary":
        raise EvalInputError(f"{source}: families: a mapping of name -> selector whose first family is `primary`, e.g. "
                        "{primary: {group: grid, metrics: [test_loss]}, secondary: {group: grid}}")
    out = []
    for name, where in spec.items():
        where = where or {}
        bad = [k for k in where if k not in SELECTORS]
        groups = where.get("group", "grid")
        groups = [groups] if isinstance(groups, str) else list(groups)
        if bad or name == "none" or any(g not in GROUPS for g in groups):
            raise EvalInputError(f"{source}: family {name!r}: selectors are {', '.join(SELECTORS)}; groups "
                            f"{', '.join(GROUPS)}; `none` is reserved for tests outside every family")
        out.append({**where, "name": str(name), "group": groups})
    return out


def families_of(plan) -> list[dict[str, Any]]:
    return plan.get("families") or default_families(plan)


def _listed(value) -> list:
    return [value] if isinstance(value, str | int | float) else list(value)


def selects(where: dict[str, Any], test: dict[str, Any]) -> bool:
    fields = {"group": "group", "arms": "arm", "against": "against", "metrics": "key", "ranks": "rank",
              "fractions": "fraction"}
    return all(test.get(field) in _listed(where[key]) for key, field in fields.items() if key in where)


def assign(tests: list[dict[str, Any]], families: list[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Each test's family (the first that selects it; `none`: exploratory), its Holm-adjusted p within that
    family, the family's Holm level for its smallest p (alpha / m) and the minimum detectable difference there."""
    for c in tests:
        c["family"] = next((f["name"] for f in families if selects(f, c)), "none")
    for name in {c["family"] for c in tests}:
        members = [c for c in tests if c["family"] == name]
        m = max(1, sum(1 for c in members if not math.isnan(c["p"])))
        adjusted = holm([c["p"] for c in members]) if name != "none" else [math.nan] * len(members)
        for c, a in zip(members, adjusted):
            c["holm"], c["family_size"] = a, m if name != "none" else 0
            c["alpha"] = alpha / m if name != "none" else alpha
            c["mdd"] = min_detectable(c.get("sd", math.nan), c["n"], c["alpha"])


def family_lines(plan, tests: list[dict[str, Any]]) -> list[str]:
    """What each family holds, its size and Holm level; where the families were declared."""
    declared = bool(plan.get("families"))
    lines = [("Test families, declared in the plan (`families`)" if declared else
              "Test families: the defaults (the plan declares none; they depend on its arms and primary metric, "
              "not on any result)") + ". Holm's correction runs within each family; a family's minimum detectable "
                                      "differences are at its Holm level for its smallest p, 0.05 / m:", ""]
    for f in families_of(plan):
        members = [c for c in tests if c.get("family") == f["name"]]
        if not members:
            continue
        what = "; ".join(f"{k} {', '.join(str(v) for v in _listed(f[k]))}" for k in SELECTORS if k in f)
        lines.append(f"- **{f['name']}** ({what}): {len(members)} tests, Holm level of the smallest p "
                     f"0.05 / {members[0]['family_size']} = {members[0]['alpha']:.3g}.")
    loose = [c for c in tests if c.get("family") == "none"]
    if loose:
        lines.append(f"- **none**: {len(loose)} tests no family selects (exploratory: p not corrected).")
    return lines


def reused_tuning_seeds(plan) -> list[int]:
    """Grid seeds that the tuning phases (gate, lr) also trained with: their grid cells inherit the selection."""
    tuning = set((plan.get("lr") or {}).get("seeds") or []) | set((plan.get("gate") or {}).get("seeds") or [])
    return sorted(tuning & set(plan.get("seeds") or []))


def without_seeds(plan, grid, metrics: list[Metric], seeds: list[int]) -> list[dict[str, Any]]:
    """The primary family's tests again on the grid without `seeds` (the tuning seeds): a sensitivity check,
    outside every family (not corrected)."""
    kept = [r for r in grid if r["seed"] not in seeds]
    primary = families_of(plan)[0]
    return [{**c, "family": "none", "holm": math.nan, "family_size": 0}
            for c in comparisons(list(plan["arms"]), plan["reference"], kept, "grid", metrics)
            if selects(primary, c) and c["n"] >= 2]
