"""Servers started by tests and benchmarks: a free port on 127.0.0.1, a health poll, a clean stop, and a real MLflow
tracking server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MlflowServer", "free_port", "healthy", "stop_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether ``{url}/health`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (the mlflow CLI forwards it to its uvicorn child), then SIGKILL what is left of the process group.

    The process must have been started in its own session (``start_new_session=True``): its process group id is
    its PID and holds only its children.
    """
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=15)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1: SQLite backend and proxied artifacts in ``root``, one worker.

    The store outlives the process, so :meth:`stop` then :meth:`start` is an outage the clients must ride out. Use it
    as a context manager (started on entry, stopped on exit) or call :meth:`start` / :meth:`stop`.

    Args:
        root: Folder of the store (``mlflow.db``, ``artifacts/``) and of ``server.log``; created if missing.
        port: Port to listen on; a free one when None (kept across restarts).
        env: The server's environment; this process's when None. ``MLFLOW_TRACKING_URI`` is always dropped.
        start_timeout_s: How long :meth:`start` waits for ``/health``.
    """

    def __init__(
        self,
        root: str | Path,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 60.0,
    ):
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.start_timeout_s = start_timeout_s
        self._env = dict(os.environ if env is None else env)
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        """Start the server and wait until ``/health`` answers.

        Raises:
            RuntimeError: the server exited or was not healthy in time; the message holds the end of its log.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",  # the default (4) would start four uvicorn processes on a small box
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = {**self._env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not healthy(self.url):
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                code = self.process.poll()
                self.stop()
                why = f"exited with {code}" if exited else f"not healthy after {self.start_timeout_s:.0f} s"
                raise RuntimeError(f"mlflow server {why}:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        """Stop the server (and its workers); the store stays."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
