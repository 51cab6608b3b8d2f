"""Diagnostics plots, metrics.json and the markdown report; eval's import boundary."""

from __future__ import annotations

import ast
import copy
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.plots import (
    plot_adjacent_cosine,
    plot_diagnostics,
    plot_drift_energy,
    plot_gate_histogram,
    plot_kept_rank,
)
from eval.predictions import write_json_atomic
from eval.report import drop_large_tables, flatten_scores, render_report, write_report

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"


def assert_png(path: Path, min_width: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(path).size
    assert width >= min_width and height >= 200
    assert not list(path.parent.glob(".*.png"))  # no temp file left behind


DIAGNOSTICS = {
    "adjacent_cosine": {"vision.q_proj": [0.9, 0.7, 0.4], "vision.v_proj": [0.8, -0.2, 0.1],
                        "language.q_proj": [0.5, 0.6, 0.7, 0.2], "language.v_proj": [0.3, 0.1, -0.5, 0.0]},
    "drift_energy": {"vision": 0.42, "projector": 0.05, "language": 1.3},
    "kept_rank": {f"language.layers.{i}.q_proj": 8 - i for i in range(4)},
    "gates": {"vision": np.linspace(0.0, 1.0, 32), "language": np.full(16, 0.9)},
}


def test_each_plot_writes_a_readable_png(tmp_path):
    assert_png(plot_adjacent_cosine(DIAGNOSTICS["adjacent_cosine"], tmp_path / "cos.png"))
    assert_png(plot_adjacent_cosine(np.eye(4), tmp_path / "cos_matrix.png"))
    assert_png(plot_drift_energy(DIAGNOSTICS["drift_energy"], tmp_path / "drift_bars.png"))
    assert_png(plot_drift_energy({"hybrid": [3.0, 2.0, 1.5], "off": [3.0, 2.9, 2.8]}, tmp_path / "drift.png",
                                 steps=[0, 50, 100]))
    assert_png(plot_kept_rank(DIAGNOSTICS["kept_rank"], tmp_path / "kept.png", max_rank=8))
    assert_png(plot_gate_histogram(DIAGNOSTICS["gates"], tmp_path / "gates.png"))
    assert_png(plot_gate_histogram(np.random.default_rng(0).random(50), tmp_path / "gates_flat.png", threshold=None))
    with pytest.raises(ValueError):
        plot_kept_rank({}, tmp_path / "empty.png")


def test_plot_diagnostics_draws_what_is_there(tmp_path):
    plots = plot_diagnostics(DIAGNOSTICS, tmp_path, max_rank=8)
    assert set(plots) == {"adjacent_cosine", "drift_energy", "kept_rank", "gates"}
    for path in plots.values():
        assert_png(path)
    assert set(plot_diagnostics({"drift_energy": 0.5}, tmp_path / "only")) == {"drift_energy"}


RUN = {
    "caption": {"metrics": {"CIDEr": 0.95, "Bleu_4": 0.21}, "per_image": {1: {"CIDEr": 0.9}}, "missing": 0},
    "vqav2": {"overall": 61.5, "perAnswerType": {"yes/no": 80.0}, "perQuestion": {1: 100.0},
              "perQuestionType": {"what": 50.0}, "missing": 2, "num_questions": 10, "coverage": 0.8},
}
BASE = {"caption": {"metrics": {"CIDEr": 0.55, "Bleu_4": 0.25}}, "vqav2": {"overall": 40.0}}


def test_flatten_scores_keeps_headlines_only():
    assert flatten_scores(RUN) == {"caption.metrics.CIDEr": 0.95, "caption.metrics.Bleu_4": 0.21,
                                   "vqav2.overall": 61.5, "vqav2.perAnswerType.yes/no": 80.0}


def test_render_report_base_vs_adapted():
    text = render_report(RUN, BASE, title="tiny run")
    assert text.startswith("# tiny run\n")
    assert "| caption.metrics.CIDEr | 0.5500 | 0.9500 | +0.4000 |" in text
    assert "| caption.metrics.Bleu_4 | 0.2500 | 0.2100 | -0.0400 |" in text
    assert "| vqav2.overall | 40.00 | 61.50 | +21.50 |" in text
    assert "2 of 10 items had no prediction" in text
    assert "| metric | value |" in render_report(RUN)


def test_write_report_atomic_and_relative_plots(tmp_path):
    run_before = copy.deepcopy(RUN)
    png = plot_kept_rank(DIAGNOSTICS["kept_rank"], tmp_path / "plots" / "kept.png")
    paths = write_report(tmp_path, RUN, BASE, plots={"kept_rank": png}, title="run")
    assert RUN == run_before
    data = json.loads(paths["metrics"].read_text())
    assert data["schema"] == 2 and data["plots"] == {"kept_rank": "plots/kept.png"}
    assert "perQuestion" not in data["metrics"]["vqav2"] and "per_image" not in data["metrics"]["caption"]
    assert data["metrics"]["vqav2"]["perQuestionType"] == {"what": 50.0}
    assert data["base"]["vqav2"]["overall"] == 40.0
    assert "![kept_rank](plots/kept.png)" in paths["report"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plots", "report.md"]
    kept = write_report(tmp_path / "full", RUN, keep_details=True)
    assert json.loads(kept["metrics"].read_text())["metrics"]["vqav2"]["perQuestion"] == {"1": 100.0}


def test_drop_large_tables_does_not_mutate():
    before = copy.deepcopy(RUN)
    slim = drop_large_tables(RUN)
    assert RUN == before and "perQuestion" not in slim["vqav2"]


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic({"a": 1}, target)
    write_json_atomic({"b": np.float32(2.5), "c": np.arange(2)}, target)
    assert json.loads(target.read_text()) == {"b": 2.5, "c": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    write_json_atomic({"a": 1}, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by the other users of a cluster

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"b": 2}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_eval_never_imports_structlora_or_pipeline():
    files = sorted(EVAL_DIR.glob("*.py"))
    assert files
    for path in files:
        roots = {name.split(".")[0] for name in _imported_modules(path)}
        assert not roots & {"structlora", "pipeline"}, f"{path.name} imports {roots & {'structlora', 'pipeline'}}"
        assert len(path.read_text().splitlines()) <= 420, f"{path.name} is too long"


def test_results_files_that_fail_their_schema_are_scored_and_marked_invalid_in_the_table(tmp_path):
    """String image ids (a user's own COCO-style data) are not the official integer ids: the caption file
    and every long-context bucket's file fail the schema, are scored all the same, and their scores are
    marked in the report's table and in metrics.json."""
    from types import SimpleNamespace

    import torch
    from _eval_tiny import tiny_images, tiny_llava, tiny_processor

    from eval.harness import LongContextSettings, evaluate_models, write_outputs
    from eval.harness import ModelEntry as Entry

    processor = tiny_processor()
    images = tiny_images(4)
    examples = {"caption": [{"image_id": f"img-{i}", "image": im, "captions": ["a red square", "a blue circle"]}
                            for i, im in enumerate(images)]}
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    settings = LongContextSettings(samples=2, lengths=[80, 120], pool=["a big green star", "two small circles"],
                                   scale=False, filler="test filler")
    results = evaluate_models([Entry("m", lambda: (tiny_llava(processor), processor))], ["caption", "long_context"],
                              examples, tmp_path, acc, batch_size=2, long_context=settings, say=lambda _: None)
    scores = results.scores["m"]
    assert scores["caption"]["results_file"]["valid"] is False and "image_id" in scores["caption"]["results_file"]["reason"]
    buckets = scores["long_context"]["buckets"]
    assert buckets and all(b["results_file"]["valid"] is False for b in buckets.values())
    assert any("scored, and marked invalid in the table" in note for note in results.notes)
    paths = write_outputs(results, tmp_path, "invalid ids", reference=None)
    table = [line for line in paths["report"].read_text().splitlines() if line.startswith("| caption.metrics.CIDEr")
             or line.startswith("| long_context.buckets.")]
    assert table and all(line.rstrip(" |").endswith("(invalid file)") for line in table)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["models"]["m"]["caption"]["results_file"]["valid"] is False
