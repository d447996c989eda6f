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
