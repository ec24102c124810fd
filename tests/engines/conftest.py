"""Tests inside the real serving engines (vLLM 0.33.0, SGLang 0.5.23).

They need the engines installed, which pin their own torch: `.ci/run` builds a second
environment for them (`.ci/engines-requirements.txt`) and runs `python -m pytest tests/engines`
there. In the project's own environment they skip.
"""

import sys
from pathlib import Path

# the shared test helpers (peer_process, engine_access, ...) live one directory up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import pytest  # noqa: E402


@pytest.fixture
def engines():
    """``make(*args, **kwargs)`` builds a real vLLM engine (vllm_harness.VllmEngine); all are
    closed when the test ends."""
    import vllm_harness

    made = []

    def make(*args, **kwargs):
        engine = vllm_harness.VllmEngine(*args, **kwargs)
        made.append(engine)
        return engine
    yield make
    for engine in made:
        engine.close()
