"""`python -m runtimes DIR --chunks N --out OUTDIR`: continue an exported video on ONNX Runtime or TensorRT.

Loads and validates the artifact, resumes the stream from its handoff state, generates N more
chunks and writes OUTDIR/frames.npy (every latent frame: the state's and the new ones),
OUTDIR/preview.gif and OUTDIR/run.json, each atomically. Torch-free.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifact import ONNX, Artifact, ArtifactError, load_artifact
from .driver import Stream
from .files import atomic_path, sha256_file, write_json_atomic

BACKENDS = ("ort", "trt")
PREVIEW_MIN_PX = 128


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


def make_stream(art: Artifact, runner: Any) -> Stream:
    """A Stream positioned at the artifact's handoff state."""
    stream = Stream(runner, art.geometry, art.cross_kv, art.seed, constants=art.constants)
    stream.load_state(art.state)
    return stream


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


def write_frames(path: Path, latents: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, latents, allow_pickle=False)


class _Progress:
    def __init__(self, total: int, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.t0, self.out = total, 0, time.perf_counter(), stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def __call__(self, n: int) -> None:
        self.done += n
        dt = time.perf_counter() - self.t0
        line = f"chunk {self.done}/{self.total}  {dt / self.done:.3f} s/chunk"
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(line, end=end, file=self.out, flush=True)


# -- entry point --------------------------------------------------------------------------------

def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtimes",
        description="Continue an exported ISPA stream from its handoff state on ONNX Runtime or TensorRT.")
    p.add_argument("artifact", metavar="DIR", help="export directory (manifest.json, model.onnx, state.safetensors)")
    p.add_argument("--chunks", type=_count, required=True, metavar="N", help="chunks to generate (>= 0)")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="where frames.npy, preview.gif, run.json go")
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


def generate(args: argparse.Namespace, runner: Any = None) -> dict[str, Any]:
    """Continue the artifact's stream; `runner` overrides the backend (the PyTorch one lives outside)."""
    # The ONNX protobuf is read here only when the onnx package is present (cheap: weights stay on
    # disk); otherwise the loaded session's I/O is checked by make_runner instead of loading it twice.
    check_onnx = args.backend == "ort" and importlib.util.find_spec("onnx") is not None
    art = load_artifact(args.artifact, verify_checksums=not args.no_verify, check_onnx=check_onnx)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if runner is None:
        runner = make_runner(art, args.backend, providers=providers, threads=args.threads, engine=args.engine)
    stream = make_stream(art, runner)
    for name in ("kv_full", "kv_local"):  # the stream copied them into its ring buffers: free the originals
        art.state.pop(name, None)
    start_chunk = stream.chunk
    t0 = time.perf_counter()
    if args.chunks:
        stream.run(args.chunks, progress=None if args.quiet else _Progress(args.chunks))
    seconds = time.perf_counter() - t0
    geo = art.geometry
    latents = (np.concatenate(stream.latents, axis=2) if stream.latents
               else np.zeros(geo.chunk_shape[:2] + (0,) + geo.chunk_shape[3:], np.float32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_frames(out / "frames.npy", latents)
    wrote_preview = False
    if not args.no_preview and latents.shape[2]:
        wrote_preview = write_preview(out / "preview.gif", latents)
        if not wrote_preview:
            print("note: imageio is not importable; preview.gif not written", file=sys.stderr)
    record = {
        "artifact": str(Path(args.artifact).resolve()),
        "backend": args.backend,
        "providers": list(getattr(runner, "providers", []) or []),
        "chunks_from_state": start_chunk,
        "chunks_generated": args.chunks,
        "frames": int(latents.shape[2]),
        "frames_shape": list(latents.shape),
        "seconds": round(seconds, 6),
        "seconds_per_chunk": round(seconds / args.chunks, 6) if args.chunks else None,
        "frames_sha256": sha256_file(out / "frames.npy"),
        "preview": "preview.gif" if wrote_preview else None,
        "model": str(runner_path(art, args)),
    }
    write_json_atomic(out / "run.json", record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        generate(args)
    except (ArtifactError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
