"""The quality evaluation: protocol (same warmup, same noise, equal KV bytes), metrics, outputs."""
import json

import numpy as np
import pytest
import torch

from graphs.config import preset
from graphs.wan import WanModel
from ispa_export import cli
from ispa_export.errors import UserError
from ispa_export.builder.calibrate import IspaOptions
from ispa_export.kv import kv_bytes, layers_for_target
from ispa_export.lab import evaluate as ev
from ispa_export.lab.methods import REDUCTIONS, Method, alt_span, methods_for, span_fits
from ispa_export.lab.metrics import (PSNR_CAP, drift, flicker_energy, frames_of, psnr_frames, recall_of, ssim_frames,
                                     video_metrics)
from ispa_export.lab.report import render
from ispa_export.lab.rollouts import _chunk_of, rollout, warmup
from ispa_export.lab.videos import make_video
from ispa_export.video.torch_runner import torch_stream


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: a second intra-op thread only spins (10x the CPU time on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_demo():
    """A cut-down demo geometry (3-channel 16x16 frames) so the video paths run in a second."""
    torch.manual_seed(0)
    cfg = preset("demo").replace(dim=32, ffn_dim=64, num_heads=2, num_layers=2, latent_height=16, latent_width=16)
    return WanModel(cfg).eval(), torch.randn(1, 4, cfg.text_dim)


def tiny(**changes):
    torch.manual_seed(0)
    cfg = preset("tiny").replace(**changes)
    return WanModel(cfg).eval(), torch.randn(1, 5, cfg.text_dim)


# -- metrics ------------------------------------------------------------------------------------
def test_psnr_matches_its_definition_and_caps_equal_frames():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    gen = ref.copy()
    gen[1] += 0.1
    gen[2] -= 0.01
    p = psnr_frames(ref, gen)
    assert p[0] == PSNR_CAP
    for t, delta in ((1, 0.1), (2, 0.01)):
        mse = np.mean((gen[t].astype(np.float64) - ref[t]) ** 2)
        assert p[t] == pytest.approx(10 * np.log10(2.0**2 / mse), abs=1e-3)
        assert mse == pytest.approx(delta**2, rel=1e-3)


def test_ssim_flicker_and_drift():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    assert np.allclose(ssim_frames(ref, ref), 1.0)
    other = rng.uniform(-1, 1, ref.shape).astype(np.float32)
    assert np.abs(ssim_frames(ref, other)).max() < 0.1
    still = np.repeat(ref[:1], 4, axis=0)
    assert flicker_energy(still) == 0.0
    assert flicker_energy(ref) == pytest.approx(np.mean(np.diff(ref, axis=0) ** 2))
    # 8 frames: quarters are 2 frames; drift = mean(last 2) - mean(first 2).
    assert drift(np.arange(8.0)) == pytest.approx(6.5 - 0.5)
    m = video_metrics(ref, ref, flicker_energy(ref))
    assert m["psnr"] == PSNR_CAP and m["flicker"] == pytest.approx(1.0) and m["drift"] == 0.0


# -- methods at equal KV bytes ------------------------------------------------------------------
D_KEYS = ("corrected", "raw", "alt_corrected", "alt_raw")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sink,window", [(1, 2), (0, 3)])
def test_methods_hold_equal_kv_bytes_and_select_by_their_discrepancy(reduction, sink, window):
    cfg = preset("demo")
    rng = np.random.default_rng(2)
    d = {k: rng.permutation(cfg.num_layers).astype(float) for k in D_KEYS}
    methods, notes = methods_for(reduction, cfg, sink, window, d, variants=True, rank=4, rhos=(0.1,))
    n = layers_for_target(cfg, reduction, window, sink)
    by = {m.name: m for m in methods}
    alt = "ispa-nosink" if sink else "ispa-sink1"
    assert {"ispa", alt, "ispa-nocorr", "drop", "sink-window", "uniform", "uniform-nosink"} <= set(by), notes
    lowest = lambda d: tuple(sorted(np.argsort(d)[:n].tolist()))  # noqa: E731
    # (sink, window) of each method, and the discrepancy its layers are chosen by: the span's own.
    plain, with_sink = ("alt_raw", "raw") if sink else ("raw", "alt_raw")
    assert by["ispa"].layers == by["ispa-nocorr"].layers == by["ispa-rho0.1"].layers == lowest(d["corrected"])
    assert by[alt].layers == lowest(d["alt_corrected"]) and by["ispa-rawsel"].layers == lowest(d["raw"])
    assert by["drop"].layers == lowest(d[plain]) and (by["drop"].sink, by["drop"].window) == (0, 3)
    assert by["sink-window"].layers == lowest(d[with_sink]) and by["sink-window"].sink == max(sink, 1)
    assert (by[alt].sink, by[alt].window) == ((0, 3) if sink else (1, 2))
    assert by["ispa"].variant == "full" and by["ispa-nocorr"].variant == by["drop"].variant == "none"
    # Each correction comes from the statistics of its own span and site.
    assert by["ispa"].stats == "wo" and by["ispa-adapter"].stats == "adapter"
    assert by[alt].stats == by[f"{alt}-per_pass"].stats == "alt"
    assert by[f"{alt}-adapter"].stats == "alt-adapter" and by[f"{alt}-adapter"].site == "adapter"
    keys = [by[n].key() for n in ("ispa", alt, "ispa-nocorr", "ispa-per_pass", "ispa-bias", "ispa-adapter",
                                  "ispa-rank4", "ispa-rho0.1")]
    assert len(set(keys)) == len(keys)  # distinct runs, never merged by the de-duplication
    full = kv_bytes(cfg).total
    sizes = {kv_bytes(cfg, m.spans(cfg.num_layers)).total for m in methods}
    assert len(sizes) == 1  # demo, span 3: every uniform span is whole
    assert 1 - sizes.pop() / full >= reduction
    assert len(by["uniform"].layers) == len(by["uniform-nosink"].layers) == cfg.num_layers


def test_uniform_is_rounded_down_and_said_when_its_span_is_not_whole():
    cfg = preset("demo")  # sink 0 + window 2 at 50%: 4 layers local, 2 * 12 + 4 * 2 = 32 frames over 6 layers
    d = dict.fromkeys(D_KEYS, np.arange(6.0))
    methods, notes = methods_for(0.5, cfg, 0, 2, d)
    by = {m.name: m for m in methods}
    budget = kv_bytes(cfg, by["ispa"].spans(6)).total
    assert (by["uniform-nosink"].sink, by["uniform-nosink"].window) == (0, 5)
    assert (by["uniform"].sink, by["uniform"].window) == (1, 4)
    for name in ("uniform", "uniform-nosink"):
        assert kv_bytes(cfg, by[name].spans(6)).total < budget
    assert any("FEWER KV bytes" in n for n in notes)
    # Without the other span's statistics there is no sink-window baseline, and that is said too.
    methods, notes = methods_for(0.5, cfg, 0, 2, {k: d[k] for k in ("corrected", "raw")})
    assert "sink-window" not in {m.name for m in methods} and any(n.startswith("sink-window") for n in notes)


# -- the protocol -------------------------------------------------------------------------------
def test_runs_continue_the_warmup_with_the_reference_noise():
    model, ctx = tiny()
    opts = IspaOptions(kv_reduction=0.5, window=2, sink=1, warmup_chunks=8)
    w = warmup(model, ctx, 7, opts, layers_for_target(model.cfg, 0.5, 2, 1))
    ref, held = rollout(w, None, 3)
    # One uninterrupted all-F stream of the same seed: the reference is its continuation, bit for bit.
    direct = torch_stream(model, ctx, 7).run(w.chunk + 3)
    assert np.array_equal(ref, direct[:, :, w.chunk * model.cfg.chunk_frames:])
    assert held == kv_bytes(model.cfg).total
    # The warmup's copy is untouched by the runs made from it.
    again, _ = rollout(w, Method("x", tuple(range(4)), 1, 2, "full"), 3)
    assert not np.allclose(again, ref)
    assert np.array_equal(rollout(w, None, 3)[0], ref)
    assert w.model.modes == ["F"] * 4 and w.model.blocks[0].self_attn.ispa_bias is None


def test_default_sink_follows_the_export_and_the_sink_horizon():
    # the fixed-span comparison's plain window (the export's policy picks its own sink per video)
    assert IspaOptions().sink is None and ev.default_sink(preset("demo"), 2) == 0
    for sink, window in ((1, 2), (2, 2), (1, 4), (0, 8), (1, 1)):
        assert span_fits(preset("demo"), sink, window)
    assert not span_fits(preset("demo"), 1, 8) and not span_fits(preset("demo"), 0, 12)
    # A 6-frame cache evicts frame 0 before two chunks past a 3-frame span can be monitored.
    assert not span_fits(preset("tiny").replace(max_frames=6), 1, 2)
    assert alt_span(preset("demo"), 0, 2) == (1, 1) and alt_span(preset("demo"), 1, 2) == (0, 3)
    assert alt_span(preset("tiny").replace(max_frames=6), 0, 3) is None
    # The full run's sweep starts with one frame more without a sink (exact 50% bytes) and ISPA on
    # the uniform plain-window layout (every layer 6 of 12 frames), both with the variants.
    spans = ev.settings_for(preset("demo"), quick=False).spans
    assert spans[:2] == ((0, 3, True), (0, 6, True)) and (0, 2, False) not in spans
    assert ev.settings_for(preset("demo"), quick=True).spans == ()
    # Where the sweep runs a span, the warmup indeed reaches a decision.
    model, ctx = tiny(max_frames=6)
    opts = IspaOptions(kv_reduction=0.25, window=2, sink=0, warmup_chunks=8)
    assert warmup(model, ctx, 1, opts, 1, adapter=False).chunk <= 8
    with pytest.raises(UserError, match="sink"):
        warmup(model, ctx, 1, IspaOptions(kv_reduction=0.25, window=2, sink=1, warmup_chunks=8), 1)


def test_warmup_is_teacher_forced_by_the_procedural_video():
    model, ctx = small_demo()
    cfg = model.cfg
    sample = ev._video_for(cfg, 3, 40, teacher_force=True)
    assert sample is not None and sample.frames.shape == (40, 3, 16, 16)
    opts = IspaOptions(kv_reduction=0.5, window=2, sink=1, warmup_chunks=8)
    w = warmup(model, ctx, 3, opts, 1, sample.frames, adapter=False)
    got = frames_of(np.concatenate(w.stream.latents, axis=2))
    assert np.array_equal(got, sample.frames[:w.chunk * cfg.chunk_frames])
    # A model drawing latents that are not 3-channel pictures gets no video.
    assert ev._video_for(preset("tiny"), 3, 40, teacher_force=True) is None


def test_teacher_forced_runs_score_each_chunks_sample_on_the_true_history():
    model, ctx = small_demo()
    cfg = model.cfg
    sample = ev._video_for(cfg, 3, 40, teacher_force=True)
    opts = IspaOptions(kv_reduction=0.5, window=2, sink=1, warmup_chunks=8)
    w = warmup(model, ctx, 3, opts, 1, sample.frames, adapter=False)
    ref, _ = rollout(w, None, 4, sample.frames)
    # The same thing by hand: an all-F stream fed the whole video; each chunk's last denoising step.
    stream = torch_stream(model, ctx, 3)
    f = cfg.chunk_frames
    samples = []
    for c in range(w.chunk + 4):
        stream.step(_chunk_of(sample.frames, c, f))
        samples.append(stream.sample)
    assert np.array_equal(ref, np.concatenate(samples[w.chunk:], axis=2))
    # Samples, not the given frames: they differ from the video, and a free run differs from both.
    assert not np.allclose(ref, sample.frames[w.chunk * f:(w.chunk + 4) * f].transpose(1, 0, 2, 3)[None])
    free, _ = rollout(w, None, 4)
    assert not np.allclose(ref[:, :, f:], free[:, :, f:])
    # The first chunk after the transition has the same history in both protocols.
    assert np.array_equal(ref[:, :, :f], free[:, :, :f])


def test_recall_of_the_ground_truth_is_one():
    sample = make_video(11, 60, 32)
    assert recall_of(sample.frames, sample, 0) == pytest.approx(1.0)


# -- the command ----------------------------------------------------------------------------------
def test_eval_command_quick_on_tiny(tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", "tiny", "--quick", "--out", str(out)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("Free-running after the transition, at 50% KV reduction (target; ") and "best drop baseline" in key
    for name in ("eval.json", "EVAL.md", "quality_vs_memory.png", "side_by_side.gif"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "eval.json").read_text())
    cfg = preset("tiny")
    full = kv_bytes(cfg).total
    assert summary["full_kv_bytes"] == full
    seed = summary["seeds"][0]
    assert summary["settings"]["sink"] == 0 and summary["settings"]["window"] == 2  # the export's defaults
    # No 3-channel pictures, no video: only the free-running protocol.
    assert summary["protocols"] == ["free"] and not seed["teacher_forced_warmup"]
    free = seed["protocols"]["free"]
    assert set(free["reductions"]) == {"0.25", "0.5", "0.75"} and not seed["skipped_reductions"]
    assert seed["total_chunks"] >= 4 * seed["transition_chunk"]
    assert seed["total_chunks"] * cfg.chunk_frames > cfg.max_frames
    for r, red in free["reductions"].items():
        rows = red["methods"]
        assert {"ispa", "ispa-sink1", "ispa-nocorr", "drop", "sink-window", "uniform-nosink"} <= set(rows)
        # Equal bytes; a uniform layout only ever fewer (rounded down), and then it says so.
        assert {row["kv_bytes"] for n, row in rows.items() if not n.startswith("uniform")} == {red["kv_bytes"]}
        for n in ("uniform", "uniform-nosink"):
            if n in rows and rows[n]["kv_bytes"] != red["kv_bytes"]:
                assert rows[n]["kv_bytes"] < red["kv_bytes"] and any("FEWER" in x for x in red["notes"])
        assert red["kv_bytes"] <= (1 - float(r)) * full
        for row in rows.values():
            assert 0 < row["psnr"] <= PSNR_CAP and -1 <= row["ssim"] <= 1 and row["flicker"] > 0
            assert len(row["psnr_per_frame"]) == seed["frames_after_transition"]
        if rows["ispa-nocorr"]["layers"] == rows["drop"]["layers"]:
            # The same configuration (sink 0 + window 2, no correction) is one run, under both names.
            assert rows["drop"]["same_run_as"] == "ispa-nocorr"
            assert rows["ispa-nocorr"]["psnr_per_frame"] == rows["drop"]["psnr_per_frame"]
    md = (out / "EVAL.md").read_text()
    assert summary["key_lines"]["free"] in md and "| 50% (" in md and "| ispa |" in md
    # The report can be rebuilt from eval.json alone, to the byte.
    (out / "EVAL.md").unlink()
    assert render(out)["key_lines"] == summary["key_lines"]
    assert (out / "EVAL.md").read_text() == md
    with pytest.raises(UserError, match="eval.json: missing"):
        render(tmp_path)
    # --render through `ispa eval` too: the command has every option of python -m ispa_export.lab.evaluate.
    assert cli.main(["eval", "--render", "--out", str(out)]) == 0
    assert (out / "EVAL.md").read_text() == md


def test_eval_command_takes_seeds_and_refuses_bad_ones(tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", "tiny", "--quick", "--seeds", "1002", "--out", str(out)]) == 0
    assert [s["seed"] for s in json.loads((out / "eval.json").read_text())["seeds"]] == [1002]
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--seeds", "1,x"])
    assert e.value.code == 2
    assert "expected comma-separated integer seeds, got '1,x'" in capsys.readouterr().err


def test_variants_and_span_sweep_on_tiny(tmp_path):
    model, ctx = tiny()
    settings = ev.Settings(seeds=[5], reductions=(0.5, 0.9), sink=1, window=2, min_chunks=8, variants=True, rank=4,
                           rhos=(0.1,), spans=((0, 2, True), (1, 8, False)))
    summary = ev.run_eval(model, ctx, settings, tmp_path, "tiny", quick=True, log=lambda m: None)
    # 90% is out of reach with 3 of 8 frames kept per layer: skipped, and said.
    assert "0.9" in summary["seeds"][0]["skipped_reductions"] and "0.9: KV reduction" in (tmp_path / "EVAL.md").read_text()
    rows = summary["seeds"][0]["protocols"]["free"]["reductions"]["0.5"]["methods"]
    want = {"ispa-per_pass", "ispa-bias", "ispa-adapter", "ispa-rawsel", "ispa-rank4", "ispa-rho0.1",
            "ispa-nosink", "ispa-nosink-adapter", "ispa-nosink-per_pass"}
    assert want <= set(rows)
    assert len({row["kv_bytes"] for row in rows.values()}) == 1
    # Distinct corrections give distinct videos (the per-pass, adapter and rank-k paths really ran).
    distinct = ("ispa", "ispa-per_pass", "ispa-adapter", "ispa-rank4", "ispa-nosink", "ispa-nosink-adapter")
    frames = {n: tuple(rows[n]["psnr_per_frame"]) for n in distinct}
    assert len(set(frames.values())) == len(distinct)
    sweep = summary["sweep"]
    ran = {r["setting"] for r in sweep if "note" not in r}
    assert ran == {"sink 0 + window 2"}
    assert any(r["setting"] == "sink 1 + window 8" and "note" in r for r in sweep)  # span >= cache: refused
    by = {r["method"]: r for r in sweep if r["setting"] == "sink 0 + window 2"}
    assert {"ispa", "drop", "sink-window", "ispa-adapter", "ispa-rho0.1"} <= set(by)  # variants where asked
    assert "## Other spans at 50% KV reduction" in (tmp_path / "EVAL.md").read_text()


def test_parallel_seeds_give_the_same_results():
    # --jobs 2 runs the seeds in worker processes; the results must be those of the serial run.
    model, ctx = small_demo()
    s = ev.Settings(seeds=[3, 4], reductions=(0.5,), sink=0, window=2, min_chunks=12, protocols=("free",))
    serial = ev.evaluate_seeds(model, ctx, s, jobs=1)
    parallel = ev.evaluate_seeds(model, ctx, s, jobs=2)
    assert [r["seed"] for r in parallel] == [3, 4]
    for a, b in zip(serial, parallel):
        fa, fb = a.pop("_frames"), b.pop("_frames")
        assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
        assert _untimed(a) == _untimed(b)


def _untimed(x):
    """x without its wall-clock fields (*seconds), which differ from run to run."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not k.endswith("seconds")}
    return [_untimed(v) for v in x] if isinstance(x, (list, tuple)) else x
