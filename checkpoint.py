"""Checkpoints, resume and the faults around them: atomic checkpoint folders, exact resume, graceful stop on
SIGINT/SIGTERM, and the fault-injection hook the tests use to kill a run at a chosen point.

A checkpoint is a folder: the LoRA adapter in PEFT's format (PeftModel.from_pretrained loads it),
optimizer.pt, rng.pt, config.json and state.json (step, metrics, ...; its data cursor, the prompts seen, is for
reading: a resume takes the data order from the step; the sha256 of every other file, checked when read). Nothing
in it is unpickled as code: tensors load with weights_only=True, the adapter from safetensors.
"""
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal

import torch
from safetensors import SafetensorError

import snapshot

# Config fields that make a different run: a resume that changes one of them would mix two runs in one folder
# (`steps` may grow; batch sizes and budgets may change, as after an out-of-memory retry)
RUN_KEYS = ("stage", "model", "data", "infogap", "seed", "lora_r", "lora_alpha", "group_size", "prompts_per_step")
# what a damaged checkpoint file raises when read
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


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
        # a changed byte inside a tensor's data still loads (as other weights): the files' sha256 tells
        sums = {n: snapshot.sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        _write_json(os.path.join(tmp, "state.json"), dict(state, sha256=sums))
        _fsync_folder(tmp)  # on disk before the rename: a power cut never leaves a complete-looking empty file
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
    _fsync_dir(os.path.dirname(path) or ".")  # the rename itself
    shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder):
    """fsync every file of a folder, then the folder (its entries)."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault(point, step):
    """Fault injection for the tests: LFPC_FAULT=point:step kills this process (SIGKILL) at that point;
    point:step:SIGNAL sends that signal instead (SIGINT: a Ctrl-C at that moment)."""
    want = os.environ.get("LFPC_FAULT", "").split(":")
    if want[:2] == [point, str(step)]:
        os.kill(os.getpid(), getattr(signal, want[2]) if len(want) > 2 else signal.SIGKILL)


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


STEP_DIR = re.compile(r"step_\d+")  # a checkpoint's folder; step_N.tmp is a killed write, step_N.old a swap's leftover


def _step_dirs(run_dir):
    """The names of a run folder's step checkpoint folders, oldest first (complete or not)."""
    return sorted(d for d in os.listdir(run_dir) if STEP_DIR.fullmatch(d)) if os.path.isdir(run_dir) else []


def complete_checkpoints(run_dir):
    """The complete step checkpoints of a run folder, oldest first."""
    return [os.path.join(run_dir, d) for d in _step_dirs(run_dir)
            if os.path.isfile(os.path.join(run_dir, d, "state.json"))]


def set_aside_later(out_dir, step):
    """Resuming at `step` from a checkpoint that is not the folder's newest (named, or the newer ones damaged):
    the checkpoints after it belong to a continuation this run abandons. They go to abandoned-after-STEP/, so
    that no later --resume, and no pruning, takes them for this run's. Returns how many were moved."""
    later = [d for d in _step_dirs(out_dir) if int(d[5:]) > step]
    if later:
        aside = os.path.join(out_dir, f"abandoned-after-step_{step:06d}")
        os.makedirs(aside, exist_ok=True)
        for d in later:
            shutil.rmtree(os.path.join(aside, d), ignore_errors=True)
            os.replace(os.path.join(out_dir, d), os.path.join(aside, d))
        print(f"set aside {len(later)} checkpoint(s) after step {step} ({', '.join(later)}): another continuation of "
              f"this run; now in {aside}")
    return len(later)


def latest_checkpoint(path):
    """The newest complete step checkpoint in a run folder (or the folder itself if it is one)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    found = complete_checkpoints(path)
    return found[-1] if found else None


def read_checkpoint(path):
    """Every file of a checkpoint, read into memory (nothing applied yet). A damaged file (one that does not parse,
    or whose sha256 is not the one state.json recorded) raises ValueError naming it. Loads no pickled code: tensors
    with weights_only=True, the adapter from safetensors."""
    from safetensors.torch import load_file

    def tensors(p):
        return torch.load(p, weights_only=True)

    def read_json(p):
        with open(p) as f:
            return json.load(f)

    def read_state(p):
        state = read_json(p)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state

    readers = {"state.json": read_state, "adapter_model.safetensors": load_file, "optimizer.pt": tensors,
               "rng.pt": tensors, "config.json": read_json}
    files = {}
    for name, read in readers.items():
        file = os.path.join(path, name)
        try:
            files[name] = read(file)
        except READ_ERRORS as e:
            raise ValueError(f"{file} is damaged ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:120]})") from None
        if name == "state.json":  # first: every other file against its sha256 (none in an older checkpoint)
            sums = files[name].get("sha256")
            snapshot.check_files(path, sums, sorted(sums) if isinstance(sums, dict) else ())
    return files


def restore_checkpoint(files, policy, optimizer):
    """Apply a read checkpoint: adapter weights, optimizer and RNG states. Returns state.json."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(policy.model, files["adapter_model.safetensors"])
    optimizer.load_state_dict(files["optimizer.pt"])
    torch.set_rng_state(files["rng.pt"]["torch"])
    random.setstate(files["rng.pt"]["python"])
    return files["state.json"]


def plan_run(cfg, resume, default_out):
    """Where a run writes, and the checkpoint it resumes from, checked before any model loads.

    A fresh run needs a folder with no run in it (else old and new checkpoints would mix, and pruning would
    delete the new run's). --resume DIR writes into DIR unless --out_dir says otherwise; it takes the newest
    checkpoint that reads, naming and skipping damaged ones; it stops when the checkpoint's run differs in a
    field of RUN_KEYS. Returns (out_dir, checkpoint path, its files)."""
    if not resume:
        out_dir = cfg.out_dir or default_out
        _check_empty(out_dir)
        return out_dir, None, None
    if os.path.isfile(os.path.join(resume, "state.json")) and not os.path.isfile(os.path.join(resume, "optimizer.pt")):
        raise SystemExit(f"error: --resume {resume} is a finished run's adapter (no optimizer state), not a checkpoint: "
                         f"resume its run folder with a larger --steps (--resume {os.path.dirname(os.path.normpath(resume))})"
                         f", or start a new run from it with --init_adapter={resume} and another --out_dir")
    run_dir, candidates = _resume_candidates(resume)
    out_dir = cfg.out_dir or run_dir
    if os.path.abspath(out_dir) != os.path.abspath(run_dir):
        _check_empty(out_dir)
    for ckpt in reversed(candidates):
        try:
            files = read_checkpoint(ckpt)
        except ValueError as e:
            print(f"warning: {e}; falling back to the checkpoint before it")
            continue
        _check_same_run(files["config.json"], cfg, ckpt)
        return out_dir, ckpt, files
    raise SystemExit(f"error: no complete, readable checkpoint in {run_dir} (a run folder holds step_NNNNNN "
                     f"folders: runs/stage1, not runs): pass the run's folder, or start over in another --out_dir")


def _resume_candidates(resume):
    """--resume DIR (a run folder) or DIR/step_N (a checkpoint) -> (the run folder, its complete checkpoints up to
    the one named, oldest first)."""
    named = os.path.isfile(os.path.join(resume, "state.json"))
    run_dir = (os.path.dirname(os.path.normpath(resume)) or ".") if named else resume  # "step_000002": the folder here
    candidates = complete_checkpoints(run_dir)
    if named:
        candidates = [c for c in candidates if c <= os.path.join(run_dir, os.path.basename(os.path.normpath(resume)))]
    return run_dir, candidates


def saved_config(resume):
    """The settings (config.json) of the run --resume names: of the newest complete checkpoint (up to the one
    named) whose config reads and is as it was written. None when there is none."""
    for ckpt in reversed(_resume_candidates(resume)[1]):
        try:  # a config.json changed since it was written is damaged: the checkpoint before it has the settings
            with open(os.path.join(ckpt, "state.json")) as f:
                snapshot.check_files(ckpt, json.load(f).get("sha256"), ["config.json"])
            with open(os.path.join(ckpt, "config.json")) as f:
                return json.load(f)
        except (OSError, ValueError, AttributeError):
            continue
    return None


def check_inputs(ckpt, files, inputs, cfg):
    """A run resumed on data (or an --infogap file) whose contents changed since its checkpoint would train on
    other prompts in another order under the same name: refused, naming what changed. `inputs`: {field: the
    contents' fingerprint, or None: not a file (a missing one is named where it is read)}, saved in every
    checkpoint's state.json."""
    then = files["state.json"].get("inputs")  # absent: a checkpoint written before they were recorded
    changed = [k for k in inputs if then is not None and inputs[k] is not None and then.get(k) != inputs[k]]
    if changed:
        raise SystemExit(f"error: the {' and the '.join(f'{k}, {getattr(cfg, k)},' for k in changed)} changed since "
                         f"{ckpt} (other contents under the same name): resume with them as they were, or start a "
                         f"new run in another --out_dir")


def check_steps(ckpt, files, cfg, world=1):
    """A run shortened below its checkpoint's step says so (its weights are not that earlier step's); a run resumed
    with another number of processes is another run (a step's prompts are prompts_per_step x processes)."""
    step = files["state.json"]["step"]
    saved_world = files["state.json"].get("world_size", 1)
    if saved_world != world:
        raise SystemExit(f"error: {ckpt} was trained with {saved_world} process(es), this run has {world}: a step's "
                         f"prompts (prompts_per_step x processes) and their order would change. Resume with "
                         f"{saved_world} (torchrun --nproc_per_node / --nnodes), or start a new run in another --out_dir")
    if step > cfg.steps:
        raise SystemExit(f"error: {ckpt} is at step {step}, past --steps={cfg.steps}: its weights are not step "
                         f"{cfg.steps}'s. Resume with --steps >= {step}, or name an earlier checkpoint with --resume "
                         f"{os.path.dirname(ckpt)}/step_NNNNNN")


def _check_empty(out_dir):
    held = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") or d in ("final", "metrics.jsonl")) \
        if os.path.isdir(out_dir) else []
    if held:
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(held[:4])}): pass --resume {out_dir} to "
                         f"continue it, or another --out_dir for a new run")


def _check_same_run(saved, cfg, ckpt):
    now = dataclasses.asdict(cfg)
    diff = [k for k in RUN_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        raise SystemExit(f"error: {ckpt} belongs to another run: " + ", ".join(
            f"{k}={saved[k]!r} there, {now[k]!r} now" for k in diff) + ". Pass the checkpoint's values to resume it, "
            "or start a new run in another --out_dir")


def truncate_metrics(path, step):
    """On resume, drop metric lines of steps after the checkpoint: those steps are redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if _step_of(line) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line):
    """A metrics line's step; a line cut by a kill counts as past every checkpoint (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def prune_checkpoints(out_dir, keep):
    for d in _step_dirs(out_dir)[:-keep]:
        shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
