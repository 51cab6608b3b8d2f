"""bench/loader_vlm.py and bench/train_step_vs_peft.py (issue 39): each family's processor gives its real image
token count, and a one-round train-step comparison on the tiny preset prints its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize(("family", "size", "tokens"), [("llava", (640, 480), 576), ("qwen2_5_vl", (448, 448), 256)])
def test_processors_give_the_real_image_token_counts(family, size, tokens):
    from PIL import Image

    from bench.loader_vlm import PROCESSORS
    from data.chat_collate import ChatCollator

    collate = ChatCollator(PROCESSORS[family]("tiny"), max_length=2048)
    assert collate.image_tokens(Image.new("RGB", size)) == tokens


def test_smolvlm_splits_a_coco_image_into_twelve_tiles_and_the_global_one():
    from PIL import Image

    from bench.loader_vlm import PROCESSORS

    processor = PROCESSORS["smolvlm"]("tiny")
    out = processor.image_processor([Image.new("RGB", (640, 480))])
    assert tuple(out["pixel_values"].shape) == (1, 13, 3, 384, 384) and processor.image_seq_len == 81


def test_demand_is_the_llava_anchor_scaled_for_lora():
    from bench.loader import A100_SAMPLES_PER_S
    from bench.loader_vlm import LORA_SPEEDUP, demand

    assert demand("llava") == pytest.approx((A100_SAMPLES_PER_S * LORA_SPEEDUP,) * 2)
    low, high = demand("qwen2_5_vl")
    assert 0 < low <= high


def test_train_step_comparison_prints_a_table(capsys):
    from bench.train_step_vs_peft import main

    main(["--preset", "tiny", "--rounds", "1", "--warmup", "0", "--batch-size", "1", "--precisions", "fp32",
          "--no-memory"])
    out = capsys.readouterr().out
    assert "| pipeline (attach_method + TrainRecipe) |" in out and "| plain PEFT loop |" in out
