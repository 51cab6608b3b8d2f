"""ViT classification accuracy: hand-computed top-1 / top-5."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eval.classification import evaluate_classifier, topk_accuracy, topk_correct

# 6 classes, 4 samples. Rankings (best first):
# s0: 0 1 2 3 4 5, label 0 -> top1, top5
# s1: 5 4 3 2 1 0, label 1 -> rank 5: top5 only
# s2: 2 0 1 3 4 5, label 5 -> rank 6: neither
# s3: 3 2 ..     , label 2 -> rank 2: top5 only
LOGITS = torch.tensor([
    [6.0, 5, 4, 3, 2, 1],
    [1.0, 2, 3, 4, 5, 6],
    [5.0, 4, 6, 3, 2, 1],
    [1.0, 2, 5, 6, 3, 4],
])
LABELS = torch.tensor([0, 1, 5, 2])


def test_topk_hand_computed():
    assert topk_correct(LOGITS, LABELS, (1, 5)) == {1: 1, 5: 3}
    assert topk_accuracy(LOGITS, LABELS) == {"top1": 25.0, "top5": 75.0}
    assert topk_accuracy(LOGITS, LABELS, ks=(1, 2, 6)) == {"top1": 25.0, "top2": 50.0, "top6": 100.0}


def test_k_above_class_count_is_left_out():
    # 3 classes: argmax per row is 0, 2, 2, 2 -> labels 0, 1, 2, 2 give 3 of 4; top5 is not reported
    assert topk_accuracy(LOGITS[:, :3], torch.tensor([0, 1, 2, 2]), ks=(1, 5)) == {"top1": 75.0}


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        topk_correct(LOGITS, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="labels"):
        topk_correct(LOGITS, LABELS[:3])


class FixedLogits(torch.nn.Module):
    """Returns the stored logits of the sample indices it is given; HF-style output optional."""

    def __init__(self, logits: torch.Tensor, hf_output: bool) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits.clone(), requires_grad=False)
        self.hf_output = hf_output

    def forward(self, index: torch.Tensor):
        logits = self.table[index.long().reshape(-1)]
        return SimpleNamespace(logits=logits) if self.hf_output else logits


@pytest.mark.parametrize("hf_output", [True, False])
def test_evaluate_classifier_over_batches(hf_output):
    model = FixedLogits(LOGITS, hf_output).train()
    batches = [(torch.tensor([0.0, 1.0]), LABELS[:2]), {"pixel_values": torch.tensor([2.0, 3.0]), "labels": LABELS[2:]}]
    result = evaluate_classifier(model, batches, ks=(1, 5, 10))
    assert result == {"top1": 25.0, "top5": 75.0, "num_samples": 4, "skipped_k": [10]}
    assert model.training  # mode restored
