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
import hashlib
import html
import io
import json
import os
import re
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
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/<bench>-<data>-<model>-g<global "
                                                "tokens>[-<probe>][-<adapter>])")
    ap.add_argument("--html", default=None, help="also write a self-contained HTML report to this file")
    ap.add_argument("--shard", default=None, help="i/n: evaluate every n-th item starting at i (run n in parallel)")
    ap.add_argument("--summary", action="store_true",
                    help="print accuracy with and without each probe side by side (from earlier runs) and exit")
    ap.add_argument("--seed", type=int, default=1,
                    help="seed of the synthetic set (training uses 0) and of V*'s option shuffle")
    return ap.parse_args(argv)


def data_spec(args):
    return args.data or ("synthetic:32" if args.bench == "synthetic" else None)


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
        return data.unique_ids(data.load(data_spec(args), seed=args.seed), data_spec(args))
    return data.load_benchmark(args.bench, args.data, seed=args.seed)


# ---------------------------------------------------------------- one folder, one setting

# arguments that do not change any item's result: where results go, how the work is split and scheduled
NOT_SETTINGS = ("out", "html", "shard", "summary", "limit", "batch")


def run_settings(args, resolved):
    """What decides the items' results: every other argument, the shared ones as resolved (from the command line,
    the adapter's run or the defaults), with the data and the adapter identified by their contents (a retrained
    adapter at the same path is another setting)."""
    out = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    out.update({k: getattr(resolved, k) for k in SHARED})
    out["data"] = _fingerprint(data_spec(args))
    out["adapter"] = _fingerprint(args.adapter and os.path.join(args.adapter, "adapter_model.safetensors"))
    return out


def _fingerprint(path):
    """sha256 of a file, or of a folder's file names and sizes; a spec that is not a path (synthetic:N) as is."""
    if not path or not os.path.exists(path):
        return path
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for folder, _, names in sorted(os.walk(path)):
            for n in sorted(names):
                digest.update(f"{os.path.relpath(os.path.join(folder, n), path)}:"
                              f"{os.path.getsize(os.path.join(folder, n))}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def default_name(args, resolved):
    """What tells runs apart: bench, data, model, global budget, probe, adapter (runs/stage2/final ->
    stage2_final)."""
    def stem(spec):
        if spec.startswith("synthetic"):
            return "n" + (spec.partition(":")[2] or "256")
        parts = os.path.normpath(spec).split(os.sep)
        name = "_".join(parts[-2:]) if parts[-1] == "final" and len(parts) > 1 else parts[-1]
        return re.sub(r"[^\w.-]", "_", os.path.splitext(name)[0] if os.path.isfile(spec) else name)

    parts = [args.bench, stem(data_spec(args)), stem(resolved.model), f"g{resolved.global_tokens}", args.probe,
             args.adapter and stem(args.adapter)]
    return "-".join(p for p in parts if p)


def claim_folder(out, now, about):
    """An evaluation folder holds one setting's results: the first run writes run.json (the settings `now` and
    `about` them: paths, the benchmark's size); a rerun (or another shard) with other settings is refused,
    naming what differs."""
    os.makedirs(out, exist_ok=True)
    run = read_run(out)
    if run is None and any(f.startswith("items") for f in os.listdir(out)):
        raise SystemExit(f"error: {out} holds results without a run.json (an older version): their settings are "
                         f"unknown. Pass another --out, or remove {out}")
    if run is not None and run["settings"] != now:
        diff = sorted(k for k in set(now) | set(run["settings"]) if now.get(k) != run["settings"].get(k))
        raise SystemExit(f"error: {out} holds results of other settings: " + ", ".join(
            f"{k}={_short(run['settings'].get(k))} there, {_short(now.get(k))} now" for k in diff)
            + ". Pass another --out (the default folder name tells settings apart), or remove " + out)
    tmp = os.path.join(out, f"run.json.{os.getpid()}.tmp")  # shards may start together: write whole, rename
    with open(tmp, "w") as f:
        json.dump(dict(settings=now, **about), f, indent=1)
    os.replace(tmp, os.path.join(out, "run.json"))


def read_run(out):
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _short(value):
    return repr(value[:19] + "…" if isinstance(value, str) and value.startswith("sha256:") else value)


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


def check_adapter(path):
    """A missing adapter is one line naming the folder and what makes it, before any model loads (not PEFT's
    "Can't find 'adapter_config.json'" traceback after it)."""
    if path is None or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return
    made_by = next((f"`make {stage}` (python train.py --stage {stage[-1]})" for stage in ("stage1", "stage2")
                    if os.path.normpath(path).endswith(os.path.join(stage, "final"))), "a training run's final/")
    raise SystemExit(f"error: adapter {path} not found (no adapter_config.json there). It is made by {made_by}; "
                     f"to evaluate another adapter pass --adapter DIR (make: ADAPTER=runs/stage1/final), or "
                     f"ADAPTER= for the base model")


def evaluate(args):
    check_adapter(args.adapter)
    resolved = resolve_settings(args)
    all_samples = load_bench(args)[:args.limit]
    samples, tag = _shard(all_samples, args.shard)
    out = args.out or os.path.join("runs", "eval", default_name(args, resolved))
    name = os.path.basename(os.path.normpath(out))
    claim_folder(out, run_settings(args, resolved), dict(data_path=data_spec(args), adapter_path=args.adapter,
                                                         num_total=len(all_samples)))
    items_path = os.path.join(out, f"items{tag}.jsonl")
    if data.cut_partial_line(items_path):
        print(f"{items_path}: its last line was cut (a killed run): truncated to the last whole line; that item is redone")
    done = read_items(out)  # every shard's results count as done
    todo = [s for s in samples if s.id not in done]
    if done:
        print(f"{len(done)} item(s) already in {items_path}; {len(todo)} to go")
    if todo:
        policy = model.load_policy(resolved.model, adapter=args.adapter, lora=False, trainable=False)
        cfg = train.rollout_config(resolved, group_size=1, greedy=True, probe=args.probe, rollout_rows=args.batch)
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
    summary, items = folder_summary(out, args.bench, [s.id for s in all_samples])
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


def read_items(out):
    """Every shard's items in a folder, read now (other shards may still be writing: a cut line is skipped)."""
    done = {}
    for f in sorted(os.listdir(out)):
        if f.startswith("items") and f.endswith(".jsonl"):
            done.update(_read_items(os.path.join(out, f)))
    return done


def folder_summary(out, bench, ids=None):
    """The summary of a folder's results, all shards merged as they are now (of `ids` when given), with how many
    of the benchmark's items it covers; writes summary.json and table.md. Returns the summary and the items."""
    done = read_items(out)
    items = [done[i] for i in ids if i in done] if ids is not None else list(done.values())
    run = read_run(out) or {}
    summary = summarize(items, os.path.basename(os.path.normpath(out)), bench,
                        num_total=len(ids) if ids is not None else run.get("num_total"))
    _write_reports(out, summary)
    return summary, items


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


def summarize(items, name, bench="synthetic", num_total=None):
    """Accuracy per category and overall (micro), tool use, mean seconds per question, and each benchmark's
    own scores: HR-Bench official (per option-rotation cycle, then averaged) and DeepEyes' (mean of FSP and
    FCP); MME-RealWorld per task and subtask."""
    n = max(1, len(items))
    per_category = _accuracy_by(items, lambda it: it["category"])
    summary = dict(name=name, num_items=len(items), num_total=num_total or len(items),
                   accuracy=sum(it["correct"] for it in items) / n,
                   per_category=per_category,
                   count_per_category={c: sum(it["category"] == c for it in items) for c in per_category},
                   tool_calls=sum(it["tool_calls"] for it in items) / n,
                   tool_errors=sum(it["tool_errors"] for it in items) / n,
                   seconds_per_item=sum(it["seconds"] for it in items) / n)
    if bench == "hrbench" and items:
        cycles = _accuracy_by(items, lambda it: it["meta"].get("cycle", ""))
        # HR-Bench's own: accuracy per cycle, averaged; without cycles it is not computed (not the plain accuracy)
        summary["official"] = sum(cycles.values()) / len(cycles) if "" not in cycles else None
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
    if summary.get("num_total", summary["num_items"]) > summary["num_items"]:
        lines.append(f"**partial: {summary['num_items']} of {summary['num_total']} items** (shards or a run still going)")
    if "official" in summary:
        official, deepeyes = summary["official"], summary.get("deepeyes")
        lines.append("HR-Bench official (per cycle, averaged) " + (f"{100 * official:.1f}" if official is not None
                                                                   else "n/a (no cycle_category)")
                     + "; DeepEyes' (mean of FSP and FCP) " + (f"{100 * deepeyes:.1f}" if deepeyes is not None else "n/a"))
    for key in ("per_task", "per_subtask"):
        if summary.get(key):
            lines.append(key.replace("_", " ") + ": " + ", ".join(f"{k} {100 * v:.1f}" for k, v in summary[key].items()))
    lines.append(f"tool calls per item {summary['tool_calls']:.2f}, tool errors per item "
                 f"{summary['tool_errors']:.2f}, {summary['seconds_per_item']:.2f} s per item")
    return "\n".join(lines)


def probe_summary(bench, root="runs/eval"):
    """Accuracy with and without each probe, side by side, and the crop dependency (accuracy lost when every
    returned crop is noise), per setting: folders under `root` whose run.json differs only in the probe. Each
    folder's summary is rebuilt from all its shards' items. Returns one {probe: summary} per setting."""
    groups = {}
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        run = read_run(os.path.join(root, d))
        if run is None or run["settings"].get("bench") != bench:
            continue
        key = json.dumps({k: v for k, v in run["settings"].items() if k != "probe"}, sort_keys=True)
        groups.setdefault(key, {})[run["settings"].get("probe") or "none"] = folder_summary(os.path.join(root, d), bench)[0]
    tables = [results for results in groups.values() if "none" in results]
    if not tables:
        raise SystemExit(f"error: no run of {bench} without a probe in {root}: run eval.py --bench {bench} first")
    for results in tables:
        _print_probes(bench, results)
    return tables


def _print_probes(bench, results):
    base = results["none"]["accuracy"]
    rows = [f"| {p} | {s['num_items']} of {s['num_total']} | {100 * s['accuracy']:.1f} | "
            f"{100 * (s['accuracy'] - base):+.1f} |" for p, s in results.items()]
    text = "\n".join([f"### {bench}: probes ({results['none']['name']})", "",
                      "| probe | items | accuracy (%) | change (points) |", "|---|---|---|---|", *rows])
    if "noise" in results:
        text += ("\n\ncrop dependency (accuracy lost when crops are noise): "
                 f"{100 * (base - results['noise']['accuracy']):.1f} points")
    print(text)


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
