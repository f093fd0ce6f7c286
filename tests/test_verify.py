"""Golden parity (`ispa verify`, golden.safetensors), the CPU-side TensorRT checks of exported graphs, `ispa engine`
without TensorRT, many videos on one deployment's graph (each video's corrections bound or refitted by name), and
the TensorRT build/run/refit (skipped without it)."""

import importlib.util
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from exports import export_transitioned, update_manifest_files
from graphs.config import WanConfig, preset
from graphs.wan import WanModel
from ispa_export import cli
from ispa_export.builder.calibrate import IspaOptions, report, transition
from ispa_export.builder.engine import ENGINE, build_for_artifact, check_artifact
from ispa_export.builder.trt_support import check_onnx_for_tensorrt, polygraphy_inspect, sanitize
from ispa_export.builder.verify import (GOLDEN, KV_TOKENS, STATE_SEED, TOLERANCES, example_feeds, golden_layout,
                                      golden_outputs, is_state_input, layout_nbytes, load_golden, read_golden,
                                      slice_outputs, synthetic_state, tensor_sha256, verify)
from ispa_export.errors import UserError
from ispa_export.models import BAKED, load_baked
from ispa_export.video.modulation import absorptions_from, with_corrections
from runtimes.artifact import ArtifactError, load_artifact
from runtimes.deployment import Deployment
from runtimes.files import file_record, sha256_file
from runtimes.groups import Span
from runtimes.instance import INSTANCE_JSON, INSTANCE_STATE, load_instance

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (tensorrt cannot be imported)")
no_trt = pytest.mark.skipif(HAVE_TRT, reason="checks the message shown where TensorRT is missing")
# 2 of 4 layers local: the graph has two cache groups (kv_full and kv_s1w2, one sink frame pinned).
# The gate off: a 4-chunk warmup gives the held-out gate no evidence, and the per-video tests need
# corrections. Baked modulation: the per-video constants are the graph's refit names.
TINY = ["--model", "tiny", "--kv-reduction", "0.25", "--window", "2", "--sink", "1", "--warmup-chunks", "4",
        "--no-gate", "--modulation", "baked", "--seed", "0"]
MEDIUM = preset("tiny").replace(dim=128, num_heads=4, ffn_dim=256, num_layers=4, latent_height=8, latent_width=8,
                                max_frames=8)


def _ispa() -> list[str]:
    """The `ispa` command as installed (the console script beside this Python), else its equivalent."""
    script = Path(sys.executable).with_name("ispa")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ispa_export.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """`ispa export` of the tiny preset, run as a user runs it (a process of its own): DIR and the process."""
    out = tmp_path_factory.mktemp("tiny") / "art"
    # One intra-op thread, as conftest gives this process: the tiny graph is faster so on two shared cores.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([*_ispa(), "export", *TINY, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    return out, res


@pytest.fixture(scope="module")
def tiny(tiny_export):
    out, res = tiny_export
    assert res.returncode == 0, res.stderr
    return out


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def video_b(tmp_path_factory, tiny):
    """Another video (another noise seed and prompt) absorbed into the `tiny` deployment by `ispa absorb`;
    also the deployment's files as they were before the absorb."""
    before = _snapshot(tiny)
    out = tmp_path_factory.mktemp("b") / "instance"
    assert cli.main(["absorb", str(tiny), "--seed", "1", "--out", str(out), "--device", "cpu"]) == 0
    return out, before


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A wider, deeper graph (dim 128, 16 tokens per frame, 8-frame cache), 2 of 4 layers local."""
    torch.manual_seed(0)
    model = WanModel(MEDIUM).eval()
    ctx = torch.randn(1, 8, MEDIUM.text_dim, generator=torch.Generator().manual_seed(0))
    opts = IspaOptions(kv_reduction=0.3, window=MEDIUM.chunk_frames, sink=1, warmup_chunks=4, gate=False)
    stream, monitor, tr = transition(model, ctx, 0, opts)
    out = tmp_path_factory.mktemp("medium") / "art"
    export_transitioned(out, model, stream, report(model, monitor, tr, opts), preset="medium")
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _golden(d: Path):
    """The full feeds of the golden pass (state + golden inputs) and the golden file, as verify reads them."""
    return load_golden(load_artifact(d))


def _rewrite(d: Path, change=None, metadata=None) -> None:
    """Apply `change(tensors)` to golden.safetensors' tensors (file keys) and `metadata(metadata)` to its
    metadata, and re-list the file (its checksum) in the manifest."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(d / GOLDEN), framework="np") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if change is not None:
        change(tensors)
    if metadata is not None:
        metadata(meta)
    save_file(tensors, str(d / GOLDEN), metadata=meta)
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
    """A plain onnxruntime session on `feeds` (a baked graph's refit constants may be fed too: they
    are overridable initializers)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _base_model(d: Path) -> WanModel:
    """The deployment's PyTorch weights (its layout, zero corrections), as `ispa absorb` loads them."""
    cfg = WanConfig.from_dict(json.loads((d / "manifest.json").read_text())["model"]["config"])
    return load_baked(cfg, d / BAKED)


def _torch_outputs(base: WanModel, constants: dict, feeds: dict) -> dict:
    """PyTorch's chunk step with one video's corrections (its instance's tensors) on the base weights."""
    return golden_outputs(with_corrections(base, absorptions_from(base, constants)), feeds)


# -- the export as a user sees it --------------------------------------------------------------------

def test_export_prints_no_third_party_warnings(tiny_export):
    """`ispa export` on a terminal shows its own progress lines and result only: no warning of a library
    (torch.onnx's about torchvision, onnxruntime's, Python's *Warning categories)."""
    _, res = tiny_export
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stderr.replace("\r", "\n").splitlines() if l.strip()]
    assert not [l for l in lines if "torchvision" in l or "Warning" in l], lines
    assert any(l.startswith("build: tracing the chunk step to ONNX (fp32, modulation baked)") for l in lines), lines
    assert res.stdout.startswith("exported ")


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
    assert np.abs(feeds["latents"]).std() > 0.5  # a denoising step's noise (example_feeds), not the trace's zeros
    # The state inputs are drawn again from the recorded seed, and are what the golden pass ran on.
    assert golden.metadata["state_seed"] == str(STATE_SEED)
    state = sorted(n for n in art.inputs if is_state_input(n))
    assert state == ["cross_kv", "kv_full", "kv_s1w2"] and golden.metadata["state_inputs"] == ",".join(state)
    assert all(golden.metadata["state_sha256." + n] == tensor_sha256(feeds[n]) for n in state)
    # Baked modulation, variant "full": W_o' (transposed) and the absorbed bias of each L-layer, not
    # among the manifest's inputs (overridable initializers) and with their shapes recorded.
    names = art.manifest["refit_names"]
    assert len(names) == 2 * art.geometry.modes.count("L") > 0 and not set(names) & set(art.inputs)
    assert sorted(art.manifest["refit_shapes"]) == sorted(names)


def test_save_golden_stores_step_inputs_and_sliced_kv(tmp_path):
    from ispa_export.builder.verify import save_golden
    from ispa_export.video.torch_runner import geometry

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    model.set_layout([None, Span(0, 2), Span(1, 3), Span(0, 2)])  # three cache groups
    geo = geometry(cfg, model.layout)
    feeds = example_feeds(model, geo, "baked")
    assert save_golden(tmp_path, model, feeds, kv_tokens=5) == [GOLDEN]
    assert [p.name for p in tmp_path.iterdir()] == [GOLDEN]  # written atomically: no temporary left
    golden = read_golden(tmp_path / GOLDEN)
    tokens = geo.tokens_per_frame * geo.chunk_frames
    assert golden.kv == slice(0, tokens, -(-tokens // 5)) and golden.metadata["kv_slice"] == f"0:{tokens}:{golden.kv.step}"
    state = {"cross_kv", "kv_full", "kv_s0w2", "kv_s1w3"}
    assert set(golden.inputs) == set(feeds) - state and golden.metadata["state_inputs"] == ",".join(sorted(state))
    assert all(np.array_equal(golden.inputs[k], feeds[k]) for k in golden.inputs)
    # The state is not stored: its seed and fingerprints are, and the seed gives it back bit for bit.
    specs = {k: (feeds[k].shape, feeds[k].dtype.name) for k in state}
    again = synthetic_state(specs, int(golden.metadata["state_seed"]))
    assert all(np.array_equal(again[k], feeds[k]) for k in state)
    assert {k: golden.metadata["state_sha256." + k] for k in state} == {k: tensor_sha256(feeds[k]) for k in state}
    other = synthetic_state(specs, int(golden.metadata["state_seed"]) + 1)
    assert all(tensor_sha256(other[k]) != golden.metadata["state_sha256." + k] for k in state)
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
    """golden.safetensors never holds caches, text K/V or modulation inputs (a video's instance holds
    those), and its size is bounded at the Wan 1.3B geometry (computed from shapes, no model built)."""
    art = load_artifact(tiny)
    state = load_instance(tiny / "instance", art).state
    golden = read_golden(tiny / GOLDEN)
    assert not any(is_state_input(n) for n in [*golden.inputs, *golden.outputs])
    assert {"kv_full", "kv_s1w2", "cross_kv"} <= set(state)
    layout = golden_layout({n: (s.shape, s.dtype) for n, s in art.inputs.items()},
                           {n: (s.shape, s.dtype) for n, s in art.outputs.items()})
    assert (tiny / GOLDEN).stat().st_size <= layout_nbytes(layout) + 8192  # tensors + a small header
    assert layout_nbytes(layout) < sum(state[k].nbytes for k in ("kv_full", "kv_s1w2", "cross_kv"))

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
    feeds, _ = _golden(d)
    _rewrite(d, lambda t: t.update({"input.kv_s1w2": feeds["kv_s1w2"]}))
    msg = _refusal(d)
    assert msg.startswith(f"{d / GOLDEN}: inputs: expected [") and "less ['cross_kv', 'kv_full', 'kv_s1w2'], drawn " \
        "from the file's state_seed), found [" in msg and "'kv_s1w2'" in msg.split("found")[1]

    d = _copy(tiny, tmp_path / "out")
    _rewrite(d, lambda t: t.pop("output.new_kv_full"))
    assert _refusal(d).startswith(f"{d / GOLDEN}: outputs: expected ['new_kv_full', 'new_kv_s1w2', 'prediction'] "
                                  "(manifest.json), found ['new_kv_s1w2', 'prediction']")

    d = _copy(tiny, tmp_path / "kvshape")
    _rewrite(d, lambda t: t.update({"output.new_kv_s1w2": np.ascontiguousarray(t["output.new_kv_s1w2"][:, :, :, :-1])}))
    assert _refusal(d).startswith(f"{d / GOLDEN}: output 'new_kv_s1w2': expected float32[")


def test_golden_file_of_other_inputs_is_refused(tiny, tmp_path):
    """The golden pass's state inputs are regenerated from its seed: a file whose recorded fingerprint or
    seed does not give the inputs it ran on is refused, whatever its outputs."""
    d = _copy(tiny, tmp_path / "sha")
    feeds, _ = _golden(d)
    fake = tensor_sha256(feeds["kv_full"] + np.float32(1))
    _rewrite(d, metadata=lambda m: m.update({"state_sha256.kv_full": fake}))
    assert _refusal(d) == (f"{d / GOLDEN}: metadata state_sha256.kv_full: expected {tensor_sha256(feeds['kv_full'])} "
                           f"(input 'kv_full' drawn from seed {STATE_SEED}), found {fake}: the golden pass ran on "
                           "other inputs")

    d = _copy(tiny, tmp_path / "seed")  # another seed: other caches, text K/V
    _rewrite(d, metadata=lambda m: m.update(state_seed=str(STATE_SEED + 1)))
    msg = _refusal(d)
    assert msg.startswith(f"{d / GOLDEN}: metadata state_sha256.")
    assert f"drawn from seed {STATE_SEED + 1}), found " in msg
    assert msg.endswith("the golden pass ran on other inputs")

    d = _copy(tiny, tmp_path / "noseed")
    _rewrite(d, metadata=lambda m: m.update(state_seed="zero"))
    assert _refusal(d) == f"{d / GOLDEN}: metadata state_seed: expected an integer, found 'zero'"


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
    man = json.loads((d / "manifest.json").read_text())
    local = next(l["index"] for l in man["layers"] if l["mode"] == "L")
    extra = f"blocks.{local}.self_attn.ispa_weight_t"  # an L-layer's, but not in the graph
    update_manifest_files(d, ["model.onnx"], {"refit_names": man["refit_names"] + [extra],
                                              "refit_shapes": dict(man["refit_shapes"], **{extra: [64, 64]})})
    with pytest.raises(UserError) as e:
        build_for_artifact(d, 1 << 30)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d / 'model.onnx'}: TensorRT would reject the graph (2 problem(s)): ")
    assert "node 'bad_det' (Det, domain 'ai.onnx'): op is marked unsupported" in msg
    assert f"refit name '{extra}' is not an initializer of the graph" in msg
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


def test_engine_build_records_the_engine_beside_the_manifest(tiny, tmp_path, monkeypatch, capsys):
    import ispa_export.builder.engine as engine_mod

    d = _copy(tiny, tmp_path)
    build, calls = _fake_build()
    monkeypatch.setattr(engine_mod, "_trt", lambda: None)
    monkeypatch.setattr(engine_mod, "build_engine", build)
    assert cli.main(["engine", str(d), "--workspace-gib", "2"]) == 0
    (call,) = calls
    assert call["onnx"] == d / "model.onnx" and call["cache"] == d / "timing.cache" and call["refit"]
    assert call["engine"].parent == d and call["engine"].name != ENGINE and call["workspace"] == 2 << 30
    art = load_artifact(d)  # the deployment's checksums hold: its manifest is untouched
    assert art.engine_path() == d / ENGINE and not call["engine"].exists()
    t = json.loads((d / "engine.json").read_text())
    assert t == {"engine": ENGINE, "timing_cache": "timing.cache", "tensorrt_version": "10.99", "gpu": "Fake GPU",
                 "compute_capability": "9.0", "build_seconds": 1.25, "workspace_bytes": 2 << 30,
                 "strongly_typed": True, "refittable": True, "refit_names": art.manifest["refit_names"],
                 "refittable_weight_count": len(art.manifest["refit_names"]) + 1, "decoder_engines": [],
                 "deployment_manifest_sha256": hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest(),
                 "bytes": (d / ENGINE).stat().st_size,
                 "sha256": hashlib.sha256((d / ENGINE).read_bytes()).hexdigest()}
    assert f"engine {d / ENGINE}: TensorRT 10.99 on Fake GPU (sm 9.0)" in capsys.readouterr().out


def test_engine_with_a_refit_name_folded_away_is_refused(tiny, tmp_path, monkeypatch):
    import ispa_export.builder.engine as engine_mod

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


# -- many videos, one graph (what can be checked without TensorRT) -----------------------------------

def test_two_videos_absorbed_into_one_deployment_run_its_one_graph(tiny, video_b):
    """`ispa absorb` writes nothing into DEPLOY (no trace, no engine build): every video of a deployment
    runs the same graph, each with its own correction, held by its instance under the graph's refit
    names and shapes; one ONNX Runtime session serves them all."""
    b, before = video_b
    assert _snapshot(tiny) == before
    art = load_artifact(tiny)
    identity = sha256_file(art.manifest_path)
    a_inst, b_inst = load_instance(tiny / "instance", art), load_instance(b, art)
    assert a_inst.record["deployment_manifest_sha256"] == b_inst.record["deployment_manifest_sha256"] == identity
    assert (a_inst.seed, b_inst.seed) == (0, 1)
    names, shapes = art.manifest["refit_names"], art.manifest["refit_shapes"]
    for inst in (a_inst, b_inst):
        assert sorted(inst.constants) == sorted(names) == sorted(inst.record["modulation"])
        assert {n: list(v.shape) for n, v in inst.constants.items()} == shapes
        assert all(v.dtype.name == art.geometry.dtype for v in inst.constants.values())
    assert all(not np.array_equal(a_inst.constants[n], b_inst.constants[n]) for n in names)  # a correction each

    dep = Deployment.open(tiny, "ort")
    va, vb = dep.start(a_inst), dep.start(b_inst)
    assert va.stream.runner.engine is vb.stream.runner.engine is dep.engine  # one session, two videos
    xa, xb = va.step(), vb.step()
    solo = Deployment.open(tiny, "ort").start(b)
    np.testing.assert_allclose(xb, solo.step(), rtol=0, atol=1e-6)  # as alone on its own session
    assert np.abs(xa - xb).max() > 1e-2


def test_a_refit_by_name_gives_each_video_its_own_outputs(tiny, video_b, tmp_path):
    """What a TensorRT refit does to the deployment's engine (runtimes.trt.TrtEngine.refit: each refit
    name set from the instance), done on the ONNX: the graph then computes that video's PyTorch step,
    as it does with the instance's tensors bound over the constants (ONNX Runtime's per-video path)."""
    b, _ = video_b
    art = load_artifact(tiny)
    feeds, golden = _golden(tiny)
    base = _base_model(tiny)
    atol, rtol = TOLERANCES["float32"]["onnxrt"]
    for video in (tiny / "instance", b):
        constants = load_instance(video, art).constants
        m = onnx.load(str(tiny / "model.onnx"))
        replaced = []
        for init in m.graph.initializer:
            if init.name in constants:
                init.CopyFrom(numpy_helper.from_array(constants[init.name], init.name))
                replaced.append(init.name)
        assert sorted(replaced) == sorted(art.manifest["refit_names"])  # every refit name is one initializer
        onnx.save(m, str(tmp_path / "refitted.onnx"))
        want = _torch_outputs(base, constants, feeds)
        refitted = _ort(tmp_path / "refitted.onnx", feeds)
        bound = _ort(tiny / "model.onnx", {**feeds, **constants})
        for name in want:
            np.testing.assert_allclose(refitted[name], want[name], atol=atol, rtol=rtol, err_msg=name)
            np.testing.assert_allclose(bound[name], want[name], atol=atol, rtol=rtol, err_msg=name)
        # Without them the graph computes the deployment's zero corrections (the golden step), not this video's.
        assert np.abs(golden.outputs["prediction"] - want["prediction"]).max() > 100 * atol


def _retensor(inst: Path, change) -> None:
    """Apply `change(tensors)` to instance.safetensors and re-record its size and sha256 in instance.json,
    so only what `change` did is wrong."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(inst / INSTANCE_STATE))
    change(tensors)
    save_file(tensors, str(inst / INSTANCE_STATE), metadata={"format": "ispa-instance"})
    record = json.loads((inst / INSTANCE_JSON).read_text())
    record["files"][INSTANCE_STATE] = file_record(inst / INSTANCE_STATE)
    (inst / INSTANCE_JSON).write_text(json.dumps(record))


def test_a_refit_tensor_of_another_shape_is_refused_in_one_line(tiny, tmp_path, capsys):
    from runtimes.run import main as run_main

    d = _copy(tiny, tmp_path)
    inst = d / "instance"
    art = load_artifact(d)
    name = art.manifest["refit_names"][0]
    shape = art.manifest["refit_shapes"][name]
    _retensor(inst, lambda t: t.update({name: np.ascontiguousarray(t[name][:-1])}))
    with pytest.raises(ArtifactError) as e:
        load_instance(inst, art)
    assert str(e.value) == (f"{inst / INSTANCE_STATE}: tensor {name!r}: expected float32{shape} (from the deployment's "
                            f"manifest.json), found float32{[shape[0] - 1] + shape[1:]}")
    # `runtimes` (and `ispa run`) refuse it before a chunk, in one line.
    assert run_main([str(d), "--chunks", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == f"error: {e.value}"
    assert not (tmp_path / "run" / "frames.npy").exists()

    _retensor(inst, lambda t: t.pop(name))  # a refit tensor missing
    with pytest.raises(ArtifactError, match=rf"tensor '{name}': expected float32\[.*\], found no such tensor$"):
        load_instance(inst, art)


def test_an_instance_of_another_deployment_is_refused(tiny, medium, tmp_path):
    """Another graph (the medium export), or the same graph with other weights: an instance absorbed
    into one deployment is refused by another, in one line naming both manifests' hashes."""
    other = load_artifact(medium)
    with pytest.raises(ArtifactError) as e:
        load_instance(tiny / "instance", other)
    mine, theirs = sha256_file(medium / "manifest.json"), sha256_file(tiny / "manifest.json")
    assert str(e.value).startswith(f"{tiny / 'instance' / INSTANCE_JSON}: deployment_manifest_sha256: expected {mine} "
                                   f"({medium / 'manifest.json'}), found {theirs}")
    with pytest.raises(ArtifactError, match="deployment_manifest_sha256"):
        Deployment.open(medium, "ort").start(tiny / "instance")

    d = _copy(tiny, tmp_path)  # the base weights changed (a W_o that is not a refit constant)
    names = set(json.loads((d / "manifest.json").read_text())["refit_names"])
    m = onnx.load(str(d / "model.onnx"))
    init = next(i for i in m.graph.initializer if i.name not in names and i.data_type == onnx.TensorProto.FLOAT
                and len(i.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(m, str(d / "model.onnx"))
    update_manifest_files(d, ["model.onnx"])
    with pytest.raises(ArtifactError, match=r"deployment_manifest_sha256: .*an instance absorbed into another "
                                            r"deployment"):
        load_instance(d / "instance", load_artifact(d))


def test_external_weights_keep_the_refit_constants_overridable(tiny, video_b, tmp_path):
    d = _copy(tiny, tmp_path)
    onnx.save(onnx.load(str(d / "model.onnx")), str(d / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    update_manifest_files(d, ["model.onnx", "model.onnx.data"])
    assert check_artifact(d) == []  # every refit name still one consumed initializer
    feeds, _ = _golden(d)
    constants = load_instance(video_b[0], load_artifact(tiny)).constants
    external, inline = _ort(d / "model.onnx", {**feeds, **constants}), _ort(tiny / "model.onnx", {**feeds, **constants})
    assert all(np.array_equal(external[n], inline[n]) for n in inline)


def test_building_the_engine_keeps_the_deployments_instances(tiny, tmp_path, monkeypatch):
    import ispa_export.builder.engine as engine_mod

    d = _copy(tiny, tmp_path)
    build, _ = _fake_build()
    monkeypatch.setattr(engine_mod, "_trt", lambda: None)
    monkeypatch.setattr(engine_mod, "build_engine", build)
    assert cli.main(["engine", str(d)]) == 0
    load_instance(d / "instance", load_artifact(d))  # `ispa run DIR --backend trt` starts from it


# -- TensorRT itself --------------------------------------------------------------------------------

@needs_trt
def test_tensorrt_build_run_and_refit(tiny, video_b, tmp_path):
    from runtimes.trt import TrtEngine, TrtRunner

    a = _copy(tiny, tmp_path / "a")
    record = build_for_artifact(a, 1 << 30, progress=False)
    manifest = json.loads((a / "manifest.json").read_text())
    assert record == json.loads((a / "engine.json").read_text()) and record["refit_names"] == manifest["refit_names"]
    assert record["refittable"] and record["gpu"] and record["compute_capability"]
    assert load_artifact(a).engine_path() == a / ENGINE and (a / "timing.cache").is_file()
    assert verify(a, trt=True) == 0  # TensorRT and ORT both against PyTorch

    feeds, golden = _golden(a)
    base = _base_model(a)
    atol, rtol = TOLERANCES["float32"]["tensorrt"]
    engine = TrtEngine(a / ENGINE)  # built once; each video refits it by name, no rebuild
    for video in (tiny / "instance", video_b[0]):
        constants = load_instance(video, load_artifact(tiny)).constants
        want = _torch_outputs(base, constants, feeds)
        assert np.abs(golden.outputs["prediction"] - want["prediction"]).max() > 10 * atol  # not the zero corrections
        assert engine.refit(constants) == sorted(constants)
        with TrtRunner(engine, copy_outputs=True) as runner:
            got = runner.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=rtol, err_msg=name)
