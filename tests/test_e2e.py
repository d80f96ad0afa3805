"""End to end on the tiny model: stage 1 -> stage 2 -> eval through the command-line entry points."""
import json
import os

import pytest

import eval as evaluate_mod
import train
from helpers import run_cli

SMALL = ["--steps=2", "--prompts_per_step=1", "--group_size=2", "--save_every=1", "--dump_every=1",
         "--data=synthetic:4"]


def test_stage1_stage2_eval(tmp_path, capsys):
    s1, s2, ev = tmp_path / "s1", tmp_path / "s2", tmp_path / "ev"
    train.main(["--stage", "1", *SMALL, f"--out_dir={s1}"])
    assert (s1 / "final" / "adapter_model.safetensors").exists() and (s1 / "step_000002" / "optimizer.pt").exists()
    lines = [json.loads(x) for x in open(s1 / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    assert {"reward", "accuracy", "format", "tool_calls", "tool_errors", "loss", "grad_norm", "peak_mem_gb"} <= set(lines[0])
    dumps = os.listdir(s1 / "rollouts")
    assert dumps and "text" in json.loads(open(s1 / "rollouts" / dumps[0]).readline())
    train.main(["--stage", "2", *SMALL, f"--out_dir={s2}", f"--init_adapter={s1 / 'final'}"])
    assert json.load(open(s2 / "final" / "config.json"))["init_adapter"] == str(s1 / "final")
    args = ["--bench", "synthetic", "--data", "synthetic:3", "--adapter", str(s2 / "final"), "--out", str(ev),
            "--global-tokens", "32", "--crop-tokens", "32", "--max-turn-tokens", "16", "--max-response-tokens", "40",
            "--html", str(tmp_path / "r.html")]
    summary = evaluate_mod.evaluate(evaluate_mod.parse_args(args))
    assert summary["num_items"] == 3 and set(summary["per_category"]) <= {"word", "glyph"}
    assert json.load(open(ev / "summary.json"))["num_items"] == 3
    assert "| **overall** | 3 |" in open(ev / "table.md").read()
    assert open(tmp_path / "r.html").read().count("data:image/png;base64,") == 3
    # a rerun does no work: every item is already in items.jsonl
    capsys.readouterr()
    evaluate_mod.evaluate(evaluate_mod.parse_args(args))
    assert "3 item(s) already in" in capsys.readouterr().out
    assert len(open(ev / "items.jsonl").readlines()) == 3


def test_missing_data_file_is_one_clear_line(tmp_path):
    code, out, err = run_cli("train.py", "--stage", "1", f"--data={tmp_path}/nope.jsonl", f"--out_dir={tmp_path}/o")
    assert code != 0 and "Traceback" not in err
    assert f"data file not found: {tmp_path}/nope.jsonl" in err


def test_unreadable_image_is_reported_and_skipped(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    rows = [dict(id="x", image="bad.jpg", question="q?", answer="yes")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code, out, err = run_cli("train.py", "--stage", "1", f"--data={tmp_path}/d.jsonl", f"--out_dir={tmp_path}/o")
    assert code != 0 and "Traceback" not in err
    assert "bad.jpg" in out and "no usable sample" in err


def test_missing_benchmark_data_is_one_line():
    code, out, err = run_cli("eval.py", "--bench", "vstar")
    assert code != 0 and "Traceback" not in err and "V* Bench" in err


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_lists_options(script):
    code, out, err = run_cli(script, "--help")
    assert code == 0
    for opt in (["--stage", "--resume", "--dry-run", "--lr=", "--clip_low="] if script == "train.py"
                else ["--bench", "--adapter", "--probe", "--global-tokens", "--html", "--limit"]):
        assert opt in out, opt
