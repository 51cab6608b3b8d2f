"""WebDataset tar shards: a deterministic, atomic writer on `webdataset.TarWriter`, and the manifest.

A shard directory holds `shard-000000.tar`, ... and `manifest.json` (samples per shard,
byte size and sha256 of each shard). Every shard and the manifest are written under a
temporary name and renamed when complete; the manifest is written last, so a reader that
starts from the manifest only ever sees complete shards. Tar members carry no timestamps
or owners, so equal input gives byte-identical shards. (webdataset's own ShardWriter names
and rolls shards itself, without atomic renames or hashes: we drive its TarWriter instead.)
`ShardSource.from_dir` is a folder opened for reading: every shard checked against the manifest
(size, and sha256), a damaged one stopped at or left out. Reading is `data.stream`, on webdataset's
pipeline.
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
    reasons: list[str | None] = []  # per shard of the manifest, in its order
    to_hash: list[int] = []
    for shard in manifest["shards"]:
        path = root / shard["name"]
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            reasons.append("missing")
        elif size != shard["bytes"]:
            what = "truncated" if size < shard["bytes"] else "longer than written"
            reasons.append(f"{what}: {size} bytes, the manifest says {shard['bytes']}")
        else:
            reasons.append(None)
            if verify:
                to_hash.append(len(reasons) - 1)
    if to_hash:
        shards = manifest["shards"]
        workers = threads or min(len(to_hash), max(1, min(8, os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = pool.map(lambda i: _sha256_cached(root / shards[i]["name"]), to_hash)
            for i, digest in zip(to_hash, digests):
                if digest != shards[i]["sha256"]:
                    reasons[i] = "sha256 does not match the manifest (same size: damaged in place)"
    damaged = [DamagedShard(str(root / shard["name"]), reason, shard.get("samples", 0),
                            shard.get("units", shard.get("samples", 0)))
               for shard, reason in zip(manifest["shards"], reasons) if reason is not None]
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


DAMAGED_SHARD_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class ShardSource:
    """One task's shards: `name` is the task used for mixing, `sizes` the samples per shard.

    `excluded` are shards of the folder's manifest left out because they failed the check at open
    (missing, wrong size, or sha256 mismatch): what they held is lost to the reader, and reported."""

    name: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    weight: float = 1.0
    excluded: tuple[DamagedShard, ...] = ()
    units: int = 0  # captions / questions in the manifest, excluded shards included
    images: int = 0  # images in the manifest, excluded shards included
    prepare_skipped: int = 0  # records prepare could not write (the manifest's `skipped`)

    @property
    def samples(self) -> int:
        """Samples (images) over the shards read, as the manifest counts them (0 if unknown)."""
        return sum(self.sizes)

    @property
    def empty_reason(self) -> str | None:
        """Why there is no shard to read (every one left out as damaged, or none at all), or None."""
        if self.urls:
            return None
        if self.excluded:
            return (f"every shard was left out as damaged ({len(self.excluded)}: "
                    f"{'; '.join(d.reason for d in self.excluded)})")
        return "the split holds no records"

    @classmethod
    def from_dir(cls, root: Path | str, weight: float = 1.0, name: str | None = None,
                 verify: bool = True, on_damaged: str = "error") -> ShardSource:
        """The shards of `root` (a prepared folder with its manifest), each checked against the manifest
        before anything is read: size always, sha256 too when `verify`. A shard that fails stops here
        with DataError naming it (`on_damaged="error"`), or is left out and listed in `excluded`
        (`"skip"`), with every other shard of the folder read as usual."""
        if on_damaged not in DAMAGED_SHARD_POLICIES:
            raise DataError(f"on_damaged {on_damaged!r}: choose from {', '.join(DAMAGED_SHARD_POLICIES)}")
        shards, damaged = check_shards(Path(root), verify=verify)
        if damaged and on_damaged == "error":
            first = damaged[0]
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise DataError(f"shard {first.path}: {first.reason}{more}; prepare the split again, or skip damaged "
                            "shards (data.damaged_shards: skip / --damaged-shards skip) and have their examples "
                            "counted as lost")
        bad = {d.path for d in damaged}
        kept = [(url, s["samples"]) for url, s in zip(shards.urls, shards.manifest["shards"]) if url not in bad]
        listed = shards.manifest["shards"]
        return cls(name or shards.task, tuple(u for u, _ in kept), tuple(n for _, n in kept), weight,
                   tuple(damaged), units=sum(s.get("units", s["samples"]) for s in listed),
                   images=sum(s["samples"] for s in listed), prepare_skipped=int(shards.manifest.get("skipped", 0)))
