"""The whole workflow on config/test.yaml, as a user runs it: the snakemake command line.

One module-scoped run (about a minute on 2 cores) is shared by the checks of
its outputs, its MLflow records, the registered model and the rerun rules.
"""

from __future__ import annotations

import json
import os
import re
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
from virtualcell import tracking

pytestmark = pytest.mark.workflow
JOBS = ["ingest", "qc", "pair", "embed", "align", "decode", "simulate", "simulate", "simulate", "perturb", "perturb",
        "perturb", "perturb_model", "evaluate", "report"]


def snakemake(workdir: Path, *args: str, extra_configs=(), check=True) -> subprocess.CompletedProcess:
    configs = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml"), *map(str, extra_configs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", *args,
           "--configfile", *configs]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def scheduled(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("Reasons:")[0] if "Reasons:" in text else text.split("Job stats:")[1]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    counts.pop("total", None)
    return {k: int(v) for k, v in counts.items()}


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
    # control (rollouts of the dynamic model under each condition's landscape)
    fates = {}
    for condition in ("control", "drug_block"):
        done = predict("cells.h5ad", f"{condition}.h5ad", "--condition", condition, "--n-rollouts", "3")
        assert done.returncode == 0, done.stderr[-3000:]
        out = ad.read_h5ad(tmp_path / f"{condition}.h5ad")
        assert out.uns["virtualcell"]["condition"] == condition
        fates[condition] = out.obsm["fate_probabilities"]["progenitor"].mean()
    assert fates["drug_block"] > fates["control"] + 0.1
    done = predict("cells.h5ad", "never.h5ad", "--condition", "aspirin")
    assert done.returncode == 1 and "'aspirin' is neither one of the model's" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never.h5ad").exists()


def _override(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "override.yaml"
    path.write_text(text)
    return path


def test_rerun_nothing_changed_does_nothing(workflow_run):
    assert scheduled(snakemake(workflow_run, "-n")) == {}


def test_rerun_after_simulate_edit_schedules_only_simulate_and_after(workflow_run, tmp_path):
    override = _override(tmp_path, "simulate:\n  epochs: 31\n")
    jobs = scheduled(snakemake(workflow_run, "-n", extra_configs=[override]))
    assert jobs == {"simulate": 3, "evaluate": 1, "report": 1, "all": 1}


def test_rerun_after_perturb_edit_schedules_only_perturb_and_after(workflow_run, tmp_path):
    override = _override(tmp_path, "perturb:\n  epochs: 11\n")
    jobs = scheduled(snakemake(workflow_run, "-n", extra_configs=[override]))
    assert jobs == {"perturb": 3, "perturb_model": 1, "evaluate": 1, "report": 1, "all": 1}


def test_rerun_after_qc_edit_schedules_qc_and_everything_after(workflow_run, tmp_path):
    override = _override(tmp_path, "qc:\n  min_genes: 21\n")
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
    off = _override(tmp_path, "mlflow:\n  enabled: false\n")
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


def test_a_failing_job_marks_its_run_and_the_workflow_failed(tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file")
    override = _override(tmp_path, f"datasets:\n  synthetic:\n    source: h5ad\n    path: {bad}\n"
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


def run_real_config(tmp_path: Path, config: str, data: str) -> None:
    """Run config/<config> instead of the default, as its header tells a user to: the test data it
    names are fetched (pinned, checked) into the cache if missing, and data/testdata points there."""
    from virtualcell.readers import testdata_cache, testdata_path

    testdata_path(data)
    cache = testdata_cache()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "testdata").symlink_to(cache)
    run_config(tmp_path, REPO / "config" / config)


def run_config(workdir: Path, config: Path) -> None:
    """snakemake with ``config`` instead of the default (not merged into it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--replace-workflow-config", "--configfile", str(config)]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def job_rules(tmp_path: Path, experiment: str) -> list[str]:
    """The rules of the finished runs of an experiment ('workflow' for the parent run)."""
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    return sorted(r.data.tags.get(tracking.TAG_RULE, "workflow") for r in runs)


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
    override = _override(tmp_path, "datasets:\n  synthetic:\n    modalities: [rna]\n"
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

    override = _override(tmp_path, "datasets:\n  synthetic:\n    modalities: [rna]\n"
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
    override = _override(tmp_path, "datasets:\n  synthetic:\n    modalities: [spatial]\n")
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
    config = _override(tmp_path, f"""datasets:
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
    config = _override(tmp_path, f"""datasets:
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
