"""The ``virtualcell`` command: every DAG step, runnable by hand with the arguments its rule uses.

Each rule in workflow/rules/ runs exactly one of these subcommands, passing its
config section as ``--params`` (JSON). By hand, ``--configfile`` reads the
section from a config file instead (validated, with the schema's defaults).
Bad input ends with one line, ``error: <file>: <problem>; <fix>``, and exit code 1, and
a failed step removes the outputs it had written, so none is mistaken for finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtualcell.errors import InputError

# The workflow passes config `checkpoint_every` this way, not as a rule param: how often a
# job saves a checkpoint does not change its result, so changing it must not rerun jobs.
ENV_CHECKPOINT_EVERY = "VIRTUALCELL_CHECKPOINT_EVERY"
TRAINING_STAGES = ("embed", "align", "simulate", "decode", "perturb")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file and validate it against the workflow's schema, filling defaults."""
    import yaml

    from virtualcell.config import validate_config

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    return validate_config(config, origin=str(path))


def _section(args: argparse.Namespace, name: str) -> dict[str, Any]:
    if args.params is not None:
        try:
            return json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise InputError(f"--params: not valid JSON ({exc}); pass the config section as JSON") from None
    config = load_config(args.configfile)
    if name == "report":
        from virtualcell.config import report_params

        return report_params(config)
    if name.startswith("datasets."):
        dataset = name.split(".", 1)[1]
        if dataset not in config["datasets"]:
            raise InputError(f"{args.configfile}: no dataset '{dataset}' under datasets; add it or fix --dataset")
        return config["datasets"][dataset]
    return config[name]


DATASET = "the dataset's name under datasets: in the config"


def _add(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    parser.add_argument(*names, required=kwargs.pop("required", True), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtualcell", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", help="the stage's config section as JSON (what the rule passes)")
        p.add_argument("--configfile", default="config/config.yaml",
                       help="read the section from this config instead of --params")
        p.add_argument("--jobid", help="Snakemake job id, recorded as a run tag")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        if name in TRAINING_STAGES:
            p.add_argument("--device", default="auto",
                           help="where to train: auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
            p.add_argument("--checkpoint-every", type=int, default=int(os.environ.get(ENV_CHECKPOINT_EVERY, 0)),
                           metavar="N", help="save a checkpoint every N epochs and resume from it after an "
                           f"interruption (0: never; default ${ENV_CHECKPOINT_EVERY}, else 0)")
        return p

    p = stage("ingest", "read a dataset (or generate the synthetic one) into one .h5mu")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--output", help="results/<dataset>/ingest.h5mu: every declared modality, raw values in a layer")

    p = stage("qc", "QC of every modality: metrics, doublets, filters, normalisation, HVGs")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="ingest's .h5mu")
    _add(p, "--output", help="results/<dataset>/qc.h5mu: the kept cells and genes, log-normalised, HVGs marked")
    _add(p, "--summary", help="qc/qc.json: cells removed by each filter, per batch, and what was skipped")
    _add(p, "--figures", metavar="DIR", help="folder for one {modality}.png per modality")

    p = stage("pair", "paired cells across modalities and the train/val/test split")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="qc's .h5mu")
    _add(p, "--output", help="pairs/paired.h5mu: the cells measured in every modality (spots with their patches)")
    _add(p, "--split", help="pairs/split.tsv: each cell's train/val/test split")
    _add(p, "--control", required=False, default=None,
         help="the control label of obs condition: only control cells go on to the time course")

    p = stage("perturb", "train the perturbation model without one condition and score its prediction of it")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="qc's .h5mu (every condition's cells)")
    _add(p, "--condition", required=False, default=None,
         help="the condition held out whole; without it, train on every condition for the virtual cell (--map)")
    _add(p, "--control", help="the control label of obs condition")
    _add(p, "--min-cells", type=int, default=20, required=False, help="fewest cells a condition may have")
    _add(p, "--output", required=False, default=None,
         help="perturb/<condition>/metrics.json: the model and every baseline's scores")
    _add(p, "--map", required=False, default=None,
         help="without --condition: perturb/map.npz, what the virtual cell needs to move cells to a condition")
    _add(p, "--model", help="perturb/<condition>/model.pt to write (perturb/model.pt without --condition)")
    _add(p, "--dynamics", required=False, default=None,
         help="without --condition: perturb/dynamics.pt, the dynamic model (every condition's time course)")
    _add(p, "--cells", required=False, default=None,
         help="perturb/<condition>/predicted.h5ad: the model's predicted cells (log expression)")
    _add(p, "--figure", required=False, default=None, help="the response figure (.png)")

    p = stage("embed", "train the RNA and joint RNA+protein count encoders")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="pair's paired.h5mu")
    _add(p, "--output", help="embed/embeddings.h5ad: every cell's latents (obsm X_rna, X_joint) and pca5")
    _add(p, "--rna-model", help="embed/rna_encoder.pt to write")
    _add(p, "--joint-model", help="embed/joint_encoder.pt to write (the RNA encoder when there is no protein)")
    _add(p, "--figure", help="the training-loss figure (.png)")

    p = stage("align", "contrastive RNA <-> protein alignment into a shared space")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="pair's paired.h5mu (the partner modality's features)")
    _add(p, "--embeddings", help="embed's embeddings.h5ad (the RNA latents)")
    _add(p, "--output", help="align/shared.h5ad: each cell's shared-space state (obsm X_shared) and both heads'")
    _add(p, "--model", help="align/aligner.pt to write")
    _add(p, "--predictor", required=False, default=None,
         help="align/predictor.pt to write: the partner predicted from RNA alone (JEPA-style, with its decoder)")
    _add(p, "--rna-predictor", required=False, default=None,
         help="align/predictor_rna.pt to write: RNA (log-normalised HVGs) predicted from the partner alone")
    _add(p, "--figure", help="the training-loss figure (.png)")

    p = stage("simulate", "fit the dynamics (one seed) with one time point held out, the last ('last') or none")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--holdout", help="the time point held out (e.g. 2), 'last' (extrapolated) or 'none' (every one)")
    _add(p, "--seed", type=int, required=False, default=None, help="training seed (default: simulate.seed)")
    _add(p, "--input", help="the states (align's shared.h5ad, or embed's embeddings.h5ad without an alignment)")
    _add(p, "--output", help="simulate/<holdout>/seed<k>/simulator.pt to write")
    _add(p, "--figure", help="the trajectories figure (.png)")

    p = stage("decode", "fit the decoder of simulator states to log-normalised expression (one per dataset)")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--input", help="the states (shared.h5ad, or embeddings.h5ad without an alignment)")
    _add(p, "--expression", help="the paired .h5mu whose log-normalised expression the decoder learns")
    _add(p, "--output", help="simulate/decoder.pt to write")

    p = stage("evaluate", "held-out time points and cross-modal retrieval against baselines")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--shared", help="the states (align's shared.h5ad, or embed's embeddings.h5ad without an alignment)")
    _add(p, "--simulator", action="append", metavar="HOLDOUT=PATH", required=False, default=[],
         help="repeat per holdout and seed (seeds in order); none for data without time points")
    _add(p, "--space", required=False, default="embedding", choices=["embedding", "pca"],
         help="the space the simulators run in (simulate.space)")
    _add(p, "--decoder", required=False, default=None,
         help="the decode step's decoder.pt (simulators of the embedding space are judged through it)")
    _add(p, "--output", help="evaluate/metrics.json to write")
    _add(p, "--fates", required=False, default=None, help="per-cell fate probabilities (.h5ad)")
    _add(p, "--figure", help="the evaluation figure (.png): bars against the baselines, simulated vs real cells")
    _add(p, "--fate-figure", required=False, default=None, help="the fate-probability maps (.png)")
    _add(p, "--embedding-figure", required=False, default=None, help="UMAPs of the embeddings (.png)")
    _add(p, "--alignment-figure", required=False, default=None,
         help="retrieval curves and cross-modal similarity of held-out cells (.png)")
    _add(p, "--prediction-figure", required=False, default=None,
         help="protein predicted from RNA alone vs measured, per protein, against the baselines (.png)")
    _add(p, "--perturbation", action="append", required=False, default=[], metavar="PATH",
         help="a perturb job's metrics.json (repeat per held-out condition): metrics.json's perturbation section")

    p = stage("report", "log the virtual cell (genes in, genes out) and register it in the MLflow model registry")
    _add(p, "--dataset", help=DATASET)
    _add(p, "--simulator", help="the simulator trained on every time point")
    _add(p, "--shared", help="the states it was trained on (align's shared.h5ad or embed's embeddings.h5ad)")
    _add(p, "--expression", help="pair's paired.h5mu: the genes and values cells come in")
    _add(p, "--encoder", required=False, default=None, help="embed's rna_encoder.pt (simulate.space: embedding)")
    _add(p, "--aligner", required=False, default=None, help="align's aligner.pt (aligned datasets)")
    _add(p, "--predictor", required=False, default=None,
         help="align's predictor.pt (aligned datasets): the partner's embedding and values from RNA alone")
    _add(p, "--decoder", required=False, default=None, help="decode's decoder.pt (simulate.space: embedding)")
    _add(p, "--perturbation", nargs="+", required=False, default=None, metavar="FILE",
         help="perturb_model's model.pt, map.npz and (perturb.dynamic) dynamics.pt, in that order (datasets "
              "with conditions): the virtual cell's 'what if'")
    _add(p, "--metrics", help="evaluate's metrics.json (the numbers the model was judged by)")
    _add(p, "--output", help="report/model.json to write: the model's URI, its space and genes")
    _add(p, "--summary", help="report/summary.tsv to write: every headline number beside its baselines")
    _add(p, "--page", required=False, default=None, help="the one-page HTML summary (what won) to write")

    p = sub.add_parser("predict", help="ask the virtual cell: simulate the cells of an .h5ad forward in time",
                       description="Simulate cells forward with a logged virtual cell and write the answer into "
                       "an .h5ad: X (the cells' own log-normalised expression of the model's genes), "
                       "layers['simulated'], obsm['X_state'], obsm['X_state_simulated'], "
                       "obsm['fate_probabilities'], obs['predicted_fate'], uns['virtualcell'] and, on a dataset aligned "
                       "with protein, obsm['X_predicted_prot'] (the cells' protein predicted from their RNA).")
    _add(p, "--model", help="models:/virtualcell-<dataset>/latest, a runs:/ or models:/ URI, or a local model folder")
    _add(p, "--input", help=".h5ad of cells (raw counts in layers['counts'] or X; gene names as var_names)")
    _add(p, "--horizon", type=float, help="time to simulate forward, in the units of the training time labels")
    _add(p, "--output", help=".h5ad to write")
    _add(p, "--t-start", type=float, required=False, default=None,
         help="the cells' time (default: the first observed time point)")
    _add(p, "--layer", required=False, default=None, help="the layer holding the values (default: counts, else X)")
    _add(p, "--seed", type=int, required=False, default=0, help="seed of the stochastic simulation")
    _add(p, "--n-rollouts", type=int, required=False, default=None,
         help="simulations per cell for fate probabilities (default: the evaluation's)")
    _add(p, "--condition", required=False, default=None,
         help="what if: the cells under a knock-down (a gene name), a trained drug or GeneA+GeneB (models of "
         "datasets with conditions); default the control")
    _add(p, "--mean", action="store_true", required=False,
         help="write the decoder's mean expression (denoised, under-dispersed) rather than a sample of each gene")
    _add(p, "--tracking-uri", required=False, default=None,
         help="where models:/ and runs:/ URIs resolve (default: $MLFLOW_TRACKING_URI, else the workflow's "
         "sqlite:///results/mlflow.db)")
    return parser


def predict(args: argparse.Namespace) -> None:
    """``virtualcell predict``: load the virtual cell (MLflow or a bundle folder) and answer on an .h5ad."""
    from virtualcell import cellmodel

    if Path(args.model, cellmodel.META).exists():
        cell = cellmodel.VirtualCell(args.model)
    else:
        import mlflow

        from virtualcell import tracking

        mlflow.set_tracking_uri(tracking.resolve_tracking_uri(args.tracking_uri))
        try:
            cell = mlflow.pyfunc.load_model(args.model).unwrap_python_model().cell
        except mlflow.exceptions.MlflowException as exc:
            raise InputError(f"--model {args.model}: cannot be loaded ({str(exc).splitlines()[0]}); pass "
                             "models:/virtualcell-<dataset>/latest after the workflow has run, or "
                             "--tracking-uri where it tracked") from None
    out = cellmodel.predict_h5ad(cell, args.input, args.output, horizon=args.horizon, t_start=args.t_start,
                                 seed=args.seed, n_rollouts=args.n_rollouts, sample=not args.mean, layer=args.layer,
                                 model=args.model, condition=args.condition)
    fates = out.obs["predicted_fate"].value_counts().to_dict()
    under = f" under {args.condition}" if args.condition else ""
    print(f"[virtualcell] {out.n_obs} cells simulated from t={out.uns['virtualcell']['t_start']:g} to "
          f"t={out.uns['virtualcell']['t_end']:g}{under}; most likely fates {fates}; written to {args.output}")


# stage -> (config section, inputs, outputs, wildcards, call)
def _plan(args: argparse.Namespace) -> tuple[str, list[str], list[str], dict[str, str], Callable[..., None]]:
    from virtualcell import representation, stages

    device = getattr(args, "device", "auto")
    every = getattr(args, "checkpoint_every", 0)
    wildcards = {"dataset": args.dataset}
    if args.stage == "ingest":
        return (f"datasets.{args.dataset}", [], [args.output], wildcards,
                lambda p, run: stages.ingest(dataset=args.dataset, spec=p, output=args.output, run=run))
    if args.stage == "qc":
        return ("qc", [args.input], [args.output, args.summary, args.figures], wildcards,
                lambda p, run: stages.qc(input=args.input, output=args.output, summary=args.summary,
                                         figures=args.figures, params=p, run=run))
    if args.stage == "pair":
        return ("pair", [args.input], [args.output, args.split], wildcards,
                lambda p, run: stages.pair(input=args.input, output=args.output, split=args.split, params=p,
                                           run=run, control=args.control))
    if args.stage == "perturb" and args.condition is None:
        from virtualcell import perturbmap

        if not args.map:
            raise InputError("perturb: pass --condition (a held-out condition to score) or --map (train on every "
                             "condition for the virtual cell)")
        return ("perturb", [args.input], [args.model, args.map] + ([args.dynamics] if args.dynamics else []),
                wildcards,
                lambda p, run: perturbmap.perturb_model(input=args.input, control=args.control, model=args.model,
                                                        output=args.map, params=p, device=device, run=run,
                                                        min_cells=args.min_cells, dynamics=args.dynamics))
    if args.stage == "perturb":
        from virtualcell import perturbation

        if not (args.output and args.cells and args.figure):
            raise InputError("perturb --condition: pass --output, --cells and --figure too")
        return ("perturb", [args.input], [args.output, args.model, args.cells, args.figure],
                wildcards | {"condition": args.condition},
                lambda p, run: perturbation.perturb(input=args.input, condition=args.condition,
                                                    control=args.control, output=args.output, model=args.model,
                                                    cells=args.cells, figure=args.figure, params=p, device=device,
                                                    run=run, min_cells=args.min_cells))
    if args.stage == "embed":
        return ("embed", [args.input], [args.output, args.rna_model, args.joint_model, args.figure], wildcards,
                lambda p, run: representation.embed(input=args.input, output=args.output, rna_model=args.rna_model,
                                            joint_model=args.joint_model, figure=args.figure, params=p,
                                            device=device, run=run, checkpoint_every=every))
    if args.stage == "align":
        return ("align", [args.input, args.embeddings],
                [args.output, args.model, args.figure, *filter(None, [args.predictor, args.rna_predictor])],
                wildcards,
                lambda p, run: representation.align(input=args.input, embeddings=args.embeddings, output=args.output,
                                            model=args.model, figure=args.figure, params=p, device=device,
                                            run=run, checkpoint_every=every, predictor=args.predictor,
                                            rna_predictor=args.rna_predictor))
    if args.stage == "simulate":
        return ("simulate", [args.input], [args.output, args.figure],
                wildcards | {"holdout": args.holdout} | ({} if args.seed is None else {"seed": str(args.seed)}),
                lambda p, run: stages.simulate(input=args.input, holdout=args.holdout,
                                               seed=p["seed"] if args.seed is None else args.seed,
                                               output=args.output, figure=args.figure,
                                               params=p, device=device, run=run, checkpoint_every=every))
    if args.stage == "decode":
        return ("simulate", [args.input, args.expression], [args.output], wildcards,
                lambda p, run: stages.decode(input=args.input, expression=args.expression, output=args.output,
                                             params=p, device=device, run=run, checkpoint_every=every))
    if args.stage == "evaluate":
        simulators = {}
        for item in args.simulator:
            holdout, sep, path = item.partition("=")
            if not sep:
                raise InputError(f"--simulator {item}: expected HOLDOUT=PATH")
            simulators.setdefault(holdout, []).append(path)
        outputs = [f for f in (args.output, args.fates, args.figure, args.fate_figure, args.embedding_figure,
                                    args.alignment_figure, args.prediction_figure) if f]
        inputs = [args.shared, *(p for paths in simulators.values() for p in paths), *filter(None, [args.decoder]),
                  *args.perturbation]
        return ("evaluate", inputs, outputs, wildcards,
                lambda p, run: stages.evaluate(shared=args.shared, simulators=simulators, output=args.output,
                                               figure=args.figure, dataset=args.dataset, params=p, run=run,
                                               space=args.space, fates=args.fates, fate_figure=args.fate_figure,
                                               decoder=args.decoder, embedding_figure=args.embedding_figure,
                                               alignment_figure=args.alignment_figure,
                                               prediction_figure=args.prediction_figure,
                                               perturbations=args.perturbation, threads=args.threads or 1))
    if args.stage == "report":
        from virtualcell import report

        if args.perturbation and len(args.perturbation) not in (2, 3):
            raise InputError(f"report --perturbation: MODEL MAP [DYNAMICS]; got {len(args.perturbation)} files")

        models = [f for f in (args.encoder, args.aligner, args.predictor, args.decoder, *(args.perturbation or []))
                  if f]
        return ("report", [args.simulator, args.shared, args.expression, args.metrics, *models],
                [args.output, args.summary, *filter(None, [args.page])], wildcards,
                lambda p, run: report.register(simulator=args.simulator, shared=args.shared,
                                               expression=args.expression, metrics=args.metrics,
                                               output=args.output, summary=args.summary, dataset=args.dataset,
                                               params=p, run=run, encoder=args.encoder, aligner=args.aligner,
                                               predictor=args.predictor,
                                               decoder=args.decoder, page=args.page,
                                               perturbation=tuple(args.perturbation) if args.perturbation else None))
    raise AssertionError(args.stage)


def run(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run one stage inside its MLflow child run."""
    from virtualcell import tracking

    args = build_parser().parse_args(argv)
    if args.stage == "predict":
        predict(args)
        return
    # ingest and qc never touch torch: importing it only to cap its threads cost them ~1-3 s each.
    if args.threads and args.stage not in ("ingest", "qc"):
        import torch

        torch.set_num_threads(args.threads)
    section, inputs, outputs, wildcards, call = _plan(args)
    params = _section(args, section)
    started = time.time()
    try:
        # `perturb` without --condition is the perturb_model rule's job (the model for the virtual cell).
        rule = "perturb_model" if args.stage == "perturb" and args.condition is None else args.stage
        with tracking.job_run(
            rule=rule, wildcards=wildcards, params=params, inputs=inputs, outputs=outputs,
            jobid=args.jobid, enabled=not args.no_tracking,
        ) as job:
            call(params, job)
    except BaseException:
        remove_written(outputs, since=started)
        raise


def remove_written(outputs: list[str], *, since: float) -> None:
    """Remove the outputs a failed step wrote, so that a partial set never looks finished.

    Only files written since the step started go; an older file at an output path is
    not this step's to delete (Snakemake removes those itself before it runs a job).
    """
    for path in map(Path, outputs):
        if path.is_file() and path.stat().st_mtime >= since:
            path.unlink()
        elif path.is_dir() and path.stat().st_mtime >= since:
            shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
