"""The dynamic response beside the static one and PRESCIENT's recipe: fate proportions of held-out conditions.

Run by hand: ``python bench/perturbation_fates.py [--seeds 0 1 2] [--jobs 2] [--set KEY=VALUE ...] [--output PATH]``
(``--set diffusion=0.5``: a ``perturb`` setting other than the config's, recorded with the run).

Data: the built-in synthetic dataset of ``config/config.yaml`` (the control, 8 knock-downs, 2 drugs
and a combination, 300 cells each, 6 time points), after QC with that config's defaults, made in a
temporary folder (nothing is written under results/). For every seed and every held-out condition
of the default config (``holdout_conditions: auto``), one perturb job exactly as the workflow runs
it (:func:`virtualcell.perturbation.perturb`, the config's ``perturb`` section with that seed): the
static model, its baselines and the dynamic model are trained without the condition. Scored: each
method's fate proportions at the last time point against the generator's truth (many rollouts of
the true SDE under the condition's landscape), as the largest absolute error over the fates:

* ``dynamic``: control cells of the first time point simulated to the last by the conditioned SDE
  under the condition's embedding;
* ``prescient``: the same cells knocked down, then the control's dynamics (PRESCIENT, Yeo et al.
  2021; knock-downs only);
* ``model``, ``linear``, ``mean_perturbed``, ``control``: control cells of the last time point
  moved by the static model and the baselines;
* ``observed``: the held-out condition's own real cells at the last time point (~50 cells: the
  sampling floor of anything read off real cells), ``ceiling`` half of them moved like predictions.

Wall time per job (one torch thread) is recorded; ``--jobs`` jobs run at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import results_file  # bench/results_file.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "perturbation_fates.json"


def make_data(workdir: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The synthetic dataset after QC (config/config.yaml defaults), written to ``workdir``; the perturb
    section of that config and its held-out conditions."""
    import yaml

    from virtualcell import config as vc
    from virtualcell import io, qc
    from virtualcell.perturbation import holdout_conditions

    cfg = vc.validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    spec = cfg["datasets"]["synthetic"]
    filtered, _ = qc.run_qc(io.read_dataset("synthetic", spec), origin="synthetic (bench)", **cfg["qc"])
    path = workdir / "qc.h5mu"
    io.write_h5mu(filtered, path)
    return path, dict(cfg["perturb"]), holdout_conditions("synthetic", spec)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["diffusion=0.5"]`` -> ``{"diffusion": 0.5}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. diffusion=0.5")
        out[key] = yaml.safe_load(value)
    return out


def one_job(path: str, condition: str, params: dict[str, Any], seed: int, workdir: str) -> dict[str, Any]:
    import torch

    from virtualcell import io
    from virtualcell.perturbation import perturb
    from virtualcell.tracking import NullRun

    torch.set_num_threads(1)
    out = Path(workdir) / f"{condition}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    perturb(input=path, condition=condition, control="control", output=str(out / "metrics.json"),
            model=str(out / "model.pt"), cells=str(out / "predicted.h5ad"), figure=str(out / "response.png"),
            params=params | {"seed": seed}, device="cpu", run=NullRun())
    result = io.read_json(out / "metrics.json")
    return {"condition": condition, "seed": seed, "wall_s": time.perf_counter() - start,
            "fate": result["fate"], "fate_error": result["fate_error"]}


def summarise(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per condition and over all of them: each method's fate error, mean and std over seeds."""
    out: dict[str, Any] = {}
    conditions = sorted({j["condition"] for j in jobs})
    for name in [*conditions, "mean"]:
        mine = [j for j in jobs if name in ("mean", j["condition"])]
        methods = sorted(set.intersection(*(set(j["fate_error"]) for j in mine)))
        if name == "mean":  # the mean over conditions of each seed, then over seeds
            per_seed = {m: [np.mean([j["fate_error"][m] for j in mine if j["seed"] == s and m in j["fate_error"]])
                            for s in sorted({j["seed"] for j in mine})] for m in methods}
        else:
            per_seed = {m: [j["fate_error"][m] for j in mine] for m in methods}
        out[name] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in per_seed.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="perturb settings other than config/config.yaml's, e.g. diffusion=0.5 dynamic_epochs=300")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path, params, held = make_data(Path(tmp))
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            parser.error(f"--set: {', '.join(unknown)} not in the config's perturb section ({', '.join(params)})")
        params |= overrides
        print(f"held-out conditions {held}, seeds {args.seeds}, perturb params {params}", flush=True)
        tasks = [(str(path), c, params, s, tmp) for s in args.seeds for c in held]
        jobs = []
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            for job in pool.map(one_job, *zip(*tasks, strict=True)):
                print(f"{job['condition']} seed {job['seed']} ({job['wall_s']:.0f} s): " + ", ".join(
                    f"{m} {e:.3f}" for m, e in sorted(job["fate_error"].items())), flush=True)
                jobs.append(job)
    summary = summarise(jobs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {"date": dt.date.today().isoformat(), "commit": commit.strip(), "machine": f"{os.cpu_count()} CPU cores",
              "params": params, "overrides": overrides, "seeds": args.seeds, "held_out": held, "fate_error": summary,
              "jobs": jobs}
    results_file.append(args.output, result)
    for name, per in summary.items():
        print(f"{name}: " + ", ".join(f"{m} {v['mean']:.3f} ± {v['std']:.3f}" for m, v in sorted(per.items())))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
