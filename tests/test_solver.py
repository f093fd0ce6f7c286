"""Closed-form absorption: solver against a dense least-squares reference, streaming, edge cases."""

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ispa_export.errors import UserError
from ispa_export.method.solver import (COND_MAX, DEFAULT_RHO, AbsorptionStats, _cond_estimate,
                                corrected_residual, discrepancy, solve, solve_timing)

F = torch.float64
D_IN, D_OUT, N = 24, 20, 300


def _data(seed=0, n=N, d_in=D_IN, d_out=D_OUT, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d_in, dtype=F)  # anisotropic, like real activations
    a = torch.randn(n, d_in, generator=g, dtype=F) * scales + offset
    r = torch.randn(n, d_out, generator=g, dtype=F)
    x = torch.randn(n, d_in + 3, generator=g, dtype=F)
    return a, r, x


def _z(a):
    return torch.cat([a, torch.ones(len(a), 1, dtype=F)], 1)


def _lstsq_reference(a, r, penalty_diag):
    """Ridge as an ordinary least-squares problem: [Z; sqrt(P)] w = [R; 0]."""
    z = _z(a).numpy()
    A = np.vstack([z, np.diag(np.sqrt(penalty_diag))])
    B = np.vstack([r.numpy(), np.zeros((z.shape[1], r.shape[1]))])
    return np.linalg.lstsq(A, B, rcond=None)[0].T  # [D_out, D_in + 1]


def _augmented(sol):
    return torch.cat([sol.weight_delta, sol.bias_delta[:, None]], 1)


def _stats(a, r, x=None, name="blocks.3"):
    s = AbsorptionStats(name)
    s.update(a, r, x)
    return s


@pytest.mark.parametrize("penalty", ["trace", "centered"])
@pytest.mark.parametrize("rho", [1e-3, 0.1])
def test_solve_matches_lstsq_on_augmented_system(penalty, rho):
    a, r, _ = _data(offset=0.7)
    sol = solve(_stats(a, r), rho=rho, penalty=penalty)
    z = _z(a)
    d = D_IN + 1
    if penalty == "trace":
        lam = rho * float(torch.trace(z.T @ z)) / d
        pen = np.full(d, lam)
    else:
        lam = rho * float(((a - a.mean(0)) ** 2).sum()) / D_IN
        pen = np.r_[np.full(D_IN, lam), 0.0]
    assert sol.method == "cholesky" and math.isclose(sol.lambda_, lam, rel_tol=1e-12)
    ref = _lstsq_reference(a, r, pen)
    got = _augmented(sol).numpy()
    assert np.linalg.norm(got - ref) <= 1e-8 * np.linalg.norm(ref)
    # the in-sample fit report equals the direct computation
    direct = float(corrected_residual(sol, a, r).square().sum() / r.square().sum())
    assert math.isclose(sol.fit_residual, direct, rel_tol=1e-9)
    assert sol.condition_number is not None and 1 < sol.condition_number < COND_MAX


def test_planted_linear_residual_is_recovered():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2000, D_IN, generator=g, dtype=F) + 0.3
    w_true = torch.randn(D_OUT, D_IN + 1, generator=g, dtype=F)
    r = _z(a) @ w_true.T + 1e-6 * torch.randn(2000, D_OUT, generator=g, dtype=F)
    for penalty in ("trace", "centered"):
        sol = solve(_stats(a, r), rho=1e-9, penalty=penalty)
        assert torch.allclose(_augmented(sol), w_true, rtol=0, atol=1e-6)
        assert sol.fit_residual < 1e-12
    # the default rho still gets most of the way on well-sampled data
    sol = solve(_stats(a, r))
    assert sol.rho == DEFAULT_RHO["trace"]
    assert (_augmented(sol) - w_true).norm() < 0.05 * w_true.norm()


def test_streaming_updates_equal_batch_statistics():
    a, r, x = _data(seed=2)
    a16, r16 = a.to(torch.bfloat16), r.to(torch.float32)
    streamed = AbsorptionStats("s")
    for lo, hi in [(0, 1), (1, 1), (1, 57), (57, 200), (200, N)]:  # uneven, one empty
        streamed.update(a16[lo:hi], r16[lo:hi], x[lo:hi])
    batch = _stats(a16, r16, x)
    assert streamed.count == batch.count == N
    for k in ("G", "C", "sum_r", "sum_rr", "G_x", "C_x"):
        assert torch.allclose(getattr(streamed, k), getattr(batch, k), rtol=1e-12, atol=1e-10), k
    za = _z(a16.to(F))
    assert torch.allclose(batch.G, za.T @ za, rtol=1e-12)
    assert torch.allclose(batch.C, r16.to(F).T @ za, rtol=1e-12)
    assert torch.allclose(batch.G_x, _z(x).T @ _z(x), rtol=1e-12)
    assert math.isclose(float(batch.sum_rr), float(r16.to(F).square().sum()), rel_tol=1e-12)
    assert torch.allclose(batch.sum_r, r16.to(F).sum(0), rtol=1e-12, atol=0)


def test_merge_equals_single_accumulator():
    a, r, x = _data(seed=3)
    parts = [_stats(a[i::3], r[i::3], x[i::3]) for i in range(3)]  # e.g. three pass kinds
    merged = AbsorptionStats("layer")
    for p in parts:
        merged.merge(p)
    whole = _stats(a, r, x)
    assert merged.count == whole.count
    for k in ("G", "C", "sum_r", "sum_rr", "G_x", "C_x"):
        assert torch.allclose(getattr(merged, k), getattr(whole, k), rtol=1e-12, atol=1e-10), k
    # merging into an empty accumulator copies: the first part's own sums stay as they were
    assert torch.equal(parts[0].G, _stats(a[0::3], r[0::3], x[0::3]).G)
    assert merged.merge(AbsorptionStats()) is merged and merged.count == N
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(_stats(a, r))  # without x_in


def test_persistence_round_trip(tmp_path):
    a, r, x = _data(seed=4)
    s = _stats(a, r, x)
    path = tmp_path / "stats.safetensors"
    save_file(s.to_dict(), str(path))
    back = AbsorptionStats.from_dict(load_file(str(path)), name="blocks.3")
    assert back.count == N and back.has_x
    assert torch.equal(_augmented(solve(back)), _augmented(solve(s)))
    empty = AbsorptionStats.from_dict(AbsorptionStats().to_dict())
    assert empty.count == 0


def test_rank_k_truncations():
    a, r, _ = _data(seed=5, offset=2.0)
    s = _stats(a, r)
    full_sol = solve(s)
    full = _augmented(full_sol).numpy()
    u, sv, vt = np.linalg.svd(full, full_matrices=False)
    z = _z(a).numpy()
    A = z.T @ z + full_sol.lambda_ * np.eye(D_IN + 1)  # trace penalty
    ev, V = np.linalg.eigh(A)

    def objective(x):  # ridge objective above its minimum: tr((X - dW) A (X - dW)^T)
        e = x - full
        return float(np.trace(e @ A @ e.T))

    for k in (1, 3, 7):
        frob = solve(s, rank=k, rank_metric="frobenius")
        data = solve(s, rank=k)
        assert data.rank_metric == "data" and frob.rank == k
        for sol in (frob, data):
            got = _augmented(sol).numpy()
            assert np.linalg.matrix_rank(got, tol=1e-9 * sv[0]) == k
            direct = float(corrected_residual(sol, a, r).square().sum() / r.square().sum())
            assert math.isclose(sol.fit_residual, direct, rel_tol=1e-9)
        best = (u[:, :k] * sv[:k]) @ vt[:k]  # Eckart-Young on the full solution
        assert np.linalg.norm(_augmented(frob).numpy() - best) <= 1e-10 * np.linalg.norm(best)
        # reduced-rank ridge: [dW A^(1/2)]_k A^(-1/2) minimises the objective over rank k
        uw, sw, vwt = np.linalg.svd(full @ (V * np.sqrt(ev)) @ V.T)
        ref = ((uw[:, :k] * sw[:k]) @ vwt[:k]) @ (V / np.sqrt(ev)) @ V.T
        got = _augmented(data).numpy()
        assert np.linalg.norm(got - ref) <= 1e-8 * np.linalg.norm(ref)
        assert objective(got) < objective(_augmented(frob).numpy())
    assert np.allclose(_augmented(solve(s, rank=D_OUT)).numpy(), full, rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="rank"):
        solve(s, rank=0)
    with pytest.raises(UserError, match="rank"):
        solve(s, variant="bias", rank=2)
    with pytest.raises(UserError, match="rank metric"):
        solve(s, rank=2, rank_metric="spectral")


def test_bias_and_none_variants():
    a, r, _ = _data(seed=6)
    s = _stats(a, r)
    sol = solve(s, variant="bias")
    assert sol.method == "mean" and torch.count_nonzero(sol.weight_delta) == 0
    assert torch.allclose(sol.bias_delta, r.mean(0), rtol=1e-12, atol=0)
    assert math.isclose(sol.fit_residual, float((r - r.mean(0)).square().sum() / r.square().sum()),
                        rel_tol=1e-9)
    none = solve(s, variant="none")
    assert none.method == "zero" and none.fit_residual == 1.0
    assert none.weight_delta.shape == (D_OUT, D_IN) and not none.weight_delta.any()
    assert none.bias_delta.shape == (D_OUT,) and not none.bias_delta.any()


def test_adapter_site_uses_attention_input():
    a, r, x = _data(seed=7)
    s = _stats(a, r, x)
    sol = solve(s, site="adapter", rho=1e-3)
    z = _z(x)
    lam = 1e-3 * float(torch.trace(z.T @ z)) / z.shape[1]
    ref = _lstsq_reference(x, r, np.full(z.shape[1], lam))
    assert sol.weight_delta.shape == (D_OUT, x.shape[1])
    assert np.allclose(_augmented(sol).numpy(), ref, rtol=0, atol=1e-10)
    with pytest.raises(UserError, match="x_in"):
        solve(_stats(a, r), site="adapter")


def test_singular_gram_is_finite_and_reported():
    g = torch.Generator().manual_seed(8)
    a = torch.full((50, D_IN), 0.5, dtype=F)  # constant a_l: G has rank 1
    r = torch.randn(50, D_OUT, generator=g, dtype=F)
    s = _stats(a, r)
    ridge = solve(s)  # trace penalty: lambda > 0 keeps Cholesky usable
    assert ridge.method == "cholesky" and torch.isfinite(_augmented(ridge)).all()
    for sol in (solve(s, penalty="centered"), solve(s, rho=0.0)):  # lambda = 0: singular
        assert sol.method == "eigh" and sol.n_floored >= D_IN - 1
        assert sol.condition_number > COND_MAX
        assert torch.isfinite(_augmented(sol)).all()
        # every token has the same z, so the best prediction is the mean of r
        pred = r - corrected_residual(sol, a, r)
        assert torch.allclose(pred, r.mean(0).expand_as(r), atol=1e-8)
    # nearly collinear channels: Cholesky succeeds but the condition number is past COND_MAX
    a3, r3, _ = _data(seed=15)
    a3[:, 1] = a3[:, 0] * (1 + 1e-7 * torch.randn(N, generator=g, dtype=F))
    sol = solve(_stats(a3, r3), rho=0.0)
    assert torch.linalg.cholesky_ex(_z(a3).T @ _z(a3)).info == 0
    assert sol.method == "eigh" and sol.condition_number > COND_MAX
    assert torch.isfinite(_augmented(sol)).all() and sol.fit_residual < 1
    # fewer tokens than regressors, no ridge: also singular, also finite
    a2, r2, _ = _data(seed=9, n=10)
    sol = solve(_stats(a2, r2), rho=0.0, rank=3)
    assert sol.method == "eigh" and torch.isfinite(_augmented(sol)).all()


def test_zero_discrepancy_gives_exact_zero():
    a, _, x = _data(seed=10)
    s = _stats(a, torch.zeros(N, D_OUT), x)
    for kw in ({}, {"penalty": "centered"}, {"rank": 2}, {"rho": 0.0}, {"variant": "bias"},
               {"site": "adapter"}):
        sol = solve(s, **kw)
        assert not sol.weight_delta.any() and not sol.bias_delta.any(), kw
        assert sol.fit_residual == 0.0


def test_bad_inputs_raise_clear_errors():
    a, r, _ = _data(seed=11)
    s = AbsorptionStats("blocks.7")
    s.update(a[:10], r[:10])
    before = s.G.clone()
    bad = a.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(UserError, match=r"layer 'blocks.7'.*non-finite.*a_l"):
        s.update(bad, r)
    r_inf = r.clone()
    r_inf[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"non-finite.*\br\b"):
        s.update(a, r_inf)
    assert torch.equal(s.G, before) and s.count == 10  # a rejected batch leaves no trace
    with pytest.raises(ValueError, match="width"):
        s.update(a[:, :5], r)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        s.update(a[None], r)
    with pytest.raises(UserError, match="longer than the local span"):
        solve(AbsorptionStats("blocks.2"))
    with pytest.raises(UserError, match="variant"):
        solve(s, variant="lowrank")
    with pytest.raises(UserError, match="rho"):
        solve(s, rho=float("nan"))


def test_discrepancy_and_corrected_residual():
    a, r, _ = _data(seed=12)
    y = 2 * r
    assert math.isclose(discrepancy(r, y), 0.25, rel_tol=1e-12)
    assert discrepancy(r.reshape(10, 30, D_OUT), y.reshape(10, 30, D_OUT)) == discrepancy(r, y)
    # zero denominators stay finite; zero r over zero W_o a_g counts as no discrepancy
    assert discrepancy(torch.zeros(4, 3), torch.zeros(4, 3)) == 0.0
    assert math.isfinite(discrepancy(torch.ones(4, 3), torch.zeros(4, 3)))
    sol = solve(_stats(a, r))
    a32 = a.to(torch.float32)
    res = corrected_residual(sol, a32.reshape(3, 100, D_IN), r.reshape(3, 100, D_OUT))
    ref = r - _z(a32.to(F)) @ _augmented(sol).T
    assert res.dtype == F and torch.allclose(res.reshape(N, D_OUT), ref, rtol=1e-12, atol=1e-12)
    # held out: the correction fitted on one half reduces the discrepancy on the other half
    g = torch.Generator().manual_seed(13)
    a2 = torch.randn(2 * N, D_IN, generator=g, dtype=F)
    w2 = torch.randn(D_IN, D_OUT, generator=g, dtype=F)
    r2 = a2 @ w2 + 0.1 * torch.randn(2 * N, D_OUT, generator=g, dtype=F)
    fit = solve(_stats(a2[:N], r2[:N]))
    y2 = 5 * torch.randn(2 * N, D_OUT, generator=g, dtype=F)
    held_out = discrepancy(corrected_residual(fit, a2[N:], r2[N:]), y2[N:])
    assert held_out < 0.05 * discrepancy(r2[N:], y2[N:])


def test_condition_estimate_is_close_and_never_above_exact():
    g = torch.Generator().manual_seed(14)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F))
    ev = torch.logspace(0, 8, 60, dtype=F)
    A = (q * ev) @ q.T
    A = 0.5 * (A + A.T)
    est = _cond_estimate(A, torch.linalg.cholesky(A))
    exact = 1e8
    assert exact / 10 < est <= exact * (1 + 1e-6)


def test_solve_timing_prints():
    widths = [1536] + ([5120] if os.environ.get("ISPA_SOLVER_TIMING") else [])
    for d in widths:
        t = solve_timing(d, repeats=1 if d < 5000 else 3)
        assert t > 0
        print(f"solve at D={d}: {t:.3f} s (torch threads {torch.get_num_threads()})")


@pytest.mark.skipif(not os.environ.get("ISPA_SOLVER_SWEEP"),
                    reason="set ISPA_SOLVER_SWEEP=1 (~4 CPU-minutes)")
def test_default_rho_sweep():
    """Reruns the measurement behind DEFAULT_RHO: held-out error relative to the best per case."""
    import itertools
    d, rhos = 256, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    errs = {}  # (case, penalty, rho) -> held-out ||r - dW z||^2 / ||r||^2
    # spectrum exponent, unexplainable share of r, N / D, size of 4 large-mean channels
    cases = list(itertools.product([0.5, 1.0, 1.5], [0.1, 0.5, 0.9], [0.5, 1, 2, 4, 16],
                                   [0, 10, 100]))
    for case in cases:
        alpha, noise, ratio, big = case
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F))
        mu = 0.5 * torch.randn(d, generator=g, dtype=F)
        mu[:4] = big  # large-mean channels
        w = torch.randn(d, d, generator=g, dtype=F) / d ** 0.5
        b = 0.3 * torch.randn(d, generator=g, dtype=F)

        def make(n):
            spectrum = 3 * torch.arange(1, d + 1) ** -alpha
            a = mu + (torch.randn(n, d, generator=g, dtype=F) * spectrum) @ q
            a[:, :4] += 0.1 * big * torch.randn(n, 4, generator=g, dtype=F)
            lin = (a - mu) @ w.T + b
            e = torch.randn(n, d, generator=g, dtype=F)  # the part no linear map explains
            scale = (lin.square().mean() * noise / (1 - noise) / e.square().mean()).sqrt()
            return a, lin + e * scale

        (a, r), (ah, rh) = make(int(ratio * d)), make(2048)
        s = _stats(a, r)
        for pen, rho in itertools.product(["trace", "centered"], rhos):
            errs[case, pen, rho] = float(corrected_residual(solve(s, rho=rho, penalty=pen), ah, rh)
                                         .square().sum() / rh.square().sum())
    best = {c: min(v for k, v in errs.items() if k[0] == c) for c in cases}
    for pen in ("trace", "centered"):
        regret = {rho: [errs[c, pen, rho] / best[c] for c in cases] for rho in rhos}
        print(pen, "  ".join(f"{rho:.0e}: {np.mean(v):.3f}/{max(v):.2f}"
                             for rho, v in regret.items()))
        assert np.mean(regret[DEFAULT_RHO[pen]]) <= 1.05 * min(np.mean(v) for v in regret.values())
