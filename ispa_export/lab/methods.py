"""The methods the quality evaluation compares at equal KV bytes (ispa_export.lab.evaluate): ISPA,
its variants and the token-dropping baselines, and the spans a warmup can reach."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphs.config import WanConfig
from ispa_export.kv import layers_for_target
from ispa_export.method.monitor import LocalSpan

REDUCTIONS = (0.25, 0.5, 0.75)
HEADLINE = 0.5
# ispa-nosink / ispa-sink1: ISPA at the same span with the other sink choice (alt_span)
ALT_METHODS = ("ispa-nosink", "ispa-sink1")
MAIN_METHODS = ("ispa", *ALT_METHODS, "ispa-nocorr", "drop", "sink-window", "uniform", "uniform-nosink")
BASELINES = ("drop", "sink-window", "uniform", "uniform-nosink")  # the token-dropping methods ISPA must beat


@dataclass(frozen=True)
class Method:
    """One compressed configuration: which layers go local, their span and their correction."""

    name: str
    layers: tuple[int, ...]
    sink: int
    window: int
    variant: str = "none"  # ispa.VARIANTS
    site: str = "wo"
    rank: int | None = None
    rho: float | None = None  # None: the monitor's (the solver's default)
    stats: str = "wo"  # the warmup monitor whose statistics give the correction (Warmup.monitors)

    def key(self) -> tuple:
        """Identity of the run: two methods with the same key generate the same frames."""
        corr = (None if self.variant == "none" or not self.layers
                else (self.variant, self.site, self.rank, self.rho, self.stats))
        return (self.layers, self.sink, self.window, corr)

    @property
    def span(self) -> LocalSpan:
        return LocalSpan(self.sink, self.window)

    def spans(self, num_layers: int) -> list[LocalSpan | None]:
        """Per layer: the method's span for its layers, None (full) for the others."""
        return [self.span if i in self.layers else None for i in range(num_layers)]


def _lowest(d: np.ndarray, n: int) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in np.argsort(d, kind="stable")[:n]))


def alt_span(cfg: WanConfig, sink: int, window: int) -> tuple[int, int] | None:
    """The other sink choice at the same span: (0, s + w) for a sink span, (1, w - 1) for a plain
    window (when the cache can hold the sink through the warmup), else None."""
    span = sink + window
    if sink:
        return 0, span
    return (1, span - 1) if span >= 2 and span_fits(cfg, 1, span - 1) else None


def methods_for(reduction: float, cfg: WanConfig, sink: int, window: int, d: dict[str, np.ndarray],
                variants: bool = False, rank: int | None = None,
                rhos: tuple[float, ...] = ()) -> tuple[list[Method], list[str]]:
    """The methods compared at one KV reduction and notes on the ones not formed exactly.

    Every method holds the same steady-state KV bytes, except a uniform layout whose span would not
    be a whole number of frames: it is then rounded down (fewer bytes than the others) and noted.
    `d` holds per-layer discrepancies at the transition (Warmup.d): 'corrected'/'raw' for the span
    sink + window, 'alt_corrected'/'alt_raw' for alt_span() (absent when there is none)."""
    num_layers, max_frames, span = cfg.num_layers, cfg.max_frames, sink + window
    n = layers_for_target(cfg, reduction, window, sink)
    alt = alt_span(cfg, sink, window) if "alt_raw" in d else None
    notes: list[str] = []
    ispa_layers = _lowest(d["corrected"], n)
    # Raw d of the plain window and of the sink span, whichever of the two spans each one is.
    plain_raw = d["raw"] if sink == 0 else d["alt_raw"] if alt else None
    sink_raw = d["raw"] if sink else d["alt_raw"] if alt else None
    out = [Method("ispa", ispa_layers, sink, window, "full")]
    alt_name = None
    if alt:
        alt_name = "ispa-nosink" if sink else f"ispa-sink{alt[0]}"
        out.append(Method(alt_name, _lowest(d["alt_corrected"], n), *alt, "full", stats="alt"))
    out.append(Method("ispa-nocorr", ispa_layers, sink, window, "none"))
    if plain_raw is not None:
        out.append(Method("drop", _lowest(plain_raw, n), 0, span, "none"))
    if sink_raw is not None:
        s_sink = sink or alt[0]
        out.append(Method("sink-window", _lowest(sink_raw, n), s_sink, span - s_sink, "none"))
    else:
        notes.append(f"sink-window: a sink frame does not fit a span of {span} frames here; not run")
    # Every layer local with the span that keeps the same total frames (rounded down if need be).
    total = (num_layers - n) * max_frames + n * span
    per_layer = total // num_layers
    if total % num_layers:
        notes.append(f"uniform layouts at {reduction:.0%}: {total} cached frames over {num_layers} layers is "
                     f"{total / num_layers:.2f} frames a layer; run with {per_layer}, i.e. FEWER KV bytes "
                     f"than the other methods")
    all_layers = tuple(range(num_layers))
    # The sink form keeps the sink frames that the shared transition guarantees (this span's or the
    # other one's: evaluate_seed ends the warmup by their horizon).
    s_uni = sink or (alt[0] if alt else 0)
    if s_uni and per_layer > s_uni:
        out.append(Method("uniform", all_layers, s_uni, per_layer - s_uni, "none"))
    if per_layer >= 1:
        out.append(Method("uniform-nosink", all_layers, 0, per_layer, "none"))
    if variants:
        bases = [("ispa", ispa_layers, sink, window, "", d["raw"])]
        if alt:
            bases.append((alt_name, _lowest(d["alt_corrected"], n), *alt, "alt", d["alt_raw"]))
        for base, layers, s_, w_, stats, raw in bases:
            wo, adapter = stats or "wo", f"{stats}-adapter" if stats else "adapter"
            out += [
                Method(f"{base}-per_pass", layers, s_, w_, "per_pass", stats=wo),
                Method(f"{base}-bias", layers, s_, w_, "bias", stats=wo),
                Method(f"{base}-adapter", layers, s_, w_, "full", site="adapter", stats=adapter),
                Method(f"{base}-rawsel", _lowest(raw, n), s_, w_, "full", stats=wo),
            ]
            if rank is not None:
                out.append(Method(f"{base}-rank{rank}", layers, s_, w_, "full", rank=rank, stats=wo))
            out += [Method(f"{base}-rho{rho:g}", layers, s_, w_, "full", rho=rho, stats=wo) for rho in rhos]
    return out, notes


def sink_horizon_frames(cfg: WanConfig, sink: int) -> float:
    """The most frames of history at which the rolling full cache still holds frames < sink
    (ispa.sink_horizon); a transition to a span with that sink must come by then."""
    return float("inf") if sink <= cfg.full_sink else cfg.max_frames - cfg.full_sink + sink - 1


def span_fits(cfg: WanConfig, sink: int, window: int) -> bool:
    """Whether a warmup can be decided (two monitored chunks: ispa.decide) within the sink horizon;
    the first monitored chunk starts past the span."""
    f, span = cfg.chunk_frames, sink + window
    if span >= cfg.max_frames or window < 1:
        return False
    first = f * (span // f + 1)
    return first + 2 * f <= sink_horizon_frames(cfg, sink)
