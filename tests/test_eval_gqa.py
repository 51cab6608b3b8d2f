"""GQA accuracy: LLaVA conversion, balanced questions, official binary/open split, files."""

from __future__ import annotations

import copy
import json

import pytest

from eval.errors import EvalInputError
from eval.gqa_eval import is_binary, llava_gqa_answer, score_gqa
from eval.scoring import score_gqa_files


def q(answer, structural="query", semantic="attr", balanced=True):
    return {"imageId": "n1", "question": "?", "answer": answer, "fullAnswer": answer + ".",
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"}, "isBalanced": balanced}


@pytest.fixture()
def questions():
    return {
        "1": q("red"),                                   # open
        "2": q("yes", "verify", "rel"),                  # binary
        "3": q("left", "choose", "rel"),                 # binary (choose counts as binary, as in eval.py)
        "4": q("no", "logical", "obj"),                  # binary
        "5": q("blue", balanced=False),                  # not scored
        "6": q("cat"),                                   # open, missing prediction
    }


def test_llava_conversion():
    assert llava_gqa_answer("Yes.") == "yes"
    assert llava_gqa_answer("Left...") == "left"
    assert llava_gqa_answer(" red") == " red"  # LLaVA strips nothing else (its generator already did)


def test_binary_is_everything_but_query(questions):
    assert [is_binary(questions[k]) for k in "123456"] == [False, True, True, True, False, False]


def test_score_gqa_hand_computed(questions):
    before = copy.deepcopy(questions)
    preds = {"1": "Red.", "2": "yes", 3: "right", "4": "No", "5": "blue"}
    result = score_gqa(questions, preds)
    assert questions == before
    # balanced: 1,2,3,4,6. converted: 1 ok, 2 ok, 3 wrong, 4 ok, 6 missing -> 3/5
    assert result["accuracy"] == 60.0
    # raw: only "yes" matches exactly -> 1/5
    assert result["accuracy_raw"] == 20.0
    assert (result["binary"], result["open"]) == (round(200 / 3, 2), 50.0)
    assert (result["binary_raw"], result["open_raw"]) == (round(100 / 3, 2), 0.0)
    assert (result["num_binary"], result["num_open"], result["num_questions"]) == (3, 2, 5)
    assert result["perStructuralType"] == {"query": 50.0, "verify": 100.0, "choose": 0.0, "logical": 100.0}
    assert result["perSemanticType"] == {"attr": 50.0, "rel": 50.0, "obj": 100.0}
    assert result["perQuestion"] == {"1": 1, "2": 1, "3": 0, "4": 1, "6": 0}
    assert (result["missing"], result["missing_ids"], result["coverage"]) == (1, ["6"], 0.8)
    assert result["ignored_unbalanced"] == 1


def test_unknown_question_id_is_an_error(questions):
    with pytest.raises(EvalInputError, match="questionId 42"):
        score_gqa(questions, {"42": "red"})


def test_question_without_types_is_named(questions):
    del questions["2"]["types"]
    with pytest.raises(EvalInputError, match="question 2 has no 'types.structural'"):
        score_gqa(questions, {})


@pytest.mark.parametrize("records", [
    [{"questionId": "1", "prediction": "red"}, {"questionId": "2", "prediction": "yes"}],
    [{"question_id": "1", "answer": "red"}, {"question_id": 2, "answer": "yes"}],
    [{"question_id": "1", "text": "Red."}, {"questionId": "2", "prediction": "yes."}],  # LLaVA's raw answers file
])
def test_files_accept_both_key_spellings_json_and_jsonl(tmp_path, questions, records):
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "p.json").write_text(json.dumps(records))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("p.json", "p.jsonl"):
        result = score_gqa_files(tmp_path / "questions.json", tmp_path / name)
        assert result["accuracy"] == 40.0 and result["missing"] == 3


def test_file_errors_name_the_file(tmp_path, questions):
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"questionId": "99", "prediction": "x"}]))
    with pytest.raises(EvalInputError, match=f"{bad}.*questionId '99' is not in"):
        score_gqa_files(tmp_path / "questions.json", bad)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(EvalInputError, match="keyed by question id"):
        score_gqa_files(tmp_path / "list.json", bad)


def test_cli_score_gqa(tmp_path, questions, capsys):
    from pipeline.cli import main

    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "p.json").write_text(json.dumps([{"questionId": k, "prediction": v["answer"]}
                                                 for k, v in questions.items()]))
    assert main(["score", "gqa", "--questions", str(tmp_path / "questions.json"),
                 "--predictions", str(tmp_path / "p.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == out["accuracy_raw"] == 100.0
