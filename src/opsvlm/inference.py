"""Predictor: a task's inputs (sampled clip frames, an image) -> validated answers, every time. No Ray here (Serve and
Ray Data wrap it).

Decoding is constrained to the task's answer shape (:mod:`opsvlm.tasks.base`): a sequence of slots, each a choice
among a small set of strings (labels, valid times, fixed pieces of JSON), where a slot's choices may depend on
earlier ones (``end_s > start_s``). The constraint is a token trie over the canonical tokenizations of those strings,
applied as a ``LogitsProcessor`` inside ``model.generate``: exact (it only allows continuations of valid answers),
cheap (a few allowed ids per step instead of a grammar over the whole vocabulary), batched, on CPU or GPU. The
answers' fixed parts and slots fall on pre-tokenizer boundaries of Qwen's tokenizer, so slot-by-slot tokenization
equals the tokenization of the whole answer the model was trained on (a unit test checks this). The same walk gives
per-label probabilities under the constrained distribution.

Why not a grammar library: xgrammar, outlines and lm-format-enforcer constrain characters against a JSON schema or
regex over the full vocabulary. Our answer space is a handful of fixed strings, they cannot express ``start < end``
across fields, and they give no per-label scores without extra passes. The trie is exact for these answer formats
and needs no extra dependency.

An unconstrained mode (plain greedy generation + the task's ``parse_answer``) is kept so the evaluation can report
how often free generation breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from opsvlm.model.prompt import END_OF_TURN, model_inputs, prompt_text
from opsvlm.tasks.base import Task, get_task
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "AnswerConstraint",
    "Predictor",
    "label_probabilities",
]


class AnswerConstraint:
    """``LogitsProcessor`` that lets ``generate`` produce only valid answers (see the module docstring).

    The answer is the task's slots followed by one end-of-turn slot; a row is done once that token is out.

    Args:
        tokenizer: The model's tokenizer.
        task: The task whose answer shape is enforced.
        examples: The task input of each batch row (slots may depend on it, e.g. the clip length).
        prompt_length: Length of the (left-padded) prompt; generated tokens start there.
    """

    def __init__(self, tokenizer, task: Task, examples: Sequence[Any], prompt_length: int):
        self.decode = tokenizer.decode
        self.task = task
        self.examples = list(examples)
        self.eos_id = tokenizer.convert_tokens_to_ids(END_OF_TURN.strip())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.prompt_length = prompt_length
        self._tokens: dict[str, list[int]] = {}
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Canonical token ids of one slot string (cached: the same labels and times recur in every row)."""
        if text not in self._tokens:
            self._tokens[text] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._tokens[text]

    def strings(self, row: int, index: int, chosen: Sequence[str]) -> Sequence[str] | None:
        """Strings allowed in slot ``index`` of ``row`` (the task's, then the end-of-turn slot, then ``None``)."""
        allowed = self.task.answer_slot(index, chosen, self.examples[row])
        if allowed is not None:
            return allowed
        if index > 0 and self.task.answer_slot(index - 1, chosen[: index - 1], self.examples[row]) is not None:
            return [END_OF_TURN.strip()]
        return None

    def slot(self, row: int, index: int, chosen: Sequence[str]) -> list[list[int]] | None:
        """Allowed token sequences of slot ``index`` given the strings chosen in earlier slots."""
        allowed = self.strings(row, index, chosen)
        if allowed is None:
            return None
        if list(allowed) == [END_OF_TURN.strip()]:
            return [[self.eos_id]]
        return [self.encode(text) for text in allowed]

    def walk(self, row: int, generated: Sequence[int]) -> tuple[int, list[str], list[int], list[list[int]]]:
        """Follow generated tokens through the slots.

        Returns:
            ``(slot index, chosen strings so far, tokens consumed in the current slot, its allowed sequences)``.
        """
        chosen: list[str] = []
        index, consumed = 0, []
        options = self.slot(row, 0, chosen) or []
        for token in generated:
            if consumed == [self.eos_id] and options == [[self.eos_id]]:  # past the end: padding of a done row
                break
            live = [o for o in options if o[: len(consumed) + 1] == [*consumed, token]]
            if not live:  # the current slot ended with a complete option; the token starts the next slot
                chosen.append(self.decode(consumed))
                index, consumed = index + 1, []
                options = self.slot(row, index, chosen) or []
                live = [o for o in options if o[:1] == [token]]
            consumed.append(token)
            options = live
        return index, chosen, consumed, options

    def done(self, row: int, generated: Sequence[int]) -> bool:
        """Whether the row's answer is complete (its end-of-turn token generated)."""
        _, _, consumed, options = self.walk(row, generated)
        return consumed == [self.eos_id] and options == [[self.eos_id]]

    def allowed(self, row: int, generated: Sequence[int]) -> set[int]:
        index, chosen, consumed, options = self.walk(row, generated)
        if consumed == [self.eos_id] and options == [[self.eos_id]]:
            return set()
        allowed = {o[len(consumed)] for o in options if len(o) > len(consumed)}
        if any(len(o) == len(consumed) for o in options):
            following = self.slot(row, index + 1, [*chosen, self.decode(consumed)])
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
    """A model + processor + sampling spec + task that turns task inputs into answers.

    Args:
        model: A Qwen2-VL-family model (with or without a LoRA adapter), in eval mode.
        processor: Its processor.
        spec: The SamplingSpec the model was trained with (callers sample frames / size images with it).
        task: The task (or its name) the model answers.
        constrained: Constrain decoding to valid answers (default); ``False`` = free greedy generation.
        max_new_tokens: Generation budget (the constrained clip answer is ~40 tokens with Qwen's tokenizer).
    """

    def __init__(self, model, processor, spec: SamplingSpec, task: Task | str, constrained=True, max_new_tokens=96):
        self.model = model
        self.processor = processor
        self.spec = spec
        self.task = get_task(task) if isinstance(task, str) else task
        self.labels = self.task.labels
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, directory, quantization: str | None = None, constrained: bool = True) -> Predictor:
        """Load base model + adapter + processor + sampling spec + task from an opsvlm checkpoint directory.

        Args:
            directory: Checkpoint directory (see ``opsvlm.model.checkpoint``).
            quantization: Override how the base is loaded (``nf4`` / ``int8`` / ``none``); default: as trained.
            constrained: See the class.
        """
        from pathlib import Path

        from opsvlm.model import checkpoint as ckpt
        from opsvlm.model.build import ModelConfig, load_for_inference, load_processor

        meta = ckpt.read_model_meta(directory)
        config = ModelConfig(
            name=meta["base_model"],
            quantization=quantization or meta["quantization"],
            compute_dtype="auto" if torch.cuda.is_available() else "float32",
        )
        device_map = {"": 0} if torch.cuda.is_available() else None
        model = load_for_inference(meta["base_model"], Path(directory) / ckpt.ADAPTER_DIR, config, device_map)
        processor = load_processor(Path(directory) / ckpt.PROCESSOR_DIR)
        task = get_task(meta["task"])
        if list(task.labels) != list(meta["labels"]):
            raise ValueError(f"{directory}: its label set differs from task {task.name!r}'s: {meta['labels']}")
        return cls(model, processor, ckpt.sampling_spec_of(directory), task, constrained)

    @classmethod
    def from_base(
        cls,
        source: str,
        spec: SamplingSpec,
        task: Task | str,
        quantization: str = "none",
        constrained=True,
    ) -> Predictor:
        """The base model without an adapter (the zero-shot baseline)."""
        from opsvlm.model.build import ModelConfig, load_base_model, load_processor

        config = ModelConfig(name=source, quantization=quantization, compute_dtype="auto")
        device_map = {"": 0} if torch.cuda.is_available() else None
        return cls(load_base_model(config, device_map).eval(), load_processor(source), spec, task, constrained)

    def _inputs(self, examples: Sequence[Any]) -> dict:
        texts = [prompt_text(self.processor, self.task, e) for e in examples]
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
        inputs = model_inputs(self.processor, self.task, examples, texts, padding=True)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def predict(self, examples: Sequence[Any]) -> list[Any | None]:
        """Predict a batch of task inputs (the task's input type) in one ``generate`` call.

        Returns:
            One answer per input (the task's answer type); ``None`` only in unconstrained mode, for an answer
            that does not parse.
        """
        if not examples:
            return []
        inputs = self._inputs(examples)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = self.processor.tokenizer
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        if not self.constrained:
            output = self.model.generate(**inputs, **kwargs)
            texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
            return [self.task.parse_answer(text, e) for e, text in zip(examples, texts, strict=True)]

        constraint = AnswerConstraint(tokenizer, self.task, examples, prompt_length)
        output = self.model.generate(
            **inputs,
            **kwargs,
            logits_processor=[constraint],
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.stack(output.scores, dim=1).float().log_softmax(-1).cpu()  # [B, steps, V]
        return [
            self._decode_row(constraint, row, output.sequences[row, prompt_length:].tolist(), logprobs[row])
            for row in range(len(examples))
        ]

    def _decode_row(self, constraint: AnswerConstraint, row: int, generated: list[int], logprobs) -> Any:
        tokenizer = self.processor.tokenizer
        if not constraint.done(row, generated):  # ran out of tokens before the end-of-turn: raise max_new_tokens
            raise RuntimeError(
                f"constrained answer incomplete after {len(generated)} tokens: {tokenizer.decode(generated)}"
            )
        _, chosen, _, _ = constraint.walk(row, generated)  # every slot's string, without the end-of-turn
        starts = np.cumsum([0] + [len(constraint.encode(text)) for text in chosen])
        label_scores = {}
        for index in self.task.label_slots:
            allowed = list(constraint.strings(row, index, chosen[:index]))
            # A label that is a prefix of another ("rock toe" / "rock toe damaged") ends where the next slot's first
            # token comes: score each label through that token, or its mass would be counted twice.
            sequences = []
            for text in allowed:
                firsts = {o[0] for o in constraint.slot(row, index + 1, [*chosen[:index], text]) or []}
                sequences.append(constraint.encode(text) + (sorted(firsts) if len(firsts) == 1 else []))
            probs = label_probabilities(logprobs, generated, int(starts[index]), sequences)
            by_label = dict(zip(allowed, probs, strict=True))
            label_scores[index] = {label: by_label.get(label, 0.0) for label in self.task.labels}
        text = tokenizer.decode(generated, skip_special_tokens=True)
        return self.task.answer_from_slots(chosen, label_scores, text)
