"""Helpers for the app tests: a tiny merged model inside a fake run directory, and a served demo.

Layout written by `make_run` (what the pipeline writes, reduced to what the demo reads)::

    RUN/merge/model/          tiny LLaVA (random weights, seed 0) + structlora_run.json
    RUN/base/model/           the same architecture, seed 1 (the "base" of the comparison)
    RUN/eval/metrics.json     made-up base and adapted scores in eval.report's layout
    RUN/eval/*.png            two placeholder plots
    RUN/prepare/world/images/test/*.png   example images
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}


def save_tiny_llava(directory: Path, seed: int) -> Path:
    """A tiny LlavaForConditionalGeneration + processor saved with save_pretrained (no network)."""
    from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
    from data.shapes import world_vocabulary
    from pipeline.models.presets.tiny import build_tiny_llava
    from pipeline.schema_model import ModelConfig

    model, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, world_vocabulary(),
                                   [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT], seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def shape_image(path: Path, colour: str = "red", size: int = 64) -> Path:
    """A small picture of a coloured circle on grey, saved as PNG."""
    image = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_run(run: Path) -> Path:
    """Write the fake run; returns the merged model directory."""
    model_dir = save_tiny_llava(run / "merge" / "model", seed=0)
    base_dir = save_tiny_llava(run / "base" / "model", seed=1)
    (model_dir / "structlora_run.json").write_text(json.dumps(
        {"base_model": str(base_dir), "run_dir": str(run), "method": "structlora"}))
    (model_dir / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# tiny: structlora merged\n")
    eval_dir = run / "eval"
    eval_dir.mkdir(parents=True)
    metrics = {"schema": 1, "title": "tiny",
               "metrics": {"caption": {"metrics": {"CIDEr": 0.91, "BLEU_4": 0.30}, "num_images": 10},
                           "vqav2": {"overall": 61.5, "perQuestion": {"1": 100.0}}},
               "base": {"caption": {"metrics": {"CIDEr": 0.40, "BLEU_4": 0.12}, "num_images": 10},
                        "vqav2": {"overall": 35.0}},
               "plots": {"long_context": "eval/long_context_cider.png"}}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    for name in ("long_context_cider", "adjacent_cosine"):  # placeholders: the fixture has no real results
        plot = Image.new("RGB", (320, 120), (250, 250, 250))
        ImageDraw.Draw(plot).text((10, 50), f"{name}.png: placeholder (test fixture)", fill=(90, 90, 90))
        plot.save(eval_dir / f"{name}.png")
    for i, colour in enumerate(COLOURS):
        shape_image(run / "prepare" / "world" / "images" / "test" / f"{i:03d}.png", colour)
    return model_dir


def direct_generate(model_dir: Path, image_path: Path, prompt: str, max_new_tokens: int) -> str:
    """What the merged model generates for (image, prompt) with plain transformers, greedy."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from data.collate import to_rgb
    from data.loading import LOADING  # beside a served demo: one load at a time in the process

    with LOADING:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
    with Image.open(image_path) as raw:
        image = to_rgb(raw.copy())
    text = f"USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's conversation, written out (not our renderer)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
