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
