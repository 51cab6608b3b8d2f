"""Streaming shards into examples, for training and for evaluation.

Training (`TrainStream`), for each source and each (rank, worker):

    shard list -> split_by_node -> split_by_worker -> resample (seeded) -> read tar
    -> shuffle buffer -> decode -> pick one example per image -> transform
    then: mix the sources by weight -> with_epoch (a fixed number of examples per rank)

Evaluation (`EvalStream`): shard list -> split by node and worker (whole shards when there
are enough of them, else every k-th sample) -> read tar -> decode -> one example per caption
set / question -> transform. Every example is seen exactly once across ranks x workers.

Everything random is drawn from RNGs seeded by (seed, epoch, rank, worker, source), so a
stream is reproducible, and differs across ranks. Only JSON and image members are decoded
(never pickle). A corrupt image, a bad record or a damaged shard is logged, skipped and
counted; each example carries its stream's running counts in `__skipped__`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from data.shards import iter_tar_samples, load_shards, open_shard

log = logging.getLogger(__name__)
Example = dict[str, Any]
TASKS = ("caption", "vqav2", "gqa", "classification")


@dataclass(frozen=True)
class ShardSource:
    """One task's shards: `name` is the task used for mixing, `sizes` the samples per shard."""

    name: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    weight: float = 1.0

    @property
    def samples(self) -> int:
        """Samples (images) over all shards, as the manifest counts them (0 if unknown)."""
        return sum(self.sizes)

    @classmethod
    def from_dir(cls, root: Path | str, weight: float = 1.0, name: str | None = None,
                 verify: bool = False) -> ShardSource:
        shards = load_shards(Path(root), verify=verify)
        return cls(name or shards.task, tuple(shards.urls),
                   tuple(s["samples"] for s in shards.manifest["shards"]), weight)


@dataclass
class StreamStats:
    corrupt_images: int = 0
    bad_records: int = 0
    shard_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_images": self.corrupt_images, "bad_records": self.bad_records,
                "shard_errors": self.shard_errors}


class SkipCounter:
    """Totals of skipped items over all streams, from the `__skipped__` examples carry
    (works across DataLoader workers, whose own counters the main process cannot see)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}

    def update(self, items: Example | Iterable[Example]) -> None:
        """Accepts an example, a list of examples, or a batch from `collate_with_stats`."""
        if isinstance(items, dict) and "__stream__" not in items:
            self._latest.update(items.get("__skipped__") or {})
            return
        for example in [items] if isinstance(items, dict) else items:
            if "__stream__" in example:
                self._latest[example["__stream__"]] = example["__skipped__"]

    @property
    def totals(self) -> dict[str, int]:
        totals = StreamStats().as_dict()
        for stats in self._latest.values():
            for k, v in stats.items():
                totals[k] += v
        return totals


# --- stages (plain generators, composed top to bottom in the streams below) --------------------------


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


def _training_partition(pairs: list[tuple[str, int]], rank: int, world_size: int, worker: int,
                        num_workers: int) -> tuple[list[str], list[int]]:
    """This stream's shards: split by node then by worker when that gives every stream a fair
    share (no partition under half the largest), else all shards (each stream then resamples
    the whole set with its own seed). Without this, 2 workers over shards of 1000 and 120
    samples would draw half of all examples from 120 images."""
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


def read_shards(urls: Iterable[str], stats: StreamStats, allow_pipe: bool = False,
                give_up_after: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", ext: bytes}) of each shard in turn. A damaged
    shard is logged and counted after its readable samples. With `give_up_after`, that
    many shards in a row without a sample raise DataError (an endless resampled stream
    over unreadable shards would otherwise hang)."""
    empty_in_a_row = 0
    for url in urls:
        yielded = False
        try:
            with open_shard(url, allow_pipe) as stream:
                for sample in iter_tar_samples(stream):
                    sample["__url__"] = url
                    yielded = True
                    yield sample
        except (OSError, EOFError, tarfile.TarError) as err:
            stats.shard_errors += 1
            log.warning("shard %s: damaged or unreadable: %s (rest of shard skipped)", url, err)
        empty_in_a_row = 0 if yielded else empty_in_a_row + 1
        if give_up_after is not None and empty_in_a_row >= give_up_after:
            raise DataError(f"no readable sample in {empty_in_a_row} shards in a row (last: {url})")


def shuffle(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Buffered shuffle: fill up to `buffer_size`, then emit a random element per input."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def decode(samples: Iterable[dict[str, Any]], stats: StreamStats,
           max_consecutive_skips: int | None = None) -> Iterator[Example]:
    """Raw sample -> record: the JSON payload plus `image` (a fully decoded PIL image).

    More than `max_consecutive_skips` bad samples in a row raise DataError: an endless
    resampled stream over unusable shards must fail rather than hang."""
    skipped_in_a_row = 0
    for raw in samples:
        if max_consecutive_skips is not None and skipped_in_a_row > max_consecutive_skips:
            raise DataError(f"{skipped_in_a_row} unusable samples in a row (last: {raw.get('__url__')}); "
                            "see the warnings above")
        skipped_in_a_row += 1
        where = f"{raw.get('__url__')}: sample {raw['__key__']!r}"
        try:
            record = json.loads(raw["json"])
            if not isinstance(record, dict) or record.get("task") not in TASKS:
                raise ValueError(f"unknown task {record.get('task') if isinstance(record, dict) else record!r}")
        except (KeyError, ValueError) as err:
            stats.bad_records += 1
            log.warning("%s: bad record (%s): skipped", where, err)
            continue
        image_ext = next((ext for ext in raw if ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            stats.bad_records += 1
            log.warning("%s: no image member: skipped", where)
            continue
        try:
            record["image"] = decode_image(raw[image_ext])
        except ImageDecodeError as err:
            stats.corrupt_images += 1
            log.warning("%s: corrupt image (%s): skipped", where, err)
            continue
        record["__key__"] = raw["__key__"]
        skipped_in_a_row = 0
        yield record


def expand(record: Example) -> list[Example]:
    """Evaluation examples of a record: one per image (captions, classification) or per question.

    Question examples carry `question`, `answer` (VQAv2: multiple_choice_answer) and all fields
    of their question (VQAv2 `answers`, GQA `fullAnswer`, `isBalanced`, `types`)."""
    base = {k: v for k, v in record.items() if k != "questions"}
    if record["task"] in ("caption", "classification"):
        return [base]
    examples = []
    for question in record.get("questions", []):
        example = {**base, **question, "__key__": f"{record['__key__']}/{question['question_id']}"}
        if "answer" not in example:
            example["answer"] = question.get("multiple_choice_answer")
        examples.append(example)
    return examples


def attach_stats(examples: Iterable[Example], stats: StreamStats, stream: str) -> Iterator[Example]:
    """Stamp each example with its stream's running skip counts, one example late, so that
    the last example of a stream carries the final counts."""
    previous = None
    for example in examples:
        if previous is not None:
            yield {**previous, "__stream__": stream, "__skipped__": stats.as_dict()}
        previous = example
    if previous is not None:
        yield {**previous, "__stream__": stream, "__skipped__": stats.as_dict()}


def in_fraction(key: str, fraction: float) -> bool:
    """Is image `key` in the first `fraction` of the split? A stable hash of the key decides, so
    smaller fractions are subsets of larger ones and every rank, worker and run agrees."""
    return fraction >= 1.0 or zlib.crc32(key.encode()) / 2**32 < fraction


def _kept(raw: Iterator[dict[str, Any]], fraction: float, what: str, patience: int = 100_000):
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


def mix(streams: dict[str, Iterator[Example]], weights: dict[str, float], rng: random.Random) -> Iterator[Example]:
    names = sorted(streams)
    while True:
        yield next(streams[rng.choices(names, weights=[weights[n] for n in names])[0]])


# --- the two streams --------------------------------------------------------------------------------


@dataclass
class TrainStream(IterableDataset):
    """Endless, resampled, shuffled training examples mixed over sources by weight.

    Args:
        sources: one ShardSource per task (e.g. caption, vqav2, gqa), with mixing weights.
        epoch_length: examples each rank yields per epoch (`with_epoch`), split over its workers.
        seed, rank, world_size: with the epoch (`set_epoch`), they fix every random choice
            (call set_epoch before creating the DataLoader iterator; persistent workers keep
            the epoch they started with).
        shuffle_buffer: raw samples held for shuffling (bytes, not decoded images).
        transform: applied to every example (e.g. image preprocessing).
        allow_pipe: accept `pipe:` shard URLs (they run a command).
        max_consecutive_skips: this many unusable samples in a row stop the stream with DataError.
        fraction: train on this share of the images only (`in_fraction` of their keys), for
            low-data studies; 1.0 uses all.
    """

    sources: Sequence[ShardSource]
    epoch_length: int
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    shuffle_buffer: int = 1000
    transform: Callable[[Example], Example] | None = None
    allow_pipe: bool = False
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
        self.rank, self.world_size = resolve_rank(self.rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def partition(self, worker: int = 0, num_workers: int = 1) -> dict[str, list[str]]:
        """The shard URLs each source draws from on this rank and worker (for logs and checks)."""
        out = {}
        for source in self.sources:
            pairs = list(zip(source.urls, source.sizes or [1] * len(source.urls)))
            out[source.name] = _training_partition(pairs, self.rank, self.world_size, worker, num_workers)[0]
        return out

    def _source_examples(self, source: ShardSource, worker: int, num_workers: int) -> Iterator[Example]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{source.name}")
        pairs = list(zip(source.urls, source.sizes or [1] * len(source.urls)))
        urls, sizes = _training_partition(pairs, self.rank, self.world_size, worker, num_workers)
        raw = read_shards(resample(urls, sizes, rng), self.stats, self.allow_pipe, give_up_after=3 * len(urls) + 3)
        if self.fraction < 1.0:
            raw = _kept(raw, self.fraction, f"{source.name}: train.data_fraction {self.fraction:g}")
        records = decode(shuffle(raw, self.shuffle_buffer, rng), self.stats, self.max_consecutive_skips)
        for record in records:
            examples = expand(record)
            if not examples:
                continue
            example = examples[0] if len(examples) == 1 else rng.choice(examples)
            yield self.transform(example) if self.transform else example

    def __iter__(self) -> Iterator[Example]:
        worker, num_workers = worker_slot()
        self.stats = StreamStats()  # per pass: a DataLoader worker holds its own copy anyway
        count = self.epoch_length // num_workers + (worker < self.epoch_length % num_workers)
        streams = {s.name: self._source_examples(s, worker, num_workers) for s in self.sources}
        mix_rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/mix")
        mixed = mix(streams, {s.name: s.weight for s in self.sources}, mix_rng)
        yield from attach_stats(islice(mixed, count), self.stats, f"{self.rank}/{worker}/epoch{self.epoch}")


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
    allow_pipe: bool = False
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        super().__init__()
        self.rank, self.world_size = resolve_rank(self.rank, self.world_size)

    def _raw(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        urls = list(self.source.urls)
        streams, index = self.world_size * num_workers, self.rank * num_workers + worker
        if len(urls) >= streams:
            mine = split_by_worker(split_by_node(urls, self.rank, self.world_size), worker, num_workers)
            yield from read_shards(mine, self.stats, self.allow_pipe)
            return
        for i, raw in enumerate(read_shards(urls, self.stats, self.allow_pipe)):
            if i % streams == index:
                yield raw

    def __iter__(self) -> Iterator[Example]:
        worker, num_workers = worker_slot()
        self.stats = StreamStats()
        records = decode(self._raw(worker, num_workers), self.stats)
        examples = (e for r in records for e in (expand(r) if self.expand else [r]))
        if self.transform:
            examples = map(self.transform, examples)
        yield from attach_stats(examples, self.stats, f"{self.rank}/{worker}")


def collate_with_stats(collate: Callable[[list[Example]], dict]) -> Callable[[list[Example]], dict]:
    """Wrap a collate function so that the batch keeps the skip counts (`__skipped__`) of its
    examples' streams (DataLoader workers run the collate function), for `SkipCounter.update(batch)`."""
    def wrapped(examples: list[Example]) -> dict:
        batch = collate(examples)
        batch["__skipped__"] = {e["__stream__"]: e["__skipped__"] for e in examples if "__stream__" in e}
        return batch
    return wrapped


def shapes_sources(shards_root: Path | str, split: str, weights: dict[str, float]) -> list[ShardSource]:
    """Sources for `prepare_shapes_shards` output: {task: weight} -> root/{task}/{split}."""
    return [ShardSource.from_dir(Path(shards_root) / task / split, weight=w, name=task)
            for task, w in sorted(weights.items()) if w > 0]
