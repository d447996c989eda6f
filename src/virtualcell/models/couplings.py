"""Couplings between the cells of two time points: exact, entropic and unbalanced OT plans.

The simulator never sees the same cell twice, so it learns from *pairs* of
cells at consecutive time points drawn from a transport plan between two
minibatches (torchcfm's ``OTPlanSampler``). Three plans are offered, all for
the squared-Euclidean cost and uniform weights:

* exact OT (``ot.emd``): the OT-CFM coupling;
* entropic OT with regularisation ``reg``: the static Schroedinger bridge for
  Brownian motion when ``reg = 2 g**2 dt`` (diffusion ``g`` over a time ``dt``),
  the SF2M coupling;
* unbalanced entropic OT, whose marginals are only softly matched (KL weight
  ``reg_m``), so cells that grow or die need not be matched.

Everything here is stateless and runs in float64 on the CPU, so couplings do
not depend on the training device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import ot
import torch

__all__ = ["squared_cost", "exact_plan", "entropic_plan", "sample_plan", "sample_ot_pairs"]

# Scalings beyond exp(_ABSORB) are folded into the potentials (Schmitzer's
# "absorption"), so the kernel iterations never overflow.
_ABSORB = 30.0
# Sinkhorn iterations allowed at each intermediate (larger) regularisation of
# the epsilon-scaling schedule; the final one runs to convergence.
_STAGE_ITERS = 100
# Floor on kernel-vector products, so a scaling never divides by zero.
_TINY = 1e-300


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Sinkhorn is thousands of tiny ops: intra-op threads only add
    # synchronisation, which costs 10-30x when other jobs share the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def squared_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Squared-Euclidean cost matrix between rows, float64 on the CPU, (n0, n1)."""
    a, b = (x.detach().to("cpu", torch.float64) for x in (x0, x1))
    return torch.cdist(a, b).pow(2)


def exact_plan(cost: torch.Tensor) -> torch.Tensor:
    """Exact OT plan between uniform weights (``ot.emd``); sums to 1, float64, (n0, n1)."""
    n0, n1 = cost.shape
    # The network simplex is exact and deterministic.
    plan = ot.emd(np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1), cost.double().numpy(), numItermax=1_000_000)
    return torch.from_numpy(plan)


def entropic_plan(
    cost: torch.Tensor,
    reg: float,
    *,
    reg_m: float | None = None,
    tol: float = 1e-2,
    max_iter: int = 5000,
) -> torch.Tensor:
    """Entropic (optionally unbalanced) OT plan between uniform weights, normalised to sum 1.

    Solves ``min <C, P> + reg KL(P | a b^T) [+ reg_m (KL(P 1 | a) + KL(P^T 1 | b))]``
    (the bracket only with ``reg_m``), the problem of POT's ``ot.sinkhorn`` and,
    with ``reg_m``, of ``ot.unbalanced.sinkhorn_unbalanced`` (``reg_type="kl"``).
    The returned plan is divided by its total mass, so an unbalanced plan
    becomes a distribution over pairs.

    POT's solvers are not used because they are slow or fail at the small
    regularisations the Schroedinger bridge needs: in 16 dimensions, with
    squared distances of order 30 and ``reg`` of order 0.1,
    ``ot.sinkhorn(method="sinkhorn_log")`` takes 0.7 s (torch tensors) to 5 s
    (numpy) per 256 x 256 plan and still stops at its iteration cap, and the
    unbalanced solvers, which are not log-domain, underflow to all-zero
    plans. Here Sinkhorn runs on kernel scalings (two matrix-vector products
    per iteration), with large scalings absorbed into log-domain potentials
    (Schmitzer, SIAM J. Sci. Comput. 2019), warm-started along a halving
    schedule of regularisations (epsilon-scaling): the same fixed point, in
    about 0.04 s of one core for that plan.

    Parameters
    ----------
    cost
        Cost matrix (n0, n1), e.g. :func:`squared_cost`.
    reg
        Entropic regularisation, > 0, in the units of ``cost``.
    reg_m
        Marginal relaxation of unbalanced OT, > 0; ``None`` for balanced OT
        (the limit ``reg_m -> inf``).
    tol
        Stop when no scaling changes by more than this (in log) in one
        iteration; the marginals of a balanced plan are then within about
        ``tol`` (relative): the default 1% is far below the sampling noise of
        a minibatch of pairs drawn from the plan.
    max_iter
        Iteration cap at the target ``reg`` (the plan is returned as is, close
        to converged, if it is reached).

    Returns
    -------
    torch.Tensor
        The plan, float64 on the CPU, entries summing to 1.
    """
    if not reg > 0:
        raise ValueError(f"entropic regularisation must be > 0; got {reg}")
    if reg_m is not None and not reg_m > 0:
        raise ValueError(f"reg_m must be > 0 (or None for balanced OT); got {reg_m}")
    with _one_thread():
        return _entropic_plan(cost.detach().to("cpu", torch.float64), float(reg), reg_m, tol, max_iter)


def _entropic_plan(c: torch.Tensor, reg: float, reg_m: float | None, tol: float, max_iter: int) -> torch.Tensor:
    n0, n1 = c.shape
    f = torch.zeros(n0, dtype=torch.float64)  # dual potentials, cost units
    g = torch.zeros(n1, dtype=torch.float64)
    # Start where the kernel is flat (exp(-C / eps) >= 1/e) and halve. The
    # potentials of one eps are a good start for the next: where the plan
    # lives f + g - C is near 0, so no row or column of the kernel underflows.
    eps = max(reg, float(c.max()))
    while True:
        final = eps <= reg
        # Exponent of the unbalanced update; 1 for balanced OT.
        fi = 1.0 if reg_m is None else reg_m / (reg_m + eps)
        f, g = _sinkhorn_stage(c, f, g, eps, fi, tol, max_iter if final else _STAGE_ITERS)
        if final:
            break
        eps = max(reg, 0.5 * eps)
    log_plan = ((f[:, None] + g[None, :] - c) / eps).reshape(-1)  # + log(a_i b_j), a constant
    return torch.softmax(log_plan, 0).reshape(n0, n1)


def _sinkhorn_stage(
    c: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float, fi: float, tol: float, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn iterations at one eps; returns the potentials with the scalings absorbed.

    The plan is ``u_i k_ij v_j`` with ``k_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.
    Balanced: ``u = a / (k v)``, ``v = b / (k^T u)``. Unbalanced, the update
    ``F <- -fi eps log sum_j b_j exp((G_j - C_ij) / eps)`` of the total
    potential ``F = f + eps log u`` reads ``u = (a / (k v))**fi exp(-(1 - fi) f / eps)``.
    """
    n0, n1 = c.shape
    a, b = 1.0 / n0, 1.0 / n1

    def setup(f: torch.Tensor, g: torch.Tensor):
        k = torch.exp((f[:, None] + g[None, :] - c) / eps) * (a * b)
        damp = (torch.exp(-(1 - fi) * f / eps), torch.exp(-(1 - fi) * g / eps)) if fi < 1 else None
        return k, k.T.contiguous(), damp, torch.ones(n0, dtype=c.dtype), torch.ones(n1, dtype=c.dtype)

    k, kt, damp, u, v = setup(f, g)
    for it in range(n_iter):
        # Convergence and overflow are checked every 10 iterations: the
        # iterations themselves are two matrix-vector products.
        check = it % 10 == 9 or it == n_iter - 1
        if check:
            u_old, v_old = u, v
        u = a / (k @ v).clamp_min(_TINY)
        if damp is not None:
            u = u.pow_(fi).mul_(damp[0])
        v = b / (kt @ u).clamp_min(_TINY)
        if damp is not None:
            v = v.pow_(fi).mul_(damp[1])
        if not check:
            continue
        log_u, log_v = u.log(), v.log()
        if not (torch.isfinite(log_u).all() and torch.isfinite(log_v).all()):
            # Scalings over- or underflowed: one exact log-domain sweep instead.
            g = -fi * eps * torch.logsumexp(math.log(a) + (f[:, None] - c) / eps, 0)
            f = -fi * eps * torch.logsumexp(math.log(b) + (g[None, :] - c) / eps, 1)
            k, kt, damp, u, v = setup(f, g)
            continue
        change = max(float((log_u - u_old.log()).abs().max()), float((log_v - v_old.log()).abs().max()))
        if max(float(log_u.abs().max()), float(log_v.abs().max())) > _ABSORB:
            f, g = f + eps * log_u, g + eps * log_v
            k, kt, damp, u, v = setup(f, g)
        if change < tol:
            break
    return f + eps * u.log(), g + eps * v.log()


def sample_plan(
    plan: torch.Tensor, n_pairs: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n_pairs`` index pairs ``(i, j)`` from a plan, with replacement.

    Row from its marginal, then column given the row: the same joint draw as
    sampling the flattened plan, without multinomial's 2**24-category limit.
    The plan need not be normalised.
    """
    i = torch.multinomial(plan.sum(1), n_pairs, replacement=True, generator=generator)
    # The column by inverse CDF of the row: one uniform per pair (torch.multinomial over every drawn
    # row cost 7 ms per 256 x 500 block, more than the network's step).
    cdf = plan[i].cumsum(1)
    u = torch.rand(n_pairs, 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u).squeeze(1).clamp_max(plan.shape[1] - 1)
    return i, j


def sample_ot_pairs(
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    n_pairs: int | None = None,
    reg: float | None = None,
    reg_m: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample pairs from the OT plan between two minibatches.

    By default the plan couples the rows of ``x0`` and ``x1`` (uniform
    marginals, squared-Euclidean cost) exactly with ``ot.emd``; pairs are then
    drawn from it with replacement, as torchcfm's ``OTPlanSampler`` does.

    Parameters
    ----------
    x0, x1
        Source and target samples, (n0, d) and (n1, d).
    generator
        CPU generator for the draw.
    n_pairs
        Number of pairs; default ``max(n0, n1)``.
    reg
        If set, the entropic plan with this regularisation
        (:func:`entropic_plan`) instead of the exact one.
    reg_m
        If set (needs ``reg``), the unbalanced entropic plan.

    Returns
    -------
    tuple of torch.Tensor
        Paired rows ``(x0[i], x1[j])``, each (n_pairs, d).
    """
    if reg_m is not None and reg is None:
        raise ValueError("unbalanced OT (reg_m) needs an entropic regularisation reg")
    n_pairs = max(len(x0), len(x1)) if n_pairs is None else n_pairs
    cost = squared_cost(x0, x1)
    plan = exact_plan(cost) if reg is None else entropic_plan(cost, reg, reg_m=reg_m)
    i, j = sample_plan(plan, n_pairs, generator=generator)
    return x0[i.to(x0.device)], x1[j.to(x1.device)]
