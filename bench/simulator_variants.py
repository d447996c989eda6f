"""The simulator's variants side by side in the whole workflow: held-out W1, extrapolation and fates.

Run by hand: ``python bench/simulator_variants.py [--workdir DIR] [--variants default marginal_pca ...]
[--seeds 1] [--cores 2]``. The first variant runs the whole default config with its override in
``DIR`` (a temporary folder unless given; a kept one is reused), then each next variant's
``simulate:`` override reruns only the simulate, decode and evaluate jobs on the same ingested, QC'd and aligned cells (``--forcerun simulate decode``, so a
variant whose settings equal the last run's is trained again rather than skipped, and the decoder, which
reads ``simulate``'s batch size, epochs and width too, with it; ``--rerun-triggers mtime``, so a kept
folder whose upstream jobs last ran with other settings is not rerun whole). Every variant is scored
by the workflow's own evaluate job against the baselines and the oracle of the same run, so only
the simulator differs. Appends one record to bench/results/simulator_variants.json and prints a
table. ``evaluate.seeds`` is ``--seeds`` for every variant (1 by default: ~5 minutes a variant on 2
cores; 3 as the default config, ~3x).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import append  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "simulator_variants.json"
# name -> the simulate section's overrides on top of config/config.yaml (whatever its defaults are).
VARIANTS: dict[str, dict] = {
    "default": {},
    "sf2m": {"method": "sf2m", "batch_size": 256},
    "sf2m_pca": {"method": "sf2m", "space": "pca", "batch_size": 256},
    "marginal_pca": {"method": "marginal", "space": "pca", "diffusion": 0.1, "batch_size": 128},
    "marginal_pca_g0.3": {"method": "marginal", "space": "pca", "diffusion": 0.3, "batch_size": 128},
    "marginal_embedding": {"method": "marginal", "diffusion": 0.1, "batch_size": 128},
    "marginal_pca_kinetic0.003": {"method": "marginal", "space": "pca", "diffusion": 0.1, "kinetic": 0.003,
                                  "batch_size": 128},
    "marginal_pca_kinetic0.03": {"method": "marginal", "space": "pca", "diffusion": 0.1, "kinetic": 0.03,
                                 "batch_size": 128},
    "hybrid_w1_pca": {"method": "hybrid", "space": "pca", "marginal_weight": 1.0, "batch_size": 128},
    "hybrid_w10_pca": {"method": "hybrid", "space": "pca", "marginal_weight": 10.0, "batch_size": 128},
    "hybrid_w10": {"method": "hybrid", "marginal_weight": 10.0, "batch_size": 128},
    "hybrid_w30": {"method": "hybrid", "marginal_weight": 30.0, "batch_size": 128},
    # cheaper training (issue 13's 10-minute budget): fewer steps, or fewer cells a step (64: the default
    # since 2026-12-08, measured equal to 128 at 3 seeds)
    "hybrid_epochs40": {"method": "hybrid", "marginal_weight": 10.0, "batch_size": 128, "epochs": 40},
    "hybrid_batch64": {"method": "hybrid", "marginal_weight": 10.0, "batch_size": 64},
    "hybrid_batch64_epochs40": {"method": "hybrid", "marginal_weight": 10.0, "batch_size": 64, "epochs": 40},
}


def headline(metrics: dict) -> dict:
    """The numbers the issue asks for, from one metrics.json."""
    sim = metrics["simulation"]
    mean = sim["mean"]
    last = next(v for v in sim.get("extrapolation", {}).values() if isinstance(v, dict) and "w1_pca5" in v)
    fate = metrics.get("fate", {})
    return {
        "w1_pca5": mean["w1_pca5"],
        "gap_closed": mean.get("gap_closed"),
        "per_holdout_model": {h: v["w1_pca5"]["model"] for h, v in sim["holdouts"].items()},
        "extrapolation_w1_pca5": last["w1_pca5"],
        "fate": {k: fate[k] for k in ("pearson_r", "calibration_error", "auroc_committed") if k in fate},
    }


def run_variant(workdir: Path, name: str, seeds: int, cores: int) -> dict:
    override = workdir / f"variant-{name}.yaml"
    override.write_text(yaml.safe_dump({"simulate": VARIANTS[name], "evaluate": {"seeds": seeds}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
           "--forcerun", "simulate", "decode", "--rerun-triggers", "mtime",
           "--configfile", str(REPO / "config" / "config.yaml"), str(override)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr[-4000:]}")
    metrics = json.loads((workdir / "results" / "synthetic" / "evaluate" / "metrics.json").read_text())
    return {"variant": name, "simulate": VARIANTS[name], "wall_s": round(wall, 1),
            "seeds": metrics["simulation"]["n_seeds"], **headline(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the workflow run here")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vc-bench-variants-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.variants:
            rows.append(run_variant(workdir, name, args.seeds, args.cores))
            r = rows[-1]
            print(f"{name:28s} W1 {r['w1_pca5']['model']:.3f} (ot_interp {r['w1_pca5']['ot_interp']:.3f}, "
                  f"gap closed {r['gap_closed']:+.2f})  extrapolation {r['extrapolation_w1_pca5']['model']:.3f} "
                  f"(copy_last {r['extrapolation_w1_pca5']['copy_last']:.3f})  fate r "
                  f"{r['fate'].get('pearson_r', {}).get('model', float('nan')):.3f}, calibration "
                  f"{r['fate'].get('calibration_error', {}).get('model', float('nan')):.3f}  ({r['wall_s']:.0f} s)",
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    append(args.output, {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "seeds": args.seeds,
        "variants": rows,
    })


if __name__ == "__main__":
    main()
