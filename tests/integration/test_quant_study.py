"""The quantization study on a model trained with Ray Train and fetched from a real MLflow server: unquantized, int8
and nf4 for real (bitsandbytes' CPU backend), the run read back over MLflow's REST API, and the job run as a
process without bitsandbytes, where the quantized modes are skipped with their reason."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from opsvlm.evaluate.quant_study import QuantStudyConfig, format_table, quantization_study
from opsvlm.train.config import TrackingSettings
from opsvlm.train.loop import fit
from tests.integration.test_train import read_rows, train_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = 4


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)


def rest(server: str, endpoint: str, **query) -> dict:
    """GET an MLflow REST endpoint (``runs/get``, ``artifacts/list``) and decode its JSON."""
    url = f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def run_over_rest(server: str, run_id: str) -> tuple[dict[str, float], dict[str, str], set[str]]:
    run = rest(server, "runs/get", run_id=run_id)["run"]
    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    files = {f["path"] for f in rest(server, "artifacts/list", run_id=run_id).get("files", [])}
    return metrics, tags, files


@pytest.fixture(scope="module")
def trained_run(ray_local, prepared_clips, tiny_model_dir, mlflow_server, tmp_path_factory) -> str:
    """A tiny model fine-tuned for 4 steps on one worker; its MLflow run id (the checkpoint is an artifact)."""
    base = train_config(prepared_clips, tiny_model_dir, tmp_path_factory.mktemp("ray"), mlflow_server)
    config = dataclasses.replace(
        base,
        optim=dataclasses.replace(base.optim, max_steps=4),
        scaling=dataclasses.replace(base.scaling, num_workers=1),
        checkpoint_every_steps=4,
    )
    return fit(config).run_id


def test_study_compares_three_modes_and_logs_to_mlflow(trained_run, prepared_clips, mlflow_server, tmp_path):
    study = quantization_study(
        QuantStudyConfig(
            model=trained_run,
            data=str(prepared_clips),
            split="test",
            max_examples=EXAMPLES,
            batch_size=2,
            warmup_batches=1,
            tracking=TrackingSettings(tracking_uri=mlflow_server, experiment="test-quant"),
            cache_dir=str(tmp_path / "models"),
        )
    )
    table = {row["mode"]: row for row in study["table"]}
    assert [row["mode"] for row in study["table"]] == ["none", "int8", "nf4"]
    assert all(row["status"] == "ok" and row["skipped_reason"] == "" for row in table.values())
    assert study["skipped"] == {}
    assert study["examples"] == EXAMPLES <= len(read_rows(prepared_clips, "test"))
    assert study["headline_metric"] == "weighted_score"

    # Sizes. The comparable part is the 14 language-model projections that int8/nf4 quantize: fp32 (4 B/weight) vs
    # int8 (1 B/weight + one fp32 scale per row) vs nf4 (0.5 B/weight + block absmax); biases stay fp32 in all.
    none, int8, nf4 = table["none"], table["int8"], table["nf4"]
    assert none["quantized_linears"] == 0
    assert int8["quantized_linears"] == nf4["quantized_linears"] == none["quantizable_linears"] == 14
    assert none["quantized_part_bytes"] > int8["quantized_part_bytes"] > nf4["quantized_part_bytes"]
    assert 3.0 < none["quantized_part_bytes"] / int8["quantized_part_bytes"] < 4.0
    assert 1.5 < int8["quantized_part_bytes"] / nf4["quantized_part_bytes"] < 2.0
    # Everything else (embeddings, vision tower, lm_head, adapter) is the same in the three modes, so the loaded
    # totals differ by exactly the quantized part; the saved ones by it plus bitsandbytes' format records (int8: one
    # byte per layer, nf4: a packed JSON description of each quantization state), well under 1% of it here.
    for key in ("loaded_bytes", "saved_bytes"):
        assert none[key] > int8[key] > nf4[key], key
    for mode in (int8, nf4):
        part = none["quantized_part_bytes"] - mode["quantized_part_bytes"]
        assert none["loaded_bytes"] - mode["loaded_bytes"] == part
        assert none["saved_bytes"] - mode["saved_bytes"] == pytest.approx(part, rel=0.01)
    assert none["memory_footprint_bytes"] > int8["memory_footprint_bytes"] > nf4["memory_footprint_bytes"]

    # Retention and agreement are relative to the unquantized run; latency measured for every mode.
    assert none["agreement"] == 1.0
    # Retention is metric(mode) / metric(none): 1.0 for none wherever its metric is non-zero, undefined (NaN) where
    # it is 0 (a 4-step tiny model can score 0 on some metrics; mean tIoU of overlapping segments is rarely 0).
    retained = {k.removeprefix("retention/") for k in none if k.startswith("retention/")}
    assert {"weighted_score", "oca", "aa_at_1", "tiou_at_0_5", "mean_tiou"} <= retained
    nonzero = {m for m in retained if study["metrics"]["none"][m] > 0}
    assert "mean_tiou" in nonzero
    for metric in retained:
        assert none[f"retention/{metric}"] == 1.0 if metric in nonzero else math.isnan(none[f"retention/{metric}"])
        for row in (int8, nf4):
            expected = (
                study["metrics"][row["mode"]][metric] / study["metrics"]["none"][metric] if metric in nonzero else None
            )
            assert (
                row[f"retention/{metric}"] == pytest.approx(expected)
                if expected is not None
                else math.isnan(row[f"retention/{metric}"])
            )
    assert (none["retention"] == 1.0) if none["headline"] > 0 else math.isnan(none["retention"])
    for row in (int8, nf4):
        assert 0.0 <= row["agreement"] <= 1.0
    print(format_table(study["table"], "weighted_score"))
    print(json.dumps({m: {k: row[k] for k in row if k.startswith("retention")} for m, row in table.items()}))
    for row in table.values():
        assert 0 < row["latency_median_ms"] <= row["latency_p90_ms"] and row["examples_per_s"] > 0
        assert row["device"] == "cpu" and row["threads"] >= 1
    assert "int8" in format_table(study["table"]) and "weighted_score" in format_table(study["table"], "weighted_score")

    # The MLflow run, read over the REST API: linked to the training run, one metric family per mode, the table.
    metrics, tags, files = run_over_rest(mlflow_server, study["run_id"])
    assert tags["opsvlm.job"] == "quant_study"
    assert tags["mlflow.parentRunId"] == tags["opsvlm.train_run_id"] == trained_run == study["train_run_id"]
    assert not [k for k in tags if k.startswith("opsvlm.quant.")]  # nothing skipped
    for mode in ("none", "int8", "nf4"):
        for key in ("weighted_score", "oca", "agreement", "latency_median_ms", "latency_p90_ms", "saved_bytes"):
            assert f"quant/{mode}/{key}" in metrics, (mode, key)
        assert metrics[f"quant/{mode}/quantized_part_bytes"] == table[mode]["quantized_part_bytes"]
        assert metrics[f"quant/{mode}/weighted_score"] == pytest.approx(table[mode]["headline"])
    assert metrics["quant/none/retention/mean_tiou"] == 1.0
    assert {"quant_study.json", "quant_study.txt", "quant_study_summary.json"} <= files
    logged = json.loads(
        Path(
            mlflow.MlflowClient(mlflow_server).download_artifacts(study["run_id"], "quant_study.json", tmp_path)
        ).read_text()
    )
    assert logged["columns"][:2] == ["mode", "status"] and [r[0] for r in logged["data"]] == ["none", "int8", "nf4"]


def test_job_without_bitsandbytes_skips_quantized_modes_with_reason(
    trained_run, prepared_clips, mlflow_server, tmp_path
):
    # A job process where bitsandbytes is not installed (a None entry in sys.modules makes every import of it fail,
    # as for a missing package): the study still scores 'none' and records why int8 and nf4 did not run.
    code = (
        "import runpy, sys\n"
        "sys.modules['bitsandbytes'] = None\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    summary = tmp_path / "study.json"
    command = [
        sys.executable,
        "-c",
        code,
        str(REPO / "jobs" / "quant_study.py"),
        "--model",
        trained_run,
        "--data",
        str(prepared_clips),
        "--summary",
        str(summary),
        f"max_examples={EXAMPLES // 2}",
        "batch_size=2",
        "warmup_batches=0",
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment=test-quant",
        f"cache_dir={tmp_path / 'models'}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(printed["skipped"]) == {"int8", "nf4"}
    for reason in printed["skipped"].values():
        assert reason.startswith("bitsandbytes is not installed")
    assert "skipped  reason: bitsandbytes is not installed" in done.stdout

    study = json.loads(summary.read_text())
    rows = {row["mode"]: row for row in study["table"]}
    assert rows["none"]["status"] == "ok" and rows["none"]["agreement"] == 1.0 and rows["none"]["latency_median_ms"] > 0
    assert rows["int8"]["status"] == rows["nf4"]["status"] == "skipped"

    metrics, tags, _ = run_over_rest(mlflow_server, printed["quant_study_run_id"])
    assert tags["opsvlm.quant.int8.skipped"] == printed["skipped"]["int8"]
    assert tags["opsvlm.quant.nf4.skipped"] == printed["skipped"]["nf4"]
    assert "quant/none/weighted_score" in metrics
    assert not [k for k in metrics if k.startswith(("quant/int8/", "quant/nf4/"))]
