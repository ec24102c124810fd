"""vLLM's hybrid KV-cache manager (HMA) with KVLinkConnector.

The connector is SupportsHMA, so vLLM keeps HMA on (its default on GPUs). kvlink moves one KV-cache
group of full attention: a hybrid model (sliding-window layers beside full ones) that HMA splits into
two groups is computed locally on decode and offered by no prefill, without errors; with
--disable-hybrid-kv-cache-manager vLLM allocates full-attention blocks for every layer, and kvlink
moves them all.
"""

import logging

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA  # noqa: E402

import vllm_harness as h  # noqa: E402

PROMPT = list(range(10, 87))




def test_single_group_models_run_with_hma_on(engines):
    prefill = engines("kv_producer", salt=1, disable_hma=None, num_layers=4)
    decode = engines("kv_consumer", salt=2, disable_hma=None, num_layers=4)
    assert isinstance(decode.connector, SupportsHMA)
    assert decode.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d" in decode.finished and not prefill.holds("p"))
    h.check_bytes(prefill, "p", decode, "d", PROMPT)


def test_a_hybrid_model_under_hma_is_computed_locally_without_errors(engines, caplog):
    with caplog.at_level(logging.WARNING, logger="kvlink.vllm"):
        prefill = engines("kv_producer", salt=1, disable_hma=None, hybrid=True)
        decode = engines("kv_consumer", salt=2, disable_hma=None, hybrid=True)
    assert len(decode.kv_cache_config.kv_cache_groups) == 2
    assert any("2 groups" in r.getMessage() and "disable-hybrid-kv-cache-manager" in r.getMessage()
               for r in caplog.records)
    # prefill offers nothing and frees the blocks at once
    params = h.prefill(prefill, "p", PROMPT)
    assert params is None and not prefill.holds("p")
    # decode, sent params anyway (a prefill of another configuration): computed locally, never linked
    sent = {"do_remote_prefill": True, "transfer_id": "t", "remote_block_ids": [1, 2, 3, 4, 5],
            "remote_addresses": ["tcp://127.0.0.1:9"], "remote_tp_size": 1, "num_tokens": len(PROMPT)}
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=sent))
    h.until(lambda: "d" in decode.finished, step=decode.step)
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    assert set(range(len(PROMPT))) <= decode.written["d"]
    assert not any(o.failed_recving for o in decode.kv_outputs)


def test_a_hybrid_model_with_hma_off_moves_every_layer(engines):
    prefill = engines("kv_producer", salt=1, disable_hma=True, hybrid=True, num_layers=4)
    decode = engines("kv_consumer", salt=2, disable_hma=True, hybrid=True, num_layers=4)
    groups = decode.kv_cache_config.kv_cache_groups
    assert len(groups) == 1 and groups[0].kv_cache_spec.sliding_window == 32  # vLLM unified the specs
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d" in decode.finished and not prefill.holds("p"))
    assert decode.workers[0].endpoint.layout.num_layers == 4
    assert h.check_bytes(prefill, "p", decode, "d", PROMPT) == len(PROMPT) - 1
