"""Caption metrics: hand-computed values and equality with pycocoevalcap's scorers called directly."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from eval.caption_metrics import score_captions
from eval.errors import EvalInputError, JavaNotFoundError
from eval.scoring import score_caption_files

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs a Java runtime")

FAST = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]  # METEOR starts a slow JVM

REFERENCES = {
    1: ["A red square on the left.", "a red square next to a blue circle", "The red square is left of the circle."],
    2: ["two green triangles", "Two green triangles, side by side.", "a pair of green triangles"],
    3: ["A small yellow star.", "a yellow star in the middle", "one small star, yellow"],
    4: ["a blue circle above a red square", "Blue circle over a red square."],
}
PREDICTIONS = {1: "a red square left of a blue circle.", 2: "Two green triangles.", 3: "a big blue star", 4: "a circle"}


def test_hand_computed_cider_bleu_rouge():
    # Two images, identical candidate and reference: tf-idf weight log(2) for every n-gram, cosine 1
    # for unigrams and bigrams, no 3/4-grams -> mean over n = 0.5, times 10 -> CIDEr 5.0 each.
    result = score_captions({1: ["a b"], 2: ["c d"]}, {1: "a b", 2: "c d"}, metrics=["CIDEr"])
    assert result["metrics"]["CIDEr"] == pytest.approx(5.0)
    assert result["per_image"][1]["CIDEr"] == pytest.approx(5.0)
    # "a dog runs" vs "a dog runs fast": BLEU-1 = 1 * exp(1 - 4/3); ROUGE-L with P=1, R=3/4, beta=1.2.
    result = score_captions({1: ["A dog runs fast."], 2: ["x y"]}, {1: "a dog runs", 2: "x y"}, metrics=FAST)
    assert result["per_image"][1]["Bleu_1"] == pytest.approx(0.716531310, rel=1e-6)
    assert result["per_image"][1]["ROUGE_L"] == pytest.approx((1 + 1.44) * 0.75 / (0.75 + 1.44))


def test_equal_to_pycocoevalcap_scorers_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs_before, preds_before = copy.deepcopy(REFERENCES), copy.deepcopy(PREDICTIONS)
    ours = score_captions(REFERENCES, PREDICTIONS, metrics=FAST)
    assert (REFERENCES, PREDICTIONS) == (refs_before, preds_before)

    # What COCOEvalCap.evaluate does: two tokenizer runs, then each scorer.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    cider, cider_per = Cider().compute_score(gts, res)
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    assert ours["metrics"]["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert ours["metrics"]["ROUGE_L"] == pytest.approx(rouge, abs=1e-12)
    for n in range(4):
        assert ours["metrics"][f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)
    for i, image_id in enumerate(gts):
        assert ours["per_image"][image_id]["CIDEr"] == pytest.approx(cider_per[i], abs=1e-12)
        assert ours["per_image"][image_id]["ROUGE_L"] == pytest.approx(rouge_per[i], abs=1e-12)
        assert ours["per_image"][image_id]["Bleu_4"] == pytest.approx(bleu_per[3][i], abs=1e-12)
    assert ours["missing"] == 0 and ours["coverage"] == 1.0


def test_missing_predictions_score_as_empty_captions():
    preds = {k: v for k, v in PREDICTIONS.items() if k != 3}
    result = score_captions(REFERENCES, preds, metrics=["CIDEr", "ROUGE_L"])
    assert result["missing"] == 1 and result["missing_ids"] == [3] and result["coverage"] == 0.75
    assert result["per_image"][3] == {"CIDEr": 0.0, "ROUGE_L": 0.0}
    full = score_captions(REFERENCES, {**preds, 3: ""}, metrics=["CIDEr", "ROUGE_L"])
    assert result["metrics"] == full["metrics"]


def test_line_breaks_inside_a_caption_do_not_shift_images():
    preds = {**PREDICTIONS, 1: "a red square\rleft of a blue circle.", 2: "Two green\u2028triangles."}
    a = score_captions(REFERENCES, preds, metrics=["CIDEr"])
    b = score_captions(REFERENCES, {**PREDICTIONS, 1: "a red square left of a blue circle."}, metrics=["CIDEr"])
    assert a["per_image"] == b["per_image"]


def test_unknown_image_and_unknown_metric():
    with pytest.raises(EvalInputError, match="image_id 9"):
        score_captions(REFERENCES, {9: "x"}, metrics=["CIDEr"])
    with pytest.raises(ValueError, match="SPICE"):
        score_captions(REFERENCES, PREDICTIONS, metrics=["SPICE"])


def test_java_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="Java runtime"):
        score_captions(REFERENCES, PREDICTIONS, metrics=["CIDEr"])


def _coco(tmp_path):
    anns = [{"id": i, "image_id": image_id, "caption": c}
            for i, (image_id, c) in enumerate((k, c) for k, caps in REFERENCES.items() for c in caps)]
    refs = {"images": [{"id": k} for k in REFERENCES], "annotations": anns}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "preds.json").write_text(json.dumps([{"image_id": k, "caption": v} for k, v in PREDICTIONS.items()]))
    return tmp_path / "refs.json", tmp_path / "preds.json"


def test_files_end_to_end(tmp_path):
    refs, preds = _coco(tmp_path)
    result = score_caption_files(refs, preds, metrics=FAST)
    assert result["metrics"] == score_captions(REFERENCES, PREDICTIONS, FAST)["metrics"]
    assert result["num_images"] == 4 and result["duplicates"] == 0


@pytest.mark.slow
def test_files_end_to_end_all_metrics_with_meteor(tmp_path):
    refs, preds = _coco(tmp_path)
    result = score_caption_files(refs, preds)
    assert set(result["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    meteor, meteor_per = Meteor().compute_score(gts, res)
    assert 0.0 < result["metrics"]["METEOR"] < 1.0
    assert result["metrics"]["METEOR"] == pytest.approx(meteor, abs=1e-12)
    assert [result["per_image"][k]["METEOR"] for k in gts] == pytest.approx(meteor_per, abs=1e-12)


def test_file_errors(tmp_path):
    refs, _ = _coco(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"image_id": 2}]))
    with pytest.raises(EvalInputError, match=r"record 1 \(image_id=2\) has no 'caption'"):
        score_caption_files(refs, bad)
    bad.write_text(json.dumps([{"image_id": 77, "caption": "x"}]))
    with pytest.raises(EvalInputError, match="image_id 77 is not in"):
        score_caption_files(refs, bad)
    broken = tmp_path / "broken_refs.json"
    broken.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": 5}]}))
    with pytest.raises(EvalInputError, match=r"annotations\[0\]: 'caption' must be str"):
        score_caption_files(broken, bad)


@pytest.mark.slow
def test_scoring_5000_images_with_5_references_takes_under_a_minute():
    import random
    import time

    rng = random.Random(0)
    words = ("a the dog cat man woman red blue green small large sits runs on in near table street car bus "
             "person with of and two three").split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(7, 14))) + "."

    refs = {i: [sentence() for _ in range(5)] for i in range(5000)}
    preds = {i: sentence() for i in range(5000)}
    start = time.perf_counter()
    result = score_captions(refs, preds)
    elapsed = time.perf_counter() - start
    print(f"\ncaption scoring, 5000 images x 5 references, all metrics: {elapsed:.1f} s")
    assert result["num_images"] == 5000 and elapsed < 60.0
