"""Scores of a predicted perturbation against the real cells, the metrics of the perturbation literature.

* Distribution, in pca5: ``edist_pca5`` (Szekely's energy distance with Euclidean distances, the
  V-statistic of :func:`virtualcell.evaluate.energy_distance`), ``w1_pca5``, ``mmd_pca5``.
* Expression change from control: ``pearson_delta_all`` (all highly variable genes),
  ``pearson_delta_top20`` (the 20 genes most significantly changed in the real cells, Wilcoxon),
  ``pearson_delta_centroid`` (changes from the centroid of the training perturbations rather than
  from control: Systema's correction for systematic variation, Vinas Torne et al. 2025),
  ``mse_top20``.
* ``de_overlap``: Wilcoxon of predicted vs control cells, Benjamini-Hochberg; the share of the
  real DE genes (FDR < 0.05, k of them) among the predicted cells' k most significant genes.
* ``discrimination``: 1 - (share of other conditions whose real change is nearer, in L1, to the
  predicted change than the true condition's is); 1 = the prediction picks out its condition, 0.5 =
  chance (cell-eval's normalised inverse rank).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

from virtualcell import evaluate, reference

FDR = 0.05
TOP_DE = 20
METRICS = ("edist_pca5", "w1_pca5", "mmd_pca5", "pearson_delta_all", "pearson_delta_top20",
           "pearson_delta_centroid", "mse_top20", "de_overlap", "discrimination")
LOWER_IS_BETTER = ("edist_pca5", "w1_pca5", "mmd_pca5", "mse_top20")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def wilcoxon(x: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Mann-Whitney U p-values per gene of ``x`` vs ``control`` cells, and their BH-adjusted values."""
    same = (x.std(0) == 0) & (control.std(0) == 0) & (x.mean(0) == control.mean(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.mannwhitneyu(x, control, axis=0, alternative="two-sided").pvalue
    p = np.where(same | ~np.isfinite(p), 1.0, p)
    return p, stats.false_discovery_control(p, method="bh")


class Truth:
    """What every prediction of one condition is scored against."""

    def __init__(self, real: np.ndarray, control: np.ndarray, *, centroid: np.ndarray, pca5: Mapping,
                 others: Mapping[str, np.ndarray]) -> None:
        self.real, self.control_mean, self.centroid, self.pca5 = real, control.mean(0), centroid, pca5
        self.control = control
        self.delta = real.mean(0) - self.control_mean
        p, q = wilcoxon(real, control)
        self.top = np.lexsort((-np.abs(self.delta), p))[:TOP_DE]
        self.de = set(np.flatnonzero(q < FDR).tolist())
        self.real_pca5 = reference.project(real, pca5)
        self.others = others  # real changes of every other condition

    def score(self, pred: np.ndarray, *, max_points: int, seed: int) -> dict[str, float | None]:
        dist = evaluate.distribution_distances(reference.project(pred, self.pca5), self.real_pca5,
                                               max_points=max_points, seed=seed, energy=True)
        delta = pred.mean(0) - self.control_mean
        out: dict[str, float | None] = {
            "edist_pca5": dist["edist"], "w1_pca5": dist["w1"], "mmd_pca5": dist["mmd"],
            "pearson_delta_all": _pearson(delta, self.delta),
            "pearson_delta_top20": _pearson(delta[self.top], self.delta[self.top]),
            "pearson_delta_centroid": _pearson(pred.mean(0) - self.centroid, self.real.mean(0) - self.centroid),
            "mse_top20": float(np.mean((pred.mean(0)[self.top] - self.real.mean(0)[self.top]) ** 2)),
        }
        k = len(self.de)
        if k:
            p, _ = wilcoxon(pred, self.control)
            # Many genes reach p = 0 in float; among ties the larger change ranks first.
            predicted = set(np.lexsort((-np.abs(delta), p))[:k].tolist())
            out["de_overlap"] = len(predicted & self.de) / k
        else:
            out["de_overlap"] = None
        if self.others:
            own = np.abs(delta - self.delta).sum()
            nearer = sum(np.abs(delta - d).sum() < own for d in self.others.values())
            out["discrimination"] = 1.0 - nearer / len(self.others)
        else:
            out["discrimination"] = None
        return out


def mean_over(conditions: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> dict[str, dict[str, float]]:
    """``perturbation.mean``: each metric's mean over the held-out conditions, per method (where defined)."""
    out: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        methods = {m for c in conditions.values() for m in c.get(metric, {})}
        for method in sorted(methods):
            values = [c[metric][method] for c in conditions.values()
                      if c.get(metric, {}).get(method) is not None]
            if values:
                out.setdefault(metric, {})[method] = float(np.mean(values))
    return out
