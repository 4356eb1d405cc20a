"""The closed choices of opsvlm's configs, as ``Literal`` types. Pure: imports nothing of opsvlm.

A config field annotated with one of these is checked by :func:`opsvlm.config.load_config` (the error names the
field and lists the choices), and, for objects built directly in Python, by :func:`opsvlm.config.check_choices`. The
tuples next to each type are the same choices at run time (``typing.get_args``): use them for messages and loops, never
a second hand-written list.

A ``Literal`` is only used where the set is closed. Fields that take a choice *or* something else (LoRA targets: a
preset name or a regex; GPU types: canonical names or aliases such as ``"a100-80gb"``) stay ``str``; their presets are
listed here all the same.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CLASS_WEIGHTINGS",
    "COMPUTE_DTYPES",
    "FP32_MODULE_GROUPS",
    "GPU_NAMES",
    "LORA_TARGET_PRESET_NAMES",
    "OPTIMIZERS",
    "PLAN_DTYPES",
    "QUANTIZATIONS",
    "SAMPLING_STRATEGIES",
    "TRAINING_QUANTIZATIONS",
    "ZERO_STAGES",
    "AttnImplementation",
    "ClassWeighting",
    "ComputeDtype",
    "Fp32ModuleGroup",
    "GpuName",
    "LoraTargetPreset",
    "Optimizer",
    "PlanDtype",
    "Quantization",
    "SamplingStrategy",
    "TrainingQuantization",
    "ZeroStage",
]

Quantization = Literal["nf4", "int8", "none"]
"""How the base model's language decoder is stored: ``nf4`` (QLoRA), ``int8`` (LLM.int8, inference only) or ``none``."""
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)

TrainingQuantization = Literal["nf4", "none"]
"""The quantizations training (and the memory planner) support; int8 is for inference only."""
TRAINING_QUANTIZATIONS: tuple[TrainingQuantization, ...] = get_args(TrainingQuantization)

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]
"""``ModelConfig.compute_dtype``: ``auto`` is bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU."""
COMPUTE_DTYPES: tuple[ComputeDtype, ...] = get_args(ComputeDtype)

PlanDtype = Literal["auto", "bf16", "fp16"]
"""The memory planner's compute dtype (it plans GPUs only, so no fp32): ``auto`` is fp16 on GPUs without bf16."""
PLAN_DTYPES: tuple[PlanDtype, ...] = get_args(PlanDtype)

AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
"""transformers' ``attn_implementation``; ``flash_attention_2`` needs Ampere or newer."""
ATTN_IMPLEMENTATIONS: tuple[AttnImplementation, ...] = get_args(AttnImplementation)

Fp32ModuleGroup = Literal["vision", "norms", "lm_head"]
"""Parts of the model kept in fp32 under 16-bit training (``ModelConfig.fp32_modules``)."""
FP32_MODULE_GROUPS: tuple[Fp32ModuleGroup, ...] = get_args(Fp32ModuleGroup)

LoraTargetPreset = Literal["language", "language_vision"]
"""Named LoRA target sets (``opsvlm.model.plan.LORA_TARGET_PRESETS`` holds their regexes)."""
LORA_TARGET_PRESET_NAMES: tuple[LoraTargetPreset, ...] = get_args(LoraTargetPreset)

Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
"""``adamw`` (torch) or bitsandbytes' 8-bit AdamW, plain or paged (GPU only)."""
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)

ZeroStage = Literal[0, 2, 3]
"""0 = plain DDP; 2 = DeepSpeed ZeRO-2 (optimizer state and gradients sharded); 3 = ZeRO-3 (weights too)."""
ZERO_STAGES: tuple[ZeroStage, ...] = get_args(ZeroStage)

SamplingStrategy = Literal["uniform", "motion"]
"""Which frames of a clip the model sees: evenly spaced, or first/last plus the highest-motion frames."""
SAMPLING_STRATEGIES: tuple[SamplingStrategy, ...] = get_args(SamplingStrategy)

ClassWeighting = Literal["none", "inverse_frequency", "sqrt_inverse"]
"""Class-weighted loss: off, ``1 / n_c`` or ``1 / sqrt(n_c)`` (weights with mean 1 over the training examples)."""
CLASS_WEIGHTINGS: tuple[ClassWeighting, ...] = get_args(ClassWeighting)

GpuName = Literal["T4", "A10G", "L4", "A100-40", "A100-80", "H100-80"]
"""Canonical GPU type names of the memory planner (``opsvlm.model.plan.GPUS``; it also accepts aliases)."""
GPU_NAMES: tuple[GpuName, ...] = get_args(GpuName)
