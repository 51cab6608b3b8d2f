"""What a ViT classifier adapts: its tower described to StructLoRA (VLMs, LLaVA-1.5 included, are described from
their own tower table: `pipeline.models.targets`).

structlora knows nothing of the backbone; this module tells it, as timm's `group_matcher` does: one
`TargetConfig` per module kind, a regex with a depth group, and the representation spaces each module reads and
writes: the residual stream where the module reads or writes it (q/k/v/fc1 read it, o/out/fc2 write it), so
that modules at different depths share those sketch coordinates; the other side is left to a basis of its own.
transformers ViT: `vit.layers.{i}.attention.{q_proj,v_proj}`; timm: `blocks.{i}.attn.qkv`, adapted on its q and
v row slices only.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from pipeline.schema import AdapterConfig

_STRUCTURAL_KEYS = ("rank", "alpha", "dropout", "targets")


def backbone_kind(model: nn.Module) -> str:
    """'vit' (transformers) or 'timm_vit', from the module structure."""
    names = {n for n, _ in model.named_children()}
    if "vit" in names:
        return "vit"
    if "blocks" in names or ("timm" in names and hasattr(model.timm, "blocks")):
        return "timm_vit"
    raise ValueError(f"unknown classifier {type(model).__name__}: expected a transformers ViT or a timm ViT")


# Which side of a module lives in its tower's residual stream (the only sketch coordinates shared
# across depth under `coordinator.bases: streams`); the other side is a per-layer space (attention
# heads, MLP neurons) whose coordinates mean nothing in another layer.
READS_STREAM = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv", "fc1", "gate_proj", "up_proj"})
WRITES_STREAM = frozenset({"o_proj", "out_proj", "proj", "fc2", "down_proj"})


def _space(width: int, stream: str, hidden: int, on_stream: bool = True) -> str | None:
    return stream if on_stream and width == hidden else None


def _layer_target(model: nn.Module, tower: str, prefix: str, kind: str, hidden: int,
                  max_depth: int | None = None) -> dict[str, Any] | None:
    """A TargetConfig dict for `kind` modules of one tower, or None if the tower has none."""
    pattern = rf"^{prefix}\.(\d+)\.(?:[A-Za-z_]+\.)?{re.escape(kind)}$"
    compiled = re.compile(pattern)
    example = next((m for n, m in model.named_modules() if compiled.fullmatch(n) and isinstance(m, nn.Linear)), None)
    if example is None:
        return None
    return {"tower": tower, "pattern": pattern, "kind": kind, "max_depth": max_depth,
            "in_space": _space(example.in_features, tower, hidden, kind in READS_STREAM),
            "out_space": _space(example.out_features, tower, hidden, kind in WRITES_STREAM)}


def vit_targets(model: nn.Module, adapter: AdapterConfig, kind: str) -> list[dict[str, Any]]:
    if adapter.vision != "lora":
        return []
    if kind == "vit":
        hidden = model.config.hidden_size
        return [t for k in adapter.targets
                if (t := _layer_target(model, "vision", r"vit\.layers", k, hidden)) is not None]
    prefix = r"timm\.blocks" if hasattr(model, "timm") else r"blocks"  # pipeline.models.vit.TimmClassifier
    hidden = (model.timm if hasattr(model, "timm") else model).embed_dim
    # transformers' names work on timm too (one config for both implementations): q/k/v_proj are the
    # row slices of timm's fused attn.qkv, o_proj / out_proj its attn.proj; `qkv` alone means q and v
    slices = [TIMM_QKV_SLICES[k] for k in adapter.targets if k in TIMM_QKV_SLICES] or \
        (["q", "v"] if "qkv" in adapter.targets else [])
    targets = []
    if slices:
        targets.append({"tower": "vision", "pattern": rf"^{prefix}\.(\d+)\.attn\.qkv$", "kind": "qkv",
                        "in_space": "vision", "fused": ["q", "k", "v"], "slices": sorted(set(slices), key="qkv".index)})
    for k in adapter.targets:
        if k in TIMM_QKV_SLICES or k == "qkv":
            continue
        if (t := _layer_target(model, "vision", prefix, TIMM_ALIASES.get(k, k), hidden)) is not None:
            targets.append({**t, "kind": k})
    return targets


TIMM_QKV_SLICES = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
TIMM_ALIASES = {"o_proj": "proj", "out_proj": "proj"}


def tower_targets(model: nn.Module, adapter: AdapterConfig) -> list[dict[str, Any]]:
    """StructLoRA target dicts (TargetConfig fields) for the backbone and the adapter's parts."""
    kind = backbone_kind(model)
    targets = vit_targets(model, adapter, kind)
    layered = adapter.vision == "lora"
    kinds = {t["kind"] for t in targets}
    if kind == "timm_vit" and "qkv" in kinds:
        kinds |= {"qkv", *TIMM_QKV_SLICES}
    missing = [k for k in adapter.targets if k not in kinds]
    if layered and missing:
        raise ValueError(f"adapter.targets {missing} name no linear layer in the adapted towers of "
                         f"{type(model).__name__}")
    return targets


def target_module_names(model: nn.Module, adapter: AdapterConfig) -> list[str]:
    """Full names of the linear layers to adapt (the same list for StructLoRA and the PEFT baselines)."""
    from structlora import TargetConfig
    from structlora.inject import find_targets

    targets = [TargetConfig(**t) for t in tower_targets(model, adapter)]
    return [name for name, *_ in find_targets(model, targets)]


def full_module_names(model: nn.Module, adapter: AdapterConfig) -> list[str]:
    """Submodules trained fully: the whole classifier with `vision: full`, else the new classification head."""
    head = "classifier" if backbone_kind(model) == "vit" else ("timm.head" if hasattr(model, "timm") else "head")
    return [n for n, _ in model.named_children()] if adapter.vision == "full" else [head]


def structlora_config_for(model: nn.Module, adapter: AdapterConfig, max_steps: int):
    """The StructLoRAConfig of a run: rank, alpha, dropout and towers from `adapter`, the rest from
    `adapter.structlora` (gate, coordinator, ablation); the gate anneals over `max_steps`."""
    from pipeline.config import from_dict
    from structlora import StructLoRAConfig

    extra = dict(adapter.structlora)
    clash = [k for k in _STRUCTURAL_KEYS if k in extra]
    if clash:
        raise ValueError(f"adapter.structlora.{clash[0]}: set adapter.{clash[0]} instead (shared with the baselines)")
    gate = dict(extra.pop("gate", None) or {})
    gate.setdefault("anneal_steps", max(1, max_steps))
    data = {"rank": adapter.rank, "alpha": float(adapter.alpha), "dropout": float(adapter.dropout),
            "targets": tower_targets(model, adapter), "gate": gate, **extra}
    if not data["targets"]:
        raise ValueError("adapter: no part is configured `lora`, so StructLoRA has nothing to adapt")
    return from_dict(StructLoRAConfig, data, source="adapter.structlora", prefix="adapter.structlora")
