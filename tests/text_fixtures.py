"""A tiny umT5 text encoder and tokenizer, built offline, saved in the Wan diffusers layout.

`make_tiny_umt5(root)` writes ROOT/text_encoder (a random `UMT5EncoderModel`, safetensors) and
ROOT/tokenizer (a `T5Tokenizer`: a `tokenizers` Unigram model over a handful of words and every
ASCII letter and digit; pad 0, </s> 1 appended to each sequence, unk 2), as
`WanPipeline.from_pretrained` expects them. Nothing is downloaded; it takes well under a second
once transformers is imported.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = ("a", "cat", "dog", "and", "the", "in", "kitchen", "baking", "cake", "together", "sunlight", "window")


def tiny_tokenizer():
    """T5's layout (pad, </s>, unk first); words score higher than letters, so they win the Unigram
    segmentation, and any ASCII letters, digits and a little punctuation still tokenize without unk."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + "&;.,'\"<>"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_umt5(root: Path, d_model: int = 32) -> Path:
    """Write ROOT/text_encoder and ROOT/tokenizer; returns ROOT (a stand-in for a Wan checkpoint root)."""
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(root)
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    cfg = UMT5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    UMT5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder", safe_serialization=True)
    return root
