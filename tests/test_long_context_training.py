"""Long-context training examples (data.long_context): filler from the training stream only, lengths on target,
nothing cut inside the image or the answer, deterministic and resumable streams."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from data.chat_collate import ChatCollator
from data.chat_template import IGNORE_INDEX
from data.examples import collate_with_stats
from data.long_context import LongContextMaker, fill_to, filler_text
from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from pipeline.models.families import FAMILIES
from pipeline.models.presets.tiny import build_tiny_llava
from pipeline.schema_model import ModelConfig

COLOURS = "red blue green yellow purple orange".split()
SHAPES = "circle square triangle star".split()
WORDS = COLOURS + SHAPES + "a an small large left right of the and there is are two one".split()


@pytest.fixture(scope="module")
def processor():
    _, proc = build_tiny_llava(ModelConfig(preset="tiny").tiny, WORDS, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
    return proc


def _stream(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    combos = [(c, s) for c in COLOURS for s in SHAPES]  # 24 images, each its own captions
    random.Random(seed).shuffle(combos)
    out = []
    for k in range(n):
        colour, shape = combos[k % len(combos)]
        out.append({"task": "caption", "image_id": offset + k, "image": Image.new("RGB", (64, 64), (k, 20, 40)),
                    "captions": [f"a {colour} {shape}", f"there is a small {colour} {shape} on the left"]})
    return out


def _maker(share=1.0, lo=100, hi=150, seed=3, per="example"):
    return LongContextMaker(share=share, min_tokens=lo, max_tokens=hi, pool_size=64, seed=seed, per=per)


def _rows(processor, samples, maker, max_length=200, batch=4):
    collate = ChatCollator(processor, max_length=max_length, seed=1, long_context=maker)
    out = []
    for start in range(0, len(samples), batch):
        out.append(collate(samples[start:start + batch]))
    return collate, out


def test_fill_to_lands_on_the_target_and_fails_below_the_bare_prompt():
    measure = lambda text: len(text.split())  # noqa: E731 - one token per word
    pool = ["a red circle", "two blue squares on the left", "a star"]
    for target in (10, 17, 30, 41):
        text, tokens, _ = fill_to(measure, pool, target)
        assert tokens == target and text.endswith(CAPTION_PROMPT)
    with pytest.raises(ValueError, match="more than the target"):
        fill_to(measure, pool, 3)
    assert filler_text(["x", "y"], "z", "go") == "x\ny\nz\ngo"


def test_filler_comes_from_earlier_training_examples_never_the_own_image(processor):
    """Every filler line is a caption (the last one possibly cut after some words) of an example the stream
    passed before, never one of the example's own image: filler is always the training split's."""
    train = _stream(24)
    maker = _maker()
    made: list[tuple[dict, str]] = []
    original = maker.prompt

    def recording(sample, *args):
        text = original(sample, *args)
        if text is not None:
            made.append((sample, text))
        return text

    maker.prompt = recording
    _rows(processor, train, maker)
    assert len(made) == maker.made > 5 and maker.no_pool >= 1  # the first example has nothing earlier to use
    for sample, text in made:
        lines = text.split("\n")
        assert lines[-1] == CAPTION_PROMPT and len(lines) >= 3
        earlier = train[:train.index(sample)]
        pool = {c for s in earlier if s["image_id"] != sample["image_id"] for c in s["captions"]}
        *whole, last = lines[:-1]
        assert all(line in pool for line in whole), (whole, pool)
        assert any(c.split()[:len(last.split())] == last.split() for c in pool)
        assert not set(lines) & set(sample["captions"])


def test_rows_land_on_their_targets_and_keep_the_image_and_answer_whole(processor):
    maker = _maker(lo=120, hi=180)
    collate, batches = _rows(processor, _stream(32), maker, max_length=200)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_image = collate.image_tokens()
    lengths = []
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            assert n <= 200 and int((ids == image_id).sum()) == per_image
            answer = ids[labels != IGNORE_INDEX]
            assert int(answer[-1]) == processor.tokenizer.eos_token_id and len(answer) >= 3
            lengths.append(n)
    long_rows = [n for n in lengths if n >= 110]
    assert len(long_rows) == maker.made and all(115 <= n <= 180 for n in long_rows)


def _family_ids(family):
    return f"long_context-{family}"


@pytest.mark.parametrize("family", FAMILIES, ids=_family_ids)
def test_long_context_rows_land_on_their_targets_for_every_family(family):
    """The feature on every family: long-context rows through each family's own processor and chat template land
    within [min, max] tokens as that processor counts them (images expanded), the answer and its end-of-turn marker
    labelled whole, the filler never in the labels."""
    from pipeline.models.presets.processors import tiny_processor

    processor = tiny_processor(family)
    maker = _maker(lo=120, hi=180)
    collate = ChatCollator(processor, max_length=200, seed=1, long_context=maker)
    samples = [dict(s, image=Image.new("RGB", (16, 16), (s["image_id"], 20, 40))) for s in _stream(24)]
    lengths, answers = [], set()
    for start in range(0, len(samples), 4):
        batch = collate(samples[start:start + 4])
        for mask, ids, labels in zip(batch["attention_mask"], batch["input_ids"], batch["labels"]):
            lengths.append(int(mask.sum()))
            answers.add(processor.tokenizer.decode(ids[labels != IGNORE_INDEX]).strip())
    # the first example has no earlier caption to fill with (short); every later one lands in [min, max]
    assert maker.no_pool == 1 and maker.made == len(lengths) - 1, lengths
    assert lengths[0] < 120 and all(115 <= n <= 180 for n in lengths[1:]), lengths
    assert all(a.split()[0] in ("a", "there") for a in answers)  # a caption, not filler


def test_the_stream_is_deterministic_and_share_zero_changes_nothing(processor):
    a = _rows(processor, _stream(16), _maker(share=0.5))[1]
    b = _rows(processor, _stream(16), _maker(share=0.5))[1]
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    plain = _rows(processor, _stream(16), None)[1]
    off = _rows(processor, _stream(16), _maker(share=0.0))[1]
    for x, y in zip(plain, off):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_per_batch_makes_whole_batches_long_at_one_length(processor):
    """per="batch" (the default's): a batch is long or short as a whole, its long rows within a few tokens of one
    another (one drawn target; captions' bare prompts differ by a token or two), the share of long batches near
    `share`, and the draws repeat."""
    maker = _maker(share=0.5, lo=110, hi=190, per="batch")
    collate, batches = _rows(processor, _stream(96), maker, max_length=200, batch=4)
    long_batches, targets = 0, set()
    for batch in batches[1:]:  # the first batch has no earlier captions to fill with
        lengths = batch["attention_mask"].sum(1).tolist()
        long = [n for n in lengths if n >= 105]
        assert len(long) in (0, len(lengths)), lengths
        if long:
            long_batches += 1
            assert max(long) - min(long) <= 4, long
            targets.add(min(long) // 10)
    assert 6 <= long_batches <= 17 and len(targets) >= 3  # 23 batches at share 0.5; lengths spread over [110, 190]
    assert maker.made == 4 * long_batches
    again = _rows(processor, _stream(96), _maker(share=0.5, lo=110, hi=190, per="batch"), max_length=200)[1]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    with pytest.raises(ValueError, match="per must be"):
        LongContextMaker(share=0.5, per="row")


def test_the_counts_reach_the_batch_as_made_not_as_lost(processor):
    collate = ChatCollator(processor, max_length=200, seed=1, long_context=_maker())
    wrapped = collate_with_stats(collate)
    made = 0
    stream = _stream(12)
    for start in range(0, 12, 4):
        batch = wrapped([{**s, "__stream__": "caption", "__skipped__": {}} for s in stream[start:start + 4]])
        made += batch["__made__"]["long_context_examples"]
        assert not any(batch["__dropped__"].values())
    assert made == collate.long_context.made > 0


def test_the_config_refuses_what_it_cannot_build():
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    with pytest.raises(ValueError, match="share"):
        from_dict(RunConfig, {"model": {"preset": "tiny"}, "data": {"long_context": {"share": 1.5}}})
    with pytest.raises(ValueError, match="not model.arch=vit"):
        from_dict(RunConfig, {"model": {"arch": "vit", "preset": "tiny"}, "data": {"long_context": {"share": 0.5}}})
    # every VLM family takes it (the one collator)
    from_dict(RunConfig, {"model": {"arch": "vlm", "preset": "tiny-qwen2_5_vl"}, "data": {"long_context": {"share": 0.5}}})


@pytest.mark.slow
def test_a_killed_run_with_long_contexts_resumes_to_the_uninterrupted_result(tmp_path):
    """The option on, a train stage SIGKILLed after two checkpoints and resumed ends where an uninterrupted one does
    (the stream is replayed through fresh collators: the same long-context examples come out)."""
    import json
    import shutil
    import subprocess

    from _procs import cpu_env, kill_train_after_checkpoints, prepare_only, run_command
    from safetensors.torch import load_file

    sets = ["data.long_context.share=0.5", "data.long_context.min_tokens=100", "train.max_steps=24",
            "train.save_every=6", "train.keep_last=4", "base.enabled=false", "data.questions=single"]
    prepared = prepare_only(tmp_path / "prepared", sets)
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(prepared, runs[name])
    command = {name: run_command("smoke.yaml", run, sets, "--stages", "train") for name, run in runs.items()}
    subprocess.run(command["reference"], check=True, env=cpu_env(), capture_output=True, timeout=600)
    kill_train_after_checkpoints(command["killed"], runs["killed"], timeout=300)
    subprocess.run(command["killed"], check=True, env=cpu_env(), capture_output=True, timeout=600)
    summaries = {n: json.loads((r / "train" / "final" / "summary.json").read_text()) for n, r in runs.items()}
    assert summaries["killed"]["resumed_from"] is not None
    made = summaries["reference"]["data"]["train"]["made"]["long_context_examples"]
    assert made > 0 and made == summaries["killed"]["data"]["train"]["made"]["long_context_examples"]
    assert summaries["reference"]["data"]["val"]["made"]["long_context_examples"] == 0  # validation stays as it was
    expected, got = (load_file(str(r / "train" / "final" / "trainable.safetensors")) for r in runs.values())
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) < 1e-6


def test_the_report_says_how_many_long_context_examples_were_built():
    from data.accounting import TrainAccount
    from eval.report import data_section

    account = TrainAccount("train", [])
    account.record(0, {"input_ids": 1, "__made__": {"long_context_examples": 7, "long_context_no_pool": 1}})
    account.record(1, {"input_ids": 1, "__made__": {"long_context_examples": 5, "long_context_no_pool": 0}})
    summary = account.as_dict()
    assert summary["made"] == {"long_context_examples": 12, "long_context_no_pool": 1}
    assert not summary["lost_anything"]
    text = "\n".join(data_section({"train": {"train": summary}}))
    assert "12 long-context training examples built" in text and "1 drawn before the filler" in text


def test_the_shipped_neutral_filler_is_the_worlds_words_and_describes_no_scene():
    from data.long_context import neutral_filler, shapes_neutral_lines
    from data.shapes import world_vocabulary
    from data.shapes_scene import COLOURS, SHAPES

    lines = neutral_filler()
    assert lines == shapes_neutral_lines() and len(lines) == 200  # the file is what the function writes
    words = {w.strip(".") for line in lines for w in line.split()}
    assert words <= set(world_vocabulary())
    scene = {*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), "crosses", "one", "two", "three", "four", "gray"}
    assert not words & scene


def test_eval_distractor_neutral_uses_the_shipped_file(tmp_path):
    from data.long_context import neutral_filler
    from pipeline.eval_command import filler_texts

    pool, description = filler_texts("neutral", tmp_path, [], "test", lambda: [])
    assert pool == neutral_filler() and "neutral" in description
