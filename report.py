"""The HTML report of an evaluation: one self-contained page (images inlined), written by eval.py --html.

    python eval.py --bench vstar --data vstar_bench --limit 20 --html runs/eval/vstar.html

On top, the summary as a table; then one section per item: the image with the model's boxes (red) and the
ground truth (lime), and the transcript turn by turn (thinking, tool call, tool reply with the crop it
returned beside the box that made it, answer), wrapped to the page's width.
"""
import base64
import html
import io
import re

import crop

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
TURN = re.compile(r"<think>(?P<think>.*?)</think>|<tool_call>(?P<call>.*?)</tool_call>"
                  r"|<tool_response>(?P<reply>.*?)</tool_response>|<answer>(?P<answer>.*?)</answer>", re.S)
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


def turns(text, original, boxes):
    """The transcript as a list of HTML turns; each tool reply that carried an image shows the next crop
    (cut from the original, as the model saw it) beside the box that made it."""
    parts, crops, pos = [], iter(boxes), 0
    for m in TURN.finditer(text):
        parts.append(_plain(text[pos:m.start()]))
        kind = m.lastgroup
        body = html.escape(m.group(kind).strip())
        if kind == "reply" and "<|vision_start|>" in m.group(kind):
            box = next(crops, None)
            body = (f"<div class='crop'>{png(original.crop(tuple(box)), 220, 'crop')}<span>box "
                    f"{[round(v) for v in box]} (original pixels)</span></div>") if box else body
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


def write_html(path, items, samples, summary_md, thumb=512):
    """One self-contained page: the summary, then one section per item."""
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
                     f"{turns(it['text'], original, it['boxes'])}</section>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "</body></html>")
