"""The served model: loaded from the registry (retried with backoff), followed along its alias, cached privately.

:class:`ModelWatcher` loads the version a registry reference points to and, for alias references
(``models:/opsvlm@champion``), polls the alias; when it moves, the new version is loaded off the request path and
swapped in with one reference assignment. Requests take the current :class:`LoadedModel` once per batch, so a batch
is predicted, and reported, by exactly one version.

Failures:

* Loading is retried with exponential backoff: at start (``load_attempts`` tries, then the replica fails to
  start), and for a new version that fails to load (tried again on later polls, the wait doubling up to
  ``max_retry_backoff_s``; the old model keeps serving meanwhile and ``/status`` says why).
* A replica whose registry is unreachable at start loads the version it last served from its cache, and says so
  in ``/status`` (``source: "cache"``, ``registry_reachable: false``); the next successful poll catches up.

The cache (:class:`ModelCache`) is a private directory (mode 0700, owned by this user, never a shared ``/tmp``
folder), keyed by the tracking server and the run id, so two servers' "version 3" never share a folder. Only
safetensors weights are loaded: a checkpoint with pickle files (``*.bin``, ``*.pt``, ...) where weights are read is
refused.

torch/transformers are imported only where a model is loaded: ingress and decoder processes stay light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "PICKLE_SUFFIXES",
    "LoadedModel",
    "ModelCache",
    "ModelSource",
    "ModelWatcher",
    "check_safetensors_only",
    "default_cache_root",
    "load_predictor",
    "polling",
    "private_directory",
]

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


@dataclass(frozen=True)
class ModelSource:
    """Which model a server serves and how it gets it.

    Attributes:
        ref: Registry reference (``models:/opsvlm@champion``, followed), ``models:/<name>/<version>``, a run id or a
            checkpoint directory.
        tracking_uri: MLflow tracking/registry URI; empty: ``MLFLOW_TRACKING_URI`` or the local store.
        cache_dir: Where checkpoints are downloaded (a private 0700 folder, keyed by tracking server and run);
            empty: ``$XDG_CACHE_HOME/opsvlm/models`` (default ``~/.cache/opsvlm/models``).
        quantization: Override how the base is loaded (``none`` / ``int8`` / ``nf4``); default: as trained.
        poll_interval_s: How often an alias reference is checked for a new version (0: never).
        load_attempts: Tries to load the model at start before the replica gives up.
        retry_backoff_s: Wait after the first failed load; doubles after each further failure.
        max_retry_backoff_s: Longest wait between tries of a version that fails to load.
    """

    ref: str = "models:/opsvlm@champion"
    tracking_uri: str = ""
    cache_dir: str = ""
    quantization: Literal["none", "int8", "nf4"] | None = None
    poll_interval_s: float = 10.0
    load_attempts: int = 3
    retry_backoff_s: float = 2.0
    max_retry_backoff_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.ref:
            raise ValueError("ref must name a model")
        if self.poll_interval_s < 0 or self.retry_backoff_s < 0 or self.max_retry_backoff_s < 0:
            raise ValueError("poll_interval_s, retry_backoff_s and max_retry_backoff_s must be >= 0")
        if self.load_attempts < 1:
            raise ValueError(f"load_attempts must be >= 1, got {self.load_attempts}")


# --- the cache -------------------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/opsvlm/models`` (default ``~/.cache/opsvlm/models``): this user's, never a shared folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opsvlm" / "models"


def private_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory only this user can read, write or enter (created with mode 0700 if missing).

    Raises:
        ValueError: naming the path, if it is a symlink, not a directory, or owned by another user (a folder someone
            else made, e.g. in ``/tmp``, could hold planted checkpoints).
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"model cache {path} is not a plain directory (a symlink?); refusing to use it")
    if info.st_uid != os.getuid():
        raise ValueError(f"model cache {path} is owned by uid {info.st_uid}, not this user; refusing to use it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class ModelCache:
    """Downloaded checkpoints of one tracking server, by run, plus which version each reference last resolved to.

    Layout: ``<root>/server-<hash of the tracking URI>/run-<run id>/<name>-v<version>/`` (the registry's download
    folder), and ``refs/<hash of the reference>.json`` recording the last version loaded for a reference (what a
    replica starts from when the registry is unreachable).

    Args:
        root: The cache root (made private: :func:`private_directory`).
        tracking_uri: The (resolved) tracking server URI.
    """

    def __init__(self, root: str | os.PathLike[str], tracking_uri: str):
        self.root = private_directory(root)
        self.tracking_uri = tracking_uri
        self.server_dir = private_directory(self.root / f"server-{_digest(tracking_uri)}")
        marker = self.server_dir / "tracking_uri.txt"
        if not marker.exists():
            marker.write_text(tracking_uri + "\n")

    def run_dir(self, run_id: str | None) -> Path:
        """The folder the registry downloads a run's checkpoints into."""
        return self.server_dir / f"run-{_SAFE_NAME.sub('_', run_id or 'unknown')}"

    def _ref_file(self, ref: str) -> Path:
        return self.server_dir / "refs" / f"{_digest(ref)}.json"

    def remember(self, ref: str, info: dict[str, Any], directory: Path) -> None:
        """Record that ``ref`` resolved to ``info`` (name, version, run) at ``directory`` (atomic write)."""
        record = {
            "ref": ref,
            "name": info.get("name"),
            "version": info.get("version"),
            "alias": info.get("alias"),
            "run_id": info.get("run_id"),
            "directory": str(Path(directory).resolve().relative_to(self.server_dir.resolve())),
            "saved_at": time.time(),
        }
        target = self._ref_file(ref)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".ref-")
        with os.fdopen(handle, "w") as out:
            json.dump(record, out)
        os.replace(temporary, target)

    def recall(self, ref: str) -> tuple[dict[str, Any], Path] | None:
        """What ``ref`` last resolved to and its checkpoint folder, if both are still in the cache."""
        try:
            record = json.loads(self._ref_file(ref).read_text())
        except (OSError, ValueError):
            return None
        directory = (self.server_dir / str(record.get("directory", ""))).resolve()
        if not directory.is_relative_to(self.server_dir.resolve()) or not (directory / "model.json").is_file():
            return None
        return record, directory


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_safetensors_only(directory: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint whose weights are not safetensors (pickle files can run code when loaded).

    Raises:
        ValueError: naming the file, if ``adapter/adapter_model.safetensors`` is missing or a pickle-format file
            (``*.bin``, ``*.pt``, ...) sits in ``adapter/`` or ``processor/``.
    """
    from opsvlm.model import checkpoint as ckpt

    directory = Path(directory)
    weights = directory / ckpt.ADAPTER_DIR / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{ckpt.ADAPTER_DIR}/adapter_model.safetensors missing: only safetensors weights are loaded")
    for folder in (ckpt.ADAPTER_DIR, ckpt.PROCESSOR_DIR):
        for path in (directory / folder).rglob("*"):
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ValueError(
                    f"{folder}/{path.relative_to(directory / folder)}: a pickle-format file; only safetensors "
                    "checkpoints are served"
                )


def load_predictor(checkpoint_dir: str | os.PathLike[str], quantization: str | None = None) -> Any:
    """The default loader: :meth:`opsvlm.inference.Predictor.from_checkpoint` (imports torch/transformers)."""
    from opsvlm.inference import Predictor

    return Predictor.from_checkpoint(checkpoint_dir, quantization=quantization)


# --- the watcher -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """One loaded model version: what a batch is predicted with and reported as.

    Attributes:
        predictor: An :class:`opsvlm.inference.Predictor`.
        ref: The reference the server was configured with.
        version: Registry version number (as text), else the run id, else the checkpoint directory's name.
        name: Registered model name, if any.
        alias: Alias the reference follows, if any.
        run_id: Training run, if known.
        checkpoint_dir: Local checkpoint directory.
        base_model: Base model the adapter sits on.
        spec: Its sampling spec.
        labels: Its label set.
        loaded_at: Unix time the load finished.
        source: ``registry`` (resolved from the registry), ``cache`` (the registry was unreachable: the version this
            reference last resolved to) or ``directory`` (a checkpoint directory reference).
    """

    predictor: Any
    ref: str
    version: str
    name: str | None
    alias: str | None
    run_id: str | None
    checkpoint_dir: str
    base_model: str
    spec: SamplingSpec
    labels: tuple[str, ...]
    loaded_at: float
    source: str = "registry"

    def describe(self, show_paths: bool = False) -> dict[str, Any]:
        described = {
            "ref": self.ref if show_paths else _hide_path(self.ref),
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "base_model": self.base_model if show_paths else _hide_path(self.base_model),
            "loaded_at": self.loaded_at,
            "source": self.source,
        }
        if show_paths:
            described["checkpoint_dir"] = self.checkpoint_dir
        return described


def _hide_path(value: str) -> str:
    """A filesystem path reduced to its last component (``<dir>/name``); anything else unchanged."""
    if value and os.path.isabs(value):
        return f".../{Path(value).name}"
    return value


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@+-]+/)*[\w.@+-]+")


def _scrub(text: str | None, known: list[str]) -> str | None:
    if text is None:
        return None
    for path in sorted(filter(None, known), key=len, reverse=True):
        text = text.replace(path, "<path>")
    return _ABSOLUTE_PATH.sub("<path>", text)


def _registry_unreachable(exc: BaseException) -> bool:
    """Whether a failed registry lookup means "cannot reach it" rather than "it answered: no such model"."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


@dataclass
class _Failure:
    attempts: int
    retry_at: float


class ModelWatcher:
    """Holds the current model of a reference and follows its alias (see the module docstring).

    ``current`` is replaced by a single assignment after the new model has fully loaded, so readers see either
    the old or the new model, never a half-loaded one. Loading happens in the caller's thread: call :meth:`poll`
    off the request path (a background task or thread).

    Args:
        ref: ``models:/<name>@<alias>`` (watched), ``models:/<name>/<version>``, a run id or a checkpoint directory.
        tracking_uri: MLflow tracking/registry URI (default: ``MLFLOW_TRACKING_URI`` or the local store).
        cache_dir: The private cache root (default :func:`default_cache_root`).
        quantization: Override how the base is loaded (``none`` on a CPU for an nf4-trained adapter).
        loader: ``(checkpoint_dir, quantization) -> predictor`` (default :func:`load_predictor`).
        load_attempts: Tries at start before giving up.
        retry_backoff_s: First wait between tries; doubles each time.
        max_retry_backoff_s: Longest wait.
        sleep: ``time.sleep`` (injectable for tests).
        clock: ``time.monotonic`` (injectable for tests).

    Raises:
        opsvlm.registry.ModelRefError, ValueError: if no model can be loaded after ``load_attempts`` tries (and none
            is cached for an unreachable registry): the replica must not start.
    """

    def __init__(
        self,
        ref: str,
        *,
        tracking_uri: str = "",
        cache_dir: str | os.PathLike[str] | None = None,
        quantization: str | None = None,
        loader: Callable[[Any, str | None], Any] = load_predictor,
        load_attempts: int = 3,
        retry_backoff_s: float = 2.0,
        max_retry_backoff_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ref = ref
        self.quantization = quantization
        self.load_attempts = load_attempts
        self.retry_backoff_s = retry_backoff_s
        self.max_retry_backoff_s = max_retry_backoff_s
        self._loader = loader
        self._sleep = sleep
        self._clock = clock
        self._poll_lock = threading.Lock()
        self._failures: dict[str, _Failure] = {}
        self.last_error: str | None = None
        self.last_poll_at: float | None = None
        self.registry_reachable: bool | None = None
        self.is_directory = Path(ref).is_dir()
        if self.is_directory:
            self.tracking_uri, self.cache = tracking_uri, None
        else:
            from opsvlm.tracking import resolve_tracking_uri

            self.tracking_uri = resolve_tracking_uri(tracking_uri)
            self.cache = ModelCache(cache_dir or default_cache_root(), self.tracking_uri)
        self.current: LoadedModel = self._start()

    @classmethod
    def from_source(cls, source: ModelSource, **kwargs: Any) -> ModelWatcher:
        """A watcher configured by a :class:`ModelSource` (keyword arguments: ``loader``, ``sleep``, ``clock``)."""
        return cls(
            source.ref,
            tracking_uri=source.tracking_uri,
            cache_dir=source.cache_dir or None,
            quantization=source.quantization,
            load_attempts=source.load_attempts,
            retry_backoff_s=source.retry_backoff_s,
            max_retry_backoff_s=source.max_retry_backoff_s,
            **kwargs,
        )

    @property
    def watches(self) -> bool:
        """Whether the reference can move (an alias); versions, runs and directories are fixed."""
        return self.ref.startswith("models:/") and "@" in self.ref

    def _backoff(self, attempts: int) -> float:
        return min(self.max_retry_backoff_s, self.retry_backoff_s * 2 ** max(attempts - 1, 0))

    def _describe(self) -> dict[str, Any]:
        from opsvlm import registry

        return registry.describe_model(self.ref, self.tracking_uri or None)

    @staticmethod
    def _version_of(info: dict[str, Any]) -> str:
        if info.get("version") is not None:
            return str(info["version"])
        if info.get("run_id"):
            return str(info["run_id"])
        return Path(str(info.get("path") or info["ref"])).name

    def _start(self) -> LoadedModel:
        attempt = 0
        while True:
            attempt += 1
            try:
                info = self._describe()
            except Exception as exc:
                self.registry_reachable = False
                cached = self._from_cache(exc)
                if cached is not None:
                    return cached
                error: Exception = exc
            else:
                self.registry_reachable = True
                try:
                    return self._load(info)
                except Exception as exc:
                    error = exc
            if attempt >= self.load_attempts:
                raise error
            delay = self._backoff(attempt)
            logger.warning(
                "model watcher: loading %s failed (try %d of %d), retrying in %.1f s: %s",
                self.ref,
                attempt,
                self.load_attempts,
                delay,
                error,
            )
            self._sleep(delay)

    def _from_cache(self, exc: Exception) -> LoadedModel | None:
        """The cached version of the reference when the registry cannot be reached; ``None`` otherwise."""
        if self.cache is None or not _registry_unreachable(exc):
            return None
        recalled = self.cache.recall(self.ref)
        if recalled is None:
            return None
        record, directory = recalled
        loaded = self._load_directory(record, directory, source="cache")
        self.last_error = (
            f"the registry was unreachable at start ({exc}); serving cached version {loaded.version} until it answers"
        )
        logger.warning("model watcher: %s", self.last_error)
        return loaded

    def _load(self, info: dict[str, Any]) -> LoadedModel:
        from opsvlm import registry

        if self.is_directory:
            directory = registry.resolve_model(self.ref)
            return self._load_directory(info, directory, source="directory")
        # Pin the version just described: resolving the alias again could land on a newer version than reported.
        pinned = f"models:/{info['name']}/{info['version']}" if info.get("version") is not None else self.ref
        directory = registry.resolve_model(pinned, self.tracking_uri or None, self.cache.run_dir(info.get("run_id")))
        loaded = self._load_directory(info, directory, source="registry")
        self.cache.remember(self.ref, info, directory)
        return loaded

    def _load_directory(self, info: dict[str, Any], directory: Path, source: str) -> LoadedModel:
        from opsvlm.model import checkpoint as ckpt

        check_safetensors_only(directory)
        meta = ckpt.read_model_meta(directory)
        predictor = self._loader(directory, self.quantization)
        return LoadedModel(
            predictor=predictor,
            ref=self.ref,
            version=self._version_of({**info, "path": str(directory)}),
            name=info.get("name"),
            alias=info.get("alias"),
            run_id=info.get("run_id"),
            checkpoint_dir=str(directory),
            base_model=str(meta["base_model"]),
            spec=ckpt.sampling_spec_of(directory),
            labels=tuple(meta["labels"]),
            loaded_at=time.time(),
            source=source,
        )

    def poll(self) -> bool:
        """Check the reference once and swap in the version it now points to. Blocking (loads the model).

        Polls alias references, and any reference the replica started from its cache (to reconnect). A version
        that fails to load is tried again on a later poll once its backoff has passed.

        Returns:
            Whether a new version was swapped in. Failures (registry unreachable, a broken version) are logged and
            kept in ``last_error``; the current model stays.
        """
        if not self.watches and self.current.source != "cache":
            return False
        with self._poll_lock:  # one load at a time, even if a caller polls from two threads
            self.last_poll_at = time.time()
            try:
                info = self._describe()
            except Exception as exc:  # registry down or alias deleted: keep serving what we have
                self.registry_reachable = False
                self.last_error = f"cannot resolve {self.ref}: {exc}; still serving version {self.current.version}"
                logger.warning("model watcher: %s", self.last_error)
                return False
            self.registry_reachable = True
            version = self._version_of(info)
            if version == self.current.version:
                if self.current.source == "cache":  # the registry confirms what the cache held
                    self.current = dataclasses.replace(self.current, source="registry")
                    self.cache.remember(self.ref, info, Path(self.current.checkpoint_dir))
                self.last_error = None
                return False
            failure = self._failures.get(version)
            if failure is not None and self._clock() < failure.retry_at:
                return False
            logger.info("model watcher: %s moved v%s -> v%s, loading", self.ref, self.current.version, version)
            try:
                loaded = self._load(info)
            except Exception as exc:
                attempts = failure.attempts + 1 if failure is not None else 1
                delay = self._backoff(attempts)
                self._failures[version] = _Failure(attempts, self._clock() + delay)
                self.last_error = (
                    f"version {version} failed to load (try {attempts}, next in {delay:.0f} s), still serving "
                    f"{self.current.version}: {exc}"
                )
                logger.exception("model watcher: %s", self.last_error)
                return False
            self.current = loaded  # the swap: one reference assignment
            self._failures.pop(version, None)
            self.last_error = None
            logger.info("model watcher: now serving %s version %s", self.ref, version)
            return True

    def status(self, show_paths: bool = False) -> dict[str, Any]:
        """The model's part of ``/status``: no filesystem paths unless ``show_paths``."""
        model = self.current
        known = [
            model.checkpoint_dir,
            str(self.cache.root) if self.cache else None,
            self.ref if self.is_directory else None,
        ]
        described = {
            **model.describe(show_paths),
            "watching": self.watches,
            "registry_reachable": self.registry_reachable,
            "last_poll_at": self.last_poll_at,
            "last_error": self.last_error if show_paths else _scrub(self.last_error, known),
        }
        if show_paths and self.cache is not None:
            described["cache_dir"] = str(self.cache.server_dir)
        return {
            "model": described,
            "task": model.predictor.task.name,
            "sampling_spec": asdict(model.spec),
            "labels": list(model.labels),
        }


@contextlib.contextmanager
def polling(watcher: ModelWatcher, interval_s: float) -> Iterator[threading.Thread | None]:
    """Poll ``watcher`` every ``interval_s`` in a daemon thread while the context is open (in-process servers)."""
    if (not watcher.watches and watcher.current.source != "cache") or interval_s <= 0:
        yield None
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            watcher.poll()

    thread = threading.Thread(target=loop, name="opsvlm-model-watcher", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=interval_s + 60)
