"""`python -m runtimes DEPLOY --instance INSTANCE --chunks N --out OUTDIR`: continue a video on ONNX Runtime
or TensorRT.

Opens the deployment (runtimes.deployment), starts the video from its instance (the handoff of
`ispa absorb`) and generates N more chunks into OUTDIR (runtimes.output): frames.npy (every latent
frame, the warmup's and the new ones) gets each chunk as it is made, run.json says how many are
done, a snapshot every --snapshot-every chunks lets --resume go on after a crash, and preview.gif is
made at the end. One run owns OUTDIR at a time. Torch-free.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifact import ArtifactError
from .deployment import BACKENDS, BackendError, Deployment, Video
from .errors import RunError
from .files import atomic_path
from .instance import load_instance
from .output import FRAMES, RunDir, check_out, claim_out
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


def _stream_chunks(video: Video, rundir: RunDir, args: argparse.Namespace, done: int, total: int, identity: str,
                   on_chunk: Callable[[int], None] | None) -> float:
    """Chunks done..total-1, each stored as it comes; returns the seconds they took."""
    stream = video.stream
    f = stream.geo.chunk_frames
    progress = None if args.quiet else _Progress(total, start=done)
    t0 = time.perf_counter()
    try:
        for i in range(done, total):
            try:
                x0 = video.step()
            except Exception as e:  # the engine's own error types (onnxruntime Fail, TensorRT, ...)
                rundir.fail_chunk(stream.chunk, stream.frame_index, f"{args.backend} runner failed: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            # One pass over a chunk's latents on the host: cheap next to the chunk's four graph runs.
            if not np.isfinite(x0).all():
                bad = int(x0.size - np.count_nonzero(np.isfinite(x0)))
                rundir.fail_chunk(stream.chunk - 1, stream.frame_index - f, f"expected a finite prediction, found "
                                  f"{bad} of {x0.size} values NaN or inf")
            rundir.add_chunk(i, x0)
            if args.snapshot_every and (i + 1) % args.snapshot_every == 0 and i + 1 < total:
                rundir.snapshot(video.state(), identity)
            if progress is not None:
                progress(1)
            if on_chunk is not None:
                on_chunk(i + 1)
    except OSError as e:
        rundir.fail_io(e)  # a full disk, a vanished directory: one line, run.json says so, frames kept
    except BaseException:
        rundir.flush()  # run.json counts every chunk on disk, whatever stopped the loop (Ctrl-C)
        raise
    return time.perf_counter() - t0


def generate(args: argparse.Namespace, deployment: Deployment | None = None, constants=None,
             on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Continue a video into args.out, or resume the run there (args.resume).

    `deployment` is an opened one (the PyTorch backend's, from ispa_export, or one shared by several
    runs); `constants` the instance's modulation in the form its runner takes; `on_chunk(chunks_done)`
    is called after each chunk is stored (benchmarks). Refusals are RunError/ArtifactError/
    BackendError, raised before anything in args.out is touched; a non-finite chunk is a RunError
    raised after run.json records the chunks before it."""
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
    identity = deployment.identity + ":" + instance_sha
    with claim_out(out):
        prior = check_out(out, args.resume, claimed=True)  # again, now that this run owns OUT
        total, done, snap = (_resume_point(args, prior, deployment, instance_sha, out) if args.resume
                             else (args.chunks, 0, None))
        video = deployment.start(instance, constants=constants)
        try:
            start_chunk = video.first_chunk
            if snap is not None:
                _restore(video, snap, out / prior["snapshot"]["file"], start_chunk + done)
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
                rundir = RunDir.resume(out, {**prior, **record, "resumed_from": done}, shape, done, f)
            else:
                rundir = RunDir.start(out, record, shape, state_frames, f)
            seconds = _stream_chunks(video, rundir, args, done, total, identity, on_chunk)
        finally:
            video.close()
        made = total - done
        try:
            rundir.finish({"chunks_generated": total, "seconds": round(seconds, 6),
                           "seconds_per_chunk": round(seconds / made, 6) if made else None},
                          None if args.no_preview else write_preview, PREVIEW_MAX_FRAMES)
        except OSError as e:
            rundir.fail_io(e)
    if not args.no_preview and not rundir.record["preview"]:
        print("note: imageio is not importable; preview.gif not written", file=sys.stderr)
    return rundir.record


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
