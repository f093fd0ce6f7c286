"""The deployment runtime: deployment and instance validation, atomic writes, the ONNX Runtime runner,
videos on one deployment, the CLI, torch-freedom.

The deployments here are a small hand-made ONNX graph with the chunk step's I/O contract (its
arithmetic is not the transformer's, but it reads every input, caches through their masks, and the
per-video modulation: graph inputs, or for a baked graph constants listed as overridable inputs),
and their instances hold a real handoff state (the tiny model's stream, run in PyTorch) written by
ispa_export.video.absorb.write_instance, as `ispa absorb` writes it. The driver's ring buffers, the
IO binding, the per-video binding and the CLI are checked end to end against a numpy implementation
of the same graph. End-to-end parity with the exported transformer is tested with the exporter.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.numpy import load_file, save_file

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.video.absorb import Absorbed, write_instance
from ispa_export.video.torch_runner import torch_stream
from runtimes import files as rfiles
from runtimes.artifact import ArtifactError, cache_records, layer_records, load_artifact
from runtimes.buffers import HostBuffers
from runtimes.deployment import Deployment, check_runner_io
from runtimes.driver import Geometry, Stream
from runtimes.errors import RunError
from runtimes.files import atomic_directory, file_record, file_records, sha256_file, write_json_atomic
from runtimes.groups import Span
from runtimes.instance import INSTANCE_FORMAT, load_instance
from runtimes.ort import OrtRunner, OrtSession
from runtimes.run import main, preview_frames

ROOT = Path(__file__).resolve().parents[1]
NP_TO_ONNX = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
              "bool": TensorProto.BOOL}
CPU = ["CPUExecutionProvider"]


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


def toy_onnx(path: Path, ins, outs, geo: Geometry, override: dict | None = None,
             baked: dict[str, np.ndarray] | None = None) -> None:
    """prediction = latents/2 + timestep/1000 + mean(rope_frame)/100 + mean(masked caches) + mean(modulation);
    new K/V = mean(latents) + mean(rope_frame), broadcast. `baked`: a baked graph's per-video constants
    (initializers also listed as graph inputs: ONNX Runtime's overridable initializers), each adding its
    mean. `override` changes a declared I/O shape."""
    nodes, inits = [], []
    baked = baked or {}

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
    for name, value in baked.items():
        const(name, value)
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
    inputs = [vi(*x) for x in ins] + [vi(n, list(a.shape), a.dtype.name) for n, a in baked.items()]
    graph = helper.make_graph(nodes, "toy", inputs, [vi(*x) for x in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class NumpyToy:
    """The toy graph in numpy: the reference for the ONNX Runtime runs (host buffers, like the CPU engine).
    A baked constant comes from the buffers when the video bound one, else it is the graph's own."""

    def __init__(self, ins, outs, geo, baked: dict[str, np.ndarray] | None = None):
        self.input_names = [n for n, _, _ in ins]
        self.outs = outs
        self.geo = geo
        self.baked = baked or {}
        self.buffers = HostBuffers()

    def run(self, feeds, info=None):
        feeds = {n: feeds[n] if n in feeds else self.buffers[n] for n in self.input_names}
        consts = {n: self.buffers[n] if n in self.buffers else v for n, v in self.baked.items()}
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
        for value in consts.values():
            pred = pred + value.mean(dtype=np.float64)
        v = np.float32(feeds["latents"].mean(dtype=np.float64) + fi)
        out = {"prediction": pred.astype(np.float32)}
        for name, shape, _ in self.outs:
            if name != "prediction":
                out[name] = np.full(shape, v, np.float32)
        return out


# -- deployments and instances ------------------------------------------------------------------

# Three cache groups: kv_full (layer 0), kv_s0w2 (layers 1 and 3), kv_s1w3 (layer 2).
MIXED = [None, Span(0, 2), Span(1, 3), Span(0, 2)]


def tiny_stream(layout, chunks=4, seed=7, context_seed=0) -> Stream:
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = WanModel(cfg).eval()
    model.set_layout(layout)
    gen = torch.Generator().manual_seed(context_seed)
    stream = torch_stream(model, torch.randn(1, 5, cfg.text_dim, generator=gen), seed)
    stream.run(chunks)
    return stream


@pytest.fixture(scope="module")
def streams():
    # "other": another video on the same layout (other noise, other text): a second instance.
    return {"mixed": tiny_stream(MIXED), "other": tiny_stream(MIXED, seed=11, context_seed=1),
            "F": tiny_stream([None] * 4, chunks=2)}


def toy_modulation(geo: Geometry, modulation: str, seed: int) -> dict[str, np.ndarray]:
    """A video's modulation under the graph's names: `ispa_weight`/`ispa_bias` (input), or per L-layer
    the refit constants of a baked graph (ispa_export.video.modulation's names)."""
    rng = np.random.default_rng(seed)
    dim = geo.heads * geo.head_dim
    local = [i for i, m in enumerate(geo.modes) if m == "L"]
    if modulation == "input":
        return {"ispa_weight": rng.standard_normal((len(local), dim, dim), dtype=np.float32),
                "ispa_bias": rng.standard_normal((len(local), dim), dtype=np.float32)}
    out = {}
    for i in local:
        out[f"blocks.{i}.self_attn.o.weight_t"] = rng.standard_normal((dim, dim), dtype=np.float32)
        out[f"blocks.{i}.self_attn.ispa_bias"] = rng.standard_normal((dim,), dtype=np.float32)
    return out


@dataclass
class Toy:
    """A toy deployment: its graph's I/O and, for a baked graph, the constants the graph holds."""

    directory: Path
    geo: Geometry
    ins: list
    outs: list
    baked: dict[str, np.ndarray]

    @property
    def instance(self) -> Path:
        return self.directory / "instance"

    def numpy(self) -> NumpyToy:
        return NumpyToy(self.ins, self.outs, self.geo, self.baked)


def write_instance_for(deploy: Path, stream: Stream, modulation: dict[str, np.ndarray], out: Path) -> Path:
    """INSTANCE/ of `stream` (a video at its handoff) for the deployment `deploy`, written by
    `ispa absorb`'s own writer (instance.json with the deployment's manifest sha256 and the files)."""
    absorbed = Absorbed(stream, int(stream.seed), modulation, {}, {"kept_corrections": [], "transition_chunk":
                                                                   stream.chunk}, {"warmup": 0.0}, None)
    write_instance(absorbed, out, deployment=deploy, deployment_sha256=sha256_file(deploy / "manifest.json"),
                   dtype=stream.geo.dtype, context_source="test")
    return out


def write_pair(directory: Path, stream: Stream, modulation: str = "baked", video_seed: int = 0) -> Toy:
    """A toy deployment (schema 4: the graph and its contract, no video) at `directory`, and the
    instance of `stream` at directory/instance, laid out as `ispa export` lays them out."""
    geo = stream.geo
    tensors = toy_modulation(geo, modulation, video_seed)
    cross_shape = stream.state_arrays()["cross_kv"].shape
    ispa_shapes = (tensors["ispa_weight"].shape, tensors["ispa_bias"].shape) if modulation == "input" else None
    ins, outs = io_specs(geo, cross_shape, modulation, ispa_shapes)
    # The graph's own constants, which each video's instance replaces: not its values, so a runtime
    # that did not bind them would give other frames.
    baked = {n: np.full(v.shape, 3.0, np.float32) for n, v in tensors.items()} if modulation == "baked" else {}
    with atomic_directory(directory) as tmp:
        toy_onnx(tmp / "model.onnx", ins, outs, geo, baked=baked)
        write_json_atomic(tmp / "calibration.json", {"note": "test fixture"})
        manifest = {
            "schema_version": 4, "format": "ispa-export",
            "positions": {"scheme": "absolute-rope-input", "input": "rope_frame"},
            "model": {"preset": "tiny", "config": preset("tiny").to_dict()},
            "layers": layer_records(geo), "geometry": geo.to_dict(), "caches": cache_records(geo),
            "modulation": modulation, "dtype": geo.dtype,
            "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in ins],
            "outputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in outs],
            "refit_names": sorted(baked), "refit_shapes": {n: list(v.shape) for n, v in baked.items()},
            "correction": {"variant": "full", "site": "wo"}, "calibration": {"videos": []},
            "files": file_records(tmp), "versions": {},
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    write_instance_for(directory, stream, tensors, directory / "instance")
    return Toy(directory, geo, ins, outs, baked)


@pytest.fixture
def art(tmp_path, streams) -> Toy:
    return write_pair(tmp_path / "art", streams["mixed"])


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def refresh_record(d: Path, name: str) -> None:
    edit_manifest(d, lambda m: m["files"].__setitem__(name, rfiles.file_record(d / name)))


def edit_instance(inst: Path, fn) -> None:
    r = json.loads((inst / "instance.json").read_text())
    fn(r)
    (inst / "instance.json").write_text(json.dumps(r))


def resave_instance(inst: Path, **changes) -> None:
    """instance.safetensors with tensors replaced (None: removed), its instance.json record updated."""
    state = {**load_file(str(inst / "instance.safetensors")), **changes}
    save_file({k: v for k, v in state.items() if v is not None}, str(inst / "instance.safetensors"),
              metadata={"format": INSTANCE_FORMAT})
    edit_instance(inst, lambda r: r["files"].__setitem__("instance.safetensors",
                                                         file_record(inst / "instance.safetensors")))


def refusal(d: Path, **kw) -> str:
    with pytest.raises(ArtifactError) as e:
        load_artifact(d, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def instance_refusal(toy: Toy, inst: Path | None = None, **kw) -> str:
    a = load_artifact(toy.directory)
    with pytest.raises(ArtifactError) as e:
        load_instance(inst or toy.instance, a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def toy_stream(toy: Toy, runner, instance: Path | None = None) -> Stream:
    """A stream of the instance on `runner`, as Deployment.start sets it up."""
    inst = load_instance(instance or toy.instance, load_artifact(toy.directory))
    s = Stream(runner, toy.geo, inst.cross_kv, inst.seed, constants=inst.constants, keep_latents=False)
    s.load_state(inst.state)
    return s


# -- loading --------------------------------------------------------------------------------------

def test_deployment_and_instance_round_trip(art, streams):
    d = art.directory
    a = load_artifact(d)
    s = streams["mixed"]
    assert a.geometry == s.geo and a.geometry.layout == MIXED
    assert set(a.inputs) == {n for n, _, _ in art.ins} and set(a.outputs) == {n for n, _, _ in art.outs}
    # A deployment holds no video: the graph and its record only; the video is DIR/instance.
    assert a.engine_path() is None and a.default_instance == d / "instance"
    assert set(a.paths) == {"model.onnx", "calibration.json", "manifest.json"}
    assert "seed" not in a.manifest and not hasattr(a, "state")
    inst = load_instance(a.default_instance, a)
    for k, v in s.state_arrays().items():
        assert np.array_equal(inst.state[k], v), k
    want = toy_modulation(s.geo, "baked", 0)
    assert inst.seed == 7 and np.array_equal(inst.cross_kv, s.state_arrays()["cross_kv"])
    assert sorted(inst.constants) == sorted(want) == a.manifest["refit_names"]
    assert all(np.array_equal(inst.constants[k], want[k]) for k in want)
    record = json.loads((d / "instance" / "instance.json").read_text())
    assert record["format"] == "ispa-instance" and record["version"] == 1 and record["seed"] == 7
    assert record["deployment_manifest_sha256"] == sha256_file(d / "manifest.json")
    assert set(record["files"]) >= {"instance.safetensors", "report.json"}
    assert inst.sha256 == sha256_file(d / "instance" / "instance.json")
    assert not (d / "state.safetensors").exists()


def test_the_manifest_lists_one_group_per_distinct_span(art):
    d = art.directory
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
    inst = load_instance(art.instance, a)
    for c in m["caches"]:  # the bytes a deployment allocates, and what the handoff state holds
        assert c["bytes"] == inst.state[c["name"]].nbytes == int(np.prod(c["shape"])) * 4


def test_groups_without_layers_are_absent(tmp_path, streams):
    toy = write_pair(tmp_path / "a", streams["F"])
    a = load_artifact(toy.directory)
    assert [g.name for g in a.geometry.groups] == ["kv_full"]
    assert a.manifest["refit_names"] == []  # no L-layer: no correction constant
    inst = load_instance(toy.instance, a)
    assert sorted(k for k in inst.state if k.startswith("kv_")) == ["kv_full", "kv_full_frames"]
    assert sorted(n for n in a.inputs if n.startswith("kv_")) == ["kv_full", "kv_full_mask"]


class Idle:
    """A runner that only holds buffers: enough for the driver's state handling."""

    input_names: list[str] = []

    def __init__(self):
        self.buffers = HostBuffers()


def test_handoff_state_round_trips_every_group(streams, tmp_path):
    s = streams["mixed"]
    state = s.state_arrays()
    groups = ["kv_full", "kv_s0w2", "kv_s1w3"]
    assert sorted(k for k in state if k.startswith("kv_")) == sorted(groups + [g + "_frames" for g in groups])
    save_file(state, str(tmp_path / "instance.safetensors"))
    again = Stream(Idle(), s.geo, state["cross_kv"], 0)
    again.load_state(load_file(str(tmp_path / "instance.safetensors")))
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


# -- refusals: one line naming the file and the field ---------------------------------------------

@pytest.mark.parametrize("case,expect", [
    ("no_manifest", "manifest.json: expected the artifact manifest, found no such file"),
    ("bad_json", "manifest.json: expected valid JSON, found a parse error at line 1"),
    ("schema", "manifest.json: schema_version: expected 4 (an artifact from before RoPE angles became a graph input: re-export it), found number 1"),
    ("schema_v2", "manifest.json: schema_version: expected 4 (an artifact with a single local cache group 'kv_local': re-export it), found number 2"),
    ("schema_v3", "manifest.json: schema_version: expected 4 (an export that held one video's state (state.safetensors) "
                  "and graph: rebuild it with `ispa build` (or `ispa export`)"),
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
    ("baked_modulation_input", "manifest.json: inputs: expected no 'ispa_weight' (modulation is 'baked')"),
    ("refit_names", "manifest.json: refit_names: expected the corrections of every L-layer [1, 2, 3]"),
    ("refit_shapes", "manifest.json: refit_shapes: expected a shape for every refit name"),
    ("escape", "manifest.json: files: expected relative paths inside the artifact"),
    ("missing_onnx", "model.onnx: expected the file listed in manifest.json"),
    ("unlisted_onnx", "manifest.json: files: expected an entry for 'model.onnx'"),
    ("checksum", "calibration.json: sha256: expected "),
    ("truncated_onnx", "model.onnx: size: expected "),
    ("truncated_onnx_relisted", "model.onnx: expected a loadable ONNX model, found DecodeError"),
    ("onnx_io", "model.onnx: graph input 'timestep': expected float32[1] (manifest.json), found float32[2]"),
])
def test_deployment_refusals_name_file_field_and_expectation(art, case, expect):
    d, ins, outs, geo = art.directory, art.ins, art.outs, art.geo
    if case == "no_manifest":
        (d / "manifest.json").unlink()
    elif case == "bad_json":
        (d / "manifest.json").write_text("{not json")
    elif case.startswith("schema"):
        edit_manifest(d, lambda m: m.__setitem__("schema_version", {"schema": 1, "schema_v2": 2, "schema_v3": 3}[case]))
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
    elif case == "baked_modulation_input":
        edit_manifest(d, lambda m: m["inputs"].append({"name": "ispa_weight", "shape": [3, 64, 64],
                                                       "dtype": "float32"}))
    elif case == "refit_names":  # a deployment whose layer 2 has no correction constant
        edit_manifest(d, lambda m: m.__setitem__("refit_names", [n for n in m["refit_names"]
                                                                 if not n.startswith("blocks.2.")]))
    elif case == "refit_shapes":
        edit_manifest(d, lambda m: m["refit_shapes"].pop("blocks.3.self_attn.ispa_bias"))
    elif case == "escape":
        edit_manifest(d, lambda m: m["files"].__setitem__("../etc/passwd", m["files"]["calibration.json"]))
    elif case == "missing_onnx":
        (d / "model.onnx").unlink()
    elif case == "unlisted_onnx":
        edit_manifest(d, lambda m: m["files"].pop("model.onnx"))
    elif case == "checksum":
        raw = bytearray((d / "calibration.json").read_bytes())
        raw[2] ^= 1  # same size, different content
        (d / "calibration.json").write_bytes(bytes(raw))
    elif case.startswith("truncated_onnx"):
        raw = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(raw[: len(raw) // 2])
        if case.endswith("relisted"):
            refresh_record(d, "model.onnx")
    elif case == "onnx_io":
        toy_onnx(d / "model.onnx", ins, outs, geo, override={"timestep": [2]}, baked=art.baked)
        refresh_record(d, "model.onnx")
    msg = refusal(d)
    file, rest = expect.split(": ", 1)
    assert msg.startswith(f"{d / file}: "), msg
    assert rest in msg, msg


@pytest.mark.parametrize("case,expect", [
    ("no_directory", "instance: expected an instance directory"),
    ("no_record", "instance.json: expected the instance record written by `ispa absorb`, found no such file"),
    ("bad_record", "instance.json: expected valid UTF-8 JSON"),
    ("format", "instance.json: format/version: expected 'ispa-instance' version 1, found 'other' version 1"),
    ("no_deployment_hash", "instance.json: deployment_manifest_sha256: expected a field written by `ispa absorb`"),
    ("other_deployment", "instance.json: deployment_manifest_sha256: expected {mine} ({manifest}), found {zeros} "
                         "(an instance absorbed into another deployment"),
    ("unlisted_state", "instance.json: files: expected an object with an entry for 'instance.safetensors'"),
    ("missing_state", "instance.safetensors: expected the file listed in instance.json, found no such file"),
    ("state_size", "instance.safetensors: size: expected "),
    ("state_checksum", "instance.safetensors: sha256: expected "),
    ("state_unreadable", "instance.safetensors: expected a readable safetensors file"),
    ("state_dtype", "instance.safetensors: tensor 'kv_s1w3': expected float32[1, 2, 1, 24, 4, 16]"),
    ("state_group", "instance.safetensors: tensors: expected only"),
    ("state_extra", "instance.safetensors: tensors: expected only"),
    ("state_missing_group", "instance.safetensors: tensor 'kv_s0w2': expected float32[2, 2, 1, 12, 4, 16], "
                            "found no such tensor"),
    ("state_ring", "instance.safetensors: tensor 'kv_full_frames'[0]: expected -1 or a frame < 8 whose ring slot"),
    ("state_frame_index", "instance.safetensors: tensor 'frame_index': expected chunk*chunk_frames = 4*2, found 6"),
    ("state_latents", "instance.safetensors: tensor 'latents': expected float32[1, 4, 8, 4, 6] (every frame before "
                      "frame_index)"),
    ("state_cross_kv", "instance.safetensors: tensor 'cross_kv': expected float32[4, 2, 1, 8, 4, 16]"),
    ("modulation_missing", "instance.safetensors: tensor 'blocks.2.self_attn.ispa_bias': expected float32[64], "
                           "found no such tensor"),
    ("modulation_shape", "instance.safetensors: tensor 'blocks.1.self_attn.o.weight_t': expected float32[64, 64] "
                         "(from the deployment's manifest.json), found float32[64, 63]"),
    ("seed", "instance.safetensors: tensor 'seed': expected 8 (instance.json seed), found 7"),
    ("negative_seed", "instance.json: seed: expected a non-negative integer, found -1"),
])
def test_instance_refusals_name_file_field_and_expectation(art, case, expect):
    inst = art.instance
    state = load_file(str(inst / "instance.safetensors"))
    manifest = art.directory / "manifest.json"
    expect = expect.format(mine=sha256_file(manifest), manifest=manifest, zeros="0" * 64)
    where = inst
    if case == "no_directory":
        where = art.directory / "nowhere" / "instance"
    elif case == "no_record":
        (inst / "instance.json").unlink()
    elif case == "bad_record":
        (inst / "instance.json").write_text("{not json")
    elif case == "format":
        edit_instance(inst, lambda r: r.__setitem__("format", "other"))
    elif case == "no_deployment_hash":
        edit_instance(inst, lambda r: r.pop("deployment_manifest_sha256"))
    elif case == "other_deployment":
        edit_instance(inst, lambda r: r.__setitem__("deployment_manifest_sha256", "0" * 64))
    elif case == "unlisted_state":
        edit_instance(inst, lambda r: r["files"].pop("instance.safetensors"))
    elif case == "missing_state":
        (inst / "instance.safetensors").unlink()
    elif case == "state_size":
        with open(inst / "instance.safetensors", "ab") as f:
            f.write(b" ")
    elif case == "state_checksum":
        raw = bytearray((inst / "instance.safetensors").read_bytes())
        raw[-1] ^= 1
        (inst / "instance.safetensors").write_bytes(bytes(raw))
    elif case == "state_unreadable":
        (inst / "instance.safetensors").write_bytes(b"not a safetensors file")
        edit_instance(inst, lambda r: r["files"].__setitem__("instance.safetensors",
                                                             file_record(inst / "instance.safetensors")))
    elif case == "state_dtype":
        resave_instance(inst, kv_s1w3=state["kv_s1w3"].astype(np.float16))
    elif case == "state_group":  # what a v2 export held: not a group of this layout
        resave_instance(inst, kv_local=state["kv_s0w2"])
    elif case == "state_extra":
        resave_instance(inst, stray=np.zeros(3, np.float32))
    elif case == "state_missing_group":
        resave_instance(inst, kv_s0w2=None)
    elif case == "state_ring":
        fr = state["kv_full_frames"].copy()
        fr[0] = 1  # frame 1 lives in slot 1 of an 8-frame ring, not slot 0
        resave_instance(inst, kv_full_frames=fr)
    elif case == "state_frame_index":
        resave_instance(inst, frame_index=np.array(6, np.int64))
    elif case == "state_latents":
        resave_instance(inst, latents=state["latents"][:, :, :6])
    elif case == "state_cross_kv":  # another text length than the graph's
        resave_instance(inst, cross_kv=np.zeros((4, 2, 1, 7, 4, 16), np.float32))
    elif case == "modulation_missing":  # layer 2's correction absent: the graph would run on its own constant
        resave_instance(inst, **{"blocks.2.self_attn.ispa_bias": None})
    elif case == "modulation_shape":
        resave_instance(inst, **{"blocks.1.self_attn.o.weight_t": np.zeros((64, 63), np.float32)})
    elif case == "seed":
        edit_instance(inst, lambda r: r.__setitem__("seed", 8))
    elif case == "negative_seed":
        edit_instance(inst, lambda r: r.__setitem__("seed", -1))
        resave_instance(inst, seed=np.array(-1, np.int64))
    msg = instance_refusal(art, where)
    file, rest = expect.split(": ", 1)
    want_file = where if case == "no_directory" else inst / file
    assert msg.startswith(f"{want_file}: "), msg
    assert rest in msg, msg


def test_checksums_can_be_skipped_but_sizes_cannot(art):
    d = art.directory
    a = load_artifact(d)
    # The instance's files: hashes can be skipped, sizes cannot.
    rep = art.instance / "report.json"
    raw = bytearray(rep.read_bytes())
    raw[2] ^= 1
    rep.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="report.json: sha256: expected"):
        load_instance(art.instance, a)
    load_instance(art.instance, a, verify_checksums=False)
    rep.write_bytes(bytes(raw) + b" ")
    with pytest.raises(ArtifactError, match="report.json: size: expected"):
        load_instance(art.instance, a, verify_checksums=False)
    # The deployment's alike.
    raw = bytearray((d / "calibration.json").read_bytes())
    raw[2] ^= 1
    (d / "calibration.json").write_bytes(bytes(raw))
    load_artifact(d, verify_checksums=False)
    (d / "calibration.json").write_bytes(bytes(raw) + b" ")
    assert "calibration.json: size: expected" in refusal(d, verify_checksums=False)


def test_external_data_must_be_listed(art):
    d = art.directory
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


def test_ort_runner_equals_numpy_and_reuses_its_buffers(art):
    d, ins, outs = art.directory, art.ins, art.outs
    runner = OrtRunner(d / "model.onnx")
    ref = art.numpy()
    assert runner.providers == ["CPUExecutionProvider"]
    assert runner.input_names == [n for n, _, _ in ins] and runner.output_names == [n for n, _, _ in outs]
    # A baked graph's per-video constants are not inputs but overridable initializers.
    assert runner.engine.overridable == set(art.baked) and len(art.baked) == 6
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
    # A video's constants in the runner's buffers replace the graph's (bound like inputs).
    unbound = runner.run(feeds)["prediction"].copy()
    for name, value in toy_modulation(art.geo, "baked", 5).items():
        for r in (runner, ref):
            r.buffers.allocate(name, value.shape, "float32")
            r.buffers.upload(name, value)
    got, want = runner.run(feeds), ref.run(feeds)
    np.testing.assert_allclose(got["prediction"], want["prediction"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["prediction"], unbound, rtol=1e-3, atol=1e-3)


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
    toy = write_pair(tmp_path / "art", streams["mixed"], modulation)
    inst = load_instance(toy.instance, load_artifact(toy.directory))
    assert set(inst.constants) == ({"ispa_weight", "ispa_bias"} if modulation == "input" else set(toy.baked))
    results = []
    for runner in (OrtRunner(toy.directory / "model.onnx"), toy.numpy()):
        s = toy_stream(toy, runner)
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


# -- many videos on one deployment ----------------------------------------------------------------

def _solo(toy: Toy, instance: Path, n: int) -> np.ndarray:
    video = Deployment.open(toy.directory, providers=CPU).start(instance)
    try:
        return np.concatenate([video.step() for _ in range(n)], axis=2)  # the engine's chunks: what toy_stream runs
    finally:
        video.close()


@pytest.mark.parametrize("modulation", ["baked", "input"])
def test_two_videos_on_one_deployment_each_equal_their_solo_run(tmp_path, streams, modulation):
    """One session, two videos (two instances of the deployment: other caches, text, noise and
    modulation), stepped interleaved chunk by chunk and then from two threads: each gives exactly
    what it gives alone."""
    toy = write_pair(tmp_path / "dep", streams["mixed"], modulation, video_seed=0)
    other = write_instance_for(toy.directory, streams["other"], toy_modulation(toy.geo, modulation, 1),
                               tmp_path / "other")
    instances, n = [toy.instance, other], 6
    solo = [_solo(toy, inst, n) for inst in instances]
    assert not np.allclose(solo[0], solo[1], atol=1e-3)  # two different videos
    # The reference of each: the numpy graph on the same instance.
    for inst, frames in zip(instances, solo):
        np.testing.assert_allclose(frames, toy_stream(toy, toy.numpy(), inst).run(n), rtol=1e-4, atol=1e-5)

    dep = Deployment.open(toy.directory, providers=CPU)
    a, b = dep.start(instances[0]), dep.start(instances[1])
    assert a.stream.runner.session is b.stream.runner.session  # the engine is loaded once
    assert a.stream.buffers is not b.stream.buffers  # each video its own caches and modulation
    got = [[], []]
    for _ in range(n):
        got[0].append(a.step())
        got[1].append(b.step())
    for i in range(2):
        assert np.array_equal(np.concatenate(got[i], axis=2), solo[i]), i
    a.close()
    b.close()

    videos = [dep.start(inst) for inst in instances]
    results: list = [None, None]
    errors: list = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = np.concatenate([videos[i].step() for _ in range(n)], axis=2)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert np.array_equal(results[i], solo[i]), i


def test_an_instance_of_another_deployment_is_refused_on_every_runtime_path(tmp_path, streams, capsys):
    """Same layout, same graph, but absorbed into another build: refused in one line naming both
    manifest hashes, by `python -m runtimes`, by Deployment.start (a directory or a loaded Instance),
    before anything in OUT is touched."""
    toy = write_pair(tmp_path / "dep", streams["mixed"])
    other = write_pair(tmp_path / "other", streams["mixed"])
    edit_manifest(other.directory, lambda m: m["versions"].__setitem__("note", "another build"))
    write_instance_for(other.directory, streams["other"], toy_modulation(toy.geo, "baked", 1), other.instance)
    mine, theirs = sha256_file(toy.directory / "manifest.json"), sha256_file(other.directory / "manifest.json")
    assert mine != theirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("a previous file")

    r = subprocess.run([sys.executable, "-m", "runtimes", str(toy.directory), "--instance", str(other.instance),
                        "--chunks", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert err.count("\n") == 1 and err.startswith(f"error: {other.instance / 'instance.json'}: "), err
    assert mine in err and theirs in err and "another deployment" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep"]

    dep = Deployment.open(toy.directory, providers=CPU)
    with pytest.raises(ArtifactError) as e:
        dep.start(other.instance)
    assert "\n" not in str(e.value) and mine in str(e.value) and theirs in str(e.value)
    loaded = load_instance(other.instance, load_artifact(other.directory))  # valid for its own deployment
    with pytest.raises(ArtifactError) as e:
        dep.start(loaded)
    assert "\n" not in str(e.value) and mine in str(e.value) and theirs in str(e.value)
    assert str(e.value).startswith(f"{other.instance / 'instance.json'}: deployment_manifest_sha256: ")
    dep.start(toy.instance).close()  # its own video still starts


# -- the command line -----------------------------------------------------------------------------

def test_cli_generates_frames_preview_and_record(art, streams, tmp_path, capsys):
    d = art.directory
    out = tmp_path / "run"
    assert main([str(d), "--chunks", "3", "--out", str(out)]) == 0  # the instance: DIR/instance by default
    frames = np.load(out / "frames.npy")
    new = toy_stream(art, art.numpy()).run(3)
    assert frames.shape == (1, 4, 8 + 6, 4, 6)
    assert np.array_equal(frames[:, :, :8], streams["mixed"].state_arrays()["latents"])
    np.testing.assert_allclose(frames[:, :, 8:], new, rtol=1e-4, atol=1e-5)
    import imageio.v2 as imageio
    gif = np.asarray(imageio.mimread(out / "preview.gif"))
    assert gif.shape[0] == 14 and min(gif.shape[1:3]) >= 128
    record = json.loads((out / "run.json").read_text())
    assert record["chunks_generated"] == 3 and record["frames"] == 14
    assert record["frames_sha256"] == sha256_file(out / "frames.npy")
    assert record["deployment_manifest_sha256"] == sha256_file(d / "manifest.json")
    assert record["instance"] == str(art.instance.resolve()) and record["seed"] == 7
    assert record["instance_sha256"] == sha256_file(art.instance / "instance.json")
    assert "chunk 3/3" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["frames.npy", "preview.gif",
                                                                                 "run.json"]
    # --instance names the video: another one on the same deployment gives other frames.
    other = write_instance_for(d, streams["other"], toy_modulation(art.geo, "baked", 1), tmp_path / "other")
    assert main([str(d), "--instance", str(other), "--chunks", "3", "--out", str(tmp_path / "b"), "--quiet",
                 "--no-preview"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b" / "frames.npy")[:, :, 8:],
                               toy_stream(art, art.numpy(), other).run(3), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["seed"] == 11


def test_cli_errors_are_one_line_exit_2(art, tmp_path, capsys):
    d = art.directory
    (art.instance / "instance.safetensors").unlink()
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "instance.safetensors" in err
    assert not (tmp_path / "o").exists()
    assert main([str(tmp_path / "nowhere"), "--chunks", "1", "--out", str(tmp_path / "o")]) == 2
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--providers", "NoSuchProvider"]) == 2
    shutil.rmtree(art.instance)  # no --instance and no DIR/instance
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --instance: expected the video's instance") and str(d / "instance") in err
    assert not (tmp_path / "o").exists()


def test_cli_rephrases_an_onnx_runtime_load_failure(art, tmp_path, capsys):
    d = art.directory
    model = onnx.load(str(d / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"  # the protobuf parses; onnxruntime refuses it
    onnx.save(model, str(d / "model.onnx"))
    refresh_record(d, "model.onnx")
    edit_instance(art.instance, lambda r: r.__setitem__("deployment_manifest_sha256", sha256_file(d / "manifest.json")))
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {d / 'model.onnx'}: expected a model onnxruntime can load")


def test_cli_trt_backend_without_engine_is_refused(art, tmp_path, capsys):
    d = art.directory
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "o"), "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("TensorRT engine" in err or "backend trt" in err)


class FakeTrtEngine:
    """Stands in for runtimes.trt.TrtEngine (TensorRT is absent here) in the deployment's plumbing:
    the ONNX graph next to the engine file plays the engine; its refittable weights are the graph's
    overridable constants, and `refit` makes them the engine's for every context, as TensorRT does."""

    def __init__(self, engine_path):
        self.engine_path = Path(engine_path)
        self.session = OrtSession(self.engine_path.with_name("model.onnx"), providers=CPU)
        self.weights: dict[str, np.ndarray] = {}
        self.refits: list[list[str]] = []

    def refittable(self) -> set[str]:
        return set(self.session.overridable)

    def refit(self, weights):
        self.weights = {k: np.array(v, copy=True) for k, v in weights.items()}
        self.refits.append(sorted(weights))
        return sorted(weights)


class FakeTrt:
    """Stands in for runtimes.trt.TrtRunner: an execution context over the shared (fake) engine that
    describes its I/O and holds its buffers the way TrtRunner does; the engine's weights are its own."""

    def __init__(self, engine):
        self.engine = engine
        self.inner = OrtRunner(engine.session)
        self.input_names, self.output_names = self.inner.input_names, self.inner.output_names
        self.input_shapes, self.output_shapes = self.inner.input_shapes, self.inner.output_shapes
        self.input_dtypes, self.output_dtypes = self.inner.input_dtypes, self.inner.output_dtypes
        self.buffers = self.inner.buffers

    def run(self, feeds, info=None):
        for name, value in self.engine.weights.items():  # the engine's current weights
            if name not in self.buffers:
                self.buffers.allocate(name, value.shape, value.dtype.name)
            self.buffers.upload(name, value)
        return self.inner.run(feeds, info)


@pytest.fixture
def fake_trt(monkeypatch):
    import runtimes.trt
    monkeypatch.setattr(runtimes.trt, "TrtEngine", FakeTrtEngine)
    monkeypatch.setattr(runtimes.trt, "TrtRunner", FakeTrt)


def add_engine(d: Path) -> None:
    """What `ispa engine` leaves: the engine and its record beside the manifest, which stays as it was
    (so the instance absorbed before still belongs to the deployment)."""
    (d / "model.engine").write_bytes(b"engine bytes")
    write_json_atomic(d / "engine.json", {"engine": "model.engine", "bytes": len(b"engine bytes"),
                                          "deployment_manifest_sha256": sha256_file(d / "manifest.json")})


def test_cli_trt_backend_runs_the_listed_engine(art, tmp_path, fake_trt, streams):
    d = art.directory
    add_engine(d)
    assert load_artifact(d).engine_path() == d / "model.engine"
    args = ["--chunks", "2", "--quiet", "--no-preview"]
    assert main([str(d), *args, "--out", str(tmp_path / "ort")]) == 0
    assert main([str(d), *args, "--out", str(tmp_path / "trt"), "--backend", "trt"]) == 0
    assert np.array_equal(np.load(tmp_path / "ort" / "frames.npy"), np.load(tmp_path / "trt" / "frames.npy"))
    assert json.loads((tmp_path / "trt" / "run.json").read_text())["backend"] == "trt"
    # A baked deployment on TensorRT: the video's correction is refitted into the engine, so it holds
    # one video at a time; a second is refused in one line until the first is closed.
    dep = Deployment.open(d, "trt")
    first = dep.start(art.instance)
    assert dep.engine.refits == [sorted(art.baked)]
    assert all(np.array_equal(dep.engine.weights[k], v) for k, v in load_instance(art.instance, dep.artifact)
               .constants.items())
    with pytest.raises(RunError) as e:
        dep.start(art.instance)
    assert "\n" not in str(e.value) and "one video at a time" in str(e.value)
    first.close()
    dep.start(art.instance).close()


def test_loaded_model_io_is_checked_against_the_manifest(art, fake_trt):
    d = art.directory
    toy_onnx(d / "model.onnx", art.ins, art.outs, art.geo, override={"timestep": [2]}, baked=art.baked)
    refresh_record(d, "model.onnx")
    a = load_artifact(d, check_onnx=False)
    with pytest.raises(ArtifactError, match=r"model.onnx: input 'timestep': expected float32\[1\] \(manifest.json\), "
                                            r"found float32\[2\]$"):
        check_runner_io(OrtSession(d / "model.onnx", providers=CPU), a, d / "model.onnx")
    add_engine(d)
    with pytest.raises(ArtifactError, match=r"model.engine: input 'timestep': expected"):
        Deployment.open(d, "trt")


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
    d = art.directory
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
             "import runtimes.deployment, runtimes.instance, runtimes.output, runtimes.snapshot\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ispa_export', 'graphs', 'onnx'))\n"
             "assert not bad, bad\n"
             "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch importable')\n")
    r = py("-c", check)
    assert r.returncode == 0, r.stderr
    r = py("-m", "runtimes", "--help")
    assert r.returncode == 0 and "--chunks" in r.stdout and "--instance" in r.stdout, r.stderr
    r = py("-m", "runtimes", str(d), "--chunks", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    frames = np.load(tmp_path / "o" / "frames.npy")
    assert frames.shape[2] == 12
    # Without onnx the graph's I/O is read through onnxruntime: the same frames as the in-process run.
    assert main([str(d), "--chunks", "2", "--out", str(tmp_path / "p"), "--quiet", "--no-preview"]) == 0
    assert np.array_equal(frames, np.load(tmp_path / "p" / "frames.npy"))
