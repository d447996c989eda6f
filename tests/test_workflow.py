"""The whole workflow on config/test.yaml, as a user runs it: the snakemake command line.

One module-scoped run (about four minutes on 2 cores) is shared by the checks of
its outputs, its MLflow records, the registered model and the rerun rules. Other
configs, each a run of its own, are in tests/test_workflow_configs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.workflow import JOBS, scheduled, snakemake, write_override
from virtualcell import tracking

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir)
    snakemake(workdir, "--report", "results/report.html")
    return workdir


@pytest.fixture(scope="module")
def client(workflow_run):
    uri = tracking.resolve_tracking_uri(f"sqlite:///{workflow_run}/results/mlflow.db")
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def test_outputs_and_metrics(workflow_run):
    results = workflow_run / "results" / "synthetic"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert metrics["dataset"] == "synthetic"
    held = metrics["simulation"]["holdouts"]["2"]
    for space in ("pca5", "shared"):  # the literature's space, and the simulator's own beside it
        w1 = held[f"w1_{space}"]
        baselines = {"model", "ot_interp", "copy_prev", "copy_next", "random_coupling", "noise_floor"}
        # pca5 also has the oracle (the truth's fresh sample) and decoded_truth (the held-out cells'
        # own states through the decoder: what decoding alone costs)
        assert set(w1) == baselines | ({"oracle", "decoded_truth"} if space == "pca5" else set())
        assert all(np.isfinite(v) and v >= 0 for v in w1.values())
    assert {"w2_pca5", "mmd_pca5", "edist_pca5", "std"} <= set(held)
    # a fresh sample of the truth is closer to the real cells than OT interpolation and copying are
    w1 = held["w1_pca5"]
    assert w1["oracle"] < min(w1["ot_interp"], w1["copy_prev"], w1["copy_next"])
    assert np.isfinite(held["gap_closed"]) and metrics["simulation"]["mean"]["gap_closed"] == held["gap_closed"]
    extrap = metrics["simulation"]["extrapolation"]["4"]["w1_pca5"]
    assert {"model", "copy_last", "ot_extrap", "oracle", "noise_floor"} <= set(extrap)
    assert set(metrics["simulation"]["rollout"]) == {"1", "2", "3", "4"}
    fate = metrics["fate"]
    assert set(fate["pearson_r"]) == {"model", "no_dynamics"} and -1 <= fate["pearson_r"]["model"] <= 1
    assert 0 <= fate["calibration_error"]["model"] <= 1
    fates = ad.read_h5ad(results / "evaluate" / "fates.h5ad")
    probs = fates.obsm["fate_probabilities"]
    assert np.allclose(probs.sum(axis=1), 1) and set(probs.columns) <= {"progenitor", "fate_A", "fate_B"}
    assert (fates.obs["time"] < 4).all() and "truth_fate_probabilities" in fates.obsm
    retrieval = metrics["alignment"]["rna-prot"]
    assert set(retrieval) == {"foscttm", "top1", "top5", "match_prob"}
    assert retrieval["foscttm"]["model"] < retrieval["foscttm"]["random"]
    # beside it, the best any method could do (the generator's truth), knowing the RNA depth and not
    assert set(retrieval["foscttm"]) == {"model", "cca", "random", "oracle", "oracle_state"}
    assert retrieval["foscttm"]["oracle"] <= min(retrieval["foscttm"]["model"], retrieval["foscttm"]["oracle_state"])
    shared = ad.read_h5ad(results / "align" / "shared.h5ad")
    # cells are matched with their depths; their states (what the simulator moves) are depth-neutral
    assert {"X_match_rna", "X_match_prot"} <= set(shared.obsm) and "log_depth_prot" in shared.obs
    depth = shared.obs["log_depth_rna"].to_numpy()
    assert max(abs(np.corrcoef(shared.obsm["X_shared"][:, k], depth)[0, 1]) for k in range(shared.obsm["X_shared"].shape[1])) \
        < max(abs(np.corrcoef(shared.obsm["X_match_rna"][:, k], depth)[0, 1]) for k in range(shared.obsm["X_match_rna"].shape[1]))
    # protein from RNA alone, beside its baselines on the same held-out cells; the energy of true pairs
    # is below that of shuffled ones; compression compares the joint embeddings with RNA alone
    protein = metrics["prediction"]["protein_from_rna"]
    assert set(protein) == {"pearson_per_protein", "pearson_per_cell"}
    assert set(protein["pearson_per_protein"]) == {"model", "cca", "knn", "ridge", "random"}
    assert protein["pearson_per_protein"]["model"] > protein["pearson_per_protein"]["random"] + 0.3
    # and the other way: RNA (the log-normalised HVGs align's output holds in X) from the protein alone
    rna = metrics["prediction"]["rna_from_protein"]
    assert set(rna["pearson_per_gene"]) == {"model", "bleep", "cca", "knn", "ridge", "random"}
    assert rna["pearson_per_gene"]["model"] > rna["pearson_per_gene"]["random"] + 0.1
    assert shared.obsm["X_predicted_rna"].shape == shared.shape and shared.n_vars > 50
    assert metrics["energy"]["paired"] < metrics["energy"]["shuffled"]
    assert set(metrics["compression"]) == {"knn_fate", "r2_latent"}
    assert set(metrics["compression"]["r2_latent"]) == {"rna", "joint", "shared"}
    assert (results / "evaluate" / "prediction.png").stat().st_size > 20_000
    assert (workflow_run / "results" / "report.html").stat().st_size > 10_000
    assert (results / "evaluate" / "embeddings.png").stat().st_size > 20_000  # UMAPs of the embeddings
    assert (results / "evaluate" / "alignment.png").stat().st_size > 20_000  # retrieval curves, similarity
    # the report opens on a page saying what won, each headline beside its baseline
    page = (results / "report" / "summary.html").read_text()
    assert page.count(" won</b>") >= 4 and f"{w1['ot_interp']:.3f}" in page
    for figure in ["qc/figures/rna.png", "qc/figures/prot.png", "qc/figures/spatial.png",
                   "embed/loss.png", "align/loss.png", "simulate/2/seed0/trajectories.png",
                   "simulate/last/seed0/trajectories.png", "simulate/none/seed0/trajectories.png",
                   "evaluate/evaluation.png", "evaluate/fates.png"]:
        assert (results / figure).stat().st_size > 1000, figure


def test_held_out_conditions_are_predicted_beside_their_baselines(workflow_run):
    from virtualcell.perturbation_metrics import METRICS
    from virtualcell.synthetic_conditions import planned

    results = workflow_run / "results" / "synthetic"
    section = json.loads((results / "evaluate" / "metrics.json").read_text())["perturbation"]
    _, held = planned({"n_genes": 120, "seed": 0})
    assert set(section["conditions"]) == set(held) and set(section["mean"]) <= set(METRICS)
    combination = next(h for h in held if "+" in h)
    for name, scores in section["conditions"].items():
        expected = {"model", "control", "mean_perturbed", "linear", "ceiling"} | (
            {"additive"} if name == combination else set())
        for metric in ("edist_pca5", "w1_pca5", "mmd_pca5", "pearson_delta_all", "pearson_delta_top20",
                       "pearson_delta_centroid", "mse_top20", "discrimination"):
            assert set(scores[metric]) == expected, (name, metric)
        # half of the real cells predicts the other half better than no change at all
        assert scores["pearson_delta_top20"]["ceiling"] > scores["pearson_delta_top20"]["control"]
        assert (results / "perturb" / name / "response.png").stat().st_size > 20_000
        assert section["fate"][name]["true"] and set(section["fate_error"][name]) >= expected - {"additive"}
    # the combination of two seen knock-downs: the model moves the right genes the right way
    assert section["conditions"][combination]["pearson_delta_top20"]["model"] > 0.5
    cells = ad.read_h5ad(results / "perturb" / combination / "predicted.h5ad")
    assert cells.uns["perturbation"]["condition"] == combination and cells.n_obs > 10
    # the time course is the control's: no perturbed cell reached the shared space
    shared = ad.read_h5ad(results / "align" / "shared.h5ad")
    assert (shared.obs["condition"].astype(str) == "control").all()


def test_mlflow_has_a_parent_run_and_a_finished_child_run_per_job(workflow_run, client):
    experiment = client.get_experiment_by_name("virtualcell-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "workflow"]
    children = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags[tracking.TAG_RULE] for r in children) == sorted(JOBS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags[tracking.TAG_JOBID].isdigit()
        assert run.data.params, run.data.tags[tracking.TAG_RULE]
        names = {a.path for a in client.list_artifacts(run.info.run_id, "files")}
        assert names == {"files/inputs.json", "files/outputs.json"}
    by_rule = {r.data.tags[tracking.TAG_RULE]: r for r in children}
    # lineage: each job names the runs whose outputs it read
    assert by_rule["qc"].data.tags[tracking.TAG_UPSTREAM] == by_rule["ingest"].info.run_id
    assert by_rule["align"].data.tags[tracking.TAG_UPSTREAM].count(",") == 1
    assert by_rule["align"].data.tags["align.depth_used"] == "true"  # CITE-seq counts: depth applies
    # per-epoch training metrics
    history = client.get_metric_history(by_rule["embed"].info.run_id, "embed/rna.loss")
    assert [m.step for m in history] == list(range(len(history))) and len(history) == 8
    assert by_rule["evaluate"].data.metrics["evaluate/simulation.mean.w1_pca5.model"] >= 0
    assert "evaluate/fate.pearson_r.model" in by_rule["evaluate"].data.metrics
    # every metric reads <stage>/<metric>, so the compare view lines runs of different configs up by stage
    assert all(k.startswith(f"{rule}/") for rule, r in by_rule.items() for k in r.data.metrics)


def test_registered_model_simulates_states(workflow_run, client):
    versions = client.search_model_versions("name='virtualcell-synthetic'")
    assert [int(v.version) for v in versions] == [1]  # registered once, by the report job
    model = mlflow.pyfunc.load_model("models:/virtualcell-synthetic/1")
    import anndata as ad

    shared = ad.read_h5ad(workflow_run / "results" / "synthetic" / "align" / "shared.h5ad")
    x = np.asarray(shared.obsm["X_shared"][:20], dtype=np.float64)
    frame = tracking.simulator_input_example(x, t_start=0.0, horizon=2.0)
    out = model.predict(frame)
    assert out.shape == (20, x.shape[1]) and np.isfinite(out.to_numpy()).all()
    assert not np.allclose(out.to_numpy(), x, atol=1e-3)  # cells move in two time units
    still = model.predict(tracking.simulator_input_example(x, t_start=1.0, horizon=0.0))
    np.testing.assert_allclose(still.to_numpy(), x, atol=1e-5)  # a zero horizon leaves them in place


@pytest.fixture(scope="module")
def raw_cells(workflow_run):
    """Cells as a user has them: raw counts of every measured gene (QC's filtered ones too), gene names as
    columns, with their time and the real cells' pca5 coordinates by time."""
    import mudata as md

    results = workflow_run / "results" / "synthetic"
    rna = md.read_h5mu(results / "ingest.h5mu").mod["rna"]
    shared = ad.read_h5ad(results / "align" / "shared.h5ad")
    rna = rna[shared.obs_names]
    counts = rna.layers["counts"]
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    frame = pd.DataFrame(counts, columns=list(rna.var_names), index=rna.obs_names)
    return {"frame": frame, "time": shared.obs["time"].to_numpy(dtype=float), "shared": shared}


def test_registered_model_speaks_genes(workflow_run, client, raw_cells):
    """Counts with gene names in; simulated expression, states and fates out, moving cells as the real ones
    move; unknown genes ignored and missing ones zero-filled, with a warning that counts them."""
    from virtualcell import evaluate, reference

    model = mlflow.pyfunc.load_model("models:/virtualcell-synthetic/1")
    version = client.get_model_version("virtualcell-synthetic", "1")
    assert "cells x genes (gene names as columns, raw counts) in" in version.description and "heldout.w1_pca5.model" in version.tags
    assert model.metadata.get_params_schema() is not None and model.input_example is not None
    cell = model.unwrap_python_model().cell
    frame, t, shared = raw_cells["frame"], raw_cells["time"], raw_cells["shared"]
    start = frame[t == 0]
    # a user's panel: two of the model's genes not measured, one gene it never saw
    dropped = cell.genes[:2]
    panel = start.drop(columns=dropped).assign(NOT_A_GENE=1.0)
    with pytest.warns(UserWarning, match=r"2 of the model's \d+ genes are missing.*[1-9]\d* input genes"):
        out = model.predict(panel, params={"horizon": 3.0, "seed": 0})
    genes = cell.output_genes
    assert list(out.columns[: len(genes)]) == genes and len(out) == len(panel)
    fates = out[[f"p_{f}" for f in cell.fate_names]].to_numpy()
    np.testing.assert_allclose(fates.sum(axis=1), 1, atol=1e-6)
    # the same question, the same answer
    again = model.predict(panel, params={"horizon": 3.0, "seed": 0})
    pd.testing.assert_frame_equal(out, again)
    # genes in, judged in the literature's space: the simulated cells at t=3 are nearer the real t=3 cells
    # than the cells they started from are
    ref = reference.from_uns(shared.uns["pca5"])
    real = np.asarray(shared.obsm["X_pca5"])
    simulated = reference.project(out[genes].to_numpy(), ref)
    assert evaluate.wasserstein(simulated, real[t == 3]) < evaluate.wasserstein(real[t == 0], real[t == 3])
    # a cell's state from its RNA alone lies near its state with protein (the shared space)
    states = cell.states(cell.match_genes(start.to_numpy(), list(start.columns))[0])
    cosine = np.sum(states * np.asarray(shared.obsm["X_shared"])[t == 0], axis=1)
    assert np.median(cosine) > 0.9
    # and its protein, predicted from the RNA alone, follows the protein measured on the cells (all times:
    # at t=0 every cell is a progenitor and the proteins vary by noise alone)
    everyone = model.predict(frame, params={"horizon": 0.0, "n_rollouts": 1})
    proteins = [c for c in everyone.columns if c.startswith("prot:")]
    assert len(proteins) == len(cell.partner_features) > 0
    measured = np.asarray(shared.obsm["X_input_prot"])
    r = [np.corrcoef(everyone[c].to_numpy(), measured[:, j])[0, 1] for j, c in enumerate(proteins)]
    assert np.nanmedian(r) > 0.5


def test_served_model_answers_a_post_of_counts(workflow_run, raw_cells, tmp_path):
    """`mlflow models serve` answers cells posted as JSON (split orient) as the model does in Python."""
    import urllib.request

    from tests.services import model_server

    uri = tracking.resolve_tracking_uri(f"sqlite:///{workflow_run}/results/mlflow.db")
    cells = raw_cells["frame"][raw_cells["time"] == 1].iloc[:25]
    params = {"horizon": 2.0, "t_start": 1.0, "seed": 3}
    body = {"dataframe_split": {"columns": list(cells.columns), "data": cells.astype(int).to_numpy().tolist()},
            "params": params}
    with model_server("models:/virtualcell-synthetic/1", tracking_uri=uri, folder=tmp_path) as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    served = pd.DataFrame(answer["predictions"])
    local = mlflow.pyfunc.load_model("models:/virtualcell-synthetic/1").predict(cells, params=params)
    assert served.shape == local.shape and list(served.columns) == list(local.columns)
    np.testing.assert_allclose(served.to_numpy(dtype=float), local.to_numpy(dtype=float), rtol=1e-4, atol=1e-4)


def test_predict_command_writes_an_h5ad(workflow_run, raw_cells, tmp_path):
    """`virtualcell predict` on an .h5ad of raw counts writes the answer into documented slots; log
    values where counts belong end in one line naming the file."""
    frame, t = raw_cells["frame"], raw_cells["time"]
    cells = ad.AnnData(X=frame[t == 0].to_numpy(dtype=np.float32), var=pd.DataFrame(index=frame.columns),
                       obs=pd.DataFrame(index=frame.index[t == 0]))
    cells.layers["counts"] = cells.X.copy()
    cells.X = np.log1p(cells.X)  # as scanpy users keep it: log values in X, counts in a layer
    cells.write_h5ad(tmp_path / "cells.h5ad")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}

    def predict(source: str, output: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "virtualcell.cli", "predict", "--model", "models:/virtualcell-synthetic/latest",
               "--input", str(tmp_path / source), "--horizon", "2", "--output", str(tmp_path / output), *extra]
        return subprocess.run(cmd, cwd=workflow_run, env=env, capture_output=True, text=True, timeout=300)

    done = predict("cells.h5ad", "out.h5ad")
    assert done.returncode == 0, done.stderr[-3000:]
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.n_obs == cells.n_obs and out.layers["simulated"].shape == out.shape
    assert out.obsm["X_state"].shape == out.obsm["X_state_simulated"].shape
    assert np.allclose(out.obsm["fate_probabilities"].sum(axis=1), 1)
    assert set(out.obs["predicted_fate"]) <= set(out.obsm["fate_probabilities"].columns)
    assert out.uns["virtualcell"]["t_end"] == 2.0
    assert not np.allclose(out.layers["simulated"], out.X)
    assert out.obsm["X_predicted_prot"].shape == (out.n_obs, len(raw_cells["shared"].uns["partner_features"]))
    # log values where the model reads counts: refused in one line naming the file, nothing written
    done = predict("cells.h5ad", "x.h5ad", "--layer", "missing")
    assert done.returncode == 1 and "no layer 'missing'" in done.stderr.strip().splitlines()[-1]
    del cells.layers["counts"]
    cells.write_h5ad(tmp_path / "logs.h5ad")
    done = predict("logs.h5ad", "never.h5ad")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'logs.h5ad'}: values are not whole")
    assert not (tmp_path / "never.h5ad").exists()
    # what if: the cells under a drug that blocks differentiation stay progenitors more often than under the
    # control (rollouts of the dynamic model under each condition's landscape); a drug that tilts toward fate A
    fates = {}
    for condition in ("control", "drug_block", "drug_tilt", "drug_block+drug_tilt"):
        done = predict("cells.h5ad", f"{condition}.h5ad", "--condition", condition, "--n-rollouts", "3")
        assert done.returncode == 0, done.stderr[-3000:]
        out = ad.read_h5ad(tmp_path / f"{condition}.h5ad")
        assert out.uns["virtualcell"]["condition"] == condition
        fates[condition] = out.obsm["fate_probabilities"].mean()
    assert fates["drug_block"]["progenitor"] > fates["control"]["progenitor"] + 0.1
    # both drugs at once, never seen together: each keeps its effect (the combination's drift is the control's
    # plus each drug's change): more progenitors than the tilt alone and than the control, more fate A than the block
    both = fates["drug_block+drug_tilt"]
    assert both["progenitor"] > fates["drug_tilt"]["progenitor"] + 0.03, fates
    assert both["progenitor"] > fates["control"]["progenitor"], fates
    assert both["fate_A"] > fates["drug_block"]["fate_A"] + 0.03, fates
    done = predict("cells.h5ad", "never.h5ad", "--condition", "aspirin")
    assert done.returncode == 1 and "'aspirin' is neither one of the model's" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never.h5ad").exists()


def test_rerun_nothing_changed_does_nothing(workflow_run):
    assert scheduled(snakemake(workflow_run, "-n")) == {}


def test_rerun_after_simulate_edit_schedules_only_simulate_and_after(workflow_run, tmp_path):
    override = write_override(tmp_path, "simulate:\n  epochs: 31\n")
    jobs = scheduled(snakemake(workflow_run, "-n", extra_configs=[override]))
    assert jobs == {"simulate": 3, "evaluate": 1, "report": 1, "all": 1}


def test_rerun_after_perturb_edit_schedules_only_perturb_and_after(workflow_run, tmp_path):
    override = write_override(tmp_path, "perturb:\n  epochs: 11\n")
    jobs = scheduled(snakemake(workflow_run, "-n", extra_configs=[override]))
    assert jobs == {"perturb": 3, "perturb_model": 1, "evaluate": 1, "report": 1, "all": 1}


def test_rerun_after_qc_edit_schedules_qc_and_everything_after(workflow_run, tmp_path):
    override = write_override(tmp_path, "qc:\n  min_genes: 21\n")
    jobs = scheduled(snakemake(workflow_run, "-n", extra_configs=[override]))
    assert jobs == {"qc": 1, "pair": 1, "embed": 1, "align": 1, "decode": 1, "simulate": 3, "perturb": 3, "perturb_model": 1,
                    "evaluate": 1, "report": 1, "all": 1}


def test_planning_the_dag_imports_no_model_library(workflow_run):
    """Snakemake parses the Snakefile on every invocation (and again in every cluster job): planning
    imports no torch, POT, MLflow or anndata, which made a rerun with nothing to do take ~5 s."""
    heavy = ("torch", "ot", "mlflow", "anndata", "mudata", "scanpy")
    probe = ("import atexit, sys\n"
             f"atexit.register(lambda: print('IMPORTED', [m for m in {heavy!r} if m in sys.modules]))\n"
             "from snakemake.cli import main\n"
             f"sys.argv = ['snakemake', '-n', '-s', {str(REPO / 'Snakefile')!r}, '--configfile', "
             f"{str(REPO / 'config' / 'config.yaml')!r}, {str(REPO / 'config' / 'test.yaml')!r}]\n"
             "main()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    done = subprocess.run([sys.executable, "-c", probe], cwd=workflow_run, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "Nothing to be done" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert "IMPORTED []" in done.stdout, done.stdout[-2000:]


def test_without_tracking_nothing_reruns_and_the_virtual_cell_is_kept_for_predict(workflow_run, raw_cells,
                                                                                   tmp_path):
    """mlflow.enabled: false reruns nothing; a job run without it logs nothing to MLflow, registers
    nothing, and keeps the virtual cell beside report/model.json, where `virtualcell predict` reads it."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(workflow_run, work, symlinks=True)  # keeps mtimes: the copy is as finished as the run
    off = write_override(tmp_path, "mlflow:\n  enabled: false\n")
    assert scheduled(snakemake(work, "-n", extra_configs=[off])) == {}
    store = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{work}/results/mlflow.db"))
    experiments = [e.experiment_id for e in store.search_experiments()]
    runs = len(store.search_runs(experiments, max_results=1000))
    done = snakemake(work, "--forcerun", "report", extra_configs=[off])
    assert len(store.search_runs(experiments, max_results=1000)) == runs  # nothing logged
    assert "MLflow: off" in done.stderr
    report = work / "results" / "synthetic" / "report"
    model = json.loads((report / "model.json").read_text())
    assert model["registered_model"] is None
    assert Path(model["model_uri"]) == (report / "virtual_cell").resolve()
    assert f"predict --model {model['model_uri']}" in done.stderr
    frame, t = raw_cells["frame"], raw_cells["time"]
    cells = ad.AnnData(X=frame[t == 0].to_numpy(dtype=np.float32)[:40], var=pd.DataFrame(index=frame.columns),
                       obs=pd.DataFrame(index=frame.index[t == 0][:40]))
    cells.write_h5ad(tmp_path / "cells.h5ad")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    answer = subprocess.run([sys.executable, "-m", "virtualcell.cli", "predict", "--model", model["model_uri"],
                             "--input", str(tmp_path / "cells.h5ad"), "--horizon", "1", "--output",
                             str(tmp_path / "out.h5ad")], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert answer.returncode == 0, answer.stderr[-3000:]
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.n_obs == 40 and np.allclose(out.obsm["fate_probabilities"].sum(axis=1), 1)
