"""The test-loss half of bench/loss_head.py (run through it: `python bench/loss_head.py [--no-test-loss]
[--chunk-check]`): the teacher-forced test loss of a large-vocabulary tiny model, full logits vs labelled positions,
and token_loss's chunks as slices vs split. See bench/loss_head.py's docstring for what is measured."""

from __future__ import annotations

import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loss_head import MiB, live_peak, median  # noqa: E402
from bench.train_step_vs_peft import spread  # noqa: E402
from data.chat_template import IGNORE_INDEX  # noqa: E402
from eval.token_loss import chunked_cross_entropy  # noqa: E402

# ----------------------------------------------------------------------------- the test loss stage

WORDS = ("the a of and to in is on with for at by from this that it its red blue green yellow white black small "
         "large round square left right top bottom near far behind front man woman child dog cat bird car bus "
         "train table chair window door street tree sky water field wall sign picture person people holding "
         "wearing standing sitting walking looking two three four many some color shape number building "
         "road light dark open closed inside outside between under over next each other one side middle background "
         "foreground shows appears seems there are has have can see kind what where which how why who").split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_examples(n: int, n_vqa: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """`n` conversations (1 to 4 turns, questions of 10-14 words, answers of 24-28 words) and `n_vqa` VQA examples
    (questions of 8-12 words, one-word answers), one random 64 x 64 image each."""
    import numpy as np
    from PIL import Image

    from data.prompts import IMAGE_TOKEN

    rng = random.Random(seed)
    gen = np.random.default_rng(seed)

    def image():
        return Image.fromarray(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8))

    conversations = []
    for i in range(n):
        messages = []
        for turn in range(1 + i % 4):
            question = _words(rng, rng.randint(10, 14)) + "?"
            messages += [{"role": "user", "content": (f"{IMAGE_TOKEN}\n" if turn == 0 else "") + question},
                         {"role": "assistant", "content": _words(rng, rng.randint(24, 28)) + "."}]
        conversations.append({"task": "conversations", "id": f"c{i}", "messages": messages, "images": [image()]})
    vqa = [{"task": "vqav2", "question_id": i, "image": image(), "question": _words(rng, rng.randint(8, 12)) + "?",
            "answer": rng.choice(WORDS)} for i in range(n_vqa)]
    return {"conversations": conversations, "vqav2": vqa}


def tiny_gemma3_large_vocab():
    """(model, processor): the tiny Gemma 3 with the real Gemma 3 tokenizer, vocabulary 262,208, 256 image tokens."""
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from _real_tokenizers import real_tokenizer

    from pipeline.models.presets.tiny import tiny_config

    tok = real_tokenizer("gemma3")
    processor = tf.Gemma3Processor(tokenizer=tok, chat_template=tok.chat_template, image_seq_length=256,
                                   image_processor=tf.Gemma3ImageProcessor(size={"height": 64, "width": 64}))
    config = tiny_config("gemma3")
    config.vision_config.image_size = 64  # 16 x 16 patches of 4: 256 tokens, pooled by 1
    config.mm_tokens_per_image = 256
    config.text_config.vocab_size = 262208
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tok, key))
    for key, token in (("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
                       ("image_token_index", "<image_soft_token>")):
        setattr(config, key, tok.convert_tokens_to_ids(token))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.Gemma3ForConditionalGeneration(config).float().eval()
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    return model, processor


@torch.no_grad()
def full_row_losses(model, inputs, labels):
    """`eval.test_loss.example_losses`'s per-row losses before issue 41 (git show 544c325~1:eval/test_loss.py): the
    logits of every position in float32, cross-entropy everywhere, the labelled ones summed."""
    logits = model(**inputs).logits.float()
    shifted, targets = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    counted = targets != IGNORE_INDEX
    return (losses * counted).sum(dim=1), counted.sum(dim=1)


def example_losses_full(model, processor, task, examples, batch_size=8, max_length=4096, seed=0):
    """The test loss as it was before issue 41: the same loop as `eval.test_loss.example_losses`, full logits."""
    from eval.test_loss import example_losses

    return example_losses(model, processor, task, examples, batch_size, max_length, seed, row_losses=full_row_losses)


def run_test_loss(n: int, n_vqa: int, rounds: int, batch_size: int) -> None:
    from data.chat_collate import make_collator
    from eval.test_loss import example_losses

    start = time.perf_counter()
    model, processor = tiny_gemma3_large_vocab()
    sets = test_examples(n, n_vqa)
    print(f"\n### Test loss stage: tiny Gemma 3, real tokenizer, vocabulary {model.config.text_config.vocab_size:,}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters (lm_head {model.lm_head.weight.numel() / 1e6:.1f} M, "
          f"tied), batch {batch_size}, {rounds} interleaved passes per arm (built in {time.perf_counter() - start:.0f} s)\n",
          flush=True)
    arms = {"full": example_losses_full, "labelled": example_losses}
    lines = ["| examples | rows x positions (padded) | labelled positions | arm | pass (s, median) | min-max (s) | "
             "labelled / full time (median, spread) | faster (full / labelled) | >= 5x | peak (MiB) | "
             "full / labelled memory |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for task, examples in sets.items():
        collate = make_collator(processor, max_length=4096, seed=0)
        positions = labelled = rows = 0
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size])
            rows += b["labels"].shape[0]
            positions += b["labels"].numel()
            labelled += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        peak, scores = {}, {}
        for arm, fn in arms.items():  # a profiled pass of each arm over the first 2 batches (the warm-up): its peak
            peak[arm], _ = live_peak(partial(fn, model, processor, task, examples[:2 * batch_size],
                                             batch_size=batch_size))
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        names = list(arms)
        for r in range(rounds):
            for arm in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                scores[arm] = arms[arm](model, processor, task, examples, batch_size=batch_size)
                times[arm].append(time.perf_counter() - t0)
            print(f"  {task} pass {r + 1}: " + ", ".join(f"{a} {times[a][-1]:.1f} s" for a in names), flush=True)
        worst = max(abs(scores["full"][k][0] - scores["labelled"][k][0]) / max(1.0, abs(scores["full"][k][0]))
                    for k in scores["full"])
        same_tokens = scores["full"].keys() == scores["labelled"].keys() and all(
            scores["full"][k][1] == scores["labelled"][k][1] for k in scores["full"])
        ratios = [a / b for a, b in zip(times["labelled"], times["full"])]
        faster = median([b / a for a, b in zip(times["labelled"], times["full"])])
        print(f"  {task}: the {len(scores['full'])} items' summed losses of the two arms agree to {worst:.1e} "
              f"(relative), items and token counts {'equal' if same_tokens else 'DIFFER'}", flush=True)
        for arm in arms:
            ts = times[arm]
            lines.append(f"| {len(examples)} {task} | {rows} x {positions // rows} | {labelled} "
                         f"({100 * labelled / positions:.1f}%) | {arm} | {median(ts):.2f} | {min(ts):.1f}-{max(ts):.1f} | "
                         + (f"{spread(ratios)} | {faster:.1f}x | {'yes' if faster >= 5 else 'no'} | "
                            if arm == "labelled" else "1 | | | ")
                         + f"{peak[arm] / MiB:.0f} | "
                         + (f"{peak['full'] / max(1, peak['labelled']):.1f}x |" if arm == "labelled" else " |"))
    print("\n" + "\n".join(lines) + "\n", flush=True)


def chunk_check(vocab: int = 262208, hidden: int = 64, rows: tuple[int, ...] = (124, 1200)) -> None:
    """`eval.token_loss.chunked_cross_entropy` (chunks as slices `logits[i:i + rows]`) against the same chunks taken
    with `logits.split(rows)`, at its chunk size and at 2^22 elements: the loss computation's live-tensor peak
    (head included, from (n, hidden) states) and time (best of 3), n labelled rows."""
    from torch.utils.checkpoint import checkpoint

    from eval.token_loss import CHUNK_ELEMENTS, _cross_entropy

    def split(logits, targets, chunk_elements):
        rows = max(1, chunk_elements // logits.shape[-1])
        return torch.cat([checkpoint(_cross_entropy, part, target, use_reentrant=False)
                          for part, target in zip(logits.split(rows), targets.split(rows))])

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.02
    print(f"\n### Chunks as slices vs split: vocabulary {vocab:,}, hidden {hidden}, float32\n")
    print("| labelled rows n | chunk (elements, rows) | chunks taken as | loss peak (MiB) | x (n x vocab float32) | "
          "time (ms, best of 3) |\n| ---: | --- | --- | ---: | ---: | ---: |")
    for n in rows:
        states = torch.randn(n, hidden, generator=gen)
        targets = torch.randint(0, vocab, (n,), generator=gen)
        for chunk in (CHUNK_ELEMENTS, 1 << 22):
            for name, fn in (("slices (token_loss)", chunked_cross_entropy), ("split", split)):
                x = states.clone().requires_grad_(True)

                def run(fn=fn, x=x, targets=targets, chunk=chunk):
                    fn(torch.nn.functional.linear(x, weight), targets, chunk).sum().backward()

                peak, _ = live_peak(run)
                times = []
                for _ in range(3):
                    x.grad = None
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                print(f"| {n} | 2^{chunk.bit_length() - 1}, {max(1, chunk // vocab)} | {name} | {peak / MiB:.0f} | "
                      f"{peak / (n * vocab * 4):.2f} | {1e3 * min(times):.0f} |", flush=True)


