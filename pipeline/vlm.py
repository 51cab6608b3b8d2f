"""Any VLM family as a backbone (`model.arch: vlm`): load or build it, find what to adapt, from the model itself.

- `load_vlm(cfg)`: `AutoModelForImageTextToText` + `AutoProcessor` by hub id or local directory (LLaVA-1.5,
  LLaVA-NeXT / OneVision, Qwen2-VL / 2.5-VL / 3-VL, Idefics3 / SmolVLM, Gemma 3, PaliGemma, Mistral 3,
  InternVL: whatever transformers loads with that class).
- `build_vlm(cfg, seed)`: `preset: tiny-<family>`, the family's tiny random model and its own processor class,
  built offline (`pipeline.families`, `pipeline.family_processors`), for tests and the default's speed.
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.backbones import DTYPES, resolve_pretrained
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.schema import AdapterConfig, ModelConfig

log = logging.getLogger("structlora.vlm")
TINY_PREFIX = "tiny-"


def preset_family(preset: str | None) -> str | None:
    """'qwen2_5_vl' for 'tiny-qwen2_5_vl'; None for other presets."""
    return preset[len(TINY_PREFIX):] if preset and preset.startswith(TINY_PREFIX) else None


def _generation_ids(model: nn.Module, processor: Any) -> None:
    tok = processor.tokenizer
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(tok, key, None) is not None:
            setattr(model.generation_config, key, getattr(tok, key))


def build_vlm(cfg: ModelConfig, seed: int = 0):
    """(model, processor) of a `tiny-<family>` preset: random weights from `seed`, no network."""
    from pipeline.families import build_tiny
    from pipeline.family_processors import tiny_processor

    family = preset_family(cfg.preset)
    with torch.random.fork_rng(devices=[]):
        model = build_tiny(family, seed=seed)
    processor = tiny_processor(family)
    _generation_ids(model, processor)
    return model.to(DTYPES[cfg.dtype]), processor


def load_vlm(cfg: ModelConfig, compute_dtype: torch.dtype | None = None):
    """(model, processor) from a hub id or local directory, with `AutoModelForImageTextToText`; with
    `cfg.quantization` the language tower's linears quantized, computing in `compute_dtype` (pipeline.quantize:
    the vision tower, the connector and the output embeddings kept, found from the model as the towers are)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert cfg.name_or_path is not None
    source = resolve_pretrained(cfg.name_or_path, cfg.revision)
    try:
        if cfg.quantization == "none":
            from pipeline.quantize import check_saved

            check_saved(source, "none", cfg.revision, cfg.name_or_path)
            model = AutoModelForImageTextToText.from_pretrained(source, revision=cfg.revision,
                                                                dtype=DTYPES[cfg.dtype])
        else:
            from pipeline.quantize import load_quantized

            model = load_quantized(AutoModelForImageTextToText, source, cfg.quantization,
                                   compute_dtype or DTYPES[cfg.dtype], cfg.double_quant, cfg.revision,
                                   name=cfg.name_or_path)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):  # e.g. a quantizer's own error: as it is
            raise
        raise UserError(f"{cfg.name_or_path}: not an image-text-to-text model transformers can load "
                        f"({str(err).splitlines()[0]})") from None
    processor = AutoProcessor.from_pretrained(source, revision=cfg.revision)
    if not getattr(processor, "chat_template", None):
        raise UserError(f"{cfg.name_or_path}: its processor has no chat template; model.arch=vlm renders every "
                        "prompt through it (give a processor with one, e.g. the -Instruct / -hf checkpoint)")
    return model, processor


def make_vlm(cfg: ModelConfig, seed: int = 0):
    return build_vlm(cfg, seed) if preset_family(cfg.preset) else load_vlm(cfg)


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
    from pipeline.families import connector_parts, tower_paths

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


def plan_for(model: nn.Module, processor: Any, adapter: AdapterConfig, max_steps: int) -> VlmPlan:
    """The tower table, dead parameters and targets of `model` for `adapter` (see the module docstring)."""
    from pipeline.families import layer_table
    from pipeline.family_targets import adapter_towers, structlora_config, structlora_targets

    table = layer_table(model)
    dead = probed(model, processor)
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


def load_vlm_base(ctx: StageContext, path: Path):
    """(model, processor) of `model.arch: vlm`: the base stage's model, the tiny family preset, or the config's;
    `model.quantization` applies to a loaded model: a preset's is the base stage's, or without a base stage the
    preset saved in its place (quantize.saved_preset)."""
    from pipeline.quantize import compute_dtype, preset_key, saved_preset

    cfg = ctx.cfg
    if cfg.model.preset is not None and (cfg.base.enabled or cfg.model.quantization != "none"):
        if not cfg.base.enabled:  # the preset saved to load quantized
            saved_preset(path, lambda: make_vlm(cfg.model, seed=cfg.seed), preset_key(cfg))
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: base model missing: run the base stage first (--stages base)")
        return load_vlm(ModelConfig(arch="vlm", name_or_path=str(path), dtype=cfg.model.dtype,
                                    quantization=cfg.model.quantization, double_quant=cfg.model.double_quant),
                        compute_dtype(cfg))
    if cfg.model.preset is None:
        return load_vlm(cfg.model, compute_dtype(cfg))
    return make_vlm(cfg.model, seed=cfg.seed)


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
