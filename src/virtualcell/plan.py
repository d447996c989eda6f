"""What the Snakefile reads while it plans the DAG: names, labels and checks, and nothing heavy.

Snakemake parses the Snakefile on every invocation (dry runs and reruns with nothing to do
included), and on a cluster every job parses it again. Importing the modules these names used to
live in (stages, timecourse, tracking: torch, POT, MLflow, anndata) took ~4 s of a 5 s "nothing to
be done"; this module imports only numpy and the standard library, so planning takes about a
second. The modules that use these names at run time import them from here (and tracking
re-exports its part), so each is defined once.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from virtualcell.errors import InputError

# ---------------------------------------------------------------------------
# modalities (io's and pairing's names)

RNA = "rna"
PROT = "prot"
ATAC = "atac"
SPATIAL = "spatial"
IMAGE = "image"  # patches of the tissue image under each spot: the partner of spatial expression


def partner_modality(modalities: list[str]) -> str | None:
    """What a dataset's expression is aligned with, from its declared modalities.

    ``prot`` when cells have protein counts; else ``atac`` when they have peaks (10x Multiome; with
    both, as in TEA-seq, protein is aligned and the peaks are QC'd and carried); ``image`` (patches
    of the tissue image under each spot) for a spatial dataset without single-cell RNA; None for RNA
    alone (no alignment).
    """
    if RNA in modalities:
        return next((m for m in (PROT, ATAC) if m in modalities), None)
    if SPATIAL in modalities:
        return IMAGE
    raise InputError(f"{list(modalities)} has no expression modality; add rna (cells) or spatial (spots)")


# ---------------------------------------------------------------------------
# time points and holdouts (the {holdout} wildcard)

NO_HOLDOUT = "none"
LAST = "last"  # the holdout of the last time point: extrapolated from the earlier ones


def holdout_label(time: float) -> str:
    """The {holdout} wildcard of a time point: 2.0 -> '2', 0.5 -> '0.5'."""
    return f"{float(time):g}"


def check_holdouts(holdouts: str | list[float], times: np.ndarray, *, origin: str) -> None:
    """Every listed held-out time point must be an interior time point (``auto`` picks them so)."""
    if holdouts != "auto":
        interior = [holdout_label(t) for t in times[1:-1]]
        for time in holdouts:
            if holdout_label(time) not in interior:
                raise InputError(
                    f"{origin}: held-out time point '{holdout_label(time)}' is not an interior time point; choose "
                    f"from {interior} (the last one is held out for extrapolation by evaluate.extrapolate)"
                )


# ---------------------------------------------------------------------------
# conditions (the {condition} wildcard)


def condition_label(name: str) -> str:
    """The condition as it appears in file paths and the {condition} wildcard."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name))


def holdout_conditions(dataset: str, spec: Mapping[str, Any]) -> list[str]:
    """The conditions a dataset holds out whole: its ``holdout_conditions``, or for ``auto`` the built-in
    data's own choice (none for a file: list them)."""
    held = spec.get("holdout_conditions", "auto")
    if held != "auto":
        return [str(h) for h in held]
    generator = spec.get("generator") or {}
    if spec.get("source") == "synthetic" and generator.get("cells_per_condition"):
        from virtualcell.synthetic_conditions import planned

        return planned(generator)[1]
    if spec.get("condition_key"):
        raise InputError(f"config datasets.{dataset}.holdout_conditions: 'auto' needs the built-in data with "
                         "perturbations; list the conditions to hold out (or [] for none)")
    return []


# The simulate settings the decoder uses (its rule passes only these, so changing the dynamics'
# settings does not refit it).
DECODER_PARAMS = ("decoder_epochs", "steps_per_epoch", "batch_size", "lr", "n_hidden", "seed")

# ---------------------------------------------------------------------------
# tracking settings: how the Snakefile tells its jobs where to track (virtualcell.tracking, the
# MLflow module, re-exports these)

ENV_TRACKING_URI = "VIRTUALCELL_TRACKING_URI"
ENV_EXPERIMENT = "VIRTUALCELL_EXPERIMENT"
ENV_PARENT_RUN_FILE = "VIRTUALCELL_PARENT_RUN_FILE"
# Set to "1" by the workflow when config mlflow.enabled is false: its jobs then log nothing (as with
# --no-tracking). An environment variable, like the URI, so switching tracking off reruns nothing.
ENV_NO_TRACKING = "VIRTUALCELL_NO_TRACKING"
DEFAULT_STORE = "results/mlflow.db"
# SQLite serialises writers; parallel jobs wait on the lock instead of failing.
SQLITE_TIMEOUT_S = 120
# How long a tracking server may take to answer before the workflow (or a job) gives up on it.
REACHABLE_TIMEOUT_S = 5.0
PARENT_RUN_DIR = ".virtualcell"
PARENT_RUN_SUFFIX = ".parent_run_id"


def tracking_enabled() -> bool:
    """False when the workflow runs with ``mlflow.enabled: false`` (its jobs inherit the switch)."""
    return os.environ.get(ENV_NO_TRACKING) != "1"


def resolve_tracking_uri(configured: str | None = None, *, workdir: str | Path = ".") -> str:
    """Return the tracking URI: config value, else ``MLFLOW_TRACKING_URI``, else the local store.

    A relative SQLite path is made absolute against ``workdir`` so jobs that
    run elsewhere (another node, another working directory) write to the
    same store, and a lock timeout is added so parallel jobs queue on the
    SQLite lock instead of failing.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///"):
        path, _, query = uri[len("sqlite:///") :].partition("?")
        if not os.path.isabs(path):
            path = str((Path(workdir) / path).resolve())
        if "timeout=" not in query:
            query = "&".join(q for q in (query, f"timeout={SQLITE_TIMEOUT_S}") if q)
        uri = f"sqlite:///{path}?{query}"
    elif "://" not in uri:
        # A bare folder is MLflow's file store; keep it absolute for the same reason.
        uri = str(Path(workdir, uri).resolve())
    return uri


class UnreachableServerError(InputError, RuntimeError):
    """The tracking server does not answer: one line naming the URI, like any bad input."""


def check_reachable(uri: str, *, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer.

    Any HTTP answer counts as reachable (a proxy that asks for credentials answers 401);
    only a refused, unresolvable or silent connection fails, within ``timeout_s``.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc or type(exc).__name__
        raise UnreachableServerError(
            f"mlflow.tracking_uri: {uri} is not reachable ({reason}, waited at most {timeout_s:g} s); start the "
            "tracking server, or fix mlflow.tracking_uri in the config / MLFLOW_TRACKING_URI"
        ) from None


def new_parent_run_file(results: str | Path) -> Path:
    """A fresh path for one workflow invocation's parent run id, under ``results``.

    One per invocation, not one per results folder: two invocations that share the
    folder (other configs, other targets) then never read each other's parent run id.
    """
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}{PARENT_RUN_SUFFIX}"
    return (Path(results) / PARENT_RUN_DIR / name).resolve()
