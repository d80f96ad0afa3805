"""The HTML report (report.py), checked by parsing it: a title, the summary as a table, one section per item,
each turn of the transcript set apart, every crop image referenced; undecodable bytes shown as escapes."""
import json
from html.parser import HTMLParser
from types import SimpleNamespace

from PIL import Image

import data
import eval as ev
import model
import report
from helpers import tiny_policy

TEXT = ('<think>The label is small.</think>\n<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
        '[1, 2, 3, 4]}}</tool_call><|im_end|>\n<|im_start|>user\n<tool_response><|vision_start|><|vision_end|>'
        '</tool_response><|im_end|>\n<|im_start|>assistant\n<tool_call>{bad</tool_call><|im_end|>\n<|im_start|>user\n'
        '<tool_response>Error: not JSON</tool_response><|im_end|>\n<|im_start|>assistant\n'
        '<think>' + "a long line " * 60 + '</think><answer>B</answer><|im_end|>')


class Page(HTMLParser):
    """Tags of interest, with their classes."""

    def __init__(self):
        super().__init__()
        self.title, self.tags, self._in_title = "", [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs).get("class") or ""))
        self._in_title = tag == "title"

    def handle_data(self, text):
        self.title += text if self._in_title else ""

    def handle_endtag(self, tag):
        self._in_title = False


def _items_and_samples(tmp_path):
    Image.new("RGB", (300, 200), "navy").save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(dict(id=i, image="a.png", question="q?", answer="B",
                                                                options=["x", "y"])) for i in ("a", "b")))
    samples = {s.id: s for s in data.read_jsonl(str(tmp_path / "d.jsonl"))}
    items = [dict(id="a", category="default", answer="B", reply="B", correct=True, text=TEXT,
                  boxes=[[10, 20, 110, 90]], gt_boxes=[[12, 22, 100, 80]]),
             dict(id="b", category="default", answer="B", reply="A", correct=False, text="<answer>A</answer>",
                  boxes=[], gt_boxes=None)]
    return items, samples


def test_only_a_run_short_of_its_benchmark_is_marked_partial():
    whole = dict(ev.summarize([dict(id="a", category="x", correct=1.0, tool_calls=0, tool_errors=0, seconds=1.0,
                                    meta={})], "v", "vstar"), num_total=1)
    assert "partial" not in report.markdown(whole)
    assert "**partial: 1 of 2 items**" in report.markdown(dict(whole, num_total=2))


def test_probe_table_signs_and_the_partial_mark_of_the_shortest_run():
    """A probe that costs accuracy is a negative change and a positive crop dependency; a model whose runs are
    both short is marked with the shorter one's count."""
    results = {"none": dict(name="v", accuracy=0.5, num_items=10, num_total=10),
               "noise-replace": dict(name="v", accuracy=0.3, num_items=10, num_total=10)}
    text = report.probes_table("vstar", results)
    assert "| noise-replace | 10 of 10 | 30.0 | -20.0 |" in text and "| none | 10 of 10 | 50.0 | +0.0 |" in text
    assert "crop dependency (accuracy lost when crops are replaced by noise): 20.0 points" in text
    plain = dict(accuracy=0.5, tool_calls=1.0, num_items=5, num_total=191)
    ((_, name, values, partial),) = report.experiment_rows([{"none": plain, "noise-replace": dict(
        accuracy=0.3, num_items=3, num_total=191)}])
    assert name == "warm start" and partial == "3 of 191 items" and abs(values[2] - 0.2) < 1e-9


def test_report_parses_into_a_page(tmp_path):
    items, samples = _items_and_samples(tmp_path)
    summary = ev.summarize([dict(it, tool_calls=1, tool_errors=0, seconds=0.1) for it in items], "vstar")
    report.write_html(str(tmp_path / "r.html"), items, samples, report.markdown(summary))
    page = Page()
    page.feed(open(tmp_path / "r.html", encoding="utf-8").read())
    assert page.title == "LFPC evaluation: vstar"
    assert [t for t, _ in page.tags].count("table") == 1 and ("th", "") in page.tags
    assert [c for t, c in page.tags if t == "section"] == ["item", "item"]
    assert sum(c == "crop" for t, c in page.tags if t == "img") == 1  # one box, one crop
    assert sum(c == "full" for t, c in page.tags if t == "img") == 2
    turns = [c.split()[1] for t, c in page.tags if t == "div" and c.startswith("turn ")]
    assert turns == ["think", "call", "reply", "call", "error", "think", "answer", "answer"]
    css = open(tmp_path / "r.html").read()
    assert "pre-wrap" in css and "<pre>" not in css  # transcripts wrap to the page
    assert "given noise instead" not in css
    # the deepeyes prompt answers a bad call with a bare user turn, no <tool_response>
    policy = tiny_policy()
    bare = policy.tokenizer.decode(policy.tool_turn_ids(True, error="not JSON", prompt="deepeyes"))
    assert "<tool_response>" not in bare
    html = report.turns("<tool_call>{bad</tool_call><|im_end|>" + bare + "<answer>B</answer>", None, [])
    assert "<div class='turn error'><b>tool error</b>Error: not JSON</div>" in html and "<b>text</b>" not in html
    # into a folder not made yet (it was a traceback after the whole evaluation)
    report.write_html(str(tmp_path / "new" / "n.html"), items, samples, report.markdown(summary), probe="noise-replace")
    # under a noise probe the crop shown is not what the model saw, and the page says so
    assert "the model was given noise instead (--probe noise-replace)" in open(tmp_path / "new" / "n.html").read()


def test_markdown_table_rows_and_notes():
    out = report.markdown_html("### x\n\n| a | b |\n|---|---|\n| **overall** | 3 |\n\ntool calls 1.0")
    assert out.count("<tr>") == 2 and "<td>overall</td>" in out and "<p>tool calls 1.0</p>" in out


def test_undecodable_bytes_become_escapes():
    tok = model.build_tiny_tokenizer()
    first, _ = tok.encode("é", add_special_tokens=False)  # two byte tokens; the first is half a character
    ids = [first] + tok.encode("ok", add_special_tokens=False)
    policy = SimpleNamespace(tokenizer=tok, image_pad=-1)
    e = SimpleNamespace(text=tok.decode(ids), ids=ids, prompt_len=0)
    assert e.text == "\ufffdok" and ev.response_text(policy, e) == "\\xc3ok"
    whole = SimpleNamespace(text="fine", ids=tok.encode("fine", add_special_tokens=False), prompt_len=0)
    assert ev.response_text(policy, whole) == "fine"
    past = SimpleNamespace(text="\ufffdok", ids=[first, len(tok) + 5] + ids[1:], prompt_len=0)  # tiny-7b's head
    assert ev.response_text(policy, past) == "\\xc3ok"  # an id past the tokenizer decodes to nothing
