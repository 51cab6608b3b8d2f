"""pipeline/towers.py: the LLaVA and ViT tower descriptions that pipeline hands to structlora."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import llava_batch, tiny_llava

from pipeline.models.vit_targets import (
    full_module_names,
    last_used_vision_layer,
    structlora_config_for,
    target_module_names,
    tower_targets,
)
from pipeline.schema import AdapterConfig, ModelConfig, TinyPreset
from structlora import StructLoRALinear, apply_structlora

MODEL_CFG = ModelConfig(preset="tiny")


@pytest.mark.parametrize(("layer", "expected"), [(-2, 2), (-1, 3), (-4, 0), (1, 0), (3, 2), ([-2, -3], 2)])
def test_last_used_vision_layer(layer, expected):
    assert last_used_vision_layer(4, layer) == expected
    with pytest.raises(ValueError, match="reads no CLIP layer"):
        last_used_vision_layer(4, -5)


def test_llava_targets_stop_at_the_vision_feature_layer():
    model = tiny_llava(vision_layers=3, text_layers=2)
    names = target_module_names(model, MODEL_CFG, AdapterConfig())
    vision = sorted(n for n in names if "vision_tower" in n)
    assert vision == sorted(f"model.vision_tower.encoder.layers.{i}.self_attn.{k}" for i in (0, 1)
                            for k in ("q_proj", "v_proj"))
    assert "model.multi_modal_projector.linear_1" in names and "model.multi_modal_projector.linear_2" in names
    assert sum("language_model" in n for n in names) == 4
    model.config.vision_feature_layer = -1
    assert sum("vision_tower" in n for n in target_module_names(model, MODEL_CFG, AdapterConfig())) == 6


def test_parts_switch_towers_and_full_parts_skip_the_unused_clip_layer():
    model = tiny_llava(vision_layers=3)
    adapter = AdapterConfig(vision="full", projector="frozen", language="lora")
    assert {t["tower"] for t in tower_targets(model, adapter)} == {"language"}
    full = full_module_names(model, adapter)
    assert "model.vision_tower.encoder.layers.1" in full and "model.vision_tower.encoder.layers.2" not in full
    assert full_module_names(model, AdapterConfig(projector="full", language="full")) == [
        "model.multi_modal_projector", "model.language_model", "lm_head"]
    with pytest.raises(ValueError, match="name no linear layer"):
        tower_targets(model, AdapterConfig(targets=["nonexistent"]))


def test_the_last_clip_layer_gets_no_gradient_and_is_not_adapted():
    model = tiny_llava(vision_layers=3)
    sm = apply_structlora(model, structlora_config_for(model, MODEL_CFG, AdapterConfig(), max_steps=10))
    last = model.get_submodule("model.vision_tower.encoder.layers.2")
    assert not any(isinstance(m, StructLoRALinear) for m in last.modules())
    last.requires_grad_(True)
    model.train()
    model(**llava_batch()).loss.backward()
    assert all(p.grad is None for p in last.parameters())  # adapting it would break DDP and AdaLoRA
    assert all(p.grad is not None for group in sm.trainable_parameter_groups().values() for p in group)


def test_structlora_config_for_merges_the_adapter_section():
    model = tiny_llava()
    adapter = AdapterConfig(rank=4, alpha=8, structlora={"gate": {"prior": 0.2}, "coordinator": {"edges": "depth"}})
    cfg = structlora_config_for(model, MODEL_CFG, adapter, max_steps=123)
    assert (cfg.rank, cfg.alpha, cfg.gate.prior, cfg.gate.anneal_steps) == (4, 8.0, 0.2, 123)
    assert cfg.coordinator.edge_types() == ("depth", "bridge")
    assert [t.tower for t in cfg.targets] == ["vision", "vision", "projector", "projector", "language", "language"]
    with pytest.raises(ValueError, match="set adapter.rank instead"):
        structlora_config_for(model, MODEL_CFG, AdapterConfig(structlora={"rank": 2}), 10)
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'adapter.structlora.gate.prio'"):
        structlora_config_for(model, MODEL_CFG, AdapterConfig(structlora={"gate": {"prio": 0.2}}), 10)


def test_the_recipe_interface_covers_the_coordinator():
    from pipeline.schema import TrainConfig
    from pipeline.stages.methods import attach_method

    model = tiny_llava()
    adapter = AdapterConfig(rank=4, alpha=8)
    adapted = attach_method(model, adapter, target_module_names(model, MODEL_CFG, adapter), [], 10,
                            structlora_config=structlora_config_for(model, MODEL_CFG, adapter, 10))
    groups = {g["name"]: g for g in adapted.param_groups(TrainConfig(lr_gate=0.1))}
    assert set(groups) == {"adapter", "gate", "coordinator"} and groups["gate"]["lr"] == 0.1
    state = adapted.trainable_state_dict()
    assert any(k.startswith("structlora_coordinator.") for k in state)
    assert adapted.num_trainable() == sum(p.numel() for g in groups.values() for p in g["params"])
    assert set(adapted.regularization()) == {"ib"}
    adapted.on_step(1)


def test_timm_vit_adapts_the_q_and_v_slices_of_qkv(tmp_path):
    from peft import PeftModel

    from pipeline.models.vit import build_tiny_vit

    preset = TinyPreset(image_size=16, patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2, num_labels=3)
    model = build_tiny_vit(preset, impl="timm")
    adapter = AdapterConfig(targets=["qkv"], projector="frozen", language="frozen")
    sm = apply_structlora(model, structlora_config_for(model, MODEL_CFG, adapter, 10))
    assert [n.name for n in sm.nodes] == ["blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[v]", "blocks.1.attn.qkv[q]",
                                          "blocks.1.attn.qkv[v]"]
    assert full_module_names(model, adapter) == ["head"]
    with torch.no_grad():
        for layer in sm.layers.values():
            for b in layer.lora_B.values():
                b.normal_()
    sm.eval()
    x = torch.randn(2, 3, 16, 16)
    sm.export_peft(tmp_path / "adapter")
    with torch.no_grad():
        merged = sm.merge_and_unload()(x)
        loaded = PeftModel.from_pretrained(build_tiny_vit(preset, impl="timm"), str(tmp_path / "adapter")).eval()
        assert float((loaded(x) - merged).abs().max()) < 1e-4


def test_transformers_vit_targets():
    from pipeline.models.vit import build_tiny_vit

    preset = TinyPreset(image_size=16, patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2, num_labels=3)
    model = build_tiny_vit(preset, impl="transformers")
    adapter = AdapterConfig(projector="frozen", language="frozen")
    assert target_module_names(model, MODEL_CFG, adapter) == [
        f"vit.layers.{i}.attention.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")]
    assert full_module_names(model, adapter) == ["classifier"]
