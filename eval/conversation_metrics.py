"""Scores of generated answers against the reference answer of held-out conversations (your own data).

The generated text is the last assistant turn of each test conversation (the earlier turns are its
context). Five scores, from maintained code where it exists; the first three are means over the answers
of a per-answer score, the last two are corpus statistics:

- ``exact_match``: 100 if the answer equals the reference after the official VQA normalisation
  (`eval.vqa_eval.normalize_answer`: punctuation, number words, articles, contractions), else 0; mean x100;
- ``token_f1``: SQuAD's token F1 of the normalised answers, mean x100;
- ``anls``: ANLS (DocVQA): 1 - normalised Levenshtein distance of the lower-cased, stripped texts,
  0 below the 0.5 similarity threshold, mean x100;
- ``bleu4``: pycocoevalcap's corpus ``Bleu_4`` (n-gram matches and lengths summed over all answers, then one
  BLEU; PTB-tokenised as for captions), x100;
- ``cider``: pycocoevalcap's corpus ``CIDEr`` (CIDEr-D: the mean of the per-answer CIDEr-D scores, document
  frequencies from all the references), raw (1.16 is "116" in papers).

Per answer (``per_sample``, and the samples file): exact_match, token_f1, anls, ``bleu4_sentence``
(pycocoevalcap's per-sentence BLEU-4, x100: its mean is NOT the corpus BLEU-4) and ``cider_sentence`` (that
answer's CIDEr-D: its mean is the corpus CIDEr). ``bleu_counts`` keeps each answer's n-gram counts, from which
the paired bootstrap recomputes the corpus BLEU-4 of resampled answers (`eval.bleu_corpus`).

The headline is a choice (`metric`); ``auto`` takes exact match for short answers (median reference
length <= 3 words) and CIDEr for sentences, and says which and why in the scores.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from typing import Any

from eval.errors import EvalInputError
from eval.vqa_eval import normalize_answer

METRICS = ("exact_match", "token_f1", "anls", "bleu4", "cider")
MEAN_METRICS = ("exact_match", "token_f1", "anls")  # means of per-answer scores; bleu4 and cider are corpus values
# the per-sample score a headline is bootstrapped on (bleu4: the corpus value is recomputed from bleu_counts)
PER_SAMPLE = {"exact_match": "exact_match", "token_f1": "token_f1", "anls": "anls", "bleu4": "bleu4_sentence",
              "cider": "cider_sentence"}
SHORT_ANSWER_WORDS = 3


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, reference: str, threshold: float = 0.5) -> float:
    pred, ref = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    if not pred and not ref:
        return 1.0
    similarity = 1.0 - levenshtein(pred, ref) / max(len(pred), len(ref))
    return similarity if similarity >= threshold else 0.0


def choose_headline(references: Mapping[Any, str], metric: str = "auto") -> tuple[str, str]:
    """(headline metric, why)."""
    if metric != "auto":
        if metric not in METRICS:
            raise EvalInputError(f"conversation metric {metric!r}: choose auto or one of {', '.join(METRICS)}")
        return metric, "given"
    words = statistics.median(len(r.split()) for r in references.values()) if references else 0
    if words <= SHORT_ANSWER_WORDS:
        return "exact_match", f"auto: the references' median length is {words:g} words (short answers)"
    return "cider", f"auto: the references' median length is {words:g} words (sentences)"


def score_conversations(references: Mapping[Any, str], predictions: Mapping[Any, str],
                        metric: str = "auto") -> dict[str, Any]:
    """Every metric overall (module docstring: means of per-answer scores, corpus BLEU-4 and CIDEr) and per
    sample; a missing prediction scores as an empty answer. ``per_sample`` holds each sample's scores and
    ``bleu_counts`` its BLEU n-gram counts, for the paired bootstrap."""
    from eval.bleu_corpus import item_counts
    from eval.caption_metrics import ptb_tokenize, score_tokenized

    preds = {str(k): v for k, v in predictions.items()}
    refs = {str(k): v for k, v in references.items()}
    unknown = [k for k in preds if k not in refs]
    if unknown:
        raise EvalInputError(f"id {unknown[0]!r} has a prediction but no reference answer ({len(unknown)} such ids)")
    if not refs:
        raise EvalInputError("no reference answers to score")
    headline, why = choose_headline(refs, metric)
    answers = {k: preds.get(k, "") for k in refs}
    tokens = ptb_tokenize({**{(0, k): [v] for k, v in refs.items()}, **{(1, k): [answers[k]] for k in refs}})
    gts, res = {k: tokens[(0, k)] for k in refs}, {k: tokens[(1, k)] for k in refs}
    corpus, coco = score_tokenized(gts, res, metrics=["Bleu_4", "CIDEr"])
    per_sample: dict[str, dict[str, float]] = {}
    for key, reference in refs.items():
        answer = answers[key]
        per_sample[key] = {
            "exact_match": 100.0 * (normalize_answer(answer) == normalize_answer(reference)),
            "token_f1": 100.0 * token_f1(answer, reference),
            "anls": 100.0 * anls(answer, reference),
            "bleu4_sentence": 100.0 * float(coco[key].get("Bleu_4", 0.0)),
            "cider_sentence": float(coco[key].get("CIDEr", 0.0)),
        }
    overall = {m: statistics.fmean(s[m] for s in per_sample.values()) for m in MEAN_METRICS}
    overall["bleu4"] = 100.0 * corpus["Bleu_4"]  # unrounded: pycocoevalcap's value x100, to the last bit
    overall["cider"] = corpus["CIDEr"]
    missing = sum(1 for k in refs if k not in preds)
    return {**{m: overall[m] for m in METRICS}, "headline": headline, "headline_value": overall[headline],
            "headline_reason": why, "num_samples": len(refs), "num_predictions": len(refs) - missing,
            "missing": missing, "coverage": (len(refs) - missing) / len(refs), "per_sample": per_sample,
            "bleu_counts": {k: item_counts(res[k][0], gts[k]) for k in refs}}
