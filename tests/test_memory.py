"""Memory of a warmup, computed before it runs (ispa_export.memory): the statistics formula equals what
the monitor holds, and the accounting proves, on the meta device, that Wan 14B's absorb fits one
80 GB GPU and Wan 1.3B's span search fits one 80 GB GPU plus host memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export import memory
from ispa_export.builder.calibrate import IspaOptions
from ispa_export.builder.pipeline import _with_zero_corrections
from ispa_export.checkpoint import parameter_count, wan_reference_shapes
from ispa_export.errors import UserError
from ispa_export.method.monitor import GATE_CHUNKS, Placement, SpanMonitors, statistics_bytes
from ispa_export.method.policy import candidate_spans, uniform
from ispa_export.video.absorb import CorrectionRule, absorb, monitors_for
from ispa_export.video.torch_runner import torch_stream
from runtimes.groups import Span

CFG = preset("tiny")
# What nvidia-smi reports for an H100 80GB HBM3 (81,559 MiB); PyTorch sees a little less after the context.
H100_80GB = 81_559 * 2**20
HOST = 128 * 2**30  # the lent GPU machines' host memory


def _run(monitors, chunks=8, seed=0):
    """A warmup of the tiny model under `monitors`, returning the most statistics bytes they held at the
    last pass of any chunk (before it is folded in)."""
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    stream = torch_stream(model, torch.randn(1, 5, CFG.text_dim), seed, before_pass=monitors.before_pass)
    monitors.stream = stream
    peak = 0
    for _ in range(chunks):
        stream.step()
        peak = max(peak, sum(m.held_bytes() for m in monitors.monitors.values()))
        monitors.finish()
    return peak


@pytest.mark.parametrize("kind", ["search", "absorb", "absorb-host"])
def test_statistics_bytes_is_what_the_monitor_holds(kind):
    if kind == "search":  # a build's calibration warmup: every layer at every span, per pass kind, gate totals
        spans = candidate_spans(CFG, (0,))
        mons = SpanMonitors.build(spans, None, holdout_gap=1)
        want = statistics_bytes(CFG.dim, CFG.num_layers, len(spans), 5, 1)
    else:  # a video's absorb: the L-layers at their span, one accumulator each, no gate totals
        layout = [None, Span(0, 2), Span(0, 2), None]
        placement = Placement() if kind == "absorb" else memory.HOST_PLACEMENT
        mons = monitors_for(layout, CorrectionRule(), placement=placement)
        want = statistics_bytes(CFG.dim, 2, 1, 5, 1, per_kind=False, gate_chunks=0, track_fit=False,
                                placement=placement)
    held = _run(mons)
    # The formula adds the one total that exists while a chunk is folded in (not held between chunks).
    d1 = CFG.dim + 1
    transient = (d1 * d1 + CFG.dim * d1 + CFG.dim + 1) * 8
    assert held == want.total - transient
    if kind == "absorb-host":
        assert want.device < want.host  # float32 partials here, float64 totals on the host


def test_weights_counted_on_the_meta_device_are_wans():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        cfg = preset(name)
        assert memory.weight_bytes(cfg, "bfloat16") == 2 * parameter_count(wan_reference_shapes(cfg))


def _absorb_budget(cfg, placement):
    layout = uniform(cfg, 0.5, 0).spans  # the policy's prior: every layer local at the same span
    return memory.budget(cfg, "bfloat16", monitored_layers=sum(s is not None for s in layout), spans=1,
                         per_kind=False, gate_chunks=0, track_fit=False, holdout_gap=1, site="wo", placement=placement)


def test_wan14b_absorb_fits_one_80gb_gpu():
    cfg = preset("wan2.1-t2v-14b")
    b = memory.plan("absorb", torch.device("cuda"), lambda p: _absorb_budget(cfg, p), free=(H100_80GB, HOST))
    # float64 next to the activations would need ~126 GB: the plan keeps float32 partials on the GPU and
    # the float64 totals on the host.
    assert _absorb_budget(cfg, Placement()).device > H100_80GB
    assert b.placement == memory.HOST_PLACEMENT
    assert b.device <= memory.MARGIN * H100_80GB and b.host <= memory.MARGIN * HOST
    with pytest.raises(UserError, match=r"^absorb: needs .* GiB on cuda .* GiB is free there, .* GiB on the host$"):
        memory.plan("absorb", torch.device("cuda"), lambda p: _absorb_budget(cfg, p), free=(40 * 2**30, HOST))


def test_wan13b_search_over_four_spans_fits_one_80gb_gpu_and_the_host():
    cfg = preset("wan2.1-t2v-1.3b")
    spans = candidate_spans(cfg, (0,), (0.5,))
    assert len(spans) >= 4

    def make(placement):
        return memory.budget(cfg, "bfloat16", monitored_layers=cfg.num_layers, spans=len(spans), per_kind=True,
                             gate_chunks=GATE_CHUNKS, track_fit=True, holdout_gap=1, site="wo", placement=placement)
    b = memory.plan("search", torch.device("cuda"), make, free=(H100_80GB, HOST))
    assert b.device <= memory.MARGIN * H100_80GB and b.host <= memory.MARGIN * HOST


def test_float32_partials_with_host_totals_solve_like_float64():
    """The 14B placement gives the corrections the float64 one gives (tiny model, CPU)."""
    torch.manual_seed(0)
    base = WanModel(CFG).eval()
    layout = [None, Span(0, 2), Span(0, 2), Span(0, 2)]
    model = _with_zero_corrections(base, layout, IspaOptions())
    rule = CorrectionRule(gate=False, warmup_chunks=7, allowed=(1, 2, 3))
    ctx = torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    runs = {}
    for label, placement in (("f64", Placement()), ("host", memory.HOST_PLACEMENT)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memory, "plan", lambda *a, placement=placement, **k: a[2](placement))
            runs[label] = absorb(model, layout, ctx, 3, rule, modulation="input", dtype="float32")
    a, b = runs["f64"], runs["host"]
    assert a.report["kept_corrections"] == b.report["kept_corrections"] == [1, 2, 3]
    for name in ("ispa_weight", "ispa_bias"):
        np.testing.assert_allclose(b.modulation[name], a.modulation[name], rtol=1e-4, atol=1e-6)
