"""Awkward conversation files in the three formats (LLaVA, ShareGPT, messages), for the tests.

The same records in each format: good ones (multi-turn, text-only, two images, an absolute image
path, a system turn) and one bad one per reason, so that a test can check that every good record is
present exactly once and every bad one is counted under its reason.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

GOOD = ["good1", "text1", "multi1", "abs1", "sys1"]
REUSED = ["good1"]  # a second record under id good1 with other content: kept under a derived id, good1#<8 hex>
# reason -> number of records skipped for it, in every format (plus the format's own container problem)
BAD = {"missing image": 1, "image tags != images": 2, "roles do not alternate": 1, "unknown role": 1,
       "empty answer": 1, "no assistant turn": 1, "duplicate record": 1, "undecodable image": 1}


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (24, 24), (30, 30, 200)).save(folder / "blue.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)


def records(root: Path) -> list[tuple[str, list[tuple[str, str]], list[str]]]:
    """(id, [(role, text)], image paths) in canonical roles; relative paths are relative to `root`."""
    _images(root / "imgs")
    absolute = str((root / "imgs" / "blue.jpg").resolve())
    return [
        ("good1", [("user", "<image>\nwhat colour is it?"), ("assistant", "red"), ("user", "and the shape?"),
                   ("assistant", "a square")], ["imgs/red.png"]),
        ("text1", [("user", "say yes"), ("assistant", "yes")], []),
        ("multi1", [("user", "<image> and <image>: which is blue?"), ("assistant", "the second")],
         ["imgs/red.png", "imgs/blue.jpg"]),
        ("abs1", [("user", "<image>\nwhat colour?"), ("assistant", "blue")], [absolute]),
        ("sys1", [("system", "you answer in one word."), ("user", "<image>\ncolour?"), ("assistant", "red")],
         ["imgs/red.png"]),
        ("missing1", [("user", "<image>\nwhat?"), ("assistant", "x")], ["imgs/nowhere.png"]),
        ("tags1", [("user", "what colour?"), ("assistant", "red")], ["imgs/red.png"]),
        ("roles1", [("user", "one"), ("user", "two"), ("assistant", "x")], []),
        ("role2", [("robot", "hello"), ("assistant", "x")], []),
        ("empty1", [("user", "say something"), ("assistant", "  ")], []),
        ("noasst", [("user", "<image>\nanything?")], ["imgs/red.png"]),
        ("good1", [("user", "a repeat"), ("assistant", "of an id")], []),
        ("text1", [("user", "say yes"), ("assistant", "yes")], []),  # word for word: a duplicate
        ("broken1", [("user", "<image>\nwhat?"), ("assistant", "x")], ["imgs/broken.png"]),
        ("systag", [("system", "<image> look"), ("user", "what?"), ("assistant", "x")], ["imgs/red.png"]),
    ]


_LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "robot": "robot"}


def write(root: Path, fmt: str) -> Path:
    """The records in `fmt`, plus one container problem (a number in the array, a line that is not JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for sample_id, turns, images in records(root):
        if fmt == "llava":
            rec = {"id": sample_id, "conversations": [{"from": _LLAVA_ROLES[r], "value": t} for r, t in turns]}
            if images:
                rec["image"] = images[0] if len(images) == 1 else images
        else:
            rec = {"id": sample_id, "messages": [{"role": r, "content": t} for r, t in turns], "images": images}
        out.append(rec)
    if fmt == "messages":
        lines = [json.dumps(r) for r in out]
        lines.insert(3, "{this is not json")
        path = root / "data.jsonl"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = root / "data.json"
        path.write_text(json.dumps(out[:3] + [42] + out[3:], indent=1))
    return path
