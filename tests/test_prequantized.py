"""A base saved already quantized by bitsandbytes (a `*-bnb-4bit` upload, or a QLoRA base saved after loading):
its config.json holds a `quantization_config`, so `from_pretrained` loads it 4-bit whatever the run asks for.
The run must say so before it trains (there are no float weights: a float run could not merge), load it as saved
when `model.quantization` names its kind, merge by dequantizing, and refuse other quantizers by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from pipeline.errors import UserError  # noqa: E402
from pipeline.models.quantize import check_saved, layout, load_quantized, saved_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _smoke_model():
    from pipeline.config import load_config
    from pipeline.schema import RunConfig

    return load_config(RunConfig, ROOT / "configs" / "smoke.yaml").model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The smoke config's tiny LLaVA saved float, then loaded NF4 (compute dtype bf16, as `*-bnb-4bit` uploads
    are) and saved again: what a user downloads as a 4-bit base."""
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.door import open_model

    root = tmp_path_factory.mktemp("prequantized")
    model, processor = open_model(_smoke_model())
    model.save_pretrained(root / "float")
    processor.save_pretrained(root / "float")
    quantized = load_quantized(LlavaForConditionalGeneration, root / "float", "nf4", torch.bfloat16)
    quantized.save_pretrained(root / "nf4")
    processor.save_pretrained(root / "nf4")
    return {"float": root / "float", "nf4": root / "nf4"}


def test_the_saved_kind_is_read_from_config_json(saved, tmp_path):
    assert saved_kind(saved["float"]) is None and saved_kind(saved["nf4"]) == "nf4"
    other = tmp_path / "gptq"
    other.mkdir()
    config = json.loads((saved["float"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"gptq.*only bitsandbytes"):
        saved_kind(other)


@pytest.mark.parametrize("requested", ["none", "fp4", "int8"])
def test_a_saved_nf4_base_is_refused_unless_the_config_names_nf4(saved, requested):
    with pytest.raises(UserError, match=rf"{saved['nf4']}.*\(nf4\).*set model.quantization=nf4"):
        check_saved(saved["nf4"], requested, name=str(saved["nf4"]))
    assert check_saved(saved["nf4"], "nf4") == "nf4" and check_saved(saved["float"], "none") is None


def test_it_loads_as_saved_computing_in_the_runs_dtype(saved):
    """Its own layout (the vision side and lm_head float), but the run's compute dtype, not the saved bf16: on a
    CPU without fast bf16 that is the difference between minutes and hours."""
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration

    model = load_quantized(LlavaForConditionalGeneration, saved["nf4"], "nf4", torch.float32)
    found = layout(model)
    assert {k for n, k in found.items() if ".language_model." in n} == {"nf4"}
    assert {k for n, k in found.items() if ".language_model." not in n} == {"float32"}
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and {m.compute_dtype for m in four_bit} == {torch.float32}
    assert {m.weight.quant_state.dtype for m in four_bit} == {torch.float32}  # dequantizes as it computes
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit)  # the repack trap off
    bf16 = load_quantized(LlavaForConditionalGeneration, saved["nf4"], "nf4", torch.bfloat16)
    assert bf16.model.vision_tower.dtype == torch.bfloat16  # RoPE's frequencies are not weights: float32 still
    assert {b.dtype for n, b in bf16.named_buffers() if "inv_freq" in n} == {torch.float32}


def test_structlora_trains_on_a_saved_nf4_base_and_merges_exactly(saved, tmp_path):
    """`structlora run` on it: with model.quantization unset it stops before preparing anything and says what to
    set; with nf4 every stage runs and the merge reproduces the 4-bit adapted model. The two merges the check
    otherwise measures need float weights this base does not have: skipped, with the reason."""
    from transformers import LlavaForConditionalGeneration

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run)]
    for s in ("model.preset=null", f"model.name_or_path={saved['nf4']}", "base.enabled=false",
              "eval.tasks=[caption]", "eval.max_samples=8", "train.max_steps=6", "train.save_every=3",
              "train.eval_every=3", "data.shapes.images=120", f"publish.registry={tmp_path / 'registry'}"):
        cmd += ["--set", s]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "set model.quantization=nf4" in refused.stderr
    assert not (run / "prepare").exists()
    proc = subprocess.run(cmd + ["--set", "model.quantization=nf4"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["quantization"] == "nf4" and check["dequantized_linears"] == 14 and check["max_abs_diff"] < 1e-5
    assert "saved quantized" in check["other_merges"]["skipped"]
    merged = LlavaForConditionalGeneration.from_pretrained(run / "merge" / "model")
    assert getattr(merged.config, "quantization_config", None) is None  # a plain float model
    assert layout(merged) and set(layout(merged).values()) == {"float32"}


def test_structlora_eval_loads_a_saved_nf4_base_as_saved(saved):
    """`structlora eval` on it needs no --load-in-4bit, and gets the run's compute dtype, not the saved one."""
    import bitsandbytes as bnb

    from pipeline.eval_models import load_model

    model, _ = load_model(str(saved["nf4"]), torch.float32)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and {m.compute_dtype for m in four_bit} == {torch.float32}


def _saved_vlm_all_4bit(root: Path) -> Path:
    """A tiny Qwen2.5-VL saved with its vision tower 4-bit too (only lm_head kept), as some uploads are."""
    from transformers import AutoModelForImageTextToText

    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig

    model, processor = open_model(ModelConfig(arch="vlm", preset="tiny-qwen2_5_vl"))
    model.save_pretrained(root / "float")
    processor.save_pretrained(root / "float")
    quantized = load_quantized(AutoModelForImageTextToText, root / "float", "nf4", torch.float32, keep=("lm_head",))
    quantized.save_pretrained(root / "nf4")
    processor.save_pretrained(root / "nf4")
    return root / "nf4"


def test_a_saved_nf4_vlm_family_loads_as_saved(tmp_path):
    """model.arch: vlm, e.g. Qwen2.5-VL saved 4-bit (vision tower included): refused as float, loaded as saved
    (its own skip list, not LLaVA's recipe) with nf4."""
    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig

    path = _saved_vlm_all_4bit(tmp_path)
    with pytest.raises(UserError, match="set model.quantization=nf4"):
        open_model(ModelConfig(arch="vlm", name_or_path=str(path)), source=path)
    again, _ = open_model(ModelConfig(arch="vlm", name_or_path=str(path), quantization="nf4"), source=path,
                          compute_dtype=torch.float32)
    found = layout(again)
    assert {k for n, k in found.items() if n.startswith("model.visual.")} == {"nf4"}
    assert {k for n, k in found.items() if n.startswith("model.language_model.")} == {"nf4"}
    assert {n: k for n, k in found.items() if k != "nf4"} == {"lm_head": "float32"}  # as saved: only lm_head kept


@pytest.mark.slow
def test_structlora_trains_on_a_vlm_saved_all_4bit_and_merges_exactly(tmp_path):
    """smoke_vlm on that base: StructLoRA adapts the 4-bit vision tower too; the merge dequantizes all 26 4-bit
    linears and reproduces the adapted model."""
    path = _saved_vlm_all_4bit(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke_vlm.yaml"), "--run-dir", str(run)]
    for s in ("model.preset=null", f"model.name_or_path={path}", "base.enabled=false", "model.quantization=nf4",
              "eval.tasks=[caption]", "eval.max_samples=8", f"publish.registry={tmp_path / 'registry'}"):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["dequantized_linears"] == 26 and check["max_abs_diff"] < 1e-5
    assert check["model_class"] == "Qwen2_5_VLForConditionalGeneration"


def test_structlora_eval_quantizes_as_the_run_did(saved):
    """`structlora eval --quantization fp4 --no-double-quant` scores on the base a run with model.quantization=fp4
    and double_quant: false trained on (--load-in-4bit is NF4 with double quant); a saved NF4 checkpoint asked for
    as fp4 is refused with the flag to give."""
    import bitsandbytes as bnb

    from pipeline.cli_parser import build_parser
    from pipeline.eval_models import load_model

    model, _ = load_model(str(saved["float"]), torch.float32, quantization="fp4", double_quant=False)
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert states and {s.quant_type for s in states} == {"fp4"} and not any(s.nested for s in states)
    model, _ = load_model(str(saved["float"]), torch.float32, quantization="nf4")
    assert all(m.weight.quant_state.nested for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    with pytest.raises(UserError, match=r"\(nf4\).*--quantization nf4"):
        load_model(str(saved["nf4"]), torch.float32, quantization="fp4")
    from pipeline.cli_handlers import eval_quantization

    parse = build_parser().parse_args
    assert eval_quantization(parse(["eval", "m", "--data", "d", "--load-in-4bit"])) == "nf4"
    assert eval_quantization(parse(["eval", "m", "--data", "d", "--quantization", "int8"])) == "int8"
    with pytest.raises(UserError, match="--load-in-4bit means --quantization nf4"):
        eval_quantization(parse(["eval", "m", "--data", "d", "--load-in-4bit", "--quantization", "fp4"]))
