"""Text in (DESIGN.md section 12): ispa_export.text equals diffusers' WanPipeline prompt embeddings
bitwise, on a tiny random umT5 built offline (tests/text_fixtures.py), and refuses bad input in one
line before writing anything."""
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("diffusers")  # the reference

from ispa_export.errors import UserError  # noqa: E402
from ispa_export.text import TextEncoder, clean, encode_to_file, load_text_encoder  # noqa: E402
from text_fixtures import make_tiny_umt5  # noqa: E402

D_MODEL = 32


@pytest.fixture(scope="session")
def tiny_umt5(tmp_path_factory):
    """ROOT/text_encoder + ROOT/tokenizer, the Wan diffusers layout."""
    return make_tiny_umt5(tmp_path_factory.mktemp("tiny_umt5") / "wan", d_model=D_MODEL)


@pytest.fixture(scope="module")
def enc(tiny_umt5) -> TextEncoder:
    return load_text_encoder(tiny_umt5)


@pytest.fixture(scope="module")
def reference(tiny_umt5):
    """diffusers' own `_get_t5_prompt_embeds`, on a WanPipeline whose components diffusers' way loads
    separately from ours (AutoTokenizer, UMT5EncoderModel.from_pretrained)."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(tiny_umt5 / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(tiny_umt5 / "text_encoder"),
                       vae=None, scheduler=None)

    def embeds(prompts, max_length):
        with torch.no_grad():
            return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length, device=torch.device("cpu"))
    return embeds


LONG = " ".join(["a cat and the dog baking a cake together in the kitchen"] * 4)  # > 16 tokens
MESSY = "  The cat &amp;amp; the dog\t\n in   the&nbsp;kitchen &lt;b&gt;\x1fsunlight  "  # \x1f: regex's \s, not re's


@pytest.mark.parametrize("prompts,max_length", [
    ("a cat and the dog", 512),
    (LONG, 16),
    (MESSY, 32),
    (["a cat", "the dog baking a cake together in the kitchen"], 24),
], ids=["short", "truncated", "cleaning", "batch"])
def test_encode_equals_wan_pipeline(enc, reference, prompts, max_length):
    ours = enc.encode(prompts, max_length)
    ref = reference(prompts, max_length)
    assert ours.shape == (1 if isinstance(prompts, str) else len(prompts), max_length, D_MODEL)
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours, ref)
    lengths = enc.tokenize(prompts, max_length)[1].sum(1)
    assert (ours.abs().sum(-1) != 0).sum(1).tolist() == lengths.tolist()  # real rows non-zero, the rest zero
    if prompts is LONG:
        assert lengths.tolist() == [16]
    if isinstance(prompts, list):
        assert lengths[0] < lengths[1]


def test_clean_equals_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in [MESSY, "A “quoted” ＡＢＣ caf\u00e9 &amp;lt;x&amp;gt;", "\x1c\x1d a \u3000 b \u2028", "&nbsp;"]:
        assert clean(text) == prompt_clean(text)
    assert clean("A &amp;amp; B \n\t C") == "A & B C"


def test_encode_to_file(tiny_umt5, reference, tmp_path):
    from ispa_export.models import load_context

    out = tmp_path / "new" / "ctx.safetensors"  # a missing parent is created
    s = encode_to_file(MESSY, tiny_umt5, out, text_dim=D_MODEL)
    assert s["shape"] == [1, 512, D_MODEL] and not s["truncated"]
    ctx = load_file(out)["context"]
    assert ctx.dtype == torch.float32 and torch.equal(ctx, reference(MESSY, 512))
    assert s["tokens"] > 1 and ctx[0, :s["tokens"]].abs().sum(-1).all() and not ctx[0, s["tokens"]:].any()
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == MESSY and meta["tokens"] == str(s["tokens"]) and meta["cleaning"]
    got, _ = load_context(str(out), "x", SimpleNamespace(text_dim=D_MODEL, text_len=512), 0)  # the --context reader
    assert torch.equal(got, ctx)


def test_one_directory_layout(tiny_umt5, enc, tmp_path):
    """A UMT5EncoderModel directory that also holds its tokenizer loads like the Wan root does."""
    flat = tmp_path / "umt5"
    shutil.copytree(tiny_umt5 / "text_encoder", flat)
    shutil.copytree(tiny_umt5 / "tokenizer", flat, dirs_exist_ok=True)
    assert torch.equal(load_text_encoder(flat).encode(MESSY, 32), enc.encode(MESSY, 32))


def _refusal(tmp_path, tiny_umt5, case):
    """(prompt, encoder dir, out, text_dim, what the message must name) for each refusal."""
    out = tmp_path / "ctx.safetensors"
    if case == "empty":
        return " \n\t&nbsp;", tiny_umt5, out, None, ["prompt: empty"]
    if case == "no_tokenizer":
        root = tmp_path / "wan"
        shutil.copytree(tiny_umt5 / "text_encoder", root / "text_encoder")
        return "a cat", root, out, None, [str(root / "tokenizer"), "tokenizer.json"]
    if case == "no_weights":
        root = tmp_path / "wan"
        shutil.copytree(tiny_umt5, root, ignore=shutil.ignore_patterns("*.safetensors"))
        return "a cat", root, out, None, [str(root / "text_encoder"), "model.safetensors"]
    if case == "partial_weights":  # transformers would fill the hole with random values and only log it
        root = tmp_path / "wan"
        shutil.copytree(tiny_umt5, root)
        sd = load_file(root / "text_encoder" / "model.safetensors")
        del sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
        save_file(sd, root / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        return "a cat", root, out, None, [str(root / "text_encoder"), "SelfAttention.q.weight"]
    if case == "d_model":
        return "a cat", tiny_umt5, out, 4096, [
            f"{tiny_umt5 / 'text_encoder' / 'config.json'}: d_model: expected 4096 (the DiT's text_dim), found 32"]
    if case == "unwritable":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "ctx.safetensors"
        return "a cat", tiny_umt5, out, None, [str(out), str(tmp_path / "file"), "not a directory"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty", "no_tokenizer", "no_weights", "partial_weights", "d_model",
                                  "unwritable"])
def test_refusals(tiny_umt5, tmp_path, case):
    prompt, root, out, text_dim, needles = _refusal(tmp_path, tiny_umt5, case)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError) as e:
        encode_to_file(prompt, root, out, text_dim=text_dim)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a temporary
