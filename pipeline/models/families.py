"""Vision-language model families: tiny offline builds and a tower table found from the model itself.

`pipeline.models.vit_targets` describes LLaVA-1.5 and ViTs with fixed module paths. This module is the first
step towards "any current VLM": it finds the towers structurally, through transformers' own getters,
and labels every linear layer with its tower, depth and normalised role, so that target lists can be
written once ("all-linear", roles such as ["q", "v"], or a family's own suffixes such as ["q_proj"]).

Towers (transformers 5.x getters, checked on every family of `FAMILIES`):
- vision:    `model.get_encoder(modality="image")` (it looks for vision_tower / visual / vision_model /
             vision_encoder / image_tower on the model, then on its base model);
- language:  `model.get_decoder()` (language_model / text_model / decoder / text_decoder, then the base model);
- lm_head:   `model.get_output_embeddings()`, left out of the table (PEFT's "all-linear" skips it too);
- connector: every other nn.Linear, plus the per-family exceptions of `CONNECTOR_IN_VISION` (Qwen-VL's
             `merger` is registered inside the vision module but bridges to the language model).
Depth is the index in the tower's layer list: the nn.ModuleList whose items are
`transformers.modeling_layers.GradientCheckpointingLayer` (or, failing that, of a class the model
names in `_no_split_modules`).

`tiny_config` builds every family from config classes only (random weights, no hub access), with
2 layers per tower, hidden sizes 32 (vision) and 64 (language) and a 1000-token vocabulary whose last
ids are the image / special tokens; `tiny_inputs` makes a processor-free batch of the right shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3",
            "gemma3", "paligemma", "mistral3", "internvl")
TOWERS = ("vision", "connector", "language")
ROLES = ("q", "k", "v", "qkv", "out", "mlp_in", "mlp_gate", "mlp_out", "connector_in", "connector",
         "connector_out", "other")

# Connector modules registered inside the vision module (by model_type): names of direct children of
# the vision module whose linears belong to the connector. qwen3_vl_moe was checked once by hand (its MoE
# experts and router are not nn.Linear, so its language tower has attention linears only); the others
# are tested.
CONNECTOR_IN_VISION: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("merger",),
    "qwen2_5_vl": ("merger",),
    "qwen3_vl": ("merger", "deepstack_merger_list"),
    "qwen3_vl_moe": ("merger", "deepstack_merger_list"),
}

# Leaf module name -> role inside a tower. `proj` alone is only an attention output when its parent
# is an attention module (Qwen-VL's `attn.proj`); anything not listed is "other".
_ROLE_OF_LEAF: dict[str, str] = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
    "qkv": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "o_proj": "out", "out_proj": "out", "projection_layer": "out",
    "fc1": "mlp_in", "linear_fc1": "mlp_in", "up_proj": "mlp_in",
    "gate_proj": "mlp_gate",
    "fc2": "mlp_out", "linear_fc2": "mlp_out", "down_proj": "mlp_out",
}
_ATTENTION_PARENTS = frozenset({"attn", "attention", "self_attn"})


@dataclass(frozen=True)
class LinearInfo:
    """One nn.Linear of a VLM: full module name, tower, depth in that tower's layer list
    (None outside it, e.g. the connector), normalised role and shape."""

    name: str
    tower: str
    depth: int | None
    role: str
    in_features: int
    out_features: int


# ----------------------------------------------------------------------------- tiny builds


# ----------------------------------------------------------------------------- processor-free inputs


# ----------------------------------------------------------------------------- tower table

def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None or module is model:
        return None
    return next((name for name, sub in model.named_modules() if sub is module), None)


def tower_paths(model: nn.Module) -> dict[str, str]:
    """{"vision": path, "language": path} from transformers' getters; ValueError if either is missing
    (`get_encoder` / `get_decoder` return the model itself when they find nothing)."""
    vision = _path_of(model, model.get_encoder(modality="image"))
    language = _path_of(model, model.get_decoder())
    if not vision or not language:
        missing = " and no ".join(t for t, p in (("vision", vision), ("language", language)) if not p)
        raise ValueError(f"{type(model).__name__}: no {missing} tower found by get_encoder(modality='image') / "
                         "get_decoder()")
    return {"vision": vision, "language": language}


def connector_parts(model: nn.Module, vision: str) -> tuple[str, ...]:
    """Full paths of the vision module's children that CONNECTOR_IN_VISION moves to the connector."""
    names = CONNECTOR_IN_VISION.get(getattr(model.config, "model_type", ""), ())
    return tuple(f"{vision}.{n}" for n in names if f"{vision}.{n}" in dict(model.named_modules()))


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_list(model: nn.Module, root: str, skip: Sequence[str] = ()) -> str | None:
    """Path of the tower's layer list below `root`: the outermost nn.ModuleList whose items are all
    GradientCheckpointingLayer (or of a class in `model._no_split_modules`). None if there is none;
    ValueError if there are several (no guess)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    own = set(getattr(model, "_no_split_modules", None) or ())

    def is_layer(module: nn.Module) -> bool:
        return isinstance(module, GradientCheckpointingLayer) or type(module).__name__ in own

    found: list[str] = []
    for name, module in model.get_submodule(root).named_modules(prefix=root):
        if (isinstance(module, nn.ModuleList) and len(module) and all(is_layer(m) for m in module)
                and not _under(name, skip) and not _under(name, found)):
            found.append(name)
    if len(found) > 1:
        raise ValueError(f"{root}: several layer lists {found}; say which one holds the depth")
    return found[0] if found else None


def _role(name: str) -> str:
    parts = name.split(".")
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf in _ROLE_OF_LEAF:
        return _ROLE_OF_LEAF[leaf]
    return "out" if leaf == "proj" and parent in _ATTENTION_PARENTS else "other"


def connector_groups(model: nn.Module, names: Sequence[str], paths: dict[str, str],
                      moved: Sequence[str]) -> list[str]:
    """The connector module each connector linear belongs to: a CONNECTOR_IN_VISION part (one per item
    when it is a ModuleList, e.g. Qwen3-VL's deepstack mergers), or else the child, next to the towers,
    that holds it (e.g. `model.multi_modal_projector`)."""
    parents = [p.split(".")[:-1] for p in paths.values()]
    base = [a for a, b in zip(*parents) if a == b] if all(parents) else []
    groups = []
    for name in names:
        part = next((p for p in moved if _under(name, [p])), None)
        if part is None:
            parts = name.split(".")
            inside = parts[:len(base)] == base and len(parts) > len(base)
            groups.append(".".join(parts[:len(base) + 1] if inside else parts[:1]))
        elif isinstance(model.get_submodule(part), nn.ModuleList):
            groups.append(f"{part}.{name[len(part) + 1:].split('.', 1)[0]}")
        else:
            groups.append(part)
    return groups


def _connector_roles(groups: Sequence[str]) -> list[str]:
    """Per connector module, its linears in registration order: the first reads the vision side
    ("connector_in"), the last writes the language side ("connector_out"); a lone linear does both and,
    like any linear in between, is "connector"."""
    roles = []
    for i, group in enumerate(groups):
        members = [j for j, g in enumerate(groups) if g == group]
        first, last = i == members[0], i == members[-1]
        roles.append("connector" if first == last else ("connector_in" if first else "connector_out"))
    return roles


def layer_table(model: nn.Module) -> list[LinearInfo]:
    """Every nn.Linear of the model except the lm_head, with tower, depth and role, in module order."""
    paths = tower_paths(model)
    moved = connector_parts(model, paths["vision"])
    lists = {tower: layer_list(model, path, skip=moved if tower == "vision" else ()) for tower, path in paths.items()}
    head = model.get_output_embeddings()
    rows: list[tuple[str, str, int | None, nn.Linear]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        tower = next((t for t, p in paths.items() if _under(name, [p]) and not _under(name, moved)), "connector")
        depth = None
        layers = lists.get(tower)
        if tower != "connector" and layers and _under(name, [layers]):
            depth = int(name[len(layers) + 1:].split(".", 1)[0])
        rows.append((name, tower, depth, module))
    bridge = [name for name, tower, _, _ in rows if tower == "connector"]
    roles = dict(zip(bridge, _connector_roles(connector_groups(model, bridge, paths, moved))))
    return [LinearInfo(name, tower, depth, roles[name] if tower == "connector" else _role(name),
                       module.in_features, module.out_features) for name, tower, depth, module in rows]


def resolve_targets(table: Sequence[LinearInfo], targets: str | Sequence[str],
                    towers: Sequence[str] | None = None) -> list[str]:
    """Module names (table order) matching `targets`, optionally only in `towers`.

    - "all-linear" (PEFT's spelling, alone or in a list): every row of the table (lm_head is not in it);
    - another single string: a regex that must match a whole module name (PEFT's meaning of a str);
    - a list of normalised roles (ROLES, e.g. ["q", "v"]) and/or module-name suffixes (["q_proj"],
      ["attn.qkv"]); a role wins over a suffix of the same spelling. Roles are exact: on a fused-qkv
      tower "q" matches nothing there, ask for "qkv".
    Every list item must match at least one module (ValueError otherwise: a typo adapts nothing).
    """
    rows = [r for r in table if towers is None or r.tower in towers]
    if isinstance(targets, str):
        if targets == "all-linear":
            return [r.name for r in rows]
        pattern = re.compile(targets)
        return [r.name for r in rows if pattern.fullmatch(r.name)]
    chosen: set[str] = set()
    unmatched: list[str] = []
    for target in targets:
        hits = {r.name for r in rows if target == "all-linear" or (
            r.role == target if target in ROLES else (r.name == target or r.name.endswith("." + target)))}
        if not hits:
            unmatched.append(target)
        chosen |= hits
    if unmatched:
        raise ValueError(f"targets {unmatched} match no linear layer in towers {sorted({r.tower for r in rows})}")
    return [r.name for r in rows if r.name in chosen]


