"""The Ultralytics backend's offline setup and model building, and the scoring helpers (no training here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from opsvlm.tasks.inspection.data.yolo import Detection as LabelRow
from opsvlm.tasks.inspection.data.yolo import LabelledImage
from opsvlm.tasks.inspection.detect.detector import DetectorError
from opsvlm.tasks.inspection.detect.matching import ImageBoxes, detection_map
from opsvlm.tasks.inspection.detect.scoring import bootstrap_map, detector_boxes, flat_map_metrics, prior_boxes
from opsvlm.tasks.inspection.detect.ultralytics_backend import YoloTrainSettings, build_model

OFFLINE_PROBE = """
import json, sys
from opsvlm.tasks.inspection.detect.ultralytics_backend import configure_offline
folder = configure_offline(sys.argv[1])
from ultralytics.utils import AUTOINSTALL, ONLINE, SETTINGS, USER_CONFIG_DIR
from ultralytics.utils.checks import check_font
print(json.dumps({"online": ONLINE, "autoinstall": AUTOINSTALL, "settings": dict(SETTINGS),
                  "config_dir": str(USER_CONFIG_DIR), "font": str(check_font("Arial.ttf")), "folder": str(folder)}))
"""


def test_offline_setup_in_a_fresh_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE, str(tmp_path / "yolo")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["online"] is False and probe["autoinstall"] is False
    settings = probe["settings"]
    assert settings["sync"] is False
    assert not any(settings[k] for k in ("mlflow", "raytune", "clearml", "comet", "dvc", "wandb", "tensorboard"))
    assert probe["config_dir"].startswith(str(tmp_path / "yolo"))
    assert probe["font"].startswith(probe["config_dir"])  # found locally, not downloaded
    assert settings["runs_dir"] == str(tmp_path / "yolo" / "runs")


def test_build_model_from_yaml_or_checkpoint_never_downloads(tmp_path):
    model, source = build_model(YoloTrainSettings(model="yolo11n.yaml"))
    assert source == "yolo11n.yaml" and model.task == "detect"
    with pytest.raises(DetectorError, match="does not exist"):
        build_model(YoloTrainSettings(weights=str(tmp_path / "mine.pt")))
    with pytest.raises(DetectorError, match="must be a model YAML"):
        YoloTrainSettings(model="yolo11n.pt")
    with pytest.raises(DetectorError, match="multiple of 32"):
        YoloTrainSettings(imgsz=100)


def _image(boxes_and_names, name="x.jpg"):
    rows = tuple(LabelRow(0, n, tuple(b), (), i + 1) for i, (b, n) in enumerate(boxes_and_names))
    return LabelledImage(name, name, "test", 100, 100, rows)


def test_prior_boxes_reference():
    train = [
        _image([((0.0, 0.8, 1.0, 1.0), "toe drain"), ((0.1, 0.1, 0.2, 0.5), "slope drain")]),
        _image([((0.0, 0.7, 1.0, 0.9), "toe drain")]),
    ]
    test = [_image([((0.0, 0.75, 1.0, 0.95), "toe drain")])]
    (boxes,) = prior_boxes(train, test, ["toe drain", "rock toe", "slope drain"])
    assert boxes.pred_types == ("toe drain", "slope drain")  # rock toe never seen: no box
    assert boxes.pred_boxes[0] == pytest.approx([0.0, 0.75, 1.0, 0.95])
    assert boxes.pred_scores.tolist() == pytest.approx([2 / 3, 1 / 3])
    result = detection_map([boxes], ["toe drain", "slope drain"])
    assert result["ap50"]["toe drain"] == pytest.approx(1.0) and math.isnan(result["ap50"]["slope drain"])


def test_detector_boxes_and_bootstrap(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((10, 10, 3), i * 40, np.uint8)).save(path)
        paths.append(str(path))
    images = [
        LabelledImage(p, p, "test", 10, 10, (LabelRow(0, "vegetation", (0.1, 0.1, 0.5, 0.5), (), 1),)) for p in paths
    ]

    class Found:
        box, object_type, score = (0.1, 0.1, 0.5, 0.5), "vegetation", 0.9

    seen = []

    def detect_batch(pixels):
        seen.append(len(pixels))
        return [[Found()] if px.mean() > 0 else [] for px in pixels]

    ticks = iter(range(100))
    boxes, per_image = detector_boxes(detect_batch, images, batch_size=2, clock=lambda: float(next(ticks)))
    assert seen == [2, 1] and per_image == pytest.approx(2 / 3)
    result = detection_map(boxes, ["vegetation"])
    assert result["map50"] == pytest.approx(2 / 3 * 100 / 101 + 1 / 101, abs=0.02)  # recall 2/3 at precision 1
    metrics = flat_map_metrics(result)
    assert set(metrics) == {"map50", "map50_95", "ap50/vegetation", "ap50_95/vegetation"}
    low, high = bootstrap_map(boxes, ["vegetation"], n_boot=100)["map50"]
    assert 0.0 <= low <= result["map50"] <= high <= 1.0
    with pytest.raises(ValueError, match="no images"):
        bootstrap_map([], ["vegetation"])
    assert isinstance(boxes[0], ImageBoxes)


def test_epoch_history_and_split_id(tmp_path):
    from opsvlm.detection.train import _epoch_history, random_boxes, split_id

    csv = tmp_path / "results.csv"
    csv.write_text("epoch,train/box_loss,metrics/mAP50(B),lr/pg0\n1,2.5,0.0,0.001\n2,2.0,0.25,nan\n")
    history = _epoch_history(csv)
    assert history[0] == (1, {"epoch/train/box_loss": 2.5, "epoch/metrics/mAP50_B": 0.0, "epoch/lr/pg0": 0.001})
    assert "epoch/lr/pg0" not in history[1][1]  # NaN values are left out
    assert split_id("test", ["/a/x.jpg", "/b/y.jpg"]) == split_id("test", ["y.jpg", "x.jpg"])
    assert split_id("test", ["x.jpg"]) != split_id("test", ["z.jpg"])
    (random,) = random_boxes([_image([((0, 0, 1, 1), "vegetation")])], ["vegetation", "rock toe"], per_image=5)
    assert random.pred_boxes.shape == (5, 4)
    assert np.all(random.pred_boxes[:, 2] >= random.pred_boxes[:, 0])
