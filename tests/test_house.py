"""The house rules that keep the code easy to change: imports point down (shared/DESIGN.md), Config is the one
source of the rollout's, the reward's and the evaluation's settings, and the `kernels` name clashes with nothing."""
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys

import eval as evaluation
import rewards
import train
from rollout import RolloutConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DESIGN.md's arrows: a file imports only files of a lower level, and the files named here only what is listed
LEVEL = dict(kernels=0, rewards=0, plot=0, snapshot=0, sources=0, trackers=0, dist=0, decode=0, crop=1, model=1,
             data=2, rollout=2, checkpoint=2, infogap=3, benchmarks=3, report=3, logbook=3, warmstart=3, train=4,
             eval=5, bench=5, gpu_check=6)
ONLY = dict(kernels=set(), rewards=set(), plot=set(), snapshot=set(), sources=set(), trackers=set(), dist=set(),
            decode=set(), data={"crop", "sources"})


def _project_imports(path):
    """Every project module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LEVEL)


def test_imports_point_down():
    files = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    assert set(files) <= set(LEVEL), f"a new top-level file needs its place in LEVEL: {set(files) - set(LEVEL)}"
    kernel_files = [os.path.join(ROOT, "kernels", f) for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py")]
    bad = []
    for name, path in [*files.items(), *(("kernels", p) for p in kernel_files)]:
        allowed = {m for m in LEVEL if LEVEL[m] < LEVEL[name]}
        allowed &= ONLY.get(name, allowed)
        bad += [f"{os.path.relpath(path, ROOT)} imports {m}" for m in _project_imports(path) - allowed - {name}]
    assert not bad, "imports that point up (shared/DESIGN.md): " + "; ".join(bad)


def test_an_upward_import_is_caught(tmp_path):
    path = tmp_path / "data.py"
    path.write_text("import crop\n\ndef f():\n    from model import load_policy\n")
    assert _project_imports(str(path)) == {"crop", "model"}


# ---------------------------------------------------------------- one configuration

def test_rollout_and_reward_settings_are_built_from_config():
    cfg = train.Config()
    for f in dataclasses.fields(RolloutConfig):
        # the same name and default in both, so the copy cannot drift; group_size is 1 outside training
        if f.name not in train.ROLLOUT_ONLY and f.name != "group_size":
            assert getattr(train.Config, f.name) == f.default, f.name
    for f in dataclasses.fields(rewards.RewardConfig):
        if f.name != "w_grounding":  # 0 outside stage 2, by the builder
            assert getattr(train.Config, f.name) == f.default, f.name
    # every shared field travels: give each a value of its own
    changed = {f.name: (getattr(cfg, f.name) + 3 if isinstance(getattr(cfg, f.name), (int, float))
                        and not isinstance(getattr(cfg, f.name), bool) else getattr(cfg, f.name))
               for f in dataclasses.fields(train.Config)}
    cfg = dataclasses.replace(cfg, **{**changed, "stage": 2, "infogap": "off"})
    r = train.rollout_config(cfg, greedy=True)
    assert all(getattr(r, k) == getattr(cfg, k) for k in (f.name for f in dataclasses.fields(RolloutConfig))
               if k not in train.ROLLOUT_ONLY)
    assert r.greedy and r.crop_from_shown
    w = train.reward_config(cfg)
    assert all(getattr(w, f.name) == getattr(cfg, f.name) for f in dataclasses.fields(rewards.RewardConfig))
    assert train.reward_config(dataclasses.replace(cfg, stage=1)).w_grounding == 0.0


def test_make_eval_uses_the_micro_runs_own_settings():
    """`make eval` evaluates every model at the settings the micro runs train with (data.MICRO_EPISODE and the
    gap level): the Makefile spells them out, so a change on one side must be made on the other."""
    import data

    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("EVAL_SETTINGS ?="))
    words = line.split("?=", 1)[1].split()
    given = {k.lstrip("-").replace("-", "_"): v for k, v in zip(words[::2], words[1::2])}
    expected = {k: str(v) for k, v in {**data.MICRO_EPISODE, "global_tokens": data.MICRO_LEVEL, "model": "micro"}.items()}
    assert given == expected


def test_make_eval_stops_where_its_micro_settings_would_evaluate_another_models_runs():
    """`make stage1 MODEL=...` passes through; `make eval MODEL=...` would have loaded that run's adapter onto the
    micro model (EVAL_SETTINGS names it): it stops and says so, unless EVAL_SETTINGS is given too."""
    import subprocess

    def make(*args):  # -n: nothing runs; the guard is expanded all the same
        return subprocess.run(["make", "-n", "-o", ".venv/.done", *args], cwd=ROOT, capture_output=True, text=True)

    assert make("eval").returncode == 0
    assert make("eval", "MODEL=micro", "DATA=micro:256").returncode == 0  # the micro runs' own
    assert make("eval", "DATA=micro", "PRESET=micro").returncode == 0
    for given in ("MODEL=tiny", "DATA=synthetic:64", "PRESET=tiny", "DATA=micro:256,extra.jsonl"):
        for target in ("eval", "experiment"):
            out = make(target, given)
            assert out.returncode != 0 and "EVAL_SETTINGS and EVAL_DATA are the micro experiment's" in out.stderr
    assert make("eval", "MODEL=tiny", "EVAL_SETTINGS=--model tiny").returncode == 0


def test_eval_takes_the_adapters_run_settings_unless_told(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(model="tiny", global_tokens=48, max_turns=2)))
    cfg = evaluation.resolve_settings(evaluation.parse_args(["--adapter", str(tmp_path), "--max-turns", "7"]))
    assert (cfg.global_tokens, cfg.max_turns, cfg.crop_tokens) == (48, 7, train.Config.crop_tokens)
    out = capsys.readouterr().out
    assert f"global_tokens=48 ({tmp_path / 'config.json'})" in out and "max_turns=7 (--max-turns)" in out
    assert f"crop_tokens={train.Config.crop_tokens} (default)" in out
    # a checkpoint's episode limits are evaluation's own, for a trained model as for the base (a sweep compares them)
    (tmp_path / "config.json").write_text(json.dumps(dict(model="ckpt/qwen", max_turns=2, max_response_tokens=300)))
    cfg = evaluation.resolve_settings(evaluation.parse_args(["--adapter", str(tmp_path)]))
    assert (cfg.max_turns, cfg.max_response_tokens, cfg.model) == (11, 0, "ckpt/qwen")
    capsys.readouterr()
    cfg = evaluation.resolve_settings(evaluation.parse_args(["--model", "ckpt/qwen"]))  # no adapter: Config's...
    assert cfg.global_tokens == train.Config.global_tokens and cfg.crop_tokens == train.Config.crop_tokens
    # ... but the episode's limits of DeepEyes' evaluation: a 16,384-token crop is never cut off by training's
    # 2,048-token response budget, and a model may make up to 11 calls
    assert (cfg.max_response_tokens, cfg.max_turns) == (0, 11)
    assert "max_response_tokens=0 (evaluation's default)" in capsys.readouterr().out
    # DeepEyes' eval/eval_vstar.py answers every one of those calls with a crop and lets each write 10,240 tokens:
    # no crop limit of its own (the 11th call ends the episode either way), no cut turn at training's 512
    assert (cfg.max_crops, cfg.max_turn_tokens) == (10, 10240)
    # the base and an adapter see the same images: DeepEyes' 16,384-token crops and the paper's 1,024-token global
    # image, whatever budgets the adapter was trained at (the 24gb preset's 1,024-token crops, 48gb's 4,096 global)
    (tmp_path / "config.json").write_text(json.dumps(dict(model="ckpt/qwen", global_tokens=4096, crop_tokens=1024)))
    cfg = evaluation.resolve_settings(evaluation.parse_args(["--adapter", str(tmp_path)]))
    assert (cfg.global_tokens, cfg.crop_tokens) == (1024, 16384)
    # a built-in model keeps its run's limits (the tiny model's random weights would write 10,240 tokens a turn)
    (tmp_path / "config.json").write_text(json.dumps(dict(model="tiny", max_turns=2, max_response_tokens=300)))
    cfg = evaluation.resolve_settings(evaluation.parse_args(["--adapter", str(tmp_path)]))
    assert (cfg.max_turns, cfg.max_response_tokens, cfg.max_turn_tokens) == (2, 300, train.Config.max_turn_tokens)


# ---------------------------------------------------------------- the `kernels` name

FAKE_HUB = '''
__version__ = "0.17.2"
def get_kernel(repo_id, version=None):
    raise RuntimeError("offline")
'''

CHECK = r'''
import torch, bitsandbytes as bnb
import kernels, model
from kernels import get_kernel  # what bitsandbytes' CPU backend imports
assert get_kernel.__module__.endswith("_installed"), get_kernel.__module__
assert callable(kernels.crop_resample) and callable(kernels.selective_logprobs)  # ours are untouched
policy = model.load_policy("tiny", lora_r=4, lora_alpha=8)
layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
layer.load_state_dict({"weight": torch.randn(32, 64)})
layer = layer.to("cpu")  # quantizes
x = torch.randn(3, 64)
assert layer(x).shape == (3, 32)
print("ok")
'''


def test_the_kernel_hub_package_installed_beside_ours(tmp_path):
    """Hugging Face's `kernels` package installed: our folder shadows its name when run from the repository,
    so its names must still reach bitsandbytes and transformers, and model loading and NF4 must work."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(FAKE_HUB)
    (site / "kernels-0.17.2.dist-info").mkdir()
    (site / "kernels-0.17.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert "cannot import name" not in out.stderr, out.stderr[-2000:]
    # On a CPU with AVX512-BF16, bitsandbytes asks the hub for a kernel at import: the fake answers "offline",
    # and bitsandbytes says so and goes on. That warning proves `get_kernel` was reached; any other reason
    # (a name our folder failed to pass on) is a failure.
    failures = [line for line in out.stderr.splitlines() if "Failed to load" in line]
    assert all(re.search(r"Failed to load .*: offline\b", line) for line in failures), failures
