"""``structlora eval``: score any vision-language models (LLaVA, Qwen2.5-VL, SmolVLM, ...) side by side on the same samples.

A MODEL is, in this order of precedence:

- ``NAME=MODEL``: any of the below, shown as NAME in the report;
- a run directory (it has ``manifest.json``): the run's merged model, ``merge/model``;
- a local model directory (``config.json``, as ``save_pretrained`` writes it);
- the name of an entry of ``--registry DIR`` (the publish stage's registry);
- a Hugging Face Hub id (``llava-hf/llava-1.5-7b-hf``), from the local cache or the hub.

``--adapter [NAME=]PEFT_DIR`` (repeatable) adds the FIRST model with that PEFT adapter on top,
as PEFT loads it (``PeftModel.from_pretrained``), without merging. ``--data`` is a shards
folder (``{task}/{split}/`` inside) or a run directory (its shards). Every model is scored on
exactly the same samples by ``eval.harness``, the code of the pipeline's eval stage; works on
one process or under ``accelerate launch`` / ``torchrun`` (ranks share the samples).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def shards_of(data: Path) -> Path:
    """The shards root of --data: a run directory's shards, or the folder itself."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise UserError(f"--data {data}: not a directory (a shards folder or a run directory is expected)")
    config = data / "config.yaml"
    if (data / "manifest.json").is_file() and config.is_file():
        from pipeline.config import load_config
        from pipeline.context import StageContext
        from pipeline.schema import RunConfig
        from pipeline.stages.common import shards_root

        return shards_root(StageContext(cfg=load_config(RunConfig, config), run_dir=data))
    return data


def filler_texts(distractor: str, root: Path, exclude: list[Any], eval_split: str,
                 spare: Callable[[], list[dict[str, Any]]],
                 checks: dict[str, Any] | None = None) -> tuple[list[str], str]:
    """(pool, description) of the long-context filler: 'captions' (reference captions of other
    images: the val split's, else the train split's, else the eval split's images not captioned),
    'neutral' (data/neutral_filler.txt) or a UTF-8 text file (one filler text per non-empty line)."""
    from eval.long_context import CAPTION_FILLER, NEUTRAL_FILLER
    from pipeline.stages.evaluate import caption_filler_pool, load_examples

    if distractor == "neutral":
        from data.long_context import NEUTRAL_FILE, neutral_filler

        return neutral_filler(), f"{NEUTRAL_FILLER} ({NEUTRAL_FILE.name})"
    if distractor != "captions":
        path = Path(distractor).expanduser()
        if not path.is_file():
            raise UserError(f"--distractor {distractor}: neither 'captions' nor a text file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--distractor {path}: the file has no non-empty line")
        return lines, f"lines of {path}, one per line, between the image and the instruction"
    for split in ("val", "train"):
        if split != eval_split and (root / "caption" / split).is_dir():
            pool = caption_filler_pool(load_examples(root, "caption", split, 200, **(checks or {})), exclude)
            if pool:
                return pool, f"{CAPTION_FILLER} ({split} split)"
    pool = caption_filler_pool(spare(), exclude)
    if not pool:
        raise UserError(f"long_context: no captions of other images under {root}/caption/ to fill the context "
                        "with; give --distractor FILE.txt")
    return pool, f"{CAPTION_FILLER} ({eval_split} split, images not captioned)"


def make_eval_accelerator(timeout_minutes: int):
    """The Accelerator of ``structlora eval``, its process group (under torchrun / accelerate launch) made
    with the collective timeout `structlora run` uses: the default (10 minutes for NCCL) would kill the
    ranks that wait while rank 0 scores a large split."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = datetime.timedelta(minutes=timeout_minutes)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def _out_dir(out: str | None, accelerator) -> Path:
    if out:
        return Path(out)
    stamp = [dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(stamp)
    return Path("runs") / f"eval-{stamp[0]}"


def run_eval(models: Sequence[str], data: Path, tasks: Sequence[str] = ("caption", "vqav2", "gqa"),
             adapters: Sequence[str] = (), split: str = "test", max_samples: int | None = None,
             lengths: Sequence[int] | None = None, out: str | None = None, registry: Path | None = None,
             distractor: str = "captions", batch_size: int = 8, long_context_samples: int = 48,
             reference: str | None = None, dtype: str = "auto", revision: str | None = None,
             damaged_shards: str = "error", verify_shards: bool = True,
             timeout_minutes: int = 240, conversation_metric: str = "auto",
             quantization: str | None = None, double_quant: bool = True,
             chat_template: str | None = None) -> dict[str, Any]:
    """Score `models` (and the first one with each of `adapters`) on `data`; returns the output paths.

    `damaged_shards`: a shard that fails its manifest check (size, and sha256 with `verify_shards`)
    stops the command ("error") or is left out and its examples reported as lost ("skip").
    `timeout_minutes`: the collective timeout of the process group, as `structlora run`'s
    `distributed_timeout_minutes`: rank 0 scores alone (Java METEOR on a large split) while the others wait."""

    from eval.harness import (
        GENERATION_TASKS,
        TASKS,
        LongContextSettings,
        evaluate_models,
        sample_counts,
        write_outputs,
    )
    from eval.long_context import DEFAULT_BUCKETS
    from pipeline.stages.evaluate import load_examples, load_split
    from pipeline.stages.runner import environment

    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"--tasks: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                        f"choose from {', '.join(TASKS)}")
    entries = build_entries(models, adapters, registry, dtype, revision, quantization, double_quant, chat_template)
    names = [e.name for e in entries]
    if reference is not None and reference not in names:
        raise UserError(f"--reference {reference}: not one of the models ({', '.join(names)})")
    root = shards_of(data)
    accelerator = make_eval_accelerator(timeout_minutes)
    checks = {"verify": verify_shards, "on_damaged": damaged_shards}
    accounts: dict[str, Any] = {}
    examples = {}
    for task in (t for t in tasks if t in GENERATION_TASKS):
        examples[task], accounts[task] = load_split(root, task, split, max_samples, **checks)
    long_context = None
    if "long_context" in tasks:
        if "caption" not in examples:
            examples["caption"], accounts["caption"] = load_split(root, "caption", split, max_samples, **checks)
        captions = examples["caption"]
        chosen = captions[:long_context_samples]
        def spare() -> list[dict[str, Any]]:
            return load_examples(root, "caption", split, **checks)[len(chosen):]

        pool, filler = filler_texts(distractor, root, [e["image_id"] for e in chosen], split, spare, checks)
        long_context = LongContextSettings(samples=long_context_samples, lengths=list(lengths or DEFAULT_BUCKETS),
                                           pool=pool, scale=lengths is None, filler=filler)
    gen_tasks = [t for t in tasks if t in GENERATION_TASKS or t in ("long_context", "test_loss")]
    out_dir = _out_dir(out, accelerator)
    results = evaluate_models(entries, gen_tasks, examples, out_dir, accelerator, batch_size, long_context,
                              conversation_metric=conversation_metric)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    counts = sample_counts(tasks, examples, long_context_samples)
    title = "Evaluation: " + ", ".join(names)
    paths = write_outputs(results, out_dir, title, reference or names[0], samples=counts, data={"eval": accounts})
    settings = {"models": list(models), "adapters": list(adapters), "names": names, "data": str(data),
                "shards": str(root), "tasks": list(tasks), "split": split, "max_samples": max_samples,
                "lengths": list(lengths) if lengths else None, "distractor": distractor,
                "batch_size": batch_size, "long_context_samples": long_context_samples,
                "reference": reference or names[0], "dtype": str(resolve_dtype(dtype)).replace("torch.", ""),
                "damaged_shards": damaged_shards, "verify_shards": verify_shards,
                "timeout_minutes": timeout_minutes, "conversation_metric": conversation_metric,
                "notes": results.notes,
                "world_size": accelerator.num_processes, "environment": environment()}
    (out_dir / "eval_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return {"out": str(out_dir), "metrics": str(paths["metrics"]), "report": str(paths["report"])}
