"""`make gpu-check` runs on a CPU with the tiny model (the same code as on the GPU) and reports every figure."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("device", "warmup_seconds", "plain_warmup_seconds", "chunk_seconds", "graph_seconds_per_chunk",
        "host_device_bytes_per_chunk", "step_ms_full", "step_ms_ispa", "flop_ratio", "tflops_full",
        "peak_device_bytes", "parity_max_rel")


def test_gpu_check_on_cpu_tiny(tmp_path):
    cmd = [sys.executable, "-m", "ispa_export.lab.gpu_check", "--device", "cpu", "--model", "tiny", "--chunks", "4",
           "--reps", "2", "--parity-chunks", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(k in res for k in KEYS)
    assert res["device"].startswith("CPU") and res["peak_device_bytes"] is None
    assert len(res["chunk_seconds"]) == len(res["graph_seconds_per_chunk"]) == 4
    # The graph passes are part of each chunk's wall time.
    assert all(g <= w for g, w in zip(res["graph_seconds_per_chunk"], res["chunk_seconds"]))
    # On the CPU nothing crosses a bus; every chunk copies exactly its own K/V into the ring:
    # tiny has 4 layers, 2 frames of 6 tokens, dim 64, fp32.
    assert all(m == {"h2d": 0, "d2h": 0, "d2d": 4 * 2 * 2 * 6 * 64 * 4} for m in res["host_device_bytes_per_chunk"])
    assert 0 < res["flop_ratio"] < 1 and res["parity_max_rel"] == 0.0
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu-check on CPU")
