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
from pathlib import Path
from typing import Any

from data.answer_budget import CAP, budget_from_lengths, describe_budget, nearest_rank

PERCENTILES = (50, 95)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """{p50, p95, max, mean} of `values` (zeros when empty)."""
    out = {f"p{q}": nearest_rank(values, q) for q in PERCENTILES}
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


# --- measured for a model --------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
ROUND = 64  # suggested lengths are rounded up to a multiple of this


def _round_up(value: float, step: int = ROUND) -> int:
    return int(math.ceil(max(value, 1) / step) * step)


def _spread(folder: Path, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` samples of a prepared split, from shards spread evenly over it (a file sorted by subset is
    measured across its subsets), and the split's record count."""
    from data.shards import ShardSource
    from data.stream import EvalStream

    source = ShardSource.from_dir(folder, verify=False)
    if not source.urls:
        return [], 0
    picks = max(1, min(len(source.urls), math.ceil(limit / max(1, max(source.sizes)))))
    chosen = sorted({round(i * (len(source.urls) - 1) / max(1, picks - 1)) for i in range(picks)})
    each = math.ceil(limit / len(chosen))
    samples: list[dict[str, Any]] = []
    for index in chosen:
        one = ShardSource(source.name, (source.urls[index],), (source.sizes[index],))
        for k, sample in enumerate(EvalStream(one, rank=0, world_size=1, expand=False)):
            if k >= each or len(samples) >= limit:
                break
            samples.append(sample)
    return samples, source.samples


def token_card(root: Path, processor: Any, max_length: int, context: int | None = None,
               limit: int = 1000) -> dict[str, Any]:
    """Per split of prepared conversations `root` (OUT/conversations): the samples' length in the processor's tokens
    (images expanded, the template's text included), their images' share, how many exceed `max_length` and are
    split between turns or dropped by the training collator, the answers' length in tokens (with the end-of-turn
    token the model must generate); then suggested `data.max_length` and `eval.max_new_tokens` from the train split.
    At most `limit` samples per split are measured (`measured` says how many of how many)."""
    from data.chat_collate import ChatCollator

    collator = ChatCollator(processor, max_length=max_length)
    tokenizer = getattr(processor, "tokenizer", processor)
    card: dict[str, Any] = {"max_length": max_length, "context": context, "splits": {}}
    answers_train: list[int] = []
    for split in SPLITS:
        if not (Path(root) / split / "manifest.json").is_file():
            continue
        samples, total = _spread(Path(root) / split, limit)
        if not samples:
            continue
        lengths, image_tokens, answers, rows = [], [], [], []
        turns_before, dropped_before = collator.dropped_turns, collator.overlong_examples
        for sample in samples:
            tokens, added, n_rows = collator.measure(sample)
            lengths.append(tokens)
            image_tokens.append(added)
            rows.append(n_rows)
            answers += [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
                        for m in sample["messages"] if m["role"] == "assistant"]
        card["splits"][split] = {
            "measured": len(samples), "records": total, "tokens": distribution(lengths),
            "image_tokens": distribution(image_tokens), "answer_tokens": distribution(answers),
            "over_max_length": sum(n > max_length for n in lengths), "split_into_rows": sum(r > 1 for r in rows),
            "dropped": collator.overlong_examples - dropped_before,
            "dropped_turns": collator.dropped_turns - turns_before, "lengths": lengths}
        if split == "train":
            answers_train = answers
    train = card["splits"].get("train") or next(iter(card["splits"].values()), None)
    if train is not None:
        fits = _round_up(nearest_rank(train["lengths"], 99))
        card["suggested"] = {"max_length": min(fits, context) if context else fits,
                             "max_length_reason": "p99 of the train samples' tokens, rounded up to 64"
                                                  + (f", at most the model's context ({context})" if context else ""),
                             **_new_tokens(answers_train, context)}
    return card


def _new_tokens(answer_tokens: Sequence[int], context: int | None) -> dict[str, Any]:
    """Suggested eval.max_new_tokens: `eval.max_new_tokens: {conversations: auto}`'s own rule
    (data.answer_budget), on the same train answers."""
    if not answer_tokens:
        return {"max_new_tokens": None, "max_new_tokens_reason": "no train answers measured"}
    budget, stats = budget_from_lengths(answer_tokens, cap=min(CAP, context) if context else CAP)
    return {"max_new_tokens": budget,
            "max_new_tokens_reason": f"what `auto` gives: {describe_budget(stats).split(': ', 1)[1]}"}


def render_card(card: dict[str, Any] | None) -> list[str]:
    """Markdown lines of a token card (the run's report and data_card.md)."""
    if not card or not card.get("splits"):
        return []
    limit = card["max_length"]
    lines = ["", "## Your data (data card)", "",
             f"Samples' length in the model's tokens (images expanded, chat template included); data.max_length = "
             f"{limit}. A longer sample is split between turns into rows; one whose single turn cannot fit is "
             "dropped.", "",
             "| split | measured / records | tokens p50 | p95 | max | image tokens p50 | over max_length | split | "
             "dropped | answer tokens p50 | p95 | max |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split, s in card["splits"].items():
        t, a = s["tokens"], s["answer_tokens"]
        lines.append(f"| {split} | {s['measured']} / {s['records']} | {t['p50']:g} | {t['p95']:g} | {t['max']:g} | "
                     f"{s['image_tokens']['p50']:g} | {s['over_max_length']} | {s['split_into_rows']} | "
                     f"{s['dropped']} | {a['p50']:g} | {a['p95']:g} | {a['max']:g} |")
    hint = card.get("suggested")
    if hint:
        lines += ["", f"Suggested: data.max_length {hint['max_length']} ({hint['max_length_reason']}); "
                      f"eval.max_new_tokens {hint['max_new_tokens']} ({hint['max_new_tokens_reason']})."]
    return lines


def plot_card(card: dict[str, Any], path: Path) -> Path | None:
    """Histogram of the samples' token lengths per split, with data.max_length marked."""
    if not card.get("splits"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split, s in card["splits"].items():
        ax.hist(s["lengths"], bins=40, alpha=0.5, label=f"{split} ({s['measured']})")
    ax.axvline(card["max_length"], color="black", linestyle="--", label=f"data.max_length {card['max_length']}")
    ax.set_xlabel("tokens per sample (images expanded)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_card(card: dict[str, Any], out: Path) -> dict[str, Path]:
    """data_card.json (the lengths themselves left out), data_card.md and data_card.png in `out`."""
    from data.files import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    stored = {**card, "splits": {k: {f: v for f, v in s.items() if f != "lengths"}
                                 for k, s in card["splits"].items()}}
    write_json_atomic(out / "data_card.json", stored)
    paths = {"json": out / "data_card.json"}
    (out / "data_card.md").write_text("\n".join(render_card(card)[1:]) + "\n")
    paths["md"] = out / "data_card.md"
    plot = plot_card(card, out / "data_card.png")
    if plot:
        paths["png"] = plot
    return paths
