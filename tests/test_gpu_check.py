"""gpu_check.py on a CPU machine: it refuses in one line, and its report keeps every table a benchmark printed."""
import sys

import pytest
import torch

import gpu_check


def test_tables_keep_each_caption_and_every_row():
    text = "noise\ncrop: 8 crops\n| a | b |\n|---|---|\n| 1 | 2 |\nbetween\nlogprobs: N\n| x |\n|---|\n| 3 |\n"
    assert gpu_check.tables(text) == ["crop: 8 crops\n| a | b |\n|---|---|\n| 1 | 2 |", "logprobs: N\n| x |\n|---|\n| 3 |"]


def test_report_names_what_is_missing_and_what_failed():
    r = dict(device="H100", memory_gb=79.2, commit="abc", date="d", cuda="13.0", seconds=400,
             versions=dict(torch="2.11.0", bitsandbytes=None), notes=["**bitsandbytes is not installed**"],
             tests=dict(ok=True, summary="40 passed"),
             benchmarks=dict(crop=dict(ok=True, seconds=20, tables=["crop: x\n| a |\n|---|\n| 1 |"])),
             training=dict(ok=False, seconds=5, estimate_gb=dict(peak=10.6), steps=[], measured_peak_gb=None),
             log=[dict(name="train 2 steps", ok=False, output="Traceback: boom")])
    md = gpu_check.markdown(r)
    assert "bitsandbytes missing" in md and "**bitsandbytes is not installed**" in md
    assert "| 1 |" in md and "## FAILED: train 2 steps" in md and "boom" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main()


def _fake_gpu(monkeypatch, tmp_path, stop_at=None, build_fails=None, say=None, calls=None):
    """gpu_check.main on a pretend GPU: each part's process replaced by a stub (printing say[name] too, if given;
    the model's build failing with build_fails' output); returns the parts it ran. calls: each part's (name,
    command, time limit) go there."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(gpu_check, "HERE", str(tmp_path))
    parts = []

    def run(name, args, timeout, log):
        if name == stop_at:
            raise KeyboardInterrupt  # the call's time limit, as the check sees it
        parts.append("tiny-7b" if name == "build tiny-7b" else name)
        if calls is not None:
            calls.append((name, args, timeout))
        ok, out = True, "4 passed" if name == "tests" else f"{name}: caption\n| a |\n|---|\n| 1 |\n"
        if name == "build tiny-7b":  # what bench.tiny_7b() prints, then the path, then a warning at exit
            ok, out = (False, build_fails) if build_fails else (True, "MODEL=/box/runs/tiny-7b\nUserWarning: leaked\n")
        out = (say or {}).get(name, "") + out
        log.append(dict(name=name, command=args, ok=ok, seconds=1.0, output=out))
        return ok, 1.0, out

    monkeypatch.setattr(gpu_check, "run", run)
    return parts


def test_a_check_stopped_midway_leaves_a_report_of_the_parts_that_ran(monkeypatch, tmp_path):
    """A check killed by a time limit (a lent GPU's 10-minute call) keeps what it measured: the report is
    rewritten after every part, and says the check did not finish."""
    parts = _fake_gpu(monkeypatch, tmp_path, stop_at="train 2 steps")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "check"])
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main()
    # the 7B-shaped model is built after the kernels' benchmarks
    assert parts == ["bench crop", "bench logprobs", "tiny-7b", "bench rollout", "train --dry-run"]
    md = (tmp_path / "check" / "report.md").read_text()
    assert "did not finish" in md and "bench crop: caption" in md and "bench rollout: caption" in md
    assert "## Two stage-1 steps, 24gb preset (did not finish)" in md and "## Tests" not in md  # the estimate kept


def test_the_parts_run_in_order_of_what_they_measure_within_8_minutes(monkeypatch, tmp_path):
    """The speed benchmarks first, then the training steps (on the model the build wrote), the tests last: a
    lent GPU's time runs out on the parts that matter least. Without --budget the check keeps to 480 s."""
    calls = []
    parts = _fake_gpu(monkeypatch, tmp_path, calls=calls)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "o", "--budget", "0"])
    gpu_check.main()
    assert parts == ["bench crop", "bench logprobs", "tiny-7b", "bench rollout", "train --dry-run", "train 2 steps",
                     "tests"]
    commands = {name: args for name, args, _ in calls}
    assert commands["bench rollout"][-2:] == ["--model", "/box/runs/tiny-7b"]  # not the warning after it
    assert commands["train 2 steps"][:3] == ["train.py", "--model", "/box/runs/tiny-7b"]
    parts.clear()  # no --budget: 480 s; here 470 s have gone by the first part
    clock = iter([0.0] + [470.0] * 40)
    monkeypatch.setattr(gpu_check.time, "time", lambda: next(clock))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "o", "--only", "crop"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert parts == [] and "not run: 10 s of the check's --budget 480 s" in (tmp_path / "o" / "report.md").read_text()


def test_only_some_parts_and_within_a_budget(monkeypatch, tmp_path):
    parts = _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "a", "--only", "crop,logprobs"])
    gpu_check.main()
    assert parts == ["bench crop", "bench logprobs"]  # no tests, and no 7B model to build
    # a budget too short for any part: each is reported as not run, and the check says so by failing
    parts.clear()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "b", "--only", "crop,train", "--budget", "20"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert parts == []
    md = (tmp_path / "b" / "report.md").read_text()
    assert md.count("not run: ") == 3  # bench crop, the model's build, and so the training steps
    assert "## FAILED: train 2 steps" in md and "the 7B-shaped model was not built" in md
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--only", "crop,speed"])
    with pytest.raises(SystemExit, match="the parts are"):
        gpu_check.main()


def test_a_parts_warnings_open_the_report(monkeypatch, tmp_path):
    """A CUDA graph capture that failed (decode.py prints it once) is the first thing the report says."""
    warning = "warning: CUDA graph capture failed (RuntimeError: boom); decoding without graphs for the rest"
    _fake_gpu(monkeypatch, tmp_path, say={"bench rollout": f"{warning}\n{warning}\n"})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "w", "--only", "crop,rollout"])
    gpu_check.main()
    md = (tmp_path / "w" / "report.md").read_text()
    assert md.count("CUDA graph capture failed") == 1 and md.index("capture failed") < md.index("## bench.py crop")
    assert "- **bench rollout: warning: CUDA graph capture failed" in md


def test_the_commit_comes_from_the_environment_or_git_and_no_git_is_no_crash(monkeypatch, tmp_path):
    """A GPU box gets a copy of the tree, often without .git, sometimes without git."""
    _fake_gpu(monkeypatch, tmp_path)

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "g", "--only", "crop"])
    gpu_check.main()
    assert "commit None" in (tmp_path / "g" / "report.md").read_text()
    monkeypatch.setenv("LFPC_COMMIT", "abc1234")
    gpu_check.main()
    assert "commit abc1234" in (tmp_path / "g" / "report.md").read_text()


def test_training_is_not_started_without_the_time_for_its_two_steps(monkeypatch, tmp_path):
    parts = _fake_gpu(monkeypatch, tmp_path)
    clock = iter([0.0] + [400.0] * 20)  # the check starts at 0; every later reading says 400 s have gone
    monkeypatch.setattr(gpu_check.time, "time", lambda: next(clock))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "t", "--only", "train", "--budget", "540"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert "train --dry-run" in parts and "train 2 steps" not in parts  # 140 s left: the dry run, not the steps
    assert "not run: 140 s of the check's --budget 540 s were left" in (tmp_path / "t" / "report.md").read_text()


def test_a_failed_model_build_fails_only_the_parts_that_need_it(monkeypatch, tmp_path):
    parts = _fake_gpu(monkeypatch, tmp_path, build_fails="torch.OutOfMemoryError: CUDA out of memory")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "c"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert parts == ["bench crop", "bench logprobs", "tiny-7b", "tests"]
    md = (tmp_path / "c" / "report.md").read_text()
    assert "## FAILED: build tiny-7b" in md and "CUDA out of memory" in md and "whole check" in md


def test_training_table_sets_the_measured_peaks_beside_the_estimate_less_the_cuda_context():
    t = dict(ok=True, seconds=80, estimate_gb=dict(weights=5.0, kv_cache=4.1, cuda_overhead=1.5, peak=10.6),
             steps=[dict(step=1, seconds=40.0, rollout_mem_gb=7.5, peak_mem_gb=8.25, cuda_peak_reserved_gb=8.9)])
    row = gpu_check._training_lines(t)[4]
    assert row == "| 1 | 40.0 | 7.50 | 8.25 | 8.90 | 9.10 |"


def test_a_part_past_its_time_is_stopped_with_every_process_it_started(tmp_path):
    """bench.py runs each log-prob path in a child process: a part stopped at its limit must not leave one
    running on the GPU under the next part's timings."""
    import time

    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); open(sys.argv[1], 'w').write(str(c.pid)); print('started', flush=True); "
              "time.sleep(60)")
    log = []
    ok, seconds, out = gpu_check.run("slow", ["-c", script, str(tmp_path / "pid")], 3, log)
    assert not ok and "started" in out and "stopped after 3 s" in out and seconds < 30 and log[0]["name"] == "slow"
    pid, state = int((tmp_path / "pid").read_text()), None
    for _ in range(50):  # the grandchild is gone (or a zombie, which init reaps)
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.1)
    assert state in ("gone", "Z")


def test_a_rerun_starts_the_training_steps_in_an_empty_folder(monkeypatch, tmp_path):
    """runs/ survives on a warm machine: a second check must not find the first one's checkpoints (train.py
    refuses a folder that already holds a run)."""
    monkeypatch.setattr(gpu_check, "HERE", str(tmp_path))
    (tmp_path / "check" / "stage1" / "step_000002").mkdir(parents=True)
    seen = []

    def part(name, command, limit, least=30):
        seen.append((name, (tmp_path / "check" / "stage1").exists()))
        return True, 1.0, "estimated peak GPU memory (GB): weights 5.00, peak 9.00"

    report = {}
    gpu_check.train_steps("tiny-7b", "check", part, report)
    assert seen == [("train --dry-run", False), ("train 2 steps", False)]
    assert report["training"]["estimate_gb"] == dict(weights=5.0, peak=9.0) and not report["training"]["ok"]


def test_a_metrics_line_cut_by_the_time_limit_is_no_step(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "HERE", str(tmp_path))

    def part(name, command, limit, least=30):
        if name == "train 2 steps":
            (tmp_path / "check" / "stage1").mkdir(parents=True)
            (tmp_path / "check" / "stage1" / "metrics.jsonl").write_text(
                '{"step": 1, "peak_mem_gb": 9.5}\n{"step": 2, "peak_mem_gb": 9.75}\n{"step": 3, "pea')
        return True, 1.0, "estimated peak GPU memory (GB): peak 9.00"

    report = {}
    gpu_check.train_steps("tiny-7b", "check", part, report)
    assert [s["step"] for s in report["training"]["steps"]] == [1, 2] and report["training"]["ok"]
    assert report["training"]["measured_peak_gb"] == 9.75


def test_a_missing_accelerate_opens_the_report(monkeypatch, tmp_path):
    """NF4 loading needs accelerate: the report's first lines say why the training steps failed."""
    _fake_gpu(monkeypatch, tmp_path)
    real = gpu_check.versions
    monkeypatch.setattr(gpu_check, "versions", lambda: dict(real(), accelerate=None))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "a", "--only", "crop", "--budget", "0"])
    gpu_check.main()
    assert "accelerate is not installed" in (tmp_path / "a" / "report.md").read_text()


def test_a_check_stopped_after_a_failed_model_build_still_reports_the_build(monkeypatch, tmp_path):
    """The build's outcome is saved at once: a check stopped later still says why two parts did not run."""
    _fake_gpu(monkeypatch, tmp_path, stop_at="tests", build_fails="torch.OutOfMemoryError: CUDA out of memory")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", "s"])
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main()
    md = (tmp_path / "s" / "report.md").read_text()
    assert "## FAILED: build tiny-7b" in md and "the 7B-shaped model was not built" in md


def test_training_steps_that_failed_are_not_reported_as_unfinished():
    """ok None: stopped during the steps; ok False: they ran and failed."""
    t = dict(ok=False, seconds=12, estimate_gb={}, steps=[], measured_peak_gb=None)
    heads = [gpu_check._training_lines(dict(t, ok=ok))[0] for ok in (False, True, None)]
    assert [h.split("preset ")[1] for h in heads] == ["(FAILED, 12 s)", "(ok, 12 s)", "(did not finish)"]
