"""The graph coordinator: message passing over sketches of the modules' updates (DESIGN.md 3.2).

Node features are p x p sketches H_l = P_out^T dW_l P_in in a fixed random basis shared by
every module that reads or writes the same representation space. A residual GNN

    h <- h + act( sum over edge types e of  A_e h Theta_e  +  h Theta_self ),   h_0 = vec(H)

(A_e = D^-1/2 (Adj_e + I) D^-1/2 for GCN, attention weights for GAT) runs for T layers and
returns M_l = h_T,l - H_l, which each layer decodes as the low-rank branch P_out M_l P_in^T.
The transforms start at zero, so training starts as gated LoRA. Theta_self (the R-GCN
self-connection) lets a layer express Laplacian smoothing h - eta (I - A) h exactly; `gnn:
smoother` is that step alone (the paper's Theorem 1), with a learnable eta per edge type.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from structlora.config import CoordinatorConfig
from structlora.graph import LayerGraph, normalized_adjacency, semantic_edges

_ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x, "gelu": F.gelu}
COORDINATOR_NAME = "structlora_coordinator"  # its attribute on the backbone that hosts it


def projection(dim: int, p: int, seed: int, space: str) -> torch.Tensor:
    """Fixed Gaussian projection (dim x p), entries N(0, 1/p), seeded by (seed, space name).

    A Johnson-Lindenstrauss sketch: ||P^T x|| ~ ||x||. Used where norms must be preserved
    (sketched diagnostics of large models)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(space.encode())) % (2**63 - 1))
    return torch.randn(dim, p, generator=generator) / math.sqrt(p)


def orthonormal_projection(dim: int, p: int, seed: int, space: str) -> torch.Tensor:
    """The coordinator's basis P_S (dim x p): the same seeded Gaussian, orthonormalised (P^T P = I).

    Why not the plain 1/sqrt(p)-scaled Gaussian: then P^T P ~ (dim/p) I, so decoding a message
    M back to parameter space, P_out M P_in^T, multiplies its norm by about dim/p (16 for the tiny
    preset, 512 for a 4096-wide LLaVA with p=8), and a saturated message swamps W0. With
    orthonormal columns, sketch and decode are a projection pair: ||P_out M P_in^T||_F = ||M||_F
    and sketching the decoded message gives M back exactly.
    """
    gaussian = projection(dim, p, seed, space)
    if dim < p:  # fewer dimensions than sketch coordinates: orthonormal rows instead
        q, r = torch.linalg.qr(gaussian.T)
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).contiguous()  # sign fix: a unique, seeded basis


class FixedDtypeBuffers(nn.Module):
    """A module whose buffers follow device moves but never dtype casts.

    `model.to(torch.bfloat16)`, `.half()` and DeepSpeed's bf16/fp16 engines cast every floating
    buffer of a model; the sketch bases and the EMA sketches must stay exact float32 (a rounded
    basis changes every message, and a resumed run would no longer match its checkpoint).
    """

    def _apply(self, fn, recurse: bool = True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


class SketchBasis(FixedDtypeBuffers):
    """One fixed projection per representation space, kept as (non-persistent) buffers.

    Args:
        dims: {space name: width}.
        p: sketch size.
        seed: seed of every projection (each space also mixes in its name).
    """

    def __init__(self, dims: dict[str, int], p: int, seed: int):
        super().__init__()
        self.p, self.seed = p, seed
        self.dims = dict(dims)
        self._buffer_names = {space: f"P_{i}" for i, space in enumerate(sorted(dims))}
        for space, buffer in self._buffer_names.items():
            self.register_buffer(buffer, orthonormal_projection(dims[space], p, seed, space), persistent=False)

    def __getitem__(self, space: str) -> torch.Tensor:
        return getattr(self, self._buffer_names[space])

    def spaces(self) -> list[str]:
        return list(self._buffer_names)

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, spaces={self.dims}"


class GraphCoordinator(FixedDtypeBuffers):
    """Residual GCN / GAT over the layer graph, plus the EMA of gradient sketches.

    Args:
        graph: the layer graph (its semantic edges are refreshed from the EMA sketches).
        cfg: the coordinator config (p, layers, gnn kind, activation, init).
    """

    def __init__(self, graph: LayerGraph, cfg: CoordinatorConfig):
        super().__init__()
        self.graph, self.cfg = graph, cfg
        self.p = cfg.sketch_dim
        width = self.p * self.p
        names = (*graph.edge_types, "self")
        smoother = cfg.gnn == "smoother"
        self.theta = nn.ModuleList(
            nn.ParameterDict({n: nn.Parameter(torch.empty(width, width)) for n in names})
            for _ in range(0 if smoother else cfg.gnn_layers))
        # the Theorem-1 smoother: one step size per structural edge type and layer (semantic edges
        # change during training, the smoothing is over the fixed graph)
        self.eta = nn.ParameterList(
            nn.Parameter(torch.zeros(len(self.smoothed_edge_types(graph)))) for _ in range(cfg.gnn_layers)) \
            if smoother else None
        self.attention = nn.ModuleList(
            nn.ParameterDict({n: nn.Parameter(torch.empty(2, width)) for n in graph.edge_types})
            for _ in range(cfg.gnn_layers)) if cfg.gnn == "gat" else None
        self.register_buffer("ema_sketch", torch.zeros(len(graph), self.p, self.p), persistent=False)
        self.refreshes = 0
        self._adjacency: dict[str, tuple[int, torch.Tensor]] = {}
        self.reset_parameters()

    @staticmethod
    def smoothed_edge_types(graph: LayerGraph) -> tuple[str, ...]:
        return tuple(t for t in graph.edge_types if t != "semantic")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for eta in self.eta or []:
                eta.zero_()
            for layer in self.theta:
                for weight in layer.values():
                    if self.cfg.theta_init_std > 0:
                        weight.normal_(0.0, self.cfg.theta_init_std)
                    else:
                        weight.zero_()
            for layer in self.attention or []:
                for weight in layer.values():
                    weight.normal_(0.0, 1.0 / self.p)

    # --- message passing ----------------------------------------------------------------------

    def adjacency(self, edge_type: str, like: torch.Tensor) -> torch.Tensor:
        """Cached A_hat of one edge type on `like`'s device and dtype."""
        key = f"{edge_type}:{like.device}:{like.dtype}"
        cached = self._adjacency.get(key)
        if cached is None or cached[0] != self.graph.version:
            adj = normalized_adjacency(len(self.graph), self.graph.edges[edge_type], like.device, like.dtype)
            cached = (self.graph.version, adj)
            self._adjacency[key] = cached
        return cached[1]

    def _attend(self, g: torch.Tensor, edge_type: str, weights: torch.Tensor) -> torch.Tensor:
        """GAT aggregation: softmax over N(l) + l of leaky_relu(a_dst . g_l + a_src . g_j)."""
        allowed = self.adjacency(edge_type, g) > 0
        scores = F.leaky_relu((g @ weights[0])[:, None] + (g @ weights[1])[None, :], 0.2)
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=1) @ g

    def stacked_adjacency(self, like: torch.Tensor) -> torch.Tensor:
        """[I | A_1 | ... | A_E] (N x (E+1)N): one matmul sums the self term and every edge type."""
        key = f"stacked:{like.device}:{like.dtype}"
        cached = self._adjacency.get(key)
        if cached is None or cached[0] != self.graph.version:
            eye = torch.eye(len(self.graph), device=like.device, dtype=like.dtype)
            blocks = [eye] + [self.adjacency(t, like) for t in self.graph.edge_types]
            cached = (self.graph.version, torch.cat(blocks, dim=1))
            self._adjacency[key] = cached
        return cached[1]

    def propagate(self, H: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """h_T from h_0 = vec(H): (N, p, p) -> (N, p, p)."""
        n = H.shape[0]
        h = H.reshape(n, -1)
        if self.eta is not None:
            return self._smooth(h, layers).reshape(H.shape)
        act = _ACTIVATIONS[self.cfg.activation]
        names = ("self", *self.graph.edge_types)
        for t, theta in enumerate(self.theta[: layers or len(self.theta)]):
            if self.attention is None:  # GCN: sum_e A_e h Theta_e as one (N x (E+1)N) @ ((E+1)N x F) product
                transformed = h @ torch.cat([theta[k] for k in names], dim=1).to(h.dtype)
                stacked = transformed.reshape(n, len(names), -1).transpose(0, 1).reshape(len(names) * n, -1)
                message = self.stacked_adjacency(h) @ stacked
            else:
                message = h @ theta["self"].to(h.dtype)
                for edge_type in self.graph.edge_types:
                    g = h @ theta[edge_type].to(h.dtype)
                    message = message + self._attend(g, edge_type, self.attention[t][edge_type].to(h.dtype))
            h = h + act(message)
        return h.reshape(H.shape)

    def _smooth(self, h: torch.Tensor, layers: int | None) -> torch.Tensor:
        """h <- h - sum_e eta_e (h - A_e h): T explicit Laplacian steps (A_e normalised with self-loops)."""
        types = self.smoothed_edge_types(self.graph)
        for eta in self.eta[: layers or len(self.eta)]:
            step = sum(eta[i].to(h.dtype) * (h - self.adjacency(t, h) @ h) for i, t in enumerate(types))
            h = h - step if types else h
        return h

    def forward(self, H: torch.Tensor) -> torch.Tensor:
        """M = h_T - H: the coordinator's message to every node, (N, p, p)."""
        return self.propagate(H) - H

    # --- semantic edges from gradient sketches -------------------------------------------------

    @torch.no_grad()
    def update_sketches(self, grads: torch.Tensor) -> None:
        """Fold one refresh's gradient sketches (N, p, p) into the EMA and rebuild semantic edges."""
        grads = grads.to(self.ema_sketch)
        if self.refreshes == 0:
            self.ema_sketch.copy_(grads)
        else:
            self.ema_sketch.mul_(self.cfg.ema_decay).add_(grads, alpha=1.0 - self.cfg.ema_decay)
        self.refreshes += 1
        self.rebuild_semantic_edges()

    def rebuild_semantic_edges(self) -> None:
        if "semantic" in self.graph.edge_types and self.refreshes > 0:
            self.graph.set_semantic(semantic_edges(self.ema_sketch, self.cfg.top_k, self.cfg.similarity_threshold))

    def extra_repr(self) -> str:
        return (f"nodes={len(self.graph)}, p={self.p}, layers={self.cfg.gnn_layers}, gnn={self.cfg.gnn}, "
                f"edge_types={self.graph.edge_types}")
