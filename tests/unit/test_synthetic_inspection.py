"""Tests of the synthetic inspection-scene generator: layout read back by the YOLO reader, determinism, labels that
match the pixels, and conditions a simple classifier can tell apart at low resolution."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jobs import generate_inspection
from opsvlm.tasks.inspection.data.synthetic import (
    COVERAGE_PLANS,
    InspectionConfig,
    ScenePlan,
    clip_polygon,
    dataset_plans,
    generate_inspection_dataset,
    polygon_area,
    render_scene,
    split_counts,
)
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, class_condition, read_dataset

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def dataset200(tmp_path_factory) -> tuple[Path, dict]:
    """200 images at 224 px, seed 0, read back strictly."""
    root = tmp_path_factory.mktemp("inspection") / "ds"
    summary = generate_inspection_dataset(root, InspectionConfig(images=200, seed=0))
    splits, report = read_dataset(root, strict=True)
    return root, {"summary": summary, "splits": splits, "report": report}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _polygon_mask(polygon, width: int, height: int) -> np.ndarray:
    """bool[H, W] of a polygon in pixels."""
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in polygon], fill=1)
    return np.asarray(image, dtype=bool)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = InspectionConfig(images=10, seed=5, size=128)
    generate_inspection_dataset(tmp_path / "a", config)
    generate_inspection_dataset(tmp_path / "b", config)
    generate_inspection_dataset(tmp_path / "c", InspectionConfig(images=10, seed=6, size=128))
    first, second, other = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(first) == 1 + 2 * 10  # data.yaml + an image and a label file each
    assert first == second
    images = [name for name in first if name.endswith(".jpg")]
    assert sum(first[name] != other[name] for name in images) == len(images)
    # render_scene alone is deterministic too.
    plan = COVERAGE_PLANS[0]
    one, two = render_scene(plan, 96, (1, 2)), render_scene(plan, 96, (1, 2))
    assert np.array_equal(one.image, two.image) and one.objects == two.objects


def test_layout_reads_back_with_zero_problems(dataset200):
    root, data = dataset200
    report, summary = data["report"], data["summary"]
    assert report.ok and report.problems == () and report.bad_rows == 0
    assert (root / "data.yaml").read_text().startswith("#")
    assert "train: ../train/images" in (root / "data.yaml").read_text()  # Roboflow's path convention
    assert report.images == 200 and report.images_per_split == {"train": 140, "val": 30, "test": 30}
    assert report.missing_label_files == 0 and report.label_files_without_image == 0
    assert report.objects == sum(summary.objects_per_class.values())
    assert report.objects_per_class == summary.objects_per_class
    # Background images (empty label files) in every split.
    assert summary.background_images == {"train": 8, "val": 2, "test": 2}
    assert report.background_images == 12
    for key in SPLITS:
        images = data["splits"][key]
        assert all((image.width, image.height) == (224, 224) for image in images)
        assert Path(images[0].image_path).parent == root / {"val": "valid"}.get(key, key) / "images"


def test_class_frequencies_are_imbalanced_like_inspection_data(dataset200):
    _, data = dataset200
    counts = data["summary"].objects_per_class
    assert set(counts) == set(CONDITION_CLASSES) and min(counts.values()) > 0
    for normal, rare in [
        ("slope drain", "slope drain blocked"),
        ("slope drain", "slope drain damaged"),
        ("Toe drain", "Toe drain- Blocked"),
        ("Toe drain", "Toe drain- Damaged"),
        ("rock toe", "rock toe damaged"),
    ]:
        assert counts[normal] > counts[rare]
    assert max(counts, key=counts.get) == "vegetation"
    ratio = max(counts.values()) / min(counts.values())
    assert 3.0 < ratio < 15.0  # the seed project's export: about 7:1
    labelled = 200 - 12
    assert 3.5 < sum(counts.values()) / labelled < 7.0  # the seed export: ~5 objects per image


def test_every_class_in_every_split(dataset200, tmp_path):
    _, data = dataset200
    for key in SPLITS:
        present = Counter(d.name for image in data["splits"][key] for d in image.detections)
        assert set(present) == set(CONDITION_CLASSES), key
    # Also for a small dataset: 60 images (test split: 9 images).
    generate_inspection_dataset(tmp_path / "small", InspectionConfig(images=60, seed=1, size=128))
    splits, report = read_dataset(tmp_path / "small", strict=True)
    assert report.images == 60
    for key in SPLITS:
        assert {d.name for image in splits[key] for d in image.detections} == set(CONDITION_CLASSES), key


def test_polygons_match_the_drawn_objects():
    """Each label polygon, rasterised, is the set of pixels painted as that object (instance map IoU)."""
    plans = [*COVERAGE_PLANS, ScenePlan(slope_drains=("damaged",), vegetation=3)]
    ious = []
    for i in range(12):
        plan = plans[i % len(plans)]
        scene = render_scene(plan, 224, (7, i))
        assert scene.image.shape == (224, 224, 3) and scene.image.dtype == np.uint8
        assert len({obj.instance for obj in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            xs, ys = zip(*obj.polygon, strict=True)
            assert min(xs) >= 0 and min(ys) >= 0 and max(xs) <= 224 and max(ys) <= 224
            assert obj.box == (min(xs), min(ys), max(xs), max(ys))
            labelled = _polygon_mask(obj.polygon, 224, 224)
            drawn = scene.instance == obj.instance
            ious.append((labelled & drawn).sum() / (labelled | drawn).sum())
    assert min(ious) > 0.9 and float(np.mean(ious)) > 0.97


def test_written_polygons_cover_pixels_unlike_the_slope(dataset200):
    """Mean colour inside each object's polygon differs from the unlabelled pixels around it."""
    _, data = dataset200
    differences = []
    for image in data["splits"]["test"]:
        pixels = np.asarray(Image.open(image.image_path).convert("RGB"), np.float32)
        masks = [
            _polygon_mask([(x * image.width, y * image.height) for x, y in d.polygon], image.width, image.height)
            for d in image.detections
        ]
        background = ~np.logical_or.reduce(masks) if masks else np.ones(pixels.shape[:2], bool)
        for detection, mask in zip(image.detections, masks, strict=True):
            x1, y1, x2, y2 = (int(v) for v in detection.pixel_box(image.width, image.height))
            around = np.zeros_like(mask)
            around[max(0, y1 - 12) : y2 + 12, max(0, x1 - 12) : x2 + 12] = True
            around &= background
            if around.sum() < 20:
                continue
            inside = pixels[mask].mean(axis=0)
            outside = pixels[around].mean(axis=0)
            differences.append(float(np.linalg.norm(inside - outside)))
    assert len(differences) > 80
    assert np.median(differences) > 40
    assert np.mean(np.array(differences) > 15) > 0.9


def _crop_features(images, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Box crops downscaled to side x side: float32[N, side*side*3] in [0, 1], and class ids int[N]."""
    features, labels = [], []
    for image in images:
        picture = Image.open(image.image_path).convert("RGB")
        for d in image.detections:
            x1, y1, x2, y2 = d.pixel_box(image.width, image.height)
            crop = picture.crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
            crop = crop.resize((side, side), Image.Resampling.BILINEAR)
            features.append(np.asarray(crop, np.float32).ravel() / 255.0)
            labels.append(d.class_id)
    return np.stack(features), np.asarray(labels)


def test_conditions_separable_by_nearest_centroid_on_small_crops(dataset200, record_property):
    """Nearest class centroid on 16x16 box crops, fitted on train and scored on test, beats the majority class."""
    _, data = dataset200
    x_train, y_train = _crop_features(data["splits"]["train"])
    x_test, y_test = _crop_features(data["splits"]["test"])
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(len(CONDITION_CLASSES))])
    distances = ((x_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float((distances.argmin(axis=1) == y_test).mean())
    majority_class = Counter(y_train.tolist()).most_common(1)[0][0]
    majority = float((y_test == majority_class).mean())
    # With the object type known (what stage 1 gives): choose among that type's conditions only.
    types = [class_condition(name)[0] for name in CONDITION_CLASSES]
    same_type = np.array([[types[c] == types[t] for c in range(len(types))] for t in y_test])
    typed = float((np.where(same_type, distances, np.inf).argmin(axis=1) == y_test).mean())
    record_property("nearest_centroid_accuracy", accuracy)
    record_property("majority_accuracy", majority)
    record_property("nearest_centroid_within_type_accuracy", typed)
    print(f"nearest centroid {accuracy:.3f} (within type {typed:.3f}) vs majority {majority:.3f}, n={len(y_test)}")
    assert len(y_test) > 80
    assert accuracy > majority + 0.25
    # Within a type, the majority baseline is "normal" for every object.
    normal_share = float(np.mean([class_condition(CONDITION_CLASSES[t])[1] == "normal" for t in y_test]))
    assert typed > normal_share + 0.1


def test_split_plans_counts_and_config_validation(tmp_path):
    assert split_counts(200, (0.7, 0.15, 0.15)) == (140, 30, 30)
    assert split_counts(7, (0.7, 0.15, 0.15)) == (5, 1, 1)
    plans = dataset_plans(InspectionConfig(images=60))
    assert [key for key, _ in plans].count("test") == 9
    test_plans = [plan for key, plan in plans if key == "test"]
    assert test_plans[:3] == list(COVERAGE_PLANS) and test_plans[-1].background
    for bad in (
        dict(images=0),
        dict(size=32),
        dict(splits=(0.5, 0.2, 0.2)),
        dict(splits=(1.2, -0.1, -0.1)),
        dict(image_format="gif"),
        dict(background_fraction=1.0),
    ):
        with pytest.raises(ValueError):
            InspectionConfig(**bad)
    generate_inspection_dataset(tmp_path / "ds", InspectionConfig(images=3, size=64, image_format="png"))
    assert len(list((tmp_path / "ds").rglob("*.png"))) == 3
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        generate_inspection_dataset(tmp_path / "ds", InspectionConfig(images=2, size=64))
    generate_inspection_dataset(tmp_path / "ds", InspectionConfig(images=2, size=64), overwrite=True)
    assert len(list((tmp_path / "ds").rglob("*.png"))) == 0 and len(list((tmp_path / "ds").rglob("*.jpg"))) == 2


def test_clip_polygon_and_area():
    square = [(-10.0, -10.0), (50.0, -10.0), (50.0, 50.0), (-10.0, 50.0)]
    clipped = clip_polygon(square, 40, 30)
    assert polygon_area(clipped) == pytest.approx(40 * 30)
    assert clip_polygon([(100.0, 100.0), (120.0, 100.0), (110.0, 120.0)], 40, 30) == []
    triangle = [(10.0, 10.0), (20.0, 10.0), (15.0, 20.0)]
    assert clip_polygon(triangle, 40, 30) == triangle


def test_job_prints_a_json_summary(tmp_path, capsys):
    out = tmp_path / "job"
    code = generate_inspection.main(["--out", str(out), "--images", "12", "--seed", "2", "--size", "96"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert summary["images"] == 12 and sum(summary["images_per_split"].values()) == 12
    assert set(summary["objects_per_class"]) == set(CONDITION_CLASSES)
    assert summary["read_back"] == {"images": 12, "objects": summary["objects"], "problems": 0}
    assert generate_inspection.main(["--out", str(out), "--images", "4", "--overwrite", "--splits", "1,0,0"]) == 0
    assert json.loads(capsys.readouterr().out)["images_per_split"] == {"train": 4, "val": 0, "test": 0}
    with pytest.raises(SystemExit):
        generate_inspection.parse_args(["--out", "x", "--images", "3", "--splits", "0.5,0.5"])
