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

By job: methods.py (the compared methods at equal bytes), rollouts.py (the warmup and the runs from
it), metrics.py, report.py (aggregation, EVAL.md, plot, GIFs); this module runs them per seed and
over seeds, and is the command (`ispa eval`, `python -m ispa_export.lab.evaluate`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from graphs.config import WanConfig
from graphs.wan import WanModel

from ispa_export.args import eval_arguments
from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions
from ispa_export.kv import frame_bytes, kv_bytes, layers_for_target
from ispa_export.lab.methods import ALT_METHODS, HEADLINE, REDUCTIONS, alt_span, methods_for, sink_horizon_frames, span_fits
from ispa_export.lab.metrics import flicker_energy, frames_of, psnr_frames, recall_of, video_metrics
from ispa_export.lab.report import (PROTOCOL_TITLES, aggregate, best_baseline, key_line, mean_std, plot_quality, render, write_gif,
                     write_markdown)
from ispa_export.lab.rollouts import rollout, warmup


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
    from ispa_export.lab.videos import make_video

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
                expect = kv_bytes(cfg, m.spans(cfg.num_layers)).total
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
        "reference": {p: {k: mean_std([s["protocols"][p]["reference"][k] for s in per_seed])
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


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


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

    from ispa_export.models import DATA, get_preset, load_context, load_model

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
    from ispa_export.models import resolve_device

    device = resolve_device(getattr(args, "device", None))
    jobs = getattr(args, "jobs", None) or os.cpu_count() or 1
    return model.to(device), (1 if device.type == "cuda" else jobs)


def _evaluate(args) -> int:
    """`ispa eval`: args.model, args.quick, args.out (and optionally seeds, variants, threads,
    random_weights from `python -m ispa_export.lab.evaluate`)."""
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
    from ispa_export.lab.regimes import RegimeSettings, plot_summary, run_seed, summary, summary_markdown, write_results

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
    entries = summary(rows)
    table = summary_markdown(entries)
    (Path(args.out) / "results.md").write_text(table + "\n")
    plot_summary(entries, Path(args.out) / "quality_vs_memory.png")
    print(table)
    print(f"wrote {path}, results.md and quality_vs_memory.png beside it")
    return 0


def _parser() -> argparse.ArgumentParser:
    return eval_arguments(argparse.ArgumentParser(prog="python -m ispa_export.lab.evaluate",
                                                  description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
