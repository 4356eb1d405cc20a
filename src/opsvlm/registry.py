"""The MLflow model registry for opsvlm: model references, registration, and champion/challenger promotion.

A model version is the ``checkpoint`` artifact folder of a training run (adapter, processor, ``model.json``, ...),
registered with ``MlflowClient.create_model_version`` on those plain artifacts (``log_model`` is not used: for
PyTorch, MLflow 3 goes through torch.export). Its tags carry what serving and comparisons need: base model,
quantization, sampling spec, label set, processor path, the evaluation split and every eval metric as
``metric.<name>``. Two aliases matter:

* ``challenger``: the most recently registered version;
* ``champion``: the version serving loads (``models:/opsvlm@champion``). It moves only through the promotion gate:
  both versions were evaluated on the same *validation* examples, and a paired bootstrap over those examples puts the
  lower 95% bound of (challenger - champion) on the task's headline metric above a margin (0 by default). A noisy
  tie keeps the champion. ``force`` may override only that comparison, never the rules below.

The gate fails closed. Any registry error other than "this alias does not exist" aborts the promotion; the
challenger's score must be finite and come from a selection (validation) split, never the test split; the task
must match the champion's, even when forced. Promotions of one model name are serialised by a host-wide lock, and
the decision and both intervals are recorded on the version as ``promotion.*`` tags.

Versions are never deleted. Imports mlflow lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsvlm.model import checkpoint as ckpt
from opsvlm.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "CHECKPOINT_ARTIFACT",
    "DEFAULT_NAME",
    "EVAL_SPLIT_TAG",
    "EXAMPLES_ARTIFACT",
    "METRIC_PREFIX",
    "SUMMARY_ARTIFACT",
    "TRAIN_RUN_TAG",
    "Decision",
    "EvalResult",
    "ModelRefError",
    "PromotionError",
    "describe_model",
    "promote",
    "read_eval",
    "register_version",
    "resolve_model",
    "score_metric",
]

DEFAULT_NAME = "opsvlm"
CHECKPOINT_ARTIFACT = "checkpoint"  # artifact path of the final checkpoint in a training run (train/loop.py: fit)
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_PREFIX = "metric."
EVAL_SPLIT_TAG = "opsvlm.eval_split"  # set on evaluation runs (evaluate/run.py)
SUMMARY_ARTIFACT = "eval_summary.json"  # an evaluation run's stored summary (evaluate/run.py)
EXAMPLES_ARTIFACT = "examples.json"  # ... and its per-example answers, which the promotion gate compares
TRAIN_RUN_TAG = "opsvlm.train_run_id"

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUNS_REF = re.compile(r"runs:/(?P<run_id>[^/]+)(?:/(?P<path>.+?))?/?")
_MODELS_REF = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


class ModelRefError(ValueError):
    """A model reference that cannot be resolved to an opsvlm checkpoint (the message names the reference)."""


class PromotionError(RuntimeError):
    """Promotion was refused or aborted; the champion is unchanged (the message says why)."""


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`promote`.

    Attributes:
        promoted: Whether ``champion`` now points to ``version``.
        forced: Whether it was promoted by ``force`` although the comparison alone would have kept the champion.
        version: The challenger version.
        previous_champion_version: The champion before the decision (``None`` if there was none).
        new_score: The challenger's headline score (``None`` if it has none).
        champion_score: The previous champion's headline score (``None`` if no champion or no score).
        reason: Why, with both numbers.
        difference_ci95: ``[low, high]`` of challenger - champion by paired bootstrap (``None`` if not compared).
        challenger_ci95: The challenger's own interval on the compared examples.
        champion_ci95: The champion's own interval on the same examples.
    """

    promoted: bool
    forced: bool
    version: int
    previous_champion_version: int | None
    new_score: float | None
    champion_score: float | None
    reason: str
    difference_ci95: list[float] | None = None
    challenger_ci95: list[float] | None = None
    champion_ci95: list[float] | None = None

    def __str__(self) -> str:
        if self.promoted:
            return f"PROMOTED v{self.version}{' (forced)' if self.forced else ''}: {self.reason}"
        return f"KEPT champion v{self.previous_champion_version}: {self.reason}"


@dataclass(frozen=True)
class EvalResult:
    """Evaluation metrics as promotion consumes them.

    Attributes:
        metrics: Metric name -> value (must include the task's headline metric, see :func:`score_metric`).
        eval_split: Identifier of the exact clip set scored (``<split>:<hash>``).
        eval_run_id: The evaluation run (``None`` if unknown).
        train_run_id: The training run that was evaluated (``None`` if unknown).
        task: The task the model was evaluated on.
        split_role: ``selection`` (validation) or ``report`` (test); only selection evaluations can promote.
    """

    metrics: dict[str, float]
    eval_split: str
    task: str
    split_role: str
    eval_run_id: str | None = None
    train_run_id: str | None = None


def score_metric(task: str) -> str:
    """The metric promotion compares for a task (its headline metric; higher is better)."""
    from opsvlm.tasks.base import get_task

    return get_task(task).headline_metric


# --- references ------------------------------------------------------------------------------------------------------


def resolve_model(ref: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint directory for a model reference, downloaded if needed.

    Args:
        ref: One of: a checkpoint directory (returned as is); ``runs:/<run_id>[/<path>]`` (default path
            ``checkpoint``) or a bare 32-hex run id; ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        tracking_uri: MLflow tracking (and registry) URI; default :func:`opsvlm.tracking.resolve_tracking_uri`.
        cache_dir: Where downloads go, one folder per run artifact or model version, reused when already there;
            default a new temporary directory (left for the caller, e.g. a serving replica, to keep).

    Returns:
        The checkpoint directory (holds ``model.json``, ``adapter/``, ``processor/``).

    Raises:
        ModelRefError: naming ``ref``, if it cannot be parsed, found or downloaded, or is not an opsvlm checkpoint.
    """
    if Path(ref).is_dir():
        _check_checkpoint(ref, Path(ref))
        return Path(ref)
    uri = resolve_tracking_uri(tracking_uri or "")
    target = _locate(ref, uri)
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="opsvlm-model-"))
    local = cache / target["cache_key"]
    if local.is_dir():
        try:
            ckpt.read_model_meta(local)
            return local
        except (FileNotFoundError, ValueError):
            shutil.rmtree(local)  # a stale or broken copy: fetch it again
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        downloaded = _download(ref, target["download_uri"], staging, uri)
        _check_checkpoint(ref, downloaded)
        try:
            os.rename(downloaded, local)
        except OSError:  # another process put it there first
            if not local.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def describe_model(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What a model reference points to, for status pages and run links.

    Args:
        ref: As for :func:`resolve_model`.
        tracking_uri: MLflow tracking URI; default :func:`opsvlm.tracking.resolve_tracking_uri`.

    Returns:
        ``{"ref": ...}`` plus, where they apply: ``path`` (a directory), ``run_id`` and ``artifact_path`` (run and
        registry refs), ``name``, ``version`` and ``alias`` (registry refs).

    Raises:
        ModelRefError: naming ``ref``, if it cannot be parsed or found.
    """
    if Path(ref).is_dir():
        return {"ref": ref, "path": str(Path(ref).resolve())}
    target = _locate(ref, resolve_tracking_uri(tracking_uri or ""))
    return {"ref": ref, **{k: v for k, v in target.items() if k not in ("cache_key", "download_uri")}}


def _locate(ref: str, uri: str) -> dict[str, Any]:
    """Parse ``ref`` and resolve registry refs to a version: run_id, artifact_path, download_uri, cache_key, ..."""
    if _RUN_ID.fullmatch(ref):
        ref_runs = f"runs:/{ref}/{CHECKPOINT_ARTIFACT}"
    elif ref.startswith("runs:/"):
        ref_runs = ref
    else:
        ref_runs = None
    if ref_runs is not None:
        match = _RUNS_REF.fullmatch(ref_runs)
        if match is None:
            raise ModelRefError(f"{ref!r}: expected runs:/<run_id>[/<artifact path>]")
        run_id, path = match["run_id"], match["path"] or CHECKPOINT_ARTIFACT
        _get_run(ref, run_id, uri)
        return {
            "run_id": run_id,
            "artifact_path": path,
            "download_uri": f"runs:/{run_id}/{path}",
            "cache_key": f"run-{run_id}-{path.replace('/', '_')}",
        }
    match = _MODELS_REF.fullmatch(ref)
    if match is None:
        raise ModelRefError(
            f"{ref!r} is not a checkpoint directory, a run id, runs:/<run_id>[/<path>], models:/<name>@<alias> or "
            "models:/<name>/<version>"
        )
    client = _client(uri)
    version = _get_version(client, match["name"], match["alias"], match["version"], ref)
    # Resolve here rather than download models:/ directly: mlflow resolves those through the global registry URI
    # and would ignore ``uri``.
    return {
        "name": version.name,
        "version": int(version.version),
        "alias": match["alias"],
        "run_id": version.run_id,
        "artifact_path": _artifact_path_of(version.source),
        "download_uri": client.get_model_version_download_uri(version.name, version.version),
        "cache_key": f"{version.name}-v{version.version}",
    }


def _download(ref: str, download_uri: str, dst: Path, uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(download_uri, dst_path=str(dst), tracking_uri=uri))
    except MlflowException as exc:
        raise ModelRefError(f"{ref!r}: could not download {download_uri} from {uri}: {exc.message}") from exc


def _check_checkpoint(ref: str, directory: Path) -> dict:
    try:
        return ckpt.read_model_meta(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelRefError(f"{ref!r} does not point to an opsvlm checkpoint: {exc}") from exc


def _artifact_path_of(source: str) -> str | None:
    match = _RUNS_REF.fullmatch(source)
    return match["path"] if match else None


# --- registration and promotion --------------------------------------------------------------------------------------


def register_version(
    run_id: str,
    *,
    name: str = DEFAULT_NAME,
    metrics: dict[str, float],
    eval_split: str,
    split_role: str,
    eval_run_id: str | None = None,
    intervals: dict[str, list[float]] | None = None,
    tracking_uri: str | None = None,
) -> ModelVersion:
    """Register a training run's checkpoint as a new version of ``name`` and point ``challenger`` at it.

    Args:
        run_id: The training run; its ``checkpoint`` artifacts become the version (``runs:/<run_id>/checkpoint``).
        name: Registered model name (created if missing).
        metrics: The evaluation metrics, tagged as ``metric.<name>``; the task's headline metric is what promotion
            compares.
        eval_split: Identifier of the clip set the metrics were computed on.
        split_role: ``selection`` or ``report`` (:data:`opsvlm.evaluate.run.SPLIT_ROLES`); recorded, and checked by
            :func:`promote`.
        eval_run_id: The evaluation run; its stored per-example answers are what the promotion gate compares.
        intervals: ``{metric: [low, high]}`` 95% intervals, tagged as ``ci95.<metric>``.
        tracking_uri: MLflow tracking (and registry) URI; default :func:`opsvlm.tracking.resolve_tracking_uri`.

    Returns:
        The new model version (its tags as registered).

    Raises:
        ModelRefError: if the run has no valid checkpoint artifacts.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri or "")
    client = _client(uri)
    source = f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}"
    _get_run(source, run_id, uri)
    if not ckpt.upload_complete(client, run_id):  # the marker is uploaded after the checkpoint's files
        raise ModelRefError(f"{source!r}: the run's final upload did not complete (no {ckpt.COMPLETE_MARKER})")
    present = {Path(item.path).name for item in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT)}
    missing = {ckpt.MODEL_FILE, ckpt.ADAPTER_DIR, ckpt.PROCESSOR_DIR} - present
    if missing:
        raise ModelRefError(f"{source!r} is not a complete opsvlm checkpoint: missing {sorted(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        model_json = mlflow.artifacts.download_artifacts(f"{source}/{ckpt.MODEL_FILE}", dst_path=tmp, tracking_uri=uri)
        meta = _check_checkpoint(source, Path(model_json).parent)

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="opsvlm LoRA adapters (checkpoint folders of training runs)")
    tags = {
        "base_model": meta["base_model"],
        "quantization": meta["quantization"],
        "compute_dtype": meta["compute_dtype"],
        "sampling_spec": json.dumps(meta["sampling_spec"], sort_keys=True),
        "labels": json.dumps(meta["labels"]),
        "task": meta["task"],
        "step": str(meta["step"]),
        "processor": f"{CHECKPOINT_ARTIFACT}/{ckpt.PROCESSOR_DIR}",
        "eval_split": eval_split,
        "split_role": split_role,
        **({"eval_run_id": eval_run_id} if eval_run_id else {}),
        **{f"{METRIC_PREFIX}{key}": repr(float(value)) for key, value in metrics.items()},
        **{f"ci95.{key}": json.dumps(value) for key, value in (intervals or {}).items()},
    }
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def promote(
    name: str,
    version: int | str,
    *,
    force: bool = False,
    margin: float = 0.0,
    n_boot: int = 1000,
    tracking_uri: str | None = None,
) -> Decision:
    """Move ``champion`` to ``version`` if the paired gate says it is really better (see the module docstring).

    Args:
        name: Registered model name.
        version: The challenger version.
        force: Promote although the comparison keeps the champion (recorded as ``promotion.forced=true``). It never
            overrides a refusal: wrong task, missing or non-finite score, a report (test) split, a registry error.
        margin: The lower bound of (challenger - champion) must exceed this.
        n_boot: Bootstrap replicates of the paired comparison.
        tracking_uri: MLflow tracking (and registry) URI; default :func:`opsvlm.tracking.resolve_tracking_uri`.

    Returns:
        The decision; ``str(decision)`` is a one-line summary with both numbers and the interval of the difference.

    Raises:
        PromotionError: the challenger cannot be promoted whatever the comparison (the champion is unchanged).
        MlflowException: a registry error (the promotion is aborted, the champion unchanged).
    """
    uri = resolve_tracking_uri(tracking_uri or "")
    with _promotion_lock(uri, name):
        decision = _decide(_client(uri), name, str(version), force, margin, n_boot, uri)
    return decision


def _decide(client: MlflowClient, name: str, version: str, force: bool, margin: float, n_boot: int, uri: str):
    challenger = _get_version(client, name, None, version, f"models:/{name}/{version}")
    number = int(challenger.version)
    task = challenger.tags.get("task")
    if not task:
        raise PromotionError(f"v{number} has no task tag: not an opsvlm model version")
    metric = score_metric(task)
    score = _score(challenger)
    if score is None:
        raise PromotionError(f"v{number} has no finite {METRIC_PREFIX}{metric}: refusing to promote it")
    if challenger.tags.get("split_role") != "selection":
        raise PromotionError(
            f"v{number} was scored on a {challenger.tags.get('split_role') or 'unknown'} split "
            f"({challenger.tags.get('eval_split') or '?'}): promotion chooses on the validation split only"
        )
    champion = _get_champion(client, name)  # fails closed on any registry error
    previous = int(champion.version) if champion is not None else None
    champion_score = _score(champion) if champion is not None else None
    if previous == number:
        return Decision(False, False, number, previous, score, champion_score, f"v{number} is already the champion")
    if champion is not None and champion.tags.get("task") != task:
        raise PromotionError(
            f"v{number} is a {task} model but champion v{previous} is a {champion.tags.get('task')} one: a model of "
            "one task never replaces the other's champion (not even with force)"
        )

    comparison = None
    split = challenger.tags.get("eval_split", "")
    if champion is None:
        promoted, reason = True, f"{metric} {score:.3f}, no champion yet (split {split})"
    elif champion.tags.get("eval_split", "") != split:
        promoted = False
        reason = (
            f"challenger v{number} was scored on {split} but champion v{previous} on "
            f"{champion.tags.get('eval_split') or '?'}: not comparable (evaluate both on the same validation split)"
        )
    elif champion_score is None or not champion.tags.get("eval_run_id") or not challenger.tags.get("eval_run_id"):
        promoted, reason = False, f"champion v{previous} or v{number} has no stored evaluation to compare"
    else:
        comparison = _paired_comparison(client, task, challenger, champion, n_boot, uri)
        new, old = _fmt_pair(comparison.a.value, comparison.b.value)
        diff = f"diff {comparison.difference:+.3f} [{comparison.low:+.3f}, {comparison.high:+.3f}]"
        if comparison.better(margin):
            promoted = True
            reason = f"{metric} {new} vs champion v{previous} {old}: {diff} > {margin:g} (n={comparison.n}, {split})"
        else:
            promoted = False
            reason = (
                f"challenger v{number} {new} vs {old}: {diff} does not clear {margin:g} (n={comparison.n}, "
                f"{comparison.groups} groups, {split})"
            )

    forced = force and not promoted
    if forced:
        promoted, reason = True, f"forced over: {reason}"
    tags = {
        "promotion.decision": "promoted" if promoted else "kept",
        "promotion.reason": reason,
        "promotion.forced": str(forced).lower(),
        "promotion.previous_champion": str(previous) if previous is not None else "none",
        "promotion.margin": repr(margin),
    }
    if comparison is not None:
        tags.update(
            {
                "promotion.difference_ci95": json.dumps([comparison.low, comparison.high]),
                "promotion.challenger_ci95": json.dumps(comparison.a.as_list()),
                "promotion.champion_ci95": json.dumps(comparison.b.as_list()),
                "promotion.n": str(comparison.n),
            }
        )
    for key, value in tags.items():  # recorded before the alias moves: a promoted version always says why
        client.set_model_version_tag(name, str(number), key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(number))
    return Decision(
        promoted,
        forced,
        number,
        previous,
        score,
        champion_score,
        reason,
        [comparison.low, comparison.high] if comparison else None,
        comparison.a.as_list() if comparison else None,
        comparison.b.as_list() if comparison else None,
    )


def _paired_comparison(client, task_name: str, challenger, champion, n_boot: int, uri: str):
    """Paired bootstrap of the headline metric over the examples both evaluations scored."""
    from opsvlm.stats import paired_bootstrap
    from opsvlm.tasks.base import get_task

    task = get_task(task_name)
    mine = _examples(challenger.tags["eval_run_id"], uri)
    theirs = _examples(champion.tags["eval_run_id"], uri)
    if mine["ids"] != theirs["ids"]:
        raise PromotionError(
            f"v{challenger.version} and v{champion.version} share the split id but not the examples: not comparable"
        )
    rows = mine["rows"]

    def metric_of(answers):
        return lambda idx: task.compute_metrics([rows[i] for i in idx], [answers[i] for i in idx])[task.headline_metric]

    return paired_bootstrap(metric_of(mine["answers"]), metric_of(theirs["answers"]), mine["groups"], n_boot=n_boot)


def _examples(eval_run_id: str, uri: str) -> dict:
    """The per-example answers an evaluation run stored (``examples.json``)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            f"runs:/{eval_run_id}/{EXAMPLES_ARTIFACT}", dst_path=tmp, tracking_uri=uri
        )
        return json.loads(Path(path).read_text())


@contextlib.contextmanager
def _promotion_lock(uri: str, name: str):
    """Serialise promotions of one model name on this host (read -> compare -> set is not atomic in MLflow)."""
    import fcntl
    import hashlib

    from opsvlm.testing.tiny import default_cache_dir

    directory = default_cache_dir() / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"{uri}\n{name}".encode()).hexdigest()[:16]
    with open(directory / f"promote-{key}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_eval(source: str, tracking_uri: str | None = None) -> EvalResult:
    """Evaluation metrics from an evaluation run id or its summary JSON file (``eval_summary.json``).

    Args:
        source: An ``eval_summary.json`` file (written by :func:`opsvlm.evaluate.run.evaluate`) or an evaluation run
            id (its stored summary is read).
        tracking_uri: MLflow tracking URI; default :func:`opsvlm.tracking.resolve_tracking_uri`.

    Raises:
        ValueError: if the source is neither, or lacks the split, its role, the task or the headline metric.
    """
    path = Path(source)
    if path.is_file():
        data = json.loads(path.read_text())
    elif _RUN_ID.fullmatch(source):
        import mlflow

        uri = resolve_tracking_uri(tracking_uri or "")
        _get_run(source, source, uri)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                f"runs:/{source}/{SUMMARY_ARTIFACT}", dst_path=tmp, tracking_uri=uri
            )
            data = json.loads(Path(local).read_text())
    else:
        raise ValueError(f"{source!r} is neither an eval summary JSON file nor an evaluation run id")
    missing = [key for key in ("metrics", "eval_split", "task", "role") if not data.get(key)]
    if missing:
        raise ValueError(f"{source}: the evaluation summary lacks {missing}")
    result = EvalResult(
        metrics={k: float(v) for k, v in data["metrics"].items()},
        eval_split=data["eval_split"],
        task=data["task"],
        split_role=data["role"],
        eval_run_id=data.get("eval_run_id") or None,
        train_run_id=data.get("train_run_id") or None,
    )
    metric = score_metric(result.task)
    if metric not in result.metrics:
        raise ValueError(f"{source}: no {metric} among the metrics {sorted(result.metrics)}")
    return result


# --- helpers ---------------------------------------------------------------------------------------------------------


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _get_run(ref: str, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id)
    except MlflowException as exc:
        raise ModelRefError(f"{ref!r}: no run {run_id} in {uri}") from exc


def _get_version(client: MlflowClient, name: str, alias: str | None, version: str | None, ref: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelRefError(f"{ref!r}: not found in the model registry ({exc.message})") from exc


def _get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The champion version, ``None`` only when the alias does not exist. Every other failure propagates (fail
    closed): reading the aliases from the registered model avoids telling "no alias" from an error by its message."""
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None
    return client.get_model_version(name, str(aliases[CHAMPION]))


def _score(version: ModelVersion) -> float | None:
    task = version.tags.get("task")
    if not task:
        return None
    value = version.tags.get(f"{METRIC_PREFIX}{score_metric(task)}")
    if value is None:
        return None
    try:
        score = float(value)
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Both scores with 3 decimals, or more when 3 would print different numbers alike."""
    digits = 3
    while digits < 8 and a != b and f"{a:.{digits}f}" == f"{b:.{digits}f}":
        digits += 1
    return f"{a:.{digits}f}", f"{b:.{digits}f}"
