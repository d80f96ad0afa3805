"""Shared test fixtures: the tiny policy (built once) and scripted episodes."""
import functools

import model


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


def linked_copy(folder, dst):
    """A copy of a model folder made of symbolic links (cheap), in which a test may replace or remove files."""
    import os

    os.makedirs(dst)
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), os.path.join(dst, name))
    return str(dst)


def move_lora(policy, std=0.05):
    """Give the adapter non-zero B matrices, as training would (at init B = 0 and the adapter does nothing)."""
    import torch

    with torch.no_grad():
        for name, w in policy.model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, std)


def logprobs_three_ways(policy, plain_model):
    """Log-probs of one short episode under the policy (base + adapter), under a plain model (an export, with
    the policy's tokenizer), and under the base alone."""
    import torch

    import data
    import model
    import train
    from rollout import RolloutConfig, rollout

    plain = model.Policy(plain_model, policy.tokenizer, "plain")
    (ep,) = rollout(policy, data.synthetic(1, seed=3, min_side=300, max_side=400),
                    RolloutConfig(group_size=1, max_turn_tokens=12, max_response_tokens=12, global_tokens=16))
    batch = train.collate(policy, [ep])
    with torch.no_grad(), policy.reference():
        base = model.sequence_logprobs(policy, batch)
    with torch.no_grad():
        return model.sequence_logprobs(policy, batch), model.sequence_logprobs(plain, batch), base
