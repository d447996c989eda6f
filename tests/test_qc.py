import numpy as np
import pytest

from virtualcell.errors import InputError
from virtualcell.qc import clr, run_qc

PARAMS = dict(min_genes=20, min_counts=100, max_pct_mt=20, min_cells=3, min_protein_counts=0,
              n_top_genes=50, target_sum=1e4)


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


def test_qc_removes_the_low_quality_cells_the_generator_made(tiny_mdata):
    out, summary = run_qc(tiny_mdata, **PARAMS)
    low = tiny_mdata["rna"].obs["low_quality"]
    assert low.any()
    kept_low = low.reindex(out["rna"].obs_names).sum()
    assert kept_low < low.sum()
    removed = summary["removed_by_filter_per_batch"]
    assert set(removed) == {"min_genes", "min_counts", "max_pct_mt", "min_protein_counts"}
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
