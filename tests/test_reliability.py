"""Bad input: every case ends with one clear line, exit code 1, no output, and a FAILED MLflow run.

Each case below runs the real step (``virtualcell.cli.main``, as the rule runs it, with
``--params``) against a real SQLite MLflow store, and checks: exit code 1; exactly one
stderr line starting ``error: ``, naming the file or config key; no output file (and no
temp file) left behind; the job's MLflow run FAILED with the message in its error tag.
Config errors and an unreachable tracking server are caught when the workflow starts,
before any job: those cases run ``snakemake`` and check the message and the time taken.

The table of cases (case -> where it is caught -> the message) is in tests/README.md;
``test_the_readme_table_lists_every_case`` keeps the two in step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY
from virtualcell import cli, io, tracking
from virtualcell.config import validate_config

N_CELLS, N_GENES = 48, 12


def _spec(path: Path | None = None, **overrides) -> dict:
    """A valid dataset section (defaults filled), pointing at ``path``."""
    spec = {"source": "h5ad", "path": str(path), "time_key": "day", "protein_obsm_key": "protein",
            "holdouts": [1, 2], **overrides}
    return validate_config({"datasets": {"d": spec}})["datasets"]["d"]


def _section(name: str, **overrides) -> dict:
    return validate_config({"datasets": {"d": {"source": "synthetic"}}, name: overrides})[name]


def _adata(*, times=(0, 1, 2, 3), x=None, names=None) -> ad.AnnData:
    """Small but valid: integer counts, 4 time points in obs 'day', protein counts in obsm."""
    rng = np.random.default_rng(0)
    names = names if names is not None else [f"c{i}" for i in range(N_CELLS)]
    obs = pd.DataFrame({"day": np.resize(np.asarray(times), len(names))}, index=names)
    x = x if x is not None else rng.poisson(3, size=(len(names), N_GENES)).astype(np.float32)
    adata = ad.AnnData(X=x, obs=obs)
    adata.var_names = [f"g{j}" for j in range(x.shape[1])]
    adata.obsm["protein"] = rng.poisson(5, size=(len(names), 4)).astype(np.float32)
    return adata


def _write_h5ad(path: Path, adata: ad.AnnData) -> Path:
    adata.write_h5ad(path)
    return path


def _mudata(rna: ad.AnnData | None, prot: ad.AnnData | None) -> md.MuData:
    mods = {k: v for k, v in (("rna", rna), ("prot", prot)) if v is not None}
    return md.MuData(mods)


def _prot(names) -> ad.AnnData:
    x = np.random.default_rng(1).poisson(5, size=(len(names), 4)).astype(np.float32)
    return ad.AnnData(X=x, obs=pd.DataFrame(index=list(names)),
                      var=pd.DataFrame(index=[f"p{j}" for j in range(4)]))


def _shared(path: Path, *, time=True, n_per_time=20, times=(0, 1, 2, 3, 4)) -> Path:
    """What the align stage writes, as far as simulate and evaluate read it."""
    rng = np.random.default_rng(0)
    n = n_per_time * len(times)
    obs = pd.DataFrame({"split": pd.Categorical(["train"] * n)}, index=[f"c{i}" for i in range(n)])
    if time:
        obs["time"] = np.repeat(np.asarray(times, dtype=float), n_per_time)
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_shared"] = rng.normal(size=(n, 6)).astype(np.float32)
    adata.write_h5ad(path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------------------
# the table of step-level cases


@dataclass
class Step:
    """One bad-input run of a step: its argv, its outputs and the name its error must contain."""

    argv: list[str]
    outputs: list[Path]
    names: str
    says: str


def _ingest(tmp: Path, spec: dict, *, names: str | None = None) -> Step:
    out = tmp / "results" / "d" / "ingest.h5mu"
    return Step(["ingest", "--dataset", "d", "--output", str(out), "--params", json.dumps(spec)], [out],
                names or str(spec["path"]), "")


def case_corrupt_h5ad(tmp):
    path = tmp / "corrupt.h5ad"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    return _ingest(tmp, _spec(path)), "cannot be read as .h5ad"


def case_truncated_h5ad(tmp):
    path = _truncate(_write_h5ad(tmp / "cut.h5ad", _adata()))
    return _ingest(tmp, _spec(path)), "cannot be read as .h5ad"


def case_truncated_pipeline_file(tmp, tiny_mdata):
    path = tmp / "results" / "d" / "ingest.h5mu"
    io.write_h5mu(tiny_mdata, path)
    _truncate(path)
    out = tmp / "results" / "d"
    outputs = [out / "qc.h5mu", out / "qc" / "qc.json", out / "qc" / "figures"]
    argv = ["qc", "--dataset", "d", "--input", str(path), "--output", str(outputs[0]), "--summary",
            str(outputs[1]), "--figures", str(outputs[2]), "--params", json.dumps(_section("qc"))]
    return Step(argv, outputs, str(path), ""), "cannot be read as .h5mu"


def case_empty_file(tmp):
    path = tmp / "empty.h5ad"
    path.write_bytes(b"")
    return _ingest(tmp, _spec(path)), "empty file (0 bytes)"


def case_h5ad_declared_h5mu(tmp):
    path = _write_h5ad(tmp / "data.h5mu", _adata())
    return _ingest(tmp, _spec(path, source="h5mu")), "it is an .h5ad file; declare source: h5ad"


def case_csv_declared_h5ad(tmp):
    path = tmp / "counts.h5ad"
    path.write_text("cell,g0,g1\nc0,1,2\n")
    return _ingest(tmp, _spec(path)), "not an HDF5 file, it holds text"


def case_path_does_not_exist(tmp):
    return _ingest(tmp, _spec(tmp / "nowhere.h5ad")), "file not found (config datasets.d.path)"


def case_h5mu_without_rna(tmp):
    path = tmp / "prot_only.h5mu"
    _mudata(None, _prot([f"c{i}" for i in range(N_CELLS)])).write(path)
    return _ingest(tmp, _spec(path, source="h5mu")), "no 'rna' modality (found ['prot']); config datasets.d.modalities"


def case_h5mu_without_prot(tmp):
    path = tmp / "rna_only.h5mu"
    _mudata(_adata(), None).write(path)
    return _ingest(tmp, _spec(path, source="h5mu")), "no 'prot' modality (found ['rna']); config datasets.d.modalities"


def case_protein_obsm_key_missing(tmp):
    path = _write_h5ad(tmp / "data.h5ad", _adata())
    return _ingest(tmp, _spec(path, protein_obsm_key="adt")), "obsm has no 'adt'"


def case_no_common_barcodes(tmp):
    path = tmp / "disjoint.h5mu"
    rna = _adata()
    _mudata(rna, _prot([f"{n}-1" for n in rna.obs_names])).write(path)
    return _ingest(tmp, _spec(path, source="h5mu")), "RNA and protein share no cell barcodes"


def case_duplicate_barcodes(tmp):
    names = [f"c{i}" for i in range(N_CELLS)]
    names[1] = "c0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the very thing this case is about
        path = _write_h5ad(tmp / "dup.h5ad", _adata(names=names))
    return _ingest(tmp, _spec(path)), "duplicate cell barcode 'c0'"


def _counts_case(tmp, value, says):
    x = np.random.default_rng(0).poisson(3, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[3, 2] = value
    path = _write_h5ad(tmp / "counts.h5ad", _adata(x=x))
    return _ingest(tmp, _spec(path)), says


def case_negative_counts(tmp):
    return _counts_case(tmp, -1.0, "counts contain negative values")


def case_non_integer_counts(tmp):
    return _counts_case(tmp, 2.5, "counts are not integers")


def case_nan_counts(tmp):
    return _counts_case(tmp, np.nan, "counts contain NaN or infinite values")


def case_time_column_missing(tmp):
    path = _write_h5ad(tmp / "data.h5ad", _adata())
    step = _ingest(tmp, _spec(path, time_key="timepoint"))
    return step, "no obs column 'timepoint' (config time_key"


def case_time_not_numeric(tmp):
    path = _write_h5ad(tmp / "data.h5ad", _adata(times=("early", "mid", "late")))
    return _ingest(tmp, _spec(path)), "time column 'day' has non-numeric values"


def case_fewer_than_three_time_points(tmp):
    path = _write_h5ad(tmp / "data.h5ad", _adata(times=(0, 1)))
    return _ingest(tmp, _spec(path, holdouts=[])), "2 time point(s) [0.0, 1.0]; the simulator needs at least 3"


def case_holdout_not_interior_at_ingest(tmp):
    path = _write_h5ad(tmp / "data.h5ad", _adata())
    step = _ingest(tmp, _spec(path, holdouts=[0]))
    step.names = "datasets.d.holdouts"
    return step, "held-out time point '0' is not an interior time point; choose from ['1', '2']"


def _simulate(tmp, shared: Path, holdout: str) -> Step:
    out = tmp / "results" / "d" / "simulate" / holdout
    outputs = [out / "simulator.pt", out / "trajectories.png"]
    argv = ["simulate", "--dataset", "d", "--holdout", holdout, "--input", str(shared), "--output",
            str(outputs[0]), "--figure", str(outputs[1]), "--device", "cpu", "--params",
            json.dumps(_section("simulate"))]
    return Step(argv, outputs, str(shared), "")


def case_holdout_not_interior_at_simulate(tmp):
    return _simulate(tmp, _shared(tmp / "shared.h5ad"), "0"), "held-out time point '0' is not a later time point"


def case_no_time_labels_for_the_simulator(tmp):
    return _simulate(tmp, _shared(tmp / "shared.h5ad", time=False), "none"), "no time labels (obs 'time')"


def case_spatial_spots_outside_image(tmp):
    from virtualcell.synthetic import generate

    mdata = generate(**TINY)
    mdata["spatial"].obsm["spatial"][:3] += 10_000
    path = tmp / "spatial.h5mu"
    mdata.write(path)
    spec = _spec(path, source="h5mu", time_key="time", protein_obsm_key=None, modalities=["rna", "prot", "spatial"])
    return _ingest(tmp, spec), (
        "3 of 40 spots lie outside the hires image"
    )


def case_every_cell_removed_by_qc(tmp, tiny_mdata):
    path = tmp / "results" / "d" / "ingest.h5mu"
    io.write_h5mu(tiny_mdata, path)
    out = tmp / "results" / "d"
    outputs = [out / "qc.h5mu", out / "qc" / "qc.json", out / "qc" / "figures"]
    argv = ["qc", "--dataset", "d", "--input", str(path), "--output", str(outputs[0]), "--summary",
            str(outputs[1]), "--figures", str(outputs[2]),
            "--params", json.dumps(_section("qc", min_counts=10**9))]
    return Step(argv, outputs, "qc.min_counts", ""), "qc.min_counts=1000000000 removes every remaining cell"


def case_corrupt_model_file(tmp):
    shared = _shared(tmp / "shared.h5ad")
    model = tmp / "results" / "d" / "simulate" / "2" / "simulator.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"PK\x03\x04" + os.urandom(500))
    out = tmp / "results" / "d" / "evaluate"
    outputs = [out / "metrics.json", out / "evaluation.png"]
    argv = ["evaluate", "--dataset", "d", "--shared", str(shared), "--simulator", f"2={model}",
            "--output", str(outputs[0]), "--figure", str(outputs[1]), "--params", json.dumps(_section("evaluate"))]
    return Step(argv, outputs, str(model), ""), "cannot be loaded as a Simulator"


CASES: dict[str, Callable] = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite store for the table; each case logs to its own experiment."""
    return tracking.resolve_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db")


def _build(name, tmp_path, request):
    fn = CASES[name]
    extra = [request.getfixturevalue("tiny_mdata")] if "tiny_mdata" in fn.__code__.co_varnames else []
    step, says = fn(tmp_path, *extra)
    step.says = says
    return step


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_with_one_line_no_output_and_a_failed_run(name, tmp_path, store, monkeypatch, capsys,
                                                                 request):
    step = _build(name, tmp_path, request)
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, store)
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, name)
    monkeypatch.setenv(tracking.ENV_PARENT_RUN_FILE, str(tmp_path / "no_parent"))
    capsys.readouterr()

    assert cli.main(step.argv) == 1

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    message = errors[0][len("error: "):]
    assert step.names in message and step.says in message, message
    # no output, and no temp file that a rerun could trip over
    for output in step.outputs:
        assert not output.exists(), output
        if output.parent.exists():
            assert not [p.name for p in output.parent.iterdir() if ".tmp" in p.name]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert message in runs[0].data.tags[tracking.TAG_ERROR]


def test_the_readme_table_lists_every_case():
    table = (REPO / "tests" / "README.md").read_text()
    assert len(CASES) + len(START_CASES) >= 15
    for name in [*CASES, *START_CASES, "unreachable", "silent"]:
        assert f"| `{name}` |" in table, f"case {name} is not in the table in tests/README.md"


def test_a_valid_file_passes_ingest(tmp_path, monkeypatch):
    """The cases above fail for their own reason: the same data, unbroken, ingests."""
    path = _write_h5ad(tmp_path / "data.h5ad", _adata())
    step = _ingest(tmp_path, _spec(path))
    assert cli.main([*step.argv, "--no-tracking"]) == 0
    mdata = io.read_h5mu(step.outputs[0])
    assert set(mdata.mod) == {"rna", "prot"} and mdata["rna"].obs["time"].nunique() == 4


def test_the_console_script_prints_one_line_and_exits_1(tmp_path):
    """The same contract through the installed ``virtualcell`` command, in its own process."""
    step, _ = case_csv_declared_h5ad(tmp_path)
    done = subprocess.run([shutil.which("virtualcell"), *step.argv, "--no-tracking"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert not step.outputs[0].exists()


def test_a_failed_step_removes_the_outputs_it_had_written(tmp_path, tiny_mdata, monkeypatch):
    """qc writes its summary before its data: a failure after it leaves no summary (and no figures),
    so no partial set of outputs looks finished; an older file at an output path is left alone."""
    path = tmp_path / "ingest.h5mu"
    io.write_h5mu(tiny_mdata, path)
    outputs = [tmp_path / "qc.h5mu", tmp_path / "qc.json", tmp_path / "figures"]
    outputs[0].write_text("from an earlier run")
    os.utime(outputs[0], (time.time() - 3600, time.time() - 3600))

    def disk_full(mdata, target):
        raise io.InputError(f"{target}: no space left on device; free some space")

    monkeypatch.setattr(io, "write_h5mu", disk_full)
    argv = ["qc", "--dataset", "d", "--input", str(path), "--output", str(outputs[0]), "--summary",
            str(outputs[1]), "--figures", str(outputs[2]), "--no-tracking", "--params", json.dumps(_section("qc"))]
    assert cli.main(argv) == 1
    assert [p.name for p in outputs if p.exists()] == ["qc.h5mu"]
    assert outputs[0].read_text() == "from an earlier run"


# ---------------------------------------------------------------------------
# caught when the workflow starts, before any job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _silent_server():
    """A server that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _snakemake(workdir: Path, config: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    (workdir / "override.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", *args,
           "--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml"),
           str(workdir / "override.yaml")]
    start = time.monotonic()
    # stderr=STDOUT: Snakemake logs to stdout in a dry run and to stderr otherwise.
    done = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    return done, time.monotonic() - start


START_CASES = {
    "unknown_key": ("qc:\n  min_gene: 3\n", "config: unknown config key qc.min_gene;"),
    "wrong_type": ("embed:\n  epochs: many\n", "config key embed.epochs: 'many' is not of type 'integer'"),
    "holdout_not_interior": ("datasets:\n  synthetic:\n    holdouts: [0]\n",
                             "config datasets.synthetic.holdouts: held-out time point '0' is not an interior"),
}


@pytest.mark.parametrize("name", START_CASES)
def test_config_errors_stop_the_workflow_before_any_job(name, tmp_path):
    override, says = START_CASES[name]
    done, seconds = _snakemake(tmp_path, override)
    assert done.returncode != 0
    assert says in done.stdout, done.stdout[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    assert seconds < 30


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_an_unreachable_tracking_server_stops_the_workflow_before_any_job_starts(dry_run, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    done, seconds = _snakemake(tmp_path, f"mlflow:\n  tracking_uri: {uri}\n", *(["-n"] if dry_run else []))
    assert done.returncode != 0
    assert f"mlflow.tracking_uri: {uri} is not reachable" in done.stdout, done.stdout[-2000:]
    # The check waits at most 5 s; the rest is Snakemake's start, which took 18 s on a loaded 2-core
    # machine: the bound tells failing fast from waiting out a connection, not how fast.
    assert seconds < 60
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_a_silent_tracking_server_stops_the_workflow_before_any_job_starts(tmp_path):
    with _silent_server() as uri:
        done, seconds = _snakemake(tmp_path, f"mlflow:\n  tracking_uri: {uri}\n")
    assert done.returncode != 0
    assert f"mlflow.tracking_uri: {uri} is not reachable (timed out" in done.stdout, done.stdout[-2000:]
    # The check waits at most 5 s; the rest is Snakemake's start, which took 18 s on a loaded 2-core
    # machine: the bound tells failing fast from waiting out a connection, not how fast.
    assert seconds < 60
    assert not (tmp_path / "logs").exists()


def test_a_step_run_by_hand_against_an_unreachable_server_fails_in_one_line(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, uri)
    step, _ = case_path_does_not_exist(tmp_path)
    start = time.monotonic()
    assert cli.main(step.argv) == 1
    assert time.monotonic() - start < 10
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and f"{uri} is not reachable" in errors[0]


# ---------------------------------------------------------------------------
# atomic outputs

WRITERS = {"write", "write_h5ad", "write_h5mu", "write_text", "write_bytes", "savefig", "save", "to_csv", "dump"}


def test_every_file_a_stage_writes_goes_through_an_atomic_writer():
    """In the stage modules (stages.py, report.py) a file is written only by io.write_* (atomic), or inside
    io.atomic_write(path, writer), model.save included: no writer call or open() elsewhere, so no
    half-written file can sit at an output path."""
    import ast

    source = "\n".join((REPO / "src" / "virtualcell" / name).read_text() for name in ("stages.py", "report.py"))
    tree = ast.parse(source)
    allowed: set[int] = set()  # nodes inside the writer argument of io.atomic_write(path, writer)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "io.atomic_write":
            allowed |= {id(n) for n in ast.walk(node.args[1])}
    offenders = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in WRITERS and id(node) not in allowed
                and ast.unparse(node.value) != "io"):
            offenders.append(ast.unparse(node))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in {"open", "torch.save", "os.replace"}:
            offenders.append(ast.unparse(node))
    assert offenders == []
    assert allowed, "no io.atomic_write call found: the check would pass vacuously"


# ---------------------------------------------------------------------------
# security


def test_every_torch_load_in_src_is_weights_only():
    calls = []
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        start = 0
        while (i := text.find("torch.load(", start)) >= 0:
            start = text.find(")", i) + 1
            calls.append((path.name, text[i:start]))
    assert calls, "no torch.load found: the check would pass vacuously"
    for name, call in calls:
        assert "weights_only=True" in call, (name, call)


class _Payload:
    """Pickles to a call of ``open(marker, 'w')``: loading it with full unpickling runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_model_file_carrying_code_is_refused_without_running_it(tmp_path):
    import torch

    from virtualcell.models.dynamics import Simulator

    marker = tmp_path / "pwned"
    path = tmp_path / "simulator.pt"
    torch.save({"format": "virtualcell-model", "payload": _Payload(marker)}, path)
    with pytest.raises(io.InputError, match=r"simulator\.pt: cannot be loaded as a Simulator"):
        io.read_model(Simulator, path)
    assert not marker.exists()


def test_no_server_the_project_starts_listens_beyond_loopback():
    """src/ starts no server; the scripts and test services that start one (mlflow server) bind 127.0.0.1."""
    import re

    files = [p for folder in ("src", "workflow", "scripts", "profiles", "tests") for p in (REPO / folder).rglob("*")
             if p.is_file() and p.suffix in {".py", ".smk", ".sh", ".yaml"} and p.name != Path(__file__).name]
    for path in [*files, REPO / "Snakefile"]:
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        hosts = re.findall(r"""--host["',\s=]+([^"',\s]+)""", text)
        assert all(h in ("127.0.0.1", "localhost") for h in hosts), (path, hosts)
    for path in (REPO / "src").rglob("*.py"):
        assert not re.search(r"""["']server["']""", path.read_text()), f"{path} starts a server"
