"""Batch inference with Ray Data on a local cluster, an evaluation run on a real MLflow server, registration and
the promotion gate on top of it."""

import mlflow
import pyarrow.parquet as pq
import pytest

from opsvlm import registry
from opsvlm.evaluate.run import EvalConfig, evaluate, format_table
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.train.config import TrackingSettings
from opsvlm.train.loop import fit
from tests.integration.test_train import artifact_paths, read_rows, train_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)


def test_evaluation_run_baselines_and_promotion(ray_local, prepared_clips, tiny_model_dir, mlflow_server, tmp_path):
    trained = fit(train_config(prepared_clips, tiny_model_dir, tmp_path / "ray", mlflow_server))
    tracking = TrackingSettings(tracking_uri=mlflow_server, experiment="test-eval")
    result = evaluate(
        EvalConfig(
            model=trained.run_id,
            data=str(prepared_clips),
            split="test",
            batch_size=4,
            cpus_per_actor=0.5,
            tracking=tracking,
            out=str(tmp_path / "eval"),
        )
    )

    # every held-out clip is predicted, with a valid answer (constrained decoding)
    truth = read_rows(prepared_clips, "test")
    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert sorted(p["clip_id"] for p in predictions) == sorted(r["clip_id"] for r in truth)
    for p in predictions:
        assert p["valid"] and p["pred_operation"] in LABEL_NAMES and p["pred_next_operation"] in LABEL_NAMES
        assert 0 <= p["pred_start_s"] < p["pred_end_s"] <= p["end_s"] - p["start_s"] + 1e-9
    assert result.metrics["n_clips"] == len(truth) and result.metrics["parse_failure_rate"] == 0.0

    # baselines side by side, on the same clips
    assert {
        "fine-tuned",
        "majority",
        "fine-tuned + grammar",
        "oracle op + grammar",
        "zero-shot base",
        "fine-tuned, free generation",
    } <= set(result.table)
    assert result.table["oracle op + grammar"]["oca"] == 1.0
    assert "majority" in format_table(result.table)

    # the MLflow evaluation run is linked to its training run and holds metrics, tables, plots and predictions
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id
    assert run.data.tags["opsvlm.eval_split"] == result.eval_split
    for key in (
        "oca",
        "tiou_at_0_5",
        "mean_tiou",
        "aa_at_1",
        "weighted_score",
        "macro_f1",
        "parse_failure_rate",
        "baseline/majority/oca",
        "baseline/zero-shot_base/weighted_score",
    ):
        assert key in run.data.metrics, key
    artifacts = artifact_paths(client, result.run_id)
    for path in (
        "plots/confusion_operation.png",
        "plots/confusion_next_operation.png",
        "plots/per_class_recall.png",
        "predictions/predictions.parquet",
        "baselines.txt",
        "examples.png",
        "eval_summary.json",
    ):
        assert path in artifacts, path

    # registration + the gate: first version becomes champion, an identical score does not replace it
    first = registry.register_version(
        trained.run_id,
        metrics=result.metrics,
        eval_split=result.eval_split,
        eval_run_id=result.run_id,
        tracking_uri=mlflow_server,
        name="opsvlm-eval-test",
    )
    assert registry.promote("opsvlm-eval-test", first.version, tracking_uri=mlflow_server).promoted
    second = registry.register_version(
        trained.run_id,
        metrics=result.metrics,
        eval_split=result.eval_split,
        eval_run_id=result.run_id,
        tracking_uri=mlflow_server,
        name="opsvlm-eval-test",
    )
    kept = registry.promote("opsvlm-eval-test", second.version, tracking_uri=mlflow_server)
    assert not kept.promoted and "KEPT" in str(kept)
    champion = registry.resolve_model("models:/opsvlm-eval-test@champion", mlflow_server, tmp_path / "cache")
    assert (champion / "adapter" / "adapter_model.safetensors").is_file()
