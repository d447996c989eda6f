"""Scores of the cross-modal stages on held-out cells, each beside its baselines from the same split.

- ``alignment``: retrieval of a cell's partner (model, CCA, random), as :mod:`virtualcell.evaluate` scores it;
- ``prediction``: the partner's values predicted from RNA alone (the JEPA-style predictor of align)
  against CCA, ridge and kNN regression in RNA PCA space, and a random pairing (the floor);
- ``energy``: the predictor's energy of true pairs against shuffled ones;
- ``compression`` (built-in data): what the joint embedding knows of the truth that RNA alone does not,
  kNN accuracy of the true fate and R² of the true latent state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np

from virtualcell import evaluate as ev
from virtualcell import synthetic
from virtualcell.pairing import IMAGE
from virtualcell.stages import (EMBED_JOINT, EMBED_RNA, RNA_PCA, SHARED, SHARED_RNA, input_key, predicted_key,
                                shared_key)

PREDICTION_KEYS = {"prot": "protein_from_rna"}  # metrics.json prediction.<key>
# kNN baselines and the compression scores use the same neighbourhood size.
N_NEIGHBOURS = 15


def pearson_per_feature(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column (protein) over the rows (cells); NaN where either side is constant."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / denom, np.nan)


def pearson_per_cell(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each row (cell) over the columns (proteins)."""
    return pearson_per_feature(pred.T, true.T)


def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, k: int = N_NEIGHBOURS) -> np.ndarray:
    """Mean of the ``k`` nearest training cells' values (scikit-learn's KNeighborsRegressor)."""
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=min(k, len(x_train))).fit(x_train, y_train).predict(x_test)


def cca_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, n_components: int) -> np.ndarray:
    """CCA's prediction of the partner's values (scikit-learn's CCA.predict, a reduced-rank regression)."""
    from sklearn.cross_decomposition import CCA

    n_components = max(1, min(n_components, x_train.shape[1], y_train.shape[1], len(x_train) - 1))
    return CCA(n_components=n_components, max_iter=1000).fit(x_train, y_train).predict(x_test)


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Linear regression with a ridge penalty chosen by leave-one-out (scikit-learn's RidgeCV)."""
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_train, y_train).predict(x_test)


def _summary(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {"pearson_per_protein": float(np.nanmean(pearson_per_feature(pred, true))),
            "pearson_per_cell": float(np.nanmean(pearson_per_cell(pred, true)))}


def protein_predictions(data: ad.AnnData, *, partner: str, train: np.ndarray, test: np.ndarray,
                        seed: int) -> dict[str, np.ndarray]:
    """The held-out cells' protein as each method predicts it from their RNA: model, cca, knn, ridge, random.

    The baselines read the cells' RNA PCA (``obsm["X_rna_pca"]``). scikit-learn's CCA.predict is the
    baseline the issue names; it scores well below a plain ridge regression on the same PCs, so the
    ridge is reported beside it as the stronger linear baseline.
    """

    y = np.asarray(data.obsm[input_key(partner)], dtype=np.float64)
    pcs = np.asarray(data.obsm[RNA_PCA], dtype=np.float64)
    rng = np.random.default_rng(seed)
    return {
        "measured": y[test],
        "model": np.asarray(data.obsm[predicted_key(partner)], dtype=np.float64)[test],
        "cca": cca_predict(pcs[train], y[train], pcs[test], n_components=y.shape[1]),
        "knn": knn_predict(pcs[train], y[train], pcs[test]),
        "ridge": ridge_predict(pcs[train], y[train], pcs[test]),
        # The floor: a training cell's protein drawn at random for each held-out cell.
        "random": y[train][rng.integers(0, int(train.sum()), int(test.sum()))],
    }


def prediction_scores(predictions: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{metric: {method: value}}`` from :func:`protein_predictions`."""
    true = predictions["measured"]
    per_method = {name: _summary(pred, true) for name, pred in predictions.items() if name != "measured"}
    return {metric: {name: scores[metric] for name, scores in per_method.items()}
            for metric in ("pearson_per_protein", "pearson_per_cell")}


def energy_scores(data: ad.AnnData, *, partner: str, test: np.ndarray, seed: int) -> dict[str, float]:
    """Mean energy (squared distance of predicted and measured partner embeddings) of held-out true pairs
    and of the same cells paired at random: a predictor that learned the pairing scores paired << shuffled."""

    predicted = np.asarray(data.obsm[f"{shared_key(partner)}_predicted"])[test]
    measured = np.asarray(data.obsm[shared_key(partner)])[test]
    shuffled = measured[np.random.default_rng(seed).permutation(len(measured))]
    return {"paired": float(np.mean(np.sum((predicted - measured) ** 2, axis=1))),
            "shuffled": float(np.mean(np.sum((predicted - shuffled) ** 2, axis=1)))}


def compression_scores(data: ad.AnnData, spaces: Mapping[str, str], *, train: np.ndarray,
                       test: np.ndarray) -> dict[str, dict[str, float]] | None:
    """What each embedding knows of the truth (built-in data only), fitted on training cells, scored on test:
    ``knn_fate`` (accuracy of a kNN classifier of the true fate) and ``r2_latent`` (R² of a kNN regression
    of the true 2-D latent state; kNN so that a curved embedding is not penalised against a flat one)."""
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsClassifier

    if synthetic.LATENT_KEY not in data.obsm or "fate" not in data.obs:
        return None
    latent = np.asarray(data.obsm[synthetic.LATENT_KEY], dtype=np.float64)
    fate = data.obs["fate"].astype(str).to_numpy()
    out: dict[str, dict[str, float]] = {"knn_fate": {}, "r2_latent": {}}
    for name, key in spaces.items():
        x = np.asarray(data.obsm[key], dtype=np.float64)
        knn = KNeighborsClassifier(n_neighbors=N_NEIGHBOURS).fit(x[train], fate[train])
        out["knn_fate"][name] = float(knn.score(x[test], fate[test]))
        out["r2_latent"][name] = float(r2_score(latent[test], knn_predict(x[train], latent[train], x[test])))
    return out


def score(data: ad.AnnData, *, partner: str, train: np.ndarray, test: np.ndarray,
          seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json sections of the cross-modal stages, and the arrays their figures draw.

    Returns ``(sections, drawn)``: ``sections`` holds ``alignment`` and, when align trained a predictor,
    ``energy`` and (protein) ``prediction``; with the truth also ``compression``. ``drawn`` holds the
    retrieval pairs (``pairs``) and the protein predictions (``predictions``) of the held-out cells.
    """

    za, zb = data.obsm[SHARED_RNA], data.obsm[shared_key(partner)]
    xa, xb = np.asarray(data.obsm[EMBED_RNA]), np.asarray(data.obsm[input_key(partner)])
    if partner == IMAGE:
        # CCA on thousands of pixels of a few hundred spots only memorises; the linear baseline
        # sees the patches' leading principal components, fitted on training spots.
        xb = ev.pca_features(xb, fit=train, n_components=za.shape[1])
    cca = ev.cca_embedding(xa[train], xb[train], xa[test], xb[test], n_components=za.shape[1])
    pairs = {"model": (za[test], zb[test]), "cca": cca, "random": ev.random_embedding(za[test], seed=seed)}
    sections: dict[str, Any] = {"alignment": {f"rna-{partner}": ev.compare_retrieval(pairs)}}
    drawn: dict[str, Any] = {"pairs": pairs}
    if predicted_key(partner) in data.obsm:
        sections["energy"] = energy_scores(data, partner=partner, test=test, seed=seed)
        if partner != IMAGE:
            drawn["predictions"] = protein_predictions(data, partner=partner, train=train, test=test, seed=seed)
            sections["prediction"] = {PREDICTION_KEYS.get(partner, f"{partner}_from_rna"):
                                      prediction_scores(drawn["predictions"])}
    spaces = {"rna": EMBED_RNA, "shared": SHARED}
    if EMBED_JOINT in data.obsm:
        spaces = {"rna": EMBED_RNA, "joint": EMBED_JOINT, "shared": SHARED}
    compression = compression_scores(data, spaces, train=train, test=test)
    if compression:
        sections["compression"] = compression
    return sections, drawn


def predict_partner(out: ad.AnnData, partner: str, *, params: Mapping[str, Any], device: str, run,
                     path: str) -> None:
    """Train the partner's predictor from RNA on the training cells; record what it predicts for every cell.

    ``obsm["X_predicted_<partner>"]`` (the partner's values from RNA alone), ``obsm["X_shared_<partner>_predicted"]``
    (its shared embedding from RNA alone) and ``obs["pair_energy"]`` (how far the measured partner is from
    the predicted one: a cell's two measurements that do not agree score high).
    """
    import functools

    from virtualcell import io
    from virtualcell.models.predictor import CrossModalPredictor
    from virtualcell.stages import ENERGY, _fit, say

    split = out.obs["split"].to_numpy()
    train, val = split == "train", split == "val"
    arrays = [np.asarray(out.obsm[k], dtype=np.float32)
              for k in (EMBED_RNA, SHARED_RNA, shared_key(partner), input_key(partner))]
    model = CrossModalPredictor(arrays[0].shape[1], arrays[1].shape[1], arrays[3].shape[1],
                                n_hidden=params["n_hidden"], dropout=params["dropout"])
    say(f"align: JEPA-style predictor RNA -> {partner} on {int(train.sum())} cells")
    _fit(functools.partial(model.fit, *(a[train] for a in arrays),
                           validation=tuple(a[val] for a in arrays) if val.sum() > 1 else None,
                           epochs=params["predictor_epochs"], batch_size=params["batch_size"], lr=params["lr"],
                           seed=params["seed"], device=device),
         run=run, prefix="align/predictor", checkpoint=None, every=0)
    predicted = model.predict_embedding(arrays[0], arrays[1])
    out.obsm[predicted_key(partner)] = model.decode(predicted)
    out.obsm[f"{shared_key(partner)}_predicted"] = predicted
    out.obs[ENERGY] = np.sum((predicted - arrays[2]) ** 2, axis=1)
    if model.best_epoch is not None:
        run.log_metrics({"align/predictor.best_epoch": float(model.best_epoch)})
        say(f"align: the predictor keeps epoch {model.best_epoch} (lowest validation error of protein from RNA)")
    io.atomic_write(path, model.save)
    run.log_artifact(path, artifact_path="models")
