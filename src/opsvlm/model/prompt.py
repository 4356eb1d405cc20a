"""Turn task inputs into model inputs: chat prompt with the media, target answer, answer-only labels, collate.

Pure torch + the Hugging Face processor; no Ray. What is asked and how the pixels reach the processor is the task's
business (:mod:`opsvlm.tasks`): for video the processor gets the real frame rate of the sampled frames so
Qwen2.5-VL's mRoPE places them at their true times, and it is told not to sample frames itself (they are already
sampled by the model's :class:`~opsvlm.video.sampling.SamplingSpec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from opsvlm.tasks.base import Task, get_task

__all__ = [
    "END_OF_TURN",
    "IGNORE_INDEX",
    "MEDIA_KEYS",
    "TOKEN_KEYS",
    "collate",
    "encode_row",
    "encode_training_example",
    "model_inputs",
    "prompt_text",
]

IGNORE_INDEX = -100  # label value the loss skips
END_OF_TURN = "<|im_end|>\n"
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
MEDIA_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")


def prompt_text(processor, task: Task, example: Any) -> str:
    """The chat-template text up to the assistant's turn (what generation starts from)."""
    return processor.apply_chat_template(task.messages(example), tokenize=False, add_generation_prompt=True)


def model_inputs(processor, task: Task, examples: Sequence[Any], texts: Sequence[str], padding: bool = False) -> dict:
    """Run the processor on chat texts, each holding one media placeholder for its example.

    Returns:
        Processor outputs: ``input_ids`` int64[B, L], ``attention_mask``, ``mm_token_type_ids``, and for video
        ``pixel_values_videos`` float[P, D], ``video_grid_thw`` int64[B, 3], ``second_per_grid_ts`` float[B]; for
        images ``pixel_values`` float[P, D], ``image_grid_thw`` int64[B, 3].
    """
    return processor(text=list(texts), **task.processor_kwargs(examples), padding=padding, return_tensors="pt")


def encode_training_example(processor, task: Task, example: Any, answer: str) -> dict:
    """One supervised example: prompt + answer, with the loss on the answer tokens only.

    Args:
        processor: The model's processor.
        task: The task (prompt and pixels).
        example: The task's input (e.g. :class:`opsvlm.tasks.operations.ClipInput`).
        answer: The target text (``task.target_of(row)``).

    Returns:
        Processor outputs for a batch of one plus ``labels`` int64[1, L]: ``IGNORE_INDEX`` everywhere except the
        answer and its end-of-turn token.
    """
    full = prompt_text(processor, task, example) + answer + END_OF_TURN
    inputs = model_inputs(processor, task, [example], [full])
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


def encode_row(processor, row: Mapping[str, Any], task: Task | str) -> dict:
    """A prepared dataset row as a supervised example of ``task``."""
    task = get_task(task) if isinstance(task, str) else task
    return encode_training_example(processor, task, task.input_of(row), task.target_of(row))


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch examples: right-pad token tensors, concatenate the media patches.

    Args:
        examples: Outputs of :func:`encode_training_example` (each a batch of one).
        pad_token_id: The tokenizer's pad id.

    Returns:
        ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` / ``labels`` int64[B, L_max]; the media tensors
        of :func:`model_inputs` concatenated over the batch (patches ``[sum P, D]``, grids ``[B, 3]``).
    """
    length = max(ex["input_ids"].shape[1] for ex in examples)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key in TOKEN_KEYS:
        if key not in examples[0]:
            continue
        rows = [ex[key][0] for ex in examples]
        pad = pad_values[key]
        batch[key] = torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0]), value=pad) for r in rows])
    for key in MEDIA_KEYS:
        if key in examples[0]:
            batch[key] = torch.cat([ex[key] for ex in examples])
    return batch
