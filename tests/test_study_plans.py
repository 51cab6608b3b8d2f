"""The committed study plans that freeze their base model (bench/*.yaml `frozen_base`): the model they name is
committed with that sha256, and the phases they freeze build cells on it, with the kernels' paths pinned. A study
that spans sittings meets several machines, and CPU training differs between CPU models: without this a base
retrained per sitting makes cells of one study adapt different bases (the long-context study lost its last cells
that way)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from _procs import ROOT

from data.shards import file_sha256

PLANS = sorted(p for p in (ROOT / "bench").glob("*.yaml") if "frozen_base" in yaml.safe_load(p.read_text()))


def test_the_studies_that_span_sittings_freeze_their_base():
    assert {p.name for p in PLANS} >= {"study_v2.yaml", "compare_default.yaml", "qlora.yaml"}


@pytest.mark.parametrize("plan_file", PLANS, ids=lambda p: p.stem)
def test_the_frozen_base_is_committed_with_its_sha256(plan_file):
    fb = yaml.safe_load(plan_file.read_text())["frozen_base"]
    weights = ROOT / fb["dir"] / "model.safetensors"
    assert weights.is_file() and file_sha256(weights) == fb["sha256"]
    assert len(fb["prepare_sha256"]) == 64 and (ROOT / fb["dir"] / "README.md").is_file()
    assert fb["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_every_qlora_study_cell_that_trains_adapts_the_frozen_base(monkeypatch):
    from pipeline.compare.plan import grid_cells, load_plan
    from pipeline.compare.tuning import lr_cells

    monkeypatch.chdir(ROOT)  # plans name their files relative to the repository
    plan = load_plan(Path("bench") / "qlora.yaml", None)
    fb = plan["frozen_base"]
    lr = [c for group in lr_cells(plan, None).values() for c in group]
    grid = grid_cells(plan, None, {arm: 1.0 for arm in plan["arms"]})
    assert len(lr) == 4 * 3 * 2 and len(grid) == 4 * 5 + 1  # 4 arms x 3 scales x 2 seeds; 4 arms x 5 seeds + base
    for cell in lr + grid:
        assert cell["match"] == {"base_sha256": fb["sha256"]} and cell["env"] == fb["env"], cell["id"]
        assert cell["shared"].endswith("shared_frozen"), cell["id"]
    quantized = {c["name"] for c in grid if (c["config"].get("model") or {}).get("quantization") == "nf4"}
    assert quantized == {"qlora", "qlora_structlora"}
    assert [c["seed"] for c in grid] == sorted(c["seed"] for c in grid)  # seed-major: a sitting covers whole seeds


def test_the_qlora_verdict_quotes_the_committed_cells(tmp_path, monkeypatch):
    """BENCHMARKS.md's QLoRA section is the study: report-only over the committed cells (matched by their whole
    config, the frozen base's sha256 included) rebuilds every table row that the section quotes."""
    from pipeline.compare.command import run_compare
    from pipeline.compare.plan import load_plan

    monkeypatch.chdir(ROOT)
    results = ROOT / "bench" / "results" / "qlora"
    shutil.copytree(results / "cells", tmp_path / "cells")
    plan = load_plan(Path("bench") / "qlora.yaml", tmp_path / "work")
    plan["results"] = str(tmp_path)
    out = run_compare(plan, report_only=True, command="test")
    assert out["missing"] == []
    report = Path(out["report"]).read_text().splitlines()
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = text[text.index("## The paper's QLoRA arms"):]
    section = section[:section.index("\n## ", 1)]
    quoted = [line for line in section.splitlines() if line.startswith("| ") and set(line) - set("|-: ")]
    assert len(quoted) >= 10
    missing = [line for line in quoted if line not in report]
    assert not missing, missing
