"""
Tests of sample.py: same seed, same images; noise and labels a function of (seed, sample index) only;
the ADM .npz layout; the split over processes (torchrun's environment, two CPU processes on gloo) gives
the single-process result; and clear errors for bad input. Run with

    python -m pytest -q parts/test_sample.py

The checkpoints are tiny DiTs built here and saved with train.py's own save_checkpoint, in its format;
their weights are perturbed away from the adaLN-zero init, under which F = 0 and every "sample" would
be its noise (the network would not be tested at all).
"""

import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, HERE)
import attention_jvp  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _math_attention():
    """The math attention (exact, fast on a CPU): the suite may set TRITON_INTERPRET=1 for the kernel's
    own tests, and the interpreter would only make these slow. Child processes get TRITON_INTERPRET=0."""
    with attention_jvp.use_backend("reference"):
        yield


def make_checkpoint(path, res=0, input_size=8, in_channels=1, num_classes=10, seed=0):
    """A train.py checkpoint of a 1-block DiT (hidden 32), weights drawn so that F is not zero."""
    cfg = train.resolve(train.TrainConfig(res=res, data="unused" if res else None, model="tiny", depth=1,
                                          hidden_size=32, num_heads=2))
    cfg.input_size, cfg.in_channels, cfg.num_classes = input_size, in_channels, num_classes
    torch.manual_seed(seed)
    net = train.build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.AdamW(net.parameters())
    sd = net.state_dict()
    train.save_checkpoint(dict(config=dataclasses.asdict(cfg), model=sd, ema=sd, target=sd,
                               opt=opt.state_dict(), step=0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


def run(ckpt, out, *extra):
    return sample.main(["--ckpt", ckpt, "--out", str(out), *map(str, extra)])


def load(path):
    with np.load(path) as f:
        return f["arr_0"]


def test_same_seed_same_images_other_seed_other_images(ckpt, tmp_path):
    a = load(run(ckpt, tmp_path / "a", "--steps", 2, "--n", 6, "--seed", 7, "--batch_size", 4))
    b = load(run(ckpt, tmp_path / "b", "--steps", 2, "--n", 6, "--seed", 7, "--batch_size", 4))
    c = load(run(ckpt, tmp_path / "c", "--steps", 2, "--n", 6, "--seed", 8, "--batch_size", 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5          # new noise changes most pixels, not just a few
    # ADM layout: arr_0 only, uint8 (N, H, W, 3), the grey digit repeated over RGB, not enlarged.
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["arr_0"]
    assert a.shape == (6, 8, 8, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    # The PNG grid is for people: enlarged to >= 64 px per image.
    from PIL import Image
    assert min(Image.open(tmp_path / "a.png").size) >= 64


def test_sampler_reads_the_network(ckpt, tmp_path):
    """1 and 2 steps give different images from the same noise (x1 passes through F, not around it),
    and the 1-step image is exactly x1 + (0 - 1) w F(x1, 1, 0) decoded, recomputed here by hand."""
    one = load(run(ckpt, tmp_path / "one", "--steps", 1, "--n", 4, "--seed", 1, "--classes", "2,5"))
    two = load(run(ckpt, tmp_path / "two", "--steps", 2, "--n", 4, "--seed", 1, "--classes", "2,5"))
    assert (one != two).any()
    net, config = train.load_model_from_checkpoint(ckpt)
    x1 = torch.stack([sample.noise_and_label(1, i, (1, 8, 8), [2, 5], 10)[0] for i in range(4)])
    y = torch.tensor([2, 5, 2, 5])
    w = torch.full((4,), config["w"])
    with torch.no_grad():
        F = net(x1, torch.ones(4), torch.zeros(4), y, w)
    x0 = x1.double() - (w[:, None, None, None] * F).double()            # Eq. 4 with scale_param, s - t = -1
    assert config["scale_param"]
    expected = np.repeat(((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), 3, -1)
    # float32 network vs float32 network, state in float64: equal up to a rare rounding at .5 levels.
    assert np.abs(one.astype(int) - expected).max() <= 1 and (one == expected).mean() > 0.99


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**40), i=st.integers(0, 10**6), k=st.integers(1, 9))
def test_noise_and_label_depend_on_seed_and_index_only(seed, i, k):
    """Sample i's noise is a function of (seed, i): the same when asked for alone or after others, and
    different for the neighbouring index or seed (streams must not overlap: with seed + i, seed 1 would
    repeat seed 0 shifted by one). Chosen classes cycle without changing the noise."""
    x, y = sample.noise_and_label(seed, i, (2, 3, 3), None, 10)
    x_again, _ = sample.noise_and_label(seed, i, (2, 3, 3), list(range(k)), 10)
    assert torch.equal(x, x_again) and 0 <= y < 10
    assert sample.noise_and_label(seed, i, (2, 3, 3), list(range(k)), 10)[1] == i % k
    assert not torch.equal(x, sample.noise_and_label(seed, i + 1, (2, 3, 3), None, 10)[0])
    assert not torch.equal(x, sample.noise_and_label(seed + 1, i, (2, 3, 3), None, 10)[0])
    assert not torch.equal(sample.noise_and_label(seed, i + 1, (2, 3, 3), None, 10)[0],
                           sample.noise_and_label(seed + 1, i, (2, 3, 3), None, 10)[0])


def test_labels_are_uniform_over_classes():
    """Chi-square test of 5,000 labels over 10 classes: 9 degrees of freedom, 27.9 is the 0.999 quantile;
    fixed seed, so this is deterministic and a sampler biased by >~10% on a class would fail it."""
    counts = np.bincount([sample.noise_and_label(0, i, (1,), None, 10)[1] for i in range(5000)], minlength=10)
    assert ((counts - 500) ** 2 / 500).sum() < 27.9


def test_split_over_processes_matches_one_process(ckpt, tmp_path):
    """Two CPU processes in torchrun's environment (gloo) write the same .npz as one process: 5 samples
    in batches of 2 put batches 0 and 2 on rank 0 and batch 1 on rank 1, so the reassembly order is
    tested too. (The processes are started the way torchrun starts them, without its elastic agent.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as each child below: the same kernels, so bitwise-equal results
    try:
        one = load(run(ckpt, tmp_path / "one", "--steps", 2, "--n", 5, "--batch_size", 2, "--seed", 3))
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TRITON_INTERPRET="0")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", ckpt, "--out", str(tmp_path / "two"),
             "--steps", "2", "--num_samples", "5", "--batch_size", "2", "--seed", "3", "--device", "cpu"],
            env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    np.testing.assert_array_equal(load(tmp_path / "two.npz"), one)
    assert not list(tmp_path.glob("two.rank*"))          # shards cleaned up


def test_bad_input_gives_clear_errors(ckpt, tmp_path, capsys):
    with pytest.raises(sample.SampleError, match="no such file"):
        sample.main(["--ckpt", str(tmp_path / "missing.pt")])
    for bad, msg in ((["--steps", "0"], "at least 1 step"), (["--cfg", "-1"], "must be positive"),
                     (["--n", "0"], "--n 0")):
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", ckpt, *bad])
        assert msg in capsys.readouterr().err
    with pytest.raises(sample.SampleError, match="classes 0..9"):
        run(ckpt, tmp_path / "x", "--classes", "10")
    with pytest.raises(sample.SampleError, match="comma-separated"):
        run(ckpt, tmp_path / "x", "--classes", "cats")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.TrainError, match="not a readable checkpoint"):
        run(str(tmp_path / "junk.pt"), tmp_path / "x")


def test_latent_model_without_vae_says_what_to_do(tmp_path):
    """A latent (res 256) checkpoint needs the SD-VAE through diffusers and its weights, neither of which
    this machine has: the error must name them, and come before any sampling."""
    path = make_checkpoint(tmp_path / "latent.pt", res=256, input_size=4, in_channels=4, num_classes=10)
    with pytest.raises(train.TrainError, match="diffusers|VAE weights"):
        run(path, tmp_path / "x", "--n", 2)
    assert not (tmp_path / "x.npz").exists()


def test_fid_reference_digits_match_the_samples_pixel_convention():
    """fid.py's "digits" reference images must be the training images put through the very conversion
    that samples go through (train.py's x0 = v/8 - 1, then to_uint8_images): otherwise FID would measure
    a brightness mismatch, not the model."""
    import fid
    data = train.DigitsData(os.path.join(HERE, "data", "digits.npz"))
    np.testing.assert_array_equal(fid.dataset_images("digits"), train.to_uint8_images(data.images, {"res": 0}))
