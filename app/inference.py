"""Input checks and generation for the demo: plain transformers, nothing of the training code.

`LoadedModel.generate` makes the same processor call and the same greedy ``generate`` call as
the evaluation (``eval.generate.generate_batch`` with a batch of one), with the task wording the model was
trained with (``app.prompting``: benchmark short answers, or your conversations' questions as typed) through
the processor's chat template, and images through ``data.collate.to_rgb``. So the demo shows exactly what the
merged model produces, and a test checks it against a direct ``model.generate``.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import DemoError, InputError
from app.prompting import read_style
from data.chat_template import (
    MissingChatTemplateError,
    add_special_tokens_for,
    chat_prompt,
    ensure_chat_template,
)
from data.collate import to_rgb

Decoding = Literal["greedy", "sampling"]
DECODINGS: tuple[str, ...] = ("greedy", "sampling")
# Sampling settings of the "sampling" switch (greedy is the evaluation's decoding).
SAMPLING_TEMPERATURE = 0.8
SAMPLING_TOP_P = 0.95


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Args:
        max_upload_bytes: largest image file accepted (also Gradio's upload limit).
        max_image_side: largest width or height in pixels, checked from the header before decoding.
        max_question_chars: longest question, checked before tokenizing.
        max_new_tokens: the slider's upper end.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_side: int = 4096
    max_question_chars: int = 1000
    max_new_tokens: int = 256


def load_image(path: str | Path | None, limits: Limits) -> Image.Image:
    """Open and check an uploaded image; RGB, EXIF orientation applied.

    Raises:
        InputError: no file, a file that is too big, not an image, or too many pixels.
    """
    if path is None or str(path) == "":
        raise InputError("Please upload an image first (PNG, JPEG, WebP, GIF or BMP), or pick an example.")
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise InputError(f"The uploaded file {name!r} is missing on the server; please upload it again.")
    size = os.path.getsize(path)
    if size > limits.max_upload_bytes:
        raise InputError(f"{name!r} is {size / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB.")
    try:
        with Image.open(path) as raw:  # reads the header only; decoding waits for the size check
            _check_side(raw.size, name, limits)
            raw.load()
            image = ImageOps.exif_transpose(raw)  # a copy, so it outlives the file
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses it before we can read the size
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        count = f" ({int(pixels.group(1)):,} pixels)" if pixels else ""
        raise InputError(f"{name!r} is far too large{count}; images may be at most {limits.max_image_side} px "
                         "per side. Please downscale it.") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{name!r} is not an image this demo can read: upload a PNG, JPEG, WebP, GIF or BMP "
                         "file.") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{name!r} looks like an image but could not be decoded (truncated or corrupt?).") from err
    return to_rgb(image)


def _check_side(size: tuple[int, int], name: str, limits: Limits) -> None:
    width, height = size
    if max(width, height) > limits.max_image_side:
        raise InputError(f"{name!r} is {width}x{height} pixels; images may be at most {limits.max_image_side} px "
                         "per side. Please downscale it.")
    if min(width, height) < 1:
        raise InputError(f"{name!r} is empty ({width}x{height} pixels).")


def check_question(question: str | None, limits: Limits) -> str:
    """The stripped question; InputError when it is empty or longer than the limit."""
    text = (question or "").strip()
    if not text:
        raise InputError("Please type a question about the image.")
    if len(text) > limits.max_question_chars:
        raise InputError(f"The question is {len(text)} characters long; the limit is {limits.max_question_chars}.")
    return text


def check_max_new_tokens(value: Any, limits: Limits) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"max_new_tokens must be a whole number, got {value!r}.") from err
    if not 1 <= number <= limits.max_new_tokens:
        raise InputError(f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {number}.")
    return number


def check_decoding(value: Any) -> Decoding:
    if value not in DECODINGS:
        raise InputError(f"decoding must be one of {', '.join(DECODINGS)}, got {value!r}.")
    return value


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadedModel:
    """A vision-language model (any AutoModelForImageTextToText family) and its processor, loaded once with plain transformers and kept in memory.

    Args:
        model_dir: local directory or hub id given to ``from_pretrained``.
        device: where to run; default CUDA when available.
        chat_template: a Jinja chat template file for a processor without one (every prompt is rendered
            through the template, as in training; a processor without one is refused before the weights load).
    """

    def __init__(self, model_dir: str | Path, device: torch.device | None = None,
                 chat_template: str | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.source = str(model_dir)
        self.device = device or default_device()
        from data.loading import LOADING  # one load at a time (the demo loads in threads)

        try:
            with LOADING:
                processor = AutoProcessor.from_pretrained(model_dir)
            self.processor = ensure_chat_template(processor, self.source, chat_template)
        except MissingChatTemplateError as err:  # before the weights load: a one-line error at start
            raise DemoError(str(err).replace("model.chat_template=FILE in a run, ", "")) from None
        self.style = read_style(model_dir)  # how it was trained to be asked (app.prompting)
        with LOADING:
            self.model = AutoModelForImageTextToText.from_pretrained(model_dir).to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        # generate() is not meant to run twice at once on one model; the queue already serialises
        # requests, this guards direct callers (tests, benchmarks) too.
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int | None:
        text_config = getattr(self.model.config, "text_config", self.model.config)
        return getattr(text_config, "max_position_embeddings", None)

    def _inputs(self, image: Image.Image, prompt: str, max_new_tokens: int) -> dict[str, torch.Tensor]:
        text = chat_prompt(self.processor, prompt)  # the chat template, as training rendered it
        batch = self.processor(text=[text], images=[to_rgb(image)], return_tensors="pt",
                               add_special_tokens=add_special_tokens_for(self.processor, [text]))
        length = int(batch["input_ids"].shape[1])
        limit = self.context_length
        if limit is not None and length + max_new_tokens > limit:
            room = limit - length
            hint = (f"shorten the question or lower max new tokens to {room}" if room > 0
                    else "shorten the question")
            raise InputError(f"The prompt is {length} tokens (image included) and {max_new_tokens} new tokens were "
                             f"asked for; this model reads at most {limit} tokens: {hint}.")
        return batch.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int, decoding: Decoding = "greedy",
                 seed: int | None = None) -> str:
        """The model's reply to one (image, prompt) pair, stripped. `prompt` is not yet rendered."""
        batch = self._inputs(image, prompt, max_new_tokens)
        options: dict[str, Any] = {"do_sample": False, "num_beams": 1}
        if decoding == "sampling":
            options = {"do_sample": True, "temperature": SAMPLING_TEMPERATURE, "top_p": SAMPLING_TOP_P}
        with self._lock:
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(**batch, use_cache=True, max_new_tokens=max_new_tokens, **options)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    def caption(self, image: Image.Image, max_new_tokens: int, decoding: Decoding = "greedy") -> str:
        return self.generate(image, self.style.caption_text, max_new_tokens, decoding)

    def answer(self, image: Image.Image, question: str, max_new_tokens: int, decoding: Decoding = "greedy") -> str:
        return self.generate(image, self.style.question_text(question), max_new_tokens, decoding)
