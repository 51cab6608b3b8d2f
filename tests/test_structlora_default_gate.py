"""The gate configs/ ship (study v2's choice on validation loss): it prunes the directions the task does
not hold, and the eval forward, the merged model and the exported PEFT adapter stay exact with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _plans import plan
from _tiny_models import llava_batch, randomize_b, tiny_llava

from pipeline.config import load_config
from pipeline.schema import RunConfig
from structlora import apply_structlora

ROOT = Path(__file__).resolve().parents[1]


def tiny_default() -> RunConfig:
    return load_config(RunConfig, ROOT / "configs" / "tiny.yaml", [])


def test_every_config_ships_the_same_gate():
    gates = {p.name: load_config(RunConfig, p, []).adapter.structlora.get("gate")
             for p in sorted((ROOT / "configs").glob("*.yaml"))}
    chosen = tiny_default().adapter.structlora["gate"]
    assert chosen["sampling"] == "none" and chosen["lambda_ib"] > 0
    assert all(g == chosen for g in gates.values()), gates


def test_the_library_default_is_the_gate_configs_ship_and_trains_at_10x():
    from pipeline.schema import TrainConfig
    from structlora import GateConfig

    shipped = tiny_default().adapter.structlora["gate"]
    default = GateConfig()
    assert {k: getattr(default, k) for k in shipped} == shipped
    assert TrainConfig(lr=3e-4).gate_lr == pytest.approx(3e-3)
    assert TrainConfig(lr=3e-4, lr_gate=1e-4).gate_lr == 1e-4
    assert tiny_default().train.gate_lr == pytest.approx(10 * tiny_default().train.lr)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The tiny default's StructLoRA (its config through the pipeline) after the IB term alone has
    acted, at the config's weight and gate learning rate, on the upper half of every gate's
    directions (the lower half stands for directions the task holds: their gradient is withheld)."""
    cfg = tiny_default()
    model = tiny_llava()
    sm = apply_structlora(model, plan(model, cfg.adapter, cfg.train.max_steps).structlora_config)
    randomize_b(sm)
    gates = [g for layer in sm.layers.values() for g in layer.gates.values()]
    optimizer = torch.optim.Adam([g.logits for g in gates], lr=cfg.train.gate_lr)
    sm.train()
    steps = 0
    while any(bool(g.kept()[g.kept().numel() // 2:].any()) for g in gates) and steps < 400:
        optimizer.zero_grad()
        sum(sm.regularization().values()).backward()
        for g in gates:
            g.logits.grad[: g.logits.numel() // 2] = 0
        optimizer.step()
        steps += 1
    sm.eval()
    return sm, steps, gates


def test_the_default_gate_prunes_directions_to_exact_zeros(pruned):
    sm, steps, gates = pruned
    assert steps < 400, "the IB term of the default gate never pruned"
    for g in gates:
        half = g.logits.numel() // 2
        assert bool(g.kept()[:half].all()) and not bool(g.kept()[half:].any())
        assert float(g.deterministic().detach()[half:].abs().max()) == 0.0  # exact zeros, not small gates
    kept = sum(int(g.kept().sum()) for g in gates)
    assert kept == sum(g.logits.numel() // 2 for g in gates)


def test_eval_merge_and_export_stay_exact_with_pruned_directions(pruned, tmp_path):
    from peft import PeftModel

    sm, _, gates = pruned
    batch = {k: v for k, v in llava_batch().items() if k != "labels"}
    with torch.no_grad():
        sm.train()
        train_logits = sm(**batch).logits  # deterministic gates: training computes the eval function
        sm.eval()
        adapted = sm(**batch).logits
        torch.testing.assert_close(train_logits, adapted, rtol=0, atol=0)
        assert float((tiny_llava()(**batch).logits - adapted).abs().max()) > 1e-3  # the adapter does something
        summary = sm.export_peft(tmp_path / "adapter", base_model_name_or_path="tiny-base")
        p = sm.config.coordinator.sketch_dim
        for name, rank in summary["ranks"].items():
            assert rank == sum(int(g.kept().sum()) for g in sm.layers[name].gates.values()) + p
        loaded = PeftModel.from_pretrained(tiny_llava(), str(tmp_path / "adapter")).eval()
        exported = loaded(**batch).logits
        merged = sm.merge_and_unload()(**batch).logits
    assert float((merged - adapted).abs().max()) < 1e-5
    assert float((exported - adapted).abs().max()) < 1e-4
