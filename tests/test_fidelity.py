"""Fidelity to the method and to DeepEyes: the information-gap selection, crops as large as DeepEyes returns
them, its prompt, the additive noise probe, open-ended answers, streaming steps and the loss aggregation."""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import crop
import data
import infogap
import model
import rewards
import train
from helpers import ANSWER, CALL, rollout_cfg, scripted, tiny_policy, varying_score
import rollout as rollout_module
from rollout import rollout

# ---------------------------------------------------------------- the information-gap selection


def _scripted_selection(monkeypatch, by_tokens):
    """select() with the policy's answers given per budget: by_tokens[tokens] is a list, one per sample."""
    calls = []

    def answers(policy, samples, tokens, max_tokens, prompt, bad):
        calls.append(tokens)
        idx = {s.id: i for i, s in enumerate(data.synthetic(3))}
        return {s.id: by_tokens[tokens][idx[s.id]] for s in samples}

    monkeypatch.setattr(infogap, "_answers", answers)
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: None)
    return calls


def test_selection_compares_answers_not_strings(tmp_path, monkeypatch):
    # sample 0: "(B) red" at 4096 is the same answer as "B"; "C" at 1024 departs -> level 1024
    # sample 1: no <answer> at 4096 and 1024 is "no answer", not a divergence; "A" at 256 departs -> 256
    # sample 2: never departs -> flagged, no level
    calls = _scripted_selection(monkeypatch, {
        16384: ["B", "A", "D"], 4096: ["(B) red", None, "D"], 1024: ["C", None, "(D)"], 256: ["C", "C", "D"],
        64: ["C", "C", "D"]})
    out = tmp_path / "levels.jsonl"
    levels = infogap.select("tiny", "synthetic:3", [16384, 4096, 1024, 256, 64], str(out))
    assert calls[0] == 16384  # the reference is the original up to the reference budget, asked first
    rows = [levels[s.id] for s in data.synthetic(3)]
    assert [r["global_tokens"] for r in rows] == [1024, 256, None]
    assert [r["diverged"] for r in rows] == [True, True, False]
    assert [r["reference"] for r in rows] == ["B", "A", "D"] and rows[0]["ladder"] == [4096, 1024, 256, 64]
    assert rows[0]["answers"] == {"4096": "(B) red", "1024": "C"}  # decided: lower rungs are not asked
    before = len(calls)
    infogap.select("tiny", "synthetic:3", [4096, 1024, 256, 64], str(out))  # resumable: nothing is redone
    assert len(calls) == before and len(out.read_text().splitlines()) == 3


def test_the_selection_compares_a_math_rows_answers_as_math(tmp_path, monkeypatch):
    """A row with its own matcher (DeepEyes' math rows) is compared by it: "0.5" is "\\frac{1}{2}", no divergence."""
    _scripted_selection(monkeypatch, {16384: ["\\frac{1}{2}"] * 3, 4096: ["0.5"] * 3})
    samples = [dataclasses.replace(s, options=None, answer="1/2") for s in data.synthetic(3)]  # short answers
    samples[0].meta = {"matcher": "math"}
    monkeypatch.setattr(infogap.data, "load", lambda spec, seed, columns=None: samples)
    levels = infogap.select("tiny", "rows.jsonl", [4096], str(tmp_path / "l.jsonl"))
    assert [levels[s.id]["diverged"] for s in samples] == [False, True, True]


def test_a_sample_without_a_reference_answer_never_diverges(tmp_path, monkeypatch, capsys):
    _scripted_selection(monkeypatch, {16384: [None, "A", "A"], 4096: ["B", "A", "A"], 1024: ["B", "A", "A"],
                                      256: ["B", "A", "A"], 64: ["B", "A", "A"]})
    levels = infogap.select("tiny", "synthetic:3", [4096, 1024, 256, 64], str(tmp_path / "l.jsonl"))
    assert not any(r["diverged"] for r in levels.values())
    assert "never diverged: 3 of 3 (1 of them without a reference answer)" in capsys.readouterr().out


def test_a_bad_image_in_the_selection_is_a_row_with_its_error_and_training_leaves_it_out(tmp_path, monkeypatch,
                                                                                        capsys):
    """An image that passed the load's checks but does not decode stopped the whole selection, again on every
    resume. Now it gets a row with its error (a resume does not retry it), the batch goes on without it, and a
    run leaves it out; so does a sample the file has no row for (it would train with no gap)."""
    samples = data.synthetic(3)
    bad_id = samples[1].id

    def fake_rollout(policy, batch, cfg):
        if any(s.id == bad_id for s in batch):
            raise data.BadImage(f"sample {bad_id}: image file is truncated", bad_id)
        return [SimpleNamespace(sample=s, text="<answer>B</answer>" if cfg.global_tokens > 256 else "<answer>C</answer>")
                for s in batch]

    monkeypatch.setattr(infogap.data, "load", lambda spec, seed, columns=None: data.synthetic(3))
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: None)
    monkeypatch.setattr(rollout_module, "rollout", fake_rollout)
    out = str(tmp_path / "l.jsonl")
    levels = infogap.select("tiny", "rows.jsonl", [1024, 256], out)
    assert [levels[s.id]["global_tokens"] for s in samples] == [256, None, 256]
    out_text = capsys.readouterr().out
    assert "truncated" in levels[bad_id]["error"] and "skipping a bad image" in out_text
    assert "never diverged: 0 of 2 (0 of them without a reference answer); 1 whose image did not decode" in out_text
    monkeypatch.setattr(rollout_module, "rollout", lambda *a: pytest.fail("a resume retried the bad image"))
    infogap.select("tiny", "rows.jsonl", [1024, 256], out)
    extra = data.synthetic(4)[3]  # not in the file
    cfg = train.Config(data="rows.jsonl", infogap=out, infogap_never="coarsest")
    kept = infogap.prepare(cfg, data.synthetic(3) + [extra])
    assert [s.id for s in kept] == [samples[0].id, samples[2].id] and {s.global_tokens for s in kept} == {256}
    assert "left out: 1 not in it, 1 whose image did not decode" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no sample is left to train on"):  # a selection of other data
        infogap.prepare(cfg, [extra])


def test_a_selection_resumed_with_other_settings_is_refused(tmp_path, monkeypatch):
    _scripted_selection(monkeypatch, {t: ["B", "B", "B"] for t in (16384, 4096, 1024, 512, 256, 64)})
    out = str(tmp_path / "l.jsonl")
    infogap.select("tiny", "synthetic:3", [4096, 1024], out)
    with pytest.raises(SystemExit, match=r"other settings: .*ladder=\[4096, 1024\] there, \[512, 64\] now"):
        infogap.select("tiny", "synthetic:3", [512, 64], out)
    with pytest.raises(SystemExit, match="model='tiny' there, 'micro' now"):
        infogap.select("micro", "synthetic:3", [4096, 1024], out)
    infogap.select("tiny", "synthetic:3", [4096, 1024], out)  # the same settings: resumed
    rows = [json.loads(line) for line in open(out)]
    with open(out, "w") as f:  # an older file, made before the settings were written: not checked on them
        f.write("".join(json.dumps({k: v for k, v in r.items() if k not in ("model", "prompt")}) + "\n" for r in rows))
    infogap.select("micro", "synthetic:3", [4096, 1024], out)


def test_a_retrained_adapter_at_the_same_path_is_another_selection(tmp_path, monkeypatch):
    """The selection depends on the adapter's weights, not its folder's name: retraining runs/stage1/final must
    neither reuse the old --infogap auto cache nor resume an explicit selection file made with the old weights."""
    _scripted_selection(monkeypatch, {t: ["B", "B", "B"] for t in (16384, 4096, 1024)})
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights, first training")
    cfg = train.Config(infogap="auto", data="synthetic:3", init_adapter=str(adapter))
    before = infogap.cache_path(cfg)
    out = str(tmp_path / "l.jsonl")
    infogap.select("tiny", "synthetic:3", [4096, 1024], out, adapter=str(adapter))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights, retrained")
    assert infogap.cache_path(cfg) != before
    with pytest.raises(SystemExit, match="adapter_sha256='sha256:.*' there, 'sha256:.*' now"):
        infogap.select("tiny", "synthetic:3", [4096, 1024], out, adapter=str(adapter))


def test_the_selection_cli_reads_generated_data_with_the_runs_seed(tmp_path, monkeypatch):
    """python infogap.py --seed S selects over the samples a train.py --seed=S run trains on (their ids carry S)."""
    monkeypatch.setattr(infogap, "_answers", lambda policy, samples, *a: {s.id: "B" for s in samples})
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: None)
    out = tmp_path / "l.jsonl"
    monkeypatch.setattr("sys.argv", ["infogap.py", "--data", "synthetic:2", "--seed", "3", "--out", str(out)])
    infogap.main()
    assert set(infogap.read_levels(str(out))) == {s.id for s in data.load("synthetic:2", 3)}


def test_the_selection_command_writes_a_folders_levels_beside_it(tmp_path, monkeypatch):
    """--data vstar/ (a folder, named with its slash): vstar.infogap.jsonl beside it, not a hidden file inside."""
    (tmp_path / "vstar").mkdir()
    outs = []
    monkeypatch.setattr(infogap, "select", lambda model, spec, ladder, out, **kw: outs.append(out))
    monkeypatch.setattr("sys.argv", ["infogap.py", "--data", f"{tmp_path / 'vstar'}/"])
    infogap.main()
    assert outs == [str(tmp_path / "vstar.infogap.jsonl")]


def test_a_selection_file_cut_by_a_kill_or_of_another_kind_is_named(tmp_path, capsys):
    """--infogap FILE: a last line cut by a killed selection is left out with a line; a file that is not a
    selection (the data file, given by mistake) stops with its name, not a KeyError deep in training."""
    row = dict(id="a", global_tokens=64, diverged=True, reference="B", answers={}, ladder=[64])
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, id="b"))[:30])
    assert list(infogap.read_levels(str(cut))) == ["a"]
    assert f"{cut}:2 is cut" in capsys.readouterr().out
    other = tmp_path / "train.jsonl"
    other.write_text(json.dumps(dict(id="a", image="a.png", question="q", answer="B")) + "\n")
    with pytest.raises(SystemExit, match=f"{other}:1 is not a row of an information-gap selection"):
        infogap.read_levels(str(other))
    last = tmp_path / "last.jsonl"  # a whole last line, its newline written: not cut by a kill
    last.write_text(json.dumps(row) + "\n{not json\n")
    with pytest.raises(SystemExit, match=f"{last}:2 is not JSON"):
        infogap.read_levels(str(last))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n" + json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match=f"{broken}:1 is not JSON"):
        infogap.read_levels(str(broken))


def test_the_auto_cache_of_several_sources_lies_under_runs(tmp_path):
    cfg = train.Config(infogap="auto", data="/data/pr/release.parquet,/data/tl/ThinkLite-VL-70k.parquet")
    path = infogap.cache_path(cfg)
    assert os.path.dirname(path) == "runs" and "," not in path and path.endswith(".jsonl")
    assert not os.path.basename(path).startswith("_")
    relative = infogap.cache_path(dataclasses.replace(cfg, data="../pr/release.parquet,../tl/x.parquet"))
    assert not os.path.basename(relative).startswith(".")  # not a hidden file
    # two specs that read alike once their separators are replaced are two files
    assert infogap.cache_path(dataclasses.replace(cfg, data="a.parquet,b.parquet")) != \
        infogap.cache_path(dataclasses.replace(cfg, data="a.parquet b.parquet"))
    assert infogap.cache_path(dataclasses.replace(cfg, columns="image=a,question=b,answer=c")) != path


def test_the_selection_asks_at_each_rung_whatever_level_a_row_carries(tmp_path, monkeypatch):
    """A row may carry a level (global_tokens, written by a conversion or an earlier selection); the rollout
    shows a sample at its own level, so the selection must clear it or every rung would ask at that level."""
    asked = []

    def fake_rollout(policy, samples, cfg):
        asked.append({s.global_tokens or cfg.global_tokens for s in samples})  # what the rollout would show
        return [SimpleNamespace(sample=s, text="<answer>B</answer>") for s in samples]

    carried = data.synthetic(2)
    for sample in carried:
        sample.global_tokens = 64
    monkeypatch.setattr(infogap.data, "load", lambda spec, seed, columns=None: carried)
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: None)
    monkeypatch.setattr(rollout_module, "rollout", fake_rollout)
    infogap.select("tiny", "rows.jsonl", [4096, 1024, 256], str(tmp_path / "l.jsonl"))
    assert asked == [{16384}, {4096}, {1024}, {256}]


def test_infogap_auto_reads_the_data_with_the_runs_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(infogap.data, "load", lambda spec, seed, columns=None: seen.append(columns) or
                        data.synthetic(1))
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: None)
    monkeypatch.setattr(infogap, "_answers", lambda policy, samples, *a: {s.id: "B" for s in samples})
    cfg = train.Config(infogap="auto", data="table.json", columns="image=pic,question=q,answer=a")
    infogap.prepare(cfg, data.synthetic(1))
    assert seen == ["image=pic,question=q,answer=a"]


def _levels_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("never,expected", [("coarsest", [1024, 64]), ("reference", [1024, 16384]),
                                            ("drop", [1024])])
def test_never_diverging_samples_follow_the_rule(tmp_path, never, expected, capsys):
    samples = data.synthetic(2)
    rows = [dict(id=samples[0].id, global_tokens=1024, diverged=True, reference="B", reference_tokens=16384,
                 ladder=[4096, 1024, 256, 64]),
            dict(id=samples[1].id, global_tokens=None, diverged=False, reference="A", reference_tokens=16384,
                 ladder=[4096, 1024, 256, 64])]
    cfg = train.Config(data="x.jsonl", infogap=_levels_file(tmp_path / "l.jsonl", rows), infogap_never=never,
                       global_tokens=4096)
    kept = infogap.prepare(cfg, samples)
    assert [s.global_tokens for s in kept] == expected
    assert "1 never diverged" in capsys.readouterr().out


def test_a_level_above_the_budget_is_reported_not_capped(tmp_path, capsys):
    s = data.synthetic(1, seed=3, min_side=900, max_side=1000)[0]
    rows = [dict(id=s.id, global_tokens=256, diverged=True, reference="B", reference_tokens=16384, ladder=[256])]
    cfg = train.Config(data="x.jsonl", infogap=_levels_file(tmp_path / "l.jsonl", rows), global_tokens=64)
    (s,) = infogap.prepare(cfg, [s])
    assert "1 of 1 samples have an information-gap level above global_tokens=64" in capsys.readouterr().out
    (e,) = rollout(tiny_policy(), [s], rollout_cfg(group_size=1, global_tokens=64, max_turn_tokens=2,
                                                     max_response_tokens=2))
    t, h, w = e.grids[0]
    assert h * w // 4 > 64 and h * w // 4 <= 256  # the global image is the sample's level, not the run's budget


def test_stage_1_without_levels_stops_and_names_the_choices(tmp_path):
    samples = [dataclasses.replace(s, designed_tokens=None) for s in data.synthetic(2)]  # as a JSONL's rows
    with pytest.raises(SystemExit) as e:
        infogap.prepare(train.Config(data=str(tmp_path / "train.jsonl")), samples)
    for choice in ("--infogap auto", "--infogap FILE", "--infogap fixed:N", "--infogap off"):
        assert choice in str(e.value)
    assert infogap.prepare(train.Config(data=str(tmp_path / "b.jsonl"), stage=2), samples)  # stage 2 may go on
    assert {s.global_tokens for s in infogap.prepare(train.Config(), data.synthetic(2))} == {data.SYNTHETIC_LEVEL}


def test_stage_1_names_the_samples_left_without_a_level(tmp_path, capsys):
    samples = [dataclasses.replace(s, designed_tokens=None) for s in data.synthetic(3)]
    samples[0].global_tokens = 16  # one row of a JSONL carries its level, the others do not
    infogap.prepare(train.Config(data=str(tmp_path / "train.jsonl")), samples)
    assert "2 of 3 samples have no information-gap level: they train at global_tokens=1024" in capsys.readouterr().out
    infogap.prepare(train.Config(data=str(tmp_path / "train.jsonl"), stage=2), samples)  # stage 2 has no gap
    assert "no information-gap level" not in capsys.readouterr().out


def test_mixed_generated_data_keeps_each_parts_designed_level(capsys):
    samples = data.load("micro:2,synthetic:1")
    levels = {s.id.split("/")[0]: s.global_tokens for s in infogap.prepare(train.Config(data="micro:2,synthetic:1"),
                                                                            samples)}
    assert levels == {"micro:2": data.MICRO_LEVEL, "synthetic:1": data.SYNTHETIC_LEVEL}
    assert "2 at 16 tokens, 1 at 64 tokens" in capsys.readouterr().out


def test_infogap_auto_selects_caches_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.Config(infogap="auto", data="synthetic:2", infogap_ladder="16,4", infogap_reference_tokens=64,
                       infogap_max_tokens=3, prompt="qwen")
    samples = infogap.prepare(cfg, data.synthetic(2))
    path = infogap.cache_path(cfg)
    assert path.startswith("runs/synthetic_2.infogap-") and len(open(path).readlines()) == 2
    assert all(s.global_tokens in (16, 4) for s in samples)  # diverged, or the coarsest rung
    monkeypatch.setattr(infogap, "load_policy", lambda *a, **kw: pytest.fail("the cache was not reused"))
    infogap.prepare(cfg, data.synthetic(2))
    assert infogap.cache_path(dataclasses.replace(cfg, model="other")) != path  # another model, another file
    assert infogap.cache_path(dataclasses.replace(cfg, seed=4)) != path  # another seed: other items, other answers


# ---------------------------------------------------------------- crops


def test_a_crop_is_never_coarser_than_the_global_image():
    rng = random.Random(0)
    for _ in range(500):
        W, H = rng.randint(300, 8000), rng.randint(300, 8000)
        if max(W, H) / min(W, H) > 100:
            continue
        shown = crop.shown_size((W, H), crop.tokens_to_pixels(rng.choice([64, 256, 1024, 4096])))
        bw, bh = rng.randint(28, W), rng.randint(28, H)
        if max(bw, bh) / min(bw, bh) > 100:
            continue
        x1, y1 = rng.randint(0, W - bw), rng.randint(0, H - bh)
        h, w = crop.crop_size((x1, y1, x1 + bw, y1 + bh), shown, (W, H), crop.tokens_to_pixels(rng.choice([4, 64, 1024])))
        assert h % 28 == 0 and w % 28 == 0
        assert w / bw >= shown[0] / W - 1e-9 and h / bh >= shown[1] / H - 1e-9


def test_crop_budget_defaults_to_deepeyes():
    assert train.Config.crop_tokens == 16384 and train.rollout_config(train.Config()).crop_tokens == 16384
    assert all(preset["crop_tokens"] < 16384 for preset in train.PRESETS.values())  # presets size it to the card


# ---------------------------------------------------------------- the DeepEyes prompt

# SYSTEM_PROMPT_V2, written down verbatim from DeepEyes' verl/workers/agent/envs/mm_process_engine/prompt.py at 6c5e796
# (also eval/eval_vstar.py's instruction_prompt_system); note the two spaces before some line ends.
DEEPEYES_SYSTEM_PROMPT_V2 = """You are a helpful assistant.

# Tools
You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the specified bounding box (optional)."}},"required":["bbox"]}}}
</tools>

# How to call a tool
Return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>

**Example**:  
<tool_call>  
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  
</tool_call>"""

# Written down from DeepEyes' eval/eval_vstar.py (instruction_prompt_before and its option string) at 6c5e796:
# the user turn after the image, for a question with two options. Three newlines before "Think": the option
# string's last, the template line's, and USER_PROMPT_V2's first.
DEEPEYES_USER_TURN = ("Question: Is the flag left or right of the pole?\nOptions: \nA. left\nB. right\n\n\nThink first, "
                      "call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
                      "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")
# and the tool's reply, from visual_toolbox_v2.py: "\n<|im_start|>user\n<tool_response><image>" + USER_PROMPT_V2 +
# "</tool_response><|im_end|>\n<|im_start|>assistant\n" after an assistant turn that ended with <|im_end|>
DEEPEYES_TOOL_TURN = ("\n<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|vision_end|>\nThink first, "
                      "call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
                      "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> </tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_the_deepeyes_prompt_renders_byte_identical():
    p = tiny_policy()
    text = model.user_text("Is the flag left or right of the pole?", ["left", "right"], "deepeyes")
    assert text == DEEPEYES_USER_TURN
    ids = p.prompt_ids(text, [1, 2, 2], prompt="deepeyes")
    expected = (f"<|im_start|>system\n{DEEPEYES_SYSTEM_PROMPT_V2}<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|image_pad|><|vision_end|>{DEEPEYES_USER_TURN}<|im_end|>\n<|im_start|>assistant\n")
    assert p.tokenizer.decode(ids) == expected
    assert p.tokenizer.decode(p.tool_turn_ids(True, grid=[1, 2, 2], prompt="deepeyes")) == DEEPEYES_TOOL_TURN
    assert p.tokenizer.decode(p.tool_turn_ids(True, error="bad box", prompt="deepeyes")) == (
        "\n<|im_start|>user\nError: bad box<|im_end|>\n<|im_start|>assistant\n")


# Qwen2.5's chat template renders a tool message as "<|im_start|>user" + "\n<tool_response>\n" + content +
# "\n</tool_response>" + "<|im_end|>\n" (its tokenizer's template with tools; Qwen2.5-VL's image template has no tool role)
def test_the_qwen_prompt_wraps_the_tool_reply_as_qwens_chat_template_does():
    p = tiny_policy()
    assert p.tokenizer.decode(p.tool_turn_ids(True, grid=[1, 2, 2], prompt="qwen")) == (
        "\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert p.tokenizer.decode(p.tool_turn_ids(False, error="bad box", prompt="qwen")) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nError: bad box\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # the micro model keeps the layout its committed warm start was trained with
    assert p.tokenizer.decode(p.tool_turn_ids(True, error="bad box", prompt="micro")) == (
        "\n<|im_start|>user\n<tool_response>Error: bad box</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_an_error_turn_of_either_prompt_is_a_format_error():
    for prompt in model.PROMPTS:
        reply = tiny_policy().tokenizer.decode(tiny_policy().tool_turn_ids(True, error="x", prompt=prompt))
        assert not rewards.format_ok("<think>a</think><tool_call>{}</tool_call><|im_end|>" + reply
                                     + "<answer>B</answer><|im_end|>")


# ---------------------------------------------------------------- the noise probe


def test_additive_noise_changes_the_crop_by_about_sigma():
    gray = torch.full((200, 300, 3), 128, dtype=torch.uint8)
    for sigma in (16.0, 40.0):
        diff = crop.add_noise(gray, sigma, seed=1).float() - 128
        assert abs(diff.std().item() - sigma) < 0.05 * sigma and abs(diff.mean().item()) < 0.5


def test_noise_probes_in_the_rollout():
    p, s = tiny_policy(), data.synthetic(1, seed=4)
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER]})
    cfg = dict(group_size=1, noise_sigma=20.0, crop_tokens=1024)  # the crop near its original size: no averaging
    crops = {probe: rollout(p, s, rollout_cfg(probe=probe, **cfg), force=force)[0].pixel_values[1]
             for probe in (None, "noise", "noise-replace")}
    assert crops[None].shape == crops["noise"].shape == crops["noise-replace"].shape
    std = 0.27  # CLIP's std: pixel levels / 255 / std is the normalised scale
    added = (crops["noise"] - crops[None]).std().item()
    assert 0.7 * 20 / 255 / std < added < 1.2 * 20 / 255 / std  # about sigma
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()  # noqa: E731
    assert corr(crops["noise"], crops[None]) > 0.5 > corr(crops["noise-replace"], crops[None])


# ---------------------------------------------------------------- open-ended answers


@pytest.mark.parametrize("reply,answer,matcher,right", [
    ("It is red.", "red", "rule", 1), ("It is red.", "red", "exact", 0), ("red", "Red", "exact", 1),
    ("There are 3 apples", "3", "rule", 1), ("3.0", "3", "rule", 1), ("1,000", "1000", "rule", 1),
    ("3 or 4", "3", "rule", 0), ("13", "3", "rule", 0), ("50%", "50", "rule", 1),
    ("Yes, it is.", "yes", "rule", 1), ("No.", "yes", "rule", 0), ("not red", "red", "rule", 0),  # negated
    ("red blue green yellow orange purple white", "red", "rule", 0),  # a list of everything is no answer
    ("$\\frac{1}{2}$", "0.5", "math", 1), ("$\\frac{1}{2}$", "0.5", "rule", 0), ("x^2 + 1", "x^2+2", "math", 0),
    ("\\boxed{2\\sqrt{2}}", "$\\sqrt{8}$", "math", 1),
])
def test_matchers(reply, answer, matcher, right):
    assert rewards.accuracy(reply, answer, matcher=matcher) == right


def test_same_answer_for_the_selection():
    assert rewards.same_answer("B", "(B) red", ["blue", "red"])
    assert rewards.same_answer("red", "B", ["blue", "red"])  # the option's text is its letter
    assert not rewards.same_answer("A", "B", ["blue", "red"])
    assert rewards.same_answer("It is red.", "red") and not rewards.same_answer("blue", "red")
    # naming no option twice, in the same words, is no departure; naming one where the other named none is
    assert rewards.same_answer("cannot tell", "Cannot tell.", ["blue", "red"])
    assert not rewards.same_answer("cannot tell", "B", ["blue", "red"])
    assert not rewards.same_answer("cannot tell", "unclear", ["blue", "red"])


def test_the_summary_records_the_matcher_and_probe(tmp_path):
    import eval as evaluation
    summary = evaluation.main(["--data", "synthetic:2", "--out", str(tmp_path / "e"), "--global-tokens", "16",
                               "--crop-tokens", "16", "--max-turn-tokens", "4", "--max-response-tokens", "4",
                               "--probe", "noise", "--noise-sigma", "30", "--matcher", "exact"])
    assert summary["settings"]["matcher"] == "exact" and summary["settings"]["probe"] == "noise"
    assert summary["settings"]["noise_sigma"] == 30.0 and summary["settings"]["prompt"] == "deepeyes"
    assert summary["settings"]["precision"] == "fp32"  # tiny on a CPU; bf16 is the default on a GPU


# ---------------------------------------------------------------- the step: streaming parts, aggregation


def _one_step(rollout_rows, loss_agg="token-mean"):
    torch.manual_seed(0)  # the same LoRA initialisation
    p = model.load_policy("tiny", lora_r=4, lora_alpha=8)
    cfg = train.Config(**{**train.PRESETS["tiny"], "prompts_per_step": 2, "group_size": 2, "micro_batch": 2,
                          "rollout_rows": rollout_rows, "lr": 1e-2, "loss_agg": loss_agg, "max_turn_tokens": 6,
                          "max_response_tokens": 6})
    opt = torch.optim.SGD(p.trainable_parameters(), lr=1.0)  # the update is the gradient (Adam would magnify noise)
    samples = data.synthetic(2, min_side=300, max_side=400)
    wcfg = train.reward_config(cfg)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train.rewards, "score", varying_score)  # rewards that differ, so the step moves the weights
        _, _, stats, _ = train.run_step(p, opt, samples, 0, cfg, train.rollout_config(cfg), wcfg)
    return {k: v.detach().clone() for k, v in p.model.named_parameters() if v.requires_grad}, stats


def test_a_step_in_parts_equals_the_step_at_once():
    whole, s1 = _one_step(rollout_rows=4)  # both groups in flight at once
    parts, s2 = _one_step(rollout_rows=2)  # one group at a time: gradients accumulated, images freed
    assert all(torch.allclose(whole[k], parts[k], atol=1e-6, rtol=1e-4) for k in whole)
    assert math.isclose(s1["loss"], s2["loss"], rel_tol=1e-5) and s1["grad_norm"] > 0


def test_a_step_streams_its_prompts_through_the_rows(monkeypatch):
    """run_step hands the rollout the whole step: with rows for two groups and three prompts, the third group
    joins the batch as soon as the first group finishes, while the second is still writing; each group's
    gradient is taken and its images freed as it finishes."""
    p = tiny_policy()
    joins, real_join = [], rollout_module._join
    monkeypatch.setattr(rollout_module, "_join", lambda a, b: joins.append(len(a.live)) or real_join(a, b))
    script = scripted(p, {0: [ANSWER], 1: ["<think>" + "let me look " * 4 + "</think>" + ANSWER], 2: [ANSWER]})
    monkeypatch.setattr(train, "rollout_groups", functools.partial(rollout_module.rollout_groups, force=script))
    sizes, real_acc = [], train.accumulate_gradients
    monkeypatch.setattr(train, "accumulate_gradients", lambda p_, eps, *a: sizes.append(len(eps)) or real_acc(p_, eps, *a))
    cfg = train.Config(**{**train.PRESETS["tiny"], "prompts_per_step": 3, "group_size": 2, "micro_batch": 2,
                          "rollout_rows": 4, "max_turn_tokens": 60, "max_response_tokens": 60})
    opt = torch.optim.SGD(p.trainable_parameters(), lr=0.0)
    episodes, _, _, _ = train.run_step(p, opt, data.synthetic(3, min_side=300, max_side=400), 0, cfg,
                                       train.rollout_config(cfg), train.reward_config(cfg))
    assert joins == [2]  # group 0 done; group 2 joined group 1's two rows
    assert sizes == [2, 2, 2]  # a gradient per group, as it finished
    assert [e.group for e in episodes] == [0, 0, 1, 1, 2, 2] and all(e.pixel_values == [] for e in episodes)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The GPU presets train with gradient checkpointing (model.load_policy): the LoRA gradients of a micro-batch
    with tool turns and crops are those without it, the frozen vision tower stays out of the backward, and the
    rollout (eval mode) still keeps its KV cache."""
    grads, logps = [], []
    for checkpointing in (False, True):
        p = model.load_policy("tiny", lora_r=4, lora_alpha=8, gradient_checkpointing=checkpointing, device="cpu")
        with torch.no_grad():  # the same LoRA weights in both; B nonzero (it starts at 0: A would get no gradient)
            for k, (name, w) in enumerate(p.model.named_parameters()):
                if "lora_" in name:
                    w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(k)) * 0.1)
        eps = rollout(p, data.synthetic(1, seed=5), rollout_cfg(group_size=2),
                      force=scripted(p, {0: [CALL.format("[5, 5, 60, 40]"), ANSWER]}))
        logps.append(torch.tensor([x for e in eps for x in e.logps]))  # recorded with the KV cache
        mlp, calls = p.lm.language_model.layers[0].mlp, []  # (a recompute runs no forward hooks: count calls)
        mlp.forward = lambda x, real=mlp.forward: calls.append(1) or real(x)
        vision = []  # the frozen vision tower stays out of the backward (no activations kept, none recomputed)
        hook = p.lm.visual.register_forward_hook(lambda m, a, out: vision.append(
            any(t.requires_grad for t in (out.values() if isinstance(out, dict) else [out]) if torch.is_tensor(t))))
        train.accumulate_gradients(p, eps, torch.tensor([1.0, -0.5]), train.Config(micro_batch=2))
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointed: the layer runs again in the backward
        assert vision and not any(vision)
        grads.append({n: w.grad.clone() for n, w in p.model.named_parameters() if w.requires_grad})
    assert sum(e.num_tool_calls for e in eps) == 2
    torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4)


def test_the_kl_term_is_measured_only_when_it_is_on():
    """kl_beta > 0: the k3 estimate against the base (the adapter off): 0 while the adapter is the identity, more
    once it is not. kl_beta = 0 (every preset): nothing is measured, and the log says so (it logged 0)."""
    p = tiny_policy()
    eps = rollout(p, data.synthetic(1), rollout_cfg(group_size=2, max_turn_tokens=5, max_response_tokens=5),
                  force=scripted(p, {0: ["<answer>B</answer><|im_end|>"]}))
    opt = torch.optim.SGD(p.trainable_parameters(), lr=0.0)

    def kl(beta):
        cfg = train.Config(kl_beta=beta, micro_batch=2)
        return train.optimizer_step(p, opt, train.accumulate_gradients(p, eps, torch.tensor([1.0, -1.0]), cfg), cfg)["kl"]

    assert kl(0.0) is None and kl(0.1) == 0.0
    batch = train.collate(p, eps)
    with _lora_moved_away(p):
        with torch.no_grad():
            logp = model.sequence_logprobs(p, batch, 1.0)
            with p.reference():
                ref = model.sequence_logprobs(p, batch, 1.0)
        # k3, an unbiased estimate of KL(policy || reference) from the policy's own tokens (not KL(ref || policy))
        expected = (torch.exp(ref - logp) - (ref - logp) - 1).mean().item()
        assert expected > 0 and math.isclose(kl(0.1), expected, rel_tol=1e-4)


@contextlib.contextmanager
def _lora_moved_away(p):
    """The policy moved off its reference (random LoRA B weights); the tiny model is shared by the tests, so its
    weights are put back after."""
    lora_b = [w for name, w in p.model.named_parameters() if "lora_B" in name]
    saved = [w.detach().clone() for w in lora_b]
    try:
        with torch.no_grad():
            for w in lora_b:
                w.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        yield
    finally:
        with torch.no_grad():
            for w, v in zip(lora_b, saved):
                w.copy_(v)


def test_the_kl_term_is_a_penalty_added_to_the_loss():
    """kl_beta > 0 adds kl_beta x the k3 estimate to each token's loss: the further the policy from the reference,
    the larger the loss (subtracted, it would reward drifting away)."""
    p = tiny_policy()
    (ep,) = rollout(p, data.synthetic(1), rollout_cfg(group_size=1, max_turn_tokens=5, max_response_tokens=5),
                    force=scripted(p, {0: ["<answer>B</answer><|im_end|>"]}))
    with _lora_moved_away(p):
        plain, n, _ = train.policy_loss(p, [ep], torch.tensor([1.0]), None, train.Config())
        penalised, _, stats = train.policy_loss(p, [ep], torch.tensor([1.0]), None, train.Config(kl_beta=0.5))
    assert stats["kl"] > 0 and math.isclose(plain.item(), -n, rel_tol=1e-6)  # ratio 1: each token -A
    assert math.isclose(penalised.item() - plain.item(), 0.5 * stats["kl"], rel_tol=1e-4)


def test_loss_aggregation_modes():
    p = tiny_policy()
    eps = rollout(p, data.synthetic(1), rollout_cfg(group_size=3, max_turn_tokens=5, max_response_tokens=5),
                  force=scripted(p, {0: ["<answer>B</answer><|im_end|>"]}))
    eps[1].loss_mask = eps[1].loss_mask[:-3] + [0, 0, 0]  # micro-batches with different token counts
    adv = torch.tensor([1.0, -1.0, 0.5])
    per_micro = [train.policy_loss(p, [eps[i] for i in idx], adv[idx], None, train.Config())[:2]
                 for idx in ([0, 1], [2])]
    for agg, expected in (("token-mean", sum(t.item() for t, _ in per_micro) / sum(n for _, n in per_micro)),
                          ("micro-token-mean", sum(t.item() / n for t, n in per_micro) / 2)):
        cfg = train.Config(micro_batch=2, loss_agg=agg)
        sums = train.accumulate_gradients(p, eps, adv, cfg)
        stats = train.optimizer_step(p, torch.optim.SGD(p.trainable_parameters(), lr=0.0), sums, cfg)
        assert math.isclose(stats["loss"], expected, rel_tol=1e-5)


def test_the_clip_fraction_counts_the_tokens_whose_objective_the_clip_changed():
    """verl's pg_clipfrac: a ratio outside [1 - eps, 1 + eps] on the side the advantage does not push (A > 0 with
    ratio < 1 - eps: the unclipped term is the minimum) is not clipped."""
    p = tiny_policy()
    (ep,) = rollout(p, data.synthetic(1), rollout_cfg(group_size=1, max_turn_tokens=5, max_response_tokens=5),
                    force=scripted(p, {0: ["<answer>B</answer><|im_end|>"]}))
    with torch.no_grad():
        logp = model.sequence_logprobs(p, train.collate(p, [ep]), 1.0)
    n = logp.numel()
    shift = torch.tensor([0.5, -0.5] * (n // 2) + [0.0] * (n % 2))  # ratios e^-0.5 and e^0.5: outside 0.8..1.2
    for adv, expected in ((1.0, n // 2), (-1.0, n // 2)):  # A > 0: only ratio > 1.2 clipped; A < 0: only < 0.8
        _, _, stats = train.policy_loss(p, [ep], torch.tensor([adv]), logp + shift, train.Config())
        assert stats["clip"] == expected
    # the loss itself, with an asymmetric clip (DAPO's clip-higher): -min(r A, clip(r, 1 - 0.2, 1 + 0.8) A) per token
    r = torch.exp(-shift)
    for adv in (1.0, -1.0):
        total, _, stats = train.policy_loss(p, [ep], torch.tensor([adv]), logp + shift,
                                            train.Config(clip_low=0.2, clip_high=0.8))
        expected = -torch.minimum(r * adv, r.clamp(0.8, 1.8) * adv).sum()
        assert math.isclose(total.item(), expected.item(), rel_tol=1e-5)
        assert stats["clip"] == (0 if adv > 0 else n // 2)  # e^0.5 = 1.65 is inside 1.8 now


def test_micro_batches_never_span_two_groups_so_ppo_epochs_leave_the_objective_alone():
    """With ppo_epochs = 1 each group's gradient is taken as it finishes, so its micro-batches are cut within it;
    with more epochs the step's episodes go in at once and must be cut the same way: otherwise micro-token-mean
    weighs the same rollout's tokens differently (here 3 micro-batches against 4)."""
    p = tiny_policy()
    eps = rollout(p, data.synthetic(2), rollout_cfg(group_size=3, max_turn_tokens=5, max_response_tokens=5),
                  force=scripted(p, {0: ["<answer>B</answer><|im_end|>"], 1: ["<answer>C</answer><|im_end|>"]}))
    eps[1].loss_mask = eps[1].loss_mask[:-3] + [0, 0, 0]  # micro-batches with different token counts
    adv = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.7, 0.5])
    cfg = train.Config(group_size=3, micro_batch=2)
    whole = train.accumulate_gradients(p, eps, adv, cfg)  # as train_step gives them when ppo_epochs > 1
    by_group = [train.accumulate_gradients(p, eps[g:g + 3], adv[g:g + 3], cfg) for g in (0, 3)]  # as run_step
    assert whole["micro"] == sum(s["micro"] for s in by_group) == 4
    assert whole["tokens"] == sum(s["tokens"] for s in by_group)
    assert math.isclose(whole["loss"], sum(s["loss"] for s in by_group), rel_tol=1e-5)
    p.model.zero_grad(set_to_none=True)


def test_epochs_set_the_step_count(tmp_path, capsys):
    cfg = train.Config(**{**train.PRESETS["tiny"], "data": "synthetic:6", "epochs": 1.5, "prompts_per_step": 2,
                          "out_dir": str(tmp_path), "group_size": 2, "max_turn_tokens": 3, "max_response_tokens": 3,
                          "curves": False})  # no drawing: seconds this test does not need
    train.train(cfg)
    assert cfg.steps == 5 and "epochs=1.5: 5 steps of 2 prompts over 6 samples" in capsys.readouterr().out
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 5


def test_infogap_auto_caches_its_selection_beside_a_data_file_or_folder(tmp_path):
    """README: "cached next to the data"; a folder's beside it (inside, a second .jsonl would end it as a source)."""
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "set").mkdir()
    for spec, stem in ((tmp_path / "train.jsonl", "train"), (f"{tmp_path / 'set'}/", "set")):
        path = infogap.cache_path(train.Config(infogap="auto", data=str(spec)))
        assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith(f"{stem}.infogap-")


def test_a_levels_row_with_only_id_and_diverged_is_one_line_not_a_traceback(tmp_path):
    """read_levels accepts any row with id and diverged: one lacking its level's fields is one line, not KeyError."""
    s = data.synthetic(2)
    for row in (dict(id=s[0].id, diverged=False), dict(id=s[0].id, diverged=True, global_tokens=None)):
        cfg = train.Config(data="x.jsonl", infogap=_levels_file(tmp_path / "l.jsonl", [row]))
        with pytest.raises(SystemExit, match="l.jsonl"):
            infogap.prepare(cfg, s[:1])


def test_a_levels_row_is_read_only_with_the_fields_its_level_needs(tmp_path):
    """Never diverged and no ladder: one line, not a KeyError. An undecodable image's row needs neither: left out."""
    s = data.synthetic(2)
    cfg = train.Config(data="x.jsonl", infogap=_levels_file(tmp_path / "l.jsonl", [
        dict(id=s[0].id, diverged=False, reference_tokens=16384)]))
    with pytest.raises(SystemExit, match="l.jsonl:1 is not a row"):
        infogap.prepare(cfg, s[:1])
    cfg.infogap = _levels_file(tmp_path / "m.jsonl", [dict(id=s[0].id, diverged=False, error="truncated"),
                                                      dict(id=s[1].id, diverged=True, global_tokens=256)])
    assert [(k.id, k.global_tokens) for k in infogap.prepare(cfg, s)] == [(s[1].id, 256)]
