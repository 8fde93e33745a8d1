"""
Terminal Velocity Matching (TVM): the method and the network, in one file.

Zhou, Parger, Haque, Song, "Terminal Velocity Matching", arXiv 2511.19797 (ICLR 2026).
Equation, table and section numbers refer to arXiv v1. Read this file next to the paper:

    network      DiT with the paper's "semi-Lipschitz" changes (Sec. 4, App. B)    -> class DiT
    displacement f(x_t, t, s) = (s - t) [w] F(x_t, t, s, c, w)    (Eq. 4)           -> displacement()
    terminal     d/ds f = [w] (F + (s - t) dF/ds), one forward-mode JVP (Eq. 17)  -> terminal_velocity()
                 dF/ds by torch.func.jvp (Fig. 11, the reference) or by hand        -> DiT.forward_jvp()
    loss         Eq. 15: terminal-velocity term + guided flow matching, both 1/w^2 -> tvm_loss()
    times        the "gap*" sampler of Table 6                                     -> sample_times()
    sampler      n uniform steps from t = 1 to 0 (Fig. 3)                          -> sample()

Run `python tvm.py` to print the model sizes and run a small self-check.

Glossary (paper symbol -> name in the code)
    x_0 ~ p_0          x0        data (pixels in [-1, 1], or normalised SD-VAE latents)
    x_1 ~ N(0, I)      x1        noise
    t, s               t, s      times in [0, 1]; t = 1 is noise, t = 0 is data; a jump goes t -> s <= t
    x_t                x_t       (1 - t) x_0 + t x_1                                        (Sec. 2)
    v                  v         x_1 - x_0, the conditional velocity (points from data to noise)
    u(x_t, t)          u         marginal velocity E[v | x_t]; the model's is u_theta(x, t) = [w] F(x, t, t)
    F_theta            net       the network, called as net(x, t, s, y, w)
    f_theta            f         the displacement (s - t) [w] F; the jump lands at x_t + f
    c                  y         class label; y == num_classes is the null class (label dropped)
    w                  w         guidance weight; the network sees beta = 1 / w (App. F.1)
    [w]                ws        the factor w of the scaled parameterisation (Sec. 4), or 1 without it
    theta_sg           -         the online network under stop-gradient (the jump endpoint is detached)
    theta*_sg          target    the "target" EMA (rate 0.99) under stop-gradient
    theta**            ema       the evaluation EMA (rate 0.9999): what is saved and sampled from
    s'                 s_prime   the independent time of the flow-matching term (the "*" of gap*)

Losses are per-element means over (C, H, W), as in the official code, where the paper writes squared
norms: a constant factor. Where this file follows the official code (github.com/lumalabs/tvm) rather
than the paper, or the reverse, a comment says so and why.
"""

import math
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as nnf
from torch.utils.checkpoint import checkpoint

from attention_jvp import HAS_TRITON, attention, attention_pair

if HAS_TRITON:
    import triton
    import triton.language as tl


# ------------------------------------------------------------------------------------------------
# Building blocks of the semi-Lipschitz DiT (Sec. 4, App. B)
# ------------------------------------------------------------------------------------------------

def rms_norm(x, eps=1e-6):
    """RMSNorm without parameters ("RMSNorm-" of Eq. 16): x / sqrt(mean(x^2) + eps) over the last dim.

    Computed in (at least) float32, returned in x's dtype. Its Jacobian is bounded by 1/sqrt(eps)
    (App. B.1), unlike LayerNorm's mean subtraction followed by a learnable affine map.
    """
    # nnf.rms_norm is one fused kernel on CUDA (it accumulates in float32) and the formula elsewhere.
    return nnf.rms_norm(x, (x.shape[-1],), eps=eps)


# The same layers with their tangent carried by hand ("_jvp" functions and forward_jvp methods). Each
# takes a primal x and its tangent dx and returns (y, dy), dy = J_y(x) dx: the forward-mode rule of
# the layer, written out. The network's tangent in s then needs no torch.func.jvp (the reference path,
# tested against this one), which lets activation checkpointing and torch.compile see plain autograd.

def rms_norm_jvp(x, dx, eps=1e-6, weight=None):
    """y = x r with r = (mean(x^2) + eps)^(-1/2);  dy = r (dx - y mean(y dx)); both times `weight` if
    given (QK-norm). Computed in float32, returned in x's dtype, as nnf.rms_norm does."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dxf = dx.to(xf.dtype)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * r
    dy = r * (dxf - y * (y * dxf).mean(-1, keepdim=True))
    if weight is not None:
        y, dy = y * weight.to(xf.dtype), dy * weight.to(xf.dtype)
    return y.to(x.dtype), dy.to(x.dtype)


def linear_jvp(layer, x, dx):
    """y = x W^T + b;  dy = dx W^T."""
    return layer(x), nnf.linear(dx, layer.weight)


def silu_jvp(x, dx):
    """y = x sigmoid(x);  dy = sigmoid(x) (1 + x (1 - sigmoid(x))) dx. The primal is forward()'s nnf.silu;
    the tangent is computed in float32 (it acts on (B, hidden) vectors only: cost nil)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    sig = torch.sigmoid(xf)
    return nnf.silu(x), (dx.to(xf.dtype) * sig * (1 + xf * (1 - sig))).to(x.dtype)


def gelu_tanh_jvp(x, dx):
    """Elementwise: dy = gelu'(x) dx for the tanh-approximate GELU. aten's gelu_backward(g, x) computes
    g gelu'(x) in one kernel (autograd's own backward of gelu) and is itself differentiable, so with
    g = dx it is the JVP."""
    return nnf.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(dx.to(x.dtype), x, approximate="tanh")


class QKNorm(nn.Module):
    """RMSNorm with a learnable scale over the head dimension, applied to queries and keys (Sec. 4).

    One weight vector of size head_dim, shared by all heads (as in the official code's nn.RMSNorm).
    """

    def __init__(self, head_dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, x):  # (B, H, S, D)
        return nnf.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def forward_jvp(self, x, dx):
        return rms_norm_jvp(x, dx, self.eps, self.weight)


def sinusoidal_embedding(x, dim=256, max_period=10_000.0):
    """DiT's sin/cos embedding of a scalar per sample. x: (B,) -> (B, dim).

    The raw value is embedded (t in [0, 1], no x1000 scaling), as in the official code (training/wrapper.py
    hands t to training/dit.py's TimestepEmbedder as it is); the paper does not say.
    """
    freqs = _sinusoid_freqs(x, dim, max_period)
    args = x.to(freqs.dtype)[:, None] * freqs[None]                  # (B, dim / 2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)    # (B, dim)


def _sinusoid_freqs(x, dim, max_period):
    """The dim / 2 frequencies f_k = max_period^(-k / (dim / 2)), in float64 for float64 x, else float32."""
    half = dim // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=dtype) / half)


def sinusoidal_embedding_jvp(x, dx, dim=256, max_period=10_000.0):
    """d/dx [cos(x f), sin(x f)] = [-sin(x f) f, cos(x f) f], times dx."""
    freqs = _sinusoid_freqs(x, dim, max_period)
    args = x.to(freqs.dtype)[:, None] * freqs[None]
    dargs = dx.to(freqs.dtype)[:, None] * freqs[None]
    return (torch.cat([torch.cos(args), torch.sin(args)], dim=-1),
            torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1))


class ScalarEmbedder(nn.Module):
    """Sinusoidal embedding followed by Linear-SiLU-Linear: used for t, for the gap t - s, and for
    the guidance input beta = 1/w (App. F.1)."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):  # (B,) -> (B, hidden)
        emb = sinusoidal_embedding(x, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))

    def forward_jvp(self, x, dx):
        dtype = self.mlp[0].weight.dtype
        emb, demb = sinusoidal_embedding_jvp(x, dx, self.freq_dim)
        h, dh = linear_jvp(self.mlp[0], emb.to(dtype), demb.to(dtype))
        h, dh = silu_jvp(h, dh)
        return linear_jvp(self.mlp[2], h, dh)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm. Every call goes through attention_jvp.attention, whose
    forward-mode derivative can itself be back-propagated (the kernel on a GPU, math elsewhere)."""

    def __init__(self, hidden, num_heads):
        super().__init__()
        assert hidden % num_heads == 0, f"hidden size {hidden} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = QKNorm(self.head_dim)
        self.k_norm = QKNorm(self.head_dim)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):  # (B, N, hidden)
        B, N, C = x.shape
        # Linears see (B * N, C): on 3-D inputs, nn.Linear under torch.func.jvp + backward runs as batched
        # matrix products with the weight expanded per sample (measured: a 10-20% slower CPU step).
        qkv = self.qkv(x.reshape(B * N, C)).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # each (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        o = attention(q, k, v)                                          # (B, H, N, D), scale 1/sqrt(D)
        return self.proj(o.transpose(1, 2).reshape(B * N, C)).reshape(B, N, C)

    def forward_jvp(self, x, dx):  # x, dx (B, N, hidden)
        B, N, C = x.shape
        heads = lambda a: a.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qkv, dqkv = linear_jvp(self.qkv, x.reshape(B * N, C), dx.reshape(B * N, C))
        (q, k, v), (dq, dk, dv) = heads(qkv), heads(dqkv)              # each (B, H, N, D)
        q, dq = self.q_norm.forward_jvp(q, dq)
        k, dk = self.k_norm.forward_jvp(k, dk)
        o, do = attention_pair(q, k, v, dq, dk, dv)                    # O and O', (B, H, N, D) each
        tokens = lambda a: a.transpose(1, 2).reshape(B * N, C)         # (B * N, hidden)
        o, do = linear_jvp(self.proj, tokens(o), tokens(do))
        return o.reshape(B, N, C), do.reshape(B, N, C)


def modulation(c, linear, n):
    """adaLN modulation vectors: n chunks of linear(SiLU(c)), each RMS-normalised (Eq. 16, App. B.2).

    Normalising bounds the modulation scale a(t), whose unbounded growth the paper singles out as the
    cause of instability (Fig. 4). The linear is zero-initialised, so the chunks start at exactly 0.
    """
    mods = linear(nnf.silu(c))                                          # (B, n * hidden)
    return rms_norm(mods.unflatten(-1, (n, -1))).unbind(dim=-2)        # n x (B, hidden), one kernel


def modulation_jvp(c, dc, linear, n):
    """modulation() and its tangent: SiLU, the linear, the chunk-wise RMSNorm, each by its rule."""
    h, dh = silu_jvp(c, dc)
    mods, dmods = linear_jvp(linear, h, dh)
    mods, dmods = rms_norm_jvp(mods.unflatten(-1, (n, -1)), dmods.unflatten(-1, (n, -1)))
    return mods.unbind(dim=-2), dmods.unbind(dim=-2)


def modulate(x, shift, scale):
    # Official code's form x * (1 + RMSNorm-(a)) + RMSNorm-(b), not Eq. 16's RMSNorm-(x) * RMSNorm-(a)
    # + RMSNorm-(b) (training/dit.py, modulate): we follow the code, whose released weights use it. x is already
    # RMS-normalised by the caller. addcmul: one kernel for shift + x * (1 + scale).
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def modulate_jvp(x, dx, shift, dshift, scale, dscale):
    """y = x (1 + scale) + shift;  dy = dx (1 + scale) + x dscale + dshift."""
    y = modulate(x, shift, scale)
    dy = torch.addcmul(torch.addcmul(dshift[:, None], dx, 1 + scale[:, None]), x, dscale[:, None])
    return y, dy


def gated_residual_jvp(x, dx, gate, dgate, a, da):
    """y = x + gate a;  dy = dx + dgate a + gate da."""
    y = torch.addcmul(x, gate[:, None], a)
    dy = torch.addcmul(torch.addcmul(dx, dgate[:, None], a), gate[:, None], da)
    return y, dy


class DiTBlock(nn.Module):
    def __init__(self, hidden, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden, num_heads)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN = nn.Linear(hidden, 6 * hidden)

    def forward(self, x, c):  # x (B, N, hidden), c (B, hidden)
        B, N, C = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(c, self.adaLN, 6)
        x = torch.addcmul(x, gate_a[:, None], self.attn(modulate(rms_norm(x), shift_a, scale_a)))
        h = modulate(rms_norm(x), shift_m, scale_m).reshape(B * N, C)   # 2-D for the linears (Attention)
        x = torch.addcmul(x, gate_m[:, None], self.mlp(h).reshape(B, N, C))   # x + gate * MLP(h)
        return x

    def forward_jvp(self, x, dx, c, dc):
        """forward() and its tangent; same lines, each layer through its _jvp rule."""
        B, N, C = x.shape
        (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), d = modulation_jvp(c, dc, self.adaLN, 6)
        dshift_a, dscale_a, dgate_a, dshift_m, dscale_m, dgate_m = d
        h, dh = rms_norm_jvp(x, dx)
        h, dh = modulate_jvp(h, dh, shift_a, dshift_a, scale_a, dscale_a)
        a, da = self.attn.forward_jvp(h, dh)
        x, dx = gated_residual_jvp(x, dx, gate_a, dgate_a, a, da)
        h, dh = rms_norm_jvp(x, dx)
        h, dh = modulate_jvp(h, dh, shift_m, dshift_m, scale_m, dscale_m)
        h, dh = linear_jvp(self.mlp[0], h.reshape(B * N, C), dh.reshape(B * N, C))
        h, dh = gelu_tanh_jvp(h, dh)
        a, da = linear_jvp(self.mlp[2], h, dh)
        return gated_residual_jvp(x, dx, gate_m, dgate_m, a.reshape(B, N, C), da.reshape(B, N, C))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch_size, out_channels):
        super().__init__()
        self.adaLN = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        # The official code (training/dit.py, FinalLayer) also RMS-normalises these two modulation vectors;
        # the paper (Eq. 16, App. B.2) does not mention it. We follow the code.
        shift, scale = modulation(c, self.adaLN, 2)
        B, N, C = x.shape
        return self.linear(modulate(rms_norm(x), shift, scale).reshape(B * N, C)).reshape(B, N, -1)

    def forward_jvp(self, x, dx, c, dc):
        (shift, scale), (dshift, dscale) = modulation_jvp(c, dc, self.adaLN, 2)
        B, N, C = x.shape
        h, dh = rms_norm_jvp(x, dx)
        h, dh = modulate_jvp(h, dh, shift, dshift, scale, dscale)
        h, dh = linear_jvp(self.linear, h.reshape(B * N, C), dh.reshape(B * N, C))
        return h.reshape(B, N, -1), dh.reshape(B, N, -1)


def sincos_pos_embed_2d(hidden, grid):
    """Fixed 2-D sin/cos positional embedding of DiT (MAE's recipe). -> (grid * grid, hidden)."""
    def embed_1d(dim, pos):
        omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]                    # (M, dim/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)       # (M, dim)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    # DiT's code puts the x coordinate (w) first, then y (h); keep that order.
    return torch.cat([embed_1d(hidden // 2, gx), embed_1d(hidden // 2, gy)], dim=1).float()


# ------------------------------------------------------------------------------------------------
# The network F_theta(x_t, t, s, c, w)
# ------------------------------------------------------------------------------------------------

# DiT sizes (Peebles & Xie, Table 1). "XL/2-18h" is the paper's model: 18 heads of dim 64 instead of
# 16 of dim 72, for the kernel's sake (App. F.1).
DIT_CONFIGS = {
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    "XL/2-18h": dict(hidden_size=1152, depth=28, num_heads=18, patch_size=2),
}

# The largest DiT this code builds, whether from train.py's options, a checkpoint's config, the digits'
# shape or an official file (released.py reads the sizes off its weights): each size within DIT_LIMITS
# (lowest, highest), and at most MAX_PARAMS parameters (16 GB of float32 weights; a block holds about
# 12 hidden^2). Beyond them the allocation fails deep inside torch (--depth 100000 took 23 GB before it did).
DIT_LIMITS = dict(input_size=(1, 256), patch_size=(1, 16), in_channels=(1, 16), hidden_size=(1, 8192),
                  depth=(1, 128), num_heads=(1, 128), num_classes=(1, 100_000))
MAX_PARAMS = 4_000_000_000


class DiT(nn.Module):
    """DiT with TVM's changes: parameter-free RMSNorm for every LayerNorm, QK-norm, RMS-normalised
    adaLN modulations, spectral init, and embedders for t, for the gap t - s and for beta = 1/w.

    forward(x, t, s, y, w) -> F, same shape as x. x: (B, C, H, W); t, s, w: (B,) floats; y: (B,) long,
    with y == num_classes the null class. Under autocast the output is returned in float32.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=18, mlp_ratio=4.0, num_classes=1000, time_spectral_init=True):
        super().__init__()
        assert input_size % patch_size == 0, f"input size {input_size} is not a multiple of patch {patch_size}"
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed, not trained; a Parameter (requires_grad=False) as in DiT, so it counts in the 678M.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(hidden_size, self.grid)[None], requires_grad=False)
        self.t_embedder = ScalarEmbedder(hidden_size)      # time t
        self.gap_embedder = ScalarEmbedder(hidden_size)    # gap t - s (the code's "s" input)
        self.w_embedder = ScalarEmbedder(hidden_size)      # guidance input beta = 1 / w
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)   # row num_classes: null class
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.time_spectral_init = time_spectral_init
        # Recompute each block's activations in the backward instead of storing them (less memory, one
        # more forward of the blocks): train.py --checkpoint_blocks.
        self.checkpoint_blocks = False
        if not self.pos_embed.is_meta:  # a meta-device model (for counting parameters) needs no init
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """Lipschitz ("spectral") init (Sec. 4, after Qi et al. 2023): xavier-normal weights divided by
        their largest singular value, zero biases. Exceptions, as in the official code: label table
        N(0, 0.02); adaLN linears and the output linear zero (adaLN-Zero: every block starts as the
        identity and F starts at 0); time embedders N(0, 0.02) unless time_spectral_init, which
        Table 6 and the configs use for the im256 w=2 and im512 w=2.25 models, not for im256 w=1.75 and
        im512 w=2.5 (time_specinit in the official configs/*.yaml; Sec. 4's text says "except time embedding
        layers").
        """
        def spectral_(weight):
            nn.init.xavier_normal_(weight)
            w2d = weight.reshape(weight.shape[0], -1)
            weight.div_(torch.linalg.matrix_norm(w2d.double(), ord=2).to(weight.dtype))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                spectral_(module.weight)
                nn.init.zeros_(module.bias)
        if not self.time_spectral_init:
            for emb in (self.t_embedder, self.gap_embedder, self.w_embedder):
                for layer in emb.mlp:
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
        nn.init.zeros_(self.final_layer.adaLN.weight)
        nn.init.zeros_(self.final_layer.adaLN.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_blocks(self, **compile_kwargs):
        """torch.compile each block's forward and forward_jvp ("regional" compilation). All blocks run
        the same code, so one compiled graph per call signature (shapes, grad mode) serves every block
        and compile time does not grow with depth; the embedders and the final layer stay eager. The
        eager methods remain the reference (test_tvm.py compares them). The compiled functions are
        bound to each block as methods, so copy.deepcopy of a compiled network binds them to the copy
        (tested). Only this method makes dynamo trace tvm.py (see _let_dynamo_trace_tvm_py):
        torch.compile(net) alone would run the blocks eagerly.
        """
        _let_dynamo_trace_tvm_py()
        forward = torch.compile(DiTBlock.forward, **compile_kwargs)
        forward_jvp = torch.compile(DiTBlock.forward_jvp, **compile_kwargs)
        for block in self.blocks:
            block.forward = types.MethodType(forward, block)
            block.forward_jvp = types.MethodType(forward_jvp, block)
        return self

    def _run_block(self, fn, *args):
        """fn(*args), or recomputed in the backward (checkpoint_blocks) when a backward will follow."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def unpatchify(self, x):  # (B, N, p*p*C) -> (B, C, H, W)
        p, g, C = self.patch_size, self.grid, self.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def embed_patches(self, x):
        """(B, C, H, W) -> the tokens (B, N, hidden) with their positional embedding, stored token by token.

        The patch convolution's output, transposed, is a channel-major view, and elementwise ops keep
        their input's layout: without the copy the whole residual stream of every block (and its
        tangent, and their gradients) stays channel-major, and each RMSNorm reduces across strided
        memory (seen in the kernels Inductor generated for XL/2). Inductor copes well with that: on an
        H200 the copy changed the XL/2 step by less than the spread between runs (notes/step.md, "Toward the
        hardware limit"); it is kept for the plain layout, which any other kernel can rely on."""
        return self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed

    def forward(self, x, t, s, y, w):
        # The network sees (t, t - s, beta = 1/w), as in the official wrapper (training/wrapper.py); a JVP
        # in s (Eq. 17) then reaches the network through the gap embedder with tangent -1.
        h = self.embed_patches(x)                                                   # (B, N, hidden)
        c = self.t_embedder(t) + self.gap_embedder(t - s) + self.w_embedder(1.0 / w) + self.y_embedder(y)
        for block in self.blocks:
            h = self._run_block(block, h, c)
        out = self.unpatchify(self.final_layer(h, c))                                # (B, C, H, W)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out   # autocast -> fp32

    def forward_jvp(self, x, t, s, y, w):
        """(F, dF/ds): forward() and its derivative in s, the tangent carried through every layer by
        hand. Equals torch.func.jvp(lambda s: self(x, t, s, y, w), (s,), (ones,)) (tested in float64).

        Only the gap embedder sees s (its input t - s has tangent -1); x, t, y and w have zero
        tangents, so the patch, t, w and label embeddings are constants and the tangent enters every
        block through its adaLN modulation (dc), then through the tokens (dh).
        """
        h = self.embed_patches(x)
        gap, dgap = self.gap_embedder.forward_jvp(t - s, -torch.ones_like(s))
        c = self.t_embedder(t) + gap + self.w_embedder(1.0 / w) + self.y_embedder(y)
        dc = dgap
        dh = torch.zeros_like(h)
        for block in self.blocks:
            h, dh = self._run_block(block.forward_jvp, h, dh, c, dc)
        out, dout = self.final_layer.forward_jvp(h, dh, c, dc)
        out, dout = self.unpatchify(out), self.unpatchify(dout)
        if out.dtype in (torch.float16, torch.bfloat16):
            out, dout = out.float(), dout.float()
        return out, dout


def _let_dynamo_trace_tvm_py():
    """torch._dynamo skips (runs eagerly, never compiles) code in modules of a few third-party names,
    among them "tvm" (Apache TVM): on import it resolves that name, finds this file, and adds it to its
    skip list, so torch.compile would silently compile nothing here. Take this one file off the list
    (private API of torch._dynamo.trace_rules, checked afterwards: an error, never a silent eager run)."""
    import os
    from torch._dynamo import trace_rules
    me = os.path.abspath(__file__)
    if hasattr(trace_rules, "SKIP_DIRS") and hasattr(trace_rules, "_recompile_re"):
        kept = [d for d in trace_rules.SKIP_DIRS if os.path.abspath(d) != me]
        if len(kept) != len(trace_rules.SKIP_DIRS):
            trace_rules.SKIP_DIRS[:] = kept
            trace_rules._recompile_re()
    check = getattr(trace_rules, "check_file", None)
    if check is None or check(__file__).skipped:
        raise RuntimeError(f"torch {torch.__version__}: torch._dynamo still skips {me} (a module named 'tvm' is on "
                           "its third-party skip list), so torch.compile would run the blocks eagerly. Run "
                           "without --compile, or rename tvm.py and its imports.")


def build_dit(name_or_kwargs, input_size, in_channels, num_classes, **overrides):
    """build_dit("XL/2-18h", 32, 4, 1000) or build_dit(dict(hidden_size=..., ...), ...)."""
    if isinstance(name_or_kwargs, str):
        if name_or_kwargs not in DIT_CONFIGS:
            raise ValueError(f"unknown model {name_or_kwargs!r}; expected one of {sorted(DIT_CONFIGS)}")
        kwargs = dict(DIT_CONFIGS[name_or_kwargs])
    else:
        kwargs = dict(name_or_kwargs)
    kwargs.update(overrides)
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------
# The displacement f and its terminal derivative d/ds f (Eqs. 4, 17)
# ------------------------------------------------------------------------------------------------

def _bc(a, x):
    """Broadcast a per-sample (B,) tensor against x (B, ...)."""
    return a.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _scale(w, scale_param):
    """[w]: the factor of the scaled parameterisation (Sec. 4), or 1 without it."""
    return w if scale_param else torch.ones_like(w)


def displacement(net, x_t, t, s, y, w, scale_param=True):
    """f_theta(x_t, t, s, c, w) = (s - t) [w] F_theta(x_t, t, s, c, w).       (Eq. 4; Sec. 4 scaled)"""
    return _bc((s - t) * _scale(w, scale_param), x_t) * net(x_t, t, s, y, w)


def model_velocity(net, x, t, y, w, scale_param=True):
    """u_theta(x, t, c, w) = d/ds f_theta |_{s=t} = [w] F_theta(x, t, t, c, w).   (Sec. 3; App. A.5)"""
    return _bc(_scale(w, scale_param), x) * net(x, t, t, y, w)


JVP_METHODS = ("auto", "func", "manual")


def terminal_velocity(net, x_t, t, s, y, w, scale_param=True, detach_jvp=False, jvp="auto"):
    """(f, d/ds f) with d/ds f = [w] (F + (s - t) dF/ds).                          (Eq. 17, Fig. 11)

    dF/ds is one forward-mode JVP. The paper's tangent is (0, 0, 1) on (x_t, t, s); differentiating only
    in s is the same product with the zero tangents left out. Reverse-mode gradients flow through both
    F and dF/ds (second order through the JVP), unless detach_jvp, the paper's cheaper biased variant
    (Sec. 7.4), which stops the gradient of dF/ds only.

    jvp="func": torch.func.jvp of the network, as in the paper's Fig. 11 (the reference). "manual": the
    network's forward_jvp, the same derivative with the tangent carried by hand through each layer
    (DiT.forward_jvp; equal in float64, see the tests), which activation checkpointing and torch.compile
    can handle. "auto": manual if the network has a forward_jvp, else func.
    """
    if jvp not in JVP_METHODS:
        raise ValueError(f"jvp must be one of {JVP_METHODS}, got {jvp!r}")
    if jvp == "manual" or (jvp == "auto" and hasattr(net, "forward_jvp")):
        F, dF_ds = net.forward_jvp(x_t, t, s, y, w)
    else:
        if getattr(net, "checkpoint_blocks", False):
            raise ValueError("checkpoint_blocks needs jvp='manual': activation checkpointing under torch.func.jvp "
                             "recomputes a different set of tensors and fails in the backward")
        F, dF_ds = torch.func.jvp(lambda s_: net(x_t, t, s_, y, w), (s,), (torch.ones_like(s),))
    if detach_jvp:
        dF_ds = dF_ds.detach()
    ws = _bc(_scale(w, scale_param), x_t)
    gap = _bc(s - t, x_t)
    f = gap * ws * F                                  # Eq. 4
    df_ds = ws * (F + gap * dF_ds)                    # Eq. 17
    return f, df_ds


# ------------------------------------------------------------------------------------------------
# Sampling the loss inputs: times (gap*, Table 6), noise, label dropout, guidance weight
# ------------------------------------------------------------------------------------------------

def _logit(p):
    return torch.log(p) - torch.log1p(-p)


def sample_times(n, generator=None, device=None, mu_gap=-0.8, sigma_gap=1.0, mu_s=-0.4, sigma_s=1.0):
    """The "gap*" time sampler (Sec. 7.3, Table 6; official training/loss.py, sample_ts). Returns (t, s, s_prime).

        gap = sigmoid(N(mu_gap, sigma_gap^2))
        s   = sigmoid(z), z ~ N(mu_s, sigma_s^2) truncated to z <= logit(1 - gap)  (so s <= 1 - gap)
        t   = s + gap
        s'  = sigmoid(N(mu_s, sigma_s^2)), independent, for the flow-matching term only

    The truncation is sampled exactly by the inverse CDF: z = mu + sigma Phi^-1(U Phi((b - mu) / sigma)).
    Computed in float64, returned in float32. Medians: gap 0.31, s 0.33, t 0.71, s' 0.40.
    """
    kw = dict(generator=generator, device=device, dtype=torch.float64)
    gap = torch.sigmoid(mu_gap + sigma_gap * torch.randn(n, **kw))
    b = (_logit(1 - gap) - mu_s) / sigma_s                                # standardised upper bound
    z = mu_s + sigma_s * torch.special.ndtri(torch.rand(n, **kw) * torch.special.ndtr(b))
    s = torch.sigmoid(z)
    t = (s + gap).clamp(max=1.0)                                         # clamp: rounding only
    s_prime = torch.sigmoid(mu_s + sigma_s * torch.randn(n, **kw))
    return t.float(), s.float(), s_prime.float()


@dataclass
class LossInputs:
    """Everything random in one step of Algorithm 1; the loss is a pure function of these."""
    x0: torch.Tensor        # (B, ...) data
    x1: torch.Tensor        # (B, ...) noise
    t: torch.Tensor         # (B,)
    s: torch.Tensor         # (B,)
    s_prime: torch.Tensor   # (B,)
    y: torch.Tensor         # (B,) long, num_classes = null class
    w: torch.Tensor         # (B,) guidance weight, 1 where the label was dropped

    def slice(self, i, j):
        """Rows i:j (a data-parallel rank's share, or a micro-batch)."""
        return LossInputs(*(getattr(self, k)[i:j] for k in self.__dataclass_fields__))


def sample_loss_inputs(x0, y, num_classes, w=2.0, w_range=None, label_dropout=0.1, generator=None):
    """Step 1-3 of Algorithm 1: noise, times, label dropout and guidance weight for a batch.

    Guidance: constant w (the paper's best, Table 4a; all released configs) unless w_range=(w_min,
    w_max). Random w follows the paper, beta = 1/w ~ U(1/w_max, 1/w_min) (App. F.1), since beta is
    what the network sees; the official code instead draws w ~ U(w_min, w_max) (training/loss.py).
    Label dropout: y -> null with probability label_dropout, and w forced to 1 there (Sec. 4).
    """
    B, device = x0.shape[0], x0.device
    x1 = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t, s, s_prime = sample_times(B, generator=generator, device=device)
    if w_range is None:
        w = torch.full((B,), float(w), device=device)
    else:
        w_min, w_max = w_range
        beta = 1 / w_max + (1 / w_min - 1 / w_max) * torch.rand(B, generator=generator, device=device)
        w = 1.0 / beta
    drop = torch.rand(B, generator=generator, device=device) < label_dropout
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    w = torch.where(drop, torch.ones_like(w), w)
    return LossInputs(x0, x1, t, s, s_prime, y, w)


# ------------------------------------------------------------------------------------------------
# The loss (Eq. 15)
# ------------------------------------------------------------------------------------------------

def _mean_dims(x):
    return x.flatten(1).mean(1)  # (B,)


def tvm_loss(net, target, inp, scale_param=True, detach_jvp=False, terminal=True, jvp="auto"):
    """Eq. 15 (v1), per sample, then the batch mean:

        (1/w^2) [ || d/ds f_theta(x_t, t, s, c, w) - u_{theta*_sg}(x_t + f_{theta_sg}(x_t, t, s, c, w), s, c, w) ||^2 1[t != s]
                + || u_theta(x_s', s', c, w) - (w v + (1 - w) u_{theta*_sg}(x_s', s', null, 1)) ||^2 ]

    net is the online network, target the target EMA (a separate module; no gradient reaches it). With
    terminal=False only the flow-matching term is computed: the baseline of the same network trained
    as a plain (guided) flow-matching model. jvp: how d/ds F is computed (terminal_velocity). Returns (loss, {"terminal": (B,), "fm": (B,)}).
    """
    x0, x1, t, s, s_prime, y, w = inp.x0, inp.x1, inp.t, inp.s, inp.s_prime, inp.y, inp.w
    B = x0.shape[0]
    v = x1 - x0                                                           # conditional velocity
    x_sp = _bc(1 - s_prime, x0) * x0 + _bc(s_prime, x0) * x1              # x_{s'}, same (x0, x1)
    null = torch.full_like(y, null_class(net))
    ones = torch.ones_like(w)

    if terminal:
        x_t = _bc(1 - t, x0) * x0 + _bc(t, x0) * x1                       # Sec. 2
        f, df_ds = terminal_velocity(net, x_t, t, s, y, w, scale_param, detach_jvp, jvp)
        x_s_hat = (x_t + f).detach()                                      # jump endpoint, theta_sg
        with torch.no_grad():
            # One forward of the target for both of its batches: the velocity at the jump endpoint
            # (terminal term) and the unconditional velocity at x_s' (guided FM target, Eq. 14).
            u_both = model_velocity(target, torch.cat([x_s_hat, x_sp]), torch.cat([s, s_prime]),
                                    torch.cat([y, null]), torch.cat([w, ones]), scale_param)
            u_target, u_uncond = u_both[:B], u_both[B:]
        not_equal = (t != s).to(x0.dtype)                                 # the 1[t != s] of Eq. 12
        terminal_term = _mean_dims((df_ds - u_target) ** 2) * not_equal / w ** 2   # Eq. 15, term 1
    else:
        with torch.no_grad():
            u_uncond = model_velocity(target, x_sp, s_prime, null, ones, scale_param)
        terminal_term = torch.zeros(B, device=x0.device)

    u = model_velocity(net, x_sp, s_prime, y, w, scale_param)                       # u_theta(x_s', s', c, w)
    fm_target = _bc(w, x0) * v + _bc(1 - w, x0) * u_uncond                          # Eq. 14
    fm_term = _mean_dims((u - fm_target) ** 2) / w ** 2                             # Eq. 15, term 2
    loss = (terminal_term + fm_term).mean()
    return loss, {"terminal": terminal_term.detach(), "fm": fm_term.detach()}


def null_class(net):
    """The null-class label of a network: its num_classes (toy networks must define the attribute)."""
    if not hasattr(net, "num_classes"):
        raise AttributeError(f"{type(net).__name__} needs a `num_classes` attribute, the label of its null "
                             "class (e.g. 1 for an unconditional toy network whose labels are all 1)")
    return net.num_classes


class TVMLoss(nn.Module):
    """The whole loss as one module's forward, JVP included, so that DistributedDataParallel can wrap
    it: torch.func.jvp cannot run through a DDP module (pytorch #102197), but DDP only needs the
    parameters' gradients, which backward produces as usual. The target EMA is passed in, not owned,
    so DDP neither broadcasts nor synchronises it (the official code does the same)."""

    def __init__(self, net, scale_param=True, detach_jvp=False, terminal=True, jvp="auto"):
        super().__init__()
        self.net = net
        self.scale_param, self.detach_jvp, self.terminal, self.jvp = scale_param, detach_jvp, terminal, jvp

    def forward(self, inp, target):
        return tvm_loss(self.net, target, inp, self.scale_param, self.detach_jvp, self.terminal, self.jvp)


@torch.no_grad()
def ema_update(ema, net, rate, ok=None):
    """theta_ema <- rate theta_ema + (1 - rate) theta. Used for the target EMA (0.99) and the
    evaluation EMA (0.9999) of Algorithm 1, step 5.

    ok: optional 0-d bool tensor, False for a skipped step (non-finite loss, gradient or updated weights):
    the EMA then stays exactly as it was. Decided on the device, with no host synchronisation, so that a
    whole training step can be captured as a CUDA graph (train.py)."""
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    if ok is None:
        torch._foreach_lerp_(ema_params, net_params, 1.0 - rate)
    else:
        flag = ok.to(torch.int32)   # once, not per parameter
        for e, n in zip(ema_params, net_params):
            if _ema_kernel_applies(e, n):
                _ema_lerp_kernel(e, n, 1.0 - rate, flag)
            else:
                # Where not ok, lerp towards the EMA itself: no move. (A weight of 0 would not do: 0 * inf
                # is NaN when the online weights are not finite.) One parameter at a time: no copy of the
                # whole model.
                e.lerp_(torch.where(ok, n, e), 1.0 - rate)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


# The flagged EMA update on a GPU, one pass: the torch lines above read both weights twice and write a
# temporary (torch.where) before the lerp: 6 float32 accesses per parameter against 3, and the update
# runs twice per step over the 678M parameters of XL/2 (measured on an H200: see notes/step.md, "Toward the
# hardware limit"). Same formula as torch's lerp for a weight below 0.5, e + w (n - e), in float32.
if HAS_TRITON:
    @triton.jit
    def _ema_kernel(E, N, OK, numel, weight, BLOCK: tl.constexpr):
        """E[i] <- E[i] + weight (N[i] - E[i]) for this program's BLOCK elements, if *OK; else nothing is
        read or written (so non-finite N cannot reach E)."""
        if tl.load(OK) != 0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            e = tl.load(E + offs, mask=mask).to(tl.float32)
            n = tl.load(N + offs, mask=mask).to(tl.float32)
            tl.store(E + offs, (e + weight * (n - e)).to(E.dtype.element_ty), mask=mask)


_EMA_BLOCK = 4096


def _ema_kernel_applies(e, n):
    """The kernel runs for contiguous float32 / bf16 / fp16 CUDA tensors of one dtype (Triton present)."""
    return (HAS_TRITON and e.is_cuda and e.dtype == n.dtype and e.is_contiguous() and n.is_contiguous()
            and e.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _ema_lerp_kernel(e, n, weight, flag):
    """e <- e + weight (n - e) in place if the 0-d int32 device flag is nonzero; e unchanged if it is 0."""
    if e.numel():
        _ema_kernel[(triton.cdiv(e.numel(), _EMA_BLOCK),)](e, n, flag, e.numel(), float(weight), BLOCK=_EMA_BLOCK)


# ------------------------------------------------------------------------------------------------
# The sampler (Sec. 3 "Sampling", Fig. 3)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(net, x1, y, w, steps, scale_param=True):
    """n deterministic jumps on the uniform grid t_k = 1 - k/n:  x <- x + (s - t) [w] F(x, t, s, c, w).

    The state is kept in float64, as in the official generate_images.py; the network runs in its own
    precision (float32, or bf16 under autocast). w is a network input, so one step is exactly one
    forward pass: no classifier-free-guidance doubling. w may be a float or a (B,) tensor.
    """
    B, device = x1.shape[0], x1.device
    w = torch.as_tensor(w, dtype=torch.float32, device=device).expand(B)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    dtype = next(net.parameters()).dtype          # float32 (bf16 comes from autocast), or float64 in tests
    x = x1.double()
    for k in range(steps):
        t = torch.full((B,), float(grid[k]), device=device)
        s = torch.full((B,), float(grid[k + 1]), device=device)
        x = x + displacement(net, x.to(dtype), t, s, y, w, scale_param).double()   # Fig. 3
    return x


# ------------------------------------------------------------------------------------------------
# python tvm.py: sizes and a small self-check
# ------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    for name in DIT_CONFIGS:
        with torch.device("meta"):
            m = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
        print(f"DiT-{name:9s} 256 px (32x32x4 latents, 1000 classes): {sum(p.numel() for p in m.parameters()):,} parameters")
    torch.manual_seed(0)
    net = build_dit(dict(hidden_size=64, depth=2, num_heads=4, patch_size=2), 8, 1, 10).double()
    target = build_dit(dict(hidden_size=64, depth=2, num_heads=4, patch_size=2), 8, 1, 10).double()
    inp = sample_loss_inputs(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,)), 10)
    loss, terms = tvm_loss(net, target, inp)
    loss.backward()
    print(f"tiny DiT: loss {loss.item():.4f} (terminal {terms['terminal'].mean():.4f}, fm {terms['fm'].mean():.4f})")
    x = sample(net, torch.randn(4, 1, 8, 8), torch.arange(4), 2.0, steps=2)
    print(f"2-step sample: shape {tuple(x.shape)}, dtype {x.dtype}")
    with torch.no_grad():   # off the zero init (where dF/ds = 0), then the by-hand tangent vs torch.func.jvp
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x_t = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    _, dF = net.forward_jvp(x_t, inp.t, inp.s, inp.y, inp.w)
    _, dF_ref = torch.func.jvp(lambda s_: net(x_t, inp.t, s_, inp.y, inp.w), (inp.s,), (torch.ones_like(inp.s),))
    print(f"dF/ds by hand vs torch.func.jvp: max difference {(dF - dF_ref).abs().max():.1e} of "
          f"max |dF/ds| {dF_ref.abs().max():.2f} (float64)")
