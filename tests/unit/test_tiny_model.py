"""The tiny Qwen2.5-VL checkpoint is a real, loadable, deterministic Qwen2.5-VL with the released structure."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# No hub access in tests: everything must load from the local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.testing import tiny


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_dir: Path) -> Path:
    return tiny.ensure_tiny_model(cache_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Qwen2_5_VLProcessor:
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


def _video_prompt(processor: Qwen2_5_VLProcessor) -> str:
    messages = [
        {"role": "system", "content": "You label packing work."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which operation is this?"}]},
    ]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _video_inputs(processor: Qwen2_5_VLProcessor, frames: np.ndarray, fps: float):
    # Our frames are already sampled: disable the processor's sampling and give their rate via video_metadata
    # (a bare fps= kwarg is ignored in transformers 5 when frames are not sampled by the processor).
    return processor(
        text=[_video_prompt(processor)],
        videos=[frames],
        video_metadata=[{"fps": fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}],
        do_sample_frames=False,
        return_tensors="pt",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_loads_as_real_qwen25vl(tiny_dir: Path, model, processor) -> None:
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(tiny_dir)) is Qwen2_5_VLForConditionalGeneration
    assert isinstance(processor, Qwen2_5_VLProcessor)

    cfg = model.config
    vis, txt = cfg.vision_config, cfg.text_config
    assert (vis.patch_size, vis.temporal_patch_size, vis.spatial_merge_size) == (14, 2, 2)
    assert vis.window_size == 112
    full = set(vis.fullatt_block_indexes)
    assert full and full <= set(range(vis.depth))
    assert set(range(vis.depth)) - full, "some vision blocks must use window attention"
    assert vis.out_hidden_size == txt.hidden_size
    head_dim = txt.hidden_size // txt.num_attention_heads
    assert sum(txt.rope_parameters["mrope_section"]) * 2 == head_dim
    assert txt.num_key_value_heads < txt.num_attention_heads

    tok = processor.tokenizer
    assert txt.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert txt.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert txt.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id

    n_params = tiny.count_parameters(model)
    assert 100_000 < n_params < 3_000_000
    assert json.loads((tiny_dir / tiny.MARKER_FILE).read_text())["num_parameters"] == n_params


def test_tokenizer_has_qwen_tokens_and_template(tiny_dir: Path, processor) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(tok).__name__ == type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert 1000 <= len(tok) <= 2000
    added = tiny.QWEN_SPECIAL_TOKENS + tiny.QWEN_NONSPECIAL_ADDED_TOKENS
    ids = tok.convert_tokens_to_ids(list(added))
    # Same layout as the released tokenizer: the added tokens follow the BPE vocab contiguously.
    assert ids == list(range(ids[0], ids[0] + len(added)))
    for token in ("<|im_start|>", "<|vision_start|>", "<|video_pad|>"):
        assert tok(token)["input_ids"] == [tok.convert_tokens_to_ids(token)]

    record = {"operation": "Attach Shipping Label", "start_s": 12.5, "end_s": 18.0, "next_operation": "Null"}
    answer = json.dumps(record)
    assert tok.decode(tok(answer)["input_ids"]) == answer
    for name in LABEL_NAMES:
        # Learned merges: each operation word is (about) one token, not a string of bytes.
        assert len(tok(" " + name)["input_ids"]) <= 2 * len(name.split())

    text = _video_prompt(processor)
    assert text == (
        "<|im_start|>system\nYou label packing work.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Which operation is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default_system = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert default_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize(
    ("t", "h", "w", "expected_tokens"),
    [
        (8, 56, 56, 16),  # 4 * 4 * 4 / 4
        (8, 112, 112, 64),  # 4 * 8 * 8 / 4
        (4, 84, 112, 24),  # 2 * 6 * 8 / 4
    ],
)
def test_video_token_count_matches_formula(processor, t: int, h: int, w: int, expected_tokens: int) -> None:
    inputs = _video_inputs(processor, _frames(t, h, w), fps=2.0)
    # No upscaling and no resampling: the grid is exactly (T / 2, H / 14, W / 14).
    assert inputs["video_grid_thw"].tolist() == [[t // 2, h // 14, w // 14]]
    assert expected_tokens == (t // 2) * (h // 14) * (w // 14) // 4
    n_video_tokens = int((inputs["input_ids"] == processor.video_token_id).sum())
    assert n_video_tokens == expected_tokens
    assert inputs["pixel_values_videos"].shape == (expected_tokens * 4, 3 * 2 * 14 * 14)
    # second_per_grid_ts = temporal_patch_size / fps
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([1.0])


def test_forward_gives_finite_logits_loss_and_gradients(model, processor) -> None:
    inputs = _video_inputs(processor, _frames(8, 56, 56), fps=2.0)
    assert "mm_token_type_ids" in inputs  # needed by transformers 5 to build the 3D mRoPE positions
    labels = inputs["input_ids"].clone()
    labels[inputs["mm_token_type_ids"] != 0] = -100
    model.zero_grad()
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grad = model.model.visual.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()


def test_vision_tower_uses_window_and_full_attention(model, processor) -> None:
    # 224x168 frames give an 8x6 merged grid, more than one 112 px (4x4 merged) window, with a ragged edge.
    inputs = _video_inputs(processor, _frames(2, 224, 168), fps=1.0)
    seen: dict[int, int] = {}

    def record(index: int):
        def hook(_module, _args, kwargs):
            seen[index] = len(kwargs["cu_seqlens"]) - 1  # number of attention segments

        return hook

    handles = [
        blk.register_forward_pre_hook(record(i), with_kwargs=True) for i, blk in enumerate(model.model.visual.blocks)
    ]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(out.logits).all()
    full = set(model.config.vision_config.fullatt_block_indexes)
    assert sorted(seen) == list(range(len(model.model.visual.blocks)))
    for i, segments in seen.items():
        # Full-attention blocks see the whole frame as one segment; window blocks see 2x2 windows of 4x4 tokens.
        expected = 1 if i in full else 4
        assert segments == expected, (i, segments)


def test_generate_produces_tokens(model, processor) -> None:
    inputs = _video_inputs(processor, _frames(8, 56, 56), fps=2.0)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert first.shape[1] > prompt_len
    assert torch.equal(first, second)
    assert isinstance(processor.batch_decode(first[:, prompt_len:])[0], str)


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_qwen25vl(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _sha256(again / name) == _sha256(tiny_dir / name), name


def test_other_seed_replaces_incomplete_cache_entry(tiny_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / tiny.tiny_model_dirname(seed=1)
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # a half-copied checkpoint: no weights, no marker
    other = tiny.ensure_tiny_model(tmp_path, seed=1)
    assert other == stale and tiny.is_complete(other)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_dir / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(tiny_dir / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [stale.name]


def test_ensure_tiny_model_reuses_cache(cache_dir: Path, tiny_dir: Path) -> None:
    assert tiny.is_complete(tiny_dir)
    assert tiny_dir.parent == cache_dir
    assert f"v{tiny.TINY_MODEL_VERSION}" in tiny_dir.name
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(cache_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert tiny.resolve_model_source("tiny", cache_dir=cache_dir) == str(tiny_dir)
    assert tiny.resolve_model_source("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"


def _build_and_load(cache_dir: str) -> tuple[str, int]:
    """One racing process: ensure the checkpoint, then load it exactly as a training worker does."""
    path = tiny.ensure_tiny_model(cache_dir)
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    AutoProcessor.from_pretrained(path)
    return str(path), tiny.count_parameters(loaded)


def test_processes_racing_on_an_empty_cache_all_get_one_complete_checkpoint(tmp_path: Path) -> None:
    # The first-run crash: two Ray Train workers built the fixture into the same empty cache at once; one failed
    # its rename, the other loaded a directory without weights. Four processes start together here.
    import multiprocessing

    cache = tmp_path / "empty_cache"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_build_and_load, [str(cache)] * 4)
    assert len({path for path, _ in results}) == 1
    assert len({n for _, n in results}) == 1
    final = Path(results[0][0])
    assert tiny.is_complete(final)
    # nothing half-built is left beside it: one checkpoint and its lock file
    assert sorted(p.name for p in cache.iterdir()) == sorted([final.name, f".{final.name}.lock"])


def test_build_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_qwen25vl(tmp_path)


def test_spec_rejects_broken_structure() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        tiny.TinyQwen25VLSpec(mrope_section=(4, 4, 4))
    with pytest.raises(ValueError, match="window attention"):
        tiny.TinyQwen25VLSpec(fullatt_block_indexes=(0, 1, 2, 3))
