"""The virtual cell's "what if": the perturbation model trained on every condition, as a map of cells.

:func:`perturb_model` (the ``perturb_model`` job) trains the
:class:`~virtualcell.models.perturbation.ConditionalFlow` on the control and *every* condition
(the held-out jobs score how well that generalises) and writes it with what it needs to move
new cells: the control PCA, the genes' features, the drugs it knows, the knock-down residual
and the control cells of the last time point with their cell types (fates are called against
them). :class:`PerturbationMap` loads both and moves log-normalised expression of cells at a
time ``t`` to where they would be under a condition: a knock-down of any measured gene (seen in
training or not), a drug it was trained on, or a combination of these (``GeneA+GeneB``).

The map is static: control cells at ``t`` to cells that have been under the condition since
the first time point, as the perturbed cells were (all observed at the control's time points).
With the dynamic model (``perturb.dynamic``: a
:class:`~virtualcell.models.perturbation.ConditionalDynamics` trained on every condition's time
course, ``dynamics.pt``), "what happens to these cells later under the drug" is answered by
simulating them forward *under the condition's landscape* from ``t`` to ``t + horizon``
(:meth:`PerturbationMap.simulate`); without it, by simulating them under control and mapping the
result (:meth:`virtualcell.cellmodel.VirtualCell.predict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from virtualcell import io, reference
from virtualcell.errors import InputError
from virtualcell.perturbation import (
    DYNAMIC_STEPS,
    Data,
    apply_knockdown,
    check_conditions,
    components,
    features,
    has_time_course,
    knockdown_residual,
    train_dynamics,
    train_flow,
)

MAP = "perturbation.npz"
MODEL = "perturbation.pt"
DYNAMICS = "perturbation_dynamics.pt"


class PerturbationMap:
    """Moves cells' log-normalised expression to a condition (duck-types :class:`~virtualcell.perturbation.Data`
    for :func:`~virtualcell.perturbation.features` and :func:`~virtualcell.perturbation.apply_knockdown`)."""

    def __init__(self, arrays: Mapping[str, Any], model: str | Path, dynamics: str | Path | None = None) -> None:
        from virtualcell.models.perturbation import ConditionalDynamics, ConditionalFlow

        self.genes = np.asarray(arrays["genes"], dtype=str)
        self.gene_index = {g: i for i, g in enumerate(self.genes)}
        self.pcs = {"mean": np.asarray(arrays["mean"]), "components": np.asarray(arrays["components"]),
                    "scale": np.asarray(arrays["scale"])}
        self.gene_correlation = np.asarray(arrays["gene_correlation"])
        self.drugs = [str(d) for d in np.asarray(arrays["drugs"], dtype=str)]
        self.conditions = [str(c) for c in np.asarray(arrays["conditions"], dtype=str)]
        self.control = str(arrays["control"])
        self.t_max = float(arrays["t_max"])
        residual = float(arrays["residual"])
        self.residual = residual if np.isfinite(residual) else None
        self.control_mean = np.asarray(arrays["control_mean"])
        self.fate_states = np.asarray(arrays["fate_states"])
        self.fate_labels = np.asarray(arrays["fate_labels"], dtype=str)
        self.flow = ConditionalFlow.load(model)
        self.dynamics = ConditionalDynamics.load(dynamics) if dynamics else None
        self._knn = None

    @classmethod
    def load(cls, directory: str | Path) -> PerturbationMap | None:
        directory = Path(directory)
        if not (directory / MAP).exists():
            return None
        dynamics = directory / DYNAMICS
        with np.load(directory / MAP) as arrays:
            return cls(dict(arrays), directory / MODEL, dynamics if dynamics.exists() else None)

    def kind(self, component: str) -> str:
        return "gene" if component in self.gene_index else "drug"

    def check(self, condition: str) -> None:
        """A one-line error for a condition the map cannot answer."""
        if condition == self.control:
            return
        for comp in components(condition):
            if self.kind(comp) == "drug" and comp not in self.drugs:
                raise InputError(f"condition '{condition}': '{comp}' is neither one of the model's {len(self.genes)} "
                                 f"genes (a knock-down) nor a drug it was trained on ({', '.join(self.drugs) or 'none'})"
                                 "; a drug never seen cannot be predicted")
        if len(components(condition)) > self.flow.max_components:
            raise InputError(f"condition '{condition}': at most {self.flow.max_components} components (the most "
                             "any training condition had)")

    def genes_of(self, log_expression: np.ndarray, genes: list[str]) -> np.ndarray:
        """Expression over the map's genes: the given genes by name, the others at the control mean."""
        out = np.tile(self.control_mean, (len(log_expression), 1))
        index = {g: i for i, g in enumerate(genes)}
        cols = [j for j, g in enumerate(self.genes) if g in index]
        out[:, cols] = np.asarray(log_expression)[:, [index[self.genes[j]] for j in cols]]
        return out

    def apply(self, log_expression: np.ndarray, genes: list[str], *, t: float, condition: str,
              n_steps: int = 20) -> np.ndarray:
        """Cells (log-normalised expression over ``genes``) at time ``t`` moved to ``condition``: the same genes."""
        self.check(condition)
        x0 = self.genes_of(log_expression, genes)
        if condition == self.control:
            moved = x0
        else:
            z0 = reference.project(x0, self.pcs)
            tt = np.full(len(x0), float(t) / (self.t_max or 1.0), dtype=np.float32)
            z = self.flow.predict(z0, tt, features(self, condition, drugs=self.drugs), n_steps=n_steps)
            moved = x0 + (z - z0) * self.pcs["scale"] @ self.pcs["components"]
            moved = np.clip(apply_knockdown(moved, self, condition, self.residual), 0.0, None)
        index = self.gene_index
        out = np.asarray(log_expression, dtype=np.float64).copy()
        cols = [j for j, g in enumerate(genes) if g in index]
        out[:, cols] = moved[:, [index[genes[j]] for j in cols]]
        return out

    def simulate(self, log_expression: np.ndarray, genes: list[str], *, t0: float, t1: float, condition: str,
                 seed: int = 0, n_steps: int = DYNAMIC_STEPS) -> np.ndarray:
        """Cells (log-normalised expression over ``genes``) at ``t0`` simulated to ``t1`` under ``condition``'s
        landscape by the dynamic model (one stochastic path each; the same seed, the same paths): the same
        genes. A knock-down's target drop, which a few PCs cannot carry, is applied to the result."""
        self.check(condition)
        if self.dynamics is None:
            raise InputError("this virtual cell has no dynamic perturbation model (perturb.dynamic: false, or its "
                             "bundle predates it): use apply() on cells simulated under control")
        x0 = self.genes_of(log_expression, genes)
        z0 = reference.project(x0, self.pcs)
        feats = None if condition == self.control else features(self, condition, drugs=self.drugs, flags=False)
        z = self.dynamics.simulate(z0, t0=float(t0), t1=float(t1), features=feats, n_steps=n_steps, seed=seed)
        moved = x0 + (z - z0) * self.pcs["scale"] @ self.pcs["components"]
        if condition != self.control:
            moved = apply_knockdown(moved, self, condition, self.residual)
        moved = np.clip(moved, 0.0, None)
        out = np.asarray(log_expression, dtype=np.float64).copy()
        cols = [j for j, g in enumerate(genes) if g in self.gene_index]
        out[:, cols] = moved[:, [self.gene_index[genes[j]] for j in cols]]
        return out

    def fates(self, log_expression: np.ndarray, genes: list[str]) -> tuple[list[str], np.ndarray]:
        """Cell types of cells at the last time point (their expression over ``genes``), by a kNN of the
        control cells then in the map's PCA space: the names and each cell's probabilities."""
        from sklearn.neighbors import KNeighborsClassifier

        if self._knn is None:
            self._knn = KNeighborsClassifier(n_neighbors=min(15, len(self.fate_states))).fit(
                self.fate_states, self.fate_labels)
        z = reference.project(self.genes_of(log_expression, genes), self.pcs)
        return [str(c) for c in self._knn.classes_], self._knn.predict_proba(z)


def perturb_model(*, input: str, control: str, model: str, output: str, params: Mapping[str, Any], device: str,
                  run, min_cells: int = 20, dynamics: str | None = None) -> None:
    """Train the perturbation model on the control and every condition; write it and its map (``output``),
    and with ``dynamics`` the dynamic model (every condition's time course) there."""
    from virtualcell.stages import say

    mdata = io.read_h5mu(input)
    rna = mdata.mod[io.expression_modality(mdata)]
    check_conditions(rna.obs, control=control, holdouts=[], min_cells=min_cells, origin=input)
    data = Data(rna, control=control, n_pcs=params["n_pcs"])
    if dynamics and not has_time_course(data):  # before any training
        raise InputError(f"{input}: the cells are at one time point, so there is no dynamic response to learn; "
                         "set perturb.dynamic: false")
    train = list(data.conditions)
    drugs = sorted({c for n in train for c in components(n) if data.kind(c) == "drug"})
    say(f"perturb_model: the control ({len(data.cells(control))} cells) and all {len(train)} conditions, for the "
        "virtual cell's 'what if'")
    flow = train_flow(data, train, drugs=drugs, params=params, device=device, run=run, prefix="perturb_model")
    ctrl = data.cells(control)
    io.atomic_write(model, flow.save)
    residual = knockdown_residual(data, train)
    last = ctrl[data.time[ctrl] == data.time.max()]
    labels = data.celltype[last] if data.celltype is not None else np.full(len(last), "control")
    arrays = {"genes": data.genes, "mean": data.pcs["mean"], "components": data.pcs["components"],
              "scale": data.pcs["scale"], "gene_correlation": data.gene_correlation,
              "drugs": np.asarray(drugs, dtype=str), "conditions": np.asarray(train, dtype=str),
              "control": np.asarray(control), "t_max": np.asarray(float(data.time.max())),
              "residual": np.asarray(np.nan if residual is None else residual),
              "control_mean": data.x[ctrl].mean(0), "fate_states": data.z[last], "fate_labels": labels.astype(str)}
    if dynamics:
        dyn = train_dynamics(data, train, drugs=drugs, params=params, device=device, run=run, prefix="perturb_model")
        io.atomic_write(dynamics, dyn.save)
        run.log_artifact(dynamics, artifact_path="models")
    io.atomic_write(output, lambda tmp: np.savez(tmp, **arrays))
    run.log_artifact(model, artifact_path="models")
    run.log_artifact(output, artifact_path="models")
    say(f"wrote {model} and {output}: knock-downs of any of {len(data.genes)} genes, drugs {drugs}")
