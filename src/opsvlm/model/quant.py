"""Quantization switch: ``nf4`` (QLoRA) or ``none``. The only opsvlm module that touches bitsandbytes.

``nf4`` is the QLoRA recipe (Dettmers et al. 2023): every Linear of the language model is stored as 4-bit NormalFloat
with double quantization (the per-block absmax constants are themselves quantized), and matmuls run in the compute
dtype (fp16 on T4, bf16 on Ampere+, fp32 on CPU). The vision tower (``model.visual``, including the patch merger)
and ``lm_head`` stay unquantized: the ViT is small next to the language model but sensitive to quantization noise,
and ``lm_head`` is tied to the input embeddings in Qwen2.5-VL-3B.

bitsandbytes is imported lazily inside the functions, so importing this module (and everything that imports it)
stays cheap and works where bitsandbytes is not installed until a 4-bit model is actually requested.

bitsandbytes >= 0.45 has a CPU backend: ``Linear4bit`` really stores packed uint8 weights on CPU and dequantizes in
its forward, so the QLoRA path is exercised for real in CPU tests (slower than CUDA, and without the fused kernels
from the optional ``kernels`` package, which only costs speed).
"""

from __future__ import annotations

from typing import Any

QUANTIZATION_CHOICES: tuple[str, ...] = ("nf4", "none")

# Modules kept in the compute dtype under nf4. transformers 5 matches each entry against every module path with
# re.match anchored at the *start* of the path (or as a suffix of it), per module, not per subtree: "visual" alone
# would only skip the container "model.visual" itself, while its children "model.visual.blocks.0.attn.qkv" would
# still be quantized. Hence the full prefix. Giving an explicit list also drops transformers' default skips, so
# lm_head must be listed too.
SKIP_MODULES: tuple[str, ...] = ("model.visual", "lm_head")


def bnb_config(quantization: str, compute_dtype: Any) -> Any:
    """The ``quantization_config`` to pass to ``from_pretrained``.

    Args:
        quantization: ``"nf4"`` or ``"none"``.
        compute_dtype: ``torch.dtype`` the 4-bit matmuls run in (``torch.float16`` on T4, ``torch.bfloat16`` on
            Ampere+, ``torch.float32`` on CPU).

    Returns:
        A ``transformers.BitsAndBytesConfig`` for ``"nf4"``; ``None`` for ``"none"``.

    Raises:
        ValueError: Unknown ``quantization``.
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_CHOICES)}, got {quantization!r}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        # Quantize the absmax constants too: ~0.37 bit/param saved (QLoRA paper, section 3) at no measurable cost.
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


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


def check_quantized_layout(model: Any) -> list[str]:
    """Verify an nf4 model: some language Linears are 4-bit, nothing under :data:`SKIP_MODULES` is.

    Args:
        model: A model loaded with :func:`bnb_config` ``("nf4", ...)``.

    Returns:
        The quantized module paths.

    Raises:
        RuntimeError: Nothing was quantized, or a module meant to stay unquantized was quantized (e.g. because
            transformers changed how ``llm_int8_skip_modules`` is matched).
    """
    names = quantized_module_names(model)
    if not names:
        raise RuntimeError("nf4 requested but the loaded model has no bitsandbytes Linear4bit module")
    leaked = [n for n in names if any(n == s or n.startswith(s + ".") for s in SKIP_MODULES)]
    if leaked:
        raise RuntimeError(f"modules meant to stay unquantized were quantized: {leaked[:5]} (skip list {SKIP_MODULES})")
    return names


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
