"""The representation stages: embed (the VAEs of the expression and of expression + protein, and the
reference spaces pca5 and RNA PCA) and align (CLIP into a shared space, then the cross-modal predictors).

Like :mod:`virtualcell.stages`, whose DAG nodes these two are, each function reads its inputs, calls
the method modules (``models.vae``, ``models.contrastive``, :mod:`virtualcell.crossmodal`), writes its
outputs atomically and logs through the :class:`virtualcell.tracking.JobRun` it is given.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell import figures, io, reference, synthetic
from virtualcell.errors import InputError
from virtualcell.io import ATAC, COUNTS_LAYER, LSI_KEY, LSI_LOADINGS, PROT
from virtualcell.pairing import (IMAGE, PATCH_SHAPE, SPATIAL_CONNECTIVITIES, SPATIAL_DISTANCES, SPATIAL_NEIGHBORS,
                                 cell_partner, has_partner)
from virtualcell.stages import (CARRIED_OBS, EMBED_JOINT, EMBED_RNA, N_RNA_PCS, PARTNER, PARTNER_LOADINGS,
                                PARTNER_NAMES, PCA5, RNA_PCA, SHARED, SHARED_RNA, _counts, _dense, _fit, _network,
                                checkpoint_file, depth_key, input_key, match_key, measured_key, remove_checkpoints,
                                say, shared_key)
from virtualcell.tracking import JobRun

# What each partner's projection head reads (:func:`partner_values`), for messages and figures.
HEAD_INPUT = {PROT: "protein CLR", ATAC: "peaks' LSI", IMAGE: "image patches"}


def partner_values(partner_data: ad.AnnData, partner: str) -> np.ndarray:
    """What the partner's projection head reads, one row per cell: the protein CLR and the flattened
    image patches are QC's and pair's ``X``; for peaks, QC's LSI of their TF-IDF (``obsm["X_lsi"]``).

    The LSI rather than the peaks themselves: tens of dense, depth-normalised components instead of
    10^4-10^5 sparse, mostly-zero peaks (a head on the raw peaks would be mostly first-layer weights,
    and every cell's few hundred open peaks a noisy sample of its state); it is the input Signac and
    scGLUE align multiome cells on, and the one a linear baseline (CCA) can fit on a few hundred
    cells. All components are kept, the depth-following first one included: the head can learn to
    ignore it, and the predictor's LSI goes back to every peak through all the loadings.
    """
    if partner == ATAC:
        return np.asarray(partner_data.obsm[LSI_KEY], dtype=np.float32)
    return _dense(partner_data.X)


def _log_depths(paired, partner: str, cells: pd.Index, has: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each cell's log(1 + total counts) in RNA and in its partner (NaN where it has none), or None where
    there are no counts to take them from (an image partner; RNA or a partner without raw counts)."""
    expression = paired.mod[io.expression_modality(paired)]
    if partner == IMAGE or io.values_of(expression) != "counts" or COUNTS_LAYER not in paired.mod[partner].layers:
        return None

    def log_total(data: ad.AnnData) -> np.ndarray:
        return np.log1p(np.asarray(data.layers[COUNTS_LAYER].sum(axis=1), dtype=np.float64).ravel())

    rna = log_total(expression[cells]).astype(np.float32)
    other = np.full(len(cells), np.nan, dtype=np.float32)
    other[has] = log_total(paired.mod[partner][cells[has]])
    return rna, other


def _model_inputs(paired) -> tuple[Any, Any, pd.DataFrame, str]:
    """Expression counts (HVGs) of cells or spots, the partner's counts (protein, peaks) when there are
    any, the obs carried on, and the RNA block's likelihood.

    Counts stay sparse (CSR) when stored sparse: the encoders densify a minibatch of rows at a time.
    Normalised or log values (``datasets.<name>.values``) have no counts: the encoder reads QC's log
    expression and models it with a Gaussian likelihood.
    """
    rna = paired.mod[io.expression_modality(paired)]
    hvg = rna.var["highly_variable"].to_numpy() if "highly_variable" in rna.var else slice(None)
    counts = io.values_of(rna) == "counts"
    x_rna = _counts((rna.layers[COUNTS_LAYER] if counts else rna.X)[:, hvg])
    # The partner's rows are the paired cells (obs["modalities"]), in the RNA's order.
    partner = cell_partner(paired)
    x_prot = _counts(paired.mod[partner].layers[COUNTS_LAYER]) if partner else None
    obs = rna.obs[[c for c in CARRIED_OBS if c in rna.obs]].copy()
    return x_rna, x_prot, obs, "nb" if counts else "gaussian"


def _carry_graph(source: ad.AnnData, out: ad.AnnData) -> None:
    """The spots' neighbour graph (pair's, in squidpy's layout) onto a later stage's output, same spots in order."""
    if SPATIAL_CONNECTIVITIES in source.obsp:
        if not source.obs_names.equals(out.obs_names):
            raise ValueError("the spatial graph's spots differ from the output's")  # a bug, not bad input
        for key in (SPATIAL_CONNECTIVITIES, SPATIAL_DISTANCES):
            out.obsp[key] = source.obsp[key]
        out.uns[SPATIAL_NEIGHBORS] = dict(source.uns[SPATIAL_NEIGHBORS])


def _reference_space(paired, out: ad.AnnData) -> None:
    """The literature's space (pca5) of every cell, and what scoring needs, on the embedding file.

    ``obsm["X_pca5"]``, ``uns["pca5"]`` (the projection, the genes QC kept and their normalisation),
    ``obsm["X_rna_pca"]`` (30 PCs of the same genes, for the baselines of cross-modal prediction),
    and on generated data the truth: ``obsm["truth_latent"]`` and ``uns["synthetic"]``.
    """
    rna = paired.mod[io.expression_modality(paired)]
    hvg = rna.var["highly_variable"].to_numpy() if "highly_variable" in rna.var else np.ones(rna.n_vars, bool)
    target_sum = rna.uns.get("normalize_total", {}).get("target_sum")
    # One PCA of all cells' RNA serves both spaces: pca5 is its first 5 components, whitened; the
    # cross-modal baselines read 30, unwhitened (no labels or protein go in, so nothing of a held-out
    # cell's partner leaks).
    pcs = reference.fit(rna.X[:, hvg], rna.var_names[hvg], n_components=N_RNA_PCS, target_sum=target_sum,
                        values=io.values_of(rna))
    ref = reference.leading(pcs)
    out.obsm[PCA5] = reference.project(rna.X[:, hvg], ref).astype(np.float32)
    out.obsm[RNA_PCA] = (reference.project(rna.X[:, hvg], pcs) * pcs["scale"]).astype(np.float32)
    out.uns[reference.KEY] = reference.to_uns(ref) | {"all_genes": np.asarray(rna.var_names, dtype=str)}
    if synthetic.LATENT_KEY in rna.obsm:
        out.obsm[synthetic.LATENT_KEY] = np.asarray(rna.obsm[synthetic.LATENT_KEY])
    if synthetic.PARAMS_KEY in paired.uns:
        out.uns[synthetic.PARAMS_KEY] = json.dumps(dict(paired.uns[synthetic.PARAMS_KEY]), default=_jsonable)
    say(f"embed: pca5 of {int(hvg.sum())} genes explains "
        f"{100 * float(np.sum(ref['explained_variance_ratio'])):.1f}% of their variance")


def _jsonable(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else str(v)


def generator_params(data: ad.AnnData) -> dict[str, Any] | None:
    """The generator's parameters when the data are the built-in synthetic data, else None."""
    value = data.uns.get(synthetic.PARAMS_KEY)
    return json.loads(value) if isinstance(value, str) else None


def embed(*, input: str, output: str, rna_model: str, joint_model: str, figure: str,
          params: Mapping[str, Any], device: str, run: JobRun, checkpoint_every: int = 0) -> None:
    from virtualcell.models.vae import CountEncoder

    if params["method"] != "nb_vae":
        raise InputError(f"config embed.method: unknown method '{params['method']}'; use nb_vae")
    paired = io.read_h5mu(input)
    x_rna, x_prot, obs, likelihood = _model_inputs(paired)
    if likelihood != "nb":
        values = io.values_of(paired.mod[io.expression_modality(paired)])
        say(f"embed: values: {values} (no counts): the RNA likelihood is Gaussian on log expression, not the "
            "negative binomial on counts")
    run.set_tags({"embed.rna_likelihood": likelihood})
    train = (obs["split"] == "train").to_numpy()
    val = (obs["split"] == "val").to_numpy()
    module_kwargs = {k: params[k] for k in ("n_latent", "n_hidden", "n_layers", "dropout")}
    fit_kwargs = {k: params[k] for k in ("epochs", "batch_size", "lr", "seed")}
    everyone = np.ones(len(obs), dtype=bool)
    blocks = {"rna": (x_rna, everyone, [x_rna.shape[1]], [likelihood], rna_model, EMBED_RNA)}
    if x_prot is not None and params["joint"]:
        # The joint encoder reads both modalities: it is fitted on, and encodes, the paired cells; a
        # cell measured in RNA alone has no joint latent (NaN), only its RNA one.
        both = has_partner(obs)
        joint = (sp.hstack([x_rna[both], x_prot], format="csr") if sp.issparse(x_rna) or sp.issparse(x_prot)
                 else np.concatenate([x_rna[both], x_prot], axis=1))
        blocks["joint"] = (joint, both, [x_rna.shape[1], x_prot.shape[1]], [likelihood, "nb"], joint_model,
                           EMBED_JOINT)
    out = ad.AnnData(obs=obs)
    _carry_graph(paired.mod[io.expression_modality(paired)], out)
    _reference_space(paired, out)
    histories = {}
    checkpoints = []
    for name, (x, rows, sizes, likelihoods, path, key) in blocks.items():
        tr, va = train[rows], val[rows]
        say(f"embed: training the {name} VAE ({' + '.join(likelihoods)} likelihood) on {int(tr.sum())} cells x "
            f"{x.shape[1]} features")
        # An all-count model keeps its saved settings as before (no likelihoods key).
        extra = {} if set(likelihoods) == {"nb"} else {"likelihoods": likelihoods}
        model = CountEncoder(sizes, **module_kwargs, **extra)
        checkpoints.append(checkpoint_file(path, every=checkpoint_every, arrays=[x[tr], x[va]],
                                           settings={"params": params, "network": _network(model)}))
        histories[name] = _fit(
            functools.partial(model.fit, x[tr], x_val=x[va] if va.any() else None, device=device, **fit_kwargs),
            run=run, prefix=f"embed/{name}", checkpoint=checkpoints[-1], every=checkpoint_every,
        )
        latent = np.full((len(obs), params["n_latent"]), np.nan, dtype=np.float32)
        latent[rows] = model.encode(x)
        out.obsm[key] = latent
        io.atomic_write(path, model.save)
        run.log_artifact(path, artifact_path="models")
    if "joint" not in blocks:
        # No protein: the joint encoder is the RNA encoder, stated rather than hidden.
        io.atomic_write(joint_model, lambda tmp: tmp.write_bytes(Path(rna_model).read_bytes()))
        out.obsm[EMBED_JOINT] = out.obsm[EMBED_RNA]
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, history in histories.items():
        ax.plot([h["loss"] for h in history], label=f"{name} train")
        if "val_loss" in history[0]:
            ax.plot([h["val_loss"] for h in history], "--", label=f"{name} val")
    ax.set(xlabel="epoch", ylabel="loss (NLL + KL)", yscale="log", title="embedding training")
    ax.legend()
    run.log_figure(fig, "embed_loss.png")
    io.write_figure(fig, figure)
    io.write_h5ad(out, output)
    remove_checkpoints(*checkpoints)


def align(*, input: str, embeddings: str, output: str, model: str, figure: str,
          params: Mapping[str, Any], device: str, run: JobRun, checkpoint_every: int = 0,
          predictor: str | None = None, rna_predictor: str | None = None) -> None:
    """Contrastive alignment of the expression with its partner modality, then (``predictor``) the
    JEPA-style predictor of the partner from the expression and (``rna_predictor``) of the expression
    from the partner (:func:`virtualcell.crossmodal.predict_partner`).

    The output's ``X`` is the cells' measured log-normalised expression of the HVGs (sparse, as QC
    stores it): what RNA predicted from the partner is scored against."""
    from virtualcell.evaluate import retrieval_metrics
    from virtualcell.models.contrastive import Aligner

    if params["method"] != "clip":
        raise InputError(f"config align.method: unknown method '{params['method']}'; use clip")
    paired = io.read_h5mu(input)
    partner = cell_partner(paired) or (IMAGE if IMAGE in paired.mod else None)
    if partner is None:
        raise InputError(
            f"{input}: nothing to align the expression with (no '{PROT}', '{ATAC}' or '{IMAGE}' modality); declare "
            "modalities [rna, prot] for CITE-seq, [rna, atac] for multiome, [spatial] for a section with its image, "
            "or [rna] to skip align"
        )
    emb = io.read_h5ad(embeddings)
    xa = np.asarray(emb.obsm[EMBED_RNA], dtype=np.float32)
    # Cells measured in RNA alone have no partner values (NaN rows): CLIP learns from the pairs.
    has = has_partner(emb.obs)
    measured = partner_values(paired.mod[partner][emb.obs_names[has]], partner)
    xb = np.full((emb.n_obs, measured.shape[1]), np.nan, dtype=np.float32)
    xb[has] = measured
    split = emb.obs["split"].to_numpy()
    train, val = (split == "train") & has, (split == "val") & has
    image_shapes = None
    if partner == IMAGE:
        image_shapes = {IMAGE: [int(v) for v in paired.mod[IMAGE].uns[PATCH_SHAPE]]}
    depths = _log_depths(paired, partner, emb.obs_names, has) if params.get("depth", True) else None
    # align.depth asks; whether it applied (not for an image partner, nor for RNA values that are not counts)
    run.set_tags({"align.depth_used": str(depths is not None).lower()})
    aligner = Aligner(
        {"rna": xa.shape[1], partner: xb.shape[1]},
        n_shared=params["n_shared"], n_hidden=params["n_hidden"], dropout=params["dropout"],
        init_temperature=params["temperature"], learn_temperature=params["learn_temperature"],
        image_shapes=image_shapes, depth=depths is not None,
    )
    # With depth, each head reads the cell's log total counts after its features (matching); the
    # embeddings without them (at the mean depth) are the cells' states.
    ia, ib = (xa, xb) if depths is None else (np.hstack([xa, depths[0][:, None]]), np.hstack([xb, depths[1][:, None]]))
    what = HEAD_INPUT[partner]
    say(f"align: CLIP expression latent ({xa.shape[1]}) <-> {what} ({xb.shape[1]}) on {int(train.sum())} "
        f"{'spots' if partner == IMAGE else 'cells'}{'' if depths is None else ', with each side log depth'}")
    checkpoint = checkpoint_file(model, every=checkpoint_every, arrays=[ia[train], ib[train], ia[val], ib[val]],
                                 settings={"params": params, "network": _network(aligner)})
    history = _fit(
        functools.partial(
            aligner.fit, ia[train], ib[train], xa_val=ia[val] if val.any() else None,
            xb_val=ib[val] if val.any() else None, epochs=params["epochs"], batch_size=params["batch_size"],
            lr=params["lr"], seed=params["seed"], device=device,
        ),
        run=run, prefix="align", checkpoint=checkpoint, every=checkpoint_every,
    )
    za = aligner.embed("rna", xa)
    zb = np.full_like(za, np.nan)
    zb[has] = aligner.embed(partner, xb[has])
    ma, mb = za, zb
    if depths is not None:
        ma = aligner.embed("rna", ia)
        mb = np.full_like(ma, np.nan)
        mb[has] = aligner.embed(partner, ib[has])
    expression = paired.mod[io.expression_modality(paired)][emb.obs_names]
    hvg = (expression.var["highly_variable"].to_numpy() if "highly_variable" in expression.var
           else np.ones(expression.n_vars, bool))
    x = expression.X[:, hvg]
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32),
                     obs=emb.obs.copy(), var=pd.DataFrame(index=expression.var_names[hvg].copy()),
                     uns=dict(emb.uns))
    _carry_graph(emb, out)
    for key in (PCA5, RNA_PCA, EMBED_JOINT, synthetic.LATENT_KEY):
        if key in emb.obsm:
            out.obsm[key] = emb.obsm[key]
    out.uns[PARTNER] = partner
    if partner in (PROT, ATAC):
        out.uns[PARTNER_NAMES] = np.asarray(paired.mod[partner].var_names, dtype=str)
    if partner == ATAC:
        # What the peaks are scored on: the LSI's way back to every peak, and the measured peaks, binarised
        # (a count of 2 is the second allele, not more accessibility), NaN-free: a row of an RNA-only cell is
        # empty and never scored (has_partner).
        peaks = paired.mod[ATAC]
        out.uns[PARTNER_LOADINGS] = np.asarray(peaks.varm[LSI_LOADINGS], dtype=np.float32)
        binary = sp.csr_matrix(peaks.layers[COUNTS_LAYER] > 0, dtype=np.float32)
        cells = np.flatnonzero(has)
        source = peaks.obs_names.get_indexer(emb.obs_names[has])
        # row i of the product: cell i's peaks; empty for a cell without them
        pick = sp.csr_matrix((np.ones(len(cells), np.float32), (cells, source)), shape=(emb.n_obs, peaks.n_obs))
        out.obsm[measured_key(partner)] = sp.csr_matrix(pick @ binary)
    out.obsm[SHARED_RNA], out.obsm[shared_key(partner)] = za, zb
    out.obsm[EMBED_RNA], out.obsm[input_key(partner)] = xa, xb
    if depths is not None:
        out.obsm[match_key("rna")], out.obsm[match_key(partner)] = ma, mb
        out.obs[depth_key("rna")], out.obs[depth_key(partner)] = depths
    test = (split == "test") & has
    metrics = retrieval_metrics(ma[test], mb[test]) if test.sum() > 5 else {}
    run.log_metrics({f"align/test_{k}": v for k, v in metrics.items()})
    if predictor:
        from virtualcell import crossmodal

        crossmodal.predict_partner(out, partner, params=params, device=device, run=run, path=predictor,
                                   rna_path=rna_predictor)
    # A cell's state: both embeddings' normalised sum. For a cell measured in RNA alone the partner's
    # is the predictor's fill-in from its RNA (without a predictor, its RNA embedding stands alone).
    fill = out.obsm.get(f"{shared_key(partner)}_predicted", np.zeros_like(za))
    both = za + np.where(has[:, None], zb, fill)
    out.obsm[SHARED] = both / np.linalg.norm(both, axis=1, keepdims=True).clip(1e-12)
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["loss"] for h in history], label="train")
    if "val_loss" in history[0]:
        ax.plot([h["val_loss"] for h in history], "--", label="val")
    ax.set(xlabel="epoch", ylabel="symmetric InfoNCE", title=f"expression <-> {what} alignment")
    ax.legend()
    run.log_figure(fig, "align_loss.png")
    io.atomic_write(model, aligner.save)
    run.log_artifact(model, artifact_path="models")
    io.write_figure(fig, figure)
    io.write_h5ad(out, output)
    remove_checkpoints(checkpoint)
    say(f"align: test retrieval {metrics}")
