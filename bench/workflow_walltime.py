"""Wall time of the whole workflow, default config and test config, each from an empty folder.

Run by hand: ``python bench/workflow_walltime.py [--cores 2] [--configs default test] [--tracking on off]``.
Writes bench/results/workflow_walltime.json (appending one record per run) and prints a table.
Per-rule times come from the Snakemake log of the run. Each run is followed by a rerun with nothing
changed, timed until Snakemake says there is nothing to do (issue 15: <= 5 s). ``--tracking on off``
runs each config with MLflow on and off (``mlflow.enabled: false``), alternately, for the overhead.
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


def run(name: str, cores: int, tracking: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"vc-bench-{name}-") as workdir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
        configs = [str(p) for p in CONFIGS[name]]
        if not tracking:
            off = Path(workdir, "no-tracking.yaml")
            off.write_text("mlflow:\n  enabled: false\n")
            configs.append(str(off))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
               "--configfile", *configs]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        # The same command again, nothing changed: how long Snakemake takes to decide there is nothing to do.
        start = time.perf_counter()
        again = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        noop = time.perf_counter() - start
        if again.returncode != 0 or "Nothing to be done" not in again.stderr:
            raise SystemExit(f"{name}: the rerun with nothing changed did not find nothing to do:\n"
                             f"{again.stderr[-4000:]}")
        return {
            "config": name,
            "tracking": tracking,
            "cores": cores,
            "wall_s": round(wall, 1),
            "noop_rerun_s": round(noop, 2),
            "rule_s": rule_times(done.stderr),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "device": "cpu",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tracking", nargs="+", default=["on"], choices=["on", "off"],
                        help="MLflow on, off or both (alternately, for the overhead)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each config and tracking setting")
    args = parser.parse_args()
    records = json.loads(OUT.read_text()) if OUT.exists() else []
    for name in args.configs:
        for _ in range(args.repeats):
            for tracking in args.tracking:
                record = run(name, args.cores, tracking=tracking == "on")
                records.append(record)
                # Written after every run: an interrupted series keeps what it measured.
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps(records, indent=2) + "\n")
                print(f"{name:8s} tracking {tracking:3s} {record['wall_s']:7.1f} s  "
                      f"(no-op rerun {record['noop_rerun_s']:.1f} s)  " +
                      "  ".join(f"{k} {v:.0f}" for k, v in record["rule_s"].items()), flush=True)


if __name__ == "__main__":
    main()
