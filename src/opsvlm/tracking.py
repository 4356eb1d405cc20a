"""MLflow tracking: where runs go and how configs become params. Imports mlflow lazily.

The embedded default is a local SQLite store under ``./mlruns`` (it supports the model registry and aliases, which
MLflow's plain file store does not do well); a tracking server URL works the same way.
"""

from __future__ import annotations

import os
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
