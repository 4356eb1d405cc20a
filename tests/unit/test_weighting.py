"""Class weights, oversampling factors and the weighted answer loss (pure parts; the tiny-model check of the loss is in
test_inspection_task.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsvlm.train.weighting import class_weights, oversampled_indices, oversampling_factors, weighted_answer_loss

COUNTS = {"common": 30, "rare": 10, "absent": 0}


def test_inverse_frequency_weights_balance_classes_and_keep_the_mean_example_weight() -> None:
    weights = class_weights(COUNTS, "inverse_frequency")
    assert set(weights) == {"common", "rare"}  # no example of "absent" is ever weighted
    assert weights["rare"] == pytest.approx(2.0) and weights["common"] == pytest.approx(2 / 3)
    # each class contributes the same total weight, and the total equals the number of examples
    assert 30 * weights["common"] == pytest.approx(10 * weights["rare"])
    assert 30 * weights["common"] + 10 * weights["rare"] == pytest.approx(40)


def test_sqrt_inverse_and_none_weights() -> None:
    weights = class_weights(COUNTS, "sqrt_inverse")
    assert weights["rare"] / weights["common"] == pytest.approx(math.sqrt(3))
    assert 30 * weights["common"] + 10 * weights["rare"] == pytest.approx(40)
    assert class_weights(COUNTS, "none") == {"common": 1.0, "rare": 1.0}


def test_class_weights_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown class weighting scheme 'focal'"):
        class_weights(COUNTS, "focal")
    with pytest.raises(ValueError, match=">= 0"):
        class_weights({"a": -1, "b": 3})
    with pytest.raises(ValueError, match="no class has any example"):
        class_weights({"a": 0})


def test_oversampling_factors_follow_the_power() -> None:
    counts = {"big": 40, "small": 10, "absent": 0}
    assert oversampling_factors(counts, 1.0) == {"big": 1.0, "small": 4.0}
    assert oversampling_factors(counts, 0.5) == {"big": 1.0, "small": 2.0}
    assert oversampling_factors(counts, 0.0) == {"big": 1.0, "small": 1.0}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oversampling_factors(counts, 1.5)


def test_oversampled_indices_repeat_rows_by_their_class_factor() -> None:
    classes = ["small"] + ["big"] * 4
    indices = oversampled_indices(classes, {"big": 1.0, "small": 4.0})
    assert indices.tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    many = ["x"] * 2000
    drawn = oversampled_indices(many, {"x": 2.5}, seed=7)
    assert 2.4 * 2000 < len(drawn) < 2.6 * 2000  # each row 2 or 3 times, 3 with probability 0.5
    assert set(np.bincount(drawn).tolist()) == {2, 3}
    assert np.array_equal(drawn, oversampled_indices(many, {"x": 2.5}, seed=7))
    with pytest.raises(KeyError, match="row 1: class 'y'"):
        oversampled_indices(["x", "y"], {"x": 1.0})


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[t] against labels[t + 1] over the positions with labels != -100 (one example)."""
    targets = labels[1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep])


def test_weighted_loss_is_a_weighted_mean_of_per_example_means() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, -100, -100, -100, 7, 2]])
    per_example = [_reference_loss(logits[i], labels[i]) for i in range(2)]
    loss = weighted_answer_loss(logits, labels, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(loss, (per_example[0] + per_example[1]) / 2)
    torch.testing.assert_close(
        weighted_answer_loss(logits, labels, torch.tensor([1.0, 3.0])), (per_example[0] + 3 * per_example[1]) / 4
    )
    # the 3-token example does not outweigh the 2-token one: not a token-level mean
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert not torch.isclose(loss, token_mean)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_weighted_loss_refuses_bad_input() -> None:
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, -100]])
    with pytest.raises(ValueError, match=r"examples \[1\] have no answer tokens"):
        weighted_answer_loss(logits, labels, torch.ones(2))
    labels[1, 3] = 1
    with pytest.raises(ValueError, match="need logits"):
        weighted_answer_loss(logits, labels, torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_answer_loss(logits, labels, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="positive finite sum"):
        weighted_answer_loss(logits, labels, torch.zeros(2))
