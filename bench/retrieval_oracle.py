"""How well can anything match RNA to protein on the built-in data? Oracles beside the workflow's model.

Run by hand (never in the test suite)::

    python bench/retrieval_oracle.py [--metrics results/synthetic/evaluate/metrics.json] [--repeats 5]

The built-in generator (default config: 3,000 cells, 400 genes, 20 proteins, seed 0) records the
parts of each cell's protein mean (``synthetic.generate``: ``prot.obsm["truth_signal"]``,
``obs["truth_capture"]``, ``obs["truth_library"]``). :mod:`virtualcell.retrieval_oracle` (which
evaluate also runs on the workflow's own test cells, ``alignment.rna-prot.*.oracle`` and
``oracle_state``) ranks each RNA cell's candidate protein profiles by their likelihood ratio under
the cell's truth, scored with ``retrieval_metrics``' definitions (top-1 / top-5 from RNA to
protein, FOSCTTM both ways). Here on random sets of as many healthy control cells as the workflow's
test split holds (``--n-test``, 287), repeated, three oracles from most to least knowledge:

* ``full``: the exact mean of every cell's protein (state, RNA library, antibody capture).
* ``depth`` (evaluate's ``oracle``): the state and RNA library, the capture integrated out over its
  log-normal prior: what a method could at best get from a cell's RNA, whose total counts measure
  the library.
* ``state`` (evaluate's ``oracle_state``): the state alone, library and capture integrated out: the
  best a method that ignores depth could do.

With ``--metrics``, the workflow's ``alignment.rna-prot`` numbers go beside the oracles in the
results file (``bench/results/retrieval_oracle.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from virtualcell import retrieval_oracle as ro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402

GENERATOR = {"n_cells": 3000, "n_genes": 400, "n_proteins": 20, "time_points": [0, 1, 2, 3, 4, 5], "n_spots": 400,
             "seed": 0}  # the control cells of the default config


def full_oracle(prot) -> dict[str, float]:
    """Retrieval knowing each cell's exact protein mean (its capture too)."""
    from virtualcell.synthetic import PROTEIN_DISPERSION

    counts = np.asarray(prot.X.toarray(), dtype=np.float64)
    mean = np.asarray(prot.obsm["truth_signal"], dtype=np.float64) \
        + np.outer(prot.obs["truth_capture"].to_numpy(), prot.var["truth_ambient"].to_numpy())
    return ro.likelihood_retrieval(ro.nb_loglik(counts, mean, float(PROTEIN_DISPERSION)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path, default=None, help="the workflow's evaluate/metrics.json")
    parser.add_argument("--n-test", type=int, default=287, help="cells per retrieval set (the test split's size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "retrieval_oracle.json")
    args = parser.parse_args()
    start = time.perf_counter()
    from virtualcell import synthetic

    data = synthetic.generate(**GENERATOR)
    prot, healthy = data.mod["prot"], ~data.mod["rna"].obs["low_quality"].to_numpy()
    rng = np.random.default_rng(0)
    cells = np.flatnonzero(healthy)
    per_oracle: dict[str, list[dict[str, float]]] = {"full": [], "depth": [], "state": []}
    for _ in range(args.repeats):
        subset = prot[rng.choice(cells, args.n_test, replace=False)]
        both = ro.oracle_scores(subset)
        per_oracle["full"].append(full_oracle(subset))
        per_oracle["depth"].append(both["oracle"])
        per_oracle["state"].append(both["oracle_state"])
    record: dict = {"date": time.strftime("%Y-%m-%d"), "generator": GENERATOR, "n_test": args.n_test,
                    "repeats": args.repeats, "oracles": {}}
    for name, runs in per_oracle.items():
        record["oracles"][name] = {k: {"mean": float(np.mean([r[k] for r in runs])),
                                       "std": float(np.std([r[k] for r in runs]))} for k in runs[0]}
    if args.metrics is not None:
        alignment = json.loads(args.metrics.read_text())["alignment"]["rna-prot"]
        record["workflow"] = {k: alignment[k] for k in ("foscttm", "top1", "top5")}
    record["wall_s"] = time.perf_counter() - start
    results_file.append(args.output, record)
    for name, values in record["oracles"].items():
        print(f"oracle {name:6s} " + "  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in values.items()))
    for k, v in record.get("workflow", {}).items():
        print(f"workflow {k}: " + ", ".join(f"{m} {x:.4f}" for m, x in v.items()))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
