import numpy as np
import ot
import pytest

from virtualcell import evaluate as ev


def test_w1_of_a_shift_is_the_shift_length():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    shift = np.array([3.0, 4.0, 0.0])
    # Translating a cloud moves every point by the same vector: W1 = W2 = |shift| = 5.
    assert ev.wasserstein(x, x + shift, p=1) == pytest.approx(5.0, rel=1e-6)
    assert ev.wasserstein(x, x + shift, p=2) == pytest.approx(5.0, rel=1e-6)
    assert ev.wasserstein(x, x) == pytest.approx(0.0, abs=1e-9)


def test_mmd_is_zero_for_identical_and_grows_with_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 2))
    assert ev.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    near, far = ev.mmd_rbf(x, x + 0.5), ev.mmd_rbf(x, x + 3.0)
    assert 0 < near < far


def test_ot_interpolation_of_a_translation_is_exact():
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(100, 2))
    x1 = x0 + np.array([2.0, 0.0])
    mid = ev.ot_interpolate(x0, x1, 0.5, n=100, seed=0)
    assert ev.wasserstein(mid, x0 + np.array([1.0, 0.0])) < 1e-6
    # random pairing blurs the midpoint: clearly worse
    rand = ev.random_coupling_interpolate(x0, x1, 0.5, n=100, seed=0)
    assert ev.wasserstein(rand, x0 + np.array([1.0, 0.0])) > 0.1


def test_retrieval_perfect_random_and_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    perfect = ev.retrieval_metrics(a, a)
    assert perfect["foscttm"] == 0 and perfect["top1"] == 1 and perfect["top5"] == 1
    shuffled = ev.retrieval_metrics(*ev.random_embedding(a, seed=0))
    assert 0.35 < shuffled["foscttm"] < 0.65 and shuffled["top1"] < 0.1
    # FOSCTTM by its definition, with an explicit loop
    b = a + rng.normal(scale=0.8, size=a.shape)
    d = ot.dist(a, b, metric="euclidean")
    n = len(a)
    by_loop = np.mean([np.mean([d[i, j] < d[i, i] for j in range(n) if j != i]) for i in range(n)]
                      + [np.mean([d[j, i] < d[i, i] for j in range(n) if j != i]) for i in range(n)])
    assert ev.retrieval_metrics(a, b)["foscttm"] == pytest.approx(by_loop)


def test_cca_baseline_aligns_linearly_related_modalities():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3))
    a = z @ rng.normal(size=(3, 6)) + 0.05 * rng.normal(size=(300, 6))
    b = z @ rng.normal(size=(3, 5)) + 0.05 * rng.normal(size=(300, 5))
    ea, eb = ev.cca_embedding(a[:200], b[:200], a[200:], b[200:], n_components=3)
    assert ev.retrieval_metrics(ea, eb)["foscttm"] < 0.05


def test_max_points_subsamples_each_cloud():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    assert ev.distribution_distances(x, x, max_points=None)["w1"] == pytest.approx(0.0, abs=1e-9)
    # two independent subsamples of 50 from the same cloud are different point sets
    assert ev.distribution_distances(x, x, max_points=50)["w1"] > 0.05
