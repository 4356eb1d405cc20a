"""Fine-tune a Qwen2-VL-family model on prepared clips with Ray Train (QLoRA / LoRA, DDP or DeepSpeed).

Run on a laptop (local Ray on 127.0.0.1, local MLflow store in ./mlruns)::

    python jobs/train.py --config jobs/configs/tiny_cpu.yaml data.prepared=data/prepared

Submit to a cluster (T4 workers, QLoRA on the 3B model)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/t4_qlora_3b.yaml data.prepared=/mnt/prepared

Before any worker starts, the memory planner checks the configuration against ``scaling.gpu_type`` and refuses
one that does not fit, printing the breakdown. Any field of ``opsvlm.train.config.TrainConfig`` can be overridden
as ``key=value``.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import load_config
from opsvlm.runtime import init_ray
from opsvlm.train.config import TrainConfig
from opsvlm.train.loop import fit, read_manifest


def memory_plan(config: TrainConfig) -> dict | None:
    """The planner's verdict for this config on ``scaling.gpu_type`` (``None`` for CPU runs)."""
    if not config.scaling.gpu_type:
        return None
    from opsvlm.model.plan import PlanInputs, format_plan, plan_memory
    from opsvlm.model.tiny import resolve_model_source

    spec = read_manifest(config.data.prepared)["sampling_spec"]
    height, width = spec["max_pixels"] ** 0.5, spec["max_pixels"] ** 0.5
    plan = plan_memory(
        PlanInputs(
            model=resolve_model_source(config.model.name),
            gpu=config.scaling.gpu_type,
            quantization=config.model.quantization,
            lora_rank=config.model.lora.rank,
            lora_targets=config.model.lora.targets,
            frames_per_clip=spec["frames_per_clip"],
            frame_height=int(height),
            frame_width=int(width),
            micro_batch=config.optim.micro_batch,
            global_batch=config.optim.micro_batch * config.optim.grad_accum * config.scaling.num_workers,
            num_gpus=config.scaling.num_workers,
            gradient_checkpointing=config.model.gradient_checkpointing,
            optimizer=config.optim.optimizer,
            zero_stage=config.scaling.zero_stage,
        )
    )
    if not plan.fits:
        raise SystemExit(f"refusing to start: the plan does not fit on {config.scaling.gpu_type}\n{format_plan(plan)}")
    return plan.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (jobs/configs/*.yaml)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)

    # 1. config (and the memory check, before any worker exists)
    config = load_config(TrainConfig, args.config, args.overrides)
    if not config.data.prepared:
        parser.error("data.prepared is required (the output folder of jobs/prepare_data.py)")
    plan = memory_plan(config)

    # 2. train with Ray Train, tracked in MLflow
    init_ray(args.address)
    result = fit(config, extra_artifacts={"memory_plan.json": plan} if plan else None)

    # 3. report
    print(json.dumps({"run_id": result.run_id, "checkpoint": result.checkpoint_dir, "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
