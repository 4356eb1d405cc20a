"""Loading a detector from its config: the one place that picks a backend (imported here, not by the interface)."""

from __future__ import annotations

from pathlib import Path

from opsvlm.tasks.inspection.detect.detector import Detector, DetectorConfig, DetectorError

__all__ = ["load_detector"]


def load_detector(config: DetectorConfig) -> Detector:
    """Load the detector a config names (the backend is imported here, not at module import).

    Raises:
        DetectorError: no weights, a missing file, an unsupported suffix, or a class without an object type.
        ImportError: the backend is not installed (``pip install 'opsvlm[detect]'``).
    """
    if not config.weights:
        raise DetectorError("detector.weights: no detector checkpoint given (a .pt or .onnx file)")
    path = Path(config.weights)
    if not path.is_file():
        raise DetectorError(f"detector.weights: {path} does not exist")
    if path.suffix.lower() not in (".pt", ".onnx"):
        raise DetectorError(f"detector.weights: {path} must be an Ultralytics .pt checkpoint or an .onnx export")
    from opsvlm.tasks.inspection.detect.ultralytics_backend import UltralyticsDetector  # the optional extra

    return UltralyticsDetector(config)
