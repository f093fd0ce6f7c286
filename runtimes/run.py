"""`python -m runtimes DIR --chunks N --out OUTDIR`: continue an exported video on ONNX Runtime or TensorRT.

Loads and validates the artifact, resumes the stream from its handoff state and generates N more
chunks into OUTDIR (runtimes.output): frames.npy (every latent frame, the state's and the new ones)
gets each chunk as it is made, run.json says how many are done, a snapshot every --snapshot-every
chunks lets --resume go on after a crash, and preview.gif is made at the end. Torch-free.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifact import ONNX, Artifact, ArtifactError, load_artifact
from .driver import Stream
from .errors import RunError
from .files import atomic_path, sha256_file
from .output import FRAMES, RunDir, check_out
from .snapshot import load_snapshot

BACKENDS = ("ort", "trt")
PREVIEW_MIN_PX = 128
# A preview of a long run is a time-lapse: frames spread evenly, so the GIF stays a few MB.
PREVIEW_MAX_FRAMES = 240


class BackendError(RuntimeError):
    """The requested backend cannot run here (not installed, no GPU); reported as one line."""


def make_runner(art: Artifact, backend: str = "ort", *, providers: list[str] | None = None,
                threads: int | None = None, engine: str | Path | None = None) -> Any:
    """A runner for the artifact's graph; ArtifactError when the model cannot be loaded, BackendError
    when the backend is unavailable. The runner's I/O names are checked against the manifest."""
    if backend == "ort":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BackendError(f"backend ort: onnxruntime is not importable ({e}); pip install onnxruntime") from None
        from .ort import OrtRunner

        if providers:
            import onnxruntime as ort
            unknown = [p for p in providers if p not in ort.get_available_providers()]
            if unknown:
                raise BackendError(f"backend ort: providers {unknown} are not available; this onnxruntime has "
                                   f"{ort.get_available_providers()}")
        try:
            runner = OrtRunner(art.onnx_path, providers=providers, threads=threads)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            msg = " ".join(str(e).split())[:300]
            raise ArtifactError(f"{art.onnx_path}: expected a model onnxruntime can load, found: {msg}") from None
        where = art.onnx_path
    elif backend == "trt":
        try:
            from .trt import TrtRunner
        except ImportError as e:
            raise BackendError(f"backend trt: runtimes.trt is not importable ({e})") from None
        path = Path(engine) if engine else art.engine_path()
        if (path is None or not path.is_file()) and importlib.util.find_spec("tensorrt") is None:
            raise BackendError("backend trt: TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU "
                               "and driver), then build the engine with `ispa engine DIR`; or use --backend ort")
        if path is None or not path.is_file():
            raise ArtifactError(f"{path or art.directory}: expected a TensorRT engine (*.engine or *.plan listed in "
                                f"manifest.json files, or --engine PATH), found none; build one with `ispa engine`")
        try:
            runner = TrtRunner(path)
        except (ImportError, RuntimeError) as e:
            raise BackendError(f"backend trt: {' '.join(str(e).split())}") from None
        except ValueError as e:
            raise ArtifactError(" ".join(str(e).split())) from None
        where = path
    else:
        raise BackendError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
    _check_runner_io(runner, art, where)
    return runner


def _runner_specs(runner: Any, names: list[str], kind: str) -> dict[str, tuple[Any, str]] | None:
    shapes = getattr(runner, f"{kind}_shapes", None)
    dtypes = getattr(runner, f"{kind}_dtypes", None)
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        return None
    return {n: (shapes.get(n), np.dtype(dtypes[n]).name if n in dtypes else None) for n in names}


def _check_runner_io(runner: Any, art: Artifact, where: Path) -> None:
    """The loaded model's I/O names, shapes and dtypes against the manifest's."""
    for kind, declared in (("input", art.inputs), ("output", art.outputs)):
        names = getattr(runner, f"{kind}_names", None)
        if names is None:
            continue
        if set(names) != set(declared):
            raise ArtifactError(f"{where}: {kind}s: expected {sorted(declared)} (manifest.json), found {sorted(names)}")
        specs = _runner_specs(runner, list(names), kind)
        for name, (shape, dtype) in (specs or {}).items():
            want = declared[name]
            got_shape = tuple(shape) if shape is not None else None
            if got_shape != want.shape or dtype != want.dtype:
                found = f"{dtype}{list(got_shape) if got_shape is not None else '[dynamic]'}"
                raise ArtifactError(f"{where}: {kind} {name!r}: expected {want.describe()} (manifest.json), "
                                    f"found {found}")


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
        description="Continue an exported ISPA stream from its handoff state on ONNX Runtime or TensorRT.")
    p.add_argument("artifact", metavar="DIR", help="export directory (manifest.json, model.onnx, state.safetensors)")
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
                   help="skip sha256 checks of the artifact files (sizes still checked)")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.gif")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def runner_path(art: Artifact, args: argparse.Namespace) -> Path | None:
    if args.backend == "torch":
        return art.directory / "torch_model.safetensors"
    if args.backend == "ort":
        return art.directory / ONNX
    return Path(args.engine) if args.engine else art.engine_path()


def _check_counts(args: argparse.Namespace) -> None:
    if args.chunks is None and not args.resume:
        raise RunError("--chunks: expected the number of chunks to generate (>= 1), found none")
    if args.chunks is not None and args.chunks < 1:
        raise RunError(f"--chunks: expected an integer >= 1, found {args.chunks}")
    if args.snapshot_every < 0:
        raise RunError(f"--snapshot-every: expected an integer >= 0 (0: no snapshots), found {args.snapshot_every}")


def _resume_point(args: argparse.Namespace, prior: dict[str, Any], art: Artifact, identity: str,
                  out: Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """(chunks requested, chunks done at the snapshot, snapshot arrays) of the run in `out`."""
    record = out / "run.json"
    if prior.get("artifact_manifest_sha256") != identity:
        raise RunError(f"{record}: expected a run of {art.directory} (manifest sha256 {identity}), found one of "
                       f"another artifact ({prior.get('artifact')}, manifest sha256 "
                       f"{prior.get('artifact_manifest_sha256')})")
    total = prior.get("chunks_requested")
    if not isinstance(total, int) or total < 1:
        raise RunError(f"{record}: chunks_requested: expected an integer >= 1, found {total!r}")
    if args.chunks is not None and args.chunks != total:
        raise RunError(f"--chunks: expected {total} (the run in {out}; its frames.npy is sized for it), "
                       f"found {args.chunks}")
    snap = prior["snapshot"]
    arrays = load_snapshot(out, snap, identity, art.directory)
    return total, int(snap["chunks_done"]), arrays


def stream_state(stream: Stream, static: set[str]) -> dict[str, np.ndarray]:
    """What a snapshot keeps: the stream's state less what the artifact or frames.npy already hold."""
    return {k: v for k, v in stream.state_arrays().items() if k not in static}


def _restore(stream: Stream, art: Artifact, snap: dict[str, np.ndarray], path: Path, chunk: int) -> None:
    """Puts the stream where the snapshot at `path` left it (the artifact supplies the fixed parts)."""
    try:
        stream.load_state({**art.state, **snap})
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path}: expected the state of this artifact's stream, found "
                       f"{' '.join(str(e).split())[:200]}") from None
    if stream.chunk != chunk:
        raise RunError(f"{path}: chunk: expected {chunk} (the state's chunk + chunks done), found {stream.chunk}")


def _stream_chunks(stream: Stream, rundir: RunDir, args: argparse.Namespace, done: int, total: int,
                   static: set[str], identity: str, on_chunk: Callable[[int], None] | None) -> float:
    """Chunks done..total-1, each stored as it comes; returns the seconds they took."""
    f = stream.geo.chunk_frames
    progress = None if args.quiet else _Progress(total, start=done)
    t0 = time.perf_counter()
    try:
        for i in range(done, total):
            try:
                x0 = stream.step()
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
                rundir.snapshot(stream_state(stream, static), identity)
            if progress is not None:
                progress(1)
            if on_chunk is not None:
                on_chunk(i + 1)
    except BaseException:
        rundir.flush()  # run.json counts every chunk on disk, whatever stopped the loop (Ctrl-C)
        raise
    return time.perf_counter() - t0


def make_stream(art: Artifact, runner: Any) -> Stream:
    """A Stream positioned at the artifact's handoff state; it keeps no latents (they go to disk)."""
    stream = Stream(runner, art.geometry, art.cross_kv, art.seed, constants=art.constants, keep_latents=False)
    stream.load_state(art.state)
    return stream


def generate(args: argparse.Namespace, runner: Any = None,
             on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Continue the artifact's stream into args.out, or resume the run there (args.resume).

    `runner` overrides the backend (the PyTorch one lives outside); `on_chunk(chunks_done)` is
    called after each chunk is stored (benchmarks). Refusals are RunError/ArtifactError/
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
    # The ONNX protobuf is read here only when the onnx package is present (cheap: weights stay on
    # disk); otherwise the loaded session's I/O is checked by make_runner instead of loading it twice.
    check_onnx = args.backend == "ort" and importlib.util.find_spec("onnx") is not None
    art = load_artifact(args.artifact, verify_checksums=not args.no_verify, check_onnx=check_onnx)
    identity = sha256_file(art.manifest_path)
    total, done, snap = (_resume_point(args, prior, art, identity, out) if args.resume
                         else (args.chunks, 0, None))
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if runner is None:
        runner = make_runner(art, args.backend, providers=providers, threads=args.threads, engine=args.engine)
    stream = make_stream(art, runner)
    start_chunk = stream.chunk
    if snap is not None:
        _restore(stream, art, snap, out / prior["snapshot"]["file"], start_chunk + done)
    state_frames = art.state["latents"]
    static = {"latents", "cross_kv", *art.constants}
    for name in [g.name for g in art.geometry.groups] + ["latents"]:  # the stream copied them: free the originals
        art.state.pop(name, None)
    geo = art.geometry
    b, c, f, h, w = geo.chunk_shape
    shape = (b, c, state_frames.shape[2] + total * f, h, w)
    record = {
        "artifact": str(Path(args.artifact).resolve()),
        "artifact_manifest_sha256": identity,
        "backend": args.backend,
        "providers": list(getattr(runner, "providers", []) or []),
        "model": str(runner_path(art, args)),
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
    del state_frames
    seconds = _stream_chunks(stream, rundir, args, done, total, static, identity, on_chunk)
    made = total - done
    rundir.finish({"chunks_generated": total, "seconds": round(seconds, 6),
                   "seconds_per_chunk": round(seconds / made, 6) if made else None},
                  None if args.no_preview else write_preview, PREVIEW_MAX_FRAMES)
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
