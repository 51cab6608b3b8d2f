"""`structlora prepare`: official annotation files + image folders -> WebDataset shards.

Output of each prepare_* function, in `out`:

    out/shard-000000.tar ...    {key}.{jpg|png|...} (the original image bytes) + {key}.json
    out/manifest.json           task, samples and units per shard, byte size, sha256, skipped records

One sample per image: its JSON holds the task, the ids and all captions (COCO) or all
questions with their answers (VQAv2: the 10 answers; GQA: answer, fullAnswer, types,
isBalanced); classification samples hold `label` and `class_name`. "units" counts the
captions / questions a shard carries. The directory is built under a temporary name and
renamed into place, so an interrupted prepare leaves the previous output (or nothing).

`prepare_shapes_shards(world_dir, out, shard_size)` converts every split of a shapes world
(data.shapes) with these same functions into out/{caption,vqav2,gqa,classification}/{split}/.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
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
from data.shards import MANIFEST_NAME, ShardWriter, write_manifest

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


def _write(out: Path, shard_size: int, task: str, inputs: dict[str, str],
           collect: Callable[[Problems], list[Record]], **extra: Any) -> dict[str, Any]:
    """Collect records, write them as shards in a staging directory, then swap it into `out`."""
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out)
    problems = Problems(source=f"prepare {task}")
    records = collect(problems)
    staging = staging_dir(out)
    writer = ShardWriter(staging, shard_size)
    try:
        for record in tqdm(records, desc=f"prepare {task}", unit="image", disable=None):
            try:
                data = record.image.read_bytes()
                ext = sniff_extension(data)
            except (OSError, ImageDecodeError) as err:
                problems.add(f"image_id {record.meta.get('image_id', record.key)!r}",
                             f"unreadable image: {record.image}: {err}", records=record.units)
                continue
            writer.write(record.key, {ext: data, "json": json_bytes(record.meta, indent=None)}, units=record.units)
        shards = writer.close()
        report = problems.summary()
        manifest = write_manifest(staging, shards, task=task, inputs=inputs,
                                  units=sum(s["units"] for s in shards), **extra, **report)
        replace_directory(staging, out, MANIFEST_NAME)
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), "task": task, "samples": manifest["samples"], "units": manifest["units"],
            "shards": len(shards), "skipped": report["skipped"], "skipped_by_reason": report["skipped_by_reason"],
            "problems": report["problems"][:20], "manifest": str(out / MANIFEST_NAME), **extra}


def prepare_coco(captions: Path, images: Path, out: Path, shard_size: int = 1000) -> dict[str, Any]:
    """COCO captions JSON + image folder -> caption shards (one sample per image, all captions)."""
    captions = _require_file(captions, "COCO captions file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "caption", {"captions": str(captions), "images": str(images)},
                  lambda problems: coco_caption_records(captions, images, problems))


def prepare_vqav2(questions: Path, annotations: Path, images: Path, out: Path,
                  shard_size: int = 1000) -> dict[str, Any]:
    """VQAv2 questions + annotations JSON + image folder -> shards (per image: questions, 10 answers)."""
    questions = _require_file(questions, "VQAv2 questions file")
    annotations = _require_file(annotations, "VQAv2 annotations file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "vqav2",
                  {"questions": str(questions), "annotations": str(annotations), "images": str(images)},
                  lambda problems: vqav2_records(questions, annotations, images, problems))


def prepare_gqa(questions: Path, images: Path, out: Path, shard_size: int = 1000) -> dict[str, Any]:
    """GQA questions JSON + image folder -> shards (per image: questions, answers, types, isBalanced)."""
    questions = _require_file(questions, "GQA questions file")
    images = _require_dir(images, "image folder")
    return _write(out, shard_size, "gqa", {"questions": str(questions), "images": str(images)},
                  lambda problems: gqa_records(questions, images, problems))


def prepare_imagefolder(root: Path, out: Path, shard_size: int = 1000,
                        classes: list[str] | None = None) -> dict[str, Any]:
    """root/{class}/{image} -> classification shards. Class indices follow the sorted class
    names; pass `classes` to fix them across splits (a split may lack a class)."""
    root = _require_dir(root, "image folder root")
    names = sorted(classes) if classes is not None else _class_names(root)
    return _write(out, shard_size, "classification", {"root": str(root)},
                  lambda problems: imagefolder_records(root, problems, names, IMAGE_EXTENSIONS)[0], classes=names)


def _class_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def prepare_shapes_shards(world_dir: Path, out: Path, shard_size: int = 1000) -> dict[str, Any]:
    """Convert every split of a shapes world with prepare_coco / prepare_vqav2 / prepare_gqa /
    prepare_imagefolder into out/{task}/{split}/, and write out/index.json listing them."""
    world_dir = _require_dir(world_dir, "shapes world directory")
    summary = read_json(world_dir / "summary.json", "shapes world summary")
    staging = staging_dir(Path(out))
    index: dict[str, Any] = {"seed": summary.get("seed"), "shard_size": shard_size, "tasks": {}}
    try:
        for split, files in summary["files"].items():
            def src(name: str, files: dict = files) -> Path:
                return world_dir / files[name]

            results = {
                "caption": prepare_coco(src("captions"), src("images"), staging / "caption" / split, shard_size),
                "vqav2": prepare_vqav2(src("vqav2_questions"), src("vqav2_annotations"), src("images"),
                                       staging / "vqav2" / split, shard_size),
                "gqa": prepare_gqa(src("gqa_questions"), src("images"), staging / "gqa" / split, shard_size),
                "classification": prepare_imagefolder(src("classification"), staging / "classification" / split,
                                                      shard_size, classes=list(SHAPES)),  # same indices in every split
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
