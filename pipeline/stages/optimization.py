"""The optimizer and learning-rate schedule of the training recipe (as transformers' optimization module).

AdamW over the method's parameter groups (`AdaptedModel.param_groups`: adapter factors, gates and
coordinator each with its own rate), and a linear warmup then cosine decay to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.schema import TrainConfig


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over `warmup_ratio` of the steps, then cosine decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> tuple[torch.optim.Optimizer,
                                                                             torch.optim.lr_scheduler.LambdaLR]:
    """(AdamW over `groups`, its per-step schedule: `cosine_with_warmup` over cfg.max_steps)."""
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.max_steps, cfg.warmup_ratio))
    return optimizer, scheduler
