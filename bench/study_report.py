"""Tables, CSVs, paired t-tests and plots of the study's finished cells (bench/study.py).

Significance: a paired two-sided t-test over seeds (the same seed gives both methods the same
adapter-init stream and data order), scipy.stats.ttest_rel. Marks: `+` / `-` significantly
better / worse than the reference at p < 0.05 (`++` / `--` at p < 0.01); no mark: not significant.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
from pathlib import Path
from typing import Any

METRICS = ("CIDEr", "VQA", "GQA")
SECTION = "## Method study: StructLoRA vs LoRA, DoRA, AdaLoRA, VeRA (bench/study.py)"


def _scores(results: list[dict[str, Any]], metric: str) -> dict[int, float]:
    return {r["seed"]: r["scores"][metric] for r in results}


def paired_test(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """(mean difference a - b, two-sided p) over the seeds both have; p is nan when undefined."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(seeds) < 2:
        return (diffs[0] if diffs else math.nan), math.nan
    if all(d == diffs[0] for d in diffs):  # no variance: the t statistic is undefined, so no mark
        return diffs[0], (1.0 if diffs[0] == 0 else math.nan)
    return statistics.fmean(diffs), float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def mark(diff: float, p: float) -> str:
    if math.isnan(p) or p >= 0.05:
        return ""
    return ("+" if diff > 0 else "-") * (2 if p < 0.01 else 1)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cell_text(results, metric, ref=None) -> str:
    scale, digits = (100.0, 1) if metric == "CIDEr" else (1.0, 1)
    text = _fmt([r["scores"][metric] for r in results], scale, digits)
    if ref:
        diff, p = paired_test(_scores(results, metric), _scores(ref, metric))
        text += f" {mark(diff, p)}".rstrip()
    return text


def _by(results, **keys) -> list[dict[str, Any]]:
    return [r for r in results if all(r[k] == v for k, v in keys.items())]


def rows_csv(results: list[dict[str, Any]], path: Path) -> None:
    fields = ["id", "group", "name", "rank", "seed", "fraction", "split", *METRICS, "trainable_parameters",
              "step_seconds", "peak_rss_mb", "train_rss_growth_mb", "adjacent_cosine", "drift_energy",
              "update_norm", "final_train_loss"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in sorted(results, key=lambda r: r["id"]):
            writer.writerow({k: (r["scores"][k] if k in METRICS else r.get(k)) for k in fields})


def tests_csv(comparisons: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["table", "rank", "fraction", "method", "against", "metric",
                                               "mean_difference", "p_value", "seeds"])
        writer.writeheader()
        writer.writerows(comparisons)


def _compare(table, method_rows, ref_rows, method, against, rank=None, fraction=None) -> list[dict[str, Any]]:
    out = []
    for metric in METRICS:
        diff, p = paired_test(_scores(method_rows, metric), _scores(ref_rows, metric))
        out.append({"table": table, "rank": rank, "fraction": fraction, "method": method, "against": against,
                    "metric": metric, "mean_difference": diff, "p_value": p,
                    "seeds": len(set(_scores(method_rows, metric)) & set(_scores(ref_rows, metric)))})
    return out


def main_table(spec, grid, comparisons) -> list[str]:
    ref = spec["reference"]
    lines = ["| rank | method | CIDEr x100 | VQA acc | GQA acc | trainable params | step (ms) | peak RSS (MB) |",
             "|---:|---|---|---|---|---:|---:|---:|"]
    for rank in spec["ranks"]:
        ref_rows = _by(grid, name=ref, rank=rank)
        for method in spec["methods"]:
            rows = _by(grid, name=method, rank=0 if method == "full" else rank)
            if not rows or (method == "full" and rank != spec["ranks"][-1]):
                continue
            use_ref = ref_rows if method != ref else None
            cells = [_cell_text(rows, m, use_ref) for m in METRICS]
            if use_ref:
                comparisons += _compare("grid", rows, ref_rows, method, ref, rank=rank)
            shown_rank = "all" if method == "full" else str(rank)
            lines.append(f"| {shown_rank} | {method} | {' | '.join(cells)} | {rows[0]['trainable_parameters']:,} | "
                         f"{1000 * statistics.fmean(r['step_seconds'] for r in rows):.0f} | "
                         f"{statistics.fmean(r['peak_rss_mb'] for r in rows):.0f} |")
    return lines


def wins_table(spec, grid, ablation_rank, comparisons) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
    """StructLoRA against each baseline, paired by seed, over every rank and the three metrics."""
    lines = ["| StructLoRA vs | wins | ties | losses | untestable | mean difference (CIDEr x100 / VQA / GQA) |",
             "|---|---:|---:|---:|---:|---|"]
    tally = {}
    for method in spec["methods"]:
        if method == "structlora":
            continue
        w = t = los = na = 0
        diffs = {m: [] for m in METRICS}
        ranks = [ablation_rank] if method == "full" else spec["ranks"]
        for rank in ranks:
            mine = _by(grid, name="structlora", rank=rank)
            other = _by(grid, name=method, rank=0 if method == "full" else rank)
            if not mine or not other:
                continue
            comparisons += _compare("structlora_vs", mine, other, "structlora", method, rank=rank)
            for metric in METRICS:
                diff, p = paired_test(_scores(mine, metric), _scores(other, metric))
                diffs[metric].append(diff * (100 if metric == "CIDEr" else 1))
                if math.isnan(p):  # fewer than two shared seeds, or a constant difference: no test
                    na += 1
                    continue
                sig = mark(diff, p)
                w, t, los = w + sig.startswith("+"), t + (sig == ""), los + sig.startswith("-")
        tally[method] = (w, t, los)
        mean_diff = " / ".join(f"{statistics.fmean(v):+.2f}" if v else "n/a" for v in diffs.values())
        where = f" (at rank {ablation_rank})" if method == "full" else ""
        lines.append(f"| {method}{where} | {w} | {t} | {los} | {na} | {mean_diff} |")
    return lines, tally


def ablation_table(spec, results, comparisons) -> list[str]:
    r = spec["ablation_rank"]
    full = _by(results, group="grid", name="structlora", rank=r)
    lines = [f"| variant (rank {r}) | CIDEr x100 | VQA acc | GQA acc | trainable params |", "|---|---|---|---|---:|"]
    lines.append(f"| structlora (as searched) | {' | '.join(_cell_text(full, m) for m in METRICS)} | "
                 f"{full[0]['trainable_parameters']:,} |" if full else "| structlora | missing | | | |")
    for name in spec["ablations"]:
        rows = _by(results, group="ablation", name=name)
        if rows:
            comparisons += _compare("ablation", rows, full, name, "structlora", rank=r)
            lines.append(f"| {name} | {' | '.join(_cell_text(rows, m, full) for m in METRICS)} | "
                         f"{rows[0]['trainable_parameters']:,} |")
    return lines


def fraction_table(spec, results, comparisons) -> list[str]:
    r, ref = spec["ablation_rank"], spec["reference"]
    lines = ["| training images | method | CIDEr x100 | VQA acc | GQA acc |", "|---:|---|---|---|---|"]
    for fraction in [*spec["fractions"], 1.0]:
        group = "fraction" if fraction < 1.0 else "grid"
        ref_rows = _by(results, group=group, name=ref, rank=r, fraction=fraction)
        for method in spec["fraction_methods"]:
            rows = _by(results, group=group, name=method, rank=r, fraction=fraction)
            if not rows:
                continue
            use_ref = ref_rows if method != ref else None
            if use_ref:
                comparisons += _compare("fraction", rows, ref_rows, method, ref, rank=r, fraction=fraction)
            lines.append(f"| {fraction:.0%} | {method} | {' | '.join(_cell_text(rows, m, use_ref) for m in METRICS)} |")
    return lines


def diagnostics_table(spec, grid) -> list[str]:
    lines = ["| rank | method | adjacent-layer cosine | drift energy | ‖dW‖ (all modules) |", "|---:|---|---|---|---|"]
    for rank in spec["ranks"]:
        for method in spec["methods"]:
            rows = _by(grid, name=method, rank=rank)
            if rows:
                lines.append(f"| {rank} | {method} | {_fmt([x['adjacent_cosine'] for x in rows], 1, 3)} | "
                             f"{_fmt([x['drift_energy'] for x in rows], 1, 2)} | {_fmt([x['update_norm'] for x in rows], 1, 2)} |")
    return lines


def search_table(search_rows, chosen) -> list[str]:
    from study import score_of

    lines = ["| method | candidate | CIDEr x100 | VQA acc | GQA acc | mean | chosen |", "|---|---|---:|---:|---:|---:|---|"]
    for r in search_rows:
        s = r["scores"]
        pick = chosen.get(r["method"], {})
        chosen_now = "yes" if pick == r.get("candidate_settings", {}) else ""
        lines.append(f"| {r['method']} | {r['candidate']} | {100 * s['CIDEr']:.1f} | {s['VQA']:.1f} | {s['GQA']:.1f} | "
                     f"{score_of(r):.2f} | {chosen_now} |")
    return lines


def plots(spec, results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    grid = _by(results, group="grid")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes, METRICS):
        scale = 100.0 if metric == "CIDEr" else 1.0
        for method in spec["methods"]:
            if method == "full":
                rows = _by(grid, name="full")
                if rows:
                    v = [scale * x["scores"][metric] for x in rows]
                    ax.axhline(statistics.fmean(v), color="grey", linestyle="--", label="full fine-tuning")
                continue
            points = [(rank, [scale * x["scores"][metric] for x in _by(grid, name=method, rank=rank)])
                      for rank in spec["ranks"]]
            _errorbar(ax, points, method, linewidth=2.5 if method == "structlora" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(spec["ranks"], [str(r) for r in spec["ranks"]])
        ax.set_xlabel("rank r")
        ax.set_title(f"{metric}{' x100' if metric == 'CIDEr' else ' accuracy'} (test, mean ± std over seeds)")
        ax.grid(alpha=0.3)
    paths.append(_save(fig, axes, out / "score_vs_rank.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    r = spec["ablation_rank"]
    for ax, metric in zip(axes, METRICS):
        scale = 100.0 if metric == "CIDEr" else 1.0
        for method in spec["fraction_methods"]:
            points = [(f, [scale * x["scores"][metric] for x in _by(results, group="fraction" if f < 1.0 else "grid",
                                                                   name=method, rank=r, fraction=f)])
                      for f in [*spec["fractions"], 1.0]]
            _errorbar(ax, points, method)
        ax.set_xscale("log")
        ax.set_xlabel("share of training images")
        ax.set_title(f"{metric} at rank {r} (test)")
        ax.grid(alpha=0.3)
    paths.append(_save(fig, axes, out / "score_vs_fraction.png"))
    return paths


def _errorbar(ax, points: list[tuple[float, list[float]]], label: str, **style) -> None:
    """One line of mean ± std over seeds through the x positions that have values."""
    points = [(x, v) for x, v in points if v]
    if points:
        ax.errorbar([x for x, _ in points], [statistics.fmean(v) for _, v in points],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points],
                    marker="o", capsize=3, label=label, **style)


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def write_report(spec, results, search_rows, chosen, command: str, benchmarks: Path | None = None,
                 missing: list[str] | None = None) -> Path:
    """Write cells.csv, tests.csv, the plots and study.md under the results folder; optionally the
    study's section of BENCHMARKS.md. Returns the path of study.md."""
    root = Path(__file__).resolve().parents[1]
    out = root / spec["results"]
    out.mkdir(parents=True, exist_ok=True)
    grid = _by(results, group="grid")
    comparisons: list[dict[str, Any]] = []
    rows_csv(results + search_rows, out / "cells.csv")
    first = results[0] if results else {}
    budget = spec["budget"]
    lines = [f"Command: `{command}` (date {datetime.date.today().isoformat()}, torch {first.get('torch')}, "
             f"{first.get('threads')} thread(s) per cell). Every cell: the shapes world of `{spec['base_config']}`, its "
             f"base model, then {budget['train']['max_steps']} steps of batch {budget['train']['batch_size']} "
             f"(lr {first.get('config', {}).get('train', {}).get('lr')}, full fine-tuning "
             f"{spec['methods'].get('full', {}).get('train', {}).get('lr', 'n/a')}), scored on "
             f"{budget['eval']['max_samples']} test samples per task. Marks: `+`/`++` better, `-`/`--` worse "
             "than the reference at p < 0.05 / 0.01, paired two-sided t-test over seeds; no mark: not significant.",
             *(["", f"**Partial report: {len(missing)} of {len(missing) + len(results) + len(search_rows)} cells are "
                f"not finished yet** (e.g. `{missing[0]}`); their rows are missing or hold fewer seeds."] if missing else []),
             "", f"### Search on the validation split (rank {spec['search']['rank']}, seed {spec['search']['seed']})",
             "", *search_table(search_rows, chosen), "",
             f"### Methods x ranks (test split, mean ± std over {len(spec['seeds'])} seeds; marks vs {spec['reference']})",
             "", *main_table(spec, grid, comparisons), ""]
    wins, tally = wins_table(spec, grid, spec["ablation_rank"], comparisons)
    lines += ["### StructLoRA against each baseline (significant wins / ties / losses over ranks x 3 metrics)", "",
              *wins, "", "### Ablations (marks vs StructLoRA as searched)", "",
              *ablation_table(spec, results, comparisons), "",
              f"### Low-data sweep (rank {spec['ablation_rank']}; marks vs {spec['reference']})", "",
              *fraction_table(spec, results, comparisons), "",
              "### Update structure: adjacent-layer cosine and drift energy of dW = W_merged - W_base", "",
              *diagnostics_table(spec, grid), ""]
    tests_csv(comparisons, out / "tests.csv")
    for p in plots(spec, results, out):
        lines.append(f"![{p.stem}]({_rel(p, root)})")
    lines.append("")
    lines.append(f"CSV: `{_rel(out / 'cells.csv', root)}` (every cell), `{_rel(out / 'tests.csv', root)}` "
                 "(every t-test).")
    body = "\n".join(lines)
    (out / "study.md").write_text(f"# {SECTION[3:]}\n\n{body}\n")
    if benchmarks is not None:
        from inference import update_benchmarks

        update_benchmarks(benchmarks, body, section=SECTION)
    return out / "study.md"
