"""Evaluate a policy with the tool loop: accuracy per category, with optional crop-dependence probes.

    python eval.py --bench synthetic                                  # tiny model, synthetic set
    python eval.py --bench synthetic --adapter runs/stage2/final      # a trained adapter
    python eval.py --bench synthetic --probe noise                    # Gaussian noise added to every crop
    python eval.py --bench synthetic --data eval.jsonl --model DIR    # any JSONL in the project's format
    python eval.py --bench vstar --data vstar_bench --sweep 256,1024,4096,16384 --adapter A --adapter B
                                      # plain, noise and no-tool at each global budget, per model: table + figure

Writes runs/eval/<name>/: items.jsonl (one line per item, appended as they finish, so a rerun skips what
is done), summary.json, table.md, and with --html a self-contained report. Greedy decoding.
Under `torchrun --nproc_per_node=N eval.py ...` each rank takes one --shard (dist.py) and rank 0 writes the summary.
"""
import argparse
import json
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import benchmarks
import crop
import data
import dist
import model
import report
import rewards
import train
from rollout import DEPENDENCY_PROBE, RolloutConfig, rollout_skipping_bad_images


# Settings eval shares with training: defaults from train.Config; given --adapter, from the run's config.json
SHARED = ("model", "global_tokens", "crop_tokens", "max_turns", "max_crops", "max_turn_tokens", "max_response_tokens",
          "prompt", "matcher")


# ... except the images and the episode's limits, which unless given are the paper's and DeepEyes' evaluation's for
# every checkpoint alike, trained or not (a sweep compares them), rather than what a preset trained with: the paper's
# 1,024-token global image, and as DeepEyes' eval/eval_vstar.py (6c5e796) crops at up to 16,384 tokens and up to 11
# model calls of up to 10,240 tokens each, every call answered with a crop, no cap on the episode's length (training's
# 2,048-token response budget would end an episode at its first large crop). The built-in models (tiny, micro,
# tiny-7b) keep their runs' settings: random weights would write 10,240 tokens every turn.
EVAL_DEFAULTS = dict(global_tokens=1024, crop_tokens=16384, max_response_tokens=0, max_turns=11, max_crops=10,
                     max_turn_tokens=10240)

PROBES = ("", "noise", "noise-replace", "gt-box", "no-tool")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="synthetic", choices=["synthetic", "hrbench", "vstar", "mmerw"],
                    help="which benchmark to run")
    ap.add_argument("--data", default=None, help="benchmark file or folder; --bench synthetic: " + data.SPECS)
    ap.add_argument("--adapter", action="append", default=None,
                    help="a LoRA adapter folder (e.g. runs/stage2/final; 'none': the base model); its run's settings "
                         "are the defaults of the options below; with --sweep, give several to compare")
    helps = train.field_help()
    for key in SHARED:
        ap.add_argument("--" + key.replace("_", "-"), type=type(getattr(train.Config, key)), default=None,
                        choices=train.CHOICES.get(key),  # a typo'd --matcher ran as the default, --prompt crashed late
                        help=f"{helps[key]} (default: " + (f"{EVAL_DEFAULTS[key]!r} for a checkpoint, as the paper "
                             f"evaluates" + (" (0: no cap)" if key == "max_response_tokens" else "") + "; a built-in "
                             "model: " if key in EVAL_DEFAULTS else "") +
                             f"the adapter's run, else {getattr(train.Config, key)!r})")
    ap.add_argument("--probe", default=None, choices=PROBES[1:],
                    help="noise: Gaussian noise added to every returned crop (the paper's probe); noise-replace: "
                         "crops replaced by pure noise; gt-box: the model's box replaced by the ground truth; "
                         "no-tool: the tool is not offered")
    ap.add_argument("--noise-sigma", type=float, default=RolloutConfig.noise_sigma,
                    help="the noise probe's standard deviation in 0..255 pixel levels")
    ap.add_argument("--precision", default=None, choices=["bf16", "nf4", "fp32"],
                    help="the base weights: bf16 (default on a GPU: the paper and DeepEyes evaluate in bf16), nf4 for "
                         "small cards; default elsewhere: as train.py's base_precision=auto")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ap.add_argument("--batch", type=int, default=8, help="items rolled out together")
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/<bench>-<data>-<model>-g<global "
                                                "tokens>[-<probe>][-<adapter>])")
    ap.add_argument("--html", default=None, help="also write a self-contained HTML report to this file")
    ap.add_argument("--shard", default=None, help="i/n: evaluate every n-th item starting at i (run n in parallel)")
    ap.add_argument("--summary", action="store_true",
                    help="print accuracy with and without each probe side by side, from the earlier runs' folders "
                         "beside --out (its parent folder; default: those in runs/eval), and exit (not with --sweep, "
                         "which writes its own table)")
    ap.add_argument("--sweep", default=None, help="N,N,...: global budgets; at each, evaluate plain, with noise crops "
                                                   "and without the tool (resumable); writes sweep.md/json/png")
    ap.add_argument("--columns", default=None, help=data.COLUMNS)
    ap.add_argument("--seed", type=int, default=data.HELD_OUT_SEED,
                    help="seed of the synthetic set (training uses 0) and of V*'s option shuffle")
    args = ap.parse_args(argv)
    for key in SHARED:  # in range, before any model loads (0 response tokens: no cap)
        if getattr(args, key) is not None:
            train.check_setting(key, getattr(args, key), "--" + key.replace("_", "-"),
                                0 if key == "max_response_tokens" else None)
    for key in ("limit", "batch"):
        if getattr(args, key) is not None:
            train.check_setting(key, getattr(args, key), "--" + key, 1)
    if args.sweep:
        crop.parse_budgets(args.sweep, "--sweep")
    args.adapters = [None if a == "none" else a for a in args.adapter or ["none"]]  # several: --sweep, one line each
    if len(args.adapters) > 1 and not args.sweep:
        raise SystemExit("error: several --adapter are for --sweep (one line per model); evaluate one at a time")
    args.adapter = args.adapters[0]
    return args


def data_spec(args):
    return args.data or ("synthetic:32" if args.bench == "synthetic" else None)


def resolve_settings(args):
    """The run settings of an evaluation: the command line, else the adapter's training run (its config.json), else
    train.Config's defaults; a checkpoint's budgets and limits are EVAL_DEFAULTS unless given. Prints where each value
    came from. Returns a train.Config."""
    run_path = os.path.join(args.adapter, "config.json") if args.adapter else None
    run = {}
    if run_path and os.path.isfile(run_path):
        with open(run_path) as f:
            run = json.load(f)
    cfg, sources = train.Config(), []
    for key in SHARED:
        if getattr(args, key) is not None:
            value, source = getattr(args, key), "--" + key.replace("_", "-")
        elif key in EVAL_DEFAULTS and cfg.model not in model.BUILT_IN:  # "model" comes first in SHARED
            value, source = EVAL_DEFAULTS[key], "evaluation's default"
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
        spec = data_spec(args)
        return data.unique_ids(data.load(spec, seed=args.seed, columns=args.columns), spec)
    return benchmarks.load_benchmark(args.bench, args.data, seed=args.seed)


# ---------------------------------------------------------------- one folder, one setting

# arguments that do not change any item's result: where results go, how the work is split and scheduled
NOT_SETTINGS = ("out", "html", "shard", "summary", "limit", "batch", "sweep", "adapters")


def run_settings(args, resolved, precision):
    """What decides the items' results: every other argument, the shared ones and the precision as resolved (from
    the command line, the adapter's run or the defaults), with the data and the adapter identified by their
    contents (a retrained adapter at the same path is another setting)."""
    out = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    out.update({k: getattr(resolved, k) for k in SHARED}, precision=precision)
    out["data"] = data.fingerprint(data_spec(args))
    out["adapter"] = data.adapter_fingerprint(args.adapter)
    return out


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
    naming what differs (a setting an older run.json lacks was not given: None)."""
    os.makedirs(out, exist_ok=True)
    run = read_run(out)
    if run is None and any(f.startswith("items") for f in os.listdir(out)):
        raise SystemExit(f"error: {out} holds results without a run.json (an older version): their settings are "
                         f"unknown. Pass another --out, or remove {out}")
    diff = sorted(k for k in set(now) | set(run["settings"]) if now.get(k) != run["settings"].get(k)) if run else []
    if diff:
        raise SystemExit(f"error: {out} holds results of other settings: " + ", ".join(
            f"{k}={_short(run['settings'].get(k))} there, {_short(now.get(k))} now" for k in diff)
            + ". Pass another --out (the default folder name tells bench, data, model, global budget, probe and "
            "adapter apart) or remove " + out + " (a folder an older version made may hold the evaluation defaults "
            "of then: given as options, they resume it)")
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
                     f"to evaluate another adapter pass --adapter DIR (make eval: ADAPTERS=\"none runs/stage1/final\"), "
                     f"or no --adapter for the base model")


def eval_precision(args, settings):
    """The base weights' precision: --precision, else bf16 on a GPU (the paper and DeepEyes evaluate in bf16),
    else train.py's base_precision=auto."""
    return model.base_precision(settings.model, args.precision or ("bf16" if torch.cuda.is_available() else "auto"))


def evaluate(args, load_policy=None):
    """One evaluation into its folder; `load_policy` (a function) supplies the policy when items are left to do
    (the sweep loads each model once for all its points)."""
    check_adapter(args.adapter)
    settings = resolve_settings(args)
    precision = eval_precision(args, settings)
    loaded = load_bench(args)
    all_samples = loaded[:args.limit]
    # rows the loader could not read are part of the benchmark: counted in its size (the results stay partial),
    # each kept with its reason. Under --limit, which of them fall within the limit is unknown: not counted.
    unreadable = list(getattr(loaded, "skipped", ())) if args.limit is None else []
    for s in all_samples:  # information-gap levels are training data: an evaluation's global image is its setting
        s.global_tokens = None
    samples, tag = _shard(all_samples, args.shard or dist.shard_spec())  # torchrun: this rank's shard
    out = args.out or os.path.join("runs", "eval", default_name(args, settings))
    name = os.path.basename(os.path.normpath(out))
    shown = dict(probe=args.probe, noise_sigma=args.noise_sigma if args.probe == "noise" else None,
                 adapter=args.adapter, precision=precision, **{k: getattr(settings, k) for k in SHARED})
    claim_folder(out, run_settings(args, settings, precision),
                 dict(data_path=data_spec(args), adapter_path=args.adapter, num_total=len(all_samples) + len(unreadable),
                      num_unreadable=len(unreadable), shown=shown))
    if unreadable and dist.is_main():
        _list_skipped(out, unreadable)
        print(f"{len(unreadable)} unreadable item(s) of the benchmark, each with its reason: {out}/skipped.txt")
    items_path = os.path.join(out, f"items{tag}.jsonl")
    if data.cut_partial_line(items_path):
        print(f"{items_path}: its last line was cut (a killed run): truncated to the last whole line; that item is redone")
    done, failed = read_results(out)  # every shard's results count as done, and undecodable images: not retried
    todo = [s for s in samples if s.id not in done and s.id not in failed]
    if done:
        print(f"{len(done)} item(s) already in {items_path}; {len(todo)} to go")
    if todo:
        policy = (load_policy or (lambda: model.load_policy(settings.model, adapter=args.adapter, lora=False,
                                                             trainable=False, precision=precision)))()
        cfg = train.rollout_config(settings, group_size=1, greedy=True, probe=args.probe, rollout_rows=args.batch,
                                   noise_sigma=args.noise_sigma)
        bar = tqdm(total=len(todo), desc=name, file=sys.stdout)
        for i in range(0, len(todo), args.batch):
            t0 = time.time()
            bad = {}
            episodes = rollout_skipping_bad_images(policy, todo[i:i + args.batch], cfg, bad)
            seconds = (time.time() - t0) / max(1, len(episodes))
            with open(items_path, "a") as f:
                for e in episodes:
                    item = _item(e, seconds, response_text(policy, e), settings.matcher)
                    done[item["id"]] = item
                    f.write(json.dumps(item) + "\n")  # appended per batch: a killed run loses at most one batch
                for s_id, reason in bad.items():  # kept as unreadable, with the reason
                    f.write(json.dumps(dict(id=s_id, error=reason)) + "\n")
            _list_skipped(out, list(bad.values()))
            bar.update(len(episodes) + len(bad))
            if done:
                bar.set_postfix(acc=f"{sum(d['correct'] for d in done.values()) / len(done):.3f}")
        bar.close()
    dist.barrier("waiting for the other ranks' shards")  # torchrun: the summary merges every rank's items
    summary, items = folder_summary(out, args.bench, [s.id for s in all_samples], write=dist.is_main())
    if args.html and dist.is_main():
        report.write_html(args.html, items, {s.id: s for s in all_samples}, report.markdown(summary),
                          probe=args.probe)
    if dist.is_main():
        print(report.markdown(summary))
    return summary


def _item(e, seconds, text, matcher="rule"):
    """One item's result; `text` is the transcript with undecodable bytes escaped (shown in reports; scoring
    uses the rollout's own text)."""
    s = e.sample
    return dict(id=s.id, category=s.category, answer=s.answer, reply=rewards.scored_reply(text),
                correct=rewards.accuracy(rewards.scored_reply(e.text), s.answer, s.options,
                                         rewards.matcher_for(s, matcher)), text=text, boxes_shown=e.boxes_shown,
                boxes=e.boxes, gt_boxes=s.boxes, turns=e.turns, tool_calls=e.num_tool_calls,
                tool_errors=e.num_tool_errors, seconds=seconds, meta=s.meta)


def read_items(out):
    """Every shard's items in a folder, read now (other shards may still be writing: a cut line is skipped)."""
    return read_results(out)[0]


def read_results(out):
    """(items, failed): every shard's items, and the items whose image did not decode in the rollout ({id,
    error}), from one read of the folder's files."""
    lines = {}
    for f in sorted(os.listdir(out)):
        if re.fullmatch(r"items(\.shard-\d+-of-\d+)?\.jsonl", f):
            lines.update(_read_items(os.path.join(out, f)))
        elif f.startswith("items") and f.endswith(".jsonl"):  # a copy of another run's, say: not this setting's
            print(f"{os.path.join(out, f)}: not a results file of this folder (items.jsonl, "
                  f"items.shard-I-of-N.jsonl): left out")
    return ({k: v for k, v in lines.items() if "error" not in v}, {k: v for k, v in lines.items() if "error" in v})


def _list_skipped(out, reasons):
    """Add the reasons skipped.txt does not hold yet (a rerun meets the loader's again), one line each."""
    if not reasons:  # most batches: nothing to read or write
        return
    path = os.path.join(out, "skipped.txt")
    listed = set(open(path).read().splitlines()) if os.path.exists(path) else set()
    new = [r for r in reasons if r not in listed]
    if new:
        with open(path, "a") as f:
            f.write("".join(r + "\n" for r in new))


def folder_summary(out, bench, ids=None, write=True):
    """The summary of a folder's results, all shards merged as they are now (of `ids` when given), with how many
    of the benchmark's items it covers; writes summary.json and table.md (unless not `write`). Returns the summary
    and the items."""
    done, failed = read_results(out)
    items = [done[i] for i in ids if i in done] if ids is not None else list(done.values())
    failed = [i for i in ids if i in failed] if ids is not None else list(failed)
    run = read_run(out) or {}
    # unreadable: the loader's rows (not in ids), and the items whose image then failed to decode
    unreadable = run.get("num_unreadable", 0)
    summary = summarize(items, os.path.basename(os.path.normpath(out)), bench,
                        num_total=len(ids) + unreadable if ids is not None else run.get("num_total"))
    summary["num_unreadable"] = unreadable + len(failed)
    summary["settings"] = run.get("shown")
    if write:
        _write_reports(out, summary)
    return summary, items


def _byte_decoder():
    """GPT-2's byte-level alphabet, which Qwen's tokenizer and the tiny one use: character -> byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs, cs)}


def response_text(policy, e):
    """The episode's text as the rollout decoded it, except that bytes which are not valid UTF-8 (a token cut
    inside a character) are written as \\x.. escapes instead of U+FFFD, so a report shows what was there."""
    if "\ufffd" not in e.text:
        return e.text
    table, out = _byte_decoder(), bytearray()
    for tok in policy.tokenizer.convert_ids_to_tokens([t for t in e.ids[e.prompt_len:] if t != policy.image_pad]):
        if tok is None:  # an id past the tokenizer (tiny-7b's head): it decodes to nothing
            continue
        out += bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode()
    return out.decode("utf-8", errors="backslashreplace")


def _read_items(path):
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                done[item["id"]] = item
            except (ValueError, KeyError, TypeError) as e:  # its item is redone
                if line.endswith("\n"):  # not the last line of a shard still writing it, nor one a kill cut
                    print(f"{path}:{n}: not an item ({type(e).__name__}: {e}): left out, its item redone")
    return done


def _accuracy_by(items, key):
    groups = {}
    for it in items:
        groups.setdefault(key(it), []).append(it["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def summarize(items, name, bench="synthetic", num_total=None):
    """Accuracy per category and overall (micro), tool use, wall-clock seconds per item (a batch's time over its
    items: throughput, not one question's latency), and each benchmark's
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
    ious = [rewards.iou(it["boxes"][0], it["gt_boxes"][0]) for it in items if it.get("boxes") and it.get("gt_boxes")]
    summary["iou_first_crop"] = sum(ious) / len(ious) if ious else None  # of the items that cropped, with B1
    if bench == "hrbench" and items:
        cycles = _accuracy_by(items, lambda it: it["meta"].get("cycle", ""))
        # HR-Bench's own: accuracy per cycle, averaged; without cycles it is not computed (not the plain accuracy)
        summary["official"] = sum(cycles.values()) / len(cycles) if "" not in cycles else None
        fsp, fcp = per_category.get("single"), per_category.get("cross")
        summary["deepeyes"] = (fsp + fcp) / 2 if fsp is not None and fcp is not None else None
    if bench == "mmerw":
        summary["per_task"] = _accuracy_by(items, lambda it: it["meta"].get("task", ""))
        # subtask names repeat across tasks (Perception and Reasoning both have Autonomous_Driving): task/subtask
        summary["per_subtask"] = _accuracy_by(items, lambda it: f"{it['meta'].get('task', '')}/"
                                                                f"{it['meta'].get('subtask', '')}")
    return summary


def probe_summary(bench, root="runs/eval"):
    """Accuracy with and without each probe, side by side, and the crop dependency (accuracy lost when every
    returned crop is noise), per setting: folders under `root` whose run.json differs only in the probe. Each
    folder's summary is rebuilt from all its shards' items. Returns one {probe: summary} per setting. A root
    that holds `make experiment`'s seed folders (s<seed>/eval) gets the table over seeds instead (returns None)."""
    seeds = sorted((d for d in os.listdir(root) if re.fullmatch(r"s\d+", d)), key=lambda d: int(d[1:])) \
        if os.path.isdir(root) else []
    if seeds:
        print(report.seeds_table([probe_tables(bench, os.path.join(root, d, "eval")) for d in seeds], seeds))
        return
    tables = probe_tables(bench, root)
    for results in tables:
        print(report.probes_table(bench, results))
    print(report.experiment_table(tables))
    return tables


def probe_tables(bench, root):
    """probe_summary's {probe: summary} per setting, from the folders under `root`."""
    groups = {}
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        run = read_run(os.path.join(root, d))
        if run is None or run["settings"].get("bench") != bench:
            continue
        # noise_sigma only changes the noise probe's runs: it does not part them from their plain run
        key = json.dumps({k: v for k, v in run["settings"].items() if k not in ("probe", "noise_sigma")},
                         sort_keys=True)
        probe = run["settings"].get("probe") or "none"
        if probe in groups.setdefault(key, {}):  # one setting evaluated twice: the later folder is the one shown
            print(f"warning: {groups[key][probe]} and {d} hold the same setting and probe; {d} is used")
        groups[key][probe] = os.path.join(root, d)
    tables = []
    for folders in groups.values():
        # each folder's own summary, rebuilt from all its shards (and written), and its items
        own = {probe: folder_summary(folder, bench) for probe, folder in folders.items()}
        if "none" not in own:
            continue
        # every probe of a setting is compared on the items all its runs have (a --limit or an unfinished run
        # has fewer); "n of N" says how many of the plain run's N
        shared = set.intersection(*({it["id"] for it in items} for _, items in own.values()))
        results = {}
        for probe, (summary, items) in own.items():
            results[probe] = summarize([it for it in items if it["id"] in shared], summary["name"], bench,
                                       num_total=own["none"][0]["num_total"])
            results[probe]["settings"] = summary["settings"]
        tables.append(results)
    if not tables:
        raise SystemExit(f"error: no run of {bench} without a probe in {root}: run eval.py --bench {bench} first")
    return tables


def _write_reports(out, summary):
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report.markdown(summary) + "\n")


# ---------------------------------------------------------------- the global-budget sweep

SWEEP_PROBES = (("plain", None), ("noise", "noise"), ("no-tool", "no-tool"))


def _model_tag(model_name, adapter):
    """A folder name and legend label per model: the adapter's path, or the base model's name."""
    return os.path.normpath(adapter or model_name).strip(os.sep).replace(os.sep, "-") or "model"


def sweep(args):
    """The paper's analysis: accuracy with the tool, with noise crops and without the tool, and the crop
    dependency, against the global image's budget; one line per model (--adapter, repeatable)."""
    import functools
    import plot

    budgets = crop.parse_budgets(args.sweep, "--sweep")
    root = args.out or os.path.join("runs", "eval", f"sweep-{args.bench}")
    points = []
    for adapter in args.adapters:
        model_args = argparse.Namespace(**{**vars(args), "adapter": adapter, "html": None, "shard": None})
        settings = resolve_settings(model_args)
        base = settings.model  # the adapter's own base model unless --model is given
        tag = _model_tag(base, adapter)
        load = functools.lru_cache(maxsize=None)(
            lambda a=adapter, m=base, p=eval_precision(args, settings): model.load_policy(
                m, adapter=a, lora=False, trainable=False, precision=p))
        for budget in budgets:
            point, runs = dict(model=tag, global_tokens=budget), {}
            for name, probe in SWEEP_PROBES:
                # each point's folder, <sweep>/<model>/g<budget>-<probe>: its items.jsonl makes it resumable
                point_args = argparse.Namespace(**{**vars(model_args), "global_tokens": budget, "probe": probe,
                                                   "out": os.path.join(root, tag, f"g{budget}-{name}")})
                evaluate(point_args, load)
                runs[name] = read_items(point_args.out)
            # the three accuracies on the items all three runs have (a --limit or unfinished run has fewer), so
            # that plain - noise is the crop dependency of one set of items
            shared = set.intersection(*(set(r) for r in runs.values()))
            point.update({name: sum(r[i]["correct"] for i in shared) / max(1, len(shared)) for name, r in runs.items()},
                         num_items=len(shared))
            points.append(point)
    if not dist.is_main():  # torchrun: rank 0 writes the sweep's files
        return points
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump(points, f, indent=1)
    table = _sweep_markdown(points, args.bench)
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write(table + "\n")
    plot.plot_sweep(points, os.path.join(root, "sweep.png"))
    print(table + f"\n\nsweep: {root}/sweep.md, sweep.json, sweep.png")
    return points


def _sweep_markdown(points, bench):
    rows = [f"| {p['model']} | {p['global_tokens']:,} | {p['num_items']} | {100 * p['plain']:.1f} | "
            f"{100 * p['noise']:.1f} | {100 * p['no-tool']:.1f} | {100 * (p['plain'] - p['noise']):+.1f} |"
            for p in points]
    return "\n".join([f"### {bench}: accuracy (%) against the global image's budget", "",
                      f"Noise crops: the paper's probe, noise added to each crop ({DEPENDENCY_PROBE!r} in the "
                      f"experiment table replaces the crop instead); items: the fewest any of the three runs has.", "",
                      "| model | global tokens | items | with the tool | noise crops | without the tool | "
                      "crop dependency (points) |", "|---|---|---|---|---|---|---|", *rows])


# torchrun: how long a rank that finished its shard waits at the barrier for the others. Shards are interleaved
# (i, i + n, ...) so they finish together on a fresh run, but a resumed one may find one shard done and another
# hours from it; a rank that dies still ends the job at once (torchrun stops the others).
EVAL_WAIT_MIN = 24 * 60


def main(argv=None):
    args = parse_args(argv)
    if args.summary and not args.sweep:
        return probe_summary(args.bench, os.path.dirname(os.path.normpath(args.out)) if args.out else "runs/eval")
    if args.shard and dist.world() > 1:
        raise SystemExit("error: --shard under torchrun: each rank takes its shard from torchrun (rank/world size)")
    dist.init(EVAL_WAIT_MIN)
    result = sweep(args) if args.sweep else evaluate(args)
    dist.close()
    return result


if __name__ == "__main__":
    main()
