"""Official annotation files -> one record per image, with every bad entry reported.

A record is what one shard sample holds: an image file and a JSON payload. Captions and
questions are grouped per image so that image bytes are stored once (a VQAv2 image has
about five questions); the stream expands them again.

File-level problems (missing file, not JSON, a top-level field of the wrong type) raise
`DataError` before any work. Record-level problems (a missing field, an unknown image id,
a missing image file) are reported with their index or id, counted and skipped.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.files import read_json

log = logging.getLogger(__name__)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
MAX_REPORTED = 1000


@dataclass
class Record:
    key: str  # shard sample key: unique, no dots (WebDataset splits names at the first dot)
    image: Path
    meta: dict[str, Any]
    units: int = 1  # input records it carries (questions, captions or 1)


@dataclass
class Problems:
    """Skipped input records, with the reason for each; logged as they are found."""

    source: str
    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, where: str, reason: str, records: int = 1) -> None:
        """`reason` reads "category: detail"; the summary counts skipped records per category."""
        self.count += records
        self.by_reason[reason.split(":")[0]] += records
        if len(self.examples) < MAX_REPORTED:
            self.examples.append({"where": where, "reason": reason, "records": records})
        log.warning("%s: %s: %s (skipped)", self.source, where, reason)

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.count, "skipped_by_reason": dict(sorted(self.by_reason.items())),
                "problems": self.examples}


def sample_key(value: Any) -> str:
    return _KEY_UNSAFE.sub("_", str(value))


class ImageIndex:
    """Finds image files in one folder by file name, by stem or by the number a name ends with
    (COCO_train2014_000000000009.jpg, 000000000009.png and 9.jpg are all image 9)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self._stems: dict[str, Path | None] | None = None
        self._numbers: dict[int, Path | None] = {}

    def _scan(self) -> dict[str, Path | None]:
        if self._stems is None:
            self._stems = {}
            with os.scandir(self.root) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if not entry.is_file() or entry.name.startswith("."):
                        continue
                    stem = entry.name.rsplit(".", 1)[0]
                    path = Path(entry.path)
                    self._stems[stem] = None if stem in self._stems else path  # None: ambiguous
                    match = _TRAILING_NUMBER.search(stem)
                    if match:
                        number = int(match.group(1))
                        self._numbers[number] = None if number in self._numbers else path
        return self._stems

    def by_file_name(self, file_name: str) -> Path | None:
        for candidate in (self.root / file_name, self.root / Path(file_name).name):
            if candidate.is_file():
                return candidate
        return None

    def by_id(self, image_id: Any) -> Path | None:
        stems = self._scan()
        text = str(image_id)
        if stems.get(text) is not None:
            return stems[text]
        if text.isdigit():
            return self._numbers.get(int(text))
        return None


def _require_list(doc: Any, key: str, path: Path) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a list field {key!r}")
    return doc[key]


def _missing(entry: Any, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """The first field that is missing or of the wrong type, as a reason string."""
    if not isinstance(entry, dict):
        return f"malformed record: expected an object, got {type(entry).__name__}"
    for name, kind in fields.items():
        if name not in entry:
            return f"malformed record: missing field {name!r}"
        value = entry[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
            return f"malformed record: field {name!r} is {value!r}"
    return None


def most_common(answers: list[str]) -> str:
    counts = Counter(answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


# --- COCO captions ---------------------------------------------------------------------------------


def coco_caption_records(captions: Path, images: Path, problems: Problems) -> list[Record]:
    doc = read_json(captions, "COCO captions file")
    image_entries = _require_list(doc, "images", captions)
    annotations = _require_list(doc, "annotations", captions)
    index = ImageIndex(images)
    by_id: dict[Any, dict] = {}
    for i, entry in enumerate(image_entries):
        reason = _missing(entry, {"id": (int, str), "file_name": str})
        if reason is None and entry["id"] in by_id:
            reason = f"duplicate image id: {entry['id']!r}"
        if reason:
            problems.add(f"{captions.name} images[{i}]", reason)
            continue
        by_id[entry["id"]] = {"entry": entry, "captions": [], "caption_ids": []}
    for i, ann in enumerate(annotations):
        reason = _missing(ann, {"image_id": (int, str), "caption": str})
        if reason is None and ann["image_id"] not in by_id:
            reason = f"unknown image_id: {ann['image_id']!r}"
        if reason:
            problems.add(f"{captions.name} annotations[{i}]", reason)
            continue
        by_id[ann["image_id"]]["captions"].append(ann["caption"].strip())
        by_id[ann["image_id"]]["caption_ids"].append(ann.get("id"))
    records = []
    for image_id, item in by_id.items():
        entry, where = item["entry"], f"image_id {image_id!r}"
        if not item["captions"]:
            problems.add(where, "no captions")
            continue
        path = index.by_file_name(entry["file_name"])
        if path is None:
            problems.add(where, f"missing image: {entry['file_name']}", records=len(item["captions"]))
            continue
        meta = {"task": "caption", "image_id": image_id, "file_name": entry["file_name"],
                "captions": item["captions"], "caption_ids": item["caption_ids"]}
        records.append(Record(sample_key(image_id), path, meta, units=len(item["captions"])))
    return records


# --- VQAv2 -------------------------------------------------------------------------------------------


def vqav2_records(questions: Path, annotations: Path, images: Path, problems: Problems) -> list[Record]:
    question_list = _require_list(read_json(questions, "VQAv2 questions file"), "questions", questions)
    annotation_list = _require_list(read_json(annotations, "VQAv2 annotations file"), "annotations", annotations)
    index = ImageIndex(images)
    answers_by_qid: dict[Any, dict] = {}
    for i, ann in enumerate(annotation_list):
        reason = _missing(ann, {"question_id": (int, str), "answers": list})
        if reason is None and not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"]):
            reason = "malformed record: field 'answers' needs objects with a string 'answer'"
        if reason is None and not ann["answers"]:
            reason = "malformed record: field 'answers' is empty"
        if reason:
            problems.add(f"{annotations.name} annotations[{i}]", reason)
            continue
        answers_by_qid[ann["question_id"]] = ann
    grouped: dict[Any, list[dict]] = {}
    for i, q in enumerate(question_list):
        reason = _missing(q, {"question_id": (int, str), "image_id": (int, str), "question": str})
        if reason is None and q["question_id"] not in answers_by_qid:
            reason = f"no annotation: question_id {q['question_id']!r}"
        if reason:
            problems.add(f"{questions.name} questions[{i}]", reason)
            continue
        ann = answers_by_qid[q["question_id"]]
        answers = [a["answer"] for a in ann["answers"]]
        grouped.setdefault(q["image_id"], []).append({
            "question_id": q["question_id"], "question": q["question"].strip(), "answers": answers,
            "multiple_choice_answer": ann.get("multiple_choice_answer") or most_common(answers),
            "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type"),
        })
    return _question_records("vqav2", grouped, index, problems)


# --- GQA ---------------------------------------------------------------------------------------------


def gqa_records(questions: Path, images: Path, problems: Problems) -> list[Record]:
    doc = read_json(questions, "GQA questions file")
    if not isinstance(doc, dict):
        raise DataError(f"{questions}: expected a JSON object keyed by question id")
    index = ImageIndex(images)
    grouped: dict[Any, list[dict]] = {}
    for qid, q in doc.items():
        reason = _missing(q, {"imageId": (str, int), "question": str, "answer": str})
        if reason:
            problems.add(f"question {qid!r}", reason)
            continue
        grouped.setdefault(str(q["imageId"]), []).append({
            "question_id": qid, "question": q["question"].strip(), "answer": q["answer"],
            "fullAnswer": q.get("fullAnswer"), "isBalanced": q.get("isBalanced"), "types": q.get("types"),
        })
    return _question_records("gqa", grouped, index, problems)


def _question_records(task: str, grouped: dict[Any, list[dict]], index: ImageIndex,
                      problems: Problems) -> list[Record]:
    records = []
    for image_id, items in grouped.items():
        path = index.by_id(image_id)
        if path is None:
            problems.add(f"image_id {image_id!r}", f"missing image: no file for id {image_id!r} in {index.root}",
                         records=len(items))
            continue
        meta = {"task": task, "image_id": image_id, "file_name": path.name, "questions": items}
        records.append(Record(sample_key(image_id), path, meta, units=len(items)))
    return records


# --- image folder (one sub-folder per class) -------------------------------------------------------


def imagefolder_records(root: Path, problems: Problems, classes: list[str] | None = None,
                        extensions: frozenset[str] = frozenset()) -> tuple[list[Record], list[str]]:
    """Records for root/{class}/**/{image}; classes are the sorted sub-folder names unless given
    (give them when converting several splits, so that every split uses the same indices)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = sorted(classes) if classes is not None else found
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected root/CLASS/IMAGE files)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders {unknown} are not in the class list {classes}")
    records, keys = [], set()
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            relative = path.relative_to(root).as_posix()
            if extensions and path.suffix.lower().lstrip(".") not in extensions:
                problems.add(relative, "not an image file name")
                continue
            meta = {"task": "classification", "label": label, "class_name": name, "file_name": relative}
            key = base = f"{label:04d}_{sample_key(path.relative_to(folder).with_suffix(''))}"
            while key in keys:  # a.jpg and a.png in one folder
                key = f"{base}_{len(keys)}"
            keys.add(key)
            records.append(Record(key, path, meta))
    return records, classes
