"""The tables of a `structlora compare` report (eval.compare_report writes them out).

Every comparison is paired by seed (eval.compare_tests): the mean difference, its 95% t interval (the paired
t-test's own), the paired two-sided t-test's p, the test's family and its Holm-adjusted p within that family,
and the minimum detectable difference (MDD): the true difference a paired t-test over these seeds would find
with 80% power at the family's Holm level for its smallest p (0.05 / m), given the observed spread of the
paired differences.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

from eval.compare_stats import INTERVAL, normalized_scores


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


def effects_table(rows: list[dict[str, Any]], ref: str) -> list[str]:
    """The tests, one per line, each with its family and its Holm p within that family."""
    lines = [f"| rank | arm | metric | difference vs {ref} | {INTERVAL} | p | family | Holm p | verdict | "
             "min. detectable (80%, family's Holm level) |", "|---:|---|---|---:|---|---:|---|---:|---|---:|"]
    for c in rows:
        d = c["digits"]
        lines.append(f"| {c['rank']} | {c['arm']} | {c['metric']} | {c['diff']:+.{d}f} | "
                     f"[{c['lo']:+.{d}f}, {c['hi']:+.{d}f}] | {c['p']:.3g} | {family_cell(c)} | {holm_cell(c)} | "
                     f"{verdict(c)} | {c['mdd']:.{d}f} |")
    return lines


def family_cell(c: dict[str, Any]) -> str:
    return c.get("family", "none") if c.get("family", "none") != "none" else "none (exploratory)"


def holm_cell(c: dict[str, Any]) -> str:
    return "not corrected" if c.get("family", "none") == "none" else f"{c['holm']:.3g}"


def verdict(c: dict[str, Any]) -> str:
    if c.get("family", "none") == "none" or math.isnan(c["holm"]) or c["holm"] >= 0.05:
        return ""
    return "**better**" if (c["diff"] < 0) == c["lower_better"] else "**worse**"


def power_lines(rows: list[dict[str, Any]], metrics: list[Metric], arm: str, reference: str) -> list[str]:
    lines = [f"| metric | seeds | family | smallest difference detectable ({PRETTY.get(arm, arm)} vs "
             f"{PRETTY.get(reference, reference)}, 80% power at the family's Holm level, median over ranks) |",
             "|---|---:|---|---:|"]
    for m in metrics:
        mine = [c for c in rows if c["arm"] == arm and c["key"] == m.key and c["group"] == "grid"]
        mdds = [c["mdd"] for c in mine if math.isfinite(c["mdd"])]
        ns = [c["n"] for c in mine]
        if mdds:
            lines.append(f"| {m.label} | {max(ns)} | {mine[0]['family']} | {statistics.median(mdds):.4g} |")
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


def long_context_tables(tests: list[dict[str, Any]]) -> list[str]:
    """CIDEr per context length (eval.compare_tests.long_context_comparisons), a table per pair of arms: the
    arms' mean ± std over seeds, the paired difference, its t interval, p, family and Holm p within the family."""
    lines: list[str] = []
    for a, b in dict.fromkeys((c["arm"], c["against"]) for c in tests):
        lines += [*([""] if lines else []),
                  f"| rank | context tokens | {b} CIDEr x100 | {a} CIDEr x100 | difference | {INTERVAL} | p | "
                  "family | Holm p |", "|---:|---:|---|---|---:|---|---:|---|---:|"]
        for c in (c for c in tests if (c["arm"], c["against"]) == (a, b)):
            lines.append(f"| {c['rank']} | {c['bucket']} | {fmt(c['against_values'], 1)} | {fmt(c['arm_values'], 1)} | "
                         f"{c['diff']:+.1f} | [{c['lo']:+.1f}, {c['hi']:+.1f}] | {c['p']:.3g} | {family_cell(c)} | "
                         f"{holm_cell(c)} |")
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
