"""One function per DAG node: read inputs, call the method modules, write outputs atomically, log.

Each function is what a Snakemake rule runs (through ``virtualcell <stage>``)
and what a user runs by hand. Methods live in their own modules (``qc``,
``pairing``, ``models``, ``evaluate``); this module only wires files to them
and reports through the :class:`virtualcell.tracking.JobRun` it is given.
The representation nodes, embed and align, live in :mod:`virtualcell.representation`; the
perturbation nodes in :mod:`virtualcell.perturbation` and :mod:`virtualcell.perturbmap`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from virtualcell import figures, io, reference
from virtualcell.errors import InputError
from virtualcell.plan import DECODER_PARAMS, partner_modality  # noqa: F401
from virtualcell.io import ATAC, PROT, RNA
from virtualcell.pairing import IMAGE, MODALITIES_KEY, SPATIAL_CONNECTIVITIES, cell_partner, has_partner
from virtualcell.timecourse import NO_HOLDOUT, check_holdouts, observed_times, parse_holdout
from virtualcell.tracking import JobRun

# The expression latent is "X_rna" for cells and for spots alike (spots measure RNA too).
EMBED_RNA = "X_rna"
EMBED_JOINT = "X_joint"
SHARED = "X_shared"
SHARED_RNA = "X_shared_rna"
RNA_PCA = "X_rna_pca"  # 30 PCs of the log-normalised HVGs: the space of the linear and kNN baselines
N_RNA_PCS = 30
PCA5 = f"X_{reference.KEY}"  # the literature's space: 5 whitened PCs of the log-normalised HVGs
ENERGY = "pair_energy"  # obs: the predictor's squared error on a cell's measured partner embedding
# align's output: which modality the expression was aligned with
PARTNER = "partner"
PARTNER_NAMES = "partner_features"  # align's output: the names of the partner's values (the proteins, the peaks)
# align's output for peaks: the LSI loadings (peaks x components) that take LSI coordinates back to peaks
PARTNER_LOADINGS = "partner_loadings"
# obs columns carried from the paired data into the embedding files
CARRIED_OBS = ("split", "time", "batch", "condition", "celltype", "fate", MODALITIES_KEY)


def shared_key(partner: str) -> str:
    """obsm key of a partner modality's shared embedding (``X_shared_prot``, ``X_shared_image``)."""
    return f"X_shared_{partner}"


def match_key(modality: str) -> str:
    """obsm key of a modality's embedding for matching cells across modalities (``X_match_rna``): the
    aligner's embedding with each cell's own depth; written only when align reads depth (``align.depth``).
    ``X_shared_<modality>`` is then the depth-neutral embedding a cell's state is built from."""
    return f"X_match_{modality}"


def depth_key(modality: str) -> str:
    """obs column of each cell's log total counts in a modality (``log_depth_rna``), when align reads depth."""
    return f"log_depth_{modality}"


def predicted_key(partner: str) -> str:
    """obsm key of the partner's values predicted from RNA alone (``X_predicted_prot``)."""
    return f"X_predicted_{partner}"


def input_key(partner: str) -> str:
    """obsm key of the features the partner's head read (protein CLR, peaks' LSI, flattened image patches)."""
    return f"X_input_{partner}"


def measured_key(partner: str) -> str:
    """obsm key of the partner's measured features when its head reads a summary of them
    (``X_measured_atac``: the binarised peaks, sparse)."""
    return f"X_measured_{partner}"


SPACES = ("embedding", "pca")


def state_of(data: ad.AnnData, space: str = "embedding") -> tuple[str, np.ndarray]:
    """The space the simulator runs in, by name, and every cell's coordinates in it.

    ``embedding``: the shared space after an alignment, else the RNA latent; ``pca``: the
    literature's pca5 (5 whitened PCs of the log-normalised HVGs), where the simulator is
    judged like for like with published methods.
    """
    if space == "pca":
        return reference.SPACE, np.asarray(data.obsm[PCA5], dtype=np.float32)
    if space != "embedding":
        raise InputError(f"config simulate.space: unknown space '{space}'; use one of {list(SPACES)}")
    key = SHARED if SHARED in data.obsm else EMBED_RNA
    return ("shared" if key == SHARED else "rna_latent"), np.asarray(data.obsm[key], dtype=np.float32)


def say(message: str) -> None:
    """Progress for the job's log."""
    print(f"[virtualcell] {message}", file=sys.stderr, flush=True)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


# ---------------------------------------------------------------------------
# resumable training

CHECKPOINTS = ".checkpoints"


def checkpoint_file(model: str | Path, *, every: int, settings: Mapping[str, Any],
                    arrays: list[np.ndarray]) -> Path | None:
    """The file a training job saves every ``every`` epochs and resumes from; None when ``every`` is 0.

    It sits in ``.checkpoints/`` beside the model output: not a declared output, so
    Snakemake's ``--rerun-incomplete`` keeps it. A checkpoint does not record what it was
    trained on, so its name holds a hash of the settings, the network's shapes and the
    training arrays: a job never resumes from a checkpoint of other data or settings, and
    deletes such a stale one (and the temp file of an interrupted checkpoint write).
    """
    if every <= 0:
        return None
    model = Path(model)
    folder = model.parent / CHECKPOINTS
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for array in arrays:
        # A sparse matrix is hashed by its parts, without densifying it.
        parts = (array.data, array.indices, array.indptr) if sp.issparse(array) else (array,)
        digest.update(f"{array.dtype}{array.shape}".encode())
        for part in parts:
            digest.update(np.ascontiguousarray(part))
    path = folder / f"{model.stem}.{digest.hexdigest()[:16]}.pt"
    for old in [*folder.glob(f"{model.stem}.*.pt"), *folder.glob(f".{model.stem}.*.tmp")]:
        if old != path:
            say(f"deleting {old}: a checkpoint of other data or settings, or an interrupted write")
            old.unlink()
    return path


def remove_checkpoints(*paths: Path | None) -> None:
    """Once the outputs are written, a job's checkpoints (and their folder, when empty) go."""
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()


def _network(model) -> dict[str, list[int]]:
    """The parameter shapes of a model's network: part of what a checkpoint must match."""
    return {k: list(v.shape) for k, v in model.module.state_dict().items()}


def _fit(fit: Callable[..., list], *, run: JobRun, prefix: str, checkpoint: Path | None,
         every: int) -> list[dict[str, Any]]:
    """Call ``fit`` with the checkpoint and an epoch logger. Epochs restored from a checkpoint are
    logged after training, so a resumed job's run still holds every epoch."""
    log = run.epoch_logger(prefix)
    logged: set[int] = set()

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        logged.add(epoch)
        log(epoch, metrics)

    history = fit(on_epoch=on_epoch, checkpoint_path=checkpoint, checkpoint_every=every if checkpoint else 0)
    for entry in history:
        if entry["epoch"] not in logged:
            log(entry["epoch"], {k: v for k, v in entry.items() if k != "epoch"})
    return history


# ---------------------------------------------------------------------------


def ingest(*, dataset: str, spec: Mapping[str, Any], output: str, run: JobRun) -> None:
    """Read the dataset and check, before any training, what the later stages need of it: the
    declared modalities, cells in common between RNA and protein, and for the simulator at least
    3 time points with the held-out ones interior."""
    from virtualcell.pairing import paired_cells

    say(f"ingest {dataset} from {spec['source']}")
    mdata = io.read_dataset(dataset, spec)
    origin = spec.get("path") or f"synthetic dataset {dataset}"
    expression = io.expression_modality(mdata)
    paired = paired_cells(mdata, origin=origin)
    obs = mdata.mod[expression].obs
    if "condition" in obs:
        from virtualcell.perturbation import check_conditions, holdout_conditions

        control = spec.get("control", "control")
        check_conditions(obs, control=control, holdouts=holdout_conditions(dataset, spec),
                         min_cells=spec.get("min_cells_per_condition", 20),
                         origin=f"{origin} (config datasets.{dataset})")
        # The time course is the control cells' (pair keeps only them).
        obs = obs[obs["condition"].astype(str).to_numpy() == control]
    if "time" in obs:
        times = observed_times(obs, origin=origin)
        check_holdouts(spec.get("holdouts", "auto"), times, origin=f"{origin} (config datasets.{dataset}.holdouts)")
    summary: dict[str, float] = {"cells": int(mdata.n_obs)}
    for name, adata in mdata.mod.items():
        summary[f"{name}.cells"] = int(adata.n_obs)
        summary[f"{name}.features"] = int(adata.n_vars)
        if name != expression:
            # Spots of a section are other observations than the cells, so 0 is expected there.
            shared = adata.obs_names.intersection(mdata.mod[expression].obs_names)
            summary[f"{name}.paired_fraction"] = len(shared) / max(mdata.mod[expression].n_obs, 1)
    summary["paired_cells"] = len(paired)
    if "condition" in mdata.mod[expression].obs:
        summary["conditions"] = int(mdata.mod[expression].obs["condition"].nunique())
        summary |= {f"guides.{k}": v for k, v in dict(mdata.uns.get("guide_assignment", {})).items()}
    run.log_metrics({f"ingest/{k}": v for k, v in summary.items()})
    run.log_dict(summary, "ingest_summary.json")
    io.write_h5mu(mdata, output)
    say(f"wrote {output}: {summary}")


def qc(*, input: str, output: str, summary: str, figures: str, params: Mapping[str, Any], run: JobRun) -> None:
    """QC of every modality: ``output`` (.h5mu), ``summary`` (qc.json), ``figures``/{modality}.png."""
    import matplotlib.pyplot as plt

    from virtualcell.qc import qc_figures, run_qc
    from virtualcell.qc_chunked import run_qc_chunked, use_chunked

    params = dict(params)
    chunked = use_chunked(input, params.pop("chunked", "auto"))
    run.set_tags({"qc.chunked": str(chunked).lower()})
    if chunked:
        # larger than memory: read and written a block of rows at a time; the figures get the metrics
        mdata, filtered, result = run_qc_chunked(input, output, progress=say, **params)
    else:
        mdata = io.read_h5mu(input)
        say("qc on " + ", ".join(f"{name} {a.n_obs} x {a.n_vars}" for name, a in mdata.mod.items()))
        filtered, result = run_qc(mdata, origin=input, **params)
    run.set_tags({"qc.values": result["values"]})
    skipped = result["modalities"].get(RNA, {}).get("skipped")
    if skipped:
        say(f"qc: values: {result['values']}, not counts: skipped {', '.join(skipped)} (they need raw counts); "
            "highly variable genes by scanpy's seurat flavour on log values")
        run.set_tags({"qc.skipped": ", ".join(skipped)})
    run.log_metrics({f"qc/{k}": v for k, v in result.items()})
    run.log_dict(result, "qc.json")
    drawn = qc_figures(mdata, filtered, params)
    for name, fig in drawn.items():
        run.log_figure(fig, f"qc/{name}.png")
    io.write_json(result, summary)
    if not chunked:
        io.write_h5mu(filtered, output)
    io.write_figures(drawn, figures)
    for fig in drawn.values():
        plt.close(fig)
    for name, part in result["modalities"].items():
        removed = {f: sum(per_batch.values()) for f, per_batch in part.get("removed_by_filter_per_batch", {}).items()}
        how = f"removed by filter: {removed}" if removed else f"the cells {part.get('cells_follow')} kept"
        say(f"{name}: kept {part['cells_out']}/{part['cells_in']} observations, {part['features_out']}/"
            f"{part['features_in']} features; {how}")


def pair(*, input: str, output: str, split: str, params: Mapping[str, Any], run: JobRun,
         control: str | None = None) -> None:
    from virtualcell.pairing import pair as pair_cells

    mdata = io.read_h5mu(input)
    rna = mdata.mod[io.expression_modality(mdata)]
    if "condition" in rna.obs:
        # The time course is the control's: perturbed cells are the perturb stage's (from QC's output).
        if control is None:
            raise InputError(f"{input}: cells carry conditions; pass --control (the control label) so that only "
                             "control cells go on to the time course")
        keep = rna.obs_names[rna.obs["condition"].astype(str).to_numpy() == control]
        say(f"pair: {len(keep)} control cells go on to the time course; the other {rna.n_obs - len(keep)} "
            "(perturbed) are the perturb stage's")
        run.log_metrics({"pair/perturbed_cells_set_aside": rna.n_obs - len(keep)})
        mdata = mdata[mdata.obs_names.isin(keep) | ~mdata.obs_names.isin(rna.obs_names)].copy()
    paired = pair_cells(mdata, origin=input, **params)
    counts = paired.obs["split"].value_counts()
    run.log_metrics({f"pair/{s}_cells": int(n) for s, n in counts.items()} | {"pair/cells": paired.n_obs})
    partner = cell_partner(paired)
    if partner:
        # Counted per modality: cells measured in RNA alone are kept; align fills in their partner.
        rna_only = int((~has_partner(paired.mod[RNA].obs)).sum())
        run.log_metrics({"pair/cells.rna": paired.mod[RNA].n_obs, f"pair/cells.{partner}": paired.mod[partner].n_obs,
                         "pair/cells.rna_only": rna_only})
        if rna_only:
            say(f"pair: {rna_only} of {paired.mod[RNA].n_obs} cells were measured in RNA alone: kept, marked "
                f"obs['{MODALITIES_KEY}'] = 'rna'; align predicts their {partner} from their RNA")
    table = paired.obs[["split"]].copy()
    run.log_table(table, "split.tsv")
    if IMAGE in paired.mod:
        # What the aligner will see of the tissue: a sample of the spot <-> patch pairs.
        run.log_figure(figures.patches(paired), "image_patches.png")
        graph = paired.mod[io.expression_modality(paired)].obsp[SPATIAL_CONNECTIVITIES]
        degree = float(graph.sum() / max(graph.shape[0], 1))
        run.log_metrics({"pair/spatial_neighbours_per_spot": degree})
        say(f"pair: spatial neighbour graph, {degree:.2f} neighbours per spot (obsp['{SPATIAL_CONNECTIVITIES}'])")
    io.write_table(table, split)
    io.write_h5mu(paired, output)
    say(f"paired {paired.n_obs} {'spots with their image patches' if IMAGE in paired.mod else 'cells'}: "
        f"{counts.to_dict()}")


def _counts(x: Any) -> Any:
    return sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)


# sf2m, marginal and hybrid are SDEs (drift + diffusion), fitted by score and flow matching on couplings,
# by simulating and matching the next time point's cells, or by both at once; ot_cfm is an ODE.
SIMULATE_METHODS = ("ot_cfm", "sf2m", "marginal", "hybrid")
_METHOD_NAMES = {"ot_cfm": "OT flow matching (ODE)", "sf2m": "SF2M (stochastic)",
                 "marginal": "an SDE fitted by marginal matching (stochastic)",
                 "hybrid": "SF2M plus marginal matching (stochastic)"}


def simulate(*, input: str, holdout: str, seed: int, output: str, figure: str, params: Mapping[str, Any],
             device: str, run: JobRun, checkpoint_every: int = 0) -> None:
    """Fit the simulator: one seed, one held-out time point (or the last, or none)."""
    from virtualcell.models.dynamics import Simulator

    if params["method"] not in SIMULATE_METHODS:
        raise InputError(f"config simulate.method: unknown method '{params['method']}'; use one of "
                         f"{list(SIMULATE_METHODS)}")
    shared = io.read_h5ad(input)
    times = observed_times(shared.obs, origin=input)
    held = parse_holdout(holdout, times, origin=input)
    t = shared.obs["time"].to_numpy(dtype=float)
    space, x = state_of(shared, params["space"])
    keep = t != held if held is not None else np.ones(len(t), bool)
    stochastic = params["method"] in ("sf2m", "marginal", "hybrid")
    say(f"simulate: {_METHOD_NAMES[params['method']]} in the {space} space on "
        f"{int(keep.sum())} cells at times {sorted(set(t[keep].tolist()))} (held out: {holdout}, seed {seed})")
    sim = Simulator(x.shape[1], n_hidden=params["n_hidden"], n_layers=params["n_layers"],
                    potential=params["potential"], stochastic=stochastic, autonomous=params["autonomous"])
    fit_kwargs = {k: params[k] for k in ("epochs", "steps_per_epoch", "batch_size", "lr", "sigma", "kinetic",
                                         "unbalanced")}
    if stochastic:
        fit_kwargs["diffusion"] = params["diffusion"]
    if params["method"] in ("marginal", "hybrid"):
        fit_kwargs["objective"] = params["method"]
    if params["method"] == "hybrid":
        fit_kwargs["marginal_weight"] = params["marginal_weight"]
    checkpoint = checkpoint_file(output, every=checkpoint_every, arrays=[x[keep], t[keep]],
                                 settings={"params": params, "holdout": holdout, "seed": seed,
                                           "network": _network(sim)})
    _fit(functools.partial(sim.fit, x[keep], t[keep], seed=seed, device=device, **fit_kwargs),
         run=run, prefix="simulate", checkpoint=checkpoint, every=checkpoint_every)
    io.atomic_write(output, sim.save)
    run.log_artifact(output, artifact_path="models")
    remove_checkpoints(checkpoint)

    fig = figures.trajectories(sim, x, t, held=held, n_steps=params["n_steps"], space=space)
    run.log_figure(fig, "trajectories.png")
    io.write_figure(fig, figure)


def decode(*, input: str, expression: str, output: str, params: Mapping[str, Any], device: str, run: JobRun,
           checkpoint_every: int = 0) -> None:
    """Fit the decoder from the simulator's state space to log-normalised expression (the HVGs): how a
    simulated state speaks genes, and how it reaches pca5 to be judged.

    One per dataset, on the training split's cells of every time point, as the embedding it decodes
    and the pca5 projection are fitted on all cells: the representation sees every time point, the
    dynamics never see a held-out one. The validation split's cells report ``val_loss``.
    """
    from virtualcell.models.decoder import ExpressionDecoder

    shared = io.read_h5ad(input)
    space, x = state_of(shared, "embedding")
    paired = io.read_h5mu(expression)
    rna = paired.mod[io.expression_modality(paired)][shared.obs_names]
    hvg = rna.var["highly_variable"].to_numpy() if "highly_variable" in rna.var else np.ones(rna.n_vars, bool)
    expr = _counts(rna.X[:, hvg])
    split = shared.obs["split"].to_numpy()
    fit_cells, val_cells = split == "train", split == "val"
    say(f"decode: {space} -> {int(hvg.sum())} log-normalised genes on {int(fit_cells.sum())} training cells of "
        f"every time point")
    dec = ExpressionDecoder(x.shape[1], int(hvg.sum()), n_hidden=params["n_hidden"])
    checkpoint = checkpoint_file(output, every=checkpoint_every, arrays=[x[fit_cells], expr[fit_cells]],
                                 settings={"params": params, "network": _network(dec)})
    _fit(functools.partial(dec.fit, x[fit_cells], expr[fit_cells],
                           z_val=x[val_cells] if val_cells.any() else None,
                           x_val=expr[val_cells] if val_cells.any() else None, epochs=params["decoder_epochs"],
                           steps_per_epoch=params["steps_per_epoch"], batch_size=params["batch_size"],
                           lr=params["lr"], seed=params["seed"], device=device),
         run=run, prefix="decode", checkpoint=checkpoint, every=checkpoint_every)
    io.atomic_write(output, dec.save)
    run.log_artifact(output, artifact_path="models")
    remove_checkpoints(checkpoint)


def evaluate(*, shared: str, simulators: Mapping[str, Sequence[str]], output: str, figure: str, dataset: str,
             params: Mapping[str, Any], run: JobRun, space: str = "embedding", fates: str | None = None,
             fate_figure: str | None = None, decoder: str | None = None, embedding_figure: str | None = None,
             alignment_figure: str | None = None, prediction_figure: str | None = None,
             perturbations: Sequence[str] = (), threads: int = 1) -> None:
    """metrics.json: retrieval against CCA, protein from RNA (:mod:`virtualcell.crossmodal`), simulation against baselines in pca5, fates against the truth;
    the figures of these, of cross-modal matching (``alignment_figure``) and (``embedding_figure``)
    UMAPs of the embeddings.

    ``simulators`` maps each holdout (``none`` included) to its simulator files, one per seed, in
    seed order. ``decoder`` (:func:`decode`) takes simulators of the embedding space to pca5.
    """
    from virtualcell import scoring

    data = io.read_h5ad(shared)
    obs = data.obs
    split = obs["split"].to_numpy()
    train, test = split == "train", split == "test"
    seed = params["seed"]
    metrics: dict[str, Any] = {"dataset": dataset}
    overlays: dict[str, Any] = {}

    partner = data.uns.get(PARTNER)
    layouts = _start_layouts(data, partner, seed=seed, threads=threads) if embedding_figure else None
    if partner and test.sum() > 5:
        from virtualcell import crossmodal

        sections, drawn = crossmodal.score(data, partner=partner, train=train, test=test, seed=seed)
        metrics |= sections
        if alignment_figure:
            scored = test & has_partner(obs)  # the retrieval pairs are the held-out cells with both modalities
            labels = obs["celltype"].astype(str).to_numpy()[scored] if "celltype" in obs else None
            fig = figures.alignment(drawn["pairs"], labels=labels, partner=partner, seed=seed)
            run.log_figure(fig, "alignment.png")
            io.write_figure(fig, alignment_figure)
            alignment_figure = None
        if prediction_figure and "predictions" in drawn:
            fig = figures.prediction(drawn["predictions"], names={
                crossmodal.PREDICTION_KEYS.get(partner, ""): list(data.uns.get(PARTNER_NAMES, [])),
                **{key: list(data.var_names) for key in drawn["predictions"] if key.startswith("rna_from")}})
            run.log_figure(fig, "prediction.png")
            io.write_figure(fig, prediction_figure)
            prediction_figure = None

    if any(h != NO_HOLDOUT for h in simulators):
        metrics["simulation"], fate, overlays = scoring.score_simulators(data, simulators, params=params, space=space,
                                                               origin=shared, decoder=decoder)
        if fate is not None:
            scores, fate_data = fate
            if scores:
                metrics["fate"] = scores
            if fates:
                io.write_h5ad(fate_data, fates)
                run.log_artifact(fates, artifact_path="fates")
                fates = None
            if fate_figure:
                coords = fate_data.obsm[PCA5][:, :2]
                truth = fate_data.obsm.get(scoring.TRUE_FATES)
                fig = figures.fates(coords, np.asarray(fate_data.obsm[scoring.FATES]),
                                    None if truth is None else np.asarray(truth),
                                    list(fate_data.uns[scoring.FATE_NAMES]))
                run.log_figure(fig, "fates.png")
                io.write_figure(fig, fate_figure)
                fate_figure = None
    if perturbations:
        from virtualcell.perturbation import gather

        metrics["perturbation"] = gather(perturbations)
    # The rule declares both files: without fates (evaluate.fate_rollouts: 0, no time points) they
    # still exist, empty and saying why, so Snakemake finds its outputs.
    if fates:
        io.write_h5ad(ad.AnnData(uns={"note": "no fate probabilities: evaluate.fate_rollouts is 0 or no simulator"}),
                      fates)
    if fate_figure:
        io.write_figure(figures.placeholder("no fate probabilities\n(evaluate.fate_rollouts: 0, or no time points)"),
                        fate_figure)
    if alignment_figure:
        io.write_figure(figures.placeholder("no alignment\n(no partner modality, or too few test cells)"),
                        alignment_figure)
    if prediction_figure:
        io.write_figure(figures.placeholder("no cross-modal prediction\n(no partner modality, or too few test cells)"),
                        prediction_figure)
    run.log_metrics({f"evaluate/{k}": v for k, v in _flat_metrics(metrics).items()})
    run.log_dict(metrics, "metrics.json")
    if embedding_figure:
        spaces, partner_keys = _embedding_spaces(data, partner)
        fig = figures.embeddings(data, spaces=spaces, partner=partner_keys, seed=seed,
                                 layouts=layouts.result() if layouts is not None else None)
        run.log_figure(fig, "embeddings.png")
        io.write_figure(fig, embedding_figure)
    fig = figures.evaluation(metrics, overlays=overlays)
    run.log_figure(fig, "evaluation.png")
    io.write_figure(fig, figure)
    io.write_json(metrics, output)


def _embedding_spaces(data: ad.AnnData, partner: str | None) -> tuple[dict[str, str], dict[str, str] | None]:
    """The embeddings evaluate's UMAP figure shows (title -> obsm key) and the partner pair."""
    partner_keys = {"RNA": SHARED_RNA, partner: shared_key(partner)} if partner else None
    spaces = {"RNA latent": EMBED_RNA, "shared": SHARED}
    if partner in (PROT, ATAC) and EMBED_JOINT in data.obsm:
        spaces = {"RNA latent": EMBED_RNA, f"joint RNA+{'protein' if partner == PROT else 'peaks'} VAE": EMBED_JOINT,
                  "shared": SHARED}
    return spaces, partner_keys


def _start_layouts(data: ad.AnnData, partner: str | None, *, seed: int, threads: int):
    """With a second thread, the embedding figure's UMAP layouts start in a second process (a future) while
    evaluate scores the simulators in this one, which keeps one thread; None: laid out when drawn."""
    if threads < 2:
        return None
    import torch

    torch.set_num_threads(max(1, threads - 1))
    spaces, partner_keys = _embedding_spaces(data, partner)
    arrays, _ = figures.embedding_inputs(data, spaces=spaces, partner=partner_keys, seed=seed)
    return figures.start_embedding_layouts(arrays, seed=seed)


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            flat.update(_flat_metrics(v, name))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            # MLflow keys take letters, digits, _ - . / and spaces: a combination's '+' becomes '_plus_'.
            flat[name.replace("-", "_").replace("+", "_plus_")] = float(v)
    return flat
