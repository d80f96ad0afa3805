"""Shared test fixtures: the tiny policy (built once), scripted episodes, tool-call texts, small configs, a
reward that varies with the text, model-folder helpers (linked copies, a moved adapter, export log-probs), and
run_cli / run_ranks, the command-line entry points run as separate processes (run_ranks: as torchrun's workers)."""
import functools
import importlib
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback

import torch
import tqdm

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


def assert_logprobs_replay(policy, episodes, temperature=1.0):
    """The log-probs a rollout recorded for its sampled tokens equal a full forward over the same tokens (on the
    policy's device: the GPU's, under make gpu-check). Returns the batch and the forward's log-probs."""
    batch = train.collate(policy, episodes)
    with torch.no_grad():
        full = model.sequence_logprobs(policy, batch, temperature=temperature)
    recorded = torch.tensor([lp for e in episodes for lp, m in zip(e.logps, e.loss_mask) if m])
    torch.testing.assert_close(full.cpu(), recorded, atol=1e-4, rtol=0)
    return batch, full


def rollout_cfg(**kw):
    """Small rollout settings for the tiny model (64-token global image, 32-token crops)."""
    base = dict(group_size=2, max_turn_tokens=80, max_response_tokens=400, global_tokens=64, crop_tokens=32,
                max_turns=4, seed=0)
    return RolloutConfig(**{**base, **kw})


def run_cfg(out, **kw):
    """A short training run of the tiny preset into `out`: 4 steps on 8 synthetic samples, a checkpoint every 2,
    no curves.png (a second a drawing; test_plot and test_e2e draw theirs)."""
    base = dict(train.PRESETS["tiny"], out_dir=str(out), data="synthetic:8", steps=4, save_every=2, keep_checkpoints=5,
                curves=False)
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
    plain = model.Policy(plain_model, policy.tokenizer)
    (ep,) = rollout(policy, data.synthetic(1, seed=3, min_side=300, max_side=400),
                    RolloutConfig(group_size=1, max_turn_tokens=12, max_response_tokens=12, global_tokens=16))
    batch = train.collate(policy, [ep])
    with torch.no_grad(), policy.reference():
        base = model.sequence_logprobs(policy, batch)
    with torch.no_grad():
        return model.sequence_logprobs(policy, batch), model.sequence_logprobs(plain, batch), base


# A fresh interpreter spends ~12 s importing torch, transformers and peft before the first line of train.py runs.
# The command-line tests fork their processes from one server that has imported the project once instead: each
# child is still its own process (its own exit code, signals, SIGKILL), and starts in well under a second.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["helpers", "eval", "peft", "matplotlib.pyplot", "plot",
                                "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"])


def run_cli(script, *args, env=None, wait_for=None, send=None, varying=False, timeout=300):
    """`python SCRIPT ARGS` (train.py or eval.py) as a separate process. wait_for/send: once its stdout
    has printed wait_for, send it that signal. varying: train with varying_score in place of the reward.
    Returns (exit code, stdout, stderr); a process killed by a signal has the negative signal number as code."""
    proc, out, err = _start(script, args, env, varying)
    deadline = time.time() + timeout
    if wait_for:
        while proc.is_alive() and time.time() < deadline:
            if os.path.exists(out) and wait_for in open(out).read():
                os.kill(proc.pid, send)
                break
            time.sleep(0.05)
    return _finish(proc, out, err, deadline, f"{script} {' '.join(args)}")


def run_ranks(script, *args, world=2, rank_env=None, varying=False, timeout=300):
    """`torchrun --nproc_per_node=WORLD SCRIPT ARGS` without torchrun's own start-up: WORLD processes forked from
    the server, each with the environment torchrun gives its workers (so dist.py takes gloo on this CPU).
    rank_env: {rank: extra environment}, e.g. a fault on one rank. Returns (exit code, stdout, stderr) per rank."""
    with socket.socket() as s:  # a free port for the job's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # OMP_NUM_THREADS=1: what torchrun gives each worker when it starts several
    torchrun = dict(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    OMP_NUM_THREADS="1")
    started = [_start(script, args, dict(torchrun, RANK=str(r), LOCAL_RANK=str(r), **(rank_env or {}).get(r, {})), varying)
               for r in range(world)]
    deadline = time.time() + timeout
    return [_finish(*proc, deadline, f"rank {r}: {script} {' '.join(args)}") for r, proc in enumerate(started)]


def _start(script, args, env, varying):
    # the server reads sys.path from PYTHONPATH (Python 3.11's forkserver does not pass it on)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    tmp = tempfile.mkdtemp(prefix="cli-")
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    proc = _SERVER.Process(target=_cli_child, args=(script, list(args), env or {}, out, err, varying))
    proc.start()
    return proc, out, err


def _finish(proc, out, err, deadline, what):
    proc.join(max(1, deadline - time.time()))
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"{what} ran past its time")
    texts = [open(f).read() for f in (out, err)]
    shutil.rmtree(os.path.dirname(out))
    return proc.exitcode, *texts


def _cli_child(script, args, env, out, err, varying):
    """What `python SCRIPT ARGS` does, in a child of the server: output to files, SystemExit to an exit code."""
    os.chdir(ROOT)
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # torch read it when the server imported torch: apply it as a fresh process would
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)  # wait_for reads the file as the run prints
    sys.argv = [script, *args]
    tqdm.tqdm.set_lock(threading.RLock())  # tqdm's default lock is a semaphore that os._exit would leave behind
    code = 0
    try:
        module = importlib.import_module(script.removesuffix(".py"))
        if varying:
            module.rewards.score = varying_score
        module.main(args)
    except SystemExit as e:  # as the interpreter does: None is 0, a number is the code, a message goes to stderr
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
