"""The opsvlm Ray Serve application: ``import_path: serve_app.app:build_app`` in a Serve config.

Deployments::

    HTTP -> Ingress (FastAPI: validation, uploads, limits)
              |-- Decoder (only with separate_decoder: decode + sample frames with the model's SamplingSpec)
              '-- Predictor (holds the model, batches queued clips, GPU when available, follows the registry alias)

* ``Ingress`` serves :func:`opsvlm.serving.create_app` (the same API as the plain-FastAPI baseline). Without a
  separate decoder it decodes itself, in worker threads that each wait on a decoder process with a deadline.
* ``Decoder`` (``separate_decoder: true``) moves decoding onto its own CPU replicas: on a GPU cluster decoding
  then scales independently and never takes CPU from the GPU replicas; uploads travel to it as bytes, allowed-root
  paths as paths (the root is expected on every node). On a small CPU box the extra hop can cost more than it saves,
  so it is an option.
* ``Predictor`` loads the model once per replica from the MLflow registry (``models:/opsvlm@champion`` by default;
  ``models:/<name>/<version>``, a run id or a checkpoint directory also work). Concurrent requests share a forward
  pass: one batch runs at a time and the next one is formed from the clips that queued meanwhile (up to
  ``max_batch_size``). Ray's ``@serve.batch`` is not used: it forms the next batch while one runs (a new batch every
  ``batch_wait_timeout_s``), so when a forward pass is long against the gaps between requests (a CPU) the batches
  stay at ~1 clip. For an alias reference a background task polls the alias every
  ``poll_interval_s``; when it moves, the new version is loaded in a worker thread while the old one keeps serving,
  then swapped in with one reference assignment (:class:`opsvlm.serving.ModelWatcher`). Each batch uses one version
  and every response names it. With several replicas each polls on its own, so for up to ``poll_interval_s`` they
  may answer with different versions. The swap briefly holds two models in memory (on a GPU: plan for it).

If the new version has another sampling spec, the Predictor answers ``spec_changed`` for clips decoded with the
old one and the Ingress decodes them again with the new spec, so frames always match the model that sees them.

App args (:class:`AppArgs`) hold the model reference, tracking URI, input limits and batching; replicas, resources
and autoscaling are set per deployment in the config (``serve_app/config.yaml``, ``serve_app/config_tiny_cpu.yaml``).
Nothing runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from opsvlm.serving import (
    DecodedClip,
    Media,
    ModelWatcher,
    ServingError,
    ServingLimits,
    Window,
    create_app,
    decode_media,
    decode_media_bytes,
    predict_clips,
    predict_objects,
)
from opsvlm.tracking import resolve_tracking_uri
from opsvlm.video.sampling import SamplingSpec

logger = logging.getLogger("ray.serve")

INGRESS, DECODER, PREDICTOR = "Ingress", "Decoder", "Predictor"


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of the application in a Serve config).

    Attributes:
        model: Registry reference (``models:/opsvlm@champion``), ``models:/<name>/<version>``, a run id or a
            checkpoint directory.
        tracking_uri: MLflow tracking/registry URI; empty: ``MLFLOW_TRACKING_URI`` or the local store.
        model_cache_dir: Where replicas download checkpoints (one folder per version, reused); empty: a temporary
            directory per replica.
        quantization: Override how the base is loaded (``none`` / ``int8`` / ``nf4``); default: as trained.
        poll_interval_s: How often the Predictor checks an alias reference for a new version (0: never).
        separate_decoder: Decode on a ``Decoder`` deployment instead of in the Ingress.
        use_gpu: One GPU per Predictor replica: ``true``, ``false`` or ``auto`` (if the cluster has GPUs).
        allowed_root: Directory JSON path requests may read under; empty/null disables path requests.
        max_upload_bytes: Largest upload (for ``/batch_predict``: all files together).
        max_duration_s: Longest clip (the window if given, else the whole video).
        decode_deadline_s: Longest wait for the decoder before a 504.
        max_batch_clips: Most clips per ``/batch_predict`` request.
        max_batch_size: Most clips per forward pass.
        batch_wait_timeout_s: How long a batch that is not full waits for more clips before it runs.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "models:/opsvlm@champion"
    tracking_uri: str = ""
    model_cache_dir: str = ""
    quantization: Literal["none", "int8", "nf4"] | None = None
    poll_interval_s: float = Field(10.0, ge=0)
    separate_decoder: bool = False
    use_gpu: bool | Literal["auto"] = "auto"
    allowed_root: str | None = None
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_duration_s: float = Field(120.0, gt=0)
    decode_deadline_s: float = Field(30.0, gt=0)
    max_batch_clips: int = Field(16, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)

    def limits(self) -> ServingLimits:
        return ServingLimits(
            max_upload_bytes=self.max_upload_bytes,
            max_duration_s=self.max_duration_s,
            decode_deadline_s=self.decode_deadline_s,
            allowed_root=self.allowed_root or None,
            max_batch_clips=self.max_batch_clips,
        )


# max_ongoing_requests: a Predictor at its limit rejects calls and the caller retries after a backoff (Serve: 25 ms
# doubling to 500 ms), leaving the queue idle meanwhile; keep it above what the Ingress replicas can send at once.
@serve.deployment(name=PREDICTOR, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class PredictorDeployment:
    """Holds the model; batches concurrent clips into one forward pass; follows the registry alias."""

    async def __init__(self, args: dict[str, Any]):
        settings = AppArgs.model_validate(args)
        # Off the event loop: Serve keeps health-checking the replica while the model loads.
        self._watcher = await asyncio.to_thread(
            ModelWatcher,
            settings.model,
            tracking_uri=settings.tracking_uri,
            cache_dir=settings.model_cache_dir or None,
            quantization=settings.quantization,
        )
        self._max_batch_size = settings.max_batch_size
        self._batch_wait_timeout_s = settings.batch_wait_timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_forever())
        self._poll_interval_s = settings.poll_interval_s
        # Counters for /status (the benchmark reads them): batches formed, clips, seconds the model was busy and
        # seconds clips waited in the queue before their batch started.
        self._batching = {
            "max_batch_size": settings.max_batch_size,
            "batches": 0,
            "clips": 0,
            "largest_batch": 0,
            "busy_s": 0.0,
            "queue_wait_s": 0.0,
        }
        self._poller = None
        if self._watcher.watches and settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        logger.info("Predictor serving %s version %s", settings.model, self._watcher.current.version)

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

    async def _next_batch(self) -> list[tuple[DecodedClip, asyncio.Future, float]]:
        """The clips queued while the last batch ran (up to max_batch_size); if fewer, wait a little for more."""
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self._batch_wait_timeout_s
        while len(batch) < self._max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _batch_forever(self) -> None:
        # One batch at a time, formed only when the previous one is done: under load the next batch is the backlog
        # that built up meanwhile. (@serve.batch forms batches eagerly while one runs, so at CPU speeds they stay ~1.)
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item[1].cancelled()]  # the caller gave up (client went away)
            if not batch:
                continue
            model = self._watcher.current  # taken once: the whole batch is predicted, and reported, by one version
            started = time.monotonic()
            self._batching["batches"] += 1
            self._batching["clips"] += len(batch)
            self._batching["largest_batch"] = max(self._batching["largest_batch"], len(batch))
            self._batching["queue_wait_s"] += sum(started - queued for _, _, queued in batch)
            try:
                outcomes = await asyncio.to_thread(predict_clips, model, [clip for clip, _, _ in batch])
            except Exception as exc:  # predict_clips contains model errors; this is a last resort
                logger.exception("batch failed")
                outcomes = [{"error": f"prediction failed: {exc!r}"}] * len(batch)
            self._batching["busy_s"] += time.monotonic() - started
            for (_, future, _), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)

    async def predict(self, clip: DecodedClip) -> dict[str, Any]:
        """One clip's outcome (see :func:`opsvlm.serving.predict_clips`); batched with concurrent calls."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((clip, future, time.monotonic()))
        return await future

    async def predict_objects(self, image: Any, detections: list[Any]) -> dict[str, Any]:
        """Every detected object of one image (inspection models), in one forward pass: the objects of a request
        already form a batch (see :func:`opsvlm.serving.predict_objects`)."""
        return await asyncio.to_thread(predict_objects, self._watcher.current, image, detections)

    def status(self) -> dict[str, Any]:
        """Model name/version, sampling spec and labels of this replica."""
        status = self._watcher.status()
        status["model"]["poll_interval_s"] = self._poll_interval_s
        status["model"]["replica"] = serve.get_replica_context().replica_id.unique_id
        status["batching"] = dict(self._batching)
        return status

    def check_health(self) -> None:
        if self._batcher.done():
            raise RuntimeError("the batching task stopped")
        if self._poller is not None and self._poller.done():
            raise RuntimeError("the model watcher task stopped; this replica would never pick up new versions")

    def __del__(self) -> None:
        # Serve calls this on replica shutdown: stop polling before the event loop's executor goes away.
        for task in (getattr(self, "_poller", None), getattr(self, "_batcher", None)):
            if task is not None:
                task.cancel()


@serve.deployment(name=DECODER, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class DecoderDeployment:
    """Decodes and samples clips on CPU replicas (``separate_decoder: true``)."""

    def __init__(self, args: dict[str, Any]):
        self._limits = AppArgs.model_validate(args).limits()

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


class ServeBackend:
    """:class:`opsvlm.serving.Backend` over the Decoder and Predictor deployments."""

    def __init__(self, predictor: DeploymentHandle, decoder: DeploymentHandle | None, limits: ServingLimits):
        self._predictor = predictor
        self._decoder = decoder
        self._limits = limits
        self._spec: SamplingSpec | None = None

    async def sampling_spec(self) -> SamplingSpec:
        if self._spec is None:
            status = await self._predictor.status.remote()
            self._spec = SamplingSpec(**status["sampling_spec"])
        return self._spec

    def remember_spec(self, spec: SamplingSpec) -> None:
        self._spec = spec

    async def decode(self, media: Media, windows: list[Window], spec: SamplingSpec) -> list[DecodedClip | ServingError]:
        if self._decoder is None:
            return await asyncio.to_thread(decode_media, media, windows, spec, self._limits)
        try:
            if media.uploaded:
                data = await asyncio.to_thread(Path(media.path).read_bytes)
                return await self._decoder.decode_upload.remote(data, media.name, list(windows), spec)
            return await self._decoder.decode_path.remote(media, list(windows), spec)
        except Exception as exc:  # the decoder replica died or is unreachable: the server itself is fine
            logger.exception("decoder call failed")
            error = ServingError(503, "decoder_unavailable", f"{media.name}: decoder unavailable: {exc!r}")
            return [error] * len(windows)

    async def predict(self, clips: list[DecodedClip]) -> list[dict[str, Any]]:
        # One call per clip: the Predictor batches them with clips of concurrent requests.
        responses = [self._predictor.predict.remote(clip) for clip in clips]
        outcomes = []
        for response in responses:
            try:
                outcomes.append(await response)
            except Exception as exc:
                logger.exception("predictor call failed")
                outcomes.append({"error": f"predictor unavailable: {exc!r}"})
        return outcomes

    async def predict_objects(self, image: Any, detections: list[Any]) -> dict[str, Any]:
        try:
            return await self._predictor.predict_objects.remote(image, list(detections))
        except Exception as exc:
            logger.exception("predictor call failed")
            return {"error": f"predictor unavailable: {exc!r}", "status": 503, "code": "model_unavailable"}

    async def status(self) -> dict[str, Any]:
        return await self._predictor.status.remote()


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


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress()
class Ingress:
    """FastAPI ingress: the API of :func:`opsvlm.serving.create_app` over :class:`ServeBackend`."""

    def __init__(self, predictor: DeploymentHandle, decoder: DeploymentHandle | None, args: dict[str, Any]):
        settings = AppArgs.model_validate(args)
        self._limits = settings.limits()
        self._separate_decoder = decoder is not None
        self._backend = ServeBackend(predictor, decoder, self._limits)

    async def _serve_status(self) -> dict[str, Any]:
        try:
            replicas = await asyncio.to_thread(_replica_counts)
        except Exception as exc:  # status must answer even if the controller is slow
            replicas = {"error": repr(exc)}
        return {"replicas": replicas, "separate_decoder": self._separate_decoder}

    def __serve_build_asgi_app__(self):
        # Built per replica after __init__ (Serve's late-bound ingress): the routes close over this replica's backend.
        return create_app(self._backend, self._limits, title="opsvlm (Ray Serve)", extra_status=self._serve_status)


_PREDICTOR_ARGS = frozenset(
    {
        "model",
        "tracking_uri",
        "model_cache_dir",
        "quantization",
        "poll_interval_s",
        "max_batch_size",
        "batch_wait_timeout_s",
    }
)
_LIMIT_ARGS = frozenset({"allowed_root", "max_upload_bytes", "max_duration_s", "decode_deadline_s", "max_batch_clips"})


def _gpu_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: serve_app.app:build_app``).

    Args:
        args: :class:`AppArgs` fields (the application's ``args`` in a Serve config).

    Returns:
        The bound application: Ingress -> (Decoder) -> Predictor.

    Raises:
        pydantic.ValidationError: unknown or invalid args (named).
        ValueError: limits that cannot work (e.g. ``allowed_root`` is not a directory).
    """
    settings = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    settings.limits()  # fail at deploy time, not in every replica
    plain = settings.model_dump()
    # An empty tracking URI means MLFLOW_TRACKING_URI or the local store in ./mlruns: resolve it here, in the process
    # `serve run` / `serve deploy` starts from the repository root, so replicas find the same store wherever they run.
    plain["tracking_uri"] = resolve_tracking_uri(settings.tracking_uri)
    # Each deployment gets only the args it uses: the Predictor's init args then do not change with the limits.
    model_args = {k: v for k, v in plain.items() if k in _PREDICTOR_ARGS}
    limit_args = {k: v for k, v in plain.items() if k in _LIMIT_ARGS}
    use_gpu = _gpu_available() if settings.use_gpu == "auto" else settings.use_gpu
    predictor = PredictorDeployment.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": 1 if use_gpu else 0})
    decoder = DecoderDeployment.bind(limit_args) if settings.separate_decoder else None
    return Ingress.bind(predictor.bind(model_args), decoder, limit_args)


app = build_app  # the builder under the name Serve examples use
