"""Shared fixtures: tiny data made by the generator, the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = {"n_cells": 300, "n_genes": 100, "n_proteins": 8, "time_points": [0, 1, 2, 3, 4], "n_spots": 40, "seed": 0}


@pytest.fixture(scope="session")
def tiny_mdata():
    """A tiny synthetic dataset, ingested (harmonised) as the ingest stage does."""
    from virtualcell.io import read_dataset

    return read_dataset("tiny", {"source": "synthetic", "generator": TINY, "time_key": "time"})


@pytest.fixture()
def tracking_store(tmp_path, monkeypatch):
    """A real local MLflow store (SQLite) in a temporary folder, used through the environment."""
    from virtualcell import tracking

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, uri)
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, "test")
    monkeypatch.setenv(tracking.ENV_PARENT_RUN_FILE, str(tmp_path / "parent_run_id"))
    return uri


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run beside each other and beside workflow jobs on 2 cores: one torch thread each."""
    import torch

    torch.set_num_threads(1)


STANDALONE = "standalone"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{STANDALONE}: a test whose run shares nothing; any test worker may take it")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The suite runs on two pytest-xdist workers (pyproject's addopts, ``--dist loadgroup``): a file's
    tests stay together on one worker, so its module fixtures (a workflow run, a SLURM cluster, an
    MLflow server) are made once; tests marked standalone (each end-to-end run in a folder of its
    own) go one at a time to whichever worker is free."""
    for item in items:
        if item.get_closest_marker(STANDALONE) is None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
