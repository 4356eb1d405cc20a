"""Generate a synthetic OpenPack-layout dataset: operations CSVs plus rendered H.264 videos of a packing bench.

Real OpenPack RGB is access-restricted; these sessions have the same layout, so everything downstream reads them
exactly like real data (``openpack.discover_sessions``). All logic lives in ``tasks.operations.data.synthetic``.

Run locally::

    python jobs/generate_data.py --out data/synthetic --subjects 8 --sessions-per-subject 2 --seed 0 --minutes 10

or as a Ray job on the local cluster (the working directory is shipped to the cluster)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/generate_data.py --out /tmp/opsvlm/synthetic --subjects 8 --sessions-per-subject 2 --seed 0 \\
        --minutes 10

Options: ``--boxes-per-session K`` instead of ``--minutes X`` (default: 20 boxes, about 25 minutes), ``--fps 15``,
``--size 224x224``, ``--write-frames`` to also write the real RGB layout's JPEG frames, ``--no-video`` to skip the
MP4s. The same seed always gives the same CSV bytes and the same frames; subjects are ``U0101, U0102, ...`` and
sessions ``S0100, S0200, ...``, each depending only on (seed, subject, session), so held-out test subjects stay put
when more training subjects are added.
"""

from __future__ import annotations

import argparse
import sys
import time

from opsvlm.tasks.operations.data.openpack import read_operations_csv
from opsvlm.tasks.operations.data.synthetic import GeneratorConfig, generate_session, summarize


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 224x224 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write (OpenPack layout)")
    parser.add_argument("--subjects", type=int, default=2, help="number of workers U0101, U0102, ...")
    parser.add_argument("--sessions-per-subject", type=int, default=1, help="sessions per worker S0100, S0200, ...")
    parser.add_argument("--seed", type=int, default=0)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--boxes-per-session", type=int, help="boxes packed per session (default 20)")
    length.add_argument("--minutes", type=float, help="minimum session length; whole boxes are added until reached")
    parser.add_argument("--fps", type=int, default=15, help="video frame rate (OpenPack RGB: 15)")
    parser.add_argument("--size", type=_size, default=(224, 224), help="frame size WIDTHxHEIGHT (even numbers)")
    parser.add_argument("--write-frames", action="store_true", help="also write JPEG frames (real RGB layout)")
    parser.add_argument("--no-video", action="store_true", help="do not write MP4 videos")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the dataset described by the command line and print a short summary.

    Returns:
        0 on success (bad arguments exit through argparse / raise ``ValueError`` with the offending setting).
    """
    args = parse_args(argv)
    config = GeneratorConfig(
        subjects=args.subjects,
        sessions_per_subject=args.sessions_per_subject,
        boxes_per_session=args.boxes_per_session,
        session_duration_s=None if args.minutes is None else args.minutes * 60.0,
        fps=args.fps,
        width=args.size[0],
        height=args.size[1],
        seed=args.seed,
        write_video=not args.no_video,
        write_frames=args.write_frames,
    )
    started = time.perf_counter()
    sources = []
    for subject in config.subject_ids:
        for session in config.session_ids:
            source = generate_session(args.out, subject, session, config)
            sources.append(source)
            elapsed = time.perf_counter() - started
            print(f"{subject}/{session}: {source.annotation} + {source.media_kind} ({elapsed:.1f} s)")
    # Summarise from the written CSVs, which also checks that they read back.
    summary = summarize(read_operations_csv(source.annotation) for source in sources)
    print(summary.format())
    print(f"wrote {len(sources)} sessions to {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
