"""Train the `demo` model: chunk-wise flow matching with teacher forcing on procedural videos.

    python -m ispa_export.lab.train --out ispa_export/data/demo.safetensors --seed 0 --steps 3900 [--eval]

One training step samples B videos of T frames (ispa_export.lab.videos), keeps the clean frames as
latents x in [-1, 1] ([B, 3, T, 32, 32], no VAE), draws one noise level sigma per chunk (mostly the
four sigmas the few-step sampler visits, t/1000 of runtimes.schedule.warped_timesteps(), the rest
uniform), and runs ONE forward over [clean; noisy] frames under the teacher-forcing mask
(graphs.masks.teacher_forcing): every noisy chunk sees the clean history a full cache of M frames
keeps, exactly what the streaming driver feeds it. The model predicts the flow v = noise - x
(x0 = noisy - sigma * v, as runtimes.schedule.flow_step); the loss is the MSE of v on the noisy half,
with the pixels the curtain or the shutter has just uncovered (only older frames show them)
weighted up.
AdamW, linear warmup then cosine, gradient clipping; the shipped weights are an EMA of the trained
ones. `--minutes` fixes the step count after timing steps 5..25 (logged; `--steps N` replays a run
exactly: every random draw comes from the seed).

The text context is fixed (`demo_context()`): the demo model is unconditional in practice, and the
CLI, the evaluation and the tests all use that one embedding.

The attention of the training forward is block-sparse (`SparseLayout`): each chunk's queries attend
only to the frames its mask row allows, gathered, instead of a dense [2T*P, 2T*P] masked product.
It computes the same function as `WanModel.forward_sequence` (tests/test_demo_model.py checks it)
at about a third of the cost, which is what makes a useful model trainable on two CPU cores.

Also here: the checks that the shipped model is meaningfully trained (held-out x0 error against a
copy-the-last-frame predictor, x0 error on just-uncovered pixels with the full history vs a 2-frame
one, teacher-forced rollouts, identity recall with full cache vs a short local window), cheap
enough for a test at small sizes and run fully by `--eval`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Threads that sleep instead of spinning at OpenMP barriers: on a shared 2-core machine spinning
# threads wait on each other (measured 10x more CPU time per step under load). Only effective when
# this module is what first imports torch (python -m ispa_export.lab.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphs.config import WanConfig, preset
from graphs.masks import teacher_forcing
from graphs.wan import WanModel, gate, mask_to_bias, modulate
from ispa_export.checkpoint import load_into, save_state_dict
from ispa_export.demo import CONTEXT_SEED, demo_context
from ispa_export.errors import UserError
from ispa_export.lab.videos import batch as video_batch
from ispa_export.lab.videos import identity_recall, make_video
from ispa_export.video.torch_runner import torch_stream
from runtimes.files import atomic_path
from runtimes.groups import Span
from runtimes.schedule import chunk_noise, warped_timesteps

PRESET = "demo"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "demo.safetensors"
# Video seeds of training runs start at (seed + 1) * TRAIN_SEED_STRIDE; held-out evaluation uses
# seeds below HELDOUT_LIMIT, so no held-out video is ever trained on.
TRAIN_SEED_STRIDE = 10_000_000
HELDOUT_LIMIT = 1_000_000
HELDOUT_SEEDS = tuple(range(500_000, 500_064))


def schedule_sigmas() -> list[float]:
    """The noise levels the few-step sampler visits: 1.0, 0.9375, 0.8333, 0.625."""
    return [t / 1000.0 for t in warped_timesteps()]


def load_demo_model(path: str | os.PathLike = DEFAULT_WEIGHTS) -> WanModel:
    """WanModel(preset('demo')) with the shipped weights, in eval mode."""
    model = WanModel(preset(PRESET))
    load_into(model, path, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Block-sparse training forward


@dataclass(frozen=True)
class SparseLayout:
    """Frame-level mask [S, S] turned into gather indices: query frames are grouped by identical
    mask rows (a chunk), each group attends to its allowed key frames padded to a common count."""

    query_frames: torch.Tensor  # int64 [G, q]: frames of each query group
    key_frames: torch.Tensor  # int64 [G, k]: allowed key frames (padding repeats frame 0)
    key_valid: torch.Tensor  # bool [G, k]
    inverse: torch.Tensor  # int64 [S]: position of frame s in query_frames.flatten()

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseLayout":
        s = mask.shape[0]
        if mask.shape != (s, s):
            raise ValueError(f"frame mask must be square, got {tuple(mask.shape)}")
        groups: dict[tuple[bool, ...], list[int]] = {}
        for i in range(s):
            groups.setdefault(tuple(mask[i].tolist()), []).append(i)
        sizes = {len(g) for g in groups.values()}
        if len(sizes) != 1:
            raise ValueError(f"query groups of unequal sizes {sorted(sizes)}; use a frame count divisible by the chunk")
        rows = list(groups.items())
        width = max(sum(r) for r, _ in rows)
        keys = torch.zeros(len(rows), width, dtype=torch.int64)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for g, (row, _) in enumerate(rows):
            idx = [j for j, ok in enumerate(row) if ok]
            keys[g, :len(idx)] = torch.tensor(idx)
            valid[g, :len(idx)] = True
        queries = torch.tensor([q for _, q in rows], dtype=torch.int64)
        inverse = torch.empty(s, dtype=torch.int64)
        inverse[queries.flatten()] = torch.arange(s)
        return cls(queries, keys, valid, inverse)


def sparse_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SparseLayout,
                  tokens_per_frame: int) -> torch.Tensor:
    """Attention of q over k, v ([B, S*P, n, d]) restricted by the layout; heads concatenated [B, S*P, n*d]."""
    b, _, n, d = q.shape
    p = tokens_per_frame
    g, nq = layout.query_frames.shape
    nk = layout.key_frames.shape[1]
    frames = lambda t: t.unflatten(1, (-1, p))  # noqa: E731  [B, S, P, n, d]
    qg = frames(q)[:, layout.query_frames].reshape(b * g, nq * p, n, d)
    kg = frames(k)[:, layout.key_frames].reshape(b * g, nk * p, n, d)
    vg = frames(v)[:, layout.key_frames].reshape(b * g, nk * p, n, d)
    bias = mask_to_bias(layout.key_valid.repeat_interleave(p, 1)).to(q.dtype)  # [G, nk*P]
    bias = bias[None, :, None, None, :].expand(b, g, 1, 1, nk * p).reshape(b * g, 1, 1, nk * p)
    out = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=bias)
    out = out.transpose(1, 2).reshape(b, g * nq, p, n * d)[:, layout.inverse]
    return out.flatten(1, 2)


def training_forward(model: WanModel, latents: torch.Tensor, t_frames: torch.Tensor, frame_pos: torch.Tensor,
                     cross_kv: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """WanModel.forward_sequence with one frame mask shared by all layers, attention block-sparse."""
    t = latents.shape[2]
    x, e, e6 = model.embed(latents, t_frames)
    cos, sin = model.rope(model.frame_rope(frame_pos))
    p = model.cfg.tokens_per_frame
    for i, block in enumerate(model.blocks):
        mod = (block.modulation.unsqueeze(1) + e6).chunk(6, dim=2)
        x_in = modulate(block.norm1(x), mod[0], mod[1])
        q, k, v = block.self_attn.project(x_in, cos, sin)
        a = sparse_attend(q, k, v, layout, p)
        x = x + gate(block.self_attn.output(a, x_in, None), mod[2])
        x = x + block.cross_attn(block.norm3(x), cross_kv[i])
        x = x + gate(block.ffn(modulate(block.norm2(x), mod[3], mod[4])), mod[5])
    return model.unpatchify(model.head(x, e), t)


# ----------------------------------------------------------------------------------------------
# Flow-matching batches


def chunk_sigmas(rng: np.random.Generator, batch: int, chunks: int, p_schedule: float = 0.75) -> np.ndarray:
    """[B, chunks] noise levels: a schedule sigma with probability p_schedule, else uniform (0, 1]."""
    sched = np.array(schedule_sigmas())
    pick = sched[rng.integers(len(sched), size=(batch, chunks))]
    uniform = 1.0 - rng.random((batch, chunks))  # (0, 1]
    return np.where(rng.random((batch, chunks)) < p_schedule, pick, uniform)


def flow_inputs(clean: torch.Tensor, sigma_chunks: torch.Tensor, chunk: int, noise: torch.Tensor):
    """[clean; noisy] latents [B, C, 2T, H, W], per-frame timesteps [B, 2T], flow target [B, C, T, H, W].

    clean [B, C, T, H, W], sigma per chunk [B, T/chunk], noise like clean."""
    sig = sigma_chunks.repeat_interleave(chunk, 1)  # [B, T]
    s = sig[:, None, :, None, None]
    noisy = (1 - s) * clean + s * noise
    t_frames = torch.cat([torch.zeros_like(sig), 1000.0 * sig], 1)
    return torch.cat([clean, noisy], 2), t_frames, noise - clean, sig


def memory_weights(samples, weight: float, window: int = 2) -> np.ndarray:
    """[B, 1, T, S, S] float32 loss weights: `weight` on the pixels only an older frame than the last
    `window` shows (VideoSample.memory_pixels: just uncovered by the curtain or the shutter), 1 elsewhere."""
    mem = np.stack([v.memory_pixels(window) for v in samples])[:, None]
    return np.where(mem, np.float32(weight), np.float32(1.0))


def clean_latents(seeds, frames: int) -> torch.Tensor:
    """Videos [B, 3, T, 32, 32] in [-1, 1] from the procedural generator."""
    return torch.from_numpy(video_batch(seeds, frames)).permute(0, 2, 1, 3, 4).contiguous()


class TeacherForcing:
    """The training layout of one model and sequence length: mask, positions, sparse layout."""

    def __init__(self, cfg: WanConfig, frames: int, capacity: int | None = None, sink: int | None = None):
        if frames % cfg.chunk_frames:
            raise UserError(f"train: --frames must be a multiple of chunk_frames={cfg.chunk_frames}, got {frames}")
        self.cfg, self.frames = cfg, frames
        capacity = cfg.max_frames if capacity is None else capacity
        sink = cfg.full_sink if sink is None else sink
        self.mask = teacher_forcing(frames, cfg.chunk_frames, capacity, sink)
        self.layout = SparseLayout.from_mask(self.mask)
        self.positions = torch.arange(frames).repeat(2)

    def predict(self, model: WanModel, clean: torch.Tensor, sigma_chunks: torch.Tensor, noise: torch.Tensor,
                cross_kv: torch.Tensor):
        """(prediction v of the noisy half, target v, per-frame sigma [B, T], noisy half)."""
        lat, t_frames, target, sig = flow_inputs(clean, sigma_chunks, self.cfg.chunk_frames, noise)
        kv = cross_kv.expand(-1, -1, clean.shape[0], -1, -1, -1)
        out = training_forward(model, lat, t_frames, self.positions, kv, self.layout)
        return out[:, :, self.frames:], target, sig, lat[:, :, self.frames:]


# ----------------------------------------------------------------------------------------------
# Training


def init_weights(model: WanModel) -> None:
    """Wan2.1's init_weights: xavier linears with zero bias, small normal embeddings, zero output head
    (the model starts by predicting v = 0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for m in list(model.text_embedding.modules()) + list(model.time_embedding.modules()):
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    torch.nn.init.zeros_(model.head.head.weight)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    q = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int | None = None  # None: chosen from `minutes` after timing the first steps
    minutes: float = 38.0
    frames: int = 24
    batch: int = 1
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.998
    p_schedule: float = 0.75
    # Loss weight of the pixels the curtain or the shutter has just uncovered after hiding them for
    # 2+ frames (1: plain MSE): the only ones a long memory predicts better than the last frames.
    # Without the shutter (the curtain alone, ~3% of the pixels) weight 6 then 20 gave a model that
    # redrew background from memory (x0 error 0.060 vs 0.068 with a 2-frame history) but not objects.
    memory_weight: float = 6.0
    calibrate_steps: int = 25
    log_every: int = 25
    # Two intra-op threads with passive OpenMP waits (set above): 0.82 s/step on an idle 2-core
    # machine vs 1.16 s with one thread; under heavy load one thread is ~1.5x faster, and two
    # spinning threads ~10x slower.
    threads: int = 2
    # Weights to start from instead of Wan's init (a second stage: fresh optimizer, warmup and EMA).
    init: str | None = None
    # Cache capacities (frames) of the teacher-forcing mask, one drawn per step. None: the preset's
    # max_frames. (12, 24) puts both of ispa eval's regimes in the training distribution: a rolling
    # 12-frame cache and a cache holding the whole 24-frame video.
    capacities: tuple[int, ...] | None = None


def train(cfg: TrainConfig, out: Path, log_path: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_cfg = preset(PRESET)
    model = WanModel(model_cfg)
    if cfg.init:
        load_into(model, cfg.init, strict=True)
    else:
        init_weights(model)
    ema = WanModel(model_cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    layouts = [TeacherForcing(model_cfg, cfg.frames, capacity=c) for c in (cfg.capacities or (model_cfg.max_frames,))]
    chunks = cfg.frames // model_cfg.chunk_frames
    rng = np.random.default_rng([cfg.seed, 1])
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    context = demo_context()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "modulation" in name or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    total = cfg.steps
    deadline = cfg.minutes * 60.0
    history: list[dict] = []
    acc = {"loss": 0.0, "x0_sched": 0.0, "x0_mem": 0.0, "n": 0, "n_sched": 0, "n_mem": 0}
    start = time.time()
    step = 0
    stopped_early = False
    t_calib = 0.0
    base_seed = (cfg.seed + 1) * TRAIN_SEED_STRIDE
    while total is None or step < total:
        elapsed = time.time() - start
        if step == 5:
            t_calib = elapsed  # the first steps pay one-off allocation costs: time from step 5
        if total is None and step == cfg.calibrate_steps:
            # Fix the step count once: the run is then reproducible with --steps.
            rate = (step - 5) / (elapsed - t_calib)
            total = max(step + 1, int(step + 0.97 * (deadline - elapsed) * rate))
            print(f"[train] {rate:.3f} steps/s -> {total} steps for {cfg.minutes} min", flush=True)
            if step >= total:
                break
        # The cap guards a step count estimated from --minutes; an explicit --steps always runs to
        # the end, or the weights would depend on the machine's speed.
        if cfg.steps is None and elapsed > 1.15 * deadline and step > cfg.calibrate_steps:
            stopped_early = True
            print(f"[train] wall-time cap reached at step {step}; stopping", flush=True)
            break
        lr = lr_at(step, total or 10**9, cfg.lr, cfg.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        samples = [make_video(base_seed + step * cfg.batch + b, cfg.frames) for b in range(cfg.batch)]
        clean = torch.from_numpy(np.stack([v.frames for v in samples]).transpose(0, 2, 1, 3, 4).copy())
        sig_chunks = torch.from_numpy(chunk_sigmas(rng, cfg.batch, chunks, cfg.p_schedule)).float()
        noise = torch.randn(clean.shape, generator=noise_gen)
        tf = layouts[int(rng.integers(len(layouts)))] if len(layouts) > 1 else layouts[0]
        pred, target, sig, _ = tf.predict(model, clean, sig_chunks, noise, model.cross_kv(context))
        weight = torch.from_numpy(memory_weights(samples, cfg.memory_weight))  # [B, 1, T, S, S]
        sq = (pred - target) ** 2
        loss = (sq * weight).sum() / (weight.sum() * sq.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
            # x0 error on the chunks at schedule sigmas, the units of the evaluation.
            sq0 = sq.detach() * sig[:, None, :, None, None] ** 2
            err = sq0.mean(dim=(1, 3, 4))  # [B, T]
            sched = torch.isin(sig, torch.tensor(schedule_sigmas(), dtype=sig.dtype))
            # The same error on the just-uncovered pixels: it falls only as the model learns to
            # look them up in older frames.
            mem = (weight > 1).expand_as(sq0) & sched[:, None, :, None, None]
        acc["loss"] += loss.item()
        acc["n"] += 1
        if sched.any():
            acc["x0_sched"] += float(err[sched].mean())
            acc["n_sched"] += 1
        if mem.any():
            acc["x0_mem"] += float(sq0[mem].mean())
            acc["n_mem"] += 1
        step += 1
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "lr": lr, "loss_v": acc["loss"] / acc["n"],
                   "x0_mse_schedule": acc["x0_sched"] / max(1, acc["n_sched"]),
                   "x0_mse_uncovered": acc["x0_mem"] / max(1, acc["n_mem"]), "grad_norm": grad_norm,
                   "elapsed_s": round(time.time() - start, 1)}
            history.append(rec)
            print(f"[train] step {step}/{total} loss_v {rec['loss_v']:.4f} x0 {rec['x0_mse_schedule']:.4f} "
                  f"uncovered {rec['x0_mse_uncovered']:.4f} "
                  f"lr {lr:.2e} gn {grad_norm:.2f} {rec['elapsed_s']:.0f}s", flush=True)
            acc = {"loss": 0.0, "x0_sched": 0.0, "x0_mem": 0.0, "n": 0, "n_sched": 0, "n_mem": 0}
        if step % 500 == 0:  # a crash late in the run still leaves usable weights
            save_weights(ema, out, {"step": str(step), "partial": "true"})
    wall = time.time() - start
    meta = {"step": str(step), "seed": str(cfg.seed), "preset": PRESET}
    save_weights(ema, out, meta)
    log = {
        "command": " ".join([Path(sys.executable).name, "-m", "ispa_export.lab.train"] + sys.argv[1:]),
        "preset": PRESET, "model_config": model_cfg.to_dict(),
        "train_config": {**cfg.__dict__, "steps": step}, "stopped_early": stopped_early,
        "init_sha256": sha256(Path(cfg.init)) if cfg.init else None,
        "init_log": _init_log(cfg.init),
        "wall_time_s": round(wall, 1), "steps_per_s": round(step / wall, 4),
        "weights": "ema", "context": f"demo_context(): torch.randn(1, 4, 16) with generator seed {CONTEXT_SEED}",
        "objective": ("flow matching, v = noise - x, per-chunk sigma (p=%.2f one of %s, else U(0,1]), teacher-forcing "
                      "forward over [clean; noisy], mask teacher_forcing(T, 2, C, 0) on every layer, C drawn from %s "
                      "per step; loss = MSE of v, pixels just uncovered by the curtain or shutter (memory_pixels(2)) "
                      "weighted %g" % (cfg.p_schedule, [round(s, 4) for s in schedule_sigmas()],
                                       list(cfg.capacities or (model_cfg.max_frames,)), cfg.memory_weight)),
        "train_video_seeds": f"{base_seed} + step * batch + b",
        "history": history,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "machine": platform.machine(),
        "weights_file": out.name, "weights_sha256": sha256(out),
    }
    write_json(log_path, log)
    return log


def _capacities(text: str | None, frames: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        caps = tuple(int(c) for c in text.split(","))
    except ValueError:
        caps = ()
    cfg = preset(PRESET)
    if not caps or any(c < cfg.chunk_frames or c % cfg.chunk_frames or c > frames for c in caps):
        raise UserError(f"train: --capacities expects comma-separated multiples of {cfg.chunk_frames} up to "
                        f"--frames={frames}, found {text!r}")
    return caps


def _init_log(init: str | None) -> dict | None:
    """The training log beside the --init weights (<stem>_training.json), so that a staged run's
    log holds every stage's command."""
    if not init:
        return None
    path = Path(init).with_name(Path(init).stem + "_training.json")
    return json.loads(path.read_text()) if path.is_file() else None


def save_weights(model: WanModel, out: Path, metadata: dict[str, str]) -> None:
    save_state_dict(model, out, metadata=metadata)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# "Meaningfully trained" checks


def heldout_x0_error(model: WanModel, seeds=HELDOUT_SEEDS[:8], frames: int = 24, noise_seed: int = 0,
                     batch: int = 4, sigmas: list[float] | None = None, capacity: int | None = None) -> dict:
    """x0 error of the model on unseen videos, per schedule sigma, against copy-last-frame predictors.

    Every chunk after the first is noised at sigma and predicted with its clean history (the
    teacher-forcing forward, i.e. what the stream computes); x0 = noisy - sigma * v. Baselines in the
    same units (mean squared error per pixel and channel, same chunks):
    - `copy_history`: both frames of a chunk predicted as the last clean frame before it (the
      information the model has at sigma = 1);
    - `copy_previous`: each frame predicted as the frame just before it (sees one frame more).
    `capacity`: the cache the history is seen through (default the preset's 12 frames).
    """
    cfg = preset(PRESET)
    tf = TeacherForcing(cfg, frames, capacity=capacity)
    f = cfg.chunk_frames
    sigmas = schedule_sigmas() if sigmas is None else list(sigmas)
    chunks = frames // f
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        kv = model.cross_kv(demo_context())
        for i in range(0, len(seeds), batch):
            clean = clean_latents(seeds[i:i + batch], frames)
            b = clean.shape[0]
            gen = torch.Generator().manual_seed(noise_seed + i)
            noise = torch.randn(clean.shape, generator=gen)
            for s in sigmas:
                pred, _, _, noisy = tf.predict(model, clean, torch.full((b, chunks), s), noise, kv)
                x0 = noisy - s * pred
                err = ((x0 - clean) ** 2)[:, :, f:].mean().item()
                sums[f"model_sigma_{s:.4f}"] = sums.get(f"model_sigma_{s:.4f}", 0.0) + err * b
            last = clean[:, :, f - 1:frames - 1:f].repeat_interleave(f, 2)  # last history frame per chunk
            sums["copy_history"] = sums.get("copy_history", 0.0) + ((last - clean[:, :, f:]) ** 2).mean().item() * b
            prev = ((clean[:, :, f - 1:-1] - clean[:, :, f:]) ** 2).mean().item()
            sums["copy_previous"] = sums.get("copy_previous", 0.0) + prev * b
            count += b
    out = {k: v / count for k, v in sums.items()}
    out["model_mean"] = float(np.mean([out[f"model_sigma_{s:.4f}"] for s in sigmas]))
    out["videos"], out["frames"] = count, frames
    return out


def uncovered_x0_error(model: WanModel, seeds=HELDOUT_SEEDS[:8], frames: int = 24, window: int = 2,
                       sigma: float = 1.0, noise_seed: int = 0, batch: int = 4) -> dict:
    """One-step x0 error on the pixels the curtain or shutter has just uncovered (VideoSample.memory_pixels(
    window): hidden in the last `window` frames), with the full M-frame history vs a `window`-frame
    one (every layer), same noise. Only an older frame shows those pixels, so the gap between the
    two is the model's use of its memory; `copy_history` repeats the last history frame there."""
    cfg = model.cfg
    f = cfg.chunk_frames
    chunks = frames // f
    full, short = TeacherForcing(cfg, frames), TeacherForcing(cfg, frames, capacity=window, sink=0)
    sums = {"full_history": 0.0, "window_history": 0.0, "copy_history": 0.0}
    count = 0
    with torch.no_grad():
        kv = model.cross_kv(demo_context())
        for i in range(0, len(seeds), batch):
            samples = [make_video(int(s), frames) for s in seeds[i:i + batch]]
            mem = torch.from_numpy(np.stack([v.memory_pixels(window) for v in samples]))[:, None]  # [B,1,T,S,S]
            mem[:, :, :f] = False  # the first chunk has no history
            mem = mem.expand(-1, cfg.in_dim, -1, -1, -1)
            if not mem.any():
                continue
            clean = torch.from_numpy(np.stack([v.frames for v in samples]).transpose(0, 2, 1, 3, 4).copy())
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(noise_seed + i))
            sig = torch.full((len(samples), chunks), sigma)
            for name, tf in (("full_history", full), ("window_history", short)):
                pred, _, _, noisy = tf.predict(model, clean, sig, noise, kv)
                sums[name] += float(((noisy - sigma * pred - clean) ** 2)[mem].sum())
            last = clean[:, :, f - 1:frames - 1:f].repeat_interleave(f, 2)
            last = torch.cat([clean[:, :, :f], last], 2)
            sums["copy_history"] += float(((last - clean) ** 2)[mem].sum())
            count += int(mem.sum())
    if not count:
        raise UserError(f"uncovered_x0_error: no uncovered pixels in the videos of seeds {list(seeds)}")
    out = {k: v / count for k, v in sums.items()}
    out.update(values=count, videos=len(seeds), frames=frames, window_frames=window, sigma=sigma)
    return out


def teacher_forced_samples(model: WanModel, videos: np.ndarray, noise_seed: int, capacity: int | None = None,
                           sink: int = 0) -> np.ndarray:
    """Every chunk of videos [B, F, 3, S, S] sampled by the few-step sampler given the TRUE earlier
    frames (as many as a cache of `capacity` frames keeps, default M), with the stream's noise.

    This is what the stream produces for chunk c after teacher-forcing chunks 0..c-1 (every chunk at
    once, in 4 sequence forwards): it measures the use of history without free-run drift. With a
    capacity of s + w frames it is the stream with every layer local (window w, sink s)."""
    cfg = model.cfg
    f = cfg.chunk_frames
    b, frames = videos.shape[:2]
    tf = TeacherForcing(cfg, frames, capacity=capacity, sink=sink)
    clean = torch.from_numpy(np.ascontiguousarray(videos.transpose(0, 2, 1, 3, 4)))
    shape = (b, cfg.in_dim, f, cfg.latent_height, cfg.latent_width)
    noise = lambda k: torch.from_numpy(np.concatenate(  # noqa: E731
        [chunk_noise(noise_seed, c, k, shape) for c in range(frames // f)], axis=2))
    ts = warped_timesteps()
    noisy = noise(0)
    with torch.no_grad():
        kv = model.cross_kv(demo_context(b))
        for k, t in enumerate(ts):
            lat = torch.cat([clean, noisy], 2)
            t_frames = torch.cat([torch.zeros(b, frames), torch.full((b, frames), t)], 1)
            pred = training_forward(model, lat, t_frames, tf.positions, kv, tf.layout)[:, :, frames:]
            x0 = noisy - t / 1000.0 * pred
            if k + 1 < len(ts):
                s = ts[k + 1] / 1000.0
                noisy = (1 - s) * x0 + s * noise(k + 1)
    return x0.numpy().transpose(0, 2, 1, 3, 4)


def rollout(model: WanModel, video: np.ndarray, given_chunks: int, noise_seed: int, *,
            window: int | None = None) -> np.ndarray:
    """Stream videos [F, 3, S, S] or [B, F, 3, S, S] (one batched stream): the first `given_chunks` chunks
    teacher-forced from `video` (stored in the cache as given), the rest free-run; every layer full,
    or with `window` every layer local with that many recent frames. Returns frames of the same
    shape (given ones included); the model's layout is left as it was."""
    single = video.ndim == 4
    videos = video[None] if single else video
    f = model.cfg.chunk_frames
    before = list(model.layout)
    model.set_layout([None if window is None else Span(0, window)] * model.cfg.num_layers)
    try:
        stream = torch_stream(model, demo_context(len(videos)), noise_seed)
        out = []
        for c in range(videos.shape[1] // f):
            given = videos[:, c * f:(c + 1) * f].transpose(0, 2, 1, 3, 4) if c < given_chunks else None
            out.append(stream.step(given=given).transpose(0, 2, 1, 3, 4))
    finally:
        model.set_layout(before)
    frames = np.concatenate(out, 1)
    return frames[0] if single else frames


def rollout_error(model: WanModel, seeds=HELDOUT_SEEDS[:6], frames: int = 24, given_chunks: int = 3,
                  noise_seed: int = 0) -> dict:
    """MSE to the true continuation of free-run frames after a teacher-forced start, vs repeating the
    last given frame; per free-run chunk (horizon) and overall."""
    f = model.cfg.chunk_frames
    start = given_chunks * f
    videos = video_batch(seeds, frames)
    gen = rollout(model, videos, given_chunks, noise_seed)
    gen_err = ((gen[:, start:] - videos[:, start:]) ** 2).mean(axis=(0, 2, 3, 4))
    copy_err = ((videos[:, start - 1:start] - videos[:, start:]) ** 2).mean(axis=(0, 2, 3, 4))
    horizon = lambda e: [round(float(e[i:i + f].mean()), 5) for i in range(0, len(e), f)]  # noqa: E731
    return {"model": float(gen_err.mean()), "copy_last_given": float(copy_err.mean()),
            "model_by_chunk": horizon(gen_err), "copy_by_chunk": horizon(copy_err),
            "finite": bool(np.isfinite(gen).all()), "max_abs": float(np.abs(gen).max()),
            "videos": len(seeds), "frames": frames, "given_chunks": given_chunks}


def return_crops(seeds, given: int, lead: int, span: int = 4, k: int = 6, source_frames: int = 64):
    """(seed, crop) pairs: from each seed's video, the `given + lead + span` frames that put its first
    return (VideoSample.returns(k)) with enough history before it at frame `given + lead`; seeds
    without one are skipped."""
    out = []
    for s in seeds:
        v = make_video(int(s), source_frames)
        for t0 in sorted({t for _, t in v.returns(k) if given + lead <= t <= source_frames - span}):
            crop = v.crop(t0 - given - lead, t0 + span)
            if any(t == given + lead for _, t in crop.returns(k)):  # seen within the crop before it left
                out.append((int(s), crop))
                break
    return out


def recall_comparison(model: WanModel, seeds=HELDOUT_SEEDS[:16], given_chunks: int = 8, lead_chunks: int = 2,
                      window: int = 2, k: int = 6, noise_seed: int = 0) -> dict:
    """identity_recall of rollouts with every layer full (cache M frames) vs every layer local with a
    `window`-frame cache (no sink), on the same videos, teacher-forced start and noise.

    Each video is cut (return_crops) so that an object returns `lead_chunks` chunks after the
    teacher-forced start: the rollout free-runs across the end of the absence (for a shutter, its
    last frames) and must redraw what comes back. Starting the free run right before the return
    keeps the rollout on the true video (a free run diverges from it within a few chunks, after
    which scoring against the truth measures luck). Only free-run frames are scored.
    `copy_last_given`: the score of repeating the last given frame. 'teacher_forced_*': the same with
    the true history before every chunk (no drift at all). 'unseen_part': the scores on only the
    pixels of returning objects that the last `window` frames do not show (curtain or shutter)."""
    f = model.cfg.chunk_frames
    start, lead = given_chunks * f, lead_chunks * f
    crops = return_crops(seeds, start, lead, span=f * 2, k=k)
    if not crops:
        raise UserError(f"recall_comparison: no video among seeds {list(seeds)} has a return after frame {start + lead}")
    videos = np.stack([v.frames for _, v in crops])
    gf = rollout(model, videos, given_chunks, noise_seed)
    gl = rollout(model, videos, given_chunks, noise_seed, window=window)
    tf_full = teacher_forced_samples(model, videos, noise_seed)
    tf_local = teacher_forced_samples(model, videos, noise_seed, capacity=window, sink=0)
    held = np.concatenate([videos[:, :start], np.repeat(videos[:, start - 1:start], videos.shape[1] - start, 1)], 1)
    gens = {"full": gf, "window": gl, "teacher_forced_full": tf_full, "teacher_forced_window": tf_local,
            "copy_last_given": held}

    def scores(gen: np.ndarray, unseen: bool = False) -> np.ndarray:
        return np.array([identity_recall(g, v, k=k, frames_from=start,
                                         pixels=v.memory_pixels(window) if unseen else None)
                         for g, (_, v) in zip(gen, crops)])

    full, local, tf_f, tf_l, copy = (scores(g) for g in gens.values())
    mse = lambda g: float(((g[:, start:] - videos[:, start:]) ** 2).mean())  # noqa: E731
    # Which videos have such pixels depends on the video only, not on what was generated.
    unseen_scores = {n: scores(g, unseen=True) for n, g in gens.items() if n != "copy_last_given"}
    scored = np.isfinite(unseen_scores["full"])
    unseen = {n: float(sc[scored].mean()) if scored.any() else float("nan") for n, sc in unseen_scores.items()}
    unseen["videos"] = int(scored.sum())
    return {"full": float(full.mean()), "window": float(local.mean()),
            "copy_last_given": float(copy.mean()),
            "full_better_in": int((full > local).sum()), "window_better_in": int((full < local).sum()),
            "videos": len(crops), "mse_full": mse(gf), "mse_window": mse(gl),
            "teacher_forced_full": float(tf_f.mean()), "teacher_forced_window": float(tf_l.mean()),
            "teacher_forced_full_better_in": int((tf_f > tf_l).sum()),
            "teacher_forced_window_better_in": int((tf_f < tf_l).sum()),
            "teacher_forced_mse_full": mse(tf_full), "teacher_forced_mse_window": mse(tf_local),
            "unseen_part": unseen,
            "per_video": {str(s): [round(float(a), 4), round(float(b), 4)] for (s, _), a, b in zip(crops, full, local)},
            "window_frames": window, "given_frames": start, "lead_frames": lead, "frames": int(videos.shape[1]),
            "k": k}


def evaluate(model: WanModel, quick: bool = False) -> dict:
    t0 = time.time()
    if quick:
        res = {"heldout_x0": heldout_x0_error(model, HELDOUT_SEEDS[:4]),
               "uncovered_x0": uncovered_x0_error(model, HELDOUT_SEEDS[:4]),
               "rollout": rollout_error(model, HELDOUT_SEEDS[:2]),
               "identity_recall": recall_comparison(model, HELDOUT_SEEDS[:6])}
    else:
        res = {"heldout_x0": heldout_x0_error(model, HELDOUT_SEEDS[:32]),
               "uncovered_x0": uncovered_x0_error(model, HELDOUT_SEEDS[:32]),
               "rollout": rollout_error(model, HELDOUT_SEEDS[:16], frames=32),
               "identity_recall": recall_comparison(model, HELDOUT_SEEDS[:48])}
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ispa_export.lab.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--log", type=Path, default=None, help="training log JSON (default: <out>_training.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=38.0, help="wall-time budget (sets --steps after timing)")
    ap.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--memory-weight", type=float, default=6.0,
                    help="loss weight of pixels just uncovered by the curtain or shutter (only older frames show them)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (1 is faster on a busy CPU)")
    ap.add_argument("--init", type=Path, help="start from these demo weights (a later training stage)")
    ap.add_argument("--capacities", default=None,
                    help="comma-separated cache capacities in frames, one drawn per step (default: the preset's)")
    ap.add_argument("--eval", action="store_true", help="after training, run the full checks into the log")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights at --out, update the log")
    args = ap.parse_args(argv)
    log_path = args.log or args.out.with_name(args.out.stem + "_training.json")
    if args.eval_only:
        if not args.out.exists():
            raise UserError(f"{args.out}: no such weights file (expected a trained demo checkpoint)")
        torch.set_num_threads(args.threads)
        model = load_demo_model(args.out)
        res = evaluate(model)
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        log["evaluation"] = res
        write_json(log_path, log)
        print(json.dumps(res, indent=1))
        return 0
    if (args.frames < 2 or args.batch < 1 or (args.steps is not None and args.steps < 1) or args.minutes <= 0
            or args.memory_weight <= 0):
        raise UserError("train: --frames >= 2, --batch >= 1, --steps >= 1, --minutes > 0 and --memory-weight > 0 "
                        "expected")
    cfg = TrainConfig(seed=args.seed, steps=args.steps, minutes=args.minutes, frames=args.frames, batch=args.batch,
                      lr=args.lr, warmup=args.warmup, threads=args.threads,
                      init=str(args.init) if args.init else None,
                      memory_weight=args.memory_weight, capacities=_capacities(args.capacities, args.frames))
    log = train(cfg, args.out, log_path)
    print(f"[train] wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {log['wall_time_s']:.0f}s")
    if args.eval:
        torch.set_num_threads(args.threads)
        res = evaluate(load_demo_model(args.out))
        log["evaluation"] = res
        write_json(log_path, log)
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
