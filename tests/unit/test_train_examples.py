"""Training examples: answer-only labels, the video tokens and frame rate the processor sees, and collate."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from opsvlm.model import build
from opsvlm.model.prompt import (
    END_OF_TURN,
    IGNORE_INDEX,
    collate,
    encode_row,
    encode_training_example,
    prompt_text,
)
from opsvlm.tasks.operations import ClipInput, OperationsTask, parse_answer, sampled_fps, target_text
from opsvlm.testing import tiny

TASK = OperationsTask()


def clip_example(processor, clip_frames: np.ndarray, times, clip_length_s: float, answer: str) -> dict:
    return encode_training_example(processor, TASK, ClipInput(clip_frames, list(times), clip_length_s), answer)


# Uneven times (as motion sampling gives them): mean spacing 1.2667 s, i.e. 0.79 fps, far from the processor's
# default of 2 fps, so a processor that ignored the real rate would be caught.
TIMES = (0.0, 1.2, 2.5, 3.8)
ANSWER = target_text("Assemble Box", 0.5, 3.5, "Insert Items")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny.ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache")))


@pytest.fixture(scope="module")
def processor(tiny_dir: str):
    return build.load_processor(tiny_dir)


def frames(k: int = 4, height: int = 56, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(k, height, width, 3), dtype=np.uint8)


def unmasked(example: dict) -> torch.Tensor:
    labels = example["labels"][0]
    return labels[labels != IGNORE_INDEX]


def test_labels_mask_everything_but_the_answer_and_end_of_turn(processor) -> None:
    example = clip_example(processor, frames(), TIMES, 4.0, ANSWER)
    input_ids, labels = example["input_ids"][0], example["labels"][0]
    tokenizer = processor.tokenizer

    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    end_ids = tokenizer(END_OF_TURN, add_special_tokens=False)["input_ids"]
    assert end_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>"), *tokenizer("\n")["input_ids"]]
    n = len(answer_ids) + len(end_ids)
    # Exactly the last n positions are supervised, with the tokens that are there; the prompt (system, user turn with
    # the video, "<|im_start|>assistant\n") contributes nothing to the loss.
    assert (labels[:-n] == IGNORE_INDEX).all()
    assert labels[-n:].tolist() == input_ids[-n:].tolist() == answer_ids + end_ids
    assert tokenizer.decode(unmasked(example)) == ANSWER + END_OF_TURN
    assert tokenizer.decode(labels[-n : -len(end_ids)]) == ANSWER
    assert json.loads(tokenizer.decode(labels[-n : -len(end_ids)])) == {
        "operation": "Assemble Box",
        "start_s": 0.5,
        "end_s": 3.5,
        "next_operation": "Insert Items",
    }
    # What precedes the answer is the generation prompt, with the video placeholder expanded.
    prompt = tokenizer.decode(input_ids[:-n])
    expected = prompt_text(processor, TASK, ClipInput(frames(), list(TIMES), 4.0))
    assert prompt.replace("<|video_pad|>", "") == expected.replace("<|video_pad|>", "")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert example["attention_mask"].all()


def test_encode_row_targets_the_clip_labels_and_the_real_frame_rate(processor) -> None:
    clip = frames(seed=3)
    row = {  # the fields of opsvlm.data.pipeline.CLIP_SCHEMA that training reads
        "frames": clip.tobytes(),
        "frame_shape": list(clip.shape),
        "frame_times_s": list(TIMES),
        "start_s": 100.0,
        "end_s": 104.0,
        "dominant_operation": "Close Box",
        "temporal_segment": [0.25, 3.95],
        "next_operation": "Attach Box Label",
    }
    example = encode_row(processor, row, "operations")
    text = processor.tokenizer.decode(unmasked(example))
    assert text == target_text("Close Box", 0.25, 3.95, "Attach Box Label") + END_OF_TURN
    assert parse_answer(text, 4.0).operation == "Close Box"
    assert "a 4.0 s clip" in processor.tokenizer.decode(example["input_ids"][0])
    # The processor is told the sampled frames' real (mean) rate: one temporal patch = 2 frames = 2 / fps seconds.
    fps = sampled_fps(TIMES)
    assert fps == pytest.approx(3 / 3.8)
    assert example["second_per_grid_ts"].tolist() == pytest.approx([2 / fps], rel=1e-6)
    # The frames go in exactly as given: not resampled, not resized.
    assert example["video_grid_thw"].tolist() == [[2, 4, 4]]


def test_sampled_fps() -> None:
    assert sampled_fps([0.0, 0.5, 1.0, 1.5]) == pytest.approx(2.0)
    assert sampled_fps([10.0, 10.1, 10.2, 12.0]) == pytest.approx(1.5)  # mean spacing of uneven frames
    assert sampled_fps([3.0, 3.0]) == 1.0  # degenerate span: a harmless default instead of a division by zero


@pytest.mark.parametrize(
    ("k", "height", "width", "tokens"),
    [
        (4, 56, 56, 8),  # (4 / 2) * (56 / 14) * (56 / 14) / 4
        (4, 56, 84, 12),  # 2 * 4 * 6 / 4
        (8, 112, 56, 32),  # 4 * 8 * 4 / 4
        (4, 28, 56, 4),  # small frames are not upscaled (transformers' default min_pixels would make this 128)
    ],
)
def test_video_tokens_follow_frame_size_without_upscaling(processor, k: int, height: int, width: int, tokens: int):
    times = [i * 0.5 for i in range(k)]
    example = clip_example(processor, frames(k, height, width), times, 4.0, ANSWER)
    assert example["video_grid_thw"].tolist() == [[k // 2, height // 14, width // 14]]
    assert int((example["input_ids"] == processor.video_token_id).sum()) == tokens
    # Every video token stands for 2x2 merged patches of 2 frames x 14 x 14 pixels x 3 channels.
    assert example["pixel_values_videos"].shape == (tokens * 4, 3 * 2 * 14 * 14)
    assert example["second_per_grid_ts"].tolist() == pytest.approx([1.0])  # 2 fps
    assert (example["mm_token_type_ids"][0] != 0).sum() == tokens


@pytest.fixture(scope="module")
def two_examples(processor) -> list[dict]:
    """Different video sizes and answer lengths, so padding and patch concatenation both matter."""
    short = clip_example(processor, frames(4, 56, 56, seed=1), TIMES, 4.0, target_text("Null", 0, 4, "Null"))
    long = clip_example(processor, frames(4, 84, 56, seed=2), (0.0, 0.5, 1.0, 1.5), 2.0, ANSWER)
    assert short["input_ids"].shape[1] < long["input_ids"].shape[1]
    return [short, long]


def test_collate_pads_and_concatenates(processor, two_examples) -> None:
    pad_id = processor.tokenizer.pad_token_id
    batch = collate(two_examples, pad_id)
    short, long = two_examples
    n_short, n_long = short["input_ids"].shape[1], long["input_ids"].shape[1]
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "labels",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    }
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        assert batch[key].shape == (2, n_long) and batch[key].dtype == torch.int64, key
        assert torch.equal(batch[key][0, :n_short], short[key][0]), key  # right padding: content first
        assert torch.equal(batch[key][1], long[key][0]), key
    pads = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    for key, value in pads.items():
        assert (batch[key][0, n_short:] == value).all(), key
    assert pad_id == processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Video patches of both clips, in batch order; one grid row and one temporal spacing per clip.
    assert torch.equal(
        batch["pixel_values_videos"], torch.cat([short["pixel_values_videos"], long["pixel_values_videos"]])
    )
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 6, 4]]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / sampled_fps(TIMES), 1.0])


def test_collated_batch_matches_each_example_alone(tiny_dir: str, processor, two_examples) -> None:
    """The padded batch computes the same logits and loss as the examples one by one (padding and video patch order
    are consistent with the model's mRoPE positions)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    batch = collate(two_examples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = model(**batch)
        alone = [model(**ex) for ex in two_examples]
    tokens = [int((ex["labels"] != IGNORE_INDEX).sum()) for ex in two_examples]
    for i, (ex, out) in enumerate(zip(two_examples, alone, strict=True)):
        n = ex["input_ids"].shape[1]
        torch.testing.assert_close(batched.logits[i, :n], out.logits[0], atol=1e-4, rtol=1e-4)
    # The batch loss is the mean over every supervised token of both examples.
    expected = sum(out.loss * t for out, t in zip(alone, tokens, strict=True)) / sum(tokens)
    assert batched.loss.item() == pytest.approx(expected.item(), rel=1e-4)
