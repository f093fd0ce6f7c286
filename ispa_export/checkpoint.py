"""Checkpoint I/O for Wan2.1 DiTs: read, normalise names, validate against a model, write.

Accepted inputs: one `.safetensors` file; a sharded checkpoint (its `*.safetensors.index.json`
or the folder holding it); `.pt`/`.pth`/`.bin`/`.ckpt` read with `torch.load(weights_only=True)`.
Accepted namings: the original Wan2.1 names (`wan/modules/model.py`), the same names inside a
training checkpoint (Self-Forcing / CausVid: `{"generator_ema": {"model.blocks.0...": ...}}`),
and diffusers' `WanTransformer3DModel` names. Everything is converted to Wan names, the names
`graphs.wan.WanModel` uses.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ispa_export.errors import UserError
from runtimes.files import atomic_path

Naming = Literal["wan", "diffusers"]

# One table, read left-to-right for wan -> diffusers and right-to-left for the inverse. Entries are
# module paths matched on whole dot-separated segments (never substrings), so "modulation" cannot
# hit "head.modulation" and the norm2/norm3 swap needs no placeholder.
# Source: diffusers scripts/convert_wan_to_diffusers.py (TRANSFORMER_KEYS_RENAME_DICT) and
# src/diffusers/models/transformers/transformer_wan.py.
_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),  # [1, 2, dim] in both
)
_PER_BLOCK: tuple[tuple[str, str], ...] = (
    ("modulation", "scale_shift_table"),  # [1, 6, dim] in both
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    # Wan runs norm1, norm3 (affine, before cross-attention), norm2; diffusers renumbers them in
    # call order, so Wan's affine norm3 is diffusers' norm2 (the other two have no parameters).
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

# Containers that training code wraps a state dict in, in order of preference: Self-Forcing and
# CausVid save {"generator": ..., "critic": ..., "generator_ema": ...}; EMA weights are the ones
# they sample with.
_WRAPPERS = ("generator_ema", "generator", "state_dict", "model", "module")
# Prefixes stripped while every key carries one (DDP, Self-Forcing's WanDiffusionWrapper.model,
# torch.compile, ComfyUI's "model.diffusion_model.").
_PREFIXES = ("model.", "module.", "_orig_mod.", "generator.", "diffusion_model.")
# Module names wrappers insert anywhere in a path (FSDP, activation checkpointing, torch.compile
# of a submodule); no Wan module carries these names, so removing them is always safe.
_WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def wan_reference_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan2.1 T2V DiT state dict with its shape, in `state_dict()` order.

    `config` is a `graphs.config.WanConfig` (any object with its architecture fields). Mirrors
    `WanModel.__init__` of Wan2.1 with model_type='t2v', qk_norm=True, cross_attn_norm=True; the
    RoPE table is a plain attribute there, not a buffer, so it is not listed.
    """
    d, f = config.dim, config.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, config.in_dim, *config.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, config.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, config.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, d)  # a block's own parameter precedes its submodules'
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                shapes[f"{b}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{b}{attn}.{proj}.bias"] = (d,)
            shapes[f"{b}{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}{attn}.norm_k.weight"] = (d,)
            if attn == "self_attn":  # norm3 is registered between the two attentions
                shapes[b + "norm3.weight"] = (d,)
                shapes[b + "norm3.bias"] = (d,)
        shapes[b + "ffn.0.weight"] = (f, d)
        shapes[b + "ffn.0.bias"] = (f,)
        shapes[b + "ffn.2.weight"] = (d, f)
        shapes[b + "ffn.2.bias"] = (d,)
    shapes["head.modulation"] = (1, 2, d)
    shapes["head.head.weight"] = (config.out_dim * math.prod(config.patch_size), d)
    shapes["head.head.bias"] = (config.out_dim * math.prod(config.patch_size),)
    return shapes


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


# ----------------------------------------------------------------------------------------------
# Naming


def _rename(key: str, table: tuple[tuple[str, str], ...], src: int) -> str | None:
    for pair in table:
        old, new = pair[src], pair[1 - src]
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def convert_key(key: str, to: Naming) -> str:
    """Rename one tensor between Wan and diffusers naming; names the table lacks pass unchanged."""
    src = 0 if to == "diffusers" else 1
    m = _BLOCK_KEY.match(key)
    if m:
        rest = _rename(m.group(2), _PER_BLOCK, src)
        return key if rest is None else f"blocks.{m.group(1)}.{rest}"
    renamed = _rename(key, _TOP_LEVEL, src)
    return key if renamed is None else renamed


def detect_naming(keys: Any) -> Naming:
    for k in keys:
        if k.startswith("condition_embedder.") or k in ("scale_shift_table", "proj_out.weight") or ".attn1." in k:
            return "diffusers"
    return "wan"


def convert_state_dict(sd: Mapping[str, torch.Tensor], to: Naming) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = convert_key(k, to)
        if nk in out:
            raise UserError(f"tensor names {k!r} and another both map to {nk!r} in {to} naming")
        out[nk] = v
    return out


def normalize_keys(sd: Mapping[str, Any], source_name: str) -> dict[str, torch.Tensor]:
    """Unwrap training containers, strip wrapper prefixes, and return tensors under Wan names."""
    sd = _unwrap(sd, source_name)
    keys = {_WRAPPER_SEGMENTS.sub("", k): k for k in sd}
    if len(keys) != len(sd):
        raise UserError(f"{source_name}: tensor names collide once FSDP/compile wrapper names are removed")
    flat = {new: sd[old] for new, old in keys.items()}
    while flat:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in flat)), None)
        if prefix is None:
            break
        flat = {k[len(prefix):]: v for k, v in flat.items()}
    if detect_naming(flat) == "diffusers":
        flat = convert_state_dict(flat, "wan")
    return flat


def _unwrap(obj: Mapping[str, Any], source_name: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            raise UserError(
                f"{source_name}: no tensors at the top level and none of the containers "
                f"{list(_WRAPPERS)} (found keys {sorted(map(str, obj))[:8]})"
            )
        obj = inner
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{source_name}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    return dict(obj)


# ----------------------------------------------------------------------------------------------
# Reading


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _read_index(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a sharded-checkpoint index with a 'weight_map' ({e})") from None
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise UserError(f"{index}: shard {shard!r} listed in weight_map does not exist")
        out.update(_read_safetensors(shard_path))
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise UserError(f"{index}: tensor {absent[0]!r} is in weight_map but not in shard {weight_map[absent[0]]!r}")
    return out


def _read_torch(path: Path) -> Mapping[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is several paragraphs; keep only the clause naming the offending class.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"found {found.group(1)}" if found else "torch.load(weights_only=True) refused it"
        raise UserError(
            f"{path}: holds pickled Python objects besides tensors ({what}); refusing to unpickle "
            f"them. Expected a dict of tensors; re-save the state dict as safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            return indexes[0]
        if not indexes and len(singles) == 1:
            return singles[0]
        found = [p.name for p in indexes] or [p.name for p in singles]
        raise UserError(
            f"{path}: expected one *.safetensors.index.json or one *.safetensors file in the folder, found {found}"
        )
    return path


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """The file's contents as stored: a flat tensor dict, or a training container for torch files."""
    p = _resolve(Path(path))
    if p.name.endswith(".index.json"):
        return _read_index(p)
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    if p.suffix in _TORCH_SUFFIXES:
        return _read_torch(p)
    raise UserError(
        f"{p}: unknown checkpoint type {p.suffix!r}; expected .safetensors, *.safetensors.index.json, "
        f"a folder, or one of {sorted(_TORCH_SUFFIXES)}"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint and return its tensors under Wan names (on CPU, dtype as stored)."""
    return normalize_keys(read_checkpoint(path), str(path))


# ----------------------------------------------------------------------------------------------
# Loading into a model


@dataclass(frozen=True)
class LoadSummary:
    tensors: int
    parameters: int
    source_dtypes: tuple[str, ...]
    dtype: str


def _shape(t: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(map(str, t)) + "]"


def validate(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str, strict: bool = True
) -> None:
    """Raise one `UserError` line for the first missing, unexpected or mis-shaped tensor."""
    problems: list[str] = []
    for k, shape in expected.items():
        if k not in sd:
            if strict:
                problems.append(f"{source}: missing tensor {k!r} (expected shape {_shape(shape)})")
        elif tuple(sd[k].shape) != tuple(shape):
            problems.append(
                f"{source}: tensor {k!r} has shape {_shape(sd[k].shape)}, expected {_shape(shape)}"
            )
    if strict:
        for k in sd:
            if k not in expected:
                problems.append(
                    f"{source}: unexpected tensor {k!r} with shape {_shape(sd[k].shape)} "
                    f"(the model has no such tensor; expected none)"
                )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


def load_into(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadSummary:
    """Load a checkpoint into `model` after checking every name and shape; cast to the model's dtypes.

    With `strict=False` tensors missing from the file keep their current values and extra tensors are
    ignored; a shape mismatch is an error either way. A model on the meta device gets the loaded
    tensors assigned (materialised on CPU).
    """
    sd = load_state_dict(path)
    target = model.state_dict()
    validate(sd, {k: tuple(v.shape) for k, v in target.items()}, str(path), strict)
    for k, v in sd.items():
        if k in target and not (v.is_floating_point() or v.dtype == target[k].dtype):
            raise UserError(f"{path}: tensor {k!r} has dtype {v.dtype}, expected a floating-point tensor")
    on_meta = any(t.is_meta for t in target.values())
    if on_meta:  # assign=True keeps the source dtype, so cast first
        cast = {k: v.to(dtype=target[k].dtype) for k, v in sd.items() if k in target}
    else:  # load_state_dict copies into the existing tensors, casting and moving device in place
        cast = {k: v for k, v in sd.items() if k in target}
    model.load_state_dict(cast, strict=strict, assign=on_meta)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    model_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in target.values()})
    return LoadSummary(
        tensors=len(cast),
        parameters=sum(v.numel() for v in cast.values()),
        source_dtypes=tuple(dtypes),
        dtype="/".join(model_dtypes),
    )


# ----------------------------------------------------------------------------------------------
# Writing


def save_state_dict(
    model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    naming: Naming = "wan",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a Wan-named model or state dict as one safetensors file, in Wan or diffusers naming.

    Written to a temporary file in the same folder and moved into place with `os.replace`, so a
    failure leaves either the previous file or nothing, never a truncated checkpoint.
    """
    if naming not in ("wan", "diffusers"):
        raise UserError(f"naming {naming!r}: expected 'wan' or 'diffusers'")
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    if detect_naming(sd) != "wan":
        raise UserError("save_state_dict expects Wan-named tensors; normalise with normalize_keys() first")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"entry {k!r} is a {type(v).__name__}, expected a tensor")
        if v.is_meta:
            raise UserError(f"tensor {k!r} is on the meta device and has no data to save")
        tensors[convert_key(k, naming) if naming == "diffusers" else k] = v.detach().to("cpu").contiguous()
    if len(tensors) != len(sd):
        raise UserError(f"two tensors map to the same {naming} name")
    out = Path(path)
    meta = {"format": "pt", "naming": naming, **(metadata or {})}
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return out
