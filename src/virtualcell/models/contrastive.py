"""CLIP-style contrastive alignment of two paired modalities into one shared space.

"Encoding as prediction": after training, a cell measured in one modality
retrieves its partner in the other by cosine similarity in the shared space.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from virtualcell import train
from virtualcell.train import BadInputError
from virtualcell.models._base import BaseModel, apply_in_batches, as_float_array

__all__ = ["symmetric_info_nce", "top1_retrieval", "ContrastiveAligner", "Aligner"]

# CLIP's cap on the logit scale (temperature >= 0.01): beyond it training
# becomes unstable and the loss saturates.
MAX_LOGIT_SCALE = math.log(100.0)
# The CNN of an image modality's head: output channels of its stride-2
# convolutions (3 stages take a 32 x 32 patch to 4 x 4), and GroupNorm groups.
IMAGE_CHANNELS = (32, 64, 128)
IMAGE_GROUPS = 8


def symmetric_info_nce(za: torch.Tensor, zb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of paired rows of ``za`` and ``zb``.

    Rows are L2-normalised, ``logits = exp(logit_scale) * za @ zb.T``, and the
    loss is the mean of the cross-entropies of rows (a -> b) and columns
    (b -> a), with row ``i`` of ``za`` paired to row ``i`` of ``zb``.

    Parameters
    ----------
    za, zb
        Embeddings, (n, d) each.
    logit_scale
        log of the inverse temperature.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    za = F.normalize(za.float(), dim=-1)
    zb = F.normalize(zb.float(), dim=-1)
    logits = torch.exp(torch.as_tensor(logit_scale, dtype=za.dtype, device=za.device)) * za @ zb.T
    targets = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def top1_retrieval(za: torch.Tensor, zb: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Fraction of rows of ``za`` whose most cosine-similar row of ``zb`` is their own partner.

    Computed in chunks of ``za`` so memory stays O(batch_size * n).
    """
    za = F.normalize(za.float(), dim=-1)
    zb = F.normalize(zb.float(), dim=-1)
    hits = 0
    for i in range(0, len(za), batch_size):
        best = (za[i : i + batch_size] @ zb.T).argmax(dim=-1)
        hits += int((best == torch.arange(i, i + len(best), device=za.device)).sum())
    return hits / len(za)


def _projection(n_inputs: int, *, n_hidden: int, n_shared: int, dropout: float) -> list[nn.Module]:
    """The layers that map a feature vector into the shared space (the whole head of a vector modality)."""
    return [
        nn.Linear(n_inputs, n_hidden),
        nn.LayerNorm(n_hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(n_hidden, n_shared),
    ]


def _image_head(shape: list[int], *, n_hidden: int, n_shared: int, dropout: float) -> nn.Sequential:
    """Head of an image modality: rows of C*H*W pixels -> a small CNN -> the shared space.

    Each stride-2 convolution halves the resolution and the global average pool
    makes the features independent of where in the patch a structure lies.
    GroupNorm rather than BatchNorm: its output for a patch does not depend on
    the other patches of the minibatch, which under InfoNCE would let the model
    match pairs through batch statistics, and it has no running statistics, so
    a patch embeds the same in training and evaluation mode (less dropout).
    """
    layers: list[nn.Module] = [nn.Unflatten(1, tuple(shape))]
    n_in = shape[0]
    for n_out in IMAGE_CHANNELS:
        layers += [
            nn.Conv2d(n_in, n_out, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(IMAGE_GROUPS, n_out),
            nn.GELU(),
        ]
        n_in = n_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, *_projection(n_in, n_hidden=n_hidden, n_shared=n_shared, dropout=dropout))


def _check_image_shapes(image_shapes: dict[str, list[int]], dims: dict[str, int]) -> None:
    for name, shape in image_shapes.items():
        if name not in dims:
            raise BadInputError(f"image_shapes names '{name}', which is not a modality of dims {list(dims)}")
        if len(shape) != 3 or min(shape) < 1:
            raise BadInputError(f"image_shapes['{name}'] must be [channels, height, width]; got {list(shape)}")
        if math.prod(shape) != dims[name]:
            raise BadInputError(
                f"image_shapes['{name}'] = {list(shape)} holds {math.prod(shape)} values but dims['{name}'] is "
                f"{dims[name]}; rows of an image modality are C*H*W flattened pixels (C-major)"
            )


def _random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each image (n, C, H, W) flipped and, if square, rotated by a multiple of 90 degrees at random.

    Tissue has no canonical orientation, so these are free extra views of a patch.
    The draws use torch's global RNG, which the training loop seeds per epoch.
    """
    n_rotations = 4 if images.shape[-1] == images.shape[-2] else 2
    flip = torch.rand(len(images), device=images.device) < 0.5
    turns = torch.randint(n_rotations, (len(images),), device=images.device)
    if n_rotations == 2:
        turns = 2 * turns  # a non-square image only has its 180 degree rotation
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    out = images.clone()
    for k in range(1, 4):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return out


class ContrastiveAligner(nn.Module):
    """Projection heads of two modalities into a shared space, trained with symmetric InfoNCE.

    Parameters
    ----------
    dims
        Input dimension of each modality, e.g. ``{"rna": 10, "prot": 14}``;
        exactly two, and their order is the order of :meth:`loss`'s arguments.
    n_shared
        Dimension of the shared space.
    n_hidden, dropout
        Width and dropout of each head's hidden layer.
    init_temperature
        Initial softmax temperature T; the model learns log(1/T).
    learn_temperature
        If False the temperature stays at ``init_temperature``.
    image_shapes
        Modalities whose rows are image patches flattened C-major, as
        ``{name: [C, H, W]}`` with ``C * H * W == dims[name]``: their head is
        a small CNN (see :func:`_image_head`) instead of an MLP.
    augment_images
        In training, flip and rotate each image patch by a random multiple of
        90 degrees (flip and 180 degrees only for a non-square patch), since
        tissue has no canonical orientation; embeddings are not augmented.
    depth
        Each modality that is not an image reads one more input column after
        its ``dims`` features: the cell's log total counts in it (its depth).
        In CITE-seq a cell's RNA and antibody depths go together (cell size,
        capture), a cue for telling its partner from cells in the same state;
        a depth-neutral embedding (:meth:`Aligner.embed` without that column)
        is what a cell's state is built from.
    """

    def __init__(
        self,
        dims: dict[str, int],
        *,
        n_shared: int = 16,
        n_hidden: int = 128,
        dropout: float = 0.1,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        image_shapes: dict[str, list[int]] | None = None,
        augment_images: bool = True,
        depth: bool = False,
    ) -> None:
        super().__init__()
        if len(dims) != 2:
            raise BadInputError(f"ContrastiveAligner aligns exactly two modalities; got {list(dims)}")
        if not init_temperature > 0:
            raise BadInputError(f"init_temperature must be > 0; got {init_temperature}")
        self.image_shapes = {name: [int(v) for v in shape] for name, shape in (image_shapes or {}).items()}
        _check_image_shapes(self.image_shapes, dims)
        self.augment_images = augment_images
        self.names = list(dims)
        self.depth = bool(depth)
        dims = {name: int(d) + int(self.depth and name not in self.image_shapes) for name, d in dims.items()}
        sizes = {"n_hidden": n_hidden, "n_shared": n_shared, "dropout": dropout}
        self.heads = nn.ModuleDict(
            {
                name: _image_head(self.image_shapes[name], **sizes)
                if name in self.image_shapes
                else nn.Sequential(*_projection(int(d), **sizes))
                for name, d in dims.items()
            }
        )
        # Inputs are standardised with the training data's statistics (set by Aligner.fit), stored as
        # buffers so a saved model carries them: a latent with per-dimension spread 0.05 (a VAE on a
        # few hundred spots) or a stained tissue patch (spread 0.07 around grey) otherwise enters the
        # LayerNorm of the head as a near-constant, and InfoNCE stays at log(batch size).
        for name, d in dims.items():
            self.register_buffer(f"shift_{name}", torch.zeros(int(d)))
            self.register_buffer(f"scale_{name}", torch.ones(int(d)))
        scale = torch.tensor(math.log(1.0 / init_temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    def clamped_logit_scale(self) -> torch.Tensor:
        # Clamped in the forward pass (not by editing the parameter after each
        # step) so the module stays a pure function of its state.
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def set_input_stats(self, name: str, x: torch.Tensor) -> None:
        """Standardise modality ``name`` by the mean and standard deviation of ``x`` (training rows):
        per feature, or per channel for an image modality (so a rotated patch standardises alike)."""
        x = x.float()
        if name in self.image_shapes:
            channels, height, width = self.image_shapes[name]
            per_channel = x.reshape(len(x), channels, height * width).transpose(0, 1).reshape(channels, -1)
            mean = per_channel.mean(dim=1).repeat_interleave(height * width)
            std = per_channel.std(dim=1).repeat_interleave(height * width)
        else:
            mean, std = x.mean(dim=0), x.std(dim=0)
        getattr(self, f"shift_{name}").copy_(mean)
        # A constant feature is centred, not blown up.
        getattr(self, f"scale_{name}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised shared embedding of modality ``name``."""
        if name not in self.heads:
            raise KeyError(f"unknown modality {name!r}; this aligner knows {self.names}")
        x = (x - getattr(self, f"shift_{name}")) / getattr(self, f"scale_{name}")
        return F.normalize(self.heads[name](x).float(), dim=-1)

    def _augment(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.augment_images and name in self.image_shapes):
            return x
        return _random_dihedral(x.reshape(len(x), *self.image_shapes[name])).reshape(len(x), -1)

    def loss(self, xa: torch.Tensor, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE of paired rows of the two modalities (in ``dims`` order).

        In training mode, image patches are first flipped and rotated at
        random (see ``augment_images``).

        Returns
        -------
        dict
            ``"loss"`` and the current ``"temperature"``.
        """
        scale = self.clamped_logit_scale()
        xa, xb = (self._augment(name, x) for name, x in zip(self.names, (xa, xb)))
        loss = symmetric_info_nce(self.embed(self.names[0], xa), self.embed(self.names[1], xb), scale)
        return {train.LOSS_KEY: loss, "temperature": torch.exp(-scale).detach()}


class Aligner(BaseModel):
    """User-facing contrastive aligner of two paired modalities.

    Parameters
    ----------
    dims
        Input dimension per modality, in the order ``fit`` takes them.
    image_shapes
        ``{name: [C, H, W]}`` for modalities whose rows are image patches
        flattened C-major (as :func:`virtualcell.pairing.image_patches`
        returns them); their head is a CNN. Their data stay 2-D arrays,
        cells x ``C * H * W``, in :meth:`fit` and :meth:`embed`.
    **module_kwargs
        Passed to :class:`ContrastiveAligner`.

    Examples
    --------
    >>> al = Aligner({"rna": 10, "prot": 14}, n_shared=16)
    >>> al.fit(z_rna, z_prot, epochs=100, seed=0)
    >>> shared = al.embed("rna", z_rna)

    Spot expression and the tissue patch under each spot:

    >>> al = Aligner({"expr": 30, "image": 3 * 32 * 32}, image_shapes={"image": [3, 32, 32]})
    >>> al.fit(z_spots, image_patches(spots, size=32), epochs=100, seed=0)

    With ``depth=True`` each cell's log total counts follow its features (one more column in
    ``fit``); matching reads them, and ``embed`` without that column gives the depth-neutral
    embedding (at the training cells' mean depth):

    >>> al = Aligner({"rna": 10, "prot": 14}, depth=True)
    >>> al.fit(np.hstack([z_rna, log_depth_rna]), np.hstack([clr_prot, log_depth_prot]), seed=0)
    >>> match = al.embed("rna", np.hstack([z_rna, log_depth_rna]))
    >>> state = al.embed("rna", z_rna)
    """

    _module_cls = ContrastiveAligner

    def __init__(
        self, dims: dict[str, int], *, image_shapes: dict[str, list[int]] | None = None, **module_kwargs
    ) -> None:
        if image_shapes is not None:
            # Recorded as JSON lists so that a loaded model's init_kwargs equal the original's.
            module_kwargs["image_shapes"] = {str(k): [int(v) for v in shape] for k, shape in image_shapes.items()}
        super().__init__(dims={str(k): int(v) for k, v in dims.items()}, **module_kwargs)

    @property
    def names(self) -> list[str]:
        return list(self.init_kwargs["dims"])

    @property
    def depth(self) -> bool:
        """Whether the inputs of the modalities that are not images end in the cells' log depth."""
        return bool(self.init_kwargs.get("depth", False))

    def n_inputs(self, name: str) -> int:
        """Columns a modality's rows hold in :meth:`fit`: its features, and its depth with ``depth=True``."""
        shapes = self.init_kwargs.get("image_shapes") or {}
        return self.init_kwargs["dims"][name] + int(self.depth and name not in shapes)

    def _pair(self, xa, xb, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
        a, b = self.names
        xa = as_float_array(xa, name=f"xa{suffix} ({a})", n_cols=self.n_inputs(a))
        xb = as_float_array(xb, name=f"xb{suffix} ({b})", n_cols=self.n_inputs(b))
        if len(xa) != len(xb):
            raise BadInputError(
                f"xa{suffix} and xb{suffix} must be paired row by row; got {len(xa)} and {len(xb)} rows"
            )
        return xa, xb

    def fit(
        self,
        xa: np.ndarray,
        xb: np.ndarray,
        *,
        xa_val: np.ndarray | None = None,
        xb_val: np.ndarray | None = None,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        device: str = "auto",
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """Train on paired rows of the two modalities.

        Parameters
        ----------
        xa, xb
            Features of the first and second modality (order of ``dims``), each followed by the cell's
            log depth in that modality with ``depth=True`` (not for an image); row i of ``xa`` and row i
            of ``xb`` are the same cell.
        xa_val, xb_val
            Held-out pairs; ``val_top1`` is the top-1 retrieval accuracy a -> b
            among them (chance = 1 / number of pairs), ``val_loss`` their
            InfoNCE over chunks of ``batch_size``.
        epochs, batch_size, lr, weight_decay, device, seed, on_epoch, checkpoint_path, checkpoint_every
            See :func:`virtualcell.train.fit`. Larger batches give InfoNCE more
            negatives per step.

        Returns
        -------
        list of dict
            Per-epoch metrics (``loss``, ``temperature``, ``val_loss``, ``val_top1``).
        """
        xa, xb = self._pair(xa, xb)
        if (xa_val is None) != (xb_val is None):
            raise BadInputError("give both xa_val and xb_val, or neither")
        self._prepare_fit(seed)
        if not self.is_fitted:
            for name, x in zip(self.names, (xa, xb), strict=True):
                self.module.set_input_stats(name, torch.as_tensor(x))
        dev = train.resolve_device(device)
        ta, tb = torch.as_tensor(xa, device=dev), torch.as_tensor(xb, device=dev)

        def batches(epoch: int, generator: torch.Generator):
            return train.minibatches(ta, tb, batch_size=batch_size, generator=generator)

        val_fn = None
        if xa_val is not None:
            va, vb = (torch.as_tensor(v, device=dev) for v in self._pair(xa_val, xb_val, "_val"))
            a, b = self.names

            def val_fn(module: ContrastiveAligner) -> dict[str, float]:
                # The loss is taken over chunks of batch_size, the number of
                # negatives it sees in training, so train and val losses compare.
                total = sum(
                    float(module.loss(va[i : i + batch_size], vb[i : i + batch_size])[train.LOSS_KEY])
                    * len(va[i : i + batch_size])
                    for i in range(0, len(va), batch_size)
                )
                return {
                    train.LOSS_KEY: total / len(va),
                    "top1": top1_retrieval(module.embed(a, va), module.embed(b, vb)),
                }

        return self._train(
            batches,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            device=dev,
            seed=seed,
            on_epoch=on_epoch,
            val_fn=val_fn,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
        )

    def embed(self, name: str, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """L2-normalised shared embedding of modality ``name``, cells x ``n_shared``.

        An aligner fitted with ``depth=True`` also takes the rows without their depth column: they are
        embedded at the training cells' mean depth (depth-neutral, what a cell's state is built from).
        """
        self._require_fitted("embed")
        if name not in self.init_kwargs["dims"]:
            raise KeyError(f"unknown modality {name!r}; this aligner knows {self.names}")
        n = self.n_inputs(name)
        if n != self.init_kwargs["dims"][name] and getattr(x, "ndim", 0) == 2 and x.shape[1] == n - 1:
            mean_depth = float(getattr(self.module, f"shift_{name}")[-1])
            x = np.hstack([as_float_array(x, name=f"x ({name})"), np.full((len(x), 1), mean_depth, np.float32)])
        x = as_float_array(x, name=f"x ({name})", n_cols=n)
        self.module.eval()
        return apply_in_batches(
            lambda t: self.module.embed(name, t), x, device=self.device, batch_size=batch_size
        )

    @property
    def temperature(self) -> float:
        """Current softmax temperature."""
        return float(torch.exp(-self.module.clamped_logit_scale().detach()))
