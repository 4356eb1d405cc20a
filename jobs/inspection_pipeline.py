"""The inspection task end to end: generate scenes -> prepare -> train -> evaluate -> promote, then one table.

Condition classification of objects in inspection images (9 classes: drains, rock toes, vegetation; normal, blocked,
damaged) runs through the same platform as the video task: Ray Data prepares one example per object, Ray Train
fine-tunes (class-weighted loss against the imbalance), the evaluation scores fine-tuned, majority and zero-shot
side by side, and the registry promotes on macro-F1 under its own registered model name. Embedded defaults: synthetic
scenes, the tiny Qwen2.5-VL fixture on 2 CPU workers, local Ray, local MLflow store in ./mlruns::

    python jobs/inspection_pipeline.py

Submit to a cluster (with a real MLflow server)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/inspection_pipeline.py --workdir /mnt/opsvlm-inspection tracking_uri=http://127.0.0.1:5000

On real data, skip generation: ``python jobs/prepare_inspection.py --source <Roboflow export> --out DIR``, then
``jobs/train.py`` / ``jobs/evaluate.py`` / ``jobs/promote.py`` as for the video task. Overrides:
``<stage>.<field>=value``, e.g. ``generate.images=400``, ``train.data.class_weighting=sqrt_inverse``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opsvlm.data.inspection_prep import InspectionPrepConfig, prepare_inspection
from opsvlm.evaluate.run import EvalConfig
from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.train.config import TrainConfig
from opsvlm.workflow import STAGES, start_job, train_evaluate_promote

DEFAULT_PRESET = Path(__file__).parent / "configs" / "inspection_tiny.yaml"


@dataclass(frozen=True)
class InspectionPipelineConfig:
    """Configuration of ``jobs/inspection_pipeline.py``: one section per stage, plus shared settings.

    Attributes:
        workdir: Where scenes, prepared examples and Ray checkpoints go.
        seed: The run's seed: training (LoRA init, data order) and the bootstrap. The scenes (``generate.seed``) stay
            the same, so runs with different seeds are scored on the same objects.
        tracking_uri: MLflow tracking URI for every stage (empty: local store in ./mlruns).
        experiment: MLflow experiment.
        model_name: Registered model name (its own, so video and inspection champions never compete).
        generate: Synthetic scene generator settings.
        prepare: Example preparation (``source`` and ``out`` are filled from ``workdir``).
        train: Training (``data.prepared`` filled from ``workdir``).
        evaluate: Evaluation (``model`` and ``data`` filled in).
    """

    workdir: str = "outputs/inspection_pipeline"
    seed: int = 0
    tracking_uri: str = ""
    experiment: str = "opsvlm-inspection"
    model_name: str = "opsvlm-inspection"
    generate: InspectionConfig = field(default_factory=InspectionConfig)
    prepare: InspectionPrepConfig = field(default_factory=InspectionPrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


def main(argv: list[str] | None = None) -> int:
    config, work, tracking = start_job(InspectionPipelineConfig, DEFAULT_PRESET, argv, __doc__)

    # 1. synthetic inspection scenes in the Roboflow YOLO segmentation layout
    generated = generate_inspection_dataset(work / "scenes", config.generate, overwrite=True)
    objects = sum(generated.objects_per_class.values())
    print(
        f"[1/{STAGES}] generated {config.generate.images} scenes with {objects} objects in {work / 'scenes'}",
        flush=True,
    )

    # 2. one example per object: the image resized with the spec, the target marked, its neighbours listed
    prepare_config = dataclasses.replace(
        config.prepare, source=str(work / "scenes"), out=str(work / "prepared"), overwrite=True
    )
    summary = prepare_inspection(prepare_config)
    print(
        f"[2/{STAGES}] prepared {summary['examples_written']} examples {summary['examples_by_split']}, "
        f"{summary['objects_rejected']} rejected, {summary['read']['problems_total']} dataset problems",
        flush=True,
    )

    # 3-6. train, choose on validation (register + promotion gate), report on test (opsvlm.workflow)
    train_evaluate_promote(
        config.train,
        config.evaluate,
        prepared=work / "prepared",
        workdir=work,
        tracking=tracking,
        model_name=config.model_name,
        seed=config.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
