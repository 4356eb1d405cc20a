"""Predictor: sampled clip frames -> a validated prediction, every time. No Ray here (Serve and Ray Data wrap it).

Decoding is constrained to the answer's exact shape::

    {"operation": "<label>", "start_s": <a>, "end_s": <b>, "next_operation": "<label>"}

with labels from the label set, times on the 0.1 s grid the model is trained on, and 0 <= a < b <= clip length.
Each slot is a choice among a small set of strings (labels, or the valid times), so the constraint is a token trie
over their canonical tokenizations, applied as a ``LogitsProcessor`` inside ``model.generate``: exact (it only
allows continuations of valid answers), cheap (a few allowed ids per step instead of a grammar over the whole
vocabulary), batched, on CPU or GPU. The answer's fixed parts and slots fall on pre-tokenizer boundaries of Qwen's
tokenizer, so slot-by-slot tokenization equals the tokenization of the whole answer the model was trained on (a unit
test checks this). The same walk gives per-label probabilities under the constrained distribution.

Why not a grammar library: xgrammar, outlines and lm-format-enforcer constrain characters against a JSON schema or
regex over the full vocabulary. Our answer space is a handful of fixed strings, they cannot express ``start < end``
across fields, and they give no per-label scores without extra passes. The trie is exact for this answer format
and needs no extra dependency.

An unconstrained mode (plain greedy generation + :func:`opsvlm.tasks.operations.parse_answer`) is kept so the
evaluation can report how often free generation breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from opsvlm.tasks.operations import LABEL_NAMES, parse_answer
from opsvlm.train.examples import END_OF_TURN, prompt_text, video_metadata
from opsvlm.video.sampling import SamplingSpec

ANSWER_PARTS = ('{"operation": "', '", "start_s": ', ', "end_s": ', ', "next_operation": "', '"}')
TIME_STEP = 0.1  # the answer's time resolution (targets are written with one decimal)


@dataclass
class ClipInput:
    """One clip to predict on.

    Attributes:
        frames: uint8[K, H, W, 3] frames already sampled with the model's SamplingSpec.
        frame_times_s: float[K] their clip-relative times.
        clip_length_s: Clip length in seconds.
    """

    frames: np.ndarray
    frame_times_s: Sequence[float]
    clip_length_s: float


@dataclass
class Prediction:
    """A validated answer: labels from the label set, 0 <= start_s < end_s <= clip length.

    Attributes:
        operation: Dominant operation.
        start_s: Its start inside the clip.
        end_s: Its end inside the clip.
        next_operation: The operation that follows.
        confidence: Probability of ``operation`` under the constrained distribution.
        scores: Probability per label for ``operation`` (labels pruned before their first token get 0).
        next_scores: The same for ``next_operation``.
        text: The generated text.
    """

    operation: str
    start_s: float
    end_s: float
    next_operation: str
    confidence: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    next_scores: dict[str, float] = field(default_factory=dict)
    text: str = ""

    def to_dict(self) -> dict:
        return {
            "operation": self.operation,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "next_operation": self.next_operation,
            "confidence": self.confidence,
            "scores": self.scores,
            "next_scores": self.next_scores,
        }


def time_choices(clip_length_s: float) -> list[str]:
    """Every answer time on the 0.1 s grid within the clip, as text (``"0.0"`` ... ``"5.0"``)."""
    steps = int(np.floor(clip_length_s / TIME_STEP + 1e-6))
    return [f"{k * TIME_STEP:.1f}" for k in range(steps + 1)]


class _Slots:
    """The answer as a sequence of slots for one clip; each slot is a list of allowed token sequences."""

    def __init__(self, encode, labels: Sequence[str], clip_length_s: float, eos_id: int):
        self.parts = [[encode(part)] for part in ANSWER_PARTS]
        self.labels = [encode(label) for label in labels]
        self.times = {t: encode(t) for t in time_choices(clip_length_s)}
        self.eos = [[eos_id]]

    def slot(self, index: int, chosen: list[str]) -> list[list[int]] | None:
        """Allowed token sequences of slot ``index`` given the strings chosen in earlier slots."""
        times = list(self.times)
        if index == 3:  # start: leave room for an end after it
            return [self.times[t] for t in times[:-1]]
        if index == 5:  # end: strictly after the chosen start
            start = float(chosen[3])
            return [self.times[t] for t in times if float(t) > start + 1e-9]
        layout = {0: self.parts[0], 1: self.labels, 2: self.parts[1], 4: self.parts[2], 6: self.parts[3]}
        layout.update({7: self.labels, 8: self.parts[4], 9: self.eos})
        return layout.get(index)


class AnswerConstraint:
    """``LogitsProcessor`` that lets ``generate`` produce only valid answers (see the module docstring).

    Args:
        tokenizer: The model's tokenizer.
        clip_lengths_s: Clip length per batch row.
        prompt_length: Length of the (left-padded) prompt; generated tokens start there.
        labels: The label set.
    """

    def __init__(self, tokenizer, clip_lengths_s: Sequence[float], prompt_length: int, labels=LABEL_NAMES):
        self.decode = tokenizer.decode
        eos_id = tokenizer.convert_tokens_to_ids(END_OF_TURN.strip())

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.slots = [_Slots(encode, labels, length, eos_id) for length in clip_lengths_s]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        self.prompt_length = prompt_length

    def walk(self, row: int, generated: Sequence[int]) -> tuple[int, list[str], list[int], list[list[int]]]:
        """Follow generated tokens through the slots.

        Returns:
            ``(slot index, chosen strings so far, tokens consumed in the current slot, its allowed sequences)``.
        """
        slots, chosen, index, consumed = self.slots[row], [], 0, []
        options = slots.slot(0, chosen)
        for token in generated:
            if index == len(ANSWER_PARTS) + 4 and consumed:  # past the end-of-turn token: padding of a done row
                break
            live = [o for o in options if o[: len(consumed) + 1] == [*consumed, token]]
            if not live:  # the current slot ended with a complete option; the token starts the next slot
                chosen.append(self.decode(consumed))
                index, consumed = index + 1, []
                options = slots.slot(index, chosen) or []
                live = [o for o in options if o[:1] == [token]]
            consumed.append(token)
            options = live
        return index, chosen, consumed, options

    def allowed(self, row: int, generated: Sequence[int]) -> set[int]:
        index, chosen, consumed, options = self.walk(row, generated)
        allowed = {o[len(consumed)] for o in options if len(o) > len(consumed)}
        if any(len(o) == len(consumed) for o in options):
            following = self.slots[row].slot(index + 1, [*chosen, self.decode(consumed)])
            allowed |= {o[0] for o in following or []}
        return allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            # empty once a row is finished: generate pads it anyway, keep one finite entry to avoid NaN scores
            allowed = self.allowed(row, input_ids[row, self.prompt_length :].tolist()) or {self.pad_id}
            mask[row, list(allowed)] = 0.0
        return scores + mask


def label_probabilities(
    step_logprobs: Sequence[torch.Tensor], generated: Sequence[int], start: int, labels: Sequence[list[int]]
) -> list[float]:
    """Probability of each label in a label slot under the constrained distribution.

    Along the generated path, the constrained distribution at each step splits its mass between the chosen token
    and the tokens that leave the path. A label that leaves the path at some step gets the mass of its leaving
    token there (shared equally with any other label leaving through the same token: telling those apart would
    need another forward pass); the chosen label gets the product along the whole path. The result sums to 1.

    Args:
        step_logprobs: Per generated step, float[V] log-probabilities after the constraint.
        generated: Generated token ids.
        start: Step at which the label slot starts.
        labels: Token sequences of the labels.
    """
    exits: list[tuple[int, int] | None] = []
    masses: dict[tuple[int, int] | None, float] = {}
    for tokens in labels:
        logp, key = 0.0, None
        for offset, token in enumerate(tokens):
            step = start + offset
            logp += float(step_logprobs[step][token])
            if generated[step] != token:
                key = (step, token)
                break
        exits.append(key)
        masses[key] = float(np.exp(logp))
    sharing = {key: exits.count(key) for key in masses}
    return [masses[key] / sharing[key] for key in exits]


class Predictor:
    """A model + processor + sampling spec that turns clips into predictions.

    Args:
        model: A Qwen2-VL-family model (with or without a LoRA adapter), in eval mode.
        processor: Its processor.
        spec: The SamplingSpec the model was trained with (callers sample frames with it).
        labels: The label set.
        constrained: Constrain decoding to valid answers (default); ``False`` = free greedy generation.
        max_new_tokens: Generation budget (the constrained answer is ~40 tokens with Qwen's tokenizer).
    """

    def __init__(self, model, processor, spec: SamplingSpec, labels=LABEL_NAMES, constrained=True, max_new_tokens=96):
        self.model = model
        self.processor = processor
        self.spec = spec
        self.labels = tuple(labels)
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, directory, quantization: str | None = None, constrained: bool = True) -> Predictor:
        """Load base model + adapter + processor + sampling spec from an opsvlm checkpoint directory.

        Args:
            directory: Checkpoint directory (see ``opsvlm.train.checkpoint``).
            quantization: Override how the base is loaded (``nf4`` / ``none``); default: as trained.
            constrained: See the class.
        """
        from pathlib import Path

        from opsvlm.model.build import ModelConfig, load_for_inference, load_processor
        from opsvlm.train import checkpoint as ckpt

        meta = ckpt.read_model_meta(directory)
        config = ModelConfig(
            name=meta["base_model"],
            quantization=quantization or meta["quantization"],
            compute_dtype="auto" if torch.cuda.is_available() else "float32",
        )
        device_map = {"": 0} if torch.cuda.is_available() else None
        model = load_for_inference(meta["base_model"], Path(directory) / ckpt.ADAPTER_DIR, config, device_map)
        processor = load_processor(Path(directory) / ckpt.PROCESSOR_DIR)
        return cls(model, processor, ckpt.sampling_spec_of(directory), meta["labels"], constrained)

    @classmethod
    def from_base(cls, source: str, spec: SamplingSpec, quantization: str = "none", constrained=True) -> Predictor:
        """The base model without an adapter (the zero-shot baseline)."""
        from opsvlm.model.build import ModelConfig, load_base_model, load_processor

        config = ModelConfig(name=source, quantization=quantization, compute_dtype="auto")
        device_map = {"": 0} if torch.cuda.is_available() else None
        return cls(load_base_model(config, device_map).eval(), load_processor(source), spec, LABEL_NAMES, constrained)

    def _inputs(self, clips: Sequence[ClipInput]) -> dict:
        texts = [prompt_text(self.processor, c.clip_length_s, c.frame_times_s) for c in clips]
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
        inputs = self.processor(
            text=texts,
            videos=[np.asarray(c.frames) for c in clips],
            video_metadata=[video_metadata(c.frame_times_s) for c in clips],
            do_sample_frames=False,
            padding=True,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def predict(self, clips: Sequence[ClipInput]) -> list[Prediction | None]:
        """Predict a batch of clips in one ``generate`` call.

        Returns:
            One prediction per clip; ``None`` only in unconstrained mode, for an answer that does not parse.
        """
        if not clips:
            return []
        inputs = self._inputs(clips)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = self.processor.tokenizer
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        if not self.constrained:
            output = self.model.generate(**inputs, **kwargs)
            texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
            predictions = []
            for clip, text in zip(clips, texts, strict=True):
                answer = parse_answer(text, clip.clip_length_s)
                predictions.append(None if answer is None else Prediction(**vars(answer), text=text))
            return predictions

        constraint = AnswerConstraint(tokenizer, [c.clip_length_s for c in clips], prompt_length, self.labels)
        output = self.model.generate(
            **inputs,
            **kwargs,
            logits_processor=[constraint],
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.stack(output.scores, dim=1).float().log_softmax(-1).cpu()  # [B, steps, V]
        predictions = []
        for row, clip in enumerate(clips):
            generated = output.sequences[row, prompt_length:].tolist()
            predictions.append(self._decode_row(constraint, row, generated, logprobs[row], clip))
        return predictions

    def _decode_row(self, constraint: AnswerConstraint, row: int, generated: list[int], logprobs, clip) -> Prediction:
        tokenizer = self.processor.tokenizer
        index, chosen, consumed, _ = constraint.walk(row, generated)
        chosen = [*chosen, tokenizer.decode(consumed)]
        if index < len(ANSWER_PARTS) + 4:  # ran out of tokens before the end-of-turn: raise max_new_tokens
            raise RuntimeError(f"constrained answer incomplete after {len(generated)} tokens: {chosen}")
        slots = constraint.slots[row]
        starts = np.cumsum([0] + [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chosen[:-1]])
        op_probs = label_probabilities(logprobs, generated, int(starts[1]), slots.labels)
        next_probs = label_probabilities(logprobs, generated, int(starts[7]), slots.labels)
        operation, next_operation = chosen[1], chosen[7]
        scores = dict(zip(self.labels, op_probs, strict=True))
        return Prediction(
            operation=operation,
            start_s=float(chosen[3]),
            end_s=float(chosen[5]),
            next_operation=next_operation,
            confidence=scores[operation],
            scores=scores,
            next_scores=dict(zip(self.labels, next_probs, strict=True)),
            text=tokenizer.decode(generated, skip_special_tokens=True),
        )
