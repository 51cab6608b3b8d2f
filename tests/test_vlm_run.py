"""model.arch: vlm end to end: a Qwen2.5-VL (tiny) run through every stage, `structlora eval` on two families side
by side, the demo serving it; the slow sweep runs every family through the same stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _procs import cpu_env, free_port, run_command
from _vlm_checks import check_run
from PIL import Image

from pipeline.models.families import FAMILIES

QWEN = "qwen2_5_vl"
FAST = ["train.max_steps=6", "train.save_every=3", "train.eval_every=3", "base.max_steps=10", "eval.max_samples=8"]


def _run(tmp, family: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    run = tmp / family
    overrides = [f"model.preset=tiny-{family}", f"publish.registry={tmp / 'registry'}", *FAST, *extra]
    proc = subprocess.run(run_command("smoke_vlm.yaml", run, overrides), env=cpu_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlm")
    proc = _run(tmp, QWEN)
    return tmp, tmp / QWEN, proc


def test_qwen2_5_vl_runs_every_stage(qwen_run):
    _, run, proc = qwen_run
    found = check_run(run, QWEN, all_linear=False)
    notes = " ".join(found["summary"]["adapter_notes"])
    assert "fused qkv" in notes  # [q_proj, v_proj] on Qwen's vision tower: its fused attn.qkv, adapted whole
    assert f"published '{QWEN}'" in proc.stdout


def _save_tiny(family: str, out):
    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig

    model, processor = open_model(ModelConfig(arch="vlm", preset=f"tiny-{family}"), seed=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_structlora_eval_scores_two_families_side_by_side(qwen_run, tmp_path):
    tmp, run, _ = qwen_run
    other = _save_tiny("idefics3", tmp_path / "smolvlm")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", f"qwen={run}", f"smolvlm={other}", "--data", str(run),
           "--tasks", "caption,vqav2,gqa,long_context", "--max-samples", "6", "--long-context-samples", "3",
           "--lengths", "160", "--batch-size", "3", "--out", str(out)]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    assert set(metrics) == {"qwen", "smolvlm"}
    for name in metrics:
        assert metrics[name]["caption"]["num_images"] == 6 and metrics[name]["gqa"]["num_questions"] == 6
    ids = [sorted(r["question_id"] for r in json.loads((out / name / "vqav2_predictions.json").read_text()))
           for name in ("qwen", "smolvlm")]
    assert ids[0] == ids[1] and len(ids[0]) == 6


def _direct(model_dir, image, prompt: str, budget: int) -> str:
    """transformers' own chat-template path: apply_chat_template(tokenize=True) + greedy generate."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data.loading import LOADING  # beside a served demo: one load at a time in the process

    with LOADING:
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**batch, do_sample=False, max_new_tokens=budget)
    return processor.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_the_demo_serves_a_qwen2_5_vl_model_as_transformers_generates(qwen_run, tmp_path):
    from gradio_client import Client, handle_file

    from app.demo import serve
    from data.prompts import CAPTION_PROMPT, question_prompt

    _, run, _ = qwen_run
    model_dir = run / "merge" / "model"
    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(image_path)
    demo, url = serve(model_dir, None, port=free_port(), block=False)
    client = Client(url, verbose=False)
    try:
        caption = client.predict(handle_file(str(image_path)), 12, "greedy", api_name="/caption")
        answer = client.predict(handle_file(str(image_path)), "what colour is it ?", api_name="/answer")
    finally:
        client.close()
        demo.close()
    with Image.open(image_path) as raw:
        image = raw.convert("RGB")
    assert caption == _direct(model_dir, image, CAPTION_PROMPT, 12)
    assert answer == _direct(model_dir, image, question_prompt("what colour is it ?"), 16)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != QWEN])
def test_every_family_runs_every_stage(family, tmp_path):
    """prepare -> base -> train -> eval -> merge -> export -> publish on the family's tiny preset, all linears
    adapted: the tower table against the family's known layout (tests/test_families.py), dead layers out."""
    from test_families import COUNTS, DEAD

    _run(tmp_path, family, ["adapter.targets=[all-linear]"])
    found = check_run(tmp_path / family, family, all_linear=True)
    counts = tuple(sum(r.tower == t for r in found["table"]) for t in ("vision", "connector", "language"))
    assert counts == COUNTS[family]
    dead = [n for n in found["plan"].frozen_modules if n in {r.name for r in found["table"]}]
    assert all(n.startswith(DEAD[family]) for n in dead) and bool(dead) == (family in DEAD)
