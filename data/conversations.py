"""Your own conversation files: the LLaVA, ShareGPT and messages formats, read as a stream.

Three formats, as their tools write them (one canonical form comes out of each):

- ``llava`` (haotian-liu/LLaVA, docs/Finetune_Custom_Data.md): a JSON array of
  ``{"id", "image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``; no ``image``: a text-only sample.
- ``sharegpt`` (as LLaMA-Factory reads it, data/mllm_demo.json): ``{"messages": [{"role": "user",
  "content": "<image>..."}, {"role": "assistant", "content": "..."}], "images": ["a.jpg"]}``, the list
  under ``messages`` or ``conversations``, tags ``role``/``content``/``user``/``assistant`` or
  ``from``/``value``/``human``/``gpt`` (both recognised; others given with ``tags``), an optional
  ``system`` field or system turn.
- ``messages`` (as ms-swift reads it): JSONL, one ``{"messages": [...], "images": [...]}`` per line
  (``image`` is an alias of ``images``); several ``<image>`` tags for several images.

The container is read from the content, not the suffix: a JSON array is parsed incrementally (ijson),
JSONL line by line, so memory stays flat in the file size. ``auto`` picks the format from the first
record. Canonical record: ``{"id", "messages": [{"role": system|user|assistant, "content"}], "images":
[resolved paths]}``. Record problems (`RecordProblem`) carry a reason category and the record's
index or line; file problems raise DataError at once.

Image paths, one rule: absolute paths are used as they are; a relative path is under ``images_dir``
when one is given, else relative to the data file's own folder (never the working directory).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.prompts import IMAGE_TOKEN

FORMATS = ("llava", "sharegpt", "messages")
REASONS = ("not json", "not an object", "no messages", "unknown role", "roles do not alternate", "empty answer",
           "no assistant turn", "image tags != images", "missing image", "undecodable image", "duplicate record",
           "duplicate id", "bad field")
USER_NAMES = {"user", "human"}
ASSISTANT_NAMES = {"assistant", "gpt", "bot", "model"}
SYSTEM_NAMES = {"system"}
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


class RecordProblem(ValueError):
    """A record that cannot be used: `reason` is one of REASONS, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Tags:
    """Field names and role names of a file (LLaMA-Factory's dataset_info `tags`); None = recognise both
    spellings (role/content and from/value; user/human, assistant/gpt)."""

    messages: str | None = None
    images: str | None = None
    role: str | None = None
    content: str | None = None
    user: str | None = None
    assistant: str | None = None
    system: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Tags:
        """'role=from,content=value,user=human' -> Tags; an unknown name is a DataError."""
        if not text:
            return cls()
        fields = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in cls.__dataclass_fields__ or not value.strip():
                raise DataError(f"--tags {text!r}: expected NAME=VALUE pairs with NAME in "
                                f"{', '.join(cls.__dataclass_fields__)}")
            fields[key.strip()] = value.strip()
        return cls(**fields)


@dataclass(frozen=True)
class Conversation:
    """One usable record: its id, its turns (system first if any, then user/assistant alternating,
    ending with the assistant), its image paths in the order of their `<image>` tags."""

    id: str
    messages: tuple[tuple[str, str], ...]
    images: tuple[str, ...]
    where: str

    def payload(self) -> dict[str, Any]:
        return {"task": "conversations", "id": self.id, "num_images": len(self.images),
                "messages": [{"role": r, "content": c} for r, c in self.messages]}


# --- reading the container ----------------------------------------------------------------------


def _open_text(path: Path):
    if not path.is_file():
        raise DataError(f"conversation file not found: {path}")
    return open(path, encoding="utf-8", newline="")


def container(path: Path) -> str:
    """'array' (a JSON array) or 'lines' (JSONL), from the first non-blank character."""
    try:
        with _open_text(path) as handle:
            head = handle.read(4096)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    first = head.lstrip("\ufeff \t\r\n")[:1]
    if first == "[":
        return "array"
    if first == "{":
        return "lines"
    raise DataError(f"{path}: expected a JSON array of records or JSON Lines, found "
                    f"{repr(first) if first else 'an empty file'} at the start")


def raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record, streamed: 'record N' of a JSON array, 'line N' of JSONL; a line
    that is not JSON comes out as a RecordProblem in the record's place. A truncated array, or text
    that is not UTF-8, raises DataError (a file-level problem)."""
    path = Path(path)
    kind = container(path)
    if kind == "lines":
        try:
            with _open_text(path) as handle:
                for lineno, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"line {lineno}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"line {lineno}", RecordProblem("not json", f"{err.msg} at column {err.colno}")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
        return
    import ijson

    index = -1
    try:
        with open(path, "rb") as handle:
            for index, record in enumerate(ijson.items(handle, "item", use_float=True)):
                yield f"record {index}", record
    except ijson.common.IncompleteJSONError as err:
        raise DataError(f"{path}: the JSON array is truncated or malformed after record {index} ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None


def detect_format(path: Path, probe: int = 20) -> str:
    """The format of the first records: `conversations` of from/value turns with an `image` field (or
    none) -> llava; an `images` list -> sharegpt in a JSON array, messages in JSONL."""
    kind = container(path)
    for _, record in _first(raw_records(path), probe):
        if not isinstance(record, dict):
            continue
        if "conversations" in record and "images" not in record:
            return "llava"
        if "messages" in record or "conversations" in record:
            return "sharegpt" if kind == "array" else "messages"
    raise DataError(f"{path}: cannot tell the format from its first {probe} records (no `conversations` or "
                    "`messages` list); give --format llava|sharegpt|messages")


def _first(items: Iterator, n: int) -> Iterator:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


# --- one record -> a Conversation -------------------------------------------------------------------


def _role(name: Any, tags: Tags) -> str:
    if not isinstance(name, str):
        raise RecordProblem("unknown role", f"role {name!r} is not a string")
    low = name.strip().lower()
    if (tags.user and name == tags.user) or (not tags.user and low in USER_NAMES):
        return "user"
    if (tags.assistant and name == tags.assistant) or (not tags.assistant and low in ASSISTANT_NAMES):
        return "assistant"
    if (tags.system and name == tags.system) or (not tags.system and low in SYSTEM_NAMES):
        return "system"
    raise RecordProblem("unknown role", f"role {name!r}")


def _turn(turn: Any, tags: Tags, i: int) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise RecordProblem("bad field", f"turn {i} is not an object")
    role_key = tags.role or ("role" if "role" in turn else "from")
    content_key = tags.content or ("content" if "content" in turn else "value")
    if role_key not in turn or content_key not in turn:
        raise RecordProblem("bad field", f"turn {i} has no `{role_key}` or no `{content_key}`")
    content = turn[content_key]
    if not isinstance(content, str):
        raise RecordProblem("bad field", f"turn {i}: `{content_key}` is not a string")
    return _role(turn[role_key], tags), content


def record_id(record: dict[str, Any], messages: list[tuple[str, str]], images: list[str]) -> str:
    """The record's own `id`, or a hash of its content: stable when the file grows, so a re-prepared
    file keeps every old sample in its split."""
    given = record.get("id")
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        return str(given)
    blob = json.dumps([messages, images], ensure_ascii=False, sort_keys=True).encode()
    return "sha-" + hashlib.sha256(blob).hexdigest()[:16]


def resolve_image(value: Any, images_dir: Path | None, data_file: Path) -> str:
    """The one path rule: absolute as is; relative under `images_dir` if given, else beside the data file."""
    if not isinstance(value, str) or not value.strip():
        raise RecordProblem("bad field", f"image path {value!r} is not a non-empty string")
    if _REMOTE.match(value):
        raise RecordProblem("missing image", f"{value}: remote images are not fetched; download them first")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (images_dir if images_dir is not None else Path(data_file).resolve().parent) / path
    return str(path)


def normalize(record: Any, fmt: str, tags: Tags, images_dir: Path | None, data_file: Path,
              where: str) -> Conversation:
    """A raw record of format `fmt` -> Conversation, or RecordProblem with the reason."""
    if isinstance(record, RecordProblem):
        raise record
    if not isinstance(record, dict):
        raise RecordProblem("not an object", f"a {type(record).__name__}, not an object")
    key = tags.messages or ("conversations" if fmt == "llava" or "messages" not in record else "messages")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordProblem("no messages", f"no `{key}` list, or an empty one")
    messages = [_turn(t, tags, i) for i, t in enumerate(turns)]
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(r == "system" for r, _ in messages):
        messages.insert(0, ("system", system))
    if any(r == "system" for r, _ in messages[1:]):
        raise RecordProblem("roles do not alternate", "a system turn after the first turn")
    body = messages[1:] if messages[0][0] == "system" else messages
    if not any(r == "assistant" for r, _ in body):
        raise RecordProblem("no assistant turn", "no assistant answer to train on")
    for i, (role, _) in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise RecordProblem("roles do not alternate", f"turn {i} is {role} (user and assistant must "
                                "alternate, starting with the user)")
    if body[-1][0] != "assistant":
        raise RecordProblem("roles do not alternate", "the last turn is the user's, with no answer")
    if messages[0][0] == "system" and IMAGE_TOKEN in messages[0][1]:
        raise RecordProblem("image tags != images", f"the system turn holds an {IMAGE_TOKEN} tag (images go in "
                                                    "user turns)")
    for i, (role, content) in enumerate(body):
        if role == "assistant" and not content.strip():
            raise RecordProblem("empty answer", f"assistant turn {i} is empty")
        if role == "assistant" and IMAGE_TOKEN in content:
            raise RecordProblem("image tags != images", f"assistant turn {i} holds an {IMAGE_TOKEN} tag")
    image_key = tags.images or ("image" if fmt == "llava" else ("images" if "images" in record else "image"))
    raw = record.get(image_key)
    paths = [] if raw is None or raw == "" else (list(raw) if isinstance(raw, list) else [raw])
    tags_count = sum(content.count(IMAGE_TOKEN) for role, content in messages if role == "user")
    if tags_count != len(paths):
        raise RecordProblem("image tags != images", f"{tags_count} {IMAGE_TOKEN} tags, {len(paths)} images")
    images = [resolve_image(p, images_dir, data_file) for p in paths]
    return Conversation(record_id(record, messages, paths), tuple(messages), tuple(images), where)


def split_of(sample_id: str, val_fraction: float, test_fraction: float) -> str:
    """train / val / test by a hash of the id: the same id always lands in the same split."""
    u = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"

