"""StructLoRA on every VLM family: targets from the tower table, graph, a few training steps, merge, PEFT export."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.models.families import FAMILIES, layer_table
from pipeline.models.presets.tiny import build_tiny, dead_linears, tiny_inputs
from pipeline.models.targets import (
    CONNECTOR_TOWER,
    LABELS,
    attach_structlora,
    structlora_config_for_family,
    structlora_targets,
)
from pipeline.schema import AdapterConfig

STEPS = 3
# connector depth edges: linears per connector module minus one, summed over modules
CONNECTOR_DEPTH_EDGES = {"qwen3_vl": 2, "mistral3": 2, "idefics3": 0, "paligemma": 0, "gemma3": 0}
ONE_LIVE_VISION_LAYER = {"llava", "llava_next"}  # vision_feature_layer -2: the last of 2 CLIP layers is dead


def adapt_train_merge(family: str, out: Path) -> dict:
    """Attach StructLoRA (all-linear, rank 4, dead linears excluded), train STEPS AdamW steps, export to PEFT,
    merge; returns what the test checks (and docs/vlm_family_structlora.md reports)."""
    model = build_tiny(family)
    base = copy.deepcopy(model)
    table = layer_table(model)
    model.train()
    dead = dead_linears(model, tiny_inputs(model, family))
    found = structlora_targets(model, table, exclude=dead)
    handle = attach_structlora(model, table, rank=4, exclude=dead, max_steps=STEPS)
    groups = handle.trainable_parameter_groups()
    lrs = {"adapter": 1e-2, "gate": 1e-1, "coordinator": 1e-2}
    optimizer = torch.optim.AdamW([{"params": p, "lr": lrs[n]} for n, p in groups.items() if p])
    losses, no_grad = [], []
    for step in range(STEPS):
        loss = model(**tiny_inputs(model, family, seed=step + 1)).loss
        loss = loss + sum(handle.regularization().values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        if step == STEPS - 1:  # step 1 has B = 0, hence zero gradients for A and the gates' task term
            for name, layer in handle.layers.items():
                tensors = [*layer.lora_A.values(), *layer.lora_B.values(), *[g.logits for g in layer.gates.values()]]
                no_grad += [name for t in tensors if t.grad is None or not bool(t.grad.any())]
            coordinator_grad = any(p.grad is not None and bool(p.grad.any()) for p in groups["coordinator"])
        optimizer.step()
        handle.step(step + 1)
    model.eval()
    batch = tiny_inputs(model, family, seed=99)
    with torch.no_grad():
        adapted = model(**batch).logits
        base_logits = base(**batch).logits
    handle.export_peft(out / "adapter")
    merged_model = handle.merge_and_unload()
    with torch.no_grad():
        merged = merged_model(**batch).logits
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapter")).eval()
    with torch.no_grad():
        exported = loaded(**batch).logits
    nodes = handle.nodes
    edges = {t: [(nodes[a].tower, nodes[b].tower) for a, b in e] for t, e in handle.graph.edges.items()}
    return {"table": table, "dead": dead, "found": found, "nodes": nodes, "edges": edges, "losses": losses,
            "no_grad": no_grad, "coordinator_grad": coordinator_grad, "merged_class": type(merged_model),
            "base_class": type(base), "merge_error": float((merged - adapted).abs().max()),
            "peft_error": float((exported - adapted).abs().max()), "update": float((adapted - base_logits).abs().max()),
            "leftover": [n for n, _ in merged_model.named_modules() if "structlora" in n or "lora" in n]}


@pytest.mark.parametrize("family", FAMILIES)
def test_structlora_on_family(family, tmp_path):
    r = adapt_train_merge(family, tmp_path)
    table, dead, found = r["table"], set(r["dead"]), r["found"]
    # per tower: every linear of the table but the dead ones, all adapted
    expected = Counter(LABELS[t.tower] for t in table if t.name not in dead)
    assert Counter(n.tower for n in r["nodes"]) == expected
    assert found.counts == {t: sum(x.tower == t and x.name not in dead for x in table) for t in LABELS}
    assert sorted(found.excluded) == sorted(dead)
    # graph: depth chains per (tower, role); bridges through the connector where it has linears
    depth = Counter(a for a, b in r["edges"]["depth"] if a == b)
    assert len(r["edges"]["depth"]) == sum(depth.values())  # depth edges stay inside a tower
    for tower in ("vision", "language"):  # 2-layer towers: one edge per role adapted at both depths
        assert depth[tower] == sum(x.tower == tower and x.depth == 1 and x.name not in dead for x in table)
    assert (depth["vision"] == 0) == (family in ONE_LIVE_VISION_LAYER) and depth["language"] == 7
    assert depth[CONNECTOR_TOWER] == CONNECTOR_DEPTH_EDGES.get(family, 1)
    bridges = Counter(tuple(sorted(e)) for e in r["edges"]["bridge"])
    if family == "gemma3":
        assert set(bridges) == {("language", "vision")} and any("mm_input_projection_weight" in n for n in found.notes)
    else:
        assert set(bridges) == {(CONNECTOR_TOWER, "vision"), ("language", CONNECTOR_TOWER)}
    # training: finite loss, every adapter tensor (A, B, gate logits) and the coordinator get a gradient
    assert all(math.isfinite(v) for v in r["losses"])
    assert not r["no_grad"] and r["coordinator_grad"]
    # merge: the family's own class, no adapter left, same logits; the PEFT export reproduces them
    assert r["merged_class"] is r["base_class"] and not r["leftover"]
    assert r["update"] > 1e-3  # the adapter changed the function, so the comparisons below mean something
    assert r["merge_error"] < 1e-4
    assert r["peft_error"] < 1e-4


def test_notes_name_what_is_approximated():
    notes = {f: " | ".join(structlora_targets(m := build_tiny(f), layer_table(m)).notes)
             for f in ("qwen2_vl", "qwen3_vl", "gemma3", "llava")}
    assert "fused qkv" in notes["qwen2_vl"] and "deepstack" in notes["qwen3_vl"]
    assert "no nn.Linear" in notes["gemma3"] and notes["llava"] == ""
    model = build_tiny("llava")
    model.train()
    dead = dead_linears(model, tiny_inputs(model, "llava"))
    assert "6 dead linears excluded" in structlora_targets(model, layer_table(model), exclude=dead).notes[0]


def test_role_lists_select_a_fused_qkv_and_the_whole_connector():
    model = build_tiny("qwen2_vl")
    found = structlora_targets(model, layer_table(model), ["q", "v"])
    assert [n for n in found.names if ".visual." in n] == ["model.visual.blocks.0.attn.qkv",
                                                            "model.visual.blocks.1.attn.qkv",
                                                            "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    assert found.counts == {"vision": 2, "connector": 2, "language": 4} and "adapted whole" in found.notes[0]
    only = structlora_targets(model, layer_table(model), ["q_proj"], towers=["language"])
    assert only.counts == {"vision": 0, "connector": 0, "language": 2}


def test_llava_graph_is_llava_15s_two_tower_graph():
    """On LLaVA with the default adapter (q_proj, v_proj, projector): the vision layer LLaVA reads, the projector's
    two linears as a chain between the towers, the language layers; depth edges along each tower and role, bridges
    vision -> projector -> language, the sketch spaces shared along each residual stream."""
    from structlora import apply_structlora

    model = build_tiny("llava")
    model.train()
    dead = dead_linears(model, tiny_inputs(model, "llava"))
    config, _ = structlora_config_for_family(model, layer_table(model), AdapterConfig(), 10, exclude=dead)
    graph = apply_structlora(copy.deepcopy(model), config)
    vision, language = "model.vision_tower.encoder.layers", "model.language_model.layers"
    assert [(n.name, n.tower, n.in_space, n.out_space) for n in graph.nodes] == [
        (f"{vision}.0.self_attn.v_proj", "vision", "vision", f"{vision}.0.self_attn.v_proj:out"),
        (f"{vision}.0.self_attn.q_proj", "vision", "vision", f"{vision}.0.self_attn.q_proj:out"),
        ("model.multi_modal_projector.linear_1", "projector", "vision", "projector"),
        ("model.multi_modal_projector.linear_2", "projector", "projector", "language"),
        *[(f"{language}.{i}.self_attn.{k}", "language", "language", f"{language}.{i}.self_attn.{k}:out")
          for i in (0, 1) for k in ("q_proj", "v_proj")]]
    assert graph.graph.edges == {"depth": [(2, 3), (4, 6), (5, 7)], "bridge": [(0, 2), (1, 2), (3, 4), (3, 5)],
                                 "semantic": []}
