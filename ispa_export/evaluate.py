"""Quality evaluation (DESIGN.md section 8): ISPA against token dropping at equal KV bytes.

Per seed, one warmup with every layer in F mode (teacher-forced with a procedural video when the
model draws 3-channel square frames, so that the objects whose identity is scored exist in the
history) runs the monitor and the transition rule of ispa.decide. The model and stream at the
transition point, before any bake, are the common start of every run:

- reference: the same model and stream continued with the full cache;
- every method: a deep copy, baked with its layers, span and correction, continued with the same
  noise (chunk_noise is a pure function of seed, chunk and step).

Methods at one KV reduction hold the same steady-state KV bytes (checked against the caches the
stream actually allocates):

- ispa: the n layers with the lowest held-out corrected d*, sink s + window w, correction
  (variant full, site wo);
- ispa-nocorr: the same layers and span, no correction;
- drop: the n layers with the lowest raw d of a plain window (sink 0, window s + w), no correction;
- sink-window (StreamingLLM / LongLive): the n layers with the lowest raw d of a sink span (sink s,
  or 1 when s = 0) of the same length, no correction;
- uniform: every layer local, with that sink and the window that gives the same bytes, and
  uniform-nosink, the same bytes as plain windows (rounded down, and said, when not whole);
- ispa-nosink / ispa-sink1: ISPA on the same bytes with the other sink choice (alt_span: sink 0,
  window s + w, or sink 1, window w - 1), selected and corrected from that span's statistics of the
  same warmup;
- ISPA variants (full run): per_pass, bias, adapter site, rank k, ridge rho, raw-d selection; and
  other (sink, window) spans, each with its own warmup and equal-bytes baselines.

Two protocols after the transition: 'free' (the model continues on its own samples, the protocol of
DESIGN.md section 8) and 'teacher' (every cache pass stores the true video frame and each chunk's
denoised sample is scored: the effect of the compression on one chunk's prediction from a known
history, without the compounding of a free run; it needs the procedural video).

Metrics on the frames after the transition, against the reference: PSNR and SSIM (data range 2
for frames in [-1, 1]), flicker (frame-difference energy relative to the reference's), drift (PSNR
of the last quarter minus the first), and identity recall of returning objects against the
procedural ground truth (videos.identity_recall).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from graphs.config import WanConfig
from graphs.wan import FULL, LOCAL, WanModel
from runtimes.driver import Stream

from .errors import UserError
from .ispa import IspaOptions, bake, decide
from .kv import frame_bytes, kv_bytes, layers_for_target
from .monitor import LocalSpan, WarmupMonitor
from .torch_runner import torch_stream

REDUCTIONS = (0.25, 0.5, 0.75)
HEADLINE = 0.5
# ispa-nosink / ispa-sink1: ISPA at the same span with the other sink choice (alt_span)
ALT_METHODS = ("ispa-nosink", "ispa-sink1")
MAIN_METHODS = ("ispa", *ALT_METHODS, "ispa-nocorr", "drop", "sink-window", "uniform", "uniform-nosink")
BASELINES = ("drop", "sink-window", "uniform", "uniform-nosink")  # the token-dropping methods ISPA must beat
PSNR_CAP = 100.0  # dB for frames equal to the reference (skimage would say inf)
METRICS = ("psnr", "ssim", "flicker", "drift", "recall")


# -- methods ------------------------------------------------------------------------------------
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

    def modes(self, num_layers: int) -> list[str]:
        return [LOCAL if i in self.layers else FULL for i in range(num_layers)]


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


# -- the warmup ---------------------------------------------------------------------------------
class _Fanout:
    """Feeds one forward's (a_g, a_l) to several monitors of the same span (e.g. sites wo and
    adapter), so one warmup yields the statistics of both without a second run."""

    def __init__(self, monitors: list[WarmupMonitor]):
        self.monitors = monitors
        self.local_masks = []

    def before_pass(self, info):
        got = [m.before_pass(info) for m in self.monitors]
        if got[0] is None:
            return None
        self.local_masks = self.monitors[0].local_masks
        return self

    def record(self, *args) -> None:
        for m in self.monitors:
            m.record(*args)

    def finish(self) -> None:
        for m in self.monitors:
            m.finish()


@dataclass
class Warmup:
    """The common start of every run of one seed: all-F model and stream at the transition point."""

    model: WanModel
    stream: Stream
    # 'wo' / 'adapter': sink + window statistics by absorption site; 'alt' / 'alt-adapter': the same
    # for alt_span() (the other sink choice at the same span), from a replay of the warmup.
    monitors: dict[str, WarmupMonitor]
    chunk: int  # first chunk after the transition
    reason: str
    d: dict[str, np.ndarray]  # per layer at the last warmup chunk (mean over passes): see methods_for
    seconds: float


def _chunk_d(monitor: WarmupMonitor, chunk: int, num_layers: int, idx: int) -> np.ndarray:
    return np.array([monitor.chunk_discrepancy(l, chunk)[idx] for l in range(num_layers)])


def _chunk_of(video: np.ndarray | None, c: int, f: int) -> np.ndarray | None:
    """Frames [F, C, H, W] -> the given chunk [1, C, f, H, W] for Stream.step."""
    if video is None:
        return None
    return np.ascontiguousarray(video[c * f:(c + 1) * f].transpose(1, 0, 2, 3)[None])


def _monitors(span: LocalSpan, rho: float | None, adapter: bool, prefix: str = "") -> dict[str, WarmupMonitor]:
    out = {prefix or "wo": WarmupMonitor(span, rho, "full", "wo")}
    if adapter:
        out[f"{prefix}-adapter" if prefix else "adapter"] = WarmupMonitor(span, rho, "full", "adapter")
    return out


def warmup(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions, n_local: int,
           video: np.ndarray | None = None, adapter: bool = True) -> Warmup:
    """ispa.transition up to (not including) the bake, with teacher forcing by `video` frames."""
    t0 = time.perf_counter()
    cfg = model.cfg
    model.set_modes([FULL] * cfg.num_layers)
    monitors = _monitors(LocalSpan(opts.sink, opts.window), opts.rho, adapter)
    fan = _Fanout(list(monitors.values()))
    stream = torch_stream(model, context, seed, before_pass=fan.before_pass)
    for m in monitors.values():
        m.stream = stream
    f = cfg.chunk_frames
    decision = None
    for c in range(opts.warmup_chunks):
        stream.step(_chunk_of(video, c, f))
        fan.finish()
        decision = decide(monitors["wo"], cfg.num_layers, n_local, opts, c, stream.frame_index, f,
                          last=c + 1 == opts.warmup_chunks)
        if decision is not None:
            break
    stream.runner.before_pass = None
    last = stream.chunk - 1
    n = cfg.num_layers
    d = {"corrected": _chunk_d(monitors["wo"], last, n, 1), "raw": _chunk_d(monitors["wo"], last, n, 0)}
    alt = alt_span(cfg, opts.sink, opts.window)
    if alt is not None and (alt[0] == 0 or stream.frame_index <= sink_horizon_frames(cfg, alt[0])):
        # The other span needs its own local mask, hence a second pass over the warmup, teacher-forced
        # with the frames the first one produced (so every cache and activation is the same).
        other = _monitors(LocalSpan(*alt), opts.rho, adapter, prefix="alt")
        fan = _Fanout(list(other.values()))
        replay = torch_stream(model, context, seed, before_pass=fan.before_pass)
        for m in other.values():
            m.stream = replay
        for x in stream.latents:
            replay.step(x)
            fan.finish()
        monitors.update(other)
        d |= {"alt_corrected": _chunk_d(other["alt"], last, n, 1), "alt_raw": _chunk_d(other["alt"], last, n, 0)}
    return Warmup(model, stream, monitors, stream.chunk, decision[2], d, time.perf_counter() - t0)


def rollout(w: Warmup, method: Method | None, chunks: int,
            video: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Continue a copy of the warmup's stream for `chunks` chunks with `method` baked in (None: the
    full-cache reference). Free-running without `video`; with `video` frames [F, C, H, W] (the
    whole video, warmup included) every cache pass stores the true frames (teacher forcing) and the
    result is each chunk's denoised sample. Returns latents [B, C, chunks*f, H, W] and the bytes of
    the self-attention caches the stream holds."""
    model = copy.deepcopy(w.model)
    stream = copy.deepcopy(w.stream, {id(w.model): model})  # its runner (and buffers) now run `model`
    if method is not None and method.layers:
        monitor = w.monitors.get(method.stats)
        if monitor is None:
            raise UserError(f"method {method.name}: the warmup kept no statistics {method.stats!r}; "
                            f"it has {sorted(w.monitors)}")
        if method.rank is not None or method.rho is not None:
            monitor = copy.copy(monitor)  # solution() reads rank/rho off the monitor
            monitor.rank = method.rank
            if method.rho is not None:
                monitor.rho = method.rho
        opts = IspaOptions(kv_reduction=None, layers=list(method.layers), window=method.window, sink=method.sink,
                           variant=method.variant, site=method.site, rank=method.rank, rho=method.rho)
        bake(model, stream, monitor, list(method.layers), opts)
    return continue_stream(stream, chunks, video), sum(g.nbytes for g in stream.groups.values())


def continue_stream(stream: Stream, chunks: int, video: np.ndarray | None = None) -> np.ndarray:
    """`chunks` more chunks: free-running, or teacher-forced by `video` frames [F, C, H, W] (the whole
    video from frame 0), returning each chunk's own sample, not the true frames it then stores."""
    if video is None:
        return stream.run(chunks)
    f = stream.geo.chunk_frames
    samples = []
    for c in range(stream.chunk, stream.chunk + chunks):
        stream.step(_chunk_of(video, c, f))
        samples.append(stream.sample)
    return np.concatenate(samples, axis=2)


# -- metrics ------------------------------------------------------------------------------------
def frames_of(latents: np.ndarray) -> np.ndarray:
    """[1, C, T, H, W] -> [T, C, H, W], clipped to the displayed range [-1, 1]."""
    return np.clip(latents[0].transpose(1, 0, 2, 3), -1.0, 1.0)


def psnr_frames(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, data range 2) of [T, C, H, W] frames; PSNR_CAP where they are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    out = []
    for r, g in zip(ref, gen):
        equal = np.array_equal(r, g)
        out.append(PSNR_CAP if equal else min(PSNR_CAP, peak_signal_noise_ratio(r, g, data_range=2.0)))
    return np.array(out)


def ssim_frames(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    side = min(ref.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    return np.array([structural_similarity(r, g, data_range=2.0, channel_axis=0, win_size=win)
                     for r, g in zip(ref, gen)])


def flicker_energy(frames: np.ndarray) -> float:
    """Mean squared difference of consecutive frames."""
    if len(frames) < 2:
        return float("nan")
    return float(np.mean(np.diff(frames, axis=0) ** 2))


def drift(psnr: np.ndarray) -> float:
    """Mean PSNR of the last quarter of the frames minus the first quarter (< 0: quality decays)."""
    q = max(len(psnr) // 4, 1)
    return float(np.mean(psnr[-q:]) - np.mean(psnr[:q]))


def video_metrics(ref: np.ndarray, gen: np.ndarray, ref_flicker: float) -> dict:
    """PSNR/SSIM (means over frames), flicker ratio and drift of frames [T, C, H, W] after the
    transition against the reference's."""
    p = psnr_frames(ref, gen)
    e = flicker_energy(gen)
    return {
        "psnr": float(np.mean(p)), "ssim": float(np.mean(ssim_frames(ref, gen))),
        "flicker": e / ref_flicker if ref_flicker > 0 else float("nan"),
        "drift": drift(p), "psnr_per_frame": [round(float(x), 3) for x in p],
    }


def recall_of(frames: np.ndarray, sample, frames_from: int) -> float:
    from .videos import identity_recall

    return identity_recall(frames, sample, frames_from=frames_from)


# -- one seed -----------------------------------------------------------------------------------
# 'free': after the transition the model generates on its own samples (DESIGN.md section 8).
# 'teacher': every cache pass stores the true video frame and each chunk's denoised sample is scored:
# what the compression changes in one chunk's prediction from a known history, without the
# compounding of a free run (meaningful even for a model whose free runs wander off).
PROTOCOLS = ("free", "teacher")


@dataclass
class Settings:
    seeds: list[int]
    reductions: tuple[float, ...] = REDUCTIONS
    sink: int = 0  # the export default (IspaOptions)
    window: int = 2
    warmup_chunks: int = 8
    min_chunks: int = 32  # total video length in chunks (at least 4x the warmup and > capacity)
    variants: bool = False  # ISPA variants at the headline reduction
    rank: int | None = None
    rhos: tuple[float, ...] = ()  # ridge strengths tried as variants (same layers as ispa)
    # (sink, window, with ISPA variants) of the span sweep at the headline reduction
    spans: tuple[tuple[int, int, bool], ...] = ()
    teacher_force: bool = True  # warm up on a procedural video where the model draws 3-channel frames
    protocols: tuple[str, ...] = PROTOCOLS  # 'teacher' runs only where there is a video


def _video_for(cfg, seed: int, frames: int, teacher_force: bool):
    """A procedural video when the model draws 3-channel square pixel frames (the demo), else None."""
    if not teacher_force or cfg.in_dim != 3 or cfg.latent_height != cfg.latent_width or cfg.latent_height < 16:
        return None
    from .videos import make_video

    return make_video(seed, frames, cfg.latent_height)


def evaluate_seed(model: WanModel, context: torch.Tensor, seed: int, s: Settings,
                  log=lambda msg: None) -> dict:
    """One warmup, the reference and every method under each protocol; frames kept in '_frames'."""
    cfg = model.cfg
    reachable, skipped = [], {}
    for r in s.reductions:
        try:
            layers_for_target(cfg, r, s.window, s.sink)
            reachable.append(r)
        except ValueError as e:
            skipped[str(r)] = str(e)
    if not reachable:
        raise UserError(f"kv reductions {list(s.reductions)}: none is reachable with sink {s.sink} + "
                        f"window {s.window} of {cfg.max_frames} frames")
    decide_at = HEADLINE if HEADLINE in reachable else reachable[0]
    f = cfg.chunk_frames
    # The sink baselines of a plain-window ISPA need the sink frames still in the full cache at the
    # transition: end the warmup by their horizon (all methods share the transition).
    alt = alt_span(cfg, s.sink, s.window)
    horizon = min(sink_horizon_frames(cfg, s.sink), sink_horizon_frames(cfg, alt[0]) if alt else float("inf"))
    chunks = s.warmup_chunks if horizon == float("inf") else min(s.warmup_chunks, int(horizon) // f)
    opts = IspaOptions(kv_reduction=decide_at, window=s.window, sink=s.sink, warmup_chunks=chunks)
    opts.check(cfg.num_layers)
    n_decide = layers_for_target(cfg, decide_at, s.window, s.sink)
    # The video must cover the longest possible run: warmup + the rest.
    max_total = max(s.min_chunks, 4 * s.warmup_chunks, -(-2 * cfg.max_frames // f))
    sample = _video_for(cfg, seed, max_total * f, s.teacher_force)
    w = warmup(model, context, seed, opts, n_decide, None if sample is None else sample.frames,
               adapter=s.variants)
    # At least 4x the warmup, longer than the full cache, and the requested length.
    total = max(s.min_chunks, 4 * w.chunk, -(-2 * cfg.max_frames // f))
    rest = total - w.chunk
    t_frame = w.chunk * f
    truth = None if sample is None else dataclasses.replace(sample, **{
        k: getattr(sample, k)[:total * f] for k in ("frames", "background", "visible_fraction", "visible", "bbox", "masks")})
    protocols = [p for p in s.protocols if p == "free" or truth is not None]
    log(f"seed {seed}: transition at chunk {w.chunk} ({w.reason}); {rest} more chunks per run, "
        f"protocols {protocols}")
    warm = frames_of(np.concatenate(w.stream.latents, axis=2))
    result = {
        "seed": seed, "transition_chunk": w.chunk, "transition_frame": t_frame, "reason": w.reason,
        "total_chunks": total, "frames_after_transition": rest * f, "warmup_seconds": w.seconds,
        "warmup_limit_chunks": opts.warmup_chunks,
        "teacher_forced_warmup": truth is not None, "discrepancy": {k: v.tolist() for k, v in w.d.items()},
        "skipped_reductions": skipped, "protocols": {},
    }
    frames: dict = {"warmup": warm, "truth": None if truth is None else truth.frames}
    all_methods = {r: methods_for(r, cfg, s.sink, s.window, w.d, variants=s.variants and r == HEADLINE,
                                  rank=s.rank, rhos=s.rhos if s.variants else ()) for r in reachable}
    for proto in protocols:
        video = truth.frames if proto == "teacher" else None
        t0 = time.perf_counter()
        ref_lat, ref_bytes = rollout(w, None, rest, video)
        ref = frames_of(ref_lat)
        ref_flicker = flicker_energy(ref)
        ref_info = {"kv_bytes": ref_bytes, "flicker_energy": ref_flicker, "seconds": time.perf_counter() - t0,
                    "recall": float("nan") if truth is None else recall_of(np.concatenate([warm, ref]), truth, t_frame),
                    "psnr_vs_truth": (float("nan") if truth is None
                                      else float(np.mean(psnr_frames(truth.frames[t_frame:], ref))))}
        out = {"reference": ref_info, "reductions": {}}
        frames[(proto, "reference")] = ref
        done: dict[tuple, tuple[dict, np.ndarray]] = {}
        for r in reachable:
            methods, notes = all_methods[r]
            rows = {}
            for m in methods:
                expect = kv_bytes(cfg, m.modes(cfg.num_layers), m.window, m.sink).total
                if m.key() in done:
                    metrics, gen = done[m.key()]
                    metrics = dict(metrics, same_run_as=metrics.get("same_run_as") or metrics["method"])
                else:
                    t0 = time.perf_counter()
                    lat, held = rollout(w, m, rest, video)
                    gen = frames_of(lat)
                    if held != expect:
                        raise RuntimeError(f"{m.name} at {r:.0%}: the stream holds {held} KV bytes, "
                                           f"kv_bytes says {expect}")
                    metrics = video_metrics(ref, gen, ref_flicker)
                    metrics["recall"] = (float("nan") if truth is None
                                         else recall_of(np.concatenate([warm, gen]), truth, t_frame))
                    metrics["seconds"] = time.perf_counter() - t0
                    metrics["method"] = m.name
                    done[m.key()] = (metrics, gen)
                rows[m.name] = dict(metrics, method=m.name, layers=list(m.layers), sink=m.sink, window=m.window,
                                    variant=m.variant, site=m.site, rank=m.rank, rho=m.rho, stats=m.stats,
                                    kv_bytes=expect, kv_reduction=1 - expect / ref_bytes)
                frames[(proto, r, m.name)] = gen
                log(f"  {proto:7s} {r:.0%} {m.name:20s} layers {list(m.layers)} s{m.sink}+w{m.window}: "
                    f"PSNR {metrics['psnr']:.2f} SSIM {metrics['ssim']:.3f} recall {metrics['recall']:.3f}")
            budget = rows["ispa"]["kv_bytes"]
            off = {n: row["kv_bytes"] for n, row in rows.items() if row["kv_bytes"] != budget
                   and not (n.startswith("uniform") and row["kv_bytes"] < budget)}
            if off:
                raise RuntimeError(f"methods at {r:.0%} differ from ISPA's {budget} KV bytes: {off}")
            out["reductions"][str(r)] = {"methods": rows, "notes": notes, "kv_bytes": budget}
        result["protocols"][proto] = out
    result["_frames"] = frames
    return result


# -- aggregation and outputs ----------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(per_seed: list[dict], protocol: str) -> dict:
    """reduction -> method -> metric -> mean/std/n over seeds (plus KV bytes, span, layers per seed)."""
    out: dict = {}
    for res in per_seed:
        for r, red in res["protocols"].get(protocol, {}).get("reductions", {}).items():
            for name, row in red["methods"].items():
                slot = out.setdefault(r, {}).setdefault(name, {
                    "kv_bytes": row["kv_bytes"], "kv_reduction": row["kv_reduction"], "sink": row["sink"],
                    "window": row["window"], "values": {k: [] for k in METRICS}, "layers": []})
                for k in METRICS:
                    slot["values"][k].append(row[k])
                slot["layers"].append(row["layers"])
    for r in out:
        for name, slot in out[r].items():
            values = slot.pop("values")
            slot.update({k: _stats(v) for k, v in values.items()})
            slot["psnr_per_seed"] = values["psnr"]
    return out


def best_baseline(agg_r: dict) -> str | None:
    names = [n for n in BASELINES if n in agg_r]
    return max(names, key=lambda n: agg_r[n]["psnr"]["mean"]) if names else None


def _versus(a: dict, name: str, best: str, n_seeds: int) -> str:
    """How `name` compares with `best`: difference of the means and the per-seed (paired) record."""
    diff = a[name]["psnr"]["mean"] - a[best]["psnr"]["mean"]
    pairs = np.array(a[name]["psnr_per_seed"]) - np.array(a[best]["psnr_per_seed"])
    how = (f"{diff:.2f} dB closer to the reference than" if diff > 0
           else f"{-diff:.2f} dB further from the reference than" if diff < 0 else "level with")
    spread = f", paired difference std {pairs.std(ddof=1):.2f} dB" if len(pairs) > 1 else ""
    return f"{how} {best} (better on {int((pairs > 0).sum())}/{n_seeds} seeds{spread})"


PROTOCOL_TITLES = {"free": "free-running after the transition", "teacher": "teacher-forced after the transition"}


def key_line(agg: dict, n_seeds: int, protocol: str = "free") -> str:
    """The headline: ISPA's PSNR against the reference vs the best drop baseline's, at 50%."""
    r = str(HEADLINE)
    if r not in agg or "ispa" not in agg[r]:
        return f"{PROTOCOL_TITLES[protocol]}: no result at {HEADLINE:.0%} KV reduction"
    a = agg[r]
    best = best_baseline(a)
    pm = lambda s: f" ± {s['std']:.2f}" if s["n"] > 1 else ""  # noqa: E731
    psnr = lambda n: f"{a[n]['psnr']['mean']:.2f}{pm(a[n]['psnr'])} dB"  # noqa: E731
    span = lambda n: f"sink {a[n]['sink']} + window {a[n]['window']}"  # noqa: E731
    fewer = (f", with fewer KV bytes ({a[best]['kv_bytes']:,})" if a[best]["kv_bytes"] < a["ispa"]["kv_bytes"]
             else "")
    parts = [f"{PROTOCOL_TITLES[protocol].capitalize()}, at {HEADLINE:.0%} KV reduction (target; "
             f"{a['ispa']['kv_reduction']:.1%} removed, {a['ispa']['kv_bytes']:,} KV bytes), PSNR against the "
             f"full-cache reference: ISPA ({span('ispa')}) {psnr('ispa')}, best drop baseline {best} ({span(best)}"
             f"{fewer}) {psnr(best)}: ISPA is {_versus(a, 'ispa', best, n_seeds)}"]
    for alt in (n for n in ALT_METHODS if n in a):
        what = "without the sink frame" if alt == "ispa-nosink" else "with a sink frame"
        parts.append(f"ISPA {what} ({span(alt)}) {psnr(alt)}: {_versus(a, alt, best, n_seeds)}")
    if "ispa-nocorr" in a:
        parts.append(f"ISPA's layers without the correction give {psnr('ispa-nocorr')}")
    variants = [n for n in a if n.startswith("ispa") and n not in ("ispa", "ispa-nocorr", *ALT_METHODS)]
    if variants:
        top = max(variants, key=lambda n: a[n]["psnr"]["mean"])
        parts.append(f"the best ISPA variant, picked after the fact on these seeds, is {top} "
                     f"({span(top)}) {psnr(top)}: {_versus(a, top, best, n_seeds)}")
    return "; ".join(parts) + "."


def _fmt(s: dict, digits: int) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def sweep_lines(sweep: list[dict]) -> list[str]:
    """Per protocol and span: ISPA's PSNR minus the best drop baseline's at the same bytes."""
    out = []
    for proto, setting in dict.fromkeys((r["protocol"], r["setting"]) for r in sweep if "note" not in r):
        rows = {r["method"]: r for r in sweep if (r.get("protocol"), r["setting"]) == (proto, setting)}
        best = rows.get("ispa", {}).get("best_baseline")
        if not best:
            continue
        for name in ("ispa", *ALT_METHODS):
            if name in rows:
                diff = rows[name]["psnr"]["mean"] - rows[best]["psnr"]["mean"]
                out.append(f"{proto}, {setting}: {name} {rows[name]['psnr']['mean']:.2f} dB vs best baseline {best} "
                           f"{rows[best]['psnr']['mean']:.2f} dB ({diff:+.2f} dB)")
    return out


def write_markdown(path: Path, summary: dict) -> None:
    per_seed = summary["seeds"]
    s0 = per_seed[0]
    lines = [f"# Quality at equal KV bytes ({summary['model']}, {len(per_seed)} seed(s)"
             f"{', quick' if summary['quick'] else ''})", ""]
    lines += [f"- {summary['key_lines'][p]}" for p in summary["protocols"]] + [""]
    if summary.get("weights"):
        lines += [f"Weights: {summary['weights']['file']} (sha256 {summary['weights']['sha256']}).", ""]
    lines += [
        f"Reference: full-cache rollout ({summary['full_kv_bytes']:,} KV bytes) from the same warmup with the same "
        f"noise. Span: sink {summary['settings']['sink']} + window {summary['settings']['window']} frames of a "
        f"{summary['config']['max_frames']}-frame cache. Transition chunks per seed: "
        f"{[s['transition_chunk'] for s in per_seed]} (frames {[s['transition_frame'] for s in per_seed]}); "
        f"{s0['frames_after_transition']} frames scored after the transition per run"
        + (" (warmup teacher-forced with a procedural video)" if s0["teacher_forced_warmup"] else "")
        + f"; warmups of at most {s0.get('warmup_limit_chunks', summary['settings']['warmup_chunks'])} chunks, "
        "so that the sink frames of the sink baselines are still in the full cache at the transition.",
        "",
        "PSNR/SSIM against the reference (higher is better); flicker = frame-difference energy / the "
        "reference's (1 is best); drift = PSNR(last quarter) - PSNR(first quarter); recall = identity "
        "recall of returning objects against the ground-truth video. Mean ± std over seeds.",
    ]
    for proto in summary["protocols"]:
        agg = summary["aggregate"][proto]
        ref = summary["reference"][proto]
        lines += ["", f"## {PROTOCOL_TITLES[proto].capitalize()}", "",
                  f"The reference itself: PSNR against the ground-truth video {_fmt(ref['psnr_vs_truth'], 2)} dB, "
                  f"identity recall {_fmt(ref['recall'], 3)}.", "",
                  "| KV reduction | method | KV bytes | PSNR dB | SSIM | flicker | drift dB | recall | layers (seed 0) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(agg, key=float):
            order = [n for n in MAIN_METHODS if n in agg[r]] + [n for n in agg[r] if n not in MAIN_METHODS]
            for name in order:
                a = agg[r][name]
                lines.append(f"| {float(r):.0%} ({a['kv_reduction']:.1%}) | {name} | {a['kv_bytes']:,} | "
                             f"{_fmt(a['psnr'], 2)} | {_fmt(a['ssim'], 3)} | {_fmt(a['flicker'], 3)} | "
                             f"{_fmt(a['drift'], 2)} | {_fmt(a['recall'], 3)} | {a['layers'][0]} |")
    notes = sorted({n for s in per_seed for p in s["protocols"].values() for red in p["reductions"].values()
                    for n in red["notes"]} | {f"{r}: {why}" for s in per_seed for r, why in s["skipped_reductions"].items()})
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if summary.get("sweep"):
        lines += ["", f"## Other spans at {HEADLINE:.0%} KV reduction", "",
                  "Each span has its own warmup and transition, so its reference frames differ; compare "
                  "methods within a span (equal KV bytes there).", "",
                  "| protocol | span | method | KV bytes | PSNR dB | SSIM | recall | layers (seed 0) |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for row in summary["sweep"]:
            if "note" in row:
                lines.append(f"| | {row['setting']} | not run: {row['note']} | | | | | |")
                continue
            lines.append(f"| {row['protocol']} | {row['setting']} | {row['method']} | {row['kv_bytes']:,} "
                         f"({row['kv_reduction']:.1%}) | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'], 3)} | "
                         f"{_fmt(row['recall'], 3)} | {row['layers'][0]} |")
        lines += [""] + [f"- {line}" for line in sweep_lines(summary["sweep"])]
    lines += ["", "Files of the run: eval.json (every number, per seed and per frame), quality_vs_memory.png, "
              + ", ".join(f"{name} ({caption})" for name, caption in summary.get("gifs", {}).items()) + "."]
    path.write_text("\n".join(lines) + "\n")


def plot_quality(path: Path, aggs: dict[str, dict], full_bytes: int) -> None:
    """PSNR vs KV bytes, one line per main method, one panel per protocol; ISPA variants as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ispa": ("C3", "o", "-"), "ispa-nosink": ("C5", "P", "-"), "ispa-sink1": ("C5", "P", "--"),
              "ispa-nocorr": ("C1", "s", "--"),
              "drop": ("C0", "v", "-"), "sink-window": ("C2", "^", "-"), "uniform": ("C4", "D", ":"),
              "uniform-nosink": ("C9", "d", ":")}
    protos = list(aggs)
    fig, axes = plt.subplots(1, len(protos), figsize=(5.2 * len(protos) + 2.2, 4.5), dpi=110, squeeze=False)
    for ax, proto in zip(axes[0], protos):
        agg = aggs[proto]
        for name in MAIN_METHODS:
            pts = sorted((agg[r][name]["kv_bytes"], agg[r][name]["psnr"]["mean"], agg[r][name]["psnr"]["std"])
                         for r in agg if name in agg[r])
            if not pts:
                continue
            x, y, e = (np.array(v) for v in zip(*pts))
            c, mk, ls = styles[name]
            ax.errorbar(x / 2**20, y, yerr=e, color=c, marker=mk, ls=ls, capsize=3, label=name)
        extra = [(agg[r][n]["kv_bytes"], agg[r][n]["psnr"]["mean"]) for r in agg for n in agg[r] if n not in MAIN_METHODS]
        if extra:
            x, y = zip(*extra)
            ax.scatter(np.array(x) / 2**20, y, s=12, color="0.45", marker="x", zorder=3,
                       label=f"ISPA variants ({len(extra)})")
        ax.axvline(full_bytes / 2**20, color="k", lw=0.8, ls=":", label="full cache")
        ax.set_xlabel("steady-state KV bytes (MiB)")
        ax.set_ylabel("PSNR vs full-cache reference (dB)")
        ax.set_title(PROTOCOL_TITLES[proto], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("quality vs memory: frames after the transition, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_gif(path: Path, panels: list[np.ndarray], scale: int = 4) -> Path:
    """Panels [T, C, H, W] side by side, separated by white bars, as an upscaled GIF."""
    from .videos import save_preview

    t = min(len(p) for p in panels)
    rgb = [p[:t, :3] if p.shape[1] >= 3 else np.repeat(p[:t, :1], 3, axis=1) for p in panels]
    bar = np.ones(rgb[0].shape[:3] + (1,), np.float32)
    parts = []
    for i, p in enumerate(rgb):
        parts += ([bar] if i else []) + [p]
    return save_preview(np.concatenate(parts, axis=3), path, scale=scale)


# -- the whole evaluation -----------------------------------------------------------------------
def _seed_worker(model: WanModel, context: torch.Tensor, seed: int, settings: Settings) -> dict:
    torch.set_num_threads(1)
    return evaluate_seed(model, context, seed, settings,
                         log=lambda msg: print(f"[seed {seed}] {msg}", file=sys.stderr, flush=True))


def evaluate_seeds(model: WanModel, context: torch.Tensor, settings: Settings, jobs: int = 1,
                   log=print) -> list[dict]:
    """evaluate_seed for every seed of `settings`, in order; with jobs > 1 in that many worker
    processes (one torch thread each: the seeds are independent, their ops too small to split)."""
    if jobs <= 1 or len(settings.seeds) == 1:
        return [evaluate_seed(model, context, seed, settings, log=log) for seed in settings.seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that has run OpenMP regions can deadlock.
    with ProcessPoolExecutor(min(jobs, len(settings.seeds)), mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = [ex.submit(_seed_worker, model, context, seed, settings) for seed in settings.seeds]
        return [f.result() for f in futures]


def sweep_spans(model: WanModel, context: torch.Tensor, settings: Settings, log=print, jobs: int = 1) -> list[dict]:
    """ISPA and the baselines at the headline reduction for other (sink, window) spans; each span has
    its own warmup (the monitor's a_l depends on it), transition and equal-bytes comparison."""
    rows = []
    for sink, window, variants in settings.spans:
        label = f"sink {sink} + window {window}"
        sub = dataclasses.replace(settings, sink=sink, window=window, reductions=(HEADLINE,), variants=variants,
                                  spans=())
        try:
            per_seed = evaluate_seeds(model, context, sub, jobs, log=log)
        except UserError as e:
            rows.append({"setting": label, "method": "-", "note": str(e)})
            log(f"sweep {label}: not run ({e})")
            continue
        for res in per_seed:
            res.pop("_frames")
        for proto in per_seed[0]["protocols"]:
            agg = aggregate(per_seed, proto).get(str(HEADLINE), {})
            best = best_baseline(agg)
            for name, a in agg.items():
                rows.append({"protocol": proto, "setting": label, "method": name, "kv_bytes": a["kv_bytes"],
                             "kv_reduction": a["kv_reduction"], "psnr": a["psnr"], "ssim": a["ssim"],
                             "recall": a["recall"], "layers": a["layers"], "best_baseline": best,
                             "transition_chunks": [r["transition_chunk"] for r in per_seed]})
    return rows


def run_eval(model: WanModel, context: torch.Tensor, settings: Settings, out: Path, name: str,
             quick: bool, log=print, weights: dict | None = None, jobs: int = 1) -> dict:
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = evaluate_seeds(model, context, settings, jobs, log=log)
    frames0 = per_seed[0]["_frames"]
    for res in per_seed:
        res.pop("_frames")
    protocols = list(per_seed[0]["protocols"])
    aggs = {p: aggregate(per_seed, p) for p in protocols}
    sweep = sweep_spans(model, context, settings, log=log, jobs=jobs) if settings.spans else []
    full = kv_bytes(cfg).total
    summary = {
        "model": name, "weights": weights, "quick": quick, "config": cfg.to_dict(), "settings": asdict(settings),
        "protocols": protocols, "full_kv_bytes": full, "frame_kv_bytes": frame_bytes(cfg),
        "reference": {p: {k: _stats([s["protocols"][p]["reference"][k] for s in per_seed])
                          for k in ("recall", "psnr_vs_truth")} for p in protocols},
        "aggregate": aggs, "seeds": per_seed, "sweep": sweep,
        "key_lines": {p: key_line(aggs[p], len(per_seed), p) for p in protocols},
    }
    summary["key_line"] = " ".join(summary["key_lines"][p] for p in protocols)
    # GIFs: the first seed at the headline reduction (or the first one run), one per protocol.
    summary["gifs"] = {}
    warm = frames0["warmup"]
    for proto in protocols:
        agg = aggs[proto]
        r = HEADLINE if str(HEADLINE) in agg else float(next(iter(agg)))
        best = best_baseline(agg[str(r)]) or "ispa-nocorr"
        shown = ["reference", "ispa"] + [n for n in ALT_METHODS if (proto, r, n) in frames0] + [best]
        panels = [np.concatenate([warm, frames0[(proto, "reference") if n == "reference" else (proto, r, n)]])
                  for n in shown]
        if proto == "teacher":
            panels.insert(0, frames0["truth"])
            shown.insert(0, "ground truth")
        gif = "side_by_side.gif" if proto == "free" else f"side_by_side_{proto}.gif"
        write_gif(out / gif, panels)
        summary["gifs"][gif] = (f"{PROTOCOL_TITLES[proto]}, seed {settings.seeds[0]}, left to right: "
                                + " | ".join(n if n != "reference" else "full-cache reference" for n in shown)
                                + f" at {r:.0%} KV reduction; the transition is at frame "
                                f"{per_seed[0]['transition_frame']}")
    plot_quality(out / "quality_vs_memory.png", aggs, full)
    summary["seconds"] = time.perf_counter() - t0
    (out / "eval.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    write_markdown(out / "EVAL.md", summary)
    return summary


def render(out: Path) -> dict:
    """Rewrite EVAL.md and quality_vs_memory.png from an earlier run's eval.json (no generation)."""
    path = out / "eval.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the evaluation first") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if "aggregate" not in summary or "protocols" not in summary:
        raise UserError(f"{path}: fields 'aggregate'/'protocols' missing; not an eval.json of this version")
    plot_quality(out / "quality_vs_memory.png", summary["aggregate"], summary["full_kv_bytes"])
    write_markdown(out / "EVAL.md", summary)
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


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


def default_sink(cfg: WanConfig, window: int) -> int:
    """The sink of the fixed-span comparison: a plain window (the export's policy picks sink 0 or 1
    per video, so there is no single export default to follow)."""
    return 0


def settings_for(cfg: WanConfig, quick: bool, seeds: list[int] | None = None, variants: bool | None = None,
                 sweep: bool | None = None) -> Settings:
    """The export's defaults (sink from IspaOptions, window one chunk) where the cache allows; seeds
    below train.HELDOUT_LIMIT, whose videos the demo model was never trained on. The full run adds
    the ISPA variants and the span sweep; --quick runs the main methods on one short seed."""
    window = cfg.chunk_frames
    sink = default_sink(cfg, window)
    variants = (not quick) if variants is None else variants
    sweep = (not quick) if sweep is None else sweep
    # With the ISPA variants: one frame more without a sink (exact 25/50/75% bytes on the demo),
    # and every layer a plain window of half the cache (exactly 50%: ISPA on the uniform layout).
    # Then other spans with the main methods only.
    candidates = [(0, sink + window + 1, True), (0, cfg.max_frames // 2, True), (1, window, False),
                  (2, window, False), (1, 2 * window, False), (0, 2 * window, False)]
    spans: dict[tuple[int, int], bool] = {}
    for s, w, v in candidates if sweep else ():
        if (s, w) != (sink, window) and (s, w) not in spans and span_fits(cfg, s, w):
            spans[(s, w)] = v
    return Settings(seeds=seeds or ([1000] if quick else list(range(1000, 1006))),
                    min_chunks=20 if quick else 32, window=window, sink=sink, variants=variants,
                    rank=max(cfg.dim // 8, 1), rhos=(1e-3, 1e-1, 1.0, 10.0),
                    spans=tuple((s, w, v) for (s, w), v in spans.items()))


def load(name: str, random_weights: bool = False, seed: int = 0,
         checkpoint: str | None = None) -> tuple[WanModel, torch.Tensor, str, dict | None]:
    """The preset's model (shipped demo weights, a checkpoint, or seeded random weights), its text
    context (the demo's fixed prompt, or seeded random embeddings), a name, and which weights file
    (with its sha256) was loaded, if any."""
    import hashlib

    from .pipeline import DATA, get_preset, load_context, load_model

    if random_weights:
        torch.manual_seed(seed)
        model = WanModel(get_preset(name)).eval()
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(1, min(model.cfg.text_len, 16), model.cfg.text_dim, generator=g)
        return model, ctx, f"{name} (random weights)", None
    name, model = load_model(name, checkpoint, name if checkpoint else None)
    ctx, _ = load_context(None, name, model.cfg, seed)
    path = Path(checkpoint) if checkpoint else DATA / "demo.safetensors" if name == "demo" else None
    weights = None if path is None or not path.is_file() else {
        "file": path.name if not checkpoint else str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return model, ctx, name, weights


def main(args) -> int:
    if getattr(args, "regime", None):
        return _evaluate_regime(args)
    if getattr(args, "render", False):
        summary = render(Path(args.out))
        for proto in summary["protocols"]:
            print(summary["key_lines"][proto])
        return 0
    return _evaluate(args)


def on_device(model: WanModel, args) -> tuple[WanModel, int]:
    """The model on --device, and the parallel seed jobs: forked workers share one CPU model, a GPU
    runs the seeds one after another in this process."""
    from .pipeline import resolve_device

    device = resolve_device(getattr(args, "device", None))
    jobs = getattr(args, "jobs", None) or os.cpu_count() or 1
    return model.to(device), (1 if device.type == "cuda" else jobs)


def _evaluate(args) -> int:
    """`ispa eval`: args.model, args.quick, args.out (and optionally seeds, variants, threads,
    random_weights from `python -m ispa_export.evaluate`)."""
    quick = bool(getattr(args, "quick", False))
    model, ctx, name, weights = load(args.model, bool(getattr(args, "random_weights", False)),
                                     checkpoint=getattr(args, "checkpoint", None))
    model, jobs = on_device(model, args)
    settings = settings_for(model.cfg, quick, getattr(args, "seeds", None), getattr(args, "variants", None),
                            getattr(args, "sweep", None))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # One thread by default: the demo's matmuls are too small for intra-op parallelism to pay, and
    # on a busy 2-core machine two spinning threads cost 10x the CPU time (tiny --quick: 56 s vs 4 s).
    before = torch.get_num_threads()
    torch.set_num_threads(getattr(args, "threads", None) or 1)
    try:
        summary = run_eval(model, ctx, settings, Path(args.out), name, quick, log=log, weights=weights,
                           jobs=jobs)
    finally:
        torch.set_num_threads(before)
    for proto in summary["protocols"]:
        print(summary["key_lines"][proto])
    return 0


def _evaluate_regime(args) -> int:
    """`ispa eval --regime R`: regimes.run_seed for every seed, rows to OUT/results.jsonl, and the
    mean teacher-forced PSNR per reduction and method on stdout."""
    from .regimes import RegimeSettings, run_seed, write_results

    quick = bool(getattr(args, "quick", False))
    model, ctx, name, _ = load(args.model, bool(getattr(args, "random_weights", False)),
                               checkpoint=getattr(args, "checkpoint", None))
    model, _ = on_device(model, args)
    if model.cfg.in_dim != 3 or model.cfg.latent_height < 16:
        raise UserError(f"--regime: needs a model that draws 3-channel pixel frames (the demo), not {name}")
    seeds = getattr(args, "seeds", None) or ([1000, 1001] if quick else list(range(1000, 1006)))
    reductions = getattr(args, "reductions", None) or ((0.5,) if quick else (0.25, 0.5, 0.75))
    st = RegimeSettings(args.regime, seeds, reductions, protocols=("teacher",) if quick else ("teacher", "free"))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(getattr(args, "threads", None) or 1)
    try:
        rows = [row for seed in seeds for row in run_seed(model, ctx, seed, st, log=log)]
    finally:
        torch.set_num_threads(before)
    path = write_results(rows, Path(args.out))
    for proto in st.protocols:
        for r in reductions:
            sel = [x for x in rows if x["protocol"] == proto and x["reduction"] == r]
            means = {m: np.mean([x["psnr"] for x in sel if x["method"] == m]) for m in dict.fromkeys(x["method"] for x in sel)}
            print(f"{args.regime} {proto} {r:.0%}: " + ", ".join(f"{m} {v:.2f}" for m, v in means.items())
                  + f" dB PSNR (mean of {len(seeds)} seeds)")
    print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from .cli import eval_arguments

    return eval_arguments(argparse.ArgumentParser(prog="python -m ispa_export.evaluate",
                                                  description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
