"""The allocation policy (DESIGN.md section 4): exact DP, the search space, the ridge and the gate,
the extrapolation over distance, and the multi-span monitor that feeds it.

What is shown: the dynamic program returns the brute-force optimum under the byte budget, shared
span or per-layer spans; a uniform window on every layer and "n layers at one window" are reached
when they are best; the gate keeps a correction exactly where it lowers the held-out d; several
spans measured in one warmup give each span the numbers of its own single-span warmup.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import LOCAL, WanModel
from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions, output_gate, plan, report, transition
from ispa_export.method.monitor import LocalSpan, SpanMonitors
from ispa_export.method.policy import (Allocation, SpanLoss, allocate, budget_frames, candidate_spans, choose_correction,
                                paired_gain, reference_keeps_sink, select, GATE_Z,
                                dp, extrapolate)
from ispa_export.video.torch_runner import torch_stream
from runtimes.groups import as_layout

CFG = preset("tiny").replace(max_frames=8, full_sink=1)


def losses_of(table: dict[LocalSpan, list[float]]) -> dict[LocalSpan, SpanLoss]:
    out = {}
    for span, loss in table.items():
        arr = np.array(loss, dtype=float)
        out[span] = SpanLoss(span, arr, arr, arr, [None] * len(arr), "measured", [])
    return out


def brute(table, cfg, reduction, shared):
    budget = budget_frames(cfg, reduction)
    spans = list(table)
    best = None
    for choice in itertools.product([None] + spans, repeat=cfg.num_layers):
        used = {s for s in choice if s is not None}
        if shared and len(used) > 1:
            continue
        frames = sum(cfg.max_frames if s is None else s.frames for s in choice)
        if frames > budget:
            continue
        loss = sum(table[s][i] for i, s in enumerate(choice) if s is not None)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, frames, choice)
    return best


@pytest.mark.parametrize("reduction", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("shared", [True, False])
def test_dp_equals_brute_force(reduction, shared):
    cfg = CFG.replace(num_layers=5)
    rng = np.random.default_rng(int(reduction * 100) + shared)
    spans = [LocalSpan(0, 1), LocalSpan(0, 2), LocalSpan(1, 1), LocalSpan(0, 4)]
    for _ in range(20):
        # losses fall with the window, as they do in practice, but not in the same way per layer
        table = {s: (rng.gamma(1.0, size=5) / s.frames ** rng.uniform(0, 2)).tolist() for s in spans}
        want = brute(table, cfg, reduction, shared)
        got, per_span = allocate(losses_of(table), cfg, reduction, per_layer_spans=not shared)
        assert math.isclose(got.loss, want[0], rel_tol=1e-9, abs_tol=1e-12)
        assert got.frames <= budget_frames(cfg, reduction)
        assert got.frames == sum(cfg.max_frames if s is None else s.frames for s in got.spans)
        assert math.isclose(got.loss, sum(table[s][i] for i, s in enumerate(got.spans) if s is not None))
        if shared:
            assert len(got.distinct_spans) <= 1
            # and per shared span, the best of that span alone
            for span, alloc in per_span.items():
                one = brute({span: table[span]}, cfg, reduction, True)
                assert (alloc is None) == (one is None)
                if alloc is not None:
                    assert math.isclose(alloc.loss, one[0], rel_tol=1e-9, abs_tol=1e-12)


def test_uniform_and_some_layers_at_one_window_are_in_the_search_space():
    cfg = CFG.replace(num_layers=4)  # M = 8; 50% leaves 16 frames
    short, half = LocalSpan(0, 1), LocalSpan(0, 4)
    # every layer loses little at half the cache, a lot at one frame: a uniform window of 4 frames
    got, _ = allocate(losses_of({short: [1.0] * 4, half: [0.1] * 4}), cfg, 0.5)
    assert got.spans == [half] * 4 and got.frames == 16
    # two layers lose nothing, the others a lot anywhere: those two local, at the cheaper window
    got, _ = allocate(losses_of({short: [0.0, 5.0, 0.0, 5.0], half: [0.0, 5.0, 0.0, 5.0]}), cfg, 0.25)
    assert got.spans == [short, None, short, None]
    # the per-layer program mixes them where that is better; the shared one cannot
    table = {short: [0.01, 9.0, 9.0, 9.0], half: [9.0, 0.5, 0.5, 0.5]}
    mixed, _ = allocate(losses_of(table), cfg, 0.25, per_layer_spans=True)
    shared, _ = allocate(losses_of(table), cfg, 0.25)
    assert mixed.spans == [short, half, None, None] or mixed.loss <= shared.loss
    assert mixed.loss < shared.loss and len(shared.distinct_spans) == 1


def test_a_sink_only_where_the_reference_keeps_it():
    # full cache of 12 frames without its own sink: a stream that outgrows it evicts frame 0
    assert not reference_keeps_sink(1, 12, 0, None) and not reference_keeps_sink(1, 12, 0, 13)
    assert reference_keeps_sink(1, 12, 0, 12)  # the whole video fits: nothing is ever evicted
    assert reference_keeps_sink(1, 12, 1, None) and reference_keeps_sink(0, 12, 0, None)
    demo = preset("demo")
    assert IspaOptions().sinks(demo) == (0,) and IspaOptions(stream_frames=12).sinks(demo) == (0, 1)
    assert all(s.sink == 0 for s in IspaOptions().spans(demo))
    assert IspaOptions(sink=1).sinks(demo) == (1,)


def _select_table(cfg):
    spans = [LocalSpan(0, 2), LocalSpan(0, 4), LocalSpan(1, 3)]
    rng = np.random.default_rng(0)
    return losses_of({s: rng.uniform(0.1, 1.0, cfg.num_layers).tolist() for s in spans})


def test_paired_gain():
    assert paired_gain([3.0, 5.0], [1.0, 2.0]) == (2.5, 0.5)
    gain, se = paired_gain([1.0], [0.0])
    assert gain == 1.0 and se == math.inf  # one pair cannot tell a gain from noise


def test_paired_gain_over_videos_takes_the_video_as_the_unit():
    """Frames of one video move together: many frames of two videos are two samples, not many."""
    a = [np.full(50, 1.0), np.full(50, 3.0)]
    b = [np.zeros(50), np.zeros(50)]
    gain, se = paired_gain(a, b)
    assert gain == 2.0 and math.isclose(se, 1.0)  # per-video gains 1 and 3: mean 2, SE 1
    assert paired_gain(np.concatenate(a), np.concatenate(b))[1] < 0.15  # pooled frames: 7x too sure
    assert paired_gain([np.array([3.0, 5.0])], [np.array([1.0, 2.0])]) == (2.5, 0.5)  # one video: its frames


def test_select_keeps_the_uniform_prior_unless_a_layout_wins_beyond_the_noise():
    cfg = CFG.replace(num_layers=4, full_sink=0)  # M = 8; 50% leaves 16 frames: s0w4 on every layer
    losses = _select_table(cfg)
    uniform0 = [LocalSpan(0, 4)] * 4

    def errors(gain_of_others: float, noise: float, prior=uniform0):
        def frame_errors(spans):
            base = np.array([1.0, 1.2, 0.9, 1.1])
            if spans == prior:
                return base
            return base - gain_of_others + noise * np.array([1.0, -1.0, 1.0, -1.0])
        return frame_errors

    # challengers better on average, but within two standard errors: the prior stays
    got, rep = select(losses, cfg, 0.5, errors(0.05, 0.2), [0])
    assert got.spans == uniform0 and rep["chosen"] == "prior"
    assert rep["challengers"] and all(c["gain"] > 0 for c in rep["challengers"])
    # the same mean gain with little noise: the best challenger replaces it
    got, rep = select(losses, cfg, 0.5, errors(0.05, 0.001), [0])
    assert got.spans != uniform0 and rep["chosen"] == "challenger"
    assert got.frames <= budget_frames(cfg, 0.5) and all(s is None or s.sink == 0 for s in got.spans)
    # worse challengers never win; where the reference keeps frame 0 the prior has a sink
    got, rep = select(losses, cfg, 0.5, errors(-0.05, 0.0, [LocalSpan(1, 3)] * 4), [0, 1])
    assert got.spans == [LocalSpan(1, 3)] * 4 and rep["prior"]["spans"] == ["s1w3"] * 4
    # both uniform spans measured by the warmup: the sink is chosen by the chain, not by the prior
    got, rep = select(losses, cfg, 0.5, errors(-0.05, 0.0), [0, 1])
    assert got.spans == uniform0 and rep["sink"]["chosen"] == 0
    # the plain one too long for the warmup (extrapolated): the sink prior stands, untested
    losses[LocalSpan(0, 4)].source = "extrapolated"
    got, rep = select(losses, cfg, 0.5, errors(0.0, 0.0, [LocalSpan(1, 3)] * 4), [0, 1])
    assert rep["prior"]["spans"] == ["s1w3"] * 4 and "sink" not in rep


def test_dp_out_of_budget_and_infinite_losses():
    cfg = CFG.replace(num_layers=3)
    assert dp([[(8, 0.0, None)]] * 3, budget=23) is None
    span = LocalSpan(0, 2)
    got = dp([[(8, 0.0, None), (2, math.inf, span)], [(8, 0.0, None), (2, 1.0, span)], [(8, 0.0, None)]], 18)
    assert got.spans == [None, span, None] and got.loss == 1.0
    with pytest.raises(UserError, match="no candidate span reaches it"):
        allocate(losses_of({span: [math.inf] * 3}), cfg, 0.5)


def test_candidate_spans_of_the_demo():
    spans = candidate_spans(preset("demo"))  # chunk 2, M = 12: one chunk up to half the cache
    assert spans == [LocalSpan(0, 2), LocalSpan(0, 4), LocalSpan(0, 6), LocalSpan(1, 1), LocalSpan(1, 3),
                     LocalSpan(1, 5)]
    assert all(s.frames <= 6 for s in spans)
    assert budget_frames(preset("demo"), 0.5) == 36 and budget_frames(preset("demo"), 0.25) == 54


def test_extrapolation_over_distance():
    # an exact power law is continued; never above the longest measured window; b > 0 is clamped
    assert math.isclose(extrapolate([2, 4], [0.4, 0.1], 8), 0.025, rel_tol=1e-9)
    assert extrapolate([2, 4], [0.1, 0.2], 8) == 0.2
    assert extrapolate([2], [0.3], 6) == 0.3
    assert extrapolate([], [], 6) == math.inf


class FakeMonitor:
    def __init__(self, heldout):
        self.heldout = heldout

    def heldout_chunks(self, layer):
        return [c for c, e in sorted(self.heldout[layer].items()) if e["rho"]]


def test_gate_and_ridge_choice():
    mon = FakeMonitor({0: {3: {"raw": 0.5, "rho": {0.1: 0.45, 10.0: 0.4}},
                           4: {"raw": 0.4, "rho": {0.1: 0.3, 10.0: 0.2, 100.0: 0.25}}},
                       1: {4: {"raw": 0.2, "rho": {0.1: 0.5, 10.0: 0.21}}},
                       2: {4: {"raw": 0.2, "rho": {}}},
                       3: {4: {"raw": 0.4, "rho": {10.0: 0.2}}},  # one held-out chunk: no evidence of carrying over
                       4: {2: {"raw": 0.3, "rho": {10.0: 0.35}}, 3: {"raw": 0.5, "rho": {10.0: 0.4}},
                           4: {"raw": 0.4, "rho": {10.0: 0.2}}}})
    c = choose_correction(mon, 0)  # the latest chunk picks the ridge; it wins on both held-out chunks
    assert (c.rho, c.kept, c.raw, c.corrected, c.chunk) == (10.0, True, 0.4, 0.2, 4) and c.effective == 0.2
    assert not choose_correction(mon, 3).kept and choose_correction(mon, 3, gate=False).kept
    assert not choose_correction(mon, 4).kept  # lost on chunk 2, one of the last GATE_CHUNKS
    c = choose_correction(mon, 1)  # the best ridge still loses to no correction: stays out
    assert (c.rho, c.kept, c.effective) == (10.0, False, 0.2)
    assert choose_correction(mon, 1, gate=False).kept
    c = choose_correction(mon, 2)  # one monitored chunk: nothing held out, nothing kept
    assert c.rho is None and not c.kept and c.effective == 0.2
    assert choose_correction(FakeMonitor({3: {}}), 3) is None


def build(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return WanModel(cfg).eval(), torch.randn(1, 5, cfg.text_dim)


def test_several_spans_in_one_warmup_equal_one_warmup_per_span():
    model, ctx = build()
    spans = [LocalSpan(0, 2), LocalSpan(1, 1), LocalSpan(0, 4)]

    def warm(span_list):
        mons = SpanMonitors.build(span_list, None)
        stream = torch_stream(model, ctx, 0, before_pass=mons.before_pass)
        mons.stream = stream
        for _ in range(6):
            stream.step()
            mons.finish()
        return mons

    together = warm(spans)
    for span in spans:
        alone = warm([span])[span]
        both = together[span]
        assert both.monitored_chunks == alone.monitored_chunks == [c for c in range(6) if 2 * c > span.frames]
        for layer in range(CFG.num_layers):
            for c in alone.monitored_chunks:
                for k, (raw, corr) in alone.curves[layer][c].items():
                    got = both.curves[layer][c][k]
                    assert math.isclose(got[0], raw, rel_tol=1e-6) and math.isclose(got[1], corr, rel_tol=1e-6)
            assert both.heldout[layer].keys() == alone.heldout[layer].keys()
            for key, s in alone.stats.items():
                torch.testing.assert_close(both.stats[key].G, s.G, rtol=1e-6, atol=1e-9)


def test_transition_allocates_over_candidate_spans_and_meets_the_target():
    model, ctx = build()
    opts = IspaOptions(kv_reduction=0.5, warmup_chunks=8)
    stream, mons, tr = transition(model, ctx, 0, opts)
    assert set(mons.spans) == set(candidate_spans(CFG))
    rep = report(model, mons, tr, opts)
    assert rep["kv_reduction"] >= 0.5
    assert rep["kv_bytes_after"] == sum(g.nbytes for g in stream.groups.values())
    # the chosen allocation is the uniform prior or a challenger whose measured gain on the warmup's
    # chain beat it by GATE_Z standard errors; every challenger is reported with its gain
    sel = rep["calibration"]["selection"]
    assert sel["challengers"]
    if sel["chosen"] == "prior":
        assert rep["allocation"]["spans"] == [[s.sink, s.window] for s in tr.allocation.spans]
        assert len({tuple(x) for x in rep["allocation"]["spans"]}) == 1 and None not in rep["allocation"]["spans"]
    else:
        assert max(c["gain"] - GATE_Z * c["se"] for c in sel["challengers"]) > 0
    assert rep["selected_layers"] == tr.layers
    assert rep["general_allocation"]["predicted_loss"] <= min(
        a["predicted_loss"] for a in rep["allocations_by_span"].values() if a is not None) + 1e-15
    assert [l["span"] is not None for l in rep["layers"]] == [m == LOCAL for m in model.modes]
    local = stream.groups[f"kv_s{tr.span.sink}w{tr.span.window}"]
    assert local.capacity == tr.span.frames and local.sink == tr.span.sink and list(local.layers) == tr.layers
    assert np.isfinite(stream.step()).all()


def test_per_layer_spans_bake_one_cache_group_per_span(monkeypatch):
    """An allocation that gives layers different spans is baked as it is: one cache group per span."""
    import ispa_export.builder.calibrate as ispa

    def mixed(losses, cfg, reduction, layers=None, per_layer_spans=False):
        spans = sorted(losses)
        alloc = Allocation([spans[0], spans[1]] + [None] * (cfg.num_layers - 2), 0.0, 0, 0)
        return alloc, {s: alloc for s in spans}

    monkeypatch.setattr(ispa, "allocate", mixed)
    model, ctx = build()
    opts = IspaOptions(kv_reduction=0.5, per_layer_spans=True, calibrate=False)  # the DP's answer as it is
    stream, mons, tr = transition(model, ctx, 0, opts)
    a, b = sorted(mons.spans)[:2]
    assert tr.spans == [a, b, None, None] and tr.layers == [0, 1] and model.layout == as_layout([a, b, None, None])
    names = [f"kv_s{s.sink}w{s.window}" for s in (a, b)]
    assert {n: g.layers for n, g in stream.groups.items()} == {"kv_full": (2, 3), names[0]: (0,), names[1]: (1,)}
    assert [(g.capacity, g.sink) for g in stream.groups.values()] == [(CFG.max_frames, CFG.full_sink), (a.frames, a.sink),
                                                                       (b.frames, b.sink)]
    rep = report(model, mons, tr, opts)
    assert [l["span"] for l in rep["layers"]] == [{"sink": s.sink, "window": s.window} for s in (a, b)] + [None] * 2
    assert [l["group"] for l in rep["layers"]] == names + ["kv_full"] * 2 and rep["span"] is None
    assert rep["kv_bytes_after"] == sum(g.nbytes for g in stream.groups.values())
    assert np.isfinite(stream.step()).all()


def test_calibration_chain_reproduces_the_teacher_forced_stream():
    from ispa_export.method.calibration import Chain

    model, ctx = build()
    rng = np.random.default_rng(0)
    video = rng.standard_normal((1, CFG.in_dim, 10, CFG.latent_height, CFG.latent_width)).astype(np.float32)
    stream = torch_stream(model, ctx, 7)
    samples = []
    for c in range(5):
        stream.step(video[:, :, 2 * c:2 * c + 2])
        samples.append(stream.sample)
    chain = Chain(model, model.cross_kv(ctx), video, 7, stream.geo.timesteps, score_chunks=2)
    np.testing.assert_allclose(chain.reference.numpy(), np.concatenate(samples, axis=2), rtol=1e-4, atol=1e-4)
    assert chain.scored == [6, 7, 8, 9] and chain.error([None] * CFG.num_layers) == 0.0
    # a local layer changes the samples exactly where its span drops history
    span = LocalSpan(0, 2)
    out = chain.sample([span] + [None] * (CFG.num_layers - 1))
    np.testing.assert_allclose(out[:, :, :4].numpy(), chain.reference[:, :, :4].numpy(), rtol=1e-5, atol=1e-5)
    assert chain.error([span] + [None] * (CFG.num_layers - 1)) > 0


@pytest.mark.parametrize("reduction", [0.25, 0.5, 0.75])
def test_compared_layouts_stay_within_the_byte_budget(reduction):
    from types import SimpleNamespace

    from ispa_export.lab.regimes import layouts

    cfg = preset("demo")
    rng = np.random.default_rng(1)
    table = {s: (rng.gamma(1.0, size=6) / s.frames).tolist() for s in candidate_spans(cfg)}
    got = {lay.name: lay for lay in layouts(SimpleNamespace(losses=losses_of(table), chain=None), cfg, reduction,
                                                     IspaOptions())}
    assert set(got) == {"ispa", "ispa-nocorr", "drop", "sink-window", "uniform", "uniform-nosink"}
    budget = budget_frames(cfg, reduction)
    for lay in got.values():
        assert sum(cfg.max_frames if s is None else s.frames for s in lay.spans) <= budget, lay.name
        assert len({s for s in lay.spans if s is not None}) == 1  # one local cache group
    assert got["ispa"].spans == got["ispa-nocorr"].spans == allocate(losses_of(table), cfg, reduction)[0].spans
    per_layer = budget // cfg.num_layers
    assert got["uniform-nosink"].spans == [LocalSpan(0, per_layer)] * 6
    assert got["uniform"].spans == [LocalSpan(1, per_layer - 1)] * 6
    # drop: the fewest one-chunk layers that reach the budget, the lowest raw d
    k = len(got["drop"].layers)
    assert (6 - k) * 12 + 2 * k <= budget < (7 - k) * 12 + 2 * (k - 1)
    assert got["drop"].layers == sorted(np.argsort(table[LocalSpan(0, 2)], kind="stable")[:k].tolist())


def test_output_gate_keeps_corrections_only_if_they_lower_every_scored_chunks_sample_error():
    import copy

    from graphs.wan import Absorption

    model, ctx = build()
    opts = IspaOptions(kv_reduction=0.5, window=2, sink=1, warmup_chunks=8, tol=0.0, gate=False)
    _, mons, tr = plan(model, ctx, 0, opts)
    span = tr.allocation.spans[tr.layers[0]]
    corr = tr.losses[span].corrections
    og = output_gate(model, mons, tr.chain, tr.allocation, tr.losses, opts)
    assert og["layers"] == [l for l in tr.layers if corr[l] is not None and corr[l].kept]
    assert [c["chunk"] for c in og["chunks"]] == [7, 6, 5][:len(og["chunks"])] and og["chunks"]
    assert og["kept"] == all(c["error_corrected"] < c["error_uncorrected"] for c in og["chunks"])
    # the latest chunk's score, recomputed: a refit without it, the chain's sample error there
    trial = copy.deepcopy(model)
    for l in og["layers"]:
        sol = mons[span]._solve(mons[span].stats_excluding(l, 1), corr[l].rho)
        trial.blocks[l].self_attn.absorb(Absorption(opts.site, sol.weight_delta[None], sol.bias_delta[None]))
    assert og["chunks"][0]["error_corrected"] == pytest.approx(
        tr.chain.error(tr.allocation.spans, model=trial, last_chunks=1), rel=1e-9)
    assert og["chunks"][0]["error_uncorrected"] == pytest.approx(tr.chain.error(tr.allocation.spans, last_chunks=1))


def test_what_is_baked_is_what_the_gates_kept():
    model, ctx = build()
    opts = IspaOptions(kv_reduction=0.5, window=2, sink=1, warmup_chunks=8, tol=0.0)
    stream, mons, tr = transition(model, ctx, 0, opts)
    og = tr.calibration["output_gate"]
    corr = tr.losses[tr.span].corrections
    kept = [l for l in tr.layers if corr[l].kept]
    assert kept == (og["layers"] if og["kept"] else [])
    assert [l for l in tr.layers if model.blocks[l].self_attn.ispa_bias is not None] == kept
