"""Model loading, QLoRA (real bitsandbytes 4-bit on CPU), LoRA targets, merging and config validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

# No hub access in tests: everything must load from the local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from opsvlm.config import ConfigError, from_dict
from opsvlm.model import build, quant
from opsvlm.model.build import LoraSettings, ModelConfig
from opsvlm.testing import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny.ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache")))


@pytest.fixture(scope="session")
def processor(tiny_dir: str):
    return build.load_processor(tiny_dir)


@pytest.fixture(scope="session")
def video_batch(processor) -> dict[str, torch.Tensor]:
    """One processor-built training example: a 4-frame 56x56 clip, a question and an answer (labels = inputs)."""
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 56, 56, 3), dtype=np.uint8)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which operation is this?"}]},
        {"role": "assistant", "content": "Picking"},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(
        text=[text],
        videos=[frames],
        # Frames are already sampled (2 fps): no resampling, and their rate goes in via video_metadata.
        video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
        do_sample_frames=False,
        return_tensors="pt",
    )
    batch = dict(batch)
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _config(tiny_dir: str, **kwargs) -> ModelConfig:
    lora = kwargs.pop("lora", LoraSettings(rank=4, alpha=8, dropout=0.0))
    return ModelConfig(name=tiny_dir, lora=lora, **kwargs)


@pytest.fixture(scope="module")
def nf4_model(tiny_dir: str):
    return build.load_base_model(_config(tiny_dir, quantization="nf4"))


def _is_4bit(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def test_nf4_quantizes_language_linears_only(nf4_model) -> None:
    language, vision = {}, {}
    for name, module in nf4_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.startswith("model.language_model."):
                language[name] = module
            elif name.startswith("model.visual."):
                vision[name] = module
    assert len(language) == 2 * 7  # 2 decoder layers x q/k/v/o/gate/up/down
    assert len(vision) == 4 * 5 + 2  # 4 blocks x qkv/proj/gate/up/down + 2 merger Linears
    for module in language.values():
        assert _is_4bit(module)
        weight = module.weight
        # Packed: two 4-bit values per uint8, so half as many elements as the logical (out, in) weight.
        assert weight.dtype == torch.uint8
        assert weight.numel() * 2 == module.in_features * module.out_features
        assert weight.quant_state.quant_type == "nf4"
        assert weight.quant_state.nested  # double quantization
    for module in vision.values():
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert type(nf4_model.lm_head) is torch.nn.Linear and nf4_model.lm_head.weight.dtype == torch.float32
    assert sorted(quant.check_quantized_layout(nf4_model)) == sorted(language)
    assert quant.is_quantized(nf4_model)


def test_unquantized_load_has_no_4bit(tiny_dir: str) -> None:
    model = build.load_base_model(_config(tiny_dir, quantization="none"))
    assert not quant.is_quantized(model)
    assert quant.bnb_config("none", torch.float32) is None


def test_qlora_step_changes_only_lora(tiny_dir: str, video_batch) -> None:
    config = _config(tiny_dir, quantization="nf4", gradient_checkpointing=True)
    model, report = build.prepare_for_training(build.load_base_model(config), config)
    assert report["quantization"] == "nf4" and report["compute_dtype"] == "float32"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)

    assert "mm_token_type_ids" in video_batch and "pixel_values_videos" in video_batch
    loss = model(**video_batch, use_cache=False).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    # LoRA B starts at zero, so A gets no gradient on the first step; B moves in every adapted module.
    assert changed == {name for name in before if ".lora_B." in name}
    assert len(changed) == report["lora_modules"] == 14


@pytest.mark.parametrize(
    ("quantization", "targets", "n_modules"),
    [("nf4", "language", 14), ("none", "language_vision", 36)],
)
def test_report_and_targets(tiny_dir: str, quantization: str, targets: str, n_modules: int) -> None:
    rank = 4
    config = _config(tiny_dir, quantization=quantization, lora=LoraSettings(rank=rank, targets=targets))
    model, report = build.prepare_for_training(build.load_base_model(config), config)

    # Same numbers as peft's own count (which also unpacks 4-bit weights) and as the LoRA formula r * (in + out).
    assert (report["trainable_params"], report["total_params"]) == model.get_nb_trainable_parameters()
    adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert len(adapted) == report["lora_modules"] == n_modules
    expected = sum(rank * (m.in_features + m.out_features) for m in adapted.values())
    assert report["trainable_params"] == expected
    assert report["trainable_fraction"] == pytest.approx(expected / report["total_params"])
    assert report["target_regex"] == build.target_modules_regex(targets)

    language = {n for n in adapted if n.startswith("model.language_model.layers.")}
    vision = {n for n in adapted if n.startswith("model.visual.")}
    assert len(language) == 14
    assert language | vision == set(adapted)
    if targets == "language":
        assert not vision
    else:
        assert len(vision) == 22 and "model.visual.blocks.0.attn.qkv" in vision
        assert "model.visual.merger.mlp.0" in vision
    assert "lm_head" not in adapted


def test_custom_target_regex_is_used_as_given(tiny_dir: str) -> None:
    regex = r"model\.language_model\.layers\.1\.self_attn\.(q|v)_proj"
    assert build.target_modules_regex(regex) == regex
    config = _config(tiny_dir, quantization="none", lora=LoraSettings(rank=2, targets=regex))
    _, report = build.prepare_for_training(build.load_base_model(config), config)
    assert report["lora_modules"] == 2

    config = _config(tiny_dir, quantization="none", lora=LoraSettings(rank=2, targets=r"nothing\.here"))
    with pytest.raises(ValueError, match=r"lora\.targets"):
        build.prepare_for_training(build.load_base_model(config), config)


def test_quantization_mismatch_rejected(tiny_dir: str, nf4_model) -> None:
    with pytest.raises(ValueError, match="quantization"):
        build.prepare_for_training(nf4_model, _config(tiny_dir, quantization="none"))


@pytest.fixture(scope="module")
def trained_adapter(tiny_dir: str, video_batch, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA adapter (language + vision) trained a few steps on the fp32 base so that B != 0; its logits."""
    config = _config(tiny_dir, quantization="none", lora=LoraSettings(rank=4, alpha=8, targets="language_vision"))
    model, _ = build.prepare_for_training(build.load_base_model(config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(3):
        model(**video_batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(**video_batch).logits
    return adapter_dir, logits


def test_merge_adapter_matches_unmerged(tiny_dir: str, video_batch, trained_adapter, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir, adapter_logits = trained_adapter
    out = build.merge_adapter(tiny_dir, adapter_dir, tmp_path / "merged", "float32")

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoProcessor.from_pretrained(out).tokenizer.vocab_size > 0
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        merged_logits = merged(**video_batch).logits
        base_logits = base(**video_batch).logits
    # The adapter matters (otherwise the comparison below proves nothing) ...
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    # ... and the merged checkpoint reproduces base + adapter.
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)


def test_load_for_inference_reproduces_training_logits(tiny_dir: str, video_batch, trained_adapter) -> None:
    adapter_dir, adapter_logits = trained_adapter
    model = build.load_for_inference(tiny_dir, adapter_dir, _config(tiny_dir, quantization="none"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**video_batch).logits, adapter_logits, atol=1e-5, rtol=0)


def test_merge_into_4bit_model_raises(tiny_dir: str, video_batch, trained_adapter) -> None:
    adapter_dir, _ = trained_adapter
    model = build.load_for_inference(tiny_dir, adapter_dir, _config(tiny_dir, quantization="nf4"))
    with torch.no_grad():
        model(**video_batch)  # The trap: a forward pass, then a merge into the 4-bit base.
    with pytest.raises(ValueError, match="quantized"):
        build.merge_lora(model)


def test_zero3_with_nf4_rejected() -> None:
    with pytest.raises(ValueError, match="ZeRO-2"):
        build.check_zero_compat("nf4", 3)
    build.check_zero_compat("nf4", 2)
    build.check_zero_compat("none", 3)
    with pytest.raises(ValueError, match="zero_stage"):
        build.check_zero_compat("none", 4)


def test_resolve_compute_dtype_on_cpu() -> None:
    assert build.resolve_compute_dtype("auto", "cpu") == torch.float32
    assert build.resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert build.resolve_compute_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="compute_dtype"):
        build.resolve_compute_dtype("fp8", "cpu")


def test_nan_advice_names_the_fix() -> None:
    advice = build.nan_advice(torch.float16)
    assert "bfloat16" in advice and "compute_dtype=float32" in advice
    assert "-100" in build.nan_advice("bfloat16") and "-100" in build.nan_advice(torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"quantization": "int4"}, "quantization"),
        ({"compute_dtype": "fp16"}, "compute_dtype"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"name": ""}, "name"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"alpha": -1}}, "lora.alpha"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"targets": "model.(unclosed"}}, "lora.targets"),
        ({"lora": {"targets": ""}}, "lora.targets"),
    ],
)
def test_invalid_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        if "lora" in kwargs:
            LoraSettings(**kwargs["lora"])
        else:
            ModelConfig(**kwargs)
    # The same values through the YAML/override loader also fail, naming the field.
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        from_dict(ModelConfig, kwargs)


def test_import_does_not_load_bitsandbytes() -> None:
    code = "import sys, opsvlm.model.build, opsvlm.model.quant; assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
