"""The Wan VAE's streaming decode (ispa_export.vae) traced to two static ONNX graphs beside the DiT's.

`decoder_first.onnx` decodes a video's first chunk from empty caches, `decoder_next.onnx` every later
chunk from the caches the previous one left: the caches are graph inputs and outputs of fixed shape,
so the exported decode is as exact as the eager one. `decoder.json` records both graphs, their I/O and
the caches' exact bytes; the torch-free runtimes.decoder runs them from it.
"""
from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.external_data_helper import set_external_data
from torch import nn

from runtimes.decoder import FORMAT, FORMAT_VERSION, RECORD
from runtimes.files import atomic_path, file_record, write_json_atomic

from ..errors import UserError
from ..vae import CacheSpec, cache_specs, check_vae, decode_frames, latent_stats, pixel_frames, scale_factors
from .quiet import quiet_export
from .trt_support import check_onnx_for_tensorrt

# The names the runtime binds.
FIRST, NEXT = "decoder_first.onnx", "decoder_next.onnx"
WEIGHTS = "decoder_weights.bin"  # both graphs' weights, each distinct tensor once (onnx external data)
EXTERNAL_MIN_BYTES = 1024
ALIGN_MIN_BYTES, PAGE_BYTES = 1 << 20, 4096  # big tensors start on a page: a runtime may map them
LATENTS, PIXELS = "latents", "pixels"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16"}


class _ChunkGraph(nn.Module):
    """One chunk of `frames` normalised latents -> clamped pixels and every cache; `first` starts from
    empty caches (no cache inputs), otherwise the caches are inputs. The un-normalisation is inside,
    with WanPipeline's constants in the graph's dtype, so the graph eats the DiT's latents as they are."""

    def __init__(self, vae: nn.Module, specs: list[CacheSpec], first: bool) -> None:
        super().__init__()
        self.vae, self.specs, self.first = vae, specs, first
        mean, inv_std = latent_stats(vae, vae.dtype)
        self.register_buffer("latents_mean", mean)
        self.register_buffer("latents_inv_std", inv_std)

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.vae.post_quant_conv(latents / self.latents_inv_std + self.latents_mean)
        out, new = decode_frames(self.vae, x, None if self.first else list(caches), self.specs)
        return (torch.clamp(out, min=-1.0, max=1.0), *new)


def _io(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "shape": [d.dim_value for d in t.shape.dim],
                "dtype": _ONNX_DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type))}

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def _outputs_from_nodes(proto: onnx.ModelProto) -> None:
    """Give every graph output a producing node. With one-frame chunks the temporal upsamplers' caches
    after the video's first frame are constant zeros, which the optimiser turns into initializers that
    are graph outputs. ONNX Runtime copes (tested), but an output that is a weight is a corner TensorRT
    and other tools handle least well, so each such output becomes an Identity of the weight."""
    inits = {t.name: t for t in proto.graph.initializer}
    for out in proto.graph.output:
        if out.name in inits:
            inits[out.name].name = value = out.name + "_value"
            for node in proto.graph.node:
                node.input[:] = [value if n == out.name else n for n in node.input]
            proto.graph.node.append(onnx.helper.make_node("Identity", [value], [out.name]))


def _export_graph(graph: _ChunkGraph, args: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], path: Path) -> onnx.ModelProto:
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(graph, args, input_names=input_names, output_names=output_names,
                                    dynamo=True, optimize=True, verbose=False)
    proto = program.model_proto
    _outputs_from_nodes(proto)
    got = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    if got != (input_names, output_names):
        raise RuntimeError(f"{path.name}: exported I/O {got} is not the contract {(input_names, output_names)}")
    return proto


def _share_weights(protos: list[onnx.ModelProto], path: Path) -> None:
    """Move the graphs' weights into one file, each distinct tensor once: both graphs trace the same
    decoder, so they hold mostly the same weights (92 of the 93 initializers of `next` are in
    `first` on the tiny test VAE), which two self-contained files would store twice. Tensors under
    EXTERNAL_MIN_BYTES stay in their graph; those of ALIGN_MIN_BYTES and more start on a page."""
    offsets: dict[bytes, int] = {}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for proto in protos:
            for t in proto.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                raw = t.raw_data
                key = hashlib.sha256(raw).digest()
                if key not in offsets:
                    if len(raw) >= ALIGN_MIN_BYTES:
                        f.write(b"\0" * (-f.tell() % PAGE_BYTES))
                    offsets[key] = f.tell()
                    f.write(raw)
                set_external_data(t, location=path.name, offset=offsets[key], length=len(raw))
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")


def export_decoder(vae: nn.Module, *, batch: int, latent_height: int, latent_width: int, chunk_frames: int,
                   dtype: str, out_dir: str | Path, check_tensorrt: bool = True) -> dict[str, Any]:
    """Write `decoder_first.onnx`, `decoder_next.onnx` and their record `decoder.json` into `out_dir`.

    Both graphs read their weights from one file, `decoder_weights.bin` (each distinct tensor once).
    Each file is written atomically, the record last: it holds the sha256 of every file, so a crash
    part-way leaves no record, or an old one whose checksums the runtime refuses. Returns the record.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if chunk_frames < 1:
        raise UserError(f"chunk_frames: expected at least 1, got {chunk_frames}")
    check_vae(vae, vae.config.z_dim)
    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    if vae.dtype != torch_dtype or vae.device.type != "cpu":
        # Traced on the CPU (the graph does not depend on the device), on a copy: the caller's VAE stays as it is.
        vae = copy.deepcopy(vae).to("cpu", torch_dtype)
    specs = cache_specs(vae, batch, latent_height, latent_width)
    cfg = vae.config
    latents = torch.zeros(batch, cfg.z_dim, chunk_frames, latent_height, latent_width, dtype=torch_dtype)
    caches = [torch.zeros(s.shape, dtype=torch_dtype) for s in specs]
    cache_in, cache_out = [s.name for s in specs], [s.new_name for s in specs]
    graphs, protos = {}, []
    for file, first in ((FIRST, True), (NEXT, False)):
        graph = _ChunkGraph(vae, specs, first).eval()
        args = (latents,) if first else (latents, *caches)
        names = [LATENTS] if first else [LATENTS, *cache_in]
        proto = _export_graph(graph, args, names, [PIXELS, *cache_out], out_dir / file)
        inputs, outputs = _io(proto)
        problems = check_onnx_for_tensorrt(proto) if check_tensorrt else []
        graphs["first" if first else "next"] = {"file": file, "weights": WEIGHTS, "inputs": inputs,
                                                "outputs": outputs, "tensorrt_problems": problems}
        protos.append(proto)
    _share_weights(protos, out_dir / WEIGHTS)
    for g, proto in zip(graphs.values(), protos):
        with atomic_path(out_dir / g["file"]) as tmp:
            onnx.save_model(proto, str(tmp))  # the weights are external already: only the graph is written
    del protos
    item = torch.empty((), dtype=torch_dtype).element_size()
    spatial, temporal = scale_factors(vae)
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "dtype": dtype, "batch": batch, "latent_channels": cfg.z_dim,
        "latent_height": latent_height, "latent_width": latent_width, "chunk_frames": chunk_frames,
        "height": latent_height * spatial, "width": latent_width * spatial,
        "scale_factor_spatial": spatial, "scale_factor_temporal": temporal,
        "pixel_frames": {"first": pixel_frames(chunk_frames, True, temporal),
                         "next": pixel_frames(chunk_frames, False, temporal)},
        "latents": {"name": LATENTS, "shape": list(latents.shape), "dtype": dtype, "normalised": True},
        "pixels": {"name": PIXELS, "dtype": dtype, "range": [-1.0, 1.0],
                   "shape": {k: [batch, cfg.out_channels, pixel_frames(chunk_frames, k == "first", temporal),
                                 latent_height * spatial, latent_width * spatial] for k in ("first", "next")}},
        # In the graph: z / inv_std + mean with these rounded to `dtype` (WanPipeline's formula).
        "unnormalise": {"in_graph": True, "formula": "latents / (1 / latents_std) + latents_mean",
                        "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std)},
        "caches": [{"input": s.name, "output": s.new_name, "module": s.module, "shape": list(s.shape),
                    "dtype": dtype, "bytes": math.prod(s.shape) * item} for s in specs],
        "cache_bytes": sum(math.prod(s.shape) for s in specs) * item,
        "graphs": graphs,
        "vae_config": {k: v for k, v in dict(cfg).items() if not k.startswith("_")},
    }
    record["files"] = {name: file_record(out_dir / name) for name in (WEIGHTS, *(g["file"] for g in graphs.values()))}
    write_json_atomic(out_dir / RECORD, record)
    return record
