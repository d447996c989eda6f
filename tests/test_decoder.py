"""Tests of virtualcell.models.decoder: the generative decoder of cell states to expression."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.sparse as sp
import scipy.stats
import torch

from virtualcell.errors import InputError
from virtualcell.models.decoder import LOGVAR_MAX, LOGVAR_MIN, ExpressionDecoder, GaussianDecoder, gaussian_nll
from virtualcell.models.dynamics import Simulator

CPU = "cpu"

# Toy truth: 20 genes, each a sinusoid of a 2-D state plus Gaussian noise; the first
# half have a constant noise sd, the second half an sd that grows with the state's
# first coordinate (0.2 to 0.8), as measurement noise grows with expression.
N_GENES = 20
HETERO = slice(N_GENES // 2, N_GENES)


def _cells(n: int, seed: int):
    """States, expression, true means and true noise sds of ``n`` cells."""
    p = np.random.default_rng(123)  # the genes: the same in every call
    w = p.normal(size=(2, N_GENES))
    w *= 1.5 / np.linalg.norm(w, axis=0)
    amp, base, phase = p.uniform(0.8, 1.5, N_GENES), p.uniform(1, 3, N_GENES), p.uniform(0, 2 * np.pi, N_GENES)
    sd_gene = p.uniform(0.4, 0.7, N_GENES)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    mean = base + amp * np.sin(z @ w + phase)
    sd = np.tile(sd_gene, (n, 1))
    sd[:, HETERO] = 0.2 + 0.6 / (1 + np.exp(-2 * z[:, [0]]))
    x = mean + sd * rng.normal(size=(n, N_GENES))
    return z.astype(np.float32), x.astype(np.float32), mean, sd


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 between two point clouds with uniform weights, Euclidean cost."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cost = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost))


def _small(seed=0, epochs=3, n=80, **fit_kwargs):
    z, x, _, _ = _cells(n, seed=5)
    dec = ExpressionDecoder(2, N_GENES, n_hidden=16, n_layers=1)
    dec.fit(z, x, epochs=epochs, batch_size=32, device=CPU, seed=seed, **fit_kwargs)
    return dec, z, x


# ======================================================================
# Module
# ======================================================================


def test_gaussian_nll_matches_scipy():
    x, mean, sd = np.meshgrid([-2.0, 0.0, 0.3, 7.0], [-1.0, 0.0, 2.5], [1e-3, 0.2, 1.0, 30.0], indexing="ij")
    got = gaussian_nll(*(torch.tensor(a, dtype=torch.float64) for a in (x, mean, 2 * np.log(sd))))
    np.testing.assert_allclose(got.numpy(), -scipy.stats.norm.logpdf(x, mean, sd), rtol=1e-12, atol=1e-12)


def test_variance_stays_in_its_range_relative_to_each_gene():
    torch.manual_seed(0)
    module = GaussianDecoder(2, 3, n_hidden=8, n_layers=1)
    module.set_gene_stats(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([0.1, 1.0, 3.0]))
    with torch.no_grad():
        module.logvar_head.bias.copy_(torch.tensor([-1e3, 0.0, 1e3]))
    _, logvar = module(torch.randn(4, 2))
    sd = torch.exp(0.5 * logvar).detach().numpy()
    # Clamped at 1 % of the first gene's sd and twice the third's; the loss stays finite.
    np.testing.assert_allclose(sd[:, 0], 0.1 * math.exp(LOGVAR_MIN / 2), rtol=1e-5)
    np.testing.assert_allclose(sd[:, 2], 3.0 * math.exp(LOGVAR_MAX / 2), rtol=1e-5)
    assert 0.1 * 0.01 < sd[:, 1].min() and sd[:, 1].max() < 2.0
    assert torch.isfinite(module.loss(torch.randn(4, 2), torch.randn(4, 3))["loss"])


# ======================================================================
# What a user cares about: the decoded cells are distributed like real ones
# ======================================================================


@pytest.fixture(scope="module")
def fitted():
    z, x, _, _ = _cells(1200, seed=0)
    held_out = _cells(1000, seed=1)
    dec = ExpressionDecoder(2, N_GENES, n_hidden=64)
    dec.fit(z, x, z_val=held_out[0], x_val=held_out[1], epochs=20, batch_size=128, lr=5e-3, device=CPU, seed=0)
    return dec, held_out


def test_decoder_learns_mean_and_state_dependent_noise(fitted):
    dec, (z, x, true_mean, true_sd) = fitted
    mean, sd = dec.mean_and_std(z)
    assert mean.shape == sd.shape == (len(z), N_GENES) and mean.dtype == sd.dtype == np.float32
    # The held-out likelihood approaches that of the true distribution.
    oracle = np.mean(0.5 * (np.log(2 * np.pi) + 2 * np.log(true_sd) + 1))
    assert dec.history[-1]["val_loss"] < oracle + 0.06 < dec.history[0]["val_loss"]
    # The mean tracks the true conditional mean on held-out cells, gene by gene.
    r2 = 1 - ((mean - true_mean) ** 2).sum(0) / ((true_mean - true_mean.mean(0)) ** 2).sum(0)
    assert r2.min() > 0.85 and np.median(r2) > 0.93
    # The sd is the noise sd (not the spread of the gene): within 25 % for 90 % of cells x genes, ...
    ratio = sd / true_sd
    assert np.quantile(np.abs(ratio - 1), 0.9) < 0.25
    assert np.all((ratio.mean(0) > 0.85) & (ratio.mean(0) < 1.2))
    # ... and it follows the state where the noise does.
    assert min(np.corrcoef(sd[:, g], true_sd[:, g])[0, 1] for g in range(N_GENES)[HETERO]) > 0.8


def test_sampled_cells_keep_the_spread_of_real_cells_and_means_do_not(fitted):
    dec, (z, x, _, _) = fitted
    sampled, means = dec.decode(z, seed=0), dec.decode(z, sample=False)
    assert sampled.shape == (len(z), N_GENES) and sampled.dtype == np.float32
    np.testing.assert_array_equal(means, dec.mean_and_std(z)[0])
    real_var = x.var(0)
    assert np.all(np.abs(sampled.var(0) / real_var - 1) < 0.2)
    assert abs(sampled.var(0).sum() / real_var.sum() - 1) < 0.05
    assert means.var(0).sum() / real_var.sum() < 0.75 and np.all(means.var(0) < 0.95 * real_var)
    # In the literature's space (whitened top-5 PCs of the real cells), sampled cells are
    # as close to the real ones as a second real sample is; the means are clearly farther.
    centre = x.mean(0)
    _, s, vt = np.linalg.svd(x - centre, full_matrices=False)
    pcs = vt[:5].T / (s[:5] / np.sqrt(len(x)))
    floor = w1((_cells(1000, seed=2)[1] - centre) @ pcs, (x - centre) @ pcs)
    w_sampled = w1((sampled - centre) @ pcs, (x - centre) @ pcs)
    w_means = w1((means - centre) @ pcs, (x - centre) @ pcs)
    assert w_sampled < 1.05 * floor
    assert w_means > 1.08 * w_sampled


def test_decodes_simulated_states(fitted):
    """The decoder takes any states in the space it was trained on, e.g. a simulator's."""
    dec, (z, _, _, _) = fitted
    sim = Simulator(2, n_hidden=8, n_layers=1)
    sim.fit(np.concatenate([z, z + 0.1]), np.repeat([0.0, 1.0], len(z)), epochs=1, batch_size=500, device=CPU)
    moved = sim.simulate(z[:50], t0=0, t1=1, n_steps=2)
    out = dec.decode(moved, seed=0)
    assert out.shape == (50, N_GENES) and np.isfinite(out).all()


# ======================================================================
# Data handling, reproducibility, files
# ======================================================================


def test_sparse_expression_trains_with_the_numbers_of_dense(monkeypatch):
    """CSR expression trains without the whole matrix ever densified, and to exactly the numbers
    the dense array gives: same seed, same minibatches, same losses and decoded cells."""
    z, x, _, _ = _cells(80, seed=5)
    x[x < 2.0] = 0.0  # mostly zeros, as log-normalised expression is
    kwargs = dict(z_val=z[:20], epochs=3, batch_size=32, device=CPU, seed=1)
    dense = ExpressionDecoder(2, N_GENES, n_hidden=16, n_layers=1)
    h_dense = dense.fit(z, x, x_val=x[:20], **kwargs)
    widest = []
    to_dense = sp.csr_matrix.toarray

    def counted(self, *args, **kw):
        widest.append(self.shape[0])
        return to_dense(self, *args, **kw)

    monkeypatch.setattr(sp.csr_matrix, "toarray", counted)
    sparse = ExpressionDecoder(2, N_GENES, n_hidden=16, n_layers=1)
    h_sparse = sparse.fit(z, sp.csr_matrix(x), x_val=sp.csr_matrix(x[:20]), **kwargs)
    assert h_sparse == h_dense
    assert set(h_dense[0]) == {"epoch", "loss", "mse", "val_loss", "val_mse"}
    assert max(widest) <= 32  # only minibatches of rows were densified
    np.testing.assert_array_equal(sparse.decode(z, seed=3), dense.decode(z, seed=3))


def test_save_load_round_trip_and_seeded_draws(tmp_path):
    dec, z, _ = _small()
    path = tmp_path / "dec.pt"
    dec.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["init_kwargs"] == {"n_input": 2, "n_genes": N_GENES, "n_hidden": 16, "n_layers": 1, "dropout": 0.0}
    assert set(raw["extra"]) == {"z_shift", "z_scale"}
    loaded = ExpressionDecoder.load(path)
    assert loaded.n_genes == N_GENES and loaded.history == dec.history
    np.testing.assert_array_equal(loaded.decode(z, seed=4), dec.decode(z, seed=4))
    for a, b in zip(loaded.mean_and_std(z), dec.mean_and_std(z)):
        np.testing.assert_array_equal(a, b)
    # Same seed, same cells, whatever the batch size (to float rounding: the matrix products of
    # other batch shapes may round differently); another seed (or none), other cells.
    np.testing.assert_allclose(dec.decode(z, seed=4, batch_size=7), dec.decode(z, seed=4), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(dec.decode(z, seed=5), dec.decode(z, seed=4))
    assert not np.array_equal(dec.decode(z, seed=None), dec.decode(z, seed=None))
    np.testing.assert_array_equal(dec.decode(z, sample=False, seed=1), dec.decode(z, sample=False, seed=2))
    with pytest.raises(ValueError, match="holds a ExpressionDecoder"):
        Simulator.load(path)


def test_same_fit_seed_same_numbers_and_resume(tmp_path):
    z = _small(seed=7, epochs=4)[1]
    a, b, c = (_small(seed=s, epochs=4)[0].decode(z, seed=0) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # An interrupted run resumed from its checkpoint ends where the uninterrupted one does.
    ckpt = tmp_path / "dec.ckpt"
    _small(seed=7, epochs=2, checkpoint_path=ckpt, checkpoint_every=1)
    resumed = _small(seed=7, epochs=4, checkpoint_path=ckpt, checkpoint_every=1)[0]
    assert [h["epoch"] for h in resumed.history] == list(range(4))
    np.testing.assert_array_equal(resumed.decode(z, seed=0), a)


def test_rejects_bad_input_with_one_line_naming_the_problem():
    dec = ExpressionDecoder(2, 3, n_hidden=8, n_layers=1)
    z, x = np.zeros((4, 2)), np.ones((4, 3))
    with pytest.raises(RuntimeError, match="fit"):
        dec.decode(z)
    cases = [
        (dict(z=np.zeros((4, 5)), x=x), "z has 5 columns but the model was built for 2"),
        (dict(z=z, x=np.ones((4, 4))), "x has 4 columns but the model was built for 3"),
        (dict(z=z, x=np.full((4, 3), np.nan)), "x contains NaN"),
        (dict(z=z, x=sp.csr_matrix(np.full((4, 3), np.inf))), "x contains NaN or infinite"),
        (dict(z=z, x=np.ones((3, 3))), "z and x must hold the same cells row by row; got 4 and 3 rows"),
        (dict(z=z, x=x, z_val=z), "give both z_val and x_val, or neither"),
        (dict(z=z, x=x, z_val=z, x_val=np.ones((2, 3))), "z_val and x_val must hold the same cells"),
        (dict(z=z, x=x, batch_size=0), "batch_size must be >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message) as err:  # a ValueError too
            dec.fit(**kwargs, epochs=1, device=CPU)
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    dec.fit(z, x, epochs=1, device=CPU)
    with pytest.raises(ValueError, match="z has 3 columns but the model was built for 2"):
        dec.decode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="z contains NaN"):
        dec.mean_and_std(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="n_layers must be >= 0"):
        ExpressionDecoder(2, 3, n_layers=-1)
    with pytest.raises(TypeError):
        ExpressionDecoder(2, 3, n_hiden=8)  # misspelt argument fails at construction
