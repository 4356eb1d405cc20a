"""The annotation job on a real local Ray cluster with a registered model on a real MLflow server.

Sources: two synthetic OpenPack-layout sessions (H.264 video + operations CSV), the real OpenPack sample (JPEG frames
+ its annotation; its 15 frames lie 11 s before the first annotated row, so it has media but no scored second), a
plain video without annotation and a file that is not a video. The model is the tiny Qwen2.5-VL with an untrained
adapter: the scores are those of an untrained model; what is checked is that every window is accounted for, the files
agree with each other and with the scores, and the MLflow run is linked to the model version.
"""

from __future__ import annotations

import csv
import json
import shutil

import mlflow
import numpy as np
import pytest

from opsvlm.tasks.operations.data.openpack import read_operations_csv
from opsvlm.tasks.operations.data.synthetic import GeneratorConfig, generate_dataset
from opsvlm.tasks.operations.timeline.grid import INDEX_OF_ID, SecondGrid, annotated_cells, truth_labels
from opsvlm.tasks.operations.timeline.metrics import frame_macro_f1
from opsvlm.testing.checkpoints import register_checkpoint, write_adapter_checkpoint
from opsvlm.timeline import plan_windows
from opsvlm.video.sampling import SamplingSpec
from tests.integration.test_train import artifact_paths

pytestmark = pytest.mark.integration

MODEL_NAME = "opsvlm-annotate-test"  # the MLflow server is shared with other integration tests
SPEC = SamplingSpec(frames_per_clip=4, max_pixels=56 * 56)


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)


def test_annotation_job_on_sessions_videos_and_the_real_sample(
    ray_local, mlflow_server, tiny_model_dir, sample_root, tmp_path, capsys
):
    from jobs.annotate import main

    root = tmp_path / "openpack"
    sessions = generate_dataset(root, GeneratorConfig(subjects=2, boxes_per_session=1, width=64, height=64))
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sessions[0].media, videos / "plain.mp4")
    (videos / "broken.mp4").write_bytes(b"this is not a video" * 100)

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    experiment = client.get_experiment_by_name("annotate-tests") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("annotate-tests")
    checkpoint = write_adapter_checkpoint(tmp_path / "ckpt", tiny_model_dir, SPEC, task="operations")
    version = register_checkpoint(client, experiment_id, mlflow_server, MODEL_NAME, checkpoint, champion=True)
    train_run_id = client.get_model_version(MODEL_NAME, version).run_id

    out = tmp_path / "timelines"
    code = main(
        [
            "--model", f"models:/{MODEL_NAME}@champion",
            "--source", str(root), "--source", str(sample_root), "--source", str(videos),
            "--out", str(out),
            "--window-s", "4", "--stride-s", "2",
            f"grammar={root}", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=annotate-tests",
            "bootstrap_resamples=100", "cpus_per_actor=1", "decode_num_cpus=0.5",
        ]
    )  # fmt: skip
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())

    # every recording is annotated or reported: 2 sessions + the sample + the plain video; the junk file fails
    assert last["sessions"] == summary["sessions"] == 4
    assert [(f["recording"], f["reason"]) for f in summary["failed"]] == [("broken", "not_a_video")]
    for key in ("frame_macro_f1", "frame_macro_f1_ci95", "edit_score", "f1_at_50", "majority_frame_macro_f1"):
        assert key in last, key
    low, high = last["frame_macro_f1_ci95"]
    assert 0.0 <= low <= last["frame_macro_f1"] <= high <= 1.0

    # every planned window came back (none rejected), and the seconds annotated are the media's
    timelines = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem.startswith(("U0", "plain"))}
    assert set(timelines) == {"U0101_S0100", "U0102_S0100", "U0209_S0500", "plain"}
    for data in timelines.values():
        start = data["per_second"]["t_s"][0]
        assert data["windows"] >= 1 and data["windows_rejected"] == []
        assert len(data["per_second"]["operation"]) == data["seconds"]
        assert data["segments"][0]["start_s"] == start
    expected_windows = 0
    for source in sessions:
        timeline = read_operations_csv(source.annotation)
        expected_windows += len(plan_windows(0.0, timeline.duration_s, 4.0, 2.0))
    assert sum(timelines[f"{s.subject}_{s.session}"]["windows"] for s in sessions) >= expected_windows
    assert summary["windows_rejected"] == 0

    # the real sample: real JPEG frames decoded; media before the annotated span, so nothing scored there
    sample = timelines["U0209_S0500"]
    assert sample["has_truth"] and sample["scored_seconds"] == 0 and "scores" not in sample
    assert sample["per_second"]["t_s"][0] < -10  # 11 s before the first annotated row
    # the plain video: a timeline without truth and without scores
    assert not timelines["plain"]["has_truth"] and "scores" not in timelines["plain"]

    # the predicted CSVs round-trip through the OpenPack reader, and the 1 Hz files give back the reported F1
    truths, preds = [], []
    for source in sessions:
        stem = f"{source.subject}_{source.session}"
        data = timelines[stem]
        back = read_operations_csv(out / f"{stem}.csv")
        assert (back.subject, back.session) == (source.subject, source.session)
        assert all(s.box is not None and s.box >= 1 for s in back.segments)
        with (out / f"{stem}-1hz.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == data["seconds"]
        truth = read_operations_csv(source.annotation)
        grid = SecondGrid.covering(truth.origin, 0.0, truth.duration_s)
        first = grid.unixtime_ms[0]
        predicted = {int(r["unixtime"]): INDEX_OF_ID[int(r["id"])] for r in rows}
        mask = annotated_cells(truth, grid)
        truths.append(truth_labels(truth, grid)[mask])
        preds.append(np.array([predicted[int(first + 1000 * k)] for k in np.flatnonzero(mask)]))
    assert frame_macro_f1(np.concatenate(truths), np.concatenate(preds)) == pytest.approx(last["frame_macro_f1"])

    # per-box figures for every annotated recording, and the pictures
    with (out / "figures.csv").open() as f:
        figures = list(csv.DictReader(f))
    assert {r["session"] for r in figures if r["box"] == "all"} == {"S0100", "S0500", "plain"}
    assert {p.name for p in out.glob("*.png")} == {f"{stem}.png" for stem in timelines}

    # the MLflow annotation run, linked to the model version and its training run
    run = client.get_run(last["run_id"])
    assert run.data.tags["opsvlm.job"] == "annotate"
    assert run.data.tags["mlflow.parentRunId"] == train_run_id
    assert (run.data.tags["opsvlm.model_name"], run.data.tags["opsvlm.model_version"]) == (MODEL_NAME, version)
    metrics = run.data.metrics
    assert metrics["frame_macro_f1"] == pytest.approx(last["frame_macro_f1"])
    expected = (
        "baseline/majority/frame_macro_f1",
        "baseline/model_per-second_argmax/frame_macro_f1",
        "frame_macro_f1_ci95_low",
        "edit_score",
        "f1_at_50",
        "realtime_factor",
        "seconds_annotated",
    )
    for key in expected:
        assert key in metrics, key
    artifacts = artifact_paths(client, last["run_id"])
    assert "plots/U0101_S0100.png" in artifacts and "timelines/U0101_S0100.json" in artifacts
    assert {"summary.json", "scores.txt", "timelines/figures.csv", "timelines/grammar.json"} <= artifacts
