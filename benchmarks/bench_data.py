"""Clip preparation throughput: the Ray Data pipeline against a seed-style loop and the decode-once ideal.

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/bench_data.py                 # 2 sessions of 10 min, 224x224, 15 fps, 2 CPUs
    .venv/bin/python benchmarks/bench_data.py --quick         # 1 session of 2 min: smoke test of the script
    .venv/bin/python benchmarks/bench_data.py --sessions 4 --minutes 10 --cpus 2 --repeats 3

What it measures. The same synthetic sessions (OpenPack layout, H.264 with the encoder's default settings, generated
once and cached under ``--workdir``, keyed by their parameters) are cut into the same clips (5 s windows every 2.5 s,
8 uniformly sampled frames resized to at most 224x224 pixels) three ways:

(a) ``pipeline``: ``opsvlm.data.pipeline.prepare`` on a local Ray instance with ``--cpus`` CPUs, writing Parquet
    shards. Clips/s = clips written / wall time of ``prepare`` (Ray startup excluded). The first run after Ray starts
    is reported apart as ``cold`` (Ray's workers and their decoder processes start during it); the best of the
    following ``--repeats`` (warm) runs is the headline figure.
(b) ``seed loop``: one process, per clip: open the video with decord (``VideoReader(path, width, height,
    num_threads=1)``), seek, read the clip's 8 frames (``get_batch``). This is how the seed code read clips.
(c) ``ideal``: one process decoding every needed frame once (``iter_session_clips``, in-process: no decoder
    subprocess, no Ray, no Parquet), clips/s multiplied by ``--cpus``: the bound for perfect parallel scaling.

The three must produce the same number of clips; a few clips' frames from (a) (read back from the Parquet) and (b)
are compared with (c)'s. After the cold run the three methods run in turn, ``--repeats`` times, all with the (idle)
Ray instance up, and each method's best run counts. The machine may be shared: the 1-minute load average is printed
with every run; rerun when it is well above the number of cores. CPU seconds are reported too (for (a): the driver's
and every Ray process's, decoder processes included): their ratio (a)/(c) does not depend on the load.

Output: a table, then ONE JSON line (last line)::

    {"benchmark": "data_pipeline", ..., "ratio": a/b, "target": 8.0, "ratio_to_ideal": c/a, "target_to_ideal": 1.5,
     "meets_target": true|false}

``meets_target`` holds when (a) >= 8x (b), (a) is within 1.5x of (c), and the three methods agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opsvlm.data.pipeline import PrepareConfig, SessionPlan, plan_sessions, prepare
from opsvlm.tasks.operations.data.clips import ClipConfig
from opsvlm.tasks.operations.data.openpack import SessionSource, discover_sessions
from opsvlm.tasks.operations.data.synthetic import GeneratorConfig, generate_dataset
from opsvlm.testing.cluster import start_ray
from opsvlm.video.decode import ClipFrames, ClipWindow, iter_session_clips
from opsvlm.video.sampling import SamplingSpec, uniform_indices

TARGET_VS_SEED = 8.0  # (a) must be at least this many times faster than (b)
TARGET_TO_IDEAL = 1.5  # (c) / (a) must be at most this
CLIP_CONFIG = ClipConfig(length_s=5.0, stride_s=2.5)
SPEC = SamplingSpec(strategy="uniform", frames_per_clip=8, max_pixels=224 * 224)
FPS = 15
SIZE = 224
SPOT_CHECKS_PER_SESSION = 4


@dataclass
class Timing:
    """Runs of one method: wall seconds (and CPU seconds of this process, where meaningful) per run."""

    name: str
    counts: list[int] = field(default_factory=list)  # clips produced by each run
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def clips(self) -> int:
        return self.counts[-1]

    @property
    def best_s(self) -> float:
        return min(self.wall_s)

    def clips_per_s(self, scale: float = 1.0) -> float:
        return self.clips / self.best_s * scale


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and every live descendant (Ray's daemons, workers and
    their decoder processes): a load-independent measure of what a pipeline run costs."""
    return sum(cpu for _, cpu in tree_cpu_by_pid().values())


def tree_cpu_by_pid() -> dict[int, tuple[str, float]]:
    """``{pid: (kind, CPU seconds so far)}`` for this process and its live descendants; kind is ``driver`` (this
    process), ``decoder`` (decoder processes), ``ray_worker`` (Ray worker processes) or ``ray_system`` (the rest)."""
    import psutil

    me = psutil.Process()
    found = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            command = " ".join(process.cmdline())
        except psutil.Error:  # exited meanwhile
            continue
        if process.pid == me.pid:
            kind = "driver"
        elif "_serve_decoding" in command:
            kind = "decoder"
        elif command.startswith("ray::") or "default_worker.py" in command:
            kind = "ray_worker"
        else:
            kind = "ray_system"
        found[process.pid] = (kind, times.user + times.system)
    return found


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per process kind between two :func:`tree_cpu_by_pid` snapshots."""
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        spent[kind] = spent.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return {kind: round(cpu, 3) for kind, cpu in sorted(spent.items())}


# --- data -----------------------------------------------------------------------------------------------------------


def synthetic_sessions(workdir: Path, sessions: int, minutes: float) -> tuple[Path, list[SessionSource]]:
    """Generate the sessions once; a rerun with the same parameters reuses them (a marker file says they are whole)."""
    config = GeneratorConfig(
        subjects=sessions, sessions_per_subject=1, session_duration_s=minutes * 60.0, fps=FPS, width=SIZE, height=SIZE
    )
    root = workdir / f"sessions-n{sessions}-m{minutes:g}-{SIZE}x{SIZE}-{FPS}fps-seed{config.seed}"
    marker = root / "complete.json"
    if marker.exists():
        print(f"data: reusing {sessions} session(s) in {root}", flush=True)
        return root, discover_sessions(root)
    if root.exists():
        shutil.rmtree(root)
    print(f"data: generating {sessions} session(s) of {minutes:g} min in {root} ...", flush=True)
    started = time.perf_counter()
    sources = generate_dataset(root, config)
    marker.write_text(json.dumps({"sessions": sessions, "minutes": minutes, "size": SIZE, "fps": FPS}))
    print(f"data: generated in {time.perf_counter() - started:.1f} s", flush=True)
    return root, sources


def spot_check_ids(plan: SessionPlan) -> list[str]:
    """A few clips per session: first, last and evenly spaced ones in between."""
    ids = []
    for job in plan.jobs:
        clips = job["clips"]
        picks = np.unique(np.linspace(0, len(clips) - 1, SPOT_CHECKS_PER_SESSION).round().astype(int))
        ids += [clips[i]["clip_id"] for i in picks]
    return ids


# --- (b) seed-style loop --------------------------------------------------------------------------------------------


def run_seed_loop(plan: SessionPlan, keep: set[str]) -> tuple[int, float, float, dict[str, np.ndarray]]:
    """Per clip: open the video, seek, read the clip's sampled frames. Same frames as the pipeline picks."""
    import decord

    kept: dict[str, np.ndarray] = {}
    clips = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for job in plan.jobs:
        probe = decord.VideoReader(job["media"], num_threads=1)
        times = probe.get_frame_timestamp(np.arange(len(probe)))[:, 0].astype(np.float64)
        times -= times[0]
        height, width = probe[0].shape[:2]
        target_h, target_w = SPEC.target_size(height, width)
        del probe
        for clip in job["clips"]:
            reader = decord.VideoReader(job["media"], width=target_w, height=target_h, num_threads=1)
            first = int(np.searchsorted(times, clip["start_s"] - 1e-6, side="left"))
            stop = int(np.searchsorted(times, clip["end_s"] - 1e-6, side="left"))
            covered = np.arange(first, stop)
            indices = covered[uniform_indices(len(covered), SPEC.frames_per_clip)]
            frames = reader.get_batch(indices.tolist()).asnumpy()
            del reader
            clips += 1
            if clip["clip_id"] in keep:
                kept[clip["clip_id"]] = frames
    return clips, time.perf_counter() - wall, time.process_time() - cpu, kept


# --- (c) decode once, one process -----------------------------------------------------------------------------------


def run_decode_once(plan: SessionPlan, keep: set[str]) -> tuple[int, int, float, float, dict[str, np.ndarray]]:
    """Every needed frame of every session decoded once, in this process."""
    kept: dict[str, np.ndarray] = {}
    clips = rejected = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for job in plan.jobs:
        windows = [ClipWindow(c["clip_id"], c["start_s"], c["end_s"]) for c in job["clips"]]
        for item in iter_session_clips(job["media"], job["media_kind"], windows, SPEC, job["origin_offset_s"]):
            if isinstance(item, ClipFrames):
                clips += 1
                if item.clip_id in keep:
                    kept[item.clip_id] = item.frames
            else:
                rejected += 1
    return clips, rejected, time.perf_counter() - wall, time.process_time() - cpu, kept


# --- (a) Ray Data pipeline ------------------------------------------------------------------------------------------


def run_pipeline(root: Path, sources: list[SessionSource], out: Path) -> tuple[dict, float, float, dict]:
    if out.exists():
        shutil.rmtree(out)
    config = PrepareConfig(source=str(root), out=str(out), clips=CLIP_CONFIG, sampling=SPEC)
    started, cpu = time.perf_counter(), tree_cpu_by_pid()
    summary = prepare(config, sources)
    wall, spent = time.perf_counter() - started, cpu_by_kind(cpu, tree_cpu_by_pid())
    return summary, wall, sum(spent.values()), spent


def read_back(out: Path, clip_ids: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(out / "clips"), format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["clip_id", "frames", "frame_shape"], filter=pc.field("clip_id").isin(clip_ids))
    return {
        row["clip_id"]: np.frombuffer(row["frames"], dtype=np.uint8).reshape(tuple(row["frame_shape"]))
        for row in table.to_pylist()
    }


# --- main -----------------------------------------------------------------------------------------------------------


def same_frames(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> bool:
    return set(reference) == set(other) and all(np.array_equal(reference[k], other[k]) for k in reference)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2, help="synthetic sessions (default 2)")
    parser.add_argument("--minutes", type=float, default=10.0, help="minimum length of each session (default 10)")
    parser.add_argument("--workdir", default="outputs/bench_data", help="cache of sessions and Parquet output")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance, and of the ideal bound")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 session of 2 minutes, 1 run each: smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.minutes, args.repeats = 1, 2.0, 1
    if args.sessions < 1 or args.minutes <= 0 or args.cpus < 1 or args.repeats < 1:
        parser.error("--sessions, --minutes, --cpus and --repeats must be positive")

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = load_avg()
    print(f"load average (1 min) at start: {load_start} on {os.cpu_count()} cores", flush=True)
    root, sources = synthetic_sessions(workdir, args.sessions, args.minutes)
    plan = plan_sessions(sources, CLIP_CONFIG, {s.subject: "train" for s in sources})
    total = plan.clips_total
    session_minutes = [round(max(c["end_s"] for c in job["clips"]) / 60.0, 2) for job in plan.jobs]
    check_ids = spot_check_ids(plan)
    print(f"clips: {total} over {len(plan.jobs)} session(s) of {session_minutes} min", flush=True)

    ray_start_s = start_ray(args.cpus)
    print(f"Ray started with {args.cpus} CPUs in {ray_start_s:.1f} s", flush=True)
    seed, once = Timing("seed loop (1 proc)"), Timing("decode once (1 proc)")
    cold, warm = Timing("pipeline cold"), Timing(f"pipeline ({args.cpus} CPUs)")
    out = workdir / "prepared"
    keep = set(check_ids)
    pipeline_frames: list[dict[str, np.ndarray]] = []
    seed_frames: dict[str, np.ndarray] = {}
    once_frames: dict[str, np.ndarray] = {}
    pipeline_rejected = once_rejected = 0
    pipeline_cpu_kinds: list[dict[str, float]] = []

    def record(timing: Timing, label: str, clips: int, wall: float, cpu: float) -> None:
        timing.counts.append(clips)
        timing.wall_s.append(wall)
        timing.cpu_s.append(cpu)
        print(f"{label}: {clips} clips in {wall:.2f} s (cpu {cpu:.2f} s), load {load_avg()}", flush=True)

    # The first prepare after Ray starts also starts its workers and their decoder processes: reported apart.
    summary, wall, cpu, _ = run_pipeline(root, sources, out)
    record(cold, "(a) pipeline cold", summary["clips_written"], wall, cpu)
    pipeline_rejected = summary["clips_rejected"] + summary["clips_unaccounted"]
    pipeline_frames.append(read_back(out, check_ids))
    # Then the three in turn, so that changes in the machine's load hit each of them alike; the best run counts.
    for run in range(1, args.repeats + 1):
        clips, once_rejected, wall, cpu, once_frames = run_decode_once(plan, keep)
        record(once, f"(c) decode once  run {run}", clips, wall, cpu)
        summary, wall, cpu, spent = run_pipeline(root, sources, out)
        record(warm, f"(a) pipeline     run {run}", summary["clips_written"], wall, cpu)
        print(f"    CPU seconds by process kind: {spent}", flush=True)
        pipeline_cpu_kinds.append(spent)
        pipeline_rejected = max(pipeline_rejected, summary["clips_rejected"] + summary["clips_unaccounted"])
        pipeline_frames.append(read_back(out, check_ids))
        clips, wall, cpu, seed_frames = run_seed_loop(plan, keep)
        record(seed, f"(b) seed loop    run {run}", clips, wall, cpu)
    shutil.rmtree(out, ignore_errors=True)
    load_end = load_avg()

    pipeline_rate = warm.clips_per_s()
    seed_rate = seed.clips_per_s()
    once_rate = once.clips_per_s()
    ideal_rate = once.clips_per_s(scale=args.cpus)
    counts = {n for timing in (seed, once, cold, warm) for n in timing.counts}
    counts_agree = counts == {total} and once_rejected == 0 and pipeline_rejected == 0
    pipeline_matches = len(once_frames) == len(check_ids) and all(same_frames(once_frames, f) for f in pipeline_frames)
    seed_matches = same_frames(once_frames, seed_frames)
    ratio = pipeline_rate / seed_rate if seed_rate else 0.0
    ratio_to_ideal = ideal_rate / pipeline_rate if pipeline_rate else float("inf")
    consistent = counts_agree and pipeline_matches and seed_matches
    meets = consistent and ratio >= TARGET_VS_SEED and ratio_to_ideal <= TARGET_TO_IDEAL

    print()
    print(f"{'method':<28} {'clips':>6} {'best s':>8} {'clips/s':>9} {'cpu s':>7}   wall s of each run")
    for timing, rate, note in (
        (seed, seed_rate, ""),
        (once, once_rate, ""),
        (once, ideal_rate, f"   (decode once x {args.cpus} CPUs)"),
        (cold, cold.clips_per_s(), ""),
        (warm, pipeline_rate, ""),
    ):
        name = f"ideal ({args.cpus} CPUs)" if note else timing.name
        runs = " ".join(f"{s:.2f}" for s in timing.wall_s)
        cpu = f"{min(timing.cpu_s):7.2f}" if timing.cpu_s and not note else f"{'':7}"
        print(f"{name:<28} {timing.clips:>6} {timing.best_s:>8.2f} {rate:>9.1f} {cpu}   {runs}{note}")
    print(f"pipeline / seed loop = {ratio:.2f}x (target >= {TARGET_VS_SEED:g}x)")
    print(f"ideal / pipeline     = {ratio_to_ideal:.2f}x (target <= {TARGET_TO_IDEAL:g}x)")
    print(
        f"CPU seconds, pipeline (all its processes) / decode once = {min(warm.cpu_s) / min(once.cpu_s):.2f}x "
        "(load-independent: wall-time ratios need an otherwise idle machine)"
    )
    print(
        f"clip counts agree: {counts_agree}; spot-checked frames equal (pipeline, seed loop vs decode once): "
        f"{pipeline_matches}, {seed_matches} ({len(check_ids)} clips)"
    )
    print(f"load average (1 min): {load_start} at start, {load_end} at end, on {os.cpu_count()} cores")

    result = {
        "benchmark": "data_pipeline",
        "sessions": len(plan.jobs),
        "session_minutes": session_minutes,
        "clips": total,
        "frames_per_clip": SPEC.frames_per_clip,
        "frame_size": list(SPEC.target_size(SIZE, SIZE)),
        "fps": FPS,
        "cpus": args.cpus,
        "repeats": args.repeats,
        "pipeline_clips_per_s": round(pipeline_rate, 2),
        "pipeline_cold_clips_per_s": round(cold.clips_per_s(), 2),
        "seed_loop_clips_per_s": round(seed_rate, 2),
        "decode_once_1proc_clips_per_s": round(once_rate, 2),
        "ideal_clips_per_s": round(ideal_rate, 2),
        "wall_s": {t.name: [round(s, 3) for s in t.wall_s] for t in (seed, once, cold, warm)},
        "cpu_s": {t.name: [round(s, 3) for s in t.cpu_s] for t in (seed, once, cold, warm)},
        "cpu_ratio_to_ideal": round(min(warm.cpu_s) / min(once.cpu_s), 3),
        "pipeline_cpu_s_by_kind": pipeline_cpu_kinds[warm.cpu_s.index(min(warm.cpu_s))],
        "ray_start_s": round(ray_start_s, 2),
        "load_avg_1m": [load_start, load_end],
        "cores": os.cpu_count(),
        "consistent": consistent,
        "ratio": round(ratio, 3),
        "target": TARGET_VS_SEED,
        "ratio_to_ideal": round(ratio_to_ideal, 3),
        "target_to_ideal": TARGET_TO_IDEAL,
        "meets_target": meets,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
