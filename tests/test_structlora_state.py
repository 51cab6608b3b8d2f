"""Saving and restoring the full training state (resume)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import toy_config, toy_inputs, toy_model

from structlora import apply_structlora


def _trained(steps: int = 3):
    x = toy_inputs()
    sm = apply_structlora(toy_model(), toy_config(coordinator={"refresh_every": 2}, gate={"anneal_steps": 10}))
    optimizer = torch.optim.Adam(sm.parameters(), lr=1e-2)
    for step in range(1, steps + 1):
        (sm(x).pow(2).mean() + sum(sm.regularization().values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        sm.step(step)
    return sm, x


def test_save_and_load_restore_parameters_sketches_edges_and_step(tmp_path):
    sm, x = _trained()
    sm.save_training_state(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "structlora_state.json", "structlora_state.safetensors"]
    fresh = apply_structlora(toy_model(), toy_config(coordinator={"refresh_every": 2}, gate={"anneal_steps": 10}))
    fresh.load_training_state(tmp_path / "state")
    assert fresh.global_step == 3 and fresh.temperature == pytest.approx(sm.temperature)
    assert fresh.graph.edges == sm.graph.edges and fresh.graph.edges["semantic"]
    assert torch.equal(fresh.coordinator.ema_sketch, sm.coordinator.ema_sketch)
    assert fresh.coordinator.refreshes == sm.coordinator.refreshes == 2
    assert [layer.capture for layer in fresh.layers.values()] == [layer.capture for layer in sm.layers.values()]
    for (name, a), (_, b) in zip(sm.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    sm.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(sm(x), fresh(x))


def test_load_without_parameters_keeps_them(tmp_path):
    sm, _ = _trained()
    sm.save_training_state(tmp_path / "state")
    fresh = apply_structlora(toy_model(), toy_config(coordinator={"refresh_every": 2}, gate={"anneal_steps": 10}))
    before = {n: p.clone() for n, p in fresh.named_parameters() if p.requires_grad}
    fresh.load_training_state(tmp_path / "state", load_parameters=False)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters() if p.requires_grad)
    assert fresh.graph.edges == sm.graph.edges


def test_a_state_of_another_structure_is_refused(tmp_path):
    sm, _ = _trained(1)
    sm.save_training_state(tmp_path / "state")
    other = apply_structlora(toy_model(), toy_config(coordinator={"sketch_dim": 2}))
    with pytest.raises(ValueError, match="sketch_dim: saved 4 vs now 2"):
        other.load_training_state(tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="not a StructLoRA training state"):
        other.load_training_state(tmp_path / "missing")
