"""How well can anything match RNA to protein on the built-in data? Oracles beside the workflow's model.

Run by hand (never in the test suite)::

    python bench/retrieval_oracle.py [--metrics results/synthetic/evaluate/metrics.json] [--repeats 5]

The built-in generator (default config: 3,000 cells, 400 genes, 20 proteins, seed 0) draws each
cell's protein counts from a negative binomial (dispersion ``PROTEIN_DISPERSION``) whose mean is
``scale * rate + droplet * ambient``: ``rate`` the NB mean of the protein's gene in that cell's RNA
(its latent state *and its RNA library size*), ``droplet`` the cell's antibody capture
(log-normal, sd 0.3), ``ambient`` each antibody's background. An oracle that knows part of this
truth for each query cell scores every candidate protein profile by its likelihood ratio
(``log p(protein_j | truth_i)`` less the candidates' average likelihood, ``log mean_k p(protein_j |
truth_k)``, so that a profile likely under every cell does not win everywhere), and is scored
exactly as the workflow scores its model (:func:`virtualcell.evaluate.retrieval_metrics`'s
definitions: top-1 / top-5 from RNA to protein, FOSCTTM averaged over both directions) on random
sets of as many control cells as the workflow's test split holds (``--n-test``, 287), low-quality
cells left out. Three oracles, from most to least knowledge:

* ``full``: the exact mean of every cell's protein (state, RNA library, droplet capture).
* ``depth``: the state and RNA library, the capture integrated out (its log-normal prior, 25-point
  quadrature): what a method could at best get from a cell's RNA, whose total counts measure the
  library.
* ``state``: the state alone, library and capture integrated out (the library log-normal around
  its median with the healthy cells' spread): the best a method that ignores depth could do.

The generator's internals are read by wrapping two of its private functions while it runs
(``_negative_binomial``, ``_measure_rna``); nothing in it changes. With ``--metrics``, the
workflow's ``alignment.rna-prot`` numbers (model, CCA, random) go beside the oracles in the
results file (``bench/results/retrieval_oracle.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import gammaln, logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402

GENERATOR = {"n_cells": 3000, "n_genes": 400, "n_proteins": 20, "time_points": [0, 1, 2, 3, 4, 5], "n_spots": 400,
             "seed": 0, "cells_per_condition": 0}  # the control cells of the default config
CAPTURE_SD = 0.3  # the generator's droplet capture: exp(N(0, 0.3))
N_QUADRATURE = 25


def generate_with_truth() -> dict[str, np.ndarray]:
    """The default data's control cells: protein counts and the parts of their means."""
    import virtualcell.synthetic as syn

    seen: dict[str, tuple] = {}
    nb, measure = syn._negative_binomial, syn._measure_rna

    def capture_nb(mean, theta, *, rng):
        out = nb(mean, theta, rng=rng)
        if np.isscalar(theta) and theta == syn.PROTEIN_DISPERSION and "protein" not in seen:
            seen["protein"] = (mean.copy(), out.copy())
        return out

    def capture_rna(*args, **kwargs):
        result = measure(*args, **kwargs)
        seen.setdefault("rna", result)
        return result

    syn._negative_binomial, syn._measure_rna = capture_nb, capture_rna
    try:
        data = syn.generate(**GENERATOR)
    finally:
        syn._negative_binomial, syn._measure_rna = nb, measure
    mean, counts = seen["protein"]
    _, rates, low_quality, _ = seen["rna"]
    var = data["prot"].var
    genes = list(data["rna"].var_names)
    signal = var["truth_scale"].to_numpy() * rates[:, [genes.index(g) for g in var["gene"]]]
    library = rates.sum(axis=1)
    return {"mean": mean, "counts": counts, "signal": signal, "ambient": var["truth_ambient"].to_numpy(),
            "library": library, "low_quality": low_quality, "theta": np.float64(syn.PROTEIN_DISPERSION)}


def nb_loglik(counts: np.ndarray, mean: np.ndarray, theta: float) -> np.ndarray:
    """log p(counts_j | mean_i) summed over proteins: (queries i, candidates j)."""
    const = (gammaln(counts + theta) - gammaln(theta) - gammaln(counts + 1)).sum(axis=1)
    return const[None, :] + (theta * np.log(theta / (theta + mean))).sum(axis=1)[:, None] \
        + np.log(mean / (theta + mean)) @ counts.T


def integrated(counts: np.ndarray, signal: np.ndarray, ambient: np.ndarray, theta: float, *,
               library_sd: float = 0.0) -> np.ndarray:
    """The log-likelihood with the droplet capture integrated out over its log-normal prior, and with
    ``library_sd`` > 0 the RNA library too (a log-normal factor on the signal, that spread)."""
    z = np.linspace(-3.0, 3.0, N_QUADRATURE)
    log_w = -0.5 * z**2
    log_w -= logsumexp(log_w)
    libraries = [(0.0, 0.0)] if library_sd == 0 else list(zip(library_sd * z, log_w))
    return logsumexp(np.stack([
        nb_loglik(counts, np.exp(lib) * signal + np.exp(CAPTURE_SD * zk) * ambient, theta) + log_w[k] + lw
        for lib, lw in libraries for k, zk in enumerate(z)]), axis=0)


def scores(loglik: np.ndarray) -> dict[str, float]:
    """Retrieval of row i's partner (column i) by likelihood ratio, as retrieval_metrics scores distances."""
    ratio = loglik - (logsumexp(loglik, axis=0) - np.log(len(loglik)))[None, :]
    own = np.diag(ratio)
    rank = (ratio > own[:, None]).sum(axis=1)  # candidates scored above the partner, for each query
    col_rank = (ratio > own[None, :]).sum(axis=0)  # queries scored above the partner's own, per candidate
    n = len(ratio)
    return {"foscttm": float(0.5 * (rank.mean() + col_rank.mean()) / (n - 1)), "top1": float((rank < 1).mean()),
            "top5": float((rank < 5).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path, default=None, help="the workflow's evaluate/metrics.json")
    parser.add_argument("--n-test", type=int, default=287, help="cells per retrieval set (the test split's size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "retrieval_oracle.json")
    args = parser.parse_args()
    start = time.perf_counter()
    truth = generate_with_truth()
    theta, ambient = float(truth["theta"]), truth["ambient"]
    median_library = np.median(truth["library"])
    library_sd = float(np.std(np.log(truth["library"][~truth["low_quality"]])))
    oracles = {
        "full": lambda idx, y: nb_loglik(y, truth["mean"][idx], theta),
        "depth": lambda idx, y: integrated(y, truth["signal"][idx], ambient, theta),
        "state": lambda idx, y: integrated(y, truth["signal"][idx] / truth["library"][idx, None] * median_library,
                                           ambient, theta, library_sd=library_sd),
    }
    rng = np.random.default_rng(0)
    cells = np.flatnonzero(~truth["low_quality"])
    per_oracle: dict[str, list[dict[str, float]]] = {name: [] for name in oracles}
    for _ in range(args.repeats):
        idx = rng.choice(cells, args.n_test, replace=False)
        y = truth["counts"][idx]
        for name, loglik in oracles.items():
            per_oracle[name].append(scores(loglik(idx, y)))
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
