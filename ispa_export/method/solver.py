"""Closed-form absorption (DESIGN section 4): streaming float64 statistics and the ridge solve.

For one layer, regressors z = [a_l ; 1] (site 'wo') or z = [x_in ; 1] (site 'adapter') and
targets r = W_o (a_g - a_l). The correction is dW = C (G + lambda I)^-1 with G = sum z z^T,
C = sum r z^T and lambda = rho * trace(G) / (D + 1) (penalty 'trace'; 'centered' is the
alternative, see PENALTIES). It is folded as W_o' = W_o + dW[:, :D] and b_o' = b_o + dW[:, D]
(torch Linear convention, weight [out, in]).

Independent of the model: callers flatten batch and tokens to [N, D] before calling update().
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ispa_export.errors import UserError

# Ridge penalties. 'trace' is DESIGN section 4 as written: lambda I on G with
# lambda = rho * trace(G) / (D + 1), the bias entry penalised too. 'centered' puts lambda on the
# weight block only, lambda = rho * trace(centred scatter of a_l) / D, bias unpenalised: the
# same as ridge on mean-centred activations, so a constant offset in a_l (large-mean channels)
# neither inflates lambda nor shrinks the bias.
PENALTIES = ("trace", "centered")
# Default rho per penalty, measured on planted data (D = 256; power-law activation spectra with
# exponent 0.5/1/1.5; unexplainable share of r 10/50/90%; N/D 0.5..16; with and without 4
# large-mean channels; held-out ||r - dW z||^2 / ||r||^2 relative to the best penalty and rho per
# case, mean / worst over 135 cases):
#   trace    rho 1e-3: 1.32/5.7   3e-3: 1.29/3.6   1e-2: 1.29/3.0   3e-2: 1.30/3.3   1e-1: 1.33/3.7
#   centered rho 1e-2: 1.21/3.2   3e-2: 1.12/2.2   1e-1: 1.05/1.6   3e-1: 1.03/1.4
# 'trace' has no good rho once large-mean channels are present (best 1e-3 with, 1e-1 without);
# 'centered' is flat around 0.1. Small N/D (per-pass-kind statistics of a short warmup, e.g. 14B:
# ~4.7k tokens per pass and chunk at D = 5120) is where a too-small rho hurts most.
# Rerun: ISPA_SOLVER_SWEEP=1 pytest tests/test_solver.py -k sweep -s (~4 CPU-minutes).
DEFAULT_RHO = {"trace": 1e-2, "centered": 1e-1}

# Above this condition number of G + P (the penalised Gram) the Cholesky solution loses too many
# of float64's 16 digits; the eigendecomposition with an eigenvalue floor at
# lambda_max / COND_MAX takes over.
COND_MAX = 1e12

VARIANTS = ("full", "bias", "none")
# Rank-k truncation of the augmented [weight_delta | bias_delta]: 'data' keeps the rank-k matrix
# that minimises the ridge objective itself (reduced-rank ridge: project dW onto the top-k left
# singular vectors of dW A^(1/2), A = G + P); 'frobenius' keeps the best rank-k approximation of
# dW as a matrix. Measured on planted data (D = 128, N = 8D, k = 4/16/48): equal without an
# activation offset, but with a mean offset in a_l the bias column -W_true mu dominates dW's
# spectrum and 'frobenius' raised the held-out error from 0.31 to 0.61..0.89 (of ||r||^2) where
# 'data' stayed at 0.30..0.31.
RANK_METRICS = ("data", "frobenius")
SITES = ("wo", "adapter")
_F64 = torch.float64


def _augment(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)


class AbsorptionStats:
    """Streaming sums for one layer (and optionally one pass kind); never stores tokens.

    G = sum z z^T, C = sum r z^T with z = [a_l; 1]; sum_r and sum_rr = sum ||r||^2 for the bias
    variant and the fit report; G_x, C_x the same with z = [x_in; 1] when x_in is given (the
    parallel-adapter site). Either every update carries x_in or none does.
    """

    def __init__(self, name: str | None = None, dtype: torch.dtype = _F64,
                 device: torch.device | str | None = None) -> None:
        self.name = name
        # Partial sums of one chunk may be float32 on a GPU (big models), folded into float64
        # totals elsewhere (`copy_to`, `merge`); `device` None keeps the sums where the data are.
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self.G: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.sum_r: torch.Tensor | None = None
        self.sum_rr: torch.Tensor | None = None
        self.G_x: torch.Tensor | None = None
        self.C_x: torch.Tensor | None = None

    def _who(self) -> str:
        return f"layer {self.name!r}" if self.name is not None else "absorption statistics"

    @property
    def has_x(self) -> bool:
        return self.G_x is not None

    def update(self, a_l: torch.Tensor, r: torch.Tensor, x_in: torch.Tensor | None = None) -> None:
        """Add N tokens: a_l [N, D_in], r [N, D_out], x_in [N, D_x] (any float dtype)."""
        tensors = {"a_l": a_l, "r": r} | ({} if x_in is None else {"x_in": x_in})
        for key, t in tensors.items():
            if t.ndim != 2 or t.shape[0] != r.shape[0]:
                raise ValueError(f"{self._who()}: {key} must be [N, D] with N = {r.shape[0]} "
                                 f"(flatten batch and tokens first), got {tuple(t.shape)}")
        if self.count and (x_in is not None) != self.has_x:
            raise ValueError(f"{self._who()}: x_in given in some updates but not in others")
        if self.G is not None:
            want = {"a_l": self.G.shape[0] - 1, "r": self.C.shape[0]}
            want |= {"x_in": self.G_x.shape[0] - 1} if self.has_x else {}
            for key, t in tensors.items():
                if t.shape[1] != want[key]:
                    raise ValueError(f"{self._who()}: {key} width {t.shape[1]} differs from the "
                                     f"earlier updates' {want[key]}")
        if r.shape[0] == 0:
            return
        dev = self.device or r.device
        t64 = {k: t.to(device=dev, dtype=self.dtype) for k, t in tensors.items()}
        # One float64 sum per input is cheap and catches any NaN/Inf (bf16 values cannot overflow
        # it) before anything is accumulated, so a bad batch leaves the statistics untouched.
        bad = [k for k, t in tensors.items() if not torch.isfinite(t.to(_F64).sum())]
        if bad:
            raise UserError(f"{self._who()}: non-finite values (NaN/Inf) in {', '.join(bad)} fed "
                            "to the absorption statistics; the warmup activations overflowed or "
                            "diverged")
        z, rr = _augment(t64["a_l"]), t64["r"]
        if self.G is None:
            d, dout, dt = z.shape[1], rr.shape[1], self.dtype
            self.G = torch.zeros(d, d, dtype=dt, device=dev)
            self.C = torch.zeros(dout, d, dtype=dt, device=dev)
            self.sum_r = torch.zeros(dout, dtype=dt, device=dev)
            self.sum_rr = torch.zeros((), dtype=dt, device=dev)
            if x_in is not None:
                dx = x_in.shape[1] + 1
                self.G_x = torch.zeros(dx, dx, dtype=dt, device=dev)
                self.C_x = torch.zeros(dout, dx, dtype=dt, device=dev)
        self.G.addmm_(z.mT, z)
        self.C.addmm_(rr.mT, z)
        self.sum_r += rr.sum(0)
        self.sum_rr += rr.square().sum()
        if x_in is not None:
            zx = _augment(t64["x_in"])
            self.G_x.addmm_(zx.mT, zx)
            self.C_x.addmm_(rr.mT, zx)
        self.count += r.shape[0]

    _SUMS = ("G", "C", "sum_r", "sum_rr", "G_x", "C_x")

    def merge(self, other: AbsorptionStats) -> AbsorptionStats:
        """Add another accumulator's sums into this one (pass kinds into a layer, a chunk's partial
        sums into the totals), in this one's dtype and on its device; returns self."""
        if other.count == 0:
            return self
        if self.count == 0:
            for k in self._SUMS:
                v = getattr(other, k)
                setattr(self, k, None if v is None else v.to(device=self.device or v.device, dtype=self.dtype,
                                                             copy=True))
            self.count = other.count
            return self
        if (self.has_x, self.G.shape, self.C.shape) != (other.has_x, other.G.shape, other.C.shape):
            raise ValueError(f"{self._who()}: cannot merge statistics of different shapes or sites")
        for k in ("G", "C", "sum_r", "sum_rr") + (("G_x", "C_x") if self.has_x else ()):
            mine = getattr(self, k)
            mine.add_(getattr(other, k).to(device=mine.device, dtype=mine.dtype))
        self.count += other.count
        return self

    def copy_to(self, device: torch.device | str | None = None, dtype: torch.dtype = _F64) -> AbsorptionStats:
        """A copy in `dtype` on `device` (None: where it is): the solve's float64 view of totals kept
        on the host, or of float32 partial sums."""
        return AbsorptionStats(self.name, dtype, device).merge(self)

    def nbytes(self) -> int:
        """Bytes of the sums held (exact: element counts times itemsize)."""
        return sum(v.numel() * v.element_size() for k in self._SUMS if (v := getattr(self, k)) is not None)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict (safetensors-ready, contiguous, on CPU)."""
        out = {"count": torch.tensor([self.count], dtype=torch.int64)}
        for k in ("G", "C", "sum_r", "sum_rr", "G_x", "C_x"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v.detach().to("cpu").contiguous()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], name: str | None = None) -> AbsorptionStats:
        s = cls(name)
        s.count = int(d["count"].reshape(-1)[0])
        for k in ("G", "C", "sum_r", "sum_rr", "G_x", "C_x"):
            if k in d:
                setattr(s, k, d[k].to(_F64).clone())
        return s


@dataclass
class Solution:
    """weight_delta [D_out, D_in] and bias_delta [D_out] (float64) plus how they were obtained."""

    weight_delta: torch.Tensor
    bias_delta: torch.Tensor
    variant: str
    site: str
    penalty: str
    method: str  # 'cholesky' | 'eigh' (fallback) | 'mean' (bias variant) | 'zero' (none variant)
    rho: float
    lambda_: float  # on every entry ('trace') or on the weight block only ('centered')
    condition_number: float | None  # of G + P; an estimate on the Cholesky path
    rank: int | None
    rank_metric: str | None
    count: int
    fit_residual: float  # in-sample sum ||r - dW z||^2 / sum ||r||^2 (0 when r == 0)
    n_floored: int = 0  # eigenvalues raised to the floor on the 'eigh' path


def _cond_estimate(A: torch.Tensor, L: torch.Tensor, iters: int = 15) -> float:
    """lambda_max / lambda_min of SPD A = L L^T by power and inverse-power iteration.

    Each step is O(D^2) (memory-bound: ~0.05 s at D = 5120 on CPU). Rayleigh quotients bound
    lambda_max from below and lambda_min from above, so this can only underestimate; exact
    eigenvalues would cost more than the solve itself.
    """
    g = torch.Generator().manual_seed(0)
    v = torch.randn(A.shape[0], 2, generator=g, dtype=_F64, device="cpu").to(A.device)  # the generator is a CPU one
    hi, lo = v[:, :1], v[:, 1:]
    for _ in range(iters):
        hi = A @ hi
        hi = hi / hi.norm()
        lo = torch.linalg.solve_triangular(L, lo, upper=False)  # cholesky_solve is 10x slower here
        lo = torch.linalg.solve_triangular(L.mT, lo, upper=True)
        lo = lo / lo.norm()
    lmax = float((hi.mT @ A @ hi).squeeze())
    lmin = float((lo.mT @ A @ lo).squeeze())
    return lmax / lmin if lmin > 0 else float("inf")


def solve(stats: AbsorptionStats, rho: float | None = None, variant: str = "full",
          rank: int | None = None, site: str = "wo", penalty: str = "trace",
          rank_metric: str = "data") -> Solution:
    """dW = C (G + P)^-1 for one accumulator (P: see PENALTIES); never returns NaN.

    rho None takes DEFAULT_RHO[penalty]. rank k truncates the augmented [D_out, D_in + 1]
    matrix [weight_delta | bias_delta] to rank k (see RANK_METRICS).
    """
    if penalty not in PENALTIES:
        raise UserError(f"absorption penalty: expected one of {PENALTIES}, got {penalty!r}")
    rho = DEFAULT_RHO[penalty] if rho is None else rho
    if variant not in VARIANTS:
        raise UserError(f"absorption variant: expected one of {VARIANTS}, got {variant!r}")
    if site not in SITES:
        raise UserError(f"absorption site: expected one of {SITES}, got {site!r}")
    if not (math.isfinite(rho) and rho >= 0):
        raise UserError(f"absorption rho: expected a number >= 0, got {rho!r}")
    if rank is not None and (variant != "full" or int(rank) != rank or rank < 1):
        raise UserError(f"absorption rank: expected an integer >= 1 with variant 'full', "
                        f"got {rank!r} with variant {variant!r}")
    if rank_metric not in RANK_METRICS:
        raise UserError(f"absorption rank metric: expected one of {RANK_METRICS}, "
                        f"got {rank_metric!r}")
    if stats.count == 0:
        raise UserError(f"{stats._who()}: no absorption samples: the warmup never produced a "
                        "history longer than the local span (sink + window frames); lengthen the "
                        "warmup or shrink the span")
    if site == "adapter" and not stats.has_x:
        raise UserError(f"{stats._who()}: site 'adapter' needs x_in in every update; "
                        "none was given")
    if stats.dtype != _F64:  # float32 partial sums: the solve itself is always float64
        stats = stats.copy_to(dtype=_F64)
    G, C = (stats.G_x, stats.C_x) if site == "adapter" else (stats.G, stats.C)
    if not all(bool(torch.isfinite(t).all()) for t in (G, C, stats.sum_r, stats.sum_rr)):
        raise UserError(f"{stats._who()}: the absorption statistics hold NaN/Inf (a corrupt or "
                        "overflowed statistics file)")
    dout, d = C.shape
    sum_rr = float(stats.sum_rr)
    report = dict(variant=variant, site=site, penalty=penalty, rho=float(rho), rank=rank,
                  rank_metric=None if rank is None else rank_metric, count=stats.count)

    if variant == "none":
        return Solution(torch.zeros(dout, d - 1, dtype=_F64, device=C.device),
                        torch.zeros(dout, dtype=_F64, device=C.device), method="zero",
                        lambda_=0.0, condition_number=None,
                        fit_residual=1.0 if sum_rr > 0 else 0.0, **report)
    if variant == "bias":
        mean = stats.sum_r / stats.count
        resid = max(sum_rr - stats.count * float(mean.square().sum()), 0.0)
        return Solution(torch.zeros(dout, d - 1, dtype=_F64, device=C.device), mean.clone(),
                        method="mean", lambda_=0.0, condition_number=None,
                        fit_residual=resid / sum_rr if sum_rr > 0 else 0.0, **report)

    P = torch.ones(d, dtype=_F64, device=G.device)
    if penalty == "trace":
        lam = float(rho) * float(torch.trace(G)) / d
    else:
        m = G[:-1, -1]  # sum of z over tokens; G[-1, -1] is the count
        centred_trace = float(torch.trace(G)) - stats.count - float(m.square().sum()) / stats.count
        lam = float(rho) * max(centred_trace, 0.0) / (d - 1)
        P[-1] = 0.0
    P *= lam
    # One D x D allocation: at D = 5120 a fresh one measured up to a second on CPU. Symmetrised
    # because the float64 accumulation is symmetric only up to rounding.
    A = G.clone().add_(G.mT).mul_(0.5)
    A.diagonal().add_(P)
    L, info = torch.linalg.cholesky_ex(A)
    method, n_floored, cond = "cholesky", 0, float("inf")
    if int(info) == 0:
        cond = _cond_estimate(A, L)
    if cond <= COND_MAX:
        # dW^T = L^-T L^-1 C^T as two triangular solves: same result as cholesky_solve, which
        # measured 1.5x slower on CPU at D = 5120 (right-side solves were in between).
        X = torch.linalg.solve_triangular(L, C.mT, upper=False)
        dW = torch.linalg.solve_triangular(L.mT, X, upper=True).mT
        root = L  # root root^T = A, for the 'data' rank metric
    else:
        method = "eigh"
        ev, V = torch.linalg.eigh(A)
        ev_max = float(ev[-1])  # > 0: the constant column puts count on G's diagonal
        cond = ev_max / float(ev[0]) if float(ev[0]) > 0 else float("inf")
        floor = ev_max / COND_MAX
        n_floored = int((ev < floor).sum())
        dW = ((C @ V) / ev.clamp_min(floor)) @ V.mT
        root = V * ev.clamp_min(floor).sqrt()

    truncated = rank is not None and rank < min(dout, d)
    if truncated:
        B = dW if rank_metric == "frobenius" else dW @ root
        U = torch.linalg.svd(B, full_matrices=False)[0][:, :rank]
        dW = U @ (U.mT @ dW)  # for 'frobenius' this is exactly U_k S_k V_k^T
    if method == "cholesky" and not truncated:
        # dW (G + P) = C  =>  <dW G, dW> = <C, dW> - sum_j P_j ||dW[:, j]||^2, no D^3 product.
        quad = float((C * dW).sum()) - float((dW.square().sum(0) * P).sum())
    else:
        quad = float(((dW @ A) * dW).sum()) - float((dW.square().sum(0) * P).sum())
    resid = max(sum_rr - 2.0 * float((C * dW).sum()) + quad, 0.0)
    return Solution(dW[:, :-1].contiguous(), dW[:, -1].contiguous(), method=method, lambda_=lam,
                    condition_number=cond, fit_residual=resid / sum_rr if sum_rr > 0 else 0.0,
                    n_floored=n_floored, **report)


def discrepancy(r: torch.Tensor, wo_ag: torch.Tensor, eps: float = 1e-12) -> float:
    """d = mean over tokens of ||r_i||^2 / ||W_o a_g,i||^2 (inputs [..., D]); eps guards zeros."""
    r64 = r.reshape(-1, r.shape[-1]).to(_F64)
    y64 = wo_ag.reshape(-1, wo_ag.shape[-1]).to(_F64)
    if r64.shape != y64.shape or r64.shape[0] == 0:
        raise ValueError(f"discrepancy: r {tuple(r.shape)} and W_o a_g {tuple(wo_ag.shape)} must "
                         "have the same non-empty shape")
    return float((r64.square().sum(1) / (y64.square().sum(1) + eps)).mean())


def corrected_residual(solution: Solution, z_in: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r - dW [z_in; 1] in float64; z_in is a_l (site 'wo') or x_in (site 'adapter'), [..., D]."""
    W = solution.weight_delta.to(z_in.device)
    b = solution.bias_delta.to(z_in.device)
    return r.to(_F64) - (z_in.to(_F64) @ W.mT + b)


def solve_timing(D: int, repeats: int = 3, device: str | torch.device = "cpu",
                 penalty: str = "trace") -> float:
    """Median seconds of one full-variant solve at width D (statistics built outside the timing)."""
    g = torch.Generator().manual_seed(0)
    stats = AbsorptionStats(f"timing D={D}")
    a = torch.randn(D + 64, D, generator=g, dtype=_F64).to(device)
    stats.update(a, a @ torch.randn(D, D, generator=g, dtype=_F64).to(device) / D ** 0.5)
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        sol = solve(stats, penalty=penalty)
        float(sol.bias_delta[0])  # forces completion on asynchronous devices
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
