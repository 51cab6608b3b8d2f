"""Image classification accuracy (the ViT path): top-1 and top-5, in percent, as timm reports them.

A sample is top-k correct when its label is among the k highest logits. When a data set has
fewer than k classes, top-k is not reported (it would be 100% by construction) and the result
says which k were skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is in the top k logits, for each k <= number of classes.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices in [0, C).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    labels = labels.reshape(-1).to(logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows for {labels.shape[0]} labels")
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    valid = sorted({k for k in ks if 1 <= k <= num_classes})
    if not valid:
        return {}
    top = logits.topk(max(valid), dim=1).indices  # (N, kmax), best first
    hit = top.eq(labels[:, None])
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in valid}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} for one set of logits (k above the class count left out)."""
    n = labels.numel()
    if n == 0:
        raise ValueError("no samples")
    return {f"top{k}": 100.0 * c / n for k, c in topk_correct(logits, labels, ks).items()}


def _unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        inputs = batch.get("pixel_values", batch.get("image"))
        labels = batch.get("labels", batch.get("label"))
    else:
        inputs, labels = batch[0], batch[1]
    if inputs is None or labels is None:
        raise ValueError("a batch needs images ('pixel_values' or 'image') and labels ('labels' or 'label')")
    return inputs, torch.as_tensor(labels)


def _logits(output: Any) -> torch.Tensor:
    # transformers models return an output object with .logits; timm models return the tensor.
    return output.logits if hasattr(output, "logits") else output


@torch.inference_mode()
def evaluate_classifier(model: torch.nn.Module, batches: Iterable[Any], ks: Sequence[int] = (1, 5),
                        progress: bool = False) -> dict[str, Any]:
    """Top-k accuracy of `model` over `batches` of (images, labels) or {"pixel_values", "labels"}.

    Works with transformers image classifiers (``.logits``) and timm models (a tensor). Returns
    ``top1``, ``top5`` (percent), ``num_samples`` and ``skipped_k`` (k above the class count).
    """
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    counts: dict[int, int] = {}
    total = 0
    num_classes = None
    try:
        for batch in tqdm(batches, desc="classify", disable=not progress, unit="batch"):
            inputs, labels = _unpack(batch)
            logits = _logits(model(inputs.to(device=param.device, dtype=param.dtype)))
            num_classes = logits.shape[1]
            for k, c in topk_correct(logits.float(), labels, ks).items():
                counts[k] = counts.get(k, 0) + c
            total += labels.numel()
    finally:
        if was_training:
            model.train()
    if total == 0:
        raise ValueError("no samples to evaluate")
    result: dict[str, Any] = {f"top{k}": 100.0 * counts[k] / total for k in sorted(counts)}
    result["num_samples"] = total
    result["skipped_k"] = sorted(k for k in set(ks) if num_classes is not None and k > num_classes)
    return result
