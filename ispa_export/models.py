"""Models and their inputs as the stages take them: presets with weights, text contexts, devices and
dtypes, the deployment's PyTorch weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graphs.config import WanConfig, preset
from graphs.wan import Absorption, WanModel
from runtimes.groups import Span

from ispa_export.errors import UserError
from ispa_export.video.torch_runner import TORCH_DTYPES

DATA = Path(__file__).parent / "data"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BAKED = "torch_model.safetensors"


def get_preset(name: str) -> WanConfig:
    try:
        return preset(name)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None


def load_model(name: str | None, checkpoint: str | None = None, config: str | None = None, seed: int = 0) -> tuple[str, WanModel]:
    """A preset with its weights: the shipped demo weights, a checkpoint, or seeded random weights."""
    from ispa_export.checkpoint import load_into

    if checkpoint:
        name = config or name
        if not name:
            raise UserError("--checkpoint needs --config PRESET (the architecture of the checkpoint)")
    cfg = get_preset(name)
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    if checkpoint:
        load_into(model, checkpoint)
    elif name == "demo":
        path = DATA / "demo.safetensors"
        if not path.exists():
            raise UserError(f"{path}: the demo weights are missing from the package; reinstall ispa-export")
        load_into(model, str(path))
    return name, model


def load_context(path: str | None, name: str, cfg: WanConfig, seed: int) -> tuple[torch.Tensor, str]:
    """Text embeddings [B, tokens, text_dim]: a file, the demo's fixed prompt, or seeded noise."""
    if path:
        try:
            ctx = load_file(path)["context"]
        except KeyError:
            raise UserError(f"{path}: field 'context' missing; expected a tensor [B, tokens, {cfg.text_dim}]") from None
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
        if ctx.dim() != 3 or ctx.shape[2] != cfg.text_dim or ctx.shape[1] > cfg.text_len or ctx.shape[0] < 1:
            raise UserError(f"{path}: field 'context' has shape {list(ctx.shape)}; expected "
                            f"[B, <= {cfg.text_len}, {cfg.text_dim}]")
        if not ctx.is_floating_point():
            raise UserError(f"{path}: field 'context' has dtype {str(ctx.dtype).removeprefix('torch.')}; expected a "
                            "float tensor (float32, float16 or bfloat16 text embeddings)")
        if not torch.isfinite(ctx).all():
            raise UserError(f"{path}: field 'context' holds NaN or inf; expected finite text embeddings")
        return ctx.float(), path
    if name == "demo":
        from ispa_export.demo import demo_context
        return demo_context(), "demo prompt (fixed)"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, min(cfg.text_len, 16), cfg.text_dim, generator=g), f"random embeddings (seed {seed})"


def save_baked(model: WanModel, path: Path) -> None:
    """The baked PyTorch weights (absorbed corrections included), for `ispa run --backend torch`."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"layout": json.dumps([None if s is None else s._asdict() for s in model.layout]),
            "sites": ",".join(b.self_attn.ispa_site for b in model.blocks)}
    save_file(sd, str(path), metadata=meta)


def load_baked(cfg: WanConfig, path: Path) -> WanModel:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "layout" not in meta:
        raise UserError(f"{path}: metadata field 'layout' missing; expected a baked ispa-export model "
                        "(an older one: re-export it)")
    sd = load_file(str(path))
    model = WanModel(cfg).eval()
    model.set_layout([None if s is None else Span(**s) for s in json.loads(meta["layout"])])
    for i, (block, site) in enumerate(zip(model.blocks, meta["sites"].split(","))):
        pre = f"blocks.{i}.self_attn."
        if pre + "ispa_bias" in sd:
            block.self_attn.absorb(Absorption(site, sd.get(pre + "ispa_weight"), sd[pre + "ispa_bias"]))
    model.load_state_dict(sd, strict=True)
    return model


def resolve_device(text: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N; default cuda when PyTorch sees one. A one-line error otherwise."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: this PyTorch sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: expected an index below {torch.cuda.device_count()} (CUDA devices here)")
    return device


def warmup_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The warmup's dtype: the export dtype on a GPU (bf16 is what Wan runs in), float32 on a CPU, where
    half-precision matmuls are slow and the statistics gain nothing from them."""
    return TORCH_DTYPES[DTYPE_NAMES[dtype]] if device.type == "cuda" else torch.float32


class Progress:
    """A tqdm bar on stderr (progress for long stages without a dependency in the hot path)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, disable=None)

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
