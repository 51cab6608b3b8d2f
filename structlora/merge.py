"""The adapted update in the backbone's weights: `MergeMixin`, which `StructLoRAModel` inherits.

Merge folds W0 + s B diag(m) A + P_out M P_in^T (eval gates, pruned) into every base weight and
unmerge takes it out again; unload swaps the base layers back, removes the hooks and the
coordinator from the backbone and restores its parameters' `requires_grad`, after which the
wrapper refuses to act (`_check_live`). `node_factors` gives each node's update as factors
(B', A'), which diagnostics and the PEFT export read.
"""

from __future__ import annotations

import torch
from torch import nn

from structlora.coordinator import COORDINATOR_NAME
from structlora.layer import update_factors


class MergeMixin:
    """Merge, unmerge, unload and per-node factors of a `StructLoRAModel` (its `model`, `layers`,
    `nodes`, `compute_plans` and `clear_plan`, and the hooks and flags it set up)."""

    @torch.no_grad()
    def merge(self) -> None:
        """Fold W0 + s B diag(m) A + P_out M P_in^T (eval gates, pruned) into every base weight."""
        self._check_live()
        if self.merged:
            return
        plans = self.compute_plans(training=False)
        for name, layer in self.layers.items():
            layer.merge(plans[name])
        self.clear_plan()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_live()
        if not self.merged:
            return
        plans = self.compute_plans(training=False)
        for name, layer in self.layers.items():
            layer.unmerge(plans[name])
        self.merged = False

    def merge_and_unload(self) -> nn.Module:
        """The backbone with the update folded in and no StructLoRA module, hook or tensor left."""
        self.merge()
        return self._unload()

    def unload(self) -> nn.Module:
        """The backbone without the adapter (unmerged first if needed)."""
        self.unmerge()
        return self._unload()

    def _unload(self) -> nn.Module:
        self._check_live()
        for handle in self._hooks:
            handle.remove()
        for name, layer in self.layers.items():
            self.model.set_submodule(name, layer.base_layer)
        if self._on_backbone and hasattr(self.model, COORDINATOR_NAME):
            delattr(self.model, COORDINATOR_NAME)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, False))
        self.unloaded = True
        return self.model

    def _check_live(self) -> None:
        if self.unloaded:
            raise RuntimeError("this StructLoRA model was unloaded; apply_structlora again to adapt the backbone")

    # --- per-node updates (diagnostics, export) ----------------------------------------------------

    @torch.no_grad()
    def node_factors(self, drop_pruned: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per node (B', A') with dW_node = B' A' (rows x in, scale folded), eval gates and M."""
        return self._node_factors(self.compute_plans(training=False), drop_pruned)

    def _node_factors(self, plans: dict, drop_pruned: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for node in self.nodes:
            layer = self.layers[node.module]
            updates = dict(zip(layer.slice_rows, layer.slice_updates(plans[node.module], drop_pruned)))
            update = updates[node.slice]
            update.rows = None
            p_in = layer.projections(node.slice)[0] if update.delta is not None else None
            A, B, scale = update_factors([update], node.out_features, p_in)
            out.append((B.float() * scale, A.float()))
        return out
