"""Prompt in, pixels out, end to end (issue 20): `ispa encode` (tiny umT5) -> `ispa export --model
tiny-wan --context --vae` (DiT + the VAE's streaming decoder beside it) -> `python -m runtimes` (decoder
torch-free) and `ispa run --vae` (PyTorch decoder) -> OUT/video.mp4, checked against the PyTorch
whole-video decode of the run's latents; a run SIGKILLed mid-way and resumed; `ispa decode`; bad input.
Tiny random models built offline (tests/text_fixtures.py, tests/vae_fixtures.py)."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

import ispa_export  # noqa: E402
from ispa_export.cli import main  # noqa: E402
from ispa_export.vae import StreamingDecoder, cache_specs, load_vae, unnormalise, weights_sha256  # noqa: E402
from runtimes.artifact import ArtifactError, load_artifact  # noqa: E402
from runtimes.decoder import StreamDecoder  # noqa: E402
from runtimes.errors import RunError  # noqa: E402
from runtimes.files import sha256_file  # noqa: E402
from runtimes.video import Mp4Writer, count_frames, ffmpeg_exe, pixels_to_uint8  # noqa: E402
from text_fixtures import make_tiny_umt5  # noqa: E402
from vae_fixtures import make_tiny_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a cat and a dog baking a cake together in the kitchen"
CHUNKS = 3  # engine chunks of the compared runs
F = 2  # tiny-wan's chunk_frames
ORT_ATOL = 1e-5  # exported decoder (ORT, fp32) vs the PyTorch streaming decode, pixels in [-1, 1] (test_vae's bound)
# The H.264 bound. video.mp4 decoded back to RGB (ffmpeg) against the PyTorch whole-video decode as uint8
# (pixels_to_uint8): every frame above MIN_PSNR_DB. That is what libx264 (CRF 20, yuv420p) gives on the
# tiny random VAE's noise-like 32x48 frames: 27.7 dB min, 28.6 dB mean measured, the same as a one-shot
# encode of the reference frames. So the sharper check: the video equals that one-shot encode of the
# reference, exactly where the pixels are bitwise the reference's (PyTorch decode) and above
# NEAR_PSNR_DB on every frame where ORT's float differences (<= 1e-5) may flip a uint8 rounding.
MIN_PSNR_DB = 26.0
NEAR_PSNR_DB = 40.0


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The whole chain once: the Wan root (vae/, text_encoder/, tokenizer/), the context from `ispa encode`,
    and the deployment from `ispa export --vae` (DIR/instance its one video)."""
    d = tmp_path_factory.mktemp("pixels")
    wan = make_tiny_umt5(make_tiny_vae(d / "wan"))
    ctx = d / "ctx.safetensors"
    assert main(["encode", PROMPT, "--text-encoder", str(wan), "--out", str(ctx)]) == 0
    dep = d / "dep"
    assert main(["export", "--model", "tiny-wan", "--context", str(ctx), "--vae", str(wan), "--kv-reduction", "0.25",
                 "--warmup-chunks", "4", "--out", str(dep)]) == 0
    return {"wan": wan, "ctx": ctx, "dep": dep, "dir": d}


@pytest.fixture(scope="module")
def vae(chain):
    return load_vae(chain["wan"])


def whole_decode_uint8(vae, latents: np.ndarray) -> np.ndarray:
    """The reference: vae.decode of the whole latent video (un-normalised as WanPipeline does), as uint8 RGB."""
    with torch.no_grad():
        pixels = vae.decode(unnormalise(vae, torch.from_numpy(np.ascontiguousarray(latents)))).sample
    return pixels_to_uint8(pixels.numpy())


def read_mp4(path: Path) -> np.ndarray:
    frames = imageio_ffmpeg.read_frames(str(path))
    w, h = next(frames)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in frames])


def assert_plays(path: Path) -> None:
    r = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-500:]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def video_frames(chunks: int) -> int:
    """Pixel frames of `chunks` chunks of F latent frames: 1 + 4(F-1) for the first, 4F for each after."""
    return 0 if chunks == 0 else 1 + 4 * (F - 1) + 4 * F * (chunks - 1)


def one_shot(frames: np.ndarray, path: Path) -> np.ndarray:
    """`frames` encoded in one append by a fresh Mp4Writer, decoded back: what the codec alone makes of them."""
    with Mp4Writer.create(path, frames.shape[2], frames.shape[1], 16) as w:
        w.append(frames)
    return read_mp4(path)


def assert_matches(mp4: np.ndarray, ref: np.ndarray, direct: np.ndarray, exact: bool) -> None:
    """Same frame count; every frame within the H.264 bound of its own reference frame and closer to it
    than to its neighbour (nothing shifted in time); equal to the codec's own encode of the reference
    (`direct`): exactly, or above NEAR_PSNR_DB per frame."""
    assert mp4.shape == ref.shape == direct.shape, (mp4.shape, ref.shape, direct.shape)
    scores = [psnr(a, b) for a, b in zip(mp4, ref)]
    assert min(scores) > MIN_PSNR_DB, min(scores)
    for k in range(1, len(ref)):
        assert psnr(mp4[k], ref[k - 1]) < scores[k] - 3, k
    if exact:
        assert np.array_equal(mp4, direct)
    else:
        near = [psnr(a, b) for a, b in zip(mp4, direct)]
        assert min(near) > NEAR_PSNR_DB, (int(np.argmin(near)), min(near))


def runtimes_cli(*args: str) -> subprocess.Popen:
    """`python -m runtimes ...` in a process where importing torch fails: the decode is torch-free."""
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "from runtimes.run import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, str(ROOT), *args], stderr=subprocess.PIPE, text=True)


def kill_after(p: subprocess.Popen, out: Path, chunks: int) -> None:
    """SIGKILL the run `p` writing `out` at a random moment once run.json counts `chunks` chunks."""
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                done = json.loads((out / "run.json").read_text()).get("chunks_done", 0)
            except (FileNotFoundError, ValueError):
                done = 0
            if done >= chunks:
                break
            assert p.poll() is None and time.monotonic() < deadline, "the run stopped early"
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.3))
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


# -- the chain -------------------------------------------------------------------------------------

def test_export_lists_the_decoder(chain, vae):
    dep = chain["dep"]
    art = load_artifact(dep)  # validates the decoder record against geometry, files and decoder.json
    d = art.manifest["decoder"]
    assert (d["batch"], d["latent_channels"], d["latent_height"], d["latent_width"], d["chunk_frames"]) == \
        (1, 16, 4, 6, F)
    assert (d["height"], d["width"], d["pixel_frames"], d["fps"], d["dtype"]) == \
        (32, 48, {"first": 5, "next": 8}, 16, "float32")
    specs = cache_specs(vae, 1, 4, 6)
    assert [(c["name"], tuple(c["shape"]), c["bytes"]) for c in d["caches"]] == \
        [(s.name, s.shape, s.nbytes(torch.float32)) for s in specs]
    assert d["cache_bytes"] == sum(c["bytes"] for c in d["caches"])
    for name in ("decoder/decoder.json", "decoder/decoder_first.onnx", "decoder/decoder_next.onnx"):
        assert art.manifest["files"][name]["sha256"] == sha256_file(dep / name)
    # the context came from `ispa encode`, and that file is WanPipeline's rule (tests/test_text.py)
    assert json.loads((dep / "instance" / "instance.json").read_text())["context"] == str(chain["ctx"])


def test_runtimes_video_equals_whole_decode(chain, vae):
    """`python -m runtimes` with the exported decoder (torch unimportable): video.mp4 holds the warmup's
    chunks then each engine chunk, playable, and equal within the H.264 bound to the PyTorch whole-video
    decode of frames.npy; before encoding, the exported decoder's pixels follow the PyTorch stream."""
    out = chain["dir"] / "run_ort"
    p = runtimes_cli(str(chain["dep"]), "--chunks", str(CHUNKS), "--out", str(out), "--quiet")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    rec = json.loads((out / "run.json").read_text())
    latents = np.load(out / "frames.npy")
    chunks = latents.shape[2] // F
    assert rec["status"] == "done" and chunks == rec["chunks_from_state"] + CHUNKS
    v = rec["video"]
    assert (v["decoder"], v["fps"], v["width"], v["height"], v["chunks"]) == ("exported", 16, 48, 32, chunks)
    assert v["frames"] == video_frames(chunks) == count_frames(out / "video.mp4")
    assert v["bytes"] == (out / "video.mp4").stat().st_size
    assert_plays(out / "video.mp4")
    reader = imageio_ffmpeg.read_frames(str(out / "video.mp4"))
    assert next(reader)["fps"] == 16
    reader.close()
    ref = whole_decode_uint8(vae, latents)
    assert_matches(read_mp4(out / "video.mp4"), ref, one_shot(ref, chain["dir"] / "ort_direct.mp4"), exact=False)
    # the exported graphs vs PyTorch, chunk by chunk, before any encoding
    ort, ref = StreamDecoder(chain["dep"] / "decoder"), StreamingDecoder(vae)
    for k in range(chunks):
        z = latents[:, :, k * F:(k + 1) * F]
        a, b = ort.decode_chunk(z), ref.decode_chunk(torch.from_numpy(np.ascontiguousarray(z))).numpy()
        assert a.shape == b.shape == (1, 3, 5 if k == 0 else 8, 32, 48)
        np.testing.assert_allclose(a, b, rtol=0, atol=ORT_ATOL)


def test_ispa_run_vae_and_ispa_decode(chain, vae, capsys):
    """`ispa run --vae` (the PyTorch streaming decode) writes the same latents as the torch-free run and a
    video equal to the whole-video decode; `ispa decode` of its frames.npy, in other chunk sizes, gives
    the very same frames (PyTorch's streamed pixels are bitwise the whole decode's)."""
    out = chain["dir"] / "run_torch"
    assert main(["run", str(chain["dep"]), "--chunks", str(CHUNKS), "--vae", str(chain["wan"]), "--out", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["video"]["decoder"] == "torch" and rec["video"]["source"] == str(chain["wan"].resolve())
    latents = np.load(out / "frames.npy")
    chunks = latents.shape[2] // F
    assert rec["video"]["frames"] == video_frames(chunks) == count_frames(out / "video.mp4")
    assert_plays(out / "video.mp4")
    mp4 = read_mp4(out / "video.mp4")
    ref = whole_decode_uint8(vae, latents)
    assert_matches(mp4, ref, one_shot(ref, chain["dir"] / "torch_direct.mp4"), exact=True)
    if (chain["dir"] / "run_ort" / "frames.npy").exists():
        assert np.array_equal(latents, np.load(chain["dir"] / "run_ort" / "frames.npy"))
    decoded = chain["dir"] / "sub" / "decoded.mp4"
    assert main(["decode", str(out / "frames.npy"), "--vae", str(chain["wan"]), "--out", str(decoded),
                 "--chunk-frames", "3"]) == 0
    assert count_frames(decoded) == video_frames(chunks)
    assert_plays(decoded)
    assert np.array_equal(read_mp4(decoded), mp4)
    assert not [p for p in decoded.parent.iterdir() if p.name != "decoded.mp4"]  # no temporary left


def test_no_video(chain):
    out = chain["dir"] / "run_plain"
    p = runtimes_cli(str(chain["dep"]), "--chunks", "1", "--out", str(out), "--quiet", "--no-video")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert json.loads((out / "run.json").read_text())["video"] is None
    assert not (out / "video.mp4").exists() and (out / "preview.gif").exists()


def test_python_api_pixels_per_video_interleaved_and_threaded(chain):
    """`Video.pixels`: each video decoded by the deployment's exported decoder with caches of its own (the
    sessions shared), equal to the stream decode of that video's latents taken alone, interleaved or in
    threads; a video's chunks go one way, latents or pixels."""
    dep = ispa_export.Deployment.open(chain["dep"], backend="ort", device="cpu")
    ctx, n = dep.default_context(), 5

    def solo(seed):
        video = dep.start(ctx, seed)
        latents = list(video.chunks(n))
        video.close()
        ref = StreamDecoder(chain["dep"] / "decoder")
        return [ref.decode_chunk(z) for z in latents]

    ref = {s: solo(s) for s in (3, 4)}
    assert [p.shape[2] for p in ref[3]] == [5] + [8] * (n - 1)
    videos = {s: dep.start(ctx, s) for s in (3, 4)}
    got = {s: [] for s in videos}
    for _ in range(n):
        for s, video in videos.items():
            got[s] += list(video.pixels(1))
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, list(dep.start(ctx, s).pixels(n))))
               for s in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (3, 4):
        for run in (got[s], results[s]):
            assert len(run) == n and all(np.array_equal(a, b) for a, b in zip(run, ref[s]))
    with pytest.raises(RunError, match="Video.chunks: this video yields pixels"):
        videos[3].chunks(1)
    taken = dep.start(ctx, 5)
    next(taken.chunks(1))
    with pytest.raises(RunError, match="Video.pixels: expected a video whose chunks have not been taken"):
        taken.pixels(1)


# -- kill and resume --------------------------------------------------------------------------------

def test_sigkill_leaves_a_playable_video_and_resume_finishes_it(chain, vae):
    """SIGKILL at a random point of a run: video.mp4 plays and holds at least every chunk run.json counts;
    --resume (torch-free again) cuts it back to the snapshot, restores the decoder's caches and finishes
    with the right frame count, every frame the stream decode of its latents."""
    total, every = 40, 3
    out = chain["dir"] / "run_kill"
    kill_after(runtimes_cli(str(chain["dep"]), "--chunks", str(total), "--snapshot-every", str(every), "--out",
                            str(out), "--quiet"), out, 2 * every + 1)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "running" and rec["chunks_done"] < total, "killed too late to test anything"
    v, first = rec["video"], rec["chunks_from_state"]
    assert v["chunks"] == first + rec["chunks_done"] and v["frames"] == video_frames(v["chunks"])
    assert_plays(out / "video.mp4")
    assert count_frames(out / "video.mp4") >= v["frames"]
    snap = rec["snapshot"]
    assert snap["video"]["frames"] == video_frames(first + snap["chunks_done"])

    r = runtimes_cli(str(chain["dep"]), "--resume", "--out", str(out), "--quiet")
    assert r.wait(timeout=300) == 0, r.stderr.read()
    rec = json.loads((out / "run.json").read_text())
    chunks = first + total
    assert rec["status"] == "done" and rec["video"]["chunks"] == chunks
    assert rec["video"]["frames"] == video_frames(chunks) == count_frames(out / "video.mp4")
    assert_plays(out / "video.mp4")
    # The reference: one uninterrupted stream decode of the run's latents (ORT; test_runtimes_video... ties it
    # to PyTorch), as uint8. The video is the first encoder's frames up to the snapshot, then the resumed
    # encoder's from there (it starts with a keyframe): the codec's encode of those two spans of the
    # reference, which the frames after the snapshot match only if the decoder's caches were restored.
    latents = np.load(out / "frames.npy")
    dec = StreamDecoder(chain["dep"] / "decoder")
    ref = np.concatenate([pixels_to_uint8(dec.decode_chunk(latents[:, :, k * F:(k + 1) * F])) for k in range(chunks)])
    cut = snap["video"]["frames"]
    direct = np.concatenate([one_shot(ref[:cut], out.parent / "kill_a.mp4"),
                             one_shot(ref[cut:], out.parent / "kill_b.mp4")])
    assert_matches(read_mp4(out / "video.mp4"), ref, direct, exact=False)


def test_resume_keeps_the_decoder_the_run_began_with(chain, tmp_path, capsys):
    """A run killed mid-way and resumed with another VAE
    of the same shape, or with the exported decoder instead of --vae, would go on with caches and frames
    of another decoder: refused in one line naming the field, OUT untouched."""
    out = tmp_path / "run"
    code = "import sys; from ispa_export.cli import main; sys.exit(main(sys.argv[1:]))"
    kill_after(subprocess.Popen([sys.executable, "-c", code, "run", str(chain["dep"]), "--chunks", "200",
                                 "--snapshot-every", "1", "--vae", str(chain["wan"]), "--out", str(out)],
                                cwd=ROOT, stderr=subprocess.DEVNULL), out, 2)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "running" and rec["video"]["weights_sha256"] == weights_sha256(chain["wan"])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    other = make_tiny_vae(tmp_path / "other", seed=1)  # same config, other weights
    err = _one_line_exit_2(["run", str(chain["dep"]), "--resume", "--vae", str(other), "--out", str(out)], capsys,
                           f"{out / 'run.json'}: video.weights_sha256: expected {weights_sha256(chain['wan'])}",
                           f"found {weights_sha256(other)}")
    assert str(chain["wan"].resolve()) in err
    _one_line_exit_2(["run", str(chain["dep"]), "--resume", "--out", str(out)], capsys,
                     f"{out / 'run.json'}: video.decoder: expected 'torch'")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


# -- refusals ---------------------------------------------------------------------------------------

def _one_line_exit_2(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"ispa {argv[0]}: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("case", ["vae_z_dim_export", "vae_z_dim_build", "vae_z_dim_run", "vae_z_dim_decode", "text_dim",
                                  "empty_prompt",
                                  "empty_prompt_export", "no_tokenizer", "unwritable_encode", "unwritable_decode",
                                  "out_is_dir_decode"])
def test_bad_input_is_one_line_exit_2_nothing_written(chain, tmp_path, capsys, case):
    wan, dep = chain["wan"], chain["dep"]
    vae_cfg = wan / "vae" / "config.json"
    inputs = tmp_path / "inputs"  # what a case reads, made before the listing that nothing may change
    frames = inputs / "frames.npy"
    inputs.mkdir()
    np.save(frames, np.zeros((1, 16, 3, 4, 6), np.float32))
    if case in ("vae_z_dim_run", "vae_z_dim_decode"):
        other = make_tiny_vae(inputs / "wan8", z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
        other_cfg = other / "vae" / "config.json"
    if case == "text_dim":
        wide = make_tiny_umt5(inputs / "umt5_64", d_model=64)
    if case == "no_tokenizer":
        no_tok = inputs / "no_tok"
        shutil.copytree(wan / "text_encoder", no_tok / "text_encoder")
    if case.startswith("unwritable"):
        (inputs / "file").write_text("")
    out = tmp_path / "out"
    if case == "out_is_dir_decode":
        out.mkdir()
    before = sorted(tmp_path.rglob("*"))
    if case == "vae_z_dim_export":  # the tiny preset makes 4-channel latents
        _one_line_exit_2(["export", "--model", "tiny", "--vae", str(wan), "--out", str(out)], capsys,
                         f"{vae_cfg}: z_dim: expected 4 (the DiT's in_dim), found 16")
    elif case == "vae_z_dim_build":
        _one_line_exit_2(["build", "--model", "tiny", "--vae", str(wan), "--out", str(out)], capsys,
                         f"{vae_cfg}: z_dim: expected 4 (the DiT's in_dim), found 16")
    elif case == "vae_z_dim_run":
        _one_line_exit_2(["run", str(dep), "--chunks", "1", "--vae", str(other), "--out", str(out)], capsys,
                         f"{other_cfg}: z_dim: expected 16", "found 8")
    elif case == "vae_z_dim_decode":
        _one_line_exit_2(["decode", str(frames), "--vae", str(other), "--out", str(out / "v.mp4")], capsys,
                         f"{other_cfg}: z_dim: expected 16 (the latent channels of {frames}), found 8")
    elif case == "text_dim":
        _one_line_exit_2(["export", "--model", "tiny-wan", "--prompt", "a cat", "--text-encoder", str(wide),
                          "--out", str(out)], capsys,
                         f"{wide / 'text_encoder' / 'config.json'}: d_model: expected 32 (the DiT's text_dim), "
                         "found 64")
    elif case == "empty_prompt":
        _one_line_exit_2(["encode", " \t ", "--text-encoder", str(wan), "--out", str(out)], capsys, "prompt: empty")
    elif case == "empty_prompt_export":
        _one_line_exit_2(["export", "--model", "tiny-wan", "--prompt", "", "--text-encoder", str(wan),
                          "--out", str(out)], capsys, "--prompt: empty")
    elif case == "no_tokenizer":
        _one_line_exit_2(["encode", "a cat", "--text-encoder", str(no_tok), "--out", str(out)], capsys,
                         str(no_tok / "tokenizer"), "no tokenizer found")
    elif case == "unwritable_encode":
        target = inputs / "file" / "ctx.safetensors"
        _one_line_exit_2(["encode", "a cat", "--text-encoder", str(wan), "--out", str(target)], capsys,
                         str(target), "not a directory")
    elif case == "unwritable_decode":
        target = inputs / "file" / "v.mp4"
        _one_line_exit_2(["decode", str(frames), "--vae", str(wan), "--out", str(target)], capsys,
                         f"--out {target}", "not a directory")
    elif case == "out_is_dir_decode":
        _one_line_exit_2(["decode", str(frames), "--vae", str(wan), "--out", str(out)], capsys,
                         f"--out {out}: is a directory")
    else:
        raise AssertionError(case)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a temporary


def test_manifest_decoder_record_is_checked(chain, tmp_path):
    """A decoder record that disagrees with the DiT, with itself or with decoder.json: one line naming the field."""
    cases = {
        "decoder.chunk_frames": lambda d: d.update(chunk_frames=3),
        "decoder.latent_channels": lambda d: d.update(latent_channels=4),
        "decoder.pixel_frames.next": lambda d: d["pixel_frames"].update(next=9),
        "decoder.caches['cache_03'].bytes": lambda d: d["caches"][3].update(bytes=d["caches"][3]["bytes"] + 1),
        "decoder.cache_bytes": lambda d: d.update(cache_bytes=d["cache_bytes"] - 4),
        "decoder.graphs.next": lambda d: d["graphs"].update(next="decoder/missing.onnx"),
    }
    for field, edit in cases.items():
        copy = tmp_path / field.replace("'", "").replace("[", "_").replace("]", "")
        shutil.copytree(chain["dep"], copy, ignore=shutil.ignore_patterns("instance"))
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest["decoder"])
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError) as e:
            load_artifact(copy, verify_checksums=False, check_onnx=False)
        msg = str(e.value)
        assert "\n" not in msg and f"{copy / 'manifest.json'}: {field}: expected" in msg, msg
    # decoder.json changed beside its graphs (and its sha256 in files updated to match): the caches disagree
    copy = tmp_path / "record"
    shutil.copytree(chain["dep"], copy, ignore=shutil.ignore_patterns("instance"))
    record = json.loads((copy / "decoder" / "decoder.json").read_text())
    record["caches"][0]["shape"][1] += 1
    (copy / "decoder" / "decoder.json").write_text(json.dumps(record))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["decoder/decoder.json"] = {"sha256": sha256_file(copy / "decoder" / "decoder.json"),
                                                 "bytes": (copy / "decoder" / "decoder.json").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"decoder\.json: caches: expected"):
        load_artifact(copy, check_onnx=False)
