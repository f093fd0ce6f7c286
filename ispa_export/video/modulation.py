"""A video's correction as graph tensors: the names a deployment's graph gives them, and their values.

Every L-layer of a deployment carries a correction of fixed shape, zero where a video keeps none,
so one graph serves every video (a dropped correction is a zero delta, never another graph). How
the graph takes it is fixed at build (DESIGN.md section 5):

- modulation "input": graph inputs `ispa_weight` [L-layers, D, D] and `ispa_bias` [L-layers, D],
  each L-layer's whole W_o' = W_o + dW, transposed ([in, out], so the graph multiplies by it as
  it is), and b_o' = b_o + db, in layer order;
- modulation "baked": the graph's own constants, named for a refit (TensorRT) and listed as
  overridable graph inputs (ONNX Runtime binds them like inputs): per L-layer
  `blocks.{i}.self_attn.o.weight_t` (W_o' transposed, as the exporter folds it) and
  `blocks.{i}.self_attn.ispa_bias` (db, kept out of W_o's GEMM bias: DESIGN.md section 7); the
  per-pass-kind and adapter variants keep `ispa_weight` ([K, D, D], or its transpose for one K).

The build reads these names off the model it traces; each video's absorb computes the same
tensors from its corrections; the runtimes bind or refit them by name.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from graphs.wan import Absorption, WanModel

from ..errors import UserError
from .torch_runner import to_numpy

MODULATIONS = ("baked", "input")


def zero_corrections(model: WanModel, kinds: int, site: str, variant: str) -> None:
    """Give every L-layer of `model` (its layout set) a correction of the deployment's shape, all
    zero: the graph then has the same constants, and the same refit names, for every video."""
    d = model.cfg.dim
    for block, span in zip(model.blocks, model.layout):
        if span is None:
            continue
        weight = None
        if variant == "per_pass" or (site == "adapter" and variant == "full"):
            weight = torch.zeros(kinds if variant == "per_pass" else 1, d, d)
        # A single 'wo' correction folds into W_o: zero dW leaves W_o as it is.
        if variant == "full" and site == "wo":
            weight = torch.zeros(1, d, d)
        block.self_attn.absorb(Absorption(site, weight, torch.zeros(kinds if variant == "per_pass" else 1, d)))


def with_corrections(model: WanModel, corrections: dict[int, Absorption | None]) -> WanModel:
    """A copy of the deployment's L-layer attentions with each video correction installed (the
    others keep their zero one); the rest of the model is shared, not copied."""
    out = copy.copy(model)  # shares `_modules` with `model` until replaced below
    blocks = []
    for i, block in enumerate(model.blocks):
        if corrections.get(i) is None:
            blocks.append(block)
            continue
        b = copy.copy(block)
        b._modules = dict(block._modules)
        b._modules["self_attn"] = copy.deepcopy(block.self_attn)
        attn = b._modules["self_attn"]
        corr = corrections[i]
        # Onto the deployment's zero correction: fold (single 'wo') or replace (the others).
        attn.ispa_weight, attn.ispa_bias = None, None
        attn.absorb(corr)
        blocks.append(b)
    out._modules = dict(model._modules)
    out._modules["blocks"] = torch.nn.ModuleList(blocks)
    return out


def input_tensors(model: WanModel) -> dict[str, np.ndarray]:
    """The L-layers' W_o' (transposed) and b_o' (absorbed bias included), stacked: the inputs of
    modulation "input"."""
    weights, biases = [], []
    for block, span in zip(model.blocks, model.layout):
        if span is None:
            continue
        attn = block.self_attn
        if attn.ispa_weight is not None:
            raise UserError("--modulation input takes one folded W_o correction per layer; variant "
                            "'per_pass' and site 'adapter' need --modulation baked")
        bias = attn.o.bias if attn.ispa_bias is None else attn.o.bias + attn.ispa_bias[0]
        weights.append(to_numpy(attn.o.weight.T.float()))
        biases.append(to_numpy(bias.float()))
    return {"ispa_weight": np.ascontiguousarray(np.stack(weights)), "ispa_bias": np.stack(biases)}


def refit_tensors(model: WanModel) -> dict[str, np.ndarray]:
    """The per-video constants of a baked graph by their refit names, as they appear in ONNX (a
    single matrix is folded transposed by the exporter; per-pass-kind stacks stay as they are,
    gathered by `pass_kind`)."""
    out = {}
    for i, (block, span) in enumerate(zip(model.blocks, model.layout)):
        attn = block.self_attn
        if span is None:
            continue
        if attn.ispa_bias is None:
            raise ValueError(f"layer {i}: an L-layer without its correction constant (zero_corrections not run)")
        pre = f"blocks.{i}.self_attn."
        weight, bias = attn.ispa_weight, attn.ispa_bias.detach()
        if weight is None:
            out[pre + "o.weight_t"] = to_numpy(attn.o.weight.T.float())
        elif weight.shape[0] == 1:
            out[pre + "ispa_weight_t"] = to_numpy(weight[0].T.float())
        else:
            out[pre + "ispa_weight"] = to_numpy(weight.float())
        out[pre + "ispa_bias"] = to_numpy((bias[0] if bias.shape[0] == 1 else bias).float())
    return out


def modulation_tensors(model: WanModel, modulation: str, dtype: np.dtype) -> dict[str, np.ndarray]:
    """A video's modulation under the graph's names, in the graph's dtype."""
    if modulation not in MODULATIONS:
        raise UserError(f"--modulation: expected one of {list(MODULATIONS)}, got {modulation!r}")
    tensors = input_tensors(model) if modulation == "input" else refit_tensors(model)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}


def torch_inputs(model: WanModel, modulation: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A video's modulation as WanModel.forward takes it per step (`ispa_weight` W_o' transposed,
    `ispa_bias` b_o', stacked over the L-layers, in the model's dtype): what lets one PyTorch model
    serve several videos at once. None where the variant has no such form (per pass kind, adapter site)."""
    from runtimes.buffers import host_dtype

    dtype = host_dtype(str(next(model.parameters()).dtype).removeprefix("torch."))
    if modulation == "input":
        return {k: v.astype(dtype) for k, v in tensors.items()}
    if any(k.endswith(("ispa_weight", "ispa_weight_t")) for k in tensors):
        return None
    weights, biases = [], []
    for i, (block, span) in enumerate(zip(model.blocks, model.layout)):
        if span is None:
            continue
        pre = f"blocks.{i}.self_attn."
        weights.append(np.asarray(tensors[pre + "o.weight_t"], dtype=np.float32))
        biases.append(to_numpy(block.self_attn.o.bias.float()) + np.asarray(tensors[pre + "ispa_bias"], np.float32))
    return {"ispa_weight": np.ascontiguousarray(np.stack(weights).astype(dtype)),
            "ispa_bias": np.ascontiguousarray(np.stack(biases).astype(dtype))}


def absorptions_from(model: WanModel, tensors: dict[str, np.ndarray]) -> dict[int, Absorption]:
    """A baked video's corrections back as Absorptions (the variants without an input form), to
    install on its own copy of the L-layers (with_corrections)."""
    out = {}
    for i, (block, span) in enumerate(zip(model.blocks, model.layout)):
        if span is None:
            continue
        pre = f"blocks.{i}.self_attn."
        site = block.self_attn.ispa_site
        bias = torch.from_numpy(np.asarray(tensors[pre + "ispa_bias"], np.float32))
        bias = bias[None] if bias.dim() == 1 else bias
        if pre + "ispa_weight" in tensors:
            weight = torch.from_numpy(np.asarray(tensors[pre + "ispa_weight"], np.float32))
        elif pre + "ispa_weight_t" in tensors:
            weight = torch.from_numpy(np.ascontiguousarray(np.asarray(tensors[pre + "ispa_weight_t"], np.float32).T))[None]
        else:
            w = torch.from_numpy(np.ascontiguousarray(np.asarray(tensors[pre + "o.weight_t"], np.float32).T))
            weight = (w - block.self_attn.o.weight.detach().float().cpu())[None]
        out[i] = Absorption(site, weight, bias)
    return out
