"""Fault injection: kills, signals, NaN steps, out-of-memory, a full disk, hostile images and data files.
Each fault costs at most a step or a row, never the run or a checkpoint."""
import dataclasses
import io
import json
import os
import signal

import pytest
import torch
from PIL import Image

import checkpoint
import data
import logbook
import model
import train
from helpers import run_cfg, run_cli, tiny_policy


def _run(out, *extra, fault=None, wait_for=None, send=None):
    """train.py as its own process, with a reward that varies with the text (so resume is a real check)."""
    args = ["--stage", "1", "--steps=4", "--save_every=1", "--keep_checkpoints=10", "--data=synthetic:6",
            "--prompts_per_step=1", "--group_size=3", "--curves=false", f"--out_dir={out}", *extra]
    return run_cli("train.py", *args, env=dict(LFPC_FAULT=fault or ""), wait_for=wait_for, send=send, varying=True)


def _state(out):
    from safetensors.torch import load_file
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    opt = torch.load(os.path.join(out, "step_000004", "optimizer.pt"), weights_only=True)
    metrics = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    for m in metrics:  # wall-clock and memory readings differ run to run
        for k in logbook.READINGS:
            m.pop(k, None)
    return adapter, opt, metrics


def test_killed_three_times_then_resumed_equals_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _run(a)[0] == 0
    # SIGKILL mid-rollout (step 2), mid-checkpoint-write (step 3's folder half written), mid-step (step 4)
    for fault in ("rollout:2", "checkpoint:3", "step:4"):
        code, _, _ = _run(b, *(["--resume", b] if os.path.exists(b) else []), fault=fault)
        assert code == -signal.SIGKILL
        if fault == "checkpoint:3":
            assert os.path.isdir(os.path.join(b, "step_000003.tmp"))  # the half-written one is left behind...
            assert checkpoint.latest_checkpoint(b).endswith("step_000002")  # ...and never picked up
    code, stdout, _ = _run(b, "--resume", b)
    assert code == 0 and "resumed from" in stdout and "step_000003" in stdout
    (ad_a, opt_a, met_a), (ad_b, opt_b, met_b) = _state(a), _state(b)
    assert any(v.abs().sum() > 0 for k, v in ad_a.items() if "lora_B" in k)  # the weights did move
    assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    assert all(torch.equal(opt_a["state"][k]["exp_avg_sq"], opt_b["state"][k]["exp_avg_sq"]) for k in opt_a["state"])
    assert met_a == met_b and [m["step"] for m in met_b] == [1, 2, 3, 4]
    state = json.load(open(os.path.join(b, "step_000004", "state.json")))
    assert state["step"] == 4 and state["cursor"] == 4  # one prompt per step


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "run")
    code, stdout, stderr = _run(out, "--steps=50", wait_for="step=1 ", send=signal.SIGINT)
    assert code == 130, stderr  # the shell's code for SIGINT: make and schedulers must not see a finished run
    assert "SIGINT: finishing this step" in stdout and f"--resume {out}" in stdout
    last = checkpoint.latest_checkpoint(out)
    step = json.load(open(os.path.join(last, "state.json")))["step"]
    assert 1 <= step < 50 and not os.path.exists(os.path.join(out, "final"))


def _cfg(out, **kw):  # 3 steps of one prompt x 2 rows, a checkpoint after each
    small = dict(data="synthetic:4", steps=3, save_every=1, keep_checkpoints=10, prompts_per_step=1, group_size=2)
    return run_cfg(out, **{**small, **kw})


def test_a_nan_step_is_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch, capsys):
    real = model.sequence_logprobs
    calls = {"n": 0}

    def nan_once(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls["n"] == 2 else out  # the second step's loss is NaN

    monkeypatch.setattr(model, "sequence_logprobs", nan_once)
    train.train(_cfg(tmp_path / "a"))
    metrics = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [m["skipped"] for m in metrics] == [0, 1, 0]
    monkeypatch.setattr(model, "sequence_logprobs", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(tmp_path / "b", max_bad_steps=2))
    assert "stopping at step 2" in str(e.value) and "non-finite" in str(e.value)


def test_a_non_finite_gradient_skips_the_update_even_with_a_finite_loss():
    """An inf in one gradient (the loss itself finite): no update, the gradients cleared, the step counted."""
    p = tiny_policy()
    params = p.trainable_parameters()
    before = [w.detach().clone() for w in params]
    for w in params:
        w.grad = torch.ones_like(w)
    params[0].grad[0] = float("inf")
    stats = train.optimizer_step(p, torch.optim.SGD(params, lr=1.0), dict(loss=1.0, clip=0, kl=0, tokens=4, micro=1),
                                 train.Config())
    try:
        assert stats["skipped"] == 1 and all(w.grad is None for w in params)
        assert all(torch.equal(w, b) for w, b in zip(params, before))
    finally:
        with torch.no_grad():  # the tiny model is shared by the tests
            for w, b in zip(params, before):
                w.copy_(b)


def _out_of_memory_at_the_second_rollout(monkeypatch):
    real, calls = train.rollout_groups, {"n": 0}

    def oom_once(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(train, "rollout_groups", oom_once)


def test_out_of_memory_halves_the_batch_once_then_stops(tmp_path, monkeypatch, capsys):
    _out_of_memory_at_the_second_rollout(monkeypatch)
    cfg = _cfg(tmp_path / "a", micro_batch=4, rollout_rows=8)
    train.train(cfg)
    assert "retrying with micro_batch=2, rollout_rows=4" in capsys.readouterr().out
    assert len(open(tmp_path / "a" / "metrics.jsonl").readlines()) == 3
    monkeypatch.setattr(train, "rollout_groups", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("again")))
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(tmp_path / "b"))
    assert "out of memory again at step 1" in str(e.value) and "Estimated peak" in str(e.value)


def test_out_of_memory_never_halves_the_rows_below_a_group():
    """A group's rows are rolled out together: halved rows in flight stop at group_size (what the retried step
    then runs with, and what the checkpoint and the memory estimate record)."""
    cfg = train.Config(group_size=4, rollout_rows=6, micro_batch=1)
    rcfg = train.rollout_config(cfg)
    seen = []

    def step(skip):
        seen.append((cfg.micro_batch, cfg.rollout_rows, rcfg.rollout_rows))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return "done"

    assert train.Retry(cfg, rcfg)(step, 0) == "done"
    assert seen == [(1, 6, 6), (1, 4, 4)]


def test_out_of_memory_in_a_later_ppo_epoch_redoes_the_step_from_its_start(tmp_path, monkeypatch):
    """ppo_epochs=2, out of memory in the second update: the adapter and optimizer go back to the step's start,
    so the retried step applies two updates in all (it applied three)."""
    real, calls = train.optimizer_step, {"n": 0}

    def oom_second(policy, optimizer, sums, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(policy, optimizer, sums, cfg)

    monkeypatch.setattr(train, "optimizer_step", oom_second)
    train.train(_cfg(tmp_path, steps=1, ppo_epochs=2))
    opt = torch.load(tmp_path / "step_000001" / "optimizer.pt", weights_only=True)
    assert calls["n"] == 4 and {int(s["step"]) for s in opt["state"].values()} == {2}


def test_a_resumed_run_keeps_the_halved_batch_and_its_one_retry(tmp_path, monkeypatch, capsys):
    """An out-of-memory retry's settings are the run's from then on: a resume goes on with them (and a second
    out-of-memory error stops it, as it would have stopped the run that was not killed)."""
    _out_of_memory_at_the_second_rollout(monkeypatch)
    train.train(_cfg(tmp_path, micro_batch=4, rollout_rows=8))
    rows = []

    def oom(policy, samples, rcfg, **kw):
        rows.append(rcfg.rollout_rows)
        raise torch.OutOfMemoryError("again")

    monkeypatch.setattr(train, "rollout_groups", oom)
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(tmp_path, micro_batch=4, rollout_rows=8, steps=4), resume=str(tmp_path))
    assert "with micro_batch=2, rollout_rows=4: halved" in capsys.readouterr().out
    assert rows == [4] and "out of memory again at step 4 with micro_batch=2, rollout_rows=4" in str(e.value)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real = torch.save

    def full_disk(obj, path, *a, **kw):
        if "step_000002" in str(path):
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(tmp_path))
    assert "No space left on device" in str(e.value) and "step_000001" in str(e.value) and "is intact" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "rollouts", "step_000001"]  # no half checkpoint
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000001")


# ---------------------------------------------------------------- hostile images and data files

def _save(img, path, **kw):
    img.save(path, **kw)
    return os.path.basename(path)


def test_hostile_images(tmp_path, monkeypatch, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    files = {
        "cmyk": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "palette": _save(rgb.convert("P"), tmp_path / "palette.png"),
        "rgba": _save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
        "gray": _save(rgb.convert("L"), tmp_path / "gray.png"),
        "16bit": _save(Image.fromarray((rng.random((60, 80)) * 1000).astype(np.uint16)), tmp_path / "deep.png"),
        "wrong_ext": _save(rgb, tmp_path / "really_png.jpg", format="PNG"),
    }
    full = (tmp_path / "full.png")
    rgb.save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:3000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("L", (3000, 3000)).save(tmp_path / "bomb.png")
    bad = {"cut": "cut.png", "empty": "empty.jpg", "bomb": "bomb.png", "missing": "nope.png"}
    rows = [dict(id=k, image=v, question="q", answer="x") for k, v in {**files, **bad}.items()]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(data, "MAX_PIXELS", 1_000_000)  # 3000 x 3000 is a "bomb" here
    samples = data.read_jsonl(str(tmp_path / "d.jsonl"), max_reasons=10)
    out = capsys.readouterr().out
    assert sorted(s.id for s in samples) == sorted(files)
    assert "skipped 4 bad row(s)" in out
    for name in ("cut.png", "empty.jpg", "bomb.png", "nope.png"):
        assert name in out
    assert "pixel limit" in out
    for s in samples:
        im = s.image()
        assert im.mode == "RGB" and im.size == (80, 60)
    deep = next(s for s in samples if s.id == "16bit").image()
    assert 0 < max(deep.getextrema()[0]) < 255  # scaled from 16 bits, not clipped to white


def _good_and_cut_jpeg(folder):
    """ok.jpg and cut.jpg (the same JPEG cut short: its header is fine, so it passes the cheap checks and fails
    when decoded), with a JSONL naming both; returns the JSONL's path."""
    import numpy as np
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    img.save(folder / "ok.jpg")
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:1500])
    rows = [dict(id=k, image=f"{k}.jpg", question="q", answer="x") for k in ("ok", "cut")]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "d.jsonl"


def test_an_image_that_breaks_mid_run_costs_only_that_sample(tmp_path, capsys):
    _good_and_cut_jpeg(tmp_path)
    cfg = _cfg(tmp_path / "run", data=str(tmp_path / "d.jsonl"), steps=2, prompts_per_step=2, infogap="fixed:64")
    train.train(cfg)
    out = capsys.readouterr().out
    assert out.count("skipping a bad image: sample cut") == 1
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2
    # the checkpoints remember it: a resumed run skips it from its first step, as the run that went on does (under
    # torchrun every rank must, or the ranks would split different orders)
    assert json.load(open(tmp_path / "run" / "step_000002" / "state.json"))["bad_ids"] == ["cut"]
    train.train(dataclasses.replace(cfg, steps=4), resume=str(tmp_path / "run"))
    assert "skipping a bad image" not in capsys.readouterr().out


@pytest.mark.parametrize("content,why", [
    (b"", "no usable sample"),  # empty file
    (b'{"image": "a.png", "question": "q"}\n', "no usable sample"),  # wrong columns
    (b"\xff\xfe not utf-8 \x80\n", "no usable sample"),  # non-UTF-8 text
])
def test_broken_data_files_stop_before_any_work(tmp_path, content, why):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.read_jsonl(str(tmp_path / "d.jsonl"))
    assert why in str(e.value) and "d.jsonl" in str(e.value)


def test_parquet_with_wrong_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"foo": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(SystemExit) as e:
        data.load(str(tmp_path / "x.parquet"))
    assert "no usable sample" in str(e.value)
    (tmp_path / "y.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as e:
        data.load(str(tmp_path / "y.parquet"))
    assert "cannot read" in str(e.value)


def test_eval_skips_an_image_that_breaks_mid_run(tmp_path, capsys):
    import eval as ev
    _good_and_cut_jpeg(tmp_path)
    s = ev.main(["--bench", "synthetic", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "ev"),
                 "--global-tokens", "16", "--max-turn-tokens", "4", "--max-response-tokens", "10"])
    assert s["num_items"] == 1 and "skipping a bad image: sample cut" in capsys.readouterr().out
