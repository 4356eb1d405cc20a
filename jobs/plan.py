"""Print the per-GPU memory plan for a LoRA / QLoRA fine-tuning run as one JSON object.

Nothing is downloaded and no GPU is needed: known hub ids are resolved from the configs shipped with opsvlm, any
other model from a local directory's ``config.json``. Settings are ``key=value`` pairs naming fields of
``opsvlm.model.plan.PlanInputs`` (quantization, lora_rank, lora_targets, lora_dropout, frames_per_clip,
frame_height, frame_width, text_tokens, micro_batch, global_batch, num_gpus, gradient_checkpointing, optimizer,
zero_stage, dtype, safety_margin).

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
from pathlib import Path


def _import_plan():
    """Import the planner, falling back to the repository's ``src`` when opsvlm is not installed (Ray working dir)."""
    try:
        from opsvlm.model import plan
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from opsvlm.model import plan
    return plan


def _parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {pair!r}")
        out[key.strip()] = value
    return out


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

    plan = _import_plan()
    try:
        inputs = plan.PlanInputs.from_strings(args.model, args.gpu, _parse_pairs(args.settings))
        result = plan.plan_memory(inputs)
    except (plan.PlanError, ValueError) as err:
        print(f"jobs/plan.py: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 1 if args.check and not result.fits else 0


if __name__ == "__main__":
    sys.exit(main())
