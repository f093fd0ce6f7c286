"""The streaming driver: runs the chunk loop and the ring arithmetic of the caches on any runner.

A runner has `input_names`, `buffers` (runtimes.buffers: its device's memory, where the driver
allocates the caches once) and `run(feeds, info)`, which takes the per-step host inputs, binds the
rest from its buffers, and returns `prediction` on the host and the chunk's new K/V as buffers of its
device: the PyTorch module (ispa_export.video.torch_runner), ONNX Runtime (runtimes.ort) or TensorRT
(runtimes.trt). The same driver, the same noise, the same ring arithmetic for all of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from .buffers import Buffers, host_dtype
from .groups import GroupSpec, Span, as_layout, cache_groups, new_kv_name, placement
from .schedule import ROPE_THETA, chunk_noise, flow_step, frame_rope, renoise, ring_slot, warped_timesteps

FULL_MODE, LOCAL_MODE = "F", "L"


@dataclass(frozen=True)
class PassInfo:
    chunk: int
    start: int  # absolute index of the chunk's first frame
    pass_kind: int  # denoising step index, or len(timesteps) for the cache pass


class Runner(Protocol):
    input_names: list[str]
    buffers: Buffers

    def run(self, feeds: dict[str, np.ndarray], info: PassInfo) -> dict[str, Any]: ...


@dataclass
class CacheGroup:
    """Fixed-size K/V of the layers that share one capacity and sink (the F-layers, or one local span):
    [layers, 2, B, capacity*P, heads, head_dim].

    The data live in the runner's buffers (on its device, in the graph's dtype) under `name`;
    `frames[slot]` is the absolute frame a slot holds (-1: empty), kept on the host. Keys carry their
    RoPE already, so the order of slots does not matter and the validity mask is all the graph needs.
    """

    name: str
    layers: tuple[int, ...]  # model layers, in buffer order
    capacity: int
    sink: int
    tokens_per_frame: int
    buffers: Buffers
    frames: np.ndarray

    @property
    def data(self):
        """The group's buffer on the runner's device."""
        return self.buffers[self.name]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the group (exact: shape x itemsize of the device buffer)."""
        return self.buffers.nbytes(self.name)

    @property
    def mask(self) -> np.ndarray:
        return self.frames >= 0

    def slots(self, start: int, count: int) -> list[int]:
        return [ring_slot(start + i, self.capacity, self.sink) for i in range(count)]

    def write(self, new_kv, count: int, start: int) -> None:
        """Store a chunk's K/V [layers, 2, B, count*P, heads, head_dim] (a buffer of the runner's device)
        for frames start, start+1, ...: one device-to-device copy per run of consecutive slots."""
        slots = self.slots(start, count)
        shape = self.buffers.shapes[self.name]
        new_shape = shape[:3] + (count * self.tokens_per_frame,) + shape[4:]
        self.buffers.store_frames(self.name, new_kv, new_shape, slots, self.tokens_per_frame)
        self.frames[slots] = np.arange(start, start + count)


@dataclass
class Geometry:
    """What the driver needs to know of the graph; read from manifest.json by deployments.

    `layout` gives each layer's attention: None (full, capacity `full_capacity` with `full_sink`
    pinned frames) or its local Span; the cache groups follow from it (runtimes.groups)."""

    layout: list[Span | None]
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
    dtype: str = "float32"
    timesteps: list[float] = field(default_factory=warped_timesteps)
    rope_theta: float = ROPE_THETA

    def __post_init__(self) -> None:
        self.layout = as_layout(self.layout)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.chunk_frames, self.height, self.width)

    @property
    def rope_pairs(self) -> int:
        """Rotary channel pairs of the frame axis (Wan splits head_dim/2 pairs [c - 2*(c//3), c//3, c//3])."""
        c = self.head_dim // 2
        return c - 2 * (c // 3)

    @property
    def modes(self) -> list[str]:
        """'F' or 'L' per layer."""
        return [FULL_MODE if s is None else LOCAL_MODE for s in self.layout]

    @property
    def groups(self) -> list[GroupSpec]:
        return cache_groups(self.layout, self.full_capacity, self.full_sink)

    def group_shape(self, group: GroupSpec) -> tuple[int, ...]:
        """The group's buffer: [layers, 2, batch, capacity*tokens_per_frame, heads, head_dim]."""
        return (len(group.layers), 2, self.batch, group.capacity * self.tokens_per_frame, self.heads, self.head_dim)

    def new_kv_shape(self, group: GroupSpec) -> tuple[int, ...]:
        """A chunk's new K/V of the group: [layers, 2, batch, chunk_frames*tokens_per_frame, heads, head_dim]."""
        return (len(group.layers), 2, self.batch, self.chunk_frames * self.tokens_per_frame, self.heads,
                self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `geometry` (spans as {"sink", "window"} objects)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["layout"] = [None if s is None else s._asdict() for s in self.layout]
        out["timesteps"] = list(self.timesteps)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        """From a manifest's `geometry` that passed the schema (runtimes.manifest_schema)."""
        return cls(**{**d, "layout": [None if s is None else Span(**s) for s in d["layout"]],
                      "timesteps": [float(t) for t in d["timesteps"]], "rope_theta": float(d["rope_theta"])})


class Stream:
    """Generates chunk after chunk; `state_arrays()` can be handed off between backends (state.safetensors).

    The caches, the text K/V and the per-instance constants live in `runner.buffers`, allocated once
    on the runner's device; a steady-state step sends the chunk's latents, its timestep, RoPE angles
    and cache masks, and brings back the prediction. With `keep_latents` the stream also keeps every
    latent it made (the warmup's handoff needs them); a deployment streams them out instead.
    """

    def __init__(self, runner: Runner, geometry: Geometry, cross_kv: np.ndarray, seed: int,
                 constants: dict[str, np.ndarray] | None = None, keep_latents: bool = True):
        self.runner = runner
        self.buffers: Buffers = runner.buffers
        self.geo = geometry
        self.seed = seed
        self.chunk = 0
        self.frame_index = 0
        self.keep_latents = keep_latents
        self.latents: list[np.ndarray] = []
        self.sample: np.ndarray | None = None
        self._rope_cache: tuple[int, np.ndarray | None] = (-1, None)
        self.static_inputs = ["cross_kv"]
        self._upload("cross_kv", cross_kv)
        for name, value in (constants or {}).items():  # e.g. ispa_weight/ispa_bias when modulation is an input
            self._upload(name, value)
            self.static_inputs.append(name)
        self.groups = self._allocate(self.geo)

    def _upload(self, name: str, value: np.ndarray) -> None:
        self.buffers.allocate(name, value.shape, value.dtype.name)
        self.buffers.upload(name, value)

    def use(self, runner: Runner, constants: dict[str, np.ndarray]) -> None:
        """Go on with another runner over the same buffers (a video's warmup hands its caches to the
        deployment's step where both are PyTorch on one device), with these fixed inputs."""
        if runner.buffers is not self.buffers:
            raise ValueError("Stream.use: the runner must own this stream's buffers")
        self.runner = runner
        for name, value in constants.items():
            self._upload(name, value)
            if name not in self.static_inputs:
                self.static_inputs.append(name)

    def _allocate(self, geo: Geometry, suffix: str = "") -> dict[str, CacheGroup]:
        """One buffer per cache group of `geo` (named `<group><suffix>`), keyed by group name."""
        groups = {}
        for spec in geo.groups:
            self.buffers.allocate(spec.name + suffix, geo.group_shape(spec), geo.dtype)
            groups[spec.name] = CacheGroup(spec.name + suffix, spec.layers, spec.capacity, spec.sink,
                                           geo.tokens_per_frame, self.buffers, np.full(spec.capacity, -1, np.int64))
        return groups

    @property
    def cross_kv(self) -> np.ndarray:
        return self.buffers.download("cross_kv")

    # -- one chunk ---------------------------------------------------------------------------
    def feeds(self, x: np.ndarray, t: float, pass_kind: int) -> dict[str, np.ndarray]:
        """The per-step host inputs; the caches, text K/V and constants are bound from the buffers."""
        feeds = {
            "latents": x,
            "timestep": np.full((self.geo.batch,), t, dtype=np.float32),
            "rope_frame": self._rope(),
            "pass_kind": np.array(pass_kind, dtype=np.int64),
        }
        for group in self.groups.values():
            feeds[group.name + "_mask"] = group.mask
        names = set(self.runner.input_names)
        return {k: v for k, v in feeds.items() if k in names}

    def _rope(self) -> np.ndarray:
        # The same for the chunk's 4 denoising passes and its cache pass: computed once per chunk.
        if self._rope_cache[0] != self.frame_index:
            self._rope_cache = (self.frame_index, frame_rope(self.frame_index, self.geo.chunk_frames,
                                                             self.geo.rope_pairs, self.geo.rope_theta))
        return self._rope_cache[1]

    def _run(self, x: np.ndarray, t: float, pass_kind: int) -> dict:
        info = PassInfo(self.chunk, self.frame_index, pass_kind)
        return self.runner.run(self.feeds(x, t, pass_kind), info)

    def step(self, given: np.ndarray | None = None) -> np.ndarray:
        """Denoise the next chunk with the few-step schedule, then write its K/V (cache pass at t=0).

        With `given` frames [B, C, f, H, W] the cache pass stores those instead of the sample
        (teacher forcing: continue a known video, or monitor on real frames). Returns the chunk's
        latents (float32, on the host)."""
        ts = self.geo.timesteps
        shape = self.geo.chunk_shape
        noisy = chunk_noise(self.seed, self.chunk, 0, shape)
        for k, t in enumerate(ts):
            pred = np.asarray(self._run(noisy, t, k)["prediction"], dtype=np.float32)
            x0 = flow_step(noisy, pred, t / 1000.0)
            if k + 1 < len(ts):
                noisy = renoise(x0, chunk_noise(self.seed, self.chunk, k + 1, shape), ts[k + 1] / 1000.0)
        self.sample = x0  # the chunk's own sample, also when `given` replaces it in the cache
        if given is not None:
            x0 = np.asarray(given, dtype=np.float32)
        out = self._run(x0, 0.0, len(ts))
        for group in self.groups.values():
            group.write(out[new_kv_name(group.name)], self.geo.chunk_frames, self.frame_index)
        if self.keep_latents:
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
    def relayout(self, layout: list[Any]) -> None:
        """Give each layer its new span (None: full attention), moving it into that span's group: it
        keeps only the frames the new group retains. The frames move on the device, one layer-frame
        copy each; the old buffers are freed after."""
        old_geo, old = self.geo, self.groups
        geo = dataclasses.replace(old_geo, layout=layout)
        if len(geo.layout) != len(old_geo.layout):
            raise ValueError(f"expected {len(old_geo.layout)} layer spans, got {len(geo.layout)}")
        specs = {g.name: g for g in geo.groups}
        # Planned on the host first: one mask serves a whole group, so every layer moving into it must
        # bring the same frames (a layer cannot give a frame its old cache no longer holds). Kept: what
        # graphs.masks.retained says the new span holds when the next chunk runs.
        moves, brought = [], {}
        for layer, ((was, src_pos), (now, dst_pos)) in enumerate(zip(placement(old_geo.groups),
                                                                     placement(geo.groups))):
            dst = specs[now]
            frames = [(slot, f) for slot, f in enumerate(old[was].frames.tolist())
                      if 0 <= f < self.frame_index and (f < dst.sink or f >= self.frame_index - dst.window)]
            first, want = brought.setdefault(now, (layer, sorted(f for _, f in frames)))
            if sorted(f for _, f in frames) != want:
                raise ValueError(f"relayout: layers {first} and {layer} bring different frames into group {now!r} "
                                 f"({want} and {sorted(f for _, f in frames)}); expected the same history")
            moves += [(now, dst_pos, was, src_pos, slot, f) for slot, f in frames]
        new = self._allocate(geo, suffix=".next")
        for now, dst_pos, was, src_pos, slot, frame in moves:
            dst = new[now]
            d = ring_slot(frame, dst.capacity, dst.sink)
            self.buffers.copy_frame(dst.name, dst_pos, d, old[was].name, src_pos, slot, dst.tokens_per_frame)
            dst.frames[d] = frame
        for group in old.values():
            self.buffers.free(group.name)
        for name, group in new.items():
            self.buffers.rename(group.name, name)
            group.name = name
        self.geo, self.groups = geo, new

    # -- handoff -----------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The handoff state on the host: every cache group (`<name>` in the graph's dtype, bf16 as
        ml_dtypes, and `<name>_frames`), the text K/V and constants, the position, seed and latents."""
        arrays = {}
        for name, group in self.groups.items():
            arrays[name] = self.buffers.download(group.name)
            arrays[name + "_frames"] = group.frames.copy()
        for name in self.static_inputs:
            arrays[name] = self.buffers.download(name)
        arrays.update({
            "frame_index": np.array(self.frame_index, dtype=np.int64),
            "chunk": np.array(self.chunk, dtype=np.int64),
            "seed": np.array(self.seed, dtype=np.int64),
            "latents": (np.concatenate(self.latents, axis=2) if self.latents
                        else np.zeros(self.geo.chunk_shape[:2] + (0,) + self.geo.chunk_shape[3:], np.float32)),
        })
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        dtype = host_dtype(self.geo.dtype)
        for spec in self.geo.groups:
            group = self.groups[spec.name]
            for key, want_shape, want_dtype in ((spec.name, self.geo.group_shape(spec), dtype),
                                                (spec.name + "_frames", group.frames.shape, group.frames.dtype)):
                got = arrays.get(key)
                found = "no such field" if got is None else f"{got.dtype.name}{list(got.shape)}"
                if got is None or got.shape != tuple(want_shape) or got.dtype != want_dtype:
                    raise ValueError(f"state field {key!r}: expected {want_dtype.name}{list(want_shape)}, found {found}")
            self.buffers.upload(group.name, arrays[spec.name])
            group.frames[...] = arrays[spec.name + "_frames"]
        self._upload("cross_kv", arrays["cross_kv"])
        self.frame_index = int(arrays["frame_index"])
        self.chunk = int(arrays["chunk"])
        self.seed = int(arrays["seed"])
        if self.keep_latents:
            lat = arrays["latents"]
            f = self.geo.chunk_frames
            self.latents = [lat[:, :, i:i + f] for i in range(0, lat.shape[2], f)]
