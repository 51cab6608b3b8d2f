"""Streaming shards into examples, for training and for evaluation, on the `webdataset` library.

Each stream is a `webdataset.DataPipeline` per source (task), for each (rank, worker):

    shard list -> node split -> worker split        (or, for too few shards, every k-th sample)
    -> wds.tarfile_to_samples (handler: damaged shards counted)  -> [train.data_fraction]
    -> wds.shuffle (seeded; training only) -> wds.map(restricted wds Decoder: JSON + images only)
    -> examples of each record

Training (`TrainStream`) then mixes its sources. Two samplings:
- `epoch` (default): each epoch is one pass over every source, shard order and shuffle seeded by
  (seed, epoch), so every image and every question of the split is seen once per epoch across
  ranks x workers; a source with weight w < max weight keeps a w / max share of its images.
- `resample`: shards drawn with replacement (in proportion to their sizes), endless, mixed by
  weight and cut into epochs of `epoch_length` examples (`with_epoch`), for corpora where a
  pass is longer than the run.
Questions of an image are packed into one multi-turn conversation (`questions: packed`, as
LLaVA trains) or each becomes its own example (`single`); a caption is sampled per visit.

Evaluation (`EvalStream`): every example exactly once across ranks x workers, in shard order.

Where our code stands in for the library, and why (shard lists, resampling and mixing are
`data.partition`'s):
- shard lists: the node split takes the stream's explicit rank (wds.split_by_node reads the
  process group, and evaluation also builds rank-0 views); resampling weights shards by their
  sample counts (wds.ResampledShards draws them uniformly, over-weighting a small last shard);
  too few shards for the streams fall back to a split by sample, which wds does not have;
- mixing: wds.RandomMix draws from the global `random` module, so it would not be
  reproducible per (seed, epoch, rank, worker); ours is seeded, and in `epoch` mode it mixes in
  proportion to what each source has left so that all sources end together;
- skip counting: webdataset's handlers only say continue or stop; ours count damaged shards,
  bad records and corrupt images into `StreamStats`, and stop an endless stream over unusable
  data with DataError instead of spinning. The counts ride on the examples (`__skipped__`, a
  marker when a stream yields nothing) through DataLoader workers to `data.accounting`, which
  the stages report;
- shard check at open: `ShardSource.from_dir` checks every shard's size and sha256 against the
  manifest before anything is read (a same-size change is often invisible to the stream), and
  stops naming a damaged shard or leaves it out to be reported (`on_damaged`).
Only JSON and image members are decoded (the decoder has no pickle, torch or numpy handler);
`pipe:` and remote URLs are refused unless `allow_remote` (then webdataset's gopen opens them).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import webdataset as wds
from torch.utils.data import IterableDataset

from data.errors import DataError
from data.examples import (  # noqa: F401 - re-exported: the stream's public names
    QUESTION_TASKS,
    TASKS,
    Example,
    Guard,
    SkipCounter,
    StreamStats,
    attach_stats,
    collate_with_stats,
    decode_samples,
    expand,
    training_examples,
    without_markers,
)
from data.partition import (
    check_urls,
    every_kth,
    kept_in_fraction,
    mix,
    mix_to_the_end,
    resample,
    resolve_rank,
    split_by_node,
    split_by_worker,
    training_partition,
    worker_slot,
)
from data.shards import DAMAGED_SHARD_POLICIES, DamagedShard, ShardSource  # noqa: F401 - the stream's names

log = logging.getLogger(__name__)


# --- the two streams --------------------------------------------------------------------------------


@dataclass
class TrainStream(IterableDataset):
    """Training examples mixed over sources: one pass per epoch (`sampling: epoch`) or resampled.

    Args:
        sources: one ShardSource per task (e.g. caption, vqav2, gqa), with mixing weights.
        epoch_length: examples each rank yields per epoch with `sampling: resample` (`with_epoch`),
            split over its workers; unused with `sampling: epoch` (an epoch is one pass).
        seed, rank, world_size: with the epoch (`set_epoch`), they fix every random choice
            (call set_epoch before creating the DataLoader iterator; persistent workers keep
            the epoch they started with).
        sampling: `epoch` or `resample` (see the module docstring).
        questions: `packed` (all questions of an image in one conversation) or `single`.
        shuffle_buffer: raw samples held for shuffling (bytes, not decoded images).
        transform: applied to every example (e.g. image preprocessing).
        allow_remote: accept `pipe:` and remote shard URLs.
        max_consecutive_skips: this many unusable samples in a row stop the stream with DataError.
        fraction: train on this share of the images only (`in_fraction` of their keys), for
            low-data studies; 1.0 uses all.
    """

    sources: Sequence[ShardSource]
    epoch_length: int = 0
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    sampling: Literal["epoch", "resample"] = "epoch"
    questions: Literal["packed", "single"] = "packed"
    shuffle_buffer: int = 1000
    transform: Callable[[Example], Example] | None = None
    allow_remote: bool = False
    max_consecutive_skips: int = 1000
    fraction: float = 1.0
    epoch: int = 0
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        super().__init__()
        if not self.sources or any(not s.urls for s in self.sources):
            raise DataError("TrainStream needs at least one source, each with at least one shard")
        if any(s.weight <= 0 for s in self.sources) or len({s.name for s in self.sources}) != len(self.sources):
            raise DataError("source weights must be positive and source names unique")
        if not 0.0 < self.fraction <= 1.0:
            raise DataError(f"TrainStream.fraction must be in (0, 1], got {self.fraction}")
        if self.sampling not in ("epoch", "resample") or self.questions not in ("packed", "single"):
            raise DataError(f"TrainStream: sampling {self.sampling!r} / questions {self.questions!r} unknown")
        if self.sampling == "resample" and self.epoch_length < 1:
            raise DataError("TrainStream: sampling 'resample' needs epoch_length >= 1 (examples per epoch)")
        for source in self.sources:
            check_urls(source.urls, self.allow_remote)
        self.rank, self.world_size = resolve_rank(self.rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pairs(self, source: ShardSource) -> list[tuple[str, int]]:
        return list(zip(source.urls, source.sizes or [1] * len(source.urls)))

    def partition(self, worker: int = 0, num_workers: int = 1) -> dict[str, list[str]]:
        """The shard URLs each source reads on this rank and worker (for logs and checks); in
        `epoch` mode a source with fewer shards than streams is read whole, every k-th sample kept."""
        out = {}
        for source in self.sources:
            if self.sampling == "resample":
                out[source.name] = training_partition(self._pairs(source), self.rank, self.world_size, worker,
                                                       num_workers)[0]
            else:
                out[source.name] = self._epoch_shards(source, worker, num_workers)[0]
        return out

    def _epoch_shards(self, source: ShardSource, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shard URLs in this epoch's order, sample stride k, offset): a shard split when every
        stream gets a fair share, else every stream reads all shards and keeps every k-th sample."""
        pairs = self._pairs(source)
        random.Random(f"{self.seed}/{self.epoch}/{source.name}/shards").shuffle(pairs)  # the same on every rank
        streams, index = self.world_size * num_workers, self.rank * num_workers + worker
        parts = [split_by_worker(split_by_node(pairs, r, self.world_size), w, num_workers)
                 for r in range(self.world_size) for w in range(num_workers)]
        totals = [sum(n for _, n in part) for part in parts]
        if len(pairs) >= streams and min(totals) >= 0.5 * max(totals):
            return [u for u, _ in parts[index]], 1, 0
        return [u for u, _ in pairs], streams, index

    def _source_pipeline(self, source: ShardSource, worker: int, num_workers: int, guard: Guard,
                         rng: random.Random) -> tuple[wds.DataPipeline, float]:
        """(the pipeline of one source on this stream, the records it is expected to give)."""
        if self.sampling == "resample":
            urls, sizes = training_partition(self._pairs(source), self.rank, self.world_size, worker, num_workers)
            shards: Any = lambda: ({"url": u} for u in resample(urls, sizes, rng))  # noqa: E731 - a source
            stages: list[Any] = []
            expected = float("inf")
        else:
            urls, k, index = self._epoch_shards(source, worker, num_workers)
            shards = wds.SimpleShardList(urls)
            stages = [every_kth(k, index)] if k > 1 else []
            sizes = dict(self._pairs(source))
            expected = sum(sizes[u] for u in urls) / k
        stages.insert(0, wds.tarfile_to_samples(handler=guard.shard_error))
        if self.fraction < 1.0:
            fraction = self.fraction
            stages.append(lambda raw: kept_in_fraction(raw, fraction, f"{source.name}: train.data_fraction {fraction:g}"))
        share = source.weight / max(s.weight for s in self.sources)
        if self.sampling == "epoch" and share < 1.0:  # a lighter source keeps a share of its images
            stages.append(lambda raw: (r for r in raw if rng.random() < share))
        stages += [wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng),
                   lambda raw: decode_samples(raw, guard),
                   lambda records: (e for r in records for e in training_examples(r, rng, self.questions))]
        if self.questions == "single":  # an image's questions come out together: mix them with other images'
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        if self.transform is not None:
            stages.append(wds.map(self.transform))
        return wds.DataPipeline(shards, *stages), expected * self.fraction * min(share, 1.0)

    def __iter__(self) -> Iterator[Example]:
        worker, num_workers = worker_slot()
        self.stats = StreamStats()  # per pass: a DataLoader worker holds its own copy anyway
        failing = 3 * max(len(s.urls) for s in self.sources) + 3 if self.sampling == "resample" else None
        guard = Guard(self.stats, self.max_consecutive_skips, failing)
        pipelines, expected = {}, {}
        for s in self.sources:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{s.name}")
            pipelines[s.name], expected[s.name] = self._source_pipeline(s, worker, num_workers, guard, rng)
        mix_rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/mix")
        streams = {name: iter(p) for name, p in pipelines.items()}
        if self.sampling == "resample":
            count = self.epoch_length // num_workers + (worker < self.epoch_length % num_workers)
            mixed: Iterator[Example] = islice(mix(streams, {s.name: s.weight for s in self.sources}, mix_rng), count)
        else:
            mixed = mix_to_the_end(streams, expected, mix_rng)
        yield from attach_stats(mixed, self.stats, f"{self.rank}/{worker}/epoch{self.epoch}")


@dataclass
class EvalStream(IterableDataset):
    """Every example of `source` exactly once over all ranks x workers, in shard order.

    Shards are split by node then by worker when there are at least as many as streams;
    otherwise every stream reads all shards and keeps every k-th sample (k = streams).
    With `expand=False` one example per image is yielded (questions stay in a list).
    """

    source: ShardSource
    rank: int | None = None
    world_size: int | None = None
    expand: bool = True
    transform: Callable[[Example], Example] | None = None
    allow_remote: bool = False
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        super().__init__()
        check_urls(self.source.urls, self.allow_remote)
        self.rank, self.world_size = resolve_rank(self.rank, self.world_size)

    def pipeline(self, worker: int, num_workers: int, guard: Guard) -> wds.DataPipeline:
        urls = list(self.source.urls)
        streams, index = self.world_size * num_workers, self.rank * num_workers + worker
        if len(urls) >= streams:
            shards, stages = wds.SimpleShardList(split_by_worker(split_by_node(urls, self.rank, self.world_size),
                                                                 worker, num_workers)), []
        else:
            shards, stages = wds.SimpleShardList(urls), [every_kth(streams, index)]
        stages.insert(0, wds.tarfile_to_samples(handler=guard.shard_error))
        stages.append(lambda raw: decode_samples(raw, guard))
        stages.append(lambda records: (e for r in records for e in (expand(r) if self.expand else [r])))
        if self.transform:
            stages.append(wds.map(self.transform))
        return wds.DataPipeline(shards, *stages)

    def __iter__(self) -> Iterator[Example]:
        worker, num_workers = worker_slot()
        self.stats = StreamStats()
        if not self.source.urls:  # an empty split (a small file grouped by image may leave one empty)
            return
        examples = iter(self.pipeline(worker, num_workers, Guard(self.stats)))
        yield from attach_stats(examples, self.stats, f"{self.rank}/{worker}")


def shapes_sources(shards_root: Path | str, split: str, weights: dict[str, float]) -> list[ShardSource]:
    """Sources for `prepare_shapes_shards` output: {task: weight} -> root/{task}/{split}."""
    return [ShardSource.from_dir(Path(shards_root) / task / split, weight=w, name=task)
            for task, w in sorted(weights.items()) if w > 0]
