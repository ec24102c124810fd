"""KVLinkConnector driven through vLLM v1's documented call sequence, real transfers on the host transport.

Prefill: get_num_new_matched_tokens -> build_connector_meta -> worker step (save_kv_layer per
layer) -> request_finished (holds the blocks, returns kv_transfer_params). Decode, with those
parameters under another engine-local request id: get_num_new_matched_tokens -> (n, True) ->
update_state_after_alloc -> build_connector_meta -> start_load_kv -> get_finished until the
request is received. Then the caches are compared byte for byte and the prefill side reports the
request sent.
"""

import inspect
import time

import pytest
import torch

import kvlink
from kvlink.integrations import vllm as kv_vllm
from kvlink.integrations.vllm import KVLinkConnector, KVLinkConnectorMetadata, KVConnectorRole
from kvlink.resharding import heads_of_rank
from sharded_caches import make_truth, poisoned_cache, rank_cache, read_rows, truth_rows
from vllm_fakes import KVCacheBlocks, NewRequestData, Request, SchedulerOutput, config

LAYERS, HEADS, HEAD_DIM, BLOCKS, BLOCK = 3, 4, 16, 32, 16


def names(num_layers=LAYERS):
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


class Engine:
    """One vLLM engine's connectors: a scheduler and a worker per TP rank, with CPU caches."""

    def __init__(self, kv_role, tp, caches, preset, **extra):
        extra.setdefault("transport", "host")
        cfg = config(kv_role, tp=tp, block_size=caches[0][1].block_size, timeout=extra.pop("timeout", 5.0), **extra)
        self.scheduler = KVLinkConnector(cfg, KVConnectorRole.SCHEDULER)
        self.workers = []
        self.caches = caches
        self.preset = preset
        for rank, (engine_tensors, _) in enumerate(caches):
            worker_cfg = config(kv_role, tp=tp, block_size=caches[0][1].block_size, tp_rank=rank,
                                **dict(cfg.kv_transfer_config.kv_connector_extra_config))
            worker = KVLinkConnector(worker_cfg, KVConnectorRole.WORKER)
            worker.register_kv_caches(dict(zip(names(), engine_tensors)))
            self.workers.append(worker)
        handshakes = {w.tp_rank: w.get_handshake_metadata() for w in self.workers}
        if all(handshakes.values()):
            self.scheduler.set_xfer_handshake_metadata(handshakes)

    def step(self, scheduler_output=None, finished=frozenset()):
        """One engine step: metadata to every worker, a forward pass's calls, get_finished."""
        meta = self.scheduler.build_connector_meta(scheduler_output or SchedulerOutput())
        assert isinstance(meta, KVLinkConnectorMetadata)
        results = []
        for worker, (engine_tensors, _) in zip(self.workers, self.caches):
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)
            for name, tensor in zip(names(), engine_tensors):
                worker.wait_for_layer_load(name)
                worker.save_kv_layer(name, tensor, None)
            worker.wait_for_save()
            results.append(worker.get_finished(set(finished)))
            worker.clear_connector_metadata()
        return results

    def close(self):
        for worker in self.workers:
            worker.shutdown()


def until(condition, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout} s")


def build(prefill_tp, decode_tp, seed, decode_preset="vllm_flash_attn_nhd", decode_block=BLOCK,
          prefill_device="cpu", decode_device="cpu"):
    truth = make_truth(seed, num_layers=LAYERS, num_kv=2, num_blocks=BLOCKS, block_size=BLOCK, num_heads=HEADS,
                       head_dim=HEAD_DIM)
    prefill_caches = [rank_cache("vllm_flash_attn_nhd", truth, heads_of_rank(HEADS, prefill_tp, r), prefill_device)
                      for r in range(prefill_tp)]
    decode_caches = [poisoned_cache(decode_preset, num_layers=LAYERS,
                                    num_blocks=BLOCKS * BLOCK // decode_block, block_size=decode_block,
                                    num_heads=heads_of_rank(HEADS, decode_tp, r)[1] - heads_of_rank(HEADS, decode_tp, r)[0],
                                    head_dim=HEAD_DIM, seed=seed + r, device=decode_device)
                     for r in range(decode_tp)]
    return truth, prefill_caches, decode_caches


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and kvlink.kernels.cuda_available()
CASES = [pytest.param(1, 1, "vllm_flash_attn_nhd", "host", id="1-1-host"),
         pytest.param(2, 1, "vllm_flashinfer_hnd", "host", id="2-1-host"),
         pytest.param(1, 2, "vllm_2026", "host", id="1-2-host")]
GPU_CASES = [pytest.param(1, 1, "vllm_flashinfer_hnd", transport, id=f"1-1-gpus-{transport}",
                          marks=pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs"))
             for transport in ("nccl", "ipc")]


@pytest.mark.parametrize("prefill_tp,decode_tp,decode_preset,transport", CASES + GPU_CASES)
def test_prefill_to_decode_through_the_documented_call_sequence(prefill_tp, decode_tp, decode_preset, transport,
                                                                  generator):
    seed = int(generator.initial_seed())
    devices = ("cuda:0", "cuda:1") if transport != "host" else ("cpu", "cpu")
    truth, prefill_caches, decode_caches = build(prefill_tp, decode_tp, seed, decode_preset, prefill_device=devices[0],
                                                 decode_device=devices[1])
    prefill = Engine("kv_producer", prefill_tp, prefill_caches, "vllm_flash_attn_nhd", decode_tp_size=decode_tp,
                     transport=transport, timeout=20.0)
    decode = Engine("kv_consumer", decode_tp, decode_caches, decode_preset, transport=transport, timeout=20.0,
                    **({"kv_layout": "HND"} if decode_preset.endswith("_hnd") else {}))
    try:
        num_tokens = 77
        prefill_blocks = [5, 17, 2, 30, 11]
        decode_blocks = [9, 1, 22, 4, 13, 28]  # one more than needed, as vLLM may allocate
        p_req = Request("cmpl-7f3a-0-8c1e", list(range(num_tokens)), {"do_remote_decode": True})
        assert prefill.scheduler.get_num_new_matched_tokens(p_req, 0) == (0, False)
        prefill.step(SchedulerOutput([NewRequestData(p_req.request_id)]))  # the prefill forward pass
        delay_free, params = prefill.scheduler.request_finished(p_req, prefill_blocks)
        assert delay_free is True
        assert params["do_remote_prefill"] and params["remote_block_ids"] == prefill_blocks
        assert len(params["remote_addresses"]) == prefill_tp and params["num_tokens"] == num_tokens
        sent = prefill.step(finished={p_req.request_id})
        assert all(s[0] is None for s in sent), "sent before decode confirmed"

        # the proxy forwards params; decode knows the request under another engine-local id
        d_req = Request("cmpl-7f3a-0-41b2", list(range(num_tokens)), dict(params))
        count, load_async = decode.scheduler.get_num_new_matched_tokens(d_req, 0)
        assert (count, load_async) == (num_tokens, True)
        decode.scheduler.update_state_after_alloc(d_req, KVCacheBlocks(decode_blocks), count)
        assert decode.scheduler.get_num_new_matched_tokens(d_req, 0) == (0, False), "loaded twice"
        received = [set() for _ in decode.workers]
        results = decode.step()
        while True:
            for rank, (_, recving) in enumerate(results):
                received[rank] |= recving or set()
            if all(d_req.request_id in r for r in received):
                break
            until(lambda: True, 0.01)
            results = decode.step()
        for worker in decode.workers:
            assert worker.get_block_ids_with_load_errors() == set()
            assert all(link["transport"] == transport for link in worker.endpoint.links())
        for rank, (engine_tensors, layout) in enumerate(decode_caches):
            got = read_rows(decode_preset, engine_tensors, layout, decode_blocks[:-(-num_tokens // BLOCK)], num_tokens)
            want = truth_rows(truth, prefill_blocks, num_tokens, heads_of_rank(HEADS, decode_tp, rank))
            assert torch.equal(got, want), f"decode rank {rank} differs"

        sent_by = [set() for _ in prefill.workers]  # vLLM aggregates each worker's reports across steps

        def all_sent():
            for rank, (sending, _) in enumerate(prefill.step()):
                sent_by[rank] |= sending or set()
            return all(p_req.request_id in s for s in sent_by)
        until(all_sent, what="prefill reporting the request sent")
    finally:
        prefill.close()
        decode.close()


def test_a_prefill_that_never_answers_is_a_load_error_within_the_timeout(generator):
    _, _, decode_caches = build(1, 1, int(generator.initial_seed()))
    decode = Engine("kv_consumer", 1, decode_caches, "vllm_flash_attn_nhd", timeout=1.0)
    try:
        params = {"do_remote_prefill": True, "transfer_id": "t-lost", "remote_block_ids": [1, 2],
                  "remote_addresses": ["tcp://127.0.0.1:9"], "remote_tp_size": 1, "num_tokens": 20}
        req = Request("cmpl-lost", list(range(20)), params)
        count, _ = decode.scheduler.get_num_new_matched_tokens(req, 0)
        decode.scheduler.update_state_after_alloc(req, KVCacheBlocks([3, 4]), count)
        started = time.time()
        results = decode.step()
        while req.request_id not in (results[0][1] or set()):
            assert time.time() - started < 5.0, "no load error within 5 s"
            results = decode.step()
        assert decode.workers[0].get_block_ids_with_load_errors() == {3, 4}
        assert decode.workers[0].get_block_ids_with_load_errors() == set(), "reported once"
    finally:
        decode.close()


def test_blocks_are_freed_when_the_lease_runs_out(generator):
    _, prefill_caches, _ = build(1, 1, int(generator.initial_seed()))
    prefill = Engine("kv_producer", 1, prefill_caches, "vllm_flash_attn_nhd", lease_seconds=0.3)
    try:
        req = Request("cmpl-orphan", list(range(20)), {"do_remote_decode": True, "transfer_id": "t-orphan"})
        prefill.scheduler.get_num_new_matched_tokens(req, 0)
        delay_free, params = prefill.scheduler.request_finished(req, [1, 2])
        assert delay_free and params["transfer_id"] == "t-orphan"
        assert prefill.step(finished={req.request_id})[0][0] is None
        until(lambda: req.request_id in (prefill.step()[0][0] or set()), what="the lease freeing the blocks")
    finally:
        prefill.close()


def test_save_kv_layer_releases_each_layer_to_a_layerwise_pull(generator):
    seed = int(generator.initial_seed())
    truth, prefill_caches, decode_caches = build(1, 1, seed)
    prefill = Engine("kv_producer", 1, prefill_caches, "vllm_flash_attn_nhd")
    try:
        req = Request("cmpl-lw", list(range(40)), {"do_remote_decode": True, "transfer_id": "t-lw"})
        prefill.scheduler.get_num_new_matched_tokens(req, 0)
        with kvlink.Endpoint(decode_caches[0][1], name="lw-decode", listen=None, timeout=5) as decode:
            peer = decode.connect(prefill.workers[0].endpoint.address)
            handle = decode.pull(peer, "t-lw", [3, 4, 5], [6, 7, 8], 40, layerwise=True)
            time.sleep(0.2)
            assert not handle.done(), "finished before the prefill forward saved any layer"
            prefill.step(SchedulerOutput([NewRequestData(req.request_id)]))  # save_kv_layer for every layer
            handle.wait(5)
            got = read_rows("vllm_flash_attn_nhd", decode_caches[0][0], decode_caches[0][1], [6, 7, 8], 40)
            assert torch.equal(got, truth_rows(truth, [3, 4, 5], 40, (0, HEADS)))
    finally:
        prefill.close()


def test_incomplete_params_and_bad_roles_are_refused():
    with pytest.raises(ValueError, match="kv_role must be"):
        KVLinkConnector(config("kv_sideways"), KVConnectorRole.SCHEDULER)
    scheduler = KVLinkConnector(config("kv_consumer"), KVConnectorRole.SCHEDULER)
    req = Request("r", list(range(10)), {"do_remote_prefill": True, "num_tokens": 10})
    count, _ = scheduler.get_num_new_matched_tokens(req, 0)
    with pytest.raises(ValueError, match=r"kv_transfer_params lack \['transfer_id', 'remote_block_ids'"):
        scheduler.update_state_after_alloc(req, KVCacheBlocks([1]), count)


def test_registration_reads_each_vllm_layout_from_its_tensors():
    for preset, expected in (("vllm_flash_attn_nhd", "vllm_flash_attn_nhd"), ("vllm_flashinfer_nhd", "vllm_flashinfer_nhd"),
                             ("vllm_2026", "vllm_2026"), ("vllm_mla", "vllm_mla")):
        heads = 1 if preset == "vllm_mla" else 2
        tensors, _ = kvlink.presets.allocate(preset, num_layers=2, num_blocks=4, block_size=8, num_heads=heads,
                                             head_dim=16)
        layout = kv_vllm.layout_from_vllm(dict(zip(names(2), tensors)))
        assert layout.name == expected and layout.num_blocks == 4 and layout.block_size == 8
    with pytest.raises(ValueError, match="unrecognised vLLM KV cache shape"):
        kv_vllm.layout_from_vllm({"x": torch.empty(2, 3)})


@pytest.mark.skipif(not kv_vllm.HAVE_VLLM, reason="vLLM is not installed here")
def test_the_connector_implements_vllms_real_base_class():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(KVLinkConnector, KVConnectorBase_V1)
    for name in KVConnectorBase_V1.__abstractmethods__:
        ours, theirs = inspect.signature(getattr(KVLinkConnector, name)), inspect.signature(
            getattr(KVConnectorBase_V1, name))
        assert list(ours.parameters)[:len(theirs.parameters)] == list(theirs.parameters), name
    assert not getattr(KVLinkConnector, "__abstractmethods__", set())
