"""GPU tier: skipped without CUDA (tests/conftest.py skips every ``gpu``-marked test then). The Ray/MLflow fixtures
of the integration tier are reused for the multi-GPU run."""

from __future__ import annotations

from tests.integration.conftest import mlflow_server, prepared_clips, tiny_model_dir  # noqa: F401 (fixtures)
