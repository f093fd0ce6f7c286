"""The graph's cache groups: which layers share one fixed-size K/V buffer, and what it is called.

Each layer is full (F: the whole capacity M, `full_sink` frames pinned) or local with its own span
(`sink` pinned frames + the `window` most recent ones). Layers with the same span share one buffer
[layers, 2, B, capacity*P, heads, head_dim]: a graph has `kv_full` plus one group per distinct local
span, named from the span (`kv_s1w5`: sink 1, window 5) and ordered by (sink, window). The model
(graphs/wan.py), the exporter, the manifest and the driver all derive their groups here, from the
same per-layer layout, so they cannot disagree on a name, an order or a layer's position.

Plain Python: the deployable runtime and the PyTorch side import it alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

FULL = "kv_full"  # the F-layers' group (also the key monitor.py reads the warmup's cache by)
PREDICTION = "prediction"
_LOCAL = re.compile(r"kv_s(\d+)w(\d+)")


class Span(NamedTuple):
    """A local layer's cache: the first `sink` frames of the video and the `window` most recent ones."""

    sink: int
    window: int

    @property
    def frames(self) -> int:
        return self.sink + self.window


def as_layout(spans: Iterable[Any]) -> list[Span | None]:
    """Per layer None (full attention) or a Span, from anything with `sink` and `window` (policy's
    LocalSpan, a Span)."""
    return [None if s is None else Span(int(s.sink), int(s.window)) for s in spans]


def group_name(span: Any) -> str:
    """`kv_full` for a full layer (None), `kv_s{sink}w{window}` for a local span."""
    return FULL if span is None else f"kv_s{span.sink}w{span.window}"


def is_cache_name(name: str) -> bool:
    """Whether `name` is a cache group's (a graph input fed from the handoff state)."""
    return name == FULL or _LOCAL.fullmatch(name) is not None


def new_kv_name(group: str) -> str:
    """The graph output that holds a chunk's new K/V of a group."""
    return "new_" + group


def is_new_kv_name(name: str) -> bool:
    return name.startswith("new_") and is_cache_name(name[len("new_"):])


@dataclass(frozen=True)
class GroupSpec:
    """One cache group: `capacity` frames (the first `sink` pinned) of the layers `layers`, in that
    order along the buffer's first axis."""

    name: str
    capacity: int
    sink: int
    layers: tuple[int, ...]

    @property
    def window(self) -> int:
        """Frames of the rolling part (the most recent ones)."""
        return self.capacity - self.sink


def cache_groups(layout: list[Span | None], full_capacity: int, full_sink: int) -> list[GroupSpec]:
    """`kv_full` (when some layer is full), then one group per distinct span, by (sink, window).
    A group exists only where it has layers."""
    full = tuple(i for i, s in enumerate(layout) if s is None)
    groups = [GroupSpec(FULL, full_capacity, full_sink, full)] if full else []
    for span in sorted({s for s in layout if s is not None}):
        layers = tuple(i for i, s in enumerate(layout) if s == span)
        if span.sink < 0 or span.window < 1:
            # A ring needs a rolling part.
            raise ValueError(f"layers {list(layers)}: local span sink {span.sink} + window {span.window}: "
                             f"expected sink >= 0 and window >= 1 frames")
        groups.append(GroupSpec(group_name(span), span.frames, span.sink, layers))
    return groups


def placement(groups: list[GroupSpec]) -> list[tuple[str, int]]:
    """Per layer: (its group's name, its position in that group's buffer)."""
    out: dict[int, tuple[str, int]] = {}
    for g in groups:
        for position, layer in enumerate(g.layers):
            out[layer] = (g.name, position)
    return [out[layer] for layer in range(len(out))]


def output_names(groups: list[GroupSpec]) -> list[str]:
    """The chunk step's outputs, in the order the model returns them."""
    return [PREDICTION, *(new_kv_name(g.name) for g in groups)]
