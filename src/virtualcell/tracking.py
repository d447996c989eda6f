"""All MLflow code of virtualcell lives here and nowhere else.

How runs are laid out (see DESIGN.md, "MLflow contract"):

- one experiment per config (``mlflow.experiment``);
- one *parent* run per workflow invocation, opened by the main Snakemake
  process (``onstart``) and closed by ``onsuccess``/``onerror``; its id is
  written to a file that every job reads, because jobs run as separate
  processes (and on SLURM, on other nodes sharing the filesystem). The file is
  per invocation (:func:`new_parent_run_file`), so two invocations sharing a
  results folder never attach jobs to each other's parent run, and a job
  attaches only to a parent run of its own experiment;
- one *child* run per job, opened by :func:`job_run` around the job's work;
  it logs the job's config section as params, the sha256 and size of every
  input and output file, metrics, figures, tables and models, and ends
  FAILED with the error text when the job raises;
- each job writes its run id beside each of its outputs (``.<name>.mlflow_run``)
  so a downstream job can tag the runs whose outputs it consumed (lineage).

The tracking settings travel to jobs as environment variables set by the
Snakefile (``VIRTUALCELL_TRACKING_URI``, ``VIRTUALCELL_EXPERIMENT``,
``VIRTUALCELL_PARENT_RUN_FILE``), so changing them never triggers a rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from virtualcell.files import atomic_write_text
# What the Snakefile needs before any job (it must not import MLflow: virtualcell.plan says why),
# re-exported here, where the jobs read it.
from virtualcell.plan import (  # noqa: F401
    DEFAULT_STORE,
    ENV_EXPERIMENT,
    ENV_NO_TRACKING,
    ENV_PARENT_RUN_FILE,
    ENV_TRACKING_URI,
    PARENT_RUN_DIR,
    PARENT_RUN_SUFFIX,
    REACHABLE_TIMEOUT_S,
    SQLITE_TIMEOUT_S,
    UnreachableServerError,
    check_reachable,
    new_parent_run_file,
    resolve_tracking_uri,
    tracking_enabled,
)

DEFAULT_EXPERIMENT = "virtualcell"
DEFAULT_ARTIFACTS = "results/mlartifacts"
LINEAGE_SUFFIX = ".mlflow_run"
# Per-epoch training metrics are written in batches at most this often (and when the job ends), so
# the MLflow UI's curves follow a running job with this delay.
EPOCH_FLUSH_S = 10.0
ABANDONED = (
    "killed: the workflow invocation ended without closing this run (SIGKILL, node failure or power loss); "
    "a later invocation closed it"
)

TAG_RULE = "virtualcell.rule"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the MLflow 3 UI to choose the experiment's first page
EXPERIMENT_KIND = "custom_model_development"
TAG_WILDCARDS = "virtualcell.wildcards"
TAG_JOBID = "snakemake.jobid"
TAG_UPSTREAM = "virtualcell.upstream_runs"
TAG_ERROR = "virtualcell.error"
TAG_GIT = "mlflow.source.git.commit"
TAG_KIND = "virtualcell.kind"
# On a cluster the scheduler's job id, the one its logs and accounting know the job by.
TAG_SLURM_JOBID = "slurm.job_id"


def _local_artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store sit beside it under ``mlartifacts``."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :].partition("?")[0])
        return (db.parent / Path(DEFAULT_ARTIFACTS).name).as_uri()
    return None


def _job_uri(uri: str | None) -> str:
    return uri or os.environ.get(ENV_TRACKING_URI) or resolve_tracking_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while MLflow opens it.

    Opening a store creates or migrates its tables, and MLflow does not guard that
    against other processes: jobs that open a fresh store at once fail with
    "duplicate column" or "table already exists". Other stores need no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :].partition("?")[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no POSIX locks, jobs start one at a time there
        yield
        return
    with open(db.parent / f".{db.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _configure(uri: str | None, experiment: str | None) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""

    uri = _job_uri(uri)
    experiment = experiment or os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        return _experiment_id(experiment, uri)


def _experiment_id(experiment: str, uri: str) -> str:
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = mlflow.create_experiment(
                experiment, artifact_location=_local_artifact_location(uri)
            )
        except Exception:
            # Another process created it between our lookup and create.
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    if found is None or found.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
        # MLflow 3's UI opens an experiment by its kind; untagged, it lands on the GenAI overview
        # ("Traces 0") rather than the runs, so say what this experiment is.
        mlflow.set_experiment_tag(TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return experiment_id


def git_commit(path: str | Path = ".") -> str | None:
    """The commit of the workflow's checkout, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------------------
# parent run: one per workflow invocation


# The parent-run file of this process's invocation, kept open and locked while the process lives:
# the kernel drops the lock when the process dies, however it dies, which is how a later
# invocation tells an abandoned file from the file of an invocation still running beside it.
_held: dict[Path, Any] = {}


def _lock(handle: Any, *, wait: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no POSIX locks, so no file is ever taken for abandoned
        return not wait
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _write_parent_run_file(path: Path, run_id: str, uri: str) -> None:
    """Create the file and lock it before it has content, so nobody ever takes it for abandoned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    _lock(handle, wait=True)
    handle.truncate(0)
    handle.write(f"{run_id}\n{uri}\n")
    handle.flush()
    _held[path] = handle


def _parent_run_file_id(path: str | Path) -> str | None:
    """The run id in a parent-run file (its first line; the second is the tracking URI)."""
    lines = Path(path).read_text().split()
    return lines[0] if lines else None


def close_abandoned_runs(folder: str | Path, *, uri: str) -> list[str]:
    """Close, as KILLED, the runs of earlier invocations that died without closing them.

    Such an invocation leaves its parent-run file behind, unlocked; its parent run and the
    job runs that were still open stay RUNNING in the store. Only files of this store are
    handled; the files of invocations that are still running are locked, and left alone.
    Returns the ids of the runs closed.
    """
    from mlflow.tracking import MlflowClient

    closed: list[str] = []
    for path in sorted(Path(folder).glob(f"*{PARENT_RUN_SUFFIX}")):
        if path.resolve() in _held:
            continue
        with open(path) as handle:
            if not _lock(handle, wait=False):
                continue
            lines = handle.read().split()
            if len(lines) < 2 or lines[1] != uri:
                continue  # being written right now, or another store's
            try:
                client = MlflowClient(tracking_uri=uri)
                parent = client.get_run(lines[0])
                open_children = client.search_runs(
                    [parent.info.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{lines[0]}' and attributes.status = 'RUNNING'",
                )
                for run in [*open_children, parent]:
                    if run.info.status == "RUNNING":
                        client.set_tag(run.info.run_id, TAG_ERROR, ABANDONED)
                        client.set_terminated(run.info.run_id, status="KILLED")
                        closed.append(run.info.run_id)
            except Exception as exc:
                print(f"[virtualcell] {path}: could not close the runs it names ({exc}); left for later",
                      file=sys.stderr)
                continue
            path.unlink()
    return closed


def start_workflow_run(
    *, uri: str, experiment: str, parent_run_file: str | Path, config: Mapping[str, Any],
    workdir: str | Path = ".",
) -> str:
    """Open the parent run of a workflow invocation and write its id for the jobs."""

    check_reachable(uri)
    _configure(uri, experiment)
    parent_run_file = Path(parent_run_file).resolve()
    close_abandoned_runs(parent_run_file.parent, uri=uri)
    tags = {TAG_KIND: "workflow"}
    commit = git_commit(workdir)
    if commit:
        tags[TAG_GIT] = commit
    run = mlflow.start_run(run_name=f"workflow-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    mlflow.log_dict(dict(config), "config.json")
    _write_parent_run_file(parent_run_file, run.info.run_id, uri)
    mlflow.end_run(status="RUNNING")
    return run.info.run_id


def end_workflow_run(*, uri: str, parent_run_file: str | Path, status: str,
                     log: str | Iterable[str] | None = None, summaries: Iterable[str | Path] = ()) -> None:
    """Close the parent run (FINISHED or FAILED) and attach the Snakemake log(s) and the datasets'
    summaries (``summaries``: the report step's summary tables and pages that exist, under ``summary/``).

    Job runs still open under it belong to jobs that were killed (out of memory, a time
    limit) while the workflow went on: they end KILLED. The parent-run file is removed.
    """
    from mlflow.tracking import MlflowClient

    path = Path(parent_run_file).resolve()
    if not path.exists():
        return
    client = MlflowClient(tracking_uri=uri)
    run_id = _parent_run_file_id(path)
    for log_path in [log] if isinstance(log, str) else (log or []):
        if Path(log_path).exists():
            client.log_artifact(run_id, str(log_path), artifact_path="snakemake")
    for summary in map(Path, summaries):
        if summary.exists():
            client.log_artifact(run_id, str(summary), artifact_path=f"summary/{summary.parent.parent.name}")
    experiment_id = client.get_run(run_id).info.experiment_id
    for child in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
    ):
        client.set_tag(child.info.run_id, TAG_ERROR, "killed: the job ended without closing its run")
        client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(run_id, status=status)
    path.unlink(missing_ok=True)
    if path in _held:
        _held.pop(path).close()


# ---------------------------------------------------------------------------
# child runs: one per job


class JobRun:
    """The handle a stage logs through; wraps one active MLflow run.

    Stage code receives it and never imports mlflow itself.
    """

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self._epochs: list[Any] = []  # per-epoch metrics not yet written (mlflow.entities.Metric)
        self._flushed = time.monotonic()

    def log_params(self, params: Mapping[str, Any], *, prefix: str = "") -> None:

        flat = _flatten(params, prefix)
        # MLflow caps a batch at 100 params and a value at 6000 characters.
        items = [(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:

        clean = {k: float(v) for k, v in _flatten(metrics).items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def epoch_logger(self, prefix: str) -> Callable[[int, Mapping[str, float]], None]:
        """A training-loop hook that logs per-epoch metrics under ``prefix``: ``simulate/loss``,
        ``embed/rna.loss`` (names read ``<stage>/<metric>``, which the MLflow UI groups by stage)."""
        sep = "." if "/" in prefix else "/"

        def hook(epoch: int, metrics: Mapping[str, float]) -> None:
            self._log_epoch({f"{prefix}{sep}{k}": v for k, v in metrics.items()}, step=epoch)

        return hook

    def _log_epoch(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Buffer one epoch's metrics; write them in one batch every EPOCH_FLUSH_S (and when the job
        ends). One write per epoch cost ~9 ms on a SQLite store: 1,200 a job for a perturb job's 300
        epochs, a third of what tracking added to the default run."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._epochs += [Metric(k, float(v), now, step) for k, v in _flatten(metrics).items() if _is_number(v)]
        if time.monotonic() - self._flushed >= EPOCH_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the buffered per-epoch metrics (MLflow takes at most 1,000 a batch)."""
        from mlflow.tracking import MlflowClient

        pending, self._epochs = self._epochs, []
        self._flushed = time.monotonic()
        if not pending:
            return
        client = MlflowClient()
        for i in range(0, len(pending), 1000):
            _with_retry(lambda part=pending[i : i + 1000]: client.log_batch(self.run_id, metrics=part))

    def log_figure(self, figure: Any, name: str) -> None:

        mlflow.log_figure(figure, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:

        mlflow.log_dict(dict(data), name)

    def log_table(self, table: Any, name: str) -> None:
        """Log a pandas DataFrame as a TSV artifact."""

        mlflow.log_text(table.to_csv(sep="\t", index=True), name)

    def log_text(self, text: str, name: str) -> None:

        mlflow.log_text(text, name)

    def log_artifact(self, path: str | Path, *, artifact_path: str | None = None) -> None:

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_virtual_cell(self, bundle: str | Path, *, name: str, registered_model_name: str | None,
                         input_example: Any, output_example: Any, params: Mapping[str, Any], description: str,
                         model_description: str, tags: Mapping[str, Any]) -> str:
        """Log the virtual cell (:mod:`virtualcell.cellmodel`'s bundle) as a pyfunc model; when a name is
        given, register it: ``model_description`` on the model, ``description`` and ``tags`` (the metrics
        it was judged by) on the version.
        """
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.tracking import MlflowClient
        from mlflow.types.schema import ParamSchema, ParamSpec

        # No input column schema: MLflow's would refuse integer counts for double columns ("Can not
        # safely convert int64 to float64") and drop genes the model does not know without a word; the
        # model matches genes by name itself, zero-fills missing ones and says how many (cellmodel).
        signature = ModelSignature(
            inputs=None, outputs=infer_signature(output_example).inputs,
            params=ParamSchema([ParamSpec(k, _param_type(v), v) for k, v in params.items()]))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=VirtualCellModel(),
            artifacts={"bundle": str(bundle)},
            input_example=(input_example, dict(params)),
            signature=signature,
            registered_model_name=registered_model_name,
            pip_requirements=_pip_requirements(),
        )
        if registered_model_name:
            client = MlflowClient()
            version = str(info.registered_model_version)
            client.update_model_version(registered_model_name, version, description=description)
            client.update_registered_model(registered_model_name, description=model_description)
            for key, value in tags.items():
                client.set_model_version_tag(registered_model_name, version, key, str(value))
        return info.model_uri


class NullRun(JobRun):
    """Used when a stage is run with ``--no-tracking`` (or in a workflow with ``mlflow.enabled: false``):
    logs nothing."""

    def __init__(self) -> None:
        super().__init__(None)

    def log_params(self, params, *, prefix=""):  # noqa: D102
        pass

    def _log_epoch(self, metrics, *, step):  # noqa: D102
        pass

    def flush(self):  # noqa: D102
        pass

    def log_metrics(self, metrics, *, step=None):  # noqa: D102
        pass

    def log_figure(self, figure, name):  # noqa: D102
        pass

    def log_dict(self, data, name):  # noqa: D102
        pass

    def log_table(self, table, name):  # noqa: D102
        pass

    def log_artifact(self, path, *, artifact_path=None):  # noqa: D102
        pass

    def set_tags(self, tags):  # noqa: D102
        pass

    def log_text(self, text, name):  # noqa: D102
        pass

    def log_virtual_cell(self, bundle, **kwargs):  # noqa: D102
        return ""


@contextlib.contextmanager
def job_run(
    *,
    rule: str,
    wildcards: Mapping[str, str],
    params: Mapping[str, Any],
    inputs: Iterable[str | Path],
    outputs: Iterable[str | Path],
    jobid: str | None = None,
    uri: str | None = None,
    experiment: str | None = None,
    parent_run_file: str | Path | None = None,
    enabled: bool = True,
) -> Iterator[JobRun]:
    """Open the child run of one job around its work.

    On success the outputs are hashed and their lineage files written; on an
    exception the run ends FAILED with the error text and the exception
    propagates (so Snakemake sees the job fail).
    """
    if not enabled or not tracking_enabled():
        yield NullRun()
        return

    inputs = [Path(p) for p in inputs]
    outputs = [Path(p) for p in outputs]
    uri = _job_uri(uri)
    check_reachable(uri)
    experiment_id = _configure(uri, experiment)
    parent_id = _parent_run_id(parent_run_file or os.environ.get(ENV_PARENT_RUN_FILE), experiment_id)
    upstream = sorted({r for p in inputs if (r := read_lineage(p))})
    tags = {
        TAG_KIND: "job",
        TAG_RULE: rule,
        TAG_WILDCARDS: json.dumps(dict(wildcards), sort_keys=True),
        TAG_UPSTREAM: ",".join(upstream),
        **{f"wildcard.{k}": v for k, v in wildcards.items()},
    }
    if jobid is not None:
        tags[TAG_JOBID] = str(jobid)
    if os.environ.get("SLURM_JOB_ID"):
        tags[TAG_SLURM_JOBID] = os.environ["SLURM_JOB_ID"]
    commit = git_commit()
    if commit:
        tags[TAG_GIT] = commit
    # Reads well in the run list: "simulate synthetic 2 seed1", "evaluate synthetic".
    run_name = " ".join([rule, *[f"seed{v}" if k == "seed" else str(v) for k, v in wildcards.items()]])
    active = _with_retry(
        lambda: mlflow.start_run(run_name=run_name, parent_run_id=parent_id, tags=tags)
    )
    handle = JobRun(active.info.run_id)
    try:
        handle.log_params(params)
        handle.log_dict(describe_files(inputs), "files/inputs.json")
        yield handle
        handle.flush()
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"job {rule} finished without writing {', '.join(missing)}")
        files = describe_files(outputs)
        handle.log_dict(files, "files/outputs.json")
        handle.set_tags({f"output.{Path(k).name}.sha256": v["sha256"] for k, v in files.items()})
        for p in outputs:
            write_lineage(p, active.info.run_id)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        try:
            handle.flush()  # the curve up to the failure
            mlflow.set_tag(TAG_ERROR, message[:5000])
            mlflow.log_text(message, "error.txt")
        finally:
            mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _parent_run_id(parent_file: str | Path | None, experiment_id: str) -> str | None:
    """The invocation's parent run, if its file names a run of this job's experiment."""
    if not parent_file or not Path(parent_file).exists():
        return None
    parent_id = _parent_run_file_id(parent_file)
    if not parent_id:
        return None
    try:
        parent = mlflow.get_run(parent_id)
    except Exception:
        parent = None
    if parent is None or parent.info.experiment_id != experiment_id:
        print(f"[virtualcell] {parent_file}: run {parent_id} is not a parent run of this job's experiment; "
              "the job's run is recorded without a parent", file=sys.stderr)
        return None
    return parent_id


def _with_retry(call: Callable[[], Any], attempts: int = 5) -> Any:
    """SQLite can still report a lock past its timeout under heavy contention: wait, retry."""
    for i in range(attempts):
        try:
            return call()
        except Exception as exc:  # pragma: no cover - depends on timing
            if "locked" not in str(exc) or i == attempts - 1:
                raise
            print(f"[virtualcell] tracking store locked ({exc}); retrying", file=sys.stderr)
            time.sleep(1 + i)


# ---------------------------------------------------------------------------
# the registered virtual cell: a pyfunc model

T_START = "t_start"
HORIZON = "horizon"


def simulator_input_example(states: np.ndarray, *, t_start: float, horizon: float) -> pd.DataFrame:
    """Coordinates in: one row per cell, state columns z0..z{d-1}, its start time and horizon."""
    from virtualcell.cellmodel import state_columns

    frame = pd.DataFrame(np.asarray(states, dtype=np.float64), columns=state_columns(states.shape[1]))
    frame[T_START] = float(t_start)
    frame[HORIZON] = float(horizon)
    return frame


def _param_type(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    return "boolean" if isinstance(value, bool) else "long" if isinstance(value, int) else "double"


class VirtualCellModel(mlflow.pyfunc.PythonModel):
    """The virtual cell over MLflow: genes in, genes out (:class:`virtualcell.cellmodel.VirtualCell`).

    Input: a DataFrame of cells x genes (gene names as columns; raw counts unless the model was
    trained on normalised or log values), or the path of an .h5ad (``layers['counts']``, else ``X``).
    Params: ``horizon`` (time to simulate), ``t_start`` (the cells' time), ``seed``, ``n_rollouts``
    (fate simulations per cell), ``n_steps``, ``sample`` (false: the decoder's mean expression rather
    than a sample), ``condition`` (datasets with conditions: "what if", the cells under a knock-down
    ``GeneX``, a drug or ``GeneA+GeneB``; empty: the control).
    Output: one row per cell: the simulated log-normalised expression of the training's highly
    variable genes, the simulated state ``z0..`` and ``p_<fate>``, the probability of each fate.

    Coordinates in, coordinates out: a DataFrame of only ``z0..z{d-1}`` (optionally ``t_start`` and
    ``horizon`` per row) returns the states moved by the simulator, ``z0..`` only.
    """

    def load_context(self, context) -> None:
        from virtualcell.cellmodel import VirtualCell

        self.cell = VirtualCell(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from virtualcell.cellmodel import state_columns

        params = dict(params or {})
        horizon = float(params.get(HORIZON, 1.0))
        t_start = float(params.get(T_START, self.cell.times[0]))
        seed = int(params.get("seed", 0))
        n_steps = int(params["n_steps"]) if params.get("n_steps") else None
        states = state_columns(int(self.cell.meta["state_dim"]))
        coordinates = isinstance(model_input, pd.DataFrame) and states[0] in model_input
        if coordinates and set(model_input.columns) <= {*states, T_START, HORIZON}:
            x = model_input[states].to_numpy(dtype=np.float32)
            starts = model_input[T_START].to_numpy(dtype=float) if T_START in model_input else np.full(len(x), t_start)
            spans = model_input[HORIZON].to_numpy(dtype=float) if HORIZON in model_input else np.full(len(x), horizon)
            out = np.empty_like(x)
            # Cells that share a start time and horizon are simulated together.
            for t0, span in sorted(set(zip(starts, spans))):
                rows = (starts == t0) & (spans == span)
                out[rows] = self.cell.simulate(x[rows], t_start=float(t0), horizon=float(span), seed=seed,
                                               n_steps=n_steps)
            return pd.DataFrame(out, columns=states, index=model_input.index)
        if isinstance(model_input, str | Path):
            from virtualcell.cellmodel import read_cells

            cells, values = read_cells(model_input)
            model_input = pd.DataFrame(index=cells.obs_names)
            genes = list(map(str, cells.var_names))
        else:
            values, genes = model_input.to_numpy(dtype=np.float64), list(map(str, model_input.columns))
        prediction = self.cell.predict(
            values, genes, horizon=horizon,
            t_start=t_start, seed=seed, n_rollouts=int(params["n_rollouts"]) if params.get("n_rollouts") else None,
            n_steps=n_steps, sample=bool(params.get("sample", True)), condition=params.get("condition") or None)
        return prediction.frame(index=model_input.index)


# ---------------------------------------------------------------------------
# files and lineage


def sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file (directories are walked)."""
    out: dict[str, dict[str, Any]] = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists() and not f.name.endswith(LINEAGE_SUFFIX):
                out[str(f)] = {"sha256": sha256(f), "size": f.stat().st_size}
    return out


def lineage_file(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}{LINEAGE_SUFFIX}"


def write_lineage(path: str | Path, run_id: str) -> None:
    atomic_write_text(lineage_file(path), run_id)


def read_lineage(path: str | Path) -> str | None:
    f = lineage_file(path)
    return f.read_text().strip() if f.exists() else None



def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and float(value) == float(value)
    except (TypeError, ValueError):
        return False


def _pip_requirements() -> list[str]:
    """Pin what the logged model needs to load, from what is installed now."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pandas", "mlflow")] + [
        f"virtualcell=={version('virtualcell')}"
    ]
