"""Diagnostics: drift energy, adjacent cosine (exact and sketched), kept rank, gate values."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import toy_config, toy_model
from test_structlora_layer import randomize

from structlora import apply_structlora, drift_energy
from structlora.diagnostics import cosine, dirichlet_energy, update_vectors


def test_drift_energy_and_cosine_pinned():
    u = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])]
    assert drift_energy(u, [(0, 1), (1, 2)]) == pytest.approx(2.0 + 1.0)
    assert cosine(u[1], u[2]) == pytest.approx(1.0) and cosine(u[0], u[1]) == pytest.approx(0.0)
    assert dirichlet_energy(torch.stack(u), [(0, 1), (1, 2)], normalized=True) == pytest.approx(3.0 / 6.0)


def test_diagnostics_of_a_model():
    sm = apply_structlora(toy_model(), toy_config())
    randomize(sm)
    diag = sm.diagnostics()
    assert diag["exact"] is True
    assert set(diag["adjacent_cosine"]) == {"vision.q", "vision.v", "language.q", "language.v"}
    assert all(len(v) == 2 and all(-1 <= c <= 1 for c in v) for v in diag["adjacent_cosine"].values())
    assert diag["drift_energy_total"] == pytest.approx(sum(diag["drift_energy"].values()))
    vectors, _ = update_vectors(sm, exact=True)
    chain = sm.graph.chains()["vision.q"]
    assert diag["drift_energy"]["vision.q"] == pytest.approx(drift_energy(vectors, list(zip(chain, chain[1:]))))
    for node in sm.nodes:
        gate = sm.layers[node.module].gates[node.slice]
        # the hard-concrete eval gate: sigmoid stretched to (-0.1, 1.1), clamped, cut below the threshold
        eval_gate = (torch.sigmoid(gate.logits) * 1.2 - 0.1).clamp(0, 1)
        assert diag["kept_rank"][node.name] == int((eval_gate >= 0.05).sum())
    assert sum(len(v) for v in diag["gates"].values()) == 4 * len(sm.nodes)
    scalars = sm.scalar_diagnostics()
    assert scalars["drift_energy"] == pytest.approx(diag["drift_energy_total"])
    assert set(scalars) >= {"adjacent_cosine_mean", "kept_rank_mean", "gate_mean", "temperature"}


def test_sketched_vectors_preserve_inner_products_in_expectation():
    sm = apply_structlora(toy_model(), toy_config(coordinator=False))
    randomize(sm)
    exact, _ = update_vectors(sm, exact=True)
    chain = sm.graph.chains()["language.q"]
    a, b = chain[0], chain[1]
    estimates = [update_vectors(sm, exact=False, sketch_size=64, seed=s)[0] for s in range(8)]
    mean_dot = sum(float(v[a] @ v[b]) for v in estimates) / len(estimates)
    mean_sq = sum(float(v[a] @ v[a]) for v in estimates) / len(estimates)
    assert mean_sq == pytest.approx(float(exact[a] @ exact[a]), rel=0.25)
    assert mean_dot == pytest.approx(float(exact[a] @ exact[b]), abs=0.25 * float(exact[a].norm() * exact[b].norm()))


def test_eval_plots_draw_the_diagnostics(tmp_path):
    from eval.plots import plot_diagnostics

    sm = apply_structlora(toy_model(), toy_config())
    randomize(sm)
    plots = plot_diagnostics(sm.diagnostics(), tmp_path, max_rank=4)
    assert set(plots) == {"adjacent_cosine", "drift_energy", "kept_rank", "gates"}
    assert all(p.is_file() for p in plots.values())
