"""File-level scoring, what `structlora score caption|vqa|gqa` calls (DESIGN.md section 6).

Each function reads the official files, validates them (errors name the file, the record and
the field), scores with the in-memory functions and returns a JSON-ready dict. Reading and
scoring are apart so that the in-memory functions can be used on generated predictions
directly. No input is modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from eval.caption_metrics import METRICS, score_captions
from eval.errors import EvalInputError
from eval.gqa_eval import score_gqa
from eval.predictions import Predictions, load_predictions, read_json
from eval.vqa_eval import score_vqa

__all__ = [
    "load_coco_references", "load_vqa_annotations", "load_gqa_questions",
    "score_caption_files", "score_vqa_files", "score_gqa_files",
    "score_captions", "score_vqa", "score_gqa",
]


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _records(data: Any, key: str, path: Path) -> list[Any]:
    if not isinstance(data, Mapping) or key not in data:
        raise EvalInputError(f"{path}: expected an object with a '{key}' list")
    records = data[key]
    if not isinstance(records, list):
        raise EvalInputError(f"{path}: '{key}' must be a list, got {type(records).__name__}")
    return records


def _field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(record, Mapping):
        raise EvalInputError(f"{where} is a {type(record).__name__}, expected an object")
    if name not in record:
        raise EvalInputError(f"{where} has no '{name}' field")
    value = record[name]
    if name.endswith("_id") or name == "id":
        if not _valid_id(value):
            raise EvalInputError(f"{where}: '{name}' must be an integer or a non-empty string, got {value!r}")
    elif not isinstance(value, kind):
        raise EvalInputError(f"{where}: '{name}' must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _check_known(preds: Predictions, known: set[str], what: str, against: Path) -> None:
    for key in preds.texts:
        if key not in known:
            raise EvalInputError(f"{preds.source}: {what} {preds.ids[key]!r} is not in {against}")


def _coverage_note(result: dict, preds: Predictions) -> dict:
    result["duplicates"] = preds.duplicates
    return result


# --- captions ------------------------------------------------------------------------------


def load_coco_references(path: Path) -> dict[Any, list[str]]:
    """COCO captions JSON -> {image_id: [captions]} in file order (images with no caption are not scored)."""
    path = Path(path)
    refs: dict[Any, list[str]] = {}
    for index, ann in enumerate(_records(read_json(path, "references file"), "annotations", path)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(ann, "image_id", (int, str), where)
        caption = _field(ann, "caption", str, where)
        refs.setdefault(image_id, []).append(caption)
    if not refs:
        raise EvalInputError(f"{path}: 'annotations' is empty")
    return refs


def score_caption_files(references: Path, predictions: Path, metrics: Iterable[str] = METRICS) -> dict:
    """`structlora score caption`: pycocoevalcap metrics of a COCO results file (all of them by default)."""
    refs = load_coco_references(Path(references))
    preds = load_predictions(Path(predictions), "caption")
    _check_known(preds, {str(k) for k in refs}, "image_id", Path(references))
    result = score_captions(refs, preds.texts, metrics)
    result.update(references=str(references), predictions=str(predictions))
    return _coverage_note(result, preds)


# --- VQAv2 ---------------------------------------------------------------------------------


def load_vqa_annotations(questions: Path, annotations: Path) -> list[dict]:
    """Validated VQAv2 annotation records (every one must have its question in the questions file)."""
    questions, annotations = Path(questions), Path(annotations)
    question_ids: set[str] = set()
    for index, q in enumerate(_records(read_json(questions, "questions file"), "questions", questions)):
        question_ids.add(str(_field(q, "question_id", (int, str), f"{questions}: questions[{index}]")))
    records = _records(read_json(annotations, "annotations file"), "annotations", annotations)
    seen: set[str] = set()
    for index, ann in enumerate(records):
        where = f"{annotations}: annotations[{index}]"
        qid = _field(ann, "question_id", (int, str), where)
        where = f"{where} (question_id {qid})"
        answers = _field(ann, "answers", list, where)
        if not answers:
            raise EvalInputError(f"{where}: 'answers' is empty")
        for j, answer in enumerate(answers):
            _field(answer, "answer", str, f"{where}: answers[{j}]")
        _field(ann, "question_type", str, where)
        _field(ann, "answer_type", str, where)
        if str(qid) in seen:
            raise EvalInputError(f"{where}: question_id {qid} is annotated twice")
        seen.add(str(qid))
        if str(qid) not in question_ids:
            raise EvalInputError(f"{where}: question_id {qid} is not in the questions file {questions}")
    if not records:
        raise EvalInputError(f"{annotations}: 'annotations' is empty")
    return records


def score_vqa_files(questions: Path, annotations: Path, predictions: Path) -> dict:
    """`structlora score vqa`: official VQAv2 accuracy of a VQA results file."""
    records = load_vqa_annotations(Path(questions), Path(annotations))
    preds = load_predictions(Path(predictions), "vqav2")
    _check_known(preds, {str(a["question_id"]) for a in records}, "question_id", Path(annotations))
    result = score_vqa(records, preds.texts)
    result.update(questions=str(questions), annotations=str(annotations), predictions=str(predictions))
    return _coverage_note(result, preds)


# --- GQA -----------------------------------------------------------------------------------


def load_gqa_questions(path: Path) -> dict[str, dict]:
    """The official GQA questions JSON (a dict keyed by question id)."""
    path = Path(path)
    data = read_json(path, "questions file")
    if not isinstance(data, Mapping) or not data:
        raise EvalInputError(f"{path}: expected a non-empty object keyed by question id (official GQA format)")
    return data  # type: ignore[return-value]


def score_gqa_files(questions: Path, predictions: Path) -> dict:
    """`structlora score gqa`: exact-match accuracy of a GQA predictions file on balanced questions."""
    qs = load_gqa_questions(Path(questions))
    preds = load_predictions(Path(predictions), "gqa")
    _check_known(preds, {str(k) for k in qs}, "questionId", Path(questions))
    result = score_gqa(qs, preds.texts, source=str(questions))
    result.update(questions=str(questions), predictions=str(predictions))
    return _coverage_note(result, preds)
