"""Plans that share cells: bench/qlora.yaml's float arms are bench/long_context.yaml's cells (bench/qlora_float_cells.py
copies their records), which holds only while the two plans build the same cells."""

from __future__ import annotations

import shutil

import pytest
import yaml
from _procs import load_bench

from pipeline.compare_cells import comparable


def test_the_qlora_studys_float_arms_are_the_long_context_studys_cells(monkeypatch):
    monkeypatch.chdir(".")  # shared_cells works from the repository root; restore the directory after
    script = load_bench("qlora_float_cells")
    pairs = script.shared_cells()
    ids = [src["id"] for src, _ in pairs]
    assert len(ids) == 12 + 10 + 1 and "base/base" in ids  # lr 2 arms x 3 scales x 2 seeds, grid 2 x 5, the base
    for src, dst in pairs:
        assert comparable(src["config"]) == comparable(dst["config"]) and src["result"] != dst["result"]


@pytest.mark.parametrize("change", ["budget", "seeds", "arm"])
def test_a_plan_that_drifts_apart_is_caught(tmp_path, monkeypatch, change):
    from _procs import ROOT

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    for name in ("long_context.yaml", "qlora.yaml", "long_context_config.yaml"):
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    plan = yaml.safe_load((tmp_path / "bench" / "qlora.yaml").read_text())
    if change == "budget":
        plan["budget"]["eval"]["long_context_lengths"] = [96, 160]
    elif change == "seeds":
        plan["seeds"] = [0, 1, 2]
    else:
        plan["arms"]["structlora"] = {"adapter": {"method": "structlora", "alpha": 32}}
    (tmp_path / "bench" / "qlora.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(AssertionError):
        load_bench("qlora_float_cells").shared_cells(tmp_path)
