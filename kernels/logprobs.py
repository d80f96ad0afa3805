"""Selective log-probs: log softmax(h W^T / T)[target] per token, without the (N, V) logits.

Qwen2.5-VL's vocabulary is 152,064: one 4,096-token sequence as fp32 logits is 2.5 GB. GRPO only needs the
log-prob of the sampled token (and its gradient in h; the head is frozen under LoRA: no weight gradient).

Gradient: d logp_n / d h_n = (w_{t_n} - sum_v p_nv w_v) / T, with p = softmax(z), z = h W^T / T.

Two paths, the same math, each computing the gradient with the forward (it does not depend on the upstream
gradient), so the backward is one multiply:
- `selective_logprobs_chunked` (torch ops; CPU, and CUDA until the kernels are measured faster there): rows in
  chunks, each chunk's full-vocabulary logits by one matmul (cuBLAS on a GPU), log-softmax in fp32, and the
  gradient by a second matmul. This is Liger-Kernel's fused linear cross-entropy in plain torch: 4NDV flops,
  one (chunk, V) buffer of CHUNK_ELEMENTS, but several fp32 passes over it.
- `selective_logprobs_triton`, two kernels for the two cases:
  - with a gradient (the policy's log-probs in the loss): the same row chunks and two cuBLAS matmuls, with
    `_softmax_rows_kernel` between them: one program per row reads the logits in the matmul's dtype, takes
    the logsumexp online, and writes p over them in place (Liger's structure): one read and one write of the
    chunk instead of torch's fp32 passes.
  - without (reference and old-policy log-probs, under no_grad): `_lse_partials_kernel` on a 2-D grid of
    row blocks x vocabulary blocks (apple/ml-cross-entropy's layout). Each program computes a
    (BLOCK_N, BLOCK_V) logit tile over D on tensor cores (bf16 in, fp32 accumulate) and writes its partial
    max, sum e^(z - max) and sum e^(z - max) z; torch merges the partials into the logsumexp (and the
    entropy). 2NDV flops and nothing of size V beyond the partials (N x V/128 floats). Offsets are int64
    (V * D passes 2^31 at V = 300k, D = 8k). Tiles are autotuned on CUDA, per size class of N; Triton's CPU
    interpreter (the tests) runs one small fixed config, in fp32.
`selective_logprobs_naive` (full logits in fp32, log_softmax + gather) is the tests' reference (bench.py's naive row,
_naive_low, keeps the input's dtype).
"""
import os

import torch
import triton
import triton.language as tl

CHUNK_ELEMENTS = 1 << 26  # rows per chunk = CHUNK_ELEMENTS / V: a chunk's fp32 logits stay under 256 MB
MIN_BLOCK_V = 128  # the partials' granularity: one slot per 128 vocabulary columns (BLOCK_V is a multiple)
SOFTMAX_BLOCK, SOFTMAX_WARPS = 16384, 8  # _softmax_rows_kernel: the most columns a program takes at once, warps


def selective_logprobs_naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden.float() @ weight.float().T) / temperature  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def _rows_per_chunk(v):
    return max(1, CHUNK_ELEMENTS // v)


def softmax_block(v):
    return min(SOFTMAX_BLOCK, triton.next_power_of_2(v))


def _torch_sweep(hidden, weight, targets, temperature, with_entropy, need_grad):
    """-> logp (N,), entropy (N,) or None, dlogp_dh (N, D) or None; all float32."""
    n, d = hidden.shape
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    dlogp_dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device) if need_grad else None
    rows = _rows_per_chunk(weight.shape[0])
    for r0 in range(0, n, rows):
        h, t = hidden[r0:r0 + rows].to(weight.dtype), targets[r0:r0 + rows]
        z = (h @ weight.T).float()  # (k, V): the only large buffer; every step below works in place on it
        if temperature != 1.0:
            z /= temperature
        z_t = z.gather(1, t[:, None])[:, 0]
        m = z.amax(1)
        z -= m[:, None]
        if with_entropy:  # H = lse - E_p[z] = log s - E_p[z - m]: the one temporary of a chunk's size
            e_zm = z.exp().mul_(z).sum(-1)
        s = z.exp_().sum(-1)  # z now holds e^(z - m)
        logp[r0:r0 + rows] = z_t - m - s.log()
        if with_entropy:
            entropy[r0:r0 + rows] = s.log() - e_zm / s
        if need_grad:  # (w_t - p W) / T, with p written over z
            p = z.div_(s[:, None]).to(weight.dtype)
            dlogp_dh[r0:r0 + rows] = (weight[t].float() - (p @ weight).float()) / temperature
            del p
        del z  # before the next chunk's logits: a name still bound to this chunk would keep two alive
    return logp, entropy, dlogp_dh


# ---------------------------------------------------------------- Triton

@triton.jit
def _lse_partials_kernel(
    h_ptr,  # hidden (N, D), row stride stride_h
    w_ptr,  # head weight (V, D), row stride stride_w
    m_ptr,  # out: (N, NUM_SLOTS) fp32 partial max of each vocabulary block (host fills -inf)
    s_ptr,  # out: (N, NUM_SLOTS) fp32 partial sum e^(z - m) (host fills 0)
    ez_ptr,  # out: (N, NUM_SLOTS) fp32 partial sum e^(z - m) z (WITH_ENTROPY only; host fills 0)
    N, D, V, inv_temp, stride_h, stride_w, NUM_SLOTS,
    WITH_ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # program -> (row block, vocabulary block), grouped: GROUP_N row blocks sweep the vocabulary together, so
    # each head tile is read from HBM once per group and from L2 by the others (the Triton matmul tutorial)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rows * stride passes 2^31
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    # z = h w^T / T over the full D, in slabs of BLOCK_D
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
    # rounded to the head's dtype, as the gradient path's matmul (and torch's) hands its logits over, so the old
    # and reference log-probs (this kernel) equal the policy's (that path) for the same weights: fp32 logits here
    # would put the ratio of two equal policies anywhere in 0.95-1.07. bf16 by its bits, to nearest even (the
    # interpreter's cast truncates)
    if w_ptr.dtype.element_ty == tl.bfloat16:
        bits = z.to(tl.uint32, bitcast=True)
        z = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).to(tl.float32, bitcast=True)
    elif w_ptr.dtype.element_ty == tl.float16:
        z = z.to(tl.float16).to(tl.float32)
    z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))
    # this block's share of the logsumexp: max m, sum e^(z - m); merged across blocks on the host
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])  # 0 on padded columns
    slot = rows * NUM_SLOTS + pid_v * (BLOCK_V // 128)  # partials are kept per 128 columns; see MIN_BLOCK_V
    tl.store(m_ptr + slot, m, mask=row_ok)
    tl.store(s_ptr + slot, tl.sum(e, axis=1), mask=row_ok)
    if WITH_ENTROPY:  # sum e^(z - m) z, with no 0 * -inf on the padding
        tl.store(ez_ptr + slot, tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1), mask=row_ok)


# Hopper wants >= 64 x 128 tiles for its tensor-core instructions; each config is tried once per (D, V).
_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=8), num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                     (64, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]]
_TUNED = {}  # size class of N -> its autotuner


def _tuned_for(n):
    """The autotuned kernel for N's size class (up to 1,024 rows, up to 4,096, more): N is not in the key, so
    that a micro-batch of another length does not autotune anew, but the tiles that suit 256 rows are not those
    that suit 8,192, so each class chooses its own. Compiled kernels are shared between the classes."""
    size = 0 if n <= 1024 else 1 if n <= 4096 else 2
    if size not in _TUNED:  # restore_value: a config that writes fewer slots leaves no other config's values
        _TUNED[size] = triton.autotune(_CONFIGS, key=["D", "V", "WITH_ENTROPY", "FP32_DOT"],
                                       restore_value=["m_ptr", "s_ptr", "ez_ptr"])(_lse_partials_kernel)
    return _TUNED[size]
INTERPRETER_BLOCKS = (16, 128, 32)  # (BLOCK_N, BLOCK_V, BLOCK_D) under TRITON_INTERPRET=1: small and quick


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_forward(hidden, weight, targets, temperature, with_entropy, blocks=None):
    """The 2-D grid kernel -> logp (N,), entropy (N,) or None; fp32. blocks (BLOCK_N, BLOCK_V, BLOCK_D) fixes the
    tiles (the interpreter, tests); None autotunes."""
    n, d = hidden.shape
    v = weight.shape[0]
    hidden, weight = hidden.to(weight.dtype).contiguous(), weight.contiguous()  # tl.dot takes one dtype
    slots = triton.cdiv(v, MIN_BLOCK_V)
    m = torch.full((n, slots), -float("inf"), dtype=torch.float32, device=hidden.device)
    s = torch.zeros(n, slots, dtype=torch.float32, device=hidden.device)
    ez = torch.zeros(n, slots, dtype=torch.float32, device=hidden.device) if with_entropy else s
    # fp32 inputs, and Triton's CPU interpreter (wrong bf16 arithmetic), take the fp32 dot
    fp32 = weight.dtype == torch.float32 or _interpreted()
    args = (hidden, weight, m, s, ez, n, d, v, 1.0 / temperature, hidden.stride(0), weight.stride(0), slots)
    if blocks is None and _interpreted():
        blocks = INTERPRETER_BLOCKS
    if blocks is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)
        _tuned_for(n)[grid](*args, WITH_ENTROPY=with_entropy, FP32_DOT=fp32)
    else:
        bn, bv, bd = blocks
        assert bv % MIN_BLOCK_V == 0, "BLOCK_V must be a multiple of 128"
        _lse_partials_kernel[(triton.cdiv(n, bn) * triton.cdiv(v, bv),)](
            *args, WITH_ENTROPY=with_entropy, FP32_DOT=fp32, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=8)
    # merge: lse = M + log sum_j s_j e^(m_j - M); empty slots (m = -inf, s = 0) add nothing
    top = m.amax(1, keepdim=True)  # (N, 1)
    scale = torch.exp(m - top)  # (N, slots)
    total = (s * scale).sum(1)
    lse = top[:, 0] + total.log()
    # exact products, an fp32 sum, rounded as the tile's logits are
    z_target = (hidden.float() * weight[targets].float()).sum(-1).to(weight.dtype).float() / temperature
    entropy = lse - (ez * scale).sum(1) / total if with_entropy else None  # H = lse - E_p[z]
    return z_target - lse, entropy


@triton.jit
def _softmax_rows_kernel(
    z_ptr,  # in/out: a chunk's logits (rows, V) in the matmul's dtype; overwritten with p = softmax(z / T)
    t_ptr,  # targets (rows,) int64
    logp_ptr,  # out: (rows,) fp32 log-probs of the targets
    ent_ptr,  # out: (rows,) fp32 entropy (WITH_ENTROPY only)
    V, stride_z, inv_temp,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # one program per row (Liger-Kernel's in-place softmax): an online logsumexp over the row, then p written
    # over z, so the gradient's p @ W reads it straight back, and no fp32 copy of the chunk is ever made
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z  # int64: rows * V passes 2^31 in big chunks
    m = tl.zeros([], tl.float32) - float("inf")  # running max
    s = tl.zeros([], tl.float32)  # running sum of e^(z - m)
    ez = tl.zeros([], tl.float32)  # running sum of e^(z - m) z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        r = tl.exp(m - m_new)  # sums so far were taken against m
        e = tl.exp(z - m_new)  # 0 on padding
        s = s * r + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            ez = ez * r + tl.sum(e * tl.where(ok, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(base + tl.load(t_ptr + row)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_t - lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, lse - ez / s)  # H = lse - E_p[z]
    # every warp has read z_t before any writes p over it: without the barrier, a warp that owns the target's
    # column may store p[t] before another's load of z_t is served
    tl.debug_barrier()
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
        tl.store(base + cols, tl.exp(z - lse).to(z_ptr.dtype.element_ty), mask=ok)


def _triton_sweep(hidden, weight, targets, temperature, with_entropy, need_grad, blocks=None):
    """-> logp (N,), entropy (N,) or None, dlogp_dh (N, D) or None; fp32. Without a gradient: the 2-D grid
    kernel (2NDV flops, nothing of size V kept). With one: rows in chunks, the logits by a matmul (cuBLAS),
    the in-place softmax kernel, then (w_t - p W) / T by a second matmul (4NDV flops in all)."""
    if not need_grad:
        logp, entropy = _triton_forward(hidden, weight, targets, temperature, with_entropy, blocks)
        return logp, entropy, None
    n, d = hidden.shape
    v = weight.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else logp
    dlogp_dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device)
    rows = _rows_per_chunk(v)
    for r0 in range(0, n, rows):
        h, t = hidden[r0:r0 + rows].to(weight.dtype), targets[r0:r0 + rows].contiguous()
        z = h @ weight.T  # (k, V) in the weights' dtype, fp32 accumulation inside cuBLAS
        _softmax_rows_kernel[(len(t),)](z, t, logp[r0:], entropy[r0:], v, z.stride(0), 1.0 / temperature,
                                        WITH_ENTROPY=with_entropy, BLOCK_V=softmax_block(v),
                                        num_warps=SOFTMAX_WARPS)
        dlogp_dh[r0:r0 + rows] = (weight[t].float() - (z @ weight).float()) / temperature  # z now holds p
        del z  # before the next chunk's logits are allocated
    return logp, entropy if with_entropy else None, dlogp_dh


# ---------------------------------------------------------------- autograd and the public functions

class _SelectiveLogprobs(torch.autograd.Function):
    """Both paths compute the gradient with the forward (it does not depend on the upstream gradient), so the
    backward is one multiply."""

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
        return (grad_logp[:, None] * dlogp_dh).to(ctx.hidden_dtype), None, None, None, None, None, None


def _apply(hidden, weight, targets, temperature, with_entropy, sweep):
    # ctx.needs_input_grad stays True under torch.no_grad(); ask the grad mode, so reference log-probs
    # (computed under no_grad) skip the gradient entirely
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _SelectiveLogprobs.apply(hidden, weight.detach(), targets, float(temperature), with_entropy, sweep,
                                    need_grad)


def selective_logprobs_chunked(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """hidden (N, D), weight (V, D) frozen, targets (N,) -> logp (N,) float32 [, entropy (N,)]. Torch ops."""
    return _apply(hidden, weight, targets, temperature, with_entropy, _torch_sweep)


def selective_logprobs_triton(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """The same with Triton kernels (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)."""
    return _apply(hidden, weight, targets, temperature, with_entropy, _triton_sweep)
