"""What to adapt on any VLM family (LLaVA-1.5 included), found from the model itself; models are opened by the
door, `pipeline.models.door.open_model`.

- `VlmPlan` / `plan_for(model, processor, adapter)`: the tower table (`families.layer_table`), the dead
  parameters found by walking the autograd graph of one forward of a probe batch made by the training collator (for every
  family, not a LLaVA special case: LLaVA-1.5 / NeXT's last vision layer, a tower's post-layernorm), the
  linears to adapt (the same names for StructLoRA and the PEFT baselines) and the submodules trained fully.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.schema import AdapterConfig

log = logging.getLogger("structlora.vlm")


# --- what to adapt --------------------------------------------------------------------------------


def probe_batch(processor: Any) -> dict[str, torch.Tensor]:
    """One caption example through the training collator: what training feeds every family."""
    from PIL import Image

    from data.chat_collate import ChatCollator

    image = Image.new("RGB", (64, 48), (180, 40, 40))
    sample = {"task": "caption", "image": image, "captions": ["a red square on a white background."]}
    return ChatCollator(processor, max_length=1 << 20)([sample])


def dead_parameters(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    """Parameters the loss of `batch` does not depend on: not reached by walking the autograd graph of one forward
    back from the loss (no backward, so no gradient memory: a 7B probe costs one forward's activations).

    Every floating-point parameter is made to require grad for the forward and restored after. A quantized weight
    (bitsandbytes packs it into integers, which cannot require grad) is reached when its layer's output is: a
    probe scalar (1.0) multiplies that output, and the weight counts as reached with it."""
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    param = next(p for p in model.parameters() if p.is_floating_point())
    inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
              for k, v in batch.items()}
    probes: dict[int, torch.Tensor] = {}  # id(integer weight) -> its layer's probe scalar
    hooks = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and not weight.is_floating_point():
            probe = torch.ones((), device=param.device, requires_grad=True)
            probes[id(weight)] = probe
            hooks.append(module.register_forward_hook(lambda _m, _i, out, s=probe: out * s.to(out.dtype)))
    try:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            loss = model(**inputs).loss
        live: set[int] = set()
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, "variable"):  # AccumulateGrad: a leaf, i.e. a parameter the loss reaches
                live.add(id(fn.variable))
            stack.extend(f for f, _ in fn.next_functions)
        del loss
        return [n for n, p in model.named_parameters()
                if id(p) not in live and not (id(p) in probes and id(probes[id(p)]) in live)]
    finally:
        for hook in hooks:
            hook.remove()
        for n, p in model.named_parameters():
            if p.is_floating_point():
                p.requires_grad_(was[n])


def probed(model: nn.Module, processor: Any) -> list[str]:
    """`dead_parameters` on this process's accelerator when it has one (a 7B forward on a CPU takes minutes);
    the model goes back where it was."""
    from accelerate import PartialState

    device, where = PartialState().device, next(model.parameters()).device
    if device.type == where.type:
        return dead_parameters(model, probe_batch(processor))
    model.to(device)
    try:
        return dead_parameters(model, probe_batch(processor))
    finally:
        model.to(where)


@dataclass
class VlmPlan:
    """What a run adapts on a VLM: `target_names` (StructLoRA and PEFT alike), `full_modules` (parts
    configured `full`, without dead parameters), `frozen_modules` (owners of dead parameters: frozen even under
    full fine-tuning), the StructLoRA config when the method is structlora, and notes in words."""

    table: list[Any]
    target_names: list[str]
    full_modules: list[str]
    frozen_modules: list[str]
    structlora_config: Any = None
    notes: list[str] = field(default_factory=list)


def _owners(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] for n in names})


def full_modules(model: nn.Module, adapter: AdapterConfig, dead: list[str], targets: Sequence[str] = ()) -> list[str]:
    """Leaf modules with parameters of the parts configured `full` (lm_head with the language model), none dead
    and none adapted: a connector inside the vision module (Qwen-VL's merger) goes with `projector`, not `vision`."""
    from pipeline.models.families import connector_parts, tower_paths

    paths = tower_paths(model)
    head = model.get_output_embeddings()
    moved = connector_parts(model, paths["vision"])

    def under(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    skip = set(_owners(dead)) | set(targets)
    out = []
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)) or name in skip:
            continue
        if under(name, moved) or not (under(name, paths.values()) or module is head):
            wanted = adapter.projector == "full"  # the connector, wherever it sits
        elif under(name, [paths["vision"]]):
            wanted = adapter.vision == "full"
        else:  # the language model and lm_head
            wanted = adapter.language == "full"
        if wanted:
            out.append(name)
    return out


def plan_for(model: nn.Module, processor: Any, adapter: AdapterConfig, max_steps: int,
             probe: dict[str, torch.Tensor] | None = None) -> VlmPlan:
    """The tower table, dead parameters and targets of `model` for `adapter` (see the module docstring); the dead
    parameters are found on a probe batch made by the training collator from `processor`, or on `probe` (a batch
    the model takes, for a model built without a processor)."""
    from pipeline.models.families import layer_table
    from pipeline.models.targets import adapter_towers, structlora_config, structlora_targets

    table = layer_table(model)
    dead = probed(model, processor) if probe is None else dead_parameters(model, probe)
    dead_linears = [n.rsplit(".", 1)[0] for n in dead if n.endswith(".weight")]
    towers = adapter_towers(adapter)
    notes: list[str] = []
    names: list[str] = []
    config = None
    if towers and adapter.method != "full":
        try:
            found = structlora_targets(model, table, adapter.targets, dead_linears, towers)
        except ValueError as err:
            raise UserError(f"adapter.targets: {err}") from None
        names, notes = found.names, list(found.notes)
        if adapter.method == "structlora":
            config = structlora_config(found, adapter, max_steps)
    if dead:
        notes.append(f"{len(dead)} parameters get no gradient on a probe batch and stay frozen: "
                     + ", ".join(_owners(dead)[:6]) + (" ..." if len(_owners(dead)) > 6 else ""))
    for note in notes:
        log.info("%s: %s", type(model).__name__, note)
    return VlmPlan(table=table, target_names=names, full_modules=full_modules(model, adapter, dead, names),
                   frozen_modules=_owners(dead), structlora_config=config, notes=notes)


# --- the stages' parts ------------------------------------------------------------------------------


def vlm_image_budget(ctx: StageContext, processor, train_sources: Sequence[Any]) -> dict[str, int]:
    """Before training: how many tokens the first training image of each task expands to with this family's
    processor (any-res tiles, dynamic resolution), logged; a warning when it leaves no room under max_length."""
    from data.chat_collate import ChatCollator
    from data.stream import EvalStream

    collate, counts = ChatCollator(processor, max_length=ctx.cfg.data.max_length), {}
    for source in train_sources:
        first = itertools.islice(EvalStream(source, rank=0, world_size=1), 64)  # text-only data: do not read it all
        example = next((e for e in first if e.get("image") is not None or e.get("images")), None)
        if example is None:
            continue
        image = example.get("image") or example["images"][0]
        counts[source.name] = collate.image_tokens(image)
        log.info("%s: a %dx%d image is %d tokens for %s", source.name, *image.size, counts[source.name],
                 type(processor).__name__)
        if counts[source.name] >= ctx.cfg.data.max_length:
            line = (f"{source.name}: one {image.size[0]}x{image.size[1]} image expands to {counts[source.name]} "
                    f"tokens, not below data.max_length={ctx.cfg.data.max_length}: such examples cannot fit and "
                    "will be dropped (counted as over-long examples); raise data.max_length or bound the "
                    "processor's image size")
            log.warning(line)
            print(f"warning: {line}")
    return counts
