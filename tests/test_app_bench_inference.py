"""bench/inference.py: a two-round run works end to end, and it rewrites only its own BENCHMARKS.md section."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_run_prints_a_table(bench, capsys):
    assert bench.main(["--presets", "tiny", "--rounds", "2", "--warmup", "0", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | 1.04M | merged |" in out and "| tiny | 1.04M | adapter |" in out
    assert "Command: `python bench/inference.py --presets tiny --rounds 2" in out


def test_ratio_ci_brackets_the_median(bench):
    ratio, low, high = bench.ratio_ci([2.0, 2.2, 1.8, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert ratio == pytest.approx(2.0) and low <= ratio <= high


def test_update_benchmarks_replaces_only_its_section(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n## Data loading\n\nkeep me\n\n{bench.SECTION}\n\nold numbers\n\n## Other\n\nme too\n")
    bench.update_benchmarks(path, "new numbers")
    text = path.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert "keep me" in text and "## Other\n\nme too" in text
    assert text.index("## Data loading") < text.index(bench.SECTION) < text.index("## Other")
    fresh = tmp_path / "NEW.md"
    bench.update_benchmarks(fresh, "first")
    assert fresh.read_text() == f"# Benchmarks\n\n{bench.SECTION}\n\nfirst\n"
