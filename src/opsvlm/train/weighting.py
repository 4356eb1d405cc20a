"""Class imbalance: per-class loss weights, oversampling factors and a per-example weighted answer loss. Pure.

Inspection data is imbalanced (seed 003: a 7x ratio between the most and least frequent condition class), and so is
OpenPack. Two configurable remedies work for any task (a task names each row's class with ``Task.class_of``):

* **class-weighted loss**: :func:`class_weights` gives each class a weight, :func:`weighted_answer_loss` averages
  the per-example answer losses with those weights;
* **oversampling**: :func:`oversampling_factors` says how many times each class's examples are repeated per epoch,
  :func:`oversampled_indices` turns that into a deterministic list of row indices.

Weights are normalised so that the mean weight over the training examples is 1: switching weighting on changes the
balance between classes, not the overall size of the loss (and so not the effective learning rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "WEIGHT_SCHEMES",
    "class_weights",
    "oversampled_indices",
    "oversampling_factors",
    "weighted_answer_loss",
]

WEIGHT_SCHEMES = ("none", "inverse_frequency", "sqrt_inverse")
IGNORE_INDEX = -100  # label value the loss skips (as in opsvlm.model.prompt)


def class_weights(class_counts: Mapping[str, int], scheme: str = "inverse_frequency") -> dict[str, float]:
    """Per-class loss weights from training-set class counts.

    ``inverse_frequency`` gives class ``c`` a weight proportional to ``1 / n_c`` (scikit-learn's "balanced": every
    class contributes the same total weight); ``sqrt_inverse`` to ``1 / sqrt(n_c)`` (a milder correction); ``none``
    gives every class 1. Weights are scaled so that ``sum_c n_c * w_c = sum_c n_c`` (mean example weight 1).

    Args:
        class_counts: ``{class: number of training examples}``.
        scheme: One of :data:`WEIGHT_SCHEMES`.

    Returns:
        ``{class: weight}`` for the classes with at least one example; classes with a count of 0 are left out (no
        example of theirs is ever weighted).

    Raises:
        ValueError: for an unknown scheme, a negative count, or no examples at all.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown class weighting scheme {scheme!r}; known: {list(WEIGHT_SCHEMES)}")
    counts = _checked_counts(class_counts)
    if scheme == "none":
        return {c: 1.0 for c in counts}
    power = 1.0 if scheme == "inverse_frequency" else 0.5
    raw = {c: n**-power for c, n in counts.items()}
    scale = sum(counts.values()) / sum(counts[c] * raw[c] for c in counts)
    return {c: raw[c] * scale for c in counts}


def oversampling_factors(class_counts: Mapping[str, int], power: float = 1.0) -> dict[str, float]:
    """How many times each class's examples are drawn per epoch: ``(n_max / n_c) ** power``.

    ``power = 0`` leaves the data as it is (every factor 1); ``power = 1`` brings every class up to the size of the
    largest; values in between (e.g. 0.5) only partly close the gap, which repeats rare examples less often and
    over-fits them less.

    Args:
        class_counts: ``{class: number of training examples}``.
        power: Strength, in ``[0, 1]``.

    Returns:
        ``{class: factor >= 1}`` for the classes with at least one example (the largest class gets 1).

    Raises:
        ValueError: for a power outside ``[0, 1]``, a negative count, or no examples at all.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"oversampling power must be in [0, 1], got {power}")
    counts = _checked_counts(class_counts)
    largest = max(counts.values())
    return {c: (largest / n) ** power for c, n in counts.items()}


def oversampled_indices(classes: Sequence[str], factors: Mapping[str, float], seed: int = 0) -> np.ndarray:
    """Row indices of one oversampled epoch: each row ``floor(f)`` times, plus once more with probability ``f % 1``.

    Args:
        classes: [n] the class of each row (``Task.class_of``).
        factors: ``{class: factor}`` from :func:`oversampling_factors`.
        seed: Seed of the fractional draws (the same seed gives the same epoch).

    Returns:
        int64[m] row indices in ascending order (the training loop shuffles); ``m >= n``.

    Raises:
        KeyError: naming the class, for a row whose class has no factor.
    """
    rng = np.random.default_rng(seed)
    repeats = np.empty(len(classes), dtype=np.int64)
    for i, name in enumerate(classes):
        if name not in factors:
            raise KeyError(f"row {i}: class {name!r} has no oversampling factor (known: {sorted(factors)})")
        whole, fraction = divmod(float(factors[name]), 1.0)
        repeats[i] = int(whole) + int(rng.random() < fraction)
    return np.repeat(np.arange(len(classes), dtype=np.int64), repeats)


def weighted_answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over examples of each example's mean token cross-entropy on its answer tokens.

    As in the model's own causal-LM loss, position ``t`` of ``logits`` predicts ``labels[t + 1]`` and positions with
    ``labels == -100`` (the prompt, padding) are skipped; computed in float32. Each example's loss is the mean over
    its own answer tokens, so a long answer does not outweigh a short one; the batch loss is
    ``sum_i w_i * loss_i / sum_i w_i``. For a batch of one this is exactly the model's loss, whatever the weight.

    Args:
        logits: float[B, L, V] model output logits.
        labels: int64[B, L] target ids, ``-100`` where no loss is taken.
        weights: float[B] per-example weights (e.g. :func:`class_weights` of each example's class), >= 0.

    Returns:
        Scalar loss tensor (differentiable w.r.t. ``logits``).

    Raises:
        ValueError: on mismatched shapes, a negative weight, an example without answer tokens, or all-zero weights.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or weights.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits [B, L, V], labels [B, L], weights [B]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be >= 0, got {weights.tolist()}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    tokens = mask.sum(dim=1)
    if bool((tokens == 0).any()):
        empty = (tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"examples {empty} have no answer tokens (labels all -100): truncated or mis-masked")
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
    )  # [B, L-1]
    per_example = (token_loss * mask).sum(dim=1) / tokens
    weights = weights.to(per_example.dtype)
    total = weights.sum()
    if not math.isfinite(float(total)) or float(total) <= 0:
        raise ValueError(f"weights must have a positive finite sum, got {weights.tolist()}")
    return (weights * per_example).sum() / total


def _checked_counts(class_counts: Mapping[str, int]) -> dict[str, int]:
    negative = {c: n for c, n in class_counts.items() if n < 0}
    if negative:
        raise ValueError(f"class counts must be >= 0, got {negative}")
    counts = {c: int(n) for c, n in class_counts.items() if n > 0}
    if not counts:
        raise ValueError(f"no class has any example: {dict(class_counts)}")
    return counts
