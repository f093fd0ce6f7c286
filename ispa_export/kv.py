"""Exact KV-cache bytes of a configuration: what a deployment must allocate, per layer and in total."""
from __future__ import annotations

from dataclasses import dataclass

from graphs.config import WanConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVBytes:
    per_layer: list[int]  # steady-state self-attention cache of each layer (K and V)
    modes: list[str]
    full_layer: int  # bytes of one F-layer's cache
    local_layer: int  # bytes of one L-layer's cache
    cross: int  # text cross-attention K/V of all layers (fixed, one prompt)

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    def by_mode(self) -> dict[str, int]:
        out = {"F": 0, "L": 0}
        for m, b in zip(self.modes, self.per_layer):
            out[m] += b
        return out


def frame_bytes(cfg: WanConfig, dtype: str = "float32", batch: int = 1) -> int:
    """K and V of one latent frame in one layer."""
    try:
        item = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}") from None
    return 2 * batch * cfg.tokens_per_frame * cfg.dim * item


def kv_bytes(cfg: WanConfig, modes: list[str] | None = None, window: int = 0, sink: int = 0,
             dtype: str = "float32", batch: int = 1) -> KVBytes:
    """F-layers hold `max_frames` frames, L-layers `sink + window`, at steady state."""
    modes = list(modes) if modes is not None else ["F"] * cfg.num_layers
    fb = frame_bytes(cfg, dtype, batch)
    full, local = cfg.max_frames * fb, (sink + window) * fb
    cross = cfg.num_layers * 2 * batch * cfg.text_len * cfg.dim * DTYPE_BYTES[dtype]
    return KVBytes([full if m == "F" else local for m in modes], modes, full, local, cross)


def layers_for_target(cfg: WanConfig, reduction: float, window: int, sink: int) -> int:
    """Fewest L-layers whose removed frames reach `reduction` of the steady-state KV bytes."""
    saved_per_layer = cfg.max_frames - sink - window
    if saved_per_layer <= 0:
        raise ValueError(f"sink {sink} + window {window} frames saves nothing against the full "
                         f"capacity of {cfg.max_frames} frames")
    need = reduction * cfg.num_layers * cfg.max_frames
    n = -(-round(need * 1e9) // round(saved_per_layer * 1e9))  # ceil without float slop
    if n > cfg.num_layers:
        best = saved_per_layer / cfg.max_frames
        raise ValueError(f"KV reduction {reduction:.0%} is out of reach with sink {sink} + window {window}: "
                         f"at most {best:.0%} with every layer local")
    return n
