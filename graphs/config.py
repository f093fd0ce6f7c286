"""Model configurations: the Wan2.1 architecture presets and the streaming geometry."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    # Architecture (names follow Wan2.1's WanModel arguments).
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    # Streaming geometry (Self-Forcing defaults at 480x832).
    latent_height: int = 60
    latent_width: int = 104
    chunk_frames: int = 3
    max_frames: int = 21  # capacity M of a full-attention layer's cache, in latent frames
    full_sink: int = 0  # frames pinned at the front of a full-attention cache when it rolls

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        _, ph, pw = self.patch_size
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(
                f"latent frame {self.latent_height}x{self.latent_width} is not divisible by patch {ph}x{pw}"
            )
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 for frame-wise streaming")
        if not 0 <= self.full_sink < self.max_frames:
            raise ValueError(f"full_sink {self.full_sink} must be in [0, max_frames={self.max_frames})")
        if self.chunk_frames > self.max_frames - self.full_sink:
            raise ValueError(
                f"chunk_frames {self.chunk_frames} exceeds the rolling part of the cache "
                f"({self.max_frames} - {self.full_sink} sink frames)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one latent frame (height, width) after patchify."""
        return self.latent_height // self.patch_size[1], self.latent_width // self.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def patch_out(self) -> int:
        return self.out_dim * math.prod(self.patch_size)

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


PRESETS: dict[str, WanConfig] = {
    # Wan2.1 T2V 1.3B (Self-Forcing, CausVid, LongLive): 480x832 -> latent 60x104, 1560 tokens/frame.
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Wan2.1 T2V 14B.
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Trained on procedural videos (ispa_export/lab/train.py), ships in the package: 3x32x32 pixel frames
    # (no VAE), 64 tokens per frame, a 12-frame cache, chunks of 2 frames.
    "demo": WanConfig(
        dim=128, ffn_dim=384, num_heads=4, num_layers=6, in_dim=3, out_dim=3, patch_size=(1, 4, 4),
        text_dim=16, freq_dim=64, text_len=4, latent_height=32, latent_width=32, chunk_frames=2,
        max_frames=12,
    ),
    # Random weights, for tests: builds in milliseconds, wraps its cache within a few chunks.
    "tiny": WanConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=4, in_dim=4, out_dim=4, text_dim=32,
        freq_dim=32, text_len=8, latent_height=4, latent_width=6, chunk_frames=2, max_frames=8,
    ),
    # "tiny" with Wan's interfaces, for the prompt-to-mp4 chain in tests: 16 latent channels (a Wan2.1
    # VAE's z_dim), patch (1, 2, 2), text_dim 32 (the tiny umT5's d_model, tests/text_fixtures.py) and
    # Wan's 512 text tokens, so `ispa encode`'s default output is its context. Latent 4x6 = 32x48 pixels.
    "tiny-wan": WanConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=4, in_dim=16, out_dim=16, text_dim=32,
        freq_dim=32, text_len=512, latent_height=4, latent_width=6, chunk_frames=2, max_frames=8,
    ),
}


def preset(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
