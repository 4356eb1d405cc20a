"""From laptop to cluster, for real: ``ray job submit`` the pipeline, check MLflow over REST, serve the champion.

Everything the test talks to is a real process it starts on 127.0.0.1 and stops by PID:

* a Ray head (``ray start --head``) in its own short temporary directory, with every port chosen here so it never
  meets another local Ray instance (the pytest session may hold one from ``ray.init``: it is never attached to,
  every command gets an explicit address and ``RAY_ADDRESS`` only ever goes into a child's environment);
* an ``mlflow server`` (SQLite backend, proxied artifacts) of its own, so the ``opsvlm`` registered model starts
  empty and the new version must become ``champion``.

Token authentication (on by default for local clusters since Ray 2.59): the head runs with ``RAY_AUTH_MODE=token``
and a token generated for this test (``RAY_AUTH_TOKEN_PATH``, a 0600 file under ``tmp_path``); every ``ray`` /
``serve`` CLI call gets the same two variables, and REST calls to the dashboard send ``Authorization: Bearer``.
That keeps the cluster authenticated without depending on (or writing) ``~/.ray/auth_token``.

The job's working directory is the repository, uploaded by ``ray job submit --working-dir``: Ray honours
``.gitignore`` (so ``.venv/`` and ``outputs/`` stay out) and the runtime env repeats those excludes in case
``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1`` is set. The job's ``python`` is the venv's: the head is started with the
venv's ``bin`` first on ``PATH`` and the job supervisor runs the entrypoint with the head's environment.

Serve: ``serve deploy`` of ``serve_app/config_tiny_cpu.yaml`` with its HTTP port, tracking URI and cache moved
into this test; a real prediction over HTTP must come from the champion version.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.testing.processes import MlflowServer, free_port
from tests.integration.conftest import SERVER_START_TIMEOUT_S, running

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ray, serve, mlflow and the python the job must use

HEAD_START_TIMEOUT_S = 300.0  # `ray start` plus the dashboard and its job agent, on a contended 2-core box
JOB_TIMEOUT_S = 25 * 60.0
SERVE_TIMEOUT_S = 600.0  # Serve controller + proxy + two replicas, the Predictor downloading the champion
CLI_TIMEOUT_S = 180.0  # one `ray` / `serve` CLI call (imports ray: slow on a busy box)
POLL_S = 5.0
TEARDOWN_TIMEOUT_S = 60.0
# Whole item: head + MLflow + job + Serve + teardown; the default 900 s is for ordinary tests.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(45 * 60)]

MODEL_NAME = "opsvlm"  # the pipeline's default registered model
CLIP_START_S, CLIP_END_S = 5.0, 10.0  # one 5 s window, the clip length the preset trains on
# Small enough for a few minutes on a contended 2-core box: 3 subjects (1 train / 1 val / 1 test), 60 s sessions,
# one epoch, no extra evaluation passes. Field names: jobs/pipeline.py (GeneratorConfig, TrainConfig, EvalConfig).
OVERRIDES = (
    "generate.subjects=3",
    "generate.session_duration_s=60",
    "train.optim.epochs=1",
    "evaluate.base_model=false",
    "evaluate.free_generation=false",
    "evaluate.variants=false",
    "evaluate.n_boot=200",
)
# Belt and braces over .gitignore for the uploaded working directory (the venv alone is several GB). Gitignore
# syntax relative to the repository: anchored with "/", or "data" would also drop src/opsvlm/data.
UPLOAD_EXCLUDES = ["/.venv", "/outputs", "/.git", "/mlruns", "/shared", "/data", "/.hypothesis", "**/__pycache__"]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray/MLflow addressing or auth it may carry, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return {**env, **extra}


def _tail(text: str, chars: int = 12_000) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


# --- the Ray head ----------------------------------------------------------------------------------------------------


@dataclass
class Head:
    """A running head: where it listens, how to authenticate, and how to find its processes."""

    gcs_address: str
    dashboard: str
    temp_dir: Path
    token: str
    env: dict[str, str]  # for CLI calls against this head (auth, RAY_ADDRESS, marker)
    marker: tuple[str, str]  # an environment variable only this head's processes (and our CLI calls) carry

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run(
                list(args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{' '.join(args[:3])} did not return within {timeout:.0f} s: {exc.stdout}\n{exc.stderr}")
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result


def _processes_of(temp_dir: Path, marker: tuple[str, str]) -> dict[int, psutil.Process]:
    """This head's processes: the temp dir in their command line, or the marker in their environment (workers
    rename themselves ``ray::...``; orphans re-parented to init still carry it), plus descendants of either."""
    key, value = marker
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []) or proc.environ().get(key) == value:
                found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    found.pop(os.getpid(), None)
    return {pid: p for pid, p in found.items() if _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_head(temp_dir: Path, marker: tuple[str, str]) -> list[str]:
    """SIGTERM then SIGKILL every process of this head (never ``ray stop``: it stops every local Ray); returns what
    is still alive after ``TEARDOWN_TIMEOUT_S`` (should be nothing)."""
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    sig = signal.SIGTERM
    while True:
        procs = _processes_of(temp_dir, marker)
        if not procs:
            return []
        if time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in procs.values() if _alive(p)]
        for proc in procs.values():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(list(procs.values()), timeout=15)
        sig = signal.SIGKILL  # whatever survived a SIGTERM (or was spawned meanwhile) is killed outright


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[Head]:
    """A Ray head on 127.0.0.1 (2 CPUs, dashboard with the job server) with token auth; stopped by PID after."""
    # Unix socket paths (<temp>/session_<date>_<pid>/sockets/...) must stay under 108 bytes: tmp_path is too long.
    temp_dir = Path(tempfile.mkdtemp(prefix="opsvlm-e2e-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    marker = ("OPSVLM_E2E_HEAD", uuid.uuid4().hex)
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "agent_grpc", "env", "metrics")}
    gcs_address = f"127.0.0.1:{ports['gcs']}"
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    head_env = _clean_env(
        **auth,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is the venv's
        RAY_USAGE_STATS_ENABLED="0",
        **{marker[0]: marker[1]},
    )
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        "--include-dashboard=true",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['env']}",
        f"--metrics-export-port={ports['metrics']}",
        "--num-cpus=2",  # logical CPUs; the preset asks for fractions (whole-CPU requests deadlock on 2 cores)
        "--num-gpus=0",
        f"--object-store-memory={1024**3}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head = Head(
        gcs_address,
        dashboard,
        temp_dir,
        token,
        env={**head_env, "RAY_ADDRESS": gcs_address, "RAY_DASHBOARD_ADDRESS": dashboard},
        marker=marker,
    )
    try:
        started = subprocess.run(
            command,
            env=head_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=HEAD_START_TIMEOUT_S,
            start_new_session=True,
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        _wait_for_job_server(head, time.monotonic() + HEAD_START_TIMEOUT_S)
        yield head
    finally:
        left = _kill_head(temp_dir, marker)
        with contextlib.suppress(OSError):  # keep the head's logs with the test's other files, then clean up
            shutil.copytree(temp_dir / "session_latest" / "logs", tmp_path / "ray-logs", ignore_dangling_symlinks=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive after teardown: {left}"


def _wait_for_job_server(head: Head, deadline: float) -> None:
    with httpx.Client(base_url=head.dashboard, headers=head.headers, timeout=10) as http:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if http.get("/api/jobs/").status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard's job server at {head.dashboard} did not answer in time")
            time.sleep(1.0)


# --- the MLflow server -----------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_url(tmp_path: Path) -> Iterator[str]:
    """An ``mlflow server`` of this test only (empty registry); stopped by process group after."""
    # the box is shared with a Ray job or two: allow twice the usual start
    yield from running(MlflowServer(tmp_path / "mlflow", env=_clean_env(), start_timeout_s=SERVER_START_TIMEOUT_S * 2))


# --- the job ---------------------------------------------------------------------------------------------------------


def _submit(head: Head, submission_id: str, workdir: Path, tracking_uri: str) -> None:
    runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--no-wait",
        "--",
        "python",
        "jobs/pipeline.py",
        "--workdir",
        str(workdir),
        f"tracking_uri={tracking_uri}",
        *OVERRIDES,
    ]
    head.cli(*command)


def _job_info(head: Head, http: httpx.Client, submission_id: str) -> dict:
    response = http.get(f"/api/jobs/{submission_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for_job(head: Head, submission_id: str) -> dict:
    """Poll the job (bounded); on anything but SUCCEEDED fail with its status message and the tail of its logs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    with httpx.Client(base_url=head.dashboard, headers=head.headers, timeout=30) as http:
        while True:
            try:
                info = _job_info(head, http, submission_id)
            except httpx.TransportError:
                info = {"status": "UNREACHABLE"}
            if info["status"] in {"SUCCEEDED", "FAILED", "STOPPED"}:
                break
            if time.monotonic() > deadline:
                head.cli(
                    str(BIN / "ray"),
                    "job",
                    "stop",
                    "--address",
                    head.dashboard,
                    "--no-wait",
                    submission_id,
                    check=False,
                )
                break
            time.sleep(POLL_S)
    if info["status"] != "SUCCEEDED":
        logs = _job_logs(head, submission_id)
        pytest.fail(
            f"job {submission_id} ended {info['status']} (limit {JOB_TIMEOUT_S:.0f} s): {info.get('message')}\n"
            f"--- job logs ---\n{_tail(logs)}"
        )
    return info


def _job_logs(head: Head, submission_id: str) -> str:
    result = head.cli(str(BIN / "ray"), "job", "logs", "--address", head.dashboard, submission_id, check=False)
    return result.stdout if result.returncode == 0 else f"(ray job logs failed: {result.stderr})"


def _summary_of(logs: str) -> dict:
    """The pipeline's last output line: one flat JSON object with the run ids, the version and the promotion.

    Searched for rather than taken as the last line: workers' progress bars may share the driver's output lines.
    """
    for match in reversed(re.findall(r'\{"task": .*?\}', logs)):
        with contextlib.suppress(json.JSONDecodeError):
            summary = json.loads(match)
            if {"test_eval_run_id", "model_version", "promoted", "test_weighted_score"} <= set(summary):
                return summary
    pytest.fail(f"no summary JSON line in the job logs:\n{_tail(logs)}")


# --- MLflow over REST ------------------------------------------------------------------------------------------------


def _get(http: httpx.Client, endpoint: str, **params: str) -> dict:
    response = http.get(f"/api/2.0/mlflow/{endpoint}", params=params)
    assert response.status_code == 200, (endpoint, params, response.status_code, response.text)
    return response.json()


def _run(http: httpx.Client, run_id: str) -> tuple[dict, dict[str, float], dict[str, str]]:
    run = _get(http, "runs/get", run_id=run_id)["run"]
    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    return run["info"], metrics, tags


def _artifacts(http: httpx.Client, run_id: str, path: str = "") -> dict[str, dict]:
    body = _get(http, "artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    return {Path(f["path"]).name: f for f in body.get("files", [])}


def _check_mlflow(tracking_uri: str, summary: dict) -> str:
    """Both runs, their metrics and artifacts, and ``champion`` -> the job's new version. Returns that version."""
    train_id, eval_id, version = summary["train_run_id"], summary["test_eval_run_id"], str(summary["model_version"])
    with httpx.Client(base_url=tracking_uri, timeout=30) as http:
        experiment = _get(http, "experiments/get-by-name", experiment_name="opsvlm")["experiment"]

        info, metrics, _ = _run(http, train_id)
        assert info["status"] == "FINISHED" and info["experiment_id"] == experiment["experiment_id"], info
        assert "train_loss" in metrics and any(k.startswith("final_") for k in metrics), sorted(metrics)
        checkpoint = _artifacts(http, train_id, "checkpoint")
        assert checkpoint.get("adapter", {}).get("is_dir") is True, checkpoint
        assert int(checkpoint.get("model.json", {}).get("file_size", 0)) > 0, checkpoint
        adapter = _artifacts(http, train_id, "checkpoint/adapter")
        assert any(int(f.get("file_size", 0)) > 0 for f in adapter.values()), adapter

        info, metrics, tags = _run(http, eval_id)
        assert info["status"] == "FINISHED" and info["experiment_id"] == experiment["experiment_id"], info
        assert tags.get("opsvlm.train_run_id") == train_id, tags
        assert metrics["n_clips"] > 0
        for key in ("oca", "aa_at_1", "tiou_at_0_5", "weighted_score"):
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics.get(key))
        assert metrics["weighted_score"] == pytest.approx(summary["test_weighted_score"], abs=1e-6)
        assert tags.get("opsvlm.split_role") == "report", tags
        assert any(k.startswith("baseline/") for k in metrics), sorted(metrics)
        root = _artifacts(http, eval_id)
        assert root.get("plots", {}).get("is_dir") and root.get("predictions", {}).get("is_dir"), root
        assert any(name.endswith(".png") for name in _artifacts(http, eval_id, "plots")), "no plots"
        predictions = _artifacts(http, eval_id, "predictions")
        assert int(predictions.get("predictions.parquet", {}).get("file_size", 0)) > 0, predictions

        champion = _get(http, "registered-models/alias", name=MODEL_NAME, alias="champion")["model_version"]
        assert str(champion["version"]) == version, champion
        assert champion["run_id"] == train_id, champion
        version_tags = {t["key"]: t["value"] for t in champion.get("tags", [])}
        assert version_tags.get("promotion.decision") == "promoted", version_tags
    return version


# --- Serve -----------------------------------------------------------------------------------------------------------


def _serve_config(tmp_path: Path, tracking_uri: str, media_root: Path, port: int) -> Path:
    """``serve_app/config_tiny_cpu.yaml`` pointed at this test's MLflow server, HTTP port and directories."""
    config = yaml.safe_load((REPO / "serve_app" / "config_tiny_cpu.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    # `serve deploy` takes only remote working_dir URIs; on this one-node cluster the repository is on the node.
    env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env_vars.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    app["args"]["model"].update(
        {"ref": f"models:/{MODEL_NAME}@champion", "tracking_uri": tracking_uri, "cache_dir": str(tmp_path / "cache")}
    )
    app["args"]["limits"]["allowed_root"] = str(media_root)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait_for_app(head: Head, app_name: str) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    status: dict = {}
    with httpx.Client(base_url=head.dashboard, headers=head.headers, timeout=30) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError, ValueError):
                response = http.get("/api/serve/applications/")
                if response.status_code == 200:
                    status = (response.json().get("applications") or {}).get(app_name) or {}
                    if status.get("status") == "RUNNING":
                        return
                    if status.get("status") == "DEPLOY_FAILED":
                        break
            time.sleep(POLL_S)
    pytest.fail(f"Serve app {app_name!r} not RUNNING within {SERVE_TIMEOUT_S:.0f} s: {json.dumps(status)[:4000]}")


def _assert_prediction(body: dict, clip_length: float, version: str) -> None:
    assert body["operation"] in LABEL_NAMES and body["next_operation"] in LABEL_NAMES, body
    assert 0 <= body["start_s"] < body["end_s"] <= clip_length + 1e-6, body
    assert set(body["scores"]) == set(LABEL_NAMES) and sum(body["scores"].values()) == pytest.approx(1, abs=1e-3)
    assert str(body["model_version"]) == version, body


# --- the test --------------------------------------------------------------------------------------------------------


def test_pipeline_job_on_a_cluster_then_serve_the_champion(mlflow_url: str, ray_head: Head, tmp_path: Path):
    started = time.monotonic()
    head = ray_head

    # The cluster really is authenticated: the job API refuses a request without the token.
    assert httpx.get(f"{head.dashboard}/api/jobs/", timeout=30).status_code == 401

    # 1. submit with the ray CLI, wait (bounded) for SUCCEEDED
    workdir = tmp_path / "work"
    submission_id = f"opsvlm-e2e-{uuid.uuid4().hex[:8]}"
    _submit(head, submission_id, workdir, mlflow_url)
    info = _wait_for_job(head, submission_id)
    job_seconds = time.monotonic() - started
    logs = _job_logs(head, submission_id)
    summary = _summary_of(logs)
    assert summary["promoted"] is True, summary  # a fresh registry: the first version always becomes champion
    # the repository went up as a package (not the 7 GB venv) and ran from there
    package = info["runtime_env"]["working_dir"]
    assert package.startswith("gcs://_ray_pkg_"), info["runtime_env"]
    unpacked = [
        path
        for path in (head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob("_ray_pkg_*")
        if path.is_dir()  # not the .zip.lock files beside them
    ]
    assert unpacked, "the working directory package was not unpacked on the node"
    sources = [
        path.relative_to(REPO)
        for folder in ("src", "jobs", "serve_app")
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    for directory in unpacked:
        assert not (directory / ".venv").exists() and not (directory / "outputs").exists()
        missing = [str(path) for path in sources if not (directory / path).is_file()]
        assert not missing, f"left out of the uploaded working directory: {missing}"

    # 2. MLflow over REST: runs, metrics, artifacts, champion alias
    version = _check_mlflow(mlflow_url, summary)

    # 3. Serve the champion on the same head and predict over HTTP
    media_root = workdir / "synthetic"
    videos = sorted(media_root.glob("*/kinect/color-masked/video/*.mp4"))
    assert len(videos) == 3, videos  # generate.subjects=3, one session each
    port = free_port()
    config = _serve_config(tmp_path, mlflow_url, media_root, port)
    head.cli(str(BIN / "serve"), "deploy", "--address", head.dashboard, str(config))
    _wait_for_app(head, "opsvlm")
    serve_started = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(120.0)) as http:
        deadline = time.monotonic() + 120
        while True:  # RUNNING in the controller; the proxy may take a moment more to route
            with contextlib.suppress(httpx.TransportError):
                health = http.get("/health")
                if health.status_code == 200:
                    break
            assert time.monotonic() < deadline, "/health not OK within 120 s of the app RUNNING"
            time.sleep(1.0)
        assert health.json() == {"status": "ok", "model_version": version}

        video = videos[0]
        files = {"file": (video.name, video.read_bytes(), "video/mp4")}
        response = http.post("/predict", files=files, data={"start_s": str(CLIP_START_S), "end_s": str(CLIP_END_S)})
        assert response.status_code == 200, response.text
        _assert_prediction(response.json(), CLIP_END_S - CLIP_START_S, version)

        relative = str(videos[-1].relative_to(media_root))
        response = http.post("/predict", json={"path": relative, "start_s": CLIP_START_S, "end_s": CLIP_END_S})
        assert response.status_code == 200, response.text
        _assert_prediction(response.json(), CLIP_END_S - CLIP_START_S, version)

    print(
        f"\ne2e: job {submission_id} SUCCEEDED after {job_seconds:.0f} s; champion v{version} "
        f"(test weighted_score {summary['test_weighted_score']:.3f}); "
        f"Serve answered {time.monotonic() - serve_started:.0f} s "
        f"after RUNNING; total {time.monotonic() - started:.0f} s"
    )
