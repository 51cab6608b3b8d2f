"""StructLoRA: IB-gated low-rank adaptation coordinated by a graph over layers and towers.

Usable on its own, like a PEFT tuner: `apply_structlora(model, config)` adapts any torch
model whose linear layers the config's regexes name. Depends on torch and safetensors only
(peft is imported lazily, for `export_peft`).
"""

from structlora.config import PAPER_GATE, CoordinatorConfig, GateConfig, StructLoRAConfig, TargetConfig
from structlora.coordinator import GraphCoordinator, SketchBasis
from structlora.diagnostics import diagnostics, dirichlet_energy, drift_energy, scalar_diagnostics
from structlora.gate import RankGate
from structlora.graph import LayerGraph, Node
from structlora.inject import find_targets
from structlora.layer import StructLoRALinear, factor_sketch, update_factors
from structlora.model import StructLoRAModel, apply_structlora

__all__ = [
    "CoordinatorConfig",
    "GateConfig",
    "PAPER_GATE",
    "GraphCoordinator",
    "LayerGraph",
    "Node",
    "RankGate",
    "SketchBasis",
    "StructLoRAConfig",
    "StructLoRALinear",
    "StructLoRAModel",
    "TargetConfig",
    "apply_structlora",
    "diagnostics",
    "dirichlet_energy",
    "drift_energy",
    "factor_sketch",
    "find_targets",
    "scalar_diagnostics",
    "update_factors",
]
