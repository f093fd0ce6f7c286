"""manifest.json (and a video's instance.json) is data from outside: every field checked (JSON Schema)
before a run, one line naming file and field. On the tiny preset exported by `ispa export` (DIR, a
deployment, and DIR/instance), edited one field at a time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtimes.artifact import ArtifactError, load_artifact
from runtimes.files import file_record
from runtimes.instance import load_instance
from runtimes.run import main


def edited(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    fn(m)
    (dst / "manifest.json").write_text(json.dumps(m))  # Python writes NaN/Infinity as bare literals
    return dst


def put(*path_and_value):
    *path, key, value = path_and_value

    def fn(m):
        for p in path:
            m = m[p]
        m[key] = value
    return fn


CASES = {
    "huge_timestep": (put("geometry", "timesteps", 0, 1e30),
                      "geometry.timesteps[0]: expected a number in (0, 1000] (sigma = t/1000), found number 1e+30"),
    "negative_timestep": (put("geometry", "timesteps", 1, -5),
                          "geometry.timesteps[1]: expected a number in (0, 1000]"),
    "nan_timestep": (put("geometry", "timesteps", 0, float("nan")),
                     "expected valid JSON, found NaN (not a JSON number)"),
    "float64": (put("dtype", "float64"),
                "dtype: expected one of ['float32', 'float16', 'bfloat16'], found string 'float64'"),
    "dtype_vs_graph": (put("dtype", "float16"),
                       "dtype: expected 'float32' (geometry.dtype, the graph's), found 'float16'"),
    "io_float64": (put("inputs", 0, "dtype", "float64"), "inputs[0].dtype: expected one of ['float32', 'float16', "
                                                         "'bfloat16', 'int64', 'bool'], found string 'float64'"),
    "float_count": (put("geometry", "batch", 1.0), "geometry.batch: expected an integer, found number 1.0"),
    "zero_channels": (put("geometry", "channels", 0), "geometry.channels: expected an integer >= 1, found number 0"),
    "bool_count": (put("geometry", "heads", True), "geometry.heads: expected an integer, found boolean True"),
    "unknown_geometry": (put("geometry", "fps", 16), "geometry: expected only the fields ['batch', "),
    "missing_field": (lambda m: m["caches"][0].pop("bytes"),
                      "caches[0]: expected a field 'bytes', found no such field"),
    "group_name": (put("caches", 0, "name", "kv_local"),
                   "caches[0].name: expected 'kv_full' or 'kv_s<sink>w<window>', found string 'kv_local'"),
    "zero_window": (put("geometry", "layout", 0, {"sink": 1, "window": 0}),
                    "geometry.layout[0].window: expected an integer >= 1, found number 0"),
    "span_field": (put("geometry", "layout", 0, {"sink": 1, "window": 2, "stride": 1}),
                   "geometry.layout[0]: expected only the fields ['sink', 'window'], found unknown fields ['stride']"),
    "layer_group": (put("layers", 0, "group", "local"),
                    "layers[0].group: expected 'kv_full' or 'kv_s<sink>w<window>', found string 'local'"),
    "v2_caches": (put("caches", {"full": {}, "local": {}}), "caches: expected a list, found an object"),
    "missing_positions": (lambda m: m.pop("positions"),
                          "(top level): expected a field 'positions', found no such field"),
    "bad_sha": (put("files", "model.onnx", "sha256", "x"),
                "files['model.onnx'].sha256: expected 64 lowercase hex digits, found string 'x'"),
    "bad_mode": (put("layers", 1, "mode", "X"), "layers[1].mode: expected one of ['F', 'L'], found string 'X'"),
    "bad_span": (put("geometry", "layout", 1, "X"), "geometry.layout[1]: expected an object {sink, window} or null (a full layer), "
                                                           "found string 'X'"),
    "bad_modulation": (put("modulation", "both"),
                       "modulation: expected one of ['baked', 'input'], found string 'both'"),
    "rope_theta": (put("geometry", "rope_theta", 0.5), "geometry.rope_theta: expected a number > 1 (RoPE base)"),
    "shape_text": (put("inputs", 0, "shape", ["B", 4]), "inputs[0].shape[0]: expected an integer, found string 'B'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_field_is_checked_one_line_naming_file_and_field(tiny_artifact, tmp_path, case):
    fn, expect = CASES[case]
    d = edited(tiny_artifact, tmp_path / "art", fn)
    with pytest.raises(ArtifactError) as e:
        load_artifact(d, verify_checksums=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d / 'manifest.json'}: "), msg
    assert expect in msg, msg


def test_a_refused_manifest_runs_nothing_and_writes_nothing(tiny_artifact, tmp_path, capsys):
    d = edited(tiny_artifact, tmp_path / "art", put("geometry", "timesteps", 0, 1e30))
    assert main([str(d), "--chunks", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "geometry.timesteps[0]" in err
    assert not (tmp_path / "out").exists()


def test_the_exported_manifest_passes(tiny_artifact):
    a = load_artifact(tiny_artifact)
    assert a.geometry.timesteps[0] == 1000.0
    # A deployment holds no video: no handoff state, no seed; the video is DIR/instance.
    assert a.manifest["schema_version"] == 4 and "seed" not in a.manifest
    assert "state.safetensors" not in a.manifest["files"] and not (tiny_artifact / "state.safetensors").exists()
    assert a.default_instance == tiny_artifact / "instance"
    assert load_instance(a.default_instance, a).seed == 0


@pytest.mark.parametrize("version,why", [
    (2, "an artifact with a single local cache group 'kv_local': re-export it"),
    (3, "an export that held one video's state (state.safetensors) and graph: rebuild it with `ispa build` "
        "(or `ispa export`): re-export it"),
])
def test_an_older_manifest_is_refused_in_one_line_asking_for_a_re_export(tiny_artifact, tmp_path, capsys,
                                                                           version, why):
    d = edited(tiny_artifact, tmp_path / "art", put("schema_version", version))
    with pytest.raises(ArtifactError) as e:
        load_artifact(d)
    assert str(e.value) == f"{d / 'manifest.json'}: schema_version: expected 4 ({why}), found number {version}"
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-export it" in err and not (tmp_path / "out").exists()


# -- instance.json: a video's record, from outside as well --------------------------------------------

def _files_entry_not_an_object(r, inst):
    r["files"]["report.json"] = "x"


def _escape(r, inst):  # a file outside the instance, listed with its true size and hash
    r["files"]["../manifest.json"] = file_record(inst.parent / "manifest.json")


INSTANCE_CASES = [
    pytest.param(lambda r, inst: r.__setitem__("seed", -1), {"seed": -1}, "instance.json",
                 "seed: expected a non-negative integer, found -1", id="negative_seed"),
    pytest.param(lambda r, inst: r.__setitem__("seed", 3), {}, "instance.safetensors",
                 "tensor 'seed': expected 3 (instance.json seed), found 0", id="seed_mismatch"),
    pytest.param(lambda r, inst: r.__setitem__("version", 2), {}, "instance.json",
                 "format/version: expected 'ispa-instance' version 1, found 'ispa-instance' version 2", id="format"),
    pytest.param(lambda r, inst: r.pop("files"), {}, "instance.json",
                 "files: expected a field written by `ispa absorb`", id="no_files"),
    pytest.param(None, {}, "instance.json", "expected a JSON object, found list", id="not_an_object"),
    pytest.param(lambda r, inst: r.__setitem__("seed", "0"), {}, "instance.json", "seed: expected a non-negative integer, found '0'",
                 id="seed_type"),
    pytest.param(_files_entry_not_an_object, {}, "instance.json", "files['report.json']: expected",
                 id="files_entry_not_an_object"),
    pytest.param(_escape, {}, "instance.json", "files: expected relative paths inside the instance", id="files_escape"),
]


@pytest.mark.parametrize("fn,tensors,file,expect", INSTANCE_CASES)
def test_each_instance_field_is_checked_one_line_naming_file_and_field(tiny_artifact, tmp_path, fn, tensors, file,
                                                                        expect):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "art"
    shutil.copytree(tiny_artifact, d)
    inst = d / "instance"
    if tensors:
        path = inst / "instance.safetensors"
        state = {**load_file(str(path)), **{k: np.array(v, np.int64) for k, v in tensors.items()}}
        save_file(state, str(path), metadata={"format": "ispa-instance"})
    r = json.loads((inst / "instance.json").read_text())
    if tensors:
        r["files"]["instance.safetensors"] = file_record(inst / "instance.safetensors")
    if fn is None:
        r = [r]
    else:
        fn(r, inst)
    (inst / "instance.json").write_text(json.dumps(r))
    with pytest.raises(ArtifactError) as e:
        load_instance(inst, load_artifact(d, verify_checksums=False))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{inst / file}: "), msg
    assert expect in msg, msg
