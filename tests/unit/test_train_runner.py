"""``opsvlm.train.step.StepRunner`` called directly (no Ray): exact accumulation with an epoch tail, fp16 loss scaling
on CPU (skipped steps vs divergence), the per-epoch row order and its cursor, safe checkpoint loading.

Toy models keep the hand computations exact and fast; the tiny Qwen2.5-VL runs are in ``test_train_precision.py``.
"""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opsvlm.model import checkpoint as ckpt
from opsvlm.train.engine import LocalEngine
from opsvlm.train.order import epoch_order, locate, micro_batches, step_ids, usable_rows
from opsvlm.train.step import DivergedError, Precision, StepRunner, TrainState, plan_steps


class Toy(torch.nn.Module):
    """``loss = mean((x @ w - y) ** 2)``; the interface the runner expects (keyword batch, ``.loss``)."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(1.0, dim + 1))

    def forward(self, x, y, attention_mask, use_cache=False):
        return SimpleNamespace(loss=((x @ self.w - y) ** 2).mean())


def toy_batch(rows: np.ndarray, dim: int = 3) -> dict:
    """A deterministic micro-batch for the given row ids (row i: x = (i+1) * [1, -0.5, 0.25, ...], y = i)."""
    ids = torch.as_tensor(rows, dtype=torch.float32)
    x = (ids[:, None] + 1) * torch.tensor([(-0.5) ** k for k in range(dim)])
    return {"x": x, "y": ids, "attention_mask": torch.ones(len(rows), 2, dtype=torch.long)}


def sgd_runner(model, precision=None, **kwargs) -> StepRunner:
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # a step subtracts the gradient: easy to check
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return StepRunner(model, optimizer, scheduler, precision or Precision.for_run("cpu", torch.float32), **kwargs)


# --- exact accumulation -------------------------------------------------------------------------------------------


def test_grad_accum_3_steps_an_epoch_tail_with_hand_computed_gradients() -> None:
    # 7 rows, micro-batch 1, grad_accum 3: micro-batches 3 + 3 + 1 per epoch. The tail is a step of its own, scaled
    # as a whole step (its one micro-batch has weight 1, not 1/3), and nothing leaks into the next epoch.
    rows, micro_batch, accum, epochs = 7, 1, 3, 2
    plan = plan_steps(rows, micro_batch, accum, epochs, None)
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps) == (7, 3, 6)

    model, state = Toy(), TrainState()
    runner = sgd_runner(model)
    for epoch in range(epochs):
        order = epoch_order(rows, seed=0, epoch=epoch)
        state.cursor = 0
        while len(ids := step_ids(order, state.cursor, 0, 1, micro_batch * accum)):
            chunks = micro_batches(ids, micro_batch)
            before = model.w.detach().clone()
            # the hand computation: d/dw of the row-weighted mean of the micro-batch losses, from scratch
            w = before.clone().requires_grad_(True)
            expected = sum(
                len(c) / len(ids) * ((toy_batch(c)["x"] @ w - toy_batch(c)["y"]) ** 2).mean() for c in chunks
            )
            (grad,) = torch.autograd.grad(expected, w)
            result = runner.train_step(((toy_batch(c), None) for c in chunks), [len(c) for c in chunks], state)
            state.cursor += len(ids)
            torch.testing.assert_close(before - model.w.detach(), grad, rtol=1e-6, atol=1e-6)
            assert result.loss == pytest.approx(expected.item(), rel=1e-6) and not result.skipped
            assert all(p.grad is None for p in model.parameters())  # zeroed: nothing carried into the next step
    assert state.step == plan.total_steps == 6 and state.skipped_steps == 0


def test_micro_batches_of_unequal_size_are_weighted_by_rows() -> None:
    model = Toy()
    runner = sgd_runner(model)
    big, small = np.array([0, 1, 2]), np.array([3])
    w = model.w.detach().clone().requires_grad_(True)
    expected = sum(n / 4 * ((toy_batch(c)["x"] @ w - toy_batch(c)["y"]) ** 2).mean() for c, n in ((big, 3), (small, 1)))
    (grad,) = torch.autograd.grad(expected, w)
    before = model.w.detach().clone()
    runner.train_step([(toy_batch(big), None), (toy_batch(small), None)], [3, 1])
    torch.testing.assert_close(before - model.w.detach(), grad)
    with pytest.raises(ValueError, match="micro-batches"):
        runner.train_step([(toy_batch(big), None)], [3, 1])


# --- fp16 loss scaling vs divergence ------------------------------------------------------------------------------


class Overflowing(Toy):
    """Overflows fp16 in the forward while ``scale`` is large (a linear layer under fp16 autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1e6

    def forward(self, x, y, attention_mask, use_cache=False):
        out = torch.nn.functional.linear(x * self.scale, self.w[None, :]).squeeze(-1) / self.scale
        return SimpleNamespace(loss=((out - y) ** 2).mean())


def test_fp16_on_cpu_uses_autocast_and_a_grad_scaler() -> None:
    precision = Precision.for_run("cpu", torch.float16)
    assert isinstance(precision.scaler, torch.amp.GradScaler) and precision.loss_scale == 2.0**16
    with precision.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
    assert Precision.for_run("cpu", torch.bfloat16).scaler is None
    assert Precision.for_run("cpu", torch.float32).scaler is None
    assert Precision.for_run("cpu", torch.float16, engine_scales=True).scaler is None  # DeepSpeed scales itself


def test_an_fp16_overflow_is_a_skipped_step_and_a_run_of_them_is_divergence() -> None:
    model = Overflowing()
    # through the engine interface the worker uses (one process: LocalEngine)
    runner = sgd_runner(
        model, Precision.for_run("cpu", torch.float16), max_consecutive_skips=3, engine=LocalEngine(model)
    )
    state = TrainState()
    before = model.w.detach().clone()
    result = runner.train_step([(toy_batch(np.array([1, 2])), None)], [2], state)
    assert result.skipped and not math.isfinite(result.loss)
    assert result.loss_scale == 2.0**15  # halved
    assert torch.equal(model.w.detach(), before)  # the optimizer step was skipped ...
    assert (state.step, state.skipped_steps, state.consecutive_skips) == (1, 1, 1)  # ... but the step is counted

    model.scale = 1.0  # the overflow goes away: a clean step resets the run of skips
    result = runner.train_step([(toy_batch(np.array([1, 2])), None)], [2], state)
    assert not result.skipped and math.isfinite(result.loss) and not torch.equal(model.w.detach(), before)
    assert (state.step, state.skipped_steps, state.consecutive_skips) == (2, 1, 0)

    model.scale = 1e6  # overflows every time: loss scaling cannot help
    runner.train_step([(toy_batch(np.array([1])), None)], [1], state)
    runner.train_step([(toy_batch(np.array([1])), None)], [1], state)
    with pytest.raises(DivergedError, match="3 fp16 steps in a row skipped"):
        runner.train_step([(toy_batch(np.array([1])), None)], [1], state)
    assert state.skipped_steps == 4


def test_without_a_scaler_a_non_finite_loss_is_divergence_at_once() -> None:
    model = Toy()
    runner = sgd_runner(model, advice="lower the learning rate")
    batch = toy_batch(np.array([1]))
    batch["y"] = torch.tensor([float("nan")])
    with pytest.raises(DivergedError, match=r"loss is nan at step 1\. lower the learning rate"):
        runner.train_step([(batch, None)], [1], TrainState())
    assert all(p.grad is None for p in model.parameters())


def test_scaler_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    model = Overflowing()
    runner = sgd_runner(model, Precision.for_run("cpu", torch.float16))
    state = TrainState()
    runner.train_step([(toy_batch(np.array([1])), None)], [1], state)  # skipped: scale 2**15
    ckpt.save_trainer_state(tmp_path, {"state": state.to_dict(), **runner.state_dict()})
    restored = sgd_runner(Overflowing(), Precision.for_run("cpu", torch.float16))
    saved = ckpt.load_trainer_state(tmp_path)
    restored.load_state_dict(saved)
    assert restored.loss_scale == 2.0**15 and TrainState.from_dict(saved["state"]) == state


def test_trainer_state_is_loaded_weights_only(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    (tmp_path / ckpt.STATE_FILE).write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_trainer_state(tmp_path)


# --- the row order ----------------------------------------------------------------------------------------------------


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    assert np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_usable_row_is_read_once_per_epoch_by_exactly_one_rank(world: int) -> None:
    rows, per_step = 23, 4
    order = epoch_order(rows, 0, 0)
    seen, cursor, steps = [], 0, 0
    while len(step_ids(order, cursor, 0, world, per_step)):
        parts = [step_ids(order, cursor, rank, world, per_step) for rank in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal rows per rank: DDP steps in lockstep
        seen += [i for p in parts for i in p.tolist()]
        cursor += len(parts[0]) * world
        steps += 1
    assert sorted(seen) == sorted(order[: usable_rows(rows, world)].tolist()) and len(set(seen)) == len(seen)
    assert steps == plan_steps(rows // world, 2, 2, 1, None).steps_per_epoch


def test_a_cursor_resumes_the_same_rows_and_survives_resharding() -> None:
    order = epoch_order(24, 0, 0)
    first = step_ids(order, 0, 0, 2, 3)
    assert np.array_equal(step_ids(order, 6, 1, 2, 3), order[7:12:2])  # rank 1's rows of the step at cursor 6
    # After 6 rows on 2 workers, 3 workers take the remaining 18 rows exactly once and none of the first 6.
    rest = [i for rank in range(3) for i in step_ids(order, 6, rank, 3, 6).tolist()]
    assert sorted(rest) == sorted(order[6:].tolist())
    assert not set(rest) & set(first.tolist())


def test_locate_maps_ids_to_blocks() -> None:
    blocks, offsets = locate(np.array([0, 2, 3, 9]), [3, 1, 6])
    assert blocks.tolist() == [0, 0, 1, 2] and offsets.tolist() == [0, 2, 0, 5]
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        locate(np.array([10]), [3, 1, 6])
