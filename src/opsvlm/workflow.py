"""The tail every end-to-end job shares: train, choose on validation, report on test.

Both ``jobs/pipeline.py`` (video clips) and ``jobs/inspection_pipeline.py`` (inspection objects) end this way; the
task comes with the prepared data, so the same steps serve both:

3. train (Ray Train, tracked in MLflow);
4. evaluate on the validation split (role *selection*): the model and the task's baselines;
5. register the version with its validation scores and pass it through the promotion gate (paired bootstrap over the
   same validation examples as the champion's);
6. evaluate on the test split (role *report*): the model, every baseline, the base model, free generation and the
   task's variants, with 95% intervals. The test split never decides anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from opsvlm.config import load_config
from opsvlm.evaluate.run import MODEL_SYSTEM, EvalConfig, evaluate, format_table
from opsvlm.runtime import init_ray
from opsvlm.tasks.base import get_task
from opsvlm.tracking import ensure_experiment, resolve_tracking_uri, runs_page
from opsvlm.train.config import TrackingSettings, TrainConfig
from opsvlm.train.loop import fit

__all__ = ["STAGES", "start_job", "train_evaluate_promote"]

T = TypeVar("T")
STAGES = 6
"""Stages of an end-to-end job (1-2 are the job's own data stages)."""


def start_job(config_cls: type[T], preset: Path, argv: list[str] | None, doc: str) -> tuple[T, Path, TrackingSettings]:
    """The command line every end-to-end job shares: parse it, load the config, connect to Ray.

    ``--config`` (a YAML preset), ``--workdir``, ``--address`` (default ``RAY_ADDRESS``, else a local instance),
    ``--verbose`` (Ray's logs on the console) and ``<stage>.<field>=value`` overrides.

    Returns:
        The config, its resolved workdir and the MLflow settings every stage uses.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=str(preset), help="YAML preset (default: the tiny CPU one)")
    parser.add_argument("--workdir", help="output folder (default: the preset's workdir)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and worker output")
    parser.add_argument("overrides", nargs="*", help="<stage>.<field>=value overrides")
    args = parser.parse_args(argv)
    overrides = [*([f"workdir={args.workdir}"] if args.workdir else []), *args.overrides]
    config = load_config(config_cls, args.config, overrides)
    tracking = TrackingSettings(tracking_uri=config.tracking_uri, experiment=config.experiment)
    init_ray(args.address, verbose=args.verbose)
    return config, Path(config.workdir).resolve(), tracking


def train_evaluate_promote(
    train: TrainConfig,
    evaluation: EvalConfig,
    *,
    prepared: Path,
    workdir: Path,
    tracking: TrackingSettings,
    model_name: str,
    seed: int,
    say: Callable[[str], None] = print,
) -> dict:
    """Stages 3-6 of an end-to-end job, one line each, then the test table and one JSON line.

    Args:
        train: Training config (its ``data.prepared``, ``storage_path`` and ``tracking`` are filled in).
        evaluation: Evaluation config (its ``model``, ``data``, ``split`` and ``tracking`` are filled in).
        prepared: The prepared data folder.
        workdir: Where Ray Train keeps checkpoints (``<workdir>/ray``).
        tracking: MLflow URI and experiment for every run.
        model_name: Registered model name.
        seed: The run's seed (training: LoRA init, data order, dropout; the bootstrap resampling).
        say: Where progress lines go.

    Returns:
        The summary printed as the last line (see the README: promotion on validation, figures on test).
    """
    from opsvlm import registry

    # 3. train with Ray Train, tracked in MLflow
    started = time.perf_counter()
    train = dataclasses.replace(
        train,
        seed=seed,
        data=dataclasses.replace(train.data, prepared=str(prepared)),
        storage_path=str(workdir / "ray"),
        tracking=dataclasses.replace(tracking, run_name="train"),
    )
    with _TrainingWatcher(tracking, started_after_ms=int(time.time() * 1000), say=say):
        trained = fit(train)
    say(f"[3/{STAGES}] trained: {trained.steps} steps in {time.perf_counter() - started:.0f} s, run {trained.run_id}")

    # 4. validation (selection): the model and the baselines, nothing that costs another model pass
    model_eval = dataclasses.replace(evaluation, model=trained.run_id, data=str(prepared), seed=seed)
    val = evaluate(
        dataclasses.replace(
            model_eval,
            split="val",
            base_model=False,
            free_generation=False,
            variants=False,
            tracking=dataclasses.replace(tracking, run_name="evaluate-val"),
        ),
        progress=lambda line: say(f"      val: {line}"),
    )
    task = get_task(val.task)
    metric = task.headline_metric
    low, high = val.intervals[MODEL_SYSTEM].get(metric, [float("nan")] * 2)
    say(
        f"[4/{STAGES}] validation: {metric} {val.metrics[metric]:.3f} [{low:.3f}, {high:.3f}] "
        f"on {val.n} {task.unit} ({val.groups} groups)"
    )

    # 5. register; champion only through the paired gate on the validation examples
    uri = tracking.tracking_uri or None
    version = registry.register_version(
        trained.run_id,
        name=model_name,
        metrics=val.metrics,
        eval_split=val.eval_split,
        split_role=val.role,
        eval_run_id=val.run_id,
        intervals=val.intervals[MODEL_SYSTEM],
        tracking_uri=uri,
    )
    decision = registry.promote(model_name, version.version, tracking_uri=uri)
    say(f"[5/{STAGES}] {decision}")

    # 6. test (report only): everything, with intervals
    test = evaluate(
        dataclasses.replace(model_eval, split="test", tracking=dataclasses.replace(tracking, run_name="evaluate-test")),
        progress=lambda line: say(f"      test: {line}"),
    )
    say(f"[6/{STAGES}] test (report only, n={test.n} {task.unit}, {test.groups} groups): run {test.run_id}")
    resolved = resolve_tracking_uri(tracking.tracking_uri)
    say(f"      runs: {runs_page(resolved, ensure_experiment(tracking.experiment, resolved))}")
    say("\n" + format_table(test.table, task.table_metrics, test.intervals))

    model_ci = test.intervals[MODEL_SYSTEM]
    summary = {
        "task": task.name,
        "train_run_id": trained.run_id,
        "val_eval_run_id": val.run_id,
        "test_eval_run_id": test.run_id,
        "model_name": model_name,
        "model_version": version.version,
        "promotion_split": val.eval_split,
        "promoted": decision.promoted,
        "promotion_difference_ci95": decision.difference_ci95,
        f"val_{metric}": val.metrics[metric],
        f"val_{metric}_ci95": val.intervals[MODEL_SYSTEM].get(metric),
        f"test_{metric}": test.metrics[metric],
        f"test_{metric}_ci95": model_ci.get(metric),
        f"n_test_{task.unit}": test.n,
        "test_groups": test.groups,
        **{m: test.metrics.get(m) for m in task.table_metrics if m != metric},
        **{m: v for m, v in test.metrics.items() if m.startswith(("n_", "boundary_"))},
        **{f"{_key(name)}_test_{metric}": v[metric] for name, v in test.table.items() if name != MODEL_SYSTEM},
    }
    print(json.dumps(summary), flush=True)
    return summary


def _key(system: str) -> str:
    """A system name as a summary key prefix: ``type-majority`` -> ``type_majority``."""
    return system.replace("-", "_").replace("+", "_plus_").replace(":", "_").replace(",", "_")


class _TrainingWatcher:
    """Prints the training run's step, loss and ETA every ``every_s`` seconds while ``fit`` runs.

    Rank 0 writes its metrics to MLflow (batched); this thread reads them back from the tracking server, so progress
    reaches the driver's console without worker output (which goes to Ray's log files) and works on a cluster too.
    """

    def __init__(self, tracking: TrackingSettings, started_after_ms: int, say: Callable[[str], None], every_s=20.0):
        self.tracking, self.started_after_ms, self.say, self.every_s = tracking, started_after_ms, say, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from mlflow import MlflowClient

        uri = resolve_tracking_uri(self.tracking.tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        last_step, started = -1, time.perf_counter()
        while not self._stop.wait(self.every_s):
            try:  # progress is best effort: a failed read never disturbs training
                run = self._find_run(client)
                if run is None:
                    continue
                history = client.get_metric_history(run.info.run_id, "train_loss")
                if not history or history[-1].step == last_step:
                    continue
                last = history[-1]
                last_step = last.step
                planned = _planned_steps(run.data.params)
                line = f"      train: step {last.step}"
                if planned:
                    elapsed = time.perf_counter() - started
                    eta = elapsed / max(last.step, 1) * max(planned - last.step, 0)
                    line += f"/{planned}, loss {last.value:.3f}, ETA {eta:.0f} s"
                else:
                    line += f", loss {last.value:.3f}"
                self.say(line)
            except Exception:  # see above
                continue

    def _find_run(self, client):
        experiment = client.get_experiment_by_name(self.tracking.experiment)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`opsvlm.job` = 'train' and attributes.start_time >= {self.started_after_ms}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None


def _planned_steps(params: dict) -> int | None:
    """Optimizer steps the run will take, from its logged params (``planned_steps``, else from the data and config)."""
    import math

    try:
        if "planned_steps" in params:
            return int(params["planned_steps"])
        if params.get("optim.max_steps") not in (None, "None"):
            return int(params["optim.max_steps"])
        rows = int(params["data.train_clips"]) // int(params["scaling.num_workers"])
        micro = math.ceil(rows / int(params["optim.micro_batch"]))
        return int(params["optim.epochs"]) * max(1, math.ceil(micro / int(params["optim.grad_accum"])))
    except (KeyError, ValueError):
        return None
