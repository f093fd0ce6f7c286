"""`ispa eval --regime`: rows a user can rely on (every method within the byte budget, the required
fields), and the summary's paired margins computed from them."""
import json

import numpy as np
import pytest
import torch

from ispa_export.demo import demo_context
from ispa_export.lab.regimes import METHODS, RegimeSettings, run_seed, summary, summary_markdown, write_results
from ispa_export.lab.train import load_demo_model


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    st = RegimeSettings("whole", [1], reductions=(0.5,), headline=0.5, total_chunks=8, warmup_chunks=4,
                        protocols=("teacher",))
    return run_seed(load_demo_model(), demo_context(), 1, st)


def test_rows_cover_every_method_within_the_budget(rows, tmp_path):
    assert {r["method"] for r in rows} == set(METHODS)
    for r in rows:
        assert {"regime", "protocol", "reduction", "method", "seed", "psnr", "ssim", "kv_bytes"} <= r.keys()
        assert r["kv_bytes"] <= r["kv_budget_bytes"], r["method"]
        assert np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    path = write_results(rows, tmp_path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_whole_video_prior_keeps_a_sink_and_summary_margins(rows):
    by = {r["method"]: r for r in rows}
    # the reference never evicts frame 0 here, so the uniform prior keeps it as a sink
    assert by["ispa"]["sink"] == 1 and by["ispa"]["layers"] == list(range(6))
    (entry,) = summary(rows)
    best = max(("drop", "sink-window", "uniform", "uniform-nosink"), key=lambda m: by[m]["psnr"])
    assert entry["best_baseline"] == best
    assert entry["ispa_minus_best"] == pytest.approx(by["ispa"]["psnr"] - by[best]["psnr"])
    assert entry["ispa_minus_nocorr"] == pytest.approx(by["ispa"]["psnr"] - by["ispa-nocorr"]["psnr"])
    assert f"{by['ispa']['psnr']:.2f}" in summary_markdown([entry])
