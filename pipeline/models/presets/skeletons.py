"""Benchmark skeletons of VLM families: a model's real widths with a few layers and random weights.

`skeleton_llava_config` does this for LLaVA-1.5-7B, `qwen2_5_vl_7b_skeleton_config` for
Qwen/Qwen2.5-VL-7B-Instruct (`bench/overhead.py --preset qwen2_5_vl_skeleton`) and `gemma3_4b_skeleton_config`
for google/gemma-3-4b-it (`bench/loss_head.py`). Everything is built from transformers' config classes (no hub
access; no tokenizer or processor, except LLaVA's word-level one).

Widths (Qwen2.5-VL-7B-Instruct's config.json):
- vision: hidden 1280, MLP 3420 (SwiGLU), 16 heads, fused `qkv`, 14 x 14 patches with temporal patch 2
  (rows of 3 * 2 * 14 * 14 = 1176 values), window attention over 112-pixel windows, full attention every
  8th block (7, 15, 23, 31 of 32); the merger (2 x 2 patches -> 5120 -> 5120 -> 3584) is the connector;
- language: Qwen2 with hidden 3584, MLP 18944, 28 query / 4 key-value heads, vocabulary 152064 (untied
  lm_head), RMSNorm eps 1e-6, M-RoPE theta 1e6 with sections [16, 24, 24];
- special tokens: vision_start 151652, vision_end 151653, image pad 151655, video pad 151656.
Only the layer counts change (`vision_layers`, `text_layers`); full-attention blocks keep the real
pattern (every 8th) and the last block always has full attention, as block 31 does in the real model.
At 2 + 2 layers the model has 1.64 B parameters (6.6 GB in float32), most of them in the embedding and
the lm_head (545 M each).

`skeleton_inputs` makes a training batch as Qwen2.5-VL's processor and chat template would lay it out:
pixel rows patchified the way `Qwen2VLImageProcessor` does it (the image repeated over the temporal
patch), `image_grid_thw`, `<|vision_start|>` + grid_h * grid_w / 4 image pads + `<|vision_end|>`, then
random text tokens; labels on the text only; `mm_token_type_ids` (1 on image pads), which transformers
5.x needs to compute M-RoPE positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Qwen/Qwen2.5-VL-7B-Instruct, config.json
QWEN2_5_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "max_window_layers": 28, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_5_VL_7B_VISION: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu", "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
    "window_size": 112, "tokens_per_second": 2,
}
QWEN2_5_VL_7B_VISION_DEPTH = 32  # full attention at blocks 7, 15, 23, 31
QWEN2_5_VL_TOKENS: dict[str, int] = {"image_token_id": 151655, "video_token_id": 151656,
                                     "vision_start_token_id": 151652, "vision_end_token_id": 151653}
FIRST_SPECIAL_TOKEN = 151643  # <|endoftext|>: ids from here on are special tokens


def full_attention_blocks(depth: int, every: int = 8) -> list[int]:
    """Blocks with full attention in a `depth`-block Qwen2.5-VL vision tower: every `every`-th block
    (the real 32-block tower: 7, 15, 23, 31) and always the last one."""
    return sorted({i for i in range(depth) if i % every == every - 1} | {depth - 1})


def qwen2_5_vl_7b_skeleton_config(vision_layers: int = 2, text_layers: int = 2):
    """A `transformers.Qwen2_5_VLConfig` with Qwen2.5-VL-7B-Instruct's widths and the given layer counts."""
    import transformers as tf

    if vision_layers < 1 or text_layers < 1:
        raise ValueError(f"need at least one layer per tower, got vision {vision_layers}, text {text_layers}")
    vision = tf.Qwen2_5_VLVisionConfig(depth=vision_layers, fullatt_block_indexes=full_attention_blocks(vision_layers),
                                       **QWEN2_5_VL_7B_VISION)
    text = tf.Qwen2_5_VLTextConfig(num_hidden_layers=text_layers, **QWEN2_5_VL_7B_TEXT)
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False,
                               **QWEN2_5_VL_TOKENS)


def build_qwen2_5_vl_skeleton(vision_layers: int = 2, text_layers: int = 2, seed: int = 0,
                              config: Any = None) -> nn.Module:
    """`Qwen2_5_VLForConditionalGeneration` of `qwen2_5_vl_7b_skeleton_config` (or of `config`, e.g. one
    whose widths a test shrank): random weights drawn under a forked RNG seeded with `seed` (the caller's
    RNG state is left as it was), float32, train mode off."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = config if config is not None else qwen2_5_vl_7b_skeleton_config(vision_layers, text_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.float().eval()


def processor_grid(side: int, vision: Any) -> tuple[int, int]:
    """(grid_h, grid_w) in patches that Qwen2.5-VL's image processor gives a side x side image
    (`smart_resize`: a multiple of patch * merge, pixels within its default [56 * 56, 28 * 28 * 1280])."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = vision.patch_size * vision.spatial_merge_size
    height, width = smart_resize(side, side, factor=factor, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    return height // vision.patch_size, width // vision.patch_size


def patchify(images: torch.Tensor, vision: Any) -> torch.Tensor:
    """(batch, C, H, W) normalised images -> (batch * grid_h * grid_w, C * T * P * P) rows, in the order
    of `Qwen2VLImageProcessor.patchify` (2 x 2 merge groups contiguous, each image repeated T times)."""
    b, c, h, w = images.shape
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(b * gh * gw, c * t * p * p)


def skeleton_inputs(model: nn.Module, batch: int = 1, image_side: int = 336, text_tokens: int = 32,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen2.5-VL training batch built by hand: one image_side x image_side image per row (random,
    roughly the range of CLIP-normalised pixels), `<|vision_start|>`, its image pads, `<|vision_end|>`,
    then `text_tokens` random ordinary tokens; labels are the text tokens (everything else -100)."""
    config = model.config
    vision = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    grid_h, grid_w = processor_grid(image_side, vision)
    n_image = grid_h * grid_w // vision.spatial_merge_size ** 2
    side_h, side_w = grid_h * vision.patch_size, grid_w * vision.patch_size
    images = torch.randn(batch, vision.in_channels, side_h, side_w, generator=gen)
    vocab = min(config.text_config.vocab_size, FIRST_SPECIAL_TOKEN)
    text = torch.randint(0, vocab, (batch, text_tokens), generator=gen)
    ids = torch.cat([torch.full((batch, 1), config.vision_start_token_id),
                     torch.full((batch, n_image), config.image_token_id),
                     torch.full((batch, 1), config.vision_end_token_id), text], dim=1)
    labels = ids.clone()
    labels[:, : n_image + 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": patchify(images, vision), "image_grid_thw": torch.tensor([[1, grid_h, grid_w]] * batch),
            "mm_token_type_ids": (ids == config.image_token_id).int()}


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

    from pipeline.models.presets.words import build_tiny_processor

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


# google/gemma-3-4b-it, config.json: its text_config sets hidden 2560, MLP 10240, 34 layers, sliding window 1024 and
# linear RoPE scaling (factor 8) on the global layers; the rest is Gemma3TextConfig's defaults, which are that
# checkpoint's (8 query / 4 key-value heads of 256, query_pre_attn_scalar 256, vocabulary 262,208, GeLU-tanh,
# RMSNorm eps 1e-6, RoPE theta 1e6 global / 1e4 local, a global layer every 6th, tied lm_head, no soft-capping).
GEMMA3_4B_TEXT: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "sliding_window": 1024, "max_position_embeddings": 131072, "final_logit_softcapping": None,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
}
# its vision_config: SigLIP-So400m/14 at 896 px (64 x 64 = 4096 patches), 27 layers, no pooling head
GEMMA3_4B_VISION: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "patch_size": 14, "image_size": 896,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
}
GEMMA3_4B_TOKENS: dict[str, int] = {"mm_tokens_per_image": 256, "boi_token_index": 255999, "eoi_token_index": 256000,
                                    "image_token_index": 262144}  # 4096 patches average-pooled 4 x 4 -> 256 tokens
GEMMA3_4B_DEPTH = {"vision": 27, "text": 34}
GEMMA3_ORDINARY = 255999  # <start_of_image>: ids from here on are image / special tokens


def gemma3_4b_skeleton_config(vision_layers: int = 2, text_layers: int = 2):
    """A `transformers.Gemma3Config` with gemma-3-4b-it's widths and vocabulary and the given layer counts."""
    import transformers as tf

    if vision_layers < 1 or text_layers < 1:
        raise ValueError(f"need at least one layer per tower, got vision {vision_layers}, text {text_layers}")
    vision = tf.SiglipVisionConfig(num_hidden_layers=vision_layers, **GEMMA3_4B_VISION)
    text = tf.Gemma3TextConfig(num_hidden_layers=text_layers, **GEMMA3_4B_TEXT)
    return tf.Gemma3Config(vision_config=vision, text_config=text, eos_token_id=[1, 106], **GEMMA3_4B_TOKENS)


def build_gemma3_skeleton(vision_layers: int = 2, text_layers: int = 2, seed: int = 0, config: Any = None) -> nn.Module:
    """`Gemma3ForConditionalGeneration` of `gemma3_4b_skeleton_config` (or `config`): random weights under a forked
    RNG seeded with `seed`, float32, eval mode. The projector's `mm_input_projection_weight` (zeros at init, which
    would cut the vision tower off the loss) is drawn from normal(0, 0.02), as `presets.tiny.build_tiny` does."""
    from transformers import Gemma3ForConditionalGeneration

    config = config if config is not None else gemma3_4b_skeleton_config(vision_layers, text_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range)
    return model.float().eval()


def gemma3_skeleton_inputs(model: nn.Module, batch: int = 1, text_tokens: int = 32, seed: int = 0
                           ) -> dict[str, torch.Tensor]:
    """A Gemma 3 training batch built by hand, as Gemma3Processor lays one image out: `<bos>`, `<start_of_image>`,
    mm_tokens_per_image image tokens, `<end_of_image>`, then `text_tokens` random ordinary tokens; labels are the
    text tokens; `token_type_ids` 1 on the image tokens (their bidirectional attention block)."""
    config = model.config
    vision = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(config.text_config.vocab_size, GEMMA3_ORDINARY), (batch, text_tokens), generator=gen)
    n_image = config.mm_tokens_per_image
    ids = torch.cat([torch.full((batch, 1), config.text_config.bos_token_id),
                     torch.full((batch, 1), config.boi_token_index), torch.full((batch, n_image), config.image_token_index),
                     torch.full((batch, 1), config.eoi_token_index), text], dim=1)
    labels = ids.clone()
    labels[:, : n_image + 3] = -100
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels,
            "token_type_ids": (ids == config.image_token_index).long()}
