"""Tiny models built from config, no network: the embedded default's LLaVA-1.5 and every family's tiny model.

- `build_tiny_llava(preset, vocabulary)`: the `tiny` preset, a LlavaForConditionalGeneration (CLIP-style tower +
  Llama-style LM) with the word-level tokenizer of `pipeline.models.presets.words` and LLaVA-1.5's conversation
  template: the default run's model (the `llava` family, opened through `pipeline.models.door`).
- `tiny_config(family)` / `build_tiny(family)`: every family of `pipeline.models.families.FAMILIES` from config
  classes only, with 2 layers per tower, hidden sizes 32 (vision) and 64 (language) and a 1000-token vocabulary
  whose last ids are the image / special tokens; `tiny_inputs` makes a processor-free batch of the right shapes;
  `dead_linears` finds the linears that get no gradient on one. Test and benchmark fixtures, apart from tower
  discovery (`pipeline.models.families`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pipeline.models.families import FAMILIES, _under, tower_paths
from pipeline.schema_model import TinyPreset


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


def build_tiny_llava(preset: TinyPreset, vocabulary: Iterable[str], extra_texts: Iterable[str] = (),
                     vision_feature_layer: int = -2, seed: int = 0):
    """(model, processor) of the tiny preset, random weights from `seed`, built with no network."""
    from transformers import LlavaForConditionalGeneration

    from pipeline.models.presets.words import build_tiny_processor

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


VOCAB = 1000


IMAGE = 16  # image side in pixels; with patch 4 a 4 x 4 patch grid


PATCH = 4


TEXT_LEN = 6  # text tokens after the image tokens


def _text(cls: type, **extra: Any) -> Any:
    """A 2-layer, 64-wide text config of class `cls` (GQA: 4 query heads, 2 key/value heads)."""
    sizes: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 512}
    return cls(**{**sizes, **extra})


def _vision(cls: type, **extra: Any) -> Any:
    """A 2-layer, 32-wide vision config of class `cls` on 16 x 16 images with 4 x 4 patches."""
    sizes: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "image_size": IMAGE, "patch_size": PATCH}
    return cls(**{**sizes, **extra})


def tiny_config(family: str) -> Any:
    """A small random-weight config of `family` (one of FAMILIES), from config classes only.

    The image token (and the families' other special tokens) are the last ids of the 1000-token vocab.
    """
    import transformers as tf

    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    qwen_ids = {"image_token_id": VOCAB - 4, "video_token_id": VOCAB - 3, "vision_start_token_id": VOCAB - 2,
                "vision_end_token_id": VOCAB - 1}
    qwen_text = {"rope_parameters": mrope, "bos_token_id": 1, "eos_token_id": 2}
    siglip = {"vision_use_head": False}
    if family == "llava":
        return tf.LlavaConfig(vision_config=_vision(tf.CLIPVisionConfig), text_config=_text(tf.LlamaConfig),
                              image_token_index=VOCAB - 1, image_seq_length=(IMAGE // PATCH) ** 2)
    if family == "llava_next":  # one pinpoint = the tile size: a base image plus one tile
        return tf.LlavaNextConfig(vision_config=_vision(tf.CLIPVisionConfig), text_config=_text(tf.LlamaConfig),
                                  image_token_index=VOCAB - 1, image_grid_pinpoints=[[IMAGE, IMAGE]])
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=_vision(tf.SiglipVisionConfig, **siglip),
                                       text_config=_text(tf.Qwen2Config), image_token_index=VOCAB - 2,
                                       video_token_index=VOCAB - 1, image_grid_pinpoints=[[IMAGE, IMAGE]])
    if family == "qwen2_vl":  # vision `hidden_size` is the merger's output width = the text width
        vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                        patch_size=PATCH)
        return tf.Qwen2VLConfig(vision_config=vision, text_config=_text(tf.Qwen2VLTextConfig, **qwen_text),
                                **qwen_ids)
    if family == "qwen2_5_vl":
        vision = tf.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                           patch_size=PATCH, out_hidden_size=64, window_size=2 * 2 * PATCH,
                                           fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=_text(tf.Qwen2_5_VLTextConfig, **qwen_text),
                                   **qwen_ids)
    if family == "qwen3_vl":  # deepstack: vision block 0's output also feeds the LM through its own merger
        vision = tf.Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                                        out_hidden_size=64, num_position_embeddings=(IMAGE // PATCH) ** 2,
                                        deepstack_visual_indexes=[0])
        text = _text(tf.Qwen3VLTextConfig, head_dim=16, rope_parameters={**mrope, "mrope_interleaved": True})
        return tf.Qwen3VLConfig(vision_config=vision, text_config=text, **qwen_ids)
    if family == "idefics3":
        return tf.Idefics3Config(vision_config=_vision(tf.Idefics3VisionConfig),
                                 text_config=_text(tf.LlamaConfig), image_token_id=VOCAB - 1, scale_factor=2,
                                 pad_token_id=0)
    if family == "gemma3":
        text = _text(tf.Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
        return tf.Gemma3Config(vision_config=_vision(tf.SiglipVisionConfig, **siglip), text_config=text,
                               mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                               image_token_index=VOCAB - 1)
    if family == "paligemma":
        return tf.PaliGemmaConfig(vision_config=_vision(tf.SiglipVisionConfig, projection_dim=64, **siglip),
                                  text_config=_text(tf.GemmaConfig, head_dim=16), image_token_index=VOCAB - 1,
                                  vocab_size=VOCAB, projection_dim=64, hidden_size=64)
    if family == "mistral3":
        return tf.Mistral3Config(vision_config=_vision(tf.PixtralVisionConfig, head_dim=16),
                                 text_config=_text(tf.MistralConfig, head_dim=16, sliding_window=None),
                                 image_token_index=VOCAB - 1, spatial_merge_size=2)
    if family == "internvl":
        return tf.InternVLConfig(vision_config=_vision(tf.InternVLVisionConfig), text_config=_text(tf.Qwen2Config),
                                 image_token_id=VOCAB - 1, image_seq_length=(IMAGE // PATCH // 2) ** 2,
                                 downsample_ratio=0.5)
    raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")


def build_tiny(family: str, seed: int = 0) -> nn.Module:
    """`AutoModelForImageTextToText.from_config(tiny_config(family))`: random weights, eval mode, float32.

    A connector matrix that random init leaves at zero cuts the vision tower off (no gradient reaches it):
    Gemma3's `multi_modal_projector.mm_input_projection_weight` (a bare Parameter, not an nn.Linear) is
    `torch.zeros` at init. Such matrices, outside both towers, get normal(0, initializer_range) instead,
    as a pretrained checkpoint would have non-zero values there.
    """
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family), dtype=torch.float32).float()
    towers = list(tower_paths(model).values())
    std = getattr(model.config, "initializer_range", None) or 0.02
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not _under(name, towers) and not bool(param.any()):
                param.normal_(0.0, std)
    return model.eval()


def image_token_count(family: str) -> int:
    """Image-token positions per image in `tiny_inputs` (= rows of the connector's output per image)."""
    grid = IMAGE // PATCH  # 4 x 4 patches
    if family in ("llava", "paligemma"):
        return grid * grid  # every patch (LLaVA's "default" strategy drops CLIP's CLS token)
    if family in ("llava_next", "llava_onevision"):
        return grid * grid + grid * (grid + 1)  # base image + one tile with an image_newline per row
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "mistral3", "internvl"):
        return (grid // 2) ** 2  # 2 x 2 merge / pixel shuffle
    if family == "gemma3":
        return 4  # mm_tokens_per_image (average pooling)
    raise ValueError(f"unknown family {family!r}")


def tiny_inputs(model: nn.Module, family: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch without a processor: one 16 x 16 image per row, its image tokens first, then
    TEXT_LEN random text tokens; labels are the text tokens (image positions -100)."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    n_img = image_token_count(family)
    image_id = getattr(config, "image_token_id", None)
    image_id = getattr(config, "image_token_index", None) if image_id is None else image_id
    text = torch.randint(3, VOCAB - 8, (batch, TEXT_LEN), generator=gen)
    ids = torch.cat([torch.full((batch, n_img), image_id), text], dim=1)
    labels = ids.masked_fill(ids == image_id, -100)
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)
    sizes = torch.tensor([[IMAGE, IMAGE]] * batch)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        # patches flattened to rows (t * h * w per image, C * T * P * P), as Qwen's processor returns them,
        # the per-image patch grid, and M-RoPE's per-token modality ids (1 = image; required in 5.x)
        vision = config.vision_config
        grid = IMAGE // PATCH
        width = vision.in_channels * vision.temporal_patch_size * PATCH * PATCH
        out["pixel_values"] = torch.randn(batch * grid * grid, width, generator=gen)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
        out["mm_token_type_ids"] = (ids == image_id).int()
    elif family in ("llava_next", "llava_onevision"):
        out["pixel_values"] = torch.stack([pixels, pixels], dim=1)  # (batch, base + 1 tile, C, H, W)
        out["image_sizes"] = sizes
    elif family == "idefics3":
        out["pixel_values"] = pixels[:, None]  # (batch, images per row, C, H, W)
    elif family == "mistral3":
        out["pixel_values"], out["image_sizes"] = pixels, sizes
    else:
        out["pixel_values"] = pixels
    return out


def dead_linears(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Linears whose weight gets no gradient (None or exactly zero) from one forward + backward of
    `inputs` (which must carry labels); the model's gradients are cleared before and after."""
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    dead = [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (m.weight.grad is None or not bool(m.weight.grad.any()))]
    model.zero_grad(set_to_none=True)
    return dead
