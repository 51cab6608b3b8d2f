"""JSON Schemas of the official results files, and a validator for files we write.

- ``caption``: the COCO caption results format that the COCO evaluation server and
  pycocoevalcap's ``COCO.loadRes`` take: a list of ``{"image_id": int, "caption": str}``,
  one per image.
- ``vqav2``: the VQA results format of the VQAv2 evaluation (EvalAI test-dev / test-std
  submission and the official ``vqaEval.py``): a list of ``{"question_id": int, "answer": str}``,
  one per question.
- ``gqa``: the predictions file of the official GQA ``eval.py``: a list of
  ``{"questionId": str, "prediction": str}``, one per question (GQA question ids are strings).

Extra fields are refused, as the servers refuse them; ids are unique (checked apart from the
schema, which cannot say "unique by field").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.errors import EvalInputError


def _list_of(id_field: str, id_type: str, text_field: str) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "array",
        "items": {
            "type": "object",
            "properties": {id_field: {"type": id_type, **({"minLength": 1} if id_type == "string" else {})},
                           text_field: {"type": "string"}},
            "required": [id_field, text_field],
            "additionalProperties": False,
        },
    }


RESULTS_SCHEMAS: dict[str, dict[str, Any]] = {
    "caption": _list_of("image_id", "integer", "caption"),
    "vqav2": _list_of("question_id", "integer", "answer"),
    "gqa": _list_of("questionId", "string", "prediction"),
    "conversations": _list_of("id", "string", "prediction"),
}
_ID_FIELD = {"caption": "image_id", "vqav2": "question_id", "gqa": "questionId", "conversations": "id"}


def validate_results(records: Sequence[Any], task: str, source: str = "<memory>") -> None:
    """Raise EvalInputError (naming `source`, the record and the field) unless `records` is an
    official results file of `task`."""
    import jsonschema

    if task not in RESULTS_SCHEMAS:
        raise ValueError(f"no results schema for task {task!r}; expected one of {', '.join(RESULTS_SCHEMAS)}")
    validator = jsonschema.Draft202012Validator(RESULTS_SCHEMAS[task])
    error = next(iter(sorted(validator.iter_errors(records), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EvalInputError(f"{source}: not a valid {task} results file at {where}: {error.message}")
    seen: set[Any] = set()
    for index, record in enumerate(records):
        key = record[_ID_FIELD[task]]
        if key in seen:
            raise EvalInputError(f"{source}: record {index}: {_ID_FIELD[task]} {key!r} appears twice")
        seen.add(key)


def validate_results_file(path: Path, task: str) -> int:
    """Validate a results JSON file; returns its number of records."""
    from eval.predictions import read_json

    records = read_json(Path(path), "results file")
    validate_results(records, task, source=str(path))
    return len(records)
