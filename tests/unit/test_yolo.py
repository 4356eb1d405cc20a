"""Tests of the Roboflow / Ultralytics YOLO dataset reader and the stage-1 detections JSON loader (real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from opsvlm.tasks.inspection.data.yolo import (
    BAD_CLASS_ID,
    CLASS_OUT_OF_RANGE,
    CONDITION_CLASSES,
    DEGENERATE_BOX,
    NOT_A_NUMBER,
    ODD_COORDINATES,
    OUT_OF_RANGE,
    TOO_FEW_POINTS,
    DataYamlError,
    DetectionsJsonError,
    YoloFormatError,
    class_condition,
    condition_class,
    label_path_for,
    load_detections_json,
    object_type_of,
    read_data_yaml,
    read_dataset,
    read_label_file,
    read_split,
)

NAMES = ("cat", "dog", "bird")


def _image(path: Path, width: int = 40, height: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 60)).save(path)
    return path


def _label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _roboflow(root: Path, names_yaml: str = "names: ['cat', 'dog', 'bird']", nc: int | None = 3) -> Path:
    """A Roboflow-style export: yaml in the root with ../train/images paths."""
    nc_line = f"nc: {nc}\n" if nc is not None else ""
    return _label(
        root / "data.yaml",
        f"train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n{nc_line}{names_yaml}\n",
    )


# --------------------------------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------------------------------


def test_condition_classes_and_their_parts():
    assert len(CONDITION_CLASSES) == 9
    assert class_condition("Toe drain- Blocked") == ("toe drain", "blocked")
    assert class_condition("Toe drain- Damaged") == ("toe drain", "damaged")
    assert class_condition("Toe drain") == ("toe drain", "normal")
    assert class_condition("rock toe") == ("rock toe", "normal")
    assert class_condition("rock toe damaged") == ("rock toe", "damaged")
    assert class_condition("slope drain blocked") == ("slope drain", "blocked")
    assert class_condition("vegetation") == ("vegetation", "normal")
    # Spelling variants of stage-1 labels.
    assert class_condition("slope_drain") == ("slope drain", "normal")
    assert class_condition("TOE DRAIN - blocked") == ("toe drain", "blocked")
    # Round trip.
    for name in CONDITION_CLASSES:
        assert condition_class(*class_condition(name)) == name
    with pytest.raises(ValueError, match="unknown condition class 'culvert'"):
        class_condition("culvert")
    with pytest.raises(ValueError, match="no class for a rock toe that is blocked"):
        condition_class("rock toe", "blocked")
    with pytest.raises(ValueError, match="unknown condition"):
        condition_class("rock toe", "rusty")
    assert object_type_of("rock_toe") == "rock toe"
    with pytest.raises(ValueError, match="unknown object type"):
        object_type_of("slope drain blocked")


# --------------------------------------------------------------------------------------------------------------------
# data.yaml
# --------------------------------------------------------------------------------------------------------------------


def test_roboflow_yaml_list_names_and_dotdot_paths(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
    dataset = read_data_yaml(_roboflow(tmp_path))
    assert dataset.names == NAMES and dataset.nc == 3
    # "../train/images" does not exist next to the yaml's parent; the reader falls back to "train/images".
    assert dataset.split_dirs == {
        "train": [str((tmp_path / "train" / "images").resolve())],
        "val": [str((tmp_path / "valid" / "images").resolve())],
        "test": [str((tmp_path / "test" / "images").resolve())],
    }
    # A folder is accepted in place of the yaml.
    assert read_data_yaml(tmp_path) == dataset


def test_roboflow_dotdot_path_that_exists_is_used_as_written(tmp_path):
    # Older Roboflow zips: data.yaml inside a sub-folder, images one level up.
    (tmp_path / "train" / "images").mkdir(parents=True)
    yaml_path = _label(tmp_path / "meta" / "data.yaml", "train: ../train/images\nnc: 1\nnames: ['a']\n")
    assert read_data_yaml(yaml_path).split_dirs["train"] == [str((tmp_path / "train" / "images").resolve())]


def test_ultralytics_yaml_path_key_dict_names_and_list_of_dirs(tmp_path):
    root = tmp_path / "ds"
    for sub in ("images/train", "images/train2", "images/val"):
        (root / sub).mkdir(parents=True)
    yaml_path = _label(
        tmp_path / "cfg" / "ds.yaml",
        "path: ../ds\ntrain: [images/train, images/train2]\nval: images/val\ntest:\n"
        "names:\n  0: cat\n  1: dog\n  2: bird\n",
    )
    dataset = read_data_yaml(yaml_path)
    assert dataset.names == NAMES
    assert dataset.root == str(root.resolve())
    assert dataset.split_dirs == {
        "train": [str(root.resolve() / "images" / "train"), str(root.resolve() / "images" / "train2")],
        "val": [str(root.resolve() / "images" / "val")],
    }
    # Labels of Ultralytics' layout: images/train/x.jpg -> labels/train/x.txt (the last "images" folder).
    assert label_path_for(root / "images" / "train" / "x.jpg") == root / "labels" / "train" / "x.txt"
    assert label_path_for("/data/images/set/images/a.b.png") == Path("/data/images/set/labels/a.b.txt")
    assert label_path_for("/data/flat/a.jpg") == Path("/data/flat/a.txt")


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("train: a\nnc: 4\nnames: ['cat', 'dog', 'bird']\n", "nc", "is 4 but names has 3 entries"),
        ("train: a\nnc: three\nnames: ['cat']\n", "nc", "must be an integer"),
        ("train: a\nnames: {0: cat, 2: dog}\n", "names", "contiguous"),
        ("train: a\nnames: {0: cat, x: dog}\n", "names", "dict keys must be class ids"),
        ("train: a\nnames: [cat, no]\n", "names\\[1\\]", "quote it"),
        ("train: a\nnames: [cat, cat]\n", "names", "duplicate"),
        ("train: a\nnames: []\n", "names", "empty"),
        ("train: a\n", "names", "missing"),
        ("train: [a, 3]\nnames: [cat]\n", "train\\[1\\]", "folder path"),
        ("nc: 1\nnames: [cat]\n", "none of the keys", ""),
    ],
)
def test_bad_data_yaml_names_file_and_key(tmp_path, body, key, message):
    yaml_path = _label(tmp_path / "data.yaml", body)
    with pytest.raises(DataYamlError, match=f"{key}.*{message}") as err:
        read_data_yaml(yaml_path)
    assert str(yaml_path.resolve()) in str(err.value)


def test_missing_yaml_and_missing_split_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.yaml not found"):
        read_data_yaml(tmp_path)
    (tmp_path / "train" / "images").mkdir(parents=True)
    _image(tmp_path / "train" / "images" / "a.jpg")
    yaml_path = _roboflow(tmp_path)
    dataset = read_data_yaml(yaml_path)
    with pytest.raises(FileNotFoundError, match=r"val: image folder .*valid/images does not exist"):
        read_split(dataset, "valid")
    with pytest.raises(DataYamlError, match="no such split"):
        read_split(dataset, "holdout")
    splits, report = read_dataset(yaml_path)
    assert list(splits) == ["train"] and report.images == 1
    assert set(report.missing_split_dirs) == {"val", "test"} and not report.ok
    with pytest.raises(FileNotFoundError):
        read_dataset(yaml_path, strict=True)


# --------------------------------------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------------------------------------


def test_polygon_rows_give_boxes_and_five_number_rows_are_boxes(tmp_path):
    path = _label(
        tmp_path / "a.txt",
        "0 0.1 0.2 0.5 0.2 0.3 0.6\n\n2 0.5 0.5 0.2 0.4\n1 0.0 0.0 1.0000005 0.0 1.0 1.0 -0.0000005 1.0\n",
    )
    detections, problems = read_label_file(path, NAMES)
    assert problems == []
    first, second, third = detections
    assert (first.class_id, first.name, first.line) == (0, "cat", 1)
    assert first.polygon == ((0.1, 0.2), (0.5, 0.2), (0.3, 0.6))
    assert first.box == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert (second.class_id, second.name, second.line) == (2, "bird", 3)
    assert second.box == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert len(second.polygon) == 4 and second.polygon[0] == pytest.approx((0.4, 0.3))
    # Within the tolerance: clipped to [0, 1].
    assert third.box == (0.0, 0.0, 1.0, 1.0) and third.line == 4
    assert first.pixel_box(200, 100) == pytest.approx((20.0, 20.0, 100.0, 60.0))


def test_each_bad_row_is_reported_with_file_line_and_the_rest_is_read(tmp_path):
    rows = [
        "0 0.1 0.1 0.4 0.1 0.4 0.4",  # 1 ok
        "1 0.1 zero 0.4 0.1 0.4 0.4",  # 2 not a number
        "1 0.1 0.1 0.4 0.1 0.4",  # 3 odd coordinate count
        "1 0.1 0.1",  # 4 one point
        "1",  # 5 class only
        "1 0.1 0.1 1.2 0.1 0.4 0.4",  # 6 out of range
        "3 0.1 0.1 0.4 0.1 0.4 0.4",  # 7 class >= nc
        "-1 0.1 0.1 0.4 0.1 0.4 0.4",  # 8 negative class
        "1.5 0.1 0.1 0.4 0.1 0.4 0.4",  # 9 non-integer class
        "2 0.1 0.1 0.4 0.1 0.7 0.1",  # 10 zero-area box (all on y=0.1)
        "2 0.5 0.5 0.0 0.2",  # 11 zero-width box
        "0 0.1 0.1 nan 0.1 0.4 0.4",  # 12 NaN
        "2 0.2 0.2 0.6 0.2 0.6 0.6 0.2 0.6",  # 13 ok
    ]
    path = _label(tmp_path / "x.txt", "\n".join(rows) + "\n")
    detections, problems = read_label_file(path, NAMES)
    assert [d.line for d in detections] == [1, 13]
    assert [(p.line, p.kind) for p in problems] == [
        (2, NOT_A_NUMBER),
        (3, ODD_COORDINATES),
        (4, TOO_FEW_POINTS),
        (5, TOO_FEW_POINTS),
        (6, OUT_OF_RANGE),
        (7, CLASS_OUT_OF_RANGE),
        (8, CLASS_OUT_OF_RANGE),
        (9, BAD_CLASS_ID),
        (10, DEGENERATE_BOX),
        (11, DEGENERATE_BOX),
        (12, NOT_A_NUMBER),
    ]
    assert str(problems[0]) == f"{path}:2: not a number: 'zero'"
    assert str(problems[5]).startswith(f"{path}:7: class id 3 outside 0..2")
    assert "1.2" in str(problems[4])
    with pytest.raises(YoloFormatError, match=f"{path}:2: not a number") as err:
        read_label_file(path, NAMES, strict=True)
    assert err.value.problem.line == 2


def test_split_accounts_for_every_image_line_and_file(tmp_path):
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    _image(images / "a.jpg", 64, 48)
    _label(labels / "a.txt", "0 0.1 0.1 0.5 0.1 0.5 0.5\n1 0.2 0.2 0.4 0.4\n")
    _image(images / "b.png", 20, 10)
    _label(labels / "b.txt", "")  # background
    _image(images / "c.jpg")  # no label file: background, counted separately
    _image(images / "d.jpg")
    _label(labels / "d.txt", "0 0.1 0.1 0.5 0.1 0.5 0.5\n7 0.1 0.1 0.5 0.1 0.5 0.5\n\n0 0.1 0.2\n")
    _label(labels / "ghost.txt", "0 0.1 0.1 0.5 0.1 0.5 0.5\n")  # label without image
    _label(images / "notes.md", "not an image")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    for split in ("valid", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
    yaml_path = _roboflow(tmp_path)
    dataset = read_data_yaml(yaml_path)

    result, report = read_split(dataset, "train")
    by_name = {Path(image.image_path).name: image for image in result}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    assert (by_name["a.jpg"].width, by_name["a.jpg"].height, by_name["a.jpg"].split) == (64, 48, "train")
    assert [d.name for d in by_name["a.jpg"].detections] == ["cat", "dog"]
    assert by_name["a.jpg"].label_path == str(labels / "a.txt")
    assert by_name["b.png"].detections == () and by_name["c.jpg"].detections == ()
    assert [d.line for d in by_name["d.jpg"].detections] == [1]

    assert report.images == 4 and report.images_per_split == {"train": 4}
    assert report.objects == 3 and report.objects_per_class == {"cat": 2, "dog": 1, "bird": 0}
    assert report.background_images == 1 and report.missing_label_files == 1
    assert report.label_files == 3 and report.label_lines == 2 + 0 + 4 and report.blank_lines == 1
    assert report.bad_rows == 2 and report.bad_rows_by_reason == {CLASS_OUT_OF_RANGE: 1, TOO_FEW_POINTS: 1}
    # Every line: an object, a bad row or a blank line.
    assert report.label_lines == report.objects + report.bad_rows + report.blank_lines
    assert report.label_files_without_image == 1 and report.unreadable_images == 1 and report.non_image_files == 1
    kinds = {(Path(p.path).name, p.line, p.kind) for p in report.problems}
    assert kinds == {
        ("d.txt", 2, CLASS_OUT_OF_RANGE),
        ("d.txt", 4, TOO_FEW_POINTS),
        ("ghost.txt", None, "label_without_image"),
        ("broken.jpg", None, "unreadable_image"),
    }
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["bad_rows_by_reason"] == {CLASS_OUT_OF_RANGE: 1, TOO_FEW_POINTS: 1}
    assert sorted(p["kind"] for p in as_json["problems"]) == sorted(kind for _, _, kind in kinds)

    with pytest.raises(YoloFormatError):
        read_split(dataset, "train", strict=True)

    splits, total = read_dataset(tmp_path)
    assert set(splits) == {"train", "val", "test"} and splits["val"] == []
    assert total.images == 4 and total.images_per_split == {"train": 4, "val": 0, "test": 0}
    assert total.bad_rows == 2 and not total.missing_split_dirs and not total.ok


def test_clean_dataset_reads_with_no_problems(tmp_path):
    root = tmp_path / "ds"
    _image(root / "images" / "train" / "a.jpg")
    _label(root / "labels" / "train" / "a.txt", "8 0.1 0.1 0.5 0.1 0.5 0.5\n")
    _image(root / "images" / "val" / "b.jpg")
    _label(root / "labels" / "val" / "b.txt", "")
    names = "names:\n" + "".join(f"  {i}: '{name}'\n" for i, name in enumerate(CONDITION_CLASSES))
    _label(root / "data.yaml", f"path: .\ntrain: images/train\nval: images/val\nnc: 9\n{names}")
    splits, report = read_dataset(root / "data.yaml", strict=True)
    assert report.ok and report.images == 2 and report.objects == 1
    assert splits["train"][0].detections[0].name == "vegetation"
    assert report.background_images == 1 and report.missing_label_files == 0


# --------------------------------------------------------------------------------------------------------------------
# Stage-1 detections JSON
# --------------------------------------------------------------------------------------------------------------------


def test_detections_json_pixel_and_normalised_boxes(tmp_path):
    data = [
        {
            "image": "site/a.jpg",
            "width": 200,
            "height": 100,
            "detections": [
                {"label": "slope drain", "box": [20, 10, 60, 90], "normalized": False, "score": 0.9},
                {"label": "Toe_drain", "box": [0.0, 0.8, 1.0000001, 0.95], "normalized": True},
            ],
        },
        {"image": "b.jpg", "width": 64, "height": 64, "detections": []},
    ]
    path = _label(tmp_path / "dets.json", json.dumps(data))
    first, second = load_detections_json(path)
    assert (first.image, first.width, first.height) == ("site/a.jpg", 200, 100)
    pixel, normal = first.detections
    assert pixel.box == pytest.approx((0.1, 0.1, 0.3, 0.9)) and pixel.score == 0.9
    assert pixel.object_type == "slope drain" and pixel.label == "slope drain" and pixel.index == 0
    assert normal.box == (0.0, 0.8, 1.0, 0.95) and normal.score is None and normal.object_type == "toe drain"
    assert second.detections == ()
    # A single object instead of a list.
    single = _label(tmp_path / "one.json", json.dumps(data[0]))
    assert load_detections_json(single)[0] == first


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda d: d.pop("width"), r"\[0\]\.width", "positive integer"),
        (lambda d: d.update(image=""), r"\[0\]\.image", "non-empty string"),
        (lambda d: d.update(detections={}), r"\[0\]\.detections", "must be a list"),
        (lambda d: d["detections"][0].update(label="culvert"), r"\[0\]\.detections\[0\]\.label", "unknown object"),
        (lambda d: d["detections"][0].pop("normalized"), r"detections\[0\]\.normalized", "true .* or false"),
        (lambda d: d["detections"][0].update(box=[1, 2, 3]), r"detections\[0\]\.box", "4 numbers"),
        (lambda d: d["detections"][0].update(box=[10, 10, 5, 50]), r"detections\[0\]\.box", "x2 > x1"),
        (lambda d: d["detections"][0].update(box=[10, 10, 250, 50]), r"detections\[0\]\.box", "outside the 200x100"),
        (
            lambda d: d["detections"][0].update(box=[10, 10, 50, 50], normalized=True),
            r"detections\[0\]\.box",
            "set normalized: false",
        ),
        (lambda d: d["detections"][0].update(score=1.5), r"detections\[0\]\.score", r"\[0, 1\]"),
    ],
)
def test_detections_json_errors_name_file_and_field(tmp_path, mutate, field, message):
    item = {
        "image": "a.jpg",
        "width": 200,
        "height": 100,
        "detections": [{"label": "rock toe", "box": [20, 10, 60, 90], "normalized": False}],
    }
    mutate(item)
    path = _label(tmp_path / "dets.json", json.dumps([item]))
    with pytest.raises(DetectionsJsonError, match=f"{field}: .*{message}") as err:
        load_detections_json(path)
    assert str(err.value).startswith(str(path))


def test_detections_json_syntax_and_top_level_errors(tmp_path):
    bad = _label(tmp_path / "bad.json", '[{"image": "a.jpg",\n "width": }]')
    with pytest.raises(DetectionsJsonError, match=f"{bad}:2: not valid JSON"):
        load_detections_json(bad)
    scalar = _label(tmp_path / "scalar.json", "3")
    with pytest.raises(DetectionsJsonError, match="must be an object or a list"):
        load_detections_json(scalar)
