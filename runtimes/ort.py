"""ONNX Runtime backend of the streaming driver: numpy in, numpy out, static shapes.

Outputs go into numpy buffers allocated once and bound by address (IO binding), and inputs are
bound by address too, so a steady-state step allocates no new host memory. Imports numpy and
onnxruntime only.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

# Preference order when the caller names no providers: the fastest one this build of onnxruntime has.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}


def ort_type_to_numpy(type_str: str) -> np.dtype:
    """'tensor(float16)' -> float16; ValueError for types numpy cannot hold (bfloat16, strings)."""
    try:
        return np.dtype(_ORT_TYPES[type_str])
    except KeyError:
        raise ValueError(f"onnxruntime type {type_str} has no numpy equivalent handled here") from None


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def _static(shape: list[Any]) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) and d >= 0 for d in shape) else None


class OrtRunner:
    """Runs one ONNX model through onnxruntime with the driver's runner protocol.

    `run` returns the runner's own output buffers, overwritten by the next call: the driver copies
    what it keeps (`prediction` via astype, the new K/V into its ring buffers) before the next
    step, so no per-step copy is made. Pass copy_outputs=True to get fresh arrays instead.
    """

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None, copy_outputs: bool = False,
                 session_options: Any | None = None):
        import onnxruntime as ort

        self.onnx_path = os.fspath(onnx_path)
        self.copy_outputs = copy_outputs
        opts = session_options or ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
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
        self._binding = self.session.io_binding()
        # Static outputs are bound once to buffers that live as long as the runner; an output
        # with a symbolic dimension is left to onnxruntime to allocate each call.
        self.outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = self.output_shapes[name]
            if shape is None:
                continue
            buf = np.empty(shape, dtype=self.output_dtypes[name])
            self.outputs[name] = buf
        self._bind_outputs()

    def _bind_outputs(self) -> None:
        for name in self.output_names:
            buf = self.outputs.get(name)
            if buf is None:
                self._binding.bind_output(name, "cpu")
            else:
                self._binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def _input(self, name: str, value: np.ndarray) -> np.ndarray:
        want = self.input_dtypes[name]
        a = np.asarray(value)
        if a.dtype != want:
            # The driver feeds the graph's dtypes already; a cast here (one allocation) only for other callers.
            a = a.astype(want)
        shape = self.input_shapes[name]
        if shape is not None and a.shape != shape:
            raise ValueError(f"{self.onnx_path}: input {name!r}: expected {want.name}{list(shape)}, "
                             f"got {a.dtype.name}{list(a.shape)}")
        # Not np.ascontiguousarray: it turns 0-d scalars (frame_index) into shape [1].
        return a if a.flags.c_contiguous else np.require(a, requirements="C")

    def run(self, feeds: dict[str, np.ndarray], info: Any = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.onnx_path}: missing inputs {missing} (graph inputs: {self.input_names})")
        keep = []  # the bound addresses must stay valid until the run returns
        for name in self.input_names:
            a = self._input(name, feeds[name])
            keep.append(a)
            self._binding.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        self.session.run_with_iobinding(self._binding)
        dynamic = [n for n in self.output_names if n not in self.outputs]
        if dynamic:
            values = dict(zip(self.output_names, self._binding.get_outputs()))
            result = {n: (self.outputs[n] if n in self.outputs else values[n].numpy()) for n in self.output_names}
        else:
            result = dict(self.outputs)
        del keep
        if self.copy_outputs:
            return {n: v.copy() for n, v in result.items()}
        return result
