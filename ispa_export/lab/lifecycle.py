"""`python -m ispa_export.lab.lifecycle --out DIR`: what one build and many videos cost (issue 19's figures).

Per configuration (the shipped demo, and a medium one with random weights), on ONNX Runtime (CPU),
one run each, ratios taken in that run:
- the one-shot `ispa export` (build with the video as calibration, trace, absorb, write) and a build
  from 4 calibration videos, their stages timed;
- per video through the Python API (Deployment.start): the warmup, what follows the last warmup
  chunk (solve + gates, cutting the caches, the swap into the engine: the stall), the first engine
  chunk; the CLI path's instance write; absorb / one-shot export;
- the warmup's monitor overhead with only the deployment's L-layers at their span, against the
  build's search over every candidate span, both against the same chunks unmonitored;
- the step with the modulation as graph inputs against baked constants (bound per video, as a
  deployment serving several videos does, and fixed, as an engine per video would).
Writes DIR/lifecycle.json and DIR/lifecycle.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graphs.wan import WanModel
from runtimes.files import atomic_directory, sha256_file, write_json_atomic

from ispa_export.builder.calibrate import IspaOptions, search_budget
from ispa_export.builder.export import export_onnx
from ispa_export.builder.pipeline import Video, build
from ispa_export.builder.verify import example_feeds
from ispa_export.deployment import Deployment
from ispa_export.lab.bench import MEDIUM, log, machine, pair_ratio, paired, summary
from ispa_export.method.monitor import SpanMonitors
from ispa_export.models import load_model
from ispa_export.video.absorb import complete, monitors_for, write_instance
from ispa_export.video.torch_runner import geometry, torch_stream

SEEDS = (100, 101, 102)


def _model(name: str) -> tuple[WanModel, callable]:
    if name == "demo":
        from ispa_export.demo import demo_context

        return load_model("demo")[1], lambda seed: demo_context()
    torch.manual_seed(0)
    cfg = MEDIUM
    g = lambda seed: torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    return WanModel(cfg).eval(), g


def one_shot(model: WanModel, ctx, seed: int, out: Path, name: str) -> dict:
    """`ispa export`'s path, stage by stage."""
    t0 = time.perf_counter()
    with atomic_directory(out) as tmp:
        built = build(model, [Video(ctx(seed), seed, "bench")], IspaOptions(), tmp, preset=name, modulation="input",
                      dtype="fp32", log=log, keep_warmups=True)
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        absorbed = complete(built.model, built.layout, built.warmups[0], built.rule, modulation="input",
                            dtype="float32")
        write_instance(absorbed, tmp / "instance", deployment=out, deployment_sha256=sha256_file(tmp / "manifest.json"),
                       dtype="float32", context_source="bench", atomic=False)
        t_absorb_rest = time.perf_counter() - t1
    total = time.perf_counter() - t0
    cal = built.manifest["calibration"]["seconds"]
    return {"seconds": total, "calibration": cal["calibration"], "verdict_absorb_warmup": cal["verdict"],
            "trace": built.manifest["export_seconds"], "build": t_build, "instance": t_absorb_rest,
            "layout": ["F" if s is None else f"s{s.sink}w{s.window}" for s in built.layout],
            "transition_chunk": absorbed.transition_chunk}


def build_four(model: WanModel, ctx, out: Path, name: str) -> dict:
    t0 = time.perf_counter()
    with atomic_directory(out) as tmp:
        built = build(model, [Video(ctx(s), s, "bench") for s in (0, 1, 2, 3)], IspaOptions(), tmp, preset=name,
                      modulation="input", dtype="fp32", log=log)
    return {"seconds": time.perf_counter() - t0, **built.manifest["calibration"]["seconds"],
            "trace": built.manifest["export_seconds"],
            "layout": ["F" if s is None else f"s{s.sink}w{s.window}" for s in built.layout],
            "corrections": built.manifest["calibration"]["corrections"]}


def per_video(deploy: Path, ctx, threads: int, scratch: Path) -> list[dict]:
    """Each video through the API (the stall) and through the CLI's instance write."""
    t0 = time.perf_counter()
    dep = Deployment.open(deploy, backend="ort", device="cpu", threads=threads)
    opened = time.perf_counter() - t0
    rows = []
    for seed in SEEDS:
        video = dep.start(ctx(seed), seed)
        list(video.chunks(video.warmup_chunks + 1))
        s = video.seconds
        video.close()
        t0 = time.perf_counter()
        absorbed = dep.absorb(ctx(seed), seed)
        t_absorb = time.perf_counter() - t0
        t0 = time.perf_counter()
        dep.write(absorbed, scratch / f"i{seed}", context_source="bench")
        t_write = time.perf_counter() - t0
        after = s["solve"] + s["cut"] + s["swap"]
        rows.append({"seed": seed, "warmup_chunks": video.warmup_chunks, "warmup": s["warmup"], "solve": s["solve"],
                     "cut": s["cut"], "swap": s["swap"], "stall": after, "after_warmup_over_warmup": after / s["warmup"],
                     "first_engine_chunk": s["first_engine_chunk"], "cli_absorb": t_absorb, "cli_write": t_write,
                     "deployment_open": opened})
    return rows


def monitor_overhead(model: WanModel, ctx, layout, reps: int) -> dict:
    """Warmup chunks with the deployment's monitor, with the build's every-span monitor, and without."""
    cfg = model.cfg
    chunks = 8
    allf = model.with_layout([None] * cfg.num_layers)
    opts = IspaOptions()
    spans = opts.spans(cfg)
    placement = search_budget(cfg, len(spans), opts, torch.device("cpu"), "float32").placement

    def run(monitors) -> None:
        stream = torch_stream(allf, ctx(0), 0, before_pass=None if monitors is None else monitors.before_pass)
        if monitors is not None:
            monitors.stream = stream
        for _ in range(chunks):
            stream.step()
            if monitors is not None:
                monitors.finish()

    from ispa_export.video.absorb import CorrectionRule

    times = paired({"plain": lambda: run(None),
                    "deployment": lambda: run(monitors_for(layout, CorrectionRule())),
                    "search": lambda: run(SpanMonitors.build(spans, None, holdout_gap=1, placement=placement))},
                   reps, warmup=1)
    return {"chunks": chunks, "spans_searched": len(spans), "plain": summary(times["plain"]),
            "deployment": summary(times["deployment"]), "search": summary(times["search"]),
            "deployment_ratio": pair_ratio(times["deployment"], times["plain"]),
            "search_ratio": pair_ratio(times["search"], times["plain"])}


def modulation_timing(deploy_model: WanModel, layout, threads: int, reps: int, scratch: Path) -> dict:
    """One ORT step: modulation as inputs, baked constants bound per video, baked constants fixed."""
    from runtimes.ort import OrtRunner

    geo = geometry(deploy_model.cfg, layout)
    paths, fns = {}, {}
    for mod in ("input", "baked"):
        m = copy.deepcopy(deploy_model)
        feeds = example_feeds(m, geo, mod)
        paths[mod] = scratch / f"{mod}.onnx"
        export_onnx(m, feeds, paths[mod], refit=mod == "baked")
        runner = OrtRunner(paths[mod], providers=["CPUExecutionProvider"], threads=threads)
        if mod == "input":
            for n in ("ispa_weight", "ispa_bias"):
                runner.buffers.allocate(n, feeds[n].shape, feeds[n].dtype.name)
                runner.buffers.upload(n, feeds[n])
            fns["input"] = (lambda r=runner, f=feeds: r.run({k: v for k, v in f.items() if k not in
                                                           ("ispa_weight", "ispa_bias")}))
            continue
        fns["baked-fixed"] = lambda r=runner, f=feeds: r.run(f)
        bound = OrtRunner(runner.engine)
        from ispa_export.video.modulation import refit_tensors

        for n, v in refit_tensors(m).items():
            bound.buffers.allocate(n, v.shape, v.dtype.name)
            bound.buffers.upload(n, v)
        fns["baked-bound"] = lambda r=bound, f=feeds: r.run(f)
    times = paired(fns, reps, warmup=2, min_seconds=3.0)
    return {k: summary(v) for k, v in times.items()} | {
        "input_over_baked_fixed": pair_ratio(times["input"], times["baked-fixed"]),
        "input_over_baked_bound": pair_ratio(times["input"], times["baked-bound"])}


def run(names: list[str], out: Path, threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    res = {"machine": machine(threads), "command": "python -m ispa_export.lab.lifecycle " + " ".join(sys.argv[1:]),
           "configs": {}}
    for name in names:
        model, ctx = _model(name)
        log(f"{name}: one-shot export")
        scratch = Path(tempfile.mkdtemp(prefix=f"lifecycle-{name}-", dir=out))
        r = {"one_shot": one_shot(model, ctx, 0, scratch / "export", name)}
        log(f"{name}: videos on the deployment")
        r["videos"] = per_video(scratch / "export", ctx, threads, scratch)
        r["absorb_over_export"] = float(np.median([v["cli_absorb"] + v["cli_write"] for v in r["videos"]])
                                        / r["one_shot"]["seconds"])
        dep = Deployment.open(scratch / "export", backend=None, device="cpu")
        log(f"{name}: monitor overhead")
        r["monitor"] = monitor_overhead(model, ctx, dep.layout, reps)
        log(f"{name}: modulation as inputs vs baked")
        r["modulation"] = modulation_timing(dep.model, dep.layout, threads, reps, scratch)
        if name == "demo":
            log(f"{name}: a build from 4 calibration videos")
            r["build_4"] = build_four(model, ctx, scratch / "build4", name)
        res["configs"][name] = r
        write_json_atomic(out / "lifecycle.json", res)
    (out / "lifecycle.md").write_text(markdown(res))
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Command: `{res['command']}` · {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch "
             f"{m['torch']}, onnxruntime {m['onnxruntime']}; load average at start {m['load_average_start'][0]:.1f}.\n"]
    for name, r in res["configs"].items():
        o = r["one_shot"]
        lines.append(f"### {name}\n")
        lines.append(f"One-shot `ispa export`: {o['seconds']:.1f} s (calibration warmup and policy "
                     f"{o['calibration']:.1f} s, the verdict's absorb warmup {o['verdict_absorb_warmup']:.1f} s, trace "
                     f"{o['trace']:.1f} s, instance {o['instance']:.2f} s); layout {' '.join(o['layout'])}.\n")
        if "build_4" in r:
            b = r["build_4"]
            lines.append(f"`ispa build` with 4 calibration videos: {b['seconds']:.1f} s (calibration {b['calibration']:.1f} s, "
                         f"verdict {b['verdict']:.1f} s, trace {b['trace']:.1f} s); layout {' '.join(b['layout'])}; "
                         f"corrections: {b['corrections']}.\n")
        lines.append("| video seed | warmup s (chunks) | solve + gates s | cut s | swap s | stall s | stall / warmup | "
                     "first engine chunk s | CLI absorb s | instance write s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for v in r["videos"]:
            lines.append(f"| {v['seed']} | {v['warmup']:.2f} ({v['warmup_chunks']}) | {v['solve']:.4f} | {v['cut']:.4f} | "
                         f"{v['swap']:.4f} | {v['stall']:.4f} | {v['after_warmup_over_warmup']:.1%} | "
                         f"{v['first_engine_chunk']:.4f} | {v['cli_absorb']:.2f} | {v['cli_write']:.3f} |")
        lines.append(f"\nabsorb + write / one-shot export: {r['absorb_over_export']:.3f} (median over the videos).\n")
        mo = r["monitor"]
        lines.append(f"Monitor overhead over {mo['chunks']} warmup chunks (paired ratio, median [IQR]): the deployment's "
                     f"L-layers at their span {mo['deployment_ratio']['median']:.2f} [{mo['deployment_ratio']['q1']:.2f}, "
                     f"{mo['deployment_ratio']['q3']:.2f}]; the build's search over {mo['spans_searched']} spans on every "
                     f"layer {mo['search_ratio']['median']:.2f} [{mo['search_ratio']['q1']:.2f}, "
                     f"{mo['search_ratio']['q3']:.2f}].\n")
        md = r["modulation"]
        lines.append(f"Step on ONNX Runtime, median ms: modulation as inputs {1e3 * md['input']['median']:.2f}, baked "
                     f"and bound per video {1e3 * md['baked-bound']['median']:.2f}, baked and fixed "
                     f"{1e3 * md['baked-fixed']['median']:.2f}; inputs / baked-fixed "
                     f"{md['input_over_baked_fixed']['median']:.3f}, inputs / baked-bound "
                     f"{md['input_over_baked_bound']['median']:.3f}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ispa_export.lab.lifecycle", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/lifecycle")
    p.add_argument("--configs", default="demo,medium")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args.configs.split(","), out, args.threads, args.reps)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
