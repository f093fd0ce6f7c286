"""The README's Python API example runs as written (on a tiny deployment in place of artifacts/demo)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs(tiny_artifact):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "Deployment.open" in b)
    assert '"artifacts/demo"' in example
    scope: dict = {}
    exec(compile(example.replace('"artifacts/demo"', repr(str(tiny_artifact))), "README.md", "exec"), scope)
    videos, frames = scope["videos"], scope["frames"]
    assert len(videos) == 2 and all(len(f) == scope["CHUNKS"] for f in frames)
    # two videos of two seeds on one engine: different videos, each chunk [B, C, f, H, W]
    assert not np.array_equal(np.concatenate(frames[0], axis=2), np.concatenate(frames[1], axis=2))
