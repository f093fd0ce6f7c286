"""Polygraphy parity of an export: golden PyTorch I/O written at export, ONNX Runtime (and TensorRT)
compared against it.

`save_golden` runs the PyTorch chunk step (the model that was traced) on the graph's example inputs
and writes both sides in Polygraphy's own JSON formats, so the check is repeatable with the stock
tool, no ispa code needed:

    polygraphy run model.onnx --onnxrt --load-inputs golden_inputs.json \
        --load-outputs golden_outputs.json --atol A --rtol R

`verify` does the same through Polygraphy's Python API (OnnxrtRunner, TrtRunner, Comparator) and
prints one line per output. Tolerances follow Polygraphy's elementwise rule: an element fails only
where it exceeds both the absolute and the relative tolerance (relative to the PyTorch value).

API used (Polygraphy 0.53): polygraphy.json.to_json / load_json (a list of feed dicts is what
`--load-inputs` reads), comparator.RunResults / IterationResult (`--load-outputs` reads a
JSON-ified RunResults), comparator.Comparator.run / compare_accuracy, SimpleCompareFunc,
backend.onnxrt.OnnxrtRunner / SessionFromOnnx, backend.trt.TrtRunner / EngineFromBytes / BytesFromPath.
"""
from __future__ import annotations

import contextlib
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtimes.files import file_record, write_bytes_atomic, write_json_atomic

from .errors import UserError

if TYPE_CHECKING:  # torch and the model stay lazy imports: `ispa verify` does not need them
    from graphs.wan import WanModel
    from runtimes.driver import Stream

GOLDEN_INPUTS = "golden_inputs.json"
GOLDEN_OUTPUTS = "golden_outputs.json"
GOLDEN_RUNNER = "pytorch"
MANIFEST = "manifest.json"
# Output order of WanModel.forward; absent groups come back as None and are not graph outputs.
OUTPUT_NAMES = ("prediction", "new_kv_full", "new_kv_local")
# Polygraphy's JSON holds base64 .npy bytes (x4/3) and is built in memory: past this much tensor
# data (real model sizes, where the caches alone are GBs) no golden files are written.
MAX_GOLDEN_BYTES = 1 << 30

# (atol, rtol) per graph dtype and backend, elementwise. ONNX Runtime: measured on CPU against
# PyTorch eager (tiny and medium configs, docs/tensorrt.md), max abs error 1.3e-6 (float32) and
# 3.9e-3 (float16) on O(1) outputs; a graph bug moves outputs by O(1). TensorRT keeps TF32 on for
# float32 GEMMs (the builder's default): PyTorch with TF32-rounded GEMM inputs was off by <= 1.8e-3,
# so float32 engines get the float16 tolerance. Not yet measured on a GPU.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float32": {"onnxrt": (1e-4, 1e-3), "tensorrt": (2e-2, 2e-2)},
    "float16": {"onnxrt": (2e-2, 2e-2), "tensorrt": (4e-2, 4e-2)},
}


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())


def golden_outputs(model: "WanModel", feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch chunk step on `feeds` (graph input names), outputs by graph output name."""
    import torch

    kwargs = {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in feeds.items()}
    with torch.no_grad():
        outs = model(**kwargs)
    return {name: o.detach().cpu().numpy() for name, o in zip(OUTPUT_NAMES, outs) if o is not None}


def golden_feeds(stream: "Stream", feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The export's example feeds turned into the first pass of the next chunk: the noise the runtime
    will draw for it (runtimes.schedule.chunk_noise) at the first timestep, pass kind 0. The trace
    uses zero latents, which would leave the patch embedding's weights out of the parity check."""
    from runtimes.schedule import chunk_noise

    geo = stream.geo
    out = dict(feeds)
    out["latents"] = chunk_noise(stream.seed, stream.chunk, 0, geo.chunk_shape).astype(feeds["latents"].dtype)
    out["timestep"] = np.full_like(feeds["timestep"], geo.timesteps[0])
    if "pass_kind" in out:
        out["pass_kind"] = np.zeros_like(feeds["pass_kind"])
    return out


def save_golden(directory: Path, model: "WanModel", feeds: dict[str, np.ndarray], *,
                max_bytes: int = MAX_GOLDEN_BYTES) -> list[str]:
    """Write golden_inputs.json / golden_outputs.json (Polygraphy formats) into `directory`.

    `model` is the module that is exported (already cast to the export dtype), `feeds` its example
    inputs by graph input name. Returns the file names written, or [] when the tensors exceed
    `max_bytes` (then verification needs a smaller export). Each file is replaced atomically.
    """
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import to_json

    directory = Path(directory)
    # np.require, not ascontiguousarray: that turns the 0-d frame_index into shape [1].
    feeds = {k: np.require(v, requirements="C") for k, v in feeds.items()}
    if _nbytes(feeds) > max_bytes:  # before the forward pass, which costs seconds at real model sizes
        return []
    t0 = time.perf_counter()
    outputs = golden_outputs(model, feeds)
    seconds = time.perf_counter() - t0
    if _nbytes(feeds) + _nbytes(outputs) > max_bytes:
        return []
    for name, out in outputs.items():
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise UserError(f"{directory / GOLDEN_OUTPUTS}: output {name!r} of the PyTorch model has NaN/inf "
                            "on the example inputs; expected finite values")
    results = RunResults()
    results.append((GOLDEN_RUNNER, [IterationResult(outputs, runtime=seconds, runner_name=GOLDEN_RUNNER)]))
    # A list of feed dicts: one iteration per element (Polygraphy's --load-inputs format).
    write_bytes_atomic(directory / GOLDEN_INPUTS, to_json([feeds]).encode("utf-8"))
    write_bytes_atomic(directory / GOLDEN_OUTPUTS, results.to_json().encode("utf-8"))
    return [GOLDEN_INPUTS, GOLDEN_OUTPUTS]


def update_manifest_files(directory: Path, names: list[str], fields: dict[str, Any] | None = None) -> dict:
    """Record (or refresh) the sha256/size of `names` in DIR/manifest.json `files`, set top-level
    `fields`, and rewrite the manifest atomically. Returns the new manifest."""
    import json

    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; expected an ispa-export artifact directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: files: expected an object of file records")
    for name in names:
        manifest["files"][name] = file_record(Path(directory) / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest.update(fields or {})
    write_json_atomic(path, manifest)
    return manifest


def add_golden(directory: Path, model: "WanModel", feeds: dict[str, np.ndarray], *,
               max_bytes: int = MAX_GOLDEN_BYTES) -> list[str]:
    """save_golden on an existing artifact, then list the files in its manifest."""
    names = save_golden(directory, model, feeds, max_bytes=max_bytes)
    if names:
        update_manifest_files(directory, names)
    return names


# -- verification -------------------------------------------------------------------------------

def tolerances(dtype: str, backend: str) -> tuple[float, float]:
    try:
        return TOLERANCES[dtype][backend]
    except KeyError:
        raise UserError(f"manifest.json: dtype: expected one of {sorted(TOLERANCES)}, found {dtype!r}") from None


def polygraphy_command(directory: Path, dtype: str, trt: bool = False,
                       tol: tuple[float, float] | None = None) -> str:
    """The stock `polygraphy run` line that repeats this check (with --trt: Polygraphy builds its own
    strongly typed engine from the ONNX, TF32 off, so the TensorRT tolerance covers it)."""
    d = Path(directory)
    atol, rtol = tol or tolerances(dtype, "tensorrt" if trt else "onnxrt")
    args = ["polygraphy", "run", str(d / "model.onnx"), "--onnxrt"]
    if trt:
        args += ["--trt", "--strongly-typed"]
    args += ["--load-inputs", str(d / GOLDEN_INPUTS), "--load-outputs", str(d / GOLDEN_OUTPUTS),
             "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    return shlex.join(args)


def _spec(a: np.ndarray) -> str:
    return f"{a.dtype.name}{list(a.shape)}"


def _load_golden(art) -> tuple[list[dict[str, np.ndarray]], Any]:
    from polygraphy.comparator import RunResults
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import load_json

    d = art.directory
    for name in (GOLDEN_INPUTS, GOLDEN_OUTPUTS):
        if not (d / name).is_file():
            raise UserError(f"{d / name}: missing; expected the golden I/O written by `ispa export` (none is "
                            f"written when the graph's tensors exceed {MAX_GOLDEN_BYTES >> 30} GiB)")
    try:
        feeds_list = load_json(str(d / GOLDEN_INPUTS))
    except (PolygraphyException, ValueError) as e:
        raise UserError(f"{d / GOLDEN_INPUTS}: not a Polygraphy input list ({' '.join(str(e).split())[:200]})") from None
    if isinstance(feeds_list, dict):
        feeds_list = [feeds_list]
    if not isinstance(feeds_list, list) or not feeds_list or not all(isinstance(f, dict) for f in feeds_list):
        raise UserError(f"{d / GOLDEN_INPUTS}: expected a non-empty JSON list of feed dicts")
    for i, feeds in enumerate(feeds_list):
        if set(feeds) != set(art.inputs):
            raise UserError(f"{d / GOLDEN_INPUTS}: iteration {i}: expected inputs {sorted(art.inputs)} "
                            f"(manifest.json), found {sorted(feeds)}")
        for name, spec in art.inputs.items():
            a = feeds[name]
            if not isinstance(a, np.ndarray) or a.shape != spec.shape or a.dtype.name != spec.dtype:
                found = _spec(a) if isinstance(a, np.ndarray) else type(a).__name__
                raise UserError(f"{d / GOLDEN_INPUTS}: iteration {i}: input {name!r}: expected "
                                f"{spec.describe()} (manifest.json), found {found}")
    try:
        results = RunResults.load(str(d / GOLDEN_OUTPUTS))
    except (PolygraphyException, ValueError, TypeError) as e:
        raise UserError(f"{d / GOLDEN_OUTPUTS}: not a Polygraphy RunResults ({' '.join(str(e).split())[:200]})") from None
    if GOLDEN_RUNNER not in results or len(results[GOLDEN_RUNNER]) != len(feeds_list):
        raise UserError(f"{d / GOLDEN_OUTPUTS}: expected runner {GOLDEN_RUNNER!r} with {len(feeds_list)} "
                        f"iteration(s), found runners {list(results.keys())}")
    for i, it in enumerate(results[GOLDEN_RUNNER]):
        if set(it.keys()) != set(art.outputs):
            raise UserError(f"{d / GOLDEN_OUTPUTS}: iteration {i}: expected outputs {sorted(art.outputs)} "
                            f"(manifest.json), found {sorted(it.keys())}")
    return feeds_list, results[GOLDEN_RUNNER]


def _trt_runner(art, scratch: contextlib.ExitStack):
    """Polygraphy's TrtRunner on the artifact's engine, or on one built here (in a temporary
    directory removed with `scratch`) from the ONNX with the flags of `ispa engine`."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from .engine import build_engine

    engine = art.engine_path()
    if engine is None:
        engine = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="ispa-verify-"))) / "model.engine"
        print(f"verify: no engine listed in {art.manifest_path}; building one from {art.onnx_path} "
              f"(run `ispa engine {art.directory}` to keep it)", file=sys.stderr)
        build_engine(art.onnx_path, engine, workspace_bytes=4 << 30, timing_cache_path=None,
                     refit=bool(art.manifest.get("refit_names")), progress=False)
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt"), engine


@contextlib.contextmanager
def _quiet_polygraphy():
    # The comparator logs every statistic (and each failure) itself; verify prints its own table.
    # Critical messages still raise PolygraphyException, which verify turns into a UserError.
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def verify(directory: Path, trt: bool = False, *, atol: float | None = None, rtol: float | None = None) -> int:
    """Compare ONNX Runtime (CPU), and with trt=True TensorRT, against the golden PyTorch outputs.

    Prints one line per backend and output and the `polygraphy run` command that repeats the check.
    Returns 0 when every output is within tolerance, 1 otherwise. `atol`/`rtol` replace the
    per-dtype defaults (TOLERANCES) for every backend. User errors (a missing or broken artifact,
    TensorRT not installed) raise UserError / ArtifactError.
    """
    from runtimes.artifact import load_artifact

    if trt:
        from .engine import _trt
        _trt()  # the one-line error before any work when TensorRT is missing
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import AccuracyResult, Comparator, RunResults
    from polygraphy.exception import PolygraphyException
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # Polygraphy before the SimpleCompareFunc class: the same check as a factory
        from polygraphy.comparator import CompareFunc
        SimpleCompareFunc = CompareFunc.simple

    directory = Path(directory)
    art = load_artifact(directory, check_onnx=True)
    dtype = art.manifest.get("dtype", art.geometry.dtype)
    with _quiet_polygraphy():
        feeds_list, golden = _load_golden(art)

    def tol(backend: str) -> tuple[float, float]:
        a, r = tolerances(dtype, backend)
        return (a if atol is None else atol), (r if rtol is None else rtol)

    runners = [OnnxrtRunner(SessionFromOnnx(str(art.onnx_path), providers=["cpu"]), name="onnxrt")]
    engine = None
    scratch = contextlib.ExitStack()
    try:
        if trt:
            runner, engine = _trt_runner(art, scratch)
            runners.append(runner)
        with _quiet_polygraphy():
            results = Comparator.run(runners, data_loader=feeds_list)
            results = RunResults(list(results.items()) + [(GOLDEN_RUNNER, golden)])
            rows, ok = [], True
            ref = len(runners)
            for i, runner in enumerate(runners):
                a, r = tol(runner.name)
                acc = Comparator.compare_accuracy(results, comparisons=[(i, ref)],
                                                  compare_func=SimpleCompareFunc(atol=a, rtol=r))
                ok = ok and bool(acc)
                # Polygraphy 0.53 returns a list (one AccuracyResult per compare function), earlier ones one.
                per_func = [acc] if isinstance(acc, AccuracyResult) else list(acc)
                for per_pair in per_func:
                    for iterations in per_pair.values():
                        for it, per_output in enumerate(iterations):
                            for name, res in per_output.items():
                                rows.append((runner.name, it, name, res, a, r))
    except PolygraphyException as e:
        raise UserError(f"{directory}: Polygraphy comparison failed: {' '.join(str(e).split())[:300]}") from None
    finally:
        scratch.close()

    where = f"engine {engine}" if engine is not None else "CPU"
    print(f"verify {directory}: {dtype} graph vs PyTorch golden outputs ({len(feeds_list)} input set(s); "
          f"elementwise: an element fails where it exceeds both atol and rtol; TensorRT: {where if trt else 'not run'})")
    print(f"{'backend':<10} {'output':<14} {'max abs err':>12} {'max rel err':>12} {'atol':>8} {'rtol':>8}  result")
    for backend, it, name, res, a, r in rows:
        label = name if len(feeds_list) == 1 else f"{name}[{it}]"
        mark = "pass" if bool(res) else "FAIL"
        print(f"{backend:<10} {label:<14} {_num(res.max_absdiff):>12} {_num(res.max_reldiff):>12} "
              f"{a:>8.0e} {r:>8.0e}  {mark}")
    print("repeat with Polygraphy:")
    print("  " + polygraphy_command(directory, dtype, tol=tol("onnxrt")))
    print("  " + polygraphy_command(directory, dtype, trt=True, tol=tol("tensorrt")) + "   # needs TensorRT")
    print(f"verify: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3e}"
