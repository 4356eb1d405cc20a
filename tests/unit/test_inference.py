"""Constrained decoding always yields valid answers, on real (tiny, random-weight) Qwen2.5-VL models."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsvlm.inference import AnswerConstraint, Predictor
from opsvlm.model.build import ModelConfig, load_base_model, load_processor
from opsvlm.tasks.operations import LABEL_NAMES, ClipInput, OperationsTask, parse_answer, target_text, time_choices
from opsvlm.testing.tiny import ensure_tiny_model
from opsvlm.video.sampling import SamplingSpec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(ensure_tiny_model(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def predictor(tiny_dir):
    model = load_base_model(ModelConfig(name=tiny_dir, quantization="none", compute_dtype="float32")).eval()
    spec = SamplingSpec(frames_per_clip=4, max_pixels=56 * 56)
    return Predictor(model, load_processor(tiny_dir), spec, task="operations")


def test_slot_tokenization_equals_whole_answer_tokenization(predictor):
    tokenizer = predictor.processor.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    parts = ('{"operation": "', '", "start_s": ', ', "end_s": ', ', "next_operation": "', '"}')
    for operation in LABEL_NAMES:
        for start, end in [(0.0, 5.0), (1.2, 3.4), (9.9, 12.3)]:
            nxt = LABEL_NAMES[(LABEL_NAMES.index(operation) + 3) % len(LABEL_NAMES)]
            pieces = [parts[0], operation, parts[1], f"{start:.1f}", parts[2], f"{end:.1f}", parts[3], nxt, parts[4]]
            assert [t for p in pieces for t in encode(p)] == encode(target_text(operation, start, end, nxt))


def test_time_choices_cover_the_clip_on_a_tenth_second_grid():
    assert time_choices(0.5) == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"]
    assert time_choices(5.0)[-1] == "5.0" and len(time_choices(5.0)) == 51


def test_constraint_walk_allows_only_valid_continuations(predictor):
    tokenizer = predictor.processor.tokenizer
    clip = ClipInput(np.zeros((4, 56, 56, 3), np.uint8), [0.0, 0.5, 1.0, 1.5], 2.0)
    constraint = AnswerConstraint(tokenizer, OperationsTask(), [clip], prompt_length=0)
    answer = tokenizer(target_text("Scan Label", 1.5, 1.9, "Null") + "<|im_end|>", add_special_tokens=False)
    ids = answer["input_ids"]
    for i in range(len(ids)):
        assert ids[i] in constraint.allowed(0, ids[:i]), tokenizer.decode(ids[: i + 1])
    # after a start of 1.5 s no end at or before 1.5 s is allowed
    prefix = tokenizer('{"operation": "Scan Label", "start_s": 1.5, "end_s": ', add_special_tokens=False)["input_ids"]
    digits = {tokenizer.decode([t]) for t in constraint.allowed(0, prefix)}
    assert digits == {"1", "2"}  # 1.6 .. 1.9 or 2.0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    clip_length=st.floats(0.5, 12.0),
    frames=st.sampled_from([2, 4, 6]),
    batch=st.integers(1, 3),
)
def test_constrained_predictions_are_always_valid(predictor, seed, clip_length, frames, batch):
    # a random model: perturb every weight of the tiny model (restored afterwards)
    generator = torch.Generator().manual_seed(seed)
    originals = {n: p.detach().clone() for n, p in predictor.model.named_parameters()}
    with torch.no_grad():
        for p in predictor.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    rng = np.random.default_rng(seed)
    clips = [
        ClipInput(
            rng.integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8),
            np.linspace(0, clip_length * 0.9, frames).tolist(),
            clip_length,
        )
        for _ in range(batch)
    ]
    try:
        predictions = predictor.predict(clips)
    finally:
        with torch.no_grad():
            for n, p in predictor.model.named_parameters():
                p.copy_(originals[n])
    assert len(predictions) == batch
    for clip, prediction in zip(clips, predictions, strict=True):
        assert prediction.operation in LABEL_NAMES and prediction.next_operation in LABEL_NAMES
        assert 0 <= prediction.start_s < prediction.end_s <= clip.clip_length_s + 1e-9
        assert sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert sum(prediction.next_scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction.confidence == prediction.scores[prediction.operation]
        assert parse_answer(prediction.text, clip.clip_length_s) is not None


def test_unconstrained_mode_reports_unparseable_answers_as_none(predictor):
    predictor.constrained = False
    try:
        clip = ClipInput(np.zeros((4, 56, 56, 3), np.uint8), [0.0, 1.0, 2.0, 3.0], 4.0)
        (prediction,) = predictor.predict([clip])
    finally:
        predictor.constrained = True
    # an untrained model does not produce the answer format; it must be reported, not repaired
    assert prediction is None or parse_answer(prediction.text, 4.0) is not None


def test_parse_answer_validates_labels_and_times():
    good = target_text("Picking", 0.5, 2.0, "Relocate Item Label")
    assert parse_answer("noise " + good + " trailing", 5.0).operation == "Picking"
    assert parse_answer(good.replace("Picking", "Juggling"), 5.0) is None
    assert parse_answer(target_text("Picking", 3.0, 2.0, "Null"), 5.0) is None
    assert parse_answer("{not json}", 5.0) is None
    assert parse_answer(target_text("Picking", 1.0, 9.0, "Null"), 5.0).end_s == 5.0  # clipped to the clip
