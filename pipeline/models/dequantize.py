"""Merging on a quantized base: back to float linears, never requantized.

`dequantized_linear` turns a bitsandbytes `Linear4bit` / `Linear8bitLt` into an `nn.Linear` holding exactly the
weight the quantized forward computes with (bitsandbytes' own dequantize); `dequantize_model` does it for a whole
model (also under PEFT's bnb layers, which become PEFT's plain float layers), so the adapter folds into that
weight in float32 and the merged model reproduces the quantized adapted model (what the adapter was trained on).
`other_merge_paths` measures what the two merges avoided here would have cost (merge_check.json).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.quantize import is_quantized_linear


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight a quantized linear computes with (bitsandbytes' dequantize), out x in."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return (weight.data.float() * scb.float().unsqueeze(1) / 127.0)
    return module.weight.float()


@torch.no_grad()
def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An nn.Linear with a quantized linear's dequantized weight (and its bias), in `dtype`."""
    weight = dequantized_weight(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype,
                       device=weight.device)
    linear.weight.copy_(weight.to(dtype))
    if module.bias is not None:
        linear.bias.copy_(module.bias.float().to(dtype))
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized linear of `model` (also those wrapped as an adapter's `base_layer`) by
    `dequantized_linear`, in place; drop the quantization config so that the model saves as a plain one.
    Returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if is_quantized_linear(child):
                setattr(module, child_name, dequantized_linear(child, dtype))
                replaced += 1
    _plain_peft_layers(model)
    for module in model.modules():  # the transformers model, also under a PEFT wrapper: a plain model again
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for attr in ("quantization_method", "hf_quantizer"):
            if attr in vars(module):
                setattr(module, attr, None)
        for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if attr in vars(module):
                setattr(module, attr, False)
        conversions = vars(module).get("_weight_conversions")
        if conversions:  # a checkpoint saved quantized loaded through bitsandbytes' deserializers: saving a plain
            module._weight_conversions = [  # model must not try to reverse them (they have no reverse)
                c for c in conversions if not any("bitsandbytes" in type(op).__module__
                                                  for op in getattr(c, "operations", ()))]
    return replaced


def _plain_peft_layers(model: nn.Module) -> None:
    """PEFT wraps a quantized linear in its bnb LoRA / DoRA layer, whose merge dequantizes and requantizes its
    base weight; once that base is an nn.Linear (dequantize_model), the layer is exactly PEFT's plain Linear
    LoRA layer (the same adapter state, lora_A / lora_B / scaling / DoRA magnitude), so it becomes one and
    merges with PEFT's own float code."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    bnb_layers = tuple(getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n))
    for module in model.modules():
        if bnb_layers and isinstance(module, bnb_layers) and isinstance(module.get_base_layer(), nn.Linear) \
                and not is_quantized_linear(module.get_base_layer()):
            module.__class__ = LoraLinear
            module.fan_in_fan_out = getattr(module, "fan_in_fan_out", False)


@torch.no_grad()
def other_merge_paths(merged: nn.Module, names: list[str], float_base: nn.Module, quant_type: str,
                      double_quant: bool, logits, reference: list[torch.Tensor]) -> dict[str, float]:
    """Max |logit difference| from the quantized adapted model (`reference`) of the two merges a quantized base
    does not get here, measured on `merged` (changed in place: call it on a copy that is not saved):
    requantized = the merged weights quantized again (PEFT's merge_and_unload on a 4-bit model);
    float_base = the adapter's update added to the original float weights (LLaVA's merge script), i.e. the merged
    weights + (float weight - its dequantized quantization). `names`: the linears that were quantized."""
    import bitsandbytes.functional as F

    modules = dict(merged.named_modules())
    originals = dict(float_base.named_modules())

    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        if quant_type == "int8":
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            return (weight / scale).round().clamp(-127, 127) * scale
        packed, state = F.quantize_4bit(weight.float().contiguous(), quant_type=quant_type,
                                        compress_statistics=double_quant)
        return F.dequantize_4bit(packed, state).float()

    kept = {n: modules[n].weight.detach().clone() for n in names}
    out = {}
    for path in ("requantized", "float_base"):
        for name in names:
            weight = kept[name].float()
            if path == "requantized":
                new = roundtrip(weight)
            else:
                original = originals[name].weight.float().to(weight.device)
                new = weight + (original - roundtrip(original))
            modules[name].weight.copy_(new.to(modules[name].weight.dtype))
        out[path] = max(float((a - b).abs().max()) for a, b in zip(reference, logits(merged)))
    for name in names:
        modules[name].weight.copy_(kept[name])
    return out
