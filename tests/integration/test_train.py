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
from opsvlm.model.build import LoraSettings, ModelConfig
from opsvlm.train import checkpoint as ckpt
from opsvlm.train.config import DataSettings, OptimSettings, ScalingSettings, TrackingSettings, TrainConfig
from opsvlm.train.examples import collate, encode_row
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
    } <= artifacts, artifacts
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
    batch = collate([encode_row(processor, read_rows(prepared_clips, "val")[0])], processor.tokenizer.pad_token_id)
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
