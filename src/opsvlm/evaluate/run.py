"""The evaluation job: score a model on a held-out split next to its baselines, and record it all in MLflow."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opsvlm.evaluate import baselines
from opsvlm.evaluate.metrics import (
    CONFUSION_COLUMNS,
    ClipPrediction,
    ClipTruth,
    compute_metrics,
    confusion_matrices,
)
from opsvlm.tasks.base import Task, get_task
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.train.config import TrackingSettings

TABLE_METRICS = (
    "oca",
    "tiou_at_0_5",
    "mean_tiou",
    "aa_at_1",
    "aa_class_mean_recall",
    "macro_f1",
    "weighted_score",
    "parse_failure_rate",
)


@dataclass(frozen=True)
class EvalConfig:
    """Configuration of ``jobs/evaluate.py``.

    Attributes:
        model: Training run id, ``runs:/...``, ``models:/name@alias`` / ``models:/name/version``, or a checkpoint dir.
        data: Prepared folder (``jobs/prepare_data.py`` output); its sampling spec must equal the model's.
        split: Split to score (held-out subjects).
        max_clips: Score at most this many clips (quick runs); ``None`` = all.
        batch_size: Clips per generate call.
        actors: Inference actors (one model each).
        cpus_per_actor: CPUs per actor.
        gpus_per_actor: GPUs per actor.
        zero_shot: Also score the base model without the adapter.
        free_generation: Also run unconstrained generation to measure how often free output breaks.
        tracking: MLflow settings.
        out: Folder for the predictions table (Parquet); empty = a temporary folder (still logged to MLflow).
    """

    model: str = ""
    data: str = ""
    split: str = "test"
    max_clips: int | None = None
    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    zero_shot: bool = True
    free_generation: bool = True
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    out: str = ""


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        run_id: The MLflow evaluation run.
        train_run_id: The training run it is linked to ("" when the model was a plain directory).
        metrics: The model's metrics (``compute_metrics`` keys).
        table: ``{system name: {metric: value}}`` for the model and every baseline.
        eval_split: Identifier of the exact clip set scored (``<split>:<hash of clip ids>``).
    """

    run_id: str
    train_run_id: str
    metrics: dict
    table: dict
    eval_split: str


def truths_of(rows) -> list[ClipTruth]:
    return [
        ClipTruth(r["dominant_operation"], *r["temporal_segment"], r["next_operation"], r["end_s"] - r["start_s"])
        for r in rows
    ]


def predictions_of(records) -> list[ClipPrediction | None]:
    return [
        None if p is None else ClipPrediction(p["operation"], p["start_s"], p["end_s"], p["next_operation"])
        for p in records
    ]


def model_records(rows) -> list[dict | None]:
    return [
        {
            "operation": r["pred_operation"],
            "start_s": r["pred_start_s"],
            "end_s": r["pred_end_s"],
            "next_operation": r["pred_next_operation"],
        }
        if r["valid"]
        else None
        for r in rows
    ]


def split_id(split: str, clip_ids) -> str:
    digest = hashlib.sha1("\n".join(sorted(clip_ids)).encode()).hexdigest()[:12]
    return f"{split}:{digest}"


def format_table(table: dict[str, dict[str, float]], metrics: Sequence[str] | None = None) -> str:
    """A fixed-width text table: one row per system, one column per headline metric.

    Args:
        table: ``{system: {metric: value}}``.
        metrics: Columns; default: ``TABLE_METRICS`` for the operations task, else every metric without a ``/``
            (per-class and per-group metrics stay out).
    """
    if metrics is None:
        first = next(iter(table.values()), {})
        metrics = TABLE_METRICS if "weighted_score" in first else [m for m in first if "/" not in m]
    header = f"{'system':<30}" + "".join(f"{m:>22}" for m in metrics)
    lines = [header, "-" * len(header)]
    for system, values in table.items():
        lines.append(f"{system:<30}" + "".join(f"{values.get(m, float('nan')):>22.3f}" for m in metrics))
    return "\n".join(lines)


def _train_rows(prepared: str, split: str = "train") -> list[dict]:
    """Label columns of a split (no frames): what the majority baseline learns from."""
    import pyarrow.parquet as pq

    files = sorted((Path(prepared) / "clips" / f"split={split}").glob("*.parquet"))
    if not files:
        return []
    return (
        pq.ParquetDataset(files).read(columns=["dominant_operation", "next_operation", "start_s", "end_s"]).to_pylist()
    )


def _train_timelines(manifest: dict):
    from opsvlm.data.openpack import discover_sessions, read_operations_csv

    subjects = set(manifest["splits"]["train"]["subjects"])
    return [read_operations_csv(s.annotation) for s in discover_sessions(manifest["source"]) if s.subject in subjects]


def _confusion_png(matrix: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CONFUSION_COLUMNS)), CONFUSION_COLUMNS, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(LABEL_NAMES)), LABEL_NAMES, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=6)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_class_png(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in metrics if k.startswith(("oca_recall/", "aa_recall/")))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(keys)), [metrics[k] for k in keys], color=["C0" if k.startswith("oca") else "C1" for k in keys])
    ax.set_xticks(range(len(keys)), keys, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("per-class recall (blue: operation, orange: next operation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(config: EvalConfig) -> EvalResult:
    """Score ``config.model`` on ``config.split`` with baselines; log an MLflow run linked to the training run."""
    import mlflow

    from opsvlm import registry
    from opsvlm.evaluate.batch import predict_dataset
    from opsvlm.tracking import ensure_experiment, resolve_tracking_uri
    from opsvlm.train.checkpoint import read_model_meta
    from opsvlm.train.loop import load_split, read_manifest
    from opsvlm.video.sampling import SamplingSpec
    from opsvlm.viz import contact_sheet

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model_dir = str(registry.resolve_model(config.model, tracking_uri))
    described = registry.describe_model(config.model, tracking_uri)
    meta = read_model_meta(model_dir)
    manifest = read_manifest(config.data)
    task_name = meta.get("task", "operations")
    if manifest.get("task", "operations") != task_name:
        raise ValueError(f"{config.data} holds {manifest.get('task', 'operations')} data but the model is {task_name}")
    if manifest["sampling_spec"] != meta["sampling_spec"]:
        raise ValueError(
            f"{config.data} was prepared with sampling spec {manifest['sampling_spec']} but the model was trained "
            f"with {meta['sampling_spec']}; prepare the data with the model's spec"
        )
    dataset = load_split(config.data, config.split, config.max_clips)
    if dataset is None:
        raise ValueError(f"{config.data}: split {config.split!r} has no examples")
    dataset = dataset.materialize()
    common = {
        "batch_size": config.batch_size,
        "actors": config.actors,
        "cpus_per_actor": config.cpus_per_actor,
        "gpus_per_actor": config.gpus_per_actor,
    }
    if task_name != "operations":
        return _evaluate_task(config, get_task(task_name), model_dir, described, meta, dataset, common, tracking_uri)

    # 1. the model, constrained
    rows = sorted(predict_dataset(dataset, model_dir, **common).take_all(), key=lambda r: r["clip_id"])
    truths = truths_of(rows)
    metrics = compute_metrics(truths, predictions_of(model_records(rows)))
    table = {"fine-tuned": metrics}

    # 2. baselines on the same clips
    successor = baselines.most_frequent_successor(baselines.successor_counts(_train_timelines(manifest)), "Null")
    train_rows = _train_rows(config.data)
    if train_rows:
        table["majority"] = compute_metrics(truths, predictions_of(baselines.majority_predictions(train_rows, rows)))
    table["fine-tuned + grammar"] = compute_metrics(
        truths, predictions_of(baselines.grammar_predictions(rows, successor))
    )
    table["oracle op + grammar"] = compute_metrics(
        truths, predictions_of(baselines.grammar_predictions(rows, successor, oracle=True))
    )
    if config.zero_shot:
        zero = predict_dataset(
            dataset, None, base_model=meta["base_model"], spec=SamplingSpec(**meta["sampling_spec"]), **common
        )
        zero_rows = sorted(zero.take_all(), key=lambda r: r["clip_id"])
        table["zero-shot base"] = compute_metrics(truths, predictions_of(model_records(zero_rows)))
    if config.free_generation:
        free_rows = sorted(
            predict_dataset(dataset, model_dir, constrained=False, **common).take_all(), key=lambda r: r["clip_id"]
        )
        table["fine-tuned, free generation"] = compute_metrics(truths, predictions_of(model_records(free_rows)))

    # 3. MLflow: a run linked to the training run
    eval_split = split_id(config.split, [r["clip_id"] for r in rows])
    train_run_id = described.get("run_id", "")
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    tags = {
        "opsvlm.job": "evaluate",
        "opsvlm.task": task_name,
        "opsvlm.eval_split": eval_split,
        "opsvlm.model_ref": config.model,
    }
    if train_run_id:
        tags.update({"mlflow.parentRunId": train_run_id, "opsvlm.train_run_id": train_run_id})
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None, tags=tags) as run:
        mlflow.log_params(
            {
                "split": config.split,
                "clips": len(rows),
                "model": config.model,
                "sampling_spec": json.dumps(meta["sampling_spec"]),
            }
        )
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for system, values in table.items():
            if system != "fine-tuned":
                key = system.replace(" ", "_").replace(",", "").replace("+", "plus")
                mlflow.log_metrics({f"baseline/{key}/{m}": values[m] for m in TABLE_METRICS if np.isfinite(values[m])})
        mlflow.log_table(
            {"system": list(table), **{m: [table[s][m] for s in table] for m in TABLE_METRICS}}, "baselines.json"
        )
        mlflow.log_text(format_table(table), "baselines.txt")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            matrices = confusion_matrices(truths, predictions_of(model_records(rows)))
            for name, matrix in matrices.items():
                _confusion_png(matrix, f"{name} (rows: truth)", tmp / f"confusion_{name}.png")
            _per_class_png(metrics, tmp / "per_class_recall.png")
            mlflow.log_artifacts(str(tmp), "plots")
            out = Path(config.out) if config.out else tmp / "predictions"
            out.mkdir(parents=True, exist_ok=True)
            import pyarrow as pa
            import pyarrow.parquet as pq

            from opsvlm.evaluate.batch import PREDICTION_SCHEMA

            pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), out / "predictions.parquet")
            mlflow.log_artifact(str(out / "predictions.parquet"), "predictions")
        examples = dataset.take(4)
        by_id = {r["clip_id"]: r for r in rows}
        mlflow.log_image(
            contact_sheet(
                [
                    (
                        np.frombuffer(e["frames"], np.uint8).reshape(tuple(e["frame_shape"])),
                        f"truth {e['dominant_operation']}->{e['next_operation']} | pred "
                        f"{by_id[e['clip_id']]['pred_operation']}->{by_id[e['clip_id']]['pred_next_operation']}",
                    )
                    for e in examples
                ]
            ),
            "examples.png",
        )
        mlflow.log_dict(
            {
                "metrics": metrics,
                "eval_split": eval_split,
                "eval_run_id": run.info.run_id,
                "train_run_id": train_run_id,
                "task": task_name,
            },
            "eval_summary.json",
        )
    return EvalResult(run.info.run_id, train_run_id, metrics, table, eval_split)


def _label_rows(dataset) -> list[dict]:
    """Every row of a Ray Dataset without its pixel (binary) columns, in dataset order."""
    import pyarrow as pa

    schema = dataset.schema()
    keep = [name for name, kind in zip(schema.names, schema.types, strict=True) if kind not in (pa.binary(), bytes)]
    return dataset.select_columns(keep).take_all()


def _evaluate_task(config: EvalConfig, task: Task, model_dir, described, meta, dataset, common, tracking_uri):
    """Evaluation of a task other than operations: the model, the majority class and the zero-shot base side by side,
    scored with the task's own metrics, in one MLflow run linked to the training run."""
    import mlflow
    import pyarrow.parquet as pq

    from opsvlm.evaluate.batch import ANSWER_SCHEMA, predict_dataset
    from opsvlm.tracking import ensure_experiment
    from opsvlm.train.loop import label_rows
    from opsvlm.video.sampling import SamplingSpec

    id_field = task.id_field
    rows = sorted(_label_rows(dataset), key=lambda r: r[id_field])

    def answers_of(predictions) -> list[dict | None]:
        by_id = {p["example_id"]: p for p in predictions}
        return [json.loads(by_id[r[id_field]]["answer"]) if by_id[r[id_field]]["valid"] else None for r in rows]

    predictions = predict_dataset(dataset, model_dir, **common).take_all()
    metrics = task.compute_metrics(rows, answers_of(predictions))
    table = {"fine-tuned": metrics}

    # majority class of the training split: every example gets the most frequent training class
    train = label_rows(config.data, "train", task)
    if train:
        counts = Counter(task.class_of(r) for r in train)
        field_name = next(iter(task.label_slots.values()))
        majority = counts.most_common(1)[0][0]
        table["majority"] = task.compute_metrics(rows, [{field_name: majority} for _ in rows])
    if config.zero_shot:
        spec = SamplingSpec(**meta["sampling_spec"])
        zero = predict_dataset(dataset, None, base_model=meta["base_model"], spec=spec, task=task.name, **common)
        table["zero-shot base"] = task.compute_metrics(rows, answers_of(zero.take_all()))
    if config.free_generation:
        free = predict_dataset(dataset, model_dir, constrained=False, **common)
        table["fine-tuned, free generation"] = task.compute_metrics(rows, answers_of(free.take_all()))

    eval_split = split_id(config.split, [r[id_field] for r in rows])
    train_run_id = described.get("run_id", "")
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    tags = {
        "opsvlm.job": "evaluate",
        "opsvlm.task": task.name,
        "opsvlm.eval_split": eval_split,
        "opsvlm.model_ref": config.model,
    }
    if train_run_id:
        tags.update({"mlflow.parentRunId": train_run_id, "opsvlm.train_run_id": train_run_id})
    headline = [m for m in metrics if "/" not in m]  # per-class and per-group metrics stay out of the table
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None, tags=tags) as run:
        mlflow.log_params({"split": config.split, "examples": len(rows), "model": config.model, "task": task.name})
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for system, values in table.items():
            if system != "fine-tuned":
                key = system.replace(" ", "_").replace(",", "")
                mlflow.log_metrics({f"baseline/{key}/{m}": values[m] for m in headline if np.isfinite(values[m])})
        mlflow.log_table(
            {"system": list(table), **{m: [table[s][m] for s in table] for m in headline}}, "baselines.json"
        )
        text = format_table(table, headline)
        mlflow.log_text(text, "baselines.txt")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(config.out) if config.out else Path(tmp) / "predictions"
            out.mkdir(parents=True, exist_ok=True)
            import pyarrow as pa

            pq.write_table(pa.Table.from_pylist(predictions, schema=ANSWER_SCHEMA), out / "predictions.parquet")
            mlflow.log_artifact(str(out / "predictions.parquet"), "predictions")
        summary = {
            "metrics": metrics,
            "eval_split": eval_split,
            "eval_run_id": run.info.run_id,
            "train_run_id": train_run_id,
            "task": task.name,
        }
        mlflow.log_dict(summary, "eval_summary.json")
    return EvalResult(run.info.run_id, train_run_id, metrics, table, eval_split)
