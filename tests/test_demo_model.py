"""The shipped demo model: loads strictly, is small, and is trained (beats copying the last frame)."""
import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export.checkpoint import load_into
from ispa_export.lab.train import (DEFAULT_WEIGHTS, HELDOUT_LIMIT, HELDOUT_SEEDS, TeacherForcing, chunk_sigmas,
                               clean_latents, demo_context, flow_inputs, heldout_x0_error, load_demo_model,
                               recall_comparison, return_crops, rollout, teacher_forced_samples,
                               training_forward, uncovered_x0_error)
from ispa_export.lab.videos import make_video


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small ops dominate here; one thread avoids OpenMP barrier waits on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


def test_weights_load_strict_and_small():
    assert DEFAULT_WEIGHTS.stat().st_size <= 10 * 2**20
    m = WanModel(preset("demo"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    summary = load_into(m, DEFAULT_WEIGHTS, strict=True)
    assert summary.tensors == len(before)
    assert summary.source_dtypes == ("float32",)
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every tensor came from the file
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())


def test_context_is_fixed():
    a, b = demo_context(), demo_context(3)
    assert a.shape == (1, 4, 16) and b.shape == (3, 4, 16)
    assert torch.equal(a[0], b[2])
    assert 0.5 < float(a.std()) < 1.5  # a seeded standard normal, not zeros


def test_training_forward_equals_forward_sequence():
    # The block-sparse training forward is the model's own teacher-forcing forward.
    torch.manual_seed(0)
    cfg = preset("demo")
    m = WanModel(cfg).eval()
    tf = TeacherForcing(cfg, 16)  # 16 > M = 12: the rolling window evicts within the sequence
    clean = clean_latents([3, 4], 16)
    sig = torch.from_numpy(chunk_sigmas(np.random.default_rng(0), 2, 8)).float()
    lat, t_frames, _, _ = flow_inputs(clean, sig, cfg.chunk_frames, torch.randn(clean.shape))
    kv = m.cross_kv(demo_context(2))
    with torch.no_grad():
        ref = m.forward_sequence(lat, t_frames, tf.positions, kv, [tf.mask] * cfg.num_layers)
        got = training_forward(m, lat, t_frames, tf.positions, kv, tf.layout)
    assert float((ref - got).abs().max()) < 1e-4 * float(ref.abs().max())


def test_heldout_x0_error_beats_copy_last_frame(model):
    assert max(HELDOUT_SEEDS) < HELDOUT_LIMIT  # never trained on
    res = heldout_x0_error(model, HELDOUT_SEEDS[:2], frames=12, batch=2, sigmas=[1.0, 0.625])
    # At sigma = 1 the model sees only the clean history, the same information as copying the last
    # history frame; it must still predict better than that.
    assert res["model_sigma_1.0000"] < res["copy_history"]
    # At the last sampling step (sigma 0.625) it also sees the noisy frame: better than the
    # previous frame itself.
    assert res["model_sigma_0.6250"] < res["copy_previous"]


def test_model_uses_its_memory(model):
    # Pixels the curtain or shutter has just uncovered are shown only by frames older than the last
    # 2: the model must predict them better from its full 12-frame history than from a 2-frame one.
    # The shipped weights give 0.34 on these videos (0.36 over 32); a model that ignores its
    # history gives about 1.0.
    res = uncovered_x0_error(model, HELDOUT_SEEDS[:4], frames=24)
    assert res["values"] > 1000
    assert res["full_history"] < 0.6 * res["window_history"]
    assert res["full_history"] < 0.2 * res["copy_history"]


def test_full_cache_redraws_returning_objects_better_than_a_window(model):
    # The must-show of a model whose output depends on long memory: rollouts that free-run across
    # an object's return (most often the end of a shutter) redraw it better with the full 12-frame
    # cache than with a 2-frame window, and so do one-chunk samples from the true history. The
    # shipped weights: 0.27 vs 0.11 free-running, 0.49 vs 0.35 teacher-forced (0.34 vs 0.10 and
    # 0.55 vs 0.38 over 46 videos).
    res = recall_comparison(model, HELDOUT_SEEDS[:8])
    assert res["videos"] >= 6
    assert res["full"] > res["window"] + 0.05 and res["full_better_in"] > res["window_better_in"]
    assert res["teacher_forced_full"] > res["teacher_forced_window"] + 0.05
    assert res["full"] > res["copy_last_given"] + 0.1


def test_return_crops_put_a_return_after_the_given_frames():
    crops = return_crops(HELDOUT_SEEDS[:8], given=16, lead=4, span=4)
    assert len(crops) >= 6
    for _, v in crops:
        assert len(v.frames) == 24 and (16 + 4) in {t for _, t in v.returns()}


def test_short_rollout_is_finite_and_in_range(model):
    video = make_video(HELDOUT_SEEDS[0], 8).frames
    gen = rollout(model, video, given_chunks=2, noise_seed=0)
    assert gen.shape == video.shape
    free = gen[4:]
    assert np.isfinite(free).all()
    assert np.abs(free).max() < 2.0  # data lie in [-1, 1]; the sampler does not clip
    truth = video[4:]
    assert 0.3 * truth.std() < free.std() < 2 * truth.std()  # neither collapsed to a constant nor noise
    # The continuation resembles the video more than a blank mid-grey frame would.
    assert np.mean((free - truth) ** 2) < np.mean((truth - truth.mean()) ** 2)


def test_teacher_forced_samples_equal_the_stream(model):
    # Chunk c of the sequence-form sampler is the stream's chunk c after teacher-forcing chunks < c,
    # for full layers and for all-local layers (window 2).
    video = make_video(HELDOUT_SEEDS[1], 6).frames
    seq = teacher_forced_samples(model, video[None], noise_seed=5)[0]
    got = rollout(model, video, given_chunks=2, noise_seed=5)
    assert np.abs(seq[4:] - got[4:]).max() < 1e-4
    seq_l = teacher_forced_samples(model, video[None], noise_seed=5, capacity=2)[0]
    got_l = rollout(model, video, given_chunks=2, noise_seed=5, window=2)
    assert model.layout == [None] * 6  # left as it was
    assert np.abs(seq_l[4:] - got_l[4:]).max() < 1e-4
    assert np.abs(seq_l[4:] - seq[4:]).max() > 1e-3  # the window does change the sample
