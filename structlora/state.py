"""Save and load the full StructLoRA training state for resuming (safetensors + json).

Tensors: every adapter parameter (A, B, gate logits, coordinator transforms), the EMA
gradient sketches and the sketch projections (on load the saved basis is used, after checking
that it matches the regenerated one up to rounding: a changed seed would silently change it). JSON: the config, node names, step, refresh count, semantic edges.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FORMAT = "structlora-training-state/1"
BASIS_TOLERANCE = 1e-4  # max |entry| difference of a regenerated basis (entries are ~1/sqrt(width))
TENSORS = "structlora_state.safetensors"
META = "structlora_state.json"
# config fields that change the set or shape of the state: a resume with other values is refused
_STRUCTURAL = ("rank", "gate.enabled", "coordinator.enabled", "coordinator.sketch_dim", "coordinator.gnn_layers",
               "coordinator.gnn", "coordinator.edges", "coordinator.bridge_edges", "coordinator.seed")


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def adapter_state(model) -> dict[str, torch.Tensor]:
    """{name: tensor} of every adapter parameter, named as in the StructLoRAModel."""
    ids = {id(p) for group in model.adapter_parameters().values() for p in group}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def save_training_state(model, path: Path) -> None:
    """Write the state into directory `path` (through a temp directory, then rename)."""
    from safetensors.torch import save_file

    model._check_live()
    tensors = {f"param/{name}": p.detach().contiguous().cpu() for name, p in adapter_state(model).items()}
    meta = {"format": FORMAT, "config": model.config.to_dict(), "nodes": [n.name for n in model.nodes],
            "global_step": model.global_step, "armed": bool(model._armed), "refreshes": 0, "semantic_edges": [],
            "selection": model.selection.state_dict()}
    if model.coordinator is not None:
        coordinator = model.coordinator
        tensors["ema_sketch"] = coordinator.ema_sketch.detach().contiguous().cpu()
        for space in coordinator.basis.spaces():
            tensors[f"basis/{space}"] = coordinator.basis[space].detach().contiguous().cpu()
        meta["refreshes"] = coordinator.refreshes
        meta["semantic_edges"] = [list(e) for e in model.graph.edges.get("semantic", [])]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


@torch.no_grad()
def load_training_state(model, path: Path, load_parameters: bool = True) -> None:
    """Restore a state written by `save_training_state` into a model built with the same config.

    Args:
        load_parameters: also copy the adapter parameters (False when the caller restores
            trainable parameters itself, e.g. from its own checkpoint).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path}: not a StructLoRA training state (needs {META} and {TENSORS})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    current = model.config.to_dict()
    changed = [k for k in _STRUCTURAL if _get(meta["config"], k) != _get(current, k)]
    if changed:
        details = ", ".join(f"{k}: saved {_get(meta['config'], k)!r} vs now {_get(current, k)!r}" for k in changed)
        raise ValueError(f"{path}: the saved state has another structure ({details})")
    names = [n.name for n in model.nodes]
    if meta["nodes"] != names:
        missing = sorted(set(meta["nodes"]) ^ set(names))[:3]
        raise ValueError(f"{path}: the saved state adapts other modules (differences include {missing})")
    tensors = load_file(str(path / TENSORS))
    if load_parameters:
        for name, p in adapter_state(model).items():
            key = f"param/{name}"
            if key not in tensors:
                raise KeyError(f"{path / TENSORS}: no tensor {key}")
            p.copy_(tensors[key])
    if model.coordinator is not None:
        coordinator = model.coordinator
        for space in coordinator.basis.spaces():
            saved = tensors.get(f"basis/{space}")
            current = coordinator.basis[space]
            if saved is None or saved.shape != current.shape:
                raise ValueError(f"{path}: no saved sketch projection of shape {tuple(current.shape)} "
                                 f"for space {space!r}")
            # another CPU, BLAS or torch build regenerates the seeded basis with rounding differences:
            # accept those and continue with the saved basis itself (bit-exact resume and merge); a
            # real difference (another seed or width) is refused
            worst = float((saved.float() - current.float().cpu()).abs().max())
            if worst > BASIS_TOLERANCE:
                raise ValueError(f"{path}: sketch projection of space {space!r} differs from the saved one "
                                 f"(max |diff| {worst:.2e} > {BASIS_TOLERANCE:g}): another coordinator seed?")
            current.copy_(saved.to(device=current.device, dtype=current.dtype))
        coordinator.ema_sketch.copy_(tensors["ema_sketch"])
        coordinator.refreshes = int(meta["refreshes"])
        if "semantic" in model.graph.edge_types:
            model.graph.set_semantic([tuple(e) for e in meta["semantic_edges"]])
    model.selection.load_state_dict(meta.get("selection", {}))
    model.step(int(meta["global_step"]))  # temperature of that step
    model.set_capture(bool(meta["armed"]) and model.semantic_edges_on)
    for layer in model.layers.values():
        layer.grad_sketch = {}
