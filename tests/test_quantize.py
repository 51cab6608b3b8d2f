"""QLoRA (model.quantization): which layers are quantized, StructLoRA / LoRA / DoRA on a 4-bit base, merged exactly
into the dequantized weights, the CPU repack trap neutralised. bitsandbytes runs NF4 on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from pipeline.models.dequantize import dequantize_model, dequantized_linear  # noqa: E402
from pipeline.models.presets.tiny import build_tiny_llava  # noqa: E402
from pipeline.models.quantize import layout, load_quantized, neutralise_cpu_repack  # noqa: E402
from pipeline.schema_model import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a red blue green circle square triangle one two the of is".split()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    model, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, WORDS, ["describe the image."])
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _load(path: Path, kind: str = "nf4"):
    from transformers import LlavaForConditionalGeneration

    return load_quantized(LlavaForConditionalGeneration, path, kind, torch.float32)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_the_language_model_is_quantized_and_the_vision_side_and_lm_head_are_not(saved_tiny, kind):
    """LLaVA's recipe, module by module: every linear of the language model quantized; every linear of the vision
    tower, the projector and lm_head in the compute dtype (transformers 5.x needs full-name skip patterns)."""
    found = layout(_load(saved_tiny, kind))
    language = {n: k for n, k in found.items() if ".language_model." in n}
    kept = {n: k for n, k in found.items() if ".language_model." not in n}
    assert len(language) == 4 * 7 and set(language.values()) == {kind}  # 4 layers x (q, k, v, o, gate, up, down)
    assert any(".vision_tower." in n for n in kept) and any("multi_modal_projector" in n for n in kept)
    assert "lm_head" in kept and set(kept.values()) == {"float32"}
    assert len(found) == len(language) + len(kept)


def test_dequantized_linear_computes_what_the_4bit_layer_computes(saved_tiny):
    model = _load(saved_tiny)
    layer = model.model.language_model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(dequantized_linear(layer)(x), layer(x), atol=1e-5)
        assert not torch.allclose(dequantized_linear(layer).weight, torch.zeros(1))


def test_eval_then_train_then_merge_the_repack_trap_is_off(saved_tiny):
    """bitsandbytes repacks a Linear4bit's weight in place for a bf16 kernel after an eval-mode, no-grad forward on
    CPUs with AVX512-BF16; training then gets no gradient through it and dequantize is garbage. The loader turns
    that off on every Linear4bit; this runs eval, then training, then the dequantize a merge uses."""
    import bitsandbytes as bnb

    model = _load(saved_tiny)
    fours = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert fours and all(m.support_avx512bf16_for_cpu is False for m in fours)
    assert neutralise_cpu_repack(model) == len(fours)
    layer = model.model.language_model.layers[1].self_attn.q_proj
    before = dequantized_linear(layer).weight.clone()
    x = torch.randn(2, 4, layer.in_features)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    lora_a = torch.nn.Parameter(torch.randn(4, layer.in_features) * 0.1)
    lora_b = torch.nn.Parameter(torch.randn(layer.out_features, 4) * 0.1)
    out = layer(x) + x @ lora_a.T @ lora_b.T
    out.square().mean().backward()
    assert lora_a.grad is not None and float(lora_a.grad.abs().sum()) > 0
    assert torch.equal(dequantized_linear(layer).weight, before)


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the trap exists only on CPUs with AVX512-BF16")
def test_on_an_avx512_bf16_cpu_the_trap_is_real_without_the_guard(saved_tiny):
    """Why the guard exists, where it matters: with it off, one eval-mode no-grad forward repacks the weight and
    the dequantized weight a merge would fold is no longer the quantized one (0.12 off on an Intel Xeon with
    AMX, bitsandbytes 0.50.2). If bitsandbytes fixes this, this fails: the guard may then go."""
    layer = _load(saved_tiny).model.language_model.layers[1].self_attn.q_proj
    layer.support_avx512bf16_for_cpu = True
    before = dequantized_linear(layer).weight.detach().clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 4, layer.in_features))
    assert float((dequantized_linear(layer).weight.detach() - before).abs().max()) > 1e-2


def test_dequantize_model_leaves_a_plain_model_that_saves_and_reloads(saved_tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = _load(saved_tiny)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
    assert dequantize_model(model) == 28 and set(layout(model).values()) == {"float32"}
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, quantized, atol=1e-5)
    model.to(torch.float32).save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, quantized, atol=1e-5)


def _smoke_nf4(run: Path, method: str, kind: str = "nf4") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run)]
    for s in (f"model.quantization={kind}", f"adapter.method={method}", f"publish.registry={run}-registry",
              "eval.tasks=[caption,vqav2]"):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "merge" / "merge_check.json").read_text())


def _check_nf4_run(run: Path, check: dict, kind: str = "nf4") -> None:
    """Every stage ran on the 4-bit base; the merged model (fp32, dequantized + folded) reproduces the quantized
    adapted model, and the adapter is in it (it differs from the dequantized base alone)."""
    from transformers import LlavaForConditionalGeneration

    assert check["quantization"] == kind and check["dequantized_linears"] == 14  # smoke: 2 LM layers x 7
    assert check["max_abs_diff"] < 1e-5
    # the two merges this one avoids, measured the same way: both put the quantization error back
    other = check["other_merges"]
    assert other["requantized_max_abs_diff"] > 100 * check["max_abs_diff"]
    assert other["float_base_max_abs_diff"] > 100 * check["max_abs_diff"]
    losses = [json.loads(line)["train/loss"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < losses[0]
    merged = LlavaForConditionalGeneration.from_pretrained(run / "merge" / "model")
    base = _load(run / "base" / "model", kind)
    dequantize_model(base)
    moved = [n for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters())
             if not torch.allclose(a, b, atol=1e-6)]
    assert any(".language_model." in n for n in moved) and any(".vision_tower." in n for n in moved)


def _check_update_structure(run: Path) -> None:
    """`structlora compare --diagnostics` on a 4-bit cell: the update measured as the merge folds it (both models
    dequantized), so every delta is finite and the language model's moved; the gradient cosines run on it."""
    from pipeline.compare.structure import update_structure
    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig

    ctx = StageContext(cfg=load_config(RunConfig, run / "config.yaml"), run_dir=run)
    found = update_structure(ctx)
    assert all(v == v for k, v in found.items() if "cosine" in k or "energy" in k)  # no NaN
    assert found["update_norm"] > 0 and -1 <= found["grad_adjacent_cosine"] <= 1


def test_structlora_on_an_nf4_base_runs_every_stage_and_merges_exactly(tmp_path):
    """... and its PEFT export, put on the 4-bit base by PeftModel.from_pretrained, is the adapted model again:
    the same logits as the merged model, and `structlora eval --load-in-4bit --adapter` writes the captions the
    run's eval stage wrote for its adapted model."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = tmp_path / "nf4"
    _check_nf4_run(run, _smoke_nf4(run, "structlora"))
    _check_update_structure(run)
    processor = AutoProcessor.from_pretrained(run / "base" / "model")
    batch = processor(images=[Image.new("RGB", (64, 64), (200, 30, 30))],
                      text=["USER: <image>\nDescribe the image. ASSISTANT:"], return_tensors="pt")
    exported = PeftModel.from_pretrained(_load(run / "base" / "model"), run / "merge" / "peft_adapter")
    merged = LlavaForConditionalGeneration.from_pretrained(run / "merge" / "model")
    with torch.no_grad():
        assert float((exported(**batch).logits - merged(**batch).logits).abs().max()) < 1e-5
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", str(run / "base" / "model"), "--adapter",
                           f"adapter={run / 'merge' / 'peft_adapter'}", "--load-in-4bit", "--data", str(run),
                           "--tasks", "caption", "--max-samples", "16", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((out / "adapter" / "caption_predictions.json").read_text())
    theirs = json.loads((run / "eval" / "adapted" / "caption_predictions.json").read_text())
    assert sorted(map(json.dumps, ours)) == sorted(map(json.dumps, theirs))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_methods_on_an_nf4_base_merge_exactly(tmp_path, method):
    run = tmp_path / method
    _check_nf4_run(run, _smoke_nf4(run, method))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_fp4_and_int8_bases_merge_exactly(tmp_path, kind):
    """int8: LLM.int8's matmul also quantizes the activations, so the fold is checked against the dequantized,
    unmerged model and the int8 matmul's own difference is reported beside it."""
    run = tmp_path / kind
    check = _smoke_nf4(run, "structlora", kind)
    _check_nf4_run(run, check, kind)
    assert ("int8_matmul_vs_dequantized_max_abs_diff" in check) == (kind == "int8")


def test_an_unknown_quantization_is_refused():
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    with pytest.raises(ValueError, match="quantization"):
        from_dict(RunConfig, {"model": {"preset": "tiny", "quantization": "nf3"}})


@pytest.mark.slow
def test_a_killed_run_on_an_nf4_base_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after two checkpoints, resume: the adapter ends where an uninterrupted run's does (the 4-bit base
    is loaded again from the base stage's float model, quantized the same way, and is never trained)."""
    import shutil

    from _procs import cpu_env, kill_train_after_checkpoints, run_command
    from safetensors.torch import load_file

    sets = ["model.quantization=nf4", "train.max_steps=24", "train.save_every=6", "train.keep_last=4"]
    prepared = tmp_path / "prepared"
    subprocess.run(run_command("smoke.yaml", prepared, [*sets, "base.max_steps=4"], "--stages", "prepare,base"),
                   check=True, env=cpu_env(), capture_output=True, timeout=300)
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(prepared, runs[name])
    command = {name: run_command("smoke.yaml", run, [*sets, "base.max_steps=4"], "--stages", "train")
               for name, run in runs.items()}
    subprocess.run(command["reference"], check=True, env=cpu_env(), capture_output=True, timeout=600)
    kill_train_after_checkpoints(command["killed"], runs["killed"], timeout=300)
    subprocess.run(command["killed"], check=True, env=cpu_env(), capture_output=True, timeout=600)
    summary = json.loads((runs["killed"] / "train" / "final" / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    expected, got = (load_file(str(r / "train" / "final" / "trainable.safetensors")) for r in runs.values())
    assert expected.keys() == got.keys() and max(float((expected[k] - got[k]).abs().max()) for k in expected) < 1e-6


def test_a_bf16_compute_nf4_base_trains_under_autocast(saved_tiny):
    """`train.precision=bf16` on a 4-bit base (the GPU setting, here on CPU autocast): the 4-bit layers compute in
    bf16, the kept vision side is bf16, StructLoRA's layers sit on top; one step gives every trainable tensor a
    finite gradient, the adapter factors stay float32 and the loss falls over three steps."""
    import bitsandbytes as bnb
    from _plans import attach_planned
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.schema import AdapterConfig

    model = load_quantized(LlavaForConditionalGeneration, saved_tiny, "nf4", torch.bfloat16)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.bfloat16}
    assert model.model.vision_tower.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(saved_tiny)
    adapted = attach_planned(model, AdapterConfig(method="structlora", rank=4, alpha=8), processor=processor)
    batch = processor(images=[Image.new("RGB", (64, 64), (200, 30, 30))],
                      text=["USER: <image>\nDescribe the image. ASSISTANT: a red circle"], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    trainable = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-3)
    losses = []
    for step in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapted.model(**batch).loss + sum(adapted.regularization().values(), torch.zeros(()))
        loss.backward()
        if step == 0:
            bad = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not bad, bad[:5]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_on_an_nf4_base_gives_the_same_gradients(saved_tiny):
    """QLoRA runs almost always checkpoint activations (`train.gradient_checkpointing`): the frozen 4-bit base and
    frozen embeddings give the recomputed blocks no input that requires grad, so a reentrant checkpoint would
    leave the adapter without gradients; the non-reentrant one the trainer uses gives exactly the gradients of a
    run without it, on every trainable tensor."""
    from _plans import attach_planned
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.schema import AdapterConfig

    processor = AutoProcessor.from_pretrained(saved_tiny)
    batch = processor(images=[Image.new("RGB", (64, 64), (20, 30, 200))],
                      text=["USER: <image>\nDescribe the image. ASSISTANT: a blue square"], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    grads = []
    for checkpointing in (False, True):
        model = load_quantized(LlavaForConditionalGeneration, saved_tiny, "nf4", torch.float32)
        adapted = attach_planned(model, AdapterConfig(method="structlora", rank=4, alpha=8), processor=processor)
        torch.manual_seed(0)
        for name, p in adapted.model.named_parameters():  # lora_B away from zero: every factor gets a gradient
            if p.requires_grad and "lora_B" in name:
                p.data.normal_(0, 0.05)
        if checkpointing:
            adapted.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert adapted.model.is_gradient_checkpointing
        adapted.model.train()
        adapted.model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapted.model.named_parameters() if p.requires_grad
                      and p.grad is not None})
        assert len(grads[-1]) == sum(p.requires_grad for p in adapted.model.parameters())
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert any(float(g.abs().sum()) > 0 for n, g in grads[1].items() if ".language_model." in n)


def test_a_bf16_run_quantizes_the_weights_the_float32_merge_quantizes(saved_tiny):
    """transformers casts each weight to `dtype` before bitsandbytes quantizes it: a bf16 load would give other
    4-bit codes (~1% of the bytes here) than the float32 load of the merge, which would then fold the adapter into
    another base. The loader quantizes from float32 and casts after: the same codes and scales in both, the float
    parts in the compute dtype, RoPE's inv_freq (non-persistent) left in float32."""
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration

    loads = {dt: load_quantized(LlavaForConditionalGeneration, saved_tiny, "nf4", dt)
             for dt in (torch.float32, torch.bfloat16)}
    fours = {dt: [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] for dt, model in loads.items()}
    for a, b in zip(fours[torch.float32], fours[torch.bfloat16]):
        assert torch.equal(a.weight.data, b.weight.data)
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
    bf16 = loads[torch.bfloat16]
    assert {m.compute_dtype for m in fours[torch.bfloat16]} == {torch.bfloat16}
    assert {m.weight.quant_state.dtype for m in fours[torch.bfloat16]} == {torch.bfloat16}
    assert bf16.model.vision_tower.dtype == torch.bfloat16 and bf16.lm_head.weight.dtype == torch.bfloat16
    assert {b.dtype for n, b in bf16.named_buffers() if "inv_freq" in n} == {torch.float32}


def test_the_merge_runs_where_the_float32_model_fits(saved_tiny, monkeypatch):
    """The fold and its check run in float32: on a GPU too small for that (a 7B model is ~28 GB in float32, more
    than the 24 GB card that trained it in 4-bit), on the CPU. A 4-bit weight counts at its unpacked size."""
    from pipeline.stages.merge import float32_bytes, merge_device

    model = _load(saved_tiny)
    plain = _load(saved_tiny)
    dequantize_model(plain)
    assert float32_bytes(model) == float32_bytes(plain) == 4 * sum(p.numel() for p in plain.parameters())
    assert merge_device(model) == "cpu"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for free, where in ((2 * float32_bytes(model), "cuda"), (float32_bytes(model), "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda free=free: (free, 80 * 2**30))
        assert merge_device(model) == where
