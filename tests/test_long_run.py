"""Long runs (issue 14): frames on disk as they come, SIGKILL then --resume bit-identical, refusals.

On the tiny preset exported by `ispa export`, run by `python -m runtimes` on ONNX Runtime.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import runtimes.run as rt
from ispa_export.cli import main as ispa
from runtimes.files import sha256_file
from runtimes.run import generate, main, parser

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def art(tiny_artifact) -> Path:
    return tiny_artifact


def runtime(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtimes", *args, "--quiet", "--no-preview"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def snapshot(out: Path) -> dict | None:
    return record(out).get("snapshot")


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


class Crash(Exception):
    pass


def crashed_run(art: Path, out: Path, chunks: int, at: int, snapshot_every: int) -> dict:
    """A run that stops after `at` chunks as if killed (run.json status stays 'running')."""
    def stop(done: int) -> None:
        if done == at:
            raise Crash

    argv = [str(art), "--chunks", str(chunks), "--out", str(out), "--snapshot-every", str(snapshot_every),
            "--quiet", "--no-preview"]
    with pytest.raises(Crash):
        generate(parser().parse_args(argv), on_chunk=stop)
    return record(out)


# -- crash safety ----------------------------------------------------------------------------------

def test_sigkill_mid_run_keeps_frames_and_resume_is_bit_identical(art, tmp_path):
    chunks, every = 300, 8
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = runtime(str(art), "--chunks", str(chunks), "--out", str(ref))
    assert r.wait(timeout=120) == 0, r.stderr.read()
    reference = np.load(ref / "frames.npy")

    p = runtime(str(art), "--chunks", str(chunks), "--out", str(out), "--snapshot-every", str(every))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        try:
            rec = record(out)
        except (OSError, ValueError):  # not written yet
            rec = {}
        if rec.get("chunks_done", 0) >= 3 * every and rec.get("snapshot"):
            break
        time.sleep(0.01)
    assert p.poll() is None, f"the run ended before it could be killed: {p.stderr.read()}"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL

    rec = record(out)
    assert rec["status"] == "running" and 3 * every <= rec["chunks_done"] < chunks
    snap = rec["snapshot"]
    assert snap["chunks_done"] % every == 0 and snap["chunks_done"] <= rec["chunks_done"]
    assert sha256_file(out / snap["file"]) == snap["sha256"]
    on_disk = np.load(out / "frames.npy")  # a standard .npy, readable as it is after the kill
    assert on_disk.shape == reference.shape
    n = rec["frames"]
    assert np.array_equal(on_disk[:, :, :n], reference[:, :, :n])  # every chunk run.json counts, exact

    r = runtime(str(art), "--out", str(out), "--resume")
    assert r.wait(timeout=120) == 0, r.stderr.read()
    assert (out / "frames.npy").read_bytes() == (ref / "frames.npy").read_bytes()
    rec = record(out)
    assert rec["status"] == "done" and rec["chunks_done"] == chunks and rec["resumed_from"] == snap["chunks_done"]
    assert rec["frames_sha256"] == record(ref)["frames_sha256"]
    assert not list(out.glob("snapshot-*")), "a finished run keeps no snapshots"


def test_resume_after_an_interruption_in_process(art, tmp_path):
    crashed_run(art, tmp_path / "a", chunks=12, at=7, snapshot_every=3)
    rec = record(tmp_path / "a")
    assert rec["chunks_done"] == 7 and rec["snapshot"]["chunks_done"] == 6  # run.json flushed on the way out
    assert main([str(art), "--out", str(tmp_path / "a"), "--resume", "--quiet", "--no-preview"]) == 0
    assert main([str(art), "--chunks", "12", "--out", str(tmp_path / "b"), "--quiet", "--no-preview"]) == 0
    assert (tmp_path / "a" / "frames.npy").read_bytes() == (tmp_path / "b" / "frames.npy").read_bytes()


# -- refusals: one line, exit 2, nothing written or overwritten -------------------------------------

def test_out_naming_a_file_and_bad_counts_are_refused(art, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_bytes(b"keep me")
    assert main([str(art), "--chunks", "2", "--out", str(f)]) == 2
    assert f"--out {f}: expected a directory" in one_line_error(capsys)
    assert f.read_bytes() == b"keep me"
    for argv, needle in ((["--chunks", "0"], "--chunks: expected an integer >= 1, found 0"),
                         (["--chunks", "-3"], "--chunks: expected an integer >= 1, found -3"),
                         ([], "--chunks: expected the number of chunks"),
                         (["--chunks", "2", "--snapshot-every", "-1"], "--snapshot-every: expected an integer >= 0")):
        assert main([str(art), *argv, "--out", str(tmp_path / "o")]) == 2
        assert needle in one_line_error(capsys)
        assert not (tmp_path / "o").exists()


def test_resume_refusals_leave_the_run_untouched(art, tmp_path, capsys):
    out = tmp_path / "run"
    crashed_run(art, out, chunks=10, at=5, snapshot_every=2)
    before = tree(out)
    snap = snapshot(out)
    resume = ["--out", str(out), "--resume", "--quiet", "--no-preview"]

    def refused(artifact: Path, needle: str, extra: tuple[str, ...] = ()) -> None:
        assert main([str(artifact), *resume, *extra]) == 2
        assert needle in one_line_error(capsys)
        assert tree(out) == before

    # a fresh run would overwrite the unfinished one
    assert main([str(art), "--chunks", "10", "--out", str(out), "--quiet"]) == 2
    assert "expected no unfinished run there, found one at chunk 5 of 10" in one_line_error(capsys)
    assert tree(out) == before
    # another --chunks than the run's (its frames.npy is sized for 10)
    refused(art, "--chunks: expected 10", ("--chunks", "12"))
    # another artifact: same files, another manifest
    other = tmp_path / "other"
    shutil.copytree(art, other)
    m = json.loads((other / "manifest.json").read_text())
    m["versions"]["note"] = "another export"
    (other / "manifest.json").write_text(json.dumps(m))
    refused(other, "run.json: expected a run of")
    # a snapshot of another artifact, with run.json's checksum made to match it
    path = out / snap["file"]
    save_file(load_file(str(path)), str(path), metadata={"format": "ispa-run-snapshot", "chunks_done": "4",
                                                         "artifact_manifest_sha256": "0" * 64})
    rec = record(out)
    rec["snapshot"]["sha256"] = sha256_file(path)
    (out / "run.json").write_text(json.dumps(rec))
    before = tree(out)
    refused(art, "found one of another artifact (manifest sha256 0000")
    # a snapshot whose bytes do not match run.json's sha256
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    before = tree(out)
    refused(art, f"{path}: sha256: expected {rec['snapshot']['sha256']} (run.json snapshot.sha256)")
    # the snapshot file is gone
    path.unlink()
    before = tree(out)
    refused(art, f"{path}: expected the snapshot run.json names, found no such file")


def test_resume_without_a_snapshot_is_refused(art, tmp_path, capsys):
    assert main([str(art), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "run.json: expected the record of a run to resume, found no such file" in one_line_error(capsys)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "run"
    crashed_run(art, out, chunks=6, at=3, snapshot_every=0)
    before = tree(out)
    assert main([str(art), "--out", str(out), "--resume"]) == 2
    assert "snapshot: expected a snapshot to resume from" in one_line_error(capsys)
    assert tree(out) == before


# -- a non-finite chunk ----------------------------------------------------------------------------

def test_a_non_finite_chunk_stops_the_run_and_keeps_the_frames_before_it(art, tmp_path, capsys, monkeypatch):
    bad_chunk = None
    real = rt.make_runner

    class Poisoned:
        """The artifact's ONNX Runtime runner, with NaN in one chunk's prediction."""

        def __init__(self, inner):
            self.inner, self.input_names, self.buffers = inner, inner.input_names, inner.buffers

        def run(self, feeds, info):
            out = self.inner.run(feeds, info)
            if info.chunk == bad_chunk:
                out = {**out, "prediction": np.full_like(out["prediction"], np.nan)}
            return out

    monkeypatch.setattr(rt, "make_runner", lambda *a, **kw: Poisoned(real(*a, **kw)))
    assert main([str(art), "--chunks", "6", "--out", str(tmp_path / "ok"), "--quiet", "--no-preview"]) == 0
    good = record(tmp_path / "ok")
    bad_chunk = good["chunks_from_state"] + 4  # the run's fifth chunk
    out = tmp_path / "bad"
    assert main([str(art), "--chunks", "6", "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"chunk {bad_chunk} (frames " in err and "expected a finite prediction" in err
    rec = record(out)
    assert rec["status"] == "failed" and rec["chunks_done"] == 4 and rec["error"] in err
    n = rec["frames"]
    assert n == good["frames"] - 2 * 2  # two chunks of two frames missing
    assert np.array_equal(np.load(out / "frames.npy")[:, :, :n], np.load(tmp_path / "ok" / "frames.npy")[:, :, :n])
    assert not (out / "preview.gif").exists()


# -- ispa run ---------------------------------------------------------------------------------------

def test_ispa_run_takes_snapshot_every_and_resume(art, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["run", str(art), "--backend", "torch"]
    assert ispa([*run, "--chunks", "3", "--snapshot-every", "2", "--out", str(out)]) == 0
    rec = record(out)
    assert rec["status"] == "done" and rec["snapshot_every"] == 2 and rec["chunks_done"] == 3
    assert ispa([*run, "--out", str(out), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert ispa([*run, "--chunks", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--chunks: expected an integer >= 1, found 0" in err
    assert not (tmp_path / "x").exists()


def test_preview_of_a_long_run_is_capped(art, tmp_path, monkeypatch):
    import imageio.v2 as imageio

    monkeypatch.setattr(rt, "PREVIEW_MAX_FRAMES", 5)
    assert main([str(art), "--chunks", "4", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert record(tmp_path / "o")["frames"] > 5
    assert len(imageio.mimread(tmp_path / "o" / "preview.gif")) == 5
