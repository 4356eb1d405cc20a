"""The opsvlm Ray Serve application: ``import_path: serve_app.app:build_app`` in a Serve config.

Deployments::

    HTTP -> Ingress (FastAPI: validation, uploads, limits, load shedding)
              |-- Decoder (only with separate_decoder: decode + sample frames with the model's SamplingSpec)
              |-- Detector (only with detector.ref: the inspection task's stage 1, batched on its own)
              '-- Predictor (holds the model, batches queued work, GPU when available, follows the registry alias)

* ``Ingress`` serves :func:`opsvlm.serving.create_app` (the same API as the plain-FastAPI baseline). Without a
  separate decoder it decodes itself, in a bounded pool of worker threads that each wait on a decoder process with a
  deadline. It admits at most ``limits.max_inflight_requests`` prediction requests at once and answers the rest 503
  (``Retry-After``) before reading their bodies, so ``/health`` and ``/status`` stay responsive under overload;
  Serve's own ``max_queued_requests`` in front of it sheds what its event loop cannot even take.
* ``Decoder`` (``separate_decoder: true``) moves decoding onto its own CPU replicas: on a GPU cluster decoding
  then scales independently and never takes CPU from the GPU replicas; uploads travel to it as bytes, allowed-root
  paths as paths (the root is expected on every node). On a small CPU box the extra hop can cost more than it saves,
  so it is an option.
* ``Predictor`` loads the model once per replica from the MLflow registry (``models:/opsvlm@champion`` by default;
  ``models:/<name>/<version>``, a run id or a checkpoint directory also work), retrying with backoff, or from its
  private cache when the registry is unreachable (:class:`opsvlm.serving.ModelWatcher`). Every prediction goes
  through one :class:`opsvlm.serving.Batcher`: one forward pass at a time, formed from the work queued meanwhile (up
  to ``batching.max_batch_size`` inputs), never two uses of the tokenizer at once; a full queue (``max_queued_inputs``)
  or a passed deadline is a 503. For an alias reference a background task polls the alias every
  ``model.poll_interval_s``; when it moves, the new version is loaded in a worker thread while the old one keeps
  serving, then swapped in with one reference assignment. Each batch uses one version and every response names it.
  With several replicas each polls on its own, so for up to ``poll_interval_s`` they may answer with different
  versions. The swap briefly holds two models in memory (on a GPU: plan for it).

* ``Detector`` (``detector.ref`` set, e.g. ``models:/opsvlm-detector@champion``): the inspection task's stage-1 YOLO
  detector (:class:`opsvlm.detection.serve.DetectorServer`) in its own deployment: whole images
  through a small CNN, batched across requests separately from the VLM's batches. ``/predict_objects`` requests that
  send no detections go image -> Detector -> Predictor (every detected object classified in one work item); requests
  with detections skip it. ``/status`` shows the detector version loaded (``detector``), or why none is usable.

``/timeline`` decodes in the Ingress (its decoder streams windows while the model works) and sends the windows to the
Predictor as clip work items; the task, window length and grammar come from the Predictor once per model version.

If the new version has another sampling spec, the Predictor answers ``SpecChanged`` for work decoded with the old
one and the Ingress decodes it again with the new spec, so pixels always match the model that sees them.

App args: :class:`opsvlm.serving.ServeAppConfig` (sections ``model``, ``limits``, ``batching``, ``auth``,
``detector``), loaded
with :mod:`opsvlm.config`; replicas, resources, queue bounds and autoscaling are set per deployment in the config
(``serve_app/config.yaml``, ``serve_app/config_tiny_cpu.yaml``). Nothing runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from opsvlm.config import to_dict
from opsvlm.serving import (
    Batcher,
    Deadline,
    DecodedClip,
    Media,
    ModelWatcher,
    Outcome,
    ServeAppConfig,
    ServingError,
    ServingLimits,
    Window,
    WorkItem,
    WorkPool,
    clips,
    create_app,
    load_app_config,
    objects,
    timeline,
)
from opsvlm.serving.errors import overloaded, unavailable
from opsvlm.serving.media import decode_media, decode_media_bytes
from opsvlm.serving.timeline import TimelineSupport
from opsvlm.serving.watcher import default_cache_root, private_directory
from opsvlm.tracking import resolve_tracking_uri
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "DecoderDeployment",
    "DetectorClient",
    "Ingress",
    "PredictorDeployment",
    "ServeBackend",
    "app",
    "build_app",
]

logger = logging.getLogger("ray.serve")

INGRESS, DECODER, PREDICTOR, DETECTOR = "Ingress", "Decoder", "Predictor", "Detector"
HEALTH_CALL_TIMEOUT_S = 10.0


# max_ongoing_requests: above what the Ingress replicas can have at the Predictor (each call waits in the batcher's
# queue, which sheds beyond batching.max_queued_inputs), so health and status calls are never queued behind work.
@serve.deployment(name=PREDICTOR, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class PredictorDeployment:
    """Holds the model; batches concurrent work into one forward pass; follows the registry alias."""

    async def __init__(self, args: dict[str, Any]):
        config = load_app_config(args)
        # Off the event loop: Serve keeps health-checking the replica while the model loads (with retries).
        self._watcher = await asyncio.to_thread(ModelWatcher.from_source, config.model)
        self._batcher = Batcher(lambda: self._watcher.current, config.batching, config.limits.retry_after_s)
        self._batcher.start()
        self._timeline = TimelineSupport(lambda: self._watcher.current)
        self._poll_interval_s = config.model.poll_interval_s
        self._poller = None
        follows = self._watcher.watches or self._watcher.current.source == "cache"
        if follows and self._poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        logger.info(
            "Predictor serving %s version %s (from %s)",
            config.model.ref,
            self._watcher.current.version,
            self._watcher.current.source,
        )

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            before = self._watcher.current.version
            try:
                # In a thread: loading a new version takes seconds to minutes; requests keep being served meanwhile.
                swapped = await asyncio.to_thread(self._watcher.poll)
            except Exception:  # poll() already contains its failures; this is a last resort to keep polling
                logger.exception("model watcher poll failed")
                continue
            if swapped:
                logger.info("Predictor swapped version %s -> %s", before, self._watcher.current.version)

    async def predict(self, item: WorkItem, timeout_s: float | None = None) -> Outcome:
        """One work item's outcome (see :func:`opsvlm.serving.predict.predict_items`); batched with concurrent
        work; answered 503 when the queue is full or ``timeout_s`` passes before its turn."""
        return await self._batcher.submit(item, timeout_s)

    def health(self) -> dict[str, Any]:
        """Whether this replica's recent predictions succeed, and the version it serves."""
        health = self._batcher.health.describe()
        return {
            **health,
            "healthy": self._batcher.alive and health["healthy"],
            "model_version": self._watcher.current.version,
        }

    def status(self, show_paths: bool = False) -> dict[str, Any]:
        """Model name/version/source, sampling spec, labels, batching counters and health of this replica."""
        status = self._watcher.status(show_paths)
        status["model"]["poll_interval_s"] = self._poll_interval_s
        status["model"]["replica"] = serve.get_replica_context().replica_id.unique_id
        status["batching"] = self._batcher.describe()
        status["health"] = self._batcher.health.describe()
        return status

    async def timeline_support(self, show_paths: bool = False) -> dict[str, Any]:
        """What ``/timeline`` needs from the current model (task, media, window length, grammar), once per version."""
        return await asyncio.to_thread(self._timeline.get, show_paths)

    def check_health(self) -> None:
        if not self._batcher.alive:
            raise RuntimeError("the batching task stopped")
        if self._poller is not None and self._poller.done():
            raise RuntimeError("the model watcher task stopped; this replica would never pick up new versions")

    def __del__(self) -> None:
        # Serve calls this on replica shutdown: stop polling and batching before the event loop goes away.
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.stop()


@serve.deployment(name=DECODER, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class DecoderDeployment:
    """Decodes and samples clips on CPU replicas (``separate_decoder: true``)."""

    def __init__(self, args: dict[str, Any]):
        self._limits = load_app_config(args).limits

    async def decode_path(
        self, media: Media, windows: list[Window], spec: SamplingSpec
    ) -> list[DecodedClip | ServingError]:
        """Clips of a file under the allowed root (already validated by the Ingress)."""
        return await asyncio.to_thread(decode_media, media, windows, spec, self._limits)

    async def decode_upload(
        self, data: bytes, name: str, windows: list[Window], spec: SamplingSpec
    ) -> list[DecodedClip | ServingError]:
        """Clips of an uploaded video, sent as bytes (this replica may be on another machine)."""
        return await asyncio.to_thread(decode_media_bytes, data, name, windows, spec, self._limits)


def _backpressure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BackPressureError):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return "BackPressureError" in repr(exc)


class ServeBackend:
    """:class:`opsvlm.serving.Backend` over the Decoder and Predictor deployments.

    A deployment that cannot be reached is a 503 with ``Retry-After`` (``model_unavailable`` /
    ``decoder_unavailable``); a full queue at the Predictor's handle a 503 ``overloaded``.
    """

    def __init__(self, predictor: DeploymentHandle, decoder: DeploymentHandle | None, limits: ServingLimits):
        self._predictor = predictor
        self._decoder = decoder
        self._limits = limits
        self._spec: SamplingSpec | None = None

    async def sampling_spec(self) -> SamplingSpec:
        if self._spec is None:
            try:
                status = await self._predictor.status.remote()
            except Exception as exc:
                raise unavailable(f"the model replica is unavailable: {exc!r}", self._limits.retry_after_s) from None
            self._spec = SamplingSpec(**status["sampling_spec"])
        return self._spec

    def remember_spec(self, spec: SamplingSpec) -> None:
        self._spec = spec

    async def decode(
        self, media: Media, windows: Sequence[Window], spec: SamplingSpec, pool: WorkPool
    ) -> list[DecodedClip | ServingError]:
        if self._decoder is None:
            return await pool.run(decode_media, media, windows, spec, self._limits)
        try:
            if media.uploaded:
                data = await pool.run(Path(media.path).read_bytes)
                return await self._decoder.decode_upload.remote(data, media.name, list(windows), spec)
            return await self._decoder.decode_path.remote(media, list(windows), spec)
        except ServingError:
            raise
        except Exception as exc:  # the decoder replica died, is unreachable or its queue is full
            logger.warning("decoder call failed: %r", exc)
            if _backpressure(exc):
                error = overloaded(f"{media.name}: the decoders are busy; retry later", self._limits.retry_after_s)
            else:
                detail = f"{media.name}: decoder unavailable: {exc!r}"
                error = ServingError(503, "decoder_unavailable", detail, self._limits.retry_after_s)
            return [error] * len(windows)

    async def predict(self, items: Sequence[WorkItem], deadline: Deadline) -> list[Outcome]:
        # One call per item: the Predictor batches them with the work of concurrent requests.
        async def one(item: WorkItem) -> Outcome:
            remaining = deadline.remaining()
            if remaining <= 0:
                return deadline.error()
            try:
                return await self._predictor.predict.remote(item, remaining)
            except Exception as exc:
                if _backpressure(exc):
                    return overloaded("the model's queue is full; retry later", self._limits.retry_after_s)
                logger.warning("predictor call failed: %r", exc)
                return unavailable(f"the model replica is unavailable: {exc!r}", self._limits.retry_after_s)

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def health(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._predictor.health.remote(), HEALTH_CALL_TIMEOUT_S)
        except Exception as exc:
            raise unavailable(f"the model replica did not answer: {exc!r}", self._limits.retry_after_s) from None

    async def status(self, show_paths: bool = False) -> dict[str, Any]:
        return await self._predictor.status.remote(show_paths)

    async def timeline_support(self, show_paths: bool = False) -> dict[str, Any]:
        try:
            return await self._predictor.timeline_support.remote(show_paths)
        except Exception as exc:
            raise unavailable(f"the model replica is unavailable: {exc!r}", self._limits.retry_after_s) from None


_PATH = re.compile(r"(?<![\w:])/(?:[\w.@+-]+/)*[\w.@+-]+")


def _cause(exc: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (whose text is a whole traceback)."""
    return getattr(exc, "cause", None) or exc


class DetectorClient:
    """The ``detect`` hook of ``/predict_objects`` (:func:`opsvlm.serving.objects.make_endpoint`) over the Detector
    deployment, and its part of ``/status``.

    A bad image array is a 422 ``invalid_image``; a detector that is not usable (bad reference, a class without an
    object type) a 503 ``detector_unavailable`` naming the reason; an unreachable or full deployment a 503.
    """

    def __init__(self, handle: DeploymentHandle, limits: ServingLimits, show_paths: bool = False):
        self._handle = handle
        self._limits = limits
        self._show_paths = show_paths

    def _words(self, text: str) -> str:
        return text if self._show_paths else _PATH.sub("<path>", text)

    async def __call__(self, image: Any) -> objects.Detected:
        from opsvlm.detection.serve import DetectorUnavailable
        from opsvlm.tasks.inspection.detect.detector import DetectorError

        try:
            detections, detector = await self._handle.stage_one.remote(image)
        except DetectorError as exc:
            raise ServingError(422, "invalid_image", self._words(str(_cause(exc)))) from None
        except DetectorUnavailable as exc:
            raise ServingError(
                503, "detector_unavailable", self._words(str(_cause(exc))), self._limits.retry_after_s
            ) from None
        except Exception as exc:  # the replica died, is unreachable, or its queue is full
            logger.warning("detector call failed: %r", exc)
            if _backpressure(exc):
                raise overloaded("the detector is busy; retry later", self._limits.retry_after_s) from None
            raise ServingError(
                503, "detector_unavailable", "the detector replica is unavailable", self._limits.retry_after_s
            ) from None
        return objects.Detected(detections, detector)

    async def status(self) -> dict[str, Any]:
        """The detector's part of ``/status``: version, classes and their object types, or why it is unusable."""
        try:
            status = await asyncio.wait_for(self._handle.status.remote(), HEALTH_CALL_TIMEOUT_S)
        except Exception as exc:
            return {"ready": False, "error": f"the detector replica did not answer: {type(exc).__name__}"}
        if not self._show_paths:
            status.pop("weights", None)
            status = {k: self._words(v) if isinstance(v, str) else v for k, v in status.items()}
        return status


def _replica_counts() -> dict[str, dict[str, int]]:
    """Replicas per deployment of this application, by state (from the Serve controller)."""
    app_name = serve.get_replica_context().app_name
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: {getattr(state, "value", str(state)): count for state, count in deployment.replica_states.items()}
        for name, deployment in app.deployments.items()
    }


# Requests are cheap to hold on the Ingress's event loop (the work runs in threads, decoders and the Predictor), so
# it takes many at once and sheds in the app (limits.max_inflight_requests, before reading the body): /health and
# /status then never wait behind prediction requests. max_queued_requests bounds what waits at the proxy.
@serve.deployment(
    name=INGRESS,
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    max_queued_requests=64,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=2),
)
@serve.ingress()
class Ingress:
    """FastAPI ingress: the API of :func:`opsvlm.serving.create_app` over :class:`ServeBackend`."""

    def __init__(
        self,
        predictor: DeploymentHandle,
        decoder: DeploymentHandle | None,
        args: dict[str, Any],
        detector: DeploymentHandle | None = None,
    ):
        config = load_app_config(args)
        self._limits = config.limits
        self._api_key = config.auth.api_key()
        self._show_paths = config.show_paths
        self._separate_decoder = decoder is not None
        self._pool = WorkPool(self._limits.work_threads, self._limits.max_pending_work, self._limits.retry_after_s)
        self._backend = ServeBackend(predictor, decoder, self._limits)
        self._detector = None if detector is None else DetectorClient(detector, self._limits, self._show_paths)

    async def _serve_status(self) -> dict[str, Any]:
        try:
            replicas = await asyncio.to_thread(_replica_counts)
        except Exception as exc:  # status must answer even if the controller is slow
            replicas = {"error": repr(exc)}
        detector = None if self._detector is None else await self._detector.status()
        return {"replicas": replicas, "separate_decoder": self._separate_decoder, "detector": detector}

    def __serve_build_asgi_app__(self):
        # Built per replica after __init__ (Serve's late-bound ingress): the routes close over this replica's backend.
        return create_app(
            self._backend,
            self._limits,
            title="opsvlm (Ray Serve)",
            extra_status=self._serve_status,
            endpoints=(clips.ENDPOINT, objects.make_endpoint(self._detector), timeline.ENDPOINT),
            pool=self._pool,
            api_key=self._api_key,
            show_paths=self._show_paths,
        )


def _gpu_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: serve_app.app:build_app``).

    Args:
        args: :class:`opsvlm.serving.ServeAppConfig` as a nested mapping (the application's ``args`` in a Serve
            config), or the config itself.

    Returns:
        The bound application: Ingress -> (Decoder), (Detector), Predictor.

    Raises:
        opsvlm.config.ConfigError: unknown or invalid args, naming the field (e.g. ``limits.allowed_root`` is not a
            directory): the deploy fails here, not in every replica.
    """
    config = args if isinstance(args, ServeAppConfig) else load_app_config(args or {})
    plain = to_dict(config)
    # An empty tracking URI means MLFLOW_TRACKING_URI or the local store in ./mlruns: resolve it here, in the process
    # `serve run` / `serve deploy` starts from the repository root, so replicas find the same store wherever they run.
    if not Path(config.model.ref).is_dir():
        plain["model"]["tracking_uri"] = resolve_tracking_uri(config.model.tracking_uri)
    # Each deployment gets only the sections it uses: the Predictor's init args then do not change with the limits
    # (a limits change does not reload the model).
    predictor_args = {
        "model": plain["model"],
        "batching": plain["batching"],
        "limits": {"retry_after_s": config.limits.retry_after_s},
    }
    ingress_args = {"limits": plain["limits"], "auth": plain["auth"], "show_paths": config.show_paths}
    use_gpu = _gpu_available() if config.use_gpu == "auto" else config.use_gpu
    predictor = PredictorDeployment.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": 1 if use_gpu else 0})
    decoder = DecoderDeployment.bind({"limits": plain["limits"]}) if config.separate_decoder else None
    return Ingress.bind(predictor.bind(predictor_args), decoder, ingress_args, _detector(config))


def _detector(config: ServeAppConfig) -> Application | None:
    """The bound Detector deployment (``detector.ref`` set), else ``None``."""
    settings = config.detector
    if not settings.enabled:
        return None
    from opsvlm.detection.serve import check_class_map, detector_deployment

    check_class_map(settings.class_map, "detector.class_map")  # refused at deploy, not in every replica
    ref = settings.ref
    if Path(ref).exists():  # a file or folder: the same path on every node, as for model.ref
        ref = str(Path(ref).resolve())
    tracking_uri = resolve_tracking_uri(settings.tracking_uri or config.model.tracking_uri)
    cache_dir = settings.cache_dir or str(default_cache_root().parent / "detectors")
    private_directory(cache_dir)  # refuse a shared or foreign folder here, at deploy
    deployment = detector_deployment(num_cpus=0.25).options(name=DETECTOR)
    return deployment.bind(
        ref,
        prefer=settings.prefer,
        conf=settings.conf,
        imgsz=settings.imgsz,
        class_map=dict(settings.class_map),
        device=settings.device,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        max_batch_size=settings.max_batch_size,
        batch_wait_timeout_s=settings.batch_wait_timeout_s,
    )


app = build_app  # the builder under the name Serve examples use
