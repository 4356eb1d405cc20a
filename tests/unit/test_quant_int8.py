"""LLM.int8 (bitsandbytes 8-bit) on the tiny Qwen2.5-VL, for real on CPU: layout, forward/generate close to fp32, a
LoRA adapter on top, the training refusal, quantization-state accounting and the availability probe."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

# No hub access in tests: everything must load from the local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from opsvlm.model import build, quant
from opsvlm.model.build import LoraSettings, ModelConfig
from opsvlm.testing import tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny.ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache")))


@pytest.fixture(scope="module")
def video_batch(tiny_dir: str) -> dict[str, torch.Tensor]:
    """One processor-built example: a 4-frame 56x56 clip, a question and an answer (labels = inputs)."""
    processor = build.load_processor(tiny_dir)
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 56, 56, 3), dtype=np.uint8)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which operation is this?"}]},
        {"role": "assistant", "content": "Picking"},
    ]
    batch = processor(
        text=[processor.apply_chat_template(messages, tokenize=False)],
        videos=[frames],
        video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
        do_sample_frames=False,
        return_tensors="pt",
    )
    batch = dict(batch)
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _config(tiny_dir: str, quantization: str, **kwargs) -> ModelConfig:
    return ModelConfig(name=tiny_dir, quantization=quantization, compute_dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def int8_model(tiny_dir: str):
    return build.load_base_model(_config(tiny_dir, "int8"))


@pytest.fixture(scope="module")
def fp32_model(tiny_dir: str):
    return build.load_base_model(_config(tiny_dir, "none"))


def test_int8_config() -> None:
    config = quant.bnb_config("int8", torch.float32)
    assert config.load_in_8bit and not config.load_in_4bit
    assert list(config.llm_int8_skip_modules) == list(quant.SKIP_MODULES)
    assert config.llm_int8_threshold == 6.0
    assert ModelConfig(quantization="int8").quantization == "int8"


def test_int8_quantizes_language_linears_only(int8_model) -> None:
    import bitsandbytes as bnb

    names = quant.check_quantized_layout(int8_model, "int8")
    assert len(names) == 2 * 7  # 2 decoder layers x q/k/v/o/gate/up/down
    assert all(n.startswith("model.language_model.layers.") for n in names)
    modules = dict(int8_model.named_modules())
    for name in names:
        weight = modules[name].weight
        assert isinstance(modules[name], bnb.nn.Linear8bitLt)
        assert weight.dtype == torch.int8
        assert weight.SCB.shape == (weight.shape[0],)  # one fp32 absmax per output row
    for name, module in modules.items():
        if name.startswith("model.visual.") or name == "lm_head":
            assert not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)), name
    assert quant.is_quantized(int8_model)
    # the nf4 check on an int8 model fails: it finds no Linear4bit
    with pytest.raises(RuntimeError, match="Linear4bit"):
        quant.check_quantized_layout(int8_model, "nf4")
    with pytest.raises(ValueError, match="nf4' or 'int8"):
        quant.check_quantized_layout(int8_model, "none")


def test_int8_forward_and_generate_close_to_fp32(tiny_dir: str, int8_model, fp32_model, video_batch, caplog) -> None:
    nf4_model = build.load_base_model(_config(tiny_dir, "nf4"))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        logits8 = int8_model(**video_batch).logits
        logits4 = nf4_model(**video_batch).logits
        logits32 = fp32_model(**video_batch).logits
    assert torch.isfinite(logits8).all()

    def relative_error(logits: torch.Tensor) -> float:
        return ((logits - logits32).norm() / logits32.norm()).item()

    # int8 rounding moves the logits a little (1.3% here), and much less than 4-bit NF4 does (12.5% here)
    assert 0 < relative_error(logits8) < 0.05
    assert relative_error(logits8) < relative_error(logits4) / 3
    # the per-matmul "inputs will be cast to float16" record is filtered (it is by design of LLM.int8)
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]

    prompt = {k: v for k, v in video_batch.items() if k != "labels"}
    with torch.no_grad():
        out = int8_model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


@pytest.fixture(scope="module")
def trained_adapter(tiny_dir: str, video_batch, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA adapter trained a few steps on the fp32 base (so B != 0), and its fp32 logits."""
    config = _config(tiny_dir, "none", lora=LoraSettings(rank=4, alpha=8, dropout=0.0, targets="language"))
    model, _ = build.prepare_for_training(build.load_base_model(config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(3):
        model(**video_batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(**video_batch).logits
    return adapter_dir, logits


def test_lora_adapter_on_int8_base(tiny_dir: str, video_batch, trained_adapter, int8_model) -> None:
    import bitsandbytes as bnb

    adapter_dir, adapter_logits = trained_adapter
    model = build.load_for_inference(tiny_dir, adapter_dir, _config(tiny_dir, "int8"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    wrapped = [n for n, m in model.named_modules() if n.endswith(".base_layer") and isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(wrapped) == 14  # every adapted projection sits on an 8-bit base layer
    with torch.no_grad():
        logits = model(**video_batch).logits
        base_logits = int8_model(**video_batch).logits
    # the adapter is applied (not an empty one) and the result tracks the fp32 base + adapter
    assert (logits - base_logits).abs().max() > 1e-2
    assert ((logits - adapter_logits).norm() / adapter_logits.norm()).item() < 0.05
    with pytest.raises(ValueError, match="quantized"):
        build.merge_lora(model)


def test_training_refuses_int8(tiny_dir: str, int8_model) -> None:
    from opsvlm.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"inference only.*nf4"):
        build.check_zero_compat("int8", 0)
    with pytest.raises(ValueError, match="inference only"):
        build.prepare_for_training(int8_model, _config(tiny_dir, "int8"))
    with pytest.raises(ValueError, match="inference only"):
        TrainConfig(model=ModelConfig(quantization="int8"))
    build.check_trainable_quantization("nf4")
    build.check_trainable_quantization("none")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_quant_state_tensors(tiny_dir: str, int8_model) -> None:
    modules = dict(int8_model.named_modules())
    q_proj = modules["model.language_model.layers.0.self_attn.q_proj"]
    state = list(quant.quant_state_tensors(q_proj))
    # SCB sits on the weight until the first forward (which the tests above ran), then on the matmul state
    scb = q_proj.weight.SCB if q_proj.weight.SCB is not None else q_proj.state.SCB
    assert len(state) == 1 and state[0] is scb and state[0].dtype == torch.float32
    assert scb.shape == (q_proj.out_features,)
    assert list(quant.quant_state_tensors(modules["lm_head"])) == []

    nf4 = build.load_base_model(_config(tiny_dir, "nf4"))
    layer = dict(nf4.named_modules())["model.language_model.layers.0.self_attn.q_proj"]
    state = list(quant.quant_state_tensors(layer))
    # absmax (uint8, double-quantized), NF4 code, the absmax offset, then the nested fp32 absmax + its code
    n_weights = layer.weight.quant_state.shape.numel()
    assert len(state) == 5
    assert state[0].dtype == torch.uint8 and state[0].numel() == n_weights // 64
    # 4-bit weights + their state are well under an int8 row-scaled copy of the same weights
    int8_bytes = _nbytes([q_proj.weight, scb])
    nf4_bytes = _nbytes([layer.weight, *state])
    assert nf4_bytes < int8_bytes < 4 * n_weights


def test_unavailable_reason() -> None:
    for mode in quant.QUANTIZATION_CHOICES:
        assert quant.unavailable_reason(mode, "cpu") is None, mode
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.unavailable_reason("int4", "cpu")
    # Without bitsandbytes (a None entry in sys.modules makes its import fail), the reason says so; none still runs.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from opsvlm.model import quant\n"
        "print(quant.unavailable_reason('int8', 'cpu')); print(quant.unavailable_reason('none', 'cpu'))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith("bitsandbytes is not installed") and "int8 needs it" in out[0]
    assert out[1] == "None"
