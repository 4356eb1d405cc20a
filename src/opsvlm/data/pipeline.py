"""Ray Data pipeline: sessions -> labelled clips -> decoded, sampled, resized frames -> Parquet shards.

One Ray task per session decodes its media once (in a decoder process with a deadline, see
``opsvlm.video.decode``) and emits one row per clip. Clips that cannot be produced stay in the output as rows with
``status = "rejected"`` and a reason, so nothing disappears: the written dataset is partitioned by ``split``
(``train`` / ``val`` / ``test`` / ``rejected``) and the run summary counts every clip.

The same :func:`clip_dataset` feeds training directly (no shards) when a job prefers streaming.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opsvlm.config import to_dict
from opsvlm.data.clips import ClipConfig, make_clips, split_subjects
from opsvlm.data.openpack import (
    AnnotationError,
    SessionSource,
    discover_sessions,
    frame_time_from_name,
    list_frames,
    read_operations_csv,
)
from opsvlm.video.decode import ClipFrames, ClipWindow, decode_session_with_deadline
from opsvlm.video.sampling import SamplingSpec

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
        decode_num_cpus: CPUs reserved per decoding task (fractions let more sessions decode at once).
    """

    source: str = ""
    out: str = ""
    clips: ClipConfig = field(default_factory=ClipConfig)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    decode_deadline_s: float = 120.0
    decode_num_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.decode_deadline_s <= 0:
            raise ValueError(f"decode_deadline_s must be > 0, got {self.decode_deadline_s}")
        if self.decode_num_cpus <= 0:
            raise ValueError(f"decode_num_cpus must be > 0, got {self.decode_num_cpus}")


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


def plan_sessions(
    sources: list[SessionSource], clip_config: ClipConfig, split_of_subject: dict[str, str]
) -> SessionPlan:
    """Read every session's annotation and cut it into labelled clips (no media is touched here).

    Args:
        sources: Sessions from :func:`opsvlm.data.openpack.discover_sessions`.
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
                "clips": [clip.to_dict() for clip in clips],
            }
        )
    return SessionPlan(jobs, rejected)


def _clip_row(clip: dict, split: str, result) -> dict:
    row = dict(clip)
    if isinstance(result, ClipFrames):
        row.update(
            split=split,
            status="ok",
            reason="",
            detail="",
            frames=result.frames.tobytes(),
            frame_shape=list(result.frames.shape),
            frame_times_s=[float(t) for t in result.frame_times_s],
            source_fps=float(result.source_fps),
        )
    else:
        row.update(
            split=REJECTED,
            status="rejected",
            reason=result.reason,
            detail=result.detail,
            frames=b"",
            frame_shape=[],
            frame_times_s=[],
            source_fps=0.0,
        )
    return row


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
ROWS_PER_BATCH = 32  # ~40 MB of 8x224x224 frames: bounded memory per decoding task


def decode_sessions(batch: pa.Table, spec: SamplingSpec, deadline_s: float) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: session rows in, clip rows out (decoded or rejected), in small tables."""
    for job in batch.to_pylist():
        clips = {clip["clip_id"]: clip for clip in job["clips"]}
        windows = [ClipWindow(c["clip_id"], c["start_s"], c["end_s"]) for c in job["clips"]]
        results = decode_session_with_deadline(
            job["media"], job["media_kind"], windows, spec, deadline_s, job["origin_offset_s"]
        )
        rows = []
        for result in results:
            rows.append(_clip_row(clips[result.clip_id], job["split"], result))
            if len(rows) == ROWS_PER_BATCH:
                yield pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def clip_dataset(plan: SessionPlan, spec: SamplingSpec, deadline_s: float = 120.0, num_cpus: float = 1.0):
    """A Ray Dataset with one row per clip of every planned session (decoded lazily, in parallel).

    Columns: see ``CLIP_SCHEMA``: the :class:`~opsvlm.data.clips.ClipRecord` fields, ``split``, ``status``
    (``ok`` / ``rejected``), ``reason``, ``detail``, ``frames`` (raw bytes of uint8[K, H, W, 3]), ``frame_shape``,
    ``frame_times_s`` (clip-relative seconds) and ``source_fps``.
    """
    import ray.data

    # One block per session: a session is decoded by exactly one task, front to back, once. Plain tasks (not an
    # actor pool) so decoding fuses with the write and never holds CPUs the writer needs.
    sessions = ray.data.from_items(plan.jobs, override_num_blocks=max(1, len(plan.jobs)))
    return sessions.map_batches(
        decode_sessions,
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
    if plan.jobs:
        dataset = clip_dataset(plan, config.sampling, config.decode_deadline_s, config.decode_num_cpus)
        dataset.write_parquet(str(shards), partition_cols=["split"])

    counts = _count_rows(shards)
    summary = _summarize(config, plan, counts, split_of_subject, time.time() - started)
    manifest = {
        "format": MANIFEST_FORMAT,
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
