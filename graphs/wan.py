"""The Wan2.1 causal DiT as Self-Forcing streams it, in static, export-ready PyTorch.

One chunk step is a pure function: it reads the fixed-size caches and returns the chunk's new K/V;
whoever drives the stream owns the caches (runtimes/driver.py). Every layer is either an F-layer
(reads the full-capacity cache group `kv_full`) or an L-layer with its own span, sink + window
frames (reads the group of that span, e.g. `kv_s1w5`; runtimes/groups.py names and orders them).
The span of each layer is data (`WanModel.layout`); the attention code is the same for all.

Parameter names are those of the released Wan2.1 checkpoints (wan/modules/model.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from runtimes.groups import GroupSpec, Span, as_layout, cache_groups, placement

from .config import WanConfig

FULL, LOCAL = "F", "L"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    # Normalise in float32 whatever the compute dtype, as Wan does.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    # Wan computes this in float64; float32 keeps the graph TensorRT-compatible (phase error < 1e-4).
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def rope_angles(positions: int | torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles [positions, dim/2] of Wan's rope_params, in float64, reduced modulo 2*pi (exact at any
    position; runtimes.schedule.frame_rope computes the same in numpy for the streaming graph)."""
    device = positions.device if isinstance(positions, torch.Tensor) else None
    pos = positions.double() if isinstance(positions, torch.Tensor) else torch.arange(positions, dtype=torch.float64)
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.remainder(torch.outer(pos, inv), 2 * math.pi)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, L, heads, head_dim] by per-token angles (cos/sin [L, head_dim/2])."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, Lq, n, d] over k, v [B, Lk, n, d]; returns heads concatenated [B, Lq, n*d]."""
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2).flatten(2)


def mask_to_bias(mask: torch.Tensor) -> torch.Tensor:
    """Boolean key mask [..., Lk] (True = attend) -> additive bias broadcastable over [B, heads, Lq, Lk]."""
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    bias = torch.where(mask, zero, torch.full_like(zero, float("-inf")))
    return bias if bias.dim() > 1 else bias[None]


class Monitor(Protocol):
    """Receives, for F-layers during warmup, what the same queries give in full attention and under
    each candidate local span (sink + window) of the same cache."""

    def masks(self, layer: int) -> list[torch.Tensor]:
        """bool [M] over the F cache slots, one per span `layer` is measured at in this pass: the
        frames an L-layer of that span would keep (none: the layer is not measured). Any device:
        the block moves them next to the activations."""
        ...

    def record(self, layer: int, x_in: torch.Tensor, a_global: torch.Tensor, a_locals: list[torch.Tensor],
               w_o: torch.Tensor) -> None: ...


@dataclass
class Absorption:
    """A per-instance correction of an L-layer's output projection, as graph constants.

    y = W_o a + b_o + delta_bias[k] (+ delta_weight[k] z when not folded into W_o), where z is the
    attention output (site 'wo') or the attention input (site 'adapter'), k the pass kind.
    """

    site: str  # 'wo' | 'adapter'
    delta_weight: torch.Tensor | None  # [K, D, D]; None when folded into W_o
    delta_bias: torch.Tensor  # [K, D]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        # Set by the bake on L-layers; kept apart from W_o's own bias so a TensorRT refit of a
        # fused GEMM cannot drop it (DESIGN.md section 7).
        self.ispa_bias: nn.Parameter | None = None
        self.ispa_weight: nn.Parameter | None = None
        self.ispa_site = "wo"

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), cos, sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), cos, sin)
        v = self.v(x).unflatten(-1, heads)
        return q, k, v

    def output(self, a: torch.Tensor, x_in: torch.Tensor, pass_kind: torch.Tensor | None,
               modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if modulation is not None:  # modulation as graph input: this layer's W_o' (transposed, [in, out]) and b_o'
            # Transposed as fed, so the graph multiplies by it as it is: a per-step Transpose of an input
            # weight cost the ONNX Runtime step 4.5% at the demo (constants are folded, inputs are not).
            return torch.matmul(a, modulation[0]) + modulation[1]
        y = self.o(a)
        if self.ispa_bias is None:
            return y
        k = 0 if pass_kind is None or self.ispa_bias.shape[0] == 1 else pass_kind
        if self.ispa_weight is not None:
            z = a if self.ispa_site == "wo" else x_in
            y = y + torch.matmul(z, self.ispa_weight[k].transpose(0, 1))
        return y + self.ispa_bias[k]

    def absorb(self, absorption: Absorption) -> None:
        """Install a correction; a single 'wo' correction is folded into W_o (costs nothing per step)."""
        with torch.no_grad():
            dw, db = absorption.delta_weight, absorption.delta_bias
            dtype = self.o.weight.dtype
            if dw is not None and absorption.site == "wo" and dw.shape[0] == 1:
                self.o.weight += dw[0].to(dtype)
                dw = None
            self.ispa_site = absorption.site
            self.ispa_weight = None if dw is None else nn.Parameter(dw.to(dtype), requires_grad=False)
            self.ispa_bias = nn.Parameter(db.to(dtype), requires_grad=False)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> torch.Tensor:
        """K/V of the text, computed once per prompt: [2, B, text_len, heads, head_dim]."""
        heads = (self.num_heads, -1)
        return torch.stack([self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)])

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attend(q, kv[0], kv[1], None))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-frame adaLN: x [B, F*P, D], shift/scale [B, F, 1, D]."""
    frames = shift.shape[1]
    return (x.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)


def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (y.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, cos, sin, cross_kv, cache, bias, pass_kind=None, modulation=None,
                monitor: Monitor | None = None, layer: int = -1):
        """x [B, L, D]; e [B, F, 6, D]; cache None or [2, B, Lc, n, d] read before the chunk's own K/V.

        Returns the new x and the chunk's own K/V [2, B, L, n, d].
        """
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)
        x_in = modulate(self.norm1(x), e[0], e[1])
        attn = self.self_attn
        q, k, v = attn.project(x_in, cos, sin)
        keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1))
        a = attend(q, keys, values, bias)
        masks = [] if monitor is None else monitor.masks(layer)
        if masks:  # the same queries over the frames an L-layer of each span would keep: a_l
            own = torch.ones(k.shape[1], dtype=torch.bool, device=x.device)
            a_locals = []
            for slots in masks:  # one extra masked attention per span measured
                slots = slots.to(device=x.device, dtype=torch.bool)
                per_frame = cache.shape[2] // slots.shape[0]
                local = mask_to_bias(torch.cat([slots.repeat_interleave(per_frame), own]))
                a_locals.append(attend(q, keys, values, local))
            monitor.record(layer, x_in, a, a_locals, attn.o.weight)
        x = x + gate(attn.output(a, x_in, pass_kind, modulation), e[2])
        x = x + self.cross_attn(self.norm3(x), cross_kv)
        x = x + gate(self.ffn(modulate(self.norm2(x), e[3], e[4])), e[5])
        return x, torch.stack([k, v])


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.patch_out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(modulate(self.norm(x), e[0], e[1]))


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.layout: list[Span | None] = [None] * cfg.num_layers  # per layer: None = full attention
        # RoPE split of Wan: [c - 2*(c//3), c//3, c//3] of c = head_dim/2 rotary pairs (frame, h, w).
        c = cfg.head_dim // 2
        cf, ch = c - 2 * (c // 3), c // 3
        gh, gw = cfg.grid
        hw = torch.cat([rope_angles(gh, 2 * ch)[:, None, :].expand(gh, gw, ch),
                        rope_angles(gw, 2 * ch)[None, :, :].expand(gh, gw, ch)], dim=-1).reshape(gh * gw, 2 * ch)
        self.rope_pairs = cf
        # Non-persistent: derived from the config, and the checkpoint names stay Wan's. The frame axis
        # has no table: the streaming step takes its chunk's angles as an input (no length limit).
        self.register_buffer("rope_hw_cos", torch.cos(hw).float(), persistent=False)
        self.register_buffer("rope_hw_sin", torch.sin(hw).float(), persistent=False)

    def cast(self, dtype: torch.dtype) -> "WanModel":
        """Cast the parameters only: the RoPE tables stay float32 (fp16 angles would blur positions)."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    # -- layer layout ------------------------------------------------------------------------
    def with_layout(self, layout: list) -> "WanModel":
        """The same weights under another layout: a shallow copy, so that a video's all-F warmup and
        another video's steps on the deployment's layout can share one model."""
        view = copy.copy(self)
        view.set_layout(layout)
        return view

    def set_layout(self, layout: list) -> None:
        """Each layer's attention: None (full) or a local span (anything with `sink` and `window`)."""
        layout = as_layout(layout)
        if len(layout) != self.cfg.num_layers:
            raise ValueError(f"layout must have {self.cfg.num_layers} entries (one per layer), got {len(layout)}")
        self.layout = layout

    @property
    def modes(self) -> list[str]:
        return [FULL if s is None else LOCAL for s in self.layout]

    def cache_groups(self) -> list[GroupSpec]:
        return cache_groups(self.layout, self.cfg.max_frames, self.cfg.full_sink)

    def group_index(self) -> list[tuple[str, int]]:
        """Per layer: the name of its cache group and its position in that group."""
        return placement(self.cache_groups())

    def per_pass_kind(self) -> bool:
        """Whether some L-layer selects its correction by pass kind (the graph then takes `pass_kind`)."""
        return any(b.self_attn.ispa_bias is not None and b.self_attn.ispa_bias.shape[0] > 1 for b in self.blocks)

    # -- pieces ------------------------------------------------------------------------------
    def cross_kv(self, context: torch.Tensor) -> torch.Tensor:
        """Text K/V of every layer [layers, 2, B, text_len, n, d] from embeddings [B, <=text_len, text_dim]."""
        pad = self.cfg.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"text context has {context.shape[1]} tokens, more than text_len {self.cfg.text_len}")
        ctx = self.text_embedding(F.pad(context, (0, 0, 0, pad)))
        return torch.stack([b.cross_attn.context_kv(ctx) for b in self.blocks])

    def frame_rope(self, frame_pos: torch.Tensor) -> torch.Tensor:
        """cos/sin [2, len(frame_pos), rope_pairs] of the frame axis at absolute positions frame_pos."""
        ang = rope_angles(frame_pos, 2 * self.rope_pairs)
        return torch.stack([torch.cos(ang), torch.sin(ang)]).float().to(self.rope_hw_cos.device)

    def rope(self, rope_frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [frames*P, head_dim/2] of every token, from the frame axis rope_frame [2, frames, pairs]."""
        p = self.cfg.tokens_per_frame
        n = rope_frame.shape[1]

        def table(frame_tab, hw_tab):
            fr = frame_tab[:, None, :].expand(n, p, frame_tab.shape[1])
            return torch.cat([fr, hw_tab[None].expand(n, p, hw_tab.shape[1])], dim=-1).reshape(n * p, -1)

        return table(rope_frame[0], self.rope_hw_cos), table(rope_frame[1], self.rope_hw_sin)

    def embed(self, latents: torch.Tensor, t_frames: torch.Tensor):
        """Patchify latents [B, C, F, H, W]; time modulation from per-frame timesteps [B, F]."""
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2)
        b, f = t_frames.shape
        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t_frames.reshape(-1)).to(x.dtype))
        e6 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return x, e.unflatten(0, (b, f)), e6.unflatten(0, (b, f))

    def unpatchify(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        cfg = self.cfg
        gh, gw = cfg.grid
        pt, ph, pw = cfg.patch_size
        x = x.reshape(x.shape[0], frames, gh, gw, pt, ph, pw, cfg.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], cfg.out_dim, frames * pt, gh * ph, gw * pw)

    # -- the chunk step (the exported graph) ------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, rope_frame: torch.Tensor,
                cross_kv: torch.Tensor, pass_kind: torch.Tensor | None = None, ispa_weight: torch.Tensor | None = None,
                ispa_bias: torch.Tensor | None = None, monitor: Monitor | None = None, **caches: torch.Tensor | None):
        """One chunk step: latents [B, C, f, H, W], timestep [B], rope_frame [2, f, pairs] (cos, sin of the
        chunk's frame-axis RoPE angles, runtimes.schedule.frame_rope).

        `caches` holds each cache group of `cache_groups()` by name, [n, 2, B, capacity*P, heads, head_dim],
        with its validity mask `<name>_mask` bool [capacity]. A mask of None means every slot is valid (the
        PyTorch backend's fast path: attention without a mask). ispa_weight/ispa_bias (modulation as graph
        input) stack one W_o'/b_o' per L-layer, in layer order.
        Returns (prediction [B, C, f, H, W], then each group's new K/V [n, 2, B, f*P, heads, head_dim]).
        """
        groups = self.cache_groups()
        known = {n for g in groups for n in (g.name, g.name + "_mask")}
        if set(caches) - known or {g.name for g in groups} - set(caches):
            raise TypeError(f"caches: expected {sorted(known)} (masks optional), got {sorted(caches)}")
        f = latents.shape[2]
        x, e, e6 = self.embed(latents, timestep[:, None].expand(-1, f))
        cos, sin = self.rope(rope_frame)
        own = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        p = self.cfg.tokens_per_frame
        bias = {}
        for g in groups:
            mask = caches.get(g.name + "_mask")
            bias[g.name] = None if mask is None else mask_to_bias(torch.cat([mask.repeat_interleave(p), own]))
        new: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
        local = 0  # the L-layers' running index into ispa_weight/ispa_bias
        for i, (block, span, (name, j)) in enumerate(zip(self.blocks, self.layout, self.group_index())):
            mod = None
            if span is not None:
                mod = None if ispa_weight is None else (ispa_weight[local], ispa_bias[local])
                local += 1
            x, kv = block(x, e6, cos, sin, cross_kv[i], caches[name][j], bias[name], pass_kind, mod,
                          monitor if span is None else None, i)
            new[name].append(kv)
        out = self.unpatchify(self.head(x, e), f)
        return (out, *(torch.stack(new[g.name]) for g in groups))

    # -- the whole sequence at once (reference and training) --------------------------------
    def forward_sequence(self, latents: torch.Tensor, t_frames: torch.Tensor, frame_pos: torch.Tensor,
                         cross_kv: torch.Tensor, frame_masks: list[torch.Tensor]) -> torch.Tensor:
        """Frames [B, C, T, H, W] at positions frame_pos [T] with per-frame timesteps [B, T], under
        per-layer frame-level masks [T, T] (True = query frame may attend key frame)."""
        t = latents.shape[2]
        x, e, e6 = self.embed(latents, t_frames)
        cos, sin = self.rope(self.frame_rope(frame_pos))
        p = self.cfg.tokens_per_frame
        for i, block in enumerate(self.blocks):
            bias = mask_to_bias(frame_masks[i].to(x.device).repeat_interleave(p, 0).repeat_interleave(p, 1))
            x, _ = block(x, e6, cos, sin, cross_kv[i], None, bias)
        return self.unpatchify(self.head(x, e), t)


def parameter_count(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
