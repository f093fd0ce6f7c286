"""What a manifest.json field may hold, as one JSON Schema, and the one-line reason when it does not.

The schema covers each field on its own: type, range, allowed values, required fields. Agreement
between fields (cache shapes from geometry, I/O against what the driver feeds) and with the ONNX
graph is checked by runtimes.artifact, which runs this schema first so those checks can trust the
types. A subschema may carry an "expected" phrase (an annotation jsonschema ignores) that the
refusal uses instead of one derived from the failing keyword. Imports jsonschema, never torch.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

FLOAT_DTYPES = ["float32", "float16", "bfloat16"]
IO_DTYPES = FLOAT_DTYPES + ["int64", "bool"]
MODES = ["F", "L"]
GROUP_NAME = "^kv_(full|s[0-9]+w[0-9]+)$"
MODULATIONS = ["baked", "input"]
# Timesteps are flow-matching times on Wan's 0..1000 scale: sigma = t/1000 must lie in (0, 1].
TIMESTEP_MAX = 1000.0

_positive = {"type": "integer", "minimum": 1}
_count = {"type": "integer", "minimum": 0}
_shape = {"type": "array", "items": _count, "expected": "a list of static non-negative integers"}
_tensor = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {"name": {"type": "string", "minLength": 1}, "shape": _shape, "dtype": {"enum": IO_DTYPES}},
}
# A layer's local span, or null for a full layer.
_span = {
    "type": ["object", "null"],
    "expected": "an object {sink, window} or null (a full layer)",
    "required": ["sink", "window"],
    "additionalProperties": False,
    "properties": {"sink": _count, "window": _positive},
}
_cache = {
    "type": "object",
    "required": ["name", "layers", "capacity_frames", "sink_frames", "window_frames", "shape", "dtype", "bytes"],
    "properties": {"name": {"type": "string", "pattern": GROUP_NAME,
                            "expected": "'kv_full' or 'kv_s<sink>w<window>'"},
                   "layers": {"type": "array", "minItems": 1, "items": _count},
                   "capacity_frames": _count, "sink_frames": _count, "window_frames": _count, "shape": _shape,
                   "dtype": {"enum": FLOAT_DTYPES}, "bytes": _count},
}
_geometry_ints = {name: _positive for name in
                  ("batch", "channels", "chunk_frames", "height", "width", "tokens_per_frame", "heads", "head_dim")}
_geometry_ints.update({name: _count for name in ("full_capacity", "full_sink")})
_geometry = {
    "type": "object",
    "required": ["layout", "dtype", "timesteps", "rope_theta", *_geometry_ints],
    "additionalProperties": False,
    "properties": {
        "layout": {"type": "array", "minItems": 1, "items": _span},
        "dtype": {"enum": FLOAT_DTYPES},
        "timesteps": {"type": "array", "minItems": 1,
                      "items": {"type": "number", "exclusiveMinimum": 0, "maximum": TIMESTEP_MAX,
                                "expected": f"a number in (0, {TIMESTEP_MAX:g}] (sigma = t/1000)"}},
        "rope_theta": {"type": "number", "exclusiveMinimum": 1, "maximum": 1e12,
                       "expected": "a number > 1 (RoPE base)"},
        **_geometry_ints,
    },
}

# The VAE decoder exported beside the DiT (`ispa build/export --vae`): where its graphs are, the video it
# makes and its causal-conv caches. Agreement with geometry and with decoder.json: runtimes.artifact.
_decoder_cache = {
    "type": "object",
    "required": ["name", "output", "shape", "dtype", "bytes"],
    "properties": {"name": {"type": "string", "minLength": 1}, "output": {"type": "string", "minLength": 1},
                   "shape": _shape, "dtype": {"enum": FLOAT_DTYPES}, "bytes": _count},
}
_decoder = {
    "type": "object",
    "required": ["directory", "record", "graphs", "dtype", "batch", "latent_channels", "latent_height",
                 "latent_width", "chunk_frames", "height", "width", "scale_factor_spatial", "scale_factor_temporal",
                 "pixel_frames", "fps", "caches", "cache_bytes"],
    "properties": {
        "directory": {"type": "string", "minLength": 1}, "record": {"type": "string", "minLength": 1},
        "graphs": {"type": "object", "required": ["first", "next"], "additionalProperties": False,
                   "properties": {"first": {"type": "string"}, "next": {"type": "string"}}},
        "dtype": {"enum": FLOAT_DTYPES},
        **{k: _positive for k in ("batch", "latent_channels", "latent_height", "latent_width", "chunk_frames",
                                  "height", "width", "scale_factor_spatial", "scale_factor_temporal")},
        "pixel_frames": {"type": "object", "required": ["first", "next"],
                         "properties": {"first": _positive, "next": _positive}},
        "fps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000,
                "expected": "a frame rate in (0, 1000] frames per second"},
        "caches": {"type": "array", "minItems": 1, "items": _decoder_cache},
        "cache_bytes": _count,
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "schema_version", "positions", "model", "layers", "geometry", "caches", "modulation",
                 "inputs", "outputs", "files"],
    "properties": {
        "format": {"type": "string"},
        "schema_version": {"type": "integer"},
        # Which scheme is checked by runtimes.artifact against the one this runtime implements.
        "positions": {"type": "object", "required": ["scheme"],
                      "properties": {"scheme": {"type": "string"}, "input": {"type": "string"},
                                     "theta": {"type": "number", "exclusiveMinimum": 1},
                                     "pairs": _positive, "sink_rebased": {"type": "boolean"}}},
        "model": {"type": "object"},
        "layers": {"type": "array", "items": {
            "type": "object", "required": ["index", "mode", "span", "group"],
            "properties": {"index": _count, "mode": {"enum": MODES}, "span": _span,
                           "group": {"type": "string", "pattern": GROUP_NAME,
                                     "expected": "'kv_full' or 'kv_s<sink>w<window>'"}}}},
        "geometry": _geometry,
        "caches": {"type": "array", "minItems": 1, "items": _cache},
        "modulation": {"enum": MODULATIONS},
        "dtype": {"enum": FLOAT_DTYPES},
        "inputs": {"type": "array", "minItems": 1, "items": _tensor},
        "outputs": {"type": "array", "minItems": 1, "items": _tensor},
        "files": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["sha256", "bytes"],
            "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                      "expected": "64 lowercase hex digits"},
                           "bytes": _count}}},
        "refit_names": {"type": "array", "items": {"type": "string"}},
        "refit_shapes": {"type": "object", "additionalProperties": _shape},
        "correction": {"type": "object"},
        "calibration": {"type": "object"},
        "absorption": {"type": "object"},
        "decoder": _decoder,
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# JSON Schema's "integer" admits 1.0; a shape or a count of 1.0 is a float to numpy, so refuse it.
_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_TYPES)
_VALIDATOR = _Validator(MANIFEST_SCHEMA)

_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "array": "a list",
               "object": "an object", "boolean": "a boolean", "null": "null"}


def describe(x: Any) -> str:
    """How a refusal names a found JSON value."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"boolean {x}"
    if isinstance(x, (int, float)):
        return f"number {x}"
    if isinstance(x, str):
        return f"string {x!r}"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def field_path(parts: Iterable[Any]) -> str:
    """['geometry', 'timesteps', 0] -> 'geometry.timesteps[0]'; ['files', 'model.onnx'] -> "files['model.onnx']"."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).isidentifier():
            out += f"[{p!r}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def _short(x: Any, limit: int = 120) -> str:
    s = " ".join(str(x).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _explain(e: ValidationError) -> tuple[str, str, str]:
    """(field, expected, found) of one schema violation."""
    path, kw, want, x = deque(e.absolute_path), e.validator, e.validator_value, e.instance
    if kw == "required":
        missing = next(k for k in want if k not in x)
        return field_path(path) or "(top level)", f"a field {missing!r}", "no such field"
    if kw == "additionalProperties":
        known = sorted(e.schema.get("properties", {}))
        return field_path(path), f"only the fields {known}", f"unknown fields {sorted(set(x) - set(known))}"
    found = describe(x)
    if "expected" in e.schema:
        return field_path(path), e.schema["expected"], found
    kind = _TYPE_NAMES.get(e.schema.get("type"), "a value") if isinstance(e.schema.get("type"), str) else "a value"
    phrases = {
        "type": lambda: " or ".join(_TYPE_NAMES.get(t, t) for t in ([want] if isinstance(want, str) else want)),
        "enum": lambda: f"one of {want}",
        "const": lambda: repr(want),
        "minimum": lambda: f"{kind} >= {want}",
        "exclusiveMinimum": lambda: f"{kind} > {want}",
        "maximum": lambda: f"{kind} <= {want}",
        "exclusiveMaximum": lambda: f"{kind} < {want}",
        "minItems": lambda: "a non-empty list" if want == 1 else f"a list of at least {want} entries",
        "minLength": lambda: f"a string of at least {want} characters",
        "pattern": lambda: f"a string matching {want}",
    }
    expected = phrases[kw]() if kw in phrases else _short(e.message)
    return field_path(path), expected, found


def schema_violation(manifest: Any) -> tuple[str, str, str] | None:
    """The most relevant violation of MANIFEST_SCHEMA as (field, expected, found), or None when valid."""
    error = best_match(_VALIDATOR.iter_errors(manifest))
    return None if error is None else _explain(error)
