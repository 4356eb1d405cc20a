"""Data-parallel engines behind one interface: one process, DDP, or DeepSpeed ZeRO. No Ray here.

:class:`opsvlm.train.step.StepRunner` drives every engine the same way: forward on ``engine.model``, one backward per
micro-batch (``no_sync`` on all but the step's last under DDP), one optimizer step. What differs:

* :class:`LocalEngine` / :class:`DDPEngine`: torch's optimizer, autocast and (fp16) ``GradScaler`` in the runner.
  DDP all-reduces gradients once per optimizer step (the last micro-batch's backward).
* :class:`DeepSpeedEngine`: DeepSpeed owns the optimizer and gradient reduction. The runner marks each step's last
  micro-batch as the accumulation boundary, so an epoch's short last step is stepped as well. fp16 uses DeepSpeed's
  own dynamic loss scaling (configured in :func:`deepspeed_config`; DeepSpeed casts the module to fp16 and keeps fp32
  master weights in its optimizer); bf16 and fp32 run an fp32 engine under torch autocast, like DDP.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DDP_KWARGS",
    "DDPEngine",
    "DeepSpeedEngine",
    "Engine",
    "LocalEngine",
    "deepspeed_config",
    "loss_scaling_config",
]

# DDP options. Module buffers here are constants (rotary inverse frequencies, synced once when DDP wraps the model);
# re-broadcasting them from rank 0 before every forward is one more blocking collective per micro-batch that changes
# nothing. Gradients as views into the all-reduce buckets save a copy of the trainable gradients (memory). Frozen
# parameters (the base model) get no gradient hooks or buckets: DDP registers only those with requires_grad.
DDP_KWARGS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}


def loss_scaling_config() -> dict[str, Any]:
    """DeepSpeed's dynamic fp16 loss scaling, set explicitly (the values torch's ``GradScaler`` starts from).

    ``loss_scale: 0`` = dynamic; start at 2**16, halve on overflow (after ``hysteresis`` overflows), double after
    ``loss_scale_window`` clean steps, never below ``min_loss_scale``.
    """
    return {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
    }


def deepspeed_config(optim, zero_stage: int, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config for ``OptimSettings`` and a ZeRO stage.

    fp16 enables DeepSpeed's fp16 mode with dynamic loss scaling; bf16 and fp32 leave DeepSpeed in fp32 (the
    forward runs under torch autocast, as with DDP). ``gradient_accumulation_steps`` is informational: the runner sets
    each step's boundary itself (an epoch's tail step has fewer micro-batches).
    """
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False},
        "fp16": loss_scaling_config() if compute_dtype == torch.float16 else {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }


class Engine:
    """The interface the runner uses. ``model`` is what the forward runs on.

    Attributes:
        owns_optimizer: The engine steps the optimizer itself (DeepSpeed).
        scales_loss: The engine does fp16 loss scaling itself (DeepSpeed fp16).
    """

    owns_optimizer = False
    scales_loss = False

    def __init__(self, model) -> None:
        self.model = model

    def no_sync(self):
        """Context for a micro-batch that is not the step's last: skip the gradient all-reduce if the engine can."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, share: float) -> None:  # pragma: no cover - DeepSpeed only
        raise NotImplementedError

    def micro_step(self, last: bool) -> None:  # pragma: no cover - DeepSpeed only
        raise NotImplementedError

    def last_step_skipped(self) -> bool:
        return False

    def loss_scale(self) -> float | None:
        return None

    def save(self, directory: str | Path) -> None:
        """Write the engine's own state (DeepSpeed: every rank's optimizer partition)."""

    def load(self, directory: str | Path) -> None:
        """Read what :meth:`save` wrote."""


class LocalEngine(Engine):
    """One process: the model itself."""


class DDPEngine(Engine):
    """torch DDP; gradients all-reduced on the last micro-batch of each step only."""

    def no_sync(self):
        return self.model.no_sync()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 2/3 (initialized by :meth:`create`).

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``.
        fp16: DeepSpeed's fp16 mode (its loss scaling) is on.
    """

    owns_optimizer = True
    CHECKPOINT_DIR = "ds"
    TAG = "zero"  # tag "latest" would collide with DeepSpeed's own "latest" pointer file

    def __init__(self, engine, fp16: bool) -> None:
        super().__init__(engine)
        self.scales_loss = fp16
        self._skipped_before = engine.skipped_steps

    @classmethod
    def create(cls, model, optimizer, optim, zero_stage: int, compute_dtype: torch.dtype) -> DeepSpeedEngine:
        import deepspeed

        config = deepspeed_config(optim, zero_stage, compute_dtype)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return cls(engine, fp16=compute_dtype == torch.float16)

    def backward(self, loss: torch.Tensor, share: float) -> None:
        # the runner's row share replaces DeepSpeed's fixed 1/gradient_accumulation_steps
        self.model.backward(loss * share, scale_wrt_gas=False)

    def micro_step(self, last: bool) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        if last:
            self._skipped_before = self.model.skipped_steps
            self.model.step()

    def last_step_skipped(self) -> bool:
        return self.model.skipped_steps > self._skipped_before

    def loss_scale(self) -> float | None:
        if not self.scales_loss:
            return None
        return float(getattr(self.model.optimizer, "cur_scale", getattr(self.model.optimizer, "loss_scale", 0.0)))

    def save(self, directory: str | Path) -> None:
        # frozen base weights are excluded (they come from from_pretrained again)
        self.model.save_checkpoint(
            str(Path(directory) / self.CHECKPOINT_DIR), tag=self.TAG, exclude_frozen_parameters=True
        )

    def load(self, directory: str | Path) -> None:
        """DeepSpeed's checkpoint, read with ``weights_only=True`` (DeepSpeed's own loader unpickles anything)."""
        checkpoint_engine = self.model.checkpoint_engine
        unsafe_load = checkpoint_engine.load

        def load(path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_state_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)

        checkpoint_engine.load = load
        try:
            self.model.load_checkpoint(
                str(Path(directory) / self.CHECKPOINT_DIR), load_module_strict=False, load_lr_scheduler_states=False
            )
        finally:
            checkpoint_engine.load = unsafe_load


def _deepspeed_state_classes() -> list:
    """The plain-data DeepSpeed classes its checkpoints hold (loss scalers, ZeRO fragment addresses): allowlisted for
    ``weights_only`` loading; nothing else unpickles."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]
