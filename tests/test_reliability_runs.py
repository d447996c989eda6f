"""Interruptions, concurrency and repeatability, with real processes.

- A training step SIGKILLed after its first checkpoint resumes from it when run again,
  and ends with exactly the model an uninterrupted run makes.
- Checkpoints are named by what they were trained on: other settings or data never resume.
- 4 processes logging job runs at once to a fresh default SQLite store, 10 runs each:
  no store error, every run recorded.
- The workflow (tests marked ``workflow``): two invocations with different configs, at the
  same time, in one folder and one tracking store, keep their runs apart and produce the
  same numbers; a third run in another folder, SIGKILLed during training and resumed with
  ``--rerun-incomplete``, leaves only complete files and produces exactly the same metrics.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from virtualcell import cli, io, stages, tracking
from virtualcell.config import validate_config
from virtualcell.models.dynamics import Simulator

SIM_EPOCHS = 60
SIM_EVERY = 5


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    return env | extra


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"finished (rc {proc.returncode}) before writing {pattern}")
        time.sleep(0.01)
    raise AssertionError(f"no {pattern} under {folder} after {timeout} s")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (as a node failure or scancel would)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------------------
# a training step killed after its first checkpoint


@pytest.fixture(scope="module")
def shared_h5ad(tmp_path_factory) -> Path:
    """A shared embedding with 5 time points, big enough that 60 epochs take a few seconds."""
    rng = np.random.default_rng(0)
    times, n = np.arange(5.0), 200
    t = np.repeat(times, n)
    obs = pd.DataFrame({"time": t, "split": "train"}, index=[f"c{i}" for i in range(len(t))])
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_shared"] = (rng.normal(size=(len(t), 8)) + 0.3 * t[:, None]).astype(np.float32)
    path = tmp_path_factory.mktemp("shared") / "shared.h5ad"
    adata.write_h5ad(path)
    return path


def _simulate_argv(shared: Path, out: Path, **params) -> list[str]:
    section = validate_config({"datasets": {"d": {"source": "synthetic"}},
                               "simulate": {"epochs": SIM_EPOCHS, "n_hidden": 32, "batch_size": 64,
                                            "n_steps": 10, **params}})["simulate"]
    return ["simulate", "--dataset", "d", "--holdout", "none", "--input", str(shared), "--output",
            str(out / "simulator.pt"), "--figure", str(out / "trajectories.png"), "--device", "cpu",
            "--threads", "1", "--checkpoint-every", str(SIM_EVERY), "--params", json.dumps(section)]


def test_a_killed_training_step_resumes_from_its_checkpoint_and_ends_the_same(shared_h5ad, tmp_path):
    reference = tmp_path / "reference"
    assert cli.main([*_simulate_argv(shared_h5ad, reference), "--no-tracking"]) == 0
    assert not (reference / stages.CHECKPOINTS).exists()  # removed once the outputs are written

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "virtualcell.cli", *_simulate_argv(shared_h5ad, out)]
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    env = _clean_env(**{tracking.ENV_TRACKING_URI: uri, tracking.ENV_EXPERIMENT: "resume"})
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    (checkpoint,) = _wait_for("simulator.*.pt", out / stages.CHECKPOINTS, proc, timeout=120)
    _kill(proc)
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert SIM_EVERY <= epoch < SIM_EPOCHS and epoch % SIM_EVERY == 0
    assert not (out / "simulator.pt").exists()

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoint} at epoch {epoch}/{SIM_EPOCHS}" in done.stderr
    assert not (out / stages.CHECKPOINTS).exists()
    resumed, uninterrupted = Simulator.load(out / "simulator.pt"), Simulator.load(reference / "simulator.pt")
    assert resumed.history == uninterrupted.history and len(resumed.history) == SIM_EPOCHS
    for a, b in zip(resumed.module.state_dict().values(), uninterrupted.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the resumed job's run holds every epoch, the restored ones included
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              filter_string="attributes.status = 'FINISHED'")
    (run,) = runs
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "simulate/loss")]
    assert sorted(steps) == list(range(SIM_EPOCHS))


def test_a_checkpoint_resumes_only_the_same_settings_and_data(tmp_path):
    x, t = np.ones((4, 2), np.float32), np.arange(4.0)
    settings = {"params": {"lr": 0.001}, "network": {"w": [2, 2]}}

    def path(**changes):
        return stages.checkpoint_file(tmp_path / "simulator.pt", every=5, settings=changes.get("settings", settings),
                                      arrays=changes.get("arrays", [x, t]))

    first = path()
    assert first == path() and first.parent == tmp_path / stages.CHECKPOINTS
    first.parent.mkdir()
    first.write_bytes(b"state")
    # other settings, other network, other data: another name, and the stale file is deleted
    for changes in ({"settings": {**settings, "params": {"lr": 0.01}}},
                    {"settings": {**settings, "network": {"w": [2, 3]}}},
                    {"arrays": [x + 1, t]},
                    {"arrays": [x, t[::-1]]}):
        first.write_bytes(b"state")
        other = path(**changes)
        assert other != first and not first.exists()
    assert stages.checkpoint_file(tmp_path / "simulator.pt", every=0, settings=settings, arrays=[x]) is None


# ---------------------------------------------------------------------------
# the tracking store under parallel jobs

WORKER = """
import sys
from pathlib import Path
from virtualcell import tracking
worker, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    out = Path(f"out/{worker}-{i}.txt")
    with tracking.job_run(rule="stress", wildcards={"worker": worker, "i": str(i)},
                          params={"worker": worker, "i": i, "section": {"lr": 0.001}},
                          inputs=[], outputs=[out]) as job:
        for epoch in range(10):
            job.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
        job.log_dict({"i": i}, "result.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(str(i))
"""


def test_4_parallel_jobs_10_runs_each_on_a_fresh_sqlite_store(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = _clean_env(**{tracking.ENV_EXPERIMENT: "stress"})
    procs = [subprocess.Popen([sys.executable, "worker.py", str(w), "10"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "locked" not in err and "retrying" not in err and "Traceback" not in err, err[-3000:]
    # the default store: sqlite:///results/mlflow.db under the working directory
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tracking.DEFAULT_STORE}", workdir=tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("stress").experiment_id], max_results=1000)
    assert sorted((r.data.params["worker"], int(r.data.params["i"])) for r in runs) == [
        (str(w), i) for w in range(4) for i in range(10)
    ]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 10


# ---------------------------------------------------------------------------
# the workflow: two invocations at once, and one killed during training


def _config(dataset: str, experiment: str, **top) -> dict:
    """config.yaml with test.yaml laid over it (as --configfile merges them), the dataset renamed."""
    def merge(base, over):
        for k, v in over.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    config = merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                   yaml.safe_load((REPO / "config" / "test.yaml").read_text()))
    config["datasets"] = {dataset: config["datasets"].pop("synthetic")}
    config["mlflow"]["experiment"] = experiment
    return config | top


def _snakemake(workdir: Path, config: dict, *args: str, cores: int = 2, **popen) -> subprocess.Popen:
    path = workdir / f"{config['mlflow']['experiment']}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores), *args,
           "--configfile", str(path)]
    return subprocess.Popen(cmd, cwd=workdir, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def two_invocations(tmp_path_factory) -> Path:
    """Two configs (datasets synthA and synthB, experiments exp-a and exp-b), run at the same
    time in one folder, so into one tracking store and one results/ folder."""
    workdir = tmp_path_factory.mktemp("two")
    procs = [_snakemake(workdir, _config(f"synth{x}", f"exp-{x.lower()}"), cores=1) for x in "AB"]
    for proc in procs:
        _finish(proc)
    return workdir


def _metrics(workdir: Path, dataset: str) -> dict:
    return json.loads((workdir / "results" / dataset / "evaluate" / "metrics.json").read_text())


@pytest.mark.workflow
def test_two_invocations_sharing_a_store_keep_their_runs_apart(two_invocations):
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{two_invocations}/results/mlflow.db"))
    parents = {}
    for experiment in ("exp-a", "exp-b"):
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        (parent,) = [r for r in runs if r.data.tags[tracking.TAG_KIND] == "workflow"]
        children = [r for r in runs if r.data.tags[tracking.TAG_KIND] == "job"]
        assert parent.info.status == "FINISHED" and len(children) == 15  # 11 + 3 perturb + perturb_model
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
        assert {r.data.tags["wildcard.dataset"] for r in children} == {"synth" + experiment[-1].upper()}
        assert all(r.info.status == "FINISHED" for r in children)
        parents[experiment] = parent.info.run_id
    assert parents["exp-a"] != parents["exp-b"]
    assert list((two_invocations / "results" / tracking.PARENT_RUN_DIR).iterdir()) == []  # each removed its file


@pytest.mark.workflow
def test_same_config_and_seed_give_identical_metrics(two_invocations):
    a, b = _metrics(two_invocations, "synthA"), _metrics(two_invocations, "synthB")
    assert a.pop("dataset") == "synthA" and b.pop("dataset") == "synthB"
    assert a == b


@pytest.fixture(scope="module")
def killed_during_training(tmp_path_factory) -> tuple[Path, dict, str]:
    """synthA in a folder of its own: SIGKILLed (snakemake and its jobs) once a simulate job has
    written a checkpoint, then unlocked and run again with --rerun-incomplete."""
    workdir = tmp_path_factory.mktemp("killed")
    config = _config("synthA", "exp-a", checkpoint_every=2)  # never changes a result
    proc = _snakemake(workdir, config, start_new_session=True)
    checkpoints = _wait_for("results/synthA/simulate/*/*/.checkpoints/simulator.*.pt", workdir, proc, timeout=600)
    _kill(proc)
    at_kill = {str(p): torch.load(p, weights_only=True)["epoch"] for p in checkpoints}
    complete = _check_every_output(workdir / "results" / "synthA")
    assert complete, "the kill left no outputs to check"
    _finish(_snakemake(workdir, config, "--unlock"))
    _finish(_snakemake(workdir, config, "--rerun-incomplete"))
    return workdir, at_kill, "\n".join(p.read_text() for p in (workdir / "logs" / "synthA" / "simulate").glob("*/*.log"))


def _check_every_output(folder: Path) -> list[Path]:
    """Every file at an output path is complete: it loads. (Hidden files are lineage, temp and checkpoint files.)"""
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-3:])]
    for path in files:
        if path.suffix == ".h5mu":
            io.read_h5mu(path)
        elif path.suffix == ".h5ad":
            io.read_h5ad(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                list(arrays.values())
        elif path.suffix == ".tsv":
            pd.read_csv(path, sep="\t")
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>"), path
        else:
            raise AssertionError(f"unexpected output {path}")
    return files


@pytest.mark.workflow
def test_a_workflow_killed_during_training_resumes_and_completes(killed_during_training):
    workdir, at_kill, simulate_logs = killed_during_training
    for checkpoint, epoch in at_kill.items():
        assert f"resuming from {Path(checkpoint).relative_to(workdir)} at epoch {epoch}/" in simulate_logs
    results = workdir / "results" / "synthA"
    _check_every_output(results)
    assert (results / "report" / "model.json").exists()
    assert not list(results.rglob(stages.CHECKPOINTS)) and not list(results.rglob("*.tmp*"))
    # the killed invocation's open runs were closed as KILLED by the next one; none stays RUNNING
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{workdir}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("exp-a").experiment_id])
    status = {}
    for run in runs:
        key = (run.data.tags[tracking.TAG_KIND], run.info.status)
        status[key] = status.get(key, 0) + 1
    assert status[("workflow", "KILLED")] == 1 and status[("workflow", "FINISHED")] == 1
    assert status[("job", "KILLED")] >= 1 and not any(s == "RUNNING" for _, s in status)
    assert all(r.data.tags[tracking.TAG_ERROR] == tracking.ABANDONED for r in runs if r.info.status == "KILLED")


@pytest.mark.workflow
def test_a_killed_and_resumed_workflow_gives_the_metrics_of_an_uninterrupted_one(killed_during_training,
                                                                               two_invocations):
    """Same config and seed on CPU, in another folder, interrupted or not: the same metrics.json, exactly."""
    workdir, _, _ = killed_during_training
    assert (workdir / "results/synthA/evaluate/metrics.json").read_text() == (
        two_invocations / "results/synthA/evaluate/metrics.json").read_text()
