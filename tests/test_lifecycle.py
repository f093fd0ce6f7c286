"""One build, many videos (DESIGN.md section 11): `ispa build` once, `ispa absorb` per video,
`ispa run DEPLOY --instance`, and the Python API, on the tiny preset.

What a user relies on: one trace for any number of videos; an absorb that never traces and never
writes into the deployment; a video absorbed into a deployment runs what the one-shot export of the
same video runs; several videos on one deployment, interleaved or on threads, each equal to its
solo run; every path refusing an instance of another deployment; bad input as one line, exit 2,
nothing written.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ispa_export.cli import main as ispa
from ispa_export.deployment import Deployment
from runtimes.artifact import ArtifactError

ROOT = Path(__file__).resolve().parents[1]
# Explicit layers and span: build and one-shot export then share the layout by construction; no gate:
# every correction is kept, so the two agree on the corrections too.
COMMON = ["--model", "tiny", "--layers", "1,3", "--window", "2", "--sink", "0", "--warmup-chunks", "6", "--no-gate"]


def digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """`ispa build` (two calibration videos), then three absorbs (three seeds, two contexts), counting
    every torch.onnx.export call in this process."""
    d = tmp_path_factory.mktemp("lifecycle")
    ctx = d / "ctx.safetensors"
    save_file({"context": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(9))}, str(ctx))
    calls = []
    real = torch.onnx.export
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert ispa(["build", *COMMON, "--calibration-seeds", "0,1", "--out", str(d / "deploy")]) == 0
        before = digest(d / "deploy")
        for seed, context in ((3, None), (4, ctx), (5, None)):
            argv = ["absorb", str(d / "deploy"), "--seed", str(seed), "--out", str(d / f"i{seed}")]
            assert ispa(argv + (["--context", str(context)] if context else [])) == 0
    return d, calls, before, ctx


def test_one_trace_for_every_video_and_absorb_writes_nothing_into_the_deployment(lifecycle):
    d, calls, before, _ = lifecycle
    assert len(calls) == 1
    assert digest(d / "deploy") == before
    for seed in (3, 4, 5):
        rec = json.loads((d / f"i{seed}" / "instance.json").read_text())
        assert rec["seed"] == seed and rec["deployment_manifest_sha256"] == hashlib.sha256(
            (d / "deploy" / "manifest.json").read_bytes()).hexdigest()
    # the deployment holds no video
    assert not (d / "deploy" / "instance").exists() and "seed" not in json.loads((d / "deploy" / "manifest.json").read_text())


def test_each_instance_runs_on_the_one_engine(lifecycle, tmp_path):
    d, *_ = lifecycle
    outs = []
    for seed in (3, 4, 5):
        assert ispa(["run", str(d / "deploy"), "--instance", str(d / f"i{seed}"), "--chunks", "2",
                     "--out", str(tmp_path / f"r{seed}")]) == 0
        outs.append(np.load(tmp_path / f"r{seed}" / "frames.npy"))
    assert not np.array_equal(outs[0], outs[2])  # different seeds, different videos


def test_an_absorbed_video_equals_the_one_shot_export_of_it(lifecycle, tmp_path):
    d, *_ = lifecycle
    assert ispa(["export", *COMMON, "--seed", "3", "--out", str(tmp_path / "oneshot")]) == 0
    one = json.loads((tmp_path / "oneshot" / "manifest.json").read_text())
    dep = json.loads((d / "deploy" / "manifest.json").read_text())
    assert one["geometry"]["layout"] == dep["geometry"]["layout"]
    assert one["correction"]["allowed"] == dep["correction"]["allowed"] == [1, 3]
    for backend in ("torch", "ort"):
        a, b = tmp_path / f"a-{backend}", tmp_path / f"b-{backend}"
        assert ispa(["run", str(d / "deploy"), "--instance", str(d / "i3"), "--chunks", "3", "--out", str(a),
                     "--backend", backend, "--device", "cpu"] if backend == "torch" else
                    ["run", str(d / "deploy"), "--instance", str(d / "i3"), "--chunks", "3", "--out", str(a)]) == 0
        assert ispa(["run", str(tmp_path / "oneshot"), "--chunks", "3", "--out", str(b), "--backend", backend]
                    + (["--device", "cpu"] if backend == "torch" else [])) == 0
        fa, fb = np.load(a / "frames.npy"), np.load(b / "frames.npy")
        if backend == "torch":
            assert np.array_equal(fa, fb)
        else:
            np.testing.assert_allclose(fa, fb, atol=1e-5, rtol=0)


def test_api_videos_interleaved_and_threaded_equal_their_solo_runs(lifecycle):
    d, *_ = lifecycle
    dep = Deployment.open(d / "deploy", backend="ort", device="cpu")
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    n = 7

    def solo(seed):
        v = dep.start(ctx, seed)
        out = list(v.chunks(n))
        v.close()
        return out

    ref = {s: solo(s) for s in (11, 12)}
    # the warmup's chunks come first, then the engine's, each chunk_frames long
    v = dep.start(ctx, 11)
    assert v.warmup_chunks < n and all(c.shape[2] == 2 for c in ref[11])
    assert np.array_equal(np.concatenate(ref[11][:v.warmup_chunks], axis=2), v.warmup)
    w = dep.start(ctx, 12)
    got = {11: [], 12: []}
    for _ in range(n):
        got[11] += list(v.chunks(1))
        got[12] += list(w.chunks(1))
    for s in (11, 12):
        assert all(np.array_equal(a, b) for a, b in zip(got[s], ref[s]))
    threads, results = [], {}
    videos = {s: dep.start(ctx, s) for s in (11, 12)}
    for s, video in videos.items():
        threads.append(threading.Thread(target=lambda s=s, video=video: results.__setitem__(s, list(video.chunks(n)))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (11, 12):
        assert all(np.array_equal(a, b) for a, b in zip(results[s], ref[s]))
    assert dep.start(ctx, 11).seconds["solve"] >= 0
    with pytest.raises(ArtifactError, match=r"manifest\.json: decoder: expected the VAE decoder"):
        dep.start(ctx, 11).pixels(1)  # a deployment built without --vae


def test_api_torch_backend_equals_the_cli_run_of_the_written_instance(lifecycle, tmp_path):
    d, *_ = lifecycle
    from graphs.config import preset
    from ispa_export.models import load_context

    dep = Deployment.open(d / "deploy", backend="torch", device="cpu")
    ctx, _ = load_context(None, "tiny", preset("tiny"), 5)  # what `ispa absorb --seed 5` used
    video = dep.start(ctx, 5)
    chunks = list(video.chunks(video.warmup_chunks + 2))
    assert ispa(["run", str(d / "deploy"), "--instance", str(d / "i5"), "--chunks", "2", "--backend", "torch",
                 "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert np.array_equal(np.concatenate(chunks, axis=2), np.load(tmp_path / "r" / "frames.npy"))


def test_every_path_refuses_an_instance_of_another_deployment(lifecycle, tmp_path):
    d, *_ = lifecycle
    other = tmp_path / "other"
    assert ispa(["export", "--model", "tiny", "--kv-reduction", "0.25", "--warmup-chunks", "5", "--out", str(other)]) == 0
    want = "deployment_manifest_sha256: expected"
    for backend in ("ort", "torch"):
        out = tmp_path / f"run-{backend}"
        proc = subprocess.run([sys.executable, "-m", "ispa_export.cli", "run", str(other), "--instance", str(d / "i3"),
                               "--chunks", "1", "--out", str(out), "--backend", backend], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 2 and want in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (out / "frames.npy").exists()
    proc = subprocess.run([sys.executable, "-m", "runtimes", str(d / "deploy"), "--instance", str(other / "instance"),
                           "--chunks", "1", "--out", str(tmp_path / "rt")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and want in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    with pytest.raises(ArtifactError, match=want):
        Deployment.open(other, backend="ort", device="cpu").start(instance=d / "i3")


@pytest.mark.parametrize("case", ["not a deployment", "missing instance", "corrupt instance", "context shape",
                                  "context dtype", "seed", "unwritable"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(lifecycle, tmp_path, case, capsys):
    d, *_ = lifecycle
    out = tmp_path / "out"
    bad = tmp_path / "bad.safetensors"
    argv = ["absorb", str(d / "deploy"), "--seed", "1", "--out", str(out)]
    expect = None
    if case == "not a deployment":
        argv[1], expect = str(tmp_path), "manifest.json"
    elif case == "missing instance":
        argv, expect = ["run", str(d / "deploy"), "--instance", str(tmp_path / "nope"), "--chunks", "1", "--out",
                        str(out)], "instance directory"
    elif case == "corrupt instance":
        broken = tmp_path / "broken"
        broken.mkdir()
        for p in (d / "i3").iterdir():
            (broken / p.name).write_bytes(p.read_bytes())
        data = bytearray((broken / "instance.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (broken / "instance.safetensors").write_bytes(bytes(data))
        argv, expect = ["run", str(d / "deploy"), "--instance", str(broken), "--chunks", "1", "--out", str(out)], "sha256"
    elif case == "context shape":
        save_file({"context": torch.zeros(1, 5, 7)}, str(bad))
        argv += ["--context", str(bad)]
        expect = "field 'context' has shape"
    elif case == "context dtype":
        save_file({"context": torch.zeros(1, 5, 32, dtype=torch.int32)}, str(bad))
        argv += ["--context", str(bad)]
        expect = "field 'context' has dtype int32"
    elif case == "seed":
        argv[3], expect = "x", "argument --seed: invalid int value"
    elif case == "unwritable":
        (tmp_path / "file").write_text("")
        argv[-1], expect = str(tmp_path / "file" / "out"), "--out"
        out = tmp_path / "file" / "out"
    if case == "seed":
        with pytest.raises(SystemExit) as e:
            ispa(argv)
        assert e.value.code == 2
    else:
        assert ispa(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_inspect_predicts_the_build_s_layout(tmp_path, capsys):
    """With the policy's defaults the build keeps the uniform prior unless a challenger beats it on the
    calibration chains; inspect predicts the prior and the build's record says which it kept."""
    assert ispa(["inspect", "tiny", "--kv-reduction", "0.5", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert ispa(["build", "--model", "tiny", "--warmup-chunks", "6", "--calibration-seeds", "0", "--out",
                 str(tmp_path / "d")]) == 0
    built = json.loads((tmp_path / "d" / "manifest.json").read_text())
    if built["calibration"]["selection"] == "prior":
        assert [None if s is None else s for s in built["geometry"]["layout"]] == predicted["spans"]
    else:
        assert built["calibration"]["selection"] == "challenger"
