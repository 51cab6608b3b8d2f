"""What a stage read from a split and what it lost, by reason.

Nothing a stream or a collator skips may vanish: the counts below go into the stage's summary,
the run's `manifest.json`, `metrics.json` and `report.md`. The kinds of loss:

- `shards_left_out`: shards that failed the check at open (missing, wrong size, sha256 mismatch)
  and were left out under `damaged_shards: skip`; what they held is known from the manifest;
- `damaged_shards_read`: shards found damaged while read (a tar error: the rest of the shard skipped);
- `corrupt_images`: image members that do not decode;
- `bad_records`: samples without a usable JSON record or image member;
- `overlong_examples`: training examples whose every turn is longer than `data.max_length` with the
  image (the whole example is lost);
- `dropped_turns`: turns of kept examples that did not fit (the rest of the example is trained).

Training streams are counted per epoch and in total (`TrainAccount`); an evaluation split per task,
with the number of examples the split holds next to the number read and scored (`eval_account`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from data.examples import COLLATOR_DROPS, COLLATOR_MADE, QUESTION_TASKS, SkipCounter, StreamStats

STREAM_KINDS = ("damaged_shards_read", "corrupt_images", "bad_records")
KINDS = (*STREAM_KINDS, *COLLATOR_DROPS)
LABELS = {
    "shards_left_out": "damaged shards left out",
    "damaged_shards_read": "damaged shards (found while read)",
    "corrupt_images": "undecodable images",
    "bad_records": "bad records",
    "overlong_examples": "over-long examples",
    "dropped_turns": "dropped turns",
}
_SINGULAR = {"shards_left_out": "damaged shard left out", "damaged_shards_read": "damaged shard (found while read)",
             "corrupt_images": "undecodable image", "bad_records": "bad record",
             "overlong_examples": "over-long example", "dropped_turns": "dropped turn"}


def count_of(kind: str, n: int) -> str:
    """'1 damaged shard left out', '3 undecodable images'."""
    return f"{n} {_SINGULAR[kind] if n == 1 else LABELS[kind]}"


def stream_counts(stats: Mapping[str, int] | StreamStats) -> dict[str, int]:
    """StreamStats (or its dict) in the account's names."""
    values = stats.as_dict() if isinstance(stats, StreamStats) else dict(stats)
    return {"damaged_shards_read": int(values.get("shard_errors", 0)),
            "corrupt_images": int(values.get("corrupt_images", 0)),
            "bad_records": int(values.get("bad_records", 0))}


def left_out(sources: Sequence[Any]) -> list[dict[str, Any]]:
    """The shards each ShardSource left out at open, with their task."""
    return [{"task": s.name, **d.as_dict()} for s in sources for d in getattr(s, "excluded", ())]


class TrainAccount:
    """Skips of a training (or validation) stream over one split, all its tasks, per epoch.

    `record(epoch, batch)` takes every batch that `collate_with_stats` made, data or not. The
    streams' counts are running totals carried by their examples (the latest per stream wins);
    the collator's drops are per batch and add up.
    """

    def __init__(self, split: str, sources: Sequence[Any]):
        self.split = split
        self.sources = {s.name: {"images": s.images or s.samples, "units": s.units} for s in sources}
        self.left_out = left_out(sources)
        self._streams: dict[int, SkipCounter] = {}
        self._drops: dict[int, dict[str, int]] = {}
        self._made: dict[int, dict[str, int]] = {}  # not losses: what the collator built (long-context examples)
        self.batches: dict[int, int] = {}

    def record(self, epoch: int, batch: Mapping[str, Any]) -> None:
        self._streams.setdefault(epoch, SkipCounter()).update(dict(batch))
        drops = self._drops.setdefault(epoch, dict.fromkeys(COLLATOR_DROPS, 0))
        for key, value in (batch.get("__dropped__") or {}).items():
            drops[key] = drops.get(key, 0) + int(value)
        made = self._made.setdefault(epoch, dict.fromkeys(COLLATOR_MADE, 0))
        for key, value in (batch.get("__made__") or {}).items():
            made[key] = made.get(key, 0) + int(value)
        if any(not k.startswith("__") for k in batch):
            self.batches[epoch] = self.batches.get(epoch, 0) + 1

    def epoch(self, epoch: int) -> dict[str, int]:
        counts = stream_counts(self._streams[epoch].totals) if epoch in self._streams else dict.fromkeys(STREAM_KINDS, 0)
        return {**counts, **self._drops.get(epoch, dict.fromkeys(COLLATOR_DROPS, 0)),
                **self._made.get(epoch, dict.fromkeys(COLLATOR_MADE, 0))}

    def as_dict(self) -> dict[str, Any]:
        epochs = sorted(set(self._streams) | set(self._drops))
        per_epoch = [{"epoch": e, "batches": self.batches.get(e, 0), **self.epoch(e)} for e in epochs]
        return with_totals({"split": self.split, "sources": self.sources, "shards_left_out": self.left_out,
                            "images_left_out": sum(s["images"] for s in self.left_out)}, per_epoch)


def with_totals(account: Mapping[str, Any], per_epoch: list[dict[str, Any]]) -> dict[str, Any]:
    """`account` with its epochs, their totals, and whether anything at all was lost."""
    total = {k: sum(row[k] for row in per_epoch) for k in KINDS}
    made = {k: sum(row.get(k, 0) for row in per_epoch) for k in COLLATOR_MADE}
    return {**account, "per_epoch": per_epoch, "total": {"shards_left_out": len(account["shards_left_out"]), **total},
            "made": made, "lost_anything": bool(account["shards_left_out"]) or any(total.values())}


def examples_held(task: str, source: Any) -> int:
    """Evaluation examples a split's manifest holds: questions for VQAv2 / GQA, else images."""
    return int(source.units if task in QUESTION_TASKS else (source.images or source.samples))


def eval_account(task: str, split: str, source: Any, stats: StreamStats, read: int,
                 cap: int | None = None) -> dict[str, Any]:
    """One evaluation split of one task: what it holds, what was read (and so scored), what was lost and why.

    `cap` is `--max-samples` / `eval.max_samples`: only that many are wanted, so fewer than the split
    holds is not a loss; `lost` is what is missing from min(holds, cap)."""
    held = examples_held(task, source)
    wanted = min(held, cap) if cap else held
    shards = left_out([source])
    counts = {"shards_left_out": len(shards), **stream_counts(stats)}
    lost = max(0, wanted - read)
    return {"task": task, "split": split, "holds": held, "wanted": wanted, "scored": read, "lost": lost,
            "skipped": counts, "shards_left_out": shards, "skipped_at_prepare": int(getattr(source, "prepare_skipped", 0)),
            "lost_anything": lost > 0 or any(counts.values())}


def describe_loss(account: Mapping[str, Any]) -> str:
    """'15 of 35 test examples lost: 1 damaged shard left out (shard-000001.tar: sha256 ...)' or ''."""
    if not account.get("lost_anything"):
        return ""
    reasons = [count_of(k, n) for k, n in account["skipped"].items() if n]
    names = ", ".join(f"{s['shard'].rsplit('/', 1)[-1]}: {s['reason']}" for s in account["shards_left_out"])
    why = "; ".join(reasons) + (f" ({names})" if names else "")
    if account["lost"]:
        return (f"{account['task']}: {account['scored']} of {account['wanted']} {account['split']} examples scored, "
                f"{account['lost']} lost: {why}")
    return f"{account['task']}: all {account['wanted']} wanted {account['split']} examples scored, but {why}"


def merge_train_accounts(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The accounts of one split from every rank, as one: per-epoch counts summed over ranks (each
    rank reads its own share of the shards); what was left out at open is the same on every rank."""
    if len(parts) == 1:
        return dict(parts[0])
    first = parts[0]
    epochs: dict[int, dict[str, int]] = {}
    for part in parts:
        for row in part["per_epoch"]:
            into = epochs.setdefault(row["epoch"], {"epoch": row["epoch"], "batches": 0,
                                                   **dict.fromkeys((*KINDS, *COLLATOR_MADE), 0)})
            for key in ("batches", *KINDS, *COLLATOR_MADE):
                into[key] += row.get(key, 0)
    return {**with_totals(first, [epochs[e] for e in sorted(epochs)]), "ranks": len(parts)}


def describe_train_loss(account: Mapping[str, Any]) -> str:
    """One line on what a training split lost, or '' when nothing was."""
    if not account.get("lost_anything"):
        return ""
    total = account["total"]
    parts = [count_of(k, n) for k, n in total.items() if n]
    if account.get("images_left_out"):
        parts.append(f"{account['images_left_out']} images in the shards left out")
    epochs = len(account["per_epoch"])
    return f"{account['split']} split ({epochs} epoch{'s' if epochs != 1 else ''} read): " + ", ".join(parts)
