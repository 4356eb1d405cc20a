"""Serving without Ray: the HTTP API, its limits, request validation, media decoding, the model and its batcher.

Modules, one concern each:

* :mod:`~opsvlm.serving.config`: the app's arguments (:class:`ServeAppConfig`, loaded with :mod:`opsvlm.config`).
* :mod:`~opsvlm.serving.limits`: what a request may ask (:class:`ServingLimits`).
* :mod:`~opsvlm.serving.errors`: :class:`ServingError` and the 503s that shed load.
* :mod:`~opsvlm.serving.requests`: reading and validating requests (bodies, JSON, windows, paths, uploads).
* :mod:`~opsvlm.serving.media`: decoding videos (killable decoder processes) and images (format allow-list).
* :mod:`~opsvlm.serving.work`: the per-request deadline and the bounded work pool.
* :mod:`~opsvlm.serving.predict`: work items in, typed outcomes out; prediction health.
* :mod:`~opsvlm.serving.batcher`: the model's queue (one forward pass at a time, bounded).
* :mod:`~opsvlm.serving.watcher`: the model: loading with retries, following an alias, the private cache.
* :mod:`~opsvlm.serving.schemas`: request and response schemas.
* :mod:`~opsvlm.serving.endpoint`: the backend protocol, the context endpoints share, the extension point.
* :mod:`~opsvlm.serving.clips`, :mod:`~opsvlm.serving.objects`: the endpoint modules.
* :mod:`~opsvlm.serving.app`: :func:`create_app`.
* :mod:`~opsvlm.serving.local`: :class:`LocalBackend` (in-process).

Nothing here imports Ray; torch/transformers only where a model is loaded.
"""

from opsvlm.serving.app import DEFAULT_ENDPOINTS, create_app
from opsvlm.serving.batcher import Batcher, BatchingSettings
from opsvlm.serving.config import AuthSettings, DetectorSettings, ServeAppConfig, load_app_config
from opsvlm.serving.endpoint import Backend, Endpoint, ServingContext
from opsvlm.serving.errors import ServingError
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.local import LocalBackend
from opsvlm.serving.media import DecodedClip, Media, Window
from opsvlm.serving.predict import Answers, Outcome, SpecChanged, WorkItem, WrongTask
from opsvlm.serving.watcher import LoadedModel, ModelSource, ModelWatcher, polling
from opsvlm.serving.work import Deadline, WorkPool

__all__ = [
    "DEFAULT_ENDPOINTS",
    "Answers",
    "AuthSettings",
    "Backend",
    "Batcher",
    "BatchingSettings",
    "Deadline",
    "DecodedClip",
    "DetectorSettings",
    "Endpoint",
    "LoadedModel",
    "LocalBackend",
    "Media",
    "ModelSource",
    "ModelWatcher",
    "Outcome",
    "ServeAppConfig",
    "ServingContext",
    "ServingError",
    "ServingLimits",
    "SpecChanged",
    "Window",
    "WorkItem",
    "WorkPool",
    "WrongTask",
    "create_app",
    "load_app_config",
    "polling",
]
