"""Frame-level attention masks of the whole sequence, the reference the cached stream must equal."""
from __future__ import annotations

import torch



def retained(frame: int, start: int, capacity: int, sink: int) -> bool:
    """Whether a cache of `capacity` frames (sink pinned) still holds `frame` when the chunk starting
    at absolute frame `start` is processed (every frame before `start` has been written)."""
    return frame < start and (frame < sink or frame >= start - (capacity - sink))


def block_causal(frames: int, chunk: int, capacity: int, sink: int) -> torch.Tensor:
    """[T, T] bool: chunk c sees itself and the earlier frames a cache of `capacity` (sink pinned) keeps."""
    m = torch.zeros(frames, frames, dtype=torch.bool, device="cpu")  # built here, moved by the caller
    for start in range(0, frames, chunk):
        q = slice(start, min(start + chunk, frames))
        m[q, q] = True
        for j in range(start):
            m[q, j] = retained(j, start, capacity, sink)
    return m


def teacher_forcing(frames: int, chunk: int, capacity: int, sink: int) -> torch.Tensor:
    """[2T, 2T] bool over [clean frames; noisy frames]: every chunk, clean or noisy, sees the clean
    earlier frames its cache keeps, and itself. This is the cache pass and the denoising passes of the
    whole stream in one forward (and the training layout)."""
    causal = block_causal(frames, chunk, capacity, sink)
    own = torch.block_diag(*[torch.ones(min(chunk, frames - s), min(chunk, frames - s), dtype=torch.bool, device="cpu")
                             for s in range(0, frames, chunk)])
    history = causal & ~own
    top = torch.cat([causal, torch.zeros_like(causal)], 1)
    bottom = torch.cat([history, own], 1)
    return torch.cat([top, bottom], 0)
