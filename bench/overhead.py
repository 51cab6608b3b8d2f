"""Training-step overhead of StructLoRA vs LoRA, side by side, on the tiny preset or at 7B widths.

    python bench/overhead.py [--rounds 20] [--batch-size 16] [--text-tokens 32] [--rank 8]
    python bench/overhead.py --preset skeleton --rounds 3 --warmup 1 --batch-size 1 --precisions fp32,bf16
    python bench/overhead.py --preset skeleton --device cuda --rounds 6 --batch-size 1 --precisions bf16
    python bench/overhead.py --preset qwen2_5_vl_skeleton --rounds 8 --warmup 1 --batch-size 1 --raw

`--preset skeleton` is LLaVA-1.5-7B at its real widths (CLIP ViT-L/14-336 with 576 image tokens,
projector 1024 -> 4096 -> 4096, Llama 4096 / 32 heads / 11008, vocabulary 32064) with 3 vision
and 2 language layers and random weights; there the methods are PEFT LoRA and full StructLoRA,
each precision in turn (bf16 = autocast over float32 master weights, as accelerate trains).

`--preset qwen2_5_vl_skeleton` is Qwen2.5-VL-7B-Instruct at its real widths
(`pipeline.models.presets.skeletons`: ViT 1280 / 16 heads / 3420 with a fused qkv, merger 5120 -> 5120 -> 3584,
Qwen2 3584 / 28 heads / 18944, vocabulary 152064) with 2 vision and 2 language layers, random weights,
one 336 x 336 image (144 image tokens) per row. Its targets come from the tower table
(`pipeline.models.families.layer_table` -> `pipeline.models.targets.structlora_targets`, `--targets` roles,
default q, v): the vision towers' fused qkv whole, the LM's q_proj and v_proj, and the merger's two
linears; PEFT LoRA gets the same module names. The LoRA copy shares the base's frozen embedding and
lm_head tensors (untouched by both methods; 2 x 2.2 GB saved), which are still counted in each
method's memory.

Every method adapts the same modules (LLaVA: q_proj and v_proj of the used CLIP layers and of the
LM, and the projector's two linears) of the same base model at the same rank, and trains on
the same batch with AdamW. Steps are interleaved: each round runs one step of every method,
in a shuffled order, so that load from other jobs on this shared machine hits all alike.

Time: wall clock of a full training step (forward, loss + regularisers, backward, optimizer
step, StructLoRA's `step()`), median over rounds after warm-up.

Memory: torch.profiler's allocation events give the peak bytes of live tensors allocated
during one training step (activations, gradients, temporaries); the resident state
(parameters, buffers, optimizer moments) is added to it. Python objects and allocator
caches are not counted, so the total is what the tensors need, not the process RSS.
On CUDA (`--device cuda`) steps are timed between synchronisations and the step peak is
torch.cuda.max_memory_allocated over one step minus what was allocated before it.

A semantic-edge refresh step (gradient sketches captured, every `refresh_every` = 50 steps)
is timed as its own row; the amortised time counts it once per 50 steps.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 320


def build_base(seed: int = 0, preset: str = "tiny", vision_layers: int = 3, text_layers: int = 2):
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.presets.skeletons import skeleton_llava_config
    from pipeline.models.presets.tiny import tiny_llava_config
    from pipeline.schema_model import TinyPreset

    if preset == "qwen2_5_vl_skeleton":
        from pipeline.models.presets.skeletons import build_qwen2_5_vl_skeleton

        return build_qwen2_5_vl_skeleton(vision_layers, text_layers, seed=seed)
    if preset == "skeleton":
        config = skeleton_llava_config(vision_layers, text_layers, image_token_id=32000, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2)
    else:
        config = tiny_llava_config(TinyPreset(), vocab_size=VOCAB, image_token_id=VOCAB - 1, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def make_batch(model, batch_size: int, text_tokens: int, image_side: int = 336) -> dict[str, torch.Tensor]:
    if model.config.model_type == "qwen2_5_vl":
        from pipeline.models.presets.skeletons import skeleton_inputs

        return skeleton_inputs(model, batch_size, image_side=image_side, text_tokens=text_tokens)
    g = torch.Generator().manual_seed(0)
    image_tokens = model.config.image_seq_length
    size = model.config.vision_config.image_size
    image_token = model.config.image_token_id
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long),
                     torch.full((batch_size, image_tokens), image_token),
                     torch.randint(3, min(image_token, model.config.text_config.vocab_size), (batch_size, text_tokens),
                                   generator=g)], dim=1)
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


class Method:
    """One adapted copy of the base model with its optimizer and step function."""

    def __init__(self, name: str, base, rank: int, ablation: str | None, refresh: bool = False,
                 precision: str = "fp32", copy_base: bool = True, device: str = "cpu",
                 shared_with: Method | None = None, found=None, share: tuple[torch.Tensor, ...] = ()):
        """`found`: the `pipeline.models.targets.FamilyTargets` to adapt (the tower table's, as the pipeline finds
        them); `share`: frozen base tensors the copy keeps instead of copying them."""
        from pipeline.schema import AdapterConfig

        self.name = name
        self.device = torch.device(device)
        self.refresh = refresh
        self.precision = precision
        if shared_with is not None:  # the same adapted model and optimizer, stepped another way (7B widths:
            self.model, self.handle = shared_with.model, shared_with.handle  # no room for a third copy)
            self.optimizer, self.steps = shared_with.optimizer, 0
            return
        model = (copy.deepcopy(base, {id(t): t for t in share}) if copy_base else base).to(self.device)
        adapter = AdapterConfig(rank=rank, alpha=2.0 * rank)
        torch.manual_seed(1)
        if ablation is None:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=found.names))
            self.handle = None
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            from structlora import apply_structlora

            adapter.structlora = {"ablation": ablation}
            from pipeline.models.targets import structlora_config

            config = structlora_config(found, adapter, max_steps=1000)
            self.handle = apply_structlora(model, config)
            self.model = self.handle.model
            params = [p for group in self.handle.trainable_parameter_groups().values() for p in group]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.steps = 0
        self.model.train()

    def step(self, batch) -> None:
        if self.handle is not None and self.handle.semantic_edges_on:
            self.handle.set_capture(self.refresh)  # a refresh step, or an ordinary one
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.model(**batch).loss
            if self.handle is not None:
                loss = loss + sum(self.handle.regularization().values())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.handle is not None:
            self.handle.step(self.steps)

    def resident_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(method: Method, batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    if method.device.type == "cuda":
        _sync(method.device)
        before = torch.cuda.memory_allocated(method.device)
        torch.cuda.reset_peak_memory_stats(method.device)
        method.step(batch)
        _sync(method.device)
        return torch.cuda.max_memory_allocated(method.device) - before

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        method.step(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(methods: list[Method], batch, rounds: int, warmup: int, precision: str) -> dict:
    """Interleaved step times and memory of `methods` at one precision."""
    for method in methods:
        method.precision = precision
    for _ in range(warmup):
        for method in methods:
            method.step(batch)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    order = random.Random(0)
    for _ in range(rounds):
        for method in order.sample(methods, len(methods)):
            _sync(method.device)
            start = time.perf_counter()
            method.step(batch)
            _sync(method.device)
            times[method.name].append(time.perf_counter() - start)
    step_peak = {m.name: peak_step_bytes(m, batch) for m in methods}
    memory = {m.name: step_peak[m.name] + m.resident_bytes() for m in methods}
    return {"times": times, "step_peak": step_peak, "memory": memory}


def table(methods: list[Method], result: dict, title: str) -> list[str]:
    times, step_peak, memory = result["times"], result["step_peak"], result["memory"]
    ref = methods[0].name
    median = {name: statistics.median(values) for name, values in times.items()}
    # ratio per round (all methods ran within moments of each other), then its median and quartiles
    ratios = {name: [t / r for t, r in zip(values, times[ref])] for name, values in times.items()}
    refresh_name, full_name = "StructLoRA, full, refresh step", "StructLoRA, full"
    if refresh_name in times:
        amortised = [(49 * f + r) / 50 for f, r in zip(times[full_name], times[refresh_name])]
        ratios["amortised"] = [a / r for a, r in zip(amortised, times[ref])]
        median["amortised"] = statistics.median(amortised)

    def ratio(name: str) -> str:
        values = sorted(ratios[name])
        if len(values) < 4:  # too few rounds for quartiles: median and range
            return f"{statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})"
        q1, q2, q3 = statistics.quantiles(values, n=4)
        return f"{q2:.3f} ({q1:.3f}-{q3:.3f})"

    lines = [title, "", "| method | step time (ms, median) | time ratio (median, spread) | peak step memory (MiB) | "
             "total memory (MiB) | memory ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        lines.append(f"| {m.name} | {1e3 * median[m.name]:.1f} | {ratio(m.name)} | {step_peak[m.name] / 2**20:.1f} | "
                     f"{memory[m.name] / 2**20:.1f} | {memory[m.name] / memory[ref]:.3f} |")
    if "amortised" in median:
        lines.append(f"| StructLoRA, full, amortised (1 refresh / 50 steps) | {1e3 * median['amortised']:.1f} | "
                     f"{ratio('amortised')} | | | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "skeleton", "qwen2_5_vl_skeleton"], default="tiny")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="skeletons: vision layers (default: 3 CLIP layers, 2 Qwen2.5-VL blocks)")
    parser.add_argument("--text-layers", type=int, default=2, help="skeletons: language layers")
    parser.add_argument("--targets", default="q,v", help="qwen2_5_vl_skeleton: comma-separated roles or name "
                                                         "suffixes (pipeline.models.families.resolve_targets)")
    parser.add_argument("--image-side", type=int, default=336, help="qwen2_5_vl_skeleton: image side in pixels")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--raw", action="store_true", help="also print every round's step times (ms)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on a CPU without AVX512-BF16/AMX "
                                                       "falls back to a reference GEMM hundreds of times slower)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    qwen = args.preset == "qwen2_5_vl_skeleton"
    vision_layers = args.vision_layers if args.vision_layers is not None else (2 if qwen else 3)
    base = build_base(preset=args.preset, vision_layers=vision_layers, text_layers=args.text_layers)
    batch = {k: v.to(args.device) for k, v in make_batch(base, args.batch_size, args.text_tokens,
                                                         args.image_side).items()}
    dev = {"device": args.device}
    # the targets as the pipeline finds them: the tower table, without the layers the probe batch leaves dead
    from pipeline.models.families import layer_table
    from pipeline.models.plan import dead_parameters
    from pipeline.models.targets import structlora_targets

    dead = [n.rsplit(".", 1)[0] for n in dead_parameters(base, batch) if n.endswith(".weight")]
    found = structlora_targets(base, layer_table(base), targets=[t.strip() for t in args.targets.split(",")],
                               exclude=dead)
    if qwen:  # as the LLaVA skeleton, with the big frozen tensors shared
        print(f"adapted ({len(found.names)}): {', '.join(found.names)}", *found.notes, sep="\n", flush=True)
        share = (base.get_input_embeddings().weight, base.get_output_embeddings().weight)
        lora = Method("LoRA (PEFT)", base, args.rank, None, found=found, share=share, **dev)
        full = Method("StructLoRA, full", base, args.rank, "full", copy_base=False, found=found, **dev)
        methods = [lora, full,
                   Method("StructLoRA, full, refresh step", base, args.rank, "full", refresh=True, shared_with=full,
                          **dev)]
    elif args.preset == "skeleton":  # two copies of a 0.73 B model: the base itself becomes the second
        lora = Method("LoRA (PEFT)", base, args.rank, None, found=found, **dev)  # a copy of the base, taken first
        full = Method("StructLoRA, full", base, args.rank, "full", copy_base=False, found=found, **dev)
        methods = [lora, full,
                   Method("StructLoRA, full, refresh step", base, args.rank, "full", refresh=True, shared_with=full,
                          **dev)]
    else:
        methods = [
            Method("LoRA (PEFT)", base, args.rank, None, found=found, **dev),
            Method("StructLoRA, ablation=lora", base, args.rank, "lora", found=found, **dev),
            Method("StructLoRA, no coordinator", base, args.rank, "no_coordinator", found=found, **dev),
            Method("StructLoRA, full", base, args.rank, "full", found=found, **dev),
            Method("StructLoRA, full, refresh step", base, args.rank, "full", refresh=True, found=found, **dev),
        ]
    seq = batch["input_ids"].shape[1]
    name = {"skeleton": "LLaVA-1.5-7B skeleton", "qwen2_5_vl_skeleton": f"Qwen2.5-VL-7B skeleton ({vision_layers} "
            f"vision + {args.text_layers} text layers)"}.get(args.preset, "tiny LLaVA preset")
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        result = measure(methods, batch, args.rounds, args.warmup, precision)
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"torch threads {torch.get_num_threads()}"
        title = (f"{name}, {precision}, batch {args.batch_size} x {seq} tokens, rank {args.rank}, {args.rounds} rounds, "
                 f"{where}")
        print("\n".join(table(methods, result, title)) + "\n", flush=True)
        if args.raw:
            print("\n".join(f"{n}: {', '.join(f'{1e3 * t:.0f}' for t in ts)} ms" for n, ts in result["times"].items()))


if __name__ == "__main__":
    main()
