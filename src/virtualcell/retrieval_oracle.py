"""How well anything could match cells' RNA to their protein on the built-in data: retrieval oracles.

The generator draws a cell's protein counts from a negative binomial (dispersion
``synthetic.PROTEIN_DISPERSION``) with mean ``signal + capture * ambient`` (``synthetic.generate``
records the parts: ``signal`` is the protein's gene's RNA mean in that cell times a scale, so it
carries the cell's state *and its RNA library*; ``capture`` the cell's antibody capture, log-normal
with sd ``CAPTURE_SD``). An oracle knows part of each cell's truth and ranks the candidate protein
profiles of the held-out cells by their likelihood ratio under it (the NB log-likelihood less the
candidates' average over all queries, so that a profile likely under every cell does not win
everywhere); it is scored as :func:`virtualcell.evaluate.retrieval_metrics` scores the model (top-1
and top-5 from RNA to protein, FOSCTTM over both directions). Two oracles:

- ``oracle``: the cell's state and RNA library (its capture integrated out over its prior): the most
  a cell's RNA could tell, since its total counts measure the library;
- ``oracle_state``: the state alone (library and capture integrated out): the most a method that
  reads no depth could do.

Not an upper bound for every conceivable method in the strict sense (a method could in principle use
the other cells jointly), but the likelihood-ratio rule with the true state is what the matching
literature calls the ideal observer, and no method sees the true state.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.special import gammaln, logsumexp

CAPTURE_SD = 0.3  # synthetic.generate's antibody capture: exp(N(0, 0.3))
N_QUADRATURE = 15  # grid points over each integrated log-normal factor (25 changes the scores by < 1e-4)
MAX_CELLS = 5000  # held-out cells up to which the oracles are computed (n x n likelihoods per grid point)
METRICS = ("foscttm", "top1", "top5")


def protein_truth(params: Mapping[str, Any], cells: pd.Index):
    """The protein AnnData of the built-in data's ``cells`` (regenerated from the generator's
    ``params``, ``mdata.uns["synthetic"]``), with its truth in obs, obsm and var."""
    from virtualcell import synthetic

    kwargs = {k: params[k] for k in ("n_cells", "n_genes", "n_proteins", "time_points", "n_spots", "seed")}
    # The control cells (the time course) are the same without the perturbed ones, which come after them.
    prot = synthetic.generate(**kwargs).mod["prot"]
    if not cells.isin(prot.obs_names).all():
        prot = synthetic.generate(**kwargs, cells_per_condition=int(params.get("cells_per_condition", 0))).mod["prot"]
    missing = cells.difference(prot.obs_names)
    if len(missing):
        raise ValueError(f"cells {list(missing[:3])} are not the generator's")  # a bug, not bad input
    return prot[cells]


def nb_loglik(counts: np.ndarray, mean: np.ndarray, theta: float) -> np.ndarray:
    """log p(counts_j | mean_i), summed over proteins: queries i x candidates j."""
    const = (gammaln(counts + theta) - gammaln(theta) - gammaln(counts + 1)).sum(axis=1)
    return const[None, :] + (theta * np.log(theta / (theta + mean))).sum(axis=1)[:, None] \
        + np.log(mean / (theta + mean)) @ counts.T


def integrated_loglik(counts: np.ndarray, signal: np.ndarray, ambient: np.ndarray, theta: float, *,
                      library_sd: float = 0.0) -> np.ndarray:
    """:func:`nb_loglik` with the capture integrated out over its log-normal prior, and with
    ``library_sd`` > 0 a log-normal factor on the signal too (the RNA library, that spread)."""
    z = np.linspace(-3.0, 3.0, N_QUADRATURE)
    log_w = -0.5 * z**2
    log_w -= logsumexp(log_w)
    libraries = [(0.0, 0.0)] if library_sd == 0 else list(zip(library_sd * z, log_w))
    total = None
    for lib, lw in libraries:
        for k, zk in enumerate(z):
            term = nb_loglik(counts, np.exp(lib) * signal + np.exp(CAPTURE_SD * zk) * ambient, theta) + log_w[k] + lw
            total = term if total is None else np.logaddexp(total, term, out=total)
    return total


def likelihood_retrieval(loglik: np.ndarray) -> dict[str, float]:
    """Retrieval of query i's partner (candidate i) by likelihood ratio, with retrieval_metrics' definitions."""
    ratio = loglik - (logsumexp(loglik, axis=0) - np.log(len(loglik)))[None, :]
    own = np.diag(ratio)
    rank = (ratio > own[:, None]).sum(axis=1)  # candidates above the partner, per query
    col_rank = (ratio > own[None, :]).sum(axis=0)  # queries above the partner's own, per candidate
    n = len(ratio)
    return {"foscttm": float(0.5 * (rank.mean() + col_rank.mean()) / (n - 1)), "top1": float((rank < 1).mean()),
            "top5": float((rank < 5).mean())}


def oracle_scores(prot) -> dict[str, dict[str, float]]:
    """``{oracle: {metric: value}}`` on the cells of ``prot`` (:func:`protein_truth`), matched among themselves."""
    from virtualcell.synthetic import PROTEIN_DISPERSION

    counts = prot.X.toarray() if hasattr(prot.X, "toarray") else np.asarray(prot.X)
    counts = np.asarray(counts, dtype=np.float64)
    signal = np.asarray(prot.obsm["truth_signal"], dtype=np.float64)
    ambient = prot.var["truth_ambient"].to_numpy(np.float64)
    library = prot.obs["truth_library"].to_numpy(np.float64)
    relative = signal / library[:, None] * np.median(library)  # the signal at the median library
    theta = float(PROTEIN_DISPERSION)
    return {
        "oracle": likelihood_retrieval(integrated_loglik(counts, signal, ambient, theta)),
        "oracle_state": likelihood_retrieval(integrated_loglik(counts, relative, ambient, theta,
                                                               library_sd=float(np.std(np.log(library))))),
    }
