"""Turn clip rows into model inputs: chat prompt with the clip as a video, JSON target, answer-only labels, collate.

Pure torch + the Hugging Face processor; no Ray. The processor gets the real frame rate of the sampled frames so
Qwen2.5-VL's mRoPE places them at their true times, and it is told not to sample frames itself (they are already
sampled by the model's :class:`~opsvlm.video.sampling.SamplingSpec`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from opsvlm.tasks.operations import chat_messages, target_text

IGNORE_INDEX = -100  # label value the loss skips
END_OF_TURN = "<|im_end|>\n"


def sampled_fps(frame_times_s: Sequence[float]) -> float:
    """Average frame rate of sampled frames: what Qwen2.5-VL's temporal position ids assume between frames.

    Motion-sampled frames are not evenly spaced; their mean spacing is the closest single rate (the prompt also
    lists the exact times).
    """
    span = float(frame_times_s[-1]) - float(frame_times_s[0])
    return (len(frame_times_s) - 1) / span if span > 0 else 1.0


def video_metadata(frame_times_s: Sequence[float]) -> dict:
    """What the processor needs to know about already-sampled frames: their rate, count and that it keeps them all."""
    count = len(frame_times_s)
    return {"fps": sampled_fps(frame_times_s), "total_num_frames": count, "frames_indices": list(range(count))}


def video_inputs(processor, frames: np.ndarray, frame_times_s: Sequence[float], text: str) -> dict:
    """Run the processor on one prompt with one video.

    Args:
        processor: A Qwen2-VL / Qwen2.5-VL processor.
        frames: uint8[K, H, W, 3] sampled frames (K even; H, W multiples of 28 as the SamplingSpec makes them).
        frame_times_s: float[K] clip-relative times.
        text: The full chat text containing one video placeholder.

    Returns:
        Processor outputs for a batch of one: ``input_ids`` int64[1, L], ``attention_mask``, ``mm_token_type_ids``,
        ``pixel_values_videos`` float[P, D], ``video_grid_thw`` int64[1, 3], ``second_per_grid_ts`` float[1].
    """
    metadata = {
        "fps": sampled_fps(frame_times_s),
        "total_num_frames": len(frames),
        "frames_indices": list(range(len(frames))),
    }
    return processor(
        text=[text],
        videos=[np.asarray(frames)],
        video_metadata=[metadata],
        do_sample_frames=False,
        return_tensors="pt",
    )


def prompt_text(processor, clip_length_s: float, frame_times_s: Sequence[float]) -> str:
    """The chat-template text up to the assistant's turn (what generation starts from)."""
    return processor.apply_chat_template(
        chat_messages(clip_length_s, list(frame_times_s)), tokenize=False, add_generation_prompt=True
    )


def encode_training_example(
    processor, frames: np.ndarray, frame_times_s: Sequence[float], clip_length_s: float, answer: str
) -> dict:
    """One supervised example: prompt + answer, with the loss on the answer tokens only.

    Args:
        processor: The model's processor.
        frames: uint8[K, H, W, 3].
        frame_times_s: float[K] clip-relative times.
        clip_length_s: Clip length in seconds.
        answer: The target text (see :func:`opsvlm.tasks.operations.target_text`).

    Returns:
        Processor outputs plus ``labels`` int64[1, L]: ``IGNORE_INDEX`` everywhere except the answer and its
        end-of-turn token.
    """
    full = prompt_text(processor, clip_length_s, frame_times_s) + answer + END_OF_TURN
    inputs = video_inputs(processor, frames, frame_times_s, full)
    answer_ids = processor.tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
    input_ids = inputs["input_ids"][0]
    n = len(answer_ids)
    # The answer follows "<|im_start|>assistant\n", a token boundary in Qwen's pre-tokenizer, so it tokenizes the
    # same alone as in context; check rather than assume, since a mismatch would train on the wrong tokens.
    if input_ids[-n:].tolist() != answer_ids:
        raise ValueError("answer tokens differ in context; cannot mask the prompt reliably for this tokenizer")
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[0, -n:] = input_ids[-n:]
    inputs["labels"] = labels
    return dict(inputs)


def encode_row(processor, row: dict) -> dict:
    """A prepared clip row (see ``opsvlm.data.pipeline.CLIP_SCHEMA``) as a supervised example."""
    # a writable copy: the processor turns it into a tensor, and torch warns on read-only buffers
    frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(tuple(row["frame_shape"])).copy()
    start, end = row["temporal_segment"]
    answer = target_text(row["dominant_operation"], start, end, row["next_operation"])
    return encode_training_example(processor, frames, row["frame_times_s"], row["end_s"] - row["start_s"], answer)


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch examples: right-pad token tensors, concatenate the video patches.

    Args:
        examples: Outputs of :func:`encode_training_example` (each a batch of one).
        pad_token_id: The tokenizer's pad id.

    Returns:
        ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` / ``labels`` int64[B, L_max],
        ``pixel_values_videos`` float[sum P, D], ``video_grid_thw`` int64[B, 3], ``second_per_grid_ts`` float[B].
    """
    length = max(ex["input_ids"].shape[1] for ex in examples)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key, pad in pad_values.items():
        if key not in examples[0]:
            continue
        rows = [ex[key][0] for ex in examples]
        batch[key] = torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0]), value=pad) for r in rows])
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in examples[0]:
            batch[key] = torch.cat([ex[key] for ex in examples])
    return batch
