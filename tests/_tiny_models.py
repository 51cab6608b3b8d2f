"""Tiny models for the StructLoRA tests, built from config (nothing is downloaded).

- `ToyTowers`: a two-tower MLP stack with a projector between them, the shape of LLaVA in
  miniature (vision blocks -> projector linear_1/linear_2 -> language blocks -> head); each
  block has q and v linears and a fused qkv linear.
- `tiny_llava()`: a LlavaForConditionalGeneration with a CLIP vision tower and a Llama LM.
"""

from __future__ import annotations

import torch
from torch import nn

VISION_DIM, TEXT_DIM = 12, 16


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b, c = self.qkv(h).chunk(3, dim=-1)
        return h + 0.5 * torch.tanh(self.q(h)) + 0.5 * self.v(h) + 0.1 * torch.tanh(a * b) + 0.1 * c


class ToyProjector(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_1 = nn.Linear(VISION_DIM, TEXT_DIM)
        self.linear_2 = nn.Linear(TEXT_DIM, TEXT_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear_2(torch.nn.functional.gelu(self.linear_1(h)))


class ToyTowers(nn.Module):
    """vision.{i}.(q|v|qkv) -> projector.linear_(1|2) -> language.{i}.(q|v|qkv) -> head."""

    def __init__(self, vision_layers: int = 3, text_layers: int = 3, classes: int = 5):
        super().__init__()
        self.vision = nn.ModuleList(ToyBlock(VISION_DIM) for _ in range(vision_layers))
        self.projector = ToyProjector()
        self.language = nn.ModuleList(ToyBlock(TEXT_DIM) for _ in range(text_layers))
        self.head = nn.Linear(TEXT_DIM, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.vision:
            x = block(x)
        x = self.projector(x)
        for block in self.language:
            x = block(x)
        return self.head(x)


def toy_model(seed: int = 0) -> ToyTowers:
    torch.manual_seed(seed)
    return ToyTowers()


def randomize_b(sm, std: float = 0.3, seed: int = 0) -> None:
    """Every lora_B of a StructLoRA model drawn N(0, std^2) (it starts at zero: the update is then nil)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sm.layers.values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def toy_inputs(seed: int = 1, batch: int = 4, tokens: int = 5) -> torch.Tensor:
    return torch.randn(batch, tokens, VISION_DIM, generator=torch.Generator().manual_seed(seed))


def toy_targets(kinds: tuple[str, ...] = ("q", "v"), projector: bool = True, fused: bool = False) -> list[dict]:
    """StructLoRA targets of ToyTowers: q/v (or the q and v slices of the fused qkv) and the projector."""
    targets = []
    for tower in ("vision", "projector", "language"):
        if tower == "projector":
            if projector:
                targets += [{"tower": "projector", "pattern": r"projector\.linear_(1)", "kind": "linear",
                             "in_space": "vision", "out_space": "projector"},
                            {"tower": "projector", "pattern": r"projector\.linear_(2)", "kind": "linear",
                             "in_space": "projector", "out_space": "language"}]
            continue
        if fused:
            targets.append({"tower": tower, "pattern": rf"{tower}\.(\d+)\.qkv", "in_space": tower,
                            "out_space": tower, "fused": ["q", "k", "v"], "slices": ["q", "v"]})
        for kind in kinds:
            targets.append({"tower": tower, "pattern": rf"{tower}\.(\d+)\.{kind}", "in_space": tower,
                            "out_space": tower})
    return targets


def _section(value: bool | dict, **defaults) -> dict:
    """A config section from a switch (True / False) or a dict of overrides."""
    return {**defaults, "enabled": value} if isinstance(value, bool) else {**defaults, **value}


def toy_config(gate: bool | dict = True, coordinator: bool | dict = True, fused: bool = False, **extra) -> dict:
    """A StructLoRA config dict for ToyTowers; `gate` / `coordinator`: on, off, or a dict of fields."""
    return {"rank": 4, "alpha": 8.0, "targets": toy_targets(fused=fused), "gate": _section(gate),
            "coordinator": _section(coordinator, sketch_dim=4), **extra}


# --- tiny LLaVA -----------------------------------------------------------------------------------

IMAGE_SIZE, PATCH = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 'default' feature strategy drops CLS
VOCAB, IMAGE_TOKEN = 64, 63


def tiny_llava(seed: int = 0, vision_layers: int = 3, text_layers: int = 2):
    """A ~60k-parameter LlavaForConditionalGeneration (CLIP 32x32/8 + Llama), random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=NUM_IMAGE_TOKENS, pad_token_id=0)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def llava_batch(seed: int = 0, batch: int = 2, text_tokens: int = 6) -> dict[str, torch.Tensor]:
    """pixel_values + input_ids with NUM_IMAGE_TOKENS image tokens, and LM labels on the text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN),
                     text], dim=1)
    labels = ids.clone()
    labels[:, : 1 + NUM_IMAGE_TOKENS] = -100
    return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


def llava_config(model, gate: bool | dict = True, coordinator: bool | dict = True, **extra) -> dict:
    """A StructLoRA config dict for tiny_llava from the pipeline's tower descriptions (`tests/_plans.py`)."""
    from _plans import llava_targets

    from pipeline.schema import AdapterConfig

    return {"rank": 4, "alpha": 8.0, "targets": llava_targets(model, AdapterConfig(rank=4, alpha=8.0)),
            "gate": _section(gate), "coordinator": _section(coordinator), **extra}
