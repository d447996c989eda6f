import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from virtualcell.errors import InputError
from virtualcell.pairing import image_patches, pair, split_cells
from virtualcell.synthetic import generate


def test_pair_keeps_cells_measured_in_rna_alone_marked_and_the_pairs_in_one_order(tiny_mdata):
    from virtualcell.pairing import MODALITIES_KEY, has_partner

    rna = tiny_mdata["rna"]
    # 10 cells lack their protein; 5 protein barcodes have no RNA
    prot = ad.concat([tiny_mdata["prot"][10:], tiny_mdata["prot"][:5]])
    prot.obs_names = list(prot.obs_names[:-5]) + [f"no_rna_{i}" for i in range(5)]
    out = pair(md.MuData({"rna": rna.copy(), "prot": prot}), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert out.n_obs == rna.n_obs and list(out.obs_names) == list(rna.obs_names)
    assert list(out["prot"].obs_names) == list(rna.obs_names[10:])
    marked = out["rna"].obs[MODALITIES_KEY].astype(str)
    assert (marked[:10] == "rna").all() and (marked[10:] == "rna+prot").all()
    assert has_partner(out["rna"].obs).sum() == rna.n_obs - 10
    assert out.obs["split"].notna().all() and out["prot"].obs["split"].notna().all()
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


# --------------------------------------------------------------------------- image patches


def _section(images: dict, xy, *, scalefactors: dict, library: str = "s1") -> ad.AnnData:
    xy = np.asarray(xy, dtype=np.float64)
    return ad.AnnData(
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(xy))]),
        obsm={"spatial": xy},
        uns={"spatial": {library: {"images": images, "scalefactors": scalefactors}}},
    )


def _gradient(height: int = 120, width: int = 200) -> np.ndarray:
    """Red rises with the column, green with the row, blue is constant: colour says where it is."""
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    return np.stack([cols / width, rows / height, np.full_like(rows, 0.25)], axis=-1).astype(np.float32)


def test_patch_has_the_colour_under_the_spot():
    image = _gradient()
    height, width = image.shape[:2]
    scale, diameter = 0.5, 24.0  # full-resolution coordinates: 400 x 240; a patch is 12 image pixels
    rng = np.random.default_rng(0)
    xy = rng.uniform([20, 20], [380, 220], size=(30, 2))
    scalefactors = {"tissue_hires_scalef": scale, "spot_diameter_fullres": diameter}
    spots = _section({"hires": image}, xy, scalefactors=scalefactors)
    patches = image_patches(spots, size=8)
    assert patches.shape == (30, 3 * 8 * 8) and patches.dtype == np.float32
    patches = patches.reshape(-1, 3, 8, 8)
    mean = patches.mean(axis=(2, 3))
    # The centre of a crop is the spot to within the half pixel of snapping to the image grid.
    np.testing.assert_allclose(mean[:, 0], xy[:, 0] * scale / width, atol=0.5 / width + 1e-6)
    np.testing.assert_allclose(mean[:, 1], xy[:, 1] * scale / height, atol=0.5 / height + 1e-6)
    np.testing.assert_allclose(mean[:, 2], 0.25, atol=1e-6)
    # Rows of a patch are image rows, columns image columns; a patch spans 12 image pixels.
    red_span = patches[:, 0, :, -1].mean(1) - patches[:, 0, :, 0].mean(1)
    assert np.all(red_span > 0) and np.all(red_span < 12 / width)
    assert np.all(patches[:, 1, -1, :].mean(1) > patches[:, 1, 0, :].mean(1))
    # An 8-bit image gives the same patches, to its quantisation.
    as_uint8 = np.round(image * 255).astype(np.uint8)
    spots.uns["spatial"]["s1"]["images"]["hires"] = as_uint8
    np.testing.assert_allclose(image_patches(spots, size=8).reshape(-1, 3, 8, 8), patches, atol=1 / 255)


def test_patch_leaving_the_image_is_padded_white():
    image = _gradient()
    scalefactors = {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 24.0}
    # On the left edge, and on the bottom-right corner of the image.
    spots = _section({"hires": image}, [[0.0, 120.0], [400.0, 240.0]], scalefactors=scalefactors)
    patches = image_patches(spots, size=12).reshape(2, 3, 12, 12)  # 12 px: no resizing
    np.testing.assert_array_equal(patches[0, :, :, :6], 1.0)
    np.testing.assert_allclose(patches[0, :, :, 6:], image[54:66, 0:6].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(patches[1, :, :6, :6], image[114:, 194:].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(patches[1, :, 6:, :], 1.0)
    np.testing.assert_array_equal(patches[1, :, :, 6:], 1.0)


def test_patches_come_from_the_highest_resolution_image():
    red = np.zeros((100, 100, 3), np.float32)
    red[..., 0] = 1
    blue = np.zeros((20, 20, 3), np.float32)
    blue[..., 2] = 1
    scalefactors = {"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 20.0}
    xy = [[50.0, 50.0], [150.0, 100.0]]
    spots = _section({"lowres": blue, "hires": red}, xy, scalefactors=scalefactors)
    np.testing.assert_allclose(image_patches(spots, size=4).reshape(2, 3, -1).mean(-1), [[1, 0, 0]] * 2, atol=1e-6)
    del spots.uns["spatial"]["s1"]["images"]["hires"]
    np.testing.assert_allclose(image_patches(spots, size=4).reshape(2, 3, -1).mean(-1), [[0, 0, 1]] * 2, atol=1e-6)


def test_patches_of_several_sections():
    red, green = np.zeros((50, 50, 3), np.float32), np.zeros((50, 50, 3), np.float32)
    red[..., 0], green[..., 1] = 1, 1
    scalefactors = {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 10.0}
    spots = _section({"hires": red}, [[25.0, 25.0]] * 4, scalefactors=scalefactors)
    spots.uns["spatial"]["s2"] = {"images": {"hires": green}, "scalefactors": scalefactors}
    with pytest.raises(InputError, match="several sections.*'library_id' column"):
        image_patches(spots, origin="spots.h5ad")
    np.testing.assert_allclose(image_patches(spots, size=2, library_id="s2").reshape(4, 3, -1)[:, 1], 1.0, atol=1e-6)
    spots.obs["library_id"] = ["s1", "s2", "s2", "s1"]
    colour = image_patches(spots, size=2).reshape(4, 3, -1).mean(-1)
    np.testing.assert_allclose(colour, [[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]], atol=1e-6)
    with pytest.raises(InputError, match="select that section's spots first"):
        image_patches(spots, library_id="s1")
    spots.obs["library_id"] = ["s1", "s3", "s2", "s1"]
    with pytest.raises(InputError, match="names section 's3'"):
        image_patches(spots)
    del spots.uns["spatial"]
    with pytest.raises(InputError, match="no tissue image"):
        image_patches(spots)


def test_without_a_spot_diameter_the_spot_spacing_sets_the_patch():
    xy = np.array([[x, y] for x in range(40, 200, 20) for y in range(40, 120, 20)], dtype=float)
    spots = _section({"hires": _gradient()}, xy, scalefactors={"tissue_hires_scalef": 1.0})
    with_spacing = _section(
        {"hires": _gradient()}, xy, scalefactors={"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 20.0}
    )
    np.testing.assert_array_equal(image_patches(spots, size=5), image_patches(with_spacing, size=5))


def test_patches_of_a_real_visium_section():
    from virtualcell.readers import testdata_path, read_spatial_h5ad

    spots = read_spatial_h5ad(
        testdata_path("visium_mouse_brain_crop.h5ad"), image=testdata_path("visium_mouse_brain_crop.jpg"),
        recover_counts=True,
    )["spatial"]  # fmt: skip
    section = next(iter(spots.uns["spatial"].values()))
    assert section["scalefactors"]["tissue_hires_scalef"] == 1
    diameter = section["scalefactors"]["spot_diameter_fullres"]
    assert diameter == pytest.approx(89.4, abs=0.1)
    patches = image_patches(spots, size=32)
    assert patches.shape == (49, 3 * 32 * 32)
    assert 0 <= patches.min() and patches.max() <= 1
    assert len(np.unique(patches, axis=0)) == 49
    # Every spot lies well inside the image (no white padding, the image's maximum is 0.8), and a
    # patch's mean colour is that of the 89 x 89 pixels around its spot.
    assert patches.max() <= section["images"]["hires"].max()
    x, y = np.round(spots.obsm["spatial"][0]).astype(int)
    half = round(diameter) // 2
    expected = section["images"]["hires"][y - half : y + half + 1, x - half : x + half + 1].mean(axis=(0, 1))
    np.testing.assert_allclose(patches[0].reshape(3, -1).mean(1), expected, atol=0.01)
    # Spots see different tissue: their mean colours spread.
    assert patches.reshape(49, 3, -1).mean(axis=2).std(axis=0).min() > 0.005


def test_synthetic_patches_show_the_niche_under_the_spot():
    spots = generate(n_cells=300, n_genes=60, n_spots=60)["spatial"]
    colour = image_patches(spots).reshape(spots.n_obs, 3, -1).mean(axis=2)
    niche = spots.obs["niche"].to_numpy()
    # The generator paints fate_A cells red, fate_B cells blue and progenitors purple, over pink
    # stroma and white glass, and each niche is enriched for one of them.
    redness = pd.Series(colour[:, 0] - colour[:, 2]).groupby(niche).mean()
    assert redness["niche_A"] > redness["niche_progenitor"] + 0.1 > redness["niche_B"] + 0.2
    brightness = pd.Series(colour.mean(axis=1)).groupby(niche).mean()
    assert brightness["outside"] > brightness.drop("outside").max() + 0.15
    # Within the tissue, a spot's colour follows the cell types under it.
    in_tissue = spots.obs["in_tissue"].to_numpy()
    fraction = spots.obsm["truth_cell_fraction"]
    a_over_b = (fraction["fate_A"] - fraction["fate_B"]).to_numpy()
    assert spearmanr(colour[in_tissue, 0] - colour[in_tissue, 2], a_over_b[in_tissue]).statistic > 0.8


def test_pair_of_a_spatial_section_pairs_each_spot_with_the_patch_under_it():
    """modalities [spatial]: the pairs are (spot expression, image patch), split like cells."""
    from virtualcell import io
    from virtualcell.pairing import IMAGE, PATCH_SHAPE, image_patches, pair
    from virtualcell.readers import testdata_path

    mdata = io.read_dataset("crop", {
        "source": "h5ad", "path": str(testdata_path("visium_mouse_brain_crop.h5ad")), "modalities": ["spatial"],
        "image_path": str(testdata_path("visium_mouse_brain_crop.jpg")), "recover_counts": True,
    })
    expected = image_patches(mdata["spatial"], size=16)
    paired = pair(mdata, val_fraction=0.2, test_fraction=0.2, seed=0, patch_size=16)
    assert set(paired.mod) == {"spatial", IMAGE}
    assert list(paired[IMAGE].obs_names) == list(paired["spatial"].obs_names)
    assert paired[IMAGE].uns[PATCH_SHAPE] == [3, 16, 16]
    np.testing.assert_array_equal(paired[IMAGE].X, expected)
    assert paired.obs["split"].value_counts().to_dict() == {"train": 29, "val": 10, "test": 10}
    (library,) = paired["spatial"].uns["spatial"].values()
    assert "images" not in library  # the patches carry the image on; the section's image is not copied
    # The spatial neighbour graph, in squidpy's layout: the crop's spots sit on Visium's hexagonal grid,
    # so a spot inside the crop has its 6 neighbours, each one spacing (about 100 full-resolution px) away.
    from virtualcell.pairing import SPATIAL_CONNECTIVITIES, SPATIAL_DISTANCES, SPATIAL_NEIGHBORS

    spots = paired["spatial"]
    graph, distances = spots.obsp[SPATIAL_CONNECTIVITIES], spots.obsp[SPATIAL_DISTANCES]
    assert spots.uns[SPATIAL_NEIGHBORS]["connectivities_key"] == SPATIAL_CONNECTIVITIES
    assert (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
    degree = np.asarray(graph.sum(axis=1)).ravel()
    assert degree.max() == 6 and degree.min() >= 1
    spacing = np.sort(np.linalg.norm(spots.obsm["spatial"][:, None] - spots.obsm["spatial"][None], axis=2), 1)[:, 1]
    np.testing.assert_allclose(distances.data, np.median(spacing), rtol=0.05)


def test_spatial_graph_keeps_each_section_apart_and_takes_the_first_ring():
    from virtualcell.pairing import spatial_graph

    # A square grid: 4 neighbours inside (the diagonals, 1.41 spacings away, are the second ring).
    xy = np.array([(x, y) for x in range(5) for y in range(5)], dtype=float) * 50
    graph, _ = spatial_graph(xy, np.zeros(25))
    degree = np.asarray(graph.sum(axis=1)).ravel().reshape(5, 5)
    assert degree[2, 2] == 4 and degree[0, 0] == 2 and degree[0, 2] == 3
    # The same grid twice, on two sections laid over each other: no edge crosses sections.
    graph, _ = spatial_graph(np.vstack([xy, xy + 1]), np.repeat(["a", "b"], 25))
    assert graph[:25, 25:].nnz == 0 and graph.nnz == 2 * 40 * 2
