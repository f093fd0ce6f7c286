"""`ispa bench`: what ISPA saves and what it costs, in one run on one machine (DESIGN.md section 9).

Writes bench.json, BENCHMARKS.md and PNG plots into --out: exact steady-state KV bytes (checked
against the buffers the driver allocates), chunk-step latency full vs ISPA per backend and cache
capacity with the analytic FLOP bound beside it, the transition's costs (warmup monitor, solve),
export time and artifact sizes, and how memory grows with video length.

The exported graph has fixed-size caches with a validity mask, so an F-layer pays for its whole
capacity M whatever the history: the saving is the L-layers attending to s + w frames instead of M.
Latencies are medians of interleaved repetitions; ratios are taken repetition by repetition.
Threads (PyTorch and ONNX Runtime): ISPA_BENCH_THREADS, else all cores, except --quick, which uses one:
it is a smoke run, and on a shared CPU a multi-threaded step spins on its barriers (4x slower here).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graphs.config import WanConfig, preset
from graphs.wan import Absorption, WanModel
from runtimes.artifact import ONNX
from runtimes.buffers import HostBuffers, host_dtype
from runtimes.driver import Stream
from runtimes.files import write_json_atomic
from runtimes.groups import Span, is_cache_name
from runtimes.schedule import ring_slot

from ispa_export.builder.export import export_onnx
from ispa_export.flops import step_flops
from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions
from ispa_export.kv import frame_bytes, kv_bytes, layers_for_target, uniform_layout
from ispa_export.method.monitor import LocalSpan, WarmupMonitor
from ispa_export.models import resolve_device
from ispa_export.method.solver import solve_timing
from ispa_export.video.torch_runner import FLOAT32_INPUTS, TorchRunner, geometry, to_torch, torch_stream
from ispa_export.lab.bench_report import markdown, plots

SINK, TARGET = 1, 0.5  # the old export's defaults: the window is one chunk
REAL = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
# A scaled-down Wan whose F-layer attention share at M = 21 (~70%) is close to the 1.3B's (~73%):
# what the ratio looks like at a realistic share, in seconds per step on 2 CPU cores.
MEDIUM = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=64, freq_dim=64, text_len=32,
                   latent_height=20, latent_width=32, chunk_frames=3, max_frames=21)
# config: (capacities M for PyTorch, capacities also exported for ONNX Runtime)
QUICK = dict(latency={"demo": ([6, 12, 24], [12])}, history=["demo"], reps=5, warmup=2, min_seconds=1.0,
             monitor="tiny", solve=[1536], export="demo")
FULL_PLAN = dict(latency={"demo": ([6, 12, 24], [6, 12, 24]), "medium": ([6, 12, 21], [21])},
                 history=["demo", "medium"], reps=7, warmup=2, min_seconds=4.0, monitor="demo", solve=[1536, 5120],
                 export="demo", cuda_latency=[9, 15, 21], real_export=REAL[0])


_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"bench [{time.perf_counter() - _START:4.0f} s]: {msg}", file=sys.stderr, flush=True)


def config(name: str) -> WanConfig:
    return MEDIUM if name == "medium" else preset(name)


def machine(threads: int) -> dict:
    import onnxruntime

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown")
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
            "python": platform.python_version(), "load_average_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


# -- timing --------------------------------------------------------------------------------------
def summary(xs: list[float]) -> dict:
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1), "n": len(xs)}


def paired(fns: dict, reps: int, warmup: int, min_seconds: float = 0.0, max_reps: int = 60) -> dict:
    """Seconds per call of each callable; index i of every list is repetition i. The order rotates each
    repetition so drift (other jobs, thermal) and cache warmth hit every callable alike. Fast cases get
    more repetitions, up to about `min_seconds` of timing (a noisy shared CPU needs them)."""
    names = list(fns)
    t0 = time.perf_counter()
    for _ in range(warmup):
        for n in names:
            fns[n]()
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    reps = max(reps, min(max_reps, int(min_seconds / max(per_round, 1e-9))))
    times = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def pair_ratio(num: list[float], den: list[float]) -> dict:
    return summary([a / b for a, b in zip(num, den)])


# -- memory --------------------------------------------------------------------------------------
def ispa_layout(cfg: WanConfig, reduction: float = TARGET) -> list[Span | None]:
    """The layout at a KV target (the last layers local at sink SINK + one chunk); which layers go local
    is decided per video, the bytes are not."""
    n = layers_for_target(cfg, reduction, cfg.chunk_frames, SINK)
    return uniform_layout(cfg.num_layers, range(cfg.num_layers - n, cfg.num_layers), SINK, cfg.chunk_frames)


def n_local(layout: list) -> int:
    return sum(s is not None for s in layout)


def kv_rows() -> list[dict]:
    rows = []
    for name, reductions in ((REAL[0], [TARGET]), (REAL[1], [TARGET]), ("demo", [0.25, 0.5, 0.75])):
        cfg = preset(name)
        for red in reductions:
            layout = ispa_layout(cfg, red)
            for dtype in ("float32", "float16"):  # bfloat16 has the same 2 bytes as float16
                full = kv_bytes(cfg, None, dtype=dtype)
                ispa = kv_bytes(cfg, layout, dtype=dtype)
                rows.append({"config": name, "dtype": dtype, "target": red, "local_layers": n_local(layout),
                             "layers": cfg.num_layers, "tokens_per_frame": cfg.tokens_per_frame,
                             "capacity": cfg.max_frames, "window": cfg.chunk_frames, "sink": SINK,
                             "full_bytes": full.total, "ispa_bytes": ispa.total,
                             "removed": 1 - ispa.total / full.total, "cross_kv_bytes": full.cross})
    return rows


def crosscheck(cfg: WanConfig, layout: list, dtype: str) -> dict:
    """The buffers the streaming driver allocates must be exactly what kv_bytes says."""
    geo = geometry(cfg, layout, dtype=dtype)
    buffers = HostBuffers()
    for g in geo.groups:
        buffers.allocate(g.name, geo.group_shape(g), dtype)
    allocated = sum(buffers.nbytes(g.name) for g in geo.groups)
    expected = kv_bytes(cfg, layout, dtype=dtype).total
    if allocated != expected:
        raise AssertionError(f"allocated cache bytes {allocated} != kv_bytes {expected} ({dtype}, {geo.layout})")
    return {"modes": "".join(geo.modes), "groups": [g.name for g in geo.groups], "dtype": dtype,
            "allocated": int(allocated), "kv_bytes": expected, "equal": True}


def transition_frames(cfg: WanConfig) -> dict[str, int]:
    """Earliest and latest history (frames) at which the policy switches, by the rules of ispa.decide:
    it needs history >= span + one chunk and two monitored chunks, then switches once d* has converged
    (three monitored chunks at least), at the maximum warmup, or when the next chunk would evict the sink
    frames from the full cache (ispa.sink_horizon). A chunk is monitored when its history exceeds the span."""
    f, span, chunks = cfg.chunk_frames, cfg.chunk_frames + SINK, IspaOptions().warmup_chunks
    horizon = cfg.max_frames - cfg.full_sink + SINK - 1
    monitored, out = 0, {}
    for c in range(chunks):
        monitored += c * f > span
        history = (c + 1) * f
        if history < span + f or monitored < 2:
            continue
        stop = history + f > horizon or c + 1 == chunks
        if "earliest" not in out and (monitored >= 3 or stop):
            out["earliest"] = history
        if stop:
            out["latest"] = history
            return out
    raise ValueError(f"no transition possible for {cfg}")  # decide() raises a UserError in this case


def monitored_warmup_chunks(cfg: WanConfig) -> int:
    """The longest warmup the monitor accepts: every chunk must start while the full cache holds the sink."""
    return (cfg.max_frames - cfg.full_sink + SINK - 1) // cfg.chunk_frames + 1


def kv_growth(name: str, max_frames: int = 60) -> dict:
    """Bytes of valid K/V when the chunk starting at frame n runs; the warmup is all-F, so ISPA holds the
    full cache until its transition (earliest and latest the policy allows)."""
    cfg = preset(name)
    layout, fb, span = ispa_layout(cfg), frame_bytes(cfg), cfg.chunk_frames + SINK
    nl = n_local(layout)
    nf = cfg.num_layers - nl

    def held(n: int, t: float) -> int:
        if n < t:
            return cfg.num_layers * min(n, cfg.max_frames) * fb
        return (nf * min(n, cfg.max_frames) + nl * min(n, span)) * fb

    frames = list(range(0, max_frames + 1, cfg.chunk_frames))
    t = transition_frames(cfg)
    out = {"config": name, "frames": frames, "full": [held(n, math.inf) for n in frames],
           "transition_frame": t, "allocated_full": kv_bytes(cfg).total,
           "allocated_ispa": kv_bytes(cfg, layout).total}
    out.update({f"ispa_{k}": [held(n, v) for n in frames] for k, v in t.items()})
    return out


# -- step latency --------------------------------------------------------------------------------
def ispa_copy(model: WanModel, layout: list, seed: int = 0) -> WanModel:
    """The model as the bake leaves it: L-layers with a folded W_o correction and the separate bias Add."""
    m = copy.deepcopy(model)
    g, d = torch.Generator().manual_seed(seed), m.cfg.dim
    dev = next(m.parameters()).device
    for block, span in zip(m.blocks, layout):
        if span is not None:
            dw, db = 1e-3 * torch.randn(1, d, d, generator=g), 1e-3 * torch.randn(1, d, generator=g)
            block.self_attn.absorb(Absorption("wo", dw.to(dev), db.to(dev)))
    m.set_layout(layout)
    return m


def step_feeds(model: WanModel, capacity: int, history: int, seed: int = 0, fill: bool = True,
               dtype: str = "float32") -> dict[str, np.ndarray]:
    """Inputs of one chunk step for caches of `capacity` frames holding `history` frames (random K/V), taken
    from a driver Stream the way the exporter takes them; asserts the allocation equals kv_bytes."""
    cfg = model.cfg.replace(max_frames=capacity)
    geo = geometry(cfg, model.layout, dtype=dtype)
    rng = np.random.default_rng(seed)
    cross = rng.standard_normal((cfg.num_layers, 2, 1, cfg.text_len, cfg.num_heads, cfg.head_dim), np.float32)
    stream = Stream(TorchRunner(model), geo, cross, seed)
    for group in stream.groups.values():
        if fill:
            shape = stream.buffers.shapes[group.name]
            stream.buffers.upload(group.name, rng.standard_normal(shape, np.float32).astype(host_dtype(dtype)))
        for frame in range(history):  # the driver's ring arithmetic: sink pinned, oldest evicted
            group.frames[ring_slot(frame, group.capacity, group.sink)] = frame
    allocated = sum(g.nbytes for g in stream.groups.values())
    expected = kv_bytes(cfg, model.layout, dtype=dtype).total
    if allocated != expected:
        raise AssertionError(f"stream cache bytes {allocated} != kv_bytes {expected}")
    stream.frame_index = history
    return graph_feeds(stream, model, host_dtype(dtype))


def graph_feeds(stream: Stream, model: WanModel, np_dtype) -> dict[str, np.ndarray]:
    """One step's inputs in the graph's contract, taken from a live stream (its caches and masks)."""
    feeds = stream.feeds(np.zeros(stream.geo.chunk_shape, np.float32), 500.0, 0)
    state = stream.state_arrays()
    groups = [g.name for g in stream.geo.groups]
    feeds.update({k: state[k] for k in ["cross_kv", *groups]})
    names = ["latents", "timestep", "rope_frame", "cross_kv", *(n for g in groups for n in (g, g + "_mask"))]
    names += ["pass_kind"] if model.per_pass_kind() else []
    # timestep and rope_frame stay float32 in every graph: fp16 positions would blur the angles.
    return {k: feeds[k].astype(np_dtype) if feeds[k].dtype.kind == "f" and k not in ("timestep", "rope_frame")
            else feeds[k] for k in names}


def on_device(model: WanModel, device: str, dtype: torch.dtype) -> WanModel:
    p = next(model.parameters())
    if p.device.type == torch.device(device).type and p.dtype == dtype:
        return model
    return copy.deepcopy(model).cast(dtype).to(device)


def torch_fn(model: WanModel, feeds: dict[str, np.ndarray], device: str = "cpu",
             dtype: torch.dtype = torch.float32, fresh_caches: bool = False) -> Callable[[], None]:
    """Eager chunk step with every input resident on the device (no transfers timed)."""
    args = {}
    for k, v in feeds.items():
        if fresh_caches and is_cache_name(k):  # too big to fill on the host first
            args[k] = torch.randn(v.shape, dtype=dtype, device=device)
            continue
        t = to_torch(v, torch.device(device))
        args[k] = t.to(dtype) if t.is_floating_point() and k not in FLOAT32_INPUTS else t
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.no_grad():
            model(**args)
        sync()
    return run


def ort_fn(path: Path, feeds: dict[str, np.ndarray], providers: list[str], threads: int) -> Callable[[], None]:
    from runtimes.ort import OrtRunner

    runner = OrtRunner(path, providers=providers, threads=threads)
    return lambda: runner.run(feeds)


def latency_rows(name: str, capacity: int, history: int, times: dict, cfg: WanConfig,
                 layout: list) -> list[dict]:
    at_m = cfg.replace(max_frames=capacity)
    removed = 1 - kv_bytes(at_m, layout).total / kv_bytes(at_m).total
    rows = []
    for backend in sorted({b for b, _ in times}):
        full, ispa = times[(backend, "full")], times[(backend, "ispa")]
        rows.append({"config": name, "backend": backend, "capacity": capacity, "history": history,
                     "preset_capacity": cfg.max_frames, "local_layers": n_local(layout), "layers": len(layout),
                     "kv_removed": removed, "full": summary(full), "ispa": summary(ispa),
                     "ratio": pair_ratio(ispa, full), "flops": step_flops(cfg, layout, capacity)})
    return rows


def ort_vs_torch(name: str, capacity: int, times: dict) -> list[dict]:
    return [{"config": name, "capacity": capacity, "mode": mode, "ort": dev.replace("torch", "ort"),
             "ratio": pair_ratio(times[(dev.replace("torch", "ort"), mode)], times[(dev, mode)])}
            for dev in ("torch-cpu", "torch-cuda") for mode in ("full", "ispa")
            if (dev.replace("torch", "ort"), mode) in times and (dev, mode) in times]


def latency_config(name: str, full: WanModel, ispa: WanModel, plan: dict, caps: list[int], ort_caps: list[int],
                   onnx: dict, out: Path, threads: int, cpu: bool = True) -> tuple[list[dict], list[dict]]:
    """Latency vs capacity M (history = M) and vs history at the preset M, for every backend here."""
    import onnxruntime
    from tqdm import tqdm

    cfg = full.cfg
    cuda = plan["cuda"]
    cases = [(m, m) for m in caps]
    if name in plan["history"]:
        cases += [(cfg.max_frames, h) for h in (cfg.chunk_frames, cfg.max_frames // 2)
                  if (cfg.max_frames, h) not in cases]
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    big = not cpu  # real-size models: caches made on the GPU, bf16
    rows, versus = [], []
    for capacity, history in tqdm(cases, desc=f"latency {name}", file=sys.stderr):
        fns = {}
        for mode, model in (("full", full), ("ispa", ispa)):
            feeds = step_feeds(model, capacity, history, fill=not big, dtype="float16" if big else "float32")
            if cpu:
                fns[("torch-cpu", mode)] = torch_fn(model, feeds)
            if cuda:
                dt = torch.bfloat16 if big else torch.float32
                fns[("torch-cuda", mode)] = torch_fn(on_device(model, "cuda", dt), feeds, "cuda", dt,
                                                     fresh_caches=big)
            if capacity in ort_caps and history == capacity:
                path = onnx.get((name, capacity, mode))
                if path is None:
                    path = onnx[(name, capacity, mode)] = out / "onnx" / f"{name}-M{capacity}-{mode}.onnx"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    log(f"exporting {path.name} for ONNX Runtime")
                    export_onnx(model, feeds, path, refit=False)
                fns[("ort-cpu", mode)] = ort_fn(path, feeds, ["CPUExecutionProvider"], threads)
                if ort_cuda:
                    fns[("ort-cuda", mode)] = ort_fn(path, feeds, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                                     threads)
        times = paired(fns, plan["reps"], plan["warmup"], plan["min_seconds"])
        rows += latency_rows(name, capacity, history, times, cfg, ispa.layout)
        versus += ort_vs_torch(name, capacity, times)
    return rows, versus


def cpu_skip_reason(cfg_name: str, rows: list[dict]) -> str:
    """Why a real-size model is not timed on this CPU, with the time it would take at the measured rate."""
    ref = max((r for r in rows if r["backend"] == "torch-cpu" and r["history"] == r["capacity"]),
              key=lambda r: r["flops"]["full"], default=None)
    cfg = preset(cfg_name)
    flops = step_flops(cfg, ispa_layout(cfg), cfg.max_frames)["full"]
    reason = f"no CUDA device; one full step of {cfg_name} is {flops / 1e12:.0f} TFLOP"
    if ref is not None:
        rate = ref["flops"]["full"] / ref["full"]["median"]
        reason += f", ~{flops / rate / 60:.0f} min at the {rate / 1e9:.0f} GFLOP/s measured here ({ref['config']})"
    return reason


def real_latency(plan: dict, measured: list[dict], out: Path, threads: int) -> tuple[list[dict], list[dict]]:
    """Wan2.1 1.3B at its real size: on a CUDA device (bf16, caches made there), else skipped with the
    time it would take at the rate measured on this CPU. Returns the rows and the skipped entries."""
    caps = plan.get("cuda_latency")
    if not caps:
        return [], [{"config": REAL[0], "reason": "quick mode (tiny/demo only)"}]
    skipped = [{"config": REAL[1], "reason": "latency not timed (KV bytes and solve time only)"}]
    if not plan["cuda"]:
        return [], [{"config": REAL[0], "reason": cpu_skip_reason(REAL[0], measured)}] + skipped
    torch.manual_seed(0)
    with torch.device("cuda"):
        full = WanModel(preset(REAL[0])).eval().cast(torch.bfloat16)
    ispa = ispa_copy(full, ispa_layout(full.cfg))
    rows, _ = latency_config(REAL[0], full, ispa, plan, caps, [], {}, out, threads, cpu=False)
    return rows, [{"config": REAL[0], "reason": "ONNX Runtime: an fp32 graph of this size exceeds protobuf's "
                   "2 GiB limit (export_onnx writes one file)"}] + skipped


# -- transition and export ------------------------------------------------------------------------
def monitor_overhead(name: str, reps: int, seed: int = 0) -> dict:
    """Wall time of the all-F warmup with the monitor attached (the real transition loop) vs without,
    over the longest warmup the monitor accepts."""
    cfg = preset(name)
    chunks = monitored_warmup_chunks(cfg)
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    monitored = []

    def plain() -> None:
        torch_stream(model, ctx, seed).run(chunks)

    def with_monitor() -> None:
        mon = WarmupMonitor(LocalSpan(SINK, cfg.chunk_frames), None)
        stream = torch_stream(model, ctx, seed, before_pass=mon.before_pass)
        mon.stream = stream
        for _ in range(chunks):
            stream.step()
            mon.finish()
        monitored[:] = mon.monitored_chunks

    times = paired({"plain": plain, "monitor": with_monitor}, reps, warmup=1)
    return {"config": name, "chunks": chunks, "monitored_chunks": len(monitored), "plain": summary(times["plain"]),
            "monitor": summary(times["monitor"]), "ratio": pair_ratio(times["monitor"], times["plain"])}


def solve_rows(dims: list[int]) -> list[dict]:
    rows = []
    for d in dims:
        log(f"solve timing at D = {d}")
        row = {"D": d, "seconds_per_layer": solve_timing(d, repeats=5 if d <= 2048 else 3)}
        for name in REAL:
            cfg = preset(name)
            if cfg.dim == d:
                n = n_local(ispa_layout(cfg))
                row.update(model=name, local_layers=n, seconds_all_layers=row["seconds_per_layer"] * n)
        rows.append(row)
    return rows


def export_section(name: str, out: Path, seed: int = 0) -> tuple[dict, WanModel, WanModel, Path]:
    """`ispa export`'s path (build with one calibration video, then its absorb) on random weights;
    returns the all-F model, the deployment's model with the video's corrections and the directory
    (its ONNX is reused for the ONNX Runtime timing)."""
    from ispa_export.builder.pipeline import Video, build
    from ispa_export.video.modulation import with_corrections
    from ispa_export.video.absorb import complete, write_instance
    from runtimes.files import atomic_directory, sha256_file

    cfg = preset(name)
    torch.manual_seed(seed)
    base = WanModel(cfg).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    opts = IspaOptions(kv_reduction=TARGET, window=cfg.chunk_frames, sink=SINK)
    directory = out / f"artifact-{name}"
    t0 = time.perf_counter()
    with atomic_directory(directory) as tmp:
        built = build(base, [Video(ctx, seed, f"random embeddings (seed {seed})")], opts, tmp, preset=name,
                      modulation="baked", dtype="fp32", log=log, keep_warmups=True)
        absorbed = complete(built.model, built.layout, built.warmups[0], built.rule, modulation="baked",
                            dtype="float32")
        write_instance(absorbed, tmp / "instance", deployment=directory,
                       deployment_sha256=sha256_file(tmp / "manifest.json"), dtype="float32", context_source="random",
                       atomic=False)
    write_s = time.perf_counter() - t0
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    baked = with_corrections(built.model, absorbed.corrections)
    info = {"config": name, "transition_chunk": absorbed.transition_chunk, "local_layers": [i for i, s in enumerate(built.layout) if s is not None],
            "warmup_and_solve_s": write_s - built.manifest["export_seconds"],
            "write_artifact_s": write_s, "onnx_export_s": built.manifest["export_seconds"], "files": files,
            "total_bytes": sum(files.values()), "directory": str(directory)}
    return info, base, baked, directory


def real_export(name: str, out: Path, dtype: str = "float16") -> dict:
    """The ONNX export of a real-size graph (random weights, the ISPA layout at the target, caches at
    capacity) in a process of its own: its wall time and the process's peak resident memory (VmHWM),
    what a CPU export box must have."""
    path = out / "onnx" / f"{name}-{dtype}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import json, sys; from pathlib import Path; from ispa_export.lab.bench import export_real_child; "
            f"print(json.dumps(export_real_child({name!r}, Path({str(path)!r}), {dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"real-size export of {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_real_child(name: str, path: Path, dtype: str) -> dict:
    torch.manual_seed(0)
    model = WanModel(preset(name)).eval().cast(getattr(torch, dtype))
    ispa = ispa_copy(model, ispa_layout(model.cfg))
    del model
    feeds = step_feeds(ispa, ispa.cfg.max_frames, ispa.cfg.max_frames, fill=False, dtype=dtype)
    t0 = time.perf_counter()
    export_onnx(ispa, feeds, path, refit=False)
    seconds = time.perf_counter() - t0
    hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    files = {p.name: p.stat().st_size for p in path.parent.glob(path.name + "*")}
    return {"config": name, "dtype": dtype, "export_seconds": seconds, "peak_rss_bytes": hwm, "files": files,
            "layers_local": n_local(ispa.layout)}


# -- entry point ----------------------------------------------------------------------------------
def run(plan: dict, out: Path, threads: int, command: str) -> dict:
    res = {"mode": "quick" if plan["quick"] else "full", "command": command, "machine": machine(threads),
           "device": "cuda" if plan["cuda"] else "cpu"}
    log("KV bytes")
    checks = []
    for name in ("tiny", "demo"):
        cfg = preset(name)
        for dtype in ("float32", "float16"):
            checks.append(dict(crosscheck(cfg, ispa_layout(cfg), dtype), config=name))
    res["kv"] = {"rows": kv_rows(), "crosscheck": checks}
    res["growth"] = kv_growth(REAL[0])
    log(f"export: build (calibration, verdict, trace) and absorb on {plan['export']}")
    res["export"], base, baked, directory = export_section(plan["export"], out)
    if plan.get("real_export"):
        log(f"export: {plan['real_export']} graph, fp16, in a process of its own (minutes, ~12 GB)")
        res["real_export"] = real_export(plan["real_export"], out)
    onnx = {(plan["export"], base.cfg.max_frames, "ispa"): directory / ONNX}
    lat, versus = [], []
    for name, (caps, ort_caps) in plan["latency"].items():
        if name == plan["export"]:
            full, ispa = base, baked
        else:
            torch.manual_seed(0)
            full = WanModel(config(name)).eval()
            ispa = ispa_copy(full, ispa_layout(full.cfg))
        r, v = latency_config(name, full, ispa, plan, caps, ort_caps, onnx, out, threads)
        lat, versus = lat + r, versus + v
    real, skipped = real_latency(plan, lat, out, threads)
    lat += real
    notes = ["ort-cuda is fed the caches from host memory here (one standalone step), so its times include "
             "their copies; the streaming driver keeps them in device memory"] if any(r["backend"] == "ort-cuda"
                                                                                     for r in lat) else []
    res.update(latency=lat, ort_vs_torch=versus, skipped=skipped, notes=notes)
    log("transition cost: monitor overhead")
    res["transition"] = {"monitor": monitor_overhead(plan["monitor"], reps=plan["reps"])}
    res["transition"]["solve"] = solve_rows(plan["solve"])
    res["machine"]["load_average_end"] = list(os.getloadavg())
    res["plots"] = plots(res, out)
    return res


def main(args) -> int:
    quick = bool(getattr(args, "quick", False))
    out = Path(getattr(args, "out", None) or "artifacts/bench")
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ.get("ISPA_BENCH_THREADS")
    if env is not None and not (env.isdigit() and int(env) > 0):
        raise UserError(f"environment variable ISPA_BENCH_THREADS: expected a positive integer, got {env!r}")
    threads = int(env) if env else 1 if quick else os.cpu_count() or 1
    command = ("" if not env else f"ISPA_BENCH_THREADS={env} ") + "ispa bench" + (" --quick" if quick else "")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load > cores:
        log(f"load average {load:.1f} on {cores} cores: multi-threaded steps will wait on busy cores and "
            "time that, not the step; ISPA_BENCH_THREADS=1 gives steadier numbers")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        device = resolve_device(getattr(args, "device", None))
        plan = dict(QUICK if quick else FULL_PLAN, quick=quick, cuda=device.type == "cuda")
        res = run(plan, out, threads, command)
    finally:
        torch.set_num_threads(old)
    res["wall_seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "bench.json", res)
    (out / "BENCHMARKS.md").write_text(markdown(res))
    log(f"wrote {out / 'bench.json'}, {out / 'BENCHMARKS.md'} and {len(res['plots'])} plots "
        f"in {res['wall_seconds']:.0f} s")
    return 0
