"""
Tests of attention_jvp.py on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The truth is float64 autograd of the math reference on the *same* (rounded) inputs, so only the
kernel's arithmetic is measured. Quantities: O, O', and the six gradients of <dO, O> + <dO', O'>
(q, k, v and the tangents q', k', v'). Metric: max|kernel - ref| / max(max|ref|, 1); the floor 1 is
the natural scale of every quantity with standard-normal inputs and matters only where the true value
is ~0 (at N = 1, dq = dk = dq' = dk' = 0 exactly).

Tolerances (set from rounding, not from observed runs):
  float32: 1e-5. The interpreter computes exact fp32 products; errors are fp32 roundings (2^-24 = 6e-8)
           accumulated over sums of <= 64 terms, exp2 and a few subtractions: ~1e-6 observed scale,
           1e-5 leaves a 10x margin yet fails on any real formula error (which is O(1e-1)).
  float16: 3e-3 = 6 u, u = 2^-11 = 4.9e-4. P, P alpha S', dS, dS' are rounded to fp16 before each
           matrix product (one u each, relative), and every output is rounded to fp16 (u/2).
           The fp16 naive math attention lands at ~2 u on these shapes.
Run: python -m pytest -q parts/test_attention_jvp.py   (about a minute on 2 cores)
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import example, given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import attention_jvp as aj  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


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
    with aj.use_backend("triton"):
        return aj.attention(q, k, v)


def _assert_close(got, ref, tol, what=""):
    names = aj.NAMES
    errs = {n: _err(a, b) for n, a, b in zip(names, got, ref) if b is not None}
    bad = {n: e for n, e in errs.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"{what}: errors above {tol:g}: {bad} (all: {errs})"


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
def test_func_jvp_and_all_six_gradients_match_float64(B, H, N, D, dtype, seed, scale):
    xs = _inputs(B, H, N, D, dtype, seed)
    got = _eight_via_func_jvp(lambda q, k, v: _kernel_scaled(q, k, v, scale), xs)
    ref = _eight_via_func_jvp(lambda q, k, v: aj.reference_attention(q, k, v, scale), [x.double() for x in xs])
    assert all(g.dtype == dtype for g in got)
    _assert_close(got, ref, TOL[dtype], f"B={B} H={H} N={N} D={D} {dtype} scale={scale}")


def _kernel_scaled(q, k, v, scale):
    with aj.use_backend("triton"):
        return aj.attention(q, k, v, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_ad_dual_tensors_match_float64(dtype):
    xs = _inputs(2, 2, 21, 72, dtype, seed=1)
    _assert_close(_eight_via_dual(_kernel, xs), _eight_via_dual(aj.reference_attention, [x.double() for x in xs]),
                  TOL[dtype], "forward_ad")


def test_plain_call_and_its_backward_match_float64():
    """No JVP: one forward kernel, gradients from O alone."""
    xs = _inputs(2, 3, 33, 24, torch.float32, seed=2)
    leaves = [x.clone().requires_grad_() for x in xs[:3]]
    ref_leaves = [x.double().requires_grad_() for x in xs[:3]]
    o = _kernel(*leaves)
    assert _is_kernel(o)  # the Triton path, not the reference
    o.backward(xs[6])
    o_ref = aj.reference_attention(*ref_leaves)
    o_ref.backward(xs[6].double())
    got, ref = [o.detach()] + [x.grad for x in leaves], [o_ref.detach()] + [x.grad for x in ref_leaves]
    for a, b in zip(got, ref):
        assert _err(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("which", ["O only", "O' only"])
def test_backward_from_one_output_only(which):
    """A loss on O alone must give zero tangent gradients; a loss on O' alone, the tangent's share."""
    xs = _inputs(1, 2, 19, 16, torch.float32, seed=3)
    if which == "O only":
        xs[7] = torch.zeros_like(xs[7])
    else:
        xs[6] = torch.zeros_like(xs[6])
    got = _eight_via_func_jvp(_kernel, xs)
    ref = _eight_via_func_jvp(aj.reference_attention, [x.double() for x in xs])
    _assert_close(got, ref, TOL[torch.float32], which)


def test_input_without_tangent_and_noncontiguous_views():
    """forward_ad with only q dual (k', v' arrive as None) and q, k, v as transposed views."""
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(1, 17, 2, 16, generator=g) for _ in range(4)]  # (B, N, H, D) as after a linear
    q, k, v = [x.transpose(1, 2).requires_grad_() for x in base[:3]]  # (B, H, N, D), not contiguous
    qt = base[3].transpose(1, 2)
    results = []
    for fn, cast in ((_kernel, lambda x: x), (aj.reference_attention, lambda x: x.double())):
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

def test_double_backward_raises():
    q, k, v = [x.requires_grad_() for x in _inputs(1, 1, 8, 16, torch.float32, seed=5)[:3]]
    (gq,) = torch.autograd.grad(_kernel(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_jvp_of_jvp_raises():
    xs = tuple(_inputs(1, 1, 8, 16, torch.float32, seed=6)[:3])
    inner = lambda q, k, v: torch.func.jvp(_kernel, (q, k, v), (q, k, v))[1]  # noqa: E731
    with pytest.raises(NotImplementedError, match="jvp of jvp"):
        torch.func.jvp(inner, xs, xs)


def test_reverse_mode_func_transform_raises():
    q, k, v = _inputs(1, 1, 8, 16, torch.float32, seed=7)[:3]
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda q: _kernel(q, k, v).sum())(q)


def test_triton_backend_refuses_what_it_cannot_run():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with aj.use_backend("triton"), pytest.raises(RuntimeError, match="bfloat16"):
        aj.attention(q, q, q)
    q = torch.randn(1, 1, 4, 160)
    with aj.use_backend("triton"), pytest.raises(RuntimeError, match="head dim"):
        aj.attention(q, q, q)
    with pytest.raises(ValueError):
        with aj.use_backend("cuda"):
            pass


def test_dispatch():
    """auto = Triton here (TRITON_INTERPRET=1); reference inside use_backend('reference'); auto falls
    back to the reference for what the kernel cannot run (bf16 in the interpreter), and the switch
    is restored afterwards."""
    q = torch.randn(1, 1, 5, 16, requires_grad=True)
    assert _is_kernel(aj.attention(q, q, q))
    with aj.use_backend("reference"):
        assert not _is_kernel(aj.attention(q, q, q))
    assert aj._BACKEND == "auto"
    qb = q.detach().bfloat16()
    torch.testing.assert_close(aj.attention(qb, qb, qb), aj.reference_attention(qb, qb, qb))


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_one_fused_backward_under_jvp_and_plain_forward_alone(mode, monkeypatch):
    """Under a JVP, O and O' are computed by one forward and one tangent kernel and the backward through
    both runs as ONE fused kernel launch (dO and dO' together); a plain call runs only the forward."""
    launches = []
    for name in ("_triton_forward", "_triton_tangent", "_triton_backward"):
        real = getattr(aj, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if _name == "_triton_backward":
                launches.append(("backward", args[5] is not None, kwargs.get("tangent") is not None))
            else:
                launches.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(aj, name, spy)
    xs = _inputs(1, 2, 18, 16, torch.float32, seed=8)
    (_eight_via_func_jvp if mode == "func.jvp" else _eight_via_dual)(_kernel, xs)
    assert launches == ["_triton_forward", "_triton_tangent", ("backward", True, True)]
    launches.clear()
    q = xs[0].clone().requires_grad_()
    _kernel(q, xs[1], xs[2]).backward(xs[6])
    assert launches == ["_triton_forward", ("backward", True, False)]


def test_tvm_loss_gradients_through_a_tiny_dit_match_the_reference():
    """Integration: the whole TVM loss (Eq. 15, torch.func.jvp in s through a DiT whose q, k are
    QK-normed views) gives the same loss and parameter gradients with the kernel as with math attention."""
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
        with aj.use_backend(backend):
            loss, _ = tvm.tvm_loss(net, target, inp)
        loss.backward()
        out[backend] = loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    (l_k, g_k), (l_r, g_r) = out["triton"], out["reference"]
    assert g_k.keys() == g_r.keys() and len(g_k) > 0
    assert abs(l_k - l_r) <= 1e-5 * abs(l_r)
    for n in g_r:  # fp32 on both sides: rounding-level differences only
        assert (g_k[n] - g_r[n]).abs().max() <= 1e-4 * g_r[n].abs().max() + 1e-7, n
