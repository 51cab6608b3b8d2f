"""Long-context prompts, built one way for training and evaluation: other texts between the image and the instruction.

A long-context prompt's user text is `{text 1}\\n{text 2}\\n...{part of the next}\\n{instruction}` after the image:
whole filler texts (cycling through a pool), then words of the next one, up to a target length in tokens
(`fill_to`: binary search on the number of texts, then on the words; token counts are monotone in both).
`eval.long_context` scores captioning at fixed lengths with it; `LongContextMaker` turns a share of the caption
examples of a training stream into such examples (`data.long_context` in the config), so the adapter sees the
positions the evaluation asks about.

Training filler comes only from the stream itself: the captions of the examples it has already passed (a
bounded pool, never the example's own image), so it is always the training split's, never an evaluation
image's. The choices are drawn from the collator's own seeded generator, so a stream is deterministic per
(seed, rank, epoch) and a resumed run (which replays its stream) builds the same examples.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.prompts import CAPTION_PROMPT


def filler_text(examples: Sequence[str], tail: str, instruction: str) -> str:
    """The user text of a long-context prompt: whole examples, a partial one, the instruction, one per line."""
    return "".join(f"{e}\n" for e in examples) + (f"{tail}\n" if tail else "") + instruction


class _Lazy:
    """f(0), f(1), ... computed on demand, so bisect can binary-search it."""

    def __init__(self, fn: Callable[[int], int]) -> None:
        self.fn = fn

    def __getitem__(self, i: int) -> int:
        return self.fn(i)

    def __len__(self) -> int:  # pragma: no cover - bisect is always given hi
        raise TypeError


def fill_to(measure: Callable[[str], int], pool: Sequence[str], target: int,
            instruction: str = CAPTION_PROMPT) -> tuple[str, int, float]:
    """(user text, its measured tokens, examples used (a fraction for the partial one)) of the longest filled
    prompt whose `measure` (tokens of the whole prompt, image included) is <= `target`.

    Raises:
        ValueError: the prompt without filler is already longer than `target`, or the pool is empty.
    """
    base = measure(filler_text([], "", instruction))
    if base > target:
        raise ValueError(f"the prompt without filler already has {base} tokens, more than the target {target}")
    if not pool:
        raise ValueError("the filler pool is empty: give reference captions of images other than the evaluated ones")

    def examples(k: int) -> list[str]:
        return [pool[i % len(pool)] for i in range(k)]

    hi = target - base + 1  # each whole example adds at least one token
    k = bisect.bisect_right(_Lazy(lambda n: measure(filler_text(examples(n), "", instruction))), target, 0, hi) - 1
    words = pool[k % len(pool)].split()
    tails = _Lazy(lambda w: measure(filler_text(examples(k), " ".join(words[:w]), instruction)))
    w = max(bisect.bisect_right(tails, target, 0, len(words)) - 1 if words else 0, 0)
    text = filler_text(examples(k), " ".join(words[:w]), instruction)
    return text, measure(text), k + (w / len(words) if words else 0.0)


@dataclass
class LongContextMaker:
    """Turns a share of a training stream's caption examples into long-context ones.

    Args:
        share: probability that a caption example becomes a long-context one (0: none, no draw at all).
        min_tokens / max_tokens: the target length of the whole row (prompt with its image + answer) is drawn
            uniformly from [min_tokens, max_tokens] (max capped by the collator's max_length).
        pool_size: captions of earlier examples kept as filler (first in, first out).
        seed: seeds the draws (a generator of its own: the caption choices of the stream are not moved).
        per: "example" draws for each caption example; "batch" draws once per batch (`begin_batch`): with
            probability `share` every caption example of the batch becomes long, all at one target length, so
            only that share of the batches is padded to a long row (the same expected number of long
            examples as "example", at a fraction of the padded tokens: group-by-length for this option).
    """

    share: float = 0.0
    min_tokens: int = 0
    max_tokens: int = 0
    pool_size: int = 256
    seed: int = 0
    per: str = "example"
    made: int = 0         # long-context examples built
    no_pool: int = 0      # drawn, but the pool had no other image's caption yet (kept short)
    _pool: deque = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _batch: float | None = field(init=False, repr=False, default=None)
    _worker: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.per not in ("example", "batch"):
            raise ValueError(f"per must be 'example' or 'batch', got {self.per!r}")
        self._pool = deque(maxlen=self.pool_size)
        self._rng = random.Random(f"long-context/{self.seed}")

    def _own_worker_draws(self) -> None:
        """In a DataLoader worker, draw from a generator of this worker's own (each worker gets a copy of the
        collator: with one seed they would all draw the same lengths); in the main process nothing changes."""
        if self._worker is None:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            self._worker = -1 if info is None else info.id
            if info is not None:
                self._rng = random.Random(f"long-context/{self.seed}/worker{info.id}")

    def begin_batch(self) -> None:
        """Draw a batch's choice (per="batch"): long or not, and where in [min, max] its rows land (a fraction,
        turned into tokens per example, since the bare prompt's length can differ)."""
        self._own_worker_draws()
        if self.per == "batch" and self.share > 0:
            long = self._rng.random() < self.share
            self._batch = self._rng.random() if long else None

    def observe(self, sample: dict[str, Any]) -> None:
        """Keep the captions of a caption example as filler for later ones."""
        if sample.get("task") == "caption":
            key = str(sample.get("image_id", sample.get("__key__", "")))
            for caption in sample.get("captions") or ([sample["caption"]] if sample.get("caption") else []):
                if caption and caption.strip():
                    self._pool.append((key, caption.strip()))

    def prompt(self, sample: dict[str, Any], measure: Callable[[str], int], answer_tokens: int,
               max_length: int) -> str | None:
        """The long-context user text for `sample` (a caption example), or None when it stays as it is."""
        self._own_worker_draws()
        if self.share <= 0 or sample.get("task") != "caption" or sample.get("turns"):
            return None
        if self.per == "example" and self._rng.random() >= self.share:
            return None
        if self.per == "batch" and self._batch is None:
            return None
        key = str(sample.get("image_id", sample.get("__key__", "")))
        others = [c for k, c in self._pool if k != key]
        bare = measure(filler_text([], "", CAPTION_PROMPT)) + answer_tokens
        top = min(self.max_tokens or max_length, max_length)
        if top <= bare:  # no room for any filler under max_length
            return None
        low = min(max(self.min_tokens, bare), top)
        if self.per == "batch":
            target = low + round(self._batch * (top - low)) - answer_tokens
        else:
            target = self._rng.randint(low, top) - answer_tokens
        if not others:
            self.no_pool += 1
            return None
        self._rng.shuffle(others)
        text, _, _ = fill_to(measure, others, target)
        self.made += 1
        return text


# --- a neutral filler: words of the world, no scene described -------------------------------------------------

NEUTRAL_FILE = Path(__file__).with_name("neutral_filler.txt")


def neutral_lines(vocabulary: Sequence[str], excluded: Sequence[str], lines: int = 200, seed: int = 0) -> list[str]:
    """Lines of 6-12 words drawn (seeded) from `vocabulary` minus `excluded` (the world's colours, shapes, counts
    and background: what a caption says) and punctuation: text the tokenizer knows that describes no image, so
    that a long-context collapse from length can be told apart from one from copying other images' captions."""
    banned = {w.lower() for w in excluded}
    words = sorted({w for w in vocabulary if w.isalpha() and w.lower() not in banned})
    rng = random.Random(f"neutral/{seed}")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) + "." for _ in range(lines)]


def shapes_neutral_lines() -> list[str]:
    """`neutral_lines` of the shapes world (what `data/neutral_filler.txt` holds)."""
    from data.shapes import world_vocabulary
    from data.shapes_scene import BACKGROUND_NAME, COLOURS, SHAPES

    shapes = [*SHAPES, *(f"{s}s" for s in SHAPES), "crosses", "shape", "shapes", "object", "objects"]
    counts = ["zero", "one", "two", "three", "four", "single", "both"]
    return neutral_lines(world_vocabulary(), [*COLOURS, *shapes, *counts, BACKGROUND_NAME])


def neutral_filler() -> list[str]:
    """The shipped neutral filler (`--distractor neutral`, `eval.long_context_filler: neutral`)."""
    return [line for line in NEUTRAL_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
