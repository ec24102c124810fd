"""KVLinkConnector inside real vLLM 0.33 engines: prefill -> decode lifecycles, byte-exact.

Two engines (vllm_harness: real VllmConfig, Scheduler/AsyncScheduler, KVCacheConfig from vLLM's
planner, caches from allocate_kv_cache, worker calls through vLLM's model-runner mixin) linked by
kvlink's host transport. Every request reaches its end in vLLM's own state machine; decode's cache
must hold prefill's bytes for every token it loaded and its own for those it computed; prefill's
blocks are freed once decode confirms.
"""

import time

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import kvlink  # noqa: E402

import vllm_harness as h  # noqa: E402

PROMPT = list(range(10, 87))  # 77 tokens: 4 full blocks and a partial one




def transfer(prefill, decode, prompt=PROMPT, decode_prompt=None, max_tokens=3, rid="r0", local_prefix=0):
    """One request through both engines; returns (params, tokens decode loaded)."""
    free_before = prefill.free_blocks()
    params = h.prefill(prefill, f"p-{rid}", prompt)
    assert prefill.holds(f"p-{rid}"), "prefill must hold the blocks for decode"
    decode_prompt = decode_prompt or prompt
    decode.add(h.make_request(f"d-{rid}", decode_prompt, max_tokens=max_tokens, kv_transfer_params=params,
                              block_size=decode.block_size), snapshot_tokens=len(decode_prompt))
    h.run(prefill, decode, until_done=lambda: f"d-{rid}" in decode.finished and not prefill.holds(f"p-{rid}"),
          what="decode finishing and prefill freeing its blocks")
    assert decode.finished[f"d-{rid}"].finish_reason.name == "LENGTH"
    assert len([t for o in decode.outputs[f"d-{rid}"] for t in o.new_token_ids]) == max_tokens
    assert prefill.free_blocks() == free_before
    loaded = h.check_bytes(prefill, f"p-{rid}", decode, f"d-{rid}", decode_prompt, num_tokens=len(prompt),
                           local_prefix=local_prefix)
    assert not any(o.failed_recving for o in decode.kv_outputs)
    return params, loaded


# twin of tests/test_vllm_connector.py::test_prefill_to_decode_through_the_documented_call_sequence
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["Scheduler", "AsyncScheduler"])
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1), (1, 2)], ids=["1-1", "2-1", "1-2"])
def test_prefill_to_decode(engines, prefill_tp, decode_tp, async_scheduling):
    prefill = engines("kv_producer", tp=prefill_tp, async_scheduling=async_scheduling, salt=1,
                      extra={"decode_tp_size": decode_tp})
    decode = engines("kv_consumer", tp=decode_tp, async_scheduling=async_scheduling, salt=2)
    free_before = decode.free_blocks()
    params, loaded = transfer(prefill, decode)
    assert loaded == len(PROMPT) - 1  # vLLM recomputes the last prompt token to sample the next one
    assert params["num_tokens"] == len(PROMPT) and len(params["remote_addresses"]) == prefill_tp
    assert params["remote_num_kv_heads"] == 2 and params["remote_decode_tp_size"] == decode_tp
    assert decode.free_blocks() == free_before and not decode.holds("d-r0")


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["Scheduler", "AsyncScheduler"])
def test_chunked_prefill_on_both_sides(engines, async_scheduling):
    """A 150-token prompt is prefilled in three chunks; decode's prompt is longer still (a follow-up turn):
    it loads the 150 and computes the other 70 in chunks of its own. Layer-wise mode marks each layer
    ready once, in the step that completes the prompt."""
    prefill = engines("kv_producer", salt=1, async_scheduling=async_scheduling, extra={"layerwise": True})
    decode = engines("kv_consumer", salt=2, async_scheduling=async_scheduling)
    calls = []
    endpoint = prefill.workers[0].endpoint
    original = endpoint.layer_ready
    endpoint.layer_ready = lambda request, layer, *a, **k: (calls.append((prefill.steps, request, layer)),
                                                           original(request, layer, *a, **k))
    prompt = list(range(3, 153))
    _, loaded = transfer(prefill, decode, prompt=prompt, decode_prompt=prompt + list(range(160, 230)))
    assert loaded == len(prompt)
    assert len(prefill.written["p-r0"]) >= len(prompt)
    assert sorted(layer for _, _, layer in calls) == [0, 1] and len({step for step, _, _ in calls}) == 1


def test_concurrent_requests_with_shared_prefixes(engines):
    prefill = engines("kv_producer", tp=2, salt=1, extra={"decode_tp_size": 1}, num_blocks=128)
    decode = engines("kv_consumer", salt=2, num_blocks=128)
    prompts = [list(range(10, 10 + 40 + 9 * i)) + [200 + i] for i in range(6)]
    params = [h.prefill(prefill, f"p{i}", prompt) for i, prompt in enumerate(prompts)]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        decode.add(h.make_request(f"d{i}", prompt, max_tokens=2, kv_transfer_params=p), snapshot_tokens=len(prompt))
    h.run(prefill, decode, until_done=lambda: len(decode.finished) == 6 and not prefill.scheduler.requests,
          what="six requests through both engines")
    for i, prompt in enumerate(prompts):
        assert decode.finished[f"d{i}"].finish_reason.name == "LENGTH"
        h.check_bytes(prefill, f"p{i}", decode, f"d{i}", prompt)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)], ids=["2-1", "1-2"])
def test_mla(engines, prefill_tp, decode_tp):
    prefill = engines("kv_producer", tp=prefill_tp, kind="mla", salt=1, extra={"decode_tp_size": decode_tp})
    decode = engines("kv_consumer", tp=decode_tp, kind="mla", salt=2)
    assert prefill.workers[0].endpoint.layout.name == "vllm_mla"
    _, loaded = transfer(prefill, decode)
    assert loaded == len(PROMPT) - 1


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1)], ids=["1-1", "2-1"])
def test_fp8_kv_cache(engines, prefill_tp, decode_tp):
    prefill = engines("kv_producer", tp=prefill_tp, kind="fp8", salt=1, extra={"decode_tp_size": decode_tp})
    decode = engines("kv_consumer", tp=decode_tp, kind="fp8", salt=2)
    assert decode.workers[0].endpoint.layout.dtype == torch.float8_e4m3fn
    transfer(prefill, decode)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(4, 1), (1, 4)], ids=["4-1", "1-4"])
def test_tp_beyond_the_kv_heads(engines, prefill_tp, decode_tp):
    """2 KV heads over 4 ranks: vLLM replicates each head on two ranks; kvlink reads each head once and
    releases the replicas nobody reads."""
    prefill = engines("kv_producer", tp=prefill_tp, salt=1, extra={"decode_tp_size": decode_tp})
    decode = engines("kv_consumer", tp=decode_tp, salt=2)
    transfer(prefill, decode)


@pytest.mark.parametrize("prefill_layout,decode_layout", [("LBHNC", "LBNHC"), ("BLNHC", "LHBNC")])
def test_cache_layouts_differ(engines, prefill_layout, decode_layout):
    prefill = engines("kv_producer", layout=prefill_layout, salt=1)
    decode = engines("kv_consumer", layout=decode_layout, salt=2)
    transfer(prefill, decode)


@pytest.mark.parametrize("prefill_block,decode_block", [(32, 16), (16, 32)])
def test_block_sizes_differ(engines, prefill_block, decode_block):
    prefill = engines("kv_producer", block_size=prefill_block, salt=1)
    decode = engines("kv_consumer", block_size=decode_block, salt=2)
    transfer(prefill, decode)


def test_kernel_blocks_smaller_than_the_schedulers(engines):
    """vLLM may split each scheduler block into kernel blocks (allocate_kv_cache's kernel_block_sizes)."""
    prefill = engines("kv_producer", salt=1)
    decode = engines("kv_consumer", salt=2, kernel_block_size=8)
    assert decode.workers[0].worker._ratio == 2
    transfer(prefill, decode)


def test_draft_model_layers_move_with_the_target_layers(engines):
    """A draft model's layers (same KV spec: vLLM puts them in the target's group) move too."""
    prefill = engines("kv_producer", draft_layers=1, salt=1)
    decode = engines("kv_consumer", draft_layers=1, salt=2)
    assert len(decode.kv_cache_config.kv_cache_groups) == 1
    assert decode.workers[0].endpoint.layout.num_layers == 3
    transfer(prefill, decode)


def test_a_prefill_that_stops_at_eos_is_offered(engines, monkeypatch):
    prefill = engines("kv_producer", salt=1)
    decode = engines("kv_consumer", salt=2)
    monkeypatch.setattr(h, "TOKEN", h.EOS)
    params = h.prefill(prefill, "p-eos", PROMPT)
    assert prefill.finished["p-eos"].finish_reason.name == "STOP" and params["do_remote_prefill"]
    monkeypatch.setattr(h, "TOKEN", 5)
    decode.add(h.make_request("d-eos", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d-eos" in decode.finished and not prefill.holds("p-eos"))
    h.check_bytes(prefill, "p-eos", decode, "d-eos", PROMPT)


def test_kv_both_engines(engines):
    prefill = engines("kv_both", salt=1)
    decode = engines("kv_both", salt=2)
    transfer(prefill, decode)


def test_the_lease_frees_blocks_no_decode_reads(engines):
    prefill = engines("kv_producer", salt=1, extra={"lease_seconds": 1.0})
    free = prefill.free_blocks()
    h.prefill(prefill, "p-orphan", PROMPT)
    assert prefill.holds("p-orphan")
    h.until(lambda: not prefill.holds("p-orphan"), step=prefill.step, timeout=30, what="the lease freeing the blocks")
    assert prefill.free_blocks() == free


def test_layerwise_pulls_overlap_the_prefill_forward(engines):
    """With ``layerwise``, prefill's save_kv_layer releases each layer to a layer-wise pull as soon as its
    forward wrote it (a decode that knows the transfer in advance: a proxy-chosen transfer_id)."""
    prefill = engines("kv_producer", salt=1, extra={"layerwise": True}, max_batched_tokens=128)  # one step
    decode = engines("kv_consumer", salt=2)
    request = h.make_request("p-lw", PROMPT, kv_transfer_params={"do_remote_decode": True, "transfer_id": "t-lw"})
    prefill.add(request, snapshot_tokens=len(PROMPT))
    output = prefill.scheduler.schedule()
    src = prefill.scheduler.kv_cache_manager.get_block_ids("p-lw")[0][:5]
    dst = [40, 41, 42, 43, 44]
    endpoint = decode.workers[0].endpoint
    handle = endpoint.pull(endpoint.connect(prefill.workers[0].endpoint.address), "t-lw", src, dst, len(PROMPT),
                           layerwise=True)
    time.sleep(0.2)
    assert not handle.done(), "finished before the prefill forward saved any layer"
    prefill._update(output, prefill._execute(output))  # the forward: save_kv_layer per layer
    handle.wait(20)
    assert isinstance(handle, kvlink.TransferHandle) and handle.error is None
    got = decode.rows(dst, len(PROMPT))
    assert torch.equal(got, prefill.expected_rows(PROMPT, len(PROMPT), got.shape[3]))


def test_a_decode_tp_prefill_does_not_count_on_is_computed_locally_and_released(engines):
    """Prefill counts confirmations from 2 decode ranks, this decode has 1: decode computes the prompt
    and releases prefill's rank for both of the ranks it expects."""
    prefill = engines("kv_producer", salt=1, extra={"lease_seconds": 600.0, "decode_tp_size": 2})
    decode = engines("kv_consumer", salt=2)
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d" in decode.finished and not prefill.holds("p"), timeout=30)
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    assert h.check_bytes(prefill, "p", decode, "d", PROMPT) == 0


def test_engines_with_different_layers_fail_the_load_alone(engines):
    """Prefill runs a draft model, decode does not: the handshake refuses the link (the layer counts
    differ), the load fails, and vLLM's 'recompute' policy computes the request locally."""
    prefill = engines("kv_producer", salt=1, draft_layers=1)
    decode = engines("kv_consumer", salt=2, policy="recompute")
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params))
    h.until(lambda: "d" in decode.finished, step=decode.step, timeout=60)
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    assert any("d" in o.failed_recving for o in decode.kv_outputs)
    assert set(range(len(PROMPT))) <= decode.written["d"]
