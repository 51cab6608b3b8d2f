"""Loader throughput on the one VLM path (issue 39): shards -> TrainStream -> DataLoader -> ChatCollator, per family.

    python bench/loader_vlm.py [--images 600] [--batches 20] [--batch-size 16] [--rounds 3] [--workers 0,2]
                               [--models llava,qwen2_5_vl,smolvlm] [--tokenizers real|tiny]
    python bench/loader_vlm.py --breakdown   # ms per sample of decode, image processor (1 / 2 threads), collator

Real-size JPEGs (bench/loader.py's `make_coco_jpegs`: gradients, shapes, noise, quality 90) are prepared into
caption shards once (`data.prepare.prepare_coco`, 100 per shard): COCO's 640 x 480 for LLaVA-1.5 and SmolVLM,
448 x 448 for Qwen2.5-VL. Each family's processor is built offline with its hub configuration (the torchvision
backend, which `AutoProcessor` picks in transformers 5 with torchvision >= 0.27):

- LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): LlavaProcessor, CLIPImageProcessor shortest edge 336 + center crop 336
  (the skeleton preset's, `pipeline.models.presets.skeletons`), patch 14, strategy "default": 576 image tokens;
  LLaVA-1.5's conversation template (`LLAVA15_CHAT_TEMPLATE`, what the door gives LLaVA).
- Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct): Qwen2_5_VLProcessor, Qwen2VLImageProcessor patch 14, merge 2,
  temporal 2, min_pixels 3136, max_pixels 12845056 (its preprocessor_config.json): a 448 x 448 image is
  32 x 32 patches = 256 tokens; the hub chat template (tests/_real_tokenizers.QWEN2_VL_HUB).
- SmolVLM (HuggingFaceTB/SmolVLM-Instruct, the 2.2B one): Idefics3Processor, Idefics3ImageProcessor with image
  splitting, size longest edge 1536, max_image_size 384 (the tiles), LANCZOS, mean/std 0.5; image_seq_len 81
  (SigLIP 384 / 14 = 27 x 27 patches, pixel shuffle 3); a 640 x 480 image becomes 4 x 3 tiles + the global
  image = 13 x 81 tokens plus their markers. (SmolVLM-256M / 500M use 512 px tiles, edge 2048, 64 tokens.)

Tokenizers (`--tokenizers real`, the default): the npm-cached hub tokenizers of tests/_real_tokenizers.py, a
stand-in vocabulary of the same kind where the model's own is not cached: LLaVA-1.5 <- the SentencePiece
Llama tokenizer there (Mistral-7B's vocabulary; Vicuna's is another of the same mechanics) with `<image>` and
`<pad>` added as llava-hf does; Qwen2.5-VL <- Qwen3's (Qwen2.5's vocabulary + 4 tokens); SmolVLM <- Qwen3's
byte-level BPE (SmolLM2's is a byte-level BPE too) with SmolVLM's image / utterance tokens added, and the
project's SmolVLM template. `--tokenizers tiny` uses the project's tiny tokenizers instead.

Each configuration (family x workers) is measured once per round, rounds interleaved, so load from other jobs
hits all alike; median and range over rounds. The clock starts after the first workers + 1 batches of each run (worker start-up).

GPU demand (samples/s one GPU consumes in LoRA fine-tuning; printed with its derivation by `demand()`):
anchor = LLaVA-1.5-7B, 665k samples in "around 10 hours on 8x A100" (its README) = 2.3 samples/s per A100
(full fine-tuning). A LoRA step skips the frozen weights' gradients (about 4 N instead of 6 N FLOPs per token),
so it may run up to 1.5x faster: 3.5 samples/s. The other models are scaled by compute per sample,
sum over towers of (non-embedding parameters x tokens through them): vision patches through the vision tower
(576 / 1024 / 13 x 729), image + text tokens through the language model, text tokens per sample unknown for
the mix (taken as the worst case over 50..1500). These are estimates, not measured throughputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loader import A100_SAMPLES_PER_S, make_coco_jpegs  # noqa: E402

LORA_SPEEDUP = 1.5  # 6N / 4N FLOPs per token: LoRA skips the frozen weights' gradients
TEXT_TOKENS = (50, 1500)  # range of text tokens per sample over which the demand is maximised

# non-embedding parameters (billions) of each tower, and tokens / patches per sample through it:
# LLaVA-1.5-7B: Vicuna-7B 32 x 202.4 M, CLIP ViT-L/14-336 23 used layers x 12.6 M on 577 patches
# Qwen2.5-VL-7B: Qwen2.5-7B 28 x 233 M, ViT 32 x 19.7 M (+ merger) on 1024 patches of a 448 x 448 image
# SmolVLM-Instruct: SmolLM2-1.7B 24 x 67.1 M, SigLIP-so400m 27 x 15.2 M on 13 tiles x 729 patches
COST = {
    "llava": {"lm": 6.48, "vision": 0.29, "patches": 577, "image_tokens": 576},
    "qwen2_5_vl": {"lm": 6.53, "vision": 0.67, "patches": 1024, "image_tokens": 256},
    "smolvlm": {"lm": 1.61, "vision": 0.41, "patches": 13 * 729, "image_tokens": 13 * 81},
}
MODEL_NAMES = {"llava": "LLaVA-1.5-7B (336 px)", "qwen2_5_vl": "Qwen2.5-VL-7B (448 x 448)",
               "smolvlm": "SmolVLM-Instruct 2.2B (640 x 480, 384 px tiles)"}
IMAGE_SIZE = {"llava": (640, 480), "qwen2_5_vl": (448, 448), "smolvlm": (640, 480)}


def compute(model: str, text: int) -> float:
    c = COST[model]
    return c["lm"] * (c["image_tokens"] + text) + c["vision"] * c["patches"]


def demand(model: str) -> tuple[float, float]:
    """(low, high) samples/s one A100 consumes in LoRA tuning of `model` over TEXT_TOKENS (estimate; see the module
    docstring); the target uses the high one."""
    values = [A100_SAMPLES_PER_S * LORA_SPEEDUP * compute("llava", t) / compute(model, t) for t in TEXT_TOKENS]
    return min(values), max(values)


def measure(stream, batch_size: int, batches: int, workers: int, collate) -> float:
    """Samples/s in steady state: the clock starts once `workers + 1` batches have arrived (worker start-up, and
    the batches the other workers made while the first one was awaited, are not throughput)."""
    import itertools

    from torch.utils.data import DataLoader

    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    iterator = iter(loader)
    for _ in range(workers + 1):
        next(iterator)
    start = time.perf_counter()
    n = sum(batch["input_ids"].shape[0] for batch in itertools.islice(iterator, batches))
    return n / (time.perf_counter() - start)


# --- processors -------------------------------------------------------------------------------------------------


def _real(name: str, **overrides):
    """A cached real tokenizer of tests/_real_tokenizers.py, or None (not cached and no npm)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import _real_tokenizers as real

        return real.real_tokenizer(name, **overrides)
    except BaseException as err:  # noqa: BLE001 - pytest.skip raises an OutcomeException (a BaseException)
        if isinstance(err, KeyboardInterrupt):
            raise
        print(f"note: real tokenizer {name} unavailable ({str(err)[:120]}); using the project's tiny one")
        return None


def llava_processor(tokenizers: str):
    from tokenizers import AddedToken
    from transformers import CLIPImageProcessor, LlavaProcessor

    from data.chat_template import LLAVA15_CHAT_TEMPLATE
    from pipeline.models.presets.skeletons import SKELETON_IMAGE_SIZE, SKELETON_PATCH

    tok = _real("llama2", legacy=False) if tokenizers == "real" else None
    if tok is None:
        from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
        from pipeline.models.presets.words import build_tiny_processor

        words = "a picture with shapes number 0 1 2 3 4".split()
        return build_tiny_processor(words, SKELETON_IMAGE_SIZE, SKELETON_PATCH, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    side = SKELETON_IMAGE_SIZE
    image = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                               do_center_crop=True, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=SKELETON_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_CHAT_TEMPLATE)


def qwen2_5_vl_processor(tokenizers: str):
    import transformers as tf

    from pipeline.models.presets.processors import tiny_processor

    tok = _real("qwen3") if tokenizers == "real" else None
    if tok is None:
        tok, template = tiny_processor("qwen2_5_vl").tokenizer, tiny_processor("qwen2_5_vl").chat_template
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from _real_tokenizers import QWEN2_VL_HUB as template
    real = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056}
    return tf.Qwen2_5_VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**real),
                                  video_processor=tf.Qwen2VLVideoProcessor(**real), tokenizer=tok,
                                  chat_template=template)


def smolvlm_processor(tokenizers: str):
    import transformers as tf
    from tokenizers import AddedToken

    from pipeline.models.presets.processors import tiny_processor

    tiny = tiny_processor("idefics3")
    tok = _real("qwen3") if tokenizers == "real" else None
    if tok is None:
        tok = tiny.tokenizer
    else:
        markers = ["<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
        markers += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        tok.add_tokens([AddedToken(m, special=True, normalized=False) for m in markers], special_tokens=True)
        tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>"})
    image = tf.Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 1536},
                                      max_image_size={"longest_edge": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return tf.Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=81,
                                chat_template=tiny.chat_template)


PROCESSORS = {"llava": llava_processor, "qwen2_5_vl": qwen2_5_vl_processor, "smolvlm": smolvlm_processor}


def breakdown(models: list[str], tokenizers: str, batch_size: int, repeats: int = 3) -> None:
    """Milliseconds per sample of one batch's pieces (median of `repeats`): JPEG decode, the image processor with
    torch's 1 and 2 intra-op threads, and the whole collator (template, tokens, labels, images) with 1 thread."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from data.chat_collate import ChatCollator

    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()

    def ms(fn, batch: list, n: int) -> float:
        torch.set_num_threads(n)
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(batch)
            values.append(time.perf_counter() - start)
        return 1e3 * statistics.median(values) / len(batch)

    print("| model | JPEG decode | image processor, 1 thread | image processor, 2 threads | collator, 1 thread "
          "(ms / sample) |\n| --- | ---: | ---: | ---: | ---: |")
    for m in models:
        w, h = IMAGE_SIZE[m]
        raw = []
        for _ in range(batch_size):
            buffer = io.BytesIO()
            Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(buffer, "JPEG", quality=90)
            raw.append(buffer.getvalue())
        processor = PROCESSORS[m](tokenizers)
        collate = ChatCollator(processor, max_length=2048)
        images = [Image.open(io.BytesIO(r)).convert("RGB") for r in raw]
        samples = [{"task": "caption", "image": im, "captions": ["a picture with shapes number 0"]} for im in images]
        collate(samples)  # the image cost asked once

        decode = ms(lambda raw: [Image.open(io.BytesIO(r)).convert("RGB") for r in raw], raw, 1)
        one, two = ms(processor.image_processor, images, 1), ms(processor.image_processor, images, 2)
        whole = ms(collate, samples, 1)
        print(f"| {MODEL_NAMES[m]} | {decode:.1f} | {one:.1f} | {two:.1f} | {whole:.1f} |", flush=True)
    torch.set_num_threads(threads)


# --- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="JPEGs per image size")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per run (after the first)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--models", default="llava,qwen2_5_vl,smolvlm")
    parser.add_argument("--tokenizers", choices=["real", "tiny"], default="real")
    parser.add_argument("--breakdown", action="store_true", help="only time, per family, the pieces of one batch in "
                                                                 "this process: JPEG decode, image processor, collator")
    args = parser.parse_args(argv)
    if args.breakdown:
        return breakdown([m.strip() for m in args.models.split(",") if m.strip()], args.tokenizers, args.batch_size)
    from PIL import Image

    from data.chat_collate import ChatCollator
    from data.prepare import prepare_coco
    from data.stream import ShardSource, TrainStream

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = {}
        for size in sorted({IMAGE_SIZE[m] for m in models}):
            t0 = time.perf_counter()
            name = f"{size[0]}x{size[1]}"
            captions, images = make_coco_jpegs(root / f"coco{name}", args.images, size=size)
            prepare_coco(captions, images, root / f"shards{name}", shard_size=100)
            shards[size] = root / f"shards{name}"
            print(f"{args.images} JPEGs of {size[0]} x {size[1]} generated and prepared in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        processors = {m: PROCESSORS[m](args.tokenizers) for m in models}
        info = {}
        for m in models:
            collate = ChatCollator(processors[m], max_length=2048)
            image = Image.new("RGB", IMAGE_SIZE[m])
            sample = {"task": "caption", "image": image, "captions": ["a picture with shapes number 0"]}
            batch = collate([sample])
            info[m] = {"image_tokens": collate.image_tokens(image), "row": int(batch["input_ids"].shape[1]),
                       "tokenizer": type(processors[m].tokenizer).__name__, "vocab": len(processors[m].tokenizer),
                       "pixels": tuple(batch["pixel_values"].shape)}
            print(f"{m}: {type(processors[m]).__name__} + {type(processors[m].image_processor).__name__}, "
                  f"{info[m]['tokenizer']} ({info[m]['vocab']} ids); a {IMAGE_SIZE[m][0]} x {IMAGE_SIZE[m][1]} image = "
                  f"{info[m]['image_tokens']} tokens, a caption row = {info[m]['row']} tokens, "
                  f"pixel_values {info[m]['pixels']}", flush=True)
        length = args.batch_size * (args.batches + max(workers) + 3)
        rates: dict[tuple[str, int], list[float]] = {(m, w): [] for m in models for w in workers}
        for r in range(args.rounds):  # interleaved: every configuration once per round
            for m in models:
                for w in workers:
                    source = ShardSource.from_dir(shards[IMAGE_SIZE[m]])
                    stream = TrainStream([source], epoch_length=length, seed=r, rank=0, world_size=1,
                                         shuffle_buffer=256, sampling="resample")
                    collate = ChatCollator(processors[m], max_length=2048, seed=r)
                    rates[(m, w)].append(measure(stream, args.batch_size, args.batches, w, collate))
                    print(f"round {r + 1}: {m}, {w} workers: {rates[(m, w)][-1]:.1f} samples/s", flush=True)
        print(f"\n| model (images) | image tokens / sample | workers | samples/s (median of {args.rounds}, range) | "
              "assumed GPU demand (samples/s, one A100, LoRA; range over text length) | 3 x demand (high) | "
              "samples/s / (3 x demand) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in models:
            low, need = demand(m)
            for w in workers:
                values = sorted(rates[(m, w)])
                mid = statistics.median(values)
                print(f"| {MODEL_NAMES[m]} | {info[m]['image_tokens']} | {w} | {mid:.1f} ({values[0]:.1f}-{values[-1]:.1f}) "
                      f"| {need:.1f} ({low:.1f}-{need:.1f}) | {3 * need:.1f} | {mid / (3 * need):.2f} |")
        print(f"\ndemand: LLaVA-1.5 anchor {A100_SAMPLES_PER_S:.2f} samples/s per A100 (full FT) x {LORA_SPEEDUP} "
              "(LoRA) x compute(LLaVA) / compute(model), compute = LM params x (image + text tokens) + vision params x "
              f"patches, worst case over text tokens {TEXT_TOKENS}")


if __name__ == "__main__":
    main()
