"""The token loss from the labelled positions only: the one loss of training, validation, the test loss and
`structlora compare`'s cells.

In VLM fine-tuning most positions are image tokens and prompt (LLaVA-1.5: 576 image tokens before a short
answer), and vocabularies are large (Qwen-VL 151,936; Gemma 3 262,208): the language model head at every
position, upcast to float32 for the loss, is most of a step's memory and much of an evaluation's time. So:

- the model is asked for logits at the positions whose next token is labelled only: transformers' `logits_to_keep`
  with a boolean (batch, length) mask (every family's head runs `slice_logits_to_keep` before `lm_head`, and the
  family's own post-processing, e.g. Gemma's final-logit soft-capping, still applies); the logits come back
  flattened, one row per labelled token, in the model's dtype;
- cross-entropy runs over those rows in chunks (`CHUNK_ELEMENTS` logits at a time, `Tensor.split`), each chunk's
  float32 upcast and softmax recomputed in the backward (`torch.utils.checkpoint`), so the float32 upcast of the
  labelled logits never exists whole (torchtune's chunked loss, without its need for the model to return chunks).
  The labelled logits themselves (in the model's dtype: float32 in fp32 training) and their gradient do; only a
  fused linear cross-entropy (Liger, Cut Cross-Entropy: not wired in, no GPU to check them) would avoid those;
- the reduction is transformers' (`ForCausalLMLoss`): the summed token loss divided by `num_items` (the label
  tokens of the whole optimizer step, over micro-batches and ranks) when given, else by this batch's label tokens.

Generation is untouched: transformers' `generate` already asks for the last position's logits only on prefill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data.chat_template import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in float32 (16 rows of Gemma 3's 262,208-entry vocabulary)


def labelled_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose next token is labelled (the model predicts token t + 1 at t)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-row float32 cross-entropy of (rows, vocab) logits, `chunk_elements` logits at a time; with gradients,
    each chunk's float32 upcast and softmax are recomputed in the backward instead of kept."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    rows = max(1, chunk_elements // max(1, logits.shape[-1]))
    grad = torch.is_grad_enabled() and logits.requires_grad
    # split, not slices: a slice's backward fills a zero gradient the size of the whole logits, once per chunk
    parts = [checkpoint(_cross_entropy, chunk, target, use_reentrant=False) if grad else _cross_entropy(chunk, target)
             for chunk, target in zip(logits.split(rows), targets.split(rows))]
    return torch.cat(parts)


def labelled_logits(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """(logits of the labelled positions (n, vocab), their targets (n,), the (batch, length) mask) of one forward."""
    keep = labelled_mask(labels)
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() == 3:  # a head that ignored the mask: keep the labelled rows of the full logits
        logits = logits[keep]
    return logits, labels[:, 1:][keep[:, :-1]], keep


def token_losses(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 loss of every labelled token (n,), the batch row of each (n,)), in row-major order."""
    logits, targets, keep = labelled_logits(model, inputs, labels)
    return chunked_cross_entropy(logits, targets), keep.nonzero()[:, 0]


def task_loss(model: Any, inputs: dict[str, Any], labels: torch.Tensor,
              num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM task loss of a batch from its labelled positions only: summed token loss / `num_items` (the
    step's label tokens over micro-batches and ranks) when given, else the mean over this batch's label tokens (a
    batch without any label gives 0, where transformers' mean gives NaN)."""
    losses, _ = token_losses(model, inputs, labels)
    denominator = num_items if num_items is not None else max(1, losses.numel())
    return losses.sum() / denominator
