"""``structlora eval``: score any vision-language models (LLaVA, Qwen2.5-VL, SmolVLM, ...) side by side on the same samples.

The MODEL and ``--adapter`` arguments (run directories, model directories, registry entries, hub ids,
PEFT adapters) are resolved and loaded by pipeline.eval_models. ``--data`` is a shards
folder (``{task}/{split}/`` inside) or a run directory (its shards). Every model is scored on
exactly the same samples by ``eval.harness``, the code of the pipeline's eval stage; works on
one process or under ``accelerate launch`` / ``torchrun`` (ranks share the samples).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.eval_models import build_entries, resolve_dtype


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


def eval_budgets(given: str | dict[str, Any] | None, root: Path, tasks: Sequence[str]) -> tuple[dict[str, Any], Path | None]:
    """(budgets per task, the conversations' train split when conversations=auto) of --max-new-tokens."""
    from eval.budget import check_budgets, parse_budgets

    try:
        budgets = parse_budgets(given) if isinstance(given, str) else check_budgets(given or {}, "--max-new-tokens")
    except ValueError as err:
        raise UserError(str(err)) from None
    if budgets.get("conversations") != "auto" or "conversations" not in tasks:
        return budgets, None
    split = Path(root) / "conversations" / "train"
    if not (split / "manifest.json").is_file():
        raise UserError(f"--max-new-tokens conversations=auto measures the training answers: {split}/manifest.json "
                        "is not there; give a number of tokens")
    return budgets, split


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
             chat_template: str | None = None, max_new_tokens: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """Score `models` (and the first one with each of `adapters`) on `data`; returns the output paths.

    `damaged_shards`: a shard that fails its manifest check (size, and sha256 with `verify_shards`)
    stops the command ("error") or is left out and its examples reported as lost ("skip").
    `timeout_minutes`: the collective timeout of the process group, as `structlora run`'s
    `distributed_timeout_minutes`: rank 0 scores alone (Java METEOR on a large split) while the others wait.
    `max_new_tokens`: generation budgets ('conversations=auto,caption=32' or a mapping; `eval.budget`)."""

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
    budgets, answers_dir = eval_budgets(max_new_tokens, root, tasks)
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
                              conversation_metric=conversation_metric, max_new_tokens=budgets,
                              answers_dir=answers_dir)
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
                "max_new_tokens": budgets,
                "notes": results.notes,
                "world_size": accelerator.num_processes, "environment": environment()}
    (out_dir / "eval_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return {"out": str(out_dir), "metrics": str(paths["metrics"]), "report": str(paths["report"])}
