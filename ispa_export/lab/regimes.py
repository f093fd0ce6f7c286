"""ISPA's policy against token dropping at equal KV budget, in both regimes of DESIGN.md section 8,
as one row per (regime, protocol, reduction, method, seed): `ispa eval --regime R --out DIR` writes
them to DIR/results.jsonl.

Regimes: 'rolling' (the model's own full cache, the video runs several cache lengths past the
transition) and 'whole' (the reference cache holds the whole video, nothing is evicted).

Per seed: one teacher-forced warmup on the procedural video and the policy's decision at the
headline reduction (ispa.plan: the transition point every method shares); other reductions
re-allocate from the same warmup measurements. Methods, every one within the reduction's byte
budget (kv_bytes in each row):
- ispa: the policy's allocation, gated per-layer corrections with their held-out ridge;
- ispa-nocorr: the same allocation, no correction;
- drop: n layers at a one-chunk window, the n with the lowest raw d (the old ISPA layout);
- sink-window: the same with a one-frame sink (StreamingLLM / LongLive);
- uniform / uniform-nosink: every layer local, sink 1 + window or a plain window, as many frames
  as the budget allows.
Protocols: 'teacher' (each chunk denoised from the true history, its sample scored) and 'free'.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphs.wan import WanModel
from runtimes.driver import Stream

from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions, bake, output_gate, plan
from ispa_export.kv import frame_bytes
from ispa_export.method.monitor import LocalSpan
from ispa_export.method.policy import Correction, allocate, budget_frames, select
from ispa_export.lab.metrics import frames_of, psnr_frames, ssim_frames
from ispa_export.lab.rollouts import continue_stream
from ispa_export.lab.videos import make_video

REGIMES = ("rolling", "whole")
METHODS = ("ispa", "ispa-nocorr", "drop", "sink-window", "uniform", "uniform-nosink")


@dataclass
class RegimeSettings:
    regime: str
    seeds: list[int]
    reductions: tuple[float, ...] = (0.25, 0.5, 0.75)
    headline: float = 0.5
    total_chunks: int | None = None  # rolling: 32; whole: 12 (a 24-frame video, as Self-Forcing's)
    warmup_chunks: int | None = None  # rolling: 8 (ends by the sink horizon); whole: 4
    protocols: tuple[str, ...] = ("teacher", "free")
    opts: dict = dataclasses.field(default_factory=dict)  # extra IspaOptions fields (e.g. holdout_gap)

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise UserError(f"--regime: expected one of {REGIMES}, got {self.regime!r}")
        whole = self.regime == "whole"
        self.total_chunks = self.total_chunks or (12 if whole else 32)
        self.warmup_chunks = self.warmup_chunks or (4 if whole else 8)


@dataclass
class Layout:
    name: str
    spans: list[LocalSpan | None]
    corrections: dict[int, Correction | None]  # L-layer -> the gate's decision (None: uncorrected)

    @property
    def layers(self) -> list[int]:
        return [i for i, s in enumerate(self.spans) if s is not None]


def regime_model(model: WanModel, regime: str, total_frames: int) -> WanModel:
    """'whole': the same weights with a full cache that holds the whole video."""
    if regime == "rolling":
        return model
    out = copy.deepcopy(model)
    out.cfg = model.cfg.replace(max_frames=total_frames)
    return out


def layouts(tr, cfg, reduction: float, opts: IspaOptions, monitors=None) -> list[Layout]:
    """The compared layouts at one reduction, from the warmup measurements in `tr`."""
    n, f = cfg.num_layers, cfg.chunk_frames
    if tr.chain is not None:
        alloc = select(tr.losses, cfg, reduction, tr.chain.frame_errors, list(opts.sinks(cfg)),
                       opts.per_layer_spans)[0]
    else:
        alloc = allocate(tr.losses, cfg, reduction)[0]
    corr = {l: tr.losses[alloc.spans[l]].corrections[l] for l in alloc.local_layers}
    if tr.chain is not None and monitors is not None:  # the output gate, for this reduction's layout
        verdict = output_gate(tr.chain.model, monitors, tr.chain, alloc, tr.losses, IspaOptions())
        if not verdict["kept"]:
            corr = {l: None if l in verdict["layers"] else c for l, c in corr.items()}
    out = [Layout("ispa", alloc.spans, corr), Layout("ispa-nocorr", alloc.spans, {l: None for l in corr})]
    budget = budget_frames(cfg, reduction)
    drop = LocalSpan(0, f)
    for name, span in (("drop", drop), ("sink-window", LocalSpan(1, f - 1))):
        # Where the policy did not monitor sink spans (the reference evicts the sink frames), the
        # sink-window baseline takes the drop baseline's layers.
        ranked = span if span in tr.losses else drop
        if ranked not in tr.losses or span.window < 1:
            continue
        k = math.ceil((n * cfg.max_frames - budget) / (cfg.max_frames - span.frames))
        if k > n:
            continue
        lowest = sorted(np.argsort(tr.losses[ranked].raw, kind="stable")[:k].tolist())
        out.append(Layout(name, [span if i in lowest else None for i in range(n)], {l: None for l in lowest}))
    per_layer = budget // n
    for name, span in (("uniform", LocalSpan(1, per_layer - 1)), ("uniform-nosink", LocalSpan(0, per_layer))):
        if span.window >= 1:
            out.append(Layout(name, [span] * n, {l: None for l in range(n)}))
    return out


def continue_run(model: WanModel, stream: Stream, monitors, layout: Layout | None, chunks: int,
                 video: np.ndarray | None) -> tuple[np.ndarray, int]:
    """A copy of the warmup's model and stream with `layout` baked, run `chunks` more chunks; teacher
    forced by `video` [F, C, H, W] (returns each chunk's sample) or free. Also the KV bytes held."""
    m = copy.deepcopy(model)
    s = copy.deepcopy(stream, {id(model): m})  # its runner (and the caches it holds) now run `m`
    if layout is not None:
        bake(m, s, monitors, layout.spans, IspaOptions(), layout.corrections)
    return continue_stream(s, chunks, video), sum(g.nbytes for g in s.groups.values())


def run_seed(model: WanModel, context: torch.Tensor, seed: int, st: RegimeSettings, log=lambda m: None) -> list[dict]:
    f = model.cfg.chunk_frames
    total = st.total_chunks * f
    model = regime_model(model, st.regime, total)
    cfg = model.cfg
    video = make_video(seed, total, cfg.latent_height).frames
    warm = np.ascontiguousarray(video.transpose(1, 0, 2, 3)[None])
    opts = IspaOptions(kv_reduction=st.headline, warmup_chunks=st.warmup_chunks, uniform_for=tuple(st.reductions),
                       stream_frames=total if st.regime == "whole" else None, **st.opts)
    base = copy.deepcopy(model)
    stream, monitors, tr = plan(base, context, seed, opts, video=warm)
    stream.runner.before_pass = None
    rest = st.total_chunks - tr.chunk
    log(f"[{st.regime} seed {seed}] transition at chunk {tr.chunk} ({tr.reason}); spans "
        f"{sorted({str(s) for s in tr.spans if s is not None})}, "
        f"L-layers {tr.layers}; {rest} chunks scored")
    if tr.calibration and "selection" in tr.calibration:
        sel = tr.calibration["selection"]
        log(f"  selection: {sel['chosen']} {sel['prior']['spans'][0]}; "
            + "; ".join(f"{c['spans']} gain {c['gain']:.3g} se {c['se']:.3g}" for c in sel["challengers"]))
    rows = []
    for proto in st.protocols:
        given = video if proto == "teacher" else None
        ref, _ = continue_run(base, stream, monitors, None, rest, given)
        ref = frames_of(ref)
        for r in st.reductions:
            try:
                lays = layouts(tr, cfg, r, opts, monitors)
            except UserError as e:
                log(f"  {r:.0%}: {e}")
                continue
            for lay in lays:
                lat, held = continue_run(base, stream, monitors, lay, rest, given)
                gen = frames_of(lat)
                span = next(x for x in lay.spans if x is not None)
                kept = [l for l, c in lay.corrections.items() if c is not None and c.kept]
                row = {"regime": st.regime, "protocol": proto, "reduction": r, "method": lay.name, "seed": seed,
                       "psnr": float(np.mean(psnr_frames(ref, gen))), "ssim": float(np.mean(ssim_frames(ref, gen))),
                       "kv_bytes": held, "kv_budget_bytes": budget_frames(cfg, r) * frame_bytes(cfg),
                       "layers": lay.layers, "sink": span.sink, "window": span.window, "corrected_layers": kept,
                       "transition_chunk": tr.chunk, "frames_scored": rest * f}
                rows.append(row)
                log(f"  {proto:7s} {r:.0%} {lay.name:15s} {span} layers {lay.layers} corrected {kept}: "
                    f"PSNR {row['psnr']:.2f}")
    return rows


def write_results(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    tmp.replace(path)
    return path


BASELINES = ("drop", "sink-window", "uniform", "uniform-nosink")


def summary(rows: list[dict]) -> list[dict]:
    """Per (regime, protocol, reduction): each method's mean PSNR/SSIM and bytes, the best drop
    baseline by mean PSNR, and ispa's paired margins (per seed) against it and against ispa-nocorr."""
    out = []
    keys = dict.fromkeys((r["regime"], r["protocol"], r["reduction"]) for r in rows)
    for regime, proto, red in keys:
        sel = [r for r in rows if (r["regime"], r["protocol"], r["reduction"]) == (regime, proto, red)]
        by = {m: {r["seed"]: r for r in sel if r["method"] == m} for m in dict.fromkeys(r["method"] for r in sel)}
        means = {m: {"psnr": float(np.mean([r["psnr"] for r in v.values()])),
                     "ssim": float(np.mean([r["ssim"] for r in v.values()])),
                     "kv_bytes": int(np.mean([r["kv_bytes"] for r in v.values()])), "seeds": len(v)}
                 for m, v in by.items()}
        entry = {"regime": regime, "protocol": proto, "reduction": red, "methods": means}
        base = [m for m in BASELINES if m in means]
        if "ispa" in by and base:
            best = max(base, key=lambda m: means[m]["psnr"])
            seeds = sorted(set(by["ispa"]) & set(by[best]))
            margin = [by["ispa"][s]["psnr"] - by[best][s]["psnr"] for s in seeds]
            entry.update(best_baseline=best, ispa_minus_best=float(np.mean(margin)),
                         ispa_wins=sum(m >= -1e-9 for m in margin), paired_seeds=len(seeds))
            if "ispa-nocorr" in by:
                nc = [by["ispa"][s]["psnr"] - by["ispa-nocorr"][s]["psnr"] for s in seeds if s in by["ispa-nocorr"]]
                entry["ispa_minus_nocorr"] = float(np.mean(nc))
        out.append(entry)
    return out


def summary_markdown(entries: list[dict]) -> str:
    """One table per regime and protocol: mean PSNR per method and reduction, ispa against the best
    drop baseline (mean paired margin, seeds where ispa >= it) and against ispa-nocorr."""
    lines = []
    for regime, proto in dict.fromkeys((e["regime"], e["protocol"]) for e in entries):
        sel = [e for e in entries if (e["regime"], e["protocol"]) == (regime, proto)]
        methods = list(dict.fromkeys(m for e in sel for m in e["methods"]))
        n = max(v["seeds"] for e in sel for v in e["methods"].values())
        lines += [f"### {regime}, {'teacher-forced' if proto == 'teacher' else 'free-running'} "
                  f"(PSNR dB vs the full cache, mean of {n} seeds)", "",
                  "| reduction | " + " | ".join(methods) + " | ispa - best baseline (seeds ispa >= it) "
                  "| ispa - ispa-nocorr |",
                  "|---" * (len(methods) + 3) + "|"]
        for e in sel:
            cells = [f"{e['methods'][m]['psnr']:.2f}" if m in e["methods"] else "-" for m in methods]
            vs = (f"{e['ispa_minus_best']:+.2f} vs {e['best_baseline']} ({e['ispa_wins']}/{e['paired_seeds']})"
                  if "best_baseline" in e else "-")
            nc = f"{e['ispa_minus_nocorr']:+.2f}" if "ispa_minus_nocorr" in e else "-"
            lines.append(f"| {e['reduction']:.0%} | " + " | ".join(cells) + f" | {vs} | {nc} |")
        lines.append("")
    return "\n".join(lines)


def plot_summary(entries: list[dict], path: Path, full_bytes: dict[str, int] | None = None) -> Path:
    """Teacher-forced PSNR against KV bytes held, one panel per regime, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(e["regime"] for e in entries if e["protocol"] == "teacher"))
    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(5.5 * max(1, len(regimes)), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        sel = sorted((e for e in entries if e["regime"] == regime and e["protocol"] == "teacher"),
                     key=lambda e: e["reduction"])
        for m in dict.fromkeys(m for e in sel for m in e["methods"]):
            pts = [(e["methods"][m]["kv_bytes"], e["methods"][m]["psnr"]) for e in sel if m in e["methods"]]
            ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], "o-", label=m,
                    lw=2.5 if m == "ispa" else 1.2)
        ax.set_title(f"{regime} regime, teacher-forced")
        ax.set_xlabel("KV cache held (MiB)")
        ax.set_ylabel("PSNR vs full cache (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
