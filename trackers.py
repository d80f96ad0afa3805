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

CHOICES = ("none", "tensorboard", "wandb", "trackio")


def check(report_to):
    """Refuse an unknown tracker, or one whose package is missing (at start, not mid-run)."""
    if report_to not in CHOICES:
        raise SystemExit(f"error: --report_to={report_to!r}: expected one of {', '.join(CHOICES)}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise SystemExit(f"error: --report_to={report_to} needs the {report_to} package, which is not installed: "
                         f"pip install {report_to}")


def start(report_to, out_dir, config):
    """A tracker with log(metrics, step) and close(). `config` (a dict) is recorded with the run."""
    check(report_to)
    if report_to == "tensorboard":
        return TensorBoard(os.path.join(out_dir, "tensorboard"), config)
    if report_to in ("wandb", "trackio"):
        return WandbLike(report_to, os.path.basename(os.path.normpath(out_dir)), config)
    return NoTracker()


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
    def __init__(self, log_dir, config):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=log_dir)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, metrics, step):
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self):
        self.writer.close()


class WandbLike:
    """wandb and trackio share the API: init(project, name, config), log(metrics, step), finish()."""

    def __init__(self, package, name, config):
        self.module = importlib.import_module(package)
        project = os.environ.get(f"{package.upper()}_PROJECT", "lfpc")
        self.module.init(project=project, name=name, config=config)

    def log(self, metrics, step):
        self.module.log(scalars(metrics), step=step)

    def close(self):
        self.module.finish()
