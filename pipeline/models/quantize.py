"""A quantized frozen base (QLoRA): bitsandbytes NF4 / FP4 / int8 linears under the adapters, LLaVA's recipe.

`model.quantization: nf4 | fp4 | int8` loads the base with transformers' `BitsAndBytesConfig`: the language
model's linears become `bnb.nn.Linear4bit` / `Linear8bitLt`; the vision tower, the multimodal projector and
`lm_head` stay in the compute dtype (LLaVA's `--bits 4` never quantizes the vision tower and keeps the projector
out: LLaVA#744 and #1519 are what happens otherwise). In transformers 5.x a skip pattern must match the module's
full name (`.*vision_tower`; a bare `vision_tower` skips nothing), and giving any skip list drops the default
`lm_head` exclusion, so `lm_head` is listed too.

Merging never requantizes: pipeline/dequantize.py turns each quantized linear back into an `nn.Linear`.

The CPU trap (bitsandbytes 0.50, CPUs with AVX512-BF16): after a `Linear4bit` runs once in eval mode on a no-grad
input, bitsandbytes repacks its weight in place for a bf16 kernel; training then gets no gradient through it and
`dequantize_4bit` returns garbage. `neutralise_cpu_repack` sets `support_avx512bf16_for_cpu = False` on every
`Linear4bit`, which keeps the packed weight as it was loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError

KEEP_FLOAT = (r".*vision_tower", r".*multi_modal_projector", "lm_head")
KINDS = ("nf4", "fp4", "int8")


def compute_dtype(cfg) -> torch.dtype | None:
    """A quantized base's compute dtype (`cfg`: a RunConfig): bf16 / fp16 when training in it, else float32;
    None for an unquantized base."""
    if cfg.model.quantization == "none":
        return None
    from pipeline.stages.sharding import resolve_precision

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg.train.precision), torch.float32)


def bnb_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool = True,
               keep: tuple[str, ...] = KEEP_FLOAT):
    """transformers' BitsAndBytesConfig for `quantization` (nf4 | fp4 | int8), `keep` left unquantized."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
        raise UserError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes "
                        f"({err})") from err
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    if quantization not in ("nf4", "fp4"):
        raise UserError(f"model.quantization: {quantization!r} is none of none, {', '.join(KINDS)}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(keep))


def keep_float_for(model_class, source: str | Path, revision: str | None = None) -> tuple[str, ...]:
    """What to leave unquantized in any VLM family, found as `pipeline.models.families` finds the towers: the model is
    built on the meta device from its config (no weights read), and every linear outside the language tower
    (`get_decoder()`: the vision tower of `get_encoder(modality="image")`, the connector wherever it sits) and the
    output embeddings (`get_output_embeddings()`) are kept. Patterns are escaped full module paths, which
    transformers matches from the start up to a module boundary."""
    import re

    from transformers import AutoConfig

    from pipeline.models.families import _path_of, tower_paths

    config = AutoConfig.from_pretrained(source, revision=revision)
    with torch.device("meta"):
        model = (model_class.from_config(config) if hasattr(model_class, "from_config")
                 else model_class._from_config(config))
    head = _path_of(model, model.get_output_embeddings())
    try:
        towers = tower_paths(model)
    except ValueError as err:  # e.g. Fuyu: image patches go straight into the decoder, no vision tower
        import logging

        logging.getLogger("structlora.quantize").warning(
            "%s: %s; every linear but the output embeddings is quantized", source, err)
        return tuple(re.escape(k) for k in [head] if k)
    keep = [towers["vision"]]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name == p or name.startswith(p + ".")
                                                     for p in (towers["vision"], towers["language"])):
            keep.append(name)
    if head and head not in keep:
        keep.append(head)
    return tuple(re.escape(k) for k in keep)


def is_quantized_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def neutralise_cpu_repack(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place AVX512-BF16 repacking on every Linear4bit (see the module docstring);
    returns how many layers were touched."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


PRESET_STAMP = "preset.json"


def preset_key(cfg) -> str:
    """What a saved preset (`saved_preset`) was built from (`cfg`: a RunConfig): the model settings but how it is
    loaded (quantization, dtype), and the seed."""
    import json

    from pipeline.config import to_dict

    model = {k: v for k, v in to_dict(cfg.model).items() if k not in ("quantization", "double_quant", "dtype")}
    return json.dumps({"model": model, "seed": cfg.seed}, sort_keys=True)


def saved_preset(path: Path, build, key: str = "", wait_s: float = 3600.0) -> Path:
    """A preset (built from config, no checkpoint) saved at `path`, atomically, so that it loads quantized like any
    checkpoint: bitsandbytes quantizes while `from_pretrained` loads. `build()` -> (model, processor); a preset
    is deterministic in its seed, so the saved copy is the model the run would have built. `key` (`preset_key`) is
    stamped beside it: a copy saved from other settings (model.tiny / skeleton / seed changed between runs, with no
    base stage to notice) is built again; a model there without a stamp (the base stage's) is refused, not replaced.

    No collective: it is reached by every rank (train) or by the main one alone (merge), so rank 0 saves (under a
    private name, renamed into place) and the other ranks wait for the stamp; transformers' `save_pretrained` writes
    on rank 0 only anyway. Without a process group every process saves its own copy and the first rename wins."""
    import os
    import shutil
    import time

    path = Path(path)

    def current() -> bool:
        try:
            return (path / "config.json").is_file() and (path / PRESET_STAMP).read_text() == key
        except OSError:
            return False

    if current():
        return path
    if (path / "config.json").is_file() and not (path / PRESET_STAMP).is_file():
        raise UserError(f"{path}: holds a model that was not saved as this preset (the base stage's, or a preset saved "
                        "before presets were stamped): remove it to build the preset there, or set base.enabled: true "
                        "to train from it")
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if initialised and torch.distributed.get_rank() != 0:
        deadline = time.monotonic() + wait_s
        while not current():
            if time.monotonic() > deadline:
                raise UserError(f"{path}: rank 0 did not save the preset within {wait_s:.0f} s")
            time.sleep(1.0)
        return path
    model, processor = build()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / PRESET_STAMP).write_text(key)
    if path.exists():  # a preset saved from other settings
        stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
        path.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not current():
            raise UserError(f"{path}: exists without this preset's config.json; remove it and run again") from None
    return path


def saved_kind(source: str | Path, revision: str | None = None, name: str | None = None) -> str | None:
    """How a checkpoint was saved: 'nf4' / 'fp4' / 'int8' for one quantized by bitsandbytes (its config.json holds a
    `quantization_config`, e.g. a `*-bnb-4bit` upload or a QLoRA base saved after loading), None for a float one.
    Other quantizers (GPTQ, AWQ, compressed-tensors, fp8, ...) are refused: they are not built here."""
    from transformers import AutoConfig

    q = getattr(AutoConfig.from_pretrained(source, revision=revision), "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method", "unknown")
    if method != "bitsandbytes":
        raise UserError(f"{name or source}: its config.json's quantization_config has quant_method={method!r}; only "
                        "bitsandbytes bases (nf4 / fp4 / int8) are built here: give the float checkpoint and set "
                        "model.quantization to quantize it while loading")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return "int8"
    return str(q.get("bnb_4bit_quant_type", "fp4"))


def check_saved(source: str | Path, requested: str, revision: str | None = None, name: str | None = None,
                option: str = "model.quantization") -> str | None:
    """A saved-quantized checkpoint's kind (`saved_kind`), refused unless `model.quantization` names it: loading it
    with none would train on 4-bit weights that the merge then cannot fold into (there are no float weights to
    load), and another kind cannot be had without the float weights either."""
    kind = saved_kind(source, revision, name)
    if kind is not None and requested != kind:
        what = "none (a float base)" if requested == "none" else requested
        how = f"--set {option}={kind}" if option.startswith("model.") else f"{option} {kind}"
        raise UserError(f"{name or source}: saved quantized by bitsandbytes ({kind}), but {option} is {what}: "
                        f"set {option}={kind} (e.g. {how}); it trains on the 4-bit weights as saved and merges by "
                        "dequantizing them")
    return kind


def load_quantized(model_class, source: str | Path, quantization: str, compute_dtype: torch.dtype,
                   double_quant: bool = True, revision: str | None = None, device_map: Any = None,
                   keep: tuple[str, ...] | None = None, name: str | None = None,
                   option: str = "model.quantization"):
    """`model_class.from_pretrained(source)` with the language model quantized (LLaVA's recipe), the trap off;
    `keep` (unquantized module patterns) defaults to `keep_float_for(model_class, source)`. A checkpoint saved
    quantized (`saved_kind`) loads as saved (its own skip list and double quant), computing in `compute_dtype`."""
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    # Always loaded in float32, then cast (`to_compute_dtype`): transformers casts a weight to `dtype` before
    # bitsandbytes quantizes it, so loading in bf16 would give other 4-bit codes than the float32 load the merge
    # makes (an fp16 / fp32 checkpoint: ~1% of the bytes, whole NF4 steps, 3e-2 in the logits)
    if check_saved(source, quantization, revision, name, option) is not None:
        model = model_class.from_pretrained(source, revision=revision, dtype=torch.float32, device_map=device_map)
    else:
        if keep is None:
            keep = keep_float_for(model_class, source, revision)
        model = model_class.from_pretrained(source, revision=revision, dtype=torch.float32, device_map=device_map,
                                            quantization_config=bnb_config(quantization, compute_dtype, double_quant,
                                                                           keep))
    to_compute_dtype(model, compute_dtype)
    neutralise_cpu_repack(model)
    return model


def to_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """What `from_pretrained(dtype=compute_dtype)` gives, after the fact on a quantized model: the float parameters
    and persistent buffers cast (not the non-persistent ones such as RoPE's inv_freq, computed in float32; not the
    model's `_keep_in_fp32_modules[_strict]`, where transformers keeps them), and every quantized linear computing
    and dequantizing in it (a saved checkpoint's quant_state may say bf16: the forward and the dequantized weight
    the merge folds into would differ by ~2e-3)."""
    import re

    patterns = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if compute_dtype != torch.float32 \
        else set()
    if compute_dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    kept = re.compile("|".join(re.escape(p).replace(r"\*", ".*") for p in patterns)) if patterns else None
    for prefix, module in model.named_modules():
        if is_quantized_linear(module):
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = compute_dtype
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                state.dtype = compute_dtype
        persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in getattr(module, "_non_persistent_buffers_set", ())]
        for name, tensor in list(module.named_parameters(recurse=False)) + persistent:
            full = f"{prefix}.{name}" if prefix else name
            if tensor.is_floating_point() and tensor.dtype != compute_dtype and not (kept and kept.search(full)):
                tensor.data = tensor.data.to(compute_dtype)


def layout(model: nn.Module) -> dict[str, str]:
    """Every linear layer's storage: 'nf4' / 'fp4' / 'int8' for quantized ones, else its weight dtype."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = module.weight.quant_state.quant_type if module.weight.quant_state is not None else "4bit"
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[name] = "int8"
        elif isinstance(module, nn.Linear):
            out[name] = str(module.weight.dtype).removeprefix("torch.")
    return out
