"""Frame metrics of the quality evaluation (ispa_export.lab.evaluate) against the reference: PSNR and
SSIM (data range 2 for frames in [-1, 1]), flicker, drift and identity recall."""
from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0  # dB for frames equal to the reference (skimage would say inf)
METRICS = ("psnr", "ssim", "flicker", "drift", "recall")


def frames_of(latents: np.ndarray) -> np.ndarray:
    """[1, C, T, H, W] -> [T, C, H, W], clipped to the displayed range [-1, 1]."""
    return np.clip(latents[0].transpose(1, 0, 2, 3), -1.0, 1.0)


def psnr_frames(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, data range 2) of [T, C, H, W] frames; PSNR_CAP where they are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    out = []
    for r, g in zip(ref, gen):
        equal = np.array_equal(r, g)
        out.append(PSNR_CAP if equal else min(PSNR_CAP, peak_signal_noise_ratio(r, g, data_range=2.0)))
    return np.array(out)


def ssim_frames(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    side = min(ref.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    return np.array([structural_similarity(r, g, data_range=2.0, channel_axis=0, win_size=win)
                     for r, g in zip(ref, gen)])


def flicker_energy(frames: np.ndarray) -> float:
    """Mean squared difference of consecutive frames."""
    if len(frames) < 2:
        return float("nan")
    return float(np.mean(np.diff(frames, axis=0) ** 2))


def drift(psnr: np.ndarray) -> float:
    """Mean PSNR of the last quarter of the frames minus the first quarter (< 0: quality decays)."""
    q = max(len(psnr) // 4, 1)
    return float(np.mean(psnr[-q:]) - np.mean(psnr[:q]))


def video_metrics(ref: np.ndarray, gen: np.ndarray, ref_flicker: float) -> dict:
    """PSNR/SSIM (means over frames), flicker ratio and drift of frames [T, C, H, W] after the
    transition against the reference's."""
    p = psnr_frames(ref, gen)
    e = flicker_energy(gen)
    return {
        "psnr": float(np.mean(p)), "ssim": float(np.mean(ssim_frames(ref, gen))),
        "flicker": e / ref_flicker if ref_flicker > 0 else float("nan"),
        "drift": drift(p), "psnr_per_frame": [round(float(x), 3) for x in p],
    }


def recall_of(frames: np.ndarray, sample, frames_from: int) -> float:
    from ispa_export.lab.videos import identity_recall

    return identity_recall(frames, sample, frames_from=frames_from)
