"""The information-bottleneck rank gate (DESIGN.md 3.1).

Each adapted module owns r gate logits phi. With `sampling` step (one draw per optimizer step)
or example (one per example), training samples a relaxed Bernoulli mask
m = sigmoid((phi + log u - log(1 - u)) / tau), u ~ U(0, 1), optionally stretched to
(low, high) and clamped (hard concrete) so that exact zeros occur; with `sampling` none it
uses the deterministic gate below, as eval does. The IB term is the KL to a Bernoulli prior
or the hard-concrete expected L0 norm (`penalty`). Evaluation and merging
use the deterministic gate sigmoid(phi) (hard concrete: clamp(sigmoid(phi)(high - low) + low,
0, 1), the estimator of Louizos et al.) with directions below the prune threshold set to
exactly zero, so that the eval-mode forward and the merged weights compute the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from structlora.config import GateConfig


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def relaxed_bernoulli(logits: torch.Tensor, tau: float, hard_concrete: bool = False,
                      stretch: tuple[float, float] = (-0.1, 1.1), u: torch.Tensor | None = None) -> torch.Tensor:
    """One differentiable sample of the gate mask (binary concrete / Gumbel-sigmoid).

    Args:
        logits: phi, shape (r,).
        tau: temperature > 0; small tau gives nearly binary samples.
        hard_concrete: stretch the sample to `stretch` and clamp to [0, 1].
        u: the uniform draw, shaped like `logits` (default: a fresh one).
    """
    if u is None:
        u = uniform_noise(logits)
    sample = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if hard_concrete:
        low, high = stretch
        sample = (sample * (high - low) + low).clamp(0.0, 1.0)
    return sample


def uniform_noise(like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws shaped like `like`, kept away from 0 and 1 (the logistic noise stays finite)."""
    return torch.rand_like(like).clamp_(1e-6, 1.0 - 1e-6)


def deterministic_gate(logits: torch.Tensor, hard_concrete: bool = False,
                       stretch: tuple[float, float] = (-0.1, 1.1), threshold: float = 0.0) -> torch.Tensor:
    """The eval / merge gate: sigmoid(phi) (or its hard-concrete estimate), zero below `threshold`."""
    gate = torch.sigmoid(logits)
    if hard_concrete:
        low, high = stretch
        gate = (gate * (high - low) + low).clamp(0.0, 1.0)
    if threshold > 0.0:
        gate = torch.where(gate >= threshold, gate, torch.zeros_like(gate))
    return gate


def bernoulli_kl(logits: torch.Tensor, prior: float) -> torch.Tensor:
    """sum_j KL(Bernoulli(sigmoid(phi_j)) || Bernoulli(prior)) over the last dim, stable in phi."""
    q = torch.sigmoid(logits)
    log_q, log_1mq = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
    kl = q * (log_q - math.log(prior)) + (1.0 - q) * (log_1mq - math.log1p(-prior))
    return kl.sum(-1)


L0_BETA = 2.0 / 3.0  # the hard-concrete temperature of Louizos et al. (2018) in the expected-L0 formula


def expected_l0(logits: torch.Tensor, stretch: tuple[float, float] = (-0.1, 1.1)) -> torch.Tensor:
    """sum_j P(gate_j != 0) under the hard-concrete distribution, over the last dim.

    P(z > 0) = sigmoid(phi - beta log(-low / high)) (Louizos et al. 2018, eq. 12). Unlike the KL to
    a Bernoulli prior, its pull on phi never stops: a direction the task does not hold up ends at an
    exact zero of the (stretched, clamped) gate.
    """
    low, high = stretch
    return torch.sigmoid(logits - L0_BETA * math.log(-low / high)).sum(-1)


def gate_penalty(logits: torch.Tensor, cfg: GateConfig) -> torch.Tensor:
    """The IB term per node (summed over its directions): KL to the prior, or the expected L0 norm."""
    if cfg.penalty == "l0":
        return expected_l0(logits, (cfg.stretch_low, cfg.stretch_high))
    return bernoulli_kl(logits, cfg.prior)


def temperature_at(step: int, cfg: GateConfig) -> float:
    """tau(step): from temperature_start to temperature_end over anneal_steps, then constant."""
    t = min(max(step, 0), cfg.anneal_steps) / cfg.anneal_steps
    start, end = cfg.temperature_start, cfg.temperature_end
    if cfg.schedule == "linear":
        return start + t * (end - start)
    return start * (end / start) ** t


class RankGate(nn.Module):
    """r gate logits phi with their sampling, deterministic and KL functions.

    Args:
        rank: number of directions r.
        cfg: the gate section of the config (prior, temperature, hard concrete, threshold).
    """

    def __init__(self, rank: int, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        self.logits = nn.Parameter(torch.empty(rank))
        self.tau = cfg.temperature_start
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits.fill_(logit(self.cfg.init_prob))

    @property
    def stretch(self) -> tuple[float, float]:
        return (self.cfg.stretch_low, self.cfg.stretch_high)

    def mask(self, training: bool | None = None) -> torch.Tensor:
        """A relaxed sample in training (sampling step / example), the pruned deterministic gate otherwise."""
        training = self.training if training is None else training
        if training and self.cfg.sampling != "none":
            return relaxed_bernoulli(self.logits, self.tau, self.cfg.hard_concrete, self.stretch)
        return self.deterministic()

    def example_masks(self, batch: int) -> torch.Tensor:
        """(batch, r): one relaxed sample per example (sampling `example`)."""
        logits = self.logits.float().expand(batch, -1)
        return relaxed_bernoulli(logits, self.tau, self.cfg.hard_concrete, self.stretch)

    def deterministic(self) -> torch.Tensor:
        return deterministic_gate(self.logits, self.cfg.hard_concrete, self.stretch, self.cfg.prune_threshold)

    def kept(self) -> torch.Tensor:
        """Boolean mask of the directions that survive pruning."""
        return self.deterministic().detach() > 0

    def kl(self) -> torch.Tensor:
        return bernoulli_kl(self.logits, self.cfg.prior)

    def penalty(self) -> torch.Tensor:
        return gate_penalty(self.logits, self.cfg)

    def extra_repr(self) -> str:
        return f"rank={self.logits.numel()}, prior={self.cfg.prior}, tau={self.tau:.3g}"
