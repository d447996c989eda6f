"""Small real datasets to try the pipeline on, built from files the project fetches from PyPI.

``arabidopsis_root``: a developmental time course as it is published, log values
and all. statOT's example data (Shahan et al., Dev Cell 2022, as shipped in the
statot 0.0.14 source archive): 10,000 Arabidopsis root cells x 2,000 genes, ``X``
= log1p of normalised counts (no raw counts), each cell annotated with its
developmental zone. Along the root the zones follow each other in developmental
time, meristem -> elongation -> maturation, so they are the time points 0, 1, 2
(ordinal: the spacing is not known). The zones are an annotation of the cells'
expression, not a sampling time, so this is a developmental series rather than a
time course sampled by the clock; say so beside any number it gives.

From the command line (writes an .h5ad a config's ``datasets`` entry can read with
``source: h5ad``, ``values: log``, ``time_key: time``)::

    python -m virtualcell.examples arabidopsis_root results/arabidopsis.h5ad --cells-per-stage 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# developmental zone (obs "time.anno") -> its position in developmental time
ARABIDOPSIS_STAGES = {"Meristem": 0.0, "Elongation": 1.0, "Maturation": 2.0}


def arabidopsis_root(cells_per_stage: int | None = 100, *, seed: int = 0) -> ad.AnnData:
    """The Arabidopsis root series: ``X`` log values as published, ``obs["time"]`` the zone's position.

    Parameters
    ----------
    cells_per_stage
        Cells drawn (without replacement) from each zone; None keeps all 10,000.
    seed
        Seed of the draw.

    Returns
    -------
    AnnData: ``X`` float32 CSR (log1p of normalised counts), ``obs`` ``time`` (0, 1, 2),
    ``stage`` (the zone), ``celltype``, ``consensus_time`` (the authors' pseudotime), ``var`` the
    genes (``gene_id``).
    """
    from virtualcell.readers import testdata_path

    folder = Path(testdata_path("arabidopsis_root"))
    parts = np.load(folder / "expr.npz", allow_pickle=False)
    x = sp.csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=tuple(parts["shape"]),
                      dtype=np.float32)
    obs = pd.read_csv(folder / "obs.csv", index_col=0)
    var = pd.read_csv(folder / "var.csv", index_col=0, usecols=[0])
    keep = np.arange(len(obs))
    if cells_per_stage is not None:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(obs["time.anno"].to_numpy() == stage),
                       size=min(cells_per_stage, int((obs["time.anno"] == stage).sum())), replace=False)
            for stage in ARABIDOPSIS_STAGES
        ]))
    obs = obs.iloc[keep]
    out = ad.AnnData(
        X=x[keep],
        obs=pd.DataFrame({
            "time": obs["time.anno"].map(ARABIDOPSIS_STAGES).astype(float).to_numpy(),
            "stage": obs["time.anno"].astype(str).to_numpy(),
            "celltype": obs["celltype.anno"].astype(str).to_numpy(),
            "consensus_time": obs["consensus.time"].astype(float).to_numpy(),
        }, index=obs.index.astype(str)),
        var=pd.DataFrame(index=var.index.astype(str)),
    )
    return out


EXAMPLES = {"arabidopsis_root": arabidopsis_root}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m virtualcell.examples", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(EXAMPLES))
    parser.add_argument("output", help="the .h5ad to write")
    parser.add_argument("--cells-per-stage", type=int, default=100, help="cells per time point; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from virtualcell import io

    data = EXAMPLES[args.name](args.cells_per_stage or None, seed=args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    io.write_h5ad(data, args.output)
    print(f"wrote {args.output}: {data.n_obs} cells x {data.n_vars} genes, time points "
          f"{sorted(set(data.obs['time']))}")


if __name__ == "__main__":
    main()
