"""Experiment trackers: each step's metrics (the same as metrics.jsonl) and the config, sent to TensorBoard,
Weights & Biases or trackio.

    python train.py --stage 1 --report_to=tensorboard   # events in runs/stage1/tensorboard/
    python train.py --stage 1 --report_to=wandb         # project: $WANDB_PROJECT, default "lfpc"
    python train.py --stage 1 --report_to=trackio       # project: $TRACKIO_PROJECT, default "lfpc"

The packages are optional and stay out of requirements.txt: choosing one that is not installed stops the run
before any work, with the pip command that installs it.
"""
import importlib
import importlib.util
import json
import os
import secrets

CHOICES = ("none", "tensorboard", "wandb", "trackio")


def check(report_to):
    """Refuse an unknown tracker, or one whose package is missing (at start, not mid-run)."""
    if report_to not in CHOICES:
        raise SystemExit(f"error: --report_to={report_to!r}: expected one of {', '.join(CHOICES)}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise SystemExit(f"error: --report_to={report_to} needs the {report_to} package, which is not installed: "
                         f"pip install {report_to}")


def start(report_to, out_dir, config, first_step=0):
    """A tracker with log(metrics, step) and close(). `config` (a dict) is recorded with the run. first_step: the
    checkpoint's step a resumed run goes on from (0: a fresh run). The steps after it are run again, and
    metrics.jsonl drops the killed run's rows for them: TensorBoard drops its events for them too, and wandb and
    trackio go on with the same run (its name kept in the run folder), so each shows what metrics.jsonl holds."""
    check(report_to)
    if report_to == "tensorboard":
        return TensorBoard(os.path.join(out_dir, "tensorboard"), config, purge_step=first_step + 1 if first_step else None)
    if report_to in ("wandb", "trackio"):
        return WandbLike(report_to, _run_name(out_dir, report_to), config, resumed=first_step > 0)
    return NoTracker()


def _run_name(out_dir, report_to):
    """The run's name at the tracker: the folder's name and a random suffix (runs/a/stage1 and runs/b/stage1 are
    two runs), made once and kept in the folder, so a resumed run finds its own."""
    path = os.path.join(out_dir, f"{report_to}_run")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    name = f"{os.path.basename(os.path.normpath(out_dir))}-{secrets.token_hex(4)}"
    with open(path, "w") as f:
        f.write(name + "\n")
    return name


def scalars(metrics):
    """The numeric metrics of a step (the step number itself is the x axis, not a metric)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class NoTracker:
    def log(self, metrics, step):
        pass

    def close(self):
        pass


class TensorBoard:
    def __init__(self, log_dir, config, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, metrics, step):
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self):
        self.writer.close()


class WandbLike:
    """wandb and trackio share the API: init(project, name, config), log(metrics, step), finish()."""

    def __init__(self, package, name, config, resumed=False):
        self.module = importlib.import_module(package)
        project = os.environ.get(f"{package.upper()}_PROJECT", "lfpc")
        # wandb knows a run by its id; trackio by its name. A resumed run may log a step again (the killed run's)
        ids = dict(id=name, resume="allow") if package == "wandb" else dict(resume="allow" if resumed else "never")
        self.module.init(project=project, name=name, config=config, **ids)

    def log(self, metrics, step):
        self.module.log(scalars(metrics), step=step)

    def close(self):
        self.module.finish()
