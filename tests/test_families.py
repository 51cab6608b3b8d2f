"""Every supported VLM family builds offline, trains on CPU, and has its towers found from the model itself."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch

from pipeline.models.families import FAMILIES, ROLES, LinearInfo, layer_table, resolve_targets, tower_paths
from pipeline.models.presets.tiny import build_tiny, dead_linears, tiny_inputs

# family -> (vision, connector, language) linear counts of the tiny build (2 layers per tower; lm_head excluded)
COUNTS = {
    "llava": (12, 2, 14),            # CLIP q/k/v/out/fc1/fc2; multi_modal_projector.linear_1/2
    "llava_next": (12, 2, 14),
    "llava_onevision": (12, 2, 14),  # SigLIP tower, Qwen2 LM
    "qwen2_vl": (8, 2, 14),          # fused attn.qkv + attn.proj + fc1/fc2; visual.merger.mlp.0/2
    "qwen2_5_vl": (10, 2, 14),       # fused qkv + proj + gate/up/down; visual.merger.mlp.0/2
    "qwen3_vl": (8, 4, 14),          # visual.merger and one deepstack merger, two linears each
    "idefics3": (12, 1, 14),         # connector.modality_projection.proj
    "gemma3": (12, 0, 14),           # the projector is a bare Parameter (mm_input_projection_weight)
    "paligemma": (12, 1, 14),        # multi_modal_projector.linear
    "mistral3": (14, 3, 14),         # Pixtral gate/up/down; patch_merger.merging_layer + linear_1/2
    "internvl": (12, 2, 14),         # attention.projection_layer is the attention output
}
FUSED_QKV = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
# linears that get no gradient: LLaVA(-NeXT) reads vision layer -2, so the last CLIP block is dead
DEAD = {"llava": "model.vision_tower.encoder.layers.1.", "llava_next": "model.vision_tower.encoder.layers.1."}


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return build_tiny(family)


@functools.cache
def _table(family: str) -> tuple[LinearInfo, ...]:
    return tuple(layer_table(_model(family)))


def test_every_family_has_expectations():
    assert set(COUNTS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_offline_small_and_fast(family):
    start = time.perf_counter()
    model = build_tiny(family, seed=1)
    assert time.perf_counter() - start < 15
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_on_cpu(family):
    model = _model(family).train()
    try:
        dead = dead_linears(model, tiny_inputs(model, family))
        loss = model(**tiny_inputs(model, family, seed=1)).loss
    finally:
        model.eval()
    assert math.isfinite(loss.item())
    expected = [r.name for r in _table(family) if family in DEAD and r.name.startswith(DEAD[family])]
    assert dead == expected
    assert all(r.name not in dead for r in _table(family) if r.tower == "connector")


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_table(family):
    model, table = _model(family), _table(family)
    counts = tuple(sum(r.tower == t for r in table) for t in ("vision", "connector", "language"))
    assert counts == COUNTS[family]
    assert "lm_head" not in {r.name for r in table}
    assert {r.role for r in table} <= set(ROLES) - {"other"}
    config = model.config
    layers = {"vision": config.vision_config.num_hidden_layers, "language": config.text_config.num_hidden_layers}
    for tower, n in layers.items():
        rows = [r for r in table if r.tower == tower]
        assert {r.depth for r in rows} == set(range(n))  # every linear of a tower sits in its layer list
        per_depth = [sum(r.depth == d for r in rows) for d in range(n)]
        assert per_depth == [len(rows) // n] * n
        roles = {r.role for r in rows}
        attention = {"qkv", "out"} if tower == "vision" and family in FUSED_QKV else {"q", "k", "v", "out"}
        assert attention <= roles and not ({"q", "k", "v"} & roles and "qkv" in roles)
        assert {"mlp_in", "mlp_out"} <= roles
    assert all(r.depth is None for r in table if r.tower == "connector")
    bridge = [r.role for r in table if r.tower == "connector"]
    assert bridge.count("connector_in") == bridge.count("connector_out")
    module = dict(model.named_modules())
    paths = tower_paths(model)
    assert all(module[r.name].in_features == r.in_features for r in table)
    assert all(r.name.startswith(paths[r.tower] + ".") for r in table if r.tower != "connector")


def test_tower_exceptions_and_paths():
    assert tower_paths(_model("idefics3")) == {"vision": "model.vision_model", "language": "model.text_model"}
    assert tower_paths(_model("qwen2_vl")) == {"vision": "model.visual", "language": "model.language_model"}
    qwen3 = {r.name: r.role for r in _table("qwen3_vl") if r.tower == "connector"}
    assert qwen3 == {"model.visual.merger.linear_fc1": "connector_in", "model.visual.merger.linear_fc2": "connector_out",
                     "model.visual.deepstack_merger_list.0.linear_fc1": "connector_in",
                     "model.visual.deepstack_merger_list.0.linear_fc2": "connector_out"}
    mistral = [r.role for r in _table("mistral3") if r.tower == "connector"]
    assert mistral == ["connector_in", "connector", "connector_out"]
    assert [r.role for r in _table("paligemma") if r.tower == "connector"] == ["connector"]


def test_resolve_targets():
    table = _table("qwen2_vl")
    assert resolve_targets(table, "all-linear") == [r.name for r in table]
    assert resolve_targets(table, ["all-linear"]) == [r.name for r in table]
    qv = resolve_targets(table, ["q", "v"])
    assert len(qv) == 4 and all(".self_attn." in n for n in qv)  # the vision tower's attention is fused
    assert resolve_targets(table, ["q_proj", "v_proj"]) == qv
    assert resolve_targets(table, ["qkv", "q", "v"]) == [r.name for r in table if r.role in ("qkv", "q", "v")]
    assert resolve_targets(table, ["attn.qkv"]) == ["model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.attn.qkv"]
    assert resolve_targets(table, ["connector_in", "connector_out"]) == ["model.visual.merger.mlp.0",
                                                                         "model.visual.merger.mlp.2"]
    assert resolve_targets(table, ["out"], towers=["vision"]) == [f"model.visual.blocks.{i}.attn.proj" for i in (0, 1)]
    assert resolve_targets(table, r".*\.layers\.1\.mlp\.down_proj") == ["model.language_model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="q_prj"):
        resolve_targets(table, ["q_proj", "q_prj"])
    with pytest.raises(ValueError, match="'q'"):
        resolve_targets(table, ["q"], towers=["vision"])


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_matches_peft(family):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_tiny(family), peft.LoraConfig(target_modules="all-linear", r=2))
    adapted = {n.removeprefix("base_model.model.").removesuffix(".base_layer") for n, _ in model.named_modules()
               if n.endswith(".base_layer")}
    assert set(resolve_targets(_table(family), "all-linear")) == adapted
