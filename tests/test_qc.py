import json

import anndata as ad
import matplotlib
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from virtualcell import cli, io
from virtualcell.errors import InputError
from virtualcell.qc import clr, mad_outliers, qc_figures, run_qc, tfidf

PARAMS = dict(min_genes=20, min_counts=100, max_pct_mt=20, min_cells=3, min_protein_counts=0,
              n_top_genes=50, target_sum=1e4, spatial={"min_genes": 20})
# The tiny data's cells are too few for scrublet to be meaningful; tests about doublets turn it on.
NO_DOUBLETS = {"detect": False}


def _rna_only(adata: ad.AnnData) -> md.MuData:
    adata = adata.copy()
    adata.layers["counts"] = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    return md.MuData({"rna": adata})


def test_qc_filters_normalises_and_keeps_counts(tiny_mdata):
    out, summary = run_qc(tiny_mdata, **PARAMS)
    rna = out["rna"]
    assert summary["cells_out"] == rna.n_obs <= summary["cells_in"]
    assert (rna.obs["n_genes_by_counts"] >= 20).all() and (rna.obs["pct_counts_mt"] <= 20).all()
    assert rna.var["highly_variable"].sum() == 50
    # log1p of counts scaled to target_sum: expm1 of each row sums back to 1e4
    np.testing.assert_allclose(np.expm1(rna.X.toarray()).sum(1), 1e4, rtol=1e-3)
    # raw counts are kept, integer
    counts = rna.layers["counts"].toarray()
    assert np.all(counts == np.round(counts))
    assert list(out["prot"].obs_names) == list(rna.obs_names)


def test_cells_without_protein_keep_their_rna_and_the_protein_filters_judge_the_others(tiny_mdata):
    rna, prot = tiny_mdata["rna"], tiny_mdata["prot"]
    missing = rna.obs_names[:15]
    mdata = md.MuData({"rna": rna.copy(), "prot": prot[~prot.obs_names.isin(missing)].copy()})
    total = np.asarray(prot.X.sum(axis=1)).ravel()
    threshold = float(np.quantile(total, 0.2))
    out, summary = run_qc(mdata, **{**PARAMS, "min_protein_counts": threshold}, doublets=NO_DOUBLETS)
    kept = out["rna"].obs_names
    baseline, _ = run_qc(tiny_mdata, **PARAMS, doublets=NO_DOUBLETS)
    # the cells measured in RNA alone pass if their RNA passes; the protein filter removes low-protein cells
    assert set(missing) & set(baseline["rna"].obs_names) <= set(kept)
    low = prot.obs_names[total < threshold].difference(missing)
    assert not set(low) & set(kept) and len(low) > 0
    assert set(out["prot"].obs_names) == set(kept) - set(missing)
    assert summary["modalities"]["prot"]["cells_with_rna_only"] == len(set(missing) & set(kept))


def test_qc_removes_the_low_quality_cells_the_generator_made(tiny_mdata):
    out, summary = run_qc(tiny_mdata, **PARAMS)
    low = tiny_mdata["rna"].obs["low_quality"]
    assert low.any()
    kept_low = low.reindex(out["rna"].obs_names).sum()
    assert kept_low < low.sum()
    removed = summary["removed_by_filter_per_batch"]
    assert set(removed) == {"min_genes", "min_counts", "max_pct_mt", "mad.total_counts", "mad.n_genes_by_counts",
                            "mad.pct_counts_mt", "min_protein_counts", "doublets.remove"}
    assert all(set(per_batch) == {"b0", "b1"} for per_batch in removed.values())
    assert sum(sum(v.values()) for v in removed.values()) == summary["cells_in"] - summary["cells_out"]


def test_qc_names_the_filter_that_removes_every_cell(tiny_mdata):
    with pytest.raises(InputError, match=r"qc\.min_counts=10000000 removes every remaining cell"):
        run_qc(tiny_mdata, **{**PARAMS, "min_counts": 10_000_000}, origin="ingest.h5mu")


def test_clr_is_centred_log_ratio():
    x = np.array([[1.0, 3.0, 0.0], [10.0, 0.0, 5.0]])
    expected = np.log1p(x) - np.log1p(x).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(clr(x), expected, rtol=1e-6)
    np.testing.assert_allclose(clr(x).sum(axis=1), 0, atol=1e-6)


def test_asking_for_more_hvgs_than_genes_keeps_every_gene(tiny_mdata):
    out, summary = run_qc(tiny_mdata, **{**PARAMS, "n_top_genes": 10_000})
    assert out["rna"].var["highly_variable"].all()
    assert summary["highly_variable_genes"] == summary["genes_out"]


# ---------------------------------------------------------------------------
# MAD outliers, per batch


def test_mad_outlier_is_judged_within_its_own_batch():
    # 100 cells per batch; batch b1 is sequenced 8 times deeper than b0
    rng = np.random.default_rng(0)
    b0 = np.exp(rng.normal(np.log(2000), 0.3, 100))
    b1 = np.exp(rng.normal(np.log(16000), 0.3, 100))
    planted = 16000.0  # ordinary in b1, eight times the median of b0
    values = pd.Series(np.r_[b0, planted, b1, planted])
    batch = pd.Series(["b0"] * 101 + ["b1"] * 101)
    outlier = mad_outliers(values, batch=batch, n_mads=5, log1p=True)
    assert outlier[100] and not outlier[201]
    assert outlier.sum() == 1
    # without batches, the mixture hides it
    assert not mad_outliers(values, batch=pd.Series(["all"] * 202), n_mads=5, log1p=True)[100]


def test_mad_filter_removes_an_outlier_planted_in_one_batch_and_keeps_the_same_depth_in_another(tiny_mdata):
    rna = tiny_mdata["rna"].copy()
    counts = rna.layers["counts"].toarray()
    b1 = (rna.obs["batch"] == "b1").to_numpy()
    counts[b1] *= 8  # a deep batch
    healthy_b0 = np.flatnonzero(~b1 & ~rna.obs["low_quality"].to_numpy())
    planted = rna.obs_names[healthy_b0[0]]
    counts[healthy_b0[0]] *= 8  # b1's depth, in the shallow batch
    rna.layers["counts"] = sp.csr_matrix(counts)
    rna.X = rna.layers["counts"].copy()
    out, summary = run_qc(md.MuData({"rna": rna}), **{**PARAMS, "min_genes": 0, "min_counts": 0, "max_pct_mt": 100},
                          mad={"total_counts": 5}, doublets=NO_DOUBLETS)
    assert planted not in out["rna"].obs_names
    assert summary["removed_by_filter_per_batch"]["mad.total_counts"]["b0"] >= 1
    planted_total = counts[healthy_b0[0]].sum()
    b1_totals = pd.Series(counts[b1].sum(axis=1), index=rna.obs_names[b1])
    same_depth_in_b1 = b1_totals.index[(b1_totals - planted_total).abs() < 0.25 * planted_total]
    assert len(same_depth_in_b1) > 10
    assert same_depth_in_b1.isin(out["rna"].obs_names).all()


# ---------------------------------------------------------------------------
# doublets


def planted_doublets(n_cells: int, n_doublets: int, *, one_batch: bool = False) -> md.MuData:
    """Generated cells (300 genes) plus doublets, each the sum of a fate-A and a fate-B cell of one
    batch (observed late, when the fates differ most); ``one_batch`` puts every cell in one batch."""
    from virtualcell.synthetic import generate

    rna = generate(n_cells=n_cells, n_genes=300, n_proteins=8, n_spots=40, time_points=[0, 1, 2, 3, 4],
                   seed=0)["rna"]
    rng = np.random.default_rng(0)
    healthy = ~rna.obs["low_quality"].to_numpy() & (rna.obs["time"].to_numpy() >= 3)
    basin = rna.obs["basin"].astype(str).to_numpy()
    batch = np.full(n_cells, "b0") if one_batch else rna.obs["batch"].astype(str).to_numpy()
    fate_a = np.flatnonzero(healthy & (basin == "fate_A"))
    fate_b = np.flatnonzero(healthy & (basin == "fate_B"))
    firsts = rng.choice(fate_a, n_doublets, replace=False)
    seconds = [rng.choice(fate_b[batch[fate_b] == batch[i]]) for i in firsts]
    counts = sp.csr_matrix(rna.X)
    doublets = counts[firsts] + counts[seconds]
    cells = ad.AnnData(sp.vstack([counts, doublets]).tocsr(),
                       obs=pd.DataFrame({"batch": np.r_[batch, batch[firsts]]},
                                        index=[*rna.obs_names, *(f"doublet{k}" for k in range(n_doublets))]),
                       var=pd.DataFrame(index=rna.var_names))
    return _rna_only(cells)


@pytest.fixture(scope="module")
def with_doublets():
    """1,000 generated cells plus 20 planted doublets."""
    return planted_doublets(1000, 20)


def test_a_doublet_made_by_summing_two_cells_scores_high(with_doublets):
    from sklearn.metrics import roc_auc_score

    out, summary = run_qc(with_doublets, mad=None, doublets={"remove": False})
    obs = out["rna"].obs
    planted = obs.index.str.startswith("doublet")
    assert planted.sum() == 20  # flagged, not removed
    assert roc_auc_score(planted, obs["doublet_score"]) > 0.85
    assert obs["doublet_score"][planted].median() > obs["doublet_score"][~planted].quantile(0.95)
    report = summary["modalities"]["rna"]["doublets"]
    assert report["scored"] == obs.shape[0] and report["removed"] is False
    assert report["predicted"] == int(obs["predicted_doublet"].sum())
    assert set(report["threshold"]) == {"b0", "b1"}  # scored per batch
    assert set(out["rna"].uns["doublets"]["batches"]) == {"b0", "b1"}


def test_predicted_doublets_are_removed_at_a_fixed_threshold(with_doublets):
    out, summary = run_qc(with_doublets, mad=None, doublets={"threshold": 0.1})
    kept = out["rna"].obs_names
    planted = with_doublets["rna"].obs_names.str.startswith("doublet")
    planted_removed = planted.sum() - kept.str.startswith("doublet").sum()
    assert planted_removed >= 12  # most of the 20
    removed = sum(summary["removed_by_filter_per_batch"]["doublets.remove"].values())
    assert removed - planted_removed <= 0.05 * (~planted).sum()  # few singlets
    assert (out["rna"].obs["doublet_score"] <= 0.1).all()


def test_doublet_detection_can_be_turned_off(tiny_mdata):
    out, summary = run_qc(tiny_mdata, **PARAMS, doublets=NO_DOUBLETS)
    assert "doublet_score" not in out["rna"].obs
    assert "doublets.remove" not in summary["removed_by_filter_per_batch"]
    assert summary["modalities"]["rna"]["doublets"] == {"detected": False}


# ---------------------------------------------------------------------------
# protein: isotype controls


@pytest.fixture(scope="module")
def pbmc_citeseq():
    """Real 10x CITE-seq (a 100-gene slice of pbmc_10k_protein_v3, 17 antibodies incl. 3 IgG controls)."""
    from virtualcell.readers import read_10x_mtx, testdata_path

    return io.harmonise(read_10x_mtx(testdata_path("pbmc_10k_protein_v3_mtx")), {}, origin="pbmc")


def test_isotype_controls_leave_the_panel_and_their_counts_stay_per_cell(pbmc_citeseq):
    controls = ["IgG2a_control_TotalSeqB", "IgG1_control_TotalSeqB", "IgG2b_control_TotalSeqB"]
    out, summary = run_qc(pbmc_citeseq, min_genes=3, min_counts=10, n_top_genes=2000)
    prot = out["prot"]
    assert not set(controls) & set(prot.var_names)
    assert prot.n_vars == 14 and summary["proteins"] == 14
    assert summary["modalities"]["prot"]["isotype_controls"] == controls
    raw = pbmc_citeseq["prot"][prot.obs_names]
    expected = raw[:, controls].layers["counts"].toarray()
    np.testing.assert_array_equal(prot.obsm["isotype_counts"][controls].to_numpy(), expected)
    np.testing.assert_array_equal(prot.obs["isotype_counts"].to_numpy(), expected.sum(axis=1))
    # CLR over the 14 panel proteins only
    panel = raw[:, prot.var_names].layers["counts"].toarray()
    np.testing.assert_allclose(prot.X, clr(panel), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(prot.obs["total_counts"].to_numpy(), panel.sum(axis=1))
    # a 100-gene slice: scrublet runs with fewer principal components than its default 30
    assert 2 <= summary["modalities"]["rna"]["doublets"]["n_prin_comps"] < 30


def test_cells_with_many_isotype_counts_are_removed(pbmc_citeseq):
    limit = 40
    params = dict(min_genes=3, min_counts=10, n_top_genes=2000, mad=None, doublets=NO_DOUBLETS)
    _, unfiltered = run_qc(pbmc_citeseq, **params)
    out, summary = run_qc(pbmc_citeseq, **params, prot={"max_isotype_counts": limit})
    assert (out["prot"].obs["isotype_counts"] <= limit).all()
    removed = summary["removed_by_filter_per_batch"]["prot.max_isotype_counts"]["all"]
    assert removed > 0 and summary["cells_out"] == unfiltered["cells_out"] - removed
    assert list(out["rna"].obs_names) == list(out["prot"].obs_names)


def test_a_pattern_matching_every_protein_is_an_error(tiny_mdata):
    with pytest.raises(InputError, match=r"every protein \(8.*qc\.prot\.isotype_pattern"):
        run_qc(tiny_mdata, **PARAMS, doublets=NO_DOUBLETS, prot={"isotype_pattern": "CD_"})


# ---------------------------------------------------------------------------
# spatial spots


def test_spots_off_the_tissue_are_removed_and_the_images_survive(tiny_mdata, tmp_path):
    spots_in = tiny_mdata["spatial"]
    out, summary = run_qc(tiny_mdata, **PARAMS)
    spots = out["spatial"]
    in_tissue = spots_in.obs["in_tissue"].astype(bool)
    assert (~in_tissue).sum() > 0
    assert spots.obs["in_tissue"].astype(bool).all()
    assert set(spots.obs_names) == set(spots_in.obs_names[in_tissue])  # no in-tissue spot is lost here
    report = summary["modalities"]["spatial"]
    assert report["removed_by_filter_per_batch"]["spatial.in_tissue_only"] == {"all": int((~in_tissue).sum())}
    assert report["spots_out_of_tissue"] == int((~in_tissue).sum())
    # the expression QC of cells, on spots: log-normalised, HVGs, counts kept; no doublet calling
    np.testing.assert_allclose(np.expm1(spots.X.toarray()).sum(1), 1e4, rtol=1e-3)
    assert spots.var["highly_variable"].sum() == 50 and "counts" in spots.layers
    assert "doublet_score" not in spots.obs
    # coordinates and images, through a write and read of the file
    io.write_h5mu(out, tmp_path / "qc.h5mu")
    back = io.read_h5mu(tmp_path / "qc.h5mu")["spatial"]
    np.testing.assert_array_equal(back.obsm["spatial"], spots_in[back.obs_names].obsm["spatial"])
    library = next(iter(spots_in.uns["spatial"]))
    np.testing.assert_array_equal(back.uns["spatial"][library]["images"]["hires"],
                                  spots_in.uns["spatial"][library]["images"]["hires"])
    assert back.uns["spatial"][library]["scalefactors"] == spots_in.uns["spatial"][library]["scalefactors"]


def test_a_spatial_only_dataset_is_summarised_by_its_spots(tiny_mdata):
    spots_in = tiny_mdata["spatial"]
    out, summary = run_qc(md.MuData({"spatial": spots_in.copy()}), **PARAMS)
    assert list(out.mod) == ["spatial"]
    assert summary["expression_modality"] == "spatial"
    assert summary["cells_in"] == spots_in.n_obs and summary["cells_out"] == out["spatial"].n_obs
    assert summary["proteins"] == 0
    assert set(summary["removed_by_filter_per_batch"]) == {"spatial.in_tissue_only", "spatial.min_counts",
                                                           "spatial.min_genes", "spatial.max_pct_mt"}


def test_a_spot_filter_that_removes_every_spot_is_named(tiny_mdata):
    with pytest.raises(InputError, match=r"qc\.spatial\.min_counts=1000000000 removes every remaining spot "
                                         r"\(total_counts of those \d+ spots ranges"):
        run_qc(tiny_mdata, **{**PARAMS, "spatial": {"min_counts": 10**9}}, doublets=NO_DOUBLETS)


# ---------------------------------------------------------------------------
# ATAC


def _peaks(n_cells: int = 400, n_peaks: int = 600, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Two cell types opening two different halves of the peaks, depth log-normal, 10 near-empty cells."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_cells)
    openness = np.full((2, n_peaks), 0.2)
    openness[0, : n_peaks // 2] = 1.0
    openness[1, n_peaks // 2 :] = 1.0
    depth = rng.lognormal(np.log(3000), 0.4, n_cells)
    depth[:10] = 50
    share = openness[group] / openness[group].sum(axis=1, keepdims=True)
    counts = sp.csr_matrix(rng.poisson(depth[:, None] * share).astype(np.float32))
    atac = ad.AnnData(counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(n_peaks)]))
    atac.layers["counts"] = counts.copy()
    return atac, group


def test_tfidf_is_the_formula():
    x = np.array([[1.0, 0.0, 3.0, 0.0], [2.0, 2.0, 0.0, 1.0], [0.0, 5.0, 1.0, 0.0]])
    tf = x / x.sum(axis=1, keepdims=True)
    idf = x.shape[0] / x.sum(axis=0)
    expected = np.log1p(1e4 * tf) * np.log1p(idf)
    np.testing.assert_allclose(tfidf(sp.csr_matrix(x)).toarray(), expected, rtol=1e-6)


def test_atac_is_filtered_tfidf_normalised_and_embedded(tiny_mdata):
    atac, group = _peaks()
    mdata = md.MuData({"rna": tiny_mdata["rna"].copy(), "atac": atac})
    out, summary = run_qc(mdata, **PARAMS, doublets=NO_DOUBLETS,
                          atac={"min_counts": 500, "min_features": 100, "n_components": 10})
    kept = out["atac"]
    assert kept.n_obs == atac.n_obs - 10 and not kept.obs_names.isin(atac.obs_names[:10]).any()
    report = summary["modalities"]["atac"]
    assert report["removed_by_filter_per_batch"]["atac.min_counts"] == {"all": 10}
    assert report["cells_out"] == kept.n_obs and report["features_out"] == kept.n_vars
    # X re-derived from the kept counts with the TF-IDF formula
    x = atac[kept.obs_names, kept.var_names].layers["counts"].toarray().astype(float)
    expected = np.log1p(1e4 * x / x.sum(axis=1, keepdims=True)) * np.log1p(x.shape[0] / x.sum(axis=0))
    np.testing.assert_allclose(kept.X.toarray(), expected, rtol=1e-5)
    np.testing.assert_array_equal(kept.layers["counts"].toarray(), x)
    # LSI: 10 components, one of the first few separates the two cell types
    lsi = kept.obsm["X_lsi"]
    assert lsi.shape == (kept.n_obs, 10) and kept.varm["LSI"].shape == (kept.n_vars, 10)
    kept_group = group[10:]
    separation = [abs(np.corrcoef(lsi[:, k], kept_group)[0, 1]) for k in range(3)]
    assert max(separation) > 0.9
    assert len(kept.uns["lsi"]["depth_correlation"]) == 10


def test_an_atac_filter_that_removes_every_cell_is_named(tiny_mdata):
    atac, _ = _peaks()
    mdata = md.MuData({"rna": tiny_mdata["rna"].copy(), "atac": atac})
    with pytest.raises(InputError, match=r"qc\.atac\.min_features=100000 removes every remaining cell"):
        run_qc(mdata, **PARAMS, doublets=NO_DOUBLETS, atac={"min_features": 100_000})


# ---------------------------------------------------------------------------
# figures and the stage


def test_a_figure_per_modality_with_the_tissue_image(tiny_mdata):
    out, _ = run_qc(tiny_mdata, **PARAMS)
    figures = qc_figures(tiny_mdata, out, PARAMS)
    assert set(figures) == {"rna", "prot", "spatial"}
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values())
    # the doublet panel beside the three violins
    assert len(figures["rna"].axes) == 4
    assert sum(len(ax.images) for ax in figures["spatial"].axes) == 2  # the image under before and after


def test_write_figures_replaces_the_folder_whole(tmp_path, tiny_mdata):
    import matplotlib.pyplot as plt

    folder = tmp_path / "qc" / "figures"
    fig = plt.figure()
    io.write_figures({"rna": fig, "prot": fig}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["prot.png", "rna.png"]
    io.write_figures({"spatial": fig}, folder)
    assert [p.name for p in folder.iterdir()] == ["spatial.png"]
    assert [p.name for p in folder.parent.iterdir()] == ["figures"]  # no temporary folder left
    plt.close(fig)


def test_the_qc_step_writes_data_summary_and_a_figure_per_modality(tmp_path, tiny_mdata):
    source = tmp_path / "ingest.h5mu"
    io.write_h5mu(tiny_mdata, source)
    out = tmp_path / "qc"
    argv = ["qc", "--dataset", "d", "--input", str(source), "--output", str(tmp_path / "qc.h5mu"),
            "--summary", str(out / "qc.json"), "--figures", str(out / "figures"), "--no-tracking",
            "--params", json.dumps(PARAMS)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["prot.png", "rna.png", "spatial.png"]
    summary = json.loads((out / "qc.json").read_text())
    assert set(summary["modalities"]) == {"rna", "prot", "spatial"}
    assert set(io.read_h5mu(tmp_path / "qc.h5mu").mod) == {"rna", "prot", "spatial"}


# real size: one batch of 20,000 cells, where scrublet leaves the small-data path


def test_qc_of_20000_cells_in_one_batch_finds_the_planted_doublets_and_stays_sparse():
    """Issue 10: scanpy's scrublet crashed above ~4,100 cells in a batch (its approximate-neighbour
    path). QC of a generated single-batch 20,000-cell dataset now scores every cell, finds the
    doublets planted in it, and keeps the cells x genes matrices sparse."""
    data = planted_doublets(20_000, 200, one_batch=True)
    out, summary = run_qc(data, n_top_genes=200, doublets={"remove": False})
    obs = out["rna"].obs
    report = summary["modalities"]["rna"]["doublets"]
    assert report["detected"] and set(report["predicted_per_batch"]) == {"b0"}
    assert report["scored"] == summary["cells_out"] > 19_000
    planted = obs.index.str.startswith("doublet")
    from sklearn.metrics import roc_auc_score

    assert planted.sum() > 100  # the others were removed by the per-batch MAD filters (too many counts)
    assert roc_auc_score(planted, obs["doublet_score"]) > 0.85
    assert sp.issparse(out["rna"].X) and sp.issparse(out["rna"].layers["counts"])


def test_scrublet_on_a_batch_above_the_exact_limit_uses_approximate_neighbours(monkeypatch):
    """Above qc.SCRUBLET_EXACT_MAX_CELLS cells in a batch, scrublet's neighbours come from
    pynndescent: the path that crashed with pynndescent 0.7.0 (pinned to 0.6.0 in pyproject).
    The limit is lowered so that 5,000 cells take that path."""
    from virtualcell import qc

    monkeypatch.setattr(qc, "SCRUBLET_EXACT_MAX_CELLS", 1000)
    data = planted_doublets(5000, 50, one_batch=True)
    out, summary = run_qc(data, n_top_genes=200, doublets={"remove": False})
    obs = out["rna"].obs
    planted = obs.index.str.startswith("doublet")
    from sklearn.metrics import roc_auc_score

    assert summary["modalities"]["rna"]["doublets"]["scored"] == summary["cells_out"]
    assert roc_auc_score(planted, obs["doublet_score"]) > 0.85


def test_a_scrublet_failure_is_one_line_naming_the_file_and_the_way_out(with_doublets, monkeypatch):
    """Whatever breaks inside scrublet (here the AttributeError the pynndescent clash raised) reaches
    the user as one line naming the input and the config key that skips doublet detection."""
    import scanpy as sc

    def broken(*args, **kwargs):
        raise AttributeError("'csr_array' object has no attribute 'getnnz'")

    monkeypatch.setattr(sc.pp, "scrublet", broken)
    with pytest.raises(InputError) as err:
        run_qc(with_doublets, mad=None, origin="cells.h5mu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cells.h5mu: doublet detection (scanpy scrublet")
    assert "getnnz" in message and message.endswith("set qc.doublets.detect: false to skip it")
