"""Batch inference with Ray Data: an actor pool, one model per actor, batched constrained generation.

Frames come from the prepared shards, sampled with the SamplingSpec the model was trained with (the evaluation
checks the shards' spec against the one in the model's checkpoint and refuses a mismatch).
"""

from __future__ import annotations

import json

import pyarrow as pa

from opsvlm.inference import Predictor
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ANSWER_SCHEMA",
    "PredictBatch",
    "predict_dataset",
]

ANSWER_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("valid", pa.bool_()), ("answer", pa.string()), ("text", pa.string())]
)


class PredictBatch:
    """Ray Data callable class: holds one Predictor; prepared rows in, ``ANSWER_SCHEMA`` rows out (pixels dropped):
    the row id, whether the answer is valid, the answer as JSON (``answer.to_dict()``) and the generated text.

    Args:
        model_dir: An opsvlm checkpoint directory, or ``None`` with ``base_model`` for the zero-shot baseline.
        base_model: Base model source for the zero-shot baseline.
        spec: SamplingSpec for the zero-shot baseline (a checkpoint carries its own).
        constrained: Constrained (default) or free generation.
        task: Task of the zero-shot baseline (a checkpoint names its own).
    """

    def __init__(
        self,
        model_dir: str | None,
        base_model: str | None = None,
        spec: dict | None = None,
        constrained: bool = True,
        task: str | None = None,
    ):
        if model_dir:
            self.predictor = Predictor.from_checkpoint(model_dir, constrained=constrained)
        else:
            self.predictor = Predictor.from_base(base_model, SamplingSpec(**spec), constrained=constrained, task=task)
        self.task = self.predictor.task

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        predictions = self.predictor.predict([self.task.input_of(r) for r in rows])
        return pa.Table.from_pylist(
            [
                {
                    "example_id": row[self.task.id_field],
                    "valid": answer is not None,
                    "answer": json.dumps(answer.to_dict()) if answer is not None else None,
                    "text": answer.text if answer is not None else "",
                }
                for row, answer in zip(rows, predictions, strict=True)
            ],
            schema=ANSWER_SCHEMA,
        )


def predict_dataset(
    dataset,
    model_dir: str | None = None,
    *,
    base_model: str | None = None,
    spec: SamplingSpec | None = None,
    constrained: bool = True,
    task: str | None = None,
    batch_size: int = 8,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
):
    """Predictions for every row of a Ray Dataset of prepared rows (clips, or another task's examples).

    Args:
        dataset: Ray Dataset of prepared rows of the model's task.
        model_dir: Checkpoint directory (fine-tuned model), or ``None`` with ``base_model`` and ``spec``.
        base_model: Base model for the zero-shot baseline.
        spec: Its sampling spec.
        constrained: Constrained decoding (default) or free generation.
        task: Task of the zero-shot baseline (a checkpoint names its own).
        batch_size: Clips per ``generate`` call.
        actors: Actor-pool size (one model each).
        cpus_per_actor: CPUs per actor (fractions let an actor share a small machine with Ray Data).
        gpus_per_actor: GPUs per actor.

    Returns:
        A Ray Dataset of ``ANSWER_SCHEMA`` rows.
    """
    import ray.data

    return dataset.map_batches(
        PredictBatch,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "base_model": base_model,
            "spec": vars(spec) if spec is not None else None,
            "constrained": constrained,
            "task": task,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        # an actor that dies fails the evaluation loudly instead of being restarted (Ray would warn that a restart
        # cannot re-fetch constructor arguments held in the object store)
        max_restarts=0,
    )
