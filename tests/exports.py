"""Test scaffolding: a deployment and its instance written from a model and stream transitioned in
process (builder.calibrate.transition, the evaluation's path), laid out as `ispa export` lays them out
(DIR = the deployment, DIR/instance = the video). The deployment's base is the baked model with every
L-layer's correction zeroed; the instance carries the corrections as modulation tensors, so running
the pair computes what the baked model computes."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from graphs.wan import Absorption, WanModel
from ispa_export.builder.export import DTYPES, write_deployment
from ispa_export.models import save_baked
from ispa_export.video.modulation import modulation_tensors, zero_corrections
from ispa_export.video.absorb import Absorbed, write_instance
from runtimes.buffers import host_dtype
from runtimes.driver import Stream
from runtimes.files import atomic_directory, file_record, sha256_file, write_json_atomic


def _variant(model: WanModel) -> tuple[str, str, int]:
    """(variant, site, kinds) of the corrections baked into `model` (full/wo when none is)."""
    for block, span in zip(model.blocks, model.layout):
        attn = block.self_attn
        if span is not None and attn.ispa_bias is not None:
            kinds = attn.ispa_bias.shape[0]
            if attn.ispa_weight is None:
                return ("full", "wo", 1) if attn.ispa_site == "wo" else ("bias", attn.ispa_site, 1)
            return ("per_pass" if kinds > 1 else "full", attn.ispa_site, kinds)
    return "full", "wo", 1


def export_transitioned(out: Path, model: WanModel, stream: Stream, report: dict | None = None, *,
                        preset: str = "tiny", modulation: str = "baked", dtype: str = "fp32",
                        variant: tuple[str, str, int] | None = None) -> dict:
    """Write DIR (deployment) and DIR/instance from a transitioned model and its stream; returns the
    deployment's manifest."""
    variant, site, kinds = variant or _variant(model)
    instance_model = copy.deepcopy(model)
    d = model.cfg.dim
    for block, span in zip(instance_model.blocks, instance_model.layout):
        attn = block.self_attn
        if span is not None and attn.ispa_bias is None:  # gated off: a zero correction of the deployment's shape
            w = torch.zeros(kinds, d, d) if variant == "per_pass" or site == "adapter" else None
            attn.absorb(Absorption(site, w, torch.zeros(kinds if variant == "per_pass" else 1, d)))
    base = copy.deepcopy(model)
    zero_corrections(base, kinds=kinds, site=site, variant=variant)
    dtype_name = DTYPES[dtype][1]
    geo = copy.deepcopy(stream.geo)
    geo.dtype = dtype_name
    tensors = modulation_tensors(instance_model, modulation, host_dtype(dtype_name))
    absorbed = Absorbed(stream, int(stream.seed), tensors, {}, dict(report or {}, kept_corrections=[],
                                                                   transition_chunk=stream.chunk),
                        {}, np.concatenate(stream.latents, axis=2) if stream.latents else None)
    out = Path(out)
    with atomic_directory(out) as tmp:
        manifest = write_deployment(tmp, base, geo, preset=preset, modulation=modulation, dtype=dtype,
                                    correction={"variant": variant, "site": site, "rank": None, "rho": None,
                                                "rhos": [], "holdout_gap": 1, "gate": True, "tol": 0.05,
                                                "warmup_chunks": 8, "allowed": []},
                                    calibration={"videos": [{"seed": int(stream.seed), "context": "test"}]},
                                    progress=lambda s: None,
                                    extras={"torch_model.safetensors": lambda p: save_baked(base, p)})
        write_instance(absorbed, tmp / "instance", deployment=out, deployment_sha256=sha256_file(tmp / "manifest.json"),
                       dtype=dtype_name, context_source="test", atomic=False)
    return manifest


def update_manifest_files(directory: Path, names: list[str], fields: dict | None = None) -> dict:
    """A test's edit of a deployment: re-record the sha256 and size of `names` in manifest.json
    `files`, set top-level `fields`; returns the new manifest."""
    path = Path(directory) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for name in names:
        manifest["files"][name] = file_record(Path(directory) / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest.update(fields or {})
    write_json_atomic(path, manifest)
    return manifest
