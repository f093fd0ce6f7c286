"""The PyTorch backend of the streaming driver: the graph that is exported, run eagerly."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from graphs.config import WanConfig
from graphs.wan import WanModel
from runtimes.driver import Geometry, PassInfo, Stream

INPUTS = ["latents", "timestep", "frame_index", "cross_kv", "kv_full", "kv_full_mask", "kv_local",
          "kv_local_mask", "pass_kind", "ispa_weight", "ispa_bias"]
OUTPUTS = ["prediction", "new_kv_full", "new_kv_local"]


class TorchRunner:
    """Runs WanModel.forward on numpy feeds (zero-copy on CPU). `before_pass` lets the warmup
    monitor see which pass is running and which cache slots hold which frames."""

    def __init__(self, model: WanModel, device: str | torch.device = "cpu",
                 before_pass: Callable[[PassInfo], object] | None = None):
        self.model = model.eval()
        self.device = torch.device(device)
        self.input_names = list(INPUTS)
        self.output_names = list(OUTPUTS)
        self.before_pass = before_pass

    def run(self, feeds: dict[str, np.ndarray], info: PassInfo | None = None) -> dict[str, np.ndarray]:
        # reshape: np.ascontiguousarray turns 0-d scalars (frame_index, pass_kind) into shape [1]
        args = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v))).to(self.device)
                for k, v in feeds.items()}
        if "pass_kind" in args and not self.model.per_pass_kind():
            args.pop("pass_kind")
        monitor = self.before_pass(info) if self.before_pass is not None and info is not None else None
        with torch.no_grad():
            outs = self.model(**args, monitor=monitor)
        # numpy has no bfloat16: hand bf16 results over as float32.
        return {name: o.float().cpu().numpy() if o.dtype == torch.bfloat16 else o.cpu().numpy()
                for name, o in zip(OUTPUTS, outs) if o is not None}


def geometry(cfg: WanConfig, modes: list[str], local_window: int = 0, local_sink: int = 0, batch: int = 1,
             dtype: str = "float32") -> Geometry:
    return Geometry(
        modes=list(modes), batch=batch, channels=cfg.in_dim, chunk_frames=cfg.chunk_frames,
        height=cfg.latent_height, width=cfg.latent_width, tokens_per_frame=cfg.tokens_per_frame,
        heads=cfg.num_heads, head_dim=cfg.head_dim, full_capacity=cfg.max_frames, full_sink=cfg.full_sink,
        local_capacity=local_sink + local_window, local_sink=local_sink, dtype=dtype,
    )


def torch_stream(model: WanModel, context: torch.Tensor, seed: int, *, local_window: int = 0, local_sink: int = 0,
                 before_pass=None) -> Stream:
    """A stream over the model's current layer modes, with the text K/V computed once here."""
    with torch.no_grad():
        cross_kv = model.cross_kv(context).cpu().numpy()
    geo = geometry(model.cfg, model.modes, local_window, local_sink, batch=context.shape[0])
    return Stream(TorchRunner(model, before_pass=before_pass), geo, cross_kv, seed)
