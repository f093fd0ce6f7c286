"""Policy and bake: warm up in full attention, pick the layers to make local, absorb, switch.

`transition(...)` runs the warmup with the monitor attached, decides the layers and the transition
chunk (DESIGN.md section 4), folds the corrections into the model and cuts the caches. The model
and stream it returns carry on generating; export and evaluation take them as they are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from graphs.wan import FULL, LOCAL, Absorption, WanModel
from runtimes.driver import Stream

from .errors import UserError
from .kv import kv_bytes, layers_for_target
from .monitor import LocalSpan, WarmupMonitor
from .solver import SITES
from .torch_runner import torch_stream

# Variants compared by the evaluation: 'full' (one dW per layer), 'per_pass' (one per pass kind),
# 'bias' (mean residual only), 'none' (plain drop).
VARIANTS = ("full", "per_pass", "bias", "none")


@dataclass
class IspaOptions:
    kv_reduction: float | None = 0.5
    layers: list[int] | None = None  # explicit L-layers instead of a KV target
    window: int = 2
    sink: int = 0
    warmup_chunks: int = 8  # the most chunks generated before the transition
    tol: float = 0.05  # convergence: relative change of the selected layers' held-out d*
    rho: float | None = None  # None: the solver's measured default
    variant: str = "full"
    site: str = "wo"
    rank: int | None = None
    select_by: str = "corrected"  # rank layers by held-out 'corrected' or 'raw' discrepancy

    def check(self, num_layers: int) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"--variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.select_by not in ("corrected", "raw"):
            raise UserError(f"select_by: expected 'corrected' or 'raw', got {self.select_by!r}")
        if self.site not in SITES:
            raise UserError(f"--site: expected one of {SITES}, got {self.site!r}")
        if self.window < 1 or self.sink < 0:
            raise UserError(f"--window must be >= 1 and --sink >= 0 frames, got {self.window} and {self.sink}")
        if self.warmup_chunks < 1:
            raise UserError(f"--warmup-chunks: expected at least 1 chunk, got {self.warmup_chunks}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise UserError(f"tol: expected a relative change >= 0, got {self.tol}")
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad or len(set(self.layers)) != len(self.layers):
                raise UserError(f"--layers: expected distinct indices in [0, {num_layers}), got {self.layers}")
        elif self.kv_reduction is None or not 0 < self.kv_reduction < 1:
            raise UserError(f"--kv-reduction: expected a fraction in (0, 1), got {self.kv_reduction}")


@dataclass
class Transition:
    chunk: int  # index of the first chunk generated with L-layers
    layers: list[int]
    ranking: list[int]
    reason: str
    absorption: dict = field(default_factory=dict)  # layer -> solution report


def _chunk_d(monitor: WarmupMonitor, chunk: int, num_layers: int, key: str) -> np.ndarray:
    idx = 0 if key == "raw" else 1
    return np.array([monitor.chunk_discrepancy(l, chunk)[idx] for l in range(num_layers)])


def sink_horizon(monitor: WarmupMonitor, opts: IspaOptions) -> int | None:
    """The most frames of history at which the full cache still holds the L-layers' sink frames.

    Past it, the rolling full cache has evicted frames < sink: neither the monitor's a_l nor the
    caches cut at the transition could hold them, so the warmup must end by then (None: never)."""
    geo = None if monitor.stream is None else monitor.stream.geo
    if geo is None or opts.sink <= geo.full_sink:
        return None
    return geo.full_capacity - geo.full_sink + opts.sink - 1


def decide(monitor: WarmupMonitor, num_layers: int, n_local: int, opts: IspaOptions, chunk: int,
           history: int, chunk_frames: int, last: bool) -> tuple[list[int], list[int], str] | None:
    """Layers and reason if the transition happens after `chunk`, else None (DESIGN.md section 4)."""
    span = opts.sink + opts.window
    chunks = monitor.monitored_chunks
    horizon = sink_horizon(monitor, opts)
    capped = horizon is not None and history + chunk_frames > horizon  # no further chunk can be monitored
    # d* is held out only from the second monitored chunk on; convergence compares two of them.
    if history < span + chunk_frames or len(chunks) < 2 or chunks[-1] != chunk:
        if capped:
            raise UserError(f"--sink {opts.sink}/--window {opts.window}: the full cache of "
                            f"{monitor.stream.geo.full_capacity} frames evicts the L-layers' sink frames after "
                            f"{horizon} frames of history, before the warmup has two chunks whose history "
                            f"exceeds the local span of {span} frames; lower --window or --sink")
        if last:
            raise UserError(f"--warmup-chunks {opts.warmup_chunks}: the warmup ended with {history} frames of "
                            f"history, too short to fit a correction for a local span of {span} frames "
                            f"(needs two chunks whose history exceeds the span: at least "
                            f"{span // chunk_frames + 3} chunks); lengthen the warmup")
        return None
    d = _chunk_d(monitor, chunk, num_layers, opts.select_by)
    ranking = [int(i) for i in np.argsort(d, kind="stable")]
    layers = sorted(opts.layers) if opts.layers is not None else sorted(ranking[:n_local])
    if len(chunks) >= 3:
        now = _chunk_d(monitor, chunk, num_layers, "corrected")[layers]
        before = _chunk_d(monitor, chunks[-2], num_layers, "corrected")[layers]
        change = np.abs(now - before) / np.maximum(before, 1e-12)
        if change.max() < opts.tol:
            return layers, ranking, f"converged: max relative change of d* {change.max():.3g} < {opts.tol}"
    if last:
        return layers, ranking, f"maximum warmup of {opts.warmup_chunks} chunks reached"
    if capped:
        return layers, ranking, (f"warmup ended at {history} frames: the next chunk would evict the L-layers' "
                                 f"{opts.sink} sink frames from the full cache")
    return None


def absorption_for(monitor: WarmupMonitor, layer: int, opts: IspaOptions) -> tuple[Absorption | None, dict]:
    if opts.variant == "none":
        return None, {"variant": "none"}
    if opts.variant == "per_pass":
        sols = [monitor.solution(layer, k, variant="full") for k in monitor.kinds()]
    else:
        sols = [monitor.solution(layer, variant=opts.variant)]
    weight = None if opts.variant == "bias" else torch.stack([s.weight_delta for s in sols])
    bias = torch.stack([s.bias_delta for s in sols])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not torch.isfinite(t).all():
            raise UserError(f"layer {layer}: the absorption {name} is not finite; refusing to bake it")
    # JSON has no inf: a singular G + lambda I (rho 0) has an infinite condition number, reported as
    # null next to method 'eigh' (report.json and the manifest refuse non-finite numbers).
    report = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in asdict(s).items() if k not in ("weight_delta", "bias_delta")} for s in sols]
    return Absorption(opts.site, weight, bias), {"variant": opts.variant, "solutions": report}


def bake(model: WanModel, stream: Stream, monitor: WarmupMonitor, layers: list[int], opts: IspaOptions) -> dict:
    """Fold the corrections into the L-layers, switch their mode, cut their caches to sink + window."""
    report = {}
    for layer in layers:
        absorption, report[layer] = absorption_for(monitor, layer, opts)
        if absorption is not None:
            model.blocks[layer].self_attn.absorb(absorption)
    modes = [LOCAL if i in layers else FULL for i in range(model.cfg.num_layers)]
    model.set_modes(modes)
    stream.relayout(modes, opts.sink + opts.window, opts.sink)
    return report


def transition(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions,
               progress: Callable[[int], None] | None = None,
               video: np.ndarray | None = None) -> tuple[Stream, WarmupMonitor, Transition]:
    """Warmup with every layer full, then the decision and the bake. Returns the stream, ready to go on.

    With `video` latents [B, C, T, H, W] (T >= warmup_chunks * chunk_frames) each cache pass stores
    the video's frames instead of the sample (teacher forcing), so the monitor sees a known video.
    """
    cfg = model.cfg
    opts.check(cfg.num_layers)
    f = cfg.chunk_frames
    if video is not None:
        want = (context.shape[0], cfg.in_dim, opts.warmup_chunks * f, cfg.latent_height, cfg.latent_width)
        if (video.ndim != 5 or video.shape[:2] != want[:2] or video.shape[3:] != want[3:]
                or video.shape[2] < want[2]):
            raise UserError(f"warmup video: expected latents [B, C, T, H, W] = {list(want[:2])} + [>= {want[2]}] + "
                            f"{list(want[3:])} ({opts.warmup_chunks} chunks of {f} frames), got {list(video.shape)}")
    if opts.sink + opts.window >= cfg.max_frames:
        # An L-layer would keep the whole F cache: nothing to save and nothing to monitor.
        raise UserError(f"--window/--sink: sink {opts.sink} + window {opts.window} frames must be fewer than "
                        f"the full cache's {cfg.max_frames} frames")
    model.set_modes([FULL] * cfg.num_layers)
    try:
        n_local = len(opts.layers) if opts.layers is not None else layers_for_target(
            cfg, opts.kv_reduction, opts.window, opts.sink)
    except ValueError as e:
        raise UserError(f"--kv-reduction/--window/--sink: {e}") from None
    monitor = WarmupMonitor(LocalSpan(opts.sink, opts.window), opts.rho,
                            "full" if opts.variant in ("per_pass", "none") else opts.variant, opts.site, opts.rank)
    stream = torch_stream(model, context, seed, before_pass=monitor.before_pass)
    monitor.stream = stream
    for c in range(opts.warmup_chunks):
        stream.step(given=None if video is None else video[:, :, c * f:(c + 1) * f])
        monitor.finish()
        if progress is not None:
            progress(1)
        decision = decide(monitor, cfg.num_layers, n_local, opts, c, stream.frame_index, f,
                          last=c + 1 == opts.warmup_chunks)
        if decision is not None:
            break
    layers, ranking, reason = decision
    stream.runner.before_pass = None
    absorption = bake(model, stream, monitor, layers, opts)
    return stream, monitor, Transition(stream.chunk, layers, ranking, reason, absorption)


def report(model: WanModel, monitor: WarmupMonitor, tr: Transition, opts: IspaOptions, dtype: str = "float32") -> dict:
    """Every number behind the decision (report.json)."""
    cfg = model.cfg
    before = kv_bytes(cfg, [FULL] * cfg.num_layers, dtype=dtype)
    after = kv_bytes(cfg, model.modes, opts.window, opts.sink, dtype=dtype)
    layers = []
    for l in range(cfg.num_layers):
        chunks = sorted(monitor.curves[l])
        last = chunks[-1] if chunks else None
        raw, corr = monitor.chunk_discrepancy(l, last) if last is not None else (float("nan"),) * 2
        layers.append({
            "index": l, "mode": model.modes[l], "raw_discrepancy": raw, "corrected_discrepancy": corr,
            "curve": {str(c): {str(k): {"raw": v[0], "corrected": v[1]} for k, v in sorted(monitor.curves[l][c].items())}
                      for c in chunks},
            "absorption": tr.absorption.get(l),
        })
    return {
        "kv_reduction": 1 - after.total / before.total,
        "kv_bytes_before": before.total, "kv_bytes_after": after.total,
        "kv_bytes_per_layer_after": after.per_layer,
        "transition_chunk": tr.chunk, "transition_reason": tr.reason,
        "selected_layers": tr.layers, "ranking": tr.ranking, "monitored_chunks": monitor.monitored_chunks,
        "options": asdict(opts), "layers": layers,
    }
