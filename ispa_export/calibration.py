"""How much a layer's attention discrepancy moves the model's final prediction, measured on the warmup.

The monitor measures d at a layer's attention output (relative to that output); what generation
loses is the change of the final velocity prediction. A deep layer's error passes through fewer
blocks than an early one's, and the gates e2 scale each block's attention residual, so equal d may
cost very differently. Per layer, one teacher-forced forward over the warmup frames with only that
layer restricted to a reference span (graphs.masks.teacher_forcing, the same masks the stream's
caches realise) gives the relative change of the prediction; divided by the layer's d at that span
it is the layer's weight in the predicted loss (policy.py).

Cost: (layers + 1) forwards of the warmup sequence per timestep of the schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from graphs.masks import teacher_forcing
from graphs.wan import WanModel

from .monitor import LocalSpan


@dataclass
class Sensitivity:
    span: LocalSpan  # the reference span every layer was restricted to
    effect: list[float]  # per layer: ||pred_l - pred||^2 / ||pred||^2 over the scored frames
    discrepancy: list[float]  # per layer: the monitor's raw d at that span
    weight: list[float]  # effect / discrepancy (the predicted-loss weight)
    timesteps: list[float]
    scored_frames: list[int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["span"] = {"sink": self.span.sink, "window": self.span.window}
        return d


def measure_sensitivity(model: WanModel, cross_kv: torch.Tensor, latents: np.ndarray, span: LocalSpan,
                        discrepancy: np.ndarray, timesteps: list[float], seed: int = 0) -> Sensitivity:
    """latents [B, C, T, H, W]: the warmup's frames; discrepancy [L]: raw d of each layer at `span`."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    clean = torch.from_numpy(np.ascontiguousarray(latents)).to(device=dev, dtype=dtype)
    t = clean.shape[2]
    f = cfg.chunk_frames
    full = teacher_forcing(t, f, cfg.max_frames, cfg.full_sink).to(dev)
    local = teacher_forcing(t, f, span.frames, span.sink).to(dev)
    # Scored: the noisy frames of chunks whose history is longer than the span (where it drops frames).
    scored = [i for i in range(t) if (i // f) * f > span.frames]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=g).to(device=dev, dtype=dtype)
    pos = torch.arange(t, device=dev).repeat(2)
    n = cfg.num_layers
    num, den = np.zeros(n), 0.0
    with torch.no_grad():
        for ts in timesteps:
            s = ts / 1000.0
            lat = torch.cat([clean, (1 - s) * clean + s * noise], 2)
            t_frames = torch.cat([torch.zeros(clean.shape[0], t), torch.full((clean.shape[0], t), float(ts))], 1).to(dev)
            ref = model.forward_sequence(lat, t_frames, pos, cross_kv, [full] * n)[:, :, t:][:, :, scored].double()
            den += float(ref.square().sum())
            for layer in range(n):
                masks = [full] * n
                masks[layer] = local
                out = model.forward_sequence(lat, t_frames, pos, cross_kv, masks)[:, :, t:][:, :, scored].double()
                num[layer] += float((out - ref).square().sum())
    effect = num / max(den, 1e-30)
    d = np.asarray(discrepancy, dtype=float)
    ok = d > 0
    weight = np.where(ok, effect / np.where(ok, d, 1.0), np.nan)
    # A layer with d = 0 changes nothing at this span: its weight is unobserved, take the median.
    fill = float(np.nanmedian(weight)) if ok.any() else 1.0
    weight = np.where(ok, weight, fill)
    return Sensitivity(span, effect.tolist(), d.tolist(), weight.tolist(), list(map(float, timesteps)), scored)
