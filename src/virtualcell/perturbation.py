"""Perturbations: predict a condition held out whole, beside the baselines a reviewer names.

One job per held-out condition (leave one condition out, and every combination sharing a
component with it): the :class:`~virtualcell.models.perturbation.ConditionalFlow` is trained on
the control cells and the other conditions in a PCA space of the control cells' log-normalised
highly variable genes, then moves control cells to the held-out condition. Everything is
scored on the same cells (:mod:`virtualcell.perturbation_metrics`):

* ``control``: no change (the control cells themselves);
* ``mean_perturbed``: the control cells shifted by the mean change of the training conditions;
* ``additive`` (combinations whose singles were trained): ``y_A + y_B - y_control``;
* ``linear``: Ahlmann-Eltze et al. (2025)'s PCA-ridge model, change = ``G W p`` with ``G`` the
  genes' loadings on the control PCs and ``p`` the perturbed genes' rows of ``G``;
* ``ceiling``: half of the condition's real cells predicting the other half (split-half).

The real cells of the held-out condition are split in two halves (within time points): half A
is the ceiling's prediction and sets how many control cells every method moves (one per A cell,
at its time point); half B is the truth every method is scored against.

A knock-down lowers its own target: the model and the linear baseline read how much from the
training knock-downs (the median residual expression of their targets) and apply it to the
target genes; a PCA of a few components cannot carry one gene's drop.

The dynamic response (``perturb.dynamic``, datasets with a time course and cell types): a
:class:`~virtualcell.models.perturbation.ConditionalDynamics` (one SDE per condition, trained on
every training condition's time course) simulates the control cells of the first time point to
the last under the held-out condition and under the control (the same noise); a kNN of the
control's cell types calls their fates, and ``fate.dynamic`` is the control's proportions plus the
shift between the two (``fate.dynamic_raw``: the first simulation's own), beside PRESCIENT's recipe
(``fate.prescient``: knocked down at the start, then the control's dynamics, the same shift) and
the static model's moved cells of the last time point (``fate.model``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell import io, reference
from virtualcell.errors import InputError
from virtualcell.plan import condition_label, holdout_conditions  # noqa: F401
from virtualcell.synthetic_conditions import COMBINATION_SEPARATOR

CONDITION = "condition"
METHODS = ("model", "control", "mean_perturbed", "additive", "linear", "ceiling")
RIDGE_LAMBDA = 0.1  # Ahlmann-Eltze et al.'s ridge penalty


def components(name: str) -> list[str]:
    """The components of a condition: ``GeneA+GeneB`` -> [GeneA, GeneB]."""
    return [c for c in str(name).split(COMBINATION_SEPARATOR) if c]


def check_conditions(obs: pd.DataFrame, *, control: str, holdouts: Sequence[str], min_cells: int,
                     origin: str) -> None:
    """One-line errors for what the perturbation stage cannot work with."""
    if CONDITION not in obs:
        raise InputError(f"{origin}: no condition column; set datasets.<name>.condition_key to the obs column "
                         "that holds each cell's perturbation")
    counts = obs[CONDITION].astype(str).value_counts()
    if control not in counts:
        raise InputError(f"{origin}: control label '{control}' is not a condition (found {sorted(counts.index)[:8]}); "
                         "fix datasets.<name>.control")
    small = counts[counts < min_cells]
    if len(small):
        raise InputError(f"{origin}: condition '{small.index[0]}' has {int(small.iloc[0])} cells, fewer than "
                         f"min_cells_per_condition ({min_cells}); drop it or lower datasets.<name>.min_cells_per_condition")
    missing = [h for h in holdouts if h not in counts]
    if missing:
        raise InputError(f"{origin}: held-out condition '{missing[0]}' is not a condition (found "
                         f"{sorted(counts.index)[:8]}); fix datasets.<name>.holdout_conditions")
    if control in holdouts:
        raise InputError(f"{origin}: the control '{control}' cannot be held out; remove it from holdout_conditions")


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


class Data:
    """The QC'd cells of a dataset with conditions, in the spaces the stage works in."""

    def __init__(self, rna: ad.AnnData, *, control: str, n_pcs: int) -> None:
        self.condition = rna.obs[CONDITION].astype(str).to_numpy()
        # The highly variable genes, and every knocked-down gene QC kept (a knock-down's target is the
        # first gene a user looks at, variable or not).
        hvg = rna.var["highly_variable"].to_numpy() if "highly_variable" in rna.var else np.ones(rna.n_vars, bool)
        targets = {c for name in set(self.condition) for c in components(name)}
        keep = hvg | rna.var_names.isin(list(targets))
        self.genes = np.asarray(rna.var_names[keep], dtype=str)
        self.x = _dense(rna.X[:, keep])  # log-normalised expression
        self.time = (rna.obs["time"].to_numpy(dtype=np.float64) if "time" in rna.obs else np.zeros(rna.n_obs))
        self.celltype = rna.obs["celltype"].astype(str).to_numpy() if "celltype" in rna.obs else None
        self.control = control
        is_ctrl = self.condition == control
        # One PCA of the control cells: the model's space (n_pcs), pca5 (its first 5, whitened) and the
        # genes' embedding (their loadings).
        self.pcs = reference.fit(self.x[is_ctrl], self.genes, n_components=n_pcs)
        self.pca5 = reference.leading(self.pcs)
        self.z = reference.project(self.x, self.pcs)
        sd = self.x[is_ctrl].std(0)
        self.gene_correlation = (self.pcs["components"] * self.pcs["scale"][:, None]
                                 / np.where(sd > 0, sd, np.inf)[None, :])  # (PCs, genes)
        t_max = float(self.time.max()) or 1.0
        self.t_scaled = (self.time / t_max).astype(np.float32)
        self.gene_index = {g: i for i, g in enumerate(self.genes)}
        self.conditions = sorted(set(self.condition) - {control})

    def cells(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.condition == name)

    def kind(self, component: str) -> str:
        """A component is a gene knock-down when it names a measured gene, else a drug."""
        return "gene" if component in self.gene_index else "drug"

    def decode(self, z: np.ndarray, *, start: np.ndarray, z_start: np.ndarray) -> np.ndarray:
        """Genes of moved cells: each start cell's own expression plus the decoded change of its state."""
        change = (z - z_start) * self.pcs["scale"] @ self.pcs["components"]
        return start + change


def training_conditions(data: Data, holdout: str) -> list[str]:
    """Every condition but the held-out one and those sharing a component with it (so a held-out
    knock-down's gene is never perturbed in training; a held-out combination keeps its singles)."""
    held = set(components(holdout))
    single = len(held) == 1
    out = []
    for name in data.conditions:
        if name == holdout:
            continue
        if single and held & set(components(name)):
            continue
        out.append(name)
    return out


def features(data: Data, name: str, *, drugs: Sequence[str], flags: bool = True) -> np.ndarray:
    """One row per component: [gene embedding, drug one-hot, is_gene, is_drug] (the two flags zero
    with ``flags=False``: the conditioned simulator's input, where a gene is known by its embedding alone).

    A gene's embedding is its correlation with each of the control cells' PCs (its loadings scaled by
    the PC's sd over the gene's): scale-free, so a lowly expressed marker of a programme sits beside a
    highly expressed one (raw loadings put them apart by their variance).
    """
    k = len(data.pcs["scale"])
    rows = []
    for comp in components(name):
        row = np.zeros(k + len(drugs) + 2, np.float32)
        if data.kind(comp) == "gene":
            row[:k] = data.gene_correlation[:, data.gene_index[comp]]
            row[-2] = float(flags)
        else:
            if comp not in drugs:
                raise InputError(f"condition '{name}': '{comp}' is not a measured gene, so it is read as a drug, and "
                                 "no training condition has it; a drug never seen cannot be predicted (it has no "
                                 "features): keep one condition with it in training")
            row[k + list(drugs).index(comp)] = 1.0
            row[-1] = float(flags)
        rows.append(row)
    return np.stack(rows)


def knockdown_residual(data: Data, train: Sequence[str]) -> float | None:
    """Median over the training knock-downs of their target's residual expression (linear scale)."""
    ctrl = data.cells(data.control)
    ratios = []
    for name in train:
        for comp in components(name):
            if data.kind(comp) == "gene":
                g = data.gene_index[comp]
                base = np.expm1(data.x[ctrl, g]).mean()
                if base > 0:
                    ratios.append(np.expm1(data.x[data.cells(name), g]).mean() / base)
    return float(np.clip(np.median(ratios), 0.0, 1.5)) if ratios else None


def apply_knockdown(x: np.ndarray, data: Data, name: str, residual: float | None) -> np.ndarray:
    """The knocked-down genes of ``name`` at ``residual`` of the start cells' level."""
    if residual is None:
        return x
    out = x.copy()
    for comp in components(name):
        if data.kind(comp) == "gene":
            g = data.gene_index[comp]
            out[:, g] = np.log1p(np.expm1(x[:, g].clip(min=0)) * residual)
    return out


def mean_change(data: Data, name: str) -> np.ndarray:
    return data.x[data.cells(name)].mean(0) - data.x[data.cells(data.control)].mean(0)


def linear_change(data: Data, train: Sequence[str], holdout: str) -> np.ndarray | None:
    """Ahlmann-Eltze et al.'s linear model: change (genes) = G W p, W by ridge on the training knock-downs.

    ``G`` (genes x k): the genes' loadings on the control PCs; ``p`` (k): the sum of the perturbed
    genes' rows of ``G``. Drugs have no row of ``G``: a condition with one is left out of the fit,
    and ``None`` is returned for one held out.
    """
    g_emb = data.pcs["components"].T  # (genes, k)

    def p_of(name):
        comps = components(name)
        if any(data.kind(c) != "gene" for c in comps):
            return None
        return g_emb[[data.gene_index[c] for c in comps]].sum(0)

    rows = [(p_of(n), mean_change(data, n)) for n in train]
    rows = [(p, y) for p, y in rows if p is not None]
    p_new = p_of(holdout)
    if not rows or p_new is None:
        return None
    p_mat = np.stack([p for p, _ in rows])  # (perts, k)
    y_mat = np.stack([y for _, y in rows]).T  # (genes, perts)
    k = g_emb.shape[1]
    left = np.linalg.solve(g_emb.T @ g_emb + RIDGE_LAMBDA * np.eye(k), g_emb.T @ y_mat)  # (k, perts)
    w = left @ p_mat @ np.linalg.inv(p_mat.T @ p_mat + RIDGE_LAMBDA * np.eye(k))  # (k, k)
    return g_emb @ w @ p_new


def split_halves(cells: np.ndarray, times: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half A and half B of a condition's cells, split within each time point."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for t in np.unique(times):
        ix = rng.permutation(cells[times == t])
        a.append(ix[: len(ix) // 2])
        b.append(ix[len(ix) // 2:])
    return np.concatenate(a), np.concatenate(b)


def matched_controls(data: Data, times: np.ndarray, *, seed: int) -> np.ndarray:
    """One control cell per time in ``times``, at that time point (without replacement while they last)."""
    rng = np.random.default_rng(seed + 1)
    ctrl = data.cells(data.control)
    out = np.empty(len(times), dtype=np.int64)
    for t in np.unique(times):
        want = np.flatnonzero(times == t)
        pool = ctrl[data.time[ctrl] == t]
        if len(pool) == 0:
            raise InputError(f"perturbed cells at time {t:g} but no control cells then; every condition's time "
                             "points need control cells")
        out[want] = rng.choice(pool, size=len(want), replace=len(want) > len(pool))
    return out


class Predictor:
    """Every method's prediction of one held-out condition from any set of start (control) cells."""

    def __init__(self, data: Data, holdout: str, flow, *, train: Sequence[str], drugs: Sequence[str],
                 n_steps: int) -> None:
        self.data, self.holdout, self.flow, self.n_steps = data, holdout, flow, n_steps
        self.features = features(data, holdout, drugs=drugs)
        self.residual = knockdown_residual(data, train)
        self.shifts = {"mean_perturbed": np.mean([mean_change(data, n) for n in train], axis=0)}
        comps = components(holdout)
        if len(comps) > 1 and all(c in train for c in comps):
            self.shifts["additive"] = sum(mean_change(data, c) for c in comps)
        linear = linear_change(data, train, holdout)
        if linear is not None:
            self.shifts["linear"] = linear

    def __call__(self, start: np.ndarray) -> dict[str, np.ndarray]:
        """Genes of the start cells moved by each method (log expression, clipped at 0)."""
        data = self.data
        x0, z0 = data.x[start], data.z[start]
        z = self.flow.predict(z0, data.t_scaled[start], self.features, n_steps=self.n_steps)
        out = {"model": apply_knockdown(data.decode(z, start=x0, z_start=z0), data, self.holdout, self.residual),
               "control": x0}
        for method, shift in self.shifts.items():
            moved = x0 + shift
            out[method] = apply_knockdown(moved, data, self.holdout, self.residual) if method == "linear" else moved
        return {m: np.clip(x, 0.0, None) for m, x in out.items()}


def fate_proportions(data: Data, predict: Predictor, half_a: np.ndarray, holdout: str,
                     truth: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """Fate proportions at the last time point: every control cell then, moved by each method, called by
    a kNN of the control cells' cell types at that time in the PCA space; beside the real cells' own
    labels (``observed``), half A's called like the predictions (``ceiling``) and, on the built-in data,
    the generator's true proportions (many rollouts under the condition's landscape)."""
    knn, fates = fate_classifier(data)
    t_last = data.time.max()
    real = data.cells(holdout)
    real = real[data.time[real] == t_last]
    if knn is None or len(real) == 0:
        return None
    ctrl = data.cells(data.control)
    ctrl = ctrl[data.time[ctrl] == t_last]
    moved = predict(ctrl) | {"ceiling": data.x[half_a[data.time[half_a] == t_last]]}
    out = {method: _proportions(knn.predict(reference.project(x, data.pcs)) if len(x) else np.array([]), fates)
           for method, x in moved.items()}
    out["observed"] = _proportions(data.celltype[real], fates)
    if truth is not None and holdout in truth.get("conditions", {}):
        basins = list(truth["basins"])
        props = truth["conditions"][holdout]["fate_proportions"]
        out["true"] = {b: float(p) for b, p in zip(basins, props, strict=True)}
    return out


DYNAMIC_STEPS = 100  # Euler-Maruyama steps of the conditioned simulator over the observed span
# The control's share of the conditioned simulator's pairs against all the training conditions' together:
# its process is the base every condition's embedding moves away from (zero embedding), and it has the most cells.
CONTROL_WEIGHT = 1.0


def has_time_course(data: Data) -> bool:
    """Whether the cells span >= 2 time points (the dynamic response needs a time course)."""
    return len(np.unique(data.time)) >= 2


def train_dynamics(data: Data, train: Sequence[str], *, drugs: Sequence[str], params: Mapping[str, Any], device: str,
                   run, prefix: str, max_components: int = 1):
    """The conditioned simulator (one SDE per condition, the control's embedding zero) trained on the
    control's and the ``train`` conditions' time courses."""
    import functools

    from virtualcell.models.perturbation import ConditionalDynamics
    from virtualcell.stages import _fit, say

    ctrl = data.cells(data.control)
    conds = [(data.z[ctrl], data.time[ctrl], None)]
    single = [n for n in train if len(np.unique(data.time[data.cells(n)])) < 2]
    if single:
        say(f"{prefix}: the dynamic model leaves out {len(single)} condition(s) observed at one time point only "
            f"({', '.join(single[:5])}{', ...' if len(single) > 5 else ''}): a time course needs >= 2")
    train = [n for n in train if n not in single]
    conds += [(data.z[data.cells(n)], data.time[data.cells(n)], features(data, n, drugs=drugs, flags=False))
              for n in train]
    dyn = ConditionalDynamics(len(data.pcs["scale"]), len(data.pcs["scale"]) + len(drugs) + 2,
                              max_components=max([max_components, *(len(components(n)) for n in train)]),
                              n_hidden=params["n_hidden"], n_layers=params["n_layers"])
    _fit(functools.partial(dyn.fit, conds, epochs=params["dynamic_epochs"], steps_per_epoch=params["steps_per_epoch"],
                           batch_size=params["batch_size"], lr=params["lr"], diffusion=params["diffusion"],
                           weights=[CONTROL_WEIGHT * max(len(train), 1)] + [1.0] * len(train),
                           device=device, seed=params["seed"]),
         run=run, prefix=f"{prefix}/dynamic", checkpoint=None, every=0)
    return dyn


def fate_classifier(data: Data):
    """A kNN of the control cells' cell types at the last time point, in the PCA space, and the fates
    (None without cell types, or with fewer than 15 control cells then)."""
    from sklearn.neighbors import KNeighborsClassifier

    if data.celltype is None:
        return None, []
    ctrl = data.cells(data.control)
    ctrl = ctrl[data.time[ctrl] == data.time.max()]
    if len(ctrl) < 15:
        return None, []
    knn = KNeighborsClassifier(n_neighbors=15).fit(data.z[ctrl], data.celltype[ctrl])
    return knn, sorted(set(data.celltype[ctrl]))


def _proportions(called: np.ndarray, fates: Sequence[str]) -> dict[str, float]:
    return {f: float(np.mean(called == f)) if len(called) else 0.0 for f in fates}


def dynamic_fates(data: Data, dyn, holdout: str, *, drugs: Sequence[str], residual: float | None,
                  rollouts: int, seed: int) -> dict[str, dict[str, float]]:
    """Fate proportions at the last time point from the control cells of the first one, simulated forward.

    The simulated *shift* from the control's own simulation is what the model predicts: it is added
    to the control's proportions at the last time point (its real cells, called by the same kNN), so
    the simulator's own bias in reproducing the control (the same in both simulations) cancels:

    * ``dynamic``: the shift of a simulation under the held-out condition's landscape (its embedding
      in the conditioned simulator); ``dynamic_raw``: that simulation's proportions themselves;
    * ``prescient``: the shift by PRESCIENT's recipe (Yeo et al. 2021), the targets knocked down in
      the start cells and the cells then simulated under the *control* dynamics (knock-downs only;
      the same model with the control's embedding, so the two differ only in how the perturbation
      enters).

    Every simulation starts from the same cells with the same seed (the same noise).
    """
    knn, fates = fate_classifier(data)
    if knn is None:
        return {}
    t0, t1 = float(data.time.min()), float(data.time.max())
    ctrl = data.cells(data.control)
    start = np.repeat(ctrl[data.time[ctrl] == t0], rollouts)
    control = _proportions(knn.predict(data.z[ctrl[data.time[ctrl] == t1]]), fates)

    def simulated(x0: np.ndarray, feats: np.ndarray | None) -> dict[str, float]:
        end = dyn.simulate(x0, t0=t0, t1=t1, features=feats, n_steps=DYNAMIC_STEPS, seed=seed)
        return _proportions(knn.predict(end), fates)

    base = simulated(data.z[start], None)
    raw = simulated(data.z[start], features(data, holdout, drugs=drugs, flags=False))
    out = {"dynamic": _shifted(control, raw, base), "dynamic_raw": raw}
    if residual is not None and any(data.kind(c) == "gene" for c in components(holdout)):
        knocked = reference.project(apply_knockdown(data.x[start], data, holdout, residual), data.pcs)
        out["prescient"] = _shifted(control, simulated(knocked, None), base)
    return out


def _shifted(control: Mapping[str, float], perturbed: Mapping[str, float],
             base: Mapping[str, float]) -> dict[str, float]:
    """``control + (perturbed - base)`` per fate, clipped at 0 and renormalised to sum 1."""
    p = {f: max(control[f] + perturbed[f] - base[f], 0.0) for f in control}
    total = sum(p.values()) or 1.0
    return {f: v / total for f, v in p.items()}


def train_flow(data: Data, train: Sequence[str], *, drugs: Sequence[str], params: Mapping[str, Any], device: str,
               run, prefix: str, max_components: int = 1):
    """The perturbation model trained on the control cells and the ``train`` conditions (one training recipe
    for the held-out jobs and for the virtual cell's model)."""
    import functools

    from virtualcell.models.perturbation import ConditionalFlow
    from virtualcell.stages import _fit

    if not train:
        raise InputError("the perturbation model needs at least one condition to train on besides the held-out one; "
                         "add conditions or hold out fewer")
    ctrl = data.cells(data.control)
    conds = [(data.z[data.cells(n)], data.t_scaled[data.cells(n)], features(data, n, drugs=drugs)) for n in train]
    flow = ConditionalFlow(len(data.pcs["scale"]), conds[0][2].shape[1],
                           max_components=max(max_components, *(len(components(n)) for n in train)),
                           n_hidden=params["n_hidden"], n_layers=params["n_layers"])
    _fit(functools.partial(flow.fit, data.z[ctrl], data.t_scaled[ctrl], conds, epochs=params["epochs"],
                           steps_per_epoch=params["steps_per_epoch"], batch_size=params["batch_size"],
                           lr=params["lr"], device=device, seed=params["seed"]),
         run=run, prefix=prefix, checkpoint=None, every=0)
    return flow


def perturb(*, input: str, condition: str, control: str, output: str, model: str, cells: str, figure: str,
            params: Mapping[str, Any], device: str, run, min_cells: int = 20) -> None:
    """Train the perturbation model without ``condition`` and score its prediction of it beside the baselines."""
    from virtualcell import figures
    from virtualcell.perturbation_metrics import Truth
    from virtualcell.stages import say

    mdata = io.read_h5mu(input)
    rna = mdata.mod[io.expression_modality(mdata)]
    check_conditions(rna.obs, control=control, holdouts=[condition], min_cells=min_cells, origin=input)
    data = Data(rna, control=control, n_pcs=params["n_pcs"])
    train = training_conditions(data, condition)
    drugs = sorted({c for n in train for c in components(n) if data.kind(c) == "drug"})
    features(data, condition, drugs=drugs)  # fails now, not after training, for an unseen drug
    say(f"perturb: held out '{condition}' ({len(data.cells(condition))} cells); training on the control "
        f"({len(data.cells(control))} cells) and {len(train)} conditions in {len(data.pcs['scale'])} PCs of "
        f"{len(data.genes)} genes")
    flow = train_flow(data, train, drugs=drugs, params=params, device=device, run=run, prefix="perturb",
                      max_components=len(components(condition)))
    io.atomic_write(model, flow.save)
    run.log_artifact(model, artifact_path="models")

    predict = Predictor(data, condition, flow, train=train, drugs=drugs, n_steps=params["n_steps"])
    cells_held = data.cells(condition)
    half_a, half_b = split_halves(cells_held, data.time[cells_held], seed=params["seed"])
    start = matched_controls(data, data.time[half_a], seed=params["seed"])
    predicted = predict(start) | {"ceiling": data.x[half_a]}
    ctrl = data.cells(control)
    centroid = np.mean([data.x[data.cells(n)].mean(0) for n in train], axis=0)
    others = {n: mean_change(data, n) for n in data.conditions if n != condition}
    truth = Truth(data.x[half_b], data.x[ctrl], centroid=centroid, pca5=data.pca5, others=others)
    scores = {m: truth.score(x, max_points=params["max_points"], seed=params["seed"]) for m, x in predicted.items()}
    metrics: dict[str, Any] = {}
    for method, values in scores.items():
        for key, value in values.items():
            if value is not None:
                metrics.setdefault(key, {})[method] = value
    fate = fate_proportions(data, predict, half_a, condition, _generator_truth(mdata))
    if fate is not None and params.get("dynamic", True) and has_time_course(data):
        # The dynamic response: the landscape under the condition, control cells simulated forward in it.
        dyn = train_dynamics(data, train, drugs=drugs, params=params, device=device, run=run, prefix="perturb",
                             max_components=len(components(condition)))
        with tempfile.TemporaryDirectory() as tmp:  # MLflow's copy only: the job's files are the static model's
            io.atomic_write(f"{tmp}/dynamics.pt", dyn.save)
            run.log_artifact(f"{tmp}/dynamics.pt", artifact_path="models")
        fate |= dynamic_fates(data, dyn, condition, drugs=drugs, residual=predict.residual,
                              rollouts=params["rollouts"], seed=params["seed"])
    result = {"condition": condition, "cells": {"real_truth_half": len(half_b), "predicted": len(start),
                                                "training_conditions": len(train)},
              "training_conditions": train, "metrics": metrics}
    if fate is not None:
        result["fate"] = fate
        if "true" in fate:
            result["fate_error"] = {m: float(max(abs(p[f] - fate["true"].get(f, 0.0)) for f in p))
                                    for m, p in fate.items() if m != "true"}
    run.log_metrics({f"perturb/{k}/{m}": v for k, per in metrics.items() for m, v in per.items()})
    run.log_dict(result, "perturbation.json")
    io.write_json(result, output)
    out = ad.AnnData(X=predicted["model"].astype(np.float32),
                     obs=pd.DataFrame({"time": data.time[start], "start_cell": rna.obs_names[start]},
                                      index=[f"predicted_{i}" for i in range(len(start))]),
                     var=pd.DataFrame(index=data.genes))
    out.uns["perturbation"] = {"condition": condition, "control": control}
    io.write_h5ad(out, cells)
    fig = figures.perturbation(data, predicted, half_b, truth, metrics, fate, condition=condition)
    run.log_figure(fig, "response.png")
    io.write_figure(fig, figure)
    say(f"perturb {condition}: " + "; ".join(
        f"{key} " + ", ".join(f"{m} {v:.3f}" for m, v in metrics[key].items())
        for key in ("pearson_delta_top20", "edist_pca5")) + " (ceiling: half the real cells predicting the other)")


def _generator_truth(mdata) -> dict[str, Any] | None:
    from virtualcell import synthetic

    value = mdata.uns.get(synthetic.PARAMS_KEY)
    return dict(value) if isinstance(value, Mapping) and "conditions" in value else None


def gather(paths: Sequence[str]) -> dict[str, Any]:
    """metrics.json's ``perturbation`` section from the perturb jobs' files: per held-out condition, the
    mean over them, and the fate proportions (with each method's largest error against the truth)."""
    from virtualcell.perturbation_metrics import mean_over

    results = [io.read_json(p) for p in paths]
    section: dict[str, Any] = {"conditions": {r["condition"]: r["metrics"] for r in results}}
    section["mean"] = mean_over(section["conditions"])
    fates = {r["condition"]: r["fate"] for r in results if "fate" in r}
    if fates:
        section["fate"] = fates
        errors = {r["condition"]: r["fate_error"] for r in results if "fate_error" in r}
        if errors:
            section["fate_error"] = errors
    return section
