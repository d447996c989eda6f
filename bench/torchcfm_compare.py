"""Side by side with torchcfm: its OT-CFM and our simulator on the same data, split, space and seeds.

Run by hand: ``python bench/torchcfm_compare.py [--quick] [--jobs 2] [--output PATH]``.

Data: the built-in synthetic dataset of ``config/config.yaml`` (3,000 cells, 6 time points), after
QC with that config's defaults, made in memory (nothing is written under results/). Space:
``pca5``, the 5 whitened PCs of QC's log-normalised highly variable genes, fitted once on all cells
(:mod:`virtualcell.reference`). Protocol (leave one time point out, as in TrajectoryNet and the
OT-CFM paper): for each interior time h in 1..4, train on every cell of the other time points,
predict h by integrating the cells of the previous time point from h-1 to h, and score exact W1
(POT, Euclidean) against the real cells at h. Training seeds 0, 1, 2; mean and std over seeds.

Baselines, same run and space: OT displacement interpolation between h-1 and h+1, copy previous,
copy next, two halves of the real cells (noise floor) and the oracle (a fresh sample of the true
process at h, measured and projected as the data were). ``gap_closed = (ot_interp - method) /
(ot_interp - oracle)``: 0 is interpolation, 1 is the truth.

torchcfm is mirrored from its own single-cell code (examples/single_cell notebook and the runner's
``leaveout_timepoint`` in runner/src/models/cfm_module.py): ``torchcfm.models.MLP`` (3 hidden
SELU layers, time as an input), ``ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)`` on a
minibatch of every pair of consecutive observed times, the network's time in the data's units, the
pair spanning the gap mapped onto [h-1, h+1] with its target velocity divided by the gap (the
runner's ``t *= 2``, ``ut /= 2``), AdamW lr 1e-3, weight decay 1e-5 (the runner's), prediction by
dopri5 (torchdiffeq; the notebook uses torchdyn's NeuralODE with dopri5). Besides its OT-CFM at
width 64 (its single-cell setting) it runs at our width (128), and with the exact plan between all
cells of two time points solved once (``torchcfm_fullplan_w128``), which is how our Simulator couples
time points of up to 2,000 cells: that variant separates the coupling from the rest.

Training budget, matched: every method gets the same number of gradient steps
(``EPOCHS x ceil(max cells per time point / BATCH_SIZE)``, which is how our ``Simulator.fit``
counts an epoch) with BATCH_SIZE cells per time point per interval per step; the steps each fit
really took are counted (an optimiser hook) and recorded. Wall time per fit (training plus
prediction) is measured in the worker, torch with one thread; ``--jobs`` fits run at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "torchcfm_compare.json"

# --------------------------------------------------------------------------- the methods
# Our variants: name -> (Simulator constructor options, fit options). A variant runs when this
# version of Simulator accepts its options (constructor: tried, TypeError = not accepted; fit:
# inspect.signature); the results say which ran and why the others did not.
OURS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ours_ode": ({}, {}),                                      # the defaults: OT-CFM, time-dependent drift
    "ours_ode_autonomous": ({"autonomous": True}, {}),         # drift without time (a fixed landscape)
    "ours_potential": ({"potential": True}, {}),               # drift = -grad of a learned potential
    "ours_sf2m": ({"stochastic": True}, {"diffusion": 0.5}),   # SDE, score + flow matching (config default g)
    "ours_ode_kinetic": ({}, {"kinetic": 0.1}),                # + kinetic-energy penalty (drift ~ /1.1)
    "ours_ode_unbalanced": ({}, {"unbalanced": 10.0}),         # unbalanced OT, reg_m ~ cost of unrelated cells (2 dim)
    # SDE fitted by simulation and energy-distance marginal matching (simulate.method: marginal), at the
    # diffusion measured best for it in pca5 (0.1); the bench gives it the same batch (256) as every method
    "ours_marginal": ({"stochastic": True}, {"objective": "marginal", "diffusion": 0.1}),
    # both on one SDE (simulate.method: hybrid, the workflow's default since 2026-12-07); not yet run here
    "ours_hybrid": ({"stochastic": True}, {"objective": "hybrid", "diffusion": 0.5, "marginal_weight": 10.0}),
}
# More predictions from the same fitted model (no extra training): fitted variant -> {name: simulate options}.
EXTRA_PREDICTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "ours_sf2m": {"ours_sf2m_pf_ode": {"ode": True}},  # the SDE's probability-flow ODE (same marginals)
}
# torchcfm: name -> MLP width and coupling. Width 64 is what its single-cell notebook and runner use;
# 128 is ours. plan "minibatch": ExactOptimalTransportConditionalFlowMatcher re-solves the exact plan
# of every minibatch (torchcfm's OT-CFM); "full": torchcfm's OTPlanSampler("exact") solves the plan
# between all cells of two time points once and each step draws its pairs from it
# (ConditionalFlowMatcher, same sigma), as its runner does for datasets with precomputed plans and as
# our Simulator does up to 2,000 cells per time point.
TORCHCFM: dict[str, dict[str, Any]] = {
    "torchcfm_otcfm": {"w": 64, "plan": "minibatch"},
    "torchcfm_otcfm_w128": {"w": 128, "plan": "minibatch"},
    "torchcfm_fullplan_w128": {"w": 128, "plan": "full"},
}
BASELINES = ("ot_interp", "copy_prev", "copy_next", "noise_floor", "oracle")

# --------------------------------------------------------------------------- the budget
SEEDS = (0, 1, 2)
HOLDOUTS = (1.0, 2.0, 3.0, 4.0)
# 200 epochs = 400 steps of 256 cells per time point per interval (the default config's simulate
# budget when this was written; it has since become 60 epochs x 20 steps = 1,200 steps).
# CPU per step, measured on the 2-core machine: torchcfm 0.06 s (it solves 4 exact 256 x 256 plans a
# step), its full-plan variant 0.026 s (numpy draws pairs from 480 x 480 plans), ours 0.011-0.03 s
# (plans of all cells solved once, pairs drawn by inverse CDF); 9 fitted methods x 4 holdouts x 3 seeds
# is ~3.7 CPU-s per step of budget, so 400 steps on 2 cores is ~12.5 min, inside this bench's 15
# (1,200 steps would be ~37). For the pipeline's budget on the like-for-like pair:
# --epochs 600 --methods torchcfm_fullplan_w128 ours_ode. (Before the Simulator's full-data plans,
# 5c96fa0, ours cost 0.07-0.3 s a step too and the budget had to be 75 epochs.)
EPOCHS = 200
QUICK_EPOCHS, QUICK_SEEDS = 5, (0,)
BATCH_SIZE = 256
LR = 1e-3
SIGMA = 0.1
OUR_N_STEPS = 100          # our simulate(): RK2 / Euler-Maruyama steps (config evaluate.n_steps)
TCFM_ODE = {"method": "dopri5", "atol": 1e-4, "rtol": 1e-4}
TCFM_WEIGHT_DECAY = 1e-5   # torchcfm runner's AdamW
MAX_POINTS = 2000          # evaluate.max_points (every time point here has fewer cells: W1 is exact)


# --------------------------------------------------------------------------- data


def make_data(workdir: Path) -> dict[str, Any]:
    """The synthetic dataset after QC (config/config.yaml defaults), in pca5; saved for the workers."""
    import yaml

    from virtualcell import config as vc
    from virtualcell import io, qc, reference

    cfg = vc.validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    spec = cfg["datasets"]["synthetic"]
    mdata = io.read_dataset("synthetic", spec)
    params = dict(mdata.uns["synthetic"])
    filtered, _ = qc.run_qc(mdata, origin="synthetic (bench)", **cfg["qc"])
    rna = filtered.mod["rna"]
    if "condition" in rna.obs:  # the time course is the control's, as the workflow's pair step keeps it
        rna = rna[rna.obs["condition"].astype(str).to_numpy() == spec.get("control", "control")].copy()
    hvg = rna.var["highly_variable"].to_numpy()
    target_sum = rna.uns["normalize_total"]["target_sum"]
    ref = reference.fit(rna.X[:, hvg], rna.var_names[hvg], target_sum=target_sum)
    z = reference.project(rna.X[:, hvg], ref)
    t = rna.obs["time"].to_numpy(dtype=float)
    data = {"z": z, "t": t, "kept_genes": np.asarray(rna.var_names, dtype=str), "ref": ref,
            "params": params}
    np.savez(workdir / "pca5.npz", z=z, t=t)
    return data


def oracle_cells(data: dict[str, Any], time_point: float, n: int, seed: int) -> np.ndarray:
    """n fresh cells of the true process at ``time_point``, measured as QC measured, in pca5."""
    from virtualcell import reference, synthetic

    counts, genes = synthetic.sample_cells(data["params"], time=time_point, n=n, seed=seed)
    index = {g: i for i, g in enumerate(genes)}
    kept = [str(g) for g in data["kept_genes"]]
    counts = counts[:, [index[g] for g in kept]]  # the genes QC kept: their total is what QC normalised
    return reference.project(reference.log_normalise(counts, all_genes=kept, ref=data["ref"]), data["ref"])


def steps_per_epoch(t: np.ndarray, batch_size: int) -> int:
    """What our Simulator.fit calls an epoch: ceil(max cells per time point / batch size) steps."""
    return int(math.ceil(max(np.unique(t, return_counts=True)[1]) / batch_size))


# --------------------------------------------------------------------------- which variants run


def our_variants() -> tuple[dict[str, tuple[dict, dict]], dict[str, str]]:
    """The variants this Simulator accepts, and for the others why not."""
    from virtualcell.models.dynamics import Simulator

    fit_params = inspect.signature(Simulator.fit).parameters
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in fit_params.values())
    runnable, skipped = {}, {}
    for name, (ctor, fit) in OURS.items():
        try:
            Simulator(5, **ctor)
        except TypeError as err:
            skipped[name] = f"Simulator({', '.join(f'{k}={v!r}' for k, v in ctor.items())}): {err}"
            continue
        missing = [k for k in fit if k not in fit_params and not accepts_var_kw]
        if missing:
            skipped[name] = f"Simulator.fit has no option {', '.join(missing)}"
            continue
        runnable[name] = (ctor, fit)
    return runnable, skipped


# --------------------------------------------------------------------------- one fit (in a worker)

_DATA: dict[str, np.ndarray] = {}
_STEPS = [0]


def _init_worker(npz: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    d = np.load(npz)
    _DATA.update(z=d["z"], t=d["t"])
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def count(*_):
        _STEPS[0] += 1

    register_optimizer_step_post_hook(count)


def _fit_torchcfm(x: np.ndarray, t: np.ndarray, *, w: int, plan: str, n_steps: int, seed: int):
    import torch
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    from torchcfm.models import MLP
    from torchcfm.optimal_transport import OTPlanSampler

    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm's OTPlanSampler draws pairs from numpy's global generator
    rng = np.random.default_rng(seed)
    times = np.unique(t)
    groups = [torch.from_numpy(x[t == ti]).float() for ti in times]
    model = MLP(dim=x.shape[1], time_varying=True, w=w)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=TCFM_WEIGHT_DECAY)
    if plan == "minibatch":
        fm = ExactOptimalTransportConditionalFlowMatcher(sigma=SIGMA)
    else:
        fm = ConditionalFlowMatcher(sigma=SIGMA)  # pairs already drawn from the full plan
        sampler = OTPlanSampler(method="exact")
        plans = [sampler.get_map(groups[k], groups[k + 1]) for k in range(len(groups) - 1)]
    for _ in range(n_steps):
        ts, xts, uts = [], [], []
        for k in range(len(groups) - 1):
            a, b = groups[k], groups[k + 1]
            if plan == "minibatch":
                x0 = a[rng.integers(len(a), size=BATCH_SIZE)]  # the notebook's get_batch: with replacement
                x1 = b[rng.integers(len(b), size=BATCH_SIZE)]
            else:
                i, j = sampler.sample_map(plans[k], BATCH_SIZE)
                x0, x1 = a[i], b[j]
            tau, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            gap = float(times[k + 1] - times[k])  # 2 across the held-out time: the runner's t*2, ut/2
            ts.append(float(times[k]) + gap * tau)
            xts.append(xt)
            uts.append(ut / gap)
        tt, xt, ut = torch.cat(ts), torch.cat(xts), torch.cat(uts)
        opt.zero_grad()
        vt = model(torch.cat([xt, tt[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        opt.step()
    return model


def _predict_torchcfm(model, x0: np.ndarray, t0: float, t1: float) -> np.ndarray:
    import torch
    from torchdiffeq import odeint

    def velocity(tt, y):
        return model(torch.cat([y, tt.reshape(1, 1).expand(len(y), 1)], dim=-1))

    model.eval()
    with torch.no_grad():
        traj = odeint(velocity, torch.from_numpy(x0).float(), torch.tensor([t0, t1], dtype=torch.float32),
                      **TCFM_ODE)
    return traj[-1].numpy()


def run_fit(method: str, spec: dict[str, Any], held: float, seed: int, epochs: int) -> dict[str, Any]:
    """Train ``method`` without time ``held``, predict it from the previous time; W1 and wall time."""
    from virtualcell import evaluate as ev

    z, t = _DATA["z"], _DATA["t"]
    keep = t != held
    times = np.unique(t)
    prev = float(times[times < held].max())
    x_prev = z[t == prev].astype(np.float32)
    n_steps = epochs * steps_per_epoch(t[keep], BATCH_SIZE)
    _STEPS[0] = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        if spec["kind"] == "torchcfm":
            model = _fit_torchcfm(z[keep], t[keep], w=spec["w"], plan=spec["plan"], n_steps=n_steps, seed=seed)
            fitted = time.perf_counter()
            pred = _predict_torchcfm(model, x_prev, prev, held)
        else:
            from virtualcell.models.dynamics import Simulator

            sim = Simulator(z.shape[1], **spec["ctor"])
            sim.fit(z[keep], t[keep], epochs=epochs, batch_size=BATCH_SIZE, lr=LR, sigma=SIGMA, device="cpu",
                    seed=seed, **spec["fit"])
            fitted = time.perf_counter()
            kwargs = {"n_steps": OUR_N_STEPS}
            if "seed" in inspect.signature(sim.simulate).parameters:
                kwargs["seed"] = seed
            pred = sim.simulate(x_prev, t0=prev, t1=held, **kwargs)
    except Exception as err:  # a variant that breaks is reported, not fatal to the bench
        return [{"method": method, "held": held, "seed": seed, "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc(limit=4)}]
    end = time.perf_counter()
    cpu_s = time.process_time() - cpu_start  # this process's CPU time: what other jobs on the cores do not inflate
    steps = _STEPS[0]
    preds = [(method, pred, end - fitted)]
    for extra, options in (EXTRA_PREDICTIONS.get(method, {}).items() if spec["kind"] == "ours" else ()):
        begin = time.perf_counter()
        try:
            p = sim.simulate(x_prev, t0=prev, t1=held, **kwargs, **options)
        except Exception as err:
            preds.append((extra, err, 0.0))
            continue
        preds.append((extra, p, time.perf_counter() - begin))
    out = []
    real = z[t == held]
    for name, p, predict_s in preds:
        if isinstance(p, Exception):
            out.append({"method": name, "held": held, "seed": seed, "error": f"{type(p).__name__}: {p}"})
            continue
        p = np.asarray(p, dtype=np.float64)
        w1 = ev.wasserstein(p, real, p=1, max_points=MAX_POINTS, seed=seed) if np.isfinite(p).all() else float("nan")
        out.append({"method": name, "held": held, "seed": seed, "w1": w1, "wall_s": fitted - start + predict_s,
                    "train_s": fitted - start, "predict_s": predict_s, "cpu_s": cpu_s, "grad_steps": steps,
                    "planned_steps": n_steps})
    return out


# --------------------------------------------------------------------------- baselines (main process)


def baselines(data: dict[str, Any], held: float, seed: int) -> dict[str, dict[str, float]]:
    from virtualcell import evaluate as ev

    z, t = data["z"], data["t"]
    times = np.unique(t)
    prev, nxt = float(times[times < held].max()), float(times[times > held].min())
    real = z[t == held]
    n = len(real)
    alpha = (held - prev) / (nxt - prev)
    out = {}
    makers = {
        "ot_interp": lambda: ev.ot_interpolate(z[t == prev], z[t == nxt], alpha, n=n, max_points=MAX_POINTS,
                                               seed=seed),
        "copy_prev": lambda: z[t == prev],
        "copy_next": lambda: z[t == nxt],
        "oracle": lambda: oracle_cells(data, held, n, seed),
    }
    for name, make in makers.items():
        start = time.perf_counter()
        pred = make()
        w1 = ev.wasserstein(pred, real, p=1, max_points=MAX_POINTS, seed=seed)
        out[name] = {"w1": w1, "wall_s": time.perf_counter() - start}
    start = time.perf_counter()
    out["noise_floor"] = {"w1": ev.noise_floor(real, max_points=MAX_POINTS, seed=seed)["w1"],
                          "wall_s": time.perf_counter() - start}
    return out


# --------------------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "per_seed": values}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": [float(x) for x in values]}


def summarise(records: list[dict], base: dict[tuple[float, int], dict], methods: list[str], seeds, holdouts):
    per_holdout: dict[str, Any] = {}
    for held in holdouts:
        section = {"w1_pca5": {}, "gap_closed": {}, "wall_s": {}, "cpu_s": {}, "grad_steps": {}}
        for name in [*methods, *BASELINES]:
            w1s, gaps, walls, cpus, steps = [], [], [], [], []
            for s in seeds:
                b = base[(held, s)]
                if name in BASELINES:
                    rec = b[name]
                else:
                    found = [r for r in records if r["method"] == name and r["held"] == held and r["seed"] == s]
                    if not found or "error" in found[0]:
                        continue
                    rec = found[0]
                    steps.append(rec["grad_steps"])
                    cpus.append(rec["cpu_s"])
                w1s.append(rec["w1"])
                walls.append(rec["wall_s"])
                gap = b["ot_interp"]["w1"] - b["oracle"]["w1"]
                gaps.append((b["ot_interp"]["w1"] - rec["w1"]) / gap if gap > 0 else None)
            if not w1s:
                continue
            section["w1_pca5"][name] = _stats(w1s)
            section["gap_closed"][name] = _stats(gaps)
            section["wall_s"][name] = _stats(walls)
            if cpus:
                section["cpu_s"][name] = _stats(cpus)
            if steps:
                section["grad_steps"][name] = sorted(set(steps))
        per_holdout[f"{held:g}"] = section
    mean = {}
    for key in ("w1_pca5", "gap_closed", "wall_s", "cpu_s"):
        mean[key] = {}
        for name in [*methods, *BASELINES]:
            vals = [per_holdout[h][key][name]["mean"] for h in per_holdout if name in per_holdout[h][key]]
            vals = [v for v in vals if v is not None]
            if len(vals) == len(per_holdout):
                mean[key][name] = float(np.mean(vals))
        # the std over seeds of the mean over holdouts (each seed's 4-holdout mean)
    mean["w1_pca5_std_over_seeds"] = {}
    for name in [*methods, *BASELINES]:
        rows = [per_holdout[h]["w1_pca5"].get(name, {}).get("per_seed") for h in per_holdout]
        if all(r is not None and len(r) == len(seeds) for r in rows):
            mean["w1_pca5_std_over_seeds"][name] = float(np.std(np.mean(np.asarray(rows, float), axis=0)))
    return per_holdout, mean


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"description": f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem_gb} GiB, "
                           f"Python {platform.python_version()}, CPU only, torch threads 1 per job",
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "python": platform.python_version(),
            "device": "cpu", "cuda_available": bool(torch.cuda.is_available()),
            "load_average_at_start": list(os.getloadavg())}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchcfm", "torchdiffeq", "POT", "numpy", "scipy", "scanpy", "virtualcell"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        out["virtualcell_git"] = rev + (" (src/ has uncommitted changes)" if dirty else "")
        # the simulator's source as it was when this ran (it may be uncommitted)
        import hashlib

        for name in ("dynamics.py", "couplings.py"):
            path = REPO / "src" / "virtualcell" / "models" / name
            if path.exists():
                out[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def table(mean: dict[str, Any], methods: list[str]) -> str:
    rows = ["| method | W1 pca5 (mean of 4 holdouts) | ± std over seeds | gap closed | wall per fit | CPU per fit |",
            "|---|---|---|---|---|---|"]
    for name in [*methods, *BASELINES]:
        if name not in mean["w1_pca5"]:
            continue
        gap = mean["gap_closed"].get(name)
        std = mean["w1_pca5_std_over_seeds"].get(name)
        wall, cpu = mean["wall_s"].get(name), mean["cpu_s"].get(name)
        rows.append(f"| {name} | {mean['w1_pca5'][name]:.3f} | {'' if std is None else f'{std:.3f}'} | "
                    f"{'' if gap is None else f'{gap:.2f}'} | {'' if wall is None else f'{wall:.1f} s'} | "
                    f"{'' if cpu is None else f'{cpu:.1f} s'} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs, seed 0 only (smoke test)")
    parser.add_argument("--jobs", type=int, default=2, help="fits at once, one torch thread each (default 2)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--methods", nargs="+", default=None, help="only these fitted methods (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the fits a killed run journalled (same code and settings)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results JSON (default {OUT.relative_to(REPO)}; --quick: a temporary file)")
    args = parser.parse_args()
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    seeds = QUICK_SEEDS if args.quick else SEEDS
    output = args.output or (Path(tempfile.gettempdir()) / "torchcfm_compare.quick.json" if args.quick else OUT)
    output.parent.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "versions": versions()}
    loads: list[list[float]] = []
    stop = threading.Event()

    def sample_load() -> None:  # other work on the shared cores shows here (and in wall_s, not cpu_s)
        while not stop.wait(30.0):
            loads.append([round(time.perf_counter() - started), *os.getloadavg()])

    threading.Thread(target=sample_load, daemon=True).start()
    runnable, skipped = our_variants()
    methods: dict[str, dict[str, Any]] = {name: {"kind": "torchcfm", **spec} for name, spec in TORCHCFM.items()}
    methods |= {name: {"kind": "ours", "ctor": ctor, "fit": fit} for name, (ctor, fit) in runnable.items()}
    if args.methods:
        unknown = set(args.methods) - set(TORCHCFM) - set(OURS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[*TORCHCFM, *OURS]}")
        methods = {k: v for k, v in methods.items() if k in args.methods}
    # what is scored: each fitted method, then the predictions derived from it
    scored = [n for m in methods for n in (m, *(EXTRA_PREDICTIONS.get(m, {}) if methods[m]["kind"] == "ours"
                                                   else {}))]
    print(f"[bench] methods: {list(methods)}; skipped: {list(skipped)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="torchcfm_compare_") as tmp:
        data = make_data(Path(tmp))
        t = data["t"]
        data_s = time.perf_counter() - started
        print(f"[bench] data: {len(t)} cells, {len(data['ref']['genes'])} HVGs in pca5 ({data_s:.0f} s)", flush=True)
        base = {(h, s): baselines(data, h, s) for h in HOLDOUTS for s in seeds}
        # Interleaved (holdout, seed, method): methods see the same load on the shared cores.
        tasks = [(m, methods[m], h, s) for h in HOLDOUTS for s in seeds for m in methods]
        # Every finished fit is appended to a journal beside the output; --resume takes the fits of a
        # killed run whose code and settings match (the shared machine's other users end processes).
        journal = output.with_suffix(".partial.jsonl")
        key = {"epochs": epochs, "batch_size": BATCH_SIZE, "versions": info["versions"]}
        records = []
        resumed = 0
        if args.resume and journal.exists():
            lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
            records = [r for r in lines if r.get("key") == key and "error" not in r and r["method"] in scored]
            done = {(r["method"], r["held"], r["seed"]) for r in records}
            # a fitted method is done when its own record is (its derived predictions came with it)
            tasks = [task for task in tasks if (task[0], task[2], task[3]) not in done]
            resumed = len(records)
            print(f"[bench] resuming: {len(records)} records from {journal}, {len(tasks)} fits to go", flush=True)
        elif journal.exists():
            journal.unlink()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"  # the workers' BLAS: one thread each, like torch
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker,
                                 initargs=(str(Path(tmp) / "pca5.npz"),)) as pool:
            futures = [pool.submit(run_fit, m, spec, h, s, epochs) for m, spec, h, s in tasks]
            for k, fut in enumerate(as_completed(futures), 1):
                for r in fut.result():
                    records.append(r)
                    with journal.open("a") as handle:
                        handle.write(json.dumps({**r, "key": key}) + "\n")
                    msg = r.get("error") or f"W1 {r['w1']:.3f}, {r['wall_s']:.1f} s, {r['grad_steps']} steps"
                    print(f"[bench] {k}/{len(tasks)} {r['method']} t={r['held']:g} seed {r['seed']}: {msg}",
                          flush=True)

    failed = sorted({r["method"] for r in records if "error" in r})
    per_holdout, mean = summarise(records, base, scored, seeds, HOLDOUTS)
    spe = {f"{h:g}": steps_per_epoch(t[t != h], BATCH_SIZE) for h in HOLDOUTS}
    result = {
        "bench": "torchcfm_compare",
        **info,
        "quick": bool(args.quick),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "resumed_records": resumed,  # > 0: total_wall_s covers only the resumed part of the run
        "data_s": round(data_s, 1),
        "data": {"source": "synthetic, config/config.yaml generator + qc defaults",
                 "cells_per_time": {f"{ti:g}": int((t == ti).sum()) for ti in np.unique(t)},
                 "kept_genes": len(data["kept_genes"]), "hvgs": len(data["ref"]["genes"]),
                 "pca5_explained_variance": float(np.sum(data["ref"]["explained_variance_ratio"]))},
        "protocol": {"space": "pca5", "holdouts": [f"{h:g}" for h in HOLDOUTS], "seeds": list(seeds),
                     "train": "every cell at the other time points", "predict": "from the cells at h-1 to h",
                     "metric": "exact W1 (POT emd, Euclidean), virtualcell.evaluate.wasserstein",
                     "gap_closed": "(ot_interp - method) / (ot_interp - oracle), per seed, then mean"},
        "budget": {"epochs": epochs, "batch_size": BATCH_SIZE, "steps_per_epoch": spe,
                   "gradient_steps": {h: epochs * n for h, n in spe.items()}, "lr": LR, "sigma": SIGMA,
                   "jobs_at_once": args.jobs, "torch_threads": 1,
                   "note": "same gradient steps, same cells per time point per interval per step, same lr and "
                           "sigma for every method; counted steps per fit are in holdouts.*.grad_steps"},
        "methods": {
            **{name: {"kind": "torchcfm", "ran": name in methods and name not in failed,
                      "setup": f"torchcfm.models.MLP(dim=5, time_varying=True, w={spec['w']}) (3 hidden SELU "
                               "layers); " + (f"ExactOptimalTransportConditionalFlowMatcher(sigma={SIGMA}) on each "
                                              "minibatch" if spec["plan"] == "minibatch" else
                                              "OTPlanSampler('exact') between all cells of two time points once, "
                                              f"pairs drawn per step, ConditionalFlowMatcher(sigma={SIGMA})")
                               + f"; AdamW lr {LR} wd {TCFM_WEIGHT_DECAY}; torchdiffeq odeint {TCFM_ODE}"}
               for name, spec in TORCHCFM.items()},
            **{name: {"kind": "ours", "ran": name in methods and name not in failed,
                      "constructor": OURS[name][0], "fit": OURS[name][1],
                      "setup": "virtualcell.models.dynamics.Simulator(5, n_hidden=128, n_layers=3 defaults, "
                               f"**constructor).fit(epochs={epochs}, batch_size={BATCH_SIZE}, lr={LR}, "
                               f"sigma={SIGMA}, **fit).simulate(n_steps={OUR_N_STEPS})",
                      **({"skipped": skipped[name]} if name in skipped else {}),
                      **({"errors": sorted({r['error'] for r in records if r['method'] == name and 'error' in r})}
                         if name in failed else {})}
               for name in OURS},
            **{extra: {"kind": "ours", "ran": extra in scored and extra not in failed, "fitted_as": fitted,
                       "simulate": options, "setup": f"the fitted {fitted}, predicted with simulate(**{options})"}
               for fitted, extras in EXTRA_PREDICTIONS.items() for extra, options in extras.items()},
        },
        "holdouts": per_holdout,
        "mean_over_holdouts": mean,
        "table": table(mean, scored),
    }
    stop.set()
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["machine"]["load_average_every_30s"] = loads
    result["machine"]["load_note"] = ("1-minute load average above --jobs means other processes shared the cores: "
                                      "wall_s then overstates, cpu_s (the fit's own process time) does not")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    journal.unlink(missing_ok=True)
    print(result["table"])
    print(f"[bench] wrote {output} in {result['total_wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
