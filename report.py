"""An evaluation's reports: the HTML page (one self-contained file, images inlined) that eval.py --html writes,
and the markdown tables eval.py prints: one run's summary, its probes, the experiment's models over seeds.

    python eval.py --bench vstar --data vstar_bench --limit 20 --html runs/eval/vstar.html

The page: on top, the summary as a table; then one section per item: the image with the model's boxes (red) and the
ground truth (lime), and the transcript turn by turn (thinking, tool call, tool reply with the crop it
returned beside the box that made it, answer), wrapped to the page's width.
"""
import base64
import html
import io
import os
import re
import statistics

import crop
from rollout import DEPENDENCY_PROBE

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin: 0 0 .5em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ccc; padding: .25em .7em; }
th { background: #f3f3f3; } td:not(:first-child) { text-align: right; }
section.item { border-top: 2px solid #ddd; padding: 1em 0; }
.right { color: #176b2c; } .wrong { color: #a4161a; }
.turn { white-space: pre-wrap; overflow-wrap: anywhere; font: 12.5px/1.4 ui-monospace, monospace;
        border-left: 4px solid #bbb; padding: .3em .6em; margin: .35em 0; background: #fafafa; }
.turn b { font-family: system-ui, sans-serif; font-size: 11px; text-transform: uppercase; color: #555; display: block; }
.think { border-color: #9aa5b1; } .call { border-color: #e07a00; } .reply { border-color: #2b7bb9; }
.answer { border-color: #2a9d3a; } .error { border-color: #a4161a; }
.crop { display: flex; gap: 1em; align-items: center; } img { max-width: 100%; border: 1px solid #ccc; }
"""
# The parts of a transcript, in the order the protocol writes them; anything else is plain text.
# a bad call's reply: "Error: ..." inside <tool_response> (the qwen prompt), or a bare user turn (deepeyes)
TURN = re.compile(r"<think>(?P<think>.*?)</think>|<tool_call>(?P<call>.*?)</tool_call>"
                  r"|<tool_response>(?P<reply>.*?)</tool_response>|<answer>(?P<answer>.*?)</answer>"
                  r"|(?<=<\|im_start\|>user\n)(?P<error>Error: .*?)(?=<\|im_end\|>|$)", re.S)
CHAT_MARKERS = re.compile(r"<\|im_(?:start|end)\|>(?:assistant|user)?\n?|<\|endoftext\|>")


def png(im, side, cls=""):
    """An <img> with the image inlined as PNG, at most `side` pixels on its longer side."""
    im = im.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f"<img class='{cls}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def markdown_html(md):
    """The summary's markdown (a heading, one table, lines of text) as HTML."""
    out, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # not the |---| rule
                table.append([c.strip().strip("*") for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            table = []
        if line.startswith("#"):
            out.append(f"<h2>{html.escape(line.lstrip('#').strip())}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def turns(text, original, boxes, probe=None):
    """The transcript as a list of HTML turns; each tool reply that carried an image shows the next crop
    (cut from the original, as the model saw it, unless a noise probe gave it noise instead) beside its box."""
    seen = "original pixels" if probe not in ("noise", "noise-replace") else \
        f"original pixels; the model was given noise instead (--probe {probe})"
    parts, crops, pos = [], iter(boxes), 0
    for m in TURN.finditer(text):
        parts.append(_plain(text[pos:m.start()]))
        kind = m.lastgroup
        body = html.escape(m.group(kind).strip())
        if kind == "reply" and "<|vision_start|>" in m.group(kind):
            box = next(crops, None)
            body = (f"<div class='crop'>{png(original.crop(tuple(box)), 220, 'crop')}<span>box "
                    f"{[round(v) for v in box]} ({seen})</span></div>") if box else body
        elif kind == "reply":
            kind = "error" if "Error" in m.group(kind) else kind
        label = dict(think="thinking", call="tool call", reply="tool reply", error="tool error", answer="answer")[kind]
        parts.append(f"<div class='turn {kind}'><b>{label}</b>{body}</div>")
        pos = m.end()
    parts.append(_plain(text[pos:]))
    return "".join(p for p in parts if p)


def _plain(text):
    text = CHAT_MARKERS.sub("", text).strip()
    return f"<div class='turn'><b>text</b>{html.escape(text)}</div>" if text else ""


def write_html(path, items, samples, summary_md, thumb=512, probe=None):
    """One self-contained page: the summary, then one section per item (probe: the run's --probe)."""
    title = f"LFPC evaluation: {summary_md.splitlines()[0].lstrip('#').strip()}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>", markdown_html(summary_md)]
    for it in items:
        s = samples[it["id"]]
        original = s.image()
        width = max(2, s.width // 300)
        im = crop.draw_boxes(original, it["boxes"], colors=("red",), width=width)
        if it["gt_boxes"]:
            im = crop.draw_boxes(im, it["gt_boxes"][:1], colors=("lime",), width=width)
        mark = "right" if it["correct"] else "wrong"
        parts.append(f"<section class='item' id='{html.escape(it['id'])}'><h2>{html.escape(it['id'])} "
                     f"[{html.escape(it['category'])}]: <span class='{mark}'>{mark}</span> (answer "
                     f"{html.escape(it['answer'])}, reply {html.escape(str(it['reply'])[:80])})</h2>"
                     f"{png(im, thumb, 'full')}<p>red: the model's boxes; lime: the ground truth</p>"
                     f"{turns(it['text'], original, it['boxes'], probe)}</section>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # --html into a folder not made yet
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "</body></html>")


# ---------------------------------------------------------------- markdown tables (eval.py prints them)

def markdown(summary):
    """One evaluation's summary as markdown: accuracy per category, the benchmark's own scores, settings, tool use."""
    rows = [f"| {c} | {summary['count_per_category'][c]} | {100 * a:.1f} |" for c, a in summary["per_category"].items()]
    lines = [f"### {summary['name']}", "", "| category | items | accuracy (%) |", "|---|---|---|", *rows,
             f"| **overall** | {summary['num_items']} | **{100 * summary['accuracy']:.1f}** |", ""]
    if summary.get("num_total", summary["num_items"]) > summary["num_items"]:
        unreadable = summary.get("num_unreadable", 0)
        why = ([f"{unreadable} unreadable in the benchmark's file, listed in skipped.txt"] if unreadable else []) + (
            ["shards or a run still going"] if summary["num_items"] + unreadable < summary["num_total"] else [])
        lines.append(f"**partial: {summary['num_items']} of {summary['num_total']} items** ({'; '.join(why)})")
    if "official" in summary:
        official, deepeyes = summary["official"], summary.get("deepeyes")
        lines.append("HR-Bench official (per cycle, averaged) " + (f"{100 * official:.1f}" if official is not None
                                                                   else "n/a (no cycle_category)")
                     + "; DeepEyes' (mean of FSP and FCP) " + (f"{100 * deepeyes:.1f}" if deepeyes is not None else "n/a"))
    for key in ("per_task", "per_subtask"):
        if summary.get(key):
            lines.append(key.replace("_", " ") + ": " + ", ".join(f"{k} {100 * v:.1f}" for k, v in summary[key].items()))
    if summary.get("settings"):
        lines.append("settings: " + ", ".join(f"{k} {v}" for k, v in summary["settings"].items() if v is not None))
    lines.append(f"tool calls per item {summary['tool_calls']:.2f}, tool errors per item "
                 f"{summary['tool_errors']:.2f}, {summary['seconds_per_item']:.2f} s per item")
    return "\n".join(lines)


# the README's experiment: row names of the adapters the Makefile's targets write
ROW_NAMES = {None: "warm start", "runs/baseline/final": "stage 1, no information gap (baseline)",
             "runs/stage1/final": "stage 1, information gap", "runs/stage2/final": "stage 1 + stage 2"}


def experiment_rows(tables):
    """(order, name, values, partial) per model, in the README's order; values: accuracy, with noise crops, crop
    dependency (the accuracy lost), tool calls per episode and the IoU of the first crop with B1 (items that
    cropped); None where not measured. partial: "n of N items" when a run has not covered its benchmark, else
    None."""
    rows = []
    for results in tables:
        plain, noisy = results["none"], results.get(DEPENDENCY_PROBE)
        adapter = (plain.get("settings") or {}).get("adapter")
        # a run folder of `make experiment` (runs/exp/s0/stage1/final) is named as the Makefile's own, by its last
        # two folders (runs/ablate_stage1/final is not stage1/final)
        tail = os.path.normpath(adapter).split(os.sep)[-2:] if adapter else None
        name = next((n for a, n in ROW_NAMES.items() if a and tail == a.split("/")[1:]),
                    ROW_NAMES[None] if adapter is None else adapter)
        order = list(ROW_NAMES.values()).index(name) if name in ROW_NAMES.values() else len(ROW_NAMES)
        noisy_acc = noisy and noisy["accuracy"]
        short = [r for r in (plain, noisy) if r and r.get("num_items", 0) < r.get("num_total", 0)]
        partial = f"{min(r['num_items'] for r in short)} of {short[0]['num_total']} items" if short else None
        rows.append((order, name, [plain["accuracy"], noisy_acc, None if noisy is None else plain["accuracy"] - noisy_acc,
                                   plain["tool_calls"], plain.get("iou_first_crop")], partial))
    return sorted(rows, key=lambda r: r[:2])


TABLE_HEAD = ["| model | accuracy (%) | with noise crop (%) | crop dependency (points) | tool calls / episode | "
              "IoU of first crop with B1 (%) |", "|---|---|---|---|---|---|"]
TABLE_NOTE = (f"crop dependency: points of accuracy lost with --probe {DEPENDENCY_PROBE} (every returned crop "
              "replaced by noise)")
SCALES = (100, 100, 100, 1, 100)  # the columns' units: % and points, tool calls as they are


def _cell(xs, scale):
    """A table cell: the mean of the measured values (None: not measured), then with several their (sample)
    standard deviation and each value in order, n/a where one was not measured."""
    d = 1 if scale == 100 else 2
    got = [scale * x for x in xs if x is not None]
    if not got:
        return "n/a"
    each = ", ".join("n/a" if x is None else f"{scale * x:.{d}f}" for x in xs)
    spread = f" ± {statistics.stdev(got):.{d}f} ({each})" if len(got) > 1 else f" ({each})" if len(xs) > 1 else ""
    return f"{sum(got) / len(got):.{d}f}{spread}"


def experiment_table(tables):
    """One line per model (setting), the paper's columns."""
    lines = [f"| {name}{f' (partial: {partial})' if partial else ''} | "
             + " | ".join(_cell([v], k) for v, k in zip(values, SCALES)) + " |"
             for _, name, values, partial in experiment_rows(tables)]
    return "\n".join(["", TABLE_NOTE, "", *TABLE_HEAD, *lines])


def seeds_table(per_seed, seeds):
    """The experiment table over seeds (`make experiment`): each cell the mean ± standard deviation, then each
    seed's value; the seeds column names the seeds a row was measured on."""
    cells, partial = {}, []
    for seed, tables in zip(seeds, per_seed):
        for order, name, values, short in experiment_rows(tables):
            cells.setdefault((order, name), []).append((seed.lstrip("s") + ("*" if short else ""), values))
            partial += [f"{name}, seed {seed.lstrip('s')}: {short}"] if short else []
    lines = [f"| {name} | {','.join(s for s, _ in got)} | "
             + " | ".join(_cell([v[i] for _, v in got], k) for i, k in enumerate(SCALES)) + " |"
             for (_, name), got in sorted(cells.items())]
    head = [TABLE_HEAD[0].replace("| model |", "| model | seeds |"), TABLE_HEAD[1] + "---|"]
    note = ["", "* partial (a run that has not covered its benchmark): " + "; ".join(partial)] if partial else []
    return "\n".join(["", TABLE_NOTE + "; mean ± standard deviation over the seeds, then each seed's value", "",
                      *head, *lines, *note])


def probes_table(bench, results):
    """One setting's accuracy with and without each probe, and the crop dependency."""
    base = results["none"]["accuracy"]
    rows = [f"| {p} | {s['num_items']} of {s['num_total']} | {100 * s['accuracy']:.1f} | "
            f"{100 * (s['accuracy'] - base):+.1f} |" for p, s in results.items()]
    text = "\n".join([f"### {bench}: probes ({results['none']['name']})", "",
                      "| probe | items | accuracy (%) | change (points) |", "|---|---|---|---|", *rows])
    for probe, what in (("noise", "noise is added to the crops"), ("noise-replace", "crops are replaced by noise")):
        if probe in results:
            text += (f"\n\ncrop dependency (accuracy lost when {what}): "
                     f"{100 * (base - results[probe]['accuracy']):.1f} points")
    return text
