"""One evaluation flow on a local Ray cluster and a real MLflow server: batch inference, baselines, intervals, the
stored summary and per-example answers; ``jobs/evaluate.py``; the promotion gate on top, failing closed when the
registry answers 5xx."""

import http.server
import importlib.util
import json
import socketserver
import threading
import urllib.request
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from opsvlm import registry
from opsvlm.evaluate.run import MODEL_SYSTEM, EvalConfig, evaluate, format_table
from opsvlm.tasks.operations import LABEL_NAMES, OperationsTask
from opsvlm.train.config import TrackingSettings
from opsvlm.train.loop import fit
from tests.integration.test_train import artifact_paths, read_rows, train_config

pytestmark = pytest.mark.integration
JOBS_EVALUATE = Path(__file__).resolve().parents[2] / "jobs" / "evaluate.py"


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)


@pytest.fixture(scope="module")
def trained(ray_local, prepared_clips, tiny_model_dir, mlflow_server, tmp_path_factory):
    return fit(train_config(prepared_clips, tiny_model_dir, tmp_path_factory.mktemp("ray"), mlflow_server))


def config(trained, prepared_clips, mlflow_server, **overrides) -> EvalConfig:
    tracking = TrackingSettings(tracking_uri=mlflow_server, experiment="test-eval")
    base = {"batch_size": 4, "cpus_per_actor": 0.5, "n_boot": 200, "tracking": tracking}
    return EvalConfig(model=trained.run_id, data=str(prepared_clips), **{**base, **overrides})


def test_test_split_report_with_baselines_intervals_and_stored_examples(
    trained, prepared_clips, mlflow_server, tmp_path
):
    result = evaluate(config(trained, prepared_clips, mlflow_server, split="test", out=str(tmp_path / "eval")))
    assert (result.split, result.role, result.task) == ("test", "report", "operations")

    # every held-out clip is predicted, with a valid answer (constrained decoding)
    truth = read_rows(prepared_clips, "test")
    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert sorted(p["example_id"] for p in predictions) == sorted(r["clip_id"] for r in truth)
    lengths = {r["clip_id"]: r["end_s"] - r["start_s"] for r in truth}
    for p in predictions:
        answer = json.loads(p["answer"])
        assert p["valid"] and answer["operation"] in LABEL_NAMES and answer["next_operation"] in LABEL_NAMES
        assert 0 <= answer["start_s"] < answer["end_s"] <= lengths[p["example_id"]] + 1e-9
    assert result.n == len(truth) and result.metrics["n_clips"] == len(truth)
    assert result.metrics["parse_failure_rate"] == 0.0

    # baselines side by side on the same clips; the reference that sees the truth gets every operation right
    assert {
        MODEL_SYSTEM,
        "majority",
        "fine-tuned+whole-clip",
        "fine-tuned+grammar",
        "reference:truth-op+grammar",
        "untrained-base",
        "free-generation",
    } <= set(result.table)
    assert result.table["reference:truth-op+grammar"]["oca"] == 1.0
    # the whole-clip segment scores tIoU as if the model's segment were the whole clip: it is 1 on non-boundary clips
    whole = result.table["fine-tuned+whole-clip"]
    assert whole["tiou_at_0_5"] >= 1 - whole["n_boundary_clips"] / whole["n_clips"] - 1e-9

    # every table figure has an interval around it, computed by resampling session blocks
    task = OperationsTask()
    assert result.groups == len({task.group_of(r) for r in truth}) >= 1  # this fixture's test subject: one block
    for metric in ("weighted_score", "oca", "aa_at_1", "tiou_at_0_5"):
        low, high = result.intervals[MODEL_SYSTEM][metric]
        assert low <= result.metrics[metric] <= high
    text = format_table(result.table, task.table_metrics, result.intervals)
    assert "majority" in text and "[" in text

    # the MLflow run: linked to its training run, role recorded, metrics with bounds, summary and examples stored
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id
    assert run.data.tags["opsvlm.eval_split"] == result.eval_split
    assert run.data.tags["opsvlm.split_role"] == "report"
    for key in (
        "weighted_score",
        "weighted_score_ci95_low",
        "weighted_score_ci95_high",
        "boundary_tiou_at_0_5",
        "baseline/majority/oca",
        "baseline/untrained-base/weighted_score",
    ):
        assert key in run.data.metrics, key
    artifacts = artifact_paths(client, result.run_id)
    for path in (
        "plots/confusion_operation.png",
        "plots/per_class_recall.png",
        "predictions/predictions.parquet",
        "table.txt",
        "eval_summary.json",
        "examples.json",
    ):
        assert path in artifacts, path
    summary = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                f"runs:/{result.run_id}/eval_summary.json", dst_path=str(tmp_path), tracking_uri=mlflow_server
            )
        ).read_text()
    )
    assert {"seed", "commit", "split", "role", "n", "groups", "intervals"} <= set(summary)


def test_training_split_is_never_evaluated(trained, prepared_clips, mlflow_server):
    with pytest.raises(ValueError, match="never the training split"):
        evaluate(config(trained, prepared_clips, mlflow_server, split="train"))


def test_job_on_an_operations_model_then_gate_fails_closed_on_a_5xx_registry(
    trained, prepared_clips, mlflow_server, tmp_path, capsys, monkeypatch
):
    spec = importlib.util.spec_from_file_location("jobs_evaluate", JOBS_EVALUATE)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    summary_path = tmp_path / "val_summary.json"
    args = [
        "--model",
        trained.run_id,
        "--data",
        str(prepared_clips),
        "--summary",
        str(summary_path),
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment=test-eval",
        "base_model=false",
        "free_generation=false",
        "batch_size=4",
        "cpus_per_actor=0.5",
        "n_boot=200",
    ]
    assert job.main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["split"] == "val" and last["role"] == "selection" and len(last["weighted_score_ci95"]) == 2
    evaluation = registry.read_eval(str(summary_path))
    assert evaluation.split_role == "selection" and evaluation.eval_run_id == last["eval_run_id"]

    name = "opsvlm-eval-gate"

    def register():
        return registry.register_version(
            trained.run_id,
            name=name,
            metrics=evaluation.metrics,
            eval_split=evaluation.eval_split,
            split_role=evaluation.split_role,
            eval_run_id=evaluation.eval_run_id,
            tracking_uri=mlflow_server,
        )

    first = register()
    assert registry.promote(name, first.version, tracking_uri=mlflow_server, n_boot=200).promoted
    same = registry.promote(name, register().version, tracking_uri=mlflow_server, n_boot=200)
    assert not same.promoted and same.difference_ci95 == [0.0, 0.0]  # the same answers: a tie, not promoted

    # A registry that answers 5xx when asked for the registered model (where the champion alias lives) must abort
    # the promotion, not take "no champion" and promote.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    third = register()
    with _failing_proxy(mlflow_server, "registered-models/get") as proxy:
        with pytest.raises(Exception) as info:
            registry.promote(name, third.version, tracking_uri=proxy, force=True, n_boot=200)
        assert not isinstance(info.value, registry.PromotionError)  # aborted by the error, not a policy refusal
    champion = mlflow.MlflowClient(mlflow_server).get_model_version_by_alias(name, registry.CHAMPION)
    assert int(champion.version) == int(first.version)


class _Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the real server, but answers 503 to requests whose path contains ``fail``."""

    target = ""
    fail = ""

    def _forward(self) -> None:
        if self.fail in self.path:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        request = urllib.request.Request(self.target + self.path, data=body, method=self.command)
        for key in ("Content-Type",):
            if self.headers.get(key):
                request.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


class _failing_proxy:
    def __init__(self, target: str, fail: str):
        handler = type("Handler", (_Proxy,), {"target": target, "fail": fail})
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
