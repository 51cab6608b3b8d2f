"""How many new tokens an answer may take, measured on the training split's reference answers.

`eval.max_new_tokens: {conversations: auto}` asks for this: every assistant turn of the training
conversations (the answers the model learns to write) is tokenized by the model's own tokenizer, one token
is added for the end-of-turn token that closes it, and the budget is a high percentile of those lengths
plus a margin, capped:

    budget = min(cap, p + max(margin_tokens, ceil(margin_fraction * p)))     p = the 99th percentile

`budget_from_lengths` is the pure rule (lengths -> budget and the numbers it came from, for a report or a
data card); `assistant_answers` reads a prepared split's answers (the JSON members of its shards, no image
decoded); `measure_budget` is the two with a tokenizer in between.
"""

from __future__ import annotations

import json
import math
import statistics
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from data.errors import DataError

PERCENTILE = 99.0
MARGIN_TOKENS = 8
MARGIN_FRACTION = 0.1
CAP = 1024


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q% of the values at or below it (an observed
    value, never interpolated); 0 without values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def budget_from_lengths(lengths: Iterable[int], percentile: float = PERCENTILE, margin_tokens: int = MARGIN_TOKENS,
                        margin_fraction: float = MARGIN_FRACTION, cap: int = CAP) -> tuple[int, dict[str, Any]]:
    """(max_new_tokens, stats) of answers `lengths` tokens long (end-of-turn token included).

    The percentile is the nearest-rank one (an observed length, never interpolated). `stats` holds every
    number the budget came from: answers, percentile, percentile_tokens, margin, cap, capped, longest,
    median, longer_than_budget (answers that would not fit), max_new_tokens."""
    values = sorted(int(n) for n in lengths)
    if not values:
        raise ValueError("no answers to measure a budget from")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if cap < 1 or margin_tokens < 0 or margin_fraction < 0:
        raise ValueError(f"cap must be >= 1 and the margins >= 0, got cap={cap}, margin_tokens={margin_tokens}, "
                         f"margin_fraction={margin_fraction}")
    at = int(nearest_rank(values, percentile))
    margin = max(int(margin_tokens), math.ceil(margin_fraction * at))
    budget = max(1, min(int(cap), at + margin))
    return budget, {"max_new_tokens": budget, "answers": len(values), "percentile": percentile,
                    "percentile_tokens": at, "margin": margin, "cap": int(cap), "capped": at + margin > cap,
                    "longest": values[-1], "median": statistics.median(values),
                    "longer_than_budget": sum(1 for n in values if n > budget)}


def describe_budget(stats: dict[str, Any]) -> str:
    """One line: 'auto = 41 tokens: p99 of 1,200 training answers is 33 tokens (end-of-turn included), + 8 margin'."""
    text = (f"auto = {stats['max_new_tokens']} tokens: p{stats['percentile']:g} of {stats['answers']:,} training "
            f"answers is {stats['percentile_tokens']} tokens (end-of-turn included), + {stats['margin']} margin")
    if stats.get("capped"):
        text += f", capped at {stats['cap']}"
    if stats.get("longer_than_budget"):
        text += f"; {stats['longer_than_budget']} training answers are longer (the longest: {stats['longest']})"
    return text


def answer_token_lengths(tokenizer: Any, answers: Sequence[str]) -> list[int]:
    """Tokens of each answer in `tokenizer`'s own vocabulary (a processor's tokenizer is taken), plus one for
    the end-of-turn token that closes the answer (generation must reach it within the budget)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not answers:
        return []
    ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [len(row) + 1 for row in ids]


def assistant_answers(split_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """(every assistant turn of the conversations in a prepared split, where they came from).

    Reads the JSON member of each sample in the split's shards (images are not read or decoded); a shard
    that cannot be read is left out and counted."""
    from data.shards import ShardSource

    split_dir = Path(split_dir)
    if not (split_dir / "manifest.json").is_file():
        raise DataError(f"{split_dir}: no prepared conversations split here (no manifest.json) to measure "
                        "answer lengths from")
    source = ShardSource.from_dir(split_dir, verify=False, on_damaged="skip")
    answers: list[str] = []
    conversations, unreadable = 0, len(source.excluded)
    for url in source.urls:
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    record = json.loads(tar.extractfile(member).read())
                    turns = [m.get("content") for m in record.get("messages") or [] if isinstance(m, dict)
                             and m.get("role") == "assistant" and isinstance(m.get("content"), str)]
                    conversations += bool(turns)
                    answers += turns
        except (OSError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError):
            unreadable += 1
    return answers, {"split": str(split_dir), "conversations": conversations, "shards_unreadable": unreadable}


def measure_budget(split_dir: Path, tokenizer: Any, cap: int = CAP, **rule: Any) -> tuple[int, dict[str, Any]]:
    """`budget_from_lengths` of the assistant answers of `split_dir` in `tokenizer`'s tokens; the stats also say
    the split, its conversations and the tokenizer."""
    answers, where = assistant_answers(split_dir)
    if not answers:
        raise DataError(f"{split_dir}: no assistant answers to measure a generation budget from")
    budget, stats = budget_from_lengths(answer_token_lengths(tokenizer, answers), cap=cap, **rule)
    kind = type(getattr(tokenizer, "tokenizer", tokenizer)).__name__
    return budget, {**stats, **where, "tokenizer": kind}
