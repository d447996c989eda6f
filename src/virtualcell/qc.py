"""Quality control of every modality: metrics, doublets, filters from config, normalisation, features.

- ``rna`` (cells x genes) and ``spatial`` (spots x genes): scanpy's QC metrics
  (counts, genes, % mitochondrial and ribosomal counts), fixed thresholds,
  ``log1p`` of library-size-normalised counts and highly variable genes (seurat_v3
  on counts). Cells also get per-batch MAD outliers and doublet scores (scanpy's
  scrublet, per batch); spots do not (a spot holds several cells by design, and
  its depth and composition follow the tissue under it), but are restricted to
  the tissue and get their own thresholds.
- ``prot`` (antibody counts): isotype controls are split off the panel (their
  counts kept per cell) before the centred log-ratio; scanpy has no CLR.
- ``atac`` (peaks): counts and peaks per cell, TF-IDF and LSI; written here in
  a few lines of numpy/scikit-learn rather than adding muon as a dependency.

Every filter is named by its config key under ``qc`` (``min_genes``,
``mad.total_counts``, ``doublets.remove``, ``spatial.min_counts``, ``atac.min_features``
...), and that name is what the summary, the logs and the errors use.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import median_abs_deviation

from virtualcell.errors import InputError
from virtualcell.io import (ATAC, COUNTS_LAYER, LSI_KEY, LSI_LOADINGS, PROT, RNA, SPATIAL, expression_modality,
                             raw_layer, values_of)
from virtualcell.readers import LIBRARY_KEY, SCALEFACTOR_OF_IMAGE

MT_PREFIXES = ("MT-", "mt-")
RIBO_PREFIXES = ("RPS", "RPL", "Rps", "Rpl")
BATCH_KEY = "batch"
TOTAL_COUNTS = "total_counts"
IN_TISSUE_KEY = "in_tissue"
DOUBLET_SCORE = "doublet_score"
PREDICTED_DOUBLET = "predicted_doublet"
# uns slot of rna: the doublet scores and thresholds of every batch, removed cells included
DOUBLETS_KEY = "doublets"
ISOTYPE_COUNTS = "isotype_counts"
N_FEATURES = "n_features_by_counts"
# TF-IDF's term frequencies are scaled to this many counts per cell before log1p (muon's and
# Signac's default)
TFIDF_SCALE = 1e4
# scrublet's default; fewer components are used when a batch or a gene panel is too small
SCRUBLET_PCS = 30
# Up to this many cells in a batch, scrublet's neighbours are found exactly (sklearn), above it
# approximately (pynndescent). Measured here (2 cores): exact takes 2 s for 5,000 cells and 109 s for
# 50,000 (it grows with the square), pynndescent 19 s for 5,000 after a ~65 s numba compile that every
# new process pays; the approximate path is worth it only past ~100,000 cells per batch.
SCRUBLET_EXACT_MAX_CELLS = 100_000


@dataclasses.dataclass(frozen=True)
class DoubletSettings:
    """Config ``qc.doublets``: scrublet on the cells that passed the other filters, per batch."""

    detect: bool = True
    remove: bool = True
    threshold: float | None = None
    expected_rate: float = 0.05


@dataclasses.dataclass(frozen=True)
class ProteinSettings:
    """Config ``qc.prot``: isotype controls (regex on protein names) and a filter on their counts."""

    isotype_pattern: str | None = r"(?i)isotype|igg|control"
    max_isotype_counts: float | None = None


@dataclasses.dataclass(frozen=True)
class SpatialSettings:
    """Config ``qc.spatial``: spots are filtered with their own thresholds (they hold several cells).

    Permissive by default: a spot over the tissue with few counts or many mitochondrial
    reads usually reflects the tissue there (fibrous or RNA-poor regions, neurons or muscle
    rich in mitochondria; no dissociation stress), and removing it leaves a hole in the map.
    """

    in_tissue_only: bool = True
    min_counts: int = 200
    min_genes: int = 100
    max_pct_mt: float = 100.0


@dataclasses.dataclass(frozen=True)
class AtacSettings:
    """Config ``qc.atac``: fragments-in-peaks filters and the LSI."""

    min_counts: int = 1000
    max_counts: int | None = None
    min_features: int = 500
    n_components: int = 30


# Config ``qc.mad`` names obs metrics. As in the sc-best-practices book, counts and genes (which
# span orders of magnitude) are compared on log1p; for % mitochondrial only the high tail means damage.
MAD_ON_LOG1P = ("total_counts", "n_genes_by_counts")
MAD_UPPER_ONLY = ("pct_counts_mt",)
# Widths in median absolute deviations (config qc.mad's defaults): the book's permissive 5 for counts
# and genes; for % mitochondrial the book's 3 also takes ~6 % of the healthy cells of the synthetic data
# (its % mt is log-normal), so 5 here too, beside the fixed max_pct_mt.
MAD_DEFAULTS = MappingProxyType({"total_counts": 5.0, "n_genes_by_counts": 5.0, "pct_counts_mt": 5.0})


def run_qc(
    mdata: md.MuData,
    *,
    min_genes: int = 50,
    min_counts: int = 300,
    max_pct_mt: float = 20.0,
    min_cells: int = 3,
    min_protein_counts: int = 0,
    n_top_genes: int = 2000,
    target_sum: float = 1e4,
    mad: Mapping[str, float | None] | None = MAD_DEFAULTS,
    doublets: Mapping[str, Any] | None = None,
    prot: Mapping[str, Any] | None = None,
    spatial: Mapping[str, Any] | None = None,
    atac: Mapping[str, Any] | None = None,
    chunked: Any = "auto",
    origin: str = "input",
) -> tuple[md.MuData, dict[str, Any]]:
    """Filter, normalise and select features of every modality present.

    Parameters
    ----------
    mdata
        Ingested data: raw counts in ``layers["counts"]`` of each modality (``rna``,
        ``prot``, ``atac``, ``spatial``; at least ``rna`` or ``spatial``).
    min_genes, min_counts, max_pct_mt
        Cell filters on RNA (genes detected, total counts, mitochondrial percentage).
    min_cells
        Keep genes (and peaks) detected in at least this many cells (spots).
    min_protein_counts
        Cell filter on total protein counts (isotype controls not included).
    n_top_genes
        Highly variable genes of ``rna`` and ``spatial`` (seurat_v3 on raw counts).
    target_sum
        Library size each cell (spot) is scaled to before ``log1p``.
    mad
        Per-batch outlier widths in median absolute deviations, for RNA cells:
        ``total_counts`` and ``n_genes_by_counts`` (both on log1p, both tails) and
        ``pct_counts_mt`` (upper tail); a metric set to None is not used, and
        ``mad=None`` turns the outlier filters off.
    doublets
        ``detect``, ``remove`` (False: score and flag only), ``threshold`` (None:
        scrublet's automatic one, per batch) and ``expected_rate``; see :class:`DoubletSettings`.
    prot
        ``isotype_pattern`` (regex on protein names; None: no controls) and
        ``max_isotype_counts`` (None: no filter); see :class:`ProteinSettings`.
    spatial
        ``in_tissue_only``, ``min_counts``, ``min_genes``, ``max_pct_mt`` of spots;
        see :class:`SpatialSettings`.
    atac
        ``min_counts``, ``max_counts``, ``min_features`` per cell and the LSI's
        ``n_components``; see :class:`AtacSettings`.
    chunked
        Config ``qc.chunked``, so that the whole config section can be passed: the qc stage reads it
        to choose between this function (in memory) and :func:`virtualcell.qc_chunked.run_qc_chunked`
        (a block of rows at a time, same results); not used here.
    origin
        Name of the input file, for error messages.

    Returns
    -------
    The filtered MuData (a copy) and a JSON-serialisable summary. Raw counts stay in
    ``layers["counts"]`` of every modality. Written:

    ``rna`` and ``spatial``
        ``obs``: ``n_genes_by_counts``, ``total_counts``, ``pct_counts_mt``,
        ``pct_counts_ribo`` (and the ``total_counts_*`` they come from); ``var``:
        ``mt``, ``ribo``, ``n_cells``, ``highly_variable``; ``X``: log1p-normalised.
        ``spatial`` keeps ``obsm["spatial"]`` and ``uns["spatial"]`` (images, scale factors).
    ``rna``, with doublet detection
        ``obs``: ``doublet_score``, ``predicted_doublet``; ``uns["doublets"]``:
        per batch the threshold, the scores of every scored cell and of scrublet's
        simulated doublets.
    ``prot``
        Isotype controls removed from the features; ``obs``: ``total_counts``,
        ``isotype_counts``; ``obsm["isotype_counts"]``: counts per control; ``X``: CLR.
        Restricted to the RNA cells kept when there is ``rna``.
    ``atac``
        ``obs``: ``total_counts``, ``n_features_by_counts``; ``X``: TF-IDF;
        ``obsm["X_lsi"]``, ``varm["LSI"]``; ``uns["lsi"]``: ``variance_ratio`` and
        ``depth_correlation`` of each component (the first usually tracks depth).

    The summary's top-level keys (``cells_in``, ``cells_out``, ``genes_in``, ``genes_out``,
    ``highly_variable_genes``, ``proteins``, ``removed_by_filter_per_batch`` ...) describe
    the expression modality (``rna``, else ``spatial``), its filters including the protein
    ones that remove its cells; ``modalities`` holds the same per modality.
    """
    del chunked  # the stage's choice (see above)
    expression = expression_modality(mdata)
    doublet_cfg = DoubletSettings(**(doublets or {}))
    prot_cfg = ProteinSettings(**(prot or {}))
    spatial_cfg = SpatialSettings(**(spatial or {}))
    atac_cfg = AtacSettings(**(atac or {}))
    features = dict(min_cells=min_cells, n_top_genes=n_top_genes, target_sum=target_sum, origin=origin)

    mods: dict[str, ad.AnnData] = {}
    report: dict[str, dict[str, Any]] = {}
    proteins = None
    if PROT in mdata.mod:
        proteins = split_isotypes(mdata.mod[PROT], pattern=prot_cfg.isotype_pattern, origin=origin)

    if RNA in mdata.mod:
        rna = mdata.mod[RNA].copy()
        counts = values_of(rna) == "counts"
        # Non-count values (TPM, log expression) have no library size, no count-scale % mitochondrial
        # and no doublet model: those steps are skipped, and the summary says so.
        skipped = {} if counts else {step: f"values: {values_of(rna)} (needs raw counts)" for step in COUNT_ONLY_STEPS}
        add_expression_metrics(rna)
        chain = filter_cells(rna.obs, counts=counts, skipped=skipped, min_genes=min_genes, min_counts=min_counts,
                             max_pct_mt=max_pct_mt, mad=mad, proteins=proteins, prot_cfg=prot_cfg,
                             min_protein_counts=min_protein_counts, origin=origin)
        doublet_report: dict[str, Any] = {"detected": False}
        if doublet_cfg.detect and counts:
            doublet_report = score_doublets(rna, cells=chain.keep, batch=chain.batch, settings=doublet_cfg,
                                            origin=origin)
            if doublet_cfg.remove:
                chain.apply("doublets.remove", ~rna.obs[PREDICTED_DOUBLET].to_numpy(), rna.obs[DOUBLET_SCORE],
                            True, metric=DOUBLET_SCORE)
        rna = rna[chain.keep].copy()
        report[RNA] = _finish_expression(rna, chain, name=RNA, **features) | {"doublets": doublet_report}
        if skipped:
            report[RNA]["skipped"] = skipped
        mods[RNA] = rna
        if proteins is not None:
            without_rna = int((~proteins.obs_names.isin(mdata.mod[RNA].obs_names)).sum())
            proteins = proteins[rna.obs_names[rna.obs_names.isin(proteins.obs_names)]].copy()

    if proteins is not None:
        # Cells measured in protein alone have no RNA, which every later stage starts from: dropped, counted.
        extra: dict[str, Any] = {"cells_follow": RNA, "cells_without_rna_removed": without_rna,
                                 "cells_with_rna_only": int(mods[RNA].n_obs - proteins.n_obs)}
        if RNA not in mdata.mod:
            chain = FilterChain(proteins.obs, unit="cell", origin=origin)
            chain.at_least("min_protein_counts", proteins.obs[TOTAL_COUNTS], min_protein_counts)
            if prot_cfg.max_isotype_counts is not None:
                chain.at_most("prot.max_isotype_counts", proteins.obs[ISOTYPE_COUNTS], prot_cfg.max_isotype_counts)
            proteins = proteins[chain.keep].copy()
            extra = {"removed_by_filter_per_batch": chain.removed}
        proteins.X = clr(proteins.layers[COUNTS_LAYER])
        mods[PROT] = proteins
        report[PROT] = {
            "cells_in": int(mdata.mod[PROT].n_obs),
            "cells_out": int(proteins.n_obs),
            "features_in": int(mdata.mod[PROT].n_vars),
            "features_out": int(proteins.n_vars),
            "isotype_controls": [str(c) for c in proteins.obsm[ISOTYPE_COUNTS].columns],
            "median_total_counts": _median(proteins.obs[TOTAL_COUNTS]),
            "median_isotype_counts": _median(proteins.obs[ISOTYPE_COUNTS]),
            **extra,
        }

    if SPATIAL in mdata.mod:
        spots = mdata.mod[SPATIAL].copy()
        add_expression_metrics(spots)
        chain = FilterChain(spots.obs, unit="spot", origin=origin)
        in_tissue = spots.obs[IN_TISSUE_KEY].astype(int) if IN_TISSUE_KEY in spots.obs else None
        if spatial_cfg.in_tissue_only and in_tissue is not None:
            chain.apply("spatial.in_tissue_only", in_tissue == 1, in_tissue, True, metric=IN_TISSUE_KEY)
        chain.at_least("spatial.min_counts", spots.obs["total_counts"], spatial_cfg.min_counts)
        chain.at_least("spatial.min_genes", spots.obs["n_genes_by_counts"], spatial_cfg.min_genes)
        chain.at_most("spatial.max_pct_mt", spots.obs["pct_counts_mt"], spatial_cfg.max_pct_mt)
        spots = spots[chain.keep].copy()
        report[SPATIAL] = _finish_expression(spots, chain, name=SPATIAL, **features) | {
            "spots_out_of_tissue": None if in_tissue is None else int((in_tissue != 1).sum()),
        }
        mods[SPATIAL] = spots

    if ATAC in mdata.mod:
        mods[ATAC], report[ATAC] = _atac_qc(mdata.mod[ATAC], atac_cfg, min_cells=min_cells, origin=origin)

    for name, adata in mdata.mod.items():
        # A modality QC knows nothing about is carried unchanged rather than dropped.
        mods.setdefault(name, adata.copy())
    with warnings.catch_warnings():
        # rna and spatial share their gene names; mudata warns that the global var repeats them.
        warnings.filterwarnings("ignore", message="var_names are not unique", category=UserWarning)
        out = md.MuData(mods)
    out.uns.update(dict(mdata.uns))

    summary = summarise(report, expression)
    return out, summary


# ---------------------------------------------------------------------------
# filters


class FilterChain:
    """Filters applied in turn to one modality's observations, each counting what it removes per batch.

    A filter's name is its config key under ``qc``; ``removed`` maps each name to the
    observations it removed (that no earlier filter had) per batch.
    """

    def __init__(self, obs: pd.DataFrame, *, unit: str, origin: str) -> None:
        self.index = obs.index
        self.batch = batches(obs)
        self.keep = np.ones(len(obs), dtype=bool)
        self.removed: dict[str, dict[str, int]] = {}
        self.unit = unit
        self.origin = origin

    def at_least(self, name: str, values: pd.Series, threshold: float, *, metric: str | None = None) -> None:
        """Keep observations whose value is ``>= threshold`` (a missing value fails)."""
        self.apply(name, values.to_numpy(dtype=float) >= threshold, values, threshold, metric=metric)

    def at_most(self, name: str, values: pd.Series, threshold: float, *, metric: str | None = None) -> None:
        """Keep observations whose value is ``<= threshold`` (a missing value fails)."""
        self.apply(name, values.to_numpy(dtype=float) <= threshold, values, threshold, metric=metric)

    def apply(self, name: str, passed: Any, values: pd.Series, threshold: Any, *, metric: str | None = None) -> None:
        """Remove the observations that did not pass; stop, naming the filter, if none would be left."""
        passed = np.asarray(passed, dtype=bool)
        newly = pd.Series(self.keep & ~passed, index=self.index)
        self.removed[name] = {str(b): int(n) for b, n in newly.groupby(self.batch, observed=True).sum().items()}
        if self.keep.any() and not (self.keep & passed).any():
            seen = np.asarray(values, dtype=float)[self.keep]
            seen_range = (f"ranges {float(np.nanmin(seen)):.3g}..{float(np.nanmax(seen)):.3g}"
                          if np.isfinite(seen).any() else "are missing")
            shown = json.dumps(threshold) if isinstance(threshold, bool) else threshold
            raise InputError(
                f"{self.origin}: QC filter qc.{name}={shown} removes every remaining {self.unit} "
                f"({metric or values.name} of those {int(self.keep.sum())} {self.unit}s {seen_range}); "
                "relax it in config qc"
            )
        self.keep &= passed


def filter_cells(obs: pd.DataFrame, *, counts: bool, skipped: Mapping[str, str], min_genes: int, min_counts: int,
                 max_pct_mt: float, mad: Mapping[str, float | None] | None, proteins: ad.AnnData | None,
                 prot_cfg: ProteinSettings, min_protein_counts: int, origin: str) -> FilterChain:
    """RNA cells' fixed, MAD and protein filters (not doublets), on their QC metrics in ``obs``."""
    chain = FilterChain(obs, unit="cell", origin=origin)
    chain.at_least("min_genes", obs["n_genes_by_counts"], min_genes)
    if counts:
        chain.at_least("min_counts", obs["total_counts"], min_counts)
        chain.at_most("max_pct_mt", obs["pct_counts_mt"], max_pct_mt)
    unknown = sorted(set(mad or {}) - set(MAD_DEFAULTS))
    if unknown:
        raise InputError(f"qc.mad.{unknown[0]}: not a MAD metric; use {', '.join(MAD_DEFAULTS)}")
    # In a fixed order, whatever the config's: which filter a cell is counted under must not
    # depend on how the keys were written.
    for metric in [m for m in MAD_DEFAULTS if m in (mad or {})]:
        n_mads = mad[metric]
        if n_mads is not None and f"mad.{metric}" not in skipped:
            outlier = mad_outliers(obs[metric], batch=chain.batch, n_mads=n_mads,
                                   log1p=metric in MAD_ON_LOG1P, upper_only=metric in MAD_UPPER_ONLY)
            chain.apply(f"mad.{metric}", ~outlier, obs[metric], n_mads, metric=metric)
    if proteins is not None:
        # The protein filters judge the cells that have protein; a cell measured in RNA alone is
        # kept (pair marks it, align fills in its protein embedding from its RNA).
        has_protein = obs.index.isin(proteins.obs_names)
        total = proteins.obs[TOTAL_COUNTS].reindex(obs.index)
        chain.apply("min_protein_counts", ~has_protein | (total.to_numpy(dtype=float) >= min_protein_counts),
                    total, min_protein_counts, metric=f"protein {TOTAL_COUNTS}")
        if prot_cfg.max_isotype_counts is not None:
            isotype = proteins.obs[ISOTYPE_COUNTS].reindex(obs.index)
            chain.apply("prot.max_isotype_counts",
                        ~has_protein | (isotype.to_numpy(dtype=float) <= prot_cfg.max_isotype_counts),
                        isotype, prot_cfg.max_isotype_counts, metric=f"protein {ISOTYPE_COUNTS}")
    return chain


def batches(obs: pd.DataFrame) -> pd.Series:
    """Each observation's batch (``obs["batch"]``), or one batch ``all``."""
    if BATCH_KEY in obs:
        return obs[BATCH_KEY].astype(str)
    return pd.Series("all", index=obs.index)


def mad_outliers(values: pd.Series, *, batch: pd.Series, n_mads: float, log1p: bool = False,
                 upper_only: bool = False) -> np.ndarray:
    """True where a value lies more than ``n_mads`` median absolute deviations from its batch's median.

    scanpy has no MAD helper, so this is the sc-best-practices book's ``is_outlier``
    (scipy's ``median_abs_deviation``, unscaled), computed per batch because depth and
    quality differ between batches: a library size normal in a deep batch can be an
    outlier in a shallow one. ``log1p`` first for metrics spanning orders of magnitude;
    ``upper_only`` for metrics where only high values mean trouble (% mitochondrial).
    """
    x = values.to_numpy(dtype=float)
    if log1p:
        x = np.log1p(x)
    outlier = np.zeros(len(x), dtype=bool)
    for b in pd.unique(batch):
        rows = (batch == b).to_numpy()
        centre = np.nanmedian(x[rows])
        spread = median_abs_deviation(x[rows], nan_policy="omit")
        if not spread > 0:
            # Most values equal (e.g. no mitochondrial reads at all): any difference would be
            # "infinitely" far, so MAD says nothing here.
            continue
        high = x[rows] > centre + n_mads * spread
        outlier[rows] = high if upper_only else high | (x[rows] < centre - n_mads * spread)
    return outlier


# ---------------------------------------------------------------------------
# expression: cells (rna) and spots (spatial)

# The RNA steps that need raw counts, skipped (and reported) for normalised or log values.
COUNT_ONLY_STEPS = ("min_counts", "max_pct_mt", "mad.total_counts", "mad.pct_counts_mt", "doublets")


def add_expression_metrics(adata: ad.AnnData) -> None:
    """scanpy's QC metrics on the counts: ``obs`` counts, genes, % mitochondrial and ribosomal.

    For non-count values (``uns["values"]``) they are computed on the values as ingested: genes
    detected keep their meaning, the sums ("total_counts") are sums of those values.
    """
    adata.var["mt"] = adata.var_names.str.startswith(MT_PREFIXES)
    adata.var["ribo"] = adata.var_names.str.startswith(RIBO_PREFIXES)
    sc.pp.calculate_qc_metrics(
        adata, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True, layer=raw_layer(adata)
    )


def _finish_expression(adata: ad.AnnData, chain: FilterChain, *, name: str, min_cells: int, n_top_genes: int,
                       target_sum: float, origin: str) -> dict[str, Any]:
    """Gene filter, highly variable genes and log-normalisation of the kept cells (spots), in place.

    Counts: seurat_v3 HVGs on the counts, then ``normalize_total`` and ``log1p``. Normalised values
    (TPM, FPKM): ``log1p``, then scanpy's ``seurat`` flavour of HVGs (which expects log data). Log
    values: taken as they are, ``seurat`` HVGs.
    """
    genes_in = adata.n_vars
    values = values_of(adata)
    adata.X = adata.layers[raw_layer(adata)].copy()
    sc.pp.filter_genes(adata, min_cells=min_cells)
    if adata.n_vars == 0:
        raise InputError(f"{origin}: QC filter qc.min_cells={min_cells} removes every gene of {name}; lower it")
    if values == "normalized":
        sc.pp.log1p(adata)
    if n_top_genes >= adata.n_vars:
        # Every gene is kept, so there is nothing to rank; and seurat_v3's loess fit fails on
        # panels of ~100 genes (targeted or test data), so it is not run.
        adata.var["highly_variable"] = True
    elif values == "counts":
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes, layer=COUNTS_LAYER)
    else:
        sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
    if values == "counts":
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
        # Recorded so that cells measured elsewhere (the generator's oracle, decoded cells) are normalised alike.
        adata.uns["normalize_total"] = {"target_sum": float(target_sum)}
    return expression_report(adata, chain, genes_in=genes_in)


def expression_report(adata: ad.AnnData, chain: FilterChain, *, genes_in: int) -> dict[str, Any]:
    """The summary of an expression modality after QC: cells and genes in and out, filters, medians."""
    return {
        "values": values_of(adata),
        "cells_in": len(chain.keep),
        "cells_out": int(adata.n_obs),
        "removed_by_filter_per_batch": chain.removed,
        "features_in": int(genes_in),
        "features_out": int(adata.n_vars),
        "highly_variable_genes": int(adata.var["highly_variable"].sum()),
        "median_total_counts": _median(adata.obs["total_counts"]),
        "median_genes": _median(adata.obs["n_genes_by_counts"]),
        "median_pct_counts_mt": _median(adata.obs["pct_counts_mt"]),
        "median_pct_counts_ribo": _median(adata.obs["pct_counts_ribo"]),
    }


def summarise(report: Mapping[str, dict[str, Any]], expression: str) -> dict[str, Any]:
    """run_qc's summary: the expression modality's (``rna``, else ``spatial``) report at the top level,
    every modality's under ``modalities``."""
    main = report[expression]
    return {
        "expression_modality": expression,
        "values": main["values"],
        "cells_in": main["cells_in"],
        "cells_out": main["cells_out"],
        "removed_by_filter_per_batch": main["removed_by_filter_per_batch"],
        "genes_in": main["features_in"],
        "genes_out": main["features_out"],
        "highly_variable_genes": main["highly_variable_genes"],
        "proteins": report[PROT]["features_out"] if PROT in report else 0,
        "median_total_counts": main["median_total_counts"],
        "median_pct_counts_mt": main["median_pct_counts_mt"],
        "modalities": dict(report),
    }


def score_doublets(adata: ad.AnnData, *, cells: np.ndarray, batch: pd.Series, settings: DoubletSettings,
                   origin: str = "input", n_pcs: int | None = None) -> dict[str, Any]:
    """Scrublet doublet scores of the ``cells`` (a mask), per batch, with scanpy's ``sc.pp.scrublet``.

    Doublets are called per batch because a doublet can only form within one
    loading. Only cells that passed the other filters are scored: low-quality cells
    would make implausible simulated doublets.

    Writes ``obs["doublet_score"]`` (NaN where not scored), ``obs["predicted_doublet"]``
    and ``uns["doublets"]`` (``removed``, and per batch ``threshold``, ``scores_obs``, ``scores_sim``)
    and returns the summary: cells scored, predicted, rate, thresholds. ``n_pcs``: scrublet's
    principal components (None: as many as every batch allows, :func:`scrublet_components`).
    """
    scratch = scrublet_input(adata, cells=cells, batch=batch)
    if n_pcs is None:
        n_pcs = scrublet_components(scratch, origin=origin)
    largest = int(scratch.obs[BATCH_KEY].value_counts().max()) if scratch.n_obs else 0
    try:
        sc.pp.scrublet(
            scratch, batch_key=BATCH_KEY, n_prin_comps=n_pcs, expected_doublet_rate=settings.expected_rate,
            threshold=settings.threshold, random_state=0, verbose=False,
            use_approx_neighbors=largest > SCRUBLET_EXACT_MAX_CELLS,
        )
    except Exception as exc:  # scrublet's own failures (a library clash, a degenerate batch) become one line
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(
            f"{origin}: doublet detection (scanpy scrublet, {scratch.n_obs} cells, largest batch {largest}) "
            f"failed: {type(exc).__name__}: {detail}; set qc.doublets.detect: false to skip it"
        ) from exc
    adata.obs[DOUBLET_SCORE] = np.nan
    adata.obs.loc[scratch.obs_names, DOUBLET_SCORE] = scratch.obs[DOUBLET_SCORE].to_numpy(dtype=float)
    adata.obs[PREDICTED_DOUBLET] = False
    adata.obs.loc[scratch.obs_names, PREDICTED_DOUBLET] = scratch.obs[PREDICTED_DOUBLET].to_numpy(dtype=bool)

    per_batch = {}
    thresholds: dict[str, float | None] = {}
    for b, result in scratch.uns["scrublet"]["batches"].items():
        threshold = result.get("threshold")
        if threshold is None:
            warnings.warn(
                f"{origin}: scrublet found no automatic doublet threshold in batch {b} (its simulated doublet "
                "scores are not bimodal); no cell of it is called a doublet; set qc.doublets.threshold",
                UserWarning, stacklevel=2,
            )
        thresholds[str(b)] = None if threshold is None else float(threshold)
        per_batch[str(b)] = {
            # NaN, not None: h5mu cannot store None in uns
            "threshold": np.nan if threshold is None else float(threshold),
            "scores_obs": scratch.obs.loc[scratch.obs[BATCH_KEY] == b, DOUBLET_SCORE].to_numpy(dtype=float),
            "scores_sim": np.asarray(result["doublet_scores_sim"], dtype=float),
        }
    adata.uns[DOUBLETS_KEY] = {"method": "scrublet", "n_prin_comps": n_pcs, "removed": bool(settings.remove),
                               "batches": per_batch}
    predicted = scratch.obs[PREDICTED_DOUBLET].to_numpy(dtype=bool)
    return {
        "detected": True,
        "scored": int(scratch.n_obs),
        "predicted": int(predicted.sum()),
        "rate": float(predicted.mean()) if scratch.n_obs else 0.0,
        "predicted_per_batch": {str(b): int(n) for b, n in
                                scratch.obs[PREDICTED_DOUBLET].groupby(scratch.obs[BATCH_KEY]).sum().items()},
        "threshold": thresholds,
        "removed": bool(settings.remove),
        "n_prin_comps": int(n_pcs),
    }


def scrublet_input(adata: ad.AnnData, *, cells: np.ndarray, batch: pd.Series) -> ad.AnnData:
    """The counts of the ``cells`` scrublet can score, with their batch in ``obs``."""
    counts = adata.layers[COUNTS_LAYER]
    # scrublet drops cells with fewer than 3 genes itself and then cannot place their scores.
    scored = cells & (np.asarray((counts > 0).sum(axis=1)).ravel() >= 3)
    return ad.AnnData(
        X=sp.csr_matrix(counts[scored], dtype=np.float32),
        obs=pd.DataFrame({BATCH_KEY: batch[scored].to_numpy()}, index=adata.obs_names[scored]),
    )


def scrublet_components(scratch: ad.AnnData, *, origin: str) -> int:
    """Principal components scrublet can fit in every batch (its default, 30, where it can).

    scanpy's scrublet keeps only the genes its own seurat-flavour HVG step selects in a
    batch and fits its PCA to them; a panel of a few hundred genes (targeted panels, test
    slices) leaves fewer than 30 and sklearn refuses. That selection is repeated here, with
    the same scanpy calls, to size the PCA.
    """
    sizes = {}
    for b in pd.unique(scratch.obs[BATCH_KEY]):
        part = scratch[(scratch.obs[BATCH_KEY] == b).to_numpy()].copy()
        sc.pp.filter_genes(part, min_cells=3)
        sc.pp.normalize_total(part)
        sc.pp.log1p(part)
        sc.pp.highly_variable_genes(part)
        sizes[b] = (int(part.n_obs), int(part.var["highly_variable"].sum()))
    n_pcs = min([SCRUBLET_PCS, *(min(size) - 1 for size in sizes.values())])
    if n_pcs < 2:
        b, (n_cells, n_genes) = min(sizes.items(), key=lambda item: min(item[1]))
        raise InputError(
            f"{origin}: doublet detection needs more data: batch {b} has {n_cells} cells and {n_genes} variable "
            "genes after QC; set qc.doublets.detect: false for this dataset"
        )
    return n_pcs


# ---------------------------------------------------------------------------
# protein


def split_isotypes(prot: ad.AnnData, *, pattern: str | None, origin: str = "input") -> ad.AnnData:
    """Protein counts per cell with the isotype controls taken out of the panel (a copy).

    Isotype controls measure non-specific antibody binding, not a protein; they are kept
    per cell (to filter sticky cells, or to model background) but not normalised with
    the panel. Writes ``obs["total_counts"]`` (panel), ``obs["isotype_counts"]`` and
    ``obsm["isotype_counts"]`` (a column per control).
    """
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise InputError(f"config qc.prot.isotype_pattern {pattern!r}: not a regular expression ({exc}); fix it") \
            from None
    names = prot.var_names.astype(str)
    control = np.array([bool(regex and regex.search(n)) for n in names], dtype=bool)
    if control.all():
        raise InputError(
            f"{origin}: every protein ({len(names)}, e.g. {list(names[:3])}) matches qc.prot.isotype_pattern "
            f"{pattern!r}, leaving no panel; narrow the pattern"
        )
    counts = prot.layers[COUNTS_LAYER]
    controls = pd.DataFrame(_dense(counts[:, control]), index=prot.obs_names, columns=list(names[control]))
    out = prot[:, ~control].copy()
    out.obsm[ISOTYPE_COUNTS] = controls
    out.obs[ISOTYPE_COUNTS] = controls.sum(axis=1).to_numpy()
    out.obs[TOTAL_COUNTS] = np.asarray(out.layers[COUNTS_LAYER].sum(axis=1)).ravel()
    return out


def clr(counts: Any) -> np.ndarray:
    """Centred log-ratio per cell: log1p(x) minus its mean over the cell's proteins."""
    x = np.log1p(_dense(counts))
    return (x - x.mean(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------
# chromatin accessibility


def _atac_qc(atac: ad.AnnData, settings: AtacSettings, *, min_cells: int, origin: str
             ) -> tuple[ad.AnnData, dict[str, Any]]:
    atac = atac.copy()
    counts = atac.layers[COUNTS_LAYER]
    atac.obs[TOTAL_COUNTS] = np.asarray(counts.sum(axis=1)).ravel()
    atac.obs[N_FEATURES] = np.asarray((counts > 0).sum(axis=1)).ravel()
    chain = FilterChain(atac.obs, unit="cell", origin=origin)
    chain.at_least("atac.min_counts", atac.obs[TOTAL_COUNTS], settings.min_counts)
    if settings.max_counts is not None:
        chain.at_most("atac.max_counts", atac.obs[TOTAL_COUNTS], settings.max_counts)
    chain.at_least("atac.min_features", atac.obs[N_FEATURES], settings.min_features)
    atac = atac[chain.keep].copy()
    peaks_in = atac.n_vars
    atac.X = atac.layers[COUNTS_LAYER].copy()
    # A peak open in no cell has no inverse document frequency.
    sc.pp.filter_genes(atac, min_cells=max(min_cells, 1))
    if atac.n_vars < 2:
        raise InputError(
            f"{origin}: QC filter qc.min_cells={min_cells} leaves {atac.n_vars} peaks of atac; lower it"
        )
    atac.X = tfidf(atac.layers[COUNTS_LAYER])
    embedding, loadings, variance_ratio = lsi(atac.X, n_components=settings.n_components)
    atac.obsm[LSI_KEY] = embedding
    atac.varm[LSI_LOADINGS] = loadings
    depth = np.log1p(atac.obs[TOTAL_COUNTS].to_numpy(dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        depth_corr = np.array([np.corrcoef(depth, embedding[:, k])[0, 1] for k in range(embedding.shape[1])])
    atac.uns["lsi"] = {"variance_ratio": variance_ratio, "depth_correlation": depth_corr}
    return atac, {
        "cells_in": len(chain.keep),
        "cells_out": int(atac.n_obs),
        "removed_by_filter_per_batch": chain.removed,
        "features_in": int(peaks_in),
        "features_out": int(atac.n_vars),
        "lsi_components": int(embedding.shape[1]),
        "lsi_depth_correlation_1": float(depth_corr[0]),
        "median_total_counts": _median(atac.obs[TOTAL_COUNTS]),
        "median_features": _median(atac.obs[N_FEATURES]),
    }


def tfidf(counts: Any, *, scale_factor: float = TFIDF_SCALE) -> sp.csr_matrix:
    """TF-IDF of a cells x peaks count matrix (muon's default, Signac's method 1 up to where the log goes).

    ``log1p(scale_factor * x_cp / sum_p x_cp) * log1p(n_cells / sum_c x_cp)``: a peak's
    share of the cell's fragments, log-scaled, weighted by how rare the peak is.
    """
    x = sp.csr_matrix(counts, dtype=np.float64)
    per_cell = np.asarray(x.sum(axis=1)).ravel()
    per_peak = np.asarray(x.sum(axis=0)).ravel()
    tf = sp.diags(1.0 / np.maximum(per_cell, 1.0)) @ x
    tf.data = np.log1p(scale_factor * tf.data)
    idf = np.log1p(x.shape[0] / np.maximum(per_peak, 1.0))
    return sp.csr_matrix(tf @ sp.diags(idf), dtype=np.float32)


def lsi(x: Any, *, n_components: int, random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent semantic indexing: truncated SVD of the TF-IDF matrix.

    Returns the cells' coordinates (``U * S``), the peaks' loadings and each
    component's explained variance ratio; at most ``min(cells, peaks) - 1`` components.
    """
    from sklearn.decomposition import TruncatedSVD

    n = min(n_components, x.shape[0] - 1, x.shape[1] - 1)
    svd = TruncatedSVD(n_components=n, random_state=random_state)
    embedding = svd.fit_transform(x)
    return (embedding.astype(np.float32), svd.components_.T.astype(np.float32),
            svd.explained_variance_ratio_.astype(np.float64))


def _dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix, dtype=float)


def _median(values: pd.Series) -> float:
    return float(np.nanmedian(values.to_numpy(dtype=float))) if len(values) else float("nan")


# ---------------------------------------------------------------------------
# figures


def qc_figures(before: md.MuData, after: md.MuData, params: Mapping[str, Any]) -> dict[str, Any]:
    """One figure per QC'd modality, keyed by modality name: what QC saw, what it kept, and why.

    ``rna``: violins of genes, counts and % mitochondrial before and after, thresholds
    dashed, and the doublet scores (observed and scrublet's simulated doublets) with
    each batch's threshold. ``prot``: panel and isotype counts per cell before and
    after. ``spatial``: counts per spot drawn over the tissue image, before (spots off
    the tissue crossed) and after QC, and the spots' counts before and after.
    ``atac``: fragments and peaks per cell before and after, and how much each LSI
    component follows sequencing depth.

    ``params`` is the config section ``qc`` (the thresholds drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    if RNA in after.mod:
        figures[RNA] = _rna_figure(before.mod[RNA], after.mod[RNA], params)
    if PROT in after.mod:
        figures[PROT] = _prot_figure(before.mod[PROT], after.mod[PROT], params)
    if SPATIAL in after.mod:
        figures[SPATIAL] = _spatial_figure(before.mod[SPATIAL], after.mod[SPATIAL], params)
    if ATAC in after.mod:
        figures[ATAC] = _atac_figure(before.mod[ATAC], after.mod[ATAC], params)
    return figures


def _violins(ax: Any, before: np.ndarray, after: np.ndarray, title: str, *thresholds: float | None) -> None:
    data = [np.asarray(before, dtype=float), np.asarray(after, dtype=float)]
    ax.violinplot([d[np.isfinite(d)] for d in data], showmedians=True)
    ax.set_xticks([1, 2], [f"before\n(n={len(data[0])})", f"after\n(n={len(data[1])})"])
    ax.set_title(title)
    for threshold in thresholds:
        if threshold is not None:
            ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1)


def _log10p(values: Any) -> np.ndarray:
    return np.log10(1 + np.asarray(values, dtype=float))


def _rna_figure(before: ad.AnnData, after: ad.AnnData, params: Mapping[str, Any]):
    import matplotlib.pyplot as plt

    if before.X is not None or before.layers:
        # (computed afresh: an ingested file's obs may carry stale metrics; chunked QC hands over the
        # metrics it computed, without the matrix)
        before = before.copy()
        add_expression_metrics(before)
    panels = [
        ("n_genes_by_counts", "genes detected", params.get("min_genes")),
        ("total_counts", "total counts", params.get("min_counts")),
        ("pct_counts_mt", "% mitochondrial", params.get("max_pct_mt")),
    ]
    doublets = after.uns.get(DOUBLETS_KEY)
    n_panels = len(panels) + (doublets is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(4 * n_panels, 3.5))
    for ax, (column, label, threshold) in zip(axes, panels, strict=False):
        _violins(ax, before.obs[column], after.obs[column], label, threshold)
    if doublets is not None:
        ax = axes[-1]
        per_batch = doublets["batches"]
        observed = np.concatenate([np.asarray(v["scores_obs"]) for v in per_batch.values()])
        simulated = np.concatenate([np.asarray(v["scores_sim"]) for v in per_batch.values()])
        bins = np.linspace(0, max(float(np.max(simulated, initial=0)), float(np.max(observed, initial=0)), 0.1), 40)
        ax.hist(simulated, bins=bins, density=True, histtype="step", color="grey", label="simulated doublets")
        ax.hist(observed, bins=bins, density=True, alpha=0.6, label="cells")
        for b, v in per_batch.items():
            if np.isfinite(v["threshold"]):
                ax.axvline(v["threshold"], color="crimson", linestyle="--", linewidth=1)
        predicted = sum(int((np.asarray(v["scores_obs"]) > v["threshold"]).sum()) for v in per_batch.values()
                        if np.isfinite(v["threshold"]))
        ax.set_title(f"doublet score: {predicted} doublets {'removed' if doublets['removed'] else 'flagged'}")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("RNA quality control (dashed: thresholds from config qc)")
    fig.tight_layout()
    return fig


def _prot_figure(before: ad.AnnData, after: ad.AnnData, params: Mapping[str, Any]):
    import matplotlib.pyplot as plt

    settings = ProteinSettings(**(params.get("prot") or {}))
    before = split_isotypes(before, pattern=settings.isotype_pattern)
    min_counts = params.get("min_protein_counts")
    max_isotype = settings.max_isotype_counts
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    _violins(axes[0], _log10p(before.obs[TOTAL_COUNTS]), _log10p(after.obs[TOTAL_COUNTS]),
             f"log10(1 + panel counts), {after.n_vars} proteins",
             None if min_counts is None else float(_log10p(min_counts)))
    controls = list(after.obsm[ISOTYPE_COUNTS].columns)
    if controls:
        _violins(axes[1], _log10p(before.obs[ISOTYPE_COUNTS]), _log10p(after.obs[ISOTYPE_COUNTS]),
                 f"log10(1 + isotype counts), {len(controls)} controls",
                 None if max_isotype is None else float(_log10p(max_isotype)))
    else:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "no isotype controls\n(qc.prot.isotype_pattern)", ha="center", va="center")
    fig.suptitle("Protein quality control (dashed: thresholds from config qc)")
    fig.tight_layout()
    return fig


def _tissue_image(adata: ad.AnnData) -> tuple[str, np.ndarray, float, float | None] | None:
    """The first section's hires (else lowres) image, its scale factor from full-resolution
    pixels, and the spot diameter in full-resolution pixels when known."""
    for library, entry in adata.uns.get(SPATIAL, {}).items():
        scalefactors = entry.get("scalefactors", {})
        for resolution in ("hires", "lowres"):
            if resolution in entry.get("images", {}):
                scale = float(scalefactors.get(SCALEFACTOR_OF_IMAGE[resolution], 1.0))
                diameter = scalefactors.get("spot_diameter_fullres")
                return str(library), np.asarray(entry["images"][resolution]), scale, diameter
    return None


def _spatial_figure(before: ad.AnnData, after: ad.AnnData, params: Mapping[str, Any]):
    import matplotlib.pyplot as plt

    settings = SpatialSettings(**(params.get("spatial") or {}))
    before = before.copy()
    add_expression_metrics(before)
    image = _tissue_image(before)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.7]})
    # Colours span the kept spots' counts, so that empty spots off the tissue do not flatten the scale.
    shown = _log10p(after.obs[TOTAL_COUNTS]) if after.n_obs else _log10p(before.obs[TOTAL_COUNTS])
    limits = (float(np.percentile(shown, 1)), float(np.percentile(shown, 99)))
    spot_layers = []
    for ax, spots, title in ((axes[0], before, "before QC"), (axes[1], after, "after QC")):
        scale, diameter = 1.0, None
        if image is not None:
            library, picture, scale, diameter = image
            if LIBRARY_KEY in spots.obs and spots.obs[LIBRARY_KEY].nunique() > 1:
                spots = spots[(spots.obs[LIBRARY_KEY].astype(str) == library).to_numpy()]
            # Faded, so that the spots' colours read over the stained tissue.
            ax.imshow(picture, alpha=0.5)
        else:
            ax.invert_yaxis()
            ax.set_aspect("equal")
        xy = np.asarray(spots.obsm[SPATIAL], dtype=float)[:, :2] * scale
        inside = ((spots.obs[IN_TISSUE_KEY].astype(int) == 1).to_numpy() if IN_TISSUE_KEY in spots.obs
                  else np.ones(spots.n_obs, dtype=bool))
        dots = ax.scatter(xy[inside, 0], xy[inside, 1], c=_log10p(spots.obs[TOTAL_COUNTS])[inside], s=14,
                          cmap="viridis", vmin=limits[0], vmax=limits[1], edgecolors="none")
        crosses = None
        if (~inside).any():
            crosses = ax.scatter(xy[~inside, 0], xy[~inside, 1], marker="x", s=7, color="black", linewidths=0.6,
                                 label=f"off tissue ({int((~inside).sum())})")
            ax.legend(fontsize=7, loc="lower right")
        spot_layers.append((ax, dots, crosses, None if diameter is None else float(diameter) * scale))
        ax.set_title(f"{title}: {spots.n_obs} spots")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(dots, ax=axes[:2], shrink=0.8, label="log10(1 + counts per spot)")
    _violins(axes[2], _log10p(before.obs[TOTAL_COUNTS]), _log10p(after.obs[TOTAL_COUNTS]),
             "log10(1 + counts per spot)", float(_log10p(settings.min_counts)))
    fig.suptitle("Spatial quality control (dashed: qc.spatial.min_counts)")
    # Spots drawn at their true diameter: points per image pixel are known once the layout is done.
    fig.canvas.draw()
    for ax, dots, crosses, diameter in spot_layers:
        if diameter:
            x0, x1 = ax.get_xlim()
            points_per_pixel = ax.get_window_extent().width * 72 / fig.dpi / abs(x1 - x0)
            dots.set_sizes([(diameter * points_per_pixel) ** 2])
            if crosses is not None:
                crosses.set_sizes([(diameter * points_per_pixel) ** 2 / 2])
    return fig


def _atac_figure(before: ad.AnnData, after: ad.AnnData, params: Mapping[str, Any]):
    import matplotlib.pyplot as plt

    settings = AtacSettings(**(params.get("atac") or {}))
    counts = before.layers[COUNTS_LAYER]
    before_counts = np.asarray(counts.sum(axis=1)).ravel()
    before_features = np.asarray((counts > 0).sum(axis=1)).ravel()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    _violins(axes[0], _log10p(before_counts), _log10p(after.obs[TOTAL_COUNTS]), "log10(1 + counts in peaks)",
             float(_log10p(settings.min_counts)),
             None if settings.max_counts is None else float(_log10p(settings.max_counts)))
    _violins(axes[1], _log10p(before_features), _log10p(after.obs[N_FEATURES]), "log10(1 + peaks open)",
             float(_log10p(settings.min_features)))
    correlation = np.asarray(after.uns["lsi"]["depth_correlation"])
    axes[2].bar(np.arange(1, len(correlation) + 1), correlation)
    axes[2].set_xlabel("LSI component")
    axes[2].set_title("correlation with log depth")
    axes[2].axhline(0, color="black", linewidth=0.5)
    fig.suptitle("ATAC quality control (dashed: thresholds from config qc.atac)")
    fig.tight_layout()
    return fig
