"""Ray Train driver: QLoRA / LoRA fine-tuning of a Qwen2-VL-family model on prepared rows, tracked in MLflow.

``fit`` reads the training rows with Ray Data into Ray's object store, opens (or, with ``resume_run_id``, reopens)
the MLflow run, resolves the base model once (workers never build the tiny fixture themselves) and runs
:func:`opsvlm.train.worker.train_loop_per_worker` on a ``TorchTrainer`` named after the MLflow run. A run whose
driver died is continued by calling ``fit`` again with its run id: Ray Train finds the run's checkpoints under the
same name and storage path and every worker resumes from the latest committed one. The final checkpoint's adapter,
processor and ``model.json`` are uploaded to the run, then a completion marker; registration refuses a run without
it. The training step itself is :mod:`opsvlm.train.step` (plain torch), the engines :mod:`opsvlm.train.engine`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opsvlm.config import to_dict
from opsvlm.data.prepared import label_rows, load_split, read_manifest
from opsvlm.model import checkpoint as ckpt
from opsvlm.tasks.base import get_task
from opsvlm.train.config import TrainConfig
from opsvlm.train.step import DivergedError, NonFiniteLossError
from opsvlm.train.weighting import class_weights as weights_for_classes
from opsvlm.train.weighting import oversampling_factors
from opsvlm.train.worker import PENDING_METRICS_FILE, train_loop_per_worker
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ACCELERATOR_TYPES",
    "DivergedError",
    "NonFiniteLossError",
    "TrainResult",
    "fit",
    "storage_dir",
]

# planner GPU names -> Ray accelerator types (ray.util.accelerators)
ACCELERATOR_TYPES = {
    "T4": "T4",
    "A10G": "A10G",
    "L4": "L4",
    "A100-40": "A100-40G",
    "A100-80": "A100-80G",
    "H100-80": "H100",
}
CHECKPOINT_ARTIFACT = "checkpoint"  # the final checkpoint's artifact path (registry.CHECKPOINT_ARTIFACT)
STORAGE_TAG = "opsvlm.ray_storage"  # run tag: where Ray Train keeps this run's checkpoints (for resuming)


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


def storage_dir(config: TrainConfig) -> Path:
    """Where Ray Train keeps checkpoints for ``config`` (``storage_path`` or ``./outputs/ray``), absolute."""
    return Path(config.storage_path or "outputs/ray").resolve()


def fit(
    config: TrainConfig, extra_artifacts: dict[str, Any] | None = None, *, resume_run_id: str | None = None
) -> TrainResult:
    """Train with Ray Train and track it in MLflow (one run per call, or the run ``resume_run_id`` continued).

    Args:
        config: The training config.
        extra_artifacts: ``{artifact file name: JSON-serializable object}`` logged with the run (e.g. the memory
            plan).
        resume_run_id: Continue this MLflow run from its latest committed checkpoint (its driver died). Its storage
            path comes from the run's tag; its params are not logged again.

    Returns:
        The run id and the final checkpoint.
    """
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from opsvlm.testing.tiny import resolve_model_source
    from opsvlm.tracking import call_with_retry, config_params, ensure_experiment, resolve_tracking_uri

    manifest = read_manifest(config.data.prepared)
    spec = SamplingSpec(**manifest["sampling_spec"])
    if "task" not in manifest:
        raise ValueError(f"{Path(config.data.prepared) / 'manifest.json'}: no 'task' field; prepare the data again")
    task = get_task(manifest["task"])
    # class imbalance: per-class loss weights and/or oversampling, from the training split's class counts
    class_counts = Counter(task.class_of(r) for r in label_rows(config.data.prepared, config.data.train_split, task))
    class_weights = None
    if config.data.class_weighting != "none":
        class_weights = weights_for_classes(class_counts, config.data.class_weighting)
    with _ordered_data():  # the same rows get the same ids in every driver (a resumed run's order depends on it)
        train_ds = load_split(config.data.prepared, config.data.train_split, config.data.max_train_clips)
        if train_ds is None:
            raise ValueError(f"{config.data.prepared}: split {config.data.train_split!r} has no rows")
        if config.data.oversample_power > 0:
            factors = oversampling_factors(class_counts, config.data.oversample_power)
            # whole copies per row (a factor of 2.6 repeats a row 3 times): deterministic, and every row stays in
            repeats = {label: max(1, round(factor)) for label, factor in factors.items()}
            train_ds = train_ds.flat_map(lambda row: [row] * repeats.get(task.class_of(row), 1))
        train_ds = train_ds.materialize()
        val_ds = load_split(config.data.prepared, config.data.val_split, config.data.max_val_clips)
        val_ds = val_ds.materialize() if val_ds is not None else None
        train_blocks = _blocks(train_ds)
        val_blocks = _blocks(val_ds) if val_ds is not None else [[], []]
    workers = config.scaling.num_workers
    train_rows, val_rows = sum(train_blocks[1]), sum(val_blocks[1])
    if train_rows < workers:
        raise ValueError(f"{train_rows} training rows cannot feed {workers} workers")
    base_source = resolve_model_source(config.model.name)  # here, once: workers only load it

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    retry_s = config.tracking.retry_for_s
    mlflow.set_tracking_uri(tracking_uri)
    if resume_run_id is None:
        experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
        storage = storage_dir(config)
        with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None) as run:
            mlflow.set_tags(
                {
                    "opsvlm.job": "train",
                    "opsvlm.task": task.name,
                    "opsvlm.base_model": config.model.name,
                    STORAGE_TAG: str(storage),
                }
            )
            mlflow.log_params(config_params(to_dict(config)))
            mlflow.log_params({"data.train_clips": train_rows, "data.val_clips": val_rows, "task": task.name})
            mlflow.log_dict({"class_counts": dict(class_counts), "class_weights": class_weights}, "class_balance.json")
            mlflow.log_dict(asdict(spec), "sampling_spec.json")
            mlflow.log_dict(to_dict(config), "train_config.json")
            for name, value in (extra_artifacts or {}).items():
                mlflow.log_dict(value, name)
            _log_contact_sheet(train_ds, task)
            run_id = run.info.run_id
    else:
        run_id = resume_run_id
        run = call_with_retry(lambda: mlflow.MlflowClient(tracking_uri).get_run(run_id), within_s=retry_s, what="get")
        storage = Path(run.data.tags.get(STORAGE_TAG) or storage_dir(config))
    storage.mkdir(parents=True, exist_ok=True)

    name = f"train-{run_id}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "sampling_spec": asdict(spec),
            "task": task.name,
            "base_source": base_source,
            "class_weights": class_weights,
            "train_blocks": train_blocks,
            "val_blocks": val_blocks,
            "kill_marker": str(storage / f"{name}.killed"),
            "driver_pid": os.getpid(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
            # pins workers to the node type the memory plan was made for (cluster.yaml declares these resources)
            accelerator_type=ACCELERATOR_TYPES.get(config.scaling.gpu_type or "") if config.scaling.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=name,  # the same name (and storage) on --resume: Ray Train restores the latest committed checkpoint
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    final_dir = result.checkpoint.path
    ckpt.verify_adapter(final_dir)
    call_with_retry(
        lambda: _upload_final(run_id, tracking_uri, final_dir, result.metrics),
        within_s=retry_s,
        what="uploading the final checkpoint",
    )
    return TrainResult(run_id, final_dir, dict(result.metrics), int(result.metrics.get("step", 0)))


def _upload_final(run_id: str, tracking_uri: str, final_dir: str, metrics: dict) -> None:
    """Final metrics, any metrics rank 0 could not write, the model files, then the completion marker (last)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunStatus

    client = MlflowClient(tracking_uri)
    pending_path = Path(final_dir) / PENDING_METRICS_FILE
    pending = json.loads(pending_path.read_text()) if pending_path.is_file() else []
    values = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in pending]
    step = int(metrics.get("step", 0))
    now = int(time.time() * 1000)
    values += [Metric(f"final_{k}", float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    client.log_batch(run_id, metrics=values, synchronous=True)
    uploaded = []
    for name in ckpt.REGISTERED_FILES:  # adapter, processor, model.json: no optimizer or trainer state
        path = Path(final_dir) / name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"{CHECKPOINT_ARTIFACT}/{name}")
        else:
            client.log_artifact(run_id, str(path), CHECKPOINT_ARTIFACT)
        uploaded.append(name)
    client.set_tag(run_id, "opsvlm.checkpoint", final_dir)
    client.log_dict(run_id, ckpt.completion_marker(step, uploaded), ckpt.COMPLETE_MARKER)  # written last
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _blocks(dataset) -> list[list]:
    """``[Arrow block refs, rows per block]`` of a materialized dataset, in order."""
    import ray

    refs = dataset.to_arrow_refs()
    num_rows = ray.remote(num_cpus=0)(lambda table: table.num_rows)  # shipped by value: imports nothing of ours
    sizes = ray.get([num_rows.remote(ref) for ref in refs])
    return [refs, sizes]


@contextlib.contextmanager
def _ordered_data():
    """Ray Data keeps row order while the block is open (ids of rows must not depend on task scheduling)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


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
