"""kernels.selective_logprobs (chunked torch path) against the naive log_softmax + gather."""
import pytest
import torch

import kernels
from kernels import logprobs as lp


def _inputs(n, d, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("n,d,v,temp", [(37, 64, 1000, 1.0), (37, 64, 1000, 0.7), (5, 16, 33, 1.3), (1, 8, 7, 1.0)])
def test_forward_backward_match_naive(n, d, v, temp, monkeypatch):
    tile = max(3, v // 7)  # several vocabulary tiles and row passes, the last ones ragged
    monkeypatch.setattr(lp, "VOCAB_TILE", tile)
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", tile * 16)
    h, w, t = _inputs(n, d, v)
    up = torch.randn(n)
    ref = lp.selective_logprobs_naive(h, w, t, temp)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), h)
    out = kernels.selective_logprobs(h, w, t, temp)
    (g_out,) = torch.autograd.grad((out * up).sum(), h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


def test_entropy_matches_naive(monkeypatch):
    monkeypatch.setattr(lp, "VOCAB_TILE", 128)
    h, w, t = _inputs(37, 64, 1000)
    logp, ent = lp.selective_logprobs_chunked(h, w, t, 0.9, with_entropy=True)
    z = (h @ w.T) / 0.9
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(ent, ref.detach(), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad and logp.requires_grad


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
    monkeypatch.setenv("KERNELS", "triton")
    kernels.selective_logprobs(h, w, t)
    monkeypatch.setenv("KERNELS", "auto")  # CPU tensors: the torch path
    kernels.selective_logprobs(h, w, t)
    assert calls == [1]


# ---------------------------------------------------------------- the Triton kernel (CPU: TRITON_INTERPRET=1)

def _triton_vs_naive(n, d, v, temp, blocks, dtype=torch.float32, seed=0):
    h, w, t = _inputs(n, d, v, dtype, seed)
    up = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    ref = lp.selective_logprobs_naive(h.float(), w.float(), t, temp)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), h)
    logp, ent, grad = lp._triton_sweep(h.detach(), w, t, temp, True, True, *blocks)
    z = (h.detach().float() @ w.float().T) / temp
    ent_ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    return (logp, ref.detach()), (ent, ent_ref), (up[:, None] * grad, g_ref.float())


@pytest.mark.parametrize("n,d,v,temp,blocks", [
    (37, 64, 1000, 1.0, (16, 64, 32)),  # ragged rows and vocabulary
    (37, 80, 1000, 0.7, (16, 128, 32)),  # ragged D slabs, temperature
    (5, 16, 33, 1.3, (16, 16, 16)),  # tiny, every block ragged
])
def test_triton_kernel_matches_naive(n, d, v, temp, blocks):
    for ours, ref in _triton_vs_naive(n, d, v, temp, blocks):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_triton_kernel_through_autograd_and_dispatch(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    h, w, t = _inputs(20, 32, 300)
    out, ent = kernels.selective_logprobs(h, w, t, 0.9, with_entropy=True)
    (g,) = torch.autograd.grad(out.sum(), h)
    ref = lp.selective_logprobs_naive(h, w, t, 0.9)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)
    assert not ent.requires_grad
    with torch.no_grad():  # reference log-probs: no gradient buffer is built
        assert kernels.selective_logprobs(h, w, t).shape == (20,)


def test_triton_kernel_bf16_inputs_within_twice_torch_error():
    """bf16 inputs. In the interpreter the kernel computes them in fp32 (its bf16 arithmetic is wrong), so this
    checks the loads of bf16 tensors; bf16 tensor-core math is checked on a GPU (test_triton_kernel_on_gpu)."""
    h, w, t = _inputs(37, 64, 1000, torch.bfloat16)
    exact = lp.selective_logprobs_naive(h.detach().float(), w.float(), t)
    torch_bf16 = torch.log_softmax((h.detach() @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    ours, _, _ = lp._triton_sweep(h.detach(), w, t, 1.0, False, False, 16, 64, 32)
    assert (ours - exact).abs().max() <= 2 * (torch_bf16 - exact).abs().max() + 1e-3


def test_triton_kernel_masked_rows_get_no_gradient(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    h, w, t = _inputs(12, 32, 200)
    mask = torch.tensor([1, 0] * 6, dtype=torch.float32)
    (g,) = torch.autograd.grad((kernels.selective_logprobs(h, w, t) * mask).sum(), h)
    assert torch.all(g[mask == 0] == 0) and torch.all(g[mask == 1].abs().sum(-1) > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 512, generator=g).to("cuda", dtype).requires_grad_(True)
    w = (torch.randn(5000, 512, generator=g) / 512 ** 0.5).to("cuda", dtype)
    t = torch.randint(0, 5000, (300,), generator=g).cuda()
    ours = lp.selective_logprobs_triton(h, w, t)
    (g_ours,) = torch.autograd.grad(ours.sum(), h)
    exact = lp.selective_logprobs_naive(h.float(), w.float(), t)
    (g_exact,) = torch.autograd.grad(exact.sum(), h)
    hb = h.detach().requires_grad_(True)
    low = torch.log_softmax(hb @ w.T, -1).float().gather(-1, t[:, None]).squeeze(-1)  # torch in this dtype
    (g_low,) = torch.autograd.grad(low.sum(), hb)
    assert (ours - exact).abs().max() <= 2 * (low - exact).abs().max() + 1e-4
    assert (g_ours.float() - g_exact.float()).abs().max() <= 2 * (g_low.float() - g_exact.float()).abs().max() + 1e-4


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
