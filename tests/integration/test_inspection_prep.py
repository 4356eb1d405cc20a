"""Inspection preparation on a real local Ray: a generated YOLO dataset with a malformed label row, an image that is
not an image, an image whose pixels are cut short and a class that is not a condition class."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.prepare_inspection import main as prepare_job
from opsvlm.data.inspection_prep import InspectionPrepConfig, prepare_inspection
from opsvlm.tasks.base import get_task
from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES
from opsvlm.video.sampling import SamplingSpec

pytestmark = pytest.mark.integration

SIZE = 96
SPEC = SamplingSpec(max_pixels=56 * 56, min_pixels=28 * 28)


def _label_rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory) -> dict:
    """A 14-image generated dataset, broken on purpose; returns what the test must find."""
    root = tmp_path_factory.mktemp("inspection") / "dataset"
    generated = generate_inspection_dataset(root, InspectionConfig(images=14, size=SIZE, seed=3))
    labels = {p.stem: p for p in sorted((root / "train" / "labels").glob("*.txt")) if _label_rows(p)}
    garbage, truncated, malformed = list(labels)[:3]  # the generator puts drains and a rock toe in every scene
    # an image that is not an image: the YOLO reader refuses it (its objects are never read)
    garbage_objects = len(_label_rows(labels[garbage]))
    (root / "train" / "images" / f"{garbage}.jpg").write_bytes(b"not a jpeg at all")
    # an image whose header is fine but whose pixel data is cut short: it fails only when decoded
    image = root / "train" / "images" / f"{truncated}.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    truncated_objects = sum(row[0] != "8" for row in _label_rows(labels[truncated]))  # vegetation is unknown below
    # a malformed row at the end of a label file (the file's other rows still count)
    with labels[malformed].open("a") as f:
        f.write("3 0.5 0.5 abc 0.2\n")
    # vegetation renamed to a class the task does not know
    yaml = (root / "data.yaml").read_text().replace('"vegetation"', '"tree"')
    (root / "data.yaml").write_text(yaml)
    vegetation = sum(
        row[0] == "8"
        for split in ("train", "valid", "test")
        for p in (root / split / "labels").glob("*.txt")
        if p.stem != garbage
        for row in _label_rows(p)
    )
    objects = generated.to_dict()["objects"] - garbage_objects
    return {
        "root": root,
        "images": sum(generated.images_per_split.values()) - 1,
        "background": sum(generated.background_images.values()),
        "objects": objects,
        "truncated": truncated,
        "truncated_objects": truncated_objects,
        "vegetation": vegetation,
        "malformed": labels[malformed],
    }


@pytest.fixture(scope="module")
def prepared(ray_local, broken_dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare_inspection(
        InspectionPrepConfig(source=str(broken_dataset["root"]), out=str(out), sampling=SPEC, images_per_batch=4)
    )
    return out, summary


def test_summary_accounts_for_every_image_and_object(prepared, broken_dataset) -> None:
    out, summary = prepared
    assert summary == json.loads((out / "summary.json").read_text())
    expect = broken_dataset
    assert summary["images"] == expect["images"]
    assert summary["objects"] == expect["objects"]
    assert summary["background_images"] == expect["background"]
    assert summary["images_failed_to_decode"] == 1
    assert summary["objects_rejected"] == expect["truncated_objects"] > 0
    assert summary["objects_unknown_class"] == expect["vegetation"] > 0
    assert summary["examples_written"] == expect["objects"] - expect["truncated_objects"] - expect["vegetation"]
    assert summary["examples_written"] == sum(summary["examples_by_split"].values())
    assert summary["images_unaccounted"] == 0 and summary["objects_unaccounted"] == 0
    (failure,) = summary["decode_failures"]
    assert failure["image"].endswith(f"{expect['truncated']}.jpg") and failure["reason"] == "decode_failed"
    assert "truncated" in failure["detail"]
    assert summary["read"]["bad_rows_by_reason"] == {"not_a_number": 1}
    assert summary["read"]["problems_by_reason"] == {"unreadable_image": 1, "not_a_number": 1}
    assert any(str(expect["malformed"]) in p for p in summary["read"]["problems"])
    assert {u["name"] for u in summary["unknown_classes"]} == {"tree"}


def test_rows_are_rendered_examples_of_their_objects(prepared, broken_dataset) -> None:
    out, summary = prepared
    task = get_task("inspection")
    rows = []
    for split, count in summary["examples_by_split"].items():
        table = pq.ParquetDataset(sorted((out / "examples" / f"split={split}").glob("*.parquet"))).read()
        assert table.num_rows == count
        rows += table.to_pylist()
    assert len({row["example_id"] for row in rows}) == len(rows)
    height, width = SPEC.target_size(SIZE, SIZE)
    for row in rows:
        assert row["status"] == "ok" and row["condition"] in CONDITION_CLASSES and row["condition"] != "vegetation"
        assert row["example_id"] == f"{row['image_id']}#{row['target_index']}"
        assert row["image_id"] == f"{row['split']}/{Path(row['source']).stem}"
        assert row["image_shape"] == [height, width, 3] and len(row["image"]) == height * width * 3
        # the target box is the bounds of the polygon on the object's label line, in the row's image
        label = Path(row["source"]).parents[1] / "labels" / f"{Path(row['source']).stem}.txt"
        coords = [float(v) for v in label.read_text().splitlines()[row["label_line"] - 1].split()[1:]]
        expected_box = [min(coords[0::2]), min(coords[1::2]), max(coords[0::2]), max(coords[1::2])]
        assert np.allclose(row["target_box"], expected_box)
        assert len(row["object_types"]) == len(row["object_boxes"])
        example = task.input_of(row)
        x1 = min(round(row["target_box"][0] * width), width - 1)
        y1 = min(round(row["target_box"][1] * height), height - 1)
        assert tuple(example.image[y1, x1]) == (255, 0, 0)  # the outline's corner
        assert task.target_of(row) == '{"condition": "' + row["condition"] + '"}'
    # the other objects of a row are the image's objects without the target
    by_image = Counter(row["image_id"] for row in rows)
    for row in rows:
        # (objects of unknown classes are not context either: they have no known type)
        assert len(row["object_types"]) == by_image[row["image_id"]] - 1


def test_rejected_objects_and_manifest(prepared, broken_dataset) -> None:
    out, summary = prepared
    rejected = pq.ParquetDataset(sorted((out / "rejected").glob("*.parquet"))).read().to_pylist()
    assert len(rejected) == broken_dataset["truncated_objects"]
    assert {(r["status"], r["reason"], r["image"]) for r in rejected} == {("rejected", "decode_failed", b"")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "opsvlm-examples/1" and manifest["task"] == "inspection"
    assert manifest["rows_dir"] == "examples" and SamplingSpec(**manifest["sampling_spec"]) == SPEC
    assert {s: v["examples"] for s, v in manifest["splits"].items()} == summary["examples_by_split"]
    for split, classes in manifest["class_counts"].items():
        assert list(classes) == list(CONDITION_CLASSES)
        assert sum(classes.values()) == manifest["splits"][split]["examples"]
        assert classes["vegetation"] == 0
    assert set(manifest["splits"]) == {"train", "val", "test"}


def test_job_refuses_to_mix_runs_and_overwrites_on_request(prepared, broken_dataset, capsys) -> None:
    out, summary = prepared
    source = str(broken_dataset["root"])
    spec = [f"sampling.max_pixels={SPEC.max_pixels}", f"sampling.min_pixels={SPEC.min_pixels}"]
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_job(["--source", source, "--out", str(out), *spec])
    assert prepare_job(["--source", source, "--out", str(out), *spec, "overwrite=true"]) == 0
    text = capsys.readouterr().out
    printed, _ = json.JSONDecoder().raw_decode(text[text.rindex("\n{") + 1 :])
    assert printed["examples_written"] == summary["examples_written"]
    assert printed["read_problems_by_reason"] == summary["read"]["problems_by_reason"]
