"""Streaming Wan VAE decode, torch-free: the two static graphs of `ispa_export.builder.decoder.export_decoder`.

`decoder_first.onnx` decodes the video's first chunk from empty caches; `decoder_next.onnx` every
later chunk from the caches the previous chunk left. The caches (32 tensors, 1.89 GB in fp16 at
480x832 for the real Wan2.1 VAE) are allocated once where the engine computes and never cross the
bus: a step moves the chunk's latents in and its pixels out.

Graph outputs cannot alias graph inputs, so two cache sets exist whatever the strategy. Two
strategies are offered (`cache_mode`):
- "pingpong" (default): a step reads set p and writes set 1-p; the roles swap by rebinding (ONNX
  Runtime keeps one IOBinding per direction, bound once; TensorRT sets the tensor addresses). No copy.
- "copy": a step reads set 0 and writes set 1, then set 1 is copied into set 0 on the device: the
  state is always in set 0, at the cost of one device-to-device copy of every cache per chunk.
Both hold the same memory (2 x the caches), so ping-pong wins outright: it saves a copy of 1.89 GB per
chunk at 480x832 fp16 (0.25 s on a 2-core CPU host; ~1 ms at an H200's bandwidth, estimated).

`StreamDecoder` runs the graphs under ONNX Runtime (HostBuffers on the CPU provider, OrtCudaBuffers
on CUDA), `TrtStreamDecoder` TensorRT engines built from them; they share the cache bookkeeping.
Imports numpy and onnxruntime (tensorrt and cuda-python lazily). Never torch, ispa_export or graphs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import _fail
from .buffers import Buffers, CudaBuffers, HostBuffers, host_dtype
from .files import sha256_file

# Written by ispa_export.builder.decoder.export_decoder; the names are its contract.
RECORD = "decoder.json"
FORMAT = "ispa-wan-vae-decoder"
FORMAT_VERSION = 1
GRAPHS = ("first", "next")
CACHE_MODES = ("pingpong", "copy")
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def load_record(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The decoder record `directory/decoder.json`, checked: format, version, files present and (verify)
    their sha256, so graphs a crash left half-replaced are refused before the first chunk."""
    path = Path(directory) / RECORD
    if not path.is_file():
        raise _fail(path, "file", "the decoder record written by export_decoder", "no such file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise _fail(path, "file", "JSON", f"unreadable ({e})") from None
    if record.get("format") != FORMAT:
        raise _fail(path, "format", repr(FORMAT), repr(record.get("format")))
    if record.get("format_version") != FORMAT_VERSION:
        raise _fail(path, "format_version", str(FORMAT_VERSION), record.get("format_version"))
    for name, entry in record["files"].items():
        file = Path(directory) / name
        if not file.is_file():
            raise _fail(path, f"files.{name}", "the file beside the record", "no such file")
        digest = sha256_file(file) if verify else entry["sha256"]
        if digest != entry["sha256"]:
            raise _fail(path, f"files.{name}.sha256", entry["sha256"], f"{digest} (the file changed)")
    return record


def state_chunks(state: dict[str, Any]) -> int:
    """The chunk count of a decoder's `state()` (0: before the first chunk), shared by every decoder."""
    chunks = int(np.asarray(state.get("chunks", -1)))
    if chunks < 0:
        raise ValueError("decoder state: chunks: expected a count >= 0, found none")
    return chunks


def _set_name(cache: str, s: int) -> str:
    return f"{cache}@{s}"


class _Decoder:
    """Cache bookkeeping shared by the ONNX Runtime and TensorRT decoders.

    The caches live in `buffers` as two sets, `cache_NN@0` and `cache_NN@1`, allocated once. `_current`
    is the set that holds the stream's caches (None before the first chunk); the backend's `_run(graph,
    src, dst)` reads set `src` (None for the first graph) and writes set `dst`.
    """

    def __init__(self, directory: str | os.PathLike, record: dict[str, Any] | None, buffers: Buffers,
                 cache_mode: str, verify: bool) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode: expected one of {CACHE_MODES}, got {cache_mode!r}")
        self.directory = Path(directory)
        self.record = record if record is not None else load_record(self.directory, verify)
        self.cache_mode = cache_mode
        self.buffers = buffers
        self.dtype = self.record["dtype"]
        self.latent_shape = tuple(self.record["latents"]["shape"])
        self.pixel_shapes = {g: tuple(self.record["pixels"]["shape"][g]) for g in GRAPHS}
        self.caches: list[dict[str, Any]] = self.record["caches"]
        for c in self.caches:
            for s in (0, 1):
                buffers.allocate(_set_name(c["input"], s), tuple(c["shape"]), c["dtype"])
        buffers.allocate("latents", self.latent_shape, self.dtype)
        for g in GRAPHS:
            buffers.allocate(f"pixels_{g}", self.pixel_shapes[g], self.dtype)
        self._current: int | None = None
        self.chunks = 0

    # -- backend ------------------------------------------------------------------------------
    def _run(self, graph: str, src: int | None, dst: int) -> None:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of one cache set: the stream's state, what the record's `cache_bytes` promises."""
        return sum(self.buffers.nbytes(_set_name(c["input"], 0)) for c in self.caches)

    def allocated_cache_bytes(self) -> int:
        """Bytes held for caches: both sets."""
        return sum(self.buffers.nbytes(_set_name(c["input"], s)) for c in self.caches for s in (0, 1))

    def reset(self) -> None:
        """Start a new video: the next chunk runs the first graph (it reads no cache, so none is zeroed)."""
        self._current, self.chunks = None, 0

    def _plan(self) -> tuple[str, int | None, int]:
        if self.cache_mode == "copy":
            return ("first", None, 1) if self._current is None else ("next", 0, 1)
        if self._current is None:
            return "first", None, 0
        return "next", self._current, 1 - self._current

    def decode_chunk(self, latents: np.ndarray) -> np.ndarray:
        """One chunk of normalised latents [B, z, f, h, w] (as the DiT makes them) -> float32 pixels
        [B, 3, T, 8h, 8w] in [-1, 1]; T is 1 + 4(f-1) for the video's first chunk, 4f afterwards."""
        a = np.asarray(latents)
        if a.shape != self.latent_shape:
            raise ValueError(f"{self.directory / RECORD}: latents: expected shape {list(self.latent_shape)}, "
                             f"got {list(a.shape)}")
        self.buffers.upload("latents", np.ascontiguousarray(a.astype(host_dtype(self.dtype), copy=False)))
        graph, src, dst = self._plan()
        self._run(graph, src, dst)
        if self.cache_mode == "copy":
            for c in self.caches:
                _copy_whole(self.buffers, _set_name(c["input"], 0), _set_name(c["input"], 1))
            dst = 0
        self._current = dst
        self.chunks += 1
        return self.buffers.download(f"pixels_{graph}").astype(np.float32, copy=False)

    def state(self) -> dict[str, np.ndarray]:
        """The stream's caches (host copies, by graph input name) and `chunks`: a snapshot to resume from."""
        out = {"chunks": np.asarray(self.chunks, dtype=np.int64)}
        if self._current is not None:
            for c in self.caches:
                out[c["input"]] = self.buffers.download(_set_name(c["input"], self._current))
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Resume from `state()`: every cache is uploaded into the buffers (same addresses)."""
        chunks = state_chunks(state)
        if chunks == 0:
            self.reset()
            return
        missing = [c["input"] for c in self.caches if c["input"] not in state]
        if missing:
            raise ValueError(f"decoder state: caches: expected {len(self.caches)}, missing {missing[:3]}")
        target = 0
        for c in self.caches:
            self.buffers.upload(_set_name(c["input"], target), np.asarray(state[c["input"]]))
        self._current, self.chunks = target, chunks

    def _check_io(self, file: Path, graph: str, inputs: dict[str, tuple[tuple[int, ...], str]],
                  outputs: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Refuse an engine whose I/O is not the record's (one line naming the file and tensor)."""
        spec = self.record["graphs"][graph]
        for kind, have in (("inputs", inputs), ("outputs", outputs)):
            want = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in spec[kind]}
            for name in sorted(set(want) | set(have)):
                if want.get(name) != have.get(name):
                    w, h = want.get(name), have.get(name)
                    raise _fail(file, f"{kind}.{name}", "absent" if w is None else f"{w[1]}{list(w[0])}",
                                "absent" if h is None else f"{h[1]}{list(h[0])}")


def _copy_whole(buffers: Buffers, dst: str, src: str) -> None:
    n = math.prod(buffers.shapes[dst])
    buffers._copy2d(buffers[dst], 0, n, buffers[src], 0, n, n, 1)
    buffers.traffic.d2d += buffers.nbytes(dst)


# -- ONNX Runtime -------------------------------------------------------------------------------

def decoder_sessions(directory: str | os.PathLike, record: dict[str, Any], providers: list[str] | None = None,
                     threads: int | None = None) -> dict[str, Any]:
    """The two graphs' ONNX Runtime sessions. A session runs concurrent IOBindings, so the decoders of
    several videos (each with its own caches) may share one pair."""
    import onnxruntime as ort

    from .ort import default_providers

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    return {g: ort.InferenceSession(os.fspath(Path(directory) / record["graphs"][g]["file"]), sess_options=opts,
                                    providers=list(providers) if providers else default_providers())
            for g in GRAPHS}


class StreamDecoder(_Decoder):
    """The two graphs under ONNX Runtime, every tensor bound by IOBinding to a buffer allocated once.

        dec = StreamDecoder(DIR)              # DIR holds decoder.json and the two graphs
        for z in chunks:
            pixels = dec.decode_chunk(z)      # float32 [B, 3, T, H, W]
        snap = dec.state(); ...; dec.load_state(snap)
    """

    def __init__(self, directory: str | os.PathLike, record: dict[str, Any] | None = None,
                 providers: list[str] | None = None, threads: int | None = None,
                 cache_mode: str = "pingpong", verify: bool = True, sessions: dict[str, Any] | None = None) -> None:
        import onnxruntime as ort

        from .ort import OrtCudaBuffers, ort_type_to_numpy

        self._ort = ort
        record = record if record is not None else load_record(directory, verify)
        # Given sessions (`decoder_sessions`) are shared with other videos' decoders: the weights load once.
        self.sessions = sessions if sessions is not None else decoder_sessions(directory, record, providers, threads)
        self.providers: list[str] = self.sessions["first"].get_providers()
        cuda = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        super().__init__(directory, record, OrtCudaBuffers() if cuda else HostBuffers(), cache_mode, verify)
        self.device = "cuda" if cuda else "cpu"
        for g, sess in self.sessions.items():
            io = [{a.name: (tuple(a.shape), ort_type_to_numpy(a.type).name) for a in args}
                  for args in (sess.get_inputs(), sess.get_outputs())]
            self._check_io(Path(directory) / record["graphs"][g]["file"], g, *io)
        self._values: dict[str, Any] = {}  # OrtValues over host buffers: must live as long as the bindings
        self._bindings: dict[tuple[str, int | None, int], Any] = {}

    def _value(self, name: str) -> Any:
        buf = self.buffers[name]
        if self.device != "cpu":
            return buf  # OrtCudaBuffers hold OrtValues
        if name not in self._values:  # a view of the numpy memory, no copy
            if self.buffers.dtypes[name] == "bfloat16":
                self._values[name] = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buf, _ONNX_BFLOAT16)
            else:
                self._values[name] = self._ort.OrtValue.ortvalue_from_numpy(buf)
        return self._values[name]

    def _binding(self, graph: str, src: int | None, dst: int) -> Any:
        key = (graph, src, dst)
        if key not in self._bindings:
            b = self.sessions[graph].io_binding()
            b.bind_ortvalue_input("latents", self._value("latents"))
            b.bind_ortvalue_output("pixels", self._value(f"pixels_{graph}"))
            for c in self.caches:
                if src is not None:
                    b.bind_ortvalue_input(c["input"], self._value(_set_name(c["input"], src)))
                b.bind_ortvalue_output(c["output"], self._value(_set_name(c["input"], dst)))
            self._bindings[key] = b
        return self._bindings[key]

    def _run(self, graph: str, src: int | None, dst: int) -> None:
        self.sessions[graph].run_with_iobinding(self._binding(graph, src, dst))


# -- TensorRT -----------------------------------------------------------------------------------

_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


class TrtStreamDecoder(_Decoder):
    """TensorRT engines of the two graphs (TensorRT 10.x / 11.x Python API), caches in cudaMalloc'd
    buffers bound with `set_tensor_address`; the chunk runs with `execute_async_v3` on the buffers' stream.

    `engines` maps "first"/"next" to engine files (default: the graph file names with `.engine`),
    built for example with `ispa_export.builder.engine.build_engine(onnx, engine, refit=False, ...)`.
    """

    def __init__(self, directory: str | os.PathLike, record: dict[str, Any] | None = None,
                 engines: dict[str, str | os.PathLike] | None = None, device_id: int = 0,
                 cache_mode: str = "pingpong", verify: bool = True) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError("TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)") from None

        self._trt = trt
        record = record if record is not None else load_record(directory, verify)
        engines = engines or {g: Path(record["graphs"][g]["file"]).with_suffix(".engine") for g in GRAPHS}
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = {}, {}
        super().__init__(directory, record, CudaBuffers(device_id), cache_mode, verify)
        for g in GRAPHS:
            path = Path(directory) / engines[g]
            engine = runtime.deserialize_cuda_engine(path.read_bytes()) if path.is_file() else None
            if engine is None:
                raise _fail(path, "file", "a TensorRT engine for this TensorRT version and GPU", "none loadable")
            io: list[dict[str, tuple[tuple[int, ...], str]]] = [{}, {}]
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                kind = 0 if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else 1
                dtype = _TRT_DTYPES.get(engine.get_tensor_dtype(name).name, engine.get_tensor_dtype(name).name)
                io[kind][name] = (tuple(engine.get_tensor_shape(name)), dtype)
            self._check_io(path, g, *io)
            self.engines[g], self.contexts[g] = engine, engine.create_execution_context()

    def _bind(self, context: Any, name: str, buffer: str) -> None:
        # cudaMalloc addresses are 256-byte aligned, as set_tensor_address requires.
        if not context.set_tensor_address(name, self.buffers.address(buffer)):
            raise RuntimeError(f"TensorRT set_tensor_address failed for {name!r}")

    def _run(self, graph: str, src: int | None, dst: int) -> None:
        # Ping-pong swaps the cache addresses each chunk; ~65 pointer updates cost nothing next to the decode.
        ctx = self.contexts[graph]
        self._bind(ctx, "latents", "latents")
        self._bind(ctx, "pixels", f"pixels_{graph}")
        for c in self.caches:
            if src is not None:
                self._bind(ctx, c["input"], _set_name(c["input"], src))
            self._bind(ctx, c["output"], _set_name(c["input"], dst))
        # Asynchronous: the pixels' download (and the copy strategy's copies) follow on the same stream.
        if not ctx.execute_async_v3(self.buffers.stream):
            raise RuntimeError(f"{self.directory}: TensorRT execute_async_v3 failed for the {graph} graph")

    def close(self) -> None:
        """Free the device buffers now rather than at garbage collection."""
        self.buffers.close()
