"""The tail every end-to-end job shares: train on prepared data, evaluate the run, register it and promote it.

Both ``jobs/pipeline.py`` (video clips) and ``jobs/inspection_pipeline.py`` (inspection objects) end this way; the
task comes with the prepared data, so the same three steps serve both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from opsvlm.evaluate.run import EvalConfig, evaluate, format_table
from opsvlm.train.config import TrackingSettings, TrainConfig
from opsvlm.train.loop import fit


def train_evaluate_promote(
    train: TrainConfig,
    evaluation: EvalConfig,
    *,
    prepared: Path,
    workdir: Path,
    tracking: TrackingSettings,
    model_name: str,
) -> dict:
    """Steps 3-5 of an end-to-end job, printed as ``[3/5]`` ... ``[5/5]``, then the metrics table and one JSON line.

    Args:
        train: Training config (its ``data.prepared``, ``storage_path`` and ``tracking`` are filled in).
        evaluation: Evaluation config (its ``model``, ``data`` and ``tracking`` are filled in).
        prepared: The prepared data folder.
        workdir: Where Ray Train keeps checkpoints (``<workdir>/ray``).
        tracking: MLflow URI and experiment for both runs.
        model_name: Registered model name.

    Returns:
        The summary printed as the last line: run ids, version, whether it was promoted, the headline metric.
    """
    from opsvlm import registry

    # 3. train with Ray Train, tracked in MLflow
    train = dataclasses.replace(
        train,
        data=dataclasses.replace(train.data, prepared=str(prepared)),
        storage_path=str(workdir / "ray"),
        tracking=dataclasses.replace(tracking, run_name="train"),
    )
    trained = fit(train)
    print(f"[3/5] trained: run {trained.run_id}, {trained.steps} steps", flush=True)

    # 4. evaluate on the held-out split, next to the baselines
    evaluation = dataclasses.replace(
        evaluation,
        model=trained.run_id,
        data=str(prepared),
        tracking=dataclasses.replace(tracking, run_name="evaluate"),
    )
    evaluated = evaluate(evaluation)
    print(f"[4/5] evaluated: run {evaluated.run_id}", flush=True)

    # 5. register; champion only if better than the current one on the task's headline metric
    uri = tracking.tracking_uri or None
    version = registry.register_version(
        trained.run_id,
        name=model_name,
        metrics=evaluated.metrics,
        eval_split=evaluated.eval_split,
        eval_run_id=evaluated.run_id,
        tracking_uri=uri,
    )
    decision = registry.promote(model_name, version.version, tracking_uri=uri)
    print(f"[5/5] {decision}", flush=True)

    metric = registry.score_metric(version.tags["task"])
    summary = {
        "train_run_id": trained.run_id,
        "eval_run_id": evaluated.run_id,
        "model_name": model_name,
        "model_version": version.version,
        "promoted": decision.promoted,
        metric: evaluated.metrics[metric],
    }
    print("\n" + format_table(evaluated.table))
    print(json.dumps(summary), flush=True)
    return summary
