"""A local model registry: a folder with an ``index.json`` listing published merged models.

Layout::

    REGISTRY/index.json = {"models": [{"name": str, "base_model": str, "task": str,
                                       "metrics": {...}, "path": str, "run_dir": str,
                                       "created": str, ...}, ...]}

The pipeline's publish stage calls `register_model`; `structlora demo --registry DIR`
calls `load_registry` and offers every entry in a dropdown. Extra keys in an entry (for
example ``method``) are kept as they are. The index is rewritten whole through a temporary
file and an atomic rename, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.errors import DemoError

try:  # POSIX: serialise concurrent publishers; elsewhere the rename alone keeps readers safe
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

INDEX_NAME = "index.json"
LOCK_NAME = ".index.lock"
REQUIRED_KEYS = ("name", "path")


class RegistryError(DemoError):
    """A registry folder or entry is malformed; the message names the file and the field."""


def index_path(registry: Path) -> Path:
    return Path(registry) / INDEX_NAME


def _check_entry(entry: dict[str, Any], where: str) -> None:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: an entry must be a JSON object, got {type(entry).__name__}")
    for key in REQUIRED_KEYS:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RegistryError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")


@contextlib.contextmanager
def _locked(registry: Path) -> Iterator[None]:
    """An exclusive lock on the registry for one read-modify-write of the index."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(registry / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_registry(registry: Path) -> list[dict[str, Any]]:
    """The registry's entries in index order; an empty list when the index does not exist yet.

    Raises:
        RegistryError: the index is not valid JSON, has no ``models`` list, or an entry lacks
            ``name`` or ``path``.
    """
    path = index_path(registry)
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RegistryError(f"{path}: not valid JSON ({err})") from err
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, list):
        raise RegistryError(f"{path}: field 'models' must be a list of entries")
    for i, entry in enumerate(models):
        _check_entry(entry, f"{path}: models[{i}]")
    return models


def register_model(registry: Path, entry: dict[str, Any]) -> None:
    """Add `entry` to the registry, replacing an entry with the same ``name`` in place.

    The folder is created if needed. The new index is written to a temporary file in the same
    folder and renamed over ``index.json`` (atomic on POSIX), so concurrent readers see either
    the old or the new index; concurrent publishers take turns (a lock file).
    """
    registry = Path(registry)
    _check_entry(entry, f"register_model({registry})")
    registry.mkdir(parents=True, exist_ok=True)
    with _locked(registry):
        models = load_registry(registry)
        names = [m["name"] for m in models]
        if entry["name"] in names:
            models[names.index(entry["name"])] = dict(entry)
        else:
            models.append(dict(entry))
        _write_index(registry, models)


def _write_index(registry: Path, models: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_NAME}.", suffix=".tmp", dir=registry)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"models": models}, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, index_path(registry))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_model(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The entry called `name`; KeyError listing the known names otherwise."""
    for entry in entries:
        if entry["name"] == name:
            return entry
    known = ", ".join(e["name"] for e in entries) or "none"
    raise KeyError(f"no model named {name!r} in the registry (known: {known})")
