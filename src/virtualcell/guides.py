"""CRISPR screens from Cell Ranger: each cell's guides, assigned, and mapped to its condition.

Cell Ranger writes the guides of a Perturb-seq / CROP-seq library as the ``CRISPR Guide Capture``
feature type (the readers' ``crispr`` modality, guide UMI counts per cell). :func:`assign` calls a
guide present in a cell when it has at least ``min_umi`` UMIs and at least ``min_fraction`` of the
cell's guide UMIs (Cell Ranger's own protospacer calling fits a mixture per guide; a fixed floor
and a share is what most analyses of its output use, e.g. Replogle et al. 2022's ``min_umi``).
A guide's target gene is read from its name with ``pattern`` (default: ``KLF1-1``, ``KLF1_2``,
``sgKLF1-3`` -> ``KLF1``); guides named like ``non-targeting``, ``NTC`` or ``safe-harbor`` are
the control. A cell's condition:

- one target (one guide, or several guides of the same gene): that gene (its knock-down);
- two targets: ``GeneA+GeneB`` (sorted), a combination; flagged ``guide_multiplet``;
- more than two, or no guide called: unassigned (``NaN``), left out by :func:`virtualcell.io.read_dataset`.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd

from virtualcell.errors import InputError
from virtualcell.synthetic_conditions import COMBINATION_SEPARATOR

MODALITY = "crispr"
CONDITION_COLUMN = "guide_condition"
DEFAULT_PATTERN = r"^(?:sg)?(.+?)(?:[-_.]\d+)?$"
NON_TARGETING = re.compile(r"(?i)non.?target|^ntc|safe.?harbo|scrambl|^control")


def target_of(guide: str, pattern: str = DEFAULT_PATTERN) -> str | None:
    """The gene a guide targets (``None`` for a non-targeting guide)."""
    if NON_TARGETING.search(guide):
        return None
    match = re.match(pattern, guide)
    return match.group(1) if match and match.groups() else guide


def assign(crispr: ad.AnnData, *, control: str, min_umi: int = 3, min_fraction: float = 0.2,
           pattern: str = DEFAULT_PATTERN, origin: str = "input") -> pd.DataFrame:
    """Per cell: ``guides`` (the called ones), ``n_guides``, ``guide_multiplet`` and ``guide_condition``."""
    x = crispr.X.tocsr() if hasattr(crispr.X, "tocsr") else np.asarray(crispr.X)
    total = np.asarray(x.sum(axis=1)).ravel()
    names = np.asarray(crispr.var_names, dtype=str)
    try:
        targets = [target_of(g, pattern) for g in names]
    except re.error as exc:
        raise InputError(f"config guide_pattern '{pattern}': not a regular expression ({exc}); fix it") from None
    rows = []
    for i in range(crispr.n_obs):
        row = x[i]
        if hasattr(row, "indices"):
            idx, counts = row.indices, row.data
        else:
            idx = np.flatnonzero(row)
            counts = row[idx]
        called = idx[(counts >= min_umi) & (counts >= min_fraction * max(total[i], 1))]
        genes = sorted({targets[j] for j in called} - {None})
        if len(called) == 0 or len(genes) > 2:
            condition = None
        elif not genes:
            condition = control
        else:
            condition = COMBINATION_SEPARATOR.join(genes)
        rows.append({"guides": ";".join(names[called]), "n_guides": len(called),
                     "guide_multiplet": len(called) > 1, CONDITION_COLUMN: condition})
    out = pd.DataFrame(rows, index=crispr.obs_names)
    if out[CONDITION_COLUMN].notna().sum() == 0:
        raise InputError(f"{origin}: no cell has a guide with >= {min_umi} UMIs and >= {min_fraction:.0%} of its guide "
                         "UMIs, so no cell has a condition; lower guide_min_umi, or check the CRISPR Guide Capture "
                         "library")
    if not (out[CONDITION_COLUMN] == control).any():
        raise InputError(f"{origin}: no cell carries only non-targeting guides (the control, '{control}'); name them "
                         "non-targeting / NTC, or give the conditions in an obs column (condition_key) instead")
    return out
