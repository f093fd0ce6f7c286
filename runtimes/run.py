"""`python -m runtimes DEPLOY --instance INSTANCE --chunks N --out OUTDIR`: continue a video on ONNX Runtime
or TensorRT.

Opens the deployment (runtimes.deployment), starts the video from its instance (the handoff of
`ispa absorb`) and generates N more chunks into OUTDIR (runtimes.output): frames.npy (every latent
frame, the warmup's and the new ones) gets each chunk as it is made, run.json says how many are
done, a snapshot every --snapshot-every chunks lets --resume go on after a crash, and preview.gif is
made at the end. One run owns OUTDIR at a time. Torch-free.

Video: where the deployment has an exported VAE decoder (`ispa build/export --vae`, manifest
`decoder`), each chunk is decoded torch-free (runtimes.decoder, its caches carried from chunk to
chunk) and appended to OUTDIR/video.mp4 (runtimes.video: H.264, 16 fps) in the same loop that
writes frames.npy: the instance's warmup latents first, as the video's first chunks, then each
new chunk. `generate(decoder=...)` takes another decoder with the same interface (`ispa run --vae`
passes PyTorch's); `--no-video` skips it. Snapshots hold the decoder's caches and the mp4's
committed length, so --resume cuts video.mp4 back to the snapshot and goes on.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifact import WAN_FPS, ArtifactError
from .decoder import RECORD
from .deployment import BACKENDS, BackendError, Deployment, Video
from .errors import RunError
from .files import atomic_path, sha256_file
from .instance import load_instance
from .output import DECODER_PREFIX, FRAMES, VIDEO, VIDEO_KEYS, RunDir, check_out, claim_out
from .snapshot import load_snapshot

PREVIEW_MIN_PX = 128
# A preview of a long run is a time-lapse: frames spread evenly, so the GIF stays a few MB.
PREVIEW_MAX_FRAMES = 240


# -- outputs ------------------------------------------------------------------------------------

def preview_frames(latents: np.ndarray, min_px: int = PREVIEW_MIN_PX) -> np.ndarray:
    """[B, C, T, H, W] latents -> uint8 RGB frames [T, H', W'*B, 3]: channels 0-2 (repeated when fewer),
    each video stretched to 0..255 by its own min/max, scaled up by an integer factor to >= min_px,
    the batch side by side."""
    b, c, t, h, w = latents.shape
    rgb = latents[:, [min(i, c - 1) for i in range(3)]].astype(np.float32)  # [B, 3, T, H, W]
    lo = rgb.min(axis=(1, 2, 3, 4), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3, 4), keepdims=True)
    img = np.round(255.0 * (rgb - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)
    k = max(1, math.ceil(min_px / min(h, w)))
    img = img.repeat(k, axis=3).repeat(k, axis=4)  # nearest neighbour: latents are blocky by nature
    return np.ascontiguousarray(img.transpose(2, 3, 0, 4, 1).reshape(t, h * k, b * w * k, 3))


def write_preview(path: Path, latents: np.ndarray, fps: float = 8.0) -> bool:
    """Writes an animated GIF when imageio is importable; returns whether it did."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        return False
    frames = preview_frames(latents)
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    return True


class _Progress:
    """One line per chunk on a terminal (rewritten in place); elsewhere (logs) at most one a second."""

    def __init__(self, total: int, start: int = 0, stream=None, every_s: float = 1.0):
        stream = stream if stream is not None else sys.stderr
        self.total, self.start, self.done, self.t0, self.out = total, start, start, time.perf_counter(), stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every_s, self.last = every_s, -math.inf

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.tty and self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        line = f"chunk {self.done}/{self.total}  {(now - self.t0) / (self.done - self.start):.3f} s/chunk"
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(line, end=end, file=self.out, flush=True)


# -- video --------------------------------------------------------------------------------------

@dataclass
class VideoDecoder:
    """A stream decoder for video.mp4 and what run.json records of it.

    `decoder` has `decode_chunk(latents [B, z, f, h, w]) -> float32 pixels [B, 3, T, H, W]` in
    [-1, 1] (T = 1 + 4(f-1) for the video's first chunk, 4f after), `state()` -> arrays and
    `load_state(arrays)`: runtimes.decoder.StreamDecoder, or ispa_export.vae.TorchVideoDecoder."""

    decoder: Any
    kind: str  # "exported" (DEPLOY's graphs, runtimes.decoder) or "torch" (ispa run --vae)
    source: str  # where its weights are, for run.json
    weights: str  # sha256 of what decodes (the VAE's files, or the exported decoder's record): --resume checks it
    width: int  # the mp4's frames: the batch's videos side by side
    height: int
    fps: float = WAN_FPS

    def record(self) -> dict[str, Any]:
        return {"file": VIDEO, "decoder": self.kind, "source": self.source, "weights_sha256": self.weights,
                "fps": self.fps, "width": self.width, "height": self.height, "bytes": 0, "frames": 0, "chunks": 0}


def exported_decoder(deployment: Deployment) -> VideoDecoder | None:
    """The deployment's exported decoder (Deployment.decoder), or None when it has none."""
    d = deployment.artifact.decoder
    if d is None:
        return None
    directory = deployment.artifact.decoder_dir
    return VideoDecoder(deployment.decoder(), "exported", str(directory.resolve()), sha256_file(directory / RECORD),
                        d["width"] * d["batch"], d["height"], d.get("fps", WAN_FPS))


def _video_decoder(args: argparse.Namespace, deployment: Deployment, given: VideoDecoder | None,
                   prior: dict[str, Any] | None) -> VideoDecoder | None:
    """The decoder of this run: the one given (--vae), else the deployment's exported one, unless
    --no-video; a resumed run keeps the kind it began with."""
    no_video = getattr(args, "no_video", False)
    if given is not None and no_video:
        raise RunError("--no-video: expected no decoder, found one given (--vae); leave one of them out")
    if not args.resume:
        return given if given is not None else (None if no_video else exported_decoder(deployment))
    began = (prior or {}).get("video")
    record = Path(args.out) / "run.json"
    if began is None:
        if given is not None:
            raise RunError(f"{record}: video: expected a run with a video to continue with --vae, found one that "
                           f"began without (resume it without --vae)")
        return None
    if no_video:
        raise RunError(f"{record}: video: the run began writing {VIDEO} ({began.get('decoder')} decoder); resume it "
                       f"with its decoder, without --no-video")
    dec = given if given is not None else exported_decoder(deployment)
    kind = None if dec is None else dec.kind
    if kind != began.get("decoder"):
        want = "--vae DIR (PyTorch)" if began.get("decoder") == "torch" else \
            f"the exported decoder of {deployment.artifact.directory}"
        raise RunError(f"{record}: video.decoder: expected {began.get('decoder')!r}: resume with {want}, as the run "
                       f"began; found {kind!r}")
    if "weights_sha256" in began and began["weights_sha256"] != dec.weights:  # runs before it was recorded: unchecked
        raise RunError(f"{record}: video.weights_sha256: expected {began.get('weights_sha256')} (the decoder the run "
                       f"began with, {began.get('source')}), found {dec.weights} ({dec.source})")
    return dec


def _split_snapshot(snap: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                          dict[str, int] | None]:
    """(the stream's arrays, the decoder's, the mp4's committed point) of a snapshot."""
    stream = {k: v for k, v in snap.items() if not k.startswith(DECODER_PREFIX) and k not in VIDEO_KEYS}
    decoder = {k[len(DECODER_PREFIX):]: v for k, v in snap.items() if k.startswith(DECODER_PREFIX)}
    video = {k.split(".", 1)[1]: int(snap[k]) for k in VIDEO_KEYS if k in snap} or None
    return stream, decoder, video


# -- entry point --------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtimes",
        description="Continue a video on its deployment (ONNX Runtime or TensorRT) from its instance.")
    p.add_argument("deployment", metavar="DEPLOY",
                   help="deployment directory (manifest.json, model.onnx) from `ispa build` or `ispa export`")
    p.add_argument("--instance", metavar="INSTANCE", default=None,
                   help="the video's instance from `ispa absorb` (default: DEPLOY/instance, what `ispa export` leaves)")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="chunks to generate (>= 1); with --resume, the run's own count when left out")
    p.add_argument("--out", required=True, metavar="OUTDIR",
                   help="where frames.npy (written as chunks come), run.json, snapshots and preview.gif go")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="store the stream state every N chunks, so --resume can go on from there (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTDIR from its last snapshot; the frames come out bit-identical "
                        "to an uninterrupted run on the same backend")
    p.add_argument("--backend", choices=BACKENDS, default="ort", help="ort: ONNX Runtime (default); trt: TensorRT")
    p.add_argument("--providers", default=None,
                   help="ort: comma-separated execution providers (default: TensorRT, CUDA, CPU as available)")
    p.add_argument("--threads", type=int, default=None, help="ort: intra-op threads")
    p.add_argument("--engine", default=None, help="trt: engine file (default: the one listed in the manifest)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip sha256 checks of the deployment's and the instance's files (sizes still checked)")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.gif")
    p.add_argument("--no-video", action="store_true",
                   help="do not decode the chunks into video.mp4 (default: decode them when DEPLOY has a decoder)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def instance_dir(args: argparse.Namespace, deployment: Deployment) -> Path:
    if args.instance:
        return Path(args.instance)
    found = deployment.artifact.default_instance
    if found is None:
        raise RunError(f"--instance: expected the video's instance (`ispa absorb {deployment.artifact.directory} "
                       f"--seed N --out INSTANCE`), found none given and no {deployment.artifact.directory / 'instance'}")
    return found


def _check_counts(args: argparse.Namespace) -> None:
    if args.chunks is None and not args.resume:
        raise RunError("--chunks: expected the number of chunks to generate (>= 1), found none")
    if args.chunks is not None and args.chunks < 1:
        raise RunError(f"--chunks: expected an integer >= 1, found {args.chunks}")
    if args.snapshot_every < 0:
        raise RunError(f"--snapshot-every: expected an integer >= 0 (0: no snapshots), found {args.snapshot_every}")


def _resume_point(args: argparse.Namespace, prior: dict[str, Any], deployment: Deployment, instance_sha: str,
                  out: Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """(chunks requested, chunks done at the snapshot, snapshot arrays) of the run in `out`."""
    record = out / "run.json"
    identity = deployment.identity
    if prior.get("deployment_manifest_sha256") != identity or prior.get("instance_sha256") != instance_sha:
        raise RunError(f"{record}: expected a run of {deployment.artifact.directory} with this instance (manifest "
                       f"sha256 {identity}, instance sha256 {instance_sha}), found one of another (deployment "
                       f"{prior.get('deployment_manifest_sha256')}, instance {prior.get('instance_sha256')})")
    total = prior.get("chunks_requested")
    if not isinstance(total, int) or total < 1:
        raise RunError(f"{record}: chunks_requested: expected an integer >= 1, found {total!r}")
    if args.chunks is not None and args.chunks != total:
        raise RunError(f"--chunks: expected {total} (the run in {out}; its frames.npy is sized for it), "
                       f"found {args.chunks}")
    snap = prior["snapshot"]
    arrays = load_snapshot(out, snap, identity + ":" + instance_sha, deployment.artifact.directory)
    return total, int(snap["chunks_done"]), arrays


def _restore(video: Video, snap: dict[str, np.ndarray], path: Path, chunk: int) -> None:
    """Puts the video where the snapshot at `path` left it (the instance supplies the fixed parts)."""
    try:
        video.restore(snap)
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path}: expected the state of this video's stream, found "
                       f"{' '.join(str(e).split())[:200]}") from None
    if video.stream.chunk != chunk:
        raise RunError(f"{path}: chunk: expected {chunk} (the instance's chunk + chunks done), found {video.stream.chunk}")


@dataclass
class _Timing:
    step: float = 0.0  # the DiT's chunks
    decode: float = 0.0  # the decoder's chunks (the warmup's included)
    decoded: int = 0


def _decode(dec: VideoDecoder, rundir: RunDir, latents: np.ndarray, chunk: int, frame: int,
            timing: _Timing) -> np.ndarray:
    t0 = time.perf_counter()
    try:
        pixels = dec.decoder.decode_chunk(latents)
    except Exception as e:  # onnxruntime's, TensorRT's or PyTorch's own error types
        rundir.fail_chunk(chunk, frame, f"{dec.kind} decoder failed: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}")
    timing.decode += time.perf_counter() - t0
    timing.decoded += 1
    return pixels


def _stream_chunks(video: Video, rundir: RunDir, args: argparse.Namespace, done: int, total: int, identity: str,
                   on_chunk: Callable[[int], None] | None, dec: VideoDecoder | None = None,
                   warmup: np.ndarray | None = None, timing: _Timing | None = None) -> float:
    """Chunks done..total-1, each stored as it comes (with `dec`: decoded into video.mp4 too, after
    the `warmup` latents of a new run); returns the seconds they took."""
    stream = video.stream
    f = stream.geo.chunk_frames
    timing = timing if timing is not None else _Timing()
    progress = None if args.quiet else _Progress(total, start=done)
    t0 = time.perf_counter()
    try:
        if dec is not None and warmup is not None:  # the video's first chunks: the instance's warmup
            first = video.first_chunk - warmup.shape[2] // f
            for k in range(warmup.shape[2] // f):
                rundir.add_video(_decode(dec, rundir, warmup[:, :, k * f:(k + 1) * f], first + k, k * f, timing))
            rundir.flush()
        for i in range(done, total):
            t1 = time.perf_counter()
            try:
                x0 = video.step()
            except Exception as e:  # the engine's own error types (onnxruntime Fail, TensorRT, ...)
                rundir.fail_chunk(stream.chunk, stream.frame_index, f"{args.backend} runner failed: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            timing.step += time.perf_counter() - t1
            # One pass over a chunk's latents on the host: cheap next to the chunk's four graph runs.
            if not np.isfinite(x0).all():
                bad = int(x0.size - np.count_nonzero(np.isfinite(x0)))
                rundir.fail_chunk(stream.chunk - 1, stream.frame_index - f, f"expected a finite prediction, found "
                                  f"{bad} of {x0.size} values NaN or inf")
            pixels = None if dec is None else _decode(dec, rundir, x0, stream.chunk - 1, stream.frame_index - f, timing)
            rundir.add_chunk(i, x0, pixels)
            if args.snapshot_every and (i + 1) % args.snapshot_every == 0 and i + 1 < total:
                arrays = video.state()
                if dec is not None:
                    arrays.update({DECODER_PREFIX + k: v for k, v in dec.decoder.state().items()})
                rundir.snapshot(arrays, identity)
            if progress is not None:
                progress(1)
            if on_chunk is not None:
                on_chunk(i + 1)
    except OSError as e:
        rundir.fail_io(e)  # a full disk, a vanished directory: one line, run.json says so, frames kept
    except BaseException:
        rundir.close_video(abort=True)  # every committed fragment stays; the encoder goes
        rundir.flush()  # run.json counts every chunk on disk, whatever stopped the loop (Ctrl-C)
        raise
    return time.perf_counter() - t0


def generate(args: argparse.Namespace, deployment: Deployment | None = None, constants=None,
             on_chunk: Callable[[int], None] | None = None, decoder: VideoDecoder | None = None) -> dict[str, Any]:
    """Continue a video into args.out, or resume the run there (args.resume).

    `deployment` is an opened one (the PyTorch backend's, from ispa_export, or one shared by several
    runs); `constants` the instance's modulation in the form its runner takes; `on_chunk(chunks_done)`
    is called after each chunk is stored (benchmarks); `decoder` decodes the chunks into video.mp4
    (default: the deployment's exported decoder, if any, unless args.no_video). Refusals are
    RunError/ArtifactError/BackendError, raised before anything in args.out is touched; a non-finite
    chunk is a RunError raised after run.json records the chunks before it."""
    _check_counts(args)
    out = Path(args.out)
    prior = check_out(out, args.resume)
    if args.resume and prior.get("status") == "done":
        if not args.quiet:
            print(f"note: {out} holds a finished run ({prior.get('chunks_done')} chunks); nothing to resume",
                  file=sys.stderr)
        return prior
    if deployment is None:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        deployment = Deployment.open(args.deployment, args.backend, providers=providers, threads=args.threads,
                                     engine=args.engine, verify_checksums=not args.no_verify)
    instance = load_instance(instance_dir(args, deployment), deployment.artifact, verify_checksums=not args.no_verify)
    instance_sha = instance.sha256
    dec = _video_decoder(args, deployment, decoder, prior)
    if dec is not None:
        from .video import ffmpeg_exe

        ffmpeg_exe()  # a missing encoder is refused before OUT is touched
        _check_decoder_fits(dec, deployment, instance.state["latents"])
    identity = deployment.identity + ":" + instance_sha
    with claim_out(out):
        prior = check_out(out, args.resume, claimed=True)  # again, now that this run owns OUT
        total, done, snap = (_resume_point(args, prior, deployment, instance_sha, out) if args.resume
                             else (args.chunks, 0, None))
        snap_decoder, snap_video = {}, None
        if snap is not None:
            snap, snap_decoder, snap_video = _split_snapshot(snap)
            if dec is not None and (snap_video is None or not snap_decoder):
                raise RunError(f"{out / prior['snapshot']['file']}: expected the decoder's caches and {VIDEO}'s "
                               f"length (the run writes a video), found none")
        video = deployment.start(instance, constants=constants)
        timing = _Timing()
        try:
            start_chunk = video.first_chunk
            if snap is not None:
                _restore(video, snap, out / prior["snapshot"]["file"], start_chunk + done)
                if dec is not None:
                    try:
                        dec.decoder.load_state(snap_decoder)
                    except (KeyError, TypeError, ValueError) as e:
                        raise RunError(f"{out / prior['snapshot']['file']}: expected the state of this run's "
                                       f"decoder, found {' '.join(str(e).split())[:200]}") from None
            state_frames = instance.state["latents"]
            geo = deployment.artifact.geometry
            b, c, f, h, w = geo.chunk_shape
            shape = (b, c, state_frames.shape[2] + total * f, h, w)
            record = {
                "deployment": str(Path(deployment.artifact.directory).resolve()),
                "deployment_manifest_sha256": deployment.identity,
                "instance": str(instance.directory.resolve()), "instance_sha256": instance_sha,
                "seed": instance.seed,
                "backend": deployment.backend,
                "providers": list(getattr(deployment.engine, "providers", []) or []),
                "chunks_from_state": start_chunk,
                "chunks_requested": total,
                "snapshot_every": args.snapshot_every,
                "frames_shape": list(shape),
                "frames_file": FRAMES,
            }
            if args.resume:
                # run.json counts the video only up to the snapshot before the file is cut back there
                record["video"] = None if prior.get("video") is None else {**prior["video"], **(snap_video or {})}
                rundir = RunDir.resume(out, {**prior, **record, "resumed_from": done}, shape, done, f)
            else:
                record["video"] = None if dec is None else dec.record()
                rundir = RunDir.start(out, record, shape, state_frames, f)
            if dec is not None:
                try:
                    rundir.open_video(snap_video)
                except OSError as e:
                    rundir.fail_io(e)
                except RunError as e:  # VideoError: the file to resume is not what the snapshot says
                    rundir.fail(str(e))
            seconds = _stream_chunks(video, rundir, args, done, total, identity, on_chunk, dec,
                                     None if args.resume else state_frames, timing)
        finally:
            video.close()
            if dec is not None and hasattr(dec.decoder, "close"):
                dec.decoder.close()  # TensorRT's device buffers now, not at garbage collection
        made = total - done
        extra = {"chunks_generated": total, "seconds": round(seconds, 6),
                 "seconds_per_chunk": round(seconds / made, 6) if made else None,
                 "step_seconds_per_chunk": round(timing.step / made, 6) if made else None}
        if dec is not None:
            rundir.record["video"].update(
                decode_seconds_per_chunk=round(timing.decode / timing.decoded, 6) if timing.decoded else None,
                append_seconds_per_chunk=round(rundir.append_seconds / timing.decoded, 6) if timing.decoded else None)
        try:
            rundir.finish(extra, None if args.no_preview else write_preview, PREVIEW_MAX_FRAMES)
        except OSError as e:
            rundir.fail_io(e)
    if not args.no_preview and not rundir.record["preview"]:
        print("note: imageio is not importable; preview.gif not written", file=sys.stderr)
    return rundir.record


def _check_decoder_fits(dec: VideoDecoder, deployment: Deployment, warmup: np.ndarray) -> None:
    """The warmup decodes in the DiT's chunks: its frames must be a whole number of them."""
    f = deployment.artifact.geometry.chunk_frames
    if warmup.shape[2] % f:
        raise RunError(f"instance latents: expected a whole number of {f}-frame chunks to decode into {VIDEO}, "
                       f"found {warmup.shape[2]} frames")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        generate(args)
    except (ArtifactError, BackendError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {Path(args.out) / 'run.json'} says how many chunks are in frames.npy; "
              f"--resume goes on from the last snapshot", file=sys.stderr)
        return 130
    return 0
