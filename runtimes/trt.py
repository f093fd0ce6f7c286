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


class TrtRunner:
    """Runs one TensorRT engine with the driver's runner protocol (same as runtimes.ort.OrtRunner).

    Every I/O tensor is a device buffer of `buffers` (runtimes.buffers.CudaBuffers), allocated once
    and bound once with `set_tensor_address`; the driver keeps its caches in the engine's own cache
    input tensors and stores each chunk's new K/V from the output tensors by device-to-device copies.
    A step copies the per-step host inputs in, executes on the runner's CUDA stream, and copies the
    prediction out. `run` returns the prediction on the host and the other outputs as device buffers
    (fresh host arrays with copy_outputs=True).
    """

    def __init__(self, engine_path: str | os.PathLike, copy_outputs: bool = False, device_id: int = 0):
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError(
                "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)"
            ) from None

        self.engine_path = os.fspath(engine_path)
        self.copy_outputs = copy_outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(self.engine_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ValueError(f"{self.engine_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.buffers = CudaBuffers(device_id)

        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.input_dtypes: dict[str, np.dtype] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.output_dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dynamic shape {shape}; engines must be static")
            key = self.engine.get_tensor_dtype(name).name
            if key not in _DTYPES:
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dtype {key}, which this runner does not handle")
            self.buffers.allocate(name, shape, _DTYPES[key])
            self.buffers.fixed.add(name)
            # Addresses (cudaMalloc: 256-byte aligned) are fixed for the runner's life: bound once here.
            if not self.context.set_tensor_address(name, self.buffers.address(name)):
                raise RuntimeError(f"{self.engine_path}: set_tensor_address failed for '{name}'")
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
                self.input_shapes[name], self.input_dtypes[name] = shape, host_dtype(_DTYPES[key])
            else:
                self.output_names.append(name)
                self.output_shapes[name], self.output_dtypes[name] = shape, host_dtype(_DTYPES[key])
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
