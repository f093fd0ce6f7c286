"""frames.npy written chunk by chunk: a standard .npy [B, C, T, H, W] sized up front, filled with pwrite.

The file is created at its final size (sparse until written), so every frame has a fixed offset and
a chunk is written where it belongs the moment it exists; a reader takes the first `frames` frames
that run.json vouches for. Writes go through pwrite rather than a memmap: pages a process has
touched in a shared mapping count in its resident memory until unmapped (measured: 80 MB of RSS
after writing 80 MB through numpy.memmap), while pwrite leaves them in the page cache, where they
survive a SIGKILL all the same. numpy only.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    # pwrite may store fewer bytes than asked (a signal, a full disk); go on until all are written.
    while data:
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


class FrameFile:
    """An open frames.npy of shape [B, C, T, H, W]; `write(t, x)` stores frames t .. t+f-1."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, tuple(shape), np.dtype(dtype), offset
        self._fd = os.open(path, os.O_WRONLY)

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype = np.float32) -> "FrameFile":
        """A new file of the full size; numpy writes the header (its own format, its own padding)."""
        path = Path(path)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        offset = mm.offset
        del mm  # unmap at once: only the header was touched
        return cls(path, shape, dtype, offset)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FrameFile":
        """An existing file, to go on writing it (resume)."""
        path = Path(path)
        mm = np.load(path, mmap_mode="r")
        shape, dtype, offset = mm.shape, mm.dtype, mm.offset
        del mm
        return cls(path, shape, dtype, offset)

    def allocate(self) -> None:
        """Ask the file system for every block of the file now, so that a disk too small is known
        before the first chunk (OSError ENOSPC) rather than in the middle of the run."""
        size = os.fstat(self._fd).st_size
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: sparse as before
                raise

    @property
    def frames(self) -> int:
        return self.shape[2]

    def write(self, start: int, x: np.ndarray) -> None:
        """Frames [B, C, f, H, W] at time index `start`; one pwrite per (batch, channel) run."""
        b, c, t, h, w = self.shape
        if x.shape[:2] != (b, c) or x.shape[3:] != (h, w) or not 0 <= start <= t - x.shape[2]:
            raise ValueError(f"{self.path}: frames {list(x.shape)} at {start} do not fit {list(self.shape)}")
        x = np.ascontiguousarray(x, dtype=self.dtype)
        frame_bytes = h * w * self.dtype.itemsize
        for i in range(b):
            for j in range(c):
                at = self.offset + ((i * c + j) * t + start) * frame_bytes
                _pwrite_all(self._fd, memoryview(x[i, j]).cast("B"), at)

    def sync(self) -> None:
        """Everything written so far is on the disk, not only in the page cache (power loss)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FrameFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
