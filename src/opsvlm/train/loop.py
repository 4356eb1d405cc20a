"""Ray Train: QLoRA / LoRA fine-tuning of a Qwen2-VL-family model on prepared clips.

``train_loop_per_worker`` runs on every worker: it loads the base model through ``from_pretrained`` (4-bit when
configured), attaches LoRA, wraps it in DDP or a DeepSpeed ZeRO engine, streams its shard of the clips from Ray
Data, and reports checkpoints. Rank 0 logs to MLflow. After a worker dies, Ray Train restarts the group and every
worker resumes from the latest checkpoint: adapter, optimizer, scheduler and the position inside the epoch, so no
optimizer step before that checkpoint is redone.

``fit`` is the driver side: datasets, trainer, MLflow run, final artifacts.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from opsvlm.config import from_dict, to_dict
from opsvlm.model import build
from opsvlm.tasks.base import get_task
from opsvlm.train import checkpoint as ckpt
from opsvlm.train.config import TrainConfig
from opsvlm.train.examples import collate, encode_row
from opsvlm.train.weighting import class_weights as weights_for_classes
from opsvlm.train.weighting import oversampling_factors, weighted_answer_loss
from opsvlm.video.sampling import SamplingSpec

# planner GPU names -> Ray accelerator types (ray.util.accelerators)
ACCELERATOR_TYPES = {
    "T4": "T4",
    "A10G": "A10G",
    "L4": "L4",
    "A100-40": "A100-40G",
    "A100-80": "A100-80G",
    "H100-80": "H100",
}
# DDP options. Module buffers here are constants (rotary inverse frequencies, synced once when DDP wraps the model);
# re-broadcasting them from rank 0 before every forward is one more blocking collective per micro-batch that changes
# nothing. Gradients as views into the all-reduce buckets save a copy of the trainable gradients (memory). Frozen
# parameters (the base model) get no gradient hooks or buckets: DDP registers only those with requires_grad.
DDP_KWARGS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message says what to change."""


# --- worker side ----------------------------------------------------------------------------------------------


def _make_optimizer(params, optim) -> torch.optim.Optimizer:
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    from opsvlm.model.quant import bnb_optimizer  # bitsandbytes stays inside model/quant.py

    return bnb_optimizer(optim.optimizer, params, lr=optim.lr, weight_decay=optim.weight_decay)


def _deepspeed_config(config: TrainConfig, compute_dtype: torch.dtype) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.optim.micro_batch,
        "gradient_accumulation_steps": config.optim.grad_accum,
        "gradient_clipping": config.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": config.scaling.zero_stage, "overlap_comm": False},
        "fp16": {"enabled": compute_dtype == torch.float16},
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }


def _batches(shard, micro_batch: int, limit_rows: int | None, shuffle_buffer: int = 0, seed: int = 0):
    """Micro-batches of clip rows from a worker's dataset shard (each a list of row dicts), locally shuffled with a
    fixed seed so a resumed epoch sees the same order and can skip what was already trained on."""
    seen = 0
    shuffle = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed} if shuffle_buffer else {}
    for table in shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=False, **shuffle):
        rows = table.to_pylist()
        if limit_rows is not None:
            rows = rows[: max(0, limit_rows - seen)]
        if not rows:
            return
        seen += len(rows)
        yield rows


def _autocast(device: torch.device, dtype: torch.dtype):
    # CPU runs in fp32 (no autocast); on GPU the LoRA weights stay fp32 and matmuls run in the compute dtype.
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker function. ``loop_config``: ``config`` (TrainConfig dict), ``run_id``, ``tracking_uri``,
    ``sampling_spec`` (dict), ``rows_per_worker`` and ``val_rows_per_worker`` (equal splits), ``kill_marker``."""
    import ray.train
    import ray.train.torch

    config = from_dict(TrainConfig, loop_config["config"])
    spec = SamplingSpec(**loop_config["sampling_spec"])
    task = get_task(loop_config["task"])
    class_weights = loop_config.get("class_weights")  # None: the model's own (unweighted) loss
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # DeepSpeed insists on it
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()

    # 1. model: base (4-bit if configured) + LoRA
    processor = build.load_processor(config.model.name)
    quantized_on_gpu = config.model.quantization == "nf4" and device.type == "cuda"
    base = build.load_base_model(config.model, device_map={"": device} if quantized_on_gpu else None)
    model, report = build.prepare_for_training(base, config.model)
    model.to(device)
    compute_dtype = build.resolve_compute_dtype(config.model.compute_dtype, device)
    optim = config.optim
    micro_per_epoch = math.ceil(loop_config["rows_per_worker"] / optim.micro_batch)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / optim.grad_accum))
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = _make_optimizer([p for p in model.parameters() if p.requires_grad], optim)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total_steps), total_steps)

    engine = None
    if config.scaling.zero_stage:
        import deepspeed

        build.check_zero_compat(config.model.quantization, config.scaling.zero_stage)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=_deepspeed_config(config, compute_dtype)
        )
        trained = engine
    elif world > 1:
        trained = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy="ddp", parallel_strategy_kwargs=DDP_KWARGS
        )
    else:
        trained = model
    peft_model = model  # the unwrapped module, for saving

    # 2. resume: adapter weights, optimizer, scheduler, position in the data
    step, epoch, batches_done = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(str(Path(directory) / ckpt.ADAPTER_DIR / "adapter_model.safetensors"))
            set_peft_model_state_dict(peft_model, adapter)
            state = ckpt.load_trainer_state(directory)
            if engine is not None:
                engine.load_checkpoint(str(Path(directory) / ckpt.DEEPSPEED_DIR), load_module_strict=False)
            else:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]

    mlflow = _start_mlflow(loop_config, config) if rank == 0 else None
    if mlflow is not None and checkpoint is None:
        mlflow.log_params({f"model_report.{k}": v for k, v in report.items()})
    metric_log = None  # rank 0: per-step metrics, written in batches (tracking.log_every_steps)
    if mlflow is not None:
        from opsvlm.tracking import MetricBuffer

        metric_log = MetricBuffer(loop_config["run_id"], loop_config["tracking_uri"], config.tracking.log_every_steps)

    def save_and_report(metrics: dict) -> None:
        if metric_log is not None:
            metric_log.flush()  # everything up to a checkpoint is written: a restart redoes only later steps
        with tempfile.TemporaryDirectory() as directory:
            if engine is not None:  # every rank writes its ZeRO partition; Ray merges the directories
                # tag "latest" would collide with DeepSpeed's own "latest" pointer file; frozen base weights are
                # excluded (they come from from_pretrained again), or every checkpoint would hold the whole model
                engine.save_checkpoint(
                    str(Path(directory) / ckpt.DEEPSPEED_DIR), tag="zero", exclude_frozen_parameters=True
                )
            if rank == 0:
                ckpt.save_model_files(
                    directory,
                    peft_model,
                    processor,
                    base_model=config.model.name,
                    quantization=config.model.quantization,
                    compute_dtype=report["compute_dtype"],
                    spec=spec,
                    labels=list(task.labels),
                    task=task.name,
                    step=step,
                    config=to_dict(config),
                )
                state = {"step": step, "epoch": epoch, "batches_done": batches_done}
                if engine is None:
                    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
                ckpt.save_trainer_state(directory, state)
            has_files = rank == 0 or engine is not None
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if has_files else None)
        # A checkpoint counts only once the controller has collected every rank's report; a worker dying right
        # after reporting would otherwise lose it and the restart would redo those steps.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    # 3. train
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["val_rows_per_worker"] else None
    pad_id = processor.tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained.train()
    finished = step >= total_steps
    while not finished and epoch < epochs:
        # The throughput clock is read once per optimizer step, after all of that step's work, so each step's figure
        # covers everything since the previous step: data, encoding, compute, all-reduce, metric writes, checkpoints.
        # It restarts with each epoch (after the previous epoch's validation).
        micro_in_step, step_clock, window_samples, window_tokens, loss_sum = 0, time.perf_counter(), 0, 0, 0.0
        batches = _batches(
            shard,
            optim.micro_batch,
            loop_config["rows_per_worker"],
            config.data.shuffle_buffer,
            seed=config.seed * 10_007 + epoch * 101 + rank,
        )
        for micro_index, rows in enumerate(batches):
            if micro_index < batches_done * optim.grad_accum:
                continue  # consumed before the checkpoint we resumed from: not redone
            batch = _to_device(collate([encode_row(processor, r, task) for r in rows], pad_id), device)
            weights = None
            if class_weights is not None:
                weights = torch.tensor([class_weights[task.class_of(r)] for r in rows], device=device)
            boundary = micro_in_step + 1 == optim.grad_accum
            with _autocast(device, compute_dtype):
                if engine is None and world > 1 and not boundary:
                    with trained.no_sync():  # accumulate locally; all-reduce once per optimizer step
                        loss = _loss(trained, batch, weights)
                        (loss / optim.grad_accum).backward()
                else:
                    loss = _loss(trained, batch, weights)
                    if engine is not None:
                        engine.backward(loss)
                    else:
                        (loss / optim.grad_accum).backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                if metric_log is not None:  # the steps before it stay in the run's history
                    metric_log.flush()
                raise NonFiniteLossError(
                    f"loss is {loss_value} at step {step} (rank {rank}). {build.nan_advice(compute_dtype)}"
                )
            loss_sum += loss_value
            window_samples += len(rows)
            window_tokens += int(batch["attention_mask"].sum())
            micro_in_step += 1
            if engine is not None:
                engine.step()  # DeepSpeed counts micro-steps itself and steps at the accumulation boundary
            if not boundary:
                continue
            if engine is None:
                if optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            batches_done += 1
            now = time.perf_counter()
            elapsed, step_clock = now - step_clock, now
            if metric_log is not None:
                metric_log.add(
                    {
                        "train_loss": loss_sum / micro_in_step,
                        "learning_rate": scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples * world / elapsed,
                        "tokens_per_s": window_tokens * world / elapsed,
                    },
                    step=step,
                )
            micro_in_step, window_samples, window_tokens, loss_sum = 0, 0, 0, 0.0
            if config.kill_worker_at_step == step and rank == world - 1:
                marker = Path(loop_config["kill_marker"])
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, not an exception
            if step % config.checkpoint_every_steps == 0 and step < total_steps:
                save_and_report({"step": step, "epoch": epoch})
            if step >= total_steps:
                finished = True
                break
        val_loss = _validation_loss(trained, val_shard, processor, task, device, compute_dtype, loop_config)
        if metric_log is not None:
            if val_loss is not None:
                metric_log.add({"val_loss": val_loss}, step=step)
            metric_log.flush()
        epoch += 1
        batches_done = 0
        if not finished and epoch < epochs:
            save_and_report({"step": step, "epoch": epoch, "val_loss": val_loss})
    final = {"step": step, "epoch": epoch, **_peak_rss_by_rank()}
    if torch.cuda.is_available():
        final["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if metric_log is not None:
        metric_log.add({k: v for k, v in final.items() if k.startswith("peak_rss_mb_rank")}, step=step)
    save_and_report(final)  # flushes the metrics
    if mlflow is not None:
        mlflow.end_run()


def _loss(model, batch: dict, weights: torch.Tensor | None) -> torch.Tensor:
    """The model's answer loss, or the class-weighted mean of per-example answer losses when weights are given."""
    outputs = model(**batch, use_cache=False)
    if weights is None:
        return outputs.loss
    return weighted_answer_loss(outputs.logits, batch["labels"], weights)


def _peak_rss_by_rank() -> dict[str, float]:
    """Every worker's peak RSS in MB (``peak_rss_mb_rank0``, ``peak_rss_mb_rank1``, ...) and the largest of them
    (``peak_rss_mb``). A collective when training is distributed: every rank must call it."""
    own = _peak_rss_mb()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, own)
    else:
        gathered = [own]
    return {"peak_rss_mb": max(gathered), **{f"peak_rss_mb_rank{i}": value for i, value in enumerate(gathered)}}


@torch.no_grad()
def _validation_loss(model, shard, processor, task, device, dtype, loop_config) -> float | None:
    """Mean per-token loss over the validation split, summed across all workers."""
    if shard is None:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    pad_id = processor.tokenizer.pad_token_id
    for rows in _batches(shard, 1, loop_config["val_rows_per_worker"]):
        batch = _to_device(collate([encode_row(processor, r, task) for r in rows], pad_id), device)
        with _autocast(device, dtype):
            loss = model(**batch, use_cache=False).loss
        tokens = int((batch["labels"] != -100).sum())
        total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
    model.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = total.to(device) if device.type == "cuda" else total
        torch.distributed.all_reduce(reduced)
        total = reduced.cpu()
    return float(total[0] / total[1]) if total[1] > 0 else None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _start_mlflow(loop_config: dict, config: TrainConfig):
    import mlflow

    mlflow.set_tracking_uri(loop_config["tracking_uri"])
    mlflow.start_run(run_id=loop_config["run_id"], log_system_metrics=config.tracking.log_system_metrics)
    return mlflow


# --- driver side ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished training job produced.

    Attributes:
        run_id: MLflow run id.
        checkpoint_dir: Local path of the final checkpoint (adapter, processor, model.json, ...).
        metrics: Last metrics reported by rank 0.
        steps: Optimizer steps taken.
    """

    run_id: str
    checkpoint_dir: str
    metrics: dict
    steps: int


def load_split(prepared: str | Path, split: str, limit: int | None = None):
    """A Ray Dataset of the prepared rows of one split (decoded clips, or the rows of another task: the manifest's
    ``rows_dir``)."""
    import ray.data

    path = Path(prepared) / read_manifest(prepared).get("rows_dir", "clips") / f"split={split}"
    if not path.is_dir() or not any(path.glob("*.parquet")):
        return None
    dataset = ray.data.read_parquet(str(path))
    return dataset.limit(limit) if limit is not None else dataset


def label_rows(prepared: str | Path, split: str, task) -> list[dict]:
    """The rows of a split without their pixel (binary) columns, read with pyarrow: what class counts and baselines
    need, without decoding anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(prepared) / task.rows_dir / f"split={split}").glob("*.parquet"))
    if not files:
        return []
    columns = [f.name for f in pq.read_schema(files[0]) if f.type not in (pa.binary(), pa.large_binary())]
    return pq.ParquetDataset(files).read(columns=columns).to_pylist()


def read_manifest(prepared: str | Path) -> dict:
    path = Path(prepared) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{prepared}: no manifest.json; run jobs/prepare_data.py first")
    return json.loads(path.read_text())


def fit(config: TrainConfig, extra_artifacts: dict[str, Any] | None = None) -> TrainResult:
    """Train with Ray Train and track it in MLflow (one run per call).

    Args:
        config: The training config.
        extra_artifacts: ``{artifact file name: JSON-serializable object}`` logged with the run (e.g. the memory
            plan).

    Returns:
        The run id and the final checkpoint.
    """
    import mlflow
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from opsvlm.tracking import config_params, ensure_experiment, resolve_tracking_uri

    manifest = read_manifest(config.data.prepared)
    spec = SamplingSpec(**manifest["sampling_spec"])
    task = get_task(manifest.get("task", "operations"))
    train_ds = load_split(config.data.prepared, config.data.train_split, config.data.max_train_clips)
    if train_ds is None:
        raise ValueError(f"{config.data.prepared}: split {config.data.train_split!r} has no rows")
    val_ds = load_split(config.data.prepared, config.data.val_split, config.data.max_val_clips)

    # class imbalance: per-class loss weights and/or oversampling, from the training split's class counts
    class_counts = Counter(task.class_of(r) for r in label_rows(config.data.prepared, config.data.train_split, task))
    class_weights = None
    if config.data.class_weighting != "none":
        class_weights = weights_for_classes(class_counts, config.data.class_weighting)
    if config.data.oversample_power > 0:
        factors = oversampling_factors(class_counts, config.data.oversample_power)
        # whole copies per row (a factor of 2.6 repeats a row 3 times): deterministic, and every row stays in
        repeats = {label: max(1, round(factor)) for label, factor in factors.items()}
        train_ds = train_ds.flat_map(lambda row: [row] * repeats.get(task.class_of(row), 1))
    if config.data.materialize:
        train_ds = train_ds.random_shuffle(seed=config.seed).materialize()
        val_ds = val_ds.materialize() if val_ds is not None else None
    workers = config.scaling.num_workers
    train_rows = train_ds.count()
    val_rows = val_ds.count() if val_ds is not None else 0
    if train_rows < workers:
        raise ValueError(f"{train_rows} training rows cannot feed {workers} workers")

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    storage = Path(config.storage_path or "outputs/ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None) as run:
        mlflow.set_tags({"opsvlm.job": "train", "opsvlm.task": task.name, "opsvlm.base_model": config.model.name})
        mlflow.log_params(config_params(to_dict(config)))
        mlflow.log_params({"data.train_clips": train_rows, "data.val_clips": val_rows, "task": task.name})
        mlflow.log_dict({"class_counts": dict(class_counts), "class_weights": class_weights}, "class_balance.json")
        mlflow.log_dict(asdict(spec), "sampling_spec.json")
        mlflow.log_dict(to_dict(config), "train_config.json")
        for name, value in (extra_artifacts or {}).items():
            mlflow.log_dict(value, name)
        _log_contact_sheet(train_ds, task)
        run_id = run.info.run_id

    name = f"train-{run_id}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "sampling_spec": asdict(spec),
            "task": task.name,
            "class_weights": class_weights,
            # streaming_split(equal=True) gives every worker the same number of rows (DDP needs equal steps)
            "rows_per_worker": train_rows // workers,
            "val_rows_per_worker": val_rows // workers,
            "kill_marker": str(storage / f"{name}.killed"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
            # pins workers to the node type the memory plan was made for (cluster.yaml declares these resources)
            accelerator_type=ACCELERATOR_TYPES.get(config.scaling.gpu_type or "") if config.scaling.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": train_ds, **({"val": val_ds} if val_ds is not None else {})},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    final_dir = result.checkpoint.path
    ckpt.verify_adapter(final_dir)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in result.metrics.items() if _is_number(v)})
        mlflow.log_artifacts(final_dir, artifact_path="checkpoint")
        mlflow.set_tag("opsvlm.checkpoint", final_dir)
    return TrainResult(run_id, final_dir, dict(result.metrics), int(result.metrics.get("step", 0)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _log_contact_sheet(dataset, task, examples: int = 4) -> None:
    """A picture of what the model sees for a few training rows, captioned with their target."""
    import mlflow

    from opsvlm.viz import contact_sheet

    sheet = []
    for row in dataset.take(examples):
        example = task.input_of(row)
        pixels = example.frames if task.media == "video" else example.image[None]  # uint8[K, H, W, 3]
        sheet.append((pixels, f"{row[task.id_field]}: {task.target_of(row)}"))
    mlflow.log_image(contact_sheet(sheet), "contact_sheet.png")
