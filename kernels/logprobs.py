"""Selective log-probs: log softmax(h W^T / T)[target] per token, without the (N, V) logits.

Qwen2.5-VL's vocabulary is 152,064: one 4,096-token sequence as fp32 logits is 2.5 GB. GRPO only needs the
log-prob of the sampled token, so we sweep the vocabulary in tiles with an online (running-max) logsumexp,
as flash-attention does over keys, and keep at most (rows, tile) logits alive. Each tile of the head is read
once per pass, so the time stays that of the two full matmuls of the naive path.

Gradient: d logp_n / d h_n = (w_{t_n} - sum_v p_nv w_v) / T. It does not depend on the upstream gradient,
so sum_v exp(z_nv - m_n) w_v is accumulated in the same sweep (rescaled when the running max m_n grows) and
the backward is one multiply: grad_h = grad_out[:, None] * dlogp_dh. The head is frozen under LoRA: no
weight gradient.

Two sweeps do the same math: `_torch_sweep` (CPU, and anywhere Triton is not used) and the Triton kernel
`_logprobs_kernel` (one program per block of rows; the accumulator lives in the gradient buffer, since a
(rows x D) block does not fit in registers at D = 3,584). `selective_logprobs_naive` (full logits,
log_softmax + gather) is the reference, for tests and benchmarks only.
"""
import os

import torch
import triton
import triton.language as tl

VOCAB_TILE = 2048  # vocabulary rows per tile: each tile of the head is read once
CHUNK_ELEMENTS = 1 << 24  # rows per pass = CHUNK_ELEMENTS / VOCAB_TILE, so a logit tile stays under 64 MB


def selective_logprobs_naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden.float() @ weight.float().T) / temperature  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def _torch_sweep(hidden, weight, targets, temperature, with_entropy, need_grad):
    """-> logp (N,), entropy (N,) or None, dlogp_dh (N, D) or None; all float32."""
    n, d = hidden.shape
    v = weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS // VOCAB_TILE)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    dlogp_dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device) if need_grad else None
    for r0 in range(0, n, rows):
        h, t = hidden[r0:r0 + rows].to(weight.dtype), targets[r0:r0 + rows]
        k = h.shape[0]
        m = torch.full((k,), -float("inf"), device=h.device)  # running max of the logits
        total = torch.zeros(k, device=h.device)  # running sum of exp(z - m)
        z_target = torch.empty(k, device=h.device)
        acc = torch.zeros(k, d, device=h.device) if need_grad else None  # running sum of exp(z - m) w_v
        ez = torch.zeros(k, device=h.device) if with_entropy else None  # running sum of exp(z - m) z
        for v0 in range(0, v, VOCAB_TILE):
            w = weight[v0:v0 + VOCAB_TILE]
            z = (h @ w.T).float()  # (k, tile): the only large buffer
            if temperature != 1.0:
                z /= temperature
            here = (t >= v0) & (t < v0 + w.shape[0])
            z_target[here] = z[here, t[here] - v0]
            m_new = torch.maximum(m, z.amax(-1))
            rescale = torch.exp(m - m_new)  # (k,) old sums were taken against the old max
            z -= m_new[:, None]
            if with_entropy:  # sum e^(z-m) z = sum e^(z-m) (z - m) + m sum e^(z-m)
                e = z.exp()
                ez = ez * rescale + (e * z).sum(-1) + m_new * e.sum(-1)
                z = e
            else:
                z.exp_()
            total = total * rescale + z.sum(-1)
            if need_grad:
                acc = acc * rescale[:, None] + (z.to(weight.dtype) @ w).float()
            m = m_new
        lse = m + total.log()
        logp[r0:r0 + k] = z_target - lse
        if with_entropy:
            entropy[r0:r0 + k] = lse - ez / total  # H = lse - E_p[z]
        if need_grad:
            dlogp_dh[r0:r0 + k] = (weight[t].float() - acc / total[:, None]) / temperature
    return logp, entropy, dlogp_dh


# ---------------------------------------------------------------- Triton

@triton.jit
def _logprobs_kernel(
    h_ptr,  # hidden (N, D), row stride stride_h
    w_ptr,  # head weight (V, D), row stride stride_w
    t_ptr,  # targets (N,) int64
    logp_ptr,  # out: log-probs (N,) fp32
    ent_ptr,  # out: entropy (N,) fp32 (untouched unless WITH_ENTROPY)
    acc_ptr,  # in/out: zeros (N, D) fp32; the running sum_v e^(z-m) w_v, then d logp / d h (WITH_GRAD)
    N, D, V, inv_temp, stride_h, stride_w, stride_a,
    WITH_GRAD: tl.constexpr, WITH_ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program = BLOCK_N rows, sweeping the whole vocabulary in BLOCK_V tiles and D in BLOCK_D slabs
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max
    s = tl.zeros([BLOCK_N], tl.float32)  # running sum of e^(z - m)
    zt = tl.zeros([BLOCK_N], tl.float32)  # the target's logit
    ez = tl.zeros([BLOCK_N], tl.float32)  # running sum of e^(z - m) z (entropy)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # z = h w^T / T over the full D, in slabs
        z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if FP32_DOT:
                z += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                z += tl.dot(h, tl.trans(w))
        z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
        # online logsumexp: sums so far were taken against m; rescale them to m_new
        m_new = tl.maximum(m, tl.max(z, axis=1))
        r = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 on padded columns
        s = s * r + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            ez = ez * r + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)  # no 0 * -inf on padding
        if WITH_GRAD:  # acc <- acc * r + e @ W_tile, slab by slab (read-modify-write of this program's rows)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                            other=0.0)
                a_ptrs = acc_ptr + rows[:, None] * stride_a + ds[None, :]
                a_ok = row_ok[:, None] & d_ok[None, :]
                a = tl.load(a_ptrs, mask=a_ok, other=0.0)
                if FP32_DOT:
                    upd = tl.dot(e, w.to(tl.float32), input_precision="ieee")
                else:
                    upd = tl.dot(e.to(w.dtype), w)
                tl.store(a_ptrs, a * r[:, None] + upd, mask=a_ok)
            tl.debug_barrier()  # the next tile reads what this one wrote
        m = m_new
    lse = m + tl.log(s)
    tl.store(logp_ptr + rows, zt - lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, lse - ez / s, mask=row_ok)  # H = lse - E_p[z]
    if WITH_GRAD:  # d logp / d h = (w_t - acc / s) / T
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a_ptrs = acc_ptr + rows[:, None] * stride_a + ds[None, :]
            a_ok = row_ok[:, None] & d_ok[None, :]
            wt = tl.load(w_ptr + t[:, None] * stride_w + ds[None, :], mask=a_ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            tl.store(a_ptrs, (wt - a / s[:, None]) * inv_temp, mask=a_ok)


def _triton_sweep(hidden, weight, targets, temperature, with_entropy, need_grad,
                  block_n=32, block_v=128, block_d=64):
    n, d = hidden.shape
    v = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else logp
    acc = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_grad else logp
    # fp32 inputs, and Triton's CPU interpreter (wrong bf16 arithmetic), take the fp32 path
    fp32 = weight.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _logprobs_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, targets.contiguous(), logp, entropy, acc, n, d, v, 1.0 / temperature,
        hidden.stride(0), weight.stride(0), acc.stride(0) if need_grad else 0,
        WITH_GRAD=need_grad, WITH_ENTROPY=with_entropy, FP32_DOT=fp32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    return logp, entropy if with_entropy else None, acc if need_grad else None


# ---------------------------------------------------------------- autograd and the public functions

class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, sweep, need_grad):
        logp, entropy, dlogp_dh = sweep(hidden, weight, targets, temperature, with_entropy, need_grad)
        ctx.save_for_backward(dlogp_dh)
        ctx.hidden_dtype = hidden.dtype
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        (dlogp_dh,) = ctx.saved_tensors
        grad_h = (grad_logp[:, None] * dlogp_dh).to(ctx.hidden_dtype)
        return grad_h, None, None, None, None, None, None


def _apply(hidden, weight, targets, temperature, with_entropy, sweep):
    # ctx.needs_input_grad stays True under torch.no_grad(); ask the grad mode, so reference log-probs
    # (computed under no_grad) skip the gradient sweep entirely
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _SelectiveLogprobs.apply(hidden, weight.detach(), targets, float(temperature), with_entropy, sweep,
                                    need_grad)


def selective_logprobs_chunked(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """hidden (N, D), weight (V, D) frozen, targets (N,) -> logp (N,) float32 [, entropy (N,)]. Torch ops."""
    return _apply(hidden, weight, targets, temperature, with_entropy, _torch_sweep)


def selective_logprobs_triton(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """The same, as one Triton kernel (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)."""
    return _apply(hidden, weight, targets, temperature, with_entropy, _triton_sweep)
