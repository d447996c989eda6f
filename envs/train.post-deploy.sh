#!/usr/bin/env bash
# Snakemake runs this once, inside the new env, after creating it from train.yaml: install
# virtualcell from this checkout without dependencies, so the env keeps exactly its pins.
set -euo pipefail
python -m pip install --no-deps --editable "$(dirname "$0")/.."
