"""Kernel dispatch. Each op has a torch path (CPU, and any device) and, where written, a Triton kernel.

KERNELS=auto (default): the torch path, except on a GPU where `bench.py` (or `make gpu-check`) measured the
kernel faster than the torch path on this card: a kernel earns its place by measurement, never by device
type. The measurements live in runs/kernel_choice.json (per card name, per op; KERNEL_CHOICE= names
another file). KERNELS=ref: always torch. KERNELS=triton: always Triton (on CPU tensors this needs
TRITON_INTERPRET=1; the tests use it).
"""
import functools
import importlib
import json
import os

import torch

from .crop_resample import crop_resample_ref
from .logprobs import selective_logprobs_chunked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def choice_file():
    return os.environ.get("KERNEL_CHOICE", os.path.join(ROOT, "runs", "kernel_choice.json"))


@functools.lru_cache(maxsize=None)
def _measured(path, mtime):
    """{card name: {op: "triton" | "torch", ...}} as bench.py wrote it (cached until the file changes)."""
    with open(path) as f:
        return json.load(f)


def measured_winner(op, device):
    """"triton" or "torch" as measured for `op` on the card of `device`, or None when never measured."""
    path = choice_file()
    try:
        table = _measured(path, os.path.getmtime(path))
    except (OSError, ValueError):
        return None
    entry = table.get(torch.cuda.get_device_name(device), {}).get(op)
    return entry.get("winner") if isinstance(entry, dict) else None


def record_winner(op, winner, times):
    """bench.py: remember which path won `op` on this card, with the times (seconds by path) it was judged on."""
    path = choice_file()
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table.setdefault(torch.cuda.get_device_name(), {})[op] = dict(winner=winner, seconds=times)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


def _triton(module, name, t):
    """The Triton function `name` of `module` when it should run for tensor t, else None (the torch path)."""
    mode = os.environ.get("KERNELS", "auto")
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"KERNELS={mode!r}: expected auto, ref or triton")
    if mode == "ref" or (mode == "auto" and not (t.is_cuda and measured_winner(module, t.device) == "triton")):
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
