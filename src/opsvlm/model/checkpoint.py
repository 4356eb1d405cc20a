"""What a training checkpoint holds, and how it is written, verified and read back. No Ray here.

A checkpoint directory is everything serving needs, plus what resuming needs::

    adapter/               LoRA adapter (peft save_pretrained: adapter_config.json + adapter_model.safetensors)
    processor/             the processor, with its explicit pixel limits
    model.json             base model reference, quantization, compute dtype, sampling spec, label set, step
    train_config.json      the full training config
    trainer_state.pt       step counters, data cursor, optimizer / scheduler / loss-scaler state (rank 0)
    rng/rank<r>.pt         every rank's torch (and CUDA) RNG state
    ds/                    DeepSpeed's partitioned optimizer state (ZeRO only)

Only adapter, processor and ``model.json`` are uploaded to the MLflow run (:data:`REGISTERED_FILES`); the
completion marker :data:`COMPLETE_MARKER` is uploaded after them, and registration refuses a run without it.
Everything here is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_FORMAT",
    "COMPLETE_MARKER",
    "CONFIG_FILE",
    "DEEPSPEED_DIR",
    "MODEL_FILE",
    "PROCESSOR_DIR",
    "REGISTERED_FILES",
    "RNG_DIR",
    "STATE_FILE",
    "completion_marker",
    "load_rng_state",
    "load_trainer_state",
    "read_model_meta",
    "sampling_spec_of",
    "save_model_files",
    "save_rng_state",
    "save_trainer_state",
    "upload_complete",
    "verify_adapter",
]

CHECKPOINT_FORMAT = "opsvlm-checkpoint/1"
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
MODEL_FILE = "model.json"
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.pt"
RNG_DIR = "rng"
DEEPSPEED_DIR = "ds"
REGISTERED_FILES = (ADAPTER_DIR, PROCESSOR_DIR, MODEL_FILE)  # what a model version holds; no trainer state
COMPLETE_MARKER = "checkpoint.complete.json"  # run-root artifact, uploaded after the checkpoint's files


def save_model_files(
    directory: str | Path,
    peft_model: Any,
    processor: Any,
    *,
    base_model: str,
    quantization: str,
    compute_dtype: str,
    spec: SamplingSpec,
    labels: list[str],
    task: str,
    step: int,
    config: dict,
) -> Path:
    """Write adapter, processor and metadata (the part of a checkpoint serving loads) and verify the adapter.

    Args:
        directory: Checkpoint directory (created).
        peft_model: The (unwrapped) peft model.
        processor: Its processor.
        base_model: Base model reference as configured (``tiny``, hub id or directory).
        quantization: ``nf4`` or ``none`` (how the base was loaded in training).
        compute_dtype: e.g. ``float16``.
        spec: The frame-sampling spec the training data was prepared with.
        labels: The task's label set.
        task: Task name.
        step: Optimizer step.
        config: The full training config as a dict.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(directory / ADAPTER_DIR)
    processor.save_pretrained(directory / PROCESSOR_DIR)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "task": task,
        "base_model": base_model,
        "quantization": quantization,
        "compute_dtype": compute_dtype,
        "sampling_spec": asdict(spec),
        "labels": list(labels),
        "step": step,
    }
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    verify_adapter(directory)
    return directory


def verify_adapter(directory: str | Path) -> int:
    """Check the saved adapter is non-empty and loads; returns its number of tensors.

    Raises:
        ValueError: naming the file, if the adapter is missing, empty, or holds no tensors.
    """
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file() or path.stat().st_size == 0:
        raise ValueError(f"{path}: adapter weights missing or empty")
    tensors = load_file(str(path))
    if not tensors or not all(t.numel() > 0 for t in tensors.values()):
        raise ValueError(f"{path}: adapter holds no (or empty) tensors")
    if not (Path(directory) / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ValueError(f"{directory}: adapter_config.json missing")
    return len(tensors)


def read_model_meta(directory: str | Path) -> dict:
    """The ``model.json`` of a checkpoint (base model, sampling spec, labels, ...).

    Raises:
        FileNotFoundError: naming the directory, if it is not an opsvlm checkpoint.
    """
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an opsvlm checkpoint (no {MODEL_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def sampling_spec_of(directory: str | Path) -> SamplingSpec:
    """The sampling spec a checkpoint's model was trained with (never re-specified by hand)."""
    return SamplingSpec(**read_model_meta(directory)["sampling_spec"])


def save_trainer_state(directory: str | Path, state: dict) -> None:
    """Counters (``opsvlm.train.step.TrainState``) and optimizer/scheduler/scaler state dicts: tensors and plain
    values only, so :func:`load_trainer_state` can load with ``weights_only=True``."""
    torch.save(state, Path(directory) / STATE_FILE)


def load_trainer_state(directory: str | Path) -> dict | None:
    """What :func:`save_trainer_state` wrote (``None`` if absent); never unpickles arbitrary objects."""
    path = Path(directory) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_rng_state(directory: str | Path, rank: int) -> None:
    """This process's torch CPU RNG state (and its current CUDA device's) as ``rng/rank<rank>.pt``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    path = Path(directory) / RNG_DIR
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / f"rank{rank}.pt")


def load_rng_state(directory: str | Path, rank: int) -> bool:
    """Restore what :func:`save_rng_state` wrote for ``rank``; ``False`` if the checkpoint has none for it (a
    resume on more workers than before: that rank keeps its freshly seeded state)."""
    path = Path(directory) / RNG_DIR / f"rank{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def completion_marker(step: int, files: list[str]) -> dict:
    """The content of :data:`COMPLETE_MARKER`: the format, the step, and the uploaded files."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "files": sorted(files)}


def upload_complete(client, run_id: str) -> bool:
    """Whether the run's final checkpoint upload finished (its :data:`COMPLETE_MARKER` exists).

    Args:
        client: An ``mlflow.MlflowClient`` for the run's tracking URI.
        run_id: The training run.
    """
    return any(Path(item.path).name == COMPLETE_MARKER for item in client.list_artifacts(run_id))
