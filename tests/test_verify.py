"""Polygraphy parity (`ispa verify`), the CPU-side TensorRT checks of exported graphs, `ispa engine`
without TensorRT, per-video refit planning, and the TensorRT build/run/refit (skipped without it)."""

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import ispa_export.export as export_mod
from graphs.config import preset
from graphs.wan import WanModel
from ispa_export import cli
from ispa_export.engine import ENGINE, build_for_artifact, check_artifact, refit_plan
from ispa_export.errors import UserError
from ispa_export.export import DTYPES, graph_feeds, write_artifact
from ispa_export.ispa import IspaOptions, report, transition
from ispa_export.pipeline import load_context, load_model
from ispa_export.trt_support import check_onnx_for_tensorrt, polygraphy_inspect, sanitize
from ispa_export.verify import (GOLDEN_INPUTS, GOLDEN_OUTPUTS, GOLDEN_RUNNER, TOLERANCES, add_golden, golden_feeds,
                                update_manifest_files, verify)
from runtimes.artifact import ArtifactError, load_artifact

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (tensorrt cannot be imported)")
no_trt = pytest.mark.skipif(HAVE_TRT, reason="checks the message shown where TensorRT is missing")
POLYGRAPHY = Path(sys.executable).with_name("polygraphy")
# 2 of 4 layers local: the graph has both caches (kv_full and kv_local, one sink frame pinned).
TINY = ["--model", "tiny", "--kv-reduction", "0.25", "--warmup-chunks", "4", "--seed", "0"]
MEDIUM = preset("tiny").replace(dim=128, num_heads=4, ffn_dim=256, num_layers=4, latent_height=8, latent_width=8,
                                max_frames=8)


def _ensure_golden(directory: Path, model, stream, modulation="baked", dtype="fp32") -> None:
    """Golden I/O for an artifact whose export did not write them (before write_artifact calls save_golden)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    if GOLDEN_INPUTS in manifest["files"] and GOLDEN_OUTPUTS in manifest["files"]:
        return
    torch_dtype, np_dtype, _ = DTYPES[dtype]
    graph_model = copy.deepcopy(model).cast(torch_dtype)
    feeds = golden_feeds(stream, graph_feeds(stream, stream.state_arrays(), graph_model, modulation, np_dtype))
    assert add_golden(directory, graph_model, feeds) == [GOLDEN_INPUTS, GOLDEN_OUTPUTS]


def _export_pieces(out: Path, model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions) -> Path:
    stream, monitor, tr = transition(model, context, seed, opts)
    rep = report(model, monitor, tr, opts)
    rep["model"], rep["context"] = "test", "random embeddings"
    write_artifact(out, model, stream, rep, preset="tiny", progress=lambda s: None)
    _ensure_golden(out, model, stream)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`ispa export` of the tiny preset, run in-process; write_artifact is wrapped to keep the model."""
    out = tmp_path_factory.mktemp("tiny") / "art"
    captured = {}
    real = export_mod.write_artifact

    def spy(directory, model, stream, rep, **kw):
        captured.update(model=model, stream=stream, kw=kw)
        return real(directory, model, stream, rep, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(export_mod, "write_artifact", spy)
    try:
        assert cli.main(["export", *TINY, "--out", str(out)]) == 0
    finally:
        mp.undo()
    _ensure_golden(out, captured["model"], captured["stream"])
    return out


@pytest.fixture(scope="module")
def video_b(tmp_path_factory, tiny):
    """Another video of the same model (another noise seed and prompt), same L-layers: refit-compatible with `tiny`."""
    manifest = json.loads((tiny / "manifest.json").read_text())
    geo = manifest["geometry"]
    name, model = load_model("tiny", seed=0)
    ctx, _ = load_context(None, name, model.cfg, seed=1)
    opts = IspaOptions(kv_reduction=None, layers=manifest["absorption"]["layers"], sink=geo["local_sink"],
                       window=geo["local_capacity"] - geo["local_sink"], warmup_chunks=4)
    return _export_pieces(tmp_path_factory.mktemp("b") / "art", model, ctx, 1, opts)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A wider, deeper graph (dim 128, 16 tokens per frame, 8-frame cache), 2 of 4 layers local."""
    torch.manual_seed(0)
    model = WanModel(MEDIUM).eval()
    ctx = torch.randn(1, 8, MEDIUM.text_dim, generator=torch.Generator().manual_seed(0))
    opts = IspaOptions(kv_reduction=0.3, window=MEDIUM.chunk_frames, sink=1, warmup_chunks=4)
    return _export_pieces(tmp_path_factory.mktemp("medium") / "art", model, ctx, 0, opts)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _golden(d: Path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    return load_json(str(d / GOLDEN_INPUTS)), RunResults.load(str(d / GOLDEN_OUTPUTS))


def _perturb(d: Path, output: str, delta: float) -> None:
    """Move the largest-magnitude element of one golden output by `delta`, and re-list the file."""
    _, results = _golden(d)
    it = results[GOLDEN_RUNNER][0]
    arr = it[output].copy()
    idx = np.unravel_index(np.argmax(np.abs(arr)), arr.shape)
    arr[idx] += delta
    it[output] = arr
    (d / GOLDEN_OUTPUTS).write_text(results.to_json())
    update_manifest_files(d, [GOLDEN_OUTPUTS])


def _ort(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# -- verify -------------------------------------------------------------------------------------

def test_golden_files_are_listed_and_match_the_manifest(tiny):
    art = load_artifact(tiny)
    assert GOLDEN_INPUTS in art.manifest["files"] and GOLDEN_OUTPUTS in art.manifest["files"]
    feeds_list, results = _golden(tiny)
    assert len(feeds_list) == 1 and list(results.keys()) == [GOLDEN_RUNNER]
    feeds, outs = feeds_list[0], results[GOLDEN_RUNNER][0]
    for name, spec in art.inputs.items():
        assert (feeds[name].shape, feeds[name].dtype.name) == (spec.shape, spec.dtype)
    for name, spec in art.outputs.items():
        assert (outs[name].shape, outs[name].dtype.name) == (spec.shape, spec.dtype)
    assert {"kv_full", "kv_local"} <= set(feeds)
    assert np.abs(feeds["latents"]).std() > 0.5  # a denoising step's noise (golden_feeds), not the trace's zeros
    # Baked modulation, variant "full": W_o' (transposed) and the absorbed bias of each L-layer.
    assert len(art.manifest["refit_names"]) == 2 * art.geometry.modes.count("L") > 0


def test_save_golden_skips_graphs_over_the_size_limit(tmp_path):
    from ispa_export.torch_runner import torch_stream
    from ispa_export.verify import save_golden

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    model.set_modes(["F", "L", "F", "L"])
    stream = torch_stream(model, torch.randn(1, 4, cfg.text_dim), 0, local_window=2, local_sink=1)
    stream.run(1)
    feeds = golden_feeds(stream, graph_feeds(stream, stream.state_arrays(), model, "baked", np.float32))
    size = sum(a.nbytes for a in feeds.values())
    assert save_golden(tmp_path, model, feeds, max_bytes=size - 1) == [] and not list(tmp_path.iterdir())
    assert save_golden(tmp_path, model, feeds, max_bytes=10 * size) == [GOLDEN_INPUTS, GOLDEN_OUTPUTS]
    _, results = _golden(tmp_path)
    want = results[GOLDEN_RUNNER][0]
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(np.require(v, requirements="C")) for k, v in feeds.items()})
    np.testing.assert_array_equal(want["prediction"], got[0].numpy())  # stored exactly, float32 round trip
    np.testing.assert_array_equal(want["new_kv_local"], got[2].numpy())


def test_verify_passes_on_the_exported_artifact(tiny, capsys):
    assert verify(tiny) == 0
    out = capsys.readouterr().out
    for name in ("prediction", "new_kv_full", "new_kv_local"):
        line = next(l for l in out.splitlines() if l.startswith("onnxrt") and f" {name} " in l)
        assert line.endswith("pass")
        assert float(line.split()[2]) < 1e-5  # max abs error: float32 ORT vs eager, measured ~1e-6
    assert f"polygraphy run {tiny / 'model.onnx'} --onnxrt --load-inputs" in out
    assert "--atol 0.0001 --rtol 0.001" in out
    assert out.strip().endswith("verify: passed")


def test_stock_polygraphy_cli_reads_the_golden_files(tiny):
    atol, rtol = TOLERANCES["float32"]["onnxrt"]
    cmd = [str(POLYGRAPHY), "run", str(tiny / "model.onnx"), "--onnxrt", "--load-inputs", str(tiny / GOLDEN_INPUTS),
           "--load-outputs", str(tiny / GOLDEN_OUTPUTS), "--atol", str(atol), "--rtol", str(rtol)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout and "Passed: 1/1 iterations" in r.stdout


def test_verify_fails_when_a_golden_output_is_perturbed(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    _perturb(d, "new_kv_local", 1e-6)  # below the tolerance: still a pass
    assert verify(d) == 0
    _perturb(d, "prediction", 1e-2)  # ~1% of the output's scale: a mismatch
    capsys.readouterr()
    assert verify(d) == 1
    out = capsys.readouterr().out
    rows = {l.split()[1]: l for l in out.splitlines() if l.startswith("onnxrt")}
    assert rows["prediction"].endswith("FAIL") and rows["new_kv_local"].endswith("pass")
    assert abs(float(rows["prediction"].split()[2]) - 1e-2) < 1e-4
    assert out.strip().endswith("verify: FAILED")
    assert cli.main(["verify", str(d)]) == 1


def test_tampered_golden_file_is_refused_by_its_checksum(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    text = (d / GOLDEN_OUTPUTS).read_text()
    (d / GOLDEN_OUTPUTS).write_text(text.replace('"pytorch"', '"pytorcH"', 1))
    with pytest.raises(ArtifactError, match=r"golden_outputs\.json: sha256: expected [0-9a-f]{64}"):
        verify(d)
    assert cli.main(["verify", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ispa verify: error:")


def test_missing_golden_files_are_one_user_error(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / GOLDEN_INPUTS).unlink()
    m = json.loads((d / "manifest.json").read_text())
    del m["files"][GOLDEN_INPUTS]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"golden_inputs\.json: missing; expected the golden I/O written by `ispa export`"):
        verify(d)


def test_golden_inputs_must_match_the_graph(tiny, tmp_path):
    from polygraphy.json import to_json

    d = _copy(tiny, tmp_path)
    feeds_list, _ = _golden(d)
    shape = list(feeds_list[0]["kv_local"].shape)
    feeds_list[0]["kv_local"] = feeds_list[0]["kv_local"][..., :-1]
    (d / GOLDEN_INPUTS).write_text(to_json(feeds_list))
    update_manifest_files(d, [GOLDEN_INPUTS])
    found = shape[:-1] + [shape[-1] - 1]
    with pytest.raises(UserError) as e:
        verify(d)
    assert str(e.value) == (f"{d / GOLDEN_INPUTS}: iteration 0: input 'kv_local': expected float32{shape} "
                            f"(manifest.json), found float32{found}")


@no_trt
def test_verify_trt_without_tensorrt_is_one_line(tiny, capsys):
    assert cli.main(["verify", str(tiny), "--trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ispa verify: error: TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and " \
                  "driver); use --backend ort to run without it"


# -- what TensorRT would be given -------------------------------------------------------------

def test_tensorrt_checks_pass_on_the_exported_graphs(tiny, medium):
    for d in (tiny, medium):
        assert check_artifact(d) == [], d
        m = onnx.load(str(d / "model.onnx"), load_external_data=False)
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 20)]  # inside the parser's 9-24
    # The medium graph has both caches, so both attention paths were checked.
    names = {i.name for i in onnx.load(str(medium / "model.onnx"), load_external_data=False).graph.input}
    assert {"kv_full", "kv_full_mask", "kv_local", "kv_local_mask"} <= names


def test_polygraphy_inspect_and_sanitize_the_medium_graph(medium, tmp_path):
    art = load_artifact(medium)
    text = polygraphy_inspect(art.onnx_path)
    for name, spec in list(art.inputs.items()) + list(art.outputs.items()):
        assert name in text
    assert "MatMul" in text and "Softmax" in text
    folded = sanitize(art.onnx_path, tmp_path / "folded.onnx")
    assert check_onnx_for_tensorrt(folded, art.manifest["refit_names"]) == []
    # Folding must not change the function: the folded graph still meets the golden PyTorch outputs.
    feeds_list, results = _golden(medium)
    got = _ort(folded, feeds_list[0])
    atol, _ = TOLERANCES["float32"]["onnxrt"]
    for name, want in results[GOLDEN_RUNNER][0].items():
        np.testing.assert_allclose(got[name], want, atol=atol, rtol=0)
    assert len(onnx.load(str(folded)).graph.node) <= len(onnx.load(str(art.onnx_path)).graph.node)


@no_trt
def test_engine_without_tensorrt_exits_2_with_one_line(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    before = (d / "manifest.json").read_bytes()
    assert cli.main(["engine", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ispa engine: error: TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and " \
                  "driver); use --backend ort to run without it"
    assert (d / "manifest.json").read_bytes() == before
    assert not (d / ENGINE).exists() and not list(d.glob(".model.engine*"))


def test_engine_reports_graph_problems_before_looking_for_tensorrt(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    m = onnx.load(str(d / "model.onnx"))
    m.graph.initializer.append(numpy_helper.from_array(np.eye(2, dtype=np.float32), "square"))
    m.graph.node.append(helper.make_node("Det", ["square"], ["det_out"], name="bad_det"))
    onnx.save(m, str(d / "model.onnx"))
    names = json.loads((d / "manifest.json").read_text())["refit_names"]
    update_manifest_files(d, ["model.onnx"], {"refit_names": names + ["blocks.9.self_attn.ispa_bias"]})
    with pytest.raises(UserError) as e:
        build_for_artifact(d, 1 << 30)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d / 'model.onnx'}: TensorRT would reject the graph (2 problem(s)): ")
    assert "node 'bad_det' (Det, domain 'ai.onnx'): op is marked unsupported" in msg
    assert "refit name 'blocks.9.self_attn.ispa_bias' is not an initializer of the graph" in msg
    assert cli.main(["engine", str(d)]) == 2


def _fake_build(lose: tuple = ()):
    """Stands in for engine.build_engine where TensorRT is missing: writes bytes, reports refittable names."""
    calls = []

    def build(onnx_path, engine_path, *, workspace_bytes, timing_cache_path, refit, progress):
        calls.append({"onnx": Path(onnx_path), "engine": Path(engine_path), "cache": Path(timing_cache_path),
                      "refit": refit, "workspace": workspace_bytes})
        Path(engine_path).write_bytes(b"fake engine for " + Path(onnx_path).read_bytes()[:64])
        Path(timing_cache_path).write_bytes(b"cache")
        names = json.loads((Path(onnx_path).parent / "manifest.json").read_text())["refit_names"]
        return {"tensorrt_version": "10.99", "gpu": "Fake GPU", "compute_capability": "9.0", "build_seconds": 1.25,
                "workspace_bytes": workspace_bytes, "strongly_typed": True, "refittable": refit,
                "refittable_weights": sorted(set(names) - set(lose)) + ["other.weight"],
                "onnx": "model.onnx", "engine": Path(engine_path).name}

    return build, calls


def test_engine_build_records_the_engine_in_the_manifest(tiny, tmp_path, monkeypatch, capsys):
    import ispa_export.engine as engine_mod

    d = _copy(tiny, tmp_path)
    build, calls = _fake_build()
    monkeypatch.setattr(engine_mod, "_trt", lambda: None)
    monkeypatch.setattr(engine_mod, "build_engine", build)
    assert cli.main(["engine", str(d), "--workspace-gib", "2"]) == 0
    (call,) = calls
    assert call["onnx"] == d / "model.onnx" and call["cache"] == d / "timing.cache" and call["refit"]
    assert call["engine"].parent == d and call["engine"].name != ENGINE and call["workspace"] == 2 << 30
    art = load_artifact(d)  # the checksums, the engine's included, hold
    assert art.engine_path() == d / ENGINE and not call["engine"].exists()
    t = art.manifest["tensorrt"]
    assert t == {"engine": ENGINE, "timing_cache": "timing.cache", "tensorrt_version": "10.99", "gpu": "Fake GPU",
                 "compute_capability": "9.0", "build_seconds": 1.25, "workspace_bytes": 2 << 30,
                 "strongly_typed": True, "refittable": True, "refit_names": art.manifest["refit_names"],
                 "refittable_weight_count": len(art.manifest["refit_names"]) + 1}
    assert f"engine {d / ENGINE}: TensorRT 10.99 on Fake GPU (sm 9.0)" in capsys.readouterr().out


def test_engine_with_a_refit_name_folded_away_is_refused(tiny, tmp_path, monkeypatch):
    import ispa_export.engine as engine_mod

    d = _copy(tiny, tmp_path)
    lost = json.loads((d / "manifest.json").read_text())["refit_names"][1]
    before = (d / "manifest.json").read_bytes()
    build, _ = _fake_build(lose=(lost,))
    monkeypatch.setattr(engine_mod, "_trt", lambda: None)
    monkeypatch.setattr(engine_mod, "build_engine", build)
    with pytest.raises(UserError, match=rf"not refittable in the engine: {lost}$"):
        build_for_artifact(d, 1 << 30)
    assert (d / "manifest.json").read_bytes() == before
    assert not (d / ENGINE).exists() and not list(d.glob(".model.engine*"))


# -- refit per video (what can be checked without TensorRT) -----------------------------------------

def test_refit_plan_between_two_videos_of_one_model(tiny, video_b, tmp_path):
    names = load_artifact(tiny).manifest["refit_names"]
    assert load_artifact(video_b).manifest["refit_names"] == names
    plan = refit_plan(tiny, video_b)
    assert list(plan) == names
    a_inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny / "model.onnx")).graph.initializer}
    assert all(not np.array_equal(plan[n], a_inits[n]) for n in names)  # each video has its own correction

    # A refit replaces exactly these initializers; done on A's ONNX, ORT must give B's golden outputs.
    m = onnx.load(str(tiny / "model.onnx"))
    for init in m.graph.initializer:
        if init.name in plan:
            init.CopyFrom(numpy_helper.from_array(plan[init.name], init.name))
    onnx.save(m, str(tmp_path / "refitted.onnx"))
    feeds_list, results = _golden(video_b)
    want = results[GOLDEN_RUNNER][0]
    refitted = _ort(tmp_path / "refitted.onnx", feeds_list[0])
    unrefitted = _ort(tiny / "model.onnx", feeds_list[0])
    atol, rtol = TOLERANCES["float32"]["onnxrt"]
    for name in want.keys():
        np.testing.assert_allclose(refitted[name], want[name], atol=atol, rtol=rtol)
    assert np.abs(unrefitted["prediction"] - want["prediction"]).max() > 100 * atol


def test_refit_plan_reads_external_weights(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    onnx.save(onnx.load(str(d / "model.onnx")), str(d / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    update_manifest_files(d, ["model.onnx", "model.onnx.data"])
    own = refit_plan(tiny, tiny)
    for a, b in ((tiny, d), (d, tiny), (d, d)):  # embedded and external storage hash alike
        plan = refit_plan(a, b)
        assert list(plan) == list(own) and all(np.array_equal(plan[n], own[n]) for n in own)
    assert check_artifact(d) == []


def test_refit_plan_refuses_another_graph_or_base_model(tiny, video_b, medium, tmp_path):
    with pytest.raises(UserError, match=r"manifest\.json: inputs: expected the engine artifact's value"):
        refit_plan(tiny, medium)
    d = _copy(video_b, tmp_path)
    names = set(json.loads((d / "manifest.json").read_text())["refit_names"])
    m = onnx.load(str(d / "model.onnx"))
    init = next(i for i in m.graph.initializer if i.name not in names and i.data_type == onnx.TensorProto.FLOAT
                and len(i.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(m, str(d / "model.onnx"))
    update_manifest_files(d, ["model.onnx"])
    with pytest.raises(UserError, match=rf"initializer '{init.name}' differs .* but is not a refit weight"):
        refit_plan(tiny, d)


def test_refit_for_artifact_hands_the_plan_to_refit_engine(tiny, video_b, tmp_path, monkeypatch):
    import ispa_export.engine as engine_mod

    a, b = _copy(tiny, tmp_path / "a"), _copy(video_b, tmp_path / "b")
    build, _ = _fake_build()
    monkeypatch.setattr(engine_mod, "_trt", lambda: None)
    monkeypatch.setattr(engine_mod, "build_engine", build)
    build_for_artifact(a, 1 << 30)
    seen = {}

    def refit(path, weights):
        seen.update(path=Path(path), data=Path(path).read_bytes(), weights=weights)
        Path(path).write_bytes(b"refitted")
        return {"tensorrt_version": "10.99", "refitted": sorted(weights)}

    monkeypatch.setattr(engine_mod, "refit_engine", refit)
    record = engine_mod.refit_for_artifact(b, a)
    assert seen["data"] == (a / ENGINE).read_bytes() and seen["path"].parent == b  # a copy of A's engine
    plan = refit_plan(a, b)
    assert sorted(seen["weights"]) == sorted(plan)
    assert all(np.array_equal(seen["weights"][n], plan[n]) for n in plan)
    art = load_artifact(b)
    assert art.engine_path() == b / ENGINE and (b / ENGINE).read_bytes() == b"refitted"
    assert record == art.manifest["tensorrt"] and record["refitted_from"] == str(a.resolve())
    assert (a / ENGINE).read_bytes().startswith(b"fake engine")  # the source engine is untouched


# -- TensorRT itself --------------------------------------------------------------------------------

@needs_trt
def test_tensorrt_build_run_and_refit(tiny, video_b, tmp_path, capsys):
    from runtimes.trt import TrtRunner

    from ispa_export.engine import refit_for_artifact

    a, b = _copy(tiny, tmp_path / "a"), _copy(video_b, tmp_path / "b")
    record = build_for_artifact(a, 1 << 30, progress=False)
    manifest = json.loads((a / "manifest.json").read_text())
    assert record == manifest["tensorrt"] and record["refit_names"] == manifest["refit_names"]
    assert record["refittable"] and record["gpu"] and record["compute_capability"]
    assert load_artifact(a).engine_path() == a / ENGINE and (a / "timing.cache").is_file()
    assert verify(a, trt=True) == 0  # TensorRT and ORT both against PyTorch

    feeds_list, results = _golden(b)
    want = results[GOLDEN_RUNNER][0]
    atol, rtol = TOLERANCES["float32"]["tensorrt"]
    with TrtRunner(a / ENGINE, copy_outputs=True) as runner:
        before = runner.run(feeds_list[0])
    assert np.abs(before["prediction"] - want["prediction"]).max() > 10 * atol  # A's weights: not B's answer

    refit_for_artifact(b, a)  # A's engine, B's corrections, no rebuild
    assert load_artifact(b).engine_path() == b / ENGINE
    with TrtRunner(b / ENGINE, copy_outputs=True) as runner:
        after = runner.run(feeds_list[0])
    for name in want.keys():
        np.testing.assert_allclose(after[name], want[name], atol=atol, rtol=rtol)
    assert verify(b, trt=True) == 0
