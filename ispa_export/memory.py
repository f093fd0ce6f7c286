"""What a warmup needs in memory, computed before it starts: weights, the full cache, the monitor's
statistics and the step's activations, on the device and on the host.

Wan 14B is the case that decides the design. Its float64 statistics (D = 5120) are 420 MB per
accumulator; a video's absorb monitors only the deployment's L-layers at their spans, one
accumulator per layer, and when float64 next to the activations does not fit it keeps a chunk's
partial sums in float32 on the GPU and folds them into float64 totals on the host (`Placement`).
`plan` picks the first placement that fits, or refuses in one line naming what is short.

Everything but the activations is exact: parameter bytes come from the model built on the meta
device, cache bytes from kv.kv_bytes, statistics from monitor.statistics_bytes (tests check each
against what is allocated). The activations are an upper estimate of one monitored block's live
tensors (`activation_bytes`); a 10% margin of the device is kept free on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphs.config import WanConfig
from graphs.wan import WanModel, parameter_count

from .errors import UserError
from .kv import DTYPE_BYTES, kv_bytes
from .method.monitor import Placement, StatsBytes, statistics_bytes

PASS_KINDS = 5  # four denoising steps and the cache pass (runtimes.schedule)
MARGIN = 0.9  # of the device's free memory a plan may use
HOST_PLACEMENT = Placement(torch.float32, "cpu")


def weight_bytes(cfg: WanConfig, dtype: str) -> int:
    """Bytes of the model's parameters in `dtype`, counted on the meta device."""
    with torch.device("meta"):
        return parameter_count(WanModel(cfg)) * DTYPE_BYTES[dtype]


def activation_bytes(cfg: WanConfig, dtype: str, batch: int = 1, spans: int = 1) -> int:
    """Upper estimate of the live tensors of one monitored block step: the chunk's hidden states and
    q/k/v, the cache concatenated with the chunk's keys and values, the FFN's hidden layer, the
    attention outputs (global and one per span), and the monitor's float64 copies (a_g, a_l, x_in,
    r, y and the augmented regressors)."""
    item = DTYPE_BYTES[dtype]
    tokens = batch * cfg.chunk_frames * cfg.tokens_per_frame
    keys = batch * (cfg.max_frames + cfg.chunk_frames) * cfg.tokens_per_frame
    d = cfg.dim
    hidden = tokens * d * (4 + 3 * item + (1 + spans) * item)  # float32 norms, q/k/v, attention outputs
    cache = 2 * keys * d * item
    ffn = 2 * tokens * cfg.ffn_dim * item
    monitor = 7 * tokens * (d + 1) * 8
    return hidden + cache + ffn + monitor


@dataclass(frozen=True)
class Budget:
    """Bytes a warmup holds on its device and on the host, by what holds them."""

    weights: int
    cache: int  # the all-F cache of the warmup and the text K/V
    statistics: StatsBytes
    activations: int
    placement: Placement

    @property
    def device(self) -> int:
        return self.weights + self.cache + self.statistics.device + self.activations

    @property
    def host(self) -> int:
        return self.statistics.host

    def to_dict(self) -> dict:
        return {"weights": self.weights, "cache": self.cache, "statistics_device": self.statistics.device,
                "statistics_host": self.statistics.host, "activations_estimate": self.activations,
                "device": self.device, "host": self.host,
                "partial_dtype": str(self.placement.partial_dtype).removeprefix("torch."),
                "totals_device": self.placement.totals_device or "with the activations"}


def budget(cfg: WanConfig, dtype: str, *, monitored_layers: int, spans: int, per_kind: bool, gate_chunks: int,
           track_fit: bool, holdout_gap: int, site: str, placement: Placement, batch: int = 1) -> Budget:
    """The warmup's bytes with `monitored_layers` layers measured at each of `spans` spans (a video's
    absorb: its L-layers, 1 span each; a build's search: every layer at every candidate span)."""
    kv = kv_bytes(cfg, None, dtype=dtype, batch=batch)
    stats = statistics_bytes(cfg.dim, monitored_layers, spans, PASS_KINDS, holdout_gap, per_kind=per_kind,
                             gate_chunks=gate_chunks, track_fit=track_fit, site=site, placement=placement)
    return Budget(weight_bytes(cfg, dtype), kv.total + kv.cross, stats, activation_bytes(cfg, dtype, batch, spans),
                  placement)


def free_bytes(device: torch.device) -> tuple[int | None, int | None]:
    """(free on the device, available on the host); the device's is the host's on a CPU."""
    from .method.monitor import available_bytes

    host = available_bytes(torch.device("cpu"))
    return (available_bytes(device) if device.type == "cuda" else host), host


def plan(what: str, device: torch.device, make: "callable", free: tuple[int | None, int | None] | None = None,
         hint: str = "") -> Budget:
    """The first placement whose budget fits: float64 next to the activations, else float32 partials
    there with float64 totals on the host (a GPU only). `make(placement) -> Budget`. UserError (one
    line) when neither fits; `free` overrides what is measured (tests)."""
    dev_free, host_free = free if free is not None else free_bytes(device)
    options = [Placement()] + ([HOST_PLACEMENT] if device.type == "cuda" else [])
    tried = []
    for placement in options:
        b = make(placement)
        on_host = device.type != "cuda"
        need_dev = b.device + (b.host if on_host else 0)
        fits_dev = dev_free is None or need_dev <= MARGIN * dev_free
        fits_host = on_host or host_free is None or b.host <= MARGIN * host_free
        if fits_dev and fits_host:
            return b
        tried.append(b)
    b = tried[-1]
    gib = 2 ** 30
    raise UserError(f"{what}: needs {b.device / gib:.1f} GiB on {device} (weights {b.weights / gib:.1f}, "
                    f"cache {b.cache / gib:.1f}, statistics {b.statistics.device / gib:.1f}, activations "
                    f"~{b.activations / gib:.1f}) and {b.host / gib:.1f} GiB on the host; "
                    f"{'?' if dev_free is None else f'{dev_free / gib:.1f}'} GiB is free there"
                    + ("" if device.type != "cuda" else f", {'?' if host_free is None else f'{host_free / gib:.1f}'} "
                       "GiB on the host") + hint)
