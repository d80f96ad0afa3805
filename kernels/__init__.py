"""Kernel dispatch. Each op has a torch path (CPU, and any device) and, where written, a Triton kernel.

KERNELS=auto (default): Triton on CUDA tensors, torch elsewhere. KERNELS=ref: always torch.
KERNELS=triton: always Triton (on CPU tensors this needs TRITON_INTERPRET=1; the tests use it).
"""
import os

from .crop_resample import crop_resample_ref
from .logprobs import selective_logprobs_chunked


def _mode():
    return os.environ.get("KERNELS", "auto")


def _triton_for(t):
    mode = _mode()
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"KERNELS={mode!r}: expected auto, ref or triton")
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def crop_resample(image, boxes, out_hw):
    """uint8 (H, W, 3) image, (K, 4) boxes, K output sizes -> float32 pixel_values (sum N_k, 1176)."""
    if _triton_for(image):
        try:
            from .crop_resample import crop_resample_triton
        except ImportError:  # no Triton kernel in this build: the reference is exact, only slower
            return crop_resample_ref(image, boxes, out_hw)
        return crop_resample_triton(image, boxes, out_hw)
    return crop_resample_ref(image, boxes, out_hw)


def selective_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """log softmax(hidden @ weight.T / T)[targets] without materialising (N, V) logits; differentiable in
    `hidden`. With `with_entropy`, also returns the per-token entropy (no gradient)."""
    if _triton_for(hidden):
        try:
            from .logprobs import selective_logprobs_triton
        except ImportError:
            return selective_logprobs_chunked(hidden, weight, targets, temperature, with_entropy)
        return selective_logprobs_triton(hidden, weight, targets, temperature, with_entropy)
    return selective_logprobs_chunked(hidden, weight, targets, temperature, with_entropy)
