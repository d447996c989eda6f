"""The report step: log the virtual cell (genes in, genes out), register it, and write the summary.

The MLflow side is :meth:`virtualcell.tracking.JobRun.log_virtual_cell`; the model itself is
:mod:`virtualcell.cellmodel`; the headlines are :mod:`virtualcell.summary`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virtualcell import cellmodel, io
from virtualcell import summary as headlines
from virtualcell.stages import say
from virtualcell.tracking import JobRun

# The virtual cell's folder beside model.json when the run is not tracked.
KEPT_BUNDLE = "virtual_cell"


def register(*, simulator: str, shared: str, expression: str, metrics: str, output: str, summary: str,
             dataset: str, params: Mapping[str, Any], run: JobRun, encoder: str | None = None,
             aligner: str | None = None, decoder: str | None = None, page: str | None = None,
             predictor: str | None = None, perturbation: tuple[str, ...] | None = None) -> None:
    """Log the virtual cell (genes in, genes out: :mod:`virtualcell.cellmodel`) as a pyfunc model and
    register it as ``virtualcell-{dataset}``, with the summary of the metrics it was judged by.

    ``simulator`` is the model trained on every time point; ``encoder`` (the RNA encoder),
    ``aligner``, ``predictor`` (the partner from RNA) and ``decoder`` take expression to its states and
    back, as the state space needs; ``perturbation`` (model, map[, dynamics]) answers "what if" (a ``condition`` param).
    """
    from virtualcell.models.dynamics import Simulator

    io.read_model(Simulator, simulator)  # a corrupt file fails here, named, not inside MLflow
    data = io.read_h5ad(shared)
    paired = io.read_h5mu(expression)
    rna = paired.mod[io.expression_modality(paired)]
    # Not tracked (mlflow.enabled: false, or --no-tracking): nothing is logged or registered, so the
    # virtual cell is kept as a folder beside model.json, which `virtualcell predict --model` reads.
    tracked = run.run_id is not None
    name = f"virtualcell-{dataset}" if params["register"] and tracked else None
    values = json.loads(Path(metrics).read_text())
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=None if tracked else Path(output).parent) as tmp:
        bundle = cellmodel.write_bundle(Path(tmp) / "virtual_cell", shared=data, simulator=simulator,
                                        encoder=encoder, aligner=aligner, predictor=predictor, decoder=decoder,
                                        space=params.get("space", "embedding"), n_steps=params["n_steps"],
                                        n_rollouts=max(1, params["fate_rollouts"]), seed=params["seed"],
                                        fate_neighbours=params.get("fate_neighbours", 1),
                                        perturbation=perturbation)
        cell = cellmodel.VirtualCell(bundle)
        example = cellmodel.example_input(rna)
        call = {"horizon": 1.0, "t_start": float(cell.times[0]), "seed": 0, "n_rollouts": int(cell.meta["n_rollouts"]),
                "n_steps": int(cell.meta["n_steps"]), "sample": True, "condition": ""}
        answer = cell.predict(example.to_numpy(), list(example.columns), **call)
        say(f"register: the virtual cell reads {len(cell.genes)} genes, simulates in the {cell.space} space "
            f"({cell.meta['state_dim']} dimensions) and returns {len(cell.output_genes)} genes and fates "
            f"{cell.fate_names}")
        mean = values.get("simulation", {}).get("mean", {})
        about = (
            f"The virtual cell of {dataset}: cells x genes (gene names as columns, "
            f"{'raw counts' if cell.values == 'counts' else cell.values + ' values'}) in, with params "
            f"horizon and t_start (times {cell.times.tolist()}); out: "
            f"simulated log-normalised expression of {len(cell.output_genes)} genes, the state z0..z"
            f"{cell.meta['state_dim'] - 1} ({cell.space} space) and p_{{fate}} for fates {cell.fate_names}"
            + (f"; and the cells' {len(cell.partner_features)} "
               f"{'proteins' if cell.partner_kind == 'prot' else 'peaks (accessibility scores)'} now, predicted from "
               f"their RNA alone ({cellmodel.PREFIXES[cell.partner_kind]}{{"
               f"{'protein' if cell.partner_kind == 'prot' else 'peak'}}})." if cell.partner_features else ".")
            + (f" Param condition asks what if: the cells under a knock-down of any of its "
               f"{len(cell.perturbation.genes)} genes (GeneX), a trained drug ({', '.join(cell.perturbation.drugs)}) "
               "or a combination (GeneA+GeneB)." if cell.perturbation is not None else ""))
        judged = (f" Judged on held-out time points: mean W1 (pca5) model "
                  f"{mean.get('w1_pca5', {}).get('model', float('nan')):.3f} vs OT interpolation "
                  f"{mean.get('w1_pca5', {}).get('ot_interp', float('nan')):.3f}.")
        uri = run.log_virtual_cell(bundle, name="virtualcell", registered_model_name=name, input_example=example,
                                   output_example=answer.frame(index=example.index), params=call,
                                   description=about + judged, model_description=about,
                                   tags=headlines.headline_tags(values))
        if not tracked:
            uri = str(_keep(bundle, Path(output).parent / KEPT_BUNDLE))
    table = headlines.table(values)
    run.log_table(table, "summary.tsv")
    io.write_table(table, summary)
    if page:
        text = headlines.html_page(dataset, values, model=name or uri)
        run.log_text(text, "summary.html")
        io.atomic_write(page, lambda tmp: tmp.write_text(text))
    for sentence in headlines.verdicts(values):
        say(f"summary: {sentence.replace('**', '')}")
    io.write_json({"dataset": dataset, "model_uri": uri, "registered_model": name, "space": cell.space,
                   "state_dim": int(cell.meta["state_dim"]), "genes_in": len(cell.genes),
                   "genes_out": len(cell.output_genes), "fates": cell.fate_names}, output)
    if tracked:
        say(f"logged the virtual cell ({uri})" + (f", registered as {name}" if name else " (mlflow.register: false)"))
    else:
        say(f"saved the virtual cell as {uri} (not tracked: nothing logged to MLflow)")


def _keep(bundle: Path, where: Path) -> Path:
    """Move a finished bundle to ``where`` (replacing an older one): a rename on one filesystem, so a
    reader never sees half a bundle."""
    old = where.with_name(where.name + ".old")
    if where.exists():
        shutil.rmtree(old, ignore_errors=True)
        where.rename(old)
    Path(bundle).rename(where)
    shutil.rmtree(old, ignore_errors=True)
    return where.resolve()
