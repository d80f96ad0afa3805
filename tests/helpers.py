"""Shared test fixtures: the tiny policy (built once), scripted episodes, tool-call texts, small configs, a
reward that varies with the text, and model-folder helpers (linked copies, a moved adapter, export log-probs)."""
import functools
import os

import torch

import data
import model
import train
from rollout import RolloutConfig, rollout

# a tool call with a box to format in ("[1, 2, 30, 40]"), and an answer that ends the episode
CALL = '<think>too small</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
ANSWER = "<think>it is B</think><answer>B</answer><|im_end|>"


@functools.lru_cache(maxsize=None)
def tiny_policy(lora=True):
    return model.load_policy("tiny", lora=lora, lora_r=4, lora_alpha=8)


def scripted(policy, turns_by_group):
    """A `force` function for rollout(): episode of group g writes the texts turns_by_group[g] in order
    (each turn's text should end with </tool_call> or <|im_end|>); after the script, the model samples."""
    scripts = {g: [t for turn in turns for t in policy.encode(turn)] for g, turns in turns_by_group.items()}

    def force(ep):
        script = scripts.get(ep.group, [])
        k = sum(ep.loss_mask)
        return script[k] if k < len(script) else None

    return force


def rollout_cfg(**kw):
    """Small rollout settings for the tiny model (64-token global image, 32-token crops)."""
    base = dict(group_size=2, max_turn_tokens=80, max_response_tokens=400, global_tokens=64, crop_tokens=32,
                max_turns=4, seed=0)
    return RolloutConfig(**{**base, **kw})


def run_cfg(out, **kw):
    """A short training run of the tiny preset into `out`: 4 steps on 8 synthetic samples, a checkpoint every 2."""
    base = dict(train.PRESETS["tiny"], out_dir=str(out), data="synthetic:8", steps=4, save_every=2, keep_checkpoints=5)
    return train.Config(**{**base, **kw})


def varying_score(text, sample, boxes, cfg):
    """In place of rewards.score: the random tiny model earns the same reward on every episode of the real task,
    so nothing would move. This reward varies with the text, so every step changes the weights."""
    return dict(total=text.count("e") / max(1, len(text)), accuracy=0.0, format=0.0, tool=0.0, grounding=0.0,
                iou=None, coverage=None)


def linked_copy(folder, dst):
    """A copy of a model folder made of symbolic links (cheap), in which a test may replace or remove files."""
    os.makedirs(dst)
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), os.path.join(dst, name))
    return str(dst)


def move_lora(policy, std=0.05):
    """Give the adapter non-zero B matrices, as training would (at init B = 0 and the adapter does nothing)."""
    with torch.no_grad():
        for name, w in policy.model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, std)


def logprobs_three_ways(policy, plain_model):
    """Log-probs of one short episode under the policy (base + adapter), under a plain model (an export, with
    the policy's tokenizer), and under the base alone."""
    plain = model.Policy(plain_model, policy.tokenizer, "plain")
    (ep,) = rollout(policy, data.synthetic(1, seed=3, min_side=300, max_side=400),
                    RolloutConfig(group_size=1, max_turn_tokens=12, max_response_tokens=12, global_tokens=16))
    batch = train.collate(policy, [ep])
    with torch.no_grad(), policy.reference():
        base = model.sequence_logprobs(policy, batch)
    with torch.no_grad():
        return model.sequence_logprobs(policy, batch), model.sequence_logprobs(plain, batch), base
