"""Snapshots of a stream: its handoff state at a chunk boundary, from which a killed run resumes.

A snapshot holds what the stream changes as it goes (the ring-buffer caches and their frame
tables, the chunk and frame counters, the seed); what stays fixed for the whole stream (the text
K/V, the video's modulation) is read again from its instance, whose identity (with its deployment's)
the snapshot records,
and the frames already made are on disk, so snapshots do not grow with the video. Written with
safetensors.numpy under a name that carries the chunk count, so a new snapshot never replaces the
one run.json still points to; numpy and safetensors only.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunError
from .files import atomic_path, sha256_file

FORMAT = "ispa-run-snapshot"
PATTERN = "snapshot-*.safetensors"


def snapshot_name(chunks_done: int) -> str:
    return f"snapshot-{chunks_done:09d}.safetensors"


def save_snapshot(directory: Path, arrays: dict[str, np.ndarray], chunks_done: int, identity: str) -> dict[str, Any]:
    """Writes the snapshot atomically and returns its run.json record (file, sha256, chunks_done,
    identity: the deployment's manifest sha256 and the instance's, joined by ':')."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    name = snapshot_name(chunks_done)
    meta = {"format": FORMAT, "chunks_done": str(chunks_done), "identity": identity}
    with atomic_path(directory / name) as tmp:
        # asarray, not ascontiguousarray: that one turns the 0-d counters into 1-d arrays
        try:
            save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(tmp), metadata=meta)
        except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error type
            full = "space" in str(e).lower()
            raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else str(e),
                          str(directory / name)) from None
    return {"file": name, "sha256": sha256_file(directory / name), "chunks_done": chunks_done, "identity": identity}


def load_snapshot(directory: Path, record: dict[str, Any], identity: str, deployment: Path) -> dict[str, np.ndarray]:
    """The arrays of the snapshot run.json points to, after checking its sha256 and that it was taken
    of this deployment and instance; RunError (one line) otherwise."""
    from safetensors import SafetensorError, safe_open

    path = directory / str(record.get("file", ""))
    if not record.get("file") or not path.is_file():
        raise RunError(f"{path}: expected the snapshot run.json names, found no such file")
    got = sha256_file(path)
    if got != record.get("sha256"):
        raise RunError(f"{path}: sha256: expected {record.get('sha256')} (run.json snapshot.sha256), found {got}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        found = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: expected a readable safetensors snapshot, found {found}") from None
    if meta.get("format") != FORMAT:
        raise RunError(f"{path}: format: expected {FORMAT!r}, found {meta.get('format')!r}")
    if meta.get("identity") != identity:
        raise RunError(f"{path}: identity: expected a snapshot of {deployment} with this instance ({identity}), "
                       f"found one of another ({meta.get('identity')})")
    if meta.get("chunks_done") != str(record.get("chunks_done")):
        raise RunError(f"{path}: chunks_done: expected {record.get('chunks_done')} (run.json snapshot), "
                       f"found {meta.get('chunks_done')}")
    return arrays


def remove_snapshots(directory: Path, keep: str | None = None) -> None:
    """Deletes every snapshot in `directory` but `keep` (leftovers of a crash between two snapshots)."""
    for p in directory.glob(PATTERN):
        if p.name != keep:
            p.unlink(missing_ok=True)
