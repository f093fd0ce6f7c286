"""Calibration warmups: measure in full attention, let the policy choose the layout.

A calibration warmup (`_warm`) runs with every candidate span measured on every layer
(monitor.SpanMonitors) and ends by the policy's rule; `_measure` calibrates its predicted losses on
its own frames (calibration.py). `calibrate` pools several such warmups and lets the policy choose
one layout for every video (policy.select over all their chains at once): the build's decision.
`output_gate` judges kept corrections on a warmup's frames (the build's verdict).

`plan`/`transition` are the same for one video alone, deciding and baking in process: the
evaluation's "each video its own layout" (ispa_export.lab). A deployment's videos are absorbed by
video.absorb instead. The decisions themselves live in policy.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from graphs.wan import Absorption, WanModel
from runtimes.driver import Stream
from runtimes.groups import group_name

from ispa_export import memory
from ispa_export.errors import UserError
from ispa_export.kv import frame_bytes, kv_bytes
from ispa_export.method.monitor import GATE_CHUNKS, RHO_GRID, LocalSpan, SpanMonitors, WarmupMonitor
from ispa_export.method.policy import (Allocation, Correction, SpanLoss, allocate, candidate_spans, decide_fixed,
                     eligible_spans, ready, reference_keeps_sink, select, span_losses)
from ispa_export.method.solver import SITES
from ispa_export.video.absorb import absorption_for, check_given, json_safe
from ispa_export.video.torch_runner import torch_stream

# Variants compared by the evaluation: 'full' (one dW per layer), 'per_pass' (one per pass kind),
# 'bias' (mean residual only), 'none' (plain drop).
VARIANTS = ("full", "per_pass", "bias", "none")


@dataclass
class IspaOptions:
    kv_reduction: float | None = 0.5
    layers: list[int] | None = None  # explicit L-layers instead of a KV target
    # One span (window, and sink, default 0) fixes it; None: the policy's candidate spans (sink 0/1,
    # windows of one chunk up to half the full cache), restricted to `sink` when only that is given.
    window: int | None = None
    sink: int | None = None
    warmup_chunks: int = 8  # the most chunks generated before the transition
    tol: float = 0.05  # convergence: relative change of the L-layers' held-out d
    rho: float | None = None  # None: chosen per layer from monitor.RHO_GRID on held-out warmup chunks
    variant: str = "full"
    site: str = "wo"
    rank: int | None = None
    select_by: str = "corrected"  # predicted loss from the gated 'corrected' d or the 'raw' d
    gate: bool = True  # keep a layer's correction only where it lowers the held-out discrepancy
    calibrate: bool = True  # weigh each layer's d by its measured effect on the prediction
    per_layer_spans: bool = True  # the per-layer DP among the challengers (the graph gets a cache group per span)
    # Chunks between the fit and the chunk that scores it. 1: the gate judges a fit one chunk older
    # than the chunk it is scored on, as a correction is older than the frames it serves after the
    # transition (rolling regime); a span with fewer than three monitored chunks then has no
    # evidence and goes local uncorrected. Chosen on development seeds 2000-2003 (docs/eval/POLICY.md).
    holdout_gap: int = 1
    # Other KV targets whose uniform span joins the candidates (an evaluation re-allocating one
    # warmup's measurements at several targets).
    uniform_for: tuple[float, ...] = ()
    calibration_chunks: int = 2  # the warmup's last chunks the calibration scores (calibration.Chain)
    # Go on past the sink horizon when the calibrated allocation uses no sink span (policy.ready).
    # Off by default: on development seeds 2000-2002 the longer warmup let the gate see the rolling
    # steady state, but the allocation chosen on its last chunks lost 4-5 dB at 25% and 50% on two
    # of three seeds against the one chosen at the horizon (docs/eval/POLICY.md).
    beyond_sink_horizon: bool = False
    # Frames the deployment streams (None: unbounded). Within the full cache's capacity nothing is
    # ever evicted (the whole-video setting), so local sink spans become candidates
    # (policy.reference_keeps_sink).
    stream_frames: int | None = None
    # A deployment's verdict on per-video corrections (builder.pipeline.verdict): 'auto' lets the output
    # gate decide on the calibration videos (a strict majority keeps them), 'on' leaves each video's
    # per-layer gate alone to decide, 'off' keeps none.
    corrections: str = "auto"

    def spans(self, cfg) -> list[LocalSpan]:
        if self.window is not None:
            return [LocalSpan(self.sink or 0, self.window)]
        targets = self.uniform_for + ((self.kv_reduction,) if self.kv_reduction is not None else ())
        spans = candidate_spans(cfg, sinks=self.sinks(cfg), reductions=targets)
        return spans if self.sink is None else [s for s in spans if s.sink == self.sink]

    def sinks(self, cfg) -> tuple[int, ...]:
        """The local sinks the policy may choose: 0, and 1 where the reference keeps that frame."""
        if self.sink is not None:
            return (self.sink,)
        return tuple(k for k in (0, 1) if reference_keeps_sink(k, cfg.max_frames, cfg.full_sink, self.stream_frames))

    def check(self, num_layers: int) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"--variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.corrections not in ("auto", "on", "off"):
            raise UserError(f"--corrections: expected auto, on or off, got {self.corrections!r}")
        if self.select_by not in ("corrected", "raw"):
            raise UserError(f"select_by: expected 'corrected' or 'raw', got {self.select_by!r}")
        if self.site not in SITES:
            raise UserError(f"--site: expected one of {SITES}, got {self.site!r}")
        if (self.window is not None and self.window < 1) or (self.sink is not None and self.sink < 0):
            raise UserError(f"--window must be >= 1 and --sink >= 0 frames, got {self.window} and {self.sink}")
        if self.warmup_chunks < 1:
            raise UserError(f"--warmup-chunks: expected at least 1 chunk, got {self.warmup_chunks}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise UserError(f"tol: expected a relative change >= 0, got {self.tol}")
        if self.calibration_chunks < 1:
            raise UserError(f"calibration_chunks: expected at least 1 chunk, got {self.calibration_chunks}")
        if self.stream_frames is not None and self.stream_frames < 1:
            raise UserError(f"--stream-frames: expected at least 1 frame, got {self.stream_frames}")
        if self.holdout_gap < 0:
            raise UserError(f"--holdout-gap: expected chunks >= 0, got {self.holdout_gap}")
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad or len(set(self.layers)) != len(self.layers):
                raise UserError(f"--layers: expected distinct indices in [0, {num_layers}), got {self.layers}")
        elif self.kv_reduction is None or not 0 < self.kv_reduction < 1:
            raise UserError(f"--kv-reduction: expected a fraction in (0, 1), got {self.kv_reduction}")


@dataclass
class Transition:
    chunk: int  # index of the first chunk generated with L-layers
    spans: list[LocalSpan | None]  # per layer: its local span, None = full attention
    span: LocalSpan  # the reference span: report.json gives the F-layers' numbers at it (the shortest allocated)
    reason: str
    allocation: Allocation
    per_span: dict  # span -> best allocation at that shared span (None: out of reach)
    losses: dict  # span -> policy.SpanLoss
    calibration: dict | None = None
    general: Allocation | None = None  # the per-layer-span optimum, for comparison
    absorption: dict = field(default_factory=dict)  # layer -> solution report
    chain: object = None  # calibration.Chain of the warmup (None without calibration), to re-allocate

    @property
    def layers(self) -> list[int]:
        return [i for i, s in enumerate(self.spans) if s is not None]


def decide(monitor: WarmupMonitor, num_layers: int, n_local: int, opts: IspaOptions, chunk: int,
           history: int, chunk_frames: int, last: bool) -> tuple[list[int], list[int], str] | None:
    """One fixed span and n layers (the evaluation's shared transition): policy.decide_fixed."""
    return decide_fixed(monitor, num_layers, n_local, chunk, history, chunk_frames, opts.warmup_chunks,
                        opts.tol, last, opts.select_by)


def bake(model: WanModel, stream: Stream, monitors, spans: list[LocalSpan | None], opts: IspaOptions,
         corrections: dict[int, Correction | None] | None = None) -> dict:
    """Fold the corrections into the local layers (spans[l] not None), give every layer its span and
    cut its cache to it (one cache group per distinct span): one video's own layout, in process
    (the evaluation's runs; a deployment's videos are absorbed by video.absorb instead).

    `monitors[span]` holds the statistics of the layers at `span` (monitor.SpanMonitors, or a dict of
    WarmupMonitors). Without `corrections` every local layer is corrected with its monitor's rho;
    with them, only the layers whose gate kept the correction, each with its chosen rho (the others
    go local as they are, and need no monitor)."""
    report = {}
    for layer, span in enumerate(spans):
        if span is None:
            continue
        corr = None if corrections is None else corrections.get(layer)
        if corrections is not None and (corr is None or not corr.kept):
            report[layer] = {"variant": "none", "gated_off": opts.variant != "none"}
            continue
        absorption, report[layer] = absorption_for(monitors[span], layer, opts.variant, opts.site,
                                                   None if corr is None else corr.rho)
        if absorption is not None:
            model.blocks[layer].self_attn.absorb(absorption)
    model.set_layout(spans)
    stream.relayout(model.layout)
    return report


def _allocation(losses: dict[LocalSpan, SpanLoss], cfg, opts: IspaOptions, per_layer: bool = False):
    try:
        return allocate(losses, cfg, opts.kv_reduction, opts.layers, per_layer)
    except UserError:
        return None, {}


def _measure(model: WanModel, stream: Stream, monitors: SpanMonitors, allowed: set, opts: IspaOptions, seed: int,
             correct: bool) -> tuple[dict[LocalSpan, SpanLoss], dict | None, object]:
    """One warmup's predicted losses, calibrated on its own chain: (losses, the sensitivity record,
    the chain; None and None without calibration)."""
    from ispa_export.method.calibration import Chain, sensitivity

    cfg = model.cfg
    losses = span_losses(monitors, cfg.num_layers, correct=correct, gate=opts.gate, allowed=allowed)
    if not opts.calibrate:
        return losses, None, None
    # The reference span: the shortest measured one (the largest, best-resolved discrepancies).
    measured = [s for s, sl in losses.items() if sl.source != "extrapolated" and s in allowed]
    if not measured:
        raise UserError("no candidate span has been measured yet")
    ref = min(measured, key=lambda s: (s.frames, s))
    chain = Chain(model, stream.buffers["cross_kv"], np.concatenate(stream.latents, axis=2), seed,
                  stream.geo.timesteps, score_chunks=opts.calibration_chunks)
    sens = sensitivity(chain, ref, losses[ref].raw)
    losses = span_losses(monitors, cfg.num_layers, np.array(sens.weight), correct=correct, gate=opts.gate,
                         allowed=allowed)
    return losses, sens.to_dict(), chain


def _choose(losses: dict[LocalSpan, SpanLoss], cfg, opts: IspaOptions, allowed: set, frame_errors) -> tuple:
    """The allocation from (pooled) calibrated losses: the uniform prior against the DPs' allocations,
    judged by `frame_errors(spans)` (the warmups' chains, uncorrected: the corrections were fit on
    these frames, so they would score in-sample). Returns (allocation, per-span allocations, the
    per-layer optimum for comparison, the selection record)."""
    alloc, per_span = _allocation(losses, cfg, opts)
    if alloc is None:
        raise UserError(f"--kv-reduction {opts.kv_reduction}: no candidate span the warmup could measure reaches "
                        f"it ({', '.join(str(s) for s in losses)})")
    selection = None
    if frame_errors is not None and opts.layers is None:
        alloc, selection = select({s: l for s, l in losses.items() if s in allowed}, cfg, opts.kv_reduction,
                                  frame_errors, list(opts.sinks(cfg)), opts.per_layer_spans)
    general = _allocation(losses, cfg, opts, per_layer=True)[0] if opts.layers is None else None
    return alloc, per_span, general, selection


def _decide(model: WanModel, stream: Stream, monitors: SpanMonitors, allowed: set, opts: IspaOptions, seed: int,
            correct: bool):
    """The allocation from one warmup: predicted losses calibrated on its chain, the selection, and
    the output gate on its own corrections."""
    losses, calibration, chain = _measure(model, stream, monitors, allowed, opts, seed, correct)
    alloc, per_span, general, selection = _choose(losses, model.cfg, opts, allowed,
                                                  None if chain is None else chain.frame_errors)
    if calibration is not None and selection is not None:
        calibration["selection"] = selection
    if chain is not None and opts.gate and opts.variant in ("full", "bias"):
        calibration["output_gate"] = output_gate(model, monitors, chain, alloc, losses, opts)
        if not calibration["output_gate"]["kept"]:
            # The allocation stands (made with the corrections' predicted losses); its layers go
            # local uncorrected, and report.json shows their raw losses.
            for l in calibration["output_gate"]["layers"]:
                _drop_correction(losses[alloc.spans[l]], l)
    return alloc, per_span, general, losses, calibration, chain


def _drop_correction(sl: SpanLoss, layer: int) -> None:
    c = sl.corrections[layer]
    sl.corrections[layer] = Correction(c.rho, False, c.raw, c.corrected, c.scores, c.chunk)
    if sl.effective[layer] > 0:
        sl.loss[layer] *= c.raw / sl.effective[layer]
    sl.effective[layer] = c.raw


def output_gate(model: WanModel, monitors: SpanMonitors, chain, alloc: Allocation, losses: dict,
                opts: IspaOptions) -> dict:
    """The gate on the generated frames: the kept corrections stay only if they lower the sample
    error (chain, layout as allocated) of each of the warmup's last GATE_CHUNKS chunks, each under
    a refit on the chunks before it; otherwise all stay out.

    Every chunk, not their mean: on development seed 2000 (rolling, 50%) the corrections cut the
    error of two chunks around a shutter by 17-70% and doubled it on the chunk before; kept on that
    evidence they cost 6 dB over the rest of the video. Returns the verdict; changes nothing."""
    import copy

    layers = [l for l in alloc.local_layers
              if alloc.spans[l] in losses and (c := losses[alloc.spans[l]].corrections[l]) is not None and c.kept]
    if not layers:
        return {"layers": [], "kept": False, "reason": "no layer's correction passed its own gate"}
    f = chain.f
    plain = chain.frame_errors(alloc.spans, last_chunks=GATE_CHUNKS)
    scored = []
    for j in range(GATE_CHUNKS):  # j chunks before the latest
        trial = copy.deepcopy(model)
        for l in layers:
            mon, corr = monitors[alloc.spans[l]], losses[alloc.spans[l]].corrections[l]
            stats = mon.stats_excluding(l, j + 1)
            if stats is None:
                break
            sol = mon._solve(mon._on_compute(stats), corr.rho)
            w = None if opts.variant == "bias" else sol.weight_delta[None]
            trial.blocks[l].self_attn.absorb(Absorption(opts.site, w, sol.bias_delta[None]))
        else:
            corrected = chain.frame_errors(alloc.spans, model=trial, last_chunks=j + 1)[:f]
            before = plain[len(plain) - (j + 1) * f:][:f]
            scored.append({"chunk": chain.t // f - 1 - j, "error_uncorrected": float(before.mean()),
                           "error_corrected": float(corrected.mean())})
            continue
        break
    if not scored:
        return {"layers": layers, "kept": False, "reason": "no warmup chunk left to score a refit on"}
    kept = all(s["error_corrected"] < s["error_uncorrected"] for s in scored)
    return {"layers": layers, "kept": kept, "chunks": scored}


def transition(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions,
               progress: Callable[[int], None] | None = None,
               video: np.ndarray | None = None) -> tuple[Stream, SpanMonitors, Transition]:
    """One video's own layout, in process: the warmup with every layer full, the policy's decision
    and the bake. Returns the stream, ready to go on, the monitors of every candidate span and the
    decision (the evaluation compares this against a deployment's shared layout).

    With `video` latents [B, C, T, H, W] (T >= warmup_chunks * chunk_frames) each cache pass stores
    the video's frames instead of the sample (teacher forcing), so the monitor sees a known video.
    """
    stream, monitors, tr = plan(model, context, seed, opts, progress, video)
    corrections = {l: tr.losses[tr.spans[l]].corrections[l] for l in tr.layers}
    tr.absorption = bake(model, stream, monitors, tr.spans, opts,
                         corrections if opts.gate or opts.rho is None else None)
    return stream, monitors, tr


def search_budget(cfg, n_spans: int, opts: IspaOptions, device: torch.device, dtype: str) -> memory.Budget:
    """The span search's memory, planned before the warmup (ispa_export.memory): refused now, in one
    line, rather than out of memory after minutes of warmup."""
    def make(placement):
        return memory.budget(cfg, dtype, monitored_layers=cfg.num_layers, spans=n_spans, per_kind=True,
                             gate_chunks=GATE_CHUNKS, track_fit=True, holdout_gap=opts.holdout_gap, site=opts.site,
                             placement=placement)
    return memory.plan(f"warmup monitor: {n_spans} candidate spans x {cfg.num_layers} layers at dim {cfg.dim}",
                       device, make, hint="; measure one span with --window W [--sink S]")


def _warm(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions,
          progress: Callable[[int], None] | None, video: np.ndarray | None):
    """The calibration warmup: every candidate span measured on every layer until policy.ready."""
    cfg = model.cfg
    opts.check(cfg.num_layers)
    f = cfg.chunk_frames
    check_given(video, context, cfg, opts.warmup_chunks)
    spans = opts.spans(cfg)
    if not spans:
        raise UserError(f"--sink {opts.sink}: no candidate span of the full cache's {cfg.max_frames} frames has it")
    for s in spans:
        if s.frames >= cfg.max_frames:
            # An L-layer would keep the whole F cache: nothing to save and nothing to monitor.
            raise UserError(f"--window/--sink: sink {s.sink} + window {s.window} frames must be fewer than "
                            f"the full cache's {cfg.max_frames} frames")
    if opts.layers is None:
        small = min(spans, key=lambda s: (s.frames, s))
        best = 1 - small.frames / cfg.max_frames
        if opts.kv_reduction > best + 1e-9:
            raise UserError(f"--kv-reduction/--window/--sink: KV reduction {opts.kv_reduction:.0%} is out of reach "
                            f"with {small}: at most {best:.0%} with every layer local")
    p = next(model.parameters())
    need = search_budget(cfg, len(spans), opts, p.device, str(p.dtype).removeprefix("torch."))
    model.set_layout([None] * cfg.num_layers)
    monitors = SpanMonitors.build(spans, opts.rho, "full" if opts.variant in ("per_pass", "none") else opts.variant,
                                  opts.site, opts.rank, RHO_GRID if opts.rho is None else (opts.rho,),
                                  opts.holdout_gap, placement=need.placement)
    stream = torch_stream(model, context, seed, before_pass=monitors.before_pass)
    monitors.stream = stream
    correct = opts.select_by == "corrected" and opts.variant != "none"
    for c in range(opts.warmup_chunks):
        stream.step(given=None if video is None else video[:, :, c * f:(c + 1) * f])
        monitors.finish()
        if progress is not None:
            progress(1)
        allowed = set(eligible_spans(spans, stream.frame_index, cfg.max_frames, cfg.full_sink))
        closing = allowed - set(eligible_spans(spans, stream.frame_index + f, cfg.max_frames, cfg.full_sink))
        if closing and opts.beyond_sink_horizon and opts.calibrate and len(allowed) > len(closing):
            # Whether to stop for spans about to lose their sink frames is the final decision in
            # miniature: take it with the calibrated, measured allocation, not the rough running one.
            try:
                current = _decide(model, stream, monitors, allowed, opts, seed, correct)[0]
            except UserError:
                current = None
            losses = {}
        else:
            losses = span_losses(monitors, cfg.num_layers, correct=correct, gate=opts.gate, allowed=allowed)
            current, _ = _allocation(losses, cfg, opts)
        decision = ready(monitors, c, stream.frame_index, f, cfg.max_frames, cfg.full_sink, opts.warmup_chunks,
                         opts.tol, current, losses or span_losses(monitors, cfg.num_layers, correct=correct,
                                                                  gate=opts.gate, allowed=allowed),
                         opts.beyond_sink_horizon)
        if decision is not None:
            break
    stream.runner.before_pass = None
    return stream, monitors, decision, correct


def plan(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions,
         progress: Callable[[int], None] | None = None,
         video: np.ndarray | None = None) -> tuple[Stream, SpanMonitors, Transition]:
    """transition() up to, not including, the bake: the all-F model and stream at the transition
    point, the monitors and the decision (the common start of every run an evaluation compares)."""
    stream, monitors, decision, correct = _warm(model, context, seed, opts, progress, video)
    alloc, per_span, general, losses, calibration, chain = _decide(model, stream, monitors, set(decision.eligible),
                                                                   opts, seed, correct)
    if opts.per_layer_spans and general is not None and chain is None:
        alloc = general  # uncalibrated: the predicted loss is all there is
    span = alloc.distinct_spans[0] if alloc.local_layers else opts.spans(model.cfg)[0]
    return stream, monitors, Transition(stream.chunk, list(alloc.spans), span, decision.reason, alloc, per_span,
                                        losses, calibration, general, chain=chain)


# -- a deployment's layout, from several calibration videos ------------------------------------------

@dataclass
class Video:
    """One calibration video: its text context, seed and where the context came from; `given`
    latents [B, C, T, H, W] teacher-force its warmup (an evaluation's known videos)."""

    context: torch.Tensor
    seed: int
    source: str
    given: np.ndarray | None = None


@dataclass
class Measured:
    """What one calibration warmup leaves for the pooled decision (its statistics are dropped)."""

    seed: int
    context: str
    transition_chunk: int
    reason: str
    eligible: set
    losses: dict
    sensitivity: dict | None
    chain: object

    def to_dict(self) -> dict:
        return {"seed": self.seed, "context": self.context, "transition_chunk": self.transition_chunk,
                "reason": self.reason, "eligible_spans": sorted(f"s{s.sink}w{s.window}" for s in self.eligible),
                "sensitivity": self.sensitivity,
                "losses": {f"s{s.sink}w{s.window}": {"source": x.source, "raw": x.raw.tolist(),
                                                     "effective": x.effective.tolist(), "loss": x.loss.tolist()}
                           for s, x in self.losses.items()}}


def pool(measured: list[Measured], num_layers: int) -> tuple[dict[LocalSpan, SpanLoss], set]:
    """The calibration videos' predicted losses averaged per (span, layer), on the spans every
    video could still cut to; a span is as measured as its least measured video."""
    allowed = set.intersection(*(m.eligible for m in measured))
    rank = {"measured": 0, "raw only": 1, "extrapolated": 2}
    out = {}
    for span in sorted(set.intersection(*(set(m.losses) for m in measured))):
        parts = [m.losses[span] for m in measured]
        mean = lambda key: np.mean([getattr(p, key) for p in parts], axis=0)  # noqa: E731
        source = max((p.source for p in parts), key=rank.__getitem__)
        chunks = sorted({c for p in parts for c in p.monitored_chunks})
        out[span] = SpanLoss(span, mean("raw"), mean("effective"), mean("loss"), [None] * num_layers, source, chunks)
    return out, allowed


@dataclass
class Calibration:
    """One layout for every video, chosen from several calibration warmups."""

    allocation: Allocation
    measured: list[Measured]
    losses: dict
    selection: dict | None
    general: Allocation | None
    per_span: dict

    @property
    def layout(self) -> list[LocalSpan | None]:
        return list(self.allocation.spans)


def calibrate(model: WanModel, videos: list[Video], opts: IspaOptions,
              progress: Callable[[int], None] | None = None) -> Calibration:
    """The warmup of each calibration video with every candidate span measured, then the policy over
    their pooled statistics: the calibrated losses averaged, the uniform prior against the DPs'
    allocations judged on every video's chain at once (paired, the video the unit: policy.paired_gain).
    `model` is left all-F."""
    cfg = model.cfg
    measured = []
    for v in videos:
        stream, monitors, decision, correct = _warm(model, v.context, v.seed, opts, progress, v.given)
        losses, sensitivity, chain = _measure(model, stream, monitors, set(decision.eligible), opts, v.seed, correct)
        measured.append(Measured(v.seed, v.source, stream.chunk, decision.reason, set(decision.eligible), losses,
                                 sensitivity, chain))
        del stream, monitors  # their statistics: the pooled decision needs only the losses and chains
    losses, allowed = pool(measured, cfg.num_layers)
    chains = [m.chain for m in measured if m.chain is not None]
    frame_errors = None
    if chains:
        def frame_errors(spans, **kw):  # one array per video: the video is select's unit of evidence
            return [c.frame_errors(spans, **kw) for c in chains]
    alloc, per_span, general, selection = _choose(losses, cfg, opts, allowed, frame_errors)
    if opts.per_layer_spans and general is not None and frame_errors is None:
        alloc = general
    return Calibration(alloc, measured, losses, selection, general, per_span)


def _span_dict(span: LocalSpan | None) -> dict | None:
    return None if span is None else {"sink": span.sink, "window": span.window}


def report(model: WanModel, monitors: SpanMonitors, tr: Transition, opts: IspaOptions, dtype: str = "float32") -> dict:
    """Every number behind the decision (report.json)."""
    cfg = model.cfg
    before = kv_bytes(cfg, dtype=dtype)
    after = kv_bytes(cfg, model.layout, dtype=dtype)
    layers = []
    for l in range(cfg.num_layers):
        # A local layer's numbers at its own span; a full layer's at the reference span.
        span = tr.spans[l] if tr.spans[l] is not None else tr.span
        sl = tr.losses[span]
        corr = sl.corrections[l]
        mon = monitors[span]
        chunks = sorted(mon.curves[l])
        layers.append({
            "index": l, "mode": model.modes[l], "span": _span_dict(tr.spans[l]), "group": group_name(tr.spans[l]),
            # at the layer's span: the held-out chunk's raw d and d* (chosen rho; raw if none held out)
            "raw_discrepancy": float(sl.raw[l]), "corrected_discrepancy": corr.corrected if corr else float(sl.raw[l]),
            "effective_discrepancy": float(sl.effective[l]), "predicted_loss": float(sl.loss[l]),
            "weight": None if tr.calibration is None else tr.calibration["weight"][l],
            "correction": None if corr is None else {
                "rho": corr.rho, "kept": corr.kept, "heldout_chunk": corr.chunk, "raw": corr.raw,
                "corrected": corr.corrected, "by_rho": {f"{r:g}": v for r, v in corr.scores.items()}},
            "candidates": {f"s{s.sink}w{s.window}": {
                "raw": float(x.raw[l]), "effective": float(x.effective[l]), "loss": float(x.loss[l]),
                "rho": None if x.corrections[l] is None else x.corrections[l].rho,
                "kept": None if x.corrections[l] is None else x.corrections[l].kept, "source": x.source}
                for s, x in tr.losses.items()},
            "curve": {str(c): {str(k): {"raw": v[0], "corrected": v[1]} for k, v in sorted(mon.curves[l][c].items())}
                      for c in chunks},
            "absorption": tr.absorption.get(l),
        })
    fb = frame_bytes(cfg, dtype)
    rep = {
        "kv_reduction": 1 - after.total / before.total,
        "kv_bytes_before": before.total, "kv_bytes_after": after.total,
        "kv_bytes_per_layer_after": after.per_layer,
        "transition_chunk": tr.chunk, "transition_reason": tr.reason,
        "selected_layers": tr.layers,
        # The local layers' span where they share one (None where the allocation gives several); the
        # span full layers are measured at.
        "span": _span_dict(tr.span) if len(set(tr.spans) - {None}) <= 1 else None,
        "reference_span": _span_dict(tr.span),
        "monitored_chunks": monitors[tr.span].monitored_chunks,
        "allocation": dict(tr.allocation.to_dict(), bytes=tr.allocation.frames * fb,
                           budget_bytes=tr.allocation.budget * fb),
        "allocations_by_span": {f"s{s.sink}w{s.window}": None if a is None else a.to_dict()
                                for s, a in tr.per_span.items()},
        "general_allocation": None if tr.general is None else tr.general.to_dict(),
        "spans": {f"s{s.sink}w{s.window}": {"sink": s.sink, "window": s.window, "source": x.source,
                                          "monitored_chunks": x.monitored_chunks} for s, x in tr.losses.items()},
        "calibration": tr.calibration,
        "prediction": ("loss(layer, span) = weight * d_eff; d_eff = held-out corrected d where the gate keeps the "
                       "correction, else raw d; spans the warmup never measured: raw d extrapolated over the window "
                       "(power law, non-increasing; policy.extrapolate), uncorrected"),
        "options": asdict(opts), "layers": layers,
    }
    return json_safe(rep)
