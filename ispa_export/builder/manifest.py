"""Refreshing an artifact's manifest.json after a file is added beside the ONNX (the golden step of
ispa_export.builder.verify, the TensorRT engine of ispa_export.builder.engine)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtimes.files import file_record, write_json_atomic

from ispa_export.errors import UserError

MANIFEST = "manifest.json"


def update_manifest_files(directory: Path, names: list[str], fields: dict[str, Any] | None = None) -> dict:
    """Record (or refresh) the sha256/size of `names` in DIR/manifest.json `files`, set top-level
    `fields`, and rewrite the manifest atomically. Returns the new manifest."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; expected an ispa-export artifact directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: files: expected an object of file records")
    for name in names:
        manifest["files"][name] = file_record(Path(directory) / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest.update(fields or {})
    write_json_atomic(path, manifest)
    return manifest
