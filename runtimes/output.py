"""A run's output directory: frames.npy filled chunk by chunk, run.json kept current, snapshots.

The order of writes makes a kill at any instant safe: a chunk's frames are written before run.json
counts them, and a snapshot is whole on disk before run.json names it (the one it replaces is
deleted after). run.json is rewritten with one rename at most every RECORD_INTERVAL_S seconds
while chunks come, without fsync: a SIGKILL loses nothing the kernel has (page cache), and a
rewrite costs ~0.4 ms here, too much to pay on each 5 ms chunk. Frames and run.json are fsynced at
every snapshot, on failure and at the end: the points a power loss falls back to.

With a decoder, video.mp4 (runtimes.video: H.264 in a fragmented MP4) gets each chunk's pixels right
after frames.npy gets its latents, and run.json's `video` counts a chunk only after both hold it
(`bytes` and `frames`: the point Mp4Writer.resume cuts the file back to). The mp4 commits each
fragment with one byte, so a kill leaves a playable file holding at least what run.json counts.

One run owns OUT at a time (`claim_out`: an exclusive lock the kernel drops when the process dies,
so a killed run leaves no stale lock). frames.npy gets its whole size from the file system up
front (posix_fallocate), so a disk too small is refused before the first chunk; a disk that fills
later (a snapshot, another writer) stops the run with one line, run.json saying so: a small
reserve file kept in OUT is given back first so that run.json can still be written.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import RunError
from .files import sha256_file, write_json_atomic
from .framefile import FrameFile
from .snapshot import remove_snapshots, save_snapshot
from .video import Mp4Writer, pixels_to_uint8

FRAMES, RECORD, PREVIEW, VIDEO = "frames.npy", "run.json", "preview.gif", "video.mp4"
# Snapshot entries of the video (besides the stream's own): the decoder's caches under this prefix, and
# the mp4's committed length and frame count.
DECODER_PREFIX = "decoder."
VIDEO_KEYS = ("video.bytes", "video.frames", "video.chunks")
LOCK, RESERVE = ".run.lock", ".run.reserve"
RECORD_INTERVAL_S = 0.1
# Bytes kept aside in OUT for the last run.json rewrites of a run the disk stops (a few KB each).
RESERVE_BYTES = 1 << 20


@contextlib.contextmanager
def claim_out(out: Path):
    """OUT for this run alone: a second run on the same OUT (another process, or another video in
    this one) is refused in one line naming the one that holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunError(f"--out {out}: expected no other run writing it, found one running (pid {holder}, "
                           f"{path}); wait for it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (harmless, and removing it would race)


def _holder(out: Path) -> str | None:
    """The pid of a live run that holds OUT, or None (no lock file, or its run is gone)."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def _reserve(out: Path) -> None:
    """Claims RESERVE_BYTES in OUT (given back by _release_reserve when the disk fills)."""
    with open(out / RESERVE, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)


def _release_reserve(out: Path) -> None:
    (out / RESERVE).unlink(missing_ok=True)


def read_record(out: Path) -> dict[str, Any] | None:
    """run.json of a previous run in `out`, None when there is none; RunError when unreadable."""
    path = out / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: expected a run record (JSON), found {' '.join(str(e).split())[:200]}") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: expected a run record (a JSON object), found {type(record).__name__}")
    return record


def check_out(out: Path, resume: bool, claimed: bool = False) -> dict[str, Any] | None:
    """Refuses an --out that cannot take this run, before anything is written; returns the previous
    run.json (required with resume). `claimed`: this process holds OUT's lock (claim_out)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: expected a directory (new, or a previous run's), found a file")
    holder = _holder(out) if out.is_dir() and not claimed else None
    if holder is not None:
        raise RunError(f"--out {out}: expected no other run writing it, found one running (pid {holder}, "
                       f"{out / LOCK}); wait for it, or choose another --out")
    record = read_record(out) if out.is_dir() else None
    if resume:
        if record is None:
            raise RunError(f"{out / RECORD}: expected the record of a run to resume, found no such file")
        if record.get("status") != "done" and not record.get("snapshot"):
            raise RunError(f"{out / RECORD}: snapshot: expected a snapshot to resume from (taken every "
                           f"--snapshot-every N chunks), found none; start again without --resume")
    elif record is not None and record.get("status") == "running":
        raise RunError(f"--out {out}: expected no unfinished run there, found one at chunk "
                       f"{record.get('chunks_done')} of {record.get('chunks_requested')} (run.json); "
                       f"continue it with --resume or choose another --out")
    return record


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    """Writes one run into `out`; `record` is run.json's content, updated as the run goes."""

    def __init__(self, out: Path, record: dict[str, Any], frames: FrameFile, chunk_frames: int, first_frame: int):
        self.out, self.record, self.frames = out, record, frames
        self.chunk_frames, self.first_frame = chunk_frames, first_frame  # first_frame: the state's frames
        self._last_write = 0.0
        self.video: Mp4Writer | None = None
        self.append_seconds = 0.0  # time spent turning pixels into uint8 and appending them to the mp4

    @classmethod
    def start(cls, out: Path, record: dict[str, Any], shape: tuple[int, ...], state_frames: np.ndarray,
              chunk_frames: int) -> "RunDir":
        """A new run: run.json first (0 chunks done), so it never vouches for a previous run's frames."""
        out.mkdir(parents=True, exist_ok=True)
        record.update(status="running", chunks_done=0, frames=int(state_frames.shape[2]), snapshot=None)
        if record.get("video") is not None:
            record["video"].update(file=VIDEO, bytes=0, frames=0, chunks=0)
        write_json_atomic(out / RECORD, record)
        remove_snapshots(out)
        (out / PREVIEW).unlink(missing_ok=True)
        if record.get("video") is None:
            (out / VIDEO).unlink(missing_ok=True)  # a previous run's: run.json no longer vouches for it
        for stale in out.glob(f".{FRAMES}.tmp-*"):  # a run killed while it sized its frames file
            stale.unlink(missing_ok=True)
        tmp = out / f".{FRAMES}.tmp-{os.getpid()}"
        try:
            _reserve(out)
            frames = FrameFile.create(tmp, shape)
            frames.allocate()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            _release_reserve(out)
            need = int(np.prod(shape)) * 4
            free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
            message = (f"--out {out}: expected room for {FRAMES} ({need + RESERVE_BYTES:,} bytes: the whole run "
                       f"and run.json's reserve), found {free:,} bytes free ({os.strerror(e.errno) if e.errno else e})")
            # run.json already stopped vouching for an older run's frames: it says why this one did not start,
            # so that OUT takes a run that fits.
            record.update(status="failed", error=message)
            write_json_atomic(out / RECORD, record)
            raise RunError(message) from None
        frames.write(0, state_frames)
        os.replace(tmp, out / FRAMES)
        frames.path = out / FRAMES
        return cls(out, record, frames, chunk_frames, int(state_frames.shape[2]))

    @classmethod
    def resume(cls, out: Path, record: dict[str, Any], shape: tuple[int, ...], chunks_done: int,
               chunk_frames: int) -> "RunDir":
        """Goes on with the run in `out` from its snapshot after `chunks_done` chunks: run.json counts
        only those, since the chunks after the snapshot are made again."""
        path = out / FRAMES
        try:
            frames = FrameFile.open(path)
        except (OSError, ValueError) as e:
            found = " ".join(str(e).split())[:200]
            raise RunError(f"{path}: expected the frames of the run to resume, found {found}") from None
        if frames.shape != tuple(shape) or frames.dtype != np.float32:
            frames.close()
            raise RunError(f"{path}: expected float32{list(shape)} (run.json and the artifact), "
                           f"found {frames.dtype}{list(frames.shape)}")
        first = shape[2] - record["chunks_requested"] * chunk_frames
        record.pop("error", None)  # a failed run resumed: the failure is made again or it is gone
        record.update(status="running", chunks_done=chunks_done, frames=first + chunks_done * chunk_frames)
        try:
            _reserve(out)
            frames.allocate()
            write_json_atomic(out / RECORD, record)
        except OSError as e:
            frames.close()
            raise RunError(f"--out {out}: expected room to go on ({RESERVE_BYTES:,} bytes beside {FRAMES}), found "
                           f"{os.strerror(e.errno) if e.errno else e}") from None
        return cls(out, record, frames, chunk_frames, first)

    # -- the video ----------------------------------------------------------------------------------
    def open_video(self, state: dict[str, int] | None = None) -> None:
        """Starts video.mp4 (a new run: run.json's `video` says 0 frames), or goes on with it from a
        snapshot's `state` {"bytes", "frames", "chunks"}: the file is cut back to that point."""
        v = self.record["video"]
        path = self.out / VIDEO
        if state is None:
            self.video = Mp4Writer.create(path, v["width"], v["height"], v["fps"])
            v.update(bytes=0, frames=0, chunks=0)
        else:
            self.video = Mp4Writer.resume(path, v["width"], v["height"], v["fps"], state["bytes"], state["frames"])
            v.update(bytes=state["bytes"], frames=state["frames"], chunks=state["chunks"])

    def add_video(self, pixels: np.ndarray) -> None:
        """A chunk's decoded pixels (float [B, 3, T, H, W] in [-1, 1]) appended to video.mp4 as one
        fragment; counted in run.json's `video` (the next time it is written)."""
        t0 = time.perf_counter()
        state = self.video.append(pixels_to_uint8(pixels))
        self.append_seconds += time.perf_counter() - t0
        v = self.record["video"]
        v.update(bytes=state["bytes"], frames=state["frames"], chunks=v["chunks"] + 1)

    def video_state(self) -> dict[str, np.ndarray]:
        """The mp4's committed point, for a snapshot (its entries VIDEO_KEYS)."""
        v = self.record["video"]
        return {f"video.{k}": np.asarray(v[k], dtype=np.int64) for k in ("bytes", "frames", "chunks")}

    def close_video(self, abort: bool = False) -> None:
        """Stops the encoder: closed (a finished run) or killed (a stopped one; committed fragments stay)."""
        if self.video is not None:
            if abort:
                self.video.abort()
            else:
                self.video.close()
            self.video = None

    # -- as the run goes ------------------------------------------------------------------------
    def add_chunk(self, index: int, x: np.ndarray, pixels: np.ndarray | None = None) -> None:
        """Frames of the run's chunk `index` (0-based) are stored, then (with a video) its pixels are
        appended to video.mp4; run.json counts the chunk soon after, never before both hold it."""
        self.frames.write(self.first_frame + index * self.chunk_frames, x)
        if pixels is not None:
            self.add_video(pixels)
        self.record["chunks_done"] = index + 1
        self.record["frames"] = self.first_frame + (index + 1) * self.chunk_frames
        now = time.monotonic()
        if now - self._last_write >= RECORD_INTERVAL_S:
            self._write(durable=False)
            self._last_write = now

    def snapshot(self, arrays: dict[str, np.ndarray], identity: str) -> None:
        """Stores the stream state after the chunks done so far; then run.json points to it."""
        self.frames.sync()  # the snapshot must never get ahead of the frames it follows
        if self.video is not None:
            self.video.sync()  # nor of the video
            arrays = {**arrays, **self.video_state()}
        done = self.record["chunks_done"]
        old = (self.record.get("snapshot") or {}).get("file")
        self.record["snapshot"] = save_snapshot(self.out, arrays, done, identity)
        if self.video is not None:
            v = self.record["video"]
            self.record["snapshot"]["video"] = {k: v[k] for k in ("bytes", "frames", "chunks")}
        self._write()
        if old and old != self.record["snapshot"]["file"]:
            (self.out / old).unlink(missing_ok=True)

    def fail_chunk(self, chunk: int, frame: int, reason: str) -> None:
        """Stops the run at stream chunk `chunk` (first frame `frame`): run.json says failed, and how
        many chunks before it are in frames.npy; raises RunError with the same line."""
        message = (f"chunk {chunk} (frames {frame}-{frame + self.chunk_frames - 1}): {reason}; the "
                   f"{self.record['chunks_done']} chunks before it are in {self.out / FRAMES} "
                   f"({self.record['frames']} frames, {RECORD})")
        self.frames.sync()
        self.close_video(abort=True)
        self.record.update(status="failed", error=message)
        self._write()
        self.frames.close()
        raise RunError(message)

    def fail(self, message: str) -> None:
        """Stops the run before its loop (the video could not be opened): run.json says why; RunError."""
        self.close_video(abort=True)
        self.record.update(status="failed", error=message)
        self.frames.close()
        self._write()
        raise RunError(message)

    def fail_io(self, error: OSError) -> None:
        """Stops the run on a write that failed (ENOSPC: the disk is full): the reserve is given back
        so that run.json can say so; every chunk it counts is in frames.npy. Raises RunError."""
        _release_reserve(self.out)
        cause = os.strerror(error.errno) if error.errno else str(error)
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        hint = "; free space, then --resume" if error.errno == errno.ENOSPC else ""
        message = (f"--out {self.out}: {cause}{where} after {self.record['chunks_done']} chunks; the frames of those "
                   f"are in {self.out / FRAMES} ({self.record['frames']} frames, {RECORD}){hint}")
        self.record.update(status="failed", error=message)
        self.close_video(abort=True)
        try:
            self.frames.close()
            self._write()
        except OSError:
            pass  # run.json keeps its last count, which the frames hold
        raise RunError(message)

    def flush(self) -> None:
        """run.json brought up to date now (the loop stopped between two timed rewrites)."""
        if self.record.get("status") == "running":
            self._write()

    def finish(self, extra: dict[str, Any], preview: Callable[[Path, np.ndarray], bool] | None,
               max_preview_frames: int) -> None:
        """Syncs the frames, writes the preview from them, marks the run done. Snapshots go: a
        finished run has nothing to resume, and a large model's snapshot is gigabytes."""
        self.frames.sync()
        self.frames.close()
        if self.video is not None:
            self.video.close()  # every fragment is committed already; this stops the encoder
            self.video = None
            _fsync_file(self.out / VIDEO)  # a finished run's video survives a power loss, like its frames
        wrote = False
        if preview is not None and self.record["frames"]:
            wrote = preview(self.out / PREVIEW, self.preview_frames(max_preview_frames))
        self.record.update(extra, status="done", preview=PREVIEW if wrote else None,
                           frames_sha256=sha256_file(self.out / FRAMES), snapshot=None)
        self._write()
        remove_snapshots(self.out)
        _release_reserve(self.out)

    def preview_frames(self, limit: int) -> np.ndarray:
        """Up to `limit` frames spread evenly over the run, read from frames.npy."""
        n = self.record["frames"]
        mm = np.load(self.out / FRAMES, mmap_mode="r")
        idx = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))
        frames = np.asarray(mm[:, :, idx])
        del mm
        return frames

    def _write(self, durable: bool = True) -> None:
        write_json_atomic(self.out / RECORD, self.record, durable=durable)
