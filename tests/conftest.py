import os
import sys

import pytest
import torch

# Triton's interpreter runs the kernels on CPU tensors; on a CUDA machine the kernels run compiled, on the GPU
# (set before any kernel module imports triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# CI must be reproducible: there, property tests replay a fixed set of examples; locally they explore.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# where the Triton kernels' tests run: the GPU when there is one, else the interpreter on the CPU
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """A tiny model folder laid out like the Hub download of Qwen2.5-VL-7B-Instruct (tests/hub_fixture.py),
    built offline once per test session. Tests must not change it: copy it with helpers.linked_copy."""
    import hub_fixture

    return hub_fixture.build(str(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny"))
