"""Data parallelism (issue 17): two ranks on this CPU (gloo), each its own process running the real entry point
with torchrun's environment (helpers.run_ranks), against one process doing the same work."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import dist
import train
from helpers import run_cli, run_ranks
from logbook import READINGS as TIMINGS

# 2 steps of the tiny preset, written short; a checkpoint after each. A micro-batch is one group, so one process with
# 2 prompts and two ranks with 1 each average the same micro-batch means (loss_agg micro-token-mean).
TRAIN = ["--stage", "1", "--steps=2", "--save_every=1", "--keep_checkpoints=10", "--data=synthetic:6", "--group_size=2",
         "--micro_batch=2", "--max_turn_tokens=6", "--max_response_tokens=12", "--dump_every=2", "--curves=false"]


def _train(out, prompts, world=1, rank_env=None):
    args = [*TRAIN, f"--prompts_per_step={prompts}", f"--out_dir={out}", *(["--resume", out] if os.path.isdir(out) else [])]
    if world == 1:  # one thread, as each rank has (run_ranks): the same arithmetic, and no fight for 2 cores
        return [run_cli("train.py", *args, env=dict(OMP_NUM_THREADS="1"), varying=True)]
    return run_ranks("train.py", *args, world=world, rank_env=rank_env, varying=True)


def _state(out):
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    opt = torch.load(os.path.join(out, "step_000002", "optimizer.pt"), weights_only=True)["state"]
    metrics = [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in open(os.path.join(out, "metrics.jsonl"))]
    return adapter, opt, metrics


def test_each_rank_takes_its_part_and_knows_where_it_starts(monkeypatch):
    """The start is the global index of the rank's first prompt, from which its sampling seeds derive: rank 1 of 2
    over 8 prompts starts at 4 (with its rank as the start, rank 1 drew prompt 1's seeds)."""
    monkeypatch.setattr(dist, "world", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.share(list("abcdefgh")) == (4, list("efgh"))


def test_two_ranks_train_as_one_process_with_their_prompts_and_resume_exactly(tmp_path):
    one, two, cut = (str(tmp_path / n) for n in ("one", "two", "cut"))
    assert [r[0] for r in _train(one, prompts=2)] == [0]
    results = _train(two, prompts=1, world=2)
    assert [r[0] for r in results] == [0, 0], results[1][2][-3000:]
    assert "rank 1 of 2 (gloo): joined" in results[1][1]
    # rank 1 dies (SIGKILL) right after step 2's update: rank 0 stops with a message instead of waiting for it
    results = _train(cut, prompts=1, world=2, rank_env={1: dict(LFPC_FAULT="step:2")})
    assert results[1][0] == -signal.SIGKILL
    assert results[0][0] == 1 and "another rank of the job died" in results[0][2], results[0][2][-3000:]
    assert [r[0] for r in _train(cut, prompts=1, world=2)] == [0, 0]  # both ranks resume from step_000001

    (ad_1, _, met_1), (ad_2, opt_2, met_2), (ad_c, opt_c, met_c) = _state(one), _state(two), _state(cut)
    assert any(v.abs().sum() > 0 for k, v in ad_2.items() if "lora_B" in k)  # the weights did move
    # killed and resumed == uninterrupted, bit for bit (each rank's work is the same computation)
    assert all(torch.equal(ad_2[k], ad_c[k]) for k in ad_2) and met_2 == met_c
    assert all(torch.equal(opt_2[k]["exp_avg_sq"], opt_c[k]["exp_avg_sq"]) for k in opt_2)
    # 2 ranks x 1 prompt == 1 process x 2 prompts: the same episodes (rewards, lengths), the same update up to the
    # order in which the two groups' gradients are summed
    assert [(m["reward"], m["response_len"]) for m in met_1] == [(m["reward"], m["response_len"]) for m in met_2]
    assert all(torch.allclose(ad_1[k], ad_2[k], rtol=1e-4, atol=1e-6) for k in ad_1)
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
               for a, b in zip(met_1, met_2))
    state = json.load(open(os.path.join(two, "step_000002", "state.json")))
    assert state["cursor"] == 4 and state["world_size"] == 2  # 2 steps x 2 prompts, over both ranks
    dump = [json.loads(x) for x in open(os.path.join(two, "rollouts", "step_000002.jsonl"))]
    assert [d["group"] for d in dump] == [0, 0, 1, 1]  # rank 0 wrote both ranks' episodes, in the global order
    with pytest.raises(SystemExit, match="trained with 2 process"):  # resumed by one process: another run, refused
        checkpoint.check_steps(two, checkpoint.read_checkpoint(os.path.join(two, "step_000002")), train.Config(steps=2))


def test_a_signal_after_the_gather_stops_every_rank_at_the_next_step(tmp_path):
    """SIGINT reaching rank 0 after a step's gather (during its metrics, probe or checkpoint): the ranks agree on it
    at the next step's gather and stop together with the shell's code, instead of rank 0 waiting at the stop's
    barrier while rank 1 waits in the next step's collectives until the job's timeout."""
    out = str(tmp_path / "run")
    results = run_ranks("train.py", *TRAIN, "--steps=4", "--prompts_per_step=1", f"--out_dir={out}",
                        "--dist_timeout_min=0.5", rank_env={0: dict(LFPC_FAULT="gathered:1:SIGINT")}, varying=True)
    assert [r[0] for r in results] == [130, 130], results[0][2][-2000:]
    assert "stopped by SIGINT after step 2" in results[0][1]
    assert checkpoint.latest_checkpoint(out).endswith("step_000002")


EVAL = ["--bench", "synthetic", "--data", "synthetic:3", "--global-tokens", "64", "--crop-tokens", "32",
        "--max-turn-tokens", "8", "--max-response-tokens", "16", "--batch", "1"]


def test_two_ranks_evaluate_every_item_once_and_summarise_as_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run_cli("eval.py", *EVAL, "--out", one, env=dict(OMP_NUM_THREADS="1"))[0] == 0
    results = run_ranks("eval.py", *EVAL, "--out", two)
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
    ids = [json.loads(x)["id"] for f in sorted(os.listdir(two)) if f.startswith("items")
           for x in open(os.path.join(two, f))]
    assert sorted(os.listdir(two)) == ["items.shard-0-of-2.jsonl", "items.shard-1-of-2.jsonl", "run.json",
                                       "summary.json", "table.md"]
    assert len(ids) == len(set(ids)) == 3  # 2 on rank 0, 1 on rank 1
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    for s in (s1, s2):
        s.pop("seconds_per_item")
        s.pop("name")
    assert s1 == s2 and s2["num_items"] == 3
