"""eval.py --sweep on the tiny model with tiny budgets: every point in its own folder, the table, sweep.json and
the figure written, one line per model, and a killed sweep resumes without redoing finished items."""
import json
import os

import pytest
from PIL import Image

import eval as ev
import rollout as rollout_module
from helpers import tiny_policy

ARGS = ["--bench", "synthetic", "--batch", "2", "--sweep", "16,32",
        "--max-turns", "1", "--max-turn-tokens", "2", "--max-response-tokens", "2", "--crop-tokens", "16"]


def _two_items(folder):
    """Two small images in the project's JSONL: the sweep's cost is the tiny model, not drawing 4K images."""
    os.makedirs(folder)
    with open(folder / "d.jsonl", "w") as f:
        for i, color in enumerate(("red", "blue")):
            Image.new("RGB", (280, 196), color).save(folder / f"{i}.png")
            f.write(json.dumps(dict(id=str(i), image=f"{i}.png", question="Which colour?", answer=color)) + "\n")
    return str(folder / "d.jsonl")


def test_sweep_writes_its_table_and_figure_and_resumes_after_a_kill(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ARGS + ["--data", _two_items(tmp_path / "data"), "--out", str(out)]
    policy = tiny_policy(lora=False)  # built once per test session
    monkeypatch.setattr(ev.model, "load_policy", lambda *a, **kw: policy)
    calls = []
    real_rollout = rollout_module.rollout

    def counting_rollout(policy, batch, cfg):
        calls.append((cfg.global_tokens, cfg.probe))
        if len(calls) == 4 and not os.environ.get("RESUMED"):
            raise KeyboardInterrupt("killed")  # the 4th point: g32, plain
        return real_rollout(policy, batch, cfg)

    monkeypatch.setattr(rollout_module, "rollout", counting_rollout)
    with pytest.raises(KeyboardInterrupt):
        ev.main(args)
    assert calls == [(16, None), (16, "noise"), (16, "no-tool"), (32, None)]
    assert not (out / "sweep.json").exists()
    monkeypatch.setenv("RESUMED", "1")
    calls.clear()
    monkeypatch.chdir(tmp_path)  # a second model: an adapter folder (load_policy is stubbed, so its contents do not matter)
    os.makedirs("runs/b")
    (tmp_path / "runs" / "b" / "adapter_config.json").write_text("{}")
    points = ev.main(args + ["--adapter", "none", "--adapter", "runs/b"])  # resumed, and a second model added
    assert calls[:3] == [(32, None), (32, "noise"), (32, "no-tool")]  # the finished points were not redone
    assert len(calls) == 3 + 6  # the second model: every point
    folders = sorted(os.listdir(out / "tiny"))
    assert folders == ["g16-no-tool", "g16-noise", "g16-plain", "g32-no-tool", "g32-noise", "g32-plain"]
    assert sorted(os.listdir(out / "runs-b")) == folders
    assert all((out / "tiny" / f / "items.jsonl").exists() for f in folders)
    assert [(p["model"], p["global_tokens"], p["num_items"]) for p in points] == [
        ("tiny", 16, 2), ("tiny", 32, 2), ("runs-b", 16, 2), ("runs-b", 32, 2)]
    assert json.load(open(out / "sweep.json")) == points
    with open(out / "tiny" / "g32-noise" / "summary.json") as f:
        assert points[1]["noise"] == json.load(f)["accuracy"]
    table = (out / "sweep.md").read_text()
    assert table.count("| tiny |") == 2 and table.count("| runs-b |") == 2 and "crop dependency" in table
    assert "noise added to each crop ('noise-replace' in the experiment table" in table  # which probe, said
    assert (out / "sweep.png").stat().st_size > 5_000


def test_a_points_accuracies_are_taken_on_the_items_all_three_runs_have(tmp_path, monkeypatch):
    """A point whose noise run stopped after one item: plain, noise and no-tool are compared on that item (the
    crop dependency is plain - noise on one set of items), not each on its own."""
    scored = {"plain": {"a": 1, "b": 1}, "noise": {"a": 0}, "no-tool": {"a": 1, "b": 0}}
    items = lambda folder: {i: dict(id=i, correct=c) for i, c in scored[folder.split("g16-")[1]].items()}

    def evaluate(args, load):  # its folder, and a summary of its own items, as eval's
        os.makedirs(args.out)
        own = items(args.out)
        return dict(accuracy=sum(it["correct"] for it in own.values()) / len(own), num_items=len(own))

    monkeypatch.setattr(ev, "read_items", items)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    (point,) = ev.main(["--bench", "synthetic", "--sweep", "16", "--out", str(tmp_path / "s")])
    assert (point["plain"], point["noise"], point["no-tool"], point["num_items"]) == (1.0, 0.0, 1.0, 1)


def test_model_tags_and_the_one_adapter_rule():
    assert ev._model_tag("tiny", None) == "tiny"
    assert ev._model_tag("tiny", "runs/stage2/final/") == "runs-stage2-final"
    with pytest.raises(SystemExit, match="--sweep"):
        ev.main(["--bench", "synthetic", "--adapter", "a", "--adapter", "b"])
