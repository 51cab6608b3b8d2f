"""Adaptation methods behind one interface, so one training recipe serves them all.

`attach_method` wraps a backbone with StructLoRA, a PEFT baseline (LoRA, DoRA, AdaLoRA,
VeRA) or full fine-tuning on the same target modules, and returns an `AdaptedModel`:
the module to train, its parameter groups, the regularisers it adds to the loss (named, so
the recipe can log every term), a per-step hook, and its trainable state for checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.schema import AdapterConfig, TrainConfig


@dataclass
class AdaptedModel:
    """A backbone with its adaptation method attached.

    Attributes:
        model: the module to call (PeftModel, the StructLoRA-injected backbone, or the backbone).
        method: the method's name.
        full_modules: names of modules trained fully (parts configured `full`).
        handle: the method's own object (StructLoRAModel or PeftModel), for its hooks.
    """

    model: nn.Module
    method: str
    handle: Any = None
    full_modules: list[str] = field(default_factory=list)
    adalora_total_steps: int | None = None

    # --- what the recipe calls ---------------------------------------------------------------

    def param_groups(self, train: TrainConfig) -> list[dict[str, Any]]:
        """AdamW groups: adapter factors, gates, coordinator (StructLoRA) each with its own lr."""
        if self.method == "structlora":
            groups = self.handle.trainable_parameter_groups()
            lrs = {"adapter": train.lr, "gate": train.gate_lr, "coordinator": train.lr_coordinator or train.lr}
            # no weight decay on gate logits (it would pull every gate to 0.5, against the IB prior)
            # nor on the coordinator (its zero init is "plain LoRA"; decay is not a prior we want there)
            out = [{"params": params, "lr": lrs.get(name, train.lr), "name": name,
                    **({"weight_decay": 0.0} if name in ("gate", "coordinator") else {})}
                   for name, params in groups.items() if params]
            out += self._full_group(train)
            return out
        trainable = [p for n, p in self.model.named_parameters() if p.requires_grad]
        return [{"params": trainable, "lr": train.lr, "name": "adapter" if self.method != "full" else "full"}]

    def _full_group(self, train: TrainConfig) -> list[dict[str, Any]]:
        params, seen = [], set()
        for name in self.full_modules:  # a tied embedding / lm_head is one tensor: one update per step
            for p in self.model.get_submodule(name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return [{"params": params, "lr": train.lr, "name": "full"}] if params else []

    def regularization(self) -> dict[str, torch.Tensor]:
        """Named loss terms to add to the task loss (already weighted)."""
        if self.method == "structlora":
            return dict(self.handle.regularization())
        if self.method == "adalora":
            return {"orth": adalora_orthogonality(self.model, self.handle.peft_config["default"].orth_reg_weight_ours)}
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """Hook after the optimizer step, before zero_grad (AdaLoRA's rank allocation, as PEFT documents it)."""
        if self.method == "adalora":
            self.handle.base_model.update_and_allocate(step)

    def on_step(self, step: int) -> None:
        """Hook after each optimizer step (StructLoRA: temperature annealing, semantic-edge refresh)."""
        if self.method == "structlora":
            self.handle.step(step)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that training changes (adapter, gates, coordinator, full parts), by name."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def adalora_orthogonality(model: nn.Module, weight: float) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty on P (lora_A) and Q (lora_B), computed in plain sight.

    PEFT adds it inside forward; we set its weight to 0 there and add the same quantity here:
    weight * mean over matrices of ||M M^T - I||_F (rows of A, columns of B).
    """
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.dim() == 2:
            mat = p if "lora_A" in name else p.T
            eye = torch.eye(mat.shape[0], device=p.device, dtype=p.dtype)
            terms.append(torch.linalg.matrix_norm(mat @ mat.T - eye))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).mean()


def _set_trainable(model: nn.Module, module_names: list[str]) -> None:
    for name in module_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def attach_method(model: nn.Module, adapter: AdapterConfig, target_names: list[str], full_modules: list[str],
                  max_steps: int, structlora_config: Any = None, seed: int = 0,
                  frozen_modules: list[str] = ()) -> AdaptedModel:
    """Attach `adapter.method` to `model` on the modules named in `target_names`.

    Args:
        target_names: full dotted names of the linear layers to adapt (both towers, projector).
        full_modules: names of submodules trained fully (parts configured `full`).
        max_steps: training length (AdaLoRA's budget schedule needs it).
        structlora_config: a `structlora.StructLoRAConfig` when method is structlora.
        seed: seeds the adapter's initialisation, independently of the global RNG.
        frozen_modules: modules that stay frozen even under full fine-tuning (they get no gradient).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _attach(model, adapter, target_names, full_modules, max_steps, structlora_config, frozen_modules)


def _attach(model: nn.Module, adapter: AdapterConfig, target_names: list[str], full_modules: list[str],
            max_steps: int, structlora_config: Any, frozen_modules: list[str]) -> AdaptedModel:
    method = adapter.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        for name in frozen_modules:  # layers that get no gradient (CLIP past vision_feature_layer)
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(False)
        return AdaptedModel(model=model, method="full")
    for p in model.parameters():
        p.requires_grad_(False)
    if not target_names and method != "full":
        raise ValueError("no module matches the adapter's targets: check adapter.targets and the towers")
    if method == "structlora":
        from structlora import apply_structlora

        handle = apply_structlora(model, structlora_config)
        _set_trainable(model, full_modules)
        return AdaptedModel(model=model, method=method, handle=handle, full_modules=full_modules)

    from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model

    common = {"target_modules": list(target_names)}
    if method in ("lora", "dora"):
        cfg = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                         use_dora=method == "dora", **common)
    elif method == "adalora":
        # AdaLoRA starts at 1.5x the rank and prunes to the rank: the usual setting of its paper.
        tinit, tfinal = max(1, int(0.1 * max_steps)), max(1, int(0.3 * max_steps))
        if tinit + tfinal >= max_steps:
            tinit, tfinal = 0, 0
        cfg = AdaLoraConfig(init_r=max(adapter.rank, int(round(1.5 * adapter.rank))), target_r=adapter.rank,
                            lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, total_step=max_steps,
                            tinit=tinit, tfinal=tfinal, deltaT=max(1, max_steps // 50), orth_reg_weight=0.0,
                            **common)
    elif method == "vera":
        cfg = VeraConfig(r=adapter.vera_rank, vera_dropout=adapter.dropout, **common)
    else:  # pragma: no cover - the config schema lists the methods
        raise ValueError(f"unknown method {method!r}")
    peft_model = get_peft_model(model, cfg)
    if method == "adalora":
        peft_model.peft_config["default"].orth_reg_weight_ours = 0.5  # PEFT's default weight, applied by us
    _set_trainable(peft_model.base_model.model, full_modules)
    prefixed = [f"base_model.model.{n}" for n in full_modules]
    return AdaptedModel(model=peft_model, method=method, handle=peft_model, full_modules=prefixed)


def regex_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of nn.Linear modules whose full name matches one of `patterns` (re.search)."""
    compiled = [re.compile(p) for p in patterns]
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(c.search(name) for c in compiled)]
