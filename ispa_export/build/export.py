"""Export: the baked chunk step to a fixed-shape ONNX graph, and the artifact directory around it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from graphs.wan import WanModel
from runtimes.artifact import FORMAT, ONNX, POSITION_SCHEME, REPORT, SCHEMA_VERSION, STATE, cache_records, layer_records
from runtimes.buffers import host_dtype
from runtimes.driver import Stream
from runtimes.files import atomic_directory, file_records, write_json_atomic
from runtimes.groups import output_names

from ispa_export.errors import UserError
from ispa_export.kv import kv_bytes
from ispa_export.video.torch_runner import to_numpy, to_torch
from ispa_export.build.verify import golden_feeds, save_golden

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "bfloat16")}
FLOATS = ("float32", "float16", "bfloat16")
EXTERNAL_DATA_BYTES = 1 << 30
ONNX_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}


def modulation_constants(model: WanModel) -> dict[str, np.ndarray]:
    """The L-layers' W_o' and b_o' (absorbed bias included), stacked: the inputs of `--modulation input`."""
    weights, biases = [], []
    for block, span in zip(model.blocks, model.layout):
        if span is None:
            continue
        attn = block.self_attn
        if attn.ispa_weight is not None:
            raise UserError("--modulation input takes one folded W_o correction per layer; variant "
                            "'per_pass' and site 'adapter' need --modulation baked")
        bias = attn.o.bias if attn.ispa_bias is None else attn.o.bias + attn.ispa_bias[0]
        weights.append(to_numpy(attn.o.weight.float()))
        biases.append(to_numpy(bias.float()))
    return {"ispa_weight": np.stack(weights), "ispa_bias": np.stack(biases)}


def graph_feeds(stream: Stream, state: dict[str, np.ndarray], model: WanModel, modulation: str,
                np_dtype) -> dict[str, np.ndarray]:
    """Example inputs in the graph's contract, taken from the live stream (real caches, real masks)."""
    feeds = stream.feeds(np.zeros(stream.geo.chunk_shape, np.float32), 500.0, 0)
    groups = [g.name for g in stream.geo.groups]
    feeds.update({k: state[k] for k in ["cross_kv", *groups]})
    names = ["latents", "timestep", "rope_frame", "cross_kv", *(n for g in groups for n in (g, g + "_mask"))]
    if model.per_pass_kind():
        names.append("pass_kind")
    out = {k: feeds[k] for k in names}
    if modulation == "input":
        out.update(modulation_constants(model))
    # timestep and rope_frame stay float32 in every graph: fp16 positions would blur the angles.
    return {k: np.asarray(v).astype(np_dtype) if v.dtype.name in FLOATS and k not in ("timestep", "rope_frame") else v
            for k, v in out.items()}


def _rename_refit_weights(proto: onnx.ModelProto, wanted: dict[str, np.ndarray]) -> list[str]:
    """Give the L-layers' correction constants stable names (the optimiser folds W_o into an anonymous
    transposed initializer): found by value, renamed in the graph, returned for the manifest."""
    by_shape: dict[tuple, list[onnx.TensorProto]] = {}
    for init in proto.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    renames = {}
    for name, value in wanted.items():
        match = [t for t in by_shape.get(value.shape, [])
                 if t.name not in renames and np.array_equal(onnx.numpy_helper.to_array(t), value)]
        if len(match) != 1:
            raise RuntimeError(f"refit weight {name}: found {len(match)} initializers with its value, expected 1")
        renames[match[0].name] = name
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
    return list(wanted)


def refit_weights(model: WanModel, np_dtype) -> dict[str, np.ndarray]:
    """The per-instance constants of a baked graph, as they appear in ONNX (a single matrix is folded
    transposed by the exporter; per-pass-kind stacks stay as they are, gathered by `pass_kind`)."""
    out = {}
    for i, (block, span) in enumerate(zip(model.blocks, model.layout)):
        attn = block.self_attn
        if span is None or attn.ispa_bias is None:
            continue
        pre = f"blocks.{i}.self_attn."
        weight, bias = attn.ispa_weight, attn.ispa_bias.detach()
        if weight is None:
            out[pre + "o.weight_t"] = to_numpy(attn.o.weight.T)
        elif weight.shape[0] == 1:
            out[pre + "ispa_weight_t"] = to_numpy(weight[0].T)
        else:
            out[pre + "ispa_weight"] = to_numpy(weight)
        out[pre + "ispa_bias"] = to_numpy(bias[0] if bias.shape[0] == 1 else bias)
    return {k: v.astype(np_dtype) for k, v in out.items()}


def export_onnx(model: WanModel, feeds: dict[str, np.ndarray], path: Path, refit: bool) -> list[str]:
    """torch.onnx.export (dynamo) of the chunk step; returns the refittable initializer names."""
    kwargs = {k: to_torch(v, torch.device("cpu")) for k, v in feeds.items()}
    if "ispa_weight" in feeds:
        kwargs["ispa_weight"], kwargs["ispa_bias"] = kwargs.pop("ispa_weight"), kwargs.pop("ispa_bias")
    outputs = output_names(model.cache_groups())
    log = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        program = torch.onnx.export(model, (), kwargs=kwargs, output_names=outputs, dynamo=True, optimize=True,
                                    verbose=False)
    proto = program.model_proto
    names = _rename_refit_weights(proto, refit_weights(model, feeds["latents"].dtype)) if refit else []
    # protobuf caps a file at 2 GiB: real model widths keep their weights in one external file beside it.
    big = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return names


def io_specs(path: Path) -> tuple[list[dict], list[dict]]:
    """Graph I/O names, shapes and dtypes as the manifest records them."""
    proto = onnx.load(str(path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "shape": [d.dim_value for d in t.shape.dim], "dtype": ONNX_DTYPE[t.elem_type]}

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}


def write_artifact(out: Path, model: WanModel, stream: Stream, report: dict, *, preset: str, modulation: str = "baked",
                   dtype: str = "fp32", progress=print, extras: dict[str, Callable[[Path], object]] | None = None) -> dict:
    """Export the baked model and the handoff state into `out`, atomically; returns the manifest.

    `extras` maps further file names to functions that write them (plots, baked weights)."""
    if modulation not in ("baked", "input"):
        raise UserError(f"--modulation: expected 'baked' or 'input', got {modulation!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {sorted(DTYPES)} for export, got {dtype!r}")
    torch_dtype, dtype_name = DTYPES[dtype]
    np_dtype = host_dtype(dtype_name)
    cfg = model.cfg
    # Traced on the CPU whatever device the warmup ran on: the graph is device-independent.
    graph_model = copy.deepcopy(model).to("cpu").cast(torch_dtype)
    state = stream.state_arrays()
    feeds = graph_feeds(stream, state, graph_model, modulation, np_dtype)
    geo = dataclasses.replace(stream.geo, dtype=dtype_name)
    if geo.layout != model.layout:
        raise ValueError(f"the stream's layout {geo.layout} is not the model's {model.layout}")
    with atomic_directory(out) as tmp:
        t0 = time.perf_counter()
        progress(f"export: tracing the chunk step to ONNX ({dtype}, modulation {modulation})")
        refit_names = export_onnx(graph_model, feeds, tmp / ONNX, refit=modulation == "baked")
        export_seconds = time.perf_counter() - t0
        progress(f"export: ONNX written in {export_seconds:.1f} s")
        save_golden(tmp, graph_model, golden_feeds(stream, feeds))
        groups = geo.groups
        for k in [g.name for g in groups] + ["cross_kv"] + (["ispa_weight", "ispa_bias"] if modulation == "input" else []):
            src = feeds[k] if k in feeds else state[k]
            state[k] = np.ascontiguousarray(src.astype(np_dtype))
        save_file(state, str(tmp / STATE))
        report = dict(report, export_seconds=export_seconds)
        write_json_atomic(tmp / REPORT, report)
        inputs, outputs = io_specs(tmp / ONNX)
        caches = cache_records(geo)
        kv = kv_bytes(cfg, model.layout, dtype=dtype_name, batch=geo.batch)
        held = [int(state[g.name].nbytes) for g in groups]
        if kv.total != sum(held) or held != [c["bytes"] for c in caches]:  # what a deployment allocates
            raise RuntimeError(f"cache bytes disagree: kv_bytes {kv.total}, manifest {[c['bytes'] for c in caches]}, "
                               f"handoff state {held}")
        manifest = {
            "schema_version": SCHEMA_VERSION, "format": FORMAT,
            "model": {"preset": preset, "config": cfg.to_dict()},
            "layers": layer_records(geo), "geometry": geo.to_dict(), "caches": caches,
            "kv_bytes": {"total": kv.total, "per_layer": kv.per_layer},
            "modulation": modulation, "dtype": dtype_name, "inputs": inputs, "outputs": outputs,
            "absorption": {"variant": report["options"]["variant"], "site": report["options"]["site"],
                           "layers": report["selected_layers"], "transition_chunk": report["transition_chunk"],
                           "kv_reduction": report["kv_reduction"]},
            "refit_names": refit_names, "versions": versions(), "seed": int(stream.seed),
            "positions": {"scheme": POSITION_SCHEME, "input": "rope_frame", "theta": geo.rope_theta,
                          "pairs": geo.rope_pairs, "sink_rebased": False},
        }
        for name, writer in (extras or {}).items():
            writer(tmp / name)
        manifest["files"] = file_records(tmp)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest
