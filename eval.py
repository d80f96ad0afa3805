"""Evaluate a policy with the tool loop: accuracy per category, with optional crop-dependence probes.

    python eval.py --bench synthetic                                  # tiny model, synthetic set
    python eval.py --bench synthetic --adapter runs/stage2/final      # a trained adapter
    python eval.py --bench synthetic --probe noise                    # every returned crop is noise
    python eval.py --bench synthetic --data eval.jsonl --model DIR    # any JSONL in the project's format

Writes runs/eval/<name>/: items.jsonl (one line per item, appended as they finish, so a rerun skips what
is done), summary.json, table.md, and with --html a self-contained report. Greedy decoding.
"""
import argparse
import base64
import html
import io
import json
import os
import sys
import time

from tqdm import tqdm

import data
import model
import rewards
import train
from rollout import rollout


# Settings eval shares with training: defaults from train.Config; given --adapter, from the run's config.json
SHARED = ("model", "global_tokens", "crop_tokens", "max_turns", "max_crops", "max_turn_tokens", "max_response_tokens")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="synthetic", choices=["synthetic", "hrbench", "vstar", "mmerw"],
                    help="which benchmark to run")
    ap.add_argument("--data", default=None, help="benchmark file or folder; synthetic: 'synthetic:N' or a .jsonl")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter folder (e.g. runs/stage2/final); its run's "
                                                    "settings are the defaults of the options below")
    helps = train.field_help()
    for key in SHARED:
        ap.add_argument("--" + key.replace("_", "-"), type=type(getattr(train.Config, key)), default=None,
                        help=f"{helps[key]} (default: the adapter's run, else {getattr(train.Config, key)!r})")
    ap.add_argument("--probe", default=None, choices=["noise", "gt-box", "no-tool"],
                    help="noise: crops replaced by noise; gt-box: the model's box replaced by the ground truth; "
                         "no-tool: the tool is not offered")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ap.add_argument("--batch", type=int, default=8, help="items rolled out together")
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/<bench>[-probe])")
    ap.add_argument("--html", default=None, help="also write a self-contained HTML report to this file")
    ap.add_argument("--shard", default=None, help="i/n: evaluate every n-th item starting at i (run n in parallel)")
    ap.add_argument("--summary", action="store_true",
                    help="print accuracy with and without each probe side by side (from earlier runs) and exit")
    ap.add_argument("--seed", type=int, default=1,
                    help="seed of the synthetic set (training uses 0) and of V*'s option shuffle")
    return ap.parse_args(argv)


def resolve_settings(args):
    """The run settings of an evaluation: the command line, else the adapter's training run (its
    config.json), else train.Config's defaults. Prints where each value came from. Returns a train.Config."""
    run_path = os.path.join(args.adapter, "config.json") if args.adapter else None
    run = {}
    if run_path and os.path.isfile(run_path):
        with open(run_path) as f:
            run = json.load(f)
    cfg, sources = train.Config(), []
    for key in SHARED:
        if getattr(args, key) is not None:
            value, source = getattr(args, key), "--" + key.replace("_", "-")
        elif key in run:
            value, source = run[key], run_path
        else:
            value, source = getattr(cfg, key), "default"
        setattr(cfg, key, value)
        sources.append(f"{key}={value} ({source})")
    print("settings: " + ", ".join(sources))
    return cfg


def load_bench(args):
    if args.bench == "synthetic":
        return data.load(args.data or "synthetic:32", seed=args.seed)
    return data.load_benchmark(args.bench, args.data, seed=args.seed)


def _shard(samples, shard):
    """--shard i/n -> the items i, i + n, i + 2n, ... and a file tag for this shard's results."""
    if not shard:
        return samples, ""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SystemExit(f"error: --shard {shard!r}: expected i/n with 0 <= i < n")
    return samples[i::n], f".shard-{i}-of-{n}"


def evaluate(args):
    settings = resolve_settings(args)
    all_samples = load_bench(args)[:args.limit]
    samples, tag = _shard(all_samples, args.shard)
    name = args.bench + (f"-{args.probe}" if args.probe else "")
    out = args.out or os.path.join("runs", "eval", name)
    os.makedirs(out, exist_ok=True)
    items_path = os.path.join(out, f"items{tag}.jsonl")
    done = {}
    for f in sorted(os.listdir(out)):  # every shard's results count as done
        if f.startswith("items") and f.endswith(".jsonl"):
            done.update(_read_items(os.path.join(out, f)))
    todo = [s for s in samples if s.id not in done]
    if done:
        print(f"{len(done)} item(s) already in {items_path}; {len(todo)} to go")
    if todo:
        policy = model.load_policy(settings.model, adapter=args.adapter, lora=False, trainable=False)
        cfg = train.rollout_config(settings, group_size=1, greedy=True, probe=args.probe, rollout_rows=args.batch)
        bar = tqdm(total=len(todo), desc=name, file=sys.stdout)
        for i in range(0, len(todo), args.batch):
            t0 = time.time()
            episodes = _rollout_skipping_bad_images(policy, todo[i:i + args.batch], cfg)
            if not episodes:
                continue
            seconds = (time.time() - t0) / len(episodes)
            with open(items_path, "a") as f:
                for e in episodes:
                    item = _item(e, seconds)
                    done[item["id"]] = item
                    f.write(json.dumps(item) + "\n")  # appended per batch: a killed run loses at most one batch
            bar.update(len(episodes))
            bar.set_postfix(acc=f"{sum(d['correct'] for d in done.values()) / len(done):.3f}")
        bar.close()
    items = [done[s.id] for s in all_samples if s.id in done]
    summary = summarize(items, name, args.bench)
    _write_reports(out, summary)
    if args.html:
        write_html(args.html, items, {s.id: s for s in all_samples}, summary)
    print(_markdown(summary))
    return summary


def _rollout_skipping_bad_images(policy, batch, cfg):
    """Roll out a batch; an item whose image fails to decode is reported in one line and left out."""
    while batch:
        try:
            return rollout(policy, batch, cfg)
        except data.BadImage as e:
            print(f"skipping a bad image: {e}")
            batch = [s for s in batch if s.id != e.sample_id]
    return []


def _item(e, seconds):
    reply = rewards.extract_answer(e.text)
    if reply is None:  # a model that does not use the protocol: take the bare reply
        reply = e.text
    s = e.sample
    return dict(id=s.id, category=s.category, answer=s.answer, reply=reply,
                correct=rewards.accuracy(reply, s.answer, s.options), text=e.text, boxes_shown=e.boxes_shown,
                boxes=e.boxes, gt_boxes=s.boxes, turns=e.turns, tool_calls=e.num_tool_calls,
                tool_errors=e.num_tool_errors, seconds=seconds, meta=s.meta)


def _read_items(path):
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    item = json.loads(line)
                    done[item["id"]] = item
                except (ValueError, KeyError):  # a line cut by a kill: that item is simply redone
                    continue
    return done


def _accuracy_by(items, key):
    groups = {}
    for it in items:
        groups.setdefault(key(it), []).append(it["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def summarize(items, name, bench="synthetic"):
    """Accuracy per category and overall (micro), tool use, mean seconds per question, and each benchmark's
    own scores: HR-Bench official (per option-rotation cycle, then averaged) and DeepEyes' (mean of FSP and
    FCP); MME-RealWorld per task and subtask."""
    n = max(1, len(items))
    per_category = _accuracy_by(items, lambda it: it["category"])
    summary = dict(name=name, num_items=len(items), accuracy=sum(it["correct"] for it in items) / n,
                   per_category=per_category,
                   count_per_category={c: sum(it["category"] == c for it in items) for c in per_category},
                   tool_calls=sum(it["tool_calls"] for it in items) / n,
                   tool_errors=sum(it["tool_errors"] for it in items) / n,
                   seconds_per_item=sum(it["seconds"] for it in items) / n)
    if bench == "hrbench" and items:
        cycles = _accuracy_by(items, lambda it: it["meta"].get("cycle", ""))
        summary["official"] = sum(cycles.values()) / len(cycles)  # HR-Bench's own: accuracy per cycle, averaged
        fsp, fcp = per_category.get("single"), per_category.get("cross")
        summary["deepeyes"] = (fsp + fcp) / 2 if fsp is not None and fcp is not None else None
    if bench == "mmerw":
        summary["per_task"] = _accuracy_by(items, lambda it: it["meta"].get("task", ""))
        summary["per_subtask"] = _accuracy_by(items, lambda it: it["meta"].get("subtask", ""))
    return summary


def _markdown(summary):
    rows = [f"| {c} | {summary['count_per_category'][c]} | {100 * a:.1f} |" for c, a in summary["per_category"].items()]
    lines = [f"### {summary['name']}", "", "| category | items | accuracy (%) |", "|---|---|---|", *rows,
             f"| **overall** | {summary['num_items']} | **{100 * summary['accuracy']:.1f}** |", ""]
    if summary.get("official") is not None:
        deepeyes = summary.get("deepeyes")
        lines.append(f"HR-Bench official (per cycle, averaged) {100 * summary['official']:.1f}; DeepEyes' (mean of "
                     f"FSP and FCP) " + (f"{100 * deepeyes:.1f}" if deepeyes is not None else "n/a"))
    for key in ("per_task", "per_subtask"):
        if summary.get(key):
            lines.append(key.replace("_", " ") + ": " + ", ".join(f"{k} {100 * v:.1f}" for k, v in summary[key].items()))
    lines.append(f"tool calls per item {summary['tool_calls']:.2f}, tool errors per item "
                 f"{summary['tool_errors']:.2f}, {summary['seconds_per_item']:.2f} s per item")
    return "\n".join(lines)


def probe_summary(bench, root="runs/eval"):
    """Accuracy with and without each probe, side by side, and the crop dependency (accuracy lost when every
    returned crop is noise), from the summaries that earlier runs wrote."""
    results = {}
    for probe in ("", "noise", "gt-box", "no-tool"):
        path = os.path.join(root, bench + (f"-{probe}" if probe else ""), "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                results[probe or "none"] = json.load(f)
    if "none" not in results:
        raise SystemExit(f"error: no run without a probe in {os.path.join(root, bench)}: "
                         f"run eval.py --bench {bench} first")
    base = results["none"]["accuracy"]
    rows = [f"| {p} | {s['num_items']} | {100 * s['accuracy']:.1f} | {100 * (s['accuracy'] - base):+.1f} |"
            for p, s in results.items()]
    text = "\n".join([f"### {bench}: probes", "", "| probe | items | accuracy (%) | change (points) |",
                      "|---|---|---|---|", *rows])
    if "noise" in results:
        text += ("\n\ncrop dependency (accuracy lost when crops are noise): "
                 f"{100 * (base - results['noise']['accuracy']):.1f} points")
    print(text)
    return results


def _write_reports(out, summary):
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(_markdown(summary) + "\n")


def _png(im, side):
    im = im.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def write_html(path, items, samples, summary, thumb=512):
    """One self-contained page: the summary on top, then per item the image with the model's boxes (red) and
    the ground truth (lime), each crop the model got back, the answer, and the transcript."""
    import crop

    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(summary['name'])}</title></head><body>",
             f"<pre>{html.escape(_markdown(summary))}</pre>"]
    for it in items:
        s = samples[it["id"]]
        original = s.image()
        width = max(2, s.width // 300)
        im = crop.draw_boxes(original, it["boxes"], colors=("red",), width=width)
        if it["gt_boxes"]:
            im = crop.draw_boxes(im, it["gt_boxes"][:1], colors=("lime",), width=width)
        crops = "".join(_png(original.crop(tuple(b)), 160) for b in it["boxes"])
        mark = "right" if it["correct"] else "wrong"
        parts.append(f"<hr><h3>{html.escape(it['id'])} [{html.escape(it['category'])}]: {mark} "
                     f"(answer {html.escape(it['answer'])}, reply {html.escape(str(it['reply'])[:80])})</h3>"
                     f"{_png(im, thumb)}<p>red: the model's boxes; lime: ground truth. Crops: {crops or 'none'}</p>"
                     f"<pre>{html.escape(it['text'])}</pre>")
    with open(path, "w") as f:
        f.write("".join(parts) + "</body></html>")


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        return probe_summary(args.bench, os.path.dirname(os.path.normpath(args.out)) if args.out else "runs/eval")
    return evaluate(args)


if __name__ == "__main__":
    main()
