"""Detector versions in the MLflow model registry, and resolving a detector reference to a local weights file.

A detector version is the ``detector`` artifact folder of a training run: ``weights.pt`` (Ultralytics checkpoint),
optionally ``weights.onnx`` (its ONNX export) and ``detector.json`` (class names, their object types, the image
size). Detectors are registered under their own model name (default ``opsvlm-detector``), never beside VLM adapters,
with the same aliases as the VLM (:mod:`opsvlm.registry`): ``challenger`` = the latest version, ``champion`` = the
one serving loads. The gate is the VLM's rule applied to the detector's headline metric (``metric.map50_95`` on the
same evaluation split): promote when there is no champion, when the score is strictly higher on the same split, or
when forced (recorded in ``promotion.*`` tags). :mod:`opsvlm.registry` is not used for this because it checks for a
VLM checkpoint (adapter, processor) and takes the headline metric from a task; when its gate is generalised, the
:func:`promote_detector` here should call it. MLflow is imported lazily.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from opsvlm.tracking import resolve_tracking_uri

__all__ = [
    "ARTIFACT",
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_DETECTOR_NAME",
    "HEADLINE",
    "META_FILE",
    "VAL_BOXES",
    "WEIGHTS_ONNX",
    "WEIGHTS_PT",
    "DetectorRefError",
    "boxes_record",
    "promote_detector",
    "read_meta",
    "register_detector",
    "registered_version",
    "resolve_detector",
    "run_id_of",
]

DEFAULT_DETECTOR_NAME = "opsvlm-detector"
ARTIFACT = "detector"
WEIGHTS_PT = "weights.pt"
WEIGHTS_ONNX = "weights.onnx"
META_FILE = "detector.json"
HEADLINE = "map50_95"
CHAMPION = "champion"
CHALLENGER = "challenger"

_RUNS_REF = re.compile(r"runs:/(?P<run_id>[^/]+)(?:/(?P<path>.+?))?/?")
_MODELS_REF = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


class DetectorRefError(ValueError):
    """A detector reference that cannot be resolved (the message names it)."""


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_id_of(ref: str) -> str | None:
    """The run id of a ``runs:/<run_id>[/<path>]`` reference; ``None`` for any other reference."""
    runs = _RUNS_REF.fullmatch(ref)
    return runs["run_id"] if runs else None


def registered_version(ref: str, uri: str) -> tuple[Any, str | None] | None:
    """The registry's model version a ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` reference names.

    Returns:
        ``(MLflow ModelVersion, alias or None)``; ``None`` when ``ref`` is not a ``models:/`` reference.

    Raises:
        DetectorRefError: naming ``ref``, when the registry at ``uri`` does not know it.
    """
    models = _MODELS_REF.fullmatch(ref)
    if models is None:
        return None
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        if models["alias"]:
            version = client.get_model_version_by_alias(models["name"], models["alias"])
        else:
            version = client.get_model_version(models["name"], models["version"])
    except MlflowException as exc:
        raise DetectorRefError(f"{ref!r}: not found in the model registry at {uri} ({exc.message})") from None
    return version, models["alias"]


def register_detector(
    run_id: str,
    *,
    name: str = DEFAULT_DETECTOR_NAME,
    metrics: dict[str, float],
    eval_split: str,
    tracking_uri: str | None = None,
) -> Any:
    """Register a training run's ``detector`` artifacts as a new version of ``name`` and point ``challenger`` at it.

    Args:
        run_id: The training run (it logged ``detector/weights.pt`` and ``detector/detector.json``).
        name: Registered model name (created if missing).
        metrics: Evaluation metrics, tagged ``metric.<name>`` (``map50_95`` is what the gate compares).
        eval_split: Identifier of the image set the metrics were computed on.
        tracking_uri: MLflow tracking and registry URI (default: :func:`opsvlm.tracking.resolve_tracking_uri`).

    Returns:
        The new ``ModelVersion``.

    Raises:
        DetectorRefError: the run has no detector artifacts.
    """
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri or "")
    client = _client(uri)
    present = {Path(item.path).name for item in client.list_artifacts(run_id, ARTIFACT)}
    missing = {WEIGHTS_PT, META_FILE} - present
    if missing:
        raise DetectorRefError(f"runs:/{run_id}/{ARTIFACT} is not a detector: missing {sorted(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        meta = json.loads(Path(client.download_artifacts(run_id, f"{ARTIFACT}/{META_FILE}", tmp)).read_text())
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="opsvlm stage-1 detectors (Ultralytics YOLO, AGPL-3.0)")
    tags = {
        "kind": "detector",
        "names": json.dumps(meta.get("names", {})),
        "object_types": json.dumps(meta.get("object_types", {})),
        "imgsz": str(meta.get("imgsz", "")),
        "formats": ",".join(sorted(p.removeprefix("weights.") for p in present if p.startswith("weights."))),
        "eval_split": eval_split,
        **{f"metric.{key}": repr(float(value)) for key, value in metrics.items()},
    }
    version = client.create_model_version(name, source=f"runs:/{run_id}/{ARTIFACT}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def _score(version: Any, metric: str) -> float | None:
    value = version.tags.get(f"metric.{metric}")
    if value is None:
        return None
    score = float(value)
    return score if math.isfinite(score) else None


def _alias(client: Any, name: str, alias: str) -> Any | None:
    """The version an alias points to, ``None`` only when the alias does not exist (any registry error propagates:
    the promotion fails closed, as the VLM's does)."""
    aliases = client.get_registered_model(name).aliases or {}
    return client.get_model_version(name, str(aliases[alias])) if alias in aliases else None


VAL_BOXES = "detector_eval/val_boxes.json"  # a training run's validation boxes per image (the gate's evidence)


def boxes_record(image) -> dict:
    """One image's predicted and true boxes as JSON (an ``ImageBoxes``)."""
    return {
        "pred_boxes": image.pred_boxes.tolist(),
        "pred_scores": image.pred_scores.tolist(),
        "pred_types": list(image.pred_types),
        "true_boxes": image.true_boxes.tolist(),
        "true_types": list(image.true_types),
    }


def _paired_map(client: Any, challenger: Any, champion: Any, metric: str, n_boot: int):
    """Paired bootstrap over the validation images both versions were scored on: (challenger - champion) ``metric``."""
    from opsvlm.stats import paired_bootstrap
    from opsvlm.tasks.inspection.detect.matching import ImageBoxes, image_hits, map_from_hits

    def load(version) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(version.run_id, VAL_BOXES, tmp)).read_text())

    mine, theirs = load(challenger), load(champion)
    if mine["types"] != theirs["types"] or len(mine["images"]) != len(theirs["images"]):
        raise ValueError("the two versions' validation images or types differ")

    def hits(stored: dict) -> list:
        return [image_hits(ImageBoxes.of(**record), stored["types"]) for record in stored["images"]]

    def metric_of(pieces: list):
        return lambda idx: map_from_hits([pieces[i] for i in idx], mine["types"])[metric]

    a, b = hits(mine), hits(theirs)
    return paired_bootstrap(metric_of(a), metric_of(b), list(range(len(a))), n_boot=n_boot)


def promote_detector(
    name: str,
    version: int | str,
    *,
    force: bool = False,
    metric: str = HEADLINE,
    margin: float = 0.0,
    n_boot: int = 500,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to ``version`` through the VLM's gate: a paired bootstrap over the same validation images.

    Choose on validation: a version scored on any other split is never promoted (not even forced), nor one without a
    finite score; registry errors abort the promotion.

    Returns:
        ``{"promoted", "forced", "version", "previous_champion", "score", "champion_score", "reason"}``; the decision
        is also recorded on the version as ``promotion.*`` tags.
    """
    client = _client(resolve_tracking_uri(tracking_uri or ""))
    challenger = client.get_model_version(name, str(version))
    number, score, split = int(challenger.version), _score(challenger, metric), challenger.tags.get("eval_split", "")
    champion = _alias(client, name, CHAMPION)
    previous = int(champion.version) if champion is not None else None
    champion_score = _score(champion, metric) if champion is not None else None
    if previous == number:
        promoted, reason = False, f"v{number} is already the champion"
    elif score is None:
        promoted, reason = False, f"challenger v{number} has no finite metric.{metric}"
    elif not split.startswith("val:"):
        promoted, reason = False, f"challenger v{number} was scored on {split or '?'}: the gate chooses on validation"
    elif champion is None:
        promoted, reason = True, f"{metric} {score}, no champion yet (split {split or '?'})"
    elif champion.tags.get("eval_split", "") != split:
        promoted = False
        reason = f"challenger v{number} was scored on split {split} but champion v{previous} on another split"
    else:
        # the VLM's gate: a paired bootstrap over the same validation images must put the lower 95% bound of the
        # difference above the margin; a noisy tie keeps the champion
        try:
            comparison = _paired_map(client, challenger, champion, metric, n_boot)
        except (OSError, ValueError, KeyError) as exc:  # a version without stored boxes, or other images
            comparison, promoted = None, False
            reason = f"challenger v{number} and champion v{previous} cannot be compared on the same images: {exc}"
        if comparison is not None:
            diff = f"diff {comparison.difference:+.4f} [{comparison.low:+.4f}, {comparison.high:+.4f}]"
            promoted = comparison.better(margin)
            verdict = f"> {margin:g}" if promoted else f"does not clear {margin:g}"
            reason = f"{metric} {score:.4f} vs champion v{previous} {champion_score}: {diff} {verdict} (split {split})"
    forced = force and not promoted and previous != number and score is not None and split.startswith("val:")
    if forced:
        promoted, reason = True, f"forced over: {reason}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(number))
    for key, value in {
        "promotion.decision": "promoted" if promoted else "kept",
        "promotion.reason": reason,
        "promotion.forced": str(forced).lower(),
        "promotion.previous_champion": str(previous) if previous is not None else "none",
    }.items():
        client.set_model_version_tag(name, str(number), key, value)
    return {
        "promoted": promoted,
        "forced": forced,
        "version": number,
        "previous_champion": previous,
        "score": score,
        "champion_score": champion_score,
        "reason": reason,
    }


def resolve_detector(
    ref: str, *, prefer: str = "pt", tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The local weights file of a detector reference, downloaded if needed.

    Args:
        ref: A ``.pt`` / ``.onnx`` file; a folder holding ``weights.pt`` / ``weights.onnx``; ``runs:/<run_id>``
            (artifact folder ``detector``) or ``runs:/<run_id>/<folder>``; ``models:/<name>@<alias>`` or
            ``models:/<name>/<version>``.
        prefer: ``pt`` (Ultralytics checkpoint) or ``onnx`` (its export, when the version has one).
        tracking_uri: MLflow tracking and registry URI.
        cache_dir: Where downloads go (one folder per run artifact or version, reused); default a new temp folder.

    Raises:
        DetectorRefError: naming ``ref``, if it cannot be parsed, found or downloaded, or holds no weights.
    """
    if prefer not in ("pt", "onnx"):
        raise DetectorRefError(f"prefer must be 'pt' or 'onnx', got {prefer!r}")
    path = Path(ref)
    if path.is_file():
        if path.suffix.lower() not in (".pt", ".onnx"):
            raise DetectorRefError(f"{ref!r}: a detector file must be .pt or .onnx")
        return path
    if path.is_dir():
        return _weights_in(ref, path, prefer)
    uri = resolve_tracking_uri(tracking_uri or "")
    runs = _RUNS_REF.fullmatch(ref)
    if runs is not None:
        run_id, artifact = runs["run_id"], runs["path"] or ARTIFACT
        download_uri, key = f"runs:/{run_id}/{artifact}", f"run-{run_id}-{artifact.replace('/', '_')}"
    else:
        registered = registered_version(ref, uri)
        if registered is None:
            raise DetectorRefError(
                f"{ref!r} is not a .pt/.onnx file, a folder, runs:/<run_id>[/<path>], models:/<name>@<alias> or "
                "models:/<name>/<version>"
            )
        version, _ = registered
        download_uri = _client(uri).get_model_version_download_uri(version.name, version.version)
        key = f"{version.name}-v{version.version}"
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="opsvlm-detector-"))
    local = cache / key
    if not local.is_dir():
        import mlflow
        from mlflow.exceptions import MlflowException

        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
        try:
            got = mlflow.artifacts.download_artifacts(download_uri, dst_path=str(staging), tracking_uri=uri)
            shutil.move(got, local)
        except MlflowException as exc:
            raise DetectorRefError(f"{ref!r}: could not download {download_uri} from {uri}: {exc.message}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _weights_in(ref, local, prefer)


def _weights_in(ref: str, folder: Path, prefer: str) -> Path:
    order = [WEIGHTS_ONNX, WEIGHTS_PT] if prefer == "onnx" else [WEIGHTS_PT, WEIGHTS_ONNX]
    for name in order:
        if (folder / name).is_file():
            return folder / name
    raise DetectorRefError(f"{ref!r}: {folder} holds no {WEIGHTS_PT} or {WEIGHTS_ONNX}")


def read_meta(weights: str | Path) -> dict[str, Any]:
    """The ``detector.json`` next to a weights file (``{}`` when there is none)."""
    meta = Path(weights).parent / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}
