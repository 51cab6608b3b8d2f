"""The Qwen2.5-VL-7B and Gemma-3-4B skeletons of `pipeline.models.presets.skeletons` (bench/overhead.py --preset
qwen2_5_vl_skeleton, bench/loss_head.py).

The fast tests check the config's widths against Qwen/Qwen2.5-VL-7B-Instruct's config.json on the meta
device (no memory), the hand-built batch against Qwen's own image processor, and one training step of a
model built by the same code from a config whose widths are shrunk. The slow one builds the real-width
skeleton (6.6 GB in float32) and checks one forward + backward.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.presets.skeletons import (
    GEMMA3_4B_TEXT,
    GEMMA3_4B_TOKENS,
    GEMMA3_4B_VISION,
    QWEN2_5_VL_7B_TEXT,
    QWEN2_5_VL_7B_VISION,
    QWEN2_5_VL_TOKENS,
    build_gemma3_skeleton,
    build_qwen2_5_vl_skeleton,
    full_attention_blocks,
    gemma3_4b_skeleton_config,
    gemma3_skeleton_inputs,
    patchify,
    qwen2_5_vl_7b_skeleton_config,
    skeleton_inputs,
)


def _meta_model(config):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def _small_config():
    """The skeleton's config with every width shrunk (patch, merge, window and token ids kept)."""
    import transformers as tf

    vision = tf.Qwen2_5_VLVisionConfig(**{**QWEN2_5_VL_7B_VISION, "hidden_size": 32, "intermediate_size": 64,
                                          "num_heads": 2, "out_hidden_size": 64},
                                       depth=2, fullatt_block_indexes=full_attention_blocks(2))
    rope = {**QWEN2_5_VL_7B_TEXT["rope_parameters"], "mrope_section": [2, 3, 3]}  # head_dim 16
    text = tf.Qwen2_5_VLTextConfig(**{**QWEN2_5_VL_7B_TEXT, "hidden_size": 64, "intermediate_size": 128,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 152064,
                                      "rope_parameters": rope}, num_hidden_layers=2)
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **QWEN2_5_VL_TOKENS)


def test_full_attention_blocks_keep_the_real_pattern():
    assert full_attention_blocks(32) == [7, 15, 23, 31]
    assert full_attention_blocks(2) == [1] and full_attention_blocks(1) == [0]
    assert full_attention_blocks(10) == [7, 9]


def test_skeleton_has_the_real_7b_widths():
    config = qwen2_5_vl_7b_skeleton_config(2, 3)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 3)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rms_norm_eps == 1e-6 and not config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (2, 1280, 3420, 16)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (vision.out_hidden_size, vision.window_size, list(vision.fullatt_block_indexes)) == (3584, 112, [1])
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)

    model = _meta_model(qwen2_5_vl_7b_skeleton_config())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model.visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["model.visual.blocks.1.attn.qkv.weight"] == (3 * 1280, 1280)
    assert shapes["model.visual.blocks.1.mlp.gate_proj.weight"] == (3420, 1280)
    assert shapes["model.visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["model.visual.merger.mlp.2.weight"] == (3584, 5120)
    assert shapes["model.language_model.layers.1.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.language_model.layers.1.mlp.down_proj.weight"] == (3584, 18944)
    assert shapes["lm_head.weight"] == shapes["model.language_model.embed_tokens.weight"] == (152064, 3584)
    assert 1.6e9 < sum(p.numel() for p in model.parameters()) < 1.7e9


def test_skeleton_inputs_follow_the_processor_layout():
    model = _meta_model(qwen2_5_vl_7b_skeleton_config())
    batch = skeleton_inputs(model, batch=2, image_side=336, text_tokens=5)
    assert batch["pixel_values"].shape == (2 * 24 * 24, 3 * 2 * 14 * 14)
    assert batch["image_grid_thw"].tolist() == [[1, 24, 24]] * 2
    ids = batch["input_ids"]
    assert ids.shape == (2, 1 + 144 + 1 + 5)
    assert (ids[:, 0] == 151652).all() and (ids[:, 145] == 151653).all() and (ids[:, 1:145] == 151655).all()
    assert (ids[:, 146:] < 151643).all()
    assert (batch["labels"][:, :146] == -100).all() and (batch["labels"][:, 146:] == ids[:, 146:]).all()
    assert batch["mm_token_type_ids"].sum().item() == 2 * 144 and batch["attention_mask"].all()
    # a side that is no multiple of 28 is resized as the processor's smart_resize does it: 300 -> 308
    assert skeleton_inputs(model, image_side=300)["image_grid_thw"].tolist() == [[1, 22, 22]]


def test_patchify_matches_qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    vision = qwen2_5_vl_7b_skeleton_config().vision_config
    image = torch.rand(3, 56, 84)
    out = Qwen2VLImageProcessor()(images=[image], do_resize=False, do_rescale=False, do_normalize=False,
                                  return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(patchify(image[None], vision), out["pixel_values"].float())


def test_small_skeleton_trains():
    from pipeline.models.families import layer_table
    from pipeline.models.presets.tiny import dead_linears
    from pipeline.models.targets import structlora_targets

    state = torch.random.get_rng_state()
    model = build_qwen2_5_vl_skeleton(config=_small_config(), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # forked RNG: the caller's stream is untouched
    again = build_qwen2_5_vl_skeleton(config=_small_config(), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    model.train()
    batch = skeleton_inputs(model, batch=2, image_side=112, text_tokens=8)
    assert dead_linears(model, batch) == []
    loss = model(**batch).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0
    found = structlora_targets(model, layer_table(model), targets=["q", "v"])
    assert found.counts == {"vision": 2, "connector": 2, "language": 4}
    assert "model.visual.blocks.0.attn.qkv" in found.names


def _gemma3_small_config():
    """The Gemma 3 skeleton's config with every width shrunk (896 px / 14 px patches, 256 image tokens and the
    262,208-entry vocabulary kept)."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(**{**GEMMA3_4B_VISION, "hidden_size": 32, "intermediate_size": 64,
                                      "num_attention_heads": 2}, num_hidden_layers=2)
    text = tf.Gemma3TextConfig(**{**GEMMA3_4B_TEXT, "hidden_size": 64, "intermediate_size": 128,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                  "query_pre_attn_scalar": 16}, num_hidden_layers=2)
    return tf.Gemma3Config(vision_config=vision, text_config=text, **GEMMA3_4B_TOKENS)


def test_gemma3_skeleton_has_gemma_3_4b_widths():
    from transformers import Gemma3ForConditionalGeneration

    config = gemma3_4b_skeleton_config(2, 3)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (2560, 10240, 3,
                                                                                                   262208)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.query_pre_attn_scalar) == (
        8, 4, 256, 256)
    assert text.sliding_window == 1024 and text.final_logit_softcapping is None and config.tie_word_embeddings
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert gemma3_4b_skeleton_config(1, 6).text_config.layer_types[-1] == "full_attention"  # every 6th is global
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) == (1152, 4304, 16)
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers, vision.vision_use_head) == (896, 14, 2,
                                                                                                       False)
    assert (config.mm_tokens_per_image, config.image_token_index) == (256, 262144)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(gemma3_4b_skeleton_config())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model.language_model.embed_tokens.weight"] == (262208, 2560)  # tied with the lm_head
    assert shapes["model.language_model.layers.1.self_attn.q_proj.weight"] == (8 * 256, 2560)
    assert shapes["model.language_model.layers.1.self_attn.k_proj.weight"] == (4 * 256, 2560)
    assert shapes["model.vision_tower.encoder.layers.1.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["model.multi_modal_projector.mm_input_projection_weight"] == (1152, 2560)
    assert 0.89e9 < sum(p.numel() for p in model.parameters()) < 0.91e9


def test_small_gemma3_skeleton_trains_with_the_processor_layout():
    model = build_gemma3_skeleton(config=_gemma3_small_config(), seed=1).train()
    batch = gemma3_skeleton_inputs(model, batch=2, text_tokens=6)
    ids = batch["input_ids"]
    assert ids.shape == (2, 1 + 1 + 256 + 1 + 6) and (ids[:, 0] == 2).all() and (ids[:, 1] == 255999).all()
    assert (ids[:, 2:258] == 262144).all() and (ids[:, 258] == 256000).all() and (ids[:, 259:] < 255999).all()
    assert (batch["labels"][:, :259] == -100).all() and (batch["labels"][:, 259:] == ids[:, 259:]).all()
    assert batch["token_type_ids"].sum().item() == 2 * 256 and batch["pixel_values"].shape == (2, 3, 896, 896)
    loss = model(**batch).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_full_skeleton_forward_backward():
    model = build_qwen2_5_vl_skeleton(2, 2).train()
    model.requires_grad_(False)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    layer.weight.requires_grad_(True)
    out = model(**skeleton_inputs(model, text_tokens=8))
    out.loss.backward()
    assert out.logits.shape == (1, 1 + 144 + 1 + 8, 152064)
    assert math.isfinite(out.loss.item()) and torch.isfinite(layer.weight.grad).all()
