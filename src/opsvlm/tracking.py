"""MLflow tracking: where runs go and how configs become params. Imports mlflow lazily.

The embedded default is a local SQLite store under ``./mlruns`` (it supports the model registry and aliases, which
MLflow's plain file store does not do well); a tracking server URL works the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from opsvlm.config import flatten

__all__ = [
    "DEFAULT_STORE_DIR",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "MAX_PARAM_LENGTH",
    "MetricBuffer",
    "T",
    "call_with_retry",
    "config_params",
    "ensure_experiment",
    "resolve_tracking_uri",
    "runs_page",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_STORE_DIR = "mlruns"
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on one param value
# MLflow 3's UI opens an experiment on its GenAI overview (traces, prompts) unless the experiment says it holds model
# training runs; this tag (the UI's "custom model development" kind) makes it open on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri(uri: str = "") -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else the local SQLite store (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    store = Path(DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Experiment id for ``name``, creating it (with artifacts next to a local store) if needed."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient(tracking_uri).set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside the database, as an absolute path, so any process (Ray workers, Serve) finds them.
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return mlflow.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """Where a person looks at an experiment's runs: the MLflow UI page (opened in its model-training view; MLflow 3
    otherwise shows a new browser its GenAI overview), or the command that starts a UI on a local store."""
    view = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{view}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then http://127.0.0.1:5000/{view}"


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as flat MLflow params (``optim.lr`` -> ``"0.0002"``), values clipped to MLflow's limit."""
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(config).items()}


class MetricBuffer:
    """Metrics logged step by step, written to MLflow in batches (one ``log_batch`` request per flush).

    A synchronous MLflow write per optimizer step costs tens of milliseconds (a request or a database transaction),
    and in data-parallel training every other worker waits for it at the next all-reduce. Buffering keeps each value's
    own step and wall-clock timestamp, so the run's history is the same as with per-step writes.

    An MLflow outage does not stop training: :meth:`add` and :meth:`try_flush` keep the values when a write fails
    and try again later (waits doubling from ``retry_after_s`` up to ``max_retry_after_s``); :meth:`flush_within`
    keeps trying for a while (the end of training); :meth:`flush` raises.

    Args:
        run_id: The MLflow run to log to.
        tracking_uri: Where that run lives.
        every_steps: ``add`` flushes once values of this many distinct steps are pending (1 = every step).
        retry_after_s: Wait after a failed write before the next try.
        max_retry_after_s: Longest wait between tries.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str,
        every_steps: int,
        *,
        retry_after_s: float = 2.0,
        max_retry_after_s: float = 30.0,
    ) -> None:
        from mlflow import MlflowClient

        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._run_id = run_id
        self._every = every_steps
        self._pending: list[Any] = []  # mlflow.entities.Metric
        self._steps: set[int] = set()
        self._retry_after_s = retry_after_s
        self._max_retry_after_s = max_retry_after_s
        self._wait_s = retry_after_s
        self._next_try = 0.0  # time.monotonic() before which no write is tried
        self.failed_writes = 0

    @property
    def pending(self) -> int:
        """Values not yet written."""
        return len(self._pending)

    def add(self, metrics: dict[str, float], step: int, timestamp: float | None = None) -> None:
        """Queue ``metrics`` for ``step`` (``timestamp``: unix seconds, default now); flush when enough steps wait."""
        from mlflow.entities import Metric

        millis = int((time.time() if timestamp is None else timestamp) * 1000)
        self._pending.extend(Metric(key, float(value), millis, step) for key, value in metrics.items())
        self._steps.add(step)
        if len(self._steps) >= self._every:
            self.try_flush()

    def try_flush(self) -> bool:
        """Write the pending values unless a recent write failed; never raises. Returns whether nothing is pending."""
        if not self._pending:
            return True
        if time.monotonic() < self._next_try:
            return False
        try:
            self.flush()
        except Exception as exc:  # an outage: keep the values, try again later
            self.failed_writes += 1
            self._next_try = time.monotonic() + self._wait_s
            logger.warning(
                "MLflow write failed (%s); %d values kept, next try in %.0f s", exc, len(self._pending), self._wait_s
            )
            self._wait_s = min(self._wait_s * 2, self._max_retry_after_s)
            return False
        self._wait_s, self._next_try = self._retry_after_s, 0.0
        return True

    def flush_within(self, seconds: float) -> bool:
        """Try to write everything pending for up to ``seconds``; returns whether it all got written."""
        deadline = time.monotonic() + seconds
        while not self.try_flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(self._next_try, deadline) - time.monotonic()) + 0.05)
        return True

    def drain(self) -> list[dict[str, Any]]:
        """Take the pending values out as ``{"key", "value", "timestamp", "step"}`` dicts (handed on elsewhere)."""
        pending, self._pending, self._steps = self._pending, [], set()
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in pending]

    def flush(self) -> None:
        """Write every pending value (the client splits requests at MLflow's per-batch limit)."""
        if not self._pending:
            return
        pending, self._pending, self._steps = self._pending, [], set()
        try:
            self._client.log_batch(self._run_id, metrics=pending, synchronous=True)
        except BaseException:
            self._pending = pending + self._pending  # kept for a retry; nothing silently dropped
            raise


def call_with_retry(fn: Callable[[], T], *, within_s: float, what: str, first_wait_s: float = 1.0) -> T:
    """``fn()``, tried again after a failure (waits doubling up to 30 s) until it succeeds or ``within_s`` passed.

    For the driver's MLflow calls around training (reopening a run, uploading the final checkpoint), so a tracking
    server that is down for a while delays them instead of failing the run.

    Raises:
        The last error, once ``within_s`` seconds passed without a success.
    """
    deadline = time.monotonic() + within_s
    wait = first_wait_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if time.monotonic() + wait > deadline:
                raise
            logger.warning("%s failed (%s); retrying in %.0f s", what, exc, wait)
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
