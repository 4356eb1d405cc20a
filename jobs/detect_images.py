"""Detect the inspection task's objects in a folder of images with Ray Data (stage 1 only).

Writes per-image JSON (the stage-1 detections format ``/predict_objects`` and ``tasks.inspection.data.yolo`` read) and a
YOLO-format prediction export (``labels/*.txt``: ``class cx cy w h score``, ``data.yaml`` with the names). Logic:
``opsvlm.detection.batch``::

    python jobs/detect_images.py images=site_photos/ out=outputs/detections \\
        detector=models:/opsvlm-detector@champion conf=0.25

``detector`` is a registry reference, ``runs:/<run_id>``, or a ``.pt``/``.onnx`` file (``prefer=onnx`` runs the
registered ONNX export with onnxruntime). Prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import load_config
from opsvlm.detection.batch import BatchDetectConfig, detect_folder
from opsvlm.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. images=DIR out=DIR")
    args = parser.parse_args(argv)
    config = load_config(BatchDetectConfig, args.config, args.overrides)
    init_ray(args.address, num_cpus=args.num_cpus)
    print(json.dumps(detect_folder(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
