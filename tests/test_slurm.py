"""The HPC path for real: config/test.yaml through profiles/slurm on a single-node SLURM cluster
brought up on this machine (scripts/slurm-up.sh), tracking into a real `mlflow server`.

Checked: every job went through sbatch (SLURM's own records), the training rules asked for a GPU
(gres), outputs and MLflow runs are complete, and a job that SLURM kills (time limit, memory
limit) is reported with the reason and its log paths, and `--rerun-incomplete` recovers a run
whose Snakemake process died. The failure runs go beside the workflow run, to save time.

Needs root (and apt-get when slurm-wlm/munge are missing); otherwise skipped, except in CI
(CI=true), where it fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.services import clean_env, mlflow_server, require_slurm, slurm_cluster
from tests.test_mlflow_server import JOBS, check_runs
from virtualcell import tracking

pytestmark = pytest.mark.workflow
PROFILE = REPO / "profiles" / "slurm"
CONFIGS = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml")]
GPU_RULES = {"embed", "align", "simulate"}
# As a user runs the profile, with the partition (scripts/slurm-up.sh calls it "main") given on the
# command line; this cluster has no accounts and no slurmdbd (so job status by squeue), and its
# jobs take seconds, so the first status check comes sooner than the default 40 s.
PARTITION = "main"
CLUSTER_ARGS = ["--default-resources", f"slurm_partition={PARTITION}", "--slurm-no-account",
                "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5"]
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", re.M)
FAILED = re.compile(r"SLURM-job '(\d+)' failed, SLURM status is: '(\w+)'")

# A rule that outlives its 1-minute time limit.
SLEEPER = """
rule sleeper:
    output: "slept.txt"
    resources: runtime=1, mem_mb=1000
    shell: "sleep 600; touch {output}"
"""
# A rule that writes half its output, then waits; its Snakemake process is killed meanwhile.
HALF = """
rule half:
    output: "half.txt"
    resources: runtime=5, mem_mb=500
    shell: "echo first half > {output}; sleep {config[pause]}; echo second half >> {output}"
"""


def snakemake(workdir: Path, cluster: dict, *args: str, snakefile: Path = REPO / "Snakefile",
              env: dict | None = None, timeout_s: int = 1800) -> subprocess.CompletedProcess:
    """snakemake --workflow-profile profiles/slurm ..., stopped by SIGINT (so it cancels its jobs) on timeout."""
    cmd = ["timeout", "-s", "INT", "-k", "30", str(timeout_s), *snakemake_cmd(snakefile, *args)]
    return subprocess.run(cmd, cwd=workdir, env=clean_env(**cluster["env"], **(env or {})),
                          capture_output=True, text=True)


def snakemake_cmd(snakefile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--workflow-profile", str(PROFILE),
            *CLUSTER_ARGS, *args]


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def slurm(cluster: dict, *args: str) -> str:
    return subprocess.run(list(args), env=clean_env(**cluster["env"]), capture_output=True, text=True,
                          check=True, timeout=60).stdout


def slurm_job(cluster: dict, job_id: str) -> dict[str, str]:
    """SLURM's record of a job (kept MinJobAge = 2 h after it ends, scripts/slurm-up.sh)."""
    return dict(re.findall(r"(\w+)=(\S*)", slurm(cluster, "scontrol", "show", "job", "-o", job_id)))


def wait_until(predicate, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    state = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    with slurm_cluster(state) as env:
        print(f"SLURM cluster up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield {"state": state, "env": env}


def time_limit_run(cluster: dict, workdir: Path) -> subprocess.CompletedProcess:
    (workdir / "Snakefile").write_text(SLEEPER)
    return snakemake(workdir, cluster, snakefile=workdir / "Snakefile", timeout_s=400)


def memory_limit_run(cluster: dict, workdir: Path) -> subprocess.CompletedProcess:
    """The workflow's first job with too little memory, tracking to the default SQLite store."""
    return snakemake(workdir, cluster, "results/synthetic/ingest.h5mu", "--set-resources", "ingest:mem_mb=300",
                     "--configfile", *CONFIGS, timeout_s=400)


def incomplete_runs(cluster: dict, workdir: Path) -> dict:
    """Snakemake dies (SIGKILL, as when a login session is lost) while its job runs; the user unlocks,
    reruns (refused: a half-written output), cancels the orphaned job and reruns with --rerun-incomplete."""
    snakefile = workdir / "Snakefile"
    snakefile.write_text(HALF)
    log = workdir / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen(snakemake_cmd(snakefile, "--config", "pause=300"), cwd=workdir,
                                 env=clean_env(**cluster["env"]), stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_until(lambda: (workdir / "half.txt").exists(), timeout_s=180, what="the half-written output")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run_id = re.search(r"^SLURM run ID: (\S+)$", log.read_text(), re.M).group(1)
    unlock = snakemake(workdir, cluster, "--unlock", snakefile=snakefile, timeout_s=120)
    without = snakemake(workdir, cluster, "--config", "pause=0", snakefile=snakefile, timeout_s=120)
    # the orphaned job carries the run ID as its SLURM job name
    slurm(cluster, "scancel", "--name", run_id)
    wait_until(lambda: not slurm(cluster, "squeue", "-h", "--name", run_id, "--states", "PENDING,RUNNING,COMPLETING"),
               timeout_s=60, what="the orphaned job to end")
    rerun = snakemake(workdir, cluster, "--config", "pause=0", "--rerun-incomplete", snakefile=snakefile,
                      timeout_s=300)
    return {"unlock": unlock, "without": without, "rerun": rerun, "output": (workdir / "half.txt").read_text()}


@pytest.fixture(scope="module")
def side_runs(cluster, tmp_path_factory):
    """The failure and recovery runs, started before the workflow run and running beside it."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("time-limit", "memory-limit", "incomplete")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {
            "time_limit": pool.submit(time_limit_run, cluster, dirs["time-limit"]),
            "memory_limit": pool.submit(memory_limit_run, cluster, dirs["memory-limit"]),
        }
        # two workers: this one starts when the memory-limit run has ended
        runs["incomplete"] = pool.submit(incomplete_runs, cluster, dirs["incomplete"])
        yield {"dirs": dirs, **runs}


@pytest.fixture(scope="module")
def workflow_run(cluster, side_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-workflow")
    workdir = root / "work"
    workdir.mkdir()
    with mlflow_server(root / "server") as uri:
        started = time.monotonic()
        done = snakemake(workdir, cluster, "--configfile", *CONFIGS, env={"MLFLOW_TRACKING_URI": uri})
        print(f"SLURM workflow run: {time.monotonic() - started:.1f} s", file=sys.stderr)
        assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
        submitted = {snakemake_id: (slurm_id, log) for snakemake_id, slurm_id, log in SUBMITTED.findall(output(done))}
        yield {"workdir": workdir, "done": done, "submitted": submitted,
               "client": MlflowClient(tracking_uri=uri, registry_uri=uri)}


def test_every_job_was_submitted_with_sbatch_and_completed(workflow_run, cluster):
    submitted = workflow_run["submitted"]
    assert len(submitted) == len(JOBS), output(workflow_run["done"])[-4000:]
    rules = []
    jobcomp = (cluster["state"] / "jobcomp.log").read_text()
    for slurm_id, log in submitted.values():
        record = slurm_job(cluster, slurm_id)
        assert record["JobState"] == "COMPLETED" and record["Partition"] == PARTITION, record
        rules.append(re.match(r"rule_([a-z_]+?)_wildcards_", record["Comment"]).group(1))
        assert re.search(rf"^JobId={slurm_id} .*JobState=COMPLETED", jobcomp, re.M)
        assert f"/.snakemake/slurm_logs/rule_{rules[-1]}/" in log
    assert sorted(rules) == sorted(JOBS)


def test_training_rules_ask_slurm_for_a_gpu(workflow_run, cluster):
    for slurm_id, _ in workflow_run["submitted"].values():
        record = slurm_job(cluster, slurm_id)
        rule = re.match(r"rule_([a-z_]+?)_wildcards_", record["Comment"]).group(1)
        if rule in GPU_RULES:
            assert record.get("TresPerJob") == "gres:gpu:1", record
        else:
            assert "gpu" not in record.get("TresPerJob", "") + record.get("TresPerNode", ""), record


def test_outputs_and_mlflow_runs_are_complete(workflow_run):
    results = workflow_run["workdir"] / "results" / "synthetic"
    for path in ["evaluate/metrics.json", "report/model.json", "simulate/2/seed0/simulator.pt", "simulate/none/seed0/simulator.pt"]:
        assert (results / path).stat().st_size > 0, path
    runs = check_runs(workflow_run["client"])
    # each child run ran inside the SLURM job that Snakemake submitted for it
    slurm_ids = {slurm_id for slurm_id, _ in workflow_run["submitted"].values()}
    assert {r.data.tags.get(tracking.TAG_SLURM_JOBID) for r in runs["children"]} == slurm_ids


def test_a_job_past_its_time_limit_is_reported_as_timeout(side_runs):
    done = side_runs["time_limit"].result()
    text = output(done)
    assert done.returncode != 0
    failed = FAILED.search(text)
    assert failed and failed.group(2) == "TIMEOUT", text[-3000:]
    slurm_log = Path(SUBMITTED.search(text).group(3))
    assert str(slurm_log) in text  # the error names the SLURM log
    assert "DUE TO TIME LIMIT" in slurm_log.read_text()


def test_a_job_over_its_memory_is_killed_and_both_logs_are_named(side_runs):
    done = side_runs["memory_limit"].result()
    text = output(done)
    assert done.returncode != 0
    failed = FAILED.search(text)
    assert failed, text[-3000:]
    slurm_log = Path(SUBMITTED.search(text).group(3))
    assert str(slurm_log) in text and "logs/synthetic/ingest.log" in text
    assert "Exceeded job memory limit" in slurm_log.read_text()
    # and the run was warned that SQLite is no store for jobs on cluster nodes
    assert "MLflow tracks to SQLite" in text
    workdir = side_runs["dirs"]["memory-limit"]
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{workdir}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("virtualcell-test").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get(tracking.TAG_KIND) == "workflow"] == ["FAILED"]


def test_rerun_incomplete_recovers_after_snakemake_died(side_runs):
    runs = side_runs["incomplete"].result()
    assert runs["unlock"].returncode == 0, output(runs["unlock"])[-3000:]
    assert runs["without"].returncode != 0
    assert "IncompleteFilesException" in output(runs["without"]), output(runs["without"])[-3000:]
    assert "--rerun-incomplete" in output(runs["without"])
    assert runs["rerun"].returncode == 0, output(runs["rerun"])[-3000:]
    assert SUBMITTED.search(output(runs["rerun"]))  # the job ran again, through sbatch
    assert runs["output"] == "first half\nsecond half\n"
