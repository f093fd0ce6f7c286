"""Procedural videos whose content needs long-range memory, for the demo model (DESIGN.md section 8).

Each video shows a textured background (in half of the videos panned one way and back, so areas
are revisited), 2-3 objects with distinct identities (shape, colour, texture) that leave view by an
edge and come back, a wide occluder (a "curtain") that sweeps across and hides what is behind
it for 7-12 frames, and a shutter: every 18-35 frames the view goes dark for 6 frames while the
scene's clock stops, then the scene resumes where it stopped. What the curtain uncovers and what the
shutter gives back is what was there before: a model that remembers the last 12 frames can redraw
it, one with a 2-5 frame window has to guess. The curtain gives memory a frequent, local use (its
reveals happen in most frames, at the position the content was seen at); the shutter makes every
returning object's identity a matter of memory, since no recent frame shows any of it. Numpy only,
so data generation stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ispa_export.errors import UserError

SHAPES = ("disc", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "dots")
# Saturated colours in [-1, 1], far from the muted background and from each other.
PALETTE = np.array([[0.9, -0.8, -0.8], [-0.8, 0.9, -0.8], [-0.7, -0.6, 1.0], [1.0, 0.9, -0.8],
                    [0.9, -0.8, 0.9], [-0.8, 0.9, 0.9], [1.0, 0.2, -0.9], [1.0, 1.0, 1.0]],
                   dtype=np.float32)
VISIBLE_FRACTION = 0.5  # an object counts as visible when at least this much of it shows
HIDDEN_FRACTION = 0.1  # and as out of view below this
SHUTTER_FRAMES = 6  # as long as identity_recall's default k: a 2-5 frame window holds nothing of before


@dataclass(frozen=True)
class ObjectInfo:
    id: int
    shape: str
    texture: str
    colour: np.ndarray  # [3] in [-1, 1], the untextured colour


@dataclass(frozen=True)
class VideoSample:
    """A video and its per-frame ground truth; object arrays are indexed [frame, object]."""
    frames: np.ndarray            # [F, 3, S, S] float32 in [-1, 1]
    background: np.ndarray        # [F, 3, S, S] the same video without objects or occluder
    objects: tuple[ObjectInfo, ...]
    visible_fraction: np.ndarray  # [F, N] share of the object inside the frame and not covered
    visible: np.ndarray           # [F, N] bool, visible_fraction >= VISIBLE_FRACTION
    bbox: np.ndarray              # [F, N, 4] x0, y0, x1, y1 in pixels, not clipped to the frame
    masks: np.ndarray             # [F, N, S, S] bool, pixels where the object is what one sees
    occluder: np.ndarray          # [F, S, S] float32 coverage in [0, 1] by the curtain or the shutter (1)

    def memory_pixels(self, window: int) -> np.ndarray:
        """[F, S, S] bool: pixels uncovered now (coverage < 0.5) that the curtain or shutter covered (> 0.5)
        in each of the `window` frames before, i.e. content only an older frame shows."""
        covered = self.occluder > 0.5
        out = ~covered
        out[:window] = False
        for lag in range(1, window + 1):
            out[window:] &= covered[window - lag:len(covered) - lag]
        return out

    def crop(self, start: int, stop: int) -> "VideoSample":
        """Frames [start, stop) with their ground truth (events are then those of the crop alone)."""
        if not 0 <= start < stop <= len(self.frames):
            raise UserError(f"videos.crop: need 0 <= start < stop <= {len(self.frames)}, got {start}, {stop}")
        cut = slice(start, stop)
        return replace(self, frames=self.frames[cut], background=self.background[cut],
                       visible_fraction=self.visible_fraction[cut], visible=self.visible[cut], bbox=self.bbox[cut],
                       masks=self.masks[cut], occluder=self.occluder[cut])

    def returns(self, k: int = 6) -> list[tuple[int, int]]:
        """(object, frame) pairs: an object seen before is visible again after having been out of
        view (visible_fraction < HIDDEN_FRACTION) for >= k consecutive frames. Frames in between
        that show a part of it (it is entering) do not cancel the event."""
        events = []
        for i in range(self.visible.shape[1]):
            seen, run, pending = False, 0, False
            for t, frac in enumerate(self.visible_fraction[:, i]):
                run = run + 1 if frac < HIDDEN_FRACTION else 0
                pending = pending or (seen and run >= k)
                if self.visible[t, i]:
                    if pending:
                        events.append((i, t))
                    seen, pending = True, False
        return events


def _shape_alpha(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Antialiased coverage from a signed distance, so sub-pixel motion changes pixels smoothly."""
    if shape == "disc":
        d = np.hypot(px, py) - r
    elif shape == "square":
        d = np.maximum(abs(px), abs(py)) - 0.85 * r
    elif shape == "triangle":
        d = np.max([px * np.cos(a) + py * np.sin(a) for a in np.radians([-90, 30, 150])], 0) - 0.55 * r
    else:
        w = 0.35 * r
        d = np.minimum(np.maximum(abs(px) - r, abs(py) - w), np.maximum(abs(px) - w, abs(py) - r))
    return np.clip(0.5 - d, 0.0, 1.0)


def _texture(texture: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    if texture == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (px + py) / 4.0)
    if texture == "dots":
        return ((0.5 + 0.5 * np.cos(2 * np.pi * px / 4.0)) * (0.5 + 0.5 * np.cos(2 * np.pi * py / 4.0))) ** 0.5
    return np.zeros_like(px)


def _orbit_angle(t: np.ndarray, t_on: float, t_off: float, exit_angle: float, slow: float) -> np.ndarray:
    """Angle on an orbit whose arc (-exit_angle, exit_angle) lies off-screen.

    The off-screen arc takes t_off frames and the on-screen arc t_on frames, so absence times
    are set directly; on screen the object slows down mid-arc (frames that change little)."""
    s = np.mod(t, t_on + t_off)
    q = np.clip((s - t_off) / t_on, 0.0, 1.0)
    q = q + slow * np.sin(2 * np.pi * q) / (2 * np.pi)
    return np.where(s < t_off, -exit_angle + 2 * exit_angle * s / t_off,
                    exit_angle + (2 * np.pi - 2 * exit_angle) * q)


def make_video(seed: int, frames: int, size: int = 32) -> VideoSample:
    """A deterministic video from `seed`: `frames` frames of 3 x size x size pixels in [-1, 1]."""
    if frames < 1:
        raise UserError(f"videos.make_video: frames must be >= 1, got {frames}")
    if size < 16:
        raise UserError(f"videos.make_video: size must be >= 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    u = size / 32.0  # lengths below are designed at 32 pixels and scale with the frame
    # Shutter closings from their own generator, so the scene drawn from `rng` does not depend on them.
    shut_rng = np.random.default_rng([seed, 7])
    shut = np.zeros(frames, bool)
    start = int(shut_rng.integers(2, 22))
    while start < frames:
        shut[start:start + SHUTTER_FRAMES] = True
        start += SHUTTER_FRAMES + int(shut_rng.integers(12, 30))
    # The scene's clock: it stops while the shutter is closed, so what comes back is what was last seen.
    t = np.maximum(np.cumsum(~shut) - 1, 0).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5

    # Background: a world larger than the frame (gratings over a mosaic of random tiles), panned
    # one way and back along a random direction. The tiles make it unpredictable from the pixels
    # around it: what the curtain uncovers can be redrawn from memory, not inpainted.
    pan_dir = rng.normal(size=2)
    pan_dir /= np.linalg.norm(pan_dir)
    pan_amp = rng.uniform(0.5, 1.0) * size if rng.random() < 0.5 else 0.0  # half the videos: a still camera
    pan = pan_amp * (1 - np.cos(2 * np.pi * t / rng.uniform(32, 48))) / 2
    lo = np.minimum(0, pan_dir * pan.max()) - 4 * u
    hi = size + np.maximum(0, pan_dir * pan.max()) + 4 * u
    base = rng.uniform(-0.25, 0.25, 3)
    gratings = [(rng.normal(size=2) / (rng.uniform(8, 24) * u), rng.uniform(0, 2 * np.pi),
                 rng.uniform(-0.12, 0.12, 3)) for _ in range(2)]
    tile = 4 * u
    tiles = rng.uniform(-0.4, 0.4, (3, *np.ceil((hi - lo) / tile).astype(int)[::-1] + 1))  # [3, rows, cols]

    n = int(rng.integers(2, 4))
    shapes = rng.choice(len(SHAPES), n, replace=False)
    colours = rng.choice(len(PALETTE), n, replace=False)
    sides = rng.choice(4, n, replace=False)  # each object leaves by its own edge
    objects, orbits = [], []
    for i in range(n):
        objects.append(ObjectInfo(i, SHAPES[shapes[i]], TEXTURES[rng.integers(len(TEXTURES))],
                                  PALETTE[colours[i]].copy()))
        # Small and slow on screen, so the curtain can hide one whole for 6+ frames and it is
        # uncovered near where it was last seen.
        r = rng.uniform(3.2, 4.2) * u
        amp, exit_angle = rng.uniform(10, 14) * u, rng.uniform(0.5, 0.9)
        along = size / 2 + 1.15 * r + 1 - amp * np.cos(exit_angle)  # fully out on the off arc
        ang = _orbit_angle(t + rng.uniform(0, 60), rng.uniform(28, 44), rng.uniform(6, 14),
                           exit_angle, rng.uniform(0.6, 0.9))
        m = along + amp * np.cos(ang)                                # towards the exit edge
        p = rng.uniform(-7, 7) * u + rng.uniform(3, 7) * u * np.sin(ang)
        d = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]][sides[i]], dtype=np.float64)
        centre = size / 2 + m[:, None] * d + p[:, None] * d[::-1]
        orbits.append((centre, r))

    # Curtain: a wide vertical or horizontal band crossing at constant speed (each pixel hidden
    # bar_w / bar_v = 7-12 frames, within a 12-frame cache), then off-screen a short while.
    bar_w, bar_v = rng.uniform(18, 22) * u, rng.uniform(1.8, 2.6) * u
    bar_pos = np.mod(rng.uniform(0, 100) + bar_v * t, size + bar_w + rng.uniform(0.2, 0.6) * size) - bar_w
    bar_vertical = bool(rng.integers(2))

    out = np.empty((frames, 3, size, size), np.float32)
    background = np.empty_like(out)
    vis_frac = np.zeros((frames, n), np.float32)
    bbox = np.zeros((frames, n, 4), np.float32)
    masks = np.zeros((frames, n, size, size), bool)
    occluder = np.zeros((frames, size, size), np.float32)
    # Coverage integrated on a 4x finer grid; sums on the frame's grid vary ~2% with sub-pixel
    # position, hence also the clip below.
    ar = (np.arange(-48 * u, 48 * u) + 0.5) / 4
    areas = [_shape_alpha(o.shape, ar[None, :], ar[:, None], r).sum() / 16 for o, (_, r) in zip(objects, orbits)]
    for f in range(frames):
        wx, wy = xx + pan_dir[0] * pan[f], yy + pan_dir[1] * pan[f]
        img = np.broadcast_to(base[:, None, None], (3, size, size)).copy()
        for k, phase, col in gratings:
            img += col[:, None, None] * np.sin(2 * np.pi * (k[0] * wx + k[1] * wy) + phase)
        img += tiles[:, ((wy - lo[1]) // tile).astype(int), ((wx - lo[0]) // tile).astype(int)]
        background[f] = img
        alphas = []
        for i, (o, (centre, r)) in enumerate(zip(objects, orbits)):
            px, py = xx - centre[f, 0], yy - centre[f, 1]
            a = _shape_alpha(o.shape, px, py, r)
            look = (o.colour[:, None, None] + 1) / 2 * (1 - 0.55 * _texture(o.texture, px / u, py / u)) * 2 - 1
            img = img * (1 - a) + look * a
            alphas.append(a)
            bbox[f, i] = [*(centre[f] - 1.15 * r), *(centre[f] + 1.15 * r)]
        bar = np.clip(0.5 * bar_w + 0.5 - abs((xx if bar_vertical else yy) - bar_pos[f] - 0.5 * bar_w), 0, 1)
        if shut[f]:
            bar = np.ones_like(bar)
        img = img * (1 - bar) + (-0.75 + 0.1 * np.sin(2 * np.pi * (yy if bar_vertical else xx) / 3)) * bar
        occluder[f] = bar
        for i, a in enumerate(alphas):
            shown = a * (1 - bar) * np.prod([1 - b for b in alphas[i + 1:]], axis=0)
            vis_frac[f, i] = min(shown.sum() / areas[i], 1.0)
            masks[f, i] = shown > 0.5
        out[f] = img
    np.clip(out, -1, 1, out=out)
    np.clip(background, -1, 1, out=background)
    return VideoSample(out, background, tuple(objects), vis_frac, vis_frac >= VISIBLE_FRACTION, bbox, masks,
                       occluder)


def batch(seeds: Iterable[int], frames: int, size: int = 32) -> np.ndarray:
    """[B, frames, 3, size, size] float32 videos, one per seed."""
    return np.stack([make_video(int(s), frames, size).frames for s in seeds])


def identity_recall(generated: np.ndarray, sample: VideoSample, k: int = 6, span: int = 3,
                    frames_from: int = 0, pixels: np.ndarray | None = None) -> float:
    """How well `generated` redraws objects that come back after being out of view.

    Events are `sample.returns(k)`: an object, seen earlier, visible again after >= k frames out
    of view (k = 6: a 4-6 frame memory window no longer holds it). For each event the return frame
    and up to span - 1 following frames (while the object stays visible, and only frames
    >= frames_from) are scored on the object's true visible mask M:

        score = clip(1 - mse(generated, truth) / mse(background, truth), 0, 1)

    with mse over the pixels of M and the 3 channels, and `background` the same video rendered
    without objects (the denominator is floored at 0.02 so near-background objects cannot blow
    it up). 1 = the object's colour and texture are reproduced exactly, 0 = no better than
    painting background there (another object's colour usually scores 0 too). The result is the
    mean over scored frames; NaN when the video has no such event.

    `pixels` ([F, S, S] bool) narrows M to those pixels, e.g. sample.memory_pixels(w): the part of a
    returning object that a w-frame window does not show (frames with fewer than 4 such pixels are
    not scored).
    """
    if generated.shape != sample.frames.shape:
        raise UserError(f"videos.identity_recall: generated must have shape {sample.frames.shape}, "
                        f"got {generated.shape}")
    scores = []
    for i, t0 in sample.returns(k):
        for t in range(max(t0, frames_from), min(t0 + span, len(sample.frames))):
            if not sample.visible[t, i]:
                break
            m = sample.masks[t, i] if pixels is None else sample.masks[t, i] & pixels[t]
            if pixels is not None and m.sum() < 4:
                continue
            truth = sample.frames[t][:, m]
            err = np.mean((generated[t][:, m] - truth) ** 2)
            ref = max(float(np.mean((sample.background[t][:, m] - truth) ** 2)), 0.02)
            scores.append(float(np.clip(1 - err / ref, 0.0, 1.0)))
    return float(np.mean(scores)) if scores else float("nan")


def save_preview(frames: np.ndarray, path: str | Path, scale: int = 4, cols: int = 10) -> Path:
    """Write [F, 3, H, W] frames in [-1, 1] as a PNG grid (rows of `cols`) or, for .gif, an animation."""
    path = Path(path)
    imgs = np.round((np.clip(frames, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    imgs = imgs.repeat(scale, 1).repeat(scale, 2)
    import imageio.v2 as imageio  # imported here so generating data never needs it

    if path.suffix.lower() == ".gif":
        imageio.mimsave(path, list(imgs), duration=0.15, loop=0)
        return path
    f, h, w, _ = imgs.shape
    rows = -(-f // cols)
    grid = np.full((rows * (h + 2), min(f, cols) * (w + 2), 3), 255, np.uint8)
    for j, im in enumerate(imgs):
        y, x = (j // cols) * (h + 2), (j % cols) * (w + 2)
        grid[y:y + h, x:x + w] = im
    imageio.imwrite(path, grid)
    return path
