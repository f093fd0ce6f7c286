"""`ispa bench --quick` end to end (about a minute), plus the analytic parts of the bench.

Timings depend on the machine and on what else runs on it: they are never compared to thresholds. What
is asserted: every section is there, the exact byte counts (against the allocated buffers and a
hand count), and that every ratio is a positive finite number.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.cli import main
from ispa_export.kv import kv_bytes
from ispa_export.flops import step_flops
from ispa_export.lab import bench
from ispa_export.video.torch_runner import torch_stream
from runtimes.groups import Span


def _ratios(obj):
    """Every dict stored under a key 'ratio', anywhere in the result."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "ratio":
                yield v
            yield from _ratios(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _ratios(v)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_has_every_section(quick):
    out, res = quick
    assert res["mode"] == "quick"
    for key in ("machine", "kv", "growth", "latency", "ort_vs_torch", "skipped", "transition", "export", "plots"):
        assert key in res, key
    for key in ("cpu", "cores", "threads", "torch", "onnxruntime", "load_average_start", "load_average_end"):
        assert key in res["machine"], key
    backends = {r["backend"] for r in res["latency"]}
    assert {"torch-cpu", "ort-cpu"} <= backends
    assert {r["capacity"] for r in res["latency"] if r["backend"] == "torch-cpu"} == {6, 12, 24}
    assert any(r["history"] < r["capacity"] for r in res["latency"])  # the history sweep at fixed M
    assert [s["D"] for s in res["transition"]["solve"]] == [1536]
    assert res["transition"]["monitor"]["monitored_chunks"] >= 1
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "BENCHMARKS.md").read_text()
    assert "ispa bench --quick" in md and res["machine"]["cpu"] in md and "| config |" in md


def test_quick_ratios_are_positive_and_finite(quick):
    _, res = quick
    ratios = list(_ratios(res))
    assert len(ratios) >= len(res["latency"]) + len(res["ort_vs_torch"]) + 1
    for r in ratios:
        for k in ("median", "q1", "q3"):
            assert math.isfinite(r[k]) and r[k] > 0, r
    for row in res["latency"]:
        assert row["full"]["median"] > 0 and row["ispa"]["median"] > 0
        assert 0 < row["flops"]["predicted_ratio"] < 1


def test_quick_bytes_are_exact(quick):
    out, res = quick
    checks = res["kv"]["crosscheck"]
    assert checks and all(c["equal"] and c["allocated"] == c["kv_bytes"] for c in checks)
    # Hand count for Wan2.1 1.3B: 30 layers, 1560 tokens x 1536 channels per frame, K and V, 21 frames for
    # an F-layer, sink 1 + window 3 for the 19 L-layers that 50% needs.
    frame = 2 * 1560 * 1536
    row = next(r for r in res["kv"]["rows"] if r["config"] == "wan2.1-t2v-1.3b" and r["dtype"] == "float32")
    assert row["full_bytes"] == 30 * 21 * frame * 4
    assert row["ispa_bytes"] == (11 * 21 + 19 * 4) * frame * 4
    g = res["growth"]
    assert g["full"][-1] == g["allocated_full"] and g["ispa_latest"][-1] == g["allocated_ispa"] == row["ispa_bytes"]
    files = res["export"]["files"]
    assert {"model.onnx", "manifest.json", "instance/instance.safetensors", "instance/report.json"} <= set(files)
    for name, size in files.items():
        assert (out / "artifact-demo" / name).stat().st_size == size


def test_real_transition_is_inside_the_predicted_range(quick):
    _, res = quick
    cfg = preset(res["export"]["config"])
    span = bench.transition_frames(cfg)
    assert span["earliest"] <= res["export"]["transition_chunk"] * cfg.chunk_frames <= span["latest"]


@pytest.mark.parametrize("layout", ["bench", [None, Span(0, 2), Span(1, 3), Span(0, 2)]])
def test_stream_buffers_equal_kv_bytes(layout):
    cfg = preset("tiny")
    model = WanModel(cfg)
    layout = bench.ispa_layout(cfg, 0.25) if layout == "bench" else layout
    model.set_layout(layout)
    stream = torch_stream(model, torch.zeros(1, 2, cfg.text_dim), 0)
    held = {n: g.nbytes for n, g in stream.groups.items()}
    acc = kv_bytes(cfg, layout)
    assert sum(held.values()) == acc.total and held == acc.by_group()
    assert bench.crosscheck(cfg, layout, "float32")["allocated"] == acc.total


def test_step_flops_attention_difference():
    cfg = preset("demo")
    layout = bench.ispa_layout(cfg)
    flops = step_flops(cfg, layout, cfg.max_frames)
    q, p = cfg.chunk_frames * cfg.tokens_per_frame, cfg.tokens_per_frame
    saved_frames = cfg.max_frames - (cfg.chunk_frames + bench.SINK)
    assert flops["full"] - flops["ispa"] == bench.n_local(layout) * 4 * q * saved_frames * p * cfg.dim
    assert step_flops(cfg, [None] * cfg.num_layers, cfg.max_frames)["predicted_ratio"] == 1
    two = step_flops(cfg, [Span(0, 2), Span(1, 3)] + [None] * (cfg.num_layers - 2), cfg.max_frames)
    assert flops["full"] - two["ispa"] == 4 * q * ((cfg.max_frames - 2) + (cfg.max_frames - 4)) * p * cfg.dim


def test_paired_ratio_pairs_by_repetition():
    calls = []
    times = bench.paired({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # order rotates each repetition
    r = bench.pair_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert r["median"] == 2.0 and np.isclose(r["q3"], 2.5)
    assert len(times["a"]) == len(times["b"]) == 4
