"""Peak memory of LoRA and StructLoRA training on a float base vs an NF4 base (QLoRA), at LLaVA-1.5-7B's widths.

The LLaVA-1.5-7B skeleton (pipeline.models.presets.skeletons.skeleton_llava_config: the real widths, vocabulary and image size,
a few layers) is built once and saved; then every (base, method) pair runs in a process of its own: load the base
(float32 / bfloat16, or NF4 with double quant: the language model's linears, LLaVA's recipe), adapt the language
and vision towers' q and v (rank 8), train `--steps` steps on one batch (an image + `--text-tokens` tokens), and
report the peak: CUDA's max_memory_allocated on a GPU, else the process's peak RSS above what it held before the
model was loaded. The weights' bytes are also counted per storage kind, and scaled to the full 32 + 24 layers
(what a 24 GB GPU has to hold).

    python bench/qlora_memory.py                       # CPU: fp32 and NF4 bases, LoRA and StructLoRA
    python bench/qlora_memory.py --device cuda --bases bf16,nf4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FULL_TEXT_LAYERS, FULL_VISION_LAYERS = 32, 24


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5), so VmHWM measures from here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(path: Path, vision_layers: int, text_layers: int) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.presets.skeletons import skeleton_llava_config

    config = skeleton_llava_config(vision_layers, text_layers, image_token_id=32000, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters and buffers per storage kind (uint8 = packed 4-bit, with its constants)."""
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        kind = str(t.dtype).removeprefix("torch.")
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
    return out


def one(path: Path, base: str, method: str, steps: int, text_tokens: int, device: str) -> dict:
    """In this process: load, adapt, train; the peak memory and the weights' bytes."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.quantize import layout, load_quantized

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    before = _current_rss_mb()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(base, torch.bfloat16 if cuda else torch.float32)
    if base == "nf4":
        model = load_quantized(LlavaForConditionalGeneration, path, "nf4", dtype,
                               device_map={"": device} if cuda else "cpu")
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    weights = weight_bytes(model)
    kinds = layout(model)
    targets = [n for n in kinds if n.endswith(("q_proj", "v_proj")) and "vision_tower.encoder.layers" in n
               or n.endswith(("q_proj", "v_proj")) and ".language_model." in n]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        params, handle = [p for p in model.parameters() if p.requires_grad], None
    else:
        from pipeline.models.families import layer_table
        from pipeline.models.targets import structlora_config, structlora_targets
        from pipeline.schema import AdapterConfig
        from structlora import apply_structlora

        adapter = AdapterConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
        last = f".encoder.layers.{model.config.vision_config.num_hidden_layers - 1}."  # LLaVA reads layer -2
        found = structlora_targets(model, layer_table(model), adapter.targets,
                                   exclude=[n for n in targets if "vision_tower" in n and last in n])
        handle = apply_structlora(model, structlora_config(found, adapter, max_steps=1000))
        model = handle.model
        params = [p for group in handle.trainable_parameter_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cfg = model.config if hasattr(model, "config") else model.base_model.config
    image_tokens, size = cfg.image_seq_length, cfg.vision_config.image_size
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, image_tokens), cfg.image_token_id),
                     torch.randint(3, 32000, (1, text_tokens))], dim=1).to(device)
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(1, 3, size, size).to(device=device, dtype=dtype)}
    loaded = _current_rss_mb() - before
    load_peak = _rss_mb() - before
    reset = False if cuda else _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
            if handle is not None:
                loss = loss + sum(handle.regularization().values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if handle is not None:
            handle.step(step + 1)
        losses.append(float(loss))
    seconds = (time.perf_counter() - start) / steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # the training steps' peak (VmHWM reset after loading) above the process before loading
        peak = (_hwm_mb() if reset else _rss_mb()) - before
    quantized = sum(1 for k in kinds.values() if k == "nf4")
    return {"base": base, "method": method, "peak_mb": round(peak, 1), "resident_after_load_mb": round(loaded, 1),
            "load_peak_mb": round(load_peak, 1), "weights_mb": {
        k: round(v / 2**20, 1) for k, v in weights.items()}, "quantized_linears": quantized,
        "adapted": len(targets), "step_seconds": round(seconds, 3), "losses": [round(x, 4) for x in losses],
        "measure": "cuda max_memory_allocated in training" if cuda else
        "peak RSS of the training steps (VmHWM reset after loading) above the process before loading"}


def full_size_estimate(rows: list[dict], vision_layers: int, text_layers: int) -> dict[str, float]:
    """Weights of the whole LLaVA-1.5-7B per base kind, from the skeleton's measured total plus, per missing layer, its parameter count x bytes per parameter
    (4 fp32, 2 bf16, ~0.53 for NF4 with its constants): what the 32 text and
    24 vision layers hold (the embeddings, lm_head and projector are in the skeleton at full size already)."""
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.presets.skeletons import skeleton_llava_config

    config = skeleton_llava_config(vision_layers, text_layers, image_token_id=32000, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)
    import torch

    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(config)
    text_layer = sum(p.numel() for p in meta.model.language_model.layers[0].parameters())
    vision_layer = sum(p.numel() for p in meta.model.vision_tower.encoder.layers[0].parameters())
    out = {}
    for row in rows:
        if row["method"] != "lora":
            continue
        total = sum(row["weights_mb"].values())
        per_text = text_layer * (0.5 + 0.03 if row["base"] == "nf4" else (2 if row["base"] == "bf16" else 4)) / 2**20
        per_vision = vision_layer * (4 if row["base"] == "fp32" else 2) / 2**20
        out[row["base"]] = round((total + per_text * (FULL_TEXT_LAYERS - text_layers)
                                  + per_vision * (FULL_VISION_LAYERS - vision_layers)) / 1024, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", default="fp32,nf4", help="comma-separated: fp32, bf16, nf4")
    parser.add_argument("--methods", default="lora,structlora")
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "BASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.one[2], args.steps, args.text_tokens, args.device)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "skeleton"
        build(path, args.vision_layers, args.text_layers)
        for base in args.bases.split(","):
            for method in args.methods.split(","):
                proc = subprocess.run([sys.executable, __file__, "--one", str(path), base, method, "--steps",
                                       str(args.steps), "--text-tokens", str(args.text_tokens), "--device",
                                       args.device], capture_output=True, text=True, env={**os.environ})
                if proc.returncode != 0:
                    raise SystemExit(f"{base} / {method} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{base:5s} {method:10s} training peak {r['peak_mb']:8.1f} MiB (after load "
                      f"{r['resident_after_load_mb']:.0f}, load peak {r['load_peak_mb']:.0f})  weights {r['weights_mb']}  "
                      f"{r['step_seconds']:.2f} s/step  loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
                      flush=True)
    estimate = full_size_estimate(rows, args.vision_layers, args.text_layers)
    print("full LLaVA-1.5-7B weights (GiB), the skeleton's measured total + missing layers' parameters x bytes per parameter:", estimate)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "full_7b_weights_gib": estimate, "args": vars(args) | {
            "json": str(args.json)}}, indent=1, default=str))


if __name__ == "__main__":
    main()
