"""FLOPs of one chunk step of the fixed graph: what a latency is measured against (achieved TFLOP/s,
the ISPA/full ratio a step can at best reach)."""
from __future__ import annotations

import math

from graphs.config import WanConfig
from runtimes.groups import as_layout


def step_flops(cfg: WanConfig, layout: list, capacity: int) -> dict:
    """Multiply-add FLOPs (x2) of one chunk step of the fixed graph with this per-layer layout (None:
    full, a cache of `capacity` frames; else the span's sink + window frames): every GEMM and
    attention product; norms, softmax and elementwise ops are left out. The fixed graph attends over
    all slots, valid or not."""
    q, p, d = cfg.chunk_frames * cfg.tokens_per_frame, cfg.tokens_per_frame, cfg.dim
    gemm = 2 * q * d * d * 6 + 4 * q * d * cfg.ffn_dim  # self q,k,v,o + cross q,o; FFN
    cross = 4 * q * cfg.text_len * d  # cross-attention QK^T and AV (text K/V computed once per prompt)
    outer = 2 * q * d * (cfg.in_dim * math.prod(cfg.patch_size) + cfg.patch_out)  # patchify + head

    def attn(frames: int) -> int:
        return 4 * q * (frames * p + q) * d

    layout = as_layout(layout)
    full_layer = gemm + cross + attn(capacity)
    layers = [gemm + cross + attn(capacity if s is None else s.frames) for s in layout]
    local = [attn(s.frames) / (gemm + cross + attn(s.frames)) for s in layout if s is not None]
    full, ispa = outer + cfg.num_layers * full_layer, outer + sum(layers)
    return {"full": full, "ispa": ispa, "predicted_ratio": ispa / full,
            "f_layer_attention_share": attn(capacity) / full_layer,
            "l_layer_attention_share": sum(local) / len(local) if local else None}
