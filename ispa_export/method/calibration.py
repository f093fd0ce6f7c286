"""What a layout costs the generated frames, measured on the warmup: the calibration of the policy.

The monitor measures d at a layer's attention output, relative to that output; what generation
loses is the change of the denoised sample. A deep layer's error passes through fewer blocks than
an early one's, the gates e2 scale each block's attention residual, and errors of several layers
need not add, so equal d may cost very differently. Two measurements here, both on the warmup's
own frames with the stream's own noise:

- `sensitivity`: per layer, the sample error when only that layer is restricted to a reference
  span, divided by the layer's d there: the layer's weight in the predicted loss (policy.py);
- `layout_error`: the sample error of a whole layout (every layer's span at once), which the policy
  uses to choose between the best allocations of the candidate spans (no additivity assumed).

Both run the stream's teacher-forced denoising chain for every warmup chunk at once:
graphs.masks.teacher_forcing lets each noisy chunk see the clean history its cache would hold
(per layer: the full cache, or the layer's sink + window) and itself, so one forward_sequence per
denoising step gives every chunk's prediction; with runtimes.schedule's noise this is exactly the
sample the stream produces under teacher forcing (tests/test_policy.py checks it).

Scored: the warmup's last `score_chunks` chunks, the ones with the longest history. What they
cannot show: frames older than the warmup. A span is judged on what it drops from a history of at
most the warmup's length, while at steady state it drops up to the full capacity (rolling) or the
whole video (whole regime) minus the span.

Cost per measured layout: one forward_sequence of 2 x warmup frames per denoising step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from graphs.masks import teacher_forcing
from graphs.wan import WanModel
from runtimes.schedule import chunk_noise

from ispa_export.method.monitor import LocalSpan


class Chain:
    """The warmup's teacher-forced denoising, replayable under any per-layer spans."""

    def __init__(self, model: WanModel, cross_kv: torch.Tensor, latents: np.ndarray, seed: int,
                 timesteps: list[float], score_chunks: int = 2):
        cfg = model.cfg
        self.model, self.cross_kv, self.timesteps = model, cross_kv, list(timesteps)
        self.dev = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.clean = torch.from_numpy(np.ascontiguousarray(latents)).to(self.dev, self.dtype)
        b, c, t, h, w = self.clean.shape
        f = cfg.chunk_frames
        self.t, self.f = t, f
        self.scored = list(range(max(t - score_chunks * f, 0), t))
        # the stream's noise for each chunk and step, laid out along the frame axis
        self.noise = [torch.from_numpy(np.concatenate([chunk_noise(seed, k // f, step, (b, c, f, h, w))
                                                       for k in range(0, t, f)], axis=2)).to(self.dev, self.dtype)
                      for step in range(len(self.timesteps))]
        self.pos = torch.arange(t, device=self.dev).repeat(2)
        self._masks: dict = {}
        self.reference = self.sample([None] * cfg.num_layers)

    def mask(self, span: LocalSpan | None) -> torch.Tensor:
        if span not in self._masks:
            cfg = self.model.cfg
            cap, sink = (cfg.max_frames, cfg.full_sink) if span is None else (span.frames, span.sink)
            self._masks[span] = teacher_forcing(self.t, self.f, cap, sink).to(self.dev)
        return self._masks[span]

    def sample(self, spans: list[LocalSpan | None], model: WanModel | None = None) -> torch.Tensor:
        """Every warmup chunk's denoised sample [B, C, T, H, W] with layer i restricted to spans[i]
        (under `model`, e.g. one with corrections baked, instead of the chain's own)."""
        model = model or self.model
        masks = [self.mask(s) for s in spans]
        b = self.clean.shape[0]
        x = self.noise[0]
        with torch.no_grad():
            for k, ts in enumerate(self.timesteps):
                sigma = ts / 1000.0
                t_frames = torch.cat([torch.zeros(b, self.t, device=self.dev),
                                      torch.full((b, self.t), float(ts), device=self.dev)], 1)
                pred = model.forward_sequence(torch.cat([self.clean, x], 2), t_frames, self.pos,
                                                   self.cross_kv, masks)[:, :, self.t:]
                x0 = x - sigma * pred
                if k + 1 < len(self.timesteps):  # runtimes.schedule.renoise
                    nxt = self.timesteps[k + 1] / 1000.0
                    x = (1.0 - nxt) * x0 + nxt * self.noise[k + 1]
        return x0

    def frame_errors(self, spans: list[LocalSpan | None], model: WanModel | None = None,
                     last_chunks: int | None = None) -> np.ndarray:
        """Per scored frame (or per frame of the last `last_chunks` chunks), the mean squared
        difference of its sample from the full-cache one."""
        frames = self.scored if last_chunks is None else list(range(max(self.t - last_chunks * self.f, 0), self.t))
        diff = (self.sample(spans, model) - self.reference)[:, :, frames].double()
        return diff.square().mean(dim=(0, 1, 3, 4)).cpu().numpy()

    def error(self, spans: list[LocalSpan | None], model: WanModel | None = None, last_chunks: int | None = None) -> float:
        """Mean of `frame_errors`."""
        return float(self.frame_errors(spans, model, last_chunks).mean())


@dataclass
class Sensitivity:
    span: LocalSpan  # the reference span every layer was restricted to, alone
    effect: list[float]  # per layer: sample MSE of the scored frames with that layer local
    discrepancy: list[float]  # per layer: the monitor's raw d at that span
    weight: list[float]  # effect / discrepancy: the predicted-loss weight
    scored_frames: list[int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["span"] = {"sink": self.span.sink, "window": self.span.window}
        return d


def sensitivity(chain: Chain, span: LocalSpan, discrepancy: np.ndarray) -> Sensitivity:
    n = chain.model.cfg.num_layers
    effect = np.array([chain.error([span if i == layer else None for i in range(n)]) for layer in range(n)])
    d = np.asarray(discrepancy, dtype=float)
    ok = d > 0
    weight = np.where(ok, effect / np.where(ok, d, 1.0), np.nan)
    # A layer with d = 0 changes nothing at this span: its weight is unobserved, take the median.
    fill = float(np.nanmedian(weight)) if ok.any() else 1.0
    weight = np.where(ok, weight, fill)
    return Sensitivity(span, effect.tolist(), d.tolist(), weight.tolist(), chain.scored)
