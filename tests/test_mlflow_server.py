"""The service path of tracking: the tiny workflow, run with parallel jobs, tracks into a real
`mlflow server` (SQLite backend, artifacts served by the server) given by MLFLOW_TRACKING_URI.

tests/test_slurm.py tracks its SLURM run through a server in the same way.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.services import clean_env, mlflow_server
from virtualcell import tracking

pytestmark = pytest.mark.workflow
JOBS = ["ingest", "qc", "pair", "embed", "align", "decode", "simulate", "simulate", "simulate", "perturb", "perturb",
        "perturb", "perturb_model", "evaluate", "report"]
EXPERIMENT = "virtualcell-test"


def check_runs(client: MlflowClient, *, jobs=JOBS) -> dict[str, list]:
    """One FINISHED parent run and, under it, a FINISHED child run per job; returns the runs by kind."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "workflow"]
    finished = [r for r in parents if r.info.status == "FINISHED"]
    assert len(finished) == 1, [(r.info.run_name, r.info.status) for r in parents]
    parent = finished[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags[tracking.TAG_RULE] for r in children) == sorted(jobs)
    for run in children:
        assert run.info.status == "FINISHED", run.info.run_name
        names = {a.path for a in client.list_artifacts(run.info.run_id, "files")}
        assert names == {"files/inputs.json", "files/outputs.json"}, run.info.run_name
    return {"parent": [parent], "children": children}


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    workdir = root / "work"
    workdir.mkdir()
    with mlflow_server(root / "server") as uri:
        done = subprocess.run(
            ["timeout", "-s", "INT", "-k", "30", "1800", sys.executable, "-m", "snakemake",
             "-s", str(REPO / "Snakefile"), "--cores", "2",
             "--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml")],
            cwd=workdir, env=clean_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
        )
        assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # The server is stopped when the fixture's scope ends, after the checks below.
        yield {"root": root, "workdir": workdir, "uri": uri, "client": client, "log": done.stderr}


def test_every_job_tracks_into_the_server(server_run):
    runs = check_runs(server_run["client"])
    parent = runs["parent"][0]
    # the Snakemake log of the invocation is attached to its parent run
    assert [a.path for a in server_run["client"].list_artifacts(parent.info.run_id, "snakemake")]
    # jobs ran side by side (2 cores) and tracked into the server at once: two job runs overlap in time.
    # Which two depends on the scheduler (decode or a simulate beside a simulate); sorted by start, if
    # any two overlap then two neighbours do.
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs["children"])
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_artifacts_and_the_registered_model_come_from_the_server(server_run):
    stored = server_run["root"] / "server" / "artifacts"
    assert any(p.name == "outputs.json" for p in stored.rglob("*")), "artifacts did not reach --artifacts-destination"
    # nothing was tracked locally beside the outputs
    results = server_run["workdir"] / "results"
    assert not (results / "mlflow.db").exists() and not (results / "mlartifacts").exists()
    # a user elsewhere loads the registered virtual cell through the server and asks it about the cells of
    # its input example (counts with gene names)
    load = (
        "import mlflow, numpy as np; "
        "m = mlflow.pyfunc.load_model('models:/virtualcell-synthetic/latest'); "
        "cells = m.input_example; out = m.predict(cells, params={'horizon': 1.0}); "
        "assert len(out) == len(cells) and np.isfinite(out.to_numpy(dtype=float)).all(); "
        "assert np.allclose(out.filter(like='p_').sum(axis=1), 1); print('ok', cells.shape)"
    )
    done = subprocess.run([sys.executable, "-c", load], cwd=server_run["root"], capture_output=True, text=True,
                          env=clean_env(MLFLOW_TRACKING_URI=server_run["uri"]), timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
