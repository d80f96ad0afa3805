"""What a training run leaves behind: each step's metrics line (reward and its parts, tool use, loss, memory),
the memory readings, rollout transcripts, curves.png, the held-out probe of the crop dependency, and the closing
line that says what changed."""
import dataclasses
import json
import math
import os
import resource

import torch

import data
import rewards
from rollout import DEPENDENCY_PROBE, rollout


def step_metrics(step, episodes, scores, stats, seconds, rollout_mem):
    n = len(episodes)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    ious = [s["iou"] for s in scores if s["iou"] is not None]
    covs = [s["coverage"] for s in scores if s["coverage"] is not None]
    groups = {}
    for e, s in zip(episodes, scores):
        groups.setdefault(e.group, []).append(s["total"])
    # reward_std: the spread across prompts (of the groups' means: plot.py's band), not the within-group spread
    # that the advantages divide by
    return dict(step=step, reward=mean([s["total"] for s in scores]), reward_std=_std([mean(g) for g in groups.values()]),
                accuracy=mean([s["accuracy"] for s in scores]),
                format=mean([s["format"] for s in scores]), tool=mean([s["tool"] for s in scores]),
                # r_geo unweighted: logged in stage 1 too (weight 0 there), to see grounding before it is rewarded
                grounding=mean([s["grounding"] for s in scores]),
                iou=mean(ious) if ious else None, coverage=mean(covs) if covs else None,  # None: no crop to measure
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


# the metrics that read the machine (time, memory) rather than the run: they differ from run to run
READINGS = ("seconds", "rollout_mem_gb", "peak_mem_gb", "rss_gb", "cuda_alloc_gb", "cuda_reserved_gb",
            "cuda_peak_reserved_gb")


def memory_now():
    """Memory held now, not the peak, so that a slow creep shows in metrics.jsonl: the host's resident set
    (rss_gb) and, on CUDA, what tensors hold (cuda_alloc_gb) and what the caching allocator holds
    (cuda_reserved_gb), with the allocator's peak since the step began (cuda_peak_reserved_gb: what the card
    had to hold, less the CUDA context). All in GB of 10^9 bytes, the unit of `train.py --dry-run`'s estimate."""
    out = dict(rss_gb=host_rss_gb())
    if torch.cuda.is_available():
        out.update(cuda_alloc_gb=torch.cuda.memory_allocated() / 1e9,
                   cuda_reserved_gb=torch.cuda.memory_reserved() / 1e9,
                   cuda_peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9)
    return out


def host_rss_gb():
    """This process's resident set now (Linux /proc; elsewhere the peak, which is what the OS offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def peak_memory_gb():
    """GPU: peak allocated since the last reset. CPU: the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def what_changed(metrics_path, window=5):
    """The run's closing line: the first steps against the last (means over `window` steps) of reward, accuracy and
    tool calls, and the first held-out probe against the last (accuracy, crop dependency) when there are probes."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    window = max(1, min(window, len(rows) // 2))  # a short run: halves, never overlapping windows
    first, last = rows[:window], rows[-window:]
    parts = [f"{k} {mean(first, k):.3g} -> {mean(last, k):.3g}" for k in ("reward", "accuracy", "tool_calls")]
    probes = [r for r in rows if "crop_dependency" in r]
    if probes:
        parts += [f"held-out {k.replace('heldout_', '').replace('_', ' ')} {probes[0][k]:.3g} -> {probes[-1][k]:.3g}"
                  for k in ("heldout_accuracy", "crop_dependency", "heldout_tool_calls")]
    return f"what changed (first {len(first)} steps -> last {len(last)}; held-out: step {probes[0]['step'] if probes else '-'}" \
           f" -> {probes[-1]['step'] if probes else '-'}): " + ", ".join(parts)


def probe_set(cfg):
    """The held-out items of the in-training probe: eval's generated set (data.HELD_OUT_SEED) of the run's data."""
    if not cfg.probe_every:
        return None
    kind = cfg.data.partition(":")[0]
    if kind not in data.GENERATED:
        raise SystemExit(f"error: --probe_every needs generated data (synthetic:N or micro:N), not {cfg.data!r}")
    return data.load(f"{kind}:{cfg.probe_items}", seed=data.HELD_OUT_SEED)


def probe_held_out(policy, samples, rcfg, matcher, global_tokens=0):
    """Greedy held-out accuracy at the probe's budget (global_tokens; 0: the run's), crops from the original, with
    and without the crops replaced by noise (DEPENDENCY_PROBE), and their difference: the crop dependency
    over training. rcfg: the run's rollout settings."""
    out = {}
    for probe, tag in ((None, ""), (DEPENDENCY_PROBE, "noise_")):
        cfg = dataclasses.replace(rcfg, group_size=1, greedy=True, probe=probe, crop_from_shown=False,
                                  rollout_rows=len(samples), global_tokens=global_tokens or rcfg.global_tokens)
        eps = rollout(policy, samples, cfg, step=0)
        out[f"heldout_{tag}accuracy"] = sum(rewards.accuracy(rewards.scored_reply(e.text), e.sample.answer,
                                                             e.sample.options, matcher) for e in eps) / len(eps)
        if probe is None:
            out["heldout_tool_calls"] = sum(e.num_tool_calls for e in eps) / len(eps)
    out["crop_dependency"] = out["heldout_accuracy"] - out["heldout_noise_accuracy"]
    return out
