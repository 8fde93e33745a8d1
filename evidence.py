"""
Small-scale evidence that TVM does what the paper claims, at a scale anyone can rerun on a CPU.

    python evidence.py              # 2-D comparison + ablations, 3 seeds: 30 runs of 2,500 steps
    python evidence.py --quick      # the same pipeline, 300 steps, one seed: a smoke test
    python evidence.py --workers 4  # runs are independent; one process per core, one thread each
    python evidence.py --digits     # the digits comparison with FID (train.py's default job; slow on CPU)

Writes evidence/: tables.md, sw2.csv, results.json (every number) and PNG scatter plots; with --digits,
digits.md, digits.json and digits.png. Timings are in the README and in the files themselves.

What it measures (the paper's experiments are ImageNet 256 and 512 only: Tables 1 and 2):
  1. 2-D TVM vs flow matching. A small MLP net(x, t, s, y, w) in place of the DiT, trained with
     tvm.tvm_loss (Eq. 15) on a checkerboard and on 8 Gaussians. The baseline is the same network, same
     data, same optimiser, same number of steps and batch size, trained with the flow-matching term only
     (tvm_loss(..., terminal=False)) and sampled with Euler steps of its velocity u = [w] F(x, t, t).
     Metric: sliced W2 to held-out data (below). TVM with 1, 2, 4 jumps; FM with 1, 4, 100 Euler steps.
  2. Ablations on the 2-D tasks: target-EMA rate 0 / 0.99 / 0.999 (Table 4b); gradient through the JVP
     vs detached (Sec. 7.4); scaled parameterisation on vs off at a low guidance weight (Table 4c), on a
     class-conditional 8-Gaussian task with w = 1.5.
  3. --digits: train.py's digits job (tiny DiT, w = 1.5) trained with TVM and with the flow-matching term
     only, same budget; FID (fid.py) of TVM with 1 and 4 jumps and FM with 1 and 50 Euler steps.

The metric. Sliced W2: SW2(P, Q)^2 = E_theta W2^2(<theta, X>, <theta, Y>) over directions theta uniform on
the circle, estimated with 500 fixed directions; each 1-D W2 is exact, by sorting two equal-size samples.
SW2 <= W2, and it is a metric on distributions. Estimated from 4,000 points per side, it has a floor from
sampling alone, which every table reports ("data vs data": two independent held-out samples).

For the guided task (w = 1.5) the target is not the data: TVM at w learns the flow of the guided velocity
w u(x, t | c) + (1 - w) u(x, t) (App. A.6). For a mixture of isotropic Gaussians both velocities are closed
form (below), so the reference sample is that ODE solved with RK4 in float64 from the same noise.
"""

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

import fid
import tvm
from config import build_net, parse_config
from data import DigitsData, EpochSampler, file_in_the_way, make_batch, to_uint8_images
from step import make_optimizer, train_step

OUT = "evidence"
N_EVAL = 4000           # points per side for the sliced W2
N_PROJ = 500            # directions of the sliced W2
N_TRAIN = 50_000        # fixed training set per task; the held-out set is drawn with another seed
# --digits: the settings evidence/digits.json records (its n_fid and steps), so that `python evidence.py
# --digits` reproduces evidence/digits.md; train.py's own digits defaults have since moved (250 FID samples,
# 1,000 steps).
DIGITS_FID_SAMPLES = 500
DIGITS_STEPS = 1500


# ------------------------------------------------------------------------------------------------
# Data: 2-D tasks, returned as (x0, y): x0 (N, 2) float32, y (N,) long
# ------------------------------------------------------------------------------------------------

MIX_RADIUS, MIX_STD = 2.0, 0.2          # 8 Gaussians: centres on a circle of radius 2, std 0.2 each
MIX_CENTRES = MIX_RADIUS * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


def checkerboard(n, rng):
    """8 squares of a 4 x 4 board on [-2, 2]^2 (FFJORD's checkerboard at half scale). Unlabelled (y = 0)."""
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], 1).astype(np.float32), np.zeros(n, dtype=np.int64)


def eight_gaussians(n, rng):
    """N(centre_k, 0.2^2 I) for k uniform in 0..7; y = k."""
    k = rng.integers(0, 8, n)
    x = MIX_CENTRES[k] + MIX_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32), k.astype(np.int64)


TASKS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians}


def guided_velocity(x, t, y, w):
    """Exact w u(x, t | c) + (1 - w) u(x, t) for the 8-Gaussian mixture. x (N, 2), t float, y (N,).

    Per component k: x_t | k ~ N((1 - t) mu_k, sigma_t^2 I), sigma_t^2 = (1 - t)^2 sigma^2 + t^2, so
    u(x, t | k) = -mu_k + (sigma_t' / sigma_t)(x - (1 - t) mu_k)  (the 1-D Gaussian flow, per coordinate).
    u(x, t) = sum_k pi_k(x, t) u(x, t | k) with posterior weights pi_k ~ N(x; (1 - t) mu_k, sigma_t^2 I).
    """
    var_t = (1 - t) ** 2 * MIX_STD ** 2 + t ** 2
    k_t = (-(1 - t) * MIX_STD ** 2 + t) / var_t                           # sigma_t' / sigma_t
    means = (1 - t) * MIX_CENTRES                                          # (8, 2)
    u_k = -MIX_CENTRES[None] + k_t * (x[:, None, :] - means[None])         # (N, 8, 2)
    logits = -((x[:, None, :] - means[None]) ** 2).sum(-1) / (2 * var_t)   # (N, 8)
    pi = np.exp(logits - logits.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    u_uncond = (pi[..., None] * u_k).sum(1)                                # (N, 2)
    u_cond = u_k[np.arange(len(x)), y]                                     # (N, 2)
    return w * u_cond + (1 - w) * u_uncond


def guided_reference(x1, y, w, steps=200):
    """Solve dx/dt = guided_velocity from t = 1 to 0 with RK4 in float64: the sample TVM should produce.
    200 steps differ from 1000 by < 1e-8 (max over 4,000 points), far below any SW2 shown."""
    x, h = x1.astype(np.float64), -1.0 / steps
    for k in range(steps):
        t = 1.0 - k / steps
        k1 = guided_velocity(x, t, y, w)
        k2 = guided_velocity(x + 0.5 * h * k1, t + 0.5 * h, y, w)
        k3 = guided_velocity(x + 0.5 * h * k2, t + 0.5 * h, y, w)
        k4 = guided_velocity(x + h * k3, t + h, y, w)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


# ------------------------------------------------------------------------------------------------
# The network: an MLP with the DiT's signature net(x, t, s, y, w) -> F
# ------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """F_theta(x, t, s, c, w) for 2-D data. Like the DiT it sees (t, t - s, beta = 1/w) and a class
    embedding with a null row (y == num_classes); each scalar enters as itself plus Fourier features
    sin/cos(pi 2^k a / 2), k = 0..7, so that a small network can be sharp in time."""

    def __init__(self, dim=2, hidden=128, depth=4, num_classes=1, n_freq=8):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq) / 2)
        self.inp = nn.Linear(dim + 3 * (1 + 2 * n_freq), hidden)
        self.y_emb = nn.Embedding(num_classes + 1, hidden)
        layers = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, dim))

    def embed(self, a):  # (B,) -> (B, 1 + 2 n_freq)
        arg = a[:, None] * self.freqs
        return torch.cat([a[:, None], torch.sin(arg), torch.cos(arg)], 1)

    def forward(self, x, t, s, y, w):  # x (B, 2); t, s, w (B,); y (B,) -> (B, 2)
        h = torch.cat([x, self.embed(t), self.embed(t - s), self.embed(1.0 / w)], 1)
        return self.body(self.inp(h) + self.y_emb(y))


# ------------------------------------------------------------------------------------------------
# Training (Algorithm 1) and sampling
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    task: str = "checkerboard"
    method: str = "tvm"            # "tvm" (Eq. 15) or "fm" (the flow-matching term only)
    seed: int = 0
    steps: int = 2500
    batch: int = 256
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)     # the paper's AdamW betas (Table 6); beta2 = 0.95 matters (Fig. 5)
    target_ema: float = 0.99       # theta*, the target of both terms (Table 4b)
    eval_ema: float = 0.999        # theta**, what is sampled; 0.9999 is too slow for a few thousand steps
    detach_jvp: bool = False       # Sec. 7.4
    scale_param: bool = True       # Sec. 4, Table 4c
    conditional: bool = False      # 8 classes + label dropout 0.1 (else one class, w = 1)
    w: float = 1.0
    hidden: int = 128
    depth: int = 4

    @property
    def name(self):
        return (f"{self.task}-{self.method}-s{self.seed}-ema{self.target_ema}-"
                f"{'det' if self.detach_jvp else 'jvp'}-{'scaled' if self.scale_param else 'plain'}-w{self.w}")


def train(run):
    """Train one network; returns (eval-EMA network, seconds, final mean loss terms)."""
    torch.manual_seed(run.seed)
    rng = np.random.default_rng(1000 + run.seed)
    x_all, y_all = (torch.from_numpy(a) for a in TASKS[run.task](N_TRAIN, rng))
    num_classes = 8 if run.conditional else 1
    if not run.conditional:
        y_all = torch.zeros_like(y_all)
    net = MLP(hidden=run.hidden, depth=run.depth, num_classes=num_classes)
    target, ema = copy.deepcopy(net), copy.deepcopy(net)
    for m in (target, ema):
        m.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=run.lr, betas=run.betas)
    gen = torch.Generator().manual_seed(run.seed)
    t0, hist = time.time(), []
    for step in range(run.steps):
        idx = torch.randint(0, N_TRAIN, (run.batch,), generator=gen)
        inp = tvm.sample_loss_inputs(x_all[idx], y_all[idx], num_classes, w=run.w,
                                     label_dropout=0.1 if run.conditional else 0.0, generator=gen)
        loss, terms = tvm.tvm_loss(net, target, inp, scale_param=run.scale_param, detach_jvp=run.detach_jvp,
                                   terminal=run.method == "tvm")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tvm.ema_update(target, net, run.target_ema)
        # Eval EMA with the usual warm-up (rate (1 + k) / (10 + k) early on) so short runs are not
        # dominated by the initial weights; the target EMA keeps its constant rate, as in the paper.
        tvm.ema_update(ema, net, min(run.eval_ema, (1 + step) / (10 + step)))
        hist.append([terms["terminal"].mean().item(), terms["fm"].mean().item()])
    last = np.mean(hist[-max(1, run.steps // 10):], 0)
    return ema, time.time() - t0, {"terminal": float(last[0]), "fm": float(last[1])}


@torch.no_grad()
def euler_sample(net, x1, y, w, steps, scale_param=True):
    """Flow-matching sampler: Euler steps of the model velocity u = [w] F(x, t, t) from t = 1 to 0."""
    B, x = x1.shape[0], x1.double()
    w = torch.full((B,), float(w))
    for k in range(steps):
        t, s = 1 - k / steps, 1 - (k + 1) / steps
        u = tvm.model_velocity(net, x.float(), torch.full((B,), t), y, w, scale_param)
        x = x + (s - t) * u.double()
    return x


def sliced_w2(a, b, n_proj=N_PROJ, seed=0):
    """Sliced W2 between two equal-size samples (N, 2), with n_proj fixed directions (exact 1-D W2 each)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"sliced_w2 needs equal sample sizes, got {a.shape} and {b.shape}"
    angle = np.random.default_rng(seed).uniform(0, np.pi, n_proj)
    theta = np.stack([np.cos(angle), np.sin(angle)])                      # (2, n_proj)
    pa, pb = np.sort(a @ theta, 0), np.sort(b @ theta, 0)                 # (N, n_proj)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def evaluate(run, net):
    """Samples and sliced W2 of one trained network against its reference (held-out data, or the exact
    guided flow for w != 1). Returns ({label: SW2}, {label: samples})."""
    rng = np.random.default_rng(7)                                         # same noise and labels for all runs
    held_out, y_held = TASKS[run.task](N_EVAL, rng)
    x1 = rng.standard_normal((N_EVAL, 2))
    y = torch.from_numpy(y_held) if run.conditional else torch.zeros(N_EVAL, dtype=torch.long)
    reference = guided_reference(x1, y_held, run.w) if run.w != 1 else held_out
    x1t = torch.from_numpy(x1).float()
    if run.method == "tvm":
        samples = {f"TVM {n}": tvm.sample(net, x1t, y, run.w, n, run.scale_param).numpy() for n in (1, 2, 4)}
    else:
        samples = {f"FM {n}": euler_sample(net, x1t, y, run.w, n, run.scale_param).numpy() for n in (1, 4, 100)}
    return {k: sliced_w2(v, reference) for k, v in samples.items()}, samples


def data_floor(task, w=1.0):
    """SW2 between two independent reference samples: the smallest number the estimator can show.
    Unguided: two held-out data sets. Guided: the exact guided flow from two noise draws, same labels
    (evaluate() gives model and reference the same labels too)."""
    rng7 = np.random.default_rng(7)
    a, y = TASKS[task](N_EVAL, rng7)
    if w == 1:
        return sliced_w2(a, TASKS[task](N_EVAL, np.random.default_rng(8))[0])
    x1_a, x1_b = rng7.standard_normal((N_EVAL, 2)), np.random.default_rng(8).standard_normal((N_EVAL, 2))
    return sliced_w2(guided_reference(x1_a, y, w), guided_reference(x1_b, y, w))


def do_run(run):
    torch.set_num_threads(1)
    net, seconds, terms = train(run)
    w2, samples = evaluate(run, net)
    return dict(run=asdict(run), name=run.name, train_seconds=seconds, final_terms=terms, sw2=w2,
                samples={k: v[:2000].astype(np.float32).tolist() for k, v in samples.items()} if run.seed == 0 else {})


# ------------------------------------------------------------------------------------------------
# Figures without matplotlib: PIL scatter plots
# ------------------------------------------------------------------------------------------------

def scatter_grid(panels, path, size=240, lim=3.0):
    """panels: list of (title, (N, 2) array). One row of square scatter plots on [-lim, lim]^2, as PNG."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1
    except TypeError:
        font = ImageFont.load_default()
    pad = 20
    img = Image.new("RGB", (len(panels) * size, size + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, pts) in enumerate(panels):
        x0 = i * size
        draw.rectangle([x0 + 1, pad, x0 + size - 2, pad + size - 2], outline=(170, 170, 170))
        draw.text((x0 + 4, 3), title, fill="black", font=font)
        pts = np.asarray(pts)
        px = x0 + (pts[:, 0] + lim) / (2 * lim) * size
        py = pad + (lim - pts[:, 1]) / (2 * lim) * size
        keep = (px > x0 + 1) & (px < x0 + size - 3) & (py > pad + 1) & (py < pad + size - 3)
        for u, v in zip(px[keep], py[keep]):
            draw.rectangle([u, v, u + 1, v + 1], fill=(30, 60, 160))
    img.save(path)


# ------------------------------------------------------------------------------------------------
# The experiment plan and the tables
# ------------------------------------------------------------------------------------------------

def plan(steps, seeds):
    base = dict(steps=steps)
    runs = []
    for seed in seeds:
        for task in ("checkerboard", "8gaussians"):
            runs += [Run(task=task, method="tvm", seed=seed, **base), Run(task=task, method="fm", seed=seed, **base)]
        # Ablations on the checkerboard (the default TVM run above is the 0.99 / through-JVP arm)
        runs += [Run(task="checkerboard", seed=seed, target_ema=r, **base) for r in (0.0, 0.999)]
        runs += [Run(task="checkerboard", seed=seed, detach_jvp=True, **base)]
        # Scaled parameterisation at low w, class-conditional 8 Gaussians
        runs += [Run(task="8gaussians", seed=seed, conditional=True, w=1.5, scale_param=p, **base)
                 for p in (True, False)]
        # For scale: what Euler steps of a flow-matching model reach on the guided task
        runs += [Run(task="8gaussians", method="fm", seed=seed, conditional=True, w=1.5, **base)]
    return runs


def mean_spread(values):
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def tables(results, floors, n_seeds):
    """Markdown tables and CSV rows from the per-run results."""
    def pick(**kw):
        return [r for r in results if all(r["run"][k] == v for k, v in kw.items())]

    default = dict(target_ema=0.99, detach_jvp=False, conditional=False)
    md, rows = [], []
    md.append(f"### TVM vs flow matching, 2-D (sliced W2 to held-out data, lower is better; mean ± std over "
              f"{n_seeds} seed{'s' if n_seeds > 1 else ''})\n")
    md.append("| task | data vs data (floor) | TVM 1 | TVM 2 | TVM 4 | FM 1 | FM 4 | FM 100 | train s/run TVM | FM |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for task in ("checkerboard", "8gaussians"):
        tv, fm = pick(task=task, method="tvm", **default), pick(task=task, method="fm", **default)
        cells = [mean_spread([r["sw2"][k] for r in tv]) for k in ("TVM 1", "TVM 2", "TVM 4")]
        cells += [mean_spread([r["sw2"][k] for r in fm]) for k in ("FM 1", "FM 4", "FM 100")]
        secs = [f"{np.mean([r['train_seconds'] for r in rs]):.0f}" for rs in (tv, fm)]
        md.append(f"| {task} | {floors[task]:.3f} | " + " | ".join(cells) + " | " + " | ".join(secs) + " |")
        for r in tv + fm:
            for k, v in r["sw2"].items():
                rows.append(dict(table="tvm_vs_fm", task=task, variant=r["run"]["method"], sampler=k,
                                 seed=r["run"]["seed"], sw2=v))

    md.append(f"\n### Ablations (sliced W2, mean ± std over {n_seeds} seeds; the paper's claim in the last column)\n")
    md.append("| ablation | task (floor) | setting | TVM 1 | TVM 2 | final terminal loss | train s/run | paper (ImageNet-256 1-NFE FID) |")
    md.append("|---|---|---|---|---|---|---|---|")
    cb, g8 = f"checkerboard ({floors['checkerboard']:.3f})", f"8 Gaussians, 8 classes ({floors['8gaussians, w = 1.5']:.3f})"
    arms = [("target EMA", cb, "0", dict(target_ema=0.0), "Table 4b: 10.24"),
            ("target EMA", cb, "0.99 (default)", dict(target_ema=0.99), "4.90 (best)"),
            ("target EMA", cb, "0.999", dict(target_ema=0.999), "6.04"),
            ("JVP gradient", cb, "through the JVP (default)", dict(detach_jvp=False), "Sec. 7.4: the exact gradient"),
            ("JVP gradient", cb, "detached", dict(detach_jvp=True), "biased, 27% faster step; no FID given"),
            ("scaled param., w = 1.5", g8, "on", dict(scale_param=True), "Table 4c: 6.04 (2-NFE 4.60)"),
            ("scaled param., w = 1.5", g8, "off", dict(scale_param=False), "9.32 (2-NFE 7.02)")]
    for ablation, task, setting, kw, paper in arms:
        sel = dict(default, **kw)
        if ablation.startswith("scaled"):
            sel.update(conditional=True, w=1.5)
            rs = pick(task="8gaussians", method="tvm", **sel)
        else:
            rs = pick(task="checkerboard", method="tvm", **sel)
        cells = [mean_spread([r["sw2"][k] for r in rs]) for k in ("TVM 1", "TVM 2")]
        cells.append(" / ".join(f"{r['final_terms']['terminal']:.3g}" for r in rs))
        cells.append(f"{np.mean([r['train_seconds'] for r in rs]):.0f}")
        md.append(f"| {ablation} | {task} | {setting} | " + " | ".join(cells) + f" | {paper} |")
        for r in rs:
            for k in ("TVM 1", "TVM 2", "TVM 4"):
                rows.append(dict(table="ablation", task=task, variant=f"{ablation}: {setting}", sampler=k,
                                 seed=r["run"]["seed"], sw2=r["sw2"][k]))
    fm = pick(task="8gaussians", method="fm", conditional=True, w=1.5)
    if fm:
        md.append(f"\nFor scale on the guided task: flow matching, same network and budget, FM 1 = "
                  f"{mean_spread([r['sw2']['FM 1'] for r in fm])}, FM 4 = {mean_spread([r['sw2']['FM 4'] for r in fm])}, "
                  f"FM 100 = {mean_spread([r['sw2']['FM 100'] for r in fm])}. Final terminal loss: mean of the "
                  "last 10% of steps, per seed.")
        rows += [dict(table="guided_fm", task="8gaussians, 8 classes, w = 1.5", variant="fm", sampler=k,
                      seed=r["run"]["seed"], sw2=v) for r in fm for k, v in r["sw2"].items()]
    return "\n".join(md) + "\n", rows


# ------------------------------------------------------------------------------------------------
# The embedded digits (train.py's default job): FID of TVM and of the flow-matching baseline
# ------------------------------------------------------------------------------------------------

def train_digits(method, steps=None, device="cpu"):
    """train.py's digits run (its --res 0 preset: tiny DiT, w = 1.5, scaled param., batch 128, 1,000 steps;
    --digits runs DIGITS_STEPS = 1,500, the preset when evidence/digits.md was measured),
    with the full TVM loss or with the flow-matching term only. The loop is train.py's main() without
    checkpoints and logs, built from its pieces so that both methods share everything else.
    Returns (eval-EMA network, config, seconds)."""
    argv = ["--fid", "false", "--sample_every", "0", "--device", device] + (["--steps", str(steps)] if steps else [])
    cfg = parse_config(argv)
    data = DigitsData(cfg.data)
    cfg.in_channels, cfg.input_size, cfg.num_classes = data.shape[0], data.shape[1], data.num_classes
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    net = build_net(cfg).to(dev)
    ema, target = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
    model = tvm.TVMLoss(net, scale_param=cfg.scale_param, detach_jvp=cfg.detach_jvp, terminal=method == "tvm")
    opt = make_optimizer(net, cfg)
    sampler = EpochSampler(len(data), cfg.seed)
    t0 = time.time()
    for step in range(cfg.steps):
        batch = make_batch(data, sampler, cfg, step, 0, 1, dev, torch.float32)
        train_step(model, net, ema, target, opt, batch, cfg)
    return ema.eval(), cfg, time.time() - t0


def digits(out, n_fid=None, steps=None, device="cpu", n_real=None):
    """FID (fid.py, against all 1,797 real digits) of TVM with 1 and 4 jumps and of flow matching with 1
    and 50 Euler steps, n_fid samples each (default DIGITS_FID_SAMPLES) with balanced labels, plus a
    grid of each (digits.png)."""
    from PIL import Image
    t_start = time.time()
    n_fid = n_fid or DIGITS_FID_SAMPLES
    real = fid.dataset_images("digits")[:n_real]                                  # (1797, 8, 8, 3) uint8
    real_labels = DigitsData(parse_config([]).data).labels[:n_real]
    feats_real = fid.inception_features(real, device=device)
    # The floor: FID of n_fid real digits against the other real digits (the samples are scored against all).
    perm = np.random.default_rng(0).permutation(len(real))
    floor = fid.fid_from_features(feats_real[perm[:n_fid]], feats_real[perm[n_fid:]])
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((n_fid, 1, 8, 8), generator=g).to(device)
    y = (torch.arange(n_fid) % 10).to(device)
    res, seconds, grids = {}, {}, [("real", real, real_labels)]
    for method, step_counts in (("tvm", (1, 4)), ("fm", (1, 50))):
        net, cfg, seconds[method] = train_digits(method, steps, device)
        for n in step_counts:
            if method == "tvm":
                x0 = tvm.sample(net, x1, y, cfg.w, n, cfg.scale_param)
            else:
                x0 = euler_sample(net, x1, y, cfg.w, n, cfg.scale_param)
            images = to_uint8_images(x0, asdict(cfg))                       # (n_fid, 8, 8, 3)
            label = f"{method.upper()} {n}"
            res[label] = fid.fid_from_features(fid.inception_features(images, device=device), feats_real)
            grids.append((label, images, y.cpu().numpy()))
            print(f"  digits {label}: FID {res[label]:.2f}", flush=True)
    wall = time.time() - t_start

    # One grid per sampler: row c holds the first 10 images of class c, upscaled 3x (nearest).
    tiles = []
    for label, images, labels in grids:
        blank = np.full((10,) + images.shape[1:], 255, np.uint8)
        rows = [np.concatenate([images[labels == c][:10], blank])[:10] for c in range(10)]  # pad short rows
        block = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)     # (80, 80, 3)
        block = block.repeat(3, 0).repeat(3, 1)                                    # (240, 240, 3)
        tiles.append(np.pad(block, ((20, 4), (4, 4), (0, 0)), constant_values=255))
    img = Image.fromarray(np.concatenate(tiles, 1))
    from PIL import ImageDraw, ImageFont
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:
        font = ImageFont.load_default()
    for i, (label, _, _) in enumerate(grids):
        text = label if label == "real" else f"{label}: FID {res[label]:.1f}"
        draw.text((i * tiles[0].shape[1] + 4, 2), text, fill="black", font=font)
    img.save(os.path.join(out, "digits.png"))

    md = ["### The digits default (train.py --res 0): FID against the 1,797 real digits, lower is better\n",
          f"| {n_fid} real vs the other {len(real) - n_fid} real | TVM 1 | TVM 4 | FM 1 | FM 50 | train s TVM | FM |",
          "|---|---|---|---|---|---|---|",
          f"| {floor:.2f} | {res['TVM 1']:.2f} | {res['TVM 4']:.2f} | {res['FM 1']:.2f} | {res['FM 50']:.2f} | "
          f"{seconds['tvm']:.0f} | {seconds['fm']:.0f} |",
          f"\n{n_fid} samples per sampler (labels balanced), {cfg.steps} steps of batch {cfg.batch_size}, "
          f"w = {cfg.w}, seed {cfg.seed}. Wall time {wall / 60:.1f} min on {device} ({cpu_name()}, "
          f"{len(os.sched_getaffinity(0))} usable logical CPUs, torch {torch.__version__}). "
          f"Command: `python {' '.join(sys.argv)}`."]
    md = "\n".join(md) + "\n"
    print("\n" + md)
    with open(os.path.join(out, "digits.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "digits.json"), "w") as f:
        json.dump(dict(fid=res, floor=floor, train_seconds=seconds, wall_seconds=wall, n_fid=n_fid,
                       steps=cfg.steps, device=device, command=" ".join(sys.argv)), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="evidence.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, one seed: checks the pipeline in ~1 min")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 2500; quick 300; "
                    f"--digits {DIGITS_STEPS}, as evidence/digits.json records)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; quick 1)")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes, one thread each")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--digits", action="store_true", help="run only the digits comparison (FID; slow on a CPU)")
    ap.add_argument("--fid_samples", type=int, default=None, help=f"digits: samples per sampler (default {DIGITS_FID_SAMPLES}, as "
                    "evidence/digits.json records; quick 20)")
    ap.add_argument("--fid-samples", dest="fid_samples", type=int, default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)   # the spelling of earlier versions, still accepted
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="digits only")
    args = ap.parse_args(argv)
    # None is "the preset"; any number given is used as it is, so 0 or less is refused (it silently became the
    # preset through `args.steps or ...`, and --steps -5 ended in an IndexError)
    for option, value, least in (("--steps", args.steps, 1), ("--seeds", args.seeds, 1), ("--workers", args.workers, 1),
                                 ("--fid_samples", args.fid_samples, 2)):
        if value is not None and value < least:
            ap.error(f"{option} {value}: expected a whole number >= {least}"
                     + (" (FID needs 2 samples for a covariance)" if least == 2 else "")
                     + "; leave it out for the preset")
    blocker = file_in_the_way(args.out)
    if blocker:
        ap.error(f"--out {args.out}: {blocker} is a file, so the folder cannot be made there; give another --out")
    preset = lambda value, quick, full: value if value is not None else quick if args.quick else full
    fid.limit_cpu_threads(args.device if args.digits else "cpu")   # the 2-D runs are on the CPU
    if args.digits:
        os.makedirs(args.out, exist_ok=True)
        digits(args.out, n_fid=preset(args.fid_samples, 20, DIGITS_FID_SAMPLES),
               steps=preset(args.steps, 20, DIGITS_STEPS), device=args.device,
               n_real=40 if args.quick else None)
        return
    steps = preset(args.steps, 300, 2500)
    n_seeds = preset(args.seeds, 1, 3)
    os.makedirs(args.out, exist_ok=True)
    runs = plan(steps, range(n_seeds))
    print(f"{len(runs)} runs of {steps} steps on {args.workers} worker(s)", flush=True)

    t0 = time.time()
    results = []
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(do_run, runs):
                results.append(r)
                print(f"  [{time.time() - t0:6.0f} s] {r['name']}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in r["sw2"].items()), flush=True)
    else:
        for run in runs:
            results.append(do_run(run))
            print(f"  [{time.time() - t0:6.0f} s] {results[-1]['name']}: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in results[-1]["sw2"].items()), flush=True)
    floors = {task: data_floor(task) for task in TASKS}
    floors["8gaussians, w = 1.5"] = data_floor("8gaussians", 1.5)
    figures(results, args.out)
    wall = time.time() - t0

    md, rows = tables(results, floors, n_seeds)
    machine = (f"{cpu_name()}, {len(os.sched_getaffinity(0))} usable logical CPUs, "
               f"{args.workers} worker process(es) of one thread, torch {torch.__version__}")
    md += (f"\nWall time {wall / 60:.1f} min for {len(runs)} runs of {steps} steps, evaluation and figures included "
           f"({machine}). Command: `python {' '.join(sys.argv)}`.\n")
    print("\n" + md)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "sw2.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(wall_seconds=wall, machine=machine, steps=steps, seeds=n_seeds, floors=floors,
                       command=" ".join(sys.argv),
                       runs=[{k: v for k, v in r.items() if k != "samples"} for r in results]), f, indent=1)
    print(f"wrote {args.out}/: tables.md, sw2.csv, results.json, checkerboard.png, 8gaussians.png, "
          "8gaussians_guided.png")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def figures(results, out):
    """Scatter plots of seed 0: held-out data (or the exact guided flow), then each sampler."""
    def find(**kw):
        return next(r for r in results if r["run"]["seed"] == 0 and all(r["run"][k] == v for k, v in kw.items()))

    default = dict(conditional=False, target_ema=0.99, detach_jvp=False)
    for task in ("checkerboard", "8gaussians"):
        data, _ = TASKS[task](N_EVAL, np.random.default_rng(7))                 # the held-out set of evaluate()
        panels = [("held-out data", data[:2000])]
        for method in ("tvm", "fm"):
            r = find(task=task, method=method, **default)
            panels += [(f"{k}: SW2 {r['sw2'][k]:.3f}", np.array(v)) for k, v in r["samples"].items()]
        scatter_grid(panels, os.path.join(out, f"{task}.png"))
    rng = np.random.default_rng(7)
    _, y = TASKS["8gaussians"](N_EVAL, rng)
    panels = [("exact guided flow, w = 1.5", guided_reference(rng.standard_normal((N_EVAL, 2)), y, 1.5)[:2000])]
    for p in (True, False):
        r = find(conditional=True, scale_param=p)
        panels += [(f"{'scaled' if p else 'plain'} {k}: SW2 {r['sw2'][k]:.3f}", np.array(v))
                   for k, v in r["samples"].items() if k != "TVM 4"]
    scatter_grid(panels, os.path.join(out, "8gaussians_guided.png"))


if __name__ == "__main__":
    main()
