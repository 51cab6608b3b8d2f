"""`structlora prepare conversations`: a conversation file (LLaVA, ShareGPT, messages) -> shards.

    out/conversations/{train,val,test}/shard-000000.tar ...   {key}.json + {key}.img0.{ext}, img1, ...
    out/conversations/{train,val,test}/manifest.json          as every other source's
    out/conversations/prepare_summary.json                    records kept per split, skipped per reason

The file is streamed twice. The first pass (`data.conversation_plan`) checks and normalises every record,
reads and fully decodes every image once (a missing or broken image is found now, not at step 22 of training)
and decides: duplicates by content, reused ids kept under derived ids, and splits by image, so that no image
is in two splits (a file per split can be given instead). `strict` stops there, before a shard is written.
The second pass queues the kept records; every `shard_size` records of a split become one shard, written by a
pool of `workers` processes. Shard i of a split holds records [i * shard_size, (i + 1) * shard_size) of that
split in file order, so the bytes are the same for any worker count. Memory stays flat in the file size: a few
shards' records in flight, 8 bytes per record and per image. Like the other sources, each split is built in `.{split}.partial` next to its
folder: a killed prepare re-run on the same file keeps the shards it had finished (verified by their
sha256) and writes the rest, to the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.conversation_plan import DEDUPE, plan_records, planned
from data.conversations import Conversation, Tags, detect_format
from data.data_card import SplitCard
from data.errors import DataError
from data.files import json_bytes, replace_directory, write_json_atomic
from data.images import sniff_extension
from data.prepare import (
    PARTIAL_JOURNAL,
    PARTIAL_PLAN,
    append_journal,
    default_workers,
    journal_entry,
    resume_partial,
)
from data.records import sample_key
from data.shards import MANIFEST_NAME, ShardWriter, file_sha256, write_manifest

TASK = "conversations"
SPLITS = ("train", "val", "test")
SUMMARY_NAME = "prepare_summary.json"
log = logging.getLogger("structlora.data")


def shard_key(sample_id: str) -> str:
    """A tar-safe, unique sample key: the id made safe (shortened) and 8 hex digits of its hash."""
    return f"{sample_key(sample_id)[:48]}-{hashlib.blake2b(sample_id.encode(), digest_size=4).hexdigest()}"


def _write_shard(staging: Path, index: int, items: list[tuple[str, dict[str, Any], list[str], str]]) -> dict:
    """Write one shard (a worker's unit of work); the first pass decoded every image, so only an image removed
    since then leaves its sample out (reported). Returns the journal entry."""
    writer = ShardWriter(staging, shard_size=max(1, len(items)), start=index)
    problems: list[dict[str, Any]] = []
    try:
        for key, payload, images, where in items:
            members: dict[str, bytes] = {}
            try:
                for i, path in enumerate(images):
                    data = Path(path).read_bytes()
                    members[f"img{i}.{sniff_extension(data)}"] = data
            except OSError as err:
                problems.append({"where": where, "reason": f"missing image: {err.filename or path}: {err.strerror}"})
                continue
            writer.write(key, {**members, "json": json_bytes(payload, indent=None)})
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return journal_entry(index, shards, len(items), problems)


def _inputs(file: Path | None, splits: dict[str, Path] | None) -> list[tuple[Path, str | None]]:
    if (file is None) == (not splits):
        raise DataError("prepare conversations: give --file, or a file per split (--train, --val, --test)")
    if file is not None:
        return [(Path(file), None)]
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DataError(f"prepare conversations: unknown split(s) {unknown}; use {', '.join(SPLITS)}")
    return [(Path(path), split) for split, path in splits.items() if path]


def prepare_conversations(out: Path, file: Path | None = None, splits: dict[str, Path] | None = None,
                          fmt: str = "auto", images: Path | None = None, val_fraction: float = 0.05,
                          test_fraction: float = 0.05, shard_size: int = 1000, workers: int | None = None,
                          strict: bool = False, tags: Tags | str | None = None,
                          dedupe: str = "content") -> dict[str, Any]:
    """Prepare `file` (or one file per split) into `out/conversations/{split}/`; returns the summary.

    `dedupe`: content (a record repeating an earlier one's messages and images is a duplicate; a reused id with
    other content is kept under a derived id), id (a repeated id is a duplicate) or off."""
    inputs = _inputs(file, splits)
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                        "and leave some records for training")
    if fmt not in ("auto", "llava", "sharegpt", "messages"):
        raise DataError(f"--format {fmt!r}: choose auto, llava, sharegpt or messages")
    if dedupe not in DEDUPE:
        raise DataError(f"--dedupe {dedupe!r}: choose {', '.join(DEDUPE)}")
    tags = tags if isinstance(tags, Tags) else Tags.parse(tags)
    images_dir = Path(images).expanduser().resolve() if images else None
    if images_dir is not None and not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir}")
    formats = {path: (detect_format(path) if fmt == "auto" else fmt) for path, _ in inputs}
    start = time.perf_counter()
    workers = workers or default_workers()
    plan = {"task": TASK, "shard_size": shard_size, "format": {str(p): f for p, f in formats.items()},
            "files": [{"path": str(p.resolve()), "split": s, "sha256": file_sha256(p)} for p, s in inputs],
            "images": str(images_dir) if images_dir else None, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "tags": tags.__dict__, "dedupe": dedupe, "split_by": "image"}
    plan_of = plan_records(inputs, formats, tags, images_dir, strict=strict, dedupe=dedupe, threads=workers + 1)
    problems = plan_of.problems
    root = Path(out) / TASK
    root.mkdir(parents=True, exist_ok=True)
    staging = {s: root / f".{s}.partial" for s in SPLITS}
    done = {s: resume_partial(staging[s], {**plan, "split": s}) for s in SPLITS}
    resumed = sum(len(d) for d in done.values())
    cards = {s: SplitCard() for s in SPLITS}
    chunks: dict[str, list[Conversation]] = {s: [] for s in SPLITS}
    next_index = dict.fromkeys(SPLITS, 0)
    most_images = dict.fromkeys(SPLITS, 0)  # the most images one sample has: training checks it fits max_length
    journals = {s: open(staging[s] / PARTIAL_JOURNAL, "a") for s in SPLITS}
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context) if workers > 1 else None
    in_flight: dict[Future, str] = {}

    def record(split: str, entry: dict[str, Any]) -> None:
        append_journal(journals[split], entry)
        done[split][entry["index"]] = entry

    def settle(block_until: int) -> None:
        while len(in_flight) > block_until:
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in finished:
                record(in_flight.pop(future), future.result())

    def flush(split: str) -> None:
        index, items = next_index[split], chunks[split]
        next_index[split] += 1
        chunks[split] = []
        most_images[split] = max([most_images[split], *(len(c.images) for c in items)])
        if index in done[split]:  # written before the kill, verified by its sha256
            return
        work = [(shard_key(c.id), c.payload(), list(c.images), c.where) for c in items]
        if pool is None:
            record(split, _write_shard(staging[split], index, work))
        else:
            in_flight[pool.submit(_write_shard, staging[split], index, work)] = split
            settle(2 * workers)  # a few shards in flight: memory stays flat

    try:
        with tqdm(desc="prepare conversations", unit="record", disable=None) as bar:
            for split, conv in planned(inputs, formats, tags, images_dir, plan_of, val_fraction, test_fraction):
                bar.update(1)
                cards[split].add(conv, [plan_of.images[p] for p in conv.images])
                chunks[split].append(conv)
                if len(chunks[split]) >= shard_size:
                    flush(split)
            for split in SPLITS:
                if chunks[split]:
                    flush(split)
            settle(0)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        for handle in journals.values():
            handle.close()
    if pool is not None:
        pool.shutdown()
    per_split = {}
    for split in SPLITS:
        entries = [done[split][i] for i in sorted(done[split]) if i < next_index[split]]
        for entry in entries:
            for p in entry["problems"]:
                if strict:
                    raise DataError(f"{p['where']}: {p['reason']} (--strict)")
                problems.add(p["where"], p["reason"])
        shards = [{k: e[k] for k in ("name", "samples", "units", "bytes", "sha256")} for e in entries if e["name"]]
        # `skipped`: this split's records whose images failed (record-level problems have no split yet:
        # they are in prepare_summary.json)
        write_manifest(staging[split], shards, task=TASK, units=sum(s["units"] for s in shards),
                       inputs=[f["path"] for f in plan["files"]], max_images=most_images[split],
                       skipped=sum(len(e["problems"]) for e in entries))
        for name in (PARTIAL_PLAN, PARTIAL_JOURNAL):
            (staging[split] / name).unlink()
        replace_directory(staging[split], root / split, MANIFEST_NAME)
        lost = sum(len(e["problems"]) for e in entries)  # images removed between the two passes
        per_split[split] = {"records": sum(s["samples"] for s in shards), "shards": len(shards),
                            **cards[split].summary(lost)}
    report = problems.summary()
    shared = SplitCard.shared_images([cards[s] for s in SPLITS])
    summary = {"out": str(root), "task": TASK, "format": plan["format"], "splits": per_split,
               "kept": sum(v["records"] for v in per_split.values()), "skipped": report["skipped"],
               "skipped_by_reason": report["skipped_by_reason"], "problems": report["problems"],
               "dedupe": dedupe, "ids_reused": plan_of.ids_reused, "duplicates": plan_of.duplicates,
               "split_by": "image" if file is not None else "files", "images_in_several_splits": shared,
               "workers": workers, "resumed_shards": resumed, "seconds": round(time.perf_counter() - start, 2)}
    if shared:
        log.warning("prepare conversations: %d images are in more than one of the files given per split: the held-out "
                    "score includes images the model trained on (give one --file to split by image)", shared)
    write_json_atomic(root / SUMMARY_NAME, summary)
    return {**summary, "problems": report["problems"][:20]}
