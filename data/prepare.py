"""`structlora prepare`: official annotation files + image folders -> WebDataset shards.

Output of each prepare_* function, in `out`:

    out/shard-000000.tar ...    {key}.{jpg|png|...} (the original image bytes) + {key}.json
    out/manifest.json           task, samples and units per shard, byte size, sha256, skipped records

One sample per image: its JSON holds the task, the ids and all captions (COCO) or all
questions with their answers (VQAv2: the 10 answers; GQA: answer, fullAnswer, types,
isBalanced); classification samples hold `label` and `class_name`. "units" counts the
captions / questions a shard carries. Shard i holds records [i * shard_size, (i + 1) * shard_size)
of the sorted records (fewer where images are unreadable), so shards are written in parallel
(`workers` processes) and are byte-identical whatever the number of workers. The directory is
built as `.{out}.partial` next to `out` and renamed into place: an interrupted prepare leaves
the previous output; run again with the same inputs, it keeps the shards it had finished
(verified by their sha256) and writes the rest.

`prepare_shapes_shards(world_dir, out, shard_size)` converts every split of a shapes world
(data.shapes) with these same functions into out/{caption,vqav2,gqa,classification}/{split}/.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.errors import DataError
from data.files import json_bytes, read_json, replace_directory, staging_dir, write_json_atomic
from data.images import IMAGE_EXTENSIONS, ImageDecodeError, sniff_extension
from data.records import (
    Problems,
    Record,
    coco_caption_records,
    gqa_records,
    imagefolder_records,
    vqav2_records,
)
from data.shapes_scene import SHAPES
from data.shards import MANIFEST_NAME, ShardWriter, file_sha256, write_manifest

SHAPES_INDEX_NAME = "index.json"


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


PARTIAL_PLAN = "plan.json"
PARTIAL_JOURNAL = "shards.jsonl"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _write_shard(staging: Path, index: int, records: list[Record]) -> dict[str, Any]:
    """Write records[...] as shard `index` (a worker process's unit of work); unreadable images are
    skipped and reported. Returns the journal entry: the shard's manifest fields and its problems."""
    writer = ShardWriter(staging, shard_size=max(1, len(records)), start=index)
    problems: list[dict[str, Any]] = []
    try:
        for record in records:
            try:
                data = record.image.read_bytes()
                ext = sniff_extension(data)
            except (OSError, ImageDecodeError) as err:
                problems.append({"where": f"image_id {record.meta.get('image_id', record.key)!r}",
                                 "reason": f"unreadable image: {record.image}: {err}", "records": record.units})
                continue
            writer.write(record.key, {ext: data, "json": json_bytes(record.meta, indent=None)}, units=record.units)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return journal_entry(index, shards, len(records), problems)


def journal_entry(index: int, shards: list[dict[str, Any]], images: int, problems: list[dict[str, Any]]) -> dict:
    """What a worker reports for shard `index`: its manifest fields (none when every image failed),
    how many records it was given and what it skipped; the journal line a resume reads back."""
    entry = shards[0] if shards else {"name": None, "samples": 0, "units": 0}
    return {"index": index, **entry, "images": images, "problems": problems}


def append_journal(handle: Any, entry: dict[str, Any]) -> None:
    """One journal line, on disk before the next shard is counted done (a kill leaves whole lines)."""
    handle.write(json.dumps(entry) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def resume_partial(staging: Path, plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards a killed prepare of the same plan already wrote, each verified by its sha256 (a
    partial or damaged one is written again); a different plan starts afresh."""
    plan_path = staging / PARTIAL_PLAN
    if staging.is_dir() and plan_path.is_file():
        try:
            same = json.loads(plan_path.read_text()) == plan
        except json.JSONDecodeError:
            same = False
        if same:
            for stray in staging.glob(".*.tmp-*"):  # a shard the kill caught half-written
                stray.unlink()
            done = {}
            journal = staging / PARTIAL_JOURNAL
            for line in journal.read_text().splitlines() if journal.is_file() else []:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                shard = staging / entry["name"] if entry.get("name") else None
                if shard is None or (shard.is_file() and file_sha256(shard) == entry["sha256"]):
                    done[int(entry["index"])] = entry
            return done
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json_atomic(plan_path, plan)
    return {}


def _write(out: Path, shard_size: int, task: str, inputs: dict[str, str],
           collect: Callable[[Problems], list[Record]], workers: int | None = None, **extra: Any) -> dict[str, Any]:
    """Collect records, write them as shards (in parallel, `shard_size` records each) into a
    staging directory next to `out`, then swap it in. A killed prepare leaves the staging
    directory: the next run with the same inputs keeps its shards (verified by sha256) and
    writes the rest."""
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out)
    workers = workers or default_workers()
    start = time.perf_counter()
    problems = Problems(source=f"prepare {task}")
    records = collect(problems)
    digest = hashlib.sha256("\n".join(f"{r.key}\t{r.image}" for r in records).encode()).hexdigest()
    plan = {"task": task, "shard_size": shard_size, "inputs": inputs, "records": len(records), "records_sha256": digest,
            "extra": json.loads(json.dumps(extra, default=str))}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    done = resume_partial(staging, plan)
    resumed = len(done)
    chunks = {i: records[i * shard_size:(i + 1) * shard_size] for i in range((len(records) + shard_size - 1) // shard_size)}
    todo = [i for i in chunks if i not in done]
    with (staging / PARTIAL_JOURNAL).open("a") as journal, \
            tqdm(total=len(records), initial=sum(len(chunks[i]) for i in done), desc=f"prepare {task}",
                 unit="image", disable=None) as bar:
        def record(entry: dict[str, Any]) -> None:
            append_journal(journal, entry)
            done[entry["index"]] = entry
            bar.update(entry["images"])

        if workers > 1 and len(todo) > 1:
            # fork where there is one: a spawned worker would import webdataset (and torch) again
            context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                futures = [pool.submit(_write_shard, staging, i, chunks[i]) for i in todo]
                try:
                    for future in as_completed(futures):
                        record(future.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        else:
            for i in todo:
                record(_write_shard(staging, i, chunks[i]))
    entries = [done[i] for i in sorted(done)]
    for entry in entries:
        for p in entry["problems"]:
            problems.add(p["where"], p["reason"], records=p["records"])
    shards = [{k: e[k] for k in ("name", "samples", "units", "bytes", "sha256")} for e in entries if e["name"]]
    report = problems.summary()
    manifest = write_manifest(staging, shards, task=task, inputs=inputs, units=sum(s["units"] for s in shards),
                              **extra, **report)
    for name in (PARTIAL_PLAN, PARTIAL_JOURNAL):
        (staging / name).unlink()
    replace_directory(staging, out, MANIFEST_NAME)
    seconds = time.perf_counter() - start
    written = sum(len(chunks[i]) for i in todo)
    return {"out": str(out), "task": task, "samples": manifest["samples"], "units": manifest["units"],
            "shards": len(shards), "skipped": report["skipped"], "skipped_by_reason": report["skipped_by_reason"],
            "problems": report["problems"][:20], "manifest": str(out / MANIFEST_NAME), "workers": workers,
            "resumed_shards": resumed, "seconds": round(seconds, 2),
            "images_per_second": round(written / seconds, 1) if seconds > 0 else None, **extra}


def prepare_coco(captions: Path, images: Path, out: Path, shard_size: int = 1000,
                 workers: int | None = None) -> dict[str, Any]:
    """COCO captions JSON + image folder -> caption shards (one sample per image, all captions)."""
    captions = _require_file(captions, "COCO captions file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "caption", {"captions": str(captions), "images": str(images)},
                  lambda problems: coco_caption_records(captions, images, problems), workers=workers)


def prepare_vqav2(questions: Path, annotations: Path, images: Path, out: Path,
                  shard_size: int = 1000, workers: int | None = None) -> dict[str, Any]:
    """VQAv2 questions + annotations JSON + image folder -> shards (per image: questions, 10 answers)."""
    questions = _require_file(questions, "VQAv2 questions file")
    annotations = _require_file(annotations, "VQAv2 annotations file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "vqav2",
                  {"questions": str(questions), "annotations": str(annotations), "images": str(images)},
                  lambda problems: vqav2_records(questions, annotations, images, problems), workers=workers)


def prepare_gqa(questions: Path, images: Path, out: Path, shard_size: int = 1000,
                workers: int | None = None) -> dict[str, Any]:
    """GQA questions JSON + image folder -> shards (per image: questions, answers, types, isBalanced)."""
    questions = _require_file(questions, "GQA questions file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "gqa", {"questions": str(questions), "images": str(images)},
                  lambda problems: gqa_records(questions, images, problems), workers=workers)


def prepare_imagefolder(root: Path, out: Path, shard_size: int = 1000,
                        classes: list[str] | None = None, workers: int | None = None) -> dict[str, Any]:
    """root/{class}/{image} -> classification shards. Class indices follow the sorted class
    names; pass `classes` to fix them across splits (a split may lack a class)."""
    root = _require_dir(root, "image folder root")
    names = sorted(classes) if classes is not None else _class_names(root)
    return _write(out, shard_size, "classification", {"root": str(root)},
                  lambda problems: imagefolder_records(root, problems, names, IMAGE_EXTENSIONS)[0], workers=workers,
                  classes=names)


def _class_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def prepare_shapes_shards(world_dir: Path, out: Path, shard_size: int = 1000, workers: int = 1) -> dict[str, Any]:
    """Convert every split of a shapes world with prepare_coco / prepare_vqav2 / prepare_gqa /
    prepare_imagefolder into out/{task}/{split}/, and write out/index.json listing them.

    `workers` processes write each folder's shards (default one: the world is small, and starting
    workers for each of its 16 folders costs more than it saves); the bytes are the same for any count."""
    world_dir = _require_dir(world_dir, "shapes world directory")
    summary = read_json(world_dir / "summary.json", "shapes world summary")
    staging = staging_dir(Path(out))
    index: dict[str, Any] = {"seed": summary.get("seed"), "shard_size": shard_size, "tasks": {}}
    try:
        for split, files in summary["files"].items():
            def src(name: str, files: dict = files) -> Path:
                return world_dir / files[name]

            results = {
                "caption": prepare_coco(src("captions"), src("images"), staging / "caption" / split, shard_size,
                                        workers),
                "vqav2": prepare_vqav2(src("vqav2_questions"), src("vqav2_annotations"), src("images"),
                                       staging / "vqav2" / split, shard_size, workers),
                "gqa": prepare_gqa(src("gqa_questions"), src("images"), staging / "gqa" / split, shard_size, workers),
                "classification": prepare_imagefolder(src("classification"), staging / "classification" / split,
                                                      shard_size, classes=list(SHAPES), workers=workers),
            }
            for task, result in results.items():
                index["tasks"].setdefault(task, {})[split] = {
                    "dir": f"{task}/{split}", "samples": result["samples"], "units": result["units"],
                    "shards": result["shards"], "skipped": result["skipped"],
                }
        write_json_atomic(staging / SHAPES_INDEX_NAME, index)
        replace_directory(staging, Path(out), SHAPES_INDEX_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), **index}
