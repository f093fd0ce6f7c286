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
  "Refitting an Engine" guide (11.3 known issue: REFIT may drop a GEMM bias):
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ispa_export.errors import UserError

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


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    # A crash leaves the old file or the new one, never a truncated engine that later loads.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_path, memoryview(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

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


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round to nearest even; numpy has no bfloat16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def refit_engine(engine_path: str | os.PathLike, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Replace named weights (ONNX initializer names) in a REFIT engine and rewrite it atomically.

    Every name must be refittable and every weight must keep its element count; weights that
    TensorRT fused with a given one must be given too (reported from get_missing_weights).
    """
    trt = _trt()
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise UserError(f"{engine_path}: engine file not found")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise UserError(f"{engine_path}: not a TensorRT engine for this TensorRT version and GPU")
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    if not refittable:
        raise UserError(f"{engine_path}: engine has no refittable weights (built without refit)")
    unknown = sorted(set(weights) - refittable)
    if unknown:
        raise UserError(f"{engine_path}: weights not refittable in this engine: {', '.join(unknown)}")

    # get_weights_prototype (IRefitter::getWeightsPrototype, TensorRT 10+) gives the built dtype and
    # count, so float32 arrays can be given for fp16/bf16 engines; without it TensorRT's own check is all.
    prototype = getattr(refitter, "get_weights_prototype", None)
    keep = []  # TensorRT reads host weights at refit time: they must stay alive until then
    for name in sorted(weights):
        arr = np.asarray(weights[name])
        proto = prototype(name) if prototype is not None else None
        if proto is not None and proto.size != arr.size:
            raise UserError(
                f"{engine_path}: weight '{name}' has {arr.size} elements; the engine's has {proto.size}"
            )
        if proto is not None and proto.dtype == getattr(trt, "bfloat16", None):
            arr = np.ascontiguousarray(_bf16_bits(arr))
            w = trt.Weights(trt.bfloat16, arr.ctypes.data, arr.size)
        else:
            if proto is not None:
                arr = arr.astype(trt.nptype(proto.dtype), copy=False)
            arr = np.require(arr, requirements="C")
            w = trt.Weights(arr)
        keep.append(arr)
        if not refitter.set_named_weights(name, w):
            raise UserError(
                f"{engine_path}: refit rejected '{name}' (shape {arr.shape}, dtype {arr.dtype}): "
                "count or type differs from the built weights"
            )
    missing = sorted(refitter.get_missing_weights())
    if missing:
        raise UserError(f"{engine_path}: refit also needs these weights: {', '.join(missing)}")
    if not refitter.refit_cuda_engine():
        raise UserError(f"{engine_path}: refit_cuda_engine failed (see the TensorRT log above)")
    _write_atomic(engine_path, memoryview(engine.serialize()))
    del keep
    return {"tensorrt_version": trt.__version__, "refitted": sorted(weights)}
