"""What TensorRT's ONNX parser will take, checked without TensorRT installed.

The op/dtype table is `data/trt_onnx_ops.json`, transcribed from onnx-tensorrt's
docs/operators.md (TensorRT 10.15, opsets 9-24):
https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
TensorRT 11 parses a superset (ONNX Opset Guide,
https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html), so a graph
that passes here is meant to parse on both the 10.x edge boxes and 11.x.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from pathlib import Path
from typing import Sequence

import onnx
import onnx.inliner
from onnx import TensorProto

from ispa_export.errors import UserError
from runtimes.files import atomic_path

_TABLE_PATH = Path(__file__).parents[1] / "data" / "trt_onnx_ops.json"
_STANDARD_DOMAINS = ("", "ai.onnx")


@functools.lru_cache(maxsize=1)
def load_table() -> dict:
    """The op table with its provenance (`source.url`, `source.tensorrt_version`)."""
    return json.loads(_TABLE_PATH.read_text())


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    # Weights are not needed for the check; skipping external data keeps a 14B export in reach.
    return onnx.load(os.fspath(model), load_external_data=False)


def _dim_problems(kind: str, vi: onnx.ValueInfoProto) -> list[str]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return [f"graph {kind} '{vi.name}': has no shape; the graph contract requires fixed shapes"]
    out = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            continue
        what = f"is symbolic ('{d.dim_param}')" if d.dim_param else "is unknown"
        out.append(f"graph {kind} '{vi.name}': dim {i} {what}; the graph contract requires fixed shapes")
    return out


def check_onnx_for_tensorrt(
    model: onnx.ModelProto | str | os.PathLike,
    refit_names: Sequence[str] | None = None,
) -> list[str]:
    """Every reason TensorRT's ONNX parser (per the table) or the graph contract would reject `model`.

    Checks: opset range, op support by op type and domain, dtype of every typed tensor (after
    ONNX shape inference) and of each node's first input against the op's listed types, fixed
    graph I/O shapes, and — when `refit_names` is given — that each refit name is a unique,
    consumed initializer. Returns an empty list when nothing was found.
    """
    table = load_table()
    src = table["source"]
    where = f"onnx-tensorrt operators.md, TensorRT {src['tensorrt_version']}"
    ops, dt = table["ops"], table["dtypes"]
    supported_dtypes = set(dt["supported"])
    problems: list[str] = []

    m = _load(model)
    for imp in m.opset_import:
        if imp.domain in _STANDARD_DOMAINS and not src["opset_min"] <= imp.version <= src["opset_max"]:
            problems.append(
                f"model opset {imp.version} (domain 'ai.onnx') is outside opsets "
                f"{src['opset_min']}-{src['opset_max']} supported by TensorRT {src['tensorrt_version']}'s parser"
            )
    if m.functions:
        # The parser expands model-local functions itself; check the ops it will actually see.
        m = onnx.inliner.inline_local_functions(m)
    m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    g = m.graph

    io_names = {vi.name for vi in g.input} | {vi.name for vi in g.output}
    types: dict[str, int] = {}
    role: dict[str, str] = {}
    for kind, vis in (("graph input", g.input), ("graph output", g.output), ("intermediate", g.value_info)):
        for vi in vis:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
                role.setdefault(vi.name, kind)
    for init in g.initializer:
        types.setdefault(init.name, init.data_type)
        role.setdefault(init.name, "initializer")

    for name, et in types.items():
        dname = _dtype_name(et)
        if dname in dt["limited"]:
            problems.append(
                f"tensor '{name}' ({role[name]}): dtype {dname} is not supported by TensorRT "
                f"({dt['limited'][dname]}); export it as FLOAT, FLOAT16 or BFLOAT16"
            )
        elif dname not in supported_dtypes:
            problems.append(f"tensor '{name}' ({role[name]}): dtype {dname} is not supported by TensorRT ({where})")
        elif dname in dt["io_only"] and name not in io_names:
            problems.append(
                f"tensor '{name}' ({role[name]}): dtype {dname} is supported by TensorRT only on network inputs and outputs"
            )

    for i, node in enumerate(g.node):
        label = f"node '{node.name or f'#{i}'}' ({node.op_type}, domain '{node.domain or 'ai.onnx'}')"
        entry = ops.get(node.op_type) if node.domain in _STANDARD_DOMAINS else None
        if entry is None:
            problems.append(f"{label}: op is not listed in TensorRT's ONNX operator table ({where})")
            continue
        if not entry["supported"]:
            problems.append(f"{label}: op is marked unsupported in TensorRT's ONNX operator table ({where})")
            continue
        # The table's "Supported Types" column describes the op's data input, which is input 0.
        first = node.input[0] if node.input else ""
        if first and first in types and entry["types"]:
            dname = _dtype_name(types[first])
            if dname in supported_dtypes and dname not in entry["types"]:
                problems.append(
                    f"{label}: input '{first}' has dtype {dname}; TensorRT supports {node.op_type} "
                    f"with {', '.join(entry['types'])} ({where})"
                )

    for vi in g.input:
        problems += _dim_problems("input", vi)
    for vi in g.output:
        problems += _dim_problems("output", vi)

    if refit_names is not None:
        init_count = collections.Counter(init.name for init in g.initializer)
        for name, n in init_count.items():
            if n > 1:
                problems.append(f"initializer '{name}' is defined {n} times")
        consumed = {x for node in g.node for x in node.input}
        for name, n in collections.Counter(refit_names).items():
            if n > 1:
                problems.append(f"refit name '{name}' is listed {n} times")
            if name not in init_count:
                problems.append(f"refit name '{name}' is not an initializer of the graph")
            elif name not in consumed:
                problems.append(f"refit name '{name}' is an initializer that no node consumes")
    return problems


def polygraphy_inspect(path: str | os.PathLike, show_layers: bool = True) -> str:
    """Polygraphy's `inspect model` summary (I/O, initializers, layers) of an ONNX file; no TensorRT needed."""
    # Same text as `polygraphy inspect model PATH --show layers`, through its Python API
    # (polygraphy.backend.onnx.util.str_from_onnx, Polygraphy 0.53).
    from polygraphy.backend.onnx.util import str_from_onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return str_from_onnx(model, show_layers=show_layers)


def sanitize(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`polygraphy surgeon sanitize --fold-constants PATH -o OUT`, via Polygraphy's Python API.

    Needs onnx-graphsurgeon (Polygraphy imports it for folding) and onnxruntime. `out` is replaced
    atomically; weights of a model over the 2 GiB protobuf limit go to `OUT.data` beside it.
    """
    try:
        import onnx_graphsurgeon  # noqa: F401
    except ImportError:
        raise UserError(
            f"{path}: constant folding needs onnx-graphsurgeon: pip install onnx-graphsurgeon"
        ) from None
    from polygraphy.backend.onnx import fold_constants, onnx_from_path, save_onnx

    out = Path(out)
    model = fold_constants(onnx_from_path(os.fspath(path)), error_ok=False)
    external = None
    if model.ByteSize() >= 2**31 - 1:
        external = out.name + ".data"
        (out.parent / external).unlink(missing_ok=True)
    with atomic_path(out) as tmp:
        save_onnx(model, os.fspath(tmp), external_data_path=external)
    return out
