"""QC of an RNA matrix larger than memory: :func:`virtualcell.qc.run_qc`'s filters and outputs, in blocks of rows.

``run_qc`` holds the modality in memory several times over (the ingested counts and their
layer, the copy it filters, the normalised ``X``): at 10^6 cells x 20,000 genes and ~1,000
genes per cell each copy is 8 GB. Here the ingested counts are read from the ``.h5mu`` a block
of rows at a time (:class:`virtualcell.io.DiskRows`):

1. every cell: scanpy's QC metrics (``calculate_qc_metrics``' columns, same names and
   values) and per gene the cells detected, sums and sums of squares; then the same cell
   filters (:func:`virtualcell.qc.filter_cells`); doublets with scanpy's scrublet, one
   batch's cells in memory at a time (scrublet works per batch anyway);
2. the removed cells alone (a few %): their gene sums are subtracted (exact, integer counts),
   giving ``filter_genes``' ``n_cells`` (for ``min_cells``) and seurat_v3's means, variances
   and loess fit over the kept cells;
3. the kept cells and genes, once more: the counts and ``log1p(normalize_total)`` written
   block by block into the output, and seurat_v3's clipped sums (the sums less the excess of
   the few counts above their clip value).

Memory: one block (:data:`BLOCK_NNZ` entries) and per-cell and per-gene vectors.
The results equal ``run_qc``'s (a test holds them to it).
Hand-written because scanpy's QC metrics, seurat_v3 and normalisation need the matrix in memory.
RNA counts alone: a dataset with other modalities or normalised values takes the in-memory path.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell.errors import InputError
from virtualcell.files import atomic_write
from virtualcell.io import COUNTS_LAYER, RNA, DiskRows
from virtualcell.qc import (
    DOUBLET_SCORE,
    DOUBLETS_KEY,
    MT_PREFIXES,
    PREDICTED_DOUBLET,
    RIBO_PREFIXES,
    DoubletSettings,
    ProteinSettings,
    expression_report,
    filter_cells,
    run_qc,
    score_doublets,
    scrublet_components,
    scrublet_input,
    summarise,
)

# Entries read per block: ~32 MB of data and indices, plus the float64 work arrays of a pass. Measured at
# 10^5 x 20,000: 25M entries a block 9.2 s and 1.2 GiB peak, 4M 8.7 s and 0.6 GiB, 1M 10.0 s and 0.4 GiB.
BLOCK_NNZ = 4_000_000
# config qc.chunked: auto takes this path when the RNA counts hold more entries than this
# (~1.6 GB a copy; the in-memory path holds about five).
AUTO_ENTRIES = 200_000_000
# seurat_v3's loess span (scanpy's default)
LOESS_SPAN = 0.3
# counts_group's answer for a file HDF5 cannot open (truncated, not HDF5)
UNREADABLE = "not readable as HDF5"
HVG_COLUMNS = ("highly_variable", "highly_variable_rank", "means", "variances", "variances_norm")


def counts_group(path: str) -> tuple[str | None, int]:
    """Why ``path`` cannot take chunked QC (None if it can), and how many entries its RNA counts hold."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        return UNREADABLE, 0
    with f:
        mods = sorted(f["mod"]) if "mod" in f else []
        if mods != [RNA]:
            return f"chunked QC takes RNA alone (this file holds {', '.join(mods) or 'no modality'})", 0
        rna = f["mod"][RNA]
        values = ad.io.read_elem(rna["uns"]).get("values", "counts") if "uns" in rna else "counts"
        group = rna.get(f"layers/{COUNTS_LAYER}")
        if values != "counts" or group is None or "indptr" not in group:
            return "chunked QC takes sparse raw counts (layers/counts)", 0
        return None, int(group["indptr"][-1])


def use_chunked(path: str, setting: Any) -> bool:
    """config ``qc.chunked``: true (stop if the file cannot take it), false, or auto (large RNA counts)."""
    why, entries = counts_group(path)
    if why == UNREADABLE:
        return False  # the in-memory path's reader says what is wrong with the file, in one line
    if setting is True or str(setting).lower() == "true":
        if why:
            raise InputError(f"{path}: qc.chunked: true, but {why}; set qc.chunked: auto or false")
        return True
    if setting is False or str(setting).lower() == "false":
        return False
    return why is None and entries > AUTO_ENTRIES


def run_qc_chunked(input: str, output: str, *, progress: Callable[[str], None] = lambda message: None,
                   **params: Any) -> tuple[md.MuData, md.MuData, dict[str, Any]]:
    """:func:`virtualcell.qc.run_qc` of the RNA counts in ``input`` (.h5mu), written to ``output``.

    ``params`` are run_qc's keyword parameters, with its defaults (``spatial``, ``atac``, ``prot``
    and ``min_protein_counts`` have nothing to act on here). Returns the cells before and after QC
    as MuData without their matrices (``obs``, ``var``, ``uns``: what the figures draw) and run_qc's
    summary; ``progress`` is told how far each pass has got.
    """
    bound = inspect.signature(run_qc).bind_partial(**params)
    bound.apply_defaults()
    p = bound.arguments
    min_genes, min_counts, max_pct_mt, min_cells = p["min_genes"], p["min_counts"], p["max_pct_mt"], p["min_cells"]
    n_top_genes, target_sum, mad, doublets = p["n_top_genes"], p["target_sum"], p["mad"], p["doublets"]
    doublet_cfg = DoubletSettings(**(doublets or {}))
    with h5py.File(input, "r") as f:
        group = f["mod"][RNA]
        rna = ad.AnnData(obs=ad.io.read_elem(group["obs"]), var=ad.io.read_elem(group["var"]),
                         uns=ad.io.read_elem(group["uns"]) if "uns" in group else {},
                         obsm={k: ad.io.read_elem(v) for k, v in group.get("obsm", {}).items()})
        top_uns = ad.io.read_elem(f["uns"]) if "uns" in f else {}
        reader = DiskRows(group["layers"][COUNTS_LAYER])
        n_obs, n_vars = reader.shape
        progress(f"qc (chunked, {BLOCK_NNZ:,} entries a block): rna {n_obs} x {n_vars}, {reader.nnz:,} entries")

        started = time.perf_counter()
        cell_metrics, gene_metrics, all_sums = _metrics(reader, rna.var_names, progress)
        # assigned column by column, as scanpy does: a column of that name from ingest is replaced in place
        for column in cell_metrics:
            rna.obs[column] = cell_metrics[column].to_numpy()
        for column in gene_metrics:
            rna.var[column] = gene_metrics[column].to_numpy()
        before = md.MuData({RNA: rna.copy()})
        chain = filter_cells(rna.obs, counts=True, skipped={}, min_genes=min_genes, min_counts=min_counts,
                             max_pct_mt=max_pct_mt, mad=mad, proteins=None, prot_cfg=ProteinSettings(),
                             min_protein_counts=0, origin=input)
        progress(f"qc pass 1/2 (metrics, filters): {int(chain.keep.sum())}/{n_obs} cells pass, "
                 f"{time.perf_counter() - started:.0f} s")
        doublet_report: dict[str, Any] = {"detected": False}
        if doublet_cfg.detect:
            doublet_report = _doublets(reader, rna, chain, doublet_cfg, origin=input, progress=progress)
            if doublet_cfg.remove:
                chain.apply("doublets.remove", ~rna.obs[PREDICTED_DOUBLET].to_numpy(), rna.obs[DOUBLET_SCORE],
                            True, metric=DOUBLET_SCORE)
        keep = chain.keep
        kept = rna[keep].copy()

        # the kept cells' gene sums: pass 1's over every cell less those of the cells removed (a few %)
        n_cells, sums, squares = (a - b for a, b in zip(all_sums, _gene_sums(reader, ~keep, n_vars), strict=True))
        genes = n_cells >= min_cells
        if not genes.any():
            raise InputError(f"{input}: QC filter qc.min_cells={min_cells} removes every gene of {RNA}; lower it")
        kept = kept[:, genes].copy()
        kept.var["n_cells"] = n_cells[genes]
        n_kept = kept.n_obs
        progress(f"qc removed cells' gene sums subtracted: {int(genes.sum())}/{n_vars} genes in >= {min_cells} cells, "
                 f"{time.perf_counter() - started:.0f} s")
        rank_hvg = n_top_genes < kept.n_vars
        if rank_hvg:
            mean, var, reg_std, clip = _seurat_v3_fit(sums[genes], squares[genes], n_kept)
            clip_floor = float(clip.min())
            kept.var["highly_variable"] = False
            kept.var["highly_variable_rank"] = np.float32(np.nan)
            kept.var["means"], kept.var["variances"] = mean, var
            kept.var["variances_norm"] = 0.0
            kept.uns["hvg"] = {"flavor": "seurat_v3"}
        else:
            # run_qc's rule: every gene kept, nothing ranked (seurat_v3's loess fails on small panels)
            kept.var["highly_variable"] = True
            clip = None
        kept.uns["log1p"] = {"base": None}
        kept.uns["normalize_total"] = {"target_sum": float(target_sum)}
        after = md.MuData({RNA: kept})
        after.uns.update(top_uns)

        def write(tmp: Any) -> None:
            after.write(tmp)
            with h5py.File(tmp, "r+") as out:
                mod = out["mod"][RNA]
                if "X" in mod:
                    del mod["X"]
                layers = mod.require_group("layers")
                x_out = CsrWriter(mod, "X", n_kept, kept.n_vars, max_nnz=reader.nnz)
                counts_out = CsrWriter(layers, COUNTS_LAYER, n_kept, kept.n_vars, max_nnz=reader.nnz)
                # seurat_v3's sums of min(count, clip) are the sums less the excess of the few counts above
                # their gene's clip value (clip > sqrt(n) standard deviations above the mean)
                excess = np.zeros((2, kept.n_vars))
                for block in _kept_blocks(reader, keep, genes, progress, started):
                    counts_out.append(block)
                    if clip is not None:
                        high = block.data > clip_floor
                        columns, values = block.indices[high], block.data[high].astype(np.float64)
                        over = values > clip[columns]
                        columns, values = columns[over], values[over]
                        excess[0] += np.bincount(columns, weights=values - clip[columns], minlength=kept.n_vars)
                        excess[1] += np.bincount(columns, weights=values**2 - clip[columns] ** 2,
                                                 minlength=kept.n_vars)
                    x_out.append(_log_normalised(block, target_sum))
                if clip is not None:
                    clipped = np.stack([sums[genes] - excess[0], squares[genes] - excess[1]])
                    _rank_hvg(kept.var, mean, reg_std, clipped, n_kept, n_top_genes)
                    _overwrite_var(out, kept.var)

        atomic_write(output, write)
    progress(f"qc pass 2/2 (normalise, write): {n_kept} cells x {kept.n_vars} genes to {output}, "
             f"{time.perf_counter() - started:.0f} s")
    report = expression_report(kept, chain, genes_in=n_vars) | {"doublets": doublet_report, "chunked": True}
    summary = summarise({RNA: report}, RNA)
    return before, after, summary


def _metrics(reader: DiskRows, var_names: pd.Index, progress: Callable[[str], None]
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pass 1: ``calculate_qc_metrics(qc_vars=["mt", "ribo"], percent_top=None, log1p=False)``'s columns."""
    n_obs, n_vars = reader.shape
    mt = np.asarray(var_names.str.startswith(MT_PREFIXES))
    ribo = np.asarray(var_names.str.startswith(RIBO_PREFIXES))
    weights = np.stack([mt, ribo], axis=1).astype(np.float32)
    genes = np.zeros(n_obs, dtype=np.int64)
    totals = np.zeros(n_obs, dtype=np.float32)
    parts = np.zeros((n_obs, 2), dtype=np.float32)
    detected = np.zeros(n_vars, dtype=np.int64)
    gene_totals = np.zeros(n_vars, dtype=np.float64)
    sums = (detected, gene_totals, np.zeros(n_vars))
    for start, stop, block in _reported(reader.blocks(BLOCK_NNZ), reader, "pass 1/2", progress):
        block.eliminate_zeros()  # scanpy counts stored entries as detected after dropping explicit zeros
        genes[start:stop] = np.diff(block.indptr)
        totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        parts[start:stop] = block @ weights
        _add_gene_sums(sums, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = parts / totals[:, None] * 100
    cells = pd.DataFrame({
        "n_genes_by_counts": genes.astype(np.int32),
        "total_counts": totals,
        "total_counts_mt": parts[:, 0],
        "pct_counts_mt": pct[:, 0],
        "total_counts_ribo": parts[:, 1],
        "pct_counts_ribo": pct[:, 1],
    })
    gene_table = pd.DataFrame({
        "mt": mt,
        "ribo": ribo,
        "n_cells_by_counts": detected.astype(np.int32),
        "mean_counts": (gene_totals / n_obs).astype(np.float32),
        "pct_dropout_by_counts": (1 - detected / n_obs) * 100,
        "total_counts": gene_totals.astype(np.float32),
    })
    return cells, gene_table, sums


def _doublets(reader: DiskRows, rna: ad.AnnData, chain: Any, settings: DoubletSettings, *, origin: str,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """run_qc's doublet scores, one batch in memory at a time: each batch is read twice, once to
    size scrublet's PCA (as many components as every batch allows, as run_qc) and once to score it."""
    batch = chain.batch
    names = [b for b in pd.unique(batch) if (chain.keep & (batch == b).to_numpy()).any()]

    def load(b: str) -> tuple[ad.AnnData, pd.Series]:
        rows = chain.keep & (batch == b).to_numpy()
        counts = sp.vstack([block for _, _, block in reader.blocks(BLOCK_NNZ, rows)], format="csr")
        part = ad.AnnData(obs=pd.DataFrame(index=rna.obs_names[rows]), layers={COUNTS_LAYER: counts})
        return part, batch[rows]

    n_pcs = min(scrublet_components(scrublet_input(part, cells=np.ones(part.n_obs, bool), batch=of), origin=origin)
                for part, of in map(load, names))
    rna.obs[DOUBLET_SCORE] = np.nan
    rna.obs[PREDICTED_DOUBLET] = False
    reports, per_batch = [], {}
    for k, b in enumerate(names):
        part, of = load(b)
        reports.append(score_doublets(part, cells=np.ones(part.n_obs, bool), batch=of, settings=settings,
                                      origin=origin, n_pcs=n_pcs))
        rna.obs.loc[part.obs_names, DOUBLET_SCORE] = part.obs[DOUBLET_SCORE].to_numpy(dtype=float)
        rna.obs.loc[part.obs_names, PREDICTED_DOUBLET] = part.obs[PREDICTED_DOUBLET].to_numpy(dtype=bool)
        per_batch |= part.uns[DOUBLETS_KEY]["batches"]
        progress(f"qc doublets: batch {b} ({k + 1}/{len(names)}), {part.n_obs} cells, "
                 f"{reports[-1]['predicted']} predicted")
    rna.uns[DOUBLETS_KEY] = {"method": "scrublet", "n_prin_comps": n_pcs, "removed": bool(settings.remove),
                             "batches": per_batch}
    scored = sum(r["scored"] for r in reports)
    predicted = sum(r["predicted"] for r in reports)
    return {
        "detected": True,
        "scored": scored,
        "predicted": predicted,
        "rate": predicted / scored if scored else 0.0,
        "predicted_per_batch": {k: v for r in reports for k, v in r["predicted_per_batch"].items()},
        "threshold": {k: v for r in reports for k, v in r["threshold"].items()},
        "removed": bool(settings.remove),
        "n_prin_comps": int(n_pcs),
    }


def _gene_sums(reader: DiskRows, rows: np.ndarray, n_vars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene, over the ``rows`` (a mask), cells detected, sum and sum of squares (exact: integer counts)."""
    sums = (np.zeros(n_vars, dtype=np.int64), np.zeros(n_vars), np.zeros(n_vars))
    for _, _, block in reader.blocks(BLOCK_NNZ, rows):
        block.eliminate_zeros()
        _add_gene_sums(sums, block)
    return sums


def _add_gene_sums(sums: tuple[np.ndarray, np.ndarray, np.ndarray], block: sp.csr_matrix) -> None:
    # column sums through scipy (a sparse product), 20x faster here than numpy's weighted bincount
    squared = sp.csr_matrix((block.data.astype(np.float64) ** 2, block.indices, block.indptr), shape=block.shape)
    sums[0][:] += np.bincount(block.indices, minlength=block.shape[1])
    sums[1][:] += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    sums[2][:] += np.asarray(squared.sum(axis=0)).ravel()


def _seurat_v3_fit(sums: np.ndarray, squares: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """seurat_v3's means, variances (ddof 1), regularised standard deviations (loess of log10 variance
    on log10 mean, as scanpy's ``_highly_variable_genes_seurat_v3``) and clip values, from the sums."""
    from skmisc.loess import loess

    mean = sums / n
    var = (squares / n - mean**2) * (n / (n - 1))
    not_const = var > 0
    fitted = np.zeros(len(mean))
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=LOESS_SPAN, degree=2)
    model.fit()
    fitted[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**fitted)
    return mean, var, reg_std, reg_std * np.sqrt(n) + mean


def _rank_hvg(var_table: pd.DataFrame, mean: np.ndarray, reg_std: np.ndarray, clipped: np.ndarray, n: int,
              n_top_genes: int) -> None:
    """seurat_v3's normalised variances and ranks (one batch), into ``var_table``."""
    norm = (n * mean**2 + clipped[1] - 2 * clipped[0] * mean) / ((n - 1) * reg_std**2)
    rank = np.argsort(np.argsort(-norm)).astype(np.float32)
    rank[rank >= n_top_genes] = np.nan
    order = pd.Series(rank, index=var_table.index).sort_values(na_position="last").index
    var_table["highly_variable"] = var_table.index.isin(order[:n_top_genes])
    var_table["highly_variable_rank"] = rank
    var_table["variances_norm"] = norm


def _kept_blocks(reader: DiskRows, keep: np.ndarray, genes: np.ndarray, progress: Callable[[str], None],
                 started: float):
    """Pass 2: the kept cells' counts of the kept genes, block by block."""
    columns = np.flatnonzero(genes)
    for _, _, block in _reported(reader.blocks(BLOCK_NNZ, keep), reader, "pass 2/2", progress):
        yield block[:, columns]


def _log_normalised(block: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """scanpy's ``normalize_total(target_sum)`` then ``log1p``, in float32 as scanpy on float32 counts (a cell
    without counts stays zero)."""
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    totals[totals == 0] = 1
    values = block.data * np.repeat((target_sum / totals).astype(np.float32), np.diff(block.indptr))
    np.log1p(values, out=values)
    return sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape)


class CsrWriter:
    """A CSR matrix written into an HDF5 group a block of rows at a time, in AnnData's encoding."""

    CHUNK = 1 << 20

    def __init__(self, parent: h5py.Group, name: str, n_obs: int, n_vars: int, *, max_nnz: int) -> None:
        group = parent.create_group(name)
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_vars)})
        self.data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(self.CHUNK,))
        # One index type for both arrays, as scipy has them (anndata's reader hands them over as stored):
        # 32-bit below 2^31 entries (``max_nnz``, an upper bound).
        index = np.int32 if max_nnz < 2**31 else np.int64
        self.indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=index,
                                            chunks=(self.CHUNK,))
        self.indptr = group.create_dataset("indptr", shape=(n_obs + 1,), dtype=index)
        self.indptr[0] = 0
        self.row, self.nnz = 0, 0

    def append(self, block: sp.csr_matrix) -> None:
        end = self.nnz + block.nnz
        if end > np.iinfo(self.indptr.dtype).max:
            raise ValueError(f"{self.indptr.name}: more than {np.iinfo(self.indptr.dtype).max} entries; "
                             "raise max_nnz")
        self.data.resize((end,))
        self.indices.resize((end,))
        self.data[self.nnz : end] = block.data
        self.indices[self.nnz : end] = block.indices
        self.indptr[self.row + 1 : self.row + 1 + block.shape[0]] = block.indptr[1:] + self.nnz
        self.row += block.shape[0]
        self.nnz = end


def _overwrite_var(out: h5py.File, var_table: pd.DataFrame) -> None:
    """Write the HVG columns, known only after the last pass, over their placeholders in the file."""
    for column in HVG_COLUMNS:
        for path in (f"mod/{RNA}/var/{column}", f"var/{column}", f"var/{RNA}:{column}"):
            if path in out:
                out[path][...] = var_table[column].to_numpy()


def _reported(blocks: Any, reader: DiskRows, what: str, progress: Callable[[str], None]):
    """``blocks``, saying how far it has got about every tenth of the rows."""
    n, started, mark = reader.shape[0], time.perf_counter(), 0.1
    for item in blocks:
        yield item
        if item[1] / n >= mark and item[1] < n:
            progress(f"qc {what}: {item[1] / n:.0%} of the rows, {time.perf_counter() - started:.0f} s")
            mark = item[1] / n + 0.1
