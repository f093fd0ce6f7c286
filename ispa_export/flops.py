"""FLOPs of one chunk step of the fixed graph: what a latency is measured against (achieved TFLOP/s,
the ISPA/full ratio a step can at best reach)."""
from __future__ import annotations

import math

from graphs.config import WanConfig
from graphs.wan import FULL, LOCAL


def step_flops(cfg: WanConfig, modes: list[str], capacity: int, window: int | None = None, sink: int = 0) -> dict:
    """Multiply-add FLOPs (x2) of one chunk step of the fixed graph: every GEMM and attention product;
    norms, softmax and elementwise ops are left out. The fixed graph attends over all slots, valid or not."""
    q, p, d = cfg.chunk_frames * cfg.tokens_per_frame, cfg.tokens_per_frame, cfg.dim
    span = (cfg.chunk_frames if window is None else window) + sink  # an L-layer's cache, in frames
    gemm = 2 * q * d * d * 6 + 4 * q * d * cfg.ffn_dim  # self q,k,v,o + cross q,o; FFN
    cross = 4 * q * cfg.text_len * d  # cross-attention QK^T and AV (text K/V computed once per prompt)
    attn = {FULL: 4 * q * (capacity * p + q) * d, LOCAL: 4 * q * (span * p + q) * d}
    outer = 2 * q * d * (cfg.in_dim * math.prod(cfg.patch_size) + cfg.patch_out)  # patchify + head
    layer = {m: gemm + cross + attn[m] for m in (FULL, LOCAL)}
    full = outer + cfg.num_layers * layer[FULL]
    ispa = outer + sum(layer[m] for m in modes)
    return {"full": full, "ispa": ispa, "predicted_ratio": ispa / full,
            "f_layer_attention_share": attn[FULL] / layer[FULL],
            "l_layer_attention_share": attn[LOCAL] / layer[LOCAL]}
