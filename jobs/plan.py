"""Print the per-GPU memory plan for a LoRA / QLoRA fine-tuning run as one JSON object.

Nothing is downloaded and no GPU is needed: known hub ids are resolved from the configs shipped with opsvlm, any
other model from a local directory's ``config.json``. Settings are ``key=value`` overrides of the fields of
``opsvlm.model.plan.PlanInputs`` (quantization, lora_rank, lora_targets, lora_dropout, frames_per_clip,
frame_height, frame_width, text_tokens, micro_batch, global_batch, num_gpus, gradient_checkpointing, optimizer,
zero_stage, dtype, safety_margin), loaded with ``opsvlm.config.load_config`` like every job's config: values are
YAML (``micro_batch=null`` lets the planner choose, ``gradient_checkpointing=false``), choices are checked against
their ``Literal`` types, an unknown key is an error.

Usage::

    python jobs/plan.py --model Qwen/Qwen2.5-VL-3B-Instruct --gpu T4
    python jobs/plan.py --model Qwen/Qwen2.5-VL-7B-Instruct --gpu A100-80 quantization=none zero_stage=2 \\
        num_gpus=4 global_batch=64 frames_per_clip=16
    python jobs/plan.py --model /models/my-qwen2.5-vl --gpu L4 micro_batch=2 gradient_checkpointing=false
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/plan.py --model Qwen/Qwen2.5-VL-3B-Instruct --gpu T4

The JSON has ``total_params``, ``trainable_params``, per-component ``bytes`` (weights, adapters, gradients,
optimizer_states, activations, vision_tokens, overhead, total) and ``gib``, ``gpu_bytes``, ``usable_bytes``, the
evaluated ``micro_batch`` / ``grad_accum``, the ``recommendation`` and ``fits``. Exit status: 0 when a plan was
printed (whether or not it fits; with ``--check``, 1 when it does not fit), 2 for invalid arguments (message on
stderr, nothing on stdout).
"""  # noqa: E501  (the ray job submit line above is meant to be copied whole)

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from opsvlm.config import ConfigError, load_config
from opsvlm.model.plan import PlanError, PlanInputs, plan_memory


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, plan, print one JSON object.

    Args:
        argv: Command-line arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 when a plan was printed (1 with ``--check`` if it does not fit), 2 on invalid input.
    """
    parser = argparse.ArgumentParser(
        prog="jobs/plan.py",
        description="Estimate per-GPU memory for LoRA/QLoRA fine-tuning of Qwen2-VL / Qwen2.5-VL and recommend "
        "micro-batch and gradient accumulation.",
    )
    parser.add_argument("--model", required=True, help="hub id of a known model or a local model directory")
    parser.add_argument("--gpu", required=True, help="T4, A10G, L4, A100-40, A100-80 or H100-80")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when the plan does not fit")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="PlanInputs fields to override")
    args = parser.parse_args(argv)

    try:
        for setting in args.settings:
            if setting.partition("=")[0].strip() in ("model", "gpu"):
                raise ConfigError(f"{setting!r}: give the model and the GPU with --model and --gpu")
        # JSON-quoted: a YAML scalar that stays the string it is (a directory named 123, a GPU named "null").
        given = [f"model={json.dumps(args.model)}", f"gpu={json.dumps(args.gpu)}"]
        inputs = load_config(PlanInputs, None, [*given, *args.settings])
        result = plan_memory(inputs)
    except (PlanError, ConfigError) as err:
        print(f"jobs/plan.py: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 1 if args.check and not result.fits else 0


if __name__ == "__main__":
    sys.exit(main())
