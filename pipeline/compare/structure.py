"""How an update is structured across depth, measured alike for every method (`structlora compare`
with `diagnostics: true`): from the merged minus the base weights, dW, and the loss gradients dL/dW.

Along every depth chain (same tower, same module kind, consecutive layers): adjacent-layer cosine of
dW and of the gradients (batch-averaged, and per batch), drift energy raw and normalised by ||dW||^2;
StructLoRA adds kept rank, gate mean and the coordinator's message share.
"""

from __future__ import annotations

import re
from typing import Any


def chain_diagnostics(deltas: dict[str, Any]) -> dict[str, float]:
    """Mean adjacent-layer cosine and total drift energy over depth chains of {module: dW}.

    A chain is the modules whose names differ only in the layer index (same tower, same kind);
    consecutive indices with equal shapes form its edges, as in structlora.diagnostics.
    """

    chains: dict[str, list[tuple[int, str]]] = {}
    for name in deltas:
        m = re.search(r"\.(\d+)\.", name)
        if m:
            key = name[: m.start()] + ".*." + name[m.end():]
            chains.setdefault(key, []).append((int(m.group(1)), name))
    cosines, energy = [], 0.0
    for members in chains.values():
        members.sort()
        for (i, a), (j, b) in zip(members, members[1:]):
            ua, ub = deltas[a].double().flatten(), deltas[b].double().flatten()
            if j != i + 1 or ua.shape != ub.shape:
                continue
            denom = float(ua.norm() * ub.norm())
            cosines.append(float(ua @ ub) / denom if denom > 0 else 0.0)
            energy += float(((ua - ub) ** 2).sum())
    norm_sq = float(sum((d.double() ** 2).sum() for d in deltas.values()))
    return {"adjacent_cosine": sum(cosines) / len(cosines) if cosines else float("nan"),
            "drift_energy": energy, "depth_edges": len(cosines), "update_norm": norm_sq ** 0.5,
            "drift_energy_normalized": energy / norm_sq if norm_sq > 0 else float("nan")}


def merged_model(ctx) -> tuple[Any, Any, dict[str, Any], dict[str, float]]:
    """(merged model, processor, {target module: W_merged - W_base}, StructLoRA's own diagnostics)."""
    import torch

    from pipeline.models.dequantize import dequantize_model
    from pipeline.stages.common import load_adapted_handle, load_base, planned_targets

    # a quantized base (model.quantization) is measured as the merge folds it: dequantized, in float32
    base, base_processor = load_base(ctx)
    names = planned_targets(ctx, base, base_processor)[0]
    dequantize_model(base)
    before = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    del base
    adapted, processor = load_adapted_handle(ctx)
    dequantize_model(adapted.model)
    method_diag: dict[str, float] = {}
    if adapted.method == "structlora":
        from structlora import scalar_diagnostics

        scalars = scalar_diagnostics(adapted.handle)  # the numbers training logs: kept rank, message share, gates
        method_diag = {k: scalars[k] for k in ("kept_rank_mean", "message_share_mean", "gate_mean") if k in scalars}
        method_diag["kept_fraction"] = scalars["kept_rank_mean"] / adapted.handle.config.rank
        merged = adapted.handle.merge_and_unload()
    elif adapted.method == "full":
        merged = adapted.model
    else:
        merged = adapted.model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        deltas = {n: merged.get_submodule(n).weight.detach().float() - w.float() for n, w in before.items()}
    return merged, processor, deltas, method_diag


def _batches(ctx, processor, split: str, per_task: int | None, batch_size: int, seed: int = 0):
    """Teacher-forced batches (labels on the answers) of every task's `split`, task by task."""
    from data.chat_collate import make_collator
    from pipeline.stages.evaluate import load_eval_examples

    for task in [t for t, w in ctx.cfg.data.tasks.items() if w > 0]:
        examples = load_eval_examples(ctx, task, split, per_task)
        collate = make_collator(processor, max_length=ctx.cfg.data.max_length, seed=seed)
        for i in range(0, len(examples), batch_size):
            yield task, collate(examples[i: i + batch_size])


def gradient_cosines(ctx, model, processor, names: list[str], per_task: int = 48) -> dict[str, float]:
    """Adjacent-layer cosine of the loss gradients dL/dW_l at the final weights, on `per_task` val
    samples per task: of the batch-averaged gradient (the paper's CosAdj on gradients), and the
    mean over batches of the per-batch cosine."""
    import torch

    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    mean = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    per_batch, count = [], 0
    for _, batch in _batches(ctx, processor, "val", per_task, 16):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n: w.grad.detach().float() for n, w in weights.items()}
        for n, g in grads.items():
            mean[n] += g
        per_batch.append(chain_diagnostics(grads)["adjacent_cosine"])
        count += 1
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return {"grad_adjacent_cosine": chain_diagnostics({n: g / count for n, g in mean.items()})["adjacent_cosine"],
            "grad_adjacent_cosine_per_batch": sum(per_batch) / len(per_batch)}


def update_structure(ctx) -> dict[str, Any]:
    """Every diagnostic of the cell's adapted model (loads it again: meant for small models)."""
    merged, processor, deltas, method_diag = merged_model(ctx)
    out = {**chain_diagnostics(deltas), **method_diag}
    out.update(gradient_cosines(ctx, merged, processor, list(deltas)))
    return out
