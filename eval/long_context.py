"""Long-context captioning: CIDEr of captions generated with the prompt grown to target lengths.

The question is how well an adapted model still looks at the image when the image and the
instruction are far apart. Each evaluated image gets the prompt

    <image>\\n{filler}Provide a one-sentence caption for the provided image.

as the user turn of the processor's chat template (LLaVA-1.5: "USER: <image>\\n{filler}... ASSISTANT:"),
where ``filler`` is in-context caption examples: reference captions of OTHER images (never
one of the evaluated images, so the answer cannot be copied from the context), one per line,
repeated from the pool when it runs out, and cut word by word at the end so that the prompt
reaches the target length. Captions rather than distractor text because they are in the
model's vocabulary (the tiny preset's word-level tokenizer knows no other words) and they are
the hardest distractor: plausible captions of the wrong image.

Lengths are real token counts of the processor's ``input_ids`` for the whole prompt,
including the expanded image tokens and BOS. Nothing is ever truncated: a bucket that does
not fit the model's context (with the generation budget) is an error, and
``scale_buckets`` maps the default buckets (256..2048) onto a small model's context.
The image-token count is measured once, on the first image: this assumes, as LLaVA-1.5 does,
that every image expands to the same number of tokens. With families whose count depends on the image
size (LLaVA-NeXT / OneVision any-res tiles, Qwen-VL dynamic resolution, Idefics3 tiles), images of
another size than the first land off their bucket's target by the difference (exact on the shapes world,
whose images all have one size). Prompts are rendered with the processor's chat template
(`data.chat_template.chat_prompt`), as in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.chat_template import add_special_tokens_for, chat_prompt
from data.long_context import fill_to, filler_text
from data.prompts import CAPTION_PROMPT, max_new_tokens
from eval.caption_metrics import score_captions
from eval.generate import EvalSample, generate_predictions

DEFAULT_BUCKETS = (256, 512, 1024, 2048)


def scale_buckets(buckets: Sequence[int], context_length: int, new_tokens: int = max_new_tokens("caption"),
                  min_length: int = 1) -> list[int]:
    """Buckets that fit `context_length` with `new_tokens` of generation after the prompt.

    Buckets that fit are kept as they are (a real model's context is long enough); otherwise all
    are scaled by the same factor so that the largest just fits, keeping their ratios.
    Buckets that would fall below `min_length` (the prompt without filler) are dropped.
    """
    if not buckets:
        raise ValueError("no buckets given")
    budget = context_length - new_tokens
    if budget < min_length:
        raise ValueError(f"a context of {context_length} tokens leaves no room for a prompt of {min_length} "
                         f"tokens and {new_tokens} new tokens")
    top = max(buckets)
    factor = 1.0 if top <= budget else budget / top
    return sorted({int(b * factor) for b in buckets if int(b * factor) >= min_length})


def filler_pool(references: Mapping[Any, Sequence[str]], exclude: Sequence[Any] = ()) -> list[str]:
    """Captions to fill contexts with: every reference caption of images not in `exclude`."""
    skip = {str(x) for x in exclude}
    return [c.strip() for image_id, caps in references.items() if str(image_id) not in skip for c in caps if c.strip()]


def _image_token_count(processor: Any, image: Any) -> int:
    """How many tokens the processor expands one image placeholder into (measured, not assumed)."""
    text = chat_prompt(processor, CAPTION_PROMPT)
    special = add_special_tokens_for(processor, [text])
    with_image = processor(text=[text], images=[image], add_special_tokens=special,
                           return_tensors="pt")["input_ids"].shape[1]
    text_only = len(processor.tokenizer(text, add_special_tokens=special)["input_ids"])
    return with_image - text_only + 1


@dataclass(frozen=True)
class ContextPrompt:
    """A rendered prompt and its measured length in tokens (image tokens included)."""

    text: str
    num_tokens: int
    num_examples: float  # whole examples plus the fraction of the one cut short
    target: int


class PromptLengthMeter:
    """Renders prompts (the processor's chat template) and measures their full length with the tokenizer, adding
    the image expansion measured once (every prompt here holds one image)."""

    def __init__(self, processor: Any, image: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokens = _image_token_count(processor, image)

    def render(self, user_text: str) -> str:
        return chat_prompt(self.processor, user_text)

    def __call__(self, text: str) -> int:
        special = add_special_tokens_for(self.processor, [text])
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"]) + self.image_tokens - 1


def build_context_prompt(meter: PromptLengthMeter, pool: Sequence[str], target: int,
                         instruction: str = CAPTION_PROMPT) -> ContextPrompt:
    """The longest filled prompt whose token count is <= `target` (usually exactly `target`), as training builds
    its long-context examples (`data.long_context.fill_to`): whole examples cycling through `pool`, then words
    of the next one, by binary search; lengths are monotone in both."""
    user, _, examples = fill_to(lambda text: meter(meter.render(text)), pool, target, instruction)
    text = meter.render(user)
    return ContextPrompt(text=text, num_tokens=meter(text), num_examples=examples, target=target)


def context_length_of(model: Any) -> int | None:
    """The language model's maximum positions, if the config says."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    return getattr(text_config, "max_position_embeddings", None)


def buckets_for_model(model: Any, meter: PromptLengthMeter, new_tokens: int = max_new_tokens("caption"),
                      buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """`buckets` scaled to the model's context (unchanged when they fit), none below the bare prompt."""
    limit = context_length_of(model)
    bare = meter(meter.render(filler_text([], "", CAPTION_PROMPT)))
    return list(buckets) if limit is None else scale_buckets(buckets, limit, new_tokens, min_length=bare)


def bare_prompt_length(meter: PromptLengthMeter) -> int:
    """Tokens of the long-context prompt without any filler (image tokens included)."""
    return meter(meter.render(filler_text([], "", CAPTION_PROMPT)))


def plan_buckets(lengths: Sequence[int], context_length: int | None, bare: int,
                 new_tokens: int = max_new_tokens("caption"), scale: bool = True) -> tuple[list[int], dict[int, str]]:
    """The buckets to caption at, and why each other one is skipped.

    With `scale`, lengths that do not fit `context_length` (with `new_tokens` of generation) are
    all scaled by one factor so that the largest just fits (``scale_buckets``); without it they
    are used as given. Either way a bucket shorter than the prompt without filler (`bare`) or
    longer than the context allows is skipped, and the returned reason says which.
    """
    if not lengths:
        raise ValueError("no context lengths given")
    skipped: dict[int, str] = {}
    targets = {int(n): int(n) for n in lengths}
    if scale and context_length is not None and max(targets) + new_tokens > context_length:
        factor = (context_length - new_tokens) / max(targets)
        targets = {n: int(n * factor) for n in targets}
    kept = []
    for asked, target in sorted(targets.items()):
        label = f"{target} (scaled from {asked})" if target != asked else str(target)
        if target < bare:
            skipped[asked] = (f"bucket {label} tokens is shorter than the prompt without any filler "
                              f"({bare} tokens: image tokens, roles and instruction)")
        elif context_length is not None and target + new_tokens > context_length:
            skipped[asked] = (f"bucket {label} tokens + {new_tokens} new tokens exceed the model's "
                              f"{context_length} positions")
        else:
            kept.append(target)
    return sorted(set(kept)), skipped


def plan_for_model(model: Any, processor: Any, image: Any, lengths: Sequence[int], scale: bool,
                   fixed: Sequence[int] | None) -> tuple[list[int], dict[int, str]]:
    """(buckets, skipped reasons) for `model`: `lengths` planned (scaled when `scale`) on the first model; the
    first model's buckets (`fixed`) kept for the others (skipped where they do not fit)."""
    if fixed is not None and not fixed:  # the first model could take none of the buckets
        return [], {}
    bare = bare_prompt_length(PromptLengthMeter(processor, image))
    if fixed is None:
        return plan_buckets(lengths, context_length_of(model), bare, max_new_tokens("caption"), scale)
    return plan_buckets(fixed, context_length_of(model), bare, max_new_tokens("caption"), scale=False)


def long_context_generations(model: Any, processor: Any, samples: Sequence[EvalSample], pool: Sequence[str],
                             buckets: Sequence[int] | None = None, batch_size: int = 8,
                             new_tokens: int | None = None, progress: bool = False,
                             meter_image: Any = None, label: str = "") -> dict[int, dict[str, Any]]:
    """Caption `samples` at each target prompt length; nothing is scored.

    The generation half of ``evaluate_long_context``: ranks each caption their share of the
    images (`meter_image`, the same on every rank, fixes the prompts) and one of them scores the
    gathered records with ``score_long_context``. A bucket that does not fit the model is an
    error here: ``plan_buckets`` says beforehand which ones to skip and why.

    Returns:
        ``{target: {"prompt_tokens", "num_examples", "records": [{"image_id", "caption"}, ...]}}``.
    """
    image = meter_image if meter_image is not None else (samples[0].image if samples else None)
    if image is None:
        raise ValueError("no samples to caption")
    budget = max_new_tokens("caption") if new_tokens is None else new_tokens
    limit = context_length_of(model)
    meter = PromptLengthMeter(processor, image)
    if buckets is None:
        buckets = buckets_for_model(model, meter, budget)
    out: dict[int, dict[str, Any]] = {}
    for target in sorted(buckets):
        prompt = build_context_prompt(meter, pool, target)
        if limit is not None and prompt.num_tokens + budget > limit:
            raise ValueError(f"bucket {target}: {prompt.num_tokens} prompt tokens + {budget} new tokens exceed the "
                             f"model's {limit} positions; use scale_buckets(buckets, {limit})")
        desc = f"{label}long_context {target} tok"
        records = generate_predictions(model, processor, samples, "caption", batch_size=batch_size,
                                       max_new_tokens=budget, prompt_fn=lambda _s, p=prompt: p.text,
                                       progress=progress, desc=desc) if samples else []
        out[target] = {"prompt_tokens": prompt.num_tokens, "num_examples": round(prompt.num_examples, 3),
                       "records": records}
    return out


CAPTION_FILLER = "reference captions of other images, one per line, between the image and the instruction"
NEUTRAL_FILLER = "neutral text (the world's words, no scene described), one line each, between the image and the instruction"


def score_long_context(generations: Sequence[Mapping[int, Mapping[str, Any]]],
                       references: Mapping[Any, Sequence[str]], context_length: int | None,
                       skipped: Mapping[int, str] | None = None, filler: str = CAPTION_FILLER) -> dict:
    """CIDEr per bucket of the records of one or more ``long_context_generations`` (e.g. one per rank).

    Each bucket keeps its per-image CIDEr (``per_image``) for paired comparisons; `skipped`
    (bucket -> reason) is reported as given.
    """
    out: dict[int, dict[str, Any]] = {}
    for target in sorted({t for g in generations for t in g}):
        parts = [g[target] for g in generations if target in g]
        captions = {r["image_id"]: r["caption"] for part in parts for r in part["records"]}
        refs = {i: list(references[i]) for i in captions}
        scores = score_captions(refs, captions, metrics=["CIDEr"])
        out[target] = {"CIDEr": scores["metrics"]["CIDEr"], "prompt_tokens": parts[0]["prompt_tokens"],
                       "num_examples": parts[0]["num_examples"], "num_images": len(captions),
                       "per_image": scores["per_image"]}
    return {"buckets": out, "context_length": context_length, "filler": filler,
            "skipped": {int(k): v for k, v in (skipped or {}).items()}}


def evaluate_long_context(model: Any, processor: Any, samples: Sequence[EvalSample],
                          references: Mapping[Any, Sequence[str]], pool: Sequence[str],
                          buckets: Sequence[int] | None = None, batch_size: int = 8,
                          new_tokens: int | None = None, progress: bool = False) -> dict:
    """Caption `samples` at each target prompt length and score CIDEr per bucket.

    Args:
        samples: images to caption (``sample_id`` = image_id, present in `references`).
        references: image_id -> reference captions (the scoring references).
        pool: filler captions (see ``filler_pool``; must not contain the evaluated images' captions).
        buckets: target prompt lengths in tokens; default: ``DEFAULT_BUCKETS`` scaled to the model's
            context by ``buckets_for_model`` (the tiny preset gets proportionally smaller ones).
    Returns:
        ``{"buckets": {target: {"CIDEr", "prompt_tokens", "num_examples", "num_images"}},
        "context_length": ..., "filler": ...}``.
    """
    if not samples:
        raise ValueError("no samples to caption")
    generations = long_context_generations(model, processor, samples, pool, buckets, batch_size, new_tokens,
                                           progress)
    return score_long_context([generations], references, context_length_of(model))


def long_context_table(results: Mapping[str, Mapping[int, float]]) -> str:
    """Markdown table: one row per run/method, one column per context length (CIDEr)."""
    lengths = sorted({int(n) for series in results.values() for n in series})
    lines = ["| run | " + " | ".join(f"{n} tok" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name, series in results.items():
        by_len = {int(k): v for k, v in series.items()}
        cells = [f"{by_len[n]:.3f}" if n in by_len else "" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_long_context(results: Mapping[str, Mapping[int, float]], path: Path, metric: str = "CIDEr") -> Path:
    """PNG of `metric` against prompt length, one line per run/method (log2 x axis)."""
    from eval.plots import new_figure, save_figure

    fig, ax = new_figure((6.0, 4.0))
    for name, series in results.items():
        points = sorted((int(k), float(v)) for k, v in series.items())
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    lengths = sorted({int(k) for series in results.values() for k in series})
    if lengths:
        ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("prompt length (tokens, image included)")
    ax.set_ylabel(metric)
    ax.set_title(f"Long-context captioning: {metric} vs context length")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend()
    return save_figure(fig, path)
