"""evaluate's time-course scoring: simulators against baselines in pca5, and fates from simulation.

The stage (:func:`virtualcell.stages.evaluate`) reads the files and writes metrics.json; this
module runs the predictions, the baselines of the same cells and the scores
(:mod:`virtualcell.timecourse` holds the scoring pieces, :mod:`virtualcell.evaluate` the distances).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from virtualcell import evaluate as ev
from virtualcell import io, reference, synthetic
from virtualcell import timecourse as tc
from virtualcell.errors import InputError
from virtualcell.models.decoder import ExpressionDecoder
from virtualcell.models.dynamics import Simulator
from virtualcell.representation import generator_params
from virtualcell.stages import PCA5, say, state_of
from virtualcell.timecourse import holdout_label, observed_times, parse_holdout

FATES = "fate_probabilities"
TRUE_FATES = "truth_fate_probabilities"
FATE_NAMES = "fate_names"


def score_simulators(data: ad.AnnData, simulators: Mapping[str, Sequence[str]], *, params: Mapping[str, Any],
                      space: str, origin: str, decoder: str | None) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """metrics.json's ``simulation`` section, the fates (scores, AnnData) of the ``none`` simulators, and
    per held-out time point the real cells, the first seed's simulated ones and the previous time
    point's cells in pca5 (for the figure: ``{"t=2": (real, simulated, previous)}``).

    Every holdout's simulators (one per seed) predict its time point from the one before (or, for
    the last, extrapolate), beside the baselines of the same cells; the last holdout's simulators
    also roll out from the first time point. Scores are in pca5 (through ``decoder`` for simulators
    of a learned space) and in the simulators' own space.
    """

    obs = data.obs
    state_name, x = state_of(data, space)
    x = x.astype(np.float64)
    t = obs["time"].to_numpy(dtype=float)
    times = observed_times(obs, origin=origin)
    models = {path: io.read_model(Simulator, path) for paths in simulators.values() for path in paths}
    dec = None
    if state_name != reference.SPACE:
        if decoder is None:
            raise InputError(f"evaluate: simulators of the {state_name} space need --decoder (the decode step's "
                             "decoder.pt) to be judged in pca5")
        dec = io.read_model(ExpressionDecoder, decoder)
    if PCA5 not in data.obsm or reference.KEY not in data.uns:
        raise InputError(f"{origin}: no pca5 coordinates (obsm '{PCA5}'); it was written by an older version: "
                         "rerun the embed step (snakemake --forcerun embed)")
    ref = reference.from_uns(data.uns[reference.KEY])
    gen = generator_params(data)
    oracle = tc.make_oracle(gen, ref, data.uns[reference.KEY]["all_genes"]) if gen else None
    scorer = tc.Scorer(data.obsm[PCA5], x, t, space=state_name, oracle=oracle, max_points=params["max_points"])
    n_steps, base_seed, mp = params["n_steps"], params["seed"], params["max_points"]

    def to_pca(states: np.ndarray, s: int) -> np.ndarray:
        if dec is None:
            return states
        return reference.project(dec.decode(states.astype(np.float32), sample=True, seed=s), ref)

    section: dict[str, Any] = {"space": state_name, "n_seeds": 0, "holdouts": {}, "extrapolation": {},
                               "rollout": {}}
    fate = None
    overlays: dict[str, Any] = {}
    for label, paths in sorted(simulators.items()):
        held = parse_holdout(label, times, origin=origin)
        seeds = [base_seed + i for i in range(len(paths))]  # of sampling; each model has its own training seed
        section["n_seeds"] = len(paths)
        if held is None:
            if params["fate_rollouts"] > 0:
                fate = score_fates(data, [models[p] for p in paths], x=x, t=t, times=times, seeds=seeds,
                                    params=params)
            continue
        last = held == times[-1]
        prev = times[times < held].max()
        runs, rollouts = [], []
        for path, s in zip(paths, seeds, strict=True):
            sim = models[path]
            pred_x = sim.simulate(scorer.at(prev, state=True).astype(np.float32), t0=float(prev), t1=float(held),
                                  n_steps=n_steps, seed=s).astype(np.float64)
            predictions = {"model": (to_pca(pred_x, s), pred_x)}
            if s == seeds[0]:
                name = f"t={holdout_label(held)}" + (" (extrapolated)" if last else "")
                overlays[name] = (scorer.at(held), predictions["model"][0], scorer.at(prev))
            if dec is not None:
                # The held-out cells' own states through the decoder: what decoding alone costs, the
                # floor of any model of the embedding space judged in pca5 (a paired comparison).
                predictions["decoded_truth"] = (to_pca(scorer.at(held, state=True), s), None)
            n = int((t == held).sum())
            zp, xp = scorer.at(prev), scorer.at(prev, state=True)
            if last:
                before = times[times < prev].max()
                beta = (held - prev) / (prev - before)
                predictions["copy_last"] = (zp, xp)
                predictions["ot_extrap"] = (
                    ev.ot_extrapolate(scorer.at(before), zp, beta, n=n, max_points=mp, seed=s),
                    ev.ot_extrapolate(scorer.at(before, state=True), xp, beta, n=n, max_points=mp, seed=s))
            else:
                nxt = times[times > held].min()
                alpha = (held - prev) / (nxt - prev)
                zn, xn = scorer.at(nxt), scorer.at(nxt, state=True)
                predictions |= {
                    "ot_interp": (ev.ot_interpolate(zp, zn, alpha, n=n, max_points=mp, seed=s),
                                  ev.ot_interpolate(xp, xn, alpha, n=n, max_points=mp, seed=s)),
                    "copy_prev": (zp, xp),
                    "copy_next": (zn, xn),
                    "random_coupling": (ev.random_coupling_interpolate(zp, zn, alpha, n=n, max_points=mp, seed=s),
                                        ev.random_coupling_interpolate(xp, xn, alpha, n=n, max_points=mp,
                                                                       seed=s)),
                }
            runs.append(scorer.score(held, predictions, seed=s))
            if last:
                # Multi-step: from the first time point to every later one in one simulation.
                start = scorer.at(times[0], state=True).astype(np.float32)
                rollouts.append({})
                for later in times[1:]:
                    end = sim.simulate(start, t0=float(times[0]), t1=float(later), n_steps=n_steps,
                                       seed=s).astype(np.float64)
                    scores = scorer.score(later, {"model": (to_pca(end, s), end),
                                                  "copy_first": (scorer.at(times[0]), start)}, seed=s)
                    rollouts[-1][holdout_label(later)] = {f"w1_{reference.SPACE}": scores[f"w1_{reference.SPACE}"]}
        summary = tc.summarise(runs)
        (section["extrapolation"] if last else section["holdouts"])[holdout_label(held)] = summary
        if rollouts:
            for later in rollouts[0]:
                section["rollout"][later] = tc.summarise([r[later] for r in rollouts])
        w1 = summary[f"w1_{reference.SPACE}"]
        ref_method = "copy_last" if last else "ot_interp"
        say(f"evaluate: {'extrapolated' if last else 'held-out'} t={holdout_label(held)}: W1 (pca5) model {w1['model']:.3f} "
            f"± {summary['std'][f'w1_{reference.SPACE}']['model']:.3f}, {ref_method} {w1[ref_method]:.3f}"
            + (f", oracle {w1['oracle']:.3f}" if "oracle" in w1 else "")
            + (f"; gap closed {summary['gap_closed']:.2f}" if "gap_closed" in summary else ""))
    if section["holdouts"]:
        section["mean"] = tc.mean_over(section["holdouts"])
    for key in ("extrapolation", "rollout"):
        if not section[key]:
            del section[key]
    return section, fate, overlays




def score_fates(data: ad.AnnData, sims: Sequence[Any], *, x: np.ndarray, t: np.ndarray, times: np.ndarray,
                 seeds: Sequence[int], params: Mapping[str, Any]) -> tuple[dict[str, Any], ad.AnnData]:
    """Fate probabilities from stochastic rollouts of the model trained on every time point, per seed."""

    obs = data.obs
    last = t == times[-1]
    label_key = "celltype" if "celltype" in obs else None
    labels = obs[label_key].astype(str).to_numpy() if label_key else None
    clf = tc.fate_classifier(x[last], None if labels is None else labels[last], seed=params["seed"])
    classes = [str(c) for c in clf.classes_]
    cells = ~last
    predicted = [tc.simulated_fates(sim, clf, x[cells], t[cells], t_end=float(times[-1]),
                                    n_rollouts=params["fate_rollouts"], n_steps=params["n_steps"], seed=s,
                                    neighbours=params["fate_neighbours"])
                 for sim, s in zip(sims, seeds, strict=True)]
    out = ad.AnnData(obs=obs.loc[cells].copy())
    out.obsm[FATES] = pd.DataFrame(np.mean(predicted, axis=0), index=out.obs_names, columns=classes)
    out.obsm[PCA5] = np.asarray(data.obsm[PCA5])[cells]
    out.uns[FATE_NAMES] = classes
    say(f"evaluate: fate probabilities of {int(cells.sum())} cells from {params['fate_rollouts']} rollouts each "
        f"(started from the cell and its {params['fate_neighbours'] - 1} nearest same-time cells), "
        f"fates {classes}")
    if synthetic.LATENT_KEY not in data.obsm or "fate" not in obs:
        return {}, out
    truth = tc.true_fates(np.asarray(data.obsm[synthetic.LATENT_KEY])[cells], t[cells], classes,
                          t_end=float(times[-1]), n_rollouts=100, seed=params["seed"])
    out.obsm[TRUE_FATES] = pd.DataFrame(truth, index=out.obs_names, columns=classes)
    realised = obs["fate"].astype(str).to_numpy()[cells]
    runs = [{"model": tc.fate_scores(p, truth, realised, classes)} for p in predicted]
    # No dynamics: the fate of the late cells nearest to a cell's present state.
    now = tc.fate_scores(clf.predict_proba(x[cells]), truth, realised, classes)
    mean, std = tc.mean_and_std(runs)
    scores = {k: {"model": mean["model"][k], "no_dynamics": now[k]} for k in mean["model"] if k != "n_committed"}
    scores["std"] = {k: {"model": v} for k, v in std["model"].items() if k != "n_committed"}
    scores["n_cells"], scores["n_committed"] = int(cells.sum()), now["n_committed"]
    say(f"evaluate: fates vs truth: Pearson r {scores['pearson_r']['model']:.3f} (no dynamics "
        f"{now['pearson_r']:.3f}), committed-cell AUROC {scores.get('auroc_committed', {}).get('model', float('nan')):.3f}")
    return scores, out
