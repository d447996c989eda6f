"""Count-aware encoder: a negative-binomial VAE over one or more count blocks.

One block (``[n_genes]``) encodes RNA alone; several blocks
(``[n_genes, n_proteins]``) give the joint "encoding as compression" encoder:
one latent space explains all modalities, each decoded with its own softmax
and its own library size.

A block of continuous values (log expression of a published TPM table or a
log-normalised matrix: no counts, so no library size and no NB) is declared
``"gaussian"`` in ``likelihoods``: its values enter the encoder as they are and
are decoded to a mean with one learned variance per feature (scvi-tools'
``gene_likelihood="normal"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from virtualcell import train
from virtualcell.models._base import BaseModel, apply_in_batches, as_float_array
from virtualcell.train import BadInputError, dense_rows

__all__ = ["nb_log_prob", "nb_log_prob_cells", "NBVAE", "CountEncoder", "LIKELIHOODS"]

LIKELIHOODS = ("nb", "gaussian")

_EPS = 1e-8
# Floor on the posterior variance: keeps log-variance from running to -inf on
# cells the decoder already explains perfectly.
_VAR_FLOOR = 1e-4


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Elementwise log-pmf of a negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Equal to ``scipy.stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))``;
    the variance is ``mu + mu**2 / theta``. Written with ``lgamma`` so it is
    stable for large counts and large ``theta`` (scvi-tools' ``log_nb_positive``).

    Parameters
    ----------
    x
        Observed counts.
    mu
        Means, > 0 (``eps`` guards exact zeros).
    theta
        Inverse dispersions, > 0; broadcast against ``x``.

    Returns
    -------
    torch.Tensor
        Log-probabilities with the broadcast shape of the inputs.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def nb_log_prob_cells(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = _EPS, *,
                      nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`nb_log_prob` summed over features, one value per cell, for a 1-D ``theta`` (per feature).

    Equal to ``nb_log_prob(x, mu, theta).sum(-1)``, but the terms that vanish where ``x == 0``
    (``x log mu``, ``lgamma(x + theta) - lgamma(theta)`` and ``lgamma(x + 1)``) are evaluated on the
    nonzero counts only. Written out because lgamma and its backward (digamma) were ~40 % of a
    training step with the dense form (scvi-tools' ``log_nb_positive`` is dense too), and count
    matrices are mostly zeros; the result differs from the dense sum by rounding only.

    ``nonzero`` is ``(rows, cols, counts)`` of ``x``'s stored entries when the caller has them (a CSR
    minibatch: no scan of ``x``); explicit zeros among them add nothing.
    """
    # theta log theta - (theta + x) log(theta + mu): the terms that do not vanish at x == 0.
    dense = (theta * torch.log(theta + eps)).sum() - ((theta + x) * torch.log(theta + mu + eps)).sum(-1)
    if nonzero is None:
        rows, cols = torch.nonzero(x, as_tuple=True)
        counts = x[rows, cols]
    else:
        rows, cols, counts = nonzero
    # index_select on the flat matrix: faster than mu[rows, cols], forward and backward.
    mu_nz = mu.reshape(-1).index_select(0, rows * mu.shape[-1] + cols)
    theta_nz = theta.index_select(0, cols)
    per_count = (counts * torch.log(mu_nz + eps) + torch.lgamma(counts + theta_nz)
                 - torch.lgamma(theta).index_select(0, cols) - torch.lgamma(counts + 1.0))
    return dense.index_add(0, rows, per_count)


def _mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class NBVAE(nn.Module):
    """Variational autoencoder with a negative-binomial likelihood per count block.

    Parameters
    ----------
    n_inputs
        Number of features in each count block, in column order of the input.
    n_latent
        Dimension of the latent space.
    n_hidden, n_layers, dropout
        Width, depth and dropout of the encoder and decoder MLPs.
    kl_weight
        Weight of the KL term in the loss (1 = the ELBO).
    likelihoods
        Per block, ``"nb"`` (counts, the default) or ``"gaussian"`` (continuous
        values such as log expression).
    """

    def __init__(
        self,
        n_inputs: Sequence[int],
        *,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        kl_weight: float = 1.0,
        likelihoods: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.n_inputs = [int(n) for n in n_inputs]
        if not self.n_inputs or min(self.n_inputs) < 1:
            raise BadInputError(f"n_inputs must be a non-empty list of positive block sizes; got {list(n_inputs)}")
        if n_layers < 1:
            raise BadInputError(f"n_layers must be >= 1; got {n_layers}")
        self.likelihoods = list(likelihoods) if likelihoods is not None else ["nb"] * len(self.n_inputs)
        if len(self.likelihoods) != len(self.n_inputs) or set(self.likelihoods) - set(LIKELIHOODS):
            raise BadInputError(
                f"likelihoods must give one of {list(LIKELIHOODS)} per block ({len(self.n_inputs)} blocks); "
                f"got {self.likelihoods}"
            )
        self.kl_weight = float(kl_weight)
        n_total = sum(self.n_inputs)
        self.encoder = _mlp(n_total, n_hidden, n_layers, dropout)
        self.z_mean = nn.Linear(n_hidden, n_latent)
        self.z_logvar = nn.Linear(n_hidden, n_latent)
        self.decoder = _mlp(n_latent, n_hidden, n_layers, dropout)
        self.block_heads = nn.ModuleList(nn.Linear(n_hidden, n) for n in self.n_inputs)
        # theta = exp(log_theta): one inverse dispersion per feature, shared by cells; for a
        # Gaussian block it is the log-variance of each feature instead.
        self.log_theta = nn.Parameter(torch.zeros(n_total))

    def _is_gaussian(self, i: int) -> bool:
        return self.likelihoods[i] == "gaussian"

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.n_inputs, dim=-1)

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z | x) for raw counts ``x`` (continuous blocks as they are)."""
        h = self.encoder(torch.cat([b if self._is_gaussian(i) else torch.log1p(b)
                                    for i, b in enumerate(self._blocks(x))], dim=-1))
        # Cast back from bf16 under autocast: the KL and exp() need fp32 range.
        mean = self.z_mean(h).float()
        var = torch.exp(self.z_logvar(h).float()) + _VAR_FLOOR
        return mean, var

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of z, the cell embedding."""
        return self.encode_distribution(x)[0]

    def decode(self, z: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """NB means: per-block softmax over features times that block's library size; a Gaussian
        block's means directly.

        ``library`` is (cells, n_blocks).
        """
        h = self.decoder(z)
        return torch.cat(
            [head(h).float() if self._is_gaussian(i) else F.softmax(head(h).float(), dim=-1) * library[:, i : i + 1]
             for i, head in enumerate(self.block_heads)],
            dim=-1,
        )

    def library_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """Observed total counts of each cell in each block, (cells, n_blocks)."""
        return torch.stack([block.sum(-1) for block in torch.split(x, self.n_inputs, dim=-1)], dim=-1)

    def loss(self, x: torch.Tensor, *nonzero: torch.Tensor) -> dict[str, torch.Tensor]:
        """Negative ELBO per cell, averaged over cells.

        ``nonzero``: optionally ``rows, cols, counts`` of ``x``'s stored entries (a sparse minibatch's),
        which spare the NB term a scan for them (:func:`nb_log_prob_cells`).

        Returns
        -------
        dict
            ``"loss"`` = mean(nll + kl_weight * kl); ``"nll"`` = mean NB
            negative log-likelihood summed over features; ``"kl"`` = mean
            KL(q(z|x) || N(0, I)).
        """
        x = x.float()
        mean, var = self.encode_distribution(x)
        z = mean + var.sqrt() * torch.randn_like(mean)
        mu = self.decode(z, self.library_sizes(x))
        if all(lik == "nb" for lik in self.likelihoods):
            nll = -nb_log_prob_cells(x, mu, torch.exp(self.log_theta), nonzero=(
                (nonzero[0], nonzero[1], nonzero[2].float()) if nonzero else None))
        else:
            parts = []
            for i, (xb, mb, tb) in enumerate(zip(self._blocks(x), self._blocks(mu), torch.split(self.log_theta,
                                                                                                self.n_inputs))):
                if self._is_gaussian(i):
                    parts.append(0.5 * ((xb - mb) ** 2 * torch.exp(-tb) + tb + math.log(2 * math.pi)).sum(-1))
                else:
                    parts.append(-nb_log_prob_cells(xb, mb, torch.exp(tb)))
            nll = torch.stack(parts, dim=-1).sum(-1)
        kl = 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)
        return {train.LOSS_KEY: (nll + self.kl_weight * kl).mean(), "nll": nll.mean(), "kl": kl.mean()}


class CountEncoder(BaseModel):
    """User-facing NB-VAE: fit on a counts matrix, encode cells to a latent space.

    Parameters
    ----------
    n_inputs
        Features per count block, in column order (e.g. ``[n_genes, n_proteins]``).
    **module_kwargs
        Passed to :class:`NBVAE` (``n_latent``, ``n_hidden``, ``n_layers``,
        ``dropout``, ``kl_weight``, ``likelihoods``: ``["gaussian"]`` for log
        expression instead of counts).

    Examples
    --------
    >>> enc = CountEncoder([2000, 30], n_latent=16)
    >>> history = enc.fit(counts, epochs=50, seed=0)
    >>> z = enc.encode(counts)
    """

    _module_cls = NBVAE

    def __init__(self, n_inputs: Sequence[int], **module_kwargs) -> None:
        super().__init__(n_inputs=[int(n) for n in n_inputs], **module_kwargs)

    @property
    def n_features(self) -> int:
        return sum(self.init_kwargs["n_inputs"])

    def _counts(self, x, name: str):
        """Counts as given: a dense array, a scipy sparse matrix kept sparse (CSR), or an on-disk CSR
        matrix (AnnData backed), left on disk: its values are checked batch by batch as they are read."""
        if train.on_disk(x):
            if len(x.shape) != 2 or x.shape[1] != self.n_features or x.shape[0] == 0:
                raise BadInputError(f"{name} has shape {tuple(x.shape)}; the model was built for {self.n_features} "
                                    "columns")
            return x
        x = as_float_array(x, name=name, n_cols=self.n_features, sparse=True)
        likelihoods = self.init_kwargs.get("likelihoods") or ["nb"] * len(self.init_kwargs["n_inputs"])
        if all(lik == "nb" for lik in likelihoods) and ((x.data if sp.issparse(x) else x) < 0).any():
            raise BadInputError(f"{name} contains negative values; the encoder needs raw counts, not normalised data "
                                "(or likelihoods=['gaussian'] for log expression)")
        return x

    def fit(
        self,
        x: np.ndarray,
        *,
        x_val: np.ndarray | None = None,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        device: str = "auto",
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """Train on raw counts.

        Parameters
        ----------
        x
            Counts, cells x features (the blocks concatenated): dense, or scipy sparse (kept
            sparse; each minibatch's rows are densified as it is drawn).
        x_val
            Held-out cells; their loss terms are reported as ``val_loss``,
            ``val_nll``, ``val_kl``.
        epochs, batch_size, lr, device, seed, on_epoch, checkpoint_path, checkpoint_every
            See :func:`virtualcell.train.fit`.

        Returns
        -------
        list of dict
            Per-epoch metrics, also kept in ``self.history``.
        """
        x = self._counts(x, "x")
        x_val = None if x_val is None else self._counts(x_val, "x_val")
        self._prepare_fit(seed)
        dev = train.resolve_device(device)
        # Dense counts go to the device whole; sparse ones stay on the host and each minibatch's
        # rows are densified on their way (a 100,000 x 2,000 matrix would be 800 MB dense); on-disk
        # ones stay on disk and are read a buffer of rows at a time (train.minibatches).
        streamed = train.on_disk(x)
        counts_only = all(lik == "nb" for lik in self.init_kwargs.get("likelihoods") or ["nb"])
        if dev.type == "cpu" and not streamed and not sp.issparse(x) and counts_only:
            # On the CPU a dense count matrix trains faster as CSR: the NB term reads each batch's stored
            # entries from it, where finding them in the dense batch (torch.nonzero) cost 3 ms a batch.
            x = sp.csr_matrix(x)
        data = x if sp.issparse(x) or streamed else torch.as_tensor(x, device=dev)

        def batches(epoch: int, generator: torch.Generator):
            # A sparse batch comes with its stored entries, which the NB term needs (nb_log_prob_cells).
            stream = train.minibatches(data, batch_size=batch_size, generator=generator,
                                       nonzero=sp.issparse(data) or streamed)
            for batch in stream:
                if streamed:
                    values = batch[-1]
                    if not torch.isfinite(values).all() or (counts_only and (values < 0).any()):
                        raise BadInputError("x contains negative, NaN or infinite values; the encoder needs raw "
                                            "counts (or likelihoods=['gaussian'] for log expression)")
                yield batch

        val_fn = None
        if x_val is not None:

            def val_fn(module: NBVAE) -> dict[str, float]:
                sums: dict[str, float] = {}
                n_val = x_val.shape[0]
                for i in range(0, n_val, batch_size):
                    rows = slice(i, i + batch_size)
                    chunk = ([dense_rows(x_val, rows)] if not (sp.issparse(x_val) or train.on_disk(x_val))
                             else train.sparse_rows(x_val, rows))
                    chunk = [t.to(dev) for t in chunk]
                    for key, value in module.loss(*chunk).items():
                        sums[key] = sums.get(key, 0.0) + float(value) * len(chunk[0])
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

    def encode(self, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """Posterior means of the latent variables, cells x ``n_latent`` (float32)."""
        self._require_fitted("encode")
        x = self._counts(x, "x")
        self.module.eval()
        return apply_in_batches(self.module.encode, x, device=self.device, batch_size=batch_size)
