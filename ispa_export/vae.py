"""Wan2.1 VAE decode, streamed chunk by chunk with the causal-conv caches carried over.

diffusers' `AutoencoderKLWan._decode` already decodes one latent frame at a time: each causal conv
keeps its last two input frames in `feat_cache[idx]` (idx counts the cached convs in call order), so
the whole-video decode is a stream of one-frame steps. It has no public call for that stream, so
`StreamingDecoder` keeps the cache list itself around `post_quant_conv` + `decoder` and calls the
decoder per latent frame exactly as `_decode` does: its output equals `vae.decode` bitwise.

diffusers' caches start as None and change shape: a conv's cache holds 1 frame after the first
latent frame and 2 afterwards, and a temporal upsampler's holds the marker "Rep" after the first
frame (which it passes through un-upsampled: 1 latent frame gives 1 pixel frame at the start of the
video, 4 afterwards). A static graph needs fixed shapes, so after the first frame every cache is
made [B, C, 2, h, w]: a missing frame and "Rep" become zeros. That is exact, not an approximation:
diffusers zero-pads a causal conv's missing frames (and "Rep" means "pad with zeros"), so the conv
sees the same numbers. The same fixed-shape path runs eagerly and in the exported graphs.

The same path is traced to two static graphs by ispa_export.builder.decoder (the build's stage).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runtimes.decoder import state_chunks
from runtimes.files import atomic_path, file_record, output_file_problem

from .errors import UserError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

CACHE_FRAMES = 2  # diffusers' CACHE_T: a causal conv with a 3-frame kernel keeps its last 2 input frames


def cache_name(i: int) -> str:
    return f"cache_{i:02d}"


def new_cache_name(i: int) -> str:
    return f"new_cache_{i:02d}"


# -- loading ------------------------------------------------------------------------------------

def _vae_dir(directory: Path) -> Path:
    """`directory/vae` for a Wan diffusers root, else `directory` itself (the vae folder)."""
    return directory / "vae" if (directory / "vae").is_dir() else directory


def load_vae(directory: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """The `AutoencoderKLWan` of a Wan diffusers root (its `vae/`) or of a vae folder; local safetensors only."""
    from diffusers import AutoencoderKLWan

    root = _vae_dir(Path(directory))
    config = root / "config.json"
    if not config.is_file():
        raise UserError(f"{config}: file: expected the VAE's config (a Wan diffusers root with vae/, or the vae "
                        f"folder), found none")
    try:
        fields = json.loads(config.read_text())
    except ValueError as e:
        raise UserError(f"{config}: not JSON ({e})") from None
    if fields.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise UserError(f"{config}: _class_name: expected 'AutoencoderKLWan', found {fields['_class_name']!r}")
    weights = [root / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")]
    if not any(w.is_file() for w in weights):
        raise UserError(f"{weights[0]}: file: expected the VAE's safetensors weights, found none")
    try:
        # low_cpu_mem_usage=False: the default asks for `accelerate` and says so on stderr when it is absent.
        vae = AutoencoderKLWan.from_pretrained(root, local_files_only=True, use_safetensors=True, torch_dtype=dtype,
                                               low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{root}: not a loadable AutoencoderKLWan ({' '.join(str(e).split())[:300]})") from None
    vae.to(device).eval().requires_grad_(False)
    vae.config_path = str(config)  # for one-line refusals that name the file
    return vae


def weights_sha256(directory: str | Path) -> str:
    """One sha256 over the VAE's config and weight files (a sharded index with its shards): what a run
    records of the PyTorch decoder, so --resume refuses another VAE's caches and frames."""
    import hashlib

    root = _vae_dir(Path(directory))
    names = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
    index = root / names[-1]
    if index.is_file():
        names += sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    h = hashlib.sha256()
    for name in names:
        if (root / name).is_file():
            h.update(f"{name}:{file_record(root / name)['sha256']}\n".encode())
    return h.hexdigest()


def check_vae(vae: nn.Module, latent_channels: int) -> None:
    """Refuse a VAE that does not decode the DiT's latents, or one this streaming decoder does not handle."""
    where = getattr(vae, "config_path", "vae/config.json")
    cfg = vae.config
    if cfg.z_dim != latent_channels:
        raise UserError(f"{where}: z_dim: expected {latent_channels} (the DiT's in_dim), found {cfg.z_dim}")
    for field in ("latents_mean", "latents_std"):
        if len(cfg[field]) != cfg.z_dim:
            raise UserError(f"{where}: {field}: expected {cfg.z_dim} values (z_dim), found {len(cfg[field])}")
    # The Wan2.2 VAE (residual up-blocks, patchified 48-channel latents) has another cache protocol.
    if cfg.get("is_residual", False):
        raise UserError(f"{where}: is_residual: expected false (the Wan2.1 VAE), found true")
    if cfg.get("patch_size") is not None:
        raise UserError(f"{where}: patch_size: expected null (the Wan2.1 VAE), found {cfg['patch_size']}")


# -- normalisation ------------------------------------------------------------------------------

def latent_stats(vae: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, 1/latents_std) [1, z, 1, 1, 1] as WanPipeline makes them: cast to the VAE's dtype
    first, then the reciprocal in that dtype (so fp16 rounds exactly as the pipeline does)."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    return mean, inv_std


def unnormalise(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """WanPipeline's `latents / latents_std + latents_mean` (its latents_std is 1/std), in the VAE's dtype."""
    z = z.to(vae.dtype)
    mean, inv_std = latent_stats(vae, z.dtype, z.device)
    return z / inv_std + mean


# -- the fixed-shape cache protocol ---------------------------------------------------------------

@dataclass(frozen=True)
class CacheSpec:
    """One causal conv's cache: its position in diffusers' feat_cache list, its module, its shape."""

    index: int
    module: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return cache_name(self.index)

    @property
    def new_name(self) -> str:
        return new_cache_name(self.index)

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()


def cache_modules(decoder: nn.Module) -> list[str]:
    """The decoder's cached convs in feat_idx order (the order WanDecoder3d.forward consumes them)."""
    names = ["decoder.conv_in"]
    for i, _ in enumerate(decoder.mid_block.resnets):
        names += [f"decoder.mid_block.resnets.{i}.conv1", f"decoder.mid_block.resnets.{i}.conv2"]
    for j, block in enumerate(decoder.up_blocks):
        for k, _ in enumerate(block.resnets):
            names += [f"decoder.up_blocks.{j}.resnets.{k}.conv1", f"decoder.up_blocks.{j}.resnets.{k}.conv2"]
        if block.upsamplers is not None and block.upsamplers[0].mode == "upsample3d":
            names.append(f"decoder.up_blocks.{j}.upsamplers.0.time_conv")
    names.append("decoder.conv_out")
    return names


def _fill(cache: Any, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A first-frame cache (None, "Rep" or 1 frame) as the fixed 2-frame cache that decodes the same."""
    if isinstance(cache, torch.Tensor):
        if cache.shape[2] == CACHE_FRAMES:
            return cache
        pad = torch.zeros(*cache.shape[:2], CACHE_FRAMES - cache.shape[2], *cache.shape[3:],
                          dtype=cache.dtype, device=cache.device)
        return torch.cat([pad, cache], 2)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def decode_frames(vae: nn.Module, x: torch.Tensor, caches: list[torch.Tensor] | None,
                  specs: list[CacheSpec]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode post-quant latents x [B, z, f, h, w] frame by frame, as AutoencoderKLWan._decode does.

    `caches` None means the start of the video (its first frame takes diffusers' first-chunk path);
    returns the unclamped pixels and the fixed-shape caches after the last frame."""
    outs = []
    for i in range(x.shape[2]):
        frame = x[:, :, i:i + 1]
        if caches is None:
            feat: list[Any] = [None] * len(specs)
            idx = [0]
            outs.append(vae.decoder(frame, feat_cache=feat, feat_idx=idx, first_chunk=True))
            caches = [_fill(c, s.shape, frame) for c, s in zip(feat, specs)]
        else:
            feat, idx = list(caches), [0]
            outs.append(vae.decoder(frame, feat_cache=feat, feat_idx=idx))
            caches = feat
        if idx[0] != len(specs):
            raise RuntimeError(f"the decoder used {idx[0]} caches, expected {len(specs)}: another cache protocol")
    return torch.cat(outs, 2), caches


def cache_specs(vae_or_config: Any, batch: int, latent_height: int, latent_width: int) -> list[CacheSpec]:
    """Every cache's fixed shape for latents [batch, z, *, latent_height, latent_width], found by decoding
    two frames on the meta device (no memory, no weights needed)."""
    from diffusers import AutoencoderKLWan

    config = getattr(vae_or_config, "config", vae_or_config)
    with torch.device("meta"):
        meta = AutoencoderKLWan.from_config(dict(config))
    x = torch.zeros(batch, config["z_dim"], 2, latent_height, latent_width, device="meta")
    modules = cache_modules(meta.decoder)
    placeholder = [CacheSpec(i, m, ()) for i, m in enumerate(modules)]
    feat: list[Any] = [None] * len(modules)
    with torch.no_grad():
        for i, first in ((0, True), (1, False)):  # after the second frame every cache is at full size
            idx = [0]
            meta.decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=idx, first_chunk=first)
            if idx[0] != len(placeholder):
                raise RuntimeError(f"the decoder used {idx[0]} caches, expected {len(placeholder)}")
    return [CacheSpec(i, m, tuple(c.shape)) for i, (m, c) in enumerate(zip(modules, feat))]


def pixel_frames(chunk_frames: int, first: bool, temporal: int = 4) -> int:
    """Pixel frames from one chunk: the video's first latent frame gives 1, every other `temporal`."""
    return 1 + temporal * (chunk_frames - 1) if first else temporal * chunk_frames


# -- streaming in PyTorch -----------------------------------------------------------------------

class StreamingDecoder:
    """Decodes a video chunk by chunk, the causal-conv caches carried over; equals `vae.decode` of the
    whole video bitwise (CPU fp32), whatever the chunk sizes.

        dec = StreamingDecoder(vae)
        for z in chunks:                  # normalised latents [B, z_dim, f, h, w], as the DiT makes them
            pixels = dec.decode_chunk(z)  # [B, 3, 1 + 4(f-1) or 4f, 8h, 8w] in [-1, 1]
    """

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae
        self.caches: list[torch.Tensor] | None = None
        self.latent_frames = 0
        self._specs: dict[tuple[int, int, int], list[CacheSpec]] = {}

    def reset(self) -> None:
        """Start a new video: the next chunk is decoded from empty caches."""
        self.caches, self.latent_frames = None, 0

    def specs(self, batch: int, latent_height: int, latent_width: int) -> list[CacheSpec]:
        key = (batch, latent_height, latent_width)
        if key not in self._specs:  # found once per size, not per video
            self._specs[key] = cache_specs(self.vae, *key)
        return self._specs[key]

    @torch.no_grad()
    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = z.shape
        if self.caches is not None and (self.caches[0].shape[0], *self.caches[0].shape[3:]) != (b, h, w):
            raise ValueError(f"chunk latents {list(z.shape)}: batch or size differs from the stream's first chunk")
        x = self.vae.post_quant_conv(unnormalise(self.vae, z))
        out, self.caches = decode_frames(self.vae, x, self.caches, self.specs(b, h, w))
        self.latent_frames += f
        return torch.clamp(out, min=-1.0, max=1.0)

    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches or [])


def scale_factors(vae: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) upsampling of the decoder: (8, 4) for the Wan2.1 VAE."""
    spatial = 2 ** sum(1 for b in vae.decoder.up_blocks if b.upsamplers is not None)
    temporal = 2 ** sum(bool(t) for t in vae.temperal_upsample)
    return spatial, temporal


class TorchVideoDecoder:
    """`StreamingDecoder` behind the decoder interface of `runtimes.run` (the one runtimes.decoder's
    StreamDecoder has): numpy latents in, float32 pixels out, and `state()`/`load_state()` holding
    the caches under the exported graphs' names, so a run snapshots and resumes its video.

        dec = TorchVideoDecoder(load_vae(DIR), batch=1, latent_height=60, latent_width=104)
        pixels = dec.decode_chunk(latents)   # [B, 3, T, 8h, 8w] float32 in [-1, 1]
    """

    def __init__(self, vae: nn.Module, *, batch: int, latent_height: int, latent_width: int) -> None:
        self.vae = vae
        self.stream = StreamingDecoder(vae)
        self.specs = self.stream.specs(batch, latent_height, latent_width)
        self.latent_shape = (batch, vae.config.z_dim, latent_height, latent_width)
        spatial, self.temporal = scale_factors(vae)
        self.height, self.width = latent_height * spatial, latent_width * spatial
        self.chunks = 0

    def reset(self) -> None:
        self.stream.reset()
        self.chunks = 0

    def decode_chunk(self, latents: Any) -> Any:
        import numpy as np

        a = np.asarray(latents)
        if a.ndim != 5 or (a.shape[0], a.shape[1], *a.shape[3:]) != self.latent_shape:
            b, z, h, w = self.latent_shape
            raise ValueError(f"latents: expected [{b}, {z}, frames, {h}, {w}], got {list(a.shape)}")
        z = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.vae.device)
        pixels = self.stream.decode_chunk(z)
        self.chunks += 1
        return pixels.to("cpu", torch.float32).numpy()

    def state(self) -> dict[str, Any]:
        """{"chunks": n} and, after the first chunk, every cache by graph input name (bfloat16 ones as
        float32, which holds them exactly)."""
        import numpy as np

        out: dict[str, Any] = {"chunks": np.asarray(self.chunks, dtype=np.int64)}
        for spec, c in zip(self.specs, self.stream.caches or []):
            c = c.detach().to("cpu")
            out[spec.name] = (c.float() if c.dtype == torch.bfloat16 else c).numpy().copy()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        import numpy as np

        chunks = state_chunks(state)
        if chunks == 0:
            self.reset()
            return
        caches = []
        for spec in self.specs:
            got = state.get(spec.name)
            if got is None or tuple(got.shape) != spec.shape:
                found = "none" if got is None else list(got.shape)
                raise ValueError(f"decoder state: {spec.name}: expected shape {list(spec.shape)}, found {found}")
            caches.append(torch.from_numpy(np.array(got)).to(self.vae.device, self.vae.dtype))
        self.stream.caches, self.chunks = caches, chunks


# -- a finished run to mp4 ----------------------------------------------------------------------

def _run_frames(path: Path, frames: int) -> int:
    """The frames a run's run.json (beside its frames.npy) counts, or `frames` when there is none: a
    run stopped part-way has room for frames it never made."""
    record = path.parent / "run.json"
    if not record.is_file():
        return frames
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{record}: not readable JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(rec, dict) or rec.get("frames_file", path.name) != path.name:
        return frames
    counted = rec.get("frames")
    if not isinstance(counted, int) or not 0 <= counted <= frames:
        raise UserError(f"{record}: frames: expected the count of latent frames in {path.name} (0..{frames}), "
                        f"found {counted!r}")
    return counted


def decode_run(frames_path: str | Path, vae_dir: str | Path, out_path: str | Path, *, chunk_frames: int = 3,
               fps: float = 16.0, device: str | None = None, log=print) -> dict[str, Any]:
    """`ispa decode`: a run's latents (frames.npy, [B, z, T, h, w], normalised as the DiT makes them)
    decoded by the PyTorch streaming decode, `chunk_frames` latent frames a step, into an H.264 mp4
    at `out_path` (written under a temporary name, renamed at the end). Only the frames the run's
    run.json counts are decoded, when it lies beside them. Refusals (UserError, one line) come before
    anything is written."""
    import time

    import numpy as np

    from runtimes.run import _Progress
    from runtimes.video import Mp4Writer, ffmpeg_exe, pixels_to_uint8

    from .models import resolve_device

    src, out = Path(frames_path), Path(out_path)
    if chunk_frames < 1:
        raise UserError(f"--chunk-frames: expected an integer >= 1, got {chunk_frames}")
    if not fps > 0:
        raise UserError(f"--fps: expected a positive frame rate, got {fps}")
    if not src.is_file():
        raise UserError(f"{src}: no such file; expected a run's latents (frames.npy)")
    problem = output_file_problem(out, "an .mp4 file path")
    if problem:
        raise UserError(f"--out {out}: {problem}")
    try:
        latents = np.load(src, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{src}: not a .npy array ({' '.join(str(e).split())[:160]})") from None
    if latents.ndim != 5:
        raise UserError(f"{src}: shape: expected latents [B, C, T, H, W], found {list(latents.shape)}")
    if latents.dtype.kind != "f":
        raise UserError(f"{src}: dtype: expected float latents, found {latents.dtype}")
    b, c, total, h, w = latents.shape
    total = _run_frames(src, total)
    if total < 1:
        raise UserError(f"{src}: frames: expected at least one latent frame, found none")
    ffmpeg_exe()  # the clear line when the encoder is missing, before the VAE loads
    t0 = time.perf_counter()
    vae = load_vae(vae_dir, device=resolve_device(device))
    where = getattr(vae, "config_path", "vae/config.json")
    if vae.config.z_dim != c:
        raise UserError(f"{where}: z_dim: expected {c} (the latent channels of {src}), found {vae.config.z_dim}")
    check_vae(vae, c)
    spatial, temporal = scale_factors(vae)
    width, height = w * spatial * b, h * spatial
    dec = StreamingDecoder(vae)
    steps = math.ceil(total / chunk_frames)
    progress = _Progress(steps)
    with atomic_path(out) as tmp:
        writer = Mp4Writer.create(tmp, width, height, fps)
        try:
            for i in range(0, total, chunk_frames):
                z = torch.from_numpy(np.array(latents[:, :, i:min(i + chunk_frames, total)], dtype=np.float32))
                pixels = dec.decode_chunk(z.to(vae.device))
                writer.append(pixels_to_uint8(pixels.to("cpu", torch.float32).numpy()))
                progress(1)
        except BaseException:
            writer.abort()
            raise
        state = writer.close()
    return {"path": str(out), "frames": state["frames"], "bytes": state["bytes"], "width": width, "height": height,
            "fps": fps, "latent_frames": total, "seconds": time.perf_counter() - t0}
