"""QLoRA on every VLM family (`model.arch: vlm`, `model.quantization`): the language tower quantized, the vision
tower, the connector and the output embeddings kept, found from the model itself; the adapter plan and training on
the 4-bit base as on the float one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from pipeline.errors import UserError  # noqa: E402
from pipeline.models.door import open_model  # noqa: E402
from pipeline.models.families import FAMILIES, tower_paths  # noqa: E402
from pipeline.models.plan import plan_for  # noqa: E402
from pipeline.models.presets.processors import tiny_processor  # noqa: E402
from pipeline.models.presets.tiny import build_tiny  # noqa: E402
from pipeline.models.quantize import layout  # noqa: E402
from pipeline.schema import AdapterConfig  # noqa: E402
from pipeline.schema_model import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a local directory holding its tiny random model and processor (what a hub checkpoint is)."""
    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> Path:
        if family not in cache:
            path = root / family
            model = build_tiny(family, seed=0)
            model.save_pretrained(path)
            tiny_processor(family).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


def _load(path: Path, kind: str = "nf4"):
    return open_model(ModelConfig(arch="vlm", name_or_path=str(path), quantization=kind), source=path,
                      compute_dtype=torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_its_language_tower_only(saved, family):
    """Module by module: every linear under `get_decoder()` is 4-bit; every other linear (vision tower, the
    connector wherever it sits, e.g. Qwen-VL's `visual.merger`, Idefics3's `connector`, Mistral 3's
    `patch_merger`) and the output embeddings stay float32."""
    model, _ = _load(saved(family))
    found = layout(model)
    language = tower_paths(model)["language"]
    inside = {n: k for n, k in found.items() if n.startswith(language + ".")}
    outside = {n: k for n, k in found.items() if n not in inside}
    assert inside and set(inside.values()) == {"nf4"}, family
    assert outside and set(outside.values()) == {"float32"}, (family, outside)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert head in outside


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "idefics3", "gemma3"])
def test_the_plan_on_a_4bit_base_is_the_plan_on_the_float_base(saved, family):
    """The dead-parameter probe cannot make a packed 4-bit weight require grad; it follows the layer's output
    instead, so the same linears are adapted and the same modules frozen as on the float model."""
    adapter = AdapterConfig(method="structlora", rank=4, alpha=8)
    float_model, processor = open_model(ModelConfig(arch="vlm", name_or_path=str(saved(family))), source=saved(family))
    quantized, _ = _load(saved(family))
    expected, got = plan_for(float_model, processor, adapter, 10), plan_for(quantized, processor, adapter, 10)
    assert got.target_names == expected.target_names
    assert got.frozen_modules == expected.frozen_modules
    language = tower_paths(quantized)["language"]
    assert any(n.startswith(language + ".") for n in got.target_names)


@pytest.mark.parametrize("method", ["structlora", "lora"])
def test_a_4bit_qwen2_5_vl_trains(saved, method):
    """StructLoRA (its layer around bitsandbytes' Linear4bit) and PEFT's LoRA (its bnb layer) on a 4-bit
    Qwen2.5-VL: every trainable tensor gets a gradient and the loss falls over a few steps on one batch."""
    from pipeline.models.plan import probe_batch
    from pipeline.stages.methods import attach_method

    model, processor = _load(saved("qwen2_5_vl"))
    adapter = AdapterConfig(method=method, rank=4, alpha=8)
    plan = plan_for(model, processor, adapter, 20)
    adapted = attach_method(model, adapter, plan.target_names, plan.full_modules, 20,
                            structlora_config=plan.structlora_config, frozen_modules=plan.frozen_modules)
    trainable = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-3)
    batch = probe_batch(processor)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = adapted.model(**batch).loss
        (loss + sum(adapted.regularization().values(), torch.zeros(()))).backward()
        if step == 0:
            missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, missing[:5]
            assert any(float(p.grad.abs().sum()) > 0 for n, p in trainable.items() if "language" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_quantization_is_refused_on_a_vit_and_with_a_fully_trained_language_model():
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    with pytest.raises(ValueError, match="not vit"):
        from_dict(RunConfig, {"model": {"arch": "vit", "preset": "tiny", "quantization": "nf4"}})
    for adapter in ({"method": "full"}, {"language": "full"}):
        with pytest.raises(ValueError, match="packed integers and cannot be trained"):
            from_dict(RunConfig, {"model": {"preset": "tiny", "quantization": "nf4"}, "adapter": adapter})
    assert from_dict(RunConfig, {"model": {"preset": "tiny", "quantization": "nf4"},
                                 "adapter": {"vision": "full"}}).adapter.vision == "full"
    for method in ("adalora", "vera"):  # PEFT trains them on 4-bit, but their merge there fails: refused up front
        with pytest.raises(ValueError, match=f"adapter.method={method}: the merge into a dequantized base"):
            from_dict(RunConfig, {"model": {"preset": "tiny", "quantization": "nf4"}, "adapter": {"method": method}})


@pytest.mark.parametrize("arch,preset", [("vlm", "tiny-qwen2_5_vl"), ("llava", "tiny")])
def test_a_preset_without_a_base_stage_is_saved_once_and_loaded_quantized(tmp_path, arch, preset):
    """No checkpoint to load (the skeleton, a preset with base.enabled: false): the preset is built from its seed,
    saved where the base stage would save its model, and loaded 4-bit from there; a second load reuses it."""
    from pipeline.config import from_dict
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages.common import base_model_dir, load_base

    cfg = from_dict(RunConfig, {"model": {"arch": arch, "preset": preset, "quantization": "nf4"},
                                "base": {"enabled": False}})
    ctx = StageContext(cfg=cfg, run_dir=tmp_path)
    model, _ = load_base(ctx)
    assert "nf4" in set(layout(model).values())
    saved = base_model_dir(ctx) / "config.json"
    stamp = saved.stat().st_mtime_ns
    again, _ = load_base(ctx)
    assert saved.stat().st_mtime_ns == stamp
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    # another seed in the same run directory (no base stage to notice): built again, not the stale copy
    other = StageContext(cfg=dataclasses.replace(cfg, seed=cfg.seed + 1), run_dir=tmp_path)
    reseeded, _ = load_base(other)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, reseeded(input_ids=ids).logits)
    assert load_base(other)[0] is not None and saved.stat().st_mtime_ns != stamp
    # a model there that is not a stamped preset (the base stage's) is refused, never replaced
    (base_model_dir(ctx) / "preset.json").unlink()
    with pytest.raises(UserError, match="not saved as this preset"):
        load_base(ctx)
    assert saved.is_file()


@pytest.mark.slow
def test_smoke_vlm_on_an_nf4_qwen2_5_vl_runs_every_stage_and_merges_exactly(tmp_path):
    """`configs/smoke_vlm.yaml --set model.quantization=nf4`: every stage; the merge (dequantize, fold in float32)
    reproduces the quantized adapted model and reloads as the family's own class."""
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke_vlm.yaml"),
                           "--run-dir", str(run), "--set", "model.quantization=nf4",
                           "--set", f"publish.registry={tmp_path / 'registry'}"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["quantization"] == "nf4" and check["dequantized_linears"] == 14
    assert check["max_abs_diff"] < 1e-5 and check["model_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert check["other_merges"]["requantized_max_abs_diff"] > 100 * check["max_abs_diff"]


def test_every_real_config_offers_qlora():
    """Each real LLaVA / VLM config names the option in a comment beside its model, and takes it."""
    import yaml

    from pipeline.config import load_config
    from pipeline.schema import RunConfig

    configs = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
               if (yaml.safe_load(p.read_text()).get("model") or {}).get("name_or_path")
               and yaml.safe_load(p.read_text())["model"].get("arch") in ("llava", "vlm")]
    assert len(configs) >= 12
    for path in configs:
        assert "# quantization: nf4" in path.read_text(), path.name
        cfg = load_config(RunConfig, path, ["model.quantization=nf4"])
        assert cfg.model.quantization == "nf4" and cfg.model.double_quant


def _save_preset_on(rank: int, port: int, path: str, out: str) -> None:
    import time

    import torch.distributed as dist

    from pipeline.models.quantize import saved_preset

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def build():
        assert rank == 0, "only rank 0 may build and save (transformers writes on rank 0 only)"
        time.sleep(2)  # rank 1 reaches the file first and must wait for it
        model = build_tiny("qwen2_5_vl", seed=0)
        return model, tiny_processor("qwen2_5_vl")

    saved = saved_preset(Path(path), build)
    Path(out, f"rank{rank}").write_text(str(sorted(p.name for p in saved.iterdir())))
    dist.destroy_process_group()


def test_a_preset_is_saved_by_rank_0_and_waited_for_by_the_others(tmp_path):
    """Two gloo ranks reach `saved_preset` (the train stage): rank 0 saves, rank 1 waits for the file without a
    collective (the merge stage calls it on rank 0 alone); both see the same complete directory."""
    import torch.multiprocessing as mp
    from _procs import free_port

    mp.spawn(_save_preset_on, args=(free_port(), str(tmp_path / "base" / "model"), str(tmp_path)), nprocs=2)
    seen = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert seen[0] == seen[1] and "config.json" in seen[0] and "model.safetensors" in seen[0]
    assert not list((tmp_path / "base").glob("model.tmp*"))
