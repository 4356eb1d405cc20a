"""Quantization study: one fine-tuned model (base + LoRA adapter) scored unquantized, LLM.int8 and NF4 on the same
examples; accuracy retention, agreement, model size and latency in one table, logged to MLflow. No Ray here.

Every mode loads the checkpoint with ``Predictor.from_checkpoint(directory, quantization=mode)`` (the adapter stays
fp32 on top of the quantized base) and predicts the same examples in the same batches, so the modes differ only in
how the base weights are stored. Per mode:

* the task's metrics (``task.compute_metrics``), the **retention** of the headline metric and of the accuracy-like
  metrics (``metric(mode) / metric(none)``; undefined, i.e. NaN, when the unquantized value is 0) and the
  **agreement** with the unquantized predictions (share of identical answers);
* **latency** per example: per-batch wall time / batch size, median and p90 over the batches of one full pass, after
  ``warmup_batches`` untimed calls on the first batch (first-call costs: allocator, kernel selection, the int8
  weight-state move); with the device and the torch thread count it was measured with;
* **sizes**, right after loading: ``loaded_bytes`` (every parameter, buffer and bitsandbytes quantization-state
  tensor as loaded, each storage once; bitsandbytes' CPU backend later repacks nf4 for its kernel, un-nesting the
  double-quantized absmax, which adds about one byte per 64 weights while it runs), ``memory_footprint_bytes``
  (transformers' ``get_memory_footprint`` of the base, which leaves out the quantization state), ``saved_bytes`` (the
  tensors ``state_dict`` would write, i.e. what ``save_pretrained`` stores, tied weights once) and
  ``quantized_part_bytes``: the Linear layers that int8/nf4 quantize (the language model's projections), weights +
  biases + quantization state. Only that last figure compares like with like across modes: the rest of the model
  (embeddings, vision tower, lm_head, adapter) is identical in all three, and on a small
  model it dominates the totals.

A mode that cannot run on the device (:func:`opsvlm.model.quant.unavailable_reason`: bitsandbytes missing, or its
backend lacks the kernels there), or that runs out of GPU memory while loading, is skipped with the reason recorded
in the table, the returned study and the MLflow run (tag ``opsvlm.quant.<mode>.skipped``); nothing is dropped
silently.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.model import quant
from opsvlm.train.config import TrackingSettings

__all__ = [
    "DEFAULT_RETENTION_METRICS",
    "SIZE_KEYS",
    "TABLE_COLUMNS",
    "QuantStudyConfig",
    "add_comparisons",
    "examples_id",
    "format_table",
    "model_sizes",
    "quantizable_linears",
    "quantization_study",
    "read_examples",
    "run_mode",
    "table_rows",
]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "oca", "aa_at_1", "tiou_at_0_5", "mean_tiou")
SIZE_KEYS: tuple[str, ...] = ("loaded_bytes", "memory_footprint_bytes", "saved_bytes", "quantized_part_bytes")
TABLE_COLUMNS: tuple[str, ...] = (
    "mode",
    "status",
    "headline",
    "retention",
    "agreement",
    "latency_median_ms",
    "latency_p90_ms",
    "loaded_mb",
    "saved_mb",
    "quantized_part_mb",
)


@dataclass(frozen=True)
class QuantStudyConfig:
    """Configuration of ``jobs/quant_study.py``.

    Attributes:
        model: Training run id, ``runs:/...``, ``models:/name@alias`` / ``models:/name/version``, or a checkpoint dir.
        data: Prepared folder; its rows (``<data>/<rows_dir>/split=<split>/*.parquet``, ``rows_dir`` from its
            manifest, default ``clips``) are the examples, and its sampling spec must equal the model's.
        split: Split to score.
        modes: Quantization modes, among ``none``, ``int8``, ``nf4``; ``none`` is required (the reference for
            retention and agreement) and always runs first.
        max_examples: Score at most this many examples, spread evenly over the split (sorted by id); ``None`` = all.
        batch_size: Examples per ``predict`` call (the same batches in every mode).
        warmup_batches: Untimed ``predict`` calls on the first batch before the timed pass, per mode.
        retention_metrics: Metrics besides the task's headline metric to compute retention for (those the task
            reports; others are ignored).
        tracking: MLflow settings.
        cache_dir: Where a registry model is downloaded; empty = a temporary folder.
    """

    model: str = ""
    data: str = ""
    split: str = "test"
    modes: tuple[str, ...] = ("none", "int8", "nf4")
    max_examples: int | None = 64
    batch_size: int = 4
    warmup_batches: int = 1
    retention_metrics: tuple[str, ...] = DEFAULT_RETENTION_METRICS
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.modes, tuple) or not self.modes:
            raise ValueError(
                f"modes must be a non-empty list of {list(quant.QUANTIZATION_CHOICES)}, got {self.modes!r}"
            )
        unknown = [m for m in self.modes if m not in quant.QUANTIZATION_CHOICES]
        if unknown:
            raise ValueError(f"modes: unknown {unknown}; choose from {list(quant.QUANTIZATION_CHOICES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes: duplicates in {list(self.modes)}")
        if "none" not in self.modes:
            raise ValueError("modes must include 'none': it is the reference for retention and agreement")
        if self.max_examples is not None and (isinstance(self.max_examples, bool) or self.max_examples < 1):
            raise ValueError(f"max_examples must be >= 1 or null, got {self.max_examples!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if isinstance(self.warmup_batches, bool) or not isinstance(self.warmup_batches, int) or self.warmup_batches < 0:
            raise ValueError(f"warmup_batches must be an int >= 0, got {self.warmup_batches!r}")

    @property
    def ordered_modes(self) -> tuple[str, ...]:
        """``none`` first (the reference), then the others as given."""
        return ("none", *(m for m in self.modes if m != "none"))


# --- examples --------------------------------------------------------------------------------------------------------


def read_examples(prepared: str | Path, split: str, task: Any, max_examples: int | None) -> list[dict]:
    """The prepared rows of ``split`` to score, read with pyarrow, sorted by the task's id column.

    With ``max_examples`` below the split size, rows at evenly spaced positions of the sorted ids are taken (every
    session/image source stays represented, unlike the first N). Only the chosen rows are read in full.

    Args:
        prepared: Prepared folder (``manifest.json`` + ``<rows_dir>/split=<split>/*.parquet``).
        split: Split name.
        task: The model's task (its ``id_field``).
        max_examples: Row limit or ``None``.

    Returns:
        [n] row dicts (pixel columns included).

    Raises:
        FileNotFoundError: No manifest, or no Parquet file for the split (naming the folder).
        ValueError: The rows lack the task's id column.
    """
    import pyarrow.parquet as pq

    manifest_path = Path(prepared) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{prepared}: no manifest.json; prepare the data first")
    rows_dir = json.loads(manifest_path.read_text()).get("rows_dir", "clips")
    folder = Path(prepared) / rows_dir / f"split={split}"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet files for split {split!r}")
    id_field = task.id_field
    if id_field not in pq.read_schema(files[0]).names:
        raise ValueError(f"{files[0]}: no {id_field!r} column (task {task.name!r} identifies rows by it)")
    ids = sorted(pq.ParquetDataset(files).read(columns=[id_field]).column(id_field).to_pylist())
    if len(set(ids)) != len(ids):
        raise ValueError(f"{folder}: {id_field} values are not unique")
    if max_examples is not None and max_examples < len(ids):
        positions = np.linspace(0, len(ids) - 1, max_examples).round().astype(int)
        ids = [ids[i] for i in positions]
    table = pq.ParquetDataset(files, filters=[(id_field, "in", ids)]).read()
    rows = sorted(table.to_pylist(), key=lambda r: r[id_field])
    if len(rows) != len(ids):
        raise ValueError(f"{folder}: asked for {len(ids)} rows by {id_field}, read {len(rows)}")
    return rows


def examples_id(split: str, ids: Sequence[str]) -> str:
    """Identifier of the exact example set scored: ``<split>:<sha1 of the sorted ids, 12 hex>``."""
    digest = hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:12]
    return f"{split}:{digest}"


# --- sizes -----------------------------------------------------------------------------------------------------------


def _storage_key(tensor: Any) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def _unique_bytes(tensors) -> int:
    """Bytes of distinct storages (a tied or aliased tensor counts once; a view counts its whole storage)."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key = _storage_key(tensor)
        seen[key] = key[1]
    return sum(seen.values())


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.")


def quantizable_linears(model: Any) -> dict[str, Any]:
    """The Linear modules that int8/nf4 quantize in ``model`` (or did): outside :data:`quant.SKIP_MODULES`, not
    LoRA branches. Keys are transformers paths (peft's ``base_model.model.`` prefix and ``.base_layer`` removed).

    Args:
        model: A transformers model or a ``peft.PeftModel`` over one, in any quantization mode.
    """
    import torch

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        path = _strip_peft(name).removesuffix(".base_layer")
        if any(path == s or path.startswith(s + ".") for s in quant.SKIP_MODULES):
            continue
        if hasattr(module, "base_layer"):  # a peft LoRA wrapper: its base_layer is listed on its own
            continue
        found[path] = module
    return found


def model_sizes(model: Any) -> dict[str, int]:
    """Size figures of a loaded (possibly quantized, possibly peft-wrapped) model; see the module docstring.

    Returns:
        ``loaded_bytes``, ``memory_footprint_bytes`` (0 when the model has no ``get_memory_footprint``),
        ``saved_bytes``, ``quantized_part_bytes``, ``quantized_linears`` (bitsandbytes layers) and
        ``quantizable_linears``.
    """
    # state_dict() first: on CPU it puts repacked nf4 weights back in their saved layout (see run_mode), and the
    # figures below must all describe one layout. Tensors are kept in lists while counted: a storage freed mid-count
    # could hand its address to the next one and be deduplicated away.
    saved_tensors = [t for t in model.state_dict(keep_vars=False).values() if hasattr(t, "untyped_storage")]
    saved = _unique_bytes(saved_tensors)
    state = [t for m in model.modules() for t in quant.quant_state_tensors(m)]
    loaded = _unique_bytes([*model.parameters(), *model.buffers(), *state])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    footprint = int(base.get_memory_footprint()) if hasattr(base, "get_memory_footprint") else 0
    linears = quantizable_linears(model)
    part = _unique_bytes(
        [
            t
            for module in linears.values()
            for t in [*module.parameters(recurse=False), *quant.quant_state_tensors(module)]
        ]
    )
    return {
        "loaded_bytes": loaded,
        "memory_footprint_bytes": footprint,
        "saved_bytes": saved,
        "quantized_part_bytes": part,
        "quantized_linears": len(quant.quantized_module_names(model)),
        "quantizable_linears": len(linears),
    }


# --- one mode --------------------------------------------------------------------------------------------------------


def _answer_key(answer: Any) -> Any:
    """What makes two answers identical: the generated answer text under constrained decoding (it fixes every slot);
    ``None`` for an unparsed answer."""
    if answer is None:
        return None
    text = getattr(answer, "text", None)
    return text.strip() if isinstance(text, str) and text else repr(answer)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def run_mode(
    checkpoint_dir: str | Path,
    mode: str,
    rows: Sequence[Mapping[str, Any]],
    task: Any,
    batch_size: int,
    warmup_batches: int,
) -> dict[str, Any]:
    """Load the checkpoint in ``mode``, measure its size, predict ``rows`` in batches and time it.

    Args:
        checkpoint_dir: opsvlm checkpoint directory.
        mode: ``none``, ``int8`` or ``nf4``.
        rows: [n] prepared rows.
        task: The model's task.
        batch_size: Examples per ``predict`` call.
        warmup_batches: Untimed calls on the first batch first.

    Returns:
        ``{"mode", "status": "ok", "answers": [n], "metrics": {...}, "batch_ms_per_example": [...], sizes...,
        "latency_median_ms", "latency_p90_ms", "examples_per_s", "load_s", "device", "threads",
        "peak_gpu_bytes"}``.
    """
    import torch

    from opsvlm.inference import Predictor

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(checkpoint_dir, quantization=mode)
    load_s = time.perf_counter() - start
    try:
        # The layout check ran on the base at load time; this one also covers the peft-wrapped model we time.
        if mode != "none" and not quant.quantized_module_names(predictor.model):
            raise RuntimeError(f"{mode}: the loaded model has no bitsandbytes layer")
        # Sizes first, in the layout the checkpoint loads in. The CPU backend of bitsandbytes repacks nf4 weights on
        # the first forward (the double-quantized absmax becomes one plain array) and state_dict() packs them back,
        # so measuring after the pass would mix layouts and, through state_dict, re-trigger the repack in the timing.
        sizes = model_sizes(predictor.model)
        inputs = [task.input_of(r) for r in rows]
        batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        for _ in range(warmup_batches):
            predictor.predict(batches[0])
        answers: list[Any] = []
        per_example_ms: list[float] = []
        total = 0.0
        for batch in batches:
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            answers.extend(predictor.predict(batch))
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - tick
            total += elapsed
            per_example_ms.append(1000.0 * elapsed / len(batch))
        device = str(predictor.device)
    finally:
        del predictor
        gc.collect()
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "mode": mode,
        "status": "ok",
        "skipped_reason": "",
        "answers": answers,
        "metrics": task.compute_metrics(rows, answers),
        "batch_ms_per_example": per_example_ms,
        "latency_median_ms": _percentile(per_example_ms, 50),
        "latency_p90_ms": _percentile(per_example_ms, 90),
        "examples_per_s": len(rows) / total if total > 0 else math.nan,
        "load_s": load_s,
        "device": device,
        "threads": torch.get_num_threads(),
        "peak_gpu_bytes": int(peak),
        **sizes,
    }


def _skipped(mode: str, reason: str) -> dict[str, Any]:
    logger.warning("quantization study: skipping %s: %s", mode, reason)
    return {"mode": mode, "status": "skipped", "skipped_reason": reason, "answers": None, "metrics": {}}


def _ratio(value: float | None, reference: float | None) -> float:
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference):
        return math.nan
    return value / reference if reference != 0 else math.nan


def add_comparisons(results: list[dict[str, Any]], headline: str, retention_metrics: Sequence[str]) -> None:
    """Add ``retention`` (headline), ``retention/<metric>`` and ``agreement`` to every ran mode, against ``none``.

    Args:
        results: Per-mode results (``none`` among them); changed in place.
        headline: The task's headline metric.
        retention_metrics: Further metrics to compute retention for, where the task reports them.
    """
    reference = next((r for r in results if r["mode"] == "none" and r["status"] == "ok"), None)
    for result in results:
        if result["status"] != "ok":
            continue
        metrics = result["metrics"]
        result["headline"] = metrics.get(headline, math.nan)
        reference_metrics = reference["metrics"] if reference else {}
        result["retention"] = _ratio(metrics.get(headline), reference_metrics.get(headline))
        result["retention_by_metric"] = {
            name: _ratio(metrics.get(name), reference_metrics.get(name))
            for name in dict.fromkeys([headline, *retention_metrics])
            if name in metrics
        }
        if reference is None:
            result["agreement"] = math.nan
        else:
            same = [
                _answer_key(a) == _answer_key(b) for a, b in zip(result["answers"], reference["answers"], strict=True)
            ]
            result["agreement"] = sum(same) / len(same)


# --- the table -------------------------------------------------------------------------------------------------------


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per mode (JSON-friendly: NaN where a figure does not apply, e.g. for a skipped mode)."""
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        row = {
            "mode": r["mode"],
            "status": r["status"],
            "skipped_reason": r.get("skipped_reason", ""),
            "headline": r.get("headline", math.nan),
            "retention": r.get("retention", math.nan),
            "agreement": r.get("agreement", math.nan),
            "latency_median_ms": r.get("latency_median_ms", math.nan),
            "latency_p90_ms": r.get("latency_p90_ms", math.nan),
            "examples_per_s": r.get("examples_per_s", math.nan),
            "load_s": r.get("load_s", math.nan),
            "device": r.get("device", ""),
            "threads": r.get("threads", 0),
            "peak_gpu_bytes": r.get("peak_gpu_bytes", 0),
            **{k: r.get(k, 0) for k in (*SIZE_KEYS, "quantized_linears", "quantizable_linears")},
            "loaded_mb": r.get("loaded_bytes", 0) / 2**20 if ok else math.nan,
            "saved_mb": r.get("saved_bytes", 0) / 2**20 if ok else math.nan,
            "quantized_part_mb": r.get("quantized_part_bytes", 0) / 2**20 if ok else math.nan,
        }
        for name, value in r.get("retention_by_metric", {}).items():
            row[f"retention/{name}"] = value
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], headline: str = "headline") -> str:
    """A fixed-width text table, one line per mode; skipped modes show their reason."""
    names = {"headline": headline, "latency_median_ms": "ms/ex p50", "latency_p90_ms": "ms/ex p90"}
    header = f"{'mode':<6}{'status':>9}" + "".join(f"{names.get(c, c):>19}" for c in TABLE_COLUMNS[2:])
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['mode']:<6}{row['status']:>9}  reason: {row['skipped_reason']}")
            continue
        lines.append(f"{row['mode']:<6}{row['status']:>9}" + "".join(f"{row[c]:>19.4f}" for c in TABLE_COLUMNS[2:]))
    return "\n".join(lines)


# --- the study -------------------------------------------------------------------------------------------------------


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def quantization_study(config: QuantStudyConfig) -> dict[str, Any]:
    """Run the study (see the module docstring) and log it as one MLflow run.

    Args:
        config: The study settings.

    Returns:
        ``{"run_id", "train_run_id", "model_dir", "task", "headline_metric", "examples", "examples_id",
        "table": [one row per mode, see :func:`table_rows`], "metrics": {mode: task metrics}, "skipped":
        {mode: reason}}``.

    Raises:
        ValueError: The data's sampling spec differs from the model's, or ``none`` could not run (nothing to compare
            against).
    """
    import mlflow
    import torch

    from opsvlm import registry
    from opsvlm.model.checkpoint import read_model_meta
    from opsvlm.tasks.base import get_task
    from opsvlm.tracking import ensure_experiment, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    model_dir = registry.resolve_model(config.model, tracking_uri, config.cache_dir or None)
    described = registry.describe_model(config.model, tracking_uri)
    meta = read_model_meta(model_dir)
    task = get_task(meta["task"])
    manifest_path = Path(config.data) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if "sampling_spec" in manifest and "sampling_spec" in meta and manifest["sampling_spec"] != meta["sampling_spec"]:
        raise ValueError(
            f"{config.data} was prepared with sampling spec {manifest['sampling_spec']} but the model was trained "
            f"with {meta['sampling_spec']}; prepare the data with the model's spec"
        )
    rows = read_examples(config.data, config.split, task, config.max_examples)
    ids = [r[task.id_field] for r in rows]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    results = []
    for mode in config.ordered_modes:
        reason = quant.unavailable_reason(mode, device)
        if reason is not None:
            results.append(_skipped(mode, reason))
            continue
        try:
            results.append(run_mode(model_dir, mode, rows, task, config.batch_size, config.warmup_batches))
        except torch.cuda.OutOfMemoryError as exc:
            results.append(_skipped(mode, f"out of GPU memory: {exc}".splitlines()[0]))
        logger.info("quantization study: %s done", mode)
    if results[0]["status"] != "ok":
        raise ValueError(f"the unquantized model could not run ({results[0]['skipped_reason']}): nothing to compare")
    add_comparisons(results, task.headline_metric, config.retention_metrics)
    table = table_rows(results)
    text = format_table(table, task.headline_metric)

    train_run_id = described.get("run_id", "")
    split_key = examples_id(config.split, ids)
    experiment_id = ensure_experiment(config.tracking.experiment, tracking_uri)
    tags = {
        "opsvlm.job": "quant_study",
        "opsvlm.model_ref": config.model,
        "opsvlm.eval_split": split_key,
        "opsvlm.task": task.name,
        **{f"opsvlm.quant.{r['mode']}.skipped": r["skipped_reason"] for r in results if r["status"] != "ok"},
    }
    if train_run_id:
        tags.update({"mlflow.parentRunId": train_run_id, "opsvlm.train_run_id": train_run_id})
    ran = [r for r in results if r["status"] == "ok"]
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.tracking.run_name or None, tags=tags) as run:
        mlflow.log_params(
            {
                "model": config.model,
                "split": config.split,
                "examples": len(rows),
                "modes": ",".join(config.ordered_modes),
                "batch_size": config.batch_size,
                "warmup_batches": config.warmup_batches,
                "task": task.name,
                "base_model": meta["base_model"],
                "trained_quantization": meta["quantization"],
                "device": ran[0]["device"],
                "threads": ran[0]["threads"],
            }
        )
        for r in ran:
            figures = {
                **r["metrics"],
                **{f"retention/{k}": v for k, v in r["retention_by_metric"].items()},
                **{
                    k: r[k]
                    for k in (
                        "retention",
                        "agreement",
                        "latency_median_ms",
                        "latency_p90_ms",
                        "examples_per_s",
                        "load_s",
                        "peak_gpu_bytes",
                        "quantized_linears",
                        *SIZE_KEYS,
                    )
                },
            }
            mlflow.log_metrics({f"quant/{r['mode']}/{k}": v for k, v in _finite(figures).items()})
        mlflow.log_table({k: [row.get(k, math.nan) for row in table] for k in table[0]}, "quant_study.json")
        mlflow.log_text(text, "quant_study.txt")
        summary = {
            "run_id": run.info.run_id,
            "train_run_id": train_run_id,
            "model_dir": str(model_dir),
            "task": task.name,
            "headline_metric": task.headline_metric,
            "examples": len(rows),
            "examples_id": split_key,
            "table": table,
            "metrics": {r["mode"]: r["metrics"] for r in ran},
            "skipped": {r["mode"]: r["skipped_reason"] for r in results if r["status"] != "ok"},
        }
        mlflow.log_dict(_json_safe(summary), "quant_study_summary.json")
    return summary


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
