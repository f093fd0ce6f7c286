"""The runs of the quality evaluation (ispa_export.lab.evaluate): the shared all-F warmup up to the
transition, and each method's (or the reference's) continuation from a copy of it."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from graphs.wan import WanModel
from runtimes.driver import Stream

from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions, bake, decide
from ispa_export.method.monitor import LocalSpan, WarmupMonitor
from ispa_export.video.torch_runner import torch_stream
from ispa_export.lab.methods import Method, alt_span, sink_horizon_frames


class _Fanout:
    """Feeds one forward's (a_g, a_l) to several monitors of the same span (e.g. sites wo and
    adapter), so one warmup yields the statistics of both without a second run."""

    def __init__(self, monitors: list[WarmupMonitor]):
        self.monitors = monitors

    def before_pass(self, info):
        got = [m.before_pass(info) for m in self.monitors]
        return None if got[0] is None else self

    def masks(self, layer: int) -> list:
        return self.monitors[0].masks(layer)

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
    model.set_layout([None] * cfg.num_layers)
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
        bake(model, stream, {method.span: monitor}, method.spans(model.cfg.num_layers), opts)
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
