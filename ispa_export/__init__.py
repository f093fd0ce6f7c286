"""ispa-export: one build of a streaming video DiT with a halved KV cache, then one absorb per video.

The Python API: `Deployment.open(DEPLOY, backend=..., device=...)`, `Deployment.start(context, seed)`,
`Video.chunks(n)` or `Video.pixels(n)` (ispa_export.deployment). Imported on first use, so
`import ispa_export` stays cheap.
"""
from __future__ import annotations

__all__ = ["Deployment", "Video"]


def __getattr__(name: str):
    if name in __all__:
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'ispa_export' has no attribute {name!r}")
