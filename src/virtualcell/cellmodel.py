"""The virtual cell as a model people call: cells as gene expression in; simulated expression, states and fates out.

A :class:`VirtualCell` is one directory (the *bundle*) holding what the pipeline trained for a
dataset, with what it needs to measure new cells as QC measured the training cells:

- ``virtualcell.json``: the genes QC kept (the input genes), the highly variable genes (the
  output genes), how values were normalised, the simulator's state space, the observed times
  and the fate names;
- ``arrays.npz``: the pca5 projection and the states and fates of the last time point's cells
  (what a simulated end state is classified against);
- the model files: ``simulator.pt`` and, as the state space needs them, ``rna_encoder.pt``,
  ``aligner.pt``, ``predictor.pt`` and ``decoder.pt``.

Prediction, given counts of cells x genes (by name):

1. genes are matched by name: genes the model was not trained on are ignored, missing ones
   are zero-filled (both counted, with a warning);
2. each cell's state: pca5 of its log-normalised highly variable genes (``simulate.space:
   pca``), the RNA encoder's latent (RNA-only data), or the shared space of an aligned
   dataset, from the RNA alone (see :meth:`VirtualCell.states`);
3. the simulator moves the states from ``t_start`` by ``horizon``;
4. the decoder (or, in pca5, the inverse projection) turns the end states into
   log-normalised expression of the highly variable genes;
5. fate probabilities: ``n_rollouts`` stochastic simulations of each cell to the last
   observed time, each end state classified by its nearest real cells there;
6. on a dataset aligned with protein, the cells' protein now, predicted from their RNA alone;
7. with a ``condition`` (datasets with conditions), the simulated cells and their fates under it
   (:mod:`virtualcell.perturbmap`).

The MLflow pyfunc (:class:`virtualcell.tracking.VirtualCellModel`) and ``virtualcell
predict`` both call this class; model and tracking code stay apart.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell import io, reference
from virtualcell.errors import InputError

META = "virtualcell.json"
ARRAYS = "arrays.npz"
SIMULATOR, ENCODER, ALIGNER, DECODER = "simulator.pt", "rna_encoder.pt", "aligner.pt", "decoder.pt"
PREDICTOR = "predictor.pt"
FORMAT_VERSION = 2  # 2: the partner from RNA by align's learned predictor (1: a ridge regression)
# Output column names beside the genes: the simulated state and the fate probabilities.
STATE_PREFIX = "z"
FATE_PREFIX = "p_"
PARTNER_PREFIX = "prot:"  # the input cells' protein, predicted from their RNA
PEAK_PREFIX = "atac:"  # (multiome) the input cells' peaks, their accessibility predicted from their RNA
PREFIXES = {io.PROT: PARTNER_PREFIX, io.ATAC: PEAK_PREFIX}


@dataclasses.dataclass
class Prediction:
    """What :meth:`VirtualCell.predict` returns; every array has one row per input cell.

    ``expression`` (cells x ``genes``): simulated log-normalised expression at ``t_end``;
    ``observed``: the input cells' own log-normalised expression of the same genes;
    ``partner`` (cells x ``partner_features``, aligned with protein): the cells' protein (CLR) at
    ``t_start``, predicted from their RNA alone; aligned with ATAC (``partner_kind`` ``"atac"``), each
    peak's predicted accessibility (the LSI predicted from RNA taken back to the peaks through the LSI
    loadings: a TF-IDF-scale score, higher = more likely open, to rank cells by within a peak);
    ``start`` / ``end``: states at ``t_start`` and ``t_end``; ``fates`` (cells x
    ``fate_names``): probabilities of each fate at the last observed time; ``n_missing``
    genes zero-filled and ``n_ignored`` input genes not used.
    """

    genes: list[str]
    expression: np.ndarray
    observed: np.ndarray
    start: np.ndarray
    end: np.ndarray
    fate_names: list[str]
    fates: np.ndarray
    t_start: float
    t_end: float
    n_missing: int
    n_ignored: int
    partner_features: list[str] = dataclasses.field(default_factory=list)
    partner: np.ndarray | None = None
    condition: str | None = None
    partner_kind: str = io.PROT

    def frame(self, index: Any = None) -> pd.DataFrame:
        """One table: the genes' simulated expression, then ``z0..`` (end state), then ``p_<fate>``, then
        (aligned with protein) ``prot:<protein>``, the cells' protein now, predicted from their RNA, or (aligned
        with ATAC) ``atac:<peak>``, each peak's predicted accessibility."""
        blocks = [
            pd.DataFrame(self.expression, columns=self.genes, index=index),
            pd.DataFrame(self.end, columns=state_columns(self.end.shape[1]), index=index),
            pd.DataFrame(self.fates, columns=[FATE_PREFIX + f for f in self.fate_names], index=index),
        ]
        if self.partner is not None:
            prefix = PREFIXES[self.partner_kind]
            blocks.append(pd.DataFrame(self.partner, columns=[prefix + f for f in self.partner_features],
                                       index=index))
        return pd.concat(blocks, axis=1)


def state_columns(dim: int) -> list[str]:
    return [f"{STATE_PREFIX}{i}" for i in range(dim)]


class VirtualCell:
    """A trained virtual cell, loaded from its bundle directory (:func:`write_bundle`)."""

    def __init__(self, directory: str | Path) -> None:
        from virtualcell.models.contrastive import Aligner
        from virtualcell.models.decoder import ExpressionDecoder
        from virtualcell.models.dynamics import Simulator
        from virtualcell.models.predictor import CrossModalPredictor
        from virtualcell.models.vae import CountEncoder

        self.directory = Path(directory)
        meta_file = self.directory / META
        if not meta_file.exists():
            raise InputError(f"{self.directory}: not a virtual cell (no {META}); point at the model the report "
                             "step logged (models:/virtualcell-<dataset>/latest) or its bundle directory")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        with np.load(self.directory / ARRAYS, allow_pickle=False) as arrays:
            self._arrays = {k: arrays[k] for k in arrays.files}
        self.genes: list[str] = list(self.meta["genes"])
        self.output_genes: list[str] = list(self.meta["hvg"])
        self.space: str = self.meta["space"]
        self.values: str = self.meta["values"]
        self.times = np.asarray(self.meta["times"], dtype=float)
        self.fate_names: list[str] = list(self.meta["fate_names"])
        self.partner_features: list[str] = list(self.meta.get("partner_features", []))
        self.partner_kind: str = self.meta.get("partner", io.PROT)  # bundles before peaks: protein or none
        self._ref = {"genes": np.asarray(self.output_genes), "mean": self._arrays["pca_mean"],
                     "components": self._arrays["pca_components"], "scale": self._arrays["pca_scale"],
                     "target_sum": self.meta["target_sum"]}
        self._index = {g: i for i, g in enumerate(self.genes)}
        self._hvg = np.asarray([self._index[g] for g in self.output_genes])

        def load(cls: type, name: str):
            path = self.directory / name
            return io.read_model(cls, path) if path.exists() else None

        self.simulator = load(Simulator, SIMULATOR)
        self.encoder = load(CountEncoder, ENCODER)
        self.aligner = load(Aligner, ALIGNER)
        self.decoder = load(ExpressionDecoder, DECODER)
        self.predictor = load(CrossModalPredictor, PREDICTOR)
        needs = {"pca5": [], "rna_latent": ["encoder", "decoder"],
                 "shared": ["encoder", "aligner", "predictor", "decoder"]}
        missing = [n for n in ["simulator", *needs[self.space]] if getattr(self, n) is None]
        if missing:
            raise InputError(f"{self.directory}: the bundle lacks its {', '.join(missing)}; rerun the report step "
                             "(snakemake --forcerun report), which bundles them from embed, align and decode")
        self._classifier = None
        from virtualcell.perturbmap import PerturbationMap

        self.perturbation = PerturbationMap.load(directory)  # None when the dataset had no conditions

    # -- input ---------------------------------------------------------------------------------------

    def match_genes(self, values: Any, genes: list[str]) -> tuple[Any, int, int]:
        """``values`` (cells x ``genes``) as cells x the model's input genes: missing ones zero-filled.

        Returns the matrix (sparse stays sparse), the number of model genes missing from the input
        and the number of input genes the model does not use.
        """
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            dup = pd.Index(genes)[pd.Index(genes).duplicated()][:3].tolist()
            raise InputError(f"input cells: duplicated gene names {dup}; make gene names unique "
                             "(anndata's var_names_make_unique)")
        src = np.asarray([i for i, g in enumerate(genes) if g in self._index])
        dst = np.asarray([self._index[genes[i]] for i in src], dtype=int)
        n_missing, n_ignored = len(self.genes) - len(src), len(genes) - len(src)
        if len(src) == 0:
            raise InputError(f"input cells: none of the {len(genes)} genes is one of the model's {len(self.genes)} "
                             f"(e.g. {self.genes[:3]}); pass expression with gene names as columns (var_names)")
        if n_missing or n_ignored:
            warnings.warn(f"virtual cell: {n_missing} of the model's {len(self.genes)} genes are missing from the "
                          f"input and were zero-filled; {n_ignored} input genes are not the model's and were ignored",
                          stacklevel=2)
        if sp.issparse(values):
            picked = sp.csr_matrix(values, dtype=np.float64)[:, src]
            out = sp.csr_matrix((picked.data, dst[picked.indices], picked.indptr),
                                shape=(picked.shape[0], len(self.genes)))
        else:
            out = np.zeros((values.shape[0], len(self.genes)))
            out[:, dst] = np.asarray(values, dtype=np.float64)[:, src]
        check = out.data if sp.issparse(out) else out
        if not np.isfinite(check).all():
            raise InputError("input cells: NaN or infinite values; remove or impute them first")
        if self.values != "log" and (check < 0).any():
            raise InputError(f"input cells: negative values; the model was trained on {self.values} values "
                             "(raw counts for counts): pass them, not scaled or centred data")
        if self.values == "counts" and not np.array_equal(check, np.round(check)):
            raise InputError("input cells: values are not whole numbers, but the model reads raw counts; pass the "
                             "counts (an .h5ad's layers['counts'], say), not normalised or log expression")
        return out, n_missing, n_ignored

    def log_expression(self, values: Any) -> np.ndarray:
        """Cells x the model's input genes, measured as QC measured the training cells: log-normalised
        expression of the output (highly variable) genes."""
        if self.values == "counts":
            return reference.log_normalise(values, all_genes=self.genes, ref=self._ref)
        x = values[:, self._hvg]
        x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
        return np.log1p(x) if self.values == "normalized" else x

    def states(self, values: Any, log_expression: np.ndarray | None = None) -> np.ndarray:
        """Each cell's state in the simulator's space, from its expression alone."""
        return self._states(values, log_expression)[0]

    def _states(self, values: Any, log_expression: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The states, and (aligned with protein) the cells' protein predicted from their RNA.

        In the shared space of an aligned dataset a cell's state is the normalised sum of its RNA
        and partner (protein, image) embeddings. Given RNA alone, the partner's embedding is
        predicted from the RNA by align's learned predictor (JEPA-style,
        :class:`virtualcell.models.predictor.CrossModalPredictor`), whose decoder also gives the
        protein values.
        """
        if self.space == "pca5":
            log_x = self.log_expression(values) if log_expression is None else log_expression
            return reference.project(log_x, self._ref).astype(np.float32), None
        x = values[:, self._hvg]
        if self.values != "counts":
            x = self.log_expression(values) if log_expression is None else log_expression
        latent = self.encoder.encode(sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x)
                                     else np.asarray(x, dtype=np.float32))
        if self.space == "rna_latent":
            return latent, None
        za = self.aligner.embed("rna", latent)
        zb = self.predictor.predict_embedding(latent, za)
        partner = self.predictor.decode(zb) if self.partner_features else None
        if partner is not None and self.partner_kind == io.ATAC:
            # the predicted LSI back to every peak, as evaluate scores it (crossmodal.peak_scores)
            partner = partner.astype(np.float64) @ self._arrays["partner_loadings"].astype(np.float64).T
        return _unit(za.astype(np.float64) + zb).astype(np.float32), partner

    # -- prediction ----------------------------------------------------------------------------------

    def expression(self, states: np.ndarray, *, sample: bool = True, seed: int = 0) -> np.ndarray:
        """Log-normalised expression of the output genes in ``states``: a sample, or the means (``sample=False``)."""
        if self.space == "pca5":
            # The inverse of the whitened projection: the expression's part in the 5 components.
            return (np.asarray(states, dtype=np.float64) * self._ref["scale"]) @ self._ref["components"] \
                + self._ref["mean"]
        return self.decoder.decode(np.asarray(states, dtype=np.float32), sample=sample, seed=seed)

    def fates(self, states: np.ndarray, *, t_start: float, n_rollouts: int, n_steps: int, seed: int) -> np.ndarray:
        """Probabilities of each fate at the last observed time, from ``n_rollouts`` simulations per cell."""
        from virtualcell import timecourse as tc

        if self._classifier is None:
            self._classifier = tc.fate_classifier(self._arrays["fate_states"], self._arrays["fate_labels"],
                                                  seed=int(self.meta["seed"]))
        clf = self._classifier
        t_end = float(self.times[-1])
        if t_start >= t_end or not self.simulator.stochastic:
            # Nothing left to simulate, or a deterministic model: one path per cell is its fate.
            end = states if t_start >= t_end else self.simulator.simulate(
                states, t0=t_start, t1=t_end, n_steps=n_steps, seed=seed)
            return clf.predict_proba(end)
        # As evaluate scored them: rollouts start from each cell and its nearest given cells (bundles
        # written before evaluate.fate_neighbours start every rollout from the cell itself).
        return tc.simulated_fates(self.simulator, clf, states, np.full(len(states), t_start), t_end=t_end,
                                  n_rollouts=n_rollouts, n_steps=n_steps, seed=seed,
                                  neighbours=int(self.meta.get("fate_neighbours", 1)))

    def simulate(self, states: np.ndarray, *, t_start: float, horizon: float, seed: int = 0,
                 n_steps: int | None = None) -> np.ndarray:
        """States moved from ``t_start`` by ``horizon`` (coordinates in, coordinates out)."""
        states = np.asarray(states, dtype=np.float32)
        if horizon < 0:
            raise InputError(f"horizon {horizon}: must be >= 0 (the simulator runs forwards in time)")
        if horizon == 0:
            return states.copy()
        return self.simulator.simulate(states, t0=float(t_start), t1=float(t_start + horizon),
                                       n_steps=n_steps or int(self.meta["n_steps"]), seed=seed)

    def _perturbation(self, condition: str):
        if self.perturbation is None:
            raise InputError(f"condition '{condition}': this virtual cell has no perturbation model (its dataset had "
                             "no conditions: datasets.<name>.condition_key)")
        self.perturbation.check(condition)
        return self.perturbation

    def fates_under(self, states: np.ndarray, condition: str, *, t_start: float, n_rollouts: int, n_steps: int,
                    seed: int, sample: bool = True, observed: np.ndarray | None = None) -> np.ndarray:
        """Fate probabilities under ``condition``, called by the control cells' types at the last observed time.

        With the dynamic model: each cell's fates under control (:meth:`fates`, the simulator's) plus
        the shift the dynamic model simulates, from rollouts of the cells' expression (``observed``)
        under the condition's landscape against the same rollouts (same noise) under the control's,
        clipped at 0 and renormalised: as the perturb jobs score it, so the dynamic model's own bias in
        reproducing the control cancels. Without it, rollouts under control, each end state decoded to
        genes and moved to the condition there (:mod:`virtualcell.perturbmap`)."""
        pmap = self._perturbation(condition)
        t_end = float(self.times[-1])
        dynamic = pmap.dynamics is not None and observed is not None
        rollouts = n_rollouts if (dynamic or self.simulator.stochastic) and t_start < t_end else 1
        index = {f: i for i, f in enumerate(self.fate_names)}

        def called(genes: np.ndarray) -> np.ndarray:
            names, probs = pmap.fates(genes, self.output_genes)
            out = np.zeros((len(genes), len(self.fate_names)))
            for j, name in enumerate(names):
                if name in index:
                    out[:, index[name]] = probs[:, j]
            return out

        out = np.zeros((len(states), len(self.fate_names)))
        for r in range(rollouts):
            if dynamic:
                for sign, name in ((1.0, condition), (-1.0, pmap.control)):
                    out += sign * called(pmap.simulate(observed, self.output_genes, t0=t_start,
                                                       t1=max(t_end, t_start), condition=name, seed=seed + r))
            else:
                end = self.simulate(states, t_start=t_start, horizon=max(t_end - t_start, 0.0), seed=seed + r,
                                    n_steps=n_steps)
                out += called(pmap.apply(self.expression(end, sample=sample, seed=seed + r), self.output_genes,
                                         t=t_end, condition=condition))
        out /= rollouts
        if dynamic:
            out = np.clip(self.fates(states, t_start=t_start, n_rollouts=n_rollouts, n_steps=n_steps, seed=seed)
                          + out, 0.0, None)
            out /= np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
        return out

    def predict(self, values: Any, genes: list[str], *, horizon: float, t_start: float | None = None,
                seed: int = 0, n_rollouts: int | None = None, n_steps: int | None = None,
                sample: bool = True, condition: str | None = None) -> Prediction:
        """Simulate cells given as expression (cells x ``genes``, the training data's kind of values).

        Parameters
        ----------
        values, genes
            Expression of the cells (counts, unless the model was trained on normalised or log
            values: ``meta['values']``), dense or sparse, and the names of its columns.
        horizon
            Time to simulate forward, in the units of the training time labels.
        t_start
            The cells' time; default the first observed time point.
        seed
            Seed of the stochastic simulation and of decoder draws: same seed, same answer.
        n_rollouts
            Simulations per cell for fate probabilities (default: the evaluation's).
        n_steps
            Integration steps per simulation (default: the evaluation's).
        sample
            Decode a sample of each gene (the default: simulated cells keep the spread of real ones,
            as the evaluation judges them), or with ``False`` the decoder's means: denoised, but
            under-dispersed (on the test config their pca5 W1 to the real cells is 1.3x the sample's).
        condition
            "What if": the cells under a condition (a knock-down of any of the model's genes, ``GeneA+GeneB``,
            or a drug it was trained on) rather than the control. With the dynamic perturbation model
            (``perturb.dynamic``, the default), the cells' expression is simulated forward under the
            condition's landscape (from ``t_start``: the condition starts acting now) and the fates are
            the cells' fates under control plus the shift that model simulates to the last time
            (:meth:`fates_under`); ``end`` stays the control simulation's states. Without
            it, the control simulation moved to the condition at ``t_start + horizon``: cells as if
            under the condition since the first time point, as the training cells were
            (:mod:`virtualcell.perturbmap`).
        """
        t_start = float(self.times[0] if t_start is None else t_start)
        matched, n_missing, n_ignored = self.match_genes(values, genes)
        observed = self.log_expression(matched)
        start, partner = self._states(matched, observed)
        end = self.simulate(start, t_start=t_start, horizon=horizon, seed=seed, n_steps=n_steps)
        n_steps = n_steps or int(self.meta["n_steps"])
        n_rollouts = n_rollouts or int(self.meta["n_rollouts"])
        expression = np.asarray(self.expression(end, sample=sample, seed=seed))
        if condition:
            pmap = self._perturbation(condition)
            if pmap.dynamics is not None:
                expression = pmap.simulate(observed, self.output_genes, t0=t_start, t1=t_start + horizon,
                                           condition=condition, seed=seed)
            else:
                expression = pmap.apply(expression, self.output_genes, t=t_start + horizon, condition=condition)
            fates = self.fates_under(start, condition, t_start=t_start, n_rollouts=n_rollouts, n_steps=n_steps,
                                     seed=seed, sample=sample, observed=observed)
        else:
            fates = self.fates(start, t_start=t_start, n_rollouts=n_rollouts, n_steps=n_steps, seed=seed)
        return Prediction(genes=self.output_genes, expression=expression,
                          observed=observed, start=start, end=end, fate_names=self.fate_names, fates=fates,
                          t_start=t_start, t_end=t_start + horizon, n_missing=n_missing, n_ignored=n_ignored,
                          partner_features=self.partner_features, partner=partner, condition=condition or None,
                          partner_kind=self.partner_kind)


def write_bundle(directory: str | Path, *, shared: Any, simulator: str, encoder: str | None, aligner: str | None,
                 decoder: str | None, space: str, n_steps: int, n_rollouts: int, seed: int,
                 predictor: str | None = None, perturbation: tuple[str, ...] | None = None,
                 fate_neighbours: int = 1) -> Path:
    """Gather what a :class:`VirtualCell` needs from the pipeline's files into ``directory``.

    ``shared`` is the state file the simulator was trained on (AnnData: obs ``time`` and, when
    known, ``celltype``; ``uns['pca5']``); the model files are copied; the encoder and aligner are
    left out when the state space does not use them.
    """
    from virtualcell import stages
    from virtualcell import timecourse as tc

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_name, x = stages.state_of(shared, space)
    ref_uns = shared.uns[reference.KEY]
    ref = reference.from_uns(ref_uns)
    times = tc.observed_times(shared.obs, origin="the state file")
    t = shared.obs["time"].to_numpy(dtype=float)
    last = t == times[-1]
    labels = shared.obs["celltype"].astype(str).to_numpy()[last] if "celltype" in shared.obs else None
    clf = tc.fate_classifier(x[last], labels, seed=seed)
    fate_names = [str(c) for c in clf.classes_]
    if labels is None:
        # Unlabelled cells get their fates by clustering (as evaluate does); the clusters are stored as labels.
        labels = clf.predict(x[last])
    genes = [str(g) for g in np.asarray(ref_uns["all_genes"])]
    hvg = [str(g) for g in ref["genes"]]
    clash = {g for g in hvg if g.startswith(FATE_PREFIX) or g in state_columns(x.shape[1])}
    if clash:
        raise InputError(f"gene names {sorted(clash)[:3]} clash with the virtual cell's output columns "
                         f"({STATE_PREFIX}0.., {FATE_PREFIX}<fate>); rename them")
    meta = {"format": FORMAT_VERSION, "space": state_name, "values": ref["values"],
            "target_sum": None if not np.isfinite(ref["target_sum"]) else float(ref["target_sum"]),
            "genes": genes, "hvg": hvg, "times": times.tolist(), "fate_names": fate_names,
            "state_dim": int(x.shape[1]), "n_steps": int(n_steps), "n_rollouts": int(n_rollouts), "seed": int(seed),
            "fate_neighbours": int(fate_neighbours)}
    partner = shared.uns.get(stages.PARTNER)
    if state_name == "shared" and partner in PREFIXES:
        meta["partner"] = str(partner)
        meta["partner_features"] = [str(f) for f in np.asarray(shared.uns.get(stages.PARTNER_NAMES, []))]
        clash = {PREFIXES[partner] + f for f in meta["partner_features"]} & set(hvg)
        if clash:
            raise InputError(f"gene names {sorted(clash)[:3]} clash with the virtual cell's "
                             f"{'protein' if partner == io.PROT else 'peak'} columns; rename them")
    (directory / META).write_text(json.dumps(meta, indent=1))
    arrays = {"pca_mean": ref["mean"], "pca_components": ref["components"], "pca_scale": ref["scale"],
              "fate_states": x[last].astype(np.float32), "fate_labels": np.asarray(labels, dtype=str)}
    if meta.get("partner") == io.ATAC:
        arrays["partner_loadings"] = np.asarray(shared.uns[stages.PARTNER_LOADINGS], dtype=np.float32)
    np.savez(directory / ARRAYS, **arrays)
    files = {SIMULATOR: simulator, ENCODER: encoder if state_name != reference.SPACE else None,
             ALIGNER: aligner if state_name == "shared" else None,
             PREDICTOR: predictor if state_name == "shared" else None,
             DECODER: decoder if state_name != reference.SPACE else None}
    if perturbation:
        from virtualcell.perturbmap import DYNAMICS, MAP, MODEL

        files |= dict(zip((MODEL, MAP, DYNAMICS), perturbation))
    for name, path in files.items():
        if path:
            (directory / name).write_bytes(Path(path).read_bytes())
    return directory


def example_input(rna: ad.AnnData, n: int = 5) -> pd.DataFrame:
    """An input example: ``n`` cells' values as measured (raw counts, for counts) with gene names as columns."""
    x = rna.layers[io.raw_layer(rna)][:n]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return pd.DataFrame(x.astype(np.float64), columns=[str(g) for g in rna.var_names], index=rna.obs_names[:n])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)


def read_cells(path: str | Path, *, layer: str | None = None) -> tuple[ad.AnnData, Any]:
    """An .h5ad of cells and the matrix a virtual cell reads: ``layer``, else ``layers['counts']`` when
    there is one (scanpy keeps raw counts there beside log-normalised ``X``), else ``X``."""
    cells = io.read_h5ad(path)
    if layer is None:
        layer = "counts" if "counts" in cells.layers else None
    if layer is not None and layer not in cells.layers:
        raise InputError(f"{path}: no layer '{layer}' (layers: {list(cells.layers)}); choose one of them or omit "
                         "--layer to read X")
    return cells, cells.layers[layer] if layer else cells.X


def predict_h5ad(cell: VirtualCell, path: str | Path, output: str | Path, *, horizon: float,
                 t_start: float | None = None, seed: int = 0, n_rollouts: int | None = None,
                 sample: bool = True, layer: str | None = None, model: str = "",
                 condition: str | None = None) -> ad.AnnData:
    """Predict the cells of an .h5ad and write them, with the answer in documented slots, to ``output``.

    Written (cells as in the input, genes: the model's output genes):

    - ``X``: the input cells' own log-normalised expression, measured as the training cells were;
    - ``layers['simulated']``: simulated log-normalised expression at ``t_start + horizon`` (under
      ``condition`` when one is given);
    - ``obsm['X_state']`` / ``obsm['X_state_simulated']``: the states at ``t_start`` and after;
    - ``obsm['fate_probabilities']`` (a DataFrame, one column per fate) and ``obs['predicted_fate']``;
    - ``obsm['X_predicted_prot']`` (a DataFrame, one column per protein; datasets aligned with protein):
      the cells' protein (CLR) at ``t_start``, predicted from their RNA alone;
    - ``uns['virtualcell']``: the model, times, seed, and the genes zero-filled or ignored.
    """
    cells, values = read_cells(path, layer=layer)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answer = cell.predict(values, list(cells.var_names), horizon=horizon, t_start=t_start, seed=seed,
                                  n_rollouts=n_rollouts, sample=sample, condition=condition)
    except InputError as exc:
        raise InputError(f"{path}: {str(exc).removeprefix('input cells: ')}") from None
    for w in caught:
        if "virtual cell" in str(w.message):
            print(f"[virtualcell] {path}: {w.message}", flush=True)
        else:  # not ours: passed on as it came, not swallowed
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = ad.AnnData(X=answer.observed.astype(np.float32), obs=cells.obs.copy(),
                     var=pd.DataFrame(index=pd.Index(answer.genes, name=cells.var_names.name)))
    out.layers["simulated"] = answer.expression.astype(np.float32)
    out.obsm["X_state"], out.obsm["X_state_simulated"] = answer.start, answer.end
    out.obsm["fate_probabilities"] = pd.DataFrame(answer.fates, index=out.obs_names, columns=answer.fate_names)
    if answer.partner is not None:
        out.obsm[f"X_predicted_{answer.partner_kind}"] = pd.DataFrame(answer.partner, index=out.obs_names,
                                                                      columns=answer.partner_features)
    out.obs["predicted_fate"] = pd.Categorical(np.asarray(answer.fate_names)[answer.fates.argmax(axis=1)],
                                               categories=answer.fate_names)
    out.uns["virtualcell"] = {"model": model, "space": cell.space, "horizon": float(horizon),
                              "t_start": answer.t_start, "t_end": answer.t_end, "seed": int(seed),
                              "condition": condition or "control",
                              "n_missing_genes": answer.n_missing, "n_ignored_genes": answer.n_ignored}
    io.write_h5ad(out, output)
    return out
