"""The Ultralytics YOLO backend of stage 1: load (``.pt`` or ONNX), detect, train, export; imports it lazily.

Ultralytics is AGPL-3.0 licensed (https://github.com/ultralytics/ultralytics/blob/main/LICENSE); it is the optional
extra ``opsvlm[detect]``, never imported by the core package.

**Offline.** Ultralytics reaches for the network at run time: a DNS probe at import, analytics events, the Arial
fonts its plots and dataset checks download, ``yolo26n.pt`` for the AMP check on GPUs, pretrained weights named by a
model file, and pip auto-installs of missing requirements. :func:`configure_offline` turns all of that off before the
first ``import ultralytics``: ``YOLO_OFFLINE=1`` (no DNS probe; ``ONLINE`` is false, so no events and no
auto-update), ``YOLO_AUTOINSTALL=false`` (no pip), ``YOLO_CONFIG_DIR`` pointing at a private folder whose
``settings.json`` has ``sync`` and every integration (MLflow, Ray Tune, ClearML, Comet, DVC, W&B, TensorBoard)
off, and that folder holding ``Arial.ttf`` / ``Arial.Unicode.ttf`` (copies of matplotlib's bundled DejaVu Sans), which
is where ``check_font`` looks before downloading. Models are built from a YAML (``yolo11n.yaml``, bundled with
Ultralytics) with ``pretrained=False``, or loaded from a user checkpoint file; ``amp`` is off unless asked for (its
check downloads weights).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.tasks.inspection.detect.detector import ClassMapping, Detection, DetectorConfig, DetectorError, check_image

__all__ = [
    "DEFAULT_IMGSZ",
    "FONTS",
    "OFFLINE_SETTINGS",
    "UltralyticsDetector",
    "YoloTrainResult",
    "YoloTrainSettings",
    "build_model",
    "configure_offline",
    "default_config_dir",
    "export_onnx",
    "resolve_device",
    "train_yolo",
    "ultralytics_val",
]

#: Ultralytics settings forced by :func:`configure_offline`.
OFFLINE_SETTINGS: dict[str, Any] = {
    "sync": False,
    "hub": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
_CONFIGURED: list[Path] = []


def default_config_dir() -> Path:
    """``$OPSVLM_YOLO_DIR``, else ``<tmp>/opsvlm-ultralytics-<uid>``: where Ultralytics keeps settings and fonts."""
    configured = os.environ.get("OPSVLM_YOLO_DIR")
    if configured:
        return Path(configured)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"opsvlm-ultralytics-{uid}"


def configure_offline(config_dir: str | os.PathLike | None = None) -> Path:
    """Set Ultralytics up to never download or phone home (see the module docstring); idempotent.

    Call before anything imports ``ultralytics`` (every function of this module does). If Ultralytics was already
    imported by someone else, its settings are still updated, and the fonts put where it looks.

    Args:
        config_dir: Ultralytics' config folder (settings.json, fonts); default :func:`default_config_dir`.

    Returns:
        The config folder.
    """
    if _CONFIGURED and config_dir is None:
        return _CONFIGURED[0]
    folder = Path(config_dir) if config_dir is not None else default_config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    _restore_pil_open()
    fonts_dir = Path(USER_CONFIG_DIR)
    fonts_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for font in FONTS:
        if not (fonts_dir / font).is_file():
            shutil.copyfile(dejavu, fonts_dir / font)
    wanted = {k: v for k, v in OFFLINE_SETTINGS.items() if k in SETTINGS and SETTINGS[k] != v}
    runs = folder / "runs"
    for key, path in (("runs_dir", runs), ("weights_dir", folder / "weights"), ("datasets_dir", folder / "datasets")):
        if SETTINGS.get(key) != str(path):
            wanted[key] = str(path)
    if wanted:
        SETTINGS.update(wanted)
    if not _CONFIGURED:
        _CONFIGURED.append(folder)
    return folder


def _restore_pil_open() -> None:
    """Undo Ultralytics' process-wide replacement of ``PIL.Image.open`` (made when it is imported).

    Its wrapper tries to pip-install a HEIF plugin when Pillow cannot identify a file, so in any process that imported
    Ultralytics every undecodable upload to the Serve app became a ``ModuleNotFoundError`` (offline) instead of
    Pillow's ``UnidentifiedImageError``: a bad image turned into a server error. Pillow's own function is put back.
    """
    from PIL import Image
    from ultralytics.utils import patches

    if getattr(Image.open, "__module__", "") == patches.__name__:
        Image.open = patches._image_open


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _ultralytics_device(device: str) -> str:
    # Ultralytics spells CUDA devices as "0", "0,1"; "cuda:0" is accepted by torch but not by its device parser.
    return device.removeprefix("cuda:") if device.startswith("cuda:") else ("0" if device == "cuda" else device)


class UltralyticsDetector:
    """A YOLO detector loaded with Ultralytics: a ``.pt`` checkpoint (torch) or an ``.onnx`` export (onnxruntime).

    Implements :class:`opsvlm.tasks.inspection.detect.detector.Detector`.

    Args:
        config: Weights file, class mapping and inference settings.

    Raises:
        DetectorError: the file cannot be loaded as a detection model, or a class has no object type.
    """

    def __init__(self, config: DetectorConfig):
        configure_offline()
        from ultralytics import YOLO

        self.config = config
        self.device = resolve_device(config.device)
        path = Path(config.weights)
        try:
            self.model = YOLO(str(path), task="detect")
        except Exception as exc:  # Ultralytics raises many kinds for a file that is not a model
            raise DetectorError(f"detector.weights: {path} is not a loadable YOLO model: {exc}") from exc
        if getattr(self.model, "task", "detect") != "detect":
            raise DetectorError(f"detector.weights: {path} is a {self.model.task} model, not a detection model")
        self.is_onnx = path.suffix.lower() == ".onnx"
        names = self.model.names
        if self.is_onnx and not names:
            raise DetectorError(f"detector.weights: {path} carries no class names in its metadata")
        self.names: dict[int, str] = {int(k): str(v) for k, v in dict(names).items()}
        self.mapping: ClassMapping = config.mapping
        self.object_types: dict[int, str] = self.mapping.resolve(self.names, str(path))
        trained = self.model.overrides.get("imgsz") if not self.is_onnx else None
        self.imgsz: int = int(config.imgsz or _imgsz_of(trained) or DEFAULT_IMGSZ)
        if self.is_onnx:
            self.imgsz = _onnx_imgsz(path) or self.imgsz

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Objects in one uint8[H, W, 3] RGB image, highest score first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Objects in each image (one Ultralytics predict call: it batches the images).

        Raises:
            DetectorError: an input that is not a uint8[H, W, 3] array (naming its position).
        """
        if not images:
            return []
        # Ultralytics takes numpy images in OpenCV's BGR order.
        bgr = [np.ascontiguousarray(check_image(im, f"images[{i}]")[..., ::-1]) for i, im in enumerate(images)]
        # ONNX exports have a static batch of 1: one call per image there.
        chunks = [[im] for im in bgr] if self.is_onnx else [bgr]
        out: list[list[Detection]] = []
        for chunk in chunks:
            results = self.model.predict(
                chunk,
                imgsz=self.imgsz,
                conf=self.config.conf,
                iou=self.config.iou,
                max_det=self.config.max_det,
                device=_ultralytics_device(self.device),
                verbose=False,
            )
            out.extend(self._detections(result) for result in results)
        return out

    def _detections(self, result: Any) -> list[Detection]:
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return []
        xyxyn = boxes.xyxyn.cpu().numpy().astype(np.float64).clip(0.0, 1.0)
        scores = boxes.conf.cpu().numpy().astype(np.float64)
        classes = boxes.cls.cpu().numpy().astype(int)
        detections = []
        for box, score, cls in zip(xyxyn, scores, classes, strict=True):
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # a box squashed to a line by clipping at the border holds no object
            name = self.names.get(int(cls), str(cls))
            if int(cls) not in self.object_types:  # cannot happen after resolve(); kept as a clear error, not a drop
                self.mapping.object_type(name)
            detections.append(Detection(tuple(float(v) for v in box), self.object_types[int(cls)], float(score), name))
        detections.sort(key=lambda d: -d.score)
        return detections

    def describe(self) -> dict[str, Any]:
        """What is loaded, for status pages."""
        return {
            "weights": self.config.weights,
            "format": "onnx" if self.is_onnx else "pt",
            "names": self.names,
            "object_types": self.object_types,
            "imgsz": self.imgsz,
            "device": self.device,
        }


DEFAULT_IMGSZ = 640  # Ultralytics' default, for a checkpoint that does not record its training size


def _imgsz_of(value: Any) -> int | None:
    if isinstance(value, list | tuple) and value:
        value = max(value)
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _onnx_imgsz(path: Path) -> int | None:
    """The square input size an ONNX export was made for (from its Ultralytics metadata), if recorded."""
    import ast

    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "imgsz" not in meta:
        return None
    size = ast.literal_eval(meta["imgsz"])
    return int(size[0]) if isinstance(size, list | tuple) else int(size)


# --- training and export -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YoloTrainSettings:
    """Ultralytics training settings (the few that matter here; ``extra`` passes anything else to ``model.train``).

    Attributes:
        model: A model YAML (bundled names such as ``yolo11n.yaml`` or a path): the network is built from scratch.
        weights: A checkpoint (``.pt``) to start from instead; it must exist (no download).
        epochs: Training epochs.
        imgsz: Training and validation size in pixels (multiple of 32).
        batch: Images per batch.
        workers: Data-loader worker processes (0: in the training process).
        device: ``auto``, ``cpu``, ``cuda:0``...
        seed: Random seed (Ultralytics' ``deterministic`` mode is on).
        patience: Stop after this many epochs without improvement of the validation fitness.
        amp: Mixed precision on GPU. Off by default: Ultralytics' AMP check downloads ``yolo26n.pt``.
        extra: More ``model.train`` keyword arguments (e.g. ``{"lr0": 0.01, "mosaic": 0.5}``).
    """

    model: str = "yolo11n.yaml"
    weights: str = ""
    epochs: int = 30
    imgsz: int = 224
    batch: int = 16
    workers: int = 0
    device: str = "auto"
    seed: int = 0
    patience: int = 100
    amp: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise DetectorError(f"epochs must be >= 1, got {self.epochs}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise DetectorError(f"imgsz must be a multiple of 32 (the YOLO stride), got {self.imgsz}")
        if self.batch < 1:
            raise DetectorError(f"batch must be >= 1, got {self.batch}")
        if self.weights and not self.weights.endswith(".pt"):
            raise DetectorError(f"weights: {self.weights} must be an Ultralytics .pt checkpoint")
        if not self.weights and not self.model.endswith((".yaml", ".yml")):
            raise DetectorError(f"model: {self.model!r} must be a model YAML (nothing can be downloaded)")


@dataclass(frozen=True)
class YoloTrainResult:
    """Files of a training run.

    Attributes:
        save_dir: Ultralytics' run folder (``results.csv``, plots, ``weights/``).
        best: The best checkpoint (by validation fitness).
        last: The last checkpoint.
        started_from: The YAML or checkpoint the run started from.
        names: The trained detector's class names by id.
    """

    save_dir: str
    best: str
    last: str
    started_from: str
    names: dict[int, str]


def build_model(settings: YoloTrainSettings):
    """The Ultralytics model a run starts from: the user's checkpoint, else a fresh network from the YAML.

    Raises:
        DetectorError: a checkpoint that does not exist, or a YAML Ultralytics does not know.
    """
    configure_offline()
    from ultralytics import YOLO

    if settings.weights:
        path = Path(settings.weights)
        if not path.is_file():
            raise DetectorError(f"weights: {path} does not exist (nothing is downloaded; give a local checkpoint)")
        return YOLO(str(path), task="detect"), str(path)
    try:
        return YOLO(settings.model, task="detect"), settings.model
    except FileNotFoundError as exc:
        raise DetectorError(f"model: {settings.model!r} is not a model YAML Ultralytics knows: {exc}") from exc


def train_yolo(
    data_yaml: str | os.PathLike, out_dir: str | os.PathLike, settings: YoloTrainSettings
) -> YoloTrainResult:
    """Train a YOLO detector on a detection dataset (:func:`.dataset.write_detection_dataset`).

    Args:
        data_yaml: The dataset's data.yaml.
        out_dir: Parent of the Ultralytics run folder (``out_dir/train``, replaced).
        settings: Model, epochs, size, ...

    Returns:
        Where the checkpoints and plots are.
    """
    model, started_from = build_model(settings)
    out = Path(out_dir).resolve()
    if (out / "train").exists():
        shutil.rmtree(out / "train")
    args = {
        "data": str(data_yaml),
        "epochs": settings.epochs,
        "imgsz": settings.imgsz,
        "batch": settings.batch,
        "workers": settings.workers,
        "device": _ultralytics_device(resolve_device(settings.device)),
        "seed": settings.seed,
        "deterministic": True,
        "patience": settings.patience,
        "amp": settings.amp,
        "pretrained": bool(settings.weights),
        "project": str(out),
        "name": "train",
        "exist_ok": True,
        "plots": True,
        "verbose": False,
        **settings.extra,
    }
    model.train(**args)
    trainer = model.trainer
    save_dir = Path(trainer.save_dir)
    best, last = save_dir / "weights" / "best.pt", save_dir / "weights" / "last.pt"
    if not best.is_file():
        best = last
    names = {int(k): str(v) for k, v in dict(model.names).items()}
    return YoloTrainResult(str(save_dir), str(best), str(last), started_from, names)


def ultralytics_val(weights: str, data_yaml: str, split: str, imgsz: int, device: str, out_dir: str) -> dict[str, Any]:
    """Ultralytics' own validation of a checkpoint on one split (its plots: PR curve, confusion matrix, ...).

    Returns:
        ``{"save_dir": folder with the plots, "map50": ..., "map50_95": ..., "precision": ..., "recall": ...}``.
    """
    configure_offline()
    from ultralytics import YOLO

    model = YOLO(weights, task="detect")
    metrics = model.val(
        data=data_yaml,
        split=split,
        imgsz=imgsz,
        device=_ultralytics_device(resolve_device(device)),
        project=str(Path(out_dir).resolve()),
        name=f"val_{split}",
        exist_ok=True,
        plots=True,
        verbose=False,
        batch=8,
        workers=0,
    )
    box = metrics.box
    return {
        "save_dir": str(metrics.save_dir),
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
    }


def export_onnx(weights: str, imgsz: int, out_dir: str | os.PathLike | None = None) -> str:
    """Export a ``.pt`` checkpoint to ONNX (static 1x3ximgszximgsz input, no simplifier downloads); returns the path.

    Needs ``onnx`` (part of the ``detect`` extra); runs on CPU.
    """
    configure_offline()
    from ultralytics import YOLO

    model = YOLO(weights, task="detect")
    exported = Path(model.export(format="onnx", imgsz=imgsz, device="cpu", simplify=False, dynamic=False))
    if out_dir is not None:
        target = Path(out_dir) / exported.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(exported), target)
        exported = target
    return str(exported)
