"""#1: an unpatched SGLang 0.5.23 selects kvlink through its plug-in framework.

The installed kvlink distribution's entry point (group ``sglang.srt.plugins``) is found by
SGLang's own ``load_plugins()``; the CLI parser and ServerArgs accept the name; the scheduler's
and the disaggregation service's own lookups (``TransferBackend(...)``, ``get_kv_class``) build
kvlink's classes, and the bootstrap service SGLang starts for a prefill is kvlink's.
"""

import argparse
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest.importorskip("sglang.srt.disaggregation.decode", reason="SGLang is not installed in this environment")

from sglang.srt import runtime_context as rc  # noqa: E402
from sglang.srt.disaggregation import decode as sg_decode  # noqa: E402
from sglang.srt.disaggregation import prefill as sg_prefill  # noqa: E402
from sglang.srt.disaggregation import utils as du  # noqa: E402
from sglang.srt.managers import disagg_service  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from kvlink.integrations import sglang as backend  # noqa: E402
from kvlink.integrations import sglang_plugin  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    load_plugins()


def test_the_installed_distribution_declares_the_entry_point():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvlink"]
    assert ep.value == "kvlink.integrations.sglang_plugin:register"
    assert ep.dist is not None and ep.dist.name == "kvlink"
    assert ep.load() is sglang_plugin.register


def test_load_plugins_makes_get_kv_class_build_kvlink():
    assert du.TransferBackend("kvlink") is du.TransferBackend.KVLINK
    # every module that imported the Enum or get_kv_class sees the patched ones
    for module in (sg_prefill, sg_decode, disagg_service):
        assert module.TransferBackend is du.TransferBackend
        assert module.get_kv_class is du.get_kv_class
    expected = {du.KVClassType.MANAGER: backend.KVLinkKVManager, du.KVClassType.SENDER: backend.KVLinkKVSender,
                du.KVClassType.RECEIVER: backend.KVLinkKVReceiver,
                du.KVClassType.BOOTSTRAP_SERVER: backend.KVLinkKVBootstrapServer}
    for class_type, cls in expected.items():
        assert du.get_kv_class(du.TransferBackend.KVLINK, class_type) is cls
    from sglang.srt.disaggregation.base.conn import KVArgs

    assert du.get_kv_class(du.TransferBackend.KVLINK, du.KVClassType.KVARGS) is KVArgs
    # SGLang's own backends still resolve
    assert du.get_kv_class(du.TransferBackend.FAKE, du.KVClassType.MANAGER).__name__ == "FakeKVManager"
    assert du.get_kv_class(du.TransferBackend("fake"), du.KVClassType.SENDER).__name__ == "FakeKVSender"


def test_the_cli_and_server_args_accept_kvlink():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    for mode in ("prefill", "decode"):
        args = parser.parse_args(["--model-path", "dummy", "--disaggregation-mode", mode,
                                  "--disaggregation-transfer-backend", "kvlink"])
        server_args = ServerArgs.from_cli_args(args)
        assert server_args.disaggregation_transfer_backend == "kvlink"
        assert server_args.disaggregation_mode == mode
    with pytest.raises(SystemExit):  # the parser still refuses unknown names
        parser.parse_args(["--model-path", "dummy", "--disaggregation-transfer-backend", "kvlink-typo"])


def test_sglang_starts_kvlinks_bootstrap_server_for_a_prefill():
    sa = ServerArgs(model_path="dummy", device="cpu", disaggregation_mode="prefill",
                    disaggregation_transfer_backend="kvlink", disaggregation_bootstrap_port=_free_port(),
                    host="127.0.0.1")
    with rc.use_context(rc.create_context(sa, role="test")):
        # the scheduler's own lookup (managers/scheduler.py) and the service that starts the server
        assert du.TransferBackend(rc.get_disagg().disaggregation_transfer_backend) is du.TransferBackend.KVLINK
        server = disagg_service.start_disagg_service()
    try:
        assert isinstance(server, backend.KVLinkKVBootstrapServer)
        assert backend._http("GET", f"http://127.0.0.1:{server.port}/health") == {"ok": True}
        assert not disagg_service.rust_server_serves_kv_bootstrap("kvlink")
    finally:
        server.close()


def test_register_is_idempotent():
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES

    hooks_before = {t: len(h) for t, h in HookRegistry._hooks.items()}
    wrapped = du.get_kv_class
    for _ in range(3):
        assert sglang_plugin.register() is True
    HookRegistry.apply_hooks()
    assert DISAGG_TRANSFER_BACKEND_CHOICES.count("kvlink") == 1
    assert {t: len(h) for t, h in HookRegistry._hooks.items()} == hooks_before
    assert du.get_kv_class is wrapped and list(du.TransferBackend).count(du.TransferBackend.KVLINK) == 1


def test_load_plugins_in_a_fresh_process_and_without_sglang():
    """The entry point as a new SGLang process sees it; and the plug-in is a no-op without SGLang."""
    fresh = subprocess.run([sys.executable, "-c", (
        "from sglang.srt.plugins import load_plugins\n"
        "import sglang.srt.disaggregation.utils as du\n"
        "load_plugins()\n"
        "print(du.get_kv_class(du.TransferBackend('kvlink'), du.KVClassType.MANAGER).__name__)\n")],
        capture_output=True, text=True, timeout=90)
    assert fresh.stdout.strip().splitlines()[-1] == "KVLinkKVManager", fresh.stderr[-2000:]
    absent = subprocess.run([sys.executable, "-c", (
        "import sys, logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "sys.modules['sglang'] = None\n"
        "from kvlink.integrations import sglang_plugin\n"
        "print(sglang_plugin.register(), sglang_plugin.register())\n")],
        capture_output=True, text=True, timeout=90)
    assert absent.stdout.strip() == "False False", absent.stderr[-2000:]
    assert "SGLang plug-in does nothing" in absent.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
