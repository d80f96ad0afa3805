"""Figures: the training curves of one or several runs, and the global-budget sweep of eval.py.

    python plot.py runs/stage1                          # -> runs/stage1/curves.png
    python plot.py runs/stage1 runs/baseline --out cmp.png   # runs overlaid, one colour each
    python plot.py --sweep runs/eval/sweep-vstar        # sweep.json there -> sweep.png beside it

Reads only the files runs write (metrics.jsonl, sweep.json) and imports nothing of the project, so it also
runs on a laptop holding copies of those files. matplotlib's Agg backend: no display needed.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One panel per entry: (title, [(metrics.jsonl key, how to draw it), ...]). The first key of a panel is drawn
# solid, a second one dashed. A key may name a transform: "-format" is the share of malformed episodes.
PANELS = [
    ("reward (mean, band: std of group means)", ["reward"]),
    ("accuracy", ["accuracy"]),
    ("format errors (share of episodes)", ["-format"]),
    ("tool calls (solid), tool errors (dashed) per episode", ["tool_calls", "tool_errors"]),
    ("first crop: best IoU (solid), B1 coverage (dashed)", ["iou", "coverage"]),
    ("held-out accuracy (solid), crops -> noise (dashed)", ["heldout_accuracy", "heldout_noise_accuracy"]),
    ("crop dependency (held-out)", ["crop_dependency"]),
    ("response length (tokens)", ["response_len"]),
    ("loss", ["loss"]),
    ("gradient norm", ["grad_norm"]),
    ("clip fraction", ["clip_frac"]),
    ("seconds per step", ["seconds"]),
]
STYLES = ("-", "--")


def read_metrics(path):
    """The rows of a metrics.jsonl (a run folder or the file). A line cut by a kill is skipped and counted."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no metrics file at {path} (plot.py wants a run folder holding metrics.jsonl)")
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
            elif line.strip():
                bad += 1
    if bad:
        print(f"skipped {bad} unreadable line(s) of {path}")
    return rows


def _series(rows, key):
    """(steps, values) of a key; "-key" negates it. Rows without the key (older runs) are left out."""
    sign, key = (-1, key[1:]) if key.startswith("-") else (1, key)
    pts = [(r["step"], sign * r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_names(paths):
    """Legend names: each run folder's own name, or its path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [os.path.normpath(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def plot_curves(runs, out, dpi=72):
    """runs: {name: metrics rows}. One panel per PANELS entry, one colour per run; returns the figure
    (closed; its artists stay readable) after writing `out` atomically."""
    cols = 5
    fig, axes = plt.subplots(math.ceil(len(PANELS) / cols), cols, figsize=(3.2 * cols, 2.6 * math.ceil(len(PANELS) / cols)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for i, (name, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            for key, style in zip(keys, STYLES):
                steps, values = _series(rows, key)
                ax.plot(steps, values, style, color=color, lw=1.3, label=name if style == "-" else f"{name} ({key})")
            if keys == ["reward"]:
                _band(ax, rows, color)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.remove()
    handles = [plt.Line2D([], [], color=colors[i % len(colors)]) for i in range(len(runs))]
    fig.legend(handles, list(runs), loc="upper center", ncol=min(len(runs), 6), fontsize=8, frameon=False)
    fig.supxlabel("step", fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.1, top=0.88, wspace=0.25, hspace=0.35)  # tight_layout: 2x slower
    _save(fig, out, dpi)
    return fig


def _band(ax, rows, color):
    """Mean reward +- the std of the group means (metrics written before reward_std existed: no band)."""
    pts = [(r["step"], r["reward"], r["reward_std"]) for r in rows if "reward_std" in r and "reward" in r]
    if pts:
        steps, mean, std = zip(*pts)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.2, lw=0)


def _save(fig, out, dpi):
    """Write to a temporary name and rename: a run killed mid-write never leaves a half PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out)


def curves(paths, out=None):
    """Read the runs' metrics and draw them; the default output is curves.png in the first run's folder."""
    runs = dict(zip(run_names(paths), (read_metrics(p) for p in paths)))
    out = out or os.path.join(paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0]), "curves.png")
    fig = plot_curves(runs, out)
    print(f"curves: {out}")
    return fig


# ---------------------------------------------------------------- the global-budget sweep

SWEEP_LINES = (("plain", "-", "with the tool"), ("noise", "--", "noise crops"), ("no-tool", ":", "without the tool"))


def plot_sweep(points, out, dpi=80):
    """points: [{model, global_tokens, plain, noise, no-tool}] accuracies in [0, 1]. Left: accuracy against
    the global image's budget (one colour per model; solid with the tool, dashed with noise crops, dotted
    without the tool). Right: crop dependency (accuracy with real crops minus with noise crops)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(p["model"] for p in points))
    for i, model in enumerate(models):
        pts = sorted((p for p in points if p["model"] == model), key=lambda p: p["global_tokens"])
        budgets = [p["global_tokens"] for p in pts]
        for key, style, what in SWEEP_LINES:
            left.plot(budgets, [100 * p[key] for p in pts], style, marker="o", color=colors[i % len(colors)],
                      label=f"{model}: {what}")
        right.plot(budgets, [100 * (p["plain"] - p["noise"]) for p in pts], "-", marker="o",
                   color=colors[i % len(colors)], label=model)
    for ax, ylabel in ((left, "accuracy (%)"), (right, "crop dependency (points)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global image budget (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    right.axhline(0, color="grey", lw=0.8)
    fig.tight_layout()
    _save(fig, out, dpi)
    return fig


def sweep(path, out=None):
    """Draw the sweep.json that `eval.py --sweep` wrote (a folder holding it, or the file)."""
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: eval.py --sweep writes it")
    with open(path, encoding="utf-8") as f:
        points = json.load(f)
    out = out or os.path.join(os.path.dirname(path), "sweep.png")
    fig = plot_sweep(points, out)
    print(f"sweep figure: {out}")
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run folders (or metrics.jsonl files), overlaid in one figure")
    ap.add_argument("--sweep", default=None, help="a sweep folder (or its sweep.json) written by eval.py --sweep")
    ap.add_argument("--out", default=None, help="the PNG to write (default: beside the first input)")
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(args.sweep, args.out)
    if not args.runs:
        ap.error("give one or more run folders, or --sweep DIR")
    return curves(args.runs, args.out)


if __name__ == "__main__":
    main()
