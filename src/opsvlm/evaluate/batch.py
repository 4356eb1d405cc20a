"""Batch inference with Ray Data: an actor pool, one model per actor, batched constrained generation.

Frames come from the prepared shards, sampled with the SamplingSpec the model was trained with (the evaluation
checks the shards' spec against the one in the model's checkpoint and refuses a mismatch).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from opsvlm.data.pipeline import CLIP_SCHEMA
from opsvlm.inference import ClipInput, Predictor
from opsvlm.video.sampling import SamplingSpec

TRUTH_COLUMNS = (
    "clip_id",
    "subject",
    "session",
    "start_s",
    "end_s",
    "dominant_operation",
    "temporal_segment",
    "next_operation",
)
PREDICTION_SCHEMA = pa.schema(
    [CLIP_SCHEMA.field(name) for name in TRUTH_COLUMNS]
    + [
        ("valid", pa.bool_()),
        ("pred_operation", pa.string()),
        ("pred_start_s", pa.float64()),
        ("pred_end_s", pa.float64()),
        ("pred_next_operation", pa.string()),
        ("confidence", pa.float64()),
        ("scores", pa.string()),
        ("text", pa.string()),
    ]
)


class PredictBatch:
    """Ray Data callable class: holds one Predictor; clip rows in, prediction rows out (frames dropped).

    Args:
        model_dir: An opsvlm checkpoint directory, or ``None`` with ``base_model`` for the zero-shot baseline.
        base_model: Base model source for the zero-shot baseline.
        spec: SamplingSpec for the zero-shot baseline (a checkpoint carries its own).
        constrained: Constrained (default) or free generation.
    """

    def __init__(
        self, model_dir: str | None, base_model: str | None = None, spec: dict | None = None, constrained: bool = True
    ):
        if model_dir:
            self.predictor = Predictor.from_checkpoint(model_dir, constrained=constrained)
        else:
            self.predictor = Predictor.from_base(base_model, SamplingSpec(**spec), constrained=constrained)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips = [
            ClipInput(
                np.frombuffer(r["frames"], np.uint8).reshape(tuple(r["frame_shape"])),
                r["frame_times_s"],
                r["end_s"] - r["start_s"],
            )
            for r in rows
        ]
        predictions = self.predictor.predict(clips)
        out = []
        for row, prediction in zip(rows, predictions, strict=True):
            record = {key: row[key] for key in TRUTH_COLUMNS}
            record["valid"] = prediction is not None
            record["pred_operation"] = prediction.operation if prediction else None
            record["pred_start_s"] = prediction.start_s if prediction else None
            record["pred_end_s"] = prediction.end_s if prediction else None
            record["pred_next_operation"] = prediction.next_operation if prediction else None
            record["confidence"] = prediction.confidence if prediction else None
            record["scores"] = json.dumps(prediction.scores) if prediction else "{}"
            record["text"] = prediction.text if prediction else ""
            out.append(record)
        return pa.Table.from_pylist(out, schema=PREDICTION_SCHEMA)


def predict_dataset(
    dataset,
    model_dir: str | None = None,
    *,
    base_model: str | None = None,
    spec: SamplingSpec | None = None,
    constrained: bool = True,
    batch_size: int = 8,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
):
    """Predictions for every clip of a Ray Dataset of prepared clip rows.

    Args:
        dataset: Ray Dataset with the prepared clip schema (``opsvlm.data.pipeline.CLIP_SCHEMA``).
        model_dir: Checkpoint directory (fine-tuned model), or ``None`` with ``base_model`` and ``spec``.
        base_model: Base model for the zero-shot baseline.
        spec: Its sampling spec.
        constrained: Constrained decoding (default) or free generation.
        batch_size: Clips per ``generate`` call.
        actors: Actor-pool size (one model each).
        cpus_per_actor: CPUs per actor (fractions let an actor share a small machine with Ray Data).
        gpus_per_actor: GPUs per actor.

    Returns:
        A Ray Dataset with ``PREDICTION_SCHEMA`` rows.
    """
    return dataset.map_batches(
        PredictBatch,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "base_model": base_model,
            "spec": vars(spec) if spec is not None else None,
            "constrained": constrained,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
