"""VQAv2 accuracy, reproducing the official GT-Vision-Lab/VQA ``vqaEval.py`` (current master).

What the official script does, and so what this module does (each point is tested):

1. Every ground-truth answer and the predicted answer get newlines and tabs replaced by
   spaces and are stripped.
2. Only if the (stripped) ground-truth answers are NOT all identical are they, and the
   prediction, normalised: punctuation (``process_punctuation``), then lower-casing, number
   words -> digits, article removal and contraction repair (``process_digit_article``).
   When all annotators agree nothing is normalised, so the comparison is exact and case
   sensitive: "Yes" does not match ten "yes" (the maintainers keep raw OCR-like answers so).
3. Accuracy of a question is the average, over each ground-truth record, of
   ``min(1, #matches among the other records / 3)`` (leave-one-out). "Other records" are the
   records not equal to it as whole records (answer, answer_id, confidence), exactly as the
   official list comprehension compares dicts; with the official annotations (answer_id
   1..10) that is leave-one-out.
4. Overall / per answer type / per question type accuracies are means of the per-question
   values, in percent, rounded to 2 places with Python's ``round``; per-question values are
   ``round(100 * acc, 2)``.

Missing predictions (the official ``loadRes`` refuses them) are scored as wrong (0) and
reported with a coverage figure, so a partial file cannot look better than it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from eval.errors import EvalInputError

# The official contraction map, as "typed form=canonical form" pairs (it includes its own
# oddities, e.g. "somebody'd" -> "somebodyd", and capitalised keys that never match after
# lower-casing; kept verbatim because they are part of the metric).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The official list, in its order (the order matters: each mark is handled in turn).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Official pattern, typo included: "(?!<=\d)" is a look-AHEAD for the text "<=digit", not a
# look-behind, so the effect is "a period not followed by a digit".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the third positional argument
# of Pattern.sub is `count`, so at most re.UNICODE (= 32) periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official punctuation rule.

    For each mark: delete it if the input has it next to a space or has a comma between two
    digits anywhere (so "1,000" -> "1000"); otherwise replace it by a space ("black/white" ->
    "black white"). Then delete periods not followed by a digit ("2.5" keeps its period).
    The conditions look at the original input, not at the partly processed text.
    """
    out = text
    comma_in_number = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or comma_in_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official rule: lower-case, split on whitespace, number words -> digits, drop articles,
    then repair contractions ("dont" -> "don't"), and join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Both official steps, in the official order."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(gt_answers: Sequence[Mapping[str, Any] | str], prediction: str) -> float:
    """Accuracy in [0, 1] of one predicted answer against the ground-truth answer records.

    `gt_answers` are the annotation's ``answers`` records (``{"answer", "answer_id", ...}``) or
    plain strings (then each gets a distinct ``answer_id``, as in the official files).
    Inputs are not modified.
    """
    if not gt_answers:
        raise ValueError("a question needs at least one ground-truth answer")
    records = [
        {"answer": _clean(a), "answer_id": i + 1} if isinstance(a, str) else {**a, "answer": _clean(a["answer"])}
        for i, a in enumerate(gt_answers)
    ]
    pred = _clean(prediction)
    if len({r["answer"] for r in records}) > 1:
        for record in records:
            record["answer"] = normalize_answer(record["answer"])
        pred = normalize_answer(pred)
    per_record = []
    for record in records:
        matches = sum(1 for other in records if other != record and other["answer"] == pred)
        per_record.append(min(1, float(matches) / 3))
    return float(sum(per_record)) / len(per_record)


def _percent(values: Sequence[float], ndigits: int) -> float:
    return round(100 * float(sum(values)) / len(values), ndigits)


def score_vqa(annotations: Sequence[Mapping[str, Any]], predictions: Mapping[Any, str], ndigits: int = 2) -> dict:
    """VQAv2 accuracy of `predictions` (question_id -> answer) over every annotated question.

    `annotations` are the official annotation records (``question_id``, ``answers``,
    ``question_type``, ``answer_type``). Ids are matched as strings, so 7 and "7" agree. A
    prediction for a question that is not annotated is an error (a ValueError naming the id);
    a question without a prediction scores 0 and is counted in ``missing``.

    Returns ``overall``, ``perAnswerType``, ``perQuestionType`` (percent), ``perQuestion``
    (question_id -> percent), and ``num_questions``, ``num_predictions``, ``missing``,
    ``coverage`` (fraction of questions with a prediction), ``missing_ids`` (first 20).
    """
    by_key = {str(k): v for k, v in predictions.items()}
    annotated = {str(a["question_id"]) for a in annotations}
    unknown = [k for k in by_key if k not in annotated]
    if unknown:
        raise EvalInputError(f"question_id {unknown[0]} has a prediction but is not in the annotations "
                         f"({len(unknown)} such ids)")
    if not annotations:
        raise EvalInputError("no annotated questions to score")
    per_question: dict[Any, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    accs: list[float] = []
    missing: list[Any] = []
    for ann in annotations:
        qid = ann["question_id"]
        pred = by_key.get(str(qid))
        if pred is None:
            missing.append(qid)
            acc = 0.0
        else:
            acc = question_accuracy(ann["answers"], pred)
        accs.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = round(100 * acc, ndigits)
    return {
        "overall": _percent(accs, ndigits),
        "perAnswerType": {k: _percent(v, ndigits) for k, v in by_atype.items()},
        "perQuestionType": {k: _percent(v, ndigits) for k, v in by_qtype.items()},
        "perQuestion": per_question,
        "num_questions": len(accs),
        "num_predictions": len(accs) - len(missing),
        "missing": len(missing),
        "coverage": (len(accs) - len(missing)) / len(accs),
        "missing_ids": missing[:20],
    }


# --- LLaVA's submission conversion (generation side, not scoring) ---------------------------

_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def evalai_answer(text: str) -> str:
    """LLaVA / lmms-eval's ``EvalAIAnswerProcessor``: how LLaVA turns a generated answer into the
    submitted one (``convert_vqav2_for_submission.py``).

    It differs from the scorer's normalisation: it first lower-cases, deletes ',' and '?',
    splits "'s" off, and its comma-between-digits test is a look-around pattern. Generation
    applies it to VQAv2 answers so that our files match what LLaVA submits; scoring never does.
    """
    item = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = _clean(item)
    comma_in_number = _EVALAI_COMMA_STRIP.search(item) is not None
    out = item
    for mark in PUNCTUATION:
        if (mark + " " in item or " " + mark in item) or comma_in_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)
    return process_digit_article(out)
