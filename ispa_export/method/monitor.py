"""Warmup monitor: what each layer would lose by going local, and how much a fit recovers.

During the all-F warmup, every F-layer gives the monitor the global attention output a_g and the
local one a_l (sink + window of the same cache, same queries); the monitor accumulates the float64
statistics of the absorption solve per layer and pass kind, and the raw and held-out corrected
discrepancies per layer, chunk and pass kind. Tokens are never stored.

`WarmupMonitor` measures one candidate span; `SpanMonitors` measures several in the same warmup
(one extra masked attention per span and layer), which is what the allocation policy needs.

Held-out scores for the ridge choice: besides the fit with the monitor's own rho (the `curves`),
each finished chunk is scored, before it joins the fit, under fits with every rho of `rhos`. The
chunk's token-weighted statistics (weight 1 / ||W_o a_g||^2 per token) make the discrepancy of any
correction an exact quadratic form, so every rho is scored without keeping tokens.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from graphs.masks import retained
from runtimes.driver import PassInfo, Stream
from runtimes.groups import FULL

from ispa_export.errors import UserError
from ispa_export.method.solver import AbsorptionStats, Solution, corrected_residual, discrepancy, solve


@dataclass(frozen=True, order=True)
class LocalSpan:
    sink: int
    window: int

    @property
    def frames(self) -> int:
        return self.sink + self.window

    def __str__(self) -> str:
        return f"sink {self.sink} + window {self.window}"


# Ridge strengths scored on held-out warmup chunks (policy.choose_correction picks one per layer).
# The issue-13 measurement (rolling, window 5, 4 seeds) found rho 1e-2 harmful and 10-100 safe,
# so the grid spans the solver's default up to strong shrinkage.
RHO_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
# Warmup chunks the output gate scores, each under a fit that never saw it (builder.calibrate.output_gate);
# also the held-out chunks the per-layer gate looks at (policy.choose_correction).
GATE_CHUNKS = 3


class HeldOutScore:
    """Token-weighted statistics of one chunk: d(M) = mean_i ||r_i - M z_i||^2 / ||y_i||^2 for any
    correction M = [dW | db], exactly, from Gw = sum w z z^T, Cw = sum w r z^T, rrw = sum w ||r||^2."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.n = 0
        self.Gw: torch.Tensor | None = None
        self.Cw: torch.Tensor | None = None
        self.rrw = 0.0

    def update(self, z_in: torch.Tensor, r: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> None:
        w = 1.0 / (y.square().sum(1) + eps)
        z = torch.cat([z_in, torch.ones(z_in.shape[0], 1, dtype=z_in.dtype, device=z_in.device)], 1)
        if self.Gw is None:
            self.Gw = torch.zeros(z.shape[1], z.shape[1], dtype=self.dtype, device=z.device)
            self.Cw = torch.zeros(r.shape[1], z.shape[1], dtype=self.dtype, device=z.device)
        self.Gw.addmm_((z * w[:, None]).mT.to(self.dtype), z.to(self.dtype))
        self.Cw.addmm_((r * w[:, None]).mT.to(self.dtype), z.to(self.dtype))
        self.rrw += float((r.square().sum(1) * w).sum())
        self.n += r.shape[0]

    @property
    def raw(self) -> float:
        return self.rrw / self.n

    def corrected(self, sol: Solution) -> float:
        m = torch.cat([sol.weight_delta, sol.bias_delta[:, None]], 1).to(self.Gw.device)
        quad = float(((m @ self.Gw.double()) * m).sum())
        return max(self.rrw - 2.0 * float((self.Cw.double() * m).sum()) + quad, 0.0) / self.n

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.Gw, self.Cw) if v is not None)


@dataclass(frozen=True)
class Placement:
    """Where the statistics live. A chunk's partial sums accumulate next to the activations in
    `partial_dtype`; the float64 totals of finished chunks live on `totals_device` (None: next to
    the activations). Wan 14B keeps float32 partials on the GPU and float64 totals on the host
    (statistics_bytes sizes both)."""

    partial_dtype: torch.dtype = torch.float64
    totals_device: str | None = None


@dataclass
class WarmupMonitor:
    """Attach with `TorchRunner(before_pass=monitor.before_pass)`; `stream` must be set before running."""

    span: LocalSpan
    rho: float | None
    variant: str = "full"
    site: str = "wo"
    rank: int | None = None
    stream: Stream | None = None
    rhos: tuple[float, ...] = RHO_GRID  # scored on each held-out chunk (heldout)
    # Chunks skipped between the fit and the chunk it is scored on: 1 scores a fit one chunk older,
    # closer to how stale a correction is after the transition (rolling regime).
    holdout_gap: int = 0
    # Whether a pass whose full cache lost the span's sink frames is an error (a single-span warmup)
    # or just not monitored (one span among several: the policy then cannot pick it).
    strict_sink: bool = True
    # The layers measured (None: every full layer). A video absorbed into a deployment measures
    # only the layers the deployment makes local at this span.
    layers: frozenset[int] | None = None
    # Statistics per pass kind (what variant 'per_pass' solves from); otherwise one accumulator
    # per layer, a fifth of the memory.
    per_kind: bool = True
    # Running totals kept for the output gate's refits without the latest chunks (ispa.output_gate);
    # 0 where no output gate runs (a video's absorb).
    gate_chunks: int = GATE_CHUNKS
    # Keep a fit of the finished chunks to report each chunk's corrected d (`curves`).
    track_fit: bool = True
    placement: Placement = field(default_factory=Placement)
    # (layer, kind) -> statistics of finished chunks, and of the chunk in progress (held out);
    # kind 0 for every pass when not per_kind.
    stats: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    # layer -> chunk -> kind -> (raw, corrected)
    curves: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    fits: dict = field(default_factory=dict)  # layer -> Solution fitted on finished chunks
    monitored_chunks: list[int] = field(default_factory=list)
    # layer -> chunk -> {"raw": d, "rho": {rho: held-out d*}}; fit on chunks before (minus the gap)
    heldout: dict = field(default_factory=lambda: defaultdict(dict))
    local_masks: list[torch.Tensor] = field(default_factory=list)
    _scores: dict = field(default_factory=dict)  # layer -> HeldOutScore of the chunk in progress
    _totals: dict = field(default_factory=dict)  # layer -> deque of merged statistics after each chunk
    _info: PassInfo | None = None
    _chunk: int | None = None
    _device: torch.device | None = None  # the activations' (where partial sums and solves run)

    @property
    def totals_depth(self) -> int:
        """Totals kept per layer: the held-out fit `holdout_gap` chunks back, the output gate's refits."""
        return max(self.holdout_gap, self.gate_chunks) + 1

    # -- driver side -------------------------------------------------------------------------
    def before_pass(self, info: PassInfo):
        """Called by the runner before each pass; returns self when there is history to monitor."""
        if info.chunk != self._chunk:
            self._finish_chunk()
            self._chunk = info.chunk
        group = self.stream.groups[FULL]
        valid = group.frames >= 0
        keep = np.array([f >= 0 and retained(int(f), info.start, self.span.frames, self.span.sink) for f in group.frames])
        if not (valid & ~keep).any():  # history no longer than the local span: nothing is lost
            return None
        missing = sorted(set(range(min(self.span.sink, info.start))) - set(group.frames.tolist()))
        if missing and not self.strict_sink:
            return None
        if missing:  # a_l would lack the sink the L-layers keep (ispa.sink_horizon ends the warmup before)
            raise UserError(f"warmup monitor: chunk {info.chunk} starts at frame {info.start}, when the full cache "
                            f"of {group.capacity} frames no longer holds sink frames {missing}; end the warmup "
                            "earlier or use a model whose full cache pins them (full_sink)")
        if not self.monitored_chunks or self.monitored_chunks[-1] != info.chunk:
            self.monitored_chunks.append(info.chunk)
        self.local_masks = [torch.from_numpy(keep)]  # graphs.wan moves it to the activations' device
        self._info = info
        return self

    def masks(self, layer: int) -> list[torch.Tensor]:
        """The local masks the model computes a_l under for `layer` in this pass (graphs.wan.Monitor)."""
        return self.local_masks if self.layers is None or layer in self.layers else []

    def _finish_chunk(self) -> None:
        """Fold the finished chunk into the fit (after it was scored held-out) and refit."""
        if not self.pending:
            return
        chunk = self.monitored_chunks[-1]
        for layer, score in self._scores.items():
            past = self._totals.get(layer, ())
            entry = {"raw": score.raw, "rho": {}}
            if len(past) > self.holdout_gap:
                fit_stats = self._on_compute(past[-1 - self.holdout_gap])
                for rho in self.rhos:
                    entry["rho"][rho] = score.corrected(self._solve(fit_stats, rho))
            self.heldout[layer][chunk] = entry
        self._scores = {}
        touched = sorted({key[0] for key in self.pending})
        totals = self.placement.totals_device
        if self.per_kind:
            for key, s in self.pending.items():
                if key not in self.stats:
                    self.stats[key] = AbsorptionStats(s.name, device=totals)
                self.stats[key].merge(s)
        pending = self.pending
        self.pending = {}
        for layer in touched:
            if self.per_kind:
                total = self.layer_stats(layer)
            else:
                # The new total is a copy: the deque's older entries stay what they were.
                past = self._totals.get(layer)
                total = (past[-1].copy_to(totals) if past else AbsorptionStats(f"layer {layer}", device=totals))
                total.merge(pending[(layer, 0)])
                self.stats[(layer, 0)] = total
            self._totals.setdefault(layer, deque(maxlen=self.totals_depth)).append(total)
            if self.track_fit:
                self.fits[layer] = solve(self._on_compute(total), rho=self.rho,
                                         variant=self.variant, rank=self.rank, site=self.site)

    def _on_compute(self, stats: AbsorptionStats) -> AbsorptionStats:
        """Totals kept elsewhere (the host) are solved next to the activations, in float64."""
        return stats if self._device is None or stats.G.device == self._device else stats.copy_to(self._device)

    def _solve(self, stats: AbsorptionStats, rho: float) -> Solution:
        variant = "full" if self.variant == "none" else self.variant
        return solve(stats, rho=rho, variant=variant, rank=self.rank, site=self.site)

    def finish(self) -> None:
        self._finish_chunk()
        self._chunk = None

    # -- model side (graphs.wan.Monitor) -------------------------------------------------------
    def record(self, layer: int, x_in: torch.Tensor, a_global: torch.Tensor, a_locals: list[torch.Tensor],
               w_o: torch.Tensor) -> None:
        (a_local,) = a_locals
        dim = a_global.shape[-1]
        a_g = a_global.reshape(-1, dim).double()
        a_l = a_local.reshape(-1, dim).double()
        x = x_in.reshape(-1, dim).double()
        w = w_o.double()
        r = (a_g - a_l) @ w.T
        y = a_g @ w.T
        raw = discrepancy(r, y)
        fit = self.fits.get(layer)
        z = a_l if self.site == "wo" else x
        corrected = raw if fit is None else discrepancy(corrected_residual(fit, z, r), y)
        partial = self.placement.partial_dtype
        self._device = a_global.device
        self._scores.setdefault(layer, HeldOutScore(partial)).update(z, r, y)
        kind = self._info.pass_kind
        self.curves[layer][self._info.chunk][kind] = (raw, corrected)
        key = (layer, kind if self.per_kind else 0)
        if key not in self.pending:
            self.pending[key] = AbsorptionStats(f"layer {layer} pass {kind}" if self.per_kind else f"layer {layer}",
                                                dtype=partial)
        self.pending[key].update(a_l, r, x if self.site == "adapter" else None)

    # -- results -----------------------------------------------------------------------------
    def layer_stats(self, layer: int, kind: int | None = None) -> AbsorptionStats:
        if not self.per_kind:
            if kind is not None:
                raise ValueError(f"layer {layer}: statistics per pass kind were not kept (per_kind=False)")
            if (layer, 0) not in self.stats:
                raise ValueError(f"layer {layer}: no warmup statistics")
            return self.stats[(layer, 0)]
        parts = [s for (l, k), s in self.stats.items() if l == layer and (kind is None or k == kind)]
        if not parts:
            raise ValueError(f"layer {layer}: no warmup statistics")
        total = AbsorptionStats(f"layer {layer}", device=self.placement.totals_device)
        for s in parts:
            total = total.merge(s)
        return total

    def kinds(self) -> list[int]:
        return sorted({k for c in self.curves.values() for kinds in c.values() for k in kinds})

    def chunk_discrepancy(self, layer: int, chunk: int) -> tuple[float, float]:
        """Mean over the chunk's passes of (raw, held-out corrected) discrepancy."""
        vals = list(self.curves[layer][chunk].values())
        return float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))

    def stats_excluding(self, layer: int, back: int) -> AbsorptionStats | None:
        """The layer's statistics without its latest `back` monitored chunks (None: not kept)."""
        past = self._totals.get(layer, ())
        return past[-1 - back] if 0 <= back < len(past) else None

    def heldout_chunks(self, layer: int) -> list[int]:
        """Monitored chunks of `layer` scored under a fit of earlier chunks (the held-out ones)."""
        return [c for c, e in sorted(self.heldout[layer].items()) if e["rho"]]

    def solution(self, layer: int, kind: int | None = None, **overrides) -> Solution:
        opts = dict(rho=self.rho, variant=self.variant, rank=self.rank, site=self.site) | overrides
        stats = self.layer_stats(layer, kind)
        return solve(self._on_compute(stats), **opts)

    def held_bytes(self) -> int:
        """Bytes of every tensor of statistics this monitor holds now (tests check statistics_bytes)."""
        seen, total = set(), 0
        holders = [*self.stats.values(), *self.pending.values(), *(t for d in self._totals.values() for t in d)]
        for s in holders:
            if id(s) not in seen:
                seen.add(id(s))
                total += s.nbytes()
        total += sum(s.nbytes() for s in self._scores.values())
        total += sum(f.weight_delta.numel() * f.weight_delta.element_size()
                     + f.bias_delta.numel() * f.bias_delta.element_size() for f in self.fits.values())
        return total


@dataclass(frozen=True)
class StatsBytes:
    """Bytes of the warmup's statistics next to the activations (`device`) and where the float64
    totals live when that is elsewhere (`host`)."""

    device: int
    host: int

    @property
    def total(self) -> int:
        return self.device + self.host


def statistics_bytes(dim: int, layers: int, spans: int, pass_kinds: int, holdout_gap: int, *,
                     per_kind: bool = True, gate_chunks: int = GATE_CHUNKS, track_fit: bool = True,
                     site: str = "wo", placement: Placement = Placement()) -> StatsBytes:
    """The statistics a warmup holds at its peak, exactly as WarmupMonitor allocates them, for
    `layers` monitored layers at each of `spans` spans.

    Per layer and span, at the last pass of a chunk: the chunk's partial sums (one accumulator per
    pass kind, or one) and its held-out score, in placement.partial_dtype next to the activations;
    the finished chunks' float64 sums (per pass kind) and the running totals (`totals_depth`), on
    placement.totals_device; the current fit (float64, next to the activations). While a chunk is
    folded in, one more total exists for the layer being folded: counted once. An accumulator is
    G [(D+1)^2], C [D (D+1)], sum_r [D], sum_rr [1] (the adapter site adds G_x and C_x)."""
    d1 = dim + 1
    sums = d1 * d1 + dim * d1 + dim + 1
    if site == "adapter":
        sums += d1 * d1 + dim * d1
    score = d1 * d1 + dim * d1
    fit = dim * dim + dim if track_fit else 0
    partial = torch.empty((), dtype=placement.partial_dtype).element_size()
    depth = max(holdout_gap, gate_chunks) + 1
    kinds = pass_kinds if per_kind else 1
    near = (kinds * sums + score) * partial + fit * 8
    # per kind: the finished sums by kind plus totals merged from them; else the totals are the sums
    far = ((pass_kinds * sums if per_kind else 0) + depth * sums) * 8
    n = layers * spans
    near_total, far_total = n * near, n * far + sums * 8
    if placement.totals_device is None:
        return StatsBytes(near_total + far_total, 0)
    return StatsBytes(near_total, far_total)


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the statistics live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


@dataclass
class SpanMonitors:
    """Several candidate spans measured in one warmup: each pass, every span whose history is longer
    than it (and whose sink frames the full cache still holds) gets its own a_l from the same queries.
    Implements graphs.wan.Monitor; attach with `before_pass=monitors.before_pass`."""

    monitors: dict[LocalSpan, WarmupMonitor]
    local_masks: list[torch.Tensor] = field(default_factory=list)
    _active: list[WarmupMonitor] = field(default_factory=list)

    @classmethod
    def build(cls, spans: list[LocalSpan], rho: float | None, variant: str = "full", site: str = "wo",
              rank: int | None = None, rhos: tuple[float, ...] = RHO_GRID, holdout_gap: int = 0,
              layers: dict[LocalSpan, frozenset[int]] | None = None, **settings) -> "SpanMonitors":
        """One monitor per span; `layers` restricts each span to its layers (a deployment's layout),
        `settings` are WarmupMonitor's memory settings (per_kind, gate_chunks, track_fit, placement)."""
        strict = len(spans) == 1  # one span: losing its sink ends the warmup with an error, as before
        return cls({s: WarmupMonitor(s, rho, variant, site, rank, rhos=rhos, holdout_gap=holdout_gap,
                                     strict_sink=strict, layers=None if layers is None else layers[s], **settings)
                    for s in spans})

    @property
    def stream(self) -> Stream | None:
        return next(iter(self.monitors.values())).stream

    @stream.setter
    def stream(self, stream: Stream) -> None:
        for m in self.monitors.values():
            m.stream = stream

    def __getitem__(self, span: LocalSpan) -> WarmupMonitor:
        return self.monitors[span]

    @property
    def spans(self) -> list[LocalSpan]:
        return list(self.monitors)

    def before_pass(self, info: PassInfo):
        self._active = [m for m in self.monitors.values() if m.before_pass(info) is not None]
        return self if self._active else None

    def masks(self, layer: int) -> list[torch.Tensor]:
        return [mask for m in self._active for mask in m.masks(layer)]

    def record(self, layer: int, x_in: torch.Tensor, a_global: torch.Tensor, a_locals: list[torch.Tensor],
               w_o: torch.Tensor) -> None:
        a_locals = iter(a_locals)
        for m in self._active:
            if m.masks(layer):
                m.record(layer, x_in, a_global, [next(a_locals)], w_o)

    def finish(self) -> None:
        for m in self.monitors.values():
            m.finish()
