"""Selective log-probs: log softmax(h W^T / T)[target] per token, without the (N, V) logits.

Qwen2.5-VL's vocabulary is 152,064: one 4,096-token sequence as fp32 logits is 2.5 GB. GRPO only needs the
log-prob of the sampled token, so we sweep the rows in chunks and keep at most (chunk, V) logits alive.

Gradient: d logp_n / d h_n = (w_{t_n} - sum_v p_nv w_v) / T. It does not depend on the upstream gradient,
so it is computed in the forward sweep (while the chunk's probabilities are at hand) and the backward is
one multiply: grad_h = grad_out[:, None] * dlogp_dh. The head is frozen under LoRA: no weight gradient.

`selective_logprobs_naive` (full logits, log_softmax + gather) is for tests and benchmarks only.
"""
import torch

CHUNK_ELEMENTS = 1 << 24  # chunk rows so a chunk's fp32 logits stay under ~64 MB


def selective_logprobs_naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden.float() @ weight.float().T) / temperature  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        n, v = hidden.shape[0], weight.shape[0]
        rows = max(1, CHUNK_ELEMENTS // v)
        need_grad = ctx.needs_input_grad[0]
        w = weight.float() if weight.dtype != torch.float32 else weight
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        dlogp_dh = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_grad else None
        for s in range(0, n, rows):
            h, t = hidden[s:s + rows].float(), targets[s:s + rows]
            z = h @ w.T  # (rows, V), the only large buffers are this one and p below
            if temperature != 1.0:
                z /= temperature
            lse = torch.logsumexp(z, -1)
            logp[s:s + rows] = z.gather(-1, t[:, None]).squeeze(-1) - lse
            if with_entropy or need_grad:
                z -= lse[:, None]  # in place: z is now log p
                p = z.exp()
                if with_entropy:  # H = -sum p log p, as a batched dot product (no third buffer)
                    entropy[s:s + rows] = -(p.unsqueeze(1) @ z.unsqueeze(2)).view(-1)
                if need_grad:
                    dlogp_dh[s:s + rows] = (w[t] - p @ w) / temperature
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
