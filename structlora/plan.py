"""The per-forward plan, batched: gate masks of all nodes and the sketches H that feed the coordinator.

Both are computed for all nodes in a few batched ops (one gate sample for the stacked logits,
one batched product per group of same-shaped nodes), so that the method's overhead per step
does not grow with the number of small ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from structlora.gate import deterministic_gate, relaxed_bernoulli
from structlora.graph import Node
from structlora.layer import StructLoRALinear


def sketch_groups(nodes: list[Node]) -> list[list[int]]:
    """Node indices grouped by widths: the sketches of a group are one batched product (each member
    with its own projections, which differ where a side has a basis of its own)."""
    groups: dict[tuple, list[int]] = {}
    for i, n in enumerate(nodes):
        groups.setdefault((n.in_features, n.out_features), []).append(i)
    return list(groups.values())


def _stacked(layers: dict[str, StructLoRALinear], nodes: list[Node], members: list[int]) -> tuple:
    """(P_in, P_out) of a group: one shared (in x p, out x p) pair, or stacked (G, in, p), (G, out, p)."""
    pairs = [layers[nodes[i].module].projections(nodes[i].slice) for i in members]
    first = nodes[members[0]]
    if all(nodes[i].in_space == first.in_space and nodes[i].out_space == first.out_space for i in members):
        return pairs[0]
    return torch.stack([p for p, _ in pairs]), torch.stack([q for _, q in pairs])


def gate_masks(layers: dict[str, StructLoRALinear], nodes: list[Node], training: bool | None,
               noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
    """(N, r) gate masks of all nodes (float32), or None when gates are off.

    Training with `sampling` step: one relaxed-Bernoulli sample (`noise(logits)` supplies its
    uniform draw, e.g. one per optimizer step; default a fresh draw). With `sampling` example the
    layers draw their own per-example masks: this returns the gates' mean value (unpruned), which
    only feeds the coordinator's sketches. Otherwise (eval, or `sampling` none) the pruned
    deterministic gate. `training` None follows the gates' mode.
    """
    gates = [layers[n.module].gates for n in nodes]
    if gates[0] is None:
        return None
    first = gates[0][nodes[0].slice]
    logits = torch.stack([g[n.slice].logits for g, n in zip(gates, nodes)]).float()
    cfg = first.cfg
    if first.training if training is None else training:
        if cfg.sampling == "step":
            u = noise(logits) if noise is not None else None
            return relaxed_bernoulli(logits, first.tau, cfg.hard_concrete, first.stretch, u=u)
        if cfg.sampling == "example":
            return deterministic_gate(logits, cfg.hard_concrete, first.stretch)
    return deterministic_gate(logits, cfg.hard_concrete, first.stretch, cfg.prune_threshold)


def node_sketches(layers: dict[str, StructLoRALinear], nodes: list[Node], groups: list[list[int]],
                  masks: torch.Tensor | None) -> torch.Tensor:
    """(N, p, p) sketches H_l = s (P_out^T B_l) diag(m_l) (A_l P_in), in node order."""
    blocks, order = [], []
    for members in groups:
        layer = layers[nodes[members[0]].module]
        p_in, p_out = _stacked(layers, nodes, members)
        # float32 whatever the factors' dtype (a module-wide bf16 cast, as DeepSpeed does): p is small
        A = torch.stack([layers[nodes[i].module].lora_A[nodes[i].slice] for i in members]).float()
        B = torch.stack([layers[nodes[i].module].lora_B[nodes[i].slice] for i in members]).float()
        left = p_out.transpose(-1, -2) @ B
        if masks is not None:
            left = left * masks[members][:, None, :]
        blocks.append(layer.scale * (left @ (A @ p_in)))
        order += members
    stacked = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return stacked if inverse == list(range(len(order))) else stacked[inverse]
