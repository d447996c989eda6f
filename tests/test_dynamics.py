"""Tests of the stochastic simulator (SF2M), its drift priors and its couplings.

The toy truth is a 2-D Ornstein-Uhlenbeck process dX = -THETA X dt + SIG dW,
started away from its stationary law, observed as snapshots (new cells each
time) at t = 0..4 with t = 2 held out. Its marginals are Gaussian and known in
closed form, so the held-out truth is exact, and its drift -THETA x is the
gradient of the landscape THETA |x|^2 / 2.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from virtualcell.models.couplings import entropic_plan, exact_plan, sample_ot_pairs, squared_cost
from virtualcell.models.dynamics import Simulator, brownian_bridge
from virtualcell.train import BadInputError

CPU = "cpu"
THETA, SIG = 0.5, 0.8
START_MEAN, START_VAR = np.array([3.0, -2.0]), 0.04
TIMES = np.arange(5.0)
HELD_OUT = 2.0
N_CELLS = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny networks and 256 x 256 plans gain nothing from intra-op threads,
    # and lose a lot when other jobs share the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ou_marginal(t: float) -> tuple[np.ndarray, float]:
    """Mean (2,) and per-coordinate std of the OU process at time t."""
    mean = START_MEAN * np.exp(-THETA * t)
    var = START_VAR * np.exp(-2 * THETA * t) + SIG**2 / (2 * THETA) * (1 - np.exp(-2 * THETA * t))
    return mean, float(np.sqrt(var))


def ou_snapshots(seed: int = 0, n: int = N_CELLS):
    rng = np.random.default_rng(seed)
    x = np.concatenate([ou_marginal(t)[0] + ou_marginal(t)[1] * rng.normal(size=(n, 2)) for t in TIMES])
    t = np.repeat(TIMES, n)
    keep = t != HELD_OUT
    return x[keep].astype(np.float32), t[keep]


def standardised_diffusion(x: np.ndarray, t: np.ndarray) -> float:
    """SIG in the simulator's units: state RMS 1, observed time span 1."""
    rms = np.sqrt(((x - x.mean(0)) ** 2).mean())
    return float(SIG * np.sqrt(t.max() - t.min()) / rms)


def fit(seed: int = 0, epochs: int = 50, n_cells: int = N_CELLS, **kw) -> Simulator:
    model_kw = {k: kw.pop(k) for k in ("potential", "stochastic", "autonomous") if k in kw}
    x, t = ou_snapshots(n=n_cells)
    sim = Simulator(2, n_hidden=32, n_layers=2, **model_kw)
    kw.setdefault("diffusion", standardised_diffusion(x, t))
    kw.setdefault("batch_size", 256)
    sim.fit(x, t, epochs=epochs, lr=3e-3, device=CPU, seed=seed, **kw)
    return sim


@pytest.fixture(scope="module")
def sde() -> Simulator:
    return fit(stochastic=True)


@pytest.fixture(scope="module")
def landscape() -> Simulator:
    """The prior that matches the truth: a time-free gradient drift plus noise."""
    return fit(stochastic=True, potential=True, autonomous=True)


def cells_at(time: float) -> np.ndarray:
    x, t = ou_snapshots()
    return x[t == time]


def drift_only(sim: Simulator, x: np.ndarray, t0: float, t1: float, n_steps: int = 50) -> np.ndarray:
    """Euler integration of the learned drift alone: the SDE with its noise switched off."""
    h = (t1 - t0) / n_steps
    for k in range(n_steps):
        x = x + h * sim.velocity(x, t0 + k * h)
    return x


@pytest.mark.parametrize("name", ["sde", "landscape"])
def test_sde_predicts_the_held_out_marginal_and_its_spread(name, request):
    sim = request.getfixturevalue(name)
    assert sim.stochastic and sim.observed_times.tolist() == [0.0, 1.0, 3.0, 4.0]
    mean, std = ou_marginal(HELD_OUT)
    prev = cells_at(HELD_OUT - 1)
    pred = sim.simulate(prev, t0=HELD_OUT - 1, t1=HELD_OUT, n_steps=50, seed=0)
    # Truth: mean (1.10, -0.74), std 0.75; the t=1 cells sit 0.7 further out.
    np.testing.assert_allclose(pred.mean(0), mean, atol=0.25)
    np.testing.assert_allclose(pred.std(0), std, rtol=0.25)
    # The noise matters: the contracting drift alone narrows the cloud to ~0.4.
    assert (pred.std(0) > 1.5 * drift_only(sim, prev, HELD_OUT - 1, HELD_OUT).std(0)).all()
    # The probability-flow ODE has the same marginals, without sampling.
    flow = sim.simulate(prev, t0=HELD_OUT - 1, t1=HELD_OUT, n_steps=50, ode=True)
    np.testing.assert_allclose(flow.mean(0), mean, atol=0.25)
    # (Its spread also rests on the learned score, the less converged of the two nets.)
    np.testing.assert_allclose(flow.std(0), std, rtol=0.3)


def test_landscape_drift_is_time_free_minus_grad_of_potential_and_the_true_one(landscape):
    x = np.array([[1.0, 1.0], [2.0, -1.0], [0.5, -0.5]], dtype=np.float32)
    v = landscape.velocity(x, 1.0)
    # autonomous: the drift does not depend on time, not even beyond the data.
    np.testing.assert_array_equal(v, landscape.velocity(x, 3.7))
    np.testing.assert_array_equal(v, landscape.velocity(x, 9.0))
    h = 1e-2
    grad = np.stack(
        [(landscape.potential(x + h * e, 1.0) - landscape.potential(x - h * e, 1.0)) / (2 * h) for e in np.eye(2)],
        axis=1,
    )
    np.testing.assert_allclose(v, -grad, rtol=0.02, atol=0.02)
    # The landscape recovered is the true one: drift -THETA x.
    np.testing.assert_allclose(v, -THETA * x, atol=0.4)


def test_time_dependent_drift_varies_with_time(sde):
    x = cells_at(1.0)[:5]
    assert not np.array_equal(sde.velocity(x, 0.5), sde.velocity(x, 3.5))
    # The drift and the probability-flow velocity differ by g^2/2 times the score.
    assert not np.allclose(sde.velocity(x, 1.0), sde.velocity(x, 1.0, ode=True))


def test_sde_paths_are_reproducible_by_seed(sde):
    prev = cells_at(1.0)[:20]
    a = sde.simulate(prev, t0=1, t1=2, n_steps=10, seed=3)
    np.testing.assert_array_equal(a, sde.simulate(prev, t0=1, t1=2, n_steps=10, seed=3))
    assert not np.allclose(a, sde.simulate(prev, t0=1, t1=2, n_steps=10, seed=4))
    # Without a seed the noise comes from torch's global generator.
    torch.manual_seed(5)
    b = sde.simulate(prev, t0=1, t1=2, n_steps=10)
    torch.manual_seed(5)
    np.testing.assert_array_equal(b, sde.simulate(prev, t0=1, t1=2, n_steps=10))


def test_sde_extrapolates_beyond_the_observed_times(sde):
    last = cells_at(4.0)
    later = sde.simulate(last, t0=4, t1=6, n_steps=40, seed=0)
    assert np.isfinite(later).all()
    # The process keeps relaxing towards its stationary mean, 0.
    assert np.linalg.norm(later.mean(0)) < np.linalg.norm(last.mean(0))


def test_sde_runs_forward_only_unless_asked_for_its_ode(sde):
    x = cells_at(3.0)[:10]
    with pytest.raises(BadInputError, match="forward in time only") as err:
        sde.simulate(x, t0=3, t1=1)
    assert "\n" not in str(err.value) and "ode=True" in str(err.value)
    back = sde.simulate(x, t0=3, t1=1, ode=True)
    # Backwards the OU cloud moves out again, away from 0.
    assert np.isfinite(back).all() and np.linalg.norm(back.mean(0)) > np.linalg.norm(x.mean(0))


def test_sde_save_load_round_trip(sde, tmp_path):
    path = tmp_path / "sde.pt"
    sde.save(path)
    loaded = Simulator.load(path, device=CPU)
    prev = cells_at(1.0)
    np.testing.assert_array_equal(
        loaded.simulate(prev, t0=1, t1=2, n_steps=20, seed=1), sde.simulate(prev, t0=1, t1=2, n_steps=20, seed=1)
    )
    assert loaded.stochastic and loaded.diffusion == pytest.approx(sde.diffusion)
    assert set(torch.load(path, weights_only=True)["extra"]) == {"x_shift", "x_scale", "t_shift", "t_scale", "times", "score_fitted"}


def test_deterministic_model_on_the_same_data_runs_and_ignores_seeds():
    sim = fit(epochs=10, n_cells=100)
    assert not sim.stochastic and sim.diffusion is None
    prev = cells_at(1.0)
    a = sim.simulate(prev, t0=1, t1=2, n_steps=20, seed=0)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, sim.simulate(prev, t0=1, t1=2, n_steps=20, seed=1, ode=True))
    assert set(sim.history[-1]) == {"epoch", "loss"}


def test_stochastic_fit_resumes_from_its_checkpoint(tmp_path):
    ckpt = tmp_path / "sde.ckpt"
    prev = cells_at(1.0)[:30]
    whole = fit(stochastic=True, epochs=4, n_cells=60, seed=2, diffusion=0.7)
    fit(stochastic=True, epochs=2, n_cells=60, seed=2, diffusion=0.7, checkpoint_path=ckpt, checkpoint_every=1)
    resumed = fit(stochastic=True, epochs=4, n_cells=60, seed=2, diffusion=0.7, checkpoint_path=ckpt, checkpoint_every=1)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert {"loss", "flow", "score"} <= set(resumed.history[-1])
    np.testing.assert_array_equal(
        resumed.simulate(prev, t0=1, t1=2, n_steps=10, seed=0), whole.simulate(prev, t0=1, t1=2, n_steps=10, seed=0)
    )


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
def test_kinetic_penalty_slows_the_drift(stochastic):
    settings = dict(stochastic=stochastic, epochs=15, n_cells=150, batch_size=50)
    free = fit(**settings)
    slow = fit(**settings, kinetic=1.0)
    assert "kinetic" in slow.history[-1] and "kinetic" not in free.history[-1]
    x = np.concatenate([cells_at(time)[:50] for time in (0.0, 1.0, 3.0)])
    speed = {name: np.linalg.norm(m.velocity(x, 1.0), axis=1).mean() for name, m in [("free", free), ("slow", slow)]}
    # Where the network fits its target, the penalty shrinks the drift by about 1 / (1 + kinetic).
    assert 0.3 * speed["free"] < speed["slow"] < 0.75 * speed["free"]


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
def test_unbalanced_couplings_train_to_finite_dynamics(stochastic):
    sim = fit(stochastic=stochastic, epochs=5, n_cells=100, unbalanced=5.0)
    assert all(np.isfinite(h["loss"]) for h in sim.history)
    out = sim.simulate(cells_at(1.0), t0=1, t1=2, n_steps=10, seed=0)
    assert np.isfinite(out).all()


def test_fit_rejects_bad_prior_settings():
    x, t = ou_snapshots(n=20)
    sde = Simulator(2, n_hidden=8, n_layers=1, stochastic=True)
    with pytest.raises(BadInputError, match="diffusion must be"):
        sde.fit(x, t, epochs=1, diffusion=0.0, device=CPU)
    with pytest.raises(BadInputError, match="kinetic must be"):
        sde.fit(x, t, epochs=1, kinetic=-1.0, device=CPU)
    with pytest.raises(BadInputError, match="unbalanced must be"):
        Simulator(2).fit(x, t, epochs=1, unbalanced=0.0, device=CPU)


# --------------------------------------------------------------------------
# Stateless parts
# --------------------------------------------------------------------------


def test_brownian_bridge_marginal_and_its_sde_drift():
    g, dt, n = 0.7, 0.25, 200_000
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.tensor([[0.0, 1.0]]).expand(n, 2), torch.tensor([[2.0, -1.0]]).expand(n, 2)
    s = torch.full((n,), 0.3, dtype=torch.float32)
    noise = torch.randn(n, 2, generator=gen)
    x_s, u, sigma_s = brownian_bridge(x0, x1, s, dt, g, noise)
    # Mean (1 - s) x0 + s x1, std g sqrt(dt s (1 - s)).
    torch.testing.assert_close(x_s.mean(0), torch.tensor([0.6, 0.4]), atol=5e-3, rtol=0)
    torch.testing.assert_close(x_s.std(0), torch.full((2,), g * (dt * 0.3 * 0.7) ** 0.5), rtol=5e-3, atol=0)
    # Flow velocity + g^2/2 score (= -noise / sigma_s) is the pinned SDE's drift (x1 - x_s) / (t1 - t_s).
    drift = u + 0.5 * g**2 * (-noise / sigma_s)
    torch.testing.assert_close(drift, (x1 - x_s) / ((1 - s[:, None]) * dt), rtol=1e-4, atol=1e-4)


def test_entropic_plans_match_pot():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(40, 3, generator=gen, dtype=torch.float64), torch.randn(30, 3, generator=gen) + 0.5
    cost = squared_cost(x0, x1)
    a, b = np.full(40, 1 / 40), np.full(30, 1 / 30)
    for reg in (0.5, 2.0):
        ref = ot.sinkhorn(a, b, cost.numpy(), reg, method="sinkhorn_log", stopThr=1e-12, numItermax=100_000)
        np.testing.assert_allclose(entropic_plan(cost, reg, tol=1e-9).numpy(), ref, atol=1e-8)
        ref = ot.unbalanced.sinkhorn_unbalanced(a, b, cost.numpy(), reg, 1.0, stopThr=1e-12, numItermax=100_000)
        np.testing.assert_allclose(entropic_plan(cost, reg, reg_m=1.0, tol=1e-9).numpy(), ref / ref.sum(), atol=1e-8)


def test_entropic_plan_small_reg_in_high_dimension_approaches_exact_ot():
    # Where POT's sinkhorn_log stalls and its unbalanced solvers underflow.
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen) + 0.5
    cost = squared_cost(x0, x1)
    plan = entropic_plan(cost, 0.05)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), torch.full((128,), 1 / 128, dtype=torch.float64), rtol=0.02, atol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((128,), 1 / 128, dtype=torch.float64), rtol=0.02, atol=0)
    # Its transport cost is within 1% of the exact optimum.
    exact = float((exact_plan(cost) * cost).sum())
    assert exact <= float((plan * cost).sum()) < 1.01 * exact
    assert torch.isfinite(entropic_plan(cost, 0.05, reg_m=1.0)).all()


def test_unbalanced_plan_leaves_cells_without_a_partner_unmatched():
    # Target = source shifted a little, plus a far cluster of newborn cells.
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(60, 2, generator=gen)
    x1 = torch.cat([x0[:50] + 0.1, torch.randn(10, 2, generator=gen) + 8.0])
    cost = squared_cost(x0, x1)
    far = slice(50, 60)
    balanced = entropic_plan(cost, 0.5)
    unbalanced = entropic_plan(cost, 0.5, reg_m=1.0)
    assert float(balanced[:, far].sum()) == pytest.approx(10 / 60, rel=0.05)  # forced to take 1/6 of the mass
    assert float(unbalanced[:, far].sum()) < 0.01
    # Pairs drawn from the unbalanced plan almost never reach the far cluster.
    _, y = sample_ot_pairs(x0, x1, generator=gen, n_pairs=2000, reg=0.5, reg_m=1.0)
    assert (y[:, 0] > 4).float().mean() < 0.02


@pytest.fixture(scope="module")
def marginal_sde() -> Simulator:
    """The same SDE fitted by simulating each time point to the next and matching its cells."""
    return fit(stochastic=True, autonomous=True, objective="marginal", epochs=40, steps_per_epoch=5, batch_size=128)


def test_marginal_fit_predicts_the_held_out_marginal_across_the_gap(marginal_sde):
    # The held-out t=2 is never seen: only the 1 -> 3 gap is simulated in training.
    mean, std = ou_marginal(HELD_OUT)
    pred = marginal_sde.simulate(cells_at(HELD_OUT - 1), t0=HELD_OUT - 1, t1=HELD_OUT, n_steps=50, seed=0)
    np.testing.assert_allclose(pred.mean(0), mean, atol=0.25)
    np.testing.assert_allclose(pred.std(0), std, rtol=0.25)
    # Copying the previous time point is 0.7 off in each coordinate: the model moved the cells.
    assert np.abs(pred.mean(0) - cells_at(HELD_OUT - 1).mean(0)).min() > 0.35
    assert marginal_sde.history[-1]["loss"] < marginal_sde.history[0]["loss"]


def test_marginal_fit_refuses_the_probability_flow_ode_it_never_trained(marginal_sde, tmp_path):
    with pytest.raises(BadInputError, match="marginal matching"):
        marginal_sde.simulate(cells_at(1.0), t0=1.0, t1=2.0, ode=True)
    path = tmp_path / "marginal.pt"
    marginal_sde.save(path)
    with pytest.raises(BadInputError, match="marginal matching"):
        Simulator.load(path).simulate(cells_at(1.0), t0=1.0, t1=2.0, ode=True)


def test_marginal_fit_with_kinetic_energy_takes_shorter_paths_to_the_same_marginals(marginal_sde):
    """Marginal matching alone leaves the paths free; the kinetic weight picks short ones (less drift
    energy along the way) while the held-out marginal is still predicted."""
    lazy = fit(stochastic=True, autonomous=True, objective="marginal", epochs=40, steps_per_epoch=5, batch_size=128,
               kinetic=0.01)
    assert {"distance", "kinetic"} <= set(lazy.history[-1])
    mean, std = ou_marginal(HELD_OUT)
    pred = lazy.simulate(cells_at(HELD_OUT - 1), t0=HELD_OUT - 1, t1=HELD_OUT, n_steps=50, seed=0)
    np.testing.assert_allclose(pred.mean(0), mean, atol=0.25)
    np.testing.assert_allclose(pred.std(0), std, rtol=0.25)
    x, t = ou_snapshots()

    def energy(sim):
        return float(np.mean([np.mean(sim.velocity(x[t == v], v) ** 2) for v in np.unique(t)]))

    assert energy(lazy) < 0.9 * energy(marginal_sde)


def test_hybrid_fit_predicts_the_held_out_marginal_and_keeps_its_probability_flow():
    """SF2M's bridge loss and marginal matching on one SDE: it predicts across the gap, reports both
    parts, and (its score trained, unlike marginal matching alone) also runs as its probability-flow ODE."""
    both = fit(stochastic=True, objective="hybrid", epochs=40, steps_per_epoch=5, batch_size=128)
    assert {"flow", "score", "marginal"} <= set(both.history[-1])
    assert both.history[-1]["marginal"] < both.history[0]["marginal"]
    mean, std = ou_marginal(HELD_OUT)
    for ode in (False, True):
        pred = both.simulate(cells_at(HELD_OUT - 1), t0=HELD_OUT - 1, t1=HELD_OUT, n_steps=50, seed=0, ode=ode)
        np.testing.assert_allclose(pred.mean(0), mean, atol=0.3)
        np.testing.assert_allclose(pred.std(0), std, rtol=0.25)


def test_fit_rejects_an_unknown_objective():
    with pytest.raises(BadInputError, match="objective"):
        fit(stochastic=True, objective="bogus", epochs=1)


def test_marginal_loss_integrates_each_interval_with_its_own_number_of_steps():
    """Rows of a short interval beside a gap twice as long take half the gap's Euler steps, of the
    same length, and the loss is the mean over intervals of Szekely's energy distance."""
    from virtualcell.models.fields import Dynamics

    torch.manual_seed(0)
    dyn = Dynamics(2, n_hidden=16, n_layers=2, stochastic=True)
    dyn.diffusion.fill_(0.3)
    n, n_max = 6, 4
    x0, x1 = torch.randn(2 * n, 2), torch.randn(2 * n, 2)
    # interval 0 is the gap (0 -> 0.5), interval 1 a short one (0.5 -> 0.75); rows interleaved
    group = torch.tensor([0, 1] * n)
    t0 = torch.where(group == 0, 0.0, 0.5)
    t1 = torch.where(group == 0, 0.5, 0.75)
    noise = torch.randn(n_max, 2 * n, 2)
    blocks = [x1[:n], x1[n:]]  # x1: one block per interval, in the order of the labels
    got = dyn.marginal_loss(x0, x1, t0, t1, group, noise)["loss"]

    def euler(rows, steps):
        y, h = x0[rows], float(t1[rows][0] - t0[rows][0]) / steps
        for k in range(steps):
            y = y + h * dyn.drift(y, t0[rows] + k * h) + 0.3 * np.sqrt(h) * noise[k, rows]
        return y

    def edist(a, b):
        d = lambda u, v: torch.cdist(u, v).mean()
        return 2 * d(a, b) - d(a, a) - d(b, b)

    with torch.no_grad():
        want = 0.5 * (edist(euler(group == 0, n_max), blocks[0]) + edist(euler(group == 1, n_max // 2), blocks[1]))
    assert float(got.detach()) == pytest.approx(float(want), abs=1e-4)
