r"""Ground-truth generator: multi-omic, spatial, time-resolved cells from a known landscape.

Every stage of the pipeline can be scored against this dataset because the process
that made it is known exactly. :func:`generate` returns a :class:`mudata.MuData` that
the pipeline reads like any real dataset; :func:`potential`, :func:`potential_grad`,
:func:`basin_of` and :func:`simulate_paths` expose the truth for scoring.

The model
---------
Landscape
    A 2-D Waddington potential of ``p = (x, y)``,

    .. math::

        V(p) = -\sum_{k=1}^{3} A_k \exp\left(-\frac{\lVert p - c_k \rVert^2}{2 w_k^2}\right)
               + \frac{\kappa}{2} \lVert p - q \rVert^2 - \tau y ,

    with a shallow progenitor well ``c_1 = (0, 0)``, ``A_1 = 1.2``, ``w_1 = 0.6`` and two
    deeper fate wells ``c_2 = (-1.5, 2)`` (fate A, ``A_2 = 3``) and ``c_3 = (1.5, 2)``
    (fate B, ``A_3 = 2.8``, slightly shallower so the fates are not 50/50),
    ``w_2 = w_3 = 0.75``; ``kappa = 0.25``, ``q = (0, 1)``, ``tau = 0.5``. The quadratic
    term keeps cells in a bounded region and the tilt ``-tau * y`` lowers the barrier on
    the fate side, so cells leave the progenitor at a steady rate (a third of them by
    ``t = 1``, half by ``t = 2``, 85 % by ``t = 5``, fate A a little more often than fate
    B). The tilt and confinement shift the minima slightly from the ``c_k``
    (:data:`WELL_MINIMA`). Cells follow the SDE ``dX = -grad V(X) dt + sigma dW``
    (Euler-Maruyama, ``dt = 0.01``, ``sigma = 0.6``), starting near the progenitor
    minimum at ``t = 0``. The basin of a point is the well its deterministic gradient
    flow ends in (:func:`basin_of`).
Snapshots
    Each cell is observed once, at one of ``time_points`` (equal numbers per time point,
    up to one cell). Sampling is destructive: every path is simulated to the last time
    point, the state at the cell's observation time is recorded (``obsm["truth_latent"]``,
    ``obs["basin"]``) and its fate is the basin its path is in at the last time point
    (``obs["fate"]``; ``"progenitor"`` if it never left).
RNA
    Gene log-weights are ``baseline_g + phi(z) @ W[:, g]`` where ``phi`` are Gaussian
    radial basis functions of the latent state ``z`` (a grid over the landscape plus one
    per well, the latter carrying fate-marker genes). A softmax over genes gives
    expression shares; the 13 mitochondrial genes (``MT-*``) take a per-cell fraction
    of about 3 % instead (20-50 % in the flagged ``low_quality`` cells, which also have a
    fifth of the depth); ribosomal genes (``RPL*``/``RPS*``) have a high, state-independent
    baseline. Counts are negative binomial (gamma-Poisson) with mean
    ``library_size * share`` and per-gene dispersion; library sizes are log-normal
    (median about 2,800 UMIs over both batches: batch ``b1`` has 25 % more depth than
    ``b0`` and small per-gene log-fold changes). Dynamic genes (60 %) start low and are
    switched on by their programme, and a soft ceiling keeps any one gene to a few % of
    a library; at 400 genes a little over half the entries are zero, more with more
    genes.
Protein
    CITE-seq-like: protein ``j`` is tied to gene ``var["gene"]`` and its counts are
    negative binomial with mean ``k_j * rate_cg + ambient_j * a_c``: ``rate_cg`` is the
    tied gene's NB mean in that cell (before sampling), ``ambient_j * a_c`` the ambient
    antibody background every droplet sees.
Spatial
    A square tissue image with a rounded (super-elliptic) tissue section, packed with a
    separate set of cells on a jittered hexagonal lattice. The tissue is split into
    three niches, each enriched for one basin; each cell takes the latent state of a
    simulated cell (observed at a random time point, so all basins are available) of the
    basin drawn from its niche's composition. Spots lie on a square grid; a spot's counts
    are the sum of the RNA counts of the cells whose centre lies within the spot radius.
    The RGB image draws each cell as a disc whose cytoplasm colour and nucleus size depend
    on its latent state, over a pink extracellular background, so that image patches at
    spots carry information about the spots' expression.

Randomness comes from ``np.random.default_rng(seed)`` alone, split into independent
streams per component, so the single-cell data do not change when only the spatial
settings change. Same arguments, same numpy: bit-identical arrays.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    import mudata as md
from scipy.spatial import cKDTree

# Modality names and the obs/obsm/var/uns keys that other modules read.
from virtualcell.plan import ATAC, PROT, RNA, SPATIAL  # noqa: E402

TIME_KEY = "time"
FATE_KEY = "fate"
BASIN_KEY = "basin"
LOW_QUALITY_KEY = "low_quality"
BATCH_KEY = "batch"
LATENT_KEY = "truth_latent"
MT_KEY = "mt"
RIBO_KEY = "ribo"
GENE_KEY = "gene"
NICHE_KEY = "niche"
IN_TISSUE_KEY = "in_tissue"
N_CELLS_KEY = "n_cells"
SPATIAL_KEY = "spatial"
CELL_FRACTION_KEY = "truth_cell_fraction"
PARAMS_KEY = "synthetic"
LIBRARY_ID = "synthetic_tissue"

BASINS = ("progenitor", "fate_A", "fate_B")
BATCHES = ("b0", "b1")
NICHES = ("niche_progenitor", "niche_A", "niche_B")
OUTSIDE_TISSUE = "outside"

# Landscape (see the module docstring for the formula). Rows follow BASINS.
WELL_CENTRES = np.array([[0.0, 0.0], [-1.5, 2.0], [1.5, 2.0]])
WELL_DEPTHS = np.array([1.2, 3.0, 2.8])
WELL_WIDTHS = np.array([0.6, 0.75, 0.75])
CONFINEMENT = 0.25
CONFINEMENT_CENTRE = np.array([0.0, 1.0])
TILT = 0.5
SIGMA = 0.6
DT = 0.01
INITIAL_SPREAD = 0.15

# Gradient flow used to find minima and basins; 20 time units is long enough for any
# point not sitting on a separatrix to end within a few hundredths of its minimum.
_FLOW_STEP = 0.05
_FLOW_STEPS = 400

MT_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip
RIBO_GENE_FRACTION = 0.05
MIN_OTHER_GENES = 10

# RNA expression model.
RBF_GRID_X = np.linspace(-2.5, 2.5, 5)
RBF_GRID_Y = np.linspace(-0.5, 3.0, 5)
RBF_GRID_WIDTH = 0.8
RBF_MARKER_WIDTH = 0.5
DYNAMIC_GENE_FRACTION = 0.6
DYNAMIC_LOADING_SD = 2.5
MARKER_GENE_FRACTION = 0.05
MARKER_LOADING = 3.0
STEADY_BASELINE = (0.0, 2.0)  # mean, sd of log-weights of genes without a programme
DYNAMIC_BASELINE = (-3.0, 2.0)
# Soft ceiling on gene log-weights: no gene takes more than a few % of a library,
# as in real data, however its baseline and programme combine.
LOG_WEIGHT_CAP = 4.0
RIBO_SHARE = 0.12
GENE_DISPERSION_MEDIAN = 1.5
CELL_BLOCK = 20_000  # cells whose counts are drawn at once
MEDIAN_LIBRARY_SIZE = 2500.0
LIBRARY_SIZE_SD = 0.4
MT_FRACTION = 0.03
LOW_QUALITY_FRACTION = 0.03
LOW_QUALITY_DEPTH = 0.2
LOW_QUALITY_MT_RANGE = (0.2, 0.5)
BATCH_DEPTH = 1.25
BATCH_GENE_LFC_SD = 0.15

# Protein model.
PROTEIN_SIGNAL_MEDIAN = 150.0
PROTEIN_AMBIENT_MEDIAN = 15.0
PROTEIN_DISPERSION = 8.0

# Spatial model, lengths in units of the spot spacing unless named *_px.
SPOT_SPACING_TARGET_PX = 26
IMAGE_SIZE_RANGE_PX = (256, 512)
SPOT_RADIUS = 0.3
CELL_SPACING = 0.23
CELL_RADIUS = 0.6 * CELL_SPACING
TISSUE_SEMI_AXES = (0.48, 0.45)  # fractions of the image side
NICHE_CENTRES = np.array([[0.5, 0.78], [0.28, 0.32], [0.72, 0.32]])  # fractions, rows follow NICHES
NICHE_WARP = 0.04  # fraction of the image side
NICHE_COMPOSITION = np.array([[0.6, 0.2, 0.2], [0.15, 0.75, 0.1], [0.15, 0.1, 0.75]])  # rows: NICHES, cols: BASINS
SPATIAL_MEDIAN_LIBRARY_SIZE = 1000.0
SPATIAL_LIBRARY_SIZE_SD = 0.3
GLASS_RGB = (0.96, 0.96, 0.97)
STROMA_RGB = (0.93, 0.76, 0.84)
NUCLEUS_RGB = (0.28, 0.18, 0.45)
CELL_RGB = np.array([[0.70, 0.52, 0.80], [0.86, 0.32, 0.42], [0.30, 0.55, 0.82]])  # rows follow BASINS
NUCLEUS_FRACTION = np.array([0.6, 0.35, 0.35])  # nucleus radius / cell radius, rows follow BASINS
COLOUR_WIDTH = 0.6
PIXEL_NOISE_SD = 0.025


# --------------------------------------------------------------------------- landscape


def potential(xy: np.ndarray, *, depths: np.ndarray = WELL_DEPTHS, tilt_x: float = 0.0) -> np.ndarray:
    """Evaluate the true landscape ``V``.

    Parameters
    ----------
    xy
        Latent positions, shape ``(..., 2)``.
    depths, tilt_x
        The well depths ``A_k`` and an extra tilt ``+ tilt_x * x`` (a perturbation's landscape,
        :mod:`virtualcell.synthetic_conditions`); the defaults are the control landscape.

    Returns
    -------
    Potential values, shape ``(...)``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    x, y = xy[..., 0], xy[..., 1]
    v = 0.5 * CONFINEMENT * ((x - CONFINEMENT_CENTRE[0]) ** 2 + (y - CONFINEMENT_CENTRE[1]) ** 2)
    v = v - TILT * y + tilt_x * x
    for (cx, cy), depth, width in zip(WELL_CENTRES, depths, WELL_WIDTHS, strict=True):
        v = v - depth * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * width**2))
    return v


def potential_grad(xy: np.ndarray, *, depths: np.ndarray = WELL_DEPTHS, tilt_x: float = 0.0) -> np.ndarray:
    """Evaluate the analytic gradient of :func:`potential`.

    Parameters
    ----------
    xy
        Latent positions, shape ``(..., 2)``.
    depths, tilt_x
        As for :func:`potential`.

    Returns
    -------
    ``grad V``, shape ``(..., 2)``; the drift of the SDE is its negative.
    """
    xy = np.asarray(xy, dtype=np.float64)
    x, y = xy[..., 0], xy[..., 1]
    gx = CONFINEMENT * (x - CONFINEMENT_CENTRE[0]) + tilt_x
    gy = CONFINEMENT * (y - CONFINEMENT_CENTRE[1]) - TILT
    for (cx, cy), depth, width in zip(WELL_CENTRES, depths, WELL_WIDTHS, strict=True):
        dx, dy = x - cx, y - cy
        weight = depth / width**2 * np.exp(-(dx**2 + dy**2) / (2.0 * width**2))
        gx = gx + weight * dx
        gy = gy + weight * dy
    return np.stack([gx, gy], axis=-1)


def _gradient_flow(xy: np.ndarray) -> np.ndarray:
    p = np.array(xy, dtype=np.float64)
    for _ in range(_FLOW_STEPS):
        p -= _FLOW_STEP * potential_grad(p)
    return p


# The tilt and confinement move the minima a little away from the nominal well centres.
WELL_MINIMA = _gradient_flow(WELL_CENTRES)
# The truth must not drift: a caller editing these in place would silently change it.
for _array in (WELL_CENTRES, WELL_DEPTHS, WELL_WIDTHS, CONFINEMENT_CENTRE, WELL_MINIMA):
    _array.setflags(write=False)
del _array


def basin_of(xy: np.ndarray) -> np.ndarray:
    """Name the basin of attraction each latent position lies in.

    The basin is the well that the deterministic gradient flow ``dp/dt = -grad V(p)``
    started at the position ends in.

    Parameters
    ----------
    xy
        Latent positions, shape ``(n, 2)``.

    Returns
    -------
    Basin names from :data:`BASINS`, shape ``(n,)``.
    """
    end = _gradient_flow(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    nearest = np.argmin(((end[:, None, :] - WELL_MINIMA[None]) ** 2).sum(-1), axis=1)
    return np.asarray(BASINS)[nearest]


def simulate_paths(
    x0: np.ndarray,
    *,
    t_start: float,
    t_end: float,
    dt: float = DT,
    sigma: float = SIGMA,
    rng: np.random.Generator,
) -> np.ndarray:
    """Push latent states forward under the true SDE ``dX = -grad V dt + sigma dW``.

    Euler-Maruyama with the largest step not above ``dt`` that divides the interval
    evenly, so the end time is hit exactly.

    Parameters
    ----------
    x0
        Start states at ``t_start``, shape ``(n, 2)``; not modified.
    t_start, t_end
        Start and end times, ``t_end >= t_start``.
    dt
        Largest Euler-Maruyama step.
    sigma
        Noise amplitude.
    rng
        Source of the Brownian increments.

    Returns
    -------
    States at ``t_end``, shape ``(n, 2)``.
    """
    x = np.array(x0, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x0 must have shape (n, 2), got {x.shape}")
    span = float(t_end) - float(t_start)
    if span < 0:
        raise ValueError(f"t_end ({t_end}) must not be before t_start ({t_start})")
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}")
    # The tolerance keeps e.g. 1.0 / 0.01 from rounding up to 101 steps.
    n_steps = int(np.ceil(span / dt - 1e-9))
    if n_steps == 0:
        return x
    step = span / n_steps
    noise = sigma * np.sqrt(step)
    for _ in range(n_steps):
        x -= step * potential_grad(x)
        x += noise * rng.standard_normal(x.shape)
    return x


@dataclasses.dataclass(frozen=True)
class _Snapshots:
    time_index: np.ndarray  # (n,) index into the time points
    latent: np.ndarray  # (n, 2) state at the observation time
    final: np.ndarray  # (n, 2) state at the last time point


def _snapshots(n: int, time_points: np.ndarray, *, rng: np.random.Generator) -> _Snapshots:
    # Balanced assignment, then shuffled so time is not confounded with cell order.
    time_index = rng.permutation(np.arange(n) % len(time_points))
    x = WELL_MINIMA[0] + INITIAL_SPREAD * rng.standard_normal((n, 2))
    latent = np.empty_like(x)
    t = 0.0
    for k, t_k in enumerate(time_points):
        x = simulate_paths(x, t_start=t, t_end=t_k, rng=rng)
        t = t_k
        latent[time_index == k] = x[time_index == k]
    return _Snapshots(time_index=time_index, latent=latent, final=x)


# --------------------------------------------------------------------------- genes


@dataclasses.dataclass(frozen=True)
class _GeneModel:
    names: np.ndarray
    is_mt: np.ndarray
    is_ribo: np.ndarray
    baseline: np.ndarray  # (G,) log-weight; unused for MT genes
    loadings: np.ndarray  # (K, G) response to the RBF features; zero for MT genes
    dispersion: np.ndarray  # (G,) NB inverse overdispersion theta
    batch_lfc: np.ndarray  # (G,) log-fold change in batch b1
    mt_profile: np.ndarray  # (G,) shares among MT genes, zero elsewhere

    def rates(
        self,
        latent: np.ndarray,
        *,
        library_size: np.ndarray,
        mt_fraction: np.ndarray,
        in_batch_b1: np.ndarray,
        lfc: np.ndarray | None = None,
    ) -> np.ndarray:
        """NB means, shape ``(n, G)``: depth times expression share; ``lfc`` (n, G) shifts the log-weights
        (a knock-down lowers its target's)."""
        logits = self.baseline + _rbf_features(latent) @ self.loadings
        logits = logits + np.outer(in_batch_b1, self.batch_lfc)
        if lfc is not None:
            logits = logits + lfc
        logits = LOG_WEIGHT_CAP - np.logaddexp(0.0, LOG_WEIGHT_CAP - logits)
        logits[:, self.is_mt] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        share = np.exp(logits)
        share /= share.sum(axis=1, keepdims=True)
        share = share * (1.0 - mt_fraction)[:, None] + np.outer(mt_fraction, self.mt_profile)
        return share * library_size[:, None]


def _rbf_centres() -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(RBF_GRID_X, RBF_GRID_Y)
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    centres = np.vstack([grid, WELL_MINIMA])
    widths = np.concatenate([np.full(len(grid), RBF_GRID_WIDTH), np.full(len(WELL_MINIMA), RBF_MARKER_WIDTH)])
    return centres, widths


_RBF_CENTRES, _RBF_WIDTHS = _rbf_centres()


def _rbf_features(latent: np.ndarray) -> np.ndarray:
    d2 = ((latent[:, None, :] - _RBF_CENTRES[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2.0 * _RBF_WIDTHS**2))


def _ribo_names(n: int) -> list[str]:
    # Alternate large- and small-subunit names as real ribosomal gene sets do.
    large = (f"RPL{k}" for k in range(3, 3 + n))
    small = (f"RPS{k}" for k in range(2, 2 + n))
    return [next(large) if i % 2 == 0 else next(small) for i in range(n)]


def _n_ribo(n_genes: int) -> int:
    return max(2, round(RIBO_GENE_FRACTION * n_genes))


def _gene_model(n_genes: int, *, rng: np.random.Generator) -> _GeneModel:
    n_mt = len(MT_GENES)
    n_ribo = _n_ribo(n_genes)
    n_other = n_genes - n_mt - n_ribo
    names = np.array(
        [f"Gene{i + 1:04d}" for i in range(n_other)] + _ribo_names(n_ribo) + list(MT_GENES)
    )
    kind = np.repeat([0, 1, 2], [n_other, n_ribo, n_mt])
    is_ribo, is_mt = kind == 1, kind == 2
    other = np.flatnonzero(kind == 0)

    # Dynamic genes start low and their programme switches them on in some states: that
    # on/off pattern, not a uniformly low level, is what makes real count matrices sparse.
    dynamic = np.zeros(n_genes, dtype=bool)
    dynamic[rng.choice(other, size=round(DYNAMIC_GENE_FRACTION * n_other), replace=False)] = True
    steady = ~dynamic & (kind == 0)
    baseline = np.zeros(n_genes)
    baseline[steady] = rng.normal(*STEADY_BASELINE, steady.sum())
    baseline[dynamic] = rng.normal(*DYNAMIC_BASELINE, dynamic.sum())
    # Ribosomal genes together take about RIBO_SHARE of the non-MT counts, whatever n_genes.
    ribo_level = np.logaddexp.reduce(baseline[other]) + np.log(RIBO_SHARE / (1 - RIBO_SHARE) / n_ribo)
    baseline[is_ribo] = ribo_level + rng.normal(0.0, 0.3, n_ribo)

    n_grid = len(RBF_GRID_X) * len(RBF_GRID_Y)
    loadings = np.zeros((len(_RBF_CENTRES), n_genes))
    loadings[:n_grid, dynamic] = rng.normal(0.0, DYNAMIC_LOADING_SD, (n_grid, dynamic.sum()))
    # Marker genes give each basin an unmistakable programme on top of the smooth one.
    n_markers = max(1, round(MARKER_GENE_FRACTION * n_other))
    # Markers come from quiet genes, so they are off outside their basin, as real markers are.
    quiet = other[baseline[other] < np.median(baseline[other])]
    markers = rng.choice(quiet, size=(len(WELL_MINIMA), n_markers), replace=False)
    for k, genes in enumerate(markers):
        loadings[n_grid + k, genes] = MARKER_LOADING

    dispersion = GENE_DISPERSION_MEDIAN * np.exp(rng.normal(0.0, 0.5, n_genes))
    dispersion[is_ribo] = 10.0
    dispersion[is_mt] = 5.0
    batch_lfc = np.where(is_mt, 0.0, rng.normal(0.0, BATCH_GENE_LFC_SD, n_genes))
    mt_profile = np.zeros(n_genes)
    mt_profile[is_mt] = rng.dirichlet(np.full(n_mt, 5.0))
    return _GeneModel(
        names=names,
        is_mt=is_mt,
        is_ribo=is_ribo,
        baseline=baseline,
        loadings=loadings,
        dispersion=dispersion,
        batch_lfc=batch_lfc,
        mt_profile=mt_profile,
    )


def _negative_binomial(mean: np.ndarray, theta: np.ndarray | float, *, rng: np.random.Generator) -> np.ndarray:
    # Gamma-Poisson mixture: variance mean + mean**2 / theta.
    return rng.poisson(rng.gamma(theta, mean / theta))


def _measure_rna(genes: _GeneModel, latent: np.ndarray, *, rng: np.random.Generator, lfc: np.ndarray | None = None):
    """RNA counts of cells in latent states: depth, batch, damage and NB sampling, in one random stream.

    ``lfc`` (cells x genes) shifts the genes' log-weights (a knock-down's direct effect).

    Returns CSR counts (float32), the NB means, the ``low_quality`` flags and the batch-b1 indicator.
    """
    n_cells = len(latent)
    n_low = max(1, round(LOW_QUALITY_FRACTION * n_cells))
    low_quality = np.zeros(n_cells, dtype=bool)
    low_quality[rng.choice(n_cells, size=n_low, replace=False)] = True
    in_b1 = rng.integers(0, 2, n_cells).astype(np.float64)
    library = MEDIAN_LIBRARY_SIZE * np.exp(rng.normal(0.0, LIBRARY_SIZE_SD, n_cells))
    library *= np.where(in_b1 == 1, BATCH_DEPTH, 1.0) * np.where(low_quality, LOW_QUALITY_DEPTH, 1.0)
    mt_fraction = np.where(
        low_quality,
        rng.uniform(*LOW_QUALITY_MT_RANGE, n_cells),
        np.minimum(MT_FRACTION * np.exp(rng.normal(0.0, 0.35, n_cells)), 0.15),
    )
    # Cells in blocks: at 100,000 cells x 2,000 genes the whole dense draw held ~7.8 GB at once. Up to
    # one block (the default and test sizes) the random stream, and so the data, is as it always was.
    rates = np.empty((n_cells, len(genes.names)))
    blocks = []
    for start in range(0, n_cells, CELL_BLOCK):
        rows = slice(start, start + CELL_BLOCK)
        rates[rows] = genes.rates(latent[rows], library_size=library[rows], mt_fraction=mt_fraction[rows],
                                  in_batch_b1=in_b1[rows], lfc=None if lfc is None else lfc[rows])
        blocks.append(sp.csr_matrix(_negative_binomial(rates[rows], genes.dispersion, rng=rng)
                                    .astype(np.float32)))
    rna_counts = sp.vstack(blocks, format="csr")
    del blocks
    return rna_counts, rates, low_quality, in_b1


def _protein_targets(genes: _GeneModel, rates: np.ndarray, n_proteins: int) -> np.ndarray:
    """Pick the genes proteins are tied to: those whose counts best reflect their rate.

    The score is the share of a gene's count variance across cells that comes from its
    rate rather than from NB sampling, ``var(mu) / (var(mu) + E[mu + mu**2 / theta])``,
    so the RNA-protein link is visible in the counts, as for good CITE-seq markers.
    Genes expected to be detected in most cells come first: a gene that is off in nearly
    every cell can score well yet leaves its protein at ambient level almost everywhere.
    """
    other = np.flatnonzero(~genes.is_mt & ~genes.is_ribo)
    score, detected = np.empty(len(other)), np.empty(len(other), dtype=bool)
    # A few genes at a time: the same numbers as over all genes at once, without copies of all rates.
    for start in range(0, len(other), 64):
        cols = slice(start, start + 64)
        mu = rates[:, other[cols]]
        signal = mu.var(axis=0)
        noise = (mu + mu**2 / genes.dispersion[other[cols]]).mean(axis=0)
        score[cols] = signal / (signal + noise)
        detected[cols] = np.median(mu, axis=0) >= 1.0
    # lexsort: last key first; ties resolve by gene order, the same on every platform.
    order = np.lexsort((-score, ~detected))
    return np.sort(other[order[:n_proteins]])


# --------------------------------------------------------------------------- tissue


@dataclasses.dataclass(frozen=True)
class _Tissue:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    spot_xy: np.ndarray  # (S, 2) pixel x, y
    spot_grid: np.ndarray  # (S, 2) row, column
    spot_radius: float  # px
    in_tissue: np.ndarray  # (S,)
    spot_niche: np.ndarray  # (S,) names
    cell_xy: np.ndarray  # (C, 2) pixel x, y
    cell_latent: np.ndarray  # (C, 2)
    cell_basin: np.ndarray  # (C,) names
    cell_niche: np.ndarray  # (C,) names
    member_cells: np.ndarray  # (M,) indices of cells inside a spot
    membership: sp.csr_matrix  # (S, M) 1 where member cell m lies in spot s
    member_counts: sp.csr_matrix  # (M, G)
    spot_counts: sp.csr_matrix  # (S, G) == membership @ member_counts


def _inside_tissue(xy: np.ndarray, size: float) -> np.ndarray:
    # A superellipse: a tissue section with rounded corners, leaving the image corners bare.
    u = (xy[:, 0] - size / 2) / (TISSUE_SEMI_AXES[0] * size)
    v = (xy[:, 1] - size / 2) / (TISSUE_SEMI_AXES[1] * size)
    return u**4 + v**4 <= 1.0


def _niche_index(xy: np.ndarray, size: float) -> np.ndarray:
    # Voronoi regions of the niche centres, with boundaries bent by a smooth fixed warp
    # so that niches are not separated by straight lines a model could latch onto.
    u = xy / size
    warped = u + NICHE_WARP * np.sin(2 * np.pi * 3 * u[:, ::-1] + np.array([0.3, 1.7]))
    d2 = ((warped[:, None, :] - NICHE_CENTRES[None]) ** 2).sum(-1)
    return np.argmin(d2, axis=1)


def _spot_grid(n_spots: int) -> tuple[np.ndarray, int, float]:
    n_cols = int(np.ceil(np.sqrt(n_spots)))
    n_rows = int(np.ceil(n_spots / n_cols))
    size = int(np.clip(n_cols * SPOT_SPACING_TARGET_PX, *IMAGE_SIZE_RANGE_PX))
    spacing = size / n_cols
    rc = np.array([(r, c) for r in range(n_rows) for c in range(n_cols)][:n_spots])
    return rc, size, spacing


def _cell_positions(size: int, spacing: float, *, rng: np.random.Generator) -> np.ndarray:
    # A jittered hexagonal lattice packs cells like an epithelium, without holes or piles.
    d = CELL_SPACING * spacing
    rows = np.arange(0.0, size, d * np.sqrt(3) / 2)
    cols = np.arange(0.0, size, d)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    xx = xx + (np.arange(len(rows)) % 2)[:, None] * d / 2
    xy = np.column_stack([xx.ravel(), yy.ravel()])
    xy = xy + rng.uniform(-0.25 * d, 0.25 * d, xy.shape)
    return xy[_inside_tissue(xy, size)]


def _cell_colours(latent: np.ndarray, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Soft basin membership makes colour a smooth function of state, like expression.
    d2 = ((latent[:, None, :] - WELL_MINIMA[None]) ** 2).sum(-1)
    w = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / (2.0 * COLOUR_WIDTH**2))
    w /= w.sum(axis=1, keepdims=True)
    brightness = np.exp(rng.normal(0.0, 0.05, (len(latent), 1)))
    return w @ CELL_RGB * brightness, w @ NUCLEUS_FRACTION


def _render(size: int, spacing: float, cell_xy: np.ndarray, cell_latent: np.ndarray, *, rng) -> np.ndarray:
    colour, nucleus = _cell_colours(cell_latent, rng=rng)
    centres = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    pixels = np.column_stack([xx.ravel(), yy.ravel()])
    image = np.where(_inside_tissue(pixels, size)[:, None], STROMA_RGB, GLASS_RGB)
    dist, nearest = cKDTree(cell_xy).query(pixels)
    radius = CELL_RADIUS * spacing
    in_cell = dist < radius
    image[in_cell] = colour[nearest[in_cell]]
    in_nucleus = dist < radius * nucleus[nearest]
    image[in_nucleus] = 0.7 * np.asarray(NUCLEUS_RGB) + 0.3 * colour[nearest[in_nucleus]]
    image = image + rng.normal(0.0, PIXEL_NOISE_SD, image.shape)
    return np.clip(image, 0.0, 1.0).reshape(size, size, 3).astype(np.float32)


def _simulate_tissue(
    genes: _GeneModel, *, n_spots: int, time_points: np.ndarray, rng: np.random.Generator
) -> _Tissue:
    spot_grid, size, spacing = _spot_grid(n_spots)
    # Centre the (possibly partial) grid vertically in the square image.
    offset_y = (size - (spot_grid[:, 0].max() + 1) * spacing) / 2
    spot_xy = np.column_stack([(spot_grid[:, 1] + 0.5) * spacing, offset_y + (spot_grid[:, 0] + 0.5) * spacing])
    in_tissue = _inside_tissue(spot_xy, size)

    cell_xy = _cell_positions(size, spacing, rng=rng)
    n_cells = len(cell_xy)
    cell_niche = _niche_index(cell_xy, size)

    # Cells observed at random times give every basin, including progenitors.
    pool = _snapshots(n_cells, time_points, rng=rng)
    pool_basin = basin_of(pool.latent)
    by_basin = [np.flatnonzero(pool_basin == b) for b in BASINS]
    available = np.array([len(ix) > 0 for ix in by_basin])
    cell_pool_index = np.empty(n_cells, dtype=np.int64)
    for k in range(len(NICHES)):
        members = np.flatnonzero(cell_niche == k)
        p = NICHE_COMPOSITION[k] * available
        drawn = rng.choice(len(BASINS), size=len(members), p=p / p.sum())
        for b, ix in enumerate(by_basin):
            chosen = members[drawn == b]
            # An empty basin is never drawn (p = 0), and choosing 0 from it is allowed.
            cell_pool_index[chosen] = rng.choice(ix, size=len(chosen))
    cell_latent = pool.latent[cell_pool_index]
    cell_basin = pool_basin[cell_pool_index]

    radius = SPOT_RADIUS * spacing
    hits = cKDTree(cell_xy).query_ball_point(spot_xy, r=radius)
    # Spots are narrower than half their spacing, so no cell lies in two spots.
    member_cells = np.concatenate([np.sort(np.asarray(h, dtype=np.int64)) for h in hits])
    spot_of_member = np.repeat(np.arange(n_spots), [len(h) for h in hits])
    membership = sp.csr_matrix(
        (np.ones(len(member_cells), dtype=np.float32), (spot_of_member, np.arange(len(member_cells)))),
        shape=(n_spots, len(member_cells)),
    )

    n_members = len(member_cells)
    library = SPATIAL_MEDIAN_LIBRARY_SIZE * np.exp(rng.normal(0.0, SPATIAL_LIBRARY_SIZE_SD, n_members))
    mt_fraction = MT_FRACTION * np.exp(rng.normal(0.0, 0.35, n_members))
    rates = genes.rates(
        cell_latent[member_cells],
        library_size=library,
        mt_fraction=mt_fraction,
        in_batch_b1=np.zeros(n_members),
    )
    member_counts = sp.csr_matrix(_negative_binomial(rates, genes.dispersion, rng=rng).astype(np.float32))
    spot_counts = sp.csr_matrix(membership @ member_counts, dtype=np.float32)

    spot_niche = np.where(in_tissue, np.asarray(NICHES)[_niche_index(spot_xy, size)], OUTSIDE_TISSUE)
    image = _render(size, spacing, cell_xy, cell_latent, rng=rng)
    return _Tissue(
        image=image,
        spot_xy=spot_xy,
        spot_grid=spot_grid,
        spot_radius=radius,
        in_tissue=in_tissue,
        spot_niche=spot_niche,
        cell_xy=cell_xy,
        cell_latent=cell_latent,
        cell_basin=cell_basin,
        cell_niche=np.asarray(NICHES)[cell_niche],
        member_cells=member_cells,
        membership=membership,
        member_counts=member_counts,
        spot_counts=spot_counts,
    )


# --------------------------------------------------------------------------- assembly


def _names(prefix: str, n: int, width: int) -> list[str]:
    width = max(width, len(str(n)))
    return [f"{prefix}{i + 1:0{width}d}" for i in range(n)]


def _validate(n_cells: int, n_genes: int, n_proteins: int, time_points: np.ndarray, n_spots: int) -> None:
    if n_cells < len(time_points):
        raise ValueError(f"n_cells ({n_cells}) must be at least the number of time points ({len(time_points)})")
    min_genes = len(MT_GENES) + _n_ribo(n_genes) + max(n_proteins, MIN_OTHER_GENES)
    if n_genes < min_genes:
        raise ValueError(
            f"n_genes ({n_genes}) is too small: {len(MT_GENES)} MT genes, {_n_ribo(n_genes)} ribosomal genes "
            f"and max(n_proteins, {MIN_OTHER_GENES}) other genes need at least {min_genes}"
        )
    if n_proteins < 1:
        raise ValueError(f"n_proteins must be at least 1, got {n_proteins}")
    if n_spots < 1:
        raise ValueError(f"n_spots must be at least 1, got {n_spots}")
    if len(time_points) == 0 or not np.all(np.isfinite(time_points)) or time_points.min() < 0:
        raise ValueError(f"time_points must be non-empty, finite and >= 0, got {time_points.tolist()}")
    if np.any(np.diff(time_points) <= 0):
        raise ValueError(f"time_points must be strictly increasing, got {time_points.tolist()}")


def _params(*, seed: int, n_cells: int, n_genes: int, n_proteins: int, time_points, n_spots: int) -> dict:
    # Plain lists, floats, ints and strings only, so h5mu and JSON can both hold it.
    return {
        "generator": "virtualcell.synthetic",
        "seed": int(seed),
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_proteins": int(n_proteins),
        "time_points": [float(t) for t in time_points],
        "n_spots": int(n_spots),
        "basins": list(BASINS),
        "sde": {"sigma": SIGMA, "dt": DT, "t_start": 0.0, "initial_spread": INITIAL_SPREAD},
        "landscape": {
            "well_centres": WELL_CENTRES.tolist(),
            "well_depths": WELL_DEPTHS.tolist(),
            "well_widths": WELL_WIDTHS.tolist(),
            "well_minima": WELL_MINIMA.tolist(),
            "confinement": CONFINEMENT,
            "confinement_centre": CONFINEMENT_CENTRE.tolist(),
            "tilt": TILT,
        },
        "rna": {
            "median_library_size": MEDIAN_LIBRARY_SIZE,
            "mt_fraction": MT_FRACTION,
            "low_quality_fraction": LOW_QUALITY_FRACTION,
            "batch_depth": BATCH_DEPTH,
        },
        "spatial": {
            "library_id": LIBRARY_ID,
            "niches": list(NICHES),
            "niche_composition": NICHE_COMPOSITION.tolist(),
            "spot_radius_over_spacing": SPOT_RADIUS,
        },
    }


def generate(
    *,
    n_cells: int = 3000,
    n_genes: int = 400,
    n_proteins: int = 20,
    time_points: Sequence[float] = (0, 1, 2, 3, 4, 5),
    n_spots: int = 400,
    seed: int = 0,
    cells_per_condition: int = 0,
    n_peaks: int = 0,
) -> md.MuData:
    """Generate the ground-truth multi-omic, spatial, time-course dataset.

    Parameters
    ----------
    n_cells
        Cells with RNA and protein, split evenly over ``time_points``.
    n_genes
        Genes, including the 13 ``MT-`` genes and about 5 % ribosomal genes.
    n_proteins
        Antibody-derived tags, each tied to one gene.
    time_points
        Observation times (strictly increasing, ``>= 0``); every path starts at ``t = 0``.
    n_spots
        Spatial spots on a square grid.
    seed
        Seed of the only random generator.
    cells_per_condition
        When > 0, also cells of 8 knock-downs, 2 drugs and a combination, this many each, beside
        the ``n_cells`` control cells (:mod:`virtualcell.synthetic_conditions`); the control cells are
        the same as without them.
    n_peaks
        When > 0, also chromatin accessibility of every cell (10x Multiome-like ATAC peaks opened by
        the latent state, :mod:`virtualcell.synthetic_atac`), from its own random stream: the other
        modalities are the same as without it.

    Returns
    -------
    A :class:`mudata.MuData` with

    ``mdata["rna"]``
        ``X``: raw counts (CSR, float32). ``obs``: ``time``, ``fate`` (basin at the last
        time point), ``basin`` (basin when observed), ``low_quality``, ``batch``.
        ``obsm["truth_latent"]``: latent state when observed. ``var``: ``mt``, ``ribo``,
        ``truth_dispersion``. With perturbations, also ``obs["condition"]`` (``control`` or the
        condition's name) and ``obsm["truth_counterfactual"]`` (the state under control with the
        same path noise; the cell's own for control cells).
    ``mdata["prot"]``
        Same cells in the same order. ``X``: raw counts (CSR, float32). ``var``:
        ``gene`` (the tied gene), ``truth_scale``, ``truth_ambient``. The parts of each cell's NB
        mean ``truth_signal + truth_capture * truth_ambient``: ``obsm["truth_signal"]`` (``k_j *
        rate_cg``, which carries the cell's RNA library) and ``obs["truth_capture"]`` (``a_c``),
        with ``obs["truth_library"]``, the cell's RNA library size (what the retrieval oracles of
        :mod:`virtualcell.retrieval_oracle` read).
    ``mdata["atac"]`` (``n_peaks > 0``)
        Same cells in the same order. ``X``: peak counts in {0, 1, 2} (CSR, float32), peaks named
        ``chr<k>:<start>-<end>``. ``var``: ``gene`` (a gene-linked peak's gene), ``truth_kind``;
        ``obs["truth_capture"]``: the cell's capture rate (its ATAC depth).
    ``mdata["spatial"]``
        Spots. ``X``: summed raw counts of the cells in each spot, genes as in ``rna``.
        ``obs``: ``in_tissue``, ``niche``, ``n_cells``, ``array_row``, ``array_col``.
        ``obsm["spatial"]``: pixel ``x, y`` in the full-resolution image;
        ``obsm["truth_cell_fraction"]``: fraction of each basin among the spot's cells.
        ``uns["spatial"][LIBRARY_ID]``: ``images["hires"]`` (RGB float32 in [0, 1]) and
        ``scalefactors`` (``tissue_hires_scalef = 1``, ``spot_diameter_fullres``).
    ``mdata.uns["synthetic"]``
        The generator's parameters (JSON-serialisable).
    """
    # Imported here, not at the top: the Snakefile plans the built-in data's conditions from this module
    # (synthetic_conditions.planned), and anndata, mudata and pandas would add ~1 s to every plan.
    import anndata as ad
    import mudata as md
    import pandas as pd

    tp = np.asarray(time_points, dtype=np.float64).ravel()
    _validate(n_cells, n_genes, n_proteins, tp, n_spots)
    if n_peaks < 0:
        raise ValueError(f"n_peaks must be at least 0, got {n_peaks}")
    rng_genes, rng_cells, rng_rna, rng_prot, rng_tissue = np.random.default_rng(seed).spawn(5)

    genes = _gene_model(n_genes, rng=rng_genes)
    snaps = _snapshots(n_cells, tp, rng=rng_cells)
    basin = basin_of(snaps.latent)
    fate = basin_of(snaps.final)

    rna_counts, rates, low_quality, in_b1 = _measure_rna(genes, snaps.latent, rng=rng_rna)

    targets = _protein_targets(genes, rates, n_proteins)
    target_rates = rates[:, targets]
    signal = PROTEIN_SIGNAL_MEDIAN * np.exp(rng_prot.normal(0.0, 0.6, n_proteins))
    scale = signal / target_rates.mean(axis=0)
    ambient = PROTEIN_AMBIENT_MEDIAN * np.exp(rng_prot.normal(0.0, 0.5, n_proteins))
    droplet = np.exp(rng_prot.normal(0.0, 0.3, n_cells))
    prot_counts = _negative_binomial(
        scale * target_rates + np.outer(droplet, ambient), PROTEIN_DISPERSION, rng=rng_prot
    )
    # The protein's truth (the parts of its NB mean, and the RNA library its signal carries)
    prot_signal, prot_capture, library = scale * target_rates, droplet, rates.sum(axis=1)

    obs = {
        TIME_KEY: tp[snaps.time_index],
        FATE_KEY: fate,
        BASIN_KEY: basin,
        LOW_QUALITY_KEY: low_quality,
        BATCH_KEY: np.asarray(BATCHES)[in_b1.astype(int)],
    }
    obsm = {LATENT_KEY: snaps.latent}
    conditions_truth = None
    if cells_per_condition > 0:
        # Their own random stream: the control cells above are the same with or without them.
        from virtualcell import synthetic_conditions as sc

        rng_cond, rng_cond_rna, rng_cond_prot = sc.condition_streams(seed)
        conds = sc.conditions(genes, rng=rng_cond)
        cells = sc.perturbed_cells(genes, conds, cells_per_condition=cells_per_condition, time_points=tp,
                                   rng=rng_cond)
        p_counts, p_rates, p_low, p_b1 = _measure_rna(genes, cells.latent, rng=rng_cond_rna, lfc=cells.lfc)
        n_p = len(cells.latent)
        p_droplet = np.exp(rng_cond_prot.normal(0.0, 0.3, n_p))
        p_prot = _negative_binomial(scale * p_rates[:, targets] + np.outer(p_droplet, ambient), PROTEIN_DISPERSION,
                                    rng=rng_cond_prot)
        rna_counts = sp.vstack([rna_counts, p_counts], format="csr")
        prot_counts = np.vstack([prot_counts, p_prot])
        prot_signal = np.vstack([prot_signal, scale * p_rates[:, targets]])
        prot_capture, library = np.concatenate([prot_capture, p_droplet]), np.concatenate([library, p_rates.sum(axis=1)])
        p_obs = {TIME_KEY: tp[cells.time_index], FATE_KEY: basin_of(cells.final), BASIN_KEY: basin_of(cells.latent),
                 LOW_QUALITY_KEY: p_low, BATCH_KEY: np.asarray(BATCHES)[p_b1.astype(int)]}
        obs = {k: np.concatenate([v, p_obs[k]]) for k, v in obs.items()}
        obs[sc.CONDITION_KEY] = pd.Categorical(
            np.concatenate([np.full(n_cells, sc.CONTROL, dtype=object), cells.condition]),
            categories=[c.name for c in conds])
        obsm[sc.COUNTERFACTUAL_KEY] = np.vstack([snaps.latent, cells.counterfactual])
        obsm[LATENT_KEY] = np.vstack([snaps.latent, cells.latent])
        holdouts = set(sc.auto_holdouts(conds))
        conditions_truth = {
            c.name: c.as_dict() | {"auto_holdout": c.name in holdouts,
                                   "fate_proportions": sc.fate_proportions(c, t_end=float(tp[-1]), seed=seed)}
            for c in conds
        }
    obs[FATE_KEY] = pd.Categorical(obs[FATE_KEY], categories=BASINS)
    obs[BASIN_KEY] = pd.Categorical(obs[BASIN_KEY], categories=BASINS)
    obs[BATCH_KEY] = pd.Categorical(obs[BATCH_KEY], categories=BATCHES)

    cell_names = pd.Index(_names("cell", len(obs[TIME_KEY]), 5))
    rna = ad.AnnData(
        X=rna_counts,
        obs=pd.DataFrame(obs, index=cell_names),
        var=pd.DataFrame(
            {MT_KEY: genes.is_mt, RIBO_KEY: genes.is_ribo, "truth_dispersion": genes.dispersion},
            index=pd.Index(genes.names),
        ),
        obsm=obsm,
    )
    prot = ad.AnnData(
        X=sp.csr_matrix(prot_counts.astype(np.float32)),
        obs=pd.DataFrame({"truth_capture": prot_capture, "truth_library": library}, index=cell_names.copy()),
        var=pd.DataFrame(
            {GENE_KEY: genes.names[targets], "truth_scale": scale, "truth_ambient": ambient},
            index=pd.Index([f"CD_{g}" for g in genes.names[targets]]),
        ),
        obsm={"truth_signal": prot_signal.astype(np.float32)},
    )

    tissue = _simulate_tissue(genes, n_spots=n_spots, time_points=tp, rng=rng_tissue)
    spot_names = pd.Index(_names("spot", n_spots, 4))
    n_in_spot = np.asarray(tissue.membership.sum(axis=1)).ravel().astype(np.int64)
    basin_onehot = (tissue.cell_basin[tissue.member_cells][:, None] == np.asarray(BASINS)[None]).astype(np.float64)
    fraction = (tissue.membership @ basin_onehot) / np.maximum(n_in_spot, 1)[:, None]
    spatial = ad.AnnData(
        X=tissue.spot_counts,
        obs=pd.DataFrame(
            {
                IN_TISSUE_KEY: tissue.in_tissue,
                NICHE_KEY: pd.Categorical(tissue.spot_niche, categories=[*NICHES, OUTSIDE_TISSUE]),
                N_CELLS_KEY: n_in_spot,
                "array_row": tissue.spot_grid[:, 0],
                "array_col": tissue.spot_grid[:, 1],
            },
            index=spot_names,
        ),
        var=rna.var.copy(),
        obsm={
            SPATIAL_KEY: tissue.spot_xy,
            CELL_FRACTION_KEY: pd.DataFrame(fraction, index=spot_names, columns=list(BASINS)),
        },
        uns={
            SPATIAL_KEY: {
                LIBRARY_ID: {
                    "images": {"hires": tissue.image},
                    "scalefactors": {
                        "tissue_hires_scalef": 1.0,
                        "spot_diameter_fullres": float(2 * tissue.spot_radius),
                    },
                }
            }
        },
    )

    # Adopt mudata's coming default now: modalities keep their own obs/var columns, so
    # the spatial genes (same names as rna's) are not merged into the global var.
    with md.set_options(pull_on_update=False), warnings.catch_warnings():
        # rna and spatial share their genes on purpose; the global var repeats them.
        warnings.filterwarnings("ignore", message="var_names are not unique", category=UserWarning)
        mods = {RNA: rna, PROT: prot, SPATIAL: spatial}
        if n_peaks > 0:
            mods[ATAC] = _atac(genes, np.asarray(obsm[LATENT_KEY]), cell_names, n_peaks=n_peaks, seed=seed)
        mdata = md.MuData(mods)
    mdata.uns[PARAMS_KEY] = _params(
        seed=seed, n_cells=n_cells, n_genes=n_genes, n_proteins=n_proteins, time_points=tp, n_spots=n_spots
    )
    if n_peaks > 0:
        mdata.uns[PARAMS_KEY] |= {"n_peaks": int(n_peaks)}
    if conditions_truth is not None:
        mdata.uns[PARAMS_KEY] |= {"cells_per_condition": int(cells_per_condition), "conditions": conditions_truth}
    return mdata


def _atac(genes: _GeneModel, latent: np.ndarray, cell_names, *, n_peaks: int, seed: int):
    """The cells' peaks (:mod:`virtualcell.synthetic_atac`), linked to the genes that have a programme."""
    import anndata as ad
    import pandas as pd

    from virtualcell import synthetic_atac

    linkable = np.abs(genes.loadings).sum(axis=0) > 0
    counts, var, capture = synthetic_atac.measure_atac(
        _rbf_features(latent), genes.loadings, genes.names, linkable, n_peaks=n_peaks,
        rng=synthetic_atac.atac_stream(seed))
    return ad.AnnData(X=counts, obs=pd.DataFrame({"truth_capture": capture}, index=cell_names.copy()), var=var)


# --------------------------------------------------------------------------- truth for scoring


def sample_cells(params: Mapping[str, Any], *, time: float, n: int, seed: int) -> tuple[sp.csr_matrix, list[str]]:
    """A fresh sample of the true process at ``time``, measured as the dataset was: the oracle.

    The genes (and so the measurement) are those of the dataset whose generator parameters are
    ``params`` (``mdata.uns["synthetic"]``); the cells are new: paths from ``t = 0`` under the
    true SDE, then depth, batch and NB sampling as :func:`generate` does. Damaged
    (``low_quality``) cells are left out, as QC removes them.

    Parameters
    ----------
    params
        The generator parameters of the dataset.
    time
        Observation time.
    n
        Healthy cells to return.
    seed
        Seed of the fresh cells (any seed gives cells independent of the dataset's).

    Returns
    -------
    Raw counts (CSR, float32, ``n`` x genes) and the gene names.
    """
    rng_genes = np.random.default_rng(int(params["seed"])).spawn(5)[0]
    genes = _gene_model(int(params["n_genes"]), rng=rng_genes)
    rng = np.random.default_rng([int(params["seed"]), 7919, int(seed)])
    # A few more than n, so n remain after the damaged ones are dropped.
    n_draw = int(np.ceil(n / (1.0 - LOW_QUALITY_FRACTION))) + 2
    start = WELL_MINIMA[0] + INITIAL_SPREAD * rng.standard_normal((n_draw, 2))
    latent = simulate_paths(start, t_start=0.0, t_end=float(time), rng=rng)
    counts, _, low_quality, _ = _measure_rna(genes, latent, rng=rng)
    keep = np.flatnonzero(~low_quality)[:n]
    return counts[keep], [str(g) for g in genes.names]


def fate_probabilities(latent: np.ndarray, times: np.ndarray, *, t_end: float, n_rollouts: int = 100,
                       seed: int = 0) -> np.ndarray:
    """Each cell's true fate probabilities: many rollouts of the true SDE from its latent state to ``t_end``.

    Parameters
    ----------
    latent
        True latent states (``obsm["truth_latent"]``), shape ``(n, 2)``.
    times
        Each cell's observation time, shape ``(n,)``, none after ``t_end``.
    t_end
        The time at which the fate is read (the basin the path is in, as ``obs["fate"]`` is).
    n_rollouts
        Paths per cell.
    seed
        Seed of the Brownian increments.

    Returns
    -------
    Fractions of rollouts ending in each of :data:`BASINS`, shape ``(n, 3)``, rows sum to 1.
    """
    latent = np.asarray(latent, dtype=np.float64).reshape(-1, 2)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if len(times) != len(latent):
        raise ValueError(f"{len(times)} times for {len(latent)} cells")
    if np.any(times > t_end):
        raise ValueError(f"cells observed after t_end={t_end}")
    rng = np.random.default_rng(seed)
    out = np.zeros((len(latent), len(BASINS)))
    for t in np.unique(times):
        cells = np.flatnonzero(times == t)
        start = np.repeat(latent[cells], n_rollouts, axis=0)
        end = simulate_paths(start, t_start=float(t), t_end=float(t_end), rng=rng)
        basin = basin_of(end).reshape(len(cells), n_rollouts)
        for k, name in enumerate(BASINS):
            out[cells, k] = (basin == name).mean(axis=1)
    return out
