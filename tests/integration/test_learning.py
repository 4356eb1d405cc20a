"""Proof that learning works: the README's main job on its embedded defaults beats the majority baseline on
held-out subjects. Marked slow (about 10 minutes of training on 2 cores); run with ``pytest -m slow``."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_defaults_beat_the_majority_baseline_on_held_out_subjects(tmp_path, capsys):
    import jobs.pipeline as pipeline

    workdir = tmp_path / "pipeline"
    assert pipeline.main(["--workdir", str(workdir), f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["promoted"] is True

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(summary["eval_run_id"]).data.metrics
    # the evaluation scored held-out subjects only (split by subject) next to the majority baseline
    assert metrics["oca"] >= metrics["baseline/majority/oca"] + 0.08, metrics
    assert metrics["weighted_score"] >= metrics["baseline/majority/weighted_score"] + 0.04, metrics
    assert metrics["parse_failure_rate"] == 0.0
