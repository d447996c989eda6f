"""What every user-facing model wrapper shares: init-argument recording,
seeded construction, array checks, and weights-only save / load."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from virtualcell import train
from virtualcell.train import BadInputError, atomic_torch_save, dense_rows, resolve_device

# Keys of a saved model file. Everything in it is a tensor or a JSON-able
# value, so it loads with torch.load(..., weights_only=True).
FILE_FORMAT = "virtualcell-model"
KEY_FORMAT = "format"
KEY_CLASS = "class"
KEY_INIT = "init_kwargs"
KEY_STATE = "state_dict"
KEY_EXTRA = "extra"
KEY_HISTORY = "history"


def as_float_array(x: Any, *, name: str, n_cols: int | None = None, sparse: bool = False):
    """Return ``x`` as a finite 2-D float32 array, or raise a one-line ValueError.

    With ``sparse=True`` a scipy sparse matrix stays sparse (as CSR, whose rows slice
    cheaply): a cells x genes count matrix is only ever densified a minibatch of rows at
    a time. Otherwise sparse input is densified (small inputs: latents, proteins).
    """
    if sp.issparse(x):
        if sparse:
            x = sp.csr_matrix(x, dtype=np.float32)
            values = x.data
        else:
            x = x.toarray()
    if not sp.issparse(x):
        x = np.asarray(x, dtype=np.float32)
        values = x
    if x.ndim != 2:
        raise BadInputError(f"{name} must be a 2-D array (cells x features); got shape {x.shape}")
    if n_cols is not None and x.shape[1] != n_cols:
        raise BadInputError(f"{name} has {x.shape[1]} columns but the model was built for {n_cols}")
    if x.shape[0] == 0:
        raise BadInputError(f"{name} has no rows")
    if not np.isfinite(values).all():
        raise BadInputError(f"{name} contains NaN or infinite values; remove or impute them first")
    return x


def apply_in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, *, device: torch.device, batch_size: int
) -> np.ndarray:
    """Apply a tensor function to the rows of ``x`` chunk by chunk, without gradients."""
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1; got {batch_size}")
    with torch.no_grad():
        out = [
            fn(dense_rows(x, slice(i, i + batch_size)).to(device)).float().cpu().numpy()
            for i in range(0, x.shape[0], batch_size)
        ]
    return np.concatenate(out)


class BaseModel:
    """Base of the user-facing wrappers.

    Subclasses set ``_module_cls`` and pass their init arguments to
    ``super().__init__``; those arguments are recorded in ``init_kwargs`` and
    are all that :meth:`load` needs to rebuild the module.
    """

    _module_cls: ClassVar[type[nn.Module]]

    def __init__(self, **init_kwargs: Any) -> None:
        try:
            json.dumps(init_kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__} arguments must be JSON-serialisable: {err}") from None
        self.init_kwargs = init_kwargs
        # Built now so that bad arguments fail here, not at fit time.
        self.module = self._build_module(seed=0)
        self.history: list[dict[str, float]] = []
        self.is_fitted = False

    def _build_module(self, *, seed: int) -> nn.Module:
        # Weights are initialised from the fit seed without disturbing the
        # caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._module_cls(**self.init_kwargs)

    def _prepare_fit(self, seed: int) -> None:
        # A fresh model takes its initial weights from the fit seed, so that
        # "same seed -> same numbers" holds; a fitted one continues training.
        if not self.is_fitted:
            self.module = self._build_module(seed=seed)

    def _train(self, batches: Callable, **fit_kwargs: Any) -> list[dict[str, float]]:
        """Run the shared training loop (:func:`virtualcell.train.fit`); the model is then fitted."""
        self.history = train.fit(self.module, batches, **fit_kwargs)
        self.is_fitted = True
        return self.history

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__}.{what} needs a fitted model; call fit() or load() first")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # Subclasses with state outside the module (e.g. data scaling) override these.
    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra_state(self, extra: dict[str, torch.Tensor]) -> None:
        pass

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to ``path`` (atomically).

        The file holds plain tensors, the init arguments and the training
        history, so :meth:`load` works with ``torch.load(weights_only=True)``.
        """
        self._require_fitted("save")
        atomic_torch_save(
            {
                KEY_FORMAT: FILE_FORMAT,
                KEY_CLASS: type(self).__name__,
                KEY_INIT: self.init_kwargs,
                KEY_STATE: {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                KEY_EXTRA: {k: v.detach().cpu() for k, v in self._extra_state().items()},
                KEY_HISTORY: self.history,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu"):
        """Load a model written by :meth:`save` onto ``device``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get(KEY_FORMAT) != FILE_FORMAT:
            raise BadInputError(f"{path} is not a virtualcell model file; write it with {cls.__name__}.save()")
        if state[KEY_CLASS] != cls.__name__:
            raise BadInputError(f"{path} holds a {state[KEY_CLASS]}, not a {cls.__name__}; load it with that class")
        model = cls(**state[KEY_INIT])
        model.module.load_state_dict(state[KEY_STATE])
        model._load_extra_state(state[KEY_EXTRA])
        model.history = list(state[KEY_HISTORY])
        model.module.to(resolve_device(device))
        model.module.eval()
        model.is_fitted = True
        return model

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
        return f"{type(self).__name__}({args}){'' if self.is_fitted else ' [not fitted]'}"
