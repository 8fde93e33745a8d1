"""Tests of train.py: exact resume, DDP (gloo, 2 processes) against one process, gradient accumulation,
the non-finite guard, atomic checkpoints, the latent cache, and every documented bad-input error.

    python -m pytest -q parts/test_train.py

All runs use a tiny DiT (hidden 32, depth 1) on the embedded digits, or on fake latents, on the CPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = next(d for d in (os.path.dirname(os.path.abspath(__file__)),
                        os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if os.path.isfile(os.path.join(d, "train.py")))
sys.path.insert(0, ROOT)
import train  # noqa: E402
import tvm  # noqa: E402

TINY = ["--model", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--fid", "false",
        "--log_every", "1", "--sample_every", "0", "--lr", "3e-3", "--device", "cpu"]


def run(out, *args):
    return train.main(TINY + ["--out", str(out), *map(str, args)])


def states_equal(a, b, atol=0.0):
    """Compare two checkpoints' model, EMAs and optimiser, exactly (atol=0) or to atol."""
    for key in ("model", "ema", "target"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=atol, rtol=0, msg=f"{key}.{name}")
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Runs that survive: resume, checkpoints, the non-finite guard
# ------------------------------------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path):
    """k steps + --resume to N steps == N steps, bit for bit, with accumulation and a sample grid."""
    common = ["--batch_size", 16, "--micro_batch", 8, "--ckpt_every", 100]
    run(tmp_path / "a", "--steps", 5, *common)
    run(tmp_path / "b", "--steps", 2, "--sample_every", 2, *common)
    assert (tmp_path / "b" / "samples_0000002.png").is_file()
    run(tmp_path / "b", "--steps", 5, "--resume", *common)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    states_equal(a, b)
    init = train.build_net(a["config"]).state_dict()   # the run did move the weights
    assert any((a["model"][k] - init[k]).abs().max() > 1e-3 for k in init)
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r[k]) for r in log for k in ("loss", "terminal", "fm", "grad_norm", "img_per_s"))
    for key in ("config", "model", "ema", "target", "opt", "step", "rng"):
        assert key in b
    net, cfg = train.load_model_from_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert cfg["hidden_size"] == 32 and not net.training


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of torch.save leaves the previous checkpoint loadable and unchanged."""
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1, "x": torch.arange(10)}, path)

    def dying_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(train.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"step": 2, "x": torch.zeros(10)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["x"], torch.arange(10))


def tiny_setup(dtype=torch.float64):
    torch.manual_seed(0)
    net = tvm.build_dit(dict(hidden_size=32, depth=1, num_heads=2, patch_size=2), 8, 1, 10).to(dtype)
    ema, target = (train.copy.deepcopy(net).requires_grad_(False) for _ in range(2))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    cfg = train.resolve(train.TrainConfig(batch_size=16))
    return net, ema, target, opt, cfg


def test_nonfinite_step_is_skipped():
    net, ema, target, opt, cfg = tiny_setup()
    x0 = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    x0[3, 0, 2, 2] = float("nan")
    inputs = tvm.sample_loss_inputs(x0, torch.randint(0, 10, (16,)), 10)
    before = [p.clone() for p in (*net.parameters(), *ema.parameters(), *target.parameters())]
    stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert stats["skipped"] and not np.isfinite(stats["loss"])
    after = list((*net.parameters(), *ema.parameters(), *target.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not opt.state  # AdamW's moments were not touched either
    x0[3, 0, 2, 2] = 0.0  # and a finite batch then trains
    stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert not stats["skipped"] and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ------------------------------------------------------------------------------------------------
# The global batch does not depend on the number of processes or micro-batches
# ------------------------------------------------------------------------------------------------

def test_batch_is_independent_of_world_size_and_micro_batches():
    data = train.DigitsData(os.path.join(ROOT, "data", "digits.npz"))
    sampler = train.EpochSampler(len(data), seed=3)
    cfg = train.resolve(train.TrainConfig(batch_size=24))
    one = train.make_batch(data, sampler, cfg, 7, 0, 1, "cpu", torch.float32)[0]
    cfg.micro_batch = 4
    parts = [mb for r in range(3) for mb in train.make_batch(data, sampler, cfg, 7, r, 3, "cpu", torch.float32)]
    assert len(parts) == 6
    for k in one.__dataclass_fields__:
        assert torch.equal(getattr(one, k), torch.cat([getattr(p, k) for p in parts])), k
    # ... and differs from step to step
    other = train.make_batch(data, sampler, cfg, 8, 0, 1, "cpu", torch.float32)[0]
    assert not torch.equal(other.x1, one.x1[:4])


def test_epoch_sampler_visits_every_image_once_per_epoch():
    s = train.EpochSampler(50, seed=0)
    idx = np.concatenate([s.batch(k, 10) for k in range(10)])   # two epochs
    assert sorted(idx[:50]) == list(range(50)) and sorted(idx[50:]) == list(range(50))
    assert not np.array_equal(idx[:50], idx[50:])
    assert np.array_equal(s.batch(3, 10), train.EpochSampler(50, seed=0).batch(3, 10))   # stateless


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    run(tmp_path / "a", "--steps", 2, "--batch_size", 12, "--precision", "fp64")
    run(tmp_path / "b", "--steps", 2, "--batch_size", 12, "--micro_batch", 3, "--precision", "fp64")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    states_equal(a, b, atol=1e-12)


def test_ddp_two_processes_gloo_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo), each with half the global batch in 2 micro-batches, gives the same
    parameters after 3 AdamW steps as one process with the whole batch (float64, so any difference is a
    bug, not rounding). Without DDP's gradient all-reduce the ranks would drift apart by ~lr per step."""
    args = TINY + ["--steps", "3", "--batch_size", "16", "--precision", "fp64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True, cwd=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *args, "--micro_batch", "4", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    states_equal(a, b, atol=1e-12)
    init = train.build_net(a["config"]).double().state_dict()
    assert max((a["model"][k] - init[k]).abs().max() for k in init) > 1e-3   # far above the tolerance


# ------------------------------------------------------------------------------------------------
# Latents: encoding an image folder (with a stand-in for the VAE), resuming it, training on it
# ------------------------------------------------------------------------------------------------

def make_image_folder(root, classes=2, per_class=3, size=(40, 30)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def fake_encoder(x):
    """Stands in for VAE.encode_moments: (n, 3, 256, 256) -> (n, 8, 32, 32) mean and std."""
    mean = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([mean, mean[:, :1], 0.1 + 0 * mean, 0.1 + 0 * mean[:, :1]], dim=1)


def test_encoding_resumes_and_trains(tmp_path):
    make_image_folder(tmp_path / "imgs")
    full = train.encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "full"), 256, fake_encoder, batch=2, workers=0)
    calls = []

    def dies_on_second_chunk(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return fake_encoder(x)

    cache = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        train.encode_image_folder(str(tmp_path / "imgs"), cache, 256, dies_on_second_chunk, batch=2, workers=0,
                                  flush_every=1)
    assert not os.path.isfile(os.path.join(cache, "meta.json"))
    calls.clear()
    train.encode_image_folder(str(tmp_path / "imgs"), cache, 256, lambda x: calls.append(len(x)) or fake_encoder(x),
                              batch=2, workers=0)
    assert len(calls) == 2      # only the two chunks that were missing
    assert np.array_equal(np.load(os.path.join(full, "latents.npy")), np.load(os.path.join(cache, "latents.npy")))
    assert np.load(os.path.join(cache, "labels.npy")).tolist() == [0, 0, 0, 1, 1, 1]
    # Training on the cache (as a folder and as the latents.npy file) needs no VAE with --sample_every 0.
    cfg = run(tmp_path / "run", "--res", 256, "--data", os.path.join(cache, "latents.npy"), "--steps", 2,
              "--batch_size", 4)
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes) == (4, 32, 2)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------------
# Bad inputs give their documented, actionable errors
# ------------------------------------------------------------------------------------------------

def test_error_missing_data_folder(tmp_path):
    with pytest.raises(train.TrainError, match="does not exist.*ImageNet layout"):
        run(tmp_path / "r", "--res", 256, "--data", tmp_path / "nope")


def test_error_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.TrainError, match="no class sub-folders"):
        run(tmp_path / "r", "--res", 256, "--data", tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(train.TrainError, match="holds no images"):
        run(tmp_path / "r", "--res", 256, "--data", tmp_path / "empty")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_unreadable_image(tmp_path, workers):
    make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    (tmp_path / "imgs" / "class0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(Exception, match=r"cannot read image .*broken\.jpg.*Delete or replace"):
        train.encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c"), 256, fake_encoder, batch=2,
                                  workers=workers)


def test_error_vae_missing(tmp_path):
    """Encoding needs diffusers; without it the error says how to get it (skipped where it is installed,
    since loading the real VAE would then download weights)."""
    try:
        import diffusers  # noqa: F401
        pytest.skip("diffusers is installed")
    except ImportError:
        pass
    make_image_folder(tmp_path / "imgs", classes=1, per_class=1)
    with pytest.raises(train.TrainError, match="pip install diffusers"):
        run(tmp_path / "r", "--res", 256, "--data", tmp_path / "imgs")


def test_error_latent_shape_does_not_match_res(tmp_path):
    np.save(tmp_path / "latents.npy", np.zeros((4, 8, 32, 32), np.float16))
    np.save(tmp_path / "labels.npy", np.zeros(4, np.int64))
    with pytest.raises(train.TrainError, match=r"8x32x32.*--res 512 needs 4x64x64.*--res 256"):
        run(tmp_path / "r", "--res", 512, "--data", tmp_path / "latents.npy")


def test_error_checkpoint_from_another_configuration(tmp_path):
    run(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    with pytest.raises(train.TrainError, match=r"another configuration.*hidden_size: checkpoint 32 vs now 48"):
        run(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume", "--hidden_size", 48)
    with pytest.raises(train.TrainError, match="exists: pass --resume"):
        run(tmp_path / "r", "--steps", 2, "--batch_size", 4)


def test_error_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(train.TrainError, match="no checkpoint at"):
        train.load_model_from_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(train.TrainError, match="not a readable checkpoint"):
        train.load_model_from_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(train.TrainError, match="no checkpoint at"):
        run(tmp_path / "r", "--steps", 1, "--resume")


def test_error_batch_does_not_divide_across_gpus():
    cfg = train.resolve(train.TrainConfig(batch_size=2048))
    train.check_batch(cfg, 8)
    with pytest.raises(train.TrainError, match=r"2048 \(global\) does not divide across 3 processes.*2046 or 2049"):
        train.check_batch(cfg, 3)
    cfg.micro_batch = 48
    with pytest.raises(train.TrainError, match="does not divide the per-process batch 256"):
        train.check_batch(cfg, 8)


def test_to_uint8_images_pixels():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    img = train.to_uint8_images(x, {"res": 0})
    assert img.dtype == np.uint8 and img.shape == (1, 2, 2, 3)
    assert img[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255] and (img[..., 0] == img[..., 2]).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_two_gpus_bf16_agree_with_one(tmp_path):
    """NCCL on 2 GPUs vs 1 GPU, bf16 autocast, 10 steps, same global batch: the losses agree to bf16
    round-off and the weight updates to a few percent (Adam's first steps amplify round-off on tiny
    gradients), as do two 1-GPU runs that only split the batch differently; a different seed is ~100%
    off. Measured on 2 x H200: updates 3.7e-2 apart, loss curves 1e-4."""
    args = TINY + ["--hidden_size", "128", "--steps", "10", "--batch_size", "256", "--precision", "bf16",
                   "--device", "cuda", "--lr", "1e-3"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
    for name, launcher, extra in [("one", [], []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2"], []), ("seed", [], ["--seed", "1"])]:
        subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args, *extra,
                        "--out", str(tmp_path / name)], check=True, env=env, capture_output=True, cwd=ROOT)
    ck = {k: torch.load(tmp_path / k / "ckpt.pt", weights_only=True, map_location="cpu") for k in ("one", "two", "seed")}
    torch.manual_seed(0)
    init = train.build_net(ck["one"]["config"]).state_dict()
    delta = {k: torch.cat([(ck[k]["model"][n].float() - init[n]).flatten() for n in init]) for k in ck}
    rel = lambda a, b: float((delta[a] - delta[b]).norm() / delta[a].norm())  # noqa: E731
    assert rel("one", "two") < 0.1 and rel("one", "seed") > 0.5
    loss = {k: [json.loads(line)["loss"] for line in open(tmp_path / k / "log.jsonl")] for k in ("one", "two")}
    assert np.allclose(loss["one"], loss["two"], rtol=2e-3)
