"""The price of building once (issue 19, item 7): a video's own layout against one deployment's.

Per regime (lab.regimes: `regime_model`, total and warmup chunks, the teacher-forced warmup on the
procedural video `make_video(seed)`), per KV reduction and per evaluation seed, four runs scored
against one full-cache reference:

- own: what `ispa eval --regime` reports as "ispa": `plan` on this video at the headline reduction,
  `regimes.layouts(...)[0]` at this reduction (its gated corrections), baked;
- own-nocorr: the same layout uncorrected (regimes' "ispa-nocorr");
- shared: the layout of ONE deployment built per (regime, reduction) from calibration videos that
  are not evaluation seeds (development seeds 2000-2003, teacher-forced on their procedural videos
  as the evaluation's warmups are): `builder.calibrate`'s pooled decision and `builder.pipeline.verdict`
  on the corrections, then this video absorbed into it (`video.absorb.warm_up` on the deployment's
  layout, teacher-forced here, and `complete`: solve, per-layer gates, the deployment's rule, cut);
- shared-nocorr: the same absorbed video with every correction zero.

The deployment is built with the evaluation's options (the candidate spans of `regimes.run_seed`:
the uniform spans of 25/50/75% join the policy's), only `kv_reduction` set to the target.

Frames scored: the chunks from T = the later of the own and shared transitions to the end of the
video. Teacher-forced protocol: every chunk from the true history, its sample scored (the
reference needs no choice). Free-running: every run (the reference included) is teacher-forced up
to T, a run whose transition came earlier on its own layout, and free from T on, so all four
share one reference and one history up to the first scored chunk. Where the transitions agree
(T = both), this is exactly the protocol of `regimes.run_seed`.

Teacher forcing: `builder.calibrate.Video.given` (the calibration warmups and the verdict's
absorb warmups) and `video.absorb.warm_up(video=...)` (the evaluation video's absorb warmup).

    python -m ispa_export.lab.shared_layout --out docs/eval/shared_layout --jobs 2
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from graphs.wan import WanModel
from runtimes.driver import Stream
from runtimes.groups import Span, as_layout

from ispa_export.builder.calibrate import Calibration, IspaOptions, Video, bake, calibrate, plan
from ispa_export.builder.pipeline import _with_zero_corrections, correction_rule, verdict
from ispa_export.errors import UserError
from ispa_export.kv import frame_bytes
from ispa_export.method.monitor import LocalSpan
from ispa_export.method.policy import budget_frames, paired_gain
from ispa_export.video.absorb import CorrectionRule, absorb_budget, complete, json_safe, warm_up
from ispa_export.video.modulation import with_corrections
from ispa_export.video.torch_runner import TorchRunner
from ispa_export.lab.metrics import frames_of, psnr_frames, ssim_frames
from ispa_export.lab.regimes import REGIMES, RegimeSettings, layouts, regime_model, write_results
from ispa_export.lab.rollouts import continue_stream
from ispa_export.lab.videos import make_video

DEV_SEEDS = (2000, 2001, 2002, 2003)
EVAL_SEEDS = tuple(range(1000, 1006))
REDUCTIONS = (0.5, 0.75)
METHODS = ("own", "shared", "own-nocorr", "shared-nocorr")
ROW_FIELDS = ("regime", "protocol", "reduction", "seed", "method", "psnr", "ssim", "layout", "same_layout",
              "corrected_layers", "transition_chunk", "scored_from_chunk", "first_frame", "frames_scored",
              "kv_bytes", "kv_budget_bytes")


# -- settings ---------------------------------------------------------------------------------------

def regime_settings(regime: str, seeds, total_chunks: int | None = None, warmup_chunks: int | None = None,
                    protocols: tuple[str, ...] = ("teacher", "free")) -> RegimeSettings:
    """regimes.py's settings (its default reductions 25/50/75%: their uniform spans are candidates,
    as in `ispa eval --regime`)."""
    return RegimeSettings(regime, list(seeds), total_chunks=total_chunks, warmup_chunks=warmup_chunks,
                          protocols=tuple(protocols))


def options(st: RegimeSettings, cfg, reduction: float) -> IspaOptions:
    """The options `regimes.run_seed` plans with, at `reduction` (its headline for the own layout)."""
    total = st.total_chunks * cfg.chunk_frames
    return IspaOptions(kv_reduction=reduction, warmup_chunks=st.warmup_chunks, uniform_for=tuple(st.reductions),
                       stream_frames=total if st.regime == "whole" else None, **st.opts)


def forced_video(seed: int, st: RegimeSettings, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The seed's procedural video: frames [F, C, H, W] and the warmup latents [1, C, F, H, W]."""
    frames = make_video(seed, st.total_chunks * cfg.chunk_frames, cfg.latent_height).frames
    return frames, np.ascontiguousarray(frames.transpose(1, 0, 2, 3)[None])


# -- the build and the absorb, teacher-forced --------------------------------------------------------

def span_names(layout) -> list[str | None]:
    return [None if s is None else f"s{s.sink}w{s.window}" for s in layout]


def build_deployment(model: WanModel, context: torch.Tensor, st: RegimeSettings, reduction: float,
                     calibration_seeds, log=lambda m: None) -> dict:
    """The build of builder.pipeline.build, up to the graph (not traced: the runs here are PyTorch):
    the pooled layout and the verdict on corrections, from teacher-forced calibration warmups."""
    t0 = time.perf_counter()
    f = model.cfg.chunk_frames
    model = regime_model(model, st.regime, st.total_chunks * f)
    cfg = model.cfg
    opts = options(st, cfg, reduction)
    opts.check(cfg.num_layers)
    videos = [Video(context, s, f"demo context, procedural video {s}", forced_video(s, st, cfg)[1])
              for s in calibration_seeds]
    cal = calibrate(model.with_layout([None] * cfg.num_layers), videos, opts)
    layout = as_layout(cal.layout)
    if not any(s is not None for s in layout):
        raise UserError(f"--kv-reduction {reduction}: the calibration chose no local layer")
    per_video = selection_per_video(cal)
    base = _with_zero_corrections(model, layout, opts)
    allowed, record, _ = verdict(base, layout, videos, opts, cal)
    rule = correction_rule(opts, allowed)
    dep = {"regime": st.regime, "reduction": reduction, "calibration_seeds": list(calibration_seeds),
           "layout": span_names(layout), "rule": rule.to_dict(), "corrections": json_safe(record),
           "selection": json_safe(cal.selection), "selection_per_video": json_safe(per_video),
           "calibration_transitions": [{"seed": m.seed, "chunk": m.transition_chunk, "reason": m.reason}
                                       for m in cal.measured],
           "seconds": time.perf_counter() - t0}
    log(f"[build {st.regime} {reduction:.0%}] layout {dep['layout']}; corrections "
        f"{'allowed on ' + str(list(allowed)) if allowed else 'off'}: {record['reason']} ({dep['seconds']:.0f} s)")
    return dep


def selection_per_video(cal: Calibration) -> list[dict] | None:
    """Where the pooled selection replaced its prior: each calibration video's chain on its own,
    the paired per-frame gain of the chosen layout over the prior and its standard error (select
    takes their mean, with the standard error across videos)."""
    sel = cal.selection or {}
    if sel.get("chosen") != "challenger":
        return None
    prior = [LocalSpan(s.sink, s.window) if s is not None else None
             for s in _layout_of({"layout": [None if n == "F" else n for n in sel["prior"]["spans"]]})]
    chosen = list(cal.allocation.spans)
    out = []
    for m in cal.measured:
        if m.chain is None:
            continue
        before, after = m.chain.frame_errors(prior), m.chain.frame_errors(chosen)
        gain, se = paired_gain(before, after)
        out.append({"seed": m.seed, "gain": gain, "se": se, "prior_error": float(before.mean()),
                    "chosen_error": float(after.mean())})
    return out


def _layout_of(dep: dict) -> list[Span | None]:
    out = []
    for name in dep["layout"]:
        if name is None:
            out.append(None)
        else:
            sink, window = name[1:].split("w")
            out.append(Span(int(sink), int(window)))
    return out


# -- the runs ---------------------------------------------------------------------------------------

def _scored(stream: Stream, start: int, total: int, frames: np.ndarray, protocol: str) -> np.ndarray:
    """Chunks `start`..`total`-1 of `stream` (teacher-forced up to `start`, then by the protocol)."""
    if start > stream.chunk:
        continue_stream(stream, start - stream.chunk, frames)
    return continue_stream(stream, total - start, frames if protocol == "teacher" else None)


def _baked(model: WanModel, stream: Stream, monitors, layout) -> Stream:
    """A copy of the all-F plan's stream with `layout` (a regimes.Layout; None: the reference) baked,
    as regimes.continue_run starts."""
    m = copy.deepcopy(model)
    s = copy.deepcopy(stream, {id(model): m})
    if layout is not None:
        bake(m, s, monitors, layout.spans, IspaOptions(), layout.corrections)
    return s


def _adopted(stream: Stream, model: WanModel) -> Stream:
    """A copy of an absorbed stream (its caches cut to the layout) stepping `model` on its buffers."""
    s = copy.deepcopy(stream, {id(stream.runner.model): stream.runner.model})
    s.use(TorchRunner(model, buffers=s.buffers), {})
    return s


def run_seed(model: WanModel, context: torch.Tensor, seed: int, st: RegimeSettings, deployments: dict[float, dict],
             log=lambda m: None) -> list[dict]:
    """The four runs of one evaluation seed at every reduction of `deployments` (built for st.regime)."""
    f = model.cfg.chunk_frames
    total_frames = st.total_chunks * f
    model = regime_model(model, st.regime, total_frames)
    cfg = model.cfg
    frames, warm = forced_video(seed, st, cfg)
    own_opts = options(st, cfg, st.headline)
    base = copy.deepcopy(model)
    stream, monitors, tr = plan(base, context, seed, own_opts, video=warm)
    stream.runner.before_pass = None
    log(f"[{st.regime} seed {seed}] own transition at chunk {tr.chunk} ({tr.reason})")
    refs: dict = {}
    rows = []
    for r, dep in sorted(deployments.items()):
        own, own_nc = layouts(tr, cfg, r, own_opts, monitors)[:2]
        layout = _layout_of(dep)
        rule = CorrectionRule.from_dict(dep["rule"])
        dbase = _with_zero_corrections(model, layout, options(st, cfg, r))
        need = absorb_budget(dbase, layout, rule)
        w = warm_up(dbase, layout, context, seed, rule, video=warm, placement=need.placement)
        absorbed = complete(dbase, layout, w, rule, modulation="baked", dtype="float32")
        del w
        corrected = sorted(l for l, a in absorbed.corrections.items() if a is not None)
        start = max(tr.chunk, absorbed.transition_chunk)
        same = span_names(own.spans) == span_names(layout)
        log(f"[{st.regime} seed {seed} {r:.0%}] own {span_names(own.spans)} corrected "
            f"{[l for l, c in own.corrections.items() if c is not None and c.kept]} (chunk {tr.chunk}); shared "
            f"{dep['layout']} corrected {corrected} (chunk {absorbed.transition_chunk}: {absorbed.report['transition_reason']})")
        runs = {
            "own": (lambda: _baked(base, stream, monitors, own), own.spans, tr.chunk,
                    [l for l, c in own.corrections.items() if c is not None and c.kept]),
            "own-nocorr": (lambda: _baked(base, stream, monitors, own_nc), own.spans, tr.chunk, []),
            "shared": (lambda: _adopted(absorbed.stream, with_corrections(dbase, absorbed.corrections)), layout,
                       absorbed.transition_chunk, corrected),
            "shared-nocorr": (lambda: _adopted(absorbed.stream, dbase), layout, absorbed.transition_chunk, []),
        }
        for proto in st.protocols:
            if (proto, start) not in refs:
                refs[(proto, start)] = frames_of(_scored(_baked(base, stream, monitors, None), start, st.total_chunks,
                                                         frames, proto))
            ref = refs[(proto, start)]
            for name in METHODS:
                make, spans, chunk, kept = runs[name]
                s = make()
                gen = frames_of(_scored(s, start, st.total_chunks, frames, proto))
                row = {"regime": st.regime, "protocol": proto, "reduction": r, "seed": seed, "method": name,
                       "psnr": float(np.mean(psnr_frames(ref, gen))), "ssim": float(np.mean(ssim_frames(ref, gen))),
                       "layout": span_names(spans), "same_layout": same, "corrected_layers": kept,
                       "transition_chunk": chunk, "own_transition_chunk": tr.chunk,
                       "shared_transition_chunk": absorbed.transition_chunk, "scored_from_chunk": start,
                       "first_frame": start * f, "frames_scored": (st.total_chunks - start) * f,
                       "kv_bytes": sum(g.nbytes for g in s.groups.values()),
                       "kv_budget_bytes": budget_frames(cfg, r) * frame_bytes(cfg),
                       "deployment_layout": dep["layout"], "deployment_allowed": dep["rule"]["allowed"]}
                rows.append(row)
                log(f"  {proto:7s} {r:.0%} {name:13s} PSNR {row['psnr']:.2f}")
    return rows


# -- summary ----------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> list[dict]:
    """Per (regime, reduction, protocol): mean PSNR per method, shared - own paired per seed (mean,
    standard error, seeds shared >= own), and its split: layout (+ transition) = shared-nocorr -
    own-nocorr, corrections = (shared - shared-nocorr) - (own - own-nocorr)."""
    out = []
    for key in dict.fromkeys((r["regime"], r["reduction"], r["protocol"]) for r in rows):
        sel = [r for r in rows if (r["regime"], r["reduction"], r["protocol"]) == key]
        by = {m: {r["seed"]: r for r in sel if r["method"] == m} for m in METHODS}
        seeds = sorted(set.intersection(*(set(v) for v in by.values())))
        if not seeds:
            continue
        p = {m: np.array([by[m][s]["psnr"] for s in seeds]) for m in METHODS}
        diff = p["shared"] - p["own"]
        n = len(seeds)
        out.append({
            "regime": key[0], "reduction": key[1], "protocol": key[2], "seeds": seeds,
            "mean": {m: float(v.mean()) for m, v in p.items()},
            "shared_minus_own": float(diff.mean()),
            "se": float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
            "shared_wins": int(np.sum(diff >= -1e-9)),
            "layout_part": float((p["shared-nocorr"] - p["own-nocorr"]).mean()),
            "correction_part": float(((p["shared"] - p["shared-nocorr"]) - (p["own"] - p["own-nocorr"])).mean()),
            "same_layout": int(sum(by["own"][s]["same_layout"] for s in seeds)),
            "same_transition": int(sum(by["own"][s]["transition_chunk"] == by["shared"][s]["transition_chunk"]
                                       for s in seeds)),
            "frames": sorted({(by["own"][s]["first_frame"], by["own"][s]["frames_scored"]) for s in seeds}),
            "per_seed": {s: {"own": by["own"][s]["psnr"], "shared": by["shared"][s]["psnr"],
                             "same_layout": by["own"][s]["same_layout"],
                             "own_transition": by["own"][s]["transition_chunk"],
                             "shared_transition": by["shared"][s]["transition_chunk"],
                             "own_corrected": by["own"][s]["corrected_layers"],
                             "shared_corrected": by["shared"][s]["corrected_layers"]} for s in seeds},
        })
    return out


def summary_markdown(entries: list[dict]) -> str:
    lines = ["| regime | reduction | protocol | own | shared | shared - own (SE) | seeds shared >= own "
             "| layout part | correction part | own-nocorr | shared-nocorr | same layout | same transition "
             "| frames scored |",
             "|---" * 14 + "|"]
    for e in entries:
        n = len(e["seeds"])
        se = "-" if e["se"] is None else f"{e['se']:.2f}"
        frames = "; ".join(f"{a}-{a + k - 1}" for a, k in e["frames"])
        lines.append(f"| {e['regime']} | {e['reduction']:.0%} | {e['protocol']} | {e['mean']['own']:.2f} "
                     f"| {e['mean']['shared']:.2f} | {e['shared_minus_own']:+.2f} ({se}) | {e['shared_wins']}/{n} "
                     f"| {e['layout_part']:+.2f} | {e['correction_part']:+.2f} | {e['mean']['own-nocorr']:.2f} "
                     f"| {e['mean']['shared-nocorr']:.2f} | {e['same_layout']}/{n} | {e['same_transition']}/{n} "
                     f"| {frames} |")
    lines += ["", "Per seed (teacher-forced protocol): own / shared PSNR, layouts equal, transitions "
              "(own, shared), corrected layers (own; shared).", ""]
    for e in entries:
        if e["protocol"] != "teacher":
            continue
        cells = [f"{s}: {v['own']:.2f} / {v['shared']:.2f} {'=' if v['same_layout'] else '!='} "
                 f"({v['own_transition']}, {v['shared_transition']}) {v['own_corrected']}; {v['shared_corrected']}"
                 for s, v in e["per_seed"].items()]
        lines.append(f"- {e['regime']} {e['reduction']:.0%}: " + "; ".join(cells))
    return "\n".join(lines)


# -- entry ------------------------------------------------------------------------------------------

def _load(name: str) -> tuple[WanModel, torch.Tensor]:
    from ispa_export.demo import demo_context
    from ispa_export.models import load_model

    if name != "demo":
        raise UserError(f"--model: this evaluation draws 3-channel pixel frames for the demo model, not {name!r}")
    return load_model("demo")[1], demo_context()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build_job(name: str, st: RegimeSettings, reduction: float, calibration_seeds) -> dict:
    torch.set_num_threads(1)
    model, ctx = _load(name)
    return build_deployment(model, ctx, st, reduction, calibration_seeds, log=_log)


def _seed_job(name: str, st: RegimeSettings, seed: int, deployments: dict[float, dict]) -> list[dict]:
    torch.set_num_threads(1)
    model, ctx = _load(name)
    return run_seed(model, ctx, seed, st, deployments, log=_log)


def run(args, model: WanModel | None = None, context: torch.Tensor | None = None
        ) -> tuple[list[dict], list[dict], list[dict]]:
    """Every deployment, then every (regime, seed); with --jobs N in N spawned processes (each loads
    --model), or in this process on `model` and `context` when given (a test's small model)."""
    settings = {reg: regime_settings(reg, args.seeds, args.total_chunks, args.warmup_chunks, tuple(args.protocols))
                for reg in args.regimes}
    for r in args.reductions:
        if not 0 < r < 1:
            raise UserError(f"--reductions: expected fractions in (0, 1), got {r}")
    overlap = set(args.seeds) & set(args.calibration_seeds)
    if overlap:
        raise UserError(f"--calibration-seeds: {sorted(overlap)} are also evaluation seeds")
    builds = [(reg, r) for reg in args.regimes for r in args.reductions]
    seeds = [] if args.builds_only else [(reg, s) for reg in args.regimes for s in args.seeds]
    if args.jobs <= 1 or model is not None:
        torch.set_num_threads(1)
        if model is None:
            model, context = _load(args.model)
        deps = [build_deployment(model, context, settings[reg], r, args.calibration_seeds, log=_log)
                for reg, r in builds]
        by_regime = {reg: {d["reduction"]: d for d in deps if d["regime"] == reg} for reg in args.regimes}
        per_seed = [run_seed(model, context, s, settings[reg], by_regime[reg], log=_log) for reg, s in seeds]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork (as lab.evaluate): a forked child of a process that ran OpenMP can deadlock.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            deps = [f.result() for f in [ex.submit(_build_job, args.model, settings[reg], r, args.calibration_seeds)
                                         for reg, r in builds]]
            by_regime = {reg: {d["reduction"]: d for d in deps if d["regime"] == reg} for reg in args.regimes}
            per_seed = [f.result() for f in [ex.submit(_seed_job, args.model, settings[reg], s, by_regime[reg])
                                             for reg, s in seeds]]
    rows = [row for part in per_seed for row in part]
    return rows, summary(rows), deps


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ispa_export.lab.shared_layout", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="demo")
    p.add_argument("--seeds", type=_ints, default=list(EVAL_SEEDS), help="evaluation seeds (default 1000-1005)")
    p.add_argument("--calibration-seeds", type=_ints, default=list(DEV_SEEDS),
                   help="the deployment's calibration videos (default the development seeds 2000-2003)")
    p.add_argument("--reductions", type=_floats, default=list(REDUCTIONS))
    p.add_argument("--regimes", type=lambda t: [x for x in t.split(",") if x], default=list(REGIMES))
    p.add_argument("--protocols", type=lambda t: [x for x in t.split(",") if x], default=["teacher", "free"])
    p.add_argument("--total-chunks", type=int, default=None, help="default: the regime's (rolling 32, whole 12)")
    p.add_argument("--warmup-chunks", type=int, default=None, help="default: the regime's (rolling 8, whole 4)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--builds-only", action="store_true",
                   help="only the deployments (OUT/deployments.json): the layout, the selection record, the verdict")
    return p


def _commit() -> str | None:
    """The repository's commit (and whether its tracked files differed from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None, model: WanModel | None = None, context: torch.Tensor | None = None) -> int:
    args = parser().parse_args(argv)
    commit = _commit()  # at the start: what ran
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    try:
        rows, entries, deps = run(args, model, context)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - t0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "deployments.json").write_text(json.dumps(json_safe(deps), indent=1) + "\n")
    if args.builds_only:
        print(f"wrote {out / 'deployments.json'} ({wall:.0f} s)")
        return 0
    path = write_results(rows, out)
    command = "python -m ispa_export.lab.shared_layout " + " ".join(sys.argv[1:] if argv is None else argv)
    table = summary_markdown(entries)
    (out / "results.md").write_text(
        "# The price of building once: own layout vs one deployment's (issue 19, item 7)\n\n"
        f"Command ({wall / 60:.1f} min wall{', at ' + commit if commit else ''}):\n\n    {command}\n\n"
        "PSNR (dB) against the full-cache run; mean over the seeds; shared - own paired per seed (standard "
        "error of the mean difference); layout part = shared-nocorr - own-nocorr; correction part = "
        "(shared - shared-nocorr) - (own - own-nocorr) (the two parts sum to shared - own); frames scored: "
        "those from the later of the two transitions to the end of the video. Deployments: deployments.json.\n\n"
        + table + "\n")
    print(table)
    print(f"wrote {path}, results.md and deployments.json beside it ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
