"""bench/study.py --quick (the first study, kept as history): the whole path (search on val, grid,
ablation, low-data sweep, t-tests, CSVs, plots, BENCHMARKS.md section) on a CI-sized grid, and a
re-run cell reproduces its numbers. Marked slow: study v2 (tests/test_bench_study_v2.py) runs the
same cell machinery in the default suite."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from _procs import load_bench

ROOT = Path(__file__).resolve().parents[1]


_load = load_bench


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """Run the quick study once (two cells side by side), into temp folders."""
    tmp = tmp_path_factory.mktemp("study")
    spec = yaml.safe_load((ROOT / "bench" / "study.yaml").read_text())
    spec["quick"]["work_dir"] = str(tmp / "work")
    spec["quick"]["results"] = str(tmp / "results")
    study_file = tmp / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    bench_md = tmp / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    study = _load("study")
    args = [str(study_file), "--quick", "--jobs", "2", "--update-benchmarks", "--benchmarks-file", str(bench_md)]
    assert study.main(args) == 0
    return study, study_file, tmp, bench_md, args


@pytest.mark.slow
def test_quick_study_writes_every_table_csv_and_plot(quick_study):
    _, _, tmp, bench_md, _ = quick_study
    results = tmp / "results"
    cells = list((results / "cells").rglob("*.json"))
    # search 2 + grid 2 methods x 2 seeds + ablation 2 seeds + low-data 2 methods x 2 seeds
    assert len(cells) == 12
    for path in cells:
        cell = json.loads(path.read_text())
        assert set(cell["scores"]) == {"CIDEr", "VQA", "GQA"}
        assert cell["trainable_parameters"] > 0 and cell["step_seconds"] > 0 and cell["peak_rss_mb"] > 0
        assert cell["depth_edges"] > 0
    search = [json.loads(p.read_text()) for p in (results / "cells" / "search").glob("*.json")]
    assert {c["split"] for c in search} == {"val"}  # the search never sees the test split
    grid = [json.loads(p.read_text()) for p in (results / "cells" / "grid").glob("*.json")]
    assert {c["split"] for c in grid} == {"test"}
    with (results / "tests.csv").open() as f:
        tests = list(csv.DictReader(f))
    assert {t["table"] for t in tests} >= {"grid", "structlora_vs", "ablation", "fraction"}
    assert all(t["seeds"] == "2" for t in tests)
    for name in ("score_vs_rank.png", "score_vs_fraction.png", "cells.csv", "study.md"):
        assert (results / name).stat().st_size > 0
    text = bench_md.read_text()
    assert "## Method study" in text and "| StructLoRA vs | wins | ties | losses | untestable |" in text
    assert "## Another section\n\nkept" in text  # other sections are left alone
    assert "### Ablations" in text and "select_norm" in text and "### Low-data sweep" in text


@pytest.mark.slow
def test_report_only_rebuilds_the_same_tables(quick_study):
    study, study_file, tmp, _, _ = quick_study
    before = (tmp / "results" / "cells.csv").read_text()
    (tmp / "results" / "cells.csv").unlink()
    assert study.main([str(study_file), "--quick", "--report-only"]) == 0
    assert (tmp / "results" / "cells.csv").read_text() == before


@pytest.mark.slow
def test_a_rerun_cell_reproduces_its_numbers(quick_study):
    study, study_file, tmp, _, args = quick_study
    path = next((tmp / "results" / "cells" / "grid").glob("structlora-*-s1.json"))
    first = json.loads(path.read_text())
    path.unlink()
    shutil.rmtree(tmp / "work" / "cells" / "grid" / path.stem)
    assert study.main(args) == 0  # runs that one cell again, nothing else
    again = json.loads(path.read_text())
    for key in ("scores", "trainable_parameters", "final_train_loss", "adjacent_cosine", "drift_energy"):
        assert again[key] == first[key], key


def test_paired_test_pairs_by_seed_and_marks_only_significant_differences():
    report = _load("study_report")
    a = {0: 30.0, 1: 32.0, 2: 31.0}
    b = {2: 28.9, 0: 28.0, 1: 30.2}  # order does not matter: seeds pair up
    diff, p = report.paired_test(a, b)
    assert diff == pytest.approx((2.0 + 1.8 + 2.1) / 3)
    from scipy.stats import ttest_rel

    assert p == pytest.approx(ttest_rel([30.0, 32.0, 31.0], [28.0, 30.2, 28.9]).pvalue)
    assert report.mark(diff, p) in ("+", "++") and report.mark(-diff, p).startswith("-")
    assert report.mark(1.0, 0.2) == ""
    # a constant difference has no variance: no test, no mark
    diff, p = report.paired_test({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})
    assert diff == 0.5 and p != p and report.mark(diff, p) == ""
    # one shared seed: no test
    assert report.paired_test({0: 1.0, 1: 2.0}, {1: 1.0})[1] != report.paired_test({0: 1.0, 1: 2.0}, {1: 1.0})[1]
