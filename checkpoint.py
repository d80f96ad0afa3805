"""Checkpoints, resume and the faults around them: atomic checkpoint folders, exact resume, graceful stop on
SIGINT/SIGTERM, and the fault-injection hook the tests use to kill a run at a chosen point.

A checkpoint is a folder: the LoRA adapter in PEFT's format (PeftModel.from_pretrained loads it),
optimizer.pt, rng.pt, config.json and state.json (step, data cursor, metrics). Nothing in it is unpickled
as code: tensors load with weights_only=True, the adapter from safetensors.
"""
import dataclasses
import json
import os
import random
import shutil
import signal

import torch


def save_checkpoint(path, policy, optimizer, cfg, state):
    """Write a checkpoint folder atomically: everything goes to PATH.tmp, which is renamed when complete. A
    failed write (a full disk) removes the partial folder, leaves older checkpoints as they are, and stops."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy.save_adapter(tmp)  # PEFT format: PeftModel.from_pretrained(base, path) loads it
        fault("checkpoint", state["step"])
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(dict(torch=torch.get_rng_state(), python=random.getstate()), os.path.join(tmp, "rng.pt"))
        _write_json(os.path.join(tmp, "config.json"), dataclasses.asdict(cfg))
        _write_json(os.path.join(tmp, "state.json"), state)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(os.path.dirname(path) or ".")
        raise SystemExit(f"error: could not write checkpoint {path}: {e}. "
                         + (f"The previous checkpoint, {previous}, is intact: free space and resume with "
                            f"--resume {os.path.dirname(path)}" if previous else "No earlier checkpoint exists.")) from None
    old = path + ".old"
    if os.path.exists(path):  # final/ is rewritten: move the old one aside, swap in the new, then delete
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def fault(point, step):
    """Fault injection for the tests: LFPC_FAULT=point:step kills this process (SIGKILL) at that point."""
    if os.environ.get("LFPC_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class GracefulStop:
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, say how to resume, then exit with the
    shell's code for that signal (130, 143), so make and job schedulers do not take the run as finished."""

    def __init__(self):
        self.signal = None
        self.exit_code = 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        self.exit_code = 128 + signum
        print(f"\n{self.signal}: finishing this step, then saving a checkpoint", flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def latest_checkpoint(path):
    """The newest complete step checkpoint in a run folder (or the folder itself if it is one)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    steps = sorted(d for d in os.listdir(path) if d.startswith("step_") and not d.endswith(".tmp")
                   and os.path.isfile(os.path.join(path, d, "state.json"))) if os.path.isdir(path) else []
    return os.path.join(path, steps[-1]) if steps else None


def load_checkpoint(path, policy, optimizer):
    """Restore adapter weights, optimizer and RNG states; returns state.json. Loads no pickled code."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(policy.model, load_file(os.path.join(path, "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def truncate_metrics(path, step):
    """On resume, drop metric lines of steps after the checkpoint: those steps are redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def prune_checkpoints(out_dir, keep):
    steps = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
