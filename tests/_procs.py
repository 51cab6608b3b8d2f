"""Helpers for tests that drive the CLI and torchrun in subprocesses on CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env() -> dict[str, str]:
    """The environment of a CPU subprocess: offline hub, accelerate on CPU, one thread, this checkout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(config: str, run_dir: Path, overrides: list[str], *args: str) -> list[str]:
    """`python -m pipeline.cli run CONFIG --run-dir DIR --set ... ARGS` for a config under configs/."""
    sets = [x for s in overrides for x in ("--set", s)]
    return [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / config), "--run-dir", str(run_dir),
            *sets, *args]


def prepare_only(run_dir: Path, overrides: list[str], config: str = "smoke.yaml") -> Path:
    """Run only the prepare stage of `config` with `overrides` into `run_dir` (a world the tests copy)."""
    subprocess.run(run_command(config, run_dir, overrides, "--stages", "prepare"), check=True, env=cpu_env(),
                   capture_output=True, timeout=300)
    return run_dir


def torchrun(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run` on localhost with a free port, then `args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]


def kill_train_after_checkpoints(command: list[str], run_dir: Path, checkpoints: int = 2,
                                 timeout: float = 600) -> None:
    """Start a train stage, SIGKILL it once `checkpoints` complete checkpoints exist, and check that it
    had not finished (a stopped process must leave a resumable run, not a finished one)."""
    proc = subprocess.Popen(command, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "train" / "checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len([p for p in ckpts.glob("step-*") if (p / "COMPLETE").exists()]) >= checkpoints:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train" / "final").exists(), "the run finished before it could be killed"


def load_bench(name: str):
    """A module of bench/ (scripts, not a package), imported from its file."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
