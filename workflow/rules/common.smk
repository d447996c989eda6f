import json
import os

from snakemake.exceptions import WorkflowError

from virtualcell import tracking
from virtualcell.config import validate_config
from virtualcell.errors import InputError
from virtualcell.stages import NO_HOLDOUT, holdout_label

try:
    # In place: Snakemake keeps its own reference to this dict.
    config.update(validate_config(config, origin="config"))
except InputError as exc:
    raise WorkflowError(str(exc)) from None

RESULTS = "results"
LOGS = "logs"

wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    holdout="[0-9.]+|none",

# Jobs (local subprocesses, or SLURM jobs that re-read this file) learn where to
# track from the environment, so tracking settings never trigger a rerun.
TRACKING_URI = tracking.resolve_tracking_uri(config["mlflow"]["tracking_uri"])
PARENT_RUN_FILE = os.path.abspath(f"{RESULTS}/.virtualcell/parent_run_id")
os.environ[tracking.ENV_TRACKING_URI] = TRACKING_URI
os.environ[tracking.ENV_EXPERIMENT] = config["mlflow"]["experiment"]
os.environ[tracking.ENV_PARENT_RUN_FILE] = PARENT_RUN_FILE


def as_json(section):
    """A config section as the JSON a rule passes to `virtualcell --params` (and Snakemake compares)."""
    return json.dumps(section, sort_keys=True)


def dataset_spec(wildcards):
    return as_json(config["datasets"][wildcards.dataset])


def get_raw_input(wildcards):
    """The dataset's file, so Snakemake reruns ingest when it changes (none for synthetic)."""
    path = config["datasets"][wildcards.dataset]["path"]
    return [path] if path else []


def has_time(dataset):
    spec = config["datasets"][dataset]
    return spec["source"] == "synthetic" or bool(spec["time_key"])


def get_holdouts(dataset):
    """The {holdout} values of a dataset: its held-out time points, then 'none' (all time points)."""
    spec = config["datasets"][dataset]
    if not has_time(dataset):
        return []
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
    return [holdout_label(t) for t in held] + [NO_HOLDOUT]


def get_simulators(wildcards):
    return {
        h: f"{RESULTS}/{wildcards.dataset}/simulate/{h}/simulator.pt"
        for h in get_holdouts(wildcards.dataset)
    }


def simulator_args(wildcards):
    """`--simulator HOLDOUT=PATH` for each simulator evaluate reads."""
    return " ".join(f"--simulator {h}={path}" for h, path in get_simulators(wildcards).items())


def get_final_outputs():
    outputs = []
    for dataset in config["datasets"]:
        outputs.append(f"{RESULTS}/{dataset}/evaluate/metrics.json")
        if has_time(dataset):
            outputs.append(f"{RESULTS}/{dataset}/report/model.json")
    return outputs


def res(rule_name, key, default):
    """A resource of a rule from config `resources`, else from its `default` entry, else `default`."""
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table.get("default", {}).get(key, default))


onstart:
    tracking.start_workflow_run(
        uri=TRACKING_URI,
        experiment=config["mlflow"]["experiment"],
        parent_run_file=PARENT_RUN_FILE,
        config=config,
        workdir=workflow.basedir,
    )


onsuccess:
    tracking.end_workflow_run(uri=TRACKING_URI, parent_run_file=PARENT_RUN_FILE, status="FINISHED", log=log)


onerror:
    tracking.end_workflow_run(uri=TRACKING_URI, parent_run_file=PARENT_RUN_FILE, status="FAILED", log=log)
