"""The deployment's graph: the chunk step traced once to a fixed-shape ONNX graph, and DEPLOY around it.

The model traced is the deployment's base model on its layout, every L-layer carrying a zero
correction of fixed shape (ispa_export.video.modulation), so every video runs this one graph. A baked
graph names those constants for a refit (matched by value after tracing: the optimiser folds W_o
into a transposed initializer) and lists them as graph inputs too, so ONNX Runtime binds each
video's values like inputs while TensorRT treats them as refittable weights.
"""
from __future__ import annotations

import copy
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from graphs.wan import WanModel
from runtimes.artifact import (DECODER_DIR, FORMAT, ONNX, POSITION_SCHEME, SCHEMA_VERSION, WAN_FPS, cache_records,
                               layer_records)
from runtimes.decoder import RECORD as DECODER_RECORD
from runtimes.driver import Geometry
from runtimes.files import file_records, write_json_atomic
from runtimes.groups import output_names

from ..errors import UserError
from ..kv import kv_bytes
from ..video.modulation import MODULATIONS, refit_tensors
from ..video.torch_runner import to_torch
from .quiet import quiet_export
from .verify import example_feeds, save_golden

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "bfloat16")}
EXTERNAL_DATA_BYTES = 1 << 30
ONNX_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}


def _placeholders(model: WanModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct values in every correction constant while tracing (zeros would be indistinguishable
    after the optimiser renames them); returns the zero values to put back."""
    g = torch.Generator().manual_seed(seed)
    zeros = {}
    for i, (block, span) in enumerate(zip(model.blocks, model.layout)):
        attn = block.self_attn
        if span is None:
            continue
        for name in ("ispa_weight", "ispa_bias"):
            p = getattr(attn, name)
            if p is not None:
                zeros[f"blocks.{i}.self_attn.{name}"] = p.detach().clone()
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return zeros


def _restore(model: WanModel, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, v in values.items():
            params[name].copy_(v)


def _name_refit_weights(proto: onnx.ModelProto, traced: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> None:
    """Give the correction constants their refit names (found by their traced values), set them to
    the deployment's values (`final`) and list each as a graph input too (ONNX Runtime overrides
    such an initializer per video; TensorRT's parser takes it as a weight)."""
    by_shape: dict[tuple, list[onnx.TensorProto]] = {}
    for init in proto.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    renames = {}
    for name, value in traced.items():
        match = [t for t in by_shape.get(value.shape, [])
                 if t.name not in renames and np.array_equal(onnx.numpy_helper.to_array(t), value)]
        if len(match) != 1:
            raise RuntimeError(f"refit weight {name}: found {len(match)} initializers with its value, expected 1")
        renames[match[0].name] = name
    for init in proto.graph.initializer:
        if init.name in renames:
            name = renames[init.name]
            init.CopyFrom(onnx.numpy_helper.from_array(final[name], name))
    for node in proto.graph.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
    for name, value in final.items():
        proto.graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))


def export_onnx(model: WanModel, feeds: dict[str, np.ndarray], path: Path, refit: bool) -> list[str]:
    """torch.onnx.export (dynamo) of the chunk step; returns the refit names (baked graphs)."""
    kwargs = {k: to_torch(v, torch.device("cpu")) for k, v in feeds.items()}
    outputs = output_names(model.cache_groups())
    np_dtype = feeds["latents"].dtype
    final = {k: v.astype(np_dtype) for k, v in refit_tensors(model).items()} if refit else {}
    zeros = _placeholders(model) if refit else {}
    traced = {k: v.astype(np_dtype) for k, v in refit_tensors(model).items()} if refit else {}
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(model, (), kwargs=kwargs, output_names=outputs, dynamo=True, optimize=True,
                                        verbose=False)
    finally:
        _restore(model, zeros)
    proto = program.model_proto
    if refit:
        _name_refit_weights(proto, traced, final)
    # protobuf caps a file at 2 GiB: real model widths keep their weights in one external file beside it.
    big = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return list(final)


def io_specs(path: Path) -> tuple[list[dict], list[dict]]:
    """Graph I/O names, shapes and dtypes as the manifest records them (overridable constants are
    not inputs: they have values of their own)."""
    proto = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in proto.graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "shape": [d.dim_value for d in t.shape.dim], "dtype": ONNX_DTYPE[t.elem_type]}

    return [spec(v) for v in proto.graph.input if v.name not in constants], [spec(v) for v in proto.graph.output]


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}


def decoder_entry(record: dict, directory: str = DECODER_DIR, fps: float = WAN_FPS) -> dict:
    """The manifest's `decoder` field from an export_decoder record (DEPLOY/decoder/decoder.json):
    what a runtime needs to size the video before it opens the graphs, and the exact cache bytes."""
    return {
        "directory": directory, "record": f"{directory}/{DECODER_RECORD}",
        "graphs": {g: f"{directory}/{v['file']}" for g, v in record["graphs"].items()},
        "dtype": record["dtype"], "batch": record["batch"], "latent_channels": record["latent_channels"],
        "latent_height": record["latent_height"], "latent_width": record["latent_width"],
        "chunk_frames": record["chunk_frames"], "height": record["height"], "width": record["width"],
        "scale_factor_spatial": record["scale_factor_spatial"],
        "scale_factor_temporal": record["scale_factor_temporal"],
        "pixel_frames": dict(record["pixel_frames"]), "fps": fps,
        "caches": [{"name": c["input"], "output": c["output"], "shape": list(c["shape"]), "dtype": c["dtype"],
                    "bytes": c["bytes"]} for c in record["caches"]],
        "cache_bytes": record["cache_bytes"],
    }


def export_vae_decoder(directory: Path, vae, geo: Geometry, dtype_name: str,
                       progress: Callable[[str], object] = print) -> dict:
    """The VAE's streaming decoder beside the DiT (DEPLOY/decoder/): its chunk is the DiT's chunk, its
    batch and latent size the DiT's, its dtype the graph's. Returns the manifest's `decoder` field."""
    from ..vae import check_vae
    from .decoder import export_decoder

    check_vae(vae, geo.channels)
    t0 = time.perf_counter()
    progress(f"build: exporting the VAE decoder ({dtype_name}, chunks of {geo.chunk_frames} latent frames)")
    record = export_decoder(vae, batch=geo.batch, latent_height=geo.height, latent_width=geo.width,
                            chunk_frames=geo.chunk_frames, dtype=dtype_name, out_dir=directory / DECODER_DIR)
    progress(f"build: decoder written in {time.perf_counter() - t0:.1f} s ({len(record['caches'])} caches, "
             f"{record['cache_bytes']:,} bytes)")
    return decoder_entry(record)


def write_deployment(directory: Path, model: WanModel, geo: Geometry, *, preset: str, modulation: str, dtype: str,
                     correction: dict, calibration: dict, progress: Callable[[str], object] = print,
                     extras: dict[str, Callable[[Path], object]] | None = None, vae=None) -> dict:
    """Trace the deployment's graph into `directory` (not atomic: the caller's atomic_directory is),
    write its golden step and manifest; returns the manifest. `model` is the base model on the
    deployment's layout with zero corrections; `extras` maps further file names to their writers;
    `vae` (a diffusers AutoencoderKLWan) adds its streaming decoder in DEPLOY/decoder/ (manifest
    `decoder`, its files in `files`)."""
    if modulation not in MODULATIONS:
        raise UserError(f"--modulation: expected one of {list(MODULATIONS)}, got {modulation!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {sorted(DTYPES)} for export, got {dtype!r}")
    torch_dtype, dtype_name = DTYPES[dtype]
    cfg = model.cfg
    if geo.layout != model.layout or geo.dtype != dtype_name:
        raise ValueError(f"geometry {geo.layout} ({geo.dtype}) is not the model's {model.layout} ({dtype_name})")
    # Traced on the CPU whatever device the warmups ran on: the graph is device-independent.
    graph_model = copy.deepcopy(model).to("cpu").cast(torch_dtype)
    feeds = example_feeds(graph_model, geo, modulation)
    t0 = time.perf_counter()
    progress(f"build: tracing the chunk step to ONNX ({dtype}, modulation {modulation})")
    refit_names = export_onnx(graph_model, feeds, directory / ONNX, refit=modulation == "baked")
    export_seconds = time.perf_counter() - t0
    progress(f"build: ONNX written in {export_seconds:.1f} s")
    save_golden(directory, graph_model, feeds)
    inputs, outputs = io_specs(directory / ONNX)
    caches = cache_records(geo)
    kv = kv_bytes(cfg, model.layout, dtype=dtype_name, batch=geo.batch)
    if kv.total != sum(c["bytes"] for c in caches):  # what a deployment allocates
        raise RuntimeError(f"cache bytes disagree: kv_bytes {kv.total}, manifest {[c['bytes'] for c in caches]}")
    shapes = {k: list(v.shape) for k, v in refit_tensors(graph_model).items()} if refit_names else {}
    manifest = {
        "schema_version": SCHEMA_VERSION, "format": FORMAT,
        "model": {"preset": preset, "config": cfg.to_dict()},
        "layers": layer_records(geo), "geometry": geo.to_dict(), "caches": caches,
        "kv_bytes": {"total": kv.total, "per_layer": kv.per_layer},
        "modulation": modulation, "dtype": dtype_name, "inputs": inputs, "outputs": outputs,
        "refit_names": refit_names, "refit_shapes": shapes, "correction": correction, "calibration": calibration,
        "export_seconds": round(export_seconds, 3), "versions": versions(),
        "positions": {"scheme": POSITION_SCHEME, "input": "rope_frame", "theta": geo.rope_theta,
                      "pairs": geo.rope_pairs, "sink_rebased": False},
    }
    if vae is not None:
        manifest["decoder"] = export_vae_decoder(directory, vae, geo, dtype_name, progress)
    for name, writer in (extras or {}).items():
        writer(directory / name)
    manifest["files"] = file_records(directory)
    write_json_atomic(directory / "manifest.json", manifest)
    return manifest
