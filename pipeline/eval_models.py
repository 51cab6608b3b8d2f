"""The MODEL and ``--adapter`` arguments of ``structlora eval``: what each names, under which name, and loading it.

A MODEL is, in this order of precedence:

- ``NAME=MODEL``: any of the below, shown as NAME in the report;
- a run directory (it has ``manifest.json``): the run's merged model, ``merge/model``;
- a local model directory (``config.json``, as ``save_pretrained`` writes it);
- the name of an entry of ``--registry DIR`` (the publish stage's registry);
- a Hugging Face Hub id (``llava-hf/llava-1.5-7b-hf``), from the local cache or the hub.

``--adapter [NAME=]PEFT_DIR`` (repeatable) adds the FIRST model with that PEFT adapter on top,
as PEFT loads it (``PeftModel.from_pretrained``), without merging. `build_entries` turns them into the
harness's ModelEntries, each loaded only when it is scored; pipeline.eval_command runs them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.models.hub import DTYPES

log = logging.getLogger("structlora.eval")

GENERIC_NAMES = {"model", "merged", "final", "base", "peft_adapter", "adapter"}
_LABEL = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")


def split_label(spec: str) -> tuple[str | None, str]:
    """('NAME', 'MODEL') of 'NAME=MODEL', else (None, spec). NAME becomes a folder under --out."""
    match = _LABEL.match(spec)
    if match and not Path(spec).exists():
        if match.group(1).strip(".") == "":
            raise UserError(f"{spec}: '{match.group(1)}' cannot name a model (it is a folder under --out)")
        return match.group(1), match.group(2)
    return None, spec


def _default_name(source: str) -> str:
    path = Path(source.rstrip("/"))
    name = path.name or source
    if name in GENERIC_NAMES and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def resolve_model(spec: str, registry: Path | None = None, revision: str | None = None) -> tuple[str, str]:
    """(default name, loadable source: a local directory or a hub id) of a MODEL argument.

    Raises a one-line UserError for anything that cannot be loaded (a hub id without network
    included), before any model is loaded.
    """
    from pipeline.models.hub import resolve_pretrained

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            merged = path / "merge" / "model"
            if not (merged / "config.json").is_file():
                raise UserError(f"{path}: a run directory without a merged model ({merged}/config.json): run its "
                                f"merge stage (structlora run {path}/config.yaml --stages merge)")
            return path.name, str(merged)
        if (path / "config.json").is_file():
            return _default_name(str(path)), str(path)
        if (path / "adapter_config.json").is_file():
            raise UserError(f"{path} is a PEFT adapter, not a model: give its base model as MODEL and "
                            f"--adapter {path}")
        raise UserError(f"{path}: neither a model directory (config.json), a run directory (manifest.json) "
                        "nor a PEFT adapter (adapter_config.json)")
    if registry is not None:
        from app.registry import load_registry

        entries = {e["name"]: e for e in load_registry(registry)}
        if spec in entries:
            target = Path(entries[spec]["path"])
            if not target.is_absolute():
                target = Path(registry) / target
            if not (target / "config.json").is_file():
                raise UserError(f"{registry}/index.json: entry '{spec}': path {target} has no config.json")
            return spec, str(target)
    source = resolve_pretrained(spec, revision)
    return _default_name(spec), source


def load_model(source: str, dtype: torch.dtype | str, revision: str | None = None, quantization: str | None = None,
               double_quant: bool = True, chat_template: str | None = None):
    """(model, processor) of a local directory or a cached / reachable hub id, through the door
    (`pipeline.models.door.open_model`: any image-text-to-text family, checked as every command checks it);
    `quantization` (nf4 | fp4 | int8, `double_quant` for 4-bit): its language model quantized as training
    quantized it (pipeline.models.quantize); a checkpoint saved quantized by bitsandbytes loads so without it;
    `chat_template`: a Jinja file for a processor without one."""
    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig

    compute = None
    if quantization or dtype == "auto":
        from pipeline.stages.sharding import resolve_precision

        compute = dtype if isinstance(dtype, torch.dtype) else (  # auto: as QLoRA trains on the device
            torch.bfloat16 if resolve_precision("auto") == "bf16" else torch.float32)
    cfg = ModelConfig(arch="vlm", name_or_path=source, revision=revision, quantization=quantization or "none",
                      double_quant=double_quant, chat_template=chat_template)
    return open_model(cfg, source=source, compute_dtype=compute, as_saved=True, option="--quantization", dtype=dtype)


def load_with_adapter(source: str, adapter: str, dtype: torch.dtype | str, revision: str | None = None,
                      quantization: str | None = None, double_quant: bool = True, chat_template: str | None = None):
    """The base model of `source` with the PEFT adapter of `adapter` on top (not merged)."""
    from peft import PeftModel

    model, processor = load_model(source, dtype, revision, quantization, double_quant, chat_template)
    return PeftModel.from_pretrained(model, adapter, revision=revision).eval(), processor


def _unique(names: list[str], explicit: list[bool]) -> list[str]:
    """Names made unique: a NAME= given twice is an error, a derived name gets -2, -3, ..."""
    given = [n for n, e in zip(names, explicit) if e]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise UserError(f"two models are named {twice[0]!r}: give each NAME= once")
    taken, out = set(given), []
    for name, is_given in zip(names, explicit):
        if not is_given:
            base, k = name, 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
        taken.add(name)
        out.append(name)
    return out


def build_entries(models: Sequence[str], adapters: Sequence[str] = (), registry: Path | None = None,
                  dtype: str = "auto", revision: str | None = None, quantization: str | None = None,
                  double_quant: bool = True, chat_template: str | None = None):
    """ModelEntries (in the order given; adapters after the models) for the harness. Every model's processor is
    checked now, before any weights load (a processor without a chat template is refused here, in one line)."""
    from eval.harness import ModelEntry
    from pipeline.models.door import check_processor

    if not models:
        raise UserError("structlora eval: give at least one MODEL")
    torch_dtype = resolve_dtype(dtype)
    names, explicit, sources, loaders, run_dirs = [], [], [], [], []
    for spec in models:
        label, rest = split_label(spec)
        name, source = resolve_model(rest, registry, revision)
        names.append(label or name)
        explicit.append(label is not None)
        sources.append(source)
        run_dirs.append((Path(rest).expanduser() / "manifest.json").is_file())
        check_processor(source, revision, chat_template)
        loaders.append(lambda s=source: load_model(s, torch_dtype, revision, quantization, double_quant,
                                                   chat_template))
    for spec in adapters:
        label, rest = split_label(spec)
        adapter = resolve_adapter(rest, revision)
        if run_dirs[0]:
            raise UserError(f"--adapter {rest}: the first MODEL ({models[0]}) is a run directory, i.e. its merged "
                            "model, which already holds an adapter; give the base model the adapter was trained on")
        declared = _adapter_base(adapter)
        if declared and Path(declared).resolve() != Path(sources[0]).resolve() and declared != models[0]:
            log.warning("--adapter %s was trained on %s; it is put on the first MODEL, %s", rest, declared, sources[0])
        names.append(label or f"{names[0]}+{_default_name(rest)}")
        explicit.append(label is not None)
        sources.append(f"{sources[0]} + {adapter}")
        loaders.append(lambda s=sources[0], a=adapter: load_with_adapter(s, a, torch_dtype, revision, quantization,
                                                                         double_quant, chat_template))
    names = _unique(names, explicit)
    return [ModelEntry(n, load, src) for n, load, src in zip(names, loaders, sources)]


def resolve_adapter(spec: str, revision: str | None = None) -> str:
    """A PEFT adapter folder (adapter_config.json) or a hub id PEFT can load."""
    from pipeline.models.hub import resolve_pretrained

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"--adapter {spec}: no adapter_config.json there (a PEFT adapter folder is expected)")
        return str(path)
    return resolve_pretrained(spec, revision)


def _adapter_base(adapter: str) -> str | None:
    config = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """--dtype: 'auto' is the checkpoint's own dtype on a GPU (as transformers and lmms-eval load it)
    and float32 on a CPU (half-precision matrix products are slow or missing there)."""
    if dtype == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
