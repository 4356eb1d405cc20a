"""Ray Train fine-tuning of the tiny model on a real local Ray cluster, tracked in a real MLflow server."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from opsvlm.model import build
from opsvlm.model import checkpoint as ckpt
from opsvlm.model.build import LoraSettings, ModelConfig
from opsvlm.model.prompt import collate, encode_row
from opsvlm.testing.processes import MlflowServer
from opsvlm.train.config import DataSettings, OptimSettings, ScalingSettings, TrackingSettings, TrainConfig
from opsvlm.train.loop import fit
from opsvlm.video.sampling import SamplingSpec
from tests.integration.conftest import FRAME_SIZE, FRAMES_PER_CLIP

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEP_METRICS = ("train_loss", "learning_rate", "samples_per_s", "tokens_per_s")


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """``fit`` points the process-wide MLflow tracking URI (and MLFLOW_TRACKING_URI) at the server: undo that."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)


def train_config(prepared: Path, model_dir: Path, storage: Path, tracking_uri: str, **overrides) -> TrainConfig:
    """Two CPU workers, fp32 LoRA on the tiny model, one clip per micro-batch."""
    config = TrainConfig(
        model=ModelConfig(
            name=str(model_dir),
            quantization="none",
            compute_dtype="float32",
            lora=LoraSettings(rank=8, alpha=16, dropout=0.0, targets="language_vision"),
        ),
        data=DataSettings(prepared=str(prepared)),
        optim=OptimSettings(lr=2e-3, micro_batch=1, grad_accum=1, max_steps=6),
        scaling=ScalingSettings(num_workers=2, cpus_per_worker=0.9),
        tracking=TrackingSettings(tracking_uri=tracking_uri, experiment="test-train"),
        checkpoint_every_steps=3,
        storage_path=str(storage),
    )
    return dataclasses.replace(config, **overrides)


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for info in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return paths


def read_rows(prepared: Path, split: str) -> list[dict]:
    files = sorted((prepared / "clips" / f"split={split}").glob("*.parquet"))
    return pq.ParquetDataset(files).read().to_pylist()


def test_two_worker_run_logs_to_mlflow_server_and_checkpoint_serves(
    ray_local, mlflow_server, prepared_clips, tiny_model_dir, tmp_path
):
    from mlflow import MlflowClient

    config = train_config(prepared_clips, tiny_model_dir, tmp_path / "ray", mlflow_server)
    # Metrics written in batches of 2 steps, and at the step-3 checkpoint and the end: every path of the buffer.
    config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, log_every_steps=2))
    result = fit(config)
    assert result.steps == 6 and result.metrics["step"] == 6

    # The run on the server: finished, with the config as params and one value per optimizer step.
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == str(tiny_model_dir)
    assert params["model.quantization"] == "none" and params["model.lora.targets"] == "language_vision"
    assert params["optim.max_steps"] == "6" and params["scaling.num_workers"] == "2"
    assert int(params["data.train_clips"]) == len(read_rows(prepared_clips, "train"))
    assert int(params["model_report.lora_modules"]) == 36
    assert run.data.tags["opsvlm.checkpoint"] == result.checkpoint_dir
    for key in STEP_METRICS:
        assert metric_steps(client, result.run_id, key) == [1, 2, 3, 4, 5, 6], key
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert all(m.value > 0 for m in client.get_metric_history(result.run_id, "tokens_per_s"))
    # Each step keeps its own wall-clock timestamp although the values were written in batches.
    stamps = [m.timestamp for m in sorted(losses, key=lambda m: m.step)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    # Every worker's peak RSS, in the final metrics and in the run (a real process holds at least the model).
    for rank in (0, 1):
        (rss,) = client.get_metric_history(result.run_id, f"peak_rss_mb_rank{rank}")
        assert rss.step == 6 and rss.value == result.metrics[f"peak_rss_mb_rank{rank}"] and rss.value > 100
    per_rank = [result.metrics["peak_rss_mb_rank0"], result.metrics["peak_rss_mb_rank1"]]
    assert result.metrics["peak_rss_mb"] == max(per_rank)
    val_losses = client.get_metric_history(result.run_id, "val_loss")
    assert val_losses and all(math.isfinite(m.value) for m in val_losses)

    artifacts = artifact_paths(client, result.run_id)
    assert {
        "checkpoint/adapter/adapter_model.safetensors",
        "checkpoint/adapter/adapter_config.json",
        "checkpoint/model.json",
        "sampling_spec.json",
        "train_config.json",
        "contact_sheet.png",
        ckpt.COMPLETE_MARKER,
    } <= artifacts, artifacts
    # What a model version is made of: adapter, processor, model.json; no optimizer, RNG or trainer state.
    assert {p.split("/")[1] for p in artifacts if p.startswith("checkpoint/")} == set(ckpt.REGISTERED_FILES)
    assert ckpt.upload_complete(client, result.run_id)
    # fp32: no loss scaling, no skipped steps
    assert result.metrics["skipped_steps"] == 0 and "loss_scale" not in result.metrics
    assert result.metrics["planned_steps"] == 6 and not client.get_metric_history(result.run_id, "loss_scale")
    downloaded = client.download_artifacts(result.run_id, "checkpoint/adapter/adapter_model.safetensors", tmp_path)
    final = Path(result.checkpoint_dir)
    assert Path(downloaded).read_bytes() == (final / ckpt.ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    logged_spec = json.loads(Path(client.download_artifacts(result.run_id, "sampling_spec.json", tmp_path)).read_text())
    assert SamplingSpec(**logged_spec) == SamplingSpec(frames_per_clip=FRAMES_PER_CLIP, max_pixels=FRAME_SIZE**2)

    # The final checkpoint verifies, records what serving needs, and its adapter reloads on top of the base.
    assert ckpt.verify_adapter(final) > 0
    meta = ckpt.read_model_meta(final)
    assert meta["step"] == 6 and meta["base_model"] == str(tiny_model_dir)
    assert ckpt.sampling_spec_of(final) == SamplingSpec(**logged_spec)
    model_config = ModelConfig(name=str(tiny_model_dir), quantization="none", compute_dtype="float32")
    model = build.load_for_inference(tiny_model_dir, final / ckpt.ADAPTER_DIR, model_config)
    base = build.load_base_model(model_config).eval()
    processor = build.load_processor(final / ckpt.PROCESSOR_DIR)
    row = read_rows(prepared_clips, "val")[0]
    batch = collate([encode_row(processor, row, "operations")], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        tuned, plain = model(**batch).logits, base(**batch).logits
    assert torch.isfinite(tuned).all()
    assert (tuned - plain).abs().max() > 1e-3  # the trained adapter is loaded, not an empty one


@pytest.mark.parametrize(
    "zero_stage",
    [pytest.param(0, id="ddp"), pytest.param(2, id="zero2", marks=pytest.mark.slow)],
)
def test_killed_worker_resumes_from_latest_checkpoint_without_redoing_steps(
    ray_local, mlflow_server, prepared_clips, tiny_model_dir, tmp_path, zero_stage
):
    from mlflow import MlflowClient

    every, kill_at, max_steps = 2, 3, 6
    storage = tmp_path / "ray"
    config = train_config(
        prepared_clips,
        tiny_model_dir,
        storage,
        mlflow_server,
        checkpoint_every_steps=every,
        kill_worker_at_step=kill_at,
        max_failures=1,
    )
    config = dataclasses.replace(config, scaling=dataclasses.replace(config.scaling, zero_stage=zero_stage))
    result = fit(config)

    markers = list(storage.glob("train-*.killed"))
    assert [m.name for m in markers] == [f"train-{result.run_id}.killed"]  # the worker really died once
    assert result.steps == max_steps
    final = Path(result.checkpoint_dir)
    assert ckpt.read_model_meta(final)["step"] == max_steps and ckpt.verify_adapter(final) > 0
    if zero_stage:  # every rank's optimizer partition made it into the one checkpoint directory
        assert len(list((final / ckpt.DEEPSPEED_DIR).rglob("zero_pp_rank_*_optim_states.pt"))) == 2

    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    resumed_from = (kill_at // every) * every  # the latest checkpoint before the kill
    history = client.get_metric_history(result.run_id, "train_loss")
    counts = Counter(m.step for m in history)
    assert set(counts) == set(range(1, max_steps + 1)), counts
    # Steps up to the checkpoint were not redone; only those between it and the kill may have been logged twice.
    assert all(counts[s] == 1 for s in range(1, resumed_from + 1)), (
        f"steps up to the step-{resumed_from} checkpoint were redone after the restart: {sorted(counts.items())}"
    )
    assert all(counts[s] <= 2 for s in range(resumed_from + 1, kill_at + 1)), counts
    assert all(counts[s] == 1 for s in range(kill_at + 1, max_steps + 1)), counts
    # Optimizer and scheduler state came back too: every logged learning rate, before and after the restart, is the
    # cosine schedule's value at that step (a fresh scheduler would restart the schedule at the resumed step).
    lr = config.optim.lr
    for metric in client.get_metric_history(result.run_id, "learning_rate"):
        expected = lr * 0.5 * (1 + math.cos(math.pi * metric.step / max_steps))  # no warm-up step at 6 x 0.05
        assert metric.value == pytest.approx(expected, rel=1e-5), (metric.step, metric.value)


def _load_train_job():
    spec = importlib.util.spec_from_file_location("opsvlm_job_train", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_job_refuses_a_plan_that_does_not_fit(prepared_clips, tmp_path):
    job = _load_train_job()
    storage, store = tmp_path / "ray", tmp_path / "mlflow"
    argv = [
        "--config",
        str(REPO / "jobs" / "configs" / "tiny_cpu.yaml"),
        f"data.prepared={prepared_clips}",
        f"storage_path={storage}",
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        "scaling.gpu_type=T4",
        "model.name=Qwen/Qwen2.5-VL-72B-Instruct",
        "model.quantization=none",
    ]
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    message = str(exit_info.value.code)
    assert "refusing to start" in message and "does not fit on T4" in message
    assert "Qwen/Qwen2.5-VL-72B-Instruct on T4" in message and "DOES NOT FIT" in message
    for component in ("weights", "adapters", "gradients", "optimizer_states", "activations", "total"):
        assert component in message, component  # the breakdown, not just a verdict
    # Nothing started: no Ray Train storage, no MLflow store.
    assert not storage.exists() and not store.exists()


def test_train_job_rejects_zero3_with_nf4_before_starting(ray_local, prepared_clips, tmp_path):
    # A CPU run has no gpu_type, so the memory planner does not look at it: the config itself must refuse. (ray_local:
    # should the refusal be missing, the job runs on the test's 2-CPU Ray instead of starting its own.)
    job = _load_train_job()
    storage = tmp_path / "ray"
    argv = [
        "--config",
        str(REPO / "jobs" / "configs" / "tiny_cpu.yaml"),
        f"data.prepared={prepared_clips}",
        f"storage_path={storage}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        "model.quantization=nf4",
        "scaling.zero_stage=3",
    ]
    with pytest.raises(ValueError, match="ZeRO-3") as error:
        job.main(argv)
    assert "ZeRO-2" in str(error.value)  # the message says what to use instead
    assert not storage.exists() and not (tmp_path / "mlflow").exists()


def last_value_per_step(client, run_id: str, key: str) -> dict[int, float]:
    """A metric's history, one value per step: the latest (a step redone after a restart counts once)."""
    values: dict[int, float] = {}
    for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        values[metric.step] = metric.value
    return values


def test_a_killed_and_resumed_fp16_run_repeats_the_uninterrupted_loss_curve(
    ray_local, mlflow_server, prepared_clips, tiny_model_dir, tmp_path
):
    """fp16 on CPU (autocast + GradScaler, the T4 preset's numerics), grad_accum 3 over 7 rows per worker (steps of
    3 + 3 + 1 micro-batches: an epoch tail), LoRA dropout (the RNG state matters), a worker killed mid-epoch: the
    resumed run's loss at every step equals the uninterrupted run's."""
    from mlflow import MlflowClient

    def config(storage: Path, kill_at: int | None) -> TrainConfig:
        base = train_config(prepared_clips, tiny_model_dir, storage, mlflow_server)
        return dataclasses.replace(
            base,
            model=dataclasses.replace(
                base.model, compute_dtype="float16", lora=dataclasses.replace(base.model.lora, dropout=0.1)
            ),
            optim=dataclasses.replace(base.optim, grad_accum=3, epochs=2, max_steps=None),
            checkpoint_every_steps=2,
            kill_worker_at_step=kill_at,
            max_failures=1 if kill_at else 0,
        )

    rows = len(read_rows(prepared_clips, "train"))
    per_worker = rows // 2
    steps_per_epoch = math.ceil(per_worker / 3)
    planned = 2 * steps_per_epoch
    assert per_worker % 3, "the fixture must leave an epoch tail"
    kill_at = steps_per_epoch + 2  # mid-epoch 1, after the checkpoint of step steps_per_epoch + 1 or + 2

    killed = fit(config(tmp_path / "killed", kill_at))
    assert list((tmp_path / "killed").glob("train-*.killed")), "the worker did not die"
    clean = fit(config(tmp_path / "clean", None))
    assert killed.steps == clean.steps == planned == killed.metrics["planned_steps"]

    client = MlflowClient(tracking_uri=mlflow_server)
    resumed_curve = last_value_per_step(client, killed.run_id, "train_loss")
    clean_curve = last_value_per_step(client, clean.run_id, "train_loss")
    assert sorted(resumed_curve) == sorted(clean_curve) == list(range(1, planned + 1))
    for step in clean_curve:
        assert resumed_curve[step] == pytest.approx(clean_curve[step], rel=1e-5), (step, resumed_curve, clean_curve)
    # The fp16 machinery, logged per step: the loss scale and the skipped-step count.
    scales = last_value_per_step(client, killed.run_id, "loss_scale")
    skipped = last_value_per_step(client, killed.run_id, "skipped_steps")
    assert sorted(scales) == sorted(skipped) == list(range(1, planned + 1))
    assert all(v > 0 for v in scales.values()) and killed.metrics["loss_scale"] == scales[planned]
    assert killed.metrics["skipped_steps"] == skipped[planned] == clean.metrics["skipped_steps"]
    assert ckpt.read_model_meta(killed.checkpoint_dir)["compute_dtype"] == "float16"


def test_resume_after_the_driver_was_killed_continues_the_same_mlflow_run(
    ray_local, mlflow_server, prepared_clips, tiny_model_dir, tmp_path, capsys
):
    import subprocess
    import sys

    import ray
    from mlflow import MlflowClient

    storage = tmp_path / "ray"
    experiment = "test-train-driver-death"
    overrides = [
        f"data.prepared={prepared_clips}",
        f"model.name={tiny_model_dir}",
        "model.lora.modules_to_save=[]",
        "model.lora.rank=8",
        "optim.micro_batch=1",
        "optim.max_steps=4",
        "checkpoint_every_steps=2",
        f"storage_path={storage}",
        f"tracking.tracking_uri={mlflow_server}",
        f"tracking.experiment={experiment}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    driver = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train.py"),
            "--config",
            str(REPO / "jobs" / "configs" / "tiny_cpu.yaml"),
            "--address",
            ray.get_runtime_context().gcs_address,
            *overrides,
            "kill_driver_at_step=2",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert driver.returncode == -9, driver.stderr[-3000:]  # SIGKILLed after the step-2 checkpoint
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "RUNNING" and not ckpt.upload_complete(client, run.info.run_id)

    job = _load_train_job()
    assert job.main(["--resume", run.info.run_id, f"tracking.tracking_uri={mlflow_server}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mlflow_run_id"] == run.info.run_id
    assert summary["steps"] == summary["planned_steps"] == 4
    assert summary["compute_dtype"] == "float32" and summary["loss_scale"] is None and summary["skipped_steps"] == 0
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    counts = Counter(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert set(counts) == {1, 2, 3, 4} and counts[1] == counts[2] == 1, counts  # steps 1-2 were not redone
    assert ckpt.upload_complete(client, run.info.run_id)


def test_an_mlflow_outage_during_training_does_not_fail_the_run(
    ray_local, prepared_clips, tiny_model_dir, tmp_path_factory, tmp_path
):
    """The tracking server is stopped after the first checkpoint and started again once a later one exists: rank 0
    keeps the metrics it could not write and writes them afterwards; no worker dies, nothing is lost."""
    import threading
    import time

    from mlflow import MlflowClient

    server = MlflowServer(tmp_path_factory.mktemp("outage_server"))
    server.start()
    storage = tmp_path / "ray"
    config = train_config(prepared_clips, tiny_model_dir, storage, server.url)
    config = dataclasses.replace(
        config,
        optim=dataclasses.replace(config.optim, max_steps=8),
        checkpoint_every_steps=2,
        keep_checkpoints=10,
        tracking=dataclasses.replace(config.tracking, log_every_steps=1, log_system_metrics=False),
    )
    events: list[str] = []

    def outage() -> None:
        def checkpoints() -> int:
            return len(list(storage.glob("train-*/checkpoint_*")))

        while checkpoints() < 1:
            time.sleep(0.5)
        server.stop()
        events.append("stopped")
        seen, stopped_at = checkpoints(), time.monotonic()
        while checkpoints() == seen and time.monotonic() - stopped_at < 60:
            time.sleep(0.5)  # until a checkpoint was written (its metric flush failed) or a minute passed
        server.start()
        events.append("started")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = fit(config)
        thread.join(timeout=120)
        client = MlflowClient(tracking_uri=server.url)
        history = client.get_metric_history(result.run_id, "train_loss")
        status = client.get_run(result.run_id).info.status
        complete = ckpt.upload_complete(client, result.run_id)
    finally:
        server.stop()
    assert events == ["stopped", "started"]
    assert result.steps == 8
    assert sorted(m.step for m in history) == list(range(1, 9))  # every step written once, none lost
    assert status == "FINISHED" and complete
