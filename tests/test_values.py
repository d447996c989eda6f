"""``datasets.<name>.values``: expression as it is published (TPM/FPKM tables, log matrices), not raw counts.

Real files: the Arabidopsis root series (log1p-normalised values, as statOT ships it) and the real
10x chr21 counts that scanpy ships, turned into a CPM table (normalised values).
"""

import json

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from virtualcell import io
from virtualcell.config import validate_config
from virtualcell.errors import InputError
from virtualcell.qc import COUNT_ONLY_STEPS, run_qc

QC = dict(min_genes=20, min_counts=300, max_pct_mt=5, min_cells=3, n_top_genes=200, doublets={"detect": True})


@pytest.fixture(scope="module")
def arabidopsis_h5ad(tmp_path_factory):
    """180 real Arabidopsis root cells (60 per zone) x 2,000 genes, X = log1p-normalised as published."""
    from virtualcell.examples import arabidopsis_root

    path = tmp_path_factory.mktemp("arabidopsis") / "root.h5ad"
    arabidopsis_root(60, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def chr21_cpm(tmp_path_factory):
    """scanpy's real 10x v3 chr21 counts (1,107 cells x 507 genes) as a counts-per-million CSV table."""
    from virtualcell.readers import read_10x_h5, testdata_path

    counts = read_10x_h5(testdata_path("10x_v3_chr21.h5"))["rna"]
    x = counts.X.toarray().astype(np.float64)
    keep = x.sum(1) > 0
    cpm = x[keep] / x[keep].sum(1, keepdims=True) * 1e6
    table = pd.DataFrame(cpm, index=counts.obs_names[keep], columns=counts.var_names)
    path = tmp_path_factory.mktemp("chr21") / "cpm.csv"
    table.to_csv(path)
    return path, table


def _spec(path, **extra):
    return {"source": "h5ad", "path": str(path), "modalities": ["rna"], **extra}


def test_log_values_declared_as_counts_are_refused_with_the_fix(arabidopsis_h5ad):
    with pytest.raises(InputError, match=r"root\.h5ad \[rna\]: counts are not integers.*values: normalized or log"):
        io.read_dataset("root", _spec(arabidopsis_h5ad))


def test_log_values_ingest_as_published(arabidopsis_h5ad):
    published = ad.read_h5ad(arabidopsis_h5ad)
    mdata = io.read_dataset("root", _spec(arabidopsis_h5ad, values="log", time_key="time"))
    rna = mdata["rna"]
    assert io.values_of(rna) == "log" and io.raw_layer(rna) == "values"
    assert "counts" not in rna.layers
    np.testing.assert_array_equal(rna.layers["values"].toarray(), published.X.toarray())
    assert sorted(set(rna.obs["time"])) == [0.0, 1.0, 2.0]


def test_values_that_contradict_their_declaration_are_refused(tmp_path, arabidopsis_h5ad):
    published = ad.read_h5ad(arabidopsis_h5ad)
    tpm = published.copy()
    tpm.X = sp.csr_matrix(np.expm1(published.X.toarray()) * 100)  # unlogged, up to ~10^5
    tpm.write_h5ad(tmp_path / "tpm.h5ad")
    with pytest.raises(InputError, match=r"tpm\.h5ad \[rna\]: values: log, but the largest value.*values: normalized"):
        io.read_dataset("d", _spec(tmp_path / "tpm.h5ad", values="log"))
    scaled = published.copy()
    scaled.X = published.X.toarray() - published.X.toarray().mean(0)  # z-scored-like: negative entries
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(InputError, match=r"scaled\.h5ad \[rna\]: normalised values .* negative entries"):
        io.read_dataset("d", _spec(tmp_path / "scaled.h5ad", values="normalized"))


def test_the_synthetic_generator_is_always_counts():
    with pytest.raises(InputError, match=r"datasets\.s\.values: the synthetic generator measures counts"):
        validate_config({"datasets": {"s": {"source": "synthetic", "values": "log"}}})
    with pytest.raises(InputError, match=r"datasets\.s\.values"):
        validate_config({"datasets": {"s": {"source": "h5ad", "values": "tpm"}}})


def test_qc_of_log_values_skips_the_count_only_steps_and_keeps_the_values(arabidopsis_h5ad):
    mdata = io.read_dataset("root", _spec(arabidopsis_h5ad, values="log", time_key="time"))
    out, summary = run_qc(mdata, **QC, origin="root.h5ad")
    rna = out["rna"]
    assert summary["values"] == "log"
    assert set(summary["modalities"]["rna"]["skipped"]) == set(COUNT_ONLY_STEPS)
    assert summary["modalities"]["rna"]["doublets"] == {"detected": False}
    assert "min_counts" not in summary["removed_by_filter_per_batch"]
    assert (rna.obs["n_genes_by_counts"] >= QC["min_genes"]).all()
    # log values are taken as they are: no library-size normalisation, no second log
    given = mdata["rna"][rna.obs_names, rna.var_names].layers["values"].toarray()
    np.testing.assert_allclose(rna.X.toarray(), given)
    assert "normalize_total" not in rna.uns
    assert rna.var["highly_variable"].sum() == QC["n_top_genes"]


def test_normalised_values_from_a_real_table_are_log1p_transformed(chr21_cpm):
    path, table = chr21_cpm
    mdata = io.read_dataset("chr21", {"source": "csv", "path": str(path), "values": "normalized",
                                      "modalities": ["rna"]})
    assert io.values_of(mdata["rna"]) == "normalized"
    out, summary = run_qc(mdata, **{**QC, "min_genes": 5, "n_top_genes": 100}, origin=str(path))
    rna = out["rna"]
    assert summary["values"] == "normalized" and "doublets" in summary["modalities"]["rna"]["skipped"]
    expected = np.log1p(table.loc[rna.obs_names, rna.var_names].to_numpy())
    np.testing.assert_allclose(rna.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert rna.var["highly_variable"].sum() == 100


def test_the_embedding_of_log_values_is_a_gaussian_vae(arabidopsis_h5ad):
    from sklearn.decomposition import PCA
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from virtualcell.models.vae import CountEncoder

    data = ad.read_h5ad(arabidopsis_h5ad)
    x = data.X.toarray() - 0.5  # log-scale values may be negative (log2 ratios, qPCR): the Gaussian block takes them
    enc = CountEncoder([x.shape[1]], n_latent=4, n_hidden=32, likelihoods=["gaussian"])
    history = enc.fit(x, epochs=40, batch_size=16, seed=0, device="cpu")
    assert history[-1]["nll"] < history[0]["nll"]
    z = enc.encode(x)
    assert z.shape == (len(x), 4) and np.isfinite(z).all()
    # The latent space tells the zones apart about as well as 4 principal components do, and far
    # better than chance (kNN accuracy, 5-fold; measured 0.67, PCA 0.71, random 0.36).
    zones = data.obs["time"].to_numpy()

    def accuracy(e):
        return cross_val_score(KNeighborsClassifier(5), e, zones, cv=5).mean()

    chance = accuracy(np.random.default_rng(0).normal(size=z.shape))
    assert accuracy(z) > chance + 0.2 and accuracy(z) > accuracy(PCA(4).fit_transform(x)) - 0.1
    with pytest.raises(Exception, match="negative values"):
        CountEncoder([x.shape[1]], n_latent=4).fit(x, epochs=1, device="cpu")


def test_stage_logs_say_what_replaced_the_count_steps(tmp_path, arabidopsis_h5ad, capsys):
    """qc and embed, run as the rules run them: their logs and MLflow tags name the continuous steps."""
    from virtualcell import cli

    spec = _spec(arabidopsis_h5ad, values="log", time_key="time")
    mdata = io.read_dataset("root", spec)
    ingest = tmp_path / "ingest.h5mu"
    io.write_h5mu(mdata, ingest)
    section = validate_config({"datasets": {"root": spec}})
    assert cli.main(["qc", "--dataset", "root", "--input", str(ingest), "--output", str(tmp_path / "qc.h5mu"),
                     "--summary", str(tmp_path / "qc.json"), "--figures", str(tmp_path / "figs"),
                     "--params", json.dumps({**section["qc"], "n_top_genes": 200}), "--no-tracking"]) == 0
    assert "values: log, not counts: skipped min_counts, max_pct_mt" in capsys.readouterr().err
    qc = md.read_h5mu(tmp_path / "qc.h5mu")
    assert io.values_of(qc["rna"]) == "log"
    summary = json.loads((tmp_path / "qc.json").read_text())
    assert set(summary["modalities"]["rna"]["skipped"]) == set(COUNT_ONLY_STEPS)
    # pair, then embed: the log says the likelihood is Gaussian on log expression
    assert cli.main(["pair", "--dataset", "root", "--input", str(tmp_path / "qc.h5mu"), "--output",
                     str(tmp_path / "paired.h5mu"), "--split", str(tmp_path / "split.tsv"),
                     "--params", json.dumps(section["pair"]), "--no-tracking"]) == 0
    embed = {**section["embed"], "epochs": 3, "n_hidden": 16, "joint": False}
    assert cli.main(["embed", "--dataset", "root", "--input", str(tmp_path / "paired.h5mu"), "--output",
                     str(tmp_path / "emb.h5ad"), "--rna-model", str(tmp_path / "rna.pt"), "--joint-model",
                     str(tmp_path / "joint.pt"), "--figure", str(tmp_path / "loss.png"), "--device", "cpu",
                     "--params", json.dumps(embed), "--no-tracking"]) == 0
    assert "the RNA likelihood is Gaussian on log expression" in capsys.readouterr().err
    emb = ad.read_h5ad(tmp_path / "emb.h5ad")
    assert emb.obsm["X_rna"].shape == (qc["rna"].n_obs, embed["n_latent"])
    assert emb.uns["pca5"]["values"] == "log"
