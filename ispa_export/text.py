"""Text in: umT5 prompt embeddings equal to diffusers' `WanPipeline` ones (DESIGN.md section 12).

`load_text_encoder(DIR)` loads transformers' `UMT5EncoderModel` and its tokenizer once, from local
safetensors only; `TextEncoder.encode(prompts)` is `WanPipeline._get_t5_prompt_embeds` (diffusers
0.42.1): the same cleaning, tokenizer call, masked encoder pass, and rows cut at their real length
and zero-padded to max_length. `encode_to_file` writes the `context` tensor that `--context` reads.

The cleaning depends on an optional package, as diffusers' does: when ftfy is installed, diffusers
runs `ftfy.fix_text` first (curly quotes -> straight, full-width -> ASCII, mojibake repaired, NFC),
and so do we; without it both skip that step. The two stay equal either way, but the tokens differ
for such prompts between an environment with ftfy and one without. Wan's original code always
runs ftfy, so install it (`pip install ftfy`) to match Wan itself; each file records which it used.
"""
from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex  # diffusers' `\s` is regex's (Unicode White_Space), not re's: they differ on U+001C..U+001F
import torch
from safetensors.torch import save_file

from runtimes.files import atomic_path, output_file_problem

from .errors import UserError

try:
    import ftfy
except ImportError:
    ftfy = None

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
WAN_ORIGINAL = "models_t5_umt5-xxl-enc-bf16.pth"  # Wan's own layout: a pickle, never loaded here


def clean(text: str) -> str:
    """diffusers' `prompt_clean`: ftfy (when installed), HTML entities unescaped twice, whitespace
    runs made one space, stripped."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def cleaning() -> str:
    """Which cleaning `clean` applies here, for the file's metadata."""
    return f"ftfy {ftfy.__version__}, html, whitespace" if ftfy is not None else "html, whitespace (no ftfy)"


@dataclass
class TextEncoder:
    """A loaded umT5 encoder and its tokenizer: load once, encode many prompts."""

    tokenizer: Any  # transformers' T5Tokenizer for the umT5 vocabulary
    model: torch.nn.Module  # transformers' UMT5EncoderModel, in eval mode
    path: Path  # the encoder's directory (config.json and safetensors)

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: str | list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, max_length], as `WanPipeline` makes them."""
        if max_length < 1:
            raise UserError(f"max_length: expected a positive token count, got {max_length}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t = self.tokenizer([clean(p) for p in prompts], padding="max_length", max_length=max_length,
                           truncation=True, add_special_tokens=True, return_attention_mask=True,
                           return_tensors="pt")
        return t.input_ids, t.attention_mask

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state, each row cut at its real length and zero-padded back.
        Padding tokens would otherwise carry non-zero states the DiT's cross-attention would see."""
        device = next(self.model.parameters()).device
        hidden = self.model(ids.to(device), mask.to(device)).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).long()
        return torch.stack([torch.cat([h[:n], h.new_zeros(h.shape[0] - n, h.shape[1])])
                            for h, n in zip(hidden, lengths)])

    def encode(self, prompts: str | list[str], max_length: int = 512) -> torch.Tensor:
        """Embeddings [B, max_length, d_model] in the encoder's dtype and on its device, equal to
        `WanPipeline._get_t5_prompt_embeds(prompts, max_sequence_length=max_length)`. An empty prompt
        is encoded as diffusers does (it is the default negative prompt); `encode_to_file` refuses it."""
        return self.embed(*self.tokenize(prompts, max_length))


def _one_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _locate(directory: Path) -> tuple[Path, Path]:
    """(encoder dir, tokenizer dir): a Wan diffusers root's subfolders, or one directory holding both."""
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory; expected a Wan diffusers checkpoint (text_encoder/, "
                        "tokenizer/) or a directory holding a UMT5EncoderModel and its tokenizer")
    if (directory / "text_encoder").is_dir() or (directory / "tokenizer").is_dir():
        return directory / "text_encoder", directory / "tokenizer"
    if (directory / WAN_ORIGINAL).exists():
        raise UserError(f"{directory}: holds Wan's original {WAN_ORIGINAL} (a pickle, not loaded); expected the "
                        "diffusers layout (text_encoder/ with safetensors, tokenizer/), e.g. Wan2.1-T2V-1.3B-Diffusers")
    return directory, directory


def _read_config(enc_dir: Path, text_dim: int | None) -> dict:
    """The encoder's config.json, checked before its weights are read (those are ~11 GB in bf16)."""
    path = enc_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; expected a transformers UMT5EncoderModel config (model_type 'umt5')")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({_one_line(e)})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "umt5":
        found = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{path}: model_type: expected 'umt5' (a UMT5EncoderModel), found {found!r}")
    if text_dim is not None and cfg.get("d_model") != text_dim:
        raise UserError(f"{path}: d_model: expected {text_dim} (the DiT's text_dim), found {cfg.get('d_model')}")
    return cfg


def load_text_encoder(directory: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, *, text_dim: int | None = None) -> TextEncoder:
    """Load the umT5 encoder and tokenizer from local files (no hub, safetensors only, never a pickle).

    directory: a Wan diffusers checkpoint root (text_encoder/, tokenizer/) or one directory with both.
    dtype: the encoder's compute dtype; Wan runs it in bfloat16, diffusers in the pipeline's dtype.
    text_dim: when given, the encoder's d_model must equal it (checked before the weights load)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc_dir, tok_dir = _locate(Path(directory))
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{tok_dir}: no tokenizer found (searched for {', '.join(TOKENIZER_FILES)}); "
                        "expected the umT5 tokenizer saved with save_pretrained")
    _read_config(enc_dir, text_dim)
    if not any((enc_dir / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"{enc_dir}: no {' or '.join(WEIGHT_FILES)}; expected the encoder's weights as "
                        "safetensors (pickled .bin/.pth weights are not loaded)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad tokenizer directory
        raise UserError(f"{tok_dir}: tokenizer not loadable ({_one_line(e)})") from None
    try:
        model, info = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype, use_safetensors=True,
                                                       local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise UserError(f"{enc_dir}: weights not loadable ({_one_line(e)})") from None
    # transformers fills a missing tensor with random values and only logs it: refuse instead.
    bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if bad:
        raise UserError(f"{enc_dir}: weights: {len(bad)} tensors missing or mis-shaped (e.g. {bad[0]}); "
                        "expected a complete UMT5EncoderModel")
    return TextEncoder(tokenizer, model.to(device).eval(), enc_dir)


def encode_to_file(prompt: str, text_encoder_dir: str | os.PathLike | TextEncoder, out_path: str | os.PathLike, *,
                   text_dim: int | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, max_length: int = 512) -> dict:
    """Encode one prompt and write OUT: safetensors with `context` [1, max_length, d_model] float32
    (what `--context` reads) and the prompt, token count, cleaning and encoder in its metadata.

    Every refusal (empty prompt, unwritable OUT, missing tokenizer, config or weights, d_model !=
    text_dim) comes before anything is written; the write itself is atomic. text_encoder_dir may be
    a loaded TextEncoder, to encode many prompts with one load. Returns a small summary."""
    if not isinstance(prompt, str) or not clean(prompt):
        raise UserError(f"prompt: empty after cleaning ({str(prompt)[:40]!r}); expected a description of the video")
    if max_length < 1:
        raise UserError(f"max_length: expected a positive token count, got {max_length}")
    out = Path(out_path)
    problem = output_file_problem(out, "a .safetensors file path")
    if problem:
        raise UserError(f"{out}: {problem}")
    t0 = time.perf_counter()
    if isinstance(text_encoder_dir, TextEncoder):
        enc = text_encoder_dir
        if text_dim is not None and enc.d_model != text_dim:
            raise UserError(f"{enc.path / 'config.json'}: d_model: expected {text_dim} (the DiT's text_dim), "
                            f"found {enc.d_model}")
    else:
        enc = load_text_encoder(text_encoder_dir, device, dtype, text_dim=text_dim)
    t1 = time.perf_counter()
    ids, mask = enc.tokenize(prompt, max_length)
    context = enc.embed(ids, mask).to("cpu", torch.float32).contiguous()
    tokens = int(mask.gt(0).sum())
    t2 = time.perf_counter()
    truncated = len(enc.tokenizer(clean(prompt)).input_ids) > max_length  # </s> is kept when cut
    meta = {"prompt": prompt, "prompt_clean": clean(prompt), "tokens": str(tokens), "max_length": str(max_length),
            "truncated": str(truncated).lower(), "text_encoder": str(enc.path.resolve()),
            "encoder_dtype": str(enc.model.dtype).removeprefix("torch."), "cleaning": cleaning()}
    with atomic_path(out) as tmp:
        save_file({"context": context}, str(tmp), metadata=meta)
    return {"path": str(out), "shape": list(context.shape), "tokens": tokens, "truncated": truncated,
            "load_seconds": round(t1 - t0, 3), "seconds": round(t2 - t1, 3)}
