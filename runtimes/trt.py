"""TensorRT runner for a static-shape engine, its I/O in device buffers bound once.

Deployment code: imports numpy, and — only when a runner is made — tensorrt and cuda-python (through
runtimes.buffers.CudaBuffers, shared with ONNX Runtime's CUDA path). Never torch, ispa_export or graphs.

API references (TensorRT 10.x / 11.x Python API; Polygraphy 0.53 CUDA wrapper):
- ICudaEngine num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_shape / get_tensor_dtype:
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Engine.html
- IExecutionContext set_tensor_address / execute_async_v3:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
- Runtime.deserialize_cuda_engine:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
- cuda-python runtime API (cudaMalloc, cudaMemcpy2DAsync, cudaStreamCreate): runtimes/buffers.py
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .buffers import CudaBuffers, host_dtype

# TensorRT DataType member -> graph dtype name (bfloat16 held as ml_dtypes' on the host).
_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
    "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
}


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16, round to nearest even), as TensorRT's refit takes them."""
    return np.asarray(a, dtype=np.float32).astype(host_dtype("bfloat16")).view(np.uint16)


class TrtEngine:
    """One deserialized engine, loaded once per deployment; each video gets its own execution context
    (TrtRunner). A REFIT engine's weights are the engine's, not a context's: `refit` swaps them for
    every context at once, so a baked deployment serves one video at a time (the modulation-as-input
    graph serves many)."""

    def __init__(self, engine_path: str | os.PathLike):
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError("TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)") from None
        self.trt = trt
        self.engine_path = os.fspath(engine_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(self.engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ValueError(f"{self.engine_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.tensors: dict[str, tuple[tuple[int, ...], str, bool]] = {}  # name -> (shape, dtype, is input)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dynamic shape {shape}; engines must be static")
            key = self.engine.get_tensor_dtype(name).name
            if key not in _DTYPES:
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dtype {key}, which this runner does not handle")
            self.tensors[name] = (shape, _DTYPES[key], self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)

    def refittable(self) -> set[str]:
        return set(self.trt.Refitter(self.engine, self.logger).get_all_weights())

    def refit(self, weights: dict[str, np.ndarray]) -> list[str]:
        """Replace named weights (the graph's refit names) in place, straight from a video's instance
        tensors; every name must be refittable and keep its element count. Returns the names set."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        refittable = set(refitter.get_all_weights())
        if not refittable:
            raise ValueError(f"{self.engine_path}: engine has no refittable weights (built without refit)")
        unknown = sorted(set(weights) - refittable)
        if unknown:
            raise ValueError(f"{self.engine_path}: weights not refittable in this engine: {', '.join(unknown)}")
        # get_weights_prototype (TensorRT 10+) gives the built dtype and count, so float32 arrays can
        # be given for fp16/bf16 engines; without it TensorRT's own check is all.
        prototype = getattr(refitter, "get_weights_prototype", None)
        keep = []  # TensorRT reads host weights at refit time: they must stay alive until then
        for name in sorted(weights):
            arr = np.asarray(weights[name])
            proto = prototype(name) if prototype is not None else None
            if proto is not None and proto.size != arr.size:
                raise ValueError(f"{self.engine_path}: weight '{name}' has {arr.size} elements; the engine's has "
                                 f"{proto.size}")
            if arr.dtype.name == "bfloat16" or (proto is not None and proto.dtype == getattr(trt, "bfloat16", None)):
                arr = np.ascontiguousarray(_bf16_bits(arr))
                w = trt.Weights(trt.bfloat16, arr.ctypes.data, arr.size)
            else:
                if proto is not None:
                    arr = arr.astype(trt.nptype(proto.dtype), copy=False)
                arr = np.require(arr, requirements="C")
                w = trt.Weights(arr)
            keep.append(arr)
            if not refitter.set_named_weights(name, w):
                raise ValueError(f"{self.engine_path}: refit rejected '{name}' (shape {arr.shape}, dtype {arr.dtype}): "
                                 "count or type differs from the built weights")
        missing = sorted(refitter.get_missing_weights())
        if missing:
            raise ValueError(f"{self.engine_path}: refit also needs these weights: {', '.join(missing)}")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"{self.engine_path}: refit_cuda_engine failed (see the TensorRT log above)")
        del keep
        return sorted(weights)


class TrtRunner:
    """Runs one video on a TensorRT engine with the driver's runner protocol (same as
    runtimes.ort.OrtRunner): its own execution context and device buffers.

    Every I/O tensor is a device buffer of `buffers` (runtimes.buffers.CudaBuffers), allocated once
    and bound once with `set_tensor_address`; the driver keeps its caches in the engine's own cache
    input tensors and stores each chunk's new K/V from the output tensors by device-to-device copies.
    A step copies the per-step host inputs in, executes on the runner's CUDA stream, and copies the
    prediction out. `run` returns the prediction on the host and the other outputs as device buffers
    (fresh host arrays with copy_outputs=True).
    """

    def __init__(self, engine: "str | os.PathLike | TrtEngine", copy_outputs: bool = False, device_id: int = 0):
        self.shared = engine if isinstance(engine, TrtEngine) else TrtEngine(engine)
        self.engine_path = self.shared.engine_path
        self.engine = self.shared.engine
        self.copy_outputs = copy_outputs
        self.context = self.engine.create_execution_context()
        self.buffers = CudaBuffers(device_id)

        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.input_dtypes: dict[str, np.dtype] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.output_dtypes: dict[str, np.dtype] = {}
        for name, (shape, dtype, is_input) in self.shared.tensors.items():
            self.buffers.allocate(name, shape, dtype)
            self.buffers.fixed.add(name)
            # Addresses (cudaMalloc: 256-byte aligned) are fixed for the runner's life: bound once here.
            if not self.context.set_tensor_address(name, self.buffers.address(name)):
                raise RuntimeError(f"{self.engine_path}: set_tensor_address failed for '{name}'")
            if is_input:
                self.input_names.append(name)
                self.input_shapes[name], self.input_dtypes[name] = shape, host_dtype(dtype)
            else:
                self.output_names.append(name)
                self.output_shapes[name], self.output_dtypes[name] = shape, host_dtype(dtype)
        self.outputs = {n: np.empty(self.output_shapes[n], self.output_dtypes[n]) for n in ("prediction",)
                        if n in self.output_shapes}

    def nbytes(self) -> int:
        """Device bytes held for I/O buffers (the engine's own activation memory not included)."""
        return sum(self.buffers.nbytes(n) for n in self.buffers.names())

    def _input(self, name: str, value: np.ndarray) -> np.ndarray:
        want, shape = self.input_dtypes[name], self.input_shapes[name]
        a = np.asarray(value)
        if a.dtype != want:
            # Latents come as float32 from the driver: cast to the engine's dtype (bf16 via ml_dtypes).
            a = a.astype(want)
        if a.shape != shape:
            raise ValueError(f"{self.engine_path}: input {name!r}: expected {want.name}{list(shape)}, "
                             f"got {np.asarray(value).dtype.name}{list(a.shape)}")
        return np.require(a, requirements="C")  # ascontiguousarray would turn 0-d into 1-d

    def run(self, feeds: dict[str, np.ndarray], info: Any = None) -> dict[str, Any]:
        """Copy the fed inputs in, execute on the runner's stream, copy the prediction out, synchronize.
        Inputs not fed (the caches, text K/V, constants) are read where they are: in the device buffers."""
        keep = []  # async copies read these: keep them alive until the stream is synchronized
        for name, value in feeds.items():
            if name not in self.input_shapes:
                continue
            a = self._input(name, value)
            keep.append(a)
            self.buffers.upload_to(self.buffers.address(name), a)
        if not self.context.execute_async_v3(self.buffers.stream):
            raise RuntimeError(f"{self.engine_path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name, out in self.outputs.items():
            self.buffers.download_from(self.buffers.address(name), out)
        self.buffers.synchronize()
        del keep
        result: dict[str, Any] = {n: self.buffers[n] for n in self.output_names}
        result.update(self.outputs)
        if self.copy_outputs:
            return {n: (v.copy() if isinstance(v, np.ndarray) else self.buffers.download(n)) for n, v in result.items()}
        return result

    def close(self) -> None:
        """Free device buffers now rather than at garbage collection."""
        self.buffers.close()

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
