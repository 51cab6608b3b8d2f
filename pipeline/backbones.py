"""Backbones: LLaVA-1.5 and ViT, loaded with from_pretrained or built from a size preset.

Real configs load `llava-hf/llava-1.5-7b-hf` (or a timm / transformers ViT) by hub id or
from a local directory. The `tiny` preset builds the same architectures from config, with
random weights and a processor made offline, so every code path runs on a laptop.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.schema import ModelConfig, TinyPreset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- resolving a name: local directory or hub id, failing fast when offline ---------------------


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True


def resolve_pretrained(name_or_path: str, revision: str | None = None, probe_timeout: float = 5.0) -> str:
    """Return a local directory or a hub id that from_pretrained can load without minutes of retries.

    A local directory is used as is. A hub id is accepted if it is in the local cache, or if
    the hub answers a metadata request within `probe_timeout` seconds; otherwise this raises
    a one-line UserError that says to pass a local directory.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise UserError(f"model directory not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    try:  # already downloaded?
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    advice = f"pass a local directory instead (model.name_or_path=/path/to/{name_or_path.split('/')[-1]})"
    if _hub_offline():
        raise UserError(f"cannot load '{name_or_path}': it is not a local directory and the hub is offline "
                        f"(HF_HUB_OFFLINE is set); {advice}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name_or_path, revision=revision, timeout=probe_timeout)
    except Exception as err:  # noqa: BLE001 - connection, DNS, 401, 404: all mean "cannot load from the hub"
        reason = type(err).__name__
        raise UserError(f"cannot load '{name_or_path}': it is not a local directory and the Hugging Face Hub "
                        f"cannot be reached ({reason}); {advice}") from None
    return name_or_path


# --- LLaVA ----------------------------------------------------------------------------------


def tiny_llava_config(preset: TinyPreset, vocab_size: int, image_token_id: int, pad_token_id: int,
                      bos_token_id: int, eos_token_id: int, vision_feature_layer: int = -2):
    """LlavaConfig of the tiny preset: CLIP-style vision tower + Llama-style language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_hidden * 2,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_heads,
        max_position_embeddings=preset.max_position,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    num_patches = (preset.image_size // preset.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=num_patches,
        pad_token_id=pad_token_id,
    )


SKELETON_IMAGE_SIZE, SKELETON_PATCH = 336, 14


def skeleton_llava_config(vision_layers: int, text_layers: int, image_token_id: int, pad_token_id: int,
                          bos_token_id: int, eos_token_id: int, vision_feature_layer: int = -2):
    """LlavaConfig with llava-hf/llava-1.5-7b-hf's widths (CLIP ViT-L/14-336, projector, Vicuna-7B) and few layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=SKELETON_IMAGE_SIZE, patch_size=SKELETON_PATCH,
                              projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=(SKELETON_IMAGE_SIZE // SKELETON_PATCH) ** 2,
                       pad_token_id=pad_token_id)


def build_skeleton_llava(vision_layers: int, text_layers: int, vocabulary: Iterable[str],
                         extra_texts: Iterable[str] = (), vision_feature_layer: int = -2, seed: int = 0):
    """(model, processor) of the llava15-7b-skeleton preset: real 7B widths, few layers, random weights.

    The tokenizer is the word-level one of the shapes world (its ids fit in the 32064-entry
    vocabulary); the image processor is CLIP's at 336 px, so each image is 576 tokens.
    """
    from transformers import LlavaForConditionalGeneration

    from pipeline.tokenizer import build_tiny_processor

    processor = build_tiny_processor(vocabulary, SKELETON_IMAGE_SIZE, SKELETON_PATCH, extra_texts)
    tok = processor.tokenizer
    config = skeleton_llava_config(vision_layers, text_layers, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, vision_feature_layer=vision_feature_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model, processor


def build_tiny_llava(preset: TinyPreset, vocabulary: Iterable[str], extra_texts: Iterable[str] = (),
                     vision_feature_layer: int = -2, seed: int = 0):
    """(model, processor) of the tiny preset, random weights from `seed`, built with no network."""
    from transformers import LlavaForConditionalGeneration

    from pipeline.tokenizer import build_tiny_processor

    processor = build_tiny_processor(vocabulary, preset.image_size, preset.patch_size, extra_texts)
    tok = processor.tokenizer
    config = tiny_llava_config(
        preset, vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        vision_feature_layer=vision_feature_layer,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor


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


# --- ViT ------------------------------------------------------------------------------------


_TIMM_META = "structlora_timm.json"


def build_tiny_vit(preset: TinyPreset, impl: str = "transformers", num_labels: int | None = None, seed: int = 0) -> nn.Module:
    """A small ViT classifier from config: transformers ViTForImageClassification or timm VisionTransformer."""
    num_labels = num_labels or preset.num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if impl == "timm":
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(
                img_size=preset.image_size, patch_size=preset.patch_size, embed_dim=preset.vision_hidden,
                depth=preset.vision_layers, num_heads=preset.vision_heads, mlp_ratio=2.0, num_classes=num_labels,
            )
            model.structlora_meta = {  # what save/load need to rebuild it
                "img_size": preset.image_size, "patch_size": preset.patch_size, "embed_dim": preset.vision_hidden,
                "depth": preset.vision_layers, "num_heads": preset.vision_heads, "mlp_ratio": 2.0,
                "num_classes": num_labels,
            }
            return model
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=preset.vision_hidden, num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads, intermediate_size=preset.vision_hidden * 2,
            image_size=preset.image_size, patch_size=preset.patch_size, num_labels=num_labels,
        )
        return ViTForImageClassification(config)


def save_vit(model: nn.Module, out: Path) -> None:
    """Save a ViT so `load_vit` rebuilds it: save_pretrained for transformers; for timm, safetensors
    + build metadata (models built here) or timm's own `save_for_hf` (models from the hub)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out)
        return
    meta = getattr(model, "structlora_meta", None)
    if meta is None:
        from timm.models import save_for_hf

        save_for_hf(model, out, safe_serialization=True)
        return
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / _TIMM_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


TIMM_DATA_CONFIG = "timm_data_config.json"


class TimmImageProcessor:
    """A timm model's own preprocessing (`timm.data.resolve_model_data_config` + `create_transform`,
    eval mode) behind the image-processor call the collators use: `(images=[PIL], return_tensors="pt")`."""

    def __init__(self, data_config: dict[str, Any]):
        from timm.data import create_transform

        self.data_config = dict(data_config)
        self.transform = create_transform(**self.data_config, is_training=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> TimmImageProcessor:
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model)
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None):  # a model built here has no pretrained cfg
            config["input_size"] = (3, *embed.img_size)
        return cls(config)

    def __call__(self, images, return_tensors: str = "pt", **_) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in images])}

    def save_pretrained(self, out: str | Path) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / TIMM_DATA_CONFIG).write_text(json.dumps(self.data_config, indent=2, sort_keys=True, default=list))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TimmImageProcessor:
        config = json.loads((Path(path) / TIMM_DATA_CONFIG).read_text())
        config["input_size"] = tuple(config["input_size"])
        return cls(config)


class TimmClassifier(nn.Module):
    """A timm ViT behind the interface of transformers' image classifiers, so every stage runs it
    as it runs ViTForImageClassification: forward(pixel_values, labels) -> .loss / .logits,
    save_pretrained / from_pretrained (the timm model's own format). The timm model is the child
    `timm`: its blocks are `timm.blocks.{i}` (pipeline.towers knows this)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.timm = model
        self.config = types.SimpleNamespace(num_labels=model.num_classes, model_type="timm_vit")

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.timm(pixel_values)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, out: str | Path, **_) -> None:
        save_vit(self.timm, Path(out))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, **_) -> TimmClassifier:
        model = cls(load_vit(ModelConfig(arch="vit", vit_impl="timm", name_or_path=str(path))))
        return model.to(dtype) if dtype is not None else model


def load_vit(cfg: ModelConfig, num_labels: int | None = None) -> nn.Module:
    """Load a ViT classifier by hub id or local directory (transformers or timm)."""
    assert cfg.name_or_path is not None
    local = Path(cfg.name_or_path).expanduser()
    if cfg.vit_impl == "timm":
        import timm

        if (local / _TIMM_META).is_file():
            from safetensors.torch import load_file
            from timm.models.vision_transformer import VisionTransformer

            meta = json.loads((local / _TIMM_META).read_text())
            model = VisionTransformer(**meta)
            model.load_state_dict(load_file(str(local / "model.safetensors")))
            model.structlora_meta = meta
            return model
        source = resolve_pretrained(cfg.name_or_path, cfg.revision)
        kwargs: dict[str, Any] = {"num_classes": num_labels} if num_labels else {}
        if Path(source).is_dir():
            return timm.create_model(f"local-dir:{source}", pretrained=True, **kwargs)
        return timm.create_model(f"hf-hub:{source}", pretrained=True, **kwargs)
    from transformers import AutoModelForImageClassification

    source = resolve_pretrained(cfg.name_or_path, cfg.revision)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    return AutoModelForImageClassification.from_pretrained(source, revision=cfg.revision,
                                                           dtype=DTYPES[cfg.dtype], **kwargs)


def build_vit(cfg: ModelConfig, num_labels: int | None = None, seed: int = 0) -> nn.Module:
    if cfg.preset == "tiny":
        return build_tiny_vit(cfg.tiny, cfg.vit_impl, num_labels, seed)
    return load_vit(cfg, num_labels)


def vit_for_pipeline(model: nn.Module) -> tuple[nn.Module, Any]:
    """(classifier, image processor) as the stages use them: a timm model wrapped in TimmClassifier
    with timm's own preprocessing; a transformers ViT as it is (its processor comes from elsewhere)."""
    if isinstance(model, TimmClassifier):
        return model, TimmImageProcessor.from_model(model.timm)
    if hasattr(model, "blocks") and not hasattr(model, "save_pretrained"):
        return TimmClassifier(model), TimmImageProcessor.from_model(model)
    return model, None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
