"""Atomic file writes: the one place that writes a temporary file and renames it into place.

Dependency-free (standard library only) so that the training code, which must
not import anndata or mlflow, shares it with ``io`` and ``tracking``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    An interrupted write therefore never leaves a file that looks finished; on
    failure the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    # The suffix is kept so writers that dispatch on it (anndata, mudata, matplotlib) still work.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file private (0600); give it the mode any new file gets here, so that
        # results in a shared project folder stay readable by the group, as the umask intends.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings that a killed writer of ``path`` left behind; return them.

    A SIGKILL (a cluster's time limit, a user's kill -9) gives :func:`atomic_write` no chance to
    remove its temporary file, and Snakemake, rerunning the job, removes only the declared outputs.
    The next write of the same path therefore clears them: ``.{stem}.XXXXXXXX.tmp{suffix}`` (mkstemp's
    8 random characters, so no other path's temporary file matches) and, for a folder written whole
    (``io.write_figures``), ``.{name}.<32 hex>.tmp`` / ``.old``. One job writes one output, so no
    live writer's file is touched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    own = re.compile(rf"\.{re.escape(path.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(path.suffix)}"
                     rf"|\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.(tmp|old)")
    stale = [p for p in path.parent.iterdir() if own.fullmatch(p.name)]  # no glob: a name may hold "[" or "*"
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
