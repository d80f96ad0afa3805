"""Data parallelism under torchrun: joining the job, which rank does what, and the few collectives the training
step and the evaluation need. In one plain process every function here is a no-op, so train.py and eval.py read
the same with and without torchrun.

    torchrun --nproc_per_node=4 train.py --stage 1 ...          # one node, 4 GPUs
    torchrun --nproc_per_node=4 eval.py --bench vstar ...       # the benchmark split over 4 ranks

Every rank holds the whole (4-bit) model and its own LoRA copy; only the LoRA gradients, a few counts and the
step's metrics cross between ranks. Rank and world size come from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
import datetime
import os

import torch
import torch.distributed as td


def world():
    """Processes in the job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    """Rank 0 alone writes metrics, transcripts, checkpoints and summaries."""
    return rank() == 0


def active():
    return world() > 1 and td.is_available() and td.is_initialized()


def init(timeout_min):
    """Join torchrun's job: nccl on CUDA (each rank on its LOCAL_RANK's GPU), gloo on CPU. A collective that waits
    longer than `timeout_min` minutes (a rank that hangs, or a step much slower on one rank) stops the job."""
    if world() == 1 or active():
        return
    cuda = torch.cuda.is_available()
    if cuda:  # "cuda" without an index (model.load_policy, eval) is then this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    print(f"rank {rank()} of {world()} ({td.get_backend()}): joined", flush=True)


def close():
    if active():
        td.destroy_process_group()


def _device():
    """Where a collective's tensors live: nccl reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def _collective(what, fn, *args):
    """Run one collective; a rank that died (or timed out) becomes one line naming what this rank was waiting for,
    and the job stops (torchrun then ends the other ranks), instead of a hang or a page of gloo internals."""
    try:
        return fn(*args)
    except (RuntimeError, ConnectionError) as e:  # td.DistBackendError and gloo's peer errors are RuntimeErrors
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SystemExit(f"error: rank {rank()} of {world()}: {what} failed: another rank of the job died or did "
                         f"not answer in time ({type(e).__name__}: {first}). Its own log says why; resume from the "
                         f"last checkpoint with --resume") from None


def share(items):
    """This rank's contiguous part of a list the ranks split evenly, and the global index of its first item:
    rank r of n takes items[r*k : (r+1)*k], so the ranks' parts, gathered in rank order, are the list again."""
    k = len(items) // world()
    return rank() * k, items[rank() * k:(rank() + 1) * k]


def shard_spec():
    """eval.py's --shard i/n for this rank, or None in one process."""
    return f"{rank()}/{world()}" if world() > 1 else None


def all_reduce_grads(params):
    """Sum the trainable parameters' gradients over the ranks, in place (a missing gradient counts as zeros).

    [choice] an explicit all-reduce, not DistributedDataParallel: DDP reduces inside every backward, which
    assumes each rank runs the same number of backwards per step. Here a rank's micro-batches depend on its own
    episodes (groups finish at different times, an out-of-memory retry halves one rank's micro_batch), so DDP
    would need no_sync bookkeeping around every micro-batch to avoid a deadlock. The LoRA gradients are a few MB:
    one flat all-reduce per step, just before the optimizer, costs nothing next to a rollout."""
    if not active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(_device(), torch.float32) for g in grads])  # (sum of numels,)
    _collective("the gradient all-reduce", td.all_reduce, flat)
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).to(p.device, g.dtype)
        i += g.numel()


def all_reduce_sums(sums):
    """A dict of numbers summed over the ranks (the step's token and micro-batch counts, loss sums), same types."""
    if not active():
        return sums
    t = torch.tensor([float(v) for v in sums.values()], dtype=torch.float64, device=_device())  # exact for counts
    _collective("the step's counts all-reduce", td.all_reduce, t)
    return {k: type(v)(x) for (k, v), x in zip(sums.items(), t.tolist())}


def gather(obj, what):
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    if not active():
        return [obj]
    out = [None] * world()
    _collective(what, td.all_gather_object, out, obj)
    return out


def barrier(what):
    if active():
        _collective(what, td.barrier)
