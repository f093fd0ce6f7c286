"""The exported graph equals the PyTorch model, step by step and over a whole stream, without torch."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.export import graph_feeds, write_artifact
from ispa_export.ispa import IspaOptions, report, transition
from ispa_export.kv import kv_bytes
from runtimes.artifact import ArtifactError, load_artifact
from runtimes.driver import Stream
from runtimes.ort import OrtRunner

ROOT = Path(__file__).resolve().parents[1]
MEDIUM = dict(dim=128, num_heads=4, ffn_dim=256, num_layers=4, latent_height=8, latent_width=8, max_frames=8)


def baked(cfg_changes=None, seed=0, **opts):
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(**({"max_frames": 8} | (cfg_changes or {})))
    model = WanModel(cfg).eval()
    ctx = torch.randn(1, 5, cfg.text_dim)
    # gate off: every L-layer carries a correction, which is what the export must carry (on random
    # weights the gate would often keep it out)
    o = IspaOptions(**({"kv_reduction": 0.3, "window": 2, "sink": 1, "warmup_chunks": 6, "gate": False} | opts))
    stream, monitor, tr = transition(model, ctx, seed, o)
    return model, stream, report(model, monitor, tr, o)


@pytest.fixture(scope="module")
def tiny():
    return baked()


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    model, stream, rep = tiny
    root = tmp_path_factory.mktemp("art")
    out = {}
    for mod in ("baked", "input"):
        out[mod] = root / mod
        write_artifact(out[mod], model, stream, rep, preset="tiny", modulation=mod, progress=lambda s: None)
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_one_step_parity(tiny, artifacts, modulation):
    model, stream, _ = tiny
    feeds = graph_feeds(stream, stream.state_arrays(), model, modulation, np.float32)
    feeds["latents"] = np.random.default_rng(0).standard_normal(feeds["latents"].shape, dtype=np.float32)
    ort_out = OrtRunner(artifacts[modulation] / "model.onnx").run(feeds)
    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if modulation == "input":
        args["ispa_weight"], args["ispa_bias"] = args.pop("ispa_weight"), args.pop("ispa_bias")
    with torch.no_grad():
        ref = model(**args)
    for name, r in zip(["prediction", "new_kv_full", "new_kv_local"], ref):
        if r is not None:
            assert rel(ort_out[name], r.numpy()) < 1e-4, name


def test_one_step_parity_medium_config(tmp_path):
    model, stream, rep = baked(MEDIUM)
    write_artifact(tmp_path / "m", model, stream, rep, preset="medium", progress=lambda s: None)
    feeds = graph_feeds(stream, stream.state_arrays(), model, "baked", np.float32)
    ort_out = OrtRunner(tmp_path / "m" / "model.onnx").run(feeds)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert rel(ort_out["prediction"], ref[0].numpy()) < 1e-4


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_stream_from_handoff_equals_pytorch(tiny, artifacts, modulation):
    model, stream, _ = tiny
    art = load_artifact(artifacts[modulation])
    onnx_stream = Stream(OrtRunner(art.onnx_path), art.geometry, art.cross_kv, art.seed, art.constants)
    onnx_stream.load_state(art.state)
    torch_stream = copy.deepcopy(stream)
    chunks = 20  # 40 frames: the 8-frame full cache and the 3-frame local cache wrap many times
    a, b = onnx_stream.run(chunks), torch_stream.run(chunks)
    assert onnx_stream.frame_index > 4 * art.geometry.full_capacity
    assert rel(a, b) < 1e-4


def test_cache_inputs_have_the_accounted_sizes(tiny, artifacts):
    model, stream, rep = tiny
    man = json.loads((artifacts["baked"] / "manifest.json").read_text())
    inputs = {i["name"]: i for i in man["inputs"]}
    geo = man["geometry"]
    p = geo["tokens_per_frame"]
    assert inputs["kv_full"]["shape"][3] == geo["full_capacity"] * p
    assert inputs["kv_local"]["shape"][3] == (geo["local_sink"] + 2) * p
    acc = kv_bytes(model.cfg, model.modes, window=2, sink=1)
    graph_bytes = sum(int(np.prod(inputs[k]["shape"])) * 4 for k in ("kv_full", "kv_local"))
    assert graph_bytes == acc.total == rep["kv_bytes_after"]
    assert rep["kv_reduction"] >= 0.3 and 0 < model.modes.count("L") < len(model.modes)


def test_refit_names_are_onnx_initializers(artifacts):
    import onnx
    man = json.loads((artifacts["baked"] / "manifest.json").read_text())
    inits = {i.name for i in onnx.load(str(artifacts["baked"] / "model.onnx")).graph.initializer}
    assert man["refit_names"] and set(man["refit_names"]) <= inits


def corrupt(src, tmp_path, edit):
    dst = tmp_path / "a"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_truncated_onnx_is_refused(artifacts, tmp_path):
    def cut(d):
        data = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.onnx"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, cut))


def test_wrong_cache_size_in_manifest_is_refused(artifacts, tmp_path):
    def edit(d):
        man = json.loads((d / "manifest.json").read_text())
        man["caches"]["full"]["capacity_frames"] += 1
        (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="capacity_frames"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, edit))


def test_missing_state_is_refused(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="state.safetensors"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, lambda d: (d / "state.safetensors").unlink()))


def test_checksum_mismatch_is_refused(artifacts, tmp_path):
    def flip(d):
        data = bytearray((d / "report.json").read_bytes())
        data[10] ^= 1
        (d / "report.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, flip))


def test_failed_export_leaves_the_old_artifact(tiny, artifacts, tmp_path):
    model, stream, rep = tiny
    dst = tmp_path / "keep"
    shutil.copytree(artifacts["baked"], dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(Exception):
        write_artifact(dst, model, stream, rep, preset="tiny", dtype="int8", progress=lambda s: None)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    load_artifact(dst)


def test_runtime_streams_without_torch(artifacts, tmp_path):
    """The deployment side runs the artifact in a process where importing torch fails."""
    block = tmp_path / "block"
    block.mkdir()
    for name in ("torch", "ispa_export", "graphs"):
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is not available on this edge box')\n")
    env = dict(os.environ, PYTHONPATH=f"{block}{os.pathsep}{ROOT}")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "runtimes", str(artifacts["baked"]), "--chunks", "3",
                          "--out", str(out), "--quiet"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    frames = np.load(out / "frames.npy")
    assert frames.shape[2] == load_artifact(artifacts["baked"]).state["latents"].shape[2] + 3 * 2


def test_large_graphs_keep_weights_in_external_data(tiny, artifacts, tmp_path, monkeypatch):
    """Past protobuf's 2 GiB limit the weights go to model.onnx.data; everything downstream follows."""
    import ispa_export.export as export
    from runtimes.run import main

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)
    model, stream, rep = tiny
    write_artifact(tmp_path / "ext", model, stream, rep, preset="tiny", progress=lambda s: None)
    man = json.loads((tmp_path / "ext" / "manifest.json").read_text())
    assert "model.onnx.data" in man["files"]
    inline = (artifacts["baked"] / "model.onnx").stat().st_size
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < inline / 2
    assert main([str(tmp_path / "ext"), "--chunks", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0


def test_inspect_artifact_shows_each_layers_span(tiny, artifacts):
    from ispa_export.pipeline import inspect

    model, stream, rep = tiny
    info = inspect(str(artifacts["baked"]), 0.5, None, 0, "fp32")
    span = {"sink": stream.geo.local_sink, "window": stream.geo.local_capacity - stream.geo.local_sink}
    assert info["spans"] == [span if m == "L" else None for m in model.modes]
    assert info["spans"] == [l["span"] for l in rep["layers"]]
    line = next(t for t in info["text"] if t.strip().startswith("layer spans:"))
    assert all(f"{i}:L(sink {span['sink']} + window {span['window']})" in line for i in rep["selected_layers"])
