"""The cached stream equals one block-causal forward over the whole sequence."""
import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.masks import teacher_forcing
from graphs.wan import WanModel
from ispa_export.video.torch_runner import torch_stream
from runtimes.driver import PassInfo
from runtimes.groups import Span


def build(**changes):
    torch.manual_seed(0)
    cfg = preset("tiny").replace(**changes)
    return WanModel(cfg).eval(), torch.randn(1, 5, cfg.text_dim)


class Recorder:
    """Keeps every pass's inputs and outputs, to replay them through the whole-sequence forward."""

    def __init__(self, runner):
        self.runner, self.passes = runner, []
        self.input_names = runner.input_names

    def run(self, feeds, info: PassInfo):
        out = self.runner.run(feeds, info)
        self.passes.append((info, feeds["latents"].copy(), float(feeds["timestep"][0]), out["prediction"]))
        return out


def sequence_reference(model, cross_kv, passes, frames, chunk, layout):
    """Replay pass k of every chunk as one teacher-forcing forward: clean chunks + the noisy inputs of pass k."""
    cfg = model.cfg
    clean = {}
    steps = {}
    for info, x, t, pred in passes:
        steps.setdefault(info.pass_kind, {})[info.chunk] = (x, t, pred)
    cache_pass = max(steps)
    for c, (x, _, _) in steps[cache_pass].items():
        clean[c] = x
    chunks = sorted(clean)
    clean_seq = np.concatenate([clean[c] for c in chunks], axis=2)
    masks = []
    for span in layout:
        cap, sink = (cfg.max_frames, cfg.full_sink) if span is None else (span.frames, span.sink)
        masks.append(teacher_forcing(frames, chunk, cap, sink))
    pos = torch.arange(frames).repeat(2)
    worst = 0.0
    for k in sorted(steps):
        noisy = np.concatenate([steps[k][c][0] for c in chunks], axis=2)
        t_noisy = np.concatenate([np.full(chunk, steps[k][c][1]) for c in chunks])
        lat = torch.from_numpy(np.concatenate([clean_seq, noisy], axis=2))
        t = torch.from_numpy(np.concatenate([np.zeros(frames), t_noisy])).float()[None]
        with torch.no_grad():
            out = model.forward_sequence(lat, t, pos, torch.from_numpy(cross_kv), masks).numpy()
        ref = out[:, :, frames:] if k != cache_pass else out[:, :, :frames]
        got = np.concatenate([steps[k][c][2] for c in chunks], axis=2)
        worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    return worst


@pytest.mark.parametrize("chunk,max_frames,sink", [(2, 6, 0), (3, 7, 1), (1, 4, 2)])
def test_stream_equals_block_causal_sequence(chunk, max_frames, sink):
    model, ctx = build(chunk_frames=chunk, max_frames=max_frames, full_sink=sink)
    stream = torch_stream(model, ctx, seed=3)
    rec = Recorder(stream.runner)
    stream.runner = rec
    chunks = 2 * max_frames // chunk + 1  # the cache wraps around at least once
    stream.run(chunks)
    assert stream.frame_index > max_frames
    err = sequence_reference(model, stream.cross_kv, rec.passes, chunks * chunk, chunk, model.layout)
    assert err < 1e-5


@pytest.mark.parametrize("layout", [
    [None, Span(1, 3), None, Span(1, 3)],  # one local group
    [None, Span(0, 2), Span(1, 3), Span(0, 2)],  # two local groups, one of them with two layers
    [Span(0, 3), Span(1, 1), Span(2, 1), Span(0, 3)],  # three local groups and no full one
])
def test_local_layers_equal_masked_full_attention(layout):
    model, ctx = build(chunk_frames=2, max_frames=8)
    model.set_layout(layout)
    stream = torch_stream(model, ctx, seed=5)
    assert [g.name for g in stream.groups.values()] == [g.name for g in model.cache_groups()]
    rec = Recorder(stream.runner)
    stream.runner = rec
    stream.run(7)  # 14 frames: every group's ring wraps
    err = sequence_reference(model, stream.cross_kv, rec.passes, 14, 2, layout)
    assert err < 1e-5


def test_stream_is_deterministic_from_seed():
    model, ctx = build()
    a = torch_stream(model, ctx, seed=11).run(3)
    b = torch_stream(model, ctx, seed=11).run(3)
    c = torch_stream(model, ctx, seed=12).run(3)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
