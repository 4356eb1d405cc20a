"""The whole platform in one job: generate -> prepare -> train -> evaluate -> promote, then one summary table.

Embedded defaults (no arguments) run end to end on a laptop or CI box: synthetic sessions, the tiny Qwen2.5-VL
fixture on 2 CPU workers, a local Ray on 127.0.0.1 and a local MLflow store in ./mlruns::

    python jobs/pipeline.py

Submit to a cluster (with a real MLflow server)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --workdir /mnt/opsvlm tracking_uri=http://127.0.0.1:5000

Every stage's config can be overridden as ``<stage>.<field>=value``, e.g. ``train.optim.epochs=4``,
``prepare.sampling.frames_per_clip=8``, ``generate.subjects=8`` (see ``PipelineConfig`` and the stage configs).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opsvlm.data.pipeline import PrepareConfig, prepare
from opsvlm.evaluate.run import EvalConfig
from opsvlm.tasks.operations.data.clips import ClipConfig
from opsvlm.tasks.operations.data.synthetic import GeneratorConfig, generate_dataset
from opsvlm.train.config import TrainConfig
from opsvlm.video.sampling import SamplingSpec
from opsvlm.workflow import STAGES, start_job, train_evaluate_promote

DEFAULT_PRESET = Path(__file__).parent / "configs" / "pipeline_tiny.yaml"


@dataclass(frozen=True)
class PipelineConfig:
    """Configuration of ``jobs/pipeline.py``: one section per stage, plus shared settings.

    Attributes:
        workdir: Where data, prepared clips and Ray checkpoints go.
        seed: The run's seed: training (LoRA init, data order) and the bootstrap. The data (``generate.seed``) stay
            the same, so runs with different seeds are scored on the same clips.
        tracking_uri: MLflow tracking URI for every stage (empty: local store in ./mlruns).
        experiment: MLflow experiment.
        model_name: Registered model name.
        generate: Synthetic data generator settings.
        prepare: Clip preparation (``source`` and ``out`` are filled from ``workdir``).
        train: Training (``data.prepared`` filled from ``workdir``).
        evaluate: Evaluation (``model`` and ``data`` filled in).
    """

    workdir: str = "outputs/pipeline"
    seed: int = 0
    tracking_uri: str = ""
    experiment: str = "opsvlm"
    model_name: str = "opsvlm"
    generate: GeneratorConfig = field(default_factory=GeneratorConfig)
    prepare: PrepareConfig = field(default_factory=lambda: PrepareConfig(clips=ClipConfig(), sampling=SamplingSpec()))
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


def main(argv: list[str] | None = None) -> int:
    config, work, tracking = start_job(PipelineConfig, DEFAULT_PRESET, argv, __doc__)

    # 1. generate synthetic sessions in the OpenPack layout
    sources = generate_dataset(work / "synthetic", config.generate)
    print(f"[1/{STAGES}] generated {len(sources)} sessions in {work / 'synthetic'}", flush=True)

    # 2. prepare clips with Ray Data
    prepare_config = dataclasses.replace(config.prepare, source=str(work / "synthetic"), out=str(work / "prepared"))
    prepared = prepare(prepare_config)
    print(
        f"[2/{STAGES}] prepared {prepared['clips_written']} clips ({prepared['clips_rejected']} rejected)", flush=True
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
