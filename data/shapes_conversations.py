"""The shapes world written as conversation files, the offline example of "bring your own data".

One conversation per image: the caption request first ("<image>\\n" + the caption prompt -> its first
reference caption), then each of its VQAv2 questions with the most common answer, so the last turn
(the one evaluation generates) is a short answer. Written in any of the three formats of
`data.conversations` (llava: JSON array, `conversations` + `image`; sharegpt: JSON array, `messages` +
`images`; messages: JSONL), one file per split, image paths relative to the file's own folder.

`answers="long"` writes a long-answer set instead: one turn per image, "What can we see in this picture?"
answered by the image's reference captions joined, longest first, up to 20-60 words (`long_answer`): the
set that shows generation budgets at work (an answer longer than a caption's 64-token budget is cut).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.files import read_json, write_bytes_atomic
from data.prompts import CAPTION_PROMPT, IMAGE_TOKEN

LONG_QUESTION = "What can we see in this picture?"  # the shapes world's own words (the tiny tokenizer knows them)
LONG_MIN_WORDS, LONG_MAX_WORDS = 20, 60
FILE_NAMES = {"llava": "shapes_{split}.json", "sharegpt": "shapes_{split}.json", "messages": "shapes_{split}.jsonl"}


def _split_files(world_dir: Path, split: str) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """(the split's file names, image id -> its reference captions in file order)."""
    files = read_json(Path(world_dir) / "summary.json", "shapes world summary")["files"][split]
    captions = read_json(Path(world_dir) / files["captions"], "captions")
    by_image: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    return {**files, "_images": sorted(captions["images"], key=lambda im: im["id"])}, by_image


def shapes_turns(world_dir: Path, split: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """[(id, image path, [(user, assistant), ...])] of one split of a shapes world."""
    world_dir = Path(world_dir)
    files, captions = _split_files(world_dir, split)
    questions = read_json(world_dir / files["vqav2_questions"], "VQAv2 questions")["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in read_json(world_dir / files["vqav2_annotations"], "VQAv2 annotations")["annotations"]}
    asked: dict[int, list[tuple[str, str]]] = {}
    for q in questions:
        asked.setdefault(q["image_id"], []).append((q["question"], answers[q["question_id"]]))
    out = []
    for image in files["_images"]:
        turns = [(f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}", captions[image["id"]][0]), *asked.get(image["id"], [])]
        out.append((f"shapes-{split}-{image['id']}", str(world_dir / files["images"] / image["file_name"]), turns))
    return out


def long_answer(captions: list[str], min_words: int = LONG_MIN_WORDS, max_words: int = LONG_MAX_WORDS) -> str | None:
    """The captions joined, longest first, until the answer has at least `min_words` words (never more than
    `max_words`: a caption that would pass it is left out); None when they cannot reach `min_words`."""
    chosen, words = [], 0
    for caption in sorted(dict.fromkeys(captions), key=lambda c: (-len(c.split()), c)):
        size = len(caption.split())
        if words + size > max_words:
            continue
        chosen.append(caption)
        words += size
        if words >= min_words:
            return " ".join(chosen)
    return None


def shapes_long_turns(world_dir: Path, split: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """[(id, image path, [(LONG_QUESTION, long answer)])] of one split (images whose captions reach 20 words)."""
    files, captions = _split_files(Path(world_dir), split)
    out = []
    for image in files["_images"]:
        answer = long_answer(captions[image["id"]])
        if answer is not None:
            out.append((f"shapes-{split}-{image['id']}", str(Path(world_dir) / files["images"] / image["file_name"]),
                        [(f"{IMAGE_TOKEN}\n{LONG_QUESTION}", answer)]))
    return out


def _record(fmt: str, sample_id: str, image: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    if fmt == "llava":
        conv = [{"from": role, "value": text} for user, answer in turns for role, text in
                (("human", user), ("gpt", answer))]
        return {"id": sample_id, "image": image, "conversations": conv}
    messages = [{"role": role, "content": text} for user, answer in turns for role, text in
                (("user", user), ("assistant", answer))]
    return {"id": sample_id, "messages": messages, "images": [image]}


def write_shapes_conversations(world_dir: Path, out_dir: Path, fmt: str = "llava",
                               splits: tuple[str, ...] = ("train", "val", "test"), answers: str = "short") -> dict[str, Any]:
    """Write `out_dir/shapes_{split}.json[l]` for each split; returns {split: {"file", "records"}}. `answers`:
    short (a caption, then questions) or long (one 20-60-word description per image)."""
    if fmt not in FILE_NAMES:
        raise ValueError(f"format {fmt!r}: choose from {', '.join(FILE_NAMES)}")
    if answers not in ("short", "long"):
        raise ValueError(f"answers {answers!r}: choose short or long")
    turns_of = shapes_long_turns if answers == "long" else shapes_turns
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        path = out_dir / FILE_NAMES[fmt].format(split=split)
        records = [_record(fmt, sid, os.path.relpath(image, out_dir), turns)
                   for sid, image, turns in turns_of(world_dir, split)]
        if fmt == "messages":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
        write_bytes_atomic(path, text.encode("utf-8"))
        written[split] = {"file": str(path), "records": len(records)}
    return written
