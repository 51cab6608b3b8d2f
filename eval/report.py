"""``metrics.json`` and a markdown report for one or more models scored on the same samples.

``write_comparison`` writes both (layout in its docstring: schema 2, which keeps schema 1's
``metrics`` / ``base`` keys that the publish stage and the demo read); ``write_report`` is the
one-run form (adapted, and its base when given). Each task block is what the eval functions
return ("caption", "vqav2", "gqa", "classification", "long_context", ...). Per-item tables (``perQuestion``, ``per_image``) are
dropped by default: they can be 200k entries and belong in their own files. Both files are
written with the temp-then-rename rule, so a reader never sees half of one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.predictions import write_json_atomic, write_text_atomic
from eval.report_data import data_headline, data_section  # noqa: F401 - data_section is also the tests'

SCHEMA_VERSION = 2
# Tables with one entry per item or per fine-grained type: kept out of the report table.
DETAIL_KEYS = frozenset({"perQuestion", "per_image", "per_sample", "per_item", "missing_ids", "perQuestionType",
                         "perSemanticType", "perStructuralType", "results_file", "budget", "bleu_counts"})
INVALID_MARK = " (invalid file)"
# Bookkeeping numbers that are not scores.
_NOT_SCORES = frozenset({"num_questions", "num_predictions", "num_images", "num_binary", "num_open", "missing",
                         "duplicates", "ignored_unbalanced", "num_samples", "coverage", "prompt_tokens",
                         "num_examples", "context_length", "schema", "headline_value", "tokens", "dropped"})
_LARGE_KEYS = frozenset({"perQuestion", "per_image", "per_sample", "per_item", "bleu_counts"})
# what a row of the table is, where its name alone does not say (conversations: corpus statistics)
ROW_LABELS = {"conversations.bleu4": "conversations.bleu4 (corpus BLEU-4 x100)",
              "conversations.cider": "conversations.cider (corpus CIDEr-D)"}
METRIC_NOTES = ("Captions: pycocoevalcap raw values (CIDEr 1.162 = 116.2 in papers). VQAv2: official vqaEval accuracy, "
                "percent. GQA: exact match on balanced questions after LLaVA's conversion, percent. Conversations: "
                "exact_match, token_f1 and anls are means over the answers (x100); bleu4 is pycocoevalcap's corpus "
                "Bleu_4 x100 and cider its corpus CIDEr (CIDEr-D, raw); per-answer values (bleu4_sentence, "
                "cider_sentence) are in each model's conversations_samples.jsonl.")


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


def invalid_prefixes(tasks: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted prefixes of the score blocks whose results file failed its official schema."""
    found: list[str] = []
    for key, value in tasks.items():
        if isinstance(value, Mapping):
            check = value.get("results_file")
            if isinstance(check, Mapping) and check.get("valid") is False:
                found.append(f"{prefix}{key}.")
            found += invalid_prefixes(value, f"{prefix}{key}.")
    return found


def _cell(flat: Mapping[str, float], key: str, invalid: Sequence[str]) -> str:
    text = _fmt(flat.get(key))
    return text + INVALID_MARK if text and any(key.startswith(p) for p in invalid) else text


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    text = _fmt(a - b)
    return text if text.startswith("-") else "+" + text


def render_comparison(models: Mapping[str, Mapping[str, Any]], reference: str | None = None,
                      title: str = "Evaluation report", plots: Mapping[str, str] | None = None,
                      differences: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
                      sources: Mapping[str, str] | None = None, notes: Sequence[str] = (),
                      timings: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                      data: Mapping[str, Any] | None = None) -> str:
    """Markdown: what was scored and lost (first lines), one score column per model (and a delta column
    per model against `reference`; scores from a results file that fails its official schema are marked
    "(invalid file)"), the paired-bootstrap differences when given, coverage notes, `notes`, the data
    accounting, plots."""
    from eval.budget import budget_lines
    from eval.compare import format_difference

    flat = {name: flatten_scores(tasks) for name, tasks in models.items()}
    invalid = {name: invalid_prefixes(tasks) for name, tasks in models.items()}
    names = list(models)
    others = [n for n in names if n != reference] if reference in models else []
    rows = list(dict.fromkeys(key for name in names for key in flat[name]))
    lines = [f"# {title}", "", *data_headline(data)]
    if sources:
        lines += [f"- **{name}**: `{sources[name]}`" for name in names if name in sources] + [""]
    if len(names) == 1:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {ROW_LABELS.get(key, key)} | {_cell(flat[names[0]], key, invalid[names[0]])} |" for key in rows]
    else:
        ordered = ([reference] if reference in models else []) + [n for n in names if n != reference]
        deltas = ["delta"] if len(others) == 1 else [f"{n} - {reference}" for n in others]
        lines += ["| metric | " + " | ".join(ordered + deltas) + " |", "|---|" + "---:|" * (len(ordered) + len(deltas))]
        for key in rows:
            cells = [_cell(flat[n], key, invalid[n]) for n in ordered]
            cells += [_delta(flat[n].get(key), flat[reference].get(key)) for n in others]
            lines.append(f"| {ROW_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no metrics) | |")
    if differences and others:
        keys = list(dict.fromkeys(k for n in others for k in differences.get(n, {})))
        if keys:
            any_row = next(iter(differences[others[0]].values()), {})
            level = int(round(100 * any_row.get("level", 0.95)))
            lines += ["", f"## Differences against {reference}", "",
                      f"Mean per-item difference with a paired bootstrap {level}% interval over the items "
                      f"({any_row.get('resamples', '?')} resamples); items = images (CIDEr), questions (VQA, GQA) or conversations (your own data).", "",
                      "| score | items | " + " | ".join(others) + " |", "|---|---:|" + "---:|" * len(others)]
            for key in keys:
                count = next((differences[n][key]["items"] for n in others if key in differences.get(n, {})), 0)
                cells = [format_difference(differences.get(n, {}).get(key, {})) for n in others]
                lines.append(f"| {ROW_LABELS.get(key, key)} | {count} | " + " | ".join(cells) + " |")
            if any(r.get("statistic") == "corpus" for n in others for r in differences.get(n, {}).values()):
                lines += ["", "Corpus BLEU-4: the difference of the two corpus values; each resample draws answers "
                              "and recomputes both from their n-gram counts (not a mean of sentence BLEUs)."]
    budgets = budget_lines(models)
    if budgets:
        lines += ["", "## Generation budget", "", *[f"- {line}" for line in budgets]]
    coverage = [line for name in names for line in _coverage_lines(models[name], name)]
    if coverage:
        lines += ["", "## Coverage", "", *coverage]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    lines += data_section(data)
    if timings:
        tasks = list(dict.fromkeys(t for per in timings.values() for t in per))
        lines += ["", "## Generation speed (samples/s, all ranks)", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for name, per in timings.items():
            cells = [f"{per[t]['samples_per_second']:.3f}" if per.get(t, {}).get("seconds") else "" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", METRIC_NOTES]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def render_report(metrics: Mapping[str, Any], base: Mapping[str, Any] | None = None,
                  title: str = "Evaluation report", plots: Mapping[str, str] | None = None) -> str:
    """Markdown of one run: a metrics table (base | adapted | delta when `base` is given), coverage, plots."""
    if base is None:
        return render_comparison({"run": metrics}, None, title, plots)
    return render_comparison({"base": base, "adapted": metrics}, "base", title, plots)


def _relative(paths: Mapping[str, Path] | None, run_dir: Path) -> dict[str, str]:
    """Plot paths relative to `run_dir` when they are inside it, so the folder can be moved."""
    rel: dict[str, str] = {}
    for name, path in (paths or {}).items():
        path = Path(path)
        try:
            rel[name] = str(path.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            rel[name] = str(path)
    return rel


def write_comparison(out_dir: Path, models: Mapping[str, Mapping[str, Any]], reference: str | None = None,
                     plots: Mapping[str, Path] | None = None, title: str = "Evaluation report",
                     differences: Mapping[str, Any] | None = None, sources: Mapping[str, str] | None = None,
                     samples: Mapping[str, int] | None = None, notes: Sequence[str] = (),
                     keep_details: bool = False, timings: Mapping[str, Any] | None = None,
                     data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``metrics.json`` (schema 2) and ``report.md`` for models scored on the same samples.

    ``metrics.json``::

        {"schema": 2, "title", "reference", "models": {name: {task: {...}}}, "sources": {name: str},
         "differences": {name: {score: {"difference", "low", "high", "items", ...}}},
         "samples": {task: count}, "notes": [...], "plots": {name: relative path},
         "timings": {name: {task: {"samples", "seconds", "samples_per_second"}}},
         "data": {"eval": {task: account}, "train": {...}, "base": {...}},
         "metrics": {...}, "base": {...} | null}

    ``data`` (``data.accounting``): per scored task what its split holds, what was scored, what was
    lost and why; for a run, also what its training streams skipped, per epoch and in total. A score
    block's ``results_file`` says whether its results file passed the official schema.

    ``metrics`` is the first model other than the reference and ``base`` the reference's
    scores: the layout of schema 1, which the publish stage and the demo read.
    """
    out_dir = Path(out_dir)
    rel_plots = _relative(plots, out_dir)
    stored = {name: (tasks if keep_details else drop_large_tables(tasks)) for name, tasks in models.items()}
    primary = next((n for n in models if n != reference), reference)
    payload = {"schema": SCHEMA_VERSION, "title": title, "reference": reference, "models": stored,
               "sources": dict(sources or {}), "differences": dict(differences or {}), "samples": dict(samples or {}),
               "notes": list(notes), "plots": rel_plots, "timings": dict(timings or {}), "data": dict(data or {}),
               "metrics": stored.get(primary, {}), "base": stored.get(reference) if reference != primary else None}
    metrics_path = write_json_atomic(payload, out_dir / "metrics.json")
    text = render_comparison(models, reference, title, rel_plots, differences, sources, notes, timings, data)
    report_path = write_text_atomic(text, out_dir / "report.md")
    return {"metrics": metrics_path, "report": report_path}


def write_report(run_dir: Path, metrics: Mapping[str, Any], base: Mapping[str, Any] | None = None,
                 plots: Mapping[str, Path] | None = None, title: str = "Evaluation report",
                 keep_details: bool = False) -> dict[str, Path]:
    """``write_comparison`` for one run's adapted model (``metrics``) and, optionally, its base."""
    models = {"adapted": metrics} if base is None else {"base": base, "adapted": metrics}
    return write_comparison(run_dir, models, "base" if base is not None else None, plots, title,
                            keep_details=keep_details)


def headline(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The few numbers a person looks at first, per model: CIDEr, VQA and GQA accuracy, top-1."""
    out: dict[str, dict[str, float]] = {}
    for name, tasks in scores.items():
        row: dict[str, float] = {}
        if "caption" in tasks:
            row["CIDEr"] = round(float(tasks["caption"]["metrics"]["CIDEr"]), 4)
        if "vqav2" in tasks:
            row["VQA"] = float(tasks["vqav2"]["overall"])
        if "gqa" in tasks:
            row["GQA"] = float(tasks["gqa"]["accuracy"])
        if "classification" in tasks:
            row["top1"] = float(tasks["classification"]["top1"])
        if "test_loss" in tasks:
            row["test loss"] = float(tasks["test_loss"]["mean"])
        if "conversations" in tasks:
            row[f"conversations {tasks['conversations']['headline']}"] = float(tasks["conversations"]["headline_value"])
        out[name] = row
    return out


def headline_from_file(path: Path) -> dict[str, dict[str, float]] | None:
    """`headline` of a run's metrics.json ({"adapted", "base"}), or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    import json

    data = json.loads(path.read_text())
    return headline({"adapted": data.get("metrics") or {}, "base": data.get("base") or {}})
