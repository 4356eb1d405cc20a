"""The Ray Train worker: get checkpoint -> restore -> loop -> report.

Every worker loads the base model (4-bit when configured) from the path the driver resolved, attaches LoRA, wraps
it in an engine (:mod:`opsvlm.train.engine`) and runs :class:`opsvlm.train.step.StepRunner` steps over rows read by
id from the driver's Arrow blocks in Ray's object store, in the per-epoch order of :mod:`opsvlm.train.order`. A
checkpoint holds the adapter, the optimizer/scheduler/scaler state, the step counters with the data cursor, and
every rank's RNG state, so a run resumed after a worker (or driver) death takes the same steps on the same rows with
the same dropout masks as one that never stopped. Rank 0 writes per-step metrics to MLflow through a buffer that
outlives MLflow outages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opsvlm.config import from_dict, to_dict
from opsvlm.model import build
from opsvlm.model import checkpoint as ckpt
from opsvlm.model.prompt import collate, encode_row
from opsvlm.tasks.base import Task, get_task
from opsvlm.train.config import TrainConfig
from opsvlm.train.engine import DDP_KWARGS, DDPEngine, DeepSpeedEngine, Engine, LocalEngine
from opsvlm.train.order import epoch_order, locate, micro_batches, step_ids, usable_rows
from opsvlm.train.step import (
    Precision,
    StepPlan,
    StepRunner,
    TrainState,
    make_optimizer,
    make_scheduler,
    plan_steps,
    upcast_trainable,
)
from opsvlm.video.sampling import SamplingSpec

__all__ = ["PENDING_METRICS_FILE", "RowSource", "train_loop_per_worker"]

logger = logging.getLogger(__name__)
PENDING_METRICS_FILE = "pending_metrics.json"  # rank 0's metrics MLflow did not take; the driver writes them


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker function. ``loop_config``: ``config`` (TrainConfig dict), ``run_id``, ``tracking_uri``,
    ``task``, ``base_source`` (the resolved base model), ``sampling_spec``, ``class_weights``, ``train_blocks`` and
    ``val_blocks`` (``[block refs, block sizes]``), ``kill_marker``, ``driver_pid``."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # DeepSpeed insists on it
    run = _Run.build(loop_config, rank, world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.restore(directory)
    metrics = _MetricLog.start(loop_config, run) if rank == 0 else None
    train = RowSource(*loop_config["train_blocks"])
    optim, state, plan = run.config.optim, run.state, run.plan
    while state.step < plan.total_steps:
        order = epoch_order(train.num_rows, run.config.seed, state.epoch)
        while state.step < plan.total_steps:
            ids = step_ids(order, state.cursor, rank, world, optim.micro_batch * optim.grad_accum)
            if not len(ids):
                break
            started = time.perf_counter()
            chunks = micro_batches(ids, optim.micro_batch)
            batches = (run.encode(train.rows(chunk)) for chunk in chunks)
            result = run.runner.train_step(batches, [len(c) for c in chunks], state)
            state.cursor += len(ids) * world
            if metrics is not None:
                metrics.step(result, run, time.perf_counter() - started, world)
            _inject_faults(run, loop_config, rank, world, after_checkpoint=False)
            if state.step % run.config.checkpoint_every_steps == 0 and state.step < plan.total_steps:
                run.save_and_report({"step": state.step, "epoch": state.epoch}, metrics)
                _inject_faults(run, loop_config, rank, world, after_checkpoint=True)
        val_loss = run.validation_loss(RowSource(*loop_config["val_blocks"]))
        if metrics is not None and val_loss is not None:
            metrics.buffer.add({"val_loss": val_loss}, step=state.step)
        if state.cursor >= usable_rows(train.num_rows, world):  # the epoch is done (not stopped at max_steps)
            state.epoch, state.cursor = state.epoch + 1, 0
            if state.step < plan.total_steps:
                run.save_and_report({"step": state.step, "epoch": state.epoch, "val_loss": val_loss}, metrics)
    final = {"step": state.step, "planned_steps": plan.total_steps, "epoch": state.epoch}
    final.update(skipped_steps=state.skipped_steps, **_peak_rss_by_rank())
    if run.runner.loss_scale is not None:
        final["loss_scale"] = run.runner.loss_scale
    if torch.cuda.is_available():
        final["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if metrics is not None:
        metrics.buffer.add({k: v for k, v in final.items() if k.startswith("peak_rss_mb_rank")}, step=state.step)
    run.save_and_report(final, metrics, final=True)
    if metrics is not None:
        metrics.end()


# --- rows by id ---------------------------------------------------------------------------------------------------


class RowSource:
    """Rows by global id from Arrow blocks in Ray's object store (zero-copy on the blocks' node; fetched once).

    Args:
        refs: ``ObjectRef[pyarrow.Table]`` per block, in row-id order.
        sizes: Rows per block.
    """

    def __init__(self, refs: list, sizes: list[int]) -> None:
        self._refs, self._sizes = list(refs), [int(n) for n in sizes]
        self._tables: dict[int, Any] = {}
        self.num_rows = sum(self._sizes)

    def rows(self, ids) -> list[dict]:
        """The rows with these ids, in that order."""
        import ray

        blocks, offsets = locate(np.asarray(ids), self._sizes)
        out = []
        for block, offset in zip(blocks.tolist(), offsets.tolist(), strict=True):
            if block not in self._tables:
                self._tables[block] = ray.get(self._refs[block])
            out.append(self._tables[block].slice(offset, 1).to_pylist()[0])
        return out


# --- one worker's training state ----------------------------------------------------------------------------------


@dataclass
class _Run:
    config: TrainConfig
    loop_config: dict
    task: Task
    rank: int
    device: torch.device
    processor: Any
    peft_model: Any
    report: dict
    engine: Engine
    runner: StepRunner
    plan: StepPlan
    state: TrainState
    class_weights: dict | None

    @classmethod
    def build(cls, loop_config: dict, rank: int, world: int) -> _Run:
        import ray.train.torch

        config = from_dict(TrainConfig, loop_config["config"])
        torch.manual_seed(config.seed)
        device = ray.train.torch.get_device()
        base_config = dataclasses.replace(config.model, name=loop_config["base_source"])
        processor = build.load_processor(base_config.name)
        device_map = {"": device} if base_config.quantization == "nf4" and device.type == "cuda" else None
        base = build.load_base_model(base_config, device_map=device_map)
        model, report = build.prepare_for_training(base, base_config, device_map=device_map or str(device))
        model.to(device)
        upcast_trainable(model)
        dtype = build.resolve_compute_dtype(config.model.compute_dtype, device)
        optim = config.optim
        rows_per_worker = usable_rows(sum(loop_config["train_blocks"][1]), world) // world
        plan = plan_steps(rows_per_worker, optim.micro_batch, optim.grad_accum, optim.epochs, optim.max_steps)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], optim)
        scheduler = make_scheduler(optimizer, optim.warmup_ratio, plan.total_steps)
        if config.scaling.zero_stage:
            build.check_zero_compat(config.model.quantization, config.scaling.zero_stage)
            if dtype == torch.float16 and report["fp32_modules"]:
                raise ValueError("model.fp32_modules cannot be kept in fp32 under DeepSpeed fp16: set it to []")
            engine: Engine = DeepSpeedEngine.create(model, optimizer, optim, config.scaling.zero_stage, dtype)
        elif world > 1:
            wrapped = ray.train.torch.prepare_model(
                model, move_to_device=False, parallel_strategy="ddp", parallel_strategy_kwargs=DDP_KWARGS
            )
            engine = DDPEngine(wrapped)
        else:
            engine = LocalEngine(model)
        precision = Precision.for_run(device, dtype, engine_scales=engine.scales_loss)
        runner = StepRunner(
            engine.model, optimizer, scheduler, precision, grad_clip=optim.grad_clip, engine=engine,
            advice=build.nan_advice(dtype),
        )  # fmt: skip
        task = get_task(loop_config["task"])
        return cls(
            config, loop_config, task, rank, device, processor, model, report, engine, runner, plan, TrainState(),
            loop_config.get("class_weights"),
        )  # fmt: skip

    def restore(self, directory: str) -> None:
        """Adapter, optimizer/scheduler/scaler (or DeepSpeed's state), counters and this rank's RNG state."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = load_file(str(Path(directory) / ckpt.ADAPTER_DIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.peft_model, adapter)
        saved = ckpt.load_trainer_state(directory)
        self.engine.load(directory)
        self.runner.load_state_dict(saved)
        self.state = TrainState.from_dict(saved["state"])
        ckpt.load_rng_state(directory, self.rank)

    def encode(self, rows: list[dict]) -> tuple[dict, torch.Tensor | None]:
        """A micro-batch on the device, with per-row class weights when the loss is class-weighted."""
        pad_id = self.processor.tokenizer.pad_token_id
        batch = collate([encode_row(self.processor, r, self.task) for r in rows], pad_id)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.class_weights is None:
            return batch, None
        return batch, torch.tensor([self.class_weights[self.task.class_of(r)] for r in rows], device=self.device)

    def save_and_report(self, metrics: dict, log: _MetricLog | None, final: bool = False) -> None:
        """Write this rank's part of a checkpoint, report it, and wait until every rank's report is committed."""
        import ray.train

        pending = log.flush(final, self.config.tracking.retry_for_s) if log is not None else []
        with tempfile.TemporaryDirectory() as directory:
            self.engine.save(directory)
            ckpt.save_rng_state(directory, self.rank)
            if self.rank == 0:
                ckpt.save_model_files(
                    directory,
                    self.peft_model,
                    self.processor,
                    base_model=self.config.model.name,
                    quantization=self.config.model.quantization,
                    compute_dtype=self.report["compute_dtype"],
                    spec=SamplingSpec(**self.loop_config["sampling_spec"]),
                    labels=list(self.task.labels),
                    task=self.task.name,
                    step=self.state.step,
                    config=to_dict(self.config),
                )
                ckpt.save_trainer_state(directory, {"state": self.state.to_dict(), **self.runner.state_dict()})
                if pending:
                    (Path(directory) / PENDING_METRICS_FILE).write_text(json.dumps(pending))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        # A checkpoint counts only once the controller has collected every rank's report; a worker dying right
        # after reporting would otherwise lose it and the restart would redo those steps.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    @torch.no_grad()
    def validation_loss(self, rows: RowSource) -> float | None:
        """Mean per-token loss over the validation rows, summed across all workers (``None`` without rows)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if rows.num_rows < world:
            return None
        model = self.engine.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for index in range(self.rank, usable_rows(rows.num_rows, world), world):
            batch, _ = self.encode(rows.rows([index]))
            with self.runner.precision.autocast():
                loss = model(**batch, use_cache=False).loss
            tokens = int((batch["labels"] != -100).sum())
            total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
        model.train()
        if torch.distributed.is_initialized():
            reduced = total.to(self.device) if self.device.type == "cuda" else total
            torch.distributed.all_reduce(reduced)
            total = reduced.cpu()
        return float(total[0] / total[1]) if total[1] > 0 else None


# --- rank 0's MLflow ------------------------------------------------------------------------------------------------


class _MetricLog:
    """Rank 0's per-step metrics (buffered, outage-tolerant) and its MLflow run for system metrics."""

    def __init__(self, buffer, mlflow) -> None:
        self.buffer, self.mlflow = buffer, mlflow

    @classmethod
    def start(cls, loop_config: dict, run: _Run) -> _MetricLog:
        from opsvlm.tracking import MetricBuffer

        # An outage must cost a write, not minutes of MLflow's own retries while every worker waits.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        config = run.config
        buffer = MetricBuffer(loop_config["run_id"], loop_config["tracking_uri"], config.tracking.log_every_steps)
        mlflow = None
        try:
            import mlflow

            mlflow.set_tracking_uri(loop_config["tracking_uri"])
            mlflow.start_run(run_id=loop_config["run_id"], log_system_metrics=config.tracking.log_system_metrics)
            if run.state.step == 0:
                mlflow.log_params({f"model_report.{k}": v for k, v in run.report.items()})
        except Exception as exc:  # MLflow down: train anyway; the step metrics are buffered
            logger.warning("MLflow unavailable at start (%s): no system metrics for this attempt", exc)
        return cls(buffer, mlflow)

    def step(self, result, run: _Run, seconds: float, world: int) -> None:
        values = {
            "train_loss": result.loss,
            "learning_rate": run.runner.scheduler.get_last_lr()[0],
            "samples_per_s": result.rows * world / seconds,
            "tokens_per_s": result.tokens * world / seconds,
            "skipped_steps": run.state.skipped_steps,
        }
        if result.grad_norm is not None:
            values["grad_norm"] = result.grad_norm
        if result.loss_scale is not None:
            values["loss_scale"] = result.loss_scale
        self.buffer.add(values, step=run.state.step)

    def flush(self, final: bool, retry_for_s: float) -> list[dict]:
        """Write what is pending before a checkpoint; at the end keep trying, then hand the rest to the driver."""
        if not final:
            self.buffer.try_flush()
            return []
        return [] if self.buffer.flush_within(retry_for_s) else self.buffer.drain()

    def end(self) -> None:
        if self.mlflow is not None:
            try:
                self.mlflow.end_run()
            except Exception as exc:  # the driver sets the final status
                logger.warning("MLflow end_run failed: %s", exc)


# --- helpers --------------------------------------------------------------------------------------------------------


def _inject_faults(run: _Run, loop_config: dict, rank: int, world: int, after_checkpoint: bool) -> None:
    """Fault injection for resilience tests (``kill_worker_at_step``, ``kill_driver_at_step``): each at most once."""
    step = run.state.step
    if not after_checkpoint and run.config.kill_worker_at_step == step and rank == world - 1:
        marker = Path(loop_config["kill_marker"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, not an exception
    if after_checkpoint and run.config.kill_driver_at_step == step and rank == 0:
        marker = Path(loop_config["kill_marker"] + ".driver")
        if not marker.exists():
            marker.write_text(str(loop_config["driver_pid"]))
            os.kill(loop_config["driver_pid"], signal.SIGKILL)
            time.sleep(600)  # Ray ends this job's workers once it sees its driver gone


def _peak_rss_by_rank() -> dict[str, float]:
    """Every worker's peak RSS in MB (``peak_rss_mb_rank0``, ...) and the largest (``peak_rss_mb``). A collective
    when training is distributed: every rank must call it."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, own)
    else:
        gathered = [own]
    return {"peak_rss_mb": max(gathered), **{f"peak_rss_mb_rank{i}": value for i, value in enumerate(gathered)}}
