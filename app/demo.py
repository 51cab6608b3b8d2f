"""`structlora demo`: a Gradio Blocks app serving a merged model with plain transformers.

Caption an uploaded (or example) image, ask a question about it, compare with the base model
side by side when one is recorded, and read the run's metrics and plots. Named API endpoints,
usable from ``gradio_client``::

    /caption(image, max_new_tokens=64, decoding="greedy") -> str        the served model
    /caption_base(image, max_new_tokens=64, decoding="greedy", compare=True) -> str
    /answer(image, question, max_new_tokens=16, decoding="greedy") -> str
    /answer_base(image, question, max_new_tokens=16, decoding="greedy", compare=True) -> str
    /load_model(name) -> ...                                             registry mode

Safe defaults: binds 127.0.0.1, no share link unless asked, one generation at a time through
a bounded queue, uploads capped in bytes and pixels; a refused request gets a message and the
server keeps serving.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import DemoError, InputError
from app.host import ModelHost
from app.inference import (
    DECODINGS,
    Limits,
    LoadedModel,
    check_decoding,
    check_max_new_tokens,
    check_question,
    load_image,
)
from app.prompting import read_style
from app.registry import load_registry
from app.sources import EXAMPLE_FOLDERS_IN_MODEL, EXAMPLE_FOLDERS_IN_RUN, ModelSource, metrics_rows
from data.prompts import max_new_tokens as default_budget

# An image input as handlers receive it: Gradio's FileData as a dict ({"path", "orig_name", ...}).
ImagePayload = dict[str, Any] | None
METRIC_HEADERS = ["score", "base", "adapted", "adapted - base"]
# Queue settings: requests beyond QUEUE_SIZE waiting are refused with Gradio's "queue is full".
QUEUE_SIZE = 64
GENERATION_CONCURRENCY = 1
# System fonts only: the page must render without reaching a font CDN.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"],
                          font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def uploaded_path(payload: Any) -> str | None:
    """The server-side path of an image payload as Gradio hands it over with ``preprocess=False``.

    Events run without Gradio's preprocessing because gr.Image's opens every upload with PIL,
    so a text file or a 20000x20000 image would fail there with a generic error; the checks are
    `app.inference.load_image`'s, which say what is wrong. Gradio still moves the file into its
    upload cache before the handler runs; the handler then accepts only files inside it.
    """
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise InputError("The image arrived without a file; please upload it as a file (PNG, JPEG, WebP, GIF, BMP).")
    # Gradio checks only payloads that carry meta._type == "gradio.FileData"; a bare {"path": ...}
    # would reach us unchecked, so only files inside Gradio's upload folder are served.
    if not Path(path).resolve().is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
        raise InputError("Images must be uploaded (through the page, or gradio_client.handle_file); "
                         "paths on the server are not accepted.")
    return str(path)


def _guard(fn: Callable[..., str]) -> Callable[..., str]:
    """Refused requests become a visible gr.Error with our message instead of a generic failure."""

    @functools.wraps(fn)  # keeps the signature: Gradio names the API parameters after it
    def wrapped(*args: Any) -> str:
        try:
            return fn(*args)
        except InputError as err:
            raise gr.Error(str(err), title="Request refused", print_exception=False) from err

    return wrapped


class DemoHandlers:
    """The functions behind the buttons and API endpoints; their parameter names are the API's."""

    def __init__(self, host: ModelHost, limits: Limits) -> None:
        self.host, self.limits = host, limits

    def _run(self, which: str, image: ImagePayload, question: str | None, max_new_tokens: Any,
             decoding: Any) -> str:
        picture = load_image(uploaded_path(image), self.limits)
        budget = check_max_new_tokens(max_new_tokens, self.limits)
        mode = check_decoding(decoding)
        text = check_question(question, self.limits) if question is not None else None
        with self.host.lock:
            model = self.host.base() if which == "base" else self.host.adapted()
            if text is None:
                return model.caption(picture, budget, mode)
            return model.answer(picture, text, budget, mode)

    def caption(self, image: ImagePayload, max_new_tokens: int = default_budget("caption"),
                decoding: str = "greedy") -> str:
        """Caption the image with the served (merged) model."""
        return self._run("adapted", image, None, max_new_tokens, decoding)

    def caption_base(self, image: ImagePayload, max_new_tokens: int = default_budget("caption"),
                     decoding: str = "greedy", compare: bool = True) -> str:
        """Caption the image with the base model ('' when the comparison is off or unavailable)."""
        if not compare or not self.host.has_base():
            return ""
        return self._run("base", image, None, max_new_tokens, decoding)

    def answer(self, image: ImagePayload, question: str, max_new_tokens: int = default_budget("vqav2"),
               decoding: str = "greedy") -> str:
        """Answer a question about the image with the served (merged) model."""
        return self._run("adapted", image, question or "", max_new_tokens, decoding)

    def answer_base(self, image: ImagePayload, question: str, max_new_tokens: int = default_budget("vqav2"),
                    decoding: str = "greedy", compare: bool = True) -> str:
        """Answer with the base model ('' when the comparison is off or unavailable)."""
        if not compare or not self.host.has_base():
            return ""
        return self._run("base", image, question or "", max_new_tokens, decoding)

    def pick_example(self, evt: gr.SelectData) -> tuple[str | None, Any]:
        """The example image, and its prompt from the test split in the question box when the run has one."""
        examples = self.host.source.example_images()
        if not (isinstance(evt.index, int) and evt.index < len(examples)):
            return None, gr.update()
        prompt = self.host.source.example_prompts().get(examples[evt.index].name)
        return str(examples[evt.index]), (prompt if prompt else gr.update())


def header_markdown(source: ModelSource) -> str:
    details = [f"model `{source.model_dir}`"]
    if source.info.get("method"):
        details.append(f"method **{source.info['method']}**")
    if source.base_model:
        details.append(f"base `{source.base_model}`")
    return f"# StructLoRA-VLM demo: {source.name}\n" + " · ".join(details)


def model_view(host: ModelHost, limits: Limits = Limits()) -> dict[str, Any]:
    """Values of the model-dependent parts of the page for the served model."""
    source = host.source
    rows = metrics_rows(source.metrics() or source.info.get("metrics"))
    plots = [str(p) for p in source.plots()]
    style = read_style(source.model_dir)  # how the model was trained to be asked (app.prompting)
    return {"header": header_markdown(source), "examples": [str(p) for p in source.example_images()],
            "has_base": host.has_base(), "rows": rows, "plots": plots,
            "has_run": bool(rows or plots), "card": source.model_card() or "_No model card._",
            # the budgets the evaluation used (structlora_inference.json), within the sliders' range
            "caption_budget": min(style.caption_max_new_tokens, limits.max_new_tokens),
            "answer_budget": min(style.answer_max_new_tokens, limits.max_new_tokens)}


def build_demo(host: ModelHost, limits: Limits = Limits()) -> gr.Blocks:
    """The Blocks app for `host` (not launched)."""
    handlers = DemoHandlers(host, limits)
    view = model_view(host, limits)
    # preprocess=False: the handlers check their inputs themselves (see `uploaded_path`)
    queued = {"concurrency_id": "model", "concurrency_limit": GENERATION_CONCURRENCY, "preprocess": False}
    with gr.Blocks(title="StructLoRA-VLM demo", analytics_enabled=False) as demo:
        header = gr.Markdown(view["header"])
        choice = gr.Dropdown(host.names, value=host.source.name, label="Model (from the registry)",
                             visible=len(host.names) > 1, interactive=True)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=300, elem_id="image-input")
                examples = gr.Gallery(view["examples"], label="Examples: click one to use it", columns=6, rows=1,
                                      fit_columns=False, height=120, object_fit="contain", allow_preview=False,
                                      visible=bool(view["examples"]), elem_id="examples")
                decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding",
                                    info="greedy is what the evaluation uses; sampling varies between runs")
                compare = gr.Checkbox(True, label="Also run the base model (side by side)",
                                      visible=view["has_base"])
            with gr.Column(scale=1):
                with gr.Tab("Caption"):
                    caption_budget = gr.Slider(1, limits.max_new_tokens, value=view["caption_budget"], step=1,
                                               label="Max new tokens")
                    caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    with gr.Row():
                        caption_out = gr.Textbox(label="Adapted (merged) model", interactive=False,
                                                 elem_id="caption-output")
                        caption_base = gr.Textbox(label="Base model", interactive=False, visible=view["has_base"],
                                                  elem_id="caption-base-output")
                with gr.Tab("Question"):
                    question = gr.Textbox(label="Question", placeholder="what colour is the circle?",
                                          max_lines=3, elem_id="question-input")
                    answer_budget = gr.Slider(1, limits.max_new_tokens, value=view["answer_budget"], step=1,
                                              label="Max new tokens")
                    answer_button = gr.Button("Answer", variant="primary", elem_id="answer-button")
                    with gr.Row():
                        answer_out = gr.Textbox(label="Adapted (merged) model", interactive=False,
                                                elem_id="answer-output")
                        answer_base = gr.Textbox(label="Base model", interactive=False, visible=view["has_base"],
                                                 elem_id="answer-base-output")
        with gr.Accordion("Run metrics and plots", open=True, visible=view["has_run"]) as run_panel:
            table = gr.Dataframe(value=view["rows"] or None, headers=METRIC_HEADERS, interactive=False,
                                 label="Test-split scores (RUN/eval/metrics.json)")
            plots = gr.Gallery(view["plots"], label="Plots (RUN/eval)", columns=2, height="auto")
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown(view["card"])

        caption_button.click(_guard(handlers.caption), [image, caption_budget, decoding], caption_out,
                             api_name="caption", **queued).success(
            _guard(handlers.caption_base), [image, caption_budget, decoding, compare], caption_base,
            api_name="caption_base", **queued)
        answer_event = dict(fn=_guard(handlers.answer), inputs=[image, question, answer_budget, decoding],
                            outputs=answer_out, **queued)
        answer_button.click(**answer_event, api_name="answer").success(
            _guard(handlers.answer_base), [image, question, answer_budget, decoding, compare], answer_base,
            api_name="answer_base", **queued)
        question.submit(**answer_event, api_visibility="private")
        examples.select(handlers.pick_example, None, [image, question], api_visibility="private")

        def load_model(name: str) -> str:
            """Serve another registry model (the previous one is freed first); returns the new header."""
            try:
                host.select(name)
            except InputError as err:
                raise gr.Error(str(err), print_exception=False) from err
            return header_markdown(host.source)

        def refresh() -> tuple[Any, ...]:
            v = model_view(host, limits)
            return (gr.update(value=v["examples"], visible=bool(v["examples"])), gr.update(visible=v["has_base"]),
                    gr.update(value="", visible=v["has_base"]), gr.update(value="", visible=v["has_base"]), "", "",
                    gr.update(visible=v["has_run"]), gr.update(value=v["rows"] or None), v["plots"], v["card"],
                    v["caption_budget"], v["answer_budget"])

        choice.change(load_model, choice, header, api_name="load_model", **queued).success(
            refresh, None, [examples, compare, caption_base, answer_base, caption_out, answer_out, run_panel, table,
                            plots, card, caption_budget, answer_budget], api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=GENERATION_CONCURRENCY)
    return demo


def sources_from(model_dir: Path | None, registry: Path | None) -> list[ModelSource]:
    """The models to offer: MODEL_DIR first (when given), then every loadable registry entry."""
    sources = [ModelSource.from_model_dir(model_dir)] if model_dir is not None else []
    if registry is not None:
        if not Path(registry).is_dir():
            raise DemoError(f"{registry}: registry folder not found (the publish stage creates it)")
        for entry in load_registry(registry):
            try:
                source = ModelSource.from_registry_entry(entry, registry)
            except DemoError as err:
                print(f"warning: skipping registry entry {entry['name']!r}: {err}", file=sys.stderr)
                continue
            if source.name not in {s.name for s in sources}:
                sources.append(source)
    if not sources:
        raise DemoError(f"{registry}: no loadable model in the registry (run the publish stage first)")
    return sources


def allowed_paths(sources: list[ModelSource]) -> list[str]:
    """Folders whose files the page may show: example images and evaluation plots, nothing else."""
    folders = []
    for s in sources:
        folders += [s.model_dir / f for f in EXAMPLE_FOLDERS_IN_MODEL]
        if s.run_dir is not None:
            folders += [s.run_dir / f for f in EXAMPLE_FOLDERS_IN_RUN] + [s.run_dir / "eval"]
    return sorted({str(f.resolve()) for f in folders if f.is_dir()})


def serve(model_dir: Path | None, registry: Path | None, host: str = "127.0.0.1", port: int | None = 7860,
          share: bool = False, limits: Limits = Limits(), block: bool = True,
          model_host: ModelHost | None = None, chat_template: str | None = None) -> tuple[gr.Blocks, str]:
    """Build and start the app; returns (demo, local URL). With ``block=False`` it runs in a thread.
    `chat_template`: a Jinja file for models whose processor has none (every prompt goes through one)."""
    if model_host is None:
        sources = sources_from(model_dir, registry)
        model_host = ModelHost(sources, loader=functools.partial(LoadedModel, chat_template=chat_template))
    demo = build_demo(model_host, limits)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                            max_file_size=limits.max_upload_bytes, allowed_paths=allowed_paths(
                                list(model_host.sources.values())),
                            footer_links=["api"], ssr_mode=False, mcp_server=False, quiet=not block, theme=THEME)
    return demo, url


def launch(model_dir: Path | None, registry: Path | None, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, chat_template: str | None = None) -> None:
    """`structlora demo MODEL_DIR | --registry DIR [--chat-template FILE]`: serve until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host}: the demo is reachable from other machines", file=sys.stderr)
    serve(model_dir, registry, host=host, port=port, share=share, block=True, chat_template=chat_template)
