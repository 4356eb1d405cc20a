"""Prepare clips: OpenPack-layout sessions -> labelled clips -> sampled frames -> Parquet shards + manifest.

Run on a laptop (starts a local Ray on 127.0.0.1)::

    python jobs/prepare_data.py --source data/synthetic --out data/prepared --sampler motion

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --source /mnt/openpack --out /mnt/prepared sampling.frames_per_clip=16

Writes ``<out>/clips/split={train,val,test,rejected}/*.parquet``, ``<out>/manifest.json`` and
``<out>/summary.json`` (clips_total / clips_written / clips_rejected and the reasons). Any other config field can
be overridden as ``key=value`` (see ``opsvlm.data.pipeline.PrepareConfig``), or given in a YAML preset.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import flag_overrides, load_config
from opsvlm.data.pipeline import PrepareConfig, prepare
from opsvlm.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="dataset root in the OpenPack layout")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--sampler", choices=["uniform", "motion"], help="frame sampling strategy")
    parser.add_argument("--config", help="YAML preset with PrepareConfig fields")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. clips.length_s=4")
    args = parser.parse_args(argv)

    # 1. config: preset, then flags, then key=value overrides
    flags = {"source": args.source, "out": args.out, "sampling.strategy": args.sampler}
    config = load_config(PrepareConfig, args.config, flag_overrides(flags, args.overrides))
    if not config.source or not config.out:
        parser.error("--source and --out are required (or set them in the preset)")

    # 2. data: decode, sample and write in parallel with Ray Data
    init_ray(args.address)
    summary = prepare(config)

    # 3. report
    print(json.dumps({k: v for k, v in summary.items() if k != "rejected_sessions"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
