"""The demo model's fixed text context: a constant "prompt" shared by training, the CLI, the evaluation
and the tests (the export's `--model demo` uses it, so it lives in the core, not in ispa_export.lab)."""
from __future__ import annotations

import torch

from graphs.config import preset

# Fixed seed of the text embedding: a constant "prompt" shared by training, CLI, eval and tests.
CONTEXT_SEED = 20260711


def demo_context(batch: int = 1) -> torch.Tensor:
    """The fixed text embedding of the demo model: [batch, text_len=4, text_dim=16], a seeded
    standard normal draw (torch CPU generator, seed CONTEXT_SEED), identical on every platform."""
    cfg = preset("demo")
    g = torch.Generator().manual_seed(CONTEXT_SEED)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    return ctx.expand(batch, -1, -1).contiguous()
