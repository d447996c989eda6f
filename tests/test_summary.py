"""The one-page summary: each headline beside its baseline, and the sentence saying which won."""

from __future__ import annotations

from virtualcell import summary

METRICS = {
    "simulation": {
        "holdouts": {"1": {}, "2": {}},
        "mean": {"w1_pca5": {"model": 0.8, "ot_interp": 0.9, "oracle": 0.5}, "gap_closed": 0.25},
        "extrapolation": {"4": {"w1_pca5": {"model": 0.7, "copy_last": 0.6, "oracle": 0.4}}},
    },
    "fate": {"pearson_r": {"model": 0.7, "no_dynamics": 0.5}, "n_cells": 120},
    "alignment": {"rna-prot": {"foscttm": {"model": 0.02, "cca": 0.1, "random": 0.5}}},
}


def test_each_verdict_names_the_winner_by_the_direction_of_its_metric():
    held, extrap, fate, align = summary.verdicts(METRICS)
    # lower W1 is better: 0.8 beats OT interpolation's 0.9; the oracle and the gap closed are stated
    assert "mean of 2" in held and "**the model won**" in held and "0.500" in held and "0.25" in held
    # copying the last time point (0.6) beats the model's 0.7
    assert "**copying the last time point won**" in extrap and "(1.17x)" in extrap
    # a higher Pearson r is better
    assert "**the model won**" in fate and "higher is better" in fate
    assert "**the model won**" in align and "CCA 0.100" in align


def test_the_page_holds_every_headline_number_and_no_counts_as_scores():
    page = summary.html_page("demo", METRICS, model="virtualcell-demo")
    for number in ("0.800", "0.900", "0.600", "0.020", "0.100"):
        assert number in page
    assert "<b>the model won</b>" in page and "virtualcell-demo" in page
    assert "cells: 120" in page and "120.000" not in page
    rows = summary.table(METRICS)
    assert set(rows["method"]) >= {"model", "ot_interp", "copy_last", "no_dynamics", "cca"}


def test_a_dataset_without_time_points_has_only_its_alignment_verdict(tmp_path):
    only = {"alignment": METRICS["alignment"]}
    assert len(summary.verdicts(only)) == 1
    (tmp_path / "spatial" / "evaluate").mkdir(parents=True)
    (tmp_path / "spatial" / "evaluate" / "metrics.json").write_text(__import__("json").dumps(only))
    text = summary.where_things_are(tmp_path, ["spatial", "missing"], tracking_uri="sqlite:////x/mlflow.db?timeout=1")
    assert "spatial: Cross-modal matching" in text and "missing:" not in text
    assert "  MLflow: mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in text.splitlines()
    assert "virtualcell predict" not in text  # no dataset here has a registered virtual cell


def test_peaks_from_rna_are_judged_on_their_own_metric_per_peak_auroc():
    from virtualcell import summary

    metrics = {"prediction": {"atac_from_rna": {"auroc_per_peak": {"model": 0.78, "cca": 0.75, "knn": 0.79,
                                                                   "random": 0.5}}}}
    (verdict,) = summary.verdicts(metrics)
    assert verdict.startswith("ATAC from RNA (mean per-peak AUROC") and "**kNN" in verdict
    assert summary.headline_tags(metrics)["atac_from_rna.auroc_per_peak.model"] == "0.780"
