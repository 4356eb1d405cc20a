"""Generate a synthetic infrastructure-inspection dataset in the Roboflow YOLO segmentation layout.

Scenes of slopes with slope drains, a toe drain, a rock toe and vegetation, each object labelled with one of the 9
condition classes (``inspection.data.yolo.CONDITION_CLASSES``) as a polygon; the output reads exactly like a Roboflow
export (``tasks.inspection.data.yolo.read_dataset``). All logic lives in ``tasks.inspection.data.synthetic``.

Run locally::

    python jobs/generate_inspection.py --out data/inspection --images 200 --seed 0

or as a Ray job on a cluster (the working directory is shipped to the cluster)::

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python jobs/generate_inspection.py --out /tmp/opsvlm/inspection --images 200 --seed 0

Options: ``--size 224`` (square images), ``--splits 0.7,0.15,0.15`` (train, valid, test fractions),
``--background 0.06`` (share of images without objects), ``--format jpg|png``, ``--overwrite`` to replace an
existing dataset in ``--out``. The same seed and options always give the same bytes. Prints one JSON summary
(images per split, objects per class, per split, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.tasks.inspection.data.yolo import read_dataset


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"splits must look like 0.7,0.15,0.15, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"splits needs 3 fractions (train,valid,test), got {text!r}")
    return values  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write (data.yaml, train/, valid/, test/)")
    parser.add_argument("--images", type=int, required=True, help="number of images over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="image width = height in pixels")
    parser.add_argument("--splits", type=_fractions, default=(0.7, 0.15, 0.15), help="train,valid,test fractions")
    parser.add_argument("--background", type=float, default=0.06, help="share of images without objects")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the dataset, read it back with the YOLO reader and print one JSON summary.

    Returns:
        0 on success, 1 when the written dataset does not read back cleanly (bad settings raise ``ValueError``).
    """
    args = parse_args(argv)
    config = InspectionConfig(
        images=args.images,
        seed=args.seed,
        size=args.size,
        splits=args.splits,
        background_fraction=args.background,
        image_format=args.format,
    )
    summary = generate_inspection_dataset(args.out, config, overwrite=args.overwrite)
    # Read it back: proves the layout is what the reader (and so the task) consumes.
    _, report = read_dataset(args.out)
    result = summary.to_dict()
    result["read_back"] = {"images": report.images, "objects": report.objects, "problems": len(report.problems)}
    print(json.dumps(result))
    return 0 if report.ok and report.objects == result["objects"] else 1


if __name__ == "__main__":
    sys.exit(main())
