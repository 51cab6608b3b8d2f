"""Ablations and baselines that live on StructLoRA's layers and graph.

- Hard rank selection (the paper's "IB gate vs random masking vs top-k norm"): at one step every
  node keeps a fixed share of its r directions, ranked by the gate, at random, or by the norm
  of the direction's rank-one update ||B[:, j]|| ||A[j, :]||; the others are zeroed in A and B
  and re-zeroed after every later optimizer step, so they stay dead.
- Static coordination (paper appendix C): a fixed penalty along the depth edges that couples
  adjacent layers without a learned coordinator: cosine (pull vec dW_l towards its neighbours'
  direction) or Laplacian (pull dW_l towards its neighbours, sum ||dW_a - dW_b||^2).
"""

from __future__ import annotations

import torch

from structlora.config import PenaltyConfig, SelectionConfig


def _node_tensors(model, node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    layer = model.layers[node.module]
    gates = layer.gates[node.slice] if layer.gates is not None else None
    return layer.lora_A[node.slice], layer.lora_B[node.slice], gates


@torch.no_grad()
def direction_scores(model, criterion: str, seed: int = 0) -> list[torch.Tensor]:
    """Per node, a score for each of its r directions (higher = keep)."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for node in model.nodes:
        A, B, gate = _node_tensors(model, node)
        if criterion == "gate":
            if gate is None:
                raise ValueError("selection by gate needs the IB gate (gate.enabled)")
            scores.append(torch.sigmoid(gate.logits.detach().float()).cpu())
        elif criterion == "norm":
            scores.append((B.detach().float().norm(dim=0) * A.detach().float().norm(dim=1)).cpu())
        elif criterion == "random":
            scores.append(torch.rand(A.shape[0], generator=generator))
        else:
            raise ValueError(f"unknown selection criterion {criterion!r}")
    return scores


def keep_masks(scores: list[torch.Tensor], keep: float) -> list[torch.Tensor]:
    """Boolean (r,) per node: its top max(1, round(keep * r)) directions (ties: lower index first)."""
    masks = []
    for s in scores:
        k = max(1, int(round(keep * s.numel())))
        order = sorted(range(s.numel()), key=lambda j: (-float(s[j]), j))
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        masks.append(mask)
    return masks


class RankSelection:
    """Applies `SelectionConfig` to a StructLoRAModel: select once, then keep the dropped directions at zero."""

    def __init__(self, cfg: SelectionConfig, anneal_steps: int):
        self.cfg = cfg
        self.at_step = cfg.at_step if cfg.at_step is not None else max(1, anneal_steps // 2)
        self.masks: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.cfg.criterion != "none"

    def step(self, model, global_step: int) -> None:
        if not self.active:
            return
        if self.masks is None and global_step >= self.at_step:
            self.masks = keep_masks(direction_scores(model, self.cfg.criterion, self.cfg.seed), self.cfg.keep)
        if self.masks is not None:
            self.apply(model)

    @torch.no_grad()
    def apply(self, model) -> None:
        for node, mask in zip(model.nodes, self.masks):
            A, B, gate = _node_tensors(model, node)
            dead = ~mask.to(A.device)
            A[dead] = 0.0
            B[:, dead] = 0.0
            if gate is not None:  # so that pruning (eval, merge, kept-rank diagnostics) drops them too
                gate.logits[dead] = -30.0

    def state_dict(self) -> dict:
        return {"masks": None if self.masks is None else [m.tolist() for m in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks")
        self.masks = None if masks is None else [torch.tensor(m, dtype=torch.bool) for m in masks]


def _inner(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """<B_a A_a, B_b A_b>_F = sum((B_a^T B_b) * (A_a A_b^T)), without forming either product."""
    (Ba, Aa), (Bb, Ab) = a, b
    return ((Ba.T @ Bb) * (Aa @ Ab.T)).sum()


def static_penalty(model, cfg: PenaltyConfig) -> torch.Tensor | None:
    """The weighted penalty over the depth edges between same-shaped updates (None when off or none)."""
    if cfg.kind == "none" or cfg.weight == 0.0:
        return None
    nodes = model.nodes
    edges = [(a, b) for a, b in model.graph.structural_depth_edges()  # a projector's two linears differ in shape
             if (nodes[a].in_features, nodes[a].out_features) == (nodes[b].in_features, nodes[b].out_features)]
    if not edges:
        return None
    factors = {}
    for i in sorted({i for e in edges for i in e}):
        A, B, _ = _node_tensors(model, model.nodes[i])
        factors[i] = (model.layers[model.nodes[i].module].scale * B, A)
    sq = {i: _inner(f, f) for i, f in factors.items()}
    terms = []
    for a, b in edges:
        cross = _inner(factors[a], factors[b])
        if cfg.kind == "laplacian":
            terms.append(sq[a] + sq[b] - 2.0 * cross)
        else:
            denom = torch.sqrt(sq[a] * sq[b] + 1e-12)
            terms.append(1.0 - cross / denom)
    return cfg.weight * torch.stack(terms).mean()
