"""Hard rank selection (gate / random / norm) and the static coordination penalties (cosine, Laplacian)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import toy_config, toy_inputs, toy_model

from structlora import apply_structlora
from structlora.variants import direction_scores, keep_masks, static_penalty


def _train(sm, steps: int, lr: float = 5e-2):
    x = toy_inputs()
    optimizer = torch.optim.AdamW([p for p in sm.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        (sm(x).pow(2).mean() - sm(x).std() + sum(sm.regularization().values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        sm.step(step)
    return sm


def test_keep_masks_keep_the_top_share_with_stable_ties():
    masks = keep_masks([torch.tensor([0.1, 0.9, 0.5, 0.9]), torch.tensor([1.0, 2.0])], keep=0.5)
    assert masks[0].tolist() == [False, True, False, True]
    assert masks[1].tolist() == [False, True]
    assert keep_masks([torch.tensor([3.0, 1.0, 2.0])], keep=0.1)[0].sum() == 1  # at least one


@pytest.mark.parametrize("criterion,gate", [("gate", True), ("random", False), ("norm", False)])
def test_selected_directions_are_dead_for_the_rest_of_training(criterion, gate):
    cfg = toy_config(gate=gate, coordinator=False, selection={"criterion": criterion, "keep": 0.5, "at_step": 3})
    sm = apply_structlora(toy_model(), cfg)
    _train(sm, 2)
    assert sm.selection.masks is None
    _train(sm, 6)  # steps 1..6 again: selection happens at step 3
    masks = sm.selection.masks
    assert masks is not None and all(int(m.sum()) == cfg["rank"] // 2 for m in masks)
    for node, mask in zip(sm.nodes, masks):
        layer = sm.layers[node.module]
        assert torch.all(layer.lora_A[node.slice][~mask] == 0) and torch.all(layer.lora_B[node.slice][:, ~mask] == 0)
        assert torch.any(layer.lora_B[node.slice][:, mask] != 0)  # the kept ones still learn
    if gate:
        assert all(v == cfg["rank"] // 2 for v in sm.diagnostics()["kept_rank"].values())


def test_norm_criterion_ranks_by_the_rank_one_update_norm():
    sm = _train(apply_structlora(toy_model(), toy_config(gate=False, coordinator=False)), 3)
    node = sm.nodes[0]
    A, B = sm.layers[node.module].lora_A[node.slice], sm.layers[node.module].lora_B[node.slice]
    expected = torch.stack([torch.linalg.matrix_norm(torch.outer(B[:, j], A[j])) for j in range(A.shape[0])])
    assert torch.allclose(direction_scores(sm, "norm")[0], expected.detach(), rtol=1e-5)
    with pytest.raises(ValueError, match="IB gate"):
        direction_scores(sm, "gate")


def test_selection_state_survives_save_and_load(tmp_path):
    cfg = toy_config(gate=False, coordinator=False, selection={"criterion": "random", "at_step": 2, "seed": 5})
    sm = _train(apply_structlora(toy_model(), cfg), 3)
    sm.save_training_state(tmp_path / "state")
    fresh = apply_structlora(toy_model(), cfg)
    fresh.load_training_state(tmp_path / "state")
    assert [m.tolist() for m in fresh.selection.masks] == [m.tolist() for m in sm.selection.masks]


def test_selection_by_gate_needs_the_gate():
    with pytest.raises(ValueError, match="enable the gate"):
        apply_structlora(toy_model(), toy_config(gate=False, coordinator=False, selection={"criterion": "gate"}))


def _explicit(sm):
    deltas = []
    for node in sm.nodes:
        layer = sm.layers[node.module]
        deltas.append(layer.scale * layer.lora_B[node.slice] @ layer.lora_A[node.slice])
    edges = [(a, b) for a, b in sm.graph.structural_depth_edges() if deltas[a].shape == deltas[b].shape]
    lap = torch.stack([((deltas[a] - deltas[b]) ** 2).sum() for a, b in edges]).mean()
    cos = torch.stack([1 - torch.nn.functional.cosine_similarity(deltas[a].flatten(), deltas[b].flatten(), dim=0)
                       for a, b in edges]).mean()
    return lap, cos


@pytest.mark.parametrize("kind", ["laplacian", "cosine"])
def test_static_penalties_equal_their_definition_and_pull_neighbours_together(kind):
    cfg = toy_config(gate=False, coordinator=False, ablation="lora", penalty={"kind": kind, "weight": 0.5})
    sm = _train(apply_structlora(toy_model(), cfg), 4)
    lap, cos = _explicit(sm)
    value = sm.regularization()[kind]
    assert value.item() == pytest.approx(0.5 * (lap if kind == "laplacian" else cos).item(), rel=1e-4)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sm.parameters() if p.requires_grad)
    # a strong penalty makes neighbours more alike than no penalty does
    strong = toy_config(gate=False, coordinator=False, ablation="lora", penalty={"kind": kind, "weight": 50.0})
    off = toy_config(gate=False, coordinator=False, ablation="lora")
    idx = 0 if kind == "laplacian" else 1
    penalised = _explicit(_train(apply_structlora(toy_model(), strong), 20))[idx]
    free = _explicit(_train(apply_structlora(toy_model(), off), 20))[idx]
    assert penalised < free


def test_penalty_off_adds_no_term():
    sm = apply_structlora(toy_model(), toy_config(gate=False, coordinator=False))
    assert static_penalty(sm, sm.config.penalty) is None and sm.regularization() == {}


def test_penalty_needs_plain_lora_factors():
    with pytest.raises(ValueError, match="ablation 'lora'"):
        apply_structlora(toy_model(), toy_config(gate=True, coordinator=False, penalty={"kind": "cosine", "weight": 1.0}))
