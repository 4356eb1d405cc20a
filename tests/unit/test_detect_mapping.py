"""The detector's class mapping, config, collapsed dataset and prediction export (no Ultralytics needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, OBJECT_TYPES, load_detections_json, read_dataset
from opsvlm.tasks.inspection.detect.dataset import write_detection_dataset
from opsvlm.tasks.inspection.detect.detector import (
    ClassMapping,
    Detection,
    DetectorConfig,
    DetectorError,
    UnmappedClassError,
    check_image,
)
from opsvlm.tasks.inspection.detect.export import image_record, write_predictions_yaml, yolo_prediction_lines
from opsvlm.tasks.inspection.detect.load import load_detector


def test_default_mapping_accepts_types_and_condition_classes():
    mapping = ClassMapping()
    assert mapping.resolve({0: "toe drain", 1: "rock toe", 2: "slope drain", 3: "vegetation"}) == dict(
        enumerate(OBJECT_TYPES)
    )
    # a detector trained on the 9 condition classes maps to their types
    resolved = mapping.resolve(list(CONDITION_CLASSES))
    assert resolved[1] == "toe drain" and resolved[4] == "rock toe" and resolved[7] == "slope drain"
    # spelling: case, '_' and '-' are ignored
    assert mapping.object_type("Slope_Drain") == "slope drain"


def test_custom_mapping_and_unknown_names():
    mapping = ClassMapping(
        {"drain_vertical": "slope drain", "drain-horizontal": "Toe Drain", "rocks": "rock toe"}, "cfg"
    )
    assert mapping.resolve(["drain vertical", "DRAIN_HORIZONTAL", "rocks"]) == {
        0: "slope drain",
        1: "toe drain",
        2: "rock toe",
    }
    with pytest.raises(UnmappedClassError, match=r"\['tree', 'pothole'\].*cfg"):
        mapping.resolve({0: "rocks", 1: "tree", 2: "pothole"}, "my_detector.pt")
    with pytest.raises(UnmappedClassError, match="'tree' has no object type"):
        mapping.object_type("tree")


def test_mapping_values_are_validated():
    with pytest.raises(DetectorError, match=r"cfg\['shrub'\].*unknown object type 'bush'"):
        ClassMapping({"shrub": "bush"}, "cfg")
    with pytest.raises(DetectorError, match="non-empty strings"):
        ClassMapping({"": "vegetation"}, "cfg")
    with pytest.raises(DetectorError, match="another spelling"):
        ClassMapping({"rock_toe": "rock toe", "Rock Toe": "toe drain"}, "cfg")


def test_config_validation_and_loader_errors(tmp_path):
    with pytest.raises(DetectorError, match="imgsz"):
        DetectorConfig(weights="x.pt", imgsz=100)
    with pytest.raises(DetectorError, match="conf"):
        DetectorConfig(conf=1.5)
    with pytest.raises(DetectorError, match=r"class_map\['x'\]"):
        DetectorConfig(class_map={"x": "pothole"})
    with pytest.raises(DetectorError, match="no detector checkpoint"):
        load_detector(DetectorConfig())
    with pytest.raises(DetectorError, match="does not exist"):
        load_detector(DetectorConfig(weights=str(tmp_path / "missing.pt")))
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(DetectorError, match=r"\.pt checkpoint or an \.onnx"):
        load_detector(DetectorConfig(weights=str(other)))


def test_check_image():
    image = np.zeros((4, 5, 3), np.uint8)
    assert check_image(image) is image
    with pytest.raises(DetectorError, match=r"photo: must be a uint8\[H, W, 3\]"):
        check_image(np.zeros((4, 5), np.uint8), "photo")
    with pytest.raises(DetectorError, match="float32"):
        check_image(np.zeros((4, 5, 3), np.float32))


def test_detection_feeds_stage_two():
    det = Detection((0.1, 0.2, 0.5, 0.6), "slope drain", 0.875, "slope_drain")
    assert det.pixel_box(200, 100) == pytest.approx((20.0, 20.0, 100.0, 60.0))
    stage_one = det.to_stage_one(3)
    assert (stage_one.object_type, stage_one.index, stage_one.score) == ("slope drain", 3, 0.875)
    assert det.to_dict()["label"] == "slope drain" and det.to_dict()["normalized"] is True


def test_export_round_trips_through_the_detections_reader(tmp_path):
    dets = [
        Detection((0.1, 0.2, 0.5, 0.6), "slope drain", 0.9, "slope drain"),
        Detection((0, 0, 1, 0.5), "vegetation", 0.3, "v"),
    ]
    record = image_record("a.jpg", 200, 100, dets)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(record))
    (parsed,) = load_detections_json(path)
    assert [d.object_type for d in parsed.detections] == ["slope drain", "vegetation"]
    assert parsed.detections[0].box == pytest.approx((0.1, 0.2, 0.5, 0.6))
    lines = yolo_prediction_lines(dets)
    assert lines[0] == "2 0.300000 0.400000 0.400000 0.400000 0.900000"
    assert lines[1].startswith("3 0.500000 0.250000 1.000000 0.500000")
    with pytest.raises(ValueError, match="not in names"):
        yolo_prediction_lines(dets, ["slope drain"])
    names = yaml.safe_load(write_predictions_yaml(tmp_path).read_text())["names"]
    assert names == dict(enumerate(OBJECT_TYPES))


def test_collapsed_dataset(tmp_path):
    generate_inspection_dataset(tmp_path / "src", InspectionConfig(images=12, size=64, seed=3))
    result = write_detection_dataset(tmp_path / "src", tmp_path / "det")
    assert result.names == OBJECT_TYPES
    data = yaml.safe_load((tmp_path / "det" / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(OBJECT_TYPES)) and data["nc"] == 4
    source, _ = read_dataset(tmp_path / "src")
    collapsed, report = read_dataset(tmp_path / "det")
    assert report.ok
    for split in source:
        assert len(collapsed[split]) == len(source[split])
        for before, after in zip(source[split], collapsed[split], strict=True):
            assert [a.name for a in after.detections] == [result.collapse[d.name] for d in before.detections]
            for d, a in zip(before.detections, after.detections, strict=True):
                assert a.box == pytest.approx(d.box, abs=2e-6)
    total = sum(sum(v.values()) for v in result.objects_per_split.values())
    assert total == report.objects


def test_collapse_must_cover_every_class(tmp_path):
    generate_inspection_dataset(tmp_path / "src", InspectionConfig(images=6, size=64, seed=1))
    with pytest.raises(DetectorError, match="have no detector class"):
        write_detection_dataset(tmp_path / "src", tmp_path / "det", collapse={"vegetation": "vegetation"})
    custom = {name: ("vegetation" if name == "vegetation" else "structure") for name in CONDITION_CLASSES}
    result = write_detection_dataset(tmp_path / "src", tmp_path / "det", collapse=custom)
    assert result.names == ("structure", "vegetation")
