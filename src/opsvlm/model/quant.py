"""Quantization switch: ``nf4`` (QLoRA), ``int8`` (LLM.int8, inference only) or ``none``. The only opsvlm module that
touches bitsandbytes.

``nf4`` is the QLoRA recipe (Dettmers et al. 2023): every Linear of the language model is stored as 4-bit NormalFloat
with double quantization (the per-block absmax constants are themselves quantized), and matmuls run in the compute
dtype (fp16 on T4, bf16 on Ampere+, fp32 on CPU). The vision tower (``model.visual``, including the patch merger)
and ``lm_head`` stay unquantized: the ViT is small next to the language model but sensitive to quantization noise,
and ``lm_head`` is tied to the input embeddings in Qwen2.5-VL-3B.

``int8`` is LLM.int8 (Dettmers et al. 2022) on the same modules: each weight row is stored as int8 with one fp32
absmax scale (``SCB``); at run time activations are quantized per row to int8 too, except the columns holding
outliers above ``llm_int8_threshold`` (6.0), which are multiplied in fp16 (mixed-precision decomposition). It exists
for the quantization study and serving (``Predictor.from_checkpoint(..., quantization="int8")``); training refuses it
(:data:`TRAINING_QUANTIZATIONS`, enforced by ``opsvlm.model.build.check_zero_compat``): nf4 is smaller and is what
the memory planner, the ZeRO checks and the training loop are written for.

bitsandbytes is imported lazily inside the functions, so importing this module (and everything that imports it)
stays cheap and works where bitsandbytes is not installed until a quantized model is actually requested.

bitsandbytes >= 0.45 has a CPU backend: ``Linear4bit`` really stores packed uint8 weights on CPU and dequantizes in
its forward, and ``Linear8bitLt`` stores int8 weights and runs the int8 matmul (checked with bitsandbytes 0.50.2:
load, forward, ``generate`` and a LoRA adapter on top all work on CPU), so both paths are exercised for real in CPU
tests (slower than CUDA, and without the fused kernels from the optional ``kernels`` package, which only costs
speed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from opsvlm.types import QUANTIZATIONS, TRAINING_QUANTIZATIONS

__all__ = [
    "QUANTIZATION_CHOICES",
    "SKIP_MODULES",
    "TRAINING_QUANTIZATIONS",
    "bnb_config",
    "bnb_optimizer",
    "check_quantized_layout",
    "is_quantized",
    "quant_state_tensors",
    "quantized_module_names",
    "unavailable_reason",
]

QUANTIZATION_CHOICES = QUANTIZATIONS  # the choices live in opsvlm.types; the old name stays for callers
# What training accepts (TRAINING_QUANTIZATIONS): int8 loads and even takes LoRA steps on CPU, but nothing in training
# is built for it (see the module docstring), so it is refused up front instead of half-working.

# Modules kept in the compute dtype under nf4 and int8. transformers 5 matches each entry against every module path with
# re.match anchored at the *start* of the path (or as a suffix of it), per module, not per subtree: "visual" alone
# would only skip the container "model.visual" itself, while its children "model.visual.blocks.0.attn.qkv" would
# still be quantized. Hence the full prefix. Giving an explicit list also drops transformers' default skips, so
# lm_head must be listed too.
SKIP_MODULES: tuple[str, ...] = ("model.visual", "lm_head")


def bnb_config(quantization: str, compute_dtype: Any) -> Any:
    """The ``quantization_config`` to pass to ``from_pretrained``.

    Args:
        quantization: ``"nf4"``, ``"int8"`` or ``"none"``.
        compute_dtype: ``torch.dtype`` the 4-bit matmuls run in (``torch.float16`` on T4, ``torch.bfloat16`` on
            Ampere+, ``torch.float32`` on CPU). Not used by int8, whose matmuls are int8 with fp16 outliers.

    Returns:
        A ``transformers.BitsAndBytesConfig`` for ``"nf4"`` and ``"int8"``; ``None`` for ``"none"``.

    Raises:
        ValueError: Unknown ``quantization``.
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_CHOICES)}, got {quantization!r}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        _silence_int8_cast_warning()
        # llm_int8_threshold stays at its default 6.0 (the paper's outlier threshold): 0 would quantize outlier
        # columns too, which is what degrades large models.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        # Quantize the absmax constants too: ~0.37 bit/param saved (QLoRA paper, section 3) at no measurable cost.
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


class _DropInt8CastWarning(logging.Filter):
    """Drops bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" record.

    LLM.int8 always quantizes activations from fp16, so with fp32 (CPU) or bf16 compute every single 8-bit matmul
    logs it: thousands of identical lines per generate call, burying real warnings. The cast is by design.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _silence_int8_cast_warning() -> None:
    """Install :class:`_DropInt8CastWarning` on bitsandbytes' matmul logger (once; only when int8 is requested)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())


def _quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' quantized Linear classes, or ``()`` if bitsandbytes is not installed (then nothing is)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def quantized_module_names(model: Any) -> list[str]:
    """Paths of the bitsandbytes-quantized Linear modules in ``model`` (a transformers or peft model).

    peft wraps a quantized Linear as ``<path>.base_layer``; those paths are returned as they appear.
    """
    types = _quantized_linear_types()
    if not types:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def is_quantized(model: Any) -> bool:
    """Whether ``model`` (transformers or peft) holds any bitsandbytes 4-bit or 8-bit weights."""
    # The loader's flags are cheap and also cover a model whose layers were already swapped; the module scan covers
    # peft wrappers and models quantized by hand.
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return bool(quantized_module_names(model))


def _linear_type(quantization: str) -> type:
    import bitsandbytes as bnb

    return {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[quantization]


def check_quantized_layout(model: Any, quantization: str = "nf4") -> list[str]:
    """Verify a quantized model: some language Linears have the mode's bitsandbytes type, nothing under
    :data:`SKIP_MODULES` is quantized, and no Linear has the other mode's type.

    Args:
        model: A transformers model loaded with :func:`bnb_config` ``(quantization, ...)`` (module paths as
            transformers names them, not under a peft wrapper).
        quantization: ``"nf4"`` (expects ``Linear4bit``) or ``"int8"`` (expects ``Linear8bitLt``).

    Returns:
        The quantized module paths.

    Raises:
        ValueError: ``quantization`` is not ``nf4`` or ``int8``.
        RuntimeError: Nothing was quantized, a module meant to stay unquantized was quantized (e.g. because
            transformers changed how ``llm_int8_skip_modules`` is matched), or modules of the wrong type are present.
    """
    if quantization not in ("nf4", "int8"):
        raise ValueError(f"check_quantized_layout: quantization must be 'nf4' or 'int8', got {quantization!r}")
    names = quantized_module_names(model)
    expected = _linear_type(quantization)
    modules = dict(model.named_modules())
    if not any(isinstance(modules[n], expected) for n in names):
        raise RuntimeError(
            f"{quantization} requested but the loaded model has no bitsandbytes {expected.__name__} module"
        )
    wrong = [n for n in names if not isinstance(modules[n], expected)]
    if wrong:
        raise RuntimeError(
            f"{quantization} requested but these modules are {type(modules[wrong[0]]).__name__}: {wrong[:5]}"
        )
    leaked = [n for n in names if any(n == s or n.startswith(s + ".") for s in SKIP_MODULES)]
    if leaked:
        raise RuntimeError(f"modules meant to stay unquantized were quantized: {leaked[:5]} (skip list {SKIP_MODULES})")
    return names


def quant_state_tensors(module: Any) -> Iterator[Any]:
    """Tensors of bitsandbytes quantization state held by ``module``'s own parameters (not its children's).

    These are not parameters or buffers, so ``model.parameters()`` (and transformers' ``get_memory_footprint``) miss
    them: nf4 keeps a ``QuantState`` (uint8 absmax per 64-weight block, the 16-value NF4 code, and with double
    quantization the fp32 absmax and code of the absmax), int8 an fp32 absmax per weight row (``SCB``, on the weight
    until the first forward, then on the module's matmul state).

    Args:
        module: Any ``torch.nn.Module``.

    Yields:
        The state tensors (may repeat a tensor also reachable elsewhere; callers deduplicate by storage).
    """
    for param in module.parameters(recurse=False):
        state = getattr(param, "quant_state", None)
        while state is not None:  # QuantState; state2 is the nested (double-quantization) state
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if value is not None and hasattr(value, "untyped_storage"):
                    yield value
            state = getattr(state, "state2", None)
        scb = getattr(param, "SCB", None)
        if scb is not None:
            yield scb
    # Linear8bitLt moves SCB (and CB, which is the weight's own int8 data) from the weight to its matmul state on
    # the first forward.
    matmul_state = getattr(module, "state", None)
    scb = getattr(matmul_state, "SCB", None)
    if scb is not None and hasattr(scb, "untyped_storage"):
        yield scb


def unavailable_reason(quantization: str, device: Any) -> str | None:
    """Why ``quantization`` cannot run on ``device`` here, or ``None`` if it can.

    Runs a real bitsandbytes Linear of the mode on the device (a 64x64 layer, one forward) instead of trusting version
    tables: backends differ by device and version (CUDA, ROCm, XPU, the CPU backend since 0.45) and a missing kernel
    only shows when called.

    Args:
        quantization: One of :data:`QUANTIZATION_CHOICES`.
        device: ``torch.device`` (or its name) the model would run on.

    Returns:
        ``None``, or a one-line reason (bitsandbytes missing, or the exception the probe raised).

    Raises:
        ValueError: Unknown ``quantization``.
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_CHOICES)}, got {quantization!r}")
    if quantization == "none":
        return None
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); {quantization} needs it"
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(64, 64, dtype=dtype)
        if quantization == "int8":
            _silence_int8_cast_warning()
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(plain.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type="nf4")
        layer.bias = plain.bias
        layer = layer.to(device)
        with torch.no_grad():
            out = layer(torch.randn(2, 64, dtype=dtype, device=device))
        if not torch.isfinite(out).all():
            return f"bitsandbytes {bnb.__version__} {quantization} on {device} gives non-finite outputs"
    except Exception as exc:  # any failure of the probe is the reason the mode cannot run here
        return f"bitsandbytes {bnb.__version__} cannot run {quantization} on {device}: {type(exc).__name__}: {exc}"
    return None


def bnb_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> Any:
    """A bitsandbytes 8-bit AdamW: ``adamw_8bit`` or ``paged_adamw_8bit`` (states paged to CPU under GPU memory
    pressure, the QLoRA paper's remedy for optimizer-state spikes on 16 GB cards).

    Raises:
        ValueError: Unknown optimizer name.
    """
    import bitsandbytes as bnb

    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    if name not in optimizers:
        raise ValueError(f"optim.optimizer must be one of {sorted(optimizers)} for bitsandbytes, got {name!r}")
    return optimizers[name](params, lr=lr, weight_decay=weight_decay)
