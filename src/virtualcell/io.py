"""Readers and writers: every file the pipeline reads or writes goes through here.

Readers turn a dataset's declared source into one :class:`mudata.MuData` with
harmonised names (modalities ``rna``, ``prot``, ``atac``, ``spatial``, as the
config's ``modalities`` declares them; raw counts in
``layers["counts"]``, obs columns ``time``, ``batch``, ``condition``,
``celltype`` where the config names them). Writers are atomic: they write a
temporary file in the destination folder and rename it, so an interrupted job
never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell.errors import InputError
from virtualcell.files import atomic_write, remove_stale_temps
from virtualcell import readers
from virtualcell.readers import check_spots_in_images

from virtualcell.plan import ATAC, PROT, RNA, SPATIAL  # noqa: E402 (the modality names)

MODALITIES = (RNA, PROT, ATAC, SPATIAL)
COUNTS_LAYER = "counts"
# Where QC puts the peaks' LSI (atac obsm) and its loadings (atac varm): here, not in qc, so that the
# stages that read them need not import scanpy.
LSI_KEY = "X_lsi"
LSI_LOADINGS = "LSI"
# How the expression modality's values were measured (config datasets.<name>.values), kept in its
# uns["values"]: raw counts (the default), normalised values (TPM, FPKM, CPM: log1p is taken) or
# log-scale values (log-normalised matrices, qPCR: taken as they are). Non-count values are kept
# as given in layers["values"]; count-only steps (scrublet, count filters, the NB likelihood) give
# way to their continuous counterparts.
VALUES = ("counts", "normalized", "log")
VALUES_KEY = "values"
VALUES_LAYER = "values"
# log-scale values above this are almost surely not logged (log1p of 10^6 TPM is 13.8, log2 is 20)
MAX_LOG_VALUE = 30.0
H5AD = "h5ad"
H5MU = "h5mu"
# the root attribute anndata and mudata write, and the format it means
ENCODINGS = {"anndata": H5AD, "MuData": H5MU}
# obs columns the rest of the pipeline reads, and the config key that names each source column
OBS_KEYS = {"time": "time_key", "batch": "batch_key", "condition": "condition_key", "celltype": "celltype_key"}

md.set_options(pull_on_update=False)


# ---------------------------------------------------------------------------
# atomic writers


def write_h5mu(mdata: md.MuData, path: str | Path) -> None:
    atomic_write(path, lambda tmp: mdata.write(tmp))


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    atomic_write(path, lambda tmp: adata.write_h5ad(tmp))


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, sep="\t"))


def write_figure(figure: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight"))


def write_figures(figures: Mapping[str, Any], folder: str | Path) -> None:
    """Write each figure as ``{name}.png`` into ``folder``, all or none.

    They go into a temporary folder beside ``folder`` that is then renamed into
    place, so an interrupted write never leaves a folder that looks finished; a
    folder already there (a rerun by hand) is replaced.
    """
    import shutil
    import uuid

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    # mkdir, unlike mkdtemp (0700), gives the folder the mode the umask intends, as atomic_write does.
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        for name, figure in figures.items():
            figure.savefig(tmp / f"{name}.png", dpi=110, bbox_inches="tight")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------------
# readers of the pipeline's own files


def read_h5mu(path: str | Path) -> md.MuData:
    return _read_container(path, H5MU, md.read_h5mu)


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


def read_h5ad(path: str | Path) -> ad.AnnData:
    return _read_container(path, H5AD, ad.read_h5ad)


def _read_container(path: str | Path, kind: str, read: Callable[[Path], Any]) -> Any:
    """Read an .h5ad/.h5mu after checking it is one; any failure is one line naming the file."""
    path = _check_container(path, kind)
    try:
        return read(path)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as .{kind} ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated, write it again"
        ) from None


def read_model(cls: type, path: str | Path):
    """Load a model file with ``cls.load`` (weights only), naming the file when it cannot be loaded."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path or rerun the step that writes it")
    try:
        return cls.load(path)
    except InputError:
        raise
    except Exception as exc:
        # The first sentence: torch appends paragraphs of advice to its errors.
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        raise InputError(
            f"{path}: cannot be loaded as a {cls.__name__} ({type(exc).__name__}: {reason}); the file is "
            "corrupt, truncated or not a virtualcell model file (these load weights only, never code), "
            "rerun the step that writes it"
        ) from None


def _check_container(path: str | Path, expected: str) -> Path:
    """Name what is wrong before the reader does: a missing or empty file, or another format."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path or rerun the step that writes it")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an .{expected} file; point to the file")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        raise InputError(f"{path}: empty file (0 bytes); the write was interrupted or the path is wrong, "
                         "write it again")
    import h5py

    # h5py finds the signature after a user block too (.h5mu files start with a text header).
    if not h5py.is_hdf5(path):
        raise InputError(
            f"{path}: cannot be read as .{expected}: not an HDF5 file, it holds {_describe(head)}; "
            f"point to an .{expected} file or declare the source that matches the file"
        )
    try:
        with h5py.File(path, "r") as h5:
            encoding = h5.attrs.get("encoding-type")
            tenx = "matrix" in h5
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as .{expected} ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated, write it again"
        ) from None
    found = ENCODINGS.get(encoding.decode() if isinstance(encoding, bytes) else encoding)
    if found is not None and found != expected:
        raise InputError(
            f"{path}: cannot be read as .{expected}: it is an .{found} file; declare source: {found} for "
            f"this dataset or point to an .{expected} file"
        )
    if found is None and tenx:
        raise InputError(
            f"{path}: cannot be read as .{expected}: it is a 10x Genomics .h5 matrix; convert it to .h5ad "
            "(scanpy.read_10x_h5(path).write_h5ad(...)) and declare source: h5ad"
        )
    return path


def _describe(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of another format"
    first = text.splitlines()[0][:40] if text.strip() else ""
    return f"text starting {first!r}"


# ---------------------------------------------------------------------------
# ingest: a dataset's declared source -> one harmonised MuData


def read_dataset(name: str, spec: Mapping[str, Any]) -> md.MuData:
    """Read dataset ``name`` as declared in the config's ``datasets`` section.

    Parameters
    ----------
    name
        The dataset's name (used in error messages).
    spec
        Its config entry: ``source`` plus ``path`` and the ``*_key`` columns.

    Returns
    -------
    A MuData whose modalities are named ``rna`` (and ``prot`` when present),
    with raw counts in ``X`` and ``layers["counts"]`` and standard obs columns.
    """
    source = spec["source"]
    if source == "synthetic":
        from virtualcell.synthetic import generate

        generator = dict(spec.get("generator", {}))
        if generator.get("n_peaks") is None:
            # Peaks cost time in every stage: generated only for a dataset that declares atac.
            from virtualcell.synthetic_atac import DEFAULT_PEAKS

            generator["n_peaks"] = DEFAULT_PEAKS if ATAC in (spec.get("modalities") or ()) else 0
        mdata = generate(**generator)
        spec = {"time_key": "time", "batch_key": "batch", "celltype_key": "fate", **spec}
        if spec.get("generator", {}).get("cells_per_condition") and not spec.get("condition_key"):
            spec["condition_key"] = "condition"
        if RNA not in (spec.get("modalities") or mdata.mod):
            # The generator's section alone: its spots carry no time, batch or fate, but a true niche.
            spec = {**spec, "time_key": None, "batch_key": None, "celltype_key": "niche", "condition_key": None}
    else:
        path = Path(spec.get("path") or "")
        if not spec.get("path"):
            raise InputError(f"config datasets.{name}.path: missing; source '{source}' needs a file path")
        if not path.exists():
            raise InputError(f"{path}: file not found (config datasets.{name}.path); fix the path")
        if source == "h5ad" and spec.get("protein_obsm_key"):
            mdata = readers.citeseq_from_anndata(read_h5ad(path), protein_obsm_key=spec["protein_obsm_key"],
                                                 origin=str(path))
        elif source == "h5ad" and SPATIAL in spec.get("modalities", ()):
            mdata = readers.read_spatial_h5ad(
                path, image=spec.get("image_path"), image_scalef=spec.get("image_scalef", 1.0),
                library_id=spec.get("library_id"), recover_counts=spec.get("recover_counts", False),
            )
        elif source == "h5ad":
            mdata = md.MuData({RNA: read_h5ad(path)})
        elif source == "h5mu":
            mdata = read_h5mu(path)
        elif source == "10x_h5":
            mdata = readers.read_10x_h5(path)
        elif source == "10x_mtx":
            mdata = readers.read_10x_mtx(path)
        elif source == "visium":
            mdata = readers.read_visium(path, library_id=spec.get("library_id"))
        elif source == "csv":
            mdata = readers.read_csv_counts(
                path, metadata_path=spec.get("metadata_path"), protein_path=spec.get("protein_path"),
                cells_as_rows=spec.get("cells_as_rows", True), rna_counts=spec.get("values", "counts") == "counts",
            )
        else:
            raise InputError(
                f"config datasets.{name}.source: '{source}' has no reader; use one of synthetic, h5ad, h5mu, "
                "10x_h5, 10x_mtx, visium, csv"
            )
    origin = str(spec.get("path") or f"synthetic dataset {name}")
    if spec.get("condition_key") == GUIDES:
        mdata, spec = _conditions_from_guides(mdata, spec, dataset=name, origin=origin)
    mdata = select_modalities(mdata, spec.get("modalities") or list(mdata.mod), dataset=name, origin=origin)
    return harmonise(mdata, spec, origin=origin)


GUIDES = "guides"  # condition_key: the conditions are the cells' CRISPR guides (virtualcell.guides)


def _conditions_from_guides(mdata: md.MuData, spec: Mapping[str, Any], *, dataset: str,
                            origin: str) -> tuple[md.MuData, dict[str, Any]]:
    """Each cell's condition from its CRISPR guides; cells without an assignment are left out (and counted)."""
    from virtualcell import guides

    if guides.MODALITY not in mdata.mod:
        raise InputError(f"{origin}: condition_key: guides, but no CRISPR Guide Capture features (found "
                         f"{sorted(mdata.mod)}); give Cell Ranger's matrix with its guide library, or name an obs "
                         f"column in config datasets.{dataset}.condition_key")
    assigned = guides.assign(mdata.mod[guides.MODALITY], control=spec.get("control", "control"),
                             min_umi=spec.get("guide_min_umi", 3),
                             pattern=spec.get("guide_pattern") or guides.DEFAULT_PATTERN, origin=origin)
    keep = assigned.index[assigned[guides.CONDITION_COLUMN].notna()]
    counts = {"cells": len(assigned), "assigned": len(keep),
              "multiplets": int(assigned.loc[keep, "guide_multiplet"].sum())}
    print(f"[virtualcell] {origin}: guides assign a condition to {counts['assigned']} of {counts['cells']} cells "
          f"({counts['multiplets']} with several guides); the {counts['cells'] - counts['assigned']} others "
          "(no guide called, or more than two targets) are left out", file=sys.stderr, flush=True)
    mods = {}
    for mod_name, adata in mdata.mod.items():
        part = adata[adata.obs_names.isin(keep)].copy()
        for column in assigned.columns:
            part.obs[column] = assigned[column].reindex(part.obs_names).to_numpy()
        mods[mod_name] = part
    out = md.MuData(mods)
    out.uns.update(dict(mdata.uns) | {"guide_assignment": counts})
    return out, {**spec, "condition_key": guides.CONDITION_COLUMN}


def expression_modality(mdata: md.MuData) -> str:
    """The modality the encoders and the simulator read: ``rna`` (cells), else ``spatial`` (spots)."""
    if RNA in mdata.mod:
        return RNA
    if SPATIAL in mdata.mod:
        return SPATIAL
    raise InputError(f"no expression modality ('{RNA}' or '{SPATIAL}'; found {sorted(mdata.mod)})")


def select_modalities(mdata: md.MuData, wanted: list[str], *, dataset: str, origin: str) -> md.MuData:
    """Keep the declared modalities; a declared one that is missing is an error naming what is there."""
    missing = [m for m in wanted if m not in mdata.mod]
    if missing:
        found = sorted(mdata.mod)
        hints = {
            RNA: "name the cells' expression modality 'rna' (or declare modalities [spatial] for a section's spots)",
            PROT: "for an .h5ad with protein in obsm set protein_obsm_key; for RNA-only data set "
                  f"modalities: {[m for m in wanted if m != PROT]}",
            SPATIAL: "use source visium (a Space Ranger folder) or an .h5ad with obsm['spatial'] and image_path",
            ATAC: "give Cell Ranger ARC's filtered_feature_bc_matrix.h5 (feature types Gene Expression and Peaks), "
                  "or an .h5mu with an 'atac' modality; for the built-in data set generator.n_peaks > 0",
        }
        hint = hints.get(missing[0], f"set modalities to those the data holds, e.g. {found}")
        raise InputError(
            f"{origin}: no '{missing[0]}' modality (found {found}); config datasets.{dataset}.modalities "
            f"declares {list(wanted)}: {hint}"
        )
    if RNA not in wanted and SPATIAL not in wanted:
        raise InputError(
            f"config datasets.{dataset}.modalities: {list(wanted)} has no expression modality; add rna (cells) "
            "or spatial (spots)"
        )
    if set(mdata.mod) == set(wanted):
        return mdata
    out = md.MuData({m: mdata.mod[m] for m in wanted})
    out.uns.update(dict(mdata.uns))
    return out


def values_of(adata: ad.AnnData) -> str:
    """How a modality's values were measured: ``counts``, ``normalized`` or ``log`` (see :data:`VALUES`)."""
    return str(adata.uns.get(VALUES_KEY, VALUES[0]))


def raw_layer(adata: ad.AnnData) -> str:
    """The layer holding a modality's values as ingested: ``counts``, or ``values`` for non-count data."""
    return COUNTS_LAYER if values_of(adata) == VALUES[0] else VALUES_LAYER


def harmonise(mdata: md.MuData, spec: Mapping[str, Any], *, origin: str) -> md.MuData:
    """Standardise names, keep the values as ingested in a layer and check they are what the config says.

    Raw counts (``values: counts``, the default) go to ``layers["counts"]``; the expression
    modality's normalised or log values (``values: normalized | log``) to ``layers["values"]``,
    with ``uns["values"]`` saying which. Other modalities are always counts.
    """
    expression = expression_modality(mdata)
    values = spec.get("values") or VALUES[0]
    if values not in VALUES:
        raise InputError(f"config datasets values: '{values}' is not one of {list(VALUES)}")
    if values != VALUES[0] and expression != RNA:
        raise InputError(
            f"{origin}: values: {values} applies to cells' RNA; spatial spots must be counts (for a spatial "
            ".h5ad that keeps log1p-normalised values set recover_counts: true and leave values: counts)"
        )
    for mod_name in MODALITIES:
        if mod_name not in mdata.mod:
            continue
        adata = mdata.mod[mod_name]
        kind = values if mod_name == expression else VALUES[0]
        layer = COUNTS_LAYER if kind == VALUES[0] else VALUES_LAYER
        given = adata.layers[layer] if layer in adata.layers else adata.X
        given = sp.csr_matrix(given, dtype=np.float32)
        if kind == VALUES[0]:
            check_counts(given, origin=f"{origin} [{mod_name}]")
        else:
            check_values(given, kind, origin=f"{origin} [{mod_name}]")
            adata.uns[VALUES_KEY] = kind
            # X was declared to hold the values; a counts layer beside it is not what was asked for.
            adata.layers.pop(COUNTS_LAYER, None)
        adata.X = given
        adata.layers[layer] = given.copy()
        adata.var_names_make_unique()
        if adata.obs_names.has_duplicates:
            dup = adata.obs_names[adata.obs_names.duplicated()][0]
            raise InputError(
                f"{origin}: duplicate cell barcode '{dup}' in modality {mod_name}; make obs names unique"
            )
        for std, key in OBS_KEYS.items():
            column = spec.get(key)
            if not column:
                continue
            if column in adata.obs:
                adata.obs[std] = adata.obs[column]
            elif column in mdata.obs:
                adata.obs[std] = mdata.obs[column].reindex(adata.obs_names)
            elif mod_name == expression:
                raise InputError(
                    f"{origin}: no obs column '{column}' (config {key}; found {sorted(map(str, adata.obs))[:20]}); "
                    f"fix {key} in the config or leave it empty"
                )
        if "time" in adata.obs:
            times = pd.to_numeric(adata.obs["time"], errors="coerce")
            if times.isna().any():
                bad = adata.obs["time"][times.isna()].iloc[0]
                raise InputError(
                    f"{origin}: time column '{spec.get('time_key')}' has non-numeric values (e.g. {bad!r} in "
                    f"modality {mod_name}); store every cell's time as a number (e.g. days)"
                )
            adata.obs["time"] = times.astype(float)
    if SPATIAL in mdata.mod:
        check_spots_in_images(mdata.mod[SPATIAL], origin=f"{origin} [{SPATIAL}]")
    mdata.update()
    return mdata


def check_values(x: sp.csr_matrix, kind: str, *, origin: str) -> None:
    """Normalised values must be finite and non-negative; log values finite and on a log scale."""
    data = x.data
    if not np.all(np.isfinite(data)):
        raise InputError(f"{origin}: values contain NaN or infinite entries; replace them (e.g. with 0) first")
    if kind == "normalized" and (data < 0).any():
        raise InputError(
            f"{origin}: normalised values (values: normalized, e.g. TPM) contain negative entries; for "
            "log-scale data set values: log, and scaled (z-scored) data cannot be used: provide unscaled values"
        )
    if kind == "log" and data.size and float(data.max()) > MAX_LOG_VALUE:
        raise InputError(
            f"{origin}: values: log, but the largest value is {float(data.max()):.4g} (log-scale expression "
            f"stays below {MAX_LOG_VALUE:g}); for TPM/FPKM-like tables set values: normalized"
        )


def check_counts(counts: sp.csr_matrix, *, origin: str) -> None:
    """Counts must be finite, non-negative integers."""
    data = counts.data
    if not np.all(np.isfinite(data)):
        raise InputError(f"{origin}: counts contain NaN or infinite values; provide raw counts")
    if (data < 0).any():
        raise InputError(f"{origin}: counts contain negative values; provide raw (unnormalised) counts")
    if not np.all(np.equal(np.mod(data, 1), 0)):
        raise InputError(
            f"{origin}: counts are not integers (normalised data?); provide raw counts or put them in "
            "layers['counts'], or declare the values (config datasets.<name>.values: normalized or log)"
        )


# DiskRows.blocks reads the selected rows alone, not their whole block, when they are fewer than this fraction
SPARSE_PICK = 0.05


class DiskRows:
    """Rows of a CSR matrix on disk (an h5py group with ``data``, ``indices``, ``indptr``), read from
    its arrays directly, a block at a time.

    Hand-written because AnnData's backed slicing took 4 ms per 64-row slice here, against 0.1 ms
    for the same two array reads through h5py (``indptr`` is read once: 8 MB at 10^6 cells).
    """

    def __init__(self, group: Any) -> None:
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = (len(self.indptr) - 1, int(group.attrs["shape"][1]))

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop``."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix((np.asarray(self.data[a:b], dtype=np.float32), np.asarray(self.indices[a:b]),
                              self.indptr[start : stop + 1] - a), shape=(stop - start, self.shape[1]))

    def blocks(self, max_nnz: int, rows: np.ndarray | None = None) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, block)`` of contiguous rows holding about ``max_nnz`` entries each, in order;
        with ``rows`` (a mask), only the blocks holding a selected row, cut to those rows."""
        start, n = 0, self.shape[0]
        while start < n:
            stop = int(np.searchsorted(self.indptr, self.indptr[start] + max_nnz, side="right")) - 1
            stop = min(n, max(stop, start + 1))
            picked = None if rows is None else np.flatnonzero(rows[start:stop])
            if picked is None:
                yield start, stop, self.rows(start, stop)
            elif len(picked) > SPARSE_PICK * (stop - start):
                yield start, stop, self.rows(start, stop)[picked]
            elif len(picked):
                # a few rows (the cells QC removed): read those alone, a run of adjacent rows at a time
                runs = np.split(picked, np.flatnonzero(np.diff(picked) != 1) + 1)
                yield start, stop, sp.vstack([self.rows(start + r[0], start + r[-1] + 1) for r in runs], format="csr")
            start = stop
