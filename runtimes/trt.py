"""TensorRT runner for a static-shape engine: numpy in, numpy out.

Deployment code: imports numpy, and — only when a runner is made — tensorrt and polygraphy.cuda.
Never torch, ispa_export or graphs.

API references (TensorRT 10.x / 11.x Python API; Polygraphy 0.53 CUDA wrapper):
- ICudaEngine num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_shape / get_tensor_dtype:
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Engine.html
- IExecutionContext set_tensor_address / execute_async_v3:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
- Runtime.deserialize_cuda_engine:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
- polygraphy.cuda DeviceArray / Stream:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/polygraphy/cuda/toc.html
"""

from __future__ import annotations

import os

import numpy as np

# TensorRT DataType member -> host dtype. numpy has no bfloat16: BF16 I/O is float32 on the host
# (converted, round to nearest even), and its device buffer holds uint16 bit patterns.
_HOST_DTYPE = {
    "FLOAT": np.float32, "HALF": np.float16, "BF16": np.float32, "INT32": np.int32,
    "INT64": np.int64, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_,
}


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    if a.dtype.name == "bfloat16":  # an ml_dtypes array: already the bits
        return a.view(np.uint16)
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(np.asarray(a, dtype=np.float32)), np.uint16(0x7FC0), out)


class TrtRunner:
    """Runs one TensorRT engine with the driver's runner protocol (same as runtimes.ort.OrtRunner).

    Device buffers and host output buffers are allocated once, sized from the engine's I/O tensors,
    and device addresses are bound once. `run` returns the runner's own output buffers, overwritten
    by the next call; pass copy_outputs=True to get fresh arrays instead.
    """

    def __init__(self, engine_path: str | os.PathLike, copy_outputs: bool = False):
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError(
                "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)"
            ) from None
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        self.engine_path = os.fspath(engine_path)
        self.copy_outputs = copy_outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(self.engine_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ValueError(f"{self.engine_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()

        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.input_dtypes: dict[str, np.dtype] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.output_dtypes: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self._device: dict[str, object] = {}
        self._bf16: dict[str, np.ndarray | None] = {}  # BF16 tensor -> its uint16 staging buffer (outputs)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dynamic shape {shape}; engines must be static")
            key = self.engine.get_tensor_dtype(name).name
            if key not in _HOST_DTYPE:
                raise ValueError(f"{self.engine_path}: tensor '{name}' has dtype {key}, which this runner does not handle")
            host = np.dtype(_HOST_DTYPE[key])
            device = np.dtype(np.uint16) if key == "BF16" else host
            buf = cuda.DeviceArray(shape=shape, dtype=DataType.from_dtype(device, "numpy"))
            # Addresses are fixed for the runner's life, so they are bound once here.
            if not self.context.set_tensor_address(name, buf.ptr):
                raise RuntimeError(f"{self.engine_path}: set_tensor_address failed for '{name}'")
            self._device[name] = buf
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
                self.input_shapes[name], self.input_dtypes[name] = shape, host
                if key == "BF16":
                    self._bf16[name] = None
            else:
                self.output_names.append(name)
                self.output_shapes[name], self.output_dtypes[name] = shape, host
                self.outputs[name] = np.empty(shape, dtype=host)
                if key == "BF16":
                    self._bf16[name] = np.empty(shape, dtype=np.uint16)

    def nbytes(self) -> int:
        """Device bytes held for I/O buffers (the engine's own activation memory not included)."""
        return sum(buf.nbytes for buf in self._device.values())

    def _input(self, name: str, value: np.ndarray) -> np.ndarray:
        want, shape = self.input_dtypes[name], self.input_shapes[name]
        a = np.asarray(value)
        if name in self._bf16:
            a = _bf16_bits(a)
        elif a.dtype != want:
            # The driver feeds the engine's dtypes already; a cast here (one allocation) only for other callers.
            a = a.astype(want)
        if a.shape != shape:
            raise ValueError(f"{self.engine_path}: input {name!r}: expected {want.name}{list(shape)}, "
                             f"got {np.asarray(value).dtype.name}{list(a.shape)}")
        return np.require(a, requirements="C")  # ascontiguousarray would turn 0-d into 1-d

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs to the device, execute on the runner's stream, copy outputs back, synchronize."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.engine_path}: missing inputs {missing} (engine inputs: {self.input_names})")
        keep = []  # async copies read these: keep them alive until the stream is synchronized
        for name in self.input_names:
            a = self._input(name, feeds[name])
            keep.append(a)
            self._device[name].copy_from(a, stream=self.stream)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"{self.engine_path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name in self.output_names:
            self._device[name].copy_to(self._bf16.get(name, self.outputs[name]), stream=self.stream)
        self.stream.synchronize()
        for name in self.output_names:
            if name in self._bf16:
                self.outputs[name][...] = (self._bf16[name].astype(np.uint32) << 16).view(np.float32)
        del keep
        if self.copy_outputs:
            return {n: v.copy() for n, v in self.outputs.items()}
        return dict(self.outputs)

    def close(self) -> None:
        """Free device buffers and the stream now rather than at garbage collection."""
        for buf in self._device.values():
            buf.free()
        self._device.clear()
        self.stream.free()

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
