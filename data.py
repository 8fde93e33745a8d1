"""
The data of train.py, and the SD-VAE around it:
  - the embedded 8x8 digits (pixels, in memory) and ImageNet as SD-VAE latents (a memory-mapped cache);
  - one step's batch, a pure function of (seed, step) whatever the number of processes (make_batch);
  - an image folder in ImageNet layout, centre-cropped as ADM does, encoded once into that cache;
  - the VAE (stabilityai/sd-vae-ft-ema through diffusers) that encodes images and decodes samples, and
    its architecture with random weights (RandomVAE) for timing without the weights;
  - the sample grids train.py writes as a run goes (sample_grid, save_png).
Also what the files above share: the error types of the command lines and how the scripts report them
(run_script), and the atomic file writes of the latent cache, the checkpoints and the logs.

Encode an image folder once, without training (before a multi-node run, say; train.py calls open_data):
$ python train.py --res 256 --data /path/to/imagenet/train --steps 0
"""

import dataclasses
import datetime
import errno
import gc
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import warnings
import zipfile
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import tvm


# ------------------------------------------------------------------------------------------------
# Errors a person can fix, and how the scripts report them
# ------------------------------------------------------------------------------------------------

class TrainError(Exception):
    """A problem the person running train.py can fix; the message says what to do."""


class SampleError(Exception):
    """A problem the person running sample.py can fix; the message says what to do."""


def run_script(main, script):
    """`python <script>`: main(), then exit. A TrainError or SampleError (a problem the person can fix) is
    printed as "<script>: error: ...", exit status 2, as argparse reports a bad option; an int that main
    returns is the exit status (that of benchmark.py run as a program), anything else is success."""
    try:
        result = main()
    except (TrainError, SampleError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


def file_in_the_way(folder):
    """The file that stands where `folder`, or a folder above it, would have to be made; None if there is none."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


# ------------------------------------------------------------------------------------------------
# Waiting for the other processes while one works alone
# ------------------------------------------------------------------------------------------------

# Some waits are long by design: rank 0 reads an image folder given as --fid_ref (all of it through
# Inception) or gathers and writes a 10 GB .npz, one process finishes its share of the latent encoding
# before another, rank 0 computes the digits' FID on a CPU at the end of a run. Under NCCL a collective that
# waits more than 10 minutes (torch's default for NCCL; 30 for gloo) ends the whole job from its watchdog,
# so these waits go through a gloo group of their own with a long timeout, made once by join_patient_group()
# right after the main group. The training step's collectives stay on the main group, whose short timeout
# still finds a real hang within minutes.
PATIENT_TIMEOUT_S = 6 * 3600
_PATIENT = {"group": None, "main": None}


def join_patient_group(timeout_s=PATIENT_TIMEOUT_S):
    """Every process, right after init_process_group (dist.new_group is collective): the gloo group of the
    long waits. destroy_process_group() destroys it with the main group."""
    try:
        _PATIENT["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise TrainError(f"could not connect the processes through gloo ({e}), which carries the long waits "
                         "(data.PATIENT_TIMEOUT_S): on several machines set GLOO_SOCKET_IFNAME to the network "
                         "interface they reach each other on (e.g. GLOO_SOCKET_IFNAME=eth0)") from None
    _PATIENT["main"] = dist.group.WORLD


def patient_group():
    """The group of the long waits; the main group (None) where join_patient_group was not called (one
    process, or a script that set up the group itself)."""
    if not dist.is_initialized() or dist.group.WORLD is not _PATIENT["main"]:   # none, or one of an earlier main group
        return None
    return _PATIENT["group"]


def wait_for_all():
    """A barrier of every process that waits as long as the work of the slowest one (patient_group)."""
    dist.barrier(group=patient_group())


def leave_process_group():
    """Destroy the process groups, if there are any, as the last thing the process does with them (PyTorch's
    docs: once per process, near the end of main), after everything that holds one is gone: the DDP module
    (its Reducer holds the main group; the caller drops it first), and the patient group's handle here. A
    group that outlives destroy_process_group is destroyed at exit instead, where ~ProcessGroupGloo joins
    its threads: with the DDP module alive that hung about once in 20 runs of the two-process test, and with
    the patient group's handle kept it aborted ("terminate called without an active exception") about once
    in 10. gc.collect(): what only reference cycles still hold is freed now, not at some later collection."""
    _PATIENT["group"] = _PATIENT["main"] = None
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def on_rank_0(fn, rank, world):
    """fn() on rank 0 only -> its result there, None on the others, who wait (patient_group) until it is
    done. A TrainError or SampleError it raises is raised on every rank; any other exception is raised on
    rank 0 as it was and as a RuntimeError naming it on the others. Without this the others would wait for
    rank 0 until the group's timeout."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (TrainError, SampleError) as e:
            error = (type(e).__name__, str(e))
        except Exception as e:
            if world == 1:
                raise
            failure, error = e, ("RuntimeError", f"rank 0 stopped with {type(e).__name__}: {e} (see its output)")
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0, group=patient_group())
        error = box[0]
    if error:
        if rank == 0 and error[0] == "RuntimeError":
            raise failure
        raise {"TrainError": TrainError, "SampleError": SampleError, "RuntimeError": RuntimeError}[error[0]](error[1])
    return result


# ------------------------------------------------------------------------------------------------
# Atomic writes: a file is replaced whole or not at all
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


def open_run_file(path, mode):
    """open(path, mode) ("a+", "a" or "w") for a file that a run keeps open in its folder (.lock, log.jsonl),
    refusing what is not a regular file: a symbolic link planted at that fixed name would make the run
    write into the link's target (O_NOFOLLOW), and a folder or a FIFO would fail deep inside, or block
    (O_NONBLOCK, which does not change a regular file's reads and writes). -> the file object."""
    flags = {"a+": os.O_RDWR | os.O_APPEND, "a": os.O_WRONLY | os.O_APPEND, "w": os.O_WRONLY | os.O_TRUNC}[mode]
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        fd, error = None, e.strerror
    if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        fd = None
    if fd is None:
        kind = stat.S_IFMT(os.lstat(path).st_mode) if os.path.lexists(path) else None
        what = ("is a symbolic link" if kind == stat.S_IFLNK else "is not a regular file" if kind not in (None, stat.S_IFREG)
                else f"cannot be opened ({error})")
        raise TrainError(f"{path} {what}, where the run keeps a file of its own: remove it (the run writes "
                         "only into files it makes), or choose another --out")
    return os.fdopen(fd, mode, buffering=1 if mode != "a+" else -1)


def _atomic_write_text(path, text):
    _write_atomically(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------------------
# Data. Digits: pixels in memory. ImageNet: SD-VAE latents, memory-mapped from a .npy file.
# ------------------------------------------------------------------------------------------------

# Per-channel statistics of raw SD-VAE (ft-ema) latents, from IMM, as the official configs give them
# (configs/im256_*.yaml, im512_*.yaml: the encoder's raw_mean and raw_std). Training data is
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


def _file_kind(path):
    """What a file is, from its first bytes, in the words of an error message."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "an .npz (zip) archive"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array"
    if head.startswith(b"\x80"):
        return "a pickle"
    return f"a file of another kind (it starts {head!r})"


class DigitsData:
    """The 1,797 8x8 digits of UCI "Optical Recognition of Handwritten Digits" (values 0..16, labels
    0..9), as pixels in [-1, 1]: x0 = v / 8 - 1. Small enough to hold in memory on every rank."""

    def __init__(self, path):
        if os.path.isdir(path):
            raise TrainError(f"--data {path} is a folder; the digits (--res 0) are one file, data/digits.npz. "
                             "For an image folder or latents, pass --res 256 or 512")
        if not os.path.exists(path):
            raise TrainError(f"--data {path}: no such file. The digits ship with the project as "
                             "data/digits.npz; restore it with `git checkout data/digits.npz`")
        want = ("--res 0 reads the digits: an .npz archive of 'images' (N, H, H), values 0..16, and integer "
                "'labels' (N,), as data/digits.npz; for ImageNet pass --res 256 or 512")
        if not os.path.isfile(path):
            raise TrainError(f"--data {path} is not a regular file (a FIFO or a device?). {want}")
        try:
            kind = _file_kind(path)
        except OSError as e:
            raise TrainError(f"--data {path} cannot be read ({e.strerror}). {want}") from None
        if kind != "an .npz (zip) archive":
            why = " (a pickle is never loaded: unpickling can run code; save the arrays with numpy.savez)"
            raise TrainError(f"--data {path} is {kind}, not an .npz archive{why if kind == 'a pickle' else ''}. {want}")
        try:
            with np.load(path) as d:           # allow_pickle=False: arrays of Python objects are refused
                if not {"images", "labels"} <= set(d.files):
                    names = ", ".join(d.files[:4]) + (", ..." if len(d.files) > 4 else "")
                    raise TrainError(f"--data {path} holds {names or 'nothing'}, not 'images' and 'labels'. {want}")
                images, labels = d["images"], d["labels"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise TrainError(f"--data {path} is not a readable .npz archive ({e}). {want}") from None
        if (images.ndim != 3 or images.shape[1] != images.shape[2] or not len(images) or images.dtype.kind not in "iuf"
                or labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise TrainError(f"--data {path} holds images {images.dtype} {images.shape} and labels {labels.dtype} "
                             f"{labels.shape}. {want}")
        side, classes = tvm.DIT_LIMITS["input_size"][1], tvm.DIT_LIMITS["num_classes"][1]
        if images.shape[1] % 2 or not 2 <= images.shape[1] <= side or not 0 <= labels.min() <= labels.max() < classes:
            raise TrainError(f"--data {path} holds {images.shape[1]} x {images.shape[1]} images with labels "
                             f"{labels.min()}..{labels.max()}: the DiT cuts 2 x 2 patches, so the side must be even, "
                             f"2..{side}, and the labels must be class numbers 0..{classes - 1:,}. " + want)
        self.images = torch.from_numpy(images.astype(np.float32) / 8.0 - 1.0)[:, None]      # (N, 1, 8, 8)
        self.labels = labels.astype(np.int64)                                              # (N,)
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
    sample mean + std * eps is drawn afresh at every step, as in the official code (training/encoders.py,
    StabilityVAEEncoder.encode_latents)."""

    def __init__(self, path, res):
        if os.path.isdir(path):
            path = os.path.join(path, "latents.npy")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise TrainError(f"--data {path}: no such latent file. Pass an image folder to encode it, or the "
                             "latents.npy (or its folder) that an earlier run wrote")
        kind = _file_kind(path)
        if kind != "a .npy array":
            raise TrainError(f"--data {path} is {kind}, not a latents.npy. --res {res} reads an image folder in "
                             "ImageNet layout (DIR/<class>/<image>.JPEG) or the latents.npy (or its folder) that an "
                             "earlier run wrote" + ("; the digits' .npz is --res 0" if "npz" in kind else ""))
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
        """Entries step * batch_size ... of the sequence, one run of each epoch's permutation at a time (time
        linear in batch_size, also when a batch spans many epochs)."""
        out, k = np.empty(batch_size, dtype=np.int64), 0
        while k < batch_size:
            epoch, i = divmod(step * batch_size + k, self.n)
            take = min(self.n - i, batch_size - k)
            out[k:k + take] = self.perm(epoch)[i:i + take]
            k += take
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
            # Past PIL's MAX_IMAGE_PIXELS (89 million) PIL only warns up to twice that: a 20 KB PNG of
            # 13000 x 13000 then takes 0.5 GB in each loader worker. An error here, as beyond twice.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
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

    def prepare():                           # rank 0: the files of the cache, or why they cannot be made
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
    on_rank_0(prepare, rank, world)          # an error stops every process, not only rank 0
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
        wait_for_all()                       # every share encoded

    def finish():
        if not np.all(np.load(done_path)):
            raise TrainError(f"encoding of {root} is incomplete; run again to finish it")
        _atomic_write_text(meta_path, json.dumps(dict(info, classes=classes, root=os.path.abspath(root)), indent=1))
    on_rank_0(finish, rank, world)
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
            blocker = file_in_the_way(cache)
            if blocker:
                raise TrainError(f"the latent cache {cache}: {blocker} is a file, so the latents of {cfg.data} "
                                 "cannot be written there: choose another folder with --latent_cache")
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

# How VAE.decode runs. FID-50K spends nearly all its time in the decoder (an H200 decodes 34 images/s in
# float32 with TF32 off, 392 in bf16), hence faster modes, each measured against "exact" by benchmark.py
# (python sample.py --benchmark: images/s and how many uint8 values differ). A Decoder's fields:
#   precision      "float32": TF32 off, as training runs (Table 6); the reference.
#                  "tf32": float32 weights and activations, convolutions and matmuls in TF32 (10-bit mantissa).
#                  "bfloat16": the decoder's weights and activations cast to bf16 (8-bit mantissa).
#                  "bfloat16-autocast": float32 weights under bf16 autocast (a variant benchmark.py measures).
#   channels_last  the decoder's weights and input in NHWC, the layout of cuDNN's tensor-core convolutions.
#   compile        None (eager) or a torch.compile mode, "default" or "max-autotune" (the official code compiles
#                  its VAE with mode="max-autotune", fullgraph=True, in float32). CUDA only: on a CPU the
#                  decoder runs eager and describe() says so (tests run every mode's code path on a CPU).
#   batch          latents per decoder call: to_uint8_images's chunks; a compiled decoder sees only this shape.
# bf16 casts the weights rather than autocasting: the same arithmetic on a CPU as on a GPU (CUDA autocast
# runs GroupNorm in float32, the CPU's does not), so the tests here check what a GPU runs, and no weights
# are cast per call. GroupNorm in bf16 is the error risk; under autocast it would be float32, but its input
# is a bf16 convolution output either way and the next convolution rounds its output to bf16 again.
@dataclasses.dataclass(frozen=True)
class Decoder:
    precision: str = "float32"
    channels_last: bool = False
    compile: str = None
    batch: int = 32

    def __post_init__(self):
        if self.precision not in ("float32", "tf32", "bfloat16", "bfloat16-autocast") \
                or self.compile not in (None, "default", "max-autotune") or self.batch < 1:
            raise ValueError(f"{self}: precision float32, tf32, bfloat16 or bfloat16-autocast; compile None, "
                             "default or max-autotune; batch >= 1")


DECODERS = {
    "exact": Decoder("float32"),                                    # the reference, and the default
    "tf32": Decoder("tf32", channels_last=True),
    "bf16": Decoder("bfloat16", channels_last=True),
    "float32-compiled": Decoder("float32", compile="max-autotune"),     # the official code's decoder
    "tf32-compiled": Decoder("tf32", channels_last=True, compile="max-autotune"),
    "bf16-compiled": Decoder("bfloat16", channels_last=True, compile="max-autotune"),
}

# When a faster mode may become the default: decoding the same latents as "exact", at most 0.1% of the
# uint8 values (pixel x channel) differ by more than 1 grey level, and none by more than 8 (3% of the
# range); pixel_difference and meets_decoder_rule apply it. It needs a GPU measurement with the real
# weights (python sample.py --benchmark --out DIR --vae stabilityai/sd-vae-ft-ema), which nobody has made
# yet: until then the default stays "exact".
DECODER_RULE = dict(share_over_1=1e-3, max_diff=8)


def decoder_key(d):
    """Decoder -> its name in benchmark.json: precision, -cl (channels_last), -<compile mode>, _b<batch>.
    DECODERS["exact"] is float32_b32, the key the benchmark has always written for it."""
    return d.precision + ("-cl" if d.channels_last else "") + (f"-{d.compile}" if d.compile else "") + f"_b{d.batch}"


def _tf32_flags():
    """Every copy of PyTorch's TF32 switches, in the order to restore them: float32_matmul_precision (which
    torch.backends.cuda.matmul.allow_tf32 reads and writes), cuDNN's allow_tf32, and from PyTorch 2.9 the
    fp32_precision strings ("none": inherit), which setting the first two overwrites. This code sets TF32
    through the first two, as train.py and sample.py do (PyTorch refuses to read them once the strings
    were set apart from them)."""
    flags = {(torch, "float32_matmul_precision"): torch.get_float32_matmul_precision(),
             (torch.backends.cudnn, "allow_tf32"): torch.backends.cudnn.allow_tf32}
    c = torch.backends.cudnn
    for obj in (torch.backends.cuda.matmul, getattr(c, "conv", None), getattr(c, "rnn", None), c, torch.backends):
        if hasattr(obj, "fp32_precision"):
            flags[obj, "fp32_precision"] = obj.fp32_precision
    return flags


@contextmanager
def tf32(on):
    """TF32 on (or off) for CUDA matmuls and cuDNN convolutions inside the block only; afterwards every
    flag is what it was, so training and sampling (TF32 off, Table 6) are untouched by a decode."""
    saved = _tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        for (obj, name), value in saved.items():
            if name == "float32_matmul_precision":
                torch.set_float32_matmul_precision(value)
            else:
                setattr(obj, name, value)


class VAE:
    """The SD-VAE: encode_moments (float32, for the latent cache) and decode in a mode of DECODERS (a name,
    or a Decoder for benchmark.py's variants)."""

    def __init__(self, name, device, decoder="exact"):
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
        self._set_decoder(decoder)

    def _set_decoder(self, decoder):
        if isinstance(decoder, Decoder):
            self.mode = next((k for k, d in DECODERS.items() if d == decoder), decoder_key(decoder))
        elif decoder in DECODERS:
            self.mode = decoder
        else:
            raise ValueError(f"decoder {decoder!r}: expected one of {list(DECODERS)} or a data.Decoder")
        d = self.decoder = DECODERS.get(decoder, decoder)
        self.batch = d.batch
        self.device = next(self.vae.parameters()).device
        # Only the decoding path (post_quant_conv, then the decoder) changes: encode_moments stays float32.
        self.dtype = torch.bfloat16 if d.precision == "bfloat16" else torch.float32
        for part in (getattr(self.vae, "post_quant_conv", None), self.vae.decoder):
            if part is not None and (self.dtype != torch.float32 or d.channels_last):
                part.to(self.dtype, memory_format=torch.channels_last if d.channels_last else torch.contiguous_format)

        def decode(z):
            return self.vae.decode(z).sample
        self.compiled = d.compile is not None and self.device.type == "cuda"
        self._decode = torch.compile(decode, mode=d.compile, fullgraph=True) if self.compiled else decode

    def describe(self):
        """One line: the mode that decode() runs, as it runs on this device."""
        d = self.decoder
        how = {"float32": "float32, TF32 off", "tf32": "float32, TF32 on", "bfloat16": "bf16 weights and activations",
               "bfloat16-autocast": "float32 weights, bf16 autocast"}[d.precision]
        how += ", channels_last" if d.channels_last else ""
        if self.compiled:
            how += f", torch.compile {d.compile}"
        elif d.compile:
            how += f", eager: torch.compile {d.compile} runs on CUDA only, this is {self.device.type}"
        else:
            how += ", eager"
        return f"decoder: {self.mode} ({how}; batches of {d.batch} on {self.device.type})"

    @torch.no_grad()
    def encode_moments(self, img):  # (n, 3, H, W) in [-1, 1] -> (n, 8, H/8, W/8): posterior mean, std
        d = self.vae.encode(img).latent_dist
        return torch.cat([d.mean, d.std], dim=1)

    @torch.no_grad()
    def decode(self, z):  # (n, 4, h, w) raw latents -> (n, 3, 8h, 8w) float32, in about [-1, 1]
        d = self.decoder
        if self.compiled and len(z) != d.batch:
            # The compiled graph has one shape: chunks of d.batch, the last one padded with zero latents
            # (each image is decoded on its own: GroupNorm and attention do not mix the images of a batch).
            out = []
            for i in range(0, len(z), d.batch):
                chunk = z[i:i + d.batch]
                padded = torch.cat([chunk, chunk.new_zeros(d.batch - len(chunk), *chunk.shape[1:])])
                out.append(self.decode(padded)[:len(chunk)])
            return torch.cat(out)
        z = z.to(self.dtype)
        if d.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(z.device.type, torch.bfloat16) if d.precision == "bfloat16-autocast" else nullcontext()
        with tf32(d.precision == "tf32"), amp:
            out = self._decode(z)
        # max-autotune replays CUDA graphs, whose next call frees this output: a caller keeping several
        # chunks would read freed memory (torch raises). .float() copies a bf16 output but returns a float32
        # one as it is, so a compiled float32 output is cloned.
        return out.clone() if self.compiled and out.dtype == torch.float32 else out.float()   # exact: out as it is


def load_vae(device, name="stabilityai/sd-vae-ft-ema", decoder="exact"):
    return VAE(name, device, decoder)


def pixel_difference(a, b):
    """Two uint8 image arrays of one shape (e.g. (N, H, W, 3)) -> how far apart they are, over their values
    (pixel x channel): share_differ (the share of values not equal), share_over_1 (the share that differ by
    more than 1 grey level), max_diff (the largest difference, in grey levels), values (how many)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"pixel_difference compares two uint8 arrays of one shape: {a.dtype} {a.shape} "
                         f"and {b.dtype} {b.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return dict(share_differ=float((diff > 0).mean()), share_over_1=float((diff > 1).mean()),
                max_diff=int(diff.max(initial=0)), values=int(diff.size))


def meets_decoder_rule(diff):
    """pixel_difference(mode's images, exact's images) -> whether the mode meets DECODER_RULE."""
    return diff["share_over_1"] <= DECODER_RULE["share_over_1"] and diff["max_diff"] <= DECODER_RULE["max_diff"]


@torch.no_grad()
def to_uint8_images(x0, config_dict, vae=None, batch=None):
    """Model samples -> uint8 (N, H, W, 3). Digits: pixels in [-1, 1], grey repeated to RGB. Latents:
    un-normalised with LATENT_STATS and decoded by the VAE (loaded here if not given) in chunks of `batch`
    latents (default: the VAE's decoder mode's, 32).
    round((x + 1) * 127.5) equals EDM2's (x * 127.5 + 128).clip(0, 255).to(uint8)."""
    res = config_dict["res"]
    if res == 0:
        img = x0.float()
    else:
        vae = vae or load_vae(x0.device)
        batch = batch or getattr(vae, "batch", 32)
        dtype = next(vae.vae.parameters()).dtype
        mean, std = _stats(res, x0.device, torch.float32)
        z = x0.float() * std + mean
        img = torch.cat([vae.decode(z[i:i + batch].to(dtype)).float() for i in range(0, len(z), batch)])
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


# The SD-VAE's architecture (stabilityai/sd-vae-ft-ema and sd-vae-ft-mse share it: their config.json), for
# a decoder of the same shape and cost with random weights (--vae random: timing and tests without the
# weights, which cannot be downloaded everywhere).
SD_VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


class RandomVAE(VAE):
    """VAE (encode_moments, decode, describe) around an AutoencoderKL built from SD_VAE_CONFIG with random
    weights (seeded): the real decoder's cost, not its images. config: entries of SD_VAE_CONFIG to replace,
    e.g. a narrow decoder for the tests (block_out_channels=[32] * 4, norm_num_groups=8): same code path."""

    def __init__(self, device, seed=0, decoder="exact", config=None):
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise SampleError("--vae random builds diffusers' AutoencoderKL: `pip install diffusers`") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL.from_config({**SD_VAE_CONFIG, **(config or {})})
            self.vae = vae.to(device).eval().requires_grad_(False)
        self._set_decoder(decoder)


# ------------------------------------------------------------------------------------------------
# Sample grids: what train.py shows of a run as it goes
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
