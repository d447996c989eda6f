"""Metrics and baselines: held-out time points (W1, W2, MMD, energy) and cross-modal retrieval.

Distances between point clouds use POT's exact optimal transport. Every
model number is reported beside simple baselines computed in the same run,
so a number is never read without its reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# POT (which imports torch and scikit-learn: ~4 s on a 2-core machine) and scikit-learn's CCA are
# imported where they are used: every stage imports this module through `timecourse`, and the
# ingest, qc and pair jobs use neither.


def _subsample(x: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or len(x) <= n:
        return x
    return x[rng.choice(len(x), size=n, replace=False)]


def wasserstein(x: np.ndarray, y: np.ndarray, *, p: int = 1, max_points: int | None = 2000,
                seed: int = 0) -> float:
    """Exact W_p between two empirical distributions with uniform weights (Euclidean ground cost)."""
    import ot
    rng = np.random.default_rng(seed)
    x, y = _subsample(np.asarray(x, float), max_points, rng), _subsample(np.asarray(y, float), max_points, rng)
    cost = ot.dist(x, y, metric="euclidean") ** p
    value = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=10_000_000)
    return float(value ** (1.0 / p))


def mmd_rbf(x: np.ndarray, y: np.ndarray, *, gammas: tuple[float, ...] | None = None,
            max_points: int | None = 2000, seed: int = 0) -> float:
    """Biased MMD^2 with a sum of RBF kernels; bandwidths default to the median heuristic x (0.5, 1, 2)."""
    import ot
    rng = np.random.default_rng(seed)
    x, y = _subsample(np.asarray(x, float), max_points, rng), _subsample(np.asarray(y, float), max_points, rng)
    dxx, dyy, dxy = (ot.dist(a, b, metric="sqeuclidean") for a, b in ((x, x), (y, y), (x, y)))
    if gammas is None:
        median = float(np.median(dxy)) or 1.0
        gammas = tuple(1.0 / (scale * median) for scale in (0.5, 1.0, 2.0))
    total = 0.0
    for g in gammas:
        total += np.exp(-g * dxx).mean() + np.exp(-g * dyy).mean() - 2 * np.exp(-g * dxy).mean()
    return float(total)


def energy_distance(x: np.ndarray, y: np.ndarray, *, max_points: int | None = 2000, seed: int = 0) -> float:
    """Szekely's energy distance with Euclidean distances: 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic).

    Zero only for equal distributions. (With *squared* distances, the variant some perturbation
    benchmarks use, it reduces to twice the squared distance of the means.)
    """
    import ot
    rng = np.random.default_rng(seed)
    x, y = _subsample(np.asarray(x, float), max_points, rng), _subsample(np.asarray(y, float), max_points, rng)
    dxy, dxx, dyy = (ot.dist(a, b, metric="euclidean").mean() for a, b in ((x, y), (x, x), (y, y)))
    return float(2 * dxy - dxx - dyy)


def distribution_distances(pred: np.ndarray, true: np.ndarray, *, max_points: int | None = 2000,
                           seed: int = 0, energy: bool = False) -> dict[str, float]:
    """W1, W2 and MMD (and the energy distance) between two point clouds, each at most ``max_points``."""
    out = {
        "w1": wasserstein(pred, true, p=1, max_points=max_points, seed=seed),
        "w2": wasserstein(pred, true, p=2, max_points=max_points, seed=seed),
        "mmd": mmd_rbf(pred, true, max_points=max_points, seed=seed),
    }
    if energy:
        out["edist"] = energy_distance(pred, true, max_points=max_points, seed=seed)
    return out


# ---------------------------------------------------------------------------
# baselines for a held-out time point between two observed ones


def ot_interpolate(x0: np.ndarray, x1: np.ndarray, alpha: float, *, n: int | None = None,
                   max_points: int | None = 2000, seed: int = 0) -> np.ndarray:
    """McCann displacement interpolation: sample pairs from the exact OT plan and move alpha of the way.

    The plan is solved between at most ``max_points`` cells of each side (an exact plan between two
    time points of 16,000 cells would hold 2 GB and take the network simplex minutes).
    """
    import ot
    rng = np.random.default_rng(seed)
    x0, x1 = _subsample(x0, max_points, rng), _subsample(x1, max_points, rng)
    plan = ot.emd(ot.unif(len(x0)), ot.unif(len(x1)), ot.dist(x0, x1), numItermax=10_000_000)
    return _interpolate_from_plan(x0, x1, plan, alpha, n or max(len(x0), len(x1)), rng)


def ot_extrapolate(x0: np.ndarray, x1: np.ndarray, beta: float, *, n: int | None = None,
                   max_points: int | None = 2000, seed: int = 0) -> np.ndarray:
    """Continue the OT-paired displacement from ``x0`` to ``x1`` by ``beta`` of it: ``x1 + beta (x1 - x0)``.

    The extrapolation baseline for a time point after the last observed one (beta = the new
    interval over the previous one).
    """
    return ot_interpolate(x0, x1, 1.0 + beta, n=n, max_points=max_points, seed=seed)


def random_coupling_interpolate(x0: np.ndarray, x1: np.ndarray, alpha: float, *, n: int | None = None,
                                max_points: int | None = 2000, seed: int = 0) -> np.ndarray:
    """Interpolation along random pairs: what the OT coupling buys is measured against this."""
    rng = np.random.default_rng(seed)
    x0, x1 = _subsample(x0, max_points, rng), _subsample(x1, max_points, rng)
    plan = np.full((len(x0), len(x1)), 1.0 / (len(x0) * len(x1)))
    return _interpolate_from_plan(x0, x1, plan, alpha, n or max(len(x0), len(x1)), rng)


def _interpolate_from_plan(x0, x1, plan, alpha, n, rng):
    flat = plan.ravel() / plan.sum()
    # Without replacement while the plan's support allows: a permutation plan is then reproduced exactly.
    idx = rng.choice(flat.size, size=n, p=flat, replace=n > np.count_nonzero(flat))
    i, j = np.unravel_index(idx, plan.shape)
    return (1 - alpha) * x0[i] + alpha * x1[j]


def noise_floor(x: np.ndarray, *, max_points: int | None = 2000, seed: int = 0,
                energy: bool = False) -> dict[str, float]:
    """Distances between two random halves of the same time point (half the size: above the oracle's)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    half = len(x) // 2
    return distribution_distances(x[order[:half]], x[order[half : 2 * half]], max_points=max_points, seed=seed,
                                  energy=energy)


# ---------------------------------------------------------------------------
# cross-modal retrieval


RETRIEVAL_BLOCK = 2048  # rows of the cross-modal distance matrix held at once


def retrieval_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Retrieval of each cell's partner across modalities; row i of ``a`` pairs with row i of ``b``.

    - ``foscttm``: fraction of samples closer than the true match (0 is perfect, 0.5 is random),
      averaged over both directions;
    - ``top1``/``top5``: how often the partner is the nearest / among the 5 nearest (a -> b);
    - ``match_prob``: mean softmax probability the partner gets among all candidates
      (cosine similarity, temperature 0.1).
    """
    import ot
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    n = len(a)
    an = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    true = np.sqrt(((a - b) ** 2).sum(1))
    rank = np.empty(n, dtype=np.int64)  # candidates b closer to a_i than its partner
    col_rank = np.zeros(n, dtype=np.int64)  # candidates a closer to b_j than its partner
    prob = np.empty(n)
    # Row blocks: the n x n distances of 20,000 test cells would take 3.2 GB at once.
    for start in range(0, n, RETRIEVAL_BLOCK):
        rows = slice(start, start + RETRIEVAL_BLOCK)
        dist = ot.dist(a[rows], b, metric="euclidean")
        own = np.arange(dist.shape[0])
        true_rows = dist[own, own + start]
        rank[rows] = (dist < true_rows[:, None]).sum(1)
        closer = dist < true[None, :]
        closer[own, own + start] = False  # a partner is never closer than itself
        col_rank += closer.sum(0)
        logits = an[rows] @ bn.T / 0.1
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        prob[rows] = logits[own, own + start] / logits.sum(1)
    foscttm = 0.5 * (rank.mean() + col_rank.mean()) / (n - 1)
    return {
        "foscttm": float(foscttm),
        "top1": float((rank < 1).mean()),
        "top5": float((rank < 5).mean()),
        "match_prob": float(prob.mean()),
    }


def cca_embedding(a_train: np.ndarray, b_train: np.ndarray, a_test: np.ndarray, b_test: np.ndarray, *,
                  n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear baseline for alignment: CCA fitted on training pairs, applied to test cells."""
    from sklearn.cross_decomposition import CCA
    n_components = max(1, min(n_components, a_train.shape[1], b_train.shape[1], len(a_train) - 1))
    cca = CCA(n_components=n_components, max_iter=1000)
    cca.fit(a_train, b_train)
    return cca.transform(a_test, b_test)


def pca_features(x: np.ndarray, *, fit: np.ndarray, n_components: int) -> np.ndarray:
    """All rows of ``x`` in the leading principal components of the rows selected by ``fit``."""
    from sklearn.decomposition import PCA

    n_components = max(1, min(n_components, int(fit.sum()) - 1, x.shape[1]))
    return PCA(n_components=n_components, random_state=0).fit(x[fit]).transform(x)


def random_embedding(a: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Chance level: the partner is an unrelated shuffle."""
    rng = np.random.default_rng(seed)
    return a, a[rng.permutation(len(a))]


def compare_retrieval(embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    """metrics.json layout: {metric: {method: value}}."""
    per_method = {method: retrieval_metrics(a, b) for method, (a, b) in embeddings.items()}
    metrics = next(iter(per_method.values())).keys()
    return {m: {method: values[m] for method, values in per_method.items()} for m in metrics}
