"""One command on one CUDA GPU: the three benchmarks, two stage-1 training steps at the 24gb preset on a
7B-shaped model in NF4, the GPU tests, and a report with every number. Within 8 minutes (--budget 480).

    make gpu-check                      # = python gpu_check.py --out runs/gpu-check --budget 480
    python gpu_check.py --budget 0      # no limit: every part runs to its own limit
    python gpu_check.py --only train,tests   # a second call, when the first one's budget ran out before them

Writes runs/gpu-check/report.md and report.json: the device and the versions, the test summary, every
benchmark table, the training steps' measured peak memory against `train.py --dry-run`'s estimate for the
same settings. The benchmarks also record in runs/kernel_choice.json which path won on this card, which
`KERNELS=auto` then follows. Each part runs in its own process with its own time limit; one that fails is
reported, and the others still run. The parts run in order of what they measure: the benchmarks first (the
speed targets), the training steps (memory against the estimate), then the tests, which pass on a CPU too. The
report is rewritten after every part, so a check stopped midway (a lent GPU's time limit) leaves the parts that
ran, marked as an unfinished check.

Works with torch >= 2.11 and triton >= 3.6 as a GPU box may already have them. Without bitsandbytes the
7B-shaped model runs in bf16 instead of NF4, and the report says so in its first lines. Missing packages go
with the working tree as wheels (no network there): see the README's "GPU check" section.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = ["tests/test_logprobs.py", "tests/test_crop_kernel.py", "tests/test_rollout.py", "tests/test_rollout_engine.py",
         "tests/test_decode.py"]
PARTS = ("crop", "logprobs", "rollout", "train", "tests")  # in the order they run
# two short stage-1 steps at the 24gb preset; shorter responses than the preset's 2,048 keep the check quick,
# and the estimate is taken for the same settings
TRAIN = ["--stage", "1", "--preset", "24gb", "--data", "synthetic:4", "--steps=2", "--max_response_tokens=512",
         "--max_turn_tokens=256", "--save_every=2", "--dump_every=100"]


def commit():
    """The code's commit: LFPC_COMMIT when given (a GPU box gets a copy of the tree, often without .git or git),
    else git's, else None."""
    if os.environ.get("LFPC_COMMIT"):
        return os.environ["LFPC_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    except OSError:  # no git on the box
        return None
    return out.stdout.strip() or None


def versions():
    out = {}
    for pkg in ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "liger-kernel"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run(name, args, timeout, log):
    """A part of the check in its own process: (ok, seconds, output). Its output is also kept in `log`. A part
    that runs past its time is stopped with every process it started (bench.py's children would otherwise go
    on on the GPU and skew the next part's timings)."""
    print(f"== {name}: {' '.join(args)}", flush=True)
    t = time.time()
    p = subprocess.Popen([sys.executable] + args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        ok = p.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the part's whole process group
        out, _ = p.communicate()
        ok, out = False, out + f"\n(stopped after {timeout} s)"
    seconds = time.time() - t
    log.append(dict(name=name, command=args, ok=ok, seconds=round(seconds, 1), output=out))
    print(out[-3000:], flush=True)
    return ok, seconds, out


def tables(text):
    """The markdown tables in a benchmark's output, each with the line above it (its caption)."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            found.append("\n".join(([lines[i - 1]] if i else []) + lines[i:j]))
            i = j
        else:
            i += 1
    return found


def warnings(text, part):
    """The part's own warnings (a CUDA graph capture that failed, ...), each once, for the report's first lines."""
    found = dict.fromkeys(line.strip() for line in text.splitlines() if line.startswith("warning: "))
    return [f"**{part}: {w}**" for w in found]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for the report and the training steps' run "
                    "(the 7B-shaped model is saved in runs/tiny-7b, as bench.py does)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"the parts to run, comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole check (0: no limit): each part "
                    "runs within what is left, and a part that would start with under 30 s is reported as not run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        raise SystemExit(f"error: --only {args.only}: the parts are {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("error: gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    out = os.path.join(HERE, args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    ver = versions()
    notes = []
    if ver["bitsandbytes"] is None:
        notes.append("**bitsandbytes is not installed: the 7B-shaped model ran in bf16, not NF4.** Carry its wheel "
                     "(README, GPU check) to measure NF4.")
    if ver["accelerate"] is None:
        notes.append("**accelerate is not installed: loading the 7B-shaped model in NF4 needs it.** Carry its wheel.")
    if ver["liger-kernel"] is None:
        notes.append("liger-kernel is not installed: the log-prob table has no liger row (optional).")
    report = dict(device=torch.cuda.get_device_name(),
                  memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
                  cuda=torch.version.cuda, versions=ver, commit=commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), notes=notes)
    log = []

    def save(done=False):
        """The report so far: rewritten after every part, so a check stopped by a time limit keeps what it measured."""
        report.update(seconds=round(time.time() - started, 1), log=log, done=done)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(markdown(report))

    def part(name, command, limit, least=30):
        """run() within the budget's time left; not run when under `least` seconds are left."""
        if args.budget:
            left = started + args.budget - time.time()
            if left < least:
                out = f"not run: {max(left, 0):.0f} s of the check's --budget {args.budget:.0f} s were left"
                log.append(dict(name=name, command=command, ok=False, seconds=0.0, output=out))
                return False, 0.0, out
            limit = min(limit, left - 10)
        return run(name, command, limit, log)

    report["benchmarks"] = {}

    def benchmark(what, extra, limit):
        ok, seconds, text = part(f"bench {what}", ["bench.py", what] + extra, limit)
        report["benchmarks"][what] = dict(ok=ok, seconds=round(seconds, 1), tables=tables(text))
        notes.extend(warnings(text, f"bench {what}"))
        save()

    for what, extra, limit in (("crop", [], 60), ("logprobs", ["--sizes", "2048,8192"], 150)):
        if what in only:
            benchmark(what, extra, limit)
    name = None
    if only & {"rollout", "train"}:
        # the 7B-shaped model, saved once and loaded like a checkpoint (NF4), or built in bf16 without
        # bitsandbytes; after the kernels' benchmarks, whose time its 17 GB write would take. In a process of its
        # own, within the budget; if it fails, the parts that need it do not run
        ok, _, text = part("build tiny-7b", ["-c", "import bench; print('MODEL=' + bench.tiny_7b())"], 150)
        # the model's folder, on its own marked line (a warning at the process's exit may follow it)
        name = next((line[6:] for line in reversed(text.splitlines()) if line.startswith("MODEL=")), None)
        if not ok or not name:
            for what, needs in (("rollout", "bench rollout"), ("train", "train 2 steps")):
                if what in only:
                    log.append(dict(name=needs, command=[], ok=False, seconds=0.0,
                                    output="not run: the 7B-shaped model was not built (build tiny-7b, above)"))
            only -= {"rollout", "train"}
        save()
    if "rollout" in only:
        benchmark("rollout", ["--model", name], 150)
    if "train" in only:
        train_steps(name, args.out, part, report, save)
        save()
    if "tests" in only:
        ok, _, text = part("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider"] + TESTS, 150)
        report["tests"] = dict(ok=ok, summary=(text.strip().splitlines() or [""])[-1])
    save(done=True)
    print(markdown(report))
    print(f"wrote {out}/report.md and report.json in {report['seconds']:.0f} s")
    if not all(p["ok"] for p in log):
        sys.exit(1)


def train_steps(name, out, part, report, save=lambda: None):
    """Two stage-1 steps at the 24gb preset, and --dry-run's estimate for the same settings (in the report, and
    saved, before the steps start)."""
    train_args = ["train.py", "--model", name] + TRAIN + [f"--out_dir={os.path.join(out, 'stage1')}"]
    shutil.rmtree(os.path.join(HERE, out, "stage1"), ignore_errors=True)  # a rerun's: train.py keeps a used folder
    ok, _, text = part("train --dry-run", train_args + ["--dry-run"], 45)
    est = re.search(r"estimated peak GPU memory \(GB\): (.*)", text)
    estimate = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in est.group(1).split(", "))} if est else {}
    report["training"] = dict(ok=None, seconds=0.0, estimate_gb=estimate, measured_peak_gb=None, steps=[])
    save()  # ok None: the steps have not finished (the report of a check stopped during them says so)
    metrics_path = os.path.join(HERE, out, "stage1", "metrics.jsonl")
    # started with less time left, the model's load alone would take what is left, and no step would finish
    ok, seconds, text = part("train 2 steps", train_args, 200, least=150)
    steps = []
    if os.path.exists(metrics_path):
        for line in open(metrics_path):
            try:  # a line cut by the part's time limit is no step
                steps.append(json.loads(line))
            except ValueError:
                pass
    measured = max((s.get("peak_mem_gb", 0) for s in steps), default=None)
    report["training"] = dict(ok=ok and len(steps) == 2, seconds=round(seconds, 1), estimate_gb=estimate,
                              measured_peak_gb=measured, steps=steps)


def markdown(r):
    lines = [f"# GPU check: {r['device']} ({r['memory_gb']} GB), commit {r['commit']}, {r['date']}", ""]
    lines += [f"- {n}" for n in r["notes"]]
    lines += ["- versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in r["versions"].items())
              + f", CUDA {r['cuda']}",
              f"- whole check: {r['seconds']:.0f} s" if r.get("done", True) else
              f"- **the check did not finish** (stopped, or still running, after {r['seconds']:.0f} s): below are "
              "the parts that ran", ""]
    if "tests" in r:
        lines += [f"## Tests ({'pass' if r['tests']['ok'] else 'FAIL'})", "", "    " + r["tests"]["summary"], ""]
    for what, b in r.get("benchmarks", {}).items():
        lines += [f"## bench.py {what} ({'ok' if b['ok'] else 'FAILED'}, {b['seconds']:.0f} s)", ""]
        for t in b["tables"]:
            lines += [t, ""]
    lines += _training_lines(r["training"]) if "training" in r else []
    failed = [p for p in r["log"] if not p["ok"]]
    for p in failed:
        lines += [f"## FAILED: {p['name']}", "", "```", p["output"][-4000:], "```", ""]
    return "\n".join(lines)


def _training_lines(t):
    """The steps' measured peaks beside the estimate less its CUDA-context part, which torch's counters never see
    (GB of 10^9 bytes throughout)."""
    est = t["estimate_gb"]
    tensors = f"{est['peak'] - est.get('cuda_overhead', 0):.2f}" if "peak" in est else "-"
    state = "did not finish" if t["ok"] is None else f"{'ok' if t['ok'] else 'FAILED'}, {t['seconds']:.0f} s"
    lines = [f"## Two stage-1 steps, 24gb preset ({state})", "",
             "| step | seconds | rollout peak GB (with its gradients) | step peak GB (tensors) | "
             "step peak GB (allocator) | `--dry-run` estimate GB, less the CUDA context |", "|---|---|---|---|---|---|"]
    for s in t["steps"]:
        lines.append(f"| {s.get('step')} | {s.get('seconds', 0):.1f} | {s.get('rollout_mem_gb', 0):.2f} | "
                     f"{s.get('peak_mem_gb', 0):.2f} | {s.get('cuda_peak_reserved_gb', 0):.2f} | {tensors} |")
    return lines + ["", "Estimate by part (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in est.items()), ""]


if __name__ == "__main__":
    main()
