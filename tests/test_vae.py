"""Pixels out (DESIGN.md section 12): the Wan VAE decoded chunk by chunk with its causal-conv caches
carried over equals diffusers' whole-video decode bitwise (CPU fp32); the two exported static graphs,
run torch-free by runtimes.decoder, follow the PyTorch stream; refusals are one line. On a tiny random
VAE built offline (tests/vae_fixtures.py)."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ispa_export.errors import UserError  # noqa: E402
from ispa_export.builder.decoder import FIRST, NEXT, RECORD, WEIGHTS, export_decoder  # noqa: E402
from ispa_export.vae import StreamingDecoder, cache_specs, check_vae, load_vae  # noqa: E402
from runtimes.artifact import ArtifactError  # noqa: E402
from runtimes.decoder import StreamDecoder, TrtStreamDecoder  # noqa: E402
from vae_fixtures import make_tiny_vae  # noqa: E402

B, H, W = 1, 4, 6        # latent size: 32x48 pixels
CHUNK = 2                # latent frames per exported chunk: the first graph runs a first and a later frame
ORT_ATOL = 1e-5          # ORT vs PyTorch, fp32 pixels in [-1, 1]: measured <= 1.1e-6
CACHE_ATOL = 1e-4        # the caches (unclamped activations): measured <= 4e-6


def pipeline_unnormalise(vae, latents):
    """diffusers 0.42.1 WanPipeline.__call__'s lines before `vae.decode`, verbatim."""
    latents = latents.to(vae.dtype)
    latents_mean = (torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
                    .to(latents.device, latents.dtype))
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype)
    return latents / latents_std + latents_mean


@pytest.fixture(scope="session")
def tiny_vae_root(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae") / "wan")


@pytest.fixture(scope="module")
def vae(tiny_vae_root):
    return load_vae(tiny_vae_root)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(B, 16, 7, H, W)  # as the DiT makes them: normalised


@pytest.fixture(scope="module")
def exported(vae, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("decoder")
    return out, export_decoder(vae, batch=B, latent_height=H, latent_width=W, chunk_frames=CHUNK,
                               dtype="float32", out_dir=out)


@pytest.mark.parametrize("f", [1, 2, 3])
def test_streamed_equals_whole_decode(vae, latents, f):
    with torch.no_grad():
        whole = vae.decode(pipeline_unnormalise(vae, latents)).sample
    dec = StreamingDecoder(vae)
    chunks = [dec.decode_chunk(latents[:, :, i:i + f]) for i in range(0, latents.shape[2], f)]
    assert [c.shape[2] for c in chunks] == [1 + 4 * (min(f, 7) - 1)] + [4 * min(f, 7 - i) for i in range(f, 7, f)]
    assert torch.equal(torch.cat(chunks, 2), whole)
    dec.reset()  # a second video on the same decoder starts from empty caches
    assert torch.equal(dec.decode_chunk(latents[:, :, :f]), chunks[0])


def _torch_stream(vae, latents, n_chunks):
    dec = StreamingDecoder(vae)
    outs = [dec.decode_chunk(latents[:, :, i * CHUNK:(i + 1) * CHUNK]).numpy() for i in range(n_chunks)]
    return outs, dec


def test_ort_follows_torch_stream(vae, latents, exported):
    """Three chunks: the next graph runs twice on carried caches; both cache strategies agree."""
    directory, record = exported
    ref, torch_dec = _torch_stream(vae, latents, 3)
    for mode in ("pingpong", "copy"):
        dec = StreamDecoder(directory, threads=1, cache_mode=mode)
        for _ in range(2):  # the second pass checks reset(): nothing of the first video leaks in
            outs = [dec.decode_chunk(latents[:, :, i * CHUNK:(i + 1) * CHUNK].numpy()) for i in range(3)]
            assert [o.shape for o in outs] == [tuple(record["pixels"]["shape"][g]) for g in ("first", "next", "next")]
            for o, r in zip(outs, ref):
                np.testing.assert_allclose(o, r, rtol=0, atol=ORT_ATOL)
            state = dec.state()
            for spec, cache in zip(record["caches"], torch_dec.caches):
                np.testing.assert_allclose(state[spec["input"]], cache.numpy(), rtol=0, atol=CACHE_ATOL)
            dec.reset()
        # Ping-pong moves no cache byte; the copy strategy copies every cache after each of the 6 chunks.
        assert dec.buffers.traffic.d2d == (0 if mode == "pingpong" else 6 * record["cache_bytes"])


def test_state_resumes_bit_identically(latents, exported):
    directory, _ = exported
    chunk = [latents[:, :, i * CHUNK:(i + 1) * CHUNK].numpy() for i in range(3)]
    dec = StreamDecoder(directory, threads=1)
    dec.decode_chunk(chunk[0])
    snap = {k: v.copy() for k, v in dec.state().items()}
    after = [dec.decode_chunk(c) for c in chunk[1:]]
    resumed = StreamDecoder(directory, threads=1)
    resumed.load_state(snap)
    assert resumed.chunks == 1
    assert all(np.array_equal(resumed.decode_chunk(c), a) for c, a in zip(chunk[1:], after))


def test_graph_io_is_fixed(exported):
    import onnx

    directory, record = exported
    specs = [(c["input"], c["output"], c["shape"]) for c in record["caches"]]
    for file, graph in ((FIRST, "first"), (NEXT, "next")):
        proto = onnx.load(str(directory / file))
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                  for v in [*proto.graph.input, *proto.graph.output]}
        assert all(s and all(d and d > 0 for d in s) for s in shapes.values()), shapes
        ins = [v.name for v in proto.graph.input]
        assert ins == ["latents"] + ([] if graph == "first" else [i for i, _, _ in specs])
        assert [v.name for v in proto.graph.output] == ["pixels"] + [o for _, o, _ in specs]
        assert shapes["latents"] == [B, 16, CHUNK, H, W]
        assert shapes["pixels"] == record["pixels"]["shape"][graph] == [B, 3, record["pixel_frames"][graph], 8 * H, 8 * W]
        for i, o, shape in specs:
            assert shapes[o] == shape and (graph == "first" or shapes[i] == shape)
        assert record["graphs"][graph]["tensorrt_problems"] == []
    assert record["pixel_frames"] == {"first": 1 + 4 * (CHUNK - 1), "next": 4 * CHUNK}
    assert set(record["files"]) == {FIRST, NEXT, WEIGHTS} and (directory / RECORD).is_file()


def test_both_graphs_read_each_weight_once_from_one_file(exported):
    """decoder_weights.bin holds every distinct weight of the two graphs once: its size is the distinct
    tensors' bytes (plus page alignment), below what two self-contained graphs would store."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    directory, record = exported
    distinct, total, external = {}, 0, 0
    for file in (FIRST, NEXT):
        proto = onnx.load(str(directory / file))  # external data resolved beside the graph
        bare = onnx.load(str(directory / file), load_external_data=False)
        for t, ref in zip(proto.graph.initializer, bare.graph.initializer):
            total += len(t.raw_data)
            if uses_external_data(ref):
                external += 1
                assert ExternalDataInfo(ref).location == WEIGHTS
                distinct[t.raw_data] = len(t.raw_data)
    size = (directory / WEIGHTS).stat().st_size
    assert external > 0 and sum(distinct.values()) <= size < sum(distinct.values()) + 4096 * len(distinct)
    assert size < 0.7 * total  # measured: 453,152 bytes for 980,296 bytes of initializers (tiny VAE, fp32)


def test_cache_bytes_are_what_is_allocated(vae, latents, exported):
    directory, record = exported
    dec = StreamDecoder(directory, threads=1)
    assert record["cache_bytes"] == sum(c["bytes"] for c in record["caches"]) == dec.cache_bytes()
    assert [c["bytes"] for c in record["caches"]] == [dec.buffers.nbytes(c["input"] + "@0") for c in record["caches"]]
    assert dec.allocated_cache_bytes() == 2 * record["cache_bytes"]  # two sets: outputs cannot alias inputs
    _, torch_dec = _torch_stream(vae, latents, 2)
    assert torch_dec.cache_bytes() == record["cache_bytes"]


def test_wan480_cache_bytes():
    """The real Wan2.1 VAE at 480x832 (latent 60x104), fp16: 32 caches, 1,888,573,440 bytes (1.89 GB)."""
    cfg = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    specs = cache_specs(cfg, 1, 60, 104)
    assert len(specs) == 32
    assert sum(math.prod(s.shape) for s in specs) * 2 == 1_888_573_440
    assert specs[-1].module == "decoder.conv_out" and specs[-1].shape == (1, 96, 2, 480, 832)


def _one_line(e):
    return "\n" not in str(e)


def test_refusals(tiny_vae_root, vae, tmp_path):
    with pytest.raises(UserError) as e:
        check_vae(vae, 48)
    assert _one_line(e.value) and str(e.value) == \
        f"{tiny_vae_root / 'vae' / 'config.json'}: z_dim: expected 48 (the DiT's in_dim), found 16"
    with pytest.raises(UserError) as e:
        load_vae(tmp_path)
    assert _one_line(e.value) and str(e.value).startswith(f"{tmp_path / 'config.json'}: file: expected")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((tiny_vae_root / "vae" / "config.json").read_text())
    with pytest.raises(UserError) as e:
        load_vae(tmp_path)
    assert _one_line(e.value) and "diffusion_pytorch_model.safetensors: file: expected" in str(e.value)


def test_runtime_refuses_changed_graph(exported, tmp_path):
    import shutil

    directory, _ = exported
    copy = tmp_path / "dec"
    shutil.copytree(directory, copy)
    with open(copy / NEXT, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError) as e:
        StreamDecoder(copy)
    assert _one_line(e.value) and f"files.{NEXT}.sha256" in str(e.value)


def test_runtime_imports_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import runtimes.decoder\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ispa_export', 'graphs', 'diffusers')]\n"
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_tensorrt_follows_ort(vae, latents, exported, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (DESIGN.md section 7): the TensorRT "
                                           "decoder is written against its Python API and runs where it exists")
    from ispa_export.builder.engine import build_engine

    directory, _ = exported
    engines = {}
    for g, file in (("first", FIRST), ("next", NEXT)):
        engines[g] = tmp_path / f"{g}.engine"
        build_engine(directory / file, engines[g], workspace_bytes=1 << 30, timing_cache_path=None, refit=False,
                     progress=False)
    ref, _ = _torch_stream(vae, latents, 3)
    dec = TrtStreamDecoder(directory, engines=engines)
    try:
        for i, r in enumerate(ref):
            np.testing.assert_allclose(dec.decode_chunk(latents[:, :, i * CHUNK:(i + 1) * CHUNK].numpy()), r,
                                       rtol=0, atol=1e-3)
    finally:
        dec.close()
