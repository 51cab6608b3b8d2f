"""Checkpoints that survive a kill: written to a temp directory, verified, renamed; newest valid wins.

Layout: `checkpoints/step-000100/` holding `trainable.safetensors`, `training_state.pt`
(optimizer, scheduler, RNG states, data position), optional extra files, and `COMPLETE`
(a JSON list of every file with its sha256), written last. A directory without a valid
COMPLETE file is never loaded: `latest_valid` falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.shards import file_sha256

log = logging.getLogger("structlora.checkpoint")

MARKER = "COMPLETE"
PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:07d}"


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], keep_last: int,
                     meta: dict | None = None) -> Path:
    """Write a checkpoint for `step`: `write_files(tmp_dir)` fills a temp dir, then it is sealed and renamed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files, **(meta or {})}, indent=1, sort_keys=True))
    for p in tmp.rglob("*"):  # make the data durable before the rename publishes it
        if p.is_file():
            with open(p, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep_last)
    return final


def is_valid(path: Path) -> tuple[bool, str]:
    """(valid, reason) for a checkpoint directory: marker present and every checksum matching."""
    marker = path / MARKER
    if not marker.is_file():
        return False, "no COMPLETE marker (half-written)"
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False, "unreadable COMPLETE marker"
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return False, f"missing {name}"
        if file_sha256(file) != digest:
            return False, f"checksum mismatch in {name}"
    return True, "ok"


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        ok, reason = is_valid(path)
        if ok:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({reason}); trying the previous one", stacklevel=2)
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` valid checkpoints; remove older ones and stale temp dirs."""
    checkpoints = list_checkpoints(root)
    for path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in Path(root).glob(".tmp-*"):
        if str(os.getpid()) not in tmp.name:
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch, Python, NumPy, CUDA), for training_state.pt."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` took, so a resumed run draws the same numbers."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
