"""Serving throughput and latency: the Ray Serve app against a plain FastAPI + uvicorn server, tiny model on CPU.

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/bench_serve.py                 # 200 requests per level at concurrency 1, 8, 32
    .venv/bin/python benchmarks/bench_serve.py --quick         # 24 requests per level: smoke test of the script
    .venv/bin/python benchmarks/bench_serve.py --requests 300 --kinds upload path --repeats 2
    .venv/bin/python benchmarks/bench_serve.py --overload      # a bounded burst well above capacity (one run)

Setup (once per run). The tiny Qwen2.5-VL (built once, cached under ``--workdir``) gets a real, untrained LoRA
adapter saved as an opsvlm checkpoint (4 frames of at most 112x112 pixels per clip by default), which is logged
and registered as ``models:/opsvlm-bench@champion`` in a temporary SQLite MLflow store (the helpers of
``opsvlm.testing.checkpoints``). ``--videos`` short test videos (5 s, 112x112, 15 fps, H.264, written with
``opsvlm.video.encode.write_video``) are the payloads; they are small (tens of KB), like a short clip upload.

What runs, one after the other on the same box (never two servers under load at once):

(b) ``baseline``: the seed-style server. ``opsvlm.serving.create_app(LocalBackend(ModelWatcher(ref)), limits)``
    under uvicorn in a subprocess (one worker, 127.0.0.1): per request it parses the upload, decodes the clip with
    the same ``decode_media`` as Serve (a pooled decoder process per concurrent decode, in a worker thread), then
    calls ``Predictor.predict([clip])`` once under a lock; no batching across requests. Ray is not running.
(a) ``serve``: ``serve_app/config_tiny_cpu.yaml`` deployed as is (deployments, replica counts, fractional CPUs,
    batching, logging and the replicas' environment) except the model reference, tracking URI, model cache and HTTP
    port, on a local Ray with ``--cpus`` CPUs (HTTP proxy on 127.0.0.1), the way ``serve run`` deploys it (the
    file's global ``logging_config`` included). Measured twice:
    ``serve_ingress_decode`` (``separate_decoder: false``: the Ingress decodes) and ``serve_separate_decoder``
    (``separate_decoder: true``: a Decoder deployment with its code defaults, uploads travel to it as bytes).

Load: an ``httpx.AsyncClient`` in this process keeps ``c`` requests in flight (c in ``--concurrency``, default
1, 8, 32) until ``--requests`` requests have completed or ``--level-timeout-s`` has passed (then it stops issuing).
Requests are ``POST /predict`` multipart uploads of the test videos (kind ``upload``, round-robin, whole video) and,
with ``--kinds upload path``, also JSON requests naming the same videos under the server's allowed root (kind
``path``: no upload parsing, no temporary copy). The first ``--warmup`` requests of every level (default
``max(8, c)``) are sent and discarded. Per level: requests/s = answered (200) requests / wall time of the level
(first request sent to last answer), p50/p99/mean latency of the individual requests, errors (any non-200 or
transport error, warm-up included; must be 0),
and the server side's CPU seconds per request (baseline: the uvicorn process and its decoder processes; serve:
every process of this Ray instance: proxy, replicas, decoders, controller, raylet, GCS), a view that does not depend
on what else runs on the machine, broken down by process kind (``server_cpu_by_process``: each deployment's
replicas, the decoder processes charged to the process that runs them, the proxy, the controller, Ray's daemons).
For Serve the Predictor's counters from ``/status`` (summed over its replicas, each asked until seen) give the
batch sizes actually formed (``clips / batches`` and the largest), the share of the level the model was busy
(``predictor_busy_share``), the mean time a clip queued before its batch started, and the replica counts.

Figures: ``ratio`` = Serve rps / baseline rps for uploads, the lowest over the levels with c >= 8, for the better
Serve variant (the one whose lowest ratio is higher: that is the default to recommend for small CPU boxes);
``p99_ratio`` = Serve p99 / baseline p99, the highest over those levels. ``meets_target``: ratio >= 2.0,
p99_ratio <= 1.0 and no errors anywhere. With ``--repeats R`` the whole sequence (baseline, both Serve variants)
runs R times and each level keeps its best run (highest rps; its p50/p99 are reported with it).

The machine is shared: the 1-minute load average is printed and recorded before each phase; rerun when it is well
above the core count. Output: one line per level, then ONE JSON line (last line)::

    {"benchmark": "serve", "levels": {...}, "ratio": x, "p99_ratio": y, "target": 2.0, "meets_target": ...}

Overload (``--overload``): only Serve (the tiny config, the Ingress decoding), warmed up, then ONE bounded burst
well above capacity: ``--overload-requests`` uploads (default 240) with ``--overload-concurrency`` in flight (default
128, four times the app's ``limits.max_inflight_requests`` of 32), while ``/health`` is polled every
``--health-every-s``. Reported: the admitted (200) requests' p50/p99 latency, how many were shed with 503 (and how
fast, and whether each carried ``Retry-After``), every other answer (must be 0), and whether ``/health`` answered 200
throughout and after. ``ratio`` = admitted p99 / ``limits.request_deadline_s`` (target <= 1: admitted requests keep a
bounded p99); ``meets_target`` also needs shedding to have happened, every 503 to carry ``Retry-After``, no other
errors and ``/health`` 200 throughout. One JSON line at the end::

    {"benchmark": "serve_overload", "admitted_p50_ms": ..., "admitted_p99_ms": ..., "shed_503": ...,
     "other_errors": 0, "health_200_throughout": true, "ratio": ..., "target": 1.0, "meets_target": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # serve_app
    sys.path.insert(0, str(REPO))
TINY_CONFIG = REPO / "serve_app" / "config_tiny_cpu.yaml"
TARGET = 2.0
MODEL_NAME = "opsvlm-bench"
APP_NAME = "opsvlm"
VIDEO_SECONDS = 5.0
VIDEO_SIZE = 112
VIDEO_FPS = 15.0
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def log(message: str) -> None:
    print(message, flush=True)


# --- setup -----------------------------------------------------------------------------------------------------------


def write_videos(root: Path, count: int) -> list[Path]:
    """``count`` different 5 s 112x112 15 fps H.264 videos (moving gradients plus noise: real motion to encode)."""
    import numpy as np

    from opsvlm.video.encode import write_video

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = root / f"clip{index}.mp4"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(index)
        y, x = np.mgrid[0:VIDEO_SIZE, 0:VIDEO_SIZE].astype(np.float32)
        base = rng.uniform(0, 255, 3).astype(np.float32)

        def frames(base=base, rng=rng, x=x, y=y, index=index):
            for t in range(round(VIDEO_SECONDS * VIDEO_FPS)):
                wave = (x * (1 + index) + y * 2 + t * 6) % 256
                noise = rng.normal(0, 12, (VIDEO_SIZE, VIDEO_SIZE, 1))
                yield np.clip(wave[..., None] * 0.7 + base * 0.3 + noise, 0, 255).astype(np.uint8)

        write_video(path, frames(), VIDEO_FPS)
    return paths


def setup(workdir: Path, scratch: Path, frames: int, pixels: int, videos: int) -> dict[str, Any]:
    """Tiny model, a real adapter checkpoint registered as champion in a SQLite MLflow store, test videos."""
    from mlflow import MlflowClient

    from opsvlm.testing.checkpoints import register_checkpoint, write_adapter_checkpoint
    from opsvlm.testing.tiny import ensure_tiny_model
    from opsvlm.video.sampling import SamplingSpec

    spec = SamplingSpec(frames_per_clip=frames, max_pixels=pixels * pixels)
    tiny = ensure_tiny_model(workdir / "tiny")
    checkpoint = workdir / f"checkpoint-{frames}f-{pixels}px"
    if not (checkpoint / "model.json").exists():
        shutil.rmtree(checkpoint, ignore_errors=True)
        write_adapter_checkpoint(checkpoint, tiny, spec, task="operations", seed=0)
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment_id = client.create_experiment("bench-serve", artifact_location=(scratch / "artifacts").as_uri())
    version = register_checkpoint(client, experiment_id, uri, MODEL_NAME, checkpoint, champion=True)
    root = workdir / "videos"
    paths = write_videos(root, videos)
    return {"uri": uri, "version": version, "root": root, "videos": paths, "spec": spec}


def serve_args(env: dict[str, Any], scratch: Path, config: Path) -> dict[str, Any]:
    """The Serve config's app args with this run's model, store and video root."""
    import yaml

    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    args["model"] = {
        **args.get("model", {}),
        "ref": f"models:/{MODEL_NAME}@champion",
        "tracking_uri": env["uri"],
        "cache_dir": str(scratch / "model-cache"),
    }
    args["limits"] = {**args.get("limits", {}), "allowed_root": str(env["root"])}
    return args


# --- CPU accounting --------------------------------------------------------------------------------------------------


def _label(proc) -> str:
    import psutil

    try:
        cmdline = proc.cmdline()
        name = proc.name()
    except psutil.Error:
        return "?"
    text = " ".join(cmdline)
    if "_serve_decoding" in text:  # charged to the process that runs them (Ingress, Decoder or baseline server)
        try:
            parent = _label(proc.parent())
        except (psutil.Error, AttributeError):
            parent = "?"
        return f"decoder processes of {parent}"
    for prefix in ("ray::",):
        if name.startswith(prefix) or (cmdline and cmdline[0].startswith(prefix)):
            title = cmdline[0] if cmdline and cmdline[0].startswith(prefix) else name
            title = title.split(" ")[0].split(".")[0]  # the title names the running method after a dot
            if "ServeReplica" in title:
                return "replica " + title.rsplit(":", 1)[-1]
            return title
    if "raylet" in text:
        return "raylet"
    if "gcs_server" in text:
        return "gcs_server"
    if "uvicorn" in text or "--baseline-server" in text:
        return "baseline server"
    scripts = [os.path.basename(arg) for arg in cmdline[1:3] if arg.endswith(".py")]  # Ray's log monitor, ...
    return scripts[0] if scripts else (os.path.basename(cmdline[0]) if cmdline else name)


class CpuMeter:
    """CPU seconds of a process tree (``root`` and its descendants, or only the descendants), by process kind."""

    def __init__(self, root_pid: int, include_root: bool):
        self.root_pid = root_pid
        self.include_root = include_root

    def snapshot(self) -> dict[int, tuple[str, float]]:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = root.children(recursive=True) + ([root] if self.include_root else [])
        except psutil.Error:
            return {}
        out = {}
        for proc in procs:
            try:
                times = proc.cpu_times()
                out[proc.pid] = (_label(proc), times.user + times.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def delta(
        before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
    ) -> tuple[dict[str, float], dict[str, int]]:
        """CPU seconds spent between two snapshots by process kind, and how many processes each kind has."""
        by_kind: dict[str, float] = {}
        processes: dict[str, int] = {}
        for pid, (label, cpu) in after.items():
            spent = cpu - before.get(pid, (label, 0.0))[1]
            by_kind[label] = by_kind.get(label, 0.0) + max(spent, 0.0)
            processes[label] = processes.get(label, 0) + 1
        return by_kind, processes


def cpu_bound_rps(cpu: dict[str, float], processes: dict[str, int], requests: int, cores: int) -> float:
    """Requests/s the measured CPU cost allows on ``cores`` idle cores: all processes together get ``cores`` cores,
    and no single process more than one (one torch thread per process, and the GIL). A load-independent view."""
    if not requests or not sum(cpu.values()):
        return float("nan")
    bound = cores * requests / sum(cpu.values())
    for kind, seconds in cpu.items():
        if processes.get(kind) == 1 and seconds > 0:
            bound = min(bound, requests / seconds)
    return round(bound, 2)


# --- load generator --------------------------------------------------------------------------------------------------


def make_requests(kind: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    """httpx request kwargs, round-robin over the videos."""
    if kind == "upload":
        return [{"files": {"file": (p.name, p.read_bytes(), "video/mp4")}} for p in env["videos"]]
    return [{"json": {"path": p.name}} for p in env["videos"]]


async def _load(url: str, requests: list[dict], concurrency: int, count: int, warmup: int, timeout_s: float):
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def run(n: int, deadline: float | None) -> tuple[list[float], list[str], float]:
            latencies: list[float] = []
            errors: list[str] = []
            issued = 0

            async def worker() -> None:
                nonlocal issued
                while issued < n and (deadline is None or time.monotonic() < deadline):
                    kwargs = requests[issued % len(requests)]
                    issued += 1
                    started = time.perf_counter()
                    try:
                        response = await client.post("/predict", **kwargs)
                        ok = response.status_code == 200
                        detail = f"{response.status_code} {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, detail = False, repr(exc)
                    latencies.append(time.perf_counter() - started)
                    if not ok:
                        errors.append(detail)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, errors, time.perf_counter() - started

        _, warm_errors, _ = await run(warmup, None)
        latencies, errors, wall = await run(count, time.monotonic() + timeout_s)
        return latencies, errors, wall, warm_errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))  # nearest rank
    return ordered[rank]


def measure(
    name: str,
    url: str,
    env: dict[str, Any],
    meter: CpuMeter,
    opts: argparse.Namespace,
    batching: callable | None = None,
) -> dict[str, Any]:
    """Every (kind, concurrency) level against one server."""
    import httpx

    results = {}
    for kind in opts.kinds:
        requests = make_requests(kind, env)
        for concurrency in opts.concurrency:
            warmup = opts.warmup if opts.warmup is not None else max(8, concurrency)
            before_batching = batching() if batching else None
            before = meter.snapshot()
            load_cpu = time.process_time()
            load = load_avg()
            level_started = time.perf_counter()
            latencies, errors, wall, warm_errors = asyncio.run(
                _load(url, requests, concurrency, opts.requests, warmup, opts.level_timeout_s)
            )
            load_cpu = time.process_time() - load_cpu
            level_wall = time.perf_counter() - level_started
            cpu, processes = CpuMeter.delta(before, meter.snapshot())
            n = len(latencies)
            result = {
                "requests": n,
                "errors": len(errors),
                "rps": round((n - len(errors)) / wall, 3),  # answered requests only (errors are counted apart)
                "p50_ms": round(percentile(latencies, 50) * 1000, 1),
                "p99_ms": round(percentile(latencies, 99) * 1000, 1),
                "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
                "server_cpu_s_per_request": round(sum(cpu.values()) / max(n + warmup, 1), 4),
                "server_cpu_by_process": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
                "cpu_bound_rps": cpu_bound_rps(cpu, processes, n + warmup, opts.cpus),
                "loadgen_cpu_s_per_request": round(load_cpu / max(n + warmup, 1), 4),
                "load_avg_1m": load,
            }
            result["warmup_errors"] = len(warm_errors)
            if errors or warm_errors:
                result["first_errors"] = (errors + warm_errors)[:3]
            if batching:
                after = batching()
                batches = after["batches"] - before_batching["batches"]
                clips = after["items"] - before_batching["items"]
                result["batching"] = {
                    "batches": batches,
                    "clips": clips,
                    "mean_batch": round(clips / batches, 2) if batches else None,
                    "largest_batch_so_far": after["largest_batch"],
                    "replicas": after.get("replicas"),
                }
                for key, value in after.items():  # any further counters a Predictor reports (seconds, ...)
                    if key not in result["batching"] and key not in ("batches", "items", "largest_batch"):
                        if isinstance(value, float):
                            value = round(value - before_batching.get(key, 0.0), 3)
                        result["batching"][key] = value
                if "busy_s" in result["batching"]:  # the model's share of the whole level (warm-up included)
                    result["batching"]["predictor_busy_share"] = round(result["batching"]["busy_s"] / level_wall, 3)
                if "queue_wait_s" in result["batching"] and clips:
                    wait_ms = result["batching"]["queue_wait_s"] / clips * 1e3
                    result["batching"]["mean_queue_wait_ms"] = round(wait_ms, 1)
            results[f"{kind}_c{concurrency}"] = result
            extra = f" batch {result['batching']['mean_batch']}" if batching else ""
            log(
                f"  {name:24s} {kind:6s} c={concurrency:<3d} {result['rps']:7.2f} req/s  p50 {result['p50_ms']:8.1f} "
                f"ms  p99 {result['p99_ms']:8.1f} ms  errors {result['errors']}  server CPU "
                f"{result['server_cpu_s_per_request'] * 1000:6.1f} ms/req (bound {result['cpu_bound_rps']} req/s)"
                f"{extra}  load {load}"
            )
            with httpx.Client(base_url=url, timeout=30) as http:  # still healthy after the level
                assert http.get("/health").status_code == 200
    return results


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        if process is not None and process.poll() is not None:
            sys.exit(f"bench_serve: the server exited with {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"bench_serve: {url}/health not OK within {timeout_s:.0f} s")
        time.sleep(0.5)


# --- (b) the baseline server -----------------------------------------------------------------------------------------


def baseline_server(port: int, args: dict[str, Any]) -> None:
    """The seed-style server (runs in a subprocess): plain FastAPI + uvicorn, one worker, LocalBackend, one request's
    clips per forward pass (no batching across requests)."""
    import uvicorn

    from opsvlm.serving import BatchingSettings, LocalBackend, ModelWatcher, create_app, load_app_config, polling

    config = load_app_config(args)
    watcher = ModelWatcher.from_source(config.model)
    one_at_a_time = BatchingSettings(max_batch_size=1, batch_wait_timeout_s=0.0, max_queued_inputs=1 << 20)
    app = create_app(LocalBackend(watcher, config.limits, one_at_a_time), config.limits, title="opsvlm (baseline)")
    with polling(watcher, config.model.poll_interval_s):
        uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


def free_port() -> int:
    from opsvlm.testing.processes import free_port as port

    return port()


def run_baseline(env: dict[str, Any], args: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    baseline_args = {
        "model": {**args["model"], "cache_dir": tempfile.mkdtemp(prefix="bench-serve-base-")},
        # the seed server had no admission bound: keep it from shedding so both sides answer every request
        "limits": {**args["limits"], "max_inflight_requests": 1 << 20, "max_pending_work": 1 << 20},
    }
    command = [sys.executable, __file__, "--baseline-server", json.dumps({"port": port, "args": baseline_args})]
    log(f"(b) baseline: uvicorn on {url} (load {load_avg()})")
    process = subprocess.Popen(command, start_new_session=True)
    try:
        started = time.monotonic()
        wait_healthy(url, START_TIMEOUT_S, process)
        log(f"  started in {time.monotonic() - started:.1f} s")
        return measure("baseline", url, env, CpuMeter(process.pid, include_root=True), opts)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # its decoder processes, if any are left


# --- (a) Ray Serve ---------------------------------------------------------------------------------------------------


def deploy(config_path: Path, args: dict[str, Any], port: int) -> float:
    """Deploy a Serve config (with these app args) the way ``serve run config.yaml`` does; returns seconds."""
    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(config_path.read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"] = args
    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        global_logging_config=schema.logging_config,  # as `serve run` does: the proxy's and controller's logging
    )
    started = time.monotonic()
    client.deploy_apps(schema, _blocking=False)
    time.sleep(2)  # the controller starts applying the new config
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = getattr(status, "status", None)
        state = getattr(state, "value", state)
        if state == "RUNNING":
            return time.monotonic() - started
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            sys.exit(f"bench_serve: deploy failed: {status.message}")
        if time.monotonic() - started > START_TIMEOUT_S:
            sys.exit(f"bench_serve: app not RUNNING after {START_TIMEOUT_S:.0f} s: {status}")
        time.sleep(1)


def predictor_counters(url: str, tries: int = 40) -> dict[str, Any]:
    """The Predictor's batching counters summed over its replicas (``largest_batch``: the largest of them).

    ``/status`` answers from one Predictor replica (the router picks it); with several, it is asked until every
    RUNNING replica's counters have been seen.
    """
    import httpx

    seen: dict[str, dict] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(tries):
            status = http.get("/status").json()
            seen[status["model"]["replica"]] = status["batching"]
            running = status.get("replicas", {}).get("Predictor", {}).get("RUNNING", 1)
            if len(seen) >= running:
                break
    total: dict[str, Any] = {}
    for counters in seen.values():
        for key, value in counters.items():
            if key in ("largest_batch", "max_batch_size"):
                total[key] = max(total.get(key, 0), value)
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    total["replicas"] = status.get("replicas")
    total["predictor_replicas_seen"] = len(seen)
    return total


def run_serve(env: dict[str, Any], args: dict[str, Any], opts: argparse.Namespace) -> dict[str, dict]:
    import ray
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"(a) Ray Serve on {url}, {opts.cpus} CPUs (load {load_avg()})")
    from opsvlm.testing.cluster import start_ray

    start_ray(opts.cpus)
    results = {}
    try:
        meter = CpuMeter(os.getpid(), include_root=False)  # every process of this Ray instance

        def batching() -> dict:
            return predictor_counters(url)

        for separate in opts.decoder_modes:
            name = "serve_separate_decoder" if separate else "serve_ingress_decode"
            seconds = deploy(opts.serve_config, {**args, "separate_decoder": separate}, port)
            wait_healthy(url, START_TIMEOUT_S)
            log(f"  {name}: RUNNING after {seconds:.1f} s")
            results[name] = measure(name, url, env, meter, opts, batching)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


# --- overload --------------------------------------------------------------------------------------------------------


async def _burst(url: str, requests: list[dict], count: int, concurrency: int, health_every_s: float) -> dict:
    """``count`` requests, ``concurrency`` in flight at once, while ``/health`` is polled; every answer recorded."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    answers: list[tuple[int | str, float, str | None]] = []
    health: list[tuple[int | str, float]] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def poll_health() -> None:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    status: int | str = (await client.get("/health", timeout=30)).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                health.append((status, time.perf_counter() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), health_every_s)

        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < count:
                kwargs = requests[issued % len(requests)]
                issued += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", **kwargs)
                    answers.append(
                        (response.status_code, time.perf_counter() - started, response.headers.get("retry-after"))
                    )
                except httpx.HTTPError as exc:
                    answers.append((type(exc).__name__, time.perf_counter() - started, None))

        poller = asyncio.create_task(poll_health())
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        done.set()
        await poller
    return {"answers": answers, "health": health, "wall_s": wall}


def run_overload(env: dict[str, Any], args: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    """The Serve config under a bounded burst well above capacity (``--overload``)."""
    import httpx
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"overload: Ray Serve on {url}, {opts.cpus} CPUs (load {load_avg()})")
    from opsvlm.testing.cluster import start_ray

    start_ray(opts.cpus)
    try:
        seconds = deploy(opts.serve_config, {**args, "separate_decoder": False}, port)
        wait_healthy(url, START_TIMEOUT_S)
        log(f"  RUNNING after {seconds:.1f} s; warm-up")
        requests = make_requests("upload", env)
        asyncio.run(_load(url, requests, 4, 0, 8, 60.0))
        with httpx.Client(base_url=url, timeout=30) as http:
            limits = http.get("/status").json()["limits"]
        log(
            f"  burst: {opts.overload_requests} uploads, {opts.overload_concurrency} in flight "
            f"(the app admits {limits['max_inflight_requests']}); load {load_avg()}"
        )
        burst = asyncio.run(
            _burst(url, requests, opts.overload_requests, opts.overload_concurrency, opts.health_every_s)
        )
        with httpx.Client(base_url=url, timeout=30) as http:
            healthy_after = http.get("/health").status_code
            server = http.get("/status").json().get("server")
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    admitted = [seconds for status, seconds, _ in burst["answers"] if status == 200]
    shed = [(seconds, retry) for status, seconds, retry in burst["answers"] if status == 503]
    other: dict[str, int] = {}
    for status, _, _ in burst["answers"]:
        if status not in (200, 503):
            other[str(status)] = other.get(str(status), 0) + 1
    health_codes: dict[str, int] = {}
    for status, _ in burst["health"]:
        health_codes[str(status)] = health_codes.get(str(status), 0) + 1
    deadline_s = float(limits["request_deadline_s"])
    p99_s = percentile(admitted, 99)
    result = {
        "requests": len(burst["answers"]),
        "concurrency": opts.overload_concurrency,
        "max_inflight_requests": limits["max_inflight_requests"],
        "wall_s": round(burst["wall_s"], 2),
        "admitted": len(admitted),
        "admitted_rps": round(len(admitted) / burst["wall_s"], 3),
        "admitted_p50_ms": round(percentile(admitted, 50) * 1000, 1),
        "admitted_p99_ms": round(p99_s * 1000, 1),
        "shed_503": len(shed),
        "shed_p50_ms": round(percentile([s for s, _ in shed], 50) * 1000, 1) if shed else None,
        "shed_p99_ms": round(percentile([s for s, _ in shed], 99) * 1000, 1) if shed else None,
        "shed_with_retry_after": sum(1 for _, retry in shed if retry),
        "other_errors": sum(other.values()),
        "other_errors_by_status": other,
        "health_checks": len(burst["health"]),
        "health_statuses": health_codes,
        "health_p99_ms": round(percentile([s for _, s in burst["health"]], 99) * 1000, 1),
        "health_200_throughout": bool(burst["health"]) and set(health_codes) == {"200"} and healthy_after == 200,
        "request_deadline_s": deadline_s,
        "server": server,
        "load_avg_1m": load_avg(),
    }
    log(
        f"  admitted {result['admitted']} (p50 {result['admitted_p50_ms']} ms, p99 {result['admitted_p99_ms']} ms), "
        f"shed {result['shed_503']} with 503 (p50 {result['shed_p50_ms']} ms), other errors {result['other_errors']}, "
        f"/health {health_codes}"
    )
    return result


# --- report ----------------------------------------------------------------------------------------------------------


def best_of(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per level the run with the highest rps."""
    best: dict[str, dict] = {}
    for run in runs:
        for level, result in run.items():
            if level not in best or result["rps"] > best[level]["rps"]:
                best[level] = result
    return best


def summarize(servers: dict[str, dict[str, dict]], opts: argparse.Namespace) -> dict[str, Any]:
    baseline = servers["baseline"]
    high = [f"upload_c{c}" for c in opts.concurrency if c >= 8 and f"upload_c{c}" in baseline]
    comparisons = {}
    for name, levels in servers.items():
        if name == "baseline":
            continue
        comparisons[name] = {
            level: {
                "rps_ratio": round(levels[level]["rps"] / baseline[level]["rps"], 3),
                "p99_ratio": round(levels[level]["p99_ms"] / baseline[level]["p99_ms"], 3),
                "cpu_bound_ratio": round(levels[level]["cpu_bound_rps"] / baseline[level]["cpu_bound_rps"], 3),
            }
            for level in baseline
            if level in levels
        }
    variants = list(comparisons)
    best = max(variants, key=lambda v: min((comparisons[v][lvl]["rps_ratio"] for lvl in high), default=0.0))
    ratio = min((comparisons[best][lvl]["rps_ratio"] for lvl in high), default=0.0)
    p99_ratio = max((comparisons[best][lvl]["p99_ratio"] for lvl in high), default=float("inf"))
    cpu_bound_ratio = min((comparisons[best][lvl]["cpu_bound_ratio"] for lvl in high), default=0.0)
    errors = sum(r["errors"] + r.get("warmup_errors", 0) for levels in servers.values() for r in levels.values())
    return {
        "comparisons": comparisons,
        "best_serve_variant": best,
        "ratio": ratio,
        "p99_ratio": p99_ratio,
        "cpu_bound_ratio": cpu_bound_ratio,
        "errors": errors,
        "meets_target": bool(ratio >= TARGET and p99_ratio <= 1.0 and errors == 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per level (default 200)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per level (default max(8, c))")
    parser.add_argument("--level-timeout-s", type=float, default=120.0, help="stop issuing requests after this")
    parser.add_argument("--kinds", nargs="+", choices=("upload", "path"), default=["upload"])
    parser.add_argument("--decoder-modes", nargs="+", choices=("false", "true"), default=["false", "true"])
    parser.add_argument("--servers", nargs="+", choices=("baseline", "serve"), default=["baseline", "serve"])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip of the checkpoint's spec")
    parser.add_argument("--pixels", type=int, default=112, help="frame side: max_pixels = pixels^2")
    parser.add_argument("--videos", type=int, default=4, help="distinct test videos (round-robin)")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole sequence R times; best run counts")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_serve")
    parser.add_argument("--quick", action="store_true", help="24 requests per level, 4 warm-up: smoke test")
    parser.add_argument("--serve-config", type=Path, default=TINY_CONFIG, help="Serve config to deploy")
    parser.add_argument(
        "--serve-app-dir", type=Path, help="import serve_app (and opsvlm, if there) from DIR: try a modified copy"
    )
    parser.add_argument(
        "--overload", action="store_true", help="only Serve, a bounded burst well above capacity (see the docstring)"
    )
    parser.add_argument("--overload-requests", type=int, default=240, help="requests of the burst (default 240)")
    parser.add_argument("--overload-concurrency", type=int, default=128, help="in flight at once (default 128)")
    parser.add_argument("--health-every-s", type=float, default=0.25, help="/health poll interval during the burst")
    parser.add_argument("--baseline-server", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's pool spins on 2 shared cores (every child inherits)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.baseline_server:
        baseline_server(**json.loads(opts.baseline_server))
        return
    if opts.quick:
        opts.requests, opts.warmup = 24, 4
    opts.decoder_modes = [mode == "true" for mode in opts.decoder_modes]
    # Ray workers (and the baseline subprocess) import serve_app from the repository root.
    first = [str(opts.serve_app_dir.resolve())] if opts.serve_app_dir else []
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, str(REPO), os.environ.get("PYTHONPATH")]))
    if opts.serve_app_dir:
        sys.path.insert(0, first[0])
    # A local Ray puts the driver's working directory first on its workers' sys.path: make it the one to import
    # serve_app from (the replicas would import the repository's copy over PYTHONPATH otherwise).
    opts.workdir = opts.workdir.resolve()
    opts.serve_config = opts.serve_config.resolve()
    os.chdir(first[0] if first else REPO)

    log(f"bench_serve: load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        started = time.monotonic()
        env = setup(opts.workdir, scratch, opts.frames, opts.pixels, opts.videos)
        args = serve_args(env, scratch, opts.serve_config)
        sizes = [p.stat().st_size for p in env["videos"]]
        log(
            f"setup {time.monotonic() - started:.1f} s: model version {env['version']}, spec {env['spec']}, "
            f"{len(sizes)} videos of {min(sizes)}-{max(sizes)} bytes"
        )
        if opts.overload:
            result = run_overload(env, args, opts)
            p99_ratio = result["admitted_p99_ms"] / 1000 / result["request_deadline_s"]
            record = {
                "benchmark": "serve_overload",
                "cpus": opts.cpus,
                "spec": {"frames_per_clip": opts.frames, "max_pixels": opts.pixels**2},
                **result,
                "ratio": round(p99_ratio, 3),
                "target": 1.0,
                "meets_target": bool(
                    p99_ratio <= 1.0
                    and result["other_errors"] == 0
                    and result["health_200_throughout"]
                    and result["shed_503"] > 0
                    and result["shed_with_retry_after"] == result["shed_503"]
                ),
            }
            print(json.dumps(record), flush=True)
            return
        runs: dict[str, list[dict]] = {}
        for repeat in range(opts.repeats):
            log(f"--- run {repeat + 1}/{opts.repeats}")
            if "baseline" in opts.servers:
                runs.setdefault("baseline", []).append(run_baseline(env, args, opts))
            if "serve" in opts.servers:
                for name, levels in run_serve(env, args, opts).items():
                    runs.setdefault(name, []).append(levels)
        servers = {name: best_of(r) for name, r in runs.items()}
        summary = summarize(servers, opts) if "baseline" in servers and len(servers) > 1 else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for name, comparison in summary.get("comparisons", {}).items():
        log(
            f"{name} / baseline: "
            + ", ".join(
                f"{lvl} {c['rps_ratio']}x rps, p99 {c['p99_ratio']}x, CPU bound {c['cpu_bound_ratio']}x"
                for lvl, c in comparison.items()
            )
        )
    record = {
        "benchmark": "serve",
        "load_avg_1m": load_avg(),
        "cpus": opts.cpus,
        "requests_per_level": opts.requests,
        "spec": {"frames_per_clip": opts.frames, "max_pixels": opts.pixels**2},
        "levels": servers,
        **{k: v for k, v in summary.items() if k not in ("ratio", "meets_target")},
        "ratio": summary.get("ratio"),
        "target": TARGET,
        "meets_target": summary.get("meets_target", False),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
