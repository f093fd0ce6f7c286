"""Exact KV-cache bytes of a configuration: what a deployment must allocate, per layer and in total."""
from __future__ import annotations

from dataclasses import dataclass

from graphs.config import WanConfig
from runtimes.groups import Span, as_layout, group_name

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVBytes:
    per_layer: list[int]  # steady-state self-attention cache of each layer (K and V)
    layout: list[Span | None]  # per layer: None = full, else its local span
    full_layer: int  # bytes of one F-layer's cache
    cross: int  # text cross-attention K/V of all layers (fixed, one prompt)

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    def by_group(self) -> dict[str, int]:
        """Bytes of each cache group (runtimes.groups naming), summed over its layers."""
        out: dict[str, int] = {}
        for span, b in zip(self.layout, self.per_layer):
            out[group_name(span)] = out.get(group_name(span), 0) + b
        return out


def frame_bytes(cfg: WanConfig, dtype: str = "float32", batch: int = 1) -> int:
    """K and V of one latent frame in one layer."""
    try:
        item = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}") from None
    return 2 * batch * cfg.tokens_per_frame * cfg.dim * item


def kv_bytes(cfg: WanConfig, layout: list | None = None, dtype: str = "float32", batch: int = 1) -> KVBytes:
    """F-layers (None) hold `max_frames` frames, a local layer its span's sink + window, at steady state."""
    layout = as_layout(layout) if layout is not None else [None] * cfg.num_layers
    fb = frame_bytes(cfg, dtype, batch)
    full = cfg.max_frames * fb
    cross = cfg.num_layers * 2 * batch * cfg.text_len * cfg.dim * DTYPE_BYTES[dtype]
    return KVBytes([full if s is None else s.frames * fb for s in layout], layout, full, cross)


def uniform_layout(num_layers: int, local_layers, sink: int, window: int) -> list[Span | None]:
    """`local_layers` at one span (sink + window), the others full."""
    local = set(local_layers)
    return [Span(sink, window) if i in local else None for i in range(num_layers)]


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
