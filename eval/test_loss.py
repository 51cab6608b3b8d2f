"""Teacher-forced test loss: the mean token loss of the reference answers, per task (no generation).

Each evaluation example goes through the training collator (`data.chat_collate.make_collator`: the same
prompt through the chat template, labels on the answer tokens and their end token only, the same truncation
rule; a caption example trains on one of its references, picked by a fixed seed) and the model's logits at the
labelled positions only (`eval.token_loss`) give the cross-entropy of every labelled token. Per task:

- ``loss``: the token-weighted mean over the split (every answer token counts once: the method
  study's primary metric and `structlora compare`'s);
- ``per_item``: each example's mean token loss (image_id, question_id or conversation id), which the
  paired bootstrap between models compares;
- ``tokens``, ``num_examples`` and ``dropped`` (examples too long for `max_length`).

``mean`` is the unweighted mean of the tasks' ``loss``. Lower is better.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from data.chat_collate import make_collator
from eval.token_loss import token_losses

ID_FIELD = {"caption": "image_id", "vqav2": "question_id", "gqa": "question_id", "conversations": "id"}


def item_id(task: str, example: Mapping[str, Any]) -> str:
    return str(example[ID_FIELD[task]])


def labelled_row_losses(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, label tokens) per batch row, from the labelled positions only (eval.token_loss)."""
    losses, rows = token_losses(model, inputs, labels)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64).index_add_(0, rows.cpu(), losses.double().cpu())
    return sums, torch.bincount(rows.cpu(), minlength=labels.shape[0])


@torch.no_grad()
def example_losses(model: Any, processor: Any, task: str, examples: Sequence[Mapping[str, Any]], batch_size: int = 8,
                   max_length: int = 4096, seed: int = 0,
                   row_losses: Callable[..., tuple[torch.Tensor, torch.Tensor]] = labelled_row_losses,
                   ) -> dict[str, tuple[float, int]]:
    """{item id: (summed token loss, tokens)} of `examples` under `model` (eval mode, no gradients); `row_losses`
    gives each batch row's (summed loss, tokens) (bench/loss_head_eval.py passes the full-logits computation)."""
    collate = make_collator(processor, max_length=max_length, seed=seed)
    param = next(model.parameters())
    out: dict[str, tuple[float, int]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        try:
            batch = collate(chunk)
        except ValueError:  # every example of the chunk too long: none of them is scored
            continue
        labels = batch.pop("labels").to(param.device)
        inputs = {k: (v.to(param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device))
                  for k, v in batch.items()}
        sums, counts = row_losses(model, inputs, labels)
        for row, sample in enumerate(collate.last_rows):
            key = item_id(task, chunk[sample])
            total, tokens = out.get(key, (0.0, 0))
            out[key] = (total + float(sums[row]), tokens + int(counts[row]))
    return out


def summarize(parts: Mapping[str, Mapping[str, tuple[float, int]]], expected: Mapping[str, int]) -> dict[str, Any]:
    """The test_loss score block from {task: {item id: (summed loss, tokens)}} (all ranks merged);
    `expected` is the number of examples asked per task (the rest were too long to score)."""
    block: dict[str, Any] = {}
    for task, items in parts.items():
        total = sum(t for t, _ in items.values())
        tokens = sum(n for _, n in items.values())
        block[task] = {"loss": round(total / tokens, 6) if tokens else float("nan"), "tokens": tokens,
                       "num_examples": len(items), "dropped": expected.get(task, len(items)) - len(items),
                       "per_item": {k: t / n for k, (t, n) in items.items() if n}}
    losses = [b["loss"] for b in block.values() if b["tokens"]]
    block["mean"] = round(sum(losses) / len(losses), 6) if losses else float("nan")
    return block


def test_loss_scores(model, processor, examples: Mapping[str, Sequence[Mapping[str, Any]]], batch_size: int,
                     accelerator, max_length: int, timing: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Teacher-forced loss of every task's answers (``eval.test_loss``): every rank scores its strided share,
    rank 0 merges. Returns the score block on rank 0, else None."""
    from eval.generate import shard_samples
    from eval.ranks import on_main, timing_record

    start = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = {t: example_losses(model, processor, t, shard_samples(list(ex), rank, world), batch_size, max_length)
            for t, ex in examples.items()}
    parts = [mine]
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([mine])
    if timing is not None:
        timing.update(timing_record(sum(len(ex) for ex in examples.values()), time.perf_counter() - start))

    def merge() -> dict[str, Any]:
        merged: dict[str, dict[str, tuple[float, int]]] = {t: {} for t in examples}
        for part in parts:
            for task, items in part.items():
                merged[task].update(items)
        return summarize(merged, {t: len(ex) for t, ex in examples.items()})

    return on_main(accelerator, merge)
