"""Finding the target modules and swapping in StructLoRA layers (PEFT's inject_adapter).

Targets are timm-style group matchers: a regex fully matching module names, whose depth group
gives the layer index. Each adapted module (or each adapted slice of a fused module) becomes a
graph node with its tower, kind, depth and representation spaces.
"""

from __future__ import annotations

import re

from torch import nn

from structlora.config import StructLoRAConfig, TargetConfig
from structlora.graph import Node
from structlora.layer import DEFAULT_SLICE, StructLoRALinear


def _match(target: TargetConfig, name: str) -> tuple[int, str] | None:
    """(depth, kind) if `name` is one of `target`'s modules, else None."""
    match = target.regex.fullmatch(name)
    if match is None:
        return None
    groups = match.groupdict()
    group = "depth" if "depth" in groups else (1 if match.re.groups else None)
    raw = match.group(group) if group is not None else None
    depth = int(raw) if raw is not None else target.depth
    if depth is None:
        raise ValueError(f"{name}: pattern {target.pattern!r} matched without a depth; set the target's `depth`")
    if target.max_depth is not None and depth > target.max_depth:
        return None
    return depth, groups.get("kind") or target.kind or _default_kind(name, match, group)


def _default_kind(name: str, match: re.Match, group) -> str:
    """The last name part after the depth (`layers.3.self_attn.q_proj` -> q_proj), else before it."""
    if raw_span := (match.span(group) if group is not None and match.group(group) is not None else None):
        after, before = name[raw_span[1]:].strip("."), name[: raw_span[0]].strip(".")
        return (after or before or name).rsplit(".", 1)[-1]
    return name.rsplit(".", 1)[-1]


def find_targets(model: nn.Module, targets: list[TargetConfig]) -> list[tuple[str, TargetConfig, int, str]]:
    """(module name, its target, depth, kind) of every module a target names; the first target wins."""
    found = []
    for name, _ in model.named_modules():
        for target in targets:
            hit = _match(target, name)
            if hit is not None:
                found.append((name, target, *hit))
                break
    return found


def _space(cfg: StructLoRAConfig, declared: str | None, width: int, own: str) -> str:
    """The sketch basis of one side of a module: its declared space, else a basis of its own
    (`coordinator.bases: streams`); with `bases: width` one basis per width, names ignored."""
    if cfg.coordinator.bases == "width":
        return f"d{width}"
    return declared or own


def inject_layers(model: nn.Module, cfg: StructLoRAConfig) -> tuple[dict[str, StructLoRALinear], list[Node],
                                                                    dict[str, int]]:
    """Replace every target linear of `model` by a StructLoRALinear (in place).

    Returns the layers by module name, the graph nodes in model order, and the width of every
    representation space (a space used at two widths is an error naming both modules).
    """
    layers: dict[str, StructLoRALinear] = {}
    nodes: list[Node] = []
    dims: dict[str, tuple[int, str]] = {}
    for name, target, depth, kind in find_targets(model, cfg.targets):
        module = model.get_submodule(name)
        if isinstance(module, StructLoRALinear):
            raise ValueError(f"{name} is already a StructLoRA layer (apply_structlora called twice?)")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} matches target {target.tower} ({target.pattern}) but is a "
                            f"{type(module).__name__}, not nn.Linear")
        layer = StructLoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.gate, target.fused, target.slices)
        layer.to(device=module.weight.device)
        model.set_submodule(name, layer)
        layers[name] = layer
        layer.in_space = _space(cfg, target.in_space, module.in_features, f"{name}:in")
        for slice_name in layer.slice_rows:
            rows = layer.lora_B[slice_name].shape[0]
            fused = slice_name != DEFAULT_SLICE
            out_space = _space(cfg, target.out_space, rows, f"{name}[{slice_name}]:out" if fused else f"{name}:out")
            for space, width in ((layer.in_space, module.in_features), (out_space, rows)):
                seen = dims.setdefault(space, (width, name))
                if seen[0] != width:
                    raise ValueError(f"representation space {space!r} is {seen[0]} wide at {seen[1]} "
                                     f"but {width} wide at {name}: give these modules different spaces")
            layer.out_spaces[slice_name] = out_space
            nodes.append(Node(
                name=f"{name}[{slice_name}]" if fused else name, module=name, slice=slice_name,
                tower=target.tower, kind=f"{kind}.{slice_name}" if fused else kind, depth=depth,
                in_space=layer.in_space, out_space=out_space, in_features=module.in_features, out_features=rows))
    if not layers:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        patterns = [t.pattern for t in cfg.targets]
        raise ValueError(f"no module matches the StructLoRA targets {patterns}; linear layers look like {linears}")
    return layers, nodes, {space: width for space, (width, _) in dims.items()}
