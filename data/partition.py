"""Who reads what in a stream, below the webdataset pipelines of `data.stream`.

This process's rank and DataLoader worker; the shard URLs a stream may open (`pipe:` and remote
ones only with `allow_remote`); the split of shards over ranks x workers (or, for too few shards,
every k-th sample); shards resampled in proportion to their sizes; the stable training fraction
of images; and the seeded mixing of sources, by fixed weights or to a common end.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from torch.utils.data import get_worker_info
from webdataset.gopen import gopen_schemes

from data.errors import DataError
from data.examples import Example

# --- ranks, workers, URLs ---------------------------------------------------------------------------


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return rank, world_size
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def split_by_node(items: Sequence, rank: int, world_size: int) -> list:
    return list(items[rank::world_size])


def split_by_worker(items: Sequence, worker: int, num_workers: int) -> list:
    return list(items[worker::num_workers])


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


def check_urls(urls: Iterable[str], allow_remote: bool) -> None:
    """Local paths always; `pipe:` (runs a shell command) and remote URLs (http(s), gs, hf, ais, ...,
    opened by webdataset's gopen) only with `allow_remote` (the config's data.allow_remote)."""
    for url in urls:
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else None  # C:\ is a path
        if scheme in (None, "file"):
            continue
        if not allow_remote:
            what = "runs a shell command" if scheme == "pipe" else "is a remote URL"
            raise DataError(f"refusing shard URL {url!r}: '{scheme}:' {what}; set data.allow_remote: true "
                            "(allow_remote=True) if you trust the source")
        if scheme not in gopen_schemes:
            raise DataError(f"shard URL {url!r}: webdataset cannot open '{scheme}:' URLs "
                            f"(it opens {', '.join(sorted(k for k in gopen_schemes if k[0] != '_'))})")


def training_partition(pairs: list[tuple[str, int]], rank: int, world_size: int, worker: int,
                        num_workers: int) -> tuple[list[str], list[int]]:
    """This stream's shards: split by node then by worker when that gives every stream a fair
    share (no partition under half the largest), else all shards. Without this, 2 workers over
    shards of 1000 and 120 samples would draw half of all examples from 120 images."""
    streams = world_size * num_workers
    parts = [split_by_worker(split_by_node(pairs, r, world_size), w, num_workers)
             for r in range(world_size) for w in range(num_workers)]
    totals = [sum(n for _, n in part) for part in parts]
    if len(pairs) >= streams and min(totals) >= 0.5 * max(totals):
        pairs = parts[rank * num_workers + worker]
    return [u for u, _ in pairs], [n for _, n in pairs]


def resample(urls: Sequence[str], sizes: Sequence[int], rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement, in proportion to their sample counts, forever."""
    weights = list(sizes) if sizes and sum(sizes) > 0 else None
    while True:
        yield rng.choices(urls, weights=weights)[0]


def in_fraction(key: str, fraction: float) -> bool:
    """Is image `key` in the first `fraction` of the split? A stable hash of the key decides, so
    smaller fractions are subsets of larger ones and every rank, worker and run agrees."""
    return fraction >= 1.0 or zlib.crc32(key.encode()) / 2**32 < fraction


def kept_in_fraction(raw: Iterator[dict[str, Any]], fraction: float, what: str, patience: int = 100_000):
    """The raw samples `in_fraction`; a long run of misses means the fraction leaves nothing to train on."""
    misses = 0
    for r in raw:
        if in_fraction(str(r["__key__"]), fraction):
            misses = 0
            yield r
        else:
            misses += 1
            if misses >= patience:
                raise DataError(f"{what}: {patience} samples in a row fall outside the fraction: it keeps no image")


def every_kth(k: int, index: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """The sample-level split (a pipeline stage): keep every k-th sample, starting at `index`."""
    def stage(samples: Iterable[Any]) -> Iterator[Any]:
        return islice(samples, index, None, k)
    return stage


def mix(streams: dict[str, Iterator[Example]], weights: dict[str, float], rng: random.Random) -> Iterator[Example]:
    """Endless sources mixed by fixed weights."""
    names = sorted(streams)
    while True:
        yield next(streams[rng.choices(names, weights=[weights[n] for n in names])[0]])


def mix_to_the_end(streams: dict[str, Iterator[Example]], remaining: dict[str, float],
                   rng: random.Random) -> Iterator[Example]:
    """Finite sources interleaved in proportion to what each has left (expected counts), each to
    its end, so that a pass over every source ends at about the same time."""
    left = {n: max(remaining[n], 1.0) for n in sorted(streams)}
    while left:
        names = list(left)
        name = rng.choices(names, weights=[left[n] for n in names])[0]
        try:
            yield next(streams[name])
        except StopIteration:
            del left[name]
            continue
        left[name] = max(left[name] - 1.0, 1.0)
