"""apply_structlora: find the targets, swap in StructLoRA layers, build the graph and coordinator.

The backbone is modified in place (like PEFT's inject_adapter) and wrapped by a
`StructLoRAModel` that owns the method's state and hooks. The coordinator is registered on
the backbone as `structlora_coordinator`, so that training the backbone (DDP, checkpoints of
its trainable parameters) covers it; `merge_and_unload` removes every trace again.

Each forward pass of the backbone first prepares a *plan*: every module's gate mask
(a relaxed sample in training, the pruned deterministic gate in eval) and, from the sketches
of all modules, the coordinator's message M for each. Layers read their entry of the plan,
so the gates that feed the coordinator are the gates that act in the layer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlora.config import StructLoRAConfig
from structlora.coordinator import COORDINATOR_NAME, GraphCoordinator, SketchBasis
from structlora.gate import gate_penalty, temperature_at, uniform_noise
from structlora.graph import LayerGraph
from structlora.inject import inject_layers
from structlora.merge import MergeMixin
from structlora.plan import gate_masks, node_sketches, sketch_groups
from structlora.variants import RankSelection, static_penalty

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def apply_structlora(model: nn.Module, config: StructLoRAConfig | dict[str, Any]) -> StructLoRAModel:
    """Adapt `model` in place with StructLoRA and return the wrapper that owns the method."""
    if isinstance(config, dict):
        config = StructLoRAConfig.from_dict(config)
    return StructLoRAModel(model, config)


def _in_backward() -> bool:
    """Is autograd running a backward pass (e.g. recomputing a checkpointed segment)?"""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class StructLoRAModel(MergeMixin, nn.Module):
    """The backbone with StructLoRA layers, its layer graph and coordinator (merge and unload:
    `structlora.merge.MergeMixin`).

    Args:
        model: any torch model whose target linear layers the config's regexes name.
        config: the StructLoRA config.
    """

    def __init__(self, model: nn.Module, config: StructLoRAConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.global_step = 0
        self.merged = False
        self.unloaded = False
        self._generation = 0
        self._plan_key: tuple | None = None
        self._noise: tuple[tuple, torch.Tensor] | None = None
        self._armed = False
        self._in_forward = False
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        self.layers, self.nodes, self._space_dims = inject_layers(model, config)
        self.graph = LayerGraph(self.nodes, config.coordinator.edge_types(), config.tower_order())
        self._sketch_groups = sketch_groups(self.nodes)
        self.coordinator: GraphCoordinator | None = None
        self._on_backbone = False  # is the coordinator registered on the backbone?
        if config.coordinator.enabled:
            self._build_coordinator()
        self.selection = RankSelection(config.selection, config.gate.anneal_steps)
        self._hooks = [model.register_forward_pre_hook(self._on_forward_start),
                       model.register_forward_hook(self._on_forward_end, always_call=True)]
        self.step(0)

    # --- construction -----------------------------------------------------------------------

    def _build_coordinator(self) -> None:
        cfg = self.config.coordinator
        coordinator = GraphCoordinator(self.graph, cfg)
        coordinator.basis = SketchBasis(self._space_dims, cfg.sketch_dim, cfg.seed)
        coordinator.to(next(iter(self.layers.values())).base_layer.weight.device)
        # the backbone hosts it (DDP and its checkpoints see the parameters), unless it is a bare
        # container whose forward would run it as one more layer
        self._on_backbone = not isinstance(self.model, _CONTAINERS)
        if not self._on_backbone:
            self.coordinator = coordinator
        else:
            self.model.add_module(COORDINATOR_NAME, coordinator)
            object.__setattr__(self, "coordinator", coordinator)
        for layer in self.layers.values():
            layer.attach(coordinator.basis, self.ensure_plan)

    # --- attribute access falls through to the backbone, as in PEFT -------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # --- the plan of one forward pass ----------------------------------------------------------

    def adapter_parameters(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"adapter": [], "gate": [], "coordinator": []}
        for layer in self.layers.values():
            groups["adapter"] += [*layer.lora_A.values(), *layer.lora_B.values()]
            groups["gate"] += [g.logits for g in (layer.gates or {}).values()]
        if self.coordinator is not None:
            groups["coordinator"] += list(self.coordinator.parameters())
        return groups

    def compute_plans(self, training: bool | None = None) -> dict[str, dict]:
        """{module: {slice: (mask, M)}}: gate masks and, with the coordinator on, its messages.

        `training` None follows the layers' mode; False gives the eval / merge plan. The plan is
        computed in float32 with autocast off (it is a few r x p products): under bf16/fp16
        training the gates and messages are those that eval and merge compute.
        """
        device = next(iter(next(iter(self.layers.values())).lora_A.values())).device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute_plans(training)

    def _step_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """The gates' uniform draw of the current optimizer step: one per step, shared by its
        micro-batches (gradient accumulation) and, with equal seeds, by every rank, so that a step
        applies one mask to its whole global batch, whatever the batch is split into."""
        key = (self.global_step, tuple(logits.shape), logits.device)
        if self._noise is None or self._noise[0] != key:
            self._noise = (key, uniform_noise(logits.detach()))
        return self._noise[1]

    def _compute_plans(self, training: bool | None) -> dict[str, dict]:
        masks = gate_masks(self.layers, self.nodes, training, noise=self._step_noise)
        mask_list = list(masks.unbind(0)) if masks is not None else [None] * len(self.nodes)
        deltas: list[torch.Tensor | None] = [None] * len(self.nodes)
        if self.coordinator is not None:
            sketches = node_sketches(self.layers, self.nodes, self._sketch_groups, masks)
            deltas = list(self.coordinator(sketches).unbind(0))
        plans: dict[str, dict] = {name: {} for name in self.layers}
        for node, mask, delta in zip(self.nodes, mask_list, deltas):
            plans[node.module][node.slice] = (mask, delta)
        return plans

    def _plan_cache_key(self) -> tuple:
        # _version catches in-place optimizer updates; data_ptr, dtype and device catch `.data` swaps
        # and `.to()` / `.half()` moves, which do not bump the version counter
        versions = tuple((p._version, p.data_ptr(), p.dtype, p.device)
                         for group in self.adapter_parameters().values() for p in group)
        return (self._generation, versions)

    def prepare(self) -> None:
        """Build the plan for the next forward pass (called by the backbone's forward pre-hook)."""
        if self.merged or self.coordinator is None:
            return
        cacheable = not torch.is_grad_enabled() and not any(layer.training for layer in self.layers.values())
        if cacheable:
            key = self._plan_cache_key()
            if key == self._plan_key and all(layer.plan is not None for layer in self.layers.values()):
                return
        plans = self.compute_plans()
        for name, layer in self.layers.items():
            layer.plan = plans[name]
        self._plan_key = self._plan_cache_key() if cacheable else None

    def ensure_plan(self) -> None:
        """Called by a layer before it reads its plan.

        Inside the backbone's forward the pre-hook has prepared it. During backward, activation
        checkpointing re-runs layers: they must reuse the plan of their forward pass (the same
        gate samples), which stays in place until the next forward. Any other call (a submodule
        run on its own) gets a fresh plan.
        """
        if self._in_forward or _in_backward():
            if self.layers and next(iter(self.layers.values())).plan is not None:
                return
        self.prepare()

    def clear_plan(self) -> None:
        for layer in self.layers.values():
            layer.plan = None
        self._plan_key = None

    def _on_forward_start(self, module, args) -> None:
        self._in_forward = True
        self.prepare()

    def _on_forward_end(self, module, args, output) -> None:
        self._in_forward = False

    # --- training hooks -------------------------------------------------------------------------

    def regularization(self) -> dict[str, torch.Tensor]:
        """Loss terms to add to the task loss, already weighted: {'ib': lambda_IB * L_IB}, plus the
        static depth penalty when one is configured ({'cosine' | 'laplacian': ...}).

        L_IB = the mean over every rank direction j of every gate of KL(Bernoulli(sigmoid(phi_j)) ||
        Bernoulli(pi)), or with `gate.penalty: l0` of P(gate_j != 0) under the hard-concrete distribution.
        """
        terms: dict[str, torch.Tensor] = {}
        gates = [g for layer in self.layers.values() for g in (layer.gates or {}).values()]
        if gates:
            penalty = gate_penalty(torch.stack([g.logits for g in gates]).float(), self.config.gate)
            terms["ib"] = self.config.gate.lambda_ib * penalty.mean()
        penalty = static_penalty(self, self.config.penalty)
        if penalty is not None:
            terms[self.config.penalty.kind] = penalty
        return terms

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Separate groups for the optimizer: adapter factors (A, B), gate logits, coordinator."""
        return self.adapter_parameters()

    @property
    def temperature(self) -> float:
        return temperature_at(self.global_step, self.config.gate)

    @property
    def semantic_edges_on(self) -> bool:
        return self.coordinator is not None and "semantic" in self.graph.edge_types

    def step(self, global_step: int) -> None:
        """Call after each optimizer step: anneals tau, on refresh steps updates semantic edges, and
        applies a configured hard rank selection (selecting at its step, re-zeroing after).

        Gradient sketches are taken during the forward/backward passes of refresh steps only:
        step 1 and every `refresh_every` steps after it; `step` arms the capture for them.
        """
        self.global_step = global_step
        tau = self.temperature
        for layer in self.layers.values():
            for gate in (layer.gates or {}).values():
                gate.tau = tau
        if self.semantic_edges_on:
            if self._armed:
                self.refresh_semantic_edges()
            self.set_capture(global_step % self.config.coordinator.refresh_every == 0)
        self.selection.step(self, global_step)
        self._generation += 1

    def set_capture(self, on: bool) -> None:
        """Accumulate gradient sketches in the following backward passes (hooks on module outputs)."""
        for layer in self.layers.values():
            layer.capture = on
        self._armed = on

    @contextlib.contextmanager
    def capturing_gradient_sketches(self):
        """`with model.capturing_gradient_sketches(): loss.backward()` then `refresh_semantic_edges()`."""
        if self.coordinator is None:
            raise RuntimeError("gradient sketches need the coordinator (coordinator.enabled)")
        self.set_capture(True)
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.capture = False

    def gradient_sketches(self) -> torch.Tensor | None:
        """Sketches accumulated since the last refresh, (N, p, p), or None if nothing was captured."""
        if not any(layer.grad_sketch for layer in self.layers.values()):
            return None
        p = self.config.coordinator.sketch_dim
        zeros = torch.zeros(p, p)
        return torch.stack([self.layers[n.module].grad_sketch.get(n.slice, zeros).float().cpu() for n in self.nodes])

    def refresh_semantic_edges(self) -> None:
        """Fold the captured gradient sketches into the EMA (averaged over ranks) and rebuild edges."""
        sketches = self.gradient_sketches()
        for layer in self.layers.values():
            layer.grad_sketch = {}
        self._armed = False
        if sketches is None or self.coordinator is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sketches = sketches.to(self.coordinator.ema_sketch.device)
            torch.distributed.all_reduce(sketches)
            sketches /= torch.distributed.get_world_size()
        self.coordinator.update_sketches(sketches)
        self._generation += 1

    # --- persistence, export, diagnostics (kept in their own modules) ---------------------------

    def save_training_state(self, path: str | os.PathLike) -> None:
        from structlora.state import save_training_state

        save_training_state(self, Path(path))

    def load_training_state(self, path: str | os.PathLike, load_parameters: bool = True) -> None:
        from structlora.state import load_training_state

        load_training_state(self, Path(path), load_parameters=load_parameters)
        self._generation += 1

    def export_peft(self, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                    svd_rank: int | None = None) -> dict[str, Any]:
        from structlora.export import export_peft

        return export_peft(self, Path(path), base_model_name_or_path, svd_rank)

    def diagnostics(self, exact: bool | None = None) -> dict[str, Any]:
        from structlora.diagnostics import diagnostics

        return diagnostics(self, exact=exact)

    def scalar_diagnostics(self) -> dict[str, float]:
        from structlora.diagnostics import scalar_diagnostics

        return scalar_diagnostics(self)

    def num_trainable(self) -> int:
        return sum(p.numel() for group in self.adapter_parameters().values() for p in group)
