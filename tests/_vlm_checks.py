"""What a finished `model.arch: vlm` run must show, for any family (tests/test_vlm_run.py and its slow sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

FAMILY_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
                "gemma3": "Gemma3ForConditionalGeneration", "paligemma": "PaliGemmaForConditionalGeneration",
                "mistral3": "Mistral3ForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}


def probe(processor) -> dict[str, torch.Tensor]:
    from data.chat_collate import ChatCollator

    image = Image.new("RGB", (64, 64), (30, 160, 40))
    samples = [{"task": "caption", "image": image, "captions": ["a green circle ."]},
               {"task": "gqa", "image": image, "question": "what colour is the circle ?", "answer": "green"}]
    batch = ChatCollator(processor, max_length=4096)(samples)
    batch.pop("labels")
    return batch


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


def check_run(run: Path, family: str, all_linear: bool) -> dict:
    """Every stage's result of a finished run; returns the train summary."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.models.families import layer_table
    from pipeline.models.plan import plan_for
    from pipeline.schema import AdapterConfig

    summary = json.loads((run / "train" / "final" / "summary.json").read_text())
    assert summary["trainable_parameters"] > 0 and summary["steps"] > 0
    assert set(summary["image_tokens"]) == {"caption", "vqav2", "gqa"} and min(summary["image_tokens"].values()) > 0
    # merge: the family's own class, adapted == merged within the check's tolerance, reloads with the Auto class
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["model_class"] == FAMILY_CLASS[family]
    assert check["max_abs_diff"] <= check["tolerance"] and check["max_abs_diff_reloaded_vs_saved"] <= 1e-6
    merged_dir, base_dir = run / "merge" / "model", run / "base" / "model"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert type(merged).__name__ == FAMILY_CLASS[family]
    processor = AutoProcessor.from_pretrained(merged_dir)
    batch = probe(processor)
    # the PEFT export on the base reproduces the adapted model (= the merged one, by the merge check)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    base_logits = logits(base, batch)
    exported = logits(PeftModel.from_pretrained(base, str(run / "merge" / "peft_adapter")), batch)
    merged_logits = logits(merged, batch)
    assert float((exported - merged_logits).abs().max()) < 1e-4
    assert float((merged_logits - base_logits).abs().max()) > 1e-5  # training changed the function
    # the tower table of the base, and what the run adapted from it
    fresh = AutoModelForImageTextToText.from_pretrained(base_dir)
    table = layer_table(fresh)
    targets = ["all-linear"] if all_linear else ["q_proj", "v_proj"]
    plan = plan_for(fresh, AutoProcessor.from_pretrained(base_dir), AdapterConfig(targets=targets), 1)
    dead = {f"{m}" for m in plan.frozen_modules}
    trained = json.loads((run / "train" / "final" / "summary.json").read_text()).get("adapter_notes", [])
    assert trained == plan.notes
    from safetensors import safe_open

    with safe_open(str(run / "train" / "final" / "trainable.safetensors"), "pt") as f:
        keys = list(f.keys())
    adapted = {n for n in plan.target_names if any(k.startswith(n + ".") for k in keys)}
    assert adapted == set(plan.target_names)
    if all_linear:
        assert set(plan.target_names) == {r.name for r in table if r.name not in dead}
    # eval: the base and the adapted model scored on every task
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    for name in ("base", "adapted"):
        assert metrics[name]["caption"]["coverage"] == 1.0
        assert metrics[name]["vqav2"]["coverage"] == 1.0 and metrics[name]["gqa"]["coverage"] == 1.0
    return {"summary": summary, "table": table, "plan": plan}
