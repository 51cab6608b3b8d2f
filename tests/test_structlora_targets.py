"""What the pipeline hands to structlora: LLaVA-1.5 described from its own tower table like every family
(`pipeline.models.plan`), the ViT classifier by `pipeline.models.vit_targets`."""

from __future__ import annotations

import pytest
import torch
from _plans import attach_planned, plan
from _tiny_models import llava_batch, tiny_llava

from pipeline.models.vit_targets import full_module_names, structlora_config_for, target_module_names
from pipeline.schema import AdapterConfig
from pipeline.schema_model import TinyPreset
from structlora import StructLoRALinear, apply_structlora


def test_llava_targets_stop_at_the_vision_feature_layer():
    """The layers past `vision_feature_layer` get no gradient (found on a probe batch, not by a formula) and are
    never adapted; with -1 every layer is."""
    model = tiny_llava(vision_layers=3, text_layers=2)
    names = plan(model, AdapterConfig()).target_names
    vision = sorted(n for n in names if "vision_tower" in n)
    assert vision == sorted(f"model.vision_tower.encoder.layers.{i}.self_attn.{k}" for i in (0, 1)
                            for k in ("q_proj", "v_proj"))
    assert "model.multi_modal_projector.linear_1" in names and "model.multi_modal_projector.linear_2" in names
    assert sum("language_model" in n for n in names) == 4
    model.config.vision_feature_layer = -1
    assert sum("vision_tower" in n for n in plan(model, AdapterConfig()).target_names) == 6


def test_parts_switch_towers_and_full_parts_skip_the_unused_clip_layer():
    model = tiny_llava(vision_layers=3)
    found = plan(model, AdapterConfig(vision="full", projector="frozen", language="lora"))
    assert {n.split(".")[1] for n in found.target_names} == {"language_model"}
    assert any(n.startswith("model.vision_tower.encoder.layers.1.") for n in found.full_modules)
    assert not any(n.startswith("model.vision_tower.encoder.layers.2.") for n in found.full_modules)
    assert "model.vision_tower.encoder.layers.2.self_attn.q_proj" in found.frozen_modules  # dead: frozen
    both = plan(model, AdapterConfig(projector="full", language="full")).full_modules
    assert "model.multi_modal_projector.linear_1" in both and "lm_head" in both
    assert any(n.startswith("model.language_model.layers.") for n in both)
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="adapter.targets"):
        plan(model, AdapterConfig(targets=["nonexistent"]))


def test_the_last_clip_layer_gets_no_gradient_and_is_not_adapted():
    model = tiny_llava(vision_layers=3)
    sm = apply_structlora(model, plan(model, AdapterConfig()).structlora_config)
    last = model.get_submodule("model.vision_tower.encoder.layers.2")
    assert not any(isinstance(m, StructLoRALinear) for m in last.modules())
    last.requires_grad_(True)
    model.train()
    model(**llava_batch()).loss.backward()
    assert all(p.grad is None for p in last.parameters())  # adapting it would break DDP and AdaLoRA
    assert all(p.grad is not None for group in sm.trainable_parameter_groups().values() for p in group)


def test_the_structlora_config_merges_the_adapter_section():
    model = tiny_llava()
    adapter = AdapterConfig(rank=4, alpha=8, structlora={"gate": {"prior": 0.2}, "coordinator": {"edges": "depth"}})
    cfg = plan(model, adapter, max_steps=123).structlora_config
    assert (cfg.rank, cfg.alpha, cfg.gate.prior, cfg.gate.anneal_steps) == (4, 8.0, 0.2, 123)
    assert cfg.coordinator.edge_types() == ("depth", "bridge")
    assert [t.tower for t in cfg.targets] == ["vision", "vision", "projector", "projector", "language", "language"]
    from pipeline.errors import ConfigError

    with pytest.raises(ValueError, match="set adapter.rank instead"):
        plan(model, AdapterConfig(structlora={"rank": 2}))
    with pytest.raises(ConfigError, match="unknown key 'adapter.structlora.gate.prio'"):
        plan(model, AdapterConfig(structlora={"gate": {"prio": 0.2}}))


def test_the_recipe_interface_covers_the_coordinator():
    from pipeline.schema import TrainConfig

    adapted = attach_planned(tiny_llava(), AdapterConfig(rank=4, alpha=8))
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
    sm = apply_structlora(model, structlora_config_for(model, adapter, 10))
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
    assert target_module_names(model, adapter) == [
        f"vit.layers.{i}.attention.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")]
    assert full_module_names(model, adapter) == ["classifier"]
