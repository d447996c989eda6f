"""Figures of the stages: what a user looks at in the report and in MLflow.

Each function takes arrays or a fitted model and returns a matplotlib figure;
the stages decide where it is written and logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from virtualcell.pairing import IMAGE, PATCH_SHAPE
from virtualcell.io import COUNTS_LAYER, SPATIAL


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def patches(paired, *, n: int = 24):
    """Image patches of ``n`` spots (evenly through the spots), titled with each spot's total counts."""
    plt = pyplot()
    shape = paired.mod[IMAGE].uns[PATCH_SHAPE]
    spots = np.linspace(0, paired.n_obs - 1, num=min(n, paired.n_obs)).astype(int)
    tiles = np.asarray(paired.mod[IMAGE].X)[spots].reshape(-1, *shape).transpose(0, 2, 3, 1)
    totals = np.asarray(paired.mod[SPATIAL].layers[COUNTS_LAYER][spots].sum(axis=1)).ravel()
    cols = 8
    fig, axes = plt.subplots(-(-len(spots) // cols), cols, figsize=(cols * 1.2, 1.35 * -(-len(spots) // cols)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile, total in zip(axes.ravel(), tiles, totals, strict=False):
        ax.imshow(tile)
        ax.set_title(f"{total:.0f}", fontsize=7)
    fig.suptitle("tissue image patches paired with spots (title: counts in the spot)", fontsize=9)
    return fig


def _rollout(sim, start: np.ndarray, times: Sequence[float], n_steps: int) -> list[np.ndarray]:
    path = [start]
    for k, (t0, t1) in enumerate(zip(times[:-1], times[1:], strict=True)):
        path.append(sim.simulate(path[-1], t0=float(t0), t1=float(t1), n_steps=max(n_steps // len(times), 5), seed=k))
    return path


def trajectories(sim, x: np.ndarray, t: np.ndarray, *, held: float | None, n_steps: int, space: str):
    """Cells in the first two PCs of the state space, coloured by time, with simulated paths.

    With a potential (a landscape), its height at the middle time is drawn beneath as contours:
    simulated paths should roll down into its valleys.
    """
    from sklearn.decomposition import PCA

    plt = pyplot()
    pca = PCA(n_components=2, random_state=0).fit(x)
    times = np.unique(t)
    rng = np.random.default_rng(0)
    start = x[t == times[0]]
    start = start[rng.choice(len(start), size=min(30, len(start)), replace=False)]
    path = _rollout(sim, start, times, n_steps)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pc = pca.transform(x)
    if sim.init_kwargs.get("potential"):
        lo, hi = pc.min(0), pc.max(0)
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 60), np.linspace(lo[1], hi[1], 60))
        grid = pca.inverse_transform(np.column_stack([gx.ravel(), gy.ravel()]))
        height = sim.potential(grid.astype(np.float32), float(np.median(times))).reshape(gx.shape)
        cs = ax.contourf(gx, gy, height, levels=20, cmap="Greys", alpha=0.45)
        fig.colorbar(cs, ax=ax, label="potential (landscape height)")
    sca = ax.scatter(pc[:, 0], pc[:, 1], c=t, s=3, cmap="viridis", alpha=0.5)
    if held is not None:
        h = t == held
        ax.scatter(pc[h, 0], pc[h, 1], s=3, c="crimson", alpha=0.5, label=f"held out t={held:g}")
        ax.legend(loc="best")
    lines = np.stack([pca.transform(p) for p in path], axis=1)
    for line in lines:
        ax.plot(line[:, 0], line[:, 1], color="black", linewidth=0.6, alpha=0.7)
    fig.colorbar(sca, ax=ax, label="time")
    kind = "stochastic" if sim.init_kwargs.get("stochastic") else "deterministic"
    ax.set(xlabel=f"PC1 ({space.replace('_', ' ')} space)", ylabel="PC2", title=f"simulated trajectories ({kind})")
    return fig


def evaluation(metrics: Mapping[str, Any], *, overlays: Mapping[str, Any] | None = None):
    """Held-out and extrapolated time points in pca5 against the baselines (bars: mean over seeds, error
    bars: their sd); retrieval; fates. With ``overlays`` (``{"t=2": (real, simulated, previous)}`` in
    pca5), a second row shows, per held-out time point, the simulated cells over the real ones."""
    plt = pyplot()
    overlays = dict(overlays or {})
    rows = 2 if overlays else 1
    fig = plt.figure(figsize=(15, 3.8 * rows))
    grid = fig.add_gridspec(rows, max(3, len(overlays)))
    axes = [fig.add_subplot(grid[0, i * max(3, len(overlays)) // 3:(i + 1) * max(3, len(overlays)) // 3])
            for i in range(3)]
    sim = metrics.get("simulation")
    if sim:
        blocks = [(f"t={h}", v["w1_pca5"], v.get("std", {}).get("w1_pca5", {})) for h, v in sim["holdouts"].items()]
        blocks += [(f"t={h} (extrap.)", v["w1_pca5"], v.get("std", {}).get("w1_pca5", {}))
                   for h, v in sim.get("extrapolation", {}).items()]
        methods = sorted({m for _, b, _ in blocks for m in b}, key=lambda m: (m != "model", m))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            axes[0].bar(np.arange(len(blocks)) + i * width, [b.get(method, np.nan) for _, b, _ in blocks], width,
                        yerr=[sd.get(method, 0.0) for _, _, sd in blocks], capsize=1.5, label=method)
        axes[0].set_xticks(np.arange(len(blocks)) + 0.4 - width / 2, [name for name, _, _ in blocks], fontsize=7)
        axes[0].set(ylabel="W1 to held-out cells (pca5)", title="held-out time points")
        axes[0].legend(fontsize=6, ncol=2)
    for pair_name, align_metrics in metrics.get("alignment", {}).items():
        names = ["top1", "top5", "foscttm"]
        methods = list(align_metrics["top1"])
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            axes[1].bar(np.arange(len(names)) + i * width, [align_metrics[n][method] for n in names], width,
                        label=method)
        axes[1].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        axes[1].set(title=f"{pair_name} retrieval (test {'spots' if pair_name.endswith(IMAGE) else 'cells'})")
        axes[1].legend(fontsize=7)
    fate = metrics.get("fate")
    if fate:
        names = [n for n in ("pearson_r", "auroc_committed", "calibration_error") if n in fate]
        methods = list(fate[names[0]])
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            axes[2].bar(np.arange(len(names)) + i * width, [fate[n][method] for n in names], width, label=method)
        axes[2].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        axes[2].set(title="fate probabilities vs truth")
        axes[2].legend(fontsize=7)
    for k, (name, (real, simulated, previous)) in enumerate(overlays.items()):
        ax = fig.add_subplot(grid[1, k])
        ax.scatter(previous[:, 0], previous[:, 1], s=2, c="0.8", label="previous time point")
        ax.scatter(real[:, 0], real[:, 1], s=3, c="tab:blue", alpha=0.6, label="real cells")
        ax.scatter(simulated[:, 0], simulated[:, 1], s=3, c="tab:orange", alpha=0.6, label="simulated")
        ax.set(title=f"{name}: simulated vs real", xlabel="pca5 PC1", ylabel="pca5 PC2", xticks=[], yticks=[])
        if k == 0:
            ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    return fig


def fates(coords: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None, names: Sequence[str]):
    """Cells in 2-D coloured by their predicted probability of each fate (and the true one beside)."""
    plt = pyplot()
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, len(names), figsize=(3.3 * len(names), 3.0 * rows), squeeze=False)
    for k, name in enumerate(names):
        for r, (what, probs) in enumerate([("simulated", predicted), ("true", truth)][:rows]):
            ax = axes[r, k]
            sca = ax.scatter(coords[:, 0], coords[:, 1], c=probs[:, k], s=3, cmap="magma", vmin=0, vmax=1)
            ax.set(title=f"P({name}), {what}", xticks=[], yticks=[])
    fig.colorbar(sca, ax=axes, shrink=0.8, label="probability")
    return fig


# A figure: more cells only cost time. Below scanpy's 4,096-cell switch to approximate neighbours
# (pynndescent, a numba compile per process) the neighbour graph is exact and quick.
UMAP_MAX_CELLS = 4000


def embedding_inputs(data, *, spaces: Mapping[str, str], partner: Mapping[str, str] | None = None,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays :func:`embeddings` lays out (an obsm key each, and ``MODALITIES`` for both partners'
    shared embeddings together), subsampled to ``UMAP_MAX_CELLS``, and what drawing them needs."""
    rng = np.random.default_rng(seed)
    # The cells every drawn embedding has (a cell measured in RNA alone has no joint latent, nor a
    # measured partner embedding), so that each panel shows the same cells.
    keys = [k for k in spaces.values() if k in data.obsm] + list((partner or {}).values())
    embedded = np.flatnonzero(np.all([np.isfinite(np.asarray(data.obsm[k])).all(axis=1) for k in keys], axis=0))
    cells = np.sort(rng.choice(embedded, size=min(UMAP_MAX_CELLS, len(embedded)), replace=False))
    arrays = {key: np.asarray(data.obsm[key])[cells] for key in spaces.values() if key in data.obsm}
    drawn: dict[str, Any] = {"cells": cells}
    if partner:
        names = list(partner)
        half = np.sort(cells[:: max(1, -(-len(cells) * len(names) // UMAP_MAX_CELLS))])  # both fit the cap
        arrays[MODALITIES] = np.concatenate([np.asarray(data.obsm[partner[n]])[half] for n in names])
        drawn["modality"] = np.repeat(names, len(half))
    return arrays, drawn


MODALITIES = "modalities"  # embedding_inputs' key of both modalities' shared embeddings together


def embedding_layouts(arrays: Mapping[str, np.ndarray], *, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-D UMAP (scanpy: 15-neighbour graph, then the layout) of each array (cells x dims).

    Importing umap and compiling its numba kernels takes ~30 s of one core in a fresh process;
    evaluate runs this in a second process while it scores the simulators (:mod:`virtualcell.stages`).
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    out = {}
    for name, x in arrays.items():
        view = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]), obsm={"X_emb": np.asarray(x)})
        sc.pp.neighbors(view, use_rep="X_emb", n_neighbors=15, random_state=seed)
        sc.tl.umap(view, random_state=seed)
        out[name] = np.asarray(view.obsm["X_umap"])
    return out


def start_embedding_layouts(arrays: Mapping[str, np.ndarray], *, seed: int = 0):
    """:func:`embedding_layouts` in a second process: a future of its result.

    Most of their time is importing umap and compiling its numba kernels (~30 s of one core), which
    a caller with a second core need not wait for. The process is spawned, not forked (the caller
    has torch and its thread pools loaded), with one thread each for numba and BLAS so the two
    processes share the cores: a child reads its environment when it starts, at submit.
    """
    import concurrent.futures as cf
    import multiprocessing
    import os

    pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    one = {name: "1" for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = {name: os.environ.get(name) for name in one}
    os.environ.update(one)
    try:
        future = pool.submit(embedding_layouts, arrays, seed=seed)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    pool.shutdown(wait=False)
    return future


def embeddings(data, *, spaces: Mapping[str, str], partner: Mapping[str, str] | None = None, seed: int = 0,
               layouts: Mapping[str, np.ndarray] | None = None):
    """UMAPs (scanpy) of each embedding, coloured by time, cell type and batch (the obs columns present).

    ``spaces`` maps a title to an obsm key; ``partner`` (``{"RNA": key, "protein": key}``) adds one
    UMAP of both modalities' shared embeddings together, coloured by modality: where alignment
    worked, the two are mixed. ``layouts``: :func:`embedding_layouts` of :func:`embedding_inputs`
    (the same arguments), computed elsewhere; by default here.
    """
    import pandas as pd

    plt = pyplot()
    rng = np.random.default_rng(seed)
    arrays, drawn = embedding_inputs(data, spaces=spaces, partner=partner, seed=seed)
    if layouts is None:
        layouts = embedding_layouts(arrays, seed=seed)
    obs = data.obs.iloc[drawn["cells"]]
    colours = [c for c in ("time", "celltype", "batch") if c in data.obs]
    panels = []
    for title, key in spaces.items():
        if key in data.obsm:
            panels += [(title, key, c) for c in colours or [None]]
    if partner:
        panels.append(("shared, both modalities", MODALITIES, "modality"))
    cols = max(1, len(colours))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, key, colour) in zip(axes.ravel(), panels, strict=False):
        xy = layouts[key]
        if colour == "modality":
            values = pd.Series(pd.Categorical(drawn["modality"]))
        else:
            values = obs[colour] if colour else None
        ax.axis("on")
        if values is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=2, c="0.4")
        elif pd.api.types.is_numeric_dtype(values):
            sca = ax.scatter(xy[:, 0], xy[:, 1], s=2, c=values.to_numpy(dtype=float), cmap="viridis")
            fig.colorbar(sca, ax=ax, shrink=0.7, label=colour)
        else:
            # One scatter in a random order, so that no category is hidden under the ones drawn after it.
            codes = pd.Categorical(values.astype(str))
            palette = plt.get_cmap("tab10")
            order = rng.permutation(len(xy))
            ax.scatter(xy[order, 0], xy[order, 1], s=2, c=[palette(k % 10) for k in codes.codes[order]])
            ax.legend(handles=[plt.Line2D([], [], ls="", marker="o", ms=4, color=palette(k % 10), label=name)
                               for k, name in enumerate(codes.categories)], fontsize=6, loc="best")
        ax.set(title=f"{title}: {colour}" if colour else title, xticks=[], yticks=[])
    fig.suptitle("UMAPs of the embeddings", fontsize=10)
    fig.tight_layout()
    return fig


def _partner_ranks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of ``a``, how many rows of ``b`` are nearer (Euclidean, as the top-k metrics of
    :func:`virtualcell.evaluate.retrieval_metrics` count them) than its own partner."""
    from scipy.spatial.distance import cdist

    dist = cdist(a, b)
    return (dist < np.diag(dist)[:, None]).sum(axis=1)


def alignment(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], *, labels: np.ndarray | None, partner: str,
              seed: int = 0, max_cells: int = 2000, n_matrix: int = 80):
    """Cross-modal matching of held-out cells: the retrieval curve of each method (``pairs``: method ->
    (RNA, partner) embeddings, row i with row i), and the model's RNA x partner similarity of a few
    cells sorted by label (a bright diagonal: each cell's partner is its most similar)."""
    plt = pyplot()
    rng = np.random.default_rng(seed)
    n = len(next(iter(pairs.values()))[0])
    cells = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
    fig, (curve, matrix) = plt.subplots(1, 2, figsize=(10, 4))
    ks = np.arange(1, min(100, len(cells)) + 1)
    for method, (a, b) in pairs.items():
        ranks = _partner_ranks(np.asarray(a)[cells], np.asarray(b)[cells])
        curve.plot(ks, [(ranks < k).mean() for k in ks], label=method)
    curve.set(xlabel="k", ylabel=f"partner among the k nearest (RNA -> {partner})", xscale="log",
              title=f"retrieval of held-out cells (n={len(cells)})", ylim=(0, 1))
    curve.legend(fontsize=7)
    a, b = pairs["model"]
    shown = np.sort(rng.choice(n, size=min(n, n_matrix), replace=False))
    if labels is not None:
        shown = shown[np.argsort(np.asarray(labels)[shown], kind="stable")]
    an = np.asarray(a)[shown] / np.linalg.norm(np.asarray(a)[shown], axis=1, keepdims=True).clip(1e-12)
    bn = np.asarray(b)[shown] / np.linalg.norm(np.asarray(b)[shown], axis=1, keepdims=True).clip(1e-12)
    image = matrix.imshow(an @ bn.T, cmap="viridis")
    fig.colorbar(image, ax=matrix, shrink=0.8, label="cosine similarity")
    matrix.set(xlabel=f"{partner} of cell j", ylabel="RNA of cell i", xticks=[], yticks=[],
               title="model: similarity of held-out cells" + (" (sorted by cell type)" if labels is not None else ""))
    fig.tight_layout()
    return fig


# Up to this many features get a bar each; more (genes) are drawn as each method's sorted r.
MAX_BARS = 40


def prediction(directions: Mapping[str, Mapping[str, np.ndarray]], *, names: Mapping[str, Sequence[str]] | None = None,
               max_cells: int = 2000, seed: int = 0):
    """Each direction of cross-modal prediction (``protein_from_rna``, ``atac_from_rna``, ``rna_from_protein``,
    ``rna_from_image``, ``rna_from_atac``) against the measured values of held-out cells, one row per direction.

    Left: each feature's Pearson r (over cells; for peaks, AUROC of the predicted accessibility against
    the binarised peak) for the model and each baseline; bars sorted by the model's r for a panel of
    proteins, each method's sorted from best to worst for genes and peaks. Right: predicted vs
    measured values of the model's best, median and worst feature, the identity dashed (for peaks,
    the predicted accessibility of the cells where the peak is open and where it is closed).
    ``directions`` maps a direction to ``measured`` and method -> cells x features; ``names`` a direction
    to its features' names.
    """
    from virtualcell.crossmodal import PREDICTION_KEYS, auroc_per_feature, pearson_per_feature
    from virtualcell.plan import ATAC

    plt = pyplot()
    fig = plt.figure(figsize=(15, 4.2 * len(directions)))
    grid = fig.add_gridspec(len(directions), 5)
    rng = np.random.default_rng(seed)
    for row, (direction, predictions) in enumerate(directions.items()):
        true = np.asarray(predictions["measured"])
        methods = [m for m in predictions if m != "measured"]
        # Peaks are open or closed: each method's predicted accessibility is judged by AUROC, not Pearson r.
        peaks = direction == PREDICTION_KEYS[ATAC]
        feature = "peak" if peaks else "gene" if direction.startswith("rna_from") else "protein"
        metric, chance = ("AUROC", 0.5) if peaks else ("Pearson r", 0.0)
        per_feature = auroc_per_feature if peaks else pearson_per_feature
        given = list((names or {}).get(direction, ()))
        labels = given if len(given) == true.shape[1] else [f"{feature} {j}" for j in range(true.shape[1])]
        r = {m: per_feature(np.asarray(predictions[m]), true) for m in methods}
        order = np.argsort(-np.nan_to_num(r["model"], nan=-1))
        order = order[~np.isnan(r["model"][order])]
        bars = fig.add_subplot(grid[row, :2])
        if len(order) <= MAX_BARS:
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                bars.bar(np.arange(len(order)) + i * width, r[m][order], width=width,
                         label=f"{m} (mean {np.nanmean(r[m]):.3f})")
            bars.set_xticks(np.arange(len(order)) + 0.4 - width / 2, [labels[j] for j in order], rotation=90,
                            fontsize=6)
        else:
            for m in methods:
                values = np.sort(r[m][~np.isnan(r[m])])[::-1]
                bars.plot(np.arange(len(values)), values, lw=1.2 if m == "model" else 0.8,
                          label=f"{m} (mean {np.nanmean(r[m]):.3f})")
            bars.set_xlabel(f"{feature}s, each method's sorted from best to worst")
        bars.set(ylabel=f"{metric} over held-out cells",
                 title=direction.replace("_", " ").replace("rna", "RNA").replace("atac", "ATAC") + f", per {feature}")
        bars.axhline(chance, color="k", lw=0.5)
        bars.legend(fontsize=7, ncol=2)
        cells = rng.choice(len(true), size=min(len(true), max_cells), replace=False)
        for k, j in enumerate([order[0], order[len(order) // 2], order[-1]] if len(order) else []):
            ax = fig.add_subplot(grid[row, 2 + k])
            pred = np.asarray(predictions["model"])[cells, j]
            if peaks:
                # the predicted accessibility of the cells where the peak is open, against where it is closed
                open_ = true[cells, j] > 0
                ax.hist([pred[~open_], pred[open_]], bins=20, density=True, label=["closed", "open"])
                ax.set(xlabel="predicted accessibility", ylabel="density")
                ax.set_title(f"{labels[j]}\nAUROC = {r['model'][j]:.2f}", fontsize=8)
                ax.legend(fontsize=7)
                continue
            ax.scatter(true[cells, j], pred, s=3, alpha=0.4, rasterized=True)
            lo, hi = float(min(true[cells, j].min(), pred.min())), float(max(true[cells, j].max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            ax.set(xlabel=f"measured {labels[j]}", ylabel="predicted", title=f"r = {r['model'][j]:.2f}")
    fig.tight_layout()
    return fig


def placeholder(text: str):
    """A small figure saying why there is nothing to draw (a rule's declared output still exists)."""
    fig, ax = pyplot().subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def perturbation(data, predicted: Mapping[str, np.ndarray], half_b: np.ndarray, truth, metrics: Mapping,
                 fate: Mapping | None, *, condition: str):
    """A held-out condition: real and predicted cells in pca5, predicted vs real change per gene, the
    methods' Pearson delta on the top-20 DE genes and energy distance, and the fate proportions."""
    from virtualcell import reference

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    ctrl = data.cells(data.control)
    zc = reference.project(data.x[ctrl], data.pca5)
    ax = axes[0]
    ax.scatter(zc[:, 0], zc[:, 1], s=3, c="0.8", label=f"control ({len(ctrl)})", rasterized=True)
    for name, colour in (("model", "tab:orange"), ("real", "tab:blue")):
        x = data.x[half_b] if name == "real" else predicted[name]
        z = reference.project(x, data.pca5)
        ax.scatter(z[:, 0], z[:, 1], s=6, c=colour, alpha=0.7, label=f"{name} ({len(z)})", rasterized=True)
    ax.set(title=f"{condition}: cells in pca5", xlabel="PC1", ylabel="PC2")
    ax.legend(fontsize=7, markerscale=2)

    ax = axes[1]
    delta = predicted["model"].mean(0) - truth.control_mean
    ax.scatter(truth.delta, delta, s=5, c="0.5", label="all genes")
    ax.scatter(truth.delta[truth.top], delta[truth.top], s=14, c="tab:red", label="top-20 DE")
    lim = float(np.max(np.abs(np.concatenate([truth.delta, delta])))) * 1.05 or 1.0
    ax.plot([-lim, lim], [-lim, lim], c="k", lw=0.6)
    ax.set(title="change from control (log expression)", xlabel="real", ylabel="model")
    ax.legend(fontsize=7)

    ax = axes[2]
    methods = list(metrics["pearson_delta_top20"])
    r = [metrics["pearson_delta_top20"][m] for m in methods]
    e = [metrics["edist_pca5"].get(m, np.nan) for m in methods]
    pos = np.arange(len(methods))
    ax.bar(pos - 0.2, r, 0.4, label="Pearson delta, top-20 DE (higher better)", color="tab:green")
    ax2 = ax.twinx()
    ax2.bar(pos + 0.2, e, 0.4, label="energy distance, pca5 (lower better)", color="tab:purple")
    ax.set_xticks(pos, methods, rotation=30, ha="right", fontsize=8)
    ax.set(title="model and baselines", ylim=(min(0.0, min(r)) - 0.05, 1.05))
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)

    ax = axes[3]
    if fate:
        shown = [m for m in ("true", "observed", "dynamic", "dynamic_raw", "prescient", "model", "control", "linear",
                                  "additive", "ceiling") if m in fate]
        fates = list(fate[shown[0]])
        bottom = np.zeros(len(shown))
        for f in fates:
            values = np.array([fate[m].get(f, 0.0) for m in shown])
            ax.bar(shown, values, bottom=bottom, label=f)
            bottom += values
        # dynamic / prescient: control cells of the first time point simulated to the last (under the
        # condition's landscape / knocked down, then the control's); the others move the last time point's cells.
        ax.set(title="fate proportions at the last time point", ylim=(0, 1))
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.tight_layout()
    return fig
