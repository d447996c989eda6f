"""Tests of virtualcell.models: NB-VAE encoder, contrastive aligner, simulator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest
import scipy.sparse
import scipy.stats
import torch

from virtualcell.errors import InputError
from virtualcell.models.contrastive import (
    MAX_LOGIT_SCALE,
    Aligner,
    ContrastiveAligner,
    symmetric_info_nce,
    top1_retrieval,
)
from virtualcell.models.dynamics import Dynamics, Simulator, VelocityField, conditional_flow, sample_ot_pairs
from virtualcell.models.vae import NBVAE, CountEncoder, nb_log_prob, nb_log_prob_cells

CPU = "cpu"


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 between two point clouds with uniform weights, Euclidean cost."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cost = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost))


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    return 1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()


def linear_r2(features: np.ndarray, target: np.ndarray, n_train: int) -> float:
    """Held-out R^2 of a least-squares map from features to target."""
    design = np.c_[features, np.ones(len(features))]
    coef, *_ = np.linalg.lstsq(design[:n_train], target[:n_train], rcond=None)
    return r2(design[n_train:] @ coef, target[n_train:])


# ======================================================================
# NB-VAE
# ======================================================================


def test_nb_log_prob_matches_scipy():
    x, mu, theta = np.meshgrid(
        [0.0, 1.0, 3.0, 17.0, 250.0], [0.01, 0.5, 4.0, 90.0], [0.05, 1.0, 12.0, 1e4], indexing="ij"
    )
    got = nb_log_prob(*(torch.tensor(a, dtype=torch.float64) for a in (x, mu, theta)), eps=0.0)
    expected = scipy.stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_nb_log_prob_is_finite_for_zero_mean_and_large_counts():
    x = torch.tensor([0.0, 1e5])
    out = nb_log_prob(x, torch.tensor([0.0, 1e5]), torch.tensor([1e6, 0.1]))
    assert torch.isfinite(out).all()
    assert out[0] == pytest.approx(0.0, abs=1e-3)  # P(0 | mean 0) = 1


def test_nb_log_prob_per_cell_on_the_stored_entries_equals_the_dense_sum_with_its_gradients():
    """The training loss evaluates the terms that vanish at zero counts on the nonzero entries only:
    the same log-likelihood and gradients as the dense form, whether it finds the entries itself or
    is handed a CSR batch's (explicit zeros included)."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(30, 50)) * (rng.random((30, 50)) < 0.3)
    x[3] = 0  # a cell with no counts at all
    csr = scipy.sparse.csr_matrix(x.astype(np.float64))
    csr.data[:5] = 0.0  # stored zeros, which a CSR matrix may hold
    rows = np.repeat(np.arange(30), np.diff(csr.indptr))
    entries = (torch.as_tensor(rows), torch.as_tensor(csr.indices.astype(np.int64)), torch.as_tensor(csr.data))
    xt = torch.as_tensor(csr.toarray())
    mu = torch.tensor(rng.gamma(2.0, 1.0, size=(30, 50)), requires_grad=True)
    theta = torch.tensor(rng.gamma(2.0, 2.0, size=50), requires_grad=True)
    dense = nb_log_prob(xt, mu, theta).sum(-1)
    want = torch.autograd.grad(dense.sum(), [mu, theta])
    for nonzero in (None, entries):
        got = nb_log_prob_cells(xt, mu, theta, nonzero=nonzero)
        torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10)
        for g, w in zip(torch.autograd.grad(got.sum(), [mu, theta]), want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _counts(seed: int = 0, n: int = 320, blocks=(40, 10)):
    """Counts from a 2-D latent through per-block softmax, with varying depth."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    parts = []
    for n_features, depth in zip(blocks, (800, 200)):
        logits = z @ (1.5 * rng.normal(size=(2, n_features)))
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        library = rng.uniform(0.5, 1.5, n) * depth
        parts.append(rng.poisson(prob * library[:, None]))
    return np.concatenate(parts, axis=1).astype(np.float32), z


def test_nbvae_loss_terms_and_decoder_respects_block_libraries():
    torch.manual_seed(0)
    vae = NBVAE([5, 3], n_latent=2, n_hidden=8, kl_weight=0.5)
    x = torch.tensor(np.random.default_rng(0).poisson(3.0, size=(6, 8)), dtype=torch.float32)
    terms = vae.loss(x)
    assert terms["loss"].item() == pytest.approx((terms["nll"] + 0.5 * terms["kl"]).item(), rel=1e-5)
    assert terms["kl"].item() >= 0
    mu = vae.decode(vae.encode(x), vae.library_sizes(x))
    # The per-block softmax distributes exactly each block's observed total.
    torch.testing.assert_close(mu[:, :5].sum(1), x[:, :5].sum(1))
    torch.testing.assert_close(mu[:, 5:].sum(1), x[:, 5:].sum(1))


@pytest.fixture(scope="module")
def counts():
    return _counts()


@pytest.fixture(scope="module")
def fitted_encoder(counts):
    x, _ = counts
    enc = CountEncoder([40, 10], n_latent=4, n_hidden=32)
    enc.fit(x[:240], x_val=x[240:], epochs=25, batch_size=64, lr=3e-3, device=CPU, seed=0)
    return enc


def test_count_encoder_learns_the_latent_structure(fitted_encoder, counts):
    x, z = counts
    history = fitted_encoder.history
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert history[-1]["val_nll"] < history[0]["val_nll"]
    latent = fitted_encoder.encode(x, batch_size=50)
    assert latent.shape == (len(x), 4) and latent.dtype == np.float32
    # The true 2-D latent is linearly recoverable from the embedding of held-out cells.
    assert linear_r2(latent, z, n_train=240) > 0.8


def test_count_encoder_save_load_round_trip(fitted_encoder, counts, tmp_path):
    x, _ = counts
    path = tmp_path / "enc.pt"
    fitted_encoder.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["init_kwargs"] == {"n_inputs": [40, 10], "n_latent": 4, "n_hidden": 32}
    loaded = CountEncoder.load(path)
    np.testing.assert_array_equal(loaded.encode(x), fitted_encoder.encode(x))
    assert loaded.history == fitted_encoder.history
    with pytest.raises(ValueError, match="holds a CountEncoder"):
        Aligner.load(path)


def test_count_encoder_same_seed_same_numbers():
    x, _ = _counts(n=80)
    fits = []
    for seed in (1, 1, 2):
        enc = CountEncoder([40, 10], n_latent=3, n_hidden=16)
        enc.fit(x, epochs=3, batch_size=32, device=CPU, seed=seed)
        fits.append(enc.encode(x))
    np.testing.assert_array_equal(fits[0], fits[1])
    assert not np.array_equal(fits[0], fits[2])


def test_count_encoder_trains_from_sparse_counts_with_the_numbers_of_dense(monkeypatch):
    """Sparse counts (CSR) train without the whole matrix ever densified, and to exactly the numbers
    the dense array gives: same seed, same minibatches, same losses and embedding."""
    import scipy.sparse as sp

    x, _ = _counts(n=80)
    dense = CountEncoder([40, 10], n_latent=3, n_hidden=16)
    h_dense = dense.fit(x, x_val=x[:20], epochs=3, batch_size=32, device=CPU, seed=1)
    widest = []
    to_dense = sp.csr_matrix.toarray

    def counted(self, *args, **kwargs):
        widest.append(self.shape[0])
        return to_dense(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", counted)
    sparse = CountEncoder([40, 10], n_latent=3, n_hidden=16)
    h_sparse = sparse.fit(sp.csr_matrix(x), x_val=sp.csr_matrix(x[:20]), epochs=3, batch_size=32, device=CPU,
                          seed=1)
    z = sparse.encode(sp.csr_matrix(x), batch_size=32)
    assert h_sparse == h_dense
    np.testing.assert_array_equal(z, dense.encode(x))
    assert max(widest) <= 32  # only minibatches of rows were densified
    with pytest.raises(ValueError, match="negative"):
        sparse.fit(sp.csr_matrix(-np.ones((3, 50))), epochs=1, device=CPU)


def test_count_encoder_trains_on_counts_left_on_disk(tmp_path):
    """An .h5ad opened backed trains the encoder without its matrix ever read whole: cells sorted by
    their latent state on disk (as files sorted by time or sample are) still give a model as good as
    the in-memory one, and it encodes the on-disk cells as it encodes them in memory."""
    import anndata as ad
    import scipy.sparse as sp

    x, z = _counts()
    order = np.argsort(z[:, 0])  # a sorted file: contiguous rows are similar cells
    x, z = x[order], z[order]
    ad.AnnData(X=sp.csr_matrix(x)).write_h5ad(tmp_path / "counts.h5ad")
    backed = ad.read_h5ad(tmp_path / "counts.h5ad", backed="r").X
    enc = CountEncoder([40, 10], n_latent=4, n_hidden=32)
    history = enc.fit(backed, epochs=25, batch_size=16, lr=3e-3, device=CPU, seed=0)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    latent = enc.encode(backed, batch_size=50)
    np.testing.assert_allclose(latent, enc.encode(x), rtol=1e-5, atol=1e-6)
    held = np.random.default_rng(0).permutation(len(x))
    assert linear_r2(latent[held], z[held], n_train=240) > 0.8
    x[5, 3] = -1.0
    ad.AnnData(X=sp.csr_matrix(x)).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="negative"):
        enc.fit(ad.read_h5ad(tmp_path / "bad.h5ad", backed="r").X, epochs=1, device=CPU)


def test_count_encoder_rejects_bad_input():
    enc = CountEncoder([4], n_latent=2, n_hidden=8)
    # Bad data is a ValueError for Python callers and an InputError for the CLI.
    with pytest.raises(InputError):
        enc.fit(-np.ones((3, 4)), epochs=1, device=CPU)
    with pytest.raises(RuntimeError, match="fit"):
        enc.encode(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="negative"):
        enc.fit(-np.ones((3, 4)), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="5 columns but the model was built for 4"):
        enc.fit(np.ones((3, 5)), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="NaN"):
        enc.fit(np.full((3, 4), np.nan), epochs=1, device=CPU)
    with pytest.raises(TypeError):
        CountEncoder([4], n_latnet=2)  # misspelt argument fails at construction


# ======================================================================
# Contrastive alignment
# ======================================================================


def test_symmetric_info_nce_matches_hand_computation():
    rng = np.random.default_rng(0)
    za, zb, scale = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 1.3
    a = za / np.linalg.norm(za, axis=1, keepdims=True)
    b = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    n = len(a)
    logits = np.array([[math.exp(scale) * float(a[i] @ b[j]) for j in range(n)] for i in range(n)])
    rows = [-(logits[i, i] - math.log(sum(math.exp(logits[i, j]) for j in range(n)))) for i in range(n)]
    cols = [-(logits[j, j] - math.log(sum(math.exp(logits[i, j]) for i in range(n)))) for j in range(n)]
    expected = 0.5 * (sum(rows) / n + sum(cols) / n)
    got = symmetric_info_nce(torch.tensor(za), torch.tensor(zb), torch.tensor(scale))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_info_nce_limits():
    z = torch.eye(5)
    # Perfectly aligned, sharp softmax: loss -> 0. No signal at all: log(n).
    assert symmetric_info_nce(z, 3 * z, math.log(100.0)).item() < 1e-6
    assert symmetric_info_nce(z, torch.ones(5, 5), 0.0).item() == pytest.approx(math.log(5), rel=1e-6)


def test_top1_retrieval_counts_own_partner_first():
    za = torch.eye(4)
    zb = torch.eye(4)[[0, 1, 3, 2]]
    assert top1_retrieval(za, zb, batch_size=3) == 0.5


def test_contrastive_aligner_temperature_options():
    dims = {"rna": 3, "prot": 2}
    learned = ContrastiveAligner(dims, init_temperature=0.001)
    assert isinstance(learned.logit_scale, torch.nn.Parameter)
    # The clamp caps the logit scale at log(100), i.e. temperature >= 0.01.
    out = learned.loss(torch.randn(4, 3), torch.randn(4, 2))
    assert out["temperature"].item() == pytest.approx(math.exp(-MAX_LOGIT_SCALE))
    fixed = ContrastiveAligner(dims, init_temperature=0.5, learn_temperature=False)
    assert "logit_scale" not in dict(fixed.named_parameters())
    assert fixed.loss(torch.randn(4, 3), torch.randn(4, 2))["temperature"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly two"):
        ContrastiveAligner({"a": 1, "b": 2, "c": 3})


def _paired(seed: int = 0, n: int = 500):
    """Two modalities that are different noisy functions of one shared latent."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    xa = z @ rng.normal(size=(4, 10)) + 0.1 * rng.normal(size=(n, 10))
    xb = np.tanh(z @ rng.normal(size=(4, 14))) + 0.1 * rng.normal(size=(n, 14))
    return xa.astype(np.float32), xb.astype(np.float32)


@pytest.fixture(scope="module")
def fitted_aligner():
    xa, xb = _paired()
    al = Aligner({"rna": 10, "prot": 14}, n_shared=8, n_hidden=64)
    al.fit(xa[:400], xb[:400], xa_val=xa[400:], xb_val=xb[400:], epochs=25, batch_size=128, lr=3e-3, device=CPU, seed=0)
    return al, xa[400:], xb[400:]


def test_aligner_retrieves_held_out_partners_far_above_chance(fitted_aligner):
    al, va, vb = fitted_aligner
    history = al.history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    chance = 1 / len(va)
    assert history[-1]["val_top1"] > 30 * chance
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    ea, eb = al.embed("rna", va), al.embed("prot", vb)
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, rtol=1e-5)
    assert top1_retrieval(torch.tensor(ea), torch.tensor(eb)) == pytest.approx(history[-1]["val_top1"])
    assert 0.01 <= al.temperature <= 1.0


def test_aligner_save_load_and_determinism(fitted_aligner, tmp_path):
    al, va, _ = fitted_aligner
    al.save(tmp_path / "al.pt")
    loaded = Aligner.load(tmp_path / "al.pt")
    np.testing.assert_array_equal(loaded.embed("rna", va), al.embed("rna", va))
    assert loaded.names == ["rna", "prot"]

    xa, xb = _paired(n=64)
    runs = []
    for _ in range(2):
        other = Aligner({"rna": 10, "prot": 14}, n_shared=4, n_hidden=16)
        other.fit(xa, xb, epochs=2, batch_size=16, device=CPU, seed=5)
        runs.append(other.embed("prot", xb))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_aligner_with_depth_matches_cells_in_the_same_state_by_depth_and_keeps_states_depth_free(tmp_path):
    # Cells in few states (features alone cannot tell them apart), each with a depth that both modalities
    # measure: with depth the aligner matches partners; its embedding without the depth column (the state)
    # is the one at the training cells' mean depth and does not follow depth.
    rng = np.random.default_rng(0)
    n = 600
    state = rng.integers(0, 4, n)
    z = np.eye(4)[state]
    depth = rng.normal(8.0, 0.5, n)
    xa = (z @ rng.normal(size=(4, 6)) + 0.05 * rng.normal(size=(n, 6))).astype(np.float32)
    xb = (z @ rng.normal(size=(4, 5)) + 0.05 * rng.normal(size=(n, 5))).astype(np.float32)
    da = (depth + 0.05 * rng.normal(size=n)).astype(np.float32)[:, None]
    db = (0.8 * depth + 1.0 + 0.05 * rng.normal(size=n)).astype(np.float32)[:, None]
    ia, ib = np.hstack([xa, da]), np.hstack([xb, db])
    tr, te = slice(0, 500), slice(500, n)
    kw = dict(epochs=40, batch_size=128, lr=3e-3, device=CPU, seed=0)
    with_depth = Aligner({"rna": 6, "prot": 5}, n_shared=8, n_hidden=64, depth=True)
    with_depth.fit(ia[tr], ib[tr], **kw)
    plain = Aligner({"rna": 6, "prot": 5}, n_shared=8, n_hidden=64)
    plain.fit(xa[tr], xb[tr], **kw)

    def top1(al, a, b):
        return top1_retrieval(torch.tensor(al.embed("rna", a)), torch.tensor(al.embed("prot", b)))

    # 100 test cells in 4 states: features alone find the partner about 1 time in 25
    without, with_ = top1(plain, xa[te], xb[te]), top1(with_depth, ia[te], ib[te])
    assert without < 0.1
    assert with_ > max(0.15, 3 * without)
    mean_depth = np.full((n, 1), da[tr].mean(), np.float32)
    neutral = with_depth.embed("rna", xa)
    np.testing.assert_allclose(neutral, with_depth.embed("rna", np.hstack([xa, mean_depth])), atol=1e-6)
    own = with_depth.embed("rna", ia)
    assert max(abs(np.corrcoef(own[:, k], depth)[0, 1]) for k in range(8)) > 0.5
    assert max(abs(np.corrcoef(neutral[:, k], depth)[0, 1]) for k in range(8)) < 0.2
    with_depth.save(tmp_path / "al.pt")
    loaded = Aligner.load(tmp_path / "al.pt")
    assert loaded.depth and loaded.n_inputs("prot") == 6
    np.testing.assert_array_equal(loaded.embed("prot", xb), with_depth.embed("prot", xb))
    with pytest.raises(ValueError, match="columns"):
        with_depth.embed("prot", xb[:, :3])


def test_aligner_rejects_unpaired_input():
    al = Aligner({"rna": 2, "prot": 3})
    with pytest.raises(ValueError, match="paired row by row"):
        al.fit(np.zeros((4, 2)), np.zeros((5, 3)), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="both xa_val and xb_val"):
        al.fit(np.zeros((4, 2)), np.zeros((4, 3)), xa_val=np.zeros((2, 2)), epochs=1, device=CPU)


# Image heads: spot expression <-> tissue image patch.

PATCH = [3, 16, 16]
N_TRAIN = 600


def _expression_and_patches(seed: int = 0, n: int = 700):
    """Expression and image patches that are noisy functions of one 4-D latent.

    Latent dims 0 and 1 set the patch's colour; dims 2 and 3 the frequency and
    amplitude of concentric rings whose mean is removed, so they are texture
    that the mean colour does not show. Rings are unchanged by the flips and
    90-degree rotations of the augmentation, like tissue texture.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    expr = z @ rng.normal(size=(4, 10)) + 0.1 * rng.normal(size=(n, 10))
    colour = np.column_stack([0.5 + 0.2 * np.tanh(z[:, 0]), np.full(n, 0.5), 0.5 + 0.2 * np.tanh(z[:, 1])])
    frequency = 2.0 + np.tanh(z[:, 2])  # cycles per patch side
    amplitude = 0.1 + 0.08 * np.tanh(z[:, 3])
    _, height, width = PATCH
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    radius = np.hypot(xx - width / 2, yy - height / 2) / width
    rings = amplitude[:, None, None] * np.cos(2 * np.pi * frequency[:, None, None] * radius)
    rings -= rings.mean(axis=(1, 2), keepdims=True)
    patches = colour[:, :, None, None] + rings[:, None] + 0.05 * rng.normal(size=(n, *PATCH))
    return expr.astype(np.float32), np.clip(patches, 0, 1).reshape(n, -1).astype(np.float32), z


@pytest.fixture(scope="module")
def fitted_image_aligner():
    expr, patches, z = _expression_and_patches()
    al = Aligner({"expr": 10, "image": math.prod(PATCH)}, image_shapes={"image": PATCH}, n_shared=8, n_hidden=64)
    al.fit(
        expr[:N_TRAIN], patches[:N_TRAIN], xa_val=expr[N_TRAIN:], xb_val=patches[N_TRAIN:],
        epochs=30, batch_size=100, lr=3e-3, device=CPU, seed=0,
    )  # fmt: skip
    return al, expr, patches, z


def test_image_aligner_retrieves_partners_and_reads_texture(fitted_image_aligner):
    al, expr, patches, z = fitted_image_aligner
    chance = 1 / (len(expr) - N_TRAIN)
    assert al.history[-1]["val_top1"] > 30 * chance
    held_out = slice(N_TRAIN, None)
    ea, eb = al.embed("expr", expr[held_out]), al.embed("image", patches[held_out])
    top1 = top1_retrieval(torch.tensor(ea), torch.tensor(eb))
    assert top1 == pytest.approx(al.history[-1]["val_top1"])
    # The ring frequency and amplitude are invisible to the mean colour but the CNN reads them.
    mean_colour = patches.reshape(len(patches), 3, -1).mean(axis=2)
    image_embedding = al.embed("image", patches)
    for dim in (2, 3):
        assert linear_r2(mean_colour, z[:, dim], n_train=N_TRAIN) < 0.1
        assert linear_r2(image_embedding, z[:, dim], n_train=N_TRAIN) > 0.5


def test_image_aligner_save_load_round_trip(fitted_image_aligner, tmp_path):
    al, expr, patches, _ = fitted_image_aligner
    al.save(tmp_path / "image.pt")
    loaded = Aligner.load(tmp_path / "image.pt")
    assert loaded.init_kwargs["image_shapes"] == {"image": PATCH}
    # Embedding is in eval mode: not augmented, so the same patches embed the same every time.
    np.testing.assert_array_equal(loaded.embed("image", patches), al.embed("image", patches))
    np.testing.assert_array_equal(loaded.embed("expr", expr), al.embed("expr", expr))
    # The expression side keeps the plain MLP head of an aligner without images.
    plain = ContrastiveAligner({"expr": 10, "prot": 5}, n_hidden=64, n_shared=8)
    assert {k: v.shape for k, v in loaded.module.heads["expr"].state_dict().items()} == {
        k: v.shape for k, v in plain.heads["expr"].state_dict().items()
    }


def test_image_shapes_must_match_dims():
    with pytest.raises(ValueError, match=r"\[3, 8, 8\] holds 192 values but dims\['image'\] is 190"):
        Aligner({"expr": 4, "image": 190}, image_shapes={"image": [3, 8, 8]})
    with pytest.raises(ValueError, match="not a modality"):
        Aligner({"expr": 4, "image": 192}, image_shapes={"img": [3, 8, 8]})
    with pytest.raises(ValueError, match=r"\[channels, height, width\]"):
        Aligner({"expr": 4, "image": 64}, image_shapes={"image": [8, 8]})


def test_image_augmentation_is_a_seeded_flip_and_rotation_in_training_only():
    module = ContrastiveAligner({"expr": 2, "image": 2 * 4 * 4}, image_shapes={"image": [2, 4, 4]})
    x = torch.arange(6 * 32, dtype=torch.float32).reshape(6, 32)
    torch.manual_seed(0)
    first = module._augment("image", x)
    torch.manual_seed(0)
    torch.testing.assert_close(module._augment("image", x), first)
    images = x.reshape(6, 2, 4, 4)
    views = [torch.rot90(im, k, dims=(-2, -1)) for im in (images, images.flip(-1)) for k in range(4)]
    chosen = [
        next(k for k, view in enumerate(views) if torch.equal(out, view[i]))
        for i, out in enumerate(first.reshape(6, 2, 4, 4))
    ]
    assert len(set(chosen)) > 1  # drawn per patch, not once per minibatch
    assert torch.equal(module._augment("expr", x[:, :2]), x[:, :2])
    module.eval()
    assert torch.equal(module._augment("image", x), x)
    # A non-square patch is only flipped and turned by 180 degrees, which keep its shape.
    wide = ContrastiveAligner({"expr": 2, "image": 6}, image_shapes={"image": [1, 2, 3]})
    images = torch.arange(20 * 6, dtype=torch.float32).reshape(20, 1, 2, 3)
    views = [images, images.flip(-1), images.flip(-2), images.flip(-2, -1)]
    for i, out in enumerate(wide._augment("image", images.reshape(20, 6)).reshape(20, 1, 2, 3)):
        assert any(torch.equal(out, view[i]) for view in views)


# ======================================================================
# Dynamics
# ======================================================================


def test_conditional_flow_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, x1, noise = (torch.randn(6, 3, generator=g) for _ in range(3))
    s = torch.rand(6, generator=g)
    x_s, u = conditional_flow(x0, x1, s, 0.2, noise)
    for i in range(6):
        torch.testing.assert_close(x_s[i], (1 - s[i]) * x0[i] + s[i] * x1[i] + 0.2 * noise[i])
    torch.testing.assert_close(u, x1 - x0)
    # Without noise the path starts at x0 and ends at x1.
    ends = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(conditional_flow(x0, x1, ends, 0.0, noise)[0], torch.where(ends[:, None] > 0, x1, x0))


def test_sample_ot_pairs_follow_the_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g) + 1.0
    # Brute force: with equal sizes the exact OT plan is the cheapest permutation.
    cost = torch.cdist(x0, x1).pow(2)
    best = min(itertools.permutations(range(5)), key=lambda p: sum(cost[i, p[i]] for i in range(5)))
    a, b = sample_ot_pairs(x0, x1, generator=g, n_pairs=200)
    for row0, row1 in zip(a, b):
        i = int((x0 == row0).all(1).nonzero())
        assert torch.equal(row1, x1[best[i]])
    # Pairs are drawn from the plan's uniform marginal: every source row appears.
    assert len(torch.unique(a, dim=0)) == 5


def test_sample_ot_pairs_unequal_sizes_and_seeded():
    # 1-D: OT is the monotone matching, so each source point takes its two
    # nearest targets.
    x0 = torch.tensor([[0.0], [10.0]])
    x1 = torch.tensor([[1.0], [2.0], [11.0], [12.0]])
    a, b = sample_ot_pairs(x0, x1, generator=torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (4, 1)
    assert ((b - a).abs() <= 2.0).all()
    again = sample_ot_pairs(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])


def test_velocity_field_potential_is_minus_the_gradient():
    torch.manual_seed(0)
    field = VelocityField(3, n_hidden=16, n_layers=2, potential=True)
    x, t = torch.randn(7, 3, requires_grad=True), torch.rand(7)
    (grad,) = torch.autograd.grad(field.potential(x, t).sum(), x)
    torch.testing.assert_close(field(x, t), -grad)
    with torch.no_grad():  # simulation path: no graph, same values
        torch.testing.assert_close(field(x.detach(), t), -grad)
    with pytest.raises(RuntimeError, match="potential=False"):
        VelocityField(3).potential(x, t)


@pytest.mark.parametrize("potential", [False, True])
def test_a_combination_drifts_by_the_control_plus_each_components_change(potential):
    """A condition of several components (one embedding each) moves cells by the control's field plus
    each component's change from it: two perturbations whose landscape terms add are predicted from
    their singles alone. A masked (zero) component changes nothing, so a single is its own embedding."""
    torch.manual_seed(0)
    field = VelocityField(3, n_hidden=16, n_layers=2, potential=potential, n_condition=4)
    x, t = torch.randn(7, 3), torch.rand(7)
    a, b, zero = torch.randn(4), torch.randn(4), torch.zeros(4)
    both = torch.stack([a, b])[None]  # one condition for all cells: (1, components, n_condition)
    expected = field(x, t, a) + field(x, t, b) - field(x, t, zero)
    torch.testing.assert_close(field(x, t, both), expected)
    torch.testing.assert_close(field(x, t, torch.stack([a, zero])[None]), field(x, t, a))
    torch.testing.assert_close(field(x, t, torch.stack([zero, zero])[None]), field(x, t, zero))
    # per-cell conditions: a batch of a combination, a single and the control, each row as on its own
    rows = torch.stack([torch.stack([a, b]), torch.stack([b, zero]), torch.stack([zero, zero])])
    mixed = field(x[:3], t[:3], rows)
    for k in range(3):
        torch.testing.assert_close(mixed[k], field(x[k:k + 1], t[k:k + 1], rows[k][None])[0])


def test_ode_loss_is_the_flow_matching_mse():
    torch.manual_seed(0)
    dynamics = Dynamics(2, n_hidden=8, n_layers=1)
    x0, x1, noise = torch.randn(5, 2), torch.randn(5, 2), 0.1 * torch.randn(5, 2)
    t0, t1, s = torch.zeros(5), torch.full((5,), 2.0), torch.rand(5)
    x_s = (1 - s[:, None]) * x0 + s[:, None] * x1 + noise
    expected = ((dynamics.drift(x_s, 2.0 * s) - (x1 - x0) / 2.0) ** 2).mean()
    torch.testing.assert_close(dynamics.loss(x0, x1, t0, t1, s, noise)["loss"], expected)


# Toy truth: a 2-D Gaussian translating at constant velocity over 5 times.
VELOCITY = np.array([1.5, 0.5])
TIMES = np.arange(5.0)
HELD_OUT = 2.0


def _snapshots(seed: int = 0, n: int = 150):
    rng = np.random.default_rng(seed)
    x = np.concatenate([0.5 * rng.normal(size=(n, 2)) + VELOCITY * t for t in TIMES]).astype(np.float32)
    t = np.repeat(TIMES, n)
    truth = (0.5 * rng.normal(size=(n, 2)) + VELOCITY * HELD_OUT).astype(np.float32)
    keep = t != HELD_OUT
    return x[keep], t[keep], truth


def _fit_simulator(seed=0, potential=False, epochs=60, **kw):
    x, t, _ = _snapshots()
    sim = Simulator(2, n_hidden=64, n_layers=2, potential=potential)
    sim.fit(x, t, epochs=epochs, batch_size=128, lr=3e-3, device=CPU, seed=seed, **kw)
    return sim


@pytest.fixture(scope="module", params=[False, True], ids=["velocity", "potential"])
def fitted_simulator(request):
    return _fit_simulator(potential=request.param)


def test_simulator_predicts_held_out_time_point(fitted_simulator):
    x, t, truth = _snapshots()
    assert fitted_simulator.observed_times.tolist() == [0.0, 1.0, 3.0, 4.0]
    history = fitted_simulator.history
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    prev = x[t == HELD_OUT - 1]
    pred = fitted_simulator.simulate(prev, t0=HELD_OUT - 1, t1=HELD_OUT)
    copy_prev = w1(prev, truth)  # = |velocity| ~ 1.58
    noise_floor = w1(x[t == HELD_OUT + 1] - VELOCITY, truth)  # two samples of the truth
    model = w1(pred, truth)
    assert model < 0.25 * copy_prev
    assert model < 2 * noise_floor


def test_simulator_integrates_backwards_and_identity(fitted_simulator):
    x, t, _ = _snapshots()
    x1 = x[t == 1][:20]
    np.testing.assert_array_equal(fitted_simulator.simulate(x1, t0=1, t1=1), x1)
    there = fitted_simulator.simulate(x1, t0=1, t1=3)
    back = fitted_simulator.simulate(there, t0=3, t1=1)
    np.testing.assert_allclose(back, x1, atol=1e-2)
    # Backwards in time moves against the learned drift.
    assert (fitted_simulator.simulate(x1, t0=1, t1=0).mean(0) - x1.mean(0)) @ VELOCITY < 0


def test_simulator_velocity_is_minus_grad_of_potential_in_real_units(fitted_simulator):
    if not fitted_simulator.init_kwargs.get("potential"):
        with pytest.raises(RuntimeError, match="potential=False"):
            fitted_simulator.potential(np.zeros((1, 2)), 0.0)
        return
    x = np.array([[1.0, 0.5], [3.0, 1.0], [4.5, 2.0]], dtype=np.float32)
    h = 1e-2
    grad = np.stack(
        [
            (fitted_simulator.potential(x + h * e, 2.0) - fitted_simulator.potential(x - h * e, 2.0)) / (2 * h)
            for e in np.eye(2, dtype=np.float32)
        ],
        axis=1,
    )
    v = fitted_simulator.velocity(x, 2.0)
    np.testing.assert_allclose(v, -grad, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(v, np.broadcast_to(VELOCITY, v.shape), atol=0.3)


def test_simulator_save_load_round_trip(fitted_simulator, tmp_path):
    x, t, _ = _snapshots()
    path = tmp_path / "sim.pt"
    fitted_simulator.save(path)
    loaded = Simulator.load(path, device=CPU)
    prev = x[t == 1]
    np.testing.assert_array_equal(loaded.simulate(prev, t0=1, t1=2), fitted_simulator.simulate(prev, t0=1, t1=2))
    # The data scaling travels in the file as plain tensors.
    assert set(torch.load(path, weights_only=True)["extra"]) == {"x_shift", "x_scale", "t_shift", "t_scale", "times", "score_fitted"}


def test_simulator_same_seed_same_predictions_and_resume(tmp_path):
    x, t, _ = _snapshots()
    prev = x[t == 1]
    a = _fit_simulator(seed=7, epochs=6).simulate(prev, t0=1, t1=2, n_steps=10)
    b = _fit_simulator(seed=7, epochs=6).simulate(prev, t0=1, t1=2, n_steps=10)
    c = _fit_simulator(seed=8, epochs=6).simulate(prev, t0=1, t1=2, n_steps=10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # An interrupted run resumed from its checkpoint ends where the uninterrupted one does.
    ckpt = tmp_path / "sim.ckpt"
    _fit_simulator(seed=7, epochs=3, checkpoint_path=ckpt, checkpoint_every=1)
    resumed = _fit_simulator(seed=7, epochs=6, checkpoint_path=ckpt, checkpoint_every=1)
    assert [h["epoch"] for h in resumed.history] == list(range(6))
    np.testing.assert_array_equal(resumed.simulate(prev, t0=1, t1=2, n_steps=10), a)


def test_simulator_rejects_bad_time_labels():
    sim = Simulator(2)
    with pytest.raises(ValueError, match=">= 2 distinct time points"):
        sim.fit(np.zeros((4, 2)), np.zeros(4), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="one time per cell"):
        sim.fit(np.zeros((4, 2)), np.arange(3), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="NaN"):
        sim.fit(np.zeros((2, 2)), np.array([0.0, np.nan]), epochs=1, device=CPU)
    with pytest.raises(RuntimeError, match="fit"):
        sim.simulate(np.zeros((1, 2)), t0=0, t1=1)
