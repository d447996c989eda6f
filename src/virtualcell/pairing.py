"""Pairing: which cells are measured in which modalities, and the train/val/test split.

The split is what keeps evaluation honest, so it holds out whole groups when
the config names a grouping column (a donor, a batch), and otherwise cells
drawn at random within each time point so every time point is in every split.
"""

from __future__ import annotations

import mudata as md
import numpy as np
import pandas as pd

from virtualcell.errors import InputError
from virtualcell.io import PROT, RNA

SPLITS = ("train", "val", "test")


def paired_cells(mdata: md.MuData, *, origin: str = "input") -> pd.Index:
    """Cells measured in both RNA and protein (or in RNA alone when there is no protein)."""
    cells = mdata.mod[RNA].obs_names
    if PROT in mdata.mod:
        cells = cells.intersection(mdata.mod[PROT].obs_names, sort=False)
        if len(cells) == 0:
            raise InputError(
                f"{origin}: RNA and protein share no cell barcodes; check that both modalities "
                "come from the same library (barcode suffixes such as '-1' must match)"
            )
    return cells


def split_cells(
    obs: pd.DataFrame, *, val_fraction: float, test_fraction: float, group_key: str | None, seed: int
) -> pd.Series:
    """Assign each cell to train, val or test.

    With ``group_key``, whole groups go to one split (groups are shuffled and
    filled until each split has its share of cells); otherwise cells are drawn
    at random within each ``time`` (if present) so every time point appears in
    every split.
    """
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=obs.index, dtype=object)
    if group_key:
        if group_key not in obs:
            raise InputError(
                f"config pair.group_key: obs has no column '{group_key}' (found {list(obs.columns)}); "
                "fix the key or leave it empty"
            )
        groups = obs[group_key].astype(str)
        names = np.array(sorted(groups.unique()))
        if len(names) < 3:
            raise InputError(
                f"config pair.group_key: '{group_key}' has {len(names)} groups; holding out whole "
                "groups needs at least 3 (train, val, test), or leave the key empty"
            )
        rng.shuffle(names)
        sizes = groups.value_counts()
        n_total = len(obs)
        test_groups, val_groups, filled = [], [], 0
        for name in names[:-1]:
            if filled < test_fraction * n_total or not test_groups:
                test_groups.append(name)
            elif filled < (test_fraction + val_fraction) * n_total or not val_groups:
                val_groups.append(name)
            else:
                break
            filled += sizes[name]
        split[groups.isin(test_groups)] = "test"
        split[groups.isin(val_groups)] = "val"
        return split
    strata = obs["time"] if "time" in obs else pd.Series(0, index=obs.index)
    for _, members in obs.groupby(strata, observed=True).groups.items():
        members = np.array(members)
        rng.shuffle(members)
        n_test = int(round(test_fraction * len(members)))
        n_val = int(round(val_fraction * len(members)))
        split[members[:n_test]] = "test"
        split[members[n_test : n_test + n_val]] = "val"
    return split


def pair(
    mdata: md.MuData,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    group_key: str | None = None,
    seed: int = 0,
    origin: str = "input",
) -> md.MuData:
    """Keep the paired cells and write their split.

    Returns
    -------
    A MuData of the paired cells, in the same order in every modality, with
    ``obs["split"]`` (train/val/test) on the MuData and on each modality.
    """
    cells = paired_cells(mdata, origin=origin)
    mods = {name: mdata.mod[name][cells].copy() for name in (RNA, PROT) if name in mdata.mod}
    obs = mods[RNA].obs
    split = split_cells(
        obs, val_fraction=val_fraction, test_fraction=test_fraction, group_key=group_key, seed=seed
    )
    for adata in mods.values():
        adata.obs["split"] = pd.Categorical(split.reindex(adata.obs_names), categories=SPLITS)
    out = md.MuData(mods)
    out.uns.update(dict(mdata.uns))
    out.obs["split"] = mods[RNA].obs["split"]
    return out
