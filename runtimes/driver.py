"""The streaming driver: owns the ring-buffer caches and runs the chunk loop on any runner.

A runner is anything with `input_names` and `run(feeds, info) -> outputs` over numpy arrays: the
PyTorch module (ispa_export.torch_runner), ONNX Runtime (runtimes.ort) or TensorRT (runtimes.trt).
The same driver, the same noise, the same ring arithmetic for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .schedule import chunk_noise, flow_step, renoise, ring_slot, warped_timesteps

FULL, LOCAL = "F", "L"


@dataclass(frozen=True)
class PassInfo:
    chunk: int
    start: int  # absolute index of the chunk's first frame
    pass_kind: int  # denoising step index, or len(timesteps) for the cache pass


class Runner(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], info: PassInfo) -> dict[str, np.ndarray]: ...


@dataclass
class CacheGroup:
    """Fixed-size K/V of the layers that share one capacity: [layers, 2, B, capacity*P, heads, head_dim].

    `frames[slot]` is the absolute frame a slot holds (-1: empty); keys carry their RoPE already, so
    the order of slots does not matter and the validity mask is all the graph needs.
    """

    capacity: int
    sink: int
    tokens_per_frame: int
    data: np.ndarray
    frames: np.ndarray

    @classmethod
    def empty(cls, layers: int, capacity: int, sink: int, batch: int, tokens_per_frame: int, heads: int,
              head_dim: int, dtype) -> "CacheGroup":
        data = np.zeros((layers, 2, batch, capacity * tokens_per_frame, heads, head_dim), dtype=dtype)
        return cls(capacity, sink, tokens_per_frame, data, np.full(capacity, -1, dtype=np.int64))

    @property
    def mask(self) -> np.ndarray:
        return self.frames >= 0

    def slot_tokens(self, slot: int) -> slice:
        return slice(slot * self.tokens_per_frame, (slot + 1) * self.tokens_per_frame)

    def write(self, new_kv: np.ndarray, start: int) -> None:
        """Store a chunk's K/V [layers, 2, B, f*P, heads, head_dim] for frames start, start+1, ..."""
        p = self.tokens_per_frame
        for i in range(new_kv.shape[3] // p):
            slot = ring_slot(start + i, self.capacity, self.sink)
            self.data[:, :, :, self.slot_tokens(slot)] = new_kv[:, :, :, i * p:(i + 1) * p]
            self.frames[slot] = start + i


@dataclass
class Geometry:
    """What the driver needs to know of the graph; read from manifest.json by deployments."""

    modes: list[str]
    batch: int
    channels: int
    chunk_frames: int
    height: int
    width: int
    tokens_per_frame: int
    heads: int
    head_dim: int
    full_capacity: int
    full_sink: int
    local_capacity: int
    local_sink: int
    dtype: str = "float32"
    timesteps: list[float] = field(default_factory=warped_timesteps)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.chunk_frames, self.height, self.width)

    def empty_group(self, mode: str) -> CacheGroup:
        cap, sink = ((self.full_capacity, self.full_sink) if mode == FULL
                     else (self.local_capacity, self.local_sink))
        return CacheGroup.empty(self.modes.count(mode), cap, sink, self.batch, self.tokens_per_frame,
                                self.heads, self.head_dim, np.dtype(self.dtype))


class Stream:
    """Generates chunk after chunk; `state` can be handed off between backends (state.safetensors)."""

    def __init__(self, runner: Runner, geometry: Geometry, cross_kv: np.ndarray, seed: int,
                 constants: dict[str, np.ndarray] | None = None):
        self.runner = runner
        self.geo = geometry
        self.seed = seed
        self.cross_kv = cross_kv
        self.constants = constants or {}  # e.g. ispa_weight/ispa_bias when modulation is an input
        self.chunk = 0
        self.frame_index = 0
        self.groups = {m: geometry.empty_group(m) for m in (FULL, LOCAL)}
        self.latents: list[np.ndarray] = []

    # -- one chunk ---------------------------------------------------------------------------
    def feeds(self, x: np.ndarray, t: float, pass_kind: int) -> dict[str, np.ndarray]:
        dtype = np.dtype(self.geo.dtype)
        feeds = {
            "latents": x.astype(dtype, copy=False),
            "timestep": np.full((self.geo.batch,), t, dtype=np.float32),
            "frame_index": np.array(self.frame_index, dtype=np.int64),
            "cross_kv": self.cross_kv,
            "pass_kind": np.array(pass_kind, dtype=np.int64),
        }
        for mode, name in ((FULL, "kv_full"), (LOCAL, "kv_local")):
            group = self.groups[mode]
            if group.data.shape[0]:
                feeds[name], feeds[name + "_mask"] = group.data, group.mask
        feeds.update(self.constants)
        names = set(self.runner.input_names)
        return {k: v for k, v in feeds.items() if k in names}

    def _run(self, x: np.ndarray, t: float, pass_kind: int) -> dict[str, np.ndarray]:
        info = PassInfo(self.chunk, self.frame_index, pass_kind)
        return self.runner.run(self.feeds(x, t, pass_kind), info)

    def step(self, given: np.ndarray | None = None) -> np.ndarray:
        """Denoise the next chunk with the few-step schedule, then write its K/V (cache pass at t=0).

        With `given` frames [B, C, f, H, W] the cache pass stores those instead of the sample
        (teacher forcing: continue a known video, or monitor on real frames)."""
        ts = self.geo.timesteps
        shape = self.geo.chunk_shape
        noisy = chunk_noise(self.seed, self.chunk, 0, shape)
        for k, t in enumerate(ts):
            pred = self._run(noisy, t, k)["prediction"].astype(np.float32)
            x0 = flow_step(noisy, pred, t / 1000.0)
            if k + 1 < len(ts):
                noisy = renoise(x0, chunk_noise(self.seed, self.chunk, k + 1, shape), ts[k + 1] / 1000.0)
        if given is not None:
            x0 = given.astype(np.float32)
        out = self._run(x0, 0.0, len(ts))
        for mode, name in ((FULL, "new_kv_full"), (LOCAL, "new_kv_local")):
            if self.groups[mode].data.shape[0]:
                self.groups[mode].write(out[name], self.frame_index)
        self.latents.append(x0)
        self.chunk += 1
        self.frame_index += self.geo.chunk_frames
        return x0

    def run(self, chunks: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Generate `chunks` more chunks; returns their latents [B, C, chunks*f, H, W]."""
        out = []
        for _ in range(chunks):
            out.append(self.step())
            if progress is not None:
                progress(1)
        return np.concatenate(out, axis=2)

    # -- the transition ----------------------------------------------------------------------
    def relayout(self, modes: list[str], local_capacity: int, local_sink: int) -> None:
        """Switch layer modes: a layer going local keeps only the frames its sink + window retains."""
        old_modes, old = self.geo.modes, self.groups
        if len(modes) != len(old_modes):
            raise ValueError(f"expected {len(old_modes)} layer modes, got {len(modes)}")
        self.geo.modes, self.geo.local_capacity, self.geo.local_sink = list(modes), local_capacity, local_sink
        new = {m: self.geo.empty_group(m) for m in (FULL, LOCAL)}
        pos = {FULL: 0, LOCAL: 0}
        src_pos = {FULL: 0, LOCAL: 0}
        for was, now in zip(old_modes, modes):
            src, dst = old[was], new[now]
            i, j = src_pos[was], pos[now]
            for slot, frame in enumerate(src.frames):
                if frame < 0:
                    continue
                keep = frame < dst.sink or frame >= self.frame_index - (dst.capacity - dst.sink)
                if keep:
                    d = ring_slot(int(frame), dst.capacity, dst.sink)
                    dst.data[j, :, :, dst.slot_tokens(d)] = src.data[i, :, :, src.slot_tokens(slot)]
                    dst.frames[d] = frame
            src_pos[was] += 1
            pos[now] += 1
        self.groups = new

    # -- handoff -----------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "kv_full": self.groups[FULL].data, "kv_full_frames": self.groups[FULL].frames,
            "kv_local": self.groups[LOCAL].data, "kv_local_frames": self.groups[LOCAL].frames,
            "cross_kv": self.cross_kv,
            "frame_index": np.array(self.frame_index, dtype=np.int64),
            "chunk": np.array(self.chunk, dtype=np.int64),
            "seed": np.array(self.seed, dtype=np.int64),
            "latents": (np.concatenate(self.latents, axis=2) if self.latents
                        else np.zeros(self.geo.chunk_shape[:2] + (0,) + self.geo.chunk_shape[3:], np.float32)),
        }
        arrays.update(self.constants)
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for mode, name in ((FULL, "kv_full"), (LOCAL, "kv_local")):
            group = self.groups[mode]
            for key, want in ((name, group.data), (name + "_frames", group.frames)):
                got = arrays[key]
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"state field {key!r}: expected {want.dtype}{list(want.shape)}, "
                                     f"found {got.dtype}{list(got.shape)}")
            group.data[...] = arrays[name]
            group.frames[...] = arrays[name + "_frames"]
        self.cross_kv = arrays["cross_kv"]
        self.frame_index = int(arrays["frame_index"])
        self.chunk = int(arrays["chunk"])
        self.seed = int(arrays["seed"])
        lat = arrays["latents"]
        f = self.geo.chunk_frames
        self.latents = [lat[:, :, i:i + f] for i in range(0, lat.shape[2], f)]
