"""Score the inspection system as it really runs: the detector (stage 1) then the VLM (stage 2) on the test images.

Predicted objects are matched to true ones at IoU >= 0.5; reported with 95% image-bootstrap intervals, next to the
perfect-stage-1 figures (true boxes and types -> VLM) and type-aware majority baselines: per-type detection
precision/recall, condition macro-F1 on matched objects, and end-to-end macro-F1 / accuracy where missed and
spurious objects count as errors; seconds per image of each stage. Logged to MLflow (metrics, table, a picture).
Logic: ``opsvlm.detection.system_eval``::

    python jobs/evaluate_system.py data=data/inspection \\
        detector=models:/opsvlm-detector@champion model=models:/opsvlm-inspection@champion

Prints the Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import load_config
from opsvlm.detection.system_eval import SystemEvalConfig, evaluate_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data=DIR split=test")
    args = parser.parse_args(argv)
    config = load_config(SystemEvalConfig, args.config, args.overrides)
    result = evaluate_system(config)
    print(result.pop("markdown"))
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
