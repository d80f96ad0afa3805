"""Kernel dispatch. Each op has a torch path (CPU, and any device) and a Triton kernel, one file per op:
resample.py (crop + resample + normalise + patchify) and logprobs.py (selective log-probs).

KERNELS=auto (default): the torch path, except on a GPU where `bench.py` (or `make gpu-check`) measured the
kernel faster than the torch path on this card: a kernel earns its place by measurement, never by device
type. The measurements live in runs/kernel_choice.json (per card name, per op; KERNEL_CHOICE= names
another file). KERNELS=ref: always torch. KERNELS=triton: Triton for every CUDA tensor, and for CPU tensors
under TRITON_INTERPRET=1 (the tests); a CPU tensor without the interpreter (warmstart's images on a GPU box)
takes the torch path, which is all that can run it.

The name: run from the repository root, `import kernels` finds this folder before Hugging Face's `kernels`
package (the kernel hub client) when that is installed, and transformers and bitsandbytes import that
package by name. So names this package does not define are looked up in the installed distribution
(`__getattr__` below): with it installed, `from kernels import get_kernel` gets the real one; without it,
the import fails as it would anyway, and those libraries fall back quietly.
"""
import functools
import importlib.metadata
import importlib.util
import json
import os
import sys

import torch

from . import logprobs, resample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def choice_file():
    return os.environ.get("KERNEL_CHOICE", os.path.join(ROOT, "runs", "kernel_choice.json"))


@functools.lru_cache(maxsize=None)
def _measured(path, mtime):
    """{card name: {op: {"winner": "triton" | "torch", "seconds": ...}}} as bench.py wrote it (cached until the
    file changes)."""
    with open(path) as f:
        return json.load(f)


def measured(op, device):
    """What bench.py recorded for `op` on the card of `device` ({"winner": ..., "seconds": ..., and any variant
    it chose, such as the crop's "hpass"}), or {} when never measured."""
    path = choice_file()
    try:
        table = _measured(path, os.path.getmtime(path))
    except (OSError, ValueError):
        return {}
    card = table.get(torch.cuda.get_device_name(device)) if isinstance(table, dict) else None
    entry = card.get(op) if isinstance(card, dict) else None  # a hand-edited file may hold anything
    return entry if isinstance(entry, dict) else {}


def measured_winner(op, device):
    """"triton" or "torch" as measured for `op` on the card of `device`, or None when never measured."""
    return measured(op, device).get("winner")


def record_winner(op, winner, times, **chosen):
    """bench.py: remember which path won `op` on this card, with the times (seconds by path) it was judged on
    and the kernel's variants it chose (keyword arguments)."""
    path = choice_file()
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    card = table.get(torch.cuda.get_device_name())
    card = table[torch.cuda.get_device_name()] = card if isinstance(card, dict) else {}
    card[op] = dict(winner=winner, seconds=times, **chosen)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


def _use_triton(op, t):
    """Whether the Triton kernel of `op` (its file's name) should run for tensor t (else the torch path)."""
    mode = os.environ.get("KERNELS", "auto")
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"KERNELS={mode!r}: expected auto, ref or triton")
    if mode == "triton":
        return t.is_cuda or logprobs._interpreted()
    return mode == "auto" and t.is_cuda and measured_winner(op, t.device) == "triton"


def crop_resample(image, boxes, out_hw, out_dtype=torch.float32):
    """uint8 (H, W, 3) image, (K, 4) boxes, K output sizes -> pixel_values (sum N_k, 1176) in out_dtype."""
    if not _use_triton("resample", image):
        return resample.crop_resample_ref(image, boxes, out_hw, out_dtype)
    # the horizontal pass bench.py measured faster on this card (if this code still has it), else resample.HPASS
    hpass = measured("resample", image.device).get("hpass") if image.is_cuda else None
    return resample.crop_resample_triton(image, boxes, out_hw, out_dtype,
                                         hpass=hpass if hpass in resample.HPASSES else None)


def logprobs_op(op, dtype):
    """The name a log-prob path's measurement is kept under: "logprobs:bfloat16", "logprobs_nograd:float32"
    (dtype: a torch dtype, or its name)."""
    return f"{op}:{str(dtype).removeprefix('torch.')}"


def selective_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """log softmax(hidden @ weight.T / T)[targets] without materialising (N, V) logits; differentiable in
    `hidden`. With `with_entropy`, also returns the per-token entropy (no gradient). With a gradient and without
    one (reference and old-policy log-probs) the kernels differ, so each is measured and chosen on its own, and
    per dtype: bench.py measures the bf16 head, so an fp32 one takes the torch path unless measured too."""
    op = "logprobs" if torch.is_grad_enabled() and hidden.requires_grad else "logprobs_nograd"
    op = logprobs_op(op, weight.dtype)
    fn = logprobs.selective_logprobs_triton if _use_triton(op, hidden) else logprobs.selective_logprobs_chunked
    return fn(hidden, weight, targets, temperature, with_entropy)


# ---------------------------------------------------------------- the installed `kernels` distribution

_HUB_NAME = __name__ + "._installed"


def _installed():
    """Hugging Face's `kernels` package when it is installed (loaded under another name), else None."""
    if _HUB_NAME in sys.modules:
        return sys.modules[_HUB_NAME]
    try:
        init = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not os.path.isfile(init):
        return None
    # its own absolute imports (`from kernels.utils import ...`) resolve through this package: let them
    # find its submodules by searching its folder after ours
    __path__.append(os.path.dirname(str(init)))
    spec = importlib.util.spec_from_file_location(_HUB_NAME, init, submodule_search_locations=[os.path.dirname(str(init))])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_HUB_NAME] = module
    spec.loader.exec_module(module)
    return module


def __getattr__(name):
    real = None if name.startswith("__") else _installed()
    if real is None or not hasattr(real, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(real, name)
