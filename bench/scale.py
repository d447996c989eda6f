"""The whole DAG on a large generated dataset: wall time and peak memory of every job.

Run by hand: ``python bench/scale.py [--cells 100000] [--genes 2000] [--cores 2] [--keep DIR]``.
The built-in generator makes the dataset (RNA + protein + a tissue section, 6 time points); the
workflow runs on it from an empty folder with the default config and the training epochs of
``SCALE_CONFIG`` below. Per job, wall time and peak RSS come from Snakemake's own ``benchmark:``
records (``benchmarks/<dataset>/<rule>.tsv``); the record appended to bench/results/scale.json
also holds the headline metrics, so a run that is fast but learns nothing shows as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_file  # bench/results_file.py, beside this script

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "scale.json"
# Epochs for 100,000 cells: an epoch there is ~33 of the default's (3,000 cells), so the default's
# epoch counts would take hours on 2 cores; these give each model more optimiser steps than the
# default run takes (embed: 20 x 313 steps vs 60 x 10; simulate: 60 x 66 vs 200 x 2).
SCALE_CONFIG = """datasets:
  synthetic:
    generator: {{n_cells: {cells}, n_genes: {genes}, n_proteins: {proteins}, n_spots: 400}}
qc:
  n_top_genes: {genes}
embed: {{epochs: 20}}
align: {{epochs: 30}}
simulate: {{epochs: 60}}
mlflow:
  experiment: virtualcell-scale
"""
TARGET_RSS_MB = 8 * 1024
TARGET_JOB_S = 30 * 60


def job_records(workdir: Path) -> pd.DataFrame:
    """One row per job from Snakemake's benchmark TSVs: rule, job, seconds, peak RSS (MB)."""
    rows = []
    for path in sorted((workdir / "benchmarks").rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        rel = path.relative_to(workdir / "benchmarks")
        rule = rel.parts[1] if len(rel.parts) > 2 else rel.stem
        rows.append({"rule": rule, "job": str(rel.with_suffix("")), "s": float(table["s"].iloc[0]),
                     "max_rss_mb": float(table["max_rss"].iloc[0])})
    return pd.DataFrame(rows)


def run(cells: int, genes: int, proteins: int, cores: int, workdir: Path) -> dict:
    config = workdir / "scale.yaml"
    config.write_text(SCALE_CONFIG.format(cells=cells, genes=genes, proteins=proteins))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
           "--configfile", str(REPO / "config" / "config.yaml"), str(config)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (workdir / "snakemake.log").write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the workflow failed (log: {workdir / 'snakemake.log'}):\n{done.stderr[-4000:]}")
    jobs = job_records(workdir)
    metrics = json.loads((workdir / "results" / "synthetic" / "evaluate" / "metrics.json").read_text())
    sim = metrics.get("simulation", {})
    w1 = sim.get("mean", {}).get(f"w1_{sim.get('space')}", {})
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cells": cells, "genes": genes, "proteins": proteins, "cores": cores,
        "wall_s": round(wall, 1),
        "jobs": jobs.round(1).to_dict("records"),
        "per_rule": jobs.groupby("rule").agg(jobs=("s", "size"), total_s=("s", "sum"), max_job_s=("s", "max"),
                                             max_rss_mb=("max_rss_mb", "max")).round(1).reset_index()
        .to_dict("records"),
        "peak_rss_mb": float(jobs["max_rss_mb"].max()),
        "targets_met": bool(jobs["max_rss_mb"].max() <= TARGET_RSS_MB and jobs["s"].max() <= TARGET_JOB_S),
        "headline": {"w1_mean": w1, "alignment": metrics.get("alignment", {}), "truth": metrics.get("truth", {})},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--proteins", type=int, default=50)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        record = run(args.cells, args.genes, args.proteins, args.cores, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="vc-scale-") as workdir:
            record = run(args.cells, args.genes, args.proteins, args.cores, Path(workdir))
    results_file.append(OUT, record)
    print(f"{args.cells} cells x {args.genes} genes: {record['wall_s']:.0f} s, peak RSS "
          f"{record['peak_rss_mb']:.0f} MB, targets met: {record['targets_met']}")
    for row in record["per_rule"]:
        print(f"  {row['rule']:9s} {row['jobs']} job(s)  total {row['total_s']:7.1f} s  "
              f"longest {row['max_job_s']:7.1f} s  peak RSS {row['max_rss_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
