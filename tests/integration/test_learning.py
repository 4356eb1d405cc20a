"""Proof that learning works: the README's main job on its embedded defaults beats the majority baseline on held-out
subjects, with the lower end of its 95% test interval above the majority's figure. Marked slow (about 10 minutes of
training on 2 cores per seed); run with ``pytest -m slow``. ``jobs/report.py run`` runs the same job on three
seeds and stores the summaries the README's figures come from."""

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0])
def test_pipeline_defaults_beat_the_majority_baseline_on_held_out_subjects(tmp_path, capsys, seed):
    import jobs.pipeline as pipeline

    workdir = tmp_path / "pipeline"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert pipeline.main(["--workdir", str(workdir), f"tracking_uri={uri}", f"seed={seed}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["promoted"] is True  # a fresh registry: the first version becomes champion
    assert summary["test_weighted_score_ci95"][0] > summary["majority_test_weighted_score"], summary
    assert summary["parse_failure_rate"] == 0.0
