"""KVLinkConnector against vLLM 0.33's connector interface: base classes, signatures, the hooks vLLM calls."""

import inspect

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA  # noqa: E402

import vllm_harness as h  # noqa: E402

# every hook vLLM 0.33 calls that kvlink implements (the engine's call sites: /work/engines/NOTES.md 2.3)
SCHEDULER_HOOKS = ["on_new_request", "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                   "update_connector_output", "request_finished", "request_finished_all_groups",
                   "has_pending_push_work", "get_loaded_kv_cache_group_ids", "set_xfer_handshake_metadata"]
WORKER_HOOKS = ["register_kv_caches", "get_handshake_metadata", "start_load_kv", "wait_for_layer_load",
                "save_kv_layer", "wait_for_save", "get_transfer_results", "get_finished",
                "get_block_ids_with_load_errors", "build_connector_worker_meta", "shutdown"]
CLASS_HOOKS = ["get_required_kvcache_layout", "requires_piecewise_for_cudagraph"]


def connector_class():
    return getattr(__import__(h.CONNECTOR_MODULE, fromlist=["KVLinkConnector"]), "KVLinkConnector")


def test_the_connector_implements_vllms_real_base_classes():
    cls = connector_class()
    assert issubclass(cls, KVConnectorBase_V1) and issubclass(cls, SupportsHMA)
    assert not getattr(cls, "__abstractmethods__", set())


@pytest.mark.parametrize("name", SCHEDULER_HOOKS + WORKER_HOOKS + CLASS_HOOKS)
def test_each_hook_is_kvlinks_own_with_vllms_signature(name):
    cls = connector_class()
    assert name in vars(cls), f"{name} is inherited, not implemented"
    theirs = getattr(KVConnectorBase_V1, name, None) or getattr(SupportsHMA, name)
    ours = inspect.signature(getattr(cls, name))
    assert list(ours.parameters)[:len(inspect.signature(theirs).parameters)] == list(
        inspect.signature(theirs).parameters), name


def test_the_installed_vllm_is_the_pinned_one():
    """These tests are written against one vLLM: the version CI pins (.ci/engines-requirements.txt)."""
    import pathlib

    import vllm

    pins = pathlib.Path(__file__).resolve().parents[2] / ".ci" / "engines-requirements.txt"
    if not pins.exists():
        pytest.skip("no .ci/engines-requirements.txt in this checkout")
    pinned = next(line.split("==")[1].strip() for line in pins.read_text().splitlines() if line.startswith("vllm=="))
    assert vllm.__version__ == pinned == "0.33.0"
