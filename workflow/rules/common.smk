import json
import os
import sys

import numpy as np
from snakemake.exceptions import WorkflowError

# Only light modules at parse time (virtualcell.plan says why); MLflow is imported by the hooks below,
# which run only when there are jobs to run.
from virtualcell import plan
from virtualcell.cli import ENV_CHECKPOINT_EVERY
from virtualcell.config import report_params, validate_config
from virtualcell.errors import InputError
from virtualcell.plan import (DECODER_PARAMS, LAST, NO_HOLDOUT, check_holdouts, condition_label, holdout_conditions,
                              holdout_label, partner_modality)

try:
    # In place: Snakemake keeps its own reference to this dict.
    config.update(validate_config(config, origin="config"))
except InputError as exc:
    raise WorkflowError(str(exc)) from None

RESULTS = "results"
LOGS = "logs"
# Snakemake's own per-job record of wall time and peak memory (s, max_rss in MB): one TSV per job.
BENCHMARKS = "benchmarks"

wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    holdout="[0-9.]+|none|last",
    condition="[A-Za-z0-9_.+-]+",
    seed="-?[0-9]+",

# Jobs (local subprocesses, or SLURM jobs that re-read this file) learn where to
# track and how often to checkpoint from the environment, so these settings never
# trigger a rerun.
TRACKING = config["mlflow"]["enabled"]
TRACKING_URI = plan.resolve_tracking_uri(config["mlflow"]["tracking_uri"])
# mlflow.enabled: false -> the jobs log nothing (the same NullRun as `virtualcell ... --no-tracking`).
os.environ[plan.ENV_NO_TRACKING] = "0" if TRACKING else "1"
if workflow.is_main_process and TRACKING:
    # Before any job starts, dry runs included: an unreachable server fails here in seconds.
    try:
        plan.check_reachable(TRACKING_URI)
    except InputError as exc:
        raise WorkflowError(str(exc)) from None
    # One parent-run file per invocation; its jobs inherit the path (SLURM exports the
    # environment), so invocations sharing results/ never attach to each other's parent.
    os.environ[plan.ENV_PARENT_RUN_FILE] = str(plan.new_parent_run_file(RESULTS))
PARENT_RUN_FILE = os.environ.get(plan.ENV_PARENT_RUN_FILE) or str(plan.new_parent_run_file(RESULTS))
os.environ[plan.ENV_TRACKING_URI] = TRACKING_URI
os.environ[plan.ENV_EXPERIMENT] = config["mlflow"]["experiment"]
os.environ[plan.ENV_PARENT_RUN_FILE] = PARENT_RUN_FILE
os.environ[ENV_CHECKPOINT_EVERY] = str(config["checkpoint_every"])


def as_json(section):
    """A config section as the JSON a rule passes to `virtualcell --params` (and Snakemake compares)."""
    return json.dumps(section, sort_keys=True)


def dataset_spec(wildcards):
    return as_json(config["datasets"][wildcards.dataset])


def get_raw_input(wildcards):
    """The dataset's files, so Snakemake reruns ingest when one changes (none for synthetic)."""
    spec = config["datasets"][wildcards.dataset]
    return [spec[key] for key in ("path", "metadata_path", "protein_path", "image_path") if spec[key]]


def has_time(dataset):
    """Whether the dataset has time points to simulate (the generator's cells do; its spots do not)."""
    spec = config["datasets"][dataset]
    if spec["source"] == "synthetic":
        return "rna" in spec["modalities"]
    return bool(spec["time_key"])


def alignment_partner(dataset):
    """What the expression is aligned with: protein, peaks (ATAC), image patches (spots), or nothing (RNA only)."""
    return partner_modality(config["datasets"][dataset]["modalities"])


def get_state(wildcards):
    """The cell states the simulator and evaluation read: the shared space, or the RNA latent
    space of a dataset with nothing to align."""
    if alignment_partner(wildcards.dataset):
        return rules.align.output.shared
    return rules.embed.output.embeddings


def get_holdouts(dataset):
    """The {holdout} values of a dataset: its held-out time points, 'last' (the last time point, held out
    to be extrapolated) when evaluate.extrapolate, then 'none' (every time point)."""
    spec = config["datasets"][dataset]
    if not has_time(dataset):
        return []
    extrapolate = config["evaluate"]["extrapolate"]
    if spec["holdouts"] == "auto":
        if spec["source"] != "synthetic":
            raise WorkflowError(
                f"config datasets.{dataset}.holdouts: 'auto' needs the synthetic source; list the "
                "interior time points to hold out, e.g. holdouts: [1, 2]"
            )
        times = sorted(spec["generator"]["time_points"])
        held = times[1:-1]
    else:
        held = spec["holdouts"]
        if spec["source"] == "synthetic":
            # The generator's time points are known now; a file's are checked at ingest.
            try:
                check_holdouts(held, np.unique(spec["generator"]["time_points"]),
                               origin=f"config datasets.{dataset}.holdouts")
            except InputError as exc:
                raise WorkflowError(str(exc)) from None
    return [holdout_label(t) for t in held] + ([LAST] if extrapolate else []) + [NO_HOLDOUT]


def get_condition_holdouts(dataset):
    """{condition label (its path and wildcard): condition name} of the conditions a dataset holds out whole."""
    spec = config["datasets"][dataset]
    if not has_conditions(dataset):
        return {}
    try:
        held = holdout_conditions(dataset, spec)
    except InputError as exc:
        raise WorkflowError(str(exc)) from None
    return {condition_label(name): name for name in held}


def get_perturbations(wildcards):
    """The perturb jobs' metrics evaluate gathers into metrics.json's perturbation section."""
    return [f"{RESULTS}/{wildcards.dataset}/perturb/{label}/metrics.json"
            for label in get_condition_holdouts(wildcards.dataset)]


def has_conditions(dataset):
    """Whether a dataset's cells carry conditions (the perturb stage's): the generator's, or a condition_key."""
    spec = config["datasets"][dataset]
    if spec["source"] == "synthetic":
        return bool(spec["generator"].get("cells_per_condition")) and "rna" in spec["modalities"]
    return bool(spec.get("condition_key"))


def get_perturbation_model(wildcards):
    """perturb_model's files for the virtual cell's "what if" ([] without conditions)."""
    if not has_conditions(wildcards.dataset):
        return []
    files = [f"{RESULTS}/{wildcards.dataset}/perturb/model.pt", f"{RESULTS}/{wildcards.dataset}/perturb/map.npz"]
    if config["perturb"]["dynamic"]:
        files.append(f"{RESULTS}/{wildcards.dataset}/perturb/dynamics.pt")
    return files


def get_seeds():
    """The training seeds of each holdout's simulators: simulate.seed, +1, ... (evaluate.seeds of them)."""
    return [config["simulate"]["seed"] + i for i in range(config["evaluate"]["seeds"])]


for _dataset in config["datasets"]:
    # A held-out time point that is not interior, or modalities without an expression one, fail at
    # start, not in a job.
    get_holdouts(_dataset)
    get_condition_holdouts(_dataset)
    try:
        alignment_partner(_dataset)
    except InputError as exc:
        raise WorkflowError(f"config datasets.{_dataset}.modalities: {exc}") from None


def get_simulators(wildcards):
    """{holdout: [simulator file of each seed]}."""
    return {
        h: [f"{RESULTS}/{wildcards.dataset}/simulate/{h}/seed{s}/simulator.pt" for s in get_seeds()]
        for h in get_holdouts(wildcards.dataset)
    }


def get_decoder(wildcards):
    """The decoder evaluate judges embedding-space simulators through ([] for simulate.space pca or no time)."""
    if config["simulate"]["space"] == "pca" or not get_holdouts(wildcards.dataset):
        return []
    return [f"{RESULTS}/{wildcards.dataset}/simulate/decoder.pt"]


def get_encoder(wildcards):
    """The RNA encoder, when the simulator's states are embeddings ([] for simulate.space pca)."""
    if config["simulate"]["space"] == "pca":
        return []
    return [rules.embed.output.rna_model]


def get_aligner(wildcards):
    """The aligner, when the simulator's states are the shared space of an alignment."""
    if config["simulate"]["space"] == "pca" or not alignment_partner(wildcards.dataset):
        return []
    return [rules.align.output.model]


def get_predictor(wildcards):
    """Align's predictor of the partner from RNA, beside the aligner (it takes RNA-only cells to the shared space)."""
    return [rules.align.output.predictor] if get_aligner(wildcards) else []


def simulator_args(wildcards):
    """`--simulator HOLDOUT=PATH` for each simulator evaluate reads (seeds in order)."""
    return " ".join(f"--simulator {h}={p}" for h, paths in get_simulators(wildcards).items() for p in paths)


def get_final_outputs():
    """metrics.json when there is something to evaluate (an alignment, time points), the registered
    model when there is a simulator, else the embeddings."""
    outputs = []
    for dataset in config["datasets"]:
        if alignment_partner(dataset) or has_time(dataset) or get_condition_holdouts(dataset):
            outputs.append(f"{RESULTS}/{dataset}/evaluate/metrics.json")
        else:
            outputs.append(f"{RESULTS}/{dataset}/embed/embeddings.h5ad")
        if has_time(dataset):
            outputs.append(f"{RESULTS}/{dataset}/report/model.json")
    return outputs


def res(rule_name, key, default):
    """A resource of a rule from config `resources`, else from its `default` entry, else `default`."""
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table.get("default", {}).get(key, default))


onstart:
    if TRACKING:
        from virtualcell import tracking

        if workflow.non_local_exec and TRACKING_URI.startswith("sqlite:"):
            # Jobs on other nodes would write one SQLite file over the shared filesystem at once.
            logger.warning(
                f"MLflow tracks to SQLite ({TRACKING_URI.partition('?')[0]}) while jobs run on cluster "
                "nodes: SQLite locking is not safe across nodes on a shared filesystem, so runs can be "
                "lost or the store damaged. Start an `mlflow server` and set MLFLOW_TRACKING_URI or "
                "mlflow.tracking_uri to it (docs/HPC.md, 'Tracking from many nodes')."
            )
        tracking.start_workflow_run(
            uri=TRACKING_URI,
            experiment=config["mlflow"]["experiment"],
            parent_run_file=PARENT_RUN_FILE,
            config=config,
            workdir=workflow.basedir,
        )


onsuccess:
    summaries = [f"{RESULTS}/{d}/report/summary.{ext}" for d in config["datasets"] for ext in ("tsv", "html")]
    if TRACKING:
        from virtualcell import tracking

        tracking.end_workflow_run(uri=TRACKING_URI, parent_run_file=PARENT_RUN_FILE, status="FINISHED", log=log,
                                  summaries=summaries)
    from virtualcell.summary import where_things_are

    print(where_things_are(RESULTS, list(config["datasets"]), tracking_uri=TRACKING_URI if TRACKING else None),
          file=sys.stderr)


onerror:
    if TRACKING:
        from virtualcell import tracking

        tracking.end_workflow_run(uri=TRACKING_URI, parent_run_file=PARENT_RUN_FILE, status="FAILED", log=log)
