"""Stage 1's information gap: per sample, the global-image budget at which the policy's answer departs from
its answer on the original (the offline "resolution selection"), and how a training run assigns levels.

    python infogap.py --model M --data D.jsonl --out D.infogap.jsonl        # or train.py --infogap auto

The reference answer is the policy's, greedy and without the tool, on the original image at full resolution
(up to --reference-tokens, 16,384 by default). Then down the ladder: the first budget whose answer is a
different answer (compared as the accuracy reward compares answers: "B" and "(B) red" agree) is the sample's
level, its global image in training. A reply without <answer> is "no answer", not a divergence. A sample whose
answers never diverge is flagged; the run decides what to do with it (Config.infogap_never).
"""
import argparse
import hashlib
import json
import os
import re
from collections import Counter

from tqdm import tqdm

import crop
import data
import rewards
from model import PROMPTS, load_policy
from rollout import RolloutConfig, rollout_skipping_bad_images

LADDER = "4096,1024,256,64"  # global budgets below the reference, largest first [choice]


def _answers(policy, samples, tokens, max_tokens, prompt, bad):
    """Greedy replies without the tool at a global budget: {id: the <answer> content, or None}. A sample whose
    image fails to decode is left out, with its reason in `bad` (id -> reason) and one line."""
    cfg = RolloutConfig(greedy=True, probe="no-tool", max_turns=1, max_turn_tokens=max_tokens,
                        max_response_tokens=max_tokens, global_tokens=tokens, prompt=prompt)
    return {e.sample.id: rewards.extract_answer(e.text) for e in rollout_skipping_bad_images(policy, samples, cfg, bad)}


def select(model_name, spec, ladder, out, *, adapter=None, reference_tokens=16384, max_tokens=1024, batch=8,
           seed=0, prompt="deepeyes", matcher="rule", columns=None):
    """Select every sample's level; one JSON line per sample is appended to `out` as its batch finishes, so a
    rerun skips what is done (a file made with other settings is refused). A sample whose image does not
    decode gets a row with its `error`: training leaves it out. Returns read_levels(out)."""
    samples = data.load(spec, seed, columns=columns)
    for s in samples:  # a level a row carries would be its global image at every rung (the rollout shows it)
        s.global_tokens = None
    ladder = sorted((t for t in ladder if t < reference_tokens), reverse=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    data.cut_partial_line(out)  # a killed selection: its cut last line is redone, not appended onto
    settings = dict(model=model_name, adapter=adapter, adapter_sha256=data.adapter_fingerprint(adapter),
                    reference_tokens=reference_tokens, ladder=ladder, max_tokens=max_tokens, prompt=prompt,
                    matcher=matcher)
    done = read_levels(out) if os.path.exists(out) else {}
    _check_settings(done, settings, out)
    todo = [s for s in samples if s.id not in done]
    policy = load_policy(model_name, adapter=adapter, lora=False, trainable=False) if todo else None
    for i in tqdm(range(0, len(todo), batch), desc="infogap", unit="batch"):
        group, bad = todo[i:i + batch], {}
        by_id = {s.id: s for s in group}
        reference = _answers(policy, group, reference_tokens, max_tokens, prompt, bad)
        answers = {s.id: {} for s in group}
        level = {}
        # no reference answer (or image): nothing to depart from
        open_ = [s for s in group if reference.get(s.id) is not None]
        for tokens in ladder:  # down the ladder, only for the samples still undecided
            if not open_:
                break
            for s_id, a in _answers(policy, open_, tokens, max_tokens, prompt, bad).items():
                answers[s_id][str(tokens)] = a
                s = by_id[s_id]
                if a is not None and not rewards.same_answer(a, reference[s_id], s.options,
                                                             rewards.matcher_for(s, matcher)):
                    level[s_id] = tokens
            open_ = [s for s in open_ if s.id not in level and s.id not in bad]
        with open(out, "a") as f:
            for s in group:
                row = dict(id=s.id, global_tokens=level.get(s.id), diverged=s.id in level,
                           reference=reference.get(s.id), answers=answers[s.id], **settings)
                f.write(json.dumps(dict(row, error=bad[s.id]) if s.id in bad else row) + "\n")
    levels = read_levels(out)
    rows = [r for r in levels.values() if not r.get("error")]
    print(f"information-gap levels in {out}: " + ", ".join(
        f"{t} tokens: {sum(r['global_tokens'] == t for r in rows)}" for t in ladder)
        + f"; never diverged: {sum(not r['diverged'] for r in rows)} of {len(rows)} ("
        f"{sum(r['reference'] is None for r in rows)} of them without a reference answer)"
        + (f"; {len(levels) - len(rows)} whose image did not decode" if len(rows) < len(levels) else ""))
    return levels


def _check_settings(done, settings, out):
    """A selection resumed with other settings (another model, ladder, budget, ...) would mix two selections:
    refused, naming what differs. A row without a setting (an older file) is not checked on it."""
    row = next(iter(done.values()), None)
    differ = [k for k, v in settings.items() if row is not None and k in row and row[k] != v]
    if differ:
        raise SystemExit(f"error: {out} holds a selection made with other settings: " + ", ".join(
            f"{k}={row[k]!r} there, {settings[k]!r} now" for k in differ) + ". Pass another --out, or remove it")


def read_levels(path):
    """id -> the row of an infogap JSONL (global_tokens or None, diverged, reference, ladder, ...). A last line cut
    by a killed selection is left out, with a line; a line that is not a selection's row stops, naming it."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: info-gap file not found: {path} (make it with python infogap.py, or pass "
                         f"--infogap auto)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # no newline after it: cut by a kill
                print(f"warning: {path}:{n} is cut (a killed selection): left out; python infogap.py finishes it")
                continue
            raise SystemExit(f"error: {path}:{n} is not JSON") from None
        if not isinstance(row, dict) or "id" not in row or "diverged" not in row or not _gives_level(row):
            raise SystemExit(f"error: {path}:{n} is not a row of an information-gap selection (--infogap FILE "
                             f"takes what python infogap.py or --infogap auto wrote)")
        rows[row["id"]] = row
    return rows


def _gives_level(row):
    """A selection's row gives its sample a level: the budget it diverged at, else its ladder and reference (an
    image that did not decode, none)."""
    if row.get("error"):
        return True
    if row["diverged"]:
        return type(row.get("global_tokens")) is int
    return isinstance(row.get("ladder"), list) and type(row.get("reference_tokens")) is int


def cache_path(cfg):
    """Where --infogap auto keeps its selection: next to the data file (runs/ for synthetic data), named by
    what the selection depends on, so a different model, adapter (by content) or ladder never reuses it."""
    key = json.dumps([cfg.model, cfg.init_adapter, cfg.infogap_ladder, cfg.infogap_reference_tokens,
                      cfg.infogap_max_tokens, cfg.prompt, cfg.matcher, cfg.seed] + ([cfg.columns] if cfg.columns else [])
                     + ([data.adapter_fingerprint(cfg.init_adapter)] if cfg.init_adapter else []))
    tag = hashlib.sha256(key.encode()).hexdigest()[:8]
    if os.path.exists(cfg.data):
        return f"{os.path.splitext(cfg.data.rstrip('/'))[0]}.infogap-{tag}.jsonl"
    return _runs_path(cfg.data, tag)


def _runs_path(spec, tag):
    """Generated data, or several sources ("a.parquet,b.json"): a file of its own under runs/, named after the
    spec (shortened) and a hash of it with `tag`, so that two specs never share one."""
    digest = hashlib.sha256((spec + tag).encode()).hexdigest()[:8]
    return os.path.join("runs", re.sub(r"[^\w.-]+", "_", spec)[-60:].strip("_.") + f".infogap-{digest}.jsonl")


NO_LEVELS = ("error: stage 1 needs each sample's information-gap level, and {data} has none. Choose one:\n"
             "  --infogap auto      select them now with the policy (cached next to the data, resumable)\n"
             "  --infogap FILE      levels from python infogap.py\n"
             "  --infogap fixed:N   one global budget of N tokens for every sample\n"
             "  --infogap off       no gap: crops cut from the shown image (the paper's same-resolution baseline)")


def prepare(cfg, samples):
    """Give each sample its global-image level for a run from cfg.infogap (see Config), and return the
    samples to train on. Prints what a file or the data assigned (off and fixed:N say it in the run's config);
    stops when stage 1 would otherwise train without a gap."""
    setting = cfg.infogap
    if setting == "off":  # the baseline: every global image at the run's budget
        for s in samples:
            s.global_tokens = None
        return samples
    if setting.startswith("fixed:"):
        level = setting.split(":", 1)[1]
        if not level.isdigit() or int(level) < 4:
            raise SystemExit(f"error: --infogap {setting!r}: expected fixed:N with N >= 4 tokens")
        for s in samples:
            s.global_tokens = int(level)
        return samples
    if setting == "auto":
        setting = cache_path(cfg)
        select(cfg.model, cfg.data, crop.parse_budgets(cfg.infogap_ladder, "--infogap_ladder"), setting,
               adapter=cfg.init_adapter or None, reference_tokens=cfg.infogap_reference_tokens,
               max_tokens=cfg.infogap_max_tokens, seed=cfg.seed, prompt=cfg.prompt, matcher=cfg.matcher,
               columns=cfg.columns)
    if setting:
        samples = _apply_levels(read_levels(setting), samples, cfg.infogap_never, setting)
    else:  # generated data (synthetic, micro: each part of a mixed spec) has the level it was drawn for
        designed = [s for s in samples if s.designed_tokens and not s.global_tokens]
        for s in designed:
            s.global_tokens = s.designed_tokens
        if designed:
            levels = ", ".join(f"{n} at {t} tokens" for t, n in sorted(Counter(s.designed_tokens for s in designed).items()))
            print(f"generated data: its designed information-gap levels ({levels})")
    without = sum(not s.global_tokens for s in samples)
    if cfg.stage == 1 and without == len(samples):
        raise SystemExit(NO_LEVELS.format(data=cfg.data))
    if cfg.stage == 1 and without:
        print(f"warning: {without} of {len(samples)} samples have no information-gap level: they train at "
              f"global_tokens={cfg.global_tokens}, with no gap")
    _report_above_budget(samples, cfg.global_tokens)
    return samples


def _apply_levels(levels, samples, never, path):
    """Set levels from a selection; a sample that never diverged follows `never`: coarsest (the ladder's
    smallest budget, the largest gap), reference (its reference budget: no gap) or drop."""
    if never not in ("coarsest", "reference", "drop"):
        raise SystemExit(f"error: --infogap_never {never!r}: expected coarsest, reference or drop")
    kept, missing, unreadable, undiverged = [], 0, 0, 0
    for s in samples:
        row = levels.get(s.id)
        if row is None:  # not selected (a file of other data): trained at the run's budget, it would have no gap
            missing += 1
            continue
        if row.get("error"):  # its image did not decode in the selection
            unreadable += 1
            continue
        if row["diverged"]:
            s.global_tokens = int(row["global_tokens"])
        else:
            undiverged += 1
            if never == "drop":
                continue
            s.global_tokens = min(row["ladder"]) if never == "coarsest" and row["ladder"] else row["reference_tokens"]
        kept.append(s)
    diverged = len(samples) - missing - unreadable - undiverged
    print(f"info-gap levels from {path}: {diverged} diverged, {undiverged} never diverged "
          f"({'dropped' if never == 'drop' else never})"
          + (f"; left out: {missing} not in it" if missing else "")
          + (f"{', ' if missing else '; left out: '}{unreadable} whose image did not decode" if unreadable else ""))
    if not kept:
        raise SystemExit(f"error: no sample is left to train on with the levels of {path} (the counts above)")
    return kept


def _report_above_budget(samples, budget):
    """A level is the sample's global image, never capped; say how many exceed the budget memory was sized for."""
    above = [s.global_tokens for s in samples if s.global_tokens and s.global_tokens > budget]
    if above:
        print(f"note: {len(above)} of {len(samples)} samples have an information-gap level above global_tokens="
              f"{budget} (up to {max(above)} tokens); their global images are larger than the memory estimate "
              f"assumes: raise global_tokens to {max(above)} to size it, or use a smaller ladder")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic:4", help=data.SPECS)
    ap.add_argument("--columns", default=None, help=data.COLUMNS)
    ap.add_argument("--seed", type=int, default=0, help="generated data's seed: the training run's --seed (its "
                                                        "samples' ids carry it)")
    ap.add_argument("--model", default="tiny", help="the policy that answers")
    ap.add_argument("--adapter", default=None, help="an adapter for the policy")
    ap.add_argument("--ladder", default=LADDER, help="global budgets below the reference, largest first")
    ap.add_argument("--reference-tokens", type=int, default=16384, help="the reference answer's budget")
    ap.add_argument("--max-tokens", type=int, default=1024, help="tokens per answer (a 7B thinks before answering)")
    ap.add_argument("--prompt", default="deepeyes", choices=PROMPTS, help="prompt wording")
    ap.add_argument("--matcher", default="rule", choices=list(rewards.MATCHERS), help="short-answer matcher")
    ap.add_argument("--out", default=None, help="output JSONL (default: DATA.infogap.jsonl beside a data file, "
                                                "else a file under runs/)")
    args = ap.parse_args()
    for option, value, least in (("--reference-tokens", args.reference_tokens, 4),
                                 ("--max-tokens", args.max_tokens, 1)):
        if value < least:
            raise SystemExit(f"error: {option} must be at least {least}, got {value}")
    out = args.out or (args.data.rstrip("/").removesuffix(".jsonl") + ".infogap.jsonl" if os.path.exists(args.data)
                       else _runs_path(args.data, "cli"))
    select(args.model, args.data, crop.parse_budgets(args.ladder, "--ladder"), out, adapter=args.adapter,
           reference_tokens=args.reference_tokens, max_tokens=args.max_tokens, seed=args.seed, prompt=args.prompt,
           matcher=args.matcher, columns=args.columns)


if __name__ == "__main__":
    main()
