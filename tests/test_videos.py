import numpy as np
import pytest

from ispa_export.errors import UserError
from ispa_export.lab.videos import batch, identity_recall, make_video, save_preview

SEEDS = range(30)
FRAMES = 48  # ~11 of them dark (shutter): the scene runs ~37


@pytest.fixture(scope="module")
def videos():
    return [make_video(s, FRAMES) for s in SEEDS]


def test_deterministic_from_seed():
    a, b, c = make_video(7, 24), make_video(7, 24), make_video(8, 24)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.visible_fraction, b.visible_fraction)
    assert not np.array_equal(a.frames, c.frames)


def test_shapes_range_and_metadata(videos):
    for v in videos:
        n = len(v.objects)
        assert v.frames.shape == v.background.shape == (FRAMES, 3, 32, 32)
        assert v.frames.dtype == np.float32
        assert v.frames.min() >= -1 and v.frames.max() <= 1
        assert 2 <= n <= 3
        assert v.visible.shape == v.visible_fraction.shape == (FRAMES, n)
        assert v.bbox.shape == (FRAMES, n, 4) and v.masks.shape == (FRAMES, n, 32, 32)
        assert len({o.shape for o in v.objects}) == n  # identities are distinct
        assert len({tuple(o.colour) for o in v.objects}) == n
        assert (v.visible_fraction >= 0).all() and (v.visible_fraction <= 1).all()
        assert (v.visible_fraction.max(0) > 0.8).all()  # each object shows (nearly) whole at some point
        # a visible object's mask lies inside its bounding box
        for t, i in zip(*np.nonzero(v.visible)):
            ys, xs = np.nonzero(v.masks[t, i])
            x0, y0, x1, y1 = v.bbox[t, i]
            assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
    assert make_video(3, 10, size=48).frames.shape == (10, 3, 48, 48)


def test_objects_leave_and_return(videos):
    with_return = [v for v in videos if v.returns(k=6)]
    assert len(with_return) >= 0.8 * len(videos)
    for v in with_return:
        for i, t in v.returns(k=6):
            assert v.visible[t, i] and not v.visible[t - 6:t, i].any()
            assert v.visible[: t - 6, i].any()  # it was seen before it left


def test_reveals_are_of_what_a_12_frame_cache_holds(videos):
    """The pixels the curtain uncovers or the shutter gives back are hidden in the last 2 frames (a
    short window cannot predict them) and, on a still camera, equal the background seen at the same
    place before, mostly within the 12 frames the demo model's cache keeps (after a shutter less
    often: the curtain may have hidden a pixel before the shutter closed)."""
    held, total = np.zeros(2), np.zeros(2)  # [curtain only, shutter in between]
    for v in videos:
        mem = v.memory_pixels(2)
        assert v.occluder.shape == (FRAMES, 32, 32) and mem.shape == (FRAMES, 32, 32)
        covered = v.occluder > 0.5
        shut = covered.all(axis=(1, 2))
        for t, y, x in zip(*np.nonzero(mem)):
            assert not covered[t, y, x] and covered[t - 2:t, y, x].all()
            before = np.nonzero(~covered[:t - 2, y, x])[0]
            if len(before):  # else it was covered from the first frame on
                kind = int(shut[before[-1]:t].any())
                total[kind] += 1
                held[kind] += t - before[-1] <= 12
        still = np.abs(v.background[1:] - v.background[:-1]).max() == 0
        if still and mem.any():
            t, y, x = (a[0] for a in np.nonzero(mem))
            last = np.nonzero(~covered[:t - 2, y, x])[0]
            if len(last):
                np.testing.assert_array_equal(v.background[t, :, y, x], v.background[last[-1], :, y, x])
    assert (total > 5000).all() and held[0] / total[0] > 0.95 and held[1] / total[1] > 0.6
    assert 0.3 < np.mean([np.abs(v.background[1:] - v.background[:-1]).max() == 0 for v in videos]) < 0.7


def test_shutter_closes_for_6_frames_and_the_scene_resumes_where_it_stopped(videos):
    reopened = 0
    for v in videos:
        step = np.abs(v.background[1:] - v.background[:-1]).mean(axis=(1, 2, 3)).max()  # one frame of motion
        shut = (v.occluder > 0.5).all(axis=(1, 2))
        assert 0.1 < shut.mean() < 0.4
        for f in range(7, FRAMES):
            if not shut[f] and shut[f - 1]:
                assert shut[f - 6:f].all() and not shut[f - 7]
                assert not v.visible[f - 6:f].any()
                assert np.abs(v.background[f] - v.background[f - 7]).mean() <= step
                reopened += 1
    assert reopened >= len(videos)


def test_consecutive_frames_more_similar_than_distant(videos):
    lag1 = np.array([np.abs(v.frames[1:] - v.frames[:-1]).mean() for v in videos])
    lag10 = np.array([np.abs(v.frames[10:] - v.frames[:-10]).mean() for v in videos])
    assert (lag1 < lag10).mean() >= 0.9
    assert lag1.mean() < 0.6 * lag10.mean()


def _replace_objects(v, fill):
    out = v.frames.copy()
    for i in range(len(v.objects)):
        m = np.broadcast_to(v.masks[:, i, None], out.shape)
        out[m] = fill(v, i)[m]
    return out


def test_identity_recall_separates_recall_from_forgetting(videos):
    videos = [v for v in videos if v.returns()]
    other = lambda v, i: np.broadcast_to(v.objects[(i + 1) % len(v.objects)].colour[:, None, None],
                                         v.frames.shape)
    truth = [identity_recall(v.frames, v) for v in videos]
    background = [identity_recall(_replace_objects(v, lambda v, i: v.background), v) for v in videos]
    swapped = [identity_recall(_replace_objects(v, other), v) for v in videos]
    noisy = [identity_recall(v.frames + np.random.default_rng(0).normal(0, 0.1, v.frames.shape), v)
             for v in videos]
    assert min(truth) > 0.999
    assert max(background) < 0.01
    assert np.mean(swapped) < 0.2
    assert np.mean(noisy) > 0.9  # small errors cost little
    assert all(0 <= s <= 1 for s in truth + background + swapped + noisy)


def test_identity_recall_on_the_pixels_a_window_cannot_see(videos):
    # Narrowed to the object pixels the curtain or shutter hid in the last 2 frames: the truth still scores 1,
    # background there 0, and only frames that have such pixels are scored.
    videos = [v for v in videos if v.returns()]
    scores = [(identity_recall(v.frames, v, pixels=v.memory_pixels(2)),
               identity_recall(_replace_objects(v, lambda v, i: v.background), v, pixels=v.memory_pixels(2)))
              for v in videos]
    scored = [(t, b) for t, b in scores if np.isfinite(t)]
    assert len(scored) >= 5
    assert all(t > 0.999 and b < 0.01 for t, b in scored)
    nothing = np.zeros_like(videos[0].occluder, dtype=bool)
    assert np.isnan(identity_recall(videos[0].frames, videos[0], pixels=nothing))


def test_identity_recall_edge_cases():
    v = make_video(1, 40)
    assert np.isnan(identity_recall(v.frames[:5], make_video(1, 5)))  # too short for a return
    t_last = max(t for _, t in v.returns())
    assert np.isnan(identity_recall(v.frames, v, frames_from=t_last + 3))
    with pytest.raises(UserError, match="generated must have shape"):
        identity_recall(v.frames[:10], v)


def test_crop_is_the_slice_and_its_own_events(videos):
    v = videos[0]
    c = v.crop(10, 30)
    for name in ("frames", "background", "visible_fraction", "visible", "bbox", "masks", "occluder"):
        np.testing.assert_array_equal(getattr(c, name), getattr(v, name)[10:30])
    assert c.objects == v.objects
    # every event of the crop is one of the video's (the crop may miss a sighting before the absence)
    assert {(i, t + 10) for i, t in c.returns()} <= set(v.returns())
    for start, stop in ((0, 0), (-1, 5), (5, FRAMES + 1)):
        with pytest.raises(UserError, match="videos.crop: need 0 <= start < stop"):
            v.crop(start, stop)


def test_batch_and_bad_arguments():
    b = batch([1, 2, 3], 8)
    assert b.shape == (3, 8, 3, 32, 32)
    np.testing.assert_array_equal(b[1], make_video(2, 8).frames)
    with pytest.raises(UserError, match="frames"):
        make_video(0, 0)
    with pytest.raises(UserError, match="size"):
        make_video(0, 8, size=8)


def test_save_preview(tmp_path):
    import imageio.v2 as imageio

    frames = make_video(4, 12).frames
    png = imageio.imread(save_preview(frames, tmp_path / "v.png", scale=2, cols=5))
    assert png.shape == (3 * 66, 5 * 66, 3)
    gif = imageio.mimread(save_preview(frames, tmp_path / "v.gif", scale=2))
    assert len(gif) == 12 and gif[0].shape[:2] == (64, 64)
