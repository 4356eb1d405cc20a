"""Prepare inspection examples: a YOLO dataset -> one rendered example per object -> Parquet shards + manifest.

Run on a laptop (starts a local Ray on 127.0.0.1)::

    python jobs/prepare_inspection.py --source data/inspection/data.yaml --out data/inspection_prepared

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_inspection.py --source /mnt/inspection --out /mnt/inspection_prepared \
        sampling.max_pixels=200704

Writes ``<out>/examples/split={train,val,test}/*.parquet`` (one row per object: the image resized with the model's
SamplingSpec and the object's box drawn on it, a close-up of the object, its box, type, condition and the other
objects), ``<out>/rejected/`` (objects of images that failed to decode), ``<out>/manifest.json`` (counts per split
and class) and ``<out>/summary.json`` (every image and object accounted for). Any other config field can be
overridden as ``key=value`` (see ``opsvlm.data.inspection_prep.InspectionPrepConfig``), or given in a YAML preset.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import flag_overrides, load_config
from opsvlm.data.inspection_prep import InspectionPrepConfig, prepare_inspection
from opsvlm.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="YOLO dataset: its data.yaml or the folder holding it")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--config", help="YAML preset with InspectionPrepConfig fields")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampling.max_pixels=50176 strict=true")
    args = parser.parse_args(argv)

    # 1. config: preset, then flags, then key=value overrides
    flags = {"source": args.source, "out": args.out}
    config = load_config(InspectionPrepConfig, args.config, flag_overrides(flags, args.overrides))
    if not config.source or not config.out:
        parser.error("--source and --out are required (or set them in the preset)")

    # 2. data: read labels, decode and render in parallel with Ray Data, write shards
    init_ray(args.address)
    summary = prepare_inspection(config)

    # 3. report (problem lists stay in summary.json)
    brief = {k: v for k, v in summary.items() if k not in ("decode_failures", "unknown_classes", "read")}
    brief["read_problems_by_reason"] = summary["read"]["problems_by_reason"]
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
