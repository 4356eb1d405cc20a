"""Load Qwen2-VL / Qwen2.5-VL for LoRA or QLoRA fine-tuning, for inference with an adapter, and merge adapters.

One path for every model: ``from_pretrained`` on a hub id or a directory (``"tiny"`` resolves to the cached tiny
checkpoint from :mod:`opsvlm.testing.tiny`), so CPU tests exercise exactly the code a T4 or A100 run uses.

Typical training setup::

    config = ModelConfig(name="Qwen/Qwen2.5-VL-3B-Instruct", quantization="nf4")
    check_zero_compat(config.quantization, zero_stage)      # before any worker starts
    processor = load_processor(config.name)
    model = load_base_model(config, device_map={"": local_rank})
    model, report = prepare_for_training(model, config)     # report: trainable / total params, dtypes, regex

After training, ``merge_adapter(base, adapter_dir, out_dir, "bfloat16")`` writes a standalone model. It always
reloads the base *unquantized*: merging into a 4-bit base would add the LoRA delta to dequantized weights and
re-quantize the sum, so the merged weights differ from what was trained (and a 4-bit checkpoint is not what
serving wants anyway).

Module paths are those of transformers 5.x: ``model.language_model.layers.N.self_attn.q_proj`` (language model),
``model.visual.blocks.N.attn.qkv`` (vision tower), ``model.visual.merger.mlp.0`` and ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opsvlm.config import check_choices
from opsvlm.model import quant
from opsvlm.model.plan import LORA_TARGET_PRESETS, check_zero3_quantization
from opsvlm.testing.tiny import resolve_model_source
from opsvlm.types import COMPUTE_DTYPES, AttnImplementation, ComputeDtype, Fp32ModuleGroup, Quantization

__all__ = [
    "DEFAULT_FP16_FP32_MODULES",
    "LoraSettings",
    "ModelConfig",
    "check_trainable_quantization",
    "check_zero_compat",
    "count_parameters",
    "fp32_module_groups",
    "keep_in_fp32",
    "load_base_model",
    "load_for_inference",
    "load_processor",
    "merge_adapter",
    "merge_lora",
    "nan_advice",
    "prepare_for_training",
    "resolve_compute_dtype",
    "target_modules_regex",
]

logger = logging.getLogger(__name__)

# model.fp32_modules: null = this under float16 compute, nothing under bfloat16/float32. The vision tower: public
# reports of Qwen2-VL / Qwen2.5-VL-3B's ViT overflowing fp16 (huggingface/transformers#33312, vllm-project/vllm#13968).
# Norms: cheap, and their outputs feed every projection. lm_head stays out by default: transformers' causal-LM loss
# already upcasts the logits before the softmax, and an fp32 lm_head matmul costs ~8x on a T4 for ~10% of the
# language model's FLOPs.
DEFAULT_FP16_FP32_MODULES: tuple[str, ...] = ("vision", "norms")
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter hyper-parameters.

    Attributes:
        rank: LoRA rank ``r``; each targeted Linear of shape (out, in) gets A (r, in) and B (out, r).
        alpha: Scaling numerator: the update is ``(alpha / rank) * B @ A``.
        dropout: Dropout on the LoRA branch input, in [0, 1).
        targets: ``"language"`` (q/k/v/o and gate/up/down projections of every decoder layer),
            ``"language_vision"`` (plus the vision blocks' qkv/proj and MLP projections and the patch merger), or any
            regex, full-matched against module paths such as ``model.language_model.layers.0.self_attn.q_proj``.
        modules_to_save: Modules trained in full and saved with the adapter (peft ``modules_to_save``; a name
            matches module paths ending in it). A randomly initialised model (the tiny fixture) needs its final
            norm here: with frozen unit norm weights and small lm_head weights its logits cannot become confident,
            so LoRA alone plateaus at a high loss. Released checkpoints do not need it.
    """

    rank: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: str = "language"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        target_modules_regex(self.targets)  # Raises naming lora.targets.


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how to adapt it.

    Attributes:
        name: ``"tiny"``, a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local checkpoint directory.
        quantization: ``"nf4"`` (QLoRA: 4-bit language model, vision tower and lm_head unquantized), ``"int8"``
            (LLM.int8 on the same modules; inference only, training refuses it) or ``"none"``.
        compute_dtype: ``"auto"`` (see :func:`resolve_compute_dtype`), ``"float32"``, ``"float16"`` or
            ``"bfloat16"``. Dtype of the unquantized weights and of the 4-bit matmuls.
        lora: Adapter settings.
        gradient_checkpointing: Recompute layer activations in the backward pass (non-reentrant), trading ~30% more
            compute for far less activation memory.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (Ampere+ only, not on T4).
        fp32_modules: Numerically fragile parts kept in fp32 when training in fp16/bf16 (weights fp32, forward
            outside autocast): any of ``"vision"`` (the vision tower), ``"norms"`` (every RMSNorm/LayerNorm),
            ``"lm_head"``. ``null`` (default): ``vision`` and ``norms`` under float16 compute, none otherwise (see
            :data:`DEFAULT_FP16_FP32_MODULES` for the evidence); ``[]``: none.
    """

    name: str = "tiny"
    quantization: Quantization = "nf4"
    compute_dtype: ComputeDtype = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    attn_implementation: AttnImplementation = "sdpa"
    fp32_modules: tuple[Fp32ModuleGroup, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model.name must be a non-empty string, got {self.name!r}")
        check_choices(self, "model.")  # quantization, compute_dtype, attn_implementation, fp32_modules
        if not isinstance(self.lora, LoraSettings):
            raise ValueError(f"model.lora must be a LoraSettings, got {type(self.lora).__name__}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"model.gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")


def target_modules_regex(targets: str) -> str:
    """The regex peft gets as ``target_modules`` (peft applies ``re.fullmatch`` to each module path).

    The presets are shared with :mod:`opsvlm.model.plan`, so the memory planner counts the same adapters.

    Args:
        targets: ``"language"``, ``"language_vision"`` or a regex over module paths.

    Returns:
        The regex.

    Raises:
        ValueError: ``targets`` is empty or not a valid regex.
    """
    if not isinstance(targets, str) or not targets:
        raise ValueError(f"lora.targets must be a preset {list(LORA_TARGET_PRESETS)} or a regex, got {targets!r}")
    regex = LORA_TARGET_PRESETS.get(targets, targets)
    try:
        re.compile(regex)
    except re.error as err:
        raise ValueError(f"lora.targets {targets!r} is neither a preset nor a valid regex: {err}") from None
    return regex


def _cuda_has_native_bf16(device: torch.device) -> bool:
    # Not torch.cuda.is_bf16_supported(): by default it also counts *emulated* bf16, so it says True on a T4
    # (sm_75), where bf16 matmuls are many times slower than fp16.
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_compute_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """Turn ``ModelConfig.compute_dtype`` into a ``torch.dtype`` for ``device``.

    ``"auto"`` gives bf16 on CUDA GPUs with native bf16 (Ampere and newer: A100, L4, H100), fp16 on older ones
    (T4, V100), and fp32 everywhere else. fp32 on CPU because CPUs without AMX have no fast 16-bit matmul (bf16 is
    emulated and several times slower than fp32) and because fp32 keeps CPU tests free of half-precision
    overflow/rounding that would hide or fake bugs.

    Args:
        name: One of ``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"``.
        device: Target device; ``None`` means the current CUDA device if CUDA is available, else CPU.

    Returns:
        The dtype.

    Raises:
        ValueError: Unknown ``name``, or ``"bfloat16"`` on a CUDA GPU without native bf16.
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {name!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32 if name == "auto" else _DTYPES[name]
    native_bf16 = _cuda_has_native_bf16(device)
    if name == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    if name == "bfloat16" and not native_bf16:
        raise ValueError(
            f"model.compute_dtype is bfloat16 but {torch.cuda.get_device_name(device)} has no native bf16 "
            "(compute capability < 8.0, e.g. T4); use float16 or auto"
        )
    return _DTYPES[name]


def fp32_module_groups(config: ModelConfig, compute_dtype: torch.dtype) -> tuple[str, ...]:
    """The groups :func:`keep_in_fp32` applies for ``config`` at ``compute_dtype`` (none under fp32)."""
    if compute_dtype == torch.float32:
        return ()
    if config.fp32_modules is None:
        return DEFAULT_FP16_FP32_MODULES if compute_dtype == torch.float16 else ()
    return tuple(config.fp32_modules)


def _fp32_forward(forward, *args, **kwargs):
    """Run ``forward`` in fp32: floating tensor arguments cast up, autocast off (restored afterwards)."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    device_type = tensors[0].device.type if tensors else "cpu"

    def up(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    with torch.autocast(device_type, enabled=False):
        return forward(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})


def keep_in_fp32(model: Any, groups: tuple[str, ...]) -> list[str]:
    """Keep numerically fragile modules in fp32 under fp16/bf16 autocast: their floating parameters are cast to
    fp32 (4-bit weights untouched) and their forward runs with autocast off on fp32 inputs.

    Args:
        model: The (peft) model, after the adapter is attached (so ``modules_to_save`` copies are covered).
        groups: Any of :data:`opsvlm.types.FP32_MODULE_GROUPS`.

    Returns:
        The paths of the modules kept in fp32 (outermost only: a norm inside the vision tower is covered by it).
    """
    import functools

    kept: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        wanted = (
            ("vision" in groups and leaf == "visual")
            or ("lm_head" in groups and leaf == "lm_head")
            or ("norms" in groups and type(module).__name__.endswith(("RMSNorm", "LayerNorm")))
        )
        if not wanted or any(name.startswith(k + ".") for k in kept):
            continue
        for param in module.parameters():
            if (
                param.is_floating_point()
                and param.dtype != torch.float32
                and getattr(param, "quant_state", None) is None
            ):
                param.data = param.data.float()
        module.forward = functools.partial(_fp32_forward, module.forward)
        kept.append(name)
    return kept


def check_trainable_quantization(quantization: str) -> None:
    """Reject a quantization that training does not support (``int8``), naming the alternatives.

    LLM.int8 does load, and a LoRA step on it runs on CPU with bitsandbytes 0.50.2, but training is built for nf4 and
    none only: the memory planner, the ZeRO checks, ``prepare_for_training`` and the loop's device placement. nf4 is
    also smaller than int8 and its matmuls are cheaper than int8's outlier decomposition, so int8 training would buy
    nothing. int8 stays available for inference (quantization study, serving).

    Raises:
        ValueError: ``quantization`` is not one of :data:`opsvlm.model.quant.TRAINING_QUANTIZATIONS`.
    """
    if quantization not in quant.TRAINING_QUANTIZATIONS:
        raise ValueError(
            f"model.quantization={quantization!r} is for inference only (Predictor, quantization study, serving); "
            f"train with one of {list(quant.TRAINING_QUANTIZATIONS)} (nf4 = QLoRA) and evaluate the adapter with "
            f"quantization={quantization!r}"
        )


def check_zero_compat(quantization: str, zero_stage: int) -> None:
    """Reject training setups that cannot work, before any worker starts.

    nf4 with ZeRO-3 is refused by :func:`opsvlm.model.plan.check_zero3_quantization` (the rule's one place); int8 is
    refused for training altogether (:func:`check_trainable_quantization`).

    Args:
        quantization: ``ModelConfig.quantization``.
        zero_stage: DeepSpeed ZeRO stage, 0 (no DeepSpeed / DDP) to 3.

    Raises:
        ValueError: Unknown stage, ``int8``, or ``nf4`` with ZeRO-3.
    """
    check_trainable_quantization(quantization)
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    check_zero3_quantization(quantization, zero_stage)


def nan_advice(compute_dtype: str | torch.dtype) -> str:
    """What to change when the training loop sees a NaN/inf loss.

    Args:
        compute_dtype: The resolved compute dtype (``torch.dtype`` or its name).

    Returns:
        A human-readable recommendation, most likely cause first.
    """
    dtype = _DTYPES.get(compute_dtype, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    # Causes that do not depend on the dtype.
    common = (
        "Also check that the batch has at least one label != -100 (an all-masked batch gives loss 0/0 = NaN), lower "
        "the learning rate, and clip gradients (max_norm=1.0)."
    )
    if dtype == torch.float16:
        return (
            "NaN/inf loss with float16 compute: Qwen2/2.5 activations exceed the fp16 range (65504) in some layers. "
            "Run on a GPU with bf16 (A100, L4, H100: compute_dtype=auto or bfloat16), or on T4 set "
            "model.compute_dtype=float32 (slower, more memory; keep nf4 and gradient_checkpointing=true to fit). "
            "If you train under torch.autocast(float16), use a GradScaler. " + common
        )
    if dtype == torch.bfloat16:
        return "NaN/inf loss with bfloat16 compute is rarely an overflow. " + common
    return f"NaN/inf loss with {dtype} compute is not a precision problem. " + common


def load_processor(source: str | os.PathLike[str]) -> Any:
    """``AutoProcessor.from_pretrained`` on ``"tiny"``, a hub id or a directory."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_source(str(source)))


def _device_of(device_map: Any) -> torch.device:
    """The device a ``from_pretrained(device_map=...)`` call puts the model on (its first one for a dict)."""
    if device_map is None:
        # Unquantized models load on CPU and the trainer moves them; bitsandbytes puts nf4 on the current GPU. Both
        # end up on the GPU if there is one, so that is the device the compute dtype must suit.
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def load_base_model(config: ModelConfig, device_map: Any = None) -> Any:
    """Load the (optionally 4-bit) base model with ``from_pretrained``.

    ``AutoModelForImageTextToText`` routes Qwen2.5-VL checkpoints to ``Qwen2_5_VLForConditionalGeneration`` and
    Qwen2-VL checkpoints to ``Qwen2VLForConditionalGeneration``.

    Args:
        config: Model settings; ``config.name`` is resolved with :func:`opsvlm.testing.tiny.resolve_model_source`.
        device_map: Passed to ``from_pretrained``. For nf4 under DDP give ``{"": local_rank}``; ``None`` puts nf4
            on the current GPU (CPU without one) and an unquantized model on CPU.

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it.

    Raises:
        RuntimeError: nf4 or int8 was requested but the quantization did not take the expected layout.
    """
    from transformers import AutoModelForImageTextToText

    dtype = resolve_compute_dtype(config.compute_dtype, _device_of(device_map))
    model = AutoModelForImageTextToText.from_pretrained(
        resolve_model_source(config.name),
        dtype=dtype,
        quantization_config=quant.bnb_config(config.quantization, dtype),
        attn_implementation=config.attn_implementation,
        device_map=device_map,
    )
    if config.quantization != "none":
        # Cheap guard against the skip list silently not matching (it depends on transformers' module paths).
        quant.check_quantized_layout(model, config.quantization)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """Trainable and total parameters, counting each 4-bit weight as its logical (unpacked) size.

    bitsandbytes stores a 4-bit (out, in) weight as a uint8 tensor of ``out * in / 2`` elements; counting that
    would halve the language model. Tied weights are counted once.

    Returns:
        ``(trainable, total)``.
    """
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _lora_target_names(model: Any, regex: str) -> list[str]:
    # Linear4bit subclasses nn.Linear, so this covers quantized and plain projections alike.
    pattern = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]


def prepare_for_training(model: Any, config: ModelConfig, device_map: Any = None) -> tuple[Any, dict[str, Any]]:
    """Freeze the base, optionally enable activation checkpointing, and attach a LoRA adapter.

    For nf4 this first runs ``peft.prepare_model_for_kbit_training``, which freezes everything and upcasts every
    non-4-bit parameter (vision tower, embeddings/lm_head, norms) to fp32 for numerical stability: the residual
    stream then runs in fp32 and only the 4-bit matmuls in the compute dtype. LoRA weights are fp32 in both modes
    (peft's ``autocast_adapter_dtype``).

    Under fp16/bf16 compute, the groups of ``config.fp32_modules`` are then kept in fp32 (:func:`keep_in_fp32`).

    Args:
        model: From :func:`load_base_model` with the same ``config``.
        config: Model settings.
        device_map: As given to :func:`load_base_model` (decides the compute dtype ``"auto"`` resolves to).

    Returns:
        ``(peft_model, report)``; ``report`` has ``trainable_params``, ``total_params`` (4-bit weights at their
        logical size, as peft's ``get_nb_trainable_parameters`` counts them), ``trainable_fraction``,
        ``quantization``, ``compute_dtype`` (e.g. ``"float16"``), ``target_regex`` and ``lora_modules``
        (number of adapted Linears).

    Raises:
        ValueError: ``config.quantization`` is ``int8`` (inference only) or does not match the model, or
            ``lora.targets`` matches no Linear.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_trainable_quantization(config.quantization)
    if quant.is_quantized(model) != (config.quantization == "nf4"):
        raise ValueError(
            f"model.quantization={config.quantization!r} but the model is "
            f"{'' if quant.is_quantized(model) else 'not '}quantized; load it with load_base_model(config)"
        )
    regex = target_modules_regex(config.lora.targets)
    targets = _lora_target_names(model, regex)
    if not targets:
        raise ValueError(
            f"lora.targets {config.lora.targets!r} matches no Linear module; paths look like "
            "'model.language_model.layers.0.self_attn.q_proj' or 'model.visual.blocks.0.attn.qkv'"
        )
    if config.quantization == "nf4":
        # Checkpointing is enabled below for both modes, with transformers' non-deprecated API.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        # Non-reentrant by default; also makes the embedding output require grad so checkpointed segments that
        # contain only frozen weights still propagate gradients to the LoRA weights before them.
        model.activation_checkpointing_enable()
    lora_config = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=regex,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=list(config.lora.modules_to_save) or None,
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.train()  # from_pretrained leaves eval mode, which would disable LoRA dropout and checkpointing.
    compute_dtype = resolve_compute_dtype(config.compute_dtype, _device_of(device_map))
    fp32_kept = keep_in_fp32(peft_model, fp32_module_groups(config, compute_dtype))
    trainable, total = count_parameters(peft_model)
    report = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "quantization": config.quantization,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "target_regex": regex,
        "lora_modules": len(targets),
        "fp32_modules": len(fp32_kept),
    }
    logger.info(
        "LoRA r=%d on %d modules: %d trainable of %d parameters (%.4f%%), quantization=%s, compute_dtype=%s",
        config.lora.rank,
        len(targets),
        trainable,
        total,
        100 * report["trainable_fraction"],
        config.quantization,
        report["compute_dtype"],
    )
    return peft_model, report


def load_for_inference(
    base_source: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    config: ModelConfig,
    device_map: Any = None,
) -> Any:
    """Load the base (quantized as ``config`` says) with the adapter on top, unmerged, in eval mode.

    Args:
        base_source: ``"tiny"``, hub id or directory of the base the adapter was trained on (overrides
            ``config.name``).
        adapter_dir: Directory written by ``peft_model.save_pretrained``.
        config: Quantization, compute dtype and attention settings; ``lora`` is ignored (the adapter carries its
            own config).
        device_map: As in :func:`load_base_model`.

    Returns:
        A ``peft.PeftModel`` in eval mode with frozen weights.
    """
    from peft import PeftModel

    base = load_base_model(dataclasses.replace(config, name=str(base_source)), device_map=device_map)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def merge_lora(peft_model: Any) -> Any:
    """Merge the active adapter into its (unquantized) base and return the plain transformers model.

    Args:
        peft_model: A ``peft.PeftModel`` over an unquantized base.

    Returns:
        The base model class (e.g. ``Qwen2_5_VLForConditionalGeneration``) with merged weights.

    Raises:
        ValueError: The base is bitsandbytes-quantized. peft would dequantize, add the delta and re-quantize, so the
            merged weights would not be the ones the adapter was trained against; use :func:`merge_adapter`, which
            reloads the base unquantized.
    """
    if quant.is_quantized(peft_model):
        raise ValueError(
            "refusing to merge a LoRA adapter into a 4-bit/8-bit quantized model: the result would be re-quantized "
            "and differ from the trained model. Use merge_adapter(base_source, adapter_dir, out_dir, dtype), which "
            "loads an unquantized base to merge into"
        )
    # safe_merge checks the merged weights for NaN/inf before replacing the originals.
    return peft_model.merge_and_unload(safe_merge=True)


def merge_adapter(
    base_source: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str | torch.dtype,
) -> Path:
    """Merge a LoRA adapter into a freshly loaded, unquantized base and save a standalone checkpoint.

    Works the same for adapters trained with nf4 (QLoRA) or without: the base is always loaded unquantized in
    ``dtype``. The processor is copied from ``base_source`` (LoRA does not change it).

    Args:
        base_source: ``"tiny"``, hub id or directory of the base the adapter was trained on.
        adapter_dir: Directory written by ``peft_model.save_pretrained``.
        out_dir: Where to write the merged model and processor (``save_pretrained``; safetensors).
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``; the merge is computed and saved
            in it. Use float32 on CPU for an exact merge, the training compute dtype otherwise.

    Returns:
        ``out_dir`` as a ``Path``; load it with ``AutoModelForImageTextToText.from_pretrained``.

    Raises:
        ValueError: Unknown ``dtype``, or ``base_source`` is a pre-quantized checkpoint.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)} or a torch.dtype, got {dtype!r}")
        dtype = _DTYPES[dtype]
    source = resolve_model_source(str(base_source))
    # No quantization_config: the base must be full precision (see merge_lora).
    base = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    merged = merge_lora(PeftModel.from_pretrained(base, str(adapter_dir)))
    out = Path(out_dir)
    merged.save_pretrained(out)
    load_processor(source).save_pretrained(out)
    return out
