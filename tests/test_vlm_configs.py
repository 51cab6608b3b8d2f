"""The real per-family configs (configs/*.yaml with model.arch: vlm): they load, and their adapter settings mean
something on that family: run on the family's tiny random model, every target resolves and the plan adapts each
tower, with the connector as the bridge where the family has one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.schema import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILY = {"qwen2_5_vl_7b_coco": "qwen2_5_vl", "qwen2_vl_7b_coco": "qwen2_vl", "qwen3_vl_8b_coco": "qwen3_vl",
          "llava_onevision_7b_coco": "llava_onevision", "llava_next_7b_coco": "llava_next",
          "smolvlm_2b_coco": "idefics3", "gemma3_4b_coco": "gemma3", "mistral3_24b_coco": "mistral3",
          "internvl3_8b_coco": "internvl"}


def _vlm_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml")
                  if (yaml.safe_load(p.read_text()).get("model") or {}).get("arch") == "vlm" and p.stem != "smoke_vlm")


def test_every_real_vlm_config_is_listed_here():
    assert _vlm_configs() == sorted(FAMILY)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_config_adapts_its_family(name):
    from pipeline.models.door import open_model
    from pipeline.models.plan import plan_for

    cfg = load_config(RunConfig, CONFIGS / f"{name}.yaml")
    assert cfg.model.name_or_path and "/" in cfg.model.name_or_path and cfg.model.dtype == "bfloat16"
    tiny = dataclasses.replace(cfg.model, name_or_path=None, preset=f"tiny-{FAMILY[name]}", dtype="float32")
    model, processor = open_model(tiny)
    plan = plan_for(model, processor, cfg.adapter, cfg.train.max_steps)
    towers = {row.name: row.tower for row in plan.table}
    adapted = {towers[n] for n in plan.target_names}
    has_connector = any(t == "connector" for t in towers.values())
    assert adapted == ({"vision", "connector", "language"} if has_connector else {"vision", "language"})
    assert plan.structlora_config is not None and plan.structlora_config.rank == cfg.adapter.rank
    if not has_connector:
        assert any("connector has no nn.Linear" in n for n in plan.notes)
