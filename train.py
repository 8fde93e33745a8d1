r"""
Train a Terminal Velocity Matching model (arXiv 2511.19797, Algorithm 1), from a laptop demo to
ImageNet-512 on several nodes. The method itself lives in tvm.py; this file is data, the loop,
checkpoints and logs.

The embedded demo: 1,797 8x8 handwritten digits (data/digits.npz), a tiny DiT, CPU, about 10 minutes:
$ python train.py

ImageNet at 256 or 512 px (one folder of images per class; encoded once into SD-VAE latents, cached
beside the folder), one GPU:
$ python train.py --res 256 --data /path/to/imagenet/train
N GPUs of one machine:
$ torchrun --standalone --nproc_per_node=8 train.py --res 256 --data /path/to/imagenet/train
Several machines (run on each, node_rank 0..nnodes-1):
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --master_addr=HOST0 --master_port=29500 \
      train.py --res 512 --data /path/to/imagenet/train
Continue a stopped run (same --out):
$ python train.py --res 256 --data ... --resume
Only encode the folder (before a multi-node run, say): add --steps 0.

Every field of TrainConfig is a command-line option (--batch_size 256 --lr 2e-4 --grad_clip 1.0 ...);
`python train.py --help` lists them. Fields left unset take the preset of their --res (PRESETS).
The run folder (--out) gets ckpt.pt (and ckpt.prev.pt, the one before it), log.jsonl and
samples_<step>.png grids (rows: classes; left: 1-step samples, right: 4-step samples); for the digits,
the log ends with the FID of 1- and 4-step samples (fid.py; --fid false skips it). One run at a time
per folder (a lock); Ctrl-C saves a checkpoint before stopping, and --resume continues from it.
"""

import argparse
import copy
import dataclasses
import errno
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import attention_jvp
import tvm

try:
    import fcntl          # the run-folder lock (POSIX)
except ImportError:
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainError(Exception):
    """A problem the person running train.py can fix; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Configuration: one dataclass; every field is a command-line option; None = take the --res preset
# ------------------------------------------------------------------------------------------------

def _opt(default, help):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclass
class TrainConfig:
    # data
    res: int = _opt(0, "0: the embedded 8x8 digits (pixels); 256 or 512: ImageNet as SD-VAE latents")
    data: str = _opt(None, "res 0: digits.npz; else an image folder (ImageNet layout) or a latents.npy")
    latent_cache: str = _opt("", "where an image folder is encoded to; '' = beside it, <data>_latents<res>")
    out: str = _opt(None, "run folder: ckpt.pt, ckpt.prev.pt, log.jsonl, samples_*.png; one run at a time")
    # network (tvm.DIT_CONFIGS name, or "tiny"); depth/hidden_size/num_heads: 0 = the named model's
    model: str = _opt(None, "network: a tvm.DIT_CONFIGS name (XL/2-18h, B/2, ...) or tiny")
    depth: int = _opt(0, "transformer blocks; 0 = the --model's")
    hidden_size: int = _opt(0, "width; 0 = the --model's")
    num_heads: int = _opt(0, "attention heads, must divide hidden_size; 0 = the --model's")
    # the TVM loss (Eq. 15)
    w: float = _opt(None, "guidance weight, constant (Table 4a): 2.0 at 256, 2.5 at 512; > 0")
    w_max: float = _opt(0.0, "> w: random guidance, beta = 1/w ~ U(1/w_max, 1/w); 0 = constant w")
    label_dropout: float = _opt(0.1, "probability of dropping the class label (the unconditional branch), in [0, 1]")
    scale_param: bool = _opt(None, "scaled parameterisation f = (s-t) w F; Table 6: off for the 512 w=2.5 run")
    time_spectral_init: bool = _opt(None, "spectral init of the t / gap / w embedders; Table 6: yes for im256 "
                                          "w=2 and im512 w=2.25, N(0, 0.02) for im256 w=1.75 and im512 w=2.5")
    detach_jvp: bool = _opt(False, "cheaper, biased variant of Sec. 7.4: no gradient through the JVP")
    jvp: str = _opt("auto", "d/ds F by: auto (manual for the DiT) | func (torch.func.jvp) | manual "
                            "(tvm.DiT.forward_jvp, the tangent carried by hand; equal in float64)")
    target_ema: float = _opt(0.99, "theta*: EMA rate of the teacher in the loss (Table 4b), in [0, 1]")
    ema: float = _opt(None, "theta**: EMA rate of the evaluated and sampled weights, in [0, 1]; 0.9999 in the paper")
    # optimisation (Table 6): AdamW, constant lr, no warm-up
    steps: int = _opt(None, "training steps (a resumed run continues to this many); 0 with an image folder: "
                            "only encode it")
    batch_size: int = _opt(None, "global batch: all GPUs and all accumulation rounds together")
    micro_batch: int = _opt(0, "samples per forward on one GPU; 0 = its whole share (no accumulation)")
    lr: float = _opt(None, "AdamW learning rate, constant; applied on --resume too")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2; not 0.999: the terminal loss fluctuates with it (Fig. 5)")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay")
    adam_eps: float = _opt(1e-8, "AdamW epsilon, > 0")
    grad_clip: float = _opt(None, "max global gradient norm, 0 = off; the official 512 configs use 1.0")
    precision: str = _opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32 | fp64")
    # bookkeeping
    seed: int = _opt(0, "seed of the initial weights and of every step's batch")
    device: str = _opt("auto", "auto | cpu | cuda")
    log_every: int = _opt(None, "write a log.jsonl row every N steps")
    sample_every: int = _opt(None, "sample grid every N steps (and at the end); 0 = never")
    ckpt_every: int = _opt(None, "checkpoint every N steps (and at the end)")
    ckpt_minutes: float = _opt(10.0, "also checkpoint when this many minutes have passed since the last save; "
                                     "0 = off. Ctrl-C or SIGTERM saves too")
    resume: bool = _opt(False, "continue from <out>/ckpt.pt")
    fid: bool = _opt(True, "digits only: FID of 1- and 4-step samples at the end (fid.py)")
    fid_samples: int = _opt(250, "generated samples per step count for that FID ...")
    fid_real: int = _opt(500, "... against this many real digits (a fixed random subset)")
    vae: str = _opt("stabilityai/sd-vae-ft-ema", "the SD-VAE: a Hugging Face name or a local folder")
    workers: int = _opt(8, "image-decoding processes while encoding latents")
    attention: str = _opt("auto", "auto (the kernel on GPUs) | triton | reference: attention_jvp.use_backend")
    compile: bool = _opt(None, "torch.compile each DiT block (tvm.DiT.compile_blocks); on at 256 and 512 (measured "
                               "1.7x faster on an H100, README), off for the CPU demo. Needs --jvp manual/auto")
    checkpoint_blocks: bool = _opt(False, "recompute block activations in the backward: ~1/3 of the memory, ~1.5x "
                                          "the time (measured, README); needs --jvp manual/auto")
    cuda_graph: bool = _opt(None, "replay the whole step as one CUDA graph (CudaGraphStep); default: on for one "
                                  "process on a GPU, off otherwise (DDP's all-reduce is not captured)")
    benchmark: bool = _opt(False, "time the TVM and flow-matching steps on random latents, then exit")
    bench_check: bool = _opt(True, "before timing, check every path's loss and gradient (check_step_paths)")
    bench_cases: str = _opt("", "e.g. 'XL/2-18h:256:32,B/2:256:32' (model:px:batch); '' = BENCH_CASES")
    bench_memory_gib: float = _opt(0.0, "cap the GPU memory the benchmark may use (e.g. 80 on a 141 GB H200); 0 = all")
    bench_profile: bool = _opt(False, "after timing each step, print its kernel time by kind (torch.profiler, one eager step)")
    # filled in from the data, not by hand
    input_size: int = 0
    in_channels: int = 0
    num_classes: int = 0


TINY = dict(hidden_size=64, depth=4, num_heads=4, patch_size=2)   # the digits model, 0.37M parameters
MODELS = dict(tvm.DIT_CONFIGS, tiny=TINY)

PRESETS = {
    # The embedded demo, sized for ~10 minutes on 2 CPU cores (~0.4 s per step, then ~2 min of FID).
    # Eval EMA 0.99, not the paper's 0.9999: over 1,000 steps a slow EMA still carries the early
    # weights (0.999 gives visibly noisy digits).
    0: dict(model="tiny", compile=False, w=1.5, scale_param=True, time_spectral_init=True, ema=0.99, steps=1000, batch_size=128, lr=1e-3,
            grad_clip=0.0, log_every=25, sample_every=500, ckpt_every=500),
    # Table 6. Gradient clipping at 1.0 is in the official 512 configs only, not in the paper.
    256: dict(model="XL/2-18h", compile=True, w=2.0, scale_param=True, time_spectral_init=True, ema=0.9999, steps=300_000, batch_size=2048,
              lr=1e-4, grad_clip=0.0, log_every=100, sample_every=10_000, ckpt_every=2_000),
    512: dict(model="XL/2-18h", compile=True, w=2.5, scale_param=False, time_spectral_init=False, ema=0.9999, steps=300_000, batch_size=2048,
              lr=1e-4, grad_clip=1.0, log_every=100, sample_every=10_000, ckpt_every=2_000),
}

# Fields that define the network and its data; a checkpoint can only continue a run that agrees on them.
# scale_param too: it changes what the stored F means (w F or F).
STRUCTURAL = ("res", "model", "depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_classes",
              "scale_param")


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(argv=None):
    """Command line -> TrainConfig with the --res preset filled in and every value checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    derived = ("input_size", "in_channels", "num_classes")
    types = {bool: _parse_bool, int: int, float: float, str: str}
    for f in dataclasses.fields(TrainConfig):
        if f.name in derived:
            continue
        default = "from the --res preset" if f.default is None else repr(f.default)
        text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        if f.type is bool:  # "--resume" alone means true
            p.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=None, help=text)
        else:
            p.add_argument(f"--{f.name}", type=types[f.type], default=None, help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return resolve(TrainConfig(**given))


def resolve(cfg):
    """Fill in the --res preset, then check every value once: all problems are reported together."""
    if cfg.res not in PRESETS:
        raise TrainError(f"--res {cfg.res} is not supported: use 0 (the embedded digits), 256 or 512 "
                         "(LATENT_STATS, the per-channel SD-VAE latent statistics, exist for these two only)")
    if cfg.benchmark and cfg.compile is None:   # the benchmark times the ImageNet recipes' step
        cfg.compile = PRESETS[256]["compile"]
    for k, v in PRESETS[cfg.res].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.data is None:
        if cfg.res != 0:
            raise TrainError(f"--res {cfg.res} needs --data: an image folder in ImageNet layout "
                             "(DIR/<class>/<image>.JPEG) or a latents.npy written by an earlier run")
        cfg.data = os.path.join(HERE, "data", "digits.npz")
    if cfg.out is None:
        cfg.out = os.path.join("runs", "digits" if cfg.res == 0 else f"in{cfg.res}")
    if cfg.model not in MODELS:
        raise TrainError(f"--model {cfg.model!r} is unknown; choose one of {sorted(MODELS)}")
    for k in ("depth", "hidden_size", "num_heads"):   # explicit in the config, hence in checkpoints
        setattr(cfg, k, getattr(cfg, k) or MODELS[cfg.model][k])
    errors = config_errors(cfg)
    if len(errors) == 1:
        raise TrainError(errors[0])
    if errors:
        raise TrainError(f"{len(errors)} problems with the options:\n  " + "\n  ".join(errors))
    return cfg


def config_errors(cfg):
    """-> one sentence per bad value of a resolved config (empty if all are good)."""
    errors = []

    def need(ok, name, rule):
        if not ok:
            errors.append(f"--{name} {getattr(cfg, name)!r}: {rule}")

    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)   # noqa: E731
    for k in ("batch_size", "depth", "hidden_size", "num_heads", "log_every", "ckpt_every"):
        need(getattr(cfg, k) >= 1, k, "must be a positive integer")
    for k in ("micro_batch", "sample_every", "workers", "seed"):
        need(getattr(cfg, k) >= 0, k, "must be 0 or a positive integer")
    for k in ("fid_samples", "fid_real"):
        need(getattr(cfg, k) >= 1 or not cfg.fid, k, "must be positive (or pass --fid false)")
    need(cfg.steps >= 1 or (cfg.steps == 0 and cfg.res != 0), "steps",
         "must be at least 1 (0 only encodes an image folder, which the digits do not need)")
    if cfg.hidden_size >= 1 and cfg.num_heads >= 1:
        need(cfg.hidden_size % cfg.num_heads == 0, "num_heads",
             f"must divide --hidden_size {cfg.hidden_size} (each head gets hidden_size / num_heads channels)")
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "must be a positive finite number, e.g. 1e-4")
    need(finite(cfg.w) and cfg.w > 0, "w", "the guidance weight must be a positive finite number (1 = no guidance)")
    need(cfg.w_max == 0 or (finite(cfg.w_max) and cfg.w_max > 0), "w_max", "must be 0 (constant w) or a finite "
         "number above --w")
    for k in ("ema", "target_ema", "label_dropout"):
        need(finite(getattr(cfg, k)) and 0 <= getattr(cfg, k) <= 1, k, "must lie in [0, 1]")
    for k in ("beta1", "beta2"):
        need(finite(getattr(cfg, k)) and 0 <= getattr(cfg, k) < 1, k, "must lie in [0, 1)")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "must be 0 or a positive finite number")
    need(finite(cfg.adam_eps) and cfg.adam_eps > 0, "adam_eps", "must be a positive finite number: with 0 a "
         "parameter whose gradient is 0 gets the update 0/0 = NaN")
    need(finite(cfg.grad_clip) and cfg.grad_clip >= 0, "grad_clip", "must be 0 (off) or a positive finite norm")
    need(finite(cfg.ckpt_minutes) and cfg.ckpt_minutes >= 0, "ckpt_minutes", "must be 0 (off) or a positive "
         "finite number of minutes")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "expected auto, cpu or cuda")
    need(cfg.precision in ("auto", "bf16", "fp32", "fp64"), "precision", "expected auto, bf16, fp32 or fp64")
    need(cfg.jvp in tvm.JVP_METHODS, "jvp", f"expected one of {', '.join(tvm.JVP_METHODS)}")
    if cfg.checkpoint_blocks and cfg.jvp == "func":
        errors.append("--checkpoint_blocks needs --jvp manual (or auto): activation checkpointing under "
                      "torch.func.jvp fails in the backward")
    if cfg.compile and cfg.jvp == "func":
        errors.append("--compile needs --jvp manual (or auto): torch.compile cannot trace torch.func.jvp "
                      "through the attention kernel's custom forward-mode rule. With --jvp func, pass "
                      "--compile false")
    return errors


def prepare_net(net, cfg):
    """Apply the speed options that change how the network runs, not what it computes."""
    net.checkpoint_blocks = cfg.checkpoint_blocks
    if cfg.compile:
        net.compile_blocks()
    return net


def model_kwargs(cfg):
    """The DiT's size: the named preset with any of depth / hidden_size / num_heads overridden."""
    cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    kw = dict(MODELS[cfg["model"]])
    kw.update({k: cfg[k] for k in ("depth", "hidden_size", "num_heads") if cfg[k]})
    if cfg.get("time_spectral_init") is not None:     # absent from older checkpoints: tvm.DiT's default
        kw["time_spectral_init"] = cfg["time_spectral_init"]
    return kw


def build_net(cfg):
    cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return tvm.build_dit(model_kwargs(cfg), cfg["input_size"], cfg["in_channels"], cfg["num_classes"])


# ------------------------------------------------------------------------------------------------
# Data. Digits: pixels in memory. ImageNet: SD-VAE latents, memory-mapped from a .npy file.
# ------------------------------------------------------------------------------------------------

# Per-channel statistics of raw SD-VAE (ft-ema) latents, from IMM (paper-notes §7). Training data is
# x0 = (z - mean) / std, with unit final std; decoding inverts it before the VAE.
LATENT_STATS = {
    256: dict(mean=[0.865, -0.278, 0.216, 0.374], std=[4.855, 5.319, 3.937, 3.987]),
    512: dict(mean=[1.56, -0.695, 0.483, 0.729], std=[5.27, 5.91, 4.21, 4.31]),
}


def _stats(res, device, dtype):
    st = LATENT_STATS[res]
    return (torch.tensor(st["mean"], device=device, dtype=dtype)[None, :, None, None],
            torch.tensor(st["std"], device=device, dtype=dtype)[None, :, None, None])


def check_labels(labels, num_classes, path):
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TrainError(f"{path}: {int(bad.sum())} label(s) outside 0..{num_classes - 1} (the first: {labels[i]} at "
                         f"row {i}); labels index the classes, 0 to num_classes - 1. Fix or re-create the labels")


class DigitsData:
    """The 1,797 8x8 digits of UCI "Optical Recognition of Handwritten Digits" (values 0..16, labels
    0..9), as pixels in [-1, 1]: x0 = v / 8 - 1. Small enough to hold in memory on every rank."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise TrainError(f"--data {path}: no such file. The digits ship with the project as "
                             "data/digits.npz; restore it with `git checkout data/digits.npz`")
        d = np.load(path)
        self.images = torch.from_numpy(d["images"].astype(np.float32) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8)
        self.labels = d["labels"].astype(np.int64)                                          # (N,)
        self.num_classes = int(self.labels.max()) + 1
        check_labels(self.labels, self.num_classes, path)
        self.shape = tuple(self.images.shape[1:])
        self.posterior = False

    def __len__(self):
        return len(self.labels)

    def load(self, idx):  # idx (n,) numpy -> (n, 1, 8, 8)
        return self.images[torch.from_numpy(idx)]


class LatentData:
    """SD-VAE latents of an image folder: latents.npy (N, 8, h, w) float16, the posterior mean and std of
    each image (N, 4, h, w: fixed latents), with labels.npy (N,) and meta.json beside it. Memory-mapped:
    each rank reads only the rows of its share of the batch. Latents are raw VAE latents; the posterior
    sample mean + std * eps is drawn afresh at every step, as in the official code (paper-notes §7)."""

    def __init__(self, path, res):
        if os.path.isdir(path):
            path = os.path.join(path, "latents.npy")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise TrainError(f"--data {path}: no such latent file. Pass an image folder to encode it, or the "
                             "latents.npy (or its folder) that an earlier run wrote")
        labels_path = os.path.join(folder, "labels.npy")
        if not os.path.isfile(labels_path):
            raise TrainError(f"{path} has no labels.npy beside it: the latents and their class labels "
                             f"(int64, shape (N,)) must sit in the same folder {folder}")
        redo = "Encode the images again: pass the image folder as --data"
        try:
            self.moments = np.load(path, mmap_mode="r")
        except ValueError as e:   # object arrays cannot be memory-mapped; a truncated file is shorter than its header says
            raise TrainError(f"{path} is not a usable latent file ({e}): it is truncated (an interrupted copy?) "
                             f"or holds Python objects instead of numbers. {redo}") from None
        if self.moments.dtype.kind != "f":
            raise TrainError(f"{path} holds {self.moments.dtype} values; latents are float16 (or float32). {redo}")
        try:
            labels = np.load(labels_path)
        except ValueError as e:
            raise TrainError(f"{labels_path} is not a usable label file ({e}). {redo}") from None
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise TrainError(f"{labels_path} holds {labels.dtype} values of shape {labels.shape}; expected integer "
                             f"class labels, shape (N,). {redo}")
        self.labels = labels.astype(np.int64)
        h = res // 8
        if self.moments.ndim != 4 or self.moments.shape[1] not in (4, 8) or self.moments.shape[2:] != (h, h):
            found = "x".join(map(str, self.moments.shape[1:]))
            guess = (f" These look like latents for --res {self.moments.shape[-1] * 8}: pass that --res, or"
                     if self.moments.ndim == 4 and self.moments.shape[1] in (4, 8) else
                     " 3 channels: these look like images, not SD-VAE latents;"
                     if self.moments.ndim == 4 and self.moments.shape[1] == 3 else "")
            raise TrainError(f"{path} holds latents of shape {found} per image, but --res {res} needs "
                             f"4x{h}x{h} (or 8x{h}x{h}: posterior mean and std).{guess} encode the images "
                             f"again for --res {res} by passing the image folder as --data")
        if len(self.labels) != len(self.moments):
            raise TrainError(f"{labels_path} has {len(self.labels)} labels for {len(self.moments)} latents; "
                             "re-encode the folder (delete the latent folder and pass the images as --data)")
        meta_path = os.path.join(folder, "meta.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        self.num_classes = int(meta.get("num_classes", self.labels.max() + 1))
        check_labels(self.labels, self.num_classes, labels_path)
        self.posterior = self.moments.shape[1] == 8
        self.shape = (4, h, h)
        self.res = res

    def __len__(self):
        return len(self.labels)

    def load(self, idx):  # idx (n,) numpy -> (n, 8 or 4, h, w) float32; sorted reads are faster on disk
        order = np.argsort(idx)
        rows = np.empty((len(idx),) + self.moments.shape[1:], dtype=np.float32)
        rows[order] = self.moments[idx[order]]
        return torch.from_numpy(rows)

    def to_x0(self, raw, eps):
        """Raw rows on the device -> normalised latents x0. eps: (n, 4, h, w) posterior noise."""
        z = raw[:, :4] + raw[:, 4:] * eps if self.posterior else raw
        mean, std = _stats(self.res, raw.device, raw.dtype)
        return (z - mean) / std


class EpochSampler:
    """The global batch of step k is a pure function of (seed, k): the k-th block of batch_size entries
    in a sequence of per-epoch random permutations. No state to save; every rank computes the same
    global indices and takes its own slice, whatever the number of ranks."""

    def __init__(self, n, seed):
        self.n, self.seed, self.cache = n, seed, {}

    def perm(self, epoch):
        if epoch not in self.cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.cache = {e: p for e, p in self.cache.items() if e == epoch - 1}   # keep one epoch back
            self.cache[epoch] = torch.randperm(self.n, generator=g).numpy()
        return self.cache[epoch]

    def batch(self, step, batch_size):  # -> (batch_size,) dataset indices
        pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        epoch, i = pos // self.n, pos % self.n
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epoch):
            out[epoch == e] = self.perm(int(e))[i[epoch == e]]
        return out


def make_batch(data, sampler, cfg, step, rank, world, device, dtype):
    """One rank's share of step `step`'s batch, split into micro-batches of tvm.LossInputs.

    Everything random (posterior noise, x1, times, label dropout) is drawn for the *global* batch from a
    generator seeded by (seed, step), identically on every rank, and then sliced. So the global batch
    does not depend on the number of ranks or micro-batches: 2 GPUs compute the same step as 1, and a
    resumed run the same steps as an uninterrupted one. Only the data rows are read per rank.
    """
    B = cfg.batch_size
    Br = B // world
    lo, hi = rank * Br, (rank + 1) * Br
    g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
    idx = sampler.batch(step, B)                                                 # (B,)
    y = torch.from_numpy(data.labels[idx]).to(device)                            # (B,), cheap for all
    x0 = torch.zeros((B,) + data.shape, device=device, dtype=dtype)              # (B, C, H, W)
    raw = data.load(idx[lo:hi]).to(device, dtype)
    if isinstance(data, LatentData):
        eps = torch.randn((B,) + data.shape, generator=g, device=device, dtype=dtype)[lo:hi]
        raw = data.to_x0(raw, eps)
    x0[lo:hi] = raw
    w_range = (cfg.w, cfg.w_max) if cfg.w_max > cfg.w else None
    inputs = tvm.sample_loss_inputs(x0, y, data.num_classes, w=cfg.w, w_range=w_range,
                                    label_dropout=cfg.label_dropout, generator=g).slice(lo, hi)
    mb = cfg.micro_batch or Br
    return [inputs.slice(i, i + mb) for i in range(0, Br, mb)]


# ------------------------------------------------------------------------------------------------
# Encoding an image folder into SD-VAE latents (once; resumable)
# ------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def scan_image_folder(root):
    """ImageNet layout: root/<class>/<image>. -> (files, labels (N,) int64, class names)."""
    if not os.path.isdir(root):
        raise TrainError(f"--data {root}: no such folder. Expected an image folder in ImageNet layout "
                         f"({root}/<class>/<image>.JPEG) or a latents.npy written by an earlier run")
    # Hidden folders (.ipynb_checkpoints, .git, ...) are not classes, nor hidden files images.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise TrainError(f"--data {root} has no class sub-folders. Expected {root}/<class>/<image>.JPEG, "
                         "one folder per class (for one class, put all images in one sub-folder)")
    files, labels = [], []
    for c, name in enumerate(classes):
        imgs = sorted(e.path for e in os.scandir(os.path.join(root, name))
                      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTS))
        if not imgs:
            raise TrainError(f"class folder {os.path.join(root, name)} holds no images ({', '.join(IMAGE_EXTS)}): "
                             "add images or remove the folder (every folder is a class)")
        files += imgs
        labels += [c] * len(imgs)
    return files, np.array(labels, dtype=np.int64), classes


def center_crop(img, res):
    """ADM's preprocessing (guided-diffusion center_crop_arr), used by DiT and TVM: box-downsample by 2
    while possible, bicubic-resize the short side to res, crop the centre. -> (res, res, 3) uint8."""
    from PIL import Image
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


def to_rgb8(img):
    """A PIL image -> 8-bit RGB. convert("RGB") clips 16-bit greyscale (modes I;16*, and I as older Pillow
    opens 16-bit PNGs) to 255, whitening almost every pixel: scale those by 1/257 (65535 -> 255) first.
    Other 32-bit and float images have no agreed range: refused."""
    from PIL import Image
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        arr = np.asarray(img).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"mode {img.mode} with values outside 0..65535")
        img = Image.fromarray(np.round(arr / 257).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels (mode {img.mode}) "
                         "have no agreed range; convert the image to 8- or 16-bit")
    return img.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files, res):
        self.files, self.res = files, res

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as img:
                arr = center_crop(to_rgb8(img), self.res)
        except Exception as e:
            # Deleting the file would change the list of images, which the unfinished encoding is bound
            # to (encode_image_folder): replacing it keeps the work done.
            raise TrainError(f"cannot read image {self.files[i]} ({type(e).__name__}: {e}). Replace it with a "
                             "readable image of the same name and run again: encoding resumes where it stopped. "
                             "(Deleting it changes the list of images, so the encoding would start over: then "
                             "delete the latent folder too.)") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i     # (3, res, res) uint8


def reserve_disk(path):
    """Allocate every block of the file at `path` (posix_fallocate). -> None, or the OSError of a full
    disk. Other failures (a file system without fallocate) are ignored: the free-space check must do."""
    if not hasattr(os, "posix_fallocate"):
        return None
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return e
    return None


def encode_image_folder(root, cache, res, encoder, batch=64, workers=8, rank=0, world=1, device="cpu",
                        flush_every=100):
    """Encode root/<class>/<image> into cache/{latents.npy, labels.npy, meta.json}.

    encoder: (n, 3, res, res) in [-1, 1] -> (n, 8, res/8, res/8) posterior mean and std (VAE.encode).
    Work is split in chunks of `batch` images, shared round-robin by the ranks. Every `flush_every`
    chunks the rows are flushed to disk and only then marked in done.npy, so after an interruption (or
    with another number of GPUs) the next run encodes only what is missing. meta.json is written last: it marks the cache
    as complete.
    """
    meta_path = os.path.join(cache, "meta.json")
    if os.path.isfile(meta_path):
        return cache
    files, labels, classes = scan_image_folder(root)
    n, h = len(files), res // 8
    chunks = [(a, min(a + batch, n)) for a in range(0, n, batch)]
    lat_path, done_path = os.path.join(cache, "latents.npy"), os.path.join(cache, "done.npy")
    # Row i of the latents is files[i]: the unfinished encoding is bound to this exact list of images.
    listing = hashlib.sha1("\n".join(os.path.relpath(f, root) for f in files).encode()).hexdigest()[:16]
    info = dict(res=res, num_images=n, num_classes=len(classes), batch=batch, files_sha1=listing)
    if rank == 0:
        os.makedirs(cache, exist_ok=True)
        info_path = os.path.join(cache, "encoding.json")
        known = json.load(open(info_path)) if os.path.isfile(info_path) else info
        known.setdefault("files_sha1", listing)   # recorded before the fingerprint existed: trust the count
        if known != info:
            old = known
            what = (f"--res {old.get('res')} (now {res})" if old.get("res") != res else
                    f"another list of images ({old.get('num_images')} then, {n} now: files were added, removed "
                    "or renamed since)")
            raise TrainError(f"{cache} holds an unfinished encoding of {root} with {what}: its rows no longer "
                             f"match the images. Delete {cache} and run again (the encoding starts over)")
        if not os.path.isfile(info_path):
            need = n * 8 * h * h * 2                               # float16 rows
            free = shutil.disk_usage(cache).free
            if free < need + 2 ** 20:
                raise TrainError(f"not enough disk space for the latents of {root}: {cache} needs "
                                 f"{need / 2 ** 30:.2f} GiB, {free / 2 ** 30:.2f} GiB is free. Free some space or "
                                 "pass --latent_cache on another disk")
            np.lib.format.open_memmap(lat_path, mode="w+", dtype=np.float16, shape=(n, 8, h, h)).flush()
            # open_memmap makes a sparse file; writing into it on a full disk kills the process with
            # SIGBUS ("Bus error"). Reserve its blocks now, so a full disk is an error here instead.
            if reserve_disk(lat_path) is not None:
                os.remove(lat_path)
                raise TrainError(f"the disk is full: could not reserve {need / 2 ** 30:.2f} GiB for {lat_path}. "
                                 "Free some space or pass --latent_cache on another disk")
            np.save(done_path, np.zeros(len(chunks), dtype=np.uint8))
            np.save(os.path.join(cache, "labels.npy"), labels)
            json.dump(info, open(info_path, "w"))
    if world > 1:
        dist.barrier()
    lat = np.load(lat_path, mmap_mode="r+")
    done = np.load(done_path, mmap_mode="r+")
    todo = [c for c in range(len(chunks)) if c % world == rank and not done[c]]
    loader = torch.utils.data.DataLoader(ImageFiles(files, res), batch_sampler=[range(*chunks[c]) for c in todo],
                                         num_workers=workers)
    pending = []
    for (imgs, idx), c in zip(tqdm(loader, desc=f"encoding {root} -> {cache}", disable=rank != 0), todo):
        x = imgs.to(device).float() / 127.5 - 1.0                                # (n, 3, res, res)
        lat[chunks[c][0]:chunks[c][1]] = encoder(x).float().cpu().numpy().astype(np.float16)
        pending.append(c)
        if len(pending) == flush_every or c == todo[-1]:
            lat.flush()
            done[pending] = 1
            done.flush()
            pending = []
    if world > 1:
        dist.barrier()
    if rank == 0:
        if not np.all(np.load(done_path)):
            raise TrainError(f"encoding of {root} is incomplete; run again to finish it")
        _atomic_write_text(meta_path, json.dumps(dict(info, classes=classes, root=os.path.abspath(root)), indent=1))
    if world > 1:
        dist.barrier()
    return cache


def open_data(cfg, rank, world, device):
    if cfg.res == 0:
        return DigitsData(cfg.data)
    if not os.path.exists(cfg.data):
        raise TrainError(f"--data {cfg.data} does not exist. Expected an image folder in ImageNet layout "
                         f"({cfg.data}/<class>/<image>.JPEG) or a latents.npy written by an earlier run")
    if os.path.isdir(cfg.data) and not os.path.isfile(os.path.join(cfg.data, "latents.npy")):
        # An image folder: encode it once, or reuse its complete cache.
        cache = cfg.latent_cache or cfg.data.rstrip("/") + f"_latents{cfg.res}"
        if not os.path.isfile(os.path.join(cache, "meta.json")):
            scan_image_folder(cfg.data)           # a bad folder is reported before the VAE is loaded
            if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
                raise TrainError(f"{cfg.data} is not encoded yet ({cache} is missing or unfinished). Encode it "
                                 "on one machine first (train.py --res ... --data DIR --steps 0, with torchrun on "
                                 "its GPUs), put the latent folder where every machine sees it, then pass it as --data")
            vae = load_vae(device, cfg.vae)
            encode_image_folder(cfg.data, cache, cfg.res, vae.encode_moments, workers=cfg.workers,
                                rank=rank, world=world, device=device)
            del vae
        return LatentData(cache, cfg.res)
    return LatentData(cfg.data, cfg.res)


# ------------------------------------------------------------------------------------------------
# The VAE (SD-VAE ft-ema, through diffusers): only for encoding and for decoding samples
# ------------------------------------------------------------------------------------------------

class VAE:
    def __init__(self, name, device):
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise TrainError("the SD-VAE needs the `diffusers` package, used only to encode images and decode "
                             "samples: `pip install diffusers`. (Training from an existing latents.npy "
                             "with --sample_every 0 needs neither.)") from None
        try:
            self.vae = AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
        except Exception as e:
            raise TrainError(f"could not load the VAE weights {name!r} ({type(e).__name__}: {e}). diffusers "
                             f"downloads them from the Hugging Face Hub on first use; on a machine without "
                             f"network, fetch them elsewhere with `huggingface-cli download {name}` and pass "
                             f"the downloaded folder as --vae") from None

    @torch.no_grad()
    def encode_moments(self, img):  # (n, 3, H, W) in [-1, 1] -> (n, 8, H/8, W/8): posterior mean, std
        d = self.vae.encode(img).latent_dist
        return torch.cat([d.mean, d.std], dim=1)

    @torch.no_grad()
    def decode(self, z):  # (n, 4, h, w) raw latents -> (n, 3, 8h, 8w) in about [-1, 1]
        return self.vae.decode(z).sample


def load_vae(device, name="stabilityai/sd-vae-ft-ema"):
    return VAE(name, device)


@torch.no_grad()
def to_uint8_images(x0, config_dict, vae=None, batch=32):
    """Model samples -> uint8 (N, H, W, 3). Digits: pixels in [-1, 1], grey repeated to RGB. Latents:
    un-normalised with LATENT_STATS and decoded by the VAE (loaded here if not given).
    round((x + 1) * 127.5) equals EDM2's (x * 127.5 + 128).clip(0, 255).to(uint8)."""
    res = config_dict["res"]
    if res == 0:
        img = x0.float()
    else:
        vae = vae or load_vae(x0.device)
        dtype = next(vae.vae.parameters()).dtype
        mean, std = _stats(res, x0.device, torch.float32)
        z = x0.float() * std + mean
        img = torch.cat([vae.decode(z[i:i + batch].to(dtype)).float() for i in range(0, len(z), batch)])
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete, and loadable with weights_only=True
# ------------------------------------------------------------------------------------------------

def _write_atomically(path, write):
    """write(file object) into a fresh temporary file beside `path`, fsync, then rename it over `path`.
    The temporary name is unique (mkstemp: random, created with O_EXCL), so two writers never share
    one, and nothing planted at a predictable name (a symlink, say) can redirect the write. A rename is
    atomic: a kill at any moment leaves either the old file or the new one, never half of one. A full
    disk raises TrainError and leaves the old file as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)     # mkstemp's 0600 -> what open() would have given
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainError(f"the disk is full: could not write {path} ({e.strerror}; "
                             f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free). "
                             f"The previous file is kept; free some space, then run again (with --resume)") from None
        raise


def _atomic_write_text(path, text):
    _write_atomically(path, lambda f: f.write(text.encode()))


def save_checkpoint(state, path):
    """torch.save through _write_atomically. Before the new ckpt.pt replaces the old one, the old one
    becomes ckpt.prev.pt (a hard link, so ckpt.pt exists at every moment): one bad save, whatever
    its cause, can never destroy the last good checkpoint."""
    bad = [f"{k}.{n}" for k in ("model", "ema", "target") if k in state
           for n, t in state[k].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainError(f"refusing to save non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                         f"over {path}; the previous checkpoint is kept")
    prev = os.path.splitext(path)[0] + ".prev.pt"
    # Already one file (a kill between this link and the write below): prev holds the last good state.
    # (os.replace between two links to one inode does nothing, and would leave the temporary link behind.)
    if os.path.isfile(path) and not (os.path.isfile(prev) and os.path.samefile(path, prev)):
        link = prev + f".{os.getpid()}.tmp"
        try:
            os.link(path, link)
        except OSError:               # a file system without hard links: a copy
            shutil.copyfile(path, link)
        os.replace(link, prev)
    _write_atomically(path, lambda f: torch.save(state, f))


# The temporary files of _write_atomically (.<name>.<8 random characters>.tmp) and of save_checkpoint's
# link (ckpt.prev.pt.<pid>.tmp): what a run killed in the middle of a write leaves in its folder.
LEFTOVER = re.compile(r"^\.(ckpt\.pt|log\.jsonl|samples(_\d+)?\.png)\.[a-z0-9_]{8}\.tmp$|^ckpt\.prev\.pt\.\d+\.tmp$")


def remove_leftovers(out):
    """Delete the temporary files that killed runs left in the run folder `out` (each can be a whole
    checkpoint). Call it only while holding the folder's lock: a live run's own files look the same.
    -> the names removed."""
    gone = []
    for name in sorted(os.listdir(out)):
        if LEFTOVER.match(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
            gone.append(name)
    return gone


def rng_state():
    """This process's RNG states as plain lists and tensors (so weights_only loading accepts them).
    Training draws its randomness from per-step generators (make_batch); these are saved for code that
    uses the global RNGs (and because a resumed run should be the same process, state for state)."""
    np_state = np.random.get_state()
    return dict(python=list(random.getstate()[1]), python_version=random.getstate()[0],
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]], torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    """Restore rng_state(). torch's RNG states are CPU byte tensors whatever device they were loaded to
    (torch.load's map_location moves them too, and set_rng_state accepts only a CPU ByteTensor)."""
    random.setstate((s["python_version"], tuple(s["python"]), None))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"].cpu())
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.cpu() for c in s["cuda"]])


def _to(obj, device):
    """Every tensor inside nested dicts / lists / tuples, moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def damaged_member(path, chunk=16 << 20):
    """-> (name, reason) of the first member of the zip archive at `path` (torch.save's format) whose bytes do
    not match the CRC-32 stored beside them, or None if all match or `path` is no zip archive (torch.load then
    reports it). torch.load does not check these CRCs: a bit flipped inside a tensor loads silently (and a
    flipped exponent turns up later as a NaN that looks like a learning-rate problem). Reads the file once, in
    chunks. Cost, measured on 2 busy cores of an AMD EPYC: 1.0-1.24 GB/s over a 1.07 GB checkpoint in the page
    cache, where its torch.load ran at 0.63-0.75 GB/s, so loading takes about 1.6x as long. Computed from that
    rate, not measured: a 13.5 GB checkpoint would take 11-13.5 s more, plus its reading from disk if it is
    not cached (then the check reads it first, and torch.load finds it cached)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return None
    with archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:   # saved after torch.serialization.set_crc32_options(False)
                continue
            try:
                with archive.open(info) as f:
                    while f.read(chunk):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                return info.filename, f"{type(e).__name__}: {e}"
    return None


def load_checkpoint(path, device="cpu"):
    """The state dict of a train.py checkpoint: weights and optimiser state on `device`, the RNG states
    on the CPU whatever `device` is (torch.set_rng_state accepts only a CPU ByteTensor: a GPU resume
    crashed when map_location had moved them to the GPU with the weights)."""
    prev = os.path.splitext(path)[0] + ".prev.pt"
    other = f" The checkpoint before it, {prev}, may be good: copy it over {path} to use it." \
        if os.path.isfile(prev) and os.path.abspath(prev) != os.path.abspath(path) else ""
    if not os.path.isfile(path):
        raise TrainError(f"no checkpoint at {path}. Give the ckpt.pt that a train.py run wrote in its --out folder."
                         + other)
    damaged = damaged_member(path)
    if damaged:
        raise TrainError(f"{path} is damaged: the bytes of its part {damaged[0]} do not match the checksum written "
                         f"with them ({damaged[1]}), as after a bit flipped on the disk or in a copy; its weights "
                         "cannot be trusted." + (other or f" There is no {prev} beside it to fall back on: restore "
                                                          "the file from a copy, or start a new run"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}). "
                         "It may be truncated (an interrupted copy?) or not from train.py." + other) from None
    missing = [k for k in ("config", "model", "ema", "target", "opt", "step") if k not in state] \
        if isinstance(state, dict) else "everything (it holds no dict)"
    if missing:
        raise TrainError(f"{path} is not a train.py checkpoint: it lacks {missing}." + other)
    if torch.device(device).type != "cpu":
        state.update({k: _to(state[k], device) for k in ("model", "ema", "target", "opt")})
    return state


def load_weights(module, weights, path, which):
    """module.load_state_dict, with a message that names the checkpoint and what is missing."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        missing = sorted(set(module.state_dict()) - set(weights))
        extra = sorted(set(weights) - set(module.state_dict()))
        what = (f"lack {len(missing)} tensor(s) of the network ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''})" if missing else
                f"have {len(extra)} tensor(s) the network does not ({', '.join(extra[:3])})" if extra else
                f"do not fit the network ({str(e).splitlines()[-1].strip()[:200]})")
        prev = os.path.splitext(path)[0] + ".prev.pt"
        raise TrainError(f"{path}: its '{which}' weights {what}: the file is damaged or from another version of "
                         f"train.py" + (f". Try the checkpoint before it, {prev}" if os.path.isfile(prev) else "")
                         + ", or start a new run with another --out") from None


def load_model_from_checkpoint(path, which="ema", device="cpu"):
    """-> (network in eval mode, config dict). which: "ema" (theta**, evaluated in the paper), "target"
    (theta*, the 0.99 EMA) or "model" (the online weights)."""
    if which not in ("ema", "target", "model"):
        raise TrainError(f"which={which!r}: expected 'ema', 'target' or 'model'")
    state = load_checkpoint(path, device)
    net = build_net(state["config"]).to(device)
    load_weights(net, state[which], path, which)
    return net.eval().requires_grad_(False), state["config"]


# ------------------------------------------------------------------------------------------------
# One training step (Algorithm 1, steps 4-5): reused by a benchmark that feeds its own batches
# ------------------------------------------------------------------------------------------------

def make_optimizer(net, cfg):
    """AdamW over the trainable parameters (Table 6: constant lr, betas (0.9, 0.95), no weight decay).

    fused=True: one multi-tensor kernel per step instead of ~10 kernels per parameter (the default
    implementation took 52-73 ms of an XL/2 step on an H200, most of it launch overhead), and it can
    skip an update on the device (its found_inf flag), which the CUDA-graph step needs. capturable on
    CUDA: its step counters live on the GPU, so the step can be captured."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=True, capturable=params[0].is_cuda)


STAT_NAMES = ("loss", "terminal", "fm", "grad_norm", "ok", "weights_ok")


def step_on_device(model, net, ema, target, opt, micro_batches, cfg, amp=nullcontext()):
    """Algorithm 1, steps 4-5, without one host synchronisation, so that it can be captured as a CUDA
    graph (CudaGraphStep): forward + backward over the micro-batches (gradient accumulation), clipping,
    AdamW, both EMAs. A step whose loss or gradient is not finite changes nothing: AdamW skips its update
    on the device (found_inf, the protocol of torch.amp.GradScaler) and the EMAs move by 0.

    model is tvm.TVMLoss(net), possibly DDP-wrapped; micro_batches together are this rank's share of the
    global batch; opt comes from make_optimizer (fused). Returns a float64 tensor on the device with the
    global means of loss, terminal and fm terms, the gradient norm, ok (1.0 or 0.0) and whether the
    updated weights are finite (1.0 or 0.0): STAT_NAMES."""
    if not opt.defaults.get("fused"):
        raise TypeError("step_on_device needs the fused AdamW of make_optimizer: an unfused optimizer ignores "
                        "found_inf and would apply a non-finite step")
    opt.zero_grad(set_to_none=True)
    n_rank = sum(len(mb.y) for mb in micro_batches)
    sums = None
    for i, mb in enumerate(micro_batches):
        # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
        sync = model.no_sync() if isinstance(model, DDP) and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with amp:
                loss, terms = model(mb, target)
            # Mean over this rank's share; DDP's all-reduce then averages the ranks: the global mean.
            (loss * (len(mb.y) / n_rank)).backward()
        s = torch.stack([loss.detach() * len(mb.y), terms["terminal"].sum(), terms["fm"].sum()]).double()
        sums = s if sums is None else sums + s
    if dist.is_initialized():
        dist.all_reduce(sums)
    means = sums / (n_rank * (dist.get_world_size() if dist.is_initialized() else 1))
    params = [p for p in net.parameters() if p.requires_grad]
    # The norm of the global gradient (already all-reduced), identical on every rank.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    ok = torch.isfinite(means).all() & torch.isfinite(grad_norm)
    # Clipping to norm grad_clip, as clip_grad_norm_ does (g <- g min(1, grad_clip / (|g| + 1e-6))), but
    # inside the fused AdamW kernel: it divides the gradient by its grad_scale as it reads it (the protocol
    # of torch.amp.GradScaler). One pass over the gradients fewer than scaling them first.
    # (The kernel takes the scale in float32: a float64 model's clipping is exact to float32 rounding.)
    opt.grad_scale = torch.clamp((grad_norm + 1e-6) / cfg.grad_clip, min=1.0).float() if cfg.grad_clip > 0 else None
    # The official code zeroes NaN losses; we skip the whole step (and train() logs it).
    opt.found_inf = (~ok).float()             # fused AdamW: no update, step count unchanged, where 1
    opt.step()
    # A finite gradient can still give non-finite weights (an infinite lr, a NaN moment). One fused norm
    # of all parameters, on the device. Undoing the step would need a copy of the weights and AdamW's
    # moments (3x the model's memory) at every step, so we do not: the EMAs are left untouched, and the
    # caller stops the run with an error; the last checkpoint, written before, stays good.
    weights_ok = torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(net.parameters())))))
    tvm.ema_update(target, net, cfg.target_ema, ok & weights_ok)   # theta*  (teacher of the next step)
    tvm.ema_update(ema, net, cfg.ema, ok & weights_ok)             # theta** (what is evaluated)
    return torch.cat([means, grad_norm.double()[None], ok.double()[None], weights_ok.double()[None]])


def step_report(stats):
    """The device tensor of step_on_device -> dict of floats (one host synchronisation) with `skipped`."""
    out = dict(zip(STAT_NAMES, stats.tolist()))
    out["skipped"], out["weights_ok"] = not out.pop("ok"), bool(out["weights_ok"])
    return out


def train_step(model, net, ema, target, opt, micro_batches, cfg, amp=nullcontext()):
    """One eager training step: step_on_device, then its statistics on the host. Returns global means:
    loss, terminal, fm, grad_norm, skipped, weights_ok."""
    return step_report(step_on_device(model, net, ema, target, opt, micro_batches, cfg, amp))


class CudaGraphStep:
    """The whole training step (forward, JVP, backward, clipping, AdamW, both EMAs) replayed as one CUDA
    graph: the GPU then runs the step's ~10,000 kernels back to back, with no Python or launch overhead
    between them (measured on an H200: the eager XL/2 step kept the GPU idle about half the time).

    Same function as train_step, call for call: the first `warmup` calls run train_step eagerly (they
    compile the blocks and create the optimizer state); the next one captures step_on_device on static
    copies of its batch and replays it; later calls copy their batch into those tensors and replay. A
    batch must keep the shapes of the first one. Single process only (DDP's all-reduce is not captured).
    Whatever the step reads must keep its address: parameters, gradients and optimizer state are
    updated in place, never replaced (load checkpoints before the first call)."""

    def __init__(self, model, net, ema, target, opt, cfg, amp=nullcontext(), warmup=2):
        if isinstance(model, DDP) or dist.is_initialized():
            raise TrainError("--cuda_graph runs one process: under torchrun pass --cuda_graph false")
        self.args, self.cfg, self.amp, self.warmup = (model, net, ema, target, opt), cfg, amp, warmup
        self.calls, self.graph, self.static, self.stats = 0, None, None, None

    def __call__(self, micro_batches):
        self.calls += 1
        if self.calls <= self.warmup:
            return train_step(*self.args, micro_batches, self.cfg, self.amp)
        if self.graph is None:
            self.static = [tvm.LossInputs(*[x.clone() for x in _fields(mb)]) for mb in micro_batches]
            torch.cuda.synchronize()
            torch.cuda.empty_cache()    # the eager steps' cached blocks: the graph gets a pool of its own
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (data loading) may use CUDA meanwhile without breaking the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.stats = step_on_device(*self.args, self.static, self.cfg, self.amp)
        else:
            for static, mb in zip(self.static, micro_batches, strict=True):
                for a, b in zip(_fields(static), _fields(mb)):
                    a.copy_(b)
        self.graph.replay()
        return step_report(self.stats)


def make_step(model, net, ema, target, opt, cfg, amp=nullcontext(), graph=False, warmup=2):
    """batch -> statistics: the CUDA-graph step, or the eager train_step."""
    if graph:
        return CudaGraphStep(model, net, ema, target, opt, cfg, amp, warmup=warmup)
    return lambda micro_batches: train_step(model, net, ema, target, opt, micro_batches, cfg, amp)


def _fields(inp):
    return [getattr(inp, f.name) for f in dataclasses.fields(inp)]


# ------------------------------------------------------------------------------------------------
# Sample grids
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(net, cfg, device, vae=None, per_class=8, steps=(1, 4), amp=nullcontext()):
    """uint8 image: one row per class (all classes up to 10; else 8 spread over the classes), per_class
    samples with 1 step on the left and with 4 steps on the right. Fixed noise, so grids of one run are
    comparable step to step."""
    cfg_d = dataclasses.asdict(cfg)
    K = cfg.num_classes
    classes = list(range(K)) if K <= 10 else [int(c) for c in np.linspace(0, K - 1, 8)]
    if K == 1000:
        classes = [207, 360, 387, 974, 88, 979, 417, 279]   # DiT's sample classes
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    x1 = torch.randn((len(classes) * per_class, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    y = torch.tensor(classes).repeat_interleave(per_class).to(device)
    dtype = next(net.parameters()).dtype
    blocks = []
    for n in steps:
        with amp:
            x0 = tvm.sample(net, x1.to(device, dtype), y, cfg.w, n, scale_param=cfg.scale_param)
        img = to_uint8_images(x0, cfg_d, vae)                                   # (N, H, W, 3)
        if cfg.res == 0:  # 8x8 digits: enlarge 4x (nearest) to be visible
            img = img.repeat(4, axis=1).repeat(4, axis=2)
        blocks.append(img)
    H, pad = blocks[0].shape[1], 2
    grid = np.full((len(classes) * (H + pad) + pad, len(steps) * (per_class * (H + pad) + 3 * pad), 3),
                   128, np.uint8)
    for b, img in enumerate(blocks):
        x_off = b * (per_class * (H + pad) + 3 * pad) + pad
        for i in range(len(img)):
            r, c = divmod(i, per_class)
            grid[pad + r * (H + pad):pad + r * (H + pad) + H, x_off + c * (H + pad):x_off + c * (H + pad) + H] = img[i]
    return grid


def save_png(arr, path):
    from PIL import Image
    _write_atomically(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1.
    -> (rank, world, device). NCCL on GPUs, gloo on CPUs (the CPU test of this file uses gloo)."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda, but PyTorch sees no GPU: check `nvidia-smi`, or use --device cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")


def check_batch(cfg, world):
    if cfg.batch_size % world:
        lo = cfg.batch_size // world * world
        raise TrainError(f"--batch_size {cfg.batch_size} (global) does not divide across {world} processes: "
                         f"use a multiple of {world}, e.g. {max(lo, world)} or {lo + world}")
    share = cfg.batch_size // world
    if cfg.micro_batch and share % cfg.micro_batch:
        raise TrainError(f"--micro_batch {cfg.micro_batch} does not divide the per-process batch {share} "
                         f"(= {cfg.batch_size} / {world} processes): pick a divisor of {share}")


def check_resumable(saved, cfg, path):
    """A checkpoint continues only a run with the same network and data shape; other settings (steps,
    lr, logging, ...) may change on resume, and are reported."""
    now = dataclasses.asdict(cfg)
    bad = {k: (saved.get(k), now[k]) for k in STRUCTURAL if saved.get(k) != now[k]}
    if bad:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in bad.items())
        raise TrainError(f"{path} comes from another configuration ({diff}). Resume with the checkpoint's "
                         f"settings (its config is printed by `python -c \"import torch; print(torch.load("
                         f"'{path}')['config'])\"`), or start a new run with another --out")
    return {k: (saved.get(k), now[k]) for k in now if k not in STRUCTURAL and k != "resume" and saved.get(k) != now[k]}


def parse_bench_cases(text):
    """"XL/2-18h:256:32,B/2:256:32" -> (("XL/2-18h", 256, 32), ("B/2", 256, 32)); "" -> BENCH_CASES."""
    if not text:
        return BENCH_CASES
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in MODELS or not (parts[1].isdigit() and parts[2].isdigit()) \
                or int(parts[1]) % 16:
            raise TrainError(f"--bench_cases: {item!r} is not model:px:batch with a model of {sorted(MODELS)} "
                             "and px a multiple of 16, e.g. XL/2-18h:256:32")
        cases.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(cases)


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.benchmark:
        return benchmark(cfg, parse_bench_cases(cfg.bench_cases), check=cfg.bench_check)
    with attention_jvp.use_backend(cfg.attention):
        try:
            return train(cfg)
        except BaseException as e:
            if dist.is_initialized():
                # The traceback keeps train's and _train's frames, and in them the DDP module, alive: clear
                # their variables (the traceback still shows every line) so that leave_process_group can free it.
                traceback.clear_frames(e.__traceback__)
            raise
        finally:
            leave_process_group()


def leave_process_group():
    """Destroy the process group, if there is one, as the last thing the process does with it (PyTorch's
    docs: once per process, near the end of main), after everything that holds it is gone: the DDP module
    (its Reducer holds the group), and with it the optimizer and the step function. When the DDP module
    outlived destroy_process_group, its Reducer's destructor ran gloo's (~ProcessGroupGloo joins its
    threads) later, at exit, and that hung about once in 20 runs of the two-process test. gc.collect():
    what only reference cycles still hold is freed now, not at some later collection."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# A run stops after this many steps in a row were skipped (non-finite loss or gradient): by then the
# weights or the data are broken, and skipping on would end the run "done" having learnt nothing.
MAX_SKIPPED = 20
# A run that skipped more than this share of the steps it ran (non-finite loss or gradient) ends with an
# error, not "done": a healthy run skips none or a rare few, so a tenth is far above that, and a run that
# skipped more did markedly fewer updates than it reports (`--lr 1e10 --steps 6` skipped 5 and ended "done").
# Half would let a run that lost every third step pass. The last checkpoint, written before, is kept.
MAX_SKIPPED_SHARE = 0.1


class Stopped(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a checkpoint; --resume continues it."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set .signum: the loop finishes its step, saves a checkpoint
    and stops (a kill in the middle of AdamW or an EMA update would leave no consistent state to save).
    A second signal stops at once. Signal handlers exist only in the main thread; elsewhere, a no-op."""

    def __init__(self):
        self.signum, self.old = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
                   "(send it again to stop at once, without saving)")

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def lock_run_folder(out):
    """An exclusive lock on <out>/.lock for this process's lifetime (flock: released by the kernel when
    the process ends, however it ends). -> the open lock file; keep it open. A second run on the same
    --out is refused, naming the holder's pid: two runs would overwrite each other's checkpoints and logs.
    Under DDP only rank 0 writes, so only rank 0 locks. flock may be a no-op on some network file systems."""
    os.makedirs(out, exist_ok=True)
    if fcntl is None:   # not a POSIX system: no lock
        return None
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise TrainError(f"{out} is in use by another train.py run" + (f" (pid {holder})" if holder else "")
                         + ": two runs in one folder would overwrite each other's checkpoints. Wait for it to "
                         "end or stop it, or choose another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    gone = remove_leftovers(out)
    if gone:
        print(f"removed {len(gone)} temporary file(s) that an interrupted run left in {out}: {', '.join(gone[:4])}"
              + (", ..." if len(gone) > 4 else ""))
    return f


def cpu_threads():
    """Intra-op threads for a CPU run when OMP_NUM_THREADS is not set: the cores this process may use
    that are not already busy (affinity minus the 1-minute load average), at least 1. PyTorch's default
    is every core, and its threads spin-wait for each other: on a 2-core machine with other work
    running (load average 2.6-5.5), the digits job ran 7-13x slower with 2 threads than with 1: 6-22 s
    against 0.75-2.6 s per step (measured with OMP_NUM_THREADS=1 / 2, README "Set up")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _log_step(line):
    """The step of a log.jsonl row; a half-written row (a crash mid-write) counts as past every step."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf


def train(cfg):
    rank, world, device = setup_distributed(cfg)
    check_batch(cfg, world)
    master = rank == 0
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), cpu_threads()))   # only ever fewer

    if cfg.steps == 0:   # only encode the image folder (config_errors allows 0 only for --res 256/512)
        data = open_data(cfg, rank, world, device)
        if master:
            print(f"--steps 0: the latents of {cfg.data} are ready ({len(data):,} images); nothing trained, "
                  f"nothing written to {cfg.out}")
        if world > 1:
            dist.barrier()     # main's leave_process_group then destroys the group
        return cfg

    # One run per folder: rank 0 locks it, and every rank learns whether that worked.
    lock, error = None, None
    if master:
        try:
            lock = lock_run_folder(cfg.out)
        except TrainError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainError(error)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg, rank, world, device):
    """The run itself, inside the lock of its folder."""
    master = rank == 0
    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    dtype = torch.float64 if precision == "fp64" else torch.float32
    # cache_enabled=False: autocast's cache of cast weights must not outlive a CUDA-graph capture
    amp = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = False          # Table 6: TF32 off
    torch.backends.cudnn.allow_tf32 = False

    data = open_data(cfg, rank, world, device)
    cfg.in_channels, cfg.input_size = data.shape[0], data.shape[1]
    cfg.num_classes = data.num_classes
    vae = load_vae(device, cfg.vae) if cfg.res and cfg.sample_every and master else None   # fail early

    torch.manual_seed(cfg.seed)
    net = build_net(cfg).to(device, dtype)
    ema = copy.deepcopy(net).requires_grad_(False)      # theta**, eval EMA
    target = copy.deepcopy(net).requires_grad_(False)   # theta*, the teacher in the loss
    prepare_net(net, cfg)                               # the EMA is not compiled; the target is
    prepare_net(target, cfg)
    # The whole loss, JVP included, is the forward of one module, and DDP wraps that module: DDP cannot
    # wrap a network that torch.func.jvp is then applied to (pytorch #102197, #182661).
    model = tvm.TVMLoss(net, scale_param=cfg.scale_param, detach_jvp=cfg.detach_jvp, jvp=cfg.jvp)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    opt = make_optimizer(net, cfg)
    if cfg.cuda_graph is None:
        cfg.cuda_graph = cuda and world == 1
    elif cfg.cuda_graph and not (cuda and world == 1):
        raise TrainError(f"--cuda_graph needs one process on a GPU (here: {world} process(es) on {device.type}); "
                         "pass --cuda_graph false")

    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    step = 0
    if cfg.resume:
        # On the CPU: load_state_dict copies each tensor onto the device, so the GPU never holds the whole
        # checkpoint beside the run's own weights and optimiser state.
        state = load_checkpoint(ckpt_path, "cpu")
        changed = check_resumable(state["config"], cfg, ckpt_path)
        for module, key in ((net, "model"), (ema, "ema"), (target, "target")):
            load_weights(module, state[key], ckpt_path, key)
        # load_state_dict also restores the saved groups' implementation flags; keep this run's (fused,
        # capturable on a GPU): a checkpoint of an unfused AdamW (older train.py) or from the CPU must not
        # switch the found_inf skip or the CUDA graph off. Set before loading: they place the step counters.
        for group in state["opt"].get("param_groups", []):
            group.update(fused=True, foreach=None, capturable=opt.defaults["capturable"])
        try:
            opt.load_state_dict(state["opt"])
        except (ValueError, KeyError) as e:
            raise TrainError(f"{ckpt_path}: its optimiser state does not fit the network ({e}): the file is "
                             "damaged or from another version of train.py") from None
        # load_state_dict also restores the checkpoint's hyper-parameters; the config (printed, saved in
        # every checkpoint, logged) is what must run, so a changed --lr / --beta2 / ... takes effect here.
        for group in opt.param_groups:
            group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        step = state["step"]
        if len(state.get("rng", [])) == world:
            set_rng_state(state["rng"][rank])
        if master:
            print(f"resuming {ckpt_path} at step {step}" + "".join(
                f"\n  changed: {k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        del state
    elif os.path.exists(ckpt_path):
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    saved_step = step

    if master:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        n_params = sum(p.numel() for p in net.parameters())
        threads = "" if cuda else f" ({torch.get_num_threads()} intra-op thread(s) each)"
        print(f"{n_params:,} parameters; {len(data):,} training images, {cfg.num_classes} classes; {world} "
              f"process(es) on {device.type}{threads}, {precision}; {cfg.batch_size // world} samples per "
              f"process per step in micro-batches of {cfg.micro_batch or cfg.batch_size // world}")
        if cfg.resume and os.path.isfile(log_path):
            # Rows past the checkpoint were written by steps that are now done again: drop them.
            _atomic_write_text(log_path, "".join(line for line in open(log_path) if _log_step(line) <= step))
        log = open(log_path, "a" if cfg.resume else "w")     # a new run starts a new log
        if cfg.compile:
            print("--compile: the DiT blocks are compiled during the first step (a minute or two on an H100)")

    def checkpoint():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            save_checkpoint(dict(config=dataclasses.asdict(cfg), model=net.state_dict(), ema=ema.state_dict(),
                                 target=target.state_dict(), opt=opt.state_dict(), step=step, rng=rngs,
                                 world_size=world), ckpt_path)

    def samples():
        if master:
            ema.eval()
            grid = sample_grid(ema, cfg, device, vae, amp=amp)
            save_png(grid, os.path.join(cfg.out, f"samples_{step:07d}.png"))
            save_png(grid, os.path.join(cfg.out, "samples.png"))

    step_fn = make_step(model, net, ema, target, opt, cfg, amp, graph=cfg.cuda_graph)
    sampler = EpochSampler(len(data), cfg.seed)
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True)
    acc, t_last, n_last = [], time.time(), step
    skipped_in_a_row, t_saved = 0, time.time()
    skipped, first_step = 0, step                        # over the steps this process runs
    with StopOnSignal() as stop:
        while step < cfg.steps:
            batch = make_batch(data, sampler, cfg, step, rank, world, device, dtype)
            stats = step_fn(batch)
            step += 1
            bar.update(1)
            if not stats["weights_ok"]:
                fix = f"a smaller --lr (now {cfg.lr:g}), a larger --adam_eps (now {cfg.adam_eps:g}) or --grad_clip 1.0"
                msg = (f"step {step}: the AdamW update made the weights non-finite (loss {stats['loss']:.4g} and "
                       f"gradient norm {stats['grad_norm']:.4g} were finite). The run stops here; " + (
                           f"{ckpt_path} (step {saved_step}) is kept. Continue from it with --resume and {fix}"
                           if os.path.isfile(ckpt_path) else
                           f"no checkpoint had been written yet. Start again with {fix}"))
                if master:
                    log.write(json.dumps(dict(step=step, event="stopped: non-finite weights after the update",
                                              **stats)) + "\n")
                    log.close()
                raise TrainError(msg)
            if stats["skipped"]:
                skipped_in_a_row += 1
                skipped += 1
                if master:
                    tqdm.write(f"step {step}: loss {stats['loss']} grad norm {stats['grad_norm']} not finite: step skipped")
                    log.write(json.dumps(dict(step=step, event="skipped: non-finite loss or gradient", **stats)) + "\n")
                if skipped_in_a_row == MAX_SKIPPED:
                    if master:
                        log.close()
                    kept = (f"{ckpt_path} (step {saved_step}) is kept" if os.path.isfile(ckpt_path) else
                            "no checkpoint had been written yet")
                    raise TrainError(f"steps {step - MAX_SKIPPED + 1} to {step}: {MAX_SKIPPED} steps in a row had a "
                                     f"non-finite loss or gradient and were skipped; the run stops. {kept}. Check "
                                     f"the data for NaN or infinite values; if it is clean, "
                                     + ("resume" if os.path.isfile(ckpt_path) else "start again")
                                     + " with a smaller --lr or with --grad_clip 1.0")
            else:
                skipped_in_a_row = 0
                acc.append(stats)
            if master and acc:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", terminal=f"{stats['terminal']:.4f}",
                                fm=f"{stats['fm']:.4f}", gnorm=f"{stats['grad_norm']:.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if master and acc:
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.time() - t_last
                    row = {k: float(np.mean([a[k] for a in acc])) for k in ("loss", "terminal", "fm", "grad_norm")}
                    log.write(json.dumps(dict(step=step, **row, skipped=step - n_last - len(acc), lr=cfg.lr,
                                              s_per_step=dt / (step - n_last),
                                              img_per_s=cfg.batch_size * (step - n_last) / dt)) + "\n")
                    log.flush()
                acc, t_last, n_last = [], time.time(), step
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                samples()
            # A signal, or ckpt_minutes since the last save, also saves; under DDP every rank must agree on
            # the step at which that happens (one 2-number all-reduce per step).
            flags = [float(stop.signum), float(cfg.ckpt_minutes > 0 and time.time() - t_saved > 60 * cfg.ckpt_minutes)]
            if world > 1:
                flags_t = torch.tensor(flags, device=device, dtype=torch.float64)
                dist.all_reduce(flags_t, op=dist.ReduceOp.MAX)
                flags = flags_t.tolist()
            if step % cfg.ckpt_every == 0 or step == cfg.steps or flags[0] or flags[1]:
                checkpoint()
                saved_step, t_saved = step, time.time()
            if flags[0]:
                signum = int(flags[0])
                if master:
                    log.write(json.dumps(dict(step=step, event=f"stopped by {signal.Signals(signum).name}")) + "\n")
                    log.close()
                bar.close()
                raise Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {step}: {ckpt_path} "
                                      "saved; continue with the same command and --resume")
    bar.close()

    if skipped > MAX_SKIPPED_SHARE * (step - first_step):
        if master:
            log.write(json.dumps(dict(step=step, event="stopped: too many steps skipped", skipped=skipped)) + "\n")
            log.close()
        raise TrainError(f"{skipped} of the {step - first_step} steps of this run had a non-finite loss or gradient "
                         f"and were skipped (more than {MAX_SKIPPED_SHARE:.0%}): the run did not train as asked, so it "
                         f"does not end as done. {ckpt_path} (step {step}) is kept; {step - first_step - skipped} of this run's "
                         f"steps updated it. Check the data for NaN or infinite values; if it is clean, start again (another "
                         f"--out) with a smaller --lr (now {cfg.lr:g}) or with --grad_clip 1.0")

    if master and cfg.res == 0 and cfg.fid:
        report_fid(ema, cfg, data, device, log)
    if master:
        log.close()
        print(f"done: {ckpt_path}, {log_path}"
              + (f", {os.path.join(cfg.out, 'samples.png')}" if cfg.sample_every else ""))
    if world > 1:
        # All ranks leave together: rank 0 may still be writing the last checkpoint; tearing gloo down on
        # one rank while the other is still inside it hung a CPU test once (torch 2.13). The group itself is
        # destroyed by main's leave_process_group, once this function's variables (the DDP module) are gone.
        dist.barrier()
    return cfg


@torch.no_grad()
def report_fid(ema, cfg, data, device, log, steps=(1, 4)):
    """FID of the digits model's 1- and 4-step samples (cfg.fid_samples each, classes balanced, fixed
    noise) against cfg.fid_real real digits, with fid.py's offline Inception. Small sets, because the
    Inception network costs ~0.2 s per image on one CPU core: good to compare 1 and 4 steps and runs of
    one setting, but FID grows as sets shrink, so for a number to report use sample.py and fid.py with
    more samples. The real features are cached in the run folder. Skipped, with a message, if fid.py's
    weights are not installed."""
    try:
        import fid
        fid.load_inception("cpu")
    except (ImportError, RuntimeError) as e:
        print(f"FID skipped ({e}). --fid false turns this step off.")
        return None
    real_path = os.path.join(cfg.out, f"fid_real_features_{cfg.fid_real}.npy")
    if os.path.isfile(real_path):
        real = np.load(real_path)
    else:
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:cfg.fid_real]
        real = fid.inception_features(to_uint8_images(data.images[pick], {"res": 0}), device=device,
                                      progress=True)
        np.save(real_path, real)
    n = cfg.fid_samples // cfg.num_classes * cfg.num_classes
    g = torch.Generator().manual_seed(cfg.seed + 777)
    x1 = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    y = torch.arange(cfg.num_classes).repeat(n // cfg.num_classes).to(device)
    dtype = next(ema.parameters()).dtype
    result = dict(event="fid", step=cfg.steps, n=n, real=len(real), w=cfg.w)
    for k in steps:
        x0 = torch.cat([tvm.sample(ema, x1[i:i + 256].to(device, dtype), y[i:i + 256], cfg.w, k, cfg.scale_param)
                        for i in range(0, n, 256)])
        feats = fid.inception_features(to_uint8_images(x0, {"res": 0}), device=device, progress=True)
        result[f"fid_{k}step"] = fid.fid_from_features(feats, real)
    print("FID of %d samples against %d real digits (EMA model, w=%g): %s" % (n, len(real), cfg.w, ", ".join(
        f"{k}-step {result[f'fid_{k}step']:.2f}" for k in steps)))
    log.write(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------------
# python train.py --benchmark: the step on random latents, TVM against flow matching, same run
# ------------------------------------------------------------------------------------------------

# (model, image side in pixels, batch): the latents are (batch, 4, px / 8, px / 8).
BENCH_CASES = (("XL/2-18h", 256, 32), ("XL/2-18h", 512, 8), ("XL/2-18h", 512, 16), ("B/2", 256, 32))


def benchmark(cfg, cases=BENCH_CASES, steps=6, warmup=2, check=True):
    """Seconds per step, images per second and peak memory of the TVM step (Eq. 15: the JVP forward,
    the backward through it, one target forward for two batches, the guided FM term, AdamW, both EMAs)
    and of a flow-matching step of the same network (the FM term alone, no JVP), in the same run, on
    random latents shaped like ImageNet-256/512: no data needed. The paper's settings for that resolution
    (Table 6), bf16 autocast and TF32 off on a GPU; the median of `steps` timed steps after `warmup`.
    --attention and --detach_jvp select the variants, --device the device. Returns the rows; a case that
    does not fit is None."""
    if "RANK" in os.environ:
        raise TrainError("--benchmark times one process: run it with python, not torchrun")
    _, _, device = setup_distributed(cfg)           # a single process: only picks the device
    want_cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if want_cuda else nullcontext()
    name = torch.cuda.get_device_name() if want_cuda else "CPU"
    if cfg.cuda_graph is None:
        cfg.cuda_graph = want_cuda
    if cfg.cuda_graph and not want_cuda:
        raise TrainError("--cuda_graph needs a GPU: pass --cuda_graph false")
    if cfg.bench_memory_gib and want_cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.bench_memory_gib * 2 ** 30 / total))
    print(f"{name}, torch {torch.__version__}, attention {cfg.attention}, jvp {cfg.jvp}, compile {cfg.compile}, "
          f"cuda_graph {cfg.cuda_graph}, checkpoint_blocks {cfg.checkpoint_blocks}, detach_jvp {cfg.detach_jvp}, "
          f"median of {steps} steps after {warmup}; code {code_version()}"
          + (f"; memory capped at {cfg.bench_memory_gib:g} GiB" if cfg.bench_memory_gib and want_cuda else ""))
    peak = matmul_ceiling(device) if want_cuda else None
    if peak:
        print(f"bf16 matrix-product ceiling measured now (8192^3, random data): {peak:.0f} TFLOP/s; model FLOPs "
              f"utilisation (MFU) below is against it, and against the datasheet's {DATASHEET_BF16_TFLOPS:.0f} dense")
    if check:
        print("Check first: each path's loss and gradient (small DiT, relative errors) against float64 "
              "torch.func.jvp with math attention, and against the func path in the same precision:")
        report_check(check_step_paths(device, amp, compiled=cfg.compile))
        if cfg.cuda_graph:
            report_graph_check(check_cuda_graph(device, amp, compiled=cfg.compile))
    print("| model | px | batch | TVM step | flow-matching step | TVM / FM |\n| --- | --- | --- | --- | --- | --- |")
    rows = []
    for model, px, batch in cases:
        if cfg.compile:  # compile each case afresh for its shapes (no dynamic-shape graphs, no recompile limit)
            torch._dynamo.reset()
        row = dict(model=model, px=px, batch=batch)
        for kind in ("tvm", "fm"):
            row[kind] = _time_step(cfg, row["model"], px, row["batch"], kind, device, amp, steps, warmup)
            if row[kind]:
                row[kind]["tflops"] = step_flops(model, px, batch, kind) / row[kind]["s"] / 1e12
        rows.append(row)
        mfu = lambda m: f", {m['tflops']:.0f} TFLOP/s = MFU {m['tflops'] / peak:.0%} ({m['tflops'] / DATASHEET_BF16_TFLOPS:.0%})" \
            if peak else ""
        cell = lambda m: "out of memory" if m is None else f"{m['s']:.3f} s, {m['img_s']:.0f} img/s, " + (
            f"{m['gib']:.1f} GiB" if m["gib"] is not None else "-") + mfu(m)
        ratio = f"{row['tvm']['s'] / row['fm']['s']:.2f}x" if row["tvm"] and row["fm"] else "-"
        print(f"| {row['model']} | {px} | {row['batch']} | {cell(row['tvm'])} | {cell(row['fm'])} | {ratio} |",
              flush=True)
    return rows


# H100 / H200 SXM, dense bf16 with fp32 accumulation (NVIDIA's datasheet); the measured ceiling is lower.
DATASHEET_BF16_TFLOPS = 989.0


def step_flops(model, px, batch, kind, mlp_ratio=4, freq_dim=256, in_channels=4):
    """Model FLOPs of one training step, counted analytically: 2 per multiply-add of the matrix products
    (linears and attention; elementwise work, norms and the optimizer are not counted), the backward
    twice its forward, recomputation not counted (the MFU convention: work the model needs, not what an
    implementation spends). Per image, with C the width, N = (px / 8 / patch)^2 tokens, depth blocks:

        L = depth (12 C^2 N + 6 C^2) + N (2 p^2 c C) + 2 C^2 + 3 (freq_dim C + C^2)   multiply-adds of the
            linears in one forward (qkv 3C^2, proj C^2, MLP 8C^2 per token; adaLN 6C^2 per sample; the
            patch embedding and output layer; the final adaLN; the t, gap and w embedders)
        A = depth 2 N^2 C                                                            of the attention
            (q k^T and P v over all heads)

    TVM step (Eq. 15): the forward with its tangent 2L + 3A (the tangent O' = P'v + Pv', P' from q'k^T
    and qk'^T: 4 more products), its backward twice that, the target's forward on two batches 2L + 2A,
    the FM term's forward and backward 3L + 3A: 11 L + 14 A. FM step: 3L + 3A, plus the target's
    unconditional forward for the guided target (Eq. 14) L + A: 4 L + 4 A. XL/2-18h at 256 px: L = 114.1
    G, A = 4.2 G per image, so 2.63 TFLOP (TVM) and 0.95 TFLOP (FM) per image.
    """
    m = MODELS[model]
    L, A = forward_macs(m["hidden_size"], m["depth"], (px // 8 // m["patch_size"]) ** 2, m["patch_size"],
                        in_channels, mlp_ratio, freq_dim)
    units = (11 * L + 14 * A) if kind == "tvm" else (4 * L + 4 * A)
    return 2 * units * batch


def forward_macs(C, depth, N, p, in_channels=4, mlp_ratio=4, freq_dim=256):
    """(L, A) of step_flops for one image: multiply-adds of the linears and of the attention in one forward."""
    L = depth * (3 * C * C + C * C + 2 * mlp_ratio * C * C) * N + depth * 6 * C * C \
        + N * 2 * p * p * in_channels * C + 2 * C * C + 3 * (freq_dim * C + C * C)
    return L, depth * 2 * N * N * C


def matmul_ceiling(device, n=8192, reps=10):
    """TFLOP/s of an n^3 bf16 matrix product on random data (cuBLAS), median of `reps`: the attainable ceiling."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / float(np.median(times[3:])) / 1e12


# Kernel kinds of print_kernel_profile, by name: cuBLAS products (GPU) or aten's (CPU), this project's
# attention and EMA kernels, AdamW, Inductor's generated kernels; the rest is "other elementwise and copies".
KERNEL_KINDS = (
    ("matrix products", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("attention kernels", ("_fwd_kernel", "_tangent_kernel", "_bwd_kernel", "_bwd_preprocess")),
    ("EMA kernel", ("_ema_kernel",)),
    ("AdamW and norms", ("multi_tensor", "fused_adam", "LpNorm", "aten::_fused_adamw", "aten::_foreach_norm")),
    ("Inductor (fused elementwise)", ("triton_",)),
)


def kernel_kind(name):
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m.lower() in low for m in marks):
            return kind
    return "other elementwise and copies"


def print_kernel_profile(title, device, run, top=12):
    """Profile one call of run() with torch.profiler and print where the time goes: on a GPU each kernel's
    GPU time (an eager step launches the same kernels that a CUDA graph replays), on the CPU each
    operator's own CPU time; summed by kernel_kind, then the `top` largest. Returns {kind: ms}."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        ms = (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3
        if ms > 0 and (not cuda or e.device_type.name == "CUDA"):   # on a GPU, kernels only (not their ops)
            rows.append((ms, e.count, e.key))
    rows.sort(reverse=True)
    kinds = {}
    for ms, count, name in rows:
        k = kinds.setdefault(kernel_kind(name), [0.0, 0])
        k[0] += ms
        k[1] += count
    total = sum(ms for ms, _, _ in rows)
    print(f"  profile, {title} ({'GPU kernel' if cuda else 'CPU operator'} time of one eager step): {total:.1f} ms")
    for kind, (ms, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"    {kind:30s} {ms:8.1f} ms  {count:6d} calls")
    for ms, count, name in rows[:top]:
        print(f"      {ms:8.2f} ms {count:5d}x  {name[:100]}")
    return {kind: ms for kind, (ms, _) in kinds.items()}


def code_version():
    """sha1 (10 hex digits) of tvm.py, attention_jvp.py and train.py: which code a printed timing ran."""
    h = hashlib.sha1()
    for name in ("tvm.py", "attention_jvp.py", "train.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


def _check_dit(seed):
    """The benchmark checks' small DiT (head dim 64, as in XL/2-18h), every weight perturbed so that no
    zero-initialised layer hides an error."""
    torch.manual_seed(seed)
    base = tvm.build_dit(dict(hidden_size=256, depth=2, num_heads=4, patch_size=2), 16, 4, 10)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


def check_step_paths(device, amp=nullcontext(), compiled=True, seed=0):
    """One TVM loss evaluation (loss and gradient) by each way of computing it: torch.func.jvp (the
    reference path), the by-hand tangent, with block checkpointing, and compiled (if `compiled`). A
    small DiT with every weight perturbed (so no zero-initialised layer hides an error).

    Precisions: float64 on the CPU (the tests); on a GPU float32 and the benchmark's `amp` (bf16).
    Returns {precision: {path: (loss error vs float64, gradient error vs float64, gradient difference
    from the func path in the same precision)}}, all relative (the gradient's in Frobenius norm); the
    float64 reference is torch.func.jvp with math attention on the same device.
    """
    base = _check_dit(seed)
    g = torch.Generator().manual_seed(seed)
    inp = tvm.sample_loss_inputs(torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g),
                                 10, w=2.0, generator=g)
    fields = _fields(inp)

    def run(dtype, jvp, attention="auto", ckpt=False, compiled=False, amp_=nullcontext()):
        if compiled:
            torch._dynamo.reset()   # each compiled path compiles for its own dtype
        net = copy.deepcopy(base).to(device, dtype)
        target = copy.deepcopy(base).to(device, dtype).requires_grad_(False)
        prepare_net(net, TrainConfig(compile=compiled, checkpoint_blocks=ckpt))
        prepare_net(target, TrainConfig(compile=compiled))
        cast = tvm.LossInputs(*[x.to(device) if x.dtype == torch.long else x.to(device, dtype) for x in fields])
        with attention_jvp.use_backend(attention), amp_:
            loss, _ = tvm.tvm_loss(net, target, cast, jvp=jvp)
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.double().flatten() for p in net.parameters() if p.grad is not None])

    ref_loss, ref_grad = run(torch.float64, "func", attention="reference")
    paths = {"func": dict(jvp="func"), "manual": dict(jvp="manual"),
             "manual + checkpoint_blocks": dict(jvp="manual", ckpt=True)}
    if compiled:
        paths["manual + compile"] = dict(jvp="manual", compiled=True)
    precisions = {"float64": (torch.float64, nullcontext())} if device.type == "cpu" else \
        {"float32": (torch.float32, nullcontext()), "bf16 autocast": (torch.float32, amp)}
    rel = lambda a, b: float((a - b).norm() / b.norm())
    errors = {}
    for label, (dtype, amp_) in precisions.items():
        results = {name: run(dtype, amp_=amp_, **opts) for name, opts in paths.items()}
        func_grad = results["func"][1]
        errors[label] = {name: (float(abs(loss - ref_loss) / abs(ref_loss)), rel(grad, ref_grad), rel(grad, func_grad))
                         for name, (loss, grad) in results.items()}
    return errors


# Pass marks of the check. float32: every path within 1e-3 of the func path's gradient (they differ by
# operation order only; the kernel's TF32 products are the same in both; a wrong rule is off by 1e-1 or
# more). bf16: no path further from float64 than 3x the func path (bf16 noise differs between paths).
CHECK_FP32_VS_FUNC = 1e-3
CHECK_BF16_VS_FUNC_ERROR = 3.0


def report_check(errors):
    """Print check_step_paths' table; raise if a path fails its pass mark."""
    failed = []
    for label, paths in errors.items():
        print(f"  {label}:")
        for name, (e_loss, e_grad, d_func) in paths.items():
            print(f"    {name:28s} vs float64: loss {e_loss:.1e}, gradient {e_grad:.1e};  gradient vs func {d_func:.1e}")
            bad = (label == "float32" and d_func > CHECK_FP32_VS_FUNC) or \
                  (label == "bf16 autocast" and e_grad > CHECK_BF16_VS_FUNC_ERROR * paths["func"][1]) or \
                  (label == "float64" and max(e_loss, e_grad) > 1e-10)
            if bad or not math.isfinite(e_grad):
                failed.append(f"{label} {name}")
    if failed:
        raise RuntimeError(f"the step check failed for: {', '.join(failed)}; the timings would not mean anything")


def check_cuda_graph(device, amp=nullcontext(), compiled=True, steps=4, seed=0):
    """The CUDA-graph step (CudaGraphStep) against the eager step (train_step) on a small DiT with
    perturbed weights: `steps` steps each from the same weights and batches, the third batch holding a
    NaN (a step to skip, replayed from the graph). Eager runs twice: with the kernel's atomic adds two
    eager runs differ too, and that difference is the yardstick. Returns {precision: dict(graph=relative
    difference graph vs eager, eager=eager vs eager, skipped_unchanged=bool)}; the differences are over
    the online weights, both EMAs and AdamW's first moments after the last step."""
    base = _check_dit(seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(steps):
        x0 = torch.randn(8, 4, 16, 16, generator=g)
        if i == 2:
            x0[1, 2, 3, 4] = float("nan")
        batches.append(tvm.sample_loss_inputs(x0, torch.randint(0, 10, (8,), generator=g), 10, w=2.0, generator=g))
    c = TrainConfig(lr=1e-3, grad_clip=1.0, ema=0.999, target_ema=0.99, compile=compiled)

    def run(graph, amp_):
        net = copy.deepcopy(base).to(device)
        ema, target = (copy.deepcopy(net).requires_grad_(False) for _ in range(2))
        prepare_net(net, c)
        prepare_net(target, c)
        opt = make_optimizer(net, c)
        model = tvm.TVMLoss(net)
        step = CudaGraphStep(model, net, ema, target, opt, c, amp_, warmup=1) if graph else \
            (lambda mb: train_step(model, net, ema, target, opt, mb, c, amp_))
        state = lambda: [t.detach().clone() for t in (*net.parameters(), *ema.parameters(), *target.parameters())] \
            + [opt.state[p]["exp_avg"].clone() for p in opt.state]
        unchanged = True
        for i, inp in enumerate(batches):
            inp = tvm.LossInputs(*[x.to(device) for x in _fields(inp)])
            before = state() if i == 2 else None
            stats = step([inp])
            if i == 2:
                unchanged = stats["skipped"] and all(torch.equal(a, b) for a, b in zip(before, state()))
        return torch.cat([t.double().flatten() for t in state()]), unchanged

    rel = lambda a, b: float((a - b).norm() / b.norm())
    out = {}
    for label, amp_ in (("float32", nullcontext()), ("bf16 autocast", amp)):
        eager1, _ = run(False, amp_)
        eager2, _ = run(False, amp_)
        graphed, unchanged = run(True, amp_)
        out[label] = dict(graph=rel(graphed, eager1), eager=rel(eager2, eager1), skipped_unchanged=unchanged)
    return out


def report_graph_check(result):
    """Print check_cuda_graph's result; raise unless the graph is as close to eager as eager is to itself
    (10x that difference, at least 1e-5) and the skipped step changed nothing."""
    failed = []
    for label, r in result.items():
        print(f"  CUDA graph, {label}: weights, EMAs and moments after the steps {r['graph']:.1e} from eager (eager vs "
              f"eager {r['eager']:.1e}); the NaN step {'changed nothing' if r['skipped_unchanged'] else 'CHANGED THE STATE'}")
        if not (r["skipped_unchanged"] and r["graph"] <= 10 * max(r["eager"], 1e-6) and math.isfinite(r["graph"])):
            failed.append(label)
    if failed:
        raise RuntimeError(f"the CUDA-graph step differs from the eager step ({', '.join(failed)}); the timings "
                           "would not mean anything")


def _time_step(cfg, model, px, batch, kind, device, amp, steps, warmup):
    c = resolve(TrainConfig(res=256 if px <= 256 else 512, data="random", model=model, batch_size=batch,
                            detach_jvp=cfg.detach_jvp, jvp=cfg.jvp, compile=cfg.compile,
                            checkpoint_blocks=cfg.checkpoint_blocks, device=cfg.device))
    c.input_size, c.in_channels, c.num_classes = px // 8, 4, 1000
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.device(device):      # built (and spectrally initialised) on the GPU directly
            torch.manual_seed(0)
            net = build_net(c)
            ema = copy.deepcopy(net).requires_grad_(False)
            target = copy.deepcopy(net).requires_grad_(False)
        prepare_net(net, c)
        prepare_net(target, c)
        model_ = tvm.TVMLoss(net, scale_param=c.scale_param, detach_jvp=c.detach_jvp, terminal=kind == "tvm",
                             jvp=c.jvp)
        opt = make_optimizer(net, c)
        step = make_step(model_, net, ema, target, opt, c, amp, graph=cfg.cuda_graph, warmup=warmup)
        g = torch.Generator(device).manual_seed(0)
        times = []
        warmup += 1 if cfg.cuda_graph else 0        # and the capture
        with attention_jvp.use_backend(cfg.attention):
            for _ in range(warmup + steps):
                x0 = torch.randn(batch, 4, px // 8, px // 8, device=device, generator=g)
                y = torch.randint(0, 1000, (batch,), device=device, generator=g)
                inp = tvm.sample_loss_inputs(x0, y, 1000, w=c.w, label_dropout=c.label_dropout, generator=g)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step([inp])
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        sec = float(np.median(times[warmup:]))
        row = dict(s=sec, img_s=batch / sec, gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
        if cfg.bench_profile:
            title = f"{model} {px} px batch {batch}, {kind.upper()} step"
            try:    # the timing stands even if the eager step does not fit beside the graph's memory
                with attention_jvp.use_backend(cfg.attention):
                    print_kernel_profile(title, device, lambda: train_step(model_, net, ema, target, opt, [inp], c, amp))
            except torch.cuda.OutOfMemoryError:
                print(f"  profile, {title}: out of memory (the eager step beside the CUDA graph's memory)")
        return row
    except torch.cuda.OutOfMemoryError:
        return None


if __name__ == "__main__":
    try:
        main()
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
