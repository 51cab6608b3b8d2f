"""GQA accuracy: the official eval.py's exact match on balanced questions, after LLaVA's conversion.

- Questions: the official GQA questions JSON, a dict keyed by question id whose values carry
  ``answer``, ``types`` (``structural``, ``semantic``) and ``isBalanced``.
- Scored set: balanced questions (``isBalanced`` true), as the official eval.py does for its
  accuracy ("more robust against cheating by making educated guesses").
- ``accuracy``: exact match after LLaVA's ``convert_gqa_for_eval.py`` conversion of the
  prediction (``text.rstrip('.').lower()``: every trailing period, then lower case). This is
  the number LLaVA-1.5 reports.
- ``accuracy_raw``: exact match of the prediction as given (what eval.py computes on a file
  that was not converted).
- ``binary`` / ``open``: the official split, ``open`` iff the structural type is ``query``,
  ``binary`` otherwise (verify, logical, choose, compare). Note that this is not "yes/no
  answers": ``choose`` questions ("left or right?") count as binary, as in eval.py.
- Also per structural and per semantic type, as eval.py. Consistency, validity, plausibility,
  grounding and distribution need the scene graphs / choices files and are not computed.
- A balanced question without a prediction scores 0 and is counted in ``missing`` (eval.py
  would stop with a KeyError); a prediction for an unknown question id is an error naming it;
  predictions for unbalanced questions are ignored and counted.

Accuracies are percent rounded to 2 places (eval.py prints ``{:.2f}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eval.errors import EvalInputError


def llava_gqa_answer(text: str) -> str:
    """LLaVA's conversion of a generated GQA answer: strip trailing periods, lower-case."""
    return text.rstrip(".").lower()


def is_binary(question: Mapping[str, Any]) -> bool:
    """The official answer-type split: everything but structural type 'query' is binary."""
    return question["types"]["structural"] != "query"


def _check_question(qid: str, question: Any, source: str) -> None:
    where = f"{source}: question {qid}"
    if not isinstance(question, Mapping):
        raise EvalInputError(f"{where} is a {type(question).__name__}, expected an object")
    if not isinstance(question.get("answer"), str):
        raise EvalInputError(f"{where} has no string 'answer' field")
    if not isinstance(question.get("isBalanced"), bool):
        raise EvalInputError(f"{where} has no boolean 'isBalanced' field")
    types = question.get("types")
    if not isinstance(types, Mapping) or not isinstance(types.get("structural"), str):
        raise EvalInputError(f"{where} has no 'types.structural' field")


def _pct(hits: list[bool], ndigits: int) -> float:
    return round(100.0 * sum(hits) / len(hits), ndigits) if hits else 0.0


def score_gqa(questions: Mapping[Any, Mapping[str, Any]], predictions: Mapping[Any, str],
              source: str = "questions", ndigits: int = 2) -> dict:
    """GQA accuracy of `predictions` (question id -> answer) on the balanced `questions`.

    Ids are matched as strings. Nothing passed in is modified. Returns ``accuracy``,
    ``accuracy_raw``, ``binary``, ``open``, ``binary_raw``, ``open_raw``,
    ``perStructuralType``, ``perSemanticType`` (percent), ``perQuestion`` (id -> 0/1 after
    conversion), ``num_questions``, ``num_binary``, ``num_open``, ``num_predictions``,
    ``missing``, ``coverage``, ``missing_ids`` (first 20), ``ignored_unbalanced``.
    """
    preds = {str(k): v for k, v in predictions.items()}
    known = {str(k) for k in questions}
    unknown = [k for k in preds if k not in known]
    if unknown:
        raise EvalInputError(f"questionId {unknown[0]} has a prediction but is not in {source} "
                             f"({len(unknown)} such ids)")
    hits: list[bool] = []
    raw_hits: list[bool] = []
    split: dict[str, list[bool]] = {"binary": [], "open": []}
    split_raw: dict[str, list[bool]] = {"binary": [], "open": []}
    structural: dict[str, list[bool]] = {}
    semantic: dict[str, list[bool]] = {}
    per_question: dict[Any, int] = {}
    missing: list[Any] = []
    ignored = 0
    for qid, question in questions.items():
        _check_question(str(qid), question, source)
        pred = preds.get(str(qid))
        if not question["isBalanced"]:
            ignored += pred is not None
            continue
        gold = question["answer"]
        if pred is None:
            missing.append(qid)
            correct = raw_correct = False
        else:
            correct = llava_gqa_answer(pred) == gold
            raw_correct = pred == gold
        kind = "binary" if is_binary(question) else "open"
        hits.append(correct)
        raw_hits.append(raw_correct)
        split[kind].append(correct)
        split_raw[kind].append(raw_correct)
        structural.setdefault(question["types"]["structural"], []).append(correct)
        semantic.setdefault(str(question["types"].get("semantic", "unknown")), []).append(correct)
        per_question[qid] = int(correct)
    if not hits:
        raise EvalInputError(f"{source} has no balanced questions to score")
    return {
        "accuracy": _pct(hits, ndigits),
        "accuracy_raw": _pct(raw_hits, ndigits),
        "binary": _pct(split["binary"], ndigits),
        "open": _pct(split["open"], ndigits),
        "binary_raw": _pct(split_raw["binary"], ndigits),
        "open_raw": _pct(split_raw["open"], ndigits),
        "perStructuralType": {k: _pct(v, ndigits) for k, v in structural.items()},
        "perSemanticType": {k: _pct(v, ndigits) for k, v in semantic.items()},
        "perQuestion": per_question,
        "num_questions": len(hits),
        "num_binary": len(split["binary"]),
        "num_open": len(split["open"]),
        "num_predictions": len(hits) - len(missing),
        "missing": len(missing),
        "coverage": (len(hits) - len(missing)) / len(hits),
        "missing_ids": missing[:20],
        "ignored_unbalanced": ignored,
    }
