"""Loads and validates a deployment directory (manifest.json, model.onnx, golden.safetensors, engine).

A deployment holds no video: the graph, its contract and the build's record. A video's state lives
in an instance (runtimes.instance). Every refusal is one ArtifactError line that names the file, the
field, what was expected and what was found, so a deployment fails before the first step instead of
producing a wrong video. Imports numpy and (lazily) onnx or onnxruntime; never torch, ispa_export or
graphs.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .buffers import host_dtype
from .driver import Geometry
from .files import sha256_file
from .groups import group_name, new_kv_name
from .manifest_schema import FLOAT_DTYPES, describe, schema_violation

# 2: RoPE angles as the input `rope_frame` (no 1,024-frame limit), bfloat16 graphs, `positions`.
# 3: one cache group per distinct local span (`kv_s{sink}w{window}`), per-layer spans in
#    `geometry.layout`, `caches` a list of groups.
# 4: a deployment holds no video (no state.safetensors, no seed): every L-layer has a correction of
#    fixed shape (`refit_names`/`refit_shapes`), each video's is an instance; `correction`,
#    `calibration` record the build.
SCHEMA_VERSION = 4
# Why an older manifest cannot be run: its graph has another I/O contract.
OLDER_VERSIONS = {1: "an artifact from before RoPE angles became a graph input",
                  2: "an artifact with a single local cache group 'kv_local'",
                  3: "an export that held one video's state (state.safetensors) and graph: rebuild it with "
                     "`ispa build` (or `ispa export`)"}
FORMAT = "ispa-export"
MANIFEST = "manifest.json"
ONNX = "model.onnx"
REQUIRED_FILES = (ONNX,)
# The VAE decoder exported beside the DiT (optional; manifest `decoder`): its graphs and decoder.json here.
DECODER_DIR = "decoder"
DECODER_RECORD_FORMAT = "ispa-wan-vae-decoder"  # runtimes.decoder.FORMAT (not imported: it imports this module)
WAN_FPS = 16  # Wan2.1's frame rate
# The TensorRT engine's record, beside manifest.json: `ispa engine` writes it after the build, so the
# manifest (whose sha256 every instance holds) never changes once the deployment exists.
ENGINE_RECORD = "engine.json"
# How the graph gets its positions (manifest `positions.scheme`): the runtime computes the chunk's
# frame-axis RoPE angles in float64 modulo 2*pi from absolute frame indices and feeds their cos/sin.
# Keys are cached after RoPE, so every cached frame keeps its absolute position; attention depends
# only on query-key distances, which stay those of the training window for the rolling frames. Sink
# frames are not re-based: a sink's distance to the chunk grows with the stream.
POSITION_SCHEME = "absolute-rope-input"
# The graph inputs the driver feeds besides the cache groups and their masks (runtimes.driver.Stream.feeds
# and the constants).
STEP_INPUTS = ("latents", "timestep", "rope_frame", "cross_kv", "pass_kind", "ispa_weight", "ispa_bias")


class ArtifactError(ValueError):
    """An export directory that cannot be run as it is; the message is one line."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class Artifact:
    """A validated deployment: its manifest, the graph's geometry and I/O."""

    directory: Path
    manifest: dict[str, Any]
    geometry: Geometry
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @property
    def paths(self) -> dict[str, Path]:
        """Every file of the artifact (those listed in `files`, plus the manifest) by relative name."""
        out = {name: self.directory / name for name in self.manifest["files"]}
        out[MANIFEST] = self.directory / MANIFEST
        return out

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX

    @property
    def modulation(self) -> str:
        return self.manifest["modulation"]

    @property
    def default_instance(self) -> Path | None:
        """The instance `ispa export` leaves inside its directory (DIR/instance), if any."""
        path = self.directory / "instance"
        return path if (path / "instance.json").is_file() else None

    @property
    def decoder(self) -> dict[str, Any] | None:
        """The manifest's `decoder` record (the VAE decoder exported beside the DiT), if any."""
        return self.manifest.get("decoder")

    @property
    def decoder_dir(self) -> Path | None:
        """Where the exported decoder's graphs and decoder.json are, if the deployment has one."""
        d = self.decoder
        return None if d is None else self.directory / d["directory"]

    def engine_path(self) -> Path | None:
        """The TensorRT engine `ispa engine` built for this deployment (ENGINE_RECORD), if any, checked:
        the record names this manifest and the engine has its recorded size."""
        path = self.directory / ENGINE_RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            name, size, owner = record["engine"], record["bytes"], record["deployment_manifest_sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise _fail(path, None, "the engine record written by `ispa engine`", _one_line(e, 120)) from None
        mine = sha256_file(self.manifest_path)
        if owner != mine:
            raise _fail(path, "deployment_manifest_sha256", f"{mine} ({self.manifest_path})",
                        f"{owner} (an engine of another deployment: rebuild it with `ispa engine {self.directory}`)")
        engine = self.directory / str(name)
        if not engine.is_file() or engine.stat().st_size != size:
            found = "no such file" if not engine.is_file() else f"{engine.stat().st_size} bytes"
            raise _fail(engine, None, f"the engine of {ENGINE_RECORD} ({size} bytes)", found)
        return engine


# -- helpers ------------------------------------------------------------------------------------

def _one_line(x: Any, limit: int = 300) -> str:
    s = " ".join(str(x).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fail(file: str | Path, field: str | None, expected: str, found: Any) -> ArtifactError:
    where = f"{file}: {field}: " if field else f"{file}: "
    return ArtifactError(_one_line(f"{where}expected {expected}, found {found}", 600))


# -- manifest -----------------------------------------------------------------------------------

def _not_json(literal: str) -> float:
    # Python's json module reads NaN/Infinity, which JSON does not have; a manifest holding one is
    # refused here, before a NaN timestep can turn a whole video into NaN.
    raise ValueError(f"{literal} (not a JSON number)")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise _fail(directory, None, "an artifact directory", "no such directory")
    if not path.is_file():
        raise _fail(path, None, "the artifact manifest", "no such file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError as e:
        raise _fail(path, None, "UTF-8 JSON", f"undecodable bytes ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _fail(path, None, "valid JSON", f"a parse error at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise _fail(path, None, "valid JSON", e) from None
    if not isinstance(manifest, dict):
        raise _fail(path, None, "a JSON object", describe(manifest))
    # Format and version first: they decide which schema the rest is read with.
    if manifest.get("format") != FORMAT:
        found = describe(manifest["format"]) if "format" in manifest else "no such field"
        raise _fail(path, "format", repr(FORMAT), found)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        older = OLDER_VERSIONS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        why = f" ({older}: re-export it)" if older else f" (this runtime reads schema version {SCHEMA_VERSION})"
        raise _fail(path, "schema_version", f"{SCHEMA_VERSION}{why}",
                    describe(version) if "schema_version" in manifest else "no such field")
    violation = schema_violation(manifest)
    if violation is not None:
        field, expected, found = violation
        raise _fail(path, field, expected, found)
    if manifest["positions"]["scheme"] != POSITION_SCHEME:
        raise _fail(path, "positions.scheme", repr(POSITION_SCHEME), describe(manifest["positions"]["scheme"]))
    return manifest


def layer_records(geo: Geometry) -> list[dict[str, Any]]:
    """The manifest's `layers`: each layer's mode, span and cache group."""
    return [{"index": i, "mode": m, "span": None if s is None else s._asdict(), "group": group_name(s)}
            for i, (m, s) in enumerate(zip(geo.modes, geo.layout))]


def cache_records(geo: Geometry) -> list[dict[str, Any]]:
    """The manifest's `caches`: one record per cache group, in graph order, its bytes shape x itemsize."""
    item = host_dtype(geo.dtype).itemsize
    return [{"name": g.name, "layers": list(g.layers), "capacity_frames": g.capacity, "sink_frames": g.sink,
             "window_frames": g.window, "shape": list(geo.group_shape(g)), "dtype": geo.dtype,
             "bytes": math.prod(geo.group_shape(g)) * item} for g in geo.groups]


def _geometry(manifest: dict) -> Geometry:
    """Geometry from a manifest that passed the schema (types and ranges); cross-field checks here."""
    g = manifest["geometry"]
    if None in g["layout"] and g["full_sink"] >= g["full_capacity"]:
        raise _fail(MANIFEST, "geometry.full_sink",
                    f"< full_capacity={g['full_capacity']} (the ring needs a rolling part)", g["full_sink"])
    if "dtype" in manifest and manifest["dtype"] != g["dtype"]:
        raise _fail(MANIFEST, "dtype", f"{g['dtype']!r} (geometry.dtype, the graph's)", repr(manifest["dtype"]))
    return Geometry.from_dict(g)


def _check_layers_and_caches(manifest: dict, geo: Geometry) -> None:
    layers = manifest["layers"]
    if len(layers) != len(geo.layout):
        raise _fail(MANIFEST, "layers", f"{len(geo.layout)} entries (one per geometry.layout)", len(layers))
    for i, (entry, want) in enumerate(zip(layers, layer_records(geo))):
        if entry != want:
            raise _fail(MANIFEST, f"layers[{i}]", f"{want} (from geometry.layout)", _one_line(entry, 160))
    caches = manifest["caches"]
    want = cache_records(geo)
    names = [c["name"] for c in want]
    if [c["name"] for c in caches] != names:
        raise _fail(MANIFEST, "caches", f"the groups {names} (from geometry.layout, in that order)",
                    [c["name"] for c in caches])
    for c, w in zip(caches, want):
        path = f"caches[{c['name']!r}]"
        for field in ("layers", "capacity_frames", "sink_frames", "window_frames", "dtype"):
            if c[field] != w[field]:
                raise _fail(MANIFEST, f"{path}.{field}", f"{w[field]!r} (from geometry)", repr(c[field]))
        if c["shape"] != w["shape"]:
            raise _fail(MANIFEST, f"{path}.shape",
                        f"{w['shape']} = [layers, 2, batch, capacity_frames*tokens_per_frame "
                        f"({w['capacity_frames']}*{geo.tokens_per_frame}), heads, head_dim]", c["shape"])
        if c["bytes"] != w["bytes"]:
            raise _fail(MANIFEST, f"{path}.bytes", f"{w['bytes']} (shape x itemsize)", c["bytes"])


def _specs(manifest: dict, key: str) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for i, entry in enumerate(manifest[key]):
        name = entry["name"]
        if name in out:
            raise _fail(MANIFEST, f"{key}[{i}]", "unique names", f"{name!r} twice")
        out[name] = TensorSpec(name, tuple(entry["shape"]), entry["dtype"])
    return out


def _check_io_contract(manifest: dict, geo: Geometry, inputs: dict[str, TensorSpec],
                       outputs: dict[str, TensorSpec]) -> None:
    """The manifest's I/O against what the driver feeds and reads, for this geometry."""
    modulation = manifest["modulation"]
    b, f = geo.batch, geo.chunk_frames
    want_in: dict[str, tuple[tuple[int, ...] | None, str]] = {
        "latents": (geo.chunk_shape, geo.dtype),
        "timestep": ((b,), "float32"),
        "rope_frame": ((2, f, geo.rope_pairs), "float32"),
        "cross_kv": (None, geo.dtype),
    }
    want_out: dict[str, tuple[tuple[int, ...] | None, str | None]] = {"prediction": (geo.chunk_shape, None)}
    for g in geo.groups:
        want_in[g.name] = (geo.group_shape(g), geo.dtype)
        want_in[g.name + "_mask"] = ((g.capacity,), "bool")
        want_out[new_kv_name(g.name)] = (geo.new_kv_shape(g), geo.dtype)
    known = [*STEP_INPUTS, *(n for g in geo.groups for n in (g.name, g.name + "_mask"))]
    for specs, names, key, what in ((inputs, known, "inputs", "feeds"), (outputs, list(want_out), "outputs", "reads")):
        unknown = [n for n in specs if n not in names]
        if unknown:
            raise _fail(MANIFEST, key, f"names the driver {what} for geometry.layout ({', '.join(names)})",
                        f"unknown {unknown}")
    if "pass_kind" in inputs:
        want_in["pass_kind"] = ((), "int64")
    for n in ("ispa_weight", "ispa_bias"):
        if modulation == "input":
            want_in[n] = (None, geo.dtype)
        elif n in inputs:
            raise _fail(MANIFEST, "inputs", f"no {n!r} (modulation is 'baked')", f"{n!r}")
    for specs, want, key in ((inputs, want_in, "inputs"), (outputs, want_out, "outputs")):
        for name, (shape, dtype) in want.items():
            if name not in specs:
                raise _fail(MANIFEST, key, f"an entry {name!r}", f"names {list(specs)}")
            s = specs[name]
            if shape is not None and s.shape != tuple(shape):
                raise _fail(MANIFEST, f"{key}[{name!r}].shape", f"{list(shape)} (from geometry)", list(s.shape))
            if dtype is not None and s.dtype != dtype:
                raise _fail(MANIFEST, f"{key}[{name!r}].dtype", repr(dtype), repr(s.dtype))
    ckv = inputs["cross_kv"].shape
    n_layers = len(geo.layout)
    if len(ckv) != 6 or (ckv[0], ckv[1], ckv[2], ckv[4], ckv[5]) != (n_layers, 2, b, geo.heads, geo.head_dim):
        raise _fail(MANIFEST, "inputs['cross_kv'].shape",
                    f"[{n_layers}, 2, {b}, text_len, {geo.heads}, {geo.head_dim}]", list(ckv))
    n_local = geo.modes.count("L")
    for n in ("ispa_weight", "ispa_bias"):
        if n in inputs and (not inputs[n].shape or inputs[n].shape[0] != n_local):
            raise _fail(MANIFEST, f"inputs[{n!r}].shape", f"a first dimension of {n_local} (one per L-layer)",
                        list(inputs[n].shape))
    if modulation == "baked":
        names, shapes = manifest.get("refit_names") or [], manifest.get("refit_shapes") or {}
        local = [i for i, m in enumerate(geo.modes) if m == "L"]
        owners = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.") and n.split(".")[1].isdigit()})
        if owners != local:
            raise _fail(MANIFEST, "refit_names", f"the corrections of every L-layer {local} (a deployment gives each "
                        "one, zero where a video keeps none)", f"layers {owners}")
        missing = [n for n in names if n not in shapes]
        if missing:
            raise _fail(MANIFEST, "refit_shapes", "a shape for every refit name", f"none for {missing[:3]}")
    if outputs["prediction"].dtype not in FLOAT_DTYPES:
        raise _fail(MANIFEST, "outputs['prediction'].dtype", "a float type", repr(outputs["prediction"].dtype))


# -- files --------------------------------------------------------------------------------------

def _check_files(directory: Path, manifest: dict, verify_checksums: bool) -> None:
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise _fail(MANIFEST, "files", f"an entry for {name!r}", f"entries {sorted(files)}")
    for name, record in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or name in ("", MANIFEST) or "\\" in name:
            raise _fail(MANIFEST, "files", "relative paths inside the artifact (manifest.json excluded)", repr(name))
        size = record["bytes"]
        p = directory / name
        if not p.is_file():
            raise _fail(p, None, f"the file listed in {MANIFEST} ({size} bytes)", "no such file")
        got = p.stat().st_size
        if got != size:
            raise _fail(p, "size", f"{size} bytes (manifest.json files[{name!r}].bytes)", f"{got} bytes")
    if verify_checksums:
        # Sizes first, for all files: a cheap check before hashing gigabytes.
        for name, record in files.items():
            got = sha256_file(directory / name)
            if got != record["sha256"]:
                raise _fail(directory / name, "sha256",
                            f"{record['sha256']} (manifest.json files[{name!r}].sha256)", got)


def _check_decoder(directory: Path, manifest: dict, geo: Geometry) -> None:
    """The `decoder` record (present when the build exported a VAE decoder): its graphs and record
    listed in `files`, its latents the DiT's chunk, its pixel frames and cache bytes consistent, and
    decoder.json saying the same as the manifest."""
    d = manifest.get("decoder")
    if d is None:
        return
    files = manifest["files"]
    folder = PurePosixPath(d["directory"])
    if folder.is_absolute() or ".." in folder.parts or "\\" in d["directory"]:
        raise _fail(MANIFEST, "decoder.directory", "a relative folder inside the deployment", repr(d["directory"]))
    for field, name in (("record", d["record"]), ("graphs.first", d["graphs"]["first"]),
                        ("graphs.next", d["graphs"]["next"])):
        if PurePosixPath(name).parent != folder:
            raise _fail(MANIFEST, f"decoder.{field}", f"a file in decoder.directory {d['directory']!r}", repr(name))
        if name not in files:
            raise _fail(MANIFEST, f"decoder.{field}", f"a file listed in files ({name!r})", f"entries {sorted(files)}")
    want = {"batch": geo.batch, "latent_channels": geo.channels, "latent_height": geo.height,
            "latent_width": geo.width, "chunk_frames": geo.chunk_frames}
    for field, value in want.items():
        if d[field] != value:
            raise _fail(MANIFEST, f"decoder.{field}", f"{value} (the DiT's chunk, from geometry)", d[field])
    s, t, f = d["scale_factor_spatial"], d["scale_factor_temporal"], d["chunk_frames"]
    for field, value in (("height", d["latent_height"] * s), ("width", d["latent_width"] * s)):
        if d[field] != value:
            raise _fail(MANIFEST, f"decoder.{field}", f"{value} (latent_{field} x scale_factor_spatial)", d[field])
    frames = {"first": 1 + t * (f - 1), "next": t * f}
    for k, value in frames.items():
        if d["pixel_frames"][k] != value:
            raise _fail(MANIFEST, f"decoder.pixel_frames.{k}", f"{value} (from chunk_frames and "
                        f"scale_factor_temporal)", d["pixel_frames"][k])
    names = [c["name"] for c in d["caches"]]
    if len(set(names)) != len(names):
        raise _fail(MANIFEST, "decoder.caches", "unique names", f"{len(names) - len(set(names))} repeated")
    for c in d["caches"]:
        nbytes = math.prod(c["shape"]) * host_dtype(c["dtype"]).itemsize
        if c["bytes"] != nbytes:
            raise _fail(MANIFEST, f"decoder.caches[{c['name']!r}].bytes", f"{nbytes} (shape x itemsize)", c["bytes"])
    total = sum(c["bytes"] for c in d["caches"])
    if d["cache_bytes"] != total:
        raise _fail(MANIFEST, "decoder.cache_bytes", f"{total} (the sum of decoder.caches' bytes)", d["cache_bytes"])
    path = directory / d["record"]
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(path, None, "the decoder record (JSON)", _one_line(e, 160)) from None
    if not isinstance(record, dict) or record.get("format") != DECODER_RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise _fail(path, "format", repr(DECODER_RECORD_FORMAT), repr(found))
    for field in ("dtype", "batch", "latent_channels", "latent_height", "latent_width", "chunk_frames", "height",
                  "width", "pixel_frames", "cache_bytes"):
        if record.get(field) != d[field]:
            raise _fail(path, field, f"{d[field]!r} (manifest.json decoder.{field})", repr(record.get(field)))
    theirs = [{"name": c.get("input"), "output": c.get("output"), "shape": c.get("shape"), "dtype": c.get("dtype"),
               "bytes": c.get("bytes")} for c in record.get("caches", [])]
    if theirs != d["caches"]:
        raise _fail(path, "caches", "the caches of manifest.json decoder.caches (names, shapes, dtypes, bytes)",
                    f"{len(theirs)} caches that differ")
    for g in ("first", "next"):
        name = PurePosixPath(d["graphs"][g]).name
        got = (record.get("files") or {}).get(name, {}).get("sha256")
        if got != files[d["graphs"][g]]["sha256"]:
            raise _fail(path, f"files.{name}.sha256", f"{files[d['graphs'][g]]['sha256']} (manifest.json files)", got)


# -- ONNX ---------------------------------------------------------------------------------------

def _onnx_io(path: Path, files: dict) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Graph I/O from the protobuf (the weights stay on disk); onnxruntime when onnx is absent."""
    try:
        import onnx
    except ImportError:
        return _ort_io(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a whole ModelProto
        raise _fail(path, None, "a loadable ONNX model", f"{type(e).__name__}: {_one_line(e, 200)}") from None
    graph = model.graph
    if not graph.output:
        raise _fail(path, "graph", "a graph with outputs", "none (truncated or empty model)")
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in init.external_data if e.key == "location"), None)
            if loc is None or PurePosixPath(loc).as_posix() not in files:
                raise _fail(MANIFEST, "files",
                            f"an entry for {ONNX}'s external data {loc!r} (initializer {init.name!r})",
                            f"entries {sorted(files)}")
    initializers = {i.name for i in graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        return TensorSpec(v.name, dims, dtype)

    return ({v.name: spec(v) for v in graph.input if v.name not in initializers},
            {v.name: spec(v) for v in graph.output})


def _ort_io(path: Path) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    import onnxruntime as ort

    from .ort import ort_type_to_numpy
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _fail(path, None, "a model onnxruntime can load", _one_line(e, 200)) from None

    def spec(a) -> TensorSpec:
        try:
            dtype = ort_type_to_numpy(a.type).name
        except ValueError:
            dtype = a.type
        return TensorSpec(a.name, tuple(d if isinstance(d, int) else (d or "?") for d in a.shape), dtype)

    return {a.name: spec(a) for a in sess.get_inputs()}, {a.name: spec(a) for a in sess.get_outputs()}


def _check_onnx(path: Path, files: dict, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]) -> None:
    g_in, g_out = _onnx_io(path, files)
    for kind, graph, declared in (("inputs", g_in, inputs), ("outputs", g_out, outputs)):
        if set(graph) != set(declared):
            raise _fail(path, f"graph {kind}", f"the names in manifest.json {kind} {sorted(declared)}",
                        f"{sorted(graph)}")
        for name, want in declared.items():
            got = graph[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise _fail(path, f"graph {kind[:-1]} {name!r}", f"{want.describe()} (manifest.json)",
                            got.describe())


# -- entry point --------------------------------------------------------------------------------

def load_artifact(directory: str | os.PathLike, *, verify_checksums: bool = True, check_onnx: bool = True) -> Artifact:
    """Validate a deployment directory; raises ArtifactError (one line).

    verify_checksums=False skips hashing (sizes are still compared); check_onnx=False skips reading
    the ONNX graph, for deployments that run a TensorRT engine only.
    """
    directory = Path(directory)
    try:
        manifest = _read_manifest(directory)
        geo = _geometry(manifest)
        _check_layers_and_caches(manifest, geo)
        inputs, outputs = _specs(manifest, "inputs"), _specs(manifest, "outputs")
        _check_io_contract(manifest, geo, inputs, outputs)
        _check_files(directory, manifest, verify_checksums)
        _check_decoder(directory, manifest, geo)
        if check_onnx:
            _check_onnx(directory / ONNX, manifest["files"], inputs, outputs)
    except ArtifactError as e:
        # Field checks name the manifest by its bare name; the user gets the path they can open.
        msg = str(e)
        if msg.startswith(MANIFEST + ":"):
            raise ArtifactError(f"{directory / MANIFEST}{msg[len(MANIFEST):]}") from None
        raise
    return Artifact(directory, manifest, geo, inputs, outputs)
