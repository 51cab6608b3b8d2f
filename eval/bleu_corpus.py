"""Corpus BLEU-4 from per-item n-gram counts, exactly as pycocoevalcap's BleuScorer computes it.

pycocoevalcap's ``Bleu(4).compute_score`` sums, over the items, each item's clipped n-gram matches and
n-gram totals (n = 1..4), its hypothesis length and its closest reference length (``option="closest"``),
then takes the geometric mean of the four precisions times the brevity penalty. `item_counts` gives one
item's ten numbers (computed by pycocoevalcap's own ``cook_refs`` / ``cook_test``) and `corpus_bleu4`
recomputes the corpus value from any selection of items, so that a bootstrap can resample items and
recompute the corpus statistic rather than average sentence BLEUs (which is a different, smaller number).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N = 4
# one item's counts: [hypothesis length, closest reference length, guess_1..4, correct_1..4]
FIELDS = ("testlen", "reflen", *(f"guess_{k}" for k in range(1, N + 1)), *(f"correct_{k}" for k in range(1, N + 1)))
_SMALL, _TINY = 1e-9, 1e-15  # pycocoevalcap's constants


def item_counts(hypothesis: str, references: Sequence[str]) -> list[int]:
    """The ten counts of one (tokenised) hypothesis against its (tokenised) references."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    cooked = cook_test(hypothesis, cook_refs(list(references), n=N), eff="closest", n=N)
    return [int(cooked["testlen"]), int(cooked["reflen"]), *map(int, cooked["guess"]), *map(int, cooked["correct"])]


def corpus_bleu4(counts: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (0..1) of count sums: `counts` is (..., 10) summed over items (one row per corpus)."""
    counts = np.asarray(counts, dtype=np.float64)
    testlen, reflen = counts[..., 0], counts[..., 1]
    guess, correct = counts[..., 2:2 + N], counts[..., 2 + N:2 + 2 * N]
    bleu = np.ones_like(testlen)
    for k in range(N):  # pycocoevalcap's order of operations, so that the values agree to the last bit
        bleu = bleu * ((correct[..., k] + _TINY) / (guess[..., k] + _SMALL))
    bleu = bleu ** (1.0 / N)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    return np.where(ratio < 1, bleu * np.exp(1 - 1 / np.maximum(ratio, _TINY)), bleu)


def corpus_bleu4_of(items: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU-4 (0..1) of a list of items' counts."""
    if not len(items):
        return 0.0
    return float(corpus_bleu4(np.asarray(items, dtype=np.float64).sum(axis=0)))
