"""Fixed-size buffers where the engine computes, and the frame copies the ring-buffer caches need.

A cache group is one buffer [layers, 2, B, capacity*P, heads, head_dim]: each (layer, K/V, batch)
row holds `capacity` frames of P*heads*head_dim elements side by side, so storing a chunk's frame
in its ring slot, or moving one layer's frame between groups, is one strided 2-D copy (rows of
`width` elements from a source pitch to a destination pitch). Every backend implements that one
primitive (numpy slicing on the host, torch slicing, cudaMemcpy2DAsync on a GPU) and the ring logic
above it is shared. Counters record every byte that crosses the host-device boundary or is copied
on the device, so tests and benchmarks can assert what a step moves.

Imports numpy (and ml_dtypes for bfloat16); CudaBuffers imports cuda-python lazily. Never torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def host_dtype(name: str) -> np.dtype:
    """numpy dtype of a graph dtype name; bfloat16 is ml_dtypes' (numpy has none of its own)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass
class Traffic:
    """Bytes moved: host to device, device to host, and device to device (frame copies)."""

    h2d: int = 0
    d2h: int = 0
    d2d: int = 0

    def snapshot(self) -> "Traffic":
        return Traffic(self.h2d, self.d2h, self.d2d)

    def since(self, before: "Traffic") -> "Traffic":
        return Traffic(self.h2d - before.h2d, self.d2h - before.d2h, self.d2d - before.d2d)


class Buffers:
    """Named buffers on one device, allocated once; subclasses give the device primitives."""

    device = "cpu"

    def __init__(self) -> None:
        self._bufs: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.fixed: set[str] = set()  # bound to an engine by address: never reallocated
        self.traffic = Traffic()

    # -- primitives (per device) -------------------------------------------------------------
    def _empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        raise NotImplementedError

    def _zero(self, buf: Any) -> None:
        raise NotImplementedError

    def _copy2d(self, dst: Any, dst_off: int, dst_pitch: int, src: Any, src_off: int, src_pitch: int,
                width: int, rows: int) -> None:
        """rows x width elements from src[src_off + r*src_pitch + i] to dst[dst_off + r*dst_pitch + i]."""
        raise NotImplementedError

    def _upload(self, buf: Any, host: np.ndarray) -> None:
        raise NotImplementedError

    def _download(self, buf: Any) -> np.ndarray:
        raise NotImplementedError

    def address(self, name: str) -> int:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._bufs

    def __getitem__(self, name: str) -> Any:
        return self._bufs[name]

    def names(self) -> list[str]:
        return list(self._bufs)

    def allocate(self, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        """A zeroed buffer; one that exists with this shape and dtype is zeroed and kept (same address)."""
        shape = tuple(int(d) for d in shape)
        if name in self._bufs and self.shapes[name] == shape and self.dtypes[name] == dtype:
            self._zero(self._bufs[name])
        elif name in self.fixed:
            raise ValueError(f"buffer {name!r}: the engine's tensor is {self.dtypes[name]}{list(self.shapes[name])}, "
                             f"asked for {dtype}{list(shape)}")
        else:
            self.free(name)
            self._bufs[name] = self._empty(shape, dtype)
            self.shapes[name], self.dtypes[name] = shape, dtype
        return self._bufs[name]

    def rename(self, old: str, new: str) -> None:
        self.free(new)
        self._bufs[new] = self._bufs.pop(old)
        self.shapes[new], self.dtypes[new] = self.shapes.pop(old), self.dtypes.pop(old)

    def free(self, name: str) -> None:
        self._bufs.pop(name, None)
        self.shapes.pop(name, None)
        self.dtypes.pop(name, None)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * host_dtype(self.dtypes[name]).itemsize

    def upload(self, name: str, host: np.ndarray) -> None:
        want, dtype = self.shapes[name], host_dtype(self.dtypes[name])
        if host.shape != want or host.dtype != dtype:
            raise ValueError(f"buffer {name!r}: expected {dtype.name}{list(want)}, got {host.dtype.name}{list(host.shape)}")
        self._upload(self._bufs[name], np.ascontiguousarray(host))
        self.traffic.h2d += host.nbytes

    def download(self, name: str) -> np.ndarray:
        out = self._download(self._bufs[name])
        self.traffic.d2h += out.nbytes
        return out

    def _frame_geometry(self, name: str, tokens_per_frame: int) -> tuple[int, int, int]:
        """(rows per layer, frame width in elements, row pitch in elements) of a [L, 2, B, T, n, d] buffer."""
        layers, two, batch, tokens, heads, head_dim = self.shapes[name]
        width = tokens_per_frame * heads * head_dim
        return two * batch, width, tokens * heads * head_dim

    def store_frames(self, name: str, src: Any, src_shape: tuple[int, ...], slots: list[int],
                     tokens_per_frame: int) -> None:
        """Frame i of a chunk's K/V `src` [L, 2, B, f*P, n, d] (a buffer of this device) into ring slot slots[i].

        Frames whose slots follow each other (the usual case: the ring wraps once per capacity) go in
        one copy, so a chunk costs one copy, or two where it straddles the ring's end."""
        rows, width, pitch = self._frame_geometry(name, tokens_per_frame)
        layers = self.shapes[name][0]
        src_pitch = math.prod(src_shape[3:])
        itemsize = host_dtype(self.dtypes[name]).itemsize
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[i - 1] + 1:
                run = (i - start) * width
                self._copy2d(self._bufs[name], slots[start] * width, pitch, src, start * width, src_pitch, run,
                             layers * rows)
                self.traffic.d2d += run * layers * rows * itemsize
                start = i

    def copy_frame(self, dst: str, dst_layer: int, dst_slot: int, src: str, src_layer: int, src_slot: int,
                   tokens_per_frame: int) -> None:
        """One layer's K/V of one frame from buffer `src` to buffer `dst` (the relayout at the transition)."""
        rows, width, dst_pitch = self._frame_geometry(dst, tokens_per_frame)
        _, _, src_pitch = self._frame_geometry(src, tokens_per_frame)
        self._copy2d(self._bufs[dst], dst_layer * rows * dst_pitch + dst_slot * width, dst_pitch,
                     self._bufs[src], src_layer * rows * src_pitch + src_slot * width, src_pitch, width, rows)
        self.traffic.d2d += width * rows * host_dtype(self.dtypes[dst]).itemsize


def _strided_rows(flat: np.ndarray, off: int, pitch: int, width: int, rows: int) -> np.ndarray:
    # A [rows, width] view; as_strided, not a reshape, because the last row may end before off + rows*pitch.
    return np.lib.stride_tricks.as_strided(flat[off:], shape=(rows, width),
                                           strides=(pitch * flat.itemsize, flat.itemsize), writeable=True)


class HostBuffers(Buffers):
    """numpy arrays in host memory: what a CPU engine reads and writes in place."""

    def _empty(self, shape, dtype):
        return np.zeros(shape, dtype=host_dtype(dtype))

    def _zero(self, buf):
        buf[...] = 0

    def _copy2d(self, dst, dst_off, dst_pitch, src, src_off, src_pitch, width, rows):
        _strided_rows(dst.reshape(-1), dst_off, dst_pitch, width, rows)[...] = \
            _strided_rows(np.asarray(src).reshape(-1), src_off, src_pitch, width, rows)

    def _upload(self, buf, host):
        buf[...] = host

    def _download(self, buf):
        return buf.copy()

    def address(self, name):
        return int(self._bufs[name].ctypes.data)

    def upload(self, name: str, host: np.ndarray) -> None:
        # Host memory is the device here: a copy, not a transfer.
        before = self.traffic.h2d
        super().upload(name, host)
        self.traffic.h2d = before

    def download(self, name: str) -> np.ndarray:
        before = self.traffic.d2h
        out = super().download(name)
        self.traffic.d2h = before
        return out


# -- CUDA through cuda-python (ONNX Runtime's CUDA EP and TensorRT) -------------------------------

def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


@dataclass
class DeviceArray:
    """A cudaMalloc'd block: its address, size, shape and host dtype (bf16 as ml_dtypes)."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


class CudaBuffers(Buffers):
    """Device memory through cuda-python's runtime API (cudaMalloc, cudaMemcpy2DAsync) on one stream.

    Buffers are DeviceArrays, or engine-owned memory adopted with a `ptr` attribute or a `data_ptr()`
    method (onnxruntime's OrtValue). Every copy is issued on `stream`; `synchronize()` waits for them.
    """

    device = "cuda"

    def __init__(self, device_id: int = 0, stream: int | None = None) -> None:
        super().__init__()
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python

        self.cudart = cudart
        self.device_id = device_id
        _check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        # cudart calls take the handle object; TensorRT's execute_async_v3 takes its integer value.
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate") if stream is None else stream
        self.stream = int(self._stream)
        self._owned: list[int] = []

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf.data_ptr()) if hasattr(buf, "data_ptr") else int(buf.ptr)

    def _empty(self, shape, dtype):
        dt = host_dtype(dtype)
        nbytes = max(1, math.prod(shape) * dt.itemsize)
        ptr = int(_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._owned.append(ptr)
        buf = DeviceArray(ptr, nbytes, tuple(shape), dt)
        self._zero(buf)
        return buf

    def _zero(self, buf):
        nbytes = buf.nbytes if isinstance(buf, DeviceArray) else 0
        if nbytes:
            _check(self.cudart.cudaMemsetAsync(buf.ptr, 0, nbytes, self._stream), "cudaMemsetAsync")

    def _copy2d(self, dst, dst_off, dst_pitch, src, src_off, src_pitch, width, rows):
        item = self._itemsize(dst)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        _check(self.cudart.cudaMemcpy2DAsync(self.ptr(dst) + dst_off * item, dst_pitch * item,
                                             self.ptr(src) + src_off * item, src_pitch * item,
                                             width * item, rows, kind, self._stream), "cudaMemcpy2DAsync")

    def _itemsize(self, buf: Any) -> int:
        if isinstance(buf, DeviceArray):
            return buf.dtype.itemsize
        for name, b in self._bufs.items():
            if b is buf:
                return host_dtype(self.dtypes[name]).itemsize
        raise KeyError("buffer not registered with these CudaBuffers")

    def _upload(self, buf, host):
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(self.ptr(buf), host.ctypes.data, host.nbytes, kind, self._stream),
               "cudaMemcpyAsync")
        self.synchronize()  # `host` may be a temporary: the copy must finish before it is freed

    def _download(self, buf):
        name = next(n for n, b in self._bufs.items() if b is buf)
        out = np.empty(self.shapes[name], dtype=host_dtype(self.dtypes[name]))
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr(buf), out.nbytes, kind, self._stream),
               "cudaMemcpyAsync")
        self.synchronize()
        return out

    def upload_to(self, ptr: int, host: np.ndarray) -> None:
        """A small per-step input (latents, masks) into an engine's input tensor; counted as h2d."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream), "cudaMemcpyAsync")
        self.traffic.h2d += host.nbytes

    def download_from(self, ptr: int, out: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, self._stream), "cudaMemcpyAsync")
        self.traffic.d2h += out.nbytes

    def synchronize(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def address(self, name):
        return self.ptr(self._bufs[name])

    def free(self, name: str) -> None:
        buf = self._bufs.get(name)
        if isinstance(buf, DeviceArray) and buf.ptr in self._owned:
            self.synchronize()
            _check(self.cudart.cudaFree(buf.ptr), "cudaFree")
            self._owned.remove(buf.ptr)
        super().free(name)

    def close(self) -> None:
        for name in list(self._bufs):
            self.free(name)
