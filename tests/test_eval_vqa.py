"""VQAv2 accuracy: hand-computed cases of the official vqaEval.py rules, files, CLI."""

from __future__ import annotations

import copy
import json

import pytest

from eval.errors import EvalInputError
from eval.scoring import score_vqa_files
from eval.vqa_eval import (
    evalai_answer,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    score_vqa,
)


def answers(*texts: str) -> list[dict]:
    """Official-style answer records with distinct answer_ids."""
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def ten(match: str, k: int, filler: str = "other") -> list[dict]:
    return answers(*([match] * k + [f"{filler}{i}" for i in range(10 - k)]))


# --- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("black/white", "black white"),      # no mark next to a space: replaced by a space
    ("black / white", "black  white"),   # " /" present: deleted
    ("1,000", "1000"),                   # comma between digits: every mark deleted
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("yes.", "yes"),                     # period not followed by a digit: deleted
    ("3.14", "3.14"),                    # period before a digit: kept
    ("e.g.", "eg"),
    ("(left)", " left "),
    ("hi!?", "hi  "),
    ("don't", "don't"),                  # apostrophes are not in the official list
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_stops_after_32_like_the_official_call():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
    assert process_punctuation("a." * 40) == "a" * 32 + "a." * 8


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),
    ("the dog", "dog"), ("A  Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("Im", "im"),  # capitalised keys of the official map never match after lower()
    ("somebody'd", "somebodyd"),      # the official map's own oddity
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer_chains_both_steps():
    assert normalize_answer("The two dogs!") == "2 dogs"


# --- one question ---------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_over_matching_annotators(k, expected):
    # k matching records: each sees k-1 matches, each of the others sees k; min(n/3, 1), averaged.
    # k=1: (1*0 + 9*(1/3))/10 = 0.3; k=2: (2/3*2 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9.
    assert question_accuracy(ten("cat", k), "cat") == pytest.approx(expected)


def test_number_words_only_normalised_when_annotators_disagree():
    assert question_accuracy(answers(*["2"] * 9, "3"), "two") == 1.0
    assert question_accuracy(answers(*["two"] * 4, *["3"] * 6), "2") == 1.0
    # unanimous: no normalisation at all, so "two" is not "2"
    assert question_accuracy(answers(*["2"] * 10), "two") == 0.0


def test_articles_and_punctuation_in_the_prediction():
    gt = answers(*["dog"] * 5, *["cat"] * 5)
    assert question_accuracy(gt, "the dog") == 1.0
    assert question_accuracy(gt, "A dog.") == 1.0
    assert question_accuracy(gt, "dogs") == 0.0


def test_unanimous_answers_compare_raw_text():
    assert question_accuracy(answers(*["yes"] * 10), "yes") == 1.0
    assert question_accuracy(answers(*["yes"] * 10), "Yes") == 0.0      # case matters when unanimous
    assert question_accuracy(answers(*["yes"] * 10), "yes!") == 0.0
    assert question_accuracy(answers(*["Yes"] * 10), "yes") == 0.0
    assert question_accuracy(answers(*["yes"] * 10), " yes\n") == 1.0   # whitespace is always cleaned


def test_answers_differing_only_in_case_are_not_unanimous():
    gt = answers(*["Yes"] * 5, *["yes"] * 5)
    assert question_accuracy(gt, "YES") == 1.0
    assert question_accuracy(gt, "no") == 0.0


def test_contractions_and_commas_in_numbers():
    assert question_accuracy(answers(*["don't"] * 4, *["no"] * 6), "dont") == 1.0
    assert question_accuracy(answers(*["1000"] * 3, *["100"] * 7), "1,000") == pytest.approx(0.9)


def test_identical_records_are_left_out_together_as_in_the_official_dict_comparison():
    cats, dogs = [{"answer": "cat"}] * 3, [{"answer": "dog"}] * 7
    # No answer_id: a cat record's "others" drop all three equal cat dicts -> 0; a dog's see 3 cats -> 1.
    assert question_accuracy(cats + dogs, "cat") == pytest.approx(0.7)
    assert question_accuracy(answers(*["cat"] * 3, *["dog"] * 7), "cat") == pytest.approx(0.9)


def test_plain_string_answers_are_accepted():
    assert question_accuracy(["cat", "cat", "dog"], "cat") == pytest.approx((2 * 1 / 3 + 2 / 3) / 3)


def test_evalai_answer_matches_llava_submission_processing():
    assert evalai_answer("Yes.") == "yes"
    assert evalai_answer("The Two dogs?") == "2 dogs"
    assert evalai_answer("1,000") == "1000"
    assert evalai_answer("it's red") == "it 's red"


# --- many questions -------------------------------------------------------------------------


def annotation(qid, gt, qtype="what color", atype="other"):
    return {"question_id": qid, "answers": gt, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": gt[0]["answer"], "image_id": 1}


@pytest.fixture()
def vqa_annotations():
    return [
        annotation(1, ten("red", 3), "what color", "other"),      # 0.9 for "red"
        annotation(2, answers(*["yes"] * 10), "is the", "yes/no"),  # 1.0 for "yes"
        annotation(3, ten("2", 1), "how many", "number"),          # 0.3 for "two"
        annotation(4, answers(*["no"] * 10), "is the", "yes/no"),  # missing -> 0
    ]


def test_score_vqa_overall_types_rounding_and_missing(vqa_annotations):
    before = copy.deepcopy(vqa_annotations)
    preds = {1: "red", "2": "yes", 3: "two"}
    preds_before = dict(preds)
    result = score_vqa(vqa_annotations, preds)
    assert vqa_annotations == before and preds == preds_before  # nothing mutated
    assert result["overall"] == 55.0                             # (0.9 + 1 + 0.3 + 0) / 4
    assert result["perAnswerType"] == {"other": 90.0, "yes/no": 50.0, "number": 30.0}
    assert result["perQuestionType"] == {"what color": 90.0, "is the": 50.0, "how many": 30.0}
    assert result["perQuestion"] == {1: 90.0, 2: 100.0, 3: 30.0, 4: 0.0}
    assert (result["missing"], result["num_predictions"], result["coverage"]) == (1, 3, 0.75)
    assert result["missing_ids"] == [4]


def test_score_vqa_rounds_like_the_official_code():
    ann = [annotation(i, ten("a1", 1)) for i in range(3)]
    result = score_vqa(ann, {0: "a1", 1: "a1", 2: "zzz"})
    assert result["overall"] == round(100 * (0.3 + 0.3 + 0) / 3, 2) == 20.0
    result = score_vqa(ann[:1] + [annotation(9, ten("b", 2))], {0: "a1", 9: "x"})
    assert result["overall"] == 15.0


def test_score_vqa_rejects_unknown_question_ids(vqa_annotations):
    with pytest.raises(EvalInputError, match="question_id 99"):
        score_vqa(vqa_annotations, {99: "red"})


# --- files and CLI --------------------------------------------------------------------------


@pytest.fixture()
def vqa_files(tmp_path, vqa_annotations):
    questions = {"questions": [{"question_id": a["question_id"], "image_id": 1, "question": "q?"}
                               for a in vqa_annotations]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": vqa_annotations}))
    preds = [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "yes"},
             {"question_id": 3, "answer": "two"}, {"question_id": 4, "answer": "no"}]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return tmp_path


def test_score_vqa_files_json_and_jsonl_agree(vqa_files):
    a = score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", vqa_files / "p.json")
    b = score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", vqa_files / "p.jsonl")
    assert a["overall"] == b["overall"] == 80.0 and a["missing"] == 0


def test_cli_score_vqa_prints_json(vqa_files, capsys):
    from pipeline.cli import main

    code = main(["score", "vqa", "--questions", str(vqa_files / "q.json"), "--annotations",
                 str(vqa_files / "a.json"), "--predictions", str(vqa_files / "p.json")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == 80.0
    assert out["perAnswerType"]["yes/no"] == 100.0
    assert out["perQuestion"]["3"] == 30.0


@pytest.mark.parametrize("content, message", [
    ("[{\"question_id\": 1, \"answer\": \"red\"", "not valid JSON"),
    ("{\"question_id\": 1, \"answer\": \"red\"}\n{\"question_id\": 2}\n", "question_id=2.*'answer'"),
    ("[{\"question_id\": 1, \"answer\": null}]", "question_id=1.*must be a string"),
    ("[{\"answer\": \"red\"}]", "record 0 has no 'question_id'"),
    ("[{\"question_id\": 77, \"answer\": \"red\"}]", "question_id 77 is not in"),
    ("[{\"question_id\": 1, \"answer\": \"red\"}, {\"question_id\": 1, \"answer\": \"blue\"}]", "twice"),
    ("", "empty"),
])
def test_bad_prediction_files_name_the_problem(vqa_files, content, message):
    bad = vqa_files / "bad.json"
    bad.write_text(content)
    with pytest.raises(EvalInputError, match=message) as info:
        score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", bad)
    assert str(bad) in str(info.value) or message == "empty"


def test_bad_annotation_names_file_index_and_field(vqa_files, vqa_annotations):
    broken = copy.deepcopy(vqa_annotations)
    del broken[2]["answer_type"]
    (vqa_files / "a.json").write_text(json.dumps({"annotations": broken}))
    with pytest.raises(EvalInputError, match=r"annotations\[2\] \(question_id 3\) has no 'answer_type'"):
        score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", vqa_files / "p.json")


def test_missing_file_is_reported(vqa_files):
    with pytest.raises(EvalInputError, match="does not exist"):
        score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", vqa_files / "nope.json")


def test_identical_duplicate_predictions_are_tolerated_and_counted(vqa_files):
    preds = json.loads((vqa_files / "p.json").read_text())
    (vqa_files / "dup.json").write_text(json.dumps(preds + preds[:2]))
    result = score_vqa_files(vqa_files / "q.json", vqa_files / "a.json", vqa_files / "dup.json")
    assert result["duplicates"] == 2 and result["overall"] == 80.0


def test_cli_bad_predictions_name_the_id(vqa_files, capsys):
    from pipeline.cli import main

    bad = vqa_files / "bad.json"
    bad.write_text(json.dumps([{"question_id": 77, "answer": "red"}]))
    argv = ["score", "vqa", "--questions", str(vqa_files / "q.json"), "--annotations", str(vqa_files / "a.json"),
            "--predictions", str(bad)]
    try:  # the CLI may print input errors itself (exit 2) or let EvalInputError through
        code = main(argv)
    except EvalInputError as err:
        message = str(err)
    else:
        assert code == 2
        message = capsys.readouterr().err
    assert "question_id 77" in message and str(bad) in message
