"""The one training loop shared by every model in :mod:`virtualcell.models`.

Layering follows scvi-tools: a model is a pure :class:`torch.nn.Module` with a
``loss(*batch)`` method over tensors; :func:`fit` owns the optimiser, device,
mixed precision, seeding, checkpoints and logging hooks; the user-facing
wrappers in :mod:`virtualcell.models` only turn arrays into batches.

Nothing here imports MLflow: experiment tracking plugs in through ``on_epoch``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from virtualcell.errors import InputError
from virtualcell.files import atomic_write
from virtualcell.io import DiskRows

__all__ = ["BadInputError", "resolve_device", "minibatches", "dense_rows", "atomic_torch_save", "epoch_seed", "fit"]

# Keys of a training checkpoint file.
CKPT_MODULE = "module"
CKPT_OPTIMISER = "optimiser"
CKPT_EPOCH = "epoch"
CKPT_HISTORY = "history"

LOSS_KEY = "loss"
VAL_PREFIX = "val_"


class BadInputError(InputError, ValueError):
    """Bad data or settings given to a model or the training loop.

    A ``ValueError`` for Python callers and an ``InputError`` for the CLI,
    which prints it as the one line a user sees.
    """


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device name from the config into a :class:`torch.device`.

    Parameters
    ----------
    name
        ``"auto"`` picks CUDA if available, else Apple MPS if available, else
        CPU. Otherwise an explicit ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``
        or ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the name is not a known device or the device is not available here.
    """
    if not isinstance(name, str):
        raise BadInputError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'mps'; got {name!r}")
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        device = None
    if device is None or device.type not in {"cpu", "cuda", "mps"}:
        raise BadInputError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {name!r} requested but CUDA is not available on this machine; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "use a lower index or 'cuda'"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"device {name!r} requested but MPS is not available on this machine; use 'auto' or 'cpu'")
    return device


def minibatches(
    *tensors: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    nonzero: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned minibatches (same rows) from tensors of equal length.

    Parameters
    ----------
    *tensors
        Tensors sharing their first dimension; a scipy sparse matrix (CSR) may stand in
        for one, and its rows are densified batch by batch (as float32 CPU tensors).
    batch_size
        Rows per batch; the last batch may be smaller.
    generator
        CPU generator for the shuffling order (the loop reseeds it per epoch).
    shuffle
        Visit rows in a random order; otherwise in their stored order.
    nonzero
        After the slices, also yield the stored entries of the (one) sparse matrix's batch: its
        row in the batch, column and value (:func:`sparse_rows`), for losses that use only those.

    Yields
    ------
    tuple of torch.Tensor
        One slice of every tensor, on the tensors' device.
    """
    if not tensors:
        raise BadInputError("minibatches needs at least one tensor")
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1; got {batch_size}")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise BadInputError(f"minibatches needs tensors of equal length; got {[t.shape[0] for t in tensors]}")
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if any(on_disk(t) for t in tensors):
        yield from _streamed(tensors, batch_size=batch_size, generator=generator, shuffle=shuffle, nonzero=nonzero,
                             device=device)
        return
    # The permutation is drawn on CPU so the order does not depend on the device (nor on whether
    # the data are sparse: the same seed visits the same rows in the same order).
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    on_device = order.to(device)
    for start in range(0, n, batch_size):
        idx = on_device[start : start + batch_size]
        rows = order[start : start + batch_size].numpy()
        if nonzero:
            parts: list[torch.Tensor] = []
            entries: tuple[torch.Tensor, ...] = ()
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    parts.append(t[idx])
                else:
                    dense, *entries = sparse_rows(t, rows)
                    parts.append(dense)
            yield (*parts, *entries)
        else:
            yield tuple(t[idx] if isinstance(t, torch.Tensor) else dense_rows(t, rows) for t in tensors)


def dense_rows(x: Any, rows: Any = slice(None)) -> torch.Tensor:
    """Rows of a dense or scipy sparse matrix as a dense float32 CPU tensor (only those rows densified)."""
    part = x[rows]
    if hasattr(part, "toarray"):
        part = part.toarray()
    return torch.as_tensor(np.asarray(part, dtype=np.float32))


# An on-disk matrix is read STREAM_CHUNK_ROWS contiguous rows at a time, and STREAM_BUFFER_BATCHES
# batches' worth of chunks, drawn from random places, are shuffled together before they are cut into
# batches: a file sorted by time or sample still gives mixed batches, and only the buffer is in memory.
STREAM_CHUNK_ROWS = 64
STREAM_BUFFER_BATCHES = 16


def on_disk(x: Any) -> bool:
    """Whether ``x`` is a sparse matrix still on disk: AnnData's backed CSR (``.h5ad``/zarr opened with
    ``backed="r"``, or ``anndata.io.sparse_dataset`` of a group), read a chunk of rows at a time."""
    try:
        from anndata.abc import CSRDataset
    except ImportError:  # pragma: no cover - anndata is a dependency
        return False
    return isinstance(x, CSRDataset)


def _streamed(tensors: tuple[Any, ...], *, batch_size: int, generator: torch.Generator, shuffle: bool,
              nonzero: bool, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """:func:`minibatches` of an on-disk matrix (and in-memory tensors aligned with it), in buffers.

    Chunks of contiguous rows are visited in a random order; each buffer of chunks is read, shuffled
    and cut into batches, and the rows that do not fill a batch join the next buffer, so every batch
    but the last is full and every row is visited once per epoch. Memory: one buffer, not the matrix.
    Batches differ from an in-memory matrix's for the same seed (rows are shuffled within buffers).
    """
    n = tensors[0].shape[0]
    readers = {k: DiskRows(t.group) for k, t in enumerate(tensors) if on_disk(t)}
    n_chunks = math.ceil(n / STREAM_CHUNK_ROWS)
    chunk_order = (torch.randperm(n_chunks, generator=generator) if shuffle else torch.arange(n_chunks)).numpy()
    per_buffer = max(1, math.ceil(STREAM_BUFFER_BATCHES * batch_size / STREAM_CHUNK_ROWS))
    pending_rows = np.empty(0, dtype=np.int64)
    pending: dict[int, Any] = {}
    for start in range(0, n_chunks, per_buffer):
        # Read in file order (sorted chunks, adjacent ones merged), then shuffle in memory.
        chunks = np.sort(chunk_order[start : start + per_buffer])
        spans = np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1)
        ranges = [(int(run[0]) * STREAM_CHUNK_ROWS, min(n, (int(run[-1]) + 1) * STREAM_CHUNK_ROWS)) for run in spans]
        rows = np.concatenate([pending_rows, *[np.arange(a, b) for a, b in ranges]])
        blocks = {}
        for k, reader in readers.items():
            parts = [pending[k]] if k in pending else []
            blocks[k] = sp.vstack(parts + [reader.rows(a, b) for a, b in ranges], format="csr")
        order = torch.randperm(len(rows), generator=generator).numpy() if shuffle else np.arange(len(rows))
        rows = rows[order]
        blocks = {k: b[order] for k, b in blocks.items()}
        last = start + per_buffer >= n_chunks
        full = len(rows) if last else len(rows) // batch_size * batch_size
        for s in range(0, full, batch_size):
            picked = rows[s : s + batch_size]
            parts, entries = [], ()
            for k, t in enumerate(tensors):
                if k in blocks:
                    dense, *found = sparse_rows(blocks[k], slice(s, s + batch_size))
                    parts.append(dense)
                    entries = tuple(found)
                elif isinstance(t, torch.Tensor):
                    parts.append(t[torch.as_tensor(picked, device=device)])
                else:
                    parts.append(dense_rows(t, picked))
            yield (*parts, *entries) if nonzero else tuple(parts)
        pending_rows = rows[full:]
        pending = {k: b[full:] for k, b in blocks.items()}


def sparse_rows(x: Any, rows: Any) -> tuple[torch.Tensor, ...]:
    """Rows of a scipy sparse matrix: dense (float32), and their stored entries as ``(row in the
    batch, column, value)`` tensors, read off the CSR structure (no scan of the dense rows)."""
    part = sp.csr_matrix(x[rows])
    dense = torch.as_tensor(part.toarray().astype(np.float32, copy=False))
    row = np.repeat(np.arange(part.shape[0], dtype=np.int64), np.diff(part.indptr))
    return (dense, torch.as_tensor(row), torch.as_tensor(part.indices.astype(np.int64)),
            torch.as_tensor(part.data.astype(np.float32)))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (temp file beside ``path``, then rename)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for one epoch, derived from the run seed and the epoch index.

    Reseeding every epoch (rather than once per run) makes a run resumed from a
    checkpoint draw exactly the same batches and dropout masks as an
    uninterrupted one, with no RNG state to store.
    """
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] >> 1)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 has fp32's exponent range, so no loss scaling is needed on CUDA;
    # CPU stays in fp32 so that CPU results are exactly reproducible.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    return tuple(t if t is None else t.to(device, non_blocking=True) for t in batch)


def _format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def fit(
    module: nn.Module,
    batches_fn: Callable[[int, torch.Generator], Iterable[tuple[torch.Tensor, ...]]],
    *,
    epochs: int,
    lr: float,
    device: str | torch.device,
    seed: int,
    weight_decay: float = 0.0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    val_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    grad_clip: float | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``module`` by minimising ``module.loss(*batch)`` with AdamW.

    Parameters
    ----------
    module
        An ``nn.Module`` whose ``loss(*batch)`` returns a dict holding a scalar
        ``"loss"`` tensor and optionally other scalar tensors to report.
    batches_fn
        ``batches_fn(epoch, generator)`` yields the epoch's batches (tuples of
        tensors); tensors not yet on ``device`` are moved. ``generator`` is a
        CPU :class:`torch.Generator` reseeded from (``seed``, ``epoch``), to be
        used for every random draw of the batching.
    epochs
        Total number of epochs, counting any already done in a checkpoint.
    lr, weight_decay
        AdamW settings (``weight_decay=0`` is plain Adam).
    device
        A device or a name for :func:`resolve_device`.
    seed
        Seeds batching and torch's global RNG (dropout, sampling) per epoch.
    on_epoch
        Hook called as ``on_epoch(epoch, metrics)`` after every epoch; this is
        where experiment tracking logs per-epoch metrics.
    val_fn
        ``val_fn(module)`` returns validation metrics, computed in eval mode
        without gradients and reported with a ``val_`` prefix.
    checkpoint_path, checkpoint_every
        When both are set, the module and optimiser states, the number of
        epochs done and the history are written atomically every
        ``checkpoint_every`` epochs and after the last one; if the file already
        exists at the start, training resumes from it.
    grad_clip
        Clip the global gradient norm to this value.
    progress
        Print about ten progress lines to stderr.

    Returns
    -------
    list of dict
        One dict per epoch (including resumed ones): ``"epoch"`` (0-based),
        the epoch means of the loss terms (weighted by batch size), and the
        ``val_`` metrics.

    Raises
    ------
    FloatingPointError
        If the epoch loss is not finite.
    """
    if epochs < 0:
        raise BadInputError(f"epochs must be >= 0; got {epochs}")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    module.to(device)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    checkpointing = checkpoint_path is not None and checkpoint_every > 0
    history: list[dict[str, float]] = []
    start = 0
    if checkpointing and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        module.load_state_dict(state[CKPT_MODULE])
        optimiser.load_state_dict(state[CKPT_OPTIMISER])
        start = int(state[CKPT_EPOCH])
        history = list(state[CKPT_HISTORY])
        if progress:
            print(f"resuming from {checkpoint_path} at epoch {start}/{epochs}", file=sys.stderr)

    report_every = max(1, math.ceil(epochs / 10))
    started = time.monotonic()
    generator = torch.Generator()
    for epoch in range(start, epochs):
        s = epoch_seed(seed, epoch)
        generator.manual_seed(s)
        torch.manual_seed(s)
        module.train()
        # Sums stay on the device so the loop does not synchronise every step.
        sums: dict[str, torch.Tensor] = {}
        n_seen = 0
        for batch in batches_fn(epoch, generator):
            batch = _to_device(batch, device)
            with _autocast(device):
                terms = module.loss(*batch)
            if LOSS_KEY not in terms:
                raise KeyError(f"{type(module).__name__}.loss must return a dict with a '{LOSS_KEY}' entry")
            optimiser.zero_grad(set_to_none=True)
            terms[LOSS_KEY].backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            optimiser.step()
            n = len(batch[0])
            n_seen += n
            for key, value in terms.items():
                value = value.detach().float() * n
                sums[key] = sums[key] + value if key in sums else value
        if n_seen == 0:
            raise ValueError(f"batches_fn yielded no batches in epoch {epoch}")
        metrics = {key: float(total) / n_seen for key, total in sums.items()}
        if not math.isfinite(metrics[LOSS_KEY]):
            raise FloatingPointError(
                f"training loss became {metrics[LOSS_KEY]} at epoch {epoch}; lower lr or set grad_clip"
            )
        if val_fn is not None:
            module.eval()
            with torch.no_grad(), _autocast(device):
                val = val_fn(module)
            metrics.update({VAL_PREFIX + key: float(value) for key, value in val.items()})
        history.append({"epoch": epoch, **metrics})
        done = epoch + 1
        if checkpointing and (done % checkpoint_every == 0 or done == epochs):
            atomic_torch_save(
                {
                    CKPT_MODULE: module.state_dict(),
                    CKPT_OPTIMISER: optimiser.state_dict(),
                    CKPT_EPOCH: done,
                    CKPT_HISTORY: history,
                },
                checkpoint_path,
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if progress and (done % report_every == 0 or done == epochs):
            elapsed = time.monotonic() - started
            eta = elapsed / (done - start) * (epochs - done)
            print(f"epoch {done}/{epochs}  {_format_metrics(metrics)}  ({elapsed:.0f} s, ETA {eta:.0f} s)",
                  file=sys.stderr, flush=True)
    module.eval()
    return history
