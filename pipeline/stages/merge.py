"""The merge stage: fold the trained update into W0 and write a plain transformers model.

The merged directory loads with its family's class (`LlavaForConditionalGeneration`, or for `model.arch: vlm`
`AutoModelForImageTextToText`: Qwen2_5_VLForConditionalGeneration, ...) `.from_pretrained` alone (no
structlora, no peft): that is the proof of zero inference cost. Before reporting success
the stage checks, on fixed inputs, that the merged model reproduces the adapted model's
logits. A standard PEFT LoRA adapter is written beside it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.context import StageContext
from pipeline.errors import UserError

RUN_INFO = "structlora_run.json"


def _check_batches(ctx: StageContext, processor, n: int = 2) -> list[dict[str, torch.Tensor]]:
    from pipeline.stages.batches import validation_batches
    from pipeline.stages.common import sources

    cfg = ctx.cfg
    tasks = {t: 1.0 for t, w in cfg.data.tasks.items() if w > 0}
    return validation_batches(cfg, sources(ctx, "val", tasks), processor, batch_size=4, max_batches=n)


@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    model.eval()
    return [model(**{k: v for k, v in b.items() if k != "labels"}).logits.float() for b in batches]


def merge_adapted(adapted) -> torch.nn.Module:
    """The backbone with the update folded in and every wrapper removed."""
    if adapted.method == "full":
        return adapted.model
    if adapted.method == "structlora":
        return adapted.handle.merge_and_unload()
    return adapted.model.merge_and_unload()


def export_adapter(adapted, out: Path, base_name: str, svd_rank: int | None) -> dict[str, Any]:
    """A standard PEFT adapter of the trained update (before merging)."""
    if adapted.method == "full":
        return {"skipped": "full fine-tuning has no adapter"}
    if adapted.method == "structlora":
        return adapted.handle.export_peft(out, base_model_name_or_path=base_name, svd_rank=svd_rank) or {"path": str(out)}
    adapted.model.save_pretrained(out)
    return {"path": str(out)}


def model_card(ctx: StageContext, metrics: dict[str, Any] | None, check: dict[str, Any],
               model_class: str = "LlavaForConditionalGeneration") -> str:
    cfg = ctx.cfg
    base = cfg.model.name_or_path or f"{cfg.model.preset} preset (pretrained by the base stage in {ctx.run_dir})"
    family = model_class.replace("ForConditionalGeneration", "").lower()
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", f"tags: [{family}, structlora, lora]",
        "---", "", f"# {Path(ctx.run_dir).name}: {cfg.adapter.method} merged into its base", "",
        f"- Base model: {base}",
        f"- Method: {cfg.adapter.method}, rank {cfg.adapter.rank}, alpha {cfg.adapter.alpha}, "
        f"vision={cfg.adapter.vision}, projector={cfg.adapter.projector}, language={cfg.adapter.language}",
        f"- Data: {cfg.data.source}; tasks {cfg.data.tasks}",
        f"- Training: {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr}",
        f"- Merge check: max |logit difference| adapted vs merged = {check['max_abs_diff']:.2e} "
        f"(tolerance {check['tolerance']:.0e})",
        "", "The adapter is folded into the weights: this model has exactly the base architecture and cost.",
        f"Load it with `{model_class}.from_pretrained(path)` (or `AutoModelForImageTextToText`) and "
        "`AutoProcessor.from_pretrained(path)`.",
    ]
    if metrics:
        lines += ["", f"## Evaluation ({cfg.eval.split} split)", "", "| model | metric | value |", "| --- | --- | --- |"]
        for name in ("base", "adapted"):
            for metric, number in (metrics.get(name) or {}).items():
                lines.append(f"| {name} | {metric} | {number} |")
    return "\n".join(lines) + "\n"


def float32_bytes(model: torch.nn.Module) -> int:
    """The model's size once every weight is float32 (a 4-bit weight counted at its unpacked shape)."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += 4 * (state.shape.numel() if state is not None else param.numel())
    return total


def merge_device(model: torch.nn.Module, headroom: float = 1.3) -> str:
    """Where the float32 fold and its check run: the GPU when the model in float32 (dequantized) fits in its free
    memory with `headroom` for the check's activations, else the CPU (a 7B model in float32 is ~28 GB: more than
    the 24 GB GPU that trained it in 4-bit or bf16)."""
    if not torch.cuda.is_available():
        return "cpu"
    need = headroom * float32_bytes(model)
    on_gpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    free = torch.cuda.mem_get_info()[0] + on_gpu
    if need <= free:
        return "cuda"
    import logging

    logging.getLogger("structlora.merge").warning(
        "merging on the CPU: the model in float32 needs ~%.1f GiB with the check, the GPU has %.1f GiB free",
        need / 2**30, free / 2**30)
    return "cpu"


def demo_budgets(ctx: StageContext, processor, model) -> dict[str, dict[str, Any]]:
    """The evaluation's budgets (`eval.max_new_tokens`, resolved as the eval stage resolves them, conversations'
    `auto` measured on the training answers with this processor) of the tasks the demo asks: caption, short
    answers, and your conversations when the model learnt them."""
    from app.prompting import chat_style
    from eval.budget import resolve_budget
    from pipeline.stages.evaluate import answers_split

    cfg = ctx.cfg
    tasks = ["caption", "vqav2"] + (["conversations"] if chat_style(cfg.data.tasks) else [])
    return {t: resolve_budget(t, cfg.eval.max_new_tokens, processor, model,
                              answers_split(ctx) if t == "conversations" else None) for t in tasks}


def merge_to(ctx: StageContext, out: Path) -> dict[str, Any]:
    """Fold, check, save. Folding and the check run in float32 (a bf16 fold differs from the bf16
    unmerged model by ~1e-2 on its own); the merged weights are cast to `model.dtype` when saved."""
    from pipeline.stages.common import load_adapted_handle

    cfg = ctx.cfg
    out = Path(out)
    # float32 weights, and a quantized base computing in float32 (not train.precision's bf16): the check compares
    # the same weights computed two ways, not two precisions
    fp32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"),
                               train=dataclasses.replace(cfg.train, precision="fp32"))
    adapted, processor = load_adapted_handle(StageContext(cfg=fp32, run_dir=ctx.run_dir))
    device = merge_device(adapted.model)
    adapted.model.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in _check_batches(ctx, processor)]
    reference = _logits(adapted.model, batches)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base_name = cfg.model.name_or_path or str(ctx.run_dir / "base" / "model")
    adapter_info = export_adapter(adapted, tmp / "peft_adapter", base_name, cfg.merge.svd_rank) \
        if cfg.merge.export_peft else {"skipped": "merge.export_peft is false"}
    quantized, names = {}, []
    if cfg.model.quantization != "none":  # fold into the weights the quantized forward used, never requantize
        from pipeline.models.dequantize import dequantize_model
        from pipeline.models.quantize import is_quantized_linear

        names = [n.removeprefix("base_model.model.").replace(".base_layer", "")
                 for n, m in adapted.model.named_modules() if is_quantized_linear(m)]
        quantized = {"quantization": cfg.model.quantization, "dequantized_linears": dequantize_model(adapted.model)}
        if cfg.model.quantization == "int8":  # LLM.int8's matmul quantizes the activations too: no float weight
            dequantized = _logits(adapted.model, batches)  # reproduces it, so the fold is checked against this
            quantized["int8_matmul_vs_dequantized_max_abs_diff"] = max(
                float((a - b).abs().max()) for a, b in zip(reference, dequantized))
            reference = dequantized
    merged = merge_adapted(adapted)
    leftovers = [n for n, m in merged.named_modules() if type(m).__module__.split(".")[0] in ("structlora", "peft")]
    if leftovers:
        raise RuntimeError(f"merge left adapter modules behind, e.g. {leftovers[0]}")
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, _logits(merged, batches)))
    check = {"max_abs_diff": diff, "tolerance": cfg.merge.check_tolerance, "batches": len(batches), **quantized}
    if diff > cfg.merge.check_tolerance:
        raise RuntimeError(f"merged model differs from the adapted model by {diff:.3e} (> {cfg.merge.check_tolerance})")
    if names:
        check["other_merges"] = _other_merges(ctx, merged, names, batches, reference)
    model_dir = tmp / "model"
    from pipeline.models.hub import DTYPES

    dtype = DTYPES[cfg.model.dtype]
    merged.to(dtype)
    saved_logits, merged_class = _logits(merged, batches), type(merged)
    merged.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    del merged, adapted  # the reload below must not need two copies of the model in memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # the saved model must stand alone: reload it with plain transformers; it must equal what was saved
    if cfg.model.arch == "vit":
        from transformers import AutoModelForImageClassification

        from pipeline.models.vit import TimmClassifier

        model_class = TimmClassifier if cfg.model.vit_impl == "timm" else AutoModelForImageClassification
        reloaded = model_class.from_pretrained(model_dir, dtype=dtype).to(device)
    else:  # through the door, as every command loads a model (plain transformers underneath)
        from pipeline.models.door import open_model

        reloaded = open_model(dataclasses.replace(cfg.model, quantization="none"), source=model_dir)[0].to(device)
    diff_reloaded = max(float((a - b).abs().max()) for a, b in zip(saved_logits, _logits(reloaded, batches)))
    check["max_abs_diff_reloaded_vs_saved"] = diff_reloaded
    check["saved_dtype"] = cfg.model.dtype
    check["device"] = device
    if diff_reloaded > 1e-6:
        raise RuntimeError(f"the reloaded merged model differs from the one saved by {diff_reloaded:.3e}")
    from eval.report import headline_from_file

    metrics = headline_from_file(ctx.run_dir / "eval" / "metrics.json")
    if cfg.model.arch != "vit" and type(reloaded) is not merged_class:
        raise RuntimeError(f"the merged model reloads as {type(reloaded).__name__}, not {merged_class.__name__}")
    check["model_class"] = merged_class.__name__
    (model_dir / "README.md").write_text(model_card(ctx, metrics, check, merged_class.__name__))
    if cfg.model.arch != "vit":  # how the demo asks it: the task wording and budgets it was trained with
        from app.prompting import style_for_tasks, write_style

        budgets = demo_budgets(ctx, processor, reloaded)
        write_style(model_dir, style_for_tasks(cfg.data.tasks, {t: b["max_new_tokens"] for t, b in budgets.items()}),
                    budgets)
    base_dir = ctx.run_dir / "base" / "model"
    info = {"base_model": str(base_dir.resolve()) if base_dir.is_dir() else cfg.model.name_or_path,
            "run_dir": str(Path(ctx.run_dir).resolve()), "method": cfg.adapter.method}
    (model_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    (tmp / "merge_check.json").write_text(json.dumps(check, indent=2))
    if out.exists():
        shutil.rmtree(out)  # only reached for the stage's own folder or with --overwrite
    tmp.rename(out)
    return {"model": str(out / "model"), "peft_adapter": adapter_info, "check": check}


def _other_merges(ctx: StageContext, merged, names: list[str], batches, reference) -> dict[str, Any]:
    """What the two merges this one avoids would give on a quantized base (pipeline.models.dequantize.other_merge_paths),
    or why they were not measured (merge.quantization_paths)."""
    from pipeline.models.dequantize import other_merge_paths
    from pipeline.models.door import open_model
    from pipeline.models.hub import count_parameters

    cfg, setting = ctx.cfg, ctx.cfg.merge.quantization_paths
    size = count_parameters(merged) if setting == "auto" else 0
    if setting == "false" or size > 2e9:
        return {"skipped": f"merge.quantization_paths={setting}" + (f" and a {size / 1e9:.1f} B-parameter model: "
                           "set it to true to measure (a float copy of the base on the CPU)" if size else "")}
    source = cfg.model.name_or_path or str(ctx.run_dir / "base" / "model")
    from pipeline.models.hub import resolve_pretrained
    from pipeline.models.quantize import saved_kind

    if saved_kind(resolve_pretrained(source, cfg.model.revision), cfg.model.revision):
        return {"skipped": f"{source} was saved quantized: there are no float weights to merge into"}
    float_base, _ = open_model(dataclasses.replace(cfg.model, quantization="none", dtype="float32"), source=source)
    errors = other_merge_paths(merged, names, float_base.float(), cfg.model.quantization, cfg.model.double_quant,
                               lambda m: _logits(m, batches), reference)
    return {**{f"{k}_max_abs_diff": v for k, v in errors.items()},
            "note": "max |logit difference| from the quantized adapted model of: requantized = the merged weights "
                    "quantized again (PEFT merge_and_unload on a 4-bit model); float_base = the update added to the "
                    "original float weights (LLaVA's merge script). This merge (dequantize, fold) is max_abs_diff."}


def stage_merge(ctx: StageContext) -> dict[str, Any]:
    return merge_to(ctx, ctx.run_dir / "merge")


def merge_run(run_dir: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """`structlora merge RUN_DIR --out DIR`: merge a finished run's adapter into a standalone model."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite to replace it")
    from pipeline.config import load_config
    from pipeline.schema import RunConfig

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config}: not a run directory (no config.yaml); give the folder `structlora run` wrote")
    if not (run_dir / "train" / "final").is_dir():
        raise UserError(f"{run_dir}/train/final missing: the run has not finished training")
    return merge_to(StageContext(cfg=load_config(RunConfig, config), run_dir=run_dir), out)
