"""Speed and memory of the hot paths against their baselines, one table per command.

    python bench.py crop       # 8 crops of a 7680x4320 original: transformers' processor vs ours
    python bench.py logprobs   # token log-probs at Qwen2.5-VL-7B's head: naive full logits vs chunked
    python bench.py rollout    # multi-turn rollout: KV cache kept across turns vs re-run each turn

Ratios are against the baseline measured in the same run. Results go in BENCHMARKS.md with the machine,
the commit and the date.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _time(fn, repeat=3):
    """Best of `repeat` runs after a warm-up, in seconds (the minimum is the least noisy on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def bench_crop():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import crop
    import data

    W, H = 7680, 4320
    image = data._draw(W, H, [4000, 2000, 4096, 2030], "word", "violin", __import__("random").Random(0))
    boxes = [(0, 0, W, H), (100, 200, 2100, 1400), (3000, 1000, 3900, 1500), (5000, 3000, 5400, 3300),
             (10, 10, 200, 120), (6000, 100, 7680, 4320), (2500, 2500, 2560, 2540), (1000, 1000, 4000, 4000)]
    budget = crop.tokens_to_pixels(1024)
    proc = Qwen2VLImageProcessorPil(min_pixels=crop.MIN_PIXELS, max_pixels=budget)

    def processor():
        return [proc(images=[image.crop(b)], return_tensors="pt")["pixel_values"] for b in boxes]

    def reference():  # decode once per sample, then every crop in one call
        return crop.encode_crops(crop.to_uint8(image), boxes, max_pixels=budget)[0]

    n = len(boxes)
    t_proc = _time(processor)
    t_ref = _time(reference)
    rows = [("transformers processor (PIL)", f"{1e3 * t_proc / n:.1f}", f"{n / t_proc:.1f}", "1.00"),
            ("torch reference (CPU)", f"{1e3 * t_ref / n:.1f}", f"{n / t_ref:.1f}", f"{t_proc / t_ref:.2f}")]
    header = ["path", "ms per crop", "crops/s", "speed-up vs processor"]
    if torch.cuda.is_available():
        img_gpu = crop.to_uint8(image).cuda()
        out = reference()
        t_gpu = _time(lambda: crop.encode_crops(img_gpu, boxes, max_pixels=budget)[0])
        # the least traffic possible: each crop's uint8 pixels read once, the fp32 patch tensor written once
        moved = sum((x2 - x1) * (y2 - y1) * 3 for x1, y1, x2, y2 in boxes) + out.numel() * 4
        bw = _card_spec(0)
        header += ["GB/s", "of memory bandwidth"]
        rows = [r + ("", "") for r in rows]
        rows.append(("kernels.crop_resample (CUDA)", f"{1e3 * t_gpu / n:.2f}", f"{n / t_gpu:.1f}",
                     f"{t_proc / t_gpu:.1f}", f"{moved / t_gpu / 1e9:.0f}",
                     f"{100 * moved / t_gpu / 1e9 / bw:.0f}% of {bw} GB/s" if bw else "-"))
    print(f"crop: {W}x{H} original, {n} crops, crop budget 1024 tokens")
    _table(header, rows)
    return rows


def _logprobs_child(method, n, d, v, device, dtype):
    """Runs in a subprocess: peak memory beyond the inputs and time of forward + backward."""
    from kernels import logprobs as lp

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    fn = dict(naive=lp.selective_logprobs_naive, chunked=lp.selective_logprobs_chunked,
              triton=lp.selective_logprobs_triton)[method]

    def run():
        hidden.grad = None
        fn(hidden, weight, targets).sum().backward()

    base = _rss() if device == "cpu" else torch.cuda.memory_allocated()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # reset the kernel's peak-RSS counter (VmHWM), which the inputs' creation already raised
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    t = _time(run, repeat=2)
    peak = (_peak_rss() if device == "cpu" else torch.cuda.max_memory_allocated()) - base
    return dict(seconds=t, peak_gb=peak / 2**30)


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


def bench_logprobs():
    d, v = 3584, 152064  # Qwen2.5-VL-7B's head
    cuda = torch.cuda.is_available()
    sizes = [2048, 8192, 16384] if cuda else [512, 1024]
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    rows = []
    for n in sizes:
        res = {}
        for method in ("naive", "chunked") + (("triton",) if cuda else ()):
            out = subprocess.run([sys.executable, __file__, "_logprobs", method, str(n), device, dtype],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                res[method] = None
                print(f"{method} N={n}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})")
                continue
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base = res["naive"]
        for method, r in res.items():
            if r is None:
                continue
            flops = 3 * 2 * n * d * v  # forward 2NDV, backward about twice that
            rows.append((method, n, f"{r['peak_gb']:.3f}", f"{r['seconds']:.3f}", f"{flops / r['seconds'] / 1e12:.2f}",
                         f"{base['peak_gb'] / max(r['peak_gb'], 1e-9):.1f}" if base else "-",
                         f"{r['seconds'] / base['seconds']:.2f}" if base else "-"))
    peak = _card_spec(1) if cuda else None
    if peak:
        rows = [r + (f"{100 * float(r[4]) / peak:.0f}%",) for r in rows]
    print(f"logprobs: D={d}, V={v}, {device} {dtype}, forward + backward"
          + (f", {torch.cuda.get_device_name()} (bf16 dense peak {peak} TFLOP/s)" if peak else ""))
    _table(["path", "N", "peak GB beyond inputs", "seconds", "TFLOP/s", "memory: naive / this", "time: this / naive"]
           + (["of bf16 peak"] if peak else []), rows)
    return rows


def bench_rollout():
    import model

    for name in ["tiny"] + (["tiny-7b"] if torch.cuda.is_available() else []):
        _bench_rollout(model.load_policy(name), name)


def _bench_rollout(policy, name):
    import data
    from rollout import RolloutConfig, rollout

    samples = data.synthetic(1, seed=0)
    # a random model seldom calls the tool, so the episodes are teacher-forced: think, crop, crop, answer
    call = '<think>zoom</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
    script = policy.encode(call.format("[40, 60, 200, 180]") + call.format("[100, 100, 160, 140]")
                           + "<think>done</think><answer>B</answer><|im_end|>")

    def force(ep):
        k = ep.num_generated
        return script[k] if k < len(script) else None

    rows = []
    for name, reuse in (("re-run each turn (generate-style)", False), ("KV cache kept across turns", True)):
        cfg = RolloutConfig(group_size=8, max_turns=3, max_turn_tokens=128, max_response_tokens=4096,
                            global_tokens=1024, crop_tokens=256, reuse_cache=reuse)
        rollout(policy, samples, cfg, force=force)  # warm-up
        dt = float("inf")
        for _ in range(3):  # best of 3: this machine's timings are noisy
            t = time.perf_counter()
            eps = rollout(policy, samples, cfg, force=force)
            dt = min(dt, time.perf_counter() - t)
        written = sum(e.num_generated for e in eps)
        rows.append([name, len(eps), written, written / dt, dt / len(eps)])
    base = rows[0][3]
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    shape = "Qwen2.5-VL-7B's shape, random bf16 weights" if name == "tiny-7b" else "the tiny model"
    print(f"rollout: {shape} ({device}), group of 8, global image 1,024 tokens, 3 turns (2 crops of 256 tokens)")
    _table(["engine", "episodes", "tokens written", "tokens/s", "s per episode", "speed-up"],
           [[n, e, w, f"{tps:.1f}", f"{spe:.3f}", f"{tps / base:.2f}"] for n, e, w, tps, spe in rows])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_logprobs":
        _, _, method, n, device, dtype = sys.argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(_logprobs_child(method, int(n), 3584, 152064, device, getattr(torch, dtype))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["crop", "logprobs", "rollout"], help="which benchmark")
    args = ap.parse_args()
    dict(crop=bench_crop, logprobs=bench_logprobs, rollout=bench_rollout)[args.what]()


if __name__ == "__main__":
    main()
