"""The stage-1 detector as a Ray Serve deployment: what the Serve app (``serve_app.app``) binds beside the VLM when
``detector.ref`` is configured.

The detector batches differently from the VLM (whole images through one small CNN, many per call), so it runs in its
own deployment with its own ``@serve.batch`` (``max_batch_size`` / ``batch_wait_timeout_s`` per replica). A replica
resolves its detector reference once (``models:/opsvlm-detector@champion``, ``models:/<name>/<version>``,
``runs:/...`` or a file, :func:`.registry.resolve_detector`; an alias is pinned to the version it points to at that
moment, so :meth:`DetectorServer.status` names exactly what is loaded) and loads it with the class mapping checked. A
detector that cannot be loaded (missing version, a class without an object type) does not crash the replica: every
call raises :class:`DetectorUnavailable` with the reason, and :meth:`DetectorServer.status` reports it, so the app
answers 503 with that message instead of a 500.

How ``/predict_objects`` uses it (``serve_app.app``; the hook of :func:`opsvlm.serving.objects.make_endpoint`)::

    detections, info = await detector_handle.stage_one.remote(image)   # image: uint8[H, W, 3] RGB
    #   DetectorError (a bad image array)  -> 422 invalid_image
    #   DetectorUnavailable                -> 503 detector_unavailable, with the reason
    #   []                                 -> 200 {"objects": [], ...}: nothing found is an answer, not an error
    # else every detection (StageOneDetection: index, object type, normalised box, score) goes to the VLM

Ray Serve re-raises an exception of a replica in the caller as a subclass of its own type (``RayTaskError``, the
original in ``.cause``) when it is picklable, as these are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from opsvlm.detection.registry import read_meta, registered_version, resolve_detector, run_id_of
from opsvlm.tasks.inspection.data.yolo import StageOneDetection
from opsvlm.tasks.inspection.detect.detector import (
    ClassMapping,
    Detection,
    DetectorConfig,
    DetectorError,
    check_image,
)
from opsvlm.tasks.inspection.detect.load import load_detector
from opsvlm.tracking import resolve_tracking_uri

__all__ = ["DetectorServer", "DetectorUnavailable", "check_class_map", "detector_deployment", "pin_reference"]


def check_class_map(mapping: Mapping[str, str], field: str) -> None:
    """Refuse a detector class -> object type mapping whose values are not object types (names ``field``).

    Raises:
        DetectorError: naming the field and the bad entry.
    """
    if mapping:
        ClassMapping(dict(mapping), field)


class DetectorUnavailable(RuntimeError):
    """The replica has no usable detector (the message says why: bad reference, unmapped class, ...)."""


def pin_reference(ref: str, tracking_uri: str = "") -> tuple[str, dict[str, Any]]:
    """A registry reference pinned to one version, and what it names.

    ``models:/<name>@<alias>`` becomes ``models:/<name>/<version>`` (the version the alias points to now), so the
    weights loaded and the version reported are the same even if the alias moves meanwhile.

    Returns:
        ``(reference to resolve, {"name", "version", "alias", "run_id"})`` (``None`` where not known: a file).

    Raises:
        DetectorRefError: naming ``ref``, when the registry does not know it.
    """
    info: dict[str, Any] = {"name": None, "version": None, "alias": None, "run_id": None}
    if (run_id := run_id_of(ref)) is not None:
        return ref, {**info, "run_id": run_id}
    registered = registered_version(ref, resolve_tracking_uri(tracking_uri))
    if registered is None:
        return ref, info
    version, alias = registered
    pinned = f"models:/{version.name}/{version.version}"
    return pinned, {"name": version.name, "version": str(version.version), "alias": alias, "run_id": version.run_id}


class DetectorServer:
    """One replica's detector (deploy with :func:`detector_deployment`).

    Args:
        detector: A detector reference (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/...``, a
            ``.pt``/``.onnx`` file or a folder with ``weights.pt``).
        prefer: ``pt`` or ``onnx`` (the registered ONNX export, run with onnxruntime).
        conf: Score threshold (``None``: the one recorded with the detector, else 0.25).
        imgsz: Inference size (``None``: the one recorded with the detector, else its training size).
        class_map: Detector class -> object type (empty: the recorded one, else the default mapping).
        device: ``auto``, ``cpu``, ``cuda:0``...
        tracking_uri: MLflow URI for registry references.
        cache_dir: Where downloaded versions go.
        max_batch_size: Most images per forward pass.
        batch_wait_timeout_s: Longest wait for more images before a batch runs.
    """

    def __init__(
        self,
        detector: str,
        *,
        prefer: str = "pt",
        conf: float | None = None,
        imgsz: int | None = None,
        class_map: Mapping[str, str] | None = None,
        device: str = "auto",
        tracking_uri: str = "",
        cache_dir: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
    ):
        self.ref = detector
        self.detector = None
        self.error: str | None = None
        self.info: dict[str, Any] = {"ref": detector, "name": None, "version": None, "alias": None, "run_id": None}
        self._detect_batched.set_max_batch_size(max_batch_size)
        self._detect_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        try:
            pinned, registered = pin_reference(detector, tracking_uri)
            self.info.update(registered)
            weights = resolve_detector(pinned, prefer=prefer, tracking_uri=tracking_uri or None, cache_dir=cache_dir)
            meta = read_meta(weights)
            config = DetectorConfig(
                weights=str(weights),
                class_map=dict(class_map or meta.get("class_map") or {}),
                conf=conf if conf is not None else float(meta.get("conf", 0.25)),
                imgsz=imgsz if imgsz is not None else meta.get("imgsz"),
                device=device,
            )
            self.detector = load_detector(config)
            self.info.update(self.detector.describe())
        except Exception as exc:  # a bad reference, an unmapped class, a registry that cannot be reached, ...
            self.error = f"detector {detector!r} cannot be used: {exc}"

    def _ready(self):
        if self.detector is None:
            raise DetectorUnavailable(self.error or f"detector {self.ref!r} is not loaded")
        return self.detector

    async def detect(self, image: np.ndarray) -> list[Detection]:
        """Detections of one uint8[H, W, 3] RGB image, highest score first (calls are batched across requests).

        Raises:
            DetectorError: not a uint8[H, W, 3] array (only this request fails).
            DetectorUnavailable: the replica has no usable detector (the reason is in the message).
        """
        result = await self._detect_batched(image)
        if isinstance(result, Exception):
            raise result
        return result

    async def stage_one(self, image: np.ndarray) -> tuple[list[StageOneDetection], dict[str, Any]]:
        """The detections of one image as stage 2 takes them (``index`` = rank by score), and the detector version.

        Raises:
            DetectorError: not a uint8[H, W, 3] array.
            DetectorUnavailable: the replica has no usable detector.
        """
        detections = await self.detect(image)
        version = {k: self.info.get(k) for k in ("name", "version", "alias", "run_id")}
        return [d.to_stage_one(i) for i, d in enumerate(detections)], version

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _detect_batched(self, images: list[np.ndarray]) -> list[list[Detection] | Exception]:
        detector = self._ready()
        out: list[list[Detection] | Exception] = []
        good = []
        for i, image in enumerate(images):
            try:
                check_image(image)
                good.append(i)
                out.append([])
            except DetectorError as exc:
                out.append(exc)
        if good:
            for i, dets in zip(good, detector.detect_batch([images[i] for i in good]), strict=True):
                out[i] = dets
        return out

    async def status(self) -> dict[str, Any]:
        """``{"ready": bool, "error": str | None, ...what is loaded}``."""
        return {"ready": self.detector is not None, "error": self.error, **self.info}


def detector_deployment(
    *, num_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, max_ongoing_requests: int = 16
):
    """The Serve deployment of :class:`DetectorServer` with these resources; bind it with the replica's arguments::

    app_detector = detector_deployment(num_cpus=1).bind("models:/opsvlm-detector@champion", device="cpu")
    """
    return serve.deployment(
        DetectorServer,
        name="InspectionDetector",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
    )
