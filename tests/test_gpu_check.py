"""gpu_check.py on a CPU machine: it refuses in one line, and its report keeps every table a benchmark printed."""
import sys

import pytest
import torch

import gpu_check


def test_tables_keep_each_caption_and_every_row():
    text = "noise\ncrop: 8 crops\n| a | b |\n|---|---|\n| 1 | 2 |\nbetween\nlogprobs: N\n| x |\n|---|\n| 3 |\n"
    assert gpu_check.tables(text) == ["crop: 8 crops\n| a | b |\n|---|---|\n| 1 | 2 |", "logprobs: N\n| x |\n|---|\n| 3 |"]


def test_report_names_what_is_missing_and_what_failed():
    r = dict(device="H100", memory_gb=79.2, commit="abc", date="d", cuda="13.0", seconds=400,
             versions=dict(torch="2.11.0", bitsandbytes=None), notes=["**bitsandbytes is not installed**"],
             tests=dict(ok=True, summary="40 passed"),
             benchmarks=dict(crop=dict(ok=True, seconds=20, tables=["crop: x\n| a |\n|---|\n| 1 |"])),
             training=dict(ok=False, seconds=5, estimate_gb=dict(peak=10.6), steps=[], measured_peak_gb=None),
             log=[dict(name="train 2 steps", ok=False, output="Traceback: boom")])
    md = gpu_check.markdown(r)
    assert "bitsandbytes missing" in md and "**bitsandbytes is not installed**" in md
    assert "| 1 |" in md and "## FAILED: train 2 steps" in md and "boom" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main()
