"""The Python API a pipeline embeds: a deployment opened once, then one call per video.

    import ispa_export
    dep = ispa_export.Deployment.open("artifacts/demo", backend="ort", device="cpu")
    video = dep.start(context, seed=7)          # absorb: warmup in PyTorch, solve, gates, swap
    for latents in video.chunks(40):            # [B, C, f, H, W] each, the warmup's chunks first
        ...                                     # or video.pixels(40): decoded (DEPLOY built with --vae)

The video is the torch-free half's (runtimes.deployment.Video: `chunks`, `pixels`, `seconds`).
`open` loads the deployment's PyTorch weights (for the per-video warmup) and its engine (ONNX
Runtime session, TensorRT engine, or the PyTorch module itself) once. `start` absorbs one video in
memory (video.absorb) and hands its caches and modulation to a stream of its own on that engine:
several videos may be open on one deployment, stepped interleaved or from different threads, each
equal to its solo run. `start(instance=DIR)` continues a video absorbed earlier (`ispa absorb`).
The torch-free half is runtimes.deployment; this adds what needs PyTorch: the absorb and the
PyTorch backend.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from runtimes import deployment as rt
from runtimes.artifact import Artifact, load_artifact
from runtimes.deployment import Video
from runtimes.files import sha256_file
from runtimes.instance import Instance, load_instance

from .errors import UserError
from .models import BAKED, load_baked, resolve_device, warmup_dtype
from .video.modulation import absorptions_from, torch_inputs, with_corrections
from .video.absorb import Absorbed, CorrectionRule, absorb, instance_arrays, write_instance
from .video.torch_runner import TORCH_DTYPES, TorchRunner

BACKENDS = ("torch", "ort", "trt")


class Deployment:
    """A deployment opened once: the PyTorch weights for absorbs, and the engine for the chunks."""

    def __init__(self, artifact: Artifact, model: torch.nn.Module, runtime: rt.Deployment | None, device: torch.device):
        self.artifact = artifact
        self.model = model  # base weights on the deployment's layout, zero corrections, in the warmup dtype
        self.runtime = runtime
        self.device = device
        self.layout = artifact.geometry.layout
        self.rule = CorrectionRule.from_dict(artifact.manifest["correction"])
        self.identity = sha256_file(artifact.manifest_path)
        self._torch_model: torch.nn.Module | None = None

    @classmethod
    def open(cls, directory: str | Path, backend: str | None = "ort", device: str | None = None, *,
             compile: bool = False, providers: list[str] | None = None, threads: int | None = None,
             engine: str | Path | None = None, verify_checksums: bool = True) -> "Deployment":
        """Validate DEPLOY, load its weights for absorbs on `device` (default: cuda when PyTorch sees
        one) and its engine for `backend` (torch | ort | trt; None: absorb only)."""
        if backend is not None and backend not in BACKENDS:
            raise UserError(f"--backend: expected one of {list(BACKENDS)}, got {backend!r}")
        dev = resolve_device(device)
        if backend in ("ort", "trt"):
            runtime = rt.Deployment.open(directory, backend, providers=providers, threads=threads, engine=engine,
                                         verify_checksums=verify_checksums)
            art = runtime.artifact
        else:
            art = load_artifact(directory, verify_checksums=verify_checksums, check_onnx=False)
            runtime = None
        from graphs.config import WanConfig

        cfg = WanConfig.from_dict(art.manifest["model"]["config"])
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[art.geometry.dtype]
        model = load_baked(cfg, art.directory / BAKED).to(dev).cast(warmup_dtype(dev, dtype))
        dep = cls(art, model, runtime, dev)
        if backend == "torch":
            # The PyTorch step runs in the graph's dtype (on a CPU the warmup runs in float32).
            step_model = model if next(model.parameters()).dtype == TORCH_DTYPES[art.geometry.dtype] else \
                load_baked(cfg, art.directory / BAKED).to(dev).cast(TORCH_DTYPES[art.geometry.dtype])
            dep._torch_model = step_model
            forward = torch.compile(step_model) if compile else None
            dep.runtime = rt.Deployment(art, "torch", lambda: TorchRunner(step_model, dev, forward=forward), step_model,
                                        convert=dep.runner_for)
        return dep

    # -- per video ---------------------------------------------------------------------------------
    def default_context(self, seed: int = 0) -> torch.Tensor:
        """The model's default text embeddings (the demo's fixed prompt; seeded noise for a preset
        without one), what `ispa absorb` uses without --context or --prompt."""
        from .models import load_context

        return load_context(None, self.artifact.manifest["model"]["preset"], self.model.cfg, seed)[0]

    def absorb(self, context: torch.Tensor, seed: int, progress: Callable[[int], None] | None = None) -> Absorbed:
        """One video's warmup, solve and gates, in memory (nothing is traced or written)."""
        self.check_context(context)
        ctx = context.to(self.device, next(self.model.parameters()).dtype)
        return absorb(self.model, self.layout, ctx, seed, self.rule, modulation=self.artifact.modulation,
                      dtype=self.artifact.geometry.dtype, progress=progress)

    def write(self, absorbed: Absorbed, out: str | Path, *, context_source: str = "given",
              extras: dict[str, Callable[[Path], object]] | None = None, atomic: bool = True) -> dict:
        """Store an absorbed video as INSTANCE/ (`ispa absorb --out`); returns instance.json."""
        return write_instance(absorbed, Path(out), deployment=self.artifact.directory, deployment_sha256=self.identity,
                              dtype=self.artifact.geometry.dtype, context_source=context_source, extras=extras,
                              atomic=atomic)

    def start(self, context: torch.Tensor | None = None, seed: int | None = None, *,
              instance: str | Path | None = None, progress: Callable[[int], None] | None = None) -> Video:
        """A video on the engine: absorbed now from (`context`, `seed`), or continued from an
        `instance` directory. Each video has its own caches and modulation."""
        if self.runtime is None:
            raise UserError("Deployment.open(..., backend=None) absorbs only; open it with a backend to run videos")
        if instance is not None:
            return self.runtime.start(load_instance(instance, self.artifact))
        if context is None or seed is None:
            raise UserError("Deployment.start: expected a context and a seed (or instance=DIR)")
        absorbed = self.absorb(context, seed, progress)
        t0 = time.perf_counter()
        video = self._hand_over(absorbed)
        video.seconds.update({k: v for k, v in absorbed.seconds.items() if not isinstance(v, list)})
        video.seconds["swap"] = time.perf_counter() - t0
        return video

    def runner_for(self, tensors: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray] | None]:
        """(a runner of its own or None: the engine's usual one, the modulation as that runner takes
        it or None: as the graph names it). The PyTorch step takes W_o' and b_o' per step, so one model
        serves every video; the variants without that form get their own copy of the L-layers."""
        if self.runtime is None or self.runtime.backend != "torch":
            return None, None
        inputs = torch_inputs(self._torch_model, self.artifact.modulation, tensors)
        if inputs is not None:
            return None, inputs
        own = with_corrections(self._torch_model, absorptions_from(self._torch_model, tensors))
        return TorchRunner(own, self.device), {}

    def _hand_over(self, absorbed: Absorbed) -> Video:
        """The absorbed stream to the engine: on PyTorch in the same device and dtype its buffers go on
        as they are (no copy of the caches); otherwise they pass through the host once."""
        runner, consts = self.runner_for(absorbed.modulation)
        stream = absorbed.stream
        same = (self.runtime.backend == "torch" and stream.geo.dtype == self.artifact.geometry.dtype
                and stream.buffers.device == self.device)
        instance = Instance(None, {"deployment_manifest_sha256": self.identity, "seed": absorbed.seed},
                            {} if same else instance_arrays(absorbed, self.artifact.geometry.dtype),
                            sorted(absorbed.modulation))
        if same:
            model = self._torch_model if runner is None else runner.model
            stream.use(TorchRunner(model, self.device, buffers=stream.buffers), consts)
            stream.keep_latents, stream.latents = False, []
            return self.runtime.adopt(instance, stream, absorbed.warmup_latents)
        return self.runtime.start(instance, constants=consts, runner=runner) if consts is not None or runner \
            else self.runtime.start(instance)

    @staticmethod
    def check_context(context: Any) -> None:
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or not context.is_floating_point():
            found = type(context).__name__ if not isinstance(context, torch.Tensor) else \
                f"{str(context.dtype).removeprefix('torch.')}{list(context.shape)}"
            raise UserError(f"context: expected float text embeddings [B, tokens, text_dim], found {found}")


