"""What the pipeline adapts on a test's tiny VLM, as the train stage finds it (`pipeline.models.plan.plan_for`):
the method attached to the planned targets, for models built without a processor (probe batch given)."""

from __future__ import annotations

from pipeline.models.plan import VlmPlan, plan_for
from pipeline.schema import AdapterConfig


def plan(model, adapter: AdapterConfig, max_steps: int = 10, probe=None, processor=None) -> VlmPlan:
    if probe is None and processor is None:
        from _tiny_models import llava_batch

        probe = llava_batch()
    return plan_for(model, processor, adapter, max_steps, probe=probe)


def attach_planned(model, adapter: AdapterConfig, max_steps: int = 10, probe=None, processor=None, seed: int = 0):
    """`pipeline.stages.methods.attach_method` on the planned targets, as `pipeline.stages.common.attach` does."""
    from pipeline.stages.methods import attach_method

    found = plan(model, adapter, max_steps, probe, processor)
    return attach_method(model, adapter, found.target_names, found.full_modules, max_steps,
                         structlora_config=found.structlora_config, seed=seed, frozen_modules=found.frozen_modules)


def llava_targets(model, adapter: AdapterConfig | None = None, probe=None) -> list[dict]:
    """StructLoRA target dicts of a tiny LLaVA as the pipeline describes it (the tower table, the layers the probe
    batch leaves dead left out): what `structlora.apply_structlora` takes."""
    from pipeline.models.families import layer_table
    from pipeline.models.plan import dead_parameters
    from pipeline.models.targets import adapter_towers, structlora_targets

    if probe is None:
        from _tiny_models import llava_batch

        probe = llava_batch()
    adapter = adapter or AdapterConfig()
    dead = [n.rsplit(".", 1)[0] for n in dead_parameters(model, probe) if n.endswith(".weight")]
    return structlora_targets(model, layer_table(model), adapter.targets, exclude=dead,
                              towers=adapter_towers(adapter)).targets
