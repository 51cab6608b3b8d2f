"""The tables of a `structlora compare` report (eval.compare_report writes them out).

Every comparison is paired by seed against the reference arm: the mean difference, its bootstrap 95%
interval (seeds resampled), a paired two-sided t-test, the Holm-adjusted p over the whole family of
comparisons, and the minimum detectable difference (MDD): the true difference a paired t-test over these
seeds would find at alpha 0.05 with 80% power, given the observed spread of the paired differences.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

from eval.compare_stats import bootstrap_ci, compare, holm, normalized_scores, paired_p


class Metric(NamedTuple):
    key: str  # in a result's normalized scores
    label: str
    scale: float
    lower_better: bool
    digits: int


# The headline metrics, in report order; any other score is reported under its own key.
KNOWN = {"test_loss": Metric("test_loss", "test loss", 1.0, True, 4),
         "caption.CIDEr": Metric("caption.CIDEr", "CIDEr x100", 100.0, False, 1),
         "vqav2.overall": Metric("vqav2.overall", "VQA acc", 1.0, False, 1),
         "gqa.accuracy": Metric("gqa.accuracy", "GQA acc", 1.0, False, 1),
         "classification.top1": Metric("classification.top1", "top-1", 1.0, False, 1)}
PRETTY = {"structlora": "StructLoRA", "lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}


def metric_of(key: str) -> Metric:
    if key in KNOWN:
        return KNOWN[key]
    lower = "loss" in key or key.endswith(("perplexity", "error"))
    return Metric(key, key, 1.0, lower, 4 if lower else 2)


def report_metrics(results: list[dict[str, Any]], primary: str) -> list[Metric]:
    """The primary metric first, then the headline metrics the cells have (test loss, CIDEr, VQA, GQA,
    top-1, the conversation metrics). A primary metric no cell has is an error that lists what there is."""
    have = {k for r in results for k in normalized_scores(r)}
    if results and primary not in have:
        from eval.errors import EvalInputError

        raise EvalInputError(f"--metric {primary}: no cell has it; the cells have " + ", ".join(sorted(have)))
    keys = [primary] + [k for k in KNOWN if k in have and k != primary]
    keys += sorted(k for k in have if k.startswith("conversations.") and k != primary)
    return [metric_of(k) for k in keys]


def value(result: dict[str, Any], key: str, scale: float = 1.0) -> float:
    v = normalized_scores(result).get(key, result.get(key))
    return float(v) * scale if v is not None else math.nan


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cells_of(results, **keys) -> list[dict[str, Any]]:
    return [r for r in results if all(r.get(k) == v for k, v in keys.items())]


def by_seed(results: list[dict[str, Any]], key: str, scale: float) -> dict[int, float]:
    return {r["seed"]: value(r, key, scale) for r in results}


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
                    out.append({"group": group, "arm": arm, "rank": rank, "metric": m.label, "key": m.key,
                                "lower_better": m.lower_better, "digits": m.digits, **c})
    return out


def ablation_comparisons(plan, grid, metrics: list[Metric]) -> list[dict[str, Any]]:
    """What each part of StructLoRA does: the paper variant and the ablations against StructLoRA itself (the
    tests against the reference cannot say this), per rank where both ran."""
    arms = [a for a in ("structlora_paper", *plan.get("ablation_arms", [])) if a in plan["arms"]]
    if "structlora" not in plan["arms"] or not arms:
        return []
    return [{**c, "reference": "structlora"} for c in comparisons(arms, "structlora", grid, "ablation", metrics)]


def effects_table(rows: list[dict[str, Any]], ref: str) -> list[str]:
    """The tests, one per line; with fewer than 5 seeds a note: the percentile bootstrap of so few differences
    is about their range (it can exclude 0 where the paired t-test is far from significant)."""
    few = [c["n"] for c in rows if c["n"] < 5]
    note = [] if not few else ["", f"With {min(few)} seed(s) per test the bootstrap interval is about the range of "
                               "the paired differences; read the p values and the minimum detectable difference."]
    return _effects_rows(rows, ref) + note


def _effects_rows(rows: list[dict[str, Any]], ref: str) -> list[str]:
    lines = [f"| rank | arm | metric | difference vs {ref} | 95% bootstrap CI | p | Holm p | verdict | "
             "min. detectable |", "|---:|---|---|---:|---|---:|---:|---|---:|"]
    for c in rows:
        verdict = ""
        if not math.isnan(c["holm"]) and c["holm"] < 0.05:
            verdict = "**better**" if (c["diff"] < 0) == c["lower_better"] else "**worse**"
        d = c["digits"]
        lines.append(f"| {c['rank']} | {c['arm']} | {c['metric']} | {c['diff']:+.{d}f} | "
                     f"[{c['lo']:+.{d}f}, {c['hi']:+.{d}f}] | {c['p']:.3g} | {c['holm']:.3g} | {verdict} | "
                     f"{c['mdd']:.{d}f} |")
    return lines


def power_lines(rows: list[dict[str, Any]], metrics: list[Metric], arm: str, reference: str) -> list[str]:
    lines = [f"| metric | seeds | smallest difference detectable ({PRETTY.get(arm, arm)} vs "
             f"{PRETTY.get(reference, reference)}, median over ranks) |", "|---|---:|---:|"]
    for m in metrics:
        mine = [c for c in rows if c["arm"] == arm and c["key"] == m.key and c["group"] == "grid"]
        mdds = [c["mdd"] for c in mine if math.isfinite(c["mdd"])]
        ns = [c["n"] for c in mine]
        if mdds:
            lines.append(f"| {m.label} | {max(ns)} | {statistics.median(mdds):.4g} |")
    return lines


def gate_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | candidate | val loss (final, mean ± std) | best val loss on the curve | kept rank share | "
             "gate mean | seeds | chosen |", "|---|---|---|---|---:|---:|---:|---|"]
    names: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        names.setdefault((r["stage"], r["candidate"]), []).append(r)
    for (stage, name), rs in names.items():
        finals = [float(r["val_losses"][-1][1]) for r in rs if r.get("val_losses")]
        best = [min(v for _, v in r["val_losses"]) for r in rs if r.get("val_losses")]
        mark = "**yes**" if rs[0].get("chosen") else ("stage winner" if rs[0].get("stage_winner") else "")
        lines.append(f"| {stage} | {name} | {fmt(finals, 4)} | {fmt(best, 4)} | "
                     f"{fmt([r.get('kept_fraction', math.nan) for r in rs], 2)} | "
                     f"{fmt([r.get('gate_mean', math.nan) for r in rs], 2)} | {len(rs)} | {mark} |")
    return lines


def lr_table(rows: list[dict[str, Any]], scales: dict[str, float], plan, gate_cells: int = 0) -> list[str]:
    """The lr phase per arm, with each arm's tuning cells (StructLoRA's include the gate phase's) and a flag
    on a choice at the edge of the candidates (the best lr may lie outside what was tried)."""
    cands = plan["lr"]["scales"]
    lines = ["| arm | " + " | ".join(f"lr x{s:g}" for s in cands) + " | chosen | chosen lr | tuning cells |",
             "|---|" + "---:|" * len(cands) + "---|---:|---:|"]
    edges, budget = [], {}
    for arm in plan["lr"]["arms"]:
        cols, chosen_lr = [], ""
        for s in cands:
            rs = [r for r in rows if r["arm"] == arm and r["scale"] == s]
            cols.append(fmt([float(r["val_losses"][-1][1]) for r in rs if r.get("val_losses")], 4))
            if rs and arm in scales and scales[arm] == s:
                chosen_lr = f"{rs[0]['config']['train']['lr']:.2g}"
        cells = sum(1 for r in rows if r["arm"] == arm) + (gate_cells if arm in plan["gated_arms"][:1] else 0)
        budget[arm] = cells
        edge = arm in scales and len(cands) > 1 and scales[arm] in (min(cands), max(cands))
        if edge:
            edges.append(arm)
        chosen = f"x{scales[arm]:g}" + (" (edge of the grid)" if edge else "") if arm in scales else "pending"
        lines.append(f"| {arm} | " + " | ".join(cols) + f" | {chosen} | {chosen_lr} | {cells} |")
    for arm, source in plan["lr"]["inherit"].items():
        lines.append(f"| {arm} | " + " | ".join("" for _ in cands) + f" | {source}'s | | 0 |")
    if budget:
        unequal = len(set(budget.values())) > 1
        lines += ["", "Tuning cells per arm: " + ", ".join(f"{a} {n}" for a, n in budget.items())
                  + (f" (StructLoRA's include the {gate_cells} cells of the gate phase)" if gate_cells else "")
                  + (". The budgets are not equal: the extra gate tuning can only favour StructLoRA."
                     if unequal and gate_cells else ". The budgets are not equal (cells still running)." if unequal
                     else ". Every arm had the same tuning budget.")]
    if edges:
        lines += ["", f"Chosen at the edge of the candidates: {', '.join(edges)}: a learning rate beyond the grid "
                  "was not tried and might do better."]
    return lines


def grid_table(arms, grid, metrics: list[Metric], base: dict[str, Any] | None = None) -> list[str]:
    kept = any("kept_fraction" in r for r in grid)
    head = "| rank | arm | " + " | ".join(m.label for m in metrics) + (" | kept rank share" if kept else "")
    lines = [head + " | trainable params | step (ms) | seeds |",
             "|---:|---|" + "---|" * len(metrics) + ("---:|" if kept else "") + "---:|---:|---:|"]
    if base is not None:  # what adaptation starts from, scored alike
        cols = " | ".join(fmt([value(base, m.key, m.scale)], m.digits) for m in metrics)
        lines.append(f"| | base model (not adapted) | {cols}{' | ' if kept else ''} | 0 | | |")
    for rank in sorted({r["rank"] for r in grid}, key=lambda x: (x == 0, x)):
        for arm in arms:
            rs = cells_of(grid, name=arm, rank=rank)
            if not rs:
                continue
            cols = " | ".join(fmt([value(r, m.key, m.scale) for r in rs], m.digits) for m in metrics)
            share = f" | {fmt([r.get('kept_fraction', math.nan) for r in rs], 2)}" if kept else ""
            lines.append(f"| {rank or 'all'} | {arm} | {cols}{share} | {rs[0]['trainable_parameters']:,} | "
                         f"{1e3 * statistics.fmean(r['step_seconds'] for r in rs):.0f} | {len(rs)} |")
    return lines


def cost_table(arms, grid) -> list[str]:
    """What each arm costs to train: parameters, step time, wall time, peak memory (the cell process)."""
    cuda = any("peak_cuda_mb" in r for r in grid)
    lines = ["| rank | arm | trainable params | step (ms) | train time (s) | peak RSS (MB)"
             + (" | peak CUDA memory (MB)" if cuda else "") + " | cells |",
             "|---:|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|"]
    for rank in sorted({r["rank"] for r in grid}, key=lambda x: (x == 0, x)):
        for arm in arms:
            rs = cells_of(grid, name=arm, rank=rank)
            if not rs:
                continue
            gpu = f" | {max(r.get('peak_cuda_mb', math.nan) for r in rs):.0f}" if cuda else ""
            lines.append(f"| {rank or 'all'} | {arm} | {rs[0]['trainable_parameters']:,} | "
                         f"{fmt([1e3 * r['step_seconds'] for r in rs], 0)} | "
                         f"{fmt([float(r.get('train_seconds', math.nan)) for r in rs], 0)} | "
                         f"{max(float(r.get('peak_rss_mb', math.nan)) for r in rs):.0f}{gpu} | {len(rs)} |")
    return lines


def long_context_tables(arms: list[str], reference: str, grid, pairs: list[list[str]] | None = None) -> list[str]:
    """CIDEr per context length, each arm with long-context scores against the reference (or each [arm, against]
    of `pairs`, the plan's `long_context_pairs`): paired by seed, the percentile bootstrap interval, the paired
    t-test's p and its Holm adjustment over the buckets of the rank (a family of their own)."""
    lines: list[str] = []
    for a, b in pairs or [(x, reference) for x in arms if x != reference]:
        if not any(r.get("long_context_cider") for r in cells_of(grid, name=a)):
            continue
        lines += [*([""] if lines else []),
                  f"| rank | context tokens | {b} CIDEr x100 | {a} CIDEr x100 | difference | 95% bootstrap CI | p | "
                  "p (Holm) |", "|---:|---:|---|---|---:|---|---:|---:|"]
        for rank in sorted({r["rank"] for r in grid if r["rank"]}):
            ra, rb = cells_of(grid, name=a, rank=rank), cells_of(grid, name=b, rank=rank)
            buckets = sorted({k for r in ra + rb for k in r.get("long_context_cider", {})}, key=int)
            rows = []
            for k in buckets:
                va = {r["seed"]: 100 * r["long_context_cider"][k] for r in ra if k in r.get("long_context_cider", {})}
                vb = {r["seed"]: 100 * r["long_context_cider"][k] for r in rb if k in r.get("long_context_cider", {})}
                diffs = [va[s] - vb[s] for s in sorted(set(va) & set(vb))]
                rows.append((k, va, vb, diffs, paired_p(diffs)))
            for (k, va, vb, diffs, p), adjusted in zip(rows, holm([row[-1] for row in rows])):
                lo, hi = bootstrap_ci(diffs)
                lines.append(f"| {rank} | {k} | {fmt(list(vb.values()), 1)} | {fmt(list(va.values()), 1)} | "
                             f"{statistics.fmean(diffs) if diffs else math.nan:+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                             f"{p:.3g} | {adjusted:.3g} |")
    return lines


def diagnostics_table(arms, grid) -> list[str]:
    if not any("adjacent_cosine" in r for r in grid):
        return []
    lines = ["| rank | arm | CosAdj of vec(dW) | CosAdj of batch-averaged dL/dW | CosAdj of dL/dW, per batch | "
             "drift energy / ‖dW‖² | ‖dW‖ | message / LoRA part | kept rank share |",
             "|---:|---|---|---|---|---|---|---|---|"]
    for rank in sorted({r["rank"] for r in grid}, key=lambda x: (x == 0, x)):
        for arm in arms:
            rs = cells_of(grid, name=arm, rank=rank)
            if not rs:
                continue

            def col(key, digits=3, rs=rs):
                return fmt([float(r.get(key, math.nan)) for r in rs], digits)

            lines.append(f"| {rank or 'all'} | {arm} | {col('adjacent_cosine')} | {col('grad_adjacent_cosine')} | "
                         f"{col('grad_adjacent_cosine_per_batch')} | {col('drift_energy_normalized')} | "
                         f"{col('update_norm', 2)} | {col('message_share_mean')} | {col('kept_fraction', 2)} |")
    return lines


def _span(steps: list[int]) -> str:
    """'step 800' or 'steps 600-1200': where the seeds' best validation losses fell."""
    if not steps:
        return "n/a"
    return f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}-{steps[-1]}"


def lowdata_table(plan, lowdata, metrics: list[Metric]) -> list[str]:
    """Test scores, and whether the model overfits: the final train loss, the best validation loss on the
    curve (and where the seeds reached it) against the final one."""
    if not lowdata:
        return []
    low = plan["lowdata"]
    lines = ["| images | arm | " + " | ".join(m.label for m in metrics) + " | final train loss | best val loss (step) "
             "| final val loss | seeds |", "|---:|---|" + "---|" * len(metrics) + "---|---|---|---:|"]
    for fraction, arm in [(f, a) for f in low["fractions"] for a in low["arms"]]:
        rs = cells_of(lowdata, name=arm, fraction=fraction)
        if rs:
            curves = [[(int(s), float(v)) for s, v in r.get("val_losses", [])] for r in rs]
            best = [min(c, key=lambda sv: sv[1]) for c in curves if c]
            steps = sorted(s for s, _ in best)
            cols = " | ".join(fmt([value(r, m.key, m.scale) for r in rs], m.digits) for m in metrics)
            lines.append(f"| {fraction:.0%} | {arm} | {cols} | "
                         f"{fmt([float(r.get('final_train_loss', math.nan)) for r in rs], 4)} | "
                         f"{fmt([v for _, v in best], 4)} ({_span(steps)}) | "
                         f"{fmt([c[-1][1] for c in curves if c], 4)} | {len(rs)} |")
    return lines


def forgetting_view(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells with their forgetting-split scores as their scores (for the tables and tests above)."""
    return [{**r, "scores": r["forgetting"]["scores"]} for r in results if r.get("forgetting")]


def forgetting_table(arms, grid, metrics: list[Metric], base: dict[str, Any] | None) -> list[str]:
    """Per arm and rank: the forgetting split's scores after adaptation, and their change from the base model's
    own (negative CIDEr / accuracy, positive loss: forgotten)."""
    view = forgetting_view(grid)
    ref = forgetting_view([base])[0] if base is not None and base.get("forgetting") else None
    shown = [m for m in metrics if any(math.isfinite(value(r, m.key)) for r in view)]
    lines = ["| rank | arm | " + " | ".join(f"{m.label} (change)" for m in shown) + " | seeds |",
             "|---:|---|" + "---|" * len(shown) + "---:|"]
    if ref is not None:
        lines.append("| | base model (not adapted) | " + " | ".join(fmt([value(ref, m.key, m.scale)], m.digits)
                                                              for m in shown) + " | |")
    for rank in sorted({r["rank"] for r in view}, key=lambda x: (x == 0, x)):
        for arm in arms:
            rs = cells_of(view, name=arm, rank=rank)
            if not rs:
                continue
            cols = []
            for m in shown:
                after = [value(r, m.key, m.scale) for r in rs]
                change = "" if ref is None else f" ({statistics.fmean(after) - value(ref, m.key, m.scale):+.{m.digits}f})"
                cols.append(fmt(after, m.digits) + change)
            lines.append(f"| {rank or 'all'} | {arm} | " + " | ".join(cols) + f" | {len(rs)} |")
    return lines
