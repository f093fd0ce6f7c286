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
from runtimes.driver import FULL, PassInfo, Stream

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


class HeldOutScore:
    """Token-weighted statistics of one chunk: d(M) = mean_i ||r_i - M z_i||^2 / ||y_i||^2 for any
    correction M = [dW | db], exactly, from Gw = sum w z z^T, Cw = sum w r z^T, rrw = sum w ||r||^2."""

    def __init__(self) -> None:
        self.n = 0
        self.Gw: torch.Tensor | None = None
        self.Cw: torch.Tensor | None = None
        self.rrw = 0.0

    def update(self, z_in: torch.Tensor, r: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> None:
        w = 1.0 / (y.square().sum(1) + eps)
        z = torch.cat([z_in, torch.ones(z_in.shape[0], 1, dtype=z_in.dtype, device=z_in.device)], 1)
        if self.Gw is None:
            self.Gw = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
            self.Cw = torch.zeros(r.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
        self.Gw.addmm_((z * w[:, None]).mT, z)
        self.Cw.addmm_((r * w[:, None]).mT, z)
        self.rrw += float((r.square().sum(1) * w).sum())
        self.n += r.shape[0]

    @property
    def raw(self) -> float:
        return self.rrw / self.n

    def corrected(self, sol: Solution) -> float:
        m = torch.cat([sol.weight_delta, sol.bias_delta[:, None]], 1).to(self.Gw.device)
        quad = float(((m @ self.Gw) * m).sum())
        return max(self.rrw - 2.0 * float((self.Cw * m).sum()) + quad, 0.0) / self.n


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
    # (layer, kind) -> statistics of finished chunks, and of the chunk in progress (held out).
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

    def _finish_chunk(self) -> None:
        """Fold the finished chunk into the fit (after it was scored held-out) and refit."""
        if not self.pending:
            return
        chunk = self.monitored_chunks[-1]
        for layer, score in self._scores.items():
            past = self._totals.get(layer, ())
            entry = {"raw": score.raw, "rho": {}}
            if len(past) > self.holdout_gap:
                fit_stats = past[-1 - self.holdout_gap]
                for rho in self.rhos:
                    entry["rho"][rho] = score.corrected(self._solve(fit_stats, rho))
            self.heldout[layer][chunk] = entry
        self._scores = {}
        touched = set()
        for key, s in self.pending.items():
            self.stats[key] = s if key not in self.stats else self.stats[key].merge(s)
            touched.add(key[0])
        self.pending = {}
        for layer in touched:
            total = self.layer_stats(layer)
            self._totals.setdefault(layer, deque(maxlen=max(self.holdout_gap, GATE_CHUNKS) + 1)).append(total)
            self.fits[layer] = solve(total, rho=self.rho, variant=self.variant, rank=self.rank, site=self.site)

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
        self._scores.setdefault(layer, HeldOutScore()).update(z, r, y)
        kind = self._info.pass_kind
        self.curves[layer][self._info.chunk][kind] = (raw, corrected)
        key = (layer, kind)
        if key not in self.pending:
            self.pending[key] = AbsorptionStats(f"layer {layer} pass {kind}")
        self.pending[key].update(a_l, r, x if self.site == "adapter" else None)

    # -- results -----------------------------------------------------------------------------
    def layer_stats(self, layer: int, kind: int | None = None) -> AbsorptionStats:
        parts = [s for (l, k), s in self.stats.items() if l == layer and (kind is None or k == kind)]
        if not parts:
            raise ValueError(f"layer {layer}: no warmup statistics")
        total = AbsorptionStats(f"layer {layer}")
        for s in parts:
            total = total.merge(s)
        return total

    def kinds(self) -> list[int]:
        return sorted({k for (_, k) in self.stats})

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
        return solve(self.layer_stats(layer, kind), **opts)


# Warmup chunks the output gate scores, each under a fit that never saw it (ispa.output_gate).
GATE_CHUNKS = 3


def statistics_bytes(dim: int, layers: int, spans: int, pass_kinds: int, holdout_gap: int) -> int:
    """Upper bound of the float64 statistics the warmup keeps, all spans together: per span and layer,
    G and C ((D+1)^2 each) for every pass kind twice (finished and pending chunk), the running totals
    the held-out fits and the output gate use (max(holdout_gap, GATE_CHUNKS) + 1), the chunk's
    held-out score and the current fit."""
    per_matrix = 2 * (dim + 1) ** 2 * 8
    return spans * layers * per_matrix * (2 * pass_kinds + max(holdout_gap, GATE_CHUNKS) + 1 + 2)


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
              rank: int | None = None, rhos: tuple[float, ...] = RHO_GRID, holdout_gap: int = 0) -> "SpanMonitors":
        strict = len(spans) == 1  # one span: losing its sink ends the warmup with an error, as before
        return cls({s: WarmupMonitor(s, rho, variant, site, rank, rhos=rhos, holdout_gap=holdout_gap,
                                     strict_sink=strict) for s in spans})

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
        self.local_masks = [m.local_masks[0] for m in self._active]
        return self if self._active else None

    def record(self, layer: int, x_in: torch.Tensor, a_global: torch.Tensor, a_locals: list[torch.Tensor],
               w_o: torch.Tensor) -> None:
        for m, a_l in zip(self._active, a_locals):
            m.record(layer, x_in, a_global, [a_l], w_o)

    def finish(self) -> None:
        for m in self.monitors.values():
            m.finish()
