"""Quality far past Wan's old 1,024-frame RoPE table: the demo model teacher-forced on one long
procedural video, PSNR of each chunk's sample against the true frames, over a window of chunks
before and after frame 1,024 (issue: streams of any length).

    python -m ispa_export.lab.long_video [--seed 5000] [--chunks 600] [--out docs/eval/long_video.json]

Teacher-forced (every cache pass stores the true frames) so that the score measures the model at
those positions, not the drift of a free run. Both the full cache and the export's ISPA layout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtimes.files import write_json_atomic

from ispa_export.demo import demo_context
from ispa_export.builder.calibrate import IspaOptions, transition
from ispa_export.models import load_model
from ispa_export.video.torch_runner import torch_stream
from ispa_export.lab.videos import make_video

WINDOWS = ((450, 500), (550, 600))  # chunks; frames 900-1000 and 1100-1200 at 2 frames a chunk


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of frames in [-1, 1] (data range 2)."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def teacher_forced(layout: str, seed: int, chunks: int, log) -> list[float | None]:
    """Per-chunk PSNR of the sample against the true chunk, chunks 0..chunks-1 (warmup included)."""
    _, model = load_model("demo")
    f = model.cfg.chunk_frames
    video = make_video(seed, chunks * f).frames  # [T, C, H, W]
    lat = np.ascontiguousarray(video.transpose(1, 0, 2, 3)[None])  # [1, C, T, H, W]
    true = lambda c: lat[:, :, c * f:(c + 1) * f]  # noqa: E731
    scores: list[float | None] = []
    if layout == "ispa":
        stream, _, _ = transition(model, demo_context(), seed, IspaOptions(), video=lat)
        scores = [None] * stream.chunk  # the warmup's samples are not kept by transition
    else:
        stream = torch_stream(model, demo_context(), seed)
    stream.keep_latents = False
    t0 = time.perf_counter()
    for c in range(stream.chunk, chunks):
        stream.step(given=true(c))
        scores.append(psnr(stream.sample, true(c)))
        if c % 100 == 0:
            log(f"{layout}: chunk {c}/{chunks} (frame {c * f}), {time.perf_counter() - t0:.0f} s")
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ispa_export.lab.long_video", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--chunks", type=int, default=600)
    p.add_argument("--out", default="artifacts/long_video.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda m: print(f"long-video: {m}", file=sys.stderr, flush=True)  # noqa: E731
    result = {"command": "python -m ispa_export.lab.long_video " + " ".join(argv or sys.argv[1:]),
              "seed": args.seed, "chunks": args.chunks, "model": "demo", "windows": WINDOWS, "layouts": {}}
    for layout in ("full", "ispa"):
        scores = teacher_forced(layout, args.seed, args.chunks, log)
        means = [float(np.mean(scores[a:b])) for a, b in WINDOWS if b <= len(scores)]
        result["layouts"][layout] = {"psnr_per_chunk": scores, "window_means": means,
                                     "difference_db": means[1] - means[0] if len(means) == 2 else None}
        log(f"{layout}: mean PSNR chunks {WINDOWS[0]} {means[0]:.2f} dB, {WINDOWS[1]} "
            f"{means[-1]:.2f} dB")
    write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
