"""A run's ``metrics.json`` and a short markdown report (base vs adapted when both are given).

``metrics.json`` layout (read by the publish stage and the demo)::

    {"schema": 1, "title": str, "metrics": {task: {...}}, "base": {task: {...}} | null,
     "plots": {name: path relative to the run dir}}

where each task block is what the eval functions return ("caption", "vqav2", "gqa",
"classification", "long_context", ...). Per-item tables (``perQuestion``, ``per_image``) are
dropped by default: they can be 200k entries and belong in their own files. Both files are
written with the temp-then-rename rule, so a reader never sees half of one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.predictions import write_json_atomic, write_text_atomic

SCHEMA_VERSION = 1
# Tables with one entry per item or per fine-grained type: kept out of the report table.
DETAIL_KEYS = frozenset({"perQuestion", "per_image", "missing_ids", "perQuestionType", "perSemanticType",
                         "perStructuralType"})
# Bookkeeping numbers that are not scores.
_NOT_SCORES = frozenset({"num_questions", "num_predictions", "num_images", "num_binary", "num_open", "missing",
                         "duplicates", "ignored_unbalanced", "num_samples", "coverage", "prompt_tokens",
                         "num_examples", "context_length", "schema"})
_LARGE_KEYS = frozenset({"perQuestion", "per_image"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def flatten_scores(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Headline scores as dotted keys ("vqav2.overall", "caption.metrics.CIDEr", ...).

    Per-item and per-fine-type tables and bookkeeping counts are left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        key = str(key)
        if key in DETAIL_KEYS or key in _NOT_SCORES:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_scores(value, name + "."))
        elif _is_number(value):
            flat[name] = float(value)
    return flat


def drop_large_tables(metrics: Any) -> Any:
    """A copy of `metrics` without per-item tables (the input is not modified)."""
    if isinstance(metrics, Mapping):
        return {k: drop_large_tables(v) for k, v in metrics.items() if k not in _LARGE_KEYS}
    if isinstance(metrics, list):
        return [drop_large_tables(v) for v in metrics]
    return metrics


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _coverage_lines(metrics: Mapping[str, Any], label: str) -> list[str]:
    lines = []
    for task, block in metrics.items():
        if isinstance(block, Mapping) and _is_number(block.get("missing")) and block["missing"] > 0:
            total = block.get("num_questions", block.get("num_images", "?"))
            lines.append(f"- {label} {task}: {block['missing']} of {total} items had no prediction "
                         f"(scored as wrong; coverage {block.get('coverage', 0):.2%})")
    return lines


def render_report(metrics: Mapping[str, Any], base: Mapping[str, Any] | None = None,
                  title: str = "Evaluation report", plots: Mapping[str, str] | None = None) -> str:
    """Markdown: a metrics table (base | adapted | delta when `base` is given), coverage notes, plots."""
    ours = flatten_scores(metrics)
    theirs = flatten_scores(base) if base is not None else {}
    lines = [f"# {title}", ""]
    if base is not None:
        lines += ["| metric | base | adapted | delta |", "|---|---:|---:|---:|"]
        for name in list(ours) + [n for n in theirs if n not in ours]:
            a, b = ours.get(name), theirs.get(name)
            delta = _fmt(a - b) if a is not None and b is not None else ""
            if delta and not delta.startswith("-"):
                delta = "+" + delta
            lines.append(f"| {name} | {_fmt(b)} | {_fmt(a)} | {delta} |")
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in ours.items()]
    if not ours and not theirs:
        lines.append("| (no metrics) | |")
    notes = _coverage_lines(metrics, "adapted" if base is not None else "run")
    if base is not None:
        notes += _coverage_lines(base, "base")
    if notes:
        lines += ["", "## Coverage", "", *notes]
    lines += ["", "Captions: pycocoevalcap raw values (CIDEr 1.162 = 116.2 in papers). VQAv2: official "
              "vqaEval accuracy, percent. GQA: exact match on balanced questions after LLaVA's conversion, percent."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, metrics: Mapping[str, Any], base: Mapping[str, Any] | None = None,
                 plots: Mapping[str, Path] | None = None, title: str = "Evaluation report",
                 keep_details: bool = False) -> dict[str, Path]:
    """Write ``metrics.json`` and ``report.md`` into `run_dir`; returns their paths.

    Plot paths are stored relative to `run_dir` when they are inside it, so the run directory
    can be moved.
    """
    run_dir = Path(run_dir)
    rel_plots: dict[str, str] = {}
    for name, path in (plots or {}).items():
        path = Path(path)
        try:
            rel_plots[name] = str(path.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            rel_plots[name] = str(path)
    stored = metrics if keep_details else drop_large_tables(metrics)
    stored_base = base if (keep_details or base is None) else drop_large_tables(base)
    payload = {"schema": SCHEMA_VERSION, "title": title, "metrics": stored, "base": stored_base, "plots": rel_plots}
    metrics_path = write_json_atomic(payload, run_dir / "metrics.json")
    report_path = write_text_atomic(render_report(metrics, base, title, rel_plots), run_dir / "report.md")
    return {"metrics": metrics_path, "report": report_path}
