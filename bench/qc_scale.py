"""QC at atlas scale: chunked QC beside plain scanpy on the same matrix (issue 15.3).

Run by hand::

    python bench/qc_scale.py [--cells 100000 1000000] [--genes 20000] [--workdir DIR]

For each size an ingest-like .h5mu of raw counts (RNA alone, CSR float32, ``layers/counts``
with ``X`` a hard link to it, as the ingest stage's X and counts layer hold the same values)
is written a block at a time, never whole in memory: 20,000 genes (13 ``MT-``, 100
ribosomal), 10 cell types, 20 batches of contiguous cells, 2,000-3,000 UMIs per cell drawn
from the cell's type profile (3 % damaged cells with 30 % of their UMIs mitochondrial).

Then, each in its own subprocess (peak RSS from ``getrusage``), the same operations with the
config's defaults (doublets off in both: scrublet is per batch and the same scanpy call in both;
it would dominate both times):

- ``chunked``: ``virtualcell.qc_chunked.run_qc_chunked`` (config ``qc.chunked``), file to file;
- ``scanpy``: read X whole, ``calculate_qc_metrics`` (mt, ribo), the fixed filters and the
  per-batch MAD outliers (numpy/scipy, as the sc-best-practices book), ``filter_genes``,
  counts layer kept, ``highly_variable_genes(flavor="seurat_v3")``, ``normalize_total``,
  ``log1p``, ``write_h5ad``. Run under an address-space limit (``--scanpy-limit-gib``) so that
  running out of memory is a MemoryError, recorded, not the kernel's OOM killer.

Targets: chunked peak RSS <= 16 GiB at 10^6 x 20,000 and wall time <= 1.2x scanpy's.
Appends a record to bench/results/qc_scale.json, draws bench/results/qc_scale.png and prints a table.
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
OUT = REPO / "bench" / "results" / "qc_scale.json"
FIGURE = OUT.with_suffix(".png")
BLOCK = 2_000
N_TYPES = 10
N_BATCHES = 20
N_MT, N_RIBO = 13, 100
DAMAGED, DAMAGED_MT = 0.03, 0.3
# config/config.yaml's qc defaults, doublets off
PARAMS = dict(min_genes=50, min_counts=300, max_pct_mt=20, min_cells=3, n_top_genes=2000, target_sum=1e4,
              mad={"total_counts": 5, "n_genes_by_counts": 5, "pct_counts_mt": 5}, doublets={"detect": False})


def make_data(path: str, cells: int, genes: int, seed: int) -> None:
    import anndata as ad
    import h5py
    import mudata as md
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from virtualcell.qc_chunked import CsrWriter

    rng = np.random.default_rng(seed)
    names = ([f"MT-G{g:02d}" for g in range(N_MT)] + [f"RP{'LS'[g % 2]}{g}" for g in range(N_RIBO)]
             + [f"Gene{g:05d}" for g in range(genes - N_MT - N_RIBO)])
    base = rng.lognormal(0.0, 2.2, size=genes)
    base[:N_MT] *= 0.03 * base.sum() / base[:N_MT].sum()  # ~3 % of counts mitochondrial
    profiles = np.tile(base, (N_TYPES, 1))
    for t in range(N_TYPES):
        markers = rng.choice(np.arange(N_MT, genes), 500, replace=False)
        profiles[t, markers] *= rng.lognormal(0.0, 1.0, size=500)
    cdfs = np.cumsum(profiles / profiles.sum(1, keepdims=True), axis=1)
    kinds = rng.integers(N_TYPES, size=cells)
    batch = np.repeat(np.arange(N_BATCHES), -(-cells // N_BATCHES))[:cells]
    obs = pd.DataFrame({"batch": pd.Categorical([f"b{b:02d}" for b in batch]),
                        "celltype": pd.Categorical([f"type{k}" for k in kinds])},
                       index=[f"cell{i:07d}" for i in range(cells)])
    skeleton = ad.AnnData(obs=obs, var=pd.DataFrame(index=names))
    md.MuData({"rna": skeleton}).write(path)
    with h5py.File(path, "r+") as f:
        rna = f["mod/rna"]
        if "X" in rna:
            del rna["X"]
        # 32-bit indices, as scipy and anndata store fewer than 2^31 entries (~1,300 genes a cell here)
        writer = CsrWriter(rna.require_group("layers"), "counts", cells, genes, max_nnz=min(cells * 3000, 2**31 - 1))
        for start in range(0, cells, BLOCK):
            n = min(BLOCK, cells - start)
            umis = rng.integers(2000, 3001, size=n)
            row = np.repeat(np.arange(n), umis)
            gene = np.empty(len(row), dtype=np.int64)
            block_kinds = kinds[start : start + n][row]
            for t in range(N_TYPES):
                at = block_kinds == t
                gene[at] = np.searchsorted(cdfs[t], rng.random(int(at.sum())), side="right")
            damaged = (rng.random(n) < DAMAGED)[row] & (rng.random(len(row)) < DAMAGED_MT)
            gene[damaged] = rng.integers(N_MT, size=int(damaged.sum()))
            np.minimum(gene, genes - 1, out=gene)
            block = sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, gene)), shape=(n, genes))
            block.sum_duplicates()
            writer.append(block)
            if (start // BLOCK) % 50 == 0:
                print(f"  wrote {start + n:,}/{cells:,} cells", file=sys.stderr, flush=True)
        rna["X"] = rna["layers/counts"]  # a hard link: the same arrays under both names


def run_chunked(path: str, out: str) -> dict:
    from virtualcell.qc_chunked import run_qc_chunked

    _, _, summary = run_qc_chunked(path, out, **PARAMS, progress=lambda m: print(m, file=sys.stderr, flush=True))
    return {"cells_out": summary["cells_out"], "genes_out": summary["genes_out"]}


def run_scanpy(path: str, out: str) -> dict:
    import anndata as ad
    import h5py
    import numpy as np
    import scanpy as sc
    from scipy.stats import median_abs_deviation

    with h5py.File(path, "r") as f:
        rna = f["mod/rna"]
        adata = ad.AnnData(X=ad.io.read_elem(rna["X"]), obs=ad.io.read_elem(rna["obs"]),
                           var=ad.io.read_elem(rna["var"]))
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    adata.var["ribo"] = adata.var_names.str.startswith(("RPS", "RPL"))
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True)
    obs = adata.obs
    keep = ((obs["n_genes_by_counts"] >= PARAMS["min_genes"]) & (obs["total_counts"] >= PARAMS["min_counts"])
            & (obs["pct_counts_mt"] <= PARAMS["max_pct_mt"])).to_numpy()
    for metric, n_mads in PARAMS["mad"].items():
        x = obs[metric].to_numpy(dtype=float)
        x = np.log1p(x) if metric != "pct_counts_mt" else x
        for b in obs["batch"].unique():
            rows = (obs["batch"] == b).to_numpy()
            centre, spread = np.median(x[rows]), median_abs_deviation(x[rows])
            high = x > centre + n_mads * spread
            out_ = high if metric == "pct_counts_mt" else high | (x < centre - n_mads * spread)
            keep &= ~(rows & out_)
    adata._inplace_subset_obs(keep)
    sc.pp.filter_genes(adata, min_cells=PARAMS["min_cells"])
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=PARAMS["n_top_genes"], layer="counts")
    sc.pp.normalize_total(adata, target_sum=PARAMS["target_sum"])
    sc.pp.log1p(adata)
    adata.write_h5ad(out)
    return {"cells_out": int(adata.n_obs), "genes_out": int(adata.n_vars)}


def child(mode: str, path: str, out: str) -> None:
    # the libraries are imported first: the time is QC's, not Python's start-up
    import scanpy  # noqa: F401

    import virtualcell.qc_chunked  # noqa: F401

    started = time.perf_counter()
    try:
        result = (run_chunked if mode == "chunked" else run_scanpy)(path, out)
    except MemoryError:
        result = {"error": "MemoryError"}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print("RESULT " + json.dumps(result), flush=True)


def plot(record: dict, path: Path) -> None:
    """Wall time and peak RSS against cells, chunked beside scanpy (a failed run drawn as a cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode, colour in (("chunked", "tab:blue"), ("scanpy", "tab:orange")):
        runs = [r for r in record["runs"] if r["mode"] == mode]
        for ax, key in zip(axes, ("wall_s", "peak_rss_gib"), strict=True):
            done = [r for r in runs if "error" not in r]
            ax.plot([r["cells"] for r in done], [r[key] for r in done], "o-", color=colour, label=mode)
            failed = [r for r in runs if "error" in r and key in r]
            ax.plot([r["cells"] for r in failed], [r[key] for r in failed], "x", color=colour, markersize=10,
                    label=f"{mode}: {failed[0]['error']}" if failed else None)
    axes[0].set_ylabel("wall time (s)")
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].axhline(16, color="grey", linestyle="--", linewidth=1, label="target 16 GiB")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel(f"cells (x {record['genes']:,} genes)")
        ax.legend(fontsize=7)
    fig.suptitle(f"QC, chunked beside plain scanpy ({record['machine']}, {record['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scanpy-limit-gib", type=float, default=21.0,
                        help="address-space limit of the scanpy process (this machine has 23 GiB)")
    parser.add_argument("--workdir", help="keep the input .h5mu files here (and reuse them)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure of the last record")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--make-data", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make_data:
        make_data(args.make_data, args.cells[0], args.genes, args.seed)
        return
    if args.plot_only:
        plot(json.loads(OUT.read_text())[-1], FIGURE)
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vc-qc-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "genes": args.genes, "params": PARAMS,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                         f"Python {platform.python_version()}",
              "runs": []}
    try:
        for cells in args.cells:
            path = workdir / f"rna_{cells}x{args.genes}.h5mu"
            if not path.exists():
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--make-data", str(path), "--cells", str(cells),
                                "--genes", str(args.genes), "--seed", str(args.seed)], check=True)
                print(f"{cells:,} cells written in {time.perf_counter() - started:.0f} s "
                      f"({path.stat().st_size / 2**30:.2f} GiB)", flush=True)
            import h5py

            with h5py.File(path, "r") as f:
                nnz = int(f["mod/rna/layers/counts/indptr"][-1])
            for mode in ("chunked", "scanpy"):
                out = workdir / f"out_{mode}.h5mu"
                limit = int(args.scanpy_limit_gib * 2**30)
                preexec = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if mode == "scanpy" else None
                done = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out)],
                                      capture_output=True, text=True, preexec_fn=preexec)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                result = json.loads(lines[-1][len("RESULT "):]) if lines else {
                    "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
                result.update(cells=cells, entries=nnz, mode=mode, input_gib=round(path.stat().st_size / 2**30, 2))
                record["runs"].append(result)
                print(f"{cells:>9,} {mode:8s} {json.dumps(result)}", flush=True)
                out.unlink(missing_ok=True)
            pair = {r["mode"]: r for r in record["runs"] if r["cells"] == cells}
            if "wall_s" in pair.get("scanpy", {}) and "error" not in pair["scanpy"]:
                print(f"  chunked / scanpy wall time: {pair['chunked']['wall_s'] / pair['scanpy']['wall_s']:.2f}x",
                      flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results_file.append(OUT, record)
    plot(record, FIGURE)


if __name__ == "__main__":
    main()
