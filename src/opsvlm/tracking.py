"""MLflow tracking: where runs go and how configs become params. Imports mlflow lazily.

The embedded default is a local SQLite store under ``./mlruns`` (it supports the model registry and aliases, which
MLflow's plain file store does not do well); a tracking server URL works the same way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from opsvlm.config import flatten

DEFAULT_STORE_DIR = "mlruns"
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on one param value


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
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts beside the database, as an absolute path, so any process (Ray workers, Serve) finds them.
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as flat MLflow params (``optim.lr`` -> ``"0.0002"``), values clipped to MLflow's limit."""
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(config).items()}


class MetricBuffer:
    """Metrics logged step by step, written to MLflow in batches (one ``log_batch`` request per flush).

    A synchronous MLflow write per optimizer step costs tens of milliseconds (a request or a database transaction),
    and in data-parallel training every other worker waits for it at the next all-reduce. Buffering keeps each value's
    own step and wall-clock timestamp, so the run's history is the same as with per-step writes.

    Args:
        run_id: The MLflow run to log to.
        tracking_uri: Where that run lives.
        every_steps: ``add`` flushes once values of this many distinct steps are pending (1 = every step).
    """

    def __init__(self, run_id: str, tracking_uri: str, every_steps: int) -> None:
        from mlflow import MlflowClient

        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._run_id = run_id
        self._every = every_steps
        self._pending: list[Any] = []  # mlflow.entities.Metric
        self._steps: set[int] = set()

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
            self.flush()

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
