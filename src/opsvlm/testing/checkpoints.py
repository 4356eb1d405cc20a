"""Real opsvlm checkpoints of the tiny model for serving tests and benchmarks: saved by the training code, registered
in an MLflow store like a finished training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opsvlm import registry
from opsvlm.model import checkpoint as ckpt
from opsvlm.model.build import LoraSettings, ModelConfig, load_base_model, load_processor, prepare_for_training
from opsvlm.tasks.base import get_task
from opsvlm.video.sampling import SamplingSpec

__all__ = ["register_checkpoint", "write_adapter_checkpoint"]


def write_adapter_checkpoint(directory: Path, tiny_dir: Path, spec: SamplingSpec, *, task: str, seed: int = 0) -> Path:
    """A real opsvlm checkpoint of ``task``: the tiny base with a freshly attached (untrained) LoRA adapter, saved by
    the same ``save_model_files`` training uses. Untrained LoRA leaves the base's outputs unchanged, which is all
    serving tests need: constrained decoding still gives valid answers.

    Args:
        directory: Where to write the checkpoint.
        tiny_dir: The tiny base model (:func:`opsvlm.testing.tiny.ensure_tiny_model`).
        spec: The frame sampling saved with the model.
        task: A registered task name (its labels go into ``model.json``).
        seed: Seeds the adapter's initialisation.

    Returns:
        The checkpoint directory.
    """
    import torch

    config = ModelConfig(
        name=str(tiny_dir),
        quantization="none",
        compute_dtype="float32",
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0),
    )
    torch.manual_seed(seed)
    model, _ = prepare_for_training(load_base_model(config), config)
    return ckpt.save_model_files(
        directory,
        model,
        load_processor(str(tiny_dir)),
        base_model=str(tiny_dir),
        quantization="none",
        compute_dtype="float32",
        spec=spec,
        labels=list(get_task(task).labels),
        task=task,
        step=0,
        config={"test": "serving"},
    )


def register_checkpoint(client: Any, experiment_id: str, uri: str, name: str, checkpoint: Path, champion: bool) -> str:
    """Log ``checkpoint`` as a finished training run's ``checkpoint`` artifacts (with the completion marker ``fit``
    writes), register it as a version of ``name`` (validation role), optionally make it the champion.

    Args:
        client: An ``mlflow.MlflowClient`` on ``uri``.
        experiment_id: Experiment of the training run.
        uri: Tracking and registry URI.
        name: Registered model name.
        checkpoint: A directory written by :func:`write_adapter_checkpoint` (or by training).
        champion: Point the champion alias at the new version.

    Returns:
        The new version number, as a string.
    """
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(checkpoint), registry.CHECKPOINT_ARTIFACT)
    client.log_dict(run_id, ckpt.completion_marker(0, list(ckpt.REGISTERED_FILES)), ckpt.COMPLETE_MARKER)
    client.set_terminated(run_id)
    version = registry.register_version(
        run_id,
        name=name,
        metrics={"weighted_score": 0.5},
        eval_split="val:serving",
        split_role="selection",
        tracking_uri=uri,
    )
    if champion:
        client.set_registered_model_alias(name, registry.CHAMPION, version.version)
    return str(version.version)
