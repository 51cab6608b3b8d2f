"""`structlora compare --pool DIR [DIR...]`: one answer from many comparisons of the same arm pair.

Each DIR is a comparison's results folder (a study's `results`, e.g. bench/results/qlora); its grid cells
(DIR/cells/grid/*.json) give, per rank, the arm minus the reference paired by seed. `DIR:REF,ARM` names
another pair for that folder (e.g. the 4-bit arms of the QLoRA study). Each folder is one comparison, each
seed's differences averaged over the folder's ranks: a study's ranks share its seeds and base model, so they
are not independent comparisons (`per_rank`: one comparison per folder and rank all the same). They are pooled by a random-effects meta-analysis (eval.meta_analysis) per metric:
the primary metric (`--metric`) is the pool's primary family (one test); the other headline metrics that two or
more folders have are its secondary family (Holm). Writes pool.md, pool.json and forest.png; prints pool.md.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path
from typing import Any

from eval.compare_stats import INTERVAL, holm, normalized_scores, summarize
from eval.compare_tables import KNOWN, PRETTY, metric_of
from eval.meta_analysis import random_effects


def _cells(folder: Path) -> list[dict[str, Any]]:
    from eval.errors import EvalInputError

    files = sorted((folder / "cells" / "grid").glob("*.json"))
    if not files:
        raise EvalInputError(f"--pool {folder}: no grid cells (cells/grid/*.json): name a `structlora compare` results "
                        "folder, e.g. bench/results/qlora")
    return [json.loads(f.read_text()) for f in files]


def comparisons(spec: str, pair: tuple[str, str], key: str, scale: float, per_rank: bool = False
                ) -> list[dict[str, Any]]:
    """The comparisons of one `--pool` entry ('DIR' or 'DIR:REF,ARM') on metric `key`."""
    folder, _, names = spec.partition(":")
    ref, arm = tuple(n.strip() for n in names.split(",")) if names else pair
    cells = _cells(Path(folder))
    label = Path(folder).name + (f" ({arm} vs {ref})" if names else "")
    by: dict[int, dict[str, dict[int, float]]] = {}
    bases: dict[int, set[str]] = {}
    for r in cells:
        value = normalized_scores(r).get(key)
        if r.get("name") in (arm, ref) and value is not None and math.isfinite(float(value)):
            by.setdefault(int(r["rank"]), {}).setdefault(r["name"], {})[int(r["seed"])] = float(value) * scale
            bases.setdefault(int(r["rank"]), set()).add((r.get("base_sha256") or "not recorded")[:12])
    diffs = {rank: {s: d[arm][s] - d[ref][s] for s in sorted(set(d.get(arm, {})) & set(d.get(ref, {})))}
             for rank, d in sorted(by.items())}
    diffs = {rank: d for rank, d in diffs.items() if d}
    if not per_rank and len(diffs) > 1:
        seeds = sorted(set.intersection(*(set(d) for d in diffs.values())))
        merged = {s: statistics.fmean(d[s] for d in diffs.values()) for s in seeds}
        return [_entry(f"{label} ranks {', '.join(map(str, diffs))} (mean per seed)", folder, list(diffs), arm, ref,
                       merged, set().union(*bases.values()), len(seeds) * len(diffs))]
    return [_entry(f"{label} r{rank}", folder, [rank], arm, ref, d, bases[rank], len(d)) for rank, d in diffs.items()]


def _entry(label, folder, ranks, arm, ref, diffs: dict[int, float], bases, pairs: int) -> dict[str, Any]:
    return {"label": label, "dir": str(folder), "ranks": ranks, "arm": arm, "against": ref, "seeds": list(diffs),
            "diffs": list(diffs.values()), "base": sorted(bases), "pairs": pairs, **summarize(list(diffs.values()))}


def pool_metric(entries: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The meta-analysis of the entries with 2 or more seeds and a spread (the others are listed as not pooled),
    and the leave-one-out estimates."""
    used = [e for e in entries if e["n"] >= 2 and e["sd"] > 0]
    out: dict[str, Any] = {"entries": used, "left_out": [e for e in entries if e not in used]}
    if len(used) >= 2:
        out["pooled"] = random_effects([e["diff"] for e in used], [e["sd"] ** 2 / e["n"] for e in used], method)
        for e, w in zip(used, out["pooled"]["weights"]):
            e["weight"] = w
        if len(used) >= 3:
            out["leave_one_out"] = [{"left_out": e["label"], **random_effects(
                [x["diff"] for x in used if x is not e], [x["sd"] ** 2 / x["n"] for x in used if x is not e], method)}
                for e in used]
    return out


def text_forest(result: dict[str, Any], digits: int, width: int = 41) -> list[str]:
    """The forest plot as text: each comparison's estimate (o) and t interval, the pooled diamond <#>, 0 (|)."""
    rows = [(e["label"], e["diff"], e["lo"], e["hi"]) for e in result["entries"]]
    p = result.get("pooled")
    ends = [x for _, d, lo, hi in rows for x in (lo, hi)] + ([p["lo"], p["hi"]] if p else []) + [0.0]
    a, b = min(ends), max(ends)

    def col(x: float) -> int:
        return round((x - a) / (b - a) * (width - 1)) if b > a else width // 2

    def bar(d, lo, hi, mark, left="-", right="-", fill="-") -> str:
        line = [" "] * width
        line[col(0.0)] = "|"
        for i in range(col(lo), col(hi) + 1):
            line[i] = fill
        line[col(lo)], line[col(hi)], line[col(d)] = left, right, mark
        return "".join(line)

    name = max(len(r[0]) for r in rows + [("pooled", 0, 0, 0)])
    out = [f"{label:<{name}}  {bar(d, lo, hi, 'o')}  {d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
           for label, d, lo, hi in rows]
    if p:
        out.append(f"{'pooled':<{name}}  {bar(p['mu'], p['lo'], p['hi'], '#', '<', '>', '=')}  "
                   f"{p['mu']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]")
    axis = [" "] * width
    axis[col(0.0)] = "0"
    left, right = f"{a:+.{digits}f}", f"{b:+.{digits}f}"
    axis[:len(left)] = left
    axis[width - len(right):] = right
    return out + [f"{'':<{name}}  {''.join(axis)[:width]}"]


def verdict_line(arm: str, ref: str, label: str, result: dict[str, Any], digits: int) -> str:
    """The sentence README and BENCHMARKS quote (tests/test_compare_pool.py checks the quote)."""
    p, used = result["pooled"], result["entries"]
    bases = {b for e in used for b in e["base"]}
    return (f"{PRETTY.get(arm, arm)} minus {PRETTY.get(ref, ref)}, {label}, pooled over {p['k']} comparisons "
            f"({sum(e['pairs'] for e in used)} seed pairs, {len(bases)} base model{'s' if len(bases) > 1 else ''}): "
            f"{p['mu']:+.{digits}f}, 95% interval "
            f"[{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}] (random effects, {p['method'].upper()}, Hartung-Knapp), "
            f"p {p['p']:.2g} ({result.get('family', 'no')} family); heterogeneity tau {p['tau']:.{digits}f}, I² {100 * p['I2']:.0f}% (Q {p['Q']:.2f}, "
            f"{p['Q_df']} df, p {p['Q_p']:.2g}); detectable with 80% power: {p['mdd']:.{digits}f}.")


def forest_png(sections: list[tuple[str, dict[str, Any]]], path: Path, xlabel: str = "difference") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(label, r) for label, r in sections if r.get("pooled")]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 0.5 * max(len(r["entries"]) for _, r in shown) + 2),
                             squeeze=False)
    for ax, (label, r) in zip(axes[0], shown):
        es, p = r["entries"], r["pooled"]
        ys = list(range(len(es), 0, -1))
        for y, e in zip(ys, es):
            ax.plot([e["lo"], e["hi"]], [y, y], color="C0")
            ax.plot(e["diff"], y, "s", color="C0", markersize=4 + 14 * e["weight"])
        ax.fill([p["lo"], p["mu"], p["hi"], p["mu"]], [0, 0.25, 0, -0.25], color="C3")
        if math.isfinite(p["pred_lo"]):
            ax.plot([p["pred_lo"], p["pred_hi"]], [-0.6, -0.6], color="C3", linestyle=":")
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_yticks(ys + [0, -0.6], [e["label"] for e in es] + ["pooled (HKSJ)", "prediction"], fontsize=8)
        ax.set_title(f"{label}: difference, 95% intervals", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(result: dict[str, Any], digits: int) -> list[str]:
    lines = [f"| comparison | base model | seed pairs | difference | {INTERVAL} | weight |", "|---|---|---:|---:|---|---:|"]
    for e in result["entries"]:
        lines.append(f"| {e['label']} | {', '.join(e['base'])} | {e['pairs']} | {e['diff']:+.{digits}f} | "
                     f"[{e['lo']:+.{digits}f}, {e['hi']:+.{digits}f}] | {100 * e.get('weight', 0):.0f}% |")
    p = result.get("pooled")
    if p:
        lines.append(f"| **pooled** (random effects, {p['method'].upper()}; Hartung-Knapp interval) | | "
                     f"{sum(e['pairs'] for e in result['entries'])} | {p['mu']:+.{digits}f} | "
                     f"[{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}] | 100% |")
    return lines


def pool(specs: list[str], pair: tuple[str, str], primary: str, out: Path, method: str = "reml",
         per_rank: bool = False, command: str = "structlora compare --pool") -> dict[str, Any]:
    """Pool every entry of `specs` (see the module) on the primary metric and the other headline metrics."""
    ref, arm = pair
    keys = [primary] + [k for k in KNOWN if k != primary]
    sections = []
    for key in keys:
        m = metric_of(key)
        entries = [e for spec in specs for e in comparisons(spec, pair, key, m.scale, per_rank)]
        if key == primary or len({e["dir"] for e in entries if e["n"] >= 2}) >= 2:  # others: 2 or more studies
            sections.append((m, pool_metric(entries, method)))
    secondary = [r for m, r in sections[1:] if r.get("pooled")]
    for r, adjusted in zip(secondary, holm([r["pooled"]["p"] for r in secondary])):
        r["pooled"]["holm"], r["family"] = adjusted, "secondary"
    if sections[0][1].get("pooled"):
        sections[0][1]["pooled"]["holm"], sections[0][1]["family"] = sections[0][1]["pooled"]["p"], "primary"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {PRETTY.get(arm, arm)} minus {PRETTY.get(ref, ref)}, pooled over comparisons", "",
             f"Command: `{command}` (date {datetime.date.today().isoformat()}).", "",
             f"Each comparison: one study's grid cells, {arm} minus {ref} paired by seed "
             f"{'at one rank' if per_rank else '(each seed averaged over the study ranks)'}, with its {INTERVAL} over "
             "its seeds. "
             "Pooled by a random-effects meta-analysis (tau² by "
             f"{'REML' if method == 'reml' else 'DerSimonian-Laird'}); the pooled interval and p are "
             "Hartung-Knapp-Sidik-Jonkman's (t, k - 1 df). Families: the primary metric is the pool's primary "
             "family (one test); the other metrics (of two or more studies) are its secondary family (Holm). "
             + ("Comparisons of one study share its seeds and base model: with `--per-rank` they are not independent."
                if per_rank else "One comparison per study: a study's ranks share its seeds and base model.")]
    for m, r in sections:
        lines += ["", f"## {m.label} ({r.get('family', 'not pooled')})", "", *_table(r, m.digits)]
        p = r.get("pooled")
        if p:
            lines += ["", verdict_line(arm, ref, m.label, r, m.digits), "",
                      f"p {p['p']:.3g} (family {r['family']}; Holm p {p['holm']:.3g}). Heterogeneity: tau² "
                      f"{p['tau2']:.3g}, Q {p['Q']:.3g} on {p['Q_df']} df (p {p['Q_p']:.3g}), I² {100 * p['I2']:.0f}%. "
                      f"Prediction interval (a new base or data): [{p['pred_lo']:+.{m.digits}f}, "
                      f"{p['pred_hi']:+.{m.digits}f}]. Wald interval (normal, tau² as if known): "
                      f"[{p['wald_lo']:+.{m.digits}f}, {p['wald_hi']:+.{m.digits}f}]. Fixed effect: "
                      f"{p['fixed_mu']:+.{m.digits}f} ± {1.96 * p['fixed_se']:.{m.digits}f}.",
                      "", "```text", *text_forest(r, m.digits), "```"]
        if r.get("left_out"):
            lines += ["", "Not pooled (fewer than 2 seed pairs, or no spread): " + ", ".join(
                f"{e['label']} ({e['n']} seed pair{'s' if e['n'] != 1 else ''})" for e in r["left_out"]) + "."]
        if r.get("leave_one_out"):
            lines += ["", "Leave one out: " + "; ".join(
                f"without {x['left_out']} {x['mu']:+.{m.digits}f} [{x['lo']:+.{m.digits}f}, {x['hi']:+.{m.digits}f}]"
                for x in r["leave_one_out"]) + "."]
    png = forest_png([(m.label, r) for m, r in sections], out / "forest.png", f"{arm} minus {ref}")
    if png is not None:
        lines += ["", "![forest plot](forest.png)"]
    text = "\n".join(lines) + "\n"
    (out / "pool.md").write_text(text)
    summary = {"command": command, "arm": arm, "reference": ref, "method": method, "per_rank": per_rank,
               "metrics": {m.key: {k: v for k, v in r.items()} for m, r in sections}}
    from eval.compare_report import _json_safe

    (out / "pool.json").write_text(json.dumps(_json_safe(summary), indent=1, sort_keys=True))
    print(text)
    return {"report": str(out / "pool.md"), "sections": sections, "text": text}
