"""One deployment, many videos, without PyTorch: the engine loaded once, a stream per video.

    dep = Deployment.open("DEPLOY", backend="ort")          # validate, load the session/engine once
    video = dep.start("INSTANCE")                           # this video's caches and modulation
    for latents in video.chunks(100): ...                   # [B, C, f, H, W] per chunk, the warmup's first
    # or video.pixels(100): the chunks decoded by DEPLOY's VAE decoder (built with --vae)

Three lifetimes, three objects (onnxruntime-genai's Model / GeneratorParams / Generator): the
`Deployment` holds the validated manifest and the engine (an onnxruntime session, a TensorRT
engine); each `Video` holds a runner of its own (an IOBinding, or an execution context) with its
own device buffers (caches, text K/V, modulation) and a `Stream` over them. Videos of one
deployment are independent: they may be stepped interleaved, or from different threads, and each
gives what it gives alone. The one exception is a baked deployment on TensorRT: its modulation
is the engine's weights (a refit), so it holds one video at a time (build with
`--modulation input` to serve several).
"""
from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .artifact import Artifact, ArtifactError, load_artifact
from .driver import Stream
from .errors import RunError
from .instance import Instance, load_instance

BACKENDS = ("ort", "trt")


class BackendError(RuntimeError):
    """The requested backend cannot run here (not installed, no GPU); reported as one line."""


@dataclass
class Video:
    """One video on a deployment: the warmup's latents (made before the handover), then its stream on
    the engine, positioned after the warmup."""

    deployment: "Deployment"
    instance: Instance
    stream: Stream
    first_chunk: int  # the stream's chunk where the instance handed over
    warmup: np.ndarray  # [B, C, T, H, W]: every frame before the engine's first chunk
    seconds: dict[str, float] = field(default_factory=dict)  # an in-process absorb's, and the first engine chunk
    _next: int = 0  # chunks taken by `chunks`/`pixels`, the warmup's included
    _decoder: Any = None  # runtimes.decoder, from the first `pixels` call: it must see every chunk
    _closed: bool = False

    @property
    def warmup_chunks(self) -> int:
        return self.warmup.shape[2] // self.stream.geo.chunk_frames

    def step(self) -> np.ndarray:
        """The engine's next chunk [B, C, f, H, W] (float32, on the host); the warmup's are not among
        them (`chunks` yields the whole video)."""
        return self.stream.step()

    def chunks(self, n: int) -> Iterator[np.ndarray]:
        """The video's next `n` chunks in order: the warmup's first (made already), then the engine's,
        each as soon as it is made."""
        if self._decoder is not None:
            raise RunError("Video.chunks: this video yields pixels (Video.pixels), whose decoder must see every "
                           "chunk; take one of them per video")
        return self._latents(n)

    def pixels(self, n: int) -> Iterator[np.ndarray]:
        """The video's next `n` chunks decoded, float32 [B, 3, T, H, W] in [-1, 1] (T = 1 + 4(f-1) for
        the video's first chunk, 4f after): DEPLOY's exported VAE decoder (`ispa build --vae`) with
        caches of this video's own carried from chunk to chunk, as `ispa run` writes video.mp4."""
        if self._decoder is None:
            taken = self._next + self.stream.chunk - self.first_chunk
            if taken:
                raise RunError(f"Video.pixels: expected a video whose chunks have not been taken as latents, "
                               f"found {taken} taken (Video.chunks, Video.step): the decoder must see every chunk")
            self._decoder = self.deployment.decoder()
        return (self._decoder.decode_chunk(z) for z in self._latents(n))

    def _latents(self, n: int) -> Iterator[np.ndarray]:
        f = self.stream.geo.chunk_frames
        for _ in range(n):
            if self._next < self.warmup_chunks:
                out = self.warmup[:, :, self._next * f:(self._next + 1) * f]
            else:
                t0 = time.perf_counter()
                out = self.stream.step()
                self.seconds.setdefault("first_engine_chunk", time.perf_counter() - t0)
            self._next += 1
            yield out

    def state(self) -> dict[str, np.ndarray]:
        """What a snapshot keeps: the stream's state less what the instance and the frames hold."""
        static = {"latents", *self.stream.static_inputs}
        return {k: v for k, v in self.stream.state_arrays().items() if k not in static}

    def restore(self, snapshot: dict[str, np.ndarray]) -> None:
        """Back to a snapshot's state (its fixed parts come from the instance)."""
        self.stream.load_state({**self.instance.state, **snapshot})

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.deployment._release(self)
            getattr(self._decoder, "close", lambda: None)()  # TensorRT's frees its device buffers now


@dataclass
class Deployment:
    """A validated deployment and its engine, shared by every video started on it."""

    artifact: Artifact
    backend: str
    make_runner: Callable[[], Any]  # one runner per video, over the shared engine
    engine: Any = None  # OrtSession, TrtEngine, or the backend's own (the PyTorch model)
    refit: Callable[[dict[str, np.ndarray]], object] | None = None  # baked TensorRT: swap the weights
    # The backend's own form of a video's modulation: tensors by graph name -> (runner or None, constants
    # or None); the PyTorch backend's (ispa_export.Deployment.runner_for). None: the graph's names as they are.
    convert: Callable[[dict[str, np.ndarray]], tuple[Any, dict[str, np.ndarray] | None]] | None = None
    providers: list[str] | None = None  # ONNX Runtime's, for the exported VAE decoder too
    threads: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _active: list[Video] = field(default_factory=list)
    _decoder_sessions: tuple[dict[str, Any], dict[str, Any]] | None = None  # (record, sessions), loaded once

    @classmethod
    def open(cls, directory: str | os.PathLike, backend: str = "ort", *, providers: list[str] | None = None,
             threads: int | None = None, engine: str | os.PathLike | None = None,
             verify_checksums: bool = True) -> "Deployment":
        """Validate DEPLOY and load its engine once. ArtifactError / BackendError are one line."""
        if backend not in BACKENDS:
            raise BackendError(f"backend {backend!r}: expected one of {list(BACKENDS)} (PyTorch: ispa_export.Deployment)")
        check_onnx = backend == "ort" and importlib.util.find_spec("onnx") is not None
        art = load_artifact(directory, verify_checksums=verify_checksums, check_onnx=check_onnx)
        if backend == "ort":
            return cls._ort(art, providers, threads)
        return cls._trt(art, engine)

    @classmethod
    def _ort(cls, art: Artifact, providers: list[str] | None, threads: int | None) -> "Deployment":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"backend ort: onnxruntime is not importable ({e}); pip install onnxruntime") from None
        from .ort import OrtRunner, OrtSession

        if providers:
            unknown = [p for p in providers if p not in ort.get_available_providers()]
            if unknown:
                raise BackendError(f"backend ort: providers {unknown} are not available; this onnxruntime has "
                                   f"{ort.get_available_providers()}")
        try:
            session = OrtSession(art.onnx_path, providers=providers, threads=threads)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            msg = " ".join(str(e).split())[:300]
            raise ArtifactError(f"{art.onnx_path}: expected a model onnxruntime can load, found: {msg}") from None
        check_runner_io(session, art, art.onnx_path)
        return cls(art, "ort", lambda: OrtRunner(session), session, providers=providers, threads=threads)

    @classmethod
    def _trt(cls, art: Artifact, engine: str | os.PathLike | None) -> "Deployment":
        path = Path(engine) if engine else art.engine_path()
        if (path is None or not path.is_file()) and importlib.util.find_spec("tensorrt") is None:
            raise BackendError("backend trt: TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and "
                               "driver), then build the engine with `ispa engine DEPLOY`; or use --backend ort")
        if path is None or not path.is_file():
            raise ArtifactError(f"{path or art.directory}: expected a TensorRT engine (*.engine or *.plan listed in "
                                f"manifest.json files, or --engine PATH), found none; build one with `ispa engine`")
        try:
            from .trt import TrtEngine, TrtRunner

            shared = TrtEngine(path)
        except (ImportError, RuntimeError) as e:
            raise BackendError(f"backend trt: {' '.join(str(e).split())}") from None
        except ValueError as e:
            raise ArtifactError(" ".join(str(e).split())) from None
        probe = TrtRunner(shared)
        check_runner_io(probe, art, path)
        refit = shared.refit if art.modulation == "baked" else None
        if refit is not None:
            names = set(art.manifest.get("refit_names") or [])
            lost = sorted(names - shared.refittable())
            if lost:
                raise ArtifactError(f"{path}: refittable weights: expected the manifest's refit_names, found {lost[:3]} "
                                    "not refittable (rebuild the engine with `ispa engine`)")
        runners = [probe]  # the probe's context serves the first video

        def make_runner():
            return runners.pop() if runners else TrtRunner(shared)

        return cls(art, "trt", make_runner, shared, refit)

    # -- videos --------------------------------------------------------------------------------
    def start(self, instance: str | os.PathLike | Instance, *, keep_latents: bool = False,
              verify_checksums: bool = True, constants: dict[str, np.ndarray] | None = None,
              runner: Any = None) -> Video:
        """A video from its instance (a directory from `ispa absorb`, or one already loaded): its own
        runner and buffers, the caches and modulation uploaded once. `constants` replaces the
        instance's modulation as the runner takes it, `runner` the engine's usual runner (both: the
        PyTorch backend's forms)."""
        if not isinstance(instance, Instance):
            instance = load_instance(instance, self.artifact, verify_checksums=verify_checksums)
        elif instance.record.get("deployment_manifest_sha256") != self.identity:
            raise ArtifactError(f"{instance.record_path}: deployment_manifest_sha256: expected {self.identity} "
                                f"({self.artifact.manifest_path}), found {instance.record.get('deployment_manifest_sha256')}")
        with self._lock:
            if self.refit is not None and self._active:
                raise RunError(f"{self.artifact.directory}: a baked deployment on TensorRT holds one video at a time "
                               f"(its correction is the engine's weights); close the other video, or build with "
                               f"--modulation input to serve several")
            if constants is None and runner is None and self.convert is not None:
                runner, constants = self.convert(instance.constants)
            runner = runner if runner is not None else self.make_runner()
            consts = instance.constants if constants is None else constants
            if self.refit is not None:
                self.refit(consts)
                consts = {}
            stream = Stream(runner, self.artifact.geometry, instance.cross_kv, instance.seed, constants=consts,
                            keep_latents=keep_latents)
            stream.load_state(instance.state)
            video = Video(self, instance, stream, stream.chunk, instance.state["latents"])
            self._active.append(video)
        return video

    def decoder(self) -> Any:
        """A streaming decoder for one video (runtimes.decoder: its own caches, allocated once) of DEPLOY's
        exported VAE decoder: TensorRT engines where the backend is trt and they were built beside the
        graphs, else ONNX Runtime, whose two sessions are loaded once and shared by every video's decoder."""
        art = self.artifact
        if art.decoder is None:
            raise ArtifactError(f"{art.manifest_path}: decoder: expected the VAE decoder a pixel stream needs "
                                f"(build with --vae DIR), found none")
        from .decoder import GRAPHS, StreamDecoder, TrtStreamDecoder, decoder_sessions, load_record

        directory = art.decoder_dir
        engines = {g: Path(art.decoder["graphs"][g]).with_suffix(".engine").name for g in GRAPHS}
        try:  # the files' sha256 were checked when the deployment was opened (manifest `files`)
            if self.backend == "trt" and all((directory / e).is_file() for e in engines.values()):
                return TrtStreamDecoder(directory, engines=engines, verify=False)
            with self._lock:
                if self._decoder_sessions is None:
                    record = load_record(directory, verify=False)
                    self._decoder_sessions = record, decoder_sessions(directory, record, self.providers, self.threads)
            record, sessions = self._decoder_sessions
            return StreamDecoder(directory, record, sessions=sessions, verify=False)
        except (ArtifactError, RunError):
            raise
        except Exception as e:  # onnxruntime's own error types for a graph it cannot load
            raise ArtifactError(f"{directory}: expected decoder graphs the runtime can load, found: "
                                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None

    def adopt(self, instance: Instance, stream: Stream, warmup: np.ndarray) -> Video:
        """A video whose stream already lives on this engine's device (an in-process absorb on the
        PyTorch backend): registered like one started here, its buffers used as they are."""
        with self._lock:
            video = Video(self, instance, stream, stream.chunk, warmup)
            self._active.append(video)
        return video

    def _release(self, video: Video) -> None:
        with self._lock:
            if video in self._active:
                self._active.remove(video)

    @property
    def identity(self) -> str:
        """The sha256 of the deployment's manifest: what instances and runs record."""
        if not hasattr(self, "_identity"):
            from .files import sha256_file

            self._identity = sha256_file(self.artifact.manifest_path)
        return self._identity


def _runner_specs(runner: Any, names: list[str], kind: str) -> dict[str, tuple[Any, str]] | None:
    shapes = getattr(runner, f"{kind}_shapes", None)
    dtypes = getattr(runner, f"{kind}_dtypes", None)
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        return None
    return {n: (shapes.get(n), np.dtype(dtypes[n]).name if n in dtypes else None) for n in names}


def check_runner_io(runner: Any, art: Artifact, where: Path) -> None:
    """The loaded model's I/O names, shapes and dtypes against the manifest's."""
    for kind, declared in (("input", art.inputs), ("output", art.outputs)):
        names = getattr(runner, f"{kind}_names", None)
        if names is None:
            continue
        if set(names) != set(declared):
            raise ArtifactError(f"{where}: {kind}s: expected {sorted(declared)} (manifest.json), found {sorted(names)}")
        specs = _runner_specs(runner, list(names), kind)
        for name, (shape, dtype) in (specs or {}).items():
            want = declared[name]
            got_shape = tuple(shape) if shape is not None else None
            if got_shape != want.shape or dtype != want.dtype:
                found = f"{dtype}{list(got_shape) if got_shape is not None else '[dynamic]'}"
                raise ArtifactError(f"{where}: {kind} {name!r}: expected {want.describe()} (manifest.json), "
                                    f"found {found}")
