"""manifest.json is data from outside: every field checked (JSON Schema) before a run, one line naming
file and field. On the tiny preset exported by `ispa export`, edited one field at a time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtimes.artifact import ArtifactError, load_artifact
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
    "bad_sha": (put("files", "report.json", "sha256", "x"),
                "files['report.json'].sha256: expected 64 lowercase hex digits, found string 'x'"),
    "bad_mode": (put("layers", 1, "mode", "X"), "layers[1].mode: expected one of ['F', 'L'], found string 'X'"),
    "bad_span": (put("geometry", "layout", 1, "X"), "geometry.layout[1]: expected an object {sink, window} or null (a full layer), "
                                                           "found string 'X'"),
    "bad_modulation": (put("modulation", "both"),
                       "modulation: expected one of ['baked', 'input'], found string 'both'"),
    "negative_seed": (put("seed", -1), "seed: expected an integer >= 0, found number -1"),
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
    assert load_artifact(tiny_artifact).geometry.timesteps[0] == 1000.0


def test_a_version_2_manifest_is_refused_in_one_line_asking_for_a_re_export(tiny_artifact, tmp_path, capsys):
    d = edited(tiny_artifact, tmp_path / "art", put("schema_version", 2))
    with pytest.raises(ArtifactError) as e:
        load_artifact(d)
    assert str(e.value) == (f"{d / 'manifest.json'}: schema_version: expected 3 (an artifact with a single local "
                            "cache group 'kv_local': re-export it), found number 2")
    assert main([str(d), "--chunks", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-export it" in err and not (tmp_path / "out").exists()
