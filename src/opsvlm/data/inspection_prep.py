"""Prepare inspection examples: a YOLO dataset -> one rendered example per object -> Parquet shards + manifest.

The YOLO reader (:mod:`inspection.data.yolo`) lists images and their objects and accounts for every label line; here
each image with objects becomes one Ray Data record, decoded once by one task, and emits one row per object: the
image resized with the model's SamplingSpec with that object's box drawn on it
(:func:`opsvlm.tasks.inspection.render_input`), the target's box and type, and every other object of the image.

Nothing disappears: an image that fails to decode yields one ``status = "rejected"`` row per object (with the
reason), which ends up in ``<out>/rejected/`` instead of ``<out>/examples/``; objects whose class is not one of the
9 condition classes are counted; the summary checks that every object of the read report is an example, a
rejected object or an unknown-class object, and every image has examples, is background or failed to decode.

Output::

    <out>/examples/split=<split>/*.parquet   rows of EXAMPLE_SCHEMA, status "ok"
    <out>/rejected/*.parquet                 objects of images that failed to decode (status "rejected")
    <out>/manifest.json                      format, task, rows_dir, sampling spec, counts per split and class
    <out>/summary.json                       the accounting
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opsvlm.config import to_dict
from opsvlm.tasks.inspection import InspectionTask, mark_target, render_closeup, resize_image
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, canonical_class_name, class_condition, read_dataset
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "DECODE_FAILED",
    "EXAMPLE_SCHEMA",
    "MANIFEST_FORMAT",
    "MAX_PROBLEMS_IN_SUMMARY",
    "REJECTED",
    "REJECTED_DIR",
    "ROWS_DIR",
    "ROWS_PER_TABLE",
    "SIZE_MISMATCH",
    "UNKNOWN_CLASS",
    "ImagePlan",
    "InspectionPrepConfig",
    "example_dataset",
    "example_rows",
    "plan_images",
    "prepare_inspection",
    "render_batch",
]

MANIFEST_FORMAT = "opsvlm-examples/1"
ROWS_DIR = "examples"
REJECTED_DIR = "rejected"
REJECTED = "rejected"  # the split value of rejected rows while they are written
UNKNOWN_CLASS = "unknown_class"
DECODE_FAILED = "decode_failed"
SIZE_MISMATCH = "size_mismatch"
MAX_PROBLEMS_IN_SUMMARY = 200  # the summary lists this many problems in full; all are counted by kind

EXAMPLE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),  # "<split>/<image stem>#<object index>"
        ("split", pa.string()),
        ("image_id", pa.string()),  # "<split>/<image stem>"
        ("source", pa.string()),  # the image file
        ("label_line", pa.int32()),  # the object's 1-based line in its label file
        ("image", pa.binary()),  # raw bytes of the rendered uint8[h, w, 3]
        ("image_shape", pa.list_(pa.int32())),
        ("closeup", pa.binary()),  # raw bytes of the target's close-up uint8[h, w, 3]
        ("closeup_shape", pa.list_(pa.int32())),
        ("target_index", pa.int32()),  # index of the target among the image's objects
        ("target_box", pa.list_(pa.float64())),  # (x1, y1, x2, y2) normalised
        ("target_type", pa.string()),
        ("condition", pa.string()),  # the truth: one of CONDITION_CLASSES
        ("object_types", pa.list_(pa.string())),  # the other objects of the image
        ("object_boxes", pa.list_(pa.list_(pa.float64()))),
        ("status", pa.string()),  # "ok", or "rejected" (only under <out>/rejected)
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class InspectionPrepConfig:
    """Configuration of ``jobs/prepare_inspection.py``.

    Attributes:
        source: The YOLO dataset: its ``data.yaml`` or the folder holding it.
        out: Output folder for examples, manifest and summary. Its ``examples`` folder must not exist yet (a second
            run into the same folder would mix two datasets) unless ``overwrite``.
        sampling: The model's SamplingSpec; for images only its pixel limits and size multiple matter (the image is
            resized to ``sampling.target_size`` before the target is drawn).
        strict: Stop at the first problem in the dataset (bad label row, unreadable file, unknown class name, image
            that fails to decode) instead of counting and reporting it.
        overwrite: Replace earlier output in ``out``.
        images_per_batch: Images decoded per Ray Data batch.
        decode_num_cpus: CPUs reserved per decoding task (a fraction lets several decode at once).
    """

    source: str = ""
    out: str = ""
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    strict: bool = False
    overwrite: bool = False
    images_per_batch: int = 8
    decode_num_cpus: float = 0.5

    def __post_init__(self) -> None:
        if self.images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {self.images_per_batch}")
        if self.decode_num_cpus <= 0:
            raise ValueError(f"decode_num_cpus must be > 0, got {self.decode_num_cpus}")


@dataclass
class ImagePlan:
    """What reading the dataset gives the decoding step.

    Attributes:
        records: One record per image with at least one known-class object (what a decoding task needs).
        background: Images without objects (empty or missing label file, or only bad rows).
        unknown_class: ``{"path", "line", "name"}`` of objects whose class is not a condition class.
        unknown_only_images: Images whose objects all have unknown classes (no example, not background).
    """

    records: list[dict]
    background: list[str]
    unknown_class: list[dict]
    unknown_only_images: list[str]


def plan_images(splits: dict, strict: bool = False) -> ImagePlan:
    """Turn the reader's images into decoding records (no pixels are touched here).

    Args:
        splits: ``{split: [LabelledImage]}`` from :func:`opsvlm.tasks.inspection.data.yolo.read_dataset`.
        strict: Raise on an unknown class name instead of counting it.

    Raises:
        ValueError: two images of a split share a file stem (example ids would collide), naming both; an unknown
            class name in strict mode, naming the label file and line.
    """
    records, background, unknown, unknown_only = [], [], [], []
    for split, images in splits.items():
        seen: dict[str, str] = {}
        for image in images:
            stem = Path(image.image_path).stem
            if stem in seen:
                raise ValueError(
                    f"{split}: images {seen[stem]} and {image.image_path} share the stem {stem!r}; example ids "
                    "(<split>/<stem>#<object>) must be unique: rename one"
                )
            seen[stem] = image.image_path
            objects = []
            for detection in image.detections:
                try:
                    name = canonical_class_name(detection.name)
                except ValueError as err:
                    if strict:
                        raise ValueError(f"{image.label_path}:{detection.line}: {err}") from None
                    unknown.append({"path": image.label_path, "line": detection.line, "name": detection.name})
                    continue
                objects.append({"condition": name, "box": list(detection.box), "line": detection.line})
            if not image.detections:
                background.append(image.image_path)
            elif not objects:
                unknown_only.append(image.image_path)
            else:
                records.append(
                    {
                        "split": split,
                        "image_id": f"{split}/{stem}",
                        "source": image.image_path,
                        "width": image.width,
                        "height": image.height,
                        # JSON keeps the nested list out of Arrow type inference (one block may hold odd shapes)
                        "objects": json.dumps(objects),
                    }
                )
    return ImagePlan(records, background, unknown, unknown_only)


def _decode(path: str, width: int, height: int) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an image file whose header said ``width x height``."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"{SIZE_MISMATCH}: decoded {pixels.shape[1]}x{pixels.shape[0]}, header said {width}x{height}")
    return pixels


def example_rows(record: dict, spec: SamplingSpec) -> list[dict]:
    """The rows of one image record: one per object, ``ok`` with the rendered image, or ``rejected`` with why.

    Args:
        record: One of :attr:`ImagePlan.records`.
        spec: The model's SamplingSpec.
    """
    objects = json.loads(record["objects"])
    types = [class_condition(o["condition"])[0] for o in objects]
    try:
        original = _decode(record["source"], record["width"], record["height"])
        resized = resize_image(original, spec)
        status, reason, detail = "ok", "", ""
    except Exception as err:  # Pillow raises many types (OSError for truncated data, SyntaxError, ValueError...)
        original, resized, status = None, None, "rejected"
        reason = SIZE_MISMATCH if str(err).startswith(SIZE_MISMATCH) else DECODE_FAILED
        detail = f"{record['source']}: {type(err).__name__}: {err}"
    rows = []
    for index, obj in enumerate(objects):
        # the same rendering as opsvlm.tasks.inspection.object_input (serving), with the resize done once per image
        pixels = mark_target(resized, obj["box"]) if resized is not None else None
        closeup = render_closeup(original, obj["box"], spec) if original is not None else None
        rows.append(
            {
                "example_id": f"{record['image_id']}#{index}",
                "split": record["split"] if status == "ok" else REJECTED,
                "image_id": record["image_id"],
                "source": record["source"],
                "label_line": obj["line"],
                "image": pixels.tobytes() if pixels is not None else b"",
                "image_shape": list(pixels.shape) if pixels is not None else [],
                "closeup": closeup.tobytes() if closeup is not None else b"",
                "closeup_shape": list(closeup.shape) if closeup is not None else [],
                "target_index": index,
                "target_box": obj["box"],
                "target_type": types[index],
                "condition": obj["condition"],
                "object_types": [t for j, t in enumerate(types) if j != index],
                "object_boxes": [o["box"] for j, o in enumerate(objects) if j != index],
                "status": status,
                "reason": reason,
                "detail": detail,
            }
        )
    return rows


ROWS_PER_TABLE = 64  # ~10 MB of 224x224 images: bounded memory per decoding task


def render_batch(batch: pa.Table, spec: SamplingSpec, strict: bool = False) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: image records in, example rows out (in small tables)."""
    rows: list[dict] = []
    for record in batch.to_pylist():
        new = example_rows(record, spec)
        if strict and new and new[0]["status"] != "ok":
            raise ValueError(new[0]["detail"])
        rows.extend(new)
        if len(rows) >= ROWS_PER_TABLE:
            yield pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def example_dataset(plan: ImagePlan, config: InspectionPrepConfig):
    """A Ray Dataset with one row per object of every planned image (decoded lazily, in parallel)."""
    import ray.data

    blocks = max(1, math.ceil(len(plan.records) / config.images_per_batch))
    images = ray.data.from_items(plan.records, override_num_blocks=blocks)
    return images.map_batches(
        render_batch,
        batch_size=config.images_per_batch,
        batch_format="pyarrow",
        fn_kwargs={"spec": config.sampling, "strict": config.strict},
        num_cpus=config.decode_num_cpus,
    )


def prepare_inspection(config: InspectionPrepConfig) -> dict:
    """Prepare inspection examples from ``config.source`` into ``config.out`` (see the module docstring).

    Needs Ray to be initialised (``opsvlm.runtime.init_ray``) when the dataset has any object.

    Returns:
        The run summary (also written to ``<out>/summary.json``).

    Raises:
        FileExistsError: ``<out>/examples`` exists and ``overwrite`` is off.
        ValueError, FileNotFoundError: see :func:`tasks.inspection.data.yolo.read_dataset` and :func:`plan_images`.
    """
    started = time.time()
    out = Path(config.out)
    rows_dir, rejected_dir = out / ROWS_DIR, out / REJECTED_DIR
    if rows_dir.exists() or rejected_dir.exists():
        if not config.overwrite:
            raise FileExistsError(f"{rows_dir} already exists; choose another out or set overwrite=true")
        shutil.rmtree(rows_dir, ignore_errors=True)
        shutil.rmtree(rejected_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    splits, report = read_dataset(config.source, strict=config.strict)
    plan = plan_images(splits, config.strict)
    print(
        f"prepare_inspection: {report.images} images, {report.objects} objects, {len(plan.records)} images to render, "
        f"{len(report.problems)} problems while reading",
        flush=True,
    )
    if plan.records:
        example_dataset(plan, config).write_parquet(str(rows_dir), partition_cols=["split"])
        written_rejected = rows_dir / f"split={REJECTED}"
        if written_rejected.exists():  # keep examples/ to usable rows only
            written_rejected.rename(rejected_dir)

    counts = _read_back(rows_dir, rejected_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": InspectionTask.name,  # one example per object of a YOLO export: the inspection task's data
        "rows_dir": ROWS_DIR,
        "source": str(config.source),
        "config": to_dict(config),
        "sampling_spec": to_dict(config.sampling),
        "splits": {
            split: {"examples": c["examples"], "images": c["images"], "files": c["files"]}
            for split, c in counts["splits"].items()
        },
        "class_counts": {split: c["classes"] for split, c in counts["splits"].items()},
    }
    summary = _summarize(config, report, plan, counts, time.time() - started)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _table(files: list[Path], columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _read_back(rows_dir: Path, rejected_dir: Path) -> dict:
    """Counts read back from the written files (not from memory)."""
    splits = {}
    for part in sorted(rows_dir.glob("split=*")) if rows_dir.exists() else []:
        files = sorted(part.glob("*.parquet"))
        table = _table(files, ["image_id", "condition"])
        classes = Counter(table.column("condition").to_pylist())
        splits[part.name.split("=", 1)[1]] = {
            "examples": table.num_rows,
            "images": len(set(table.column("image_id").to_pylist())),
            "classes": {name: classes.get(name, 0) for name in CONDITION_CLASSES},
            "files": [str(f.relative_to(rows_dir.parent)) for f in files],
        }
    rejected: list[dict] = []
    files = sorted(rejected_dir.glob("*.parquet")) if rejected_dir.exists() else []
    if files:
        rejected = _table(files, ["image_id", "source", "reason", "detail"]).to_pylist()
    return {"splits": splits, "rejected": rejected}


def _summarize(config: InspectionPrepConfig, report, plan: ImagePlan, counts: dict, elapsed: float) -> dict:
    written = {split: c["examples"] for split, c in counts["splits"].items()}
    failed_images: dict[str, dict] = {}
    for row in counts["rejected"]:
        failed_images.setdefault(row["image_id"], {"image": row["source"], "reason": row["reason"], "detail": ""})
        failed_images[row["image_id"]]["detail"] = row["detail"]
    images_with_examples = sum(c["images"] for c in counts["splits"].values())
    objects_written, objects_rejected = sum(written.values()), len(counts["rejected"])
    problems = list(report.problems)
    summary = {
        "source": str(config.source),
        "out": str(config.out),
        "images": report.images,
        "images_with_examples": images_with_examples,
        "background_images": len(plan.background),
        "images_only_unknown_classes": len(plan.unknown_only_images),
        "images_failed_to_decode": len(failed_images),
        "images_unaccounted": report.images
        - images_with_examples
        - len(plan.background)
        - len(plan.unknown_only_images)
        - len(failed_images),
        "objects": report.objects,
        "examples_written": objects_written,
        "examples_by_split": written,
        "objects_rejected": objects_rejected,
        "objects_unknown_class": len(plan.unknown_class),
        "objects_unaccounted": report.objects - objects_written - objects_rejected - len(plan.unknown_class),
        "decode_failures": sorted(failed_images.values(), key=lambda f: f["image"]),
        "unknown_classes": plan.unknown_class,
        "read": {
            "problems_by_reason": dict(Counter(p.kind for p in problems)),
            "bad_rows_by_reason": dict(report.bad_rows_by_reason),
            "missing_label_files": report.missing_label_files,
            "empty_label_files": report.background_images,
            "unreadable_images": report.unreadable_images,
            "unreadable_label_files": report.unreadable_label_files,
            "label_files_without_image": report.label_files_without_image,
            "non_image_files": report.non_image_files,
            "missing_split_dirs": dict(report.missing_split_dirs),
            "images_per_split": dict(report.images_per_split),
            "problems": [str(p) for p in problems[:MAX_PROBLEMS_IN_SUMMARY]],
            "problems_listed": min(len(problems), MAX_PROBLEMS_IN_SUMMARY),
            "problems_total": len(problems),
        },
        "elapsed_s": round(elapsed, 3),
    }
    if summary["images_unaccounted"] or summary["objects_unaccounted"]:
        # Should never happen (every object yields exactly one row); say so loudly rather than hide it.
        print(
            f"prepare_inspection: WARNING {summary['images_unaccounted']} images and "
            f"{summary['objects_unaccounted']} objects are unaccounted for",
            flush=True,
        )
    return summary
