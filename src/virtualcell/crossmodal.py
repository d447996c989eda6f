"""Scores of the cross-modal stages on held-out cells, each beside its baselines from the same split.

- ``alignment``: retrieval of a cell's partner (model, CCA, random), as :mod:`virtualcell.evaluate` scores it;
- ``prediction``: the partner's values predicted from RNA alone (the JEPA-style predictor of align)
  against CCA, ridge and kNN regression in RNA PCA space, and a random pairing (the floor): protein
  scored by Pearson r, peaks (ATAC) by AUROC per peak of the predicted accessibility against the
  measured, binarised peak; and the
  other way, RNA (log-normalised HVGs) predicted from the partner alone (protein, or a spot's image
  patch), against the same regressions on the partner's values, a random pairing and BLEEP's
  retrieval (the mean expression of the top-k training cells whose RNA embeddings lie nearest the
  partner's embedding in the shared space);
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
from virtualcell.pairing import IMAGE, SPATIAL_CONNECTIVITIES
from virtualcell.plan import ATAC, PROT
from virtualcell.stages import (EMBED_JOINT, EMBED_RNA, PARTNER_LOADINGS, RNA_PCA, SHARED, SHARED_RNA, depth_key,
                                input_key, match_key, measured_key, predicted_key, shared_key)

PREDICTION_KEYS = {PROT: "protein_from_rna", ATAC: "atac_from_rna"}  # metrics.json prediction.<key>
RNA_FROM = {PROT: "rna_from_protein", ATAC: "rna_from_atac", IMAGE: "rna_from_image"}  # prediction.<key>, the other way
AUROC_PER_PEAK = "auroc_per_peak"  # metrics.json prediction.atac_from_rna.<metric>
PEAK_BLOCK = 4096  # peaks scored at once: a block of held-out cells x peaks is dense
MAX_DRAWN_PEAKS = 2000  # peaks the prediction figure draws (a sample of a genome's)
PREDICTED_RNA = "X_predicted_rna"  # obsm of align's output: log-normalised HVG expression from the partner alone
PREDICTED_RNA_SHARED = f"{SHARED_RNA}_predicted"  # obsm: the RNA's shared embedding from the partner alone
# kNN baselines, BLEEP's retrieval and the compression scores use the same neighbourhood size.
N_NEIGHBOURS = 15


def pearson_per_feature(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column (protein, gene) over the rows (cells).

    NaN where the measured values are constant (nothing to predict; left out of every method's mean),
    0 where only the prediction is: a method that predicts no variation has no correlation, and
    leaving it out would reward predicting a constant for the hard features.
    """
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    pp, tt = (p**2).sum(0), (t**2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / np.sqrt(pp * tt)
    return np.where(tt > 0, np.where(pp > 0, r, 0.0), np.nan)


def pearson_per_cell(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each row (cell) over the columns (proteins)."""
    return pearson_per_feature(pred.T, true.T)


def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, k: int = N_NEIGHBOURS) -> np.ndarray:
    """Mean of the ``k`` nearest training cells' values (scikit-learn's KNeighborsRegressor)."""
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=min(k, len(x_train))).fit(x_train, y_train).predict(x_test)


def cca_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, n_components: int) -> np.ndarray:
    """CCA's prediction of the partner's values (scikit-learn's CCA.predict, a reduced-rank regression).

    BLAS runs on one thread here: CCA's iterations carry the last bits of a threaded product onward
    (genes as targets: 3.5e-9 apart between 1 and 2 threads), and metrics.json must not depend on how
    many cores evaluate was given."""
    from sklearn.cross_decomposition import CCA
    from threadpoolctl import threadpool_limits

    n_components = max(1, min(n_components, x_train.shape[1], y_train.shape[1], len(x_train) - 1))
    with threadpool_limits(limits=1, user_api="blas"):
        return CCA(n_components=n_components, max_iter=1000).fit(x_train, y_train).predict(x_test)


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Linear regression with a ridge penalty chosen by leave-one-out (scikit-learn's RidgeCV), on one
    BLAS thread like :func:`cca_predict`."""
    from sklearn.linear_model import RidgeCV
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_train, y_train).predict(x_test)


def bleep_predict(z_query: np.ndarray, z_reference: np.ndarray, y_reference: np.ndarray, *,
                  k: int = N_NEIGHBOURS) -> np.ndarray:
    """BLEEP's expression from an image (Xie et al. 2023): the mean values of the ``k`` reference cells
    whose embeddings are the most similar (cosine, in the shared space) to each query's partner embedding."""
    k = max(1, min(k, len(z_reference)))
    qn = z_query / np.linalg.norm(z_query, axis=1, keepdims=True).clip(1e-12)
    rn = z_reference / np.linalg.norm(z_reference, axis=1, keepdims=True).clip(1e-12)
    top = np.argpartition(-(qn @ rn.T), k - 1, axis=1)[:, :k]
    return y_reference[top].mean(axis=1)


def _summary(pred: np.ndarray, true: np.ndarray, feature: str) -> dict[str, float]:
    return {f"pearson_per_{feature}": float(np.nanmean(pearson_per_feature(pred, true))),
            "pearson_per_cell": float(np.nanmean(pearson_per_cell(pred, true)))}


def protein_predictions(data: ad.AnnData, *, partner: str, train: np.ndarray, test: np.ndarray,
                        seed: int) -> dict[str, np.ndarray]:
    """The held-out cells' protein (for peaks, their LSI) as each method predicts it from their RNA: model,
    cca, knn, ridge, random.

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


def rna_predictions(data: ad.AnnData, *, partner: str, source: np.ndarray, train: np.ndarray, test: np.ndarray,
                    seed: int) -> dict[str, np.ndarray]:
    """The held-out cells' RNA (log-normalised HVGs, ``data.X``) as each method predicts it from the partner
    alone: model (align's predictor the other way), bleep, cca, knn, ridge, random; for spots with a
    neighbour graph also model_ring (the model's predictions averaged over the spot and its first ring).

    ``source`` is what the regressions read of the partner: the protein CLR, or the leading principal
    components of the image patches (fitted on training cells). BLEEP's retrieval ranks the training
    cells' RNA embeddings by their similarity to the held-out cell's partner embedding.
    """
    y = np.asarray(data.X.toarray() if hasattr(data.X, "toarray") else data.X, dtype=np.float64)
    x = np.asarray(source, dtype=np.float64)
    rng = np.random.default_rng(seed)
    z_partner, z_rna = np.asarray(data.obsm[shared_key(partner)]), np.asarray(data.obsm[SHARED_RNA])
    model = np.asarray(data.obsm[PREDICTED_RNA], dtype=np.float64)
    ring = {}
    if SPATIAL_CONNECTIVITIES in data.obsp:
        # The spot's prediction averaged with its first ring's, each from its own patch: the neighbour
        # graph lends the image's context, and no measured expression of any spot goes in.
        graph = data.obsp[SPATIAL_CONNECTIVITIES]
        degree = np.asarray(graph.sum(axis=1)).ravel()
        ring = {"model_ring": ((model + graph @ model) / (1.0 + degree)[:, None])[test]}
    return {
        "measured": y[test],
        "model": model[test],
        **ring,
        "bleep": bleep_predict(z_partner[test], z_rna[train], y[train]),
        "cca": cca_predict(x[train], y[train], x[test], n_components=x.shape[1]),
        "knn": knn_predict(x[train], y[train], x[test]),
        "ridge": ridge_predict(x[train], y[train], x[test]),
        "random": y[train][rng.integers(0, int(train.sum()), int(test.sum()))],
    }


def auroc_per_feature(score: np.ndarray, label: np.ndarray) -> np.ndarray:
    """AUROC of each column's score (over rows) for its binary label: the chance that a random positive
    row scores above a random negative one, ties counting half (Mann-Whitney U / (n_pos n_neg)).

    NaN where a column has one class only (nothing to rank; left out of every method's mean).
    """
    from scipy.stats import rankdata

    positive = np.asarray(label) > 0
    n_pos = positive.sum(axis=0).astype(np.float64)
    n_neg = len(positive) - n_pos
    ranks = rankdata(np.asarray(score, dtype=np.float64), axis=0)  # ties get their average rank
    u = (ranks * positive).sum(axis=0) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def peak_scores(predictions: Mapping[str, np.ndarray], *, loadings: np.ndarray,
                measured: Any) -> dict[str, dict[str, float]]:
    """``{"auroc_per_peak": {method: value}}`` from :func:`protein_predictions` of peaks' LSI: each
    method's LSI taken back to every peak through the LSI's loadings (its TF-IDF reconstruction, the
    predicted accessibility) and ranked against the measured, binarised peaks (``measured``, held-out
    cells x peaks, sparse), averaged over the peaks open in some held-out cells and closed in others.

    The same map for every method, so methods differ only in the LSI they predict from RNA."""
    import scipy.sparse as sp

    measured = sp.csr_matrix(measured)
    loadings = np.asarray(loadings, dtype=np.float64)
    per_method: dict[str, list[np.ndarray]] = {m: [] for m in predictions if m != "measured"}
    for start in range(0, loadings.shape[0], PEAK_BLOCK):
        block = slice(start, start + PEAK_BLOCK)
        label = measured[:, block].toarray()
        for method, lsi in predictions.items():
            if method != "measured":
                per_method[method].append(auroc_per_feature(np.asarray(lsi) @ loadings[block].T, label))
    return {AUROC_PER_PEAK: {m: float(np.nanmean(np.concatenate(v))) for m, v in per_method.items()}}


def drawn_peaks(predictions: Mapping[str, np.ndarray], *, loadings: np.ndarray, measured: Any,
                max_peaks: int = MAX_DRAWN_PEAKS, seed: int = 0) -> dict[str, np.ndarray]:
    """What the prediction figure draws of peaks: ``measured`` (held-out cells x peaks, binarised, dense)
    and each method's predicted accessibility of the same peaks; every peak up to ``max_peaks``, else a
    random sample of them in genome order (dense, so a genome's 10^5 peaks are not all drawn)."""
    n_peaks = loadings.shape[0]
    peaks = np.arange(n_peaks)
    if n_peaks > max_peaks:
        peaks = np.sort(np.random.default_rng(seed).choice(n_peaks, size=max_peaks, replace=False))
    kept = np.asarray(loadings, dtype=np.float64)[peaks]
    out = {"measured": (measured[:, peaks].toarray() > 0).astype(np.float32)}
    return out | {m: np.asarray(v) @ kept.T for m, v in predictions.items() if m != "measured"}


def prediction_scores(predictions: Mapping[str, np.ndarray], *, feature: str = "protein") -> dict[str, dict[str, float]]:
    """``{metric: {method: value}}`` from :func:`protein_predictions` (``feature`` protein) or
    :func:`rna_predictions` (gene): mean Pearson r per feature over cells, and per cell over features."""
    true = predictions["measured"]
    per_method = {name: _summary(pred, true, feature) for name, pred in predictions.items() if name != "measured"}
    return {metric: {name: scores[metric] for name, scores in per_method.items()}
            for metric in (f"pearson_per_{feature}", "pearson_per_cell")}


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
    # Scored on the cells every space embeds (the joint VAE has no latent for a cell without protein),
    # so that the spaces are compared on the same cells.
    embedded = np.all([np.isfinite(np.asarray(data.obsm[k])).all(axis=1) for k in spaces.values()], axis=0)
    train, test = train & embedded, test & embedded
    for name, key in spaces.items():
        x = np.asarray(data.obsm[key], dtype=np.float64)
        knn = KNeighborsClassifier(n_neighbors=N_NEIGHBOURS).fit(x[train], fate[train])
        out["knn_fate"][name] = float(knn.score(x[test], fate[test]))
        out["r2_latent"][name] = float(r2_score(latent[test], knn_predict(x[train], latent[train], x[test])))
    return out


def score(data: ad.AnnData, *, partner: str, train: np.ndarray, test: np.ndarray,
          seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json sections of the cross-modal stages, and the arrays their figures draw.

    Returns ``(sections, drawn)``: ``sections`` holds ``alignment`` and, when align trained its predictors,
    ``energy`` and ``prediction`` (protein from RNA; RNA from protein or from the image); with the truth
    also ``compression``. ``drawn`` holds the retrieval pairs (``pairs``) and the held-out cells'
    predictions (``predictions``: direction -> method -> cells x features) that the figures draw.
    """

    from virtualcell.pairing import has_partner

    # Every cross-modal score needs both measurements: cells measured in RNA alone sit out
    # (compression, which reads embeddings only, keeps them where the embedding exists).
    paired = has_partner(data.obs)
    all_train, all_test = train, test
    train, test = train & paired, test & paired
    za, zb = data.obsm[SHARED_RNA], data.obsm[shared_key(partner)]
    xa, xb = np.asarray(data.obsm[EMBED_RNA]), np.asarray(data.obsm[input_key(partner)])
    if partner == IMAGE:
        # CCA on thousands of pixels of a few hundred spots only memorises; the linear baseline
        # sees the patches' leading principal components, fitted on training spots.
        xb = ev.pca_features(xb, fit=train, n_components=za.shape[1])
    ca, cb = xa, xb
    if match_key("rna") in data.obsm:
        # The aligner read each cell's depth in both modalities: cells are matched in its depth-aware
        # embedding, and CCA reads the same inputs.
        za, zb = data.obsm[match_key("rna")], data.obsm[match_key(partner)]
        ca = np.hstack([xa, data.obs[[depth_key("rna")]].to_numpy(np.float64)])
        cb = np.hstack([xb, data.obs[[depth_key(partner)]].to_numpy(np.float64)])
    cca = ev.cca_embedding(ca[train], cb[train], ca[test], cb[test], n_components=za.shape[1])
    pairs = {"model": (za[test], zb[test]), "cca": cca, "random": ev.random_embedding(za[test], seed=seed)}
    sections: dict[str, Any] = {"alignment": {f"rna-{partner}": ev.compare_retrieval(pairs)}}
    from virtualcell import retrieval_oracle
    from virtualcell.representation import generator_params

    params = generator_params(data)
    if partner == PROT and params is not None and 5 < test.sum() <= retrieval_oracle.MAX_CELLS:
        # Built-in data: the best any method could match these cells (the generator's truth; see the module)
        truth = retrieval_oracle.protein_truth(params, data.obs_names[test])
        for oracle, values in retrieval_oracle.oracle_scores(truth).items():
            for metric, value in values.items():
                sections["alignment"][f"rna-{partner}"][metric][oracle] = value
    drawn: dict[str, Any] = {"pairs": pairs}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    if predicted_key(partner) in data.obsm:
        sections["energy"] = energy_scores(data, partner=partner, test=test, seed=seed)
        if partner == ATAC:
            # Peaks are scored per peak on every peak, and drawn from a sample of them.
            lsi = protein_predictions(data, partner=partner, train=train, test=test, seed=seed)
            loadings, measured = data.uns[PARTNER_LOADINGS], data.obsm[measured_key(ATAC)][np.flatnonzero(test)]
            sections["prediction"] = {PREDICTION_KEYS[ATAC]: peak_scores(lsi, loadings=loadings, measured=measured)}
            predictions[PREDICTION_KEYS[ATAC]] = drawn_peaks(lsi, loadings=loadings, measured=measured, seed=seed)
        elif partner != IMAGE:
            predictions[PREDICTION_KEYS.get(partner, f"{partner}_from_rna")] = protein_predictions(
                data, partner=partner, train=train, test=test, seed=seed)
    if PREDICTED_RNA in data.obsm and data.n_vars:
        predictions[RNA_FROM.get(partner, f"rna_from_{partner}")] = rna_predictions(
            data, partner=partner, source=xb, train=train, test=test, seed=seed)
    if predictions:
        drawn["predictions"] = predictions
        sections.setdefault("prediction", {}).update({
            key: prediction_scores(pred, feature="gene" if key.startswith("rna_from") else "protein")
            for key, pred in predictions.items() if key != PREDICTION_KEYS[ATAC]})
    spaces = {"rna": EMBED_RNA, "shared": SHARED}
    if EMBED_JOINT in data.obsm:
        spaces = {"rna": EMBED_RNA, "joint": EMBED_JOINT, "shared": SHARED}
    compression = compression_scores(data, spaces, train=all_train, test=all_test)
    if compression:
        sections["compression"] = compression
    return sections, drawn


def _train_predictor(arrays: list[np.ndarray], *, split: np.ndarray, paired: np.ndarray, params: Mapping[str, Any],
                     device: str, run, prefix: str, what: str):
    """A :class:`~virtualcell.models.predictor.CrossModalPredictor` fitted on the paired training cells of
    ``arrays`` (source features, source and target shared embeddings, target values), keeping its best
    validation epoch; its epochs log as ``<prefix>.<metric>``."""
    import functools

    from virtualcell.models.predictor import CrossModalPredictor
    from virtualcell.stages import _fit, say

    train, val = (split == "train") & paired, (split == "val") & paired
    model = CrossModalPredictor(arrays[0].shape[1], arrays[1].shape[1], arrays[3].shape[1],
                                n_hidden=params["n_hidden"], dropout=params["dropout"])
    say(f"align: JEPA-style predictor {what} on {int(train.sum())} cells")
    _fit(functools.partial(model.fit, *(a[train] for a in arrays),
                           validation=tuple(a[val] for a in arrays) if val.sum() > 1 else None,
                           epochs=params["predictor_epochs"], batch_size=params["batch_size"], lr=params["lr"],
                           seed=params["seed"], device=device),
         run=run, prefix=prefix, checkpoint=None, every=0)
    if model.best_epoch is not None:
        run.log_metrics({f"{prefix}.best_epoch": float(model.best_epoch)})
        say(f"align: the predictor {what} keeps epoch {model.best_epoch} (lowest validation error)")
    return model


def predict_partner(out: ad.AnnData, partner: str, *, params: Mapping[str, Any], device: str, run,
                    path: str, rna_path: str | None = None) -> None:
    """Train the partner's predictor from RNA on the training cells, and (``rna_path``) RNA's predictor from
    the partner; record what they predict for every cell.

    From RNA: ``obsm["X_predicted_<partner>"]`` (the partner's values from RNA alone),
    ``obsm["X_shared_<partner>_predicted"]`` (its shared embedding from RNA alone) and ``obs["pair_energy"]``
    (how far the measured partner is from the predicted one: a cell's two measurements that do not agree
    score high). From the partner: ``obsm["X_predicted_rna"]``, the log-normalised HVG expression of
    ``out.X`` predicted from the protein or the image patch alone, and ``obsm["X_shared_rna_predicted"]``.
    The partner's features it reads are the protein CLR, or the image patches' leading principal
    components (fitted on training cells: a few hundred spots cannot fit a network on every pixel).
    """
    from virtualcell import io
    from virtualcell.pairing import has_partner
    from virtualcell.stages import ENERGY

    split = out.obs["split"].to_numpy()
    # Cells measured in RNA alone (NaN partner rows) are not trained on; their partner is predicted.
    paired = has_partner(out.obs)
    arrays = [np.asarray(out.obsm[k], dtype=np.float32)
              for k in (EMBED_RNA, SHARED_RNA, shared_key(partner), input_key(partner))]
    model = _train_predictor(arrays, split=split, paired=paired, params=params, device=device, run=run,
                             prefix="align/predictor", what=f"RNA -> {partner}")
    predicted = model.predict_embedding(arrays[0], arrays[1])
    out.obsm[predicted_key(partner)] = model.decode(predicted)
    out.obsm[f"{shared_key(partner)}_predicted"] = predicted
    out.obs[ENERGY] = np.sum((predicted - arrays[2]) ** 2, axis=1)  # NaN without a measured partner
    io.atomic_write(path, model.save)
    run.log_artifact(path, artifact_path="models")
    if rna_path is None:
        return
    features = arrays[3]
    if partner == IMAGE:
        features = ev.pca_features(features, fit=split == "train", n_components=arrays[1].shape[1])
    features = features.astype(np.float32)
    expression = np.asarray(out.X.toarray() if hasattr(out.X, "toarray") else out.X, dtype=np.float32)
    reverse = _train_predictor([features, arrays[2], arrays[1], expression], split=split, paired=paired,
                               params=params, device=device, run=run, prefix="align/predictor_rna",
                               what=f"{partner} -> RNA ({expression.shape[1]} genes)")
    # Cells without a measured partner have nothing to predict their RNA from (NaN rows).
    predicted = np.full_like(arrays[1], np.nan)
    predicted[paired] = reverse.predict_embedding(features[paired], arrays[2][paired])
    values = np.full_like(expression, np.nan)
    values[paired] = reverse.decode(predicted[paired])
    out.obsm[PREDICTED_RNA] = values
    out.obsm[PREDICTED_RNA_SHARED] = predicted
    io.atomic_write(rna_path, reverse.save)
    run.log_artifact(rna_path, artifact_path="models")
