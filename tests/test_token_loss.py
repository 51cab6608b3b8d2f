"""The loss from the labelled positions only (eval.token_loss) equals transformers' full computation on every
family: the loss and the gradient of every parameter, fp32 and bf16 autocast, with a row without any label and a
row with two labelled turns; chunking changes nothing; the test loss per item is the full computation's."""

from __future__ import annotations

import pytest
import torch

from eval.token_loss import chunked_cross_entropy, labelled_mask, task_loss, token_losses
from pipeline.models.families import FAMILIES
from pipeline.models.presets.tiny import TEXT_LEN, build_tiny, tiny_inputs


def _batch(model, family: str):
    """Three rows: all text labelled, none labelled, two labelled turns with a prompt between them."""
    inputs = tiny_inputs(model, family, batch=3, seed=1)
    labels = inputs.pop("labels")
    text = labels.shape[1] - TEXT_LEN
    labels[1] = -100
    labels[2, text + 2:text + 4] = -100  # answer, user turn (unlabelled), answer
    return inputs, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, inputs, labels, autocast: bool, num_items: int | None = None):
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    model.zero_grad(set_to_none=True)
    with context():
        full = model(**inputs, labels=labels, **kwargs).loss
    full.backward()
    full_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    with context():
        ours = task_loss(model, inputs, labels, num_items)
    ours.backward()
    return full, ours, full_grads, _grads(model)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"labelled_loss-{f}")
def test_loss_and_every_gradient_equal_the_full_computation(family):
    model = build_tiny(family).train()
    inputs, labels = _batch(model, family)
    for autocast, rtol, atol in ((False, 1e-5, 1e-7), (True, 2e-2, 1e-4)):
        for num_items in (None, 17):
            full, ours, full_grads, our_grads = _compare(model, inputs, labels, autocast, num_items)
            assert torch.allclose(ours.float(), full.float(), rtol=rtol, atol=atol), (autocast, num_items, ours, full)
            assert full_grads.keys() == our_grads.keys() and len(full_grads) > 10
            for name, grad in full_grads.items():
                scale = grad.abs().max().clamp_min(1e-12)
                assert (our_grads[name] - grad).abs().max() <= rtol * scale + atol, (family, autocast, name)


@pytest.mark.parametrize("family", ["llava", "gemma3"], ids=lambda f: f"labelled_loss_per_row-{f}")
def test_per_token_losses_and_rows_match_the_full_logits(family):
    model = build_tiny(family).eval()
    inputs, labels = _batch(model, family)
    with torch.no_grad():
        losses, rows = token_losses(model, inputs, labels)
        logits = model(**inputs).logits.float()
    full = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    keep = labelled_mask(labels)
    assert torch.allclose(losses, full[keep[:, :-1]], rtol=1e-5, atol=1e-6)
    assert rows.tolist() == keep.nonzero()[:, 0].tolist() and 1 not in rows.tolist()


def test_chunks_change_nothing_and_keep_the_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1000, generator=gen, requires_grad=True)
    targets = torch.randint(0, 1000, (37,), generator=gen)
    whole = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    chunked = chunked_cross_entropy(logits, targets, chunk_elements=5 * 1000)  # 8 chunks, the last of 2 rows
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(grad_chunked, grad_whole, atol=1e-7)
    assert chunked_cross_entropy(logits[:0], targets[:0]).numel() == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"], ids=lambda f: f"prefill_last_logits-{f}")
def test_generation_computes_the_head_at_the_last_position_only(family):
    """Greedy generation through the project's eval path: on prefill and every decoding step the head sees one
    position per row (transformers' logits_to_keep=1), never the whole prompt."""
    from eval.generate import generate_batch
    from pipeline.models.door import open_model
    from pipeline.schema_model import ModelConfig

    model, processor = open_model(ModelConfig(arch="vlm", preset=f"tiny-{family}"))
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    from PIL import Image

    from data.chat_template import render_text, to_template_messages

    prompt = render_text(processor, to_template_messages([{"role": "user", "content": "<image>\nwhat is it?"}]),
                         add_generation_prompt=True)
    try:
        generate_batch(model, processor, [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))], [prompt] * 2, 3)
    finally:
        handle.remove()
    assert seen and all(shape[:2] == (2, 1) for shape in seen), seen
