"""Kernel dispatch. Each op has a torch path (CPU, and any device) and, where written, a Triton kernel.

KERNELS=auto (default): Triton on CUDA tensors, torch elsewhere. KERNELS=ref: always torch.
KERNELS=triton: always Triton (on CPU tensors this needs TRITON_INTERPRET=1; the tests use it).
"""
import importlib
import os

import torch

from .crop_resample import crop_resample_ref
from .logprobs import selective_logprobs_chunked


def _triton(module, name, t):
    """The Triton function `name` of `module` when it should run for tensor t, else None (the torch path).
    Until a kernel is written, auto falls back to torch and KERNELS=triton says so."""
    mode = os.environ.get("KERNELS", "auto")
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"KERNELS={mode!r}: expected auto, ref or triton")
    if mode == "ref" or (mode == "auto" and not t.is_cuda):
        return None
    fn = getattr(importlib.import_module(f".{module}", __name__), name, None)
    if fn is None and mode == "triton":
        raise NotImplementedError(f"KERNELS=triton: kernels/{module}.py has no Triton kernel yet")
    return fn


def crop_resample(image, boxes, out_hw, out_dtype=torch.float32):
    """uint8 (H, W, 3) image, (K, 4) boxes, K output sizes -> pixel_values (sum N_k, 1176) in out_dtype."""
    fn = _triton("crop_resample", "crop_resample_triton", image) or crop_resample_ref
    return fn(image, boxes, out_hw, out_dtype)


def selective_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """log softmax(hidden @ weight.T / T)[targets] without materialising (N, V) logits; differentiable in
    `hidden`. With `with_entropy`, also returns the per-token entropy (no gradient)."""
    fn = _triton("logprobs", "selective_logprobs_triton", hidden) or selective_logprobs_chunked
    return fn(hidden, weight, targets, temperature, with_entropy)
