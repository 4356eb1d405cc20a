"""What a training checkpoint holds, and how it is written, verified and read back. No Ray here.

A checkpoint directory is everything serving needs, plus what resuming needs::

    adapter/               LoRA adapter (peft save_pretrained: adapter_config.json + adapter_model.safetensors)
    processor/             the processor, with its explicit pixel limits
    model.json             base model reference, quantization, compute dtype, sampling spec, label set, step
    train_config.json      the full training config
    trainer_state.pt       optimizer / scheduler / step counters (rank 0, DDP); DeepSpeed writes ds/ instead
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from opsvlm.video.sampling import SamplingSpec

CHECKPOINT_FORMAT = "opsvlm-checkpoint/1"
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
MODEL_FILE = "model.json"
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.pt"
DEEPSPEED_DIR = "ds"


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
    """Optimizer/scheduler state dicts and counters (``step``, ``epoch``, ``batches_done``)."""
    torch.save(state, Path(directory) / STATE_FILE)


def load_trainer_state(directory: str | Path) -> dict | None:
    path = Path(directory) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
