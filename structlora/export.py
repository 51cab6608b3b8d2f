"""Export the trained update as a standard PEFT LoRA adapter (DESIGN.md 3.2, "Export").

For each adapted linear layer the exported pair is exactly the merged update:

    B' = [s B diag(m_kept) | P_out M],  A' = [A_kept ; P_in^T],  lora_alpha = rank (scale 1)

with pruned directions dropped, per-module ranks in `rank_pattern` / `alpha_pattern`, and
fused slices (timm qkv) zero-padded to the full output. No gate or coordinator tensor is
written. Optionally each module is compressed to rank r by SVD, with its relative error.
peft is imported here only, so the method itself depends on torch alone.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def svd_compress(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of dW = B A and ||dW - dW_r||_F / ||dW||_F, without forming dW.

    QR of both factors reduces the SVD to a k x k core (k = current rank).
    """
    k = A.shape[0]
    if k <= rank:
        return A, B, 0.0
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    total = float((s**2).sum())
    error = float((s[rank:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return new_a.to(A.dtype), new_b.to(B.dtype), error


@torch.no_grad()
def peft_factors(model, svd_rank: int | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                               dict[str, float]]:
    """{module: (A', B')} with scale folded into B' and pruned directions dropped; SVD errors."""
    plans = model.compute_plans(training=False)
    factors, errors = {}, {}
    for name, layer in model.layers.items():
        A, B, scale = layer.factors(plans[name], drop_pruned=True)
        A, B = A.detach().float().cpu(), (B.detach().float() * scale).cpu()
        if svd_rank is not None:
            A, B, errors[name] = svd_compress(A, B, svd_rank)
        if A.shape[0] == 0:  # every direction pruned and no coordinator branch: no update at all
            continue
        factors[name] = (A.contiguous(), B.contiguous())
    return factors, errors


def export_peft(model, path: Path, base_model_name_or_path: str | None = None,
                svd_rank: int | None = None) -> dict[str, Any]:
    """Write `path`/adapter_config.json + adapter_model.safetensors; returns a summary dict.

    Args:
        model: a StructLoRAModel (not merged, not unloaded).
        path: output directory (written through a temp directory, then renamed).
        base_model_name_or_path: recorded in the adapter config for `PeftModel.from_pretrained`.
        svd_rank: compress every module to this rank (None: exact export).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    model._check_live()
    if model.merged:
        raise RuntimeError("export_peft needs the unmerged model: call it before merge()")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank must be >= 1, got {svd_rank}")
    factors, errors = peft_factors(model, svd_rank)
    if not factors:
        raise RuntimeError("every direction of every module is pruned: there is no update to export")
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    base_rank = Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=base_rank, lora_alpha=base_rank, target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
        rank_pattern=dict(ranks), alpha_pattern={name: float(r) for name, r in ranks.items()},
        base_model_name_or_path=base_model_name_or_path, inference_mode=True,
    )
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    summary: dict[str, Any] = {
        "path": str(path), "modules": len(ranks), "ranks": ranks, "svd_rank": svd_rank,
        "coordinator_branch": model.coordinator is not None, "parameters": sum(t.numel() for t in tensors.values()),
    }
    if svd_rank is not None:
        summary["relative_error"] = errors
        summary["max_relative_error"] = max(errors.values(), default=0.0)
    (tmp / "structlora_export.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return summary
