"""Warmup monitor: what each layer would lose by going local, and how much a fit recovers.

During the all-F warmup, every F-layer gives the monitor the global attention output a_g and the
local one a_l (sink + window of the same cache, same queries); the monitor accumulates the float64
statistics of the absorption solve per layer and pass kind, and the raw and held-out corrected
discrepancies per layer, chunk and pass kind. Tokens are never stored.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from graphs.masks import retained
from runtimes.driver import FULL, PassInfo, Stream

from .errors import UserError
from .solver import AbsorptionStats, Solution, corrected_residual, discrepancy, solve


@dataclass
class LocalSpan:
    sink: int
    window: int

    @property
    def frames(self) -> int:
        return self.sink + self.window


@dataclass
class WarmupMonitor:
    """Attach with `TorchRunner(before_pass=monitor.before_pass)`; `stream` must be set before running."""

    span: LocalSpan
    rho: float | None
    variant: str = "full"
    site: str = "wo"
    rank: int | None = None
    stream: Stream | None = None
    # (layer, kind) -> statistics of finished chunks, and of the chunk in progress (held out).
    stats: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    # layer -> chunk -> kind -> (raw, corrected)
    curves: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    fits: dict = field(default_factory=dict)  # layer -> Solution fitted on finished chunks
    monitored_chunks: list[int] = field(default_factory=list)
    local_mask: torch.Tensor | None = None
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
        if missing:  # a_l would lack the sink the L-layers keep (ispa.sink_horizon ends the warmup before)
            raise UserError(f"warmup monitor: chunk {info.chunk} starts at frame {info.start}, when the full cache "
                            f"of {group.capacity} frames no longer holds sink frames {missing}; end the warmup "
                            "earlier or use a model whose full cache pins them (full_sink)")
        if not self.monitored_chunks or self.monitored_chunks[-1] != info.chunk:
            self.monitored_chunks.append(info.chunk)
        self.local_mask = torch.from_numpy(keep)
        self._info = info
        return self

    def _finish_chunk(self) -> None:
        """Fold the finished chunk into the fit (after it was scored held-out) and refit."""
        if not self.pending:
            return
        touched = set()
        for key, s in self.pending.items():
            self.stats[key] = s if key not in self.stats else self.stats[key].merge(s)
            touched.add(key[0])
        self.pending = {}
        for layer in touched:
            self.fits[layer] = solve(self.layer_stats(layer), rho=self.rho, variant=self.variant,
                                     rank=self.rank, site=self.site)

    def finish(self) -> None:
        self._finish_chunk()
        self._chunk = None

    # -- model side (graphs.wan.Monitor) -------------------------------------------------------
    def record(self, layer: int, x_in: torch.Tensor, a_global: torch.Tensor, a_local: torch.Tensor,
               w_o: torch.Tensor) -> None:
        dim = a_global.shape[-1]
        a_g = a_global.reshape(-1, dim).double()
        a_l = a_local.reshape(-1, dim).double()
        x = x_in.reshape(-1, dim).double()
        w = w_o.double()
        r = (a_g - a_l) @ w.T
        raw = discrepancy(r, a_g @ w.T)
        fit = self.fits.get(layer)
        corrected = raw if fit is None else discrepancy(
            corrected_residual(fit, a_l if self.site == "wo" else x, r), a_g @ w.T)
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

    def solution(self, layer: int, kind: int | None = None, **overrides) -> Solution:
        opts = dict(rho=self.rho, variant=self.variant, rank=self.rank, site=self.site) | overrides
        return solve(self.layer_stats(layer, kind), **opts)
