"""Long runs (issue 14): frames on disk as they come, SIGKILL then --resume bit-identical, refusals;
OUT owned by one run at a time, a full disk, an instance of another deployment, several videos on
one deployment.

On the tiny preset exported by `ispa export` (DIR, a deployment, and DIR/instance, its video), run by
`python -m runtimes` on ONNX Runtime.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import runtimes.output as rout
import runtimes.run as rt
from ispa_export.cli import main as ispa
from runtimes.artifact import ArtifactError, load_artifact
from runtimes.deployment import Deployment
from runtimes.files import sha256_file
from runtimes.instance import load_instance
from runtimes.ort import OrtRunner
from runtimes.output import RESERVE_BYTES, claim_out
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


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def another_deployment(art: Path, dst: Path) -> Path:
    """A copy of DEPLOY with another manifest (another build), its instance absorbed into it: the
    same video as far as every tensor goes, but recorded as another deployment's."""
    shutil.copytree(art, dst)
    edit_json(dst / "manifest.json", lambda m: m["versions"].__setitem__("note", "another build"))
    sha = sha256_file(dst / "manifest.json")
    edit_json(dst / "instance" / "instance.json", lambda r: r.__setitem__("deployment_manifest_sha256", sha))
    return dst


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

def test_sigkill_mid_run_keeps_frames_and_resume_is_bit_identical(art, tmp_path, capsys):
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
    # OUT belongs to the live run: a second run on it (this process) is refused in one line naming it,
    # whether it starts afresh or resumes, and the live run goes on.
    for extra in (["--chunks", str(chunks)], ["--resume"]):
        assert main([str(art), *extra, "--out", str(out), "--quiet", "--no-preview"]) == 2
        err = one_line_error(capsys)
        assert f"--out {out}: expected no other run writing it, found one running (pid {p.pid}, " in err, err
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

    r = runtime(str(art), "--out", str(out), "--resume")  # the killed run left no lock behind
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
    # another deployment: same files, another manifest, the video absorbed into it
    other = another_deployment(art, tmp_path / "other")
    refused(other, "run.json: expected a run of")
    # another video of this deployment (another instance)
    inst = tmp_path / "inst"
    shutil.copytree(art / "instance", inst)
    edit_json(inst / "instance.json", lambda r: r.__setitem__("context", "another video"))
    refused(art, "run.json: expected a run of", ("--instance", str(inst)))
    # a snapshot of another deployment and instance, with run.json's checksum made to match it
    path = out / snap["file"]
    save_file(load_file(str(path)), str(path), metadata={"format": "ispa-run-snapshot", "chunks_done": "4",
                                                         "identity": "0" * 64 + ":" + "1" * 64})
    rec = record(out)
    rec["snapshot"]["sha256"] = sha256_file(path)
    (out / "run.json").write_text(json.dumps(rec))
    before = tree(out)
    refused(art, f"{path}: identity: expected a snapshot of {art} with this instance")
    refused(art, f"found one of another ({'0' * 64}:{'1' * 64})")
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
    import runtimes.ort

    bad_chunk = None

    class Poisoned(OrtRunner):
        """The deployment's ONNX Runtime runner, with NaN in one chunk's prediction."""

        def run(self, feeds, info=None):
            out = super().run(feeds, info)
            if info is not None and info.chunk == bad_chunk:
                out = {**out, "prediction": np.full_like(out["prediction"], np.nan)}
            return out

    monkeypatch.setattr(runtimes.ort, "OrtRunner", Poisoned)
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


# -- one deployment, many videos ---------------------------------------------------------------------

CPU = ["CPUExecutionProvider"]


def test_an_instance_of_another_deployment_is_refused_on_every_path(art, tmp_path, capsys):
    """An instance records the manifest of the deployment it was absorbed into: run on another one
    (here: the same graph and weights, another build) it is refused in one line naming both hashes,
    by `python -m runtimes`, by Deployment.start and by `ispa run --backend torch`, OUT untouched."""
    other = another_deployment(art, tmp_path / "other")
    foreign = other / "instance"
    mine, theirs = sha256_file(art / "manifest.json"), sha256_file(other / "manifest.json")
    assert mine != theirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("a previous file")
    before = tree(out)

    p = runtime(str(art), "--instance", str(foreign), "--chunks", "2", "--out", str(out))
    assert p.wait(timeout=120) == 2
    err = p.stderr.read()
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {foreign / 'instance.json'}: deployment_manifest_sha256: "), err
    assert mine in err and theirs in err and "Traceback" not in err
    assert tree(out) == before

    dep = Deployment.open(art, providers=CPU)
    for given in (foreign, load_instance(foreign, load_artifact(other))):  # a directory, or loaded for its own
        with pytest.raises(ArtifactError) as e:
            dep.start(given)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{foreign / 'instance.json'}: deployment_manifest_sha256: ")
        assert mine in msg and theirs in msg

    assert ispa(["run", str(art), "--instance", str(foreign), "--backend", "torch", "--chunks", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deployment_manifest_sha256" in err and mine in err and theirs in err
    assert tree(out) == before
    # On its own deployment the same instance runs.
    assert ispa(["run", str(other), "--backend", "torch", "--chunks", "1", "--out", str(tmp_path / "ok")]) == 0


def test_two_videos_on_one_session_each_equal_their_solo_run(art, tmp_path):
    """Two videos absorbed into one deployment (`ispa absorb`, seeds 0 and 1) on one Deployment: stepped
    interleaved chunk by chunk, and from two threads, each gives exactly its solo run (CPU provider)."""
    second = tmp_path / "second"
    assert ispa(["absorb", str(art), "--seed", "1", "--out", str(second)]) == 0
    instances, n = [art / "instance", second], 4

    def solo(inst: Path) -> np.ndarray:
        video = Deployment.open(art, providers=CPU).start(inst)
        try:
            return np.concatenate([video.step() for _ in range(n)], axis=2)
        finally:
            video.close()

    alone = [solo(inst) for inst in instances]
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    whole = Deployment.open(art, providers=CPU).start(instances[0])  # `chunks`: the whole video, the warmup's first
    assert np.array_equal(np.concatenate(list(whole.chunks(whole.warmup_chunks + n)), axis=2),
                          np.concatenate([whole.instance.state["latents"], alone[0]], axis=2))
    whole.close()

    dep = Deployment.open(art, providers=CPU)
    videos = [dep.start(inst) for inst in instances]
    got: list[list[np.ndarray]] = [[], []]
    for _ in range(n):
        for i, v in enumerate(videos):
            got[i].append(v.step())
    for i in range(2):
        assert np.array_equal(np.concatenate(got[i], axis=2), alone[i]), i
        videos[i].close()

    videos = [dep.start(inst) for inst in instances]
    results: list = [None, None]
    errors: list = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = np.concatenate([videos[i].step() for _ in range(n)], axis=2)
        except BaseException as e:  # reported in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert np.array_equal(results[i], alone[i]), i


# -- OUT: one run at a time -----------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom runtimes.output import claim_out\n"
        "with claim_out(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n")


def test_out_is_owned_by_one_run_at_a_time_and_a_killed_run_leaves_no_lock(art, tmp_path, capsys):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        before = tree(out)
        for extra in (["--chunks", "2"], ["--resume"]):
            assert main([str(art), *extra, "--out", str(out), "--quiet"]) == 2
            err = one_line_error(capsys)
            assert f"--out {out}: expected no other run writing it, found one running (pid {child.pid}, " in err, err
            assert tree(out) == before
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    # The kernel dropped the dead holder's lock: a run on OUT goes.
    assert main([str(art), "--chunks", "2", "--out", str(out), "--quiet", "--no-preview"]) == 0
    assert record(out)["status"] == "done"
    # Within one process too: a second claim of a claimed OUT is refused in one line naming the holder.
    with claim_out(out):
        with pytest.raises(rt.RunError) as e:
            with claim_out(out):
                pass
        assert "\n" not in str(e.value) and f"found one running (pid {os.getpid()}, " in str(e.value)
        assert main([str(art), "--chunks", "2", "--out", str(out), "--quiet"]) == 2
        assert f"found one running (pid {os.getpid()}, " in one_line_error(capsys)
    assert main([str(art), "--chunks", "2", "--out", str(out), "--quiet", "--no-preview"]) == 0


# -- a full disk ------------------------------------------------------------------------------------------

@contextmanager
def tmpfs(path: Path, size: str):
    """A small file system of its own at `path` (tmpfs), unmounted on the way out."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small file system for OUT needs `mount -t tmpfs` as root")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Another writer takes every free byte of `path`'s file system but `leave`."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(path) - leave)
    return filler


def test_a_disk_too_small_for_the_frames_is_refused_before_the_first_chunk(art, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "600k") as disk:
        out = disk / "out"
        # 2,000 chunks of two 4x4x6 float32 frames: 3 MB of frames.npy on a 600 KiB disk.
        assert main([str(art), "--chunks", "2000", "--out", str(out), "--quiet", "--no-preview"]) == 2
        err = one_line_error(capsys)
        assert err.startswith(f"error: --out {out}: expected room for frames.npy (") and "No space left" in err, err
        assert not (out / "frames.npy").exists() and not list(out.glob(".frames.npy.tmp-*"))
        assert not (out / ".run.reserve").exists() and not list(out.glob("snapshot-*"))
        assert free_bytes(disk) >= 600 * 1024 - 16 * 1024  # nothing of the run's size is left allocated


def test_after_a_disk_too_small_refusal_the_same_out_takes_a_run_that_fits(art, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        assert main([str(art), "--chunks", "4000", "--out", str(out), "--quiet", "--no-preview"]) == 2
        assert "expected room for frames.npy" in one_line_error(capsys)
        assert main([str(art), "--chunks", "2", "--out", str(out), "--quiet", "--no-preview"]) == 0, \
            one_line_error(capsys)
        assert record(out)["status"] == "done"


def test_the_up_front_refusal_states_the_room_the_run_needs(art, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "600k") as disk:
        out = disk / "out"
        assert main([str(art), "--chunks", "2", "--out", str(out), "--quiet", "--no-preview"]) == 2
        err = one_line_error(capsys)
        stated = max(int(x.replace(",", "")) for x in re.findall(r"([\d,]+) bytes", err))
        assert stated > free_bytes(disk), err  # the room it says it needs is more than the disk has free


def test_a_disk_that_fills_mid_run_stops_it_in_one_line_and_resume_goes_on(art, tmp_path, capsys, monkeypatch):
    chunks = 12
    ref = tmp_path / "ref"
    assert main([str(art), "--chunks", str(chunks), "--out", str(ref), "--quiet", "--no-preview"]) == 0
    # run.json rewritten at every chunk: the first write after the disk fills is the next chunk's record.
    monkeypatch.setattr(rout, "RECORD_INTERVAL_S", 0.0)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        filler = disk / "filler"

        def another_writer(done: int) -> None:
            if done == 4:  # after the snapshot of chunk 4
                fill(disk)

        real = rt.generate
        monkeypatch.setattr(rt, "generate", lambda args: real(args, on_chunk=another_writer))
        argv = [str(art), "--chunks", str(chunks), "--snapshot-every", "2", "--out", str(out), "--quiet",
                "--no-preview"]
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert err.startswith(f"error: --out {out}: {os.strerror(errno.ENOSPC)}") and "after 5 chunks" in err, err
        assert "free space, then --resume" in err
        rec = record(out)
        assert rec["status"] == "failed" and rec["error"] in err and rec["chunks_done"] == 5
        assert rec["snapshot"]["chunks_done"] == 4 and not (out / ".run.reserve").exists()
        n = rec["frames"]
        assert np.array_equal(np.load(out / "frames.npy")[:, :, :n], np.load(ref / "frames.npy")[:, :, :n])
        monkeypatch.setattr(rt, "generate", real)
        # Still full: --resume is refused up front, the run left as it is.
        before = (out / "run.json").read_bytes()
        assert main([str(art), "--out", str(out), "--resume", "--quiet", "--no-preview"]) == 2
        assert f"--out {out}: expected room to go on" in one_line_error(capsys)
        assert (out / "run.json").read_bytes() == before
        filler.unlink()  # space freed: it goes on to the frames of an uninterrupted run
        assert main([str(art), "--out", str(out), "--resume", "--quiet", "--no-preview"]) == 0
        assert (out / "frames.npy").read_bytes() == (ref / "frames.npy").read_bytes()
        rec = record(out)
        assert rec["status"] == "done" and rec["resumed_from"] == 4 and "error" not in rec


def test_a_snapshot_that_does_not_fit_stops_the_run_in_one_line_and_resume_goes_on(art, tmp_path):
    chunks = 12
    ref = tmp_path / "ref"
    sizes: list[int] = []

    def measure(done: int) -> None:
        sizes.extend(p.stat().st_size for p in ref.glob("snapshot-*"))

    generate(parser().parse_args([str(art), "--chunks", str(chunks), "--snapshot-every", "2", "--out", str(ref),
                                  "--quiet", "--no-preview"]), on_chunk=measure)
    page = 4096
    pages = lambda b: -(-b // page) * page  # noqa: E731
    snap, frames = pages(max(sizes)), pages((ref / "frames.npy").stat().st_size)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        # Room for the reserve, frames.npy, run.json and one snapshot and a half: the first snapshot fits,
        # the second (written before the first is deleted) does not.
        filler = fill(disk, leave=RESERVE_BYTES + frames + 3 * page + snap + snap // 2)
        p = runtime(str(art), "--chunks", str(chunks), "--snapshot-every", "2", "--out", str(out))
        assert p.wait(timeout=120) == 2
        err = p.stderr.read()
        assert err.count("\n") == 1 and err.startswith(f"error: --out {out}: ") and "No space left" in err, err
        rec = record(out)
        assert rec["status"] == "failed" and rec["error"] in err and rec["snapshot"]["chunks_done"] == 2
        n = rec["frames"]
        assert np.array_equal(np.load(out / "frames.npy")[:, :, :n], np.load(ref / "frames.npy")[:, :, :n])
        filler.unlink()
        r = runtime(str(art), "--out", str(out), "--resume")
        assert r.wait(timeout=120) == 0, r.stderr.read()
        assert (out / "frames.npy").read_bytes() == (ref / "frames.npy").read_bytes()
