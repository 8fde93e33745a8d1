"""
Attention whose forward-mode derivative (JVP) can itself be back-propagated: the kernel of TVM.

Terminal Velocity Matching (arXiv 2511.19797, Sec. 4 and App. C) trains on a loss that contains the
JVP dF/ds of the network, and back-propagates *through* that JVP. Every attention layer therefore
needs, for inputs (q, k, v) with tangents (q', k', v'),

    the output     O  = softmax(alpha q k^T) v                     alpha = scale = 1/sqrt(D) by default
    its tangent    O' = d/de O(q + e q', k + e k', v + e v') at e = 0
    and a reverse-mode backward from BOTH O and O' into q, k, v AND into q', k', v'.

PyTorch's fused scaled_dot_product_attention has no forward-mode derivative, and math attention
materialises (S x S) matrices. This file is the whole answer, in the order a reader needs it:

    1. reference_attention  -- math attention; autograd differentiates it in every mode. The truth.
    2. Triton kernels       -- _fwd_kernel (O and the log-sum-exp), _tangent_kernel (O' with the
                               softmax JVP), _bwd_preprocess + _bwd_kernel (the six gradients).
                               The math is derived in comments beside each kernel.
    3. autograd glue        -- _Attention (plain call, backward from O) whose jvp() calls
                               _AttentionTangent (O', and ONE fused backward from O and O' into all
                               six inputs).
    4. attention()          -- the dispatch: Triton on CUDA (or on the CPU under TRITON_INTERPRET=1),
                               the reference otherwise; use_backend() switches it.
    5. __main__             -- correctness check against float64 and the benchmark.

Cost, in (BLOCK_M x BLOCK_N x D) matrix products per tile of the N x N score matrix: forward 2,
tangent 6, fused backward 15; 23 in all, against 7 (2 + 5) for plain FlashAttention forward +
backward, so a JVP step cannot cost much less than ~3.3x plain attention. Measured on an H100
(notes/kernel.md): 3.4x (N = 256), 4.4x (N = 1024), 4.8x (N = 4096) of PyTorch's SDPA in GPU
time. Extra memory is linear in N: per row, fp32 lse and mu, plus fp32 dq, dq' accumulators.

Run:
    python attention_jvp.py                       # GPU: check + benchmark table (bf16, H100/H200)
    TRITON_INTERPRET=1 python attention_jvp.py    # CPU: check only, Triton's interpreter (slow, small)

Notation (paper App. C, one symbol per quantity; primes are tangents, 'd' prefixes are gradients):
    S   = q k^T                  (B, H, N, N) scores   (the code writes N for the sequence length
    P   = softmax(alpha S)       row softmax            when S means the score matrix)
    S'  = q' k^T + q k'^T        tangent of the scores
    mu_i = sum_j P_ij alpha S'_ij                       mean of the score tangent under row i's P
    P'  = P * (alpha S' - mu)    softmax JVP
    O'  = P' v + P v'
Shapes: q, k, v and tangents are (B, H, N, D); per-row statistics (lse, mu, ...) are (B, H, N) in fp32.
Kernels never hold more than a (BLOCK_M, BLOCK_N) tile of any N x N matrix.
"""

import contextlib
import math
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it (or without a GPU) the reference runs everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# ================================================================================================
# 1. The reference: math attention, differentiated by autograd in every mode.
# ================================================================================================

def reference_attention(q, k, v, scale=None):
    """softmax(scale q k^T) v on (B, H, N, D) tensors, in plain PyTorch ops.

    Autograd gives it a forward derivative (torch.func.jvp, forward_ad) and a backward through that
    derivative, so it is the ground truth for the kernel. It materialises the (B, H, N, N) scores.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # alpha S   (B, H, N, N)
    # Softmax written out: torch.softmax's forward-AD formula breaks reverse-over-forward with
    # forward_ad dual tensors (torch 2.13: "modified by an inplace operation"). Subtracting the
    # detached row max changes nothing mathematically (softmax is shift invariant) and avoids overflow.
    p = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()  # (B, H, N, N)
    p = p / p.sum(dim=-1, keepdim=True)  # P
    return p @ v  # (B, H, N, D)


# ================================================================================================
# 2. Triton kernels.
#
# Every kernel is launched on a 1-D grid of (query or key block) x (batch * head) programs and
# works on one (N, D) slice of contiguous (B, H, N, D) tensors. Exponentials are taken in base 2:
# with c = alpha * log2(e), exp(alpha S - LSE) = exp2(c S - lse2), and we store lse2 = LSE / ln 2.
# Masks: rows/columns beyond N are loaded as 0 and their probabilities forced to 0, so any N >= 1
# works; head dims that are not a power of two are padded to BLOCK_D with masked (zero) lanes.
# fp32 inputs go through tl.dot's default precision, which is tf32 on the GPU (about 3e-4 relative
# error); the CPU interpreter computes exact fp32 products.
# ================================================================================================

if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, N, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Primal forward, FlashAttention-2 style: O_i = sum_j P_ij v_j and lse2_i, for one block of rows.

        Online softmax over key blocks j, with running max m and running sum l (both per row):
            p~ = exp2(c S_ij - m_new),   l <- l exp2(m - m_new) + sum_j p~,   acc <- acc exp2(m - m_new) + p~ v
        and at the end O = acc / l, lse2 = m + log2(l), so that P_ij = exp2(c S_ij - lse2_i) exactly.
        Matrix products per key block: 2 (S = q k^T, acc += p v).
        """
        n_blocks = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        start_m = pid % n_blocks
        bh = (pid // n_blocks).to(tl.int64)
        base = bh * N * HEAD_DIM  # offset of this (batch, head) slice

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows i   (BLOCK_M,)
        offs_n = tl.arange(0, BLOCK_N)  # key columns j (BLOCK_N,)
        offs_d = tl.arange(0, BLOCK_D)  # head channels (BLOCK_D,)
        row_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM

        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of c S
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of p~
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of p~ v
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < N
            kv_off = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)

            s = tl.dot(q, tl.trans(k)) * qk_scale  # c S   (BLOCK_M, BLOCK_N)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])  # p~
            rescale = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
            l_i = l_i * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        o = acc / l_i[:, None]
        tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)

    @triton.jit
    def _tangent_kernel(Q, K, V, QT, KT, VT, LSE, OT, MU, N, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tangent O' for one block of rows, given lse2 from _fwd_kernel (paper Sec. 4 / App. C).

        Differentiating P_ij = exp(alpha S_ij) / sum_k exp(alpha S_ik) along the tangent:
            P'_ij = P_ij (alpha S'_ij - mu_i),      mu_i = sum_j P_ij alpha S'_ij
        so
            O'_i = sum_j P'_ij v_j + P_ij v'_j.
        Because lse2 is already known, P_ij = exp2(c S_ij - lse2_i) is exact inside the loop: no online
        rescaling. mu_i is only known after the last key block, so P' cannot be formed directly.
        The textbook way, O'_i = sum_j P_ij alpha S'_ij v_j - mu_i O_i + sum_j P_ij v'_j, rounds
        P alpha S' to bf16/fp16 before its product with v and then cancels the large common part
        mu_i O_i: an error of u |mu| |v| (u = unit roundoff) that can exceed O' itself (at N = 1,
        O' = v' exactly but the formula leaves u mu v behind). Instead, each key block b subtracts its
        own P-weighted mean c_ib = sum_{j in b} P_ij alpha S'_ij / sum_{j in b} P_ij before rounding:
            O'_i = sum_b [ sum_{j in b} P_ij (alpha S'_ij - c_ib) v_j ]      (rounded operand is small)
                 + sum_b c_ib (P v)_ib  -  mu_i sum_b (P v)_ib                (fp32, same (P v)_ib both times)
                 + sum_j P_ij v'_j
        which is exact when one block holds all the mass (N <= BLOCK_N, or a peaked softmax) and
        otherwise leaves only the spread of c_ib around mu_i in the cancellation. Cost: one product,
        (P v)_ib, per key block. mu_i is stored (one float per row) for the backward; S, S', P exist
        only as (BLOCK_M, BLOCK_N) tiles in registers.
        Matrix products per key block: 6 (S; S' = q' k^T + q k'^T; P (alpha S' - c) v; P v; P v').
        """
        n_blocks = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        start_m = pid % n_blocks
        bh = (pid // n_blocks).to(tl.int64)
        base = bh * N * HEAD_DIM

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM
        q_off = base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]

        q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        qt = tl.load(QT + q_off, mask=q_mask, other=0.0)  # q'
        lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        mu = tl.zeros([BLOCK_M], tl.float32)  # sum_j P_ij alpha S'_ij
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_b sum_j P_ij (alpha S'_ij - c_ib) v_j + P_ij v'_j
        cpv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_b c_ib (P v)_ib
        pv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_b (P v)_ib  (= O, in fp32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < N
            kv_off = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            kt = tl.load(KT + kv_off, mask=kv_mask, other=0.0)  # k'
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            vt = tl.load(VT + kv_off, mask=kv_mask, other=0.0)  # v'

            s = tl.dot(q, tl.trans(k))  # S   (BLOCK_M, BLOCK_N)
            st = (tl.dot(qt, tl.trans(k)) + tl.dot(q, tl.trans(kt))) * sm_scale  # alpha S'
            p = tl.math.exp2(s * qk_scale - lse[:, None])  # P, exactly normalised
            p = tl.where(col_ok[None, :], p, 0.0)
            ps = p * st  # P alpha S'
            l_b = tl.sum(p, 1)  # this block's share of the row's probability
            mu_b = tl.sum(ps, 1)
            c = tl.where(l_b > 0.0, mu_b / l_b, 0.0)  # c_ib
            mu += mu_b
            pv_b = tl.dot(p.to(v.dtype), v)  # (P v)_ib   (BLOCK_M, BLOCK_D)
            pv += pv_b
            cpv += c[:, None] * pv_b
            acc += tl.dot((ps - p * c[:, None]).to(v.dtype), v)
            acc += tl.dot(p.to(vt.dtype), vt)

        ot = acc + (cpv - mu[:, None] * pv)
        tl.store(OT + q_off, ot.to(OT.dtype.element_ty), mask=q_mask)
        tl.store(MU + bh * N + offs_m, mu, mask=row_ok)

    @triton.jit
    def _bwd_preprocess(O, DO, OT, DOT, MU, DELTA, SIGMA, N,
                        HAS_DO: tl.constexpr, TANGENT: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """Per-row scalars of the backward, O(N D) work, no key loop (derivation at _bwd_kernel):
            Sigma_i = dO'_i . O_i                                   (only with the tangent)
            Delta_i = dO_i . O_i + dO'_i . O'_i - mu_i Sigma_i      (terms present as available)
        """
        n_blocks = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        start_m = pid % n_blocks
        bh = (pid // n_blocks).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        off = bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

        o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
        delta = tl.zeros([BLOCK_M], tl.float32)
        if HAS_DO:
            do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
            delta += tl.sum(do * o, 1)
        if TANGENT:
            ot = tl.load(OT + off, mask=mask, other=0.0).to(tl.float32)
            dot_ = tl.load(DOT + off, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(MU + bh * N + offs_m, mask=row_ok, other=0.0)
            sigma = tl.sum(dot_ * o, 1)
            delta += tl.sum(dot_ * ot, 1) - mu * sigma
            tl.store(SIGMA + bh * N + offs_m, sigma, mask=row_ok)
        tl.store(DELTA + bh * N + offs_m, delta, mask=row_ok)

    @triton.jit
    def _bwd_kernel(Q, K, V, QT, KT, VT, DO, DOT, LSE, MU, DELTA, SIGMA,
                    DQ, DK, DV, DQT, DKT, DVT, N, qk_scale, sm_scale,
                    HAS_DO: tl.constexpr, TANGENT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Gradients of <dO, O> + <dO', O'> for one block of key columns j (loop over query rows i).

        With Z = alpha S, the gradient reaching P (through O = P v, O' = P' v + P v' and P' = P (alpha S' - mu)):
            A_ij    = dO'_i . v_j                                  (gradient reaching P'_ij)
            dP_ij   = dO_i . v_j + dO'_i . v'_j + A_ij (alpha S'_ij - mu_i) - alpha S'_ij Sigma_i
        where the last term comes from mu_i's dependence on P, and Sigma_i = sum_j P_ij A_ij = dO'_i . O_i.
        Softmax backward, dZ_ij = P_ij (dP_ij - sum_k P_ik dP_ik); expanding the sum with O and O' gives
            sum_k P_ik dP_ik = dO_i . O_i + dO'_i . O'_i - mu_i Sigma_i = Delta_i,
        a per-row scalar computed once by _bwd_preprocess (no extra pass over keys, unlike App. C step 1).
        The score tangent only enters P', so
            dS'_ij = alpha P_ij (A_ij - Sigma_i),          dS_ij = alpha dZ_ij.
        Finally S = q k^T and S' = q' k^T + q k'^T give
            dq  = dS k + dS' k'      dk  = dS^T q + dS'^T q'      dv  = P^T dO + P'^T dO'
            dq' = dS' k              dk' = dS'^T q                dv' = P^T dO'
        dk, dv, dk', dv' accumulate in registers over the rows; dq, dq' are summed over column blocks
        with fp32 atomic adds (as FlashAttention-2 does for dq), so results may differ in the last bits
        between runs. HAS_DO / TANGENT drop the terms of a missing dO / absent tangent.
        Matrix products per (row block, column block): primal only 5; tangent only 13; both 15.
        """
        n_blocks = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        start_n = pid % n_blocks
        bh = (pid // n_blocks).to(tl.int64)
        base = bh * N * HEAD_DIM

        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key columns j of this program
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < N
        d_ok = offs_d < HEAD_DIM
        kv_off = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]

        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if TANGENT:
            kt = tl.load(KT + kv_off, mask=kv_mask, other=0.0)  # k'
            vt = tl.load(VT + kv_off, mask=kv_mask, other=0.0)  # v'
            dkt = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dvt = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        for start_m in range(0, N, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < N
            q_off = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
            lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
            delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)

            s = tl.dot(q, tl.trans(k))  # S   (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(s * qk_scale - lse[:, None])  # P
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # dP_ij
            if HAS_DO:
                do = tl.load(DO + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
                dp += tl.dot(do, tl.trans(v))  # dO_i . v_j
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # P^T dO
            if TANGENT:
                qt = tl.load(QT + q_off, mask=q_mask, other=0.0)  # q'
                dot_ = tl.load(DOT + q_off, mask=q_mask, other=0.0)  # dO'
                mu = tl.load(MU + bh * N + rows, mask=row_ok, other=0.0)
                sigma = tl.load(SIGMA + bh * N + rows, mask=row_ok, other=0.0)
                st = (tl.dot(qt, tl.trans(k)) + tl.dot(q, tl.trans(kt))) * sm_scale  # alpha S'
                a = tl.dot(dot_, tl.trans(v))  # A_ij = dO'_i . v_j
                dp += tl.dot(dot_, tl.trans(vt)) + a * (st - mu[:, None]) - st * sigma[:, None]
                dst = sm_scale * p * (a - sigma[:, None])  # dS'
                dv += tl.dot(tl.trans((p * (st - mu[:, None])).to(dot_.dtype)), dot_)  # P'^T dO'
                dvt += tl.dot(tl.trans(p.to(dot_.dtype)), dot_)  # P^T dO'
            ds = sm_scale * p * (dp - delta[:, None])  # dS = alpha dZ
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dq = tl.dot(ds.to(k.dtype), k)  # this column block's share of dq  (BLOCK_M, BLOCK_D)
            if TANGENT:
                dk += tl.dot(tl.trans(dst.to(qt.dtype)), qt)
                dkt += tl.dot(tl.trans(dst.to(q.dtype)), q)
                dq += tl.dot(dst.to(kt.dtype), kt)
                tl.atomic_add(DQT + q_off, tl.dot(dst.to(k.dtype), k), mask=q_mask, sem="relaxed")
            tl.atomic_add(DQ + q_off, dq, mask=q_mask, sem="relaxed")

        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
        if TANGENT:
            tl.store(DKT + kv_off, dkt.to(DKT.dtype.element_ty), mask=kv_mask)
            tl.store(DVT + kv_off, dvt.to(DVT.dtype.element_ty), mask=kv_mask)


# ------------------------------------------------------------------------------------------------
# Launchers. Block sizes: small on the CPU interpreter (so that tests cross block edges at small N),
# tuned on an H100 and an H200 for the GPU (see notes/kernel.md).
# ------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


# Triton decides at decoration (import) time whether @triton.jit kernels run in its CPU interpreter,
# so the dispatch must use the same moment's TRITON_INTERPRET, not the variable's current value.
_INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting():
    return _INTERPRET


def _config(kind, q):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for 'fwd', 'tangent', 'bwd' or 'bwd_tangent'."""
    if q.device.type != "cuda":  # the interpreter: smallest tiles tl.dot accepts
        return 16, 16, 1, 1
    row_bytes = _block_d(q.shape[-1]) * q.element_size()  # bytes of one padded row of q
    return _GPU_CONFIGS[kind][0 if row_bytes <= 128 else 1 if row_bytes <= 256 else 2]


# Tuned on an H200 and an H100, Triton 3.6 (notes/kernel.md). Rows by the bytes of one padded row:
# [0] bf16/fp16 D <= 64 (the tuned case), [1] bf16/fp16 D <= 128 or fp32 D <= 64, [2] fp32 D <= 128;
# larger rows get smaller tiles to fit the 227 KiB of shared memory per SM. In 'bwd', BLOCK_N is the
# key block a program owns and BLOCK_M the query block of its inner loop.
_GPU_CONFIGS = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
    "tangent": [(64, 64, 4, 3), (128, 32, 8, 3), (32, 32, 4, 2)],
    "bwd": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 1)],
    "bwd_tangent": [(64, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1)],
}


def _grid(N, BH, block):
    return (triton.cdiv(N, block) * BH,)


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _triton_forward(q, k, v, scale):
    """O (B, H, N, D) and lse2 (B, H, N) fp32 from contiguous q, k, v."""
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _config("fwd", q)
    _fwd_kernel[_grid(N, B * H, BM)](q, k, v, o, lse, N, scale * LOG2E,
                                     HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=BM, BLOCK_N=BN,
                                     num_warps=warps, num_stages=stages)
    return o, lse


def _triton_tangent(q, k, v, qt, kt, vt, lse, scale):
    """O' (B, H, N, D) and mu (B, H, N) fp32."""
    B, H, N, D = q.shape
    ot = torch.empty_like(q)
    mu = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _config("tangent", q)
    _tangent_kernel[_grid(N, B * H, BM)](q, k, v, qt, kt, vt, lse, ot, mu, N, scale * LOG2E, scale,
                                         HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=BM, BLOCK_N=BN,
                                         num_warps=warps, num_stages=stages)
    return ot, mu


def _triton_backward(q, k, v, o, lse, do, scale, tangent=None):
    """Gradients from dO (may be None) and, if tangent = (qt, kt, vt, ot, mu, dot) is given, from dO'.

    Returns (dq, dk, dv) or (dq, dk, dv, dqt, dkt, dvt).
    """
    B, H, N, D = q.shape
    has_do, has_t = do is not None, tangent is not None
    qt, kt, vt, ot, mu, dot_ = tangent if has_t else (q, k, v, o, lse, o)  # placeholders, never read
    do_ = do if has_do else o
    stats = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty((B, H, N), **stats)
    sigma = torch.empty((B, H, N), **stats) if has_t else delta
    BM, BN, warps, stages = _config("bwd_tangent" if has_t else "bwd", q)
    BD = _block_d(D)
    PM = 64 if q.is_cuda else 16
    _bwd_preprocess[_grid(N, B * H, PM)](o, do_, ot, dot_, mu, delta, sigma, N,
                                         HAS_DO=has_do, TANGENT=has_t,
                                         HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=PM)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # atomically accumulated
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if has_t:
        dqt = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dkt, dvt = torch.empty_like(k), torch.empty_like(v)
    else:
        dqt, dkt, dvt = dq, dk, dv  # placeholders, never written
    _bwd_kernel[_grid(N, B * H, BN)](q, k, v, qt, kt, vt, do_, dot_, lse, mu, delta, sigma,
                                     dq, dk, dv, dqt, dkt, dvt, N, scale * LOG2E, scale,
                                     HAS_DO=has_do, TANGENT=has_t,
                                     HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN,
                                     num_warps=warps, num_stages=stages)
    dq = dq.to(q.dtype)  # rebinding frees the fp32 accumulator before dq' is converted (peak memory)
    if not has_t:
        return dq, dk, dv
    return dq, dk, dv, dqt.to(q.dtype), dkt, dvt


# ================================================================================================
# 3. Autograd glue.
#
#   plain call        _Attention.forward             -> O, lse         (1 kernel, nothing else)
#   backward from O   _Attention.backward(dO)        -> dq, dk, dv     (primal-only backward kernel)
#   under a JVP       _Attention.jvp(q', k', v')     -> O' from _AttentionTangent.apply(q, k, v, q', k', v', O, lse)
#                     attention() then returns O + Z, where Z is an all-zero output of the same
#                     _AttentionTangent node ("route"; a stride-0 view, no memory).
#   backward          _AttentionTangent.backward(dO', dZ = dO) -> all six gradients, ONE fused kernel
#   attention_pair    _AttentionPair.forward(q, k, v, q', k', v') -> O, O' (forward + tangent kernels);
#                     its backward(dO, dO') is the same fused kernel. No forward-mode AD, no route:
#                     the path of tvm.DiT.forward_jvp, which carries tangents itself.
#
# Why the route Z. Under a JVP the user's O and O' come out of two different graph nodes (_Attention
# makes O, _AttentionTangent makes O'), so autograd would hand dO to one and dO' to the other, and
# the backward would run twice over the keys (5 + 13 matrix products instead of 15). Adding Z to O
# makes the gradient of the returned O arrive, unchanged (d(O + Z)/dZ = identity), at
# _AttentionTangent as the gradient of Z; the graph also orders it after that addition, so it always
# sees dO and dO' together. _Attention's own backward then returns nothing (ctx.box.routed), so
# nothing is counted twice. Without a JVP there is no Z and _Attention.backward does the work.
#
# _AttentionTangent receives O and lse as *constants* (detached): its backward returns the total
# derivative of (O, O') with respect to its six inputs. O is computed once; the tangent kernel reuses
# O and lse from the forward kernel.
# ================================================================================================

class _Box:
    """Mutable state shared by one attention() call's graph nodes: the route Z and whether it is used."""
    route = None
    routed = False


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, scale, box):
        return _triton_forward(q, k, v, scale)  # (O, lse2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, box = inputs
        o, lse = output
        ctx.scale, ctx.box = scale, box
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def backward(ctx, do, _dlse):
        if ctx.box.routed:  # under a JVP: dO reached _AttentionTangent through the route Z
            return None, None, None, None, None
        _check_not_functorch_wrapped(do)
        q, k, v, o, lse = ctx.saved_tensors
        with torch.no_grad():
            grads = _triton_backward(q, k, v, o, lse, do.contiguous(), ctx.scale)
        return _no_second_derivative(q, grads) + (None, None)

    @staticmethod
    def jvp(ctx, qt, kt, vt, _scale_t, _box_t):
        q, k, v, o, lse = ctx.saved_tensors
        # An input without a tangent arrives as None: its tangent is zero.
        qt, kt, vt = [torch.zeros_like(x) if t is None else t.to(x.dtype).contiguous()
                      for x, t in ((q, qt), (k, kt), (v, vt))]
        ot, _mu, ctx.box.route = _AttentionTangent.apply(q, k, v, qt, kt, vt, o.detach(), lse, ctx.scale)
        return ot, None


class _AttentionTangent(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, qt, kt, vt, o, lse, scale):
        ot, mu = _triton_tangent(q, k, v, qt, kt, vt, lse, scale)
        route = o.new_zeros(()).expand(o.shape)  # Z = 0, (B, H, N, D) with stride 0
        return ot, mu, route

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qt, kt, vt, o, lse, scale = inputs
        ot, mu, _route = output
        ctx.scale = scale
        ctx.mark_non_differentiable(mu)
        ctx.set_materialize_grads(False)  # a missing dO or dO' arrives as None: skip its terms
        ctx.save_for_backward(q, k, v, qt, kt, vt, o, lse, ot, mu)

    @staticmethod
    def backward(ctx, dot_, _dmu, do):
        return _fused_backward(ctx, do, dot_) + (None, None, None)  # o, lse, scale: constants here

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "attention_jvp: a second forward-mode derivative (jvp of jvp) is not implemented by the "
            "Triton kernel. Wrap the call in attention_jvp.use_backend('reference') for higher orders.")


def _fused_backward(ctx, do, dot_):
    """The six gradients (q, k, v, q', k', v') from dO and dO' (either may be None) in one kernel.
    ctx holds (q, k, v, q', k', v', O, lse, O', mu) and the scale."""
    if dot_ is None and do is None:
        return (None,) * 6
    _check_not_functorch_wrapped(dot_ if dot_ is not None else do)
    q, k, v, qt, kt, vt, o, lse, ot, mu = ctx.saved_tensors
    tangent = None if dot_ is None else (qt, kt, vt, ot, mu, dot_.contiguous())
    with torch.no_grad():
        grads = _triton_backward(q, k, v, o, lse, None if do is None else do.contiguous(), ctx.scale,
                                 tangent=tangent)
    if tangent is None:  # only O was used: the tangent inputs get no gradient
        grads = grads + (None, None, None)
    return _no_second_derivative(q, grads)


class _AttentionPair(torch.autograd.Function):
    """(O, O') as two ordinary outputs, for callers that carry tangents themselves (attention_pair):
    the forward and tangent kernels, then the same fused backward as under a JVP. No forward-mode AD
    is involved, so no route is needed: dO and dO' arrive at this one node together."""

    @staticmethod
    def forward(q, k, v, qt, kt, vt, scale):
        o, lse = _triton_forward(q, k, v, scale)
        ot, mu = _triton_tangent(q, k, v, qt, kt, vt, lse, scale)
        return o, ot, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qt, kt, vt, scale = inputs
        o, ot, lse, mu = output
        ctx.scale = scale
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, qt, kt, vt, o, lse, ot, mu)

    @staticmethod
    def backward(ctx, do, dot_, _dlse, _dmu):
        return _fused_backward(ctx, do, dot_) + (None,)  # scale


def _check_not_functorch_wrapped(grad_output):
    """torch.func.grad / vjp hand backward() wrapped tensors that a Triton kernel cannot read."""
    if torch._C._functorch.is_functorch_wrapped_tensor(grad_output):
        raise RuntimeError(
            "attention_jvp: reverse-mode torch.func transforms (torch.func.grad, vjp, jacrev) over the "
            "Triton kernel are not supported. Use loss.backward() or torch.autograd.grad (they work, also "
            "after torch.func.jvp), or wrap the call in attention_jvp.use_backend('reference').")


def _no_second_derivative(anchor, grads):
    """Make any attempt to differentiate the returned gradients raise a clear error.

    The kernels' backward is not itself differentiable. Under create_graph=True (grad mode is on
    inside backward) the gradients are passed through _SecondDerivativeError, attached to `anchor`
    (an input that requires grad), so a double backward fails loudly instead of returning zeros.
    """
    if not torch.is_grad_enabled():
        return grads
    return _SecondDerivativeError.apply(anchor, *grads)


class _SecondDerivativeError(torch.autograd.Function):
    @staticmethod
    def forward(anchor, *grads):
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "attention_jvp: double backward (differentiating a gradient of attention(), e.g. after "
            "backward(create_graph=True)) is not implemented by the Triton kernel. The TVM loss needs "
            "only jvp + one backward. Wrap the call in attention_jvp.use_backend('reference') for "
            "higher derivatives.")


# ================================================================================================
# 4. Dispatch.
# ================================================================================================

_BACKEND = "auto"  # "auto" | "triton" | "reference"; module-level so that switching is free


@contextlib.contextmanager
def use_backend(name):
    """Temporarily choose the attention implementation: "auto" (default), "triton" or "reference".

    "auto" runs Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1; otherwise the
    reference. "triton" raises if the kernel cannot run the inputs.
    """
    global _BACKEND
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"use_backend: expected 'auto', 'triton' or 'reference', got {name!r}")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


def _triton_unsupported(q, k, v):
    """None if the Triton path can run these inputs, else the reason."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not (q.is_cuda or (q.device.type == "cpu" and _interpreting())):
        return (f"tensors are on {q.device}; Triton needs CUDA, or the CPU with TRITON_INTERPRET=1 set "
                "before attention_jvp (and triton) are first imported")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return f"expected q, k, v of one shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bfloat16 does not run in Triton's CPU interpreter"
    return None


@torch.compiler.disable  # opaque to torch.compile, see _triton_attention_pair
def _triton_attention(q, k, v, scale):
    # q, k, v: contiguous (B, H, N, D), made so by the caller (attention) outside this opaque function.
    box = _Box()
    o, _lse = _Attention.apply(q, k, v, scale, box)
    if box.route is not None and torch.is_grad_enabled():  # a JVP ran and a backward may follow
        box.routed = True
        o = o + box.route  # same values; sends dO to the fused backward (see "Why the route Z")
    return o


def attention(q, k, v, scale=None):
    """softmax(scale q k^T) v for (B, H, N, D) tensors, non-causal, no mask; scale defaults to 1/sqrt(D).

    Correct under a plain call, torch.func.jvp, torch.autograd.forward_ad, and reverse-mode backward
    from the output and from its tangent into q, k, v and into their tangents. Not supported by the
    Triton path (each raises a RuntimeError or NotImplementedError that says what to do): double
    backward, jvp of jvp, and reverse-mode torch.func transforms (torch.func.grad / vjp); vmap raises
    PyTorch's own error. use_backend("reference") supports all of them.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _BACKEND == "reference":
        return reference_attention(q, k, v, scale)
    if k.dtype != q.dtype or v.dtype != q.dtype:  # e.g. mixed autocast outputs: compute in q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    reason = _triton_unsupported(q, k, v)
    if reason is None:
        # The kernels index contiguous (B, H, N, D) slices; views (a head split, a QK-norm's output)
        # are copied here, inside autograd, so tangents and gradients follow the copy. Here and not
        # inside the opaque _triton_attention, so that torch.compile can write a QK-norm's output
        # straight into that layout instead of running a separate copy (H200, XL/2 step: about 150
        # copy kernels, 4.9 ms, before).
        return _triton_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale)
    if _BACKEND == "triton":
        raise RuntimeError(f"attention_jvp: the Triton backend cannot run this call: {reason}. "
                           "Use use_backend('auto') or use_backend('reference').")
    return reference_attention(q, k, v, scale)


@torch.compiler.disable
def _triton_attention_pair(q, k, v, qt, kt, vt, scale):
    # Opaque to torch.compile (a graph break around the call): traced by dynamo, the kernels' float
    # scale argument becomes a float64 scalar (seen with torch 2.11, Triton 3.6: "Loop-carried variable
    # m_i ... fp32 ... re-assigned to fp64") and the kernel fails to build. Run eagerly, the call costs
    # the same; the code around it in a block is still compiled.
    o, ot, _lse, _mu = _AttentionPair.apply(q, k, v, qt, kt, vt, scale)
    return o, ot


def attention_pair(q, k, v, qt, kt, vt, scale=None):
    """(O, O') = torch.func.jvp(attention, (q, k, v), (q', k', v')), as a plain function of six tensors.

    For networks that propagate their tangent by hand (tvm.DiT.forward_jvp): the result is an ordinary
    pair of outputs, so reverse mode, activation checkpointing and torch.compile see no forward-mode AD.
    The Triton path runs the same three kernels as attention() under a JVP; the reference path is math
    attention under torch.func.jvp. Same dispatch rules as attention().
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k, v, qt, kt, vt = [x.to(q.dtype) for x in (k, v, qt, kt, vt)]   # e.g. mixed autocast outputs
    if _BACKEND != "reference":
        reason = _triton_unsupported(q, k, v)
        if reason is None:
            return _triton_attention_pair(*[x.contiguous() for x in (q, k, v, qt, kt, vt)], scale)
        if _BACKEND == "triton":
            raise RuntimeError(f"attention_jvp: the Triton backend cannot run this call: {reason}. "
                               "Use use_backend('auto') or use_backend('reference').")
    return torch.func.jvp(lambda q_, k_, v_: reference_attention(q_, k_, v_, scale), (q, k, v), (qt, kt, vt))


# ================================================================================================
# 5. Self-check and benchmark.
# ================================================================================================

def _rel_err(a, b, floor=1.0):
    """max |a - b| / max(max |b|, floor), in float64 (the tests' metric).

    The floor (inputs are standard normal, so every quantity is O(1)) keeps gradients that are exactly
    zero, e.g. dq = dk = 0 at N = 1 where the softmax of one key is constant, from dividing by ~0.
    """
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def _rel_fro(a, b, floor=1.0):
    """||a - b|| / ||b|| (Frobenius), floored like _rel_err; the metric of the kernel's error tables
    (README, notes/kernel.md)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor * b.numel() ** 0.5)).item()


def jvp_and_grads(fn, q, k, v, qt, kt, vt, do, dot_):
    """O, O' under torch.func.jvp, then the six gradients of <dO, O> + <dO', O'>.

    Returns [O, O', dq, dk, dv, dq', dk', dv'], the 8 quantities TVM needs.
    """
    leaves = [x.detach().requires_grad_() for x in (q, k, v, qt, kt, vt)]
    o, ot = torch.func.jvp(fn, tuple(leaves[:3]), tuple(leaves[3:]))
    torch.autograd.backward((o, ot), (do, dot_))
    return [o.detach(), ot.detach()] + [x.grad for x in leaves]


NAMES = ["O", "O'", "dq", "dk", "dv", "dq'", "dk'", "dv'"]


def check(B, H, N, D, dtype, device, seed=0):
    """Relative Frobenius errors of the kernel and of naive math attention (both in `dtype`) vs float64.

    The float64 reference sees the same rounded inputs, so only the arithmetic is measured. Heads are
    independent, so the reference (which materialises N x N matrices) runs on a slice of heads that
    fits in memory, and the kernel's full-shape results are compared on that slice.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(8)]
    with use_backend("triton"):
        ker = jvp_and_grads(attention, *xs)
    bh = max(1, min(B * H, 2**26 // (N * N)))  # (batch * head) slices for the N x N reference
    sl = [x.flatten(0, 1)[:bh].unsqueeze(0) for x in xs]
    ref = jvp_and_grads(reference_attention, *[x.double() for x in sl])
    naive = jvp_and_grads(reference_attention, *sl)
    ker = [x.flatten(0, 1)[:bh].unsqueeze(0) for x in ker]
    return [_rel_fro(a, r) for a, r in zip(ker, ref)], [_rel_fro(a, r) for a, r in zip(naive, ref)]


def benchmark(B, H, N, D, dtype=torch.bfloat16):
    """Median ms and peak extra MiB of one training-style step, for the kernel and naive math attention
    (torch.func.jvp forward, then backward through both outputs) and plain SDPA (forward + backward).

    Two times per row: 'wall' is triton.testing.do_bench of the eager step, which includes Python and
    torch.func overhead (the GPU idles when the step is shorter than that overhead: small N);
    'graph' replays the same step captured in a CUDA graph, i.e. GPU time alone.
    """
    dev = "cuda"
    q, k, v, qt, kt, vt, do, dot_ = [torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(8)]
    leaves = [x.requires_grad_() for x in (q, k, v, qt, kt, vt)]

    def jvp_step(fn):
        def step():
            o, ot = torch.func.jvp(fn, tuple(leaves[:3]), tuple(leaves[3:]))
            torch.autograd.backward((o, ot), (do, dot_))
        return step

    def sdpa_step():
        F.scaled_dot_product_attention(q, k, v).backward(do)

    out = {}
    for name, step in (("kernel", jvp_step(attention)), ("naive", jvp_step(reference_attention)),
                       ("sdpa", sdpa_step)):
        step()  # warm-up / compile
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median")
        try:
            graph_ms = triton.testing.do_bench_cudagraph(step, grad_to_none=leaves, return_mode="median")
        except Exception as e:  # capture can fail on some stacks; the wall time still stands
            print(f"  (CUDA-graph timing of {name} failed: {type(e).__name__}: {str(e)[:80]})")
            graph_ms = float("nan")
        out[name] = (ms, graph_ms, mib)
        for x in leaves:
            x.grad = None
    return out


def main():
    interp = _interpreting()
    device = "cpu" if interp else "cuda"
    if not interp and not torch.cuda.is_available():
        print("No GPU: run `TRITON_INTERPRET=1 python attention_jvp.py` for the CPU check.")
        return
    if not interp:
        print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    # --- correctness: the 8 quantities vs float64 autograd of the reference ---
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    cases = [((1, 2, 37, 72), (f32, f16)), ((2, 1, 1, 16), (f32,))] if interp else \
        [((64, 18, 256, 64), (b16,)), ((16, 18, 1024, 64), (b16,)), ((2, 16, 4096, 64), (b16,)),
         ((256, 6, 256, 64), (b16,)), ((4, 6, 256, 64), (f16, f32)), ((2, 4, 1000, 72), (b16, f16, f32)),
         ((1, 3, 77, 80), (b16,)), ((1, 2, 129, 96), (b16,)), ((2, 2, 1, 64), (b16, f32)),
         ((1, 2, 300, 128), (b16, f32))]
    print(f"{'shape':>20} {'dtype':>9} {'impl':>6} " + " ".join(f"{n:>8}" for n in NAMES))
    for shape, dtypes in cases:
        for dtype in dtypes:
            ker, naive = check(*shape, dtype, device)
            for impl, errs in (("kernel", ker), ("naive", naive)):
                print(f"{str(shape):>20} {str(dtype)[6:]:>9} {impl:>6} " + " ".join(f"{e:8.1e}" for e in errs))
    if interp:
        return
    # --- benchmark ---
    rows = []
    for shape in [(64, 18, 256, 64), (16, 18, 1024, 64), (2, 16, 4096, 64), (256, 6, 256, 64)]:
        r = benchmark(*shape)
        rows.append((shape, r))
    print("\njvp forward + backward through O and O' (bf16); plain SDPA = forward + backward, no JVP.")
    print("wall = do_bench of the eager step (median ms); graph = the same step replayed as a CUDA graph")
    print(f"{'B, H, N, D':>18} | {'kernel wall/graph ms, MiB':>26} | {'naive wall/graph ms, MiB':>25} | "
          f"{'SDPA wall/graph ms, MiB':>24} | kernel/SDPA wall, graph")
    for shape, r in rows:
        (kw, kg, kb), (nw, ng, nb), (sw, sg, sb) = r["kernel"], r["naive"], r["sdpa"]
        print(f"{str(shape):>18} | {kw:7.3f} / {kg:6.3f}, {kb:5.0f} | {nw:7.2f} / {ng:6.2f}, {nb:5.0f} | "
              f"{sw:6.3f} / {sg:6.3f}, {sb:4.0f} | {kw / sw:5.2f}x, {kg / sg:5.2f}x")


if __name__ == "__main__":
    main()
