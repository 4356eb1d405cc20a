"""Decode session media once and cut it into sampled, resized clip frames.

Media is a video file (decoded with decord) or a folder of OpenPack JPEG frames (decoded with Pillow). A session's
clips overlap, so the video is read once, front to back, and each clip is emitted as soon as its frames have been
decoded; only the frames still needed by pending clips are kept in memory.

decord can hang on some files, so :func:`decode_session_with_deadline` runs the decoding in a child process and
gives up on it when no result arrives within the deadline; every clip it could not deliver is reported as rejected
with the reason. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from opsvlm.video.frames import frame_time_from_name, list_frames
from opsvlm.video.sampling import SamplingSpec, frame_motion, motion_indices, to_gray, uniform_indices

__all__ = [
    "DECODE_CHUNK",
    "RING_BYTES",
    "ClipFrames",
    "ClipRejection",
    "ClipWindow",
    "DecodeError",
    "decode_session_views",
    "decode_session_with_deadline",
    "iter_session_clips",
    "open_media",
    "sample_frames",
]

_F_SETPIPE_SZ = 1031  # Linux fcntl command, not exported by the fcntl module on Python 3.11
DECODE_CHUNK = 32  # frames per decord call: large enough to amortize the call, small enough to bound memory


class DecodeError(RuntimeError):
    """Media that cannot be decoded. ``reason`` is a short machine-readable code, the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClipWindow:
    """A clip to cut from the media: id and time window in session seconds.

    A video's first frame is at session time 0; JPEG frames sit at their capture time (see ``origin_offset_s``).
    """

    clip_id: str
    start_s: float
    end_s: float


@dataclass
class ClipFrames:
    """The sampled frames of one clip.

    Attributes:
        clip_id: The clip's id.
        frames: uint8[K, H, W, 3] sampled, resized RGB frames.
        frame_times_s: float64[K] timestamps of the frames, seconds from the clip start.
        source_fps: Frame rate of the media (frames per second).
    """

    clip_id: str
    frames: np.ndarray
    frame_times_s: np.ndarray
    source_fps: float


@dataclass(frozen=True)
class ClipRejection:
    """A clip that could not be produced, with a reason code and a message naming the file."""

    clip_id: str
    reason: str
    detail: str


class _MediaReader:
    """Random access to the frames of one piece of media, resized to ``size``."""

    num_frames: int
    frame_times_s: np.ndarray  # float64[T], seconds from the first frame
    height: int  # source size
    width: int

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> np.ndarray:  # uint8[N, h, w, 3]
        raise NotImplementedError

    @property
    def fps(self) -> float:
        if self.num_frames < 2:
            return 0.0
        return float((self.num_frames - 1) / max(self.frame_times_s[-1] - self.frame_times_s[0], 1e-9))


class _VideoReader(_MediaReader):
    def __init__(self, path: str, num_threads: int = 1):
        import decord  # imported here: decord is heavy and only decoding processes need it

        self.path = path
        self._decord = decord
        self._num_threads = num_threads
        if not os.path.exists(path):
            raise DecodeError("missing_file", f"{path}: no such file")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise DecodeError("empty_file", f"{path}: file is empty (0 bytes)")
        try:
            probe = decord.VideoReader(path, num_threads=num_threads)
            self.num_frames = len(probe)
            if self.num_frames == 0:
                raise DecodeError("no_frames", f"{path}: video has no frames")
            self.frame_times_s = probe.get_frame_timestamp(np.arange(self.num_frames))[:, 0].astype(np.float64)
            self.height, self.width = probe[0].shape[:2]
        except DecodeError:
            raise
        except Exception as exc:  # decord raises its own DECORDError and RuntimeError for unreadable input
            raise DecodeError("not_a_video", f"{path}: cannot open as video: {exc}".splitlines()[0]) from None
        self.frame_times_s -= self.frame_times_s[0]
        self._readers: dict[tuple[int, int], object] = {}

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> np.ndarray:
        reader = self._readers.get(size)
        if reader is None:
            height, width = size
            reader = self._decord.VideoReader(self.path, width=width, height=height, num_threads=self._num_threads)
            self._readers[size] = reader
        try:
            return reader.get_batch(list(indices)).asnumpy()
        except Exception as exc:
            raise DecodeError(
                "decode_error",
                f"{self.path}: frames {indices[0]}..{indices[-1]} failed to decode: {exc}".splitlines()[0],
            ) from None


class _JpegFramesReader(_MediaReader):
    """OpenPack RGB layout: one JPEG per frame, named by capture time."""

    def __init__(self, directory: str, origin_offset_s: float):
        self.paths = list_frames(directory)
        if not self.paths:
            raise DecodeError("no_frames", f"{directory}: no JPEG frames")
        stamps = [frame_time_from_name(p) for p in self.paths]
        # Media time 0 is the session origin for frames (they are placed by capture time, not by position).
        self.frame_times_s = np.array([(s - stamps[0]).total_seconds() for s in stamps]) + origin_offset_s
        self.num_frames = len(self.paths)
        self.height, self.width = self._load(0).shape[:2]

    def _load(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                return np.asarray(image)
        except Exception as exc:
            raise DecodeError("decode_error", f"{path}: cannot decode JPEG frame: {exc}") from None

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> np.ndarray:
        return np.stack([self._load(i, size) for i in indices])


def open_media(media: str, kind: str, origin_offset_s: float = 0.0, num_threads: int = 1) -> _MediaReader:
    """Open a video file (``kind="video"``) or an OpenPack JPEG frames folder (``kind="frames"``).

    Args:
        media: Path of the video or frames folder.
        kind: ``"video"`` or ``"frames"``.
        origin_offset_s: For frames: session time of the first frame (frames are timed by their names).
        num_threads: decord decoding threads (1 inside parallel pipelines: parallelism comes from processes).

    Raises:
        DecodeError: with a reason code for missing, empty, non-video or unreadable media.
    """
    if kind == "video":
        return _VideoReader(media, num_threads)
    if kind == "frames":
        return _JpegFramesReader(media, origin_offset_s)
    raise DecodeError("no_media", f"{media or '<none>'}: no video file or JPEG frames for this session")


def _clip_plan(
    reader: _MediaReader, clip: ClipWindow, spec: SamplingSpec
) -> tuple[np.ndarray, np.ndarray] | ClipRejection:
    """Which frames a clip covers (int64[T]) and which of them to decode (int64[N], sorted): all of them for motion
    sampling (the scores need every frame), only the sampled ones for uniform sampling."""
    times = reader.frame_times_s
    frame_interval = 1.0 / reader.fps if reader.fps > 0 else 0.0
    media_end = times[-1] + frame_interval
    if clip.end_s > media_end + frame_interval + 1e-6:
        return ClipRejection(
            clip.clip_id,
            "beyond_media_end",
            f"clip ends at {clip.end_s:.3f} s but the media ends at {media_end:.3f} s",
        )
    first = int(np.searchsorted(times, clip.start_s - 1e-6, side="left"))
    stop = int(np.searchsorted(times, clip.end_s - 1e-6, side="left"))
    if stop <= first:
        return ClipRejection(clip.clip_id, "no_frames", f"no frame inside [{clip.start_s:.3f}, {clip.end_s:.3f}] s")
    if clip.start_s < times[0] - frame_interval - 1e-6:
        return ClipRejection(
            clip.clip_id, "before_media_start", f"clip starts at {clip.start_s:.3f} s, the media at {times[0]:.3f} s"
        )
    covered = np.arange(first, stop)
    if spec.strategy == "motion":
        return covered, covered
    return covered, np.unique(covered[uniform_indices(len(covered), spec.frames_per_clip)])


def iter_session_clips(
    media: str,
    kind: str,
    clips: Sequence[ClipWindow],
    spec: SamplingSpec,
    origin_offset_s: float = 0.0,
    num_threads: int = 1,
    allocate: Callable[[tuple[int, ...]], np.ndarray | None] | None = None,
) -> Iterator[ClipFrames | ClipRejection]:
    """Decode one session's media once and yield every clip's sampled frames (or its rejection).

    Args:
        media: Video file or JPEG frames folder.
        kind: ``"video"`` or ``"frames"``.
        clips: Windows to cut, any order; each is reported exactly once.
        spec: Frame sampling and sizing.
        origin_offset_s: Session time of the first JPEG frame (frames layout only).
        num_threads: decord threads.
        allocate: Where each clip's frames go: called with their shape ``(K, H, W, 3)``, returns an uninitialised
            uint8 array of that shape (or ``None`` for a new one). Lets the decoder process cut clips straight into
            its shared ring instead of copying them there.

    Yields:
        One :class:`ClipFrames` or :class:`ClipRejection` per clip, in order of the clips' last needed frame.
    """
    try:
        reader = open_media(media, kind, origin_offset_s, num_threads)
    except DecodeError as exc:
        for clip in clips:
            yield ClipRejection(clip.clip_id, exc.reason, str(exc))
        return
    size = spec.target_size(reader.height, reader.width)
    pending = []  # (clip, covered frame indices, frames to decode)
    for clip in clips:
        plan = _clip_plan(reader, clip, spec)
        if isinstance(plan, ClipRejection):
            yield plan
        else:
            pending.append((clip, *plan))
    pending.sort(key=lambda item: item[2][-1])
    needed = np.unique(np.concatenate([item[2] for item in pending])) if pending else np.empty(0, np.int64)

    buffer: dict[int, np.ndarray] = {}
    next_clip = 0
    for chunk_start in range(0, len(needed), DECODE_CHUNK):
        chunk = needed[chunk_start : chunk_start + DECODE_CHUNK]
        try:
            frames = reader.read(chunk.tolist(), size)
        except DecodeError as exc:
            for clip, _, _ in pending[next_clip:]:
                yield ClipRejection(clip.clip_id, exc.reason, str(exc))
            return
        buffer.update(zip(chunk.tolist(), frames, strict=True))
        decoded_up_to = int(chunk[-1])
        while next_clip < len(pending) and pending[next_clip][2][-1] <= decoded_up_to:
            clip, covered, _ = pending[next_clip]
            yield _cut_clip(clip, covered, buffer, reader, spec, allocate)
            next_clip += 1
        # Frames before the earliest frame any pending clip still needs can go.
        if next_clip < len(pending):
            keep_from = min(int(item[2][0]) for item in pending[next_clip:])
            for index in [i for i in buffer if i < keep_from]:
                del buffer[index]


def _cut_clip(
    clip: ClipWindow,
    covered: np.ndarray,
    buffer: dict[int, np.ndarray],
    reader: _MediaReader,
    spec: SamplingSpec,
    allocate: Callable[[tuple[int, ...]], np.ndarray | None] | None = None,
) -> ClipFrames:
    if spec.strategy == "motion":
        clip_frames = np.stack([buffer[i] for i in covered.tolist()])
        local = motion_indices(frame_motion(to_gray(clip_frames, spec.motion_stride)), spec.frames_per_clip)
        out = allocate((len(local), *clip_frames.shape[1:])) if allocate is not None else None
        frames = np.take(clip_frames, local, axis=0, out=out)
    else:
        local = uniform_indices(len(covered), spec.frames_per_clip)
        picked = [buffer[i] for i in covered[local].tolist()]
        out = allocate((len(picked), *picked[0].shape)) if allocate is not None else None
        frames = np.stack(picked, out=out)
    times = reader.frame_times_s[covered[local]] - clip.start_s
    return ClipFrames(clip.clip_id, frames, times, reader.fps)


def sample_frames(frames: np.ndarray, frame_times_s: np.ndarray, spec: SamplingSpec) -> tuple[np.ndarray, np.ndarray]:
    """Sample already-decoded, already-resized frames of one clip exactly as :func:`iter_session_clips` does.

    Args:
        frames: uint8[T, H, W, 3] every frame of the clip.
        frame_times_s: float[T] their timestamps.
        spec: Frame sampling.

    Returns:
        ``(uint8[K, H, W, 3], float64[K])``.
    """
    if spec.strategy == "motion":
        local = motion_indices(frame_motion(to_gray(frames, spec.motion_stride)), spec.frames_per_clip)
    else:
        local = uniform_indices(len(frames), spec.frames_per_clip)
    return frames[local], np.asarray(frame_times_s, dtype=np.float64)[local]


# --- deadline -------------------------------------------------------------------------------------------------
#
# Decoding runs in a separate Python process so a hung decord call can be killed. The process is started with a
# plain command line (not multiprocessing's fork/spawn): forking a Ray worker full of threads is unsafe, and
# spawn/forkserver re-import the parent's __main__, which inside a Ray worker is Ray's own worker script. Workers
# are reused across sessions; one that misses a deadline is killed and replaced.
#
# Pixels come back through a ring buffer in shared memory (a memfd both processes map), not through the pipe: the
# pipe costs two kernel copies and a fresh allocation per clip (~10% of the decoding time at 224x224); the decoder
# cuts each clip straight into the ring (no extra copy). The pipe carries only the small per-clip message (id, times,
# shape, where the pixels are). Flow control: the parent publishes how far it has consumed in the ring's header; the
# decoder waits for room before overwriting anything the parent may still read.

RING_BYTES = 32 << 20  # per decoder process: ~26 clips of 8x224x224x3, so decoding runs ahead while the parent writes
_RING_HEADER = 64  # bytes before the data: int64 "consumed" counter (parent -> decoder), rest padding


class _Ring:
    """The shared ring: ``consumed`` (int64, written by the parent) and ``data`` (uint8[RING_BYTES])."""

    def __init__(self, fd: int, size: int):
        import mmap

        self.size = size
        self.map = mmap.mmap(fd, _RING_HEADER + size)
        self.consumed = np.frombuffer(self.map, dtype=np.int64, count=1)
        self.data = np.frombuffer(self.map, dtype=np.uint8, count=size, offset=_RING_HEADER)


def _serve_decoding(read_fd: int, write_fd: int, ring_fd: int = -1, ring_bytes: int = 0) -> None:
    """Child process loop: receive ``iter_session_clips`` arguments, send back each result, then ``None``."""
    import time
    from multiprocessing.connection import Connection

    jobs, results = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    ring = _Ring(ring_fd, ring_bytes) if ring_fd >= 0 else None
    if ring_fd >= 0:
        os.close(ring_fd)
    parent = os.getppid()
    written = 0  # bytes ever placed in the ring (monotonic, like the parent's consumed counter)
    slot: tuple[int, int] | None = None  # (offset, end counter) of the clip being cut into the ring

    def allocate(shape: tuple[int, ...]) -> np.ndarray | None:
        """Room in the ring for one clip's frames; waits until the parent has read what it would overwrite."""
        nonlocal written, slot
        size = int(np.prod(shape))
        if ring is None or not 0 < size <= ring.size:
            return None
        offset = written % ring.size
        if offset + size > ring.size:  # a clip's pixels stay contiguous: skip the ring's tail
            written += ring.size - offset
            offset = 0
        end = written + size
        while end - int(ring.consumed[0]) > ring.size:
            if os.getppid() != parent:  # the parent is gone: nobody will ever read
                os._exit(0)
            time.sleep(0.0005)
        written, slot = end, (offset, end)
        return ring.data[offset : offset + size].reshape(shape)

    while True:
        try:
            args = jobs.recv()
        except EOFError:
            return
        try:
            for item in iter_session_clips(*args, allocate=allocate):
                if not isinstance(item, ClipFrames):
                    results.send(("rejected", item))
                elif slot is not None:
                    offset, end = slot
                    slot = None
                    results.send(
                        ("ring", item.clip_id, item.frame_times_s, item.source_fps, item.frames.shape, offset, end)
                    )
                else:
                    # Pixels go as raw bytes: pickling them costs ~6x more than the pipe itself.
                    frames = np.ascontiguousarray(item.frames)
                    results.send(("frames", item.clip_id, item.frame_times_s, item.source_fps, frames.shape))
                    results.send_bytes(memoryview(frames).cast("B"))
            results.send(None)
        except Exception as exc:  # report, never leave the parent waiting
            results.send(DecodeError("decode_crash", f"{args[0]}: decoder failed: {exc!r}"))


class _DecoderProcess:
    def __init__(self) -> None:
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        with contextlib.suppress(OSError):  # a 1 MiB pipe buffer halves the context switches per clip
            fcntl.fcntl(result_write, _F_SETPIPE_SZ, 1 << 20)
        ring_fd = -1
        with contextlib.suppress(AttributeError, OSError):  # no memfd: pixels go through the pipe
            ring_fd = os.memfd_create("opsvlm-decoder-ring")
            os.ftruncate(ring_fd, _RING_HEADER + RING_BYTES)
        self.ring = _Ring(ring_fd, RING_BYTES) if ring_fd >= 0 else None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        serve = f"_serve_decoding({job_read}, {result_write}, {ring_fd}, {RING_BYTES if ring_fd >= 0 else 0})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from opsvlm.video.decode import _serve_decoding; {serve}"],
            pass_fds=(job_read, result_write) + ((ring_fd,) if ring_fd >= 0 else ()),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for fd in (job_read, result_write, ring_fd):
            if fd >= 0:
                os.close(fd)
        self.jobs = Connection(job_write, readable=False)
        self.results = Connection(result_read, writable=False)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.jobs.close()
        self.results.close()
        # The ring is not closed: frames handed out as views may still point into it; it goes with its last view.
        self.ring = None


_IDLE_DECODERS: list[_DecoderProcess] = []
_IDLE_LOCK = threading.Lock()


def decode_session_with_deadline(
    media: str,
    kind: str,
    clips: Sequence[ClipWindow],
    spec: SamplingSpec,
    deadline_s: float,
    origin_offset_s: float = 0.0,
) -> Iterator[ClipFrames | ClipRejection]:
    """:func:`iter_session_clips` in a decoder process, with a deadline per result.

    If the decoder produces nothing for ``deadline_s`` seconds (decord hung) it is killed and every clip it did not
    deliver is rejected with reason ``decode_timeout``; if it dies, with ``decode_crash``. Safe to call from several
    threads at once (each call gets its own decoder process).

    Args:
        media: Video file or JPEG frames folder.
        kind: ``"video"`` or ``"frames"``.
        clips: Windows to cut.
        spec: Frame sampling.
        deadline_s: Longest wait for the next clip, seconds (the first wait includes opening the media).
        origin_offset_s: See :func:`iter_session_clips`.

    Yields:
        Exactly one result per clip; each :class:`ClipFrames` owns its frames.
    """
    return _decode_with_deadline(media, kind, clips, spec, deadline_s, origin_offset_s, copy=True)


def decode_session_views(
    media: str,
    kind: str,
    clips: Sequence[ClipWindow],
    spec: SamplingSpec,
    deadline_s: float,
    origin_offset_s: float = 0.0,
) -> Iterator[ClipFrames | ClipRejection]:
    """:func:`decode_session_with_deadline` without the copy: each :class:`ClipFrames`' ``frames`` (uint8[K, H, W, 3],
    read-only) may be a view into the decoder's shared ring, valid only until the next result is requested. For
    callers that copy the pixels somewhere anyway (the pipeline copies them straight into its Arrow column)."""
    return _decode_with_deadline(media, kind, clips, spec, deadline_s, origin_offset_s, copy=False)


def _decode_with_deadline(
    media: str,
    kind: str,
    clips: Sequence[ClipWindow],
    spec: SamplingSpec,
    deadline_s: float,
    origin_offset_s: float,
    copy: bool,
) -> Iterator[ClipFrames | ClipRejection]:
    with _IDLE_LOCK:
        decoder = _IDLE_DECODERS.pop() if _IDLE_DECODERS else None
    if decoder is None or decoder.process.poll() is not None:
        decoder = _DecoderProcess()
    clips = list(clips)
    reported: set[str] = set()
    failure: ClipRejection | None = None
    finished = False
    try:
        decoder.jobs.send((media, kind, clips, spec, origin_offset_s))
        while True:
            if not decoder.results.poll(deadline_s):
                failure = ClipRejection("", "decode_timeout", f"{media}: no frame decoded within {deadline_s:g} s")
                break
            try:
                item = decoder.results.recv()
            except EOFError:
                failure = ClipRejection("", "decode_crash", f"{media}: decoder process died")
                break
            if item is None:
                finished = True
                break
            if isinstance(item, DecodeError):
                failure = ClipRejection("", item.reason, str(item))
                finished = True
                break
            consumed_to = None
            if item[0] == "ring":
                _, clip_id, frame_times_s, source_fps, shape, offset, consumed_to = item
                frames = decoder.ring.data[offset : offset + int(np.prod(shape))].reshape(shape)
                if copy:
                    frames = frames.copy()
                    decoder.ring.consumed[0] = consumed_to
                    consumed_to = None
                else:
                    frames.flags.writeable = False
                item = ClipFrames(clip_id, frames, frame_times_s, source_fps)
            elif item[0] == "frames":
                _, clip_id, frame_times_s, source_fps, shape = item
                frames = np.frombuffer(decoder.results.recv_bytes(), dtype=np.uint8).reshape(shape)
                item = ClipFrames(clip_id, frames, frame_times_s, source_fps)
            else:
                item = item[1]
            reported.add(item.clip_id)
            yield item
            if consumed_to is not None:  # the caller is done with the view: the decoder may overwrite it
                decoder.ring.consumed[0] = consumed_to
    finally:
        if finished:
            with _IDLE_LOCK:
                _IDLE_DECODERS.append(decoder)
        else:  # timed out, died, or the caller stopped early: the process may be mid-job, so it cannot be reused
            decoder.kill()
    missing = [clip for clip in clips if clip.clip_id not in reported]
    if missing and failure is None:
        failure = ClipRejection("", "decode_crash", f"{media}: decoder skipped {len(missing)} clip(s)")
    for clip in missing:
        yield ClipRejection(clip.clip_id, failure.reason, failure.detail)
