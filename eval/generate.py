"""Batched greedy generation for any LLaVA-style Hugging Face model, writing official results files.

Generation is apart from scoring (lmms-eval / LLaVA style): this module turns
(image, question) samples into a predictions file keyed by ``image_id`` / ``question_id`` /
``questionId``; ``eval.scoring`` reads such files. It works for any model with the HF
``generate`` API and a processor that takes ``text=`` and ``images=`` (a merged model or an
adapter-wrapped one alike), and never imports the method's package.

Decoding follows LLaVA-1.5's evaluation: greedy (``do_sample=False``), KV cache on, task prompts
from ``data.prompts`` through the processor's chat template, output stripped. The budget is the task's
(``eval.budget``: data.prompts' 64 new tokens for captions and conversations, 16 for short answers, unless
configured), and every answer says whether it hit it (all new tokens taken, no end-of-turn token). Batches
are left-padded so every prompt ends where generation starts; the attention mask keeps
padding out, so a batch gives the same tokens as one-by-one decoding (tested).

Several ranks each write ``predictions.rank{k}.jsonl`` for their slice ``samples[k::world]``;
``merge_prediction_shards`` concatenates them, drops repeated ids (first rank wins, e.g.
when a distributed sampler pads the last batch with repeats) and writes the official JSON list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data.chat_template import add_special_tokens_for, chat_prompt, messages_prompt
from data.prompts import max_new_tokens as default_max_new_tokens
from data.prompts import task_prompt
from eval.errors import EvalInputError
from eval.predictions import (
    PREDICTION_KEYS,
    parse_predictions,
    prediction_record,
    read_records,
    write_json_atomic,
    write_jsonl_atomic,
)
from eval.vqa_eval import evalai_answer

SHARD_PATTERN = "predictions.rank{rank}.jsonl"
BUDGET_KEY = "hit_budget"  # in rank shards: the answer took every new token without ending its turn
_SHARD_RE = re.compile(r"^predictions\.rank(\d+)\.jsonl$")


@dataclass(frozen=True)
class EvalSample:
    """One item to answer: ``sample_id`` is the image_id (captions) or question_id (VQAv2, GQA), or the
    conversation's id (your own data: ``image`` is then a list of 0..n images and ``question`` the whole
    rendered prompt, earlier turns included)."""

    sample_id: int | str
    image: Any
    question: str | None = None
    messages: tuple[Any, ...] | None = None  # a conversation's canonical messages up to its last user turn


def build_prompt(task: str, question: str | None, processor: Any) -> str:
    """The full generation prompt of a task: data.prompts' text (the one place prompts live), rendered with the
    processor's chat template (`data.chat_template.chat_prompt`)."""
    return chat_prompt(processor, task_prompt(task, question))


def sample_prompt(task: str, sample: EvalSample, processor: Any) -> str:
    """The rendered prompt of one sample for `processor` (a conversation through the template when it has one)."""
    if task == "conversations":
        return messages_prompt(processor, list(sample.messages))
    return build_prompt(task, sample.question, processor)


def postprocess_answer(task: str, text: str) -> str:
    """What LLaVA writes for a generated text: stripped; VQAv2 through LLaVA's EvalAI answer
    processor (``convert_vqav2_for_submission.py``); GQA raw (its conversion is in scoring)."""
    text = text.strip()
    return evalai_answer(text) if task == "vqav2" else text


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _pad_token_id(model: Any, processor: Any) -> int | None:
    config_pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if config_pad is not None:
        return config_pad
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _stop_ids(model: Any, processor: Any) -> set[int]:
    """The token ids that end an answer: the generation config's eos (the door adds the chat template's end of
    turn there), else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}


@torch.inference_mode()
def generate_batch_hits(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str],
                        max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Greedy, KV-cached generation for one batch of (image, rendered prompt): (decoded texts, whether each
    hit the budget: all `max_new_tokens` new tokens taken and no end-of-turn / eos token among them, so the
    answer was cut off rather than finished).

    Left padding is asked of the processor for this call only (the processor is not changed).
    Nothing is truncated, so image tokens are always all there.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    device, dtype = _model_device_dtype(model)
    # a sample may hold a list of images (one per <image> tag of its prompt) or none at all
    nested = [list(item) if isinstance(item, list | tuple) else [item] for item in images]
    given = nested if any(nested) else None  # one list per prompt, as training gives them
    batch = processor(text=list(prompts), images=given, padding=True, padding_side="left", return_tensors="pt",
                      add_special_tokens=add_special_tokens_for(processor, prompts))
    batch = batch.to(device=device, dtype=dtype)
    output = model.generate(**batch, do_sample=False, use_cache=True, max_new_tokens=max_new_tokens,
                            num_beams=1, pad_token_id=_pad_token_id(model, processor))
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    stops = _stop_ids(model, processor)
    full = new_tokens.shape[1] >= max_new_tokens
    hits = [bool(full and not any(int(t) in stops for t in row)) for row in new_tokens.tolist()]
    return processor.batch_decode(new_tokens, skip_special_tokens=True), hits


def generate_batch(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str],
                   max_new_tokens: int) -> list[str]:
    """The decoded texts of `generate_batch_hits`."""
    return generate_batch_hits(model, processor, images, prompts, max_new_tokens)[0]


def generate_predictions(model: Any, processor: Any, samples: Iterable[EvalSample], task: str,
                         batch_size: int = 8, max_new_tokens: int | None = None,
                         prompt_fn: Callable[[EvalSample], str] | None = None,
                         progress: bool = False, desc: str | None = None,
                         mark_budget: bool = False) -> list[dict[str, Any]]:
    """Official-format prediction records for `samples` (in their order).

    Args:
        task: 'caption', 'vqav2' or 'gqa': picks the prompt, the token budget and the record keys.
        batch_size: samples per ``generate`` call.
        max_new_tokens: defaults to data.prompts' budget for the task.
        prompt_fn: rendered prompt of a sample (default: ``sample_prompt(task, sample, processor)``);
            the long-context evaluation passes its extended prompts through here.
        desc: the progress bar's label (default ``generate {task}``).
        mark_budget: each record also says whether its answer hit the budget (``"hit_budget"``: cut off at
            `max_new_tokens` without the end-of-turn token); not an official field, for rank shards only.
    """
    if task not in PREDICTION_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(PREDICTION_KEYS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = default_max_new_tokens(task) if max_new_tokens is None else max_new_tokens
    make_prompt = prompt_fn or (lambda s: sample_prompt(task, s, processor))
    items = list(samples)
    was_training = getattr(model, "training", False)
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc=desc or f"generate {task}", disable=not progress, unit="batch"):
            chunk = items[start:start + batch_size]
            texts, hits = generate_batch_hits(model, processor, [s.image for s in chunk],
                                              [make_prompt(s) for s in chunk], budget)
            for sample, text, hit in zip(chunk, texts, hits):
                record = prediction_record(task, sample.sample_id, postprocess_answer(task, text))
                records.append({**record, BUDGET_KEY: hit} if mark_budget else record)
    finally:
        if was_training:
            model.train()
    return records


# --- ranks and shards ----------------------------------------------------------------------


def shard_samples(samples: Sequence[EvalSample], rank: int, world_size: int) -> list[EvalSample]:
    """The slice of `samples` rank `rank` of `world_size` generates (strided, so shards stay balanced)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(samples[rank::world_size])


def shard_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / SHARD_PATTERN.format(rank=rank)


def write_prediction_shard(records: Iterable[dict[str, Any]], out_dir: Path, rank: int) -> Path:
    """Write this rank's records as JSONL (temp then rename, so a half-written shard never merges)."""
    return write_jsonl_atomic(records, shard_path(out_dir, rank))


def run_generation(model: Any, processor: Any, samples: Sequence[EvalSample], task: str, out_dir: Path,
                   rank: int = 0, world_size: int = 1, batch_size: int = 8,
                   max_new_tokens: int | None = None, progress: bool = False, desc: str | None = None) -> Path:
    """Generate this rank's share of `samples` and write its shard; returns the shard path.

    Every rank calls this; after a barrier, one rank calls ``merge_prediction_shards`` (the official file) and
    ``shard_budget_hits`` (which answers hit the budget: the shards say it per record).
    """
    mine = shard_samples(samples, rank, world_size)
    records = generate_predictions(model, processor, mine, task, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress, desc=desc, mark_budget=True)
    return write_prediction_shard(records, out_dir, rank)


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


def find_shards(out_dir: Path, world_size: int | None = None) -> list[Path]:
    """Shard files of `out_dir` in rank order; with `world_size`, exactly ranks 0..world_size-1, all present."""
    out_dir = Path(out_dir)
    found = {int(m.group(1)): p for p in out_dir.glob("predictions.rank*.jsonl") if (m := _SHARD_RE.match(p.name))}
    if world_size is not None:
        absent = [r for r in range(world_size) if r not in found]
        if absent:
            raise EvalInputError(f"{out_dir}: missing prediction shard(s) for rank(s) {absent} "
                                 f"(expected {SHARD_PATTERN.format(rank=absent[0])})")
        # Shards of ranks >= world_size are left over from an earlier, wider run: not ours.
        return [found[r] for r in range(world_size)]
    if not found:
        raise EvalInputError(f"{out_dir}: no prediction shards ({SHARD_PATTERN.format(rank='K')})")
    return [found[r] for r in sorted(found)]


def merge_prediction_shards(shards: Path | Sequence[Path], task: str, out_path: Path | None = None,
                            world_size: int | None = None) -> list[dict[str, Any]]:
    """Concatenate rank shards, keep the first record of each id, sort by id, write the official JSON.

    Args:
        shards: a folder holding ``predictions.rank{k}.jsonl`` files, or the shard paths in rank order.
        out_path: where to write the merged JSON list (default: ``<folder>/predictions.json`` when
            `shards` is a folder; nothing is written when it is a list and no path is given).
        world_size: when given, a missing rank's shard is an error.
    Returns:
        the merged records, in the official format of `task`.
    """
    if isinstance(shards, (str, Path)):
        folder = Path(shards)
        paths = find_shards(folder, world_size)
        out_path = folder / "predictions.json" if out_path is None else out_path
    else:
        paths = [Path(p) for p in shards]
    merged: dict[str, tuple[Any, str]] = {}
    for path in paths:
        if not path.is_file():
            raise EvalInputError(f"prediction shard {path} does not exist")
        # A rank with nothing to do writes an empty shard.
        raw = read_records(path) if path.stat().st_size else []
        shard = parse_predictions(raw, task, source=str(path))
        for key, text in shard.texts.items():
            merged.setdefault(key, (shard.ids[key], text))
    records = [prediction_record(task, sample_id, text)
               for sample_id, text in sorted(merged.values(), key=lambda item: _sort_key(item[0]))]
    if out_path is not None:
        write_json_atomic(records, Path(out_path))
    return records


def shard_budget_hits(shards: Path, task: str, world_size: int | None = None) -> dict[str, bool]:
    """str(id) -> whether its answer hit the budget, from the rank shards of a folder (the first rank's record of
    an id wins, as in ``merge_prediction_shards``); records without the field are left out."""
    from eval.predictions import id_key

    hits: dict[str, bool] = {}
    for path in find_shards(Path(shards), world_size):
        for record in read_records(path) if path.stat().st_size else []:
            if isinstance(record, dict) and BUDGET_KEY in record and id_key(task) in record:
                hits.setdefault(str(record[id_key(task)]), bool(record[BUDGET_KEY]))
    return hits
