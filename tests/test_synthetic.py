"""Tests of the ground-truth generator: the truth is self-consistent and the data look like real data."""

import json

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from virtualcell import synthetic as syn

TINY = {"n_cells": 300, "n_genes": 100, "n_proteins": 8, "n_spots": 60}


@pytest.fixture(scope="module")
def tiny() -> md.MuData:
    return syn.generate(**TINY, seed=1)


@pytest.fixture(scope="module")
def panel() -> md.MuData:
    """Few cells but the default gene count, where sparsity and depth are specified."""
    return syn.generate(n_cells=300, n_genes=400, n_proteins=8, n_spots=20, seed=2)


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _image(mdata: md.MuData) -> np.ndarray:
    return mdata[syn.SPATIAL].uns[syn.SPATIAL_KEY][syn.LIBRARY_ID]["images"]["hires"]


def _spot_radius(mdata: md.MuData) -> float:
    scale = mdata[syn.SPATIAL].uns[syn.SPATIAL_KEY][syn.LIBRARY_ID]["scalefactors"]
    return scale["spot_diameter_fullres"] / 2


# --------------------------------------------------------------------------- landscape


def test_potential_grad_matches_finite_differences():
    xy = np.random.default_rng(0).uniform([-3, -1.5], [3, 3.5], size=(200, 2))
    h = 1e-5
    fd = np.stack(
        [(syn.potential(xy + h * e) - syn.potential(xy - h * e)) / (2 * h) for e in np.eye(2)],
        axis=-1,
    )
    np.testing.assert_allclose(syn.potential_grad(xy), fd, atol=1e-7)


def test_potential_accepts_any_leading_shape():
    xy = np.zeros((4, 3, 2))
    assert syn.potential(xy).shape == (4, 3)
    assert syn.potential_grad(xy).shape == (4, 3, 2)
    assert syn.potential(np.array([0.0, 0.0])).shape == ()


def test_wells_are_local_minima_near_their_nominal_centres():
    np.testing.assert_allclose(syn.potential_grad(syn.WELL_MINIMA), 0.0, atol=1e-8)
    assert np.linalg.norm(syn.WELL_MINIMA - syn.WELL_CENTRES, axis=1).max() < 0.4
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    ring = np.column_stack([np.cos(angles), np.sin(angles)])
    for minimum in syn.WELL_MINIMA:
        for radius in (0.05, 0.3):
            assert np.all(syn.potential(minimum + radius * ring) > syn.potential(minimum))


def test_fate_wells_lie_below_the_progenitor_well():
    v = syn.potential(syn.WELL_MINIMA)
    progenitor, fate_a, fate_b = (v[syn.BASINS.index(b)] for b in syn.BASINS)
    assert fate_a < progenitor and fate_b < progenitor


def test_basin_of_names_each_minimum_and_splits_by_side():
    assert syn.basin_of(syn.WELL_MINIMA).tolist() == list(syn.BASINS)
    # Symmetric in x up to the slightly shallower fate B: the sides go to their own fate.
    assert syn.basin_of(np.array([[-0.8, 1.8], [0.8, 1.8]])).tolist() == ["fate_A", "fate_B"]


# --------------------------------------------------------------------------- SDE


def test_simulate_paths_one_step_is_euler_maruyama():
    x0 = np.array([[0.3, -0.2], [-1.0, 2.5], [1.2, 1.0]])
    dt, sigma = 0.01, 0.6
    got = syn.simulate_paths(x0, t_start=0.0, t_end=dt, dt=dt, sigma=sigma, rng=np.random.default_rng(7))
    noise = np.random.default_rng(7).standard_normal(x0.shape)
    expected = x0 - dt * syn.potential_grad(x0) + sigma * np.sqrt(dt) * noise
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_simulate_paths_without_noise_rolls_into_the_nearest_well():
    x0 = syn.WELL_MINIMA + 0.2
    end = syn.simulate_paths(x0, t_start=0.0, t_end=20.0, sigma=0.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(end, syn.WELL_MINIMA, atol=1e-3)


def test_simulate_paths_is_seeded_and_leaves_input_alone():
    x0 = np.zeros((50, 2))
    a = syn.simulate_paths(x0, t_start=1.0, t_end=2.5, rng=np.random.default_rng(3))
    b = syn.simulate_paths(x0, t_start=1.0, t_end=2.5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert np.all(x0 == 0)
    np.testing.assert_array_equal(syn.simulate_paths(x0, t_start=2.0, t_end=2.0, rng=np.random.default_rng(0)), x0)


@pytest.mark.parametrize(
    ("x0", "t_start", "t_end"), [(np.zeros((5, 3)), 0.0, 1.0), (np.zeros(2), 0.0, 1.0), (np.zeros((5, 2)), 2.0, 1.0)]
)
def test_simulate_paths_rejects_bad_input(x0, t_start, t_end):
    with pytest.raises(ValueError):
        syn.simulate_paths(x0, t_start=t_start, t_end=t_end, rng=np.random.default_rng(0))


def test_true_dynamics_leave_the_progenitor_and_split_into_both_fates():
    rng = np.random.default_rng(0)
    x = syn.WELL_MINIMA[0] + syn.INITIAL_SPREAD * rng.standard_normal((2000, 2))
    distances = []
    for t_start, t_end in zip(range(5), range(1, 6), strict=True):
        x = syn.simulate_paths(x, t_start=t_start, t_end=t_end, rng=rng)
        distances.append(np.linalg.norm(x - syn.WELL_MINIMA[0], axis=1).mean())
    assert np.all(np.diff(distances) > 0)
    fractions = pd.Series(syn.basin_of(x)).value_counts(normalize=True)
    assert fractions["progenitor"] < 0.3
    assert fractions["fate_A"] > 0.25 and fractions["fate_B"] > 0.25


# --------------------------------------------------------------------------- generate: structure


def test_generate_is_deterministic_per_seed():
    a, b, c = syn.generate(**TINY, seed=5), syn.generate(**TINY, seed=5), syn.generate(**TINY, seed=6)
    for mod in (syn.RNA, syn.PROT, syn.SPATIAL):
        np.testing.assert_array_equal(_dense(a[mod].X), _dense(b[mod].X))
        pd.testing.assert_frame_equal(a[mod].obs, b[mod].obs)
        assert not np.array_equal(_dense(a[mod].X), _dense(c[mod].X))
    np.testing.assert_array_equal(a[syn.RNA].obsm[syn.LATENT_KEY], b[syn.RNA].obsm[syn.LATENT_KEY])
    np.testing.assert_array_equal(_image(a), _image(b))


def test_single_cell_data_do_not_depend_on_spatial_settings():
    a = syn.generate(**{**TINY, "n_spots": 60}, seed=4)
    b = syn.generate(**{**TINY, "n_spots": 30}, seed=4)
    np.testing.assert_array_equal(_dense(a[syn.RNA].X), _dense(b[syn.RNA].X))
    np.testing.assert_array_equal(_dense(a[syn.PROT].X), _dense(b[syn.PROT].X))


def test_modalities_and_names(tiny):
    rna, prot, spatial = tiny[syn.RNA], tiny[syn.PROT], tiny[syn.SPATIAL]
    assert rna.shape == (300, 100) and prot.shape == (300, 8) and spatial.shape == (60, 100)
    assert rna.obs_names.is_unique and rna.obs_names[0] == "cell00001"
    assert list(prot.obs_names) == list(rna.obs_names)
    assert spatial.obs_names[0] == "spot0001" and spatial.obs_names.is_unique
    assert list(spatial.var_names) == list(rna.var_names)
    assert rna.var_names.is_unique
    assert set(prot.var[syn.GENE_KEY]) <= set(rna.var_names)
    assert all(name == f"CD_{gene}" for name, gene in zip(prot.var_names, prot.var[syn.GENE_KEY], strict=True))


def test_gene_naming_and_flags(tiny):
    var = tiny[syn.RNA].var
    mt = var.index.str.startswith("MT-")
    ribo = var.index.str.match(r"^RP[SL]\d+$")
    assert mt.sum() == 13
    np.testing.assert_array_equal(var[syn.MT_KEY].to_numpy(), mt)
    np.testing.assert_array_equal(var[syn.RIBO_KEY].to_numpy(), ribo)
    assert ribo.sum() >= 2 and var.index[ribo].str.startswith("RPS").any() and var.index[ribo].str.startswith("RPL").any()
    assert var.index[~mt & ~ribo].str.match(r"^Gene\d{4}$").all()


def test_obs_columns_and_types(tiny):
    obs = tiny[syn.RNA].obs
    assert obs[syn.TIME_KEY].dtype == np.float64
    for key in (syn.FATE_KEY, syn.BASIN_KEY, syn.BATCH_KEY):
        assert isinstance(obs[key].dtype, pd.CategoricalDtype)
    assert list(obs[syn.FATE_KEY].cat.categories) == list(syn.BASINS)
    assert set(obs[syn.BATCH_KEY]) == {"b0", "b1"}
    assert obs[syn.LOW_QUALITY_KEY].dtype == bool
    latent = tiny[syn.RNA].obsm[syn.LATENT_KEY]
    assert latent.shape == (300, 2) and np.isfinite(latent).all()


def test_time_points_count_and_balance(tiny):
    counts = tiny[syn.RNA].obs[syn.TIME_KEY].value_counts()
    assert sorted(counts.index) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert counts.max() - counts.min() <= 1


def test_custom_time_points_are_used():
    m = syn.generate(**{**TINY, "n_cells": 101}, time_points=(0.5, 1.0, 2.5, 4.0, 7.0), seed=0)
    counts = m[syn.RNA].obs[syn.TIME_KEY].value_counts()
    assert sorted(counts.index) == [0.5, 1.0, 2.5, 4.0, 7.0]
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_genes": 20}, "n_genes"),
        ({"time_points": (0, 2, 1)}, "increasing"),
        ({"time_points": (-1, 0, 1)}, ">= 0"),
        ({"time_points": ()}, "time_points"),
        ({"n_proteins": 0}, "n_proteins"),
        ({"n_spots": 0}, "n_spots"),
        ({"n_peaks": -1}, "n_peaks"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.generate(**{**TINY, **kwargs})


# --------------------------------------------------------------------------- generate: truth


def test_fate_is_the_basin_at_the_last_time_point(tiny):
    obs = tiny[syn.RNA].obs
    last = obs[syn.TIME_KEY] == obs[syn.TIME_KEY].max()
    np.testing.assert_array_equal(obs.loc[last, syn.FATE_KEY].to_numpy(), obs.loc[last, syn.BASIN_KEY].to_numpy())
    latent = tiny[syn.RNA].obsm[syn.LATENT_KEY]
    np.testing.assert_array_equal(syn.basin_of(latent), obs[syn.BASIN_KEY].to_numpy())


def test_snapshots_move_away_from_the_progenitor_over_time(tiny):
    obs = tiny[syn.RNA].obs
    distance = np.linalg.norm(tiny[syn.RNA].obsm[syn.LATENT_KEY] - syn.WELL_MINIMA[0], axis=1)
    per_time = pd.Series(distance, index=obs.index).groupby(obs[syn.TIME_KEY]).mean()
    assert per_time.iloc[0] < per_time.iloc[1] < per_time.iloc[2] < per_time.iloc[-1]
    assert spearmanr(obs[syn.TIME_KEY], distance).statistic > 0.5
    first = obs[syn.TIME_KEY] == obs[syn.TIME_KEY].min()
    assert (obs.loc[first, syn.BASIN_KEY] == "progenitor").mean() > 0.9
    last = obs[syn.TIME_KEY] == obs[syn.TIME_KEY].max()
    basins = obs.loc[last, syn.BASIN_KEY].value_counts(normalize=True)
    assert basins["progenitor"] < 0.3 and basins["fate_A"] > 0.2 and basins["fate_B"] > 0.2


def test_fates_have_distinct_expression_programmes(tiny):
    rna = tiny[syn.RNA]
    x = _dense(rna.X)
    logn = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    committed = rna.obs[syn.BASIN_KEY].to_numpy()
    mean_a = logn[committed == "fate_A"].mean(axis=0)
    mean_b = logn[committed == "fate_B"].mean(axis=0)
    # Several genes differ by more than a natural-log unit between the two fates.
    assert (np.abs(mean_a - mean_b) > 1.0).sum() >= 5


# --------------------------------------------------------------------------- generate: counts


def test_rna_counts_are_raw_sparse_integers(tiny):
    x = tiny[syn.RNA].X
    assert isinstance(x, sp.csr_matrix) and x.dtype == np.float32
    assert x.data.min() >= 0 and np.all(x.data == np.round(x.data))


def test_rna_depth_and_sparsity_are_realistic(panel):
    x = panel[syn.RNA].X
    library = np.asarray(x.sum(axis=1)).ravel()
    assert 2000 <= np.median(library) <= 5000
    zeros = 1 - x.nnz / np.prod(x.shape)
    assert 0.5 < zeros < 0.95
    share = np.asarray(x.sum(axis=0)).ravel() / library.sum()
    assert share.max() < 0.1  # no single gene swamps the libraries


def test_low_quality_cells_have_high_mt_fraction_and_low_depth(panel):
    rna = panel[syn.RNA]
    x = _dense(rna.X)
    library = x.sum(axis=1)
    mt_fraction = x[:, rna.var[syn.MT_KEY].to_numpy()].sum(axis=1) / library
    low = rna.obs[syn.LOW_QUALITY_KEY].to_numpy()
    assert 1 <= low.sum() <= 0.1 * len(low)
    assert 0.01 < np.median(mt_fraction[~low]) < 0.08
    assert mt_fraction[low].min() > np.quantile(mt_fraction[~low], 0.95)
    assert np.median(library[low]) < 0.5 * np.median(library[~low])


def test_batch_b1_is_deeper(panel):
    rna = panel[syn.RNA]
    library = np.asarray(rna.X.sum(axis=1)).ravel()
    batch = rna.obs[syn.BATCH_KEY].to_numpy()
    good = ~rna.obs[syn.LOW_QUALITY_KEY].to_numpy()
    assert np.median(library[good & (batch == "b1")]) > np.median(library[good & (batch == "b0")])


def test_protein_counts_follow_their_gene(tiny):
    rna, prot = tiny[syn.RNA], tiny[syn.PROT]
    assert isinstance(prot.X, sp.csr_matrix) and prot.X.dtype == np.float32
    p = _dense(prot.X)
    assert p.min() >= 0 and np.all(p == np.round(p))
    # Ambient background: every droplet has some antibody counts.
    assert np.all(p.sum(axis=1) > 0)
    genes = _dense(rna[:, prot.var[syn.GENE_KEY].to_numpy()].X)
    rho = np.array([spearmanr(p[:, j], genes[:, j]).statistic for j in range(p.shape[1])])
    assert np.median(rho) > 0.6 and rho.min() > 0.45, rho


# --------------------------------------------------------------------------- generate: spatial


def test_spatial_layout_and_image(tiny):
    spatial = tiny[syn.SPATIAL]
    image = _image(tiny)
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert 256 <= image.shape[0] <= 512 and image.shape[0] == image.shape[1]
    assert image.min() >= 0 and image.max() <= 1
    xy = spatial.obsm[syn.SPATIAL_KEY]
    radius = _spot_radius(tiny)
    assert radius > 0
    scale = spatial.uns[syn.SPATIAL_KEY][syn.LIBRARY_ID]["scalefactors"]
    assert scale["tissue_hires_scalef"] == 1.0
    assert np.all(xy - radius >= 0) and np.all(xy[:, 0] + radius <= image.shape[1])
    assert np.all(xy[:, 1] + radius <= image.shape[0])
    # A regular grid: neighbouring spots are one spacing apart.
    assert len(np.unique(np.round(np.diff(np.unique(xy[:, 0])), 6))) == 1
    assert isinstance(spatial.X, sp.csr_matrix) and spatial.X.dtype == np.float32


def test_spots_reflect_their_niche(tiny):
    spatial = tiny[syn.SPATIAL]
    obs = spatial.obs
    in_tissue = obs[syn.IN_TISSUE_KEY].to_numpy()
    assert 0.5 < in_tissue.mean() < 1
    assert (obs.loc[~in_tissue, syn.NICHE_KEY] == syn.OUTSIDE_TISSUE).all()
    assert set(obs.loc[in_tissue, syn.NICHE_KEY]) == set(syn.NICHES)
    assert (obs.loc[in_tissue, syn.N_CELLS_KEY] > 0).mean() > 0.9
    library = np.asarray(spatial.X.sum(axis=1)).ravel()
    assert np.all(library[obs[syn.N_CELLS_KEY].to_numpy() == 0] == 0)
    assert spearmanr(obs[syn.N_CELLS_KEY], library).statistic > 0.8
    fraction = spatial.obsm[syn.CELL_FRACTION_KEY]
    occupied = obs[syn.N_CELLS_KEY].to_numpy() > 0
    np.testing.assert_allclose(fraction.to_numpy()[occupied].sum(axis=1), 1.0)
    by_niche = fraction.groupby(obs[syn.NICHE_KEY].to_numpy()).mean()
    assert by_niche.loc["niche_A", "fate_A"] > by_niche.loc["niche_B", "fate_A"] + 0.3
    assert by_niche.loc["niche_B", "fate_B"] > by_niche.loc["niche_A", "fate_B"] + 0.3


def test_image_patches_at_spots_carry_composition(tiny):
    spatial = tiny[syn.SPATIAL]
    image = _image(tiny)
    radius = _spot_radius(tiny)
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5
    patches = np.array(
        [image[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2].mean(axis=0) for x, y in spatial.obsm[syn.SPATIAL_KEY]]
    )
    niche = spatial.obs[syn.NICHE_KEY].to_numpy()
    assert np.abs(patches[niche == "niche_A"].mean(axis=0) - patches[niche == "niche_B"].mean(axis=0)).max() > 0.1
    in_tissue = spatial.obs[syn.IN_TISSUE_KEY].to_numpy()
    fraction = spatial.obsm[syn.CELL_FRACTION_KEY]
    redness = patches[:, 0] - patches[:, 2]
    a_over_b = (fraction["fate_A"] - fraction["fate_B"]).to_numpy()
    assert spearmanr(redness[in_tissue], a_over_b[in_tissue]).statistic > 0.7


def test_spot_counts_are_the_sum_of_their_cells():
    genes = syn._gene_model(100, rng=np.random.default_rng(0))
    tissue = syn._simulate_tissue(
        genes, n_spots=40, time_points=np.arange(6.0), rng=np.random.default_rng(1)
    )
    member_xy = tissue.cell_xy[tissue.member_cells]
    spot_of_member = tissue.membership.tocsc().indices
    assert np.all(np.linalg.norm(member_xy - tissue.spot_xy[spot_of_member], axis=1) <= tissue.spot_radius)
    others = np.setdiff1d(np.arange(len(tissue.cell_xy)), tissue.member_cells)
    nearest = np.min(np.linalg.norm(tissue.cell_xy[others, None] - tissue.spot_xy[None], axis=-1), axis=1)
    assert np.all(nearest > tissue.spot_radius)
    np.testing.assert_array_equal(
        tissue.spot_counts.toarray(), (tissue.membership @ tissue.member_counts).toarray()
    )
    manual = np.stack(
        [tissue.member_counts[tissue.membership[s].indices].toarray().sum(axis=0) for s in range(40)]
    )
    np.testing.assert_array_equal(tissue.spot_counts.toarray(), manual)


# --------------------------------------------------------------------------- generate: params and files


def test_params_are_json_serialisable(tiny):
    params = tiny.uns[syn.PARAMS_KEY]
    assert json.loads(json.dumps(params)) == params
    assert params["seed"] == 1 and params["time_points"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert params["landscape"]["tilt"] == syn.TILT


# mudata 0.3 warns about its coming pull_on_update default and about the gene names
# that rna and spatial share on purpose; neither affects what is written.
@pytest.mark.filterwarnings("ignore:From 0.4 .update():FutureWarning")
@pytest.mark.filterwarnings("ignore:Cannot join columns:UserWarning")
@pytest.mark.filterwarnings("ignore:var_names are not unique:UserWarning")
def test_h5mu_round_trip_keeps_everything(tiny, tmp_path):
    path = tmp_path / "synthetic.h5mu"
    tiny.write(path)
    back = md.read_h5mu(path)
    assert set(back.mod) == {syn.RNA, syn.PROT, syn.SPATIAL}
    for mod in (syn.RNA, syn.PROT, syn.SPATIAL):
        a, b = tiny[mod], back[mod]
        assert sp.issparse(b.X)
        np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
        pd.testing.assert_frame_equal(a.obs, b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)
        assert set(a.obsm) == set(b.obsm)
        for key in a.obsm:
            np.testing.assert_array_equal(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]))
    np.testing.assert_array_equal(_image(tiny), _image(back))
    assert _spot_radius(back) == _spot_radius(tiny)
    params = back.uns[syn.PARAMS_KEY]
    assert params["seed"] == 1
    np.testing.assert_array_equal(params["time_points"], tiny.uns[syn.PARAMS_KEY]["time_points"])
    np.testing.assert_array_equal(
        params["landscape"]["well_centres"], tiny.uns[syn.PARAMS_KEY]["landscape"]["well_centres"]
    )


# --------------------------------------------------------------------------- truth for scoring


def test_oracle_cells_are_measured_like_the_dataset_and_differ_from_it(tiny):
    params = tiny.uns[syn.PARAMS_KEY]
    rna = tiny["rna"]
    counts, genes = syn.sample_cells(params, time=2.0, n=40, seed=0)
    assert counts.shape == (40, rna.n_vars) and genes == list(rna.var_names)
    assert np.allclose(counts.data, np.round(counts.data)) and counts.min() >= 0
    # Same genes and depth (healthy cells only, so a little deeper than the data's median).
    healthy = ~rna.obs[syn.LOW_QUALITY_KEY].to_numpy()
    depth_data = np.median(np.asarray(rna.X[healthy].sum(axis=1)).ravel())
    depth_oracle = np.median(np.asarray(counts.sum(axis=1)).ravel())
    assert 0.7 < depth_oracle / depth_data < 1.4
    again, _ = syn.sample_cells(params, time=2.0, n=40, seed=0)
    other, _ = syn.sample_cells(params, time=2.0, n=40, seed=1)
    assert (again != counts).nnz == 0 and (other != counts).nnz > 0


def test_oracle_follows_the_true_process_in_time(tiny):
    # Marker genes of the fate wells are off at t=0 and on for many cells late: the oracle's cells
    # at a late time look like the data's late cells, not like its early ones.
    params = tiny.uns[syn.PARAMS_KEY]
    rna = tiny["rna"]
    t = rna.obs["time"].to_numpy()
    late_time = t.max()
    late, _ = syn.sample_cells(params, time=late_time, n=int((t == late_time).sum()), seed=3)

    def profile(x):
        x = np.asarray(x.todense(), dtype=float)
        return np.log1p(x / x.sum(1, keepdims=True) * 1e4).mean(0)

    oracle = profile(late)
    assert np.abs(oracle - profile(rna.X[t == late_time])).mean() < np.abs(oracle - profile(rna.X[t == 0])).mean()


def test_fate_probabilities_are_distributions_and_match_realised_fates():
    rng = np.random.default_rng(0)
    minima = syn.WELL_MINIMA
    # Cells sitting in a fate well at t=4 stay there; a progenitor at t=0 can go either way.
    latent = np.vstack([minima[1] + 0.05 * rng.normal(size=(5, 2)), minima[2] + 0.05 * rng.normal(size=(5, 2)),
                        minima[0][None].repeat(5, 0)])
    times = np.array([4.0] * 10 + [0.0] * 5)
    p = syn.fate_probabilities(latent, times, t_end=5.0, n_rollouts=60, seed=0)
    assert p.shape == (15, 3) and np.allclose(p.sum(1), 1.0)
    fate_a, fate_b = syn.BASINS.index("fate_A"), syn.BASINS.index("fate_B")
    assert (p[:5, fate_a] > 0.9).all() and (p[5:10, fate_b] > 0.9).all()
    assert (p[10:, fate_a] > 0.15).all() and (p[10:, fate_b] > 0.15).all()
    with pytest.raises(ValueError, match="after t_end"):
        syn.fate_probabilities(latent, times + 2, t_end=5.0)


# --------------------------------------------------------------------------- generate: ATAC peaks


def test_peaks_come_only_when_asked_and_leave_the_other_modalities_alone():
    """n_peaks > 0 adds atac from its own stream: without it nothing changes, with it RNA, protein,
    the truth and the spatial section are the same arrays as without."""
    plain = syn.generate(**TINY, seed=3)
    multiome = syn.generate(**TINY, seed=3, n_peaks=400)
    assert syn.ATAC not in plain.mod and "n_peaks" not in plain.uns[syn.PARAMS_KEY]
    assert multiome.uns[syn.PARAMS_KEY]["n_peaks"] == 400
    for mod in (syn.RNA, syn.PROT, syn.SPATIAL):
        np.testing.assert_array_equal(_dense(plain[mod].X), _dense(multiome[mod].X))
    np.testing.assert_array_equal(plain[syn.RNA].obsm[syn.LATENT_KEY], multiome[syn.RNA].obsm[syn.LATENT_KEY])
    again = syn.generate(**TINY, seed=3, n_peaks=400)
    np.testing.assert_array_equal(_dense(multiome[syn.ATAC].X), _dense(again[syn.ATAC].X))


def test_peaks_are_sparse_binary_ish_counts_named_by_position():
    import re

    atac = syn.generate(**TINY, seed=0, n_peaks=600)[syn.ATAC]
    x = _dense(atac.X)
    assert sp.issparse(atac.X) and atac.X.dtype == np.float32 and atac.shape == (300, 600)
    assert set(np.unique(x)) <= {0.0, 1.0, 2.0}
    assert 0.8 < (x == 0).mean() < 0.95  # most entries zero, as in real single-cell ATAC
    assert ((x == 1).sum() > 3 * (x == 2).sum())  # a second allele is rarer than the first
    assert all(re.fullmatch(r"chr\d+:\d+-\d+", n) for n in atac.var_names) and atac.var_names.is_unique
    # the cell's capture rate is its depth: counts per cell follow it
    depth = x.sum(axis=1)
    assert spearmanr(depth, atac.obs["truth_capture"]).statistic > 0.7


def test_peaks_open_with_the_latent_state_and_gene_linked_peaks_follow_their_gene():
    mdata = syn.generate(**TINY, seed=1, n_peaks=600)
    atac, rna = mdata[syn.ATAC], mdata[syn.RNA]
    x = _dense(atac.X) > 0
    basin = rna.obs[syn.BASIN_KEY].astype(str).to_numpy()
    kind = atac.var["truth_kind"].astype(str).to_numpy()
    # state-dependent peaks differ between basins far more than constitutive ones do
    means = np.stack([x[basin == b].mean(axis=0) for b in np.unique(basin)])
    spread = means.max(axis=0) - means.min(axis=0)
    assert np.median(spread[kind != "constitutive"]) > 2 * np.median(spread[kind == "constitutive"])
    # a gene-linked peak opens where its gene is expressed (same programme): positive correlation on average
    linked = np.flatnonzero(kind == "gene_linked")
    genes = _dense(rna.X)
    lognorm = np.log1p(genes / genes.sum(axis=1, keepdims=True) * 1e4)
    index = {g: j for j, g in enumerate(rna.var_names)}
    with np.errstate(invalid="ignore", divide="ignore"):  # a peak or gene constant in these cells: NaN, left out
        r = [np.corrcoef(x[:, p], lognorm[:, index[atac.var["gene"].iloc[p]]])[0, 1] for p in linked]
    assert np.nanmedian(r) > 0.1
