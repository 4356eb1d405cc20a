"""The serving app's arguments as one typed config, loaded with :mod:`opsvlm.config` like every job's.

The ``args`` of the application in a Serve config (``serve_app/config*.yaml``) are a :class:`ServeAppConfig`::

    args:
      model: {ref: models:/opsvlm@champion, tracking_uri: "", poll_interval_s: 10}
      limits: {max_upload_bytes: 67108864, request_deadline_s: 60, allowed_root: null}
      batching: {max_batch_size: 8, max_queued_inputs: 64}
      auth: {api_key_env: ""}
      detector: {ref: "", class_map: {}}  # e.g. ref: models:/opsvlm-detector@champion (inspection stage 1)
      separate_decoder: false
      use_gpu: auto

Each default lives once, on its section's dataclass (:class:`~opsvlm.serving.watcher.ModelSource`,
:class:`~opsvlm.serving.limits.ServingLimits`, :class:`~opsvlm.serving.batcher.BatchingSettings`,
:class:`AuthSettings`, :class:`DetectorSettings`); unknown keys and wrong types are errors naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from opsvlm.config import ConfigError, apply_overrides, from_dict, to_dict
from opsvlm.serving.batcher import BatchingSettings
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.watcher import ModelSource

__all__ = ["AuthSettings", "DetectorSettings", "ServeAppConfig", "load_app_config"]


@dataclass(frozen=True)
class AuthSettings:
    """Optional API-key auth of every route but ``/health``.

    Off by default: the shipped configs bind 127.0.0.1. On a cluster whose HTTP proxies listen on a reachable
    address, put the key in an environment variable of the Serve application (``runtime_env.env_vars`` or the
    nodes' environment, never in the config file) and name it here; clients then send ``X-API-Key: <key>``.

    Attributes:
        api_key_env: Name of the environment variable holding the key; empty: no auth.
    """

    api_key_env: str = ""

    def api_key(self) -> str | None:
        """The key from the environment, ``None`` when auth is off.

        Raises:
            ConfigError: naming the variable, when auth is on but the variable is unset or empty.
        """
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(f"auth.api_key_env: environment variable {self.api_key_env} is unset or empty")
        return key


@dataclass(frozen=True)
class DetectorSettings:
    """The inspection task's stage 1: a detector that finds the objects of ``/predict_objects`` requests that send no
    detections. Off by default (requests must then send their detections).

    With ``ref`` set the Serve app runs the detector in its own deployment (``Detector``: whole images through one
    small CNN, batched across requests on its own, separately from the VLM's batches); replicas, CPUs and GPUs are set
    per deployment in the Serve config. A replica resolves ``ref`` once at start (an alias is pinned to the version it
    points to then; ``/status`` names it) and checks that every detector class maps to an object type: a detector it
    cannot use (unknown reference, a class without a mapping) does not stop the app; ``/predict_objects`` without
    detections then answers 503 ``detector_unavailable`` with the reason, and ``/status`` shows it.

    Attributes:
        ref: Detector reference: ``models:/<name>@<alias>`` (e.g. ``models:/opsvlm-detector@champion``),
            ``models:/<name>/<version>``, ``runs:/<run id>``, a ``.pt``/``.onnx`` file or a folder holding one;
            empty: no detector.
        tracking_uri: MLflow URI for registry references; empty: the model's (``model.tracking_uri``, resolved).
        cache_dir: Where registry versions are downloaded; empty: ``$XDG_CACHE_HOME/opsvlm/detectors``.
        prefer: ``pt`` (the Ultralytics checkpoint) or ``onnx`` (the version's ONNX export, run with onnxruntime).
        conf: Minimum detection score; ``None``: the one recorded with the detector (else 0.25).
        imgsz: Inference size, pixels; ``None``: the one recorded with the detector (else its training size).
        class_map: ``{detector class name: object type}``; empty: the one recorded with the detector, else the
            default (the 4 object types and the 9 condition classes, case, ``-`` and ``_`` ignored).
        device: ``auto`` (CUDA when the replica has a GPU), ``cpu``, ``cuda:0``...
        max_batch_size: Most images per detector forward pass.
        batch_wait_timeout_s: Longest wait for more images before a batch runs.
    """

    ref: str = ""
    tracking_uri: str = ""
    cache_dir: str = ""
    prefer: Literal["pt", "onnx"] = "pt"
    conf: float | None = None
    imgsz: int | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.conf is not None and not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {self.conf}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.ref)


@dataclass(frozen=True)
class ServeAppConfig:
    """Arguments of the Serve app (``serve_app.app:build_app``) and of the in-process baseline server.

    Attributes:
        model: Which model to serve and how to load and follow it.
        limits: Input limits, deadlines and load shedding of the HTTP API.
        batching: How the Predictor batches work and sheds what does not fit its queue.
        auth: Optional API-key auth.
        detector: The inspection task's stage-1 detector (off unless ``detector.ref`` is set).
        show_paths: Let ``/status`` show filesystem paths (checkpoint and cache folders, the allowed root).
        separate_decoder: Decode on a ``Decoder`` deployment instead of in the Ingress.
        use_gpu: One GPU per Predictor replica: ``true``, ``false`` or ``auto`` (if the cluster has GPUs).
    """

    model: ModelSource = field(default_factory=ModelSource)
    limits: ServingLimits = field(default_factory=ServingLimits)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    show_paths: bool = False
    separate_decoder: bool = False
    use_gpu: bool | Literal["auto"] = "auto"


def load_app_config(
    args: Mapping[str, Any] | ServeAppConfig | None = None, overrides: Sequence[str] = ()
) -> ServeAppConfig:
    """The app config from Serve ``args`` (a nested mapping, as in a Serve config file) and ``key=value`` overrides.

    Flat ``dotted.key: "value"`` entries (what ``serve run <import path> key=value`` passes) are overrides too, their
    values parsed as YAML.

    Raises:
        ConfigError: naming the field for an unknown key, a wrong type or an invalid value.
    """
    if isinstance(args, ServeAppConfig):
        if not overrides:
            return args
        args = to_dict(args)
    data: dict[str, Any] = {}
    given: list[str] = []
    for key, value in (args or {}).items():
        # `serve run serve_app.app:build_app model.ref=models:/x@champion use_gpu=false` passes flat strings.
        if "." in key or (isinstance(value, str) and key not in _SECTIONS):
            given.append(f"{key}={value}")
        else:
            data[key] = value
    return from_dict(ServeAppConfig, apply_overrides(data, [*given, *overrides]))


_SECTIONS = frozenset({"model", "limits", "batching", "auth", "detector"})
