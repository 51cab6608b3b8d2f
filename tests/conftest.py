"""Shared test setup: nothing in the test suite may reach a model or dataset hub."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SmokeRun:
    run: Path
    registry: Path
    command: list[str]
    env: dict[str, str]
    stdout: str


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """configs/smoke.yaml run once through the CLI (every stage), shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("smoke")
    run, registry = tmp / "run", tmp / "registry"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run),
           "--set", f"publish.registry={registry}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SmokeRun(run, registry, cmd, env, proc.stdout)
