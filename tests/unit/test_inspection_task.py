"""The inspection task: spatial relations, marking, prompt, answer slots over prefix labels with the tiny tokenizer,
the image path through the real Qwen processor, metrics, and the weighted answer loss on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opsvlm.inference import AnswerConstraint, Predictor
from opsvlm.model.build import ModelConfig, load_base_model, load_processor
from opsvlm.model.prompt import collate, encode_row, encode_training_example, model_inputs, prompt_text
from opsvlm.tasks.base import get_task
from opsvlm.tasks.inspection import (
    ANSWER_PARTS,
    CLASSES_OF_TYPE,
    MAX_OTHERS,
    ConditionAnswer,
    InspectionTask,
    ObjectInput,
    compute_metrics,
    default_thickness,
    mark_target,
    object_input,
    parse_answer,
    render_closeup,
    render_input,
    spatial_relation,
    target_text,
)
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES
from opsvlm.testing.tiny import ensure_tiny_model
from opsvlm.train.weighting import weighted_answer_loss
from opsvlm.video.sampling import SamplingSpec

TASK = InspectionTask()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(ensure_tiny_model(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_base_model(ModelConfig(name=tiny_dir, quantization="none", compute_dtype="float32")).eval()


def _image(height=56, width=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _row(condition: str, target_type: str | None, seed: int = 0, others=()) -> dict:
    """A prepared row (the schema of opsvlm.data.inspection_prep) around a random 56x56 rendered image."""
    image = _image(seed=seed)
    return {
        "example_id": f"train/img{seed}#0",
        "split": "train",
        "image_id": f"train/img{seed}",
        "image": image.tobytes(),
        "image_shape": list(image.shape),
        "target_index": 0,
        "target_box": [0.1, 0.2, 0.5, 0.6],
        "target_type": target_type or "",
        "condition": condition,
        "object_types": [kind for kind, _ in others],
        "object_boxes": [list(box) for _, box in others],
        "status": "ok",
    }


# --- spatial relations -------------------------------------------------------------------------------------------


def test_spatial_relation_names_the_side_of_the_first_box() -> None:
    centre = (0.4, 0.4, 0.6, 0.6)
    assert spatial_relation((0.4, 0.0, 0.6, 0.2), centre) == "above"
    assert spatial_relation((0.4, 0.8, 0.6, 1.0), centre) == "below"
    assert spatial_relation((0.0, 0.4, 0.2, 0.6), centre) == "left"
    assert spatial_relation((0.8, 0.4, 1.0, 0.6), centre) == "right"
    assert spatial_relation((0.0, 0.0, 0.1, 0.1), centre) == "above-left"
    assert spatial_relation((0.8, 0.0, 0.9, 0.1), centre) == "above-right"
    assert spatial_relation((0.0, 0.8, 0.1, 0.9), centre) == "below-left"
    assert spatial_relation((0.85, 0.85, 1.0, 1.0), centre) == "below-right"


def test_spatial_relation_dead_zone_alignment_and_overlap() -> None:
    # centres 0.03 apart horizontally: within the dead zone, so only the vertical word
    assert spatial_relation((0.63, 0.0, 0.73, 0.1), (0.6, 0.5, 0.7, 0.6)) == "above"
    # 0.1 apart and neither extent holds the other's centre: a horizontal word too
    assert spatial_relation((0.75, 0.0, 0.85, 0.1), (0.6, 0.5, 0.7, 0.6)) == "above-right"
    # a rock toe across the whole width is below a drain, whatever the drain's x
    assert spatial_relation((0.0, 0.7, 1.0, 0.8), (0.05, 0.1, 0.15, 0.5)) == "below"
    # a small box mostly inside a large one
    assert spatial_relation((0.3, 0.3, 0.4, 0.4), (0.2, 0.2, 0.8, 0.8)) == "overlapping"
    # a slight overlap (less than half of the smaller box) is still a direction
    assert spatial_relation((0.0, 0.0, 0.5, 0.5), (0.45, 0.45, 1.0, 1.0)) == "above-left"
    # centres at the same place but thin crossing boxes (small intersection): aligned on both axes
    assert spatial_relation((0.0, 0.49, 1.0, 0.51), (0.49, 0.0, 0.51, 1.0)) == "overlapping"


OPPOSITE = {"above": "below", "left": "right", "overlapping": "overlapping"}
OPPOSITE.update({v: k for k, v in OPPOSITE.items()})


@st.composite
def boxes(draw):
    x1, x2 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    y1, y2 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    return (x1, y1, x2 + 1e-3 if x2 + 1e-3 <= 1 else x2, y2 + 1e-3 if y2 + 1e-3 <= 1 else y2)


@given(boxes(), boxes())
def test_spatial_relation_is_antisymmetric(a, b) -> None:
    forward, backward = spatial_relation(a, b), spatial_relation(b, a)
    assert forward in {"above", "below", "left", "right", "overlapping"} | {
        f"{v}-{h}" for v in ("above", "below") for h in ("left", "right")
    }
    assert backward == "-".join(OPPOSITE[part] for part in forward.split("-"))


# --- marking and rendering ---------------------------------------------------------------------------------------


def test_mark_target_draws_an_outline_and_leaves_the_rest() -> None:
    image = np.full((100, 200, 3), 50, np.uint8)
    marked = mark_target(image, (0.25, 0.2, 0.75, 0.8), thickness=4)
    assert (image == 50).all()  # the input is not modified
    red = (marked == (255, 0, 0)).all(axis=2)
    # box in pixels: x 50..150, y 20..80; band of 4 centred on the edges: 2 outside, 2 inside
    assert red[20, 100] and red[18, 100] and red[21, 100] and not red[17, 100] and not red[22, 100]
    assert red[50, 48] and red[50, 51] and not red[50, 47] and not red[50, 52]
    assert not red[50, 100]  # the object itself stays visible
    assert red.sum() == (104 * 64 - 96 * 56)  # outer rectangle minus inner rectangle


def test_mark_target_thickness_scales_with_the_image_and_survives_the_border() -> None:
    assert default_thickness(56, 56) == 2 and default_thickness(1080, 1920) == 12
    marked = mark_target(np.zeros((56, 56, 3), np.uint8), (0.0, 0.0, 1.0, 1.0))
    red = (marked == (255, 0, 0)).all(axis=2)
    assert red[0].all() and red[:, 0].all() and red[-1].all() and red[:, -1].all() and not red[28, 28]
    with pytest.raises(ValueError, match="normalised"):
        mark_target(np.zeros((8, 8, 3), np.uint8), (0.5, 0.5, 0.2, 0.9))


def test_render_input_resizes_with_the_spec_then_marks() -> None:
    spec = SamplingSpec(max_pixels=56 * 84, min_pixels=28 * 28)
    rendered = render_input(_image(200, 300), (0.1, 0.1, 0.4, 0.5), spec)
    assert rendered.shape == (*spec.target_size(200, 300), 3) and rendered.dtype == np.uint8
    assert (rendered == (255, 0, 0)).all(axis=2).any()


# --- prompt --------------------------------------------------------------------------------------------------------


def test_instruction_states_box_type_labels_and_relations_nearest_first() -> None:
    others = (("vegetation", (0.8, 0.0, 0.95, 0.1)), ("toe drain", (0.1, 0.7, 0.5, 0.9)))
    example = ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6), "rock toe", others)
    text = TASK.instruction(example)
    assert "(0.10, 0.20, 0.50, 0.60)" in text
    assert "detected as a rock toe" in text
    assert "relative to the target: toe drain below, vegetation above-right." in text  # the toe drain is nearer
    for label in CONDITION_CLASSES:
        assert label in text
    unknown = TASK.instruction(ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6)))
    assert "of unknown type" in unknown and "No other objects were detected." in unknown
    many = tuple(("vegetation", (0.9, i / 40, 0.95, i / 40 + 0.01)) for i in range(MAX_OTHERS + 2))
    assert "and 2 more." in TASK.instruction(ObjectInput(_image(), (0.0, 0.0, 0.1, 0.1), "vegetation", many))


def test_object_input_rejects_bad_boxes_and_types() -> None:
    with pytest.raises(ValueError, match="target_box"):
        ObjectInput(_image(), (0.5, 0.2, 0.1, 0.6))
    with pytest.raises(ValueError, match="target_type"):
        ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6), "Toe drain- Blocked")
    with pytest.raises(ValueError, match=r"others\[0\]"):
        ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6), None, (("culvert", (0, 0, 1, 1)),))


# --- target, slots, parsing ----------------------------------------------------------------------------------------


def test_row_round_trip_target_slots_and_parse() -> None:
    assert get_task("inspection").labels == CONDITION_CLASSES
    others = (("toe drain", (0.1, 0.7, 0.5, 0.9)),)
    for label in CONDITION_CLASSES:
        kind = next(k for k, classes in CLASSES_OF_TYPE.items() if label in classes)
        row = _row(label, kind, others=others)
        example = TASK.input_of(row)
        assert example.target_type == kind and example.others == others
        assert example.image.shape == (56, 56, 3) and example.image.flags.writeable
        target = TASK.target_of(row)
        assert target == '{"condition": "' + label + '"}' and TASK.class_of(row) == label
        chosen = [ANSWER_PARTS[0], label, ANSWER_PARTS[1]]
        for index, value in enumerate(chosen):
            assert value in TASK.answer_slot(index, chosen[:index], example)
        assert TASK.answer_slot(3, chosen, example) is None and "".join(chosen) == target
        assert TASK.parse_answer(target, example).condition == label
    assert TASK.input_of(_row("vegetation", None)).target_type is None


def test_type_restricts_the_label_slot_and_parsing() -> None:
    typed = ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6), "rock toe")
    assert TASK.answer_slot(1, [ANSWER_PARTS[0]], typed) == ("rock toe", "rock toe damaged")
    assert TASK.answer_slot(1, [ANSWER_PARTS[0]], ObjectInput(_image(), (0, 0, 1, 1))) == CONDITION_CLASSES
    assert parse_answer(target_text("vegetation"), "rock toe") is None
    assert (
        parse_answer("noise " + target_text("rock toe damaged") + " more", "rock toe").condition == "rock toe damaged"
    )
    assert parse_answer('{"condition": "rock"}') is None
    assert parse_answer('{"state": "rock toe"}') is None
    assert parse_answer("{not json}") is None and parse_answer("no braces") is None


def test_answer_from_slots_and_to_dict() -> None:
    scores = {label: 0.0 for label in CONDITION_CLASSES} | {"Toe drain- Blocked": 0.7, "Toe drain": 0.3}
    chosen = [ANSWER_PARTS[0], "Toe drain- Blocked", ANSWER_PARTS[1]]
    answer = TASK.answer_from_slots(chosen, {1: scores}, "".join(chosen))
    assert answer.condition == "Toe drain- Blocked" and answer.confidence == 0.7
    assert (answer.object_type, answer.condition_kind) == ("toe drain", "blocked")
    data = answer.to_dict()
    assert data["condition"] == "Toe drain- Blocked" and data["condition_kind"] == "blocked"
    assert data["scores"]["Toe drain"] == 0.3


# --- the tokenizer: prefix labels and slot-wise tokenization -------------------------------------------------------


def test_slot_tokenization_equals_whole_answer_tokenization(processor) -> None:
    tokenizer = processor.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for label in CONDITION_CLASSES:
        pieces = [ANSWER_PARTS[0], label, ANSWER_PARTS[1]]
        assert [t for p in pieces for t in encode(p)] == encode(target_text(label))


@pytest.mark.parametrize("target_type", [None, "toe drain", "rock toe", "slope drain", "vegetation"])
def test_constrained_walk_can_produce_every_allowed_label(processor, target_type) -> None:
    tokenizer = processor.tokenizer
    example = ObjectInput(_image(), (0.1, 0.2, 0.5, 0.6), target_type)
    constraint = AnswerConstraint(tokenizer, TASK, [example], prompt_length=0)
    allowed_labels = CONDITION_CLASSES if target_type is None else CLASSES_OF_TYPE[target_type]
    for label in allowed_labels:
        ids = tokenizer(target_text(label) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        for i in range(len(ids)):
            assert ids[i] in constraint.allowed(0, ids[:i]), (label, tokenizer.decode(ids[: i + 1]))
        assert constraint.done(0, ids) and constraint.allowed(0, ids) == set()
        assert constraint.walk(0, ids)[1] == [ANSWER_PARTS[0], label, ANSWER_PARTS[1]]
    for label in set(CONDITION_CLASSES) - set(allowed_labels):  # another type's class cannot be spelled
        ids = tokenizer(target_text(label), add_special_tokens=False)["input_ids"]
        assert any(ids[i] not in constraint.allowed(0, ids[:i]) for i in range(len(ids))), label


def test_after_a_label_that_prefixes_another_both_ways_stay_open(processor) -> None:
    tokenizer = processor.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    constraint = AnswerConstraint(tokenizer, TASK, [ObjectInput(_image(), (0, 0, 1, 1), "rock toe")], 0)
    prefix = encode(ANSWER_PARTS[0] + "rock toe")
    longer = encode(ANSWER_PARTS[0] + "rock toe damaged")
    assert constraint.allowed(0, prefix) == {longer[len(prefix)], encode(ANSWER_PARTS[1])[0]}


# --- the image path through the real processor and the tiny model ---------------------------------------------------


@pytest.mark.parametrize(("height", "width", "tokens"), [(56, 84, 6), (28, 28, 1), (112, 56, 8)])
def test_image_token_count_for_a_known_size_is_not_upscaled(processor, height, width, tokens) -> None:
    example = ObjectInput(_image(height, width), (0.1, 0.1, 0.9, 0.9), "vegetation")
    inputs = model_inputs(processor, TASK, [example], [prompt_text(processor, TASK, example)])
    assert inputs["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"][0] == image_pad).sum().item() == tokens


def _predict(model, processor):
    predictor = Predictor(model, processor, SamplingSpec(max_pixels=56 * 56), task="inspection")
    examples = [
        ObjectInput(_image(seed=1), (0.1, 0.2, 0.5, 0.6), "rock toe", (("toe drain", (0.0, 0.8, 1.0, 0.9)),)),
        ObjectInput(_image(seed=2), (0.3, 0.3, 0.6, 0.9), None),
        ObjectInput(_image(seed=3), (0.1, 0.7, 0.9, 0.8), "toe drain"),
    ]
    return examples, predictor.predict(examples)


def test_predictor_gives_valid_typed_answers(model, processor) -> None:
    examples, answers = _predict(model, processor)
    assert answers[0].condition in CLASSES_OF_TYPE["rock toe"]
    assert answers[1].condition in CONDITION_CLASSES
    assert answers[2].condition in CLASSES_OF_TYPE["toe drain"]
    for example, answer in zip(examples, answers, strict=True):
        assert isinstance(answer, ConditionAnswer)
        assert answer.confidence == answer.scores[answer.condition] > 0
        assert TASK.parse_answer(answer.text, example).condition == answer.condition
        allowed = CONDITION_CLASSES if example.target_type is None else CLASSES_OF_TYPE[example.target_type]
        assert all(answer.scores[c] == 0.0 for c in CONDITION_CLASSES if c not in allowed)


def test_predictor_label_scores_sum_to_one_with_prefix_labels(model, processor) -> None:
    _, answers = _predict(model, processor)
    for answer in answers:
        assert sum(answer.scores.values()) == pytest.approx(1.0, abs=1e-4)


def _batch(processor, rows):
    return collate([encode_row(processor, row, TASK) for row in rows], processor.tokenizer.pad_token_id)


def test_weighted_loss_equals_the_model_loss_for_one_example(model, processor) -> None:
    batch = _batch(processor, [_row("Toe drain- Blocked", "toe drain", seed=3)])
    with torch.no_grad():
        output = model(**batch)
    for weight in (1.0, 0.3):
        loss = weighted_answer_loss(output.logits, batch["labels"], torch.tensor([weight]))
        torch.testing.assert_close(loss, output.loss, rtol=1e-6, atol=1e-6)


def test_weighted_loss_averages_per_example_losses_with_the_weights(model, processor) -> None:
    rows = [_row("rock toe damaged", "rock toe", seed=4), _row("vegetation", "vegetation", seed=5)]
    singles = []
    with torch.no_grad():
        for row in rows:
            singles.append(model(**_batch(processor, [row])).loss)
        batch = _batch(processor, rows)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert singles[0] != pytest.approx(singles[1].item())  # different answers, different losses
    equal = weighted_answer_loss(logits, batch["labels"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(equal, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-4)
    skewed = weighted_answer_loss(logits, batch["labels"], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(skewed, (3 * singles[0] + singles[1]) / 4, rtol=1e-4, atol=1e-4)
    only_second = weighted_answer_loss(logits, batch["labels"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(only_second, singles[1], rtol=1e-4, atol=1e-4)


# --- metrics -------------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_computed_example() -> None:
    truth = ["Toe drain", "Toe drain- Blocked", "rock toe damaged", "slope drain blocked", "vegetation", "slope drain"]
    answers = [
        ConditionAnswer("Toe drain"),
        ConditionAnswer("Toe drain"),  # right type, wrong condition
        {"condition": "rock toe damaged"},  # mappings are accepted too
        None,  # parse failure: wrong everywhere
        ConditionAnswer("vegetation"),
        ConditionAnswer("slope drain blocked"),
    ]
    rows = [{"condition": c} for c in truth]
    m = TASK.compute_metrics(rows, answers)
    assert m == compute_metrics(rows, answers)
    assert m["n_examples"] == 6 and m["accuracy"] == 0.5 and m["parse_failure_rate"] == pytest.approx(1 / 6)
    # per-class F1: Toe drain 2/3 (one false positive), rock toe damaged 1, vegetation 1, the other three 0
    assert m["f1/toe_drain"] == pytest.approx(2 / 3) and m["f1/toe_drain_blocked"] == 0.0
    assert m["f1/rock_toe_damaged"] == 1.0 and m["f1/slope_drain"] == 0.0 and m["f1/slope_drain_blocked"] == 0.0
    assert "f1/rock_toe" not in m  # no truth and no prediction: undefined, left out of the mean
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 + 0 + 1 + 0) / 6)
    assert m["class_mean_recall"] == pytest.approx(0.5)
    assert m["precision/toe_drain"] == 0.5 and m["recall/toe_drain"] == 1.0
    assert m["precision/slope_drain_blocked"] == 0.0 and "precision/toe_drain_blocked" not in m
    # conditions: truth N B D B N N, predicted N N D - N B
    assert m["condition_accuracy"] == 0.5
    assert m["f1_condition/normal"] == pytest.approx(2 / 3) and m["f1_condition/blocked"] == 0.0
    assert m["f1_condition/damaged"] == 1.0 and m["condition_macro_f1"] == pytest.approx(5 / 9)
    assert m["accuracy_by_condition/normal"] == pytest.approx(2 / 3)
    assert m["accuracy_by_condition/blocked"] == 0.0 and m["accuracy_by_condition/damaged"] == 1.0
    # object types: all right except the parse failure
    assert m["object_type_accuracy"] == pytest.approx(5 / 6)
    assert m["accuracy_by_type/toe_drain"] == 0.5 and m["accuracy_by_type/rock_toe"] == 1.0
    assert m["accuracy_by_type/slope_drain"] == 0.0 and m["accuracy_by_type/vegetation"] == 1.0


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="aligned"):
        TASK.compute_metrics([{"condition": "vegetation"}], [])
    with pytest.raises(ValueError, match="not in the label list"):
        TASK.compute_metrics([{"condition": "tree"}], [None])
    with pytest.raises(ValueError, match="empty"):
        TASK.compute_metrics([], [])


def test_closeup_cuts_the_target_with_a_margin_at_the_same_pixel_budget() -> None:
    spec = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)
    image = np.zeros((200, 400, 3), np.uint8)
    image[100:140, 200:240] = 255  # the target: a white square
    box = (200 / 400, 100 / 200, 240 / 400, 140 / 200)
    closeup = render_closeup(image, box, spec)
    assert closeup.shape == (56, 56, 3)  # square cut (40 px + 2 x 10 px margin) at the spec's size
    assert closeup[20:36, 20:36].min() > 200 and closeup[:4, :4].max() < 50  # the target in the middle, margin dark
    example = object_input(image, box, "rock toe", [("vegetation", (0.0, 0.0, 0.2, 0.2))], spec)
    assert example.image.shape == (28, 56, 3) and example.closeup.shape == (56, 56, 3)  # 2:1 image within budget
    assert example.others == (("vegetation", (0.0, 0.0, 0.2, 0.2)),)


def test_prompt_with_closeup_has_two_images_in_order(processor) -> None:
    spec = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)
    image = np.random.default_rng(0).integers(0, 256, (112, 224, 3), dtype=np.uint8)
    examples = [
        object_input(image, (0.1, 0.1, 0.3, 0.5), "slope drain", [], spec),
        object_input(image, (0.5, 0.6, 0.9, 0.9), "rock toe", [("slope drain", (0.1, 0.1, 0.3, 0.5))], spec),
    ]
    task = InspectionTask()
    encoded = [encode_training_example(processor, task, e, target_text("rock toe")) for e in examples]
    assert "close-up of the target" in task.instruction(examples[0])
    for example in encoded:  # whole image 28x56 -> 2x4 patches, close-up 56x56 -> 4x4 patches
        grids = example["image_grid_thw"].tolist()
        assert grids[0][0] == 1 and len(grids) == 2
        tokens = int((example["input_ids"] == processor.image_token_id).sum())
        assert tokens == sum(t * h * w for t, h, w in grids) // 4
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    assert batch["image_grid_thw"].shape == (4, 3)
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in encoded)
