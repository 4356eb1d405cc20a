"""Ray Data pipeline: sessions -> labelled clips -> decoded, sampled, resized frames -> Parquet shards.

Each session's clips are cut into tasks of consecutive clips (:func:`plan_tasks`); one Ray task decodes its stretch
of the media once (in a decoder process with a deadline, see ``opsvlm.video.decode``) and emits one row per clip.
Clips that cannot be produced stay in the output as rows with ``status = "rejected"`` and a reason, so nothing
disappears: the written dataset is partitioned by ``split`` (``train`` / ``val`` / ``test`` / ``rejected``) and the
run summary counts every clip.

The same :func:`clip_dataset` feeds training directly (no shards) when a job prefers streaming.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opsvlm.config import to_dict
from opsvlm.tasks.operations import OperationsTask
from opsvlm.tasks.operations.data.clips import ClipConfig, ClipRecord, make_clips, split_subjects
from opsvlm.tasks.operations.data.openpack import (
    AnnotationError,
    SessionSource,
    discover_sessions,
    frame_time_from_name,
    list_frames,
    read_operations_csv,
)
from opsvlm.video.decode import ClipFrames, ClipRejection, ClipWindow, decode_session_views
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "BATCH_BYTES",
    "CLIP_SCHEMA",
    "MANIFEST_FORMAT",
    "REJECTED",
    "ROWS_PER_BATCH",
    "SHARD_SCHEMA",
    "PrepareConfig",
    "SessionPlan",
    "clip_dataset",
    "decode_tasks",
    "frames_of",
    "plan_sessions",
    "plan_tasks",
    "prepare",
    "write_task_shards",
]

MANIFEST_FORMAT = "opsvlm-clips/1"
REJECTED = "rejected"


@dataclass(frozen=True)
class PrepareConfig:
    """Configuration of ``jobs/prepare_data.py``.

    Attributes:
        source: Dataset root in the OpenPack layout.
        out: Output folder for shards, manifest and summary.
        clips: Clip window length and stride.
        sampling: Frame sampling spec (travels with the data and later with the model).
        split_fractions: Shares of subjects in (train, val, test).
        split_seed: Seed of the subject shuffle.
        decode_deadline_s: Longest wait for the next decoded clip of a session before the decoder is killed.
        decode_num_cpus: CPUs reserved per decoding task (fractions let more tasks decode at once).
        clips_per_task: Most clips one decoding task cuts (a session is split into tasks of about this many
            consecutive clips, each decoding its stretch of the media once): more tasks keep all CPUs busy.
    """

    source: str = ""
    out: str = ""
    clips: ClipConfig = field(default_factory=ClipConfig)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    decode_deadline_s: float = 120.0
    decode_num_cpus: float = 1.0
    clips_per_task: int = 256

    def __post_init__(self) -> None:
        if self.decode_deadline_s <= 0:
            raise ValueError(f"decode_deadline_s must be > 0, got {self.decode_deadline_s}")
        if self.decode_num_cpus <= 0:
            raise ValueError(f"decode_num_cpus must be > 0, got {self.decode_num_cpus}")
        if self.clips_per_task < 1:
            raise ValueError(f"clips_per_task must be >= 1, got {self.clips_per_task}")


@dataclass
class SessionPlan:
    """The clips of every readable session, and the sessions whose annotation could not be read."""

    jobs: list[dict]
    rejected_sessions: list[dict]

    @property
    def clips_total(self) -> int:
        return sum(len(job["clips"]) for job in self.jobs)


def _frames_origin_offset(source: SessionSource, timeline) -> float:
    frames = list_frames(source.media)
    return timeline.seconds_since_origin(frame_time_from_name(frames[0])) if frames else 0.0


def _clip_dict(clip: ClipRecord) -> dict:
    """``clip.to_dict()`` without ``dataclasses.asdict``'s recursive deep copy (10x faster; ~40% of planning)."""
    row = {name: getattr(clip, name) for name in _CLIP_FIELDS}
    row["temporal_segment"] = list(clip.temporal_segment)
    return row


_CLIP_FIELDS = tuple(f.name for f in fields(ClipRecord))


def plan_sessions(
    sources: list[SessionSource], clip_config: ClipConfig, split_of_subject: dict[str, str]
) -> SessionPlan:
    """Read every session's annotation and cut it into labelled clips (no media is touched here).

    Args:
        sources: Sessions from :func:`opsvlm.tasks.operations.data.openpack.discover_sessions`.
        clip_config: Window length and stride.
        split_of_subject: ``{subject: split}``.

    Returns:
        One job per readable session (its clips as dicts, media location and split) and the unreadable sessions
        with the error naming file and line.
    """
    jobs, rejected = [], []
    for source in sources:
        try:
            timeline = read_operations_csv(source.annotation)
        except (AnnotationError, OSError, UnicodeDecodeError) as exc:
            rejected.append(
                {"subject": source.subject, "session": source.session, "reason": "bad_annotation", "detail": str(exc)}
            )
            continue
        clips = make_clips(timeline, clip_config, source.media or "", source.media_kind)
        offset = _frames_origin_offset(source, timeline) if source.media_kind == "frames" else 0.0
        jobs.append(
            {
                "subject": source.subject,
                "session": source.session,
                "media": source.media or "",
                "media_kind": source.media_kind,
                "origin_offset_s": offset,
                "split": split_of_subject[source.subject],
                "clips": [_clip_dict(clip) for clip in clips],
            }
        )
    return SessionPlan(jobs, rejected)


# Explicit so that a block of only rejected clips (empty lists) has the same schema as any other block.
CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("media_kind", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("dominant_operation", pa.string()),
        ("temporal_segment", pa.list_(pa.float64())),
        ("next_operation", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("frames", pa.binary()),
        ("frame_shape", pa.list_(pa.int32())),
        ("frame_times_s", pa.list_(pa.float64())),
        ("source_fps", pa.float64()),
    ]
)
# Shards are partitioned by split (hive layout: ``split=<name>/``), so the files themselves do not hold the column.
SHARD_SCHEMA = pa.schema([f for f in CLIP_SCHEMA if f.name != "split"])
_RECORD_COLUMNS = [f.name for f in CLIP_SCHEMA][:10]  # the ClipRecord fields, first in the schema
ROWS_PER_BATCH = 32  # clips per block / row group: ~40 MB of 8x224x224x3 frames, bounded memory per task
BATCH_BYTES = 64 << 20  # ... and never more frame bytes than this per block (large frames: fewer rows)
# Frames are raw pixels: compression, dictionaries and min/max statistics cost ~1/3 of the decoding time on them and
# buy nothing (incompressible, never repeated, never filtered on). The small columns keep Parquet's defaults.
_SHARD_WRITE_OPTIONS = {
    "compression": {name: ("none" if name == "frames" else "snappy") for name in SHARD_SCHEMA.names},
    "use_dictionary": [name for name in SHARD_SCHEMA.names if name != "frames"],
    "write_statistics": [name for name in SHARD_SCHEMA.names if name != "frames"],
}


def plan_tasks(plan: SessionPlan, clips_per_task: int) -> list[dict]:
    """Cut every session's clips into decoding tasks of at most ``clips_per_task`` consecutive clips.

    A task decodes one contiguous stretch of its session once (see :func:`opsvlm.video.decode.iter_session_clips`);
    neighbouring tasks of a session re-decode only the overlap of one clip window plus the seek back to a keyframe.
    Many tasks per session keep every CPU busy to the end and bound what one task holds.

    Returns:
        Task dicts: the session job's fields, ``part`` (index within the session) and ``clips`` (a slice of the job's
        clips in time order). Sessions without clips give no task.
    """
    if clips_per_task < 1:
        raise ValueError(f"clips_per_task must be >= 1, got {clips_per_task}")
    tasks = []
    for job in plan.jobs:
        clips = sorted(job["clips"], key=lambda c: (c["start_s"], c["end_s"]))
        parts = -(-len(clips) // clips_per_task)
        bounds = np.linspace(0, len(clips), parts + 1).round().astype(int)  # equal parts, not a short last one
        for part in range(parts):
            tasks.append({**job, "part": part, "clips": clips[bounds[part] : bounds[part + 1]]})
    return tasks


class _ClipBlocks:
    """Assembles clip rows column by column into Arrow tables of at most ``ROWS_PER_BATCH`` rows.

    Decoded pixels are copied once, straight into one contiguous buffer that becomes the ``frames`` column's data
    (zero-copy); rejected clips collect separately (they go to the ``rejected`` partition). With ``reuse`` the
    buffer is recycled for the next table, which is only safe when each table is consumed (written) before the next
    is requested; otherwise every table owns its memory.
    """

    def __init__(self, task: dict, reuse: bool):
        self.task = task
        self.reuse = reuse
        self.clips = {clip["clip_id"]: clip for clip in task["clips"]}
        self.buffer: np.ndarray | None = None
        self._reset()
        self.rejected: list[tuple[dict, str, str]] = []

    def _reset(self) -> None:
        self.rows: list[dict] = []
        self.offsets = [0]
        self.shapes: list[tuple[int, ...]] = []
        self.times: list[np.ndarray] = []
        self.fps: list[float] = []

    def full_for(self, result: ClipFrames | ClipRejection) -> bool:
        """Whether the gathered decoded clips must be flushed before ``result`` can be added."""
        if not self.rows or isinstance(result, ClipRejection):
            return False
        return len(self.rows) == ROWS_PER_BATCH or self.offsets[-1] + result.frames.nbytes > len(self.buffer)

    def add(self, result: ClipFrames | ClipRejection) -> None:
        """Take one decoder result (after :meth:`flush` if :meth:`full_for` says so); its pixels are copied."""
        clip = self.clips[result.clip_id]
        if isinstance(result, ClipRejection):
            self.rejected.append((clip, result.reason, result.detail))
            return
        size = result.frames.nbytes
        if self.buffer is None or self.offsets[-1] + size > len(self.buffer):
            self.buffer = np.empty(max(size, min(ROWS_PER_BATCH * size, BATCH_BYTES)), dtype=np.uint8)
        start = self.offsets[-1]
        self.buffer[start : start + size].reshape(result.frames.shape)[...] = result.frames
        self.offsets.append(start + size)
        self.rows.append(clip)
        self.shapes.append(result.frames.shape)
        self.times.append(np.asarray(result.frame_times_s, dtype=np.float64))
        self.fps.append(float(result.source_fps))

    def flush(self) -> pa.Table | None:
        """The decoded clips gathered so far as a table (``None`` if there are none)."""
        if not self.rows:
            return None
        n = len(self.rows)
        offsets = np.asarray(self.offsets, dtype=np.int32)  # < 2 GiB per table: BATCH_BYTES bounds it
        frames = pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(self.buffer[: offsets[-1]])]
        )
        columns = _record_columns(self.rows)
        columns.update(
            split=pa.array([self.task["split"]] * n, pa.string()),
            status=pa.array(["ok"] * n, pa.string()),
            reason=pa.array([""] * n, pa.string()),
            detail=pa.array([""] * n, pa.string()),
            frames=frames,
            frame_shape=_list_array([np.asarray(s, np.int32) for s in self.shapes], pa.int32()),
            frame_times_s=_list_array(self.times, pa.float64()),
            source_fps=pa.array(self.fps, pa.float64()),
        )
        if not self.reuse:
            self.buffer = None
        self._reset()
        return pa.table(columns, schema=CLIP_SCHEMA)

    def flush_rejected(self) -> pa.Table | None:
        """The rejected clips as a table with ``split = "rejected"`` (``None`` if there are none)."""
        if not self.rejected:
            return None
        rows = [clip for clip, _, _ in self.rejected]
        n = len(rows)
        columns = _record_columns(rows)
        columns.update(
            split=pa.array([REJECTED] * n, pa.string()),
            status=pa.array(["rejected"] * n, pa.string()),
            reason=pa.array([reason for _, reason, _ in self.rejected], pa.string()),
            detail=pa.array([detail for _, _, detail in self.rejected], pa.string()),
            frames=pa.array([b""] * n, pa.binary()),
            frame_shape=pa.array([[]] * n, pa.list_(pa.int32())),
            frame_times_s=pa.array([[]] * n, pa.list_(pa.float64())),
            source_fps=pa.array([0.0] * n, pa.float64()),
        )
        self.rejected = []
        return pa.table(columns, schema=CLIP_SCHEMA)


def _record_columns(rows: list[dict]) -> dict[str, pa.Array]:
    return {name: pa.array([row[name] for row in rows], CLIP_SCHEMA.field(name).type) for name in _RECORD_COLUMNS}


def _list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values) if values else np.empty(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type))


def _task_clips(task: dict, spec: SamplingSpec, deadline_s: float, reuse: bool) -> Iterator[pa.Table]:
    """Decode one task's clips (decoder process with a deadline) and yield them as tables: decoded clips in tables
    of up to ``ROWS_PER_BATCH`` rows, then the rejected clips in one table. Every clip of the task appears once."""
    windows = [ClipWindow(c["clip_id"], c["start_s"], c["end_s"]) for c in task["clips"]]
    blocks = _ClipBlocks(task, reuse)
    results = decode_session_views(
        task["media"], task["media_kind"], windows, spec, deadline_s, task["origin_offset_s"]
    )
    for result in results:
        if blocks.full_for(result):
            yield blocks.flush()  # written before the buffer is refilled: we resume only after it was consumed
        blocks.add(result)
    for table in (blocks.flush(), blocks.flush_rejected()):
        if table is not None:
            yield table


def _task_rows(batch: pa.Table) -> list[dict]:
    return [json.loads(task) for task in batch.column("task").to_pylist()]


def decode_tasks(batch: pa.Table, spec: SamplingSpec, deadline_s: float) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: task rows in (see :func:`plan_tasks`), clip rows out (``CLIP_SCHEMA``)."""
    for task in _task_rows(batch):
        yield from _task_clips(task, spec, deadline_s, reuse=False)


def write_task_shards(batch: pa.Table, spec: SamplingSpec, deadline_s: float, shards: str) -> pa.Table:
    """Ray Data ``map_batches`` function: decode each task and write its clips as Parquet shards, one file per split
    it has clips in (``<shards>/split=<split>/<subject>_<session>_<part>.parquet``), streaming one row group per
    block. Returns one small row per file written: ``file``, ``split``, ``rows``.

    The shards are written here rather than by ``Dataset.write_parquet``: that writer gathers a task's blocks in
    memory before writing and spends most of its time compressing pixels; here each block is written as soon as it
    is full and its buffer is reused for the next. File names are deterministic, so a retried task overwrites its
    own files; each file appears under its name only once complete.
    """
    written = []
    for task in _task_rows(batch):
        writers: dict[str, tuple[pq.ParquetWriter, Path, Path]] = {}
        rows: Counter = Counter()
        try:
            for table in _task_clips(task, spec, deadline_s, reuse=True):
                split = table.column("split")[0].as_py()
                if split not in writers:
                    path = (
                        Path(shards)
                        / f"split={split}"
                        / f"{task['subject']}_{task['session']}_{task['part']:04d}.parquet"
                    )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    partial = path.with_name(path.name + ".partial")
                    writers[split] = (pq.ParquetWriter(partial, SHARD_SCHEMA, **_SHARD_WRITE_OPTIONS), partial, path)
                writers[split][0].write_table(table.drop_columns(["split"]), row_group_size=table.num_rows)
                rows[split] += table.num_rows
        finally:
            for writer, _, _ in writers.values():
                writer.close()
        for split, (_, partial, path) in writers.items():
            partial.replace(path)
            written.append({"file": str(path), "split": split, "rows": rows[split]})
    return pa.Table.from_pylist(written, schema=_WRITTEN_SCHEMA)


_WRITTEN_SCHEMA = pa.schema([("file", pa.string()), ("split", pa.string()), ("rows", pa.int64())])


def _task_dataset(tasks: list[dict]):
    import ray.data

    # One block per task, so that every task is its own Ray task. Tasks travel as JSON: Arrow would infer (and
    # could mis-infer) types for the nested clip dicts.
    return ray.data.from_items([{"task": json.dumps(task)} for task in tasks], override_num_blocks=max(1, len(tasks)))


def clip_dataset(
    plan: SessionPlan,
    spec: SamplingSpec,
    deadline_s: float = 120.0,
    num_cpus: float = 1.0,
    clips_per_task: int = 256,
):
    """A Ray Dataset with one row per clip of every planned session (decoded lazily, in parallel).

    Columns: see ``CLIP_SCHEMA``: the :class:`~tasks.operations.data.clips.ClipRecord` fields, ``split``, ``status``
    (``ok`` / ``rejected``), ``reason``, ``detail``, ``frames`` (raw bytes of uint8[K, H, W, 3]), ``frame_shape``,
    ``frame_times_s`` (clip-relative seconds) and ``source_fps``.
    """
    tasks = plan_tasks(plan, clips_per_task)
    # Plain tasks (not an actor pool) so decoding fuses with what consumes it and never holds CPUs others need.
    return _task_dataset(tasks).map_batches(
        decode_tasks,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"spec": spec, "deadline_s": deadline_s},
        num_cpus=num_cpus,
    )


def frames_of(row: dict) -> np.ndarray:
    """The frames of a clip row as uint8[K, H, W, 3]."""
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(tuple(row["frame_shape"]))


def prepare(config: PrepareConfig, sources: list[SessionSource] | None = None) -> dict:
    """Prepare clips from ``config.source`` into ``config.out``: shards by split, manifest and summary.

    Args:
        config: The prepare configuration.
        sources: Sessions to use instead of discovering them under ``config.source``.

    Returns:
        The run summary (also written to ``<out>/summary.json``).
    """
    started = time.time()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = sources if sources is not None else discover_sessions(config.source)
    split_of_subject = split_subjects([s.subject for s in sources], config.split_fractions, config.split_seed)
    plan = plan_sessions(sources, config.clips, split_of_subject)
    print(
        f"prepare: {len(sources)} sessions, {plan.clips_total} clips planned, "
        f"{len(plan.rejected_sessions)} sessions with unreadable annotations",
        flush=True,
    )

    shards = out / "clips"
    stale = sorted(shards.glob("split=*/*.parquet*")) if shards.exists() else []
    if stale:  # shards of an earlier run into the same folder would be counted (and read) with this run's
        print(f"prepare: replacing {len(stale)} shard file(s) of an earlier run in {shards}", flush=True)
        for path in stale:
            path.unlink()
    tasks = plan_tasks(plan, config.clips_per_task)
    if tasks:
        _task_dataset(tasks).map_batches(
            write_task_shards,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"spec": config.sampling, "deadline_s": config.decode_deadline_s, "shards": str(shards)},
            num_cpus=config.decode_num_cpus,
        ).materialize()

    counts = _count_rows(shards)
    summary = _summarize(config, plan, counts, split_of_subject, time.time() - started)
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": OperationsTask.name,  # clips of OpenPack-layout sessions are the operations task's data
        "source": str(config.source),
        "config": to_dict(config),
        "sampling_spec": to_dict(config.sampling),
        "splits": {
            split: {
                "files": sorted(str(p.relative_to(out)) for p in (shards / f"split={split}").glob("*.parquet")),
                "clips": counts.get(split, {}).get("rows", 0),
                "subjects": sorted(s for s, sp in split_of_subject.items() if sp == split),
            }
            for split in ("train", "val", "test", REJECTED)
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _count_rows(shards: Path) -> dict[str, dict]:
    """Rows per split partition, and rejection reasons, read back from the written files (not from memory)."""
    counts: dict[str, dict] = {}
    for part in sorted(shards.glob("split=*")) if shards.exists() else []:
        split = part.name.split("=", 1)[1]
        files = sorted(part.glob("*.parquet"))
        entry = {"rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
        if split == REJECTED and files:
            table = (
                pq.read_table(files, columns=["reason"])
                if len(files) == 1
                else pq.ParquetDataset(files).read(columns=["reason"])
            )
            entry["reasons"] = dict(Counter(table.column("reason").to_pylist()))
        counts[split] = entry
    return counts


def _summarize(config: PrepareConfig, plan: SessionPlan, counts: dict, split_of_subject: dict, elapsed: float) -> dict:
    written = sum(v["rows"] for k, v in counts.items() if k != REJECTED)
    rejected = counts.get(REJECTED, {}).get("rows", 0)
    summary = {
        "clips_total": plan.clips_total,
        "clips_written": written,
        "clips_rejected": rejected,
        "clips_unaccounted": plan.clips_total - written - rejected,
        "rejected_reasons": counts.get(REJECTED, {}).get("reasons", {}),
        "clips_by_split": {k: v["rows"] for k, v in counts.items() if k != REJECTED},
        "sessions_total": len(plan.jobs) + len(plan.rejected_sessions),
        "sessions_rejected": len(plan.rejected_sessions),
        "rejected_sessions": plan.rejected_sessions,
        "subjects_by_split": {
            split: sorted(s for s, sp in split_of_subject.items() if sp == split) for split in ("train", "val", "test")
        },
        "elapsed_s": round(elapsed, 3),
        "clips_per_s": round((written + rejected) / elapsed, 3) if elapsed > 0 else 0.0,
        "out": str(config.out),
    }
    if summary["clips_unaccounted"]:
        # Should never happen (every clip yields exactly one row); say so loudly rather than hide it.
        print(f"prepare: WARNING {summary['clips_unaccounted']} clips are unaccounted for", flush=True)
    return summary
