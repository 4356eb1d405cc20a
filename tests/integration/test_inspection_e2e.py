"""The inspection task through the whole platform: generated YOLO scenes -> Ray Data examples -> Ray Train (class-
weighted loss) -> evaluation next to majority and zero-shot -> registry promotion on macro-F1 -> Ray Serve over HTTP.

Real parts only: a local Ray cluster, a real MLflow server on 127.0.0.1, the tiny Qwen2.5-VL fixture loaded through
``from_pretrained``, the Serve app from ``serve_app.app:build_app`` answering real HTTP requests with an image and
stage-1 detections. The model is trained for a few steps only: the test checks that every stage works and agrees
with the others, not how well a tiny model learns (``jobs/inspection_pipeline.py`` reports that).
"""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import numpy as np
import pytest

from opsvlm.config import load_config
from opsvlm.data.inspection_prep import InspectionPrepConfig, prepare_inspection
from opsvlm.evaluate.run import EvalConfig, evaluate
from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, class_condition, read_dataset
from opsvlm.testing.processes import free_port
from opsvlm.train.config import TrackingSettings, TrainConfig
from opsvlm.train.loop import fit
from opsvlm.video.encode import write_video
from opsvlm.video.sampling import SamplingSpec

pytestmark = pytest.mark.integration

MODEL_NAME = "opsvlm-inspection-e2e"
SPEC = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspection") / "scenes"
    generate_inspection_dataset(root, InspectionConfig(images=24, size=112, seed=3))
    return root


@pytest.fixture(scope="module")
def trained(ray_local, mlflow_server, scenes, tiny_model_dir, tmp_path_factory):
    """Prepared examples, a short class-weighted training run and its evaluation, registered and promoted."""
    from opsvlm import registry

    work = tmp_path_factory.mktemp("inspection_work")
    summary = prepare_inspection(InspectionPrepConfig(source=str(scenes), out=str(work / "prepared"), sampling=SPEC))
    tracking = TrackingSettings(tracking_uri=mlflow_server, experiment="inspection-e2e", log_system_metrics=False)
    config = load_config(
        TrainConfig,
        "jobs/configs/tiny_cpu.yaml",
        [
            f"model.name={tiny_model_dir}",
            f"data.prepared={work / 'prepared'}",
            "data.class_weighting=sqrt_inverse",
            "data.max_val_clips=8",
            "optim.max_steps=3",
            "scaling.num_workers=2",
            f"storage_path={work / 'ray'}",
        ],
    )
    config = dataclasses.replace(config, tracking=tracking)
    result = fit(config)
    evaluation = evaluate(
        EvalConfig(
            model=result.run_id,
            data=str(work / "prepared"),
            split="val",
            max_examples=12,
            batch_size=12,
            cpus_per_actor=0.9,
            free_generation=False,
            n_boot=200,
            tracking=tracking,
        )
    )
    version = registry.register_version(
        result.run_id,
        name=MODEL_NAME,
        metrics=evaluation.metrics,
        eval_split=evaluation.eval_split,
        split_role=evaluation.role,
        eval_run_id=evaluation.run_id,
        tracking_uri=mlflow_server,
    )
    decision = registry.promote(MODEL_NAME, version.version, tracking_uri=mlflow_server)
    return {
        "summary": summary,
        "train": result,
        "eval": evaluation,
        "version": version,
        "decision": decision,
        "prepared": work / "prepared",
    }


def _get(uri: str, path: str, **params) -> dict:
    response = httpx.get(f"{uri}/api/2.0/mlflow/{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def test_examples_account_for_every_object(trained, scenes):
    splits, report = read_dataset(scenes)
    summary = trained["summary"]
    assert summary["objects_unaccounted"] == 0 and summary["images_unaccounted"] == 0
    assert summary["examples_written"] == report.objects == sum(len(i.detections) for s in splits.values() for i in s)
    assert set(summary["examples_by_split"]) == {"train", "val", "test"}


def test_training_and_evaluation_are_tracked(trained, mlflow_server):
    train_run = _get(mlflow_server, "runs/get", run_id=trained["train"].run_id)["run"]
    tags = {t["key"]: t["value"] for t in train_run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in train_run["data"]["params"]}
    assert tags["opsvlm.task"] == "inspection" and params["data.class_weighting"] == "sqrt_inverse"
    artifacts = {a["path"] for a in _get(mlflow_server, "artifacts/list", run_id=trained["train"].run_id)["files"]}
    assert {"class_balance.json", "contact_sheet.png", "checkpoint"} <= artifacts

    eval_run = _get(mlflow_server, "runs/get", run_id=trained["eval"].run_id)["run"]
    metrics = {m["key"]: m["value"] for m in eval_run["data"]["metrics"]}
    # fine-tuned next to its baselines in the same run: the untrained base, the majority class and, given the object
    # type as the model is, the type-aware majority and a random class of the type; and the model without the type
    for key in ("macro_f1", "macro_f1_non_vegetation", "accuracy", "condition_macro_f1"):
        assert key in metrics
        for system in ("untrained-base", "majority", "type-majority", "random-within-type", "fine-tuned_type-unknown"):
            assert f"baseline/{system}/{key}" in metrics, (system, key)
    assert "macro_f1_ci95_low" in metrics and "macro_f1_ci95_high" in metrics
    # the majority baseline predicts one class everywhere: its accuracy is that class's share of the objects
    table = trained["eval"].table
    assert 0 < table["majority"]["accuracy"] < 1 and table["majority"]["parse_failure_rate"] == 0
    # a random class of the right type always names the right type
    assert table["random-within-type"]["object_type_accuracy"] == 1.0
    # constrained decoding: every answer is a valid class
    assert table["fine-tuned"]["parse_failure_rate"] == 0 and table["untrained-base"]["parse_failure_rate"] == 0


def test_evaluate_job_on_an_inspection_model(trained, mlflow_server, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("jobs_evaluate", Path(__file__).parents[2] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = [
        "--model", f"models:/{MODEL_NAME}@champion", "--data", str(trained["prepared"]),
        f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=inspection-e2e", "split=test",
        "max_examples=12", "batch_size=12", "cpus_per_actor=0.9", "free_generation=false", "base_model=false",
        "variants=false", "n_boot=100",
    ]  # fmt: skip
    assert job.main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["task"] == "inspection" and last["role"] == "report" and last["n_objects"] == 12
    assert 0 <= last["macro_f1"] <= 1 and len(last["macro_f1_ci95"]) == 2


def test_registry_promotes_on_the_tasks_headline_metric(trained, mlflow_server):
    version = trained["version"]
    assert version.tags["task"] == "inspection"
    assert float(version.tags["metric.macro_f1"]) == pytest.approx(trained["eval"].metrics["macro_f1"])
    assert trained["decision"].promoted and "macro_f1" in trained["decision"].reason
    alias = _get(mlflow_server, "registered-models/alias", name=MODEL_NAME, alias="champion")
    assert alias["model_version"]["version"] == str(version.version)


@pytest.fixture(scope="module")
def http(ray_local, trained, mlflow_server, scenes, tmp_path_factory):
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cache = tmp_path_factory.mktemp("inspection_model_cache")
    args = {
        "model": {
            "ref": f"models:/{MODEL_NAME}@champion",
            "tracking_uri": mlflow_server,
            "cache_dir": str(cache),
            "poll_interval_s": 0,
        },
        "limits": {"allowed_root": str(scenes)},  # path mode for images
    }
    try:
        serve.run(build_app(args), name="inspection", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(120.0)) as client:
            deadline = time.monotonic() + 120
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "/health not OK"
                time.sleep(0.5)
            yield client
    finally:
        serve.shutdown()


def _image_and_detections(scenes) -> tuple[bytes, list[dict]]:
    splits, _ = read_dataset(scenes)
    image = next(i for i in splits["test"] if len(i.detections) >= 2)
    detections = [
        {"label": class_condition(d.name)[0], "box": list(d.box), "normalized": True, "score": 0.9}
        for d in image.detections
    ]
    with open(image.image_path, "rb") as handle:
        return handle.read(), detections


def test_serve_classifies_every_detected_object(http, trained, scenes):
    status = http.get("/status").json()
    assert status["task"] == "inspection" and status["labels"] == list(CONDITION_CLASSES)
    data, detections = _image_and_detections(scenes)
    response = http.post(
        "/predict_objects",
        files={"file": ("site.jpg", data, "image/jpeg")},
        data={"detections": json.dumps(detections)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == str(trained["version"].version)
    assert [o["index"] for o in body["objects"]] == list(range(len(detections)))
    for sent, answer in zip(detections, body["objects"], strict=True):
        assert answer["condition"] in CONDITION_CLASSES
        assert answer["object_type"] == sent["label"]  # the class is constrained to the detected type
        assert sum(answer["scores"].values()) == pytest.approx(1.0, abs=1e-3)


def test_serve_objects_by_path_and_concurrently(http, trained, scenes):
    """Path mode works for images, and concurrent requests all go through the Predictor's batcher (one forward pass
    at a time: no concurrent use of the tokenizer)."""
    import concurrent.futures
    from pathlib import Path

    splits, _ = read_dataset(scenes)
    image = next(i for i in splits["test"] if len(i.detections) >= 2)
    data, detections = _image_and_detections(scenes)
    relative = str(Path(image.image_path).relative_to(scenes))
    response = http.post("/predict_objects", json={"path": relative, "detections": detections})
    assert response.status_code == 200, response.text
    assert [o["index"] for o in response.json()["objects"]] == list(range(len(detections)))

    before = http.get("/status").json()["batching"]

    def one(_):
        files = {"file": ("site.jpg", data, "image/jpeg")}
        return http.post("/predict_objects", files=files, data={"detections": json.dumps(detections)})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    after = http.get("/status").json()["batching"]
    assert after["items"] - before["items"] == 4
    assert after["inputs"] - before["inputs"] == 4 * len(detections)
    assert http.get("/health").status_code == 200


def test_serve_refuses_bad_object_requests_and_stays_up(http, scenes, tmp_path):
    data, detections = _image_and_detections(scenes)
    bad = [
        ({"file": ("site.jpg", data, "image/jpeg")}, {}, 422, "missing_detections"),
        ({"file": ("site.jpg", data, "image/jpeg")}, {"detections": "[{"}, 400, "invalid_json"),
        (
            {"file": ("site.jpg", data, "image/jpeg")},
            {"detections": json.dumps([{**detections[0], "box": [0.5, 0.5, 0.2, 0.9]}])},
            422,
            "invalid_detections",
        ),
        (
            {"file": ("site.jpg", data, "image/jpeg")},
            {"detections": json.dumps([{**detections[0], "label": "bridge"}])},
            422,
            "invalid_detections",
        ),
        ({"file": ("site.jpg", b"not an image at all", "image/jpeg")}, {"detections": "[]"}, 422, None),
        ({"file": ("notes.txt", data, "text/plain")}, {"detections": json.dumps(detections)}, 415, None),
    ]
    for files, fields, status, code in bad:
        response = http.post("/predict_objects", files=files, data=fields)
        assert response.status_code == status, (fields, response.text)
        if code:
            assert response.json()["error"] == code
        assert http.get("/health").status_code == 200
    # a good video sent to an inspection model decodes, then the task check refuses it
    video = tmp_path / "clip.mp4"
    write_video(video, (np.full((56, 56, 3), 8 * i, np.uint8) for i in range(30)), 15)
    response = http.post("/predict", files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")})
    assert response.status_code == 409 and response.json()["error"] == "wrong_task", response.text
    assert "/predict_objects" in response.json()["detail"]
    good = http.post(
        "/predict_objects",
        files={"file": ("site.jpg", data, "image/jpeg")},
        data={"detections": json.dumps(detections)},
    )
    assert good.status_code == 200, good.text
