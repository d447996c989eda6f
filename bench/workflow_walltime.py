"""Wall time of the whole workflow, default config and test config, each from an empty folder.

Run by hand: ``python bench/workflow_walltime.py [--cores 2] [--configs default test]``.
Writes bench/results/workflow_walltime.json (appending one record per run) and prints a table.
Per-rule times come from the Snakemake log of the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": [REPO / "config" / "config.yaml"],
    "test": [REPO / "config" / "config.yaml", REPO / "config" / "test.yaml"],
}
OUT = REPO / "bench" / "results" / "workflow_walltime.json"


def rule_times(log: str) -> dict[str, float]:
    """Seconds per rule (summed over its jobs), from Snakemake's timestamped log."""
    stamp = r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]"
    started: dict[str, dt.datetime] = {}
    totals: dict[str, float] = {}
    for when, what in re.findall(stamp + r"\n(.*)", log):
        t = dt.datetime.strptime(when, "%a %b %d %H:%M:%S %Y")
        if m := re.match(r"localrule (\w+):|rule (\w+):", what):
            started.setdefault(m.group(1) or m.group(2), t)
        if m := re.match(r"Finished jobid: \d+ \(Rule: (\w+)\)", what):
            rule = m.group(1)
            totals[rule] = totals.get(rule, 0.0) + (t - started.pop(rule, t)).total_seconds()
    return totals


def run(name: str, cores: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"vc-bench-{name}-") as workdir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
        configs = [str(p) for p in CONFIGS[name]]
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
               "--configfile", *configs]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        return {
            "config": name,
            "cores": cores,
            "wall_s": round(wall, 1),
            "rule_s": rule_times(done.stderr),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "device": "cpu",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    records = json.loads(OUT.read_text()) if OUT.exists() else []
    for name in args.configs:
        record = run(name, args.cores)
        records.append(record)
        print(f"{name:8s} {record['wall_s']:7.1f} s  " +
              "  ".join(f"{k} {v:.0f}" for k, v in record["rule_s"].items()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
