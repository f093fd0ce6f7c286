"""ONNX Runtime backend of the streaming driver: static shapes, every buffer bound by address.

The caches, text K/V and constants live in `buffers` (host numpy arrays on the CPU provider, device
memory on the CUDA provider), bound with `bind_ortvalue_input`; every static output is a buffer bound
once with `bind_ortvalue_output`, so a steady-state step allocates nothing and the chunk's new K/V go
into the ring by a device-to-device copy. Per-step host inputs (latents, timestep, RoPE angles, masks)
are bound from host memory and copied in by onnxruntime. Imports numpy and onnxruntime (and
cuda-python on a CUDA provider) only.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .buffers import CudaBuffers, HostBuffers, _check, host_dtype

# Preference order when the caller names no providers: the fastest one this build of onnxruntime has.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(bool)": "bool",
}
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16: onnxruntime takes it where numpy has no dtype


def ort_type_to_numpy(type_str: str) -> np.dtype:
    """'tensor(float16)' -> float16 (bfloat16: ml_dtypes'); ValueError for types not handled here (strings)."""
    try:
        return host_dtype(_ORT_TYPES[type_str])
    except KeyError:
        raise ValueError(f"onnxruntime type {type_str} has no numpy equivalent handled here") from None


class OrtCudaBuffers(CudaBuffers):
    """Device buffers that are onnxruntime OrtValues on the CUDA provider (copies through cuda-python)."""

    def _empty(self, shape, dtype):
        import onnxruntime as ort

        dt = _ONNX_BFLOAT16 if dtype == "bfloat16" else host_dtype(dtype).type
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dt, "cuda", self.device_id)
        nbytes = int(np.prod(shape)) * host_dtype(dtype).itemsize
        if nbytes:
            self._check_memset(value.data_ptr(), nbytes)
        return value

    def _check_memset(self, ptr: int, nbytes: int) -> None:
        _check(self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self._stream), "cudaMemsetAsync")

    def _zero(self, buf):
        name = next((n for n, b in self._bufs.items() if b is buf), None)
        if name is not None:
            self._check_memset(buf.data_ptr(), self.nbytes(name))


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def _static(shape: list[Any]) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) and d >= 0 for d in shape) else None


class OrtSession:
    """One onnxruntime InferenceSession, loaded once per deployment and shared by every video's
    runner (onnxruntime runs one session from several threads, each with its own IOBinding).

    `overridable` are the graph's constants a video replaces by binding them like inputs: a baked
    deployment's per-video correction (ispa_export.video.modulation), initializers listed as graph inputs."""

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None, session_options: Any | None = None):
        import onnxruntime as ort

        self.onnx_path = os.fspath(onnx_path)
        opts = session_options or ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        # A baked graph lists its correction constants as graph inputs on purpose (they are bound per
        # video); onnxruntime warns about each at load. Errors still show.
        opts.log_severity_level = max(opts.log_severity_level, 3)
        self.session = ort.InferenceSession(self.onnx_path, sess_options=opts,
                                            providers=list(providers) if providers else default_providers())
        self.providers: list[str] = self.session.get_providers()
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names: list[str] = [a.name for a in ins]
        self.output_names: list[str] = [a.name for a in outs]
        self.input_dtypes = {a.name: ort_type_to_numpy(a.type) for a in ins}
        self.input_shapes = {a.name: _static(a.shape) for a in ins}
        self.output_dtypes = {a.name: ort_type_to_numpy(a.type) for a in outs}
        self.output_shapes = {a.name: _static(a.shape) for a in outs}
        over = self.session.get_overridable_initializers()
        self.overridable = {a.name for a in over}
        self.overridable_dtypes = {a.name: ort_type_to_numpy(a.type) for a in over}
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


class OrtRunner:
    """Runs one video through an onnxruntime session with the driver's runner protocol.

    The session (OrtSession, or a path to load one from) may be shared; the runner owns its IOBinding
    and its buffers (caches, text K/V, constants, outputs). `run` returns the prediction on the host
    and the other outputs as the runner's own buffers, overwritten by the next call: the driver
    copies what it keeps (the new K/V into its ring buffers) before the next step. Pass
    copy_outputs=True to get fresh host arrays instead.
    """

    def __init__(self, model: "str | os.PathLike | OrtSession", providers: list[str] | None = None,
                 threads: int | None = None, copy_outputs: bool = False,
                 session_options: Any | None = None):
        self.engine = model if isinstance(model, OrtSession) else OrtSession(model, providers, threads,
                                                                              session_options)
        e = self.engine
        self.onnx_path, self.session, self.providers = e.onnx_path, e.session, e.providers
        self.input_names, self.output_names = e.input_names, e.output_names
        self.input_dtypes, self.input_shapes = e.input_dtypes, e.input_shapes
        self.output_dtypes, self.output_shapes = e.output_dtypes, e.output_shapes
        self.device = e.device
        self.copy_outputs = copy_outputs
        self.buffers = OrtCudaBuffers() if self.device == "cuda" else HostBuffers()
        self._binding = self.session.io_binding()
        self._values: dict[tuple[str, int], Any] = {}  # OrtValues of host buffers, by (name, address)
        # Static outputs are bound once to buffers that live as long as the runner; an output
        # with a symbolic dimension is left to onnxruntime to allocate each call.
        for name in self.output_names:
            shape = self.output_shapes[name]
            if shape is None:
                self._binding.bind_output(name, self.device)
            else:
                self.buffers.allocate(name, shape, self.output_dtypes[name].name)
                self._binding.bind_ortvalue_output(name, self._ortvalue(name))

    def _ortvalue(self, name: str) -> Any:
        buf = self.buffers[name]
        if self.device != "cpu":
            return buf
        import onnxruntime as ort

        key = (name, buf.ctypes.data)
        if key not in self._values:  # wraps the numpy memory, no copy
            self._values = {k: v for k, v in self._values.items() if k[0] != name}
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(buf)
        return self._values[key]

    def _input(self, name: str, value: np.ndarray) -> np.ndarray:
        want = self.input_dtypes[name]
        a = np.asarray(value)
        if a.dtype != want:
            # Latents come as float32 from the driver: cast to the graph's dtype (one small allocation).
            a = a.astype(want)
        shape = self.input_shapes[name]
        if shape is not None and a.shape != shape:
            raise ValueError(f"{self.onnx_path}: input {name!r}: expected {want.name}{list(shape)}, "
                             f"got {a.dtype.name}{list(a.shape)}")
        # Not np.ascontiguousarray: it turns 0-d scalars (pass_kind) into shape [1].
        return a if a.flags.c_contiguous else np.require(a, requirements="C")

    def run(self, feeds: dict[str, np.ndarray], info: Any = None) -> dict[str, Any]:
        missing = [n for n in self.input_names if n not in feeds and n not in self.buffers]
        if missing:
            raise ValueError(f"{self.onnx_path}: missing inputs {missing} (graph inputs: {self.input_names})")
        keep = []  # the bound host addresses must stay valid until the run returns
        for name in self.input_names:
            if name in feeds:
                a = self._input(name, feeds[name])
                keep.append(a)
                dtype = _ONNX_BFLOAT16 if a.dtype.name == "bfloat16" else a.dtype
                self._binding.bind_input(name, "cpu", 0, dtype, list(a.shape), a.ctypes.data)
                if self.device != "cpu":
                    self.buffers.traffic.h2d += a.nbytes
            else:
                self._binding.bind_ortvalue_input(name, self._ortvalue(name))
        for name in self.engine.overridable:
            if name in self.buffers:  # a baked graph's constant, replaced by this video's value
                self._binding.bind_ortvalue_input(name, self._ortvalue(name))
        self.session.run_with_iobinding(self._binding)
        dynamic = {}
        if any(n not in self.buffers for n in self.output_names):
            dynamic = {n: v for n, v in zip(self.output_names, self._binding.get_outputs()) if n not in self.buffers}
        result: dict[str, Any] = {}
        for name in self.output_names:
            if name in dynamic:
                result[name] = dynamic[name].numpy()
            elif name == "prediction" or self.copy_outputs:
                result[name] = self.buffers.download(name) if self.device != "cpu" else self.buffers[name]
            else:
                result[name] = self.buffers[name]
        del keep
        if self.copy_outputs:
            return {n: np.array(v, copy=True) for n, v in result.items()}
        return result
