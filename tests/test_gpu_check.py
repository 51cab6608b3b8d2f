"""scripts/gpu_check.sh on a CPU: its arguments, its commands and the format of what it writes (`--dry-run`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_without_a_gpu_it_says_so_and_an_unknown_step_is_refused(tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "no CUDA device here; use --dry-run" in proc.stderr
    assert not (tmp_path / "x.json").exists()
    proc = _run("--dry-run", "--steps", "overhead,warp")
    assert proc.returncode == 2 and "unknown ['warp']" in proc.stderr


def test_the_gpu_commands_are_the_projects_own(tmp_path):
    """The real plan names existing scripts and configs with the GPU options (nothing runs here)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import STEPS, commands

    plan = commands(tmp_path, dry_run=False)
    assert list(plan) == list(STEPS) and sum(limit for _, limit in plan.values()) <= 8 * 60
    for command, _ in plan.values():
        script = next((c for c in command if c.endswith((".py", ".yaml")) and "/" in c), None)
        assert script is not None and (ROOT / script).is_file(), command
    assert "cuda" in plan["overhead"][0] and "fp32,bf16" in plan["overhead"][0]
    assert "model.quantization=nf4" in plan["smoke_nf4"][0] and "bf16,nf4" in plan["memory"][0]
    assert "configs/smoke_vlm.yaml" in plan["smoke_vlm_nf4"][0] and "model.quantization=nf4" in plan["smoke_vlm_nf4"][0]


def test_a_dry_run_writes_the_json_and_the_benchmarks_section(tmp_path):
    out, md = tmp_path / "gpu_check.json", tmp_path / "gpu_check.md"
    proc = _run("--dry-run", "--steps", "overhead", "--out", str(out), "--markdown", str(md),
                "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"]["dry_run"] is True and [s["step"] for s in report["steps"]] == ["overhead"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in report["steps"])
    text = md.read_text()
    assert text.startswith("## GPU check (") and "dry run: the format only" in text
    assert "| overhead | ok |" in text and "| LoRA (PEFT) |" in text  # the overhead table itself


@pytest.mark.slow
def test_a_dry_run_of_every_step(tmp_path):
    out, md = tmp_path / "all.json", tmp_path / "all.md"
    proc = _run("--dry-run", "--out", str(out), "--markdown", str(md), "--work", str(tmp_path / "work"), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [s["step"] for s in report["steps"]] == ["overhead", "memory", "smoke_bf16", "smoke_nf4", "smoke_vlm_nf4",
                                                    "eval"]
    for nf4 in report["steps"][3:5]:
        assert nf4["merge_check"]["quantization"] == "nf4" and nf4["merge_check"]["max_abs_diff"] < 1e-4
    assert report["steps"][4]["merge_check"]["model_class"] == "Qwen2_5_VLForConditionalGeneration"
    text = md.read_text()
    assert "| smoke_nf4 | ok |" in text and "| smoke_vlm_nf4 | ok |" in text and "merge max abs diff" in text and "| memory | ok |" in text
