"""Embedding training throughput: the joint RNA + protein CountEncoder beside scvi-tools' totalVI (issue 15.1).

Run by hand (scvi-tools from the bench extra: ``pip install -c constraints.txt -e '.[bench]'``)::

    python bench/encoder_throughput.py [--cells 20000] [--genes 2000] [--proteins 50] [--epochs 5]

Same data for both: the built-in generator's cells (raw RNA and ADT counts, sparse), same latent size
(20), batch size (256) and epochs, one torch thread each, CPU, no validation split. Each method runs in
its own subprocess (so its peak RSS is its own); its throughput is cells / median epoch time over
epochs 2..E (the first pays for setup and warm-up). totalVI keeps its own defaults otherwise (its
encoder and decoder, its protein background model); ours keeps the workflow's ``embed`` defaults.
Appends a record to bench/results/encoder_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_file  # bench/results_file.py, beside this script

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "encoder_throughput.json"
N_LATENT = 20
BATCH = 256


def _data(path: str):
    import mudata as md

    mdata = md.read_h5mu(path)
    return mdata["rna"], mdata["prot"]


def ours(path: str, epochs: int, seed: int) -> dict:
    import scipy.sparse as sp
    import yaml

    from virtualcell.models.vae import CountEncoder

    rna, prot = _data(path)
    x = sp.hstack([sp.csr_matrix(rna.X), sp.csr_matrix(prot.X)], format="csr")
    embed = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["embed"]
    model = CountEncoder([rna.n_vars, prot.n_vars], n_latent=N_LATENT, n_hidden=embed["n_hidden"],
                         n_layers=embed["n_layers"], dropout=embed["dropout"])
    stamps = [time.perf_counter()]
    history = model.fit(x, epochs=epochs, batch_size=BATCH, lr=embed["lr"], device="cpu", seed=seed,
                        on_epoch=lambda epoch, metrics: stamps.append(time.perf_counter()))
    return {"epoch_s": [b - a for a, b in zip(stamps, stamps[1:])], "final_loss": history[-1]["loss"]}


def totalvi(path: str, epochs: int, seed: int) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import scvi
    from lightning.pytorch.callbacks import Callback

    rna, prot = _data(path)
    adata = rna.copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.obsm["protein"] = np.asarray(prot.X.toarray() if sp.issparse(prot.X) else prot.X)
    scvi.settings.seed = seed
    scvi.settings.num_threads = 1
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein")
    model = scvi.model.TOTALVI(adata, n_latent=N_LATENT)

    class EpochTimer(Callback):
        def __init__(self):
            self.epoch_s: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.epoch_s.append(time.perf_counter() - self._start)

    timer = EpochTimer()
    model.train(max_epochs=epochs, batch_size=BATCH, train_size=1.0, early_stopping=False, accelerator="cpu",
                devices=1, enable_progress_bar=False, callbacks=[timer], limit_val_batches=0)
    loss = model.history["elbo_train"].iloc[-1, 0]
    return {"epoch_s": timer.epoch_s, "final_loss": float(loss)}


METHODS = {"ours": ours, "totalvi": totalvi}


def make_data(path: str, cells: int, genes: int, proteins: int, seed: int) -> None:
    """The generator's RNA and protein counts (no tissue section) as one .h5mu."""
    from virtualcell import synthetic

    mdata = synthetic.generate(n_cells=cells, n_genes=genes, n_proteins=proteins, seed=seed, n_spots=1)
    del mdata.mod["spatial"]
    mdata.update()
    mdata.write(path)


def child(method: str, path: str, epochs: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    result = METHODS[method](path, epochs, seed)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--proteins", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--make-data", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="what this record measures (kept with it)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.epochs, args.seed)
        return
    if args.make_data:
        make_data(args.make_data, args.cells, args.genes, args.proteins, args.seed)
        return

    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cells": args.cells, "genes": args.genes,
              "proteins": args.proteins, "epochs": args.epochs, "n_latent": N_LATENT, "batch_size": BATCH,
              "threads": 1, "device": "cpu", "note": args.note,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "methods": {}}
    with tempfile.TemporaryDirectory(prefix="vc-throughput-") as tmp:
        path = str(Path(tmp) / "data.h5mu")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # Generated in a child too: Linux keeps a process's peak RSS across fork and exec, so the
        # methods' children would otherwise report this process's peak as their own.
        subprocess.run([sys.executable, __file__, "--make-data", path, "--cells", str(args.cells), "--genes",
                        str(args.genes), "--proteins", str(args.proteins), "--seed", str(args.seed)],
                       env=env, check=True, capture_output=True)
        for method in args.methods:
            done = subprocess.run([sys.executable, __file__, "--child", method, path, "--epochs", str(args.epochs),
                                   "--seed", str(args.seed)], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{method} failed:\n{done.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            steady = result["epoch_s"][1:] or result["epoch_s"]
            result["cells_per_s"] = round(args.cells / statistics.median(steady), 1)
            record["methods"][method] = result
            print(f"{method:8s} {result['cells_per_s']:9.1f} cells/s  (epochs "
                  + ", ".join(f"{s:.2f}" for s in result["epoch_s"]) + f" s; peak RSS {result['peak_rss_mb']:.0f} MB)",
                  flush=True)
    if {"ours", "totalvi"} <= set(record["methods"]):
        record["speedup"] = round(record["methods"]["ours"]["cells_per_s"] / record["methods"]["totalvi"]["cells_per_s"], 2)
        print(f"ours / totalVI: {record['speedup']:.2f}x (target >= 3x)")
    results_file.append(OUT, record)


if __name__ == "__main__":
    main()
