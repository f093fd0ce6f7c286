"""Golden parity (`ispa verify`, golden.safetensors), the CPU-side TensorRT checks of exported graphs, `ispa engine`
without TensorRT, per-video refit planning, and the TensorRT build/run/refit (skipped without it)."""

import copy
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import ispa_export.build.export as export_mod
from graphs.config import preset
from graphs.wan import WanModel
from ispa_export import cli
from ispa_export.build.engine import ENGINE, build_for_artifact, check_artifact, refit_plan
from ispa_export.errors import UserError
from ispa_export.build.export import DTYPES, graph_feeds, write_artifact
from ispa_export.build.calibrate import IspaOptions, report, transition
from ispa_export.pipeline import load_context, load_model
from ispa_export.build.trt_support import check_onnx_for_tensorrt, polygraphy_inspect, sanitize
from ispa_export.build.verify import (GOLDEN, KV_TOKENS, TOLERANCES, add_golden, golden_feeds, golden_layout,
                                is_state_input, layout_nbytes, load_golden, read_golden, slice_outputs, update_manifest_files,
                                verify)
from runtimes.artifact import ArtifactError, load_artifact
from runtimes.groups import Span

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (tensorrt cannot be imported)")
no_trt = pytest.mark.skipif(HAVE_TRT, reason="checks the message shown where TensorRT is missing")
# 2 of 4 layers local: the graph has two cache groups (kv_full and kv_s1w2, one sink frame pinned).
# The gate off: a 4-chunk warmup gives the held-out gate no evidence, and the refit tests need corrections.
TINY = ["--model", "tiny", "--kv-reduction", "0.25", "--window", "2", "--sink", "1", "--warmup-chunks", "4",
        "--no-gate", "--seed", "0"]
MEDIUM = preset("tiny").replace(dim=128, num_heads=4, ffn_dim=256, num_layers=4, latent_height=8, latent_width=8,
                                max_frames=8)


def _export_pieces(out: Path, model: WanModel, context: torch.Tensor, seed: int, opts: IspaOptions) -> Path:
    stream, monitor, tr = transition(model, context, seed, opts)
    rep = report(model, monitor, tr, opts)
    rep["model"], rep["context"] = "test", "random embeddings"
    write_artifact(out, model, stream, rep, preset="tiny", progress=lambda s: None)
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
    return out


@pytest.fixture(scope="module")
def video_b(tmp_path_factory, tiny):
    """Another video of the same model (another noise seed and prompt), same L-layers: refit-compatible with `tiny`."""
    manifest = json.loads((tiny / "manifest.json").read_text())
    geo = manifest["geometry"]
    name, model = load_model("tiny", seed=0)
    ctx, _ = load_context(None, name, model.cfg, seed=1)
    span = next(s for s in geo["layout"] if s is not None)
    opts = IspaOptions(kv_reduction=None, layers=manifest["absorption"]["layers"], sink=span["sink"],
                       window=span["window"], warmup_chunks=4, gate=False)
    return _export_pieces(tmp_path_factory.mktemp("b") / "art", model, ctx, 1, opts)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A wider, deeper graph (dim 128, 16 tokens per frame, 8-frame cache), 2 of 4 layers local."""
    torch.manual_seed(0)
    model = WanModel(MEDIUM).eval()
    ctx = torch.randn(1, 8, MEDIUM.text_dim, generator=torch.Generator().manual_seed(0))
    opts = IspaOptions(kv_reduction=0.3, window=MEDIUM.chunk_frames, sink=1, warmup_chunks=4, gate=False)
    return _export_pieces(tmp_path_factory.mktemp("medium") / "art", model, ctx, 0, opts)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _golden(d: Path):
    """The full feeds of the golden pass (state + golden inputs) and the golden file, as verify reads them."""
    return load_golden(load_artifact(d))


def _rewrite(d: Path, change) -> None:
    """Apply `change(tensors)` to golden.safetensors' tensors (file keys), keep its metadata, re-list it."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(d / GOLDEN), framework="np") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(d / GOLDEN), metadata=metadata)
    update_manifest_files(d, [GOLDEN])


def _perturb(d: Path, output: str, delta: float) -> None:
    """Move the largest-magnitude element of one golden output by `delta`, and re-list the file."""
    def change(tensors):
        arr = tensors["output." + output].copy()
        idx = np.unravel_index(np.argmax(np.abs(arr)), arr.shape)
        arr[idx] += delta
        tensors["output." + output] = arr

    _rewrite(d, change)


def _ort(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# -- verify -------------------------------------------------------------------------------------

def test_golden_file_is_listed_and_matches_the_manifest(tiny):
    art = load_artifact(tiny)
    assert GOLDEN in art.manifest["files"] and not list(tiny.glob("golden_*.json"))
    feeds, golden = _golden(tiny)
    for name, spec in art.inputs.items():
        assert (feeds[name].shape, feeds[name].dtype.name) == (spec.shape, spec.dtype)
    layout = golden_layout({}, {n: (s.shape, s.dtype) for n, s in art.outputs.items()})
    for name, spec in art.outputs.items():
        assert (golden.outputs[name].shape, golden.outputs[name].dtype.name) == layout["output." + name]
    assert {"kv_full", "kv_s1w2"} <= set(feeds)
    assert np.abs(feeds["latents"]).std() > 0.5  # a denoising step's noise (golden_feeds), not the trace's zeros
    # Baked modulation, variant "full": W_o' (transposed) and the absorbed bias of each L-layer.
    assert len(art.manifest["refit_names"]) == 2 * art.geometry.modes.count("L") > 0


def test_save_golden_stores_step_inputs_and_sliced_kv(tmp_path):
    from ispa_export.video.torch_runner import torch_stream
    from ispa_export.build.verify import save_golden

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    model.set_layout([None, Span(0, 2), Span(1, 3), Span(0, 2)])  # three cache groups
    stream = torch_stream(model, torch.randn(1, 4, cfg.text_dim), 0)
    stream.run(1)
    feeds = golden_feeds(stream, graph_feeds(stream, stream.state_arrays(), model, "baked", np.float32))
    assert save_golden(tmp_path, model, feeds, kv_tokens=5) == [GOLDEN]
    assert [p.name for p in tmp_path.iterdir()] == [GOLDEN]  # written atomically: no temporary left
    golden = read_golden(tmp_path / GOLDEN)
    tokens = stream.geo.tokens_per_frame * stream.geo.chunk_frames
    assert golden.kv == slice(0, tokens, -(-tokens // 5)) and golden.metadata["kv_slice"] == f"0:{tokens}:{golden.kv.step}"
    state = {"cross_kv", "kv_full", "kv_s0w2", "kv_s1w3"}
    assert set(golden.inputs) == set(feeds) - state and golden.metadata["state_inputs"] == ",".join(sorted(state))
    assert all(np.array_equal(golden.inputs[k], feeds[k]) for k in golden.inputs)
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(np.require(v, requirements="C")) for k, v in feeds.items()})
    np.testing.assert_array_equal(golden.outputs["prediction"], got[0].numpy())  # stored exactly, in full
    assert sorted(golden.outputs) == ["new_kv_full", "new_kv_s0w2", "new_kv_s1w3", "prediction"]
    for name, out in zip(["new_kv_full", "new_kv_s0w2", "new_kv_s1w3"], got[1:]):
        want = out.numpy()[:, :, :, golden.kv]
        assert golden.outputs[name].shape == want.shape and want.shape[3] == len(range(tokens)[golden.kv]) <= 5
        np.testing.assert_array_equal(golden.outputs[name], want)  # every layer, K and V, strided tokens
    # Non-finite PyTorch outputs are refused, and nothing is written.
    bad = dict(feeds, latents=np.full_like(feeds["latents"], np.nan))
    with pytest.raises(UserError, match=r"golden\.safetensors: output 'prediction' of the PyTorch model has NaN/inf"):
        save_golden(tmp_path / "nan", model, bad)
    assert not (tmp_path / "nan" / GOLDEN).exists()


def test_golden_file_leaves_the_state_out_and_stays_small(tiny):
    """golden.safetensors never repeats the caches, text K/V or constants of state.safetensors, and its
    size is bounded at the Wan 1.3B geometry (computed from shapes, no model built)."""
    art = load_artifact(tiny)
    golden = read_golden(tiny / GOLDEN)
    assert not any(is_state_input(n) for n in [*golden.inputs, *golden.outputs])
    assert {"kv_full", "kv_s1w2", "cross_kv"} <= set(art.state)
    layout = golden_layout({n: (s.shape, s.dtype) for n, s in art.inputs.items()},
                           {n: (s.shape, s.dtype) for n, s in art.outputs.items()})
    assert (tiny / GOLDEN).stat().st_size <= layout_nbytes(layout) + 8192  # tensors + a small header
    assert layout_nbytes(layout) < sum(art.state[k].nbytes for k in ("kv_full", "kv_s1w2", "cross_kv"))

    # Wan2.1 1.3B, bf16, 480x832 (60x104 latents, 1560 tokens a frame, 3-frame chunks): 30 layers,
    # say 15 full (M = 21) and 15 local (window 6 + 1 sink), text K/V of 512 tokens.
    cfg = preset("wan2.1-t2v-1.3b")
    b, f, (gh, gw) = 1, cfg.chunk_frames, cfg.grid
    p = gh * gw
    heads, hd, n_f, n_l, local_cap = cfg.num_heads, cfg.head_dim, 15, 15, 7
    bf = "bfloat16"
    inputs = {"latents": ((b, cfg.in_dim, f, cfg.latent_height, cfg.latent_width), bf), "timestep": ((b,), "float32"),
              "rope_frame": ((2, f, hd // 2), "float32"), "pass_kind": ((), "int64"),
              "cross_kv": ((n_f + n_l, 2, b, cfg.text_len, heads, hd), bf),
              "kv_full": ((n_f, 2, b, cfg.max_frames * p, heads, hd), bf), "kv_full_mask": ((cfg.max_frames,), "bool"),
              "kv_s1w6": ((n_l, 2, b, local_cap * p, heads, hd), bf), "kv_s1w6_mask": ((local_cap,), "bool")}
    outputs = {"prediction": (inputs["latents"][0], bf), "new_kv_full": ((n_f, 2, b, f * p, heads, hd), bf),
               "new_kv_s1w6": ((n_l, 2, b, f * p, heads, hd), bf)}
    layout = golden_layout(inputs, outputs)
    assert not any(is_state_input(k.split(".", 1)[1]) for k in layout)
    assert layout["output.new_kv_full"][0] == (n_f, 2, b, KV_TOKENS, heads, hd)  # 4680 tokens, every 74th
    size = layout_nbytes(layout)
    state = sum(math.prod(s) * 2 for n, (s, _) in inputs.items() if is_state_input(n))
    full_kv = sum(math.prod(s) * 2 for n, (s, _) in outputs.items() if n != "prediction")
    assert size < 16e6 and size < state / 100 and size < full_kv / 50, (size, state, full_kv)


def test_verify_passes_on_the_exported_artifact(tiny, capsys):
    assert verify(tiny) == 0
    out = capsys.readouterr().out
    for name in ("prediction", "new_kv_full", "new_kv_s1w2"):
        line = next(l for l in out.splitlines() if l.startswith("onnxrt") and f" {name} " in l)
        assert line.endswith("pass")
        assert float(line.split()[2]) < 1e-5  # max abs error: float32 ORT vs eager, measured ~1e-6
        assert line.split()[4:6] == ["1e-04", "1e-03"]
    assert "polygraphy run" not in out and "golden.safetensors" in out
    assert out.strip().endswith("verify: passed")


def test_verify_slices_the_runners_kv_like_the_golden_file(tiny, tmp_path, capsys):
    """A golden file written with fewer K/V tokens (a strided slice) still passes: verify slices the
    runner's outputs by the file's recorded slice."""
    d = _copy(tiny, tmp_path)
    feeds, golden = _golden(d)
    full = _ort(d / "model.onnx", feeds)
    from safetensors.numpy import save_file

    kv = slice(1, golden.kv.stop, 3)
    tensors = {"input." + k: v for k, v in golden.inputs.items()}
    tensors.update({"output." + k: v for k, v in slice_outputs(dict(golden.outputs, **{
        n: full[n] for n in ("new_kv_full", "new_kv_s1w2")}), kv).items()})
    save_file(tensors, str(d / GOLDEN), metadata=dict(golden.metadata, kv_slice=f"1:{kv.stop}:3"))
    update_manifest_files(d, [GOLDEN])
    assert read_golden(d / GOLDEN).outputs["new_kv_s1w2"].shape[3] == len(range(kv.stop)[kv]) < kv.stop
    assert verify(d) == 0
    assert "new K/V tokens 1:" in capsys.readouterr().out


def test_verify_fails_when_a_golden_output_is_perturbed(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    _perturb(d, "new_kv_s1w2", 1e-6)  # below the tolerance: still a pass
    assert verify(d) == 0
    _perturb(d, "prediction", 1e-2)  # ~1% of the output's scale: a mismatch
    capsys.readouterr()
    assert verify(d) == 1
    out = capsys.readouterr().out
    rows = {l.split()[1]: l for l in out.splitlines() if l.startswith("onnxrt")}
    assert rows["prediction"].endswith("FAIL") and rows["new_kv_s1w2"].endswith("pass")
    assert abs(float(rows["prediction"].split()[2]) - 1e-2) < 1e-4
    assert out.strip().endswith("verify: FAILED")
    assert cli.main(["verify", str(d)]) == 1


def test_tampered_golden_file_is_refused_by_its_checksum(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    data = bytearray((d / GOLDEN).read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    (d / GOLDEN).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"golden\.safetensors: sha256: expected [0-9a-f]{64}"):
        verify(d)
    assert cli.main(["verify", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ispa verify: error:")


def test_missing_golden_file_is_one_user_error(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    (d / GOLDEN).unlink()
    m = json.loads((d / "manifest.json").read_text())
    del m["files"][GOLDEN]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"golden\.safetensors: missing; expected the golden I/O written by `ispa export`$"):
        verify(d)
    (d / "golden_inputs.json").write_text("[]")  # an export from before golden.safetensors
    with pytest.raises(UserError, match=r"golden_\*\.json from an older ispa-export: re-export it"):
        verify(d)
    assert cli.main(["verify", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ispa verify: error:")


def _refusal(d: Path) -> str:
    with pytest.raises(UserError) as e:
        verify(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d}")
    return msg


def test_golden_inputs_and_outputs_must_match_the_graph(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    shape = list(load_artifact(d).inputs["latents"].shape)
    found = shape[:-1] + [shape[-1] - 1]
    _rewrite(d, lambda t: t.update({"input.latents": np.ascontiguousarray(t["input.latents"][..., :-1])}))
    assert _refusal(d) == (f"{d / GOLDEN}: input 'latents': expected float32{shape} (manifest.json), "
                           f"found float32{found}")

    d = _copy(tiny, tmp_path / "dtype")
    _rewrite(d, lambda t: t.update({"input.latents": t["input.latents"].astype(np.float16)}))
    assert _refusal(d) == f"{d / GOLDEN}: input 'latents': expected float32{shape} (manifest.json), found float16{shape}"

    d = _copy(tiny, tmp_path / "cache")  # a cache stored in the golden file (the old layout) is refused
    art = load_artifact(d)
    _rewrite(d, lambda t: t.update({"input.kv_s1w2": art.state["kv_s1w2"]}))
    msg = _refusal(d)
    assert msg.startswith(f"{d / GOLDEN}: inputs: expected [") and "less ['cross_kv', 'kv_full', 'kv_s1w2'] from " \
        "state.safetensors), found [" in msg and "'kv_s1w2'" in msg.split("found")[1]

    d = _copy(tiny, tmp_path / "out")
    _rewrite(d, lambda t: t.pop("output.new_kv_full"))
    assert _refusal(d).startswith(f"{d / GOLDEN}: outputs: expected ['new_kv_full', 'new_kv_s1w2', 'prediction'] "
                                  "(manifest.json), found ['new_kv_s1w2', 'prediction']")

    d = _copy(tiny, tmp_path / "kvshape")
    _rewrite(d, lambda t: t.update({"output.new_kv_s1w2": np.ascontiguousarray(t["output.new_kv_s1w2"][:, :, :, :-1])}))
    assert _refusal(d).startswith(f"{d / GOLDEN}: output 'new_kv_s1w2': expected float32[")


def test_golden_file_of_another_state_is_refused(tiny, video_b, tmp_path):
    d = _copy(tiny, tmp_path)
    shutil.copy(video_b / GOLDEN, d / GOLDEN)  # same graph I/O, another video's caches
    update_manifest_files(d, [GOLDEN])
    msg = _refusal(d)
    assert msg.startswith(f"{d / GOLDEN}: metadata state_sha256.") and "of state.safetensors), found " in msg
    assert msg.endswith("the golden pass ran on another state")


def test_bf16_export_golden_and_verify(tmp_path, capsys):
    """A bfloat16 graph: golden.safetensors holds ml_dtypes bfloat16 tensors, and verify passes (ONNX
    Runtime's CPU provider lacks bf16 Conv, so onnx.reference runs the graph) at the bf16 tolerance."""
    out = tmp_path / "bf16"
    assert cli.main(["export", *TINY, "--dtype", "bf16", "--out", str(out)]) == 0
    golden = read_golden(out / GOLDEN)
    assert golden.inputs["latents"].dtype.name == "bfloat16" and golden.inputs["timestep"].dtype.name == "float32"
    assert all(o.dtype.name == "bfloat16" for o in golden.outputs.values())
    assert not any(map(is_state_input, golden.inputs))
    capsys.readouterr()
    assert verify(out) == 0
    res = capsys.readouterr()
    rows = [l.split() for l in res.out.splitlines() if l.startswith(("onnxrt ", "onnxref "))]
    assert len(rows) == 3 and all(r[-1] == "pass" and r[4:6] == ["4e-02", "4e-02"] for r in rows)
    _perturb(out, "prediction", 0.5)  # far beyond bf16 rounding
    assert verify(out) == 1


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
    assert {"kv_full", "kv_full_mask", "kv_s1w2", "kv_s1w2_mask"} <= names


def test_polygraphy_inspect_and_sanitize_the_medium_graph(medium, tmp_path):
    art = load_artifact(medium)
    text = polygraphy_inspect(art.onnx_path)
    for name, spec in list(art.inputs.items()) + list(art.outputs.items()):
        assert name in text
    assert "MatMul" in text and "Softmax" in text
    folded = sanitize(art.onnx_path, tmp_path / "folded.onnx")
    assert check_onnx_for_tensorrt(folded, art.manifest["refit_names"]) == []
    # Folding must not change the function: the folded graph still meets the golden PyTorch outputs.
    feeds, golden = _golden(medium)
    got = slice_outputs(_ort(folded, feeds), golden.kv)
    atol, _ = TOLERANCES["float32"]["onnxrt"]
    for name, want in golden.outputs.items():
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
    import ispa_export.build.engine as engine_mod

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
    import ispa_export.build.engine as engine_mod

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
    feeds, golden = _golden(video_b)
    want = golden.outputs
    refitted = slice_outputs(_ort(tmp_path / "refitted.onnx", feeds), golden.kv)
    unrefitted = _ort(tiny / "model.onnx", feeds)
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
    import ispa_export.build.engine as engine_mod

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

    from ispa_export.build.engine import refit_for_artifact

    a, b = _copy(tiny, tmp_path / "a"), _copy(video_b, tmp_path / "b")
    record = build_for_artifact(a, 1 << 30, progress=False)
    manifest = json.loads((a / "manifest.json").read_text())
    assert record == manifest["tensorrt"] and record["refit_names"] == manifest["refit_names"]
    assert record["refittable"] and record["gpu"] and record["compute_capability"]
    assert load_artifact(a).engine_path() == a / ENGINE and (a / "timing.cache").is_file()
    assert verify(a, trt=True) == 0  # TensorRT and ORT both against PyTorch

    feeds, golden = _golden(b)
    want = golden.outputs
    atol, rtol = TOLERANCES["float32"]["tensorrt"]
    with TrtRunner(a / ENGINE, copy_outputs=True) as runner:
        before = runner.run(feeds)
    assert np.abs(before["prediction"] - want["prediction"]).max() > 10 * atol  # A's weights: not B's answer

    refit_for_artifact(b, a)  # A's engine, B's corrections, no rebuild
    assert load_artifact(b).engine_path() == b / ENGINE
    with TrtRunner(b / ENGINE, copy_outputs=True) as runner:
        after = slice_outputs(runner.run(feeds), golden.kv)
    for name in want.keys():
        np.testing.assert_allclose(after[name], want[name], atol=atol, rtol=rtol)
    assert verify(b, trt=True) == 0
