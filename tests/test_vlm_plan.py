"""What `pipeline.models.plan.plan_for` adapts, trains fully and freezes on a family (model.arch: vlm)."""

from __future__ import annotations

import pytest

from pipeline.models.door import open_model
from pipeline.models.plan import plan_for
from pipeline.schema import AdapterConfig, TrainConfig
from pipeline.schema_model import ModelConfig
from pipeline.stages.methods import attach_method


def _family(family: str):
    return open_model(ModelConfig(arch="vlm", preset=f"tiny-{family}"))


def _groups(family: str, adapter: AdapterConfig):
    model, processor = _family(family)
    plan = plan_for(model, processor, adapter, 10)
    adapted = attach_method(model, adapter, plan.target_names, plan.full_modules, 10,
                            structlora_config=plan.structlora_config, frozen_modules=plan.frozen_modules)
    return plan, adapted.param_groups(TrainConfig(max_steps=10))


def test_dead_parameters_are_found_by_the_graph_without_a_backward():
    model, processor = _family("llava")  # LLaVA reads vision layer -2: the last CLIP block is never used
    plan = plan_for(model, processor, AdapterConfig(targets=["all-linear"]), 10)
    dead = set(plan.frozen_modules)  # the last CLIP block and the tower's post-layernorm, nothing else
    assert "model.vision_tower.post_layernorm" in dead and "model.vision_tower.encoder.layers.1.mlp.fc2" in dead
    assert all(n.startswith("model.vision_tower.encoder.layers.1.") for n in dead - {"model.vision_tower.post_layernorm"})
    assert not any(n.startswith("model.vision_tower.encoder.layers.1.") for n in plan.target_names)
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_connector_inside_the_vision_module_is_adapted_not_trained_fully(family):
    """Qwen-VL's merger sits in model.visual: `vision: full` + `projector: lora` adapts it, and trains the rest of
    the tower; no parameter is in two optimizer groups."""
    plan, groups = _groups(family, AdapterConfig(method="structlora", vision="full", projector="lora"))
    assert not set(plan.full_modules) & set(plan.target_names)
    assert not any(".merger." in n for n in plan.full_modules)
    assert any(n.startswith("model.visual.blocks.") for n in plan.full_modules)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))


def test_a_tied_embedding_is_one_parameter_of_the_full_group():
    model, _ = _family("gemma3")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # Gemma 3 ties them
    plan, groups = _groups("gemma3", AdapterConfig(method="structlora", vision="lora", language="full"))
    full = next(g for g in groups if g["name"] == "full")
    assert len(full["params"]) == len({id(p) for p in full["params"]})
