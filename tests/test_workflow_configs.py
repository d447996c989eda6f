"""Other configs end to end, each its own snakemake run in its own folder: the real CITE-seq,
spatial and time-course configs, RNA-only and pca5 simulators, sections, an own 5,000-cell h5ad,
cells measured in RNA alone, multiome, and a failing job.

Apart from tests/test_workflow.py (one shared run and its checks) so that the test runner's two
workers can take these one at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.workflow import job_rules, run_config, run_real_config, scheduled, snakemake, write_override
from virtualcell import tracking

pytestmark = [pytest.mark.workflow, pytest.mark.standalone]


def test_a_failing_job_marks_its_run_and_the_workflow_failed(tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file")
    override = write_override(tmp_path, f"datasets:\n  synthetic:\n    source: h5ad\n    path: {bad}\n"
                                   "    holdouts: [2]\nmlflow:\n  experiment: failing\n")
    done = snakemake(tmp_path, "results/synthetic/ingest.h5mu", extra_configs=[override], check=False)
    assert done.returncode != 0
    log = (tmp_path / "logs" / "synthetic" / "ingest.log").read_text().strip().splitlines()
    assert log[-1].startswith(f"error: {bad}: cannot be read as .h5ad")
    assert not (tmp_path / "results" / "synthetic" / "ingest.h5mu").exists()
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    status = {r.data.tags.get(tracking.TAG_RULE, "workflow"): r.info.status for r in runs}
    assert status == {"ingest": "FAILED", "workflow": "FAILED"}
    ingest = next(r for r in runs if r.data.tags.get(tracking.TAG_RULE) == "ingest")
    assert "cannot be read as .h5ad" in ingest.data.tags[tracking.TAG_ERROR]


def test_real_citeseq_config_runs_end_to_end(tmp_path):
    """config/real_citeseq.yaml on the real 10x CITE-seq files."""
    run_real_config(tmp_path, "real_citeseq.yaml", "pbmc_10k_protein_v3_mtx")
    metrics = json.loads((tmp_path / "results" / "pbmc_citeseq" / "evaluate" / "metrics.json").read_text())
    assert "simulation" not in metrics  # no time points, no simulator
    foscttm = metrics["alignment"]["rna-prot"]["foscttm"]
    assert foscttm["model"] < foscttm["random"]
    ingest = (tmp_path / "logs" / "pbmc_citeseq" / "ingest.log").read_text()
    assert "'rna.cells': 1024" in ingest and "'prot.features': 17" in ingest
    assert job_rules(tmp_path, "virtualcell-real-citeseq") == [
        "align", "embed", "evaluate", "ingest", "pair", "qc", "workflow"]


def test_real_spatial_config_aligns_spots_with_their_image_patches(tmp_path):
    """config/real_spatial.yaml: a real Visium crop and its H&E image, spot expression <-> image patch."""
    run_real_config(tmp_path, "real_spatial.yaml", "visium_mouse_brain_crop.h5ad")
    results = tmp_path / "results" / "mouse_brain_crop"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    # the predictor's energy of spot <-> patch pairs, and each spot's expression from its image patch alone
    assert set(metrics) == {"dataset", "alignment", "energy", "prediction"}
    from_image = metrics["prediction"]["rna_from_image"]["pearson_per_gene"]
    print("expression from the image patch, mean per-gene r on 10 test spots:", from_image)
    assert set(from_image) == {"model", "model_ring", "bleep", "cca", "knn", "ridge", "random"}
    assert all(-1 <= v <= 1 for v in from_image.values())
    retrieval = metrics["alignment"]["rna-image"]
    print("rna-image retrieval on 10 test spots:", retrieval)
    assert set(retrieval["foscttm"]) == {"model", "cca", "random"}
    assert all(0 <= v <= 1 for section in retrieval.values() for v in section.values())
    shared = ad.read_h5ad(results / "align" / "shared.h5ad")
    assert shared.n_obs == 49 and shared.uns["partner"] == "image"
    assert shared.obsm["X_input_image"].shape == (49, 3 * 32 * 32)
    assert shared.obsm["X_predicted_rna"].shape == shared.shape
    # the spots' neighbour graph (pair's, squidpy's layout) reaches the shared space's file
    assert shared.obsp["spatial_connectivities"].shape == (49, 49) and shared.obsp["spatial_connectivities"].nnz > 49
    assert job_rules(tmp_path, "virtualcell-real-spatial") == [
        "align", "embed", "evaluate", "ingest", "pair", "qc", "workflow"]
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("virtualcell-real-spatial").experiment_id])
    by_rule = {r.data.tags.get(tracking.TAG_RULE): r.info.run_id for r in runs}
    # the spot <-> patch pairs as the aligner sees them, and the counts per spot over the tissue image
    assert "image_patches.png" in {a.path for a in client.list_artifacts(by_rule["pair"])}
    assert "qc/spatial.png" in {a.path for a in client.list_artifacts(by_rule["qc"], "qc")}


def test_real_time_course_published_as_log_values_runs_end_to_end(tmp_path):
    """config/real_timecourse.yaml as its header says (the file built by virtualcell.examples), on fewer
    seeds and epochs: a real RNA-only series of log values, its interior time point held out and scored
    in pca5 beside interpolation, the decoder's own floor and the other baselines."""
    import yaml

    done = subprocess.run([sys.executable, "-m", "virtualcell.examples", "arabidopsis_root",
                           "data/arabidopsis_root.h5ad", "--cells-per-stage", "100"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load((REPO / "config" / "real_timecourse.yaml").read_text())
    config["embed"]["epochs"] = 20
    config["simulate"] |= {"epochs": 15, "decoder_epochs": 10, "n_hidden": 64}
    config["evaluate"] |= {"seeds": 1, "fate_rollouts": 5, "n_steps": 20}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_config(tmp_path, tmp_path / "config.yaml")
    results = tmp_path / "results" / "arabidopsis_root"
    qc = json.loads((results / "qc" / "qc.json").read_text())
    assert qc["values"] == "log" and "doublets" in qc["modalities"]["rna"]["skipped"]
    assert "Gaussian on log expression" in (tmp_path / "logs" / "arabidopsis_root" / "embed.log").read_text()
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    held = metrics["simulation"]["holdouts"]["1"]["w1_pca5"]
    print("real time course, held-out elongation zone, W1 in pca5:", held)
    assert {"model", "ot_interp", "copy_prev", "copy_next", "decoded_truth", "noise_floor"} <= set(held)
    assert "oracle" not in held  # real data: no truth to sample
    assert all(np.isfinite(v) and v > 0 for v in held.values())
    fates = ad.read_h5ad(results / "evaluate" / "fates.h5ad")
    np.testing.assert_allclose(fates.obsm["fate_probabilities"].to_numpy().sum(1), 1.0, atol=1e-6)
    assert job_rules(tmp_path, "virtualcell-real-timecourse") == [
        "decode", "embed", "evaluate", "ingest", "pair", "qc", "report", "simulate", "simulate", "simulate",
        "workflow"]
    # the virtual cell reads the series' log values as published: the meristem cells, one stage on
    source = ad.read_h5ad(tmp_path / "data" / "arabidopsis_root.h5ad")
    source[source.obs["time"] == 0].copy().write_h5ad(tmp_path / "meristem.h5ad")
    done = subprocess.run([sys.executable, "-m", "virtualcell.cli", "predict", "--model",
                           "models:/virtualcell-arabidopsis_root/latest", "--input", "meristem.h5ad", "--horizon", "1",
                           "--output", "answer.h5ad"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert done.returncode == 0, done.stderr[-3000:]
    answer = ad.read_h5ad(tmp_path / "answer.h5ad")
    assert answer.uns["virtualcell"]["space"] == "rna_latent" and answer.uns["virtualcell"]["n_missing_genes"] == 0
    # the cells' own values are the published ones (log values are read as they are)
    genes = list(answer.var_names)
    np.testing.assert_allclose(answer.X, source[source.obs["time"] == 0][:, genes].X.toarray(), atol=1e-5)


def test_rna_only_dataset_skips_the_alignment_and_simulates_in_the_rna_latent(tmp_path):
    """modalities: [rna] (time-resolved scRNA-seq without protein): no align job, the simulator and the
    evaluation run in the RNA encoder's latent space, and the model is still registered."""
    override = write_override(tmp_path, "datasets:\n  synthetic:\n    modalities: [rna]\n"
                                   "mlflow:\n  experiment: rna-only\n")
    jobs = scheduled(snakemake(tmp_path, "-n", extra_configs=[override]))
    assert jobs == {"ingest": 1, "qc": 1, "pair": 1, "embed": 1, "decode": 1, "simulate": 3, "perturb": 3, "perturb_model": 1,
                    "evaluate": 1, "report": 1, "all": 1}
    snakemake(tmp_path, extra_configs=[override])
    results = tmp_path / "results" / "synthetic"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert "alignment" not in metrics
    assert metrics["simulation"]["space"] == "rna_latent"
    w1 = metrics["simulation"]["holdouts"]["2"]["w1_rna_latent"]
    print("rna-only W1 at t=2:", w1, metrics["simulation"]["holdouts"]["2"]["w1_pca5"])
    assert w1["model"] < w1["copy_prev"]
    assert "w1_pca5" in metrics["simulation"]["holdouts"]["2"] and "fate" in metrics
    model = json.loads((results / "report" / "model.json").read_text())
    assert model["state_dim"] == 10 and model["space"] == "rna_latent"  # embed.n_latent: the RNA latent space


def test_a_simulator_in_pca5_speaks_genes_through_the_inverse_projection(tmp_path):
    """simulate.space: pca: no decoder job; the simulator runs in pca5 and the registered virtual cell
    takes counts to pca5 and back to genes through the projection itself."""
    import mudata as md

    # no perturbed cells (nor perturb jobs): this test is about the simulator's space
    override = write_override(tmp_path, "datasets:\n  synthetic:\n    modalities: [rna]\n"
                                   "    generator:\n      cells_per_condition: 0\n"
                                   "simulate:\n  space: pca\nevaluate:\n  seeds: 1\n"
                                   "mlflow:\n  experiment: pca-space\n")
    snakemake(tmp_path, extra_configs=[override])
    results = tmp_path / "results" / "synthetic"
    assert not (results / "simulate" / "decoder.pt").exists()
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert metrics["simulation"]["space"] == "pca5"
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    cell = mlflow.pyfunc.load_model("models:/virtualcell-synthetic/latest").unwrap_python_model().cell
    assert cell.space == "pca5" and cell.decoder is None and cell.encoder is None
    rna = md.read_h5mu(results / "pairs" / "paired.h5mu").mod["rna"]
    counts = rna.layers["counts"][:50]
    counts = counts.toarray() if hasattr(counts, "toarray") else counts
    answer = cell.predict(counts, list(rna.var_names), horizon=0.0)
    # no time passes: the state is the cell's own pca5 coordinates, as the embed step computed them
    emb = ad.read_h5ad(results / "embed" / "embeddings.h5ad")
    np.testing.assert_allclose(answer.start, emb.obsm["X_pca5"][:50], atol=1e-3)
    np.testing.assert_allclose(answer.end, answer.start)


def test_the_default_dataset_as_a_section_alone_plans_no_simulator(tmp_path):
    """modalities [spatial] on the default synthetic dataset (whose time_key names the cells' time):
    the spots carry no time, so there is no simulate or report job."""
    override = write_override(tmp_path, "datasets:\n  synthetic:\n    modalities: [spatial]\n")
    jobs = scheduled(snakemake(tmp_path, "-n", extra_configs=[override]))
    assert jobs == {"ingest": 1, "qc": 1, "pair": 1, "embed": 1, "align": 1, "evaluate": 1, "all": 1}


def test_a_synthetic_section_aligns_spot_expression_with_the_tissue_under_it(tmp_path):
    """modalities [spatial] on the generator's section, whose image is rendered from the cells under
    each spot: the spot <-> patch alignment must find the spot's own patch far better than chance and
    than CCA on the patches' principal components. (The real Visium crop has 49 spots, too few to
    show this; here there are 480 in tissue.)"""
    config = tmp_path / "section.yaml"
    config.write_text("datasets:\n  section:\n    source: synthetic\n    modalities: [spatial]\n"
                      "    generator: {n_cells: 100, n_genes: 200, n_spots: 600}\n"
                      "embed: {epochs: 40}\nalign: {epochs: 40}\nmlflow: {experiment: section}\n")
    run_config(tmp_path, config)
    metrics = json.loads((tmp_path / "results" / "section" / "evaluate" / "metrics.json").read_text())
    foscttm = metrics["alignment"]["rna-image"]["foscttm"]
    print("synthetic section, spot <-> patch FOSCTTM:", foscttm)
    assert foscttm["model"] < 0.2 < foscttm["random"]
    assert foscttm["model"] < foscttm["cca"]
    # each spot's expression from the patch under it alone: the image shows which cell types lie there
    from_image = metrics["prediction"]["rna_from_image"]["pearson_per_gene"]
    print("synthetic section, expression from the image patch, mean per-gene r:", from_image)
    assert from_image["model"] > from_image["random"] + 0.1
    assert "simulation" not in metrics  # spots carry no time


def test_an_own_h5ad_of_5000_cells_in_one_batch_runs_through_every_stage(tmp_path):
    """A user's own time course as an .h5ad (raw counts, one batch, 6 time points, RNA only) at the
    size where scanpy's scrublet used to crash (issue 10: approximate neighbours above ~4,100 cells
    in a batch, a csr_array scanpy could not read): every stage runs, the simulator included."""
    from virtualcell.synthetic import generate

    rna = generate(n_cells=5200, n_genes=600, n_proteins=4, n_spots=16, seed=1)["rna"]
    own = ad.AnnData(X=rna.X, obs=pd.DataFrame({"day": rna.obs["time"].to_numpy()}, index=rna.obs_names),
                     var=pd.DataFrame(index=rna.var_names))
    own.write_h5ad(tmp_path / "own.h5ad")
    config = write_override(tmp_path, f"""datasets:
  own:
    source: h5ad
    path: {tmp_path / 'own.h5ad'}
    modalities: [rna]
    time_key: day
    holdouts: [2]
qc:
  n_top_genes: 300
embed: {{n_hidden: 32, epochs: 4, batch_size: 256}}
simulate: {{n_hidden: 32, epochs: 10, decoder_epochs: 5, batch_size: 128, n_steps: 20}}
evaluate: {{seeds: 1, extrapolate: false, fate_rollouts: 3, max_points: 300, n_steps: 20}}
mlflow:
  experiment: own-5000
""")
    run_config(tmp_path, config)
    results = tmp_path / "results" / "own"
    qc = json.loads((results / "qc" / "qc.json").read_text())
    doublets = qc["modalities"]["rna"]["doublets"]
    assert doublets["detected"] and doublets["scored"] > 4500  # one batch, every kept cell scored
    assert qc["cells_out"] > 4500 and qc["highly_variable_genes"] == 300
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert set(metrics["simulation"]["holdouts"]) == {"2"}
    assert job_rules(tmp_path, "own-5000") == [
        "decode", "embed", "evaluate", "ingest", "pair", "qc", "report", "simulate", "simulate", "workflow"]
    # Snakemake's own benchmark record of each job: wall time and peak memory
    bench = pd.read_csv(tmp_path / "benchmarks" / "own" / "qc.tsv", sep="\t")
    assert bench["s"].iloc[0] > 0 and bench["max_rss"].iloc[0] > 0


def test_cells_measured_in_rna_alone_are_kept_and_get_their_protein_from_rna(tmp_path):
    """A CITE-seq .h5mu where a fifth of the cells lost their protein (and some protein barcodes have no
    RNA): the RNA-only cells go through every stage, marked and counted; align fills in their protein
    from their RNA, and that fill-in tracks the protein they really had (withheld from the file)."""
    import mudata as md

    from virtualcell.crossmodal import pearson_per_feature
    from virtualcell.qc import clr
    from virtualcell.synthetic import generate

    full = generate(n_cells=1200, n_genes=200, n_proteins=10, n_spots=16, seed=3)
    rna, prot = full["rna"], full["prot"]
    rng = np.random.default_rng(0)
    lost = rng.choice(rna.n_obs, size=rna.n_obs // 5, replace=False)
    has = np.ones(rna.n_obs, dtype=bool)
    has[lost] = False
    orphans = prot[:25].copy()
    orphans.obs_names = [f"protein_only_{i}" for i in range(25)]
    kept_prot = ad.concat([prot[has], orphans], merge="same")
    own = md.MuData({"rna": rna.copy(), "prot": kept_prot})
    own.write_h5mu(tmp_path / "own.h5mu")
    config = write_override(tmp_path, f"""datasets:
  partial:
    source: h5mu
    path: {tmp_path / 'own.h5mu'}
    modalities: [rna, prot]
    celltype_key: fate
qc: {{n_top_genes: 200}}
embed: {{n_hidden: 32, epochs: 15, batch_size: 128}}
align: {{n_shared: 8, n_hidden: 32, epochs: 15, batch_size: 128, predictor_epochs: 40}}
mlflow:
  experiment: partial
""")
    run_config(tmp_path, config)
    results = tmp_path / "results" / "partial"
    qc = json.loads((results / "qc" / "qc.json").read_text())["modalities"]["prot"]
    assert qc["cells_without_rna_removed"] == 25
    shared = ad.read_h5ad(results / "align" / "shared.h5ad")
    rna_only = (shared.obs["modalities"] == "rna").to_numpy()
    assert rna_only.sum() == qc["cells_with_rna_only"] and rna_only.sum() > 0.9 * len(lost)
    assert set(shared.obs_names[rna_only]) <= set(rna.obs_names[lost])
    # every cell has a state; only the paired ones have a measured protein or a joint latent
    assert np.isfinite(shared.obsm["X_shared"]).all() and np.isfinite(shared.obsm["X_predicted_prot"]).all()
    assert np.isnan(shared.obsm["X_input_prot"][rna_only]).all()
    assert np.isfinite(shared.obsm["X_input_prot"][~rna_only]).all()
    assert np.isnan(shared.obsm["X_joint"][rna_only]).all() and np.isfinite(shared.obsm["X_joint"][~rna_only]).all()
    # the fill-in: the RNA-only cells' protein from their RNA against the protein they had
    names = shared.obs_names[rna_only]
    truth = clr(prot[names].X)  # the generator keeps counts in X
    truth = np.asarray(truth.toarray() if hasattr(truth, "toarray") else truth)
    order = [list(prot.var_names).index(p) for p in shared.uns["partner_features"]]
    r = pearson_per_feature(shared.obsm["X_predicted_prot"][rna_only], truth[:, order])
    print("RNA-only cells, protein filled in from RNA, mean per-protein r:", float(np.nanmean(r)))
    assert np.nanmean(r) > 0.6
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    protein = metrics["prediction"]["protein_from_rna"]["pearson_per_protein"]
    assert protein["model"] > protein["random"] + 0.3
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("partial").experiment_id])
    pair_run = next(r for r in runs if r.data.tags.get(tracking.TAG_RULE) == "pair")
    assert pair_run.data.metrics["pair/cells.rna_only"] == rna_only.sum()
    assert pair_run.data.metrics["pair/cells.prot"] == (~rna_only).sum()


def test_multiome_config_aligns_rna_with_atac_and_predicts_each_peak_from_rna(tmp_path):
    """config/multiome.yaml (RNA + ATAC of the same cells), shrunk to a few hundred cells: the rna-atac
    alignment finds a cell's own peaks far better than chance, align's predictor ranks the cells whose
    peak is open above those where it is closed, and the time course is simulated in the shared space."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "multiome.yaml").read_text())
    config["datasets"]["multiome"]["generator"] |= {"n_cells": 400, "n_genes": 120, "n_peaks": 600,
                                                    "time_points": [0, 1, 2, 3, 4]}
    config["qc"] |= {"n_top_genes": 100, "atac": {"min_counts": 20, "min_features": 20, "n_components": 20}}
    config["embed"] = {"n_hidden": 32, "epochs": 10, "batch_size": 128}
    config["align"] = {"n_hidden": 32, "epochs": 20, "predictor_epochs": 30, "batch_size": 128}
    config["simulate"] = {"n_hidden": 32, "epochs": 10, "steps_per_epoch": 4, "decoder_epochs": 5, "batch_size": 64,
                          "n_steps": 20}
    config["evaluate"] = {"seeds": 1, "extrapolate": False, "fate_rollouts": 5, "max_points": 300, "n_steps": 20}
    path = tmp_path / "multiome.yaml"
    path.write_text(yaml.safe_dump(config))
    run_config(tmp_path, path)
    results = tmp_path / "results" / "multiome"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    alignment = metrics["alignment"]["rna-atac"]
    assert set(alignment) >= {"foscttm", "top1", "top5", "match_prob"}
    assert all(set(alignment[k]) == {"model", "cca", "random"} for k in ("foscttm", "top1", "top5", "match_prob"))
    auroc = metrics["prediction"]["atac_from_rna"]["auroc_per_peak"]
    assert set(auroc) == {"model", "cca", "knn", "ridge", "random"}
    print("tiny multiome: rna-atac FOSCTTM", alignment["foscttm"], "per-peak AUROC", auroc)
    assert alignment["foscttm"]["model"] < alignment["foscttm"]["random"] - 0.15
    assert auroc["model"] > 0.6 and abs(auroc["random"] - 0.5) < 0.05
    assert metrics["simulation"]["space"] == "shared" and "2" in metrics["simulation"]["holdouts"]
    paired = ad.read_h5ad(results / "align" / "shared.h5ad")
    assert paired.uns["partner"] == "atac" and paired.obsm["X_input_atac"].shape[1] == 20  # the peaks' LSI
    assert "multiome" in (results / "report" / "model.json").read_text()
    # The virtual cell speaks peaks: test cells' RNA in, each peak's predicted accessibility out, ranking the
    # cells whose peak is open above those where it is closed.
    import mudata as md

    from virtualcell.crossmodal import auroc_per_feature

    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    cell = mlflow.pyfunc.load_model("models:/virtualcell-multiome/latest").unwrap_python_model().cell
    mdata = md.read_h5mu(results / "pairs" / "paired.h5mu")
    test = paired.obs_names[paired.obs["split"] == "test"]
    counts = mdata.mod["rna"][test].layers["counts"]
    answer = cell.predict(counts.toarray() if hasattr(counts, "toarray") else counts,
                          list(mdata.mod["rna"].var_names), horizon=0.0)
    peaks = mdata.mod["atac"]
    assert answer.partner_kind == "atac" and answer.partner_features == list(peaks.var_names)
    frame = answer.frame()
    assert sum(c.startswith("atac:") for c in frame.columns) == peaks.n_vars
    measured = peaks[test].layers["counts"]
    open_ = np.asarray((measured.toarray() if hasattr(measured, "toarray") else measured) > 0)
    assert np.nanmean(auroc_per_feature(answer.partner, open_)) > 0.6
    assert job_rules(tmp_path, "virtualcell-multiome") == [
        "align", "decode", "embed", "evaluate", "ingest", "pair", "qc", "report", "simulate", "simulate", "workflow"]
