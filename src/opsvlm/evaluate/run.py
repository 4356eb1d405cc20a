"""The evaluation job: score a model on one split next to baselines, with intervals, and record it all in MLflow.

One flow serves every task: the task (from the checkpoint's ``model.json``) says how to score answers, which rows
belong together for resampling, which baselines and evaluation variants to add, and which plots to draw.

Splits have roles. The validation split (``val``) is for *selection*: promotion, recipe comparisons, every choice. The
test split (``test``) is for the *report*: it is scored and published, never used to choose. Each evaluation run
records its split's role, and the registry refuses to promote on a report split.

Every table figure comes with a 95% bootstrap interval that resamples groups of examples (blocks of a session, an
image: overlapping clips are not independent) and with its counts. The per-example answers are stored
(``examples.json``) so a later promotion can compare two models on exactly the same examples (paired bootstrap).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.registry import EXAMPLES_ARTIFACT, SUMMARY_ARTIFACT
from opsvlm.stats import Interval, bootstrap_intervals
from opsvlm.tasks.base import Task, get_task
from opsvlm.train.config import TrackingSettings

__all__ = [
    "SPLIT_ROLES",
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "format_table",
    "split_id",
    "split_role",
]

SPLIT_ROLES = {"val": "selection", "test": "report"}
"""What each evaluable split is for. The training split is never evaluated: a metric on training data says nothing."""
MODEL_SYSTEM = "fine-tuned"


@dataclass(frozen=True)
class EvalConfig:
    """Configuration of ``jobs/evaluate.py``.

    Attributes:
        model: Training run id, ``runs:/...``, ``models:/name@alias`` / ``models:/name/version``, or a checkpoint dir.
        data: Prepared folder; its sampling spec must equal the model's.
        split: ``val`` (selection: promotion and every comparison) or ``test`` (report only).
        max_examples: Score at most this many examples (quick runs); ``None`` = all.
        batch_size: Examples per generate call.
        actors: Inference actors (one model each).
        cpus_per_actor: CPUs per actor.
        gpus_per_actor: GPUs per actor.
        baselines: Score the task's baselines beside the model.
        base_model: Also score the base model without the adapter (``untrained-base`` for the random-weight fixture,
            ``zero-shot-base`` for a real checkpoint).
        free_generation: Also run unconstrained generation to measure how often free output breaks.
        variants: Also score the task's evaluation variants (e.g. inspection with the object type unknown).
        n_boot: Bootstrap replicates for the intervals.
        seed: Seed of the bootstrap resampling.
        tracking: MLflow settings.
        out: Folder for the predictions table (Parquet); empty = a temporary folder (still logged to MLflow).
    """

    model: str = ""
    data: str = ""
    split: str = "val"
    max_examples: int | None = None
    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    baselines: bool = True
    base_model: bool = True
    free_generation: bool = True
    variants: bool = True
    n_boot: int = 1000
    seed: int = 0
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    out: str = ""


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        run_id: The MLflow evaluation run.
        train_run_id: The training run it is linked to ("" when the model was a plain directory).
        task: The task's name.
        split: The split scored.
        role: ``selection`` or ``report`` (:data:`SPLIT_ROLES`).
        metrics: The model's metrics (the task's ``compute_metrics`` keys).
        table: ``{system name: {metric: value}}`` for the model and every baseline.
        intervals: ``{system name: {table metric: [low, high]}}`` (95% bootstrap by group).
        eval_split: Identifier of the exact example set scored (``<split>:<hash of ids>``).
        n: Examples scored.
        groups: Resampling groups among them.
        summary: The stored summary (``eval_summary.json``: all of the above plus seed, commit, n_boot).
    """

    run_id: str
    train_run_id: str
    task: str
    split: str
    role: str
    metrics: dict
    table: dict
    intervals: dict
    eval_split: str
    n: int
    groups: int
    summary: dict


def split_id(split: str, ids: Sequence[str]) -> str:
    """``<split>:<12 hex digits>``: names the exact set of examples, so scores on different sets are never compared."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]
    return f"{split}:{digest}"


def split_role(split: str) -> str:
    """The role of a split; refuses the training split and unknown names."""
    if split not in SPLIT_ROLES:
        raise ValueError(
            f"evaluate.split must be one of {sorted(SPLIT_ROLES)} (never the training split), got {split!r}"
        )
    return SPLIT_ROLES[split]


def format_table(
    table: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> str:
    """A fixed-width text table: one row per system, one column per metric, ``value [low, high]`` when intervals are
    given."""
    intervals = intervals or {}
    width = 22 if intervals else 12
    header = f"{'system':<34}" + "".join(f"{m:>{width}}" for m in metrics)
    lines = [header, "-" * len(header)]
    for system, values in table.items():
        cells = []
        for m in metrics:
            value = values.get(m, float("nan"))
            ci = intervals.get(system, {}).get(m)
            cell = f"{value:.3f}" if ci is None else f"{value:.3f} [{ci[0]:.2f},{ci[1]:.2f}]"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{system:<34}" + "".join(cells))
    return "\n".join(lines)


def evaluate(config: EvalConfig, progress=None) -> EvalResult:
    """Score ``config.model`` on ``config.split`` with baselines and intervals; log an MLflow run linked to the training
    run.

    Args:
        config: What to score and how.
        progress: ``callable(str)`` told about each system as it is scored (the jobs print it); ``None``: silent.

    Raises:
        ValueError: the split is the training split or empty, or the data do not match the model (task, sampling).
    """
    import mlflow

    from opsvlm import registry
    from opsvlm.data.prepared import label_rows, load_split, read_manifest
    from opsvlm.evaluate.batch import predict_dataset
    from opsvlm.model.checkpoint import read_model_meta
    from opsvlm.testing.tiny import MARKER_FILE, resolve_model_source
    from opsvlm.tracking import ensure_experiment, resolve_tracking_uri
    from opsvlm.video.sampling import SamplingSpec

    say = progress or (lambda _: None)
    role = split_role(config.split)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model_dir = str(registry.resolve_model(config.model, tracking_uri))
    described = registry.describe_model(config.model, tracking_uri)
    meta = read_model_meta(model_dir)
    manifest = read_manifest(config.data)
    task = get_task(meta["task"])
    if manifest["task"] != task.name:
        raise ValueError(f"{config.data} holds {manifest['task']} data but the model is a {task.name} model")
    if manifest["sampling_spec"] != meta["sampling_spec"]:
        raise ValueError(
            f"{config.data} was prepared with sampling spec {manifest['sampling_spec']} but the model was trained "
            f"with {meta['sampling_spec']}; prepare the data with the model's spec"
        )
    dataset = load_split(config.data, config.split, config.max_examples)
    if dataset is None:
        raise ValueError(f"{config.data}: split {config.split!r} has no examples")
    dataset = dataset.materialize()
    rows = sorted(_label_rows(dataset), key=lambda r: r[task.id_field])
    ids = [r[task.id_field] for r in rows]
    common = {
        "batch_size": config.batch_size,
        "actors": config.actors,
        "cpus_per_actor": config.cpus_per_actor,
        "gpus_per_actor": config.gpus_per_actor,
    }

    # 1. the model, with constrained decoding
    say(f"scoring the fine-tuned model on {len(rows)} {config.split} examples")
    predictions = predict_dataset(dataset, model_dir, **common).take_all()
    systems: dict[str, list[dict | None]] = {MODEL_SYSTEM: _answers(predictions, ids)}

    # 2. what it is compared with: the task's baselines, the base model, free generation, evaluation variants
    if config.baselines:
        train_rows = label_rows(config.data, "train", task)
        systems.update(task.baselines(rows, systems[MODEL_SYSTEM], train_rows, manifest))
    if config.base_model:
        # the random-weight fixture has learned nothing: "zero-shot" is kept for real pretrained checkpoints
        untrained = (Path(resolve_model_source(meta["base_model"])) / MARKER_FILE).is_file()
        name = "untrained-base" if untrained else "zero-shot-base"
        say(f"scoring {name}")
        spec = SamplingSpec(**meta["sampling_spec"])
        base = predict_dataset(dataset, None, base_model=meta["base_model"], spec=spec, task=task.name, **common)
        systems[name] = _answers(base.take_all(), ids)
    if config.free_generation:
        say("scoring free generation")
        free = predict_dataset(dataset, model_dir, constrained=False, **common)
        systems["free-generation"] = _answers(free.take_all(), ids)
    if config.variants:
        for name, transform in task.eval_variants().items():
            say(f"scoring {name}")
            systems[name] = _answers(predict_dataset(dataset.map(transform), model_dir, **common).take_all(), ids)

    # 3. metrics with intervals, every system on the same examples and the same resamples
    say(f"bootstrap intervals ({config.n_boot} resamples)")
    groups = [task.group_of(r) for r in rows]
    table, intervals = {}, {}
    for name, answers in systems.items():
        cis = _intervals(task, rows, answers, groups, config.n_boot, config.seed)
        table[name] = task.compute_metrics(rows, answers)
        intervals[name] = {m: ci.as_list() for m, ci in cis.items() if math.isfinite(ci.low)}
    metrics = table[MODEL_SYSTEM]

    # 4. MLflow: a run linked to the training run, with the stored summary and the per-example answers
    eval_split = split_id(config.split, ids)
    train_run_id = described.get("run_id", "")
    n_groups = len(set(groups))
    summary = {
        "task": task.name,
        "split": config.split,
        "role": role,
        "eval_split": eval_split,
        "n": len(rows),
        "groups": n_groups,
        "n_boot": config.n_boot,
        "seed": config.seed,
        "commit": _git_commit(),
        "model": config.model,
        "train_run_id": train_run_id,
        "metrics": metrics,
        "table": table,
        "intervals": intervals,
    }
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    tags = {
        "opsvlm.job": "evaluate",
        "opsvlm.task": task.name,
        "opsvlm.eval_split": eval_split,
        "opsvlm.split_role": role,
        "opsvlm.model_ref": config.model,
    }
    if train_run_id:
        tags.update({"mlflow.parentRunId": train_run_id, "opsvlm.train_run_id": train_run_id})
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None, tags=tags) as run:
        summary["eval_run_id"] = run.info.run_id
        mlflow.log_params(
            {
                "split": config.split,
                "split_role": role,
                "examples": len(rows),
                "groups": n_groups,
                "model": config.model,
                "sampling_spec": json.dumps(meta["sampling_spec"]),
            }
        )
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for m, (low, high) in intervals[MODEL_SYSTEM].items():
            mlflow.log_metrics({f"{m}_ci95_low": low, f"{m}_ci95_high": high})
        for system, values in table.items():
            if system != MODEL_SYSTEM:
                key = system.replace(":", "_").replace("+", "_plus_").replace(",", "_")
                mlflow.log_metrics(
                    {f"baseline/{key}/{m}": values[m] for m in task.table_metrics if np.isfinite(values.get(m, np.nan))}
                )
        text = format_table(table, task.table_metrics, intervals)
        mlflow.log_text(
            f"{config.split} split ({role}), n={len(rows)}, {n_groups} resampling groups\n{text}\n", "table.txt"
        )
        mlflow.log_dict(summary, SUMMARY_ARTIFACT)
        mlflow.log_dict(
            {
                "task": task.name,
                "eval_split": eval_split,
                "ids": ids,
                "groups": groups,
                "rows": rows,
                "answers": systems[MODEL_SYSTEM],
            },
            EXAMPLES_ARTIFACT,
        )
        with tempfile.TemporaryDirectory() as tmp:
            plots = Path(tmp) / "plots"
            plots.mkdir()
            task.write_plots(rows, systems[MODEL_SYSTEM], plots)
            if any(plots.iterdir()):
                mlflow.log_artifacts(str(plots), "plots")
            out = Path(config.out) if config.out else Path(tmp) / "predictions"
            out.mkdir(parents=True, exist_ok=True)
            _write_predictions(predictions, out / "predictions.parquet")
            mlflow.log_artifact(str(out / "predictions.parquet"), "predictions")
    return EvalResult(
        run.info.run_id,
        train_run_id,
        task.name,
        config.split,
        role,
        metrics,
        table,
        intervals,
        eval_split,
        len(rows),
        n_groups,
        summary,
    )


def _intervals(task: Task, rows, answers, groups, n_boot: int, seed: int) -> dict[str, Interval]:
    def metrics_of(idx: np.ndarray) -> dict[str, float]:
        return task.compute_metrics([rows[i] for i in idx], [answers[i] for i in idx])

    return bootstrap_intervals(metrics_of, groups, task.table_metrics, n_boot=n_boot, seed=seed)


def _answers(predictions: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> list[dict | None]:
    """Answers (``to_dict()`` mappings, ``None`` when invalid) aligned with ``ids``."""
    by_id = {p["example_id"]: p for p in predictions}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RuntimeError(f"batch inference returned no prediction for {len(missing)} examples, e.g. {missing[:3]}")
    return [json.loads(by_id[i]["answer"]) if by_id[i]["valid"] else None for i in ids]


def _label_rows(dataset) -> list[dict]:
    """Every row of a Ray Dataset without its pixel (binary) columns, as plain JSON-able Python values."""
    import pyarrow as pa

    schema = dataset.schema()
    keep = [name for name, kind in zip(schema.names, schema.types, strict=True) if kind not in (pa.binary(), bytes)]
    return [_plain(r) for r in dataset.select_columns(keep).take_all()]


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_predictions(predictions: Sequence[Mapping[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opsvlm.evaluate.batch import ANSWER_SCHEMA

    pq.write_table(pa.Table.from_pylist(list(predictions), schema=ANSWER_SCHEMA), path)


def _git_commit() -> str:
    """The source commit of this evaluation (``unknown`` outside a git checkout), for the stored summary."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
