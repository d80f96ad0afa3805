"""The Triton kernels compiled for GPUs (Triton's ahead-of-time path and its ptxas, on this CPU): what the
interpreter cannot show. kernels/aot.py says why and how; speed is left to `make gpu-check`."""
import json
import os
import subprocess
import sys

import pytest

from kernels.aot import ARCHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = {arch: ARCHS[arch][1] for arch in (90, 89)}  # bytes per block: H100; L4 / RTX 4090


@pytest.fixture(scope="module")
def compiled():
    # a process of its own, without TRITON_INTERPRET (under it, triton.jit gives functions that do not compile)
    # and one per target, side by side (a cold compile of the lot takes 10 s per target on one core)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-m", "kernels.aot", "--json", "--arch", str(arch)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in SHARED_LIMIT}
    found = {}
    for arch, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        found[arch] = json.loads(out)[str(arch)]
    return found


def test_every_kernel_compiles_for_hopper_without_spills_within_its_shared_memory(compiled):
    rows = compiled[90]
    assert {label.split(" ")[0] for label, *_ in rows} == {"lse", "softmax", "crop"}
    for label, _, _, f in rows:
        assert f["spill_bytes"] == 0, label
        assert f["shared"] <= SHARED_LIMIT[90], label


def test_the_logprob_tiles_run_on_tensor_cores_with_pipelined_loads(compiled):
    lse = [(label, f) for label, _, _, f in compiled[90] if label.startswith("lse")]
    assert len(lse) == 6  # every autotune config
    for label, f in lse:
        assert f["wgmma"] and f["pipelined"], label  # Hopper's warp-group MMA, async copies into shared memory
    for label, f in ((label, f) for label, _, _, f in compiled[89] if label.startswith("lse")):
        assert f["mma"] and not f["wgmma"], label


def test_the_dot_crop_pass_runs_on_tensor_cores(compiled):
    dot = {arch: next(f for label, _, _, f in compiled[arch] if label == "crop h-pass (dot)") for arch in (90, 89)}
    assert dot[90]["wgmma"] and dot[89]["mma"]


def test_a_24gb_card_keeps_configs_the_autotuner_can_run(compiled):
    # the autotuner drops a config that asks for more shared memory than the card has (OutOfResources);
    # on an L4 or RTX 4090 some of the Hopper-sized ones do, and enough must remain
    fits = [label for label, _, _, f in compiled[89] if label.startswith("lse") and f["shared"] <= SHARED_LIMIT[89]]
    assert len(fits) >= 3, fits
    for label, _, _, f in compiled[89]:
        assert f["spill_bytes"] == 0, label
