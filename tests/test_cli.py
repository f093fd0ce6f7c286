"""The `ispa` command line: exact KV bytes, one-line user errors with exit status 2, backends agree."""
import json

import numpy as np
import pytest

from graphs.config import preset
from ispa_export.cli import main
from ispa_export.kv import kv_bytes
from runtimes.groups import Span


def test_inspect_preset_prints_exact_kv_bytes(capsys):
    assert main(["inspect", "wan2.1-t2v-1.3b", "--json", "--window", "3", "--sink", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = preset("wan2.1-t2v-1.3b")
    assert info["kv_bytes_full"] == 30 * 2 * 21 * 1560 * 1536 * 4 == kv_bytes(cfg).total
    assert info["kv_bytes_ispa"] == kv_bytes(cfg, [None if s is None else Span(**s) for s in info["spans"]]).total
    assert [g["name"] for g in info["groups"]] == ["kv_full", "kv_s1w3"]
    assert sum(g["bytes"] for g in info["groups"]) == info["kv_bytes_ispa"]
    assert info["kv_reduction"] >= 0.5 and info["parameters"] == 1_418_996_800


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "wan9"], "unknown model preset 'wan9'"),
    (["inspect", "tiny", "--window", "20"], "saves nothing"),
    (["export", "--model", "tiny", "--variant", "magic", "--out", "x"], "--variant: expected one of"),
    (["export", "--model", "tiny", "--checkpoint", "missing.safetensors", "--config", "tiny", "--out", "x"],
     "missing.safetensors"),
    (["run", "nowhere", "--backend", "torch", "--chunks", "1", "--out", "x"], "nowhere"),
])
def test_user_errors_are_one_line_with_status_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_torch_and_ort_backends_continue_the_same_video(tmp_path):
    art = tmp_path / "art"
    assert main(["export", "--model", "tiny", "--kv-reduction", "0.25", "--warmup-chunks", "5", "--out", str(art)]) == 0
    for backend in ("torch", "ort"):
        assert main(["run", str(art), "--backend", backend, "--chunks", "4", "--out", str(tmp_path / backend)]) == 0
    a, b = (np.load(tmp_path / k / "frames.npy") for k in ("torch", "ort"))
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4 * np.abs(a).max()
