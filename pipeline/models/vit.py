"""The ViT classifier, the one path beside the VLMs: transformers' ViTForImageClassification or a timm ViT, loaded
with from_pretrained (hub id or local directory) or built from the tiny preset, with random weights offline."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models.hub import DTYPES, resolve_pretrained
from pipeline.schema_model import ModelConfig, TinyPreset

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
    `timm`: its blocks are `timm.blocks.{i}` (pipeline.models.vit_targets knows this)."""

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


