"""The stage-1 detector as a Ray Serve deployment, for the serving app to bind next to the VLM deployment.

The detector batches differently from the VLM (whole images through one small CNN, many per call), so it runs in its
own deployment with its own ``@serve.batch``. A replica resolves its detector reference once
(``models:/opsvlm-detector@champion``, ``runs:/...`` or a file, :func:`.registry.resolve_detector`) and loads it with
the class mapping checked. A detector that cannot be loaded (missing version, a class without an object type) does
not crash the replica: every call raises :class:`DetectorUnavailable` with the reason, and :meth:`status` reports it,
so the app can answer 503 with that message instead of a 500.

How ``/predict_objects`` uses it (when a detector is configured and the request has no detections)::

    from opsvlm.tasks.inspection_detect.detector import DetectorError
    from opsvlm.tasks.inspection_detect_ray.serve import DetectorUnavailable

    try:
        detections = await detector_handle.detect.remote(image)        # image: uint8[H, W, 3] RGB
    except DetectorError as exc:  # a bad image array (the app has decoded it, so rare)
        -> 422 invalid_image, str(exc)
    except DetectorUnavailable as exc:
        -> 503 detector_unavailable, str(exc)
    if not detections:
        -> 200 {"objects": [], "detector": ..., "model_version": ...}   (nothing found is an answer, not an error)
    stage_one = [d.to_stage_one(i) for i, d in enumerate(detections)]
    outcome = predict_objects(model, image, stage_one)                # the existing stage-2 path, unchanged
    # each object: its box, type (label), detection score and condition (outcome["objects"])

Ray Serve wraps exceptions raised in a replica (``RayTaskError``); the original is ``exc.cause`` / re-raised as its
own type by ``DeploymentHandle`` calls in Ray 2.60 when it is picklable, as these are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from opsvlm.tasks.inspection_detect.detector import (
    Detection,
    DetectorConfig,
    DetectorError,
    check_image,
)
from opsvlm.tasks.inspection_detect.load import load_detector
from opsvlm.tasks.inspection_detect_ray.registry import read_meta, resolve_detector


class DetectorUnavailable(RuntimeError):
    """The replica has no usable detector (the message says why: bad reference, unmapped class, ...)."""


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
    ):
        self.ref = detector
        self.detector = None
        self.error: str | None = None
        self.info: dict[str, Any] = {"ref": detector}
        try:
            weights = resolve_detector(detector, prefer=prefer, tracking_uri=tracking_uri or None, cache_dir=cache_dir)
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
