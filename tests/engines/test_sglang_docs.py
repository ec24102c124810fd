"""The SGLang commands of docs/engines.md are the ones SGLang accepts: each ``python -m
sglang.launch_server`` line goes through ``load_plugins()`` and SGLang's own
``prepare_server_args``, exactly as ``python -m sglang.launch_server`` runs them (a server is
not started: that needs a model and GPUs)."""

from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.server_args", reason="SGLang is not installed in this environment")

import sglang_commands  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "engines.md"


def _check_commands(text: str) -> None:
    load_plugins()
    modes = []
    for command in sglang_commands.commands(text):
        argv = sglang_commands.launch_server_argv(command)
        if argv is None:
            continue
        server_args = prepare_server_args(argv)
        assert server_args.disaggregation_transfer_backend == "kvlink", command
        modes.append(server_args.disaggregation_mode)
    assert sorted(modes) == ["decode", "prefill"], modes


def test_the_documented_commands_parse_with_sglangs_own_parser():
    _check_commands(sglang_commands.SECTION)


def test_docs_engines_md_carries_these_commands():
    if not DOC.exists():
        pytest.skip(f"{DOC} is not in this checkout")
    section = sglang_commands.section_of(DOC.read_text())
    assert section is not None, f"{DOC} has no SGLang section"
    _check_commands(section)
    assert sglang_commands.commands(section) == sglang_commands.commands(sglang_commands.SECTION)


def test_the_router_command_is_sglang_routers():
    router = pytest.importorskip("sglang_router.launch_router", reason="sglang_router is not installed")
    (command,) = [c for c in sglang_commands.commands(sglang_commands.SECTION) if "sglang_router" in c]
    import shlex

    args = router.parse_router_args(shlex.split(command)[3:])
    assert args.pd_disaggregation


def test_the_readme_carries_the_same_commands():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    section = sglang_commands.section_of(readme.read_text())
    assert section is not None, "README.md has no SGLang section"
    _check_commands(section)
    assert sglang_commands.commands(section) == sglang_commands.commands(sglang_commands.SECTION)
