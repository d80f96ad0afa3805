"""What a training step leaves behind: its metrics line (reward and its parts, tool use, loss, memory), the
memory readings, rollout transcripts and curves.png."""
import json
import math
import os
import resource

import torch


def step_metrics(step, episodes, scores, stats, seconds, rollout_mem):
    n = len(episodes)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    ious = [s["iou"] for s in scores if s["iou"] is not None]
    covs = [s["coverage"] for s in scores if s["coverage"] is not None]
    groups = {}
    for e, s in zip(episodes, scores):
        groups.setdefault(e.group, []).append(s["total"])
    return dict(step=step, reward=mean([s["total"] for s in scores]), reward_std=_std([mean(g) for g in groups.values()]),
                accuracy=mean([s["accuracy"] for s in scores]),
                format=mean([s["format"] for s in scores]), tool=mean([s["tool"] for s in scores]),
                grounding=mean([s["grounding"] for s in scores]), iou=mean(ious), coverage=mean(covs),
                response_len=mean([len(e.ids) - e.prompt_len for e in episodes]),
                generated=mean([e.num_generated for e in episodes]),
                tool_calls=sum(e.num_tool_calls for e in episodes) / n,
                tool_errors=sum(e.num_tool_errors for e in episodes) / n,
                truncated=sum(e.truncated for e in episodes) / n, loss=stats["loss"], grad_norm=stats["grad_norm"],
                skipped=stats["skipped"],
                clip_frac=stats["clip"], kl=stats["kl"], seconds=seconds, rollout_mem_gb=rollout_mem,
                peak_mem_gb=peak_memory_gb(), **memory_now())


def _std(xs):
    """Population std: the spread of the group means a step's reward averages over."""
    m = sum(xs) / len(xs) if xs else 0.0
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) if xs else 0.0


# curves.png is redrawn at a checkpoint at most this often (a drawing takes ~1 s; the tiny preset checkpoints
# every few seconds), and always at the last step's
CURVES_EVERY_S = 30


def draw_curves(out_dir):
    """curves.png of the run so far (plot.py); a plotting failure costs the figure, never the run."""
    try:
        import plot
        plot.curves([out_dir])
    except (ImportError, OSError, ValueError) as e:
        print(f"warning: curves not drawn: {type(e).__name__}: {e}")


def dump_rollouts(path, episodes, scores):
    with open(path, "w") as f:
        for e, s in zip(episodes, scores):
            f.write(json.dumps(dict(id=e.sample.id, group=e.group, answer=e.sample.answer, text=e.text,
                                    boxes_shown=e.boxes_shown, boxes=e.boxes, gt_boxes=e.sample.boxes,
                                    tool_errors=dict(e.tool_errors), **s)) + "\n")


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_now():
    """Memory held now, not the peak, so that a slow creep shows in metrics.jsonl: the host's resident set
    (rss_gb) and, on CUDA, what tensors hold (cuda_alloc_gb) and what the caching allocator holds
    (cuda_reserved_gb)."""
    out = dict(rss_gb=host_rss_gb())
    if torch.cuda.is_available():
        out.update(cuda_alloc_gb=torch.cuda.memory_allocated() / 2**30,
                   cuda_reserved_gb=torch.cuda.memory_reserved() / 2**30)
    return out


def host_rss_gb():
    """This process's resident set now (Linux /proc; elsewhere the peak, which is what the OS offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gb():
    """GPU: peak allocated since the last reset. CPU: the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
