"""H.264 video written chunk by chunk into a fragmented MP4 that a kill at any instant leaves playable.

One ffmpeg process (the binary imageio-ffmpeg bundles) runs for the whole video: raw RGB frames in
on stdin, libx264 with `-tune zerolatency` (no B-frames, no lookahead, sliced threads: each frame's
packet comes out as soon as the frame goes in), FLV out on stdout. FLV is only the framing: every
packet arrives as one tag that says its length and whether it is a keyframe, already in the
length-prefixed form MP4 stores, and the first tag is the avcC (SPS/PPS) the MP4 header needs. This
module writes the MP4 itself: ftyp+moov once, then one moof+mdat fragment per `append`.

Why this way (measured with the bundled ffmpeg 9.0.2 on 2 shared cores, 48 frames, 480x832 unless
said; details in the report of issue 20 point 4):
- ffmpeg writing the fMP4 itself keeps frames back: its muxer closes a fragment only when the next
  packet arrives. `frag_every_frame`: after chunks of 3 frames, 2, 5, 8, ... frames are on disk at
  every wait (0.05 to 1.25 s); `frag_keyframe`: none until the end.
- One ffmpeg run per chunk (a closed GOP each, fragments spliced in) puts an IDR frame at the start
  of every chunk and costs a process start per chunk: 52 ms a chunk at 32x48 (this way: 1-2 ms).
  With x264's lookahead and mb-tree it is a little smaller with 12-frame chunks (textured source:
  1118 kB at 40.04 dB Y-PSNR vs 1174 kB at 39.96 dB this way), larger with 3 (1367 kB at 40.10).
- PyAV (its wheel bundles libx264): the same zerolatency encoder in-process, no faster (27 ms a
  frame vs 23), and 104 MB more to install.

Kill safety. A fragment is written with its moof typed PENDING, a box type no reader knows, so
readers skip it and the mdat after it (nothing refers to that mdat); then one 1-byte pwrite turns
PENDING into `moof`. A 1-byte write cannot be torn, so at every instant the file is the fragments
committed so far plus, at most, a tail that readers ignore (ffmpeg decodes such a file without an
error). `append` returns after the commit: the frames are in the page cache, where a SIGKILL cannot
take them; `fsync=True` also puts them on the disk (data synced before the commit byte, which a
power loss then keeps or loses whole).

Resume: `Mp4Writer.resume` checks the file's fragments up to a recorded (bytes, frames) point, cuts
the file there (dropping fragments made after that point and any ignored tail) and starts a new
encoder, whose first frame is an IDR; its SPS/PPS must equal the file's (same ffmpeg, same
settings), else VideoError.

Encoding: yuv420p BT.709 limited range (tagged in the SPS and a colr box), preset `faster`, CRF 20,
a keyframe every 250 frames at most (x264's default). zerolatency has no mb-tree, so a CRF here
means a better picture and more bytes than the same CRF of a usual x264 encode: CRF 20 measured
about the Y-PSNR of a usual CRF-18 encode (textured source: 39.96 dB, 1174 kB vs 39.98 dB, 1023 kB),
and `faster` encoded 2.5x faster than `medium` (23 vs 50-60 ms a frame at 480x832) at no worse
size for the quality (`veryfast`: +16% bytes). yuv420p needs even sizes: frames of an odd width or
height are padded by repeating their last column/row, and the file is that 1 pixel larger
(`Mp4Writer.width/height`).

numpy, imageio-ffmpeg (for the binary's path) and the standard library only.
"""
from __future__ import annotations

import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunError

DEFAULT_CRF = 20
DEFAULT_PRESET = "faster"
PENDING = b"moo_"  # a fragment's moof type until it is committed; differs from b"moof" in its last byte only
PACKET_TIMEOUT_S = 120.0  # zerolatency emits each packet at once; this only turns a hung ffmpeg into an error

_KEY_FLAGS = 0x02000000  # sample_depends_on=2: an IDR frame
_DELTA_FLAGS = 0x01010000  # sample_depends_on=1 and sample_is_non_sync_sample
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_EOF = object()


class VideoError(RunError):
    """The video cannot be written or resumed as asked; the message is one line."""


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary that imageio-ffmpeg bundles (IMAGEIO_FFMPEG_EXE overrides it)."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise VideoError(f"H.264 video needs the ffmpeg binary of imageio-ffmpeg (pip install imageio-ffmpeg): "
                         f"{' '.join(str(e).split())[:200]}") from None
    found = shutil.which(exe)  # the environment variable is taken unchecked by imageio-ffmpeg
    if found is None:
        raise VideoError(f"H.264 video needs the ffmpeg binary of imageio-ffmpeg: expected an executable at {exe}, "
                         f"found none")
    return found


def count_frames(path: str | os.PathLike) -> int:
    """Frames (packets) of the video stream in `path`, counted by ffmpeg; 0 for an empty file."""
    if os.path.getsize(path) == 0:
        return 0
    import imageio_ffmpeg

    ffmpeg_exe()  # the clear error when the binary is missing
    return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A VAE decode's pixels, float [B, 3, T, H, W] in [-1, 1], as uint8 RGB frames [T, H, W*B, 3]
    with the B videos side by side (video b in columns b*W .. b*W+W-1).

    value = round((x + 1) * 127.5) after clipping x to [-1, 1], rounding to the nearest integer
    with ties to even (np.rint): -1 -> 0, 0 -> 128, 1 -> 255, and no level is favoured the way
    truncation favours the lower one. NaN becomes 0. Computed in float32."""
    x = np.asarray(pixels)
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"pixels: expected [B, 3, T, H, W], found {list(x.shape)}")
    v = np.nan_to_num(x.astype(np.float32), nan=-1.0)
    v = np.rint((np.clip(v, -1.0, 1.0) + 1.0) * np.float32(127.5)).astype(np.uint8)
    b, _, t, h, w = v.shape
    return np.ascontiguousarray(v.transpose(2, 3, 0, 4, 1)).reshape(t, h, b * w, 3)


# -- MP4 boxes ------------------------------------------------------------------------------------

def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *parts)


def _init_segment(width: int, height: int, timescale: int, duration: int, avcc: bytes) -> bytes:
    """ftyp + moov of a one-track video with no samples of its own (they come in fragments)."""
    avc1 = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", width, height),
                struct.pack(">II", 0x480000, 0x480000), bytes(4), struct.pack(">H", 1), bytes(32),
                struct.pack(">Hh", 0x18, -1), _box(b"avcC", avcc),
                _box(b"colr", b"nclx", struct.pack(">HHHB", 1, 1, 1, 0)))  # BT.709, limited range
    stbl = _box(b"stbl", _full(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
                _full(b"stts", 0, 0, bytes(4)), _full(b"stsc", 0, 0, bytes(4)),
                _full(b"stsz", 0, 0, bytes(8)), _full(b"stco", 0, 0, bytes(4)))
    minf = _box(b"minf", _full(b"vmhd", 0, 1, bytes(8)),
                _box(b"dinf", _full(b"dref", 0, 0, struct.pack(">I", 1), _full(b"url ", 0, 1))), stbl)
    mdia = _box(b"mdia", _full(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0)),  # 'und'
                _full(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"VideoHandler\0"), minf)
    tkhd = _full(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, 1, 0, 0), bytes(8), struct.pack(">hhhH", 0, 0, 0, 0),
                 _MATRIX, struct.pack(">II", width << 16, height << 16))
    mvhd = _full(b"mvhd", 0, 0, struct.pack(">IIIIIH", 0, 0, timescale, 0, 0x10000, 0x100), bytes(10), _MATRIX,
                 bytes(24), struct.pack(">I", 2))
    mvex = _box(b"mvex", _full(b"trex", 0, 0, struct.pack(">IIIII", 1, 1, duration, 0, 0)))
    ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6avc1mp41")
    return ftyp + _box(b"moov", mvhd, _box(b"trak", tkhd, mdia), mvex)


def _fragment(sequence: int, decode_time: int, duration: int, samples: list[tuple[bool, bytes]]) -> bytes:
    """moof (typed PENDING) + mdat of `samples` (keyframe?, data), back to back from decode_time."""
    n = len(samples)
    table = b"".join(struct.pack(">II", len(d), _KEY_FLAGS if key else _DELTA_FLAGS) for key, d in samples)
    moof_size = 8 + 16 + 8 + 20 + 20 + 20 + 8 * n  # moof, mfhd, traf, tfhd, tfdt, trun
    traf = _box(b"traf", _full(b"tfhd", 0, 0x020008, struct.pack(">II", 1, duration)),  # base is moof; duration
                _full(b"tfdt", 1, 0, struct.pack(">Q", decode_time)),
                _full(b"trun", 0, 0x000601, struct.pack(">Ii", n, moof_size + 8), table))  # offset, sizes, flags
    moof = _box(PENDING, _full(b"mfhd", 0, 0, struct.pack(">I", sequence)), traf)
    assert len(moof) == moof_size
    data = b"".join(d for _, d in samples)
    return moof + struct.pack(">I4s", 8 + len(data), b"mdat") + data


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if size < 8 or start + size > end:
            return
        yield kind, start + 8, start + size
        start += size


def _child(data: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """(payload start, end) of the box at `path` (first match at each level), None if absent."""
    for kind, a, b in _boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return a, b
            skip = {b"stsd": 8, b"avc1": 78}.get(kind, 0)  # headers before these boxes' children
            return _child(data, path[1:], a + skip, b)
    return None


# -- the encoder ----------------------------------------------------------------------------------

class _Encoder:
    """ffmpeg: RGB frames in, (avcC) then one (keyframe?, AVCC sample) per frame out, in order."""

    def __init__(self, exe: str, width: int, height: int, fps: Fraction, crf: int, preset: str):
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: ffmpeg never blocks on what it logs
        cmd = [exe, "-hide_banner", "-nostats", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
               "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
               "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-crf", str(crf),
               "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
               "-fps_mode", "passthrough", "-flush_packets", "1", "-f", "flv", "pipe:1"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._out: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Runs beside the writes to stdin: ffmpeg stops reading frames when nobody drains its output.
        f = self._proc.stdout
        try:
            head = f.read(9)
            if len(head) < 9 or head[:3] != b"FLV":
                return
            f.read(struct.unpack(">I", head[5:9])[0] - 9 + 4)  # rest of the header, PreviousTagSize0
            while len(tag := f.read(11)) == 11:
                size = int.from_bytes(tag[1:4], "big")
                body = f.read(size + 4)[:size]  # the tag, then its PreviousTagSize
                if len(body) < size:
                    return
                if tag[0] != 9 or size < 5:  # 9: video; onMetaData and the like are skipped
                    continue
                if body[0] & 0x0F != 7 or body[0] & 0x80:
                    self._out.put(ValueError(f"expected legacy FLV AVC tags, found byte {body[0]:#x}"))
                    return
                if body[1] == 0:
                    self._out.put(("avcc", body[5:]))
                elif body[1] == 1:
                    self._out.put((body[0] >> 4 == 1, body[5:]))
        finally:
            self._out.put(_EOF)

    def send(self, frames: np.ndarray) -> None:
        try:
            self._proc.stdin.write(memoryview(frames).cast("B"))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failed("stopped taking frames") from None

    def receive(self) -> Any:
        try:
            item = self._out.get(timeout=PACKET_TIMEOUT_S)
        except queue.Empty:
            raise self._failed(f"gave no packet for {PACKET_TIMEOUT_S:.0f} s") from None
        if item is _EOF:
            self._out.put(_EOF)
            raise self._failed("ended early")
        if isinstance(item, Exception):
            raise self._failed(str(item))
        return item

    def _failed(self, what: str) -> VideoError:
        self.kill()
        self._log.seek(0)
        said = " ".join(self._log.read().decode("utf-8", "replace").split())[-300:]
        return VideoError(f"ffmpeg (libx264 encoder) {what}: exit status {self._proc.returncode}, "
                          f"said: {said or 'nothing'}")

    def close(self) -> None:
        """Ends the stream: every packet was taken already (zerolatency keeps none back)."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        self._proc.wait()
        self._reader.join()
        self._proc.stdout.close()
        self._log.close()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


# -- the writer -----------------------------------------------------------------------------------

def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _even(n: int) -> int:
    return n + (n & 1)


def _rate(fps: float | Fraction | str) -> Fraction:
    # 16 -> 16/1, 29.97 -> 2997/100, "30000/1001" as it is
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise VideoError(f"expected a positive frame rate, found {fps}")
    return rate


class Mp4Writer:
    """A fragmented MP4 (H.264, yuv420p) at `path`, one fragment per `append`."""

    def __init__(self, path: Path, width: int, height: int, fps: float | Fraction | str, crf: int, preset: str,
                 fsync: bool, end: int, frames: int, sequence: int, avcc: bytes | None):
        if width < 1 or height < 1:
            raise VideoError(f"{path}: expected a frame size of at least 1x1, found {width}x{height}")
        rate = _rate(fps)
        self.path, self.fps = path, rate
        self.in_width, self.in_height = width, height
        self.width, self.height = _even(width), _even(height)  # the file's size (odd sizes padded)
        self.timescale, self.duration = rate.numerator * 1000, rate.denominator * 1000  # ticks/s, ticks/frame
        self.fsync = fsync
        self._end, self._frames, self._sequence, self._avcc = end, frames, sequence, avcc
        exe = ffmpeg_exe()  # before the file is touched
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.ftruncate(self._fd, end)  # resume: drop what came after the recorded point
            self._encoder: _Encoder | None = _Encoder(exe, self.width, self.height, rate, crf, preset)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(cls, path: str | os.PathLike, width: int, height: int, fps: float | Fraction | str, *,
               crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET, fsync: bool = False) -> "Mp4Writer":
        """A new, empty video at `path` (replacing any file there); the header is written with the
        first frames, since it holds the encoder's SPS/PPS."""
        return cls(Path(path), width, height, fps, crf, preset, fsync, 0, 0, 0, None)

    @classmethod
    def resume(cls, path: str | os.PathLike, width: int, height: int, fps: float | Fraction | str,
               byte_length: int, frames: int, *, crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET,
               fsync: bool = False) -> "Mp4Writer":
        """Goes on with the video at `path` after its first `frames` frames, which `append` once said
        end at `byte_length`: checks the file up to there, cuts it there, appends from there."""
        path = Path(path)
        if byte_length == 0 and frames == 0:
            return cls.create(path, width, height, fps, crf=crf, preset=preset, fsync=fsync)
        rate = _rate(fps)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise VideoError(f"{path}: expected the video to resume, found {' '.join(str(e).split())[:200]}") from None
        try:
            avcc, sequence, found = _check_file(path, fd, byte_length, _even(width), _even(height),
                                                rate.numerator * 1000, rate.denominator * 1000)
        finally:
            os.close(fd)
        if found != frames:
            raise VideoError(f"{path}: expected {frames} frames in its first {byte_length} bytes (the record), "
                             f"found {found}")
        return cls(path, width, height, fps, crf, preset, fsync, byte_length, frames, sequence, avcc)

    # -- as the run goes ------------------------------------------------------------------------
    def append(self, frames: np.ndarray) -> dict[str, int]:
        """Encodes uint8 RGB frames [T, H, W, 3] and adds them to the file as one fragment; when this
        returns they are in the file (page cache; on the disk with fsync=True). Returns the state to
        record for a resume: {"bytes": the file's length, "frames": frames in it}. No frames: no
        fragment, the same state."""
        if self._encoder is None:
            raise VideoError(f"{self.path}: the writer is closed")
        x = np.asarray(frames)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (self.in_height, self.in_width, 3):
            raise VideoError(f"{self.path}: expected uint8 frames [T, {self.in_height}, {self.in_width}, 3], "
                             f"found {x.dtype}{list(x.shape)}")
        if not len(x):
            return self.state()
        if (self.width, self.height) != (self.in_width, self.in_height):
            x = np.pad(x, ((0, 0), (0, self.height - self.in_height), (0, self.width - self.in_width), (0, 0)),
                       mode="edge")
        self._encoder.send(np.ascontiguousarray(x))
        head, samples = b"", []
        while len(samples) < len(x):
            item = self._encoder.receive()  # ("avcc", record) or (keyframe?, sample)
            if item[0] == "avcc":
                head = self._take_avcc(item[1])
            else:
                samples.append(item)
        self._sequence += 1
        body = head + _fragment(self._sequence, self._frames * self.duration, self.duration, samples)
        _pwrite_all(self._fd, body, self._end)
        if self.fsync:
            _datasync(self._fd)  # the fragment on the disk before the byte that makes it count
        os.pwrite(self._fd, b"f", self._end + len(head) + 7)  # PENDING -> moof: the commit
        if self.fsync:
            _datasync(self._fd)
        self._end += len(body)
        self._frames += len(samples)
        return self.state()

    def _take_avcc(self, avcc: bytes) -> bytes:
        """The new encoder's SPS/PPS: the file's header with them (a new file), or a check that they
        are the file's (a resumed one: every fragment must decode with the one header)."""
        if self._avcc is None:
            self._avcc = avcc
            return _init_segment(self.width, self.height, self.timescale, self.duration, avcc)
        if avcc != self._avcc:
            self.abort()
            raise VideoError(f"{self.path}: the encoder's SPS/PPS ({avcc.hex()[:80]}) differ from the file's "
                             f"({self._avcc.hex()[:80]}): resume with the ffmpeg and settings that began it")
        return b""

    def state(self) -> dict[str, int]:
        """What `append` last returned: the file's committed length and its frames."""
        return {"bytes": self._end, "frames": self._frames}

    def sync(self) -> None:
        """Everything appended so far is on the disk (power loss), not only in the page cache."""
        os.fsync(self._fd)

    def close(self) -> dict[str, int]:
        """Stops the encoder and closes the file (synced with fsync=True); returns the final state."""
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
        return self.state()

    def abort(self) -> None:
        """Kills the encoder and closes the file as it is (every committed fragment stays)."""
        if self._encoder is not None:
            self._encoder.kill()
            self._encoder = None
            os.close(self._fd)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close() if kind is None else self.abort()


def _check_file(path: Path, fd: int, byte_length: int, width: int, height: int, timescale: int,
                duration: int) -> tuple[bytes, int, int]:
    """(avcC, last fragment number, frames) of a file this module wrote, read from its first
    `byte_length` bytes, which must end on a fragment boundary; VideoError otherwise. Reads the
    moov and the moofs only, not the frames' data."""
    def bad(expected: str, found: str) -> VideoError:
        return VideoError(f"{path}: expected {expected} (a video written by runtimes.video, cut at the "
                          f"recorded {byte_length} bytes), found {found}")

    if os.fstat(fd).st_size < byte_length:
        raise bad(f"at least {byte_length} bytes", f"{os.fstat(fd).st_size}")
    tops, at = [], 0
    while at < byte_length:
        head = os.pread(fd, 8, at)
        size, kind = struct.unpack(">I4s", head) if len(head) == 8 else (0, b"")
        if size < 8 or at + size > byte_length:
            raise bad("whole boxes", f"a box cut by the recorded length at byte {at}")
        tops.append((kind, at, size))
        at += size
    kinds = b" ".join(k for k, _, _ in tops)
    if not (kinds.startswith(b"ftyp moov") and kinds[9:] == b" moof mdat" * ((len(tops) - 2) // 2)):
        raise bad("ftyp, moov, then moof+mdat fragments", kinds[:100].decode("latin-1"))
    moov = os.pread(fd, tops[1][2], tops[1][1])
    avc1 = _child(moov, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"avc1"])
    mdhd = _child(moov, [b"moov", b"trak", b"mdia", b"mdhd"])
    trex = _child(moov, [b"moov", b"mvex", b"trex"])
    avcc = avc1 and _child(moov, [b"avcC"], avc1[0] + 78, avc1[1])
    if not (avc1 and mdhd and trex and avcc):
        raise bad("an avc1 track with an avcC", "another moov")
    size = struct.unpack_from(">HH", moov, avc1[0] + 24)
    if size != (width, height):
        raise bad(f"{width}x{height} frames", f"{size[0]}x{size[1]}")
    timing = (struct.unpack_from(">I", moov, mdhd[0] + 12)[0], struct.unpack_from(">I", moov, trex[0] + 12)[0])
    if timing != (timescale, duration):
        raise bad(f"{timescale} ticks/s and {duration} per frame", f"{timing[0]} and {timing[1]}")
    frames = 0
    for sequence, (_, at, size) in enumerate(tops[2::2], 1):
        moof = os.pread(fd, size, at)
        mfhd, trun = _child(moof, [b"moof", b"mfhd"]), _child(moof, [b"moof", b"traf", b"trun"])
        if not (mfhd and trun):
            raise bad("mfhd and trun in each moof", "a moof without them")
        if struct.unpack_from(">I", moof, mfhd[0] + 4)[0] != sequence:
            raise bad(f"fragment {sequence}", f"number {struct.unpack_from('>I', moof, mfhd[0] + 4)[0]}")
        frames += struct.unpack_from(">I", moof, trun[0] + 4)[0]
    return moov[avcc[0]:avcc[1]], (len(tops) - 2) // 2, frames
