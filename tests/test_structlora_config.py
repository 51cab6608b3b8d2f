"""StructLoRAConfig validation, ablation keys, the gate's pure functions and the temperature schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from structlora import CoordinatorConfig, GateConfig, StructLoRAConfig, TargetConfig
from structlora.gate import bernoulli_kl, deterministic_gate, relaxed_bernoulli, temperature_at

TARGET = {"tower": "t", "pattern": r"layers\.(\d+)\.q"}


def test_every_field_is_documented():
    for cls in (StructLoRAConfig, TargetConfig, GateConfig, CoordinatorConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_from_plain_dict_builds_nested_dataclasses_and_round_trips():
    cfg = StructLoRAConfig.from_dict({"targets": [TARGET], "gate": {"prior": 0.2}, "coordinator": {"top_k": 3}})
    assert isinstance(cfg.targets[0], TargetConfig) and cfg.gate.prior == 0.2 and cfg.coordinator.top_k == 3
    assert cfg.scale == 2.0
    assert StructLoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_the_pipeline_loader_accepts_the_annotations():
    from pipeline.config import from_dict

    cfg = from_dict(StructLoRAConfig, {"targets": [TARGET], "gate": {"lambda_ib": "1e-2"}, "ablation": "no_ib"})
    assert cfg.gate.lambda_ib == 0.01 and cfg.gate.enabled is False


@pytest.mark.parametrize(("data", "message"), [
    ({"targets": []}, "at least one target"),
    ({"targets": [TARGET], "gate": {"priorr": 0.1}}, "unknown key 'priorr' \\(did you mean 'prior'\\?\\)"),
    ({"targets": [TARGET], "gate": {"prior": 1.5}}, "gate.prior must be in \\(0, 1\\)"),
    ({"targets": [TARGET], "coordinator": {"gnn_layers": 4}}, "gnn_layers must be 1, 2 or 3"),
    ({"targets": [TARGET], "rank": 0}, "rank must be >= 1"),
    ({"targets": [{"tower": "t", "pattern": "head"}]}, "has no depth group"),
    ({"targets": [{"tower": "t", "pattern": "("}]}, "is not a regex"),
    ({"targets": [{**TARGET, "fused": ["q", "k", "v"]}]}, "give both `fused`"),
    ({"targets": [{**TARGET, "fused": ["q", "k", "v"], "slices": ["x"]}]}, "not among fused chunks"),
    ({"targets": [TARGET], "coordinator": {"bridge_chain": ["nope"]}}, "names towers \\['nope'\\]"),
    ({"targets": [TARGET], "ablation": "half"}, "ablation: expected Literal\\['full'"),
])
def test_invalid_values_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        StructLoRAConfig.from_dict(data)


@pytest.mark.parametrize(("ablation", "gate", "coordinator"), [
    ("full", True, True), ("no_ib", False, True), ("no_coordinator", True, False), ("lora", False, False)])
def test_ablations_are_one_key(ablation, gate, coordinator):
    cfg = StructLoRAConfig.from_dict({"targets": [TARGET], "ablation": ablation})
    assert (cfg.gate.enabled, cfg.coordinator.enabled) == (gate, coordinator)


def test_edge_types_follow_the_edge_set():
    assert CoordinatorConfig(edges="hybrid").edge_types() == ("depth", "bridge", "semantic")
    assert CoordinatorConfig(edges="depth", bridge_edges=False).edge_types() == ("depth",)
    assert CoordinatorConfig(edges="semantic").edge_types() == ("semantic",)


def test_temperature_schedules():
    cfg = GateConfig(anneal_steps=100)
    assert temperature_at(0, cfg) == pytest.approx(1.0)
    assert temperature_at(50, cfg) == pytest.approx(math.sqrt(0.1))
    assert temperature_at(100, cfg) == pytest.approx(0.1) and temperature_at(1000, cfg) == pytest.approx(0.1)
    assert temperature_at(50, GateConfig(anneal_steps=100, schedule="linear")) == pytest.approx(0.55)


def test_deterministic_gate_prunes_below_the_threshold():
    logits = torch.tensor([-5.0, -2.0, 0.0, 3.0])  # sigmoid: 0.0067, 0.119, 0.5, 0.953
    gate = deterministic_gate(logits, threshold=0.05)
    assert gate[0] == 0 and torch.allclose(gate[1:], torch.sigmoid(logits[1:]))
    hard = deterministic_gate(logits, hard_concrete=True)  # clamp(sigmoid * 1.2 - 0.1, 0, 1)
    assert torch.allclose(hard, (torch.sigmoid(logits) * 1.2 - 0.1).clamp(0, 1))


def test_relaxed_bernoulli_is_in_range_and_hard_concrete_makes_exact_zeros():
    torch.manual_seed(0)
    logits = torch.zeros(2000)
    soft = relaxed_bernoulli(logits, tau=0.5)
    assert 0 <= float(soft.min()) and float(soft.max()) <= 1 and ((soft > 0) & (soft < 1)).float().mean() > 0.99
    hard = relaxed_bernoulli(logits, tau=0.5, hard_concrete=True)
    assert (hard == 0).any() and (hard == 1).any()
    cold = relaxed_bernoulli(torch.full((2000,), math.log(9.0)), tau=0.05)
    assert abs(float((cold > 0.5).float().mean()) - 0.9) < 0.03  # P(m > 1/2) = sigmoid(phi)


def test_bernoulli_kl_matches_the_formula():
    q, prior = 0.9, 0.1
    expected = q * math.log(q / prior) + (1 - q) * math.log((1 - q) / (1 - prior))
    kl = bernoulli_kl(torch.full((3,), math.log(q / (1 - q))), prior)
    assert float(kl) == pytest.approx(3 * expected, rel=1e-5)
    assert float(bernoulli_kl(torch.full((2,), math.log(prior / (1 - prior))), prior)) == pytest.approx(0, abs=1e-6)


def test_field_types_are_checked():
    with pytest.raises(ValueError, match="GateConfig.enabled: expected bool, got dict"):
        StructLoRAConfig.from_dict({"targets": [TARGET], "gate": {"enabled": {"prior": 0.1}}})
    with pytest.raises(ValueError, match="StructLoRAConfig.rank: expected int, got float"):
        StructLoRAConfig.from_dict({"targets": [TARGET], "rank": 8.0})
    assert StructLoRAConfig.from_dict({"targets": [TARGET], "alpha": 16}).alpha == 16.0
