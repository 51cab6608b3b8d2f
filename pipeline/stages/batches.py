"""Training batches of a stage: the shard stream of a split, collated, with its skip accounting.

`batch_iterator` is the endless stream of one rank (a DataLoader over `data.stream.TrainStream`,
epoch after epoch); every batch it reads, with or without data, is recorded in a
`data.accounting.TrainAccount` before the empty ones are passed over; `data_summary` gathers the
accounts of every rank for the stage's summary.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data.accounting import TrainAccount
from pipeline.errors import UserError
from pipeline.schema import RunConfig

log = logging.getLogger("structlora.stages")


def batch_iterator(cfg: RunConfig, srcs, processor, batch_size: int, seed: int, rank: int, world_size: int,
                   epoch_length: int, log_partition: Path | None = None, fraction: float = 1.0,
                   account: TrainAccount | None = None,
                   long_context: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches for this rank: the resampled stream, epoch after epoch. Every batch,
    with or without data, is recorded in `account` (skips per epoch) before the empty ones are passed over.
    `long_context`: build `data.long_context`'s long-context examples (the train stage's training stream only:
    the base model and every validation set stay as without the option)."""
    from torch.utils.data import DataLoader

    from data.chat_collate import make_collator
    from data.collate import ClassificationCollator
    from data.long_context import LongContextMaker
    from data.stream import TrainStream, collate_with_stats

    stream = TrainStream(sources=srcs, epoch_length=epoch_length, seed=seed, rank=rank, world_size=world_size,
                         sampling=cfg.data.sampling, questions=cfg.data.questions, shuffle_buffer=256,
                         allow_remote=cfg.data.allow_remote, fraction=fraction)
    if log_partition is not None:
        workers = max(1, cfg.data.num_workers)
        log_partition.write_text(json.dumps(
            {"rank": rank, "world_size": world_size,
             "workers": [stream.partition(w, workers) for w in range(workers)]}, indent=1))
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        # a collator per (rank, epoch): DataLoader workers each get a copy of it, so one reused across
        # epochs would replay the same caption choices every epoch
        collate = ClassificationCollator(processor) if cfg.model.arch == "vit" else make_collator(
            processor, max_length=cfg.data.max_length, seed=seed + 7919 * rank + 104729 * epoch)
        if cfg.model.arch != "vit":
            collate.caption_reference = cfg.data.caption_reference
        lc = cfg.data.long_context
        if long_context and lc.share > 0 and cfg.model.arch != "vit":
            collate.long_context = LongContextMaker(share=lc.share, min_tokens=lc.min_tokens, max_tokens=lc.max_tokens,
                                                    pool_size=lc.pool, seed=seed + 7919 * rank + 104729 * epoch,
                                                    per=lc.per)
        loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate_with_stats(collate),
                            num_workers=cfg.data.num_workers)
        batches = 0
        for batch in loader:
            if account is not None:
                account.record(epoch, batch)
            tensors = _strip(batch)
            if not tensors:  # nothing usable in it (every example too long, or only a stream's skip counts)
                continue
            batches += 1
            yield tensors
        if batches == 0:  # an epoch pass over unreadable or empty shards: stop instead of looping
            raise UserError(f"epoch {epoch} of the training stream gave no batch: every shard of "
                            f"{[s.name for s in srcs]} is empty, unreadable or outside train.data_fraction "
                            "(see the warnings above)")


def _strip(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def validation_batches(cfg: RunConfig, srcs, processor, batch_size: int, max_batches: int = 4,
                       account: TrainAccount | None = None) -> list[dict]:
    """A fixed validation set: the first batches of a seeded pass over the split, the same on every rank
    (none when every task's split is empty: validation losses are then NaN, and said so)."""
    if not srcs:
        return []
    batches = batch_iterator(cfg, srcs, processor, batch_size, seed=12345, rank=0, world_size=1,
                             epoch_length=batch_size * max_batches, account=account)
    return list(itertools.islice(batches, max_batches))


def data_summary(accelerator, train: TrainAccount, val: TrainAccount) -> dict[str, Any]:
    """What the stage's streams read and lost, training counts summed over ranks (a collective: every
    rank calls it); the validation batches are the same on every rank, so rank 0's count is the count.
    Anything lost is also printed, so that it is seen before the summary is opened."""
    from data.accounting import describe_train_loss, merge_train_accounts

    parts = [train.as_dict()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = list(gather_object(parts))
    data = {"train": merge_train_accounts(parts), "val": val.as_dict()}
    if accelerator.is_main_process:
        for account in data.values():
            line = describe_train_loss(account)
            if line:
                log.warning("data lost: %s", line)
                print(f"warning: data lost: {line} (counts per epoch in the stage summary)")
    return data
