"""The layer graph and the graph coordinator: edges, coupling, gradient sketches, smoothing."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import llava_batch, llava_config, randomize_b, tiny_llava, toy_config, toy_inputs, toy_model
from torch import nn

from structlora import PAPER_GATE, apply_structlora, dirichlet_energy, drift_energy
from structlora.diagnostics import update_vectors
from structlora.graph import normalized_adjacency, semantic_edges

VISION = "model.vision_tower.encoder.layers"
LM = "model.language_model.layers"
PROJ = "model.multi_modal_projector"


set_b = randomize_b


# --- the graph ----------------------------------------------------------------------------------


def test_llava_graph_runs_from_the_vision_tower_through_the_projector_to_the_language_model():
    model = tiny_llava()  # 3 CLIP layers, vision_feature_layer=-2: layer 2 is never adapted
    sm = apply_structlora(model, llava_config(model=model))
    assert not any(name.startswith(f"{VISION}.2.") for name in sm.layers)
    assert {n.depth for n in sm.nodes if n.tower == "vision"} == {0, 1}
    edges = sm.graph.named_edges()
    assert sorted(edges["bridge"]) == sorted([
        (f"{VISION}.1.self_attn.q_proj", f"{PROJ}.linear_1"), (f"{VISION}.1.self_attn.v_proj", f"{PROJ}.linear_1"),
        (f"{PROJ}.linear_2", f"{LM}.0.self_attn.q_proj"), (f"{PROJ}.linear_2", f"{LM}.0.self_attn.v_proj")])
    assert (f"{PROJ}.linear_1", f"{PROJ}.linear_2") in edges["depth"]
    assert (f"{VISION}.0.self_attn.q_proj", f"{VISION}.1.self_attn.q_proj") in edges["depth"]
    assert sm.graph.towers_connected("vision", "language")
    spaces = {n.name: (n.in_space, n.out_space) for n in sm.nodes}
    assert spaces[f"{PROJ}.linear_1"] == ("vision", "projector")
    assert spaces[f"{PROJ}.linear_2"] == ("projector", "language")
    # v_proj reads the residual stream (shared coordinates) and writes head space (a basis of its own)
    assert spaces[f"{LM}.1.self_attn.v_proj"] == ("language", f"{LM}.1.self_attn.v_proj:out")
    assert len({spaces[f"{LM}.{i}.self_attn.v_proj"][1] for i in (0, 1)}) == 2


def test_the_paper_variant_shares_one_basis_per_width_across_every_side():
    model = tiny_llava()
    sm = apply_structlora(model, llava_config(model=model, coordinator={"bases": "width"}))
    text = model.config.text_config.hidden_size
    spaces = {n.name: (n.in_space, n.out_space) for n in sm.nodes}
    assert spaces[f"{LM}.0.self_attn.v_proj"] == spaces[f"{LM}.1.self_attn.v_proj"] == (f"d{text}", f"d{text}")
    streams = apply_structlora(tiny_llava(), llava_config(model=tiny_llava()))
    assert len(streams.coordinator.basis.spaces()) > len(sm.coordinator.basis.spaces())


def test_without_a_projector_node_the_bridge_joins_the_towers_directly():
    from _plans import llava_targets

    from pipeline.schema import AdapterConfig

    model = tiny_llava()
    targets = llava_targets(model, AdapterConfig(projector="frozen"))
    sm = apply_structlora(model, {"targets": targets})
    assert sorted(sm.graph.named_edges()["bridge"]) == sorted(
        (f"{VISION}.1.self_attn.{a}", f"{LM}.0.self_attn.{b}") for a in ("q_proj", "v_proj") for b in ("q_proj", "v_proj"))


def test_normalized_adjacency_of_a_path():
    adj = normalized_adjacency(3, [(0, 1), (1, 2)])
    d = torch.tensor([2.0, 3.0, 2.0]).rsqrt()
    expected = d[:, None] * torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]]) * d[None, :]
    assert torch.allclose(adj, expected)


def test_semantic_edges_pick_the_top_k_similar_nodes_above_the_threshold():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sketches = torch.stack([base, base + 0.1, -base, -base + 0.05]).reshape(4, 2, 2)
    assert semantic_edges(sketches, top_k=1, threshold=0.5) == [(0, 1), (2, 3)]
    assert semantic_edges(sketches, top_k=3, threshold=-1.0) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


# --- coupling -----------------------------------------------------------------------------------


def _output_of(model: nn.Module, name: str, run) -> torch.Tensor:
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    run()
    handle.remove()
    return captured["out"]


def _neighbour_grad(sm, source: str, neighbour: str, run) -> float:
    """|grad| on the neighbour's A and B when the loss is the source module's output alone."""
    sm.zero_grad(set_to_none=True)
    sm.train()
    _output_of(sm.model, source, run).pow(2).sum().backward()
    layer = sm.layers[neighbour]
    grads = [p.grad for p in (*layer.lora_A.values(), *layer.lora_B.values())]
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("gnn", ["gcn", "gat"])
def test_the_coordinator_couples_neighbouring_layers(gnn):
    """Loss at vision.0.q only; vision.1.q (downstream: no forward path back) moves only through M.

    Theta is set non-zero explicitly (theta_init_std): with the default zero init, the coupling
    gradient is exactly zero until Theta has been trained (next test).
    """
    x = toy_inputs()
    results = {}
    for on in (True, False):
        sm = apply_structlora(toy_model(), toy_config(gate=False, coordinator={"enabled": on, "gnn": gnn,
                                                                                "theta_init_std": 0.1}))
        set_b(sm)
        results[on] = _neighbour_grad(sm, "vision.0.q", "vision.1.q", lambda sm=sm: sm(x))
    assert results[True] > 1e-6 and results[False] == 0.0


def test_coupling_crosses_towers_on_llava_through_the_bridge():
    """Loss at the projector's linear_2 moves the first LM layer's factors (bridge edge)."""
    model = tiny_llava()
    batch = {k: v for k, v in llava_batch().items() if k != "labels"}
    sm = apply_structlora(model, llava_config(model=model, coordinator={"theta_init_std": 0.1}))
    set_b(sm)
    grad = _neighbour_grad(sm, f"{PROJ}.linear_2", f"{LM}.0.self_attn.q_proj", lambda: sm(**batch))
    assert grad > 1e-8


def test_zero_init_theta_gives_no_coupling_until_trained():
    x = toy_inputs()
    sm = apply_structlora(toy_model(), toy_config(gate=False))
    assert _neighbour_grad(sm, "vision.0.q", "vision.1.q", lambda: sm(x)) == 0.0
    optimizer = torch.optim.Adam(sm.parameters(), lr=1e-2)
    for step in (1, 2):  # step 1 moves B off zero; step 2 then gives Theta a gradient
        sm.zero_grad()
        sm(x).pow(2).mean().backward()
        optimizer.step()
        sm.step(step)
    assert _neighbour_grad(sm, "vision.0.q", "vision.1.q", lambda: sm(x)) > 0.0


# --- gradient sketches and semantic edges ---------------------------------------------------------


def test_gradient_sketch_is_the_projected_weight_gradient():
    x = toy_inputs()
    sm = apply_structlora(toy_model(), toy_config(gate=False))
    layer = sm.layers["language.1.v"]
    layer.base_layer.weight.requires_grad_(True)
    with sm.capturing_gradient_sketches():
        sm(x).pow(2).mean().backward()
    p_in, p_out = layer.projections("default")
    assert torch.allclose(layer.grad_sketch["default"], p_out.T @ layer.base_layer.weight.grad @ p_in, atol=1e-6)


def test_sketches_are_taken_on_refresh_steps_only_and_averaged():
    x = toy_inputs()
    sm = apply_structlora(toy_model(), toy_config(coordinator={"refresh_every": 2, "ema_decay": 0.5}))
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.1)
    captured = []
    for step in range(1, 5):
        sm(x).pow(2).mean().backward()
        captured.append(sm.gradient_sketches())
        optimizer.step()
        optimizer.zero_grad()
        sm.step(step)
        if step == 1:
            assert sm.coordinator.refreshes == 1 and torch.allclose(sm.coordinator.ema_sketch, captured[0])
            assert sm.graph.edges["semantic"]
    assert captured[1] is None and captured[3] is None  # steps 2 and 4 are not refresh steps
    assert sm.coordinator.refreshes == 2
    assert torch.allclose(sm.coordinator.ema_sketch, 0.5 * captured[0] + 0.5 * captured[2], atol=1e-6)
    assert all(layer.capture for layer in sm.layers.values()) and sm.global_step == 4  # armed for step 5


# --- smoothing: Theorem 1 and over-smoothing --------------------------------------------------------


class Chain(nn.Module):
    def __init__(self, depth: int = 5, dim: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _chain(seed: int, layers: int = 1):
    torch.manual_seed(seed)
    cfg = {"rank": 4, "alpha": 4.0, "gate": {"enabled": False},
           "targets": [{"tower": "t", "pattern": r"layers\.(\d+)", "in_space": "s", "out_space": "s"}],
           "coordinator": {"edges": "depth", "bridge_edges": False, "sketch_dim": 4, "activation": "identity",
                           "gnn_layers": layers}}
    sm = apply_structlora(Chain(), cfg)
    set_b(sm, std=1.0, seed=seed)
    return sm


def _laplacian_step(sm, eta: float) -> None:
    """Theta_depth = eta I, Theta_self = -eta I: each layer is h <- h - eta (I - A_hat) h."""
    eye = torch.eye(sm.coordinator.p**2)
    with torch.no_grad():
        for theta in sm.coordinator.theta:
            theta["depth"].copy_(eta * eye)
            theta["self"].copy_(-eta * eye)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_coordination_step_lowers_drift_energy(seed):
    """Theorem 1 in DESIGN terms: on random updates, one smoothing step of the coordinator lowers
    E = sum over depth edges ||vec(dW_l) - vec(dW_j)||^2 of the final updates dW + P M P^T.

    In sketch space the step is (I - eta L_sym) H, which lowers the normalized Dirichlet energy for
    any 0 < eta <= 1; mapped back through P (P^T P ~ dim/p) the first-order change is negative, so
    a small step lowers the parameter-space energy too.
    """
    sm = _chain(seed)
    edges = sm.graph.edges["depth"]
    before = drift_energy(update_vectors(sm, exact=True)[0], edges)
    sketches = torch.stack([sm.layers[n.module].sketch(n.slice, None) for n in sm.nodes]).detach()
    _laplacian_step(sm, eta=0.02)
    after = drift_energy(update_vectors(sm, exact=True)[0], edges)
    assert after < before
    _laplacian_step(sm, eta=1.0)
    with torch.no_grad():
        smoothed = sm.coordinator.propagate(sketches)
    assert dirichlet_energy(smoothed, edges, normalized=True) < dirichlet_energy(sketches, edges, normalized=True)


def test_three_gnn_layers_over_smooth_more_than_one():
    """The residual GCN with Theta = c I (DESIGN's form, no self transform) is the low-pass filter
    (I + c A_hat)^T: more layers leave less variation between neighbouring layers."""
    sm = _chain(0, layers=3)
    sketches = torch.stack([sm.layers[n.module].sketch(n.slice, None) for n in sm.nodes]).detach()
    with torch.no_grad():
        for theta in sm.coordinator.theta:
            theta["depth"].copy_(0.9 * torch.eye(16))
        energy = [dirichlet_energy(sm.coordinator.propagate(sketches, layers=t) if t else sketches,
                                   sm.graph.edges["depth"], normalized=True) for t in (0, 1, 3)]
    assert energy[0] > energy[1] > energy[2]
    assert energy[2] < 0.5 * energy[1]


def test_gat_starts_as_plain_lora_too():
    base = toy_model()
    x = toy_inputs()
    sm = apply_structlora(copy.deepcopy(base), toy_config(coordinator={"gnn": "gat", "gnn_layers": 2}))
    sm.train()
    with torch.no_grad():
        assert torch.equal(sm(x), base(x))


def test_batched_sketches_equal_the_per_module_formula():
    from structlora.plan import gate_masks, node_sketches

    sm = apply_structlora(toy_model(), toy_config(fused=True, gate=dict(PAPER_GATE)))  # sampled, not all ones
    set_b(sm)
    sm.train()
    torch.manual_seed(0)
    masks = gate_masks(sm.layers, sm.nodes, training=True)
    batched = node_sketches(sm.layers, sm.nodes, sm._sketch_groups, masks)
    single = torch.stack([sm.layers[n.module].sketch(n.slice, m) for n, m in zip(sm.nodes, masks)])
    assert torch.allclose(batched, single, atol=1e-6)
    layer = sm.layers["language.2.v"]
    p_in, p_out = layer.projections("default")
    dw = layer.scale * layer.lora_B["default"] @ torch.diag(masks[sm.graph.index["language.2.v"]]) @ layer.lora_A["default"]
    assert torch.allclose(batched[sm.graph.index["language.2.v"]], p_out.T @ dw @ p_in, atol=1e-5)
