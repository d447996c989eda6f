"""Training on counts larger than memory: the encoder streams minibatches from an on-disk .h5ad (issue 15.4).

Run by hand::

    python bench/streaming.py [--cells 100000 1000000] [--genes 2000] [--epochs 2] [--workdir DIR]

For each size an .h5ad of raw counts (CSR, float32) is written a block at a time (never whole in
memory): cells of 12 types, each type's expression profile a Dirichlet draw, library sizes
log-normal around 2,500 UMIs, counts gamma-Poisson (negative binomial, inverse dispersion 2). Then,
each in its own subprocess, one torch thread, CPU:

- ``streamed``: ``CountEncoder.fit`` on ``read_h5ad(path, backed="r").X``, the matrix left on disk
  (``train.minibatches`` reads buffers of random chunks of rows);
- ``in_memory`` (sizes up to ``--in-memory-max``): the same matrix read whole as scipy CSR first.

Throughput = cells / epoch time, over the epochs after the first; peak RSS from ``getrusage``.
Targets: streamed peak RSS flat from 10^5 to 10^6 cells, streamed throughput within 20 % across
sizes. Appends a record to bench/results/streaming.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_file  # bench/results_file.py, beside this script

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "streaming.json"
BLOCK = 20_000
N_TYPES = 12


def make_data(path: str, cells: int, genes: int, seed: int) -> None:
    """Write the counts block by block: X grows on disk through anndata's sparse_dataset.append."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.full(genes, 0.3), size=N_TYPES).astype(np.float32)
    types = []
    for start in range(0, cells, BLOCK):
        n = min(BLOCK, cells - start)
        kind = rng.integers(N_TYPES, size=n)
        library = rng.lognormal(np.log(2500.0), 0.3, size=n).astype(np.float32)
        rate = profiles[kind] * library[:, None]
        counts = rng.poisson(rng.gamma(2.0, rate / 2.0)).astype(np.float32)
        block = sp.csr_matrix(counts)
        if start == 0:
            first = ad.AnnData(X=block, var=pd.DataFrame(index=[f"gene{g:05d}" for g in range(genes)]))
            first.write_h5ad(path)
        else:
            with h5py.File(path, "a") as f:
                sparse_dataset(f["X"]).append(block)
        types.append(kind)
        print(f"  wrote {start + n:,}/{cells:,} cells", file=sys.stderr, flush=True)
    with h5py.File(path, "a") as f:
        del f["obs"]
        obs = pd.DataFrame({"cell_type": pd.Categorical(np.concatenate(types).astype(str))},
                           index=[f"cell{i:07d}" for i in range(cells)])
        write_elem(f, "obs", obs)


def fit(path: str, mode: str, epochs: int, seed: int) -> dict:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from virtualcell.models.vae import CountEncoder

    started = time.perf_counter()
    data = ad.read_h5ad(path, backed="r")
    x = data.X if mode == "streamed" else sp.csr_matrix(data.X[:], dtype=np.float32)
    read_s = time.perf_counter() - started
    model = CountEncoder([x.shape[1]], n_latent=10, n_hidden=128, n_layers=1, dropout=0.1)
    stamps = [time.perf_counter()]
    model.fit(x, epochs=epochs, batch_size=256, lr=1e-3, device="cpu", seed=seed,
              on_epoch=lambda epoch, metrics: stamps.append(time.perf_counter()))
    return {"read_s": round(read_s, 2), "epoch_s": [round(b - a, 2) for a, b in zip(stamps, stamps[1:])]}


def child(path: str, mode: str, epochs: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    result = fit(path, mode, epochs, seed)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-memory-max", type=int, default=100_000,
                        help="also train in memory on sizes up to this many cells")
    parser.add_argument("--workdir", help="keep the .h5ad files here (and reuse them)")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--make-data", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.epochs, args.seed)
        return
    if args.make_data:
        make_data(args.make_data, args.cells[0], args.genes, args.seed)
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vc-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "genes": args.genes, "epochs": args.epochs,
              "batch_size": 256, "threads": 1, "device": "cpu",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "runs": []}
    try:
        for cells in args.cells:
            path = workdir / f"counts_{cells}x{args.genes}.h5ad"
            if not path.exists():
                started = time.perf_counter()
                # In a child: its memory is its own (and Linux keeps a peak RSS across fork and exec).
                subprocess.run([sys.executable, __file__, "--make-data", str(path), "--cells", str(cells), "--genes",
                                str(args.genes), "--seed", str(args.seed)], env=env, check=True)
                print(f"{cells:,} cells written in {time.perf_counter() - started:.0f} s "
                      f"({path.stat().st_size / 2**30:.2f} GiB)", flush=True)
            for mode in ("streamed", "in_memory"):
                if mode == "in_memory" and cells > args.in_memory_max:
                    continue
                done = subprocess.run([sys.executable, __file__, "--child", str(path), mode, "--epochs",
                                       str(args.epochs), "--seed", str(args.seed)], env=env, capture_output=True,
                                      text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{mode} on {cells} cells failed:\n{done.stderr[-4000:]}")
                result = json.loads(lines[-1][len("RESULT "):])
                steady = result["epoch_s"][1:] or result["epoch_s"]
                result.update(cells=cells, mode=mode, file_gib=round(path.stat().st_size / 2**30, 2),
                              cells_per_s=round(cells / (sum(steady) / len(steady)), 1))
                record["runs"].append(result)
                print(f"{cells:>9,} {mode:9s} {result['cells_per_s']:9.1f} cells/s  peak RSS "
                      f"{result['peak_rss_mb']:8.1f} MB  (read {result['read_s']} s, epochs {result['epoch_s']} s)",
                      flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results_file.append(OUT, record)


if __name__ == "__main__":
    main()
