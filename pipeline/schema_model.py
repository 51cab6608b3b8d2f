"""The `model` section of the run config: the backbone, loaded (hub id, local directory) or built from a preset.

ModelConfig and the sizes of its presets (tiny, llava15-7b-skeleton). pipeline.schema composes it into RunConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.schema_fields import option as _f


@dataclass
class TinyPreset:
    """Sizes of the tiny LLaVA-architecture preset (CLIP-style vision tower + Llama-style LM)."""

    image_size: int = _f(64, "input image side")
    patch_size: int = _f(8, "ViT patch side: (image_size / patch_size)^2 image tokens")
    vision_hidden: int = _f(96, "vision tower width")
    vision_layers: int = _f(4, "vision tower depth (the last is unused with vision_feature_layer=-2)")
    vision_heads: int = _f(4, "vision attention heads")
    text_hidden: int = _f(128, "language model width")
    text_layers: int = _f(4, "language model depth")
    text_heads: int = _f(4, "language attention heads")
    text_intermediate: int = _f(256, "language MLP width")
    max_position: int = _f(512, "language model context length")
    num_labels: int = _f(10, "classes for the ViT preset")

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if name.startswith("vision") else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its head count {heads}")


@dataclass
class SkeletonPreset:
    """LLaVA-1.5-7B at its real widths with a few layers and random weights (`preset: llava15-7b-skeleton`):
    CLIP ViT-L/14 at 336 px (1024 wide, 16 heads, MLP 4096, 576 image tokens), projector
    1024 -> 4096 -> 4096, Llama (4096 wide, 32 heads, MLP 11008, vocabulary 32064, 4096 positions).
    Every shape a 7B run meets, on a machine without the weights: for tests and benchmarks."""

    vision_layers: int = _f(3, "CLIP layers (the last is unused with vision_feature_layer=-2)")
    text_layers: int = _f(2, "Llama layers")

    def __post_init__(self) -> None:
        if self.vision_layers < 2 or self.text_layers < 1:
            raise ValueError("the skeleton needs >= 2 vision layers (LLaVA reads the second to last) and >= 1 text layer")


@dataclass
class ModelConfig:
    """The backbone: a hub id / local directory loaded with from_pretrained, or a preset built from config."""

    arch: Literal["llava", "vit", "vlm"] = _f(
        "llava", "vlm = any AutoModelForImageTextToText (LLaVA-1.5, Qwen2.5-VL, LLaVA-OneVision, SmolVLM, Gemma 3, "
                 "...: towers from the model, prompts through its chat template); llava = the same path (a "
                 "spelling users know: LLaVA-1.5 is the llava family); vit = image classifier")
    name_or_path: str | None = _f(None, "hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    preset: Literal["tiny", "llava15-7b-skeleton", "tiny-llava", "tiny-llava_next", "tiny-llava_onevision",
                    "tiny-qwen2_vl", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-idefics3", "tiny-gemma3",
                    "tiny-paligemma", "tiny-mistral3", "tiny-internvl"] | None = _f(
        None, "build from config instead of loading weights: the tiny preset, LLaVA-1.5-7B's real widths with "
              "a few layers, or tiny-<family> (model.arch=vlm: that family's tiny random model and processor)")
    tiny: TinyPreset = _f(help="sizes of the tiny preset", factory=TinyPreset)
    skeleton: SkeletonPreset = _f(help="depth of the llava15-7b-skeleton preset", factory=SkeletonPreset)
    vit_impl: Literal["transformers", "timm"] = _f("transformers", "ViT implementation")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "weights dtype when loading")
    vision_feature_layer: int | None = _f(
        None, "the vision layer the model reads (LLaVA-1.5: -2); unset = the model's own; set = checked against a "
              "loaded model, used to build a preset (LLaVA presets: -2 when unset)")
    chat_template: str | None = _f(None, "a Jinja chat template file for a processor without one (PaliGemma's hub "
                                         "checkpoints) or to replace its own")
    processor_kwargs: dict[str, Any] = _f(help="passed to AutoProcessor.from_pretrained (e.g. Qwen-VL's "
                                               "min_pixels / max_pixels)", factory=dict)
    quantization: Literal["none", "nf4", "fp4", "int8"] = _f(
        "none", "QLoRA: load the frozen base with the language model's linears quantized by bitsandbytes (vision "
                "tower, projector and lm_head kept in the compute dtype, LLaVA's recipe); model.arch=llava or vlm")
    double_quant: bool = _f(True, "4-bit only: quantize the quantization constants too (QLoRA's double quant)")

    def __post_init__(self) -> None:
        if self.quantization != "none" and self.arch == "vit":
            raise ValueError(f"model.quantization={self.quantization} is built for model.arch=llava or vlm (a "
                             "language model to quantize), not vit")
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.name_or_path (load) or model.preset (build from config)")
        if self.arch == "vit" and self.preset not in (None, "tiny"):
            raise ValueError(f"model.arch=vit builds the tiny preset only, not {self.preset}")
