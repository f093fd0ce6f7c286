"""The PyTorch backend of the streaming driver: the graph that is exported, run eagerly on any device.

Its buffers are torch tensors on the model's device in the model's dtype (bf16 included), so the
caches never leave the GPU: a step uploads the latents, timestep, RoPE angles and masks (a few KB)
and downloads the prediction.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from graphs.config import WanConfig
from graphs.wan import WanModel
from runtimes.buffers import Buffers, host_dtype
from runtimes.driver import Geometry, PassInfo, Stream
from runtimes.groups import output_names

# Inputs besides the cache groups and their masks, which follow the model's layout.
INPUTS = ["latents", "timestep", "rope_frame", "cross_kv", "pass_kind", "ispa_weight", "ispa_bias"]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Inputs that keep float32 whatever the model's dtype (the graph casts them itself).
FLOAT32_INPUTS = ("timestep", "rope_frame")


def to_torch(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`; bf16 (ml_dtypes) goes over as its bits. 0-d arrays stay 0-d."""
    a = np.require(a, requirements="C")
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(a).to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy; bf16 becomes ml_dtypes' bfloat16 (same bits, no float32 copy)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(host_dtype("bfloat16"))
    return t.numpy()


class TorchBuffers(Buffers):
    """torch tensors on one device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)

    def _empty(self, shape, dtype):
        return torch.zeros(shape, dtype=TORCH_DTYPES.get(dtype) or getattr(torch, dtype), device=self.device)

    def _zero(self, buf):
        buf.zero_()

    def _copy2d(self, dst, dst_off, dst_pitch, src, src_off, src_pitch, width, rows):
        d = torch.as_strided(dst, (rows, width), (dst_pitch, 1), dst.storage_offset() + dst_off)
        d.copy_(torch.as_strided(src, (rows, width), (src_pitch, 1), src.storage_offset() + src_off))

    def _upload(self, buf, host):
        buf.copy_(to_torch(host, self.device))

    def _download(self, buf):
        # On the CPU .numpy() would share the live buffer: the handoff state must be a snapshot.
        out = to_numpy(buf)
        return out.copy() if self.device.type == "cpu" else out

    def address(self, name):
        return int(self._bufs[name].data_ptr())

    def upload(self, name: str, host: np.ndarray) -> None:
        before = self.traffic.h2d
        super().upload(name, host)
        if self.device.type == "cpu":
            self.traffic.h2d = before

    def download(self, name: str) -> np.ndarray:
        before = self.traffic.d2h
        out = super().download(name)
        if self.device.type == "cpu":
            self.traffic.d2h = before
        return out


class TorchRunner:
    """Runs WanModel.forward for the driver. `before_pass` lets the warmup monitor see which pass is
    running and which cache slots hold which frames. A cache mask with every slot valid is passed as
    None: the attention then runs without a mask (flash/cuDNN kernels on a GPU)."""

    def __init__(self, model: WanModel, device: str | torch.device | None = None,
                 before_pass: Callable[[PassInfo], object] | None = None, compile: bool = False,
                 buffers: TorchBuffers | None = None, forward: Callable | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        self.dtype = next(model.parameters()).dtype
        # Several runners (videos) share one model; each owns its buffers, unless handed a stream's.
        self.buffers = buffers if buffers is not None else TorchBuffers(self.device)
        self.before_pass = before_pass
        # Fixed shapes and fixed cache addresses: one graph per layout, recompiled once when the masks
        # drop out (the cache has filled). Not with a monitor, which runs Python inside the step.
        self.forward = forward or (torch.compile(self.model) if compile else self.model)

    # The model's layout changes at the transition (ispa.bake): its groups are read when asked.
    @property
    def input_names(self) -> list[str]:
        return INPUTS + [n for g in self.model.cache_groups() for n in (g.name, g.name + "_mask")]

    @property
    def output_names(self) -> list[str]:
        return output_names(self.model.cache_groups())

    def _feed(self, name: str, a: np.ndarray) -> torch.Tensor | None:
        if name.endswith("_mask") and np.all(a):
            return None
        t = to_torch(a, self.device)
        if self.device.type != "cpu":
            self.buffers.traffic.h2d += a.nbytes
        if t.is_floating_point() and name not in FLOAT32_INPUTS:
            t = t.to(self.dtype)
        return t

    def run(self, feeds: dict[str, np.ndarray], info: PassInfo | None = None) -> dict:
        args = {k: self._feed(k, v) for k, v in feeds.items()}
        inputs = set(self.input_names)
        for name in self.buffers.names():
            if name in inputs and name not in args:
                args[name] = self.buffers[name]
        if "pass_kind" in args and not self.model.per_pass_kind():
            args.pop("pass_kind")
        monitor = self.before_pass(info) if self.before_pass is not None and info is not None else None
        with torch.no_grad():
            outs = self.model(**args, monitor=monitor) if monitor is not None else self.forward(**args)
        pred = outs[0].float().cpu().numpy()
        if self.device.type != "cpu":
            self.buffers.traffic.d2h += pred.nbytes
        names = self.output_names
        result = {"prediction": pred}
        result.update(zip(names[1:], outs[1:]))
        return result


def geometry(cfg: WanConfig, layout: list, batch: int = 1, dtype: str = "float32") -> Geometry:
    """The driver's geometry of a model with this per-layer layout (None: full, else a local span)."""
    return Geometry(
        layout=layout, batch=batch, channels=cfg.in_dim, chunk_frames=cfg.chunk_frames,
        height=cfg.latent_height, width=cfg.latent_width, tokens_per_frame=cfg.tokens_per_frame,
        heads=cfg.num_heads, head_dim=cfg.head_dim, full_capacity=cfg.max_frames, full_sink=cfg.full_sink,
        dtype=dtype,
    )


def model_dtype(model: WanModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def torch_stream(model: WanModel, context: torch.Tensor, seed: int, *, before_pass=None) -> Stream:
    """A stream over the model's layout on the model's device and in its dtype, with the text K/V
    computed once here."""
    device = next(model.parameters()).device
    with torch.no_grad():
        cross_kv = to_numpy(model.cross_kv(context.to(device, next(model.parameters()).dtype)))
    geo = geometry(model.cfg, model.layout, batch=context.shape[0], dtype=model_dtype(model))
    return Stream(TorchRunner(model, before_pass=before_pass), geo, cross_kv, seed)
