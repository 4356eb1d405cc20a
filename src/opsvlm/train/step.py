"""One optimizer step in plain torch: mixed precision, gradient accumulation, clipping, non-finite handling. No Ray.

:class:`StepRunner.train_step` takes the micro-batches of one optimizer step and runs them::

    runner = StepRunner(model, optimizer, scheduler, Precision.for_run(device, torch.float16), grad_clip=1.0)
    result = runner.train_step([(batch_a, None), (batch_b, None)], rows=[4, 4])  # forward/backward x2, one step

Mixed precision, per compute dtype (the same code on CPU and CUDA; torch has autocast and ``GradScaler`` for both):

* float32: no autocast, no scaler.
* bfloat16: forward under ``torch.autocast(bfloat16)``; no scaler (bf16 has fp32's exponent range).
* float16: forward under ``torch.autocast(float16)`` and a dynamic ``GradScaler``: the loss is multiplied by the
  scale before backward, gradients are unscaled before clipping, and a step whose gradients hold inf/NaN is
  skipped (the scale halves). Skipped steps are counted; they still consume their micro-batches and advance the
  schedule, so the run ends at its planned step count.
* DeepSpeed (``engine``): its own fp16 loss scaling (see :mod:`opsvlm.train.engine`); no torch scaler here.

The backward pass always runs outside the autocast block (autocast applies to the forward only). Trainable
parameters are kept in fp32 (:func:`upcast_trainable`): the scaler refuses fp16 gradients and Adam updates lose
precision in half.

Accumulation: each micro-batch's loss (its own mean) is weighted by its share of the step's rows, so an epoch's
short last step is scaled as a full one would be, and every micro-batch contributes to exactly one step.

Non-finite values: with a scaler, a non-finite gradient is a skipped step (expected now and then while the scale
settles); :class:`DivergedError` is raised once ``max_consecutive_skips`` steps in a row were skipped (the scale
keeps halving: the forward overflows, not just the gradients). Without a scaler any non-finite loss or gradient
norm raises :class:`DivergedError` at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from opsvlm.train.weighting import weighted_answer_loss

__all__ = [
    "DivergedError",
    "NonFiniteLossError",
    "Precision",
    "StepPlan",
    "StepResult",
    "StepRunner",
    "TrainState",
    "make_optimizer",
    "make_scheduler",
    "model_loss",
    "plan_steps",
    "upcast_trainable",
]

DEFAULT_MAX_CONSECUTIVE_SKIPS = 20  # 2**16 initial scale halved 20 times is below 1: the forward itself overflows


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient that loss scaling cannot explain; the message says what to do."""


class DivergedError(NonFiniteLossError):
    """Training diverged: a non-finite loss without a scaler, or too many fp16 steps skipped in a row."""


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches and optimizer steps a run takes (the same on every worker).

    Attributes:
        micro_per_epoch: Micro-batches per epoch per worker.
        steps_per_epoch: Optimizer steps per epoch (the last may take fewer micro-batches than ``grad_accum``).
        total_steps: Optimizer steps of the whole run.
        epochs: Epochs started (the last may stop early at ``max_steps``).
    """

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(rows_per_worker: int, micro_batch: int, grad_accum: int, epochs: int, max_steps: int | None) -> StepPlan:
    """The run's step plan: an epoch's tail (fewer than ``grad_accum`` micro-batches) is a step of its own.

    Raises:
        ValueError: ``rows_per_worker`` < 1.
    """
    if rows_per_worker < 1:
        raise ValueError(f"every worker needs at least one row, got {rows_per_worker}")
    micro = math.ceil(rows_per_worker / micro_batch)
    per_epoch = math.ceil(micro / grad_accum)
    total = max_steps or epochs * per_epoch
    return StepPlan(micro, per_epoch, total, math.ceil(total / per_epoch))


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint (plain ints: loads with ``weights_only=True``).

    Attributes:
        step: Optimizer steps taken (skipped fp16 steps included).
        epoch: Current epoch.
        cursor: Rows of the current epoch's global order consumed (all workers together).
        skipped_steps: fp16 steps skipped for non-finite gradients (the scaler lowered its scale).
        consecutive_skips: Skipped steps since the last taken one.
    """

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**{k: int(values[k]) for k in cls.__dataclass_fields__ if k in values})


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did.

    Attributes:
        loss: Row-weighted mean of the micro-batch losses (unscaled).
        grad_norm: Total gradient norm before clipping (unscaled); ``None`` without clipping or under DeepSpeed.
        skipped: The optimizer step was skipped (fp16 overflow).
        loss_scale: The scaler's scale after the step; ``None`` without loss scaling.
        rows: Rows in the step.
        tokens: Attended tokens (attention mask sum) in the step.
    """

    loss: float
    grad_norm: float | None
    skipped: bool
    loss_scale: float | None
    rows: int
    tokens: int


class Precision:
    """Autocast and loss scaling for one compute dtype on one device.

    Args:
        device: Where the model runs.
        dtype: The compute dtype (``float32``, ``bfloat16`` or ``float16``).
        scaler: A ``torch.amp.GradScaler`` (fp16 only) or ``None``.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.scaler = scaler

    @classmethod
    def for_run(cls, device: str | torch.device, dtype: torch.dtype, *, engine_scales: bool = False) -> Precision:
        """The precision a run uses: a ``GradScaler`` for fp16 unless the engine scales the loss itself."""
        device = torch.device(device)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and not engine_scales else None
        return cls(device, dtype, scaler)

    def autocast(self):
        """The forward pass's context: autocast in the compute dtype (disabled for fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None


def upcast_trainable(model: torch.nn.Module) -> int:
    """Cast every trainable parameter to fp32 (master weights); returns how many were cast.

    peft keeps LoRA weights fp32 already, but ``modules_to_save`` copies (e.g. ``lm_head``) keep the base dtype.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def make_optimizer(params, optim) -> torch.optim.Optimizer:
    """AdamW (torch) or a bitsandbytes 8-bit AdamW, from ``OptimSettings``."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    from opsvlm.model.quant import bnb_optimizer  # bitsandbytes stays inside model/quant.py

    return bnb_optimizer(optim.optimizer, params, lr=optim.lr, weight_decay=optim.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def model_loss(model, batch: dict, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The model's answer loss, or the class-weighted mean of per-example answer losses when weights are given."""
    outputs = model(**batch, use_cache=False)
    if weights is None:
        return outputs.loss
    return weighted_answer_loss(outputs.logits, batch["labels"], weights)


class StepRunner:
    """Runs optimizer steps over micro-batches; the only place that calls backward and step.

    Args:
        model: What the forward runs on (the plain model, the DDP wrapper, or the DeepSpeed engine).
        optimizer: The optimizer over the trainable parameters (ignored with an engine: it steps itself).
        scheduler: The LR scheduler, stepped once per optimizer step (also after a skipped one).
        precision: Autocast and scaler.
        grad_clip: Max total gradient norm (0: no clipping). DeepSpeed clips itself.
        engine: An :class:`opsvlm.train.engine.Engine` for DDP no-sync and DeepSpeed; ``None`` = one process.
        max_consecutive_skips: Skipped fp16 steps in a row before :class:`DivergedError`.
        advice: Appended to the divergence messages (e.g. :func:`opsvlm.model.build.nan_advice`).
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        precision: Precision,
        *,
        grad_clip: float = 0.0,
        engine=None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        advice: str = "",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.grad_clip = grad_clip
        self.engine = engine
        self.max_consecutive_skips = max_consecutive_skips
        self.advice = advice
        self.trainable = [p for p in _module_of(model).parameters() if p.requires_grad]

    # ---- state --------------------------------------------------------------------------------------------------

    @property
    def loss_scale(self) -> float | None:
        """The current dynamic loss scale (torch scaler or DeepSpeed), ``None`` without loss scaling."""
        if self.engine is not None and self.engine.scales_loss:
            return self.engine.loss_scale()
        return self.precision.loss_scale

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and scaler state (torch tensors and plain values; ``weights_only``-loadable)."""
        state: dict[str, Any] = {"scheduler": self.scheduler.state_dict()}
        if self.engine is None or not self.engine.owns_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(state["scaler"])

    # ---- the step -----------------------------------------------------------------------------------------------

    def train_step(
        self,
        micro_batches: Iterable[tuple[dict, torch.Tensor | None]],
        rows: Sequence[int],
        state: TrainState | None = None,
    ) -> StepResult:
        """One optimizer step over ``len(rows)`` micro-batches.

        Args:
            micro_batches: ``(batch, class_weights or None)`` per micro-batch, on the model's device (may be a
                generator: each is encoded only when needed).
            rows: Rows of each micro-batch; micro-batch ``i``'s loss is weighted ``rows[i] / sum(rows)``.
            state: Updated in place (``step``, ``skipped_steps``, ``consecutive_skips``) when given.

        Returns:
            The step's loss, gradient norm, whether it was skipped and the loss scale.

        Raises:
            DivergedError: non-finite loss or gradients without a scaler, or too many skipped steps in a row.
            ValueError: the number of micro-batches differs from ``len(rows)``.
        """
        total_rows = sum(rows)
        loss_sum, tokens, count = 0.0, 0, 0
        scaler = self.precision.scaler
        for index, (batch, weights) in enumerate(micro_batches):
            if index >= len(rows):
                raise ValueError(f"more micro-batches than the {len(rows)} given in rows")
            last = index == len(rows) - 1
            share = rows[index] / total_rows
            sync = self.engine.no_sync() if self.engine is not None and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    loss = model_loss(self.model, batch, weights)
                # backward outside autocast; the loss of this micro-batch weighted by its share of the step's rows
                if self.engine is not None and self.engine.owns_optimizer:
                    self.engine.backward(loss, share)
                elif scaler is not None:
                    scaler.scale(loss * share).backward()
                else:
                    (loss * share).backward()
            value = loss.item()
            if not math.isfinite(value) and scaler is None and not (self.engine and self.engine.scales_loss):
                self._zero_grad()
                raise DivergedError(f"loss is {value} at step {self._step_of(state) + 1}. {self.advice}".strip())
            loss_sum += value * share
            tokens += int(batch["attention_mask"].sum())
            count += 1
            if self.engine is not None and self.engine.owns_optimizer:
                self.engine.micro_step(last)
        if count != len(rows):
            raise ValueError(f"{count} micro-batches given, rows names {len(rows)}")
        grad_norm, skipped = self._optimizer_step()
        if state is not None:
            state.step += 1
            if skipped:
                state.skipped_steps += 1
                state.consecutive_skips += 1
            else:
                state.consecutive_skips = 0
            if state.consecutive_skips >= self.max_consecutive_skips:
                raise DivergedError(
                    f"{state.consecutive_skips} fp16 steps in a row skipped for non-finite gradients (loss scale now "
                    f"{self.loss_scale}, last loss {loss_sum}) at step {state.step}: the forward pass overflows, "
                    f"loss scaling cannot help. {self.advice}".strip()
                )
        return StepResult(loss_sum, grad_norm, skipped, self.loss_scale, total_rows, tokens)

    def _optimizer_step(self) -> tuple[float | None, bool]:
        if self.engine is not None and self.engine.owns_optimizer:
            self.scheduler.step()  # stepped here, not by DeepSpeed, so a skipped fp16 step advances it too
            return None, self.engine.last_step_skipped()
        scaler = self.precision.scaler
        grad_norm = None
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip))
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(self.optimizer)  # skips optimizer.step() if any gradient is inf/NaN
            scaler.update()
            skipped = scaler.get_scale() < before
        else:
            if grad_norm is not None and not math.isfinite(grad_norm):
                self._zero_grad()
                raise DivergedError(f"gradient norm is {grad_norm} with a finite loss. {self.advice}".strip())
            self.optimizer.step()
            skipped = False
        self.scheduler.step()  # also after a skipped step: the schedule follows the planned step count
        self._zero_grad()
        return grad_norm, skipped

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _step_of(state: TrainState | None) -> int:
        return state.step if state is not None else 0


def _module_of(model):
    """The module under a DDP wrapper or DeepSpeed engine."""
    return getattr(model, "module", model)
