"""The simulator: cell-state dynamics in an embedding space, learned from snapshots.

Cells are observed at a few time points (different cells each time). Following
torchcfm's OT conditional flow matching, cells of consecutive observed time
points are coupled by an exact minibatch optimal-transport plan, and a velocity
field v(x, t) is regressed onto the straight-line velocities of sampled pairs.
Integrating v then moves any cell state forward (or backward) in time.

With ``potential=True`` the velocity is the negative gradient of a learned
scalar potential, v = -grad_x Phi(x, t): a Waddington landscape in which cells
roll downhill into fate valleys.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import ot
import torch
from torch import nn

from virtualcell import train
from virtualcell.train import BadInputError
from virtualcell.models._base import BaseModel, as_float_array

__all__ = ["sample_ot_pairs", "conditional_flow", "VelocityField", "Simulator"]


# --------------------------------------------------------------------------
# Stateless core
# --------------------------------------------------------------------------


def sample_ot_pairs(
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    n_pairs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample pairs from the exact OT plan between two minibatches.

    The plan couples the rows of ``x0`` and ``x1`` (uniform marginals,
    squared-Euclidean cost) and is solved exactly with ``ot.emd``; pairs are
    then drawn from it with replacement, as torchcfm's ``OTPlanSampler`` does.

    Parameters
    ----------
    x0, x1
        Source and target samples, (n0, d) and (n1, d).
    generator
        CPU generator for the draw.
    n_pairs
        Number of pairs; default ``max(n0, n1)``.

    Returns
    -------
    tuple of torch.Tensor
        Paired rows ``(x0[i], x1[j])``, each (n_pairs, d).
    """
    n0, n1 = len(x0), len(x1)
    n_pairs = max(n0, n1) if n_pairs is None else n_pairs
    # The plan is computed in float64 on CPU (MPS has no float64): the network
    # simplex is exact and deterministic, so couplings match across devices.
    a, b = (x.detach().to("cpu", torch.float64) for x in (x0, x1))
    cost = torch.cdist(a, b).pow(2).numpy()
    plan = ot.emd(np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1), cost, numItermax=1_000_000)
    plan = torch.from_numpy(plan)
    # Row from its marginal, then column given the row: the same joint draw as
    # sampling the flattened plan, without multinomial's 2**24-category limit.
    i = torch.multinomial(plan.sum(1), n_pairs, replacement=True, generator=generator)
    j = torch.multinomial(plan[i], 1, generator=generator).squeeze(1)
    return x0[i.to(x0.device)], x1[j.to(x1.device)]


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


# --------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------


class VelocityField(nn.Module):
    """MLP velocity field v(x, t), optionally the negative gradient of a potential.

    Parameters
    ----------
    dim
        Dimension of the state space.
    n_hidden, n_layers
        Width and number of hidden layers of the MLP.
    potential
        If True the MLP outputs a scalar Phi(x, t) and v = -grad_x Phi.
    """

    def __init__(self, dim: int, *, n_hidden: int = 128, n_layers: int = 3, potential: bool = False) -> None:
        super().__init__()
        if n_layers < 1:
            raise BadInputError(f"n_layers must be >= 1; got {n_layers}")
        self.dim = int(dim)
        self.is_potential = bool(potential)
        layers: list[nn.Module] = []
        n_in = self.dim + 1  # time is one extra input feature
        for _ in range(n_layers):
            # SiLU, not ReLU: the potential's gradient must itself be smooth,
            # and a ReLU network's gradient is piecewise constant in x.
            layers += [nn.Linear(n_in, n_hidden), nn.SiLU()]
            n_in = n_hidden
        layers.append(nn.Linear(n_in, 1 if self.is_potential else self.dim))
        self.net = nn.Sequential(*layers)

    def _net_input(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return torch.cat([x, t.reshape(-1, 1).expand(len(x), 1)], dim=-1)

    def potential(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Phi(x, t), shape (n,). Only for ``potential=True``."""
        if not self.is_potential:
            raise RuntimeError("this VelocityField was built with potential=False and has no potential")
        return self.net(self._net_input(x, t)).squeeze(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Velocity at states ``x`` (n, dim) and times ``t`` (scalar or (n,))."""
        if not self.is_potential:
            return self.net(self._net_input(x, t))
        # The graph through the gradient is only kept when the caller is
        # differentiating (training); simulation under no_grad still needs
        # autograd for the gradient itself, hence enable_grad.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            phi = self.potential(x, t)
            (grad,) = torch.autograd.grad(phi.sum(), x, create_graph=create_graph)
        return -grad

    def loss(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        t0: torch.Tensor,
        t1: torch.Tensor,
        s: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Flow-matching loss on OT-paired samples.

        Parameters
        ----------
        x0, x1
            Paired states at times ``t0`` and ``t1`` (n, dim).
        t0, t1
            Times of each pair, (n,), with ``t1 > t0``.
        s
            Path positions in [0, 1], (n,).
        noise
            Perturbation already scaled by sigma, (n, dim).

        Returns
        -------
        dict
            ``"loss"``: mean squared error between v(x_s, t0 + s (t1 - t0))
            and (x1 - x0) / (t1 - t0).
        """
        x_s, u = conditional_flow(x0, x1, s, 1.0, noise)
        dt = (t1 - t0).reshape(-1, 1)
        v = self(x_s, t0 + s.reshape(-1) * (t1 - t0))
        return {train.LOSS_KEY: torch.mean((v.float() - u / dt) ** 2)}


# --------------------------------------------------------------------------
# User-facing model
# --------------------------------------------------------------------------

# Names of the data scaling kept beside the weights in a saved Simulator.
_X_SHIFT, _X_SCALE, _T_SHIFT, _T_SCALE, _TIMES = "x_shift", "x_scale", "t_shift", "t_scale", "times"


class Simulator(BaseModel):
    """User-facing simulator of cell-state trajectories in an embedding space.

    Internally states are centred and divided by one isotropic scale, and time
    is mapped to [0, 1] over the observed range; the scaling is saved with the
    model, and every method takes and returns real units. Isotropic scaling
    keeps the potential a potential: the real-space velocity is exactly minus
    the gradient of :meth:`potential`.

    Parameters
    ----------
    dim
        Dimension of the state space.
    **module_kwargs
        Passed to :class:`VelocityField` (``n_hidden``, ``n_layers``, ``potential``).

    Examples
    --------
    >>> sim = Simulator(16, potential=True)
    >>> sim.fit(z, day, epochs=200, seed=0)
    >>> z_day4 = sim.simulate(z[day == 3], t0=3, t1=4)
    """

    _module_cls = VelocityField

    def __init__(self, dim: int, **module_kwargs) -> None:
        super().__init__(dim=int(dim), **module_kwargs)
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
        device: str = "auto",
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """Learn the velocity field from time-labelled snapshots.

        Only consecutive *observed* time points are paired, so a held-out time
        point is simply absent from ``t`` and the model must bridge the gap.

        Parameters
        ----------
        x
            Cell states (e.g. shared embeddings), cells x ``dim``.
        t
            One numeric time label per cell; at least two distinct values.
        epochs
            Each epoch draws ``ceil(max cells per time point / batch_size)``
            steps; every step holds one OT-paired minibatch per interval.
        batch_size
            Cells per time point per OT minibatch.
        sigma
            Noise around the straight paths, in standardised state units.
        lr, device, seed, on_epoch, checkpoint_path, checkpoint_every
            See :func:`virtualcell.train.fit`.

        Returns
        -------
        list of dict
            Per-epoch ``loss``.
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

        self._prepare_fit(seed)
        x64 = x.astype(np.float64)
        x_shift = x64.mean(axis=0)
        x_scale = float(np.sqrt(((x64 - x_shift) ** 2).mean())) or 1.0
        self._scaling = {
            _X_SHIFT: torch.from_numpy(x_shift),
            _X_SCALE: torch.tensor(x_scale, dtype=torch.float64),
            _T_SHIFT: torch.tensor(times[0], dtype=torch.float64),
            _T_SCALE: torch.tensor(times[-1] - times[0], dtype=torch.float64),
            _TIMES: torch.from_numpy(times),
        }
        dev = train.resolve_device(device)
        self.module.to(dev)
        groups = [self._to_state(x[t == ti]) for ti in times]
        taus = self._to_time(times).tolist()
        steps = int(np.ceil(max(len(g) for g in groups) / batch_size))

        def batches(epoch: int, generator: torch.Generator):
            for _ in range(steps):
                parts = []
                for k in range(len(groups) - 1):
                    a, b = groups[k], groups[k + 1]
                    ia = torch.randperm(len(a), generator=generator)[:batch_size].to(dev)
                    ib = torch.randperm(len(b), generator=generator)[:batch_size].to(dev)
                    x0, x1 = sample_ot_pairs(a[ia], b[ib], generator=generator)
                    parts.append((x0, x1, torch.full((len(x0),), taus[k]), torch.full((len(x0),), taus[k + 1])))
                x0, x1, t0, t1 = (torch.cat(p) for p in zip(*parts))
                n = len(x0)
                s = torch.rand(n, generator=generator)
                noise = sigma * torch.randn(n, x0.shape[1], generator=generator)
                yield x0, x1, t0.to(dev), t1.to(dev), s.to(dev), noise.to(dev)

        return self._train(
            batches,
            epochs=epochs,
            lr=lr,
            device=dev,
            seed=seed,
            on_epoch=on_epoch,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )

    def simulate(self, x0: np.ndarray, *, t0: float, t1: float, n_steps: int = 100) -> np.ndarray:
        """Move cell states from time ``t0`` to ``t1`` along the learned flow.

        Deterministic midpoint (RK2) integration of dx/dt = v(x, t); ``t1 < t0``
        integrates backwards, ``t1 == t0`` returns a copy of ``x0``.

        Parameters
        ----------
        x0
            States at ``t0``, cells x ``dim``.
        t0, t1
            Start and end times, in the units of the training labels.
        n_steps
            Integration steps.

        Returns
        -------
        numpy.ndarray
            States at ``t1``, float32, same shape as ``x0``.
        """
        self._require_fitted("simulate")
        x0 = as_float_array(x0, name="x0", n_cols=self.init_kwargs["dim"])
        if n_steps < 1:
            raise BadInputError(f"n_steps must be >= 1; got {n_steps}")
        if t1 == t0:
            return x0.copy()
        self.module.eval()
        y = self._to_state(x0)
        tau0, tau1 = float(self._to_time(t0)), float(self._to_time(t1))
        h = (tau1 - tau0) / n_steps
        with torch.no_grad():
            for k in range(n_steps):
                tau = tau0 + k * h
                mid = y + 0.5 * h * self.module(y, tau)
                y = y + h * self.module(mid, tau + 0.5 * h)
        return self._from_state(y)

    def velocity(self, x: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """dx/dt at states ``x`` and time(s) ``t``, in real units."""
        self._require_fitted("velocity")
        x = as_float_array(x, name="x", n_cols=self.init_kwargs["dim"])
        self.module.eval()
        with torch.no_grad():
            v = self.module(self._to_state(x), self._to_time(t))
        # dx/dt = (x_scale / t_scale) * dy/dtau
        return (v.cpu().double() * (self._scaling[_X_SCALE] / self._scaling[_T_SCALE])).float().numpy()

    def potential(self, x: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """Landscape height Phi at states ``x`` and time(s) ``t``, shape (cells,).

        Scaled to real units so that :meth:`velocity` equals ``-grad_x`` of it.
        Only for models built with ``potential=True``.
        """
        self._require_fitted("potential")
        if not self.init_kwargs.get("potential", False):
            raise RuntimeError("this Simulator was built with potential=False; build it with potential=True")
        x = as_float_array(x, name="x", n_cols=self.init_kwargs["dim"])
        self.module.eval()
        with torch.no_grad():
            phi = self.module.potential(self._to_state(x), self._to_time(t))
        # With y = (x - m) / s and tau = (t - t_min) / T, dy/dtau = -grad_y phi
        # gives dx/dt = -(s**2 / T) grad_x phi.
        scale = self._scaling[_X_SCALE] ** 2 / self._scaling[_T_SCALE]
        return (phi.cpu().double() * scale).float().numpy()
