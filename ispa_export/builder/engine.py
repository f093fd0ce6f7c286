"""TensorRT engine build and refit, written against the TensorRT 10.x and 11.x Python API.

TensorRT is imported lazily: everything else in ispa_export works without it.

API references used (Python API, TensorRT 10.x / 11.x):
- Builder, create_network, BuilderConfig (set_memory_pool_limit, create_timing_cache,
  set_timing_cache, get_timing_cache), build_serialized_network:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
- ITimingCache.serialize / combine:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
- OnnxParser.parse_from_file / get_error:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
- IProgressMonitor: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
- Refitter (set_named_weights, get_missing_weights, get_all_weights, refit_cuda_engine) and the
  "Refitting an Engine" guide (11.3 known issue: REFIT may drop a GEMM bias); each video's refit is
  runtimes.trt.TrtEngine.refit, straight from its instance's tensors:
  https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/Refitter.html
  https://docs.nvidia.com/deeplearning/tensorrt/11.3.0/inference-library/refitting-engines.html
- 10.x -> 11.x: strong typing always on, STRONGLY_TYPED kept but ignored, weak-typing flags removed:
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/tensorrt-10x-to-11x.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any


from ispa_export.errors import UserError
from runtimes.files import write_bytes_atomic

_NO_TRT = (
    "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver); "
    "use --backend ort to run without it"
)


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(_NO_TRT) from None
    return tensorrt


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0: cuda-python if present, else the driver API via ctypes."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return {"gpu": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}
    except ImportError:
        pass
    # CUDA driver API (cuInit, cuDeviceGet, cuDeviceGetName, cuDeviceGetAttribute with
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75 / MINOR = 76); ABI-stable across versions.
    try:
        cu = ctypes.CDLL("nvcuda.dll" if sys.platform.startswith("win") else "libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if (cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), 0) or cu.cuDeviceGetName(name, 256, dev)
                or cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
                or cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):
            return {"gpu": None, "compute_capability": None}
        return {"gpu": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}"}
    except OSError:
        return {"gpu": None, "compute_capability": None}


def _progress_monitor(trt):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)  # required by the pybind trampoline

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:  # top-level phases only: nested ones are too chatty
                print(f"[trt] {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    workspace_bytes: int,
    timing_cache_path: str | os.PathLike | None,
    refit: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a strongly typed engine from `onnx_path`; precision comes from the ONNX (no FP16/BF16 flags).

    Writes `engine_path` (and the timing cache, when a path is given) atomically. Returns metadata:
    TensorRT version, GPU name and compute capability, build seconds, refittable weight names.
    """
    trt = _trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX model not found")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag to get strong typing; 11 always types strongly and ignores it.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weight files next to the model are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser rejected the model: {errors or 'no details'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    # ignore_mismatch=False: a cache from another GPU may pick wrong tactics (ITimingCache docs), so a
    # cache that TensorRT rejects is replaced by an empty one, which this build then fills.
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[trt] timing cache {cache_path} not usable here; starting an empty one", file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # must outlive the build: kept in this frame

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    write_bytes_atomic(engine_path, memoryview(serialized))
    if cache_path:
        write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    names: list[str] = []
    if refit:
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        names = sorted(trt.Refitter(engine, logger).get_all_weights())
    return {
        "tensorrt_version": trt.__version__,
        **gpu_info(),
        "build_seconds": seconds,
        "workspace_bytes": int(workspace_bytes),
        "strongly_typed": True,
        "refittable": bool(refit),
        "refittable_weights": names,
        "onnx": onnx_path.name,
        "engine": engine_path.name,
    }


# -- artifacts ----------------------------------------------------------------------------------

ENGINE = "model.engine"
TIMING_CACHE = "timing.cache"
_MAX_LISTED = 12


def _problems_line(path: Path, problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{path}: TensorRT would reject the graph ({len(problems)} problem(s)): {shown}{more}"


def check_artifact(directory: str | os.PathLike) -> list[str]:
    """The CPU-side TensorRT checks of an artifact's ONNX (ops, dtypes, fixed shapes, refit names)."""
    from runtimes.artifact import load_artifact

    from ispa_export.builder.trt_support import check_onnx_for_tensorrt

    art = load_artifact(directory)
    return check_onnx_for_tensorrt(art.onnx_path, list(art.manifest.get("refit_names") or []))


def build_for_artifact(directory: str | os.PathLike, workspace_bytes: int, *, progress: bool = True) -> dict[str, Any]:
    """`ispa engine DEPLOY`: check the graph on the CPU side, build DEPLOY/model.engine (timing cache
    DEPLOY/timing.cache), and record it in DEPLOY/engine.json (with the sha256 of the manifest it was
    built for). Once per deployment: every video runs on it (modulation bound as inputs, or refitted
    by name), and the instances absorbed before it stay valid.

    The graph checks run first so their problems are reported even where TensorRT is missing. An
    engine in which one of the manifest's refit_names did not stay refittable is refused (per-video
    refits would fail on it). Returns the manifest's `tensorrt` record.
    """
    from runtimes.artifact import ENGINE_RECORD, load_artifact
    from runtimes.files import file_record, sha256_file, write_json_atomic

    from ispa_export.builder.trt_support import check_onnx_for_tensorrt

    directory = Path(directory)
    art = load_artifact(directory)
    refit_names = list(art.manifest.get("refit_names") or [])
    problems = check_onnx_for_tensorrt(art.onnx_path, refit_names)
    if problems:
        raise UserError(_problems_line(art.onnx_path, problems))
    # The exported VAE decoder's two graphs get engines too (runtimes.run uses them on --backend trt).
    decoders = [] if art.decoder is None else [art.decoder_dir / Path(art.decoder["graphs"][g]).name
                                               for g in ("first", "next")]
    for graph in decoders:
        problems = check_onnx_for_tensorrt(graph, [])
        if problems:
            raise UserError(_problems_line(graph, problems))
    _trt()
    if workspace_bytes <= 0:
        raise UserError(f"--workspace-gib: expected a positive size, got {workspace_bytes} bytes")
    # Built under a temporary name: a refused or failed build leaves any previous engine as it was.
    tmp = directory / f".{ENGINE}.build-{os.getpid()}"
    try:
        meta = build_engine(art.onnx_path, tmp, workspace_bytes=workspace_bytes,
                            timing_cache_path=directory / TIMING_CACHE, refit=bool(refit_names), progress=progress)
        refittable = set(meta["refittable_weights"])
        lost = [n for n in refit_names if n not in refittable]
        if lost:
            raise UserError(f"{art.onnx_path}: TensorRT folded these refit weights into other layers, so they "
                            f"are not refittable in the engine: {', '.join(lost)}")
        os.replace(tmp, directory / ENGINE)
    finally:
        if tmp.exists():
            tmp.unlink()
    for graph in decoders:
        build_engine(graph, graph.with_suffix(".engine"), workspace_bytes=workspace_bytes,
                     timing_cache_path=directory / TIMING_CACHE, refit=False, progress=progress)
    record = {
        "engine": ENGINE, "timing_cache": TIMING_CACHE, **file_record(directory / ENGINE),
        "deployment_manifest_sha256": sha256_file(art.manifest_path),
        "tensorrt_version": meta["tensorrt_version"], "gpu": meta["gpu"],
        "compute_capability": meta["compute_capability"], "build_seconds": round(meta["build_seconds"], 3),
        "workspace_bytes": meta["workspace_bytes"], "strongly_typed": True, "refittable": meta["refittable"],
        "refit_names": refit_names, "refittable_weight_count": len(meta["refittable_weights"]),
        "decoder_engines": [g.with_suffix(".engine").relative_to(directory).as_posix() for g in decoders],
    }
    # Beside the manifest, not in it: the deployment (and every instance absorbed into it) stays as it was.
    write_json_atomic(directory / ENGINE_RECORD, record)
    print(f"engine {directory / ENGINE}: TensorRT {record['tensorrt_version']} on {record['gpu']} "
          f"(sm {record['compute_capability']}), built in {record['build_seconds']:.1f} s, "
          f"{len(refit_names)} refit names")
    return record
