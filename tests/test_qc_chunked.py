"""Chunked QC (config qc.chunked): the in-memory QC's results, a block of rows at a time."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from test_qc import planted_doublets
from virtualcell import cli, io, qc_chunked
from virtualcell.errors import InputError
from virtualcell.qc import run_qc

PARAMS = dict(min_genes=20, min_counts=100, max_pct_mt=20, min_cells=3, n_top_genes=100, target_sum=1e4,
              doublets={"remove": True})


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same 1,000 cells + 20 planted doublets (two interleaved batches), QC'd in memory and in
    blocks of ~2,000 entries (dozens of blocks)."""
    mdata = planted_doublets(1000, 20)
    rna = mdata["rna"]
    rna.X = rna.layers["counts"].copy()
    # a few explicit zeros, as some writers leave them: not genes detected
    rna.layers["counts"].data[::97] = 0
    folder = tmp_path_factory.mktemp("chunked")
    io.write_h5mu(mdata, folder / "ingest.h5mu")
    memory, summary = run_qc(io.read_h5mu(folder / "ingest.h5mu"), **PARAMS)
    patch = pytest.MonkeyPatch()
    patch.setattr(qc_chunked, "BLOCK_NNZ", 2_000)
    try:
        before, after, chunked_summary = qc_chunked.run_qc_chunked(str(folder / "ingest.h5mu"),
                                                                   str(folder / "qc.h5mu"), **PARAMS)
    finally:
        patch.undo()
    return memory, summary, io.read_h5mu(folder / "qc.h5mu"), chunked_summary, before


def test_chunked_qc_keeps_the_same_cells_and_genes_with_the_same_metrics(both):
    memory, _, chunked, _, _ = both
    a, b = memory["rna"], chunked["rna"]
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert 0 < a.n_obs < 1020 and 0 < a.n_vars < 300
    assert list(a.obs.columns) == list(b.obs.columns)
    pd.testing.assert_frame_equal(a.obs, b.obs, check_dtype=False, rtol=1e-5)
    assert list(a.var.columns) == list(b.var.columns)
    pd.testing.assert_frame_equal(a.var, b.var, check_dtype=False, rtol=1e-5)
    assert a.var["highly_variable"].sum() == 100


def test_chunked_qc_writes_the_same_counts_and_log_normalised_values(both):
    memory, _, chunked, _, _ = both
    a, b = memory["rna"], chunked["rna"]
    assert sp.issparse(b.X) and sp.issparse(b.layers["counts"])
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), rtol=1e-5, atol=1e-6)
    for key in ("log1p", "hvg", "normalize_total"):
        assert a.uns[key] == b.uns[key]


def test_chunked_qc_scores_doublets_per_batch_as_in_memory(both):
    memory, summary, chunked, chunked_summary, _ = both
    mine = summary["modalities"]["rna"]["doublets"]
    theirs = chunked_summary["modalities"]["rna"]["doublets"]
    removed = summary["removed_by_filter_per_batch"]
    # every cell the other filters kept is scored
    assert theirs["scored"] == mine["scored"] == 1020 - sum(sum(removed[f].values()) for f in removed
                                                             if f != "doublets.remove")
    assert theirs["predicted"] == mine["predicted"] > 0
    assert theirs["threshold"] == pytest.approx(mine["threshold"])
    assert set(chunked["rna"].uns["doublets"]["batches"]) == {"b0", "b1"}
    np.testing.assert_allclose(chunked["rna"].uns["doublets"]["batches"]["b1"]["scores_sim"],
                               memory["rna"].uns["doublets"]["batches"]["b1"]["scores_sim"])


def test_chunked_qc_summary_is_the_in_memory_summary(both):
    _, summary, _, chunked_summary, before = both
    chunked_summary = json.loads(json.dumps(chunked_summary))
    assert chunked_summary["modalities"]["rna"].pop("chunked") is True
    assert chunked_summary == json.loads(json.dumps(summary))
    # the cells before QC, with their metrics, for the figures
    assert before["rna"].n_obs == 1020 and "pct_counts_mt" in before["rna"].obs


def test_the_qc_step_with_chunked_true_writes_what_the_next_stage_reads(tmp_path, tiny_mdata):
    rna_only = io.md.MuData({"rna": tiny_mdata["rna"].copy()})
    source = tmp_path / "ingest.h5mu"
    io.write_h5mu(rna_only, source)
    params = dict(PARAMS, n_top_genes=50, doublets={"detect": False}, chunked=True)
    argv = ["qc", "--dataset", "d", "--input", str(source), "--output", str(tmp_path / "qc.h5mu"),
            "--summary", str(tmp_path / "qc" / "qc.json"), "--figures", str(tmp_path / "qc" / "figures"),
            "--no-tracking", "--params", json.dumps(params)]
    assert cli.main(argv) == 0
    out = io.read_h5mu(tmp_path / "qc.h5mu")["rna"]
    assert out.var["highly_variable"].sum() == 50
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(1), 1e4, rtol=1e-4)
    assert json.loads((tmp_path / "qc" / "qc.json").read_text())["modalities"]["rna"]["chunked"] is True
    assert [p.name for p in (tmp_path / "qc" / "figures").iterdir()] == ["rna.png"]


def test_chunked_true_on_a_multimodal_dataset_is_one_line_naming_the_way_out(tmp_path, tiny_mdata):
    io.write_h5mu(tiny_mdata, tmp_path / "ingest.h5mu")
    with pytest.raises(InputError, match=r"ingest.h5mu: qc.chunked: true, but chunked QC takes RNA alone "
                                         r"\(this file holds .*prot.*\); set qc.chunked: auto or false"):
        qc_chunked.use_chunked(str(tmp_path / "ingest.h5mu"), True)
    assert qc_chunked.use_chunked(str(tmp_path / "ingest.h5mu"), "auto") is False


def test_the_config_qc_section_goes_to_either_path_as_it_is(tmp_path, tiny_mdata):
    """What a user does in a notebook: run_qc(mdata, **config["qc"]), qc.chunked included."""
    from virtualcell.config import validate_config

    section = validate_config({"datasets": {"d": {"source": "synthetic"}}})["qc"]
    assert section["chunked"] == "auto"
    section = {**section, "min_genes": 20, "min_counts": 100, "n_top_genes": 50, "doublets": {"detect": False}}
    rna_only = io.md.MuData({"rna": tiny_mdata["rna"].copy()})
    io.write_h5mu(rna_only, tmp_path / "in.h5mu")
    memory, summary = run_qc(io.read_h5mu(tmp_path / "in.h5mu"), **section)
    _, _, chunked = qc_chunked.run_qc_chunked(str(tmp_path / "in.h5mu"), str(tmp_path / "out.h5mu"), **section)
    assert chunked["cells_out"] == summary["cells_out"] == memory["rna"].n_obs
    with pytest.raises(TypeError, match="min_gene"):
        qc_chunked.run_qc_chunked(str(tmp_path / "in.h5mu"), str(tmp_path / "out2.h5mu"), min_gene=3)


def test_a_truncated_input_is_left_to_the_reader_whose_error_names_the_file(tmp_path, tiny_mdata):
    io.write_h5mu(io.md.MuData({"rna": tiny_mdata["rna"].copy()}), tmp_path / "ingest.h5mu")
    data = (tmp_path / "ingest.h5mu").read_bytes()
    (tmp_path / "ingest.h5mu").write_bytes(data[: len(data) // 2])
    for setting in ("auto", True):
        assert qc_chunked.use_chunked(str(tmp_path / "ingest.h5mu"), setting) is False
    with pytest.raises(InputError, match="ingest.h5mu"):
        io.read_h5mu(tmp_path / "ingest.h5mu")


def test_the_in_memory_figure_recomputes_metrics_an_ingested_file_already_carries(tiny_mdata):
    """Skipping the recomputation is for chunked QC's matrix-free cells only: a file's own (stale or
    partial) obs metrics do not stand in for QC's."""
    import matplotlib.pyplot as plt

    from virtualcell.qc import qc_figures

    mdata = io.md.MuData({"rna": tiny_mdata["rna"].copy()})
    mdata["rna"].obs["n_genes_by_counts"] = 0  # a column from an earlier analysis, without its siblings
    after, _ = run_qc(mdata, **dict(PARAMS, n_top_genes=50, doublets={"detect": False}))
    figure = qc_figures(mdata, after, PARAMS)["rna"]
    violins = figure.axes[0].collections
    assert violins and max(p.get_paths()[0].vertices[:, 1].max() for p in violins[:1]) > 0
    plt.close(figure)
