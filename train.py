"""GRPO training of the crop policy, stage 1 (information gap) and stage 2 (grounding reward).

    python train.py --stage 1                                   # tiny model, synthetic data, CPU: minutes
    python train.py --stage 1 --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl --preset 24gb
    python train.py --stage 2 --model Qwen/Qwen2.5-VL-7B-Instruct --data boxes.jsonl --preset 24gb
                                                                # starts from runs/stage1/final
    python train.py --stage 1 --resume runs/stage1              # newest complete checkpoint
    python train.py --stage 1 --steps=20 --lr=2e-5              # any Config field as --key=value

One step, in order: rollout -> rewards -> group advantages -> clipped token-level loss -> LoRA step -> log ->
checkpoint. Outputs go to runs/stage{1,2}/: step_NNNNNN/ checkpoints, final/, metrics.jsonl, rollouts/.
Data-parallel on N GPUs: torchrun --nproc_per_node=N train.py ... (dist.py; each GPU takes prompts_per_step prompts).
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import crop
import data
import dist
import infogap
import logbook
import model
import rewards
import snapshot
import trackers
from checkpoint import (GracefulStop, check_inputs, check_steps, fault, latest_checkpoint, plan_run,
                        prune_checkpoints, restore_checkpoint, save_checkpoint, saved_config, set_aside_later,
                        truncate_metrics)
from infogap import LADDER as INFOGAP_LADDER
from rollout import RolloutConfig, rollout_groups


@dataclass
class Config:
    stage: int = 1  # 1: information gap; 2: + grounding reward, starting from stage 1's adapter
    model: str = "tiny"  # tiny | micro (built-in) | tiny-7b (random, 7B's shape) | a Qwen2.5-VL checkpoint (hub id or folder)
    base_precision: str = "auto"  # base weights: nf4 (QLoRA) | bf16 | fp32; auto: nf4 for a checkpoint, bf16 for tiny-7b, fp32 for tiny and micro
    data: str = "synthetic:64"  # synthetic[:N], micro[:N], a .jsonl, a .parquet/.json table, a folder, or several joined by commas
    preset: str = "tiny"  # tiny | micro (CPU) | 24gb | 48gb | 80gb (a GPU's memory): a dict of overrides below
    out_dir: str = ""  # default runs/stage{stage}
    init_adapter: str = ""  # adapter to start from; stage 2 default: runs/stage1/final
    steps: int = 80  # optimizer steps (the paper: 80 per stage)
    prompts_per_step: int = 4  # distinct prompts per step per process (GPU): under torchrun a step has N times as many
    group_size: int = 8  # rollouts per prompt (the GRPO group)
    micro_batch: int = 4  # episodes per forward/backward, cut within each group (gradient accumulation over the step)
    epochs: float = 0.0  # passes over the data; > 0 sets steps = ceil(epochs * samples / (prompts_per_step * processes))
    ppo_epochs: int = 1  # policy updates per rollout batch (DeepEyes: 1; > 1 makes the clipping matter and keeps the step's episodes in memory)
    loss_agg: str = "micro-token-mean"  # micro-token-mean: each micro-batch's token mean, averaged (verl's token-mean, as DeepEyes); token-mean: over the step's tokens
    lr: float = 1e-5  # AdamW learning rate for the LoRA weights [choice: the paper's 1e-6 is for full FT]
    weight_decay: float = 0.01  # AdamW weight decay (DeepEyes' verl: 0.01)
    max_grad_norm: float = 1.0  # gradient clipping
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DeepEyes' verl: 0.2 (DAPO's asymmetric 0.28 is an option)
    kl_beta: float = 0.0  # weight of the k3 KL to the adapter-free reference (the paper: 0)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA alpha
    gradient_checkpointing: bool = False  # recompute activations in backward (GPU presets turn it on)
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling
    max_turns: int = 5  # assistant turns per episode (DeepEyes' training: 5)
    max_crops: int = 6  # crops per episode (DeepEyes' training: 6)
    max_turn_tokens: int = 512  # tokens per assistant turn
    max_response_tokens: int = 2048  # tokens after the prompt (written + tool turns)
    rollout_rows: int = 64  # rows in flight in the rollout (the step streams through them); 0: the most that fit memory_gb
    decode: str = "auto"  # decode steps: auto (CUDA graphs on a GPU) | graphs | static | dynamic (rollout.py, decode.py)
    tool_wait: int = 8  # steps a tool turn may wait for other rows' turns, to run with them in one forward (rollout.py)
    global_tokens: int = 1024  # global image budget in tokens; a sample's info-gap level, when set, replaces it
    infogap: str = ""  # "": the samples' own levels; auto: select them now (cached); FILE (from infogap.py); fixed:N; off (crops from the shown image: the baseline)
    infogap_ladder: str = INFOGAP_LADDER  # global budgets tried below the reference, largest first [choice]
    infogap_reference_tokens: int = 16384  # the reference answer's budget: the original up to this many tokens
    infogap_max_tokens: int = 1024  # tokens the policy may write per answer in the selection (a 7B thinks first)
    infogap_never: str = "coarsest"  # a sample that never diverges: coarsest (the ladder's smallest: the largest gap) | reference (no gap) | drop
    crop_tokens: int = 16384  # budget of each returned crop (DeepEyes: 16,384; presets lower it to fit); never coarser than the global image
    prompt: str = "deepeyes"  # prompt wording: deepeyes (what DeepEyes-7B and LFPC start from) | qwen | micro
    matcher: str = "rule"  # short answers: exact | rule (numbers, yes/no, containment) | math (math-verify, then rule)
    w_accuracy: float = 0.8  # reward weight of accuracy
    w_format: float = 0.2  # reward weight of the format penalty (-1 when malformed)
    w_tool: float = 1.2  # reward weight of the tool bonus (tool used and answer right)
    w_grounding: float = 1.0  # reward weight of r_geo (stage 2 only)
    tau: float = 0.9  # coverage of B1 required before IoU counts
    omega: float = 0.5  # r_geo = omega * IoU + (1 - omega) * L1
    save_every: int = 10  # checkpoint interval in steps
    keep_checkpoints: int = 2  # newest step checkpoints kept
    dump_every: int = 5  # rollout transcripts interval in steps
    curves: bool = True  # redraw curves.png at checkpoints (plot.py; 1-2 s a drawing, which a run of seconds may skip)
    seed: int = 0  # data order, LoRA init, sampling seeds
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or gradient before the run stops
    memory_gb: float = 0.0  # the card's memory; the run refuses to start when the estimate exceeds it (0: no check)
    ignore_memory_estimate: bool = False  # start even when the estimate exceeds memory_gb
    report_to: str = "none"  # none | tensorboard | wandb | trackio: also send each step's metrics there
    probe_every: int = 0  # every N steps, held-out greedy accuracy with and without noise crops (the crop dependency) in metrics (0: off)
    probe_items: int = 32  # held-out items of the probe: the data spec's generator (synthetic/micro) at seed 1, eval's set
    probe_global_tokens: int = 0  # the probe's global budget, crops always from the original (0: global_tokens)
    columns: str = ""  # a table's columns, e.g. image=img,question=q,answer=a (for layouts sources.py does not know)
    dist_timeout_min: float = 30.0  # torchrun: minutes a rank waits for the others at a collective before the job stops


PRESETS = {
    "tiny": dict(steps=6, prompts_per_step=2, group_size=4, micro_batch=8, lr=2e-3, lora_r=8, lora_alpha=16,
                 max_turns=3, max_turn_tokens=40, max_response_tokens=120, global_tokens=64, crop_tokens=64,
                 save_every=3, dump_every=3),
    # the micro model on the micro task, from its committed warm start: the CPU default and the README's experiment.
    # global_tokens is the information-gap level (16: the pattern is a grey blur); the baseline raises it to a
    # readable 100 with --infogap=off (make baseline)
    "micro": dict(model="micro", data="micro:256", steps=30, prompts_per_step=4, group_size=8, micro_batch=8,
                  rollout_rows=32, lr=2e-3, lora_r=8, lora_alpha=16, **data.MICRO_EPISODE,
                  global_tokens=data.MICRO_LEVEL, save_every=10, dump_every=5, probe_every=5, probe_items=32,
                  probe_global_tokens=data.MICRO_LEVEL),
    "24gb": dict(prompts_per_step=2, group_size=8, micro_batch=2, global_tokens=1024, crop_tokens=1024,
                 max_response_tokens=2048, gradient_checkpointing=True, rollout_rows=0, memory_gb=24),
    "48gb": dict(prompts_per_step=4, group_size=8, micro_batch=2, global_tokens=4096, crop_tokens=1024,
                 max_response_tokens=2048, gradient_checkpointing=True, rollout_rows=0, memory_gb=48),
    "80gb": dict(prompts_per_step=4, group_size=16, micro_batch=1, global_tokens=16384, crop_tokens=1024,
                 max_response_tokens=2048, gradient_checkpointing=True, rollout_rows=0, memory_gb=80),
}


# Settings only the rollout has (evaluation and tests set them); every other RolloutConfig field is a Config field.
ROLLOUT_ONLY = ("greedy", "probe", "noise_sigma", "reuse_cache", "crop_from_shown")


def rollout_config(cfg, **overrides):
    """The rollout's settings, built from the Config's fields of the same names (and `overrides`)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RolloutConfig) if f.name not in ROLLOUT_ONLY}
    return RolloutConfig(**{**shared, "crop_from_shown": cfg.infogap == "off", **overrides})


def reward_config(cfg):
    """The reward's settings, from the Config's fields of the same names; the grounding term is stage 2's."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(rewards.RewardConfig)}
    return rewards.RewardConfig(**{**shared, "w_grounding": cfg.w_grounding if cfg.stage == 2 else 0.0})


# ---------------------------------------------------------------- GRPO pieces (plain torch)

def group_advantages(rewards_, group_size):
    """(num_prompts * group_size,) rewards -> advantages normalised within each group: (r - mean) / (std + eps),
    std unbiased (torch.std, as DeepEyes' verl). A group whose rewards are all equal teaches nothing: exactly 0
    (in floating point the mean of equal values can miss them by an ulp, which the division blows up)."""
    r = rewards_.view(-1, group_size)  # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    return adv.masked_fill((r == r[:, :1]).all(1, keepdim=True), 0.0).view(-1)


def collate(policy, episodes):
    """Episodes -> right-padded tensors for one forward: ids, attention/loss masks (B, T), 3-D positions
    (3, B, T), and every image of every episode in order."""
    ids, attn, pos, _ = model.pack_rows(policy, [(e.ids, e.grids, 0) for e in episodes])
    loss_mask = model.pad_right([e.loss_mask for e in episodes], 0)
    dev = policy.device
    return dict(ids=ids.to(dev), attention_mask=attn.to(dev), loss_mask=loss_mask.to(dev), position_ids=pos.to(dev),
                pixel_values=torch.cat([pv for e in episodes for pv in e.pixel_values]).to(dev, policy.lm.visual.dtype),
                grid_thw=torch.tensor([g for e in episodes for g in e.grids], dtype=torch.long, device=dev))


def policy_loss(policy, episodes, advantages, old_logp, cfg):
    """Clipped token-level GRPO loss of a micro-batch. Returns the sum over its tokens (differentiable), the
    token count and stats (clipped tokens, KL sum)."""
    batch = collate(policy, episodes)
    logp = model.sequence_logprobs(policy, batch, cfg.temperature)  # (N,) loss-mask tokens, row-major
    counts = batch["loss_mask"][:, 1:].sum(1)  # (B,) response tokens per episode
    adv = advantages.to(logp.device).repeat_interleave(counts)  # (N,) each token gets its episode's advantage
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)  # (N,)
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (N,) PPO's pessimistic bound
    kl = torch.zeros_like(logp)
    if cfg.kl_beta > 0:
        with torch.no_grad(), policy.reference():
            ref = model.sequence_logprobs(policy, batch, cfg.temperature)
        kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3 estimator of KL(pi || ref), >= 0
        per_token = per_token + cfg.kl_beta * kl
    clip_frac = (clipped * adv < ratio * adv).float().sum()  # tokens whose objective the clip changed (verl's)
    return per_token.sum(), logp.numel(), dict(clip=clip_frac.item(), kl=kl.detach().sum().item())


def _micro_batches(n, size, group):
    """Index lists of `size` episodes (fewer at a group's end), never across two groups: run_step takes a group's
    gradient as soon as it finishes, and train_step (ppo_epochs > 1, the whole step at once) must cut alike, or
    micro-token-mean would weigh the same rollout differently."""
    return [list(range(i, min(i + size, g + group, n)))
            for g in range(0, n, group) for i in range(g, min(g + group, n), size)]


def accumulate_gradients(policy, episodes, advantages, cfg, old=None):
    """Backward of the loss of some of the step's episodes, micro-batch by micro-batch; gradients add up
    until optimizer_step. A micro-batch adds its token sum (loss_agg token-mean) or its token mean
    (micro-token-mean); optimizer_step divides by the step's token or micro-batch count, known only then.
    Returns the sums the step's stats are made of."""
    sums = dict(loss=0.0, clip=0.0, kl=0.0, tokens=0, micro=0)
    policy.model.train()
    for k, idx in enumerate(_micro_batches(len(episodes), cfg.micro_batch, cfg.group_size)):
        total, n, s = policy_loss(policy, [episodes[i] for i in idx], advantages[idx], old and old[k], cfg)
        loss = total if cfg.loss_agg == "token-mean" else total / max(1, n)
        loss.backward()
        sums["loss"] += loss.item()
        sums["clip"] += s["clip"]
        sums["kl"] += s["kl"]
        sums["tokens"] += n
        sums["micro"] += 1
    policy.model.eval()
    return sums


def optimizer_step(policy, optimizer, sums, cfg):
    """Normalise the accumulated gradients (the step's token mean, or the mean over micro-batches), clip,
    and step; a non-finite loss or gradient skips the update. Returns the step's stats."""
    params = policy.trainable_parameters()
    # torchrun: every rank's gradient sum and counts, so each divides by the step's global token or micro count
    sums = dist.all_reduce_sums(sums)
    dist.all_reduce_grads(params)
    denom = max(1, sums["tokens"] if cfg.loss_agg == "token-mean" else sums["micro"])
    for p in params:
        if p.grad is not None:
            p.grad /= denom
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    stats = dict(loss=sums["loss"] / denom, clip=sums["clip"] / max(1, sums["tokens"]),
                 kl=sums["kl"] / max(1, sums["tokens"]) if cfg.kl_beta > 0 else None,  # None: not measured
                 grad_norm=norm, skipped=0)
    if math.isfinite(stats["loss"]) and math.isfinite(norm):
        optimizer.step()
    else:  # a NaN/inf step would poison the weights: skip it
        stats["skipped"] = 1
    optimizer.zero_grad(set_to_none=True)
    return stats


def train_step(policy, optimizer, episodes, advantages, cfg):
    """ppo_epochs optimizer steps on a batch of episodes with their advantages (all of them in memory). Out of
    memory in a later epoch puts the adapter and optimizer back as they were before the first, so the retried
    step (Retry) applies ppo_epochs updates, not more."""
    old = None
    if cfg.ppo_epochs > 1:  # the ratio needs the log-probs before any update
        with torch.no_grad():
            old = [model.sequence_logprobs(policy, collate(policy, [episodes[i] for i in idx]), cfg.temperature)
                   for idx in _micro_batches(len(episodes), cfg.micro_batch, cfg.group_size)]
    before = _on_cpu(([p.detach() for p in policy.trainable_parameters()], optimizer.state_dict()))
    try:
        for _ in range(cfg.ppo_epochs):
            stats = optimizer_step(policy, optimizer, accumulate_gradients(policy, episodes, advantages, cfg, old), cfg)
            if stats["skipped"]:
                break
    except torch.OutOfMemoryError:
        for p, saved in zip(policy.trainable_parameters(), before[0]):
            p.data.copy_(saved)
        optimizer.load_state_dict(before[1])
        raise
    return stats


def _on_cpu(x):
    """A copy of nested lists and dicts with every tensor in it on the CPU."""
    if torch.is_tensor(x):
        return x.to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _on_cpu(v) for k, v in x.items()}
    return [_on_cpu(v) for v in x] if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- the run

def step_prompts(samples, step, n, seed, skip=()):
    """The prompts of a step: a seeded permutation per epoch, so a resumed run sees the same order. A sample in
    `skip` (its image is broken) leaves the order: the steps from then on take the samples after it, so its
    place goes to the next one and no prompt comes twice in an epoch."""
    kept = [i for i, s in enumerate(samples) if s.id not in skip]
    if not kept:
        raise SystemExit("error: every sample's image is unreadable")
    out, orders = [], {}
    for i in range(step * n, step * n + n):
        epoch, k = divmod(i, len(kept))
        if epoch not in orders:
            order = list(range(len(samples)))
            random.Random(seed * 7919 + epoch).shuffle(order)
            orders[epoch] = [j for j in order if samples[j].id not in skip]
        out.append(samples[orders[epoch][k]])
    return out


def rank_prompts(samples, step, cfg, skip=()):
    """This process's prompts of a step and the step-wide index of the first: the step's world x prompts_per_step
    prompts in the one global order, split by rank. Sampling seeds derive from that global index, so 2 ranks with
    P prompts each draw what one process with 2P prompts draws."""
    return dist.share(step_prompts(samples, step, cfg.prompts_per_step * dist.world(), cfg.seed, skip=skip))


def run_step(policy, optimizer, samples, step, cfg, rcfg, wcfg, skip=()):
    """One GRPO step: rollout -> rewards -> group advantages -> loss and LoRA update. The step's prompts
    stream through rollout_rows rows (continuous batching); with ppo_epochs = 1 each group's gradient is taken
    as soon as its last row finishes and its images freed, so the step's batch (prompts_per_step x group_size)
    is not bounded by memory (with more epochs every episode stays, images too, for train_step). Returns the
    episodes, their scores, the update's stats and the rollout's peak memory (GB)."""
    optimizer.zero_grad(set_to_none=True)  # a retried step starts clean
    offset, prompts = rank_prompts(samples, step, cfg, skip=skip)  # torchrun: this rank's share
    groups = []  # (episodes, scores, advantages) per group, in the order they finished
    sums = dict(loss=0.0, clip=0.0, kl=0.0, tokens=0, micro=0)
    logbook.reset_peak_memory()
    for group in rollout_groups(policy, prompts, rcfg, step=step, first=offset):  # 1. rollout, a group at a time
        fault("rollout", step + 1)
        # 2. rewards, 3. advantages within the group
        scores = [rewards.score(e.text, e.sample, e.boxes, wcfg) for e in group]
        adv = group_advantages(torch.tensor([s["total"] for s in scores]), cfg.group_size)
        if cfg.ppo_epochs == 1:  # 4. loss: this group's gradient, then its images can go
            part = accumulate_gradients(policy, group, adv, cfg)
            sums = {k: sums[k] + part[k] for k in sums}
            for e in group:
                e.pixel_values = []
        groups.append((group, scores, adv))
    rollout_mem = logbook.peak_memory_gb()
    groups.sort(key=lambda g: g[0][0].group)  # prompt order, as the step's prompts were drawn
    episodes = [e for g, _, _ in groups for e in g]
    scores = [s for _, sc, _ in groups for s in sc]
    # 5. the LoRA step
    if cfg.ppo_epochs == 1:
        stats = optimizer_step(policy, optimizer, sums, cfg)
    else:
        stats = train_step(policy, optimizer, episodes, torch.cat([a for _, _, a in groups]), cfg)
    fault("step", step + 1)
    return episodes, scores, stats, rollout_mem


class Retry:
    """The retry policy around a step. An undecodable image costs its sample (it is skipped from then on)
    and the step is redone. The first out-of-memory error halves micro_batch and rollout_rows and redoes
    the step; a second one stops the run with the memory estimate for those settings."""

    def __init__(self, cfg, rcfg):
        self.cfg, self.rcfg = cfg, rcfg
        self.bad_ids = set()  # samples whose image failed to decode
        self.oom_retried = False

    def __call__(self, step_fn, step):
        while True:
            try:
                return step_fn(self.bad_ids)
            except data.BadImage as e:
                print(f"skipping a bad image: {e}")
                self.bad_ids.add(e.sample_id)
            except torch.OutOfMemoryError:
                self._on_oom(step)

    def _on_oom(self, step):
        cfg, rcfg = self.cfg, self.rcfg
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.oom_retried:
            est = model.estimate_memory(cfg)
            raise SystemExit(f"error: out of memory again at step {step + 1} with micro_batch={cfg.micro_batch}, "
                             f"rollout_rows={rcfg.rollout_rows}. Estimated peak for these settings: "
                             f"{est['peak']:.1f} GB ({', '.join(f'{k} {v:.1f}' for k, v in est.items() if k != 'peak')})"
                             f". Lower the token budgets or group_size, or use a smaller preset.")
        self.oom_retried = True
        cfg.micro_batch = max(1, cfg.micro_batch // 2)
        rcfg.rollout_rows = cfg.rollout_rows = max(cfg.group_size, rcfg.rollout_rows // 2)
        print(f"out of memory at step {step + 1}: retrying with micro_batch={cfg.micro_batch}, "
              f"rollout_rows={rcfg.rollout_rows}")


def train(cfg, resume=None):
    # [choice] the same seeds on every rank: the LoRA init must be identical, and the rollouts already differ by
    # rank through the sampling keys' global prompt index (a per-rank seed would part a 2-rank run from 1 process)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dist.init(cfg.dist_timeout_min)  # torchrun: join the job; one process: nothing
    if dist.world() > 1 and cfg.infogap == "auto":
        raise SystemExit("error: --infogap=auto under torchrun: select the levels first in one process (python "
                         "infogap.py --model M --data D --out LEVELS.jsonl), then pass --infogap=LEVELS.jsonl")
    cfg.model = model.locate(cfg.model)  # a local model is recorded by its absolute path in every checkpoint
    out_dir, ckpt, saved = plan_run(cfg, resume, default_out=f"runs/stage{cfg.stage}")
    # every rank resumes from the same checkpoint, and none has written anything before all have planned
    seen = dist.gather(ckpt and os.path.abspath(ckpt), "planning the run")
    if len(set(seen)) > 1:
        raise SystemExit(f"error: the ranks found different checkpoints to resume from ({seen}): the run folder "
                         f"must be one folder that every node sees (a shared filesystem)")
    trackers.check(cfg.report_to)  # a missing package stops the run here, not mid-run
    os.makedirs(os.path.join(out_dir, "rollouts"), exist_ok=True)
    if cfg.seed == data.HELD_OUT_SEED and data.generated(cfg.data):
        raise SystemExit(f"error: --seed={cfg.seed} generates the held-out evaluation items of {cfg.data!r} "
                         f"(eval.py's and the probe's seed): training on them would test on training data; "
                         f"choose another seed")
    init = resolve_init_adapter(cfg)  # before the info-gap selection, which runs the policy the run starts from
    samples = data.load(cfg.data, seed=cfg.seed, columns=cfg.columns)  # a missing file is named here
    # the data (a folder's by its JSONL: its images are many) and an --infogap file, by their contents: a resume
    # on other rows under the same name is refused
    inputs = dict(data=[data.fingerprint(data.rows_file(part)) for part in cfg.data.split(",") if part],
                  infogap=data.fingerprint(cfg.infogap) if os.path.isfile(cfg.infogap) else None)
    if saved:
        check_inputs(ckpt, saved, inputs, cfg)
    held_out = logbook.probe_set(cfg)  # before the selection and the model: a probe it cannot make stops here
    samples = infogap.prepare(cfg, samples)
    if cfg.epochs > 0:  # passes over the data instead of a step count
        cfg.steps = math.ceil(cfg.epochs * len(samples) / (cfg.prompts_per_step * dist.world()))
        print(f"epochs={cfg.epochs:g}: {cfg.steps} steps of {cfg.prompts_per_step * dist.world()} prompts over "
              f"{len(samples)} samples")
    if saved:
        check_steps(ckpt, saved, cfg, dist.world())
    size_rollout_rows(cfg)
    print(f"per step: {cfg.prompts_per_step} prompts x {cfg.group_size} rollouts"
          + (f" on each of {dist.world()} processes" if dist.world() > 1 else "")
          + f" through {cfg.rollout_rows} rows in flight; "
          f"global image {cfg.global_tokens} tokens, crops up to {cfg.crop_tokens} tokens (DeepEyes: 16384)")
    if cfg.stage == 2 and not any(s.boxes for s in samples):
        print("warning: no sample has boxes: stage 2's grounding reward will be 0")
    policy = model.load_policy(cfg.model, adapter=init or None, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               precision=cfg.base_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                               seed=cfg.seed)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, halved, skipped = 0, None, []
    if saved:
        state = restore_checkpoint(saved, policy, optimizer)
        start, halved, skipped = state["step"], state.get("oom_halved"), state.get("bad_ids") or []
        print(f"resumed from {ckpt} at step {start}")
        for group in optimizer.param_groups:  # the optimizer's moments come back; its settings are this run's
            for key in ("lr", "weight_decay"):
                if group[key] != getattr(cfg, key):
                    print(f"  {key}: {group[key]!r} in the checkpoint -> {getattr(cfg, key)!r} from now on")
                    group[key] = getattr(cfg, key)
        if halved:  # the run had halved them after running out of memory: it goes on so, with no second retry
            cfg.micro_batch, cfg.rollout_rows = halved
            print(f"with micro_batch={cfg.micro_batch}, rollout_rows={cfg.rollout_rows}: halved after an out-of-memory "
                  f"error before this checkpoint")
    rcfg, wcfg = rollout_config(cfg), reward_config(cfg)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if dist.is_main():  # rank 0 alone writes metrics, transcripts, checkpoints and curves
        truncate_metrics(metrics_path, start)
        if saved:
            set_aside_later(out_dir, start)
    stop, bad_steps, retry = GracefulStop(), 0, Retry(cfg, rcfg)
    retry.oom_retried = bool(halved)
    retry.bad_ids.update(skipped)  # every rank skips them from the start, so the ranks split one order
    tracker = trackers.start(cfg.report_to if dist.is_main() else "none", out_dir, dataclasses.asdict(cfg), start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"stage {cfg.stage}", file=sys.stdout,
               disable=not dist.is_main())
    try:
        for step in bar:
            t0 = time.time()
            episodes, scores, stats, rollout_mem = retry(
                lambda skip: run_step(policy, optimizer, samples, step, cfg, rcfg, wcfg, skip), step)
            # numerical faults: a NaN/inf step was skipped in optimizer_step; too many in a row stop the run
            bad_steps = bad_steps + 1 if stats["skipped"] else 0
            if bad_steps >= cfg.max_bad_steps:
                raise SystemExit(f"error: stopping at step {step + 1}: {bad_steps} steps in a row had a non-finite "
                                 f"loss or gradient (likely causes: a learning rate too high, a broken reward, or "
                                 f"bad data). Last checkpoint: {latest_checkpoint(out_dir)}")
            # 6. log: every rank's episodes (torchrun), in the global prompt order; a stop signal on any rank
            # stops them all after this step. Under torchrun only the signals the ranks shared at the gather count:
            # one that comes later (during the probe, the dumps, the checkpoint) is shared at the next step's, or
            # one rank would wait at the stop's barrier while the others wait in the next step's collectives
            episodes, scores, rollout_mem, agreed = gather_step(episodes, scores, rollout_mem, stop, retry.bad_ids)
            fault("gathered", step + 1)
            metrics = logbook.step_metrics(step + 1, episodes, scores, stats, time.time() - t0, rollout_mem)
            if dist.is_main():
                if held_out and ((step + 1) % cfg.probe_every == 0 or step == 0):
                    metrics.update(logbook.probe_held_out(policy, held_out, rcfg, cfg.matcher, cfg.probe_global_tokens))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                tracker.log(metrics, step + 1)
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                           file=sys.stdout)
                if (step + 1) % cfg.dump_every == 0:
                    logbook.dump_rollouts(os.path.join(out_dir, "rollouts", f"step_{step + 1:06d}.jsonl"), episodes, scores)
            stopping = stop.signal if dist.world() == 1 else agreed
            # 7. checkpoint
            if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stopping) and dist.is_main():
                save_checkpoint(os.path.join(out_dir, f"step_{step + 1:06d}"), policy, optimizer, cfg,
                                dict(step=step + 1, cursor=(step + 1) * cfg.prompts_per_step * dist.world(),
                                     world_size=dist.world(), inputs=inputs, metrics=metrics,
                                     bad_ids=sorted(retry.bad_ids),
                                     oom_halved=[cfg.micro_batch, rcfg.rollout_rows] if retry.oom_retried else None))
                prune_checkpoints(out_dir, cfg.keep_checkpoints)
                if cfg.curves:
                    logbook.draw_curves(out_dir)
            if stopping:
                dist.barrier("the stop checkpoint")  # under torchrun a rank that exits ends the others: after the save
                print(f"stopped by {stopping} after step {step + 1}; resume with: python train.py --stage "
                      f"{cfg.stage} --resume {out_dir}", flush=True)
                raise SystemExit(stop.exit_code)
    finally:
        stop.restore()
        tracker.close()
    if dist.is_main():
        save_checkpoint(os.path.join(out_dir, "final"), policy, None, cfg, dict(step=cfg.steps))
        print(logbook.what_changed(metrics_path))
        print(f"done: adapter in {os.path.join(out_dir, 'final')}, metrics in {metrics_path}")
    dist.barrier("the end of the run")  # no rank leaves (and tears the job down) before final/ is written
    return policy


def gather_step(episodes, scores, rollout_mem, stop, bad_ids):
    """torchrun: every rank's episodes (without images and log-probs: the metrics and dumps do not read them) and
    scores, in rank order, which is the global prompt order; the largest rollout peak; and a stop signal any rank
    had received by now, which every rank then takes as its own (the last value: None when none). Samples whose
    image failed on any rank join every rank's `bad_ids`, so that the ranks split the same global order again from
    the next step. One process: as given, and None."""
    if dist.world() == 1:
        return episodes, scores, rollout_mem, None
    light = [dataclasses.replace(e, sample=dataclasses.replace(e.sample, make=None), pixel_values=[], logps=[])
             for e in episodes]
    parts = dist.gather(dict(episodes=light, scores=scores, mem=rollout_mem, signal=stop.signal, code=stop.exit_code,
                             bad_ids=bad_ids), "gathering the step's metrics")
    bad_ids.update(*(p["bad_ids"] for p in parts))
    signals = [(p["signal"], p["code"]) for p in parts if p["signal"]]
    if signals and not stop.signal:
        stop.signal, stop.exit_code = signals[0]
    return ([e for p in parts for e in p["episodes"]], [s for p in parts for s in p["scores"]],
            max(p["mem"] for p in parts), signals[0][0] if signals else None)


# ---------------------------------------------------------------- command line

def field_help():
    """Each Config field's comment, read from this file's source (the comments are the documentation)."""
    out = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip()
    return out


# a field's least value: 0 would divide by zero, loop forever or train on nothing; a group of one has no advantage;
# an image is at least 4 tokens
LEAST = dict({k: 1 for k in ("steps", "prompts_per_step", "micro_batch", "ppo_epochs", "max_turns", "max_turn_tokens",
                             "max_response_tokens", "save_every", "keep_checkpoints", "dump_every", "max_bad_steps",
                             "lora_r", "infogap_max_tokens")}, group_size=2, global_tokens=4, crop_tokens=4,
             infogap_reference_tokens=4, rollout_rows=0)
# above 0: a learning rate of 0 trains nothing, a temperature of 0 divides the logits by zero (greedy is eval's)
ABOVE_ZERO = ("lr", "temperature")
# fields that take one of a few words (a typo would otherwise run as some default)
CHOICES = dict(loss_agg=("micro-token-mean", "token-mean"), decode=("auto", "graphs", "static", "dynamic"),
               matcher=rewards.MATCHERS, prompt=model.PROMPTS, base_precision=model.PRECISIONS,
               infogap_never=("coarsest", "reference", "drop"))


def override_pairs(items):
    """Command-line overrides -> (key, value) pairs; `--key=value` and `--key value` are the same."""
    pairs, i = [], 0
    while i < len(items):
        key, eq, value = items[i].lstrip("-").partition("=")
        if not eq and items[i].startswith("--") and i + 1 < len(items) and not items[i + 1].startswith("--"):
            value, eq, i = items[i + 1], "=", i + 1
        if not eq:
            raise SystemExit(f"error: option {items[i]!r} needs a value (see --help for the options)")
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def parse_overrides(cfg, items):
    """Apply --key=value (or --key value) overrides to a Config: unknown keys, wrong types and counts below 1
    are errors. Prints changes."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in override_pairs(items):
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key} (see --help for the options)")
        kind = type(getattr(Config, key))
        try:
            if kind is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                new = value.lower() in ("1", "true", "yes")
            else:
                new = kind(value)
        except ValueError:
            raise SystemExit(f"error: --{key} wants a {kind.__name__}, got {value!r}") from None
        check_setting(key, new)
        if key in CHOICES and new not in CHOICES[key]:
            raise SystemExit(f"error: --{key} {value!r}: expected one of {', '.join(CHOICES[key])}")
        print(f"  {key}: {getattr(cfg, key)!r} -> {new!r}")
        setattr(cfg, key, new)
    return cfg


def check_setting(key, new, option=None, least=None):
    """A value out of a field's range stops with one line naming the option (eval.py's too)."""
    option, least = option or "--" + key, LEAST.get(key) if least is None else least
    if least is not None and new < least:
        raise SystemExit(f"error: {option} must be at least {least}, got {new!r}")
    if key in ABOVE_ZERO and not new > 0:
        raise SystemExit(f"error: {option} must be above 0, got {new!r}")
    if key == "infogap_ladder":
        crop.parse_budgets(new, option)


def resolve_init_adapter(cfg, given=()):
    """The adapter a run starts from (stage 2 default: runs/stage1/final), checked before any loading. Its LoRA
    rank is the run's: --lora_r given with an adapter of another rank is an error; otherwise the config takes
    the adapter's rank and alpha (and the default adapter's path), so that the config saved with every checkpoint
    tells the truth, and --infogap auto selects levels with the policy the run starts from."""
    init = cfg.init_adapter = cfg.init_adapter or ("runs/stage1/final" if cfg.stage == 2 else "")
    if not init:
        return ""
    path = os.path.join(init, "adapter_config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: adapter {init} not found (no adapter_config.json there): run stage 1 first "
                         f"(make stage1), or pass --init_adapter=DIR")
    with open(path) as f:
        adapter = json.load(f)
    for key, name in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        if adapter.get(name) is None or adapter[name] == getattr(cfg, key):
            continue
        if key in given:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} but the init adapter {init} has {name}="
                             f"{adapter[name]}: drop --{key} (the adapter's is used) or start without the adapter")
        print(f"  {key}: {getattr(cfg, key)!r} -> {adapter[name]!r} (from the init adapter {init})")
        setattr(cfg, key, adapter[name])
    return init


def size_rollout_rows(cfg, headroom=0.9):
    """rollout_rows=0 (the GPU presets): the most rows, in whole groups and at most the step's, whose estimated
    peak stays within headroom x memory_gb (or the card's memory). Rows in flight are what keeps a GPU busy
    (a decode step costs nearly the same at 16 rows as at 64), so the presets take all the memory allows."""
    if cfg.rollout_rows > 0:
        return cfg.rollout_rows
    budget = cfg.memory_gb or (torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0)
    G, most = cfg.group_size, cfg.prompts_per_step * cfg.group_size
    rows = G
    while rows + G <= most and (not budget or model.estimate_memory(
            dataclasses.replace(cfg, rollout_rows=rows + G))["peak"] <= headroom * budget):
        rows += G
    cfg.rollout_rows = rows
    print(f"rollout_rows=0: {rows} rows in flight" + (f" (fits {headroom:.0%} of {budget:.0f} GB)" if budget else ""))
    return rows


def check_memory(cfg):
    """Print the estimated peak memory by part and the file the shapes came from; refuse to start when it
    exceeds the card (memory_gb)."""
    est = model.estimate_memory(cfg)
    print(f"shapes from {model.model_config(cfg.model)[1]}")
    print("estimated peak GPU memory (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in est.items()))
    if cfg.memory_gb and est["peak"] > cfg.memory_gb and not cfg.ignore_memory_estimate:
        raise SystemExit(f"error: the estimated peak, {est['peak']:.1f} GB, exceeds memory_gb={cfg.memory_gb:g}. "
                         f"Lower micro_batch, rollout_rows, group_size or the token budgets, turn on "
                         f"gradient_checkpointing, or pass --ignore_memory_estimate=true")


def main(argv=None):
    helps = field_help()
    epilog = "Any Config field can be set as --key=value:\n" + "\n".join(
        f"  --{f.name}={f.default!r:<14} {helps.get(f.name, '')}" for f in dataclasses.fields(Config))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=[1, 2], default=None,
                    help="1: information gap (default); 2: grounding reward")
    ap.add_argument("--model", default=None, help="tiny | micro | tiny-7b | a Qwen2.5-VL checkpoint (hub id or folder)")
    ap.add_argument("--data", default=None, help="synthetic[:N] | micro[:N] | FILE.jsonl | FOLDER | FILE.parquet | "
                    "FILE.json, or several joined by commas")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a set of overrides: tiny (default) and "
                    "micro for a CPU, 24gb, 48gb and 80gb for a GPU of that memory")
    ap.add_argument("--resume", default=None, help="a run folder or checkpoint to resume from: its settings, changed "
                                                   "only by the options given now")
    ap.add_argument("--infogap", default=None, help="auto (select levels now), FILE (from infogap.py), fixed:N "
                                                    "(one budget for all) or off (crops from the shown image: the baseline)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and the memory estimate, check the model folder, and exit")
    args, rest = ap.parse_known_args(argv)
    saved = saved_config(args.resume) if args.resume else None
    if saved:  # the same run: its settings, not the defaults (a resume without its options would train another)
        if args.preset not in (None, saved.get("preset")):
            raise SystemExit(f"error: --preset {args.preset}: {args.resume} was trained with --preset "
                             f"{saved.get('preset')}; a resumed run keeps its settings (change one with --key=value)")
        fields = {f.name for f in dataclasses.fields(Config)}  # a field an older version did not save: its preset's
        cfg = Config(**{**PRESETS.get(saved.get("preset"), {}),
                        **{k: v for k, v in saved.items() if k in fields and k != "out_dir"}})  # it writes where it is
        print(f"the settings of {args.resume}, with the options given now")
    else:
        preset = args.preset or "tiny"
        cfg = Config(stage=args.stage or 1, preset=preset, **PRESETS[preset])
    if args.stage:
        cfg.stage = args.stage
    if args.model:
        cfg.model = args.model
    if args.data:
        cfg.data = args.data
    if args.infogap is not None:
        cfg.infogap = args.infogap
    if rest:
        print("overrides:")
        parse_overrides(cfg, rest)
    given = {key for key, _ in override_pairs(rest)}
    if saved and cfg.epochs > 0 and "steps" in given and "epochs" not in given:  # else the epochs' count again
        print(f"  epochs: {cfg.epochs!r} -> 0.0 (--steps given)")
        cfg.epochs = 0.0
    if saved and "memory_gb" in given and "rollout_rows" not in given and \
            PRESETS.get(cfg.preset, {}).get("rollout_rows") == 0:  # the saved rows were sized for the card then
        print(f"  rollout_rows: {cfg.rollout_rows!r} -> 0 (sized again for --memory_gb)")
        cfg.rollout_rows = 0
    resolve_init_adapter(cfg, given=given)
    cfg.model = model.locate(cfg.model, download=not args.dry_run)  # a dry run downloads nothing
    size_rollout_rows(cfg)
    print("config: " + json.dumps(dataclasses.asdict(cfg)))
    check_memory(cfg)
    if args.dry_run:
        if cfg.model not in model.BUILT_IN:  # read and validate the download, without loading the weights
            snapshot.check(cfg.model)
            print(f"checked {cfg.model}: config.json, every shard, the tokenizer's special tokens")
        return cfg
    train(cfg, resume=args.resume)
    dist.close()
    return cfg


if __name__ == "__main__":
    main()
