"""The first pass over a conversation file: which records are kept, under which id, in which split.

Real conversation data has many records per image (LLaVA-Instruct-150K joins three subsets over the same COCO
images and reuses the image id as the record id). So, before any shard is written:

- **splits by image**: every image is read once and named by a hash of its bytes (a copy under another path is the
  same image); records that share an image, directly or through a chain of records with several images, form one
  group, and a group lands in one split, chosen by a hash of its smallest image hash. A single-image record keeps
  its split when the file grows; a new record that joins two groups moves one of them. Text-only records split by
  their id. Files given per split keep their split; images they share across splits are counted.
- **duplicates by content** (`dedupe="content"`, the default): a record is a duplicate only when its messages and
  its images' bytes repeat an earlier record's. A reused id with other content is kept under a derived id
  (`ID#<8 hex digits of its content>`) and counted as `id reused`, which is information, not a loss.
  `dedupe="id"`: a repeated id is a duplicate whatever its content (the strict reading of an id); `"off"`: every
  record is kept (exact repeats too, under derived ids).
- every image is fully decoded here (threads), so a missing or broken one is found before any shard is written;
  **--strict** stops at the first record that would be skipped, naming it and the reason.

Memory: 8 bytes per record's decision and id digest, 8 bytes plus the path per image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.conversations import Conversation, RecordProblem, Tags, normalize, raw_records, split_of
from data.errors import DataError
from data.records import Problems

DEDUPE = ("content", "id", "off")
BATCH = 256  # records whose images are hashed together (threads)
DROPPED = 0  # a decision: the record is skipped (a problem, counted)
KEPT = 1  # a decision: kept under its own id; a str: kept under that derived id


def digest(data: bytes | str) -> int:
    """8 bytes of blake2b as an int (a set of these is the memory of a pass)."""
    return int.from_bytes(hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=8).digest(),
                          "big")


class ImageGroups:
    """Union-find over image digests; a group's root is its smallest digest (independent of file order)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def root(self, item: int) -> int:
        parent = self.parent.setdefault(item, item)
        while parent != item:
            self.parent[item] = self.parent.get(parent, parent)  # path halving
            item, parent = parent, self.parent[parent]
        return item

    def join(self, items: Iterable[int]) -> None:
        roots = sorted({self.root(i) for i in items})
        for other in roots[1:]:
            self.parent[other] = roots[0]

    def split(self, items: Iterable[int], val_fraction: float, test_fraction: float) -> str:
        return split_of(f"image:{self.root(min(items)):016x}", val_fraction, test_fraction)


@dataclass
class Plan:
    """What the first pass decided: per input file, one decision per record in file order; image digests by path."""

    decisions: dict[Path, list[int | str]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    groups: ImageGroups = field(default_factory=ImageGroups)
    problems: Problems = field(default_factory=lambda: Problems(source="prepare conversations"))
    ids_reused: int = 0
    duplicates: int = 0

    def split(self, conv: Conversation, forced: str | None, val_fraction: float, test_fraction: float) -> str:
        if forced:
            return forced
        if conv.images:
            return self.groups.split([self.images[p] for p in conv.images], val_fraction, test_fraction)
        return split_of(conv.id, val_fraction, test_fraction)


def _read(path: str) -> int | RecordProblem:
    """The image's digest, or the problem that makes its record unusable (the whole image decoded, as training
    will)."""
    from data.images import ImageDecodeError, decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return RecordProblem("missing image", f"{err.filename or path}: {err.strerror}")
    try:
        decode_image(data)
    except ImageDecodeError as err:
        return RecordProblem("undecodable image", f"{path}: {err}")
    return digest(data)


def _normalized(inputs, formats, tags, images_dir) -> Iterator[tuple[Path, str, Conversation | RecordProblem]]:
    for path, _ in inputs:
        for where, raw in raw_records(path):
            where = f"{path.name}: {where}"
            try:
                yield path, where, normalize(raw, formats[path], tags, images_dir, path, where)
            except RecordProblem as problem:
                yield path, where, problem


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def plan_records(inputs: list[tuple[Path, str | None]], formats: dict[Path, str], tags: Tags,
                 images_dir: Path | None, strict: bool = False, dedupe: str = "content",
                 threads: int = 4) -> Plan:
    """The first pass (see the module's docstring); raises DataError under `strict` at the first bad record."""
    if dedupe not in DEDUPE:
        raise DataError(f"--dedupe {dedupe!r}: choose {', '.join(DEDUPE)}")
    plan = Plan(decisions={path: [] for path, _ in inputs})
    ids: set[int] = set()
    contents: dict[int, int] = {}  # content digest -> times seen (for `off`'s derived ids)

    def drop(path: Path, where: str, problem: RecordProblem) -> None:
        if strict:
            raise DataError(f"{where}: {problem} (--strict; nothing was written)")
        plan.problems.add(where, str(problem))
        plan.decisions[path].append(DROPPED)

    def decide(path: Path, where: str, conv: Conversation) -> None:
        hashes = [plan.images[p] for p in conv.images]
        content = digest(json.dumps([conv.messages, [f"{h:016x}" for h in hashes]], ensure_ascii=False))
        repeats, own = contents.get(content, 0), digest(conv.id)
        if dedupe == "content" and repeats:
            return drop(path, where, RecordProblem("duplicate record", f"id {conv.id!r}: its messages and images "
                                                                       "repeat an earlier record's"))
        if dedupe == "id" and own in ids:
            return drop(path, where, RecordProblem("duplicate id", f"id {conv.id!r} appears again"))
        contents[content] = repeats + 1
        if hashes:
            plan.groups.join(hashes)
        if own not in ids:
            ids.add(own)
            plan.decisions[path].append(KEPT)
            return
        derived = f"{conv.id}#{content >> 32:08x}" + (f"-{repeats}" if repeats else "")
        while digest(derived) in ids:  # the derived id is itself a record's id: one more suffix
            derived += "+"
        ids.add(digest(derived))
        plan.ids_reused += 1
        plan.decisions[path].append(derived)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(desc="plan conversations (images hashed)", unit="record", disable=None) as bar:
        for batch in _batches(_normalized(inputs, formats, tags, images_dir), BATCH):
            new = sorted({p for _, _, c in batch if isinstance(c, Conversation) for p in c.images} - plan.images.keys())
            read = dict(zip(new, pool.map(_read, new)))
            for path, where, conv in batch:
                bar.update(1)
                if isinstance(conv, RecordProblem):
                    drop(path, where, conv)
                    continue
                bad = next((read[p] for p in conv.images if isinstance(read.get(p), RecordProblem)), None)
                if bad is not None:
                    drop(path, where, bad)
                    continue
                plan.images.update((p, read[p]) for p in conv.images if p in read)
                decide(path, where, conv)
    plan.duplicates = plan.problems.by_reason.get("duplicate record", 0) + plan.problems.by_reason.get(
        "duplicate id", 0)
    return plan


def planned(inputs: list[tuple[Path, str | None]], formats: dict[Path, str], tags: Tags, images_dir: Path | None,
            plan: Plan, val_fraction: float, test_fraction: float) -> Iterator[tuple[str, Conversation]]:
    """The second pass: (split, conversation under its final id) of every kept record, in file order."""
    for path, forced in inputs:
        decisions = iter(plan.decisions[path])
        for where, raw in raw_records(path):
            decision = next(decisions)
            if decision == DROPPED:
                continue
            conv = normalize(raw, formats[path], tags, images_dir, path, f"{path.name}: {where}")
            if isinstance(decision, str):
                conv = Conversation(decision, conv.messages, conv.images, conv.where)
            yield plan.split(conv, forced, val_fraction, test_fraction), conv

