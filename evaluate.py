"""
From a trained network to images and to FID, at scale: what sample.py runs from the command line and
train.py runs during training (--fid_every, and the digits' end-of-run FID).

  noise_and_label   sample i's noise x_1 and class label, a function of (seed, i) only
  sample_latents    the network part: Fig. 3 of the paper (tvm.sample), n jumps from t = 1 to s = 0
  generate          ... then decoded to uint8 images (data.to_uint8_images: the SD-VAE for latents)
  global_batches    samples 0..N-1 cut into global batches [kB, (k+1)B); batch k runs on rank k mod world
  Reference         the statistics FID compares against (fid.py's SOURCEs: an ADM batch, a --save_stats file,
                    a folder, an image .npz, 'digits')
  run               sample -> decode -> Inception features, streamed batch by batch on every process, the
                    features gathered once, in sample order, on rank 0; each part timed
  report_fid        train.py's end-of-run FID of the digits model (1 and 4 steps, small sets)
  fid_during_training  train.py --fid_every: run() on the EMA weights -> a log.jsonl row

Streaming: no image is kept unless asked (sample.py --out), so FID-50K needs neither the 10 GB .npz nor
its write and read. The features of N samples are the same whatever the number of processes: the global
batches do not depend on it, each batch's features depend only on its samples, and the gather puts them
back in sample order (tested with 2 gloo processes against 1).
"""

import dataclasses
import os
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import fid
import tvm
from config import fid_step_counts


# ------------------------------------------------------------------------------------------------
# Noise and labels: a function of (seed, sample index) only
# ------------------------------------------------------------------------------------------------

def noise_and_label(seed, i, shape, classes, num_classes):
    """x_1 ~ N(0, I) of `shape` and a label for sample i, from a generator of its own seeded with
    (seed, i). classes None: uniform over 0..num_classes-1; else a list of chosen labels, and sample i
    takes classes[i mod len(classes)] (the noise is the same either way).

    numpy's SeedSequence hashes the pair (seed, i) into the 128-bit state of a PCG64 generator. Not
    torch.Generator().manual_seed(...): the CPU generator keeps only the low 32 bits of its seed, so
    seed * 2^32 + i would give every seed the same images, seed + i would make seed 1 repeat seed 0
    shifted by one sample, and a hash down to 32 bits would give two of 50,000 samples the same noise
    in about one run out of four (birthday bound, 1 - exp(-50000^2 / 2^33)). Nothing here touches
    torch's random streams, so sampling during training leaves the training run's randomness as it was.
    """
    rng = np.random.default_rng([seed, i])
    x1 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))             # (C, H, W)
    y = int(rng.integers(num_classes)) if classes is None else classes[i % len(classes)]
    return x1, y


@torch.no_grad()
def sample_latents(net, config, indices, steps, w, seed, classes=None, device="cpu", amp=nullcontext()):
    """The network part of generate(): x_0 (float64, (B, C, S, S)) and the labels (B,) of samples number
    `indices`. amp: e.g. torch.autocast("cuda", torch.bfloat16), the precision the paper samples in."""
    C, S = config["in_channels"], config["input_size"]
    pairs = [noise_and_label(seed, i, (C, S, S), classes, config["num_classes"]) for i in indices]
    x1 = torch.stack([p[0] for p in pairs]).to(device)                            # (B, C, S, S)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)      # (B,)
    dtype = next(net.parameters()).dtype
    with amp:
        x0 = tvm.sample(net, x1.to(dtype), y, w, steps, scale_param=config["scale_param"])  # (B, C, S, S) float64
    if not torch.isfinite(x0).all():      # else NaN decodes to black images, written as if they were samples
        raise data.SampleError(f"samples {indices[0]}..{indices[-1]} came out NaN or infinite (w = {w:g}, {steps} "
                               "step(s)): the network's weights are not finite or the model diverged; sample an "
                               "earlier checkpoint (ckpt.prev.pt, or --which target)")
    return x0, y


@torch.no_grad()
def generate(net, config, indices, steps, w, seed, classes=None, device="cpu", vae=None, amp=nullcontext(),
             with_labels=False):
    """Samples number `indices` (a list of ints) -> uint8 (len(indices), H, W, 3), and their labels (numpy
    int64) if with_labels. config: the checkpoint's config dict (train.py): shapes, res, scale_param. The
    function to call with a network in memory."""
    x0, y = sample_latents(net, config, indices, steps, w, seed, classes, device, amp)
    images = data.to_uint8_images(x0, config, vae)                               # (B, H, W, 3) uint8
    return (images, y.cpu().numpy()) if with_labels else images


def global_batches(n, batch_size):
    """[[0..B-1], [B..2B-1], ...] up to n: the global batches; batch k runs on rank k mod world."""
    return [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]


# ------------------------------------------------------------------------------------------------
# The reference FID compares against
# ------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """Inception pool_3 statistics of the reference set: mu (2048,), sigma (2048, 2048), float64; n, its
    number of images (None if a statistics file does not record it); features (n, 2048) where the source
    has images (then a small set's FID is computed exactly in sample space: fid.fid_from_features)."""
    source: str
    mu: np.ndarray
    sigma: np.ndarray
    n: int = None
    features: np.ndarray = None

    def sqrt_sigma(self):
        """fid.psd_sqrt(sigma), computed once: each FID against this reference then needs one 2048 x 2048
        eigendecomposition fewer (train.py --fid_every compares with it again and again)."""
        if getattr(self, "_sqrt", None) is None:
            self._sqrt = fid.psd_sqrt(self.sigma)
        return self._sqrt

    def describe(self):
        return f"{self.source} ({self.n:,} images)" if self.n else f"{self.source} (statistics)"


def load_reference(source, batch_size=64, device="cpu", progress=True, error=data.SampleError, option="--fid_ref"):
    """A fid.py SOURCE -> Reference, and the detector loaded on `device`, so that a missing weights file or a
    bad reference stops the run before any sampling. Statistics files are read (checked for shape,
    finiteness and the detector they were computed with); images go through the detector. A problem is
    raised as `error` (SampleError or TrainError: one line, exit status 2) naming `option`."""
    try:
        fid.load_inception(device)
        features = fid.source_features(source, batch_size, device, progress)
        if features is None:                               # a statistics .npz: mu and sigma
            mu, sigma, n = fid.npz_stats(source)
            return Reference(source, mu, sigma, n)
        mu, sigma, n = fid._stats(features, source)
        return Reference(source, mu, sigma, n, features)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        raise error(f"{option} {source}: {e}") from None


def fid_against(features, reference):
    """FID of (N, 2048) features against a Reference: exactly fid.py's number for the same two sets."""
    if reference.features is not None:
        return fid.fid_from_features(features, reference.features)
    return fid.frechet_distance(*fid.feature_stats(features), reference.mu, reference.sigma, reference.sqrt_sigma())


# ------------------------------------------------------------------------------------------------
# Sample, decode, features: streamed, split over the processes, gathered once
# ------------------------------------------------------------------------------------------------

class _Clock:
    """Seconds spent in each named part, on this process; on a GPU each part ends with a synchronize, so
    the time of queued kernels lands in the part that queued them."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.seconds = {}

    def part(self, name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def run(net, config, n, steps, w, seed, *, batch_size, device, vae=None, amp=nullcontext(), classes=None,
        rank=0, world=1, keep_images=False, features=True, desc="sampling", leave=True):
    """Samples 0..n-1 of `net` (global batches of batch_size, batch k on rank k mod world) -> dict:
      images, labels   this process's samples in its batches' order (uint8 (m, H, W, 3), int64 (m,)) if
                       keep_images, else None (nothing is kept: FID-50K streams)
      features         all n samples' Inception features (n, 2048) float64 in sample order, on rank 0 (None on
                       the others, and everywhere if features=False)
      seconds          {"sample", "decode", "inception", "gather"}: this process's time in each part
    Every process must call it (the gather is collective when world > 1)."""
    clock = _Clock(device)
    mine = global_batches(n, batch_size)[rank::world]
    images, labels, feats = [], [], []
    for idx in tqdm(mine, desc=desc, disable=rank != 0, unit="batch", dynamic_ncols=True, leave=leave):
        x0, y = clock.part("sample", sample_latents, net, config, idx, steps, w, seed, classes, device, amp)
        img = clock.part("decode", data.to_uint8_images, x0, config, vae)                 # (b, H, W, 3) uint8
        if features:
            feats.append(clock.part("inception", fid.inception_features, img, len(img), device))   # (b, 2048)
        if keep_images:
            images.append(img)
            labels.append(y.cpu().numpy())
    out = dict(images=np.concatenate(images) if images else None, labels=np.concatenate(labels) if labels else None,
               features=None, seconds=clock.seconds)
    if features:
        mine_feats = np.concatenate(feats) if feats else np.empty((0, fid.FEATURE_DIM))
        out["features"] = clock.part("gather", _gather_in_sample_order, mine_feats, n, batch_size, rank, world, device)
    return out


def _gather_in_sample_order(mine, n, batch_size, rank, world, device):
    """Each process's features (its batches, in order) -> all n in sample order on rank 0 (None elsewhere).
    One all_gather of float64 tensors padded to the longest share (NCCL needs them on the GPU; gloo on the
    CPU): 50,000 x 2048 x 8 bytes = 0.8 GB in all, once per evaluation."""
    if world == 1:
        return mine
    batches = global_batches(n, batch_size)
    counts = [sum(len(b) for b in batches[r::world]) for r in range(world)]
    where = device if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros(max(counts), mine.shape[1], dtype=torch.float64, device=where)
    padded[:len(mine)] = torch.from_numpy(mine)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    if rank != 0:
        return None
    return in_sample_order([p[:c].cpu().numpy() for p, c in zip(parts, counts)], n, batch_size, world)


def in_sample_order(parts, n, batch_size, world):
    """parts[r]: rank r's rows, its batches k = r, r + world, ... one after the other (ranks past the last
    batch may be left out) -> all n rows in sample order. The gather above and sample.py's .npz shards."""
    full, offsets = np.empty((n, *parts[0].shape[1:]), parts[0].dtype), [0] * len(parts)
    for k, b in enumerate(global_batches(n, batch_size)):   # batch k: the next len(b) rows of rank k mod world
        r = k % world
        full[b[0]:b[-1] + 1] = parts[r][offsets[r]:offsets[r] + len(b)]
        offsets[r] += len(b)
    return full


# ------------------------------------------------------------------------------------------------
# FID during training: the digits' small end-of-run FID (train.py --fid), and the official code's periodic
# evaluation (train.py --fid_every)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def report_fid(ema, cfg, dataset, device, steps=(1, 4)):
    """FID of the digits model's 1- and 4-step samples (cfg.fid_samples each, classes balanced, fixed
    noise) against cfg.fid_real real digits (a fixed random subset), with fid.py's offline Inception. Small
    sets, because the Inception network costs 0.23-0.86 s per image on one CPU thread (fid.py's
    CPU_SECONDS_PER_IMAGE): good to compare 1 and 4 steps and runs of one setting, but FID grows as sets
    shrink, so for a number to report use sample.py and fid.py with more samples. The real digits' features are those shipped with fid.py
    (data/digits_inception.npz) when the data are the digits they were computed from; otherwise computed
    once and kept in the run folder (fid_real_features_<fid_real>.npy). -> the log.jsonl row (event "fid");
    None, with a message, if fid.py's weights are not installed."""
    try:
        fid.load_inception("cpu")
    except (ImportError, RuntimeError) as e:
        print(f"FID skipped ({e}). --fid false turns this step off.")
        return None
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:cfg.fid_real]
    real_images = data.to_uint8_images(dataset.images, {"res": 0})                  # (N, 8, 8, 3) uint8
    chosen = real_images[pick.numpy()]
    # Kept with the sha1 of the images and of the detector's weights (fid.features_key): a run resumed on other
    # --data, or with the stand-in detector switched on or off, computes them again instead of reusing them.
    real_path, key = os.path.join(cfg.out, f"fid_real_features_{cfg.fid_real}.npz"), fid.features_key(chosen)
    real, where = fid.shipped_features(real_images), f"features shipped in {fid.SHIPPED_NAME}"
    if real is not None:
        real = real[pick.numpy()]
    else:
        real, where = _kept_features(real_path, key), f"features kept in {real_path}"
    if real is None:
        where = "features computed now"
    n = cfg.fid_samples // cfg.num_classes * cfg.num_classes
    todo = n * len(steps) + (cfg.fid_real if real is None else 0)
    print(f"FID of {' and '.join(f'{k}-step' for k in steps)} samples ({n} each, EMA model, w={cfg.w:g}) against "
          f"{len(pick)} real digits ({where}): Inception features of {todo} images, {fid.estimate(todo, device)}")
    if real is None:
        real = fid.inception_features(chosen, device=device, progress="real digits")
        data._write_atomically(real_path, lambda f: np.savez(f, key=key, features=real))
    g = torch.Generator().manual_seed(cfg.seed + 777)
    x1 = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    y = torch.arange(cfg.num_classes).repeat(n // cfg.num_classes).to(device)
    dtype = next(ema.parameters()).dtype
    result = dict(event="fid", step=cfg.steps, n=n, real=len(real), w=cfg.w, standin=fid.STANDIN["on"])
    for k in steps:
        x0 = torch.cat([tvm.sample(ema, x1[i:i + 256].to(device, dtype), y[i:i + 256], cfg.w, k, cfg.scale_param)
                        for i in range(0, n, 256)])
        feats = fid.inception_features(data.to_uint8_images(x0, {"res": 0}), device=device, progress=f"{k}-step samples")
        result[f"fid_{k}step"] = fid.fid_from_features(feats, real)
    print("FID of %d samples against %d real digits (EMA model, w=%g): %s" % (n, len(real), cfg.w, ", ".join(
        f"{k}-step {result[f'fid_{k}step']:.2f}" for k in steps)) + fid.STANDIN_NOTE * fid.STANDIN["on"])
    return result


def _kept_features(path, key):
    """The features kept in `path` by an earlier run if they were computed from the same images with the same
    detector (key), else None."""
    try:
        with np.load(path) as f:
            return f["features"] if str(f["key"]) == key else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def fid_during_training(ema, cfg, reference, step, vae, device, amp, rank=0, world=1):
    """FID of the EMA weights theta** (what the paper evaluates) for each of cfg.fid_steps, cfg.fid_n samples
    at guidance cfg.fid_w (0: cfg.w), on every process -> the log.jsonl row on rank 0 (None on the others):
    {"step", "event": "fid", "n", "w", "reference", "fid_<k>step" for each k, "seconds"}.
    The noise is that of samples 0..fid_n-1 with the run's seed (noise_and_label: numpy, per sample), the
    same at every evaluation, so the curve follows the weights, not the draw; no torch random stream is
    touched, so the run continues exactly as without the evaluation (tested)."""
    config, w = dataclasses.asdict(cfg), cfg.fid_w or cfg.w
    was_training = ema.training
    ema.eval()
    t0 = time.perf_counter()
    row = dict(step=step, event="fid", n=cfg.fid_n, w=w, reference=reference.source if reference else None,
               standin=fid.STANDIN["on"])
    for k in fid_step_counts(cfg.fid_steps):
        result = run(ema, config, cfg.fid_n, k, w, cfg.seed, batch_size=cfg.fid_batch, device=device, vae=vae,
                     amp=amp, rank=rank, world=world, desc=f"FID-{cfg.fid_n}, {k} step(s)", leave=False)
        if rank == 0:
            row[f"fid_{k}step"] = fid_against(result["features"], reference)
    ema.train(was_training)
    row["seconds"] = time.perf_counter() - t0
    return row if rank == 0 else None
