"""The conda environments (envs/*.yaml, for `--software-deployment-method conda`) stay in step with
pyproject.toml, and every rule runs in one of them.

Conda itself cannot run here, so the environments are not built; what is checked is what can
drift: the pins, the coverage of the project's dependencies, and the rules' `conda:` directives.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import REPO

ENVS = REPO / "envs"
RULES = REPO / "workflow" / "rules"
# Used by the Snakemake process itself (scheduling, SLURM submission, the report), never
# inside a job's environment.
WORKFLOW_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "pygments"}
ENV_FILES = sorted(ENVS.glob("*.yaml"))


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["dependencies"])}


def env_spec(path: Path) -> tuple[list[str], list[Requirement]]:
    """An env file's conda dependencies and its pip requirements."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [Requirement(r) for d in deps if isinstance(d, dict) for r in d.get("pip", [])]
    return conda, pip


def rule_blocks() -> dict[str, tuple[Path, str]]:
    """Every rule of workflow/rules/*.smk: name -> (file, text of its block)."""
    blocks = {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^rule (\w+):", text, re.M)]
        for (start, name), (end, _) in zip(starts, [*starts[1:], (len(text), "")]):
            blocks[name] = (smk, text[start:end])
    return blocks


def test_there_is_an_env_per_rule_group():
    assert {p.stem for p in ENV_FILES} == {"data", "train", "evaluate"}


@pytest.mark.parametrize("env", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_equal_pyprojects(env):
    conda, pip = env_spec(env)
    pins = pinned()
    python = [d for d in conda if re.match(r"python\s*[=<>]", d)]
    assert len(python) == 1 and "pip" in conda, conda
    version = re.sub(r"^python\s*=*", "", python[0])
    assert version in SpecifierSet(pyproject()["requires-python"]), python
    assert pip, f"{env.name} lists no packages"
    for req in pip:
        name = canonicalize_name(req.name)
        assert name in pins, f"{env.name}: {req} is not a dependency in pyproject.toml"
        assert name not in WORKFLOW_ONLY, f"{env.name}: {req} runs in the Snakemake process, not in jobs"
        assert req.specifier == pins[name].specifier, f"{env.name}: {req}, but pyproject.toml has {pins[name]}"


def test_every_job_dependency_is_in_some_env():
    listed = {canonicalize_name(r.name) for env in ENV_FILES for r in env_spec(env)[1]}
    missing = set(pinned()) - WORKFLOW_ONLY - listed
    assert not missing, f"pyproject.toml dependencies in no envs/*.yaml: {sorted(missing)}"


@pytest.mark.parametrize("env", ENV_FILES, ids=lambda p: p.name)
def test_virtualcell_itself_is_installed_without_deps(env):
    """The env's packages come from its file; the project is added after, without pulling more."""
    script = env.with_suffix(".post-deploy.sh")
    assert script.is_file() and os.access(script, os.X_OK), script
    assert re.search(r"pip install --no-deps --editable \"\$\(dirname \"\$0\"\)/\.\.\"", script.read_text())


def test_every_rule_names_an_env():
    blocks = rule_blocks()
    assert {"ingest", "qc", "pair", "embed", "align", "simulate", "evaluate", "report"} <= set(blocks)
    used = set()
    for name, (smk, block) in blocks.items():
        found = re.search(r"^    conda:\n\s+\"([^\"]+)\"", block, re.M)
        assert found, f"rule {name} ({smk.name}) has no conda: directive"
        env = (smk.parent / found.group(1)).resolve()
        assert env.parent == ENVS and env.is_file(), f"rule {name}: {found.group(1)} is not a file in envs/"
        used.add(env)
    assert used == set(ENV_FILES)
    # the rules that ask for a GPU share the training environment
    for name, (_, block) in blocks.items():
        if re.search(r"^\s+gpu=", block, re.M):
            assert "envs/train.yaml" in block, name


def test_snakemake_lint_finds_an_env_for_every_rule(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--lint",
         "--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "test.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    text = done.stdout + done.stderr
    assert "Lints for rule" in text or "Congratulations" in text, text[-3000:]  # the workflow was linted
    assert "Specify a conda environment" not in text, text[-3000:]
