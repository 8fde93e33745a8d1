"""
One training step of TVM (Algorithm 1, steps 4-5): forward and backward of the loss (tvm.TVMLoss, the JVP
inside), clipping, AdamW, both EMAs, without a host synchronisation; eager, or replayed as CUDA graphs;
on one process or several (DDP, or one all-reduce of a flat gradient buffer). train.py runs it in its
loop; benchmark.py feeds it its own batches.
"""

import dataclasses
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tvm
from data import TrainError


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

def make_optimizer(net, cfg):
    """AdamW over the trainable parameters (Table 6: constant lr, betas (0.9, 0.95), no weight decay).

    fused=True: one multi-tensor kernel per step instead of ~10 kernels per parameter (the default
    implementation took 52-73 ms of an XL/2 step on an H200, most of it launch overhead), and it can
    skip an update on the device (its found_inf flag), which the CUDA-graph step needs. capturable on
    CUDA: its step counters live on the GPU, so the step can be captured."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=True, capturable=params[0].is_cuda)


STAT_NAMES = ("loss", "terminal", "fm", "grad_norm", "ok", "weights_ok")


def step_on_device(model, net, ema, target, opt, micro_batches, cfg, amp=nullcontext(), flat=None):
    """Algorithm 1, steps 4-5, without one host synchronisation, so that it can be captured as a CUDA
    graph (CudaGraphStep): forward + backward over the micro-batches (gradient accumulation), clipping,
    AdamW, both EMAs. A step whose loss or gradient is not finite changes nothing: AdamW skips its update
    on the device (found_inf, the protocol of torch.amp.GradScaler) and the EMAs move by 0.

    model is tvm.TVMLoss(net), DDP-wrapped on several processes unless flat (FlatGradients: --grad_sync
    flat) is given, which all-reduces every gradient in one call between the backward and the update;
    micro_batches together are this rank's share of the global batch; opt comes from make_optimizer
    (fused). Returns a float64 tensor on the device with the global means of loss, terminal and fm terms,
    the gradient norm, ok (1.0 or 0.0) and whether the updated weights are finite (1.0 or 0.0): STAT_NAMES."""
    sums, n_rank = _backward(model, target, opt, micro_batches, amp, flat)
    _all_reduce(sums, flat)
    return _update(net, ema, target, opt, sums, n_rank, cfg, flat)


def _backward(model, target, opt, micro_batches, amp, flat):
    """Forward + backward over this rank's micro-batches, gradients accumulated (and all-reduced by DDP's
    hooks if model is DDP) -> (float64 sums of loss, terminal, fm over this rank's samples; their number)."""
    if not opt.defaults.get("fused"):
        raise TypeError("step_on_device needs the fused AdamW of make_optimizer: an unfused optimizer ignores "
                        "found_inf and would apply a non-finite step")
    opt.zero_grad(set_to_none=flat is None)    # flat: the gradients are views of its buffer, zeroed in place
    n_rank = sum(len(mb.y) for mb in micro_batches)
    sums = None
    for i, mb in enumerate(micro_batches):
        # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
        sync = model.no_sync() if isinstance(model, DDP) and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with amp:
                loss, terms = model(mb, target)
            # Mean over this rank's share; the all-reduce then averages the ranks: the global mean.
            (loss * (len(mb.y) / n_rank)).backward()
        s = torch.stack([loss.detach() * len(mb.y), terms["terminal"].sum(), terms["fm"].sum()]).double()
        sums = s if sums is None else sums + s
    return sums, n_rank


def _all_reduce(sums, flat):
    """Sum the loss sums over the processes, and with flat its gradient buffer (DDP did the gradients
    already). Outside any CUDA graph: the collectives are never captured."""
    if _world() > 1:                          # (torchrun with one process: nothing to sum, nothing to capture)
        dist.all_reduce(sums)
        if flat is not None:
            dist.all_reduce(flat.buffer)


def _update(net, ema, target, opt, sums, n_rank, cfg, flat):
    """Clipping, AdamW and both EMAs from the all-reduced sums and gradients -> the statistics tensor."""
    world = _world()
    if flat is not None and world > 1:
        flat.buffer.div_(world)               # the sum of the ranks' means -> the mean, as DDP averages
    means = sums / (n_rank * world)
    params = [p for p in net.parameters() if p.requires_grad]
    # The norm of the global gradient (already all-reduced), identical on every rank.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    ok = torch.isfinite(means).all() & torch.isfinite(grad_norm)
    # Clipping to norm grad_clip, as clip_grad_norm_ does (g <- g min(1, grad_clip / (|g| + 1e-6))), but
    # inside the fused AdamW kernel: it divides the gradient by its grad_scale as it reads it (the protocol
    # of torch.amp.GradScaler). One pass over the gradients fewer than scaling them first.
    # (The kernel takes the scale in float32: a float64 model's clipping is exact to float32 rounding.)
    opt.grad_scale = torch.clamp((grad_norm + 1e-6) / cfg.grad_clip, min=1.0).float() if cfg.grad_clip > 0 else None
    # The official code zeroes NaN losses; we skip the whole step (and train() logs it).
    opt.found_inf = (~ok).float()             # fused AdamW: no update, step count unchanged, where 1
    opt.step()
    # A finite gradient can still give non-finite weights (an infinite lr, a NaN moment). One fused norm
    # of all parameters, on the device. Undoing the step would need a copy of the weights and AdamW's
    # moments (3x the model's memory) at every step, so we do not: the EMAs are left untouched, and the
    # caller stops the run with an error; the last checkpoint, written before, stays good.
    weights_ok = torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(net.parameters())))))
    tvm.ema_update(target, net, cfg.target_ema, ok & weights_ok)   # theta*  (teacher of the next step)
    tvm.ema_update(ema, net, cfg.ema, ok & weights_ok)             # theta** (what is evaluated)
    return torch.cat([means, grad_norm.double()[None], ok.double()[None], weights_ok.double()[None]])


def _world():
    """The number of processes: 1 without a process group, and under torchrun with one process."""
    return dist.get_world_size() if dist.is_initialized() else 1


def step_report(stats):
    """The device tensor of step_on_device -> dict of floats (one host synchronisation) with `skipped`."""
    out = dict(zip(STAT_NAMES, stats.tolist()))
    out["skipped"], out["weights_ok"] = not out.pop("ok"), bool(out["weights_ok"])
    return out


def train_step(model, net, ema, target, opt, micro_batches, cfg, amp=nullcontext(), flat=None):
    """One eager training step: step_on_device, then its statistics on the host. Returns global means:
    loss, terminal, fm, grad_norm, skipped, weights_ok."""
    return step_report(step_on_device(model, net, ema, target, opt, micro_batches, cfg, amp, flat))


# ------------------------------------------------------------------------------------------------
# Several processes: DDP, or one all-reduce of a flat gradient buffer (what a CUDA graph allows)
# ------------------------------------------------------------------------------------------------

class FlatGradients:
    """Every trainable parameter's .grad made a view of one flat buffer, for --grad_sync flat: the backward
    accumulates into the buffer in place (autograd adds into an existing .grad), one all_reduce sums it
    over the processes, and the update divides it by their number (_update). Unlike DDP's hooks, nothing
    of this happens inside the backward, so the backward and the update can each be captured as a CUDA
    graph with the all-reduce between them (CudaGraphStep); the price is that the all-reduce no longer
    overlaps the backward (one pass over the gradients: 2.7 GB in float32 for XL/2-18h). The buffer and its
    views must keep their addresses: nothing may set a .grad to None (the step zeroes them in place)."""

    def __init__(self, net):
        params = [p for p in net.parameters() if p.requires_grad]
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise TrainError("--grad_sync flat needs every trainable parameter in one dtype on one device")
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for p, g in zip(params, self.buffer.split([p.numel() for p in params])):
            p.grad = g.view_as(p)


def broadcast_from_rank_0(modules):
    """Make every process start from rank 0's weights and buffers, as DDP does when it wraps a module (the
    flat path has no DDP). The processes build the same network from the same seed, so this changes
    nothing unless something differed."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            with torch.no_grad():
                dist.broadcast(t.data, src=0)


# ------------------------------------------------------------------------------------------------
# The step as CUDA graphs
# ------------------------------------------------------------------------------------------------

class CudaGraphStep:
    """The whole training step (forward, JVP, backward, clipping, AdamW, both EMAs) replayed as a CUDA
    graph: the GPU then runs the step's ~10,000 kernels back to back, with no Python or launch overhead
    between them (measured on an H200: the eager XL/2 step kept the GPU idle about half the time).

    Same function as train_step, call for call: the first `warmup` calls run train_step eagerly (they
    compile the blocks and create the optimizer state); the next one captures step_on_device on static
    copies of its batch and replays it; later calls copy their batch into those tensors and replay. A
    batch must keep the shapes of the first one. Whatever the step reads must keep its address:
    parameters, gradients and optimizer state are updated in place, never replaced (load checkpoints
    before the first call).

    One process: one graph. Several (torchrun, --grad_sync flat, model not DDP-wrapped): two graphs, the
    backward and the update, sharing one memory pool, with the all-reduce of the loss sums and of the flat
    gradients run between them on the same stream; no collective is ever captured."""

    def __init__(self, model, net, ema, target, opt, cfg, amp=nullcontext(), warmup=2, flat=None):
        if isinstance(model, DDP) or (_world() > 1 and flat is None):
            raise TrainError("--cuda_graph under torchrun needs --grad_sync flat (DDP's all-reduce runs inside "
                             "the backward, which a graph cannot hold)")
        self.args, self.cfg, self.amp, self.warmup, self.flat = (model, net, ema, target, opt), cfg, amp, warmup, flat
        self.calls, self.graph, self.update_graph, self.static, self.stats, self.sums = 0, None, None, None, None, None

    def __call__(self, micro_batches):
        self.calls += 1
        if self.calls <= self.warmup:
            return train_step(*self.args, micro_batches, self.cfg, self.amp, self.flat)
        model, net, ema, target, opt = self.args
        if self.graph is None:
            self.static = [tvm.LossInputs(*[x.clone() for x in _fields(mb)]) for mb in micro_batches]
            torch.cuda.synchronize()
            torch.cuda.empty_cache()    # the eager steps' cached blocks: the graph gets a pool of its own
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (data loading) may use CUDA meanwhile without breaking the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                if _world() == 1:
                    self.stats = step_on_device(*self.args, self.static, self.cfg, self.amp)
                else:
                    self.sums, self.n_rank = _backward(model, target, opt, self.static, self.amp, self.flat)
            if _world() > 1:
                self.update_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.update_graph, pool=self.graph.pool(), capture_error_mode="thread_local"):
                    self.stats = _update(net, ema, target, opt, self.sums, self.n_rank, self.cfg, self.flat)
        else:
            for static, mb in zip(self.static, micro_batches, strict=True):
                for a, b in zip(_fields(static), _fields(mb)):
                    a.copy_(b)
        self.graph.replay()
        if self.update_graph is not None:
            _all_reduce(self.sums, self.flat)
            self.update_graph.replay()
        return step_report(self.stats)


def make_step(model, net, ema, target, opt, cfg, amp=nullcontext(), graph=False, warmup=2, flat=None):
    """batch -> statistics: the CUDA-graph step, or the eager train_step."""
    if graph:
        return CudaGraphStep(model, net, ema, target, opt, cfg, amp, warmup=warmup, flat=flat)
    return lambda micro_batches: train_step(model, net, ema, target, opt, micro_batches, cfg, amp, flat)


def _fields(inp):
    return [getattr(inp, f.name) for f in dataclasses.fields(inp)]
