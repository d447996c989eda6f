import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

from virtualcell.errors import InputError
from virtualcell.pairing import pair, split_cells


def test_pair_keeps_cells_in_both_modalities_in_one_order(tiny_mdata):
    mdata = md.MuData({"rna": tiny_mdata["rna"].copy(), "prot": tiny_mdata["prot"][10:].copy()})
    out = pair(mdata, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert out.n_obs == tiny_mdata["rna"].n_obs - 10
    assert list(out["rna"].obs_names) == list(out["prot"].obs_names)
    fractions = out.obs["split"].value_counts(normalize=True)
    assert abs(fractions["test"] - 0.2) < 0.05 and abs(fractions["val"] - 0.1) < 0.05
    # every time point appears in every split
    table = pd.crosstab(out["rna"].obs["time"], out["rna"].obs["split"])
    assert (table > 0).all().all()


def test_no_shared_barcodes_is_a_clear_error(tiny_mdata):
    prot = tiny_mdata["prot"].copy()
    prot.obs_names = [f"{n}-other" for n in prot.obs_names]
    with pytest.raises(InputError, match="share no cell barcodes"):
        pair(md.MuData({"rna": tiny_mdata["rna"].copy(), "prot": prot}), origin="qc.h5mu")


def test_group_split_holds_out_whole_groups():
    obs = pd.DataFrame({"donor": np.repeat(["d1", "d2", "d3", "d4", "d5"], 20)},
                       index=[f"c{i}" for i in range(100)])
    split = split_cells(obs, val_fraction=0.2, test_fraction=0.2, group_key="donor", seed=1)
    per_donor = pd.crosstab(obs["donor"], split)
    assert ((per_donor > 0).sum(axis=1) == 1).all()  # a donor is in exactly one split
    assert set(split) == {"train", "val", "test"}


def test_same_seed_same_split(tiny_mdata):
    a = split_cells(tiny_mdata["rna"].obs, val_fraction=0.1, test_fraction=0.1, group_key=None, seed=3)
    b = split_cells(tiny_mdata["rna"].obs, val_fraction=0.1, test_fraction=0.1, group_key=None, seed=3)
    assert a.equals(b)
