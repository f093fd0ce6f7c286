"""Loads and validates one video's instance (INSTANCE/instance.json + instance.safetensors) against
the deployment it was absorbed into.

An instance is what `ispa absorb` leaves for the engine: the handoff caches with their slot tables,
the frame index, the warmup's latents, the seed, the text K/V, and the video's modulation under the
graph's own input or refit names. instance.json holds the sha256 of the deployment's manifest: an
instance of another deployment (another layout, another graph, other weights) is refused in one
line naming both hashes, before a step runs, so no path can produce frames from a mismatched pair.
numpy and safetensors only; never torch or ispa_export.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .artifact import Artifact, ArtifactError, _fail, _one_line
from .files import sha256_file
from .schedule import ring_slot

INSTANCE_FORMAT = "ispa-instance"
INSTANCE_VERSION = 1
INSTANCE_JSON = "instance.json"
INSTANCE_STATE = "instance.safetensors"


@dataclass
class Instance:
    directory: Path
    record: dict[str, Any]
    state: dict[str, np.ndarray]
    modulation_names: list[str]

    @property
    def seed(self) -> int:
        return int(self.state["seed"])

    @property
    def cross_kv(self) -> np.ndarray:
        return self.state["cross_kv"]

    @property
    def constants(self) -> dict[str, np.ndarray]:
        """Graph inputs fixed for the whole stream: the modulation as inputs ("input"), or the
        overridable constants a baked graph takes by name."""
        return {k: self.state[k] for k in self.modulation_names}

    @property
    def record_path(self) -> Path:
        return self.directory / INSTANCE_JSON

    @property
    def sha256(self) -> str:
        """The identity a run records: the sha256 of instance.json (which fingerprints the rest)."""
        return sha256_file(self.record_path)


def modulation_specs(art: Artifact) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-video tensors a deployment's graph takes, by name: its modulation inputs, or its refit
    constants (shapes in the manifest's `refit_shapes`)."""
    if art.modulation == "input":
        return {n: (art.inputs[n].shape, art.inputs[n].dtype) for n in ("ispa_weight", "ispa_bias")}
    shapes = art.manifest.get("refit_shapes") or {}
    return {n: (tuple(shapes[n]), art.geometry.dtype) for n in art.manifest.get("refit_names") or [] if n in shapes}


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / INSTANCE_JSON
    if not directory.is_dir():
        raise _fail(directory, None, "an instance directory (`ispa absorb ... --out INSTANCE`)", "no such directory")
    if not path.is_file():
        raise _fail(path, None, "the instance record written by `ispa absorb`", "no such file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, None, "valid UTF-8 JSON", _one_line(e, 200)) from None
    if not isinstance(record, dict):
        raise _fail(path, None, "a JSON object", type(record).__name__)
    if record.get("format") != INSTANCE_FORMAT or record.get("version") != INSTANCE_VERSION:
        raise _fail(path, "format/version", f"{INSTANCE_FORMAT!r} version {INSTANCE_VERSION}",
                    f"{record.get('format')!r} version {record.get('version')!r}")
    for key in ("deployment_manifest_sha256", "files", "seed"):
        if key not in record:
            raise _fail(path, key, "a field written by `ispa absorb`", "no such field")
    seed = record["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _fail(path, "seed", "a non-negative integer", _one_line(repr(seed), 60))
    files = record["files"]
    if not isinstance(files, dict) or INSTANCE_STATE not in files:
        raise _fail(path, "files", f"an object with an entry for {INSTANCE_STATE!r}", _one_line(files, 200))
    for name, entry in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or name in ("", INSTANCE_JSON) or "\\" in name:
            raise _fail(path, "files", "relative paths inside the instance (instance.json excluded)", repr(name))
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise _fail(path, f"files[{name!r}]", "an object {sha256, bytes}", _one_line(entry, 120))
    return record


def load_instance(directory: str | os.PathLike, art: Artifact, *, verify_checksums: bool = True) -> Instance:
    """Validate an instance against the deployment `art` and load its state; ArtifactError (one line)
    otherwise. The deployment hash is checked first: a wrong pairing is named as such."""
    directory = Path(directory)
    record = _read_record(directory)
    path = directory / INSTANCE_JSON
    mine = sha256_file(art.manifest_path)
    theirs = record["deployment_manifest_sha256"]
    if theirs != mine:
        raise ArtifactError(f"{path}: deployment_manifest_sha256: expected {mine} ({art.manifest_path}), found "
                            f"{theirs} (an instance absorbed into another deployment: absorb this video into "
                            f"{art.directory})")
    for name, entry in record["files"].items():
        p = directory / name
        if not p.is_file():
            raise _fail(p, None, f"the file listed in {INSTANCE_JSON}", "no such file")
        if p.stat().st_size != entry.get("bytes"):
            raise _fail(p, "size", f"{entry.get('bytes')} bytes ({INSTANCE_JSON} files[{name!r}].bytes)",
                        f"{p.stat().st_size} bytes")
        if verify_checksums and sha256_file(p) != entry.get("sha256"):
            raise _fail(p, "sha256", f"{entry.get('sha256')} ({INSTANCE_JSON} files[{name!r}].sha256)", sha256_file(p))
    specs = modulation_specs(art)
    state = _load_state(directory / INSTANCE_STATE, art, specs)
    if int(state["seed"]) != record["seed"]:
        raise _fail(directory / INSTANCE_STATE, "tensor 'seed'", f"{record['seed']} ({INSTANCE_JSON} seed)",
                    int(state["seed"]))
    return Instance(directory, record, state, sorted(specs))


def _load_state(path: Path, art: Artifact, modulation: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    geo = art.geometry
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, None, "a readable safetensors file", _one_line(e, 200)) from None

    want: dict[str, tuple[tuple[int, ...] | None, str]] = {}
    for g in geo.groups:
        want[g.name] = (geo.group_shape(g), geo.dtype)
        want[g.name + "_frames"] = ((g.capacity,), "int64")
    want["cross_kv"] = (art.inputs["cross_kv"].shape, art.inputs["cross_kv"].dtype)
    for n in ("frame_index", "chunk", "seed"):
        want[n] = ((), "int64")
    want["latents"] = (None, "float32")
    want.update(modulation)
    extra = sorted(set(state) - set(want))
    if extra:
        raise _fail(path, "tensors", f"only {sorted(want)}", f"unexpected {extra}")
    for name, (shape, dtype) in want.items():
        expected = f"{dtype}{list(shape)}" if shape is not None else dtype
        if name not in state:
            raise _fail(path, f"tensor {name!r}", expected, "no such tensor")
        a = state[name]
        if (shape is not None and a.shape != tuple(shape)) or a.dtype.name != dtype:
            raise _fail(path, f"tensor {name!r}", f"{expected} (from the deployment's manifest.json)",
                        f"{a.dtype.name}{list(a.shape)}")

    frame_index, chunk, seed = (int(state[n]) for n in ("frame_index", "chunk", "seed"))
    if frame_index != chunk * geo.chunk_frames:
        raise _fail(path, "tensor 'frame_index'", f"chunk*chunk_frames = {chunk}*{geo.chunk_frames}", frame_index)
    if seed < 0:
        raise _fail(path, "tensor 'seed'", "a non-negative integer", seed)
    lat = state["latents"]
    b, c, _, h, w = geo.chunk_shape
    want_lat = (b, c, frame_index, h, w)
    if lat.shape != want_lat:
        raise _fail(path, "tensor 'latents'", f"float32{list(want_lat)} (every frame before frame_index)",
                    f"{lat.dtype.name}{list(lat.shape)}")
    for g in geo.groups:
        for slot, fr in enumerate(state[g.name + "_frames"].tolist()):
            if fr == -1:
                continue
            if not 0 <= fr < frame_index or ring_slot(fr, g.capacity, g.sink) != slot:
                raise _fail(path, f"tensor '{g.name}_frames'[{slot}]",
                            f"-1 or a frame < {frame_index} whose ring slot (capacity {g.capacity}, sink {g.sink}) "
                            f"is {slot}", fr)
    return state
