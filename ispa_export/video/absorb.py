"""Per video: the warmup on a deployment's layout, the solve, the gates, the instance.

The deployment fixed everything that does not depend on the video (DESIGN.md section 11): each
layer's span, the cache groups, the correction's variant, site and ridge rule, and which L-layers
may carry a correction at all (the build's output gate). What is left per video:

1. `warm_up`: the first chunks with every layer full, the monitor measuring only the deployment's
   L-layers at their own spans (one extra masked attention and one set of statistics per L-layer);
   it ends by the policy's transition rule (policy.ready) on that layout;
2. `solve_corrections`: per L-layer, the ridge chosen on held-out chunks and the per-layer gate
   (policy.choose_correction), then the closed-form solve of the layers that keep theirs;
3. the modulation tensors under the graph's names (ispa_export.video.modulation; a dropped correction is
   a zero delta) and the caches cut to the layout (Stream.relayout).

`absorb` does the three and returns an `Absorbed` in memory: the Python API hands it to the engine
directly, `write_instance` stores it as INSTANCE/ for `ispa run --instance`. Nothing here traces
a graph or writes into the deployment.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from graphs.wan import Absorption, WanModel
from runtimes.driver import Stream
from runtimes.files import atomic_directory, file_records, write_json_atomic
from runtimes.groups import Span, group_name
from runtimes.instance import INSTANCE_FORMAT, INSTANCE_JSON, INSTANCE_STATE, INSTANCE_VERSION

from .. import memory
from ..errors import UserError
from ..kv import kv_bytes
from ..method.monitor import RHO_GRID, LocalSpan, Placement, SpanMonitors
from ..method.policy import Allocation, Decision, SpanLoss, ready, span_losses
from ..method.solver import SITES
from .modulation import modulation_tensors, with_corrections
from .torch_runner import torch_stream

VARIANTS = ("full", "per_pass", "bias", "none")


@dataclass(frozen=True)
class CorrectionRule:
    """What a deployment fixes of every video's correction (manifest.json `correction`)."""

    variant: str = "full"  # full (one dW per layer) | per_pass (one per pass kind) | bias | none
    site: str = "wo"  # wo (folded into W_o) | adapter (a parallel linear from the attention input)
    rank: int | None = None
    rho: float | None = None  # None: chosen per layer from `rhos` on held-out warmup chunks
    rhos: tuple[float, ...] = RHO_GRID
    holdout_gap: int = 1
    gate: bool = True  # keep a layer's correction only where it lowers the held-out discrepancy
    tol: float = 0.05  # the transition rule's convergence tolerance
    warmup_chunks: int = 8  # the most chunks before the transition
    # L-layers whose correction a video may keep (the build's output gate); the others stay zero.
    allowed: tuple[int, ...] = ()

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"--variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.site not in SITES:
            raise UserError(f"--site: expected one of {SITES}, got {self.site!r}")
        if self.warmup_chunks < 1:
            raise UserError(f"--warmup-chunks: expected at least 1 chunk, got {self.warmup_chunks}")

    @property
    def per_kind(self) -> bool:
        return self.variant == "per_pass"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rhos"], d["allowed"] = list(self.rhos), list(self.allowed)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CorrectionRule":
        return cls(**{**d, "rhos": tuple(d["rhos"]), "allowed": tuple(d["allowed"])})


def _spans(layout: list[Span | None]) -> dict[LocalSpan, frozenset[int]]:
    """The deployment's local spans, each with the layers at it."""
    out: dict[LocalSpan, set[int]] = {}
    for i, s in enumerate(layout):
        if s is not None:
            out.setdefault(LocalSpan(s.sink, s.window), set()).add(i)
    return {s: frozenset(v) for s, v in sorted(out.items())}


def allocation_of(layout: list[Span | None], cfg) -> Allocation:
    spans = [None if s is None else LocalSpan(s.sink, s.window) for s in layout]
    frames = sum(cfg.max_frames if s is None else s.frames for s in spans)
    return Allocation(spans, 0.0, frames, frames)


def monitors_for(layout: list[Span | None], rule: CorrectionRule, *, gate_chunks: int = 0,
                 placement: Placement = Placement()) -> SpanMonitors:
    """The monitors of a video's warmup: each span measures only the layers the deployment makes
    local at it, one accumulator per layer (per pass kind for variant per_pass), no running fit."""
    spans = _spans(layout)
    if not spans:
        raise UserError("the deployment has no local layer: nothing to absorb")
    return SpanMonitors.build(list(spans), rule.rho, "full" if rule.variant in ("per_pass", "none") else rule.variant,
                              rule.site, rule.rank, rule.rhos if rule.rho is None else (rule.rho,), rule.holdout_gap,
                              layers=spans, per_kind=rule.per_kind, gate_chunks=gate_chunks, track_fit=False,
                              placement=placement)


@dataclass
class Warmup:
    """A video at its transition: the all-F stream (every latent so far kept) and what it measured."""

    stream: Stream
    monitors: SpanMonitors
    reason: str
    seconds: float
    chunk_seconds: list[float] = field(default_factory=list)

    @property
    def chunk(self) -> int:
        """The first chunk after the warmup."""
        return self.stream.chunk


def check_given(video: np.ndarray | None, context: torch.Tensor, cfg, warmup_chunks: int) -> None:
    """Teacher-forcing latents must cover the warmup: [B, C, >= warmup_chunks * f, H, W]."""
    if video is None:
        return
    f = cfg.chunk_frames
    want = (context.shape[0], cfg.in_dim, warmup_chunks * f, cfg.latent_height, cfg.latent_width)
    if video.ndim != 5 or video.shape[:2] != want[:2] or video.shape[3:] != want[3:] or video.shape[2] < want[2]:
        raise UserError(f"warmup video: expected latents [B, C, T, H, W] = {list(want[:2])} + [>= {want[2]}] + "
                        f"{list(want[3:])} ({warmup_chunks} chunks of {f} frames), got {list(video.shape)}")


def warm_up(model: WanModel, layout: list[Span | None], context: torch.Tensor, seed: int, rule: CorrectionRule, *,
            gate_chunks: int = 0, placement: Placement = Placement(),
            progress: Callable[[int], None] | None = None, video: np.ndarray | None = None) -> Warmup:
    """The video's first chunks with every layer full (sharing `model`'s weights), monitored on the
    deployment's layout, until policy.ready says the transition has come. `video` latents teacher-force
    the cache passes (an evaluation's known video, as builder.calibrate's warmups take it)."""
    cfg = model.cfg
    f = cfg.chunk_frames
    check_given(video, context, cfg, rule.warmup_chunks)
    monitors = monitors_for(layout, rule, gate_chunks=gate_chunks, placement=placement)
    current = allocation_of(layout, cfg)
    stream = torch_stream(model.with_layout([None] * cfg.num_layers), context, seed, before_pass=monitors.before_pass)
    monitors.stream = stream
    correct = rule.variant != "none"
    t0 = time.perf_counter()
    times = []
    decision = None
    for c in range(rule.warmup_chunks):
        t = time.perf_counter()
        stream.step(given=None if video is None else video[:, :, c * f:(c + 1) * f])
        monitors.finish()
        times.append(time.perf_counter() - t)
        if progress is not None:
            progress(1)
        losses = span_losses(monitors, cfg.num_layers, correct=correct, gate=rule.gate)
        try:
            decision = ready(monitors, c, stream.frame_index, f, cfg.max_frames, cfg.full_sink, rule.warmup_chunks,
                             rule.tol, current, losses)
        except UserError as e:
            # The layout's spans are longer than this warmup can see (or their sink leaves the full
            # cache first): nothing to fit a correction on, so its layers go local as they are.
            decision = Decision(f"no correction to fit, the layers go local as they are: {e}", [])
        if decision is not None:
            break
    stream.runner.before_pass = None
    if decision is None:
        raise UserError(f"--warmup-chunks {rule.warmup_chunks}: the warmup ended before the transition rule "
                        "could be applied")
    return Warmup(stream, monitors, decision.reason, time.perf_counter() - t0, times)


def absorption_for(monitor, layer: int, variant: str, site: str, rho: float | None) -> tuple[Absorption | None, dict]:
    """The layer's correction from `monitor`'s statistics at ridge `rho` (None: the monitor's)."""
    if variant == "none":
        return None, {"variant": "none"}
    over = {} if rho is None else {"rho": rho}
    if variant == "per_pass":
        sols = [monitor.solution(layer, k, variant="full", **over) for k in monitor.kinds()]
    else:
        sols = [monitor.solution(layer, variant=variant, **over)]
    weight = None if variant == "bias" else torch.stack([s.weight_delta for s in sols])
    bias = torch.stack([s.bias_delta for s in sols])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not torch.isfinite(t).all():
            raise UserError(f"layer {layer}: the absorption {name} is not finite; refusing to bake it")
    # JSON has no inf: a singular G + lambda I (rho 0) has an infinite condition number, reported as
    # null next to method 'eigh' (report.json refuses non-finite numbers).
    report = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in asdict(s).items() if k not in ("weight_delta", "bias_delta")} for s in sols]
    return Absorption(site, weight, bias), {"variant": variant, "solutions": report}


def solve_corrections(warm: Warmup, layout: list[Span | None], rule: CorrectionRule
                      ) -> tuple[dict[int, Absorption | None], dict[LocalSpan, SpanLoss], dict[int, dict]]:
    """Per L-layer: the gated correction (None where the gate, the build's verdict or the variant
    leaves none), the losses the gates read, and what was solved."""
    num_layers = len(layout)
    losses = span_losses(warm.monitors, num_layers, correct=rule.variant != "none", gate=rule.gate)
    out, solved = {}, {}
    for layer, span in enumerate(layout):
        if span is None:
            continue
        key = LocalSpan(span.sink, span.window)
        corr = losses[key].corrections[layer] if key in losses else None
        keep = corr is not None and corr.kept and layer in rule.allowed and rule.variant != "none"
        if not keep:
            out[layer] = None
            solved[layer] = {"variant": "none", "gated_off": rule.variant != "none" and corr is not None and corr.kept,
                             "dropped": "not allowed by the deployment" if corr is not None and corr.kept else None}
            continue
        out[layer], solved[layer] = absorption_for(warm.monitors[key], layer, rule.variant, rule.site, corr.rho)
    return out, losses, solved


@dataclass
class Absorbed:
    """One video ready for the engine: its stream cut to the layout (caches on the warmup's device),
    its modulation under the graph's names, what it measured."""

    stream: Stream
    seed: int
    modulation: dict[str, np.ndarray]
    corrections: dict[int, Absorption | None]
    report: dict[str, Any]
    seconds: dict[str, float]
    warmup_latents: np.ndarray  # [B, C, T, H, W], every chunk of the warmup

    @property
    def transition_chunk(self) -> int:
        return self.report["transition_chunk"]


def absorb_budget(model: WanModel, layout: list[Span | None], rule: CorrectionRule, *, gate_chunks: int = 0,
                  free: tuple[int | None, int | None] | None = None) -> memory.Budget:
    """A video's warmup memory on the model's device, planned before it starts (ispa_export.memory):
    the weights, the all-F cache, the L-layers' statistics, the activations. One line if it cannot fit."""
    p = next(model.parameters())
    dtype = str(p.dtype).removeprefix("torch.")
    spans = _spans(layout)
    n_local = sum(len(v) for v in spans.values())

    def make(placement: Placement) -> memory.Budget:
        return memory.budget(model.cfg, dtype, monitored_layers=n_local, spans=1, per_kind=rule.per_kind,
                             gate_chunks=gate_chunks, track_fit=False, holdout_gap=rule.holdout_gap, site=rule.site,
                             placement=placement)
    return memory.plan(f"absorb: the warmup of {model.cfg.num_layers} layers ({n_local} monitored) at dim "
                       f"{model.cfg.dim}", p.device, make, free)


def complete(model: WanModel, layout: list[Span | None], warm: Warmup, rule: CorrectionRule, *, modulation: str,
             dtype: str) -> Absorbed:
    """After the warmup: the gated corrections solved, the modulation under the graph's names, the
    caches cut to the layout. `model` holds the deployment's base weights (zero corrections); it is
    shared, never changed."""
    from runtimes.buffers import host_dtype

    t0 = time.perf_counter()
    corrections, losses, solved = solve_corrections(warm, layout, rule)
    tensors = modulation_tensors(with_corrections(model, corrections), modulation, host_dtype(dtype))
    t_solve = time.perf_counter() - t0
    latents = np.concatenate(warm.stream.latents, axis=2)
    t1 = time.perf_counter()
    warm.stream.relayout(layout)
    t_cut = time.perf_counter() - t1
    seconds = {"warmup": warm.seconds, "warmup_chunk": warm.chunk_seconds, "solve": t_solve, "cut": t_cut}
    report = video_report(model, layout, warm, losses, corrections, solved, rule, dtype, seconds)
    return Absorbed(warm.stream, int(warm.stream.seed), tensors, corrections, report, seconds, latents)


def absorb(model: WanModel, layout: list[Span | None], context: torch.Tensor, seed: int, rule: CorrectionRule, *,
           modulation: str, dtype: str, progress: Callable[[int], None] | None = None) -> Absorbed:
    """Warm up, solve, gate, cut: the video's instance in memory (`complete` after `warm_up`)."""
    rule.check()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed: expected a non-negative integer, got {seed!r}")
    need = absorb_budget(model, layout, rule)
    warm = warm_up(model, layout, context, int(seed), rule, placement=need.placement, progress=progress)
    absorbed = complete(model, layout, warm, rule, modulation=modulation, dtype=dtype)
    absorbed.report["memory"] = need.to_dict()
    return absorbed


def _span_name(span) -> str:
    return f"s{span.sink}w{span.window}"


def video_report(model: WanModel, layout, warm: Warmup, losses, corrections, solved, rule: CorrectionRule,
                 dtype: str, seconds: dict) -> dict:
    """Every number behind this video's corrections (INSTANCE/report.json)."""
    cfg = model.cfg
    before, after = kv_bytes(cfg, dtype=dtype), kv_bytes(cfg, layout, dtype=dtype)
    layers = []
    for l, span in enumerate(layout):
        entry: dict[str, Any] = {"index": l, "mode": "F" if span is None else "L",
                                 "span": None if span is None else span._asdict(), "group": group_name(span),
                                 "raw_discrepancy": None, "corrected_discrepancy": None, "curve": {}}
        if span is not None:
            key = LocalSpan(span.sink, span.window)
            mon = warm.monitors[key]
            corr = losses[key].corrections[l] if key in losses else None
            if corr is not None:
                entry.update(raw_discrepancy=corr.raw, corrected_discrepancy=corr.corrected if corr.kept else corr.raw)
            entry["correction"] = None if corr is None else {
                "rho": corr.rho, "passed_gate": corr.kept, "allowed": l in rule.allowed,
                "kept": corrections.get(l) is not None, "heldout_chunk": corr.chunk, "raw": corr.raw,
                "corrected": corr.corrected, "by_rho": {f"{r:g}": v for r, v in corr.scores.items()}}
            # Held-out d per chunk: raw, and corrected under the chosen ridge (the fit of earlier chunks).
            for c, e in sorted(mon.heldout[l].items()):
                rho = None if corr is None else corr.rho
                entry["curve"][str(c)] = {"all": {"raw": e["raw"], "corrected": e["rho"].get(rho, e["raw"])}}
            entry["absorption"] = solved.get(l)
        layers.append(entry)
    return json_safe({
        "kv_reduction": 1 - after.total / before.total, "kv_bytes_before": before.total, "kv_bytes_after": after.total,
        "transition_chunk": warm.chunk, "transition_reason": warm.reason,
        "selected_layers": [i for i, s in enumerate(layout) if s is not None],
        "kept_corrections": sorted(l for l, a in corrections.items() if a is not None),
        "monitored_chunks": {_span_name(s): m.monitored_chunks for s, m in warm.monitors.monitors.items()},
        "correction_rule": rule.to_dict(), "seconds": seconds, "layers": layers,
    })


def json_safe(x):
    """JSON-safe: inf/nan become null (report.json refuses non-finite numbers), numpy scalars plain."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def instance_arrays(absorbed: Absorbed, dtype: str) -> dict[str, np.ndarray]:
    """instance.safetensors: the stream's handoff state in the graph's dtype, and the modulation."""
    from runtimes.buffers import host_dtype

    np_dtype = host_dtype(dtype)
    state = absorbed.stream.state_arrays()
    caches = {g.name for g in absorbed.stream.geo.groups} | {"cross_kv"}
    out = {k: (np.ascontiguousarray(v.astype(np_dtype)) if k in caches else v) for k, v in state.items()}
    out.update(absorbed.modulation)
    return out


def write_instance(absorbed: Absorbed, out: Path, *, deployment: Path, deployment_sha256: str, dtype: str,
                   context_source: str, extras: dict[str, Callable[[Path], object]] | None = None,
                   atomic: bool = True) -> dict:
    """INSTANCE/: instance.safetensors, report.json (and `extras`), instance.json last, holding the
    sha256 of the deployment's manifest and of every file. Atomic: a crash leaves the old
    directory or the new one."""
    from safetensors.numpy import save_file

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        arrays = instance_arrays(absorbed, dtype)
        save_file(arrays, str(tmp / INSTANCE_STATE), metadata={"format": INSTANCE_FORMAT})
        write_json_atomic(tmp / "report.json", dict(absorbed.report, seconds=dict(absorbed.seconds)))
        for name, writer in (extras or {}).items():
            writer(tmp / name)
        absorbed.seconds["write"] = time.perf_counter() - t0
        record = {
            "format": INSTANCE_FORMAT, "version": INSTANCE_VERSION,
            "deployment": str(Path(deployment).resolve()), "deployment_manifest_sha256": deployment_sha256,
            "seed": absorbed.seed, "context": context_source, "dtype": dtype,
            "transition_chunk": absorbed.transition_chunk, "frame_index": int(absorbed.stream.frame_index),
            "modulation": sorted(absorbed.modulation),
            "kept_corrections": absorbed.report["kept_corrections"],
            "seconds": {k: v for k, v in absorbed.seconds.items() if not isinstance(v, list)},
            "files": file_records(tmp),
        }
        write_json_atomic(tmp / INSTANCE_JSON, record)
        return record

    out = Path(out)
    if not atomic:
        out.mkdir(parents=True, exist_ok=True)
        return write(out)
    with atomic_directory(out) as tmp:
        return write(tmp)
