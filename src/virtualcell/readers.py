"""Readers of the file formats single-cell and spatial data arrive in.

Each reader turns one on-disk format into a :class:`mudata.MuData` laid out the
way the rest of the pipeline expects:

- modalities ``rna`` (Gene Expression), ``prot`` (Antibody Capture), ``atac``
  (Peaks), and ``spatial`` (spot expression of a spatial section), as present;
- raw counts as a float32 CSR matrix in ``X`` (checked: finite, non-negative
  integers);
- unique obs names (a duplicate barcode is an error, never silently renamed);
- gene symbols as var names (made unique), Ensembl / feature ids kept in
  ``var["gene_ids"]``;
- for spatial data, squidpy's layout: full-resolution pixel ``x, y`` in
  ``obsm["spatial"]``, ``obs["in_tissue"]``, and images (RGB float32 in [0, 1])
  with scale factors in ``uns["spatial"][library_id]``; every spot is checked
  to lie inside every image once scaled by that image's scale factor.

Bad input raises :class:`virtualcell.errors.InputError` with one line naming the
file, the problem and the fix. The harmonisation of obs columns (``time``,
``batch`` ...) and the ``layers["counts"]`` copy are left to
:func:`virtualcell.io.harmonise`.

:func:`testdata_path` locates the small real datasets that
``scripts/fetch_test_data.py`` fetches from PyPI source archives (for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell.errors import InputError
from virtualcell.plan import ATAC, PROT, RNA, SPATIAL  # noqa: F401 (the modality names)

# 10x Genomics feature types (features.tsv.gz column 3, HDF5 matrix/features/feature_type) -> modality
FEATURE_TYPES = {
    "Gene Expression": RNA,
    "Antibody Capture": PROT,
    "Peaks": ATAC,
    "CRISPR Guide Capture": "crispr",
}
# where Space Ranger / squidpy keep a section's images and the factor from full-resolution pixels to each
SCALEFACTOR_OF_IMAGE = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}
LIBRARY_KEY = "library_id"

md.set_options(pull_on_update=False)


# ---------------------------------------------------------------------------
# 10x Genomics: Cell Ranger / Cell Ranger ARC HDF5 and Market Exchange folders


def read_10x_h5(path: str | Path, *, genome: str | None = None) -> md.MuData:
    """Read a Cell Ranger feature-barcode matrix in HDF5 (``filtered_feature_bc_matrix.h5``).

    Both the v3+ layout (one ``matrix`` group with a ``feature_type`` per
    feature) and the legacy v2 layout (one group per genome, genes only) are
    read, through :func:`scanpy.read_10x_h5`.

    Parameters
    ----------
    path
        The ``.h5`` file.
    genome
        Keep only the features of this genome (needed for a legacy v2 file with
        several genomes; optional otherwise).

    Returns
    -------
    One modality per feature type: ``rna`` (Gene Expression), ``prot``
    (Antibody Capture), ``atac`` (Peaks), ``crispr`` (CRISPR Guide Capture),
    any other type under its name in lower case. ``X``: raw counts (float32
    CSR); ``var``: ``gene_ids``, ``feature_types`` (v3+), ``genome``;
    ``uns["10x"]``: the file's attributes (chemistry, library ids) where given.
    """
    import scanpy as sc

    path = Path(path)
    _require_file(path, what="10x HDF5 file")
    attrs = _check_10x_h5(path, genome=genome)
    try:
        adata = sc.read_10x_h5(path, genome=genome, gex_only=False)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as a 10x HDF5 matrix ({_why(exc)}); the file is corrupt or truncated, "
            "copy it again from the Cell Ranger output"
        ) from None
    mdata = _split_feature_types(adata, origin=str(path))
    if attrs:
        mdata.uns["10x"] = attrs
    return mdata


def read_10x_mtx(path: str | Path) -> md.MuData:
    """Read a Cell Ranger Market Exchange folder (``filtered_feature_bc_matrix/``).

    v3+ folders hold ``matrix.mtx.gz``, ``features.tsv.gz`` and
    ``barcodes.tsv.gz``; legacy v2 folders ``matrix.mtx``, ``genes.tsv`` and
    ``barcodes.tsv``. Read through :func:`scanpy.read_10x_mtx`.

    Parameters
    ----------
    path
        The folder, or a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of it (the
        folder holding the matrix may be nested in the archive).

    Returns
    -------
    Modalities as :func:`read_10x_h5` (a legacy folder gives ``rna`` only).
    """
    path = Path(path)
    if path.is_file() and _is_tar(path):
        with tempfile.TemporaryDirectory(prefix="virtualcell-mtx-") as tmp:
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise InputError(
                    f"{path}: cannot be unpacked ({_why(exc)}); the archive is corrupt or truncated, "
                    "copy it again or unpack it and give the folder"
                ) from None
            folders = sorted(
                {p.parent for p in Path(tmp).rglob("matrix.mtx*") if not _is_junk(p)}, key=lambda p: len(p.parts)
            )
            if not folders:
                raise InputError(
                    f"{path}: the archive holds no matrix.mtx.gz (or matrix.mtx); archive a Cell Ranger "
                    "filtered_feature_bc_matrix folder"
                )
            return _read_10x_mtx_folder(folders[0], origin=path)
    if not path.exists():
        raise InputError(f"{path}: folder not found; check the path (a 10x mtx folder or a .tar.gz of it)")
    if not path.is_dir():
        raise InputError(
            f"{path}: not a folder; give the Cell Ranger filtered_feature_bc_matrix folder (or a .tar.gz of it), "
            "or use source 10x_h5 for a .h5 file"
        )
    return _read_10x_mtx_folder(path, origin=path)


def _read_10x_mtx_folder(folder: Path, *, origin: Path) -> md.MuData:
    import scanpy as sc

    v3 = {"matrix": "matrix.mtx.gz", "features": "features.tsv.gz", "barcodes": "barcodes.tsv.gz"}
    legacy = {"matrix": "matrix.mtx", "features": "genes.tsv", "barcodes": "barcodes.tsv"}
    names = legacy if (folder / "genes.tsv").is_file() else v3
    missing = [name for name in names.values() if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if not _is_junk(p))
        if names is v3 and all((folder / name.removesuffix(".gz")).is_file() for name in v3.values()):
            fix = "Cell Ranger v3+ folders are gzipped: gzip matrix.mtx features.tsv barcodes.tsv"
        else:
            fix = (
                "give a Cell Ranger filtered_feature_bc_matrix folder "
                "(matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)"
            )
        raise InputError(f"{origin}: not a 10x mtx folder: no {', '.join(missing)} (found {found[:8]}); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "var names are not unique": made unique below
            adata = sc.read_10x_mtx(folder, gex_only=False)
    except Exception as exc:
        raise InputError(
            f"{origin}: cannot be read as a 10x mtx folder ({_why(exc)}); one of {', '.join(names.values())} is "
            "corrupt, truncated or does not match the others (as many barcodes as matrix columns, features as rows)"
        ) from None
    return _split_feature_types(adata, origin=str(origin))


def _check_10x_h5(path: Path, *, genome: str | None) -> dict[str, str]:
    """Open the file with h5py first: scanpy's errors on a non-10x or corrupt file are not legible."""
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            attrs = {
                k: _decode(v)
                for k, v in f.attrs.items()
                if k in ("chemistry_description", "library_ids", "software_version")
            }
            for key in ("chemistry_description", "software_version"):  # Space Ranger writes 1-element arrays
                if isinstance(attrs.get(key), list) and len(attrs[key]) == 1:
                    attrs[key] = attrs[key][0]
            if "matrix" in f:
                return attrs
            if {"X", "obs", "var"} <= set(keys):
                raise InputError(f"{path}: this is an AnnData .h5ad file, not a 10x HDF5 matrix; use source h5ad")
            if {"mod"} <= set(keys):
                raise InputError(f"{path}: this is a MuData .h5mu file, not a 10x HDF5 matrix; use source h5mu")
            legacy = [k for k in keys if isinstance(f[k], h5py.Group) and "barcodes" in f[k]]
            if not legacy:
                raise InputError(
                    f"{path}: not a 10x HDF5 matrix (no 'matrix' group; top-level keys {keys[:8]}); give Cell "
                    "Ranger's filtered_feature_bc_matrix.h5"
                )
            if genome is None and len(legacy) > 1:
                raise InputError(f"{path}: holds several genomes {legacy}; name one with genome=")
            if genome is not None and genome not in legacy:
                raise InputError(f"{path}: no genome '{genome}' (found {legacy}); fix the genome name")
            return attrs
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be opened as HDF5 ({_why(exc)}); the file is corrupt, truncated or not a 10x .h5 "
            "file, copy it again"
        ) from None


def _split_feature_types(adata: ad.AnnData, *, origin: str) -> md.MuData:
    """One modality per 10x feature type, counts as float32 CSR, unique names."""
    _check_unique_obs(adata, origin=origin)
    types = adata.var["feature_types"].astype(str) if "feature_types" in adata.var else None
    if types is None:  # legacy (v2) files hold genes only
        groups = {RNA: np.ones(adata.n_vars, dtype=bool)}
    else:
        groups = {}
        for feature_type in pd.unique(types):
            name = FEATURE_TYPES.get(feature_type) or re.sub(r"[^a-z0-9]+", "_", feature_type.lower()).strip("_")
            groups[name] = (types == feature_type).to_numpy()
    mods = {}
    for name, mask in groups.items():
        mod = adata[:, mask].copy()
        mod.X = _counts_csr(mod.X, origin=f"{origin} [{name}]")
        mod.var_names_make_unique()
        mods[name] = mod
    return md.MuData(mods)


# ---------------------------------------------------------------------------
# CITE-seq .h5ad with protein counts in obsm (as scvi-tools stores them)


def read_h5ad_citeseq(path: str | Path, *, protein_obsm_key: str, protein_names_key: str | None = None) -> md.MuData:
    """Read an ``.h5ad`` that keeps RNA counts in ``X`` and protein counts in ``obsm``.

    This is how scvi-tools stores CITE-seq data (``obsm["protein_expression"]``
    with names in ``uns["protein_names"]``).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    protein_obsm_key
        The ``obsm`` key of the protein counts: a DataFrame (its columns name the
        proteins) or an array.
    protein_names_key
        The ``uns`` key of the protein names for an array; by default
        ``uns["protein_names"]`` or ``uns[f"{protein_obsm_key}_names"]`` when
        present with the right length, else ``protein_0``, ``protein_1`` ...

    Returns
    -------
    ``rna``: RNA counts (from ``layers["counts"]`` when present, else ``X``) with
    the file's obs, var and remaining obsm; ``prot``: protein counts, proteins
    as var names. Both: float32 CSR.
    """
    path = Path(path)
    adata = _read_h5ad(path)
    _check_unique_obs(adata, origin=str(path))
    mdata = citeseq_from_anndata(adata, protein_obsm_key=protein_obsm_key, protein_names_key=protein_names_key,
                                 origin=str(path))
    mdata.mod[RNA].X = _counts_csr(mdata.mod[RNA].X, origin=f"{path} [rna]")
    return mdata


def citeseq_from_anndata(
    adata: ad.AnnData, *, protein_obsm_key: str, protein_names_key: str | None = None, origin: str
) -> md.MuData:
    """Split an in-memory CITE-seq AnnData (protein counts in ``obsm``) into ``rna`` and ``prot``.

    The ``rna`` counts are taken as they are (the caller checks them); the
    protein counts are checked here. See :func:`read_h5ad_citeseq`.
    """
    path = origin
    if protein_obsm_key not in adata.obsm:
        raise InputError(
            f"{path}: obsm has no '{protein_obsm_key}' (found {sorted(adata.obsm)}); set protein_obsm_key to the "
            "slot with the protein counts"
        )
    prot = adata.obsm[protein_obsm_key]
    if isinstance(prot, pd.DataFrame):
        names = [str(c) for c in prot.columns]
        values = prot.to_numpy()
    else:
        values = prot
        n = np.shape(values)[1] if np.ndim(values) == 2 else -1
        candidates = [protein_names_key] if protein_names_key else ["protein_names", f"{protein_obsm_key}_names"]
        names = None
        for key in candidates:
            given = adata.uns.get(key)
            if given is not None and len(given) == n:
                names = [str(x) for x in np.asarray(given).ravel()]
                break
            if protein_names_key:
                raise InputError(
                    f"{path}: uns['{key}'] is missing or does not have {n} names (one per column of "
                    f"obsm['{protein_obsm_key}']); fix protein_names_key"
                )
        names = names or [f"protein_{i}" for i in range(n)]
    if np.ndim(values) != 2:
        raise InputError(f"{path}: obsm['{protein_obsm_key}'] is not a cells x proteins table; store it as one")
    try:
        x_prot = _counts_csr(values, origin=f"{path} [obsm['{protein_obsm_key}']]")
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: obsm['{protein_obsm_key}'] is not numeric ({_why(exc)}); store protein counts"
        ) from None
    prot_ad = ad.AnnData(X=x_prot, obs=pd.DataFrame(index=adata.obs_names.copy()), var=pd.DataFrame(index=names))
    prot_ad.var_names_make_unique()
    rna = ad.AnnData(
        X=sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X, dtype=np.float32),
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm={k: v for k, v in adata.obsm.items() if k != protein_obsm_key},
        uns={k: v for k, v in adata.uns.items() if k not in ("protein_names", protein_names_key)},
    )
    rna.var_names_make_unique()
    return md.MuData({RNA: rna, PROT: prot_ad})


# ---------------------------------------------------------------------------
# spatial: Space Ranger folders and spatial .h5ad files


def read_visium(
    path: str | Path, *, library_id: str | None = None, counts_file: str = "filtered_feature_bc_matrix.h5"
) -> md.MuData:
    """Read a 10x Visium Space Ranger output folder.

    Reads ``counts_file`` (through :func:`read_10x_h5`), the spot positions
    ``spatial/tissue_positions.csv`` (Space Ranger 2+, with a header) or
    ``spatial/tissue_positions_list.csv`` (1.x, without), the scale factors
    ``spatial/scalefactors_json.json`` and the images
    ``spatial/tissue_hires_image.png`` / ``tissue_lowres_image.png`` (at least
    one). This is what :func:`scanpy.read_visium` and ``squidpy.read.visium``
    do; it is written out here because scanpy's reader is deprecated (removed
    in scanpy 2) and squidpy is a heavy dependency for a 50-line reader, and
    because we validate every piece with a legible error.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder.
    library_id
        Key of the section in ``uns["spatial"]``; by default the library id
        recorded in the HDF5 file, else the folder's name.
    counts_file
        The matrix inside the folder (``raw_feature_bc_matrix.h5`` for all spots).

    Returns
    -------
    Modality ``spatial`` (the Gene Expression features) with ``X``: raw counts
    (float32 CSR); ``obs``: ``in_tissue``, ``array_row``, ``array_col``;
    ``obsm["spatial"]``: full-resolution pixel ``x, y`` (float);
    ``uns["spatial"][library_id]``: ``images`` (``hires``/``lowres``, RGB
    float32 in [0, 1]), ``scalefactors`` (the JSON) and ``metadata``
    (chemistry, software version).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: folder not found; give the Space Ranger output folder ('outs')")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder; give the Space Ranger output folder ('outs') that holds spatial/")
    counts_path = path / counts_file
    if not counts_path.is_file():
        raise InputError(
            f"{path}: not a Space Ranger output folder (no {counts_file}); give the 'outs' folder of spaceranger count"
        )
    mdata = read_10x_h5(counts_path)
    if RNA not in mdata.mod:
        raise InputError(
            f"{counts_path}: no Gene Expression features (found {sorted(mdata.mod)}); give the Visium matrix"
        )
    adata = mdata.mod[RNA]
    attrs = mdata.uns.get("10x", {})
    if library_id is None:
        ids = attrs.get("library_ids")
        library_id = str(ids[0] if isinstance(ids, list) and ids else ids or path.name)

    spatial_dir = path / "spatial"
    positions_path = next(
        (p for p in (spatial_dir / "tissue_positions.csv", spatial_dir / "tissue_positions_list.csv") if p.is_file()),
        None,
    )
    if positions_path is None:
        raise InputError(
            f"{spatial_dir}: no tissue_positions.csv or tissue_positions_list.csv; "
            "copy Space Ranger's whole spatial/ folder"
        )
    positions = _read_positions(positions_path)
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise InputError(
            f"{positions_path}: {len(missing)} of {adata.n_obs} barcodes of {counts_file} have no position (e.g. "
            f"'{missing[0]}'); the positions file belongs to another run, copy the matching spatial/ folder"
        )
    positions = positions.loc[adata.obs_names]
    for column in ("in_tissue", "array_row", "array_col"):
        adata.obs[column] = positions[column].to_numpy()
    adata.obsm[SPATIAL] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    scalefactors_path = spatial_dir / "scalefactors_json.json"
    scalefactors = _read_scalefactors(scalefactors_path)
    images = {}
    for resolution in SCALEFACTOR_OF_IMAGE:
        image_path = spatial_dir / f"tissue_{resolution}_image.png"
        if image_path.is_file():
            images[resolution] = _read_image(image_path)
    if not images:
        raise InputError(
            f"{spatial_dir}: no tissue_hires_image.png or tissue_lowres_image.png; "
            "copy Space Ranger's whole spatial/ folder"
        )
    metadata = {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
    adata.uns[SPATIAL] = {library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}}
    check_spots_in_images(adata, origin=str(path))
    return md.MuData({SPATIAL: adata})


def read_spatial_h5ad(
    path: str | Path,
    *,
    image: str | Path | None = None,
    image_scalef: float = 1.0,
    library_id: str | None = None,
    recover_counts: bool = False,
) -> md.MuData:
    """Read a spatial ``.h5ad`` (squidpy / scanpy layout), optionally with its tissue image.

    Parameters
    ----------
    path
        The ``.h5ad`` with spot coordinates in ``obsm["spatial"]`` (full-resolution
        pixel ``x, y``) and, usually, ``uns["spatial"][library_id]``.
    image
        An image file (PNG, JPEG, TIFF) of the section. It becomes
        ``images["hires"]`` of the library, and ``scalefactors["tissue_hires_scalef"]``
        becomes ``image_scalef``, replacing a ``hires`` image in the file.
    image_scalef
        Image pixels per full-resolution pixel of ``image``: 1 when the spot
        coordinates are pixels of this image (squidpy's ``ImageContainer``
        convention), Space Ranger's ``tissue_hires_scalef`` for its hires PNG.
    library_id
        The section in ``uns["spatial"]`` when the file holds several; also the
        key for a file without ``uns["spatial"]`` (default ``"library"``).
    recover_counts
        Many published ``.h5ad`` files keep only ``log1p(normalize_total(counts))``
        in ``X``. With ``True``, such an ``X`` is turned back into counts: per spot,
        ``expm1(X)`` divided by its smallest non-zero value, accepted only if every
        result is within 0.01 of an integer (else an error). This assumes each
        spot's smallest non-zero count is 1, true of sparse UMI data but not
        guaranteed; prefer a file with raw counts.

    Returns
    -------
    Modality ``spatial``: ``X`` raw counts (float32 CSR, from ``layers["counts"]``
    when present, else ``X``), the file's obs (``in_tissue`` added as 1 when
    absent) and var, ``obsm["spatial"]``, ``uns["spatial"]`` with only the chosen
    library. Other obsm, obsp and uns entries (embeddings, neighbours of the
    processed data) are dropped: the pipeline recomputes them.
    """
    path = Path(path)
    adata = _read_h5ad(path)
    _check_unique_obs(adata, origin=str(path))
    if SPATIAL not in adata.obsm:
        raise InputError(
            f"{path}: no spot coordinates (obsm['{SPATIAL}'], found obsm {sorted(adata.obsm)}); not a spatial "
            "dataset: store full-resolution pixel x, y in obsm['spatial'] or use source h5ad"
        )
    xy = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"{path}: obsm['{SPATIAL}'] has shape {xy.shape}, not spots x (x, y); store pixel x, y")
    libraries = dict(adata.uns.get(SPATIAL, {}))
    if library_id is None:
        if len(libraries) > 1:
            raise InputError(
                f"{path}: uns['spatial'] holds several sections {sorted(libraries)}; choose one with library_id"
            )
        library_id = next(iter(libraries), "library")
    elif libraries and library_id not in libraries:
        raise InputError(
            f"{path}: uns['spatial'] has no section '{library_id}' (found {sorted(libraries)}); fix library_id"
        )
    entry = dict(libraries.get(library_id, {}))
    images = dict(entry.get("images", {}))
    scalefactors = dict(entry.get("scalefactors", {}))
    metadata = dict(entry.get("metadata", {}))
    if len(libraries) > 1 and LIBRARY_KEY in adata.obs:
        adata = adata[adata.obs[LIBRARY_KEY].astype(str) == str(library_id)].copy()
    if image is not None:
        image = Path(image)
        _require_file(image, what="image")
        images["hires"] = _read_image(image)
        scalefactors["tissue_hires_scalef"] = float(image_scalef)
        metadata["source_image_path"] = str(image.resolve())
    if not images:
        raise InputError(
            f"{path}: no tissue image (uns['spatial']['{library_id}']['images'] is empty); pass the section's image "
            "file (image=) so spots can be paired with image patches"
        )

    obs = adata.obs.copy()
    if "in_tissue" not in obs:
        obs["in_tissue"] = 1
    out = ad.AnnData(
        X=sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X, dtype=np.float32),
        obs=obs,
        var=adata.var.copy(),
        obsm={SPATIAL: np.asarray(adata.obsm[SPATIAL], dtype=np.float64)[:, :2]},
        uns={SPATIAL: {library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}}},
    )
    check_spots_in_images(out, origin=str(path))
    if recover_counts and not _is_counts(out.X):
        out.X = _undo_log1p_normalisation(out.X, origin=str(path))
    out.X = _counts_csr(out.X, origin=f"{path} [{SPATIAL}]", hint="or pass recover_counts=True")
    out.var_names_make_unique()
    return md.MuData({SPATIAL: out})


def check_spots_in_images(adata: ad.AnnData, *, origin: str) -> None:
    """Check that every spot lies inside every image of its section.

    A spot at full-resolution pixel ``(x, y)`` (``obsm["spatial"]``) lies at
    ``(x * s, y * s)`` in an image whose scale factor is ``s``
    (``scalefactors["tissue_hires_scalef"]`` for ``images["hires"]``,
    ``tissue_lowres_scalef`` for ``lowres``, ``tissue_<name>_scalef`` for any
    other image, 1 for ``fullres``); that point must fall within the image's
    width and height. A spot outside means the coordinates, the scale factor
    or the image belong to something else, and spot-image pairs would be wrong.

    Parameters
    ----------
    adata
        Spots with ``obsm["spatial"]`` and ``uns["spatial"]``; with several
        sections, ``obs["library_id"]`` says which spots belong to which.
    origin
        Named in the error message (the file read).
    """
    if SPATIAL not in adata.obsm:
        raise InputError(f"{origin}: no spot coordinates (obsm['{SPATIAL}']); store full-resolution pixel x, y there")
    xy = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)[:, :2]
    if not np.isfinite(xy).all():
        bad = adata.obs_names[~np.isfinite(xy).all(axis=1)][0]
        raise InputError(
            f"{origin}: spot '{bad}' has no finite coordinates in obsm['{SPATIAL}']; drop it or fix its position"
        )
    libraries = adata.uns.get(SPATIAL, {})
    for library, entry in libraries.items():
        spots = np.ones(adata.n_obs, dtype=bool)
        if len(libraries) > 1 and LIBRARY_KEY in adata.obs:
            spots = (adata.obs[LIBRARY_KEY].astype(str) == str(library)).to_numpy()
        scalefactors = entry.get("scalefactors", {})
        for resolution, image in entry.get("images", {}).items():
            key = SCALEFACTOR_OF_IMAGE.get(resolution, f"tissue_{resolution}_scalef")
            scale = 1.0 if resolution == "fullres" else scalefactors.get(key)
            if scale is None:
                raise InputError(
                    f"{origin}: section '{library}' has a {resolution} image but no scalefactors['{key}']; add the "
                    "scale factor (image pixels per full-resolution pixel) from Space Ranger's scalefactors_json.json"
                )
            height, width = np.shape(image)[:2]
            scaled = xy[spots] * float(scale)
            outside = (scaled[:, 0] < 0) | (scaled[:, 0] > width) | (scaled[:, 1] < 0) | (scaled[:, 1] > height)
            if outside.any():
                first = int(np.flatnonzero(outside)[0])
                name = adata.obs_names[spots][first]
                x, y = xy[spots][first]
                raise InputError(
                    f"{origin}: {int(outside.sum())} of {int(spots.sum())} spots lie outside the {resolution} "
                    f"image of section '{library}' ({width} x {height} px at {key}={float(scale):g}; e.g. spot "
                    f"'{name}' at x={x:g}, y={y:g} -> {x * scale:.0f}, {y * scale:.0f}); obsm['spatial'] must hold "
                    f"full-resolution pixel x, y and {key} must belong to this image"
                )


def _read_positions(path: Path) -> pd.DataFrame:
    # Space Ranger writes barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres;
    # 2.0+ with this header, 1.x without. (scanpy names the last two the other way round and swaps them back.)
    columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    try:
        with path.open() as f:
            first = f.readline()
        header = 0 if first.startswith("barcode") else None
        table = pd.read_csv(path, header=header, index_col=0)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as CSV ({_why(exc)}); copy Space Ranger's spatial/ folder again"
        ) from None
    if table.shape[1] != 5:
        raise InputError(
            f"{path}: has {table.shape[1] + 1} columns, not 6 (barcode, in_tissue, array_row, array_col, "
            "pxl_row_in_fullres, pxl_col_in_fullres); give Space Ranger's tissue positions file"
        )
    table.columns = columns
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        raise InputError(
            f"{path}: barcode '{table.index[table.index.duplicated()][0]}' appears twice; the file is damaged"
        )
    bad = table.apply(pd.to_numeric, errors="coerce").isna().any()
    if bad.any():
        raise InputError(
            f"{path}: column {bad[bad].index[0]} is not numeric; give Space Ranger's tissue positions file"
        )
    return table


def _read_scalefactors(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: file not found; copy Space Ranger's whole spatial/ folder")
    try:
        scalefactors = json.loads(path.read_text())
    except Exception as exc:
        raise InputError(
            f"{path}: not valid JSON ({_why(exc)}); copy Space Ranger's scalefactors_json.json again"
        ) from None
    needed = ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres")
    bad = [k for k in needed if not isinstance(scalefactors.get(k), (int, float)) or scalefactors[k] <= 0]
    if not isinstance(scalefactors, dict) or bad:
        raise InputError(f"{path}: no positive {', '.join(bad)}; copy Space Ranger's scalefactors_json.json again")
    return scalefactors


def _read_image(path: Path) -> np.ndarray:
    """The image as RGB float32 in [0, 1] (scanpy's convention for Space Ranger PNGs; the alpha channel is dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            rgb.load()
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as an image ({_why(exc)}); the file is corrupt, copy it again"
        ) from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _undo_log1p_normalisation(counts: sp.csr_matrix, *, origin: str) -> sp.csr_matrix:
    if counts.data.size and ((counts.data < 0).any() or not np.isfinite(counts.data).all()):
        raise InputError(f"{origin}: X has negative or non-finite values (scaled data); counts cannot be recovered")
    out = counts.copy()
    out.data = np.expm1(out.data.astype(np.float64))
    lengths = np.diff(out.indptr)
    minima = np.minimum.reduceat(out.data, out.indptr[:-1][lengths > 0]) if out.data.size else np.array([])
    out.data /= np.repeat(minima, lengths[lengths > 0])
    rounded = np.rint(out.data)
    if not np.all(np.abs(out.data - rounded) < 0.01):
        raise InputError(
            f"{origin}: X is not log1p of normalised counts (expm1(X) is not a multiple of each spot's smallest "
            "value); counts cannot be recovered, provide a file with raw counts"
        )
    out.data = rounded.astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# dense count tables


def read_csv_counts(
    path: str | Path,
    *,
    metadata_path: str | Path | None = None,
    cells_as_rows: bool = True,
    protein_path: str | Path | None = None,
    rna_counts: bool = True,
) -> md.MuData:
    """Read a dense count table (CSV or TSV, optionally gzipped), with cell metadata.

    Parameters
    ----------
    path
        The table: one header row and one index column (cell ids, or feature
        names with ``cells_as_rows=False``). The separator follows the suffix
        (``.csv`` comma; ``.tsv``/``.txt``/``.tab`` tab; ``.gz`` allowed).
    metadata_path
        A table of cell metadata, cell ids in its first column; joined on the
        cell id. Every cell of the counts must have a row (extra rows are
        ignored).
    cells_as_rows
        ``True`` for cells x features (the AnnData layout), ``False`` for
        features x cells (the layout of GEO CITE-seq tables).
    protein_path
        A protein (antibody-derived tag) count table in the same layout and of
        the same cells, read into ``prot``.
    rna_counts
        ``False`` for a table of normalised or log values (TPM, FPKM, log expression, qPCR):
        they are read as numbers, not checked to be integer counts (``io.harmonise`` checks them
        against the config's ``values``).

    Returns
    -------
    ``rna`` (and ``prot``): ``X`` raw counts (float32 CSR), or the table's values; ``obs`` the
    metadata columns.
    """
    path = Path(path)
    rna = _read_table_counts(path, cells_as_rows=cells_as_rows, counts=rna_counts)
    mods = {RNA: rna}
    if protein_path is not None:
        protein_path = Path(protein_path)
        prot = _read_table_counts(protein_path, cells_as_rows=cells_as_rows)
        if not prot.obs_names.equals(rna.obs_names):
            only_rna = rna.obs_names.difference(prot.obs_names)
            only_prot = prot.obs_names.difference(rna.obs_names)
            if len(only_rna) or len(only_prot):
                example = only_rna[0] if len(only_rna) else only_prot[0]
                raise InputError(
                    f"{protein_path}: cells do not match {path.name} ({len(only_rna)} only in the counts, "
                    f"{len(only_prot)} only in the proteins, e.g. '{example}'); give tables of the same cells"
                )
            prot = prot[rna.obs_names].copy()
        mods[PROT] = prot
    if metadata_path is not None:
        metadata_path = Path(metadata_path)
        metadata = _read_table(metadata_path)
        if metadata.index.has_duplicates:
            dup = metadata.index[metadata.index.duplicated()][0]
            raise InputError(f"{metadata_path}: cell id '{dup}' appears twice; give one row per cell")
        missing = rna.obs_names.difference(metadata.index)
        if len(missing):
            raise InputError(
                f"{metadata_path}: no row for {len(missing)} of {rna.n_obs} cells of {path.name} (e.g. "
                f"'{missing[0]}'); cell ids must match the count table's (first column)"
            )
        for mod in mods.values():
            mod.obs = metadata.loc[mod.obs_names].copy()
    return md.MuData(mods)


def _read_table_counts(path: Path, *, cells_as_rows: bool, counts: bool = True) -> ad.AnnData:
    table = _read_table(path, keep_na_text=True)  # "NA", "n/a" or an empty cell in a count table is an error
    if not cells_as_rows:
        table = table.T
    if table.empty:
        raise InputError(f"{path}: no counts (an empty table); give a table with a header row and an index column")
    numeric = table.apply(pd.to_numeric, errors="coerce")
    if numeric.isna().to_numpy().any():
        bad_column = numeric.columns[numeric.isna().any()][0]
        bad_value = table.loc[numeric[bad_column].isna(), bad_column].iloc[0]
        which = "feature" if cells_as_rows else "cell"
        raise InputError(
            f"{path}: non-numeric or empty value '{bad_value}' in {which} '{bad_column}'; a count table holds numbers "
            "only, with names in the first row and column (check cells_as_rows)"
        )
    obs_names = table.index.astype(str)
    adata = ad.AnnData(
        X=(_counts_csr(numeric.to_numpy(dtype=np.float64), origin=str(path)) if counts
           else sp.csr_matrix(numeric.to_numpy(dtype=np.float32))),
        obs=pd.DataFrame(index=obs_names),
        var=pd.DataFrame(index=table.columns.astype(str)),
    )
    _check_unique_obs(adata, origin=str(path))
    adata.var_names_make_unique()
    return adata


def _read_table(path: Path, *, keep_na_text: bool = False) -> pd.DataFrame:
    # pandas rather than anndata.read_csv / read_text: those parse line by line in Python (slow on a
    # real table) and fail with a bare ValueError; pandas is fast, reads .gz, and reports bad lines.
    _require_file(path, what="table")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    sep = "," if suffixes[-1:] == [".csv"] else "\t" if suffixes[-1:] in ([".tsv"], [".txt"], [".tab"]) else None
    try:
        return pd.read_csv(
            path, sep=sep, index_col=0, engine="python" if sep is None else "c", keep_default_na=not keep_na_text
        )
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as a table ({_why(exc)}); give a CSV/TSV with a header row and an index column"
        ) from None


# ---------------------------------------------------------------------------
# shared checks


def _read_h5ad(path: Path) -> ad.AnnData:
    _require_file(path, what=".h5ad file")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as .h5ad ({_why(exc)}); the file is corrupt, truncated or not an AnnData file"
        ) from None


def _require_file(path: Path, *, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} not found; check the path")
    if not path.is_file():
        raise InputError(f"{path}: is a folder, not a {what}; give the file")


def _check_unique_obs(adata: ad.AnnData, *, origin: str) -> None:
    if adata.obs_names.has_duplicates:
        dups = adata.obs_names[adata.obs_names.duplicated()]
        raise InputError(
            f"{origin}: barcode '{dups[0]}' appears more than once ({len(dups)} duplicates); barcodes must be "
            "unique: fix the file, or add a sample suffix when merging runs"
        )


def _is_counts(x: sp.csr_matrix) -> bool:
    data = x.data
    return bool(np.isfinite(data).all() and (data >= 0).all() and np.equal(np.mod(data, 1), 0).all())


def _counts_csr(x, *, origin: str, hint: str = "") -> sp.csr_matrix:
    """``x`` as float32 CSR, checked to hold raw counts (finite, non-negative integers)."""
    x = sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else sp.csr_matrix(x).astype(np.float32)
    x.eliminate_zeros()
    data = x.data
    if not np.isfinite(data).all():
        raise InputError(f"{origin}: counts contain NaN or infinite values; provide raw counts")
    if (data < 0).any():
        raise InputError(f"{origin}: counts contain negative values (scaled data?); provide raw counts")
    if not np.equal(np.mod(data, 1), 0).all():
        extra = f" {hint}" if hint else ""
        raise InputError(
            f"{origin}: values are not integers (normalised or log data?); provide raw counts (in X or "
            f"layers['counts']){extra}"
        )
    return x


def _is_tar(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz"))


def _is_junk(path: Path) -> bool:
    """macOS archive litter: AppleDouble ``._*`` files, ``.DS_Store``, ``__MACOSX/``."""
    return path.name.startswith("._") or path.name == ".DS_Store" or "__MACOSX" in path.parts


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# real test data (fetched by scripts/fetch_test_data.py)


def testdata_path(name: str, *, fetch: bool = True) -> Path:
    """Path of one of the small real test datasets, fetched (and verified) on first use.

    Parameters
    ----------
    name
        A dataset name of ``scripts/fetch_test_data.py`` (``python
        scripts/fetch_test_data.py`` lists them), e.g. ``"pbmc_10k_protein_v3.h5ad"``.
    fetch
        Download what is missing (``pip download`` of pinned PyPI source
        archives); with ``False`` only the cache is read.

    Returns
    -------
    The file or folder under the cache (``$VIRTUALCELL_TESTDATA``, default
    ``~/.cache/virtualcell/testdata``), its sha256 checked against the pins.
    """
    return _fetch_module().dataset_path(name, download=fetch)


testdata_path.__test__ = False  # not a test, though pytest collects names starting with "test"


def testdata_cache() -> Path:
    """The folder the test datasets are cached in (``$VIRTUALCELL_TESTDATA`` or the default),
    laid out as the repository's configs expect under ``data/testdata``."""
    return _fetch_module().cache_dir()


testdata_cache.__test__ = False


@functools.cache
def _fetch_module():
    script = Path(__file__).resolve().parents[2] / "scripts" / "fetch_test_data.py"
    if not script.is_file():
        raise InputError(
            f"{script}: not found (virtualcell is installed without its repository); test data need a checkout: "
            "pip install -e . from a clone"
        )
    spec = importlib.util.spec_from_file_location("virtualcell_fetch_test_data", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


__all__ = [
    "read_10x_h5",
    "read_10x_mtx",
    "read_h5ad_citeseq",
    "read_visium",
    "read_spatial_h5ad",
    "read_csv_counts",
    "check_spots_in_images",
    "testdata_path",
    "testdata_cache",
]
