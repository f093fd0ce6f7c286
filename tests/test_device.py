"""Caches where the engine computes: fixed addresses, only the chunk's own K/V copied per step, bf16
caches, fp16/bf16 graphs, and no tensor made on the wrong device in the warmup, solve and bake."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from exports import export_transitioned
from ispa_export.builder.calibrate import IspaOptions, transition
from runtimes.artifact import load_artifact
from runtimes.buffers import HostBuffers, host_dtype
from runtimes.deployment import Deployment
from runtimes.driver import Stream
from runtimes.instance import load_instance
from runtimes.ort import OrtRunner
from runtimes.schedule import frame_rope

CFG = preset("tiny").replace(max_frames=8)


def baked(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = WanModel(CFG).eval().cast(dtype)
    ctx = torch.randn(1, 5, CFG.text_dim)
    opts = IspaOptions(kv_reduction=0.3, window=2, sink=1, warmup_chunks=6)
    stream, _, _ = transition(model, ctx, seed, opts)
    return model, stream


def chunk_kv_bytes(stream: Stream) -> int:
    """Bytes of one chunk's own K/V over every layer: what a steady-state step must copy, no more."""
    g = stream.geo
    item = host_dtype(g.dtype).itemsize
    return len(g.modes) * 2 * g.batch * g.chunk_frames * g.tokens_per_frame * g.heads * g.head_dim * item


def test_torch_caches_keep_their_addresses_and_copy_only_the_chunk():
    _, stream = baked()
    names = list(stream.groups) + ["cross_kv"]
    before = {n: stream.buffers.address(n) for n in names}
    for _ in range(10):
        t0 = stream.buffers.traffic.snapshot()
        stream.step()
        moved = stream.buffers.traffic.since(t0)
        assert moved.d2d == chunk_kv_bytes(stream)
        assert {n: stream.buffers.address(n) for n in names} == before


def test_ort_caches_are_bound_by_address_and_copy_only_the_chunk(tmp_path):
    model, stream = baked()
    d = tmp_path / "a"
    export_transitioned(d, model, stream)
    video = Deployment.open(d, "ort").start(d / "instance")  # keep_latents=False: frames stream out
    s = video.stream
    runner = s.runner
    names = ["kv_full", "kv_s1w2", "cross_kv", "new_kv_full", "new_kv_s1w2", "prediction"]
    # A baked deployment's per-video constants (overridable initializers) live in the runner's buffers too.
    refit = sorted(video.instance.constants)
    assert refit and set(refit) <= set(runner.engine.overridable)
    before = {n: runner.buffers.address(n) for n in names + refit}
    # The OrtValues bound to the caches wrap the same memory: the engine reads the ring in place.
    assert runner._ortvalue("kv_full").data_ptr() == before["kv_full"]
    for _ in range(10):
        t0 = runner.buffers.traffic.snapshot()
        video.step()
        assert runner.buffers.traffic.since(t0).d2d == chunk_kv_bytes(s)
        assert {n: runner.buffers.address(n) for n in names + refit} == before
    assert not s.latents


def test_bf16_caches_in_the_torch_backend():
    model32, stream32 = baked(torch.float32)
    model16, stream16 = baked(torch.bfloat16)
    assert all(g.data.dtype == torch.bfloat16 for g in stream16.groups.values())
    state = stream16.state_arrays()
    assert state["kv_full"].dtype.name == "bfloat16" and state["cross_kv"].dtype.name == "bfloat16"
    assert stream16.groups["kv_full"].nbytes * 2 == stream32.groups["kv_full"].nbytes
    # The handoff state round-trips bit for bit through safetensors and a new stream.
    again = Stream(type(stream16.runner)(model16), copy.deepcopy(stream16.geo), state["cross_kv"], stream16.seed)
    again.load_state(state)
    for k in ("kv_full", "kv_s1w2", "cross_kv"):
        assert np.array_equal(again.state_arrays()[k].view(np.uint16), state[k].view(np.uint16))
    a, b = stream16.run(3), stream32.run(3)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-2), ("bf16", 3e-2)])
def test_half_precision_exports_match_pytorch(tmp_path, dtype, tol):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model, stream = baked()
    d = tmp_path / dtype
    export_transitioned(d, model, stream, dtype=dtype)
    art = load_artifact(d)
    inst = load_instance(d / "instance", art)
    assert art.geometry.dtype == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    half = host_dtype(art.geometry.dtype)
    # The instance holds the caches, text K/V and this video's corrections (refit constants) in the graph's dtype.
    assert all(inst.state[k].dtype == half for k in ("kv_full", "kv_s1w2", "cross_kv", *inst.constants))
    feeds = stream.feeds(np.random.default_rng(0).standard_normal(stream.geo.chunk_shape, dtype=np.float32), 500.0, 0)
    feeds = {k: v for k, v in feeds.items() if k in art.inputs}
    feeds["latents"] = feeds["latents"].astype(half)
    feeds.update({k: inst.state[k] for k in ("kv_full", "kv_s1w2", "cross_kv")})
    ref_model = copy.deepcopy(model).cast(torch_dtype)
    args = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype.name == "bfloat16"
            else torch.from_numpy(np.require(v, requirements="C")) for k, v in feeds.items()}
    with torch.no_grad():
        want = ref_model(**args)[0].float().numpy()
    try:
        runner = OrtRunner(art.onnx_path)
        for k, v in inst.constants.items():  # bound over the graph's zero corrections, as a deployment does
            runner.buffers.allocate(k, v.shape, v.dtype.name)
            runner.buffers.upload(k, v)
        got = runner.run(feeds)["prediction"].astype(np.float32)
        engine = "onnxruntime"
    except Exception:  # onnxruntime's CPU provider has no kernels for some bf16 ops
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(onnx.load(str(art.onnx_path))).run(["prediction"], {**feeds, **inst.constants})[0]
        got = got.astype(np.float32)
        engine = "onnx.reference"
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, (engine, err)


def test_warmup_solve_and_bake_make_nothing_on_the_default_device():
    """With the default device set to 'meta', any tensor made without naming the model's device lands on
    meta and the CPU computation fails: the warmup, monitor, solve and bake must name it everywhere."""
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    ctx = torch.randn(1, 5, CFG.text_dim)
    opts = IspaOptions(kv_reduction=0.3, window=2, sink=1, warmup_chunks=6)
    torch.set_default_device("meta")
    try:
        stream, _, tr = transition(model, ctx, 0, opts)
        x = stream.step()
    finally:
        torch.set_default_device(None)
    assert tr.layers and np.isfinite(x).all()
    assert all(g.data.device.type == "cpu" for g in stream.groups.values())


def test_frame_rope_is_exact_far_past_the_old_table():
    pairs = CFG.head_dim // 2 - 2 * ((CFG.head_dim // 2) // 3)
    model = WanModel(CFG)
    for start in (0, 1022, 10**6, 10**9):
        got = frame_rope(start, 2, pairs)
        want = model.frame_rope(torch.arange(start, start + 2)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Frame 10^9 + 1 relative to 10^9 rotates exactly like frame 1 relative to frame 0.
    a, b = frame_rope(10**9, 2, pairs).astype(np.float64), frame_rope(0, 2, pairs).astype(np.float64)
    rel = lambda r: np.arctan2(r[1, 1] * r[0, 0] - r[0, 1] * r[1, 0], r[0, 1] * r[0, 0] + r[1, 1] * r[1, 0])  # noqa: E731
    np.testing.assert_allclose(rel(a), rel(b), atol=1e-5)


def test_host_buffers_frame_copies_match_slicing():
    buf = HostBuffers()
    rng = np.random.default_rng(0)
    shape, p = (3, 2, 1, 5 * 4, 2, 8), 4
    init = rng.standard_normal(shape).astype(np.float32)
    new = rng.standard_normal((3, 2, 1, 2 * p, 2, 8)).astype(np.float32)
    buf.allocate("kv", shape, "float32")
    buf.upload("kv", init)
    buf.store_frames("kv", new, new.shape, [4, 0], p)
    want = init.copy()
    want[:, :, :, 4 * p:5 * p] = new[:, :, :, :p]
    want[:, :, :, 0:p] = new[:, :, :, p:]
    assert np.array_equal(buf["kv"], want)
    buf.store_frames("kv", new, new.shape, [2, 3], p)  # consecutive slots: one copy of both frames
    want[:, :, :, 2 * p:4 * p] = new
    assert np.array_equal(buf["kv"], want)
    buf.allocate("other", shape, "float32")
    buf.copy_frame("other", 2, 1, "kv", 0, 4, p)
    assert np.array_equal(buf["other"][2, :, :, p:2 * p], want[0, :, :, 4 * p:5 * p])
    assert np.count_nonzero(buf["other"]) == np.count_nonzero(want[0, :, :, 4 * p:5 * p])


def test_a_span_search_that_cannot_fit_is_refused_before_the_warmup(monkeypatch):
    from ispa_export.errors import UserError
    from ispa_export.method import monitor
    from ispa_export.method.monitor import statistics_bytes

    # At Wan 1.3B the 8 candidate spans need ~131 GiB of float64 statistics, one span ~16 GiB.
    big = preset("wan2.1-t2v-1.3b")
    assert statistics_bytes(big.dim, big.num_layers, 8, 5, 1).total > 100 * 2**30 > 10 * 2**30 > \
        statistics_bytes(big.dim, big.num_layers, 1, 5, 1).total / 2
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    need = statistics_bytes(CFG.dim, CFG.num_layers, len(IspaOptions().spans(CFG)), 5, 1).total
    # The span search plans its memory (ispa_export.memory) from what method.monitor.available_bytes measures.
    monkeypatch.setattr(monitor, "available_bytes", lambda device: need // 2)
    with pytest.raises(UserError, match=r"^warmup monitor: \d+ candidate spans x 4 layers at dim 64: needs .* GiB "
                                        r".*; measure one span with --window W \[--sink S\]$"):
        transition(model, torch.randn(1, 5, CFG.text_dim), 0, IspaOptions(warmup_chunks=6))
