"""StructLoRA targets for any VLM family, from the tower table of `pipeline.models.families`.

`pipeline.models.vit_targets` describes LLaVA-1.5 to structlora with fixed regexes; this module produces the same
description (a list of `structlora.TargetConfig` dicts) from `families.layer_table(model)`, so that one
code path serves every family of `families.FAMILIES`. Not wired into the pipeline yet.

What it produces:
- towers: one target per (tower, role, name suffix after the depth index), pattern
  `^<layer list>\\.(<depths>)\\.<suffix>$` whose group is the depth, kind = the normalised role. A tower
  has one suffix per role in practice, so this is one target per (tower, role), and the library's depth
  chains (same tower, same kind, consecutive adapted depths) are one chain per (tower, role). `<depths>`
  is `\\d+`, or the alternation of the adapted depths when some are excluded (dead layers).
- connector: one target per linear (as towers.py does for LLaVA's linear_1 / linear_2), tower label
  `CONNECTOR_TOWER` ("projector", towers.py's and DESIGN.md's name), depth = position inside its connector
  module (registration order, which is the data-flow order in every family here), kind = that module's
  path: each connector module is its own depth chain. Qwen-VL's `visual.merger` counts as connector
  (the table says so, `families.CONNECTOR_IN_VISION`).
- spaces (sketch bases shared across depth, `coordinator.bases: streams`): a tower module reading
  (q, k, v, qkv, mlp_in, mlp_gate) or writing (out, mlp_out) its tower's residual stream, with that side's
  width equal to the stream's, uses the space named after the tower, as towers.py's READS_STREAM /
  WRITES_STREAM do. The stream width is read from the table (the usual input width of the reading roles),
  not from the config: Qwen2-VL's `vision_config.hidden_size` is the merger's output width, not the stream.
  A connector module's first linear reads "vision" and its last writes "language" when the widths match;
  consecutive linears of one connector module share a space: "projector" when the whole connector has
  one such link (LLaVA: exactly towers.py's spaces, hence the same seeded bases), else
  "projector:<module>:<i>". Every other side gets a basis of its own.
- bridges (structlora.graph.bridge_edges, towers in order vision -> projector -> language): every node at
  the deepest adapted vision depth <-> every node at connector depth 0, every node at the deepest
  connector depth <-> every node at the shallowest adapted language depth.

Approximated or left out (what the library cannot express, or what this module chooses):
- Qwen3-VL's k-th deepstack merger reads vision block `deepstack_visual_indexes[k]` and its output is
  added to the hidden states after LM layer k (transformers 5.25, `_deepstack_process`); structlora's
  bridges only join the deepest layer of one tower to the shallowest of the next, so each deepstack
  merger is a connector chain of its own, bridged exactly like the main merger (deepest vision layer
  in, first LM layer out).
- connector modules of unequal length: only those reaching the deepest connector depth bridge to the LM.
- a fused qkv (Qwen-VL vision) is adapted as one linear, role qkv (its update covers the q, k and v rows;
  structlora's `fused` / `slices` could adapt row slices, as towers.py does for timm, but not here).
  A role list asking for q, k or v also selects a tower's fused qkv where that tower has no separate q/k/v.
- a connector without any nn.Linear (Gemma 3's bare `mm_input_projection_weight`) is left unadapted, with a
  note; the library then bridges the vision tower straight to the language model.
- dead linears (no gradient on one batch, `families.dead_linears`) are excluded, with a note.
- a tower linear outside the layer list (none in the tiny builds) gets depth -1 before it, n after it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipeline.models.families import (
    TOWERS,
    LinearInfo,
    connector_groups,
    connector_parts,
    layer_list,
    resolve_targets,
    tower_paths,
)
from pipeline.schema import AdapterConfig

CONNECTOR_TOWER = "projector"
LABELS = {"vision": "vision", "connector": CONNECTOR_TOWER, "language": "language"}  # table -> structlora
READS_STREAM = frozenset({"q", "k", "v", "qkv", "mlp_in", "mlp_gate"})
WRITES_STREAM = frozenset({"out", "mlp_out"})
_QKV = ("q", "k", "v")
_STRUCTURAL_KEYS = ("rank", "alpha", "dropout", "targets")  # as towers.structlora_config_for


@dataclass
class FamilyTargets:
    """What `structlora_targets` found.

    Attributes:
        targets: `structlora.TargetConfig` field dicts (what towers.tower_targets returns for LLaVA).
        names: full names of the adapted linears, table order (the PEFT baselines' target list).
        counts: adapted linears per table tower (vision, connector, language).
        excluded: table linears left out because `exclude` named them (dead layers).
        notes: what was approximated or left unadapted, in words.
    """

    targets: list[dict[str, Any]]
    names: list[str]
    counts: dict[str, int]
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def stream_widths(table: Sequence[LinearInfo]) -> dict[str, int]:
    """{tower: residual-stream width}: the commonest input width of the roles that read the stream
    (else the commonest output width of those that write it)."""
    out: dict[str, int] = {}
    for tower in ("vision", "language"):
        widths = Counter(r.in_features for r in table if r.tower == tower and r.role in READS_STREAM) or \
            Counter(r.out_features for r in table if r.tower == tower and r.role in WRITES_STREAM)
        if widths:
            out[tower] = widths.most_common(1)[0][0]
    return out


def _selected(table: Sequence[LinearInfo], targets: str | Sequence[str], towers: Sequence[str],
              notes: list[str]) -> set[str]:
    """Names `targets` selects in `towers`; every connector linear when the connector is adapted."""
    chosen = set(resolve_targets(table, targets, towers=[t for t in TOWERS if t in towers]))
    asked = {r.role for r in table if r.name in chosen and r.role in _QKV}
    if asked and not isinstance(targets, str) and "all-linear" not in targets:
        for tower in ("vision", "language"):
            rows = [r for r in table if r.tower == tower]
            fused = [r.name for r in rows if r.role == "qkv"]
            if tower in towers and fused and not any(r.role in _QKV for r in rows):
                chosen |= set(fused)
                notes.append(f"{tower}: targets ask for {sorted(asked)} but the attention is a fused qkv: "
                             f"its {len(fused)} qkv linears are adapted whole (k rows included)")
    if "connector" in towers:  # like towers.py's `projector: lora`, whatever the role list says
        chosen |= {r.name for r in table if r.tower == "connector"}
    return chosen


def _space(on: bool, width: int, stream: str, widths: dict[str, int]) -> str | None:
    return stream if on and widths.get(stream) == width else None


def _tower_targets(model: nn.Module, table: Sequence[LinearInfo], rows: list[LinearInfo], tower: str,
                   widths: dict[str, int], notes: list[str]) -> list[dict[str, Any]]:
    """Targets of one tower's adapted `rows`: one per (role, suffix, shape), depth from the layer list."""
    paths = tower_paths(model)
    skip = connector_parts(model, paths["vision"]) if tower == "vision" else ()
    lst = layer_list(model, paths[tower], skip=skip)
    everywhere = [r for r in table if r.tower == tower]
    groups: dict[tuple[str, str, int, int], list[int]] = {}
    loose: list[LinearInfo] = []
    for r in rows:
        prefix = f"{lst}.{r.depth}."
        if lst is None or r.depth is None or not r.name.startswith(prefix):
            loose.append(r)
            continue
        groups.setdefault((r.role, r.name[len(prefix):], r.in_features, r.out_features), []).append(r.depth)
    targets = []
    for (role, suffix, width_in, width_out), depths in groups.items():
        every = {r.depth for r in everywhere if r.depth is not None and r.name == f"{lst}.{r.depth}.{suffix}"}
        alternation = r"\d+" if set(depths) == every else "|".join(str(d) for d in sorted(set(depths)))
        targets.append({
            "tower": LABELS[tower], "kind": role,
            "pattern": rf"^{re.escape(lst)}\.({alternation})\.{re.escape(suffix)}$",
            "in_space": _space(role in READS_STREAM, width_in, tower, widths),
            "out_space": _space(role in WRITES_STREAM, width_out, tower, widths)})
    if loose:
        order = [r.name for r in table]
        listed = [r for r in everywhere if r.depth is not None]
        first = min((order.index(r.name) for r in listed), default=0)
        deepest = max((r.depth for r in listed), default=-1)
        for r in loose:
            depth = -1 if order.index(r.name) < first else deepest + 1
            targets.append({"tower": LABELS[tower], "kind": r.role, "pattern": rf"^{re.escape(r.name)}$",
                            "depth": depth, "in_space": _space(r.role in READS_STREAM, r.in_features, tower, widths),
                            "out_space": _space(r.role in WRITES_STREAM, r.out_features, tower, widths)})
        notes.append(f"{tower}: {len(loose)} linears outside the layer list, placed at depth -1 (before) or "
                     f"{deepest + 1} (after): {[r.name for r in loose]}")
    return targets


def _connector_targets(model: nn.Module, table: Sequence[LinearInfo], chosen: set[str], widths: dict[str, int],
                       notes: list[str]) -> list[dict[str, Any]]:
    """One target per adapted connector linear; consecutive linears of one connector module share a space."""
    rows = [r for r in table if r.tower == "connector"]
    if not rows:
        return []
    paths = tower_paths(model)
    groups = connector_groups(model, [r.name for r in rows], paths, connector_parts(model, paths["vision"]))
    members: dict[str, list[LinearInfo]] = {}
    for r, g in zip(rows, groups):
        members.setdefault(g, []).append(r)
    links = sum(len(m) - 1 for m in members.values())
    targets = []
    for group, chain in members.items():
        for i, r in enumerate(chain):
            link_in = link_out = None
            if i > 0 and chain[i - 1].out_features == r.in_features:
                link_in = CONNECTOR_TOWER if links == 1 else f"{CONNECTOR_TOWER}:{group}:{i - 1}"
            if i + 1 < len(chain) and r.out_features == chain[i + 1].in_features:
                link_out = CONNECTOR_TOWER if links == 1 else f"{CONNECTOR_TOWER}:{group}:{i}"
            if r.name not in chosen:
                continue
            targets.append({
                "tower": CONNECTOR_TOWER, "kind": group, "pattern": rf"^{re.escape(r.name)}$", "depth": i,
                "in_space": _space(True, r.in_features, "vision", widths) if i == 0 else link_in,
                "out_space": _space(True, r.out_features, "language", widths) if i + 1 == len(chain) else link_out})
    if len(members) > 1:
        notes.append(f"connector: {len(members)} parallel modules {list(members)}, each its own chain, all bridged "
                     "like the first (deepest vision layer -> depth 0, last linear -> first LM layer); approximated: "
                     "a deepstack merger reads an intermediate vision block and is added after LM layer k, "
                     "which structlora's tower-to-tower bridges cannot express")
    return targets


def _bare_connector_parameters(model: nn.Module) -> list[str]:
    """Matrices outside both towers and the lm_head: a connector built without nn.Linear."""
    prefixes = tuple(p + "." for p in tower_paths(model).values())
    head = model.get_output_embeddings()
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return [n for n, p in model.named_parameters()
            if p.dim() >= 2 and not n.startswith(prefixes) and id(p) not in skip | linear]


def structlora_targets(model: nn.Module, table: Sequence[LinearInfo], targets: str | Sequence[str] = "all-linear",
                       exclude: Sequence[str] = (), towers: Sequence[str] = TOWERS) -> FamilyTargets:
    """StructLoRA targets of `model` from its tower table (see the module docstring).

    Args:
        table: `families.layer_table(model)`.
        targets: "all-linear", a regex for whole names, or roles / name suffixes (`families.resolve_targets`).
        exclude: names left unadapted, e.g. `families.dead_linears(model, batch)` (no gradient: they would
            break DDP and AdaLoRA, as LLaVA's last CLIP layer does).
        towers: the table towers to adapt (vision, connector, language); the connector, when listed, is
            adapted whole whatever `targets` says, so that the graph has its bridge.
    """
    notes: list[str] = []
    chosen = _selected(table, targets, towers, notes)
    dead = [r for r in table if r.name in chosen and r.name in set(exclude)]
    if dead:
        where = Counter(f"{r.tower} depth {r.depth}" for r in dead)
        notes.append(f"{len(dead)} dead linears excluded (no gradient on a batch): "
                     + ", ".join(f"{k}: {n}" for k, n in where.items()))
    chosen -= {r.name for r in dead}
    adapted = [r for r in table if r.name in chosen]
    widths = stream_widths(table)
    out: list[dict[str, Any]] = []
    for tower in ("vision", "connector", "language"):
        if tower == "connector":
            out += _connector_targets(model, table, chosen, widths, notes)
        else:
            out += _tower_targets(model, table, [r for r in adapted if r.tower == tower], tower, widths, notes)
    fused = Counter(r.tower for r in adapted if r.role == "qkv")
    notes += [f"{t}: fused qkv adapted as one linear (role qkv) in {n} layers" for t, n in fused.items()]
    if "connector" in towers and not any(r.tower == "connector" for r in table):
        bare = _bare_connector_parameters(model)
        notes.append(f"connector has no nn.Linear (parameters {bare or 'none'}): left unadapted; the graph bridges "
                     "the deepest vision layer straight to the first language layer")
    counts = {t: sum(r.tower == t for r in adapted) for t in TOWERS}
    return FamilyTargets(targets=out, names=[r.name for r in adapted], counts=counts,
                         excluded=[r.name for r in dead], notes=notes)


def adapter_towers(adapter: AdapterConfig) -> list[str]:
    """Table towers an AdapterConfig adapts (parts configured `lora`; its `projector` is the connector)."""
    parts = {"vision": adapter.vision, "connector": adapter.projector, "language": adapter.language}
    return [t for t, part in parts.items() if part == "lora"]


def structlora_config(found: FamilyTargets, adapter: AdapterConfig, max_steps: int):
    """The StructLoRAConfig of a run, as towers.structlora_config_for builds it (rank, alpha and dropout
    from `adapter`, the rest from `adapter.structlora`; the gate anneals over `max_steps`), on `found`."""
    from pipeline.config import from_dict
    from structlora import StructLoRAConfig

    extra = dict(adapter.structlora)
    clash = [k for k in _STRUCTURAL_KEYS if k in extra]
    if clash:
        raise ValueError(f"adapter.structlora.{clash[0]}: set adapter.{clash[0]} instead (shared with the baselines)")
    if not found.targets:
        raise ValueError("adapter: no part is configured `lora`, so StructLoRA has nothing to adapt")
    gate = dict(extra.pop("gate", None) or {})
    gate.setdefault("anneal_steps", max(1, max_steps))
    data = {"rank": adapter.rank, "alpha": float(adapter.alpha), "dropout": float(adapter.dropout),
            "targets": found.targets, "gate": gate, **extra}
    return from_dict(StructLoRAConfig, data, source="adapter.structlora", prefix="adapter.structlora")


def structlora_config_for_family(model: nn.Module, table: Sequence[LinearInfo], adapter: AdapterConfig,
                                 max_steps: int, exclude: Sequence[str] = ()):
    """(StructLoRAConfig, FamilyTargets) for `adapter` (its targets, parts and options) on any family."""
    found = structlora_targets(model, table, adapter.targets, exclude, adapter_towers(adapter))
    return structlora_config(found, adapter, max_steps), found


def attach_structlora(model: nn.Module, table: Sequence[LinearInfo], rank: int = 4, alpha: float | None = None,
                      targets: str | Sequence[str] = "all-linear", exclude: Sequence[str] = (),
                      towers: Sequence[str] = TOWERS, max_steps: int = 1, seed: int = 0,
                      options: dict[str, Any] | None = None):
    """Adapt `model` in place with StructLoRA through `pipeline.stages.methods.attach_method` (seeded as the
    pipeline seeds it) and return the handle, a `structlora.StructLoRAModel`.

    Args:
        alpha: default 2 * rank (DESIGN.md: r = 8, alpha = 16).
        options: `adapter.structlora` (gate, coordinator, ablation, ...).
    """
    from pipeline.stages.methods import attach_method

    found = structlora_targets(model, table, targets, exclude, towers)
    adapter = AdapterConfig(method="structlora", rank=rank, alpha=float(alpha if alpha is not None else 2 * rank),
                            structlora=dict(options or {}))
    config = structlora_config(found, adapter, max_steps)
    return attach_method(model, adapter, found.names, [], max_steps, structlora_config=config, seed=seed).handle
