"""`make gpu-check`: the real-size job on one GPU, as one prepared command (DESIGN.md section 9).

    python3 -m ispa_export.lab.gpu_check --out artifacts/gpu_check                      # cuda, wan2.1-t2v-1.3b
    python3 -m ispa_export.lab.gpu_check --device cpu --model tiny --out /tmp/check     # the same code on a CPU

Random weights of the preset in the warmup's dtype (bf16 on a GPU), made on the device in that
dtype. A build-free absorb, as a deployment runs one per video (ispa_export.video.absorb): the
deployment's layout is the policy's uniform prior at 50%, every L-layer with a zero correction; its
memory is planned first (ispa_export.memory: weights, the all-F cache, the L-layers' statistics,
the activations); then the warmup with the monitor of the L-layers only, the solve and gates, the
swap into the deployment's PyTorch step (modulation as inputs, the caches handed over on the
device), the first engine chunk, and the same warmup without the monitor; chunks streamed with the
caches on the device (wall time, the sum of the passes' graph times, host-device bytes per chunk); the step
latency of the full and the ISPA layout with every cache slot valid (the attention runs unmasked),
against their FLOP ratio; peak device memory; the CUDA copy path of ONNX Runtime and TensorRT
(cuda-python) against numpy; and the device stream's parity with the CPU stream on the demo model.
Needs torch, numpy and safetensors only (cuda-python for the copy check), so it runs on a machine
where nothing can be installed. Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from graphs.config import preset
from graphs.wan import WanModel
from runtimes.buffers import HostBuffers
from runtimes.driver import Stream
from runtimes.files import write_bytes_atomic, write_json_atomic
from runtimes.groups import Span
from runtimes.schedule import warped_timesteps

from ispa_export.builder.calibrate import IspaOptions, transition
from ispa_export.builder.pipeline import _with_zero_corrections
from ispa_export.flops import step_flops
from ispa_export.method.policy import uniform
from ispa_export.video.modulation import torch_inputs
from ispa_export.video.absorb import CorrectionRule, absorb_budget, complete, warm_up
from ispa_export.video.torch_runner import TorchRunner, geometry, to_numpy, torch_stream

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


class Sync:
    """Waits for the device (timings must include the queued kernels)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class GraphTimer:
    """Sums the time of the model's forward passes (the graph) apart from the driver around them:
    CUDA events on a GPU (no extra synchronisation), the wall clock on a CPU."""

    def __init__(self, model: WanModel, device: torch.device):
        self.device, self.model, self.pending, self.cpu = device, model, [], 0.0
        self.forward = model.forward

        def timed(*args, **kwargs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self.forward(*args, **kwargs)
                end.record()
                self.pending.append((start, end))
                return out
            t0 = time.perf_counter()
            out = self.forward(*args, **kwargs)
            self.cpu += time.perf_counter() - t0
            return out

        model.forward = timed

    def take(self) -> float:
        """Seconds of graph time since the last call."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            total = sum(s.elapsed_time(e) for s, e in self.pending) / 1e3
        else:
            total = self.cpu
        self.pending, self.cpu = [], 0.0
        return total

    def close(self) -> None:
        del self.model.forward  # the instance attribute goes; the class's forward is back


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """Random weights made on the device in `dtype` (Wan 14B in float32 first would not fit 80 GB)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return WanModel(preset(name)).eval()
    finally:
        torch.set_default_dtype(old)


def context(cfg, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, min(cfg.text_len, 16), cfg.text_dim, generator=g).to(device)


def absorb_check(name: str, device: torch.device, dtype: torch.dtype, chunks: int) -> tuple[dict, WanModel, Stream]:
    """A video absorbed into a deployment without a build (its layout: the uniform prior at 50%), as
    `ispa absorb` runs it, timed stage by stage; then the same warmup without the monitor."""
    sync = Sync(device)
    base = build(name, device, dtype)
    cfg = base.cfg
    layout = list(uniform(cfg, 0.5, 0).spans)
    model = _with_zero_corrections(base, [Span(s.sink, s.window) for s in layout], IspaOptions())
    layout = model.layout
    rule = CorrectionRule(warmup_chunks=chunks, allowed=tuple(i for i, s in enumerate(layout) if s is not None))
    ctx = context(cfg, device)
    need = absorb_budget(model, layout, rule)
    log(f"memory plan: {need.to_dict()}")
    # One untimed chunk first: CUDA context, cuBLAS/cuDNN handles and kernel selection are not the warmup.
    torch_stream(base, ctx, 1).run(1)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    warm = warm_up(model, layout, ctx, 0, rule, placement=need.placement)
    sync()
    seconds = time.perf_counter() - t0
    dtype_name = str(dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    absorbed = complete(model, layout, warm, rule, modulation="input", dtype=dtype_name)
    sync()
    solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = absorbed.stream
    stream.use(TorchRunner(model, device, buffers=stream.buffers), torch_inputs(model, "input", absorbed.modulation))
    stream.keep_latents, stream.latents = False, []
    sync()
    swap = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream.step()
    sync()
    first = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    n_local = sum(s is not None for s in layout)
    log(f"absorb: warmup {warm.chunk} chunks with the monitor of {n_local} L-layers {seconds:.2f} s, solve + gates + "
        f"cut {solve:.3f} s, swap {swap:.3f} s, first engine chunk {first:.3f} s, peak {peak} bytes")
    t0 = time.perf_counter()
    torch_stream(base, ctx, 0).run(warm.chunk)
    sync()
    plain = time.perf_counter() - t0
    log(f"the same {warm.chunk} chunks without the monitor: {plain:.2f} s")
    return ({"warmup_seconds": seconds, "plain_warmup_seconds": plain, "warmup_chunks": warm.chunk,
             "solve_seconds": solve, "swap_seconds": swap, "first_engine_chunk_seconds": first,
             "stall_seconds": solve + swap, "absorb_peak_device_bytes": peak, "memory_plan": need.to_dict(),
             "local_layers": [i for i, s in enumerate(layout) if s is not None],
             "kept_corrections": absorbed.report["kept_corrections"], "transition_reason": warm.reason}, model, stream)


def stream_chunks(model: WanModel, stream: Stream, chunks: int, device: torch.device) -> dict:
    """Chunks generated by the driver with device-resident caches: wall, graph time and bus bytes each."""
    timer = GraphTimer(model, device)
    traffic = stream.buffers.traffic
    wall, graph, moved = [], [], []
    try:
        for _ in range(chunks):
            before = traffic.snapshot()
            t0 = time.perf_counter()
            x0 = stream.step()  # ends with the prediction on the host: the chunk is done
            wall.append(time.perf_counter() - t0)
            graph.append(timer.take())
            d = traffic.since(before)
            moved.append({"h2d": d.h2d, "d2h": d.d2h, "d2d": d.d2d})
            if not np.isfinite(x0).all():
                raise RuntimeError(f"chunk {stream.chunk - 1}: non-finite latents")
    finally:
        timer.close()
    steady = wall[1:] or wall
    return {"chunk_seconds": wall, "graph_seconds_per_chunk": graph, "host_device_bytes_per_chunk": moved,
            "driver_overhead_ratio": float(np.median(steady) / np.median(graph[1:] or graph))}


def full_stream(model: WanModel, layout: list, capacity: int, compile: bool = False) -> Stream:
    """A stream whose every cache slot holds a frame (random K/V): the steady state at capacity M."""
    m = copy.copy(model)
    m.set_layout(layout)  # on the shallow copy: the caller's model keeps its own layout
    cfg = model.cfg.replace(max_frames=capacity)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    geo = geometry(cfg, layout, dtype=dtype)
    cross = to_numpy(torch.randn(cfg.num_layers, 2, 1, cfg.text_len, cfg.num_heads, cfg.head_dim,
                                 dtype=next(model.parameters()).dtype))
    stream = Stream(TorchRunner(m, compile=compile), geo, cross, 0, keep_latents=False)
    for group in stream.groups.values():
        group.data.normal_()
        group.frames[:] = np.arange(capacity * 10, capacity * 10 + group.capacity)
    stream.frame_index = capacity * 11
    return stream


def step_latency(model: WanModel, local_layers: list[int], capacity: int, reps: int, device: torch.device,
                 compile: bool = False) -> dict:
    """One pass of the chunk step, full layout vs ISPA layout, every slot valid; median of `reps`.
    With `compile`, the step runs through torch.compile (fixed shapes: one compile per layout)."""
    cfg = model.cfg
    window = cfg.chunk_frames
    ispa_layout = [Span(0, window) if i in local_layers else None for i in range(cfg.num_layers)]
    sync = Sync(device)
    times = {}
    x = np.random.default_rng(0).standard_normal((1, cfg.in_dim, cfg.chunk_frames, cfg.latent_height,
                                                  cfg.latent_width), dtype=np.float32)
    for label, layout in (("full", [None] * cfg.num_layers), ("ispa", ispa_layout)):
        stream = full_stream(model, layout, capacity, compile)
        feeds = stream.feeds(x, 500.0, 0)
        run = functools.partial(stream.runner.run, feeds)  # bound now: `stream` is deleted below
        t0 = time.perf_counter()
        for _ in range(2):
            run()
        sync()
        times[label + "_first_seconds"] = time.perf_counter() - t0
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            sync()
            samples.append(time.perf_counter() - t0)
        times[label] = float(np.median(samples))
        del stream
    flops = step_flops(cfg.replace(max_frames=capacity), ispa_layout, capacity)
    return {"capacity": capacity, "compiled": compile, "first_two_steps_seconds":
            {k: times.pop(k + "_first_seconds") for k in ("full", "ispa")}, "step_ms_full": 1e3 * times["full"], "step_ms_ispa": 1e3 * times["ispa"],
            "step_ratio": times["ispa"] / times["full"], "flop_ratio": flops["predicted_ratio"],
            "tflops_full": flops["full"] / times["full"] / 1e12, "tflops_ispa": flops["ispa"] / times["ispa"] / 1e12,
            "ispa_video_fps": 4 * cfg.chunk_frames / ((len(warped_timesteps()) + 1) * times["ispa"])}



def cuda_copy_check(device: torch.device) -> dict:
    """runtimes.buffers.CudaBuffers (the ONNX Runtime CUDA and TensorRT copy path, cuda-python) stores
    frames and moves layer-frames exactly as HostBuffers does with numpy."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    try:
        from runtimes.buffers import CudaBuffers
        cuda = CudaBuffers(device.index or 0)
    except ImportError as e:
        return {"skipped": f"cuda-python is not importable ({e})"}
    host = HostBuffers()
    rng = np.random.default_rng(0)
    shape, p = (3, 2, 1, 5 * 4, 2, 8), 4  # 3 layers, 5-frame ring, 4 tokens a frame
    new = rng.standard_normal((3, 2, 1, 2 * p, 2, 8)).astype(np.float16)
    init = rng.standard_normal(shape).astype(np.float16)
    src = torch.from_numpy(new).to(device)
    torch.cuda.synchronize(device)
    for b in (host, cuda):
        b.allocate("kv", shape, "float16")
        b.upload("kv", init)
        b.allocate("other", shape, "float16")
    host.store_frames("kv", new, new.shape, [3, 4], p)
    cuda.store_frames("kv", src, new.shape, [3, 4], p)
    for b in (host, cuda):
        b.copy_frame("other", 2, 1, "kv", 0, 4, p)
    same = all(np.array_equal(host.download(n), cuda.download(n)) for n in ("kv", "other"))
    cuda.close()
    return {"equal": bool(same), "d2d_bytes": cuda.traffic.d2d}


def parity(device: torch.device, chunks: int) -> dict:
    """The demo model's handoff stream continued on the device and on the CPU (fp32, TF32 off): max
    relative difference of the latents."""
    from ispa_export.demo import demo_context
    from ispa_export.models import load_model

    _, model = load_model("demo")
    stream, _, _ = transition(model, demo_context(), 0, IspaOptions())
    state = stream.state_arrays()
    cpu = stream.run(chunks)
    if device.type == "cpu":
        return {"chunks": chunks, "parity_max_rel": 0.0, "note": "device is the CPU"}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        on_dev = Stream(TorchRunner(copy.deepcopy(model).to(device)), copy.deepcopy(stream.geo),
                        state["cross_kv"], stream.seed)
        on_dev.load_state(state)
        dev = on_dev.run(chunks)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    f = stream.geo.chunk_frames
    scale = np.abs(cpu).max()
    # Free-running: a difference in one chunk's sample becomes the next chunk's history, so the
    # curve shows whether the two streams agree or drift apart chunk by chunk.
    curve = [float(np.abs(dev[:, :, i:i + f] - cpu[:, :, i:i + f]).max() / scale) for i in range(0, cpu.shape[2], f)]
    return {"chunks": chunks, "parity_max_rel": max(curve), "parity_per_chunk": curve}


def markdown(r: dict) -> str:
    lat = r["latency"]
    lines = [f"# gpu-check on {r['device']}", "",
             f"{r['model']} ({r['dtype']}, random weights), torch {r['versions']['torch']}", "",
             "| what | measured |", "|---|---|",
             f"| absorb memory plan (device / host) | {r['memory_plan']['device']:,} / {r['memory_plan']['host']:,} "
             f"bytes (statistics {r['memory_plan']['partial_dtype']} partials, totals "
             f"{r['memory_plan']['totals_device']}) |",
             f"| absorb warmup with the monitor of the L-layers ({r['warmup_chunks']} chunks) | "
             f"{r['warmup_seconds']:.2f} s |",
             f"| the same chunks without the monitor | {r['plain_warmup_seconds']:.2f} s "
             f"(monitor overhead {r['warmup_seconds'] / r['plain_warmup_seconds']:.2f}x) |",
             f"| solve + gates + cut, swap (the stall) | {r['solve_seconds']:.3f} s + {r['swap_seconds']:.3f} s = "
             f"{r['stall_seconds']:.3f} s |",
             f"| first engine chunk | {r['first_engine_chunk_seconds']:.3f} s |",
             f"| absorb peak device memory | {'n/a (CPU)' if r['absorb_peak_device_bytes'] is None else format(r['absorb_peak_device_bytes'], ',')} bytes |",
             f"| streaming chunk, median wall | {1e3 * np.median(r['chunk_seconds'][1:] or r['chunk_seconds']):.1f} ms |",
             f"| same, sum of its passes' graph times | "
             f"{1e3 * np.median(r['graph_seconds_per_chunk'][1:] or r['graph_seconds_per_chunk']):.1f} ms "
             f"(wall / graph {r['driver_overhead_ratio']:.3f}) |",
             f"| host-device bytes per steady chunk (h2d / d2h / d2d) | "
             f"{r['host_device_bytes_per_chunk'][-1]['h2d']:,} / {r['host_device_bytes_per_chunk'][-1]['d2h']:,} / "
             f"{r['host_device_bytes_per_chunk'][-1]['d2d']:,} |",
             f"| step at M = {lat['capacity']}, full / ISPA | {r['step_ms_full']:.1f} / {r['step_ms_ispa']:.1f} ms "
             f"(ratio {lat['step_ratio']:.3f}, FLOP ratio {r['flop_ratio']:.3f}) |",
             f"| achieved rate, full / ISPA | {r['tflops_full']:.0f} / {lat['tflops_ispa']:.0f} TFLOP/s |",
             f"| ISPA DiT streaming (4 steps + cache pass, 4 video frames a latent frame) | "
             f"{lat['ispa_video_fps']:.1f} video frames/s |",
             *([f"| torch.compile step, full / ISPA | {r['latency_compiled']['step_ms_full']:.1f} / "
                f"{r['latency_compiled']['step_ms_ispa']:.1f} ms (ratio {r['latency_compiled']['step_ratio']:.3f}; "
                f"{r['latency_compiled']['tflops_full']:.0f} / {r['latency_compiled']['tflops_ispa']:.0f} TFLOP/s; "
                f"{r['latency_compiled']['ispa_video_fps']:.1f} video frames/s) |"] if "latency_compiled" in r else []),
             f"| peak device memory | {'n/a (CPU)' if r['peak_device_bytes'] is None else format(r['peak_device_bytes'], ',')} bytes |",
             f"| CUDA copy path (cuda-python) vs numpy | {r['cuda_copy']} |",
             f"| device vs CPU stream, demo, {r['parity_chunks']} chunks, free-running | max rel "
             f"{r['parity_max_rel']:.2e} (first chunk {(r['parity_per_chunk'] or [0.0])[0]:.2e}) |",
             f"| total | {r['total_seconds']:.0f} s |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ispa_export.lab.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="wan2.1-t2v-1.3b")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--warmup-chunks", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--parity-chunks", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    p.add_argument("--out", default="artifacts/gpu_check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    result: dict = {"device": name, "model": args.model, "dtype": dtype_name,
                    "versions": {"torch": torch.__version__, "numpy": np.__version__, "cuda": torch.version.cuda}}
    log(f"{args.model} on {name}, {dtype_name}")
    warm, model, stream = absorb_check(args.model, device, dtype, args.warmup_chunks)
    result.update(warm)
    result.update(stream_chunks(model, stream, args.chunks, device))
    log(f"streamed {args.chunks} chunks: median {1e3 * np.median(result['chunk_seconds'][1:]):.1f} ms, "
        f"driver overhead x{result['driver_overhead_ratio']:.3f}")
    del stream
    lat = step_latency(model, warm["local_layers"], model.cfg.max_frames, args.reps, device)
    result["latency"] = lat
    result.update({k: lat[k] for k in ("step_ms_full", "step_ms_ispa", "flop_ratio", "tflops_full")})
    log(f"step at M = {lat['capacity']}: full {lat['step_ms_full']:.1f} ms, ISPA {lat['step_ms_ispa']:.1f} ms, "
        f"{lat['tflops_full']:.0f} TFLOP/s")
    result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    if args.compile:
        c = step_latency(model, warm["local_layers"], model.cfg.max_frames, args.reps, device, compile=True)
        result["latency_compiled"] = c
        log(f"compiled step at M = {c['capacity']}: full {c['step_ms_full']:.1f} ms, ISPA {c['step_ms_ispa']:.1f} ms, "
            f"{c['tflops_full']:.0f} TFLOP/s")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["cuda_copy"] = cuda_copy_check(device)
    par = parity(device, args.parity_chunks)
    result["parity_chunks"], result["parity_max_rel"] = par["chunks"], par["parity_max_rel"]
    result["parity_per_chunk"] = par.get("parity_per_chunk")
    result["total_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    write_json_atomic(out / "gpu_check.json", result)
    text = markdown(result)
    write_bytes_atomic(out / "gpu_check.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
