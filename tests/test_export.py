"""The exported graph equals the PyTorch model, step by step and over a whole stream, without torch.

Each export is a deployment (DIR: the graph traced once, zero corrections) and its instance (DIR/instance:
the transitioned video's caches and corrections), written by tests/exports.py from a model and stream
transitioned in process. ONNX Runtime runs the pair (runtimes.deployment); the PyTorch reference is the
transitioned model and its stream, continued in process."""
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

from exports import export_transitioned
from graphs.config import preset
from graphs.masks import retained
from graphs.wan import WanModel
from ispa_export.builder.calibrate import IspaOptions, bake, plan, report, transition
from ispa_export.kv import kv_bytes
from ispa_export.method.monitor import LocalSpan
from runtimes.artifact import ArtifactError, load_artifact
from runtimes.deployment import Deployment
from runtimes.instance import load_instance
from runtimes.manifest_schema import schema_violation

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


# Three cache groups: kv_full (layer 0), kv_s0w2 (layers 1 and 3), kv_s1w3 (layer 2).
MIXED = [None, LocalSpan(0, 2), LocalSpan(1, 3), LocalSpan(0, 2)]


def baked_mixed(seed=0):
    """The warmup and decision of `transition`, then the bake with MIXED in place of the policy's
    allocation (random weights give no control over what it picks): relayout from all-F into three
    groups, every L-layer corrected from its own span's statistics."""
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(max_frames=8)
    model = WanModel(cfg).eval()
    ctx = torch.randn(1, 5, cfg.text_dim)
    # stream_frames = M: the sink spans are candidates (monitored), so MIXED's s1w3 has statistics
    o = IspaOptions(kv_reduction=0.3, warmup_chunks=4, gate=False, calibrate=False, stream_frames=cfg.max_frames)
    stream, monitors, tr = plan(model, ctx, seed, o)
    before = stream.state_arrays()
    tr.spans = list(MIXED)
    tr.absorption = bake(model, stream, monitors, tr.spans, o)
    return model, stream, report(model, monitors, tr, o), before


@pytest.fixture(scope="module")
def tiny():
    return baked()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    model, stream, rep, before = baked_mixed()
    root = tmp_path_factory.mktemp("mixed")
    arts = {}
    for mod in ("baked", "input"):
        arts[mod] = root / mod
        export_transitioned(arts[mod], model, stream, rep, modulation=mod)
    return model, stream, rep, before, arts


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    model, stream, rep = tiny
    root = tmp_path_factory.mktemp("art")
    out = {}
    for mod in ("baked", "input"):
        out[mod] = root / mod
        export_transitioned(out[mod], model, stream, rep, modulation=mod)
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def start(d: Path):
    """The video of DIR/instance on DIR's graph, on ONNX Runtime (one session per deployment)."""
    return Deployment.open(d, "ort").start(d / "instance")


def one_step(d: Path, model: WanModel, stream, x: np.ndarray) -> tuple[dict, tuple]:
    """One pass of the chunk step from the handoff: ONNX Runtime (the deployment with its instance's
    caches and corrections bound) and PyTorch (the transitioned model on the in-process stream's state)."""
    video = start(d)
    feeds = video.stream.feeds(x, float(stream.geo.timesteps[0]), 0)
    got = {k: np.array(v, copy=True) for k, v in video.stream.runner.run(feeds).items()}
    state = stream.state_arrays()
    args = dict(feeds, cross_kv=state["cross_kv"], **{g: state[g] for g in stream.groups})
    args.pop("pass_kind", None)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(np.require(v, requirements="C")) for k, v in args.items()})
    return got, ref


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_one_step_parity(tiny, artifacts, modulation):
    model, stream, _ = tiny
    x = np.random.default_rng(0).standard_normal(stream.geo.chunk_shape, dtype=np.float32)
    ort_out, ref = one_step(artifacts[modulation], model, stream, x)
    names = ["prediction", "new_kv_full", "new_kv_s1w2"]
    assert list(ort_out) == names and len(ref) == len(names)
    for name, r in zip(names, ref):
        assert rel(ort_out[name], r.numpy()) < 1e-4, name


def test_one_step_parity_medium_config(tmp_path):
    model, stream, rep = baked(MEDIUM)
    export_transitioned(tmp_path / "m", model, stream, rep, preset="medium")
    x = np.random.default_rng(0).standard_normal(stream.geo.chunk_shape, dtype=np.float32)
    ort_out, ref = one_step(tmp_path / "m", model, stream, x)
    assert rel(ort_out["prediction"], ref[0].numpy()) < 1e-4


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_stream_from_handoff_equals_pytorch(tiny, artifacts, modulation):
    model, stream, _ = tiny
    video = start(artifacts[modulation])
    onnx_stream = video.stream
    torch_stream = copy.deepcopy(stream)
    chunks = 20  # 40 frames: the 8-frame full cache and the 3-frame local cache wrap many times
    a, b = onnx_stream.run(chunks), torch_stream.run(chunks)
    assert onnx_stream.frame_index > 4 * video.deployment.artifact.geometry.full_capacity
    assert rel(a, b) < 1e-4


def test_cache_inputs_have_the_accounted_sizes(tiny, artifacts):
    model, stream, rep = tiny
    man = json.loads((artifacts["baked"] / "manifest.json").read_text())
    inputs = {i["name"]: i for i in man["inputs"]}
    geo = man["geometry"]
    p = geo["tokens_per_frame"]
    assert inputs["kv_full"]["shape"][3] == geo["full_capacity"] * p
    assert inputs["kv_s1w2"]["shape"][3] == (1 + 2) * p
    acc = kv_bytes(model.cfg, model.layout)
    graph_bytes = sum(int(np.prod(inputs[k]["shape"])) * 4 for k in ("kv_full", "kv_s1w2"))
    assert graph_bytes == acc.total == rep["kv_bytes_after"] == sum(g.nbytes for g in stream.groups.values())
    assert rep["kv_reduction"] >= 0.3 and 0 < model.modes.count("L") < len(model.modes)


# -- several local spans: one cache group each ------------------------------------------------------

def test_mixed_export_lists_its_groups_and_accounts_their_bytes(mixed):
    model, stream, rep, _, arts = mixed
    man = json.loads((arts["baked"] / "manifest.json").read_text())
    assert schema_violation(man) is None and man["schema_version"] == 4
    assert [(c["name"], c["layers"], c["capacity_frames"], c["sink_frames"], c["window_frames"]) for c in man["caches"]] \
        == [("kv_full", [0], 8, 0, 8), ("kv_s0w2", [1, 3], 2, 0, 2), ("kv_s1w3", [2], 4, 1, 3)]
    assert [l["group"] for l in man["layers"]] == ["kv_full", "kv_s0w2", "kv_s1w3", "kv_s0w2"]
    names = [i["name"] for i in man["inputs"]]
    # One cache and one validity mask per group (their order in the graph is the trace's).
    assert sorted(n for n in names if n.startswith("kv_")) == ["kv_full", "kv_full_mask", "kv_s0w2", "kv_s0w2_mask",
                                                               "kv_s1w3", "kv_s1w3_mask"]
    assert [o["name"] for o in man["outputs"]] == ["prediction", "new_kv_full", "new_kv_s0w2", "new_kv_s1w3"]
    # The accounting is what the stream allocated, group by group and in total.
    held = {name: g.nbytes for name, g in stream.groups.items()}
    assert held == {c["name"]: c["bytes"] for c in man["caches"]}
    acc = kv_bytes(model.cfg, model.layout)
    assert acc.by_group() == held and acc.total == sum(held.values()) == man["kv_bytes"]["total"] \
        == rep["kv_bytes_after"]
    assert [l["span"] for l in rep["layers"]] == [None, {"sink": 0, "window": 2}, {"sink": 1, "window": 3},
                                                  {"sink": 0, "window": 2}]
    assert rep["span"] is None and [l["group"] for l in rep["layers"]] == [l["group"] for l in man["layers"]]
    assert len(man["refit_names"]) == 2 * 3  # W_o' and the absorbed bias of each L-layer
    assert sorted(man["refit_shapes"]) == sorted(man["refit_names"])


def test_relayout_keeps_each_layers_retained_frames(mixed):
    """At the transition every layer's frames move from the all-F cache into its group, bit for bit,
    and only those its span retains."""
    _, stream, _, before, _ = mixed
    after = stream.state_arrays()
    p, t = stream.geo.tokens_per_frame, int(before["frame_index"])
    assert int(after["frame_index"]) == t  # the fixture's stream is copied, never stepped, by the tests
    full_frames = before["kv_full_frames"].tolist()
    for name, group in stream.groups.items():
        kept = sorted(f for f in full_frames if f >= 0 and retained(f, t, group.capacity, group.sink))
        assert sorted(f for f in group.frames.tolist() if f >= 0) == kept, name
        data = after[name]
        for pos, layer in enumerate(group.layers):
            for slot, frame in enumerate(group.frames.tolist()):
                if frame < 0:
                    continue
                src = full_frames.index(frame)
                np.testing.assert_array_equal(data[pos, :, :, slot * p:(slot + 1) * p],
                                              before["kv_full"][layer, :, :, src * p:(src + 1) * p])
    assert sorted(stream.groups["kv_s1w3"].frames) == [0, t - 3, t - 2, t - 1]  # the sink frame and the window
    assert sorted(stream.groups["kv_s0w2"].frames) == [t - 2, t - 1]


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_mixed_stream_on_ort_equals_pytorch_chunk_by_chunk(mixed, modulation):
    model, stream, _, _, arts = mixed
    video = start(arts[modulation])
    assert [g.name for g in video.deployment.artifact.geometry.groups] == ["kv_full", "kv_s0w2", "kv_s1w3"]
    onnx_stream = video.stream
    ref = copy.deepcopy(stream)
    start_frame = ref.frame_index
    for _ in range(10):  # 20 frames: the largest ring (8 frames) wraps twice, the others more often
        assert rel(video.step(), ref.step()) < 1e-4
    a, b = onnx_stream.state_arrays(), ref.state_arrays()
    for name, g in ref.groups.items():
        assert onnx_stream.frame_index - start_frame > 2 * (g.capacity - g.sink), name
        assert np.array_equal(a[name + "_frames"], b[name + "_frames"]), name
        assert rel(a[name], b[name]) < 1e-4, name


def test_mixed_artifact_runs_on_torch_and_ort_alike(mixed, tmp_path):
    """`ispa run` of the deployment's own instance on PyTorch (the deployment's weights, the video's
    corrections as per-step inputs) and on ONNX Runtime (the graph, the corrections bound)."""
    from ispa_export import cli

    _, stream, _, _, arts = mixed
    for backend in ("torch", "ort"):
        device = ["--device", "cpu"] if backend == "torch" else []
        assert cli.main(["run", str(arts["baked"]), "--backend", backend, "--chunks", "3", *device,
                         "--out", str(tmp_path / backend)]) == 0
    a, b = (np.load(tmp_path / k / "frames.npy") for k in ("torch", "ort"))
    assert a.shape == b.shape and rel(a, b) < 1e-4
    # Both continue the transitioned stream itself (its warmup frames first).
    want = copy.deepcopy(stream).run(3)
    assert rel(b[:, :, -want.shape[2]:], want) < 1e-4


def test_refit_names_are_onnx_initializers(artifacts):
    """A baked graph's per-video constants are named initializers (a TensorRT refit sets them by name)
    that are also graph inputs (ONNX Runtime binds each video's values over them); the manifest's
    `inputs` lists only true inputs, and each instance holds exactly these tensors."""
    import onnx
    man = json.loads((artifacts["baked"] / "manifest.json").read_text())
    graph = onnx.load(str(artifacts["baked"] / "model.onnx")).graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    assert man["refit_names"] and set(man["refit_names"]) <= set(inits)
    assert set(man["refit_names"]) <= {i.name for i in graph.input}
    assert not set(man["refit_names"]) & {i["name"] for i in man["inputs"]}
    assert {n: inits[n] for n in man["refit_names"]} == {n: tuple(s) for n, s in man["refit_shapes"].items()}
    art = load_artifact(artifacts["baked"])
    assert sorted(load_instance(artifacts["baked"] / "instance", art).constants) == sorted(man["refit_names"])
    # modulation "input": no refit constants, W_o' and b_o' are graph inputs.
    man = json.loads((artifacts["input"] / "manifest.json").read_text())
    assert man["refit_names"] == [] and {"ispa_weight", "ispa_bias"} <= {i["name"] for i in man["inputs"]}


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
        man["caches"][0]["capacity_frames"] += 1
        (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="capacity_frames"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, edit))


def test_missing_instance_state_is_refused(artifacts, tmp_path):
    d = corrupt(artifacts["baked"], tmp_path, lambda d: (d / "instance" / "instance.safetensors").unlink())
    art = load_artifact(d)  # a deployment holds no video: it loads without one
    with pytest.raises(ArtifactError, match=r"instance\.safetensors: expected the file listed in instance\.json"):
        load_instance(d / "instance", art)


def test_checksum_mismatch_is_refused(artifacts, tmp_path):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[10] ^= 1
        path.write_bytes(bytes(data))
    d = corrupt(artifacts["baked"], tmp_path, lambda d: flip(d / "instance" / "report.json"))
    with pytest.raises(ArtifactError, match=r"report\.json: sha256: expected"):
        load_instance(d / "instance", load_artifact(d))
    shutil.rmtree(d)
    with pytest.raises(ArtifactError, match=r"torch_model\.safetensors: sha256: expected"):
        load_artifact(corrupt(artifacts["baked"], tmp_path, lambda d: flip(d / "torch_model.safetensors")))


def test_failed_export_leaves_the_old_artifact(tiny, artifacts, tmp_path, monkeypatch):
    """A failure while the graph is being written (here: the trace, after part of model.onnx is out)
    leaves the previous deployment and instance as they were, and nothing beside them."""
    import ispa_export.builder.export as export_mod

    model, stream, rep = tiny
    dst = tmp_path / "keep"
    shutil.copytree(artifacts["baked"], dst)
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}

    def broken(model, feeds, path, refit):
        path.write_bytes(b"half a graph")
        raise RuntimeError("the trace failed")

    monkeypatch.setattr(export_mod, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="the trace failed"):
        export_transitioned(dst, model, stream, rep)
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    load_instance(dst / "instance", load_artifact(dst))


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
    art = load_artifact(artifacts["baked"])
    warmup = load_instance(artifacts["baked"] / "instance", art).state["latents"]
    assert frames.shape[2] == warmup.shape[2] + 3 * art.geometry.chunk_frames


def test_large_graphs_keep_weights_in_external_data(tiny, artifacts, tmp_path, monkeypatch):
    """Past protobuf's 2 GiB limit the weights go to model.onnx.data; everything downstream follows,
    the per-video constants bound over externally stored initializers included."""
    import ispa_export.builder.export as export
    from runtimes.run import main

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)
    model, stream, rep = tiny
    export_transitioned(tmp_path / "ext", model, stream, rep)
    man = json.loads((tmp_path / "ext" / "manifest.json").read_text())
    assert "model.onnx.data" in man["files"]
    inline = (artifacts["baked"] / "model.onnx").stat().st_size
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < inline / 2
    assert main([str(tmp_path / "ext"), "--chunks", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    frames = np.load(tmp_path / "run" / "frames.npy")
    want = copy.deepcopy(stream).run(2)
    assert rel(frames[:, :, -want.shape[2]:], want) < 1e-4


def test_inspect_artifact_shows_each_layers_span(tiny, artifacts):
    from ispa_export.inspect import inspect

    model, stream, rep = tiny
    info = inspect(str(artifacts["baked"]), 0.5, None, 0, "fp32")
    span = {"sink": 1, "window": 2}
    assert info["spans"] == [span if m == "L" else None for m in model.modes]
    assert info["spans"] == [l["span"] for l in rep["layers"]]
    line = next(t for t in info["text"] if t.strip().startswith("layer spans:"))
    assert all(f"{i}:L(sink 1 + window 2)->kv_s1w2" in line for i in rep["selected_layers"])


def test_inspect_artifact_shows_each_layers_group(mixed):
    from ispa_export.inspect import inspect

    _, _, _, _, arts = mixed
    info = inspect(str(arts["baked"]), 0.5, None, 0, "fp32")
    assert info["layer_groups"] == ["kv_full", "kv_s0w2", "kv_s1w3", "kv_s0w2"]
    assert [(g["name"], g["layers"]) for g in info["groups"]] == [("kv_full", [0]), ("kv_s0w2", [1, 3]),
                                                                 ("kv_s1w3", [2])]
    assert sum(g["bytes"] for g in info["groups"]) == info["kv_bytes_ispa"]
    line = next(t for t in info["text"] if t.strip().startswith("layer spans:"))
    assert line.split(": ", 1)[1] == "0:F->kv_full 1:L(sink 0 + window 2)->kv_s0w2 2:L(sink 1 + window 3)->kv_s1w3 " \
                                     "3:L(sink 0 + window 2)->kv_s0w2"


def test_mixed_artifact_passes_golden_verify(mixed, capsys):
    from ispa_export.builder.verify import verify

    _, _, _, _, arts = mixed
    assert verify(arts["baked"]) == 0
    out = capsys.readouterr().out
    for name in ("prediction", "new_kv_full", "new_kv_s0w2", "new_kv_s1w3"):
        line = next(l for l in out.splitlines() if l.startswith("onnxrt") and f" {name} " in l)
        assert line.endswith("pass"), line


def test_mixed_graph_passes_the_tensorrt_checks(mixed):
    """Every op and dtype of the three-group graph is in TensorRT's ONNX support, refit names included
    (the build itself needs TensorRT: tests/test_verify.py)."""
    from ispa_export.builder.engine import check_artifact

    _, _, _, _, arts = mixed
    assert check_artifact(arts["baked"]) == []
