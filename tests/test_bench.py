"""bench.py's log-prob benchmark on a CPU: each child mode runs, and on a pretend GPU the table and the recorded
choices follow the times measured (the GPU run itself is `make gpu-check`'s)."""
import json
import subprocess

import pytest
import torch

import bench
import kernels
import rollout as rollout_module


@pytest.mark.parametrize("method", ["naive", "chunked", "chunked nograd", "triton", "triton nograd", "matmul",
                                    "triton 512x4", "triton rows=3"])
def test_each_logprobs_child_mode_runs(method, monkeypatch):
    from kernels import logprobs as lp

    for name in ("SOFTMAX_BLOCK", "SOFTMAX_WARPS", "CHUNK_ELEMENTS"):  # what a config variant sets in its child
        monkeypatch.setattr(lp, name, getattr(lp, name))
    r = bench._logprobs_child(method, 8, 16, 300, "cpu", torch.float32)
    assert r["seconds"] > 0 and r["peak_gb"] >= 0
    if method == "triton rows=3":
        assert lp.CHUNK_ELEMENTS == 3 * 300


def test_on_a_gpu_each_path_is_chosen_by_its_own_times(monkeypatch, tmp_path, capsys):
    """The kernel with a gradient won at every size; without one it lost: the choices say so, each on its own,
    and the no-gradient rows are set against their own floor (2NDV), not against naive (which has a gradient).
    Each row's floor is measured too: its flops at the rate cuBLAS reached on h W^T alone at the same N."""
    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    seconds = {"naive": 0.044, "chunked": 0.044, "triton": 0.03, "chunked nograd": 0.02, "triton nograd": 0.025,
               "matmul": 0.0125}
    ran, printed, shown = [], [], {}

    def child(cmd, **kw):
        method, n = cmd[3], int(cmd[4])
        ran.append((method, n))
        printed.append(capsys.readouterr().out)
        for key in (n, method):  # what a run stopped here would have printed
            shown.setdefault(key, "".join(printed))
        s = seconds.get(method, 0.035) * n / 8192
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(seconds=s, peak_gb=1.0)) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", child)
    bench.bench_logprobs([2048, 8192])
    assert ("chunked nograd", 8192) in ran and ("chunked nograd", 2048) not in ran  # the largest N only
    assert ("matmul", 2048) in ran and ("matmul", 8192) in ran  # the floor's rate: at every N
    assert ("triton rows=1024", 8192) in ran and ("triton rows=1024", 2048) not in ran
    # each row is printed as soon as it is measured, under the caption and header printed first
    assert "| triton | 2048 |" in shown[8192] and shown[8192].startswith("liger-kernel is not installed")
    assert "| triton | 8192 |" in shown["chunked nograd"] and "| chunked nograd |" not in shown["chunked nograd"]
    assert shown[8192].splitlines()[1].startswith("logprobs: D=3584") and "| path | N |" in shown[8192]
    table = json.load(open(tmp_path / "choice.json"))["NVIDIA H100 80GB HBM3"]
    assert table["logprobs:bfloat16"]["winner"] == "triton" and table["logprobs_nograd:bfloat16"]["winner"] == "torch"
    out = "".join(printed) + capsys.readouterr().out
    nograd = next(line for line in out.splitlines() if line.startswith("| triton nograd | 8192"))
    # 2 * 8192 * 3584 * 152064 flops in 25 ms: 357.2 TFLOP/s; 2.00x cuBLAS's 12.5 ms for h W^T, 2.77x the time at
    # 989 TFLOP/s
    assert nograd.split(" | ")[4:] == ["357.2", "-", "-", "2.00", "2.77 |"]
    triton = next(line for line in out.splitlines() if line.startswith("| triton | 8192"))
    # 4NDV in 30 ms against naive's 44, and against 2 x 12.5 ms for h W^T
    assert triton.split(" | ")[4:] == ["595.3", "1.0", "0.68", "1.20", "1.66 |"]
    matmul = next(line for line in out.splitlines() if line.startswith("| matmul | 8192"))
    assert matmul.split(" | ")[4:] == ["714.3", "-", "-", "1.00", "1.38 |"]
    assert kernels.measured_winner("logprobs_nograd:bfloat16", 0) == "torch"


def test_a_logprobs_bench_stopped_in_its_extra_rows_keeps_the_choice_of_every_size(monkeypatch, tmp_path):
    """make gpu-check stops a part at its time limit: the choice from every N's paths is recorded before the
    largest N's config variants and no-gradient rows run, not only by a run that finished."""
    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    ran = []

    def child(cmd, **kw):
        method, n = cmd[3], int(cmd[4])
        if method.startswith("triton ") or method.endswith(" nograd"):
            raise KeyboardInterrupt  # the part's time limit
        ran.append((method, n))
        s = dict(triton=0.03, chunked=0.044).get(method, 0.05) * n / 8192
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(seconds=s, peak_gb=1.0)) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", child)
    with pytest.raises(KeyboardInterrupt):
        bench.bench_logprobs([2048, 8192])
    assert ("triton", 8192) in ran
    choice = json.load(open(tmp_path / "choice.json"))["NVIDIA H100 80GB HBM3"]["logprobs:bfloat16"]
    assert choice["winner"] == "triton" and set(choice["seconds"]) == {"2048", "8192"}


def test_a_kernel_that_failed_at_an_n_is_not_chosen(monkeypatch, tmp_path):
    """Every path failing at one N (a broken compile, an out-of-memory) leaves no evidence the kernel wins there:
    the torch path is recorded, never the kernel that just failed."""
    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")

    def child(cmd, **kw):
        method, n = cmd[3], int(cmd[4])
        if n == 2048:
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="RuntimeError: boom\n")
        s = dict(triton=0.03, chunked=0.044).get(method, 0.05)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(seconds=s, peak_gb=1.0)) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", child)
    bench.bench_logprobs([2048, 8192])
    choice = json.load(open(tmp_path / "choice.json"))["NVIDIA H100 80GB HBM3"]["logprobs:bfloat16"]
    assert choice["winner"] == "torch" and choice["seconds"]["2048"] == {}


def test_decode_table_leaves_the_captures_and_the_prefill_out_of_the_step(monkeypatch, capsys):
    """A capture counted during the timed rollout (here a pretend one, 0.05 s slept in the first static step) and the
    prompts' admission (rows built and prefilled: here made 0.2 s slower) are shown beside the step and taken out
    of it. Each row is printed as soon as it is measured (a bench stopped by gpu-check's time limit keeps what it
    measured)."""
    import time

    import decode
    import rollout
    from helpers import tiny_policy

    prefill = rollout._prefill

    def slow_prefill(*args):
        time.sleep(0.2)
        return prefill(*args)

    monkeypatch.setattr(rollout, "_prefill", slow_prefill)

    real, printed = decode.StaticDecode.step, []

    def step(self, rows):
        if not printed:  # the static path's first step: the dynamic path's row is out already
            printed.append(capsys.readouterr().out)
        if not getattr(self, "counted", False):
            self.counted = True
            decode.counters["captures"] += 1
            decode.counters["capture_seconds"] += 0.05
            time.sleep(0.05)
        return real(self, rows)

    monkeypatch.setattr(decode.StaticDecode, "step", step)
    monkeypatch.setattr(decode, "counters", dict(captures=0, capture_seconds=0.0))
    policy = tiny_policy()
    banned = list(policy.banned)
    bench._bench_decode(policy, "tiny", [8], new_tokens=6)
    assert policy.banned == banned  # the end tokens are banned only while the benchmark runs
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError):
        bench._bench_decode(policy, "tiny", [8], new_tokens=6)
    assert policy.banned == banned  # ... even when it fails
    assert "| rows | decode |" in printed[0] and "| 8 | dynamic |" in printed[0]
    out = printed[0] + capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 8 |")]
    assert [r[1] for r in rows] == ["dynamic", "static"]
    assert rows[0][6] == "0 (0.00 s)" and rows[1][6] == "1 (0.05 s)"
    for r in rows:
        written, tps, admission, ms = int(r[2]), float(r[3]), float(r[4]), float(r[5])
        capture = 0.05 if r[1] == "static" else 0.0
        assert written == 8 * 6 and 0.2 <= admission < written / tps - capture
        # the whole run less the capture and the admission, to the printed precision: admission to 10 ms, ms per
        # step to 0.1 ms, tokens/s to 0.1 (which on a slow, loaded machine is several ms of the run's time)
        printed_to = 0.005 + 6 * 0.05e-3 + written * 0.05 / tps ** 2
        assert abs(ms / 1e3 * 6 - (written / tps - capture - admission)) < printed_to + 1e-3


def test_a_decode_row_whose_capture_failed_says_it_ran_eagerly(monkeypatch, capsys):
    """On a GPU where capture failed (decode.graphs_failed: graphs off for the process), the "graphs" row timed the
    eager static path and must not pass for graph replays."""
    import decode
    from helpers import tiny_policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU's rows: dynamic, then graphs
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(decode, "graphs_failed", "CUDA graph capture failed (RuntimeError: boom)")
    bench._bench_decode(tiny_policy(), "tiny", [8], new_tokens=3)
    rows = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    assert rows == ["dynamic", "graphs (capture failed: eager static)"]


def test_on_a_gpu_the_crop_table_times_both_horizontal_passes_and_records_the_winner(monkeypatch, tmp_path, capsys):
    """bench.py crop on a pretend GPU: torch on the GPU, the kernel with its default h-pass and with the other,
    each row's speed-up against torch on the same GPU and its share of the card's bandwidth. KERNELS=auto's
    choice follows the kernel's faster h-pass against torch, and records that h-pass (here the other one)."""
    from kernels import resample

    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(bench, "_card_spec", lambda which: 3350)
    calls = []
    monkeypatch.setattr(resample, "crop_resample_ref", lambda *a, **k: calls.append(("torch", k)))
    monkeypatch.setattr(resample, "crop_resample_triton", lambda *a, **k: calls.append(("triton", k)))
    # in order: processor (CPU), torch (CPU), torch (GPU), the default h-pass, the other, the host's plan
    seconds = iter([0.8, 0.4, 0.004, 0.002, 0.001, 0.001])
    measured = []

    def fake_time(fn, repeat=3):
        if 2 <= len(measured) <= 4:  # the GPU paths: run, so that their calls are seen
            fn()
        measured.append(next(seconds))
        return measured[-1]

    monkeypatch.setattr(bench, "_time", fake_time)
    bench.bench_crop()
    other = next(h for h in resample.HPASSES if h != resample.HPASS)
    assert calls[0] == ("torch", {})
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "CUDA" in line}
    assert calls[1:] == [("triton", {"hpass": resample.HPASS}), ("triton", {"hpass": other})]
    assert rows[f"kernels/resample.py Triton, {resample.HPASS} h-pass (CUDA)"][3] == "2.00"  # vs torch on the GPU
    faster = rows[f"kernels/resample.py Triton, {other} h-pass (CUDA)"]
    assert faster[3] == "4.00"
    gbs = float(faster[4])  # 8 crops' pixels read and their patches written (~250 MB) in 1 ms
    assert 200 < gbs < 300 and faster[5] == f"{round(gbs / 33.5)}% of 3350 GB/s |"
    assert kernels.measured("resample", 0)["winner"] == "triton" and kernels.measured("resample", 0)["hpass"] == other


def _pretend_h100(monkeypatch, tmp_path, child):
    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: child(cmd, cmd[3], int(cmd[4])))


def _ran(cmd, s):
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(seconds=s, peak_gb=1.0)) + "\n", stderr="")


def test_a_logprobs_bench_stopped_at_its_second_size_keeps_the_first_sizes_choice(monkeypatch, tmp_path):
    """Stopped during N=8192: N=2048's choice (the kernel won) is kept, not nothing, not torch for an unrun N."""
    def child(cmd, method, n):
        if n == 8192:
            raise KeyboardInterrupt  # the part's time limit
        return _ran(cmd, dict(triton=0.03, chunked=0.044).get(method, 0.05))

    _pretend_h100(monkeypatch, tmp_path, child)
    with pytest.raises(KeyboardInterrupt):
        bench.bench_logprobs([2048, 8192])
    choice = json.load(open(tmp_path / "choice.json"))["NVIDIA H100 80GB HBM3"]["logprobs:bfloat16"]
    assert choice["winner"] == "triton" and set(choice["seconds"]) == {"2048"}


def test_a_path_that_failed_is_named_with_its_error(monkeypatch, tmp_path, capsys):
    """A failed path is no row: the line naming it is all the table says of it."""
    def child(cmd, method, n):
        if (method, n) == ("triton", 2048):
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback\nRuntimeError: boom\n")
        return _ran(cmd, 0.05)

    _pretend_h100(monkeypatch, tmp_path, child)
    bench.bench_logprobs([2048, 8192])
    assert "triton N=2048: failed (RuntimeError: boom)" in capsys.readouterr().out


def test_each_timed_call_is_between_two_waits_for_the_gpu(monkeypatch):
    """CUDA runs asynchronously: without the wait after the call, the time is the launch's."""
    events = []
    monkeypatch.setattr(bench, "_sync", lambda: events.append("sync"))
    bench._time(lambda: events.append("call"), repeat=2)
    assert events == ["call"] + ["sync", "call", "sync"] * 2
