"""Generative decoder: cell states to log-normalised gene expression.

The simulator predicts cell states in a learned embedding space; to be judged in
the literature's space (PCs of log-normalised highly variable genes) and to
"speak genes", its states are decoded to expression. A decoder that returned only
the conditional mean would shrink the spread of the cells (the measurement noise
is lost) and so bias every distribution distance against the model. This one is
a distribution: a Gaussian per gene whose mean and variance both depend on the
state, and :meth:`ExpressionDecoder.decode` draws from it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from virtualcell import train
from virtualcell.models._base import BaseModel, as_float_array
from virtualcell.train import BadInputError, dense_rows

__all__ = ["gaussian_nll", "GaussianDecoder", "ExpressionDecoder"]

_LOG_2PI = math.log(2.0 * math.pi)
# Range of the log-variance head, in units of each gene's own variance over the
# training cells: the noise sd stays between 1 % and 2x the gene's overall sd.
# The floor keeps the likelihood from running to +inf on genes the state
# explains perfectly (or constant ones); the ceiling keeps the variance head from
# "explaining" cells by inflating their noise instead of fitting their mean.
LOGVAR_MIN = 2.0 * math.log(0.01)
LOGVAR_MAX = 2.0 * math.log(2.0)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise negative log-density of a Gaussian with ``mean`` and ``exp(logvar)``.

    Equal to ``-scipy.stats.norm.logpdf(x, mean, exp(logvar / 2))``, the
    ``0.5 * log(2 pi)`` constant included, so losses are true NLLs in the units of ``x``.
    """
    return 0.5 * (_LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))


class GaussianDecoder(nn.Module):
    """MLP from (standardised) states to a Gaussian over each gene's expression.

    The heads work in units of each gene's mean and sd over the training cells
    (the buffers ``x_shift``, ``x_scale``, set by :meth:`set_gene_stats`), so that a
    fresh model starts near every gene's marginal distribution and genes of any
    spread train at one pace; :meth:`forward` returns real units.

    Parameters
    ----------
    n_input
        Dimension of the state space.
    n_genes
        Number of genes decoded.
    n_hidden, n_layers, dropout
        Width, depth and dropout of the MLP; ``n_layers=0`` gives a linear-Gaussian
        decoder (heads straight on the state).
    """

    def __init__(
        self, n_input: int, n_genes: int, *, n_hidden: int = 128, n_layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_input < 1 or n_genes < 1:
            raise BadInputError(f"n_input and n_genes must be >= 1; got {n_input} and {n_genes}")
        if n_layers < 0:
            raise BadInputError(f"n_layers must be >= 0; got {n_layers}")
        layers: list[nn.Module] = []
        n_in = int(n_input)
        for _ in range(n_layers):
            layers += [nn.Linear(n_in, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU(), nn.Dropout(dropout)]
            n_in = n_hidden
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Linear(n_in, n_genes)
        self.logvar_head = nn.Linear(n_in, n_genes)
        self.register_buffer("x_shift", torch.zeros(n_genes))
        self.register_buffer("x_scale", torch.ones(n_genes))

    def set_gene_stats(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Set each gene's mean and sd (> 0) over the training cells."""
        self.x_shift.copy_(shift)
        self.x_scale.copy_(scale)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of every gene, (cells, n_genes) each, for standardised states ``z``."""
        h = self.trunk(z)
        # Cast back from bf16 under autocast: exp() of the log-variance needs fp32 range.
        mean = self.x_shift + self.x_scale * self.mean_head(h).float()
        logvar = 2.0 * torch.log(self.x_scale) + self.logvar_head(h).float().clamp(LOGVAR_MIN, LOGVAR_MAX)
        return mean, logvar

    def loss(self, z: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gaussian NLL per gene and cell, averaged.

        Returns
        -------
        dict
            ``"loss"`` = mean Gaussian negative log-likelihood per gene (nats, in
            the units of ``x``); ``"mse"`` = mean squared error of the mean.
        """
        x = x.float()
        mean, logvar = self(z)
        return {
            train.LOSS_KEY: gaussian_nll(x, mean, logvar).mean(),
            "mse": (x - mean).pow(2).mean().detach(),
        }


# Names of the state scaling kept beside the weights in a saved ExpressionDecoder.
_Z_SHIFT, _Z_SCALE = "z_shift", "z_scale"


class ExpressionDecoder(BaseModel):
    """User-facing generative decoder of cell states to log-normalised expression.

    States are centred and divided by one isotropic scale (their RMS distance to
    the centre), as in :class:`~virtualcell.models.dynamics.Simulator`, so the
    geometry of the embedding is kept; the scaling is saved with the model and
    every method takes real units. Gene names are the caller's to keep: columns
    come out in the order of the training matrix.

    Parameters
    ----------
    n_input
        Dimension of the state space.
    n_genes
        Number of genes (columns of the expression matrix).
    n_hidden, n_layers, dropout
        Passed to :class:`GaussianDecoder`.

    Examples
    --------
    >>> dec = ExpressionDecoder(16, n_hvg)
    >>> dec.fit(z, x_lognorm, epochs=100, seed=0)
    >>> x_day4 = dec.decode(sim.simulate(z[day == 3], t0=3, t1=4), seed=0)
    """

    _module_cls = GaussianDecoder

    def __init__(
        self, n_input: int, n_genes: int, *, n_hidden: int = 128, n_layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__(
            n_input=int(n_input), n_genes=int(n_genes), n_hidden=int(n_hidden), n_layers=int(n_layers),
            dropout=float(dropout),
        )
        self._scaling: dict[str, torch.Tensor] = {}

    @property
    def n_genes(self) -> int:
        return self.init_kwargs["n_genes"]

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return dict(self._scaling)

    def _load_extra_state(self, extra: dict[str, torch.Tensor]) -> None:
        self._scaling = {k: v.double() for k, v in extra.items()}

    def _states(self, z, name: str) -> np.ndarray:
        return as_float_array(z, name=name, n_cols=self.init_kwargs["n_input"])

    def _pair(self, z, x, suffix: str = ""):
        """States (dense) and expression (dense, or scipy sparse kept sparse as CSR), checked."""
        z = self._states(z, f"z{suffix}")
        x = as_float_array(x, name=f"x{suffix}", n_cols=self.n_genes, sparse=True)
        if z.shape[0] != x.shape[0]:
            raise BadInputError(
                f"z{suffix} and x{suffix} must hold the same cells row by row; got {z.shape[0]} and {x.shape[0]} rows"
            )
        return z, x

    def _to_state(self, z: np.ndarray) -> torch.Tensor:
        y = (torch.as_tensor(z, dtype=torch.float64) - self._scaling[_Z_SHIFT]) / self._scaling[_Z_SCALE]
        return y.float()

    @staticmethod
    def _gene_stats(x, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each gene's mean and sd (1 where a gene is constant), densifying ``rows`` rows at a time.

        Dense and sparse input go through the same chunks, so they give the same bits.
        """
        n = x.shape[0]
        chunks = [slice(i, i + rows) for i in range(0, n, rows)]
        total = sum(dense_rows(x, c).double().sum(0) for c in chunks)
        mean = total / n
        sq = sum((dense_rows(x, c).double() - mean).pow(2).sum(0) for c in chunks)
        sd = (sq / n).sqrt()
        return mean.float(), torch.where(sd > 0, sd, torch.ones_like(sd)).float()

    def fit(
        self,
        z: np.ndarray,
        x,
        *,
        z_val: np.ndarray | None = None,
        x_val=None,
        epochs: int = 100,
        batch_size: int = 256,
        steps_per_epoch: int | None = None,
        lr: float = 1e-3,
        device: str = "auto",
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """Train on cells' states and their log-normalised expression.

        A fresh model takes the state scaling and each gene's mean and sd from
        these cells; a fitted one continues training with those it has.

        Parameters
        ----------
        z
            Cell states, cells x ``n_input`` (dense).
        x
            Log-normalised expression of the same cells, cells x ``n_genes``: dense,
            or scipy sparse (kept sparse; each minibatch's rows are densified as it is drawn).
        z_val, x_val
            Held-out cells; their loss terms are reported as ``val_loss``, ``val_mse``.
        steps_per_epoch
            Gradient steps per epoch, drawn from successive shuffled passes over the cells;
            None = one pass. A few hundred cells make one minibatch a pass, so epochs alone
            would leave a small dataset's decoder a few dozen steps.
        epochs, batch_size, lr, device, seed, on_epoch, checkpoint_path, checkpoint_every
            See :func:`virtualcell.train.fit`.

        Returns
        -------
        list of dict
            Per-epoch metrics (``loss``: Gaussian NLL per gene, ``mse``, and their
            ``val_`` versions), also kept in ``self.history``.
        """
        z, x = self._pair(z, x)
        if (z_val is None) != (x_val is None):
            raise BadInputError("give both z_val and x_val, or neither")
        if z_val is not None:
            z_val, x_val = self._pair(z_val, x_val, "_val")
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1; got {batch_size}")
        self._prepare_fit(seed)
        if not self.is_fitted:
            z64 = z.astype(np.float64)
            z_shift = z64.mean(axis=0)
            z_scale = float(np.sqrt(((z64 - z_shift) ** 2).sum(axis=1).mean())) or 1.0
            self._scaling = {
                _Z_SHIFT: torch.from_numpy(z_shift),
                _Z_SCALE: torch.tensor(z_scale, dtype=torch.float64),
            }
            self.module.set_gene_stats(*self._gene_stats(x, batch_size))
        dev = train.resolve_device(device)
        states = self._to_state(z).to(dev)
        # Dense expression goes to the device whole; sparse stays on the host and each
        # minibatch's rows are densified on their way.
        data = x if sp.issparse(x) else torch.as_tensor(x, device=dev)

        def batches(epoch: int, generator: torch.Generator):
            if steps_per_epoch is None:
                yield from train.minibatches(states, data, batch_size=batch_size, generator=generator)
                return
            done = 0
            while done < steps_per_epoch:
                for batch in train.minibatches(states, data, batch_size=batch_size, generator=generator):
                    yield batch
                    done += 1
                    if done == steps_per_epoch:
                        return

        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise BadInputError(f"steps_per_epoch must be >= 1 or None; got {steps_per_epoch}")
        val_fn = None
        if z_val is not None:
            val_states = self._to_state(z_val).to(dev)

            def val_fn(module: GaussianDecoder) -> dict[str, float]:
                sums: dict[str, float] = {}
                n_val = x_val.shape[0]
                for i in range(0, n_val, batch_size):
                    chunk = dense_rows(x_val, slice(i, i + batch_size)).to(dev)
                    for key, value in module.loss(val_states[i : i + batch_size], chunk).items():
                        sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
                return {key: total / n_val for key, total in sums.items()}

        return self._train(
            batches,
            epochs=epochs,
            lr=lr,
            device=dev,
            seed=seed,
            on_epoch=on_epoch,
            val_fn=val_fn,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )

    def _moments(self, z: np.ndarray, batch_size: int) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Rows, means and sds of the decoded Gaussians of checked states, chunk by chunk, without gradients."""
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1; got {batch_size}")
        self.module.eval()
        states = self._to_state(z)
        with torch.no_grad():
            for i in range(0, len(states), batch_size):
                mean, logvar = self.module(states[i : i + batch_size].to(self.device))
                yield slice(i, i + len(mean)), mean.cpu().numpy(), torch.exp(0.5 * logvar).cpu().numpy()

    def mean_and_std(self, z: np.ndarray, *, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of each gene given each state, two float32 arrays, cells x ``n_genes``."""
        self._require_fitted("mean_and_std")
        z = self._states(z, "z")
        mean = np.empty((len(z), self.n_genes), dtype=np.float32)
        std = np.empty_like(mean)
        for rows, m, s in self._moments(z, batch_size):
            mean[rows], std[rows] = m, s
        return mean, std

    def decode(self, z: np.ndarray, *, sample: bool = True, seed: int | None = 0, batch_size: int = 4096) -> np.ndarray:
        """Log-normalised expression of cells in states ``z``.

        Parameters
        ----------
        z
            Cell states, cells x ``n_input``.
        sample
            Draw each gene from its Gaussian (the default: decoded cells keep the
            spread of real ones); ``False`` returns the means, which under-disperse.
            Draws are not clipped, so a gene near zero can come out slightly negative.
        seed
            Seed of the draws; ``None`` draws fresh randomness. The standard-normal
            draws are made on the CPU in cell order, so they do not depend on the
            device or ``batch_size`` (the means may, by float rounding).
        batch_size
            States decoded at a time.

        Returns
        -------
        numpy.ndarray
            float32, cells x ``n_genes``, genes in the order of the training matrix.
        """
        self._require_fitted("decode")
        z = self._states(z, "z")
        out = np.empty((len(z), self.n_genes), dtype=np.float32)
        rng = np.random.default_rng(seed)
        for rows, mean, std in self._moments(z, batch_size):
            if sample:
                mean += std * rng.standard_normal(mean.shape, dtype=np.float32)
            out[rows] = mean
        return out
