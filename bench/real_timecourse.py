"""A real time course as published (RNA only, log values): our simulator beside OT interpolation.

Run by hand: ``python bench/real_timecourse.py [--cells-per-stage 100] [--variants ...]``.

The Arabidopsis root series (statOT's example data, log1p-normalised values, 3 developmental zones
as time points 0, 1, 2; see ``virtualcell.examples``) goes through ``config/real_timecourse.yaml``
once per variant (simulator method x space), each in a fresh folder, with every setting but the
variant's as the config has it. The elongation zone (t=1) is held out; the record holds, in pca5,
the model's W1 and every baseline of the same run (OT interpolation, copying a neighbour,
random pairs, the noise floor, and for embedding-space models the decoder's own floor), the ratio
model / ot_interp (the published state of the art reaches 0.89-0.96 on real time courses), and the
wall time. Appends to bench/results/real_timecourse.json and prints a table.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "real_timecourse.json"
VARIANTS = {
    "sf2m_embedding": {"method": "sf2m", "space": "embedding"},
    "ot_cfm_embedding": {"method": "ot_cfm", "space": "embedding"},
    "sf2m_pca": {"method": "sf2m", "space": "pca"},
    "ot_cfm_pca": {"method": "ot_cfm", "space": "pca"},
}


def run(variant: str, cells_per_stage: int, cores: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"vc-real-{variant}-") as workdir:
        work = Path(workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
        subprocess.run([sys.executable, "-m", "virtualcell.examples", "arabidopsis_root", "data/arabidopsis_root.h5ad",
                        "--cells-per-stage", str(cells_per_stage)], cwd=work, env=env, check=True)
        config = yaml.safe_load((REPO / "config" / "real_timecourse.yaml").read_text())
        config["simulate"] |= VARIANTS[variant]
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
               "--replace-workflow-config", "--configfile", "config.yaml"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
        metrics = json.loads((work / "results" / "arabidopsis_root" / "evaluate" / "metrics.json").read_text())
    held = metrics["simulation"]["holdouts"]["1"]
    w1 = held["w1_pca5"]
    return {
        "variant": variant,
        "simulate": VARIANTS[variant],
        "cells_per_stage": cells_per_stage,
        "seeds": metrics["simulation"]["n_seeds"],
        "w1_pca5": w1,
        "w1_pca5_model_std": held["std"]["w1_pca5"]["model"],
        "ratio_model_to_ot_interp": w1["model"] / w1["ot_interp"],
        "wall_s": round(wall, 1),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cells-per-stage", type=int, default=100)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    records = [run(v, args.cells_per_stage, args.cores) for v in args.variants]
    history = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(history + records, indent=1))
    print("| variant | model W1 | ot_interp | copy_prev | copy_next | decoded_truth | noise_floor | model/ot_interp | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        w = r["w1_pca5"]
        print(f"| {r['variant']} | {w['model']:.3f} ± {r['w1_pca5_model_std']:.3f} | {w['ot_interp']:.3f} | "
              f"{w['copy_prev']:.3f} | {w['copy_next']:.3f} | {w.get('decoded_truth', float('nan')):.3f} | "
              f"{w['noise_floor']:.3f} | {r['ratio_model_to_ot_interp']:.2f} | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
