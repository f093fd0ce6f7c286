"""lab.shared_layout (issue 19, item 7): own layout vs one deployment's, end to end on a small
random-weight model of the demo's shape (3-channel 16x16 frames: the procedural videos), and the
teacher-forced absorb warmup it relies on."""
import json

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from runtimes.groups import Span

from ispa_export.lab.shared_layout import METHODS, ROW_FIELDS, main
from ispa_export.video.absorb import CorrectionRule, warm_up


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = preset("demo").replace(num_layers=2, latent_height=16, latent_width=16)
    model = WanModel(cfg).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0))
    return model, ctx


def test_runs_end_to_end_with_the_report_fields(small, tmp_path):
    model, ctx = small
    argv = ["--out", str(tmp_path), "--seeds", "1000", "--calibration-seeds", "2000", "--reductions", "0.5",
            "--regimes", "whole", "--total-chunks", "6", "--warmup-chunks", "4", "--protocols", "teacher,free"]
    assert main(argv, model=model, context=ctx) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["protocol"], r["method"]) for r in rows) == sorted(
        (p, m) for p in ("teacher", "free") for m in METHODS)
    for r in rows:
        assert set(ROW_FIELDS) <= r.keys()
        assert r["seed"] == 1000 and r["reduction"] == 0.5 and r["regime"] == "whole"
        assert np.isfinite(r["psnr"]) and r["kv_bytes"] <= r["kv_budget_bytes"]
        # scored from the later transition to the end of the 12-frame video
        assert r["scored_from_chunk"] == max(r["own_transition_chunk"], r["shared_transition_chunk"])
        assert r["first_frame"] + r["frames_scored"] == 12
    by = {(r["protocol"], r["method"]): r for r in rows}
    assert by[("teacher", "shared")]["layout"] == json.loads((tmp_path / "deployments.json").read_text())[0]["layout"]
    assert by[("teacher", "own")]["same_layout"] == (by[("teacher", "own")]["layout"] == by[("teacher", "shared")]["layout"])
    md = (tmp_path / "results.md").read_text()
    assert "python -m ispa_export.lab.shared_layout --out" in md
    assert f"{by[('teacher', 'shared')]['psnr']:.2f}" in md and f"{by[('free', 'own')]['psnr']:.2f}" in md


def test_the_absorb_warmup_is_teacher_forced_by_the_video(small):
    """The evaluation's absorb warmup (video.absorb.warm_up with `video`) stores the video's frames,
    and without one it is the free warmup."""
    model, ctx = small
    layout = [Span(0, 4), None]
    rule = CorrectionRule(warmup_chunks=5, allowed=(0,))
    video = np.random.default_rng(0).standard_normal((1, 3, 10, 16, 16)).astype(np.float32)
    forced = warm_up(model.with_layout(layout), layout, ctx, 3, rule, video=video)
    got = np.concatenate(forced.stream.latents, 2)
    np.testing.assert_array_equal(got, video[:, :, :got.shape[2]])
    free = np.concatenate(warm_up(model.with_layout(layout), layout, ctx, 3, rule).stream.latents, 2)
    assert not np.array_equal(free[:, :, :got.shape[2]], got)
