"""Speed and memory of the hot paths against their baselines, one table per command.

    python bench.py crop       # 8 crops of a 7680x4320 original: transformers' processor, torch, the kernel
    python bench.py logprobs   # token log-probs at Qwen2.5-VL-7B's head: naive (in the inputs' dtype), chunked
                               # torch (Liger-style), the Triton kernel, liger-kernel itself when installed
    python bench.py rollout [--model tiny-7b|DIR]  # the rollout's engines, and its decode step vs the model's
                                                   # (tiny-7b: 7B's shape, random, NF4 with bitsandbytes)

Ratios are against the baseline measured in the same run. On a GPU, `crop` and `logprobs` record in
runs/kernel_choice.json which path won on this card, and KERNELS=auto follows it. Results go in
BENCHMARKS.md with the machine, the commit and the date.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import time

import torch


def _time(fn, repeat=3):
    """Best of `repeat` runs after a warm-up, in seconds (the minimum is the least noisy on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        _table_row(r)


def _table_row(r):
    print("| " + " | ".join(str(c) for c in r) + " |", flush=True)


def bench_crop():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import crop
    import data
    import kernels
    from kernels import resample
    from kernels.resample import crop_resample_ref, crop_resample_triton, plan

    W, H = 7680, 4320
    image = data._draw(W, H, [4000, 2000, 4096, 2030], "word", "violin", __import__("random").Random(0))
    boxes = [(0, 0, W, H), (100, 200, 2100, 1400), (3000, 1000, 3900, 1500), (5000, 3000, 5400, 3300),
             (10, 10, 200, 120), (6000, 100, 7680, 4320), (2500, 2500, 2560, 2540), (1000, 1000, 4000, 4000)]
    budget = crop.tokens_to_pixels(1024)
    proc = Qwen2VLImageProcessorPil(min_pixels=crop.MIN_PIXELS, max_pixels=budget)
    out_hw = [crop.smart_resize(y2 - y1, x2 - x1, max_pixels=budget) for x1, y1, x2, y2 in boxes]
    box_t = torch.tensor(boxes, dtype=torch.float32)
    img = crop.to_uint8(image)

    def processor():
        return [proc(images=[image.crop(b)], return_tensors="pt")["pixel_values"] for b in boxes]

    n = len(boxes)
    t_proc = _time(processor)
    times = dict(reference_cpu=_time(lambda: crop_resample_ref(img, box_t, out_hw)))
    header = ["path", "ms per crop", "crops/s", "speed-up vs processor"]
    rows = [("transformers processor (PIL)", t_proc), ("torch reference (CPU)", times["reference_cpu"])]
    if torch.cuda.is_available():  # both paths on the same GPU: the kernel must beat torch there, not the CPU
        img_gpu = img.cuda()
        times["reference"] = _time(lambda: crop_resample_ref(img_gpu, box_t, out_hw))
        rows.append(("torch reference (CUDA)", times["reference"]))
        for h in sorted(resample.HPASSES, key=lambda h: h != resample.HPASS):  # each horizontal pass, default first
            times[f"triton_{h}"] = _time(lambda: crop_resample_triton(img_gpu, box_t, out_hw, hpass=h))
            rows.append((f"kernels/resample.py Triton, {h} h-pass (CUDA)", times[f"triton_{h}"]))
        # KERNELS=auto takes the kernel with its faster h-pass when that beats torch on this card
        fastest = min(resample.HPASSES, key=lambda h: times[f"triton_{h}"])
        won = times[f"triton_{fastest}"] < times["reference"]
        kernels.record_winner("resample", "triton" if won else "torch", times, hpass=fastest)
    table = [(name, f"{1e3 * s / n:.2f}", f"{n / s:.1f}", f"{t_proc / s:.1f}") for name, s in rows]
    if torch.cuda.is_available():
        # the least traffic possible: each crop's uint8 pixels read once, the fp32 patch tensor written once
        moved = sum((x2 - x1) * (y2 - y1) * 3 for x1, y1, x2, y2 in boxes) + sum(h * w for h, w in out_hw) * 6 * 4
        bw = _card_spec(0)
        header += ["vs torch on this GPU", "GB/s", "of memory bandwidth"]
        table = [r + ((f"{times['reference'] / s:.2f}", f"{moved / s / 1e9:.0f}",
                       f"{100 * moved / s / 1e9 / bw:.0f}% of {bw} GB/s" if bw else "-") if "CUDA" in name else
                      ("", "", "")) for r, (name, s) in zip(table, rows)]
    # the kernel's host side, on any machine: what it computes before its launches (100 calls, best of 3)
    host = _time(lambda: [plan(box_t, out_hw) for _ in range(100)]) / 100
    print(f"crop: {W}x{H} original, {n} crops, crop budget 1024 tokens"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
          + f"; the kernel's host side (resample.plan): {1e3 * host:.3f} ms a call")
    _table(header, table)
    return header, table


def _naive_low(hidden, weight, targets, temperature=1.0):
    """What plain torch does: the logits in the inputs' dtype (bf16 on a GPU), log_softmax in fp32."""
    return torch.log_softmax((hidden @ weight.T).float() / temperature, -1).gather(-1, targets[:, None])[:, 0]


def _liger(hidden, weight, targets, temperature=1.0):
    """liger-kernel's fused linear cross-entropy, per token (an optional dependency: pip install liger-kernel)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets)


def _logprobs_child(method, n, d, v, device, dtype):
    """Runs in a subprocess: peak memory beyond the inputs and time of forward + backward."""
    from kernels import logprobs as lp

    # drawn on the device: the 7B head is 545 M numbers, ~10 s to draw and convert on a few CPU cores, per child
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g, device=device) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    grad = not method.endswith(" nograd") and method != "matmul"  # "chunked nograd": the forward alone, no_grad
    method = method.removesuffix(" nograd")
    if method.startswith("triton "):  # the Triton path with another config: "triton BLOCKxWARPS" (the softmax
        config = method.split()[1]    # kernel's columns per program and warps) or "triton rows=R" (rows per chunk)
        if config.startswith("rows="):
            lp.CHUNK_ELEMENTS = int(config[5:]) * v
        else:
            lp.SOFTMAX_BLOCK, lp.SOFTMAX_WARPS = map(int, config.split("x"))
        method = "triton"
    fn = dict(naive=_naive_low, chunked=lp.selective_logprobs_chunked, triton=lp.selective_logprobs_triton,
              liger=_liger, matmul=lambda h, w, t: h @ w.T)[method]  # matmul: the logits alone, cuBLAS's rate

    def run():
        if not grad:
            with torch.no_grad():
                return fn(hidden, weight, targets)
        hidden.grad = None
        fn(hidden, weight, targets).sum().backward()

    if device == "cuda":  # compiled and autotuned first: the autotuner's buffers are not the path's memory
        run()
        hidden.grad = None
        torch.cuda.synchronize()
    base = _rss() if device == "cpu" else torch.cuda.memory_allocated()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # reset the kernel's peak-RSS counter (VmHWM), which the inputs' creation already raised
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    t = _time(run, repeat=2)
    peak = (_peak_rss() if device == "cpu" else torch.cuda.max_memory_allocated()) - base
    return dict(seconds=t, peak_gb=peak / 1e9)


def _rss():
    return _status_kb("VmRSS") * 1024


def _peak_rss():
    return _status_kb("VmHWM") * 1024


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# vendor data sheets: memory bandwidth (GB/s) and dense bf16 tensor-core peak (TFLOP/s)
CARDS = {"H200": (4800, 989), "H100": (3350, 989), "A100": (2039, 312), "L40S": (864, 362), "4090": (1008, 165)}


def _card_spec(which):
    """which = 0: memory bandwidth in GB/s; 1: bf16 peak in TFLOP/s; None for an unknown card."""
    name = torch.cuda.get_device_name()
    return next((spec[which] for key, spec in CARDS.items() if key in name), None)


SOFTMAX_CONFIGS = [(4096, 8), (8192, 8), (16384, 16)]  # besides kernels.logprobs' own (16384, 8)
# rows per chunk of the gradient path, besides kernels.logprobs' own (CHUNK_ELEMENTS / V: 441 at Qwen's V): whole
# 128-row tiles of the logits matmul, and twice as many (its bf16 logits then take what the torch path's fp32 do)
CHUNK_ROWS = [512, 1024]


def bench_logprobs(sizes=None):
    import importlib.util

    import kernels

    d, v = 3584, 152064  # Qwen2.5-VL-7B's head
    cuda = torch.cuda.is_available()
    sizes = sizes or ([2048, 8192, 16384] if cuda else [512, 1024])
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    # on a GPU, "matmul" first: h W^T alone (cuBLAS, 2NDV), whose rate on this card sets the measured floor
    methods = (["matmul"] if cuda else []) + ["naive", "chunked"] + (["triton"] if cuda else [])
    if cuda and importlib.util.find_spec("liger_kernel"):
        methods.append("liger")
    elif cuda:
        print("liger-kernel is not installed (pip install liger-kernel): its row is left out")
    peak = _card_spec(1) if cuda else None
    # the caption and header first, then each row as soon as it is measured: a run stopped by a time limit
    # (make gpu-check's) keeps the rows it finished, and the choice from the N's it finished
    print(f"logprobs: D={d}, V={v}, {device} {dtype}, forward + gradient in the hidden states (4NDV flops; "
          "'nograd' rows: the forward alone under no_grad, 2NDV)"
          + (f", {torch.cuda.get_device_name()}; the floor: the row's flops at the rate cuBLAS reached on h W^T "
             "alone at the same N (the 'matmul' row)" if cuda else "")
          + (f", and at the card's bf16 dense peak, {peak} TFLOP/s" if peak else ""))
    _table(["path", "N", "peak GB beyond inputs", "ms", "TFLOP/s", "memory: naive / this", "time: this / naive"]
           + (["time / floor (cuBLAS)"] if cuda else []) + (["time / floor (peak)"] if peak else []), [])
    res, failed = {n: {} for n in sizes}, []

    def measure(method, n):
        """One path at one N, in a process of its own; its row printed at once (matmul and naive, which the
        others are set against, run first at each N)."""
        out = subprocess.run([sys.executable, __file__, "_logprobs", method, str(n), device, dtype],
                             capture_output=True, text=True)
        if out.returncode != 0:
            err = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
            failed.append(f"{method} N={n}: failed ({err})")
            return
        r = res[n][method] = json.loads(out.stdout.strip().splitlines()[-1])
        base, rate = res[n].get("naive"), res[n].get("matmul")
        rate = 2 * n * d * v / rate["seconds"] if rate else None  # flop/s cuBLAS reached on the logits product
        forward_only = method.endswith(" nograd") or method == "matmul"
        flops = (2 if forward_only else 4) * n * d * v  # the forward 2NDV, the gradient 2NDV more
        vs = base if base and not forward_only else None  # naive has a gradient: no comparison
        _table_row((method, n, f"{r['peak_gb']:.3f}", f"{1e3 * r['seconds']:.1f}", f"{flops / r['seconds'] / 1e12:.1f}",
                    f"{vs['peak_gb'] / max(r['peak_gb'], 1e-9):.1f}" if vs else "-",
                    f"{r['seconds'] / vs['seconds']:.2f}" if vs else "-")
                   + ((f"{r['seconds'] * rate / flops:.2f}" if rate else "-",) if cuda else ())
                   + ((f"{r['seconds'] * peak * 1e12 / flops:.2f}",) if peak else ()))

    faster = lambda t: "triton" in t and "chunked" in t and t["triton"] < t["chunked"]  # noqa: E731
    for i, n in enumerate(sizes):
        for method in methods:
            measure(method, n)
        if cuda:  # the kernel replaces the torch path (chunked) only where it won at every size measured (an N
            # where either failed is no win); recorded after each N, so that a run stopped later keeps the choice
            times = {str(k): {m: r["seconds"] for m, r in res[k].items() if m in methods} for k in sizes[:i + 1]}
            kernels.record_winner(kernels.logprobs_op("logprobs", dtype),
                                  "triton" if all(faster(t) for t in times.values()) else "torch", times)
    if cuda:  # at the largest N, after every N's choice: the softmax kernel's other configs (columns per program
        # x warps; the default is the plain "triton" row) and other chunk sizes, so a GPU run says which to keep
        # (they take no part in the choice); and both paths without a gradient (reference log-probs), a choice
        # of their own, "logprobs_nograd"
        n = max(sizes)
        for method in ([f"triton {b}x{w}" for b, w in SOFTMAX_CONFIGS] + [f"triton rows={r}" for r in CHUNK_ROWS]
                       + ["chunked nograd", "triton nograd"]):
            measure(method, n)
        nograd = {m.split()[0]: r["seconds"] for m, r in res[n].items() if m.endswith(" nograd")}
        if nograd:
            kernels.record_winner(kernels.logprobs_op("logprobs_nograd", dtype), "triton" if faster(nograd) else "torch",
                                  {str(n): nograd})
    if failed:
        print("\n".join(failed))


TINY_7B_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "tiny-7b")  # saved once, like a checkpoint


def tiny_7b():
    """What `--model tiny-7b` loads: with bitsandbytes, the 7B-shaped random model saved to disk once and loaded
    like a downloaded checkpoint, in NF4 + LoRA as a real run loads Qwen2.5-VL-7B; without it, built in bf16."""
    import importlib.util

    import model

    if importlib.util.find_spec("bitsandbytes") is None:
        print("bitsandbytes is not installed: tiny-7b runs in bf16, not NF4")
        return "tiny-7b"
    if not os.path.exists(TINY_7B_DIR):  # written beside, then renamed: a killed save leaves no half a model
        part = TINY_7B_DIR + ".part"
        shutil.rmtree(part, ignore_errors=True)
        m, tok = model.build_tiny(shape="7b", dtype=torch.bfloat16, device="cuda")
        m.save_pretrained(part)
        tok.save_pretrained(part)
        del m
        gc.collect()  # the model holds reference cycles: without this its 16 GB stay on the GPU
        torch.cuda.empty_cache()
        os.replace(part, TINY_7B_DIR)
    return TINY_7B_DIR


def bench_rollout(models=None):
    import model

    for name in models or (["tiny"] + (["tiny-7b"] if torch.cuda.is_available() else [])):
        name = tiny_7b() if name == "tiny-7b" and torch.cuda.is_available() else name
        policy = model.load_policy(name)
        # the decode table first: it holds the GPU targets, and a check stopped by its time limit keeps what ran
        _bench_decode(policy, name, [16, 64] if torch.cuda.is_available() else [8])
        _bench_engines(policy, name)


def _describe(policy, name):
    """The model in words (the fix for a table once labelled "the tiny model" whatever it ran)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if name == "tiny":
        return f"the tiny model, fp32 ({device})"
    weights = "NF4" if any("4bit" in type(m).__name__ for m in policy.model.modules()) else \
        str(policy.head.weight.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    what = f"{name} (Qwen2.5-VL-7B's shape, random weights)" if "tiny" in name else name
    return f"{what}, {weights} + LoRA ({device})"


def _bench_engines(policy, name):
    import data
    import decode
    from rollout import RolloutConfig, rollout

    samples = data.synthetic(1, seed=0)
    # a random model seldom calls the tool, so the episodes are teacher-forced: think, crop, crop, answer; the
    # rows think for different lengths, so that their tool turns fall on different steps, as a policy's do
    call = '<think>{}</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
    scripts = [policy.encode(call.format("zoom " * (1 + 3 * k), "[40, 60, 200, 180]")
                             + call.format("zoom", "[100, 100, 160, 140]")
                             + "<think>done</think><answer>B</answer><|im_end|>") for k in range(8)]

    def forcing():  # each row its script, by the order the rows are first seen in a rollout call
        rows = {}

        def force(ep):
            script, k = scripts[rows.setdefault(id(ep), len(rows)) % len(scripts)], ep.num_generated
            return script[k] if k < len(script) else None

        return force

    print(f"rollout engines: {_describe(policy, name)}, group of 8, global image 1,024 tokens, 3 turns "
          f"(2 crops of 256 tokens, the first at a different step in each row); graph captures per rollout, "
          f"included in its time")
    _table(["engine", "episodes", "tokens written", "tokens/s", "s per episode", "graph captures", "speed-up"], [])
    base = None  # the first engine's tokens/s
    wait = RolloutConfig.tool_wait
    for engine, reuse, tool_wait in (("re-run each turn (generate-style)", False, wait),
                                     ("KV cache kept, each tool turn run at once", True, 0),
                                     (f"KV cache kept, tool turns waiting up to {wait} steps for others", True, wait)):
        cfg = RolloutConfig(group_size=8, max_turns=3, max_turn_tokens=128, max_response_tokens=4096,
                            global_tokens=1024, crop_tokens=256, reuse_cache=reuse, tool_wait=tool_wait)
        rollout(policy, samples, cfg, force=forcing())  # warm-up
        dt, runs, captures = float("inf"), 3 if name == "tiny" else 1, decode.counters["captures"]
        for _ in range(runs):  # best of 3 where a run is cheap: timings are noisy
            t = time.perf_counter()
            eps = rollout(policy, samples, cfg, force=forcing())
            dt = min(dt, time.perf_counter() - t)
        written = sum(e.num_generated for e in eps)
        captures = (decode.counters["captures"] - captures) / runs
        base = base or written / dt
        _table_row([engine, len(eps), written, f"{written / dt:.1f}", f"{dt / len(eps):.3f}", f"{captures:g}",
                    f"{written / dt / base:.2f}"])


def _bench_decode(policy, name, batch_sizes, new_tokens=64):
    """Free sampling (no tool turns) of `new_tokens` per row at each batch size, on HF's dynamic cache and on the
    static path (decode.py: CUDA graphs on a GPU, eager on a CPU), against the bare model's decode forward at
    the same batch and context (what the rollout adds: sampling, bookkeeping, the head). tokens/s is the whole
    rollout's, prefill and graph captures included; ms per step leaves out both (the prompts' admission, rows
    built and prefilled, timed in the rollout itself; captures are a one-off cost per shape of the static
    cache), each shown beside it."""
    print(f"rollout decode: {_describe(policy, name)}, global image 1,024 tokens, {new_tokens} sampled tokens per "
          f"row; tokens/s over the whole rollout (prefill and captures included), ms per step without either")
    # every row writes its tokens, with no tool turn: a random model's draws never end a turn here
    banned = policy.banned
    policy.banned = banned + [policy.im_end, policy.end_of_text, policy.tool_call_end]
    try:
        _decode_rows(policy, batch_sizes, new_tokens)
    finally:
        policy.banned = banned


def _decode_rows(policy, batch_sizes, new_tokens):
    import data
    import decode
    import rollout as engine
    from rollout import RolloutConfig, _forward, _new_rows, _prefill, rollout

    _table(["rows", "decode", "tokens written", "tokens/s", "prefill s", "ms per step", "graph captures",
            "bare model ms per step", "step / bare"], [])  # each row printed as it is measured: a run stopped by a
    # time limit keeps them
    for b in batch_sizes:
        samples = data.synthetic(max(1, b // 8), seed=1)
        # the bare model: the same rows prefilled, then one-token forwards with no sampling around them
        cfg = RolloutConfig(group_size=min(8, b), rollout_rows=b, max_turn_tokens=new_tokens,
                            max_response_tokens=new_tokens, global_tokens=1024)
        with torch.no_grad():
            batch = _prefill(policy, [r for p, s in enumerate(samples) for r in _new_rows(policy, p, s, cfg, 0)],
                             cfg.group_size)

            def step():
                for r in batch.live:  # a forward empties the queues it feeds
                    r.pending = [policy.pad]
                _, batch.cache, batch.mask_hist = _forward(policy, batch.live, batch.cache, batch.mask_hist)

            bare = _time(step, repeat=5)
        batch = step = None  # the bare run's cache goes before the rollouts
        for mode in ("dynamic", "graphs" if torch.cuda.is_available() else "static"):
            cfg = dataclasses.replace(cfg, decode=mode)
            rollout(policy, samples, cfg)  # warm-up: kernels compiled and autotuned at these shapes
            _sync()
            before = dict(decode.counters)
            admission = [0.0]  # seconds building and prefilling rows: not a decode step
            t = time.perf_counter()
            with _timed(engine, "_new_rows", admission), _timed(engine, "_prefill", admission):
                eps = rollout(policy, samples, cfg)
            _sync()
            dt = time.perf_counter() - t
            captures = decode.counters["captures"] - before["captures"]
            capture_s = decode.counters["capture_seconds"] - before["capture_seconds"]
            written = sum(e.num_generated for e in eps)
            steps = max(e.num_generated for e in eps)
            step = (dt - admission[0] - capture_s) / steps
            if mode == "graphs" and decode.graphs_failed:  # then its steps ran eagerly: the row says so
                mode = "graphs (capture failed: eager static)"
            _table_row((len(eps), mode, written, f"{written / dt:.1f}", f"{admission[0]:.2f}", f"{1e3 * step:.1f}",
                        f"{captures} ({capture_s:.2f} s)", f"{1e3 * bare:.1f}", f"{step / bare:.2f}"))


@contextlib.contextmanager
def _timed(module, name, total):
    """module.name wrapped while inside: its calls' seconds (the device synchronised around each) add to total[0]."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        _sync()
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _sync()
            total[0] += time.perf_counter() - t

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, real)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_logprobs":
        _, _, method, n, device, dtype = sys.argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(_logprobs_child(method, int(n), 3584, 152064, device, getattr(torch, dtype))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["crop", "logprobs", "rollout"], help="which benchmark")
    ap.add_argument("--sizes", default="", help="logprobs: token counts N, comma-separated")
    ap.add_argument("--model", action="append", help="rollout: tiny, tiny-7b or a model folder (repeatable)")
    args = ap.parse_args()
    if args.what == "crop":
        bench_crop()
    elif args.what == "logprobs":
        bench_logprobs([int(n) for n in args.sizes.split(",") if n])
    else:
        bench_rollout(args.model)


if __name__ == "__main__":
    main()
