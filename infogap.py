"""Stage 1's information gap: per sample, the global-image budget at which the policy stops being able to
answer from the global image (offline selection), and the rules by which training assigns levels.

    python infogap.py --model M --data D.jsonl --ladder 16384,4096,1024,256,64 --out D.infogap.jsonl
"""
import argparse
import json
import os

from tqdm import tqdm

import data
import rewards
from model import load_policy
from rollout import RolloutConfig, rollout


def select(model_name, spec, ladder, out, adapter=None, max_tokens=64, batch=8, seed=0):
    """Offline information-gap selection (LFPC stage 1). Per sample, the policy answers greedily, without the
    tool, from the global image at each budget of the ladder (largest first). The first level whose answer
    differs from the answer at the largest is the sample's level; a sample that never diverges keeps the
    smallest and is flagged. Appends one JSON line per sample to `out`; a rerun skips what is done."""
    samples = data.load(spec, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {json.loads(line)["id"] for line in f if line.strip()}
    todo = [s for s in samples if s.id not in done]
    policy = load_policy(model_name, adapter=adapter, lora=False, trainable=False) if todo else None
    for i in tqdm(range(0, len(todo), batch), desc="infogap", unit="batch"):
        group = todo[i:i + batch]
        answers = {}
        for level in ladder:
            cfg = RolloutConfig(greedy=True, probe="no-tool", max_turns=1, max_turn_tokens=max_tokens,
                                max_response_tokens=max_tokens, global_tokens=level)
            for s, e in zip(group, rollout(policy, group, cfg)):
                reply = rewards.extract_answer(e.text)
                answers.setdefault(s.id, []).append(rewards.normalize(reply if reply is not None else e.text))
        with open(out, "a") as f:
            for s in group:
                a = answers[s.id]
                first = next((k for k in range(1, len(ladder)) if a[k] != a[0]), None)
                f.write(json.dumps(dict(id=s.id, global_tokens=ladder[first if first else -1],
                                        diverged=first is not None, answers=dict(zip(map(str, ladder), a)))) + "\n")
    levels = read_levels(out)
    print("levels (global tokens: samples): " + ", ".join(
        f"{lv}: {sum(v == lv for v, _ in levels.values())}" for lv in ladder)
        + f"; never diverged: {sum(not d for _, d in levels.values())}")
    return levels


def read_levels(path):
    """id -> (global_tokens, diverged) from an infogap JSONL."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: info-gap file not found: {path} (make it with python infogap.py)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["id"]: (int(r["global_tokens"]), bool(r["diverged"])) for r in rows}


def assign(setting, samples):
    """Set each sample's global-image level from a run's `infogap` setting: "" (the samples' own levels, if
    any), "off" (no gap), "fixed:N" (one budget for all) or a levels file from select()."""
    if setting in ("", "off"):
        return
    if setting.startswith("fixed:"):
        level = setting.split(":", 1)[1]
        if not level.isdigit() or int(level) < 4:
            raise SystemExit(f"error: --infogap {setting!r}: expected fixed:N with N >= 4 tokens")
        for s in samples:
            s.global_tokens = int(level)
        return
    levels = read_levels(setting)
    for s in samples:
        s.global_tokens = levels.get(s.id, (None,))[0]
    missing = sum(s.id not in levels for s in samples)
    print(f"info-gap levels from {setting}" + (f"; {missing} sample(s) have none (global_tokens)" if missing else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic:4", help="synthetic[:N], a .jsonl, a .parquet or a folder")
    ap.add_argument("--model", default="tiny", help="the policy that answers")
    ap.add_argument("--adapter", default=None, help="an adapter for the policy")
    ap.add_argument("--ladder", default="16384,4096,1024,256,64", help="global budgets, largest first")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--out", default=None, help="output JSONL (default: DATA.infogap.jsonl)")
    args = ap.parse_args()
    ladder = sorted((int(x) for x in args.ladder.split(",")), reverse=True)
    out = args.out or args.data.replace(":", "_").removesuffix(".jsonl") + ".infogap.jsonl"
    select(args.model, args.data, ladder, out, args.adapter, args.max_tokens)


if __name__ == "__main__":
    main()
