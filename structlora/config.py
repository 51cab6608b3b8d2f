"""StructLoRA configuration: rank, targets (towers), IB gate, graph coordinator, ablations.

Every field documents itself through `metadata["help"]` and is checked in `__post_init__`.
The config is built from plain dicts (YAML) either by a typed loader or by
`StructLoRAConfig.from_dict`; `to_dict` gives the plain dict back (saved with the state).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

ABLATIONS = ("full", "no_ib", "no_coordinator", "lora")
EDGE_TYPES = ("depth", "bridge", "semantic")


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002 - PEFT's name
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_types(obj: Any) -> None:
    """Every field against its annotation (ints are accepted for floats and converted)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if not _conforms(value, tp):
            shown = str(tp).replace("typing.", "") if typing.get_origin(tp) else tp.__name__
            raise ValueError(f"{type(obj).__name__}.{f.name}: expected {shown}, got {type(value).__name__} {value!r}")
        if tp is float and isinstance(value, int):
            setattr(obj, f.name, float(value))


@dataclass
class TargetConfig:
    """Which linear layers of one tower to adapt, and where they sit (a timm-style group matcher).

    A module is a target when its full name matches `pattern` (re.fullmatch). The depth (layer
    index) is the pattern's group named `depth`, else its first group, else `depth`.
    """

    tower: str = _f(help="tower label (e.g. vision, projector, language); depth chains stay inside a tower")
    pattern: str = _f(help=r"regex fully matching module names, with a depth group, e.g. ^blocks\.(\d+)\.attn\.qkv$")
    kind: str | None = _f(None, "module kind for depth chains; default: group `kind`, else the name's last part")
    depth: int | None = _f(None, "depth of matched modules when the pattern has no group")
    max_depth: int | None = _f(None, "deepest layer adapted (inclusive), e.g. the CLIP layer LLaVA reads")
    in_space: str | None = _f(None, "representation space the module reads (a shared sketch basis, e.g. the "
                              "tower's residual stream); None: a basis of its own (coordinator.bases streams)")
    out_space: str | None = _f(None, "representation space the module writes; None: a basis of its own")
    fused: list[str] = _f(help="names of equal row chunks of a fused output, e.g. [q, k, v] for timm attn.qkv",
                          factory=list)
    slices: list[str] = _f(help="chunks of `fused` to adapt, e.g. [q, v]; each is its own graph node", factory=list)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(bool(self.tower), "target.tower: give a non-empty tower label")
        _check(isinstance(self.pattern, str) and bool(self.pattern), f"target {self.tower}: empty pattern")
        try:
            compiled = re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"target {self.tower}: pattern {self.pattern!r} is not a regex ({err})") from None
        has_depth = "depth" in compiled.groupindex or compiled.groups >= 1
        _check(has_depth or self.depth is not None,
               f"target {self.tower}: pattern {self.pattern!r} has no depth group: add (\\d+) or set `depth`")
        _check(self.max_depth is None or self.max_depth >= 0, f"target {self.tower}: max_depth must be >= 0")
        _check(len(set(self.fused)) == len(self.fused), f"target {self.tower}: fused chunk names repeat")
        _check(bool(self.fused) == bool(self.slices),
               f"target {self.tower}: give both `fused` (chunk names) and `slices` (chunks to adapt), or neither")
        unknown = [s for s in self.slices if s not in self.fused]
        _check(not unknown, f"target {self.tower}: slices {unknown} are not among fused chunks {self.fused}")

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


# The gate as DESIGN.md 3.1 first specified it, and as study v2's `structlora_paper` arm trains it: a
# relaxed-Bernoulli mask drawn once per optimizer step for the whole batch, KL to Bernoulli(0.1).
# Study v2 measured it worse than the default (BENCHMARKS.md); it stays for ablations:
# `GateConfig(**PAPER_GATE)`.
PAPER_GATE: types.MappingProxyType = types.MappingProxyType(
    {"sampling": "step", "penalty": "kl", "prior": 0.1, "lambda_ib": 1e-3, "init_prob": 0.9, "hard_concrete": False})


@dataclass
class GateConfig:
    """The information-bottleneck rank gate of DESIGN.md 3.1.

    The defaults are study v2's choice on validation loss (BENCHMARKS.md): deterministic gates (training
    computes the function that eval and merge compute), hard-concrete so that directions reach exact
    zeros, initialised saturated (gate = 1: training starts as LoRA does), and the expected-L0 penalty
    at 1e-3, chosen together with a gate learning rate of 10x the factors' (the "gate" parameter group
    of `trainable_parameter_groups`; the pipeline's `train.lr_gate` default). At the factors' rate the
    same weight prunes nothing in 1,200 steps. `PAPER_GATE` is the gate as first specified.
    """

    enabled: bool = _f(True, "learn one gate per rank direction (off: plain LoRA directions)")
    sampling: Literal["step", "example", "none"] = _f(
        "none", "training mask: step = one relaxed-Bernoulli sample per optimizer step shared by the whole batch "
        "(the gate as first built, PAPER_GATE); example = one sample per example; none = the deterministic (pruned) "
        "gate, so that training computes the function that eval and merge compute")
    penalty: Literal["kl", "l0"] = _f(
        "l0", "IB term per direction: kl = KL(Bernoulli(sigmoid(phi)) || Bernoulli(prior)), minimised at "
        "sigmoid(phi) = prior (prunes only if prior < prune_threshold); l0 = the hard-concrete expected L0 norm "
        "P(gate != 0) (Louizos et al. 2018), a pull towards exact zeros (use with hard_concrete)")
    prior: float = _f(0.1, "Bernoulli prior pi of the KL penalty: the compression pull on every gate")
    lambda_ib: float = _f(1e-3, "weight of the IB regulariser added to the task loss (chosen with the gate "
                                 "logits at 10x the factors' learning rate)")
    init_prob: float = _f(0.95, "initial gate probability sigmoid(phi)")
    temperature_start: float = _f(1.0, "relaxed-Bernoulli temperature at step 0")
    temperature_end: float = _f(0.1, "temperature after `anneal_steps`")
    anneal_steps: int = _f(1000, "steps over which the temperature is annealed (the pipeline uses max_steps)")
    schedule: Literal["exponential", "linear"] = _f("exponential", "temperature schedule shape")
    hard_concrete: bool = _f(True, "stretch to (low, high) and clamp to [0, 1] so that exact zeros occur")
    stretch_low: float = _f(-0.1, "hard-concrete stretch lower end (gamma < 0)")
    stretch_high: float = _f(1.1, "hard-concrete stretch upper end (zeta > 1)")
    prune_threshold: float = _f(0.05, "eval and merge drop directions whose deterministic gate is below this")

    def __post_init__(self) -> None:
        _check_types(self)
        _check(0.0 < self.prior < 1.0, f"gate.prior must be in (0, 1), got {self.prior}")
        _check(0.0 < self.init_prob < 1.0, f"gate.init_prob must be in (0, 1), got {self.init_prob}")
        _check(self.lambda_ib >= 0.0, f"gate.lambda_ib must be >= 0, got {self.lambda_ib}")
        _check(self.temperature_start > 0 and self.temperature_end > 0,
               f"gate temperatures must be > 0, got {self.temperature_start} -> {self.temperature_end}")
        _check(self.anneal_steps >= 1, f"gate.anneal_steps must be >= 1, got {self.anneal_steps}")
        _check(self.stretch_low < 0.0 and self.stretch_high > 1.0,
               f"gate stretch must satisfy low < 0 < 1 < high, got ({self.stretch_low}, {self.stretch_high})")
        _check(0.0 <= self.prune_threshold < 1.0, f"gate.prune_threshold must be in [0, 1), got {self.prune_threshold}")


@dataclass
class CoordinatorConfig:
    """The graph coordinator of DESIGN.md 3.2 (training only; folded into the update at merge)."""

    enabled: bool = _f(True, "pass messages between adapted modules (off: independent modules)")
    edges: Literal["depth", "semantic", "hybrid"] = _f(
        "hybrid", "depth = depth chains (+ bridges); semantic = gradient-similarity top-k; hybrid = both")
    bridge_edges: bool = _f(True, "join the towers: last vision layer <-> projector <-> first LM layer")
    bridge_chain: list[str] = _f(help="tower order for bridges; empty = order of first appearance in targets",
                                 factory=list)
    top_k: int = _f(2, "semantic neighbours per node")
    refresh_every: int = _f(50, "steps between semantic-edge refreshes (gradient sketches are taken then only)")
    similarity_threshold: float = _f(0.1, "minimum cosine of EMA gradient sketches for a semantic edge")
    ema_decay: float = _f(0.9, "EMA decay of gradient sketches across refreshes")
    sketch_dim: int = _f(8, "p: side of the p x p sketch of each module's update")
    bases: Literal["streams", "width"] = _f(
        "streams", "sketch coordinates: streams = shared only by sides that live in one named space (a tower's "
        "residual stream, the projector bridge), every other side (attention heads, MLP neurons) gets a basis of "
        "its own; width = one basis per width for every side (the paper's variant, as first built)")
    seed: int = _f(0, "seed of the fixed random projections P_S (one per representation space)")
    gnn_layers: int = _f(1, "message-passing layers T (2-3 over-smooth)")
    gnn: Literal["gcn", "gat", "smoother"] = _f(
        "gcn", "residual GCN (symmetric normalisation), GAT attention weights, or smoother: the paper's Theorem-1 "
        "step h <- h - eta_e (I - A_e) h over the structural edges, one learnable eta per edge type and layer")
    activation: Literal["tanh", "identity", "gelu"] = _f("tanh", "nonlinearity of each layer (must map 0 to 0)")
    theta_init_std: float = _f(0.0, "init std of the transforms Theta; 0 = zero-init (training starts as plain LoRA)")

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.top_k >= 1, f"coordinator.top_k must be >= 1, got {self.top_k}")
        _check(self.refresh_every >= 1, f"coordinator.refresh_every must be >= 1, got {self.refresh_every}")
        _check(-1.0 <= self.similarity_threshold <= 1.0,
               f"coordinator.similarity_threshold must be a cosine in [-1, 1], got {self.similarity_threshold}")
        _check(0.0 <= self.ema_decay < 1.0, f"coordinator.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.sketch_dim >= 1, f"coordinator.sketch_dim must be >= 1, got {self.sketch_dim}")
        _check(1 <= self.gnn_layers <= 3, f"coordinator.gnn_layers must be 1, 2 or 3, got {self.gnn_layers}")
        _check(self.theta_init_std >= 0.0, f"coordinator.theta_init_std must be >= 0, got {self.theta_init_std}")

    def edge_types(self) -> tuple[str, ...]:
        """Edge types with their own transform Theta under this config."""
        structural = ("depth", "bridge") if self.bridge_edges else ("depth",)
        return {"depth": structural, "semantic": ("semantic",), "hybrid": (*structural, "semantic")}[self.edges]


@dataclass
class SelectionConfig:
    """Hard rank selection at one step (the paper's "IB gate vs random masking vs top-k norm").

    At `at_step` each node keeps its `keep` share of directions, chosen by the criterion; the
    others are zeroed in A and B and stay zero for the rest of training.
    """

    criterion: Literal["none", "gate", "random", "norm"] = _f(
        "none", "none = no hard selection; gate = highest sigmoid(phi) (needs the IB gate); random = a seeded "
        "random subset; norm = largest ||B[:, j]|| ||A[j, :]||")
    keep: float = _f(0.5, "share of the r directions each node keeps (at least one)")
    at_step: int | None = _f(None, "optimizer step of the selection; None = half the gate's anneal_steps")
    seed: int = _f(0, "seed of the random criterion")

    def __post_init__(self) -> None:
        _check_types(self)
        _check(0.0 < self.keep <= 1.0, f"selection.keep must be in (0, 1], got {self.keep}")
        _check(self.at_step is None or self.at_step >= 1, f"selection.at_step must be >= 1, got {self.at_step}")


@dataclass
class PenaltyConfig:
    """Static coordination baselines (paper appendix C): a fixed penalty along depth edges.

    cosine: weight * mean over depth edges of (1 - cos(vec dW_a, vec dW_b));
    laplacian: weight * mean over depth edges of ||dW_a - dW_b||_F^2 (a graph-Laplacian smoothness term).
    Both are computed from the factors, in O(r^2 (in + out)) per edge, without forming dW.
    """

    kind: Literal["none", "cosine", "laplacian"] = _f("none", "which penalty (none = off)")
    weight: float = _f(0.0, "its weight in the loss")

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.weight >= 0.0, f"penalty.weight must be >= 0, got {self.weight}")


@dataclass
class StructLoRAConfig:
    """StructLoRA: IB-gated low-rank updates coordinated by a graph over layers and towers.

    Ablations of the paper are one key: `ablation: full | no_ib | no_coordinator | lora`.
    """

    targets: list[TargetConfig] = _f(help="which modules to adapt, tower by tower (at least one)", factory=list)
    rank: int = _f(8, "rank r of every adapted module")
    alpha: float = _f(16.0, "scale numerator: s = alpha / r")
    dropout: float = _f(0.0, "dropout on the adapter input (training only)")
    gate: GateConfig = _f(help="IB rank gate", factory=GateConfig)
    coordinator: CoordinatorConfig = _f(help="graph coordinator", factory=CoordinatorConfig)
    ablation: Literal["full", "no_ib", "no_coordinator", "lora"] = _f(
        "full", "full = as configured; no_ib = gates off; no_coordinator = coordinator off; lora = both off")
    selection: SelectionConfig = _f(help="hard rank selection during training (an ablation)", factory=SelectionConfig)
    penalty: PenaltyConfig = _f(help="static depth penalty (a baseline; use with ablation lora)", factory=PenaltyConfig)

    def __post_init__(self) -> None:
        self.gate = _nested(GateConfig, self.gate, "gate")
        self.coordinator = _nested(CoordinatorConfig, self.coordinator, "coordinator")
        self.selection = _nested(SelectionConfig, self.selection, "selection")
        self.penalty = _nested(PenaltyConfig, self.penalty, "penalty")
        if not isinstance(self.targets, list):
            raise ValueError(f"targets: expected a list of targets, got {type(self.targets).__name__}")
        self.targets = [_nested(TargetConfig, t, f"targets[{i}]") for i, t in enumerate(self.targets)]
        _check_types(self)
        _check(len(self.targets) > 0, "targets: give at least one target (tower, pattern)")
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.ablation in ABLATIONS, f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.ablation in ("no_ib", "lora"):
            self.gate.enabled = False
        if self.ablation in ("no_coordinator", "lora"):
            self.coordinator.enabled = False
        _check(self.penalty.kind == "none" or not (self.gate.enabled or self.coordinator.enabled),
               f"penalty {self.penalty.kind!r} is a static baseline on plain LoRA factors (it ignores gates and "
               "messages): use it with ablation 'lora'")
        _check(self.selection.criterion != "gate" or self.gate.enabled,
               "selection.criterion 'gate' ranks directions by their IB gate: enable the gate (ablation full/no_coordinator)")
        towers = list(dict.fromkeys(t.tower for t in self.targets))
        unknown = [t for t in self.coordinator.bridge_chain if t not in towers]
        _check(not unknown, f"coordinator.bridge_chain names towers {unknown} that no target defines ({towers})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tower_order(self) -> list[str]:
        """Towers in the order the bridges follow."""
        if self.coordinator.bridge_chain:
            return list(self.coordinator.bridge_chain)
        return list(dict.fromkeys(t.tower for t in self.targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructLoRAConfig:
        """Build from a plain dict (e.g. YAML), naming any unknown key."""
        return _nested(cls, data, "structlora")


def _nested(cls: type, value: Any, where: str) -> Any:
    """`value` as a `cls` instance: kept if it is one, built from a dict with unknown keys named."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(value).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"{where}: unknown key '{unknown[0]}'{hint}; known keys: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value]
    if missing:
        raise ValueError(f"{where}: missing required key '{missing[0]}'")
    return cls(**value)
