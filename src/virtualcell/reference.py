"""The literature's standard space for judging simulations: ``pca5``.

Trajectory-inference benchmarks (TrajectoryNet, MIOFlow, OT-CFM, SF2M) report
distances in the first 5 principal components, whitened, of the log-normalised
highly variable genes, fitted once per dataset on all cells. Numbers in that
space do not move when an embedding is retrained, and they sit beside published
tables. The projection is stored as plain arrays (gene names, mean, components,
scale) so any cells measured the same way, real, decoded or freshly sampled from
the generator, land in the same space.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

N_COMPONENTS = 5
KEY = "pca5"  # obsm key of the coordinates and uns key of the projection
SPACE = "pca5"  # the suffix of the metric keys (w1_pca5, ...)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def fit(log_expression: Any, genes: list[str] | np.ndarray, *, n_components: int = N_COMPONENTS,
        target_sum: float | None = None, values: str = "counts") -> dict[str, Any]:
    """Fit the whitened PCA of log-normalised expression (cells x genes) of all cells.

    Parameters
    ----------
    log_expression
        Log-normalised expression of the highly variable genes, dense or sparse.
    genes
        Names of its columns.
    n_components
        Principal components kept (5 for ``pca5``).
    target_sum, values
        How the expression was normalised (recorded so fresh cells are measured the same way).

    Returns
    -------
    dict
        ``genes``, ``mean`` (genes,), ``components`` (k, genes), ``scale`` (k,): a cell's
        coordinates are ``(x - mean) @ components.T / scale``, unit variance per component
        over the fitted cells.
    """
    from sklearn.decomposition import PCA

    x = _dense(log_expression)
    k = int(max(1, min(n_components, x.shape[0] - 1, x.shape[1])))
    pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(x)
    scale = np.sqrt(pca.explained_variance_).clip(1e-12)
    return {
        "genes": np.asarray(genes, dtype=str),
        "mean": pca.mean_.astype(np.float64),
        "components": pca.components_.astype(np.float64),
        "scale": scale.astype(np.float64),
        "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float64),
        "target_sum": float(target_sum) if target_sum is not None else np.nan,
        "values": values,
    }


def leading(ref: Mapping[str, Any], n_components: int = N_COMPONENTS) -> dict[str, Any]:
    """The projection onto the first ``n_components`` of a wider fit (with the full SVD they are the
    same components a fit of ``n_components`` finds), so one fit serves pca5 and a wider PCA."""
    k = int(min(n_components, len(ref["scale"])))
    out = dict(ref)
    for key in ("components", "scale", "explained_variance_ratio"):
        out[key] = np.asarray(ref[key])[:k]
    return out


def project(log_expression: Any, ref: Mapping[str, Any]) -> np.ndarray:
    """Coordinates in the reference space of cells x genes log-normalised expression (same genes)."""
    x = _dense(log_expression)
    if x.shape[1] != len(ref["mean"]):
        raise ValueError(f"expression has {x.shape[1]} genes; the reference space was fitted on {len(ref['mean'])}")
    return (x - ref["mean"]) @ np.asarray(ref["components"]).T / np.asarray(ref["scale"])


def log_normalise(counts: Any, *, all_genes: list[str] | np.ndarray, ref: Mapping[str, Any]) -> np.ndarray:
    """Raw counts (cells x ``all_genes``: the genes QC kept) measured as QC measures them, in the reference genes.

    Library-size normalisation to ``ref['target_sum']`` over all kept genes, then ``log1p``
    (scanpy's ``normalize_total`` + ``log1p``), then the reference's genes.
    """
    x = _dense(counts)
    total = x.sum(axis=1, keepdims=True)
    x = np.log1p(x / np.where(total > 0, total, 1.0) * float(ref["target_sum"]))
    index = {g: i for i, g in enumerate(np.asarray(all_genes, dtype=str))}
    missing = [g for g in ref["genes"] if g not in index]
    if missing:
        raise ValueError(f"{len(missing)} reference genes are not among the counts' genes, e.g. {missing[:3]}")
    return x[:, [index[g] for g in ref["genes"]]]


def to_uns(ref: Mapping[str, Any]) -> dict[str, Any]:
    """The projection as h5ad-storable values."""
    return {k: (np.asarray(v) if not isinstance(v, str) else v) for k, v in ref.items()}


def from_uns(uns: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: uns[k] for k in ("genes", "mean", "components", "scale")}
    out["genes"] = np.asarray(out["genes"], dtype=str)
    for k in ("mean", "components", "scale"):
        out[k] = np.asarray(out[k], dtype=np.float64)
    out["target_sum"] = float(uns.get("target_sum", np.nan))
    out["values"] = str(uns.get("values", "counts"))
    out["explained_variance_ratio"] = np.asarray(uns.get("explained_variance_ratio", []), dtype=np.float64)
    return out
