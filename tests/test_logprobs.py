"""kernels.selective_logprobs: the chunked torch path and the Triton kernel (interpreted on CPU, compiled on a
GPU) against the naive log_softmax + gather, forward and backward."""
import json
import os

import pytest
import torch

import kernels
from conftest import KERNEL_DEVICE
from kernels import logprobs as lp

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(n, d, v, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)  # drawn where used: a GPU case has up to 2.5e9 numbers
    h = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g, device=device) / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    return h, w, t


@pytest.mark.parametrize("n,d,v,temp", [(37, 64, 1000, 1.0), (37, 64, 1000, 0.7), (5, 16, 33, 1.3), (1, 8, 7, 1.0)])
def test_forward_backward_match_naive(n, d, v, temp, monkeypatch):
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", v * 4)  # chunks of 4 rows, the last one ragged
    h, w, t = _inputs(n, d, v)
    up = torch.randn(n)
    ref = lp.selective_logprobs_naive(h, w, t, temp)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), h)
    out = kernels.selective_logprobs(h, w, t, temp)
    (g_out,) = torch.autograd.grad((out * up).sum(), h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


def test_entropy_matches_naive(monkeypatch):
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 1000 * 8)
    h, w, t = _inputs(37, 64, 1000)
    logp, ent = lp.selective_logprobs_chunked(h, w, t, 0.9, with_entropy=True)
    z = (h @ w.T) / 0.9
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(ent, ref.detach(), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad and logp.requires_grad


def _peak_mb(fn):
    """The process's peak resident memory during fn() beyond what was resident before, in MB (Linux), read as
    bench.py's log-prob children read theirs."""
    import bench

    base = bench._rss()
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current size
        f.write("5")
    fn()
    return (bench._peak_rss() - base) / 1e6


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak through Linux's /proc")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_the_torch_path_holds_one_chunk_of_logits_at_a_time(monkeypatch, with_entropy):
    """The gradient path in three chunks of 64 MB of fp32 logits: its peak stays near one chunk (as
    model.estimate_memory counts), not one chunk and its logsumexp temporary and the previous chunk's logits.
    The entropy, when asked, may take one temporary of a chunk's size more."""
    v, rows = 100_000, 160  # a chunk: 160 x 100,000 fp32 = 64 MB (allocated by mmap, so freed at once)
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", v * rows)
    h, w, t = _inputs(3 * rows, 16, v)
    chunk_mb = rows * v * 4 / 1e6
    logp = lambda: lp.selective_logprobs_chunked(h, w, t, with_entropy=True)[0] if with_entropy else \
        lp.selective_logprobs_chunked(h, w, t)
    peak = _peak_mb(lambda: logp().sum().backward())
    assert peak < (2.5 if with_entropy else 1.5) * chunk_mb, f"{peak:.0f} MB at the peak, chunks of {chunk_mb:.0f} MB"


def test_masked_rows_get_no_gradient():
    """Rows whose upstream gradient is 0 (masked positions) get exactly zero gradient."""
    h, w, t = _inputs(12, 32, 200)
    mask = torch.tensor([1, 0] * 6, dtype=torch.float32)
    (g,) = torch.autograd.grad((lp.selective_logprobs_chunked(h, w, t) * mask).sum(), h)
    assert torch.all(g[mask == 0] == 0) and torch.all(g[mask == 1].abs().sum(-1) > 0)


def test_bf16_error_within_twice_torch_error():
    """bf16 in: our error against an fp32 reference is at most 2x torch's own bf16 error (+ small atol)."""
    h, w, t = _inputs(37, 64, 1000, torch.bfloat16)
    exact = lp.selective_logprobs_naive(h.detach().float(), w.float(), t)
    torch_bf16 = torch.log_softmax((h.detach() @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    ours = lp.selective_logprobs_chunked(h.detach(), w, t)
    assert ours.dtype == torch.float32
    assert (ours - exact).abs().max() <= 2 * (torch_bf16 - exact).abs().max() + 1e-3


def test_realistic_vocab_small_n():
    """Qwen2.5-VL's vocabulary through the chunked path, a few rows."""
    h, w, t = _inputs(3, 64, 152_064)
    ref = lp.selective_logprobs_naive(h, w, t)
    out = lp.selective_logprobs_chunked(h, w, t)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), h)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_no_weight_gradient_is_built():
    h, w, t = _inputs(4, 8, 50)
    w.requires_grad_(True)
    lp.selective_logprobs_chunked(h, w, t).sum().backward()
    assert w.grad is None and h.grad is not None


def test_dispatch_modes(monkeypatch):
    h, w, t = _inputs(3, 8, 20)
    monkeypatch.setenv("KERNELS", "ref")
    torch.testing.assert_close(kernels.selective_logprobs(h, w, t), lp.selective_logprobs_naive(h, w, t))
    monkeypatch.setenv("KERNELS", "bogus")
    with pytest.raises(ValueError):
        kernels.selective_logprobs(h, w, t)
    calls = []
    monkeypatch.setattr(lp, "selective_logprobs_triton", lambda *a: calls.append(1) or lp.selective_logprobs_chunked(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors take the kernel only interpreted (on a GPU machine too)
    monkeypatch.setenv("KERNELS", "triton")
    kernels.selective_logprobs(h, w, t)
    monkeypatch.setenv("KERNELS", "auto")  # CPU tensors: the torch path
    kernels.selective_logprobs(h, w, t)
    assert calls == [1]


def test_with_and_without_a_gradient_each_path_follows_its_own_measurement(monkeypatch):
    """The policy's log-probs (a gradient) and the reference and old ones (none) run different kernels, measured
    apart: each asks for its own op's winner."""
    asked = []
    monkeypatch.setattr(kernels, "_use_triton", lambda op, t: asked.append(op) or False)
    h, w, t = _inputs(3, 8, 20)
    kernels.selective_logprobs(h, w, t)
    with torch.no_grad():
        kernels.selective_logprobs(h, w, t)
    kernels.selective_logprobs(h.detach(), w, t)
    assert asked == ["logprobs:float32", "logprobs_nograd:float32", "logprobs_nograd:float32"]
    kernels.selective_logprobs(h.bfloat16(), w.bfloat16(), t)  # each dtype is measured on its own
    assert asked[-1] == "logprobs:bfloat16"
    monkeypatch.setattr(kernels.logprobs, "selective_logprobs_chunked", lambda *a: None)
    kernels.selective_logprobs(h, w.bfloat16(), t)  # the head's dtype is what was measured
    assert asked[-1] == "logprobs:bfloat16"


def test_auto_picks_the_kernel_only_where_measured_faster(monkeypatch, tmp_path):
    """KERNELS=auto on a GPU: the kernel only where bench.py recorded it winning on this very card; the torch
    path when never measured, when measured slower, or on another card; never on CPU tensors."""
    from types import SimpleNamespace

    monkeypatch.setenv("KERNEL_CHOICE", str(tmp_path / "choice.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    gpu = SimpleNamespace(is_cuda=True, device=0)
    pick = lambda t: kernels._use_triton("logprobs:bfloat16", t)
    card = "H100"
    assert not pick(gpu)  # no measurement yet
    kernels.record_winner("logprobs:bfloat16", "torch", dict(triton=0.17, chunked=0.044))
    assert not pick(gpu)
    kernels.record_winner("logprobs:bfloat16", "triton", dict(triton=0.03, chunked=0.044))
    assert pick(gpu)
    assert not kernels._use_triton("resample", gpu)  # another op: not measured
    assert not kernels._use_triton("logprobs_nograd:bfloat16", gpu)  # the no-gradient kernel is measured on its own
    assert not kernels._use_triton("logprobs:float32", gpu)  # and each dtype
    assert not pick(SimpleNamespace(is_cuda=False, device="cpu"))
    card = "A100"  # measured on another card: torch
    assert not pick(gpu)
    monkeypatch.setenv("KERNELS", "triton")
    assert pick(gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor on a GPU box (warmstart's images): torch
    assert not pick(SimpleNamespace(is_cuda=False, device="cpu"))
    monkeypatch.setenv("KERNELS", "auto")
    for broken in ([], {"A100": []}, {"A100": {"logprobs": "triton"}}):  # a hand-edited file: as never measured
        (tmp_path / "choice.json").write_text(json.dumps(broken))
        os.utime(tmp_path / "choice.json", (1, len(str(broken))))  # a new mtime: the cache reads it again
        assert not pick(gpu)
        kernels.record_winner("logprobs:bfloat16", "triton", dict(triton=0.03))  # and a measurement replaces it
        assert pick(gpu)


# ---------------------------------------------------------------- the Triton kernel (interpreted on CPU, in fp32)

def _triton_vs_naive(n, d, v, temp, blocks, dtype=torch.float32, seed=0):
    h, w, t = _inputs(n, d, v, dtype, seed, KERNEL_DEVICE)
    up = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(KERNEL_DEVICE)
    up[::3] = 0  # masked positions: their rows must get exactly zero gradient
    ref = lp.selective_logprobs_naive(h.float(), w.float(), t, temp)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), h)
    z = (h.detach().float() @ w.float().T) / temp
    ent_ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    # no gradient asked: the 2-D grid kernel; a gradient: row chunks with the in-place softmax kernel
    logp0, ent0, _ = lp._triton_sweep(h.detach(), w, t, temp, True, False, blocks)
    logp, ent, grad = lp._triton_sweep(h.detach(), w, t, temp, True, True)
    assert torch.all((up[:, None] * grad)[::3] == 0)
    return ((logp0, ref.detach()), (ent0, ent_ref), (logp, ref.detach()), (ent, ent_ref),
            (up[:, None] * grad, g_ref.float()))


@pytest.mark.parametrize("n,d,v,temp,blocks", [
    (37, 64, 1000, 1.0, (16, 128, 32)),  # ragged rows and vocabulary
    (37, 80, 1000, 0.7, (16, 256, 32)),  # ragged D slabs, temperature, a block of two partial slots
    (5, 16, 33, 1.3, (16, 128, 16)),  # tiny, every block ragged
])
def test_triton_forward_backward_entropy_match_naive(n, d, v, temp, blocks, monkeypatch):
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", v * 8)  # the gradient path in chunks of 8 rows, the last ragged
    for ours, ref in _triton_vs_naive(n, d, v, temp, blocks):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_the_softmax_kernel_takes_the_vocabulary_in_several_blocks(monkeypatch):
    """The in-place softmax kernel's online logsumexp across blocks (the 7B vocabulary is 10 blocks of 16,384
    columns; the cases above fit in one): 128 columns a program, so 1,000 are 8 blocks, the last ragged."""
    monkeypatch.setattr(lp, "SOFTMAX_BLOCK", 128)
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 1000 * 8)
    for ours, ref in _triton_vs_naive(19, 48, 1000, 0.8, (16, 128, 16))[2:]:  # the gradient path's results
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_triton_partials_do_not_depend_on_the_tile():
    """The logsumexp merge gives the same answer whatever the tiles (what autotuning may pick)."""
    h, w, t = _inputs(33, 48, 700, device=KERNEL_DEVICE)
    a = lp._triton_forward(h.detach(), w, t, 1.0, True, (16, 128, 16))
    b = lp._triton_forward(h.detach(), w, t, 1.0, True, (32, 256, 64))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_triton_kernel_through_autograd_and_dispatch(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    h, w, t = _inputs(20, 32, 300, device=KERNEL_DEVICE)
    mask = torch.tensor([1, 0] * 10, dtype=torch.float32, device=KERNEL_DEVICE)
    out, ent = kernels.selective_logprobs(h, w, t, 0.9, with_entropy=True)
    (g,) = torch.autograd.grad((out * mask).sum(), h)
    ref = lp.selective_logprobs_naive(h, w, t, 0.9)
    (g_ref,) = torch.autograd.grad((ref * mask).sum(), h)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)
    assert torch.all(g[mask == 0] == 0) and torch.all(g[mask == 1].abs().sum(-1) > 0)
    assert not ent.requires_grad
    with torch.no_grad():  # reference log-probs: nothing is kept for a backward
        assert kernels.selective_logprobs(h, w, t).shape == (20,)


def test_triton_kernel_bf16_inputs_within_twice_torch_error():
    """bf16 inputs. In the interpreter the kernels compute them in fp32 (its bf16 arithmetic is wrong), so this
    checks the loads of bf16 tensors; on a GPU it is bf16 tensor-core math (and test_triton_kernel_on_gpu_*)."""
    h, w, t = _inputs(37, 64, 1000, torch.bfloat16, device=KERNEL_DEVICE)
    exact = lp.selective_logprobs_naive(h.detach().float(), w.float(), t)
    torch_bf16 = torch.log_softmax((h.detach() @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    for need_grad in (False, True):  # each kernel
        ours, _, _ = lp._triton_sweep(h.detach(), w, t, 1.0, False, need_grad, (16, 128, 32))
        assert (ours - exact).abs().max() <= 2 * (torch_bf16 - exact).abs().max() + 1e-3


def test_one_policys_old_and_new_logprobs_agree_in_bf16():
    """The ratio of two equal policies is 1: the no-grad kernel (old and reference log-probs) rounds its logits to
    the head's dtype as the gradient path's matmul does. With fp32 logits there it was anywhere in 0.95-1.07 here.
    On a GPU the two sum in different orders, so a logit near a rounding boundary may round apart: the median."""
    h, w, t = _inputs(64, 64, 1000, torch.bfloat16, device=KERNEL_DEVICE)
    w = w * 8  # logits up to ~30, an LM's range, where bf16's step is 1/16 to 1/8
    old, _, _ = lp._triton_sweep(h.detach(), w, t, 1.0, False, False)
    for sweep in (lp._triton_sweep, lp._torch_sweep):  # the gradient paths
        new, _, _ = sweep(h.detach(), w, t, 1.0, False, True)
        assert (old - new).abs().median() < 1e-4 and (old - new).abs().mean() < 2e-3


def test_each_size_class_of_n_autotunes_its_own_tiles():
    assert lp._tuned_for(1) is lp._tuned_for(1024) is not lp._tuned_for(1025)
    assert lp._tuned_for(4096) is not lp._tuned_for(4097) is lp._tuned_for(300_000)
    assert all(t.configs == lp._CONFIGS and t.fn is lp._lse_partials_kernel for t in lp._TUNED.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fixed tiles; CUDA autotunes")
def test_interpreter_runs_fixed_tiles_not_the_autotuner(monkeypatch):
    monkeypatch.setattr(lp, "_tuned_for", None)  # would raise if called
    h, w, t = _inputs(5, 16, 200)
    logp, _ = lp._triton_forward(h.detach(), w, t, 1.0, False)
    torch.testing.assert_close(logp, lp.selective_logprobs_naive(h, w, t).detach(), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- compiled, on a GPU: bounds from torch's own error

def _gpu_case(n, d, v, dtype, targets=None):
    h, w, t = _inputs(n, d, v, dtype, device="cuda")
    if targets is not None:
        t = targets
    ours = lp.selective_logprobs_triton(h, w, t)
    (g_ours,) = torch.autograd.grad(ours.sum(), h)
    exact = lp.selective_logprobs_naive(h.double(), w.double(), t)  # fp64: the yardstick for both
    (g_exact,) = torch.autograd.grad(exact.sum(), h)
    hb = h.detach().requires_grad_(True)
    low = torch.log_softmax((hb @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)  # torch in this dtype
    (g_low,) = torch.autograd.grad(low.sum(), hb)
    assert (ours.double() - exact).abs().max() <= 2 * (low.double() - exact).abs().max() + 1e-4
    assert (g_ours.double() - g_exact).abs().max() <= 2 * (g_low.double() - g_exact).abs().max() + 1e-4
    with torch.no_grad():  # no gradient asked: the 2-D grid kernel, with autotuned tiles
        no_grad = lp.selective_logprobs_triton(h, w, t)
    assert (no_grad.double() - exact).abs().max() <= 2 * (low.double() - exact).abs().max() + 1e-4


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_gpu_odd_shape(dtype):
    _gpu_case(300, 520, 5003, dtype)


@cuda
def test_triton_kernel_on_gpu_at_the_7b_head():
    """Qwen2.5-VL-7B's head (D = 3,584, V = 152,064), bf16, with the autotuned tiles."""
    _gpu_case(256, 3584, 152_064, torch.bfloat16)


@cuda
def test_triton_kernel_on_gpu_int64_offsets():
    """V * D past 2^31 (V = 300k, D = 8,192): targets near the end of the vocabulary read the last rows."""
    v = 300_000
    _gpu_case(16, 8192, v, torch.bfloat16, targets=torch.arange(v - 16, v, device="cuda"))


def test_no_gradient_sweep_under_no_grad(monkeypatch):
    """Reference log-probs (under no_grad) skip the gradient: the sweep is asked for none."""
    asked = []
    real = lp._torch_sweep

    def spy(*args):
        asked.append(args[-1])
        return real(*args)

    monkeypatch.setattr(lp, "_torch_sweep", spy)
    h, w, t = _inputs(4, 8, 50)
    with torch.no_grad():
        lp.selective_logprobs_chunked(h, w, t)
    lp.selective_logprobs_chunked(h, w, t)
    assert asked == [False, True]
