"""Cross-modal prediction: the JEPA-style predictor of one modality from another, and its scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from virtualcell import crossmodal
from virtualcell.models.contrastive import Aligner
from virtualcell.models.predictor import CrossModalPredictor
from virtualcell.train import BadInputError

CPU = "cpu"


@pytest.fixture(scope="module")
def paired_cells():
    """RNA-like and protein-like features of one latent state; the aligner's embeddings of both."""
    rng = np.random.default_rng(0)
    n = 600
    z = rng.normal(size=(n, 3))
    rna = (z @ rng.normal(size=(3, 10)) + 0.1 * rng.normal(size=(n, 10))).astype(np.float32)
    prot = (np.tanh(z @ rng.normal(size=(3, 12))) + 0.2 * rng.normal(size=(n, 12))).astype(np.float32)
    aligner = Aligner({"rna": 10, "prot": 12}, n_shared=8, n_hidden=64)
    aligner.fit(rna[:450], prot[:450], epochs=20, batch_size=128, lr=3e-3, device=CPU, seed=0)
    za, zb = aligner.embed("rna", rna), aligner.embed("prot", prot)
    model = CrossModalPredictor(10, 8, 12, n_hidden=64)
    model.fit(rna[:450], za[:450], zb[:450], prot[:450], validation=(rna[450:500], za[450:500], zb[450:500],
                                                                      prot[450:500]),
              epochs=40, batch_size=128, lr=3e-3, device=CPU, seed=0)
    return {"rna": rna, "prot": prot, "za": za, "zb": zb, "model": model, "test": slice(500, None)}


def test_protein_predicted_from_rna_alone_tracks_the_measured_protein(paired_cells):
    c, test = paired_cells, paired_cells["test"]
    model = c["model"]
    assert model.history[-1]["val_prediction_mse"] < 0.5 * model.history[0]["val_prediction_mse"]
    predicted = model.predict_values(c["rna"][test], c["za"][test])
    r = crossmodal.pearson_per_feature(predicted, c["prot"][test])
    assert predicted.shape == c["prot"][test].shape and np.nanmean(r) > 0.8
    # the predicted embedding lies on the shared space's sphere, near the cell's measured one
    z_hat = model.predict_embedding(c["rna"][test], c["za"][test])
    np.testing.assert_allclose(np.linalg.norm(z_hat, axis=1), 1, rtol=1e-5)
    # a cell's own pair has a far lower energy than a mismatched one
    energy = model.energy(c["rna"][test], c["za"][test], c["zb"][test])
    shuffled = model.energy(c["rna"][test], c["za"][test], c["zb"][test][::-1])
    assert energy.mean() < 0.3 * shuffled.mean()


def test_predictor_keeps_the_weights_of_its_best_validation_epoch(paired_cells):
    """Early stopping in effect: the weights kept score the lowest val_prediction_mse of the history."""
    import torch

    c, model = paired_cells, paired_cells["model"]
    val = slice(450, 500)
    best = min(h["val_prediction_mse"] for h in model.history)
    assert model.history[model.best_epoch]["val_prediction_mse"] == best
    model.module.eval()
    with torch.no_grad():
        arrays = [torch.as_tensor(c[k][val]) for k in ("rna", "za", "zb", "prot")]
        assert float(model.module.loss(*arrays)["prediction_mse"]) == pytest.approx(best, rel=1e-4)


def test_predictor_save_load_gives_the_same_predictions(paired_cells, tmp_path):
    c, test = paired_cells, paired_cells["test"]
    c["model"].save(tmp_path / "predictor.pt")
    loaded = CrossModalPredictor.load(tmp_path / "predictor.pt")
    np.testing.assert_allclose(loaded.predict_values(c["rna"][test], c["za"][test]),
                               c["model"].predict_values(c["rna"][test], c["za"][test]), rtol=1e-5, atol=1e-6)


def test_predictor_rejects_unpaired_or_misshapen_input(paired_cells):
    c = paired_cells
    with pytest.raises(BadInputError, match="paired row by row"):
        c["model"].predict_embedding(c["rna"][:10], c["za"][:9])
    with pytest.raises(BadInputError, match="columns but the model was built for"):
        c["model"].predict_embedding(c["rna"][:10, :5], c["za"][:10])


def test_pearson_scores_match_scipy():
    rng = np.random.default_rng(1)
    pred, true = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    expected = [scipy.stats.pearsonr(pred[:, j], true[:, j])[0] for j in range(4)]
    np.testing.assert_allclose(crossmodal.pearson_per_feature(pred, true), expected)
    np.testing.assert_allclose(crossmodal.pearson_per_cell(pred, true)[3], scipy.stats.pearsonr(pred[3], true[3])[0])
    # a constant prediction has no correlation (0: it cannot be left out of a method's mean to its
    # advantage); a constant measurement has nothing to predict (NaN, out of every method's mean)
    pred[:, 0] = 1.0
    true[:, 1] = 2.0
    r = crossmodal.pearson_per_feature(pred, true)
    assert r[0] == 0.0 and np.isnan(r[1])


def test_rna_predicted_from_protein_alone_beats_a_random_pairing(paired_cells):
    """The predictor the other way (protein CLR + its shared embedding -> RNA's), as align trains it for
    rna_from_protein, and BLEEP's top-k retrieval through the shared space."""
    c, test = paired_cells, paired_cells["test"]
    reverse = CrossModalPredictor(12, 8, 10, n_hidden=64)
    reverse.fit(c["prot"][:450], c["zb"][:450], c["za"][:450], c["rna"][:450], epochs=40, batch_size=128,
                lr=3e-3, device=CPU, seed=0)
    r = crossmodal.pearson_per_feature(reverse.predict_values(c["prot"][test], c["zb"][test]), c["rna"][test])
    bleep = crossmodal.bleep_predict(c["zb"][test], c["za"][:450], c["rna"][:450])
    r_bleep = crossmodal.pearson_per_feature(bleep, c["rna"][test])
    shuffled = crossmodal.pearson_per_feature(c["rna"][:100], c["rna"][test])
    assert np.mean(r) > 0.7 and np.mean(r_bleep) > 0.7 and abs(np.mean(shuffled)) < 0.2


def test_bleep_averages_the_reference_cells_nearest_in_the_shared_space():
    reference = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    values = np.array([[1.0], [3.0], [10.0], [100.0]])
    # cosine: the query (2, 0.1) lies nearest the first two, whatever its norm
    np.testing.assert_allclose(crossmodal.bleep_predict(np.array([[2.0, 0.1]]), reference, values, k=2), [[2.0]])
    np.testing.assert_allclose(crossmodal.bleep_predict(np.array([[0.0, 5.0]]), reference, values, k=1), [[10.0]])
    # k beyond the reference is the reference's mean
    np.testing.assert_allclose(crossmodal.bleep_predict(np.array([[0.0, 5.0]]), reference, values, k=50), [[28.5]])


def test_baselines_recover_a_linear_map_and_random_does_not():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 6))
    y = x @ rng.normal(size=(6, 5)) + 0.1 * rng.normal(size=(400, 5))
    for predict in (crossmodal.ridge_predict, crossmodal.knn_predict):
        r = crossmodal.pearson_per_feature(predict(x[:300], y[:300], x[300:]), y[300:])
        assert np.mean(r) > 0.8, predict
    r = crossmodal.pearson_per_feature(crossmodal.cca_predict(x[:300], y[:300], x[300:], n_components=5), y[300:])
    assert np.mean(r) > 0.8


def test_auroc_per_feature_is_scikit_learns_per_column_with_ties_and_one_class_columns():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    label = rng.random((80, 6)) < 0.3
    score = label * 0.8 + rng.normal(0, 1, label.shape)
    score[:, 2] = np.round(score[:, 2])  # ties count half, as scikit-learn counts them
    label[:, 5] = False  # a peak closed in every held-out cell: nothing to rank
    auc = crossmodal.auroc_per_feature(score, label)
    for j in range(5):
        assert auc[j] == pytest.approx(roc_auc_score(label[:, j], score[:, j]))
    assert np.isnan(auc[5])


def test_peak_scores_rank_each_methods_lsi_taken_back_to_the_peaks():
    """A method that predicts the held-out cells' own LSI scores well above one that predicts another
    cell's; the map back to peaks is the LSI's reconstruction."""
    import scipy.sparse as sp

    from virtualcell.qc import lsi, tfidf

    rng = np.random.default_rng(1)
    state = rng.normal(size=(200, 2))
    logits = -2.0 + state @ rng.normal(0, 2, (2, 300))
    counts = sp.csr_matrix(rng.binomial(2, 1 / (1 + np.exp(-logits))).astype(np.float32))
    embedding, loadings, _ = lsi(tfidf(counts), n_components=10)
    scores = crossmodal.peak_scores({"measured": None, "own": embedding, "shuffled": embedding[rng.permutation(200)]},
                                    loadings=loadings, measured=counts > 0)
    auroc = scores[crossmodal.AUROC_PER_PEAK]
    assert auroc["own"] > 0.75 and abs(auroc["shuffled"] - 0.5) < 0.05


def test_drawn_peaks_are_every_peak_or_a_sample_in_genome_order():
    import scipy.sparse as sp

    rng = np.random.default_rng(2)
    measured = sp.csr_matrix(rng.binomial(2, 0.2, (30, 50)).astype(np.float32))
    loadings, lsi = rng.normal(size=(50, 4)), rng.normal(size=(30, 4))
    every = crossmodal.drawn_peaks({"model": lsi}, loadings=loadings, measured=measured)
    np.testing.assert_array_equal(every["measured"], measured.toarray() > 0)
    np.testing.assert_allclose(every["model"], lsi @ loadings.T)
    some = crossmodal.drawn_peaks({"model": lsi}, loadings=loadings, measured=measured, max_peaks=10, seed=1)
    assert some["measured"].shape == some["model"].shape == (30, 10)
    columns = [j for j in range(50) if np.allclose(some["model"][:, 0], every["model"][:, j])]
    assert columns and set(some["measured"].ravel()) <= {0.0, 1.0}


def test_retrieval_oracles_read_the_generators_truth_and_know_more_with_the_rna_depth():
    """The oracles beside the model's matching on the built-in data: regenerated cells are the dataset's
    own, and knowing a cell's RNA depth besides its state matches its protein better than its state alone,
    both far above chance."""
    from virtualcell import retrieval_oracle, synthetic

    data = synthetic.generate(n_cells=600, n_genes=120, n_proteins=20, n_spots=20, seed=3, cells_per_condition=20)
    cells = data["prot"].obs_names[:600:3]  # control cells, as the time course holds
    truth = retrieval_oracle.protein_truth(dict(data.uns["synthetic"]), cells)
    np.testing.assert_array_equal(truth.X.toarray(), data["prot"][cells].X.toarray())
    scores = retrieval_oracle.oracle_scores(truth)
    print("oracles on 200 cells:", scores)
    assert scores["oracle"]["foscttm"] < scores["oracle_state"]["foscttm"] < 0.05
    assert scores["oracle"]["top1"] > scores["oracle_state"]["top1"] > 10 / len(cells)
    with pytest.raises(ValueError, match="not the generator's"):
        retrieval_oracle.protein_truth(dict(data.uns["synthetic"]), cells.append(pd.Index(["nobody"])))
