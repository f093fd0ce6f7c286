"""Streams go on past Wan's old 1,024-frame RoPE table: the runtime feeds each chunk's RoPE angles."""
import numpy as np
import torch

from graphs.config import WanConfig, preset
from graphs.wan import WanModel
from ispa_export.build.export import write_artifact
from ispa_export.build.calibrate import IspaOptions, report, transition
from ispa_export.pipeline import BAKED, load_baked, save_baked
from ispa_export.video.torch_runner import TorchRunner
from runtimes.artifact import load_artifact
from runtimes.driver import Stream
from runtimes.ort import OrtRunner


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
    write_artifact(tmp_path / "a", model, stream, report(model, monitor, tr, opts), preset="tiny",
                   progress=lambda s: None, extras={BAKED: lambda p: save_baked(model, p)})
    art = load_artifact(tmp_path / "a")
    offset = 1000  # a multiple of both rings (8 and 2 frames): the next chunk starts at frame 1012
    state = shifted(art.state, offset, cfg.chunk_frames)
    baked = load_baked(WanConfig.from_dict(art.manifest["model"]["config"]), tmp_path / "a" / BAKED)
    outs = []
    for runner in (OrtRunner(art.onnx_path), TorchRunner(baked)):
        s = Stream(runner, art.geometry, art.cross_kv, art.seed, keep_latents=False)
        s.load_state(state)
        outs.append(s.run(12))  # frames 1012..1035: across the old table's end
        assert s.frame_index > 1024
    a, b = outs
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
