"""Every Triton kernel compiled for GPUs this machine does not have, and what the compiler made of each.

Triton's CPU interpreter runs a kernel's Python, not its compiler: a kernel can pass every interpreted test
and still fail to compile, spill registers or miss the tensor cores on a GPU. Triton compiles ahead of time
for any CUDA target with the ptxas it ships, so this checks on CPU, in seconds, what only a GPU run would
show otherwise. Each kernel is compiled at the shapes it meets in a real run (the 7B head; bench.py's 8 crops
of an 8K image) with the specialisation Triton's launcher gives those arguments, and each of the log-prob
kernel's autotune configs is compiled. Speed is not checked here: only `make gpu-check` measures that.

    python -m kernels.aot [--arch 90 89 80] [--json]   # a table per target: registers, spills, shared memory, ...

tests/test_kernel_compile.py asserts on the same facts. It runs this in a process of its own: under
TRITON_INTERPRET=1 (the CPU tests) `triton.jit` gives interpreted functions, which do not compile.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import logprobs, resample

# CUDA compute capability -> (a card of it, the most shared memory one block may use, bytes)
ARCHS = {90: ("H100", 227 * 1024), 89: ("L4 / RTX 4090", 99 * 1024), 80: ("A100", 163 * 1024)}
D, V, N = 3584, 152064, 8192  # Qwen2.5-VL-7B's hidden size and vocabulary; bench.py's rows
_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}


def compile_for(kernel, args, constexprs, arch, num_warps=4, num_stages=3):
    """`kernel` compiled for compute capability `arch`. args: the value of each runtime argument, a tensor
    given by its dtype. Specialised as Triton's launcher would for such values: tensors 16-byte aligned (torch
    allocations are), and ints divisible by 16 marked so, which is what lets Triton vectorise and pipeline."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + _TYPES[value]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
        if isinstance(value, torch.dtype) or (isinstance(value, int) and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def facts(compiled):
    """What a compiled kernel uses: registers and local memory (spills) per thread from cuobjdump, shared
    memory per block, whether its matrix products run on tensor cores (wgmma on Hopper, mma before) and
    whether its loads are pipelined (async copies into shared memory)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, local = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "LOCAL"))
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return dict(regs=regs, spill_bytes=local, shared=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                mma="mma.sync" in ptx, pipelined="async_copy_global_to_local" in ttgir)


def cases():
    """(label, kernel, runtime args, constexprs, num_warps, num_stages): every kernel as a real run launches it."""
    lse = dict(h_ptr=torch.bfloat16, w_ptr=torch.bfloat16, m_ptr=torch.float32, s_ptr=torch.float32,
               ez_ptr=torch.float32, N=N, D=D, V=V, inv_temp=1.0, stride_h=D, stride_w=D,
               NUM_SLOTS=triton.cdiv(V, logprobs.MIN_BLOCK_V))
    for c in logprobs._CONFIGS:  # what the autotuner chooses among, on bf16 weights
        tile = "x".join(str(c.kwargs[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
        yield (f"lse partials {tile}", logprobs._lse_partials_kernel, lse,
               dict(WITH_ENTROPY=True, FP32_DOT=False, **c.kwargs), c.num_warps, c.num_stages)
    softmax = dict(z_ptr=torch.bfloat16, t_ptr=torch.int64, logp_ptr=torch.float32, ent_ptr=torch.float32, V=V,
                   stride_z=V, inv_temp=1.0)
    yield ("softmax rows", logprobs._softmax_rows_kernel, softmax,
           dict(WITH_ENTROPY=True, BLOCK_V=logprobs.softmax_block(V)), logprobs.SOFTMAX_WARPS, 3)
    hpass = dict(img_ptr=torch.uint8, mid_ptr=torch.float32, rec_ptr=torch.int64, K=8, W=7680)
    for name, (kernel, tile) in resample.HPASSES.items():
        yield f"crop h-pass ({name})", kernel, hpass, dict(MAX_K=8, **tile), 4, 3
    vpass = dict(mid_ptr=torch.float32, out_ptr=torch.bfloat16, rec_ptr=torch.int64, K=8,
                 **{k: 1.0 for k in ("m0", "m1", "m2", "s0", "s1", "s2")})
    yield "crop v-pass", resample._vpass_kernel, vpass, dict(MAX_K=8, BLOCK=resample.VPASS_BLOCK), 4, 3


def survey(arch):
    """[(label, num_warps, num_stages, facts)] for every case, compiled for `arch`."""
    return [(label, w, s, facts(compile_for(kernel, args, const, arch, w, s)))
            for label, kernel, args, const, w, s in cases()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--json", action="store_true", help="one JSON object {arch: survey} instead of the tables")
    args = ap.parse_args()
    if args.json:
        print(json.dumps({arch: survey(arch) for arch in args.arch}))
        return
    for arch in args.arch:
        card, limit = ARCHS[arch]
        print(f"\nsm_{arch} ({card}; shared memory per block at most {limit // 1024} KB), "
              f"triton {triton.__version__}\n")
        print("| kernel | warps | stages | registers | spilled bytes | shared KB | tensor cores | pipelined |")
        print("|---|---|---|---|---|---|---|---|")
        for label, w, s, f in survey(arch):
            cores = "wgmma" if f["wgmma"] else "mma" if f["mma"] else "-"
            print(f"| {label} | {w} | {s} | {f['regs']} | {f['spill_bytes']} | {f['shared'] / 1024:.0f}"
                  f"{' (over)' if f['shared'] > limit else ''} | {cores} | {'yes' if f['pipelined'] else 'no'} |")


if __name__ == "__main__":
    main()
