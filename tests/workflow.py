"""Running the workflow as a user does, for the workflow tests: the snakemake command line, the jobs a
dry run schedules, config overrides, and the MLflow runs a run leaves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from virtualcell import tracking

JOBS = ["ingest", "qc", "pair", "embed", "align", "decode", "simulate", "simulate", "simulate", "perturb", "perturb",
        "perturb", "perturb_model", "evaluate", "report"]


def snakemake(workdir: Path, *args: str, extra_configs=(), check=True) -> subprocess.CompletedProcess:
    configs = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml"), *map(str, extra_configs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", *args,
           "--configfile", *configs]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
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


def write_override(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "override.yaml"
    path.write_text(text)
    return path


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
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]


def job_rules(tmp_path: Path, experiment: str) -> list[str]:
    """The rules of the finished runs of an experiment ('workflow' for the parent run)."""
    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/results/mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    return sorted(r.data.tags.get(tracking.TAG_RULE, "workflow") for r in runs)
