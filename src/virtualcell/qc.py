"""Quality control: per-modality metrics, filters from config, normalisation, HVGs.

Everything scanpy can do is done with scanpy; the protein CLR is three lines
of numpy because scanpy has no CLR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mudata as md
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from virtualcell.errors import InputError
from virtualcell.io import COUNTS_LAYER, PROT, RNA

MT_PREFIXES = ("MT-", "mt-")
RIBO_PREFIXES = ("RPS", "RPL", "Rps", "Rpl")


def run_qc(
    mdata: md.MuData,
    *,
    min_genes: int = 200,
    min_counts: int = 500,
    max_pct_mt: float = 20.0,
    min_cells: int = 3,
    min_protein_counts: int = 0,
    n_top_genes: int = 2000,
    target_sum: float = 1e4,
    origin: str = "input",
) -> tuple[md.MuData, dict[str, Any]]:
    """Filter cells and genes, normalise each modality, select highly variable genes.

    Parameters
    ----------
    mdata
        Ingested data: raw counts in ``layers["counts"]`` of ``rna`` (and ``prot``).
    min_genes, min_counts, max_pct_mt
        Cell filters on RNA (genes detected, total counts, mitochondrial percentage).
    min_cells
        Keep genes detected in at least this many cells.
    min_protein_counts
        Cell filter on total protein counts.
    n_top_genes
        Number of highly variable genes (seurat_v3 on raw counts).
    target_sum
        Library size each cell is scaled to before ``log1p``.
    origin
        Name of the input file, for error messages.

    Returns
    -------
    The filtered MuData (a copy) and a summary. Written:
    ``rna.obs``: ``n_genes_by_counts``, ``total_counts``, ``pct_counts_mt``, ``pct_counts_ribo``;
    ``rna.var``: ``mt``, ``ribo``, ``highly_variable``; ``rna.X``: log1p-normalised;
    ``prot.X``: CLR; raw counts stay in ``layers["counts"]``.
    """
    rna = mdata.mod[RNA].copy()
    rna.var["mt"] = rna.var_names.str.startswith(MT_PREFIXES)
    rna.var["ribo"] = rna.var_names.str.startswith(RIBO_PREFIXES)
    sc.pp.calculate_qc_metrics(
        rna, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True, layer=COUNTS_LAYER
    )
    obs = rna.obs
    filters = {
        "min_genes": (obs["n_genes_by_counts"] >= min_genes, "n_genes_by_counts", min_genes),
        "min_counts": (obs["total_counts"] >= min_counts, "total_counts", min_counts),
        "max_pct_mt": (obs["pct_counts_mt"] <= max_pct_mt, "pct_counts_mt", max_pct_mt),
    }
    prot = mdata.mod[PROT].copy() if PROT in mdata.mod else None
    if prot is not None:
        totals = np.asarray(prot.layers[COUNTS_LAYER].sum(axis=1)).ravel()
        prot.obs["total_counts"] = totals
        in_prot = obs.index.isin(prot.obs_names)
        prot_totals = prot.obs["total_counts"].reindex(obs.index)
        filters["min_protein_counts"] = (
            pd.Series(in_prot & (prot_totals.to_numpy() >= min_protein_counts), index=obs.index),
            "protein total_counts",
            min_protein_counts,
        )
    batch = obs["batch"].astype(str) if "batch" in obs else pd.Series("all", index=obs.index)
    keep = pd.Series(True, index=obs.index)
    removed: dict[str, dict[str, int]] = {}
    for name, (passed, column, threshold) in filters.items():
        newly = keep & ~passed
        removed[name] = {str(b): int(n) for b, n in newly.groupby(batch, observed=True).sum().items()}
        if keep.any() and not (keep & passed).any():
            values = (obs[column] if column in obs else prot_totals)[keep]
            raise InputError(
                f"{origin}: QC filter qc.{name}={threshold} removes every remaining cell ({column} of "
                f"those {int(keep.sum())} cells ranges {float(np.nanmin(values)):.3g}.."
                f"{float(np.nanmax(values)):.3g}); relax it in config qc"
            )
        keep &= passed
    rna = rna[keep.to_numpy()].copy()
    n_before_genes = rna.n_vars
    sc.pp.filter_genes(rna, min_cells=min_cells)
    if rna.n_vars == 0:
        raise InputError(f"{origin}: QC filter qc.min_cells={min_cells} removes every gene; lower it")
    if n_top_genes >= rna.n_vars:
        # Every gene is kept, so there is nothing to rank; and seurat_v3's loess fit fails on
        # panels of ~100 genes (targeted or test data), so it is not run.
        rna.var["highly_variable"] = True
    else:
        sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=n_top_genes, layer=COUNTS_LAYER)
    rna.X = rna.layers[COUNTS_LAYER].copy()
    sc.pp.normalize_total(rna, target_sum=target_sum)
    sc.pp.log1p(rna)

    mods = {RNA: rna}
    if prot is not None:
        prot = prot[rna.obs_names].copy()
        prot.X = clr(prot.layers[COUNTS_LAYER])
        mods[PROT] = prot
    out = md.MuData(mods)
    out.uns.update({k: v for k, v in mdata.uns.items()})
    summary = {
        "cells_in": int(len(obs)),
        "cells_out": int(rna.n_obs),
        "removed_by_filter_per_batch": removed,
        "genes_in": int(n_before_genes),
        "genes_out": int(rna.n_vars),
        "highly_variable_genes": int(rna.var["highly_variable"].sum()),
        "proteins": int(prot.n_vars) if prot is not None else 0,
        "median_total_counts": float(rna.obs["total_counts"].median()),
        "median_pct_counts_mt": float(rna.obs["pct_counts_mt"].median()),
    }
    return out, summary


def clr(counts: Any) -> np.ndarray:
    """Centred log-ratio per cell: log1p(x) minus its mean over the cell's proteins."""
    x = np.log1p(counts.toarray() if sp.issparse(counts) else np.asarray(counts, dtype=float))
    return (x - x.mean(axis=1, keepdims=True)).astype(np.float32)


def qc_figure(before: md.MuData, after: md.MuData, thresholds: Mapping[str, float]):
    """Violins of the RNA QC metrics before and after filtering, thresholds drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rna_before = before.mod[RNA].copy()
    rna_before.var["mt"] = rna_before.var_names.str.startswith(MT_PREFIXES)
    metrics_before, _ = sc.pp.calculate_qc_metrics(
        rna_before, qc_vars=["mt"], percent_top=None, log1p=False, layer=COUNTS_LAYER
    )
    panels = [
        ("n_genes_by_counts", "genes detected", thresholds.get("min_genes")),
        ("total_counts", "total counts", thresholds.get("min_counts")),
        ("pct_counts_mt", "% mitochondrial", thresholds.get("max_pct_mt")),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (column, label, threshold) in zip(axes, panels, strict=True):
        data = [metrics_before[column].to_numpy(), after.mod[RNA].obs[column].to_numpy()]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks([1, 2], [f"before\n(n={len(data[0])})", f"after\n(n={len(data[1])})"])
        ax.set_title(label)
        if threshold is not None:
            ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1)
    fig.suptitle("RNA quality control")
    fig.tight_layout()
    return fig
