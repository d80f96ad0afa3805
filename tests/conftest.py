import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# CI must be reproducible: there, property tests replay a fixed set of examples; locally they explore.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """A tiny model folder laid out like the Hub download of Qwen2.5-VL-7B-Instruct (tests/hub_fixture.py),
    built offline once per test session. Tests must not change it: copy it with helpers.linked_copy."""
    import hub_fixture

    return hub_fixture.build(str(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny"))
