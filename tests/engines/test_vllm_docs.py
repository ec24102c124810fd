"""The vLLM commands of docs/engines.md and the README are ones vLLM accepts, and the configuration
they give moves a request: each ``vllm serve`` line goes through vLLM's own ``vllm serve`` argument
parser and ``EngineArgs``; the prefill/decode pair then runs one request through real engines built
with exactly the documented ``kv_transfer_config`` (addresses moved to loopback, the host transport:
a CPU machine has no model weights or GPUs)."""

import json
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.platforms import current_platform  # noqa: E402

import vllm_harness as h  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT = list(range(20, 70))


def serve_commands(markdown: str) -> list[str]:
    """Every ``vllm serve`` command in the markdown's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("vllm serve ")]
    return commands


def parse(command: str):
    """vLLM's own parsing of a ``vllm serve`` command line: (parsed args, EngineArgs)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if not current_platform.device_type:
        current_platform.device_type = "cpu"  # no GPU here: vLLM cannot infer a device type for its defaults
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(shlex.split(command)[2:])
    return args, EngineArgs.from_cli_args(args)


def documented(path: Path) -> dict:
    """The documented prefill and decode commands of ``path``, by role."""
    commands = serve_commands(path.read_text())
    by_role = {}
    for command in commands:
        args, engine_args = parse(command)
        config = engine_args.kv_transfer_config
        assert config.kv_connector == "KVLinkConnector" and config.kv_connector_module_path == "kvlink.integrations.vllm"
        by_role[config.kv_role] = (engine_args, config)
    assert set(by_role) == {"kv_producer", "kv_consumer"}, f"{path.name}: {commands}"
    return by_role


def test_docs_and_readme_give_the_same_vllm_commands():
    assert serve_commands((ROOT / "README.md").read_text()) == serve_commands((ROOT / "docs" / "engines.md").read_text())


@pytest.mark.parametrize("doc", ["docs/engines.md", "README.md"])
def test_the_documented_configuration_moves_a_request(doc):
    by_role = documented(ROOT / doc)
    engines = []
    try:
        sides = {}
        for role, (engine_args, config) in by_role.items():
            extra = dict(config.kv_connector_extra_config)
            json.dumps(extra)  # plain JSON, as vLLM hands it over
            if role == "kv_producer":
                extra.update(host="127.0.0.1", advertise_host="127.0.0.1", port=0)  # loopback, any free port
            sides[role] = h.VllmEngine(role, tp=engine_args.tensor_parallel_size, extra=extra, num_kv_heads=2)
            engines.append(sides[role])
        prefill, decode = sides["kv_producer"], sides["kv_consumer"]
        params = h.prefill(prefill, "p-doc", PROMPT)
        assert params["remote_tp_size"] == by_role["kv_producer"][0].tensor_parallel_size
        decode.add(h.make_request("d-doc", PROMPT, max_tokens=2, kv_transfer_params=params,
                                  block_size=decode.block_size), snapshot_tokens=len(PROMPT))
        h.run(prefill, decode, until_done=lambda: "d-doc" in decode.finished and not prefill.holds("p-doc"),
              what="the documented pair moving a request")
        assert h.check_bytes(prefill, "p-doc", decode, "d-doc", PROMPT) > 0
    finally:
        for engine in engines:
            engine.close()
