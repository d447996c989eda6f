r"""The built-in data's chromatin accessibility (10x Multiome-like ATAC peaks), opened by the latent state.

:func:`virtualcell.synthetic.generate` adds it when ``n_peaks > 0``, from its own random stream
(:func:`atac_stream`), so the RNA, protein and spatial data are the same with or without it.

The model
---------
Peaks
    Three kinds. *Gene-linked* peaks (promoters and enhancers of a dynamic or marker gene, named in
    ``var["gene"]``) open where that gene's programme is on: their logit is
    ``closed_p + phi(z) @ W[:, g]``, with ``phi`` the RBF features of the latent state ``z`` and
    ``W[:, g]`` the gene's own loadings (:mod:`virtualcell.synthetic`). *Programme* peaks have loadings
    of their own on the same features (distal elements no gene here reports). *Constitutive* peaks
    (CTCF sites, housekeeping promoters) are open in most cells whatever the state.
Counts
    A diploid cell has two copies of each site: a peak's count is ``Binomial(2, p_cp * c_c)``, with
    ``p_cp = sigmoid(logit)`` the chance that the site is open and ``c_c`` the cell's capture rate
    (its sequencing depth, log-normal). So counts are 0, 1 or 2, and most entries are zero (about
    87 % at the defaults), as in real single-cell ATAC.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

DEFAULT_PEAKS = 2000  # peaks of a synthetic dataset that declares atac without generator.n_peaks
GENE_LINKED_FRACTION = 0.4
CONSTITUTIVE_FRACTION = 0.1
CLOSED_LOGIT = (-3.5, 0.7)  # mean, sd of a state-dependent peak's logit where its programme is off
CONSTITUTIVE_LOGIT = (1.0, 0.7)
PROGRAMME_LOADING_SD = 3.0
MEDIAN_CAPTURE = 0.25
CAPTURE_SD = 0.35
COPIES = 2  # alleles per site: a peak's count is at most this
CHROMOSOMES = 5
PEAK_WIDTH = 500
MEAN_GAP = 20_000  # bp between neighbouring peaks on a chromosome

KIND_KEY = "truth_kind"  # var: gene_linked, programme or constitutive
GENE_KEY = "gene"  # var: the gene a gene-linked peak belongs to ("" otherwise)
KINDS = ("gene_linked", "programme", "constitutive")


def atac_stream(seed: int) -> np.random.Generator:
    """The peaks' own random stream, apart from every other component's."""
    return np.random.default_rng([int(seed), 15485863])


def peak_names(n_peaks: int, *, rng: np.random.Generator) -> list[str]:
    """``chr<k>:<start>-<end>`` names, spread evenly over :data:`CHROMOSOMES` chromosomes, sorted by position."""
    chrom = np.arange(n_peaks) * CHROMOSOMES // n_peaks + 1
    gaps = rng.integers(PEAK_WIDTH, 2 * MEAN_GAP, n_peaks)
    names = []
    for k in range(1, CHROMOSOMES + 1):
        starts = np.cumsum(gaps[chrom == k]) + 10_000
        names += [f"chr{k}:{s}-{s + PEAK_WIDTH}" for s in starts]
    return names


def measure_atac(features: np.ndarray, gene_loadings: np.ndarray, gene_names: np.ndarray,
                 linkable: np.ndarray, *, n_peaks: int, rng: np.random.Generator):
    """Peak counts of cells at their latent states.

    Parameters
    ----------
    features
        The cells' RBF features of the latent state (n, K), as the genes read them.
    gene_loadings, gene_names, linkable
        The genes' loadings on those features (K, G), their names, and which genes have a programme a
        peak can be linked to.
    n_peaks
        Peaks to draw.
    rng
        :func:`atac_stream`.

    Returns
    -------
    ``(counts, var, capture)``: CSR counts (n, n_peaks) in {0, 1, 2}, float32; the peaks' table (index
    the ``chr:start-end`` names, columns ``gene`` and ``truth_kind``); the cells' capture rates (n,).
    """
    import pandas as pd

    n_linked = round(GENE_LINKED_FRACTION * n_peaks)
    n_const = round(CONSTITUTIVE_FRACTION * n_peaks)
    kind = np.repeat([0, 1, 2], [n_linked, n_peaks - n_linked - n_const, n_const])
    kind = kind[rng.permutation(n_peaks)]
    loadings = np.zeros((features.shape[1], n_peaks))
    genes = np.full(n_peaks, "", dtype=object)
    linked = np.flatnonzero(kind == 0)
    candidates = np.flatnonzero(linkable)
    chosen = rng.choice(candidates, size=len(linked), replace=len(linked) > len(candidates))
    loadings[:, linked] = gene_loadings[:, chosen]
    genes[linked] = gene_names[chosen]
    programme = kind == 1
    loadings[:, programme] = rng.normal(0.0, PROGRAMME_LOADING_SD, (features.shape[1], programme.sum()))
    baseline = np.where(kind == 2, rng.normal(*CONSTITUTIVE_LOGIT, n_peaks), rng.normal(*CLOSED_LOGIT, n_peaks))
    logits = baseline + features @ loadings
    capture = MEDIAN_CAPTURE * np.exp(rng.normal(0.0, CAPTURE_SD, len(features)))
    p = np.clip(capture[:, None] / (1.0 + np.exp(-logits)), 0.0, 1.0)
    counts = sp.csr_matrix(rng.binomial(COPIES, p).astype(np.float32))
    var = pd.DataFrame({GENE_KEY: genes.astype(str), KIND_KEY: pd.Categorical(np.asarray(KINDS)[kind],
                                                                             categories=KINDS)},
                       index=pd.Index(peak_names(n_peaks, rng=rng)))
    return counts, var, capture
