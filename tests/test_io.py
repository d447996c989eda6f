import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from virtualcell import io
from virtualcell.errors import InputError


def _h5ad(tmp_path, x, *, obs=None, name="data.h5ad", obsm=None):
    n = x.shape[0]
    adata = ad.AnnData(X=x, obs=obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    adata.var_names = [f"g{j}" for j in range(x.shape[1])]
    for k, v in (obsm or {}).items():
        adata.obsm[k] = v
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def test_h5ad_with_protein_in_obsm_becomes_rna_and_prot(tmp_path):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"day": ["0", "1", "2", "3"] * 5, "donor": ["a", "b"] * 10},
                       index=[f"c{i}" for i in range(20)])
    prot = pd.DataFrame(rng.poisson(5, size=(20, 3)), index=obs.index, columns=["CD3", "CD4", "CD8"])
    path = _h5ad(tmp_path, rng.poisson(2, size=(20, 6)).astype(np.float32), obs=obs,
                 obsm={"protein_expression": prot})
    mdata = io.read_dataset("mine", {"source": "h5ad", "path": str(path), "time_key": "day",
                                     "batch_key": "donor", "protein_obsm_key": "protein_expression"})
    assert set(mdata.mod) == {"rna", "prot"}
    assert list(mdata["prot"].var_names) == ["CD3", "CD4", "CD8"]
    np.testing.assert_array_equal(mdata["prot"].layers["counts"].toarray(), prot.to_numpy())
    assert mdata["rna"].obs["time"].tolist() == [0.0, 1.0, 2.0, 3.0] * 5
    assert "protein_expression" not in mdata["rna"].obsm


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[1.0, -2.0], [0.0, 3.0]]), "negative values"),
        (np.array([[1.5, 2.0], [0.0, 3.0]]), "not integers"),
        (np.array([[np.nan, 2.0], [0.0, 3.0]]), "NaN"),
    ],
)
def test_counts_that_are_not_counts_are_refused(tmp_path, values, message):
    path = _h5ad(tmp_path, values.astype(np.float32))
    with pytest.raises(InputError, match=message) as err:
        io.read_dataset("d", {"source": "h5ad", "path": str(path)})
    assert str(path) in str(err.value)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "truncated.h5ad"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(InputError, match=r"truncated\.h5ad: cannot be read as \.h5ad"):
        io.read_dataset("d", {"source": "h5ad", "path": str(bad)})
    with pytest.raises(InputError, match=r"nowhere\.h5ad: file not found .*datasets\.d\.path"):
        io.read_dataset("d", {"source": "h5ad", "path": str(tmp_path / "nowhere.h5ad")})


def test_duplicate_barcodes_are_refused(tmp_path):
    obs = pd.DataFrame(index=["c1", "c1", "c2"])
    path = _h5ad(tmp_path, np.ones((3, 2), dtype=np.float32), obs=obs)
    with pytest.raises(InputError, match="duplicate cell barcode 'c1'"):
        io.read_dataset("d", {"source": "h5ad", "path": str(path)})


def test_non_numeric_time_is_refused(tmp_path):
    obs = pd.DataFrame({"day": ["early", "late"]}, index=["a", "b"])
    path = _h5ad(tmp_path, np.ones((2, 2), dtype=np.float32), obs=obs)
    with pytest.raises(InputError, match="time column 'day' has non-numeric values"):
        io.read_dataset("d", {"source": "h5ad", "path": str(path), "time_key": "day"})


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        io.atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    io.write_json({"a": 1}, target)
    assert target.read_text().strip().startswith("{")


def test_a_write_killed_midway_leaves_a_temp_file_that_the_next_write_of_that_path_removes(tmp_path):
    """SIGKILL (a cluster's time limit) gives the writer no chance to clean up, and Snakemake's rerun
    removes only the declared outputs: the rerun's own write of the path clears the killed one's
    temporary file, and nobody else's."""
    import signal
    import subprocess
    import sys
    import time

    target, other = tmp_path / "response.png", tmp_path / "other.png"
    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from virtualcell.files import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'half a png')\n"
        "    Path(sys.argv[2]).touch()\n"
        "    time.sleep(60)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), str(tmp_path / f"{path.stem}.ready")])
             for path in (target, other)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{p.stem}.ready").exists() for p in (target, other)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the writers did not start"
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sorted(p.name for p in tmp_path.glob(".*.tmp*"))
    assert len(left) == 2 and not target.exists()  # nothing that looks finished, two stale temporaries
    fig = plt.figure()
    io.write_figure(fig, target)
    plt.close(fig)
    assert target.read_bytes().endswith(b"IEND\xaeB`\x82")
    # the other output's temporary file is not this path's: it stays until that output is written
    assert [p.name for p in tmp_path.glob(".*.tmp*")] == [n for n in left if n.startswith(".other.")]
    # a folder written whole: a killed write's temporary folder goes with the next write
    stale = tmp_path / f".figures.{'0' * 32}.tmp"
    stale.mkdir()
    (stale / "rna.png").write_bytes(b"half")
    fig = plt.figure()
    io.write_figures({"rna": fig}, tmp_path / "figures")
    plt.close(fig)
    assert not stale.exists() and (tmp_path / "figures" / "rna.png").exists()


def test_synthetic_ingest_round_trips_through_h5mu(tmp_path, tiny_mdata):
    path = tmp_path / "ingest.h5mu"
    io.write_h5mu(tiny_mdata, path)
    back = io.read_h5mu(path)
    assert sp.issparse(back["rna"].layers["counts"])
    np.testing.assert_array_equal(back["rna"].layers["counts"].toarray(), tiny_mdata["rna"].layers["counts"].toarray())
    assert back["rna"].obs["time"].equals(tiny_mdata["rna"].obs["time"])


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's private 0600: results in a shared folder stay readable as the umask allows."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    io.write_json({"a": 1}, tmp_path / "out.json")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_real_citeseq_sources_ingest_as_rna_and_prot():
    """Cell Ranger's mtx folder and scvi-tools' h5ad of the same run, through the config's source."""
    from virtualcell.readers import testdata_path

    mtx = io.read_dataset("pbmc", {"source": "10x_mtx", "path": str(testdata_path("pbmc_10k_protein_v3_mtx"))})
    assert (mtx["rna"].n_obs, mtx["rna"].n_vars, mtx["prot"].n_vars) == (1024, 100, 17)
    assert "counts" in mtx["prot"].layers
    h5ad = io.read_dataset("pbmc", {"source": "h5ad", "path": str(testdata_path("pbmc_10k_protein_v3.h5ad")),
                                    "protein_obsm_key": "protein_expression"})
    assert (h5ad["rna"].n_obs, h5ad["prot"].n_vars) == (200, 14)
    assert not h5ad["prot"].var_names.str.fullmatch(r"\d+").any()  # names, not column numbers


def test_real_csv_tables_ingest_with_proteins():
    from virtualcell.readers import testdata_path

    mdata = io.read_dataset("cbmc", {"source": "csv", "path": str(testdata_path("cbmc_rna.csv.gz")),
                                     "protein_path": str(testdata_path("cbmc_adt.csv.gz")), "cells_as_rows": False})
    assert mdata["rna"].n_obs == mdata["prot"].n_obs == 20
    assert mdata["prot"].n_vars == 3


def test_declared_modalities_are_kept_and_a_missing_one_is_named(tmp_path):
    """The sample sheet's modalities: extra ones are dropped, a missing one is one error with the fix."""
    spec = {"source": "synthetic", "generator": {"n_cells": 100, "n_genes": 40, "n_proteins": 4, "n_spots": 20}}
    assert set(io.read_dataset("s", {**spec, "modalities": ["rna", "prot", "spatial"]}).mod) == {"rna", "prot", "spatial"}
    assert set(io.read_dataset("s", {**spec, "modalities": ["rna"]}).mod) == {"rna"}
    # The generator's section alone: the cells' time column does not apply to spots; their niche is the truth.
    section = io.read_dataset("s", {**spec, "modalities": ["spatial"], "time_key": "time"})["spatial"]
    assert "time" not in section.obs and (section.obs["celltype"] == section.obs["niche"]).all()
    path = _h5ad(tmp_path, np.ones((5, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"data\.h5ad: no 'prot' modality \(found \['rna'\]\); config "
                                         r"datasets\.mine\.modalities .*set modalities: \['rna'\]"):
        io.read_dataset("mine", {"source": "h5ad", "path": str(path), "modalities": ["rna", "prot"]})
    with pytest.raises(InputError, match="no expression modality; add rna"):
        io.read_dataset("s", {**spec, "modalities": ["prot"]})


def test_real_spatial_sources_ingest_as_spots_with_their_image():
    """A Space Ranger folder (source visium) and squidpy's spatial .h5ad with its H&E image."""
    from virtualcell.readers import testdata_path

    visium = io.read_dataset("v", {"source": "visium", "path": str(testdata_path("visium_spaceranger_1.0.0")),
                                   "modalities": ["spatial"]})
    spots = visium["spatial"]
    assert spots.n_obs == 100 and "counts" in spots.layers and spots.obsm["spatial"].shape == (100, 2)
    crop = io.read_dataset("crop", {
        "source": "h5ad", "path": str(testdata_path("visium_mouse_brain_crop.h5ad")), "modalities": ["spatial"],
        "image_path": str(testdata_path("visium_mouse_brain_crop.jpg")), "recover_counts": True,
        "celltype_key": "leiden",
    })
    spots = crop["spatial"]
    assert set(crop.mod) == {"spatial"} and spots.n_obs == 49
    (library,) = spots.uns["spatial"].values()
    assert library["images"]["hires"].shape == (1717, 950, 3)
    assert spots.obs["celltype"].notna().all()
    counts = spots.layers["counts"]
    assert np.all(counts.data == np.round(counts.data))


def test_disk_rows_reads_the_selected_rows_in_blocks_whether_few_or_many(tmp_path):
    """io.DiskRows.blocks: rows cut into blocks of about max_nnz entries; a mask of many rows is sliced
    out of each block, a mask of few rows is read row run by row run; either way the same rows."""
    import h5py

    rng = np.random.default_rng(0)
    x = sp.random(500, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    io.write_h5ad(ad.AnnData(X=x), tmp_path / "x.h5ad")
    with h5py.File(tmp_path / "x.h5ad", "r") as f:
        reader = io.DiskRows(f["X"])
        assert reader.shape == (500, 40) and reader.nnz == x.nnz
        whole = list(reader.blocks(200))
        assert len(whole) > 10 and max(b.nnz for *_, b in whole) <= 200 + 40
        assert (sp.vstack([b for *_, b in whole]) != x).nnz == 0
        for fraction in (0.5, 0.02):  # sliced out of whole blocks / read alone
            mask = rng.random(500) < fraction
            mask[[3, 4, 5]] = True  # a run of adjacent rows
            picked = sp.vstack([b for *_, b in reader.blocks(400, mask)])
            assert (picked != x[mask]).nnz == 0
