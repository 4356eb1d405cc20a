"""Train the inspection task's stage-1 detector (Ultralytics YOLO) on a YOLO export, track it, register it.

The 9 condition classes of the export are collapsed to the 4 object types (or as ``collapse`` says); the network is
built from a model YAML when no checkpoint is given (nothing is downloaded), or starts from ``yolo.weights``. One Ray
task trains (one GPU when the cluster has one), scores mAP@0.5 and mAP@0.5:0.95 per type on the validation and test
splits (95% image-bootstrap intervals) next to reference detectors that know nothing about the image, exports ONNX,
and logs it all to MLflow; the run is registered as a version of ``opsvlm-detector`` and promoted to ``champion`` by
the gate (higher test mAP@0.5:0.95 on the same split). Logic: ``opsvlm.detection.train``.

Run locally (tiny CPU settings; local Ray, local MLflow store in ./mlruns)::

    python jobs/generate_inspection.py --out data/inspection --images 160 --size 112
    python jobs/train_detector.py --config jobs/configs/detector_tiny.yaml data=data/inspection

On a cluster::

    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/train_detector.py \\
        data=/mnt/roboflow_export workdir=/mnt/opsvlm-detector yolo.epochs=100 yolo.imgsz=640 \\
        tracking_uri=http://<mlflow>:5000

From a checkpoint of your own: ``yolo.weights=/path/best.pt``. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import load_config
from opsvlm.detection.train import DetectorTrainConfig, train_detector
from opsvlm.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (e.g. jobs/configs/detector_tiny.yaml)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. yolo.epochs=50")
    args = parser.parse_args(argv)
    config = load_config(DetectorTrainConfig, args.config, args.overrides)
    init_ray(args.address, num_cpus=args.num_cpus)
    summary = train_detector(config)
    metrics = summary["metrics"]
    keep = ("test/map50", "test/map50_95", "test/map50_ci_low", "test/map50_ci_high", "baseline/prior/map50")
    print(
        json.dumps(
            {
                "run_id": summary["run_id"],
                "eval_split": summary["eval_split"],
                "version": summary["version"],
                "decision": summary["decision"],
                **{k: metrics.get(k) for k in keep},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
