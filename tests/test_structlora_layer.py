"""The adapted layer and the model wrapper on a toy two-tower stack and on a tiny LLaVA.

PEFT's merge invariants (tests/testing_common.py there): outputs agree across unmerged,
merged, unmerged again and merge-and-unload; no wrapper is left; training changes the output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import llava_batch, llava_config, tiny_llava, toy_config, toy_inputs, toy_model

from structlora import PAPER_GATE, StructLoRALinear, apply_structlora, update_factors
from structlora.layer import SliceUpdate


def randomize(sm, seed: int = 0, b_std: float = 0.3) -> None:
    """Non-trivial adapter state: B != 0, gate logits spread over the prune threshold, Theta != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sm.layers.values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * b_std)
            for gate in (layer.gates or {}).values():
                gate.logits.copy_(torch.rand(gate.logits.shape, generator=g) * 8 - 4)
        if sm.coordinator is not None:
            for p in sm.coordinator.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def toy_case(**cfg):
    base = toy_model()
    x = toy_inputs()
    sm = apply_structlora(copy.deepcopy(base), toy_config(**cfg))
    return base, sm, lambda m: m(x)


def llava_case(**cfg):
    base = tiny_llava()
    batch = {k: v for k, v in llava_batch().items() if k != "labels"}
    sm = apply_structlora(copy.deepcopy(base), llava_config(model=base, **cfg))
    return base, sm, lambda m: m(**batch).logits


CASES = {"toy": toy_case, "llava": llava_case}


# --- the pure update function ----------------------------------------------------------------------


def test_update_factors_is_the_documented_sum():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    mask, p_in, p_out, M = (torch.tensor([1.0, 0.0, 0.5]), torch.randn(5, 2, generator=g),
                            torch.randn(4, 2, generator=g), torch.randn(2, 2, generator=g))
    A2, B2, scale = update_factors([SliceUpdate(A, B, 2.0, mask=mask, p_out=p_out, delta=M)], 4, p_in)
    expected = 2.0 * B @ torch.diag(mask) @ A + p_out @ M @ p_in.T
    assert torch.allclose(scale * B2 @ A2, expected, atol=1e-6)
    kept = update_factors([SliceUpdate(A, B, 2.0, mask=mask, keep=mask > 0)], 4)
    assert kept[0].shape == (2, 5) and torch.allclose(kept[1] @ kept[0], 2.0 * B @ torch.diag(mask) @ A, atol=1e-6)
    plain = update_factors([SliceUpdate(A, B, 2.0)], 4)
    assert plain[0] is A and plain[1] is B and plain[2] == 2.0


def test_fused_qkv_adapts_only_the_q_and_v_rows():
    base, sm, run = toy_case(fused=True)
    randomize(sm)
    layer = sm.layers["vision.0.qkv"]
    assert isinstance(layer, StructLoRALinear) and set(layer.slice_rows) == {"q", "v"}
    sm.eval()
    delta = layer.delta_weight(sm.compute_plans(training=False)["vision.0.qkv"])
    assert delta[12:24].abs().max() == 0  # k rows
    assert delta[:12].abs().max() > 0 and delta[24:].abs().max() > 0


# --- invariants on both models ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_gates_and_coordinator_off_equal_peft_lora(case):
    from peft import LoraConfig, get_peft_model

    base, sm, run = CASES[case](gate=False, coordinator=False)
    randomize(sm)
    names = list(sm.layers)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in sm.layers.items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A["default"])
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B["default"])
    for mode in ("train", "eval"):
        getattr(sm, mode)()
        getattr(peft_model, mode)()
        with torch.no_grad():
            diff = (run(sm.model) - run(peft_model)).abs().max()
        assert float(diff) < 1e-6, (mode, float(diff))


@pytest.mark.parametrize("case", sorted(CASES))
def test_at_initialisation_the_output_is_the_base_output(case):
    base, sm, run = CASES[case]()
    with torch.no_grad():
        reference = run(base)
        sm.train()  # the gates and the coordinator branch are live, but B = 0 and Theta = 0
        assert torch.equal(run(sm.model), reference)
        sm.eval()
        assert torch.equal(run(sm.model), reference)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_unload_agree(case):
    base, sm, run = CASES[case]()
    randomize(sm)
    sm.eval()
    with torch.no_grad():
        reference = run(base)
        adapted = run(sm.model)
        assert (adapted - reference).abs().max() > 1e-3  # the adapter changes the output
        pruned = sum(int((~g.kept()).sum()) for layer in sm.layers.values() for g in layer.gates.values())
        assert pruned > 0  # some directions are below the threshold: the eval forward and merge prune them
        sm.merge()
        merged = run(sm.model)
        sm.unmerge()
        unmerged = run(sm.model)
        unloaded = sm.merge_and_unload()
        final = run(unloaded)
    for other in (merged, unmerged, final):
        assert float((other - adapted).abs().max()) < 1e-5
    leftovers = [n for n, m in unloaded.named_modules() if type(m).__module__.startswith("structlora")]
    assert not leftovers and not any("lora" in n or "structlora" in n for n, _ in unloaded.named_parameters())
    assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks
    assert sorted(unloaded.state_dict()) == sorted(base.state_dict())
    assert all(p.requires_grad for p in unloaded.parameters())  # restored as they were before
    with pytest.raises(RuntimeError, match="unloaded"):
        sm.merge()


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_adapter_tensors_get_gradients(case):
    base, sm, run = CASES[case]()
    randomize(sm)
    sm.train()
    (run(sm.model).float().pow(2).mean() + sum(sm.regularization().values())).backward()
    groups = sm.trainable_parameter_groups()
    adapter = {id(p) for ps in groups.values() for p in ps}
    assert {k: bool(v) for k, v in groups.items()} == {"adapter": True, "gate": True, "coordinator": True}
    for name, p in sm.model.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_changes_the_output(case):
    base, sm, run = CASES[case](gate={"anneal_steps": 5})
    sm.train()
    groups = sm.trainable_parameter_groups()
    optimizer = torch.optim.Adam([p for ps in groups.values() for p in ps], lr=1e-2)
    losses = []
    for step in range(1, 5):
        loss = run(sm.model).float().pow(2).mean()
        losses.append(float(loss.detach()))
        (loss + sum(sm.regularization().values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        sm.step(step)
    assert losses[-1] < losses[0]
    assert sm.temperature < 1.0
    sm.eval()
    with torch.no_grad():
        assert (run(sm.model) - run(base)).abs().max() > 1e-4
    assert all(p.abs().sum() > 0 for p in sm.coordinator.parameters())  # Theta left zero after two steps


def test_regularization_is_returned_not_added_in_forward():
    base, sm, run = toy_case()
    terms = sm.regularization()
    assert set(terms) == {"ib"}
    penalties = [g.penalty().detach() for layer in sm.layers.values() for g in layer.gates.values()]
    expected = sm.config.gate.lambda_ib * float(torch.stack(penalties).mean())
    assert expected > 0 and float(terms["ib"].detach()) == pytest.approx(expected)
    assert toy_case(gate=False)[1].regularization() == {}


def test_activation_checkpointing_reuses_the_forward_plan():
    """Recomputed layers must see the same gate samples and messages as their forward pass."""
    grads = []
    for checkpointing in (False, True):
        base, sm, run = llava_case(gate=dict(PAPER_GATE))  # sampled gates: the recompute must draw the same
        randomize(sm)
        if checkpointing:
            sm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sm.train()
        torch.manual_seed(0)
        run(sm.model).pow(2).mean().backward()
        grads.append([p.grad.clone() for group in sm.trainable_parameter_groups().values() for p in group])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_submodule_called_on_its_own_gets_a_fresh_plan():
    base, sm, run = toy_case()
    randomize(sm)
    sm.train()
    x = torch.randn(3, 12)
    for _ in range(2):  # a stale plan would fail here: its graph was freed by the first backward
        sm.model.vision[0](x).pow(2).sum().backward()


def test_one_gate_draw_per_optimizer_step():
    """Micro-batches of one optimizer step (gradient accumulation) and ranks with the same seed apply
    the same gate mask, so a split batch trains like the whole batch; the next step draws anew."""
    model = toy_model()
    sm = apply_structlora(model, toy_config(gate=dict(PAPER_GATE)))
    model.train()
    first = sm.compute_plans()
    again = sm.compute_plans()
    name, slices = next(iter(first.items()))
    key = next(iter(slices))
    assert torch.equal(first[name][key][0], again[name][key][0])
    sm.step(1)
    later = sm.compute_plans()
    assert not torch.equal(first[name][key][0], later[name][key][0])
