"""Deterministic, atomic file output shared by the world generator and the shard writer.

Everything the data package writes goes to a temporary name in the same directory and is
renamed into place, so a killed process never leaves a half-written file under its real
name. JSON is dumped with sorted keys and fixed indentation so that equal content gives
equal bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from data.errors import DataError


def json_bytes(obj: Any, indent: int | None = 1) -> bytes:
    """Canonical JSON encoding: sorted keys, fixed separators, UTF-8, trailing newline."""
    separators = (",", ": ") if indent is not None else (",", ":")
    text = json.dumps(obj, sort_keys=True, indent=indent, separators=separators, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and an atomic rename.

    The one atomic file writer of the project (eval's text, JSON and PNG writers call it): readers see the
    old file or the whole new one, never half of it, and a failed write leaves no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from the other users of a cluster
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    write_bytes_atomic(path, json_bytes(obj, indent=indent))


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Load a JSON file; a missing or malformed file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} {path} is not valid JSON: {err}") from err


def replace_directory(staging: Path, target: Path, marker: str) -> None:
    """Move a fully written `staging` directory to `target`.

    An existing `target` is replaced only if it is empty or was written by us (it holds
    `marker`); anything else is refused, so a mistyped --out never deletes user data.
    """
    if target.exists():
        if not target.is_dir():
            raise DataError(f"output path exists and is not a directory: {target}")
        if any(target.iterdir()) and not (target / marker).exists():
            raise DataError(f"refusing to overwrite non-empty directory without {marker}: {target}")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)


def staging_dir(target: Path) -> Path:
    """A fresh temporary directory next to `target` (same file system, so rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging
