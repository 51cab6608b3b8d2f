"""The demo served over HTTP and driven through gradio_client's named endpoints."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from _app_tiny import direct_generate, make_run, shape_image
from PIL import Image

from app.registry import register_model
from data.prompts import CAPTION_PROMPT, question_prompt

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

QUESTION = "what colour is the circle ?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with two models (the run's merged model first, then its base), served in a thread."""
    from app.demo import serve

    root = tmp_path_factory.mktemp("served")
    model_dir = make_run(root / "run")
    registry = root / "registry"
    register_model(registry, {"name": "tiny-structlora", "path": str(model_dir), "task": "caption"})
    register_model(registry, {"name": "tiny-base", "path": str(root / "run" / "base" / "model"), "task": "caption"})
    demo, url = serve(None, registry, port=free_port(), block=False)
    client = Client(url, verbose=False)
    yield {"demo": demo, "url": url, "client": client, "model": model_dir, "base": root / "run" / "base" / "model",
           "image": shape_image(root / "red.png", "red"), "root": root}
    client.close()
    demo.close()


def test_binds_loopback_without_share_link(served):
    assert served["url"].startswith("http://127.0.0.1:")
    assert served["demo"].share_url is None


def test_caption_and_answer_equal_direct_generation(served):
    client, image = served["client"], served["image"]
    caption = client.predict(handle_file(str(image)), 12, "greedy", api_name="/caption")
    answer = client.predict(handle_file(str(image)), QUESTION, api_name="/answer")  # default budget: 16
    assert caption and answer
    assert caption == direct_generate(served["model"], image, CAPTION_PROMPT, 12)
    assert answer == direct_generate(served["model"], image, question_prompt(QUESTION), 16)


def test_base_model_side_by_side(served):
    client, image = served["client"], served["image"]
    base = client.predict(handle_file(str(image)), 12, "greedy", True, api_name="/caption_base")
    assert base == direct_generate(served["base"], image, CAPTION_PROMPT, 12)
    assert client.predict(handle_file(str(image)), 12, "greedy", False, api_name="/caption_base") == ""
    base_answer = client.predict(handle_file(str(image)), QUESTION, 8, "greedy", True, api_name="/answer_base")
    assert base_answer == direct_generate(served["base"], image, question_prompt(QUESTION), 8)


def test_sampling_switch_gives_text(served):
    text = served["client"].predict(handle_file(str(served["image"])), 8, "sampling", api_name="/caption")
    assert isinstance(text, str)


def test_bad_inputs_get_clear_messages_and_the_server_keeps_serving(served, tmp_path):
    client, image = served["client"], served["image"]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # ~50 kB on disk, 400 Mpx decoded
    cases = [
        ((handle_file(str(text_file)),), "/caption", "'notes.txt' is not an image this demo can read"),
        ((handle_file(str(huge)),), "/caption", "'huge.png' is far too large"),
        ((handle_file(str(image)), "   "), "/answer", "Please type a question about the image"),
        ((handle_file(str(image)), "what " * 190, 256), "/answer", "this model reads at most 512 tokens"),
        ((handle_file(str(image)), "x" * 1200), "/answer", "the limit is 1000"),
        ((None,), "/caption", "Please upload an image first"),
    ]
    for args, endpoint, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name=endpoint)
    assert client.predict(handle_file(str(image)), 4, api_name="/caption")


def test_server_paths_are_not_accepted_as_images(served):
    """A bare {"path": ...} skips Gradio's upload-folder check; the demo must refuse it itself."""
    url = served["url"] + "gradio_api/call/caption"
    event = httpx.post(url, json={"data": [{"path": str(served["image"])}, 4, "greedy"]}, timeout=30).json()
    stream = httpx.get(f"{url}/{event['event_id']}", timeout=60).text
    assert "event: error" in stream and "paths on the server are not accepted" in stream


def test_upload_over_the_size_limit_is_refused(served, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (20 * 1024 * 1024))
    with open(big, "rb") as handle:
        response = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("big.png", handle)}, timeout=60)
    assert response.status_code == 413, response.text
    assert "size" in response.text.lower()
    assert served["client"].predict(handle_file(str(served["image"])), 4, api_name="/caption")


def test_twenty_concurrent_requests_queue_and_all_finish(served):
    client, image = served["client"], served["image"]
    expected = direct_generate(served["model"], image, question_prompt(QUESTION), 8)
    jobs = [client.submit(handle_file(str(image)), QUESTION, 8, "greedy", api_name="/answer") for _ in range(20)]
    assert [job.result(timeout=120) for job in jobs] == [expected] * 20
    assert client.predict(handle_file(str(image)), 4, api_name="/caption")


def test_page_carries_metrics_and_plots(served):
    config = httpx.get(served["url"] + "config", timeout=30).json()
    text = str(config)
    assert "caption.metrics.CIDEr" in text and "vqav2.overall" in text
    assert "long_context_cider.png" in text and "adjacent_cosine.png" in text
    assert "/caption" in text or "caption" in {d.get("api_name") for d in config["dependencies"]}


def test_registry_dropdown_switches_models(served):
    client, image = served["client"], served["image"]
    try:
        header = client.predict("tiny-base", api_name="/load_model")
        assert "tiny-base" in header
        caption = client.predict(handle_file(str(image)), 12, api_name="/caption")
        assert caption == direct_generate(served["base"], image, CAPTION_PROMPT, 12)
        assert client.predict(handle_file(str(image)), 12, api_name="/caption_base") == ""  # no base recorded
    finally:
        assert "tiny-structlora" in client.predict("tiny-structlora", api_name="/load_model")
    assert client.predict(handle_file(str(image)), 12, api_name="/caption") == \
        direct_generate(served["model"], image, CAPTION_PROMPT, 12)


def test_cli_demo_calls_launch_with_its_contract(monkeypatch, tmp_path):
    import app.demo
    from pipeline.cli import main

    calls = []
    monkeypatch.setattr(app.demo, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["demo", str(tmp_path / "m"), "--port", "7999"]) == 0
    (model_dir, registry), kwargs = calls[0]
    assert model_dir == Path(tmp_path / "m") and registry is None
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 7999 and kwargs["share"] is False
