"""The door: one function loads any backbone, for any purpose, and checks it once, at start.

`open_model(cfg, ...)` -> (model, processor):
- `cfg.preset`: built from config, no network: `tiny` (the embedded default's LLaVA-1.5 with the shapes world's
  vocabulary), `llava15-7b-skeleton` (LLaVA-1.5-7B's widths, few layers), `tiny-<family>` (that family's tiny
  model and its own processor class);
- `cfg.name_or_path` (or `source=`, e.g. a run's base model): `AutoModelForImageTextToText` + `AutoProcessor`
  (LLaVA-1.5 loads as `LlavaForConditionalGeneration` through it, like every other family), optionally with the
  language model quantized (`cfg.quantization`, pipeline.models.quantize; a checkpoint saved quantized loads as saved);
- `cfg.arch: vit`: the image classifier path (`pipeline.models.vit`, `pipeline.stages.common.load_vit_base`), the one other path.

Every check happens here, once (`check_backbone`), with one-line errors: the family is known to the tower table,
the processor has a chat template (`model.chat_template: FILE` supplies one; a LLaVA processor saved without one
gets LLaVA-1.5's conversation template, `LLAVA15_CHAT_TEMPLATE`), the configured vision feature layer is the
model's, the image fit can be honoured, `model.processor_kwargs` reach the processor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.chat_template import LLAVA15_CHAT_TEMPLATE
from pipeline.errors import UserError
from pipeline.models.hub import DTYPES, LOADING
from pipeline.schema_model import ModelConfig

log = logging.getLogger("structlora.models")
TINY_PREFIX = "tiny-"
__all__ = ["LLAVA15_CHAT_TEMPLATE", "open_model", "check_backbone", "family_of"]


def preset_family(preset: str | None) -> str | None:
    """'qwen2_5_vl' for 'tiny-qwen2_5_vl'; 'llava' for the LLaVA presets; None without a preset."""
    if preset is None:
        return None
    return preset[len(TINY_PREFIX):] if preset.startswith(TINY_PREFIX) else "llava"


def family_of(model: nn.Module) -> str:
    """The family of a loaded VLM (its config's model_type), or a one-line error when the tower table does not
    know it."""
    from pipeline.models.families import FAMILIES

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in FAMILIES:
        return kind
    try:  # a family outside the tested table may still have towers transformers' getters find
        from pipeline.models.families import tower_paths

        tower_paths(model)
    except Exception as err:  # noqa: BLE001 - any failure: the towers cannot be found
        raise UserError(f"{type(model).__name__} (model_type {kind!r}): not a VLM family the tower table knows "
                        f"({', '.join(FAMILIES)}) and its towers cannot be found ({err})") from None
    log.warning("%s: model_type %r is outside the tested families; towers found by transformers' getters",
                type(model).__name__, kind)
    return str(kind)


def _tokenizer_ids(model: nn.Module, processor: Any, override: bool) -> None:
    """pad / eos / bos of the generation config from the tokenizer: all of them for a model built here
    (`override`), only the missing ones for a checkpoint (its own generation config wins)."""
    tok, config = processor.tokenizer, model.generation_config
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(tok, key, None) is not None and (override or getattr(config, key, None) is None):
            setattr(config, key, getattr(tok, key))


def _generation_ids(model: nn.Module, processor: Any) -> None:
    """pad / bos / eos for generation where the checkpoint has none, and generation stopping at the end-of-turn
    token the chat template ends every reply with (the one training labels: Llama-3's <|eot_id|> is not its
    tokenizer's eos <|end_of_text|>), added to the eos ids."""
    from data.chat_template import end_of_turn_ids

    _tokenizer_ids(model, processor, override=False)
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    ends = end_of_turn_ids(processor)
    if ends and ends[0] not in eos:  # the first token after the reply ends it
        config.eos_token_id = [*eos, ends[0]] if eos else ends[0]
    if not ends:
        log.warning("the chat template writes no special token after a reply: a model trained through it does not "
                    "learn where to stop; give one with model.chat_template")


def _world_texts() -> tuple[list[str], list[str]]:
    """(vocabulary, extra texts) of the tiny tokenizer: the shapes world's words and the task prompts."""
    from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
    from data.shapes import world_vocabulary

    return world_vocabulary(), [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT]


def build_preset(cfg: ModelConfig, seed: int = 0):
    """(model, processor) of a preset, random weights from `seed`, built with no network."""
    layer = -2 if cfg.vision_feature_layer is None else cfg.vision_feature_layer
    if cfg.preset == "tiny":
        from pipeline.models.presets.tiny import build_tiny_llava

        model, processor = build_tiny_llava(cfg.tiny, *_world_texts(), vision_feature_layer=layer, seed=seed)
    elif cfg.preset == "llava15-7b-skeleton":
        from pipeline.models.presets.skeletons import build_skeleton_llava

        model, processor = build_skeleton_llava(cfg.skeleton.vision_layers, cfg.skeleton.text_layers,
                                                *_world_texts(), vision_feature_layer=layer, seed=seed)
    else:
        from pipeline.models.presets.processors import tiny_processor
        from pipeline.models.presets.tiny import build_tiny

        family = preset_family(cfg.preset)
        with torch.random.fork_rng(devices=[]):
            model = build_tiny(family, seed=seed)
        processor = tiny_processor(family)
        _tokenizer_ids(model, processor, override=True)  # a model built here: its tokenizer's ids
    for key, value in dict(cfg.processor_kwargs).items():  # a loaded processor gets them from from_pretrained
        setattr(processor.image_processor if hasattr(processor.image_processor, key) else processor, key, value)
    return model.to(DTYPES[cfg.dtype]), processor


def load_pretrained(source: str, cfg: ModelConfig, compute_dtype: torch.dtype | None = None, name: str | None = None,
                    as_saved: bool = False, option: str = "model.quantization", dtype: torch.dtype | str | None = None):
    """(model, processor) of a hub id or local directory through `AutoModelForImageTextToText`, quantized as
    `cfg.quantization` says; `as_saved`: a checkpoint saved quantized loads as saved without being asked
    (`structlora eval`, the demo's rule)."""
    with LOADING:  # one load at a time in the process (data.loading says why)
        return _load_pretrained(source, cfg, compute_dtype, name, as_saved, option, dtype)


def _load_pretrained(source: str, cfg: ModelConfig, compute_dtype: torch.dtype | None, name: str | None,
                     as_saved: bool, option: str, dtype: torch.dtype | str | None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.models.hub import resolve_pretrained
    from pipeline.models.quantize import check_saved, load_quantized, saved_kind

    name = name or source
    dtype = DTYPES[cfg.dtype] if dtype is None else dtype
    where = resolve_pretrained(source, cfg.revision)
    quantization = cfg.quantization if cfg.quantization != "none" else None
    try:
        if quantization is None and as_saved:
            quantization = saved_kind(where, cfg.revision, name)
        if quantization is None:
            check_saved(where, "none", cfg.revision, name, option)
            model = AutoModelForImageTextToText.from_pretrained(where, revision=cfg.revision, dtype=dtype)
        else:
            model = load_quantized(AutoModelForImageTextToText, where, quantization,
                                   compute_dtype or DTYPES[cfg.dtype], cfg.double_quant, cfg.revision, name=name,
                                   option=option)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):  # e.g. a quantizer's own error: as it is
            raise
        raise UserError(f"{name}: not an image-text-to-text model transformers can load "
                        f"({str(err).splitlines()[0]})") from None
    processor = AutoProcessor.from_pretrained(where, revision=cfg.revision, **dict(cfg.processor_kwargs))
    return model, processor


def _chat_template(processor: Any, cfg: ModelConfig, name: str) -> None:
    from data.chat_template import MissingChatTemplateError, ensure_chat_template

    try:
        ensure_chat_template(processor, name, cfg.chat_template)
    except MissingChatTemplateError as err:
        raise UserError(str(err).replace("chat template ", "model.chat_template: ", 1)
                        if cfg.chat_template else str(err)) from None


def check_processor(source: str, revision: str | None = None, chat_template: str | None = None) -> None:
    """The processor-only part of the door's checks, before any weights load (`structlora eval`'s start)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, revision=revision)
    _chat_template(processor, ModelConfig(arch="vlm", name_or_path=source, chat_template=chat_template), source)


def _vision_feature_layer(model: nn.Module, cfg: ModelConfig, name: str) -> None:
    if cfg.vision_feature_layer is None:
        return
    config = getattr(model, "config", None)
    has = getattr(config, "vision_feature_layer", None)
    if has is None:
        raise UserError(f"model.vision_feature_layer={cfg.vision_feature_layer}, but {name} "
                        f"({type(model).__name__}) has no vision_feature_layer: leave it unset")
    if has != cfg.vision_feature_layer:
        raise UserError(f"model.vision_feature_layer={cfg.vision_feature_layer} but {name} was trained with "
                        f"{has}: set them equal (or leave it unset to use the model's)")


def with_image_fit(processor, fit: str):
    """`processor` with an image transform that fits images as `fit` says (data.image_fit).

    pad_to_square is transformers' LlavaImageProcessor with `do_pad` (LLaVA-1.5's expand2square:
    pad with the mean colour to a square, then the processor's resize and crop, on torchvision),
    built from the processor's own settings; it is saved with the processor, so evaluation, the
    merged model and the demo fit images the way training did. center_crop turns padding off.
    """
    from transformers import LlavaImageProcessor

    current = processor.image_processor
    padding = bool(getattr(current, "do_pad", False)) and isinstance(current, LlavaImageProcessor)
    if (fit == "pad_to_square") == padding:
        return processor
    if fit == "center_crop":
        current.do_pad = False
        return processor
    settings = {k: v for k, v in current.to_dict().items()
                if k in ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
                         "do_normalize", "image_mean", "image_std", "do_convert_rgb", "resample")}
    processor.image_processor = LlavaImageProcessor(**settings, do_pad=True)
    return processor


def _image_fit(processor: Any, fit: str | None, family: str):
    """The image fit (data.image_fit) on the processor, or a one-line error where the family's processor cannot
    honour it. pad_to_square is LLaVA-1.5's expand2square: transformers' LlavaImageProcessor with `do_pad`, saved
    with the processor, so evaluation, the merged model and the demo fit images the way training did."""
    if fit is None:
        return processor
    from transformers import LlavaProcessor

    if type(processor) is LlavaProcessor:
        return with_image_fit(processor, fit)
    if fit == "pad_to_square":
        raise UserError(f"data.image_fit=pad_to_square: the {family} family's processor "
                        f"({type(processor).__name__}) fits images its own way (tiles or dynamic resolution, no "
                        "center crop) and has no square padding to switch on: leave data.image_fit at center_crop")
    return processor


def check_backbone(model: nn.Module, processor: Any, cfg: ModelConfig, name: str,
                   image_fit: str | None = None) -> tuple[nn.Module, Any]:
    """Every check of the door, once, with one-line errors; returns (model, processor) ready for the stages."""
    family = family_of(model)
    _chat_template(processor, cfg, name)
    _vision_feature_layer(model, cfg, name)
    processor = _image_fit(processor, image_fit, family)
    _generation_ids(model, processor)
    return model, processor


def open_model(cfg: ModelConfig, *, source: str | Path | None = None, compute_dtype: torch.dtype | None = None,
               seed: int = 0, image_fit: str | None = None, as_saved: bool = False,
               option: str = "model.quantization", dtype: torch.dtype | str | None = None) -> tuple[nn.Module, Any]:
    """(model, processor) of any VLM backbone, checked (see the module docstring).

    Args:
        cfg: the model section of a run config (or one made for a command: `structlora eval`, the merge reload).
        source: load from here instead (a run's base model, a merged model); `cfg`'s preset is then ignored.
        compute_dtype: the quantized layers' compute dtype (default: `cfg.dtype`).
        seed: a preset's random weights.
        image_fit: data.image_fit of the run (None: as the processor is).
        as_saved: a checkpoint saved quantized loads as saved (`structlora eval`); `option` names the setting
            in errors. `dtype`: the weights' dtype when loading (default `cfg.dtype`; "auto" = the checkpoint's).
    """
    if cfg.arch == "vit":
        raise ValueError("open_model opens VLMs; the ViT classifier is opened by pipeline.stages.common.load_vit_base")
    if source is not None:
        name = str(source)
        model, processor = load_pretrained(str(source), cfg, compute_dtype, name, as_saved, option, dtype)
    elif cfg.preset is not None:
        name = f"the {cfg.preset} preset"
        model, processor = build_preset(cfg, seed)
    else:
        name = str(cfg.name_or_path)
        model, processor = load_pretrained(name, cfg, compute_dtype, name, as_saved, option, dtype)
    return check_backbone(model, processor, cfg, name, image_fit)


def open_processor(cfg: ModelConfig, image_fit: str | None = None) -> tuple[Any, int | None]:
    """(processor, the language model's context length) of a backbone, checked as the door checks them, without
    loading weights from a hub (a preset is built: they are small); for the data card of `structlora prepare
    conversations --config`."""
    if cfg.preset is not None:
        model, processor = open_model(cfg, image_fit=image_fit)
        config = model.config
    else:
        from transformers import AutoConfig, AutoProcessor

        from pipeline.models.hub import resolve_pretrained

        where = resolve_pretrained(cfg.name_or_path, cfg.revision)
        processor = AutoProcessor.from_pretrained(where, revision=cfg.revision, **dict(cfg.processor_kwargs))
        config = AutoConfig.from_pretrained(where, revision=cfg.revision)
        _chat_template(processor, cfg, cfg.name_or_path)
        processor = _image_fit(processor, image_fit, getattr(config, "model_type", ""))
    text = getattr(config, "text_config", None) or config
    return processor, getattr(text, "max_position_embeddings", None)
