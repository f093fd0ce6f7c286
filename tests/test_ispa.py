"""Warmup monitor, transition and bake on the tiny model (DESIGN.md sections 3-4).

What is shown: the streamed float64 statistics are the batch statistics of the tensors the monitor
saw; the corrected discrepancy is held out, and so is every rho's score; several spans measured in
one warmup equal one warmup per span; the bake folds exactly what the solver returned, only where
the gate keeps it; the correction generalises on a video that is correlated in time; the KV bytes
after the transition are the accounted ones and meet the target; degenerate inputs fail cleanly;
the transition rule. (The allocation itself: tests/test_policy.py.)
"""
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import ispa_export.method.monitor as monitor_mod
from graphs.config import preset
from graphs.masks import retained
from graphs.wan import FULL, LOCAL, WanModel
from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions, decide, report, transition
from ispa_export.kv import kv_bytes, layers_for_target
from ispa_export.method.monitor import LocalSpan, WarmupMonitor
from ispa_export.video.torch_runner import torch_stream
from runtimes.groups import Span
from ispa_export.method.solver import AbsorptionStats, corrected_residual, discrepancy, solve

F64 = torch.float64
# The full cache pins frame 0, so the L-layers' sink frame stays in it however long the warmup
# (CFG_ROLL, without the pin, caps the warmup: test_warmup_ends_before_the_sink_is_evicted).
CFG = preset("tiny").replace(max_frames=8, full_sink=1)
CFG_ROLL = preset("tiny").replace(max_frames=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Ops on the tiny model are microseconds; with several threads on a busy 2-core machine the
    # OpenMP hand-offs make each one ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return WanModel(cfg).eval(), torch.randn(1, 5, cfg.text_dim)


def moving_video(cfg=CFG, frames=16, seed=0) -> np.ndarray:
    """[1, C, frames, H, W] latents: a smooth sinusoidal pattern translating 1 px per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:cfg.latent_height, 0:cfg.latent_width].astype(np.float64)
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    chans = []
    for _ in range(cfg.in_dim):
        kx, ky, phase = rng.uniform(0.5, 1.2), rng.uniform(-0.6, 0.6), rng.uniform(0, 2 * np.pi)
        chans.append(np.sin(kx * (xx - t) + ky * yy + phase))
    return np.stack(chans)[None].astype(np.float32)


@dataclass
class RecordingMonitor(WarmupMonitor):
    """The production monitor, keeping a copy of every tensor it is given."""

    records: list = field(default_factory=list)

    def record(self, layer, x_in, a_global, a_locals, w_o):
        kept = self.stream.groups["kv_full"].frames[self.local_masks[0].numpy()]
        self.records.append(dict(layer=layer, chunk=self._info.chunk, kind=self._info.pass_kind,
                                 start=self._info.start, kept=sorted(int(f) for f in kept if f >= 0),
                                 x_in=x_in.clone(), a_g=a_global.clone(), a_l=a_locals[0].clone(), w_o=w_o.clone()))
        super().record(layer, x_in, a_global, a_locals, w_o)

    def select(self, layer, kind=None, chunks=None):
        return [r for r in self.records if r["layer"] == layer and (kind is None or r["kind"] == kind)
                and (chunks is None or r["chunk"] in chunks)]


def run(opts: IspaOptions, cfg=CFG, video=None, seed=0, prepare=None):
    """transition() with recording monitors; also returns the weights before the bake. The monitor
    returned is the L-layers' span's (the only one when opts fixes the span)."""
    model, ctx = build(cfg, seed)
    if prepare is not None:
        prepare(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(monitor_mod, "WarmupMonitor", RecordingMonitor)
        stream, monitors, tr = transition(model, ctx, 0, opts, video=video)
    model.monitors = monitors
    return model, stream, monitors[tr.span], tr, before


def flat(t):
    return t.reshape(-1, t.shape[-1]).to(F64)


def batch_stats(records):
    """G, C (and the adapter's) of z = [a_l; 1] (or [x_in; 1]) and r = W_o (a_g - a_l), in one batch."""
    a_l = torch.cat([flat(r["a_l"]) for r in records])
    x = torch.cat([flat(r["x_in"]) for r in records])
    res = torch.cat([(flat(r["a_g"]) - flat(r["a_l"])) @ r["w_o"].to(F64).T for r in records])
    one = torch.ones(len(a_l), 1, dtype=F64)
    z, zx = torch.cat([a_l, one], 1), torch.cat([x, one], 1)
    return dict(G=z.T @ z, C=res.T @ z, G_x=zx.T @ zx, C_x=res.T @ zx, sum_r=res.sum(0),
                sum_rr=res.square().sum(), count=len(a_l))


def rel(a, b):
    return float((a - b).norm() / b.norm()) if float(b.norm()) else float(a.norm())


# -- 1. streaming statistics == batch statistics; d* is held out ---------------------------------

def test_streaming_statistics_equal_batch_statistics():
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=6, tol=0.0, site="adapter", holdout_gap=1)
    model, stream, mon, tr, _ = run(opts, video=moving_video())
    span, f = opts.sink + opts.window, CFG.chunk_frames
    # Monitored: exactly the passes whose history is longer than the local span, every pass kind.
    assert mon.monitored_chunks == [c for c in range(opts.warmup_chunks) if c * f > span]
    assert mon.kinds() == list(range(len(stream.geo.timesteps) + 1))
    for r in mon.records:
        # a_l sees the sink frames and the newest `window` frames of the history, nothing else.
        assert r["kept"] == sorted(set(range(opts.sink)) | set(range(r["start"] - opts.window, r["start"])))
        assert r["a_g"].shape == r["a_l"].shape == r["x_in"].shape
    assert len(mon.records) == CFG.num_layers * len(mon.kinds()) * len(mon.monitored_chunks)

    for (layer, kind), s in mon.stats.items():
        ref = batch_stats(mon.select(layer, kind))
        assert s.count == ref["count"] == len(mon.monitored_chunks) * CFG.chunk_frames * CFG.tokens_per_frame
        for k in ("G", "C", "G_x", "C_x", "sum_r", "sum_rr"):
            assert rel(getattr(s, k), ref[k]) < 1e-10, (layer, kind, k)
    assert set(mon.stats) == {(l, k) for l in range(CFG.num_layers) for k in mon.kinds()}

    # Raw d and held-out d* of every chunk: d* uses the fit of the earlier chunks only.
    for layer in range(CFG.num_layers):
        for i, c in enumerate(mon.monitored_chunks):
            fit = None
            if i:
                past = AbsorptionStats()
                past.update(*(torch.cat(t) for t in zip(*[
                    (flat(r["a_l"]), (flat(r["a_g"]) - flat(r["a_l"])) @ r["w_o"].to(F64).T, flat(r["x_in"]))
                    for r in mon.select(layer, chunks=mon.monitored_chunks[:i])])))
                fit = solve(past, rho=opts.rho, site="adapter")
            for r in mon.select(layer, chunks=[c]):
                w = r["w_o"].to(F64)
                res = (flat(r["a_g"]) - flat(r["a_l"])) @ w.T
                raw = discrepancy(res, flat(r["a_g"]) @ w.T)
                corr = raw if fit is None else discrepancy(corrected_residual(fit, flat(r["x_in"]), res),
                                                           flat(r["a_g"]) @ w.T)
                got = mon.curves[layer][c][r["kind"]]
                assert math.isclose(got[0], raw, rel_tol=1e-10) and math.isclose(got[1], corr, rel_tol=1e-9)
            # every rho of the grid, scored on the chunk (all pass kinds) under the fit of the earlier
            # ones, minus the newest `holdout_gap` of them (a staler fit)
            gap = opts.holdout_gap
            fit = None
            if i > gap:
                past = AbsorptionStats()
                past.update(*(torch.cat(t) for t in zip(*[
                    (flat(r["a_l"]), (flat(r["a_g"]) - flat(r["a_l"])) @ r["w_o"].to(F64).T, flat(r["x_in"]))
                    for r in mon.select(layer, chunks=mon.monitored_chunks[:i - gap])])))
            recs = mon.select(layer, chunks=[c])
            z = torch.cat([flat(r["x_in"]) for r in recs])
            res = torch.cat([(flat(r["a_g"]) - flat(r["a_l"])) @ r["w_o"].to(F64).T for r in recs])
            y = torch.cat([flat(r["a_g"]) @ r["w_o"].to(F64).T for r in recs])
            entry = mon.heldout[layer][c]
            assert math.isclose(entry["raw"], discrepancy(res, y), rel_tol=1e-10)
            assert sorted(entry["rho"]) == ([] if i <= gap else sorted(monitor_mod.RHO_GRID))
            for rho, got in entry["rho"].items():
                want = discrepancy(corrected_residual(solve(past, rho=rho, site="adapter"), z, res), y)
                assert math.isclose(got, want, rel_tol=1e-7, abs_tol=1e-12), (layer, c, rho)


# -- 2. the bake folds exactly the solution ---------------------------------------------------------

@pytest.mark.parametrize("variant,site", [("full", "wo"), ("per_pass", "wo"), ("bias", "wo"), ("full", "adapter"),
                                          ("per_pass", "adapter")])
def test_bake_output_equals_original_plus_correction(variant, site):
    # gates off: every L-layer corrected with its held-out ridge, so the bake is checked on each
    # (the gates themselves: tests/test_policy.py)
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=5, tol=0.0, variant=variant, site=site,
                       calibrate=False, gate=False)
    model, stream, mon, tr, before = run(opts, video=moving_video())
    kinds = mon.kinds()
    assert len(tr.layers) == 2 and model.modes == [LOCAL if i in tr.layers else FULL for i in range(4)]
    for layer in tr.layers:
        attn = model.blocks[layer].self_attn
        w0, b0 = (before[f"blocks.{layer}.self_attn.o.{n}"].to(F64) for n in ("weight", "bias"))
        corr = tr.losses[tr.span].corrections[layer]
        assert corr.kept
        assert corr.corrected == min(corr.scores.values())
        if variant == "per_pass":
            sols = [mon.solution(layer, k, variant="full", rho=corr.rho) for k in kinds]
        else:
            sols = [mon.solution(layer, variant=variant, rho=corr.rho)]
        # Where the correction lives: folded into W_o only for one 'wo' weight; W_o untouched otherwise.
        folded = variant == "full" and site == "wo"
        assert (attn.ispa_weight is None) == (folded or variant == "bias")
        assert attn.ispa_bias.shape == (len(sols), CFG.dim)
        if not folded:
            assert torch.equal(attn.o.weight, before[f"blocks.{layer}.self_attn.o.weight"])
        assert torch.equal(attn.o.bias, before[f"blocks.{layer}.self_attn.o.bias"])
        assert model.per_pass_kind() == (variant == "per_pass")
        for r in mon.select(layer):
            k = kinds.index(r["kind"]) if variant == "per_pass" else 0
            a, x = flat(r["a_l"]), flat(r["x_in"])
            z = a if site == "wo" else x
            want = a @ w0.T + b0 + z @ sols[k].weight_delta.T + sols[k].bias_delta
            with torch.no_grad():
                got = attn.output(r["a_l"], r["x_in"], torch.tensor(r["kind"]))
            assert rel(flat(got), want) < 1e-5
    # The baked stream goes on and stays finite; the runner hands the scalars over as 0-d tensors
    # (a [1]-shaped pass_kind would pick a [1, D, D] slice of the per-pass corrections).
    shapes = {}
    forward = model.forward

    def spy(**kw):
        shapes.update({k: tuple(v.shape) for k, v in kw.items() if k in ("rope_frame", "pass_kind")})
        return forward(**kw)

    model.forward = spy
    assert np.isfinite(stream.step()).all()
    per_pass = variant == "per_pass"
    rope = {"rope_frame": (2, CFG.chunk_frames, model.rope_pairs)}
    assert shapes == (rope | {"pass_kind": ()} if per_pass else rope)


# -- 3. the correction generalises on a video correlated in time -------------------------------------

@pytest.mark.parametrize("variant,site", [("full", "wo"), ("full", "adapter"), ("bias", "wo")])
def test_held_out_corrected_below_raw_on_moving_pattern(variant, site):
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=8, tol=0.0, variant=variant, site=site)
    model, stream, mon, tr, _ = run(opts, video=moving_video())
    last = mon.monitored_chunks[-1]
    raw, corr = np.array([mon.chunk_discrepancy(l, last) for l in range(CFG.num_layers)]).T
    assert corr.mean() < raw.mean(), (raw, corr)
    # the warmup really was teacher-forced: the stored latents are the video's
    np.testing.assert_array_equal(np.concatenate(stream.latents, axis=2), moving_video()[:, :, :16])


# -- 4. KV bytes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_steady_state_kv_bytes_meet_target(target):
    window, sink = 1, 1  # one L-layer saves 6 of 8 frames: 75% reachable with every layer local
    opts = IspaOptions(kv_reduction=target, window=window, sink=sink, warmup_chunks=6, tol=10.0)
    model, stream, mon, tr, _ = run(opts)
    n = layers_for_target(CFG, target, window, sink)
    assert model.modes.count(LOCAL) == len(tr.layers) == n
    want = kv_bytes(CFG, model.layout)
    assert model.layout == [Span(sink, window) if i in tr.layers else None for i in range(4)]
    rep = report(model, model.monitors, tr, opts)
    for _ in range(3):  # at the transition and at steady state: the buffers have fixed sizes
        assert sum(g.nbytes for g in stream.groups.values()) == want.total
        assert rep["kv_reduction"] >= target
        assert math.isclose(rep["kv_reduction"], 1 - want.total / kv_bytes(CFG).total)
        # L-layers hold the sink frames and the newest `window` frames, F-layers the full window
        local, full = stream.groups[f"kv_s{sink}w{window}"], stream.groups.get("kv_full")
        assert sorted(local.frames) == list(range(sink)) + list(range(stream.frame_index - window, stream.frame_index))
        hist = [i for i in range(stream.frame_index) if retained(i, stream.frame_index, CFG.max_frames, 1)]
        assert (full is None) == (n == 4) and (full is None or sorted(full.frames[full.frames >= 0]) == hist)
        stream.step()
    assert len(tr.layers) == 4 or rep["kv_reduction"] - target < 6 / 32  # one layer fewer would miss it


def test_warmup_ends_before_the_sink_is_evicted():
    # No pin in the full cache: frame 0 leaves it once the history passes 8 frames. The warmup
    # stops at 8 frames, so the monitor's a_l and the L-caches cut at the transition hold it.
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=8, tol=0.0)
    model, stream, mon, tr, _ = run(opts, cfg=CFG_ROLL, video=moving_video(CFG_ROLL))
    assert tr.chunk == 4 and mon.monitored_chunks == [2, 3]
    assert tr.reason.startswith("warmup ended at 8 frames: the next chunk would evict")
    assert all(0 in r["kept"] for r in mon.records)
    assert sorted(stream.groups["kv_s1w2"].frames) == [0, 6, 7]
    stream.step()
    assert sorted(stream.groups["kv_s1w2"].frames) == [0, 8, 9]
    # a span whose second monitored chunk would come after the eviction cannot be fitted
    with pytest.raises(UserError, match=r"--sink 2/--window 2: the full cache of 8 frames evicts the L-layers' "
                                        r"sink frames after 9 frames of history"):
        run(IspaOptions(kv_reduction=0.25, window=2, sink=2, warmup_chunks=8), cfg=CFG_ROLL)
    # the monitor itself refuses to produce a_l without the sink
    model, ctx = build(CFG_ROLL)
    mon = WarmupMonitor(LocalSpan(1, 2), None)
    mon.stream = torch_stream(model, ctx, 0, before_pass=mon.before_pass)
    with pytest.raises(UserError, match=r"no longer holds sink frames \[0\]"):
        mon.stream.run(6)


# -- 5. degenerate inputs ----------------------------------------------------------------------------

def test_warmup_shorter_than_local_span_is_a_user_error():
    with pytest.raises(UserError, match=r"--warmup-chunks 2: the warmup ended with 4 frames of history, too short "
                                        r"to fit a correction for a local span of 3 frames"):
        run(IspaOptions(window=2, sink=1, warmup_chunks=2))
    # history longer than the span but one monitored chunk only: still too short (d* is not held out)
    with pytest.raises(UserError, match="too short"):
        run(IspaOptions(window=2, sink=1, warmup_chunks=3))


def test_zero_discrepancy_layer_gets_exact_zero_correction():
    def zero_wo(model):
        with torch.no_grad():
            model.blocks[1].self_attn.o.weight.zero_()

    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=6, tol=0.0)
    model, stream, mon, tr, _ = run(opts, prepare=zero_wo)
    assert 1 in tr.layers and tr.losses[tr.span].loss[1] == 0.0
    rep = report(model, model.monitors, tr, opts)
    assert rep["layers"][1]["raw_discrepancy"] == rep["layers"][1]["corrected_discrepancy"] == 0.0
    sol = mon.solution(1)
    assert torch.count_nonzero(sol.weight_delta) == 0 and torch.count_nonzero(sol.bias_delta) == 0
    # nothing to correct: the gate keeps the (zero) correction out
    assert rep["layers"][1]["correction"]["kept"] is False
    attn = model.blocks[1].self_attn
    assert torch.count_nonzero(attn.o.weight) == 0 and attn.ispa_bias is None
    assert np.isfinite(stream.step()).all()


@pytest.mark.parametrize("rho,method", [(0.0, "eigh"), (None, "cholesky")])
def test_singular_gram_gives_finite_correction_and_reports_method(rho, method):
    half = CFG.dim // 2

    def rank_deficient(model):  # half of layer 2's value channels are exactly zero -> a_l too
        with torch.no_grad():
            v = model.blocks[2].self_attn.v
            v.weight[:half].zero_()
            v.bias[:half].zero_()

    opts = IspaOptions(layers=[2], kv_reduction=None, window=2, sink=1, warmup_chunks=5, tol=0.0, rho=rho,
                       variant="per_pass", gate=False)
    model, stream, mon, tr, _ = run(opts, prepare=rank_deficient)
    sols = tr.absorption[2]["solutions"]
    assert len(sols) == len(mon.kinds()) and all(s["method"] == method for s in sols)
    if method == "eigh":
        assert all(s["n_floored"] >= half for s in sols)
    attn = model.blocks[2].self_attn
    assert torch.isfinite(attn.ispa_weight).all() and torch.isfinite(attn.ispa_bias).all()
    rep = json.loads(json.dumps(report(model, model.monitors, tr, opts), allow_nan=False))  # as report.json is written
    assert rep["layers"][2]["absorption"]["solutions"][0]["method"] == method
    assert all(math.isfinite(l["corrected_discrepancy"]) for l in rep["layers"])
    assert np.isfinite(stream.step()).all()


def test_nan_activations_are_a_user_error_and_bake_nothing():
    model, ctx = build()
    with torch.no_grad():
        model.blocks[2].self_attn.v.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="non-finite values"):
        transition(model, ctx, 0, IspaOptions(window=2, sink=1, warmup_chunks=6))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)
    assert all(b.self_attn.ispa_bias is None and b.self_attn.ispa_weight is None for b in model.blocks)
    assert all(torch.isfinite(b.self_attn.o.weight).all() for b in model.blocks)


def test_explicit_layers_are_honoured():
    opts = IspaOptions(layers=[3, 0], kv_reduction=None, window=2, sink=1, warmup_chunks=5, tol=10.0)
    model, stream, mon, tr, _ = run(opts)
    assert tr.layers == [0, 3] and model.modes == [LOCAL, FULL, FULL, LOCAL]
    assert stream.groups["kv_s1w2"].layers == (0, 3) and stream.groups["kv_full"].layers == (1, 2)
    assert report(model, model.monitors, tr, opts)["selected_layers"] == [0, 3]


@pytest.mark.parametrize("changes,message", [
    (dict(window=0), "--window must be >= 1"),
    (dict(sink=-1), "--sink >= 0"),
    (dict(kv_reduction=1.5), r"--kv-reduction: expected a fraction in \(0, 1\), got 1.5"),
    (dict(kv_reduction=0.0), "--kv-reduction"),
    (dict(kv_reduction=0.7), "out of reach"),  # window 2 + sink 1 of 8 frames saves at most 62.5%
    (dict(variant="lowrank"), "--variant: expected one of"),
    (dict(site="input"), "--site: expected one of"),
    (dict(warmup_chunks=0), "--warmup-chunks: expected at least 1"),
    (dict(tol=float("nan")), "tol"),
    (dict(layers=[4]), r"--layers: expected distinct indices in \[0, 4\)"),
    (dict(layers=[1, 1]), "--layers"),
    (dict(window=6, sink=2), "must be fewer than the full cache's 8 frames"),
    (dict(window=7, layers=[0]), "must be fewer than"),
])
def test_invalid_options_are_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        run(IspaOptions(**{"window": 2, "sink": 1, "warmup_chunks": 4} | changes))


def test_wrong_video_shape_is_a_user_error():
    opts = IspaOptions(window=2, sink=1, warmup_chunks=8)
    for video in (moving_video(frames=15), moving_video()[:, :3], moving_video()[0]):
        with pytest.raises(UserError, match=r"warmup video: expected latents \[B, C, T, H, W\]"):
            run(opts, video=video)


# -- 6. the transition rule and report.json --------------------------------------------------------

@pytest.mark.parametrize("window,sink,chunk", [(2, 1, 2), (1, 0, 2), (4, 1, 2), (2, 0, 3)])
def test_transition_at_earliest_eligible_chunk_when_tol_is_large(window, sink, chunk):
    cfg = CFG.replace(chunk_frames=chunk, max_frames=9)
    opts = IspaOptions(kv_reduction=0.25, window=window, sink=sink, warmup_chunks=10, tol=10.0)
    model, stream, mon, tr, _ = run(opts, cfg=cfg)
    span = window + sink
    first = span // chunk + 1  # the first chunk that starts after more than `span` frames of history
    # two held-out chunks, the first of them scored under a fit `holdout_gap` chunks older
    held = 3 + opts.holdout_gap
    assert mon.monitored_chunks == [first + i for i in range(held)]
    assert tr.chunk == stream.chunk == first + held and tr.reason.startswith("converged")
    assert tr.chunk * chunk >= span + chunk  # not before the history exceeds the span by a chunk


def convergence_change(tr, monitors):
    """The rule's number at the decision: max relative change of the L-layers' held-out d between
    their span's last two held-out chunks (the chosen rho's d* where the gate keeps it)."""
    out = 0.0
    for layer in tr.layers:
        mon, corr = monitors[tr.span], tr.losses[tr.span].corrections[layer]
        now, before = (mon.heldout[layer][c] for c in mon.heldout_chunks(layer)[-2:][::-1])
        pick = (lambda e: e["rho"][corr.rho]) if corr.kept else (lambda e: e["raw"])
        out = max(out, abs(pick(now) - pick(before)) / pick(before))
    return out


def test_transition_at_first_converged_chunk_or_at_maximum_warmup():
    # calibrate off: the rule decides on uncalibrated losses, so the final allocation is the rule's
    base = dict(kv_reduction=0.25, window=2, sink=1, warmup_chunks=9, calibrate=False)
    model, stream, mon, tr, _ = run(IspaOptions(**base, tol=0.0), video=moving_video(frames=18))
    assert tr.chunk == 9 and tr.reason == "maximum warmup of 9 chunks reached"
    assert mon.monitored_chunks == list(range(2, 9))
    # a tolerance just above the change at some chunk: the warmup stops there, not later
    for stop in range(5, 9):
        m2, s2, mon2, tr2, _ = run(IspaOptions(**dict(base, warmup_chunks=stop + 1), tol=0.0),
                                   video=moving_video(frames=18))
        change = convergence_change(tr2, m2.monitors)
        m3, s3, mon3, tr3, _ = run(IspaOptions(**base, tol=change * 1.0001), video=moving_video(frames=18))
        assert tr3.chunk <= stop + 1 and tr3.reason.startswith("converged")
        assert convergence_change(tr3, m3.monitors) < change * 1.0001
        # the curves are the same run's whatever the tolerance
        for c in mon3.monitored_chunks:
            assert mon3.curves[0][c] == mon.curves[0][c]


def test_decide_waits_for_history_and_two_monitored_chunks():
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=8, tol=10.0)
    mon = RecordingMonitor(LocalSpan(1, 2), None)
    assert decide(mon, 4, 1, opts, chunk=1, history=4, chunk_frames=2, last=False) is None
    mon.monitored_chunks = [2]
    assert decide(mon, 4, 1, opts, chunk=2, history=6, chunk_frames=2, last=False) is None
    with pytest.raises(UserError, match="too short"):
        decide(mon, 4, 1, opts, chunk=2, history=6, chunk_frames=2, last=True)


def test_report_fields_are_present_and_consistent():
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=6, tol=0.0)
    model, stream, mon, tr, _ = run(opts, video=moving_video())
    rep = json.loads(json.dumps(report(model, model.monitors, tr, opts), allow_nan=False))
    assert rep["transition_chunk"] == tr.chunk == stream.chunk == 6
    assert rep["selected_layers"] == tr.layers and rep["span"] == {"sink": 1, "window": 2}
    assert rep["kv_bytes_before"] == kv_bytes(CFG).total
    assert rep["kv_bytes_after"] == sum(g.nbytes for g in stream.groups.values())
    assert math.isclose(rep["kv_reduction"], 1 - rep["kv_bytes_after"] / rep["kv_bytes_before"])
    assert rep["kv_reduction"] >= 0.25
    assert rep["monitored_chunks"] == mon.monitored_chunks
    assert rep["allocation"]["local_layers"] == tr.layers
    assert rep["allocation"]["bytes"] <= rep["allocation"]["budget_bytes"]
    cal = rep["calibration"]
    assert cal["span"] == {"sink": 1, "window": 2} and len(cal["weight"]) == CFG.num_layers
    last = mon.monitored_chunks[-1]
    for l, entry in enumerate(rep["layers"]):
        assert entry["index"] == l and entry["mode"] == (LOCAL if l in tr.layers else FULL)
        assert entry["span"] == ({"sink": 1, "window": 2} if l in tr.layers else None)
        raw, corr = mon.chunk_discrepancy(l, last)
        assert math.isclose(entry["raw_discrepancy"], raw, rel_tol=1e-9)  # the held-out chunk's d
        c = entry["correction"]
        assert c["heldout_chunk"] == last and c["corrected"] == min(c["by_rho"].values())
        # the per-layer gate, then the output gate (it may drop what the per-layer gate kept)
        vetoed = l in cal["output_gate"]["layers"] and not cal["output_gate"]["kept"]
        assert c["kept"] == (c["corrected"] < c["raw"] and not vetoed)
        assert entry["corrected_discrepancy"] == c["corrected"]
        assert entry["effective_discrepancy"] == (c["corrected"] if c["kept"] else c["raw"])
        assert math.isclose(entry["predicted_loss"], entry["weight"] * entry["effective_discrepancy"], rel_tol=1e-12)
        assert math.isclose(entry["weight"], cal["effect"][l] / cal["discrepancy"][l], rel_tol=1e-9)
        assert sorted(map(int, entry["curve"])) == mon.monitored_chunks
        assert (entry["absorption"] is not None) == (l in tr.layers)
    # the L-layers are the lowest predicted losses (one span: the DP takes the n cheapest)
    # (as the DP saw them: a correction the output gate dropped afterwards still counted)
    loss = [e["weight"] * e["correction"]["corrected"]
            if l in cal["output_gate"]["layers"] and not cal["output_gate"]["kept"] else e["predicted_loss"]
            for l, e in enumerate(rep["layers"])]
    assert tr.layers == sorted(np.argsort(loss, kind="stable")[:2].tolist())
    assert rep["options"]["kv_reduction"] == 0.25
