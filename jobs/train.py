"""Fine-tune a Qwen2-VL-family model on prepared clips with Ray Train (QLoRA / LoRA, DDP or DeepSpeed).

Run on a laptop (local Ray on 127.0.0.1, local MLflow store in ./mlruns)::

    python jobs/train.py --config jobs/configs/tiny_cpu.yaml data.prepared=data/prepared

Submit to a cluster (T4 workers, QLoRA on the 3B model)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/t4_qlora_3b.yaml data.prepared=/mnt/prepared

Continue a run whose driver died (same MLflow run, from its latest committed checkpoint; its recorded config, with
any ``key=value`` overrides on top)::

    python jobs/train.py --resume <mlflow run id> tracking.tracking_uri=http://127.0.0.1:5000

Before any worker starts, the memory planner checks the configuration against ``scaling.gpu_type`` and refuses
one that does not fit, printing the breakdown. Any field of ``opsvlm.train.config.TrainConfig`` can be overridden
as ``key=value``. The last line printed is one JSON object: ``steps``, ``planned_steps``, ``first_loss``,
``final_loss``, ``compute_dtype``, ``loss_scale`` (null without loss scaling), ``skipped_steps``, ``mlflow_run_id``,
``checkpoint`` and the final ``metrics``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from opsvlm.config import load_config
from opsvlm.data.prepared import read_manifest
from opsvlm.model import checkpoint as ckpt
from opsvlm.runtime import init_ray
from opsvlm.train.config import TrainConfig
from opsvlm.train.loop import TrainResult, fit


def memory_plan(config: TrainConfig) -> dict | None:
    """The planner's verdict for this config on ``scaling.gpu_type`` (``None`` for CPU runs)."""
    if not config.scaling.gpu_type:
        return None
    from opsvlm.model.plan import format_plan, plan_memory
    from opsvlm.testing.tiny import resolve_model_source

    spec = read_manifest(config.data.prepared)["sampling_spec"]
    side = int(spec["max_pixels"] ** 0.5)
    model = resolve_model_source(config.model.name)
    plan = plan_memory(config.plan_inputs(model, spec["frames_per_clip"], side, side, config.optim.micro_batch))
    if not plan.fits:
        raise SystemExit(f"refusing to start: the plan does not fit on {config.scaling.gpu_type}\n{format_plan(plan)}")
    return plan.to_dict()


def recorded_config(run_id: str, overrides: list[str]) -> TrainConfig:
    """The config a training run recorded (its ``train_config.json``), with ``overrides`` on top.

    The tracking URI to read it from comes from the overrides, else ``MLFLOW_TRACKING_URI``, else ``./mlruns``.
    """
    import mlflow
    import yaml

    from opsvlm.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(load_config(TrainConfig, None, overrides).tracking.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                f"runs:/{run_id}/train_config.json", dst_path=tmp, tracking_uri=uri
            )
        except Exception as exc:
            raise SystemExit(f"--resume {run_id}: cannot read the run's train_config.json from {uri}: {exc}") from None
        preset = Path(tmp) / "recorded.yaml"
        preset.write_text(yaml.safe_dump(json.loads(Path(path).read_text())))
        return load_config(TrainConfig, preset, overrides)


def summary(result: TrainResult, config: TrainConfig) -> dict:
    """The job's last line: steps against the plan, first and final training loss (from the run's history),
    compute dtype, loss scale and skipped steps."""
    from mlflow import MlflowClient

    from opsvlm.tracking import call_with_retry, resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(config.tracking.tracking_uri))
    history = call_with_retry(
        lambda: client.get_metric_history(result.run_id, "train_loss"),
        within_s=config.tracking.retry_for_s,
        what="read",
    )
    last = {}
    for metric in sorted(history, key=lambda m: (m.step, m.timestamp)):
        last[metric.step] = metric.value  # a step redone after a restart: its latest value
    metrics = result.metrics
    return {
        "steps": result.steps,
        "planned_steps": metrics.get("planned_steps"),
        "first_loss": last[min(last)] if last else None,
        "final_loss": last[max(last)] if last else None,
        "compute_dtype": ckpt.read_model_meta(result.checkpoint_dir)["compute_dtype"],
        "loss_scale": metrics.get("loss_scale"),
        "skipped_steps": metrics.get("skipped_steps", 0),
        "mlflow_run_id": result.run_id,
        "checkpoint": result.checkpoint_dir,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (jobs/configs/*.yaml)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow training run (its driver died)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)

    # 1. config (and the memory check, before any worker exists)
    if args.resume and args.config:
        parser.error("--resume continues a run with the config it recorded: give overrides, not --config")
    if args.resume:
        config = recorded_config(args.resume, args.overrides)
    else:
        config = load_config(TrainConfig, args.config, args.overrides)
    if not config.data.prepared:
        parser.error("data.prepared is required (the output folder of jobs/prepare_data.py)")
    plan = memory_plan(config)

    # 2. train with Ray Train, tracked in MLflow
    init_ray(args.address)
    extra = {"memory_plan.json": plan} if plan and not args.resume else None
    result = fit(config, extra_artifacts=extra, resume_run_id=args.resume)

    # 3. report
    print(json.dumps(summary(result, config), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
