"""The simulator: cell-state dynamics in an embedding space, learned from snapshots.

Cells are observed at a few time points (different cells each time), so the
model learns from pairs of cells at consecutive observed times drawn from a
transport plan between them (:mod:`virtualcell.models.couplings`). Two kinds
of dynamics are offered:

* **Deterministic** (``stochastic=False``): torchcfm's OT conditional flow
  matching. Pairs come from the exact minibatch OT plan, and a velocity field
  v(x, t) is regressed onto their straight-line velocities; integrating the
  ODE dx/dt = v moves any cell state forward (or backward) in time.
* **Stochastic** (``stochastic=True``): simulation-free score and flow
  matching (SF2M; Tong et al., AISTATS 2024, torchcfm's
  ``SchrodingerBridgeConditionalFlowMatcher``). Pairs come from the entropic
  OT plan that is the static Schroedinger bridge of Brownian motion with
  diffusion g; between paired cells the path is a Brownian bridge. The model
  is the SDE dX = f(X, t) dt + g dW: its drift f and the score
  s = grad log p_t of its marginals are two networks, and the bridge fixes
  both the probability-flow velocity v = f - g**2/2 s and the score.

Either SDE can instead be fitted by simulation (``fit(objective="marginal")``):
cells of each observed time point are pushed to the next observed one by
Euler-Maruyama, differentiably, and the energy distance to the cells observed
there is minimised (PRESCIENT, Yeo et al. 2021; MIOFlow). No pairs are drawn,
so one drift is fitted to every interval at once, and the diffusion enters
training exactly as it enters prediction.

Priors on the drift (both kinds): ``autonomous=True`` drops its time input (a
time-homogeneous process), ``potential=True`` makes it the negative gradient
of a learned scalar potential, f = -grad_x Phi(x[, t]): a Waddington landscape
in which cells roll downhill into fate valleys. Fit options add a kinetic
energy penalty and unbalanced couplings (cells that grow or die).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from virtualcell import train
from virtualcell.models._base import BaseModel, as_float_array
from virtualcell.models.couplings import entropic_plan, exact_plan, sample_ot_pairs, sample_plan, squared_cost
from virtualcell.models.fields import (S_MIN, Dynamics, VelocityField, brownian_bridge, conditional_flow,
                                      euler_maruyama)
from virtualcell.train import BadInputError

__all__ = [
    "sample_ot_pairs",
    "conditional_flow",
    "brownian_bridge",
    "VelocityField",
    "Dynamics",
    "Simulator",
]

# Entropic blur of the unbalanced couplings of a deterministic model, as a
# fraction of the minibatch's mean cost (a stochastic model uses 2 g**2 dt).
UNBALANCED_REG = 0.05
# Cells per time point up to which the couplings are solved once on all cells (a 2,000 x 2,000
# exact plan takes ~1 s and 32 MB); above, per minibatch.
FULL_PLAN_MAX_CELLS = 2000


# --------------------------------------------------------------------------
# Stateless core
# -----------------------------------------------------------------------------

# Names of the data scaling kept beside the weights in a saved Simulator.
_X_SHIFT, _X_SCALE, _T_SHIFT, _T_SCALE, _TIMES = "x_shift", "x_scale", "t_shift", "t_scale", "times"
# Whether an SDE's score network was trained (not by the marginal objective); absent in older models: yes.
_SCORE_FITTED = "score_fitted"
OBJECTIVES = ("bridge", "marginal", "hybrid")
# The marginal objective's Euler-Maruyama steps: every interval is integrated with steps of at most
# the shortest interval / MARGINAL_STEPS (0.2 time units on the default data), the longest with at
# most MARGINAL_MAX_STEPS (Dynamics.marginal_loss).
MARGINAL_STEPS = 5
MARGINAL_MAX_STEPS = 50


class Simulator(BaseModel):
    """User-facing simulator of cell-state trajectories in an embedding space.

    Internally states are centred and divided by one isotropic scale (state
    RMS 1), and time is mapped to [0, 1] over the observed range; the scaling
    is saved with the model, and every method takes and returns real units.
    Isotropic scaling keeps the potential a potential: the real-space drift is
    exactly minus the gradient of :meth:`potential`.

    Parameters
    ----------
    dim
        Dimension of the state space.
    n_hidden, n_layers
        Width and number of hidden layers of each network.
    potential
        The drift (the velocity of an ODE) is -grad_x of a learned scalar
        potential, a Waddington landscape.
    stochastic
        Learn the SDE dX = f(X, t) dt + g dW by score and flow matching
        (SF2M) instead of the ODE dx/dt = v(x, t) by OT flow matching.
    autonomous
        The drift does not depend on time, f(x): a time-homogeneous process,
        as a fixed landscape is (an SDE's score always depends on time).

    Examples
    --------
    >>> sim = Simulator(16, stochastic=True, potential=True, autonomous=True)
    >>> sim.fit(z, day, epochs=200, diffusion=0.5, seed=0)
    >>> z_day4 = sim.simulate(z[day == 3], t0=3, t1=4, seed=0)
    """

    _module_cls = Dynamics

    def __init__(
        self,
        dim: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 3,
        potential: bool = False,
        stochastic: bool = False,
        autonomous: bool = False,
    ) -> None:
        super().__init__(
            dim=int(dim),
            n_hidden=int(n_hidden),
            n_layers=int(n_layers),
            potential=bool(potential),
            stochastic=bool(stochastic),
            autonomous=bool(autonomous),
        )
        self._scaling: dict[str, torch.Tensor] = {}

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return dict(self._scaling)

    def _load_extra_state(self, extra: dict[str, torch.Tensor]) -> None:
        self._scaling = {k: v.double() for k, v in extra.items()}

    @property
    def observed_times(self) -> np.ndarray:
        """The distinct time points the model was trained on."""
        self._require_fitted("observed_times")
        return self._scaling[_TIMES].numpy()

    @property
    def stochastic(self) -> bool:
        """Whether the model is an SDE (``stochastic=True``)."""
        return bool(self.init_kwargs.get("stochastic", False))

    @property
    def diffusion(self) -> float | None:
        """The SDE's diffusion g in standardised units (as given to :meth:`fit`); None for an ODE.

        In real units the noise term is ``g * x_scale / sqrt(t_scale) dW_t``,
        with ``x_scale`` the RMS of the centred training states and
        ``t_scale`` the observed time span.
        """
        self._require_fitted("diffusion")
        return float(self.module.diffusion) if self.stochastic else None

    # Conversions between real units and the module's standardised units.
    def _to_state(self, x: np.ndarray) -> torch.Tensor:
        y = (torch.as_tensor(x, dtype=torch.float64) - self._scaling[_X_SHIFT]) / self._scaling[_X_SCALE]
        return y.float().to(self.device)

    def _from_state(self, y: torch.Tensor) -> np.ndarray:
        x = y.detach().cpu().double() * self._scaling[_X_SCALE] + self._scaling[_X_SHIFT]
        return x.float().numpy()

    def _to_time(self, t: float | np.ndarray) -> torch.Tensor:
        tau = (torch.as_tensor(t, dtype=torch.float64) - self._scaling[_T_SHIFT]) / self._scaling[_T_SCALE]
        return tau.float().to(self.device)

    def fit(
        self,
        x: np.ndarray,
        t: np.ndarray,
        *,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        sigma: float = 0.1,
        diffusion: float = 0.5,
        kinetic: float = 0.0,
        unbalanced: float | None = None,
        objective: str = "bridge",
        marginal_weight: float = 10.0,
        steps_per_epoch: int | None = None,
        device: str = "auto",
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """Learn the dynamics from time-labelled snapshots.

        Only consecutive *observed* time points are paired, so a held-out time
        point is simply absent from ``t`` and the model must bridge the gap.

        Parameters
        ----------
        x
            Cell states (e.g. shared embeddings), cells x ``dim``.
        t
            One numeric time label per cell; at least two distinct values.
        epochs
            Each epoch draws ``steps_per_epoch`` steps (default
            ``ceil(max cells per time point / batch_size)``); every step holds
            one OT-paired minibatch per interval. Up to
            :data:`FULL_PLAN_MAX_CELLS` cells per time point the OT plans couple
            all cells once and steps draw their pairs from them; above, each
            step solves its own minibatch plan.
        batch_size
            Cells per time point per minibatch.
        steps_per_epoch
            Gradient steps per epoch; None = one pass over the largest time point.
        sigma
            Deterministic model: noise around the straight paths, in
            standardised state units. Ignored by a stochastic model, whose
            paths are Brownian bridges of diffusion ``diffusion``.
        diffusion
            Stochastic model: the diffusion g of dX = f dt + g dW, in
            standardised units (state RMS 1, observed time span 1; a real
            noise level ``s`` per square root of real time is
            ``g = s * sqrt(t_span) / x_rms``). Consecutive time points a
            standardised time ``dt`` apart are coupled by the entropic OT plan
            with regularisation ``2 g**2 dt``, the Schroedinger bridge of
            Brownian motion of diffusion g. Ignored by a deterministic model.
        kinetic
            Weight of a kinetic-energy penalty on the drift, ``kinetic *
            mean |f|**2 / dim`` in standardised units, added to the loss
            (TrajectoryNet-style path-length regularisation); 0 is off. Flow
            matching's target is already the least-action (OT) velocity, so
            this mostly shrinks the drift, by about ``1 / (1 + kinetic)``
            where the network can fit the target.
        unbalanced
            If set, couple time points by unbalanced entropic OT with this
            marginal relaxation (POT's ``reg_m``, in units of the cost:
            squared distances in standardised units, about ``2 dim`` between
            unrelated cells), so cells that grow or die need not be matched;
            smaller values leave more poorly matched cells out. The entropic
            regularisation is ``2 g**2 dt`` (stochastic) or
            ``UNBALANCED_REG`` times the minibatch's mean cost (deterministic).
            ``None`` (default): balanced plans, exact (deterministic) or
            entropic (stochastic).
        objective
            ``"bridge"`` (default): flow matching (ODE) or score and flow
            matching (SDE) on OT-coupled pairs, as above. ``"marginal"``:
            each step simulates ``batch_size`` cells of every observed time
            point to the next observed one (Euler-Maruyama with the diffusion
            above, or the ODE, differentiably) and minimises the energy
            distance to ``batch_size`` cells observed there
            (:meth:`Dynamics.marginal_loss`, PRESCIENT's recipe); no coupling,
            and ``sigma`` and ``unbalanced`` are not used; ``kinetic`` weighs
            the mean squared drift along the simulated paths. Its
            score network is not trained, so ``simulate(ode=True)`` is refused.
            ``"hybrid"``: both losses summed each step (the bridge's on
            OT-coupled pairs, the marginal one on independent draws), so the
            same drift is taught each cell's path by the couplings and the
            populations across every interval by simulation.
        marginal_weight
            ``"hybrid"``: the weight of the marginal term (an energy distance,
            ~0.05 when fitted) against the bridge's (flow + score, ~5 in
            standardised units, most of it the bridge's own noise).
        lr, device, seed, on_epoch, checkpoint_path, checkpoint_every
            See :func:`virtualcell.train.fit`.

        Returns
        -------
        list of dict
            Per-epoch ``loss``; a stochastic model also reports its ``flow``
            and ``score`` terms, and ``kinetic`` when it is on.
        """
        x = as_float_array(x, name="x", n_cols=self.init_kwargs["dim"])
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        if len(t) != len(x):
            raise BadInputError(f"t must hold one time per cell: {len(t)} times for {len(x)} cells")
        if not np.isfinite(t).all():
            raise BadInputError("t contains NaN or infinite times; drop cells without a time label")
        times = np.unique(t)
        if len(times) < 2:
            raise BadInputError(f"the simulator needs cells at >= 2 distinct time points; got {times.tolist()}")
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1; got {batch_size}")
        stochastic = self.stochastic
        if stochastic and not (math.isfinite(diffusion) and diffusion > 0):
            raise BadInputError(f"diffusion must be a finite number > 0 for a stochastic model; got {diffusion}")
        if not (math.isfinite(kinetic) and kinetic >= 0):
            raise BadInputError(f"kinetic must be a finite number >= 0; got {kinetic}")
        if unbalanced is not None and not (math.isfinite(unbalanced) and unbalanced > 0):
            raise BadInputError(f"unbalanced must be a finite number > 0 or None; got {unbalanced}")
        if not (math.isfinite(marginal_weight) and marginal_weight >= 0):
            raise BadInputError(f"marginal_weight must be a finite number >= 0; got {marginal_weight}")
        if objective not in OBJECTIVES:
            raise BadInputError(f"objective must be one of {list(OBJECTIVES)}; got {objective!r}")
        marginal = objective == "marginal"

        self._prepare_fit(seed)
        self.module.kinetic = float(kinetic)
        self.module.objective = objective
        self.module.marginal_weight = float(marginal_weight)
        if stochastic:
            self.module.diffusion.fill_(float(diffusion))
        x64 = x.astype(np.float64)
        x_shift = x64.mean(axis=0)
        x_scale = float(np.sqrt(((x64 - x_shift) ** 2).mean())) or 1.0
        self._scaling = {
            _X_SHIFT: torch.from_numpy(x_shift),
            _X_SCALE: torch.tensor(x_scale, dtype=torch.float64),
            _T_SHIFT: torch.tensor(times[0], dtype=torch.float64),
            _T_SCALE: torch.tensor(times[-1] - times[0], dtype=torch.float64),
            _TIMES: torch.from_numpy(times),
            _SCORE_FITTED: torch.tensor(float(stochastic and not marginal), dtype=torch.float64),
        }
        dev = train.resolve_device(device)
        self.module.to(dev)
        groups = [self._to_state(x[t == ti]) for ti in times]
        taus = self._to_time(times).tolist()
        steps = int(np.ceil(max(len(g) for g in groups) / batch_size))

        def plan_of(a: torch.Tensor, b: torch.Tensor, dtau: float) -> torch.Tensor:
            cost = squared_cost(a, b)
            if stochastic:
                return entropic_plan(cost, 2.0 * diffusion**2 * dtau, reg_m=unbalanced)
            if unbalanced is not None:
                return entropic_plan(cost, UNBALANCED_REG * float(cost.mean()), reg_m=unbalanced)
            return exact_plan(cost)

        def couple(a: torch.Tensor, b: torch.Tensor, dtau: float, generator: torch.Generator):
            i, j = sample_plan(plan_of(a, b, dtau), max(len(a), len(b)), generator=generator)
            return a[i.to(a.device)], b[j.to(b.device)]

        # Up to FULL_PLAN_MAX_CELLS cells per time point the plans couple *all* cells, once: exact rather
        # than minibatch OT (no minibatch bias, as TrajectoryNet and MIOFlow couple), and every step then
        # only draws pairs, so the same time buys many more gradient steps. Above, minibatch plans.
        full = max(len(g) for g in groups) <= FULL_PLAN_MAX_CELLS and not marginal
        plans = [plan_of(groups[k], groups[k + 1], taus[k + 1] - taus[k]) for k in range(len(groups) - 1)] \
            if full else []
        steps = steps_per_epoch or steps

        dtaus = np.diff(taus)
        n_sim = int(min(MARGINAL_MAX_STEPS, math.ceil(MARGINAL_STEPS * dtaus.max() / dtaus.min() - 1e-9)))

        def marginal_batches(epoch: int, generator: torch.Generator):
            for _ in range(steps):
                parts = []
                for k in range(len(groups) - 1):
                    a, b = groups[k], groups[k + 1]
                    ia = torch.randint(len(a), (batch_size,), generator=generator).to(dev)
                    ib = torch.randint(len(b), (batch_size,), generator=generator).to(dev)
                    parts.append((a[ia], b[ib], torch.full((batch_size,), taus[k]),
                                  torch.full((batch_size,), taus[k + 1]), torch.full((batch_size,), k)))
                x0, x1, t0, t1, group = (torch.cat(p) for p in zip(*parts))
                noise = torch.randn(n_sim, *x0.shape, generator=generator)
                yield x0, x1, t0.to(dev), t1.to(dev), group.to(dev), noise.to(dev)

        def batches(epoch: int, generator: torch.Generator):
            for _ in range(steps):
                parts = []
                for k in range(len(groups) - 1):
                    a, b = groups[k], groups[k + 1]
                    if full:
                        i, j = sample_plan(plans[k], min(batch_size, max(len(a), len(b))), generator=generator)
                        x0, x1 = a[i.to(a.device)], b[j.to(b.device)]
                    else:
                        ia = torch.randperm(len(a), generator=generator)[:batch_size].to(dev)
                        ib = torch.randperm(len(b), generator=generator)[:batch_size].to(dev)
                        x0, x1 = couple(a[ia], b[ib], taus[k + 1] - taus[k], generator)
                    parts.append((x0, x1, torch.full((len(x0),), taus[k]), torch.full((len(x0),), taus[k + 1])))
                x0, x1, t0, t1 = (torch.cat(p) for p in zip(*parts))
                n = len(x0)
                s = torch.rand(n, generator=generator)
                noise = torch.randn(n, x0.shape[1], generator=generator)
                if stochastic:
                    s = S_MIN + (1.0 - 2.0 * S_MIN) * s
                else:
                    noise = sigma * noise
                yield x0, x1, t0.to(dev), t1.to(dev), s.to(dev), noise.to(dev)

        def hybrid_batches(epoch: int, generator: torch.Generator):
            for bridge, matched in zip(batches(epoch, generator), marginal_batches(epoch, generator), strict=True):
                yield *bridge, None, *matched

        return self._train(
            marginal_batches if marginal else hybrid_batches if objective == "hybrid" else batches,
            epochs=epochs,
            lr=lr,
            device=dev,
            seed=seed,
            on_epoch=on_epoch,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )

    def simulate(
        self,
        x0: np.ndarray,
        *,
        t0: float,
        t1: float,
        n_steps: int = 100,
        seed: int | None = None,
        ode: bool = False,
    ) -> np.ndarray:
        """Move cell states from time ``t0`` to ``t1`` under the learned dynamics.

        Deterministic model: midpoint (RK2) integration of dx/dt = v(x, t).
        Stochastic model: Euler-Maruyama of dX = f dt + g dW (a sample of the
        process; each cell its own path), or with ``ode=True`` midpoint
        integration of the probability-flow ODE dx/dt = f - g**2/2 s, which
        has the same marginals, deterministically. ODEs run backwards for
        ``t1 < t0``; the SDE only forwards. ``t1 == t0`` returns a copy of
        ``x0``. Times beyond the observed range extrapolate.

        Parameters
        ----------
        x0
            States at ``t0``, cells x ``dim``.
        t0, t1
            Start and end times, in the units of the training labels.
        n_steps
            Integration steps.
        seed
            Seed of the SDE's noise: the same seed gives the same paths.
            ``None`` draws from torch's global generator (as ``torch.randn``
            does). Unused by ODEs.
        ode
            Stochastic model: integrate the probability-flow ODE instead of
            sampling the SDE. Ignored by a deterministic model.

        Returns
        -------
        numpy.ndarray
            States at ``t1``, float32, same shape as ``x0``.
        """
        self._require_fitted("simulate")
        x0 = as_float_array(x0, name="x0", n_cols=self.init_kwargs["dim"])
        if n_steps < 1:
            raise BadInputError(f"n_steps must be >= 1; got {n_steps}")
        sde = self.stochastic and not ode
        if sde and t1 < t0:
            raise BadInputError(
                f"a stochastic model simulates forward in time only (t0={t0}, t1={t1}); "
                "pass ode=True to run its probability-flow ODE backwards"
            )
        if ode and self.stochastic and not bool(self._scaling.get(_SCORE_FITTED, torch.tensor(1.0))):
            raise BadInputError("this SDE was fitted by marginal matching, which does not train the score "
                                "that the probability-flow ODE needs; simulate it with ode=False")
        if t1 == t0:
            return x0.copy()
        self.module.eval()
        y = self._to_state(x0)
        tau0, tau1 = float(self._to_time(t0)), float(self._to_time(t1))
        h = (tau1 - tau0) / n_steps
        with torch.no_grad():
            if sde:
                generator = None if seed is None else torch.Generator().manual_seed(int(seed))
                y = euler_maruyama(self.module, y, tau0, tau1, n_steps, float(self.module.diffusion), generator)
            else:
                field = self.module.flow_velocity
                for k in range(n_steps):
                    tau = tau0 + k * h
                    mid = y + 0.5 * h * field(y, tau)
                    y = y + h * field(mid, tau + 0.5 * h)
        return self._from_state(y)

    def velocity(self, x: np.ndarray, t: float | np.ndarray, *, ode: bool = False) -> np.ndarray:
        """The drift at states ``x`` and time(s) ``t``, in real units.

        Deterministic model: dx/dt = v(x, t). Stochastic model: the SDE drift
        f(x, t) (the mean velocity of a cell at x), or with ``ode=True`` the
        probability-flow velocity f - g**2/2 s that :meth:`simulate` follows
        with ``ode=True``.
        """
        self._require_fitted("velocity")
        x = as_float_array(x, name="x", n_cols=self.init_kwargs["dim"])
        self.module.eval()
        field = self.module.flow_velocity if ode else self.module
        with torch.no_grad():
            v = field(self._to_state(x), self._to_time(t))
        # dx/dt = (x_scale / t_scale) * dy/dtau
        return (v.cpu().double() * (self._scaling[_X_SCALE] / self._scaling[_T_SCALE])).float().numpy()

    def potential(self, x: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """Landscape height Phi at states ``x`` and time(s) ``t``, shape (cells,).

        Scaled to real units so that :meth:`velocity` (the drift, for a
        stochastic model too) equals ``-grad_x`` of it; an autonomous model
        ignores ``t``. Only for models built with ``potential=True``.
        """
        self._require_fitted("potential")
        if not self.init_kwargs.get("potential", False):
            raise RuntimeError("this Simulator was built with potential=False; build it with potential=True")
        x = as_float_array(x, name="x", n_cols=self.init_kwargs["dim"])
        self.module.eval()
        with torch.no_grad():
            phi = self.module.drift.potential(self._to_state(x), self._to_time(t))
        # With y = (x - m) / s and tau = (t - t_min) / T, dy/dtau = -grad_y phi
        # gives dx/dt = -(s**2 / T) grad_x phi.
        scale = self._scaling[_X_SCALE] ** 2 / self._scaling[_T_SCALE]
        return (phi.cpu().double() * scale).float().numpy()
