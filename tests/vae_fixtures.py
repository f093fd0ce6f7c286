"""A tiny random Wan2.1 VAE (`AutoencoderKLWan`), built offline, saved in the Wan diffusers layout.

`make_tiny_vae(root)` writes ROOT/vae (config.json + diffusion_pytorch_model.safetensors). It keeps
the real VAE's structure (z_dim 16, four levels, temporal upsampling in the two upper up-blocks, so
8x space and 4x time) at base_dim 8 and the fewest res blocks: every cache of the real decoder's
protocol is there, only narrower. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=0,
                temperal_downsample=[False, True, True])


def make_tiny_vae(root: Path, seed: int = 0, **overrides) -> Path:
    """Write ROOT/vae; returns ROOT (a stand-in for a Wan diffusers root). `overrides` change the config,
    `seed` the random weights."""
    from diffusers import AutoencoderKLWan

    root = Path(root)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**{**TINY_VAE, **overrides}).eval()
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root
