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
- sink-window (StreamingLLM / LongLive): the n layers with the lowest raw d of sink s + window w,
  no correction;
- uniform: every layer local, sink s and the window that gives the same bytes (when integral);
- ISPA variants (full run): per_pass, bias, adapter site, rank k, raw-d selection.

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
import sys
import time
from dataclasses import asdict, dataclass, field
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
from .torch_runner import TorchRunner, torch_stream

REDUCTIONS = (0.25, 0.5, 0.75)
HEADLINE = 0.5
MAIN_METHODS = ("ispa", "ispa-nocorr", "drop", "sink-window", "uniform")
BASELINES = ("drop", "sink-window", "uniform")  # the token-dropping methods ISPA must beat
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

    def key(self) -> tuple:
        """Identity of the run: two methods with the same key generate the same frames."""
        corr = None if self.variant == "none" or not self.layers else (self.variant, self.site, self.rank, self.rho)
        return (self.layers, self.sink, self.window, corr)

    def modes(self, num_layers: int) -> list[str]:
        return [LOCAL if i in self.layers else FULL for i in range(num_layers)]


def _lowest(d: np.ndarray, n: int) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in np.argsort(d, kind="stable")[:n]))


def methods_for(reduction: float, cfg: WanConfig, sink: int, window: int, d_corrected: np.ndarray,
                d_raw: np.ndarray, d_raw_plain: np.ndarray, variants: bool = False,
                rank: int | None = None) -> tuple[list[Method], list[str]]:
    """The methods compared at one KV reduction, all at the same steady-state KV bytes, and notes
    on the ones that cannot be formed (a uniform span that is not a whole number of frames)."""
    num_layers, max_frames, span = cfg.num_layers, cfg.max_frames, sink + window
    n = layers_for_target(cfg, reduction, window, sink)
    notes: list[str] = []
    ispa_layers = _lowest(d_corrected, n)
    out = [
        Method("ispa", ispa_layers, sink, window, "full"),
        Method("ispa-nocorr", ispa_layers, sink, window, "none"),
        Method("drop", _lowest(d_raw_plain, n), 0, span, "none"),
        Method("sink-window", _lowest(d_raw, n), sink, window, "none"),
    ]
    # Every layer local with the span that keeps the same total frames.
    total = (num_layers - n) * max_frames + n * span
    if total % num_layers == 0 and total // num_layers > sink:
        out.append(Method("uniform", tuple(range(num_layers)), sink, total // num_layers - sink, "none"))
    else:
        notes.append(f"uniform: {total} cached frames over {num_layers} layers is not a whole span "
                     f"longer than the sink ({total / num_layers:.2f} frames); not run")
    if variants:
        out += [
            Method("ispa-per_pass", ispa_layers, sink, window, "per_pass"),
            Method("ispa-bias", ispa_layers, sink, window, "bias"),
            Method("ispa-adapter", ispa_layers, sink, window, "full", site="adapter"),
            Method("ispa-rawsel", _lowest(d_raw, n), sink, window, "full"),
        ]
        if rank is not None:
            out.append(Method(f"ispa-rank{rank}", ispa_layers, sink, window, "full", rank=rank))
    return out, notes


# -- the warmup ---------------------------------------------------------------------------------
class _Fanout:
    """Feeds one forward's (a_g, a_l) to several monitors of the same span (e.g. sites wo and
    adapter), so one warmup yields the statistics of both without a second run."""

    def __init__(self, monitors: list[WarmupMonitor]):
        self.monitors = monitors
        self.local_mask = None

    def before_pass(self, info):
        got = [m.before_pass(info) for m in self.monitors]
        if got[0] is None:
            return None
        self.local_mask = self.monitors[0].local_mask
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
    monitors: dict[str, WarmupMonitor]  # by absorption site
    chunk: int  # first chunk after the transition
    reason: str
    d_corrected: np.ndarray  # per layer, at the last warmup chunk (mean over passes)
    d_raw: np.ndarray
    d_raw_plain: np.ndarray  # raw d of a plain window of the same length (sink 0)
    seconds: float


def _chunk_d(monitor: WarmupMonitor, chunk: int, num_layers: int, idx: int) -> np.ndarray:
    return np.array([monitor.chunk_discrepancy(l, chunk)[idx] for l in range(num_layers)])


def _chunk_of(video: np.ndarray | None, c: int, f: int) -> np.ndarray | None:
    """Frames [F, C, H, W] -> the given chunk [1, C, f, H, W] for Stream.step."""
    if video is None:
        return None
    return np.ascontiguousarray(video[c * f:(c + 1) * f].transpose(1, 0, 2, 3)[None])


def warmup(model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions, n_local: int,
           video: np.ndarray | None = None, adapter: bool = True) -> Warmup:
    """ispa.transition up to (not including) the bake, with teacher forcing by `video` frames."""
    t0 = time.perf_counter()
    cfg = model.cfg
    model.set_modes([FULL] * cfg.num_layers)
    span = LocalSpan(opts.sink, opts.window)
    monitors = {"wo": WarmupMonitor(span, opts.rho, "full", "wo")}
    if adapter:
        monitors["adapter"] = WarmupMonitor(span, opts.rho, "full", "adapter")
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
    # The plain window's raw d needs its own local mask, hence a second pass over the warmup,
    # teacher-forced with the frames the first one produced (so the caches are the same).
    plain = WarmupMonitor(LocalSpan(0, opts.sink + opts.window), opts.rho)
    replay = torch_stream(model, context, seed, before_pass=plain.before_pass)
    plain.stream = replay
    for x in stream.latents:
        replay.step(x)
        plain.finish()
    mon = monitors["wo"]
    return Warmup(model, stream, monitors, stream.chunk, decision[2],
                  _chunk_d(mon, last, cfg.num_layers, 1), _chunk_d(mon, last, cfg.num_layers, 0),
                  _chunk_d(plain, last, cfg.num_layers, 0), time.perf_counter() - t0)


class _ScalarFeeds:
    """The model as TorchRunner calls it, with `pass_kind` kept 0-d.

    TorchRunner.run converts feeds with np.ascontiguousarray, which turns 0-d arrays into shape
    [1]; a per-pass-kind correction then indexes its [K, D, D] weight with a [1] tensor and the
    matmul fails. Remove this once torch_runner keeps scalars scalar."""

    def __init__(self, model: WanModel):
        self.model = model

    def eval(self) -> "_ScalarFeeds":
        return self

    def per_pass_kind(self) -> bool:
        return self.model.per_pass_kind()

    def __call__(self, *args, pass_kind: torch.Tensor | None = None, **kwargs):
        return self.model(*args, pass_kind=None if pass_kind is None else pass_kind.reshape(()), **kwargs)


def rollout(w: Warmup, method: Method | None, chunks: int) -> tuple[np.ndarray, int]:
    """Continue a copy of the warmup's stream for `chunks` chunks with `method` baked in (None: the
    full-cache reference). Returns the generated latents [B, C, chunks*f, H, W] and the bytes of
    the self-attention caches the stream holds."""
    model = copy.deepcopy(w.model)
    stream = copy.deepcopy(w.stream, {id(w.model): model})
    stream.runner = TorchRunner(_ScalarFeeds(model))
    if method is not None and method.layers:
        monitor = w.monitors.get(method.site)
        if monitor is None:
            raise UserError(f"method {method.name}: the warmup kept no statistics for site {method.site!r}")
        if method.rank is not None or method.rho is not None:
            monitor = copy.copy(monitor)  # solution() reads rank/rho off the monitor
            monitor.rank = method.rank
            if method.rho is not None:
                monitor.rho = method.rho
        opts = IspaOptions(kv_reduction=None, layers=list(method.layers), window=method.window, sink=method.sink,
                           variant=method.variant, site=method.site, rank=method.rank, rho=method.rho)
        bake(model, stream, monitor, list(method.layers), opts)
    held = sum(g.data.nbytes for g in stream.groups.values())
    return stream.run(chunks), held


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
@dataclass
class Settings:
    seeds: list[int]
    reductions: tuple[float, ...] = REDUCTIONS
    sink: int = 1
    window: int = 2
    warmup_chunks: int = 8
    min_chunks: int = 32  # total video length in chunks (at least 4x the warmup and > capacity)
    variants: bool = False
    rank: int | None = None
    teacher_force: bool = True
    keep_frames: int = 1  # how many seeds keep their frames (for the GIF)


def _video_for(cfg, seed: int, frames: int, teacher_force: bool):
    """A procedural video when the model draws 3-channel square pixel frames (the demo), else None."""
    if not teacher_force or cfg.in_dim != 3 or cfg.latent_height != cfg.latent_width or cfg.latent_height < 16:
        return None
    from .videos import make_video

    return make_video(seed, frames, cfg.latent_height)


def evaluate_seed(model: WanModel, context: torch.Tensor, seed: int, s: Settings,
                  log=lambda msg: None) -> dict:
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
    opts = IspaOptions(kv_reduction=decide_at, window=s.window, sink=s.sink, warmup_chunks=s.warmup_chunks)
    opts.check(cfg.num_layers)
    n_decide = layers_for_target(cfg, decide_at, s.window, s.sink)
    f = cfg.chunk_frames
    # The video must cover the longest possible run: warmup + the rest.
    max_total = max(s.min_chunks, 4 * s.warmup_chunks, -(-2 * cfg.max_frames // f))
    sample = _video_for(cfg, seed, max_total * f, s.teacher_force)
    w = warmup(model, context, seed, opts, n_decide, None if sample is None else sample.frames,
               adapter=s.variants)
    # At least 4x the warmup, longer than the full cache, and the requested length.
    total = max(s.min_chunks, 4 * w.chunk, -(-2 * cfg.max_frames // f))
    rest = total - w.chunk
    t_frame = w.chunk * f
    log(f"seed {seed}: transition at chunk {w.chunk} ({w.reason}); generating {rest} more chunks per run")

    t0 = time.perf_counter()
    ref_lat, ref_bytes = rollout(w, None, rest)
    ref_time = time.perf_counter() - t0
    ref = frames_of(ref_lat)
    ref_flicker = flicker_energy(ref)
    warm = frames_of(np.concatenate(w.stream.latents, axis=2))
    truth = None if sample is None else dataclasses.replace(sample, **{
        k: getattr(sample, k)[:total * f] for k in ("frames", "background", "visible_fraction", "visible", "bbox", "masks")})
    full_recall = float("nan") if truth is None else recall_of(np.concatenate([warm, ref]), truth, t_frame)

    result = {
        "seed": seed, "transition_chunk": w.chunk, "transition_frame": t_frame, "reason": w.reason,
        "total_chunks": total, "frames_after_transition": rest * f, "warmup_seconds": w.seconds,
        "teacher_forced": sample is not None,
        "d_corrected": w.d_corrected.tolist(), "d_raw": w.d_raw.tolist(), "d_raw_plain": w.d_raw_plain.tolist(),
        "reference": {"kv_bytes": ref_bytes, "recall": full_recall, "flicker_energy": ref_flicker,
                      "seconds": ref_time},
        "skipped_reductions": skipped, "reductions": {},
    }
    frames = {"reference": ref, "warmup": warm}
    done: dict[tuple, tuple[dict, np.ndarray]] = {}
    for r in reachable:
        methods, notes = methods_for(r, cfg, s.sink, s.window, w.d_corrected, w.d_raw, w.d_raw_plain,
                                     variants=s.variants and r == HEADLINE, rank=s.rank)
        rows = {}
        for m in methods:
            expect = kv_bytes(cfg, m.modes(cfg.num_layers), m.window, m.sink).total
            if m.key() in done:
                metrics, gen = done[m.key()]
                metrics = dict(metrics, same_run_as=metrics.get("same_run_as") or metrics["method"])
            else:
                t0 = time.perf_counter()
                lat, held = rollout(w, m, rest)
                gen = frames_of(lat)
                if held != expect:
                    raise RuntimeError(f"{m.name} at {r:.0%}: the stream holds {held} KV bytes, kv_bytes says {expect}")
                metrics = video_metrics(ref, gen, ref_flicker)
                metrics["recall"] = (float("nan") if truth is None
                                     else recall_of(np.concatenate([warm, gen]), truth, t_frame))
                metrics["seconds"] = time.perf_counter() - t0
                metrics["method"] = m.name
                done[m.key()] = (metrics, gen)
            rows[m.name] = dict(metrics, method=m.name, layers=list(m.layers), sink=m.sink, window=m.window,
                                variant=m.variant, site=m.site, rank=m.rank, kv_bytes=expect,
                                kv_reduction=1 - expect / ref_bytes)
            frames[(r, m.name)] = gen
            log(f"  {r:.0%} {m.name:14s} layers {list(m.layers)} s{m.sink}+w{m.window}: "
                f"PSNR {metrics['psnr']:.2f} SSIM {metrics['ssim']:.3f} recall {metrics['recall']:.3f}")
        main_bytes = {row["kv_bytes"] for row in rows.values()}
        if len(main_bytes) != 1:
            raise RuntimeError(f"methods at {r:.0%} hold different KV bytes: {sorted(main_bytes)}")
        result["reductions"][str(r)] = {"methods": rows, "notes": notes, "kv_bytes": main_bytes.pop()}
    result["_frames"] = frames
    return result


# -- aggregation and outputs ----------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(per_seed: list[dict]) -> dict:
    """reduction -> method -> metric -> mean/std/n over seeds (plus KV bytes, layers per seed)."""
    out: dict = {}
    for res in per_seed:
        for r, red in res["reductions"].items():
            for name, row in red["methods"].items():
                slot = out.setdefault(r, {}).setdefault(name, {"kv_bytes": row["kv_bytes"],
                                                               "kv_reduction": row["kv_reduction"],
                                                               "values": {k: [] for k in METRICS},
                                                               "layers": []})
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


def key_line(agg: dict, n_seeds: int) -> str:
    r = str(HEADLINE)
    if r not in agg or "ispa" not in agg[r]:
        return f"no result at {HEADLINE:.0%} KV reduction"
    a = agg[r]
    best = best_baseline(a)
    ispa = a["ispa"]["psnr"]
    b = a[best]["psnr"]
    diff = ispa["mean"] - b["mean"]
    wins = sum(x > y for x, y in zip(a["ispa"]["psnr_per_seed"], a[best]["psnr_per_seed"]))
    verdict = (f"ISPA is {diff:.2f} dB closer to the reference" if diff > 0
               else f"ISPA is {-diff:.2f} dB further from the reference" if diff < 0 else "they tie")
    nocorr = a.get("ispa-nocorr", {}).get("psnr")
    tail = "" if nocorr is None else (f"; without its correction ISPA's layers give {nocorr['mean']:.2f} dB "
                                      f"({ispa['mean'] - nocorr['mean']:+.2f} dB from the correction)")
    pm = lambda s: f" ± {s['std']:.2f}" if s["n"] > 1 else ""  # noqa: E731
    return (f"At {HEADLINE:.0%} KV reduction ({a['ispa']['kv_bytes']:,} KV bytes), PSNR against the full-cache "
            f"reference: ISPA {ispa['mean']:.2f}{pm(ispa)} dB, best drop baseline ({best}) "
            f"{b['mean']:.2f}{pm(b)} dB: {verdict} (better on {wins}/{n_seeds} seeds){tail}.")


def _fmt(s: dict, digits: int) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def write_markdown(path: Path, summary: dict) -> None:
    agg, per_seed = summary["aggregate"], summary["seeds"]
    lines = [f"# Quality at equal KV bytes ({summary['model']}, {len(per_seed)} seed(s){', quick' if summary['quick'] else ''})",
             "",
             summary["key_line"],
             "",
             f"Reference: full-cache rollout ({summary['full_kv_bytes']:,} KV bytes), same warmup and noise. "
             f"Span: sink {summary['settings']['sink']} + window {summary['settings']['window']} frames of a "
             f"{summary['config']['max_frames']}-frame cache. Transition chunks per seed: "
             f"{[s['transition_chunk'] for s in per_seed]} (frames {[s['transition_frame'] for s in per_seed]}); "
             f"{per_seed[0]['frames_after_transition']} frames scored after the transition per run"
             + (" (warmup teacher-forced with a procedural video)." if per_seed[0]["teacher_forced"] else "."),
             "",
             "PSNR/SSIM against the reference (higher is better); flicker = frame-difference energy / the "
             "reference's (1 is best); drift = PSNR(last quarter) - PSNR(first quarter); recall = identity "
             "recall of returning objects against the ground-truth video (reference: "
             f"{_fmt(summary['reference_recall'], 3)}). Mean ± std over seeds.",
             "",
             "| KV reduction | method | KV bytes | PSNR dB | SSIM | flicker | drift dB | recall | layers (seed 0) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(agg, key=float):
        order = [n for n in MAIN_METHODS if n in agg[r]] + [n for n in agg[r] if n not in MAIN_METHODS]
        for name in order:
            a = agg[r][name]
            lines.append(f"| {float(r):.0%} ({a['kv_reduction']:.1%}) | {name} | {a['kv_bytes']:,} | {_fmt(a['psnr'], 2)} | "
                         f"{_fmt(a['ssim'], 3)} | {_fmt(a['flicker'], 3)} | {_fmt(a['drift'], 2)} | "
                         f"{_fmt(a['recall'], 3)} | {a['layers'][0]} |")
    notes = sorted({n for s in per_seed for red in s["reductions"].values() for n in red["notes"]}
                   | {f"{r}: {why}" for s in per_seed for r, why in s["skipped_reductions"].items()})
    if notes:
        lines += ["", "Not run:"] + [f"- {n}" for n in notes]
    if summary.get("sweep"):
        lines += ["", "## Sweep at 50% KV reduction", "",
                  "| setting | method | KV bytes | PSNR dB | SSIM | recall |", "|---|---|---:|---:|---:|---:|"]
        for row in summary["sweep"]:
            lines.append(f"| {row['setting']} | {row['method']} | {row['kv_bytes']:,} | {_fmt(row['psnr'], 2)} | "
                         f"{_fmt(row['ssim'], 3)} | {_fmt(row['recall'], 3)} |")
    lines += ["", f"Files: eval.json (every number, per seed and per frame), quality_vs_memory.png, "
              f"side_by_side.gif ({summary.get('gif_caption', '')})."]
    path.write_text("\n".join(lines) + "\n")


def plot_quality(path: Path, agg: dict, full_bytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    names = [n for n in MAIN_METHODS if any(n in agg[r] for r in agg)]
    extra = sorted({n for r in agg for n in agg[r]} - set(MAIN_METHODS))
    styles = {"ispa": ("C3", "o", "-"), "ispa-nocorr": ("C1", "s", "--"), "drop": ("C0", "v", "-"),
              "sink-window": ("C2", "^", "-"), "uniform": ("C4", "D", ":")}
    for name in names:
        pts = sorted((agg[r][name]["kv_bytes"], agg[r][name]["psnr"]["mean"], agg[r][name]["psnr"]["std"])
                     for r in agg if name in agg[r])
        x, y, e = (np.array(v) for v in zip(*pts))
        c, mk, ls = styles[name]
        ax.errorbar(x / 2**20, y, yerr=e, color=c, marker=mk, ls=ls, capsize=3, label=name)
    for i, name in enumerate(extra):
        for r in agg:
            if name in agg[r]:
                a = agg[r][name]
                ax.errorbar([a["kv_bytes"] / 2**20], [a["psnr"]["mean"]], yerr=[a["psnr"]["std"]], marker="x",
                            ls="none", color=plt.get_cmap("tab10")(5 + i % 5), capsize=2, label=name)
    ax.axvline(full_bytes / 2**20, color="k", lw=0.8, ls=":", label="full cache")
    ax.set_xlabel("steady-state KV bytes (MiB)")
    ax.set_ylabel("PSNR vs full-cache reference (dB)")
    ax.set_title("quality vs memory (frames after the transition; mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
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
def run_eval(model: WanModel, context: torch.Tensor, settings: Settings, out: Path, name: str,
             quick: bool, log=print, sweep: list[dict] | None = None) -> dict:
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed, frames0 = [], None
    for i, seed in enumerate(settings.seeds):
        res = evaluate_seed(model, context, seed, settings, log=log)
        fr = res.pop("_frames")
        if i == 0:
            frames0 = fr
        per_seed.append(res)
    agg = aggregate(per_seed)
    full = kv_bytes(cfg).total
    summary = {
        "model": name, "quick": quick, "config": cfg.to_dict(), "settings": asdict(settings),
        "full_kv_bytes": full, "frame_kv_bytes": frame_bytes(cfg),
        "reference_recall": _stats([s["reference"]["recall"] for s in per_seed]),
        "aggregate": agg, "seeds": per_seed, "sweep": sweep or [],
    }
    summary["key_line"] = key_line(agg, len(per_seed))
    # GIF: the first seed at the headline reduction (or the first one run).
    r = HEADLINE if str(HEADLINE) in agg else float(next(iter(agg)))
    best = best_baseline(agg[str(r)]) or "ispa-nocorr"
    warm = frames0["warmup"]
    panels = [np.concatenate([warm, frames0["reference"]]), np.concatenate([warm, frames0[(r, "ispa")]]),
              np.concatenate([warm, frames0[(r, best)]])]
    write_gif(out / "side_by_side.gif", panels)
    summary["gif_caption"] = (f"seed {settings.seeds[0]}, left to right: full-cache reference | ISPA | {best} "
                              f"at {r:.0%} KV reduction; the transition is at frame {per_seed[0]['transition_frame']}")
    plot_quality(out / "quality_vs_memory.png", agg, full)
    summary["seconds"] = time.perf_counter() - t0
    (out / "eval.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    write_markdown(out / "EVAL.md", summary)
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def settings_for(quick: bool, seeds: list[int] | None = None, variants: bool | None = None) -> Settings:
    if quick:
        return Settings(seeds=seeds or [1000], min_chunks=20, variants=bool(variants))
    return Settings(seeds=seeds or [1000, 1001, 1002, 1003], min_chunks=32,
                    variants=True if variants is None else variants, rank=16)


def load(name: str, random_weights: bool = False, seed: int = 0) -> tuple[WanModel, torch.Tensor, str]:
    from .pipeline import get_preset, load_context, load_model

    if random_weights:
        torch.manual_seed(seed)
        model = WanModel(get_preset(name)).eval()
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(1, min(model.cfg.text_len, 16), model.cfg.text_dim, generator=g)
        return model, ctx, f"{name} (random weights)"
    name, model = load_model(name)
    ctx, _ = load_context(None, name, model.cfg, seed)
    return model, ctx, name


def main(args) -> int:
    """`ispa eval`: args.model, args.quick, args.out (and optionally seeds, random_weights)."""
    quick = bool(getattr(args, "quick", False))
    seeds = getattr(args, "seeds", None)
    model, ctx, name = load(args.model, bool(getattr(args, "random_weights", False)))
    settings = settings_for(quick, seeds, getattr(args, "variants", None))
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    summary = run_eval(model, ctx, settings, Path(args.out), name, quick, log=log)
    print(summary["key_line"])
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ispa_export.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="artifacts/eval")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], help="comma-separated seeds")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (development only)")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the ISPA variants at 50%% (default: on for the full run)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
