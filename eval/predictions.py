"""Reading and writing predictions files in the official results formats.

Generation writes, scoring reads (lmms-eval / LLaVA style). The formats are the official
ones, so files from other tools score unchanged:

- captions: a JSON list of ``{"image_id", "caption"}`` (COCO results format);
- VQAv2: a JSON list of ``{"question_id", "answer"}`` (VQA results format);
- GQA: a JSON list of ``{"questionId", "prediction"}`` (the official GQA eval.py);
  ``question_id`` / ``answer`` (and LLaVA's raw ``text``) are accepted as well.

JSONL (one such object per line) is accepted everywhere. Every error names the file and the
record (index or line) and the field, and nothing here mutates what it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.files import write_bytes_atomic
from eval.errors import EvalInputError

TASKS = ("caption", "vqav2", "gqa", "conversations")

# (accepted id keys, accepted text keys); the first of each is what we write.
PREDICTION_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "caption": (("image_id",), ("caption",)),
    "vqav2": (("question_id",), ("answer",)),
    "gqa": (("questionId", "question_id"), ("prediction", "answer", "text")),
    "conversations": (("id",), ("prediction", "answer", "text")),  # your own data: the last answer
}


def id_key(task: str) -> str:
    """The id field written for `task` (official spelling)."""
    return PREDICTION_KEYS[_check_task(task)][0][0]


def text_key(task: str) -> str:
    """The text field written for `task` (official spelling)."""
    return PREDICTION_KEYS[_check_task(task)][1][0]


def _check_task(task: str) -> str:
    if task not in PREDICTION_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


# --- generic JSON / JSONL ------------------------------------------------------------------


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed file is an EvalInputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise EvalInputError(f"{path}: not UTF-8 text ({err})") from None


def read_records(path: Path) -> list[Any]:
    """Records of a JSON list file or a JSONL file (format detected from the content, not the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"predictions file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalInputError(f"{path}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise EvalInputError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("{"):
            raise EvalInputError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
        return _read_jsonl(path, text)
    if isinstance(data, dict):
        return [data]  # a one-line JSONL file
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: expected a JSON list of prediction records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}: line {lineno} is not valid JSON ({err.msg}, column {err.colno})") from None
    return records


def write_text_atomic(text: str, path: Path) -> Path:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def write_json_atomic(obj: Any, path: Path, indent: int | None = 2) -> Path:
    """JSON dump with the temp-then-rename rule (DESIGN.md section 1)."""
    return write_text_atomic(json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n", path)


def write_jsonl_atomic(records: Iterable[Mapping[str, Any]], path: Path) -> Path:
    """One JSON object per line, temp-then-rename."""
    lines = [json.dumps(dict(r), default=_json_default) for r in records]
    return write_text_atomic("".join(line + "\n" for line in lines), path)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the metrics dicts carry them.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --- predictions ---------------------------------------------------------------------------


@dataclass
class Predictions:
    """Validated predictions of one task, keyed by ``str(id)`` so 7 and "7" are the same question.

    Attributes:
        texts: str(id) -> predicted text.
        ids: str(id) -> the id as it appeared in the file (for messages).
        duplicates: number of repeated records with the same id and the same text (tolerated:
            shards from several ranks can overlap); a repeated id with a different text is an error.
    """

    texts: dict[str, str] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)
    duplicates: int = 0
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.texts)


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def parse_predictions(records: Iterable[Any], task: str, source: str = "<memory>") -> Predictions:
    """Validate prediction records (official format) of `task`; errors name `source`, the index and the field."""
    id_keys, text_keys = PREDICTION_KEYS[_check_task(task)]
    out = Predictions(source=source)
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        if not isinstance(record, Mapping):
            raise EvalInputError(f"{where} is a {type(record).__name__}, expected an object with "
                                 f"'{id_keys[0]}' and '{text_keys[0]}'")
        id_field = next((k for k in id_keys if k in record), None)
        if id_field is None:
            raise EvalInputError(f"{where} has no '{id_keys[0]}' field")
        raw_id = record[id_field]
        if not _valid_id(raw_id):
            raise EvalInputError(f"{where}: '{id_field}' must be an integer or a non-empty string, got {raw_id!r}")
        text_field = next((k for k in text_keys if k in record), None)
        if text_field is None:
            raise EvalInputError(f"{where} ({id_field}={raw_id!r}) has no '{text_keys[0]}' field")
        text = record[text_field]
        if not isinstance(text, str):
            raise EvalInputError(f"{where} ({id_field}={raw_id!r}): '{text_field}' must be a string, "
                                 f"got {type(text).__name__}")
        key = str(raw_id)
        if key in out.texts:
            if out.texts[key] != text:
                raise EvalInputError(f"{source}: {id_field} {raw_id!r} appears twice with different "
                                     f"{text_field}s (records {first_index[key]} and {index})")
            out.duplicates += 1
            continue
        first_index[key] = index
        out.texts[key] = text
        out.ids[key] = raw_id
    return out


def load_predictions(path: Path, task: str) -> Predictions:
    """Read and validate a predictions file (JSON list or JSONL) of `task`."""
    return parse_predictions(read_records(Path(path)), task, source=str(path))


def prediction_record(task: str, sample_id: Any, text: str) -> dict[str, Any]:
    """One record in the official results format of `task`."""
    return {id_key(task): sample_id, text_key(task): text}
