"""The micro model's warm start: supervised training on trajectories a scripted policy writes on the micro task.

The scripted policy's trajectories are built with the policy's own prompt, tool-turn and image code (model.py,
crop.py), token for token what the rollout would produce; its crop box is deliberately imperfect (the central
region the frame lies in, 3.5x the frame, jittered). The loss is the log-likelihood of the tokens the policy
writes, the decision tokens (box digits, the letter) weighted up. Three phases:
1. the format and a first reading (450 steps, lr 3e-3): at the gap level (16 tokens: the pattern is a grey blur)
   it crops and answers from the crop; at a readable global image (100 tokens) it answers directly half the
   time; three short reading exercises (a crop, then the answer) go with each trajectory;
2. reading (200 steps of 16 reading exercises, lr 1e-3): phase 1 leaves the model right on 44 % of crops;
3. both habits (150 steps, lr 1e-3): at either level it answers without the tool 60 % of the time [choice], as
   real models mostly do before RL; RL then decides which habit stays. At the gap level such an answer's letter
   is not in the loss: it is a guess, and guesses in the loss pull the letter away from what a crop shows.
Measured (README): 1,173 s on 2 busy CPU cores (phases 2 and 3: 192 s alone). Held out (64 items), greedy at 16
tokens it answers without the tool (accuracy 0.17, chance 0.20); sampled, it crops in 25 % of the episodes and is
right in half of those; given a crop alone (200 items) it names the pattern right 68 % of the time.

    python warmstart.py                       # writes weights/micro.safetensors (seeded; minutes on 2 CPU cores)
    python warmstart.py --steps 20 --out /tmp/micro.safetensors --eval 0    # a short run
    python warmstart.py --first PHASE1.safetensors    # phases 2 and 3 on phase 1's weights (same seed and settings)
"""
import argparse
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import crop
import data
import model
import rewards
from rollout import RolloutConfig, rollout

PROMPT = data.MICRO_EPISODE["prompt"]  # model.MICRO_SYSTEM: the short wording
CROP_TOKENS = data.MICRO_EPISODE["crop_tokens"]  # the crop budget the trajectories are written with
DIRECT_SHARE = 0.5  # of the readable items, the share answered from the global image without the tool
HABIT_DIRECT = 0.6  # third phase: the share of episodes answered without the tool [choice]
READ_BATCH = 16  # reading exercises per step of the second phase
SECOND_STREAM = 10**6  # the later phases' items: after the first phase's in the same stream
WARMSTART_SEED = 1000  # the warm start's items: a stream of their own (RL trains on seed 0, eval uses seed 1)


def scripted_box(sample, shown_wh, rng):
    """The scripted policy's crop box in the shown frame: the central region the frame lies in (data.MICRO_REGION,
    B1 enlarged 3.5x), each side shifted by up to 12 original pixels. The crop always holds the label and never
    frames it tightly (stage 2's job)."""
    lo, hi = data.MICRO_REGION
    box = [v + rng.randint(-12, 12) for v in (lo, lo, hi, hi)]
    sx, sy = shown_wh[0] / sample.width, shown_wh[1] / sample.height
    box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    return [min(max(0, round(v)), shown_wh[i % 2]) for i, v in enumerate(box)]


def reading(policy, sample, rng):
    """A reading exercise: a short chat whose only image is a crop around the frame (jittered like the scripted
    box) and whose reply is the answer. It is ~40 tokens where a trajectory is ~300, so reading the pattern, the
    slowest skill to learn, gets most of the examples per second of a CPU [choice]."""
    x1, y1, x2, y2 = sample.boxes[0]
    pad = rng.randint(8, 40)
    box = [max(0, x1 - pad + rng.randint(-8, 8)), max(0, y1 - pad + rng.randint(-8, 8)),
           min(sample.width, x2 + pad + rng.randint(-8, 8)), min(sample.height, y2 + pad + rng.randint(-8, 8))]
    pv, grid = crop.encode_crops(crop.to_uint8(sample.image()), [box], max_pixels=crop.tokens_to_pixels(CROP_TOKENS))
    ids = policy.encode("<|im_start|>user\n") + policy.image_block(grid[0])
    ids += policy.encode(f"{sample.question}<|im_end|>\n<|im_start|>assistant\n")
    mask = [0] * len(ids)
    reply = policy.encode(f"<answer>{sample.answer}</answer>") + [policy.im_end]
    return ids + reply, mask + [1] * len(reply), [pv], [grid[0].tolist()]


def trajectory(policy, sample, budget, rng, habits=False):
    """One scripted episode as the rollout would record it: (ids, loss_mask, pixel_values, grids). First phase:
    at the gap level it crops, at the readable level it answers directly half the time. habits=True (third
    phase): it answers directly HABIT_DIRECT of the time at either level; at the gap level such an answer's letter
    is left out of the loss, so what is taught is the habit of answering without looking, not a guess."""
    orig = crop.to_uint8(sample.image())
    pv, grid = crop.encode_image(orig, max_pixels=crop.tokens_to_pixels(budget))
    shown_wh = (int(grid[0, 2]) * 14, int(grid[0, 1]) * 14)
    text = model.user_text(sample.question, sample.options, PROMPT)
    ids = policy.prompt_ids(text, grid[0], prompt=PROMPT)
    mask, pvs, grids = [0] * len(ids), [pv], [grid[0].tolist()]

    def write(t, learn=1):  # tokens the policy writes: in the loss unless learn=0
        new = policy.encode(t)
        ids.extend(new)
        mask.extend([learn] * len(new))

    answer = f"<answer>{sample.answer}</answer>"
    readable = budget >= data.MICRO_READABLE
    if habits and rng.random() < HABIT_DIRECT:
        write("<answer>")
        write(sample.answer, learn=int(readable))
        write("</answer>")
    elif not habits and readable and rng.random() < DIRECT_SHARE:
        write(answer)
    else:
        box = scripted_box(sample, shown_wh, rng)
        write('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%d, %d, %d, %d]}}</tool_call>'
              % tuple(box))
        orig_box, why = crop.check_box(box, shown_wh, (sample.width, sample.height))
        assert orig_box is not None, why  # the scripted box always lies in the image
        h, w = crop.crop_size(orig_box, shown_wh, (sample.width, sample.height), crop.tokens_to_pixels(CROP_TOKENS))
        cpv, _ = crop.encode_crops(orig, [orig_box], out_hw=[(h, w)])
        turn = policy.tool_turn_ids(False, grid=[1, h // 14, w // 14], prompt=PROMPT)
        ids.extend(turn)
        mask.extend([0] * len(turn))
        pvs.append(cpv)
        grids.append([1, h // 14, w // 14])
        write(answer)
    ids.append(policy.im_end)  # the turn ends: the episode is finished
    mask.append(1)
    return ids, mask, pvs, grids


def batch_of(policy, trajectories):
    """Trajectories -> the tensors model.sequence_logprobs takes (as train.collate makes them from episodes)."""
    ids, attn, pos, _ = model.pack_rows(policy, [(t[0], t[3], 0) for t in trajectories])
    return dict(ids=ids, attention_mask=attn, position_ids=pos, loss_mask=model.pad_right([t[1] for t in trajectories], 0),
                pixel_values=torch.cat([pv for t in trajectories for pv in t[2]]),
                grid_thw=torch.tensor([g for t in trajectories for g in t[3]], dtype=torch.long))


KEY_WEIGHT = 5.0  # loss weight of the tokens that carry the decision (box digits, answer letter) [choice]


def nll(policy, b):
    """Weighted mean negative log-likelihood of the tokens the policy writes. The tool-call syntax is the same in
    every trajectory and is learnt in a few dozen steps; the digits and the letter, one token in ten, are the
    task, so they weigh KEY_WEIGHT times more. Full logits, in plain torch: the vocabulary is 602 ids, and the
    head must learn too (kernels.selective_logprobs gives no gradient to it: RL never trains it)."""
    hidden, _ = policy.forward_hidden(b["ids"], b["attention_mask"], b["position_ids"], b["pixel_values"],
                                      b["grid_thw"])  # (B, T, D)
    predicts = b["loss_mask"][:, 1:].bool()  # hidden at t predicts token t + 1
    targets = b["ids"][:, 1:][predicts]  # (N,)
    logits = policy.head(hidden[:, :-1][predicts])  # (N, V)
    weight = 1 + (KEY_WEIGHT - 1) * torch.isin(targets, key_ids(policy))  # (N,)
    per_token = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (per_token * weight).sum() / weight.sum()


def _update(policy, params, opt, b):
    """One optimizer step on the weighted log-likelihood of a batch; returns the loss."""
    loss = nll(policy, b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def key_ids(policy):
    """Ids of the tokens that are all digits or one option letter."""
    vocab = policy.tokenizer.get_vocab()
    return torch.tensor([i for t, i in vocab.items() if t.isdigit() or t in ("A", "B", "C", "D", "E")])


def train(steps=450, batch=4, lr=3e-3, seed=0, out=model.MICRO_WEIGHTS, log_every=20, read_steps=200,
          habit_steps=150, first=None):
    """Train the micro model from its seeded random init on fresh scripted items, in three phases (the first:
    `steps`; then sharpen: `read_steps` and `habit_steps`); save fp32 safetensors. first: a file of the first
    phase's weights to start from instead (as a run with the same seed, steps, batch and lr writes them).
    Returns the losses, one per step, and the policy."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    hf, tokenizer = model.build_tiny(seed, "micro")
    policy = model.Policy(hf, tokenizer)
    if first:
        hf.load_state_dict(load_file(first))
    params = [p for p in hf.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to a tenth
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = random.Random(seed)
    losses = []
    hf.train()
    bar = tqdm(range(0 if first else steps), desc="warm start, phase 1", file=sys.stdout)
    for step in bar:
        items = [data._micro_sample(step * batch * 4 + i, WARMSTART_SEED + seed) for i in range(batch * 4)]
        budgets = [data.MICRO_LEVEL if rng.random() < 0.5 else data.MICRO_READABLE for _ in items[:batch]]
        b = batch_of(policy, [trajectory(policy, s, g, rng) for s, g in zip(items, budgets)]
                     + [reading(policy, s, rng) for s in items[batch:]])  # 3 reading exercises per trajectory
        losses.append(_update(policy, params, opt, b))
        sched.step()
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / log_every:.3f}")
    losses += sharpen(policy, read_steps, habit_steps, batch, seed=seed, log_every=log_every)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in hf.state_dict().items()}, out,
              metadata=dict(steps=str(steps), batch=str(batch), lr=str(lr), seed=str(seed), read_steps=str(read_steps),
                            habit_steps=str(habit_steps)))
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.1f} MB); loss {losses[0]:.3f} -> "
          f"{sum(losses[-log_every:]) / min(log_every, len(losses)):.3f}")
    return losses, policy


def sharpen(policy, read_steps=200, habit_steps=150, batch=4, lr=1e-3, seed=0, log_every=20):
    """The second and third phases, on the first phase's weights with a fresh optimizer at a constant, lower
    learning rate. Second: reading exercises alone, READ_BATCH a step (the first phase leaves the model reading
    a crop right 44 % of the time; reading exercises from scratch at 3e-3 stayed at chance). Third: whole
    episodes with both habits (trajectory(habits=True)), each beside a reading exercise. Returns the losses."""
    hf = policy.model
    params = [p for p in hf.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(seed + 1)
    losses = []
    hf.train()
    bar = tqdm(range(read_steps + habit_steps), desc="warm start, phases 2-3", file=sys.stdout)
    for step in bar:
        items = [data._micro_sample(SECOND_STREAM + step * READ_BATCH + i, WARMSTART_SEED + seed)
                 for i in range(READ_BATCH)]
        if step < read_steps:
            examples = [reading(policy, s, rng) for s in items]
        else:
            budgets = [data.MICRO_LEVEL if rng.random() < 0.5 else data.MICRO_READABLE for _ in range(batch)]
            examples = ([trajectory(policy, s, g, rng, habits=True) for s, g in zip(items, budgets)]
                        + [reading(policy, s, rng) for s in items[batch:2 * batch]])
        losses.append(_update(policy, params, opt, batch_of(policy, examples)))
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / log_every:.3f}")
    hf.eval()
    return losses


def held_out(policy, n=40, budget=data.MICRO_LEVEL, probe=None):
    """Greedy accuracy, tool calls per item and mean IoU of the first crop with B1 on held-out items (eval's
    data.HELD_OUT_SEED) at a global budget, with the micro task's episode limits."""
    samples = data.micro(n, seed=data.HELD_OUT_SEED)
    cfg = RolloutConfig(greedy=True, global_tokens=budget, rollout_rows=n, probe=probe, **data.MICRO_EPISODE)
    eps = rollout(policy, samples, cfg)
    acc = sum(rewards.accuracy(rewards.scored_reply(e.text), e.sample.answer, e.sample.options) for e in eps) / n
    ious = [rewards.iou(e.boxes[0], e.sample.boxes[0]) for e in eps if e.boxes]
    return dict(accuracy=acc, tool_calls=sum(e.num_tool_calls for e in eps) / n,
                iou=sum(ious) / len(ious) if ious else None,  # None: no episode cropped
                format=sum(rewards.format_ok(e.text) for e in eps) / n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=450, help="first phase: optimizer steps")
    ap.add_argument("--read_steps", type=int, default=200, help="second phase: steps of reading exercises alone")
    ap.add_argument("--habit_steps", type=int, default=150, help="third phase: steps of episodes with both habits")
    ap.add_argument("--first", help="the first phase's weights (a file), instead of training them again")
    ap.add_argument("--batch", type=int, default=4, help="scripted trajectories per step (and 3 reading exercises each)")
    ap.add_argument("--lr", type=float, default=3e-3, help="first phase: AdamW peak learning rate (later phases: 1e-3)")
    ap.add_argument("--seed", type=int, default=0, help="init, item stream and scripted choices")
    ap.add_argument("--out", default=model.MICRO_WEIGHTS, help="where the weights go")
    ap.add_argument("--eval", type=int, default=40, help="held-out items to evaluate after training (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the result does not depend on the machine's cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    _, policy = train(args.steps, args.batch, args.lr, args.seed, args.out, read_steps=args.read_steps,
                      habit_steps=args.habit_steps, first=args.first)
    print(f"{time.time() - t0:.0f} s")
    if args.eval:
        with torch.no_grad():
            for budget in (data.MICRO_LEVEL, data.MICRO_READABLE):
                print(f"held-out, global {budget} tokens: " + ", ".join(
                    f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in held_out(policy, args.eval, budget).items()))


if __name__ == "__main__":
    main()
