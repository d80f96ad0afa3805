"""plot.py and trackers.py: curves from a real run's metrics.jsonl, runs overlaid, the sweep figure, and
--report_to (TensorBoard events when the package is there; a clear stop at start when a package is not)."""
import importlib.util
import json
import os
import sys
import types

import pytest

import logbook
import plot
import train
import trackers

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _lines_by_panel(fig):
    return {ax.get_title(): ax.get_lines() for ax in fig.axes}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Two steps of stage 1 on the tiny model, reporting to TensorBoard when it is installed."""
    out = tmp_path_factory.mktemp("run") / "stage1"
    cfg = train.Config(**train.PRESETS["tiny"])
    cfg.out_dir, cfg.data, cfg.steps, cfg.save_every = str(out), "synthetic:2", 2, 1
    cfg.prompts_per_step, cfg.group_size, cfg.max_turn_tokens, cfg.max_response_tokens = 2, 2, 8, 24
    cfg.report_to = "tensorboard" if HAS_TENSORBOARD else "none"
    real = logbook.draw_curves
    logbook.draw_curves = lambda folder: (DRAWN.append(folder), real(folder))
    try:
        train.train(cfg)
    finally:
        logbook.draw_curves = real
    return out


DRAWN = []  # the folders train.py drew curves for


def test_train_writes_curves_and_the_plot_overlays_runs(real_run, tmp_path, capsys):
    # checkpoints after steps 1 and 2: drawn at each
    assert len(DRAWN) == 2 and (real_run / "curves.png").stat().st_size > 10_000
    rows = plot.read_metrics(str(real_run))
    assert [r["step"] for r in rows] == [1, 2] and all("reward_std" in r for r in rows)
    # a second run: the same metrics with another reward, and a line cut by a kill at its end
    other = tmp_path / "baseline"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(dict(r, reward=r["reward"] + 1)) + "\n")
        f.write('{"step": 3, "rew')
    fig = plot.curves([str(real_run), str(other)], out=str(tmp_path / "both.png"))
    assert "skipped 1 unreadable line" in capsys.readouterr().out
    assert (tmp_path / "both.png").exists() and not (tmp_path / "both.png.tmp.png").exists()
    panels = _lines_by_panel(fig)
    assert len(panels) == len(plot.PANELS)
    for title, keys in plot.PANELS:
        assert len(panels[title]) == 2 * len(keys)  # each run: one line per metric of the panel
    reward = panels[plot.PANELS[0][0]]
    assert [ln.get_label() for ln in reward] == ["stage1", "baseline"]
    assert list(reward[0].get_xdata()) == [1, 2]
    assert list(reward[1].get_ydata()) == [r["reward"] + 1 for r in rows]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["stage1", "baseline"]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (optional)")
def test_report_to_tensorboard_writes_the_metrics(real_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(real_run / "tensorboard"))
    events.Reload()
    assert {"reward", "accuracy", "loss", "grad_norm", "seconds"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("reward")] == [1, 2]
    rows = plot.read_metrics(str(real_run))
    assert [e.value for e in events.Scalars("response_len")] == pytest.approx([r["response_len"] for r in rows])


def test_a_missing_tracker_stops_the_run_at_start(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))

    def no_model(*a, **kw):
        raise AssertionError("the model must not be loaded before the tracker is checked")

    monkeypatch.setattr(train.model, "load_policy", no_model)
    cfg = train.Config(out_dir=str(tmp_path / "run"), data="synthetic:2", report_to="wandb")
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.train(cfg)
    with pytest.raises(SystemExit, match="expected one of none, tensorboard, wandb, trackio"):
        trackers.check("mlflow")
    trackers.check("none")


def test_a_resumed_run_goes_on_with_its_tracker_run(tmp_path, monkeypatch):
    """A resume runs the steps after its checkpoint again, and metrics.jsonl drops the killed run's rows for
    them: TensorBoard drops its events from there (it kept both), wandb and trackio go on with the same run (a
    new one before), named by the folder and kept in it (runs/a/stage1 and runs/b/stage1 are two runs)."""
    seen = []
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = lambda **kw: seen.append(("tensorboard", kw)) or types.SimpleNamespace(add_text=print)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(init=lambda n=name, **kw: seen.append((n, kw))))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("wandb", "trackio", "tensorboard")
                        else real_find_spec(name, *a))
    trackers.start("tensorboard", str(tmp_path), {}, first_step=2)
    assert seen.pop()[1]["purge_step"] == 3  # the first step run again
    for other in ("a", "b"):
        os.makedirs(tmp_path / other / "stage1")
        for name in ("wandb", "trackio"):
            trackers.start(name, str(tmp_path / other / "stage1"), {})
            trackers.start(name, str(tmp_path / other / "stage1"), {}, first_step=2)
    wandb = [kw for n, kw in seen if n == "wandb"]
    trackio = [kw for n, kw in seen if n == "trackio"]
    assert wandb[0]["id"] == wandb[1]["id"] == wandb[1]["name"] != wandb[2]["id"] and wandb[0]["resume"] == "allow"
    assert wandb[0]["name"].startswith("stage1-")
    assert trackio[0]["name"] == trackio[1]["name"] != trackio[2]["name"]
    assert [kw["resume"] for kw in trackio] == ["never", "allow"] * 2


def test_scalars_keep_numbers_only():
    assert trackers.scalars(dict(step=3, reward=0.5, skipped=1, flag=True, name="x")) == dict(reward=0.5, skipped=1.0)


def test_sweep_figure_one_line_per_model_and_probe(tmp_path):
    points = [dict(model=m, global_tokens=g, plain=p, noise=n, **{"no-tool": t})
              for m, rows in (("base", [(64, .2, .2, .1), (256, .4, .3, .2)]),
                              ("lfpc", [(64, .5, .1, .1), (256, .6, .2, .3)]))
              for g, p, n, t in rows]
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump(points, f)
    fig = plot.sweep(str(tmp_path))
    assert (tmp_path / "sweep.png").exists()
    left, right = fig.axes
    assert len(left.get_lines()) == 2 * len(plot.SWEEP_LINES)
    models = [ln for ln in right.get_lines() if not ln.get_label().startswith("_")]  # not the zero line
    assert [ln.get_label() for ln in models] == ["base", "lfpc"]
    assert list(models[1].get_xdata()) == [64, 256]
    assert list(models[1].get_ydata()) == pytest.approx([40, 40])  # crop dependency, points
    assert list(left.get_lines()[0].get_ydata()) == pytest.approx([20, 40])


def test_run_names_and_missing_folder(tmp_path):
    assert plot.run_names(["runs/a/stage1", "runs/b/stage1", "runs/c"]) == [
        os.path.normpath("runs/a/stage1"), os.path.normpath("runs/b/stage1"), "c"]
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        plot.read_metrics(str(tmp_path))
    with pytest.raises(SystemExit, match="sweep.json not found: eval.py --sweep writes it"):
        plot.sweep(str(tmp_path))


def test_what_is_not_measured_is_not_logged_as_zero_and_short_runs_compare_halves(tmp_path):
    from types import SimpleNamespace

    ep = SimpleNamespace(group=0, ids=[1, 2, 3], prompt_len=1, num_generated=2, num_tool_calls=0, num_tool_errors=0,
                         truncated=False)
    score = dict(total=1.0, accuracy=1.0, format=0.0, tool=0.0, grounding=0.0, iou=None, coverage=None)
    stats = dict(loss=0.1, grad_norm=0.2, skipped=0, clip=0.0, kl=0.0)
    m = logbook.step_metrics(1, [ep], [score], stats, 1.0, 0.0)
    assert m["iou"] is None and m["coverage"] is None  # no crop: nothing measured (plot.py leaves them out)
    # each metric from its own field: two episodes, 3 and 1 calls, 1 and 0 errors; a crop's IoU and coverage
    eps = [SimpleNamespace(**{**vars(ep), "num_tool_calls": c, "num_tool_errors": e, "group": g})
           for c, e, g in ((3, 1, 0), (1, 0, 1))]
    scores = [dict(score, total=t, iou=0.25, coverage=1.0) for t in (1.0, 3.0)]
    m = logbook.step_metrics(1, eps, scores, stats, 1.0, 0.0)
    assert (m["tool_calls"], m["tool_errors"], m["iou"], m["coverage"]) == (2.0, 0.5, 0.25, 1.0)
    assert m["reward_std"] == 1.0  # the groups' means 1 and 3: their population standard deviation
    rows = [dict(step=k, reward=float(k), accuracy=0.0, tool_calls=0.0) for k in range(1, 7)]  # 6 steps
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "(first 3 steps -> last 3; held-out: step - -> -): reward 2 -> 5" in logbook.what_changed(
        str(tmp_path / "metrics.jsonl"))  # not 5 steps each, sharing 4
