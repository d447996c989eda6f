"""One function per DAG node: read inputs, call the method modules, write outputs atomically, log.

Each function is what a Snakemake rule runs (through ``virtualcell <stage>``)
and what a user runs by hand. Methods live in their own modules (``qc``,
``pairing``, ``models``, ``evaluate``); this module only wires files to them
and reports through the :class:`virtualcell.tracking.JobRun` it is given.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from virtualcell import io
from virtualcell.errors import InputError
from virtualcell.io import COUNTS_LAYER, PROT, RNA, SPATIAL
from virtualcell.pairing import IMAGE, PATCH_SHAPE
from virtualcell.tracking import JobRun

# The expression latent is "X_rna" for cells and for spots alike (spots measure RNA too).
EMBED_RNA = "X_rna"
EMBED_JOINT = "X_joint"
SHARED = "X_shared"
SHARED_RNA = "X_shared_rna"
# align's output: which modality the expression was aligned with
PARTNER = "partner"
NO_HOLDOUT = "none"
# obs columns carried from the paired data into the embedding files
CARRIED_OBS = ("split", "time", "batch", "condition", "celltype", "fate")


def shared_key(partner: str) -> str:
    """obsm key of a partner modality's shared embedding (``X_shared_prot``, ``X_shared_image``)."""
    return f"X_shared_{partner}"


def input_key(partner: str) -> str:
    """obsm key of the features the partner's head read (protein CLR, flattened image patches)."""
    return f"X_input_{partner}"


def partner_modality(modalities: list[str]) -> str | None:
    """What a dataset's expression is aligned with, from its declared modalities.

    ``prot`` when cells have protein counts; ``image`` (patches of the tissue image under each
    spot) for a spatial dataset without single-cell RNA; None for RNA alone (no alignment).
    """
    if RNA in modalities:
        return PROT if PROT in modalities else None
    if SPATIAL in modalities:
        return IMAGE
    raise InputError(f"{list(modalities)} has no expression modality; add rna (cells) or spatial (spots)")


def state_of(data: ad.AnnData) -> tuple[str, np.ndarray]:
    """The space the simulator runs in: the shared space after an alignment, else the RNA latent."""
    key = SHARED if SHARED in data.obsm else EMBED_RNA
    return ("shared" if key == SHARED else "rna_latent"), np.asarray(data.obsm[key], dtype=np.float32)


def say(message: str) -> None:
    """Progress for the job's log."""
    print(f"[virtualcell] {message}", file=sys.stderr, flush=True)


def holdout_label(time: float) -> str:
    """The {holdout} wildcard of a time point: 2.0 -> '2', 0.5 -> '0.5'."""
    return f"{float(time):g}"


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    if "time" in mdata.mod[expression].obs:
        times = observed_times(mdata.mod[expression].obs, origin=origin)
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
    run.log_metrics({f"ingest.{k}": v for k, v in summary.items()})
    run.log_dict(summary, "ingest_summary.json")
    io.write_h5mu(mdata, output)
    say(f"wrote {output}: {summary}")


def qc(*, input: str, output: str, summary: str, figures: str, params: Mapping[str, Any], run: JobRun) -> None:
    """QC of every modality: ``output`` (.h5mu), ``summary`` (qc.json), ``figures``/{modality}.png."""
    import matplotlib.pyplot as plt

    from virtualcell.qc import qc_figures, run_qc

    mdata = io.read_h5mu(input)
    say("qc on " + ", ".join(f"{name} {a.n_obs} x {a.n_vars}" for name, a in mdata.mod.items()))
    filtered, result = run_qc(mdata, origin=input, **params)
    run.log_metrics({f"qc.{k}": v for k, v in result.items()})
    run.log_dict(result, "qc.json")
    drawn = qc_figures(mdata, filtered, params)
    for name, fig in drawn.items():
        run.log_figure(fig, f"qc/{name}.png")
    io.write_json(result, summary)
    io.write_h5mu(filtered, output)
    io.write_figures(drawn, figures)
    for fig in drawn.values():
        plt.close(fig)
    for name, part in result["modalities"].items():
        removed = {f: sum(per_batch.values()) for f, per_batch in part.get("removed_by_filter_per_batch", {}).items()}
        how = f"removed by filter: {removed}" if removed else f"the cells {part.get('cells_follow')} kept"
        say(f"{name}: kept {part['cells_out']}/{part['cells_in']} observations, {part['features_out']}/"
            f"{part['features_in']} features; {how}")


def pair(*, input: str, output: str, split: str, params: Mapping[str, Any], run: JobRun) -> None:
    from virtualcell.pairing import pair as pair_cells

    mdata = io.read_h5mu(input)
    paired = pair_cells(mdata, origin=input, **params)
    counts = paired.obs["split"].value_counts()
    run.log_metrics({f"pair.{s}_cells": int(n) for s, n in counts.items()} | {"pair.cells": paired.n_obs})
    table = paired.obs[["split"]].copy()
    run.log_table(table, "split.tsv")
    if IMAGE in paired.mod:
        # What the aligner will see of the tissue: a sample of the spot <-> patch pairs.
        run.log_figure(patch_figure(paired), "image_patches.png")
    io.write_table(table, split)
    io.write_h5mu(paired, output)
    say(f"paired {paired.n_obs} {'spots with their image patches' if IMAGE in paired.mod else 'cells'}: "
        f"{counts.to_dict()}")


def patch_figure(paired, *, n: int = 24):
    """Image patches of ``n`` spots (evenly through the spots), titled with each spot's total counts."""
    plt = _figure()
    shape = paired.mod[IMAGE].uns[PATCH_SHAPE]
    spots = np.linspace(0, paired.n_obs - 1, num=min(n, paired.n_obs)).astype(int)
    patches = np.asarray(paired.mod[IMAGE].X)[spots].reshape(-1, *shape).transpose(0, 2, 3, 1)
    totals = np.asarray(paired.mod[SPATIAL].layers[COUNTS_LAYER][spots].sum(axis=1)).ravel()
    cols = 8
    fig, axes = plt.subplots(-(-len(spots) // cols), cols, figsize=(cols * 1.2, 1.35 * -(-len(spots) // cols)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, patch, total in zip(axes.ravel(), patches, totals, strict=False):
        ax.imshow(patch)
        ax.set_title(f"{total:.0f}", fontsize=7)
    fig.suptitle("tissue image patches paired with spots (title: counts in the spot)", fontsize=9)
    return fig


def _model_inputs(paired) -> tuple[Any, Any, pd.DataFrame]:
    """Expression counts (HVGs) of cells or spots, protein counts when there are any, and the obs carried on.

    Counts stay sparse (CSR) when stored sparse: the encoders densify a minibatch of rows at a time.
    """
    rna = paired.mod[io.expression_modality(paired)]
    hvg = rna.var["highly_variable"].to_numpy() if "highly_variable" in rna.var else slice(None)
    x_rna = _counts(rna.layers[COUNTS_LAYER][:, hvg])
    x_prot = _counts(paired.mod[PROT].layers[COUNTS_LAYER]) if PROT in paired.mod else None
    obs = rna.obs[[c for c in CARRIED_OBS if c in rna.obs]].copy()
    return x_rna, x_prot, obs


def _counts(x: Any) -> Any:
    return sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)


def embed(*, input: str, output: str, rna_model: str, joint_model: str, figure: str,
          params: Mapping[str, Any], device: str, run: JobRun, checkpoint_every: int = 0) -> None:
    from virtualcell.models.vae import CountEncoder

    if params["method"] != "nb_vae":
        raise InputError(f"config embed.method: unknown method '{params['method']}'; use nb_vae")
    paired = io.read_h5mu(input)
    x_rna, x_prot, obs = _model_inputs(paired)
    train = (obs["split"] == "train").to_numpy()
    val = (obs["split"] == "val").to_numpy()
    module_kwargs = {k: params[k] for k in ("n_latent", "n_hidden", "n_layers", "dropout")}
    fit_kwargs = {k: params[k] for k in ("epochs", "batch_size", "lr", "seed")}
    blocks = {"rna": (x_rna, [x_rna.shape[1]], rna_model, EMBED_RNA)}
    if x_prot is not None and params["joint"]:
        joint = (sp.hstack([x_rna, x_prot], format="csr") if sp.issparse(x_rna) or sp.issparse(x_prot)
                 else np.concatenate([x_rna, x_prot], axis=1))
        blocks["joint"] = (joint, [x_rna.shape[1], x_prot.shape[1]], joint_model, EMBED_JOINT)
    out = ad.AnnData(obs=obs)
    histories = {}
    checkpoints = []
    for name, (x, sizes, path, key) in blocks.items():
        say(f"embed: training the {name} NB-VAE on {int(train.sum())} cells x {x.shape[1]} features")
        model = CountEncoder(sizes, **module_kwargs)
        checkpoints.append(checkpoint_file(path, every=checkpoint_every, arrays=[x[train], x[val]],
                                           settings={"params": params, "network": _network(model)}))
        histories[name] = _fit(
            functools.partial(model.fit, x[train], x_val=x[val] if val.any() else None, device=device, **fit_kwargs),
            run=run, prefix=f"embed.{name}", checkpoint=checkpoints[-1], every=checkpoint_every,
        )
        out.obsm[key] = model.encode(x)
        io.atomic_write(path, model.save)
        run.log_artifact(path, artifact_path="models")
    if "joint" not in blocks:
        # No protein: the joint encoder is the RNA encoder, stated rather than hidden.
        io.atomic_write(joint_model, lambda tmp: tmp.write_bytes(Path(rna_model).read_bytes()))
        out.obsm[EMBED_JOINT] = out.obsm[EMBED_RNA]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, history in histories.items():
        ax.plot([h["loss"] for h in history], label=f"{name} train")
        if "val_loss" in history[0]:
            ax.plot([h["val_loss"] for h in history], "--", label=f"{name} val")
    ax.set(xlabel="epoch", ylabel="loss (NB NLL + KL)", yscale="log", title="embedding training")
    ax.legend()
    run.log_figure(fig, "embed_loss.png")
    io.write_figure(fig, figure)
    io.write_h5ad(out, output)
    remove_checkpoints(*checkpoints)


def align(*, input: str, embeddings: str, output: str, model: str, figure: str,
          params: Mapping[str, Any], device: str, run: JobRun, checkpoint_every: int = 0) -> None:
    from virtualcell.evaluate import retrieval_metrics
    from virtualcell.models.contrastive import Aligner

    if params["method"] != "clip":
        raise InputError(f"config align.method: unknown method '{params['method']}'; use clip")
    paired = io.read_h5mu(input)
    partner = PROT if PROT in paired.mod else IMAGE if IMAGE in paired.mod else None
    if partner is None:
        raise InputError(
            f"{input}: nothing to align the expression with (no '{PROT}' or '{IMAGE}' modality); declare "
            "modalities [rna, prot] for CITE-seq, [spatial] for a section with its image, or [rna] to skip align"
        )
    emb = io.read_h5ad(embeddings)
    xa = np.asarray(emb.obsm[EMBED_RNA], dtype=np.float32)
    xb = _dense(paired.mod[partner][emb.obs_names].X)
    split = emb.obs["split"].to_numpy()
    train, val = split == "train", split == "val"
    image_shapes = None
    if partner == IMAGE:
        image_shapes = {IMAGE: [int(v) for v in paired.mod[IMAGE].uns[PATCH_SHAPE]]}
    aligner = Aligner(
        {"rna": xa.shape[1], partner: xb.shape[1]},
        n_shared=params["n_shared"], n_hidden=params["n_hidden"], dropout=params["dropout"],
        init_temperature=params["temperature"], learn_temperature=params["learn_temperature"],
        image_shapes=image_shapes,
    )
    what = "protein CLR" if partner == PROT else "image patches"
    say(f"align: CLIP expression latent ({xa.shape[1]}) <-> {what} ({xb.shape[1]}) on {int(train.sum())} "
        f"{'cells' if partner == PROT else 'spots'}")
    checkpoint = checkpoint_file(model, every=checkpoint_every, arrays=[xa[train], xb[train], xa[val], xb[val]],
                                 settings={"params": params, "network": _network(aligner)})
    history = _fit(
        functools.partial(
            aligner.fit, xa[train], xb[train], xa_val=xa[val] if val.any() else None,
            xb_val=xb[val] if val.any() else None, epochs=params["epochs"], batch_size=params["batch_size"],
            lr=params["lr"], seed=params["seed"], device=device,
        ),
        run=run, prefix="align", checkpoint=checkpoint, every=checkpoint_every,
    )
    za, zb = aligner.embed("rna", xa), aligner.embed(partner, xb)
    both = za + zb
    out = ad.AnnData(obs=emb.obs.copy())
    out.uns[PARTNER] = partner
    out.obsm[SHARED_RNA], out.obsm[shared_key(partner)] = za, zb
    out.obsm[EMBED_RNA], out.obsm[input_key(partner)] = xa, xb
    out.obsm[SHARED] = both / np.linalg.norm(both, axis=1, keepdims=True).clip(1e-12)
    test = split == "test"
    metrics = retrieval_metrics(za[test], zb[test]) if test.sum() > 5 else {}
    run.log_metrics({f"align.test_{k}": v for k, v in metrics.items()})
    plt = _figure()
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


def observed_times(obs: pd.DataFrame, *, origin: str) -> np.ndarray:
    if "time" not in obs:
        raise InputError(f"{origin}: no time labels (obs 'time'); set time_key for the dataset in the config")
    times = np.unique(obs["time"].to_numpy(dtype=float))
    if len(times) < 3:
        raise InputError(
            f"{origin}: {len(times)} time point(s) {times.tolist()}; the simulator needs at least 3 (an interior "
            "one to hold out): add time points, or leave time_key empty to skip the simulator"
        )
    return times


def parse_holdout(holdout: str, times: np.ndarray, *, origin: str) -> float | None:
    """None for the model trained on every time point; else the held-out time, which must be interior."""
    if holdout == NO_HOLDOUT:
        return None
    matches = [t for t in times if holdout_label(t) == holdout]
    interior = [holdout_label(t) for t in times[1:-1]]
    if not matches or matches[0] in (times[0], times[-1]):
        raise InputError(
            f"{origin}: held-out time point '{holdout}' is not an interior time point; choose from {interior}"
        )
    return float(matches[0])


def check_holdouts(holdouts: str | list[float], times: np.ndarray, *, origin: str) -> None:
    """Every listed held-out time point must be an interior time point (``auto`` picks them so)."""
    if holdouts != "auto":
        for time in holdouts:
            parse_holdout(holdout_label(time), times, origin=origin)


def simulate(*, input: str, holdout: str, output: str, figure: str, params: Mapping[str, Any],
             device: str, run: JobRun, checkpoint_every: int = 0) -> None:
    from virtualcell.models.dynamics import Simulator

    if params["method"] != "ot_cfm":
        raise InputError(f"config simulate.method: unknown method '{params['method']}'; use ot_cfm")
    shared = io.read_h5ad(input)
    times = observed_times(shared.obs, origin=input)
    held = parse_holdout(holdout, times, origin=input)
    t = shared.obs["time"].to_numpy(dtype=float)
    space, x = state_of(shared)
    keep = t != held if held is not None else np.ones(len(t), bool)
    say(f"simulate: OT flow matching in the {space} space on {int(keep.sum())} cells at times "
        f"{sorted(set(t[keep].tolist()))} (held out: {holdout})")
    sim = Simulator(x.shape[1], n_hidden=params["n_hidden"], n_layers=params["n_layers"],
                    potential=params["potential"])
    checkpoint = checkpoint_file(output, every=checkpoint_every, arrays=[x[keep], t[keep]],
                                 settings={"params": params, "holdout": holdout, "network": _network(sim)})
    _fit(
        functools.partial(sim.fit, x[keep], t[keep], epochs=params["epochs"], batch_size=params["batch_size"],
                          lr=params["lr"], sigma=params["sigma"], seed=params["seed"], device=device),
        run=run, prefix="simulate", checkpoint=checkpoint, every=checkpoint_every,
    )
    io.atomic_write(output, sim.save)
    run.log_artifact(output, artifact_path="models")
    fig = trajectory_figure(sim, x, t, held=held, n_steps=params["n_steps"], space=space)
    run.log_figure(fig, "trajectories.png")
    io.write_figure(fig, figure)
    remove_checkpoints(checkpoint)


def trajectory_figure(sim, x: np.ndarray, t: np.ndarray, *, held: float | None, n_steps: int, space: str):
    """Cells in the first two PCs of the state space, coloured by time, with simulated paths."""
    from sklearn.decomposition import PCA

    plt = _figure()
    pca = PCA(n_components=2, random_state=0).fit(x)
    times = np.unique(t)
    rng = np.random.default_rng(0)
    start = x[t == times[0]]
    start = start[rng.choice(len(start), size=min(30, len(start)), replace=False)]
    path = [start]
    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        path.append(sim.simulate(path[-1], t0=float(t0), t1=float(t1), n_steps=max(n_steps // len(times), 5)))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pc = pca.transform(x)
    sca = ax.scatter(pc[:, 0], pc[:, 1], c=t, s=3, cmap="viridis", alpha=0.5)
    if held is not None:
        h = t == held
        ax.scatter(pc[h, 0], pc[h, 1], s=3, c="crimson", alpha=0.5, label=f"held out t={held:g}")
        ax.legend(loc="best")
    lines = np.stack([pca.transform(p) for p in path], axis=1)
    for line in lines:
        ax.plot(line[:, 0], line[:, 1], color="black", linewidth=0.6, alpha=0.7)
    fig.colorbar(sca, ax=ax, label="time")
    ax.set(xlabel=f"PC1 ({space.replace('_', ' ')} space)", ylabel="PC2", title="simulated trajectories")
    return fig


def evaluate(*, shared: str, simulators: Mapping[str, str], output: str, figure: str, dataset: str,
             params: Mapping[str, Any], run: JobRun) -> None:
    from virtualcell import evaluate as ev
    from virtualcell.models.dynamics import Simulator

    data = io.read_h5ad(shared)
    obs = data.obs
    split = obs["split"].to_numpy()
    train, test = split == "train", split == "test"
    seed, max_points = params["seed"], params["max_points"]
    metrics: dict[str, Any] = {"dataset": dataset}

    partner = data.uns.get(PARTNER)
    if partner and test.sum() > 5:
        za, zb = data.obsm[SHARED_RNA], data.obsm[shared_key(partner)]
        xa, xb = np.asarray(data.obsm[EMBED_RNA]), np.asarray(data.obsm[input_key(partner)])
        if partner == IMAGE:
            # CCA on thousands of pixels of a few hundred spots only memorises; the linear baseline
            # sees the patches' leading principal components, fitted on training spots.
            xb = ev.pca_features(xb, fit=train, n_components=za.shape[1])
        cca = ev.cca_embedding(xa[train], xb[train], xa[test], xb[test], n_components=za.shape[1])
        metrics["alignment"] = {f"rna-{partner}": ev.compare_retrieval({
            "model": (za[test], zb[test]),
            "cca": cca,
            "random": ev.random_embedding(za[test], seed=seed),
        })}

    holdouts = {h: p for h, p in simulators.items() if h != NO_HOLDOUT}
    if holdouts:
        space, x = state_of(data)
        x = x.astype(np.float64)
        t = obs["time"].to_numpy(dtype=float)
        times = observed_times(obs, origin=shared)
        per_holdout: dict[str, dict[str, dict[str, float]]] = {}
        for label, path in sorted(holdouts.items()):
            held = parse_holdout(label, times, origin=shared)
            prev, nxt = times[times < held].max(), times[times > held].min()
            x_prev, x_true, x_next = x[t == prev], x[t == held], x[t == nxt]
            alpha = (held - prev) / (nxt - prev)
            sim = io.read_model(Simulator, path)
            predictions = {
                "model": sim.simulate(x_prev.astype(np.float32), t0=float(prev), t1=float(held),
                                      n_steps=params["n_steps"]),
                "ot_interp": ev.ot_interpolate(x_prev, x_next, alpha, n=len(x_true), max_points=max_points,
                                               seed=seed),
                "copy_prev": x_prev,
                "copy_next": x_next,
                "random_coupling": ev.random_coupling_interpolate(x_prev, x_next, alpha, n=len(x_true),
                                                                  max_points=max_points, seed=seed),
            }
            dists = {m: ev.distribution_distances(p, x_true, max_points=max_points, seed=seed)
                     for m, p in predictions.items()}
            dists["noise_floor"] = ev.noise_floor(x_true, max_points=max_points, seed=seed)
            per_holdout[label] = {
                f"{d}_{space}": {m: v[d] for m, v in dists.items()} for d in ("w1", "w2", "mmd")
            }
            say(f"evaluate: holdout t={label}: W1 model {dists['model']['w1']:.4f}, "
                f"OT interpolation {dists['ot_interp']['w1']:.4f}, noise floor {dists['noise_floor']['w1']:.4f}")
        first = next(iter(per_holdout.values()))
        mean = {
            d: {m: float(np.mean([per_holdout[h][d][m] for h in per_holdout])) for m in first[d]} for d in first
        }
        metrics["simulation"] = {"space": space, "holdouts": per_holdout, "mean": mean}

    truth = truth_scores(data, train=train, test=test, seed=seed)
    if truth:
        metrics["truth"] = truth
    run.log_metrics(_flat_metrics(metrics))
    run.log_dict(metrics, "metrics.json")
    fig = metrics_figure(metrics)
    run.log_figure(fig, "evaluation.png")
    io.write_figure(fig, figure)
    io.write_json(metrics, output)


def truth_scores(data: ad.AnnData, *, train: np.ndarray, test: np.ndarray, seed: int) -> dict[str, float]:
    """On synthetic data: how well the shared space separates the true fates (held-out cells)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    if "fate" not in data.obs or test.sum() < 10:
        return {}
    fate = data.obs["fate"].astype(str).to_numpy()
    names = sorted(f for f in set(fate) if f.startswith("fate"))
    if len(names) < 2:
        return {}
    keep = np.isin(fate, names[:2])
    y = fate == names[0]
    _, x = state_of(data)
    fit, score = train & keep, test & keep
    if len(set(y[fit])) < 2 or len(set(y[score])) < 2:
        return {}
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x[fit], y[fit])
    return {"fate_auroc": float(roc_auc_score(y[score], clf.predict_proba(x[score])[:, 1]))}


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            flat.update(_flat_metrics(v, name))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            flat[name.replace("-", "_")] = float(v)
    return flat


def metrics_figure(metrics: Mapping[str, Any]):
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sim = metrics.get("simulation")
    if sim:
        labels = list(sim["holdouts"])
        w1 = f"w1_{sim['space']}"
        methods = list(sim["mean"][w1])
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            axes[0].bar(np.arange(len(labels)) + i * width,
                        [sim["holdouts"][h][w1][method] for h in labels], width, label=method)
        axes[0].set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [f"t={h}" for h in labels])
        axes[0].set(ylabel=f"W1 to held-out cells ({sim['space'].replace('_', ' ')} space)",
                    title="held-out time points")
        axes[0].legend(fontsize=7)
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
    fig.tight_layout()
    return fig


def register(*, simulator: str, shared: str, metrics: str, output: str, summary: str, dataset: str,
             params: Mapping[str, Any], run: JobRun) -> None:
    """Log the final simulator as a pyfunc model and register it as ``virtualcell-{dataset}``."""
    from virtualcell.models.dynamics import Simulator
    from virtualcell.tracking import simulator_input_example

    io.read_model(Simulator, simulator)  # a corrupt file fails here, named, not inside MLflow
    data = io.read_h5ad(shared)
    t = data.obs["time"].to_numpy(dtype=float) if "time" in data.obs else np.zeros(data.n_obs)
    _, state = state_of(data)
    example = simulator_input_example(state[:5], t_start=float(np.min(t)), horizon=1.0)
    name = f"virtualcell-{dataset}" if params["register"] else None
    uri = run.log_simulator(simulator, name="virtualcell", registered_model_name=name, input_example=example)
    values = json.loads(Path(metrics).read_text())
    rows = []
    for d, by_method in values.get("simulation", {}).get("mean", {}).items():
        rows += [{"section": "simulation (mean over holdouts)", "metric": d, "method": m, "value": v}
                 for m, v in by_method.items()]
    for pair_name, section in values.get("alignment", {}).items():
        rows += [{"section": f"alignment {pair_name}", "metric": d, "method": m, "value": v}
                 for d, by_method in section.items() for m, v in by_method.items()]
    for d, v in values.get("truth", {}).items():
        rows.append({"section": "ground truth", "metric": d, "method": "model", "value": v})
    table = pd.DataFrame(rows)
    run.log_table(table, "summary.tsv")
    io.write_table(table, summary)
    io.write_json({"dataset": dataset, "model_uri": uri, "registered_model": name,
                   "state_dim": int(state.shape[1])}, output)
    say(f"registered {name} ({uri})")
