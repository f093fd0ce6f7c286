"""Streams go on past Wan's old 1,024-frame RoPE table: the runtime feeds each chunk's RoPE angles."""
import numpy as np
import torch

from exports import export_transitioned
from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.builder.calibrate import IspaOptions, report, transition
from ispa_export.video.torch_runner import TorchRunner
from runtimes.deployment import Deployment
from runtimes.driver import Stream


def shifted(state: dict, offset: int, chunk_frames: int) -> dict:
    """The same caches relabelled `offset` frames later (a multiple of every ring's length keeps each
    frame in its slot): as if the stream had already run that long."""
    out = dict(state)
    for k in [k for k in state if k.startswith("kv_") and k.endswith("_frames")]:  # every cache group
        out[k] = np.where(state[k] >= 0, state[k] + offset, -1)
    out["frame_index"] = np.array(int(state["frame_index"]) + offset, np.int64)
    out["chunk"] = np.array(int(state["chunk"]) + offset // chunk_frames, np.int64)
    return out


def test_ort_and_torch_agree_past_frame_1024(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")  # full cache 8 frames, no sink; the L-layers keep 2
    model = WanModel(cfg).eval()
    opts = IspaOptions(kv_reduction=0.3, window=2, sink=0, warmup_chunks=6)
    stream, monitor, tr = transition(model, torch.randn(1, 5, cfg.text_dim), 0, opts)
    d = tmp_path / "a"
    export_transitioned(d, model, stream, report(model, monitor, tr, opts))
    video = Deployment.open(d, "ort").start(d / "instance")
    offset = 1000  # a multiple of both rings (8 and 2 frames): the next chunk starts at frame 1012
    state = shifted(video.instance.state, offset, cfg.chunk_frames)
    assert int(state["frame_index"]) == 1012
    # ONNX Runtime: the deployment's graph with this video's corrections (the instance's); PyTorch: the
    # transitioned model itself, continued from the same relabelled caches.
    video.restore(state)
    reference = Stream(TorchRunner(model), stream.geo, stream.state_arrays()["cross_kv"], stream.seed,
                       keep_latents=False)
    reference.load_state(state)
    outs = []
    for s in (video.stream, reference):
        outs.append(s.run(12))  # frames 1012..1035: across the old table's end
        assert s.frame_index > 1024
    a, b = outs
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
