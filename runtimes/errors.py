"""The runtime's one-line refusals of a run as asked (artifact problems are runtimes.artifact.ArtifactError)."""
from __future__ import annotations


class RunError(ValueError):
    """A run that cannot start or go on as asked: --out, --chunks, a snapshot to resume, a non-finite
    chunk. The message is one line; the command prints it and exits with status 2."""
