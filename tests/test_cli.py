"""The command line a user reads: `virtualcell --help` lists every step, and each step's --help
documents every argument."""

from __future__ import annotations

import argparse
import subprocess
import sys

from virtualcell.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_every_step_of_the_dag_and_predict():
    done = subprocess.run([sys.executable, "-m", "virtualcell.cli", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for step in ("ingest", "qc", "pair", "embed", "align", "simulate", "decode", "perturb", "evaluate", "report",
                 "predict"):
        assert step in done.stdout
    assert set(_subcommands()) == {"ingest", "qc", "pair", "embed", "align", "simulate", "decode", "perturb", "evaluate",
                                   "report", "predict"}


def test_every_argument_of_every_step_is_documented():
    undocumented = [f"{name} {a.option_strings[0]}" for name, sub in _subcommands().items() for a in sub._actions
                    if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []


def test_ingest_and_qc_jobs_start_without_torch_or_pot(tmp_path):
    """The workflow's first two jobs run one after the other before anything else can start; they use
    neither torch nor POT, and importing them (only to cap torch's threads, or through the metrics
    module) cost each job seconds."""
    heavy = ("torch", "ot")
    steps = [
        ["ingest", "--dataset", "synthetic", "--output", "ingest.h5mu",
         "--params", '{"source": "synthetic", "generator": {"n_cells": 60, "n_spots": 50}}'],
        ["qc", "--dataset", "synthetic", "--input", "ingest.h5mu", "--output", "qc.h5mu", "--summary", "qc.json",
         "--figures", "qc", "--params", "{}"],
    ]
    for step in steps:
        argv = [*step, "--threads", "1", "--no-tracking"]
        probe = ("import atexit, sys\n"
                 f"atexit.register(lambda: print('IMPORTED', [m for m in {heavy!r} if m in sys.modules]))\n"
                 "from virtualcell.cli import main\n"
                 f"main({argv!r})\n")
        done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "IMPORTED []" in done.stdout, (step[0], done.stdout[-2000:])
    assert (tmp_path / "qc.h5mu").stat().st_size > 0
