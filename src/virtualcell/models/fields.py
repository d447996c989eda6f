"""The simulator's networks and its training targets: velocity fields, the drift + score pair, the paths.

:class:`VelocityField` is an MLP field v(x, t) (optionally autonomous, or minus the gradient of a
learned potential); :class:`Dynamics` holds the drift and, for an SDE, the score, with the
flow-matching (OT-CFM) and score-and-flow-matching (SF2M) losses on paired samples;
:func:`conditional_flow` and :func:`brownian_bridge` are the conditional paths between pairs.
:class:`virtualcell.models.dynamics.Simulator` is the user-facing model built on them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from virtualcell import train
from virtualcell.train import BadInputError

__all__ = ["S_MIN", "conditional_flow", "brownian_bridge", "euler_maruyama", "VelocityField", "Dynamics"]

# Bridge positions are drawn from [S_MIN, 1 - S_MIN]: the bridge's flow target
# has a (1 - 2s) / (2 s (1 - s)) factor that is singular at both ends.
S_MIN = 1e-3


# --------------------------------------------------------------------------
# Stateless core
# --------------------------------------------------------------------------


def conditional_flow(
    x0: torch.Tensor,
    x1: torch.Tensor,
    s: torch.Tensor,
    sigma: float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point on the (noisy) straight path between paired samples, and its velocity.

    ``x_s = (1 - s) x0 + s x1 + sigma * noise`` and ``u = x1 - x0``, with
    ``s`` in [0, 1] per pair. ``u`` is the velocity per unit of ``s``; divide
    by ``t1 - t0`` for the velocity in real time.

    Parameters
    ----------
    x0, x1
        Paired samples, (n, d).
    s
        Path positions, (n,) or (n, 1).
    sigma
        Width of the Gaussian tube around the path.
    noise
        Standard-normal draws, (n, d).

    Returns
    -------
    tuple of torch.Tensor
        ``(x_s, u)``, each (n, d).
    """
    s = s.reshape(-1, 1)
    return (1.0 - s) * x0 + s * x1 + sigma * noise, x1 - x0


def brownian_bridge(
    x0: torch.Tensor,
    x1: torch.Tensor,
    s: torch.Tensor,
    dt: torch.Tensor | float,
    g: torch.Tensor | float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point on the Brownian bridge between paired samples, its flow velocity and its width.

    For Brownian motion of diffusion ``g`` pinned at ``x0`` at time ``t0`` and
    at ``x1`` at ``t0 + dt``, the state at ``t0 + s dt`` is Gaussian with mean
    ``mu = (1 - s) x0 + s x1`` and standard deviation
    ``sigma_s = g sqrt(dt s (1 - s))``, and its probability-flow velocity (per
    unit of time) is ``(x1 - x0) / dt + (1 - 2s) / (2 s (1 - s) dt) (x_s - mu)``
    (torchcfm's SB-CFM, Eq. 21 of Tong et al. 2023, with time rescaled by
    ``dt``). The score of that Gaussian is ``-noise / sigma_s``.

    Parameters
    ----------
    x0, x1
        Paired samples, (n, d).
    s
        Bridge positions in (0, 1), (n,) or (n, 1); keep them away from 0 and
        1 (:data:`S_MIN`), where the velocity's factor is singular.
    dt
        Duration of each bridge, scalar or (n,) / (n, 1).
    g
        Diffusion (standard deviation per square root of time).
    noise
        Standard-normal draws, (n, d).

    Returns
    -------
    tuple of torch.Tensor
        ``(x_s, u, sigma_s)``: (n, d), (n, d) and (n, 1).
    """
    s = s.reshape(-1, 1)
    dt = torch.as_tensor(dt, dtype=x0.dtype, device=x0.device).reshape(-1, 1)
    sigma_s = g * torch.sqrt(dt * s * (1.0 - s))
    x_s = (1.0 - s) * x0 + s * x1 + sigma_s * noise
    # (x_s - mu) = sigma_s * noise, written out so that the factor stays finite.
    u = (x1 - x0) / dt + (1.0 - 2.0 * s) / (2.0 * s * (1.0 - s) * dt) * (sigma_s * noise)
    return x_s, u, sigma_s


def euler_maruyama(drift, y: torch.Tensor, tau0: float, tau1: float, n_steps: int, g: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """A sample path of dY = drift(Y, tau) dtau + g dW from ``tau0`` to ``tau1`` (forward only).

    Noise is drawn on the CPU from ``generator``, so a seed gives the same paths on every device.
    """
    h = (tau1 - tau0) / n_steps
    scale = float(g) * math.sqrt(h)
    for k in range(n_steps):
        dw = torch.randn(y.shape, generator=generator).to(y.device)
        y = y + h * drift(y, tau0 + k * h) + scale * dw
    return y


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class VelocityField(nn.Module):
    """MLP vector field v(x, t), optionally autonomous or the negative gradient of a potential.

    Parameters
    ----------
    dim
        Dimension of the state space.
    n_hidden, n_layers
        Width and number of hidden layers of the MLP.
    potential
        If True the MLP outputs a scalar Phi(x, t) and v = -grad_x Phi.
    autonomous
        If True the field does not see time: v(x) (and Phi(x)); ``t`` is
        accepted and ignored.
    n_condition
        Width of a condition embedding the field also takes (``cond``, one row
        per state or one for all); 0: none (the field of one process). A
        condition of several components (a combination) passes one embedding
        per component, ``cond`` of shape (n or 1, components, n_condition),
        and the field composes them additively (:meth:`forward`).
    """

    def __init__(
        self,
        dim: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 3,
        potential: bool = False,
        autonomous: bool = False,
        n_condition: int = 0,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise BadInputError(f"n_layers must be >= 1; got {n_layers}")
        self.dim = int(dim)
        self.is_potential = bool(potential)
        self.is_autonomous = bool(autonomous)
        self.n_condition = int(n_condition)
        layers: list[nn.Module] = []
        n_in = self.dim + (0 if self.is_autonomous else 1) + self.n_condition  # time: one extra input
        for _ in range(n_layers):
            # SiLU, not ReLU: the potential's gradient must itself be smooth,
            # and a ReLU network's gradient is piecewise constant in x.
            layers += [nn.Linear(n_in, n_hidden), nn.SiLU()]
            n_in = n_hidden
        layers.append(nn.Linear(n_in, 1 if self.is_potential else self.dim))
        self.net = nn.Sequential(*layers)

    def _net_input(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None) -> torch.Tensor:
        parts = [x]
        if not self.is_autonomous:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            parts.append(t.reshape(-1, 1).expand(len(x), 1))
        if self.n_condition:
            if cond is None:
                raise BadInputError("this field is conditioned: pass the condition embedding (cond)")
            parts.append(cond.reshape(-1, self.n_condition).expand(len(x), self.n_condition))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def potential(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Phi(x, t), shape (n,). Only for ``potential=True``."""
        if not self.is_potential:
            raise RuntimeError("this VelocityField was built with potential=False and has no potential")
        return self.net(self._net_input(x, t, cond)).squeeze(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Field at states ``x`` (n, dim) and times ``t`` (scalar or (n,)), under condition ``cond``.

        ``cond`` with a components axis (n or 1, k, n_condition) is composed additively: the field under
        the zero embedding (the control's) plus each component's change from it, ``v(0) + sum_k (v(e_k) -
        v(0))``. A landscape whose perturbations each add a term to the potential (two knock-downs of
        different programmes, a drug beside a knock-down) has exactly such a drift, and a combination
        predicted from its singles then needs no interaction the singles could not show; an MLP of the
        summed embeddings (what a single embedding does) keeps no such structure. A row of at most one
        component (zero embeddings are absent ones) is its own embedding's field, so only the rows of
        combinations pay the extra passes.
        """
        if cond is not None and cond.dim() == 3:
            return self._composed(x, t, cond)
        if not self.is_potential:
            return self.net(self._net_input(x, t, cond))
        # The graph through the gradient is only kept when the caller is
        # differentiating (training); simulation under no_grad still needs
        # autograd for the gradient itself, hence enable_grad.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            phi = self.potential(x, t, cond)
            (grad,) = torch.autograd.grad(phi.sum(), x, create_graph=create_graph)
        return -grad

    def _composed(self, x: torch.Tensor, t: torch.Tensor | float, parts: torch.Tensor) -> torch.Tensor:
        n, k = len(x), parts.shape[1]
        if len(parts) == 1:  # one condition for every row (simulation)
            parts = parts.expand(n, -1, -1)
        multi = torch.nonzero((parts.abs().amax(dim=2) > 0).sum(1) > 1).flatten()
        if len(multi) == 0:
            return self.forward(x, t, parts.sum(1))
        # One pass over every row (its summed embedding: exact for a single or the control) and, for the
        # rows of combinations, the zero embedding and each component's: a pass per embedding costs
        # more in per-call overhead than the rows themselves on CPU.
        m = len(multi)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t_rows = t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(-1)
        xs = torch.cat([x, x[multi].repeat(k + 1, 1)])
        ts = torch.cat([t_rows, t_rows[multi].repeat(k + 1)])
        cs = torch.cat([parts.sum(1), torch.zeros_like(parts[multi, 0]),
                        parts[multi].transpose(0, 1).reshape(k * m, -1)])
        out = self.forward(xs, ts, cs)
        base, each = out[n:n + m], out[n + m:].reshape(k, m, -1)
        return out[:n].index_put((multi,), base + (each - base).sum(0))


class Dynamics(nn.Module):
    """The simulator's networks: a drift and, for an SDE, a score.

    Deterministic: ``drift`` is the ODE velocity v(x, t), trained by OT-CFM.
    Stochastic: ``drift`` is the SDE drift f(x, t) of dX = f dt + g dW, and
    ``score`` estimates grad_x log p_t(x) (always time-dependent); the
    probability-flow velocity is v = f - g**2/2 s. The diffusion ``g`` is a
    buffer, so it travels with the weights (saved models and checkpoints).

    Parameters
    ----------
    dim, n_hidden, n_layers
        As for :class:`VelocityField` (both networks).
    potential, autonomous
        Priors on the drift (:class:`VelocityField`).
    stochastic
        Build the score network and the diffusion buffer.
    n_condition
        Width of a condition embedding both networks take (``cond``): one
        process per condition (:class:`virtualcell.models.perturbation.ConditionalDynamics`).
    """

    def __init__(
        self,
        dim: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 3,
        potential: bool = False,
        stochastic: bool = False,
        autonomous: bool = False,
        n_condition: int = 0,
    ) -> None:
        super().__init__()
        self.drift = VelocityField(
            dim, n_hidden=n_hidden, n_layers=n_layers, potential=potential, autonomous=autonomous,
            n_condition=n_condition,
        )
        self.score: VelocityField | None = None
        if stochastic:
            self.score = VelocityField(dim, n_hidden=n_hidden, n_layers=n_layers, n_condition=n_condition)
            self.register_buffer("diffusion", torch.tensor(1.0))
        # Training settings, set by fit: the weight of the kinetic-energy penalty, and the objective
        # (``"bridge"``: flow / score matching on coupled pairs, :meth:`loss`; ``"marginal"``:
        # simulate and match the next time point's cells, :meth:`marginal_loss`).
        self.kinetic = 0.0
        self.objective = "bridge"
        self.marginal_weight = 10.0

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The drift f (the ODE velocity of a deterministic model)."""
        return self.drift(x, t, cond)

    def flow_velocity(self, x: torch.Tensor, t: torch.Tensor | float,
                      cond: torch.Tensor | None = None) -> torch.Tensor:
        """Probability-flow velocity ``f - g**2/2 s``; the drift itself for an ODE."""
        v = self.drift(x, t, cond)
        if self.score is None:
            return v
        return v - 0.5 * self.diffusion**2 * self.score(x, t, cond)

    def loss(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        t0: torch.Tensor,
        t1: torch.Tensor,
        s: torch.Tensor,
        noise: torch.Tensor,
        cond: torch.Tensor | None = None,
        *marginal_batch: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Flow-matching (ODE) or score-and-flow-matching (SDE) loss on paired samples.

        Parameters
        ----------
        x0, x1
            Paired states at times ``t0`` and ``t1`` (n, dim).
        t0, t1
            Times of each pair, (n,), with ``t1 > t0``.
        s
            Path positions in [0, 1] (ODE) or in (0, 1), clear of the ends
            (SDE, see :data:`S_MIN`), (n,).
        noise
            ODE: the perturbation around the straight path, already scaled by
            sigma. SDE: standard-normal draws for the Brownian bridge.
        cond
            A conditioned model's condition embedding of each pair, (n, n_condition).
        marginal_batch
            The ``"hybrid"`` objective: a batch of :meth:`marginal_loss` (its ``x0`` to
            ``noise``), whose energy distance is added as the ``"marginal"`` term.

        Returns
        -------
        dict
            ``"loss"``, the sum of the terms below. ODE: the flow-matching MSE
            of :meth:`VelocityField.loss`. SDE: ``"flow"``, the MSE between
            f - g**2/2 s and the bridge's flow velocity (the score enters
            detached, so the score is fitted by its own term alone and the
            drift absorbs what a constrained drift cannot express); ``"score"``,
            the denoising score-matching loss ``mean |sigma_s s + noise|**2``
            (torchcfm's lambda_t weighting: its score network outputs
            g**2/2 s, ours s). With a kinetic weight, ``"kinetic"``: that
            weight times the mean squared drift per coordinate.
        """
        if self.objective == "marginal":
            return self.marginal_loss(x0, x1, t0, t1, s, noise, cond)
        tau = t0 + s.reshape(-1) * (t1 - t0)
        dt = (t1 - t0).reshape(-1, 1)
        terms: dict[str, torch.Tensor] = {}
        if self.score is None:
            x_s, u = conditional_flow(x0, x1, s, 1.0, noise)
            f = self.drift(x_s, tau, cond).float()
            total = torch.mean((f - u / dt) ** 2)
        else:
            g = self.diffusion
            x_s, u, sigma_s = brownian_bridge(x0, x1, s, dt, g, noise)
            f = self.drift(x_s, tau, cond).float()
            score = self.score(x_s, tau, cond).float()
            terms["flow"] = torch.mean((f - 0.5 * g**2 * score.detach() - u) ** 2)
            terms["score"] = torch.mean((sigma_s * score + noise) ** 2)
            total = terms["flow"] + terms["score"]
        if self.kinetic > 0:
            # Kinetic energy of the drift along the interpolated marginals, as in
            # TrajectoryNet (Tong et al., ICML 2020) and RNODE (Finlay et al.,
            # ICML 2020), which integrate |f|^2 along the ODE; here it is
            # evaluated at the training paths' points instead of a solve.
            terms["kinetic"] = self.kinetic * torch.mean(f**2)
            total = total + terms["kinetic"]
        if self.objective == "hybrid":
            # The same SDE, simulated across each interval and matched to the next time point's cells:
            # the couplings teach each cell's path (fates), the simulation the populations between
            # and across the observed times (what interpolating the couplings misses).
            marginal = self.marginal_loss(*marginal_batch, cond)
            terms["marginal"] = marginal.get("distance", marginal[train.LOSS_KEY])
            total = total + self.marginal_weight * terms["marginal"]
        return {train.LOSS_KEY: total, **terms}

    def marginal_loss(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        t0: torch.Tensor,
        t1: torch.Tensor,
        group: torch.Tensor,
        noise: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Marginal matching: simulate cells of one time point to the next, compare with its cells.

        The SDE dX = f dt + g dW is integrated by Euler-Maruyama from ``x0`` (cells at ``t0``)
        to ``t1``, differentiably, and the simulated cells are compared with ``x1`` (cells observed
        at ``t1``, drawn independently: no coupling) by the energy distance of each interval; the
        loss is their mean. This is how PRESCIENT (Yeo et al., Nat. Commun. 2021) and MIOFlow fit
        a process to snapshots; it needs no pairing, so a drift shared across intervals (an
        autonomous one) is fitted to all of them at once, the gap over a held-out time included,
        and the diffusion enters the simulation exactly as it will when predicting.

        Parameters
        ----------
        x0
            Start cells, (n, dim); row i belongs to interval ``group[i]``.
        x1
            Cells observed at the intervals' ends: one block of equally many rows per interval, in
            ascending order of ``group``'s labels.
        t0, t1
            Each row of ``x0``'s interval ends, (n,).
        group
            Each row of ``x0``'s interval index, (n,).
        noise
            Standard-normal increments, (n_steps, n, dim). The rows of the longest interval take
            ``n_steps`` steps, the others ``ceil(n_steps * (t1 - t0) / longest)``, so every interval
            is integrated with steps of about the same length; step k moves only the rows that
            still have one to take (a short interval beside a held-out gap twice as long costs
            half the gap's steps).
        cond
            A conditioned model's condition embedding of each row.

        Returns
        -------
        dict
            ``"loss"``, the mean energy distance over intervals.
        """
        dt = t1 - t0
        n_max = noise.shape[0]
        # Each row takes steps in proportion to its interval (the longest takes n_max), so a short
        # interval beside a 2-unit gap is not integrated with the gap's step count: rows are sorted
        # by their number of steps and step k moves only the rows that still have one to take.
        steps = torch.clamp(torch.ceil(n_max * dt / dt.max() - 1e-6), 1, n_max).long()
        order = torch.argsort(steps, descending=True, stable=True)
        x0, t0, dt, noise, steps = x0[order], t0[order], dt[order], noise[:, order], steps[order]
        per_row = cond is not None and cond.dim() == 2 and len(cond) == len(order)  # else one for all rows
        if per_row:
            cond = cond[order]
        h = (dt / steps).reshape(-1, 1)
        moving = [int((steps > k).sum()) for k in range(n_max)]
        g = self.diffusion if self.score is not None else 0.0
        y = x0
        energy, evaluations = x0.new_zeros(()), 0
        for k, m in enumerate(moving):
            c = cond[:m] if per_row else cond
            f = self.drift(y[:m], t0[:m] + k * h[:m].reshape(-1), c).float()
            if self.kinetic > 0:
                energy, evaluations = energy + (f**2).sum(), evaluations + f.numel()
            step = h[:m] * f + g * torch.sqrt(h[:m]) * noise[k, :m]
            y = y[:m] + step if m == len(y) else torch.cat([y[:m] + step, y[m:]])
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to the rows' order
        total = grouped_energy_distance(y, x1, group)
        if self.kinetic <= 0:
            return {train.LOSS_KEY: total}
        # Marginal matching leaves open *which* cells go where: any drift that carries one
        # population onto the next fits. The kinetic energy along the simulated paths (every
        # step's drift, so each interval weighs by its length) picks the least-action one, as
        # TrajectoryNet and MIOFlow regularise their marginal fits.
        kinetic = self.kinetic * energy / evaluations
        return {train.LOSS_KEY: total + kinetic, "distance": total, "kinetic": kinetic}


def grouped_energy_distance(x: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The mean over groups of :func:`energy_distance` between the rows of ``x`` and ``y`` of each group.

    ``group`` labels the rows of ``x``; ``y`` holds, for each label in ascending order, a block of
    rows of the same size. When every label has as many rows of ``x`` (the simulator's batches),
    the groups' distances are one batched computation instead of three small ones per group.
    """
    labels, counts = torch.unique(group, return_counts=True)
    if len(y) % len(labels):
        raise BadInputError(f"y must hold one equal block of rows per group: {len(y)} rows for {len(labels)} groups")
    y_blocks = y.reshape(len(labels), len(y) // len(labels), y.shape[1])
    if bool((counts == counts[0]).all()):
        order = torch.argsort(group, stable=True)
        return energy_distance(x[order].reshape(len(labels), int(counts[0]), x.shape[1]), y_blocks).mean()
    return torch.stack([energy_distance(x[group == k], y_blocks[i]) for i, k in enumerate(labels)]).mean()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Szekely's energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean), differentiable.

    Written here rather than taken from geomloss (not a dependency): three pairwise-distance
    means. The square root is taken of ``d**2 + 1e-8`` so that its gradient is finite at the
    zero self-distances.
    """
    def mean_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # |a|^2 + |b|^2 - 2 a.b: one matrix product rather than an (n, m, d) difference tensor
        sq = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * a @ b.transpose(-1, -2)
        return torch.sqrt(sq.clamp_min(0.0) + 1e-8).mean((-1, -2))

    return 2.0 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
