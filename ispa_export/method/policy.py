"""Allocation policy (DESIGN.md section 4): which layers go local, with which span, and whether each
layer's correction is kept. Every input is a warmup measurement; nothing here sees evaluation data.

Predicted loss of layer l at span s:

    loss(l, s) = weight_l * d_eff(l, s)

- d_eff is the held-out corrected discrepancy d* (ridge rho chosen per layer on the latest warmup
  chunk, fit on the earlier ones) where the correction lowers it (the gate), else the raw d;
- weight_l converts a layer's discrepancy at its attention output into its effect on the model's
  final prediction (calibration.py measures it on the warmup frames; 1 without calibration).
Losses add over layers: the first-order view in which small, independent perturbations of
different layers add their squared effects on the output.

What a short warmup cannot see: a span is measured only once the history is longer than it, and
a warmup with sink candidates ends when the rolling full cache would evict the sink frames, so long
windows may never (or only once) be measured. Their raw d is extrapolated over distance
(`extrapolate`): per layer and sink, a power law d ~ window^b fitted to the measured windows
(b <= 0: keeping more frames never loses more), never above the d of the longest measured window.
Such spans carry no statistics, so they go local uncorrected.

The allocations are exact dynamic programs over layers (`dp`): options per layer are F or a span,
costs are KV frames (the steady-state bytes of a layer are its frames times kv.frame_bytes, so
frames measure bytes exactly), the budget is what the KV target leaves. `allocate` solves the
program once per candidate span (options F or that span) and, with `per_layer_spans`, the general
program (every span an option for every layer; the graph gets one cache group per distinct span).
A uniform window on every layer and "n layers at one window" are both points of the search.

`select` makes the decision: the uniform layout (`uniform`, a sink only where
`reference_keeps_sink`) unless one of the programs' allocations lowers the sample error of the
warmup's own denoising chain by more than GATE_Z standard errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphs.config import WanConfig

from ispa_export.errors import UserError
from ispa_export.method.monitor import GATE_CHUNKS, LocalSpan, SpanMonitors, WarmupMonitor


def candidate_spans(cfg: WanConfig, sinks: tuple[int, ...] = (0, 1),
                    reductions: tuple[float, ...] = ()) -> list[LocalSpan]:
    """Spans of one chunk up to half the full capacity (whole chunks, and exactly half), plus the
    uniform span of each KV target in `reductions` (every layer local with the frames the target
    leaves), with each sink; a sink span keeps the same total frames as the plain one (equal bytes).
    So the uniform layout of the target is always a point of the search."""
    f, half = cfg.chunk_frames, cfg.max_frames // 2
    totals = {t for t in range(f, half + 1, f)} | ({half} if half >= 1 else set())
    totals |= {budget_frames(cfg, r) // cfg.num_layers for r in reductions}
    totals = sorted(t for t in totals if t >= 1)
    out = []
    for sink in sinks:
        for t in totals:
            if t - sink >= 1 and t < cfg.max_frames:
                out.append(LocalSpan(sink, t - sink))
    return out


def budget_frames(cfg: WanConfig, reduction: float) -> int:
    """Most cached frames (summed over layers) that remove at least `reduction` of the full bytes."""
    total = cfg.num_layers * cfg.max_frames
    return math.floor((1 - reduction) * total + 1e-9)


# -- the correction: ridge and gate ------------------------------------------------------------
@dataclass
class Correction:
    """The held-out evidence for one layer's correction at one span."""

    rho: float | None  # the ridge with the lowest held-out d* (None: nothing held out)
    kept: bool  # the gate: the correction lowers the held-out discrepancy
    raw: float  # d of the held-out chunk, uncorrected
    corrected: float  # its d* under the chosen rho (raw when nothing was held out)
    scores: dict[float, float] = field(default_factory=dict)  # rho -> held-out d*
    chunk: int | None = None  # the held-out chunk

    @property
    def effective(self) -> float:
        return self.corrected if self.kept else self.raw


def choose_correction(monitor: WarmupMonitor, layer: int, gate: bool = True) -> Correction | None:
    """Ridge from the grid on the latest held-out chunk; kept only where it beats no correction.
    None when the span was never monitored."""
    if not monitor.heldout.get(layer):
        return None
    chunks = monitor.heldout_chunks(layer)
    if not chunks:  # no fit was scored (too few monitored chunks): no evidence, so no correction
        last = max(monitor.heldout[layer])  # unless the gate is off: then the monitor's own rho
        raw = monitor.heldout[layer][last]["raw"]
        return Correction(None, not gate, raw, raw, {}, last)
    latest = chunks[-1]
    entry = monitor.heldout[layer][latest]
    rho = min(entry["rho"], key=lambda r: (entry["rho"][r], -r))  # ties: the stronger ridge
    corrected = entry["rho"][rho]
    # Kept where it lowers the held-out d on every one of the latest GATE_CHUNKS held-out chunks,
    # at least two: one chunk's gain is as often noise as a correction that carries over.
    recent = [monitor.heldout[layer][c] for c in chunks[-GATE_CHUNKS:]]
    kept = (len(recent) >= 2 and all(e["rho"][rho] < e["raw"] for e in recent)) if gate else True
    return Correction(rho, kept, entry["raw"], corrected, dict(entry["rho"]), latest)


# -- predicted loss ----------------------------------------------------------------------------
@dataclass
class SpanLoss:
    """Per layer, at one span: the discrepancies and the predicted loss the allocation weighs."""

    span: LocalSpan
    raw: np.ndarray  # [L]
    effective: np.ndarray  # [L] d_eff: corrected where the gate keeps the correction, else raw
    loss: np.ndarray  # [L] weight * d_eff (inf: cannot be chosen)
    corrections: list[Correction | None]
    source: str  # 'measured' | 'raw only' (one monitored chunk) | 'extrapolated'
    monitored_chunks: list[int]


def extrapolate(windows: list[int], d: list[float], window: int) -> float:
    """d at `window` from the d measured at shorter `windows` of the same sink: a power law
    d = A * w^b (least squares in log-log), never above the longest measured window's d (which is
    also the answer when the fit has b >= 0 or fewer than two points)."""
    pts = [(w, v) for w, v in zip(windows, d) if math.isfinite(v)]
    if not pts:
        return math.inf
    longest = max(pts)[1]
    pos = [(w, v) for w, v in pts if v > 0]
    if len(pos) < 2:
        return longest
    x, y = np.log([w for w, _ in pos]), np.log([v for _, v in pos])
    b, a = np.polyfit(x, y, 1)
    if b >= 0:  # d does not fall with the window here: keep the longest window's d
        return longest
    return float(min(math.exp(a + b * math.log(window)), longest))


def span_losses(monitors: SpanMonitors, num_layers: int, weights: np.ndarray | None = None,
                correct: bool = True, gate: bool = True,
                allowed: set[LocalSpan] | None = None) -> dict[LocalSpan, SpanLoss]:
    """Predicted loss of every (layer, candidate span). `correct=False` weighs raw d only (the
    allocation of an uncorrected run); spans outside `allowed` get infinite loss."""
    weights = np.ones(num_layers) if weights is None else np.asarray(weights, dtype=float)
    out: dict[LocalSpan, SpanLoss] = {}
    for span in monitors.spans:
        mon = monitors[span]
        corr = [choose_correction(mon, l, gate) for l in range(num_layers)]
        if all(c is None for c in corr):
            continue
        raw = np.array([c.raw if c else math.inf for c in corr])
        eff = np.array([(c.effective if correct else c.raw) if c else math.inf for c in corr])
        source = "measured" if any(c and c.rho is not None for c in corr) else "raw only"
        out[span] = SpanLoss(span, raw, eff, weights * eff, corr, source, list(mon.monitored_chunks))
    for span in monitors.spans:
        if span in out:
            continue
        same = sorted((s.window, s) for s in out if s.sink == span.sink and s.window < span.window)
        if not same:  # no shorter window of this sink was measured: the other sink's, same total frames
            same = sorted((s.frames, s) for s in out if s.frames < span.frames)
        raw = np.array([extrapolate([k for k, _ in same], [out[s].raw[l] for _, s in same],
                                    span.window if same and same[0][1].sink == span.sink else span.frames)
                        for l in range(num_layers)])
        out[span] = SpanLoss(span, raw, raw.copy(), weights * raw, [None] * num_layers, "extrapolated", [])
    if allowed is not None:
        for span, sl in out.items():
            if span not in allowed:
                sl.loss = np.full(num_layers, math.inf)
    return dict(sorted(out.items()))


# -- the dynamic program -----------------------------------------------------------------------
@dataclass
class Allocation:
    spans: list[LocalSpan | None]  # per layer; None = full attention
    loss: float  # predicted
    frames: int  # cached frames summed over layers
    budget: int

    @property
    def local_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.spans) if s is not None]

    @property
    def distinct_spans(self) -> list[LocalSpan]:
        return sorted({s for s in self.spans if s is not None})

    def modes(self) -> list[str]:
        return ["F" if s is None else "L" for s in self.spans]

    def to_dict(self) -> dict:
        return {"spans": [None if s is None else [s.sink, s.window] for s in self.spans],
                "local_layers": self.local_layers, "predicted_loss": self.loss, "frames": self.frames,
                "budget_frames": self.budget}


def dp(options: list[list[tuple[int, float, LocalSpan | None]]], budget: int) -> Allocation | None:
    """Exact minimum of the summed loss over one option (frames, loss, span) per layer with total
    frames <= budget. State: frames used so far; among equal losses, fewer frames win. None when no
    choice fits the budget."""
    best: dict[int, tuple[float, tuple]] = {0: (0.0, ())}
    for opts in options:
        nxt: dict[int, tuple[float, tuple]] = {}
        for used, (loss, chosen) in best.items():
            for frames, cost, span in opts:
                total = used + frames
                if total > budget or not math.isfinite(cost):
                    continue
                cand = (loss + cost, chosen + (span,))
                if total not in nxt or cand[0] < nxt[total][0]:
                    nxt[total] = cand
        best = nxt
        if not best:
            return None
    frames, (loss, chosen) = min(best.items(), key=lambda kv: (kv[1][0], kv[0]))
    return Allocation(list(chosen), loss, frames, budget)


def allocate(losses: dict[LocalSpan, SpanLoss], cfg: WanConfig, reduction: float | None,
             layers: list[int] | None = None, per_layer_spans: bool = False
             ) -> tuple[Allocation, dict[LocalSpan, Allocation | None]]:
    """The allocation with the lowest predicted loss, and the best one per shared span.

    With `layers` the L-layers are given: only their shared span is chosen (no budget)."""
    n, full = cfg.num_layers, cfg.max_frames
    per_span: dict[LocalSpan, Allocation | None] = {}
    if layers is not None:
        for span, sl in losses.items():
            spans = [span if i in layers else None for i in range(n)]
            loss = float(sum(sl.loss[i] for i in layers))
            frames = sum(full if s is None else s.frames for s in spans)
            per_span[span] = Allocation(spans, loss, frames, frames) if math.isfinite(loss) else None
    else:
        budget = budget_frames(cfg, reduction)
        for span, sl in losses.items():
            per_span[span] = dp([[(full, 0.0, None), (span.frames, float(sl.loss[l]), span)] for l in range(n)],
                                budget)
    found = [(a.loss, a.frames, s, a) for s, a in per_span.items() if a is not None]
    if per_layer_spans and layers is None:
        general = dp([[(full, 0.0, None)] + [(s.frames, float(sl.loss[l]), s) for s, sl in losses.items()]
                      for l in range(n)], budget_frames(cfg, reduction))
        if general is not None:
            return general, per_span
    if not found:
        raise UserError(f"--kv-reduction {reduction}: no candidate span reaches it "
                        f"({', '.join(str(s) for s in losses)}, full cache {full} frames)")
    return min(found, key=lambda t: (t[0], t[1], t[2]))[3], per_span


def reference_keeps_sink(sink: int, full_capacity: int, full_sink: int, stream_frames: int | None) -> bool:
    """Whether the full cache keeps a local span's first `sink` frames for the whole stream.

    A local sink frame the reference has evicted is a key the full model no longer attends to: the
    span then adds attention the reference lacks on every chunk from there on (in the rolling regime
    the sink layouts lose 5-10 dB for this, docs/eval/POLICY.md). So a sink is a candidate only
    where the full cache has sink frames of its own, or where the stream (`stream_frames`, None:
    unbounded) never outgrows the full cache."""
    return sink <= full_sink or (stream_frames is not None and stream_frames <= full_capacity)


def uniform(cfg: WanConfig, reduction: float, sink: int) -> Allocation | None:
    """Every layer local with the same span: as many frames as the byte budget allows, `sink` of them
    the first frames. None when not even one window frame fits."""
    per = budget_frames(cfg, reduction) // cfg.num_layers
    if per - sink < 1 or per >= cfg.max_frames:
        return None
    span = LocalSpan(sink, per - sink)
    return Allocation([span] * cfg.num_layers, 0.0, per * cfg.num_layers, budget_frames(cfg, reduction))


# Standard errors a challenger's measured gain must exceed before it replaces the uniform layout:
# the few frames a warmup scores rank close layouts by their noise.
GATE_Z = 2.0


def paired_gain(before, after) -> tuple[float, float]:
    """Mean of the paired per-frame decrease `before - after`, and its standard error (inf with one
    pair: nothing to tell a gain from noise).

    Several videos (lists of per-frame arrays, one per video): the frames of one video are not
    independent samples (one event, a shutter or a return, moves them together), so the video is
    the unit: the mean of the videos' mean gains, its standard error across videos."""
    if isinstance(before, (list, tuple)) and before and np.ndim(before[0]) >= 1:
        if len(before) == 1:
            return paired_gain(before[0], after[0])
        gains = np.array([paired_gain(b, a)[0] for b, a in zip(before, after)])
        return float(gains.mean()), float(gains.std(ddof=1) / math.sqrt(len(gains)))
    diff = np.asarray(before, dtype=float) - np.asarray(after, dtype=float)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    return float(diff.mean()), se


def _mean(errors) -> float:
    grouped = isinstance(errors, (list, tuple)) and errors and np.ndim(errors[0]) >= 1
    return float(np.mean(np.concatenate(errors) if grouped else errors))


def select(losses: dict[LocalSpan, SpanLoss], cfg: WanConfig, reduction: float, frame_errors,
           sinks: list[int], per_layer_spans: bool = True, z: float = GATE_Z) -> tuple[Allocation, dict]:
    """The allocation: the uniform layout unless the warmup shows, beyond its noise, a better one.

    Prior: every layer at the same span (`uniform`), with a sink frame wherever the reference keeps
    it (`sinks` holds 1): the attention-sink layout of StreamingLLM and LongLive, unless both the
    sink and the plain uniform span are short enough for the warmup to have measured them: then the
    one with the lower chain error. A warmup shorter than the span cannot test it (at equal bytes s0wT and s1w(T-1) drop nothing it sees, and at the
    short totals it does see, keeping frame 0 instead of a frame at distance 1-3 always loses); on
    development seeds 2000-2003 (whole video, 50%) the sink prior won on 4/4 by 1.4-5.8 dB.
    Challengers: the DP's best allocation per shared span and, with `per_layer_spans`, the general
    per-layer DP, on the allowed sinks. `frame_errors(spans) -> per-frame sample errors` (or a list
    of them, one per calibration video: paired_gain's unit is then the video)
    (calibration.Chain, uncorrected: the corrections were fit on these frames) scores prior and
    challengers on the same warmup frames; the best challenger replaces the prior only if its paired gain exceeds `z` standard
    errors. On the demo the additive prediction and a plain comparison of means both picked layouts
    that lost 1-6 dB against the uniform one (docs/eval/POLICY.md): a short warmup's few frames
    rank layouts within their noise, so the burden of proof is on the departure from uniform."""
    allowed = {s: l for s, l in losses.items() if s.sink in sinks}
    report: dict = {}
    prior = uniform(cfg, reduction, max(sinks))
    plain = uniform(cfg, reduction, 0)
    if prior is not None and plain is not None and prior.spans != plain.spans and all(
            a.spans[0] in allowed and allowed[a.spans[0]].source != "extrapolated" for a in (prior, plain)):
        # Both uniform layouts drop frames the warmup saw: the sink is a measurement, not a prior.
        errors = {a.spans[0].sink: _mean(frame_errors(a.spans)) for a in (prior, plain)}
        prior = prior if errors[prior.spans[0].sink] <= errors[0] else plain
        report["sink"] = {"measured": errors, "chosen": prior.spans[0].sink}
    challengers: list[Allocation] = []
    try:
        best, per_span = allocate(allowed, cfg, reduction)
        challengers += [a for a in per_span.values() if a is not None]
        if per_layer_spans:
            general, _ = allocate(allowed, cfg, reduction, per_layer_spans=True)
            challengers.append(general)
    except UserError:
        best = None
    if prior is None or prior.spans[0] not in allowed or not np.isfinite(allowed[prior.spans[0]].loss).all():
        if best is None:
            raise UserError(f"--kv-reduction {reduction}: no candidate span reaches it "
                            f"({', '.join(str(s) for s in losses)}, full cache {cfg.max_frames} frames)")
        prior = best
    base = frame_errors(prior.spans)
    report["prior"] = {"spans": _names(prior.spans), "error": _mean(base)}
    scored, winner, winner_gain = [], prior, 0.0
    seen = {tuple(prior.spans)}
    for alloc in challengers:
        if tuple(alloc.spans) in seen:
            continue
        seen.add(tuple(alloc.spans))
        gain, se = paired_gain(base, frame_errors(alloc.spans))
        scored.append({"spans": _names(alloc.spans), "predicted_loss": alloc.loss, "gain": gain, "se": se})
        if gain > z * se and gain > winner_gain:
            winner, winner_gain = alloc, gain
    report["challengers"] = scored
    report["chosen"] = "prior" if winner is prior else "challenger"
    return winner, report


def _names(spans: list[LocalSpan | None]) -> list[str]:
    return ["F" if s is None else f"s{s.sink}w{s.window}" for s in spans]


# -- the transition rule -----------------------------------------------------------------------
def sink_horizon(cfg_full_capacity: int, full_sink: int, sink: int) -> int | None:
    """The most frames of history at which the full cache still holds frames < sink (None: always).

    Past it the rolling full cache has evicted them: neither the monitor's a_l nor the caches cut at
    the transition could hold them, so the warmup must end by then."""
    if sink <= full_sink:
        return None
    return cfg_full_capacity - full_sink + sink - 1


def eligible_spans(spans: list[LocalSpan], history: int, full_capacity: int, full_sink: int) -> list[LocalSpan]:
    """The spans whose sink frames the full cache still holds after `history` frames: the ones the
    transition can still cut the caches to."""
    out = []
    for s in spans:
        h = sink_horizon(full_capacity, full_sink, s.sink)
        if h is None or history <= h:
            out.append(s)
    return out


@dataclass
class Decision:
    reason: str
    eligible: list[LocalSpan]  # spans the allocation may choose (sink frames still cached)


def ready(monitors: SpanMonitors, chunk: int, history: int, chunk_frames: int, full_capacity: int,
          full_sink: int, warmup_chunks: int, tol: float, current: Allocation | None,
          losses: dict[LocalSpan, SpanLoss] | None, beyond_sink_horizon: bool = False) -> Decision | None:
    """Whether the warmup ends after `chunk` (history frames written), DESIGN.md section 4.

    Not before every candidate span that the warmup can still reach has two monitored chunks (one
    held out); then when the d_eff of `current`'s L-layers changed by less than `tol` (relative)
    between their span's last two held-out chunks, or at the maximum warmup. When the next chunk
    would evict some candidates' sink frames from the full cache, the warmup ends there; with
    `beyond_sink_horizon` only if `current` uses one of them (or nothing else is left), otherwise
    they drop out and the warmup goes on, so that the other spans are measured on a longer history
    (in the rolling regime: past the point where the reference cache itself starts to evict)."""
    spans = monitors.spans
    last = chunk + 1 == warmup_chunks
    horizons = {s: sink_horizon(full_capacity, full_sink, s.sink) for s in spans}
    eligible = eligible_spans(spans, history, full_capacity, full_sink)
    closing = [s for s in eligible if horizons[s] is not None and history + chunk_frames > horizons[s]]
    remaining = [s for s in eligible if s not in closing]
    capped = bool(closing) and (not beyond_sink_horizon or not remaining or current is None
                                or any(s in closing for s in current.distinct_spans))
    counts = {s: len(monitors[s].monitored_chunks) for s in spans}
    if not any(counts[s] >= 2 for s in eligible):
        if capped or last:
            small = min(spans, key=lambda s: (s.frames, s))
            if capped:
                raise UserError(f"--sink {small.sink}/--window {small.window}: the full cache of {full_capacity} "
                                f"frames evicts the L-layers' sink frames after {horizons[small]} frames of history, "
                                f"before the warmup has two chunks whose history exceeds the local span of "
                                f"{small.frames} frames; lower --window or --sink")
            raise UserError(f"--warmup-chunks {warmup_chunks}: the warmup ended with {history} frames of history, "
                            f"too short to fit a correction for a local span of {small.frames} frames (needs two "
                            f"chunks whose history exceeds the span: at least {small.frames // chunk_frames + 3} "
                            f"chunks); lengthen the warmup")
        return None
    if last:
        return Decision(f"maximum warmup of {warmup_chunks} chunks reached", eligible)
    if capped:
        sink = max(s.sink for s in closing)
        return Decision(f"warmup ended at {history} frames: the next chunk would evict the L-layers' "
                        f"{sink} sink frames from the full cache", eligible)
    # the next chunk monitors a span whose history is longer than it: wait for its second chunk
    if any(counts[s] < 2 and history > s.frames for s in remaining):
        return None
    if current is None or losses is None or not current.local_layers:
        return None
    change = 0.0
    for layer in current.local_layers:
        span = current.spans[layer]
        mon = monitors[span]
        held = mon.heldout_chunks(layer)
        if len(held) < 2:
            return None
        corr = losses[span].corrections[layer]
        now, before = (mon.heldout[layer][c] for c in held[-2:][::-1])
        d_now = now["rho"][corr.rho] if corr.kept else now["raw"]
        d_before = before["rho"][corr.rho] if corr.kept else before["raw"]
        change = max(change, abs(d_now - d_before) / max(d_before, 1e-12))
    if change < tol:
        return Decision(f"converged: max relative change of the L-layers' held-out d {change:.3g} < {tol}", eligible)
    return None


def decide_fixed(monitor: WarmupMonitor, num_layers: int, n_local: int, chunk: int, history: int,
                 chunk_frames: int, warmup_chunks: int, tol: float, last: bool,
                 select_by: str = "corrected") -> tuple[list[int], list[int], str] | None:
    """The rule of one fixed span and n layers (the evaluation's shared transition point): the n
    layers with the lowest d (held-out corrected or raw, default rho) at the latest chunk; the same
    waiting, convergence and sink rules as `ready`."""
    span = monitor.span
    geo = None if monitor.stream is None else monitor.stream.geo
    horizon = None if geo is None else sink_horizon(geo.full_capacity, geo.full_sink, span.sink)
    chunks = monitor.monitored_chunks
    capped = horizon is not None and history + chunk_frames > horizon
    if history < span.frames + chunk_frames or len(chunks) < 2 or chunks[-1] != chunk:
        if capped:
            raise UserError(f"--sink {span.sink}/--window {span.window}: the full cache of {geo.full_capacity} "
                            f"frames evicts the L-layers' sink frames after {horizon} frames of history, before the "
                            f"warmup has two chunks whose history exceeds the local span of {span.frames} frames; "
                            f"lower --window or --sink")
        if last:
            raise UserError(f"--warmup-chunks {warmup_chunks}: the warmup ended with {history} frames of history, "
                            f"too short to fit a correction for a local span of {span.frames} frames (needs two "
                            f"chunks whose history exceeds the span: at least {span.frames // chunk_frames + 3} "
                            f"chunks); lengthen the warmup")
        return None
    idx = 0 if select_by == "raw" else 1
    d = np.array([monitor.chunk_discrepancy(l, chunk)[idx] for l in range(num_layers)])
    ranking = [int(i) for i in np.argsort(d, kind="stable")]
    layers = sorted(ranking[:n_local])
    if len(chunks) >= 3:
        now = np.array([monitor.chunk_discrepancy(l, chunk)[1] for l in layers])
        before = np.array([monitor.chunk_discrepancy(l, chunks[-2])[1] for l in layers])
        change = np.abs(now - before) / np.maximum(before, 1e-12)
        if change.max() < tol:
            return layers, ranking, f"converged: max relative change of d* {change.max():.3g} < {tol}"
    if last:
        return layers, ranking, f"maximum warmup of {warmup_chunks} chunks reached"
    if capped:
        return layers, ranking, (f"warmup ended at {history} frames: the next chunk would evict the L-layers' "
                                 f"{span.sink} sink frames from the full cache")
    return None
