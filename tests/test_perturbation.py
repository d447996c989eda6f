"""Perturbations: the generator's conditions and truth, the metrics, the baselines and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import scanpy as sc

from virtualcell import perturbation as P
from virtualcell import synthetic, synthetic_conditions
from virtualcell.errors import InputError
from virtualcell.perturbation_metrics import Truth, mean_over

SETTINGS = {"n_cells": 600, "n_genes": 120, "n_proteins": 8, "time_points": [0, 1, 2, 3, 4], "n_spots": 20}


@pytest.fixture(scope="module")
def perturbed():
    return synthetic.generate(**SETTINGS, cells_per_condition=150)


@pytest.fixture(scope="module")
def data(perturbed):
    rna = perturbed["rna"][~perturbed["rna"].obs["low_quality"].to_numpy()].copy()
    sc.pp.normalize_total(rna, target_sum=1e4)
    sc.pp.log1p(rna)
    rna.var["highly_variable"] = ~rna.var["mt"].to_numpy()
    rna.obs["celltype"] = rna.obs["fate"]
    return P.Data(rna, control="control", n_pcs=10)


def test_control_cells_do_not_change_when_perturbations_are_added(perturbed):
    plain = synthetic.generate(**SETTINGS)
    rna = perturbed["rna"]
    control = rna.obs["condition"].to_numpy() == "control"
    assert control.sum() == plain["rna"].n_obs and (rna.X[control] != plain["rna"].X).nnz == 0
    # the counterfactual of a control cell is itself; of a perturbed one, the same noise under control
    latent, cf = rna.obsm["truth_latent"], rna.obsm["truth_counterfactual"]
    assert np.allclose(latent[control], cf[control])
    assert not np.allclose(latent[~control], cf[~control])


def test_conditions_act_as_their_truth_says(perturbed):
    truth = perturbed.uns["synthetic"]["conditions"]
    fates = {name: dict(zip(synthetic.BASINS, c["fate_proportions"], strict=True)) for name, c in truth.items()}
    control = fates["control"]
    assert fates["drug_block"]["progenitor"] > control["progenitor"] + 0.5  # differentiation blocked
    assert fates["drug_tilt"]["fate_A"] > control["fate_A"] + 0.2  # tilted toward fate A
    for name, c in truth.items():
        if c["kind"] == "knockdown" and c["programmes"] == ["fate_A"]:
            assert fates[name]["fate_A"] < control["fate_A"] - 0.1  # its basin's well is shallower
        if c["kind"] == "knockdown" and c["programmes"] == ["none"]:
            assert abs(fates[name]["fate_A"] - control["fate_A"]) < 0.03  # a direct effect only
    # a knock-down leaves about 20 % of its target, whatever else it does
    rna = perturbed["rna"]
    lib = np.asarray(rna.X.sum(axis=1)).ravel()
    for name, c in truth.items():
        if c["kind"] == "knockdown" and c["programmes"] == ["none"]:
            g = rna.var_names.get_loc(c["targets"][0])
            share = np.asarray(rna.X[:, g].todense()).ravel() / lib
            cond = rna.obs["condition"].to_numpy()
            assert 0.05 < share[cond == name].mean() / share[cond == "control"].mean() < 0.45
    # the workflow plans its jobs from the settings alone, and gets the same conditions
    names, held = synthetic_conditions.planned(SETTINGS)
    assert names == list(rna.obs["condition"].cat.categories) and set(held) <= set(names)
    assert [truth[h]["auto_holdout"] for h in held] == [True] * 3


def test_a_held_out_knockdown_never_has_its_gene_in_training(data):
    combo = next(c for c in data.conditions if "+" in c)
    single = combo.split("+")[0]
    train = P.training_conditions(data, single)
    assert single not in train and combo not in train
    assert set(combo.split("+")) <= set(P.training_conditions(data, combo))  # a combination keeps its singles


def test_scores_rank_the_truth_above_no_change(data):
    combo = next(c for c in data.conditions if "+" in c)
    cells = data.cells(combo)
    half_a, half_b = P.split_halves(cells, data.time[cells], seed=0)
    ctrl = data.cells("control")
    others = {n: P.mean_change(data, n) for n in data.conditions if n != combo}
    truth = Truth(data.x[half_b], data.x[ctrl], centroid=data.x[ctrl].mean(0), pca5=data.pca5, others=others)
    start = P.matched_controls(data, data.time[half_a], seed=0)
    ceiling = truth.score(data.x[half_a], max_points=500, seed=0)
    control = truth.score(data.x[start], max_points=500, seed=0)
    assert ceiling["pearson_delta_top20"] > 0.7 and control["pearson_delta_top20"] < ceiling["pearson_delta_top20"] - 0.3
    assert ceiling["edist_pca5"] < control["edist_pca5"] and ceiling["mse_top20"] < control["mse_top20"]
    assert ceiling["discrimination"] > control["discrimination"]
    # the additive baseline of two singles is close to the real combination on its top genes
    additive = truth.score(data.x[start] + sum(P.mean_change(data, c) for c in combo.split("+")), max_points=500,
                           seed=0)
    assert additive["pearson_delta_top20"] > 0.8
    table = {combo: {"edist_pca5": {"model": 1.0, "control": 2.0}}, "x": {"edist_pca5": {"model": 3.0}}}
    assert mean_over(table) == {"edist_pca5": {"control": 2.0, "model": 2.0}}


def test_linear_baseline_recovers_a_linear_response(data, monkeypatch):
    # changes made exactly G W p for every knock-down are what the PCA-ridge model fits (in sample: with
    # 8 knock-downs and 10 x 10 weights, W is not determined outside their span)
    g = data.pcs["components"].T
    rng = np.random.default_rng(0)
    w = rng.normal(size=(g.shape[1], g.shape[1]))
    singles = [n for n in data.conditions if "+" not in n and data.kind(n) == "gene"]
    fake = dict.fromkeys(singles)
    for name in singles:
        fake[name] = g @ w @ g[data.gene_index[name]]
    monkeypatch.setattr(P, "mean_change", lambda d, n: fake[n])
    predicted = P.linear_change(data, singles, singles[0])
    assert np.corrcoef(predicted, fake[singles[0]])[0, 1] > 0.95
    assert P.linear_change(data, singles, "drug_tilt") is None  # a drug has no gene embedding


def test_bad_conditions_get_one_line_errors(data):
    obs = pd.DataFrame({"condition": ["control"] * 30 + ["KD1"] * 30 + ["KD2"] * 3})
    with pytest.raises(InputError, match=r"control label 'DMSO' is not a condition.*fix datasets.<name>.control"):
        P.check_conditions(obs, control="DMSO", holdouts=[], min_cells=20, origin="f.h5ad")
    with pytest.raises(InputError, match=r"f.h5ad: condition 'KD2' has 3 cells, fewer than min_cells_per_condition"):
        P.check_conditions(obs, control="control", holdouts=[], min_cells=20, origin="f.h5ad")
    with pytest.raises(InputError, match=r"held-out condition 'KD9' is not a condition"):
        P.check_conditions(obs[:60], control="control", holdouts=["KD9"], min_cells=20, origin="f.h5ad")
    with pytest.raises(InputError, match=r"'drug_tilt' is not a measured gene.*a drug never seen cannot be predicted"):
        P.features(data, "drug_tilt", drugs=["drug_block"])
    with pytest.raises(InputError, match=r"holdout_conditions: 'auto' needs the built-in data"):
        P.holdout_conditions("mine", {"source": "h5ad", "condition_key": "perturbation"})


# ---------------------------------------------------------------------------
# real cells, known shifts: a Perturb-seq-like library made from the real PBMC CITE-seq cells


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """Real PBMC RNA counts, cells given guides by group; each knock-down thins its target to 20 % and adds
    counts to a module of 5 other genes (a known shift), the combination both singles' changes; written as
    Cell Ranger HDF5 with a CRISPR Guide Capture library, as a screen arrives."""
    from tests.test_readers import write_10x_h5
    from virtualcell import readers

    rna = readers.read_10x_mtx(readers.testdata_path("pbmc_10k_protein_v3_mtx"))["rna"]
    counts = np.asarray(rna.X.todense()).astype(np.int64)
    genes = list(rna.var_names)
    rng = np.random.default_rng(0)
    expressed = np.argsort(-counts.mean(0))
    targets = [genes[i] for i in expressed[5:9]]  # four well-expressed genes
    modules = {t: rng.choice([i for i in expressed[:60] if genes[i] not in targets], 5, replace=False) for t in targets}
    group = rng.choice(["control", *targets, "combo", "none"], size=len(counts),
                       p=[0.3, 0.1, 0.1, 0.1, 0.1, 0.15, 0.15])
    for t in targets:
        hit = np.isin(group, [t, "combo"]) if t in targets[:2] else group == t
        g = genes.index(t)
        counts[hit, g] = rng.binomial(counts[hit, g], 0.2)
        for m in modules[t]:
            counts[hit, m] += rng.poisson(counts[:, m].mean() + 1.0, hit.sum())
    guide_names = ["non-targeting-1", *[f"{t}-1" for t in targets]]
    guides = rng.poisson(0.3, (len(counts), len(guide_names)))  # ambient guide UMIs
    for k, name in enumerate(guide_names):
        t = name.rsplit("-", 1)[0]
        on = group == ("control" if name.startswith("non") else t)
        if t in targets[:2]:
            on |= group == "combo"
        guides[on, k] += rng.integers(8, 30, on.sum())
    path = tmp_path_factory.mktemp("screen") / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, np.hstack([counts, guides]), barcodes=list(rna.obs_names),
                 ids=[*rna.var["gene_ids"], *guide_names], names=[*genes, *guide_names],
                 types=["Gene Expression"] * len(genes) + ["CRISPR Guide Capture"] * len(guide_names))
    return {"path": path, "targets": targets, "group": pd.Series(group, index=rna.obs_names)}


def test_guides_are_assigned_and_mapped_to_their_target(screen):
    from virtualcell import io

    spec = {"source": "10x_h5", "path": str(screen["path"]), "modalities": ["rna"], "condition_key": "guides",
            "control": "control"}
    mdata = io.read_dataset("screen", spec)
    obs = mdata["rna"].obs
    a, b = screen["targets"][:2]
    truth = screen["group"].reindex(obs.index).replace({"combo": f"{a}+{b}"})
    # cells with their group's guides get its condition; nearly all without a guide are left out (a few
    # reach the call on ambient guide UMIs alone, as in real libraries)
    guided = truth != "none"
    assert (obs["condition"].astype(str)[guided] == truth[guided]).mean() > 0.97
    assert (~guided).sum() < 0.05 * (screen["group"] == "none").sum()
    assert obs.loc[obs["condition"] == f"{a}+{b}", "guide_multiplet"].all()
    assert len(obs) < len(screen["group"]) * 0.9  # the 15 % without guides
    with pytest.raises(InputError, match=r"no cell has a guide with >= 500 UMIs"):
        io.read_dataset("screen", spec | {"guide_min_umi": 500})
    import anndata as ad
    import mudata as md
    import scipy.sparse as sp

    from virtualcell import guides

    assert guides.target_of("sgKLF1_2") == "KLF1" and guides.target_of("NTC-3") is None
    only_targeting = ad.AnnData(sp.csr_matrix(np.array([[10.0, 0.0], [0.0, 12.0]])),
                                var=pd.DataFrame(index=["KLF1-1", "GATA1-1"]))
    with pytest.raises(InputError, match=r"f.h5: no cell carries only non-targeting guides"):
        guides.assign(only_targeting, control="control", origin="f.h5")
    with pytest.raises(InputError, match=r"condition_key: guides, but no CRISPR Guide Capture features"):
        io._conditions_from_guides(md.MuData({"rna": only_targeting}), spec, dataset="screen", origin="f.h5")


def test_real_cells_with_known_shifts_score_every_method_against_the_truth(screen):
    from virtualcell import io
    from virtualcell.models.perturbation import ConditionalFlow

    spec = {"source": "10x_h5", "path": str(screen["path"]), "modalities": ["rna"], "condition_key": "guides",
            "control": "control"}
    rna = io.read_dataset("screen", spec)["rna"]
    sc.pp.normalize_total(rna, target_sum=1e4)
    sc.pp.log1p(rna)
    data = P.Data(rna, control="control", n_pcs=10)
    a, b = screen["targets"][:2]
    combo = f"{a}+{b}"
    train = P.training_conditions(data, combo)
    assert set(train) == set(screen["targets"])
    ctrl = data.cells("control")
    flow = ConditionalFlow(10, len(data.pcs["scale"]) + 2, max_components=2, n_hidden=32, n_layers=2)
    conds = [(data.z[data.cells(n)], data.t_scaled[data.cells(n)], P.features(data, n, drugs=[])) for n in train]
    flow.fit(data.z[ctrl], data.t_scaled[ctrl], conds, epochs=15, steps_per_epoch=10, device="cpu", seed=0)
    predict = P.Predictor(data, combo, flow, train=train, drugs=[], n_steps=10)
    cells = data.cells(combo)
    half_a, half_b = P.split_halves(cells, data.time[cells], seed=0)
    start = P.matched_controls(data, data.time[half_a], seed=0)
    predicted = predict(start) | {"ceiling": data.x[half_a]}
    truth = Truth(data.x[half_b], data.x[ctrl], centroid=data.x[ctrl].mean(0), pca5=data.pca5,
                  others={n: P.mean_change(data, n) for n in train})
    scores = {m: truth.score(x, max_points=500, seed=0) for m, x in predicted.items()}
    # the shifts are additive by construction: the additive baseline finds them, no change does not
    assert scores["additive"]["pearson_delta_top20"] > 0.8 > scores["control"]["pearson_delta_top20"] + 0.5
    assert scores["ceiling"]["pearson_delta_top20"] > 0.8
    # both knocked-down genes drop in the model's prediction, as in the real cells
    for gene in (a, b):
        g = data.gene_index[gene]
        assert predicted["model"][:, g].mean() < data.x[ctrl, g].mean() and truth.delta[g] < 0
    assert scores["model"]["pearson_delta_top20"] > scores["control"]["pearson_delta_top20"]


def test_the_conditioned_simulator_sends_control_cells_where_each_landscape_does(data, tmp_path):
    """The dynamic response: one SDE per condition, control cells of the first time point simulated to
    the last under a drug's embedding: the drug that blocks differentiation keeps them progenitors."""
    from virtualcell.models.perturbation import ConditionalDynamics

    drugs = ["drug_block", "drug_tilt"]
    ctrl = data.cells("control")
    conds = [(data.z[ctrl], data.time[ctrl], None)]
    conds += [(data.z[data.cells(d)], data.time[data.cells(d)], P.features(data, d, drugs=drugs)) for d in drugs]
    n_features = len(data.pcs["scale"]) + len(drugs) + 2
    dyn = ConditionalDynamics(len(data.pcs["scale"]), n_features, max_components=1, n_hidden=64, n_layers=2)
    dyn.fit(conds, epochs=100, steps_per_epoch=10, batch_size=256, lr=2e-3, diffusion=1.0, device="cpu", seed=0)
    answers = {d: P.dynamic_fates(data, dyn, d, drugs=drugs, residual=None, rollouts=3, seed=0) for d in drugs}
    fates = {d: a["dynamic_raw"] for d, a in answers.items()}
    knn, names = P.fate_classifier(data)
    start = ctrl[data.time[ctrl] == data.time.min()]
    end = dyn.simulate(data.z[np.repeat(start, 3)], t0=0, t1=float(data.time.max()), seed=0)
    control = P._proportions(knn.predict(end), names)
    assert fates["drug_block"]["progenitor"] > control["progenitor"] + 0.3, (fates, control)
    assert fates["drug_tilt"]["fate_A"] > control["fate_A"], (fates, control)
    # the reported answer is that shift from the control simulation, added to the control's real proportions
    real = P._proportions(knn.predict(data.z[ctrl[data.time[ctrl] == data.time.max()]]), names)
    block = answers["drug_block"]["dynamic"]
    assert abs(sum(block.values()) - 1) < 1e-9 and block["progenitor"] > real["progenitor"] + 0.15
    # the control has no components, so its embedding is zero; a saved model simulates the same paths
    zero = dyn.module.embed(torch.zeros(1, 1, n_features), torch.zeros(1, 1))
    assert torch.count_nonzero(zero) == 0
    dyn.save(tmp_path / "dynamics.pt")
    again = ConditionalDynamics.load(tmp_path / "dynamics.pt")
    assert np.allclose(again.simulate(data.z[start], t0=0, t1=4, seed=1), dyn.simulate(data.z[start], t0=0, t1=4, seed=1))
    with pytest.raises(Exception, match="forward in time"):
        dyn.simulate(data.z[start], t0=4, t1=0)


def test_the_conditioned_simulator_bounds_its_couplings_on_large_time_points(data, monkeypatch):
    """An atlas-sized time point is subsampled for its plans and an interval keeps a bounded pool of pairs,
    so memory does not grow with the square of the cells (bounds shrunk here to the test data's size)."""
    from virtualcell.models import perturbation as M

    shapes = []
    real_plan = M.entropic_plan

    def recording_plan(cost, reg):
        shapes.append(tuple(cost.shape))
        return real_plan(cost, reg)

    monkeypatch.setattr(M, "entropic_plan", recording_plan)
    monkeypatch.setattr(M, "PLAN_MAX_CELLS", 40)
    monkeypatch.setattr(M, "MAX_PAIRS_PER_INTERVAL", 500)
    ctrl = data.cells("control")
    dyn = M.ConditionalDynamics(len(data.pcs["scale"]), len(data.pcs["scale"]) + 2, max_components=1,
                                n_hidden=16, n_layers=1)
    history = dyn.fit([(data.z[ctrl], data.time[ctrl], None)], epochs=2, steps_per_epoch=2, device="cpu", seed=0)
    assert len(history) == 2 and max(max(s) for s in shapes) == 40  # > 100 control cells per time point
    end = dyn.simulate(data.z[ctrl[:10]], t0=0, t1=4, seed=0)
    assert end.shape == (10, len(data.pcs["scale"])) and np.isfinite(end).all()
