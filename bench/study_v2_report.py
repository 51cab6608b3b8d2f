"""Tables, statistics and plots of study v2 (bench/study_v2.py).

Every comparison is paired by seed against the reference arm (LoRA): the mean difference, its
bootstrap 95% interval (seeds resampled), a paired two-sided t-test, the Holm-adjusted p over
the whole family of comparisons, and the minimum detectable difference (MDD): the true
difference a paired t-test over these seeds would find at alpha 0.05 with 80% power, given the
observed spread of the paired differences.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
from pathlib import Path
from typing import Any

from study_stats import bootstrap_ci, holm, min_detectable, paired_p  # noqa: F401 - the report's statistics

SECTION = "## Method study v2 (bench/study_v2.py)"
# the heading the report had before it counted the tuning cells per arm (the budgets are not equal)
OLD_SECTIONS = ("## Method study v2: one tuning budget for every arm (bench/study_v2.py)",)
# (key in result["scores"], label, scale, lower is better)
METRICS = (("loss_mean", "test loss", 1.0, True), ("CIDEr", "CIDEr x100", 100.0, False),
           ("VQA", "VQA acc", 1.0, False), ("GQA", "GQA acc", 1.0, False))


def _value(result: dict[str, Any], key: str, scale: float = 1.0) -> float:
    v = result.get("scores", {}).get(key, result.get(key))
    return float(v) * scale if v is not None else math.nan


def _fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _by_seed(results: list[dict[str, Any]], key: str, scale: float) -> dict[int, float]:
    return {r["seed"]: _value(r, key, scale) for r in results}


def _cells(results, **keys) -> list[dict[str, Any]]:
    return [r for r in results if all(r.get(k) == v for k, v in keys.items())]


def compare(arm_rows, ref_rows, key: str, scale: float) -> dict[str, float]:
    a, b = _by_seed(arm_rows, key, scale), _by_seed(ref_rows, key, scale)
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    lo, hi = bootstrap_ci(diffs)
    return {"n": len(diffs), "diff": statistics.fmean(diffs) if diffs else math.nan, "lo": lo, "hi": hi,
            "p": paired_p(diffs), "mdd": min_detectable(sd, len(diffs))}


# --- tables -----------------------------------------------------------------------------------------


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
        lines.append(f"| {stage} | {name} | {_fmt(finals, 4)} | {_fmt(best, 4)} | "
                     f"{_fmt([r.get('kept_fraction', math.nan) for r in rs], 2)} | "
                     f"{_fmt([r.get('gate_mean', math.nan) for r in rs], 2)} | {len(rs)} | {mark} |")
    return lines


def lr_table(rows: list[dict[str, Any]], scales: dict[str, float], spec, gate_cells: int = 0) -> list[str]:
    """The lr phase per arm, with each arm's tuning cells (StructLoRA's include the gate phase's) and a
    flag on a choice at the edge of the candidates (the best lr may lie outside what was tried)."""
    cands = spec["lr"]["scales"]
    lines = ["| arm | " + " | ".join(f"lr x{s:g}" for s in cands) + " | chosen | chosen lr | tuning cells |",
             "|---|" + "---:|" * len(cands) + "---|---:|---:|"]
    edges, budget = [], {}
    for arm in spec["lr"]["arms"]:
        cols, chosen_lr = [], ""
        for s in cands:
            rs = [r for r in rows if r["arm"] == arm and r["scale"] == s]
            cols.append(_fmt([float(r["val_losses"][-1][1]) for r in rs if r.get("val_losses")], 4))
            if rs and arm in scales and scales[arm] == s:
                chosen_lr = f"{rs[0]['config']['train']['lr']:.2g}"
        cells = sum(1 for r in rows if r["arm"] == arm) + (gate_cells if arm == "structlora" else 0)
        budget[arm] = cells
        edge = arm in scales and len(cands) > 1 and scales[arm] in (min(cands), max(cands))
        if edge:
            edges.append(arm)
        chosen = f"x{scales[arm]:g}" + (" (edge of the grid)" if edge else "") if arm in scales else "pending"
        lines.append(f"| {arm} | " + " | ".join(cols) + f" | {chosen} | {chosen_lr} | {cells} |")
    for arm, source in spec["lr"]["inherit"].items():
        lines.append(f"| {arm} | " + " | ".join("" for _ in cands) + f" | {source}'s | | 0 |")
    if budget:
        lines += ["", "Tuning cells per arm: " + ", ".join(f"{a} {n}" for a, n in budget.items())
                  + (f" (StructLoRA's include the {gate_cells} cells of the gate phase)" if gate_cells else "")
                  + ". The budgets are not equal: the extra gate tuning can only favour StructLoRA."]
    if edges:
        lines += ["", f"Chosen at the edge of the candidates: {', '.join(edges)}: a learning rate beyond the grid "
                  "was not tried and might do better."]
    return lines


def grid_table(spec, grid) -> list[str]:
    lines = ["| rank | arm | test loss | CIDEr x100 | VQA acc | GQA acc | kept rank share | trainable params | "
             "step (ms) | seeds |", "|---:|---|---|---|---|---|---:|---:|---:|---:|"]
    for rank in sorted({r["rank"] for r in grid}, key=lambda x: (x == 0, x)):
        for arm in spec["arms"]:
            rs = _cells(grid, name=arm, rank=rank)
            if not rs:
                continue
            lines.append(f"| {rank or 'all'} | {arm} | {_fmt([_value(r, 'loss_mean') for r in rs], 4)} | "
                         f"{_fmt([_value(r, 'CIDEr', 100) for r in rs], 1)} | {_fmt([_value(r, 'VQA') for r in rs], 1)} | "
                         f"{_fmt([_value(r, 'GQA') for r in rs], 1)} | "
                         f"{_fmt([r.get('kept_fraction', math.nan) for r in rs], 2)} | "
                         f"{rs[0]['trainable_parameters']:,} | {1e3 * statistics.fmean(r['step_seconds'] for r in rs):.0f} | "
                         f"{len(rs)} |")
    return lines


def comparisons(spec, results, group_label: str) -> list[dict[str, Any]]:
    """Every arm against the reference, per rank (full fine-tuning against the reference's largest rank)."""
    ref = spec["reference"]
    out = []
    ranks = sorted({r["rank"] for r in results if r["rank"]})
    for arm in spec["arms"]:
        if arm == ref:
            continue
        for rank in ranks:
            arm_rows = _cells(results, name=arm, rank=rank) or (_cells(results, name=arm, rank=0)
                                                               if rank == ranks[-1] else [])
            ref_rows = _cells(results, name=ref, rank=rank)
            if not arm_rows or not ref_rows:
                continue
            for key, label, scale, lower in METRICS:
                c = compare(arm_rows, ref_rows, key, scale)
                if c["n"]:
                    out.append({"group": group_label, "arm": arm, "rank": rank, "metric": label, "lower_better": lower,
                                **c})
    return out


def ablation_comparisons(spec, grid) -> list[dict[str, Any]]:
    """What each part of StructLoRA does: the paper variant and the ablations against StructLoRA itself
    (the tests against LoRA cannot say this), per rank where both ran."""
    ref = "structlora"
    arms = [a for a in ("structlora_paper", *spec.get("ablation_arms", [])) if a in spec["arms"]]
    if ref not in spec["arms"] or not arms:
        return []
    rows = comparisons({**spec, "reference": ref, "arms": {a: 1 for a in arms}}, grid, "ablation")
    return [{**c, "reference": ref} for c in rows]


def effects_table(rows: list[dict[str, Any]], ref: str) -> list[str]:
    lines = [f"| rank | arm | metric | difference vs {ref} | 95% bootstrap CI | p | Holm p | verdict | "
             "min. detectable |", "|---:|---|---|---:|---|---:|---:|---|---:|"]
    for c in rows:
        verdict = ""
        if not math.isnan(c["holm"]) and c["holm"] < 0.05:
            better = (c["diff"] < 0) == c["lower_better"]
            verdict = "**better**" if better else "**worse**"
        digits = 4 if c["metric"] == "test loss" else 1
        lines.append(f"| {c['rank']} | {c['arm']} | {c['metric']} | {c['diff']:+.{digits}f} | "
                     f"[{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}] | {c['p']:.3g} | {c['holm']:.3g} | {verdict} | "
                     f"{c['mdd']:.{digits}f} |")
    return lines


def power_lines(rows: list[dict[str, Any]], arm: str = "structlora") -> list[str]:
    lines = ["| metric | seeds | smallest difference detectable (StructLoRA vs LoRA, median over ranks) |",
             "|---|---:|---:|"]
    for _, label, _, _ in METRICS:
        mdds = [c["mdd"] for c in rows if c["arm"] == arm and c["metric"] == label and math.isfinite(c["mdd"])]
        ns = [c["n"] for c in rows if c["arm"] == arm and c["metric"] == label]
        if mdds:
            lines.append(f"| {label} | {max(ns)} | {statistics.median(mdds):.4g} |")
    return lines


def long_context_table(spec, grid) -> list[str]:
    arms = spec["long_context_arms"]
    if len(arms) < 2:
        return []
    a, b = arms[1], arms[0]  # structlora vs lora
    lines = [f"| rank | context tokens | {b} CIDEr x100 | {a} CIDEr x100 | difference | 95% bootstrap CI | p |",
             "|---:|---:|---|---|---:|---|---:|"]
    for rank in sorted({r["rank"] for r in grid if r["rank"]}):
        ra, rb = _cells(grid, name=a, rank=rank), _cells(grid, name=b, rank=rank)
        buckets = sorted({k for r in ra + rb for k in r.get("long_context_cider", {})}, key=int)
        for k in buckets:
            va = {r["seed"]: 100 * r["long_context_cider"][k] for r in ra if k in r.get("long_context_cider", {})}
            vb = {r["seed"]: 100 * r["long_context_cider"][k] for r in rb if k in r.get("long_context_cider", {})}
            seeds = sorted(set(va) & set(vb))
            diffs = [va[s] - vb[s] for s in seeds]
            lo, hi = bootstrap_ci(diffs)
            lines.append(f"| {rank} | {k} | {_fmt(list(vb.values()), 1)} | {_fmt(list(va.values()), 1)} | "
                         f"{statistics.fmean(diffs) if diffs else math.nan:+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                         f"{paired_p(diffs):.3g} |")
    return lines


def diagnostics_table(spec, grid) -> list[str]:
    lines = ["| rank | arm | CosAdj of vec(dW) | CosAdj of batch-averaged dL/dW | CosAdj of dL/dW, per batch | "
             "drift energy / ‖dW‖² | ‖dW‖ | message / LoRA part | kept rank share |",
             "|---:|---|---|---|---|---|---|---|---|"]
    for rank in sorted({r["rank"] for r in grid}, key=lambda x: (x == 0, x)):
        for arm in spec["arms"]:
            rs = _cells(grid, name=arm, rank=rank)
            if not rs:
                continue

            def col(key, digits=3, rs=rs):
                return _fmt([float(r.get(key, math.nan)) for r in rs], digits)

            lines.append(f"| {rank or 'all'} | {arm} | {col('adjacent_cosine')} | {col('grad_adjacent_cosine')} | "
                         f"{col('grad_adjacent_cosine_per_batch')} | {col('drift_energy_normalized')} | "
                         f"{col('update_norm', 2)} | {col('message_share_mean')} | {col('kept_fraction', 2)} |")
    return lines


def _span(steps: list[int]) -> str:
    """'step 800' or 'steps 600-1200': where the seeds' best validation losses fell."""
    if not steps:
        return "n/a"
    return f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}-{steps[-1]}"


def lowdata_table(spec, lowdata) -> list[str]:
    """Test scores, and whether the model overfits: the final train loss, the best validation loss on the
    curve (and where the seeds reached it) against the final one."""
    if not lowdata:
        return []
    low = spec["lowdata"]
    lines = ["| images | arm | test loss | CIDEr x100 | VQA acc | GQA acc | final train loss | best val loss (step) "
             "| final val loss | seeds |", "|---:|---|---|---|---|---|---|---|---|---:|"]
    for fraction, arm in [(f, a) for f in low["fractions"] for a in low["arms"]]:
        rs = _cells(lowdata, name=arm, fraction=fraction)
        if rs:
            curves = [[(int(s), float(v)) for s, v in r.get("val_losses", [])] for r in rs]
            best = [min(c, key=lambda sv: sv[1]) for c in curves if c]
            steps = sorted(s for s, _ in best)
            lines.append(f"| {fraction:.0%} | {arm} | {_fmt([_value(r, 'loss_mean') for r in rs], 4)} | "
                         f"{_fmt([_value(r, 'CIDEr', 100) for r in rs], 1)} | {_fmt([_value(r, 'VQA') for r in rs], 1)} | "
                         f"{_fmt([_value(r, 'GQA') for r in rs], 1)} | "
                         f"{_fmt([float(r.get('final_train_loss', math.nan)) for r in rs], 4)} | "
                         f"{_fmt([v for _, v in best], 4)} ({_span(steps)}) | "
                         f"{_fmt([c[-1][1] for c in curves if c], 4)} | {len(rs)} |")
    return lines


# --- plots and files ------------------------------------------------------------------------------


def _mean_curve(ax, rs, label: str, color: str) -> None:
    curves = [dict((int(s), float(v)) for s, v in r.get("val_losses", [])) for r in rs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if steps:
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker=".", label=label, color=color)


def learning_curves(spec, grid, out: Path, lowdata=()) -> Path | None:
    """Validation loss against steps, mean over seeds, one line per arm: a panel per rank of the grid,
    then one per low-data share (where a model overfits, its curve turns up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in grid if r["rank"]})
    shares = [f for f in spec["lowdata"]["fractions"] if _cells(lowdata, fraction=f)]
    if not ranks and not shares:
        return None
    panels = len(ranks) + len(shares)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    color = {arm: f"C{i % 10}" for i, arm in enumerate(spec["arms"])}  # one colour per arm in every panel
    for ax, fraction in zip(axes[0][len(ranks):], shares):
        for arm in spec["lowdata"]["arms"]:
            _mean_curve(ax, _cells(lowdata, name=arm, fraction=fraction), arm, color[arm])
        ax.set_title(f"low data, {fraction:.0%} of the images: val loss (mean over seeds)")
    for ax, rank in zip(axes[0], ranks):
        for arm in spec["arms"]:
            _mean_curve(ax, _cells(grid, name=arm, rank=rank) or (_cells(grid, name=arm, rank=0)
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
    """Which code versions the cells ran (a study mixes commits only where pipeline/, structlora/,
    data/, eval/ and configs/ are identical: scripts/study_v2.sh runs it from a pinned worktree)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("code_commit", "unknown")[:12]] = counts.get(r.get("code_commit", "unknown")[:12], 0) + 1
    return "Code: " + ", ".join(f"`{c}` ({n} cells)" for c, n in sorted(counts.items())) + "."


def _machines_line(rows: list[dict[str, Any]]) -> str:
    """Which base model and which machines the grid and low-data cells ran on (bench/study_v2.py,
    freeze_base): a seed whose arms ran on machines with different numerics fingerprints is paired
    across arithmetic, which adds noise to its differences but no bias."""
    if not rows:
        return ""
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
    return ("Grid and low-data cells: base model " + ", ".join(f"`{b}` ({n} cells)" for b, n in sorted(bases.items()))
            + "; machines " + "; ".join(f"{k} (seeds {sorted(v)})" for k, v in sorted(machines.items()))
            + (f"; seeds {mixed} have cells on more than one machine." if mixed else "."))


def write_report(spec, gate_rows, gate, lr_rows, scales, grid, lowdata, command: str,
                 benchmarks: Path | None = None, missing: list[str] | None = None) -> Path:
    root = Path(__file__).resolve().parents[1]
    out = root / spec["results"]
    out.mkdir(parents=True, exist_ok=True)
    budget = spec["budget"]["train"]
    low_spec = {**spec, "arms": {a: 1 for a in spec["lowdata"]["arms"]}}
    tests = comparisons(spec, grid, "grid") + [
        {**c, "fraction": f} for f in spec["lowdata"]["fractions"]
        for c in comparisons(low_spec, _cells(lowdata, fraction=f), "lowdata")]
    for c, adjusted in zip(tests, holm([c["p"] for c in tests])):
        c["holm"] = adjusted
    ablations = ablation_comparisons(spec, grid)
    for c, adjusted in zip(ablations, holm([c["p"] for c in ablations])):
        c["holm"] = adjusted
    first = (gate_rows or grid or [{}])[0]
    lines = [f"Command: `{command}` (date {datetime.date.today().isoformat()}, torch {first.get('torch')}, "
             f"{first.get('threads')} thread(s) per cell). Every cell: the shapes world of `{spec['base_config']}` "
             f"and its base model, then {budget['max_steps']} steps of batch {budget['batch_size']}, validation loss "
             f"every {budget['eval_every']} steps on {budget['val_batches']} fixed batches; grid cells are scored on "
             "the whole test split. Primary metric: teacher-forced test loss (lower is better).",
             "", _commits_line(gate_rows + lr_rows + grid + lowdata),
             *(["", _machines_line(grid + lowdata)] if grid or lowdata else []),
             *(["", f"**Partial report: {len(missing)} cells are not finished yet** (e.g. `{missing[0]}`): the "
                "phases after the unfinished one are not shown."] if missing else []),
             "", f"### 1. The gate (StructLoRA, rank {spec['gate']['rank']}, validation loss over seeds "
             f"{spec['gate']['seeds']})", "",
             "Stage 1 compares the variants; each later stage tries every refinement on top of the current choice "
             f"(coordinate descent, at most {spec['gate'].get('max_stages', 2)} stages, until the choice stays). "
             "Choice (each stage): the sparsest candidate (fewest kept rank directions) among those whose final "
             "val loss is within one paired standard error of the best's (one-standard-error rule).", "",
             *gate_table(gate_rows)]
    if lr_rows:
        lines += ["", f"### 2. Learning rate per arm (rank {spec['lr']['rank']}, final validation loss over seeds "
                  f"{spec['lr']['seeds']})", "", *lr_table(lr_rows, scales, spec, len(gate_rows))]
    if grid:
        lines += ["", f"### 3. Test split (mean ± std over seeds {spec['seeds']})", "", *grid_table(spec, grid),
                  "", f"### Effects against {spec['reference']} (paired by seed; Holm over all {len(tests)} tests)", "",
                  *effects_table([c for c in tests if c["group"] == "grid"], spec["reference"]),
                  "", "### Power", "", *power_lines(tests)]
        if ablations:
            lines += ["", f"### Ablations against {ablations[0]['reference']} (paired by seed; Holm over these "
                      f"{len(ablations)} tests, a family of their own)", "",
                      *effects_table(ablations, ablations[0]["reference"])]
        lc = long_context_table(spec, grid)
        if lc:
            lines += ["", "### Long-context captioning (CIDEr per context length)", "", *lc]
        lines += ["", "### Update structure", "", *diagnostics_table(spec, grid)]
    if lowdata:
        low = spec["lowdata"]
        shares = " and ".join(f"{f:.0%}" for f in low["fractions"])
        lines += ["", f"### 4. Low data ({shares} of the training images, rank {low['rank']}, "
                  f"{budget['max_steps']} steps)", "", *lowdata_table(spec, lowdata)]
        for f in low["fractions"]:
            rows = [c for c in tests if c["group"] == "lowdata" and c["fraction"] == f]
            if rows:
                lines += ["", f"{f:.0%} of the training images, against {spec['reference']}:", "",
                          *effects_table(rows, spec["reference"])]
    curves = learning_curves(spec, grid, out, lowdata) if grid or lowdata else None
    if curves is not None:
        lines += ["", f"![learning curves]({Path(os.path.relpath(curves, root)).as_posix()})"]
    _csv(gate_rows + lr_rows + grid + lowdata, out / "cells.csv")
    _csv(tests + ablations, out / "tests.csv")
    lines += ["", f"CSV: `{Path(os.path.relpath(out / 'cells.csv', root)).as_posix()}` (every cell), "
              f"`{Path(os.path.relpath(out / 'tests.csv', root)).as_posix()}` (every test)."]
    body = "\n".join(lines)
    (out / "study.md").write_text(f"# {SECTION[3:]}\n\n{body}\n")
    if benchmarks is not None:
        from inference import update_benchmarks

        text = benchmarks.read_text(encoding="utf-8") if benchmarks.is_file() else ""
        for old in OLD_SECTIONS:  # renamed: replace it in place rather than append a second section
            if old in text:
                benchmarks.write_text(text.replace(old, SECTION), encoding="utf-8")
        update_benchmarks(benchmarks, body, section=SECTION)
    return out / "study.md"
