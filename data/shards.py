"""WebDataset tar shards: a deterministic, atomic writer on `webdataset.TarWriter`, and the manifest.

A shard directory holds `shard-000000.tar`, ... and `manifest.json` (samples per shard,
byte size and sha256 of each shard). Every shard and the manifest are written under a
temporary name and renamed when complete; the manifest is written last, so a reader that
starts from the manifest only ever sees complete shards. Tar members carry no timestamps
or owners, so equal input gives byte-identical shards. (webdataset's own ShardWriter names
and rolls shards itself, without atomic renames or hashes: we drive its TarWriter instead.)
Reading is `data.stream`, on webdataset's pipeline.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import webdataset as wds

from data.errors import DataError
from data.files import read_json, write_json_atomic

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "structlora-webdataset"
MANIFEST_VERSION = 1


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that hashes and counts what tarfile writes."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.handle.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes samples ({key}.{ext} members) into tar shards of at most `shard_size` samples."""

    def __init__(self, out: Path, shard_size: int, prefix: str = "shard", start: int = 0):
        if shard_size < 1:
            raise DataError(f"shard size must be at least 1, got {shard_size}")
        self.out, self.shard_size, self.prefix, self.start = Path(out), shard_size, prefix, start
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None  # a webdataset.TarWriter while a shard is open
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes], units: int = 1) -> None:
        if "." in key or "/" in key or key in self._keys:
            raise DataError(f"invalid or duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **members})  # members in sorted order, bytes as they are
        current = self.shards[-1]
        current["samples"] += 1
        current["units"] += units
        if current["samples"] >= self.shard_size:
            self._close_shard()

    def _open(self) -> None:
        name = f"{self.prefix}-{self.start + len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp-{os.getpid()}"
        self._handle = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._handle)
        # no encoder (members are bytes already), no time, owner or group: equal input, equal bytes
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0.0, user="", group="", mode=0o644)
        self.shards.append({"name": name, "samples": 0, "units": 0})

    def _close_shard(self) -> None:
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.out / self.shards[-1]["name"])
        self.shards[-1].update(bytes=self._hashing.size, sha256=self._hashing.sha256.hexdigest())
        self._tar = None

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()  # finish the tar stream into the temporary file we are about to delete
            except (OSError, ValueError):
                pass
            self._handle.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def write_manifest(out: Path, shards: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "shards": shards,
                "samples": sum(s["samples"] for s in shards), **fields}
    write_json_atomic(Path(out) / MANIFEST_NAME, manifest)
    return manifest


@dataclass(frozen=True)
class ShardSet:
    """The shards of one directory, as listed (and checked) by its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def urls(self) -> list[str]:
        return [str(self.root / s["name"]) for s in self.manifest["shards"]]

    @property
    def task(self) -> str:
        return self.manifest.get("task", "")

    def __len__(self) -> int:
        return int(self.manifest["samples"])


@dataclass(frozen=True)
class DamagedShard:
    """A shard of a manifest that cannot be trusted: missing, of the wrong size (truncated or
    grown) or, same size, not matching its sha256 (damaged in place). `samples` images and
    `units` captions / questions are what a reader loses by leaving it out."""

    path: str
    reason: str
    samples: int
    units: int

    def as_dict(self) -> dict[str, Any]:
        return {"shard": self.path, "reason": self.reason, "images": self.samples, "units": self.units}


# sha256 of shards already checked in this process, by (path, size, mtime_ns, inode): a stage that
# opens one folder twice (the eval split for captions and for long context) reads it once
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def check_shards(root: Path, verify: bool = True, threads: int | None = None) -> tuple[ShardSet, list[DamagedShard]]:
    """Read `root/manifest.json` and check every shard against it: its byte size always, its sha256
    too when `verify` (reads every byte, several shards at a time: hashlib hashes outside the GIL).
    Returns the ShardSet of the manifest and the shards that failed, each with its reason."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    manifest = read_json(root / MANIFEST_NAME, "shard manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{root / MANIFEST_NAME}: not a {MANIFEST_FORMAT} manifest")
    damaged: list[DamagedShard] = []
    to_hash = []
    for shard in manifest["shards"]:
        path = root / shard["name"]
        lost = (str(path), shard.get("samples", 0), shard.get("units", shard.get("samples", 0)))
        if not path.is_file():
            damaged.append(DamagedShard(lost[0], "missing", *lost[1:]))
        elif path.stat().st_size != shard["bytes"]:
            size = path.stat().st_size
            what = "truncated" if size < shard["bytes"] else "longer than written"
            damaged.append(DamagedShard(lost[0], f"{what}: {size} bytes, the manifest says {shard['bytes']}", *lost[1:]))
        elif verify:
            to_hash.append((path, shard, lost))
    if to_hash:
        workers = threads or min(len(to_hash), max(1, min(8, os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda item: _sha256_cached(item[0]), to_hash))
        for (_, shard, lost), digest in zip(to_hash, digests):
            if digest != shard["sha256"]:
                damaged.append(DamagedShard(lost[0], "sha256 does not match the manifest (same size: damaged in "
                                                     "place)", *lost[1:]))
    order = {str(root / s["name"]): i for i, s in enumerate(manifest["shards"])}
    damaged.sort(key=lambda d: order[d.path])
    return ShardSet(root, manifest), damaged


def load_shards(root: Path, verify: bool = False) -> ShardSet:
    """Read `root/manifest.json` and check that every shard is complete: byte size always,
    sha256 too when `verify` (reads every byte). A shard that fails raises DataError."""
    shards, damaged = check_shards(root, verify)
    if damaged:
        first = damaged[0]
        raise DataError(f"shard {first.path}: {first.reason} ({Path(root) / MANIFEST_NAME})")
    return shards


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


