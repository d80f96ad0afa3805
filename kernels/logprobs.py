"""Selective log-probs: log softmax(h W^T / T)[target] per token, without the (N, V) logits.

Qwen2.5-VL's vocabulary is 152,064: one 4,096-token sequence as fp32 logits is 2.5 GB. GRPO only needs the
log-prob of the sampled token, so we sweep the vocabulary in tiles with an online (running-max) logsumexp,
as flash-attention does over keys, and keep at most (rows, tile) logits alive. Each tile of the head is read
once per pass, so the time stays that of the two full matmuls of the naive path.

Gradient: d logp_n / d h_n = (w_{t_n} - sum_v p_nv w_v) / T. It does not depend on the upstream gradient,
so sum_v exp(z_nv - m_n) w_v is accumulated in the same sweep (rescaled when the running max m_n grows) and
the backward is one multiply: grad_h = grad_out[:, None] * dlogp_dh. The head is frozen under LoRA: no
weight gradient.

`selective_logprobs_naive` (full logits, log_softmax + gather) is for tests and benchmarks only.
"""
import torch

VOCAB_TILE = 2048  # vocabulary rows per tile: each tile of the head is read once
CHUNK_ELEMENTS = 1 << 24  # rows per pass = CHUNK_ELEMENTS / VOCAB_TILE, so a logit tile stays under 64 MB


def selective_logprobs_naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden.float() @ weight.float().T) / temperature  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        n, d = hidden.shape
        v = weight.shape[0]
        rows = max(1, CHUNK_ELEMENTS // VOCAB_TILE)
        need_grad = ctx.needs_input_grad[0]
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
        return grad_h, None, None, None, None


def selective_logprobs_chunked(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """hidden (N, D), weight (V, D) frozen, targets (N,) -> logp (N,) float32 [, entropy (N,)]."""
    return _ChunkedLogprobs.apply(hidden, weight.detach(), targets, float(temperature), with_entropy)
