"""A data card of your conversation data: what each split holds, before hours of training.

Two parts:
- counted at prepare time, model-independent (`SplitCard`, in prepare_summary.json): records, distinct images (by
  content), assistant turns, answers' length in words, images found in more than one split;
- measured for a model (`token_card`, by `structlora prepare conversations --config` and the train stage): the
  samples' length in that model's tokens with the images' tokens counted (the training collator's own measure),
  how many exceed `data.max_length` and what the collator does with them (split between turns, or dropped), the
  answers' length in tokens, and suggested `data.max_length` and `eval.max_new_tokens`.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 95)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (the smallest value with at least q% of the values at or below it)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def distribution(values: Sequence[float]) -> dict[str, float]:
    """{p50, p95, max, mean} of `values` (zeros when empty)."""
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["max"] = float(max(values)) if len(values) else 0.0
    out["mean"] = round(sum(values) / len(values), 2) if len(values) else 0.0
    return out


@dataclass
class SplitCard:
    """The model-independent counts of one split, gathered while its records are queued for shards."""

    images: set[int] = field(default_factory=set)
    turns: int = 0
    records: int = 0
    answer_words: array = field(default_factory=lambda: array("I"))

    def add(self, conv: Any, image_digests: Iterable[int]) -> None:
        self.records += 1
        self.images.update(image_digests)
        for role, content in conv.messages:
            if role == "assistant":
                self.turns += 1
                self.answer_words.append(len(content.split()))

    def summary(self, lost: int = 0) -> dict[str, Any]:
        out = {"images": len(self.images), "assistant_turns": self.turns,
               "answer_words": distribution(self.answer_words)}
        if lost:
            out["records_lost_to_removed_images"] = lost
        return out

    @staticmethod
    def shared_images(cards: Sequence[SplitCard]) -> int:
        """Images (by content) that records of more than one split hold: 0 when splitting by image."""
        seen: set[int] = set()
        shared: set[int] = set()
        for card in cards:
            shared |= card.images & seen
            seen |= card.images
        return len(shared)
