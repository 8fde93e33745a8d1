"""
The project's tests: properties of the method, the network, the kernel, the training loop and the
evaluation, each held against an independent reference (float64 math, finite differences, closed-form
Gaussians, a transcription of the paper's equation). Run on the CPU with

    python -m pytest -q test_tvm.py

The Triton kernel runs here through Triton's interpreter (TRITON_INTERPRET=1, set below before
anything imports Triton). The model tests use the math attention, which is exact and much faster
on a CPU; the kernel has its own tests against it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy
import math

import pytest
from hypothesis import given, settings, strategies as st

import attention_jvp
import tvm

# Tiny tensors: one thread is as fast as two, and immune to the spin-wait slow-down that several
# intra-op threads suffer on a busy 2-core machine (measured here: 25x slower per step).
torch.set_num_threads(1)


# ================================================================================================
# tvm.py: the method and the network
# ================================================================================================

@pytest.fixture(autouse=True)
def _math_attention_for_model_tests(request):
    """Model tests use the reference attention (exact, fast on a CPU); kernel tests opt out by name."""
    if "kernel" in request.node.name:
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
@given(seed=st.integers(0, 10_000), scale_param=st.booleans(), w=st.floats(1.0, 4.0))
def test_terminal_velocity_matches_finite_difference(seed, scale_param, w):
    """Eq. 17: the JVP's d/ds f equals the central difference of Eq. 4's f in s (float64)."""
    net = tiny_dit(seed)
    g = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.2
    s = t * torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=g)
    ww = torch.full((B,), w, dtype=torch.float64)
    f, df_ds = tvm.terminal_velocity(net, x, t, s, y, ww, scale_param)
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
    """paper-notes §10.3: with [w] = w the terminal term (1/w^2)||w a - w b||^2 equals ||a - b||^2 with
    a = F + (s - t) dF/ds and b = F_target (w-invariant), and the FM term equals
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


def test_network_starts_as_identity_blocks():
    """paper-notes §10.9: at init every modulation chunk is exactly 0, so each block is the identity
    and F = 0; the QK-norm scale is 1 and every spectrally initialised weight has spectral norm 1."""
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
    code, fixed positional embedding included (paper-notes §4.7)."""
    with torch.device("meta"):
        net = tvm.build_dit("XL/2-18h", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 678_363_408
    assert net.blocks[0].attn.head_dim == 64 and len(net.blocks) == 28


class ExactGaussianFlow(torch.nn.Module):
    """F set to the exact displacement of 1-D Gaussian data N(mu0, sigma0^2) with prior N(0, 1)
    (paper-notes §3): m_t = (1 - t) mu0, sigma_t^2 = (1 - t)^2 sigma0^2 + t^2, and the flow map
    psi(x, t, s) = m_s + (sigma_s / sigma_t)(x - m_t). F = (psi - x) / ((s - t) [w])."""

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
