"""Tests of the shared training loop (virtualcell.train)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import torch
from torch import nn

from virtualcell import io, train


class NoisyRegression(nn.Module):
    """Linear regression with dropout, so that both the batch order and the
    global RNG matter for the result."""

    def __init__(self, n_in: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, 1)
        self.drop = nn.Dropout(0.1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        err = self.lin(self.drop(x)).squeeze(-1) - y
        return {"loss": err.pow(2).mean(), "mae": err.abs().mean()}


def _data(n: int = 200):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.05 * torch.randn(n, generator=g)
    return x, y


def _batches(x, y, batch_size=32):
    return lambda epoch, generator: train.minibatches(x, y, batch_size=batch_size, generator=generator)


def _run(tmp_path=None, *, epochs=10, seed=0, checkpoint_every=0, on_epoch=None, name="ckpt.pt", val=False):
    torch.manual_seed(0)
    module = NoisyRegression()
    x, y = _data()
    history = train.fit(
        module,
        _batches(x, y),
        epochs=epochs,
        lr=0.05,
        device="cpu",
        seed=seed,
        on_epoch=on_epoch,
        val_fn=(lambda m: {"mse": float((m.lin(x).squeeze(-1) - y).pow(2).mean())}) if val else None,
        checkpoint_path=None if tmp_path is None else tmp_path / name,
        checkpoint_every=checkpoint_every,
        progress=False,
    )
    return module, history


# ---------------------------------------------------------------- devices


def test_resolve_device_cpu_and_auto():
    assert train.resolve_device("cpu") == torch.device("cpu")
    auto = train.resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif torch.backends.mps.is_available():
        assert auto.type == "mps"
    else:
        assert auto == torch.device("cpu")
    assert train.resolve_device() == auto


@pytest.mark.parametrize("name", ["tpu", "gpu", "", "cuda:x"])
def test_resolve_device_rejects_unknown_names(name):
    with pytest.raises(train.BadInputError, match="unknown device"):
        train.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_rejects_unavailable_cuda(name):
    with pytest.raises(ValueError, match="not available"):
        train.resolve_device(name)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_resolve_device_rejects_unavailable_mps():
    with pytest.raises(ValueError, match="MPS is not available"):
        train.resolve_device("mps")


# ---------------------------------------------------------------- minibatches


def test_minibatches_cover_every_row_once_and_stay_aligned():
    x = torch.arange(10.0)
    y = 10 * torch.arange(10.0)
    batches = list(train.minibatches(x, y, batch_size=4, generator=torch.Generator().manual_seed(0)))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(seen, x)  # shuffled
    for bx, by in batches:
        assert torch.equal(by, 10 * bx)


def test_minibatches_in_order_without_shuffle():
    x = torch.arange(5.0)
    (batch,) = train.minibatches(x, batch_size=5, generator=torch.Generator(), shuffle=False)
    assert torch.equal(batch[0], x)


def test_sparse_minibatches_carry_their_stored_entries():
    """With nonzero=True a sparse matrix's batch comes with (row in the batch, column, value) of its
    stored entries, which rebuild exactly the dense rows beside them, in the same order as without."""
    x = scipy.sparse.random(23, 7, density=0.3, format="csr", random_state=0, dtype=np.float32)
    y = torch.arange(23.0)
    plain = list(train.minibatches(x, y, batch_size=5, generator=torch.Generator().manual_seed(1)))
    rich = list(train.minibatches(x, y, batch_size=5, generator=torch.Generator().manual_seed(1), nonzero=True))
    assert len(plain) == len(rich) == 5
    for (dense, labels), (dense2, labels2, rows, cols, values) in zip(plain, rich):
        assert torch.equal(dense, dense2) and torch.equal(labels, labels2)
        rebuilt = torch.zeros_like(dense)
        rebuilt[rows, cols] = values
        assert torch.equal(rebuilt, dense)
        assert len(values) == int((dense != 0).sum())


def test_minibatches_stream_an_on_disk_matrix_in_mixed_buffers(tmp_path, monkeypatch):
    """An on-disk matrix is read a buffer of chunks at a time, never whole: every row once per epoch,
    full batches but the last, batches mixing rows from chunks far apart, and in stored order
    without shuffling."""
    import anndata as ad

    monkeypatch.setattr(train, "STREAM_CHUNK_ROWS", 8)
    monkeypatch.setattr(train, "STREAM_BUFFER_BATCHES", 4)
    x = np.arange(203 * 3, dtype=np.float32).reshape(203, 3) + 1  # row i holds 3i+1 .. 3i+3: no zeros
    ad.AnnData(X=scipy.sparse.csr_matrix(x)).write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r").X
    reads = []
    read = io.DiskRows.rows
    monkeypatch.setattr(io.DiskRows, "rows", lambda self, a, b: reads.append(b - a) or read(self, a, b))
    labels = torch.arange(203.0)
    batches = list(train.minibatches(backed, labels, batch_size=10, generator=torch.Generator().manual_seed(0),
                                     nonzero=True))
    assert [len(b[0]) for b in batches] == [10] * 20 + [3]
    rows = torch.cat([b[0][:, 0] for b in batches]).long() // 3
    assert sorted(rows.tolist()) == list(range(203))
    for dense, label, *entries in batches:
        assert torch.equal(label, dense[:, 0] // 3)  # the in-memory tensor stays aligned
        assert len(entries) == 3 and len(entries[2]) == dense.numel()
    assert 0 < max(reads) <= 40  # at most one buffer at a time: 4 batches of 10 rows
    assert (rows[:10].max() - rows[:10].min()) > 8  # a batch spans more than one chunk
    ordered = list(train.minibatches(backed, batch_size=10, generator=torch.Generator(), shuffle=False))
    assert torch.equal(torch.cat([b[0] for b in ordered]), torch.as_tensor(x))


def test_minibatches_reject_unequal_lengths():
    with pytest.raises(ValueError, match="equal length"):
        list(train.minibatches(torch.zeros(3), torch.zeros(4), batch_size=2, generator=torch.Generator()))


# ---------------------------------------------------------------- fit


def test_fit_learns_and_reports_per_epoch_means():
    calls = []
    module, history = _run(epochs=15, on_epoch=lambda e, m: calls.append((e, m)), val=True)
    assert [h["epoch"] for h in history] == list(range(15))
    assert set(history[0]) == {"epoch", "loss", "mae", "val_mse"}
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    assert history[-1]["val_mse"] < 0.1 * history[0]["val_mse"]
    # The hook sees the same numbers as the history, without the epoch key.
    assert [e for e, _ in calls] == list(range(15))
    assert calls[-1][1] == {k: v for k, v in history[-1].items() if k != "epoch"}
    assert not module.training  # left in eval mode for inference


def test_fit_same_seed_same_numbers_different_seed_different():
    m1, h1 = _run(seed=3)
    m2, h2 = _run(seed=3)
    m3, h3 = _run(seed=4)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert h1 != h3


def test_checkpoint_resume_continues_from_saved_epoch(tmp_path):
    reference, ref_history = _run(epochs=10)

    # An interrupted run: 6 epochs with a checkpoint every 3.
    _run(tmp_path, epochs=6, checkpoint_every=3)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved[train.CKPT_EPOCH] == 6
    assert len(saved[train.CKPT_HISTORY]) == 6

    # Rerunning with the full budget only does the missing epochs...
    seen = []
    resumed, history = _run(tmp_path, epochs=10, checkpoint_every=3, on_epoch=lambda e, m: seen.append(e))
    assert seen == [6, 7, 8, 9]
    # ...and ends exactly where the uninterrupted run ended.
    assert history == ref_history
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)[train.CKPT_EPOCH] == 10
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_no_checkpoint_without_checkpoint_every(tmp_path):
    _run(tmp_path, epochs=2, checkpoint_every=0)
    assert list(tmp_path.iterdir()) == []


def test_progress_prints_about_ten_lines(capsys):
    x, y = _data()
    train.fit(NoisyRegression(), _batches(x, y), epochs=25, lr=0.01, device="cpu", seed=0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert 9 <= len(lines) <= 11
    assert lines[-1].startswith("epoch 25/25") and "loss" in lines[-1]
    train.fit(NoisyRegression(), _batches(x, y), epochs=3, lr=0.01, device="cpu", seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_fit_stops_on_non_finite_loss():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def loss(self, x):
            return {"loss": self.w.sum() * math.inf}

    with pytest.raises(FloatingPointError, match="epoch 0"):
        train.fit(
            Exploding(), lambda e, g: [(torch.zeros(2),)], epochs=2, lr=0.1, device="cpu", seed=0, progress=False
        )


def test_fit_requires_a_loss_entry():
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def loss(self, x):
            return {"mse": self.w.sum()}

    with pytest.raises(KeyError, match="'loss'"):
        train.fit(NoLoss(), lambda e, g: [(torch.zeros(2),)], epochs=1, lr=0.1, device="cpu", seed=0, progress=False)


def _first_step_size(grad_clip):
    x, y = _data()
    torch.manual_seed(0)
    module = NoisyRegression()
    before = module.lin.weight.detach().clone()
    train.fit(module, lambda e, g: [(x, y)], epochs=1, lr=1.0, device="cpu", seed=0, grad_clip=grad_clip, progress=False)
    return float((module.lin.weight.detach() - before).abs().max())


def test_grad_clip_is_applied():
    # Adam's first step is lr * g / (|g| + eps): about lr for any ordinary
    # gradient, but far smaller once clipping shrinks |g| below eps (1e-8).
    assert _first_step_size(None) == pytest.approx(1.0, rel=1e-3)
    assert _first_step_size(1e-10) < 0.05


def test_atomic_torch_save_round_trips(tmp_path):
    path = tmp_path / "sub" / "obj.pt"
    train.atomic_torch_save({"a": torch.arange(3), "b": [1.5, "x"]}, path)
    obj = torch.load(path, weights_only=True)
    assert torch.equal(obj["a"], torch.arange(3)) and obj["b"] == [1.5, "x"]
    assert [p.name for p in path.parent.iterdir()] == ["obj.pt"]
