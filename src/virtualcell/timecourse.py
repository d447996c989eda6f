"""Scoring a simulator on a time course: held-out, extrapolated and rolled-out time points, and fates.

Everything is judged in ``pca5`` (:mod:`virtualcell.reference`): a simulator working in
a learned space reaches it through its decoder (sampled, so decoded cells carry the
measurement noise real cells have); the baselines are computed on the real cells
directly in ``pca5``. On the built-in data the ``oracle`` is a fresh sample of the true
process at the same time, of the same size, measured and projected the same way: the
best any model can score. The state space's own distances stand beside (``w1_shared``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from virtualcell import evaluate as ev
from virtualcell import reference, synthetic
from virtualcell.errors import InputError
from virtualcell.plan import LAST, NO_HOLDOUT, check_holdouts, holdout_label  # noqa: F401 (names of the {holdout} wildcard)

DISTANCES = ("w1", "w2", "mmd", "edist")
STATE_DISTANCES = ("w1", "w2", "mmd")


class Scorer:
    """Distances of predictions to the real cells of one time point, in pca5 and in the state space.

    Parameters
    ----------
    z, x
        Every cell in pca5 and in the simulator's state space.
    t
        Every cell's time.
    space
        Name of the state space (``shared``, ``rna_latent``, ``pca5``).
    oracle
        ``oracle(time, n, seed)`` -> n fresh true cells in pca5, or None (real data).
    max_points
        Cells per distribution for the exact OT distances.
    """

    def __init__(self, z: np.ndarray, x: np.ndarray, t: np.ndarray, *, space: str,
                 oracle: Callable[[float, int, int], np.ndarray] | None, max_points: int) -> None:
        self.z, self.x, self.t = np.asarray(z, np.float64), np.asarray(x, np.float64), t
        self.space, self.oracle, self.max_points = space, oracle, max_points

    def at(self, time: float, *, state: bool = False) -> np.ndarray:
        return (self.x if state else self.z)[self.t == time]

    def score(self, time: float, predictions: Mapping[str, tuple[np.ndarray, np.ndarray | None]], *,
              seed: int) -> dict[str, dict[str, float]]:
        """``{w1_pca5: {method: .}, ..., w1_<space>: {...}}`` for predictions ``{method: (pca5, state)}``.

        Adds ``noise_floor`` (two halves of the real cells) and, on generated data, ``oracle``.
        """
        true_z, true_x = self.at(time), self.at(time, state=True)
        mp = self.max_points
        pca = {m: ev.distribution_distances(pz, true_z, max_points=mp, seed=seed, energy=True)
               for m, (pz, _) in predictions.items()}
        pca["noise_floor"] = ev.noise_floor(true_z, max_points=mp, seed=seed, energy=True)
        if self.oracle is not None:
            pca["oracle"] = ev.distribution_distances(self.oracle(time, len(true_z), seed), true_z, max_points=mp,
                                                      seed=seed, energy=True)
        out = {f"{d}_{reference.SPACE}": {m: v[d] for m, v in pca.items()} for d in DISTANCES}
        if self.space != reference.SPACE:
            own = {m: ev.distribution_distances(px, true_x, max_points=mp, seed=seed)
                   for m, (_, px) in predictions.items() if px is not None}
            own["noise_floor"] = ev.noise_floor(true_x, max_points=mp, seed=seed)
            out |= {f"{d}_{self.space}": {m: v[d] for m, v in own.items()} for d in STATE_DISTANCES}
        return out


def gap_closed(scores: Mapping[str, Mapping[str, float]], key: str = f"w1_{reference.SPACE}") -> float | None:
    """(ot_interp - model) / (ot_interp - oracle): 0 = no better than interpolation, 1 = as good as the truth."""
    w = scores.get(key, {})
    if not {"model", "ot_interp", "oracle"} <= set(w):
        return None
    gap = w["ot_interp"] - w["oracle"]
    return float((w["ot_interp"] - w["model"]) / gap) if gap > 0 else None


def mean_and_std(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dicts of numbers (one per seed) -> their mean and their standard deviation (ddof 0)."""
    first = runs[0]
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for k, v in first.items():
        if isinstance(v, Mapping):
            mean[k], std[k] = mean_and_std([r[k] for r in runs])
        elif isinstance(v, int | float) and not isinstance(v, bool):
            values = [float(r[k]) for r in runs if r.get(k) is not None]
            mean[k], std[k] = float(np.mean(values)), float(np.std(values))
    return mean, std


def summarise(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores of one time point over seeds: the means, ``std`` beside them, ``gap_closed`` per seed averaged."""
    mean, std = mean_and_std(per_seed)
    gaps = [g for g in (gap_closed(s) for s in per_seed) if g is not None]
    if gaps:
        mean["gap_closed"], std["gap_closed"] = float(np.mean(gaps)), float(np.std(gaps))
    return mean | {"std": std}


def mean_over(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The mean over time points of each ``distance.method`` (and of gap_closed)."""
    items = [{k: v for k, v in s.items() if k != "std"} for s in sections.values()]
    mean, _ = mean_and_std(items)
    return mean


# --------------------------------------------------------------------------- the oracle


def make_oracle(params: Mapping[str, Any], ref: Mapping[str, Any],
                all_genes: Sequence[str]) -> Callable[[float, int, int], np.ndarray]:
    """``oracle(time, n, seed)``: n fresh cells of the true process, measured as QC measured, in pca5."""
    all_genes = [str(g) for g in all_genes]

    def oracle(time: float, n: int, seed: int) -> np.ndarray:
        counts, genes = synthetic.sample_cells(params, time=time, n=n, seed=seed)
        index = {g: i for i, g in enumerate(genes)}
        kept = counts[:, [index[g] for g in all_genes]]  # the genes QC kept, whose total QC normalised
        return reference.project(reference.log_normalise(kept, all_genes=all_genes, ref=ref), ref)

    return oracle


# --------------------------------------------------------------------------- fates


def fate_classifier(x_last: np.ndarray, labels: np.ndarray | None, *, seed: int, n_neighbors: int = 15):
    """What fate a state at the last time point is: k nearest real cells there, by label (or cluster).

    Without labels the cells of the last time point are clustered (k-means, 3 clusters) and the
    clusters are the fates.
    """
    from sklearn.cluster import KMeans
    from sklearn.neighbors import KNeighborsClassifier

    if labels is None:
        km = KMeans(n_clusters=min(3, len(x_last)), n_init=10, random_state=seed).fit(x_last)
        labels = np.asarray([f"cluster_{k}" for k in km.labels_])
    clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(x_last))).fit(x_last, np.asarray(labels, str))
    return clf


def simulated_fates(sim, clf, x: np.ndarray, t: np.ndarray, *, t_end: float, n_rollouts: int, n_steps: int,
                    seed: int, neighbours: int = 1) -> np.ndarray:
    """Each cell's fate probabilities: ``n_rollouts`` simulations to ``t_end``, endpoints classified, averaged.

    With ``neighbours`` k > 1 the rollouts of a cell start from it and its k - 1 nearest cells of
    the same time (rollout j from the j-th nearest, round robin), rather than all from the cell:
    a measured state is the true state plus measurement noise, and a near-deterministic model
    would otherwise turn that noise into a certain fate (a cell's fate is decided by the noise of
    the process *after* it was measured). The neighbours stand in for the states the cell could
    have been in, as CellRank's fate probabilities average over the neighbour graph. Cells alone
    at their time (or k = 1) start every rollout from themselves.
    """
    from sklearn.neighbors import NearestNeighbors

    out = np.zeros((len(x), len(clf.classes_)))
    for k, time in enumerate(np.unique(t)):
        cells = np.flatnonzero(t == time)
        start = np.repeat(cells, n_rollouts)
        near = min(int(neighbours), len(cells))
        if near > 1:
            index = NearestNeighbors(n_neighbors=near).fit(x[cells]).kneighbors(x[cells], return_distance=False)
            start = cells[index[:, np.arange(n_rollouts) % near].ravel()]
        steps = max(5, int(round(n_steps * (t_end - time) / max(t_end - t.min(), 1e-12))))
        end = sim.simulate(x[start].astype(np.float32), t0=float(time), t1=float(t_end), n_steps=steps,
                           seed=seed * 1000 + k)
        out[cells] = clf.predict_proba(end).reshape(len(cells), n_rollouts, -1).mean(axis=1)
    return out


def fate_scores(predicted: np.ndarray, truth: np.ndarray, realised: np.ndarray, classes: Sequence[str], *,
                committed: float = 0.9, n_bins: int = 10) -> dict[str, float]:
    """Predicted vs true fate probabilities (cells x fates, same columns).

    - ``pearson_r``: over all (cell, fate) entries;
    - ``calibration_error``: expected calibration error of the predicted against the true
      probabilities (entries binned by predicted probability; mean |predicted - true| per bin,
      weighted by the bin's share);
    - ``auroc_committed``: one-vs-rest macro AUROC of the predicted probabilities against the
      realised fate, for cells whose true probability of one fate is at least ``committed``.
    """
    from sklearn.metrics import roc_auc_score

    p, q = predicted.ravel(), truth.ravel()
    r = float(np.corrcoef(p, q)[0, 1]) if p.std() > 0 and q.std() > 0 else float("nan")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = sum(abs(p[bins == b].mean() - q[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins))
    out = {"pearson_r": r, "calibration_error": float(ece)}
    sure = truth.max(axis=1) >= committed
    present = [k for k, c in enumerate(classes) if np.any(realised[sure] == c)]
    if sure.sum() >= 10 and len(present) >= 2:
        aucs = [roc_auc_score(realised[sure] == classes[k], predicted[sure, k]) for k in present]
        out["auroc_committed"] = float(np.mean(aucs))
    out["n_committed"] = int(sure.sum())
    return out


def true_fates(latent: np.ndarray, t: np.ndarray, classes: Sequence[str], *, t_end: float, n_rollouts: int,
               seed: int) -> np.ndarray:
    """The generator's fate probabilities in the classifier's columns (fates it does not know get 0)."""
    probs = synthetic.fate_probabilities(latent, t, t_end=t_end, n_rollouts=n_rollouts, seed=seed)
    out = np.zeros((len(latent), len(classes)))
    for k, c in enumerate(classes):
        if c in synthetic.BASINS:
            out[:, k] = probs[:, synthetic.BASINS.index(c)]
    return out


# ---------------------------------------------------------------------------
# time points and holdouts (the {holdout} wildcard)

def observed_times(obs: pd.DataFrame, *, origin: str) -> np.ndarray:
    if "time" not in obs:
        raise InputError(f"{origin}: no time labels (obs 'time'); set time_key for the dataset in the config")
    times = np.unique(obs["time"].to_numpy(dtype=float))
    if len(times) < 3:
        raise InputError(
            f"{origin}: {len(times)} time point(s) {times.tolist()}; the simulator needs at least 3 (an interior "
            "one to hold out): add time points, or leave time_key empty to skip the simulator"
        )
    return times


def parse_holdout(holdout: str, times: np.ndarray, *, origin: str) -> float | None:
    """None for the model trained on every time point; else the held-out time.

    An interior time point is interpolated; the last one is extrapolated (predicted from the
    earlier ones). The first cannot be held out: the simulator starts from it.
    """
    if holdout == NO_HOLDOUT:
        return None
    if holdout == LAST:
        return float(times[-1])
    matches = [t for t in times if holdout_label(t) == holdout]
    allowed = [holdout_label(t) for t in times[1:]]
    if not matches or matches[0] == times[0]:
        raise InputError(
            f"{origin}: held-out time point '{holdout}' is not a later time point of the data; choose from {allowed}"
        )
    return float(matches[0])
