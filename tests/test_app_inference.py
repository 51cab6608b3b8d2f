"""Input checks, generation parity with plain transformers, and the model host (in process, no server)."""

from __future__ import annotations

import json

import pytest
from _app_tiny import direct_generate, make_run, shape_image
from PIL import Image

from app.errors import InputError
from app.host import ModelHost
from app.inference import (
    Limits,
    LoadedModel,
    check_decoding,
    check_max_new_tokens,
    check_question,
    load_image,
)
from app.sources import ModelSource
from data.prompts import CAPTION_PROMPT, question_prompt

LIMITS = Limits()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_run(run)
    return run


@pytest.fixture(scope="module")
def loaded(run):
    return LoadedModel(run / "merge" / "model")


def test_load_image_accepts_common_modes(tmp_path):
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    image = load_image(tmp_path / "t.png", LIMITS)
    assert image.mode == "RGB" and image.size == (10, 8)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white, as in training
    Image.new("L", (5, 5), 7).save(tmp_path / "g.jpg")
    assert load_image(tmp_path / "g.jpg", LIMITS).mode == "RGB"


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("just some text"), "'bad' is not an image this demo can read"),
    (lambda p: Image.new("1", (20000, 20000)).save(p, format="PNG"), r"far too large \(400,000,000 pixels\)"),
    (lambda p: Image.new("L", (5000, 40)).save(p, format="PNG"), "5000x40 pixels; images may be at most 4096 px"),
    (lambda p: p.write_bytes(_png_bytes()[:60]), "could not be decoded"),
    (lambda p: p.write_bytes(b"\0" * (LIMITS.max_upload_bytes + 1)), "the limit is 20 MB"),
])
def test_load_image_refuses_with_a_clear_message(tmp_path, make, match):
    path = tmp_path / "bad"
    make(path)
    with pytest.raises(InputError, match=match):
        load_image(path, LIMITS)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_without_a_file():
    with pytest.raises(InputError, match="upload an image first"):
        load_image(None, LIMITS)


def test_request_checks():
    assert check_question("  what colour?  ", LIMITS) == "what colour?"
    with pytest.raises(InputError, match="type a question"):
        check_question(" \n ", LIMITS)
    with pytest.raises(InputError, match="1001 characters long; the limit is 1000"):
        check_question("x" * 1001, LIMITS)
    assert check_max_new_tokens(16.0, LIMITS) == 16
    for bad in (0, 257, "many"):
        with pytest.raises(InputError, match="max_new_tokens"):
            check_max_new_tokens(bad, LIMITS)
    with pytest.raises(InputError, match="greedy, sampling"):
        check_decoding("beam")


def test_generation_equals_plain_transformers(run, loaded, tmp_path):
    model_dir = run / "merge" / "model"
    path = shape_image(tmp_path / "red.png", "red")
    image = load_image(path, LIMITS)
    caption = loaded.caption(image, 12)
    answer = loaded.answer(image, "what colour is the circle ?", 6)
    assert caption and answer
    assert caption == direct_generate(model_dir, path, CAPTION_PROMPT, 12)
    assert answer == direct_generate(model_dir, path, question_prompt("what colour is the circle ?"), 6)
    sampled = loaded.generate(image, CAPTION_PROMPT, 12, "sampling", seed=0)
    assert sampled == loaded.generate(image, CAPTION_PROMPT, 12, "sampling", seed=0)


def test_prompt_longer_than_the_context_is_refused(loaded, tmp_path):
    image = load_image(shape_image(tmp_path / "r.png"), LIMITS)
    with pytest.raises(InputError, match=r"reads at most 512 tokens: shorten the question or lower max new tokens"):
        loaded.answer(image, "what " * 190, 256)


class _FakeModel:
    def __init__(self, source):
        if "broken" in str(source):
            raise OSError("no such model")
        self.source = str(source)


def _source(tmp_path, name: str, base: str | None = None) -> ModelSource:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    if base:
        (d / "structlora_run.json").write_text(json.dumps({"base_model": base}))
    return ModelSource.from_model_dir(d)


def test_host_loads_one_model_at_a_time_and_base_on_demand(tmp_path):
    loads = []

    def loader(source):
        loads.append(str(source))
        return _FakeModel(source)

    host = ModelHost([_source(tmp_path, "a", base="hub/base-a"), _source(tmp_path, "b", base="hub/broken")], loader)
    assert host.names == ["a", "b"] and host.source.name == "a" and len(loads) == 1
    assert host.base().source == "hub/base-a" and host.base().source == "hub/base-a"
    assert loads == [str(tmp_path / "a"), "hub/base-a"]  # the base is loaded once, when first asked for
    host.select("b")
    assert host.adapted().source == str(tmp_path / "b")
    for _ in range(2):  # a broken base is reported, not retried on every request
        with pytest.raises(InputError, match="'hub/broken' could not be loaded: no such model"):
            host.base()
    assert loads.count("hub/broken") == 1
    host.select("b")
    assert len(loads) == 4  # selecting the served model again loads nothing
    with pytest.raises(InputError, match="choose one of: a, b"):
        host.select("c")


def test_host_without_base(tmp_path):
    host = ModelHost([_source(tmp_path, "a")], _FakeModel)
    assert not host.has_base()
    with pytest.raises(InputError, match="No base model is recorded"):
        host.base()
