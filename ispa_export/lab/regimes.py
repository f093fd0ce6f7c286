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

from ..errors import UserError
from ..ispa import IspaOptions, bake, output_gate, plan
from ..kv import frame_bytes
from ..monitor import LocalSpan
from ..policy import Correction, allocate, allocate_measured, budget_frames
from .metrics import frames_of, psnr_frames, ssim_frames
from .rollouts import continue_stream
from .videos import make_video

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


def layouts(tr, cfg, reduction: float, monitors=None) -> list[Layout]:
    """The compared layouts at one reduction, from the warmup measurements in `tr`."""
    n, f = cfg.num_layers, cfg.chunk_frames
    if tr.chain is not None:
        alloc = allocate_measured(tr.losses, cfg, reduction, tr.chain.error)[0]
    else:
        alloc = allocate(tr.losses, cfg, reduction)[0]
    corr = {l: tr.losses[alloc.spans[l]].corrections[l] for l in alloc.local_layers}
    if tr.chain is not None and monitors is not None:  # the output gate, for this reduction's layout
        verdict = output_gate(tr.chain.model, monitors, tr.chain, alloc, tr.losses, IspaOptions())
        if not verdict["kept"]:
            corr = {l: None if l in verdict["layers"] else c for l, c in corr.items()}
    out = [Layout("ispa", alloc.spans, corr), Layout("ispa-nocorr", alloc.spans, {l: None for l in corr})]
    budget = budget_frames(cfg, reduction)
    for name, span in (("drop", LocalSpan(0, f)), ("sink-window", LocalSpan(1, f - 1))):
        if span not in tr.losses or span.window < 1:
            continue
        k = math.ceil((n * cfg.max_frames - budget) / (cfg.max_frames - span.frames))
        if k > n:
            continue
        lowest = sorted(np.argsort(tr.losses[span].raw, kind="stable")[:k].tolist())
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
                       **st.opts)
    base = copy.deepcopy(model)
    stream, monitors, tr = plan(base, context, seed, opts, video=warm)
    stream.runner.before_pass = None
    rest = st.total_chunks - tr.chunk
    log(f"[{st.regime} seed {seed}] transition at chunk {tr.chunk} ({tr.reason}); spans "
        f"{sorted({str(s) for s in tr.spans if s is not None})}, "
        f"L-layers {tr.layers}; {rest} chunks scored")
    rows = []
    for proto in st.protocols:
        given = video if proto == "teacher" else None
        ref, _ = continue_run(base, stream, monitors, None, rest, given)
        ref = frames_of(ref)
        for r in st.reductions:
            try:
                lays = layouts(tr, cfg, r, monitors)
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
