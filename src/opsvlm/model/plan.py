"""Per-GPU memory planner for LoRA / QLoRA fine-tuning of Qwen2-VL and Qwen2.5-VL on video clips.

Pure Python: no torch, no network. Given a model (a known hub id, whose ``config.json`` ships with the package, or
a local directory with a ``config.json``), a GPU type and a training setup, :func:`plan_memory` estimates the memory
one GPU needs, split into weights, adapters, gradients, optimizer states, language-model activations, vision-tower
activations ("vision tokens") and overhead, and recommends a micro-batch and gradient accumulation for a target
global batch. ``jobs/train.py`` refuses a plan whose ``fits`` is false before it starts any worker.

Usage::

    from opsvlm.model.plan import PlanInputs, plan_memory

    plan = plan_memory(PlanInputs(model="Qwen/Qwen2.5-VL-3B-Instruct", gpu="T4", quantization="nf4"))
    if not plan.fits:
        raise SystemExit(format_plan(plan))

How exact is it?

* Parameter counts are exact: :func:`count_parameters` reproduces ``sum(p.numel())`` of the real transformers
  classes instantiated on the meta device (checked in ``tests/unit/test_plan.py`` for Qwen2-VL-2B, Qwen2.5-VL-3B and
  -7B), and :func:`lora_trainable_params` equals what peft creates for the same ``target_modules`` regex.
* Memory is an estimate from first principles (see "Memory model" below); every constant lives in that one section
  with the reason for its value. It has not been calibrated on a GPU yet, so when CUDA is present the training job
  logs the measured peak next to it (:func:`peak_report`). It errs on the large side: a plan that fits should run.

Module paths (for LoRA target regexes) are those of transformers 5.x, e.g.
``model.language_model.layers.0.self_attn.q_proj``, ``model.visual.blocks.0.attn.qkv``,
``model.visual.merger.mlp.0`` and ``lm_head``. A regex is matched with :func:`re.fullmatch` against each path, the
same rule peft applies when ``target_modules`` is a string.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from opsvlm.config import check_choices
from opsvlm.types import Optimizer, PlanDtype, TrainingQuantization, ZeroStage

GIB = 1024**3
MIB = 1024**2


class PlanError(ValueError):
    """An invalid or unsupported planning request (bad input, unknown model or GPU, unsupported combination)."""


# ---------------------------------------------------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type.

    Attributes:
        name: Canonical name used in configs (``"T4"``, ``"A100-80"``...).
        memory_bytes: Total device memory as nvidia-smi reports it (what the CUDA allocator can ever see, before the
            CUDA context takes its share; the context is counted separately as overhead).
        bf16: Whether the GPU computes in bfloat16. T4 (Turing, sm75) does not, so training there runs in fp16.
    """

    name: str
    memory_bytes: int
    bf16: bool


# nvidia-smi "Total" values; marketing "16 GB" on a T4 is 15360 MiB, an A10G's "24 GB" is 23028 MiB.
GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("T4", 15360 * MIB, bf16=False),
        GpuSpec("A10G", 23028 * MIB, bf16=True),
        GpuSpec("L4", 23034 * MIB, bf16=True),
        GpuSpec("A100-40", 40960 * MIB, bf16=True),
        GpuSpec("A100-80", 81920 * MIB, bf16=True),
        GpuSpec("H100-80", 81559 * MIB, bf16=True),
    )
}

# Other spellings people type; "A100" alone is ambiguous (40 or 80 GB) and deliberately not an alias.
_GPU_ALIASES = {"H100": "H100-80", "A10": "A10G"}


def resolve_gpu(name: str) -> GpuSpec:
    """Look a GPU type up by name, case-insensitively (``"a100-80gb"``, ``"A100_80"`` and ``"A100-80"`` agree).

    Args:
        name: GPU type.

    Returns:
        The :class:`GpuSpec`.

    Raises:
        PlanError: Unknown GPU; the message lists the known ones.
    """
    key = str(name).strip().upper().replace("_", "-").replace(" ", "-")
    key = re.sub(r"-?GB$", "", key)
    key = _GPU_ALIASES.get(key, key)
    if key not in GPUS:
        hint = " (A100 comes with 40 or 80 GB: say which)" if key == "A100" else ""
        raise PlanError(f"unknown GPU type {name!r}{hint}; known GPU types: {', '.join(GPUS)}")
    return GPUS[key]


# ---------------------------------------------------------------------------------------------------------------------
# Model configs: known hub ids ship with the package (no hub access at run time), or a local directory
# ---------------------------------------------------------------------------------------------------------------------

# Hub id -> file in ``known_configs/``. The files are the published config.json of each Hugging Face repository
# (legacy flat layout, as first uploaded). For the Qwen2-VL models that upload spells out the ViT's depth, embed_dim
# and mlp_ratio, which later uploads drop in favour of the transformers defaults (the same values). The 32B and 72B
# ViTs have intermediate_size 3456 where 3B/7B have 3420. Each file reproduces its published parameter count
# (2.21B, 8.29B, 3.75B, 8.29B, 33.5B, 73.4B), see tests/unit/test_plan.py.
KNOWN_MODELS: dict[str, str] = {
    "Qwen/Qwen2-VL-2B-Instruct": "Qwen2-VL-2B-Instruct.json",
    "Qwen/Qwen2-VL-7B-Instruct": "Qwen2-VL-7B-Instruct.json",
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B-Instruct.json",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL-7B-Instruct.json",
    "Qwen/Qwen2.5-VL-32B-Instruct": "Qwen2.5-VL-32B-Instruct.json",
    "Qwen/Qwen2.5-VL-72B-Instruct": "Qwen2.5-VL-72B-Instruct.json",
}


def _known_model_file(model: str) -> str | None:
    """The shipped config file for a hub id (``Qwen/...`` or the bare repository name), case-insensitively."""
    wanted = model.strip().strip("/").lower()
    for hub_id, filename in KNOWN_MODELS.items():
        if wanted in (hub_id.lower(), hub_id.split("/", 1)[1].lower()):
            return filename
    return None


def load_model_config(model: str) -> dict[str, Any]:
    """Return the ``config.json`` contents of a model, without touching the network.

    Resolution order: a local directory containing ``config.json``; a path to a ``.json`` file; a known hub id
    (:data:`KNOWN_MODELS`, shipped with the package). A local directory wins over a hub id of the same spelling, so a
    downloaded snapshot is always read from disk.

    Args:
        model: Hub id (``"Qwen/Qwen2.5-VL-3B-Instruct"``) or a local model directory.

    Returns:
        The parsed config as a dict.

    Raises:
        PlanError: Nothing matched; the message says what was tried.
    """
    if not isinstance(model, str) or not model.strip():
        raise PlanError("model must be a hub id or a local directory, got an empty value")
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise PlanError(f"model directory {str(path)!r} has no config.json")
        return _read_json(config_path)
    if path.is_file() and path.suffix == ".json":
        return _read_json(path)
    filename = _known_model_file(model)
    if filename is not None:
        text = resources.files("opsvlm.model").joinpath("known_configs", filename).read_text(encoding="utf-8")
        return json.loads(text)
    raise PlanError(
        f"cannot resolve model {model!r}: {str(path.resolve())!r} is not a directory with a config.json, and it is "
        f"not a known hub id ({', '.join(KNOWN_MODELS)}); hub configs are not downloaded at run time, so pass a "
        f"local snapshot directory for other models"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"cannot read model config {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise PlanError(f"model config {str(path)!r} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Architecture: the dimensions that matter, read from config.json the way transformers 5.x reads them
# ---------------------------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

# Defaults of Qwen2VLTextConfig / Qwen2_5_VLTextConfig (transformers 5.x) for keys a config.json leaves out, so an
# abbreviated local config is sized like the model transformers would build from it.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
# Vision defaults per family. Note "hidden_size" means different things: Qwen2.5-VL's is the ViT width, Qwen2-VL's
# is the merger's output (= language width) and its ViT width is "embed_dim".
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "depth": 32,
        "hidden_size": 3584,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 3584,
    },
    "qwen2_vl": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


@dataclass(frozen=True)
class ModelArch:
    """The dimensions of a Qwen2-VL / Qwen2.5-VL model that parameter counts and memory depend on.

    Attributes:
        family: ``"qwen2_5_vl"`` or ``"qwen2_vl"``.
        hidden_size: Language model width.
        intermediate_size: Language MLP width (SwiGLU).
        num_layers: Language decoder layers.
        num_heads: Query heads; head_dim is ``hidden_size // num_heads`` as in the transformers attention.
        num_kv_heads: Key/value heads (GQA).
        vocab_size: Vocabulary (embedding rows and lm_head outputs).
        tie_word_embeddings: lm_head shares the embedding matrix (2B/3B models).
        vision_depth: ViT blocks.
        vision_width: ViT width (Qwen2.5-VL ``hidden_size``, Qwen2-VL ``embed_dim``).
        vision_mlp: ViT MLP width (Qwen2.5-VL ``intermediate_size``; Qwen2-VL ``embed_dim * mlp_ratio``).
        vision_heads: ViT heads.
        in_channels: Image channels.
        patch_size: Spatial patch size (14).
        temporal_patch_size: Frames per temporal patch (2).
        spatial_merge_size: Patches merged per side into one language token (2, i.e. 2x2 patches per token).
        vision_out: Merger output width (= ``hidden_size``).
    """

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_width: int
    vision_mlp: int
    vision_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    vision_out: int

    @property
    def head_dim(self) -> int:
        """Attention head width of the language model."""
        return self.hidden_size // self.num_heads

    @property
    def vision_gated_mlp(self) -> bool:
        """Qwen2.5-VL's ViT uses a SwiGLU MLP with RMSNorm; Qwen2-VL's a fc1/QuickGELU/fc2 MLP with LayerNorm."""
        return self.family == "qwen2_5_vl"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArch:
        """Read the dimensions from a ``config.json`` dict (flat legacy layout or nested ``text_config``).

        Args:
            config: Parsed config.json.

        Returns:
            The architecture.

        Raises:
            PlanError: Not a Qwen2-VL / Qwen2.5-VL config, or dimensions that make no sense.
        """
        family = _model_family(config)
        # Legacy files keep text keys at the top level; files saved by newer transformers nest them in text_config
        # (and may keep stale top-level copies), so text_config wins.
        text = {k: v for k, v in config.items() if k not in ("vision_config", "text_config")}
        nested = config.get("text_config")
        if isinstance(nested, Mapping):
            text.update(nested)
        text = {**_TEXT_DEFAULTS, **text}
        if text["num_key_value_heads"] is None:  # transformers: an explicit null means one KV head per query head
            text["num_key_value_heads"] = text["num_attention_heads"]
        # transformers ties if either the top level or the text config says so.
        tie = bool(config.get("tie_word_embeddings", False)) or bool(
            isinstance(nested, Mapping) and nested.get("tie_word_embeddings", False)
        )

        vision_raw = config.get("vision_config") or {}
        if not isinstance(vision_raw, Mapping):
            raise PlanError("config.json vision_config is not an object")
        vision = {**_VISION_DEFAULTS[family], **{k: v for k, v in vision_raw.items() if v is not None}}
        if "in_channels" not in vision_raw and "in_chans" in vision_raw:
            vision["in_channels"] = vision_raw["in_chans"]
        if family == "qwen2_5_vl":
            width, mlp, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
        else:
            width, out = vision["embed_dim"], vision["hidden_size"]
            mlp = int(width * vision["mlp_ratio"])  # transformers: int(config.embed_dim * config.mlp_ratio)

        try:
            arch = cls(
                family=family,
                hidden_size=int(text["hidden_size"]),
                intermediate_size=int(text["intermediate_size"]),
                num_layers=int(text["num_hidden_layers"]),
                num_heads=int(text["num_attention_heads"]),
                num_kv_heads=int(text["num_key_value_heads"]),
                vocab_size=int(text["vocab_size"]),
                tie_word_embeddings=tie,
                vision_depth=int(vision["depth"]),
                vision_width=int(width),
                vision_mlp=int(mlp),
                vision_heads=int(vision["num_heads"]),
                in_channels=int(vision["in_channels"]),
                patch_size=_scalar(vision["patch_size"]),
                temporal_patch_size=_scalar(vision["temporal_patch_size"]),
                spatial_merge_size=int(vision["spatial_merge_size"]),
                vision_out=int(out),
            )
        except (TypeError, ValueError) as err:
            raise PlanError(f"config.json has a non-numeric dimension: {err}") from err
        if min(arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.vocab_size) < 1:
            raise PlanError("config.json dimensions must be positive")
        if arch.hidden_size % arch.num_heads or arch.num_heads % arch.num_kv_heads:
            raise PlanError(
                f"config.json: hidden_size {arch.hidden_size} must divide by num_attention_heads {arch.num_heads}, "
                f"which must divide by num_key_value_heads {arch.num_kv_heads}"
            )
        return arch


def _model_family(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        architectures = " ".join(config.get("architectures") or [])
        if "Qwen2_5_VL" in architectures:
            model_type = "qwen2_5_vl"
        elif "Qwen2VL" in architectures:
            model_type = "qwen2_vl"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PlanError(
            f"unsupported model_type {model_type!r}; the planner knows {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(Qwen2-VL and Qwen2.5-VL)"
        )
    return str(model_type)


def _scalar(value: Any) -> int:
    """patch sizes may be written as ``[14, 14]``; the models only use square patches."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    return int(value)


# ---------------------------------------------------------------------------------------------------------------------
# Parameters: every Linear module by its transformers 5.x path, plus the parameters outside Linear layers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear`` of the model.

    Attributes:
        path: Module path as ``model.named_modules()`` reports it in transformers 5.x.
        in_features: Input width.
        out_features: Output width.
        bias: Whether it has a bias.
        part: ``"vision"``, ``"language"`` (decoder layers) or ``"lm_head"``.
        shared: The weight is another module's (tied lm_head): present for LoRA matching, not counted twice.
    """

    path: str
    in_features: int
    out_features: int
    bias: bool
    part: str
    shared: bool = False

    @property
    def weight_params(self) -> int:
        """Elements of the weight matrix."""
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        """Own parameters (weight + bias), 0 for a shared weight."""
        return 0 if self.shared else self.weight_params + (self.out_features if self.bias else 0)


def linear_modules(arch: ModelArch) -> list[LinearSpec]:
    """Enumerate the model's Linear modules with their real module paths and shapes.

    Args:
        arch: The architecture.

    Returns:
        Vision blocks and merger, language decoder layers, then ``lm_head``.
    """
    out: list[LinearSpec] = []
    d, m = arch.vision_width, arch.vision_mlp
    for b in range(arch.vision_depth):
        p = f"model.visual.blocks.{b}."
        out.append(LinearSpec(p + "attn.qkv", d, 3 * d, True, "vision"))
        out.append(LinearSpec(p + "attn.proj", d, d, True, "vision"))
        if arch.vision_gated_mlp:
            out.append(LinearSpec(p + "mlp.gate_proj", d, m, True, "vision"))
            out.append(LinearSpec(p + "mlp.up_proj", d, m, True, "vision"))
            out.append(LinearSpec(p + "mlp.down_proj", m, d, True, "vision"))
        else:
            out.append(LinearSpec(p + "mlp.fc1", d, m, True, "vision"))
            out.append(LinearSpec(p + "mlp.fc2", m, d, True, "vision"))
    merged = d * arch.spatial_merge_size**2  # 2x2 neighbouring patches are concatenated before the merger MLP
    out.append(LinearSpec("model.visual.merger.mlp.0", merged, merged, True, "vision"))
    out.append(LinearSpec("model.visual.merger.mlp.2", merged, arch.vision_out, True, "vision"))

    h, i = arch.hidden_size, arch.intermediate_size
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    for layer in range(arch.num_layers):
        p = f"model.language_model.layers.{layer}."
        # Qwen2 attention: q/k/v carry biases, o_proj does not; the MLP has no biases.
        out.append(LinearSpec(p + "self_attn.q_proj", h, q_dim, True, "language"))
        out.append(LinearSpec(p + "self_attn.k_proj", h, kv_dim, True, "language"))
        out.append(LinearSpec(p + "self_attn.v_proj", h, kv_dim, True, "language"))
        out.append(LinearSpec(p + "self_attn.o_proj", q_dim, h, False, "language"))
        out.append(LinearSpec(p + "mlp.gate_proj", h, i, False, "language"))
        out.append(LinearSpec(p + "mlp.up_proj", h, i, False, "language"))
        out.append(LinearSpec(p + "mlp.down_proj", i, h, False, "language"))
    out.append(LinearSpec("lm_head", h, arch.vocab_size, False, "lm_head", shared=arch.tie_word_embeddings))
    return out


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts, equal to ``sum(p.numel())`` over the matching transformers modules.

    Attributes:
        total: Whole model (a tied lm_head counted once).
        vision: ``model.visual`` (patch embed, blocks, merger).
        language: ``model.language_model`` (embeddings, decoder layers, final norm).
        lm_head: Own lm_head parameters (0 when tied to the embeddings).
        quantized: Weights bitsandbytes stores in 4 bit under our QLoRA policy: the Linear weights of the language
            decoder layers. Embeddings, norms, biases, lm_head and the whole vision tower stay in compute dtype.
        largest_quantized_linear: Elements of the largest such weight (its 16-bit dequantized copy is transient).
        largest_layer: Parameters of the largest decoder layer or vision block (what ZeRO-3 gathers at once).
    """

    total: int
    vision: int
    language: int
    lm_head: int
    quantized: int
    largest_quantized_linear: int
    largest_layer: int


def count_parameters(arch: ModelArch) -> ParamCounts:
    """Count parameters analytically from the config.

    Args:
        arch: The architecture.

    Returns:
        The counts.
    """
    linears = linear_modules(arch)
    d, h = arch.vision_width, arch.hidden_size
    # Conv3d patch embedding without bias: out=d, in=channels, kernel=temporal x patch x patch.
    patch_embed = d * arch.in_channels * arch.temporal_patch_size * arch.patch_size**2
    # RMSNorm has a weight; LayerNorm (Qwen2-VL ViT) a weight and a bias. Two per block, one in the merger.
    norm = d if arch.vision_gated_mlp else 2 * d
    vision_norms = (2 * arch.vision_depth + 1) * norm
    vision = patch_embed + vision_norms + sum(s.params for s in linears if s.part == "vision")
    # Embedding, two RMSNorms per decoder layer, the final RMSNorm.
    language = arch.vocab_size * h + (2 * arch.num_layers + 1) * h
    language += sum(s.params for s in linears if s.part == "language")
    lm_head = sum(s.params for s in linears if s.part == "lm_head")
    language_linears = [s for s in linears if s.part == "language"]
    layer_params = sum(s.params for s in language_linears[:7]) + 2 * h
    block_params = sum(s.params for s in linears[: 5 if arch.vision_gated_mlp else 4]) + 2 * norm
    return ParamCounts(
        total=vision + language + lm_head,
        vision=vision,
        language=language,
        lm_head=lm_head,
        quantized=sum(s.weight_params for s in language_linears),
        largest_quantized_linear=max(s.weight_params for s in language_linears),
        largest_layer=max(layer_params, block_params),
    )


# ---------------------------------------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------------------------------------

_LANGUAGE_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_VISION_TARGETS = (
    r"model\.visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))|merger\.mlp\.(0|2))"
)
# Named presets, usable as peft ``target_modules`` strings (peft applies re.fullmatch to module paths, as we do).
LORA_TARGET_PRESETS: dict[str, str] = {
    # Every projection of every decoder layer; the vision tower stays frozen (and is not quantized, see weights).
    "language": _LANGUAGE_TARGETS,
    # Plus the ViT attention/MLP projections and the vision-to-language merger; lm_head stays frozen.
    "language_vision": f"(?:{_LANGUAGE_TARGETS})|(?:{_VISION_TARGETS})",
}


def resolve_lora_targets(targets: str) -> str:
    """Turn a preset name or a regex into the regex that selects LoRA target modules.

    Args:
        targets: ``"language"``, ``"language_vision"`` or a regex over module paths.

    Returns:
        The regex.

    Raises:
        PlanError: Not a preset and not a valid regex.
    """
    regex = LORA_TARGET_PRESETS.get(targets, targets)
    try:
        re.compile(regex)
    except re.error as err:
        raise PlanError(
            f"lora_targets {targets!r} is neither a preset ({', '.join(LORA_TARGET_PRESETS)}) nor a valid regex: {err}"
        ) from err
    return regex


def lora_target_modules(arch: ModelArch, targets: str) -> list[LinearSpec]:
    """The Linear modules a LoRA target spec selects (``re.fullmatch`` on the module path, like peft).

    Args:
        arch: The architecture.
        targets: Preset name or regex.

    Returns:
        The selected modules.

    Raises:
        PlanError: The spec selects no Linear module.
    """
    pattern = re.compile(resolve_lora_targets(targets))
    selected = [s for s in linear_modules(arch) if pattern.fullmatch(s.path)]
    if not selected:
        raise PlanError(
            f"lora_targets {targets!r} matches no Linear module; paths look like "
            f"'model.language_model.layers.0.self_attn.q_proj', 'model.visual.blocks.0.attn.qkv' or 'lm_head'"
        )
    return selected


def lora_trainable_params(arch: ModelArch, targets: str, rank: int) -> int:
    """Trainable parameters LoRA adds: ``rank * (in + out)`` per targeted Linear (A is r x in, B is out x r).

    Args:
        arch: The architecture.
        targets: Preset name or regex.
        rank: LoRA rank.

    Returns:
        The number of trainable parameters (the base model is frozen).
    """
    return sum(rank * (s.in_features + s.out_features) for s in lora_target_modules(arch, targets))


# ---------------------------------------------------------------------------------------------------------------------
# Visual tokens
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionGrid:
    """How a clip becomes patches and language tokens.

    Attributes:
        height: Frame height after rounding to a multiple of patch*merge (28), as the Qwen processor does.
        width: Frame width after the same rounding.
        temporal_groups: ``ceil(frames / temporal_patch_size)``; an odd frame count is padded by repeating the last.
        patches: Patches the ViT sees per clip (``temporal_groups * (H/14) * (W/14)``).
        tokens: Language tokens per clip after the 2x2 merge (``patches / 4``).
    """

    height: int
    width: int
    temporal_groups: int
    patches: int
    tokens: int


def vision_grid(arch: ModelArch, frames: int, height: int, width: int) -> VisionGrid:
    """Compute patches and visual tokens for one clip: tokens = (T/2) * (H/14) * (W/14) / 4.

    Args:
        arch: The architecture (patch 14, temporal patch 2, merge 2 for all supported models).
        frames: Frames per clip.
        height: Frame height in pixels.
        width: Frame width in pixels.

    Returns:
        The grid.
    """
    factor = arch.patch_size * arch.spatial_merge_size
    # smart_resize rounds each side to the nearest multiple of patch*merge (Python round, as in the processor).
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    groups = math.ceil(frames / arch.temporal_patch_size)
    patches = groups * (h // arch.patch_size) * (w // arch.patch_size)
    return VisionGrid(h, w, groups, patches, patches // arch.spatial_merge_size**2)


# ---------------------------------------------------------------------------------------------------------------------
# Memory model: every constant and formula the estimate uses, with the reason for it
# ---------------------------------------------------------------------------------------------------------------------

# Compute dtype: bf16, or fp16 on GPUs without bf16 (T4). Both 2 bytes.
HALF_BYTES = 2
FP32_BYTES = 4

# NF4 with double quantization (QLoRA paper, Dettmers et al. 2023, section 3): 4 bits per weight, one 8-bit absmax
# per block of 64 weights, one fp32 constant per 256 such blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)

# Adapters and their gradients: peft keeps LoRA weights in fp32 when the base is 16-bit or 4-bit
# (autocast_adapter_dtype), so plain PyTorch training (ZeRO 0) holds 4-byte weights and 4-byte gradients.
ADAPTER_BYTES = FP32_BYTES
GRADIENT_BYTES = FP32_BYTES
# AdamW keeps two fp32 moments (8 bytes/param); bitsandbytes 8-bit AdamW two 8-bit moments (2 bytes, block constants
# negligible). The paged variant has the same size; paging to CPU only helps at spikes, so it is not credited.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
# DeepSpeed (ZeRO 2/3) casts the module to the compute dtype and keeps an fp32 master copy of every trainable param in
# the optimizer partition; gradients are kept as a 16-bit partition plus an fp32 copy for the step.
ZERO_MASTER_BYTES = FP32_BYTES
ZERO_GRADIENT_BYTES = HALF_BYTES + FP32_BYTES

# Activations: what autograd saves, in bytes per token (language) or per patch (vision), for 16-bit activations with
# SDPA/flash attention (no sequence^2 attention matrix is stored). The accounting follows Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models" (their 34*s*b*h per GPT layer), redone for these
# layers and checked on CPU by summing the tensors autograd saves (saved_tensors_hooks) for a small Qwen2.5-VL and
# Qwen2-VL with peft LoRA: per token, decoder layers matched these terms to 0.5% (with k/v at kv width, see below),
# ViT blocks + merger to 4% (at a tiny width where the fixed per-patch terms weigh more). A frozen Linear saves nothing
# (its weight needs no gradient); what is saved comes from the norms, attention, activations and the LoRA branches:
#   Qwen RMSNorm upcasts to fp32 and saves the fp32 input ........... 4*h (+ fp32 rsqrt) per norm, two per layer
#   attention saves q, k, v, output ................................. 8h, plus fp32 logsumexp per head
#     (GQA: with a padding mask, transformers repeats k/v to all heads before SDPA on CUDA, so they are counted at
#     full width; without a mask SDPA takes GQA natively and saves them at kv width, 4h + 4kv in total)
#   SwiGLU saves gate (for SiLU), SiLU(gate) and up (for the product)  6*I
#   each LoRA-targeted Linear: peft casts the input to the adapter dtype (fp32) and lora_A saves that copy
#                              (4 bytes per input element; under torch.autocast it would be a 2-byte copy; we assume
#                              the larger), plus lora_A's fp32 output (4*r)
#   LoRA dropout > 0: the CUDA dropout keep-mask (1 byte per input element); the dropped-out copy replaces the cast.
# The Qwen2-VL ViT block differs: LayerNorm saves its 16-bit input (2*d per norm) and fc1 -> QuickGELU -> fc2 saves
# QuickGELU's input and sigmoid (4*m) instead of the SwiGLU terms. The merger saves its fp32 norm input and the GELU
# input (2*d per patch, since 2x2 patches of width d form one 4d merged row). The ViT's rotary tables (fp32 cos and
# sin per patch, shared by all blocks) are kept once.
NORM_FP32_BYTES = FP32_BYTES
LORA_INPUT_COPY_BYTES = FP32_BYTES
LORA_OUTPUT_BYTES = FP32_BYTES
LORA_DROPOUT_MASK_BYTES = 1
# With gradient checkpointing (one checkpoint per decoder layer / ViT block, as transformers does), each layer keeps
# only its 16-bit input, and one layer's full activations exist again while it is recomputed in backward.
CHECKPOINT_BYTES_PER_HIDDEN = HALF_BYTES
# Around the loss: 16-bit logits for every position, their fp32 upcast / log-softmax output, and the fp32 gradient
# of the logits in backward (transformers computes logits for the whole sequence), ~14 bytes per token per vocab row.
LOGITS_BYTES_PER_VOCAB = HALF_BYTES + FP32_BYTES + FP32_BYTES + FP32_BYTES
# Pixel values arrive as fp32 patches of channels*temporal*patch*patch values.
PIXEL_BYTES = FP32_BYTES

# Overhead: CUDA context + cuBLAS/cuDNN workspaces (~0.5 GiB on current drivers with lazy module loading), NCCL
# buffers when more than one GPU trains, and caching-allocator fragmentation on the activation churn.
CUDA_CONTEXT_BYTES = 512 * MIB
NCCL_BYTES = 256 * MIB
FRAGMENTATION_FRACTION = 0.10
# ZeRO-3 gathers a layer's full weights to use them and prefetches the next: two layers in 16-bit.
ZERO3_GATHERED_LAYERS = 2


def _lora_branch_bytes(modules: Iterable[LinearSpec], rank: int, dropout: float, per: int = 1) -> int:
    """Bytes LoRA branches save per token: the fp32 input copy and lora_A's output per targeted module (``per``
    divides the input width when several patches share one merged row, as in the vision merger)."""
    total = 0
    for spec in modules:
        inputs = spec.in_features * (LORA_INPUT_COPY_BYTES + (LORA_DROPOUT_MASK_BYTES if dropout > 0 else 0))
        total += inputs // per + LORA_OUTPUT_BYTES * rank
    return total


def _decoder_layer_bytes(arch: ModelArch) -> int:
    """Bytes a Qwen2 decoder layer saves per token without its LoRA branches (see "Activations" above)."""
    h = arch.hidden_size
    norms = 2 * (NORM_FP32_BYTES * h + FP32_BYTES)  # fp32 input and its fp32 rsqrt, twice
    attention = HALF_BYTES * 4 * h + FP32_BYTES * arch.num_heads  # q, k, v (repeated for GQA), output; logsumexp
    mlp = 3 * HALF_BYTES * arch.intermediate_size
    return norms + attention + mlp


def _vision_block_bytes(arch: ModelArch) -> int:
    """Bytes a ViT block saves per patch without its LoRA branches (see "Activations" above)."""
    d, m = arch.vision_width, arch.vision_mlp
    attention = HALF_BYTES * 4 * d + FP32_BYTES * arch.vision_heads
    if arch.vision_gated_mlp:  # Qwen2.5-VL: RMSNorm (fp32 input, fp32 rsqrt) + SwiGLU
        return 2 * (NORM_FP32_BYTES * d + FP32_BYTES) + attention + 3 * HALF_BYTES * m
    # Qwen2-VL: LayerNorm (16-bit input, fp32 mean and rstd) + fc1/QuickGELU/fc2
    return 2 * (HALF_BYTES * d + 2 * FP32_BYTES) + attention + 2 * HALF_BYTES * m


def _group_by_layer(modules: Iterable[LinearSpec], prefix: str) -> dict[int, list[LinearSpec]]:
    """Targeted modules under ``prefix`` (``"model.language_model.layers."``...) keyed by layer index."""
    groups: dict[int, list[LinearSpec]] = {}
    for spec in modules:
        if spec.path.startswith(prefix):
            groups.setdefault(int(spec.path[len(prefix) :].split(".", 1)[0]), []).append(spec)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and result
# ---------------------------------------------------------------------------------------------------------------------

ZERO3_NF4_MESSAGE = (
    "ZeRO-3 with a 4-bit (nf4) base is not supported by DeepSpeed: it cannot partition bitsandbytes 4-bit weights; use "
    "ZeRO-2 with nf4 (the 4-bit base is replicated, adapters and optimizer state are sharded), or quantization=none "
    "with ZeRO-3"
)


def check_zero3_quantization(quantization: str, zero_stage: int) -> None:
    """The one place of the rule that DeepSpeed ZeRO-3 cannot train a 4-bit base (the planner and the training job's
    ``opsvlm.model.build.check_zero_compat`` both call it).

    ZeRO-3 partitions every parameter across ranks; DeepSpeed cannot partition bitsandbytes ``Params4bit`` (packed
    uint8 data plus a separate quantization state), so a 4-bit base fails at engine init or produces garbage.

    Raises:
        PlanError: ``quantization`` is ``nf4`` and ``zero_stage`` is 3.
    """
    if quantization == "nf4" and zero_stage == 3:
        raise PlanError(ZERO3_NF4_MESSAGE)


@dataclass(frozen=True)
class PlanInputs:
    """What to plan for. Validated on construction.

    Attributes:
        model: Hub id of a known model or a local directory with a config.json.
        gpu: GPU type (see :data:`GPUS`).
        quantization: ``"nf4"`` (QLoRA: 4-bit language decoder, vision tower and lm_head in compute dtype) or
            ``"none"`` (LoRA on a 16-bit base).
        lora_rank: LoRA rank r.
        lora_targets: ``"language"``, ``"language_vision"`` or a regex over module paths (re.fullmatch).
        lora_dropout: LoRA dropout probability; above 0 each targeted module keeps a dropped-out copy of its input.
        frames_per_clip: Frames per training sample.
        frame_height: Frame height in pixels (rounded to a multiple of 28 like the processor does).
        frame_width: Frame width in pixels.
        text_tokens: Text tokens per sample (prompt + answer + template), on top of the visual tokens.
        micro_batch: Samples per GPU per forward pass; None lets the planner choose the largest that fits.
        global_batch: Samples per optimizer step across all GPUs (micro_batch * grad_accum * num_gpus).
        num_gpus: Data-parallel GPUs.
        gradient_checkpointing: Recompute each layer in backward instead of storing its activations.
        optimizer: ``"adamw"``, ``"adamw_8bit"`` or ``"paged_adamw_8bit"``.
        zero_stage: DeepSpeed ZeRO stage: 0 (plain DDP), 2 (shard optimizer and gradients) or 3 (also weights).
        dtype: Compute dtype: ``"auto"`` (bf16, fp16 on GPUs without bf16), ``"bf16"`` or ``"fp16"``.
        safety_margin: Fraction of GPU memory kept free (allocator spikes, estimate error).
    """

    model: str
    gpu: str
    quantization: TrainingQuantization = "nf4"
    lora_rank: int = 16
    lora_targets: str = "language"
    lora_dropout: float = 0.05
    frames_per_clip: int = 8
    frame_height: int = 224
    frame_width: int = 224
    text_tokens: int = 256
    micro_batch: int | None = None
    global_batch: int = 16
    num_gpus: int = 1
    gradient_checkpointing: bool = True
    optimizer: Optimizer = "adamw"
    zero_stage: ZeroStage = 0
    dtype: PlanDtype = "auto"
    safety_margin: float = 0.10

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise PlanError("model must be a hub id or a local directory")
        gpu = resolve_gpu(self.gpu)
        check_choices(self, error=PlanError)  # quantization, optimizer, zero_stage, dtype
        check_zero3_quantization(self.quantization, self.zero_stage)
        if self.dtype == "bf16" and not gpu.bf16:
            raise PlanError(f"{gpu.name} has no bf16 support; train in fp16 there (dtype=fp16 or auto)")
        positive = {
            "lora_rank": self.lora_rank,
            "frames_per_clip": self.frames_per_clip,
            "frame_height": self.frame_height,
            "frame_width": self.frame_width,
            "text_tokens": self.text_tokens,
            "global_batch": self.global_batch,
            "num_gpus": self.num_gpus,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        if self.micro_batch is not None and (
            isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 1
        ):
            raise PlanError(f"micro_batch must be a positive integer or None, got {self.micro_batch!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise PlanError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise PlanError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= float(self.safety_margin) < 0.9:
            raise PlanError(f"safety_margin must be in [0, 0.9), got {self.safety_margin!r}")
        if not isinstance(self.lora_targets, str) or not self.lora_targets:
            raise PlanError("lora_targets must be a preset name or a regex")
        resolve_lora_targets(self.lora_targets)

    @property
    def gpu_spec(self) -> GpuSpec:
        """The resolved GPU."""
        return resolve_gpu(self.gpu)

    @property
    def compute_dtype(self) -> str:
        """``"bf16"`` or ``"fp16"``."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.gpu_spec.bf16 else "fp16"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes by component.

    Attributes:
        weights: Base model weights (nf4-packed decoder + 16-bit rest, or all 16-bit; ZeRO-3: this GPU's shard plus
            the gathered working set).
        adapters: LoRA weights.
        gradients: LoRA gradients.
        optimizer_states: Optimizer moments (plus fp32 master weights under ZeRO).
        activations: Language-model activations for text + visual tokens, including logits around the loss.
        vision_tokens: Vision tower activations over the unmerged patches, plus the pixel values.
        overhead: CUDA context, NCCL, fragmentation, nf4 dequantization workspace.
    """

    weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    activations: int
    vision_tokens: int
    overhead: int

    @property
    def total(self) -> int:
        """Sum of all components."""
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        """Components and total in bytes."""
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class MemoryPlan:
    """The result of :func:`plan_memory`.

    Attributes:
        inputs: What was planned for.
        arch: Model dimensions read from the config.
        params: Parameter counts.
        trainable_params: LoRA parameters.
        grid: Patches and visual tokens per clip.
        gpu: The GPU.
        compute_dtype: ``"bf16"`` or ``"fp16"``.
        micro_batch: The micro-batch the breakdown is for (the requested one, else the recommended one, else 1).
        grad_accum: Gradient accumulation for that micro-batch to reach the global batch.
        breakdown: Per-GPU bytes at that micro-batch.
        usable_bytes: GPU memory minus the safety margin.
        fits: Whether the breakdown's total fits in the usable memory.
        max_micro_batch: Largest micro-batch that fits (0 if even 1 does not).
        recommended_micro_batch: Recommended micro-batch (None if nothing fits).
        recommended_grad_accum: Gradient accumulation for the recommended micro-batch (None if nothing fits).
        notes: Caveats worth showing to a person.
    """

    inputs: PlanInputs
    arch: ModelArch
    params: ParamCounts
    trainable_params: int
    grid: VisionGrid
    gpu: GpuSpec
    compute_dtype: str
    micro_batch: int
    grad_accum: int
    breakdown: MemoryBreakdown
    usable_bytes: int
    fits: bool
    max_micro_batch: int
    recommended_micro_batch: int | None
    recommended_grad_accum: int | None
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Estimated per-GPU peak."""
        return self.breakdown.total

    @property
    def sequence_length(self) -> int:
        """Language-model tokens per sample (text + visual)."""
        return self.inputs.text_tokens + self.grid.tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: counts, per-component bytes (and GiB), recommendation and ``fits``."""
        inputs = asdict(self.inputs)
        breakdown = self.breakdown.to_dict()
        return {
            "model": self.inputs.model,
            "model_type": self.arch.family,
            "gpu": self.gpu.name,
            "gpu_bytes": self.gpu.memory_bytes,
            "usable_bytes": self.usable_bytes,
            "compute_dtype": self.compute_dtype,
            "total_params": self.params.total,
            "vision_params": self.params.vision,
            "language_params": self.params.language + self.params.lm_head,
            "quantized_params": self.params.quantized if self.inputs.quantization == "nf4" else 0,
            "trainable_params": self.trainable_params,
            "frames_per_clip": self.inputs.frames_per_clip,
            "frame_size": [self.grid.height, self.grid.width],
            "vision_patches_per_sample": self.grid.patches,
            "visual_tokens_per_sample": self.grid.tokens,
            "sequence_length": self.sequence_length,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "num_gpus": self.inputs.num_gpus,
            "global_batch": self.inputs.global_batch,
            "effective_global_batch": self.micro_batch * self.grad_accum * self.inputs.num_gpus,
            "bytes": breakdown,
            "gib": {k: round(v / GIB, 3) for k, v in breakdown.items()},
            "total_bytes": self.total_bytes,
            "headroom_bytes": self.usable_bytes - self.total_bytes,
            "fits": self.fits,
            "recommendation": {
                "micro_batch": self.recommended_micro_batch,
                "grad_accum": self.recommended_grad_accum,
                "max_micro_batch": self.max_micro_batch,
            },
            "inputs": inputs,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    inputs: PlanInputs
    arch: ModelArch
    params: ParamCounts
    targets: tuple[LinearSpec, ...]
    trainable: int
    grid: VisionGrid


def _breakdown(ctx: _Context, micro_batch: int) -> MemoryBreakdown:
    """Per-GPU bytes for one micro-batch size. All formulas are in the "Memory model" section above."""
    inp, arch, params = ctx.inputs, ctx.arch, ctx.params
    n = inp.num_gpus
    h = arch.hidden_size

    # Weights. nf4: decoder Linear weights packed to 4.127 bits, everything else (embeddings, norms, biases, lm_head,
    # vision tower) in the compute dtype. ZeRO-3 (never with nf4): a 1/n shard plus the layers gathered for compute.
    if inp.quantization == "nf4":
        weights = math.ceil(params.quantized * NF4_BITS_PER_PARAM / 8) + (params.total - params.quantized) * HALF_BYTES
    else:
        weights = params.total * HALF_BYTES
    if inp.zero_stage == 3:
        weights = math.ceil(weights / n) + ZERO3_GATHERED_LAYERS * params.largest_layer * HALF_BYTES

    # Adapters, gradients, optimizer states.
    t = ctx.trainable
    states = OPTIMIZER_STATE_BYTES[inp.optimizer]
    if inp.zero_stage == 0:
        adapters, gradients, optimizer = t * ADAPTER_BYTES, t * GRADIENT_BYTES, t * states
    else:
        adapters = t * HALF_BYTES if inp.zero_stage == 2 else math.ceil(t * HALF_BYTES / n)
        gradients = math.ceil(t * ZERO_GRADIENT_BYTES / n)
        optimizer = math.ceil(t * (ZERO_MASTER_BYTES + states) / n)

    # Language-model activations over text + visual tokens of the micro-batch. LoRA branches differ per layer when a
    # regex targets only some layers, so they are summed (or, for the one recomputed layer, maxed) per layer.
    rank, dropout = inp.lora_rank, inp.lora_dropout
    tokens = micro_batch * (inp.text_tokens + ctx.grid.tokens)
    base = _decoder_layer_bytes(arch)
    lora = [
        _lora_branch_bytes(group, rank, dropout)
        for group in _group_by_layer(ctx.targets, "model.language_model.layers.").values()
    ]
    if inp.gradient_checkpointing:
        layers = arch.num_layers * h * CHECKPOINT_BYTES_PER_HIDDEN + base + max(lora, default=0)
    else:
        layers = arch.num_layers * base + sum(lora)
    # Final RMSNorm (fp32 input), lm_head (LoRA branch if targeted), then the logits around the loss.
    head = NORM_FP32_BYTES * h + LOGITS_BYTES_PER_VOCAB * arch.vocab_size
    head += _lora_branch_bytes([s for s in ctx.targets if s.part == "lm_head"], rank, dropout)
    activations = tokens * (layers + head)

    # Vision tower over the unmerged patches. If LoRA trains part of it, autograd keeps its activations (only the
    # block inputs with checkpointing); if it is frozen nothing is kept and only one block's working set is live.
    patches = micro_batch * ctx.grid.patches
    d = arch.vision_width
    vision_targets = [s for s in ctx.targets if s.part == "vision"]
    block = _vision_block_bytes(arch)
    if vision_targets:
        vlora = [
            _lora_branch_bytes(g, rank, dropout)
            for g in _group_by_layer(vision_targets, "model.visual.blocks.").values()
        ]
        if inp.gradient_checkpointing:
            blocks = arch.vision_depth * d * CHECKPOINT_BYTES_PER_HIDDEN + block + max(vlora, default=0)
        else:
            blocks = arch.vision_depth * block + sum(vlora)
        # The merger (not checkpointed) saves its fp32 norm input and GELU input; merged rows span merge^2 patches.
        merged = arch.spatial_merge_size**2
        merger_targets = [s for s in vision_targets if s.path.startswith("model.visual.merger.")]
        blocks += NORM_FP32_BYTES * d + HALF_BYTES * d + _lora_branch_bytes(merger_targets, rank, dropout, merged)
        blocks += 2 * FP32_BYTES * (d // arch.vision_heads)  # rotary cos/sin
    else:
        blocks = block
    pixel = arch.in_channels * arch.temporal_patch_size * arch.patch_size**2 * PIXEL_BYTES
    vision_tokens = patches * (blocks + pixel)

    # Overhead.
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if n > 1 else 0)
    overhead += math.ceil(FRAGMENTATION_FRACTION * (activations + vision_tokens))
    if inp.quantization == "nf4":
        # bitsandbytes dequantizes a 4-bit weight to 16-bit for each matmul; the largest one bounds that buffer.
        overhead += params.largest_quantized_linear * HALF_BYTES

    return MemoryBreakdown(
        weights=int(weights),
        adapters=int(adapters),
        gradients=int(gradients),
        optimizer_states=int(optimizer),
        activations=int(activations),
        vision_tokens=int(vision_tokens),
        overhead=int(overhead),
    )


def _max_fitting_micro_batch(ctx: _Context, usable: int, cap: int) -> int:
    """Largest micro-batch in [1, cap] whose total fits (memory grows with the micro-batch), 0 if none."""
    if _breakdown(ctx, 1).total > usable:
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _breakdown(ctx, mid).total <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _recommend(max_fit: int, global_batch: int, num_gpus: int) -> int:
    """Pick a micro-batch no smaller than half the largest that fits: one that makes micro * accum * gpus equal the
    global batch exactly if there is one (no silently bigger batch), else the largest power of two."""
    for m in range(max_fit, max_fit // 2, -1):
        if global_batch % (m * num_gpus) == 0:
            return m
    return 1 << (max_fit.bit_length() - 1)


def grad_accum_for(global_batch: int, micro_batch: int, num_gpus: int) -> int:
    """Gradient accumulation steps: ``ceil(global_batch / (micro_batch * num_gpus))``.

    Args:
        global_batch: Target samples per optimizer step.
        micro_batch: Samples per GPU per forward pass.
        num_gpus: Data-parallel GPUs.

    Returns:
        Accumulation steps (at least 1).
    """
    return max(1, math.ceil(global_batch / (micro_batch * num_gpus)))


def plan_memory(inputs: PlanInputs, config: Mapping[str, Any] | None = None) -> MemoryPlan:
    """Estimate per-GPU memory and recommend micro-batch and gradient accumulation.

    Args:
        inputs: What to plan for.
        config: The model's config.json contents; loaded with :func:`load_model_config` when omitted.

    Returns:
        The plan. ``plan.fits`` is false when the evaluated micro-batch (the requested one, or 1 when even the
        smallest does not fit) needs more than the usable memory.

    Raises:
        PlanError: Unknown model, unsupported architecture, or LoRA targets that select nothing.
    """
    arch = ModelArch.from_config(config if config is not None else load_model_config(inputs.model))
    params = count_parameters(arch)
    targets = tuple(lora_target_modules(arch, inputs.lora_targets))
    trainable = sum(inputs.lora_rank * (s.in_features + s.out_features) for s in targets)
    grid = vision_grid(arch, inputs.frames_per_clip, inputs.frame_height, inputs.frame_width)
    ctx = _Context(inputs, arch, params, targets, trainable, grid)

    gpu = inputs.gpu_spec
    usable = int(gpu.memory_bytes * (1.0 - inputs.safety_margin))
    # A micro-batch beyond the per-GPU share of the global batch only overshoots the batch size.
    cap = max(1, math.ceil(inputs.global_batch / inputs.num_gpus))
    max_fit = _max_fitting_micro_batch(ctx, usable, cap)
    recommended = _recommend(max_fit, inputs.global_batch, inputs.num_gpus) if max_fit else None

    notes: list[str] = []
    if max_fit == cap and _breakdown(ctx, cap + 1).total <= usable:
        notes.append(f"micro-batch capped at the per-GPU share of global_batch ({cap}); a larger one would fit")
    if inputs.micro_batch is not None:
        micro = inputs.micro_batch
        if micro > cap:
            notes.append(
                f"micro_batch {micro} exceeds the per-GPU share of global_batch ({cap}); the effective global "
                f"batch grows to {micro * inputs.num_gpus}"
            )
    else:
        micro = recommended or 1
    breakdown = _breakdown(ctx, micro)
    fits = breakdown.total <= usable
    if not fits:
        short = (breakdown.total - usable) / GIB
        if max_fit:
            notes.append(f"micro_batch {micro} does not fit (short by {short:.2f} GiB); micro_batch {recommended} does")
        else:
            notes.append(
                f"does not fit even at micro_batch 1 (short by {short:.2f} GiB): try quantization=nf4, "
                f"gradient_checkpointing=true, fewer frames or pixels, a smaller model or a larger GPU"
            )
    if inputs.compute_dtype == "fp16":
        notes.append(f"{gpu.name} has no bf16: training runs in fp16 with loss scaling")
    if inputs.zero_stage and inputs.num_gpus == 1:
        notes.append("ZeRO on a single GPU shards nothing; it only adds fp32 master weights")
    if inputs.frame_height != grid.height or inputs.frame_width != grid.width:
        notes.append(
            f"frames {inputs.frame_height}x{inputs.frame_width} are resized to {grid.height}x{grid.width} "
            f"(multiples of {arch.patch_size * arch.spatial_merge_size})"
        )

    return MemoryPlan(
        inputs=inputs,
        arch=arch,
        params=params,
        trainable_params=trainable,
        grid=grid,
        gpu=gpu,
        compute_dtype=inputs.compute_dtype,
        micro_batch=micro,
        grad_accum=grad_accum_for(inputs.global_batch, micro, inputs.num_gpus),
        breakdown=breakdown,
        usable_bytes=usable,
        fits=fits,
        max_micro_batch=max_fit,
        recommended_micro_batch=recommended,
        recommended_grad_accum=grad_accum_for(inputs.global_batch, recommended, inputs.num_gpus)
        if recommended
        else None,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def format_plan(plan: MemoryPlan) -> str:
    """A human-readable breakdown, e.g. for a training job that refuses a plan that does not fit.

    Args:
        plan: The plan.

    Returns:
        Multi-line text.
    """
    inp = plan.inputs
    lines = [
        f"memory plan: {inp.model} on {plan.gpu.name} ({plan.gpu.memory_bytes / GIB:.1f} GiB, "
        f"{plan.usable_bytes / GIB:.1f} GiB usable at {inp.safety_margin:.0%} margin), {inp.quantization}, "
        f"{plan.compute_dtype}, ZeRO-{inp.zero_stage} on {inp.num_gpus} GPU(s), micro_batch {plan.micro_batch}, "
        f"{plan.sequence_length} tokens/sample ({plan.grid.tokens} visual)",
        f"  params: {plan.params.total:,} total, {plan.trainable_params:,} trainable (LoRA r={inp.lora_rank})",
    ]
    for key, value in plan.breakdown.to_dict().items():
        lines.append(f"  {key:<17} {value / GIB:8.2f} GiB")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  -> {verdict} (headroom {(plan.usable_bytes - plan.total_bytes) / GIB:+.2f} GiB)")
    if plan.recommended_micro_batch:
        lines.append(
            f"  recommended: micro_batch={plan.recommended_micro_batch}, grad_accum={plan.recommended_grad_accum} "
            f"(largest micro_batch that fits: {plan.max_micro_batch})"
        )
    lines.extend(f"  note: {note}" for note in plan.notes)
    return "\n".join(lines)


def peak_report(plan: MemoryPlan, measured_peak_bytes: int) -> dict[str, Any]:
    """Put a measured CUDA peak (``torch.cuda.max_memory_reserved()``) next to the estimate, for logging.

    Args:
        plan: The plan the run was started with.
        measured_peak_bytes: Measured peak on one GPU.

    Returns:
        Estimate, measurement, their ratio and the per-component estimate, all in bytes.
    """
    measured = int(measured_peak_bytes)
    return {
        "estimated_peak_bytes": plan.total_bytes,
        "measured_peak_bytes": measured,
        "measured_over_estimated": round(measured / plan.total_bytes, 4) if plan.total_bytes else None,
        "estimated_breakdown_bytes": plan.breakdown.to_dict(),
    }


def known_models() -> Iterable[str]:
    """Hub ids whose config.json ships with the package."""
    return tuple(KNOWN_MODELS)


__all__: Sequence[str] = (
    "GPUS",
    "KNOWN_MODELS",
    "LORA_TARGET_PRESETS",
    "OPTIMIZER_STATE_BYTES",
    "ZERO3_NF4_MESSAGE",
    "GpuSpec",
    "LinearSpec",
    "MemoryBreakdown",
    "MemoryPlan",
    "ModelArch",
    "ParamCounts",
    "PlanError",
    "PlanInputs",
    "VisionGrid",
    "check_zero3_quantization",
    "count_parameters",
    "format_plan",
    "grad_accum_for",
    "known_models",
    "linear_modules",
    "load_model_config",
    "lora_target_modules",
    "lora_trainable_params",
    "peak_report",
    "plan_memory",
    "resolve_gpu",
    "resolve_lora_targets",
    "vision_grid",
)
