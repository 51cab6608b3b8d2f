"""export_peft writes a standard PEFT LoRA adapter that reproduces the merged model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_models import llava_batch, llava_config, tiny_llava, toy_config, toy_inputs, toy_model
from safetensors.torch import load_file
from test_structlora_layer import randomize

from structlora import apply_structlora
from structlora.export import svd_compress


def _cases():
    x = toy_inputs()
    batch = {k: v for k, v in llava_batch().items() if k != "labels"}
    return {
        "toy": (toy_model, lambda base: toy_config(fused=True), lambda m: m(x)),
        "llava": (tiny_llava, lambda base: llava_config(model=base), lambda m: m(**batch).logits),
    }


@pytest.mark.parametrize("case", ["toy", "llava"])
def test_exported_adapter_loads_in_peft_and_reproduces_the_merged_model(case, tmp_path):
    from peft import PeftModel

    build, config, run = _cases()[case]
    sm = apply_structlora(build(), config(build()))
    randomize(sm)
    sm.eval()
    summary = sm.export_peft(tmp_path / "adapter", base_model_name_or_path="tiny-base")
    with torch.no_grad():
        merged = run(sm.merge_and_unload())
        assert float((run(build()) - merged).abs().max()) > 1e-3  # so a silently ignored adapter would fail
        loaded = PeftModel.from_pretrained(build(), str(tmp_path / "adapter")).eval()
        assert float((run(loaded) - merged).abs().max()) < 1e-4

    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "structlora_export.json"]
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert not any(w in k for k in tensors for w in ("gate", "coordinator", "theta", "basis"))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == "tiny-base"
    p = sm.config.coordinator.sketch_dim
    for name, rank in summary["ranks"].items():
        assert adapter_config["rank_pattern"][name] == rank and adapter_config["alpha_pattern"][name] == rank
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        layer = sm.layers[name]
        kept = sum(int(g.kept().sum()) for g in layer.gates.values())
        assert rank == kept + p  # pruned directions dropped, one coordinator block of p per module
    assert min(summary["ranks"].values()) < max(summary["ranks"].values())  # per-module ranks differ


def test_plain_lora_export_has_rank_r(tmp_path):
    sm = apply_structlora(toy_model(), toy_config(gate=False, coordinator=False))
    summary = sm.export_peft(tmp_path / "adapter")
    assert set(summary["ranks"].values()) == {4}


def test_svd_compression_reports_the_relative_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 10, generator=g), torch.randn(8, 6, generator=g)
    same = svd_compress(A, B, 6)
    assert same[0] is A and same[2] == 0.0
    A2, B2, error = svd_compress(A, B, 3)
    full, low = B @ A, B2 @ A2
    assert A2.shape == (3, 10) and B2.shape == (8, 3)
    assert error == pytest.approx(float((full - low).norm() / full.norm()), rel=1e-4)
    s = torch.linalg.svdvals(full.double())
    assert error == pytest.approx(float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-4)

    base = toy_model()
    sm = apply_structlora(copy.deepcopy(base), toy_config())
    randomize(sm)
    summary = sm.export_peft(tmp_path / "svd", svd_rank=2)
    assert set(summary["ranks"].values()) == {2} and 0 < summary["max_relative_error"] < 1
    assert set(summary["relative_error"]) == set(sm.layers)


def test_export_refuses_a_merged_model(tmp_path):
    sm = apply_structlora(toy_model(), toy_config())
    sm.merge()
    with pytest.raises(RuntimeError, match="before merge"):
        sm.export_peft(tmp_path / "adapter")
