"""Results that cannot lie (issue 16): a run folder belongs to one run and an evaluation folder to one setting;
damaged checkpoints, cut lines, signals and bad arguments are named, never silently mixed into a number."""
import json
import os
import signal

import pytest

import checkpoint
import train

# ---------------------------------------------------------------- exit codes and arguments


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stop_exits_with_the_shells_code(sig, code):
    stop = checkpoint.GracefulStop()
    try:
        os.kill(os.getpid(), sig)
        assert stop.signal == sig.name and stop.exit_code == code
    finally:
        stop.restore()


def test_space_form_overrides_and_counts_below_one(capsys):
    cfg = train.parse_overrides(train.Config(), ["--steps", "4", "--lr", "3e-4", "--group-size=2"])
    assert (cfg.steps, cfg.lr, cfg.group_size) == (4, 3e-4, 2)
    for key in ("group_size", "prompts_per_step", "steps", "micro_batch"):
        for bad in (["--" + key, "0"], [f"--{key}=-1"]):
            with pytest.raises(SystemExit, match=f"--{key} must be at least 1"):
                train.parse_overrides(train.Config(), bad)
    with pytest.raises(SystemExit, match="needs a value"):
        train.parse_overrides(train.Config(), ["--steps", "--lr=1"])


def test_lora_r_must_match_the_init_adapter(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(r=8, lora_alpha=16)))
    args = ["--stage", "2", f"--init_adapter={tmp_path}", "--dry-run"]
    with pytest.raises(SystemExit, match="--lora_r=16 but the init adapter .* has r=8"):
        train.main([*args, "--lora_r", "16"])
    cfg = train.main([*args, "--preset", "24gb"])  # not given: the adapter's rank is the run's, and says so
    assert (cfg.lora_r, cfg.lora_alpha) == (8, 16) and "lora_r: 16 -> 8 (from the init adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        train.main(["--stage", "2", f"--init_adapter={tmp_path / 'nope'}", "--dry-run"])


# ---------------------------------------------------------------- a missing adapter is named


def test_eval_names_a_missing_adapter_and_what_makes_it(tmp_path, monkeypatch):
    import eval as ev
    import model
    monkeypatch.chdir(tmp_path)  # make stage1, no stage 2, then make eval
    monkeypatch.setattr(model, "load_policy", lambda *a, **kw: pytest.fail("the model loaded first"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--bench", "synthetic", "--data", "synthetic:2", "--adapter", "runs/stage2/final"])
    assert "adapter runs/stage2/final not found" in str(e.value)
    assert "make stage2" in str(e.value) and "ADAPTER=runs/stage1/final" in str(e.value)
