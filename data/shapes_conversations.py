"""The shapes world written as conversation files, the offline example of "bring your own data".

One conversation per image: the caption request first ("<image>\\n" + the caption prompt -> its first
reference caption), then each of its VQAv2 questions with the most common answer, so the last turn
(the one evaluation generates) is a short answer. Written in any of the three formats of
`data.conversations` (llava: JSON array, `conversations` + `image`; sharegpt: JSON array, `messages` +
`images`; messages: JSONL), one file per split, image paths relative to the file's own folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.files import read_json, write_bytes_atomic
from data.prompts import CAPTION_PROMPT, IMAGE_TOKEN

FILE_NAMES = {"llava": "shapes_{split}.json", "sharegpt": "shapes_{split}.json", "messages": "shapes_{split}.jsonl"}


def shapes_turns(world_dir: Path, split: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """[(id, image path, [(user, assistant), ...])] of one split of a shapes world."""
    world_dir = Path(world_dir)
    files = read_json(world_dir / "summary.json", "shapes world summary")["files"][split]
    captions = read_json(world_dir / files["captions"], "captions")
    questions = read_json(world_dir / files["vqav2_questions"], "VQAv2 questions")["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in read_json(world_dir / files["vqav2_annotations"], "VQAv2 annotations")["annotations"]}
    first_caption: dict[int, str] = {}
    for ann in captions["annotations"]:
        first_caption.setdefault(ann["image_id"], ann["caption"])
    asked: dict[int, list[tuple[str, str]]] = {}
    for q in questions:
        asked.setdefault(q["image_id"], []).append((q["question"], answers[q["question_id"]]))
    out = []
    for image in sorted(captions["images"], key=lambda im: im["id"]):
        turns = [(f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}", first_caption[image["id"]]), *asked.get(image["id"], [])]
        out.append((f"shapes-{split}-{image['id']}", str(world_dir / files["images"] / image["file_name"]), turns))
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
                               splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """Write `out_dir/shapes_{split}.json[l]` for each split; returns {split: {"file", "records"}}."""
    if fmt not in FILE_NAMES:
        raise ValueError(f"format {fmt!r}: choose from {', '.join(FILE_NAMES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        path = out_dir / FILE_NAMES[fmt].format(split=split)
        records = [_record(fmt, sid, os.path.relpath(image, out_dir), turns)
                   for sid, image, turns in shapes_turns(world_dir, split)]
        if fmt == "messages":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
        write_bytes_atomic(path, text.encode("utf-8"))
        written[split] = {"file": str(path), "records": len(records)}
    return written
