"""Perturbations of the ground-truth generator: knock-downs, drugs and a combination, with their truth.

:func:`virtualcell.synthetic.generate` with ``cells_per_condition > 0`` adds, beside the control
cells, cells of every condition below, observed at the same time points. Each condition acts
twice, as real ones do:

Knock-downs (``Gene0123``)
    lower their target's expression to :data:`KNOCKDOWN_RESIDUAL` of its level (a shift of the
    gene's log-weight), and, when the gene is a marker of a basin's programme, make that
    basin's well shallower (depth times :data:`PROGRAMME_DEPTH_FACTOR`): knocking down a fate-A
    marker sends fewer cells to fate A; a progenitor marker lets cells leave the progenitor
    sooner. Two knock-downs per programme (progenitor, fate A, fate B) and two of genes
    without a programme (a direct effect only).
Drugs
    act on the landscape alone: ``drug_tilt`` tilts it toward fate A (``+ tilt_x * x``);
    ``drug_block`` deepens the progenitor well so that cells stay (differentiation blocked).
A combination (``GeneA+GeneB``)
    of two knock-downs whose singles are both conditions: direct effects add in log space,
    depth factors multiply.

For every perturbed cell the generator also keeps its *counterfactual*: the state the same
path noise would have reached under the control landscape (``obsm["truth_counterfactual"]``),
and for every condition its true fate proportions at the last time point (many rollouts from
``t = 0``), in ``uns["synthetic"]["conditions"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from virtualcell import synthetic as syn

CONDITION_KEY = "condition"
CONTROL = "control"
COUNTERFACTUAL_KEY = "truth_counterfactual"
COMBINATION_SEPARATOR = "+"

KNOCKDOWN_RESIDUAL = 0.2  # a knock-down leaves 20 % of its target's expression
PROGRAMME_DEPTH_FACTOR = 0.55  # a marker's knock-down makes its basin's well this much as deep
DRUG_TILT_X = 0.45  # drug_tilt: + tilt_x * x lowers the fate-A side (x < 0)
DRUG_BLOCK_DEPTH = 2.6  # drug_block: the progenitor well's depth (control 1.2)
KNOCKDOWNS_PER_PROGRAMME = 2
PROGRAMMES = (*syn.BASINS, "none")  # the basin programme a knocked-down gene belongs to
FATE_ROLLOUTS = 4000  # paths per condition for its true fate proportions

# Held out whole by `holdouts_conditions: auto`: a knock-down of a gene never perturbed in training in
# a programme that was (fate A's second marker), one without a programme, and the combination.
AUTO_HOLDOUTS = ("fate_A:1", "none:1", "combination")


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # control | knockdown | drug | combination
    targets: tuple[str, ...]  # knocked-down genes
    programmes: tuple[str, ...]  # the programme of each target
    depths: tuple[float, ...]  # well depths under the condition, rows follow BASINS
    tilt_x: float

    def as_dict(self) -> dict:
        return {"kind": self.kind, "targets": list(self.targets), "programmes": list(self.programmes),
                "depths": list(self.depths), "tilt_x": float(self.tilt_x)}


def _programme_genes(genes: syn._GeneModel) -> dict[str, np.ndarray]:
    """Gene indices of each programme: the basins' markers, and expressed genes with no programme."""
    n_grid = len(syn.RBF_GRID_X) * len(syn.RBF_GRID_Y)
    smooth = np.any(genes.loadings[:n_grid] != 0, axis=0)
    out = {}
    for k, basin in enumerate(syn.BASINS):
        markers = np.flatnonzero(genes.loadings[n_grid + k] > 0)
        # Markers of the basin alone (not also on the smooth programme), so that a knock-down's programme
        # shows in the gene's expression, as a marker's does; all markers when fewer than needed are pure.
        pure = markers[~smooth[markers]]
        out[basin] = pure if len(pure) >= KNOCKDOWNS_PER_PROGRAMME else markers
    plain = ~genes.is_mt & ~genes.is_ribo & ~np.any(genes.loadings != 0, axis=0)
    # Expressed ones (high baseline), so that the knock-down is visible in the counts.
    candidates = np.flatnonzero(plain)
    out["none"] = candidates[np.argsort(-genes.baseline[candidates], kind="stable")]
    return out


def conditions(genes: syn._GeneModel, *, rng: np.random.Generator) -> list[Condition]:
    """The control and every perturbed condition, knock-down targets drawn from each programme."""
    by_programme = _programme_genes(genes)
    control_depths = tuple(float(d) for d in syn.WELL_DEPTHS)
    out = [Condition(CONTROL, "control", (), (), control_depths, 0.0)]
    singles: dict[str, list[Condition]] = {}
    for programme in PROGRAMMES:
        pool = by_programme[programme]
        if len(pool) < KNOCKDOWNS_PER_PROGRAMME:
            raise ValueError(f"{len(pool)} genes in the {programme} programme; perturbations need "
                             f"{KNOCKDOWNS_PER_PROGRAMME}: raise n_genes")
        # Plain genes: the most expressed few, drawn among the top 10; markers: any.
        pool = pool[:10] if programme == "none" else pool
        picked = np.sort(rng.choice(pool, size=KNOCKDOWNS_PER_PROGRAMME, replace=False))
        for g in picked:
            depths = list(control_depths)
            if programme != "none":
                depths[syn.BASINS.index(programme)] *= PROGRAMME_DEPTH_FACTOR
            singles.setdefault(programme, []).append(
                Condition(str(genes.names[g]), "knockdown", (str(genes.names[g]),), (programme,), tuple(depths), 0.0))
    for programme in PROGRAMMES:
        out.extend(singles[programme])
    block = list(control_depths)
    block[0] = DRUG_BLOCK_DEPTH
    out.append(Condition("drug_tilt", "drug", (), (), control_depths, DRUG_TILT_X))
    out.append(Condition("drug_block", "drug", (), (), tuple(block), 0.0))
    a, b = singles["progenitor"][0], singles["fate_B"][0]
    depths = tuple(float(x) * float(y) / float(c) for x, y, c in zip(a.depths, b.depths, control_depths, strict=True))
    out.append(Condition(f"{a.name}{COMBINATION_SEPARATOR}{b.name}", "combination", a.targets + b.targets,
                         a.programmes + b.programmes, depths, 0.0))
    return out


def condition_streams(seed: int) -> list[np.random.Generator]:
    """The perturbed cells' own random streams (conditions and paths, RNA, protein), apart from the control's."""
    return np.random.default_rng([int(seed), 104729]).spawn(3)


def planned(generator: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The condition names and the auto-held-out ones the generator settings ``generator`` give, without
    generating cells (the workflow needs them to plan its jobs)."""
    seed = int(generator.get("seed", 0))
    genes = syn._gene_model(int(generator.get("n_genes", 400)), rng=np.random.default_rng(seed).spawn(5)[0])
    conds = conditions(genes, rng=condition_streams(seed)[0])
    return [c.name for c in conds], auto_holdouts(conds)


def auto_holdouts(conds: Sequence[Condition]) -> list[str]:
    """The conditions :data:`AUTO_HOLDOUTS` names."""
    names = []
    for key in AUTO_HOLDOUTS:
        if key == "combination":
            names += [c.name for c in conds if c.kind == "combination"]
            continue
        programme, index = key.split(":")
        singles = [c for c in conds if c.kind == "knockdown" and c.programmes == (programme,)]
        names.append(singles[int(index)].name)
    return names


def _paths(n: int, time_points: np.ndarray, cond: Condition, *, rng: np.random.Generator):
    """Snapshots under the condition's landscape and, with the same noise, under the control one."""
    time_index = rng.permutation(np.arange(n) % len(time_points))
    x = syn.WELL_MINIMA[0] + syn.INITIAL_SPREAD * rng.standard_normal((n, 2))
    xc = x.copy()
    latent, counterfactual = np.empty_like(x), np.empty_like(x)
    depths = np.asarray(cond.depths)
    t = 0.0
    for k, t_k in enumerate(time_points):
        n_steps = int(np.ceil((t_k - t) / syn.DT - 1e-9))
        if n_steps:
            step = (t_k - t) / n_steps
            for _ in range(n_steps):
                noise = syn.SIGMA * np.sqrt(step) * rng.standard_normal(x.shape)
                x += -step * syn.potential_grad(x, depths=depths, tilt_x=cond.tilt_x) + noise
                xc += -step * syn.potential_grad(xc) + noise
        t = t_k
        latent[time_index == k] = x[time_index == k]
        counterfactual[time_index == k] = xc[time_index == k]
    return time_index, latent, counterfactual, x


def fate_proportions(cond: Condition, *, t_end: float, n: int = FATE_ROLLOUTS, seed: int = 0) -> list[float]:
    """The condition's true fate proportions at ``t_end``: rollouts from ``t = 0``, read as basins of the
    control landscape (the cell types a user would call)."""
    rng = np.random.default_rng([seed, 31337])
    x = syn.WELL_MINIMA[0] + syn.INITIAL_SPREAD * rng.standard_normal((n, 2))
    depths = np.asarray(cond.depths)
    n_steps = int(np.ceil(t_end / syn.DT - 1e-9))
    step = t_end / max(n_steps, 1)
    for _ in range(n_steps):
        x += -step * syn.potential_grad(x, depths=depths, tilt_x=cond.tilt_x)
        x += syn.SIGMA * np.sqrt(step) * rng.standard_normal(x.shape)
    basin = syn.basin_of(x)
    return [float(np.mean(basin == b)) for b in syn.BASINS]


@dataclasses.dataclass(frozen=True)
class PerturbedCells:
    condition: np.ndarray  # (n,) condition names
    time_index: np.ndarray
    latent: np.ndarray
    counterfactual: np.ndarray
    final: np.ndarray
    lfc: np.ndarray  # (n, G) log-weight shifts


def perturbed_cells(genes: syn._GeneModel, conds: Sequence[Condition], *, cells_per_condition: int,
                    time_points: np.ndarray, rng: np.random.Generator) -> PerturbedCells:
    """Cells of every perturbed condition (not the control), ``cells_per_condition`` each."""
    index = {str(g): i for i, g in enumerate(genes.names)}
    parts = []
    for cond in conds:
        if cond.kind == "control":
            continue
        time_index, latent, cf, final = _paths(cells_per_condition, time_points, cond, rng=rng)
        lfc = np.zeros((cells_per_condition, len(genes.names)))
        for target in cond.targets:
            lfc[:, index[target]] = np.log(KNOCKDOWN_RESIDUAL)
        parts.append((np.full(cells_per_condition, cond.name, dtype=object), time_index, latent, cf, final, lfc))
    return PerturbedCells(*(np.concatenate(col) for col in zip(*parts, strict=True)))
