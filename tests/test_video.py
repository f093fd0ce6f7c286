"""runtimes.video: H.264 fragmented MP4 appended chunk by chunk, playable after a SIGKILL, resumed in place."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from runtimes.video import PENDING, Mp4Writer, VideoError, count_frames, ffmpeg_exe, pixels_to_uint8

ROOT = Path(__file__).resolve().parents[1]
H, W = 32, 48


def smooth_frames(start: int, n: int, h: int = H, w: int = W) -> np.ndarray:
    """Smooth moving colours: H.264 keeps such frames well above 30 dB."""
    y, x = np.mgrid[0:h, 0:w] / 48.0
    t = np.arange(start, start + n)[:, None, None] * 0.05
    rgb = [0.5 + 0.35 * np.sin(2 * np.pi * (x + t)), 0.5 + 0.35 * np.cos(2 * np.pi * (y - t)),
           0.5 + 0.3 * np.sin(2 * np.pi * (x + y) + t)]
    return (np.stack(rgb, -1) * 255).round().astype(np.uint8)


def decode(path: Path) -> np.ndarray:
    frames = imageio_ffmpeg.read_frames(str(path))
    w, h = next(frames)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in frames])


def assert_plays(path: Path) -> None:
    """ffmpeg decodes every frame to the end and reports nothing wrong."""
    r = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-500:]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_chunks_append_into_one_playable_video(tmp_path):
    path = tmp_path / "v.mp4"
    frames = smooth_frames(0, 9)
    with Mp4Writer.create(path, W, H, 16) as writer:
        states = []
        for a, b in ((0, 1), (1, 5), (5, 9)):
            states.append(writer.append(frames[a:b]))
            assert states[-1] == {"bytes": path.stat().st_size, "frames": b}  # in the file on return
            assert count_frames(path) == b
    assert count_frames(path) == 9
    assert_plays(path)
    reader = imageio_ffmpeg.read_frames(str(path))
    assert next(reader)["fps"] == 16
    reader.close()
    got = decode(path)
    assert got.shape == frames.shape
    assert min(psnr(g, f) for g, f in zip(got, frames)) > 30


def test_odd_sizes_are_padded(tmp_path):  # and fsync=True, which only adds syncs
    frames = smooth_frames(0, 3, 31, 47)
    with Mp4Writer.create(tmp_path / "v.mp4", 47, 31, 16, fsync=True) as writer:
        assert (writer.width, writer.height) == (48, 32)
        writer.append(frames)
    got = decode(tmp_path / "v.mp4")
    assert got.shape == (3, 32, 48, 3)
    assert psnr(got[:, :31, :47], frames) > 30


def test_a_torn_append_leaves_a_playable_file_that_resumes(tmp_path):
    """The states a kill inside `append` can leave: the new fragment written in part or whole but
    not committed (moof still PENDING). Readers skip it; resume cuts it."""
    path = tmp_path / "v.mp4"
    with Mp4Writer.create(path, W, H, 16) as writer:
        for i in range(2):
            before = writer.append(smooth_frames(4 * i, 4))
        writer.append(smooth_frames(8, 4))
    data = path.read_bytes()
    fragment = bytearray(data[before["bytes"]:])
    assert fragment[4:8] == b"moof"
    fragment[4:8] = PENDING
    for cut in (5, 60, len(fragment) - 3, len(fragment)):
        path.write_bytes(data[:before["bytes"]] + fragment[:cut])
        assert_plays(path)
        assert count_frames(path) == before["frames"]
    with Mp4Writer.resume(path, W, H, 16, before["bytes"], before["frames"]) as writer:
        assert writer.append(smooth_frames(8, 4))["frames"] == 12
    assert count_frames(path) == 12
    assert_plays(path)


CHILD = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from runtimes.video import Mp4Writer
out = sys.argv[2]
base = np.linspace(0, 255, 32 * 48 * 3).reshape(32, 48, 3).astype(np.uint8)
writer = Mp4Writer.create(os.path.join(out, "v.mp4"), 48, 32, 16)
for i in range(100000):
    state = writer.append(np.stack([np.roll(base, 4 * i + j, axis=1) for j in range(4)]))
    with open(os.path.join(out, "side.tmp"), "w") as f:  # like run.json: one rename after each chunk
        json.dump(state, f)
    os.replace(os.path.join(out, "side.tmp"), os.path.join(out, "side.json"))
"""


def _side(out: Path) -> dict | None:
    try:
        return json.loads((out / "side.json").read_text())
    except FileNotFoundError:
        return None


def test_sigkill_mid_run_leaves_every_counted_frame_playable(tmp_path):
    rng = random.Random()
    for round_ in range(3):
        out = tmp_path / f"run{round_}"
        out.mkdir()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(out)])
        try:
            deadline = time.monotonic() + 30
            while (_side(out) or {"frames": 0})["frames"] < 12:
                assert child.poll() is None and time.monotonic() < deadline, "the writing child stopped early"
                time.sleep(0.005)
            delay = rng.uniform(0, 0.05)
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        recorded = _side(out)
        path = out / "v.mp4"
        assert_plays(path)
        assert count_frames(path) >= recorded["frames"], (delay, recorded)
        with Mp4Writer.resume(path, W, H, 16, recorded["bytes"], recorded["frames"]) as writer:
            writer.append(smooth_frames(0, 4))
            assert writer.append(smooth_frames(4, 4))["frames"] == recorded["frames"] + 8
        assert count_frames(path) == recorded["frames"] + 8
        assert_plays(path)


def test_resume_refuses_a_point_the_file_does_not_have(tmp_path):
    path = tmp_path / "v.mp4"
    with Mp4Writer.create(path, W, H, 16) as writer:
        writer.append(smooth_frames(0, 4))
        state = writer.append(smooth_frames(4, 4))
    with pytest.raises(VideoError, match="expected 9 frames"):
        Mp4Writer.resume(path, W, H, 16, state["bytes"], 9)
    with pytest.raises(VideoError, match="a box cut"):
        Mp4Writer.resume(path, W, H, 16, state["bytes"] - 1, 8)
    with pytest.raises(VideoError, match="64x32 frames"):
        Mp4Writer.resume(path, 64, H, 16, state["bytes"], 8)
    with pytest.raises(VideoError, match="ticks/s"):
        Mp4Writer.resume(path, W, H, 24, state["bytes"], 8)
    with pytest.raises(VideoError, match="expected the video to resume"):
        Mp4Writer.resume(tmp_path / "none.mp4", W, H, 16, state["bytes"], 8)
    assert count_frames(path) == 8  # a refused resume leaves the file as it was


def test_missing_ffmpeg_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    with pytest.raises(VideoError, match="expected an executable at .*no-ffmpeg"):
        Mp4Writer.create(tmp_path / "v.mp4", W, H, 16)
    assert not (tmp_path / "v.mp4").exists()


def test_pixels_to_uint8_values_and_layout():
    x = np.array([-1, -0.5, 0, 0.5, 1, 1.5, -2, np.nan, 2 / 255 - 1], np.float32)
    got = pixels_to_uint8(np.broadcast_to(x, (1, 3, 1, 1, x.size)))
    # (x + 1) * 127.5 rounded half to even: -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128, 0.5 -> 191.25 -> 191
    assert got[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255, 0, 0, 1]
    assert got.dtype == np.uint8
    # [B, 3, T, H, W] -> [T, H, W*B, 3]: batch side by side, channels last
    p = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 5, 6)).astype(np.float32)
    u = pixels_to_uint8(p)
    assert u.shape == (4, 5, 12, 3)
    for b in range(2):
        assert np.array_equal(u[:, :, 6 * b:6 * b + 6], pixels_to_uint8(p[b:b + 1]))
    assert u[1, 2, 6 + 3, 0] == np.rint((p[1, 0, 1, 2, 3] + 1) * np.float32(127.5))


def test_video_module_imports_no_torch():
    code = ("import sys; import runtimes.video; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ispa_export')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
