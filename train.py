r"""
Train a Terminal Velocity Matching model (arXiv 2511.19797, Algorithm 1), from a laptop demo to
ImageNet-512 on several nodes. The method itself lives in tvm.py, the data and the SD-VAE in data.py, the
options and presets in config.py; this file is the training step, the loop, checkpoints and logs.

The embedded demo: 1,797 8x8 handwritten digits (data/digits.npz), a tiny DiT, CPU, 6-26 minutes on 2 cores:
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

# The files, each a chapter, and what each imports (at its top, nowhere else): only files listed below it.
#   benchmark.py     imports  sample, train, step, evaluate, config, data, fid, tvm, attention_jvp  timings
#   sample.py        imports  released, train, evaluate, data, fid                        sampling, FID command
#   evidence.py      imports  step, config, data, fid, tvm                                small-scale evidence
#   released.py      imports  train, config, data, tvm                                    official .pkl loader
#   train.py         imports  step, evaluate, config, data, fid, tvm, attention_jvp       loop, checkpoints
#   evaluate.py      imports  config, data, fid, tvm                                      samples at scale, FID
#   step.py          imports  data, tvm                                                   the training step
#   config.py        imports  data, tvm                                                   options, presets
#   data.py          imports  tvm                                                         data sets, SD-VAE
#   fid.py           imports  nothing of the project                                      FID
#   tvm.py           imports  attention_jvp                                               the method, the DiT
#   attention_jvp.py imports  nothing of the project                                      the attention kernel
# train.py --benchmark and sample.py --benchmark run benchmark.py as a program (run_benchmark), since
# benchmark.py imports them.

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from contextlib import ExitStack, closing, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import attention_jvp
import evaluate
import fid
from evaluate import report_fid   # train.report_fid: what _finish calls (the tests replace it)
import tvm
from config import (MODELS, PRESETS, TINY, TrainConfig, build_net, check_resumable, config_errors,  # noqa: F401
                    model_kwargs, parse_config, precision_on, prepare_net, resolve, stored_config_errors)
# The step's names stay reachable as train.X (benchmark.py and the tests use them).
from step import (STAT_NAMES, CudaGraphStep, FlatGradients, broadcast_from_rank_0, make_optimizer,  # noqa: F401
                  make_step, step_on_device, step_report, train_step)
from data import (EpochSampler, SampleError, TrainError, _atomic_write_text, _write_atomically, file_in_the_way,
                  join_patient_group, leave_process_group, load_vae, make_batch, on_rank_0, open_data, open_run_file,
                  run_script, sample_grid, save_png, to_uint8_images, wait_for_all)

try:
    import fcntl          # the run-folder lock (POSIX)
except ImportError:
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete, and loadable with weights_only=True
# ------------------------------------------------------------------------------------------------

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
    rate, then measured (`python benchmark.py checkpoint DIR 13.5`, 2 cores of an AMD EPYC, 2026-12-05): on a 13.5 GiB
    checkpoint (XL/2-18h's size) the check took 9.6 s just after the save (1.4 GiB/s), 4.7 s from the page
    cache (2.9 GiB/s), against 16.7 s for torch.load: a resume or a sample.py start takes 5-10 s longer."""
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
    try:
        damaged = damaged_member(path)
    except OSError as e:
        raise TrainError(f"{path} cannot be read ({e.strerror}): give the ckpt.pt a train.py run wrote.") from None
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
    wrong = stored_config_errors(state["config"]) + [f"its {k} is a {type(state[k]).__name__}, not a state dict"
                                                     for k in ("model", "ema", "target", "opt") if not isinstance(state[k], dict)]
    if wrong:
        raise TrainError(f"{path} is not a checkpoint train.py wrote, or it was changed: {wrong[0]}." + other)
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
    state = load_checkpoint(path, "cpu")      # load_weights copies the one set it needs onto the device
    net = build_net(state["config"]).to(device)
    load_weights(net, state[which], path, which)
    return net.eval().requires_grad_(False), state["config"]


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
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else "nccl" if want_cuda else "gloo"
    if want_cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend == "nccl":
            raise TrainError(f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this machine but {gpus} GPU(s): "
                             f"NCCL needs one GPU per process. Pass --nproc_per_node={gpus} to torchrun")
        local_rank %= gpus                     # gloo: processes beyond the GPU count share them
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    join_patient_group()                   # data.py: the long waits' own group and timeout
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


def run_benchmark(kind, argv=None):
    """train.py --benchmark and sample.py --benchmark: `python benchmark.py step|sample` with the same options,
    in a process of its own. benchmark.py imports train.py and sample.py (it times their code), so neither
    imports it. -> its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = ["-B"] if sys.flags.dont_write_bytecode else []
    return subprocess.call([sys.executable, *flags, os.path.join(HERE, "benchmark.py"), kind, *argv])


def main(argv=None):
    """-> the resolved config of the finished run; with --benchmark, the benchmark's exit status."""
    cfg = parse_config(argv, description=__doc__)
    fid.limit_cpu_threads(cfg.device)
    if cfg.benchmark:
        return run_benchmark("step", argv)
    fid.STANDIN["on"] = cfg.fid_standin
    with attention_jvp.use_backend(cfg.attention):
        try:
            return train(cfg)
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise TrainError(out_of_memory(e, cfg)) from None
        except RuntimeError as e:
            if "can't allocate memory" not in str(e):        # the CPU allocator's words
                raise
            raise TrainError(out_of_memory(e, cfg)) from None
        except BaseException as e:
            if dist.is_initialized():
                # The traceback keeps train's and _train's frames, and in them the DDP module, alive: clear
                # their variables (the traceback still shows every line) so that leave_process_group can free it.
                traceback.clear_frames(e.__traceback__)
            raise
        finally:
            fid.STANDIN["on"] = False
            leave_process_group()


def out_of_memory(e, cfg):
    """The one line for a run that ran out of memory (host or GPU), instead of the allocator's traceback."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return (f"out of memory ({first}) with --batch_size {cfg.batch_size} and a {cfg.depth}-block, {cfg.hidden_size}-wide "
            f"network: lower --batch_size, set --micro_batch (gradient accumulation), or --checkpoint_blocks true; "
            f"the last checkpoint in {cfg.out} (if any) is kept")


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
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        blocker = file_in_the_way(out)
        raise TrainError(f"--out {out}: " + (f"{blocker} is a file, so the run folder (ckpt.pt, log.jsonl, the "
                         "sample grids) cannot be made there" if blocker else f"cannot make the run folder "
                         f"({e.strerror})") + ": choose another --out") from None
    if fcntl is None:   # not a POSIX system: no lock
        return None
    f = open_run_file(os.path.join(out, ".lock"), "a+")
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


class RunLog:
    """Rank 0's log.jsonl, the record of the run: row(dict) appends one JSON line and flushes it. With --tensorboard
    DIR each number of a row (not its step, not a true/false) is copied to TensorBoard in DIR at global_step = the
    row's step, tagged train/<key> for the rows of --log_every, else <the event's first word>/<key> (fid/fid_1step).
    resume_step: log.jsonl keeps its rows up to it. Event files cannot be cut: purge_step makes TensorBoard hide
    DIR's events past it (a new run: all), at once in its Python reader (--load_fast=false); its default one
    drops a curve's later points when the resumed run writes that curve again (an event's curve may stay)."""

    def __init__(self, path, tensorboard="", resume_step=None):
        if resume_step is not None and os.path.isfile(path):
            # Rows past the checkpoint were written by steps that are now done again: drop them.
            with open_run_file(path, "a+") as f:                       # not a link, a FIFO or a folder
                f.seek(0)
                rows = [line for line in f if self.step_of(line) <= resume_step]
            _atomic_write_text(path, "".join(rows))
        self.file, self.tb = open_run_file(path, "w" if resume_step is None else "a"), None   # flushed per line
        if tensorboard:   # an optional package, imported only when asked for (config_errors checked that it is there)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(tensorboard, purge_step=0 if resume_step is None else resume_step + 1)

    def row(self, row):
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            kind = re.match(r"\w*", row.get("event", "train")).group()      # train, fid, skipped, stopped
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, global_step=row["step"])
            self.tb.flush()

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def step_of(line):
        """The step of a log.jsonl row; a half-written row (a crash mid-write) counts as past every step."""
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            return math.inf


def check_attention(cfg, device):
    """--attention triton where the kernel cannot run (a CPU without Triton's interpreter, fp64, a head dim
    over 128) is refused before the run starts, not at its first step."""
    if cfg.attention != "triton":
        return
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[precision_on(cfg.precision, device)]
    q = torch.zeros(1, 1, 2, max(cfg.hidden_size // cfg.num_heads, 1), device=device, dtype=dtype)
    reason = attention_jvp._triton_unsupported(q, q, q)
    if reason:
        raise TrainError(f"--attention triton cannot run here: {reason}. Use --attention auto (the kernel where it "
                         "runs, else the exact math attention) or reference")


def train(cfg):
    rank, world, device = setup_distributed(cfg)
    check_batch(cfg, world)
    check_attention(cfg, device)
    master = rank == 0

    if cfg.steps == 0:   # only encode the image folder (config_errors allows 0 only for --res 256/512)
        data = open_data(cfg, rank, world, device)
        if master:
            print(f"--steps 0: the latents of {cfg.data} are ready ({len(data):,} images); nothing trained, "
                  f"nothing written to {cfg.out}")
        if world > 1:
            wait_for_all()     # main's leave_process_group then destroys the group
        return cfg

    lock = on_rank_0(lambda: lock_run_folder(cfg.out), rank, world)   # one run per folder
    with lock or nullcontext(), ExitStack() as on_exit:   # however _train ends: its log closed, then the lock
        return _train(cfg, rank, world, device, on_exit)


def _train(cfg, rank, world, device, on_exit):
    """The run itself, inside the lock of its folder: the networks, a resumed state, then the steps (on_exit
    closes rank 0's RunLog however it ends)."""
    master = rank == 0
    cuda = device.type == "cuda"
    precision = precision_on(cfg.precision, device)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    # cache_enabled=False: autocast's cache of cast weights must not outlive a CUDA-graph capture
    amp = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = False          # Table 6: TF32 off
    torch.backends.cudnn.allow_tf32 = False

    data = _open_data(cfg, rank, world, device)
    decodes = cfg.res and ((cfg.sample_every and master) or cfg.fid_every)   # grids on rank 0, FID on every rank
    vae = load_vae(device, cfg.vae, cfg.decoder) if decodes else None
    reference = on_rank_0(lambda: evaluate.load_reference(cfg.fid_ref, device=device, error=TrainError),
                          rank, world) if cfg.fid_every else None          # before training: a bad one fails now
    net, ema, target, model, opt, flat = _build(cfg, world, device, dtype)

    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if cfg.resume:
        step = _resume(cfg, net, ema, target, opt, ckpt_path, rank, world)
    elif os.path.exists(ckpt_path):
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    else:
        step = 0
    saved_step = step
    log = on_exit.enter_context(closing(_start_log(cfg, net, data, world, device, precision, step, log_path))) \
        if master else None

    def checkpoint():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        # Rank 0 writes (13.5 GB for XL/2); the others wait for it through the patient group, not in the next
        # step's NCCL collective, whose watchdog a slow disk could outlast; a full disk stops every rank.
        on_rank_0(lambda: save_checkpoint(dict(config=dataclasses.asdict(cfg), model=net.state_dict(),
                                               ema=ema.state_dict(), target=target.state_dict(), opt=opt.state_dict(),
                                               step=step, rng=rngs, world_size=world), ckpt_path), rank, world)

    def samples():
        def draw():          # rank 0, while the others wait (a compiled decoder's first call takes minutes)
            ema.eval()
            grid = sample_grid(ema, cfg, device, vae, amp=amp)
            save_png(grid, os.path.join(cfg.out, f"samples_{step:07d}.png"))
            save_png(grid, os.path.join(cfg.out, "samples.png"))
        on_rank_0(draw, rank, world)

    step_fn = make_step(model, net, ema, target, opt, cfg, amp, graph=cfg.cuda_graph, flat=flat)
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
                _stop_on_non_finite_weights(stats, step, cfg, ckpt_path, saved_step, log)
            if stats["skipped"]:
                skipped_in_a_row += 1
                skipped += 1
                _report_skipped(stats, step, skipped_in_a_row, ckpt_path, saved_step, log)
            else:
                skipped_in_a_row = 0
                acc.append(stats)
            if master and acc:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", terminal=f"{stats['terminal']:.4f}",
                                fm=f"{stats['fm']:.4f}", gnorm=f"{stats['grad_norm']:.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if master and acc:
                    _write_log_row(log, acc, step, n_last, t_last, cfg, cuda)
                acc, t_last, n_last = [], time.time(), step
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                samples()
            if cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps):   # every rank samples its share
                _report_fid_during_training(evaluate.fid_during_training(ema, cfg, reference, step, vae, device, amp,
                                                                         rank, world), cfg, log)
            flags = _save_flags(stop, cfg, t_saved, world, device)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or flags[0] or flags[1]:
                checkpoint()
                saved_step, t_saved = step, time.time()
            if flags[0]:
                signum = int(flags[0])
                if master:
                    log.row(dict(step=step, event=f"stopped by {signal.Signals(signum).name}"))
                bar.close()
                raise Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {step}: {ckpt_path} "
                                      "saved; continue with the same command and --resume")
    bar.close()
    _stop_if_mostly_skipped(skipped, step - first_step, step, cfg, ckpt_path, log)
    _finish(cfg, ema, data, device, log, ckpt_path, log_path, world)
    return cfg


def _open_data(cfg, rank, world, device):
    """The data set, and the config fields it decides (shapes, classes), checked against the options."""
    data = open_data(cfg, rank, world, device)
    cfg.in_channels, cfg.input_size = data.shape[0], data.shape[1]
    cfg.num_classes = data.num_classes
    if cfg.res == 0 and cfg.fid and cfg.fid_samples < cfg.num_classes:   # report_fid's n would be 0
        raise TrainError(f"--fid_samples {cfg.fid_samples}: the FID's samples are balanced over the {cfg.num_classes} "
                         f"classes: give at least {cfg.num_classes}, or pass --fid false")
    return data


def _report_fid_during_training(row, cfg, log):
    """Rank 0 (row is None on the others): print the --fid_every row and write it to log.jsonl."""
    if row is not None:
        fids = ", ".join(f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("fid_"))
        tqdm.write(f"step {row['step']}: FID-{cfg.fid_n} of the EMA weights {fids} ({row['seconds']:.0f} s)"
                   + fid.STANDIN_NOTE * row["standin"])
        log.row(row)


def _stop_if_mostly_skipped(skipped, ran, step, cfg, ckpt_path, log):
    """A run that skipped more than MAX_SKIPPED_SHARE of the `ran` steps of this process does not end as done
    (rank 0: log is its open log)."""
    if skipped <= MAX_SKIPPED_SHARE * ran:
        return
    if log is not None:
        log.row(dict(step=step, event="stopped: too many steps skipped", skipped=skipped))
    raise TrainError(f"{skipped} of the {ran} steps of this run had a non-finite loss or gradient "
                     f"and were skipped (more than {MAX_SKIPPED_SHARE:.0%}): the run did not train as asked, so it "
                     f"does not end as done. {ckpt_path} (step {step}) is kept; {ran - skipped} of this run's "
                     f"steps updated it. Check the data for NaN or infinite values; if it is clean, start again (another "
                     f"--out) with a smaller --lr (now {cfg.lr:g}) or with --grad_clip 1.0")


def _finish(cfg, ema, data, device, log, ckpt_path, log_path, world):
    """After the last step: the digits' FID (rank 0: log is its RunLog, closed by train), all ranks out."""
    try:
        fid_row = report_fid(ema, cfg, data, device) if log is not None and cfg.res == 0 and cfg.fid else None
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT, f"stopped by SIGINT during the end-of-run FID: {ckpt_path} holds the finished "
                      "run; the same command with --resume computes the FID") from None
    if fid_row is not None:    # None: fid.py's weights are not installed
        log.row(fid_row)
    if log is not None:
        print(f"done: {ckpt_path}, {log_path}"
              + (f", {os.path.join(cfg.out, 'samples.png')}" if cfg.sample_every else ""))
    if world > 1:
        # All ranks leave together: rank 0 may still be writing the last checkpoint; tearing gloo down on
        # one rank while the other is still inside it hung a CPU test once (torch 2.13). The group itself is
        # destroyed by main's leave_process_group, once this function's variables (the DDP module) are gone.
        wait_for_all()


def _build(cfg, world, device, dtype):
    """-> the online network theta, its two EMAs (theta**, theta*), the loss module (DDP-wrapped on several
    processes unless --grad_sync flat), AdamW, and the FlatGradients of --grad_sync flat (else None)."""
    cuda = device.type == "cuda"
    if cfg.cuda_graph is None:
        cfg.cuda_graph = cuda and world == 1
    elif cfg.cuda_graph and not cuda:
        raise TrainError(f"--cuda_graph needs a GPU (here: {device.type}); pass --cuda_graph false")
    if cfg.grad_sync == "auto":
        cfg.grad_sync = "flat" if cfg.cuda_graph and world > 1 else "ddp"
    if cfg.cuda_graph and world > 1 and cfg.grad_sync != "flat":
        raise TrainError("--cuda_graph under torchrun needs --grad_sync flat (or auto): DDP all-reduces inside "
                         "the backward, which a CUDA graph cannot hold")
    torch.manual_seed(cfg.seed)
    net = build_net(cfg).to(device, dtype)
    ema = copy.deepcopy(net).requires_grad_(False)      # theta**, eval EMA
    target = copy.deepcopy(net).requires_grad_(False)   # theta*, the teacher in the loss
    prepare_net(net, cfg)                               # the EMA is not compiled; the target is
    prepare_net(target, cfg)
    # The whole loss, JVP included, is the forward of one module, and DDP wraps that module: DDP cannot
    # wrap a network that torch.func.jvp is then applied to (pytorch #102197, #182661).
    model = tvm.TVMLoss(net, scale_param=cfg.scale_param, detach_jvp=cfg.detach_jvp, jvp=cfg.jvp)
    flat = None
    if world > 1 and cfg.grad_sync == "flat":
        broadcast_from_rank_0([net, ema, target])
        flat = FlatGradients(net)
    elif world > 1:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    return net, ema, target, model, make_optimizer(net, cfg), flat


def _resume(cfg, net, ema, target, opt, ckpt_path, rank, world):
    """Load <out>/ckpt.pt into the networks and AdamW (and this rank's RNG states) -> its step."""
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
    if cfg.steps < step:
        raise TrainError(f"--steps {cfg.steps}: {ckpt_path} is already at step {step}, and --steps counts from the "
                         f"run's start: give more than {step} to train on (its weights stay as they are)")
    if len(state.get("rng", [])) == world:
        set_rng_state(state["rng"][rank])
    if rank == 0:
        print(f"resuming {ckpt_path} at step {step}" + "".join(
            f"\n  changed: {k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return step


def _start_log(cfg, net, data, world, device, precision, step, log_path):
    """Rank 0: print the run's settings, and open log.jsonl (a new run starts a new log; a resumed one is cut
    back to its checkpoint's step) -> its RunLog."""
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    n_params = sum(p.numel() for p in net.parameters())
    threads = "" if device.type == "cuda" else f" ({torch.get_num_threads()} intra-op thread(s) each)"
    print(f"{n_params:,} parameters; {len(data):,} training images, {cfg.num_classes} classes; {world} "
          f"process(es) on {device.type}{threads}, {precision}; {cfg.batch_size // world} samples per "
          f"process per step in micro-batches of {cfg.micro_batch or cfg.batch_size // world}")
    if cfg.compile:
        print("--compile: the DiT blocks are compiled during the first step (a minute or two on an H100)")
    return RunLog(log_path, cfg.tensorboard, resume_step=step if cfg.resume else None)


def _what_is_kept(ckpt_path, saved_step):
    """For a run that stops on an error: (what of it is kept, "resume" or "start again")."""
    if os.path.isfile(ckpt_path):
        return f"{ckpt_path} (step {saved_step}) is kept", "resume"
    return "no checkpoint had been written yet", "start again"


def _stop_on_non_finite_weights(stats, step, cfg, ckpt_path, saved_step, log):
    """The AdamW update made the weights non-finite: log it (rank 0, whose log is open; None elsewhere), raise."""
    fix = f"a smaller --lr (now {cfg.lr:g}), a larger --adam_eps (now {cfg.adam_eps:g}) or --grad_clip 1.0"
    kept, again = _what_is_kept(ckpt_path, saved_step)
    msg = (f"step {step}: the AdamW update made the weights non-finite (loss {stats['loss']:.4g} and "
           f"gradient norm {stats['grad_norm']:.4g} were finite). The run stops here; {kept}. "
           + (f"Continue from it with --resume and {fix}" if again == "resume" else f"Start again with {fix}"))
    if log is not None:
        log.row(dict(step=step, event="stopped: non-finite weights after the update", **stats))
    raise TrainError(msg)


def _report_skipped(stats, step, skipped_in_a_row, ckpt_path, saved_step, log):
    """A step skipped for a non-finite loss or gradient: say so (rank 0, whose log is open; None elsewhere);
    raise once MAX_SKIPPED were skipped in a row."""
    if log is not None:
        tqdm.write(f"step {step}: loss {stats['loss']} grad norm {stats['grad_norm']} not finite: step skipped")
        log.row(dict(step=step, event="skipped: non-finite loss or gradient", **stats))
    if skipped_in_a_row == MAX_SKIPPED:
        kept, again = _what_is_kept(ckpt_path, saved_step)
        raise TrainError(f"steps {step - MAX_SKIPPED + 1} to {step}: {MAX_SKIPPED} steps in a row had a "
                         f"non-finite loss or gradient and were skipped; the run stops. {kept}. Check "
                         f"the data for NaN or infinite values; if it is clean, {again} with a smaller --lr or "
                         "with --grad_clip 1.0")


def _write_log_row(log, acc, step, n_last, t_last, cfg, cuda):
    """One log.jsonl row: the means of the steps `acc` since the row of step n_last, their speed, the skipped."""
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t_last
    row = {k: float(np.mean([a[k] for a in acc])) for k in ("loss", "terminal", "fm", "grad_norm")}
    log.row(dict(step=step, **row, skipped=step - n_last - len(acc), lr=cfg.lr, s_per_step=dt / (step - n_last),
                 img_per_s=cfg.batch_size * (step - n_last) / dt))


def _save_flags(stop, cfg, t_saved, world, device):
    """[the signal that stops the run, or 0; whether ckpt_minutes have passed since the last save]."""
    # A signal, or ckpt_minutes since the last save, also saves; under DDP every rank must agree on
    # the step at which that happens (one 2-number all-reduce per step).
    flags = [float(stop.signum), float(cfg.ckpt_minutes > 0 and time.time() - t_saved > 60 * cfg.ckpt_minutes)]
    if world > 1:
        flags_t = torch.tensor(flags, device=device, dtype=torch.float64)
        dist.all_reduce(flags_t, op=dist.ReduceOp.MAX)
        flags = flags_t.tolist()
    return flags


if __name__ == "__main__":
    try:
        run_script(main, "train.py")
    except Stopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
