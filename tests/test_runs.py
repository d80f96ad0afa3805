"""Results that cannot lie (issue 16): a run folder belongs to one run and an evaluation folder to one setting;
damaged checkpoints, cut lines, signals and bad arguments are named, never silently mixed into a number."""
import dataclasses
import json
import os
import signal

import pytest

import checkpoint
import data
import model
import train
from helpers import run_cfg

# ---------------------------------------------------------------- exit codes and arguments


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stop_exits_with_the_shells_code(sig, code):
    stop = checkpoint.GracefulStop()
    try:
        os.kill(os.getpid(), sig)
        assert stop.signal == sig.name and stop.exit_code == code
    finally:
        stop.restore()


def test_values_that_would_crash_or_train_nothing_are_refused_before_the_model_loads(capsys):
    """A budget of 0 tokens divided by zero at the first tool call, temperature 0 gave a NaN loss every step and
    blamed the learning rate, a ladder "64,x" raised int()'s ValueError: each is one line naming the option."""
    import eval as ev
    for bad, says in (("--global_tokens=0", "--global_tokens must be at least 4"),
                      ("--crop_tokens=3", "--crop_tokens must be at least 4"),
                      ("--lora_r=0", "--lora_r must be at least 1"), ("--lr=-1", "--lr must be above 0"),
                      ("--temperature=0", "--temperature must be above 0"),
                      ("--infogap_ladder=64,abc", "--infogap_ladder '64,abc': expected token budgets"),
                      ("--infogap_ladder=64,64,16", "--infogap_ladder '64,64,16': 64 twice"),
                      ("--infogap_ladder=64,2", "at least 4 tokens")):
        with pytest.raises(SystemExit, match=says):
            train.parse_overrides(train.Config(), [bad])
    for argv, says in ((["--limit", "0"], "--limit must be at least 1"), (["--batch", "0"], "--batch must be at least 1"),
                       (["--max-turns", "0"], "--max-turns must be at least 1"),
                       (["--global-tokens", "0"], "--global-tokens must be at least 4"),
                       (["--max-response-tokens", "-1"], "--max-response-tokens must be at least 0"),
                       (["--sweep", "16,abc"], "--sweep '16,abc': expected token budgets"),
                       (["--sweep", "16,16"], "16 twice")):
        with pytest.raises(SystemExit, match=says):
            ev.parse_args(["--bench", "synthetic", *argv])
    assert ev.parse_args(["--max-response-tokens", "0"]).max_response_tokens == 0  # eval's "no cap"
    import infogap
    for argv, says in ((["--reference-tokens", "0"], "--reference-tokens must be at least 4"),
                       (["--max-tokens", "0"], "--max-tokens must be at least 1")):
        with pytest.raises(SystemExit, match=says):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("sys.argv", ["infogap.py", *argv])
                infogap.main()
    with pytest.raises(SystemExit, match="--infogap_reference_tokens must be at least 4"):
        train.parse_overrides(train.Config(), ["--infogap_reference_tokens=0"])


def test_each_setting_is_refused_one_below_its_least_and_taken_at_it():
    """Every bounded field, at its boundary: one below stops naming the option, the least itself runs (a ladder's
    budget too: 3 tokens is no image, 4 is)."""
    least = dict(steps=1, prompts_per_step=1, micro_batch=1, ppo_epochs=1, max_turns=1, max_turn_tokens=1,
                 max_response_tokens=1, save_every=1, keep_checkpoints=1, dump_every=1, max_bad_steps=1, lora_r=1,
                 infogap_max_tokens=1, group_size=2, global_tokens=4, crop_tokens=4, infogap_reference_tokens=4,
                 rollout_rows=0)
    for key, n in least.items():
        with pytest.raises(SystemExit, match=f"--{key} must be at least {n}, got {n - 1}$"):
            train.parse_overrides(train.Config(), [f"--{key}={n - 1}"])
        assert getattr(train.parse_overrides(train.Config(), [f"--{key}={n}"]), key) == n
    with pytest.raises(SystemExit, match="a budget is at least 4 tokens"):
        train.parse_overrides(train.Config(), ["--infogap_ladder=64,3"])
    assert train.parse_overrides(train.Config(), ["--infogap_ladder=64,4"]).infogap_ladder == "64,4"


def test_space_form_overrides_and_counts_below_one(capsys):
    cfg = train.parse_overrides(train.Config(), ["--steps", "4", "--lr", "3e-4", "--group-size=2"])
    assert (cfg.steps, cfg.lr, cfg.group_size) == (4, 3e-4, 2)
    for key in ("group_size", "prompts_per_step", "steps", "micro_batch"):
        for bad in (["--" + key, "0"], [f"--{key}=-1"]):
            with pytest.raises(SystemExit, match=f"--{key} must be at least {2 if key == 'group_size' else 1}"):
                train.parse_overrides(train.Config(), bad)
    with pytest.raises(SystemExit, match="needs a value"):
        train.parse_overrides(train.Config(), ["--steps", "--lr=1"])
    with pytest.raises(SystemExit, match="--ppo_epochs must be at least 1"):  # it crashed after a whole rollout
        train.parse_overrides(train.Config(), ["--ppo_epochs=0"])
    with pytest.raises(SystemExit, match="--group_size must be at least 2"):  # every advantage 0: nothing learnt
        train.parse_overrides(train.Config(), ["--group_size=1"])
    for key, typo in (("loss_agg", "token_mean"), ("decode", "graph"), ("matcher", "rules"), ("prompt", "DeepEyes")):
        with pytest.raises(SystemExit, match=f"--{key} '{typo}': expected one of"):  # ran as the default, silently
            train.parse_overrides(train.Config(), [f"--{key}={typo}"])
    import eval as ev
    for key, typo in (("matcher", "rules"), ("prompt", "DeepEyes")):  # eval.py too, before any model loads
        with pytest.raises(SystemExit):
            ev.parse_args(["--bench", "synthetic", f"--{key}", typo])
    assert "invalid choice: 'rules'" in capsys.readouterr().err


def test_lora_r_must_match_the_init_adapter(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(r=8, lora_alpha=16)))
    args = ["--stage", "2", f"--init_adapter={tmp_path}", "--dry-run"]
    with pytest.raises(SystemExit, match="--lora_r=16 but the init adapter .* has r=8"):
        train.main([*args, "--lora_r", "16"])
    cfg = train.main([*args, "--preset", "24gb"])  # not given: the adapter's rank is the run's, and says so
    assert (cfg.lora_r, cfg.lora_alpha) == (8, 16) and "lora_r: 16 -> 8 (from the init adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        train.main(["--stage", "2", f"--init_adapter={tmp_path / 'nope'}", "--dry-run"])


def test_stage_2s_default_adapter_is_the_runs_own_and_its_info_gap_selection_uses_it(tmp_path, monkeypatch):
    import infogap
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/stage1/final")
    with open("runs/stage1/final/adapter_config.json", "w") as f:
        json.dump(dict(r=8, lora_alpha=16), f)
    cfg = train.main(["--stage", "2", "--dry-run"])
    # the saved config names the adapter it started from, and --infogap auto selects with that policy
    assert cfg.init_adapter == "runs/stage1/final"
    assert infogap.cache_path(cfg) != infogap.cache_path(dataclasses.replace(cfg, init_adapter=""))


# ---------------------------------------------------------------- a missing adapter is named


def test_eval_names_a_missing_adapter_and_what_makes_it(tmp_path, monkeypatch):
    import eval as ev
    import model
    monkeypatch.chdir(tmp_path)  # make stage1, no stage 2, then make eval
    monkeypatch.setattr(model, "load_policy", lambda *a, **kw: pytest.fail("the model loaded first"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--bench", "synthetic", "--data", "synthetic:2", "--adapter", "runs/stage2/final"])
    assert "adapter runs/stage2/final not found" in str(e.value)
    assert "make stage2" in str(e.value) and 'ADAPTERS="none runs/stage1/final"' in str(e.value)


# ---------------------------------------------------------------- a run folder belongs to one run


def _cfg(out, **kw):
    """A run of the tiny model small enough to take a second or two per step here."""
    small = dict(data="synthetic:4", steps=2, save_every=1, keep_checkpoints=10, prompts_per_step=1, group_size=2,
                 max_turn_tokens=8, max_response_tokens=16)
    return run_cfg(out, **{**small, **kw})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step run with checkpoints at steps 1 and 2 (tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train.train(_cfg(out))
    return out


def test_a_run_never_trains_on_the_held_out_items(tmp_path, monkeypatch):
    """eval.py's generated sets use data.HELD_OUT_SEED: a run generating its items with that seed is refused."""
    _no_model(monkeypatch)
    for spec in ("synthetic:4", "micro:8", "micro:8,synthetic:4"):
        with pytest.raises(SystemExit) as e:
            train.train(_cfg(tmp_path / spec.replace(",", "+"), data=spec, seed=data.HELD_OUT_SEED))
        assert "held-out evaluation items" in str(e.value)


def _rewrite_config(ckpt, config):
    """A checkpoint's config.json as a run with those settings would have written it (its recorded sha256 too)."""
    import snapshot

    (ckpt / "config.json").write_text(json.dumps(config))
    state = json.loads((ckpt / "state.json").read_text())
    state["sha256"]["config.json"] = snapshot.sha256(ckpt / "config.json")
    (ckpt / "state.json").write_text(json.dumps(state))


def _copy(run, tmp_path):
    import shutil
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _no_model(monkeypatch):
    """Every refusal must come before the model loads."""
    monkeypatch.setattr(train.model, "load_policy", lambda *a, **kw: pytest.fail("the model loaded first"))


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(finished_run, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(finished_run, seed=1))
    assert f"{finished_run} already holds a run" in str(e.value) and "--resume" in str(e.value)
    assert "--out_dir" in str(e.value)


def test_resume_refuses_another_run_and_a_finished_adapter(finished_run, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(finished_run, seed=1, group_size=4, steps=5), resume=str(finished_run))
    assert "seed=0 there, 1 now" in str(e.value) and "group_size=2 there, 4 now" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.train(_cfg(finished_run, steps=5), resume=str(finished_run / "final"))
    assert "finished run's adapter" in str(e.value) and "--init_adapter=" in str(e.value)
    with pytest.raises(SystemExit) as e:  # shortened below the newest checkpoint: said, not relabelled
        train.train(_cfg(finished_run, steps=1), resume=str(finished_run))
    assert "step_000002 is at step 2, past --steps=1" in str(e.value)


def test_resume_writes_into_its_folder_and_steps_may_grow(finished_run, tmp_path, monkeypatch, capsys):
    run = _copy(finished_run, tmp_path)
    monkeypatch.chdir(tmp_path)  # the default out_dir, runs/stage1, would be here
    train.train(_cfg("", steps=3), resume=str(run))
    assert "resumed from" in capsys.readouterr().out
    assert (run / "step_000003").is_dir() and not (tmp_path / "runs").exists()
    assert json.load(open(run / "final" / "state.json"))["step"] == 3


def test_a_resume_on_data_changed_since_its_checkpoint_is_refused(tmp_path, monkeypatch):
    """The same file name with other rows (a conversion rerun with more) would give other prompts in another
    order: the resume stops, naming the data, before the model loads."""
    path = str(tmp_path / "d" / "train.jsonl")
    data.convert("synthetic:3", path)
    run = tmp_path / "run"
    train.train(_cfg(run, data=path, infogap="fixed:16", steps=1))
    first = json.loads(open(path).readline())
    with open(path, "a") as f:  # one row more
        f.write(json.dumps(dict(first, id="added")) + "\n")
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match=f"the data, {path}, changed since {run}"):
        train.train(_cfg(run, data=path, infogap="fixed:16", steps=2), resume=str(run))
    os.remove(path)  # moved away: not found, not "changed"
    with pytest.raises(SystemExit, match="not found"):
        train.train(_cfg(run, data=path, infogap="fixed:16", steps=2), resume=str(run))


def test_a_resume_continues_its_runs_settings_unless_an_option_changes_one(finished_run, tmp_path, capsys):
    """--resume DIR alone is the same run: its checkpoint's settings, not the defaults (which would silently train
    another temperature or turn limit); an option given now changes that one setting, and says so."""
    run = _copy(finished_run, tmp_path)
    saved = json.load(open(run / "step_000002" / "config.json"))
    cfg = train.main(["--resume", str(run), "--steps", "3", "--temperature", "0.7", "--dry-run"])
    assert (cfg.steps, cfg.temperature) == (3, 0.7)
    assert all(getattr(cfg, k) == saved[k] for k in ("data", "max_turn_tokens", "max_response_tokens", "group_size",
                                                     "prompts_per_step", "preset", "seed"))
    assert cfg.out_dir == ""  # --resume DIR writes into DIR, wherever the run was first written
    out = capsys.readouterr().out
    assert "temperature: 1.0 -> 0.7" in out and f"the settings of {run}" in out
    with pytest.raises(SystemExit, match="--preset 24gb: .* was trained with --preset tiny"):
        train.main(["--resume", str(run), "--preset", "24gb", "--dry-run"])
    # a run sized by --epochs, resumed with --steps: the steps given, not the epochs' count again (it trained nothing)
    # and a setting an older version did not save: the run's preset's, not Config's default
    _rewrite_config(run / "step_000002", {k: v for k, v in dict(saved, epochs=0.5).items() if k != "dump_every"})
    cfg = train.main(["--resume", str(run), "--steps", "5", "--dry-run"])
    assert (cfg.steps, cfg.epochs, cfg.dump_every) == (5, 0.0, train.PRESETS["tiny"]["dump_every"])
    assert "epochs: 0.5 -> 0.0 (--steps given)" in capsys.readouterr().out


class _Reached(Exception):
    """Raised where a test stops a run that got past its checks."""


def _past_the_input_check(monkeypatch):
    """The info-gap levels are prepared right after a resume's inputs are checked: a run that gets there passed."""
    def prepare(cfg, samples):
        raise _Reached
    monkeypatch.setattr(train.infogap, "prepare", prepare)


def test_a_resume_on_an_infogap_file_changed_or_moved_since_its_checkpoint(tmp_path, monkeypatch):
    """--infogap FILE is fingerprinted as the data is: other levels under the same name are refused, naming it (and
    the data too when both changed); a file moved away is 'not found' where it is read, not 'changed'."""
    path = str(tmp_path / "d" / "train.jsonl")
    data.convert("synthetic:3", path)
    levels = tmp_path / "levels.jsonl"
    rows = [dict(id=s.id, global_tokens=16, diverged=True, reference="B", answers={}, ladder=[16])
            for s in data.load(path)]
    levels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train.train(_cfg(run, data=path, infogap=str(levels), steps=1))
    _no_model(monkeypatch)
    written = open(path).read()
    levels.write_text("".join(json.dumps(dict(r, global_tokens=64)) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=f"the infogap, {levels}, changed since {run}"):
        train.train(_cfg(run, data=path, infogap=str(levels), steps=2), resume=str(run))
    with open(path, "a") as f:
        f.write(open(path).readline().replace('"id": "', '"id": "added-'))
    with pytest.raises(SystemExit, match=f"the data, {path}, and the infogap, {levels}, changed"):
        train.train(_cfg(run, data=path, infogap=str(levels), steps=2), resume=str(run))
    open(path, "w").write(written)  # the data as it was, the levels moved away
    os.remove(levels)
    with pytest.raises(SystemExit, match=f"info-gap file not found: {levels}"):
        train.train(_cfg(run, data=path, infogap=str(levels), steps=2), resume=str(run))


def test_a_resume_passes_on_a_folders_new_image_and_on_a_checkpoint_without_fingerprints(tmp_path, monkeypatch):
    """A folder's data is fingerprinted by its JSONL, not by every file beside it; a checkpoint written before the
    fingerprints were recorded resumes (there is nothing to compare)."""
    folder = tmp_path / "set"
    data.convert("synthetic:3", str(folder / "train.jsonl"))
    run = tmp_path / "run"
    train.train(_cfg(run, data=str(folder), infogap="fixed:16", steps=1))
    _no_model(monkeypatch)
    _past_the_input_check(monkeypatch)
    (folder / "notes.txt").write_text("a file no row names")
    with pytest.raises(_Reached):
        train.train(_cfg(run, data=str(folder), infogap="fixed:16", steps=2), resume=str(run))
    (folder / "train.jsonl").write_text(open(folder / "train.jsonl").read().splitlines(keepends=True)[0])
    state = run / "step_000001" / "state.json"
    json.dump({k: v for k, v in json.load(open(state)).items() if k != "inputs"}, open(state, "w"))
    with pytest.raises(_Reached):  # the rows changed, but an older checkpoint did not record them
        train.train(_cfg(run, data=str(folder), infogap="fixed:16", steps=2), resume=str(run))


def test_a_resume_reads_the_named_checkpoints_settings_or_the_newest_readable(finished_run, tmp_path, capsys):
    """--resume DIR/step_N takes that checkpoint's settings; a folder whose newest config.json is cut takes the
    newest that reads; --stage given changes the stage; a key no Config field has (an older version's) is left
    out; --epochs and --steps given together keep the epochs given."""
    run = _copy(finished_run, tmp_path)
    first = json.load(open(run / "step_000001" / "config.json"))
    _rewrite_config(run / "step_000001", dict(first, temperature=0.5, removed_field=1))
    cfg = train.main(["--resume", str(run / "step_000001"), "--dry-run"])
    assert (cfg.temperature, cfg.max_turn_tokens) == (0.5, first["max_turn_tokens"])
    (run / "step_000002" / "config.json").write_text('{"cut')
    assert checkpoint.saved_config(str(run))["temperature"] == 0.5
    _rewrite_config(run / "step_000001", dict(first, stage=2, epochs=0.5))
    cfg = train.main(["--resume", str(run), "--stage", "1", "--steps", "5", "--epochs", "2", "--dry-run"])
    assert (cfg.stage, cfg.steps, cfg.epochs) == (1, 5, 2.0)


def test_a_resume_on_another_card_sizes_its_rows_in_flight_again(finished_run, tmp_path, capsys):
    """A GPU preset sizes rollout_rows from memory_gb and saves the number: resumed with another --memory_gb (a
    larger card), the rows are sized again for it; without, the saved number stays."""
    run = _copy(finished_run, tmp_path)
    saved = json.load(open(run / "step_000002" / "config.json"))
    _rewrite_config(run / "step_000002", dict(saved, preset="24gb", rollout_rows=2, memory_gb=24.0, prompts_per_step=4))
    assert train.main(["--resume", str(run), "--dry-run"]).rollout_rows == 2
    cfg = train.main(["--resume", str(run), "--memory_gb", "80", "--dry-run"])
    assert cfg.rollout_rows == 4 * saved["group_size"]  # the tiny model: every row of the step fits
    assert "rollout_rows: 2 -> 0 (sized again for --memory_gb)" in capsys.readouterr().out
    cfg = train.main(["--resume", str(run), "--memory_gb", "80", "--rollout_rows", "6", "--dry-run"])
    assert cfg.rollout_rows == 6  # given: as given


def test_a_fresh_run_keeps_its_preset_name_and_epochs_beside_steps(capsys):
    """The preset named is recorded (a resume fills settings an older version did not save from it); without
    --resume, --epochs with --steps is the epochs (train sizes the run from them), not reset to 0."""
    cfg = train.main(["--preset", "micro", "--epochs=1", "--steps=5", "--dry-run"])
    assert (cfg.preset, cfg.epochs) == ("micro", 1.0)


def test_a_resumed_run_trains_at_its_own_learning_rate_and_weight_decay(finished_run, tmp_path, monkeypatch, capsys):
    """The optimizer's moments come from the checkpoint, its settings from the command line (they were the
    checkpoint's, while config.json recorded the new ones)."""
    run = _copy(finished_run, tmp_path)
    seen, real = [], train.optimizer_step
    monkeypatch.setattr(train, "optimizer_step", lambda policy, opt, sums, cfg: seen.append(
        {k: opt.param_groups[0][k] for k in ("lr", "weight_decay")}) or real(policy, opt, sums, cfg))
    train.train(_cfg(run, steps=3, lr=1e-7, weight_decay=0.5), resume=str(run))
    assert seen == [dict(lr=1e-7, weight_decay=0.5)]
    assert "-> 1e-07 from now on" in capsys.readouterr().out


def test_a_run_killed_before_its_final_folder_resumes_to_write_it(finished_run, tmp_path, capsys):
    """Killed after its last step's checkpoint but before final/: resumed with the same --steps (the checkpoint is
    at step == steps, not past it), it trains no more and writes final/."""
    import shutil
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "final")
    lines = open(run / "metrics.jsonl").readlines()
    train.train(_cfg(run, steps=2), resume=str(run))
    assert f"resumed from {run / 'step_000002'} at step 2" in capsys.readouterr().out
    assert json.load(open(run / "final" / "state.json"))["step"] == 2
    assert open(run / "metrics.jsonl").readlines() == lines  # no step redone


def test_a_checkpoint_named_from_inside_its_run_folder_resumes(finished_run, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    monkeypatch.chdir(run)  # --resume step_000001: a bare name, from inside the run folder
    out_dir, ckpt, _ = checkpoint.plan_run(_cfg(run), "step_000001", "runs/stage1")
    assert os.path.abspath(out_dir) == str(run) and os.path.abspath(ckpt) == str(run / "step_000001")


def test_the_last_step_is_checkpointed_off_the_save_interval(tmp_path):
    """steps=3, save_every=2: step 3 gets its checkpoint too (a later --resume with more steps goes on from it)."""
    train.train(_cfg(tmp_path, steps=3, save_every=2))
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [str(tmp_path / f"step_{k:06d}") for k in (2, 3)]


def test_a_step_folder_without_its_state_is_no_checkpoint(tmp_path):
    """state.json is written last: a step folder without it (copied in part, or written by hand) is not complete."""
    for k in (1, 2):
        os.makedirs(tmp_path / f"step_{k:06d}")
    (tmp_path / "step_000001" / "state.json").write_text("{}")
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "step_000001")]
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000001")


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    for k in range(1, 6):
        os.makedirs(tmp_path / f"step_{k:06d}")
        (tmp_path / f"step_{k:06d}" / "state.json").write_text("{}")
    os.makedirs(tmp_path / "final")
    checkpoint.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["final", "step_000004", "step_000005"]
    checkpoint.prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["final", "step_000005"]


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(finished_run, tmp_path, capsys):
    """The checkpoints after the one resumed belong to a continuation this run abandons: left in place, a later
    --resume of the folder (or pruning) would take them for this run's."""
    run = _copy(finished_run, tmp_path)
    (run / "step_000002.old").mkdir()  # a rewrite's leftover, killed before it was deleted: never a checkpoint
    (run / "step_000002.old" / "state.json").write_text("{}")
    train.train(_cfg(run, steps=2, lr=0.05), resume=str(run / "step_000001"))
    assert "set aside 1 checkpoint(s) after step 1 (step_000002)" in capsys.readouterr().out
    assert (run / "abandoned-after-step_000001" / "step_000002" / "state.json").is_file()
    assert checkpoint.latest_checkpoint(str(run)) == str(run / "step_000002")
    assert json.load(open(run / "step_000002" / "config.json"))["lr"] == 0.05  # this continuation's step 2


def test_a_damaged_newest_checkpoint_costs_one_checkpoint(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    opt = run / "step_000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # cut by a power loss
    train.train(_cfg(run, steps=2), resume=str(run))
    out = capsys.readouterr().out
    assert f"{opt} is damaged" in out and "falling back" in out and f"resumed from {run / 'step_000001'}" in out
    assert checkpoint.read_checkpoint(str(run / "step_000002"))["state.json"]["step"] == 2  # rewritten whole


def _flip_a_byte(path):
    """A bit flipped halfway through a file (a bad sector): it still parses, as tensors of other values."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["optimizer.pt", "adapter_model.safetensors"])
def test_a_checkpoint_file_changed_in_place_is_named_as_damaged(finished_run, tmp_path, capsys, name):
    """A file changed inside its tensor data reads without error: the sha256 every checkpoint records of its
    files names it, and the resume falls back to the checkpoint before, as for a cut file."""
    run = _copy(finished_run, tmp_path)
    damaged = run / "step_000002" / name
    _flip_a_byte(damaged)
    train.train(_cfg(run, steps=2), resume=str(run))
    out = capsys.readouterr().out
    assert f"{damaged} is damaged (its sha256 is not the one recorded" in out and "falling back" in out
    assert f"resumed from {run / 'step_000001'}" in out


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_final_adapter_changed_in_place_is_refused(finished_run, tmp_path, name):
    """Evaluating (or starting stage 2 from) an adapter whose weights (or its config: lora_alpha 32 -> 22 is one
    bit) changed after its run wrote them would report another model's numbers under its name."""
    run = _copy(finished_run, tmp_path)
    _flip_a_byte(run / "final" / name)
    with pytest.raises(SystemExit) as e:
        model.load_policy("tiny", adapter=str(run / "final"), trainable=False)
    assert f"{run / 'final' / name} is damaged" in str(e.value)
    model.load_policy("tiny", adapter=str(finished_run / "final"), trainable=False)  # the intact one loads


def test_a_checkpoint_without_recorded_sha256_resumes_and_a_state_that_is_no_object_is_damaged(finished_run,
                                                                                                 tmp_path, capsys):
    """An older version's checkpoint records no sha256: it resumes as it did. A state.json that parses as another
    JSON value is a damaged file, not an AttributeError."""
    run = _copy(finished_run, tmp_path)
    state = run / "step_000002" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "sha256"}))
    _flip_a_byte(run / "step_000002" / "optimizer.pt")  # unnoticed without a recorded sha256, as before
    assert checkpoint.read_checkpoint(str(run / "step_000002"))["state.json"]["step"] == 2
    (run / "step_000002" / "state.json").write_text("[2]")
    with pytest.raises(ValueError, match="state.json is damaged .*not a JSON object"):
        checkpoint.read_checkpoint(str(run / "step_000002"))


def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(finished_run, tmp_path, monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))

    def replace(src, dst):
        if src.endswith(".tmp") and os.path.isdir(src):  # a checkpoint folder being swapped in
            assert {os.path.join(src, n) for n in os.listdir(src)} | {src} <= set(synced)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cfg = _cfg(tmp_path / "run", steps=1)
    train.train(cfg)
    assert str(tmp_path / "run") in synced  # the rename itself
    assert {n for n in os.listdir(tmp_path / "run" / "final")} >= {"adapter_model.safetensors", "state.json"}


# ---------------------------------------------------------------- an evaluation folder belongs to one setting

from test_benchmarks import TINY, _hrbench_rows, hrbench_tsv  # noqa: E402,F401  (fixture and its rows)

import eval as ev  # noqa: E402
import rollout as rollout_module  # noqa: E402


def _write_tsv(path, rows):
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_a_rerun_with_other_settings_is_refused_naming_them(hrbench_tsv, tmp_path):
    out = str(tmp_path / "ev")
    base = ["--bench", "hrbench", "--data", hrbench_tsv, "--out", out, "--limit", "1", *TINY]
    ev.main(base)
    assert json.load(open(os.path.join(out, "run.json")))["settings"]["global_tokens"] == 16
    with pytest.raises(SystemExit, match="global_tokens=16 there, 24 now"):
        ev.main(base + ["--global-tokens", "24"])
    with pytest.raises(SystemExit, match="probe=None there, 'noise' now"):
        ev.main(base + ["--probe", "noise"])
    ev.main(base + ["--limit", "2", "--batch", "4"])  # how much and how fast is no setting: --out is reused
    run = json.load(open(os.path.join(out, "run.json")))
    del run["settings"]["probe"]  # a setting an older version did not write: not given then, as None is now
    json.dump(run, open(os.path.join(out, "run.json"), "w"))
    ev.main(base)
    for changed, says in ((dict(run["settings"], obsolete=5), "obsolete=5 there, None now"),
                          ({k: v for k, v in run["settings"].items() if k != "max_turns"}, "max_turns=None there")):
        json.dump(dict(run, settings=changed), open(os.path.join(out, "run.json"), "w"))
        with pytest.raises(SystemExit, match=says):  # a setting only one side has, with a value, differs
            ev.main(base)
    json.dump(run, open(os.path.join(out, "run.json"), "w"))
    rows = _hrbench_rows()
    rows[0]["question"] = "What colour?"  # the same file name, other contents
    _write_tsv(hrbench_tsv, rows)
    with pytest.raises(SystemExit, match="data='sha256:"):
        ev.main(base)


def test_a_benchmark_folder_edited_at_the_same_size_is_another_data_set(tmp_path):
    """V* is a folder: an answer edited in its JSON without changing the file's size is other data (its results
    must not be resumed into), and so is a new image; an untouched folder keeps its fingerprint."""
    root = tmp_path / "vstar" / "direct_attributes"
    os.makedirs(root)
    question = " " * 5000  # a JSON of a few KB
    (root / "sa_1.json").write_text('{"options": ["red", "blue"], "q": "%s"}' % question)
    (root / "sa_1.jpg").write_bytes(b"x" * 100)
    before = data.fingerprint(str(tmp_path / "vstar"))
    os.rename(tmp_path / "vstar", tmp_path / "moved")  # the same data elsewhere: the same fingerprint
    assert data.fingerprint(str(tmp_path / "moved")) == before
    os.rename(tmp_path / "moved", tmp_path / "vstar")
    (root / "sa_1.json").write_text('{"options": ["blue", "red"], "q": "%s"}' % question)
    edited = data.fingerprint(str(tmp_path / "vstar"))
    assert edited != before
    (root / "sa_2.jpg").write_bytes(b"y")
    assert data.fingerprint(str(tmp_path / "vstar")) != edited


def test_a_benchmark_image_replaced_by_one_of_another_size_is_another_data_set(tmp_path):
    """A file of 1 MB or more (an image) is fingerprinted by its name and size, not its bytes."""
    image = tmp_path / "vstar" / "sa_1.jpg"
    os.makedirs(image.parent)
    image.write_bytes(b"x" * (1 << 20))
    before = data.fingerprint(str(tmp_path / "vstar"))
    image.write_bytes(b"x" * ((1 << 20) + 1))
    assert data.fingerprint(str(tmp_path / "vstar")) != before


def test_a_retrained_adapter_at_the_same_path_is_another_eval_setting(tmp_path):
    """An evaluation names its adapter by its weights: a rerun after retraining must not resume the old results."""
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights, first training")
    args = ev.parse_args(["--adapter", str(adapter)])
    before = ev.run_settings(args, ev.resolve_settings(args), "fp32")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights, retrained")
    after = ev.run_settings(args, ev.resolve_settings(args), "fp32")
    assert before["adapter"].startswith("sha256:") and after["adapter"] != before["adapter"]


def test_only_the_folders_own_results_files_are_read(tmp_path, capsys):
    """A copied earlier run (items-old.jsonl) beside the results is no shard: its items would count as done and
    be scored with this setting's."""
    for name, ids in (("items.jsonl", ["a"]), ("items.shard-1-of-2.jsonl", ["b"]), ("items-old.jsonl", ["c", "d"]),
                      ("items.jsonl.old.jsonl", ["e"])):
        (tmp_path / name).write_text("".join(json.dumps(dict(id=i, correct=1.0)) + "\n" for i in ids))
    items, failed = ev.read_results(str(tmp_path))
    assert sorted(items) == ["a", "b"] and not failed
    assert "items-old.jsonl: not a results file of this folder (items.jsonl, items.shard-I-of-N.jsonl): left out" \
        in capsys.readouterr().out


def test_default_folder_names_tell_runs_apart(tmp_path):
    def name(*argv):
        args = ev.parse_args(["--bench", "hrbench", "--model", "ckpt/qwen25vl7b", *argv])
        return ev.default_name(args, ev.resolve_settings(args))
    for f in ("hr_bench_4k.tsv", "hr_bench_8k.tsv"):
        (tmp_path / f).write_text("x")
    four, eight = name("--data", str(tmp_path / "hr_bench_4k.tsv")), name("--data", str(tmp_path / "hr_bench_8k.tsv"))
    assert four == "hrbench-hr_bench_4k-qwen25vl7b-g1024" and eight != four and "hr_bench_8k" in eight
    full = name("--data", str(tmp_path / "hr_bench_8k.tsv"), "--probe", "noise", "--global-tokens", "16384",
                "--adapter", "runs/stage2/final")
    assert full == "hrbench-hr_bench_8k-qwen25vl7b-g16384-noise-stage2_final"


# ---------------------------------------------------------------- shards and summaries; a cut last line


def test_a_summary_covers_every_shard_at_the_time_it_is_written(hrbench_tsv, tmp_path, monkeypatch):
    out = str(tmp_path / "hr")
    base = ["--bench", "hrbench", "--data", hrbench_tsv, "--out", out, *TINY]
    real = rollout_module.rollout
    calls = []

    def shard_0_finishes_meanwhile(policy, samples, cfg):
        calls.append(samples)
        if len(calls) == 1:  # shard 1 has read what was done; shard 0 now runs to its end beside it
            ev.main(base + ["--shard", "0/2"])
        return real(policy, samples, cfg)

    monkeypatch.setattr(rollout_module, "rollout", shard_0_finishes_meanwhile)
    s = ev.main(base + ["--shard", "1/2"])
    assert (s["num_items"], s["num_total"]) == (3, 3)  # not shard 1's one item labelled as the benchmark
    os.remove(os.path.join(out, "summary.json"))
    os.remove(os.path.join(out, "items.shard-1-of-2.jsonl"))  # as if shard 1 were still running
    [results] = ev.main(["--bench", "hrbench", "--summary", "--out", out])
    assert (results["none"]["num_items"], results["none"]["num_total"]) == (2, 3)
    assert json.load(open(os.path.join(out, "summary.json")))["num_items"] == 2
    assert "partial: 2 of 3 items" in open(os.path.join(out, "table.md")).read()


def test_duplicate_item_ids_are_refused_at_load(tmp_path):
    rows = _hrbench_rows()
    rows[2]["index"] = 1
    with pytest.raises(SystemExit, match="1 item id.* more than once: 1"):
        ev.load_bench(ev.parse_args(["--bench", "hrbench", "--data", _write_tsv(tmp_path / "hr.tsv", rows)]))


def test_a_cut_last_line_is_truncated_and_its_item_redone(hrbench_tsv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hr"
    args = ["--bench", "hrbench", "--data", hrbench_tsv, "--out", str(out), "--limit", "2", *TINY]
    ev.main(args)
    items = out / "items.jsonl"
    whole = items.read_bytes()
    items.write_bytes(whole[:len(whole) - len(whole.splitlines()[-1]) // 2 - 1])  # the kill cut line 2 in half
    real, redone = rollout_module.rollout, []
    monkeypatch.setattr(rollout_module, "rollout", lambda p, s, c: redone.extend(x.id for x in s) or real(p, s, c))
    s = ev.main(args)
    assert "its last line was cut" in capsys.readouterr().out and redone == ["1"]
    lines = items.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["0", "1"] and s["num_items"] == 2


# ---------------------------------------------------------------- audit: resume and evaluation paths no test ran


def test_a_resume_into_another_out_dir_writes_there_and_refuses_one_that_holds_a_run(finished_run, tmp_path):
    """--resume RUN --out_dir NEW continues in NEW; a NEW holding a run is refused (checkpoints would mix)."""
    out_dir, ckpt, _ = checkpoint.plan_run(_cfg(tmp_path / "new"), str(finished_run), "runs/stage1")
    assert (out_dir, ckpt) == (str(tmp_path / "new"), str(finished_run / "step_000002"))
    (tmp_path / "held" / "step_000001").mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"{tmp_path / 'held'} already holds a run"):
        checkpoint.plan_run(_cfg(tmp_path / "held"), str(finished_run), "runs/stage1")


def test_a_resume_of_a_folder_without_a_readable_checkpoint_says_what_to_pass(finished_run, tmp_path, capsys):
    """--resume runs (the parent), or every checkpoint damaged: one line saying what a run folder is."""
    with pytest.raises(SystemExit, match="no complete, readable checkpoint in .*runs/stage1, not runs"):
        checkpoint.plan_run(_cfg(""), str(finished_run.parent), "runs/stage1")
    assert checkpoint.saved_config(str(finished_run.parent)) is None  # main() then takes no settings from it
    run = _copy(finished_run, tmp_path)
    for k in (1, 2):
        (run / f"step_{k:06d}" / "rng.pt").write_bytes(b"cut")
    with pytest.raises(SystemExit, match="no complete, readable checkpoint"):
        checkpoint.plan_run(_cfg(run), str(run), "runs/stage1")
    assert capsys.readouterr().out.count("falling back") == 2


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    """A kill mid-write leaves half a line; plot.py and what_changed read every line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "rew')
    checkpoint.truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_the_held_out_probe_lands_in_the_metrics_and_the_closing_line(tmp_path, capsys):
    """The micro preset's probe_every=5 makes the README's held-out numbers: at step 1 and every N steps."""
    train.train(_cfg(tmp_path / "run", steps=3, probe_every=2, probe_items=2))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert ["crop_dependency" in r for r in rows] == [True, True, False]
    assert rows[0]["crop_dependency"] == rows[0]["heldout_accuracy"] - rows[0]["heldout_noise_accuracy"]
    assert "held-out: step 1 -> 2" in capsys.readouterr().out


def test_the_held_out_probe_on_data_it_cannot_generate_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """make stage1 DATA=x.jsonl keeps the micro preset's probe_every=5: refused before a model loads."""
    path = str(tmp_path / "d" / "train.jsonl")
    data.convert("synthetic:2", path)
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match="--probe_every needs generated data"):
        train.train(_cfg(tmp_path / "run", data=path, infogap="fixed:16", probe_every=1))


def test_stage_2_on_data_without_boxes_says_its_grounding_reward_is_0(finished_run, tmp_path, monkeypatch, capsys):
    path = tmp_path / "d" / "train.jsonl"
    data.convert("synthetic:2", str(path))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "boxes"}) + "\n" for r in rows))

    def stop(*a, **kw):
        raise SystemExit("the model would load here")

    monkeypatch.setattr(train.model, "load_policy", stop)
    with pytest.raises(SystemExit, match="the model would load here"):
        train.train(_cfg(tmp_path / "run", stage=2, data=str(path), init_adapter=str(finished_run / "final")))
    assert "warning: no sample has boxes: stage 2's grounding reward will be 0" in capsys.readouterr().out


def test_a_malformed_shard_is_one_line():
    for bad in ("1", "a/b", "2/2", "-1/2", "1/0"):
        with pytest.raises(SystemExit, match=r"--shard .*: expected i/n with 0 <= i < n"):
            ev._shard(list(range(4)), bad)
    assert ev._shard(list(range(5)), "1/2") == ([1, 3], ".shard-1-of-2")


def test_results_without_a_run_json_are_not_taken_for_this_settings(tmp_path):
    """An older version's items: their settings are unknown, so they are not counted as this setting's."""
    (tmp_path / "items.jsonl").write_text(json.dumps(dict(id="a", correct=1.0)) + "\n")
    with pytest.raises(SystemExit, match="holds results without a run.json"):
        ev.claim_folder(str(tmp_path), dict(bench="synthetic"), {})
    assert not (tmp_path / "run.json").exists()


def test_the_default_synthetic_folder_is_named_by_its_size():
    def name(*argv):
        args = ev.parse_args(["--bench", "synthetic", *argv])
        return ev.default_name(args, ev.resolve_settings(args))
    assert name() == "synthetic-n32-tiny-g1024" and name("--data", "synthetic") == "synthetic-n256-tiny-g1024"


def test_a_summary_without_a_plain_run_says_which_run_to_make(tmp_path):
    """--summary compares each probe with its plain run: none is one line, not an empty table."""
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "run.json").write_text(json.dumps(dict(settings=dict(bench="synthetic", probe="noise"))))
    with pytest.raises(SystemExit, match="no run of synthetic without a probe in .*run eval.py --bench synthetic"):
        ev.probe_summary("synthetic", str(tmp_path))


@pytest.mark.parametrize("name", ["config.json", "rng.pt", "adapter_config.json"])
def test_every_file_a_checkpoint_records_is_checked_not_only_the_tensors(finished_run, tmp_path, name):
    """Its sha256 is sha256sum's; changed, it is damaged before it is parsed; deleted, missing (not an OSError)."""
    import hashlib
    step = _copy(finished_run, tmp_path) / "step_000002"
    sums = json.loads((step / "state.json").read_text())["sha256"]
    assert sums[name] == hashlib.sha256((step / name).read_bytes()).hexdigest()
    _flip_a_byte(step / name)
    with pytest.raises(ValueError, match=f"{name} is damaged \\(its sha256"):
        checkpoint.read_checkpoint(str(step))
    (step / name).unlink()
    with pytest.raises(ValueError, match=f"{name} is missing"):
        checkpoint.read_checkpoint(str(step))


def test_export_refuses_a_final_adapter_changed_in_place(finished_run, tmp_path):
    """An export bakes the adapter into the weights: a changed one is refused, as eval refuses it."""
    run = _copy(finished_run, tmp_path)
    _flip_a_byte(run / "final" / "adapter_model.safetensors")
    with pytest.raises(SystemExit, match="adapter_model.safetensors is damaged"):
        model.export(str(run / "final"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_a_resume_takes_its_settings_from_a_config_as_it_was_written(finished_run, tmp_path):
    """A config.json changed since its checkpoint wrote it is damaged: the resume falls back to the checkpoint
    before, and takes that one's settings, not the changed file's (lr 0.5 would train another run)."""
    run = _copy(finished_run, tmp_path)
    config = run / "step_000002" / "config.json"
    lr = json.loads(config.read_text())["lr"]
    config.write_text(json.dumps(dict(json.loads(config.read_text()), lr=0.5)))
    assert checkpoint.saved_config(str(run))["lr"] == lr
    assert checkpoint.saved_config(str(run / "step_000002"))["lr"] == lr  # named: the one before it too


def test_an_io_error_hashing_a_checkpoint_file_is_damage_not_a_traceback(finished_run, tmp_path, monkeypatch, capsys):
    """A bad sector raises EIO while the file is hashed: the resume falls back, as for a file that does not parse."""
    import errno

    import snapshot

    run, real = _copy(finished_run, tmp_path), snapshot.sha256

    def sha256(path):
        if str(path).endswith(os.path.join("step_000002", "rng.pt")):
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(snapshot, "sha256", sha256)
    _, ckpt, _ = checkpoint.plan_run(_cfg(""), str(run), "runs/stage1")
    assert ckpt == str(run / "step_000001") and "rng.pt is damaged ([Errno 5] Input/output error)" in capsys.readouterr().out
