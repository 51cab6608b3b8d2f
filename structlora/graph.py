"""The layer graph: adapted modules as nodes, depth / bridge / semantic edges (DESIGN.md 3.2).

Structure is data, as in timm's group_matcher: each node knows its tower, module kind and
depth, from the config's regexes. Depth edges join consecutive adapted layers of one kind in
one tower; bridge edges join the towers in their configured order (the deepest adapted layer
of one tower to the shallowest of the next, e.g. vision -> projector -> language); semantic
edges join each node to its top-k most similar nodes by cosine of EMA gradient sketches.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from structlora.config import EDGE_TYPES

Edge = tuple[int, int]


@dataclass(frozen=True)
class Node:
    """One adapted module (or one slice of a fused module).

    Attributes:
        name: unique node name: the module name, plus `[slice]` for fused slices.
        module: full module name in the model.  slice: slice key inside the layer.
        tower, kind, depth: position in the model (kind includes the slice for fused modules).
        in_space, out_space: representation spaces read and written.
        in_features, out_features: widths (out_features of the slice).
    """

    name: str
    module: str
    slice: str
    tower: str
    kind: str
    depth: int
    in_space: str
    out_space: str
    in_features: int
    out_features: int

    @property
    def chain(self) -> str:
        """The depth chain this node belongs to, e.g. 'vision.q_proj'."""
        return f"{self.tower}.{self.kind}"


def _undirected(edges: list[Edge]) -> list[Edge]:
    return sorted({(min(a, b), max(a, b)) for a, b in edges if a != b})


def depth_edges(nodes: list[Node]) -> list[Edge]:
    """Consecutive adapted depths of one (tower, kind) chain."""
    edges = []
    for members in chains(nodes).values():
        edges += [(members[i], members[i + 1]) for i in range(len(members) - 1)]
    return _undirected(edges)


def chains(nodes: list[Node]) -> dict[str, list[int]]:
    """{'tower.kind': node indices in depth order}."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        grouped[node.chain].append(i)
    return {k: sorted(v, key=lambda i: nodes[i].depth) for k, v in grouped.items()}


def bridge_edges(nodes: list[Node], tower_order: list[str]) -> list[Edge]:
    """Join consecutive present towers: every deepest node of one to every shallowest node of the next.

    A tower with no nodes (e.g. a projector trained fully or frozen) is skipped, so the vision
    tower then links straight to the language model.
    """
    present = [t for t in tower_order if any(n.tower == t for n in nodes)]
    edges = []
    for upper, lower in zip(present, present[1:]):
        up = [i for i, n in enumerate(nodes) if n.tower == upper]
        low = [i for i, n in enumerate(nodes) if n.tower == lower]
        deepest = max(nodes[i].depth for i in up)
        shallowest = min(nodes[i].depth for i in low)
        edges += [(a, b) for a in up if nodes[a].depth == deepest for b in low if nodes[b].depth == shallowest]
    return _undirected(edges)


def semantic_edges(sketches: torch.Tensor, top_k: int, threshold: float) -> list[Edge]:
    """Each node's top-k most similar other nodes by cosine of vec(sketch), kept above `threshold`."""
    n = sketches.shape[0]
    if n < 2:
        return []
    flat = sketches.reshape(n, -1).float()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-float("inf"))
    values, index = cosine.topk(min(top_k, n - 1), dim=1)
    edges = [(i, int(j)) for i in range(n) for v, j in zip(values[i], index[i]) if float(v) >= threshold]
    return _undirected(edges)


def normalized_adjacency(num_nodes: int, edges: list[Edge], device=None, dtype=torch.float32) -> torch.Tensor:
    """A_hat = D^-1/2 (Adj + I) D^-1/2 (dense, symmetric)."""
    adj = torch.eye(num_nodes, device=device, dtype=dtype)
    for a, b in edges:
        adj[a, b] = adj[b, a] = 1.0
    inv_sqrt = adj.sum(1).rsqrt()
    return inv_sqrt[:, None] * adj * inv_sqrt[None, :]


def laplacian(num_nodes: int, edges: list[Edge], dtype=torch.float64) -> torch.Tensor:
    """Combinatorial Laplacian L = D - Adj: u^T L u = sum over edges ||u_a - u_b||^2."""
    lap = torch.zeros(num_nodes, num_nodes, dtype=dtype)
    for a, b in edges:
        lap[a, b] -= 1.0
        lap[b, a] -= 1.0
        lap[a, a] += 1.0
        lap[b, b] += 1.0
    return lap


class LayerGraph:
    """Nodes and typed, undirected edges.

    Args:
        nodes: the adapted modules, in a fixed order (node index = position).
        edge_types: which edge types are active (from CoordinatorConfig.edge_types()).
        tower_order: tower order for bridges.
    """

    def __init__(self, nodes: list[Node], edge_types: tuple[str, ...] = ("depth", "bridge"),
                 tower_order: list[str] | None = None):
        unknown = [t for t in edge_types if t not in EDGE_TYPES]
        if unknown:
            raise ValueError(f"unknown edge types {unknown}; known: {EDGE_TYPES}")
        self.nodes = list(nodes)
        self.edge_types = tuple(edge_types)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.edges: dict[str, list[Edge]] = {t: [] for t in self.edge_types}
        if "depth" in self.edges:
            self.edges["depth"] = depth_edges(self.nodes)
        if "bridge" in self.edges:
            self.edges["bridge"] = bridge_edges(self.nodes, tower_order or list(dict.fromkeys(n.tower for n in nodes)))
        self.version = 0  # bumped whenever edges change, so cached adjacencies are rebuilt

    def __len__(self) -> int:
        return len(self.nodes)

    def set_semantic(self, edges: list[Edge]) -> None:
        if "semantic" not in self.edges:
            raise ValueError("semantic edges are off in this graph (coordinator.edges)")
        self.edges["semantic"] = _undirected(edges)
        self.version += 1

    def structural_depth_edges(self) -> list[Edge]:
        """Depth edges whatever the active types (diagnostics measure drift along depth)."""
        return self.edges.get("depth") or depth_edges(self.nodes)

    def chains(self) -> dict[str, list[int]]:
        return chains(self.nodes)

    def named_edges(self) -> dict[str, list[tuple[str, str]]]:
        return {t: [(self.nodes[a].name, self.nodes[b].name) for a, b in e] for t, e in self.edges.items()}

    def towers_connected(self, src: str, dst: str) -> bool:
        """Is there a path from tower `src` to tower `dst` over structural (depth + bridge) edges?"""
        neighbours: dict[int, set[int]] = defaultdict(set)
        for t in ("depth", "bridge"):
            for a, b in self.edges.get(t, []):
                neighbours[a].add(b)
                neighbours[b].add(a)
        frontier = [i for i, n in enumerate(self.nodes) if n.tower == src]
        seen = set(frontier)
        while frontier:
            node = frontier.pop()
            if self.nodes[node].tower == dst:
                return True
            for nxt in neighbours[node] - seen:
                seen.add(nxt)
                frontier.append(nxt)
        return False
