"""The training job's typed configuration (loaded from ``jobs/configs/*.yaml`` with ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from opsvlm.model.build import ModelConfig, check_zero_compat
from opsvlm.model.plan import PlanInputs
from opsvlm.types import OPTIMIZERS

__all__ = ["DataSettings", "OptimSettings", "ScalingSettings", "TrackingSettings", "TrainConfig"]


@dataclass(frozen=True)
class DataSettings:
    """Which prepared clips to train on (the output folder of ``jobs/prepare_data.py``).

    Rows are read with Ray Data into Ray's object store (spilled to disk when larger than memory) before training
    starts; every epoch then visits them in a seeded permutation of row ids (:mod:`opsvlm.train.order`): a full
    shuffle, the same after a restart on any number of workers.

    Attributes:
        prepared: Folder holding ``manifest.json`` and ``clips/split=*/``.
        train_split: Split to train on.
        val_split: Split for the per-epoch validation loss.
        max_train_clips: Use at most this many training clips (quick runs); ``None`` = all.
        max_val_clips: Use at most this many validation clips.
        class_weighting: Class-weighted loss against class imbalance: ``none`` (the model's own loss),
            ``inverse_frequency`` or ``sqrt_inverse`` (weights from the training split's class counts, mean 1;
            see ``opsvlm.train.weighting``). The task says what a row's class is.
        oversample_power: Oversampling of rare classes, in [0, 1]: 0 = off; otherwise each row is repeated
            ``round((n_max / n_class) ** power)`` times per epoch (1 evens the classes out).
    """

    prepared: str = ""
    train_split: str = "train"
    val_split: str = "val"
    max_train_clips: int | None = None
    max_val_clips: int | None = None
    class_weighting: str = "none"
    oversample_power: float = 0.0

    def __post_init__(self) -> None:
        from opsvlm.train.weighting import WEIGHT_SCHEMES

        if self.class_weighting not in WEIGHT_SCHEMES:
            choices = list(WEIGHT_SCHEMES)
            raise ValueError(f"data.class_weighting must be one of {choices}, got {self.class_weighting!r}")
        if not 0 <= self.oversample_power <= 1:
            raise ValueError(f"data.oversample_power must be in [0, 1], got {self.oversample_power}")


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and schedule.

    Attributes:
        lr: Peak learning rate (after linear warm-up, then cosine decay to 0).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the optimizer steps spent warming up.
        epochs: Passes over the training split.
        micro_batch: Clips per worker per forward pass.
        grad_accum: Micro-batches per optimizer step; global batch = micro_batch x grad_accum x num_workers.
        max_steps: Stop after this many optimizer steps (``None``: run all epochs).
        grad_clip: Max gradient norm (0 disables clipping).
        optimizer: ``adamw`` (torch), or bitsandbytes ``adamw_8bit`` / ``paged_adamw_8bit`` (GPU).
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    max_steps: int | None = None
    grad_clip: float = 1.0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("optim.epochs, optim.micro_batch and optim.grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")


@dataclass(frozen=True)
class ScalingSettings:
    """How many Ray Train workers, on what, and with which data-parallel engine.

    Attributes:
        num_workers: Training workers (one per GPU on a GPU cluster).
        use_gpu: One GPU per worker.
        cpus_per_worker: CPUs reserved per worker; fractions leave room for Ray Data on small machines.
        gpu_type: GPU the memory planner checks against before any worker starts (``T4``, ``A10G``, ``L4``,
            ``A100-40``, ``A100-80``, ``H100-80``); ``None`` skips the check (CPU runs).
        zero_stage: 0 = plain DDP; 2 or 3 = DeepSpeed ZeRO stage (3 is rejected with a 4-bit base).
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpu_type: str | None = None
    zero_stage: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.zero_stage not in (0, 2, 3):
            raise ValueError(f"scaling.zero_stage must be 0, 2 or 3, got {self.zero_stage}")


@dataclass(frozen=True)
class TrackingSettings:
    """MLflow tracking.

    Attributes:
        tracking_uri: An MLflow server URL (``http://127.0.0.1:5000``) or store URI; empty = a local SQLite store in
            ``./mlruns`` (the embedded default).
        experiment: Experiment name.
        run_name: Run name (empty: MLflow picks one).
        log_system_metrics: Log CPU/GPU/memory utilisation from the rank-0 worker.
        log_every_steps: Rank 0 buffers the per-step metrics (each keeps its own step and timestamp) and writes them
            to MLflow in one batch every this many optimizer steps, and always before a checkpoint, at the end of an
            epoch, at the end of training and before it stops on an error. A synchronous write per step stalls every
            worker at the next all-reduce; 1 writes every step. Steps buffered when a worker dies are not lost for
            good: training resumes from the latest checkpoint, before which everything was written, and redoes them.
            A write that fails (MLflow down) keeps its values for the next try; training goes on.
        retry_for_s: How long MLflow calls are retried during an outage where they must succeed: rank 0's last
            metric write (past it, the values travel in the final checkpoint and the driver writes them), and the
            driver's run reopening and final upload.
    """

    tracking_uri: str = ""
    experiment: str = "opsvlm"
    run_name: str = ""
    log_system_metrics: bool = True
    log_every_steps: int = 10
    retry_for_s: float = 600.0

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError(f"tracking.log_every_steps must be >= 1, got {self.log_every_steps}")
        if self.retry_for_s < 0:
            raise ValueError(f"tracking.retry_for_s must be >= 0, got {self.retry_for_s}")


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of ``jobs/train.py``.

    Attributes:
        model: Base model, quantization and LoRA.
        data: Prepared clips.
        optim: Optimizer and schedule.
        scaling: Workers and distribution.
        tracking: MLflow.
        checkpoint_every_steps: Save a resumable checkpoint every N optimizer steps (and always at the end).
        keep_checkpoints: Checkpoints Ray Train keeps (the latest ones).
        max_failures: Worker-group restarts allowed; each resumes from the latest checkpoint.
        storage_path: Where Ray Train persists checkpoints (shared storage on a cluster); empty = ``./outputs/ray``.
        seed: Seed for weights init of LoRA and data order.
        kill_worker_at_step: Fault injection for resilience tests: the last worker SIGKILLs itself once after this
            optimizer step (a marker file in the storage path makes it happen only once). ``None`` in real runs.
        kill_driver_at_step: Fault injection: rank 0 SIGKILLs the driver process once after the checkpoint of this
            step is committed (same node only; ``jobs/train.py --resume`` continues the run). ``None`` in real runs.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    storage_path: str = ""
    seed: int = 0
    kill_worker_at_step: int | None = None
    kill_driver_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        # refuse before any worker starts, also on CPU runs where the memory planner is skipped
        check_zero_compat(self.model.quantization, self.scaling.zero_stage)
        if self.scaling.zero_stage and self.model.compute_dtype == "float16" and self.model.fp32_modules:
            raise ValueError(
                "model.fp32_modules cannot be kept in fp32 under DeepSpeed fp16 (it casts the whole model to fp16 and "
                "scales the loss itself): set model.fp32_modules=[] or use scaling.zero_stage=0 (DDP + GradScaler)"
            )

    def plan_inputs(
        self, model: str, frames_per_clip: int, frame_height: int, frame_width: int, micro_batch: int | None
    ) -> PlanInputs:
        """What the memory planner needs to judge this run on ``scaling.gpu_type``.

        Args:
            model: The model source the planner reads (a hub id or a local directory: ``model.name`` resolved).
            frames_per_clip: Frames per clip of the training data.
            frame_height: Frame height after sampling, pixels.
            frame_width: Frame width after sampling, pixels.
            micro_batch: The micro-batch to evaluate; ``None`` lets the planner choose one for the global batch.
        """
        return PlanInputs(
            model=model,
            gpu=self.scaling.gpu_type,
            quantization=self.model.quantization,
            lora_rank=self.model.lora.rank,
            lora_targets=self.model.lora.targets,
            frames_per_clip=frames_per_clip,
            frame_height=frame_height,
            frame_width=frame_width,
            micro_batch=micro_batch,
            global_batch=self.optim.micro_batch * self.optim.grad_accum * self.scaling.num_workers,
            num_gpus=self.scaling.num_workers,
            gradient_checkpointing=self.model.gradient_checkpointing,
            optimizer=self.optim.optimizer,
            zero_stage=self.scaling.zero_stage,
        )
