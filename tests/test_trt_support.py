"""TensorRT support checks (no TensorRT needed) and the TensorRT build/refit/runner (skipped without it)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ispa_export.errors import UserError
from ispa_export.builder.trt_support import check_onnx_for_tensorrt, load_table, polygraphy_inspect, sanitize

REPO = Path(__file__).resolve().parents[1]
WHERE = "onnx-tensorrt operators.md, TensorRT 10.15"
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (tensorrt cannot be imported)")


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    ops = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(g, opset_imports=ops)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _supported_model():
    """Attention-output-like block in the contract's dtypes: float32 activations, bool frame mask,
    int64 scalar frame index, an fp16 round trip, and the o-projection bias as a separate Add."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "blocks.0.self_attn.o.weight")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "blocks.0.self_attn.o.bias")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [
        helper.make_node("MatMul", ["x", "blocks.0.self_attn.o.weight"], ["xw"], name="o_proj"),
        helper.make_node("Add", ["xw", "blocks.0.self_attn.o.bias"], ["xb"], name="o_bias"),
        helper.make_node("Softmax", ["xb"], ["sm"], name="softmax", axis=-1),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask3"], name="mask_unsq"),
        helper.make_node("Where", ["mask3", "sm", "zero"], ["masked"], name="mask_where"),
        helper.make_node("Cast", ["frame_index"], ["fi"], name="fi_cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["masked", "fi"], ["shifted"], name="fi_add"),
        helper.make_node("Cast", ["shifted"], ["h16"], name="to_fp16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["h16"], ["y"], name="to_fp32", to=TensorProto.FLOAT),
    ]
    axes = numpy_helper.from_array(np.array([0, 2], np.int64), "axes")
    return _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [2, 4, 8]), _vi("mask", TensorProto.BOOL, [4]),
         _vi("frame_index", TensorProto.INT64, [])],
        [_vi("y", TensorProto.FLOAT, [2, 4, 8])],
        [w, b, zero, axes],
    )


def test_table_keeps_its_source_and_reads_the_matrix():
    t = load_table()
    assert t["source"]["url"] == "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md"
    assert t["source"]["tensorrt_version"] == "10.15"
    assert (t["source"]["opset_min"], t["source"]["opset_max"]) == (9, 24)
    assert len(t["ops"]) == 200 and sum(e["supported"] for e in t["ops"].values()) == 158
    assert t["ops"]["MatMul"] == {"supported": True, "types": ["FLOAT", "FLOAT16", "BFLOAT16"]}
    assert t["ops"]["Det"]["supported"] is False
    assert "DOUBLE" not in t["dtypes"]["supported"]


def test_fully_supported_graph_has_no_problems():
    m = _supported_model()
    onnx.checker.check_model(m, full_check=True)
    assert check_onnx_for_tensorrt(m, refit_names=["blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias"]) == []


def test_path_input_with_external_weights_is_checked_without_loading_them(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_supported_model(), p, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert check_onnx_for_tensorrt(p, refit_names=["blocks.0.self_attn.o.weight"]) == []


def test_op_marked_unsupported_in_the_table_is_named():
    # Det is in the table with "N": TensorRT's parser does not take it (any 10.x/11.x release).
    m = _model([helper.make_node("Det", ["x"], ["y"], name="det")],
               [_vi("x", TensorProto.FLOAT, [3, 3])], [_vi("y", TensorProto.FLOAT, [])])
    assert check_onnx_for_tensorrt(m) == [
        f"node 'det' (Det, domain 'ai.onnx'): op is marked unsupported in TensorRT's ONNX operator table ({WHERE})"
    ]


def test_ops_inside_model_local_functions_are_checked():
    # The parser expands local functions (exporters emit them), so the check looks inside too.
    f = helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node("Det", ["a"], ["b"], name="det")],
                             [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("Block", ["x"], ["y"], domain="local", name="call")], "g",
                          [_vi("x", TensorProto.FLOAT, [3, 3])], [_vi("y", TensorProto.FLOAT, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[f])
    (problem,) = check_onnx_for_tensorrt(m)
    assert problem.startswith("node 'det") and "(Det, domain 'ai.onnx'): op is marked unsupported" in problem


def test_op_of_another_domain_is_not_listed():
    m = _model([helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fmm", domain="com.microsoft")],
               [_vi("a", TensorProto.FLOAT, [2, 2]), _vi("b", TensorProto.FLOAT, [2, 2])],
               [_vi("y", TensorProto.FLOAT, [2, 2])], extra_opsets=[("com.microsoft", 1)])
    assert check_onnx_for_tensorrt(m) == [
        f"node 'fmm' (FusedMatMul, domain 'com.microsoft'): op is not listed in TensorRT's ONNX operator table ({WHERE})"
    ]


def test_float64_and_complex_tensors_are_rejected():
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="up", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["y"], name="down", to=TensorProto.FLOAT),
        helper.make_node("Identity", ["c"], ["c_out"], name="cid"),
    ]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [4]), _vi("c", TensorProto.COMPLEX64, [2])],
               [_vi("y", TensorProto.FLOAT, [4]), _vi("c_out", TensorProto.COMPLEX64, [2])])
    assert check_onnx_for_tensorrt(m) == [
        f"tensor 'c' (graph input): dtype COMPLEX64 is not supported by TensorRT ({WHERE})",
        f"tensor 'c_out' (graph output): dtype COMPLEX64 is not supported by TensorRT ({WHERE})",
        "tensor 'x64' (intermediate): dtype DOUBLE is not supported by TensorRT (the parser casts DOUBLE "
        "down to FLOAT, clamping to +-FLT_MAX); export it as FLOAT, FLOAT16 or BFLOAT16",
    ]


def test_float64_initializer_and_op_dtype_outside_the_ops_list():
    w = numpy_helper.from_array(np.ones(4, np.float64), "w64")
    nodes = [
        helper.make_node("Cast", ["w64"], ["w"], name="wcast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "w"], ["y"], name="add"),
        helper.make_node("MatMul", ["ia", "ib"], ["ic"], name="int_mm"),
        helper.make_node("Cast", ["x"], ["u8"], name="to_u8", to=TensorProto.UINT8),
        helper.make_node("Cast", ["u8"], ["z"], name="from_u8", to=TensorProto.FLOAT),
    ]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [4]), _vi("ia", TensorProto.INT32, [2, 2]),
                       _vi("ib", TensorProto.INT32, [2, 2])],
               [_vi("y", TensorProto.FLOAT, [4]), _vi("ic", TensorProto.INT32, [2, 2]),
                _vi("z", TensorProto.FLOAT, [4])], [w])
    assert check_onnx_for_tensorrt(m) == [
        "tensor 'u8' (intermediate): dtype UINT8 is supported by TensorRT only on network inputs and outputs",
        "tensor 'w64' (initializer): dtype DOUBLE is not supported by TensorRT (the parser casts DOUBLE "
        "down to FLOAT, clamping to +-FLT_MAX); export it as FLOAT, FLOAT16 or BFLOAT16",
        f"node 'int_mm' (MatMul, domain 'ai.onnx'): input 'ia' has dtype INT32; TensorRT supports MatMul "
        f"with FLOAT, FLOAT16, BFLOAT16 ({WHERE})",
    ]


def test_symbolic_and_unknown_dims_on_graph_io():
    # Output shapes are judged after shape inference: the engine's outputs follow from its inputs.
    x = _vi("x", TensorProto.FLOAT, ["B", None])
    y = _vi("y", TensorProto.FLOAT, ["B", 8])
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y])
    assert check_onnx_for_tensorrt(m) == [
        "graph input 'x': dim 0 is symbolic ('B'); the graph contract requires fixed shapes",
        "graph input 'x': dim 1 is unknown; the graph contract requires fixed shapes",
        "graph output 'y': dim 0 is symbolic ('B'); the graph contract requires fixed shapes",
    ]
    shapeless = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [_vi("y", TensorProto.FLOAT, [2])])
    assert check_onnx_for_tensorrt(shapeless) == [
        "graph input 'x': has no shape; the graph contract requires fixed shapes"
    ]


def test_opset_outside_the_parsers_range():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
               [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])], opset=26)
    assert check_onnx_for_tensorrt(m) == [
        "model opset 26 (domain 'ai.onnx') is outside opsets 9-24 supported by TensorRT 10.15's parser"
    ]


def test_refit_names_missing_duplicated_or_unused():
    inits = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("w", "dup", "dup", "unused")]
    nodes = [helper.make_node("Add", ["x", "w"], ["t"], name="a1"), helper.make_node("Add", ["t", "dup"], ["y"], name="a2")]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])], inits)
    assert check_onnx_for_tensorrt(m, refit_names=["w", "w", "nope", "unused", "dup"]) == [
        "initializer 'dup' is defined 2 times",
        "refit name 'w' is listed 2 times",
        "refit name 'nope' is not an initializer of the graph",
        "refit name 'unused' is an initializer that no node consumes",
    ]


def test_polygraphy_inspect_without_tensorrt(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_supported_model(), p)
    text = polygraphy_inspect(p)
    assert "ONNX Opset: 17" in text
    assert "x [dtype=float32, shape=(2, 4, 8)]" in text and "mask [dtype=bool, shape=(4,)]" in text
    assert "y [dtype=float32, shape=(2, 4, 8)]" in text
    assert "o_proj" in text and "MatMul" in text


def test_sanitize_folds_constants_and_keeps_outputs(tmp_path):
    pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed (Polygraphy folding needs it)")
    ort = pytest.importorskip("onnxruntime")
    c = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.full(4, v, np.float32)))
         for n, v in (("c1", 1.5), ("c2", -0.25))]
    nodes = c + [helper.make_node("Add", ["c1", "c2"], ["c3"]), helper.make_node("Mul", ["c3", "c3"], ["c4"]),
                 helper.make_node("Add", ["x", "c4"], ["y"])]
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_model(nodes, [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])]), src)
    assert sanitize(src, out) == out
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    x = np.arange(4, dtype=np.float32)
    (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x + 1.5625, rtol=0, atol=0)


def test_build_and_refit_raise_one_line_errors_without_tensorrt(monkeypatch, tmp_path):
    """The build (ispa_export.builder.engine) and the per-video refit (runtimes.trt.TrtEngine, which loads
    the engine a refit changes) each stop in one line where tensorrt cannot be imported."""
    from ispa_export.builder import engine
    from runtimes.trt import TrtEngine

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    with pytest.raises(UserError) as e:
        engine.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", workspace_bytes=1 << 30, timing_cache_path=None)
    assert str(e.value) == ("TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver); "
                            "use --backend ort to run without it")
    with pytest.raises(RuntimeError) as e:
        TrtEngine(tmp_path / "m.plan")
    assert str(e.value) == "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver)"
    assert not (tmp_path / "m.plan").exists()


def test_bfloat16_refit_bits_round_to_nearest_even():
    # numpy has no bfloat16: refit weights go to TensorRT as bit patterns, rounded to nearest even.
    from runtimes.trt import _bf16_bits as refit_bits

    x = np.float32([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -0.0, np.inf, 65504.0])
    np.testing.assert_array_equal(refit_bits(x), np.uint16([0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F80, 0x4780]))
    assert refit_bits(np.float32([np.nan]))[0] & 0x7FC0 == 0x7FC0


def test_runtimes_trt_imports_without_torch_tensorrt_or_toolkit():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"  # None: import raises ImportError
        "import runtimes.trt as r\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ispa_export', 'graphs', 'tensorrt', 'torch')"
        " and sys.modules[m] is not None)\n"
        "assert not bad, bad\n"
        "try:\n"
        "    r.TrtRunner('missing.plan')\n"
        "except RuntimeError as e:\n"
        "    assert str(e).startswith('TensorRT is not installed'), e\n"
        "else:\n"
        "    raise AssertionError('TrtRunner without tensorrt did not raise')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# ---- TensorRT itself: these need `tensorrt` and an NVIDIA GPU -------------------------------------------------

def _refit_graph(w, b):
    """y = x @ W + b with W and the bias as separate refittable initializers (bias kept out of a fused GEMM)."""
    nodes = [helper.make_node("MatMul", ["x", "blocks.0.self_attn.o.weight"], ["xw"], name="o_proj"),
             helper.make_node("Add", ["xw", "blocks.0.self_attn.o.bias"], ["y"], name="o_bias")]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [16, 32])], [_vi("y", TensorProto.FLOAT, [16, 32])],
                  [numpy_helper.from_array(w, "blocks.0.self_attn.o.weight"),
                   numpy_helper.from_array(b, "blocks.0.self_attn.o.bias")])


@needs_trt
def test_engine_build_and_refit_change_the_output_as_they_should(tmp_path):
    from ispa_export.builder.engine import build_engine
    from runtimes.trt import TrtEngine, TrtRunner

    rng = np.random.default_rng(1)
    w0, b0 = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    onnx_path, plan, cache = tmp_path / "m.onnx", tmp_path / "m.plan", tmp_path / "timing.cache"
    onnx.save(_refit_graph(w0, b0), onnx_path)
    assert check_onnx_for_tensorrt(onnx_path, ["blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias"]) == []
    meta = build_engine(onnx_path, plan, workspace_bytes=1 << 28, timing_cache_path=cache, progress=False)
    assert plan.stat().st_size > 0 and cache.stat().st_size > 0
    assert meta["tensorrt_version"].split(".")[0] in ("10", "11") and meta["build_seconds"] > 0
    assert {"blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias"} <= set(meta["refittable_weights"])

    x = rng.standard_normal((16, 32)).astype(np.float32)
    tol = dict(rtol=2e-2, atol=2e-2)  # TF32 matmuls on Ampere and later
    engine = TrtEngine(plan)  # once per deployment; a video's refit changes it in place
    with TrtRunner(engine) as r:
        np.testing.assert_allclose(r.run({"x": x})["y"], x @ w0 + b0, **tol)

    w1, b1 = w0 + 0.5 * rng.standard_normal((32, 32)).astype(np.float32), b0 + 3.0
    weights = {"blocks.0.self_attn.o.weight": w1, "blocks.0.self_attn.o.bias": b1}
    assert engine.refit(weights) == sorted(weights)
    with TrtRunner(engine) as r:
        y1 = r.run({"x": x})["y"].copy()
    np.testing.assert_allclose(y1, x @ w1 + b1, **tol)
    # The bias alone moves the output by exactly +3 in expectation: a dropped bias (TensorRT 11.3 REFIT issue) fails here.
    assert abs(float(np.mean(y1 - x @ w1)) - float(np.mean(b1))) < 0.05

    with pytest.raises(ValueError, match="weights not refittable in this engine: nope$"):
        engine.refit({"nope": w1})
    with pytest.raises(ValueError, match=r"weight 'blocks\.0\.self_attn\.o\.bias' has 31 elements"):
        engine.refit({"blocks.0.self_attn.o.bias": np.ones(31, np.float32)})


@needs_trt
def test_trt_runner_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from ispa_export.builder.engine import build_engine
    from runtimes.trt import TrtRunner

    p, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    onnx.save(_supported_model(), p)
    build_engine(p, plan, workspace_bytes=1 << 28, timing_cache_path=None, refit=False, progress=False)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 4, 8)).astype(np.float32),
             "mask": np.array([True, False, True, True]), "frame_index": np.array(7, np.int64)}
    with TrtRunner(plan) as r:
        assert r.input_names == ["x", "mask", "frame_index"] and r.output_names == ["y"]
        assert r.input_dtypes == {"x": np.float32, "mask": np.bool_, "frame_index": np.int64}
        assert r.output_shapes == {"y": (2, 4, 8)} and r.nbytes() == 2 * 64 * 4 + 4 + 8
        got = {k: v.copy() for k, v in r.run(feeds).items()}
        # Other dtypes are cast like the ONNX Runtime runner does; a wrong shape is an error.
        np.testing.assert_array_equal(r.run({**feeds, "x": feeds["x"].astype(np.float64)})["y"], got["y"])
        with pytest.raises(ValueError, match=r"input 'x': expected float32\[2, 4, 8\], got float32\[2, 4, 9\]"):
            r.run({**feeds, "x": np.zeros((2, 4, 9), np.float32)})
    (ref,) = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got["y"], ref, rtol=2e-2, atol=2e-2)
