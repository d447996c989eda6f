"""Pairing: which cells are measured in which modalities, and the train/val/test split.

For a spatial section without single-cell RNA, the pairs are each spot's
expression and the patch of the tissue image under it (modality ``image``).

The split is what keeps evaluation honest, so it holds out whole groups when
the config names a grouping column (a donor, a batch), and otherwise cells
drawn at random within each time point so every time point is in every split.
"""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from virtualcell.errors import InputError
from virtualcell.io import ATAC, PROT, RNA, expression_modality
from virtualcell.readers import LIBRARY_KEY, SCALEFACTOR_OF_IMAGE, SPATIAL, check_spots_in_images

SPLITS = ("train", "val", "test")
# the modality of tissue-image patches, one per spot, paired with the spots' expression
from virtualcell.plan import IMAGE, partner_modality  # noqa: E402

# uns key of the image modality: [channels, height, width] of each flattened patch
PATCH_SHAPE = "patch_shape"
# squidpy's keys of the spatial neighbour graph (sq.gr.spatial_neighbors): obsp and uns of the spots
SPATIAL_CONNECTIVITIES = "spatial_connectivities"
SPATIAL_DISTANCES = "spatial_distances"
SPATIAL_NEIGHBORS = "spatial_neighbors"
# A spot's first ring: the spots within this many times the section's median nearest-neighbour spacing
# (a hexagonal Visium grid's 6 at 1 spacing, not its next ring at 1.73; a square grid's 4, not the diagonals at 1.41).
RING_TOLERANCE = 1.2


# obs: what a cell was measured in, "rna+prot" ("rna+atac") or "rna" (its partner missing)
MODALITIES_KEY = "modalities"
RNA_ONLY = RNA
# How messages name a cell's partner modality.
PARTNER_WORDS = {PROT: "protein", ATAC: "ATAC peaks"}


def paired_label(partner: str) -> str:
    """obs["modalities"] of a cell measured in RNA and its partner: ``rna+prot``, ``rna+atac``."""
    return f"{RNA}+{partner}"


def cell_partner(mdata: md.MuData) -> str | None:
    """The modality a dataset's cells are paired with (protein, or peaks), None for RNA alone or spots."""
    if expression_modality(mdata) != RNA:
        return None
    return partner_modality(list(mdata.mod))


def has_partner(obs: pd.DataFrame) -> np.ndarray:
    """Which cells were measured in the partner modality too (all, without a ``modalities`` column)."""
    if MODALITIES_KEY not in obs:
        return np.ones(len(obs), dtype=bool)
    return obs[MODALITIES_KEY].astype(str).to_numpy() != RNA_ONLY


def paired_cells(mdata: md.MuData, *, origin: str = "input") -> pd.Index:
    """Cells measured in both RNA and its partner, protein or peaks (or in RNA alone when there is
    no partner); for a spatial section without RNA, its spots. Raises when RNA and the partner share
    no cell at all."""
    expression = expression_modality(mdata)
    cells = mdata.mod[expression].obs_names
    partner = cell_partner(mdata)
    if partner:
        cells = cells.intersection(mdata.mod[partner].obs_names, sort=False)
        if len(cells) == 0:
            raise InputError(
                f"{origin}: RNA and {PARTNER_WORDS.get(partner, partner)} share no cell barcodes; check that both "
                "modalities come from the same library (barcode suffixes such as '-1' must match)"
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
    patch_size: int = 32,
    patch_diameter_scale: float = 1.0,
    origin: str = "input",
) -> md.MuData:
    """Keep the paired cells and write their split.

    Parameters
    ----------
    mdata
        QC'd data: ``rna`` (+ ``prot`` or ``atac``), or ``spatial`` spots with their image.
    val_fraction, test_fraction, group_key, seed
        The split (:func:`split_cells`).
    patch_size, patch_diameter_scale
        For spots: image patches of ``patch_size`` x ``patch_size`` pixels covering
        ``patch_diameter_scale`` spot diameters (:func:`image_patches`).

    Returns
    -------
    A MuData of the RNA's cells with ``obs["split"]`` (train/val/test) on the MuData and on each
    modality. With protein (or peaks), a cell measured in RNA alone is kept and marked
    (``obs["modalities"]`` ``rna``; paired cells ``rna+prot``, ``rna+atac``); the partner modality
    holds the paired cells, in the RNA's order. For spots
    without RNA: modalities ``spatial`` (the section's images left out: the patches
    carry them on) and ``image`` (``X``: flattened RGB patches in [0, 1],
    ``uns["patch_shape"]`` = [3, patch_size, patch_size]).
    """
    paired = paired_cells(mdata, origin=origin)
    expression = expression_modality(mdata)
    cells = mdata.mod[expression].obs_names
    mods = {expression: mdata.mod[expression].copy()}
    partner = cell_partner(mdata)
    if partner:
        mods[partner] = mdata.mod[partner][cells[cells.isin(paired)]].copy()
        both = paired_label(partner)
        mods[RNA].obs[MODALITIES_KEY] = pd.Categorical(np.where(cells.isin(paired), both, RNA_ONLY),
                                                       categories=[both, RNA_ONLY])
    if expression == SPATIAL:
        spots = mods[SPATIAL]
        patches = image_patches(spots, size=patch_size, diameter_scale=patch_diameter_scale, origin=origin)
        image = ad.AnnData(X=patches, obs=pd.DataFrame(index=spots.obs_names.copy()))
        image.uns[PATCH_SHAPE] = [3, patch_size, patch_size]
        mods[IMAGE] = image
        add_spatial_graph(spots, origin=origin)
        # The full images are megabytes per section; downstream reads the patches.
        for library in spots.uns.get(SPATIAL, {}).values():
            library.pop("images", None)
    obs = mods[expression].obs
    split = split_cells(
        obs, val_fraction=val_fraction, test_fraction=test_fraction, group_key=group_key, seed=seed
    )
    for adata in mods.values():
        adata.obs["split"] = pd.Categorical(split.reindex(adata.obs_names), categories=SPLITS)
    out = md.MuData(mods)
    out.uns.update(dict(mdata.uns))
    out = out[mods[expression].obs_names].copy()  # the RNA's cells, in its order
    out.obs["split"] = mods[expression].obs["split"]
    if MODALITIES_KEY in mods[expression].obs:
        out.obs[MODALITIES_KEY] = mods[expression].obs[MODALITIES_KEY]
    return out


# --------------------------------------------------------------------------- the spots' neighbour graph


def spatial_graph(xy: np.ndarray, sections: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Each spot's first ring of neighbours on its own section: (connectivities, distances).

    As ``squidpy.gr.spatial_neighbors(coord_type="grid", n_rings=1, library_key=...)``: two spots of
    one section are neighbours when they lie within ``RING_TOLERANCE`` times the section's median
    nearest-neighbour spacing; spots of different sections never are. Connectivities are 1 on every
    edge (symmetric, no self-loops); distances are the edges' lengths in full-resolution pixels
    (squidpy's grid mode writes the ring number instead). Written here with scipy's k-d tree because
    squidpy 1.8 brings spatialdata, dask and geopandas with it, and this is the one function we need.
    """
    n = len(xy)
    rows, cols, lengths = [], [], []
    for name in np.unique(sections):
        spots = np.flatnonzero(sections == name)
        if len(spots) < 2:
            continue
        tree = cKDTree(xy[spots])
        spacing = float(np.median(tree.query(xy[spots], k=2)[0][:, 1]))
        edges = tree.query_pairs(r=RING_TOLERANCE * spacing, output_type="ndarray")
        i, j = spots[edges[:, 0]], spots[edges[:, 1]]
        rows += [i, j]
        cols += [j, i]
        lengths += [np.linalg.norm(xy[i] - xy[j], axis=1)] * 2
    if rows:
        r, c, d = np.concatenate(rows), np.concatenate(cols), np.concatenate(lengths)
    else:
        r = c = np.zeros(0, dtype=int)
        d = np.zeros(0)
    distances = sp.csr_matrix((d.astype(np.float32), (r, c)), shape=(n, n))
    connectivities = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n, n))
    return connectivities, distances


def add_spatial_graph(spots: ad.AnnData, *, origin: str = "input") -> None:
    """The spots' neighbour graph (:func:`spatial_graph`) in squidpy's layout: ``obsp["spatial_connectivities"]``,
    ``obsp["spatial_distances"]`` and ``uns["spatial_neighbors"]``, so that later stages know each spot's
    neighbourhood."""
    section = _section_of_spots(spots, spots.uns.get(SPATIAL, {}), library_id=None, origin=origin)
    connectivities, distances = spatial_graph(np.asarray(spots.obsm[SPATIAL], dtype=np.float64)[:, :2], section)
    spots.obsp[SPATIAL_CONNECTIVITIES] = connectivities
    spots.obsp[SPATIAL_DISTANCES] = distances
    spots.uns[SPATIAL_NEIGHBORS] = {
        "connectivities_key": SPATIAL_CONNECTIVITIES, "distances_key": SPATIAL_DISTANCES,
        "params": {"coord_type": "grid", "n_rings": 1, "radius_in_spacings": RING_TOLERANCE,
                   "library_key": LIBRARY_KEY},
    }


# --------------------------------------------------------------------------- image patches of spots

# Spots resized per call: bounds the memory of the full-size crops.
PATCH_CHUNK = 256


def image_patches(
    adata: ad.AnnData,
    *,
    size: int = 32,
    diameter_scale: float = 1.0,
    library_id: str | None = None,
    origin: str = "input",
) -> np.ndarray:
    """The square of the tissue image under each spot, as one row of pixels per spot.

    The square is centred on the spot (``obsm["spatial"]``, full-resolution
    pixel ``x, y``) with side ``diameter_scale`` spot diameters
    (``scalefactors["spot_diameter_fullres"]``; without it the median distance
    between neighbouring spots, about twice a Visium spot's diameter). It is
    cut from the section's image of the highest resolution (``hires`` before
    ``lowres``), padded with white (bare glass) where it leaves the image, and
    resized to ``size x size`` pixels with area averaging.

    Parameters
    ----------
    adata
        Spots, in squidpy's layout: ``obsm["spatial"]`` and
        ``uns["spatial"][library_id]`` with ``images`` (RGB, float in [0, 1]
        or unsigned integers) and ``scalefactors``; with several sections,
        ``obs["library_id"]`` names each spot's section.
    size
        Side of the returned patches in pixels.
    diameter_scale
        Side of the square in spot diameters: 1 is the square around the
        spot, where the expression was measured; larger adds the context
        around it.
    library_id
        The section all spots lie on; by default the only one in
        ``uns["spatial"]``, or each spot's ``obs["library_id"]``.
    origin
        Named in error messages (the file read).

    Returns
    -------
    np.ndarray
        float32 (n_spots, 3 * size * size) in [0, 1]: row ``i`` is spot ``i``'s
        patch flattened C-major, ``.reshape(-1, 3, size, size)`` gives
        (channel, row, column), the layout of ``Aligner(image_shapes=...)``.
    """
    if size < 1 or not diameter_scale > 0:
        raise InputError(f"image_patches: size must be >= 1 and diameter_scale > 0; got {size} and {diameter_scale}")
    libraries = adata.uns.get(SPATIAL, {})
    if not libraries:
        raise InputError(
            f"{origin}: no tissue image (uns['{SPATIAL}'] is empty or absent); read the section with its image, "
            "e.g. read_visium or read_spatial_h5ad(image=...)"
        )
    if SPATIAL not in adata.obsm:
        raise InputError(f"{origin}: no spot coordinates (obsm['{SPATIAL}']); store full-resolution pixel x, y there")
    section = _section_of_spots(adata, libraries, library_id=library_id, origin=origin)
    xy = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)[:, :2]
    # Checked against the section each spot was assigned, which with library_id need not be obs's.
    located = ad.AnnData(
        obs=pd.DataFrame({LIBRARY_KEY: section}, index=adata.obs_names),
        obsm={SPATIAL: xy},
        uns={SPATIAL: {name: libraries[name] for name in np.unique(section)}},
    )
    check_spots_in_images(located, origin=origin)
    out = np.empty((adata.n_obs, 3, size, size), dtype=np.float32)
    for name in np.unique(section):
        spots = np.flatnonzero(section == name)
        image, scale = _best_image(libraries[name], library=name, origin=origin)
        diameter = libraries[name].get("scalefactors", {}).get("spot_diameter_fullres")
        if diameter is None:
            diameter = _median_spot_spacing(xy[spots], library=name, origin=origin)
        elif not float(diameter) > 0:
            raise InputError(
                f"{origin}: section '{name}' has scalefactors['spot_diameter_fullres'] = {diameter}; give the "
                "spot diameter in full-resolution pixels (Space Ranger's scalefactors_json.json)"
            )
        side = max(1, round(diameter_scale * float(diameter) * scale))
        for start in range(0, len(spots), PATCH_CHUNK):
            chunk = spots[start : start + PATCH_CHUNK]
            crops = np.stack([_crop(image, x, y, side) for x, y in xy[chunk] * scale])
            out[chunk] = _resize(crops, size)
    return out.reshape(adata.n_obs, -1)


def _section_of_spots(adata: ad.AnnData, libraries, *, library_id: str | None, origin: str) -> np.ndarray:
    """The section (key of ``uns["spatial"]``) of each spot."""
    named = adata.obs[LIBRARY_KEY].astype(str).to_numpy() if LIBRARY_KEY in adata.obs else None
    if library_id is not None:
        if library_id not in libraries:
            raise InputError(
                f"{origin}: uns['{SPATIAL}'] has no section '{library_id}' (found {sorted(libraries)}); fix library_id"
            )
        if named is not None and (named != library_id).any():
            raise InputError(
                f"{origin}: library_id='{library_id}' but obs['{LIBRARY_KEY}'] puts some spots on other sections; "
                "select that section's spots first, or leave library_id unset to use each spot's own section"
            )
        return np.full(adata.n_obs, library_id, dtype=object)
    if len(libraries) == 1:
        return np.full(adata.n_obs, next(iter(libraries)), dtype=object)
    if named is None:
        raise InputError(
            f"{origin}: uns['{SPATIAL}'] holds several sections {sorted(libraries)} and obs has no "
            f"'{LIBRARY_KEY}' column saying which spot lies on which; add it, or pass library_id for spots of one"
        )
    unknown = sorted(set(named) - set(libraries))
    if unknown:
        raise InputError(
            f"{origin}: obs['{LIBRARY_KEY}'] names section '{unknown[0]}', which uns['{SPATIAL}'] lacks "
            f"(found {sorted(libraries)}); fix the column or add that section's image"
        )
    return named


def _best_image(entry, *, library: str, origin: str) -> tuple[np.ndarray, float]:
    """The section's image of the highest resolution, as float32 RGB in [0, 1], and its scale factor."""
    scales = {}
    for resolution in entry.get("images", {}):
        # check_spots_in_images has made sure that every image has its scale factor.
        key = SCALEFACTOR_OF_IMAGE.get(resolution, f"tissue_{resolution}_scalef")
        scales[resolution] = 1.0 if resolution == "fullres" else float(entry["scalefactors"][key])
    if not scales:
        raise InputError(
            f"{origin}: section '{library}' has no image; add its hires image and scalefactors['tissue_hires_scalef'] "
            "from Space Ranger's spatial/ folder"
        )
    resolution = max(scales, key=scales.get)
    image = np.asarray(entry["images"][resolution])
    if image.dtype.kind == "u":
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    image = image.astype(np.float32, copy=False)
    if image.ndim == 2:  # greyscale: the same value in every channel
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise InputError(
            f"{origin}: the {resolution} image of section '{library}' has shape {image.shape}; "
            "give an RGB image (height x width x 3)"
        )
    image = image[..., :3]  # an alpha channel carries no tissue
    if not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
        raise InputError(
            f"{origin}: the {resolution} image of section '{library}' has values outside [0, 1]; store it as "
            "uint8 or as float divided by 255"
        )
    return image, scales[resolution]


def _median_spot_spacing(xy: np.ndarray, *, library: str, origin: str) -> float:
    if len(xy) < 2:
        raise InputError(
            f"{origin}: section '{library}' has no scalefactors['spot_diameter_fullres'] and a single spot, so no "
            "spacing to take instead; add the spot diameter in full-resolution pixels"
        )
    distance, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distance[:, 1]))


def _crop(image: np.ndarray, x: float, y: float, side: int) -> np.ndarray:
    """The side x side pixels of ``image`` centred on image coordinates (x, y), white beyond its edges.

    Pixel (i, j) covers [j, j + 1) x [i, i + 1), as in the check that spots lie in the image.
    """
    height, width = image.shape[:2]
    left, top = round(x - side / 2), round(y - side / 2)
    crop = np.ones((side, side, 3), dtype=np.float32)
    x0, x1 = max(left, 0), min(left + side, width)
    y0, y1 = max(top, 0), min(top + side, height)
    if x0 < x1 and y0 < y1:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return crop


def _resize(crops: np.ndarray, size: int) -> np.ndarray:
    """(n, side, side, 3) crops -> (n, 3, size, size).

    Shrinking averages over each output pixel's footprint (``antialias``), so
    cell-sized detail finer than a patch pixel becomes its mean colour rather
    than aliasing into a pattern of whichever pixels happen to be sampled; a
    block mean would do the same only for sides that are multiples of
    ``size``. Enlarging (a low-resolution image) is bilinear.
    """
    # Imported here: torch takes about a second to import, and only this step of pairing needs it.
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(crops).permute(0, 3, 1, 2)
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # The interpolation weights are convex; the clamp only removes rounding.
    return resized.clamp_(0.0, 1.0).numpy()
