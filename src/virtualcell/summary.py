"""The headline numbers of a dataset, beside their baselines, and a sentence saying what won.

metrics.json (:func:`virtualcell.stages.evaluate`) holds every number; this module picks the
headlines a reader looks for first: the held-out time points, extrapolation, fates,
cross-modal retrieval, protein predicted from RNA, what the joint embedding adds and the held-out
perturbations. It writes them as a table (``summary.tsv``, one row per number) and
as a one-page HTML summary at the top of the Snakemake report, and says where things are when
the workflow ends.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

W1 = "w1_pca5"
LABELS = {"ot_interp": "OT interpolation", "copy_last": "copying the last time point", "oracle": "oracle",
          "no_dynamics": "no dynamics (the nearest late cells' fate)", "cca": "CCA",
          "knn": "kNN regression in RNA PCA space", "ridge": "ridge regression in RNA PCA space",
          "ceiling": "split-half ceiling", "linear": "the linear PCA-ridge model", "additive": "the additive model",
          "mean_perturbed": "the mean of the training perturbations", "control": "no change (control)"}


def table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Every headline number, one row each: section, metric, method, value."""
    rows = []
    sim = metrics.get("simulation", {})
    for section, block in [("simulation (mean over holdouts)", sim.get("mean", {})),
                           *[(f"extrapolation t={h}", v) for h, v in sim.get("extrapolation", {}).items()],
                           ("fate probabilities vs truth", metrics.get("fate", {}))]:
        for d, by_method in block.items():
            if d == "std":
                continue
            if isinstance(by_method, Mapping):
                rows += [{"section": section, "metric": d, "method": m, "value": v} for m, v in by_method.items()]
            elif isinstance(by_method, int | float):
                rows.append({"section": section, "metric": d, "method": "model", "value": by_method})
    for pair_name, section in metrics.get("alignment", {}).items():
        rows += [{"section": f"alignment {pair_name}", "metric": d, "method": m, "value": v}
                 for d, by_method in section.items() for m, v in by_method.items()]
    for what, section in metrics.get("prediction", {}).items():
        rows += [{"section": f"prediction {what}", "metric": d, "method": m, "value": v}
                 for d, by_method in section.items() for m, v in by_method.items()]
    rows += [{"section": "energy of held-out pairs", "metric": "energy", "method": m, "value": v}
             for m, v in metrics.get("energy", {}).items()]
    rows += [{"section": "compression (truth recovered from an embedding)", "metric": d, "method": m, "value": v}
             for d, by_space in metrics.get("compression", {}).items() for m, v in by_space.items()]
    for name, scores in metrics.get("perturbation", {}).get("conditions", {}).items():
        rows += [{"section": f"perturbation {name} (held out)", "metric": d, "method": m, "value": v}
                 for d, by_method in scores.items() for m, v in by_method.items()]
    return pd.DataFrame(rows, columns=["section", "metric", "method", "value"])


def _versus(name: str, scores: Mapping[str, float], *, baseline: str, lower_better: bool, unit: str,
            floor: str | None = None) -> str:
    model, base = scores.get("model"), scores.get(baseline)
    if model is None or base is None:
        return ""
    won = model < base if lower_better else model > base
    ratio = f" ({model / base:.2f}x)" if lower_better and base else ""
    label = LABELS.get(baseline, baseline)
    text = (f"{name}: the model scores {model:.3f} against {label} {base:.3f}{ratio} "
            f"({unit}, {'lower' if lower_better else 'higher'} is better)")
    if floor and floor in scores:
        what = "half the real cells against the other half" if floor == "ceiling" else "the best possible"
        text += f"; the {LABELS.get(floor, floor)} ({what}) is {scores[floor]:.3f}"
    return text + (": **the model won**." if won else f": **{label} won**.")


def verdicts(metrics: Mapping[str, Any]) -> list[str]:
    """One sentence per headline: the model's number, its baseline's, and which won."""
    out = []
    sim = metrics.get("simulation", {})
    mean = sim.get("mean", {})
    if W1 in mean:
        n = len(sim.get("holdouts", {}))
        text = _versus(f"Held-out time points (mean of {n})", mean[W1], baseline="ot_interp", lower_better=True,
                       unit="W1 in pca5", floor="oracle")
        if "gap_closed" in mean:
            text += f" Gap to the oracle closed: {mean['gap_closed']:.2f} (1 is the truth, 0 interpolation)."
        out.append(text)
    for held, block in sim.get("extrapolation", {}).items():
        if W1 in block:
            out.append(_versus(f"Extrapolation to t={held}", block[W1], baseline="copy_last", lower_better=True,
                               unit="W1 in pca5", floor="oracle"))
    fate = metrics.get("fate", {})
    for key, label in (("pearson_r", "Fate probabilities vs the truth (Pearson r)"),
                       ("auroc_committed", "Fates of committed cells (AUROC)")):
        if key in fate:
            out.append(_versus(label, fate[key], baseline="no_dynamics", lower_better=False, unit=key))
    for pair_name, section in metrics.get("alignment", {}).items():
        if "foscttm" in section:
            out.append(_versus(f"Cross-modal matching {pair_name} (FOSCTTM)", section["foscttm"], baseline="cca",
                               lower_better=True, unit="FOSCTTM", floor="oracle"))
    for what, section in metrics.get("prediction", {}).items():
        # A direction's headline metric comes first: pearson_per_protein / _gene, or auroc_per_peak.
        metric = next(iter(section), "")
        score, _, feature = metric.partition("_per_")
        scores = section.get(metric, {})
        # model_ring (spots) is the model's own prediction smoothed over the neighbour graph, no baseline
        baselines = {m: v for m, v in scores.items() if not m.startswith("model") and m != "random"}
        if "model" in scores and baselines:
            best = max(baselines, key=baselines.get)
            words = [{"rna": "RNA", "atac": "ATAC"}.get(w, w) for w in what.split("_")]
            label = " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])
            unit = "AUROC" if score == "auroc" else "Pearson r"
            out.append(_versus(f"{label} (mean per-{feature} {unit}, best baseline)", scores,
                               baseline=best, lower_better=False, unit=unit))
    compression = metrics.get("compression", {})
    for key, label in (("knn_fate", "kNN accuracy of the true fate"), ("r2_latent", "R² of the true latent")):
        spaces = compression.get(key, {})
        joint = "joint" if "joint" in spaces else "shared"
        if joint in spaces and "rna" in spaces:
            won = spaces[joint] > spaces["rna"]
            out.append(f"Compression, {label}: the {joint} embedding scores {spaces[joint]:.3f} against RNA alone "
                       f"{spaces['rna']:.3f}: **{'the joint embedding' if won else 'RNA alone'} won**.")
    for name, scores in metrics.get("perturbation", {}).get("conditions", {}).items():
        for key, lower, unit in (("pearson_delta_top20", False, "Pearson delta, top-20 DE genes"),
                                 ("edist_pca5", True, "energy distance in pca5")):
            by_method = scores.get(key, {})
            baselines = {m: v for m, v in by_method.items() if m not in ("model", "ceiling")}
            if "model" in by_method and baselines:
                best = (min if lower else max)(baselines, key=baselines.get)
                out.append(_versus(f"Held-out condition {name} ({unit}, best baseline)", by_method, baseline=best,
                                   lower_better=lower, unit=unit, floor="ceiling"))
    return [s for s in out if s]


def headline_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """A few headline numbers for the registered version's tags (the full table is an artifact)."""
    sim = metrics.get("simulation", {})
    picks = {f"heldout.{W1}.{m}": sim.get("mean", {}).get(W1, {}).get(m) for m in ("model", "ot_interp", "oracle")}
    picks["heldout.gap_closed"] = sim.get("mean", {}).get("gap_closed")
    for held, block in sim.get("extrapolation", {}).items():
        picks |= {f"extrapolation.t{held}.{W1}.{m}": block.get(W1, {}).get(m) for m in ("model", "copy_last")}
    fate = metrics.get("fate", {}).get("pearson_r", {})
    picks |= {f"fate.pearson_r.{m}": fate.get(m) for m in ("model", "no_dynamics")}
    for what, section in metrics.get("prediction", {}).items():
        metric = next(iter(section), "")  # the direction's headline metric
        picks |= {f"{what}.{metric}.{m}": section.get(metric, {}).get(m) for m in ("model", "knn", "ridge")}
    return {k: f"{v:.3f}" for k, v in picks.items() if isinstance(v, int | float)}


def html_page(dataset: str, metrics: Mapping[str, Any], *, model: str | None) -> str:
    """The one-page summary: what won, in sentences, then every headline number beside its baselines."""
    rows = table(metrics)
    sentences = "".join(
        "<li>" + html.escape(s).replace("**", "<b>", 1).replace("**", "</b>", 1) + "</li>" for s in verdicts(metrics))
    blocks = []
    for section, part in rows.groupby("section", sort=False):
        counts = part[part["metric"].str.startswith("n_")]
        part = part[~part["metric"].str.startswith("n_")]
        wide = part.pivot_table(index="metric", columns="method", values="value", aggfunc="first", sort=False)
        cols = ["model", *[c for c in wide.columns if c != "model"]]
        blocks.append(f"<h3>{html.escape(section)}</h3>"
                      + wide[[c for c in cols if c in wide.columns]].to_html(float_format=lambda v: f"{v:.3f}",
                                                                              na_rep="", border=0)
                      + "".join(f"<p>{html.escape(r.metric.removeprefix('n_'))}: {r.value:.0f}</p>"
                                for r in counts.itertuples()))
    served = (f"<p>The virtual cell is registered as <code>{html.escape(model)}</code>: see the README's "
              "<i>Ask the virtual cell</i>.</p>") if model else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>virtualcell summary: "
        f"{html.escape(dataset)}</title><style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}"
        "tr:nth-child(even){background:#f3f3f3}</style></head><body>"
        f"<h2>virtualcell: {html.escape(dataset)}</h2><ul>{sentences}</ul>{served}{''.join(blocks)}"
        "<p>Every number is from this run, on the same split and in the same space as its baselines "
        "(results/" f"{html.escape(dataset)}/evaluate/metrics.json).</p></body></html>"
    )


def where_things_are(results: str | Path, datasets: list[str], *, tracking_uri: str | None) -> str:
    """What the workflow prints when it ends: the headlines, and where results, report and MLflow are
    (``tracking_uri`` None: the workflow ran with mlflow.enabled false)."""
    lines = [f"virtualcell: results in {results}/"]
    for dataset in datasets:
        metrics = Path(results, dataset, "evaluate", "metrics.json")
        if metrics.exists():
            for sentence in verdicts(json.loads(metrics.read_text())):
                lines.append(f"  {dataset}: {sentence.replace('**', '')}")
    lines += [
        "  the report: snakemake --report results/report.html (then open it in a browser)",
        "  MLflow: off (mlflow.enabled: false)" if tracking_uri is None
        else f"  MLflow: mlflow ui --backend-store-uri {tracking_uri.partition('?')[0]}" if tracking_uri.startswith("sqlite")
        else f"  MLflow: {tracking_uri}",
    ]
    for dataset in datasets:
        model = Path(results, dataset, "report", "model.json")
        if model.exists():
            # Registered: the registry's latest version; else the run's model URI, or the saved folder.
            about = json.loads(model.read_text())
            uri = f"models:/{about['registered_model']}/latest" if about.get("registered_model") else about["model_uri"]
            lines.append(f"  ask the virtual cell: virtualcell predict --model {uri} "
                         "--input cells.h5ad --horizon 1 --output out.h5ad")
    return "\n".join(lines)
