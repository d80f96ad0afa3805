"""train.py: GRPO pieces, the learning test and config overrides (exact resume: test_faults.py)."""
import dataclasses

import pytest
import torch

import data
import model
import train
from helpers import tiny_policy
from rollout import RolloutConfig, rollout


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = train.group_advantages(r, 4)
    # mean 0.5, unbiased std sqrt(1/3) (torch.std, as DeepEyes' verl): 0.5 / 0.5774 = 0.8660
    torch.testing.assert_close(adv[:4], torch.tensor([0.8660, -0.8660, 0.8660, -0.8660]), atol=1e-4, rtol=0)
    assert torch.all(adv[4:] == 0)  # a group with one reward teaches nothing
    # ... also when that reward is not exact in binary: float32's mean of eight -0.2s is one ulp off, and
    # (r - mean) / (std + 1e-6) made 0.0147 of that
    for value in (-0.2, 0.1, 1 / 3, 0.7):
        assert torch.all(train.group_advantages(torch.full((8,), value), 8) == 0)


def test_a_skipped_sample_leaves_the_order_and_no_prompt_comes_twice():
    """A broken image's sample is skipped: its place goes to the next sample, and the next step starts after that
    one (it started at it, so one prompt came twice in a row of steps)."""
    samples = data.synthetic(10)
    steps = [train.step_prompts(samples, s, 3, seed=0) for s in range(3)]
    bad = steps[1][1].id
    after = [train.step_prompts(samples, s, 3, seed=0, skip={bad}) for s in range(3)]
    ids = [x.id for step in after for x in step]
    assert bad not in ids and len(set(ids)) == 9 and after[0] == steps[0]  # the steps before it are as they were
    assert [x.id for x in after[1]] == [steps[1][0].id, steps[1][2].id, steps[2][0].id]
    with pytest.raises(SystemExit, match="every sample's image is unreadable"):
        train.step_prompts(samples, 0, 3, seed=0, skip={s.id for s in samples})


def test_each_epoch_is_its_own_permutation():
    """Every epoch takes each sample once, in an order of its own (seeded by the epoch): a run of several epochs
    does not replay the first epoch's order."""
    samples = data.synthetic(6)
    epochs = [[x.id for s in (2 * e, 2 * e + 1) for x in train.step_prompts(samples, s, 3, seed=0)] for e in range(3)]
    assert all(sorted(ids) == sorted(s.id for s in samples) for ids in epochs)
    assert len({tuple(ids) for ids in epochs}) == 3


def test_overrides_are_checked(capsys):
    cfg = train.parse_overrides(train.Config(), ["--lr=3e-4", "--steps=7", "--gradient_checkpointing=true"])
    assert cfg.lr == 3e-4 and cfg.steps == 7 and cfg.gradient_checkpointing is True
    assert "lr: 1e-05 -> 0.0003" in capsys.readouterr().out
    for bad in (["--nope=1"], ["--steps=two"], ["--steps"], ["--gradient_checkpointing=maybe"]):
        with pytest.raises(SystemExit):
            train.parse_overrides(train.Config(), bad)


def test_the_clip_fraction_is_a_share_of_the_steps_tokens():
    """The step's clip statistic: clipped tokens over the step's tokens, whatever the number of micro-batches."""
    p = tiny_policy()
    opt = torch.optim.SGD(p.trainable_parameters(), lr=0.0)
    sums = dict(loss=1.0, clip=3.0, kl=0.0, tokens=12, micro=2)
    for agg in ("micro-token-mean", "token-mean"):
        assert train.optimizer_step(p, opt, dict(sums), train.Config(loss_agg=agg))["clip"] == 0.25


def test_help_lists_every_field():
    helps = train.field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(train.Config)}
    assert all(helps.values())


def _token_reward(policy, favoured):
    def reward(e):
        written = [t for t, m in zip(e.ids, e.loss_mask) if m]
        return sum(t in favoured for t in written) / max(1, len(written))
    return reward


def _learn(sign, steps=16):
    """GRPO on the tiny model where the reward is the share of written tokens from a set of 16 ids (of 602) that
    the random model writes now and then. Returns the mean reward before and after training. (With 8 ids, a
    step's few successes made learning in 16 steps a lottery on the sampling stream: with the device sampler and
    seed 0, 8 ids went 0.031 -> 0.12, 16 ids 0.039 -> 0.66.)"""
    torch.manual_seed(0)
    p = model.load_policy("tiny", lora_r=8, lora_alpha=16)
    favoured = set(range(100, 116))
    reward = _token_reward(p, favoured)
    cfg = dataclasses.replace(train.Config(), group_size=8, micro_batch=16, lr=1e-2, clip_high=0.2)
    # the prompt the tiny tokenizer was trained on (the favoured ids are tokens of that vocabulary)
    rcfg = RolloutConfig(group_size=8, max_turn_tokens=8, max_response_tokens=8, global_tokens=16, crop_tokens=16,
                         prompt="qwen")
    samples = data.synthetic(2, seed=0, min_side=300, max_side=400)
    opt = torch.optim.AdamW(p.trainable_parameters(), lr=cfg.lr)
    means = []
    for step in range(steps):
        eps = rollout(p, samples, rcfg, step=step)
        r = torch.tensor([reward(e) for e in eps])
        means.append(r.mean().item())
        train.train_step(p, opt, eps, sign * train.group_advantages(r, 8), cfg)
    eps = rollout(p, samples, rcfg, step=10_000)
    return means[0], sum(reward(e) for e in eps) / len(eps)


def test_grpo_learns_and_the_flipped_sign_does_not():
    before, after = _learn(+1)
    assert 0 < before < 0.05  # solved now and then by chance
    assert after > 0.3  # observed: 0.039 -> 0.66 in 16 steps
    # half the steps: a sign that did not reach the update would still learn (observed 0.039 -> 0.43 in 8 steps)
    before_flipped, after_flipped = _learn(-1, steps=8)
    assert before_flipped == before  # same seeds, same first rollout
    assert after_flipped <= 2 * before  # it cannot go below 0
