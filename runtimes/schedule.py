"""Streaming arithmetic shared by every backend: the sampling schedule, the noise, the ring slots.

numpy only, so the PyTorch generator and the deployed engines take the same steps on the same noise.
"""
from __future__ import annotations

import numpy as np

# Self-Forcing's denoising_step_list [1000, 750, 500, 250] warped by its flow-matching scheduler
# (shift 5, 1000 training steps, extra_one_step): t -> sigma = shift*s / (1 + (shift-1)*s), s = t/1000.
SELF_FORCING_STEPS = (1000, 750, 500, 250)
SHIFT = 5.0


def warped_timesteps(steps=SELF_FORCING_STEPS, shift: float = SHIFT) -> list[float]:
    out = []
    for t in steps:
        s = t / 1000.0
        out.append(1000.0 * shift * s / (1.0 + (shift - 1.0) * s))
    return out


def chunk_noise(seed: int, chunk: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise for one chunk and denoising step; a pure function of (seed, chunk, step), so a
    compressed run replays the reference's noise exactly, on any backend."""
    return np.random.default_rng([seed, chunk, step]).standard_normal(shape, dtype=np.float32)


def flow_step(noisy: np.ndarray, prediction: np.ndarray, sigma: float) -> np.ndarray:
    """x0 from a flow prediction v = noise - x0 at noise level sigma."""
    return noisy - sigma * prediction


def renoise(x0: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    return (1.0 - sigma) * x0 + sigma * noise


def ring_slot(frame: int, capacity: int, sink: int) -> int:
    """Slot of absolute frame `frame` in a ring of `capacity` frames whose first `sink` frames are pinned."""
    if frame < sink:
        return frame
    return sink + (frame - sink) % (capacity - sink)



# Wan's rope_params theta. The graph takes the chunk's frame-axis RoPE as an input (`rope_frame`)
# instead of indexing a fixed 1,024-row table, so a stream has no length limit.
ROPE_THETA = 10000.0


def frame_rope(start: int, frames: int, pairs: int, theta: float = ROPE_THETA) -> np.ndarray:
    """cos and sin [2, frames, pairs] (float32) of the frame-axis RoPE angles of frames start, start+1, ...

    Wan's angle of pair j at position p is p * theta^(-2j / (2*pairs)); it is computed in float64 and
    reduced modulo 2*pi before the cast, so frame 10^9 is as exact as frame 10."""
    inv = 1.0 / np.power(theta, np.arange(0, 2 * pairs, 2, dtype=np.float64) / (2 * pairs))
    pos = np.arange(start, start + frames, dtype=np.float64)
    angles = np.mod(np.outer(pos, inv), 2.0 * np.pi)
    return np.stack([np.cos(angles), np.sin(angles)]).astype(np.float32)
