"""Generation latency: merged model vs base model vs the unmerged adapter, measured side by side.

The claim under test (DESIGN.md section 1, "merge"): a merged model has exactly the base model's
inference cost, and is cheaper than serving the adapter unmerged. Three models generate the same
caption for the same image, in one process, interleaved round by round (the order rotates each
round, so drift in machine load hits all three alike):

- base:     the tiny LLaVA preset, saved and reloaded with ``from_pretrained`` (what a user serves
            without adaptation);
- merged:   base + LoRA folded into the weights (``merge_and_unload``), saved, reloaded with plain
            transformers exactly as ``structlora demo`` loads it;
- adapter:  the same LoRA left unmerged (``peft.get_peft_model``; ``LoraConfig`` on q_proj/v_proj of
            both towers, ``init_lora_weights=False`` so B is non-zero and the update is real).

A PEFT LoRA stands in for the StructLoRA adapter: its merged form is a plain weight matrix too,
and an unmerged StructLoRA layer does at least the work of a LoRA layer. Each call generates
exactly ``--new-tokens`` tokens (min = max), greedy, KV cache on. The table gives the median time
per ``generate`` call, the 10th-90th percentile, tokens per second, and the ratio to the base
model: the median of per-round paired ratios with a bootstrap 95% confidence interval.

    python bench/inference.py                        # tiny and small presets, 30 rounds each
    python bench/inference.py --presets tiny --rounds 10 --new-tokens 16
    python bench/inference.py --update-benchmarks    # also rewrite this section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SECTION = "## Inference latency (bench/inference.py)"
MODELS = ("base", "merged", "adapter")
# Sizes per preset: "tiny" is configs/tiny.yaml's model; "small" is wider and deeper, so that matrix
# products weigh more against Python overhead.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"vision_hidden": 256, "vision_layers": 6, "vision_heads": 8, "text_hidden": 512, "text_layers": 8,
              "text_heads": 8, "text_intermediate": 1376},
}


def build_models(preset: str, workdir: Path, rank: int, device: torch.device, seed: int):
    """{name: model} for base, merged and adapter, plus the processor and the parameter count."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig, TinyPreset

    config = ModelConfig(preset="tiny", tiny=TinyPreset(**PRESETS[preset]))
    model, processor = open_model(config, seed=seed)
    model.save_pretrained(workdir / "base")
    processor.save_pretrained(workdir / "base")
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False)
    adapter = get_peft_model(copy.deepcopy(model), lora)
    merged = copy.deepcopy(adapter).merge_and_unload()
    merged.save_pretrained(workdir / "merged")
    processor.save_pretrained(workdir / "merged")
    models = {
        "base": LlavaForConditionalGeneration.from_pretrained(workdir / "base"),
        "merged": LlavaForConditionalGeneration.from_pretrained(workdir / "merged"),
        "adapter": adapter,
    }
    for m in models.values():
        m.to(device).eval()
    if sum(p.numel() for p in models["merged"].parameters()) != sum(p.numel() for p in models["base"].parameters()):
        raise RuntimeError("the merged model does not have the base model's parameter count")
    processor = AutoProcessor.from_pretrained(workdir / "merged")
    return models, processor, sum(p.numel() for p in models["base"].parameters())


def make_inputs(processor, device: torch.device) -> dict[str, torch.Tensor]:
    from PIL import Image, ImageDraw

    from data.chat_template import chat_prompt
    from data.collate import to_rgb
    from data.prompts import CAPTION_PROMPT

    image = Image.new("RGB", (64, 64), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return processor(text=[chat_prompt(processor, CAPTION_PROMPT)], images=[to_rgb(image)], return_tensors="pt").to(device)


@torch.inference_mode()
def generate(model, inputs: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    return model.generate(**inputs, do_sample=False, num_beams=1, use_cache=True, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(models: dict, inputs: dict, new_tokens: int, rounds: int, warmup: int,
            device: torch.device) -> dict[str, list[float]]:
    """Seconds per generate call for every model, interleaved; the order rotates every round."""
    names = list(models)
    outputs = {name: generate(models[name], inputs, new_tokens) for name in names}
    if not torch.equal(outputs["merged"], outputs["adapter"]):
        raise RuntimeError("merged and unmerged adapter generate different tokens: the merge is wrong")
    if outputs["merged"].shape[1] - inputs["input_ids"].shape[1] != new_tokens:
        raise RuntimeError("generation did not produce exactly --new-tokens tokens")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            generate(models[name], inputs, new_tokens)
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio_ci(model: list[float], base: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median of paired per-round ratios and its bootstrap 95% interval."""
    ratios = np.asarray(model) / np.asarray(base)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, size=(resamples, len(ratios)), replace=True), axis=1)
    return float(np.median(ratios)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def table(results: dict[str, dict[str, list[float]]], params: dict[str, int], new_tokens: int) -> str:
    lines = ["| preset | params | model | median ms / generate | p10-p90 ms | tokens/s | ratio to base (95% CI) |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for preset, times in results.items():
        for name in MODELS:
            t = np.asarray(times[name]) * 1000
            median = statistics.median(t)
            ratio, low, high = ratio_ci(times[name], times["base"])
            ratio_text = "1 (reference)" if name == "base" else f"{ratio:.3f} [{low:.3f}, {high:.3f}]"
            lines.append(f"| {preset} | {params[preset] / 1e6:.2f}M | {name} | {median:.1f} | "
                         f"{np.percentile(t, 10):.1f}-{np.percentile(t, 90):.1f} | "
                         f"{new_tokens / (median / 1000):.0f} | {ratio_text} |")
    return "\n".join(lines)


def update_benchmarks(path: Path, body: str, section: str = SECTION) -> None:
    """Replace one section of BENCHMARKS.md (by its heading; appended if absent); the others stay as they are."""
    heading = section
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (each times every model once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (min = max)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-benchmarks", action="store_true", help="rewrite this section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results, params = {}, {}
    for preset in presets:
        with tempfile.TemporaryDirectory(prefix=f"bench-inference-{preset}-") as tmp:
            models, processor, params[preset] = build_models(preset, Path(tmp), args.rank, device, args.seed)
            inputs = make_inputs(processor, device)
            results[preset] = measure(models, inputs, args.new_tokens, args.rounds, args.warmup, device)
            del models
    command = "python bench/inference.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    setup = (f"{args.rounds} interleaved rounds after {args.warmup} warm-up, {args.new_tokens} new tokens per call "
             f"(greedy, KV cache), LoRA rank {args.rank} on q_proj/v_proj; device {device}, {args.threads} torch "
             f"thread(s) on a {os.cpu_count()}-core machine shared with other jobs; torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Setup: {setup}.", "", table(results, params, args.new_tokens), "",
        "merged / base within noise means the interval contains 1 (or sits within a few percent of it): the merged "
        "model is the base architecture with different numbers in its weights. adapter / base > 1 is the cost of "
        "serving the adapter unmerged (two extra matrix products per adapted projection and PEFT's wrapper "
        "calls). Timings are whole `generate` calls, prefill included.",
    ])
    print(body)
    if args.update_benchmarks:
        update_benchmarks(ROOT / "BENCHMARKS.md", body)
        print(f"\nwrote the section '{SECTION}' of {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
