"""The report of `structlora compare`: report.md, report.json, cells.csv, tests.csv, learning_curves.png.

Sections: the gate search (plan files with one), the learning rate per arm (with each arm's tuning
budget), the test families (declared in the plan, or the defaults), the test split per arm and rank, the
effects against the reference (paired by seed, t interval, paired t, Holm within each family) with the power
the seeds give, the primary family without the tuning seeds (where the grid reused them), ablations against
StructLoRA, long-context captioning per context length, update structure (with diagnostics), low data, the
cost of each arm, and the learning curves. Primary metric first: the teacher-forced test loss unless --metric.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from eval.compare_stats import INTERVAL
from eval.compare_tables import (
    cells_of,
    cost_table,
    diagnostics_table,
    effects_table,
    forgetting_table,
    forgetting_view,
    gate_table,
    grid_table,
    long_context_tables,
    lowdata_table,
    lr_table,
    power_lines,
    report_metrics,
)
from eval.compare_tests import (
    ablation_comparisons,
    assign,
    comparisons,
    families_of,
    family_lines,
    long_context_comparisons,
    reused_tuning_seeds,
    without_seeds,
)


def _mean_curve(ax, rs, label: str, color: str) -> None:
    curves = [dict((int(s), float(v)) for s, v in r.get("val_losses", [])) for r in rs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if steps:
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker=".", label=label, color=color)


def learning_curves(plan, grid, out: Path, lowdata=()) -> Path | None:
    """Validation loss against steps, mean over seeds, one line per arm: a panel per rank of the grid, then
    one per low-data share (where a model overfits, its curve turns up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in grid if r["rank"]})
    low = plan.get("lowdata") or {"fractions": [], "arms": []}
    shares = [f for f in low["fractions"] if cells_of(lowdata, fraction=f)]
    if not ranks and not shares:
        return None
    panels = len(ranks) + len(shares)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    color = {arm: f"C{i % 10}" for i, arm in enumerate(plan["arms"])}  # one colour per arm in every panel
    for ax, fraction in zip(axes[0][len(ranks):], shares):
        for arm in low["arms"]:
            _mean_curve(ax, cells_of(lowdata, name=arm, fraction=fraction), arm, color[arm])
        ax.set_title(f"low data, {fraction:.0%} of the images: val loss (mean over seeds)")
    for ax, rank in zip(axes[0], ranks):
        for arm in plan["arms"]:
            _mean_curve(ax, cells_of(grid, name=arm, rank=rank) or (cells_of(grid, name=arm, rank=0)
                                                                     if rank == ranks[-1] else []), arm, color[arm])
        ax.set_title(f"rank {rank}: validation loss (mean over seeds)")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, dict | list)})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _commits_line(rows: list[dict[str, Any]]) -> str:
    """Which code versions the cells ran: a comparison is only fair within one version of the method."""
    counts: dict[str, int] = {}
    for r in rows:
        key = r.get("code_commit", "unknown")[:12]
        counts[key] = counts.get(key, 0) + 1
    return "Code: " + ", ".join(f"`{c}` ({n} cells)" for c, n in sorted(counts.items())) + "."


def _machines_line(rows: list[dict[str, Any]], lowdata: bool = True) -> str:
    """Which base model and machines the scored cells ran on: a seed whose arms ran on machines with other
    numerics fingerprints is paired across arithmetic, which adds noise to its differences but no bias."""
    bases: dict[str, int] = {}
    machines: dict[str, set[int]] = {}
    for r in rows:
        sha = (r.get("base_sha256") or "not recorded")[:12]
        bases[sha] = bases.get(sha, 0) + 1
        m = r.get("machine") or {}
        cpu = m.get("cpu", {})
        key = (f"{cpu.get('model name', '?')} family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')}, "
               f"numerics `{m.get('numerics_fingerprint', 'not recorded')}`")
        machines.setdefault(key, set()).add(int(r["seed"]))
    seen = [s for seeds in machines.values() for s in seeds]
    mixed = sorted({s for s in seen if seen.count(s) > 1})
    based = "" if set(bases) == {"not recorded"} else (
        " base model " + ", ".join(f"`{b}` ({n} cells)" for b, n in sorted(bases.items())) + ";")
    return (f"{'Grid and low-data' if lowdata else 'Grid'} cells:{based} machines " + "; ".join(f"{k} (seeds {sorted(v)})" for k, v in sorted(machines.items()))
            + (f"; seeds {mixed} have cells on more than one machine." if mixed else "."))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(plan, gate_rows, gate, lr_rows, scales, grid, lowdata, command: str,
                 missing: list[str] | None = None, name: str = "report", title: str = "structlora compare",
                 link_root: Path | None = None, base: dict[str, Any] | None = None, budget: str = "") -> Path:
    """Write the report files into plan['results']; returns the markdown file. Image links are relative to
    `link_root` (default: the results folder, where report.md is); `budget` says what every cell did."""
    out = Path(plan["results"])
    out.mkdir(parents=True, exist_ok=True)
    ref, arms = plan["reference"], list(plan["arms"])
    metrics = report_metrics(grid + list(lowdata), plan.get("metric", "test_loss")) if grid or lowdata else []
    low = plan.get("lowdata") or {"fractions": [], "arms": []}
    tests = comparisons(arms, ref, grid, "grid", metrics) + [
        {**c, "fraction": f} for f in low["fractions"]
        for c in comparisons(low["arms"], ref, cells_of(lowdata, fraction=f), "lowdata", metrics)]
    ablations = ablation_comparisons(plan, grid, metrics)
    forgotten = comparisons(arms, ref, forgetting_view(grid), "forgetting", metrics)
    lc_tests = long_context_comparisons(arms, ref, grid, plan.get("long_context_pairs"))
    assign(tests + ablations + forgotten + lc_tests, families_of(plan))
    reused = reused_tuning_seeds(plan) if grid else []
    sensitivity = without_seeds(plan, grid, metrics, reused) if reused else []
    first = (gate_rows or lr_rows or grid or [{}])[0]
    primary = metrics[0].label if metrics else plan.get("metric", "test_loss")
    lower = metrics[0].lower_better if metrics else True
    lines = [f"Command: `{command}` (date {datetime.date.today().isoformat()}, torch {first.get('torch')}, "
             f"{first.get('threads')} thread(s) per cell). {budget}{' ' if budget else ''}"
             f"Primary metric: {'teacher-forced ' if primary == 'test loss' else ''}{primary} "
             f"({'lower' if lower else 'higher'} is better).",
             "", _commits_line(gate_rows + lr_rows + grid + list(lowdata)),
             *(["", _machines_line(grid + list(lowdata), bool(plan.get("lowdata")))] if grid or lowdata else []),
             *(["", f"**Partial report: {len(missing)} cells are not finished yet** (e.g. `{missing[0]}`): the "
                "phases after the unfinished one are not shown."] if missing else []),
             "", f"Statistics: every comparison is paired by seed. Interval: the {INTERVAL} of the mean paired "
                 "difference (Student t, n - 1 degrees of freedom: the paired t-test's own, so it excludes 0 exactly "
                 "when the unadjusted p is below 0.05; it assumes roughly normal differences between seeds). It is "
                 "a per-test interval, not adjusted for multiplicity; the Holm p is.",
             *(["", *family_lines(plan, tests + ablations + forgotten + lc_tests)] if grid or lowdata else []),
             *(["", f"Tuning seeds: the grid's seeds {reused} were also tuning seeds (the plan reuses them, "
                    "`reuse_tune_seeds`), so those seeds' grid cells inherit the selection made on their validation "
                    "loss; section \"Without the tuning seeds\" repeats the primary family without them."]
               if reused else [])]
    if gate_rows:
        g = plan["gate"]
        lines += ["", f"### 1. The gate (StructLoRA, rank {g['rank']}, validation loss over seeds {g['seeds']})", "",
                  "Stage 1 compares the variants; each later stage tries every refinement on top of the current "
                  f"choice (coordinate descent, at most {g.get('max_stages', 2)} stages, until the choice stays). "
                  "Choice (each stage): the sparsest candidate (fewest kept rank directions) among those whose final "
                  "val loss is within one paired standard error of the best's (one-standard-error rule).", "",
                  *gate_table(gate_rows)]
    lr = plan["lr"]
    if lr_rows:
        lines += ["", f"### 2. Learning rate per arm (rank {lr['rank']}, final validation loss over seeds "
                  f"{lr['seeds']})", "", *lr_table(lr_rows, scales, plan, len(gate_rows))]
    elif scales and len(lr["scales"]) == 1:
        lines += ["", "### 2. Learning rate per arm", "", f"One candidate (x{lr['scales'][0]:g} of each arm's "
                  "configured rate): no search ran; every arm trains at its configured rate times that factor."]
    if grid:
        others = [a for a in arms if a != ref]
        power_arm = "structlora" if "structlora" in others else others[0]
        lines += ["", f"### 3. Test split (mean ± std over seeds {plan['seeds']})", "",
                  *grid_table(arms, grid, metrics, base),
                  "", f"### Effects against {ref} (paired by seed; Holm within each test's family)", "",
                  *effects_table([c for c in tests if c["group"] == "grid"], ref),
                  "", "### Power", "", *power_lines(tests, metrics, power_arm, ref)]
        if reused:
            rest = [s for s in plan["seeds"] if s not in reused]
            lines += ["", "### Without the tuning seeds", "", f"The primary family over seeds {rest} only (seeds "
                      f"{reused} also tuned the learning rate{' and the gate' if plan.get('gate') else ''}): a "
                      "sensitivity check outside every family, not corrected.", "",
                      *(effects_table(sensitivity, ref) if sensitivity else ["(fewer than 2 seeds left)"])]
        if ablations:
            lines += ["", "### Ablations against structlora (paired by seed; Holm within each test's family)", "",
                      *effects_table(ablations, "structlora")]
        if forgotten or any(r.get("forgetting") for r in grid):
            split = next(r["forgetting"]["split"] for r in grid if r.get("forgetting"))
            lines += ["", f"### Forgetting: the `{split}` split (what the base model learned), before and after "
                      "adaptation", "", *forgetting_table(arms, grid, metrics, base), "",
                      f"Against {ref} on the `{split}` split (paired by seed; Holm within each test's family):", "",
                      *effects_table(forgotten, ref)]
        lc = long_context_tables(lc_tests)
        if lc:
            lines += ["", "### Long-context captioning (CIDEr per context length)", "", *lc]
            if base is not None and base.get("long_context_cider"):
                lines += ["", "The base model (not adapted): " + ", ".join(
                    f"{k} tokens {100 * v:.1f}" for k, v in sorted(base["long_context_cider"].items(), key=lambda kv: int(kv[0])))
                    + " (CIDEr x100)."]
        diag = diagnostics_table(arms, grid)
        if diag:
            lines += ["", "### Update structure", "", *diag]
    if lowdata:
        shares = " and ".join(f"{f:.0%}" for f in low["fractions"])
        lines += ["", f"### 4. Low data ({shares} of the training images, rank {low['rank']}, "
                  f"{(lowdata[0]['config'].get('train') or {}).get('max_steps', '?')} steps)", "",
                  *lowdata_table(plan, lowdata, metrics)]
        for f in low["fractions"]:
            rows = [c for c in tests if c["group"] == "lowdata" and c["fraction"] == f]
            if rows:
                lines += ["", f"{f:.0%} of the training images, against {ref}:", "", *effects_table(rows, ref)]
    if grid:
        lines += ["", "### Cost per arm (grid cells)", "", *cost_table(arms, grid)]
    curves = learning_curves(plan, grid, out, lowdata) if grid or lowdata else None
    root = Path(link_root) if link_root is not None else out
    if curves is not None:
        lines += ["", f"![learning curves]({Path(os.path.relpath(curves, root)).as_posix()})"]
    _csv(gate_rows + lr_rows + grid + list(lowdata), out / "cells.csv")
    _csv(tests + ablations + forgotten + lc_tests, out / "tests.csv")
    lines += ["", f"CSV: `{Path(os.path.relpath(out / 'cells.csv', root)).as_posix()}` (every cell), "
              f"`{Path(os.path.relpath(out / 'tests.csv', root)).as_posix()}` (every test)."]
    body = "\n".join(lines)
    (out / f"{name}.md").write_text(f"# {title}\n\n{body}\n")
    summary = {"command": command, "reference": ref, "arms": arms, "primary_metric": plan.get("metric", "test_loss"),
               "metrics": [m.key for m in metrics], "gate": gate, "lr_scales": scales, "missing": missing or [],
               "interval": INTERVAL, "families": families_of(plan), "tests": tests, "ablations": ablations,
               "forgetting": forgotten, "long_context": lc_tests, "without_tuning_seeds": sensitivity,
               "base": {k: (base or {}).get(k) for k in ("scores", "forgetting", "long_context_cider")} if base else None,
               "cells": [{k: r.get(k) for k in ("id", "name", "rank", "seed", "fraction", "scores", "val_losses",
                                                 "trainable_parameters", "step_seconds", "peak_rss_mb")}
                         for r in gate_rows + lr_rows + grid + list(lowdata)]}
    (out / f"{name}.json").write_text(json.dumps(_json_safe(summary), indent=1, sort_keys=True))
    return out / f"{name}.md"
