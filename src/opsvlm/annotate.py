"""The annotation job: whole recordings -> operation timelines, with Ray Data; scored and logged to MLflow when there
is truth.

Pipeline (``jobs/annotate.py``)::

    recordings (OpenPack roots, video files)
      -> plan (driver): truth, media span, windows of the model's clip length every ``stride_s``
      -> decode tasks (Ray Data map_batches): each task decodes one stretch of a recording ONCE
         (``opsvlm.video.decode``: decoder process with a deadline) and emits one row per window
      -> predictor actors (Ray Data actor pool): batched constrained decoding with the model's own SamplingSpec;
         per window the label probabilities of the operation and of the next operation
      -> driver: per recording, fusion per second, grammar decoding (Viterbi), anticipation, boxes and figures
         (``opsvlm.tasks.operations.timeline``), files, metrics with bootstrap intervals, MLflow run.

A window that cannot be decoded stays in the output as a rejected window with its reason (in the session's JSON and
the summary); a recording whose media or annotation cannot be read is listed under ``failed``. Nothing is dropped
silently.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from opsvlm.config import to_dict
from opsvlm.tasks.operations.timeline import WindowScores, timeline_for
from opsvlm.tasks.operations.timeline.metrics import score_sessions
from opsvlm.tasks.operations.timeline.outputs import session_stem, write_figures, write_json, write_session
from opsvlm.tasks.operations.timeline.session import ARGMAX_SYSTEM, GRAMMAR_SYSTEM, MAJORITY_SYSTEM
from opsvlm.timeline import (
    PlannedRecording,
    TimelineError,
    annotation_of,
    find_recordings,
    load_grammar,
    model_window_s,
    plan_recording,
)
from opsvlm.train.config import TrackingSettings
from opsvlm.video.decode import ClipRejection, ClipWindow, decode_session_views
from opsvlm.video.sampling import SamplingSpec

HEADLINE = ("frame_macro_f1", "edit_score", "f1_at_10", "f1_at_25", "f1_at_50", "next_accuracy_at_boundaries")
WINDOW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("window", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("frames", pa.binary()),
        ("frame_shape", pa.list_(pa.int32())),
        ("frame_times_s", pa.list_(pa.float64())),
    ]
)
SCORE_SCHEMA = pa.schema(
    [WINDOW_SCHEMA.field(name) for name in ("key", "window", "start_s", "end_s", "status", "reason", "detail")]
    + [("scores", pa.list_(pa.float64())), ("next_scores", pa.list_(pa.float64()))]
)
_WINDOWS_PER_BLOCK = 32  # ~40 MB of 8x224x224x3 frames per block


@dataclass(frozen=True)
class AnnotateConfig:
    """Configuration of ``jobs/annotate.py``.

    Attributes:
        model: Training run id, ``runs:/...``, ``models:/name@alias`` / ``models:/name/version``, or a checkpoint dir.
        sources: OpenPack-layout roots, video files or folders of video files.
        out: Output folder (one set of files per recording, ``figures.csv``, ``summary.json``, ``grammar.json``).
        window_s: Window length; default the clip length the model was trained on (5 s when unknown).
        stride_s: Seconds between window starts; default half the window.
        decoder: ``viterbi`` (the grammar) or ``argmax`` for the output files; both are always scored.
        emission_weight: Weight of the model's log-probabilities against the grammar's in Viterbi.
        grammar: Where the grammar comes from (see ``opsvlm.timeline.load_grammar``; default the model's training
            split, else OpenPack's procedure as a prior).
        batch_size: Windows per generate call.
        actors: Predictor actors (one model each).
        cpus_per_actor: CPUs per actor (also its torch threads, at least 1).
        gpus_per_actor: GPUs per actor.
        decode_num_cpus: CPUs reserved per decoding task.
        decode_deadline_s: Longest wait for the next decoded window before the decoder is killed.
        windows_per_task: Most windows one decoding task cuts (long recordings become several tasks).
        bootstrap_resamples: Resamples of the 95% intervals by session.
        plots: Write a Gantt PNG per recording.
        log_to_mlflow: Log an annotation run (metrics, baselines, plots, files) linked to the model.
        tracking: MLflow settings.
    """

    model: str = ""
    sources: tuple[str, ...] = ()
    out: str = ""
    window_s: float | None = None
    stride_s: float | None = None
    decoder: Literal["viterbi", "argmax"] = "viterbi"
    emission_weight: float = 1.0
    grammar: str = ""
    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    decode_num_cpus: float = 0.5
    decode_deadline_s: float = 120.0
    windows_per_task: int = 256
    bootstrap_resamples: int = 1000
    plots: bool = True
    log_to_mlflow: bool = True
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def __post_init__(self) -> None:
        for name in ("window_s", "stride_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.batch_size < 1 or self.actors < 1 or self.windows_per_task < 1:
            raise ValueError("batch_size, actors and windows_per_task must be >= 1")
        if not self.emission_weight > 0:
            raise ValueError(f"emission_weight must be > 0, got {self.emission_weight}")


# --- Ray Data stages ---------------------------------------------------------------------------------------------


def plan_tasks(planned: list[PlannedRecording], windows_per_task: int) -> list[dict]:
    """Decoding tasks: each recording's windows in time order, cut into stretches of at most ``windows_per_task``."""
    tasks = []
    for p in planned:
        indexed = [[i, a, b] for i, (a, b) in enumerate(p.windows)]
        parts = -(-len(indexed) // windows_per_task)
        bounds = np.linspace(0, len(indexed), parts + 1).round().astype(int)
        for part in range(parts):
            tasks.append(
                {
                    "key": p.recording.key,
                    "media": p.recording.media,
                    "media_kind": p.recording.media_kind,
                    "offset_s": p.media_start_s if p.recording.media_kind == "frames" else 0.0,
                    "windows": indexed[bounds[part] : bounds[part + 1]],
                }
            )
    return tasks


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WINDOW_SCHEMA)


def decode_windows(batch: pa.Table, spec: SamplingSpec, deadline_s: float) -> Iterator[pa.Table]:
    """Ray Data function: task rows in (:func:`plan_tasks`, as JSON), one row per window out (``WINDOW_SCHEMA``)."""
    for text in batch.column("task").to_pylist():
        task = json.loads(text)
        bounds = {str(i): (a, b) for i, a, b in task["windows"]}
        clips = [ClipWindow(str(i), a, b) for i, a, b in task["windows"]]
        rows: list[dict] = []
        for item in decode_session_views(task["media"], task["media_kind"], clips, spec, deadline_s, task["offset_s"]):
            start, end = bounds[item.clip_id]
            row = {"key": task["key"], "window": int(item.clip_id), "start_s": start, "end_s": end}
            if isinstance(item, ClipRejection):
                row.update(status="rejected", reason=item.reason, detail=item.detail, frames=b"", frame_shape=[],
                           frame_times_s=[])  # fmt: skip
            else:
                pixels = np.ascontiguousarray(item.frames)
                row.update(status="ok", reason="", detail="", frames=pixels.tobytes(), frame_shape=list(pixels.shape),
                           frame_times_s=[float(t) for t in item.frame_times_s])  # fmt: skip
            rows.append(row)  # pixels copied: the view is only valid until the next window is requested
            if len(rows) == _WINDOWS_PER_BLOCK:
                yield _table(rows)
                rows = []
        if rows:
            yield _table(rows)


class WindowPredictor:
    """Ray Data callable class: one model; window rows in, score rows out (``SCORE_SCHEMA``, pixels dropped).

    Args:
        model_dir: An opsvlm checkpoint directory.
        threads: torch intra-op threads.
    """

    def __init__(self, model_dir: str, threads: int = 1):
        import torch

        from opsvlm.inference import Predictor

        torch.set_num_threads(max(1, threads))
        self.predictor = Predictor.from_checkpoint(model_dir)
        self.support = timeline_for(self.predictor.task.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ok = [r for r in rows if r["status"] == "ok"]
        answers = self.predictor.predict([self.predictor.task.input_of(r) for r in ok]) if ok else []
        vectors = iter([self.support.answer_vectors(a) for a in answers])
        out = []
        for row in rows:
            record = {name: row[name] for name in SCORE_SCHEMA.names if name in row}
            if row["status"] == "ok":
                scores, following = next(vectors)
                record.update(scores=scores.tolist(), next_scores=following.tolist())
            else:
                record.update(scores=[], next_scores=[])
            out.append(record)
        return pa.Table.from_pylist(out, schema=SCORE_SCHEMA)


def score_windows(tasks: list[dict], model_dir: str, spec: SamplingSpec, config: AnnotateConfig) -> list[dict]:
    """Run the decode and predict stages; one score row per planned window (rejected ones included)."""
    import ray.data

    dataset = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=max(1, len(tasks)))
    scored = dataset.map_batches(
        decode_windows,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"spec": spec, "deadline_s": config.decode_deadline_s},
        num_cpus=config.decode_num_cpus,
    ).map_batches(
        WindowPredictor,
        fn_constructor_kwargs={"model_dir": model_dir, "threads": int(config.cpus_per_actor)},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        max_restarts=0,  # a predictor that dies fails the job loudly (a restart could not re-fetch its arguments)
    )
    return scored.take_all()


# --- the job ---------------------------------------------------------------------------------------------------


@dataclass
class AnnotateResult:
    """What one annotation run produced.

    Attributes:
        summary: The job's summary (also ``<out>/summary.json``; its headline is the job's last line).
        annotations: The recordings' annotations (``opsvlm.tasks.operations.timeline.SessionAnnotation``).
        scores: ``{system: metrics}`` over the recordings with truth (``{}`` without).
        run_id: The MLflow annotation run ("" when not logged).
    """

    summary: dict
    annotations: list
    scores: dict
    run_id: str = ""


def _windows_of(rows: list[dict]) -> tuple[WindowScores | None, list[dict]]:
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["window"])
    rejected = [
        {"start_s": r["start_s"], "end_s": r["end_s"], "reason": r["reason"], "detail": r["detail"]}
        for r in sorted(rows, key=lambda r: r["window"])
        if r["status"] != "ok"
    ]
    if not ok:
        return None, rejected
    windows = WindowScores(
        [r["start_s"] for r in ok],
        [r["end_s"] for r in ok],
        np.array([r["scores"] for r in ok]),
        np.array([r["next_scores"] for r in ok]),
    )
    return windows, rejected


def score_table(scores: dict[str, dict]) -> str:
    """Fixed-width text table: one row per system, the headline metrics with their 95% intervals."""
    header = f"{'system':<28}" + "".join(f"{m:>30}" for m in HEADLINE)
    lines = [header, "-" * len(header)]
    for system, values in scores.items():
        cells = []
        for m in HEADLINE:
            value = values.get(m)
            low, high = values.get(f"{m}_ci95", [float("nan")] * 2)
            if value is None or not np.isfinite(value):
                cells.append("n/a")
            else:
                cells.append(f"{value:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"{system:<28}" + "".join(f"{c:>30}" for c in cells))
    return "\n".join(lines)


def annotate(config: AnnotateConfig) -> AnnotateResult:
    """Annotate every recording of ``config.sources``; write the files; score and log when there is truth.

    Ray must be initialised (``opsvlm.runtime.init_ray``).

    Raises:
        ValueError / FileNotFoundError / ``opsvlm.registry.ModelRefError``: naming the field or path, for a model
            that is not a timeline task's, missing sources, or an unresolvable model reference.
    """
    from opsvlm import registry
    from opsvlm.model.checkpoint import read_model_meta, sampling_spec_of
    from opsvlm.tracking import resolve_tracking_uri

    if not config.model or not config.sources or not config.out:
        raise ValueError("model, sources and out are required")
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    model_dir = str(registry.resolve_model(config.model, tracking_uri))
    meta = read_model_meta(model_dir)
    timeline_for(meta["task"])  # refuses a model whose task has no timeline, before any work
    spec = sampling_spec_of(model_dir)
    window_s = config.window_s or model_window_s(model_dir)
    stride_s = config.stride_s or window_s / 2
    grammar = load_grammar(config.grammar, model_dir)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    grammar.save(out / "grammar.json")
    recordings, skipped = find_recordings(config.sources)
    print(f"annotate: {len(recordings)} recordings, window {window_s:g} s, stride {stride_s:g} s, grammar: "
          f"{grammar.source}", flush=True)  # fmt: skip

    started = time.perf_counter()
    planned, failed = [], []
    for recording in recordings:
        try:
            planned.append(plan_recording(recording, spec, window_s, stride_s, config.decode_deadline_s))
        except TimelineError as exc:
            failed.append({"recording": recording.key, "reason": exc.reason, "detail": str(exc)})
    rows = score_windows(plan_tasks(planned, config.windows_per_task), model_dir, spec, config) if planned else []
    by_key: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_key[row["key"]].append(row)

    annotations = []
    for p in planned:
        windows, rejected = _windows_of(by_key.get(p.recording.key, []))
        if windows is None:
            first = rejected[0] if rejected else {"reason": "no_windows", "detail": "no window came back"}
            failed.append({"recording": p.recording.key, "reason": first["reason"], "detail": first["detail"]})
            continue
        annotations.append(
            annotation_of(p, windows, grammar, window_s, stride_s, rejected, config.decoder, config.emission_weight)
        )
    seconds = float(sum(p.seconds for p in planned if any(a.media == p.recording.media for a in annotations)))
    elapsed = time.perf_counter() - started  # decode + predict + fuse/decode (files and MLflow not included)

    scores = _score(annotations, config)
    primary = GRAMMAR_SYSTEM if config.decoder == "viterbi" else ARGMAX_SYSTEM
    for annotation in annotations:
        own = {system: score_sessions([s], resamples=0) for system, s in annotation.stats().items()}
        write_session(out, annotation, own or None)
        if config.plots:
            from opsvlm.tasks.operations.timeline.plot import gantt_png

            gantt_png(annotation, out / f"{session_stem(annotation)}.png")
    write_figures(out / "figures.csv", annotations)

    summary = {
        "sessions": len(annotations),
        "seconds_annotated": round(seconds, 3),
        "realtime_factor": round(seconds / elapsed, 3) if elapsed > 0 else None,
        "elapsed_s": round(elapsed, 3),
        "windows": int(sum(a.windows for a in annotations)),
        "windows_rejected": int(sum(len(a.rejected) for a in annotations)),
        "window_s": window_s,
        "stride_s": stride_s,
        "decoder": config.decoder,
        "grammar": grammar.source,
        "model": config.model,
        "failed": failed,
        "skipped": skipped,
        "sessions_scored": int(scores[primary]["sessions"]) if scores else 0,
    }
    if scores:
        summary.update(
            frame_macro_f1=scores[primary]["frame_macro_f1"],
            frame_macro_f1_ci95=scores[primary]["frame_macro_f1_ci95"],
            edit_score=scores[primary]["edit_score"],
            f1_at_50=scores[primary]["f1_at_50"],
            next_accuracy_at_boundaries=scores[primary]["next_accuracy_at_boundaries"],
            majority_frame_macro_f1=scores[MAJORITY_SYSTEM]["frame_macro_f1"],
            argmax_frame_macro_f1=scores[ARGMAX_SYSTEM]["frame_macro_f1"],
            grammar_frame_macro_f1=scores[GRAMMAR_SYSTEM]["frame_macro_f1"],
        )
    write_json(out / "scores.json", scores)
    run_id = _log_run(config, summary, scores, annotations, out, tracking_uri) if config.log_to_mlflow else ""
    summary["run_id"] = run_id
    write_json(out / "summary.json", summary)
    return AnnotateResult(summary, annotations, scores, run_id)


def _score(annotations: list, config: AnnotateConfig) -> dict[str, dict]:
    """Per system, the metrics over the recordings with truth (``{}`` when none has any)."""
    per_system: dict[str, list] = defaultdict(list)
    for annotation in annotations:
        for system, stats in annotation.stats().items():
            per_system[system].append(stats)
    return {system: score_sessions(stats, resamples=config.bootstrap_resamples) for system, stats in per_system.items()}


def _metric_key(name: str) -> str:
    return name.replace("/", "_").replace(" ", "_").replace(",", "").replace("+", "plus")


def _log_run(config: AnnotateConfig, summary: dict, scores: dict, annotations: list, out: Path, tracking_uri: str):
    """One MLflow run of ``opsvlm.job = annotate``, linked to the model (its training run as parent, the registry
    version as tags): the summary metrics, every system's metrics (``baseline/<system>/...``), the score table, the
    Gantt pictures and the output files."""
    import mlflow

    from opsvlm import registry
    from opsvlm.tracking import ensure_experiment

    described = registry.describe_model(config.model, tracking_uri)
    train_run_id = described.get("run_id", "")
    tags = {"opsvlm.job": "annotate", "opsvlm.model_ref": config.model}
    if "name" in described:
        tags.update({"opsvlm.model_name": described["name"], "opsvlm.model_version": str(described["version"])})
    if train_run_id:
        tags.update({"mlflow.parentRunId": train_run_id, "opsvlm.train_run_id": train_run_id})
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    primary = GRAMMAR_SYSTEM if config.decoder == "viterbi" else ARGMAX_SYSTEM
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None, tags=tags) as run:
        params = {k: v for k, v in to_dict(config).items() if k != "tracking"}
        params.update(sources=",".join(config.sources), window_s=summary["window_s"], stride_s=summary["stride_s"],
                      grammar_source=summary["grammar"])  # fmt: skip
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        metrics = {k: summary[k] for k in ("sessions", "seconds_annotated", "realtime_factor", "windows_rejected")}
        if scores:
            for name in HEADLINE:
                value = scores[primary].get(name)
                metrics[name] = value
                low, high = scores[primary].get(f"{name}_ci95", [None, None])
                metrics[f"{name}_ci95_low"], metrics[f"{name}_ci95_high"] = low, high
            for system, values in scores.items():
                for name in HEADLINE:
                    metrics[f"baseline/{_metric_key(system)}/{name}"] = values.get(name)
            metrics.update(
                {f"per_class/{_metric_key(k[3:])}": v for k, v in scores[primary].items() if k.startswith("f1/")}
            )
            mlflow.log_text(score_table(scores), "scores.txt")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))})
        mlflow.log_dict(summary, "summary.json")
        for path in sorted(out.glob("*.png")):
            mlflow.log_artifact(str(path), "plots")
        for pattern in ("*.json", "*.csv"):
            for path in sorted(out.glob(pattern)):
                mlflow.log_artifact(str(path), "timelines")
    return run.info.run_id


__all__ = [
    "HEADLINE",
    "SCORE_SCHEMA",
    "WINDOW_SCHEMA",
    "AnnotateConfig",
    "AnnotateResult",
    "WindowPredictor",
    "annotate",
    "decode_windows",
    "plan_tasks",
    "score_table",
    "score_windows",
]
