"""Records and examples of a shard stream: decoding (webdataset's Decoder, restricted to JSON and
images), skip accounting (webdataset handlers that count what they skip), and the examples a
record gives for evaluation (one per caption set / question) and for training (questions packed
into one conversation, or one each). The streams themselves are `data.stream`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from webdataset.autodecode import Decoder, handle_extension

from data.errors import DataError, OverlongBatchError
from data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image

log = logging.getLogger("data.stream")  # one logger for the whole stream: users filter on it
Example = dict[str, Any]
TASKS = ("caption", "vqav2", "gqa", "classification", "conversations")
QUESTION_TASKS = ("vqav2", "gqa")


@dataclass
class StreamStats:
    corrupt_images: int = 0
    bad_records: int = 0
    shard_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_images": self.corrupt_images, "bad_records": self.bad_records,
                "shard_errors": self.shard_errors}


class SkipCounter:
    """Totals of skipped items over all streams, from the `__skipped__` examples carry
    (works across DataLoader workers, whose own counters the main process cannot see)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}

    def update(self, items: Example | Iterable[Example]) -> None:
        """Accepts an example, a list of examples, or a batch from `collate_with_stats`."""
        if isinstance(items, dict) and "__stream__" not in items:
            self._latest.update(items.get("__skipped__") or {})
            return
        for example in [items] if isinstance(items, dict) else items:
            if "__stream__" in example:
                self._latest[example["__stream__"]] = example["__skipped__"]

    @property
    def totals(self) -> dict[str, int]:
        totals = StreamStats().as_dict()
        for stats in self._latest.values():
            for k, v in stats.items():
                totals[k] += v
        return totals


def _image_handler(key: str, data: bytes):
    """webdataset decoder handler: image members -> fully decoded PIL images (others: not ours)."""
    if key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
        return decode_image(data)
    return None


# JSON and images only: no pickle / torch / numpy handler, so such members stay undecoded bytes
DECODER = Decoder([handle_extension("json", json.loads), _image_handler], pre=[], post=[])
_FILEOBJ_NAME = re.compile(r"name='([^']*)'")


class Guard:
    """Skip accounting for one stream: webdataset handlers that count what they skip, and stop an
    endless stream over unusable data with DataError instead of looping forever."""

    def __init__(self, stats: StreamStats, max_consecutive_skips: int | None = None,
                 max_failed_shards: int | None = None):
        self.stats, self.max_skips, self.max_shards = stats, max_consecutive_skips, max_failed_shards
        self.skips_in_a_row = 0
        self.shards_in_a_row = 0
        self._failed_url: str | None = None

    def ok(self) -> None:
        self.skips_in_a_row = self.shards_in_a_row = 0
        self._failed_url = None

    def shard_error(self, exn: Exception) -> bool:
        """A damaged or unreadable shard: counted once (webdataset may report it twice, from the
        member and from the tar header), the rest of it skipped."""
        url = _url_of(exn)
        if url is None or url != self._failed_url:
            self.stats.shard_errors += 1
            self.shards_in_a_row += 1
            log.warning("shard %s: damaged or unreadable: %s (rest of shard skipped)", url or "?", exn.args[0]
                        if exn.args else exn)
        self._failed_url = url
        if self.max_shards is not None and self.shards_in_a_row >= self.max_shards:
            raise DataError(f"no readable sample in {self.shards_in_a_row} shards in a row (last: {url})") from exn
        return True

    def skip(self, kind: str, where: str, reason: str) -> None:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        log.warning("%s: %s (%s): skipped", where, kind.replace("_", " ").rstrip("s"), reason)
        self.skips_in_a_row += 1
        if self.max_skips is not None and self.skips_in_a_row > self.max_skips:
            raise DataError(f"{self.skips_in_a_row} unusable samples in a row (last: {where}); "
                            "see the warnings above")


def _url_of(exn: Exception) -> str | None:
    for arg in reversed(exn.args):
        if isinstance(arg, str) and arg and " " not in arg:
            return arg
    first = str(exn.args[0]) if exn.args else ""
    match = _FILEOBJ_NAME.search(first)
    return match.group(1) if match else None


def decode_samples(raw: Iterable[dict[str, Any]], guard: Guard) -> Iterator[Example]:
    """Raw sample -> record: the JSON payload plus `image` (a fully decoded PIL image), through
    webdataset's Decoder with our two handlers; bad ones counted and skipped."""
    for sample in raw:
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
        try:
            decoded = DECODER(sample)
        except wds.autodecode.DecodingError as err:
            cause = err.__cause__
            if isinstance(cause, ImageDecodeError):
                guard.skip("corrupt_images", where, f"field {err.k!r}: {cause}")
            else:
                guard.skip("bad_records", where, f"field {err.k!r}: {cause}")
            continue
        record = decoded.get("json")
        if not isinstance(record, dict) or record.get("task") not in TASKS:
            task = record.get("task") if isinstance(record, dict) else record
            guard.skip("bad_records", where, "no JSON record" if record is None else f"unknown task {task!r}")
            continue
        if record["task"] == "conversations":  # 0..n images, members img0.{ext}, img1.{ext}, ...
            images = _numbered_images(decoded)
            if len(images) != record.get("num_images", 0):
                guard.skip("bad_records", where, f"{len(images)} image members, the record says "
                                                 f"{record.get('num_images', 0)}")
                continue
            guard.ok()
            yield {**record, "images": images, "__key__": sample["__key__"]}
            continue
        image_ext = next((ext for ext in decoded if ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            guard.skip("bad_records", where, "no image member")
            continue
        guard.ok()
        yield {**record, "image": decoded[image_ext], "__key__": sample["__key__"]}


_NUMBERED = re.compile(r"^img(\d+)\.([a-z0-9]+)$")


def _numbered_images(decoded: dict[str, Any]) -> list[Any]:
    found = sorted((int(m.group(1)), value) for ext, value in decoded.items()
                   if (m := _NUMBERED.match(ext)) and m.group(2) in IMAGE_EXTENSIONS)
    return [value for _, value in found]


def expand(record: Example) -> list[Example]:
    """Evaluation examples of a record: one per image (captions, classification) or per question.

    Question examples carry `question`, `answer` (VQAv2: multiple_choice_answer) and all fields
    of their question (VQAv2 `answers`, GQA `fullAnswer`, `isBalanced`, `types`)."""
    base = {k: v for k, v in record.items() if k != "questions"}
    if record["task"] in ("caption", "classification", "conversations"):
        return [base]
    examples = []
    for question in record.get("questions", []):
        example = {**base, **question, "__key__": f"{record['__key__']}/{question['question_id']}"}
        if "answer" not in example:
            example["answer"] = question.get("multiple_choice_answer")
        examples.append(example)
    return examples


def training_examples(record: Example, rng: random.Random, questions: str = "packed") -> list[Example]:
    """Training examples of a record: captions and classification as they are (the collator samples
    a caption); the questions of an image packed into one multi-turn example (`turns`, in a random
    order) or one example each (`single`)."""
    if record["task"] not in QUESTION_TASKS:
        return [record]
    singles = expand(record)
    rng.shuffle(singles)
    if questions == "single" or not singles:
        return singles
    base = {k: v for k, v in record.items() if k != "questions"}
    return [{**base, "turns": [{"question": e["question"], "answer": e["answer"], "question_id": e["question_id"]}
                               for e in singles]}]


def attach_stats(examples: Iterable[Example], stats: StreamStats, stream: str) -> Iterator[Example]:
    """Stamp each example with its stream's running skip counts, one example late, so that
    the last example of a stream carries the final counts. A stream that yields no example but
    skipped something (its only shard damaged) yields one marker instead (`__marker__`: no data),
    so that its counts still reach the main process; `collate_with_stats` drops it."""
    previous = None
    for example in examples:
        if previous is not None:
            yield {**previous, "__stream__": stream, "__skipped__": stats.as_dict()}
        previous = example
    if previous is not None:
        yield {**previous, "__stream__": stream, "__skipped__": stats.as_dict()}
    elif any(stats.as_dict().values()):
        yield {"__marker__": True, "__stream__": stream, "__skipped__": stats.as_dict()}


def without_markers(examples: Iterable[Example]) -> list[Example]:
    return [e for e in examples if not e.get("__marker__")]


# what a collator drops, by counter attribute (LlavaCollator has both)
COLLATOR_DROPS = ("overlong_examples", "dropped_turns")
# what a collator made of the examples (not a loss): long-context training examples (data.long_context)
COLLATOR_MADE = ("long_context_examples", "long_context_no_pool")


def collate_with_stats(collate: Callable[[list[Example]], dict]) -> Callable[[list[Example]], dict]:
    """Wrap a collate function so that the batch keeps the skip counts (`__skipped__`) of its
    examples' streams (DataLoader workers run the collate function), for `SkipCounter.update(batch)`,
    and what the collator itself dropped in this batch (`__dropped__`: over-long examples and turns).
    Stream markers are left out; a batch with nothing left, or whose every example is too long, comes
    out with the counts and no data (the caller skips it), so one bad batch never stops a run."""
    def wrapped(examples: list[Example]) -> dict:
        before = {k: getattr(collate, k, 0) for k in (*COLLATOR_DROPS, *COLLATOR_MADE)}
        real = without_markers(examples)
        batch: dict[str, Any] = {}
        if real:
            try:
                batch = collate(real)
            except OverlongBatchError:
                batch = {}
        batch["__skipped__"] = {e["__stream__"]: e["__skipped__"] for e in examples if "__stream__" in e}
        batch["__dropped__"] = {k: getattr(collate, k, 0) - before[k] for k in COLLATOR_DROPS}
        batch["__made__"] = {k: getattr(collate, k, 0) - before[k] for k in COLLATOR_MADE}
        return batch
    return wrapped
