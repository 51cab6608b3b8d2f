"""The gate's design choices (issue 14): sampling step / example / none, KL vs expected-L0 penalty,
a start that equals LoRA; the Theorem-1 smoother; the message-share diagnostic."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_models import randomize_b, toy_config, toy_inputs, toy_model

from structlora import PAPER_GATE, apply_structlora
from structlora.config import GateConfig
from structlora.gate import expected_l0, gate_penalty, logit


def test_deterministic_gates_train_the_function_that_eval_computes():
    sm = apply_structlora(toy_model(), toy_config(gate={"sampling": "none"}))
    randomize_b(sm)
    with torch.no_grad():  # gates spread across (0, 1) and across the prune threshold, not all saturated
        for layer in sm.layers.values():
            for g in layer.gates.values():
                g.logits.copy_(torch.linspace(-4.0, 4.0, g.logits.numel()))
    assert 0 < sum(int(g.kept().sum()) for layer in sm.layers.values() for g in layer.gates.values()) < sum(
        g.logits.numel() for layer in sm.layers.values() for g in layer.gates.values())
    x = toy_inputs()
    sm.train()
    train_out = sm(x)
    sm.eval()
    torch.testing.assert_close(train_out, sm(x), rtol=0, atol=0)


def test_per_example_gates_differ_between_examples_in_training_only():
    sm = apply_structlora(toy_model(), toy_config(gate={"sampling": "example", "init_prob": 0.5}))
    randomize_b(sm)
    x = toy_inputs(batch=1).expand(4, -1, -1).contiguous()  # four copies of one example
    sm.train()
    out = sm(x)
    assert not torch.allclose(out[0], out[1])
    out.sum().backward()  # the per-example masks are differentiable in the gate logits
    assert all(g.logits.grad is not None and g.logits.grad.abs().sum() > 0
               for layer in sm.layers.values() for g in layer.gates.values())
    sm.eval()
    out = sm(x)
    torch.testing.assert_close(out[0], out[1])


def test_hard_concrete_gate_initialised_saturated_starts_exactly_as_lora():
    cfg = {"sampling": "none", "hard_concrete": True, "init_prob": 0.95, "penalty": "l0"}
    gated = apply_structlora(toy_model(), toy_config(gate=cfg, coordinator=False))
    plain = apply_structlora(toy_model(), toy_config(gate=False, coordinator=False))
    randomize_b(gated)
    randomize_b(plain)
    gated.train()
    plain.train()
    x = toy_inputs()
    torch.testing.assert_close(gated(x), plain(x), rtol=0, atol=0)


def test_kl_is_minimised_at_the_prior_and_l0_keeps_pulling_to_zero():
    phi = torch.linspace(-8, 8, 2001)
    kl = gate_penalty(phi[:, None], GateConfig(penalty="kl", prior=0.1))
    assert abs(torch.sigmoid(phi[kl.argmin()]).item() - 0.1) < 0.01  # above the 0.05 prune threshold
    l0 = expected_l0(phi[:, None])
    assert torch.all(l0[1:] > l0[:-1])  # monotone: every step down in phi lowers it
    # P(z != 0) at phi = 0 under the default stretch: sigmoid(-(2/3) log(0.1 / 1.1))
    assert math.isclose(float(expected_l0(torch.zeros(1))), 1 / (1 + math.exp((2 / 3) * math.log(0.1 / 1.1))),
                        rel_tol=1e-6)


def test_l0_penalty_prunes_directions_the_task_does_not_need():
    cfg = {"sampling": "none", "hard_concrete": True, "init_prob": 0.95, "penalty": "l0", "lambda_ib": 1.0}
    sm = apply_structlora(toy_model(), toy_config(gate=cfg, coordinator=False))
    optimizer = torch.optim.Adam([g.logits for layer in sm.layers.values() for g in layer.gates.values()], lr=0.1)
    sm.train()
    for _ in range(80):  # no task loss: only the IB term acts
        optimizer.zero_grad()
        sum(sm.regularization().values()).backward()
        optimizer.step()
    kept = sum(int(g.kept().sum()) for layer in sm.layers.values() for g in layer.gates.values())
    assert kept == 0
    assert all(float(g.deterministic().detach().max()) == 0.0 for layer in sm.layers.values() for g in layer.gates.values())


def test_kl_with_the_paper_prior_never_prunes():
    cfg = {**PAPER_GATE, "sampling": "none", "lambda_ib": 1.0}
    sm = apply_structlora(toy_model(), toy_config(gate=cfg, coordinator=False))
    optimizer = torch.optim.Adam([g.logits for layer in sm.layers.values() for g in layer.gates.values()], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        sum(sm.regularization().values()).backward()
        optimizer.step()
    gates = torch.cat([torch.sigmoid(g.logits) for layer in sm.layers.values() for g in layer.gates.values()])
    assert torch.allclose(gates, torch.full_like(gates, 0.1), atol=0.02)
    assert all(bool(g.kept().all()) for layer in sm.layers.values() for g in layer.gates.values())


@pytest.mark.parametrize("sampling", ["step", "example", "none"])
def test_every_sampling_mode_merges_exactly(sampling):
    sm = apply_structlora(toy_model(), toy_config(gate={"sampling": sampling, "hard_concrete": True,
                                                        "init_prob": 0.5}))
    randomize_b(sm)
    with torch.no_grad():
        for layer in sm.layers.values():
            for g in layer.gates.values():
                g.logits.copy_(torch.tensor([logit(0.02), logit(0.3), logit(0.7), logit(0.99)]))
    sm.eval()
    x = toy_inputs()
    expected = sm(x)
    merged = sm.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


# --- the smoother and the message share ---------------------------------------------------------


def test_smoother_message_is_minus_eta_times_the_laplacian_of_the_sketches():
    from structlora.graph import normalized_adjacency

    sm = apply_structlora(toy_model(), toy_config(gate=False, coordinator={"gnn": "smoother", "edges": "depth"}))
    randomize_b(sm)
    coordinator = sm.coordinator
    assert list(coordinator.parameters()) == list(coordinator.eta.parameters())
    H = torch.randn(len(sm.nodes), 4, 4)
    torch.testing.assert_close(coordinator(H), torch.zeros_like(H))  # eta starts at 0: plain LoRA
    with torch.no_grad():
        coordinator.eta[0].fill_(0.3)
    types = coordinator.smoothed_edge_types(coordinator.graph)
    h = H.reshape(len(H), -1)
    expected = -sum(0.3 * (h - normalized_adjacency(len(H), coordinator.graph.edges[t], h.device, h.dtype) @ h)
                    for t in types)
    torch.testing.assert_close(coordinator(H).reshape(len(H), -1), expected)


def test_message_share_is_zero_at_start_and_measured_after():
    from structlora.diagnostics import message_share

    sm = apply_structlora(toy_model(), toy_config(gate=False))
    randomize_b(sm)
    assert max(message_share(sm).values()) == 0.0
    with torch.no_grad():
        for theta in sm.coordinator.theta[0].values():
            theta.normal_(0, 0.2)
    shares = message_share(sm)
    assert set(shares) == {n.name for n in sm.nodes} and max(shares.values()) > 0
    assert message_share(apply_structlora(toy_model(), toy_config(coordinator=False))) is None
