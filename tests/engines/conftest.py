"""Tests inside the real serving engines (vLLM 0.33.0, SGLang 0.5.23).

They need the engines installed, which pin their own torch: `.ci/run` builds a second
environment for them (`.ci/engines-requirements.txt`) and runs `python -m pytest tests/engines`
there. In the project's own environment they skip.
"""

import sys
from pathlib import Path

# the shared test helpers (peer_process, engine_access, ...) live one directory up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
