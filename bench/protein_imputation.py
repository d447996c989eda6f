"""Protein from RNA on real CITE-seq cells: our pipeline's predictor beside scvi-tools' totalVI imputation.

Run by hand (never in the test suite), with scvi-tools in one of two places::

    # the newest scvi-tools (1.5 needs Python >= 3.12): its own virtual environment, run as a subprocess
    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/vscvi
    /tmp/vscvi/bin/pip install torch==2.13.0 scvi-tools==1.5.1 anndata==0.13.4 mudata==0.4.1
    python bench/protein_imputation.py --python /tmp/vscvi/bin/python [--workdir DIR] [--max-epochs 400]

    # or scvi-tools 1.4.2 (the last for Python 3.11) beside the project's pins: the `bench` extra
    pip install -c constraints.txt -e '.[bench]'
    python bench/protein_imputation.py

Data and split: ``config/real_citeseq.yaml`` (10x pbmc_10k_protein_v3, a 100-gene slice + 17
antibodies, 1,024 cells before QC) runs through the whole workflow (``snakemake --cores 1``) in
``--workdir`` (default: a temporary folder, removed afterwards); a folder that already holds that
run's ``results/pbmc_citeseq`` is reused unless ``--rerun``. The pipeline's QC'd cells and its
train/val/test split (``obs["split"]`` of ``align/shared.h5ad``) are the bench's cells and split.

Target: the measured protein of the test cells as the pipeline makes it, CLR of the raw ADT counts
(``obsm["X_input_prot"]`` = ``virtualcell.qc.clr`` of ``mod["prot"].layers["counts"]``).

Methods, each scored on the test cells only with ``virtualcell.crossmodal.pearson_per_feature``
(mean over proteins) and ``pearson_per_cell`` (mean over cells), NaNs left out as the pipeline does:

* ``model``: the pipeline's predictor (``obsm["X_predicted_prot"]``: protein from RNA alone, trained
  on the train cells). Recomputed here and checked against ``evaluate/metrics.json``.
* ``cca``, ``knn``, ``ridge``, ``random``: the pipeline's baselines, read from ``metrics.json`` (fitted
  there on the train cells' 30 RNA PCs).
* ``totalvi``: scvi-tools' TOTALVI, run as a subprocess of this script by the ``--python``
  interpreter (default: this one; a separate virtual environment keeps the project's pins
  untouched). That part imports numpy, anndata and scvi-tools only. It is fitted on
  every QC'd cell's raw RNA counts (the genes the pipeline used: ``var["highly_variable"]``) and raw
  ADT counts, with the protein of every cell outside the train split (val and test) set to zero and
  those cells put in their own batch, so that totalVI treats their protein as missing (its
  ``protein_batch_mask``; it then also trains its adversarial batch classifier, its default for
  missing proteins). Like the pipeline's predictor it therefore sees measured protein of the train
  cells only; unlike it, it also sees the test cells' RNA while training (totalVI imputes
  transductively). Everything else is scvi-tools' default (n_latent 20, NB genes, lr 4e-3,
  batch 256, its own 90/10 train/validation split of the cells with early stopping and LR
  reduction on plateau), except ``max_epochs`` (``--max-epochs``, default 400: scvi-tools'
  heuristic gives 400 for fewer than 20,000 cells), the CPU (``--accelerator``), one torch thread
  (``--threads``) and the seed (``scvi.settings.seed``, ``--seed``). The test cells' protein is then imputed with
  ``get_normalized_expression(indices=test, transform_batch="observed", n_samples=25,
  return_mean=True)`` (the defaults: foreground only, no background, no mixing sample; as in
  scvi-tools' CITE-seq/scRNA-seq integration tutorial), i.e. expected ADT counts of the cell had it
  been measured in the training batch, and put on the target's scale with ``virtualcell.qc.clr``
  (log1p, minus each cell's mean over proteins). Two other readings are recorded beside it
  (``totalvi_variants``): CLR of the expected counts with the background included, and plain log1p.

Appends one record (date, versions, machine, epochs, all numbers, wall times) to
``bench/results/protein_imputation.json`` (``--output``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "protein_imputation.json"
CONFIG = REPO / "config" / "real_citeseq.yaml"
DATASET = "pbmc_citeseq"
TESTDATA = "pbmc_10k_protein_v3_mtx"
OBSERVED, MISSING = "observed", "protein_missing"  # totalVI's batches
METHODS = ("model", "totalvi", "cca", "knn", "ridge", "random")
METRICS = ("pearson_per_protein", "pearson_per_cell")


# ---------------------------------------------------------------------------
# totalVI worker: runs in the scvi-tools interpreter, imports nothing of the project


def totalvi_worker(args: argparse.Namespace) -> None:
    """Fit totalVI on ``args.input`` (written by :func:`write_totalvi_input`), impute the test cells' protein."""
    import anndata as ad
    import scvi
    import torch

    scvi.settings.seed = args.seed
    scvi.settings.num_threads = args.threads
    adata = ad.read_h5ad(args.input)
    test = np.flatnonzero(adata.obs["split"].to_numpy() == "test")
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                     protein_names_uns_key="protein_names", batch_key="batch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = scvi.model.TOTALVI(adata)
    missing = bool(getattr(model, "_use_adversarial_classifier", False))
    if not missing:
        raise SystemExit("totalVI did not treat the masked cells' protein as missing: "
                         + "; ".join(str(w.message) for w in caught))
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, accelerator=args.accelerator)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    readings = {}
    for name, background in (("foreground", False), ("with_background", True)):
        _, protein = model.get_normalized_expression(indices=test, transform_batch=OBSERVED, n_samples=25,
                                                     return_mean=True, include_protein_background=background,
                                                     return_numpy=True)
        readings[name] = np.asarray(protein, dtype=np.float64)
    impute_s = time.perf_counter() - start
    history = model.history
    elbo_val = history.get("elbo_validation")
    info = {
        "epochs_trained": int(len(history["elbo_train"])),
        "max_epochs": args.max_epochs,
        "early_stopped": int(len(history["elbo_train"])) < args.max_epochs,
        "elbo_validation_last": None if elbo_val is None else float(elbo_val.iloc[-1, 0]),
        "train_s": round(train_s, 1),
        "impute_s": round(impute_s, 1),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_proteins": int(adata.obsm["protein_expression"].shape[1]),
        "protein_missing_detected": missing,
        "adversarial_classifier": missing,
        "accelerator": str(model.device),
        "threads": args.threads,
        "seed": args.seed,
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__, "anndata": ad.__version__,
                     "python": platform.python_version()},
    }
    np.savez(args.output, test=test, **readings)
    Path(args.output).with_suffix(".json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------
# main side: the project's interpreter


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SNAKEMAKE_"))}


def run_pipeline(work: Path, testdata: Path | None) -> float:
    """Fetch the data (into ``testdata``, linked into ``work/data/testdata``) and run the workflow; its wall time."""
    env = _clean_env()
    target = work / "data" / "testdata"
    target.parent.mkdir(parents=True, exist_ok=True)
    if testdata is not None and not target.exists():
        testdata.mkdir(parents=True, exist_ok=True)
        target.symlink_to(testdata.resolve(), target_is_directory=True)
    env["VIRTUALCELL_TESTDATA"] = str(target)
    subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_test_data.py"), TESTDATA],
                   cwd=work, env=env, check=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1",
           "--replace-workflow-config", "--configfile", str(CONFIG)]
    print("running:", " ".join(cmd), f"(in {work})", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "snakemake.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the workflow failed (log: {work / 'snakemake.log'}):\n{done.stderr[-4000:]}")
    return wall


def job_seconds(work: Path) -> dict[str, float]:
    """Wall seconds of each job of the run, from Snakemake's ``benchmarks/<dataset>/<rule>.tsv``."""
    out = {}
    for tsv in sorted((work / "benchmarks" / DATASET).glob("*.tsv")):
        rows = tsv.read_text().splitlines()
        if len(rows) >= 2:
            out[tsv.stem] = round(float(rows[-1].split("\t")[0]), 1)
    return out


def load(work: Path):
    import anndata as ad
    import mudata as md

    results = work / "results" / DATASET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        shared = ad.read_h5ad(results / "align" / "shared.h5ad")
        paired = md.read_h5mu(results / "pairs" / "paired.h5mu")
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    return shared, paired, metrics


def write_totalvi_input(shared, paired, path: Path) -> dict[str, int]:
    """The cells' raw RNA counts (the pipeline's genes) and ADT counts, protein zeroed outside the train split."""
    import anndata as ad
    import scipy.sparse as sp

    rna, prot = paired.mod["rna"], paired.mod["prot"]
    if not (rna.obs_names.equals(shared.obs_names) and prot.obs_names.equals(shared.obs_names)):
        raise SystemExit("paired.h5mu and shared.h5ad hold different cells")
    names = [str(n) for n in shared.uns["partner_features"]]
    if [str(n) for n in prot.var_names] != names:
        raise SystemExit("paired.h5mu's proteins are not shared.h5ad's partner_features")
    hvg = rna.var["highly_variable"].to_numpy(bool) if "highly_variable" in rna.var else np.ones(rna.n_vars, bool)
    counts = sp.csr_matrix(rna.layers["counts"][:, hvg]).astype(np.float32)
    protein = np.asarray(sp.csr_matrix(prot.layers["counts"]).todense(), dtype=np.float32)
    split = shared.obs["split"].astype(str).to_numpy()
    observed = split == "train"
    protein[~observed] = 0.0
    data = ad.AnnData(X=counts, obs={"split": split, "batch": np.where(observed, OBSERVED, MISSING)})
    data.obs_names = shared.obs_names
    data.var_names = rna.var_names[hvg]
    data.obsm["protein_expression"] = protein
    data.uns["protein_names"] = np.array(names)
    data.write_h5ad(path)
    return {"genes": int(hvg.sum()), "cells": int(data.n_obs), "protein_observed_cells": int(observed.sum())}


def run_totalvi(python: str, path: Path, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict]:
    out = path.with_name("totalvi_out.npz")
    cmd = [python, str(Path(__file__).resolve()), "--totalvi-worker", "--input", str(path), "--output", str(out),
           "--max-epochs", str(args.max_epochs), "--seed", str(args.seed), "--threads", str(args.threads),
           "--accelerator", args.accelerator]
    print("running totalVI:", " ".join(cmd), flush=True)
    env = _clean_env() | {"OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"totalVI failed:\n{(done.stdout + done.stderr)[-6000:]}")
    with np.load(out) as arrays:
        readings = {k: arrays[k] for k in arrays.files}
    info = json.loads(out.with_suffix(".json").read_text())
    info["wall_s"] = round(wall, 1)  # process start, imports, fit and imputation
    return readings, info


def summary(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    from virtualcell.crossmodal import pearson_per_cell, pearson_per_feature

    return {"pearson_per_protein": float(np.nanmean(pearson_per_feature(pred, true))),
            "pearson_per_cell": float(np.nanmean(pearson_per_cell(pred, true)))}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def bench(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    from virtualcell.qc import clr

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vc-protein-bench-")))
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        metrics_file = work / "results" / DATASET / "evaluate" / "metrics.json"
        pipeline_wall = None
        if args.rerun and (work / "results").exists():
            shutil.rmtree(work / "results")
        if not metrics_file.exists():
            pipeline_wall = round(run_pipeline(work, args.testdata), 1)
        else:
            print(f"reusing the workflow's results in {work}", flush=True)
        jobs = job_seconds(work)
        shared, paired, metrics = load(work)
        split = shared.obs["split"].astype(str).to_numpy()
        test = split == "test"
        true = np.asarray(shared.obsm["X_input_prot"], dtype=np.float64)[test]
        check = np.abs(clr(paired.mod["prot"].layers["counts"])[test] - true).max()
        if check > 1e-5:
            raise SystemExit(f"X_input_prot is not qc.clr of the protein counts (max difference {check:g})")

        pipeline = metrics["prediction"]["protein_from_rna"]
        baselines = ("cca", "knn", "ridge", "random")
        scores = {m: {metric: float(pipeline[metric][m]) for metric in METRICS} for m in baselines}
        scores["model"] = summary(np.asarray(shared.obsm["X_predicted_prot"], dtype=np.float64)[test], true)
        for metric in METRICS:
            if abs(scores["model"][metric] - pipeline[metric]["model"]) > 1e-6:
                raise SystemExit(f"model {metric}: recomputed {scores['model'][metric]:.6f}, "
                                 f"metrics.json {pipeline[metric]['model']:.6f}")

        sizes = write_totalvi_input(shared, paired, work / "totalvi_in.h5ad")
        readings, info = run_totalvi(args.python, work / "totalvi_in.h5ad", args)
        if not np.array_equal(readings["test"], np.flatnonzero(test)):
            raise SystemExit("totalVI imputed other cells than the test split")
        scores["totalvi"] = summary(clr(readings["foreground"]), true)
        variants = {"clr_with_background": summary(clr(readings["with_background"]), true),
                    "log1p_foreground": summary(np.log1p(readings["foreground"]), true)}

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "device": "cpu" if info["accelerator"] == "cpu" else info["accelerator"],
        "config": "config/real_citeseq.yaml",
        "cells": {"qc_passed": sizes["cells"], "train": int((split == "train").sum()),
                  "val": int((split == "val").sum()), "test": int(test.sum())},
        "genes": sizes["genes"],
        "proteins": [str(n) for n in shared.uns["partner_features"]],
        "scores": {m: scores[m] for m in METHODS},
        "target_met": scores["model"]["pearson_per_protein"] >= scores["totalvi"]["pearson_per_protein"],
        "totalvi": info | {"protocol": "protein of non-train cells zeroed in their own batch (missing); imputed with "
                                       "transform_batch=observed, n_samples=25, foreground; scored as qc.clr of it"},
        "totalvi_variants": variants,
        "wall_s": {"pipeline_total": pipeline_wall, "pipeline_jobs": jobs,
                   "model_embed_plus_align": round(jobs.get("embed", 0.0) + jobs.get("align", 0.0), 1) or None,
                   "totalvi_process": info["wall_s"], "totalvi_train": info["train_s"]},
        "versions": {"project_python": platform.python_version(),
                     **{p: version(p) for p in ("torch", "scanpy", "anndata", "mudata", "scikit-learn")},
                     "totalvi_env": info["versions"]},
    }


def print_table(record: dict) -> None:
    s, w = record["scores"], record["wall_s"]
    walls = {"model": w["model_embed_plus_align"], "totalvi": w["totalvi_train"]}
    print(f"\n{record['cells']['test']} test cells, {len(record['proteins'])} proteins, {record['genes']} genes; "
          f"totalVI {record['totalvi']['epochs_trained']} epochs (max {record['totalvi']['max_epochs']})")
    print("| method | per-protein Pearson | per-cell Pearson | wall |")
    print("|---|---|---|---|")
    for m in METHODS:
        wall = f"{walls[m]:.0f} s" if walls.get(m) else ""
        print(f"| {m} | {s[m]['pearson_per_protein']:.3f} | {s[m]['pearson_per_cell']:.3f} | {wall} |")
    for name, v in record["totalvi_variants"].items():
        print(f"| totalvi ({name}) | {v['pearson_per_protein']:.3f} | {v['pearson_per_cell']:.3f} | |")
    print(f"target (model per-protein >= totalVI's): {'met' if record['target_met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with scvi-tools that runs the totalVI part (default: this one)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the workflow run, reused if it has results (default: a temporary folder)")
    parser.add_argument("--rerun", action="store_true", help="run the workflow again even if --workdir has results")
    parser.add_argument("--testdata", type=Path, default=None,
                        help="test-data cache to fetch into and link (default: a fresh download into the work folder)")
    parser.add_argument("--max-epochs", type=int, default=400,
                        help="totalVI's max_epochs (early stopping may end sooner)")
    parser.add_argument("--seed", type=int, default=0, help="scvi.settings.seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the totalVI fit")
    parser.add_argument("--accelerator", default="cpu", help="lightning accelerator of the totalVI fit")
    parser.add_argument("--output", type=Path, default=OUT, help="JSON list the record is appended to")
    parser.add_argument("--totalvi-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.totalvi_worker:
        args.output = str(args.output)
        totalvi_worker(args)
        return
    found = subprocess.run([args.python, "-c", "import scvi"], capture_output=True, text=True)
    if found.returncode != 0:
        parser.error(f"{args.python} cannot import scvi-tools; pass --python (see the module docstring):\n"
                     + found.stderr.strip().splitlines()[-1])
    record = bench(args)
    history = json.loads(args.output.read_text()) if args.output.exists() else []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(history + [record], indent=1) + "\n")
    print_table(record)
    print(f"appended to {args.output}")


if __name__ == "__main__":
    main()
