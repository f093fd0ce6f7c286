"""The build, once per model and settings (DESIGN.md section 11): calibration warmups -> one layout
for every video -> the correction's verdict -> the graph traced once -> DEPLOY.

1. `calibrate` (builder.calibrate): each calibration video's warmup measures every candidate span on
   every layer; the policy decides over their pooled statistics (its rules and its uniform prior,
   unchanged), judging allocations on every video's chain at once.
2. The verdict on corrections: each calibration video is absorbed as a deployment will absorb it
   (video.absorb: the warmup on the layout, the per-layer gates), and the output gate scores its
   kept corrections on its own frames (builder.calibrate.output_gate). Corrections stay allowed when
   the gate keeps them on a strict majority of the videos it could score; otherwise every video's
   correction is zero. This is the only per-video step moved to the build: its chains cost several
   times the warmup, which a video must not wait for.
3. The deployment's base model on the layout, every L-layer with a zero correction of fixed shape;
   the graph traced once, its golden step, the PyTorch weights, the calibration record.

`build` writes into a directory the caller made (atomic_directory); `ispa export` then absorbs its
one calibration video into the same directory (DIR/instance), reusing that video's warmup.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graphs.wan import WanModel
from runtimes.files import write_json_atomic
from runtimes.groups import Span, as_layout

from ..errors import UserError
from ..kv import kv_bytes
from ..method.calibration import Chain
from ..method.monitor import GATE_CHUNKS
from ..models import save_baked
from ..video.modulation import zero_corrections
from ..plots import plot_calibration
from ..video.absorb import CorrectionRule, Warmup, absorb_budget, allocation_of, json_safe, solve_corrections, warm_up
from ..video.torch_runner import geometry
from .calibrate import Calibration, IspaOptions, Video, calibrate, output_gate
from .export import write_deployment

CALIBRATION = "calibration.json"


@dataclass
class Built:
    manifest: dict
    model: WanModel  # the deployment's base model on its layout (zero corrections), on the warmup device
    layout: list[Span | None]
    rule: CorrectionRule
    calibration: Calibration
    warmups: list[Warmup] = field(default_factory=list)  # the verdict's warmups, when kept


def correction_rule(opts: IspaOptions, allowed: tuple[int, ...] = ()) -> CorrectionRule:
    return CorrectionRule(variant=opts.variant, site=opts.site, rank=opts.rank, rho=opts.rho,
                          holdout_gap=opts.holdout_gap, gate=opts.gate, tol=opts.tol,
                          warmup_chunks=opts.warmup_chunks, allowed=allowed)


def verdict(model: WanModel, layout: list[Span | None], videos: list[Video], opts: IspaOptions,
            calibration: Calibration, progress: Callable[[int], None] | None = None,
            keep: bool = False) -> tuple[tuple[int, ...], dict, list[Warmup]]:
    """The L-layers whose per-video corrections a deployment allows (opts.corrections: 'auto' asks
    the output gate on each calibration video absorbed on `layout`). Returns (allowed layers, the
    record, the calibration videos' warmups on `layout` when `keep`)."""
    local = tuple(i for i, s in enumerate(layout) if s is not None)
    rule = correction_rule(opts, local)
    judged = (opts.corrections == "auto" and opts.variant in ("full", "bias") and opts.gate and opts.calibrate)
    warmups = []
    if judged or keep:
        for v in videos:
            need = absorb_budget(model, layout, rule, gate_chunks=GATE_CHUNKS if judged else 0)
            warmups.append(warm_up(model, layout, v.context, v.seed, rule, gate_chunks=GATE_CHUNKS if judged else 0,
                                   placement=need.placement, progress=progress, video=v.given))
    if not judged:
        off = opts.variant == "none" or opts.corrections == "off"
        why = ("variant none" if opts.variant == "none" else f"--corrections {opts.corrections}" if
               opts.corrections != "auto" else "gate off" if not opts.gate else
               "calibration off" if not opts.calibrate else f"variant {opts.variant}")
        return (() if off else local), {"judged": False, "reason": why}, warmups
    records = []
    for v, warm in zip(videos, warmups):
        _, losses, _ = solve_corrections(warm, layout, rule)
        chain = Chain(model, warm.stream.buffers["cross_kv"], np.concatenate(warm.stream.latents, axis=2), v.seed,
                      warm.stream.geo.timesteps, score_chunks=opts.calibration_chunks)
        gate = output_gate(model.with_layout([None] * len(layout)), warm.monitors, chain,
                           allocation_of(layout, model.cfg), losses, opts)
        records.append({"seed": v.seed, "context": v.source, "transition_chunk": warm.chunk, **gate})
    scored = [r for r in records if r["layers"]]
    kept = sum(r["kept"] for r in scored)
    allowed = local if scored and 2 * kept > len(scored) else ()
    reason = (f"the output gate kept the corrections on {kept} of {len(scored)} calibration videos it could score"
              if scored else "no calibration video kept a correction through its per-layer gate")
    return allowed, {"judged": True, "allowed": bool(allowed), "reason": reason, "videos": records}, \
        (warmups if keep else [])


def build(model: WanModel, videos: list[Video], opts: IspaOptions, out: Path, *, preset: str, modulation: str,
          dtype: str, progress: Callable[[int], None] | None = None, log: Callable[[str], object] = print,
          keep_warmups: bool = False, vae=None) -> Built:
    """Calibrate, decide, trace, write DEPLOY into `out` (an existing empty directory). `model`
    holds the weights (on the warmup device and dtype); it is not changed. `vae` (a diffusers
    AutoencoderKLWan) adds its streaming decoder beside the graph (DEPLOY/decoder, manifest `decoder`)."""
    if not videos:
        raise UserError("--calibration-seeds: expected at least one calibration video")
    cfg = model.cfg
    opts.check(cfg.num_layers)
    if vae is not None:  # before the calibration's minutes, not after them
        from ..vae import check_vae
        check_vae(vae, cfg.in_dim)
    t0 = time.perf_counter()
    calibration = calibrate(model.with_layout([None] * cfg.num_layers), videos, opts, progress)
    t_calibrate = time.perf_counter() - t0
    layout = as_layout(calibration.layout)
    if not any(s is not None for s in layout):
        raise UserError(f"--kv-reduction {opts.kv_reduction}: the calibration chose no local layer")
    base = _with_zero_corrections(model, layout, opts)
    t1 = time.perf_counter()
    allowed, record, warmups = verdict(base, layout, videos, opts, calibration, progress, keep_warmups)
    t_verdict = time.perf_counter() - t1
    rule = correction_rule(opts, allowed)
    log(f"build: layout {''.join('F' if s is None else 'L' for s in layout)} "
        f"({', '.join(sorted({f's{s.sink}w{s.window}' for s in layout if s is not None}))}); corrections "
        f"{'allowed' if allowed else 'off'}: {record['reason']}")
    dtype_name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    geo = geometry(cfg, layout, batch=videos[0].context.shape[0], dtype=dtype_name)
    report = calibration_report(calibration, record, opts, cfg, layout, dtype_name,
                                {"calibration": t_calibrate, "verdict": t_verdict})
    summary = {"videos": [{"seed": v.seed, "context": v.source} for v in videos],
               "selection": (calibration.selection or {}).get("chosen"), "corrections": record["reason"],
               "kv_reduction": report["kv_reduction"], "seconds": report["seconds"]}
    extras = {CALIBRATION: lambda p: write_json_atomic(p, report),
              "calibration.png": lambda p: plot_calibration(report, p),
              "torch_model.safetensors": lambda p: save_baked(base, p)}
    manifest = write_deployment(out, base, geo, preset=preset, modulation=modulation, dtype=dtype,
                                correction=rule.to_dict(), calibration=json_safe(summary), progress=log, extras=extras,
                                vae=vae)
    return Built(manifest, base, layout, rule, calibration, warmups)


def _with_zero_corrections(model: WanModel, layout: list[Span | None], opts: IspaOptions) -> WanModel:
    """The deployment's base model: `model`'s weights on the layout, each L-layer with a zero
    correction of the deployment's shape (its own copy of those layers' attention)."""
    base = copy.copy(model)
    base._modules = dict(model._modules)
    blocks = []
    for block, span in zip(model.blocks, layout):
        if span is not None:
            block = copy.copy(block)
            block._modules = dict(block._modules)
            block._modules["self_attn"] = copy.deepcopy(block._modules["self_attn"])
        blocks.append(block)
    base._modules["blocks"] = torch.nn.ModuleList(blocks)
    base.set_layout(layout)
    zero_corrections(base, kinds=5, site=opts.site, variant=opts.variant)
    return base


def calibration_report(calibration: Calibration, verdict_record: dict, opts: IspaOptions, cfg, layout,
                       dtype: str, seconds: dict) -> dict:
    """Every number behind the layout and the verdict (DEPLOY/calibration.json)."""
    before, after = kv_bytes(cfg, dtype=dtype), kv_bytes(cfg, layout, dtype=dtype)
    from dataclasses import asdict

    return json_safe({
        "kv_reduction": 1 - after.total / before.total, "kv_bytes_before": before.total,
        "kv_bytes_after": after.total,
        "layout": [None if s is None else s._asdict() for s in layout],
        "allocation": calibration.allocation.to_dict(),
        "selection": calibration.selection,
        "general_allocation": None if calibration.general is None else calibration.general.to_dict(),
        "pooled": {f"s{s.sink}w{s.window}": {"source": x.source, "raw": x.raw.tolist(), "effective": x.effective.tolist(),
                                             "loss": x.loss.tolist()} for s, x in calibration.losses.items()},
        "videos": [m.to_dict() for m in calibration.measured],
        "corrections": verdict_record, "options": asdict(opts), "seconds": seconds,
    })
