"""Diagnostics of the learned updates (paper appendix E/J) as plain dicts and tensors.

u_l = vec(dW_l) of each node's final update (eval gates, pruning, coordinator branch). On
small models u_l is exact; on large ones it is a two-sided Gaussian sketch R_out^T dW R_in
(entries N(0, 1/q)), computed from the factors, whose inner products match those of vec(dW)
in expectation. Plots are drawn elsewhere (eval/plots.py) from these numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from structlora.coordinator import projection
from structlora.graph import Edge

EXACT_LIMIT = 1 << 20  # dW with more entries than this is sketched when `exact` is None
SKETCH_SIZE = 32


def drift_energy(vectors: list[torch.Tensor], edges: list[Edge]) -> float:
    """E = sum over edges ||u_a - u_b||^2."""
    return float(sum(((vectors[a] - vectors[b]) ** 2).sum() for a, b in edges))


def _comparable(vectors: list[torch.Tensor], chain: list[int]) -> list[Edge]:
    """Consecutive pairs of a chain whose updates have the same shape (a projector's two linears differ)."""
    return [(a, b) for a, b in zip(chain, chain[1:]) if vectors[a].shape == vectors[b].shape]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def dirichlet_energy(features: torch.Tensor, edges: list[Edge], normalized: bool = False) -> float:
    """sum over edges ||x_a - x_b||^2 of node features (N, ...); `normalized` divides by ||X||^2.

    The normalized form (a Rayleigh quotient) measures smoothness independent of scale:
    it is what repeated message passing drives to its minimum (over-smoothing).
    """
    flat = features.reshape(features.shape[0], -1).double()
    energy = drift_energy(list(flat), edges)
    return energy / float((flat**2).sum()) if normalized else energy


@functools.lru_cache(maxsize=512)
def _diag_projection(dim: int, size: int, seed: int, space: str) -> torch.Tensor:
    """The sketch projections, drawn once per process: logging diagnostics every few steps of a 7B run
    would otherwise regenerate a few hundred Gaussian matrices on rank 0 while the other ranks wait."""
    return projection(dim, size, seed, space)


@torch.no_grad()
def update_vectors(model, exact: bool | None = None, sketch_size: int = SKETCH_SIZE,
                   seed: int = 0) -> tuple[list[torch.Tensor], bool]:
    """(u_l per node, whether exact). `exact` None: exact when every dW has <= EXACT_LIMIT entries."""
    factors = model.node_factors()
    if exact is None:
        exact = all(B.shape[0] * A.shape[1] <= EXACT_LIMIT for B, A in factors)
    vectors = []
    for node, (B, A) in zip(model.nodes, factors):
        if exact:
            vectors.append((B.double() @ A.double()).flatten())
            continue
        r_out = _diag_projection(B.shape[0], sketch_size, seed, f"diag:{node.out_space}").to(B)
        r_in = _diag_projection(A.shape[1], sketch_size, seed, f"diag:{node.in_space}").to(A)
        vectors.append(((r_out.T @ B) @ (A @ r_in)).double().flatten())
    return vectors, exact


def kept_rank(model) -> dict[str, int]:
    """Directions per node that survive pruning (r when gates are off)."""
    out = {}
    for node in model.nodes:
        gates = model.layers[node.module].gates
        out[node.name] = int(gates[node.slice].kept().sum()) if gates is not None else model.config.rank
    return out


@torch.no_grad()
def gate_values(model) -> dict[str, list[float]] | None:
    """Deterministic gate values sigmoid(phi) (before pruning) per tower, or None when gates are off."""
    values: dict[str, list[float]] = {}
    for node in model.nodes:
        gates = model.layers[node.module].gates
        if gates is None:
            return None
        values.setdefault(node.tower, []).extend(torch.sigmoid(gates[node.slice].logits).tolist())
    return values


@torch.no_grad()
def message_share(model) -> dict[str, float] | None:
    """Per node ||P_out M P_in^T||_F / ||s B diag(m) A||_F under the eval plan: the coordinator's
    message against the gated LoRA part of the same update (None without the coordinator)."""
    if model.coordinator is None:
        return None
    plans = model.compute_plans(training=False)
    shares = {}
    for node in model.nodes:
        layer = model.layers[node.module]
        mask, delta = plans[node.module][node.slice]
        A, B = layer.lora_A[node.slice].double(), layer.lora_B[node.slice].double() * layer.scale
        if mask is not None:
            B = B * mask.double()
        lora = float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())
        p_in, p_out = (p.double() for p in layer.projections(node.slice))
        M = delta.double()
        message = float(torch.trace(M.T @ (p_out.T @ p_out) @ M @ (p_in.T @ p_in)).clamp_min(0).sqrt())
        shares[node.name] = message / lora if lora > 0 else 0.0
    return shares


def diagnostics(model, exact: bool | None = None) -> dict[str, Any]:
    """Everything the report plots: adjacent cosine and drift energy per depth chain, kept ranks, gates."""
    vectors, is_exact = update_vectors(model, exact)
    chains = model.graph.chains()
    pairs = {c: edges for c, ix in chains.items() if (edges := _comparable(vectors, ix))}
    cos = {c: [cosine(vectors[a], vectors[b]) for a, b in edges] for c, edges in pairs.items()}
    energy = {c: drift_energy(vectors, edges) for c, edges in pairs.items()}
    return {
        "adjacent_cosine": cos,
        "drift_energy": energy,
        "drift_energy_total": float(sum(energy.values())),
        # scale-free: sum over edges ||u_a - u_b||^2 / sum over nodes ||u||^2 (updates that shrink score the same)
        "drift_energy_normalized": _normalized(float(sum(energy.values())), vectors),
        "update_norm": {n.name: float(v.norm()) for n, v in zip(model.nodes, vectors)},
        "kept_rank": kept_rank(model),
        "message_share": message_share(model),
        "gates": gate_values(model),
        "threshold": model.config.gate.prune_threshold if model.config.gate.enabled else None,
        "exact": is_exact,
        "edges": model.graph.named_edges(),
        "temperature": model.temperature,
        "step": model.global_step,
    }


def _normalized(energy: float, vectors: list[torch.Tensor]) -> float:
    total = float(sum((v.double() ** 2).sum() for v in vectors))
    return energy / total if total > 0 else 0.0


def scalar_diagnostics(model) -> dict[str, float]:
    """A few numbers to log during training."""
    diag = diagnostics(model)
    cosines = [c for values in diag["adjacent_cosine"].values() for c in values]
    kept = list(diag["kept_rank"].values())
    out = {
        "drift_energy": diag["drift_energy_total"],
        "drift_energy_normalized": diag["drift_energy_normalized"],
        "adjacent_cosine_mean": sum(cosines) / len(cosines) if cosines else 0.0,
        "kept_rank_mean": sum(kept) / len(kept),
        "semantic_edges": float(len(model.graph.edges.get("semantic", []))),
    }
    if diag["message_share"]:
        shares = list(diag["message_share"].values())
        out["message_share_mean"] = sum(shares) / len(shares)
    if diag["gates"] is not None:
        flat = [g for values in diag["gates"].values() for g in values]
        out["gate_mean"] = sum(flat) / len(flat)
        out["temperature"] = model.temperature
    return out
