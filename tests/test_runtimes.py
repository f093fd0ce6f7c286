"""The deployment runtime: artifact validation, atomic writes, the ONNX Runtime runner, the CLI, torch-freedom.

The artifacts here hold a real handoff state (the tiny model's stream, run in PyTorch) and a small
hand-made ONNX graph with the same I/O contract: its arithmetic is not the transformer's, but it
reads every input (caches through their masks) so the driver's ring buffers, the IO binding and the
CLI are checked end to end against a numpy implementation of the same graph. End-to-end parity
with the exported transformer is tested with the exporter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.video.torch_runner import torch_stream
from runtimes import files as rfiles
from runtimes.artifact import ArtifactError, cache_records, layer_records, load_artifact
from runtimes.buffers import HostBuffers
from runtimes.driver import Geometry, Stream
from runtimes.groups import Span
from runtimes.files import atomic_directory, file_records, sha256_file, write_json_atomic
from runtimes.ort import OrtRunner
from runtimes.run import main, make_runner, preview_frames

ROOT = Path(__file__).resolve().parents[1]
NP_TO_ONNX = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
              "bool": TensorProto.BOOL}


# -- the toy graph: same I/O contract as the exported chunk step ------------------------------------

def io_specs(geo: Geometry, cross_shape, modulation: str, ispa_shapes=None):
    b, f, p = geo.batch, geo.chunk_frames, geo.tokens_per_frame
    ins = [("latents", list(geo.chunk_shape), geo.dtype), ("timestep", [b], "float32"),
           ("rope_frame", [2, f, geo.rope_pairs], "float32"), ("cross_kv", list(cross_shape), geo.dtype)]
    outs = [("prediction", list(geo.chunk_shape), "float32")]
    for g in geo.groups:
        n = len(g.layers)
        ins += [(g.name, [n, 2, b, g.capacity * p, geo.heads, geo.head_dim], geo.dtype),
                (g.name + "_mask", [g.capacity], "bool")]
        outs.append(("new_" + g.name, [n, 2, b, f * p, geo.heads, geo.head_dim], geo.dtype))
    if modulation == "input":
        ins += [("ispa_weight", list(ispa_shapes[0]), geo.dtype), ("ispa_bias", list(ispa_shapes[1]), geo.dtype)]
    return ins, outs


def toy_onnx(path: Path, ins, outs, geo: Geometry, override: dict | None = None) -> None:
    """prediction = latents/2 + timestep/1000 + mean(rope_frame)/100 + mean(masked caches) + mean(constants);
    new K/V = mean(latents) + mean(rope_frame), broadcast. `override` changes a declared I/O shape."""
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    names = {n for n, _, _ in ins}
    fi = node("ReduceMean", ["rope_frame"], "fi", keepdims=0)
    ts = node("Reshape", ["timestep", const("ts_shape", [geo.batch, 1, 1, 1, 1], np.int64)], "ts")
    terms = [node("Mul", ["latents", const("half", 0.5)], "a"),
             node("Mul", [ts, const("milli", 1e-3)], "ts_s"),
             node("Mul", [fi, const("centi", 1e-2)], "fi_s"),
             node("ReduceMean", ["cross_kv"], "cx", keepdims=0)]
    for g in geo.groups:
        name, cap, n = g.name, g.capacity, len(g.layers)
        r = node("Reshape", [name, const(name + "_s", [n, 2, geo.batch, cap, -1], np.int64)], name + "_r")
        mf = node("Cast", [name + "_mask"], name + "_mf", to=TensorProto.FLOAT)
        mr = node("Reshape", [mf, const(name + "_ms", [1, 1, 1, cap, 1], np.int64)], name + "_mr")
        terms.append(node("ReduceMean", [node("Mul", [r, mr], name + "_x")], name + "_mean", keepdims=0))
    for name in ("ispa_weight", "ispa_bias"):
        if name in names:
            terms.append(node("ReduceMean", [name], name + "_mean", keepdims=0))
    acc = terms[0]
    for i, t in enumerate(terms[1:]):
        acc = node("Add", [acc, t], f"acc{i}")
    nodes[-1].output[0] = "prediction"
    v = node("Add", [node("ReduceMean", ["latents"], "lm", keepdims=0), fi], "v")
    for name, shape, _ in outs:
        if name != "prediction":
            node("Expand", [v, const(name + "_shape", shape, np.int64)], name)
    override = override or {}
    vi = lambda n, s, d: helper.make_tensor_value_info(n, NP_TO_ONNX[d], override.get(n, s))  # noqa: E731
    graph = helper.make_graph(nodes, "toy", [vi(*x) for x in ins], [vi(*x) for x in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class NumpyToy:
    """The toy graph in numpy: the reference for the ONNX Runtime runs (host buffers, like the CPU engine)."""

    def __init__(self, ins, outs, geo):
        self.input_names = [n for n, _, _ in ins]
        self.outs = outs
        self.geo = geo
        self.buffers = HostBuffers()

    def run(self, feeds, info=None):
        feeds = {n: feeds[n] if n in feeds else self.buffers[n] for n in self.input_names}
        g = self.geo
        fi = np.float32(feeds["rope_frame"].mean(dtype=np.float32))
        pred = (feeds["latents"] * np.float32(0.5) + feeds["timestep"].reshape(-1, 1, 1, 1, 1) * np.float32(1e-3)
                + fi * np.float32(1e-2) + feeds["cross_kv"].mean(dtype=np.float64))
        for group in g.groups:
            name, cap = group.name, group.capacity
            kv = feeds[name].reshape(feeds[name].shape[:3] + (cap, -1))
            pred = pred + (kv * feeds[name + "_mask"].reshape(1, 1, 1, cap, 1)).mean(dtype=np.float64)
        for name in ("ispa_weight", "ispa_bias"):
            if name in feeds:
                pred = pred + feeds[name].mean(dtype=np.float64)
        v = np.float32(feeds["latents"].mean(dtype=np.float64) + fi)
        out = {"prediction": pred.astype(np.float32)}
        for name, shape, _ in self.outs:
            if name != "prediction":
                out[name] = np.full(shape, v, np.float32)
        return out


# -- artifacts ----------------------------------------------------------------------------------

# Three cache groups: kv_full (layer 0), kv_s0w2 (layers 1 and 3), kv_s1w3 (layer 2).
MIXED = [None, Span(0, 2), Span(1, 3), Span(0, 2)]


def tiny_stream(layout, chunks=4, seed=7) -> Stream:
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = WanModel(cfg).eval()
    model.set_layout(layout)
    stream = torch_stream(model, torch.randn(1, 5, cfg.text_dim), seed)
    stream.run(chunks)
    return stream


@pytest.fixture(scope="module")
def streams():
    return {"mixed": tiny_stream(MIXED), "F": tiny_stream([None] * 4, chunks=2)}


def write_artifact(directory: Path, stream: Stream, modulation: str = "baked"):
    geo = stream.geo
    state = dict(stream.state_arrays())
    ispa_shapes = None
    if modulation == "input":
        n_l, dim = geo.modes.count("L"), geo.heads * geo.head_dim
        rng = np.random.default_rng(0)
        state["ispa_weight"] = rng.standard_normal((n_l, dim, dim), dtype=np.float32)
        state["ispa_bias"] = rng.standard_normal((n_l, dim), dtype=np.float32)
        ispa_shapes = (state["ispa_weight"].shape, state["ispa_bias"].shape)
    ins, outs = io_specs(geo, state["cross_kv"].shape, modulation, ispa_shapes)
    with atomic_directory(directory) as tmp:
        toy_onnx(tmp / "model.onnx", ins, outs, geo)
        save_file(state, str(tmp / "state.safetensors"))
        write_json_atomic(tmp / "report.json", {"note": "test fixture"})
        manifest = {
            "schema_version": 3, "format": "ispa-export",
            "positions": {"scheme": "absolute-rope-input", "input": "rope_frame"},
            "model": {"preset": "tiny", "config": preset("tiny").to_dict()},
            "layers": layer_records(geo), "geometry": geo.to_dict(), "caches": cache_records(geo),
            "modulation": modulation,
            "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in ins],
            "outputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in outs],
            "files": file_records(tmp), "absorption": {}, "refit_names": [], "versions": {},
            "seed": stream.seed,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return ins, outs


@pytest.fixture
def art(tmp_path, streams):
    d = tmp_path / "art"
    ins, outs = write_artifact(d, streams["mixed"])
    return d, ins, outs


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def refresh_record(d: Path, name: str) -> None:
    edit_manifest(d, lambda m: m["files"].__setitem__(name, rfiles.file_record(d / name)))


def refusal(d: Path, **kw) -> str:
    with pytest.raises(ArtifactError) as e:
        load_artifact(d, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- loading --------------------------------------------------------------------------------------

def test_load_artifact_round_trip(art, streams):
    d, ins, outs = art
    a = load_artifact(d)
    s = streams["mixed"]
    assert a.geometry == s.geo and a.geometry.layout == MIXED
    assert set(a.inputs) == {n for n, _, _ in ins} and set(a.outputs) == {n for n, _, _ in outs}
    for k, v in s.state_arrays().items():
        assert np.array_equal(a.state[k], v), k
    assert a.seed == 7 and a.constants == {} and a.engine_path() is None
    assert set(a.paths) == {"model.onnx", "state.safetensors", "report.json", "manifest.json"}


def test_the_manifest_lists_one_group_per_distinct_span(art):
    d, ins, outs = art
    m = json.loads((d / "manifest.json").read_text())
    p = 6  # tokens per frame of the tiny preset
    assert [(c["name"], c["layers"], c["capacity_frames"], c["sink_frames"], c["window_frames"]) for c in m["caches"]] \
        == [("kv_full", [0], 8, 0, 8), ("kv_s0w2", [1, 3], 2, 0, 2), ("kv_s1w3", [2], 4, 1, 3)]
    assert [c["shape"] for c in m["caches"]] == [[1, 2, 1, 8 * p, 4, 16], [2, 2, 1, 2 * p, 4, 16], [1, 2, 1, 4 * p, 4, 16]]
    assert [l["group"] for l in m["layers"]] == ["kv_full", "kv_s0w2", "kv_s1w3", "kv_s0w2"]
    assert m["layers"][2] == {"index": 2, "mode": "L", "span": {"sink": 1, "window": 3}, "group": "kv_s1w3"}
    assert m["geometry"]["layout"] == [None, {"sink": 0, "window": 2}, {"sink": 1, "window": 3}, {"sink": 0, "window": 2}]
    a = load_artifact(d)
    assert [g.name for g in a.geometry.groups] == ["kv_full", "kv_s0w2", "kv_s1w3"]
    for c in m["caches"]:  # the bytes a deployment allocates, and what the handoff state holds
        assert c["bytes"] == a.state[c["name"]].nbytes == int(np.prod(c["shape"])) * 4


def test_groups_without_layers_are_absent(tmp_path, streams):
    s = streams["F"]
    write_artifact(tmp_path / "a", s)
    a = load_artifact(tmp_path / "a")
    assert [g.name for g in a.geometry.groups] == ["kv_full"]
    assert sorted(k for k in a.state if k.startswith("kv_")) == ["kv_full", "kv_full_frames"]
    assert sorted(n for n in a.inputs if n.startswith("kv_")) == ["kv_full", "kv_full_mask"]


class Idle:
    """A runner that only holds buffers: enough for the driver's state handling."""

    input_names: list[str] = []

    def __init__(self):
        self.buffers = HostBuffers()


def test_handoff_state_round_trips_every_group(streams, tmp_path):
    from safetensors.numpy import load_file

    s = streams["mixed"]
    state = s.state_arrays()
    groups = ["kv_full", "kv_s0w2", "kv_s1w3"]
    assert sorted(k for k in state if k.startswith("kv_")) == sorted(groups + [g + "_frames" for g in groups])
    save_file(state, str(tmp_path / "state.safetensors"))
    again = Stream(Idle(), s.geo, state["cross_kv"], 0)
    again.load_state(load_file(str(tmp_path / "state.safetensors")))
    back = again.state_arrays()
    assert sorted(back) == sorted(state) and all(np.array_equal(back[k], state[k]) for k in state)
    assert {n: g.nbytes for n, g in again.groups.items()} == {n: state[n].nbytes for n in groups}
    partial = {k: v for k, v in state.items() if k != "kv_s1w3"}
    with pytest.raises(ValueError, match=r"^state field 'kv_s1w3': expected float32\[1, 2, 1, 24, 4, 16\], "
                                         r"found no such field$"):
        again.load_state(partial)


def test_relayout_refuses_layers_with_different_histories_in_one_group():
    s = tiny_stream([None] * 4, chunks=3)  # frames 0..5 in every layer
    s.relayout(MIXED)
    assert sorted(s.groups["kv_s0w2"].frames) == [4, 5] and sorted(s.groups["kv_s1w3"].frames) == [0, 3, 4, 5]
    names = sorted(s.buffers.names())
    # Layer 1 (window 2) no longer holds sink frame 0, layer 2 (sink 1) does: one group cannot serve both.
    with pytest.raises(ValueError, match=r"relayout: layers 1 and 2 bring different frames into group 'kv_s1w1' "
                                         r"\(\[5\] and \[0, 5\]\)"):
        s.relayout([None, Span(1, 1), Span(1, 1), None])
    assert sorted(s.buffers.names()) == names and s.geo.layout == MIXED  # nothing changed
    s.relayout([None, Span(0, 1), Span(0, 1), Span(0, 2)])  # every layer holds frame 5: one group can
    assert s.groups["kv_s0w1"].layers == (1, 2) and s.groups["kv_s0w1"].frames.tolist() == [5]
    assert s.groups["kv_s0w2"].layers == (3,) and sorted(s.groups["kv_s0w2"].frames) == [4, 5]


@pytest.mark.parametrize("case,expect", [
    ("no_manifest", "manifest.json: expected the artifact manifest, found no such file"),
    ("bad_json", "manifest.json: expected valid JSON, found a parse error at line 1"),
    ("schema", "manifest.json: schema_version: expected 3 (an artifact from before RoPE angles became a graph input: re-export it), found number 1"),
    ("schema_v2", "manifest.json: schema_version: expected 3 (an artifact with a single local cache group 'kv_local': re-export it), found number 2"),
    ("format", "manifest.json: format: expected 'ispa-export', found string 'other'"),
    ("cache_shape", "manifest.json: caches['kv_full'].shape: expected [1, 2, 1, 48, 4, 16]"),
    ("cache_bytes", "manifest.json: caches['kv_s0w2'].bytes: expected 12288 (shape x itemsize), found 1"),
    ("cache_layers", "manifest.json: caches['kv_s0w2'].layers: expected [1, 3] (from geometry), found [1, 2]"),
    ("cache_order", "manifest.json: caches: expected the groups ['kv_full', 'kv_s0w2', 'kv_s1w3'] (from geometry.layout, "
                    "in that order), found ['kv_full', 'kv_s1w3', 'kv_s0w2']"),
    ("layers", "manifest.json: layers[1]: expected {'index': 1, 'mode': 'L', 'span': {'sink': 0, 'window': 2}, "
               "'group': 'kv_s0w2'} (from geometry.layout)"),
    ("io_shape", "manifest.json: inputs['kv_s0w2_mask'].shape: expected [2] (from geometry), found [5]"),
    ("unknown_input", "manifest.json: inputs: expected names the driver feeds"),
    ("unknown_group", "manifest.json: inputs: expected names the driver feeds for geometry.layout (latents, "),
    ("escape", "manifest.json: files: expected relative paths inside the artifact"),
    ("missing_state", "state.safetensors: expected the file listed in manifest.json"),
    ("unlisted_state", "manifest.json: files: expected an entry for 'state.safetensors'"),
    ("checksum", "report.json: sha256: expected "),
    ("truncated_onnx", "model.onnx: size: expected "),
    ("truncated_onnx_relisted", "model.onnx: expected a loadable ONNX model, found DecodeError"),
    ("onnx_io", "model.onnx: graph input 'timestep': expected float32[1] (manifest.json), found float32[2]"),
    ("state_dtype", "state.safetensors: tensor 'kv_s1w3': expected float32[1, 2, 1, 24, 4, 16]"),
    ("state_group", "state.safetensors: tensors: expected only"),
    ("state_extra", "state.safetensors: tensors: expected only"),
    ("state_ring", "state.safetensors: tensor 'kv_full_frames'[0]: expected -1 or a frame < 8 whose ring slot"),
    ("state_seed", "state.safetensors: tensor 'seed': expected 8 (manifest.json seed), found 7"),
])
def test_refusals_name_file_field_and_expectation(art, case, expect):
    d, ins, outs = art
    geo = load_artifact(d).geometry
    state = dict(load_artifact(d).state)

    def resave(**changes):
        st = {**state, **changes}
        save_file({k: v for k, v in st.items() if v is not None}, str(d / "state.safetensors"))
        refresh_record(d, "state.safetensors")

    if case == "no_manifest":
        (d / "manifest.json").unlink()
    elif case == "bad_json":
        (d / "manifest.json").write_text("{not json")
    elif case == "schema":
        edit_manifest(d, lambda m: m.__setitem__("schema_version", 1))
    elif case == "schema_v2":
        edit_manifest(d, lambda m: m.__setitem__("schema_version", 2))
    elif case == "format":
        edit_manifest(d, lambda m: m.__setitem__("format", "other"))
    elif case == "cache_shape":
        edit_manifest(d, lambda m: m["caches"][0]["shape"].__setitem__(3, 5 * 6))  # capacity 5, not 8
    elif case == "cache_bytes":
        edit_manifest(d, lambda m: m["caches"][1].__setitem__("bytes", 1))
    elif case == "cache_layers":
        edit_manifest(d, lambda m: m["caches"][1].__setitem__("layers", [1, 2]))
    elif case == "cache_order":
        edit_manifest(d, lambda m: m.__setitem__("caches", [m["caches"][i] for i in (0, 2, 1)]))
    elif case == "layers":
        edit_manifest(d, lambda m: m["layers"][1].__setitem__("mode", "F"))
    elif case == "io_shape":
        edit_manifest(d, lambda m: next(e for e in m["inputs"] if e["name"] == "kv_s0w2_mask")
                      .__setitem__("shape", [5]))
    elif case == "unknown_input":
        edit_manifest(d, lambda m: m["inputs"].append({"name": "noise", "shape": [1], "dtype": "float32"}))
    elif case == "unknown_group":  # a group of a span no layer has
        edit_manifest(d, lambda m: m["inputs"].append({"name": "kv_s2w2", "shape": [1, 2, 1, 24, 4, 16],
                                                       "dtype": "float32"}))
    elif case == "escape":
        edit_manifest(d, lambda m: m["files"].__setitem__("../etc/passwd", m["files"]["report.json"]))
    elif case == "missing_state":
        (d / "state.safetensors").unlink()
    elif case == "unlisted_state":
        edit_manifest(d, lambda m: m["files"].pop("state.safetensors"))
    elif case == "checksum":
        raw = bytearray((d / "report.json").read_bytes())
        raw[2] ^= 1  # same size, different content
        (d / "report.json").write_bytes(bytes(raw))
    elif case.startswith("truncated_onnx"):
        raw = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(raw[: len(raw) // 2])
        if case.endswith("relisted"):
            refresh_record(d, "model.onnx")
    elif case == "onnx_io":
        toy_onnx(d / "model.onnx", ins, outs, geo, override={"timestep": [2]})
        refresh_record(d, "model.onnx")
    elif case == "state_dtype":
        resave(kv_s1w3=state["kv_s1w3"].astype(np.float16))
    elif case == "state_group":  # what a v2 export held: not a group of this layout
        resave(kv_local=state["kv_s0w2"])
    elif case == "state_extra":
        resave(stray=np.zeros(3, np.float32))
    elif case == "state_ring":
        fr = state["kv_full_frames"].copy()
        fr[0] = 1  # frame 1 lives in slot 1 of a 6-frame ring, not slot 0
        resave(kv_full_frames=fr)
    elif case == "state_seed":
        edit_manifest(d, lambda m: m.__setitem__("seed", 8))
    msg = refusal(d)
    file, rest = expect.split(": ", 1)
    assert msg.startswith(f"{d / file}: "), msg
    assert rest in msg, msg


def test_checksums_can_be_skipped_but_sizes_cannot(art):
    d, _, _ = art
    raw = bytearray((d / "report.json").read_bytes())
    raw[2] ^= 1
    (d / "report.json").write_bytes(bytes(raw))
    load_artifact(d, verify_checksums=False)
    (d / "report.json").write_bytes(bytes(raw) + b" ")
    assert "report.json: size: expected" in refusal(d, verify_checksums=False)


def test_external_data_must_be_listed(art):
    d, _, _ = art
    model = onnx.load(str(d / "model.onnx"))
    onnx.save(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    refresh_record(d, "model.onnx")
    assert "expected an entry for model.onnx's external data 'model.onnx.data'" in refusal(d)
    refresh_record(d, "model.onnx.data")
    load_artifact(d)


# -- atomic writes --------------------------------------------------------------------------------

def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_replaces_only_when_complete(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(rfiles, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    old = _tree(target)
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("new, half")
            raise RuntimeError("export failed midway")
    assert _tree(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with atomic_directory(target) as d:
        (d / "b.txt").write_text("new")
    assert _tree(target) == {"b.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_survives_a_killed_builder(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    code = ("import os, sys; from runtimes.files import atomic_directory\n"
            f"with atomic_directory({str(target)!r}) as d:\n"
            "    (d / 'a.txt').write_text('half')\n"
            "    os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 9
    assert _tree(target) == {"a.txt": b"old"}
    stale = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(stale) == 1 and stale[0].name.startswith(".out.build-")
    with atomic_directory(target) as d:  # a later build clears the dead process's leftovers
        (d / "a.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and _tree(target) == {"a.txt": b"new"}


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "m.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(p, {"a": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["m.json"]
    assert sha256_file(p) == __import__("hashlib").sha256(p.read_bytes()).hexdigest()


# -- ONNX Runtime runner --------------------------------------------------------------------------

def random_feeds(ins, rng):
    feeds = {}
    for name, shape, dtype in ins:
        if dtype == "bool":
            feeds[name] = rng.random(shape) < 0.6
        elif dtype == "int64":
            feeds[name] = np.array(rng.integers(0, 50), dtype=np.int64).reshape(shape)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def test_ort_runner_equals_numpy_and_reuses_its_buffers(art, streams):
    d, ins, outs = art
    runner = OrtRunner(d / "model.onnx")
    ref = NumpyToy(ins, outs, streams["mixed"].geo)
    assert runner.providers == ["CPUExecutionProvider"]
    assert runner.input_names == [n for n, _, _ in ins] and runner.output_names == [n for n, _, _ in outs]
    rng = np.random.default_rng(1)
    first = None
    for _ in range(3):
        feeds = random_feeds(ins, rng)
        got, want = runner.run(feeds), ref.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        first = first or {k: v for k, v in got.items()}
        assert all(got[k] is first[k] for k in got)  # views of the runner's buffers, documented
    copying = OrtRunner(d / "model.onnx", copy_outputs=True)
    a = copying.run(feeds)
    assert all(a[k] is not copying.buffers[k] and np.array_equal(a[k], got[k]) for k in a)


def test_ort_runner_steady_state_allocates_no_arrays(tmp_path):
    n = 1 << 18  # 1 MiB of float32 per tensor: any per-step array would show
    path = tmp_path / "add.onnx"
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    runner = OrtRunner(path, threads=1)
    feeds = {"x": np.ones(n, np.float32), "y": np.arange(n, dtype=np.float32)}
    runner.run(feeds)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = runner.run(feeds)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert np.array_equal(out["z"], feeds["y"] + 1)
    assert peak < 64 * 1024, peak
    # dtype conversion for callers that are not the driver; shapes are checked.
    assert np.array_equal(runner.run({"x": np.ones(n), "y": feeds["y"]})["z"], out["z"])
    with pytest.raises(ValueError, match="input 'x': expected float32"):
        runner.run({"x": np.ones(3, np.float32), "y": feeds["y"]})
    with pytest.raises(ValueError, match="missing inputs \\['y'\\]"):
        runner.run({"x": feeds["x"]})


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_stream_on_ort_equals_stream_on_numpy(tmp_path, streams, modulation):
    d = tmp_path / "art"
    ins, outs = write_artifact(d, streams["mixed"], modulation)
    a = load_artifact(d)
    assert set(a.constants) == ({"ispa_weight", "ispa_bias"} if modulation == "input" else set())
    results = []
    for runner in (OrtRunner(a.onnx_path), NumpyToy(ins, outs, a.geometry)):
        a = load_artifact(d)
        s = Stream(runner, a.geometry, a.cross_kv, a.seed, constants=a.constants)
        s.load_state(a.state)
        lat = s.run(5)  # 10 frames on top of 8: both rings wrap
        results.append((lat, {m: g.frames.copy() for m, g in s.groups.items()},
                        {m: g.data.copy() for m, g in s.groups.items()}))
    (lo, fo, do), (ln, fn, dn) = results
    np.testing.assert_allclose(lo, ln, rtol=1e-4, atol=1e-5)
    assert list(fo) == list(fn) == ["kv_full", "kv_s0w2", "kv_s1w3"]
    for m in fo:
        assert np.array_equal(fo[m], fn[m])
        np.testing.assert_allclose(do[m], dn[m], rtol=1e-4, atol=1e-5)
    assert sorted(fo["kv_full"]) == list(range(10, 18))  # the last 8 frames
    assert sorted(fo["kv_s0w2"]) == [16, 17]  # the last 2 frames
    assert sorted(fo["kv_s1w3"]) == [0, 15, 16, 17]  # sink frame 0 + the last 3 frames


# -- the command line -----------------------------------------------------------------------------

def test_cli_generates_frames_preview_and_record(art, streams, tmp_path, capsys):
    d, ins, outs = art
    out = tmp_path / "run"
    assert main([str(d), "--chunks", "3", "--out", str(out)]) == 0
    frames = np.load(out / "frames.npy")
    a = load_artifact(d)
    s = Stream(NumpyToy(ins, outs, a.geometry), a.geometry, a.cross_kv, a.seed)
    s.load_state(a.state)
    new = s.run(3)
    assert frames.shape == (1, 4, 8 + 6, 4, 6)
    assert np.array_equal(frames[:, :, :8], streams["mixed"].state_arrays()["latents"])
    np.testing.assert_allclose(frames[:, :, 8:], new, rtol=1e-4, atol=1e-5)
    import imageio.v2 as imageio
    gif = np.asarray(imageio.mimread(out / "preview.gif"))
    assert gif.shape[0] == 14 and min(gif.shape[1:3]) >= 128
    record = json.loads((out / "run.json").read_text())
    assert record["chunks_generated"] == 3 and record["frames"] == 14
    assert record["frames_sha256"] == sha256_file(out / "frames.npy")
    assert "chunk 3/3" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["frames.npy", "preview.gif", "run.json"]


def test_cli_errors_are_one_line_exit_2(art, tmp_path, capsys):
    d, _, _ = art
    (d / "state.safetensors").unlink()
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "state.safetensors" in err
    assert not (tmp_path / "o").exists()
    assert main([str(tmp_path / "nowhere"), "--chunks", "1", "--out", str(tmp_path / "o")]) == 2
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--providers", "NoSuchProvider"]) == 2


def test_cli_rephrases_an_onnx_runtime_load_failure(art, tmp_path, capsys):
    d, _, _ = art
    model = onnx.load(str(d / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"  # the protobuf parses; onnxruntime refuses it
    onnx.save(model, str(d / "model.onnx"))
    refresh_record(d, "model.onnx")
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {d / 'model.onnx'}: expected a model onnxruntime can load")


def test_cli_trt_backend_without_engine_is_refused(art, tmp_path, capsys):
    d, _, _ = art
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("TensorRT engine" in err or "backend trt" in err)


class FakeTrt:
    """Stands in for runtimes.trt.TrtRunner (TensorRT is absent here) in the CLI's plumbing: it
    describes its I/O and holds its buffers the way TrtRunner does."""

    def __init__(self, engine_path):
        self.engine_path = Path(engine_path)
        self.inner = OrtRunner(self.engine_path.with_name("model.onnx"))
        self.input_names, self.output_names = self.inner.input_names, self.inner.output_names
        self.input_shapes, self.output_shapes = self.inner.input_shapes, self.inner.output_shapes
        self.input_dtypes, self.output_dtypes = self.inner.input_dtypes, self.inner.output_dtypes
        self.buffers = self.inner.buffers

    def run(self, feeds, info=None):
        return self.inner.run(feeds, info)


def test_cli_trt_backend_runs_the_listed_engine(art, tmp_path, monkeypatch):
    d, _, _ = art
    import runtimes.trt
    monkeypatch.setattr(runtimes.trt, "TrtRunner", FakeTrt)
    (d / "model.engine").write_bytes(b"engine bytes")
    refresh_record(d, "model.engine")
    assert load_artifact(d).engine_path() == d / "model.engine"
    args = ["--chunks", "2", "--quiet", "--no-preview"]
    assert main([str(d), *args, "--out", str(tmp_path / "ort")]) == 0
    assert main([str(d), *args, "--out", str(tmp_path / "trt"), "--backend", "trt"]) == 0
    assert np.array_equal(np.load(tmp_path / "ort" / "frames.npy"), np.load(tmp_path / "trt" / "frames.npy"))


def test_loaded_model_io_is_checked_against_the_manifest(art, monkeypatch):
    d, ins, outs = art
    toy_onnx(d / "model.onnx", ins, outs, load_artifact(d).geometry, override={"timestep": [2]})
    refresh_record(d, "model.onnx")
    a = load_artifact(d, check_onnx=False)
    with pytest.raises(ArtifactError, match=r"model.onnx: input 'timestep': expected float32\[1\] \(manifest.json\), "
                                            r"found float32\[2\]$"):
        make_runner(a, "ort")
    import runtimes.trt
    monkeypatch.setattr(runtimes.trt, "TrtRunner", FakeTrt)
    (d / "model.engine").write_bytes(b"engine bytes")
    with pytest.raises(ArtifactError, match=r"model.engine: input 'timestep': expected"):
        make_runner(a, "trt", engine=d / "model.engine")


def test_preview_frames_normalise_each_video():
    lat = np.stack([np.linspace(-3, 3, 2 * 4 * 5 * 6), np.linspace(0, 1, 2 * 4 * 5 * 6)]).reshape(2, 2, 4, 5, 6)
    img = preview_frames(lat.astype(np.float32), min_px=20)
    assert img.shape == (4, 20, 2 * 24, 3) and img.dtype == np.uint8
    for v in range(2):
        half = img[:, :, v * 24:(v + 1) * 24]
        assert half.min() == 0 and half.max() == 255
    assert np.array_equal(img[..., 2], img[..., 1])  # two channels: the last one repeated


# -- torch-free ---------------------------------------------------------------------------------

def test_runtime_imports_and_runs_without_torch_or_onnx(art, tmp_path):
    d, _, _ = art
    block = tmp_path / "block"
    block.mkdir()
    # onnx too: the deployment needs only numpy, safetensors and onnxruntime (the `runtime` extra).
    for name in ("torch", "ispa_export", "graphs", "onnx"):
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)])}
    cwd = tmp_path  # not the repo root: its ispa_export/ and graphs/ must not be found first

    def py(*args):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)

    check = ("import sys, runtimes.driver, runtimes.ort, runtimes.artifact, runtimes.run, runtimes.files\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ispa_export', 'graphs', 'onnx'))\n"
             "assert not bad, bad\n"
             "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch importable')\n")
    r = py("-c", check)
    assert r.returncode == 0, r.stderr
    r = py("-m", "runtimes", "--help")
    assert r.returncode == 0 and "--chunks" in r.stdout, r.stderr
    r = py("-m", "runtimes", str(d), "--chunks", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "o" / "frames.npy").shape[2] == 12
