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


def test_energy_distance_is_zero_for_equal_clouds_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    assert ev.energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    near, far = ev.energy_distance(x, x + 0.5), ev.energy_distance(x, x + 3.0)
    assert 0 < near < far
    # Far apart, E|X-Y| is about the shift length: the distance is about 2 * 50 - 2 E|X-X'|.
    spread = np.mean(ot.dist(x, x, metric="euclidean"))
    assert ev.energy_distance(x, x + [50.0, 0, 0]) == pytest.approx(100 - 2 * spread, rel=0.01)


def test_ot_extrapolation_continues_a_translation():
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(80, 2))
    x1 = x0 + np.array([1.0, 0.0])
    x2 = ev.ot_extrapolate(x0, x1, 1.0, n=80, seed=0)
    assert ev.wasserstein(x2, x0 + np.array([2.0, 0.0])) < 1e-6


def test_reference_space_is_whitened_and_measures_fresh_counts_as_qc_does():
    from virtualcell import reference

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 3.0, size=(300, 40))).astype(float)
    genes = [f"g{i}" for i in range(40)]
    logx = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    ref = reference.fit(logx[:, :30], genes[:30], target_sum=1e4)
    z = reference.project(logx[:, :30], ref)
    assert z.shape == (300, 5)
    assert np.allclose(z.mean(0), 0, atol=1e-8) and np.allclose(z.std(0, ddof=1), 1.0, rtol=1e-6)
    # Raw counts of all kept genes -> normalised over all of them -> the reference genes: as QC did.
    again = reference.project(reference.log_normalise(counts, all_genes=genes, ref=ref), ref)
    assert np.allclose(again, z)
    stored = reference.from_uns(reference.to_uns(ref))
    assert np.allclose(reference.project(logx[:, :30], stored), z)
    with pytest.raises(ValueError, match="genes"):
        reference.project(logx, ref)


def test_gap_closed_and_fate_scores():
    from virtualcell import timecourse as tc

    assert tc.gap_closed({"w1_pca5": {"model": 0.6, "ot_interp": 0.8, "oracle": 0.4}}) == pytest.approx(0.5)
    assert tc.gap_closed({"w1_pca5": {"model": 0.9, "ot_interp": 0.8, "oracle": 0.4}}) < 0
    assert tc.gap_closed({"w1_pca5": {"model": 0.6, "ot_interp": 0.8}}) is None
    rng = np.random.default_rng(0)
    truth = rng.dirichlet([0.3, 0.3], size=400)
    realised = np.where(rng.random(400) < truth[:, 0], "a", "b")
    perfect = tc.fate_scores(truth, truth, realised, ["a", "b"])
    assert perfect["pearson_r"] == pytest.approx(1.0) and perfect["calibration_error"] == pytest.approx(0.0)
    assert perfect["auroc_committed"] > 0.9
    flat = tc.fate_scores(np.full_like(truth, 0.5) + rng.normal(0, 0.01, truth.shape), truth, realised, ["a", "b"])
    # Uninformative but calibrated (the average is right) vs confidently wrong.
    assert abs(flat["pearson_r"]) < 0.2 and flat["calibration_error"] < 0.05
    wrong = tc.fate_scores(1.0 - truth, truth, realised, ["a", "b"])
    assert wrong["pearson_r"] < -0.9 and wrong["calibration_error"] > 0.3 and wrong["auroc_committed"] < 0.1


def test_mean_and_std_over_seeds_of_nested_scores():
    from virtualcell import timecourse as tc

    runs = [{"w1_pca5": {"model": 1.0, "ot_interp": 2.0, "oracle": 0.0}},
            {"w1_pca5": {"model": 3.0, "ot_interp": 2.0, "oracle": 0.0}}]
    out = tc.summarise(runs)
    assert out["w1_pca5"]["model"] == 2.0 and out["std"]["w1_pca5"]["model"] == 1.0
    assert out["gap_closed"] == pytest.approx(0.0) and out["std"]["gap_closed"] == pytest.approx(0.5)


def test_fate_rollouts_start_from_the_cell_and_its_nearest_same_time_cells():
    """With neighbours k, a cell's rollouts start from it and its k - 1 nearest cells of its own time:
    a lone cell on the wrong side of a fate boundary inherits its neighbourhood's fates, and cells of
    another time are never used."""
    from sklearn.neighbors import KNeighborsClassifier

    from virtualcell import timecourse as tc

    class Identity:  # a simulator that leaves every state where it is: the fate is the start's
        def simulate(self, x, *, t0, t1, n_steps, seed):
            return np.asarray(x)

    clf = KNeighborsClassifier(1).fit([[-1.0], [1.0]], ["left", "right"])
    # time 0: one cell just right of the boundary among 9 cells on the left; time 1: all on the right
    x = np.array([[0.1], *[[-0.1 * k] for k in range(1, 10)], *[[0.2 * k] for k in range(1, 11)]])
    t = np.array([0.0] * 10 + [1.0] * 10)
    alone = tc.simulated_fates(Identity(), clf, x, t, t_end=2.0, n_rollouts=4, n_steps=5, seed=0)
    assert alone[0].tolist() == [0.0, 1.0]  # every rollout from itself: certain
    near = tc.simulated_fates(Identity(), clf, x, t, t_end=2.0, n_rollouts=4, n_steps=5, seed=0, neighbours=4)
    # itself and its 3 nearest time-0 cells (all left), one rollout each; not the nearby time-1 cells
    assert near[0].tolist() == [0.75, 0.25]
    assert np.allclose(near[t == 1], [0.0, 1.0]) and np.allclose(near[2:10], [1.0, 0.0])
    assert np.allclose(near.sum(axis=1), 1.0)
